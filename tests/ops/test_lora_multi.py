"""The multi-adapter LoRA op (custom ops + autograd) against float64 references and against the
single-adapter op run row by row: values, per-slot gradients, leading dims, bad input, torch.library checks."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ptlm_engine import reference
from ptlm_engine.functional import LoraSlots, lora_linear, lora_linear_multi, token_segments
from ptlm_engine.kernels import lora_multi as M
from ptlm_engine.kernels.configs import INTERPRETED, TunedLauncher
from ptlm_engine.ops.lora_multi import lora_linear_multi_fwd
from tests.helpers import (CUDA, DEVICE, DTYPES, assert_matches, assert_no_host_sync, captured, far_apart_rows,
                           needs_triton)


def _inputs(lead, d_in, d_out, ranks, dtype, fan_in_fan_out=False):
    S, r_max = len(ranks), max(ranks)
    a = torch.randn(S, r_max, d_in, dtype=torch.float64) * d_in ** -0.5
    b = torch.randn(S, d_out, r_max, dtype=torch.float64) * r_max ** -0.5
    for s, r in enumerate(ranks):
        a[s, r:] = 0
        b[s, :, r:] = 0
    w = torch.randn(d_out, d_in, dtype=torch.float64) * d_in ** -0.5
    w = w.t().contiguous() if fan_in_fan_out else w
    to = lambda t: t.to(DEVICE, dtype)
    x = to(torch.randn(*lead, d_in, dtype=torch.float64)).requires_grad_()
    slots = LoraSlots(to(a).requires_grad_(), to(b).requires_grad_(),
                      torch.tensor(ranks, dtype=torch.int32, device=DEVICE),
                      torch.rand(S, device=DEVICE) + 0.5)
    index = torch.randint(-1, S, lead, device=DEVICE)
    return x, to(w), to(torch.randn(d_out, dtype=torch.float64)), slots, index


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fan_in_fan_out,lead", [(False, (3, 9)), (True, (3, 9)), (False, (2, 37))])
def test_multi_forward_backward_matches_float64(dtype, fan_in_fan_out, lead):
    """(2, 37): 74 tokens, past the decode bound, so row blocks walk the slot-sorted order."""
    torch.manual_seed(3)
    slots = _check_float64(lead, 26, 30, [8, 3, 16], dtype, fan_in_fan_out)
    for s, r in enumerate([8, 3, 16]):  # padding beyond each rank gets no gradient
        assert not slots.lora_A.grad[s, r:].any() and not slots.lora_B.grad[s, :, r:].any()


def _check_float64(lead, d_in, d_out, ranks, dtype, fan_in_fan_out, after_forward=lambda: None,
                   far=False) -> LoraSlots:
    """The op's output and gradients (x, each slot's A and B) against float64; returns the slots. far: x and dy
    (T, d) with rows 2^31 elements apart (tests.helpers.far_apart_rows)."""
    x, w, bias, slots, index = _inputs(lead, d_in, d_out, ranks, dtype, fan_in_fan_out)
    if far:
        x = far_apart_rows(x.detach()).requires_grad_()
    y = lora_linear_multi(x, w, bias, slots, index, fan_in_fan_out)
    after_forward()
    dy = far_apart_rows(torch.randn_like(y)) if far else torch.randn_like(y)
    y.backward(dy)
    leaf = lambda t: t.detach().double().requires_grad_()
    x64, a64, b64 = leaf(x), leaf(slots.lora_A), leaf(slots.lora_B)
    y64 = reference.lora_linear_multi(x64.reshape(-1, d_in), w.double(), bias.double(), a64, b64,
                                      slots.scales.double(), index.reshape(-1), fan_in_fan_out)
    y64.backward(dy.double().reshape(-1, d_out))
    assert_matches(y, y64.reshape(y.shape), None, dtype, "y")
    assert_matches(x.grad, x64.grad, None, dtype, "dx")
    assert_matches(slots.lora_A.grad, a64.grad, None, dtype, "dA")
    assert_matches(slots.lora_B.grad, b64.grad, None, dtype, "dB")
    return slots


@needs_triton
@pytest.mark.parametrize("T", [5, 70])     # decode; prefill over the slot-sorted rows
def test_multi_rows_far_apart_in_memory(T):
    """x and dy rows 2^31 elements apart (as in a T · d_in >= 2^31 input): row offsets are 64-bit."""
    torch.manual_seed(T)
    _check_float64((T,), 26, 30, [8, 3, 16], torch.float16, False, far=True)


HOPPER = CUDA and torch.cuda.get_device_capability()[0] >= 9


@needs_triton
@pytest.mark.skipif(not (INTERPRETED or HOPPER), reason="needs TRITON_INTERPRET=1 or a Hopper GPU")
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_multi_prefill_on_the_tma_tile_matches_float64(fan_in_fan_out, monkeypatch):
    """TMA forced (kernels.lora.TMA_PREFILL): the forward's shrink sorts x's rows and the TMA tile reads them, and
    so do the backward's g shrink and dx matmul with dy; values and per-slot gradients against float64."""
    from ptlm_engine.kernels import lora as K
    monkeypatch.setattr(K, "TMA_PREFILL", True)
    launched = []
    launch = TunedLauncher.launch
    monkeypatch.setattr(TunedLauncher, "launch", lambda self, *a, **kw: launched.append(self) or launch(self, *a, **kw))
    torch.manual_seed(4)

    def forward_launches():
        assert launched == [M._multi_shrink, M._multi_matmul_tma]
    _check_float64((2, 37), 24, 32, [8, 3, 16], torch.float32 if INTERPRETED else torch.bfloat16, fan_in_fan_out,
                   forward_launches)
    assert launched.count(M._multi_matmul_tma) == 2 and M._multi_matmul_prefill not in launched


