"""The fused linear cross-entropy op against a float64 reference and against transformers' way in the dtype (logits
rounded to the dtype, upcast, torch's cross_entropy): the loss and the gradients of hidden, a trainable weight and
bias, over several chunks (a ragged last one) and one; reductions mean / sum / num_items_in_batch; all targets
ignored; the inference path; bad input; the reference backend; torch.library checks; torch.compile."""
import pytest
import torch

from ptlm_engine import reference
from ptlm_engine.functional import linear_cross_entropy
from ptlm_engine.ops import cross_entropy as ops
from ptlm_engine.ops.cross_entropy import linear_cross_entropy_fwd, linear_cross_entropy_op
from tests.helpers import (CUDA, DEVICE, DTYPES, assert_grads_match, assert_matches, assert_no_host_sync,
                           leaves, needs_triton, rand)

IGNORE = -100


def _inputs(lead, d, V, dtype, trainable_head=False, bias=False, ignored=0.2):
    hidden = rand(*lead, d, dtype=dtype).requires_grad_()
    weight = rand(V, d, dtype=dtype, scale=d ** -0.5 * 2).requires_grad_(trainable_head)
    b = rand(V, dtype=dtype).requires_grad_(trainable_head) if bias else None
    targets = torch.randint(0, V, lead, device=DEVICE)
    targets[torch.rand(lead, device=DEVICE) < ignored] = IGNORE
    return hidden, weight, b, targets


def _run(fn, hidden, weight, bias, targets, d_loss=1.0, **kw):
    """The loss and the gradients of (hidden, weight, bias) for d_loss * loss."""
    loss = fn(hidden, weight, targets, IGNORE, bias=bias, **kw)
    (d_loss * loss).backward()
    return loss.detach(), [None if t is None or not t.requires_grad else t.grad for t in (hidden, weight, bias)]


def _reference(hidden, weight, targets, ignore_index, bias=None, reduction="mean", num_items_in_batch=None):
    if num_items_in_batch is None:
        return reference.linear_cross_entropy(hidden, weight, targets, ignore_index, reduction, bias)
    return reference.linear_cross_entropy(hidden, weight, targets, ignore_index, "sum", bias) / num_items_in_batch


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [
    dict(lead=(3, 13), d=24, V=97, chunk=8),                                   # 5 chunks, the last of 7 rows
    dict(lead=(29,), d=40, V=1031, chunk=None, trainable_head=True, bias=True),  # one chunk; grad_weight, grad_bias
    dict(lead=(2, 11), d=16, V=131, chunk=5, trainable_head=True, d_loss=0.375),
])
def test_loss_and_grads_match_float64(case, dtype):
    torch.manual_seed(case["V"] + case["d"])
    tensors = _inputs(case["lead"], case["d"], case["V"], dtype, case.get("trainable_head", False),
                      case.get("bias", False))
    targets = tensors[3]
    d_loss = case.get("d_loss", 1.0)
    loss, grads = _run(linear_cross_entropy_op, *tensors[:3], targets, d_loss, chunk_size=case["chunk"])
    loss64, grads64 = _run(_reference, *leaves(tensors[:3], torch.float64), targets, d_loss)
    loss_lp, grads_lp = _run(_reference, *leaves(tensors[:3], dtype), targets, d_loss)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_matches(loss, loss64, loss_lp, torch.float32 if dtype == torch.float32 else dtype, "loss")
    assert_grads_match(["d_hidden", "d_weight", "d_bias"], grads, grads64, grads_lp, dtype)


