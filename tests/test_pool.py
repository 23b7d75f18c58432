"""The adapter pool and slot numbering: model-wide slot ids, capacity doubling, rank growth, slot reuse, lazy
refresh from the Parameters, moves; the per-row mapping and its expansion; a LoraLinear running a mixed batch."""
import copy
import io

import pytest
import torch
from torch import nn

import ptlm_engine as pe
from ptlm_engine import api, inject
from ptlm_engine.layers import LoraLinear
from ptlm_engine.layers.bottleneck import bottleneck_pool
from ptlm_engine.layers.lora import lora_pool
from ptlm_engine.ops.bottleneck_multi import BottleneckSlots
from ptlm_engine.pool import AdapterBatch, free_slot
from tests.helpers import run_alone, seeded_ids, state_copy

pytestmark = pytest.mark.usefixtures("reference_backend")


def _adapter(r, d_in=6, d_out=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return nn.Parameter(torch.randn(r, d_in, generator=gen)), nn.Parameter(torch.randn(d_out, r, generator=gen))


def _pool():
    return lora_pool(6, 5, torch.device("cpu"), torch.float32)


def test_free_slot_is_the_lowest_unused():
    assert free_slot([]) == 0 and free_slot([0, 1]) == 2 and free_slot([0, 2, 3]) == 1 and free_slot([1]) == 0


def test_capacity_doubles_and_rank_grows_only_for_a_larger_one():
    pool = _pool()
    shapes = []
    for slot, r in enumerate([4, 2, 8, 8, 1]):
        pool.put(slot, _adapter(r, seed=slot), scales=slot + 0.5)
        shapes.append((pool.capacity, pool.width))
    assert shapes == [(1, 4), (2, 4), (4, 8), (4, 8), (8, 8)]
    assert pool.ranks.tolist() == [4, 2, 8, 8, 1, 0, 0, 0] and pool.ranks.dtype == torch.int32
    assert pool.scales.tolist() == [0.5, 1.5, 2.5, 3.5, 4.5, 0, 0, 0] and pool.scales.dtype == torch.float32
    for slot, r in enumerate([4, 2, 8, 8, 1]):                                      # kept through the growths
        lora_A, lora_B = _adapter(r, seed=slot)
        assert torch.equal(pool.lora_A[slot, :r], lora_A) and torch.equal(pool.lora_B[slot, :, :r], lora_B)
        assert not pool.lora_A[slot, r:].any() and not pool.lora_B[slot, :, r:].any()
    assert not pool.lora_A[5:].any()
    first = pool.slots(3)                                                            # views of the first slots
    assert first.lora_A.shape == (3, 8, 6) and first.lora_B.shape == (3, 5, 8) and first.ranks.tolist() == [4, 2, 8]
    assert first.lora_A.data_ptr() == pool.lora_A.data_ptr() and pool.slots().lora_A.shape[0] == 8


def test_removal_zeroes_the_slot_and_reuse_touches_nothing_else():
    pool = _pool()
    for slot, r in enumerate([4, 8, 2]):
        pool.put(slot, _adapter(r, seed=slot), scales=1.0)
    storage = pool.lora_A.data_ptr(), pool.lora_B.data_ptr()
    others = pool.lora_A[[0, 2]].clone()
    pool.clear(1)
    assert not pool.lora_A[1].any() and not pool.lora_B[1].any() and pool.ranks[1] == 0 and pool.scales[1] == 0
    pool.put(1, _adapter(3, seed=9), scales=2.0)                                    # a smaller rank in the old slot
    assert (pool.lora_A.data_ptr(), pool.lora_B.data_ptr()) == storage
    assert torch.equal(pool.lora_A[[0, 2]], others) and not pool.lora_A[1, 3:].any() and pool.ranks[1] == 3


def test_sync_copies_only_what_changed():
    pool = _pool()
    lora_A, lora_B = _adapter(4)
    pool.put(0, [lora_A, lora_B], scales=1.0)
    with torch.no_grad():
        pool.lora_A[0].fill_(7.0)          # a marker: an unchanged adapter must not be copied again
    pool.sync(0, [lora_A, lora_B])
    assert (pool.lora_A[0] == 7.0).all()
    with torch.no_grad():
        lora_B.mul_(2)                                                               # bumps the version counter
    pool.sync(0, [lora_A, lora_B])
    assert torch.equal(pool.lora_A[0], lora_A) and torch.equal(pool.lora_B[0], lora_B)
    lora_A.data = lora_A.data + 1                                                    # new storage, same object
    pool.sync(0, [lora_A, lora_B])
    assert torch.equal(pool.lora_A[0], lora_A)
    other_A = nn.Parameter(lora_A.detach() - 1)                                     # another object
    pool.sync(0, [other_A, lora_B])
    assert torch.equal(pool.lora_A[0], other_A)


def test_move_reallocates_and_refills_on_sync():
    pool = _pool()
    lora_A, lora_B = _adapter(4)
    pool.put(0, [lora_A, lora_B], scales=3.0)
    pool.move(torch.device("cpu"), torch.float64)
    assert pool.dtype == torch.float64 and not pool.lora_A.any() and pool.ranks.tolist() == [4]
    pool.sync(0, [lora_A, lora_B])
    assert torch.equal(pool.lora_A[0], lora_A.double()) and pool.scales.tolist() == [3.0]



def test_any_layout_stacks_by_width_dim_and_views_follow_growth():
    """A bottleneck pool: tensors with the width in dim 1 or 2 or none, three scalars, views rebuilt on growth."""
    pool = bottleneck_pool(5, torch.device("cpu"), torch.float32)
    gen = torch.Generator().manual_seed(0)
    adapters = {slot: [nn.Parameter(torch.randn(shape, generator=gen)) for shape in ((m, 5), (m,), (5, m), (5,))]
                for slot, m in ((0, 3), (2, 6))}
    pool.put(0, adapters[0], scales=0.5, acts=2)
    first = pool.slots(1)
    assert pool.slots(1) is first and (pool.capacity, pool.width) == (1, 3)
    pool.put(2, adapters[2], scales=2.0, acts=1)                                     # capacity 4, width 6
    views = pool.slots(3)
    assert isinstance(views, BottleneckSlots) and pool.slots(1) is not first
    assert views.down_weight.shape == (3, 6, 5) and views.up_weight.shape == (3, 5, 6) and views.up_bias.shape == (3, 5)
    assert pool.sizes.tolist() == [3, 0, 6, 0] and pool.scales.tolist() == [0.5, 0, 2, 0]
    assert pool.acts.tolist() == [2, 0, 1, 0]
    for slot, (down_w, down_b, up_w, up_b) in adapters.items():
        m = down_b.shape[0]
        assert torch.equal(views.down_weight[slot, :m], down_w) and torch.equal(views.down_bias[slot, :m], down_b)
        assert torch.equal(views.up_weight[slot, :, :m], up_w) and torch.equal(views.up_bias[slot], up_b)
        assert not views.down_weight[slot, m:].any() and not views.up_weight[slot, :, m:].any()
    pool.clear(2)
    assert not views.up_bias[2].any() and pool.sizes.tolist() == [3, 0, 0, 0] and pool.acts[2] == 0

def test_row_and_token_index():
    batch = AdapterBatch(["x", None, "y", "x"], {"x": 2, "y": 0}, [torch.device("cpu")])
    assert batch.adapters == {"x": 2, "y": 0} and batch.num_slots == 3
    x = torch.zeros(4, 3, 8)
    index, segments = batch.tokens(x)
    assert index.tolist() == [[2] * 3, [-1] * 3, [0] * 3, [2] * 3] and index.dtype == torch.int32
    assert segments is None                                   # the reference backend does not group tokens
    assert batch.tokens(torch.ones(4, 3, 8))[0] is index                             # once per input shape
    with pytest.raises(ValueError, match="must be equal to the number of names"):
        batch.tokens(torch.zeros(8, 3, 8))
    batch.expanding = True                                                           # as inside generate
    assert batch.tokens(torch.zeros(8, 1, 8))[0].tolist() == [[2], [2], [-1], [-1], [0], [0], [2], [2]]
    with pytest.raises(ValueError, match="must be a multiple of"):
        batch.tokens(torch.zeros(6, 1, 8))
    batch.expanding = False                                   # the cached shape is checked again
    with pytest.raises(ValueError, match="must be equal to the number of names"):
        batch.tokens(torch.zeros(8, 1, 8))
    assert AdapterBatch([None, None], {}, []).num_slots == 0


def test_slot_ids_are_model_wide_and_reused(tiny):
    llama = tiny("llama")
    targets = {"a": ["q_proj", "v_proj"], "b": ["v_proj"], "c": ["q_proj", "o_proj"]}
    for name, modules in targets.items():
        pe.add_adapter(llama, name, pe.LoraConfig(r=4, target_modules=modules))
    reg = api.registry(llama)
    assert reg.slots == {"a": 0, "b": 1, "c": 2}
    layers = dict(inject.lora_layers(llama))
    q, v, o = (layers[f"model.layers.0.self_attn.{p}_proj"] for p in "qvo")
    assert q.slot == {"a": 0, "c": 2} and v.slot == {"a": 0, "b": 1} and o.slot == {"c": 2}
    assert (q.pool.capacity, v.pool.capacity, o.pool.capacity) == (4, 2, 4)          # doubling up to the id
    v_storage = v.pool.lora_A.data_ptr()

    pe.remove_adapter(llama, "b")
    assert not v.pool.lora_A[1].any() and v.pool.ranks[1] == 0
    pe.add_adapter(llama, "d", pe.LoraConfig(r=2, target_modules=["v_proj", "o_proj"]))
    assert reg.slots["d"] == 1 and v.slot == {"a": 0, "d": 1} and o.slot == {"c": 2, "d": 1}
    assert v.pool.lora_A.data_ptr() == v_storage and v.pool.ranks.tolist() == [4, 2]   # reused in place
    with pe.adapter_batch(llama, ["c", None]):
        assert v.pool.capacity == 4                           # room for slot 2, which v lacks: an empty slot
        assert v.batch_adapters == {} and q.batch_adapters == {2: "c"}


def _lora(r):
    return pe.LoraConfig(r=r, target_modules=["q_proj", "v_proj"])


def _llama_a_b(tiny, randomize_adapters=None):
    """A tiny Llama with LoRA adapters "a" (r 4) and "b" (r 8), random values in each if randomize_adapters is
    given (fresh adapters change nothing)."""
    llama = tiny("llama")
    for name, r in (("a", 4), ("b", 8)):
        pe.add_adapter(llama, name, _lora(r))
        if randomize_adapters is not None:
            pe.set_active_adapter(llama, name)
            randomize_adapters(llama, seed=r)
    return llama


def _served_rows_alone(model, names, ids, output, **tolerance):
    """The mixed batch's output over `names`, after checking each row against that row run alone with its adapter
    (None: the base model)."""
    with torch.no_grad():
        with pe.adapter_batch(model, names):
            mixed = output(model, ids)
        for row, name in enumerate(names):
            alone = run_alone(model, name, lambda: output(model, ids[row:row + 1]))
            torch.testing.assert_close(mixed[row], alone[0], **tolerance)
    return mixed


def test_add_remove_cycles_reuse_slots_and_keep_the_capacity(tiny, output, randomize_adapters):
    """Adapters of ranks 1 to 256 added and removed twice over next to one that stays, with a mixed batch in
    between: each row is its adapter's alone, removed adapters' slots are zeroed and reused (ids stay low), the
    capacity stays what the most adapters present at once need (a power of two), and adding into room already
    there reallocates nothing: a server swapping adapters keeps its pools bounded."""
    llama = tiny("llama")
    pe.add_adapter(llama, "keep", _lora(4))
    randomize_adapters(llama, seed=100)
    q = llama.model.layers[0].self_attn.q_proj
    seen = []
    for cycle in range(2):
        for i, r in enumerate([1, 3, 256, 2, 17]):
            pe.add_adapter(llama, f"a{i}", _lora(r))
            pe.set_active_adapter(llama, f"a{i}")
            randomize_adapters(llama, seed=10 * cycle + i)
        _served_rows_alone(llama, ["a2", "keep", "a0"], seeded_ids(3), output)
        seen.append((q.pool.capacity, sorted(q.slot.values())))
        for i in range(5):
            pe.remove_adapter(llama, f"a{i}")
        assert q.slot == {"keep": 0} and not q.pool.ranks[1:].any() and not q.pool.lora_A[1:].any()
    assert seen == [(8, [0, 1, 2, 3, 4, 5])] * 2
    storage = q.pool.lora_A.data_ptr()
    for i in range(5):                                          # room for them: "keep"'s slot is not copied again
        pe.add_adapter(llama, f"b{i}", _lora(4))
        assert q.pool.lora_A.data_ptr() == storage


def test_pool_follows_the_model_to_float64(tiny, output, randomize_adapters):
    llama = tiny("llama")
    pe.add_adapter(llama, "a", pe.LoraConfig(r=4, target_modules=["q_proj"]))
    pe.add_adapter(llama, "b", pe.LoraConfig(r=8, target_modules=["q_proj"]))
    for name in ("b", "a"):
        pe.set_active_adapter(llama, name)
        randomize_adapters(llama, seed=len(name))
    llama.double()
    ids = torch.randint(0, 128, (2, 5))
    with torch.no_grad(), pe.adapter_batch(llama, ["b", "a"]):
        mixed = output(llama, ids)
    layer = inject.lora_layers(llama)[0][1]
    assert layer.pool.dtype == torch.float64 and mixed.dtype == torch.float64
    torch.testing.assert_close(mixed[1], output(llama, ids[1:])[0])


@pytest.mark.parametrize("convert", ["half", "bfloat16", "float_after_half"])
def test_pools_follow_the_model_to_half_precision_and_back(tiny, output, randomize_adapters, convert):
    """model.half(), .to(torch.bfloat16) or .half().float() after adapters were added and served in a mixed batch:
    the pools follow the model, each mixed row is its adapter's alone in the new dtype, and the rows stay within
    that dtype's rounding of the float32 ones."""
    llama = _llama_a_b(tiny, randomize_adapters)
    ids = seeded_ids(3)
    want = _served_rows_alone(llama, ["a", "b", None], ids, output)
    if convert == "float_after_half":
        llama.half().float()
    else:
        llama.to(torch.float16 if convert == "half" else torch.bfloat16)
    mixed = _served_rows_alone(llama, ["a", "b", None], ids, output)
    assert mixed.dtype == inject.lora_layers(llama)[0][1].pool.dtype == llama.lm_head.weight.dtype
    atol = {"half": 5e-2, "bfloat16": 2e-1, "float_after_half": 5e-2}[convert]
    torch.testing.assert_close(mixed.float(), want, rtol=0, atol=atol)


def test_model_with_a_pool_copies_and_pickles(tiny, output, randomize_adapters):
    gpt2 = tiny("gpt2")
    pe.add_adapter(gpt2, "a", pe.LoraConfig(r=4, target_modules=["c_attn"]))
    randomize_adapters(gpt2)
    buffer = io.BytesIO()
    torch.save(gpt2, buffer)
    buffer.seek(0)
    ids = torch.randint(0, 128, (2, 5))
    for clone in (copy.deepcopy(gpt2), torch.load(buffer, weights_only=False)):
        with torch.no_grad(), pe.adapter_batch(clone, ["a", None]):
            mixed = output(clone, ids)
        torch.testing.assert_close(mixed[0], output(gpt2, ids[:1])[0])


@pytest.mark.parametrize("assign", [False, True], ids=["copy", "assign"])
def test_load_state_dict_into_filled_pools_serves_the_loaded_values(tiny, output, randomize_adapters, assign):
    """load_state_dict (copying, or with assign=True, which puts new Parameter objects in) into a model whose pools a
    mixed batch already filled: the next mixed batch serves the loaded values, as in the model they came from."""
    ids = seeded_ids(3)
    source = _llama_a_b(tiny, randomize_adapters)
    want = _served_rows_alone(source, ["a", "b", None], ids, output)
    llama = _llama_a_b(tiny)
    _served_rows_alone(llama, ["a", "b", None], ids, output)                # the pools hold the fresh adapters
    llama.load_state_dict(state_copy(source), assign=assign)
    torch.testing.assert_close(_served_rows_alone(llama, ["a", "b", None], ids, output), want)


def test_a_deepcopy_of_a_model_with_filled_pools_has_pools_of_its_own(tiny, output, randomize_adapters):
    """copy.deepcopy of a model a mixed batch has served: new values in the copy's adapter reach the copy's rows and
    leave the original's as they were (the pools are copied, not shared)."""
    ids = seeded_ids(3)
    llama = _llama_a_b(tiny, randomize_adapters)
    served = _served_rows_alone(llama, ["a", "b", None], ids, output)
    twin = copy.deepcopy(llama)
    pe.set_active_adapter(twin, "a")
    randomize_adapters(twin, seed=99)
    assert not torch.allclose(_served_rows_alone(twin, ["a", "b", None], ids, output)[0], served[0])
    torch.testing.assert_close(_served_rows_alone(llama, ["a", "b", None], ids, output), served)


def _layer_with_two_adapters():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoraLinear(base, fan_in_fan_out=False)
    layer.add_adapter("a", r=2, scale=2.0, dropout=0.0)
    layer.add_adapter("b", r=4, scale=0.5, dropout=0.0)
    with torch.no_grad():
        for name in ("a", "b"):
            layer.lora_B[name].weight.normal_()
    return layer


def test_layer_mixed_rows_on_2d_and_3d_inputs():
    layer = _layer_with_two_adapters()
    batch = AdapterBatch(["b", None, "a"], dict(layer.slot), [torch.device("cpu")])

    def expected(x, name):
        y = x @ layer.weight.t() + layer.bias
        if name is not None:
            y = y + layer.scale[name] * x @ layer.lora_A[name].weight.t() @ layer.lora_B[name].weight.t()
        return y

    layer.set_batch(batch)
    for x in (torch.randn(3, 6), torch.randn(3, 4, 6)):
        with torch.no_grad():
            y = layer(x)
        for row, name in enumerate(batch.names):
            torch.testing.assert_close(y[row], expected(x[row], name))


def test_layer_serves_edited_and_replaced_adapter_parameters():
    """The layer's one-stamp check sees in-place edits, new storage and new Parameter objects."""
    layer = _layer_with_two_adapters()
    layer.set_batch(AdapterBatch(["a", "b"], dict(layer.slot), [torch.device("cpu")]))
    x = torch.randn(2, 6)

    def check():
        with torch.no_grad():
            y = layer(x)
        for row, name in enumerate(["a", "b"]):
            delta = layer.scale[name] * x[row] @ layer.lora_A[name].weight.t() @ layer.lora_B[name].weight.t()
            torch.testing.assert_close(y[row], x[row] @ layer.weight.t() + layer.bias + delta)

    check()
    with torch.no_grad():
        layer.lora_B["a"].weight.mul_(3.0)                                      # in place: a version bump
    check()
    layer.lora_A["b"].weight.data = layer.lora_A["b"].weight.data * 2          # new storage, same object
    check()
    layer.lora_B["b"].weight = nn.Parameter(torch.randn(5, layer.r["b"]))     # another object
    check()


def test_layer_under_autocast_rebuilds_the_pool_in_the_compute_dtype():
    layer = _layer_with_two_adapters()
    layer.set_batch(AdapterBatch(["a", "b"], dict(layer.slot), [torch.device("cpu")]))
    x = torch.randn(2, 3, 6)
    with torch.no_grad():
        y32 = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y16 = layer(x)
    assert layer.pool.dtype == torch.bfloat16 and y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=3e-2, atol=3e-2)


