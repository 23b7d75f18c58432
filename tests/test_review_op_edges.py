"""Review: edge-case inputs to every public functional op, forward and backward, on both backends, against float64
computations written here from the documented math (not ptlm_engine.reference).

Empty inputs (T = 0, batch 0, every row -1, P = 0), non-contiguous inputs (transposed / sliced / expanded x,
transposed-view weights, channels-last 4-D leading dims), rank and width extremes (r = 1, r = 256, d = 1, odd
primes), index tensors (int32 / int64, float, wrong length, out of range), mixed dtypes, requires_grad
combinations and no_grad, NaN / inf, and the outputs' shape, dtype, device and strides."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import ptlm_engine.functional as pf
from ptlm_engine.functional import BottleneckSlots, LoraSlots
from tests.helpers import CUDA
from ptlm_engine.kernels.configs import INTERPRETED

BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.skipif(
    not (CUDA or INTERPRETED), reason="needs CUDA or TRITON_INTERPRET=1"))]
DEV = "cuda" if CUDA else "cpu"


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("PTLM_BACKEND", request.param)
    return request.param


def g(*shape, dtype=torch.float32, scale=1.0, seed=None):
    gen = torch.Generator().manual_seed(seed if seed is not None else (hash(shape) & 0xFFFF))
    return (torch.randn(*shape, dtype=torch.float64, generator=gen) * scale).to(DEV, dtype)


def leaf(t, rg=True):
    return t.detach().clone().requires_grad_(rg)


def d64(t):
    return None if t is None else t.detach().double().requires_grad_(t.requires_grad)


def close(out, ref, what, tol=None):
    """out (any float dtype) against the float64 ref: relative to ref's scale."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    tol = tol or {torch.float32: 1e-4, torch.float16: 2e-2, torch.float64: 1e-9, torch.bfloat16: 5e-2}[out.dtype]
    if out.numel() == 0:
        return
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.equal(o.isnan(), r.isnan()), f"{what}: NaN at different places:\n{o}\n{r}"
    fin = r.isfinite()
    assert torch.equal(o[~fin & ~r.isnan()], r[~fin & ~r.isnan()]), f"{what}: infinities differ"
    o, r = o[fin], r[fin]
    if o.numel() == 0:
        return
    scale = max(r.abs().max().item(), 1e-3)
    err = (o - r).abs().max().item() / scale
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def grads_of(outs, inputs, dys):
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    dys = dys if isinstance(dys, (list, tuple)) else [dys]
    live = [t for t in inputs if t is not None and t.requires_grad]
    if not live:
        return [None] * len(inputs)
    pairs = [(o, d) for o, d in zip(outs, dys) if o.requires_grad]
    got = torch.autograd.grad([o for o, _ in pairs], live, [d.to(o.dtype) for o, d in pairs], allow_unused=True)
    it = iter(got)
    return [next(it) if t is not None and t.requires_grad else None for t in inputs]


def compare(engine_fn, ref_fn, inputs, names, dy=None, tol=None, check_grad_dtype=True):
    """engine_fn(*inputs) vs ref_fn(*inputs in float64): outputs, then (with dy) each trainable input's gradient;
    a gradient of an input with no contribution must be zeros (not None, not garbage)."""
    outs = engine_fn(*inputs)
    refs = ref_fn(*[d64(t) for t in inputs])
    outs_l = outs if isinstance(outs, (list, tuple)) else [outs]
    refs_l = refs if isinstance(refs, (list, tuple)) else [refs]
    for i, (o, r) in enumerate(zip(outs_l, refs_l)):
        close(o, r, f"out{i}", tol)
    if dy is None:
        return outs
    dys = dy if isinstance(dy, (list, tuple)) else [dy]
    ins64 = [d64(t) for t in inputs]
    refs = ref_fn(*ins64)
    got = grads_of(outs, inputs, dys)
    exp = grads_of(refs, ins64, [d.double() for d in dys])
    for name, t, gg, ge in zip(names, inputs, got, exp):
        if t is None or not t.requires_grad:
            continue
        if ge is None:
            ge = torch.zeros_like(t, dtype=torch.float64)
        if gg is None:      # the input reached no output (every row -1, T = 0): None is PyTorch's answer too
            assert not ge.any(), f"d{name}: None, expected a nonzero gradient"
            continue
        assert gg.shape == t.shape, f"d{name}: shape {tuple(gg.shape)} != {tuple(t.shape)}"
        if check_grad_dtype:
            assert gg.dtype == t.dtype, f"d{name}: dtype {gg.dtype} != {t.dtype}"
        close(gg, ge, f"d{name}", tol)
    return outs


# ---------------------------------------------------------------------------------------------- float64 math
def lora64(x, w, b, a, bb, s, fifo=False):
    w = w if fifo else w.t()
    y = x @ w + s * (x @ a.t()) @ bb.t()
    return y if b is None else y + b


def multi64(x, w, b, A, B, ranks, scales, index, fifo=False):
    y = x @ (w if fifo else w.t())
    if b is not None:
        y = y + b
    rows = []
    flat, lead = x.reshape(-1, x.shape[-1]), x.shape[:-1]
    idx = index.reshape(-1).tolist()
    yf = y.reshape(-1, y.shape[-1])
    for t, a in enumerate(idx):
        if a < 0:
            rows.append(yf[t])
        else:
            r = int(ranks[a])
            rows.append(yf[t] + float(scales[a]) * (flat[t] @ A[a, :r].t()) @ B[a, :, :r].t())
    out = torch.stack(rows) if rows else yf
    return out.reshape(*lead, y.shape[-1])


ACTS = {"relu": torch.relu, "gelu": F.gelu, "silu": F.silu}


def bottleneck64(h, wd, bd, wu, bu, act, s, res=None):
    z = h @ wd.t()
    z = z if bd is None else z + bd
    out = ACTS[act](z) @ wu.t()
    out = out if bu is None else out + bu
    return (h if res is None else res) + s * out


def rms64(x, w, eps=1e-6):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rot_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), -1)


def attn64(q, k, v, pk=None, pv=None, lengths=None, causal=True, scale=None):
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    grp = Hq // k.shape[1]
    allowed = torch.ones(B, 1, Lq, Lk, dtype=torch.bool)
    if causal:
        allowed = allowed & (torch.arange(Lk)[None, :] <= torch.arange(Lk - Lq, Lk)[:, None])
    if pk is not None:
        P = pk.shape[2]
        seen = torch.ones(B, P, dtype=torch.bool)
        if lengths is not None:
            seen = torch.arange(P)[None] < lengths.cpu()[:, None]
        allowed = torch.cat([seen[:, None, None, :].expand(B, 1, Lq, P), allowed], -1)
        k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
    k, v = k.repeat_interleave(grp, 1), v.repeat_interleave(grp, 1)
    sc = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed.to(q.device), float("-inf"))
    p = torch.softmax(sc, -1).nan_to_num(0.0)
    return p @ v


