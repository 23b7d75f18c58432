"""A causal LM's loss on its lm_head, cross_entropy(hidden W^T + bias, targets), without ever holding all logits.

Chain of names: kernels.cross_entropy (Triton kernel + launcher) -> ptlm::linear_cross_entropy (custom op, with a
fake implementation for torch.compile) -> linear_cross_entropy_op (validation, reduction, backend choice) ->
functional.linear_cross_entropy (and base_ops' causal-LM forward).

Liger-Kernel's FusedLinearCrossEntropy idea: the rows go in chunks; per chunk the logits (C, V) come from one
cuBLAS matmul, the kernel (or its PyTorch reference: CPU, PTLM_BACKEND=reference) turns them in place into the
loss's gradient, and two more matmuls take grad_hidden = g W (written into its rows of one (T, d) buffer) and, only
where the weight is trainable, grad_weight += g^T hidden (fp32 accumulator; a frozen lm_head skips it). The forward
thus computes the gradients already and saves them (never the logits); the backward multiplies them by the loss's
incoming gradient and the reduction's factor. That factor (1 / the token count) stays out of the stored gradients,
as transformers' fp32 logits keep it out of half precision until the loss's incoming gradient (an fp16 loss
scaler's factor) is in: folded in early, g's small entries underflowed in fp16 (2026-11-27 review: 17% off at
num_items_in_batch = 8 micro-batches). Under no_grad (or with nothing trainable) only the loss is computed.

Transformers' loss materializes the (T, V) logits in the model dtype, their fp32 upcast, and cross_entropy's fp32
gradient: ~3 GB at T = 8192, V = 32000 in bf16. Here the extra memory is one chunk's logits and grad_hidden.
The numerics are HF's: logits rounded to the model dtype by the matmul, loss and softmax in fp32, the gradient
rounded to the model dtype before its matmul (up to when the reduction's factor applies, see above).

Chunk size: rows whose logits take about as many bytes as hidden (Liger's rule), clamped to [64 MB, 256 MB] (fewer,
larger GEMMs where hidden is small; bounded memory where it is huge), balanced over the chunks. At the training
step (T = 8192, d = 2048, V = 32000, bf16) that is 8 chunks of 1024 rows, 65.5 MB of logits each.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ptlm_engine import reference
from ptlm_engine.ops.checks import check_floating, check_like
from ptlm_engine.ops.lora import eager_function, run_op, triton_enabled

try:  # Triton is a Linux-only dependency; without it every op runs the reference.
    from ptlm_engine.kernels import cross_entropy as cross_entropy_kernels
except ImportError:  # pragma: no cover - exercised only where triton is absent
    cross_entropy_kernels = None

REDUCTIONS = ("mean", "sum")
CHUNK_BYTES = (64 << 20, 256 << 20)          # the least and the most bytes of one chunk's logits


def chunk_rows(T: int, V: int, d: int, elem_bytes: int) -> int:
    """Rows per chunk (see the module docstring)."""
    budget = min(max(T * d * elem_bytes, CHUNK_BYTES[0]), CHUNK_BYTES[1])
    rows = max(1, min(T, budget // (V * elem_bytes)))
    chunks = max(1, -(-T // rows))      # T = 0: one empty chunk
    return max(1, -(-T // chunks))


def runs_triton(hidden: Tensor) -> bool:
    """The kernel takes fp32 / fp16 / bf16 logits (hidden's dtype); the rest runs the chunk reference."""
    return triton_enabled(hidden) and hidden.dtype in cross_entropy_kernels.SUPPORTED_DTYPES


# ------------------------------------------------------------------------------------------ implementations
def _forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, scale: Tensor,
             ignore_index: int, rows: int, need_grad_hidden: bool, need_grad_weight: bool,
             need_grad_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """hidden (T, d), weight (V, d), bias (V,) or None, targets (T,) int64, scale () the reduction's factor ->
    loss () = scale * sum of the rows' losses, and the gradients of the rows' summed loss, without scale (empty
    where not needed): grad_hidden (T, d) in hidden's dtype, grad_weight (V, d) and grad_bias (V,) in the fp32
    (at least) accumulator."""
    T, d = hidden.shape
    V = weight.shape[0]
    write_grad = need_grad_hidden or need_grad_weight or need_grad_bias
    on_triton = runs_triton(hidden)
    acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
    losses = torch.empty((T,), device=hidden.device, dtype=acc_dtype)
    grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_grad_hidden else None
    grad_weight = torch.zeros((V, d), device=weight.device, dtype=acc_dtype) if need_grad_weight else None
    grad_bias = torch.zeros((V,), device=weight.device, dtype=acc_dtype) if need_grad_bias else None
    buffer = hidden.new_empty((min(rows, T), V))                                       # one chunk's logits
    unit = torch.ones((1,), device=hidden.device, dtype=acc_dtype)                     # g without the reduction
    w_t = weight.t()                                                                    # (d, V) view
    for start in range(0, T, rows):
        end = min(start + rows, T)
        h = hidden[start:end]                                                           # (C, d)
        logits = buffer[:end - start]                                                   # (C, V)
        if bias is None:
            torch.mm(h, w_t, out=logits)
        else:
            torch.addmm(bias, h, w_t, out=logits)
        if on_triton:
            cross_entropy_kernels.cross_entropy_chunk(logits, targets[start:end], unit, ignore_index,
                                                      write_grad=write_grad, loss=losses[start:end])
        else:
            losses[start:end] = reference.cross_entropy_chunk(logits, targets[start:end], unit, ignore_index,
                                                              write_grad)
        # logits now hold the loss's gradient g (C, V) in the model dtype
        if need_grad_hidden:
            torch.mm(logits, weight, out=grad_hidden[start:end])
        if need_grad_weight:
            if grad_weight.dtype == logits.dtype:
                grad_weight.addmm_(logits.t(), h)
            else:   # half precision: each chunk's product rounded once, summed in fp32
                grad_weight += logits.t() @ h
        if need_grad_bias:
            grad_bias += logits.sum(0, dtype=acc_dtype)
    loss = losses.sum() * scale
    return (loss, hidden.new_empty((0,)) if grad_hidden is None else grad_hidden,
            hidden.new_empty((0,)) if grad_weight is None else grad_weight,
            hidden.new_empty((0,)) if grad_bias is None else grad_bias)


# ------------------------------------------------------------------------------------------------ custom op
# torch.compile and other tracers see this opaque op (with a fake implementation); eager calls take the cheaper
# autograd.Function below. The backward is a product with the incoming scalar gradient: plain aten ops, no
# second custom op.
linear_cross_entropy_fwd = torch.library.custom_op("ptlm::linear_cross_entropy", _forward, mutates_args=())


@linear_cross_entropy_fwd.register_fake
def _(hidden, weight, bias, targets, scale, ignore_index, rows, need_grad_hidden, need_grad_weight, need_grad_bias):
    acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
    return (hidden.new_empty((), dtype=acc_dtype),
            hidden.new_empty(hidden.shape) if need_grad_hidden else hidden.new_empty((0,)),
            weight.new_empty(weight.shape, dtype=acc_dtype) if need_grad_weight else hidden.new_empty((0,)),
            bias.new_empty(bias.shape, dtype=acc_dtype) if need_grad_bias else hidden.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[4], *output[1:])    # the reduction's factor, the summed loss's gradients
    ctx.computed = inputs[7:]                        # need_grad_hidden, need_grad_weight, need_grad_bias
    ctx.dtypes = [None if t is None else t.dtype for t in inputs[:3]]


def _grads(ctx, d_loss, *_):
    """The forward's gradients times the reduction's factor and the loss's incoming gradient, in the inputs'
    dtypes (None where the forward computed none)."""
    need = ctx.needs_input_grad
    scale, *saved = ctx.saved_tensors
    # fp32 (at least): the fp16 loss scaler's factor is in it. A mean over no target (scale inf) has zero gradients.
    factor = scale.nan_to_num(posinf=0.0) * d_loss
    grads = [(g * factor).to(ctx.dtypes[i]) if need[i] and ctx.computed[i] else None for i, g in enumerate(saved)]
    return (*grads, None, None, None, None, None, None, None)


torch.library.register_autograd("ptlm::linear_cross_entropy", _grads, setup_context=_setup_context)


LinearCrossEntropyFunction = eager_function("LinearCrossEntropyFunction", _forward, _setup_context, _grads,
                                            grad_outputs=1)


# ----------------------------------------------------------------------------------------------- entry point
def _check(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None, reduction: str,
           num_items_in_batch) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight: expected shape (V, d), got {tuple(weight.shape)}")
    V, d = weight.shape
    if hidden.dim() < 1 or hidden.shape[-1] != d:
        raise ValueError(f"hidden: expected shape (..., {d}) to match weight, got {tuple(hidden.shape)}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets: expected shape {tuple(hidden.shape[:-1])} to match hidden, "
                         f"got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets: expected an integer dtype, got {targets.dtype}")
    if bias is not None and tuple(bias.shape) != (V,):
        raise ValueError(f"bias: expected shape ({V},), got {tuple(bias.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if num_items_in_batch is not None and reduction != "mean":
        raise ValueError("num_items_in_batch: replaces the mean's count of targets; it needs reduction='mean', got "
                         f"{reduction!r}")
    check_floating("hidden", hidden)
    check_like("hidden", hidden, {"weight": weight, "bias": bias})
    check_like("hidden", hidden, {"targets": targets}, dtype=False)


def _scale(targets: Tensor, ignore_index: int, reduction: str, num_items_in_batch, dtype: torch.dtype) -> Tensor:
    """The reduction's factor on the summed row losses, a 0-d device tensor (no host sync): 1 for a sum,
    1 / num_items_in_batch (transformers' convention), else 1 / (targets not ignored): inf where none is, so the
    mean is 0 * inf = NaN as torch's cross_entropy gives, while the gradient stays 0."""
    if reduction == "sum":
        return torch.ones((), device=targets.device, dtype=dtype)
    if num_items_in_batch is None:
        count = (targets != ignore_index).sum()
    elif isinstance(num_items_in_batch, Tensor):
        count = num_items_in_batch.to(targets.device)
    else:
        count = torch.full((), float(num_items_in_batch), device=targets.device, dtype=dtype)
    return count.to(dtype).reciprocal().reshape(())


def linear_cross_entropy_op(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100,
                            reduction: str = "mean", bias: Tensor | None = None, num_items_in_batch=None,
                            chunk_size: int | None = None) -> Tensor:
    """cross_entropy(hidden W^T + bias, targets) in chunks of chunk_size rows (None: chunk_rows's choice)."""
    _check(hidden, weight, targets, bias, reduction, num_items_in_batch)
    d, V = hidden.shape[-1], weight.shape[0]
    hidden2d = hidden.reshape(-1, d)                                                   # (T, d), a view if it can
    targets1d = targets.reshape(-1).long().contiguous()                                # (T,)
    T = hidden2d.shape[0]
    # torch's cross_entropy refuses these too; checked on the device, no host sync (CUDA: at the next sync), but
    # not inside a CUDA-graph capture (its eager warm-up checked the same code path)
    if T and (hidden.device.type != "cuda" or torch.compiler.is_compiling()
              or not torch.cuda.is_current_stream_capturing()):
        torch._assert_async(((targets1d == ignore_index) | (targets1d.clamp(0, V - 1) == targets1d)).all(),
                            "linear_cross_entropy: a target outside [0, V) that is not ignore_index")
    acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
    scale = _scale(targets1d, int(ignore_index), reduction, num_items_in_batch, acc_dtype)
    rows = chunk_size or chunk_rows(T, V, d, hidden.element_size())
    grad = torch.is_grad_enabled()
    need = [grad and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    args = (hidden2d, weight, bias, targets1d, scale, int(ignore_index), int(rows), *need)
    loss, *_ = run_op(args, linear_cross_entropy_fwd, LinearCrossEntropyFunction, _forward, (hidden, weight, bias))
    return loss
