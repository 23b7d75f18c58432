"""The multi-adapter bottleneck op (custom ops + autograd) against float64 references and against the
one-adapter op run per slot: values, per-slot gradients, leading dims, both placements, shared segments, bad
input, torch.library checks."""
import pytest
import torch

from ptlm_engine import reference
from ptlm_engine.functional import BottleneckSlots, bottleneck_adapter, bottleneck_adapter_multi, token_segments
from ptlm_engine.ops.bottleneck_multi import bottleneck_multi_fwd
from tests.helpers import (CUDA, DEVICE, DTYPES, assert_matches, assert_no_host_sync, bottleneck_slots64, captured,
                           far_apart_rows, needs_triton)

ACT_NAMES = ["relu", "gelu", "silu"]


def _inputs(lead, d, sizes, acts, dtype, residual=False):
    """h, slots (weights require grad; zeros beyond each width), a random mapping with -1 rows, residual."""
    (wd, bd, wu, bu), meta = bottleneck_slots64(d, sizes, acts)
    leaf = lambda t: t.to(DEVICE, dtype).requires_grad_()
    slots = BottleneckSlots(leaf(wd), leaf(bd), leaf(wu), leaf(bu), *meta)
    h = leaf(torch.randn(*lead, d, dtype=torch.float64))
    res = leaf(torch.randn(*lead, d, dtype=torch.float64)) if residual else None
    return h, slots, torch.randint(-1, len(sizes), lead, device=DEVICE), res


def _weights(slots):
    return [slots.down_weight, slots.down_bias, slots.up_weight, slots.up_bias]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,residual", [((3, 9), False), ((2, 37), True)])
def test_multi_forward_backward_matches_float64(dtype, lead, residual):
    """(2, 37): 74 tokens, past the decode bound, so row blocks walk the slot-sorted order."""
    torch.manual_seed(3)
    _check_float64(lead, dtype, residual)


@needs_triton
@pytest.mark.parametrize("T", [5, 70])
def test_multi_rows_far_apart_in_memory(T):
    """h, the residual and dy rows 2^31 elements apart (as in a T · d >= 2^31 input): 64-bit row offsets."""
    torch.manual_seed(T)
    _check_float64((T,), torch.float16, True, far=True)


def _check_float64(lead, dtype, residual, far=False):
    """The op's output and gradients against float64. far: h, the residual and dy (T, d) with rows 2^31
    elements apart (tests.helpers.far_apart_rows)."""
    sizes = [8, 3, 20, 0]
    h, slots, index, res = _inputs(lead, 26, sizes, [1, 0, 2, 1], dtype, residual)
    if far:
        h, res = (far_apart_rows(t.detach()).requires_grad_() for t in (h, res))
    y = bottleneck_adapter_multi(h, slots, index, res)
    dy = far_apart_rows(torch.randn_like(y)) if far else torch.randn_like(y)
    y.backward(dy)
    leaf = lambda t: None if t is None else t.detach().double().requires_grad_()
    h64, res64, w64 = leaf(h), leaf(res), [leaf(t) for t in _weights(slots)]
    y64 = reference.bottleneck_adapter_multi(h64.reshape(-1, 26), *w64, slots.sizes, slots.scales.double(),
                                             slots.acts, index.reshape(-1),
                                             None if res is None else res64.reshape(-1, 26))
    y64.backward(dy.double().reshape(-1, 26))
    assert y.shape == h.shape and y.dtype == dtype
    assert_matches(y, y64.reshape(y.shape), None, dtype, "y")
    assert_matches(h.grad, h64.grad, None, dtype, "dh")
    if residual:
        assert torch.equal(res.grad, dy)
    for name, t, t64 in zip(["d_down_weight", "d_down_bias", "d_up_weight", "d_up_bias"], _weights(slots), w64):
        assert t.grad.dtype == dtype
        assert_matches(t.grad, t64.grad, None, dtype, name)
    for s, m in enumerate(sizes):  # padding beyond each width gets no gradient
        assert not slots.down_weight.grad[s, m:].any() and not slots.up_weight.grad[s, :, m:].any()


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("bad", [2, -2, 2**40])
def test_index_out_of_range_raises_value_error(backend, bad, monkeypatch):
    """Checked where it costs no device sync (a CPU index, without given segments); 2^40 is not cut to 32 bits
    first."""
    monkeypatch.setenv("PTLM_BACKEND", backend)
    h, slots, _, _ = _inputs((5,), 8, [3, 2], [0, 1], torch.float32)
    slots = BottleneckSlots(*(t.detach().cpu() for t in slots))
    with pytest.raises(ValueError, match=r"adapter_index: expected slot ids in \[-1, 2\)"):
        bottleneck_adapter_multi(h.detach().cpu(), slots, torch.tensor([0, 1, bad, -1, 0]))


def test_bool_index_is_refused():
    """A bool adapter_index (a "has an adapter" mask passed by mistake) is not a slot index: torch's index ops
    (index_select, F.embedding) refuse bool indices, and so does the op, with a ValueError naming adapter_index
    (regression: the kernels read True as slot 1, the reference failed with an unrelated error)."""
    h, slots, _, _ = _inputs((4,), 6, [3, 2], [0, 1], torch.float32)
    with pytest.raises(ValueError, match=r"adapter_index: expected integers of shape \(4,\)"):
        bottleneck_adapter_multi(h, slots, torch.tensor([True, False, True, True], device=DEVICE))


