"""Llama's RMSNorm: y = weight * cast(x * rsqrt(mean(x^2) + eps)), forward and backward kernels.

x (T, d), any row stride, unit column stride; weight (d,). The statistics are fp32; the normalized row is
rounded to x's dtype before the multiply by weight, whose product is rounded again to the output dtype
(promote(x, weight), as PyTorch's `weight * hidden.to(input_dtype)`): transformers' LlamaRMSNorm's two
roundings, so half-precision outputs equal HF's up to the last bit of rstd.

- forward:  a program owns BLOCK_T whole rows (BLOCK_T = 1 from d = 2048 on): one read of x, one write of y,
            and rstd (T,) fp32 for backward when asked (the only thing saved besides x).
- backward: n = x rstd (recomputed), g = dy weight; dx = rstd (g - n mean(g n)). With HAS_DW the programs are
            few (a few per SM) and each loops over its rows, summing dweight = sum_t dy cast(n) into one fp32
            row per program, reduced by a torch sum; without it (a frozen weight: the LoRA case) each program
            owns one row block and stores dx only.

Floors (H100, 3.0 TB/s; b bytes per element; the training step's T = 8192 rows, d = 2048, bf16):
  forward   bytes = 2 b T d + 4 T + b d          = 67.2 MB -> 22.4 us
  backward  bytes = 3 b T d + 4 T + b d          = 100.7 MB -> 33.6 us  (dy, x read; dx written; rstd read)
            (+ P d fp32 partials written and read with dweight: P = 4 per SM, under 5% at this shape)
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .configs import cdiv, next_pow2

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_D = 16384              # a program holds a whole row in registers
ROW_ELEMENTS = 2048        # small rows: several per program, about this many elements in all


def block_shape(T: int, D: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps): whole rows, several of them for small d, warps scaled with the tile."""
    block_d = next_pow2(D)
    block_t = max(1, min(ROW_ELEMENTS // block_d, next_pow2(T)))
    return block_t, block_d, min(16, max(4, block_t * block_d // 256))


@functools.lru_cache(maxsize=None)
def grad_programs(device: torch.device) -> int:
    """Programs of the dweight backward: four per SM on CUDA (each one fp32 partial row); two on the CPU, so small
    test shapes still loop over several row blocks per program."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 2


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr,
    T, D, stride_xt, stride_yt, eps,
    STORE_RSTD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    mask_t = rows < T
    mask_d = cols < D
    mask = mask_t[:, None] & mask_d[None, :]
    rows64 = rows.to(tl.int64)                                   # T * stride may pass 2^31
    x = tl.load(x_ptr + rows64[:, None] * stride_xt + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / D + eps)                                      # (BLOCK_T,)
    normed = (x * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)     # HF's first rounding
    w = tl.load(w_ptr + cols, mask=mask_d, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows64[:, None] * stride_yt + cols[None, :], (normed * w[None, :]).to(y_ptr.dtype.element_ty),
             mask=mask)
    if STORE_RSTD:
        tl.store(rstd_ptr + rows, rstd, mask=mask_t)


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, store_rstd: bool = True,
                     out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y (T, d) in promote(x, weight) (`out` if given) and, with store_rstd, rstd (T,) fp32.
    x (T, d) with unit column stride; weight (d,) contiguous."""
    T, D = x.shape
    y = torch.empty((T, D), device=x.device, dtype=torch.promote_types(x.dtype, weight.dtype)) if out is None else out
    rstd = torch.empty((T,), device=x.device, dtype=torch.float32) if store_rstd else None
    if T == 0:
        return y, rstd
    block_t, block_d, warps = block_shape(T, D)
    _rms_norm_fwd_kernel[(cdiv(T, block_t),)](
        x, weight, y, y if rstd is None else rstd,
        T, D, x.stride(0), y.stride(0), float(eps),
        STORE_RSTD=store_rstd, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=warps,
    )
    return y, rstd


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr,
    T, D, stride_dyt, stride_xt, stride_dxt,
    HAS_DW: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask_d = cols < D
    w = tl.load(w_ptr + cols, mask=mask_d, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for block in range(pid, tl.cdiv(T, BLOCK_T), tl.num_programs(0)):
        rows = block * BLOCK_T + tl.arange(0, BLOCK_T)
        mask_t = rows < T
        mask = mask_t[:, None] & mask_d[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(x_ptr + rows64[:, None] * stride_xt + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows64[:, None] * stride_dyt + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=mask_t, other=0.0)
        n = x * rstd[:, None]
        g = dy * w[None, :]
        dx = rstd[:, None] * (g - n * (tl.sum(g * n, axis=1) / D)[:, None])
        tl.store(dx_ptr + rows64[:, None] * stride_dxt + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_DW:  # weight's gradient sees the rounded normalized row, as in HF's autograd
            dw += tl.sum(dy * n.to(x_ptr.dtype.element_ty).to(tl.float32), axis=0)
    if HAS_DW:
        tl.store(dw_ptr + pid * D + cols, dw, mask=mask_d)


def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                      need_dweight: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dx (T, d) in x's dtype and, with need_dweight, dweight (d,) in weight's dtype.
    dy, x (T, d) with unit column strides; weight (d,) contiguous; rstd (T,) fp32 from the forward."""
    T, D = x.shape
    dx = torch.empty((T, D), device=x.device, dtype=x.dtype)
    if T == 0:
        return dx, torch.zeros_like(weight) if need_dweight else None
    block_t, block_d, warps = block_shape(T, D)
    blocks = cdiv(T, block_t)
    programs = min(blocks, grad_programs(x.device)) if need_dweight else blocks
    partials = torch.empty((programs, D), device=x.device, dtype=torch.float32) if need_dweight else None
    _rms_norm_bwd_kernel[(programs,)](
        dy, x, weight, rstd, dx, dx if partials is None else partials,
        T, D, dy.stride(0), x.stride(0), dx.stride(0),
        HAS_DW=need_dweight, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=warps,
    )
    return dx, None if partials is None else partials.sum(0).to(weight.dtype)