# ============================================================================================== lora_linear
def _lora_inputs(lead, d_in, d_out, r, dtype=torch.float32, wdtype=None, rg=(True, False, False, True, True)):
    wdtype = wdtype or dtype
    x = g(*lead, d_in, dtype=dtype, seed=1)
    w = g(d_out, d_in, dtype=dtype, scale=d_in ** -0.5, seed=2)
    b = g(d_out, dtype=dtype, seed=3)
    a = g(r, d_in, dtype=wdtype, scale=d_in ** -0.5, seed=4)
    bb = g(d_out, r, dtype=wdtype, scale=r ** -0.5, seed=5)
    return [leaf(t, f) for t, f in zip((x, w, b, a, bb), rg)]


LORA_NAMES = ["x", "weight", "bias", "lora_A", "lora_B"]


@pytest.mark.parametrize("lead,d_in,d_out,r", [
    ((0,), 7, 5, 3),          # T = 0
    ((2, 0), 7, 5, 3),        # batch of empty rows
    ((0, 3), 7, 5, 3),        # batch 0
    ((3,), 1, 1, 1),          # every dim 1
    ((5,), 13, 1, 256),       # r = 256, d_out 1
    ((2, 3), 1, 7, 256),      # d_in 1, r = 256
    ((4,), 11, 17, 1),        # r = 1, odd primes
], ids=["T0", "2x0", "0x3", "all1", "r256_dout1", "din1_r256", "r1_primes"])
def test_lora_linear_shapes_fwd_bwd(backend, lead, d_in, d_out, r):
    ins = _lora_inputs(lead, d_in, d_out, r)
    dy = g(*lead, d_out, seed=9)
    y = compare(lambda *t: pf.lora_linear(*t, scale=0.7), lambda *t: lora64(*t, 0.7), ins, LORA_NAMES, dy)
    assert y.shape == (*lead, d_out) and y.dtype == torch.float32 and y.device == ins[0].device
    assert y.is_contiguous()


@pytest.mark.parametrize("case", ["transposed_x", "sliced_x", "expanded_x", "weight_t_view", "A_B_t_views",
                                  "channels_last_4d", "fifo_t_view"])
def test_lora_linear_noncontiguous(backend, case):
    d_in, d_out, r = 6, 5, 3
    x, w, b, a, bb = _lora_inputs((4,), d_in, d_out, r, rg=(False,) * 5)
    lead = (4,)
    fifo = False
    if case == "transposed_x":
        x = leaf(x.t().contiguous()).t()           # non-leaf view; grad reaches the leaf
    elif case == "sliced_x":
        x = leaf(g(4, 2 * d_in, seed=11))[:, ::2]
    elif case == "expanded_x":
        x = leaf(g(1, d_in, seed=12)).expand(4, d_in)
    elif case == "channels_last_4d":
        base = leaf(g(2, d_in, 3, 2, seed=13))      # (B, C, H, W) -> (B, H, W, C) view
        x = base.permute(0, 2, 3, 1)
        lead = (2, 3, 2)
    else:
        x = leaf(x)
    if case == "weight_t_view":
        w = w.detach().t().contiguous().t()
    if case == "A_B_t_views":
        a = leaf(a.t().contiguous()).t()
        bb = leaf(bb.t().contiguous()).t()
    else:
        a, bb = leaf(a), leaf(bb)
    if case == "fifo_t_view":                       # Conv1D weight (d_in, d_out) passed as a transposed view
        w = w.detach().clone().t()   # (d_in, d_out), a non-contiguous view
        fifo = True
        assert not w.is_contiguous()
    dy = g(*lead, d_out, seed=14)
    y = compare(lambda *t: pf.lora_linear(*t, scale=0.5, fan_in_fan_out=fifo),
                lambda *t: lora64(*t, 0.5, fifo), [x, w, b, a, bb], LORA_NAMES, dy)
    assert y.shape == (*lead, d_out) and y.is_contiguous()


@pytest.mark.parametrize("which", ["only_x", "only_AB", "none", "no_grad", "only_bias"])
def test_lora_linear_requires_grad_combinations(backend, which):
    rg = {"only_x": (True, False, False, False, False), "only_AB": (False, False, False, True, True),
          "none": (False,) * 5, "no_grad": (True, False, False, True, True),
          "only_bias": (False, False, True, False, False)}[which]
    ins = _lora_inputs((3, 2), 9, 7, 2, rg=rg)
    dy = g(3, 2, 7, seed=15)
    if which == "no_grad":
        with torch.no_grad():
            y = pf.lora_linear(*ins, scale=0.3)
        assert not y.requires_grad and y.grad_fn is None
        close(y, lora64(*[d64(t) for t in ins], 0.3), "y")
        return
    y = compare(lambda *t: pf.lora_linear(*t, scale=0.3), lambda *t: lora64(*t, 0.3), ins, LORA_NAMES,
                dy if any(rg) else None)
    assert y.requires_grad == any(rg)


def test_lora_linear_half_x_fp32_adapter_and_mixed_base(backend):
    """fp16 x with fp32 A/B is documented (values of the fp16-rounded weights, fp32 grads); an fp32 base weight on
    fp16 x is not: a ValueError naming weight."""
    x, w, b, a, bb = _lora_inputs((5,), 8, 6, 4, dtype=torch.float16, wdtype=torch.float32,
                                  rg=(True, False, False, True, True))
    dy = g(5, 6, dtype=torch.float16, seed=16)
    y = pf.lora_linear(x, w, b, a, bb, scale=0.5)
    assert y.dtype == torch.float16
    y64 = lora64(*[d64(t) for t in (x, w, b, a.half(), bb.half())], 0.5)
    close(y, y64, "y")
    ga, gb = torch.autograd.grad(y, [a, bb], dy)
    assert ga.dtype == gb.dtype == torch.float32
    with pytest.raises(ValueError, match="weight"):
        pf.lora_linear(x, w.float(), b, a, bb)
    with pytest.raises(ValueError, match="lora_A"):
        pf.lora_linear(x.float(), w.float(), b.float(), a.double(), bb.float())


def test_lora_linear_nan_row(backend):
    """A NaN in one row of x gives NaN in that row only, as the plain computation."""
    x, w, b, a, bb = _lora_inputs((4,), 5, 3, 2, rg=(False,) * 5)
    x = x.clone()
    x[1, 2] = float("nan")
    y = pf.lora_linear(x, w, b, a, bb, scale=0.5)
    close(y, lora64(*[d64(t) for t in (x, w, b, a, bb)], 0.5), "y")
    assert y[1].isnan().all() and y[[0, 2, 3]].isfinite().all()


