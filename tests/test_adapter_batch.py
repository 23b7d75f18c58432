"""pe.adapter_batch on tiny HF models: one adapter per row, checked against each row run alone with its adapter
active and against HF PEFT's `adapter_names=`; generation (greedy, sampled sequences, beams), gradients of
several adapters trained at once, bad mappings, and the state around the block."""
import copy
import zlib

import peft
import pytest
import torch
from transformers import CompileConfig, OPTConfig, OPTForCausalLM

import ptlm_engine as pe
from ptlm_engine import api, inject
from ptlm_engine.pool import AdapterPool
from tests.helpers import max_abs_diff, needs_triton, peft_file, randomize_trainable64, run_alone

pytestmark = [pytest.mark.usefixtures("reference_backend"),
              pytest.mark.filterwarnings("ignore::UserWarning"),   # PEFT: "fan_in_fan_out ... Conv1D"
              pytest.mark.filterwarnings("ignore::FutureWarning")]

# Per model: adapters with different ranks, scales and (overlapping) targets; on Llama also per-module ranks and
# alphas and an excluded module.
ADAPTERS = {
    "llama": {"a": dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
              "b": dict(r=16, alpha=16, target_modules=["v_proj", "o_proj", "down_proj"],
                        rank_pattern={"down_proj": 6}, exclude_modules=["layers.0.o_proj"]),
              "c": dict(r=8, alpha=32, use_rslora=True, target_modules=["q_proj", "up_proj"],
                        alpha_pattern={r"layers\.1\.self_attn\.q_proj": 8})},
    "gpt2": {"a": dict(r=4, alpha=8, target_modules=["c_attn"]),
             "b": dict(r=8, alpha=8, target_modules=["c_attn", "c_fc"])},
    "bert": {"a": dict(r=4, alpha=8, target_modules=["query", "value"]),
             "b": dict(r=8, alpha=4, target_modules=["value", "key"])},
}
MAPPING = ["a", "b", None, "a"]


def _ids(rows, length=6):
    return torch.randint(0, 128, (rows, length), generator=torch.Generator().manual_seed(3))