def test_mixed_batch_serving_after_a_fused_adamw_step_inside_the_block(tiny, ids):
    """README: 'an optimizer step inside the block is seen at the next one', also with AdamW(fused=True), whose
    kernels bump no version counter: the rows served after the step are those the Parameters themselves give
    (regression: the pool was refreshed only when a version counter moved, and served the weights from before)."""
    model = tiny("llama")
    for name, seed in (("a", 1), ("b", 2)):
        pe.add_adapter(model, name, pe.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        pe.set_active_adapter(model, name)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    ids = torch.cat([ids, ids])
    with pe.adapter_batch(model, ["a", "b", None, "a"]):
        with torch.no_grad():
            model(input_ids=ids)                                  # serving: the pools are filled
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2, fused=True)
        model(input_ids=ids).logits.square().mean().backward()
        optimizer.step()
        with torch.no_grad():
            served = model(input_ids=ids).logits
        trained = model(input_ids=ids).logits.detach()          # with gradients: the Parameters themselves
    torch.testing.assert_close(served, trained)


@pytest.mark.parametrize("config", [pe.BottleneckConfig(bottleneck=4, act="gelu", scale=1 / 3),
                                    pe.LoraConfig(r=3, alpha=1, target_modules=["q_proj", "v_proj"])],
                         ids=["bottleneck", "lora"])
def test_a_pool_moved_to_float64_serves_the_exact_scales(tiny, ids, config):
    """model.double() after adding: the pools move, and their per-slot scales (1/3 is not a float32) are written
    again from the numbers put, not widened from their float32 copies; served mixed rows equal the rows alone to
    float64's precision."""
    model = tiny("llama")
    pe.add_adapter(model, "a", config)
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()),
                                          dtype=torch.float64))
        with pe.adapter_batch(model, ["a", "a"]):
            served = model(input_ids=ids).logits
        alone = model(input_ids=ids).logits
    torch.testing.assert_close(served, alone, rtol=1e-12, atol=1e-12)
