"""The grouped LoRA ops (custom ops + autograd) against float64 references and against the separate ops: values
and gradients of every member (a member without an adapter, GQA-like widths, Conv1D layout, trainable base,
per-member dropout), the multi-adapter variant with random mappings, bad input, torch.library checks, compile."""
import pytest
import torch

from ptlm_engine import reference
from ptlm_engine.functional import (LoraSlots, lora_linear, lora_linear_grouped, lora_linear_multi,
                                    lora_linear_multi_grouped, token_segments)
from ptlm_engine.kernels import lora as K
from ptlm_engine.ops.lora_grouped import lora_linear_grouped_fwd, lora_linear_multi_grouped_fwd
from tests.helpers import (CUDA, DEVICE, DTYPES, assert_matches, assert_no_host_sync, captured, far_apart_rows,
                           leaves, lora_slots64, needs_triton, rand, record_launches)


def _inputs(lead, d_in, d_outs, ranks, dtype, fan_in_fan_out=False, biased=(True, False, True), train_base=False):
    x = rand(*lead, d_in, dtype=dtype).requires_grad_()
    ws = [(rand(d_in, n, dtype=dtype, scale=d_in ** -0.5) if fan_in_fan_out else
           rand(n, d_in, dtype=dtype, scale=d_in ** -0.5)).requires_grad_(train_base) for n in d_outs]
    biases = [rand(n, dtype=dtype).requires_grad_(train_base) if b else None for n, b in zip(d_outs, biased)]
    As = [None if r is None else rand(r, d_in, dtype=dtype, scale=d_in ** -0.5).requires_grad_() for r in ranks]
    Bs = [None if r is None else rand(n, r, dtype=dtype, scale=r ** -0.5).requires_grad_()
          for n, r in zip(d_outs, ranks)]
    return x, ws, biases, As, Bs, [1.5, 0.5, 2.0][:len(d_outs)]


def _grads(ys, dys, tensors):
    torch.autograd.backward(ys, dys)
    return [None if t is None or not t.requires_grad else t.grad for t in tensors]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [
    dict(lead=(2, 5), d_in=33, d_outs=(29, 13, 13), ranks=(4, None, 9)),               # q/k/v, k without adapter
    dict(lead=(70,), d_in=24, d_outs=(37, 20), ranks=(3, 8), biased=(False, True)),    # prefill, gate/up
    dict(lead=(3, 3), d_in=24, d_outs=(18, 18, 18), ranks=(2, 5, 1), fan_in_fan_out=True, train_base=True),
])
def test_grouped_forward_backward_matches_float64(case, dtype):
    torch.manual_seed(sum(case["lead"]) + case["d_in"])
    _check_grouped_float64(case, dtype)


@needs_triton
@pytest.mark.parametrize("T", [5, 70])     # decode; prefill
def test_grouped_rows_far_apart_in_memory(T):
    """x and the first member's dy with rows 2^31 elements apart (as in a T · d_in >= 2^31 input): 64-bit row
    offsets in the grouped kernels and in each member's backward."""
    torch.manual_seed(T)
    _check_grouped_float64(dict(lead=(T,), d_in=24, d_outs=(32, 8, 8), ranks=(4, None, 2)), torch.float16, far=True)


