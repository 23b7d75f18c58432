"""Rotary position embedding with rotate_half (transformers' apply_rotary_pos_emb), q and k in one launch.

out = x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1] (x1, x2 the halves of the head dim D):
  out1 = x1 c1 - x2 s1,  out2 = x2 c2 + x1 s2,
each product rounded to the dtype, then the sum (HF's eager rounding order in fp16 / bf16). Backward is the
transpose of the rotation (cos and sin get no gradient):
  dx1 = do1 c1 + do2 s2,  dx2 = do2 c2 - do1 s1      (in fp32, rounded once).

q (B, Hq, L, D) and k (B, Hk, L, D) are read through any strides (HF passes transposed views of (B, L, H, D)),
cos and sin (B, L, D) through theirs (batch stride 0 broadcasts one table over the batch); outputs are written
through theirs. D even. A program owns BLOCK_L positions of one batch row and one head group: G = min(Hq, Hk)
groups of cdiv(Hq, G) q heads and cdiv(Hk, G) k heads (GQA: each group's q heads and their shared k head), so
cos and sin are read once per group and q and k take one launch.

Floor (H100, 3.0 TB/s; b bytes per element; the training step's q (8, 32, 1024, 64), k (8, 8, 1024, 64), bf16,
cos / sin (8, 1024, 64)): bytes = 2 b B (Hq + Hk) L D + 2 b B L D = 86.0 MB -> 28.7 us, forward or backward
(HF's model passes one (1, L, D) table for the whole batch: 84.0 MB -> 28.0 us).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import cdiv, next_pow2

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TILE_ELEMENTS = 2048       # BLOCK_L x D elements per head step: 32 positions at D = 64, 16-byte bf16 accesses


def block_shape(L: int, D: int) -> tuple[int, int, int]:
    """(BLOCK_L, BLOCK_HALF, num_warps)."""
    block_half = next_pow2(D // 2)
    block_l = max(1, min(TILE_ELEMENTS // (2 * block_half), next_pow2(L)))
    return block_l, block_half, 4 if block_l * block_half >= 256 else 1


@triton.jit
def _rotate_heads(src_ptr, dst_ptr, h_start, h_end, b, offs_l, offs_d, mask, half,
                  stride_b, stride_h, stride_l, out_b, out_h, out_l, c1, c2, s1, s2, BACKWARD: tl.constexpr):
    """Heads [h_start, h_end) of one tensor at positions offs_l of batch row b."""
    first = h_start.to(tl.int64)                          # pointers advance per head: no 32-bit products
    src = src_ptr + b * stride_b + first * stride_h + offs_l[:, None] * stride_l + offs_d[None, :]
    dst = dst_ptr + b * out_b + first * out_h + offs_l[:, None] * out_l + offs_d[None, :]
    for _ in range(h_start, h_end):
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:
            o1 = x1 * c1 + x2 * s2
            o2 = x2 * c2 - x1 * s1
        else:  # each product rounded to the dtype first, as HF's separate multiplies are
            dt = dst_ptr.dtype.element_ty
            o1 = (x1 * c1).to(dt).to(tl.float32) - (x2 * s1).to(dt).to(tl.float32)
            o2 = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
        tl.store(dst, o1.to(dst_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + half, o2.to(dst_ptr.dtype.element_ty), mask=mask)
        src += stride_h
        dst += out_h


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr,
    L, HQ, HK, HALF, Q_PER_GROUP, K_PER_GROUP,
    sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sc_b, sc_l, ss_b, ss_l,
    sqo_b, sqo_h, sqo_l, sko_b, sko_h, sko_l,
    BACKWARD: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    offs_l = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    b = tl.program_id(1).to(tl.int64)
    group = tl.program_id(2)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (offs_l < L)[:, None] & (offs_d < HALF)[None, :]
    offs_l = offs_l.to(tl.int64)
    cos = cos_ptr + b * sc_b + offs_l[:, None] * sc_l + offs_d[None, :]
    sin = sin_ptr + b * ss_b + offs_l[:, None] * ss_l + offs_d[None, :]
    c1 = tl.load(cos, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos + HALF, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin + HALF, mask=mask, other=0.0).to(tl.float32)
    q_start = group * Q_PER_GROUP
    _rotate_heads(q_ptr, qo_ptr, q_start, tl.minimum(q_start + Q_PER_GROUP, HQ), b, offs_l, offs_d, mask, HALF,
                  sq_b, sq_h, sq_l, sqo_b, sqo_h, sqo_l, c1, c2, s1, s2, BACKWARD)
    k_start = group * K_PER_GROUP
    _rotate_heads(k_ptr, ko_ptr, k_start, tl.minimum(k_start + K_PER_GROUP, HK), b, offs_l, offs_d, mask, HALF,
                  sk_b, sk_h, sk_l, sko_b, sko_h, sko_l, c1, c2, s1, s2, BACKWARD)


def _bhl(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_out: torch.Tensor,
           k_out: torch.Tensor, backward: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, Hq, L, D) and k (B, Hk, L, D) into q_out and k_out (same shapes, any strides), in one launch:
    forward, or with backward the transposed rotation (q, k then being the outputs' gradients).
    cos, sin (B, L, D) (batch stride 0 to share one table); every last dim of unit stride; D even."""
    B, HQ, L, D = q.shape
    HK = k.shape[1]
    if q.numel() == 0 and k.numel() == 0:
        return q_out, k_out
    block_l, block_half, warps = block_shape(L, D)
    groups = max(1, min(HQ, HK))
    _rotary_kernel[(cdiv(L, block_l), B, groups)](
        q, k, cos, sin, q_out, k_out,
        L, HQ, HK, D // 2, cdiv(HQ, groups), cdiv(HK, groups),
        *_bhl(q), *_bhl(k), cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
        *_bhl(q_out), *_bhl(k_out),
        BACKWARD=backward, BLOCK_L=block_l, BLOCK_HALF=block_half, num_warps=warps,
    )
    return q_out, k_out
