"""The RMSNorm kernels against float64 references: forward (y, rstd) and backward (dx, with and without dweight),
odd shapes, several rows per program, rows up to MAX_D, strided rows, a weight of another dtype, poisoned outputs.

On the CPU these run under TRITON_INTERPRET=1 (bf16 is skipped there: the interpreter computes bf16 wrongly); the
`gpu` test repeats them at the training step's shape in bf16.
"""
import pytest
import torch

from ptlm_engine import reference
from ptlm_engine.kernels import rms_norm as K
from tests.helpers import CUDA, DEVICE, DTYPES, assert_matches, needs_triton, rand

pytestmark = needs_triton
EPS = 1e-5


def _reference(x, w, dy):
    """y and (dx, dweight) through the reference, in the inputs' own dtype (float64 inputs: the ground truth)."""
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = reference.rms_norm(x, w, EPS)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


def _check_case(T, d, dtype, w_dtype=None, strided=False):
    x = rand(T, 2 * d + 3, dtype=dtype)[:, 1:d + 1] if strided else rand(T, d, dtype=dtype)
    w = rand(d, dtype=w_dtype or dtype, scale=0.5)
    out_dtype = torch.promote_types(x.dtype, w.dtype)
    dy = rand(T, d, dtype=out_dtype)
    y64, dx64, dw64 = _reference(x.double(), w.double(), dy.double())
    y_lp, dx_lp, dw_lp = _reference(x, w, dy)

    y = torch.full((T, d), float("nan"), device=DEVICE, dtype=out_dtype)    # poisoned: every element written
    _, rstd = K.rms_norm_forward(x, w, EPS, out=y)
    rstd64 = torch.rsqrt(x.double().pow(2).mean(-1) + EPS)
    assert rstd.dtype == torch.float32 and rstd.shape == (T,)
    assert_matches(rstd, rstd64, None, torch.float32, "rstd")
    assert_matches(y, y64, y_lp, out_dtype, "y")
    y_bare, no_rstd = K.rms_norm_forward(x, w, EPS, store_rstd=False)
    assert no_rstd is None and torch.equal(y_bare, y)

    for need_dw in (True, False):
        dx, dw = K.rms_norm_backward(dy, x, w, rstd, need_dw)
        assert dx.dtype == x.dtype and dx.shape == (T, d)
        assert_matches(dx, dx64, dx_lp, dtype, "dx")
        if need_dw:
            assert dw.dtype == w.dtype
            assert_matches(dw, dw64, dw_lp, w.dtype, "dweight")
        else:
            assert dw is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,d", [(1, 7), (13, 45), (37, 130), (3, 2051)])
def test_odd_shapes(T, d, dtype):
    torch.manual_seed(T * 100 + d)
    _check_case(T, d, dtype)


def test_widest_rows_strided_rows_and_a_float32_weight():
    torch.manual_seed(3)
    _check_case(2, K.MAX_D, torch.float32)
    _check_case(9, 40, torch.float32, strided=True)
    _check_case(11, 24, torch.float16, w_dtype=torch.float32)        # HF's promotion: the output is float32


def test_empty_rows():
    x, w = torch.empty(0, 16, device=DEVICE), torch.ones(16, device=DEVICE)
    y, rstd = K.rms_norm_forward(x, w, EPS)
    dx, dw = K.rms_norm_backward(torch.empty(0, 16, device=DEVICE), x, w, rstd, True)
    assert y.shape == (0, 16) and rstd.shape == (0,) and dx.shape == (0, 16) and not dw.any()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("T,d", [(8192, 2048), (4096, 128), (31, 16384)])
def test_training_shapes_bf16(T, d):
    torch.manual_seed(d)
    _check_case(T, d, torch.bfloat16)