def _check_grouped_float64(case, dtype, far=False):
    x, ws, biases, As, Bs, scales = _inputs(dtype=dtype, **case)
    if far:
        x = far_apart_rows(x.detach()).requires_grad_()
    fif = case.get("fan_in_fan_out", False)
    ys = lora_linear_grouped(x, ws, biases, As, Bs, scales, fan_in_fan_out=fif)
    dys = [torch.randn_like(y) for y in ys]
    if far:
        dys[0] = far_apart_rows(dys[0])
    tensors = [x, *ws, *biases, *As, *Bs]
    grads = _grads(ys, dys, tensors)
    for lowp in (torch.float64, dtype):   # the float64 truth, and PyTorch's own error in the layer's dtype
        ts = leaves(tensors, lowp)
        G = len(ws)
        x_r, ws_r, b_r, A_r, B_r = ts[0], ts[1:1 + G], ts[1 + G:1 + 2 * G], ts[1 + 2 * G:1 + 3 * G], ts[1 + 3 * G:]
        ys_r = reference.lora_linear_grouped(x_r.reshape(-1, x.shape[-1]), ws_r, b_r, A_r, B_r, scales, fif)
        grads_r = _grads(ys_r, [d.to(lowp).reshape(-1, d.shape[-1]) for d in dys], ts)
        if lowp == torch.float64:
            ys64, grads64 = ys_r, grads_r
    for g, y in enumerate(ys):
        assert y.shape == (*case["lead"], case["d_outs"][g]) and y.dtype == dtype
        assert_matches(y.reshape(-1, y.shape[-1]), ys64[g], ys_r[g], dtype, f"y[{g}]")
    for i, (got, g64, g_lp) in enumerate(zip(grads, grads64, grads_r)):
        assert (got is None) == (g64 is None), i
        if got is not None:
            assert got.shape == g64.shape and got.dtype == dtype, i
            assert_matches(got, g64, g_lp, dtype, f"grad of input {i}")


@needs_triton
@pytest.mark.parametrize("dtype,T", [(torch.float32, 9), (torch.float16, 9), (torch.float16, 70)], ids=str)
def test_grouped_equals_the_separate_ops(dtype, T):
    """Outputs and gradients (x, every A and B) equal the members' own lora_linear / linear calls; float32
    adapters on an fp16 base too (read as they are, float32 gradients)."""
    torch.manual_seed(3)
    x, ws, biases, As, Bs, scales = _inputs((T,), 20, (16, 8, 8), (4, None, 6), dtype)
    As, Bs = ([None if t is None else t.detach().float().requires_grad_() for t in ts] for ts in (As, Bs))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    tensors = [x, *As, *Bs]
    ys = lora_linear_grouped(x, ws, biases, As, Bs, scales)
    dys = [torch.randn_like(y) for y in ys]
    grads = _grads(ys, dys, tensors)
    for t in tensors:
        if t is not None:
            t.grad = None
    sep = [torch.nn.functional.linear(x, w, b) if a is None else lora_linear(x, w, b, a, bb, s)
           for w, b, a, bb, s in zip(ws, biases, As, Bs, scales)]
    grads_sep = _grads(sep, dys, tensors)
    for y, y_sep in zip(ys, sep):
        torch.testing.assert_close(y, y_sep, **tol)
    for g, g_sep, t in zip(grads, grads_sep, tensors):
        assert (g is None) == (g_sep is None)
        if g is not None:
            assert g.dtype == t.dtype
            torch.testing.assert_close(g, g_sep, **tol)