def _randomize_lora(model):
    """Seeded random values in every adapter's A and B (B starts at zero: a fresh adapter changes nothing)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def _with_adapters(tiny, kind, names=None):
    model = tiny(kind)
    for name, kw in ADAPTERS[kind].items():
        if names is None or name in names:
            pe.add_adapter(model, name, pe.LoraConfig(**kw))
    _randomize_lora(model)
    return model


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_rows_match_each_adapter_alone(tiny, kind, output):
    model = _with_adapters(tiny, kind)
    ids = _ids(len(MAPPING))
    with torch.no_grad(), pe.adapter_batch(model, MAPPING):
        mixed = output(model, ids)
    for row, name in enumerate(MAPPING):
        alone = run_alone(model, name, lambda: output(model, ids[row:row + 1]))
        torch.testing.assert_close(mixed[row], alone[0], msg=f"row {row} ({name})")
    assert not torch.allclose(mixed[0], mixed[2])                                   # the adapters do act


def test_mixed_ranks_and_grad_mode_agree(tiny, output):
    """Ranks 4, 16, 8 in one batch; the pooled copy (no grad) and the stacked Parameters (grad) agree."""
    llama = _with_adapters(tiny, "llama")
    mapping, ids = ["c", "b", "a", None, "c"], _ids(5)
    with pe.adapter_batch(llama, mapping):
        with torch.no_grad():
            pooled = output(llama, ids)
        stacked = output(llama, ids)
    assert stacked.requires_grad
    torch.testing.assert_close(pooled, stacked.detach())
    for row, name in enumerate(mapping):
        torch.testing.assert_close(pooled[row], run_alone(llama, name, lambda: output(llama, ids[row:row + 1]))[0])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_matches_peft_adapter_names(tiny, kind, output):
    ours = _with_adapters(tiny, kind, ["a", "b"])
    names = {"alpha": "lora_alpha"}
    configs = {name: peft.LoraConfig(**{names.get(k, k): v for k, v in kw.items()})
               for name, kw in ADAPTERS[kind].items() if name in ("a", "b")}
    theirs = peft.get_peft_model(tiny(kind), configs["a"], adapter_name="a")
    theirs.add_adapter("b", configs["b"])
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if ".lora_" in name:
                p.copy_(mine[name.removeprefix("base_model.model.").replace(".base_layer.", ".")])
    ids = _ids(len(MAPPING))
    with torch.no_grad(), pe.adapter_batch(ours, MAPPING):
        y = output(ours, ids)
    y_peft = theirs.eval()(input_ids=ids, adapter_names=[n or "__base__" for n in MAPPING]).logits
    torch.testing.assert_close(y, y_peft)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("how", [dict(), dict(do_sample=True, top_k=1, num_return_sequences=2), dict(num_beams=2),
                                 dict(num_beams=2, num_return_sequences=2)],
                         ids=["greedy", "sampled_x2", "beams", "beams_x2"])
def test_generate_keeps_each_row_on_its_adapter(tiny, kind, how):
    model = _with_adapters(tiny, kind, ["a", "b"])
    ids = _ids(len(MAPPING), length=5)
    kw = dict(max_new_tokens=5, min_new_tokens=5, use_cache=True, pad_token_id=0, **how)
    per_row = how.get("num_return_sequences", 1)
    with pe.adapter_batch(model, MAPPING):
        mixed = model.generate(ids, **kw)
    assert mixed.shape == (len(MAPPING) * per_row, 10)
    for row, name in enumerate(MAPPING):
        alone = run_alone(model, name, lambda: model.generate(ids[row:row + 1], **kw))
        torch.testing.assert_close(mixed[row * per_row:(row + 1) * per_row], alone, rtol=0, atol=0,
                                   msg=f"row {row} ({name})")


@pytest.mark.parametrize("method", ["lora", "bottleneck"])
def test_generate_checks_each_pool_once_per_call(tiny, method, monkeypatch):
    """No user code runs between generate's forward passes: each layer checks its pool against the adapters'
    Parameters once per generate call (not at every step), and Parameters changed between two calls serve the
    next one."""
    if method == "lora":
        model = _with_adapters(tiny, "llama", ["a", "b"])
    else:
        model = tiny("llama")
        pe.add_adapter(model, "a", pe.BottleneckConfig(bottleneck=8, placement="houlsby", act="relu"))
        pe.add_adapter(model, "b", pe.BottleneckConfig(bottleneck=4, placement="parallel", act="gelu"))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".ptlm_bottleneck." in name:
                    p.copy_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(zlib.crc32(
                        name.encode()))))
    ids = _ids(len(MAPPING), length=5)
    kw = dict(max_new_tokens=4, min_new_tokens=4, use_cache=True, pad_token_id=0)
    checks = []
    check_batch = AdapterPool._check_batch
    monkeypatch.setattr(AdapterPool, "_check_batch", lambda pool, *args: (checks.append(id(pool)),
                                                                            check_batch(pool, *args))[1])
    with pe.adapter_batch(model, MAPPING):
        model.generate(ids, **kw)
        pools = len(checks)
        assert pools > 0 and len(set(checks)) == pools                     # 4 decode steps, one check a pool
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_B.a." in name or (".ptlm_bottleneck." in name and ".a." in name):
                    p.mul_(2.0)
        checks.clear()
        mixed = model.generate(ids, **kw)
        assert len(checks) == pools
        with torch.no_grad():
            model(ids)
            model(ids)
        assert len(checks) == 3 * pools                                   # outside generate: every call checks
    for row, name in enumerate(MAPPING):
        alone = run_alone(model, name, lambda: model.generate(ids[row:row + 1], **kw))
        torch.testing.assert_close(mixed[row], alone[0], rtol=0, atol=0, msg=f"row {row} ({name})")


def test_static_block_checks_each_pool_once(tiny, monkeypatch):
    """adapter_batch(static=True), for serving loops of one's own: each layer checks its pool once for the whole
    block (generate inside it too); the next block checks again and serves what changed in between."""
    model = _with_adapters(tiny, "llama", ["a", "b"])
    ids = _ids(len(MAPPING), length=5)
    checks = []
    check_batch = AdapterPool._check_batch
    monkeypatch.setattr(AdapterPool, "_check_batch", lambda pool, *args: (checks.append(id(pool)),
                                                                            check_batch(pool, *args))[1])
    with torch.no_grad():
        with pe.adapter_batch(model, MAPPING, static=True):
            model(ids)
            pools = len(checks)
            model(ids)
            model.generate(ids, max_new_tokens=3, min_new_tokens=3, pad_token_id=0)
        assert pools > 0 and len(checks) == pools
        for name, p in model.named_parameters():
            if ".lora_A.b." in name:
                p.add_(0.5)
        with pe.adapter_batch(model, MAPPING, static=True):
            mixed = model(ids).logits
        assert len(checks) == 2 * pools
    for row, name in enumerate(MAPPING):
        alone = run_alone(model, name, lambda: model(ids[row:row + 1]).logits)
        torch.testing.assert_close(mixed[row:row + 1], alone, msg=f"row {row} ({name})")


def test_gradients_match_each_adapter_trained_alone(tiny):
    """A mixed batch in train mode trains several adapters at once: each gets the gradient of its own rows."""
    llama = _with_adapters(tiny, "llama").train()
    mapping, ids = ["c", "a", None, "b", "a", "c"], _ids(6)

    def loss(model, rows):
        return model(input_ids=rows, labels=rows).logits.square().mean(dim=(1, 2)).sum()   # a sum of row losses

    with pe.adapter_batch(llama, mapping):
        trainable = {n for n, p in llama.named_parameters() if p.requires_grad}
        loss(llama, ids).backward()
    assert trainable == {n for n, _ in llama.named_parameters() if ".lora_" in n}
    mixed = {n: p.grad.clone() for n, p in llama.named_parameters() if p.grad is not None}
    assert mixed.keys() == trainable
    llama.zero_grad(set_to_none=True)
    for name in ("a", "b", "c"):
        rows = ids[[i for i, n in enumerate(mapping) if n == name]]
        run_alone(llama, name, lambda: loss(llama, rows).backward())
    alone = {n: p.grad for n, p in llama.named_parameters() if p.grad is not None}
    assert alone.keys() == mixed.keys()
    for n in mixed:
        torch.testing.assert_close(mixed[n], alone[n], msg=n)


def test_training_steps_then_serving_sees_new_weights(tiny, output):
    """Optimizer steps inside the block bump the Parameters' versions: the pooled copy follows."""
    llama = _with_adapters(tiny, "llama", ["a", "b"]).train()
    ids = _ids(3)
    with pe.adapter_batch(llama, ["a", "b", None]):
        optimizer = torch.optim.SGD([p for p in llama.parameters() if p.requires_grad], lr=0.5)
        with torch.no_grad():
            before = output(llama, ids)
        for _ in range(2):
            llama(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        with torch.no_grad():
            after = output(llama, ids)
        stacked = output(llama, ids).detach()                                       # from the Parameters
    assert not torch.allclose(before[:2], after[:2])
    torch.testing.assert_close(before[2], after[2])                                  # the base row
    torch.testing.assert_close(after, stacked)
    for _, layer in inject.lora_layers(llama):
        for name, slot in layer.slot.items():
            r = layer.r[name]
            assert torch.equal(layer.pool.lora_A[slot, :r], layer.lora_A[name].weight)
            assert torch.equal(layer.pool.lora_B[slot, :, :r], layer.lora_B[name].weight)


def test_inference_mode_leaves_no_inference_tensors_behind(tiny, output):
    """Pools grown and indexes cached under torch.inference_mode stay writable and usable for training."""
    llama = _with_adapters(tiny, "llama", ["a", "b"])
    ids = _ids(2)
    with torch.inference_mode(), pe.adapter_batch(llama, ["b", "a"]):
        served = output(llama, ids)
    with pe.adapter_batch(llama, ["b", "a"]):
        with torch.inference_mode():
            torch.testing.assert_close(output(llama, ids), served)
        output(llama, ids).sum().backward()                                          # the same cached index
    pe.add_adapter(llama, "c", pe.LoraConfig(r=32, target_modules=["q_proj"]))      # writes into those pools
    assert all(not layer.pool.lora_A.is_inference() for _, layer in inject.lora_layers(llama))


def test_one_adapter_model(tiny, output):
    gpt2 = _with_adapters(tiny, "gpt2", ["a"])
    ids = _ids(3)
    with torch.no_grad(), pe.adapter_batch(gpt2, [None, "a", None]):
        mixed = output(gpt2, ids)
    torch.testing.assert_close(mixed[1], output(gpt2, ids[1:2])[0])
    with pe.disable_adapters(gpt2):
        torch.testing.assert_close(mixed[[0, 2]], output(gpt2, ids[[0, 2]]))


def test_torch_compile_inside_the_block(tiny, output):
    llama = _with_adapters(tiny, "llama", ["a", "b"])
    ids = _ids(len(MAPPING))
    compiled = torch.compile(llama, backend="aot_eager")
    with pe.adapter_batch(compiled, MAPPING):
        eager = output(llama, ids)
        y = output(compiled, ids)
        y.square().sum().backward()
    torch.testing.assert_close(y, eager)
    grads = {n: p.grad for n, p in llama.named_parameters() if ".lora_" in n}
    assert all(g is not None for n, g in grads.items() if ".lora_B.a." in n or ".lora_B.b." in n)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_generate_with_static_cache_and_compiled_forward(tiny, backend, monkeypatch):
    """transformers' own graph-friendly loop inside the block: a StaticCache and generate's compiled forward
    (fullgraph: no graph break at the layers, the token index built in the graph) give eager's tokens."""
    from transformers import CompileConfig
    monkeypatch.setenv("PTLM_BACKEND", backend)
    llama = _with_adapters(tiny, "llama", ["a", "b"])
    ids = _ids(len(MAPPING), length=5)
    kw = dict(max_new_tokens=4, min_new_tokens=4, pad_token_id=0, do_sample=False)
    compile_config = CompileConfig(backend="aot_eager", fullgraph=True, mode=None)
    compile_config._compile_all_devices = True                # generate compiles on CUDA only by default
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with pe.adapter_batch(llama, MAPPING):
        eager = llama.generate(ids, **kw)
        assert not torch._dynamo.utils.counters["stats"]["unique_graphs"]
        static = llama.generate(ids, cache_implementation="static", compile_config=compile_config, **kw)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"]   # the decode steps ran compiled
    torch.testing.assert_close(static, eager, rtol=0, atol=0)
    assert not torch.equal(eager, llama.generate(ids, **kw))   # the adapters change the tokens


@needs_triton
@pytest.mark.parametrize("one_launch", [False, True])
def test_triton_kernels_through_the_layers(tiny, output, one_launch, monkeypatch):
    """The multi-adapter kernels with the token grouping shared by all layers: as the reference, with grads; also
    with every forward in one launch (PTLM_MULTI_SHRINK_PROGRAMS / PTLM_MULTI_IN_LOOP: the grouped q/k/v and
    gate/up and the lone o/down projections alike), as the card's generation would run them."""
    from ptlm_engine.kernels import lora_multi as multi_kernels
    monkeypatch.setattr(multi_kernels, "SHRINK_PROGRAMS", one_launch)
    monkeypatch.setattr(multi_kernels, "EXPAND_IN_LOOP", one_launch)
    llama = _with_adapters(tiny, "llama", ["a", "b"])
    ids = _ids(3, length=5)
    results = []
    for backend in ("reference", "triton"):
        monkeypatch.setenv("PTLM_BACKEND", backend)
        with pe.adapter_batch(llama, ["b", None, "a"]) as model:
            with torch.no_grad():
                pooled = output(model, ids)
            y = output(model, ids)
            y.square().sum().backward()
            segments = [seg for _, seg in api.registry(llama).batch._tokens.values()]
            assert segments and all((seg is not None) == (backend == "triton") for seg in segments)
        results.append((pooled, y.detach(), {n: p.grad for n, p in llama.named_parameters() if p.grad is not None}))
        llama.zero_grad(set_to_none=True)
    (pooled, y, grads), (pooled_t, y_t, grads_t) = results
    torch.testing.assert_close(pooled_t, pooled, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y_t, y, rtol=1e-4, atol=1e-4)
    assert grads_t.keys() == grads.keys() and grads
    for n in grads:
        torch.testing.assert_close(grads_t[n], grads[n], rtol=1e-3, atol=1e-4, msg=n)


def _state(model):
    """Everything adapter_batch could change: values, flags, layer and pool state, the registry."""
    reg = api.registry(model)
    return {
        "params": {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
        "layers": [(layer.batch, dict(layer.slot), layer.pool.lora_A.clone(), layer.pool.lora_B.clone(),
                    layer.pool.ranks.clone(), layer.pool.scales.clone(), layer.active_adapter)
                   for _, layer in inject.lora_layers(model)],
        "registry": (reg.active, reg.merged, reg.batch, dict(reg.slots)),
        "generate": "generate" in model.__dict__,
    }


def _assert_same_state(model, before):
    after = _state(model)
    assert after["registry"] == before["registry"] and after["generate"] == before["generate"]
    assert after["params"].keys() == before["params"].keys()
    for n, (value, flag) in before["params"].items():
        assert torch.equal(after["params"][n][0], value) and after["params"][n][1] == flag, n
    for old, new in zip(before["layers"], after["layers"]):
        assert old[0] is new[0] and old[1] == new[1] and old[6] == new[6]
        assert all(torch.equal(a, b) for a, b in zip(old[2:6], new[2:6]))


@pytest.mark.parametrize("mapping,match", [
    (["a", "zz"], "no adapter named 'zz'"),
    ([], "non-empty list"),
    ("a", "non-empty list"),
    (["a", 1], "must be a name or None"),
])
def test_bad_mappings_raise_before_any_change(tiny, mapping, match):
    llama = _with_adapters(tiny, "llama", ["a", "b"])
    before = _state(llama)
    with pytest.raises(ValueError, match=match):
        with pe.adapter_batch(llama, mapping):
            pytest.fail("entered the block")
    _assert_same_state(llama, before)


@pytest.mark.parametrize("rows", [3, 1, 8])
def test_batch_size_must_equal_the_mapping(tiny, rows):
    llama = _with_adapters(tiny, "llama", ["a", "b"])
    before = _state(llama)
    with pe.adapter_batch(llama, ["a", "b"]):   # (entering gives the layers without 'b' room for its slot)
        inside = _state(llama)
        with pytest.raises(ValueError, match="must be equal to the number of names"), torch.no_grad():
            llama(_ids(rows))
        _assert_same_state(llama, inside)                                           # pools untouched
    after = _state(llama)
    assert after["registry"] == before["registry"] and not after["generate"]
    assert all(layer.batch is None for _, layer in inject.lora_layers(llama))


def test_adapter_missing_from_a_targeted_layer(tiny):
    llama = _with_adapters(tiny, "llama", ["a", "b"])
    llama.model.layers[1].self_attn.v_proj.remove_adapter("b")                      # behind the API's back
    before = _state(llama)
    with pytest.raises(ValueError, match=r"'b' is missing from 'model.layers.1.self_attn.v_proj'"):
        with pe.adapter_batch(llama, ["a", "b"]):
            pass
    _assert_same_state(llama, before)
    with pe.adapter_batch(llama, ["a", None]):                                      # 'a' is whole: fine
        pass


def test_merged_adapter_is_refused(tiny):
    llama = _with_adapters(tiny, "llama", ["a", "b"])
    pe.merge_adapter(llama, "a")
    before = _state(llama)
    with pytest.raises(ValueError, match="'a' is merged .* mixed batches need unmerged weights"):
        with pe.adapter_batch(llama, ["b", None]):
            pass
    _assert_same_state(llama, before)


def _randomize_copies(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".modules_to_save." in name:
                gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                p.add_(0.2 * torch.randn(p.shape, generator=gen))


def test_modules_to_save_run_per_row_and_train_per_adapter(tiny):
    """Each row gets its own adapter's copy of the classifier (None and copy-less rows the original one), and
    each copy's gradient comes from its own rows alone."""
    bert = tiny("bert_cls").train()
    pe.add_adapter(bert, "a", pe.LoraConfig(r=4, target_modules=["query"], modules_to_save=["classifier"]))
    pe.add_adapter(bert, "b", pe.LoraConfig(r=4, target_modules=["value"], modules_to_save=["classifier"]))
    pe.add_adapter(bert, "c", pe.LoraConfig(r=4, target_modules=["value"]))
    _randomize_lora(bert)
    _randomize_copies(bert)
    mapping, ids = ["b", None, "a", "c", "b"], _ids(5)
    with pe.adapter_batch(bert, mapping):
        mixed = bert(input_ids=ids).logits
        mixed.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in bert.named_parameters() if p.grad is not None}
    assert {n for n in grads if "modules_to_save" in n} == {f"classifier.modules_to_save.{a}.{w}"
                                                            for a in "ab" for w in ("weight", "bias")}
    bert.zero_grad()
    for name in ("a", "b"):
        rows = [i for i, n in enumerate(mapping) if n == name]
        pe.set_active_adapter(bert, name)
        bert(input_ids=ids[rows]).logits.square().sum().backward()
        for w in ("weight", "bias"):
            key = f"classifier.modules_to_save.{name}.{w}"
            torch.testing.assert_close(grads[key], bert.get_parameter(key).grad, msg=key)
    with torch.no_grad():
        for row, name in enumerate(mapping):
            alone = run_alone(bert, name, lambda: bert(input_ids=ids[row:row + 1]).logits)
            torch.testing.assert_close(mixed[row].detach(), alone[0], msg=f"row {row} ({name})")


def test_modules_to_save_taking_arguments_not_split_by_row_is_refused_in_a_mixed_batch(tiny, ids):
    """A copied decoder layer takes position ids (1, T), a cache and a tuple of position embeddings, which cannot
    be cut into rows: a clear error before anything runs (as PEFT's mixed batch refuses such modules)."""
    llama = tiny("llama")
    pe.add_adapter(llama, "a", pe.LoraConfig(r=4, target_modules=["q_proj"], layers_to_transform=[0],
                                             modules_to_save=["layers.1"]))
    pe.add_adapter(llama, "b", pe.LoraConfig(r=4, target_modules=["v_proj"], layers_to_transform=[0]))
    with pytest.raises(NotImplementedError, match="modules_to_save LlamaDecoderLayer in a mixed batch "
                                                  r"\(adapter_batch\): its argument .* not split by row"):
        with torch.no_grad(), pe.adapter_batch(llama, ["b", "a"]):
            llama(input_ids=ids)
    with torch.no_grad(), pe.adapter_batch(llama, ["b", None]):       # no row runs a copy: nothing to cut
        llama(input_ids=ids)


def test_generate_with_a_saved_embedding_copy_per_row(tiny):
    """A copy of the input embeddings (and beams expanding the rows) in a mixed batch: each row generates what
    it generates alone."""
    llama = tiny("llama")
    pe.add_adapter(llama, "a", pe.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"]))
    pe.add_adapter(llama, "b", pe.LoraConfig(r=4, target_modules=["v_proj"]))
    _randomize_lora(llama)
    _randomize_copies(llama)
    ids = _ids(3, length=5)
    kw = dict(max_new_tokens=4, min_new_tokens=4, pad_token_id=0, num_beams=2)
    with pe.adapter_batch(llama, ["a", None, "b"]):
        mixed = llama.generate(ids, **kw)
    for row, name in enumerate(["a", None, "b"]):
        alone = run_alone(llama, name, lambda: llama.generate(ids[row:row + 1], **kw))
        torch.testing.assert_close(mixed[row:row + 1], alone, rtol=0, atol=0, msg=f"row {row} ({name})")


def test_dropout_per_row_in_training_only(tiny, output):
    """Train mode: rows of an adapter with dropout get a random mask, rows of one without are exact; eval: none."""
    llama = tiny("llama")
    pe.add_adapter(llama, "a", pe.LoraConfig(r=4, dropout=0.5, target_modules=["q_proj", "v_proj"]))
    pe.add_adapter(llama, "b", pe.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    _randomize_lora(llama)
    ids = _ids(3)
    with pe.adapter_batch(llama, ["a", "b", None]):
        with torch.no_grad():
            exact = output(llama, ids)
            llama.train()
            pooled = output(llama, ids)
        stacked = output(llama, ids)
        stacked.sum().backward()
    for y in (pooled, stacked.detach()):
        assert not torch.allclose(y[0], exact[0])
        torch.testing.assert_close(y[1:], exact[1:])
    assert all(p.grad is not None for n, p in llama.named_parameters() if ".lora_B." in n)


def test_state_around_the_block(tiny, output):
    """disable_adapters inside gives base outputs; the lifecycle is locked inside; everything comes back."""
    llama = _with_adapters(tiny, "llama", ["a", "b"])
    pe.set_active_adapter(llama, "b")
    ids = _ids(2)
    before = _state(llama)
    base = run_alone(llama, None, lambda: output(llama, ids))
    with torch.no_grad(), pe.adapter_batch(llama, ["a", "a"]) as model:
        assert model is llama and "generate" in llama.__dict__
        assert {n for n, p in llama.named_parameters() if p.requires_grad} == \
            {n for n, _ in llama.named_parameters() if ".lora_A.a." in n or ".lora_B.a." in n}
        with pe.disable_adapters(llama):
            torch.testing.assert_close(output(llama, ids), base)
        for call in (lambda: pe.set_active_adapter(llama, "a"), lambda: pe.remove_adapter(llama, "b"),
                     lambda: pe.add_adapter(llama, "d", pe.LoraConfig(target_modules=["q_proj"])),
                     lambda: pe.merge_adapter(llama, "b"), lambda: pe.adapter_batch(llama, ["a"]).__enter__()):
            with pytest.raises(ValueError, match="inside adapter_batch"):
                call()
    _assert_same_state(llama, before)
    with pe.disable_adapters(llama), pe.adapter_batch(llama, ["a", "b"]):
        torch.testing.assert_close(output(llama, ids), base)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("length", [5, 17])     # 20 and 68 tokens: the decode and prefill paths
def test_remap_inside_the_block_rewrites_the_mapping_in_place(tiny, output, backend, length, monkeypatch):
    """pe.remap_adapter_batch: each row then matches its new adapter alone, with the batch's row index and every
    kept token index and grouping the same tensors as before (what a captured CUDA graph holds), rewritten."""
    monkeypatch.setenv("PTLM_BACKEND", backend)
    llama = _with_adapters(tiny, "llama")
    pe.add_adapter(llama, "bn", pe.BottleneckConfig(bottleneck=8, placement="pfeiffer", act="relu"))
    with torch.no_grad():
        for name, p in llama.named_parameters():
            if ".bn." in name or name.endswith(".bn"):
                p.copy_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(zlib.crc32(name.encode()))))
    ids = _ids(4, length)
    new = ["c", None, "bn", "a"]
    with torch.no_grad(), pe.adapter_batch(llama, ["a", "b", "bn", "c"]):
        output(llama, ids)
        batch = api.registry(llama).batch
        kept = [(index, segments) for index, segments in batch._tokens.values()]
        rows = list(batch._rows.values())
        pe.remap_adapter_batch(llama, new)
        mixed = output(llama, ids)
        now = list(batch._tokens.values())
        assert len(now) == len(kept) and all(i is ki and s is ks for (i, s), (ki, ks) in zip(now, kept))
        assert all(r is kr for r, kr in zip(batch._rows.values(), rows))
        assert all((s is not None) == (backend == "triton") for _, s in kept)
    for row, name in enumerate(new):
        alone = run_alone(llama, name, lambda: output(llama, ids[row:row + 1]))
        torch.testing.assert_close(mixed[row], alone[0], rtol=1e-4, atol=1e-4, msg=f"row {row} ({name})")


def test_remap_refuses_before_any_change(tiny, output):
    llama = _with_adapters(tiny, "llama")
    pe.add_adapter(llama, "p", pe.PromptConfig(num_virtual_tokens=3))
    with pytest.raises(ValueError, match="inside an adapter_batch block"):
        pe.remap_adapter_batch(llama, ["a", "b"])
    with pe.adapter_batch(llama, ["a", "b", None]):
        batch = api.registry(llama).batch
        for names, match in ((["a", "b"], "maps 3 rows"), (["a", "c", None], r"\['c'\] not among"),
                             (["a", "zz", None], "no adapter named 'zz'")):
            with pytest.raises(ValueError, match=match):
                pe.remap_adapter_batch(llama, names)
        assert batch.names == ["a", "b", None]
    with pe.adapter_batch(llama, ["a", "p", None]):
        with pytest.raises(ValueError, match="built on the host"):
            pe.remap_adapter_batch(llama, ["p", "a", None])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_remap_replays_a_captured_forward_with_the_new_mapping(tiny, output, monkeypatch):
    """A forward captured in a CUDA graph inside the block replays the mapping written by remap_adapter_batch."""
    monkeypatch.delenv("PTLM_BACKEND")
    llama = _with_adapters(tiny, "llama").cuda()
    ids = _ids(4, 17).cuda()
    new = ["c", None, "b", "a"]
    with torch.no_grad(), pe.adapter_batch(llama, ["a", "b", "c", None]):
        output(llama, ids)                                      # tunes, fills the batch's token caches
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = output(llama, ids)
        pe.remap_adapter_batch(llama, new)
        graph.replay()
        want = output(llama, ids)
        torch.testing.assert_close(captured, want, rtol=1e-4, atol=1e-4)
    for row, name in enumerate(new):
        alone = run_alone(llama, name, lambda: output(llama, ids[row:row + 1]))
        torch.testing.assert_close(captured[row], alone[0], rtol=1e-3, atol=1e-3, msg=f"row {row} ({name})")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_generate_with_static_cache_and_cuda_graphs(tiny, monkeypatch):
    """generate's default compile on a GPU (inductor, "reduce-overhead": the decode step replays as CUDA graphs)
    with the Triton kernels inside the block: eager's tokens."""
    from transformers import CompileConfig
    monkeypatch.delenv("PTLM_BACKEND")
    llama = _with_adapters(tiny, "llama", ["a", "b"]).cuda()
    ids = _ids(len(MAPPING), length=5).cuda()
    kw = dict(max_new_tokens=6, min_new_tokens=6, pad_token_id=0, do_sample=False)
    with pe.adapter_batch(llama, MAPPING):
        eager = llama.generate(ids, **kw)
        graphs = llama.generate(ids, cache_implementation="static", compile_config=CompileConfig(fullgraph=True),
                                **kw)
    torch.testing.assert_close(graphs, eager, rtol=0, atol=0)


def test_adding_an_adapter_under_inference_mode(tiny, output):
    """A server adding adapters inside torch.inference_mode() (hot-loading a tenant's): the adapters' Parameters
    are made outside it (an inference tensor has no version counter for the pool's stamps: the add used to fail
    half done)."""
    llama = tiny("llama")
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        pe.add_adapter(llama, "a", pe.LoraConfig(r=4, target_modules=["q_proj"]))
        pe.add_adapter(llama, "b", pe.LoraConfig(r=8, target_modules=["q_proj"]))
        with pe.adapter_batch(llama, ["a", "b"]):
            mixed = output(llama, ids)
    assert mixed.shape[0] == 2


@pytest.mark.parametrize("config", [pe.PrefixConfig(num_virtual_tokens=3), pe.PromptConfig(num_virtual_tokens=3)],
                         ids=["prefix", "prompt"])
def test_batch_size_is_checked_again_after_generate_expanded_it(tiny, config):
    """Inside generate a beam search repeats each row; afterwards a plain forward in the block must again have
    exactly one row per name. Layers that keep per-row layouts per batch size (prefix, prompt) check it at
    every call, not only when they build a layout."""
    model = tiny("llama")
    pe.add_adapter(model, "a", config)
    pe.add_adapter(model, "b", copy.deepcopy(config))
    ids = _ids(2, 4)
    with torch.no_grad(), pe.adapter_batch(model, ["a", "b"]):
        with pytest.raises(ValueError, match="adapter_batch maps 2 rows"):
            model(input_ids=_ids(4))
        model.generate(ids, max_new_tokens=2, num_beams=2, pad_token_id=0)
        with pytest.raises(ValueError, match="adapter_batch maps 2 rows"):
            model(input_ids=_ids(4))


def _opt():
    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                                    vocab_size=128, max_position_embeddings=40, word_embed_proj_dim=64,
                                    pad_token_id=1, dropout=0.0, attention_dropout=0.0)).eval()


