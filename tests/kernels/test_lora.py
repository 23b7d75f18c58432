"""The fused LoRA kernels against float64 references: fresh random inputs, odd shapes, every dtype,
poisoned outputs, strided inputs, dropout masks shared by forward and backward.

On the CPU these run under TRITON_INTERPRET=1 on small shapes (bf16 is skipped there: the interpreter computes
bf16 dots wrongly); on a GPU the `gpu` tests repeat them at realistic shapes in every dtype.
"""
import pytest
import torch
import triton

from ptlm_engine.kernels import lora as K
from ptlm_engine.kernels.split_state import split_state
from tests.helpers import CUDA, DEVICE, DTYPES, assert_matches, needs_triton, rand, record_launches

pytestmark = needs_triton


def _check_case(T, d_in, d_out, r, dtype, bias=True, transposed_w=False, strided_x=False, fuse_shrink=None):
    x = rand(T, d_in, dtype=dtype)
    if strided_x:  # a non-contiguous view: every other column of a wider buffer
        x = rand(T, 2 * d_in, dtype=dtype)[:, ::2]
    w = rand(d_in, d_out, dtype=dtype, scale=d_in ** -0.5).t() if transposed_w else \
        rand(d_out, d_in, dtype=dtype, scale=d_in ** -0.5)
    a = rand(r, d_in, dtype=dtype, scale=d_in ** -0.5)
    b = rand(d_out, r, dtype=dtype, scale=r ** -0.5)
    bvec = rand(d_out, dtype=dtype) if bias else None
    scale = 1.7

    xa = K.lora_shrink(x, a, scale)
    xa64 = scale * x.double() @ a.double().t()
    assert xa.dtype == torch.float32 and xa.shape == (T, r)
    assert_matches(xa, xa64, scale * (x @ a.t()), dtype, "shrink")

    y = torch.full((T, d_out), float("nan"), device=DEVICE, dtype=dtype)    # poisoned: every element must be written
    if fuse_shrink is None or r <= K.MAX_FUSED_RANK:
        _, xa_m = K.lora_matmul(x, w, a, b, scale, bvec, fuse_shrink=fuse_shrink, out=y)
        y64 = x.double() @ w.double().t() + xa64 @ b.double().t() + (bvec.double() if bias else 0)
        y_torch = x @ w.t() + (xa.to(dtype) @ b.t()) + (bvec if bias else 0)
        assert_matches(y, y64, y_torch, dtype, "matmul")
        assert_matches(xa_m, xa64, scale * (x @ a.t()), dtype, "matmul's xa")

    g = rand(T, d_out, dtype=dtype)
    db = K.lora_weight_grads(g, xa)[0]
    db64 = g.double().t() @ xa64
    assert_matches(db, db64, g.t() @ xa.to(dtype), dtype, "weight grad")


@pytest.mark.parametrize("fuse_shrink", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,d_in,d_out,r", [(1, 37, 29, 1), (13, 45, 53, 5), (70, 33, 47, 17), (5, 19, 21, 40),
                                            (3, 21, 18, 90)])
def test_kernels_odd_shapes(T, d_in, d_out, r, dtype, fuse_shrink):
    torch.manual_seed(T * 1000 + r)
    _check_case(T, d_in, d_out, r, dtype, fuse_shrink=fuse_shrink)


@pytest.mark.parametrize("dtype", [torch.float32], ids=str)
def test_kernels_strided_and_transposed(dtype):
    torch.manual_seed(1)
    _check_case(23, 31, 27, 3, dtype, bias=False, transposed_w=True, strided_x=True)


def test_empty_token_dimension():
    x = torch.empty(0, 16, device=DEVICE)
    a, b, w = torch.randn(4, 16, device=DEVICE), torch.randn(8, 4, device=DEVICE), torch.randn(8, 16, device=DEVICE)
    assert K.lora_shrink(x, a, 1.0).shape == (0, 4)
    da_t, db = K.lora_weight_grads(x, torch.empty(0, 4, device=DEVICE), torch.empty(0, 8, device=DEVICE),
                                   torch.empty(0, 4, device=DEVICE))
    assert da_t.shape == (16, 4) and db.shape == (8, 4) and not da_t.any() and not db.any()
    y, xa = K.lora_matmul(x, w, a, b, 1.0)
    assert y.shape == (0, 8) and xa.shape == (0, 4)