@needs_triton
@pytest.mark.parametrize("T", [21, 70])   # decode: ops.lora's backward per member; prefill: the grouped one
def test_grouped_dropout_has_each_members_own_mask_in_forward_and_backward(T):
    torch.manual_seed(11)
    d_in, p = 26, [0.4, 0.25]
    x, ws, biases, As, Bs, scales = _inputs((T,), d_in, (34, 12), (3, 5), torch.float32, biased=(True, False))
    dys = [torch.randn(T, n, device=DEVICE) for n in (34, 12)]
    state = torch.cuda.get_rng_state() if CUDA else torch.random.get_rng_state()
    ys = lora_linear_grouped(x, ws, biases, As, Bs, scales, dropouts=p)
    grads = _grads(ys, dys, [x, *As, *Bs])
    # The op draws one Philox seed per member from the default generator: replay it to recover the masks.
    (torch.cuda.set_rng_state if CUDA else torch.random.set_rng_state)(state)
    seeds = torch.randint(0, 2**31 - 1, (2,), device=DEVICE)
    ones, eye = torch.ones(T, d_in, device=DEVICE), torch.eye(d_in, device=DEVICE)
    keeps = [K.lora_shrink(ones, eye, 1.0, seeds[g:g + 1], p[g]) * (1 - p[g]) > 0.5 for g in range(2)]
    assert all(0 < k.float().mean() < 1 for k in keeps) and not torch.equal(keeps[0], keeps[1])
    ts = leaves([x, *As, *Bs])
    ys64 = reference.lora_linear_grouped(ts[0], [w.double() for w in ws], [b if b is None else b.double() for b in
                                         biases], ts[1:3], ts[3:], scales, False, p, [k.double() for k in keeps])
    grads64 = _grads(ys64, [d.double() for d in dys], ts)
    for y, y64 in zip(ys, ys64):
        assert_matches(y, y64, None, torch.float32, "y")
    for name, g, g64 in zip(["dx", "dA0", "dA1", "dB0", "dB1"], grads, grads64):
        assert_matches(g, g64, None, torch.float32, name)


@needs_triton
def test_grouped_backward_at_prefill_launches_one_shrink_and_one_weight_grad(monkeypatch):
    """T > 64, three members with adapters: one grouped shrink (every g), one dx GEMM each, one grouped weight
    grad (every dA, dB); without dx only the two grouped launches. Gradients equal those with dx, and those of a
    group whose last output got no gradient (its member skipped) and whose middle member has no adapter."""
    launched = record_launches(monkeypatch)
    torch.manual_seed(12)
    x, ws, biases, As, Bs, scales = _inputs((70,), 24, (20, 8, 8), (4, 3, 5), torch.float32)
    dys = [torch.randn(70, n, device=DEVICE) for n in (20, 8, 8)]
    grads = {}
    for need_dx in (True, False):
        x.requires_grad_(need_dx)
        torch.manual_seed(13)             # the same dropout seeds both times
        ys = lora_linear_grouped(x, ws, biases, As, Bs, scales, dropouts=[0.1, 0.0, 0.2])
        launched.clear()
        grads[need_dx] = torch.autograd.grad(ys, [*As, *Bs], dys)
        names = [k.name for k in launched]
        dx_gemms = [n for n in names if n in ("_lora_matmul_kernel", "_lora_matmul_tma_kernel")]
        assert len(dx_gemms) == (3 if need_dx else 0), names
        assert sorted(set(names) - set(dx_gemms)) == ["_grouped_shrink_each_kernel", "_grouped_weight_grad_kernel"]
        assert len(names) == len(dx_gemms) + 2, names
    for with_dx, without in zip(grads[True], grads[False]):
        torch.testing.assert_close(with_dx, without, rtol=0, atol=0)
    As[1] = Bs[1] = None
    x.requires_grad_()
    ys = lora_linear_grouped(x, ws, biases, As, Bs, scales)
    got = torch.autograd.grad(ys[:2], [x, As[0], Bs[0]], dys[:2])
    sep = [lora_linear(x, ws[0], biases[0], As[0], Bs[0], scales[0]), torch.nn.functional.linear(x, ws[1], biases[1])]
    for g, g_sep in zip(got, torch.autograd.grad(sep, [x, As[0], Bs[0]], dys[:2])):
        torch.testing.assert_close(g, g_sep, rtol=1e-5, atol=1e-5)


def _multi_inputs(lead, d_in, d_outs, member_ranks, dtype, S=3):
    x = rand(*lead, d_in, dtype=dtype).requires_grad_()
    ws = [rand(n, d_in, dtype=dtype, scale=d_in ** -0.5) for n in d_outs]
    biases = [rand(d_outs[0], dtype=dtype)] + [None] * (len(d_outs) - 1)
    slots = []
    for n, ranks in zip(d_outs, member_ranks):
        if ranks is None:
            slots.append(None)
            continue
        a, b, ranks_t, scales = lora_slots64(S, d_in, n, ranks)
        slots.append(LoraSlots(a.to(DEVICE, dtype).requires_grad_(), b.to(DEVICE, dtype).requires_grad_(), ranks_t,
                               scales))
    return x, ws, biases, slots, torch.randint(-1, S, lead, device=DEVICE)