def test_mixed_batch_over_a_peft_all_linear_adapter_on_opt(ids, tmp_path, output):
    """An OPT LoRA file of PEFT's "all-linear" loads, runs alone as PEFT's model does, and serves a mixed batch:
    OPT's decoder layer flattens the hidden states to (B*T, d) before fc1 / fc2, and each row's T tokens there
    keep its adapter (regression: dim 0 was taken for the batch, "adapter_batch maps 2 rows, but a layer got input
    of shape (16, 64)")."""
    theirs = peft_file(_opt(), peft.LoraConfig(r=4, target_modules="all-linear"), tmp_path)
    expected = output(theirs, ids)
    ours = _opt()
    pe.load_adapter(ours, tmp_path, name="a")
    torch.testing.assert_close(output(ours, ids), expected)
    base = output(_opt(), ids)
    with pe.adapter_batch(ours, ["a", None]), torch.no_grad():
        mixed = output(ours, ids)
    torch.testing.assert_close(mixed[0], expected[0])
    torch.testing.assert_close(mixed[1], base[1])


# ------------------------------------------------------------------ float64: per-slot scales in float64
@pytest.mark.parametrize("config", [
    pe.LoraConfig(r=3, alpha=1, target_modules=["q_proj", "v_proj"]),                  # scale 1/3
    pe.LoraConfig(r=3, alpha=3, use_rslora=True, target_modules=["q_proj", "v_proj"]),  # scale sqrt(3)
    pe.BottleneckConfig(bottleneck=8, scale=0.3),
], ids=["lora", "lora_rslora", "bottleneck"])
def test_float64_mixed_batch_row_equals_row_alone(tiny, ids, output, config):
    """Float64 model: a mixed batch's row equals that row run alone (README, Mixed batches) to float64 precision,
    also for scales float32 cannot represent (1/3, sqrt(3), 0.3): the per-slot scales stay in float64 (kept as
    float32 they put rows ~5e-8 off where float64 gives ~1e-16). Tolerance 1e-12."""
    model = tiny("llama").double()
    pe.add_adapter(model, "a", config)
    randomize_trainable64(model)
    with torch.no_grad():
        alone = output(model, ids)
        with pe.adapter_batch(model, ["a", "a"]):
            mixed = output(model, ids)
    err = max_abs_diff(mixed, alone)
    assert err < 1e-12, f"mixed-batch rows differ from the rows alone by {err:.2e}"