@pytest.mark.parametrize("table,values,message", [
    ("sizes", [3, -2, 1], r"sizes: expected values in \[0, 3\]"),
    ("sizes", [3, 4, 1], r"sizes: expected values in \[0, 3\]"),
    ("acts", [0, 7, 0], r"acts: expected values in \[0, 2\]"),
], ids=["negative_size", "size_above_m_max", "unknown_act_code"])
def test_slot_tables_out_of_range_raise_value_error(table, values, message):
    """The user's slot tables (BottleneckSlots.sizes and acts) outside what the stacked tensors and the kernels can
    mean are a ValueError, as an adapter_index out of range is; checked where it costs no device sync (CPU tables,
    without given segments). Regression: a negative size or an unknown activation code computed something
    silently (the reference failed with an IndexError on the code)."""
    h, slots, _, _ = _inputs((4,), 6, [3, 2, 1], [0, 1, 2], torch.float32)
    slots = BottleneckSlots(*(t.detach().cpu() for t in slots))
    slots = slots._replace(**{table: torch.tensor(values, dtype=torch.int32)})
    with pytest.raises(ValueError, match=message):
        bottleneck_adapter_multi(h.detach().cpu(), slots, torch.tensor([0, 1, 2, -1]))


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_multi_relu_keeps_nan(train):
    """A NaN reaching a ReLU slot comes out NaN in its row, as torch.relu(nan) and nn.ReLU give: a NaN that vanishes
    would hide a diverged run. Parallel placement: the NaN is in h, the residual is finite; the row without an
    adapter and the other rows keep float64's values (regression: the kernels' ReLU, Triton's maximum, returned 0
    for NaN)."""
    torch.manual_seed(6)
    h, slots, _, res = _inputs((3,), 6, [3], [0], torch.float32, residual=True)
    with torch.no_grad():
        h[0, 2] = float("nan")
    index = torch.tensor([0, 0, -1], device=DEVICE)
    with torch.set_grad_enabled(train):
        y = bottleneck_adapter_multi(h, slots, index, res)
    y64 = reference.bottleneck_adapter_multi(h.double(), *[t.double() for t in _weights(slots)], slots.sizes,
                                             slots.scales.double(), slots.acts, index, res.double())
    assert torch.isnan(y64[0]).all() and torch.isnan(y[0]).all()
    assert_matches(y[1:], y64[1:], None, torch.float32, "rows without NaN")


@needs_triton
def test_mixed_batch_equals_each_slot_alone_values_and_gradients():
    """Each slot's rows through the one-adapter op give the same y, and the same per-slot weight gradients."""
    torch.manual_seed(5)
    sizes, acts = [4, 12, 16], [2, 1, 0]
    h, slots, index, _ = _inputs((23,), 20, sizes, acts, torch.float32)
    dy = torch.randn(23, 20, device=DEVICE)
    y = bottleneck_adapter_multi(h, slots, index)
    y.backward(dy)
    for s, m in enumerate(sizes):
        rows = index == s
        wd, bd, wu, bu = (t.detach()[s].requires_grad_() for t in _weights(slots))
        y_s = bottleneck_adapter(h.detach()[rows], wd[:m], bd[:m], wu[:, :m], bu, ACT_NAMES[acts[s]],
                                 float(slots.scales[s]))
        y_s.backward(dy[rows])
        torch.testing.assert_close(y[rows], y_s, rtol=1e-5, atol=1e-5)
        for t, t_s in zip(_weights(slots), (wd, bd, wu, bu)):
            torch.testing.assert_close(t.grad[s], t_s.grad, rtol=1e-4, atol=1e-5)
    assert torch.equal(y[index < 0], h[index < 0])


@needs_triton
def test_shared_segments_and_inference_path():
    """segments from token_segments give the same y; no_grad (unsorted decode rows, no z) too."""
    torch.manual_seed(6)
    h, slots, index, res = _inputs((5, 14), 16, [6, 9], [1, 2], torch.float32, residual=True)
    y = bottleneck_adapter_multi(h, slots, index, res)
    y_seg = bottleneck_adapter_multi(h, slots, index, res, token_segments(index.reshape(-1).to(torch.int32), 2))
    torch.testing.assert_close(y_seg, y, rtol=0, atol=0)
    with torch.no_grad():
        y_inf = bottleneck_adapter_multi(h[:, :3], slots, index[:, :3], res[:, :3])
    torch.testing.assert_close(y_inf, y[:, :3], rtol=1e-6, atol=1e-6)


