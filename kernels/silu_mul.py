"""The gated MLP's activation: y = silu(gate) * up, forward and backward kernels.

As transformers' `act_fn(gate_proj(x)) * up_proj(x)` with act silu: silu(gate) is rounded to the dtype, then the
product is rounded again. Backward recomputes silu from gate (only gate and up are saved):
  dup = dy * cast(silu(gate)),  dgate = dy * up * sigmoid(gate) * (1 + gate * (1 - sigmoid(gate))),
each in fp32, rounded once.

The tensors are (rows, F) with any row strides and unit column strides, or one flat row where every one is
contiguous (no tail block per row); a program owns BLOCK elements of one row, the grid is 1-D (row, block).

Floors (H100, 3.0 TB/s; b bytes per element; the training step's (8192, 5632) bf16):
  forward   bytes = 3 b T F = 276.8 MB -> 92.3 us   (gate, up read; y written)
  backward  bytes = 5 b T F = 461.4 MB -> 153.8 us  (dy, gate, up read; dgate, dup written)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import cdiv, next_pow2

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK = 4096               # elements per program: 16 a thread at 8 warps, two 16-byte vectors of bf16
WARPS = 8


def block_size(cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps): BLOCK elements a program, fewer for short rows."""
    block = min(BLOCK, max(128, next_pow2(cols)))
    return block, max(1, min(WARPS, block // 512))


@triton.jit
def _silu(g):
    return g / (1.0 + tl.exp(-g))


@triton.jit
def _block(pid, N, BLOCKS_PER_ROW, BLOCK: tl.constexpr):
    """(row, column offsets, their mask) of program pid."""
    row = pid // BLOCKS_PER_ROW
    cols = (pid % BLOCKS_PER_ROW).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)    # a flat row may pass 2^31
    return row.to(tl.int64), cols, cols < N


@triton.jit
def _silu_mul_fwd_kernel(
    g_ptr, u_ptr, y_ptr,
    N, BLOCKS_PER_ROW, stride_g, stride_u, stride_y,
    BLOCK: tl.constexpr,
):
    row, cols, mask = _block(tl.program_id(0), N, BLOCKS_PER_ROW, BLOCK)
    g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    act = _silu(g).to(y_ptr.dtype.element_ty).to(tl.float32)                  # HF's first rounding
    tl.store(y_ptr + row * stride_y + cols, (act * u).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_bwd_kernel(
    dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr,
    N, BLOCKS_PER_ROW, stride_dy, stride_g, stride_u, stride_dg, stride_du,
    BLOCK: tl.constexpr,
):
    row, cols, mask = _block(tl.program_id(0), N, BLOCKS_PER_ROW, BLOCK)
    dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    act = (g * sig).to(du_ptr.dtype.element_ty).to(tl.float32)        # the forward's rounded silu
    tl.store(du_ptr + row * stride_du + cols, (dy * act).to(du_ptr.dtype.element_ty), mask=mask)
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(dg_ptr + row * stride_dg + cols, dg.to(dg_ptr.dtype.element_ty), mask=mask)


def _rows(*tensors: torch.Tensor) -> tuple[int, int, list[int]]:
    """(rows, columns, row strides) of the launch: one flat row where every tensor is contiguous."""
    rows, cols = tensors[0].shape
    if all(t.is_contiguous() for t in tensors):
        return 1, rows * cols, [0] * len(tensors)
    return rows, cols, [t.stride(0) for t in tensors]


def silu_mul_forward(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """y = silu(gate) * up (T, F) in their dtype (`out` if given). gate, up (T, F) with unit column strides."""
    y = torch.empty(gate.shape, device=gate.device, dtype=gate.dtype) if out is None else out
    if y.numel() == 0:
        return y
    rows, cols, strides = _rows(gate, up, y)
    block, warps = block_size(cols)
    per_row = cdiv(cols, block)
    _silu_mul_fwd_kernel[(rows * per_row,)](gate, up, y, cols, per_row, *strides, BLOCK=block, num_warps=warps)
    return y


def silu_mul_backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgate, dup), each (T, F) contiguous in gate's dtype. dy, gate, up (T, F) with unit column strides."""
    dgate = torch.empty(gate.shape, device=gate.device, dtype=gate.dtype)
    dup = torch.empty_like(dgate)
    if dgate.numel() == 0:
        return dgate, dup
    rows, cols, strides = _rows(dy, gate, up, dgate, dup)
    block, warps = block_size(cols)
    per_row = cdiv(cols, block)
    _silu_mul_bwd_kernel[(rows * per_row,)](dy, gate, up, dgate, dup, cols, per_row, *strides, BLOCK=block,
                                            num_warps=warps)
    return dgate, dup