@needs_triton
@pytest.mark.parametrize("reduction, num_items", [("sum", None), ("mean", 40), ("mean", "tensor")])
def test_reductions_match_float64(reduction, num_items):
    torch.manual_seed(3)
    hidden, weight, _, targets = _inputs((4, 9), 20, 61, torch.float32, trainable_head=True)
    if num_items == "tensor":
        num_items = torch.tensor(40, device=DEVICE)
    kw = dict(reduction=reduction, num_items_in_batch=num_items)
    loss, grads = _run(linear_cross_entropy, hidden, weight, None, targets, **kw)
    loss64, grads64 = _run(_reference, *leaves((hidden, weight, None), torch.float64), targets, **kw)
    assert_matches(loss, loss64, None, torch.float32, "loss")
    assert_grads_match(["d_hidden", "d_weight", "d_bias"], grads, grads64, [None] * 3, torch.float32)


@needs_triton
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_targets_ignored_as_torch(reduction):
    """torch's cross_entropy: the mean of no targets is NaN, the sum 0; the gradients are zero either way."""
    hidden, weight, _, targets = _inputs((2, 5), 12, 37, torch.float32, trainable_head=True, ignored=1.0)
    loss, (d_hidden, d_weight, _) = _run(linear_cross_entropy, hidden, weight, None, targets, reduction=reduction)
    want = _reference(hidden.detach(), weight.detach(), targets, IGNORE, reduction=reduction)
    assert (loss.isnan() and want.isnan()) if reduction == "mean" else (loss == 0 and want == 0)
    assert not d_hidden.any() and not d_weight.any()


@needs_triton
def test_inference_path_and_frozen_head():
    """no_grad computes the loss only (no gradient buffers); a frozen head gets no gradient and no grad_weight
    work; the eager autograd Function runs otherwise."""
    torch.manual_seed(4)
    hidden, weight, _, targets = _inputs((3, 7), 16, 53, torch.float32)
    with torch.no_grad():
        loss_inference = linear_cross_entropy(hidden, weight, targets)
    loss = linear_cross_entropy(hidden, weight, targets)
    assert torch.equal(loss, loss_inference) and loss.grad_fn.name() == "LinearCrossEntropyFunctionBackward"
    loss.backward()
    assert hidden.grad is not None and weight.grad is None