def test_multi_bad_input_raises_value_error():
    h, slots, index, _ = _inputs((5,), 8, [2, 3], [0, 1], torch.float32)
    with pytest.raises(ValueError, match=r"adapter_index: expected integers of shape \(5,\)"):
        bottleneck_adapter_multi(h, slots, index[:4])
    with pytest.raises(ValueError, match=r"up_weight: expected shape \(2, 8, 3\)"):
        bottleneck_adapter_multi(h, slots._replace(up_weight=slots.up_weight[:, :, :2]), index)
    with pytest.raises(ValueError, match=r"down_weight: expected stacked slots \(S, m_max, 8\)"):
        bottleneck_adapter_multi(h, slots._replace(down_weight=slots.down_weight[0]), index)
    with pytest.raises(ValueError, match=r"scales: expected shape \(2,\)"):
        bottleneck_adapter_multi(h, slots._replace(scales=slots.scales[:1]), index)
    with pytest.raises(ValueError, match=r"acts: expected integers"):
        bottleneck_adapter_multi(h, slots._replace(acts=slots.acts.float()), index)
    with pytest.raises(ValueError, match=r"residual: expected shape \(5, 8\)"):
        bottleneck_adapter_multi(h, slots, index, h[:4])
    with pytest.raises(ValueError, match=r"down_bias: expected dtype torch.float32"):
        bottleneck_adapter_multi(h, slots._replace(down_bias=slots.down_bias.double()), index)


@needs_triton
def test_multi_custom_op_passes_opcheck():
    torch.manual_seed(8)
    h, slots, index, res = _inputs((7,), 16, [4, 8], [0, 2], torch.float32, residual=True)
    index = index.to(torch.int32)
    order, bounds = token_segments(index, 2)
    for residual in (None, res):
        args = (h, *_weights(slots), slots.sizes, slots.scales, slots.acts, index, order, bounds, residual)
        torch.library.opcheck(bottleneck_multi_fwd, args,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@needs_triton
def test_multi_torch_compile_fullgraph():
    torch.manual_seed(9)
    h, slots, index, _ = _inputs((2, 5), 16, [4, 8], [1, 0], torch.float32)
    compiled = torch.compile(lambda h, i: bottleneck_adapter_multi(h, slots, i), backend="aot_eager", fullgraph=True)
    y = compiled(h, index)
    y.sum().backward()
    y64 = reference.bottleneck_adapter_multi(h.double().reshape(-1, 16), *[t.double() for t in _weights(slots)],
                                             slots.sizes, slots.scales.double(), slots.acts, index.reshape(-1))
    assert_matches(y, y64.reshape(y.shape), None, torch.float32, "compiled y")
    assert slots.down_weight.grad is not None and h.grad is not None


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_multi_has_no_host_sync_and_replays_in_a_cuda_graph_with_a_new_mapping():
    torch.manual_seed(10)
    sizes = [16, 64, 48, 256, 0, 32]
    for T in (16, 300):  # the decode path and the sorted prefill path
        h, slots, index, _ = _inputs((T,), 1024, sizes, [0, 1, 2, 0, 1, 2], torch.bfloat16)
        assert_no_host_sync(lambda: bottleneck_adapter_multi(h, slots, index).sum().backward())
        h, index = h.detach(), index.to(torch.int32)
        frozen = BottleneckSlots(*(t.detach() for t in slots))
        with torch.no_grad():
            graph, y = captured(lambda: bottleneck_adapter_multi(h, frozen, index))
            for _ in range(2):  # the same graph, a new mapping written into the same buffer
                index.copy_(torch.randint(-1, len(sizes), (T,), device=DEVICE, dtype=torch.int32))
                graph.replay()
                expected = reference.bottleneck_adapter_multi(h.double(), *[t.double() for t in _weights(frozen)],
                                                              frozen.sizes, frozen.scales.double(), frozen.acts, index)
                assert_matches(y, expected, None, torch.bfloat16, f"graph replay, T={T}")


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_float32_slots_on_fp16_get_float32_gradients_under_a_scaled_loss(backend, monkeypatch):
    """As the one-adapter op: float32 stacked slots on an fp16 h, the loss times 65536 (GradScaler's initial
    scale): each slot's gradients are float32 sums over its own tokens, finite and close to float64's."""
    monkeypatch.setenv("PTLM_BACKEND", backend)
    torch.manual_seed(6)
    (wd, bd, wu, bu), (sizes, scales, acts) = bottleneck_slots64(64, [8, 5], [0, 2])
    h = (30 * torch.randn(70, 64)).half().to(DEVICE)
    index = torch.randint(-1, 2, (70,), device=DEVICE)
    weights = [(t.float() * 0.5).to(DEVICE).requires_grad_() for t in (wd, bd, wu, bu)]
    y = bottleneck_adapter_multi(h, BottleneckSlots(*weights, sizes, scales, acts), index)
    assert y.dtype == torch.float16
    (y.float().square().mean() * 65536).backward()
    weights64 = [w.detach().half().double().requires_grad_() for w in weights]
    y64 = bottleneck_adapter_multi(h.double(), BottleneckSlots(*weights64, sizes, scales.double(), acts), index)
    (y64.square().mean() * 65536).backward()
    torch.testing.assert_close(y.double(), y64, rtol=2e-2, atol=2e-2)
    for w, w64 in zip(weights, weights64):
        assert w.grad.dtype == torch.float32
        assert_matches(w.grad, w64.grad, None, torch.float16, "slot gradient")