@needs_triton
@pytest.mark.parametrize("dtype,lead", [(torch.float32, (3, 7)), (torch.float16, (3, 7)), (torch.float32, (70,))]
                         + ([(torch.bfloat16, (3, 7))] if CUDA else []), ids=str)
def test_multi_grouped_forward_backward_matches_float64(dtype, lead):
    """q: mixed ranks; k: no slot of the batch; v: lacks one adapter (rank 0). (70,): sorted rows at prefill."""
    torch.manual_seed(5)
    slots = _check_multi_float64(lead, 26, (30, 14, 14), dtype)
    assert not slots[2].lora_A.grad[0].any() and not slots[0].lora_B.grad[1, :, 3:].any()   # beyond each rank


@needs_triton
@pytest.mark.parametrize("T", [5, 70])
def test_multi_grouped_rows_far_apart_in_memory(T):
    """x and q's dy with rows 2^31 elements apart (as in a T · d_in >= 2^31 input): 64-bit row offsets."""
    torch.manual_seed(T)
    _check_multi_float64((T,), 26, (30, 14, 14), torch.float16, far=True)


def _check_multi_float64(lead, d_in, d_outs, dtype, after_forward=lambda: None, far=False) -> list:
    """q: mixed ranks; k: no slot of the batch; v: lacks one adapter (rank 0): the op's outputs and gradients (x,
    each member's A and B) against float64; returns the members' slots. far: x and q's dy (T, d) with rows 2^31
    elements apart (tests.helpers.far_apart_rows)."""
    x, ws, biases, slots, index = _multi_inputs(lead, d_in, d_outs, ([8, 3, 16], None, [0, 4, 6]), dtype)
    if far:
        x = far_apart_rows(x.detach()).requires_grad_()
    ys = lora_linear_multi_grouped(x, ws, biases, slots, index)
    after_forward()
    dys = [torch.randn_like(y) for y in ys]
    if far:
        dys[0] = far_apart_rows(dys[0])
    live = [s for s in slots if s is not None]
    grads = _grads(ys, dys, [x] + [t for s in live for t in (s.lora_A, s.lora_B)])
    leaf = lambda t: t.detach().double().requires_grad_()
    x64 = leaf(x)
    ab64 = [(leaf(s.lora_A), leaf(s.lora_B)) if s is not None else (None, None) for s in slots]
    ys64 = reference.lora_linear_multi_grouped(
        x64.reshape(-1, d_in), [w.double() for w in ws], [b if b is None else b.double() for b in biases],
        [a for a, _ in ab64], [b for _, b in ab64], [None if s is None else s.scales.double() for s in slots],
        index.reshape(-1))
    grads64 = _grads(ys64, [d.double().reshape(-1, d.shape[-1]) for d in dys],
                     [x64] + [t for a, b in ab64 if a is not None for t in (a, b)])
    for g, (y, y64) in enumerate(zip(ys, ys64)):
        assert y.shape == (*lead, d_outs[g])
        assert_matches(y.reshape(-1, y.shape[-1]), y64, None, dtype, f"y[{g}]")
    for i, (got, g64) in enumerate(zip(grads, grads64)):
        assert_matches(got, g64, None, dtype, f"grad {i}")
    return slots


@needs_triton
@pytest.mark.skipif(not (K.INTERPRETED or (CUDA and torch.cuda.get_device_capability()[0] >= 9)),
                    reason="needs TRITON_INTERPRET=1 or a Hopper GPU")