def test_chunk_rows_rule():
    """Logits chunks about hidden's size within [64 MB, 256 MB], balanced: the training step's 8 x 1024 rows."""
    assert ops.chunk_rows(8192, 32000, 2048, 2) == 1024
    assert ops.chunk_rows(100, 32000, 2048, 2) == 100                          # one chunk: 6.4 MB of logits
    assert ops.chunk_rows(65536, 128256, 4096, 2) * 128256 * 2 <= 256 << 20    # capped
    rows = ops.chunk_rows(5000, 150000, 1024, 4)
    assert -(-5000 // rows) * rows - 5000 < -(-5000 // rows)                  # balanced: no near-empty last chunk


@pytest.mark.parametrize("shapes, message", [
    (dict(hidden=(5, 8), weight=(11, 7), targets=(5,)), r"hidden: expected shape \(\.\.\., 7\) to match weight"),
    (dict(hidden=(5, 8), weight=(11,), targets=(5,)), r"weight: expected shape \(V, d\)"),
    (dict(hidden=(2, 5, 8), weight=(11, 8), targets=(10,)), r"targets: expected shape \(2, 5\)"),
    (dict(hidden=(5, 8), weight=(11, 8), targets=(5,), bias=(8,)), r"bias: expected shape \(11,\)"),
])
def test_bad_shapes_raise_value_error(shapes, message):
    bias = torch.randn(shapes["bias"], device=DEVICE) if "bias" in shapes else None
    with pytest.raises(ValueError, match=message):
        linear_cross_entropy(torch.randn(shapes["hidden"], device=DEVICE), torch.randn(shapes["weight"], device=DEVICE),
                             torch.zeros(shapes["targets"], dtype=torch.long, device=DEVICE), bias=bias)


def test_bad_dtypes_and_options_raise_value_error():
    h, w, t = torch.randn(5, 8, device=DEVICE), torch.randn(11, 8, device=DEVICE), torch.zeros(5, dtype=torch.long)
    t = t.to(DEVICE)
    with pytest.raises(ValueError, match=r"targets: expected an integer dtype"):
        linear_cross_entropy(h, w, t.float())
    with pytest.raises(ValueError, match=r"weight: expected dtype torch.float32"):
        linear_cross_entropy(h, w.double(), t)
    with pytest.raises(ValueError, match=r"reduction: expected one of"):
        linear_cross_entropy(h, w, t, reduction="none")
    with pytest.raises(ValueError, match=r"num_items_in_batch: .* needs reduction='mean'"):
        linear_cross_entropy(h, w, t, reduction="sum", num_items_in_batch=3)


def test_reference_backend_matches_float64(monkeypatch):
    """Without Triton the same chunked op runs the PyTorch chunk reference (CPU, PTLM_BACKEND=reference)."""
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    torch.manual_seed(5)
    hidden, weight, bias, targets = _inputs((3, 10), 12, 41, torch.float32, trainable_head=True, bias=True)
    loss, grads = _run(linear_cross_entropy_op, hidden, weight, bias, targets, chunk_size=7)
    loss64, grads64 = _run(_reference, *leaves((hidden, weight, bias), torch.float64), targets)
    assert_matches(loss, loss64, None, torch.float32, "loss")
    assert_grads_match(["d_hidden", "d_weight", "d_bias"], grads, grads64, [None] * 3, torch.float32)


@needs_triton
def test_custom_op_passes_opcheck():
    torch.manual_seed(6)
    hidden, weight, bias, targets = _inputs((9,), 12, 29, torch.float32, trainable_head=True, bias=True)
    scale = torch.tensor(1.0 / 9, device=DEVICE)
    torch.library.opcheck(linear_cross_entropy_fwd, (hidden, weight, bias, targets, scale, IGNORE, 4, True, True, True))
    frozen = weight.detach()                                                       # the LoRA case: a frozen head
    torch.library.opcheck(linear_cross_entropy_fwd, (hidden, frozen, None, targets, scale, IGNORE, 9, True, False,
                                                     False))


@needs_triton
def test_torch_compile_fullgraph():
    torch.manual_seed(7)
    hidden, weight, _, targets = _inputs((2, 7), 16, 43, torch.float32, trainable_head=True)
    compiled = torch.compile(lambda h, w, t: linear_cross_entropy(h, w, t), backend="aot_eager", fullgraph=True)
    loss, grads = _run(lambda h, w, t, _ignore, bias: compiled(h, w, t), hidden, weight, None, targets)
    loss64, grads64 = _run(_reference, *leaves((hidden, weight, None), torch.float64), targets)
    assert_matches(loss, loss64, None, torch.float32, "compiled loss")
    assert_grads_match(["d_hidden", "d_weight", "d_bias"], grads, grads64, [None] * 3, torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_training_shape_bf16_memory_and_no_host_sync():
    """The step's loss (8192 rows, d = 2048, V = 32000, bf16): within bf16's error of transformers' way, far less
    peak memory than it (one chunk's logits, not the logits, their fp32 copy and fp32 gradient), no host sync."""
    torch.manual_seed(8)
    hidden, weight, _, targets = _inputs((8, 1024), 2048, 32000, torch.bfloat16)

    def peak(fn):
        hidden.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = _run(fn, hidden, weight, None, targets)
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - before

    (loss, grads), ours = peak(linear_cross_entropy_op)
    (loss_lp, grads_lp), theirs = peak(_reference)
    loss64, grads64 = _run(_reference, *leaves((hidden, weight, None), torch.float64), targets)
    assert_matches(loss, loss64, loss_lp, torch.bfloat16, "loss")
    assert_matches(grads[0], grads64[0], grads_lp[0], torch.bfloat16, "d_hidden")
    assert ours < 0.15 * theirs, (ours, theirs)
    assert_no_host_sync(lambda: linear_cross_entropy(hidden, weight, targets).backward())