@pytest.mark.parametrize("T", [1, 70], ids=["decode", "prefill"])
@pytest.mark.parametrize("op", ["lora_linear", "lora_linear_multi", "lora_linear_grouped", "bottleneck_adapter"])
def test_inf_input_gives_what_pytorch_gives(request, backend, op, T):
    """Row 0 of x = [inf, 0, 0], the other rows 0, all-ones weights: PyTorch's y is +inf on row 0 (no inf - inf,
    no inf * 0) and 0 elsewhere. The kernels' padded rank / width lanes must not turn inf * 0 into NaN."""
    x = torch.zeros(T, 3, device=DEV)
    x[0, 0] = float("inf")
    ones = lambda *s: torch.ones(*s, device=DEV)
    if op == "lora_linear":
        y = pf.lora_linear(x, ones(2, 3), None, ones(1, 3), ones(2, 1), scale=1.0)
    elif op == "lora_linear_multi":
        slots = LoraSlots(ones(1, 1, 3), ones(1, 2, 1), torch.ones(1, dtype=torch.int32, device=DEV), ones(1))
        y = pf.lora_linear_multi(x, ones(2, 3), None, slots, torch.zeros(T, dtype=torch.long, device=DEV))
    elif op == "lora_linear_grouped":
        y = pf.lora_linear_grouped(x, [ones(2, 3)], [None], [ones(1, 3)], [ones(2, 1)], [1.0])[0]
    else:
        y = pf.bottleneck_adapter(x, ones(2, 3), None, ones(3, 2), None, "relu", 1.0)
    expected = torch.zeros_like(y)
    expected[0] = float("inf")
    assert torch.equal(y, expected), y


# ======================================================================================== lora_linear_multi
def _slots(S, d_in, d_out, ranks, dtype=torch.float32, rg=True):
    r_max = max(ranks)
    A = g(S, r_max, d_in, dtype=torch.float64, scale=d_in ** -0.5, seed=21)
    B = g(S, d_out, r_max, dtype=torch.float64, scale=r_max ** -0.5, seed=22)
    for s, r in enumerate(ranks):
        A[s, r:] = 0
        B[s, :, r:] = 0
    return (leaf(A.to(dtype), rg), leaf(B.to(dtype), rg), torch.tensor(ranks, dtype=torch.int32, device=DEV),
            torch.tensor([0.5 + 0.25 * s for s in range(S)], device=DEV))


@pytest.mark.parametrize("case", ["all_minus1", "T0", "0x3", "r256_dout1", "int64_4d", "expanded"])
def test_lora_linear_multi_edges_fwd_bwd(backend, case):
    d_in, d_out, ranks = 7, 5, [3, 1, 2]
    lead, index = (4,), None
    if case == "r256_dout1":
        d_in, d_out, ranks = 3, 1, [256, 1]
    if case == "T0":
        lead = (0,)
    if case == "0x3":
        lead = (0, 3)
    if case == "int64_4d":
        lead = (2, 2, 3)
    A, B, ranks_t, scales = _slots(len(ranks), d_in, d_out, ranks)
    x = leaf(g(*lead, d_in, seed=23))
    w = g(d_out, d_in, seed=24, scale=d_in ** -0.5)
    b = g(d_out, seed=25)
    n = math.prod(lead)
    index = torch.tensor([(t % (len(ranks) + 1)) - 1 for t in range(n)], dtype=torch.int32, device=DEV).reshape(lead)
    if case == "all_minus1":
        index = torch.full(lead, -1, dtype=torch.int32, device=DEV)
    if case == "int64_4d":
        index = index.long()
    if case == "expanded":
        x = leaf(g(1, d_in, seed=26)).expand(4, d_in)
    dy = g(*lead, d_out, seed=27)
    fn = lambda x, w, b, A, B: pf.lora_linear_multi(x, w, b, LoraSlots(A, B, ranks_t, scales), index)
    ref = lambda x, w, b, A, B: multi64(x, w, b, A, B, ranks_t, scales, index)
    y = compare(fn, ref, [x, w, b, A, B], LORA_NAMES, dy)
    assert y.shape == (*lead, d_out) and y.is_contiguous()


@pytest.mark.parametrize("bad", ["float_index", "wrong_length", "too_high", "below_minus1", "bool_index"])
def test_lora_linear_multi_bad_index_raises(backend, bad):
    A, B, ranks, scales = _slots(2, 5, 3, [2, 1], rg=False)
    x, w = g(4, 5, seed=31), g(3, 5, seed=32)
    index = {"float_index": torch.zeros(4), "wrong_length": torch.zeros(3, dtype=torch.int64),
             "too_high": torch.tensor([0, 1, 2, -1]), "below_minus1": torch.tensor([0, -2, 1, -1]),
             "bool_index": torch.ones(4, dtype=torch.bool)}[bad].to(DEV)
    with pytest.raises((ValueError, IndexError), match="adapter_index"):
        pf.lora_linear_multi(x, w, None, LoraSlots(A, B, ranks, scales), index)


def test_lora_linear_multi_int32_equals_int64(backend):
    A, B, ranks, scales = _slots(3, 5, 4, [2, 1, 3], rg=False)
    x, w = g(6, 5, seed=33), g(4, 5, seed=34)
    idx = torch.tensor([2, -1, 0, 1, 2, 0], device=DEV)
    y32 = pf.lora_linear_multi(x, w, None, LoraSlots(A, B, ranks, scales), idx.int())
    y64 = pf.lora_linear_multi(x, w, None, LoraSlots(A, B, ranks, scales), idx)
    assert torch.equal(y32, y64)


def test_lora_linear_multi_unused_slot_grads_are_zero_not_garbage(backend):
    """Slots none of the tokens map get exact zero gradients, even when the allocator hands back NaN-poisoned
    memory."""
    A, B, ranks, scales = _slots(4, 6, 5, [2, 3, 1, 2])
    x, w = g(5, 6, seed=35), g(5, 6, seed=36)
    index = torch.tensor([1, 1, -1, 1, -1], device=DEV)
    for _ in range(3):      # hand freed NaN blocks of the gradients' sizes back to the allocator
        junk = [torch.full_like(A, float("nan")), torch.full_like(B, float("nan"))]
        del junk
    y = pf.lora_linear_multi(x, w, None, LoraSlots(A, B, ranks, scales), index)
    ga, gb = torch.autograd.grad(y, [A, B], g(5, 5, seed=37))
    for s in (0, 2, 3):
        assert torch.equal(ga[s], torch.zeros_like(ga[s])), f"dA slot {s}"
        assert torch.equal(gb[s], torch.zeros_like(gb[s])), f"dB slot {s}"
    assert ga[1].abs().sum() > 0 and torch.equal(ga[1, 3:], torch.zeros_like(ga[1, 3:]))


