"""The cross-entropy chunk kernel against float64: per-row loss and the gradient written over the logits, odd V
(one block, several blocks with a ragged tail), ignored rows (poisoned with NaN: they must come out zero), a
strided row, a device-scalar or float scale, loss only (logits untouched), an out-of-range target (NaN, never a
stray read).

On the CPU these run under TRITON_INTERPRET=1 (bf16 is skipped there: the interpreter computes bf16 wrongly); the
`gpu` test repeats them at the training step's chunk shape in bf16.
"""
import pytest
import torch
import torch.nn.functional as F

from ptlm_engine import reference
from ptlm_engine.kernels import cross_entropy as K
from tests.helpers import CUDA, DEVICE, DTYPES, assert_matches, needs_triton, rand

pytestmark = needs_triton
IGNORE = -100


def _targets(C, V, ignored):
    targets = torch.randint(0, V, (C,), device=DEVICE)
    targets[ignored] = IGNORE
    return targets


def _float64(logits, targets, scale):
    """Per-row losses and scale * d(sum of losses)/d logits in float64."""
    x = logits.detach().double().requires_grad_()
    losses = F.cross_entropy(x, targets, ignore_index=IGNORE, reduction="none")
    (scale * losses.sum()).backward()
    return losses.detach(), x.grad


def _torch_lowp(logits, targets, scale):
    """transformers' way: cross_entropy on the fp32 upcast, its gradient rounded to the dtype."""
    x = logits.detach().clone().requires_grad_()
    losses = F.cross_entropy(x.float(), targets, ignore_index=IGNORE, reduction="none")
    (scale * losses.sum()).backward()
    return losses.detach(), x.grad


def _check_case(C, V, dtype, block_v=None, ignored=(), strided=False, tensor_scale=True):
    full = rand(C, V + 5 if strided else V, dtype=dtype, scale=3.0)
    logits = full[:, 2:V + 2] if strided else full
    targets = _targets(C, V, list(ignored))
    n_valid = C - len(ignored)
    scale = 1.0 / n_valid
    with torch.no_grad():
        logits[list(ignored)] = float("nan")                 # poisoned: ignored rows are never read, only zeroed
    clean = logits.nan_to_num(0.0)
    loss64, grad64 = _float64(clean, targets, scale)
    loss_lp, grad_lp = _torch_lowp(clean, targets, scale)

    loss = torch.full((C,), float("nan"), device=DEVICE)   # poisoned: every row written
    grad_scale = torch.full((1,), scale, device=DEVICE) if tensor_scale else scale
    out = K.cross_entropy_chunk(logits, targets, grad_scale, IGNORE, loss=loss, block_v=block_v)
    assert out is loss and loss.dtype == torch.float32
    assert_matches(loss, loss64, None, torch.float32, "loss")
    assert (loss[list(ignored)] == 0).all()
    assert_matches(logits, grad64, grad_lp, dtype, "gradient")
    assert (logits[list(ignored)] == 0).all()
    if strided:
        assert torch.isfinite(full[:, :2]).all() and torch.isfinite(full[:, V + 2:]).all()   # outside: untouched

    again = clean.clone()
    loss_only = K.cross_entropy_chunk(again, targets, None, IGNORE, write_grad=False, block_v=block_v)
    assert torch.equal(loss_only, loss) and torch.equal(again, clean)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C,V,block_v,ignored", [
    (5, 97, None, (1,)),                 # one block
    (9, 1031, 256, (0, 4, 8)),           # five blocks, the last 7 columns wide
    (4, 1031, None, ()),
])
def test_loss_and_gradient_in_place(C, V, block_v, ignored, dtype):
    torch.manual_seed(C * 1000 + V)
    _check_case(C, V, dtype, block_v, ignored)


def test_strided_rows_and_a_float_scale():
    torch.manual_seed(1)
    _check_case(6, 131, torch.float32, block_v=64, ignored=(3,), strided=True, tensor_scale=False)


def test_reference_matches_the_kernel():
    torch.manual_seed(2)
    logits, targets = rand(7, 211, dtype=torch.float32), _targets(7, 211, [2])
    scale = torch.full((1,), 0.25, device=DEVICE)
    ours, theirs = logits.clone(), logits.clone()
    loss = K.cross_entropy_chunk(ours, targets, scale, IGNORE, block_v=64)
    loss_ref = reference.cross_entropy_chunk(theirs, targets, scale, IGNORE)
    assert_matches(loss, loss_ref.double(), None, torch.float32, "loss")
    assert_matches(ours, theirs.double(), None, torch.float32, "gradient")


def test_out_of_range_target_gives_nan_and_empty_chunk():
    logits = rand(3, 50, dtype=torch.float32)
    targets = torch.tensor([3, 50, -1], device=DEVICE)
    loss = K.cross_entropy_chunk(logits.clone(), targets, 1.0, IGNORE)
    assert torch.isfinite(loss[0]) and loss[1:].isnan().all()
    assert K.cross_entropy_chunk(logits[:0], targets[:0], 1.0).shape == (0,)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_training_chunk_bf16():
    torch.manual_seed(3)
    _check_case(1024, 32000, torch.bfloat16, ignored=(0, 5, 1023))