@pytest.mark.parametrize("split", [1, 3])
def test_split_outputs_are_zeroed_only_for_split_configs(split, monkeypatch):
    """The shrink and weight-grad outputs skip their memset once the key's config is known not to split; a
    config that splits (atomics into the output) still gets a zeroed one. torch.empty is poisoned."""
    torch.manual_seed(5)
    T, n, r = 37, 40, 5
    x, a, g = (rand(*shape, dtype=torch.float32) for shape in ((T, n), (r, n), (T, n)))
    xa = K.lora_shrink(x, a, 1.5)                                # the keys' configs are known from here on
    K.lora_weight_grads(g, xa)
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *shape, **kw: empty(*shape, **kw).fill_(float("nan")))
    cases = ((K._lora_shrink, "SPLIT_K", lambda: K.lora_shrink(x, a, 1.5), x.double() @ a.double().t() * 1.5),
             (K._lora_weight_grad, "SPLIT_T", lambda: K.lora_weight_grads(g, xa)[0], g.double().t() @ xa.double()))
    for launcher, split_name, call, ref in cases:
        for key, (meta, pre_hook) in list(launcher.configs.items()):   # this call's key among earlier tests'
            monkeypatch.setitem(launcher.configs, key, ({**meta, split_name: split}, pre_hook))
        out = call()
        assert torch.allclose(out.double(), ref, rtol=1e-4, atol=1e-4), launcher.name


def _keep_mask(T, n, seed, p):
    """The kernels' Philox keep mask, recovered through the shrink kernel: ones @ I^T with dropout."""
    xa = K.lora_shrink(torch.ones(T, n, device=DEVICE), torch.eye(n, device=DEVICE), 1.0, seed, p)
    return xa * (1.0 - p) > 0.5


def test_dropout_mask_statistics():
    """The hashed keep mask: drop rates within 5 sigma of p; neighbouring elements along rows and columns, and
    the masks of consecutive seeds, uncorrelated (|r| within 6 sigma of 0)."""
    T, n = 96, 160
    for p in (0.05, 0.3):
        masks = [_keep_mask(T, n, torch.tensor([s], device=DEVICE), p).double() for s in (7, 8)]
        for keep in masks:
            assert abs(1 - keep.mean().item() - p) < 5 * (p * (1 - p) / keep.numel()) ** 0.5
        pairs = {"columns": (masks[0][:, 1:], masks[0][:, :-1]), "rows": (masks[0][1:], masks[0][:-1]),
                 "seeds": masks}
        for name, (a, b) in pairs.items():
            r = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()
            assert abs(r) < 6 / a.numel() ** 0.5, (p, name, r)


def test_dropout_mask_shared_by_forward_and_backward():
    torch.manual_seed(3)
    T, d_in, d_out, r, p = 19, 24, 30, 4, 0.3
    seed = torch.tensor([12345], device=DEVICE)
    keep = _keep_mask(T, d_in, seed, p)
    frac = keep.float().mean().item()
    assert 0.5 < frac < 0.9 and not keep.all()
    assert torch.equal(keep, _keep_mask(T, d_in, seed, p)), "same seed must give the same mask"
    assert not torch.equal(keep, _keep_mask(T, d_in, torch.tensor([999], device=DEVICE), p))

    x, g = rand(T, d_in, dtype=torch.float32), rand(T, r, dtype=torch.float32)
    a = rand(r, d_in, dtype=torch.float32)
    b = rand(d_out, r, dtype=torch.float32)
    w0 = rand(d_out, d_in, dtype=torch.float32)
    xa64 = 2.0 * (x.double() * keep / (1 - p)) @ a.double().t()
    assert_matches(K.lora_shrink(x, a, 2.0, seed, p), xa64, None, torch.float32, "shrink with dropout")
    for fuse in (True, False):
        y, xa = K.lora_matmul(x, w0, a, b, 2.0, None, seed, x_dropout=p, fuse_shrink=fuse)
        assert_matches(xa, xa64, None, torch.float32, f"forward xa with dropout, fused={fuse}")
        assert_matches(y, x.double() @ w0.double().t() + xa64 @ b.double().t(), None, torch.float32, "y")
    # backward dA^T = (keep * x)^T g  and  dx's LoRA part = keep * (g A), with g = c * dy B from the same pass
    da_t = K.lora_weight_grads(x, g, seed=seed, dropout=p)[0]
    assert_matches(da_t, (x.double() * keep).t() @ g.double(), None, torch.float32, "weight grad with dropout")
    dy = rand(T, d_out, dtype=torch.float32)
    # the backward's pair in one launch: the mask applies to the first (x) only, dB = dy^T xa has none
    da_t2, db = K.lora_weight_grads(x, g, dy, xa64.float(), seed, p)
    assert_matches(da_t2, (x.double() * keep).t() @ g.double(), None, torch.float32, "paired dA^T")
    assert_matches(db, dy.double().t() @ xa64, None, torch.float32, "paired dB")
    da, _ = K.lora_weight_grads(x, g, dy, xa64.float(), seed, p, rank_major=True)    # lora_A's layout
    assert da.shape == (r, d_in) and da.is_contiguous()
    torch.testing.assert_close(da, da_t2.t(), rtol=1e-5, atol=1e-5)
    for fuse in (True, False):
        dx, g2 = K.lora_matmul(dy, w0.t(), b.t(), a.t(), 3.0, None, seed, out_dropout=p, fuse_shrink=fuse)
        g64 = 3.0 * dy.double() @ b.double()
        assert_matches(g2, g64, None, torch.float32, "g")
        dx64 = dy.double() @ w0.double() + keep * (g64 @ a.double())
        assert_matches(dx, dx64, None, torch.float32, f"dx with dropout, fused={fuse}")