# ==================================================================================== grouped projections
def test_lora_linear_grouped_T0_and_primes(backend):
    for lead in [(0,), (2, 0), (3,)]:
        d_in = 5
        x = leaf(g(*lead, d_in, seed=41))
        ws = [g(7, d_in, seed=42), g(1, d_in, seed=43), g(3, d_in, seed=44)]
        bs = [g(7, seed=45), None, g(3, seed=46)]
        As = [leaf(g(1, d_in, seed=47)), None, leaf(g(256, d_in, seed=48, scale=0.1))]
        Bs = [leaf(g(7, 1, seed=49)), None, leaf(g(3, 256, seed=50, scale=0.1))]
        scales = [0.5, 1.0, 2.0]
        dys = [g(*lead, 7, seed=51), g(*lead, 1, seed=52), g(*lead, 3, seed=53)]

        def fn(x, a0, b0, a2, b2):
            return pf.lora_linear_grouped(x, ws, bs, [a0, None, a2], [b0, None, b2], scales)

        def ref(x, a0, b0, a2, b2):
            w64, bias64 = [t.double() for t in ws], [None if t is None else t.double() for t in bs]
            return [lora64(x, w64[0], bias64[0], a0, b0, 0.5), x @ w64[1].t(),
                    lora64(x, w64[2], bias64[2], a2, b2, 2.0)]
        ys = compare(fn, ref, [x, As[0], Bs[0], As[2], Bs[2]], ["x", "A0", "B0", "A2", "B2"], dys)
        assert [tuple(y.shape) for y in ys] == [(*lead, 7), (*lead, 1), (*lead, 3)]


def test_lora_linear_multi_grouped_all_minus1_and_bad_index(backend):
    d_in = 6
    x = leaf(g(2, 3, d_in, seed=61))
    ws = [g(4, d_in, seed=62), g(5, d_in, seed=63)]
    A0, B0, r0, s0 = _slots(2, d_in, 4, [2, 1])
    A1, B1, r1, s1 = _slots(2, d_in, 5, [1, 3])
    index = torch.full((2, 3), -1, device=DEV)
    dys = [g(2, 3, 4, seed=64), g(2, 3, 5, seed=65)]

    def fn(x, A0, B0, A1, B1):
        return pf.lora_linear_multi_grouped(x, ws, [None, None], [LoraSlots(A0, B0, r0, s0), LoraSlots(A1, B1, r1, s1)],
                                            index)

    def ref(x, A0, B0, A1, B1):
        return [x @ ws[0].double().t(), x @ ws[1].double().t()]
    compare(fn, ref, [x, A0, B0, A1, B1], ["x", "A0", "B0", "A1", "B1"], dys)
    for bad in (torch.full((2, 3), 2, device=DEV), torch.full((2, 3), -3, device=DEV), torch.zeros(2, 3, device=DEV),
                torch.zeros(5, dtype=torch.long, device=DEV)):
        with pytest.raises((ValueError, IndexError), match="adapter_index"):
            pf.lora_linear_multi_grouped(x, ws, [None, None], [LoraSlots(A0, B0, r0, s0), LoraSlots(A1, B1, r1, s1)],
                                         bad)


# ======================================================================================= bottleneck adapter
@pytest.mark.parametrize("case", ["T0", "2x0", "m1_d1", "m256_d7", "channels_last_res", "expanded_h",
                                  "weights_t_views"])
def test_bottleneck_adapter_edges(backend, case):
    d, m, lead, act = 5, 3, (4,), "gelu"
    if case == "T0":
        lead = (0,)
    if case == "2x0":
        lead = (2, 0)
    if case == "m1_d1":
        d, m, act = 1, 1, "silu"
    if case == "m256_d7":
        d, m, act = 7, 256, "relu"
    h = leaf(g(*lead, d, seed=71))
    wd, bd = leaf(g(m, d, seed=72, scale=d ** -0.5)), leaf(g(m, seed=73))
    wu, bu = leaf(g(d, m, seed=74, scale=m ** -0.5)), leaf(g(d, seed=75))
    res = None
    if case == "channels_last_res":
        hb = leaf(g(2, d, 3, 2, seed=76))
        h = hb.permute(0, 2, 3, 1)
        res = leaf(g(2, d, 3, 2, seed=77)).permute(0, 2, 3, 1)
        lead = (2, 3, 2)
    if case == "expanded_h":
        h = leaf(g(1, d, seed=78)).expand(4, d)
    if case == "weights_t_views":
        wd = leaf(wd.detach().t().contiguous()).t()
        wu = leaf(wu.detach().t().contiguous()).t()
    dy = g(*lead, d, seed=79)
    fn = lambda h, wd, bd, wu, bu, res: pf.bottleneck_adapter(h, wd, bd, wu, bu, act, 0.8, res)
    ref = lambda h, wd, bd, wu, bu, res: bottleneck64(h, wd, bd, wu, bu, act, 0.8, res)
    y = compare(fn, ref, [h, wd, bd, wu, bu, res], ["h", "wd", "bd", "wu", "bu", "res"], dy)
    assert y.shape == (*lead, d) and y.dtype == torch.float32


def test_bottleneck_adapter_mixed_dtypes(backend):
    """fp16 h with fp32 weights is documented; an fp32 residual on fp16 h is refused naming residual."""
    h = leaf(g(3, 6, dtype=torch.float16, seed=81))
    wd, bd, wu, bu = (leaf(g(*s, seed=82 + i, scale=0.3)) for i, s in enumerate([(4, 6), (4,), (6, 4), (6,)]))
    y = pf.bottleneck_adapter(h, wd, bd, wu, bu, "relu", 1.0)
    assert y.dtype == torch.float16
    close(y, bottleneck64(d64(h), *[d64(t.half()) for t in (wd, bd, wu, bu)], "relu", 1.0), "y")
    gw = torch.autograd.grad(y, [wd], g(3, 6, dtype=torch.float16, seed=86))[0]
    assert gw.dtype == torch.float32
    with pytest.raises(ValueError, match="residual"):
        pf.bottleneck_adapter(h, wd, bd, wu, bu, "relu", 1.0, residual=g(3, 6, seed=87))
    with pytest.raises(ValueError):
        pf.bottleneck_adapter(h, wd, bd.half(), wu, bu, "relu", 1.0)


def _bslots(S, d, sizes, acts):
    m = max(sizes)
    wd = g(S, m, d, dtype=torch.float64, seed=91, scale=d ** -0.5)
    bd = g(S, m, dtype=torch.float64, seed=92)
    wu = g(S, d, m, dtype=torch.float64, seed=93, scale=m ** -0.5)
    bu = g(S, d, dtype=torch.float64, seed=94)
    for s, k in enumerate(sizes):
        wd[s, k:], bd[s, k:], wu[s, :, k:] = 0, 0, 0
    return ([leaf(t.float()) for t in (wd, bd, wu, bu)], torch.tensor(sizes, dtype=torch.int32, device=DEV),
            torch.tensor([0.5 + 0.5 * s for s in range(S)], device=DEV),
            torch.tensor(acts, dtype=torch.int32, device=DEV))


