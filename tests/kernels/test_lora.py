"""The fused LoRA kernels against float64 references: fresh random inputs, odd shapes, every dtype,
poisoned outputs, strided inputs, dropout masks shared by forward and backward.

On the CPU these run under TRITON_INTERPRET=1 on small shapes (bf16 is skipped there: the interpreter computes
bf16 dots wrongly); on a GPU the `gpu` tests repeat them at realistic shapes in every dtype.
"""
import pytest
import torch

from ptlm_engine.kernels import lora as K
from tests.helpers import assert_matches

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(not (CUDA or K.INTERPRETED), reason="needs CUDA or TRITON_INTERPRET=1")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])


def _rand(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(DEVICE, dtype)


def _check_case(T, d_in, d_out, r, dtype, bias=True, transposed_w=False, strided_x=False, fuse_shrink=None):
    x = _rand(T, d_in, dtype=dtype)
    if strided_x:  # a non-contiguous view: every other column of a wider buffer
        x = _rand(T, 2 * d_in, dtype=dtype)[:, ::2]
    w = _rand(d_in, d_out, dtype=dtype, scale=d_in ** -0.5).t() if transposed_w else \
        _rand(d_out, d_in, dtype=dtype, scale=d_in ** -0.5)
    a = _rand(r, d_in, dtype=dtype, scale=d_in ** -0.5)
    b = _rand(d_out, r, dtype=dtype, scale=r ** -0.5)
    bvec = _rand(d_out, dtype=dtype) if bias else None
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

    g = _rand(T, d_out, dtype=dtype)
    db = K.lora_weight_grad(g, xa)
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
    y, xa = K.lora_matmul(x, w, a, b, 1.0)
    assert y.shape == (0, 8) and xa.shape == (0, 4)


def _keep_mask(T, n, seed, p):
    """The kernels' Philox keep mask, recovered through the shrink kernel: ones @ I^T with dropout."""
    xa = K.lora_shrink(torch.ones(T, n, device=DEVICE), torch.eye(n, device=DEVICE), 1.0, seed, p)
    return xa * (1.0 - p) > 0.5


def test_dropout_mask_shared_by_forward_and_backward():
    torch.manual_seed(3)
    T, d_in, d_out, r, p = 19, 24, 30, 4, 0.3
    seed = torch.tensor([12345], device=DEVICE)
    keep = _keep_mask(T, d_in, seed, p)
    frac = keep.float().mean().item()
    assert 0.5 < frac < 0.9 and not keep.all()
    assert torch.equal(keep, _keep_mask(T, d_in, seed, p)), "same seed must give the same mask"
    assert not torch.equal(keep, _keep_mask(T, d_in, torch.tensor([999], device=DEVICE), p))

    x, g = _rand(T, d_in, dtype=torch.float32), _rand(T, r, dtype=torch.float32)
    a = _rand(r, d_in, dtype=torch.float32)
    b = _rand(d_out, r, dtype=torch.float32)
    w0 = _rand(d_out, d_in, dtype=torch.float32)
    xa64 = 2.0 * (x.double() * keep / (1 - p)) @ a.double().t()
    assert_matches(K.lora_shrink(x, a, 2.0, seed, p), xa64, None, torch.float32, "shrink with dropout")
    for fuse in (True, False):
        y, xa = K.lora_matmul(x, w0, a, b, 2.0, None, seed, x_dropout=p, fuse_shrink=fuse)
        assert_matches(xa, xa64, None, torch.float32, f"forward xa with dropout, fused={fuse}")
        assert_matches(y, x.double() @ w0.double().t() + xa64 @ b.double().t(), None, torch.float32, "y")
    # backward dA^T = (keep * x)^T g  and  dx's LoRA part = keep * (g A), with g = c * dy B from the same pass
    da_t = K.lora_weight_grad(x, g, seed, p)
    assert_matches(da_t, (x.double() * keep).t() @ g.double(), None, torch.float32, "weight grad with dropout")
    dy = _rand(T, d_out, dtype=torch.float32)
    for fuse in (True, False):
        dx, g2 = K.lora_matmul(dy, w0.t(), b.t(), a.t(), 3.0, None, seed, out_dropout=p, fuse_shrink=fuse)
        g64 = 3.0 * dy.double() @ b.double()
        assert_matches(g2, g64, None, torch.float32, "g")
        dx64 = dy.double() @ w0.double() + keep * (g64 @ a.double())
        assert_matches(dx, dx64, None, torch.float32, f"dx with dropout, fused={fuse}")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T", [1, 61, 2049])
@pytest.mark.parametrize("d_in,d_out,r", [(4096, 4096, 16), (1000, 3001, 256)])
def test_kernels_realistic_shapes(T, d_in, d_out, r, dtype):
    torch.manual_seed(T + r)
    _check_case(T, d_in, d_out, r, dtype)