def test_float64_mixed_batch_training_matches_alone(tiny, ids, output):
    """The training path of a float64 mixed batch (adapters stacked on the fly) keeps its per-slot scales in
    float64 too: the LoRA gradients of a row-by-row batch equal those of the adapter alone to float64 precision
    (relative 1e-10; a float32 scale puts them ~1e-8 off)."""
    model = tiny("llama").double()
    pe.add_adapter(model, "a", pe.LoraConfig(r=3, alpha=1, target_modules=["q_proj", "v_proj"]))
    randomize_trainable64(model)
    model.train()
    output(model, ids).square().sum().backward()
    alone = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with pe.adapter_batch(model, ["a", "a"]):
        output(model, ids).square().sum().backward()
    for n, p in model.named_parameters():
        if n in alone:
            rel = max_abs_diff(p.grad, alone[n]) / alone[n].abs().max().item()
            assert rel < 1e-10, f"{n}: mixed-batch gradient off by {rel:.2e} (relative)"


def test_copying_or_pickling_inside_the_block_is_refused(tiny):
    """A copy taken inside a block would keep the block's mapping (its layers', its generate wrapper's) for good:
    deepcopy and pickle refuse with a clear error there; outside the block they work."""
    import pickle
    model = tiny("llama")
    pe.add_adapter(model, "a", pe.LoraConfig(r=4, target_modules=["q_proj"]))
    pe.add_adapter(model, "b", pe.LoraConfig(r=4, target_modules=["v_proj"]))
    with pe.adapter_batch(model, ["a", "b"]):
        with pytest.raises(RuntimeError, match="inside adapter_batch"):
            copy.deepcopy(model)
        with pytest.raises(RuntimeError, match="inside adapter_batch"):
            pickle.dumps(model)
    pickle.loads(pickle.dumps(copy.deepcopy(model)))