# ------------------------------------------------------------------------------------------ decode kernel
@pytest.fixture(params=[1, 3], ids=["unsplit", "split3"])
def decode_split(request, monkeypatch):
    """Runs a test with the decode kernel's K split 1 or 3 ways (the config list replaced, the launcher's cache
    emptied): the split path sums partials through the arrival counters, the unsplit one does not."""
    meta = {**K._lora_decode.autotuner.configs[0].kwargs, "SPLIT_K": request.param}
    monkeypatch.setattr(K._lora_decode.autotuner, "configs", [triton.Config(meta, num_warps=4, num_stages=1)])
    monkeypatch.setattr(K._lora_decode, "configs", {})
    return request.param


def _keep(T, n, seed, p):
    return _keep_mask(T, n, seed, p) if p > 0.0 else torch.ones(T, n, dtype=torch.bool, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,d_in,d_out,r,p", [(1, 37, 29, 1, 0.0), (13, 45, 70, 5, 0.25), (64, 70, 33, 17, 0.0),
                                              (5, 19, 21, 40, 0.1)])
def test_decode_forward_and_backward(T, d_in, d_out, r, p, dtype, decode_split):
    """Decode rows: the forward (y, xa) and the one-launch backward (dx, dA^T, dB) against float64, with
    dropout masks shared between them, a strided x and a transposed W0, on poisoned outputs."""
    _check_decode(T, d_in, d_out, r, p, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T,d_in,d_out,r,p", [(1, 4096, 4096, 16, 0.0), (16, 4096, 11008, 16, 0.1),
                                              (64, 11008, 4096, 64, 0.0), (37, 1000, 3001, 5, 0.05)])
def test_decode_realistic_shapes(T, d_in, d_out, r, p, dtype, decode_split):
    """The split path's arrival counters and partials on a GPU (the interpreter runs programs one after
    another): every output against float64, and a second launch equal to the first, bit for bit."""
    _check_decode(T, d_in, d_out, r, p, dtype)
    x, w0, a, b = _lora_inputs(T, d_in, d_out, r, dtype)
    first, _ = K.lora_matmul(x, w0, a, b, 1.0)
    assert torch.equal(first, K.lora_matmul(x, w0, a, b, 1.0)[0])
    assert not split_state(x.device, 1, 0)[0].any()