def multi_bottleneck64(h, wd, bd, wu, bu, sizes, scales, acts, index, res=None):
    names = ["relu", "gelu", "silu"]
    base = h if res is None else res
    flat, bflat = h.reshape(-1, h.shape[-1]), base.reshape(-1, h.shape[-1])
    rows = []
    for t, a in enumerate(index.reshape(-1).tolist()):
        if a < 0 or int(sizes[a]) == 0:
            rows.append(bflat[t])
            continue
        k = int(sizes[a])
        z = ACTS[names[int(acts[a])]](flat[t] @ wd[a, :k].t() + bd[a, :k])
        rows.append(bflat[t] + float(scales[a]) * (z @ wu[a, :, :k].t() + bu[a]))
    return (torch.stack(rows) if rows else bflat).reshape(base.shape)


@pytest.mark.parametrize("case", ["all_minus1", "T0", "mixed_4d_int64", "m256"])
def test_bottleneck_adapter_multi_edges(backend, case):
    d, sizes, acts, lead = 5, [3, 0, 2], [1, 0, 2], (4,)
    if case == "T0":
        lead = (0, 2)
    if case == "mixed_4d_int64":
        lead = (2, 3, 1)
    if case == "m256":
        d, sizes, acts = 3, [256, 1], [0, 2]
    (wd, bd, wu, bu), sizes_t, scales, acts_t = _bslots(len(sizes), d, sizes, acts)
    n = math.prod(lead)
    index = torch.tensor([(t % (len(sizes) + 1)) - 1 for t in range(n)], device=DEV).reshape(lead)
    if case == "all_minus1":
        index = torch.full(lead, -1, device=DEV)
    if case != "mixed_4d_int64":
        index = index.int()
    h = leaf(g(*lead, d, seed=95))
    res = leaf(g(*lead, d, seed=96))
    dy = g(*lead, d, seed=97)
    fn = lambda h, wd, bd, wu, bu, res: pf.bottleneck_adapter_multi(
        h, BottleneckSlots(wd, bd, wu, bu, sizes_t, scales, acts_t), index, res)
    ref = lambda h, wd, bd, wu, bu, res: multi_bottleneck64(h, wd, bd, wu, bu, sizes_t, scales, acts_t, index, res)
    y = compare(fn, ref, [h, wd, bd, wu, bu, res], ["h", "wd", "bd", "wu", "bu", "res"], dy)
    assert y.shape == (*lead, d)


@pytest.mark.parametrize("bad", ["float_index", "wrong_length", "too_high", "below_minus1"])
def test_bottleneck_adapter_multi_bad_index_raises(backend, bad):
    (wd, bd, wu, bu), sizes, scales, acts = _bslots(2, 4, [2, 1], [0, 1])
    h = g(4, 4, seed=98)
    index = {"float_index": torch.zeros(4), "wrong_length": torch.zeros(5, dtype=torch.long),
             "too_high": torch.tensor([0, 2, 1, -1]), "below_minus1": torch.tensor([0, -5, 1, -1])}[bad].to(DEV)
    with pytest.raises((ValueError, IndexError), match="adapter_index"):
        pf.bottleneck_adapter_multi(h, BottleneckSlots(wd, bd, wu, bu, sizes, scales, acts), index)


# ======================================================================================== prefix attention
@pytest.mark.parametrize("case", ["P0", "batch0", "Lq0", "gqa_transposed_expanded_prefix", "lengths_int64"])
def test_prefix_attention_edges(backend, case):
    B, Hq, Hkv, Lq, Lk, D, P = 2, 2, 1, 3, 4, 5, 2
    if case == "P0":
        P = 0
    if case == "batch0":
        B = 0
    if case == "Lq0":
        Lq = 0
    q = leaf(g(B, Hq, Lq, D, seed=101))
    k = leaf(g(B, Hkv, Lk, D, seed=102))
    v = leaf(g(B, Hkv, Lk, D, seed=103))
    pk = leaf(g(B, Hkv, P, D, seed=104))
    pv = leaf(g(B, Hkv, P, D, seed=105))
    lengths = None
    if case == "gqa_transposed_expanded_prefix":
        q = leaf(g(B, Lq, Hq, D, seed=106)).transpose(1, 2)             # HF's (B, L, H, D) transposed view
        pk = leaf(g(1, Hkv, P, D, seed=107)).expand(B, Hkv, P, D)
        pv = leaf(g(1, Hkv, P, D, seed=108)).expand(B, Hkv, P, D)
    if case == "lengths_int64":
        lengths = torch.tensor([1, 2], device=DEV)
    dy = g(B, Hq, Lq, D, seed=109)
    fn = lambda q, k, v, pk, pv: pf.prefix_attention(q, k, v, pk, pv, lengths)
    ref = lambda q, k, v, pk, pv: attn64(q, k, v, pk, pv, lengths)
    o = compare(fn, ref, [q, k, v, pk, pv], ["q", "k", "v", "pk", "pv"], dy)
    assert o.shape == (B, Hq, Lq, D) and o.is_contiguous() and o.dtype == q.dtype


@pytest.mark.parametrize("bad", [[3, 1], [-1, 2]], ids=["above_P", "negative"])
def test_prefix_attention_prefix_lengths_out_of_range(backend, bad):
    """prefix_lengths outside [0, P]: a clear ValueError, or (at the least) what the reference gives, never a read
    past the prefix."""
    B, H, L, D, P = 2, 1, 3, 4, 2
    q, k, v = g(B, H, L, D, seed=111), g(B, H, L, D, seed=112), g(B, H, L, D, seed=113)
    store = g(B, H, P + 4, D, seed=114)            # memory past the prefix holds other values
    pk, pv = store[:, :, :P], store[:, :, 2:2 + P]
    lengths = torch.tensor(bad, dtype=torch.int32, device=DEV)
    try:
        o = pf.prefix_attention(q, k, v, pk, pv, lengths)
    except (ValueError, IndexError) as e:
        assert "prefix_lengths" in str(e)
        return
    clamped = lengths.clamp(0, P)
    close(o, attn64(*[t.double() for t in (q, k, v, pk, pv)], clamped), "o")


# ======================================================================================= lora_embedding
def emb64(ids, w, a, bb, s, es=1.0):
    return es * (w[ids] + s * a[:, ids].movedim(0, -1) @ bb.t())