def test_multi_grouped_prefill_on_the_tma_tiles_matches_float64(monkeypatch):
    """TMA forced: the grouped shrink sorts x's rows once, q and v (with adapters) run the TMA tile over them, k
    (none of the batch's adapters) the TMA base GEMM; the backward's members their own; against float64."""
    monkeypatch.setattr(K, "TMA_PREFILL", True)
    launched = record_launches(monkeypatch)
    torch.manual_seed(15)

    def forward_launches():
        names = [k.name for k in launched]
        assert names == ["_grouped_multi_shrink_kernel", "_multi_matmul_tma_kernel", "_lora_matmul_tma_kernel",
                         "_multi_matmul_tma_kernel"], names
    _check_multi_float64((70,), 24, (32, 16, 16), torch.float32 if K.INTERPRETED else torch.bfloat16,
                         forward_launches)


@needs_triton
def test_strided_biases_and_index_out_of_range():
    """Strided biases (and, in the multi op, per-slot vectors) reach the kernels contiguous; a CPU index out of
    range is a ValueError (where checking costs no device sync)."""
    torch.manual_seed(6)
    x, ws, _, As, Bs, scales = _inputs((4,), 7, (5, 3), (2, 2), torch.float32, biased=(False, False))
    biases = [torch.randn(n, 2, device=DEVICE)[:, 1] for n in (5, 3)]
    with torch.no_grad():
        got = lora_linear_grouped(x, ws, biases, As, Bs, scales)
        want = lora_linear_grouped(x, ws, [b.contiguous() for b in biases], As, Bs, scales)
    for g, (y, y_want) in enumerate(zip(got, want)):
        torch.testing.assert_close(y, y_want, msg=f"member {g}")
    x, ws, biases, slots, index = _multi_inputs((5,), 8, (6, 4), ([3, 2, 1], [2, 2, 2]), torch.float32)
    with torch.no_grad():
        got = lora_linear_multi_grouped(x, ws, [torch.randn(6, 2, device=DEVICE)[:, 0], None], slots, index)
    assert all(torch.isfinite(y).all() for y in got)
    with pytest.raises(ValueError, match=r"adapter_index: expected slot ids in \[-1, 3\)"):
        lora_linear_multi_grouped(x.cpu(), [w.cpu() for w in ws], [None, None],
                                  [LoraSlots(*(t.detach().cpu() for t in s[:4])) for s in slots],
                                  torch.tensor([0, 3, 1, -1, 2]))