@needs_triton
def test_mixed_batch_equals_each_row_with_its_own_adapter():
    torch.manual_seed(5)
    ranks = [4, 12]
    x, w, bias, slots, index = _inputs((11,), 20, 18, ranks, torch.float32)
    y = lora_linear_multi(x, w, bias, slots, index)
    for t in range(11):
        s = int(index[t])
        if s < 0:
            row = torch.nn.functional.linear(x[t:t + 1], w, bias)
        else:
            r = ranks[s]
            row = lora_linear(x[t:t + 1], w, bias, slots.lora_A[s, :r], slots.lora_B[s, :, :r],
                              scale=float(slots.scales[s]))
        torch.testing.assert_close(y[t:t + 1], row, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["empty", "batch0_3d", "one", "4d", "expanded", "transposed"])
def test_multi_edge_shapes_and_strides(case):
    """No token (T = 0, also a 3-D batch of 0), one token, 4-D leading dims, an x expanded from one row (stride 0)
    and a transposed x: y has x's leading dims and float64's values, as F.linear gives for any of them."""
    torch.manual_seed(7)
    lead = {"empty": (0,), "batch0_3d": (0, 3), "one": (1,), "4d": (2, 1, 3)}.get(case, (4,))
    x, w, bias, slots, index = _inputs(lead, 7, 5, [4, 2, 1], torch.float32)
    x = x.detach()
    if case == "expanded":
        x = x[:1].expand(4, 7)
    elif case == "transposed":
        x = x.t().contiguous().t()
    y = lora_linear_multi(x, w, bias, slots, index)
    y64 = reference.lora_linear_multi(x.double().reshape(-1, 7), w.double(), bias.double(), slots.lora_A.double(),
                                      slots.lora_B.double(), slots.scales.double(), index.reshape(-1))
    assert y.shape == (*lead, 5)
    assert_matches(y, y64.reshape(y.shape), None, torch.float32, "y")


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8], ids=str)
def test_multi_index_of_any_integer_dtype(dtype):
    """adapter_index as int32, int16 or uint8 (a mapping built by the caller), as torch's index ops take any integer
    dtype: the same output as with int64."""
    torch.manual_seed(11)
    x, w, bias, slots, _ = _inputs((4,), 7, 5, [4, 2, 1], torch.float32)
    index = torch.tensor([2, 0, 1, 0], device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(lora_linear_multi(x, w, bias, slots, index.to(dtype)),
                                   lora_linear_multi(x, w, bias, slots, index))


class _TorchOps(TorchDispatchMode):
    """The names of the torch ops run inside the block."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@needs_triton
@pytest.mark.parametrize("T", [5, 70])
def test_multi_layer_call_runs_no_torch_op_but_its_outputs(T, monkeypatch):
    """Inference given the batch's segments, as every layer of a served batch is: per call only y and xa are
    allocated (no sort, cast, view or copy: each is host time per layer). Kernel launches are stubbed out."""
    x, w, bias, slots, index = _inputs((T,), 16, 12, [4, 8], torch.float32)
    index = index.to(torch.int32)
    segments = token_segments(index, 2)
    monkeypatch.setattr(TunedLauncher, "launch", lambda *args, **kwargs: None)
    with torch.no_grad():   # the first call may allocate the split-K decode kernel's lasting buffers
        lora_linear_multi(x, w, bias, slots, index, segments=segments)
    with torch.no_grad(), _TorchOps() as ops:
        lora_linear_multi(x, w, bias, slots, index, segments=segments)
    assert len(ops.names) == 2 and set(ops.names) <= {"empty", "zeros"}, ops.names


@needs_triton
def test_multi_grads_with_given_segments_and_a_padded_rank():
    """r_max 12, which the kernels pad to 16: dA comes back contiguous in lora_A's layout, dB in lora_B's; the
    batch's segments given (as a model's layers pass them) change nothing."""
    torch.manual_seed(4)
    x, w, bias, slots, index = _inputs((70,), 20, 18, [12, 5], torch.float32)
    dy = torch.randn(70, 18, device=DEVICE)
    wrt = (x, slots.lora_A, slots.lora_B)
    grads = torch.autograd.grad(lora_linear_multi(x, w, bias, slots, index), wrt, dy)
    segments = token_segments(index.to(torch.int32), 2)
    grads_seg = torch.autograd.grad(lora_linear_multi(x, w, bias, slots, index, segments=segments), wrt, dy)
    leaf = lambda t: t.detach().double().requires_grad_()
    wrt64 = [leaf(t) for t in wrt]
    y64 = reference.lora_linear_multi(wrt64[0], w.double(), bias.double(), wrt64[1], wrt64[2],
                                      slots.scales.double(), index)
    grads64 = torch.autograd.grad(y64, wrt64, dy.double())
    for name, g, g_seg, g64 in zip(("dx", "dA", "dB"), grads, grads_seg, grads64):
        assert g.is_contiguous() and torch.equal(g, g_seg), name
        assert_matches(g, g64, None, torch.float32, name)


@needs_triton
def test_multi_strided_vectors():
    """Bias, ranks, scales, dropouts and the token index as strided views: the kernels read these vectors as
    contiguous, so the op hands them contiguous ones (strided, slot 1 ran with another slot's scale or rank)."""
    torch.manual_seed(6)
    x, w, bias, slots, _ = _inputs((6,), 7, 5, [3, 2], torch.float32)
    index = torch.tensor([0, 1, -1, 1, 0, 0], device=DEVICE)
    spread = lambda t: torch.stack([t, torch.full_like(t, 9)], dim=1)[:, 0]           # (n,) of stride 2
    strided = LoraSlots(slots.lora_A, slots.lora_B, spread(slots.ranks), spread(slots.scales),
                        spread(torch.tensor([0.0, 0.0], device=DEVICE)))
    assert strided.ranks.stride(0) == 2
    with torch.no_grad():
        y = lora_linear_multi(x, w, spread(bias), strided, spread(index))
        expected = lora_linear_multi(x, w, bias, slots._replace(dropouts=torch.zeros(2, device=DEVICE)), index)
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("bad", [2, 5, -2, 2**40])
def test_multi_index_out_of_range_raises_value_error(backend, bad, monkeypatch):
    """Checked where it costs no device sync (a CPU index, without given segments); 2^40 is not cut to 32 bits
    first."""
    monkeypatch.setenv("PTLM_BACKEND", backend)
    x, w, bias, slots, _ = _inputs((5,), 8, 6, [3, 3], torch.float32)
    index = torch.tensor([0, 1, bad, 0, -1])
    with pytest.raises(ValueError, match=r"adapter_index: expected slot ids in \[-1, 2\) .* from -?\d+ to \d+"):
        lora_linear_multi(x.cpu(), w.cpu(), bias.cpu(), LoraSlots(*(t.cpu() for t in slots[:4])), index)


def test_multi_bad_input_raises_value_error():
    x, w, bias, slots, index = _inputs((5,), 8, 6, [2, 3], torch.float32)
    with pytest.raises(ValueError, match=r"adapter_index: expected integers of shape \(5,\)"):
        lora_linear_multi(x, w, bias, slots, index[:4])
    with pytest.raises(ValueError, match=r"adapter_index: expected device"):
        lora_linear_multi(x, w, bias, slots, index.to("meta"))
    with pytest.raises(ValueError, match=r"lora_B: expected stacked slots \(2, 6, 3\)"):
        lora_linear_multi(x, w, bias, slots._replace(lora_B=slots.lora_B[:, :, :2]), index)
    with pytest.raises(ValueError, match=r"scales: expected shape \(2,\), got \(1,\)"):
        lora_linear_multi(x, w, bias, slots._replace(scales=slots.scales[:1]), index)
    with pytest.raises(ValueError, match=r"dropouts: expected shape \(2,\), got \(3,\)"):
        lora_linear_multi(x, w, bias, slots._replace(dropouts=torch.zeros(3)), index)
    with pytest.raises(ValueError, match=r"ranks: expected a tensor of shape \(2,\), got None"):
        lora_linear_multi(x, w, bias, slots._replace(ranks=None), index)
    with pytest.raises(ValueError, match=r"x: expected shape \(\.\.\., 8\)"):
        lora_linear_multi(x[:, :7], w, bias, slots, index)
    with pytest.raises(ValueError, match=r"lora_B: expected dtype torch.float32 \(the dtype of x\)"):
        lora_linear_multi(x, w, bias, slots._replace(lora_B=slots.lora_B.double()), index)
    with pytest.raises(ValueError, match=r"scales: expected device meta \(the device of x\)"):
        lora_linear_multi(x.to("meta"), w.to("meta"), bias.to("meta"), slots._replace(
            lora_A=slots.lora_A.to("meta"), lora_B=slots.lora_B.to("meta"), ranks=slots.ranks.to("meta")),
            index.to("meta"))


def test_multi_bool_index_is_refused():
    """A bool adapter_index (a "has an adapter" mask passed by mistake) is not a slot index: torch's index ops
    (index_select, F.embedding) refuse bool indices, and so does the op, with a ValueError naming adapter_index
    (regression: the kernels read True as slot 1)."""
    x, w, bias, slots, _ = _inputs((4,), 8, 6, [3, 3], torch.float32)
    with pytest.raises(ValueError, match=r"adapter_index: expected integers of shape \(4,\)"):
        lora_linear_multi(x, w, bias, slots, torch.tensor([True, False, True, True], device=DEVICE))


@pytest.mark.parametrize("table,values,message", [
    ("ranks", [4, 2, 9], r"ranks: expected values in \[0, 4\]"),
    ("ranks", [-1, 2, 1], r"ranks: expected values in \[0, 4\]"),
    ("dropouts", [0.0, 1.0, 0.0], r"dropouts: expected values in \[0.0, 1.0\)"),
    ("dropouts", [-0.5, 0.0, 0.0], r"dropouts: expected values in \[0.0, 1.0\)"),
], ids=["rank_above_r_max", "negative_rank", "dropout_one", "negative_dropout"])
def test_multi_slot_tables_out_of_range_raise_value_error(table, values, message):
    """The user's slot tables (LoraSlots.ranks and dropouts) outside what the stacked tensors and the kernels can
    mean are a ValueError, as an adapter_index out of range and lora_linear's dropout outside [0, 1) are; checked
    where it costs no device sync (CPU tables, without given segments). Regression: a rank above r_max made the
    kernels read the next slot's rows (past the tensor for the last slot), a dropout of 1 gave NaN rows, a negative
    rank or dropout computed something silently."""
    x, w, bias, slots, _ = _inputs((4,), 8, 6, [4, 2, 1], torch.float32)
    slots = LoraSlots(*(t.detach().cpu() for t in slots[:4]))
    slots = slots._replace(**{table: torch.tensor(values, dtype=torch.int32 if table == "ranks" else torch.float32)})
    with pytest.raises(ValueError, match=message):
        lora_linear_multi(x.detach().cpu(), w.cpu(), bias.cpu(), slots, torch.tensor([0, 1, 2, -1]))


@needs_triton
def test_multi_custom_op_passes_opcheck():
    torch.manual_seed(8)
    x, w, bias, slots, index = _inputs((7,), 16, 12, [4, 8], torch.float32)
    index = index.to(torch.int32)
    order, bounds = token_segments(index, 2)
    args = (x, w, bias, slots.lora_A, slots.lora_B, slots.ranks, slots.scales, index, order, bounds, None, None,
            False)
    torch.library.opcheck(lora_linear_multi_fwd, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@needs_triton
def test_multi_torch_compile_fullgraph():
    torch.manual_seed(9)
    x, w, bias, slots, index = _inputs((2, 5), 16, 12, [4, 8], torch.float32)
    compiled = torch.compile(lambda x, i: lora_linear_multi(x, w, bias, slots, i), backend="aot_eager",
                             fullgraph=True)
    y = compiled(x, index)
    y.sum().backward()
    y64 = reference.lora_linear_multi(x.double().reshape(-1, 16), w.double(), bias.double(),
                                      slots.lora_A.double(), slots.lora_B.double(), slots.scales.double(),
                                      index.reshape(-1))
    assert_matches(y, y64.reshape(y.shape), None, torch.float32, "compiled y")
    assert slots.lora_A.grad is not None


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_multi_forward_has_no_host_sync_and_replays_in_a_cuda_graph_with_a_new_mapping():
    torch.manual_seed(10)
    for T in (16, 300, 1024):  # the decode path, the sorted prefill path, and on Hopper its TMA tile
        x, w, bias, slots, index = _inputs((T,), 512, 384, [8, 16, 64, 128], torch.bfloat16)
        x, slots = x.detach(), LoraSlots(slots.lora_A.detach(), slots.lora_B.detach(), slots.ranks, slots.scales)
        index = index.to(torch.int32)
        run = lambda: lora_linear_multi(x, w, bias, slots, index)
        assert_no_host_sync(run)
        graph, y = captured(run)
        for _ in range(2):  # the same graph, a different row -> adapter mapping written into the same buffer
            index.copy_(torch.randint(-1, 4, (T,), device=DEVICE, dtype=torch.int32))
            graph.replay()
            expected = reference.lora_linear_multi(x.double(), w.double(), bias.double(), slots.lora_A.double(),
                                                   slots.lora_B.double(), slots.scales.double(), index)
            assert_matches(y, expected, None, torch.bfloat16, f"graph replay, T={T}")


@needs_triton
@pytest.mark.parametrize("lead", [(23,), (70,)])
def test_multi_dropout_uses_one_mask_per_slot_for_forward_and_backward(lead):
    torch.manual_seed(12)
    d_in, ranks = 24, [4, 8, 2]
    x, w, bias, slots, index = _inputs(lead, d_in, 20, ranks, torch.float32)
    dropouts = torch.tensor([0.3, 0.0, 0.6], device=DEVICE)
    slots = slots._replace(dropouts=dropouts)
    dy = torch.randn(*lead, 20, device=DEVICE)
    state = torch.cuda.get_rng_state() if CUDA else torch.random.get_rng_state()
    y = lora_linear_multi(x, w, bias, slots, index)
    y.backward(dy)
    # Replay the op's seed draw, then read its mask back through the shrink kernel: ones @ I^T per slot.
    (torch.cuda.set_rng_state if CUDA else torch.random.set_rng_state)(state)
    seed = torch.randint(0, 2**31 - 1, (1,), device=DEVICE)
    T = index.numel()
    eye = torch.eye(d_in, device=DEVICE).expand(3, d_in, d_in)
    idx = index.reshape(-1).to(torch.int32)
    ones = torch.ones(T, d_in, device=DEVICE)
    full = torch.full((3,), d_in, dtype=torch.int32, device=DEVICE)
    keep = M.lora_multi_shrink(ones, eye, idx, full, torch.ones(3, device=DEVICE), None, dropouts, seed)
    keep = keep[:, :d_in] * (1 - dropouts[idx.clamp_min(0).long()])[:, None] > 0.5
    dropped = ~keep[idx == 0]
    assert 0 < dropped.float().mean() < 0.6 and not (~keep[idx == 1]).any()
    leaf = lambda t: t.detach().double().requires_grad_()
    x64, a64, b64 = leaf(x), leaf(slots.lora_A), leaf(slots.lora_B)
    y64 = reference.lora_linear_multi(x64.reshape(T, d_in), w.double(), bias.double(), a64, b64,
                                      slots.scales.double(), idx, False, dropouts.double(), keep.double())
    y64.backward(dy.double().reshape(T, 20))
    assert_matches(y, y64.reshape(y.shape), None, torch.float32, "y")
    assert_matches(x.grad, x64.grad, None, torch.float32, "dx")
    assert_matches(slots.lora_A.grad, a64.grad, None, torch.float32, "dA")
    assert_matches(slots.lora_B.grad, b64.grad, None, torch.float32, "dB")