@pytest.mark.parametrize("case", ["T0", "2x0", "r256_d1", "int32_ids_4d", "weight_t_view"])
def test_lora_embedding_edges(backend, case):
    V, d, r, lead = 11, 5, 3, (2, 3)
    if case == "T0":
        lead = (0,)
    if case == "2x0":
        lead = (2, 0)
    if case == "r256_d1":
        V, d, r = 7, 1, 256
    if case == "int32_ids_4d":
        lead = (2, 2, 1)
    ids = torch.randint(0, V, lead, generator=torch.Generator().manual_seed(5)).to(DEV)
    if case == "int32_ids_4d":
        ids = ids.int()
    w = leaf(g(V, d, seed=121))
    if case == "weight_t_view":
        w = leaf(g(d, V, seed=121)).t()
    a, bb = leaf(g(r, V, seed=122)), leaf(g(d, r, seed=123, scale=r ** -0.5))
    dy = g(*lead, d, seed=124)
    fn = lambda w, a, bb: pf.lora_embedding(ids, w, a, bb, scale=0.5, embed_scale=1.5)
    ref = lambda w, a, bb: emb64(ids.long(), w, a, bb, 0.5, 1.5)
    y = compare(fn, ref, [w, a, bb], ["weight", "lora_A", "lora_B"], dy)
    assert y.shape == (*lead, d) and y.dtype == torch.float32


def test_lora_embedding_bad_ids_raise(backend):
    w, a, bb = g(6, 4, seed=125), g(2, 6, seed=126), g(4, 2, seed=127)
    for ids in (torch.tensor([0, 6]), torch.tensor([-1, 2]), torch.tensor([0.0, 1.0])):
        with pytest.raises((ValueError, IndexError), match="ids"):
            pf.lora_embedding(ids.to(DEV), w, a, bb)


def test_lora_embedding_negative_padding_idx_as_f_embedding(backend):
    """F.embedding (and nn.Embedding) take padding_idx = -1 as the table's last row; the op either does the same
    (no gradient into that row of the table nor that column of A) or refuses it — never a silent difference."""
    V, d, r = 5, 3, 2
    ids = torch.tensor([4, 1, 4, 0], device=DEV)
    w, a, bb = leaf(g(V, d, seed=128)), leaf(g(r, V, seed=129)), leaf(g(d, r, seed=130))
    try:
        y = pf.lora_embedding(ids, w, a, bb, scale=1.0, padding_idx=-1)
    except ValueError as e:
        assert "padding_idx" in str(e)
        return
    gw, ga = torch.autograd.grad(y, [w, a], torch.ones_like(y))
    assert torch.equal(gw[V - 1], torch.zeros(d)), "table row V-1 (padding_idx=-1) got a gradient"
    assert torch.equal(ga[:, V - 1], torch.zeros(r)), "A's column V-1 (padding_idx=-1) got a gradient"


def test_lora_embedding_padding_idx_out_of_table_raises(request, backend):
    """padding_idx >= V: F.embedding refuses it (AssertionError 'Padding_idx must be within num_embeddings')."""
    w, a, bb = g(4, 2, seed=133), g(1, 4, seed=134), g(2, 1, seed=135)
    with pytest.raises((ValueError, IndexError, AssertionError), match="(?i)padding_idx"):
        pf.lora_embedding(torch.tensor([0, 1], device=DEV), w, a, bb, padding_idx=7)


def test_lora_embedding_multi_edges_and_bad_index(backend):
    V, d = 9, 4
    A, B, ranks, scales = _slots(3, V, d, [2, 1, 3])
    w = leaf(g(V, d, seed=131))
    for lead, kind in [((2, 3), "all_minus1"), ((0,), "T0"), ((2, 3), "mixed")]:
        ids = torch.randint(0, V, lead, generator=torch.Generator().manual_seed(6)).to(DEV)
        n = math.prod(lead)
        index = torch.full(lead, -1, device=DEV) if kind != "mixed" else \
            torch.tensor([(t % 4) - 1 for t in range(n)], device=DEV).reshape(lead)
        dy = g(*lead, d, seed=132)

        def fn(w, A, B):
            return pf.lora_embedding_multi(ids, w, LoraSlots(A, B, ranks, scales), index)

        def ref(w, A, B):
            rows = []
            for t, (i, a) in enumerate(zip(ids.reshape(-1).tolist(), index.reshape(-1).tolist())):
                row = w[i]
                if a >= 0:
                    rr = int(ranks[a])
                    row = row + float(scales[a]) * A[a, :rr, i] @ B[a, :, :rr].t()
                rows.append(row)
            return (torch.stack(rows) if rows else w[:0]).reshape(*lead, d)
        compare(fn, ref, [w, A, B], ["weight", "A", "B"], dy)
    ids = torch.zeros(4, dtype=torch.long, device=DEV)
    for bad in (torch.tensor([0, 3, 0, 0]), torch.tensor([0, -2, 0, 0]), torch.zeros(4), torch.zeros(3).long()):
        with pytest.raises((ValueError, IndexError), match="adapter_index"):
            pf.lora_embedding_multi(ids, w, LoraSlots(A, B, ranks, scales), bad.to(DEV))


# =============================================================================================== rms_norm
@pytest.mark.parametrize("case", ["T0", "2x0", "d1", "transposed", "expanded", "weight_strided", "channels_last"])
def test_rms_norm_edges(backend, case):
    d, lead = 7, (3,)
    x = None
    if case in ("T0", "2x0"):
        lead = (0,) if case == "T0" else (2, 0)
    if case == "d1":
        d = 1
    w = leaf(g(d, seed=141))
    if case == "transposed":
        x = leaf(g(d, 3, seed=142)).t()
    elif case == "expanded":
        x = leaf(g(1, d, seed=143)).expand(3, d)
    elif case == "channels_last":
        x = leaf(g(2, d, 3, 2, seed=144)).permute(0, 2, 3, 1)
        lead = (2, 3, 2)
    else:
        x = leaf(g(*lead, d, seed=145))
    if case == "weight_strided":
        w = leaf(g(2 * d, seed=146))[::2]
    dy = g(*lead, d, seed=147)
    tol = 1e-3 if d == 1 else None      # d = 1: dx is ~eps-sized, fp32 noise relative to it
    y = compare(lambda x, w: pf.rms_norm(x, w, 1e-6), lambda x, w: rms64(x, w), [x, w], ["x", "weight"], dy, tol)
    assert y.shape == (*lead, d) and y.dtype == torch.float32


def test_rms_norm_half_x_fp32_weight_and_nan(backend):
    """Output dtype promote(x, weight) as documented; a NaN row stays in its row."""
    x = g(3, 6, dtype=torch.float16, seed=148).clone()
    x[1, 2] = float("nan")
    w = g(6, seed=149)
    y = pf.rms_norm(x, w, 1e-6)
    assert y.dtype == torch.float32
    assert y[1].isnan().all() and y[0].isfinite().all() and y[2].isfinite().all()
    x64 = x.double()
    expected = w.double() * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)).half().double()
    close(y, expected, "y", tol=2e-3)