@needs_triton
def test_multi_grouped_equals_the_separate_ops():
    torch.manual_seed(6)
    x, ws, biases, slots, index = _multi_inputs((11,), 20, (18, 10), ([4, 12, 2], [6, 6, 6]), torch.float32)
    order_bounds = token_segments(index, 3)
    ys = lora_linear_multi_grouped(x, ws, biases, slots, index, segments=order_bounds)
    for y, w, b, s in zip(ys, ws, biases, slots):
        torch.testing.assert_close(y, lora_linear_multi(x, w, b, s, index, segments=order_bounds), rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("bad, message", [
    (dict(x=(5, 9)), r"x: expected shape \(\.\.\., 8\) to match weights\[0\]"),
    (dict(w1=(6, 7)), r"x: expected shape \(\.\.\., 7\) to match weights\[1\]"),
    (dict(a1=(3, 7)), r"lora_As\[1\]: expected shape \(r, 8\)"),
    (dict(b0=(6, 2)), r"lora_Bs\[0\]: expected shape \(6, 3\)"),
    (dict(bias1=(6,)), r"biases\[1\]: expected shape \(4,\)"),
    (dict(a1=None), r"lora_As\[1\], lora_Bs\[1\]: expected both tensors or both None"),
])
def test_grouped_bad_input_raises_value_error(bad, message):
    shapes = dict(x=(5, 8), w0=(6, 8), w1=(4, 8), bias0=(6,), bias1=(4,), a0=(3, 8), a1=(2, 8), b0=(6, 3), b1=(4, 2))
    t = {k: None if s is None else torch.randn(*s, device=DEVICE) for k, s in (shapes | bad).items()}
    with pytest.raises(ValueError, match=message):
        lora_linear_grouped(t["x"], [t["w0"], t["w1"]], [t["bias0"], t["bias1"]], [t["a0"], t["a1"]],
                            [t["b0"], t["b1"]], [1.0, 1.0])


def test_grouped_bad_members_raise_value_error():
    x, w, a, b = (torch.randn(*s, device=DEVICE) for s in [(5, 8), (6, 8), (3, 8), (6, 3)])
    with pytest.raises(ValueError, match=r"weights: expected 1 to 3 members"):
        lora_linear_grouped(x, [w] * 4, [None] * 4, [a] * 4, [b] * 4, [1.0] * 4)
    with pytest.raises(ValueError, match=r"scales: expected one entry per member \(2\)"):
        lora_linear_grouped(x, [w, w], [None, None], [a, a], [b, b], [1.0])
    with pytest.raises(ValueError, match=r"lora_Bs\[1\]: expected dtype torch.float32"):
        lora_linear_grouped(x, [w, w], [None, None], [a, a], [b, b.half()], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"dropouts\[0\]"):
        lora_linear_grouped(x, [w], [None], [a], [b], [1.0], dropouts=[1.0])
    xm, wm, _, slots, index = _multi_inputs((5,), 8, (6, 4), ([2, 3, 1], [1, 1, 1]), torch.float32)
    with pytest.raises(ValueError, match=r"slots: every member must stack the same number of slots"):
        lora_linear_multi_grouped(xm, wm, [None, None], [slots[0], slots[1]._replace(
            lora_A=slots[1].lora_A[:2], lora_B=slots[1].lora_B[:2], ranks=slots[1].ranks[:2],
            scales=slots[1].scales[:2])], index)
    with pytest.raises(ValueError, match=r"slots\[1\].lora_B: expected stacked slots \(3, 4, 1\)"):
        lora_linear_multi_grouped(xm, wm, [None, None], [slots[0], slots[1]._replace(lora_B=slots[0].lora_B)], index)
    with pytest.raises(ValueError, match=r"adapter_index: expected integers of shape \(5,\)"):
        lora_linear_multi_grouped(xm, wm, [None, None], slots, index[:4])
    with pytest.raises(ValueError, match=r"slots\[1\].lora_A: expected dtype torch.float32"):
        lora_linear_multi_grouped(xm, wm, [None, None], [slots[0], slots[1]._replace(
            lora_A=slots[1].lora_A.double())], index)
    with pytest.raises(ValueError, match=r"slots\[0\].scales: expected device"):
        lora_linear_multi_grouped(xm, wm, [None, None], [slots[0]._replace(scales=slots[0].scales.to("meta")),
                                                         slots[1]], index)
    with pytest.raises(ValueError, match=r"slots\[1\].ranks: expected a tensor of shape \(3,\), got None"):
        lora_linear_multi_grouped(xm, wm, [None, None], [slots[0], slots[1]._replace(ranks=None)], index)
    with pytest.raises(ValueError, match=r"weights\[1\]: expected dtype torch.float32"):
        lora_linear_multi_grouped(xm, [wm[0], wm[1].double()], [None, None], slots, index)


def test_reference_backend_matches_float64(monkeypatch):
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    torch.manual_seed(2)
    x, ws, biases, As, Bs, scales = _inputs((4, 3), 12, (10, 6), (2, None), torch.float32, biased=(True, False))
    ys = lora_linear_grouped(x, ws, biases, As, Bs, scales)
    ys64 = reference.lora_linear_grouped(x.double(), [w.double() for w in ws], [biases[0].double(), None],
                                         [As[0].double(), None], [Bs[0].double(), None], scales)
    for y, y64 in zip(ys, ys64):
        assert_matches(y, y64, None, torch.float32, "y")


@needs_triton
def test_custom_ops_pass_opcheck():
    torch.manual_seed(4)
    x, ws, biases, As, Bs, scales = _inputs((9,), 20, (12, 6), (2, 3), torch.float32, biased=(True, True))
    for seeds, p in [(None, [0.0, 0.0]), (torch.tensor([7, 8], device=DEVICE), [0.25, 0.0])]:
        torch.library.opcheck(lora_linear_grouped_fwd, (x, ws, biases, As, Bs, scales, p, seeds, False),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    xm, wm, bm, slots, index = _multi_inputs((7,), 16, (12, 8), ([4, 8, 2], [2, 2, 2]), torch.float32)
    index = index.to(torch.int32)
    order, bounds = token_segments(index, 3)
    args = (xm, wm, [bm[0], torch.randn(8, device=DEVICE)], [s.lora_A for s in slots], [s.lora_B for s in slots],
            [s.ranks for s in slots], [s.scales for s in slots], [torch.full((3,), 0.2, device=DEVICE), None], index,
            order, bounds, torch.tensor([7, 8], device=DEVICE), False)
    torch.library.opcheck(lora_linear_multi_grouped_fwd, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@needs_triton
def test_torch_compile_fullgraph_with_a_member_without_adapter():
    """Inside torch.compile absent tensors travel as placeholders, so the gradients still reach every A and B."""
    torch.manual_seed(6)
    x, ws, biases, As, Bs, scales = _inputs((2, 7), 16, (24, 8, 8), (4, None, 2), torch.float32)
    compiled = torch.compile(lambda x: lora_linear_grouped(x, ws, biases, As, Bs, scales), backend="aot_eager",
                             fullgraph=True)
    ys = compiled(x)
    sum(y.square().sum() for y in ys).backward()
    grads = [t.grad for t in (x, As[0], As[2], Bs[0], Bs[2])]
    for t in (x, As[0], As[2], Bs[0], Bs[2]):
        t.grad = None
    ys_eager = lora_linear_grouped(x, ws, biases, As, Bs, scales)
    sum(y.square().sum() for y in ys_eager).backward()
    for y, y_eager in zip(ys, ys_eager):
        torch.testing.assert_close(y, y_eager)
    for g, t in zip(grads, (x, As[0], As[2], Bs[0], Bs[2])):
        assert g is not None
        torch.testing.assert_close(g, t.grad)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("T", [8, 300])
def test_grouped_has_no_host_sync_and_replays_in_a_cuda_graph(T):
    torch.manual_seed(T)
    x, ws, biases, As, Bs, scales = _inputs((T,), 512, (512, 128, 128), (16, None, 16), torch.bfloat16,
                                            biased=(False,) * 3)
    dys = [torch.randn(T, n, device=DEVICE, dtype=torch.bfloat16) for n in (512, 128, 128)]

    def step():
        ys = lora_linear_grouped(x, ws, biases, As, Bs, scales, dropouts=[0.1, 0.0, 0.1])
        torch.autograd.backward(ys, dys)

    assert_no_host_sync(step)
    with torch.no_grad():
        x_in = x.detach().clone()
        graph, ys = captured(lambda: lora_linear_grouped(x_in, ws, biases, [a if a is None else a.detach() for a in As],
                                                         [b if b is None else b.detach() for b in Bs], scales))
        x_in.copy_(torch.randn_like(x_in))                        # new inputs in the same buffer
        graph.replay()
        ys64 = reference.lora_linear_grouped(x_in.double(), [w.double() for w in ws], biases,
                                             [a if a is None else a.double() for a in As],
                                             [b if b is None else b.double() for b in Bs], scales)
        for y, y64 in zip(ys, ys64):
            assert_matches(y, y64, None, torch.bfloat16, "graph replay")