def _check_decode(T, d_in, d_out, r, p, dtype):
    torch.manual_seed(T * 100 + r)
    seed = torch.tensor([777], device=DEVICE)
    x = rand(T, 2 * d_in, dtype=dtype)[:, ::2]                                    # strided (T, d_in) view
    w0 = rand(d_in, d_out, dtype=dtype, scale=d_in ** -0.5).t()                     # (d_out, d_in), transposed
    a, b = rand(r, d_in, dtype=dtype, scale=d_in ** -0.5), rand(d_out, r, dtype=dtype, scale=r ** -0.5)
    bias = rand(d_out, dtype=dtype)
    keep = _keep(T, d_in, seed, p)
    y = torch.full((T, d_out), float("nan"), device=DEVICE, dtype=dtype)
    _, xa = K.lora_matmul(x, w0, a, b, 1.5, bias, seed, x_dropout=p, out=y)
    xa64 = 1.5 / (1 - p) * (x.double() * keep) @ a.double().t()
    y64 = x.double() @ w0.double().t() + xa64 @ b.double().t() + bias.double()
    assert_matches(xa, xa64, 1.5 / (1 - p) * (x * keep) @ a.t(), dtype, "decode xa")
    assert_matches(y, y64, x @ w0.t() + (xa.to(dtype) @ b.t()) + bias, dtype, "decode y")

    dy = rand(T, d_out, dtype=dtype)
    dx, da, db = K.lora_decode_backward(dy, x, xa, w0, a, b, 2.0, seed, p)
    g64 = 2.0 * dy.double() @ b.double()
    g = (2.0 * dy @ b).float()
    assert_matches(dx, dy.double() @ w0.double() + keep * (g64 @ a.double()),
                   dy @ w0 + keep * (g.to(dtype) @ a), dtype, "decode dx")
    assert_matches(da, g64.t() @ (x.double() * keep), g.to(dtype).t() @ (x * keep), dtype, "decode dA")
    assert_matches(db, dy.double().t() @ xa.double(), dy.t() @ xa.to(dtype), dtype, "decode dB")
    # in the adapters' own layouts and dtypes: no cast, and no copy when autograd stores them as .grad
    assert da.shape == a.shape and da.is_contiguous() and db.is_contiguous() and da.dtype == db.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES[:2], ids=str)
@pytest.mark.parametrize("T,d_in,d_out,r,p", [(1, 37, 29, 1, 0.0), (13, 45, 70, 5, 0.25), (64, 70, 33, 17, 0.0),
                                              (5, 19, 21, 40, 0.1)])
def test_decode_forward_shrink_programs(T, d_in, d_out, r, p, dtype, decode_split, monkeypatch):
    """The forward's shrink on the launch's own first programs (SHRINK_PROGRAMS: K steps of 16, one a program,
    2 to 5 of them), the split-0 programs waiting for their xa; counters zero after it."""
    import triton.language as tl
    monkeypatch.setattr(K, "SHRINK_PROGRAMS", True)
    monkeypatch.setattr(K, "SHRINK_BLOCK_K", tl.constexpr(16))       # the interpreter reads globals per call
    monkeypatch.setattr(K, "SHRINK_K_STEPS", 1)
    _check_decode(T, d_in, d_out, r, p, dtype)
    assert any("shrink" in key for key in K._lora_decode.configs)   # the forward took them
    assert not split_state(torch.device(DEVICE), 1, 0)[0].any()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T,d_in,d_out,r,p", [(1, 4096, 4096, 16, 0.0), (16, 4096, 11008, 16, 0.1),
                                              (64, 11008, 4096, 64, 0.0)])
def test_decode_forward_shrink_programs_realistic(T, d_in, d_out, r, p, dtype, decode_split, monkeypatch):
    """The shrink programs' counters and waits on a GPU (the interpreter runs programs one after another)."""
    monkeypatch.setattr(K, "SHRINK_PROGRAMS", True)
    _check_decode(T, d_in, d_out, r, p, dtype)
    x, w0, a, b = _lora_inputs(T, d_in, d_out, r, dtype)
    first, _ = K.lora_matmul(x, w0, a, b, 1.0)
    assert torch.equal(first, K.lora_matmul(x, w0, a, b, 1.0)[0])
    assert not split_state(x.device, 1, 0)[0].any()


def test_decode_split_counters_are_zero_after_each_launch(decode_split):
    """The split path's last program per column block zeroes its counter: back-to-back launches (as in a CUDA
    graph replay) start from zero and give the same result."""
    torch.manual_seed(2)
    x, w0, a, b = _lora_inputs(7, 50, 90, 6, torch.float32)
    first, _ = K.lora_matmul(x, w0, a, b, 1.0)
    again, _ = K.lora_matmul(x, w0, a, b, 1.0)
    assert torch.equal(first, again)
    assert not split_state(x.device, 1, 0)[0].any()


