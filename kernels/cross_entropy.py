"""Cross-entropy over a chunk of logit rows: each row's loss and, written over the logits, its gradient.

logits (C, V) in the model dtype (fp32 / fp16 / bf16), any row stride, unit column stride; targets (C,) int64, rows
whose target is ignore_index ignored (loss 0, gradient 0). One program per row, in fp32:
  pass 1  m = max(x), s = sum(exp(x - m)) online over BLOCK_V columns at a time; loss = m + log(s) - x[target]
  pass 2  (WRITE_GRAD) g = (exp(x - m) / s - onehot(target)) * scale, rounded to the dtype and stored over x
scale is a device scalar (1 / n_valid for a mean: computed on the device, so no host sync) read by every program.
A target outside [0, V) that is not ignore_index gives a NaN loss (its logit is never read out of bounds).

In place because ops.cross_entropy multiplies each chunk's gradient by the lm_head weight right away: a second
(C, V) buffer would double the chunk's memory for nothing. The gradient is what transformers' loss produces
(cross_entropy's fp32 gradient of fp32-upcast logits, rounded to the model dtype by the upcast's backward).

Floors (H100, 3.0 TB/s; b bytes per element; the training step's T = 8192 rows over all chunks, V = 32000, bf16):
  loss + gradient  bytes = 2 b T V + 12 T   = 1.05 GB -> 350 us   (x read once, g written; pass 2's read of the
                                                                    row is meant to come from L2: 64 KB a row)
  loss only        bytes = b T V + 12 T     = 524 MB -> 175 us
The matmuls around it (ops.cross_entropy) dominate: logits and grad_hidden are 2 T V d = 1.07 TFLOP each at
d = 2048 (1.36 ms each at 790 TFLOP/s).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import next_pow2

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_BLOCK_V = 4096         # columns a program holds per step: 16 fp32 a thread at 8 warps (not tuned on a GPU yet)


def block_shape(V: int, block_v: int | None = None) -> tuple[int, int]:
    """(BLOCK_V, num_warps): the whole row for V <= MAX_BLOCK_V (or block_v), warps scaled with the block."""
    block = min(next_pow2(V), block_v or MAX_BLOCK_V)
    return block, max(1, min(8, block // 512))


@triton.jit
def _cross_entropy_kernel(
    x_ptr, targets_ptr, loss_ptr, scale_ptr,
    V, stride_row, ignore_index,
    WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)                          # C * stride may pass 2^31
    row_ptr = x_ptr + row * stride_row
    target = tl.load(targets_ptr + row)
    if target == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        if WRITE_GRAD:
            zeros = tl.zeros((BLOCK_V,), dtype=x_ptr.dtype.element_ty)
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                tl.store(row_ptr + cols, zeros, mask=cols < V)
    else:
        m = float("-inf")
        s = 0.0
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        in_range = (target >= 0) & (target < V)
        x_target = tl.load(row_ptr + target, mask=in_range, other=float("nan")).to(tl.float32)
        tl.store(loss_ptr + row, m + tl.log(s) - x_target)
        if WRITE_GRAD:
            scale = tl.load(scale_ptr)
            p_scale = scale / s                                  # softmax * scale = exp(x - m) * scale / s
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                mask = cols < V
                x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                g = tl.exp(x - m) * p_scale
                g = tl.where(cols == target, g - scale, g)
                tl.store(row_ptr + cols, g.to(x_ptr.dtype.element_ty), mask=mask)


def cross_entropy_chunk(logits: torch.Tensor, targets: torch.Tensor, grad_scale: torch.Tensor | float | None,
                        ignore_index: int = -100, *, write_grad: bool = True, loss: torch.Tensor | None = None,
                        block_v: int | None = None) -> torch.Tensor:
    """Per-row loss (C,) fp32 (`loss` if given) of logits (C, V) against targets (C,) int64; with write_grad the
    logits are overwritten with (softmax - onehot(target)) * grad_scale (zero rows where ignored).

    grad_scale: a one-element fp32 tensor on the logits' device (1 / n_valid for a mean, without a host sync) or a
    float; unused without write_grad. block_v caps the columns a program takes per step (tests: several steps)."""
    C, V = logits.shape
    loss = torch.empty((C,), device=logits.device, dtype=torch.float32) if loss is None else loss
    if C == 0:
        return loss
    if not isinstance(grad_scale, torch.Tensor):
        grad_scale = torch.full((1,), 1.0 if grad_scale is None else float(grad_scale), device=logits.device,
                                dtype=torch.float32)
    block, warps = block_shape(V, block_v)
    _cross_entropy_kernel[(C,)](
        logits, targets, loss, grad_scale,
        V, logits.stride(0), int(ignore_index),
        WRITE_GRAD=write_grad, BLOCK_V=block, num_warps=warps,
    )
    return loss