# ================================================================================================= rotary
@pytest.mark.parametrize("case", ["L0", "batch0", "hf_transposed", "broadcast_cos", "D2"])
def test_apply_rotary_edges(backend, case):
    B, Hq, Hk, L, D, ud = 2, 3, 1, 4, 6, 1
    if case == "L0":
        L = 0
    if case == "batch0":
        B = 0
    if case == "D2":
        D = 2
    q, k = leaf(g(B, Hq, L, D, seed=151)), leaf(g(B, Hk, L, D, seed=152))
    if case == "hf_transposed":     # (B, L, H, D) storage viewed as (B, H, L, D)
        q = leaf(g(B, L, Hq, D, seed=153)).transpose(1, 2)
        k = leaf(g(B, L, Hk, D, seed=154)).transpose(1, 2)
    cb = 1 if case == "broadcast_cos" else B
    cos, sin = g(cb, L, D, seed=155), g(cb, L, D, seed=156)
    dys = [g(B, Hq, L, D, seed=157), g(B, Hk, L, D, seed=158)]

    def ref(q, k):
        c, s = cos.double().unsqueeze(ud), sin.double().unsqueeze(ud)
        return q * c + rot_half(q) * s, k * c + rot_half(k) * s
    qo, ko = compare(lambda q, k: pf.apply_rotary(q, k, cos, sin, ud), ref, [q, k], ["q", "k"], dys)
    assert qo.shape == q.shape and ko.shape == k.shape and qo.is_contiguous() and ko.is_contiguous()


def test_apply_rotary_mixed_dtypes(backend):
    """fp16 q/k with fp32 cos/sin (HF keeps cos/sin in the model dtype, but a user may not): either the values of
    the plain computation (promoted) or a clear error naming the tensor."""
    q, k = g(1, 2, 3, 4, dtype=torch.float16, seed=159), g(1, 2, 3, 4, dtype=torch.float16, seed=160)
    cos, sin = g(1, 3, 4, seed=161), g(1, 3, 4, seed=162)
    try:
        qo, ko = pf.apply_rotary(q, k, cos, sin)
    except ValueError as e:
        assert any(n in str(e) for n in ("cos", "sin", "q", "k"))
        return
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    exp_q = q * c + rot_half(q) * s
    assert qo.dtype == exp_q.dtype
    close(qo, exp_q.double(), "q")


# =============================================================================================== silu_mul
@pytest.mark.parametrize("case", ["T0", "2x0", "F1", "fused_halves", "expanded_up", "channels_last"])
def test_silu_mul_edges(backend, case):
    Fd, lead = 5, (3,)
    if case in ("T0", "2x0"):
        lead = (0,) if case == "T0" else (2, 0)
    if case == "F1":
        Fd = 1
    gate, up = leaf(g(*lead, Fd, seed=171)), leaf(g(*lead, Fd, seed=172))
    if case == "fused_halves":
        both = leaf(g(3, 2 * Fd, seed=173))
        gate, up = both[:, :Fd], both[:, Fd:]
    if case == "expanded_up":
        up = leaf(g(1, Fd, seed=174)).expand(3, Fd)
    if case == "channels_last":
        gate = leaf(g(2, Fd, 3, 2, seed=175)).permute(0, 2, 3, 1)
        up = leaf(g(2, Fd, 3, 2, seed=176)).permute(0, 2, 3, 1)
        lead = (2, 3, 2)
    dy = g(*lead, Fd, seed=177)
    y = compare(pf.silu_mul, lambda a, b: F.silu(a) * b, [gate, up], ["gate", "up"], dy)
    assert y.shape == (*lead, Fd) and y.dtype == torch.float32


def test_silu_mul_mixed_dtypes_and_inf(backend):
    with pytest.raises(ValueError, match="up"):
        pf.silu_mul(g(3, 4, dtype=torch.float16), g(3, 4))
    gate = torch.tensor([[float("-inf"), float("inf"), float("nan"), 0.0]], device=DEV)
    up = torch.tensor([[1.0, 2.0, 1.0, float("inf")]], device=DEV)
    y = pf.silu_mul(gate, up)
    expected = F.silu(gate.double()) * up.double()
    assert torch.equal(y.isnan(), expected.isnan()), (y, expected)
    fin = expected.isfinite()
    assert torch.equal(y[fin].double(), expected[fin]) and torch.equal(y[expected.isinf()].double(),
                                                                        expected[expected.isinf()])


# ========================================================================================== cross entropy
def ce64(h, w, t, bias=None, reduction="mean", ignore_index=-100):
    logits = h @ w.t()
    logits = logits if bias is None else logits + bias
    return F.cross_entropy(logits.reshape(-1, w.shape[0]), t.reshape(-1).long(), ignore_index=ignore_index,
                           reduction=reduction)


@pytest.mark.parametrize("case", ["T0_sum", "T0_mean", "all_ignored", "V1_int32", "transposed_h", "weight_t_view",
                                  "3d_targets"])
def test_linear_cross_entropy_edges(request, backend, case):
    V, d, lead, red = 7, 5, (4,), "mean"
    if case.startswith("T0"):
        lead, red = (0,), case[3:]
    if case == "V1_int32":
        V = 1
    if case == "3d_targets":
        lead = (2, 3)
    h = leaf(g(*lead, d, seed=181))
    if case == "transposed_h":
        h = leaf(g(d, 4, seed=182)).t()
    w = leaf(g(V, d, seed=183, scale=d ** -0.5))
    if case == "weight_t_view":
        w = leaf(g(d, V, seed=183)).t()
    bias = leaf(g(V, seed=184))
    targets = torch.randint(0, V, lead, generator=torch.Generator().manual_seed(7)).to(DEV)
    if case == "V1_int32":
        targets = targets.int()
    if case == "all_ignored":
        targets = torch.full(lead, -100, device=DEV)
    fn = lambda h, w, b: pf.linear_cross_entropy(h, w, targets, reduction=red, bias=b)
    ref = lambda h, w, b: ce64(h, w, targets, b, red)
    loss = fn(h, w, bias)
    loss64 = ref(d64(h), d64(w), d64(bias))
    assert loss.shape == () and loss.dtype == torch.float32
    close(loss, loss64, "loss")
    got = torch.autograd.grad(loss, [h, w, bias])
    hs, ws, bs = d64(h), d64(w), d64(bias)
    exp = torch.autograd.grad(ref(hs, ws, bs), [hs, ws, bs], allow_unused=True)
    for name, gg, ge in zip(["h", "w", "bias"], got, exp):
        ge = torch.zeros_like(gg, dtype=torch.float64) if ge is None else ge.nan_to_num(0.0)
        assert gg.shape == ge.shape
        assert gg.isfinite().all(), f"d{name} not finite"
        close(gg, ge, f"d{name}")