def test_decode_float32_adapters_on_a_half_base(decode_split):
    """fp32 master adapters on an fp16 base at decode: read as they are in the kernel, gradients in fp32."""
    torch.manual_seed(4)
    T, d_in, d_out, r = 9, 33, 41, 8
    x, w0 = rand(T, d_in, dtype=torch.float16), rand(d_out, d_in, dtype=torch.float16, scale=d_in ** -0.5)
    a, b = rand(r, d_in, dtype=torch.float32, scale=d_in ** -0.5), rand(d_out, r, dtype=torch.float32)
    y, xa = K.lora_matmul(x, w0, a, b, 0.5)
    xa64 = 0.5 * x.double() @ a.half().double().t()                   # the shrink reads A as x's dtype
    assert_matches(y, x.double() @ w0.double().t() + xa64 @ b.double().t(), None, torch.float16, "y")
    dy = rand(T, d_out, dtype=torch.float16)
    dx, da, db = K.lora_decode_backward(dy, x, xa, w0, a, b, 0.5)
    g64 = 0.5 * dy.double() @ b.half().double()
    assert_matches(dx, dy.double() @ w0.double() + g64 @ a.double(), None, torch.float16, "dx")
    assert_matches(da, g64.t() @ x.double(), None, torch.float16, "dA")
    assert_matches(db, dy.double().t() @ xa.double(), None, torch.float16, "dB")
    assert da.dtype == db.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T", [1, 61, 2049])
@pytest.mark.parametrize("d_in,d_out,r", [(4096, 4096, 16), (1000, 3001, 256)])
def test_kernels_realistic_shapes(T, d_in, d_out, r, dtype):
    torch.manual_seed(T + r)
    _check_case(T, d_in, d_out, r, dtype)


# ------------------------------------------------------------------------------- Hopper TMA prefill path
HOPPER = CUDA and torch.cuda.get_device_capability()[0] >= 9
# The forced TMA path runs under the interpreter (fp32 too) and, compiled, on Hopper in 16-bit dtypes only.
needs_tma = pytest.mark.skipif(not (K.INTERPRETED or HOPPER), reason="needs TRITON_INTERPRET=1 or a Hopper GPU")
TMA_DTYPES = [torch.float32, torch.float16] if K.INTERPRETED else [torch.float16, torch.bfloat16]


@pytest.fixture
def tma_launches(monkeypatch):
    """Forces the TMA matmul (K.TMA_PREFILL = True: any T and dtype, also under the interpreter); a call of the
    returned function counts its launches so far, so each test can tell which path ran."""
    monkeypatch.setattr(K, "TMA_PREFILL", True)
    launched = record_launches(monkeypatch)
    return lambda: launched.count(K._lora_matmul_tma)


def _lora_inputs(T, d_in, d_out, r, dtype, transposed_w=False):
    x = rand(T, d_in, dtype=dtype)
    w = rand(d_in, d_out, dtype=dtype, scale=d_in ** -0.5).t() if transposed_w else \
        rand(d_out, d_in, dtype=dtype, scale=d_in ** -0.5)
    return x, w, rand(r, d_in, dtype=dtype, scale=d_in ** -0.5), rand(d_out, r, dtype=dtype, scale=r ** -0.5)


# 40 / 72 / 24 columns are odd tile counts but 16-byte aligned rows in fp16 and fp32 (TMA's rule); r = 24
# takes two 16-wide LoRA steps, the second zero-padded by the descriptor.
@needs_tma
@pytest.mark.parametrize("dtype", TMA_DTYPES, ids=str)
@pytest.mark.parametrize("T,d_in,d_out,r,bias,transposed_w", [(77, 40, 72, 8, True, False),
                                                              (45, 72, 40, 24, False, True)])
def test_tma_matmul_forward(T, d_in, d_out, r, bias, transposed_w, dtype, tma_launches):
    torch.manual_seed(T + r)
    x, w, a, b = _lora_inputs(T, d_in, d_out, r, dtype, transposed_w)
    bvec = rand(d_out, dtype=dtype) if bias else None
    y = torch.full((T, d_out), float("nan"), device=DEVICE, dtype=dtype)    # poisoned: every element must be written
    _, xa = K.lora_matmul(x, w, a, b, 1.7, bvec, fuse_shrink=False, out=y)
    assert tma_launches() == 1
    xa64 = 1.7 * x.double() @ a.double().t()
    y64 = x.double() @ w.double().t() + xa64 @ b.double().t() + (bvec.double() if bias else 0)
    y_torch = x @ w.t() + (xa.to(dtype) @ b.t()) + (bvec if bias else 0)
    assert_matches(y, y64, y_torch, dtype, "TMA matmul")
    # a second call launches the cached config directly: its pre_hook must set the block shapes again
    y2 = torch.full_like(y, float("nan"))
    K.lora_matmul(x, w, a, b, 1.7, bvec, fuse_shrink=False, out=y2)
    assert tma_launches() == 2 and torch.equal(y2, y)


