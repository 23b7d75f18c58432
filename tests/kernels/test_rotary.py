"""The rotary kernel against float64 references: forward and backward (the transposed rotation) of q and k in one
launch, GQA head counts, HF's transposed (B, L, H, D) views, cos / sin shared over the batch (stride 0), odd
lengths and head dims, poisoned outputs.

On the CPU these run under TRITON_INTERPRET=1 (bf16 is skipped there); the `gpu` test repeats them at the training
step's shapes in bf16.
"""
import pytest
import torch

from ptlm_engine import reference
from ptlm_engine.kernels import rotary as K
from tests.helpers import CUDA, DEVICE, DTYPES, assert_matches, needs_triton, rand

pytestmark = needs_triton


def _reference(q, k, cos, sin, dq_out, dk_out):
    q, k = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    q_out, k_out = reference.apply_rotary(q, k, cos, sin)
    torch.autograd.backward([q_out, k_out], [dq_out, dk_out])
    return q_out.detach(), k_out.detach(), q.grad, k.grad


def _poisoned(*shape, dtype):
    return torch.full(shape, float("nan"), device=DEVICE, dtype=dtype)


def _check_case(B, HQ, HK, L, D, dtype, shared_table=False):
    # HF's layout: (B, L, H, D) projections viewed as (B, H, L, D)
    q = rand(B, L, HQ, D, dtype=dtype).transpose(1, 2)
    k = rand(B, L, HK, D, dtype=dtype).transpose(1, 2)
    angles = torch.rand(1 if shared_table else B, L, D, dtype=torch.float64) * 6.3
    cos, sin = (f(angles).to(DEVICE, dtype).expand(B, L, D) for f in (torch.cos, torch.sin))
    dq_out, dk_out = rand(B, HQ, L, D, dtype=dtype), rand(B, HK, L, D, dtype=dtype)
    up = lambda *ts: [t.double() for t in ts]
    q64, k64, dq64, dk64 = _reference(*up(q, k, cos, sin, dq_out, dk_out))
    q_lp, k_lp, dq_lp, dk_lp = _reference(q, k, cos, sin, dq_out, dk_out)

    q_out, k_out = _poisoned(B, HQ, L, D, dtype=dtype), _poisoned(B, HK, L, D, dtype=dtype)
    K.rotary(q, k, cos, sin, q_out, k_out)
    assert_matches(q_out, q64, q_lp, dtype, "q_embed")
    assert_matches(k_out, k64, k_lp, dtype, "k_embed")
    if dtype != torch.float32:       # HF's rounding order: the same values bit for bit
        assert torch.equal(q_out, q_lp) and torch.equal(k_out, k_lp)

    # gradients written through (B, L, H, D)-ordered buffers, as the op lays them out
    dq = _poisoned(B, L, HQ, D, dtype=dtype).transpose(1, 2)
    dk = _poisoned(B, L, HK, D, dtype=dtype).transpose(1, 2)
    K.rotary(dq_out, dk_out, cos, sin, dq, dk, backward=True)
    assert_matches(dq, dq64, dq_lp, dtype, "dq")
    assert_matches(dk, dk64, dk_lp, dtype, "dk")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,HQ,HK,L,D", [(2, 4, 2, 7, 10), (1, 3, 3, 33, 64), (3, 6, 2, 5, 6), (2, 5, 1, 1, 128)])
def test_odd_shapes(B, HQ, HK, L, D, dtype):
    torch.manual_seed(B * 1000 + L * 10 + D)
    _check_case(B, HQ, HK, L, D, dtype)


def test_one_table_shared_by_the_batch():
    torch.manual_seed(7)
    _check_case(3, 4, 2, 9, 16, torch.float32, shared_table=True)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("shared_table", [False, True])
def test_training_shapes_bf16(shared_table):
    torch.manual_seed(2)
    _check_case(8, 32, 8, 1024, 64, torch.bfloat16, shared_table)