@pytest.mark.parametrize("bad", [[0, 7, 1, 2], [0, -3, 1, 2]], ids=["target_ge_V", "negative_not_ignored"])
def test_linear_cross_entropy_target_out_of_range_raises(backend, bad):
    """torch's cross_entropy refuses a target outside [0, V) other than ignore_index (IndexError / RuntimeError on
    the CPU, a device assert on CUDA): the fused loss must not return a silent finite number instead."""
    h, w = g(4, 5, seed=185), g(7, 5, seed=186)
    targets = torch.tensor(bad, device=DEV)
    with pytest.raises((ValueError, IndexError, RuntimeError)):
        loss = pf.linear_cross_entropy(h, w, targets)
        raise AssertionError(f"no error for targets {bad}: loss {loss.item()}")


def test_linear_cross_entropy_mixed_dtypes_raise(backend):
    h, w = g(4, 5, dtype=torch.float16, seed=187), g(7, 5, seed=188)
    with pytest.raises(ValueError, match="weight"):
        pf.linear_cross_entropy(h, w, torch.zeros(4, dtype=torch.long, device=DEV))
    with pytest.raises(ValueError, match="targets"):
        pf.linear_cross_entropy(h.float(), w, torch.zeros(4, device=DEV))
    with pytest.raises(ValueError, match="targets"):
        pf.linear_cross_entropy(h.float(), w, torch.zeros(3, dtype=torch.long, device=DEV))


# ================================================================================== extra: strides, dtypes, grads
def test_multi_and_grouped_weight_transposed_view_and_fp16_masters(backend):
    """A base weight that is a transposed view (non-contiguous), fp16 x with fp32 stacked masters: the values of
    the fp16-rounded weights and fp32 gradients; only x trainable on the grouped op."""
    d_in, d_out = 7, 5
    A, B, ranks, scales = _slots(2, d_in, d_out, [3, 1])
    x = leaf(g(3, 2, d_in, dtype=torch.float16, seed=191))
    w = g(d_in, d_out, dtype=torch.float16, seed=192, scale=0.4).t()              # (d_out, d_in) view
    index = torch.tensor([[0, -1], [1, 1], [-1, 0]], device=DEV)
    y = pf.lora_linear_multi(x, w, None, LoraSlots(A, B, ranks, scales), index)
    assert y.dtype == torch.float16 and y.shape == (3, 2, d_out)
    close(y, multi64(d64(x), w.double(), None, A.detach().half().double(), B.detach().half().double(), ranks,
                     scales, index), "y")
    ga, gb = torch.autograd.grad(y, [A, B], g(3, 2, d_out, dtype=torch.float16, seed=193))
    assert ga.dtype == gb.dtype == torch.float32
    xs = leaf(g(4, d_in, seed=194))
    ws = [g(d_in, 3, seed=195).t(), g(2, d_in, seed=196)]
    ys = pf.lora_linear_grouped(xs, ws, [None, None], [g(2, d_in, seed=197), None], [g(3, 2, seed=198), None],
                                [0.5, 1.0])
    dys = [g(4, 3, seed=199), g(4, 2, seed=200)]
    (dx,) = torch.autograd.grad(ys, [xs], dys)
    x64 = d64(xs)
    ref = [lora64(x64, ws[0].double(), None, g(2, d_in, seed=197).double(), g(3, 2, seed=198).double(), 0.5),
           x64 @ ws[1].double().t()]
    for y_, r_ in zip(ys, ref):
        close(y_, r_, "y")
    (dx64,) = torch.autograd.grad(ref, [x64], [d.double() for d in dys])
    close(dx, dx64, "dx")
    with pytest.raises(ValueError, match=r"weights\[1\]"):
        pf.lora_linear_grouped(xs.half(), [ws[0].half(), ws[1]], [None, None], [None, None], [None, None], [1.0, 1.0])


@pytest.mark.parametrize("which", ["only_q", "only_prefix", "no_grad"])
def test_prefix_attention_requires_grad_combinations(backend, which):
    B, H, L, D, P = 1, 2, 3, 4, 2
    q, k, v = g(B, H, L, D, seed=201), g(B, H, L, D, seed=202), g(B, H, L, D, seed=203)
    pk, pv = g(B, H, P, D, seed=204), g(B, H, P, D, seed=205)
    rg = {"only_q": (True, False, False, False, False), "only_prefix": (False, False, False, True, True),
          "no_grad": (True,) * 5}[which]
    ins = [leaf(t, f) for t, f in zip((q, k, v, pk, pv), rg)]
    if which == "no_grad":
        with torch.no_grad():
            o = pf.prefix_attention(*ins)
        assert o.grad_fn is None
        close(o, attn64(*[t.double() for t in ins]), "o")
        return
    compare(pf.prefix_attention, attn64, ins, ["q", "k", "v", "pk", "pv"], g(B, H, L, D, seed=206))


@pytest.mark.parametrize("op", ["rms_norm", "silu_mul", "lora_linear"])
def test_fp16_empty_and_single_row(backend, op):
    """fp16 at T = 0 and T = 1 with backward: shapes and dtypes as PyTorch's own ops give."""
    for lead in [(0,), (1,)]:
        x = leaf(g(*lead, 6, dtype=torch.float16, seed=207))
        if op == "rms_norm":
            w = leaf(g(6, dtype=torch.float16, seed=208))
            compare(lambda x, w: pf.rms_norm(x, w, 1e-6), rms64, [x, w], ["x", "w"], g(*lead, 6, seed=209))
        elif op == "silu_mul":
            up = leaf(g(*lead, 6, dtype=torch.float16, seed=210))
            compare(pf.silu_mul, lambda a, b: F.silu(a) * b, [x, up], ["gate", "up"], g(*lead, 6, seed=211))
        else:
            w = g(4, 6, dtype=torch.float16, seed=212, scale=0.4)
            a, bb = leaf(g(256, 6, seed=213, scale=0.4)), leaf(g(4, 256, seed=214, scale=0.06))
            y = pf.lora_linear(x, w, None, a, bb, scale=0.5)
            assert y.dtype == torch.float16 and y.shape == (*lead, 4)
            close(y, lora64(d64(x), w.double(), None, a.detach().half().double(), bb.detach().half().double(), 0.5),
                  "y")
            gx, ga, gb = torch.autograd.grad(y, [x, a, bb], g(*lead, 4, dtype=torch.float16, seed=215))
            assert (gx.dtype, ga.dtype, gb.dtype) == (torch.float16, torch.float32, torch.float32)
            if lead == (0,):
                assert not ga.any() and not gb.any()