@needs_tma
def test_tma_path_leaves_broadcast_rows_to_the_pointer_kernel(tma_launches):
    """A row-broadcast operand (row stride 0: the dy of a loss summed over expanded rows, say) is no TMA layout:
    the pointer kernel takes the call, with the same result."""
    dtype = TMA_DTYPES[0]
    torch.manual_seed(5)
    x, w, a, b = _lora_inputs(1, 40, 72, 8, dtype)
    rows = x.expand(77, 40)
    assert K._tma_layout(rows, False) is None and K._tma_layout(x, False) is not None
    y, _ = K.lora_matmul(rows, w, a, b, 0.5, fuse_shrink=False)
    assert not tma_launches()
    y64 = rows.double() @ w.double().t() + 0.5 * (rows.double() @ a.double().t()) @ b.double().t()
    assert_matches(y, y64, None, dtype, "broadcast rows")


@needs_tma
@pytest.mark.parametrize("dtype", TMA_DTYPES, ids=str)
def test_tma_matmul_backward_layout_with_output_dropout(dtype, tma_launches):
    """dx = dy @ W0 + keep * (g @ A): W0 and A reach the kernel transposed (N-contiguous descriptors)."""
    torch.manual_seed(4)
    T, d_in, d_out, r, p = 70, 40, 72, 8, 0.3
    seed = torch.tensor([2024], device=DEVICE)
    _, w0, a, b = _lora_inputs(T, d_in, d_out, r, dtype)
    dy = rand(T, d_out, dtype=dtype)
    dx = torch.full((T, d_in), float("nan"), device=DEVICE, dtype=dtype)
    _, g = K.lora_matmul(dy, w0.t(), b.t(), a.t(), 3.0, None, seed, out_dropout=p, fuse_shrink=False, out=dx)
    assert tma_launches() == 1
    keep = _keep_mask(T, d_in, seed, p)
    g64 = 3.0 * dy.double() @ b.double()
    dx64 = dy.double() @ w0.double() + keep * (g64 @ a.double())
    assert_matches(dx, dx64, dy @ w0 + keep * (g.to(dtype) @ a), dtype, "TMA dx with dropout")


@needs_tma
def test_tma_matmul_float32_adapters_on_a_half_base(tma_launches):
    """float32 master adapters with fp16 x and W0: forward (B as is) and dx (A^T as the expand's operand, B^T
    shrunk against dy) on the TMA path, each within fp16's own error."""
    torch.manual_seed(9)
    T, d_in, d_out, r = 77, 40, 72, 8
    x, w, a, b = _lora_inputs(T, d_in, d_out, r, torch.float16)
    a, b = a.float(), b.float()
    y = torch.full((T, d_out), float("nan"), device=DEVICE, dtype=torch.float16)
    _, xa = K.lora_matmul(x, w, a, b, 1.7, fuse_shrink=False, out=y)
    y64 = x.double() @ w.double().t() + 1.7 * (x.double() @ a.double().t()) @ b.double().t()
    assert_matches(y, y64, x @ w.t() + 1.7 * ((x @ a.half().t()) @ b.half().t()), torch.float16, "y")
    dy = rand(T, d_out, dtype=torch.float16)
    dx, g = K.lora_matmul(dy, w.t(), b.t(), a.t(), 2.0)
    dx64 = dy.double() @ w.double() + 2.0 * (dy.double() @ b.double()) @ a.double()
    assert_matches(dx, dx64, dy @ w + 2.0 * ((dy @ b.half()) @ a.half()), torch.float16, "dx")
    assert tma_launches() == 2