def test_two_threads_opening_adapter_batch_blocks(tiny, ids, output):
    """A second thread opening a block while the first is still setting its layers' mappings is refused (the
    model is claimed under a lock first), or computes its own mapping; the first block runs with its whole
    mapping either way (regression: the second block passed the check and its exit reset the first one's layers,
    silently). The first thread is paused in one layer's set_batch to make the interleaving deterministic."""
    import threading

    llama = tiny("llama")
    pe.add_adapter(llama, "a", pe.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    pe.add_adapter(llama, "b", pe.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    _randomize_lora(llama)
    expected = {}
    for name in ("a", "b"):
        pe.set_active_adapter(llama, name)
        expected[name] = output(llama, ids)
    pe.set_active_adapter(llama, None)

    layer = llama.model.layers[1].self_attn.v_proj                  # set after the layers before it
    original = layer.set_batch
    first_inside, second_done = threading.Event(), threading.Event()

    def paused_set_batch(batch):
        original(batch)
        if batch is not None and threading.current_thread().name == "first" and not first_inside.is_set():
            first_inside.set()
            second_done.wait(timeout=20)

    layer.set_batch = paused_set_batch
    results = {}

    def first():
        with torch.no_grad(), pe.adapter_batch(llama, ["a", "a"]):
            results["first"] = output(llama, ids)

    def second():
        first_inside.wait(timeout=20)
        try:
            with torch.no_grad(), pe.adapter_batch(llama, ["b", "b"]):
                results["second"] = output(llama, ids)
        except ValueError as e:
            results["second"] = e
        finally:
            second_done.set()

    threads = [threading.Thread(target=first, name="first"), threading.Thread(target=second, name="second")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    del layer.set_batch
    torch.testing.assert_close(results["first"], expected["a"])
    if not isinstance(results["second"], ValueError):
        torch.testing.assert_close(results["second"], expected["b"])


# ------------------------------------------------------------------------- generate: batch size, compiled prefix
GEN_KW = dict(max_new_tokens=3, min_new_tokens=3, pad_token_id=0, do_sample=False)


def _gen_model(tiny, configs):
    model = tiny("llama")
    for name, config in configs.items():
        pe.add_adapter(model, name, config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "ptlm_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def _aot_compile_config():
    config = CompileConfig(backend="aot_eager", fullgraph=True, mode=None)
    config._compile_all_devices = True                # generate compiles on CUDA only by default
    return config


GEN_CONFIGS = {
    "lora": lambda: {"a": pe.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
                     "b": pe.LoraConfig(r=8, alpha=8, target_modules=["q_proj", "v_proj"])},
    "prefix": lambda: {"a": pe.PrefixConfig(num_virtual_tokens=3), "b": pe.PrefixConfig(num_virtual_tokens=5)},
    "prompt": lambda: {"a": pe.PromptConfig(num_virtual_tokens=3), "b": pe.PromptConfig(num_virtual_tokens=5)},
    "bottleneck": lambda: {"a": pe.BottleneckConfig(bottleneck=4, act="gelu"),
                           "b": pe.BottleneckConfig(bottleneck=6, act="silu", placement="pfeiffer")},
}


@pytest.mark.parametrize("method", ["lora", "prefix", "prompt"])
def test_generate_in_a_block_refuses_an_input_batch_of_another_size(tiny, method):
    """The block maps 2 rows; generate given 4 input rows (not beams / num_return_sequences: the user's own batch)
    is refused, as a plain forward of 4 rows is (regression: it ran rows 0-1 with 'a', 2-3 with the base)."""
    model = _gen_model(tiny, GEN_CONFIGS[method]())
    with torch.no_grad(), pe.adapter_batch(model, ["a", None]):
        model.generate(_ids(2, 5), **GEN_KW)                                      # the mapped size: fine
        with pytest.raises(ValueError, match="adapter_batch maps 2 rows"):
            model(input_ids=_ids(4, 5))                                       # a forward refuses 4 rows ...
        with pytest.raises(ValueError, match="adapter_batch maps 2 rows"):
            model.generate(_ids(4, 5), **GEN_KW)                                  # ... so must generate


@pytest.mark.parametrize("method,backend", [("prefix", "default"), ("bottleneck", "reference"),
                                            pytest.param("bottleneck", "triton", marks=needs_triton)])
@pytest.mark.parametrize("mixed", [False, True], ids=["single", "mixed"])
def test_generate_with_static_cache_and_compiled_forward_per_method(tiny, method, backend, mixed, monkeypatch):
    """generate(cache_implementation="static", compile_config=CompileConfig(fullgraph=True)) gives eager's tokens
    alone and in a block. Prefix: its kept values are computed in the graph when traced (a trace cannot compare
    the stamps' data pointers). Bottleneck on the reference backend: the mixed batch's slots run without the
    host's look at which slots occur (a data-dependent loop breaks fullgraph)."""
    if backend != "default":
        monkeypatch.setenv("PTLM_BACKEND", backend)
    model = _gen_model(tiny, GEN_CONFIGS[method]())
    ids = _ids(4, 5)
    torch._dynamo.reset()
    with torch.no_grad():
        if mixed:
            with pe.adapter_batch(model, ["a", "b", None, "a"]):
                eager = model.generate(ids, **GEN_KW)
                static = model.generate(ids, cache_implementation="static", compile_config=_aot_compile_config(),
                                        **GEN_KW)
        else:
            eager = model.generate(ids, **GEN_KW)
            static = model.generate(ids, cache_implementation="static", compile_config=_aot_compile_config(), **GEN_KW)
    torch.testing.assert_close(static, eager, rtol=0, atol=0)
