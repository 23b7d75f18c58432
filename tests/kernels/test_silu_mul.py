"""The silu(gate) * up kernels against float64 references: forward and backward, odd shapes, one flat row
(contiguous tensors) and strided rows (a fused gate/up projection's halves), poisoned outputs.

On the CPU these run under TRITON_INTERPRET=1 (bf16 is skipped there); the `gpu` test repeats them at the training
step's shape in bf16.
"""
import pytest
import torch

from ptlm_engine import reference
from ptlm_engine.kernels import silu_mul as K
from tests.helpers import CUDA, DEVICE, DTYPES, assert_matches, needs_triton, rand

pytestmark = needs_triton


def _reference(gate, up, dy):
    gate, up = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    y = reference.silu_mul(gate, up)
    y.backward(dy)
    return y.detach(), gate.grad, up.grad


def _check_case(T, F, dtype, strided=False):
    if strided:  # the two column halves of one (T, 2F) projection output
        both = rand(T, 2 * F, dtype=dtype, scale=2.0)
        gate, up = both[:, :F], both[:, F:]
    else:
        gate, up = rand(T, F, dtype=dtype, scale=2.0), rand(T, F, dtype=dtype)
    dy = rand(T, F, dtype=dtype)
    y64, dg64, du64 = _reference(gate.double(), up.double(), dy.double())
    y_lp, dg_lp, du_lp = _reference(gate, up, dy)

    y = torch.full((T, F), float("nan"), device=DEVICE, dtype=dtype)          # poisoned: every element written
    K.silu_mul_forward(gate, up, out=y)
    assert_matches(y, y64, y_lp, dtype, "y")
    dg, du = K.silu_mul_backward(dy, gate, up)
    assert dg.dtype == du.dtype == dtype and dg.shape == du.shape == (T, F)
    assert_matches(dg, dg64, dg_lp, dtype, "dgate")
    assert_matches(du, du64, du_lp, dtype, "dup")


@pytest.mark.parametrize("strided", [False, True], ids=["flat", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,F", [(1, 5), (13, 45), (3, 4099)])
def test_odd_shapes(T, F, dtype, strided):
    torch.manual_seed(T * 100 + F)
    _check_case(T, F, dtype, strided)


def test_empty():
    g = torch.empty(0, 8, device=DEVICE)
    assert K.silu_mul_forward(g, g).shape == (0, 8)
    assert all(t.shape == (0, 8) for t in K.silu_mul_backward(g, g, g))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("strided", [False, True], ids=["flat", "strided"])
def test_training_shape_bf16(strided):
    torch.manual_seed(1)
    _check_case(8192, 5632, torch.bfloat16, strided)