@needs_tma
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_tma_path_runs_the_ops_forward_and_backward(fan_in_fan_out, tma_launches):
    """The op at T > DECODE_MAX_T (separate shrink): forward and the backward's dx both take the TMA path."""
    from ptlm_engine import reference
    from ptlm_engine.functional import lora_linear
    torch.manual_seed(6)
    dtype, T, d_in, d_out, r = torch.float16, K.DECODE_MAX_T + 3, 72, 40, 8
    x, w, a, b = _lora_inputs(T, d_in, d_out, r, dtype, transposed_w=fan_in_fan_out)
    w = w.t().contiguous() if fan_in_fan_out else w                                 # Conv1D layout (d_in, d_out)
    bvec = rand(d_out, dtype=dtype)
    dy = rand(T, d_out, dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (x, a, b)]
    y = lora_linear(leaves[0], w, bvec, leaves[1], leaves[2], scale=1.5, fan_in_fan_out=fan_in_fan_out)
    y.backward(dy)
    assert tma_launches() == 2
    leaves64 = [t.double().requires_grad_() for t in (x, a, b)]
    y64 = reference.lora_linear(leaves64[0], w.double(), bvec.double(), leaves64[1], leaves64[2], 1.5,
                                fan_in_fan_out=fan_in_fan_out)
    y64.backward(dy.double())
    assert_matches(y, y64, None, dtype, "y")
    for name, leaf, leaf64 in zip(["dx", "dA", "dB"], leaves, leaves64):
        assert_matches(leaf.grad, leaf64.grad, None, dtype, name)


@pytest.mark.parametrize("T,d_in,d_out,r", [(70, 37, 40, 8),    # x's rows: 74 bytes, not 16-byte aligned
                                            (70, 40, 40, 5)])   # xa's rows (fp32): 20 bytes
def test_tma_path_falls_back_on_unaligned_operands(T, d_in, d_out, r, tma_launches):
    torch.manual_seed(d_in + r)
    x, w, a, b = _lora_inputs(T, d_in, d_out, r, torch.float16)
    y = torch.full((T, d_out), float("nan"), device=DEVICE, dtype=torch.float16)
    K.lora_matmul(x, w, a, b, 0.5, None, fuse_shrink=False, out=y)
    assert not tma_launches()
    y64 = x.double() @ w.double().t() + 0.5 * (x.double() @ a.double().t()) @ b.double().t()
    assert_matches(y, y64, x @ w.t() + 0.5 * (x @ a.t()) @ b.t(), torch.float16, "fallback matmul")


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER or K.INTERPRETED, reason="needs a Hopper GPU (TMA), compiled")
@pytest.mark.parametrize("d_in,d_out", [(4096, 4096), (4096, 11008)])
def test_tma_path_is_automatic_on_hopper_bf16(d_in, d_out, monkeypatch):
    """TMA_PREFILL unset: a prefill-sized bf16 call takes the TMA path by itself, forward and dx layouts."""
    launches = []
    launch = K._lora_matmul_tma.launch
    monkeypatch.setattr(K._lora_matmul_tma, "launch", lambda *a, **kw: launches.append(1) or launch(*a, **kw))
    torch.manual_seed(7)
    dtype, T, r = torch.bfloat16, 4093, 16
    x, w, a, b = _lora_inputs(T, d_in, d_out, r, dtype)
    bvec = rand(d_out, dtype=dtype)
    y = torch.full((T, d_out), float("nan"), device=DEVICE, dtype=dtype)
    _, xa = K.lora_matmul(x, w, a, b, 2.0, bvec, out=y)
    y64 = x.double() @ w.double().t() + (xa.double() @ b.double().t()) + bvec.double()
    assert_matches(y, y64, x @ w.t() + xa.to(dtype) @ b.t() + bvec, dtype, "bf16 TMA matmul")
    dy = rand(T, d_out, dtype=dtype)
    dx, g = K.lora_matmul(dy, w.t(), b.t(), a.t(), 2.0)
    dx64 = dy.double() @ w.double() + g.double() @ a.double()
    assert_matches(dx, dx64, dy @ w + g.to(dtype) @ a, dtype, "bf16 TMA dx")
    assert len(launches) == 2 and K.tma_error is None


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER or K.INTERPRETED, reason="needs a Hopper GPU (griddepcontrol, TMA)")
def test_dependent_tma_matmul_matches_ordinary_launches(monkeypatch, unsplit_shrinks):
    """The TMA matmul launched as its shrink's programmatic dependent (configs.PDL) gives what ordinary launches
    give, bit for bit: forward and dx, eager and replayed from a CUDA graph on new inputs; also the grouped
    forward, whose first member's GEMM follows the shared shrink (shrinks unsplit: see unsplit_shrinks)."""
    from ptlm_engine.kernels import configs
    from ptlm_engine.kernels import lora_grouped as G
    torch.manual_seed(17)
    dtype, T, d, r = torch.bfloat16, 1024, 4096, 16
    x, w, a, b = _lora_inputs(T, d, d, r, dtype)
    dy = rand(T, d, dtype=dtype)

    def run(dependent):
        monkeypatch.setattr(configs, "PDL", dependent)
        y, _ = K.lora_matmul(x, w, a, b, 2.0)
        dx, _ = K.lora_matmul(dy, w.t(), b.t(), a.t(), 2.0)
        ys, _ = G.lora_grouped_matmul(x, [w, w[:1024]], [a, a], [b, b[:1024]], [2.0, 2.0])
        return torch.cat([y, dx, *ys], 1)

    want = run(False)
    assert torch.equal(run(True), want)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = run(True)
    x.copy_(rand(T, d, dtype=dtype))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got, run(False))


@pytest.mark.parametrize("T", [5, 80], ids=["decode", "prefill"])
def test_matmul_with_a_given_shrink(T):
    """lora_matmul(xa=...) takes a caller's shrink result (the grouped backward's) instead of running one."""
    torch.manual_seed(T)
    x, w0, a, b = _lora_inputs(T, 33, 41, 8, torch.float32)
    xa = K.lora_shrink(x, a, 0.5)
    y, xa_out = K.lora_matmul(x, w0, a, b, 0.5, xa=xa)
    assert xa_out is xa
    assert_matches(y, x.double() @ w0.double().t() + xa.double() @ b.double().t(), None, torch.float32, "y")
    with pytest.raises(ValueError, match="no given xa"):
        K.lora_matmul(x, w0, a, b, 0.5, xa=xa, fuse_shrink=True)


@pytest.mark.parametrize("T,tma", [(5, False), (80, False), (77, True)], ids=["decode", "prefill", "tma"])
def test_matmul_accumulates_into_its_output(T, tma, monkeypatch):
    """accumulate=True adds the product to out's values in the kernel's epilogue (the grouped backward's dx
    sum): the key's first call (its config still tuning) through a temporary, later calls in the kernel; the
    decode backward likewise into a given dx."""
    monkeypatch.setattr(K, "TMA_PREFILL", True if tma else None)
    torch.manual_seed(T)
    x, w0, a, b = _lora_inputs(T, 40, 72, 8, torch.float32)
    xa = K.lora_shrink(x, a, 0.5)
    base = rand(T, 72, dtype=torch.float32)
    ref = x.double() @ w0.double().t() + xa.double() @ b.double().t()
    for _ in range(2):
        y = base.clone()
        out, _ = K.lora_matmul(x, w0, a, b, 0.5, xa=xa, out=y, accumulate=True)
        assert out is y
        assert_matches(y, base.double() + ref, None, torch.float32, "accumulated y")
    if T <= K.DECODE_MAX_T:
        dy = rand(T, 72, dtype=torch.float32)
        dx0, da0, db0 = K.lora_decode_backward(dy, x, xa, w0, a, b, 0.5)
        for _ in range(2):
            dx = base[:, :40].clone()
            dx1, da1, db1 = K.lora_decode_backward(dy, x, xa, w0, a, b, 0.5, dx=dx)
            assert dx1 is dx and torch.equal(da1, da0) and torch.equal(db1, db0)
            assert_matches(dx, base[:, :40].double() + dx0.double(), None, torch.float32, "accumulated dx")
    with pytest.raises(ValueError, match="accumulate"):
        K.lora_matmul(x, w0, a, b, 0.5, accumulate=True)


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU")
@pytest.mark.parametrize("T", [16, 1024])
def test_accumulating_dx_at_realistic_shapes(T):
    """The grouped backward's dx sum on the card: the TMA (T = 1024) and decode (T = 16) epilogues adding into
    their output, bf16, a key's first and later calls."""
    torch.manual_seed(T)
    x, w0, a, b = _lora_inputs(T, 4096, 4096, 16, torch.bfloat16)
    xa = K.lora_shrink(x, a, 0.5)
    base = rand(T, 4096, dtype=torch.bfloat16)
    ref = base.double() + x.double() @ w0.double().t() + xa.double() @ b.double().t()
    lowp = base + (x @ w0.t() + xa.to(torch.bfloat16) @ b.t())
    for _ in range(2):
        y = base.clone()
        K.lora_matmul(x, w0, a, b, 0.5, xa=xa, out=y, accumulate=True)
        assert_matches(y, ref, lowp, torch.bfloat16, "accumulated y")
