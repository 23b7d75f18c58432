"""Fused LoRA linear: y = x W0^T + bias + s * dropout(x) A^T B^T, forward and backward kernels.

Three kernels, each reused by forward and backward through strides:
- shrink:      xa = c * dropout(x) @ A^T                 (T, r) in fp32; also g = c * dy @ B in backward.
- matmul:      y = x @ W^T + xa @ B^T (+ bias)           the base GEMM with the LoRA expand as extra K steps,
                                                          so the d_out-wide LoRA product never touches memory;
                                                          also dx = dy @ W0 + mask * (g @ A) in backward.
- weight grad: out = sum_t dropout(G)[t, :]^T H[t, :]    (N, r) in fp32: dB = dy^T xa, dA^T = dropout(x)^T g,
                                                          both in one launch (lora_weight_grads).
A and B may be float32 master weights on a half-precision x: the shrink reads A as x's dtype, the expand
reads B in fp32 (as xa), so no cast runs outside the kernels.
The matmul has a decode path (T <= 64, memory-bound: _lora_decode_kernel, one row block, K split across
programs whose last one per column block sums the partials; in backward it also writes dA and dB, so the whole
LoRA backward is one launch there, as the forward is) and a prefill path (tensor-core tiles, grouped order);
both are autotuned per T bucket, shape, rank and dtype. Decode floor: W0's bytes at 3.0 TB/s (4096x4096 bf16:
0.0112 ms; cuBLAS took 0.0165 on the H100, the v4 kernel 0.0179). On Hopper
(compute capability >= 9) the fp16/bf16 prefill matmul runs a third kernel, _lora_matmul_tma_kernel: TMA
tensor descriptors and a persistent grid (selection rule: _tma_programs and _tma_layout; TMA_PREFILL forces it
or switches it off). Its floor is the prefill GEMM's: 2T·d_in·d_out flops at 790 TFLOP/s (4096³: 0.174 ms).

Dropout hashes a seed read from device memory with the element's logical index t * d_in + k (_keep_mask), so
backward regenerates the forward's mask without storing it, and CUDA-graph replays draw new masks (the index
wraps at 2^32, as the hash reads 32 bits). Token rows are multiplied by their stride in 64 bits: T · d passes
2^31 at 150k tokens of a 14336-wide FFN, and a 32-bit product there addresses memory before the tensor.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import warnings

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
from triton.tools.tensor_descriptor import TensorDescriptor

from .configs import (DECODE_MAX_T, INTERPRETED, prefill_matmul_configs, prune_split_decode,  # noqa: F401
                      split_decode_configs, TunedLauncher, cdiv, dependent_launch, next_pow2, prune_by_t,
                      shrink_configs, t_bucket, tma_matmul_configs, tune_bench, wait_flags, weight_grad_configs)
from .split_state import arrive_last, count_in, split_state, wait_count

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rank_block(r: int) -> int:
    """The rank tile of the shrink, weight-grad and matmul kernels: r's power of two, from 16 (the smallest dot)
    to MAX_FUSED_RANK (the fused matmul's whole xa tile)."""
    return max(16, min(next_pow2(r), MAX_FUSED_RANK))


@triton.jit
def _mix32(h):
    """lowbias32 (C. Wellons' integer hash): a bijection of uint32 whose output bits each flip with probability
    ~1/2 when any input bit flips."""
    h ^= h >> 16
    h *= 0x7FEB352D
    h ^= h >> 15
    h *= 0x846CA68B
    h ^= h >> 16
    return h


@triton.jit
def _keep_mask(seed_ptr, offsets, dropout_p):
    """LoRA dropout's keep mask (P(keep) = 1 - dropout_p) at flat element offsets (row * width + column): a pure
    function of (seed, offset), so the forward and each backward kernel recompute the same mask whatever their
    tiles. Two rounds of an integer hash keyed by the seed, ~16 integer ops an element: tl.rand's 10-round Philox
    costs ~100, and at ~240 G elements/s on an H100 it was most of the training step's r-wide passes (a shrink
    over an 8192 x 5632 input with dropout ~190 us against a 31 us memory floor, 2026-11-26)."""
    key = _mix32(tl.load(seed_ptr).to(tl.uint32) + 0x9E3779B9)
    h = _mix32(_mix32(offsets.to(tl.uint32) ^ key) + key)
    return (h >> 8).to(tl.float32) >= dropout_p * 16777216.0       # 24 uniform bits against p


@triton.jit
def _dot(a, b, acc, FP32_DOT: tl.constexpr):
    """acc += a @ b in the operands' dtype: exact (ieee) for fp32 layers, as PyTorch's fp32 matmul."""
    if FP32_DOT:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _dot_fp32(a, b, acc, FP32_DOT: tl.constexpr):
    """acc += a @ b for fp32 operands: exact for fp32 layers, tf32 tensor cores for the LoRA term of half ones."""
    if FP32_DOT:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision="tf32")


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of program `pid` in grouped launch order: GROUP_M row blocks sweep the same
    W column blocks while those sit in L2 (at decode, all row blocks of one W tile run side by side)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    group_size = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (pid // group_size) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % group_size) % group_m, (pid % group_size) // group_m


@triton.jit
def store_split(ptr, offs_rows, offs_cols, stride_rows, stride_cols, tile, mask, SPLIT: tl.constexpr):
    """Store an fp32 (rows, cols) tile, or add it where SPLIT > 1 programs share the output (split over K or T;
    the launcher zeroes it)."""
    ptrs = ptr + offs_rows.to(tl.int64)[:, None] * stride_rows + offs_cols[None, :] * stride_cols
    if SPLIT == 1:
        tl.store(ptrs, tile, mask=mask)
    else:
        tl.atomic_add(ptrs, tile, mask=mask)


# ---------------------------------------------------------------------------------------------------- shrink
@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, out_ptr, seed_ptr,
    T, K, R, T_BUCKET,
    stride_xt, stride_xk, stride_ar, stride_ak, stride_ot, stride_or,
    scale, dropout_p,
    HAS_DROPOUT: tl.constexpr, FP32_DOT: tl.constexpr, LAUNCH_DEPENDENTS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    if LAUNCH_DEPENDENTS:  # the TMA matmul after this launch may start (it waits for xa)
        gdc_launch_dependents()
    pid_t = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_mask = (offs_t[:, None] < T) & (offs_k[None, :] < K)
        x = tl.load(x_ptr + offs_t.to(tl.int64)[:, None] * stride_xt + offs_k[None, :] * stride_xk, mask=x_mask,
                    other=0.0)
        if HAS_DROPOUT:
            keep = _keep_mask(seed_ptr, offs_t[:, None] * K + offs_k[None, :], dropout_p)
            x = tl.where(keep, x, 0.0)
        a = tl.load(a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                    mask=(offs_r[None, :] < R) & (offs_k[:, None] < K), other=0.0)  # (BLOCK_K, BLOCK_R)
        acc = _dot(x, a.to(x.dtype), acc, FP32_DOT)     # float32 master adapters: read as x's dtype
    store_split(out_ptr, offs_t, offs_r, stride_ot, stride_or, acc * scale,
                (offs_t[:, None] < T) & (offs_r[None, :] < R), SPLIT_K)


_lora_shrink = TunedLauncher(triton.autotune(
    shrink_configs(), key=["T_BUCKET", "K", "R", "HAS_DROPOUT"], prune_configs_by=prune_by_t("BLOCK_T", "SPLIT_K"),
    reset_to_zero=["out_ptr"], do_bench=tune_bench)(_lora_shrink_kernel))


def lora_shrink(x: torch.Tensor, lora_A: torch.Tensor, scale: float, seed: torch.Tensor | None = None,
                dropout: float = 0.0) -> torch.Tensor:
    """xa = scale / (1 - p) * (keep * x) @ lora_A^T in fp32.   x (T, K), lora_A (r, K) -> (T, r)."""
    T, K = x.shape
    R = lora_A.shape[0]
    if T == 0:
        return torch.empty((0, R), device=x.device, dtype=torch.float32)
    has_dropout = dropout > 0.0
    bucket = t_bucket(T)
    key = (bucket, K, R, has_dropout, x.dtype, lora_A.dtype)
    out = (torch.zeros if _lora_shrink.adds_into_output(key, "SPLIT_K") else torch.empty)(
        (T, R), device=x.device, dtype=torch.float32)
    block_r = rank_block(R)
    grid = lambda meta: (cdiv(T, meta["BLOCK_T"]), cdiv(R, block_r), meta["SPLIT_K"])
    _lora_shrink.launch(key, grid,
        x, lora_A, out, seed if has_dropout else out,
        T, K, R, bucket,
        *x.stride(), *lora_A.stride(), *out.stride(),                 # one call per tensor: each costs host time
        scale / (1.0 - dropout), dropout,
        HAS_DROPOUT=has_dropout, FP32_DOT=x.dtype == torch.float32, LAUNCH_DEPENDENTS=dependent_launch(x.device),
        BLOCK_R=block_r,
    )
    return out


# ---------------------------------------------------------------------------------------------------- matmul
@triton.jit
def base_k_step(x_ptr, w_ptr, offs_m, mask_m, offs_n, mask_n, k0, K, stride_xm, stride_xk, stride_wn, stride_wk,
                BLOCK_K: tl.constexpr):
    """The base GEMM's K step from k0: (x (BLOCK_M, BLOCK_K), W^T (BLOCK_K, BLOCK_N), offs_k, mask_k), zero
    out of bounds; also the multi-adapter tile's (kernels.lora_multi)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=mask_m[:, None] & mask_k[None, :], other=0.0)                          # (BLOCK_M, BLOCK_K)
    w = tl.load(w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                mask=mask_n[None, :] & mask_k[:, None], other=0.0)                          # (BLOCK_K, BLOCK_N)
    return x, w, offs_k, mask_k


@triton.jit
def store_tile(acc, bias_ptr, y_ptr, offs_m, mask_m, offs_n, mask_n, stride_ym, stride_yn, HAS_BIAS: tl.constexpr,
               ACCUMULATE: tl.constexpr = False):
    """A matmul tile's epilogue: y = acc (+ bias); ACCUMULATE adds y's values to the tile (the grouped backward's
    dx over its members). Also the decode and multi-adapter tiles' store."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    if ACCUMULATE:
        acc += tl.load(y_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _expand_given(acc, xa_ptr, b_ptr, offs_m, mask_m, offs_n, mask_n, offs_r, R, stride_xam, stride_xar, stride_bn,
                  stride_br, FP32_DOT: tl.constexpr, BLOCK_R: tl.constexpr):
    """acc + xa @ B^T for a given xa (fp32: the r-wide intermediate loses accuracy in half precision), BLOCK_R
    ranks at a time."""
    for r0 in range(0, R, BLOCK_R):
        offs_rr = r0 + offs_r
        xa = tl.load(xa_ptr + offs_m[:, None] * stride_xam + offs_rr[None, :] * stride_xar,
                     mask=mask_m[:, None] & (offs_rr[None, :] < R), other=0.0)             # (BLOCK_M, BLOCK_R)
        b = tl.load(b_ptr + offs_n[None, :] * stride_bn + offs_rr[:, None] * stride_br,
                    mask=mask_n[None, :] & (offs_rr[:, None] < R), other=0.0)               # (BLOCK_R, BLOCK_N)
        acc = _dot_fp32(xa, b.to(tl.float32), acc, FP32_DOT)
    return acc


@triton.jit
def lora_matmul_tile(
    pid_m, pid_n, x_ptr, w_ptr, a_ptr, xa_ptr, b_ptr, bias_ptr, y_ptr, seed_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_xam, stride_xar,
    stride_bn, stride_br, stride_ym, stride_yn,
    shrink_scale, dropout_p,
    FUSE_SHRINK: tl.constexpr, X_DROPOUT: tl.constexpr, OUT_DROPOUT: tl.constexpr, HAS_BIAS: tl.constexpr,
    FP32_DOT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, ACCUMULATE: tl.constexpr = False,
):
    """Tile (pid_m, pid_n) of the matmul below; also one member's tile in kernels.lora_grouped. One fp32
    accumulator: the LoRA expand adds into it after the base K loop, except with OUT_DROPOUT (the backward dx),
    where it goes in first, masked by the forward's dropout while it is all the accumulator holds."""
    tl.static_assert(not (FUSE_SHRINK and OUT_DROPOUT), "OUT_DROPOUT masks a given xa's term (the backward dx)")
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_n = offs_n < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if OUT_DROPOUT:  # backward dx: the LoRA branch's gradient passes the forward's dropout mask
        acc = _expand_given(acc, xa_ptr, b_ptr, offs_m, mask_m, offs_n, mask_n, offs_r, R, stride_xam, stride_xar,
                            stride_bn, stride_br, FP32_DOT, BLOCK_R)
        acc = tl.where(_keep_mask(seed_ptr, offs_m[:, None] * N + offs_n[None, :], dropout_p), acc, 0.0)
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x, w, offs_k, mask_k = base_k_step(x_ptr, w_ptr, offs_m, mask_m, offs_n, mask_n, k0, K, stride_xm, stride_xk,
                                           stride_wn, stride_wk, BLOCK_K)
        acc = _dot(x, w, acc, FP32_DOT)
        if FUSE_SHRINK:
            # the shrink rides along the base K loop: x is already on chip, A (r, K) is small and L2-resident
            a = tl.load(a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                        mask=(offs_r[None, :] < R) & mask_k[:, None], other=0.0)            # (BLOCK_K, BLOCK_R)
            if X_DROPOUT:
                x = tl.where(_keep_mask(seed_ptr, offs_m[:, None] * K + offs_k[None, :], dropout_p), x, 0.0)
            xa = _dot(x, a.to(x.dtype), xa, FP32_DOT)
    if FUSE_SHRINK:
        # ranks past R read zero A rows, but an inf in x makes inf * 0 = NaN there, which B's zero rows would
        # carry into y (NaN * 0): PyTorch's x A^T has no such lanes
        xa = tl.where(offs_r[None, :] < R, xa * shrink_scale, 0.0)
        if pid_n == 0:  # every column block computed the same xa; one stores it for backward
            tl.store(xa_ptr + offs_m[:, None] * stride_xam + offs_r[None, :] * stride_xar, xa,
                     mask=mask_m[:, None] & (offs_r[None, :] < R))
        b = tl.load(b_ptr + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
                    mask=mask_n[None, :] & (offs_r[:, None] < R), other=0.0)                # (BLOCK_R, BLOCK_N)
        acc = _dot_fp32(xa, b.to(tl.float32), acc, FP32_DOT)
    elif not OUT_DROPOUT:
        acc = _expand_given(acc, xa_ptr, b_ptr, offs_m, mask_m, offs_n, mask_n, offs_r, R, stride_xam, stride_xar,
                            stride_bn, stride_br, FP32_DOT, BLOCK_R)
    store_tile(acc, bias_ptr, y_ptr, offs_m, mask_m, offs_n, mask_n, stride_ym, stride_yn, HAS_BIAS, ACCUMULATE)


@triton.jit
def _lora_matmul_kernel(
    x_ptr, w_ptr, a_ptr, xa_ptr, b_ptr, bias_ptr, y_ptr, seed_ptr,
    M, N, K, R, T_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_xam, stride_xar,
    stride_bn, stride_br, stride_ym, stride_yn,
    shrink_scale, dropout_p,
    FUSE_SHRINK: tl.constexpr, X_DROPOUT: tl.constexpr, OUT_DROPOUT: tl.constexpr, HAS_BIAS: tl.constexpr,
    FP32_DOT: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    lora_matmul_tile(pid_m, pid_n, x_ptr, w_ptr, a_ptr, xa_ptr, b_ptr, bias_ptr, y_ptr, seed_ptr, M, N, K, R,
                     stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_xam, stride_xar,
                     stride_bn, stride_br, stride_ym, stride_yn, shrink_scale, dropout_p,
                     FUSE_SHRINK, X_DROPOUT, OUT_DROPOUT, HAS_BIAS, FP32_DOT, BLOCK_R, BLOCK_M, BLOCK_N, BLOCK_K,
                     ACCUMULATE)


_MATMUL_KEY = ["T_BUCKET", "N", "K", "R", "FUSE_SHRINK", "X_DROPOUT", "OUT_DROPOUT", "HAS_BIAS"]
_lora_matmul_prefill = TunedLauncher(triton.autotune(
    prefill_matmul_configs(), key=_MATMUL_KEY, do_bench=tune_bench)(_lora_matmul_kernel))
MAX_FUSED_RANK = 64  # the matmul holds the whole r-wide xa tile on chip
# The forward at decode with its shrink on the launch's own first programs (_lora_shrink_program) instead of in
# every program's K loop, where each program reads A over its K share from L2 (32 columns unsplit: half as many
# bytes again as W). Off until the card has timed it (bench.lora's ptlm_shrink_programs provider turns it on);
# PTLM_SHRINK_PROGRAMS=1 / 0.
SHRINK_PROGRAMS = os.environ.get("PTLM_SHRINK_PROGRAMS", "0") == "1"
# A shrink program's K step, and its K steps at most (so at most 16 programs: K = 4096 takes 8 of 4 steps).
# kernels.lora_multi's shrink programs take the same.
SHRINK_BLOCK_K = tl.constexpr(128)
SHRINK_K_STEPS = 4


def decode_shrink_split(K: int, block_k: int, k_steps: int) -> int:
    """The shrink programs' shares of K: k_steps steps of block_k each, 1 to 16 of them."""
    return max(1, min(16, cdiv(cdiv(K, block_k), k_steps)))


# --------------------------------------------------------------------------------------- matmul, decode path
@triton.jit
def _lora_decode_kernel(
    x_ptr, w_ptr, a_ptr, b_ptr, bias_ptr, y_ptr, xa_ptr, seed_ptr, h_ptr, x2_ptr, dk_ptr, dn_ptr, part_ptr, count_ptr,
    M, N, K, R, T_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br, stride_ym, stride_yn,
    stride_x2m, stride_x2n,
    scale, dropout_p,
    FUSE_SHRINK: tl.constexpr, X_DROPOUT: tl.constexpr, OUT_DROPOUT: tl.constexpr, HAS_BIAS: tl.constexpr,
    WEIGHT_GRADS: tl.constexpr, FP32_DOT: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    SHRINK_SPLIT: tl.constexpr = 0,
):
    """y = x @ W^T + keep_out * (xa @ B^T) (+ bias) for M <= BLOCK_M rows: one row block, so W streams from HBM
    once; SPLIT_K programs per BLOCK_N columns, each over its share of K.

    The LoRA term is linear in xa, so each split adds its partial shrink's expand (x_k A_k^T) B^T to its partial
    tile; the last split of a column block to finish (an atomic counter) sums the partials and runs the
    epilogue. Each program reads A only over its own K share: the fused shrink costs r / BLOCK_N of the W bytes
    in L2 reads (with one program per 32 columns and no split, it cost half as much again as W).
    Without FUSE_SHRINK, xa (M, R) is given and split 0 adds its expand. SHRINK_SPLIT > 0 (the forward): xa is
    not given but made in the same launch by its first SHRINK_SPLIT programs (_lora_shrink_program, each over a
    share of K, A read once in all), and the split-0 programs wait for it after their K loop (in launch order the
    shrink programs start first and wait for nothing; kernels.lora_multi's decode does the same).

    WEIGHT_GRADS (the backward, x = dy, W = W0^T, A = B^T, B = A^T, h = the forward's xa, x2 = its x) also
    writes dk = x^T h (K, R) (dB), each BLOCK_K rows of it by one program, and dn = ((keep x2)^T xa)^T (R, N)
    (dA, rank-major as lora_A) in the epilogue, both in their buffers' dtypes: dx, dA and dB in one launch.
    """
    pid = tl.program_id(0)
    if pid < SHRINK_SPLIT:
        _lora_shrink_program(pid, x_ptr, a_ptr, xa_ptr, seed_ptr, part_ptr + SPLIT_K * M * (N + R), count_ptr, M, N,
                             K, R, stride_xm, stride_xk, stride_ar, stride_ak, scale, dropout_p, X_DROPOUT, FP32_DOT,
                             SHRINK_SPLIT, BLOCK_M, BLOCK_R)
    else:  # a matmul program
        pid_n, pid_k, k_lo, k_hi = split_k_program(pid - SHRINK_SPLIT, K, BLOCK_K, SPLIT_K)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_r = tl.arange(0, BLOCK_R)
        mask_m = offs_m < M
        mask_n = offs_n < N
        mask_r = offs_r < R

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        if WEIGHT_GRADS:
            h = tl.load(h_ptr + offs_m[:, None] * R + offs_r[None, :], mask=mask_m[:, None] & mask_r[None, :],
                        other=0.0)                                                            # (BLOCK_M, BLOCK_R)
            num_n = tl.cdiv(N, BLOCK_N)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            x, w, offs_k, mask_k = base_k_step(x_ptr, w_ptr, offs_m, mask_m, offs_n, mask_n, k0, K, stride_xm,
                                               stride_xk, stride_wn, stride_wk, BLOCK_K)
            acc = _dot(x, w, acc, FP32_DOT)
            if FUSE_SHRINK:
                a = tl.load(a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                            mask=mask_r[None, :] & mask_k[:, None], other=0.0)                  # (BLOCK_K, BLOCK_R)
                x_kept = x
                if X_DROPOUT:
                    x_kept = tl.where(_keep_mask(seed_ptr, offs_m[:, None] * K + offs_k[None, :], dropout_p), x, 0.0)
                xa = _dot(x_kept, a.to(x.dtype), xa, FP32_DOT)
            if WEIGHT_GRADS:
                if (k0 // BLOCK_K) % num_n == pid_n:  # these dk rows are this program's: x is on chip already
                    dk = _dot_fp32(tl.trans(x).to(tl.float32), h, tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32),
                                   FP32_DOT)
                    tl.store(dk_ptr + offs_k[:, None] * R + offs_r[None, :], dk.to(dk_ptr.dtype.element_ty),
                             mask=mask_k[:, None] & mask_r[None, :])

        lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if FUSE_SHRINK:
            xa = tl.where(mask_r[None, :], xa * scale, 0.0)              # no NaN lanes past R (inf * 0): see the tile
            b = tl.load(b_ptr + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
                        mask=mask_n[None, :] & mask_r[:, None], other=0.0)                     # (BLOCK_R, BLOCK_N)
            lora = _dot_fp32(xa, b.to(tl.float32), lora, FP32_DOT)
        else:
            if SHRINK_SPLIT > 0:  # split 0 alone expands: it waits for the shrink programs' xa, then counts out
                if pid_k == 0:
                    wait_count(count_ptr + tl.cdiv(N, 16) + 1, 1)
            for r0 in range(0, tl.where(pid_k == 0, R, 0), BLOCK_R):
                offs_rr = r0 + offs_r
                xa_given = tl.load(xa_ptr + offs_m[:, None] * R + offs_rr[None, :],
                                   mask=mask_m[:, None] & (offs_rr[None, :] < R), other=0.0)  # (BLOCK_M, BLOCK_R)
                b = tl.load(b_ptr + offs_n[None, :] * stride_bn + offs_rr[:, None] * stride_br,
                            mask=mask_n[None, :] & (offs_rr[:, None] < R), other=0.0)           # (BLOCK_R, BLOCK_N)
                lora = _dot_fp32(xa_given, b.to(tl.float32), lora, FP32_DOT)
        if SHRINK_SPLIT > 0:
            if pid_k == 0:  # the last of them resets ready and done for the next launch
                counters = count_ptr + tl.cdiv(N, 16)
                if arrive_last(counters, 2, tl.cdiv(N, BLOCK_N)):
                    tl.atomic_xchg(counters + 1, 0)
                    tl.atomic_xchg(counters + 2, 0)
        if OUT_DROPOUT:  # the mask is elementwise, so it applies to each split's part of the LoRA term
            acc += tl.where(_keep_mask(seed_ptr, offs_m[:, None] * N + offs_n[None, :], dropout_p), lora, 0.0)
        else:
            acc += lora

        if SPLIT_K == 1:
            _decode_epilogue(acc, xa, pid_n, offs_m, mask_m, offs_n, mask_n, offs_r, mask_r, N, R, bias_ptr, y_ptr,
                             xa_ptr, x2_ptr, dn_ptr, seed_ptr, dropout_p, stride_ym, stride_yn, stride_x2m, stride_x2n,
                             FUSE_SHRINK, OUT_DROPOUT, HAS_BIAS, WEIGHT_GRADS, FP32_DOT, ACCUMULATE, BLOCK_N, BLOCK_R)
        else:
            # partials: (SPLIT_K, M, N) tiles, then (SPLIT_K, M, R) shrinks, fp32
            xa_part = part_ptr + SPLIT_K * M * N + offs_m[:, None] * R + offs_r[None, :]
            mask_xa = mask_m[:, None] & mask_r[None, :]
            if FUSE_SHRINK:
                if WEIGHT_GRADS or pid_n == 0:  # the same values from every column block: whichever finishes reads them
                    tl.store(xa_part + pid_k * M * R, xa, mask=mask_xa)
            if split_k_arrive(acc, part_ptr, count_ptr, pid_n, pid_k, offs_m, mask_m, offs_n, mask_n, M, N, SPLIT_K):
                acc = split_k_total(part_ptr, count_ptr, pid_n, offs_m, mask_m, offs_n, mask_n, M, N, SPLIT_K,
                                    BLOCK_M, BLOCK_N)
                xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                if FUSE_SHRINK:
                    for s in tl.static_range(SPLIT_K):
                        xa += tl.load(xa_part + s * M * R, mask=mask_xa, other=0.0, cache_modifier=".cg")
                _decode_epilogue(acc, xa, pid_n, offs_m, mask_m, offs_n, mask_n, offs_r, mask_r, N, R, bias_ptr, y_ptr,
                                 xa_ptr, x2_ptr, dn_ptr, seed_ptr, dropout_p, stride_ym, stride_yn, stride_x2m,
                                 stride_x2n, FUSE_SHRINK, OUT_DROPOUT, HAS_BIAS, WEIGHT_GRADS, FP32_DOT, ACCUMULATE,
                                 BLOCK_N, BLOCK_R)


@triton.jit
def _lora_shrink_program(q, x_ptr, a_ptr, xa_ptr, seed_ptr, ws_ptr, count_ptr, M, N, K, R, stride_xm, stride_xk,
                         stride_ar, stride_ak, scale, dropout_p, X_DROPOUT: tl.constexpr, FP32_DOT: tl.constexpr,
                         SHRINK_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """Shrink program q of a decode launch (_lora_decode_kernel's SHRINK_SPLIT): keep * x A^T over the q-th
    share of K (whole SHRINK_BLOCK_K steps) into ws (SHRINK_SPLIT, M, BLOCK_R) fp32; the last of them to arrive
    sums the shares in order into xa (M, R), scaled, and counts it ready. Compiled to nothing without shrink
    programs (the caller's branch is not taken)."""
    if SHRINK_SPLIT > 0:
        offs_m = tl.arange(0, BLOCK_M)
        offs_r = tl.arange(0, BLOCK_R)
        mask_m = offs_m < M
        mask_r = offs_r < R
        k_share = tl.cdiv(tl.cdiv(K, SHRINK_BLOCK_K), SHRINK_SPLIT) * SHRINK_BLOCK_K
        xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(q * k_share, tl.minimum(K, (q + 1) * k_share), SHRINK_BLOCK_K):
            offs_k = k0 + tl.arange(0, SHRINK_BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)                # (BLOCK_M, SHRINK_BLOCK_K)
            if X_DROPOUT:
                x = tl.where(_keep_mask(seed_ptr, offs_m[:, None] * K + offs_k[None, :], dropout_p), x, 0.0)
            a = tl.load(a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                        mask=mask_r[None, :] & mask_k[:, None], other=0.0)                # (SHRINK_BLOCK_K, BLOCK_R)
            xa = _dot(x, a.to(x.dtype), xa, FP32_DOT)
        part = ws_ptr + offs_m[:, None] * BLOCK_R + offs_r[None, :]                          # share 0's
        tl.store(part + q * M * BLOCK_R, xa, mask=mask_m[:, None])
        counters = count_ptr + tl.cdiv(N, 16)
        if arrive_last(counters, 0, SHRINK_SPLIT):
            tl.atomic_xchg(counters, 0)
            total = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for s in tl.static_range(SHRINK_SPLIT):
                total += tl.load(part + s * M * BLOCK_R, mask=mask_m[:, None], other=0.0, cache_modifier=".cg")
            # no NaN lanes past R (inf * 0): see the tile
            tl.store(xa_ptr + offs_m[:, None] * R + offs_r[None, :], tl.where(mask_r[None, :], total * scale, 0.0),
                     mask=mask_m[:, None] & mask_r[None, :])
            count_in(counters + 1)


@triton.jit
def split_k_program(pid, K, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """(column block, split, first k, end k) of program `pid` in a split-K decode grid: the SPLIT_K splits of a
    column block are neighbours, so they run (and finish) together; each takes whole BLOCK_K steps of K.
    Also kernels.lora_multi's decode (its matmul programs after its shrink programs)."""
    pid_k = pid % SPLIT_K
    k_share = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_lo = pid_k * k_share
    return pid // SPLIT_K, pid_k, k_lo, tl.minimum(K, k_lo + k_share)


@triton.jit
def split_k_arrive(acc, part_ptr, count_ptr, pid_n, pid_k, offs_m, mask_m, offs_n, mask_n, M, N,
                   SPLIT_K: tl.constexpr):
    """Split pid_k's partial (BLOCK_M, BLOCK_N) tile of column block pid_n into part (SPLIT_K, M, N) fp32, then
    counted in: True for the last split of the block to arrive, which sums the partials (split_k_total). What
    the caller stored before this call is visible to that program too. Also kernels.lora_multi's decode."""
    tl.store(part_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :], acc,
             mask=mask_m[:, None] & mask_n[None, :])
    return arrive_last(count_ptr, pid_n, SPLIT_K)


@triton.jit
def split_k_total(part_ptr, count_ptr, pid_n, offs_m, mask_m, offs_n, mask_n, M, N, SPLIT_K: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The last split's sum of the block's partials; zeroes the block's counter for the next launch (so no
    memset launch runs before each)."""
    tl.atomic_xchg(count_ptr + pid_n, 0)
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        total += tl.load(part_ptr + s * M * N + offs_m[:, None] * N + offs_n[None, :],
                         mask=mask_m[:, None] & mask_n[None, :], other=0.0, cache_modifier=".cg")
    return total


@triton.jit
def _decode_epilogue(acc, xa, pid_n, offs_m, mask_m, offs_n, mask_n, offs_r, mask_r, N, R, bias_ptr, y_ptr, xa_ptr,
                     x2_ptr, dn_ptr, seed_ptr, dropout_p, stride_ym, stride_yn, stride_x2m, stride_x2n,
                     FUSE_SHRINK: tl.constexpr, OUT_DROPOUT: tl.constexpr, HAS_BIAS: tl.constexpr,
                     WEIGHT_GRADS: tl.constexpr, FP32_DOT: tl.constexpr, ACCUMULATE: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """A column block's whole sums: bias, y (added to y's values with ACCUMULATE); the shrink's xa (column
    block 0); with WEIGHT_GRADS dn's rows."""
    store_tile(acc, bias_ptr, y_ptr, offs_m, mask_m, offs_n, mask_n, stride_ym, stride_yn, HAS_BIAS,
               ACCUMULATE)                                     # the dropout mask is in acc already
    if FUSE_SHRINK:
        if pid_n == 0:
            tl.store(xa_ptr + offs_m[:, None] * R + offs_r[None, :], xa, mask=mask_m[:, None] & mask_r[None, :])
        if WEIGHT_GRADS:
            x2 = tl.load(x2_ptr + offs_m.to(tl.int64)[:, None] * stride_x2m + offs_n[None, :] * stride_x2n,
                         mask=mask_m[:, None] & mask_n[None, :], other=0.0)                 # (BLOCK_M, BLOCK_N)
            if OUT_DROPOUT:
                x2 = tl.where(_keep_mask(seed_ptr, offs_m[:, None] * N + offs_n[None, :], dropout_p), x2, 0.0)
            dn = _dot_fp32(tl.trans(x2).to(tl.float32), xa, tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32), FP32_DOT)
            tl.store(dn_ptr + offs_r[None, :] * N + offs_n[:, None], dn.to(dn_ptr.dtype.element_ty),
                     mask=mask_n[:, None] & mask_r[None, :])                                 # rank-major (R, N)


_lora_decode = TunedLauncher(triton.autotune(
    split_decode_configs(), key=["T_BUCKET", "N", "K", "R", "FUSE_SHRINK", "X_DROPOUT", "OUT_DROPOUT", "HAS_BIAS",
                                 "WEIGHT_GRADS", "SHRINK_SPLIT"],
    prune_configs_by=prune_split_decode(), do_bench=tune_bench)(_lora_decode_kernel))
def split_buffers(launcher: TunedLauncher, key: tuple, device: torch.device, per_split: int, N: int,
                  unused: torch.Tensor, extra_counters: int = 0,
                  extra_workspace: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(partials workspace, arrival counters) for a split-K decode launch: per_split fp32 elements per split of
    the key's config (the most any config splits while it tunes) and extra_workspace more, cdiv(N, 16) counters
    and extra_counters more; `unused` twice when it neither splits nor asks for extra counters."""
    known = launcher.chosen(key)
    split = max(c.kwargs["SPLIT_K"] for c in launcher.autotuner.configs) if known is None else known["SPLIT_K"]
    if split == 1 and not extra_counters:
        return unused, unused
    counters, workspace = split_state(device, cdiv(N, 16) + extra_counters, split * per_split + extra_workspace)
    return workspace, counters


def _lora_decode_launch(x, weight, lora_A, lora_B, scale, bias, y, xa, seed, x_dropout: float,
                        out_dropout: float, fuse_shrink: bool, grads_of: tuple | None = None,
                        accumulate: bool = False, shrink_programs: bool = False):
    """The decode kernel into y (M, N) (onto its values with accumulate) and, with fuse_shrink or
    shrink_programs, xa (M, R) fp32 (else xa is given). grads_of: (h (M, R) fp32, x2 (M, N), dk (K, R) fp32,
    dn (N, R) fp32) for the backward's weight gradients."""
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    bucket = t_bucket(M)
    weight_grads = grads_of is not None
    split_shrink = decode_shrink_split(K, SHRINK_BLOCK_K.value, SHRINK_K_STEPS) if shrink_programs else 0
    key = (bucket, N, K, R, fuse_shrink, x_dropout > 0.0, out_dropout > 0.0, bias is None, weight_grads,
           x.dtype, weight.dtype, lora_A.dtype, lora_B.dtype) + (("shrink", split_shrink) if split_shrink else ())
    if accumulate and _lora_decode.chosen(key) is None:
        return _accumulated(y, lambda out: _lora_decode_launch(x, weight, lora_A, lora_B, scale, bias, out, xa, seed,
                                                               x_dropout, out_dropout, fuse_shrink, grads_of,
                                                               shrink_programs=shrink_programs))
    block_r = rank_block(R)
    part, counters = split_buffers(_lora_decode, key, x.device, M * (N + R), N, y,
                                   extra_counters=3 if split_shrink else 0,
                                   extra_workspace=split_shrink * M * block_r)
    h, x2, dk, dn = grads_of if weight_grads else (xa, y, xa, xa)
    grid = lambda meta: (split_shrink + cdiv(N, meta["BLOCK_N"]) * meta["SPLIT_K"],)
    _lora_decode.launch(key, grid,
        x, weight, lora_A, lora_B, bias if bias is not None else y, y, xa,
        seed if (x_dropout > 0.0 or out_dropout > 0.0) else y, h, x2, dk, dn, part, counters,
        M, N, K, R, bucket,
        *x.stride(), *weight.stride(), *lora_A.stride(), *lora_B.stride(), *y.stride(), *x2.stride(),
        scale / (1.0 - x_dropout), max(x_dropout, out_dropout),
        FUSE_SHRINK=fuse_shrink, X_DROPOUT=(fuse_shrink or shrink_programs) and x_dropout > 0.0,
        OUT_DROPOUT=out_dropout > 0.0, HAS_BIAS=bias is not None, WEIGHT_GRADS=weight_grads,
        FP32_DOT=x.dtype == torch.float32, ACCUMULATE=accumulate, BLOCK_M=max(16, next_pow2(M)), BLOCK_R=block_r,
        SHRINK_SPLIT=split_shrink,
    )


def _accumulated(y: torch.Tensor, launch) -> bool:
    """y += what launch(out) writes into out: a key's first launch with accumulate, whose config is not known
    yet. Its tuning runs the kernel once per candidate, so it runs into a temporary (and tunes the key, which
    accumulating launches share) instead of adding into y again on every trial."""
    out = torch.empty_like(y)
    launched = launch(out)
    if launched is not False:
        y.add_(out)
    return launched


def decode_backward_fuses(dy: torch.Tensor, lora_A: torch.Tensor) -> bool:
    """Whether lora_decode_backward applies: decode rows and a rank the fused shrink holds."""
    return 0 < dy.shape[0] <= DECODE_MAX_T and lora_A.shape[0] <= MAX_FUSED_RANK


def lora_decode_backward(dy: torch.Tensor, x: torch.Tensor, xa: torch.Tensor, weight: torch.Tensor,
                         lora_A: torch.Tensor, lora_B: torch.Tensor, g_scale: float, seed: torch.Tensor | None = None,
                         dropout: float = 0.0, dx: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The LoRA backward at decode in one launch: g = g_scale * dy @ B, dx = dy @ W0 + keep * (g @ A),
    dA^T = (keep * x)^T g, dB = dy^T xa (see decode_backward_fuses).

    dy (T, d_out); x (T, d_in) the forward's input; xa (T, r) fp32 the forward's; weight W0 (d_out, d_in) any
    strides; lora_A (r, d_in); lora_B (d_out, r); keep: the forward's dropout mask of (seed, t * d_in + k).
    Returns dx (T, d_in) in dy's dtype (added to `dx`'s values if given: the grouped backward's sum over its
    members), dA (r, d_in) and dB (d_out, r), contiguous in lora_A's and lora_B's dtypes (no cast or layout copy
    follows: autograd copies a gradient whose strides differ from its parameter's).
    """
    T, d_out = dy.shape
    d_in, r = x.shape[1], lora_A.shape[0]
    accumulate = dx is not None
    if dx is None:
        dx = torch.empty((T, d_in), device=dy.device, dtype=dy.dtype)
    g = torch.empty((T, r), device=dy.device, dtype=torch.float32)
    d_a = torch.empty((r, d_in), device=dy.device, dtype=lora_A.dtype)
    d_b = torch.empty((d_out, r), device=dy.device, dtype=lora_B.dtype)
    _lora_decode_launch(dy, weight.t(), lora_B.t(), lora_A.t(), g_scale, None, dx, g, seed, 0.0, dropout, True,
                        (xa.contiguous(), x, d_b, d_a), accumulate)
    return dx, d_a, d_b


# ------------------------------------------------------------------------------------ matmul, Hopper TMA path
@triton.jit
def _lora_matmul_tma_kernel(
    x_desc, w_desc, xa_desc, b_desc, y_desc, bias_ptr, seed_ptr,
    M, N, K, T_BUCKET,
    dropout_p,
    W_KMAJOR: tl.constexpr, B_RMAJOR: tl.constexpr, OUT_DROPOUT: tl.constexpr, HAS_BIAS: tl.constexpr,
    FP32_DOT: tl.constexpr, ACCUMULATE: tl.constexpr, WAIT_PRIOR: tl.constexpr, R: tl.constexpr,
    BLOCK_R: tl.constexpr, NUM_SMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """The prefill matmul above (separate shrink: xa given) on Hopper: every tile moves by TMA (host-side
    descriptors; out-of-bounds rows and columns read as zeros and are never written, so no masks), and
    NUM_SMS persistent programs walk the tiles in grouped order. The LoRA expand runs as R / BLOCK_R extra K
    steps first in the tile; in backward dx the output dropout mask then applies to the accumulator, which holds
    only the LoRA term at that point.

    The tile loop is not flattened into the K loop: on the H100 with Triton 3.6 (4096^3, bf16, 128x256x64)
    the flattened loop ran at 316 TFLOP/s and this one at 716 (cuBLAS 706; bench/NOTES.md, v5).

    w_desc is W (N, K) with W_KMAJOR, else W^T (K, N) (the backward's dy @ W0); b_desc is B (N, R) with
    B_RMAJOR, else B^T (R, N). y_desc stores half a tile at a time (BLOCK_N // 2 columns): half the
    epilogue's shared memory, which 128x256 tiles need to keep three pipeline stages. WAIT_PRIOR: launched as
    the dependent of the shrink that writes xa (its launch and first tiles' setup overlap the shrink's tail).
    """
    if WAIT_PRIOR:
        gdc_wait()
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in range(tl.program_id(0), num_tiles, NUM_SMS):
        pid_m, pid_n = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        # The LoRA steps open the tile's MMA chain (after the K loop, Triton 3.8's ptxas serialized the loop's
        # wgmma, C7515). In backward dx only the LoRA branch's gradient passes the forward's dropout mask: it is
        # all the accumulator holds at that point, so the mask applies there and one accumulator serves (a
        # second one for the LoRA term spilled at 128 x 256 with ACCUMULATE: Triton 3.6, ptxas).
        acc = _tma_lora_steps(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), xa_desc, b_desc, off_m, off_n,
                              B_RMAJOR, FP32_DOT, R, BLOCK_R)
        if OUT_DROPOUT:
            offs_m = off_m + tl.arange(0, BLOCK_M)
            offs_n = off_n + tl.arange(0, BLOCK_N)
            acc = tl.where(_keep_mask(seed_ptr, offs_m[:, None] * N + offs_n[None, :], dropout_p), acc, 0.0)
        acc = tma_k_loop(acc, x_desc, w_desc, off_m, off_n, K, W_KMAJOR, FP32_DOT, BLOCK_K)
        left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        _tma_store_half(left, y_desc, bias_ptr, off_m, off_n, N, HAS_BIAS, ACCUMULATE, BLOCK_N // 2)
        _tma_store_half(right, y_desc, bias_ptr, off_m, off_n + BLOCK_N // 2, N, HAS_BIAS, ACCUMULATE, BLOCK_N // 2)


@triton.jit
def tma_k_loop(acc, x_desc, w_desc, off_m, off_n, K, W_KMAJOR: tl.constexpr, FP32_DOT: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """acc += x[off_m:, :] @ W^T[:, off_n:] over K through the descriptors (w_desc: W (N, K) with W_KMAJOR, else
    W^T (K, N)); also kernels.lora_multi's TMA tile."""
    for ki in range(tl.cdiv(K, BLOCK_K)):
        off_k = ki * BLOCK_K
        x = x_desc.load([off_m, off_k])                                                   # (BLOCK_M, BLOCK_K)
        if W_KMAJOR:
            w = w_desc.load([off_n, off_k]).T                                             # (BLOCK_K, BLOCK_N)
        else:
            w = w_desc.load([off_k, off_n])
        acc = _dot(x, w, acc, FP32_DOT)
    return acc


@triton.jit
def _tma_store_half(acc, y_desc, bias_ptr, off_m, off_n, N, HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr,
                    HALF_N: tl.constexpr):
    """Epilogue of half a tile (HALF_N columns from off_n): bias, the sum so far (ACCUMULATE), store."""
    offs_n = off_n + tl.arange(0, HALF_N)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if ACCUMULATE:  # the grouped backward's dx: this member's product added to the members' before it
        acc += y_desc.load([off_m, off_n]).to(tl.float32)
    y_desc.store([off_m, off_n], acc.to(y_desc.dtype))


@triton.jit
def _tma_lora_steps(acc, xa_desc, b_desc, off_m, off_n, B_RMAJOR: tl.constexpr, FP32_DOT: tl.constexpr,
                    R: tl.constexpr, BLOCK_R: tl.constexpr):
    """acc += xa @ B^T for one tile as R / BLOCK_R unrolled K steps; xa stays fp32, as in the pointer kernel."""
    for rs in tl.static_range(0, R, BLOCK_R):
        xa = xa_desc.load([off_m, rs])                                                    # (BLOCK_M, BLOCK_R)
        if B_RMAJOR:
            b = b_desc.load([off_n, rs]).T                                                # (BLOCK_R, BLOCK_N)
        else:
            b = b_desc.load([rs, off_n])
        acc = _dot_fp32(xa, b.to(tl.float32), acc, FP32_DOT)
    return acc


_TMA_DESCS = ("x_desc", "w_desc", "xa_desc", "b_desc", "y_desc")


def _tma_blocks(meta: dict, w_kmajor: bool, b_rmajor: bool) -> list[list[int]]:
    """The block shapes of x, W, xa, B and y's descriptors under a config's meta-parameters."""
    bm, bn, bk, br = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"], TMA_BLOCK_R
    return [[bm, bk], [bn, bk] if w_kmajor else [bk, bn], [bm, br], [bn, br] if b_rmajor else [br, bn], [bm, bn // 2]]


def _tma_block_shapes(nargs: dict) -> None:
    """Autotune pre_hook: a host-side descriptor carries its block shape, which each config sets."""
    blocks = _tma_blocks(nargs, nargs["W_KMAJOR"], nargs["B_RMAJOR"])
    for name, block in zip(_TMA_DESCS, blocks):
        nargs[name].block_shape = block


_lora_matmul_tma = TunedLauncher(triton.autotune(
    tma_matmul_configs(_tma_block_shapes),
    key=["T_BUCKET", "N", "K", "R", "W_KMAJOR", "B_RMAJOR", "OUT_DROPOUT", "HAS_BIAS"],
    do_bench=tune_bench)(_lora_matmul_tma_kernel))
# None: the TMA path where it pays (compiled, compute capability >= 9, T > DECODE_MAX_T, fp16/bf16);
# True: wherever the operands allow it, at any T, under the interpreter also for fp32 (tests); False: never.
# Compiled fp32 layers keep the pointer path: exact fp32 has no tensor-core path for TMA to feed, and its
# tiles would not fit shared memory (128x256x64, 3 stages: 320 KB). PTLM_TMA_PREFILL=0 / 1 sets it for a
# process: benchmarks compare the two paths that way.
TMA_PREFILL: bool | None = {"0": False, "1": True}.get(os.environ.get("PTLM_TMA_PREFILL", ""))
TMA_BLOCK_R = 16  # LoRA K step of the TMA kernel: small tiles keep its epilogue's shared memory low
# Why the automatic TMA path was switched off in this process, if it was (see _lora_matmul_tma_launch).
tma_error: str | None = None
_INTERPRETED_PROGRAMS = 3  # persistent programs under the interpreter: each walks several tiles


@functools.lru_cache(maxsize=None)
def _tma_sms(device_index: int) -> int:
    """The device's SM count if it has TMA (compute capability >= 9), else 0."""
    props = torch.cuda.get_device_properties(device_index)
    return props.multi_processor_count if props.major >= 9 else 0


def _tma_programs(x: torch.Tensor, M: int, min_tokens: int = DECODE_MAX_T) -> int:
    """How many persistent programs the TMA path runs for x (M tokens), or 0 where it does not apply: at most
    min_tokens tokens, unless PTLM_TMA_PREFILL=1 forces it."""
    if TMA_PREFILL is False or (TMA_PREFILL is None and (M <= min_tokens or tma_error is not None)):
        return 0
    if INTERPRETED:
        return _INTERPRETED_PROGRAMS if TMA_PREFILL else 0
    if not x.is_cuda or x.dtype == torch.float32:
        return 0
    return _tma_sms(x.device.index if x.device.index is not None else torch.cuda.current_device())


_DESCRIPTOR_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TensorDescriptor)
                        if f.default is not dataclasses.MISSING}
# Whether _descriptor can fill every field: the four it sets, the rest defaulted (Triton 3.6 and 3.8 both).
_FAST_DESCRIPTORS = {f.name for f in dataclasses.fields(TensorDescriptor)} == (
    {"base", "shape", "strides", "block_shape"} | _DESCRIPTOR_DEFAULTS.keys())


def _descriptor(base: torch.Tensor, shape: list, strides: list, block: list) -> TensorDescriptor:
    """A host-side TMA descriptor without TensorDescriptor's checks, which cost ~9 us each on a 2-vCPU host
    (five per GEMM: ~10 ms of a training step's host time): _tma_layout checked the base, strides and
    layout; the block shapes are a config's, checked when it was tuned."""
    if not _FAST_DESCRIPTORS:
        return TensorDescriptor(base, shape, strides, block)
    desc = object.__new__(TensorDescriptor)
    desc.__dict__.update(_DESCRIPTOR_DEFAULTS, base=base, shape=shape, strides=strides, block_shape=block)
    return desc


def _tma_layout(t: torch.Tensor, transposable: bool) -> tuple[list, list, bool] | None:
    """(shape, strides, transposed) of the 2-D t, or with `transposable` of t^T, as TMA copies it (last dim
    contiguous, base and row stride 16-byte aligned, the row stride not 0: an expanded dy's broadcast rows go
    through the pointer kernels); None if neither qualifies. Plain tuples, no views: on the H100's host every
    torch call costs microseconds."""
    if t.data_ptr() % 16:
        return None
    (rows, cols), (s0, s1), size = t.shape, t.stride(), t.element_size()
    if s1 == 1 and s0 > 0 and s0 * size % 16 == 0:
        return [rows, cols], [s0, 1], False
    if transposable and s0 == 1 and s1 > 0 and s1 * size % 16 == 0:
        return [cols, rows], [s1, 1], True
    return None


def _lora_matmul_tma_launch(x, weight, xa, lora_B, bias, y, seed, out_dropout: float,
                            accumulate: bool = False, min_tokens: int = DECODE_MAX_T,
                            after_shrink: bool = False) -> bool:
    """y = x @ weight^T + keep_out * (xa @ lora_B^T) + bias (+ y with accumulate) on the TMA path; False (nothing
    launched) where it does not apply: see _tma_programs, and every operand must pass _tma_layout. xa and
    lora_B None: the base GEMM alone (R = 0: no LoRA steps; x and W stand in for their unread descriptors)."""
    M, K = x.shape
    N = weight.shape[0]
    R = 0 if lora_B is None else lora_B.shape[1]
    num_sms = _tma_programs(x, M, min_tokens)
    if not num_sms:
        return False
    tensors = (x, weight, x if xa is None else xa, weight if lora_B is None else lora_B, y)
    layouts = [_tma_layout(t, transposable) for t, transposable in zip(tensors, (False, True, False, True, False))]
    if any(layout is None for layout in layouts):
        return False
    w_t, b_t = layouts[1][2], layouts[3][2]
    bucket = t_bucket(M)
    key = (bucket, N, K, R, not w_t, not b_t, out_dropout > 0.0, bias is None, x.dtype, y.dtype)
    # A known config's block shapes go into the descriptors here, so its launch skips the pre_hook (which
    # sets them per config while tuning). A transposed operand's base is the tensor itself.
    known = _lora_matmul_tma.chosen(key)
    if accumulate and not known:
        return _accumulated(y, lambda out: _lora_matmul_tma_launch(x, weight, xa, lora_B, bias, out, seed,
                                                                   out_dropout, min_tokens=min_tokens,
                                                                   after_shrink=after_shrink))
    if known:
        blocks = _tma_blocks(known, not w_t, not b_t)
        x_d, w_d, xa_d, b_d, y_d = (_descriptor(t, shape, strides, block)
                                    for t, (shape, strides, _), block in zip(tensors, layouts, blocks))
    else:  # tuning: the pre_hook sets each config's block shapes
        x_d, w_d, xa_d, b_d, y_d = (TensorDescriptor(t, shape, strides, [16, 16])
                                    for t, (shape, strides, _) in zip(tensors, layouts))
    grid = lambda meta: (min(num_sms, cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"])),)
    args = (key, grid, x_d, w_d, xa_d, b_d, y_d,
            bias if bias is not None else y, seed if out_dropout > 0.0 else y,
            M, N, K, bucket, out_dropout)
    meta = dict(W_KMAJOR=not w_t, B_RMAJOR=not b_t, OUT_DROPOUT=out_dropout > 0.0, HAS_BIAS=bias is not None,
                ACCUMULATE=accumulate, FP32_DOT=x.dtype == torch.float32, R=R, BLOCK_R=TMA_BLOCK_R, NUM_SMS=num_sms,
                **wait_flags(after_shrink and xa is not None, x))
    return tma_guarded_launch(_lora_matmul_tma, *args, prepared=known is not None, **meta)


def tma_guarded_launch(launcher: TunedLauncher, key: tuple, *args, **kwargs) -> bool:
    """launcher.launch(key, *args, **kwargs) for a TMA kernel; False if it failed where the automatic TMA path
    may give up. A key's first launch compiles and tunes; should this GPU's Triton reject the kernel there, the
    automatic path warns once and leaves prefill to the pointer kernels from then on (tma_error; a forced
    TMA_PREFILL, or a key that already ran, raises instead). Also kernels.lora_multi's TMA tile."""
    try:
        launcher.launch(key, *args, **kwargs)
    except Exception as e:  # noqa: BLE001 - reported, then the pointer path runs
        if TMA_PREFILL or key in launcher.configs:
            raise
        global tma_error
        tma_error = f"{type(e).__name__}: {str(e)[:500]}"
        warnings.warn(f"ptlm: TMA prefill matmul disabled, the pointer kernel runs instead ({tma_error})")
        return False
    return True


def lora_matmul_tma(x: torch.Tensor, weight: torch.Tensor, xa: torch.Tensor | None, lora_B: torch.Tensor | None,
                    bias: torch.Tensor | None, y: torch.Tensor, accumulate: bool = False,
                    min_tokens: int = DECODE_MAX_T, after_shrink: bool = False) -> bool:
    """y = x @ weight^T + xa @ lora_B^T + bias (added to y's values with accumulate) on the Hopper TMA path alone
    (xa given, no output dropout; xa and lora_B None: no LoRA term): True if it ran, False (nothing launched)
    where it does not apply (at most min_tokens rows included, unless forced). For callers with their own
    shrink (after_shrink: it was the last launch, as kernels.lora_multi.lora_multi_matmul's), or none."""
    return _lora_matmul_tma_launch(x, weight, xa, lora_B, bias, y, None, 0.0, accumulate, min_tokens, after_shrink)


def fuse_shrink_default(T: int, R: int) -> bool:
    """Recomputing xa in every column block is free while the layer is memory-bound (decode) and saves two
    launches there; at prefill the extra narrow dot in the K loop slowed the tensor-core GEMM (H100, r=16,
    T=4096: 1.38x cuBLAS fused against 1.27x with a separate shrink pass), so prefill runs the shrink apart."""
    return T <= DECODE_MAX_T and R <= MAX_FUSED_RANK


def lora_matmul(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                scale: float, bias: torch.Tensor | None = None, seed: torch.Tensor | None = None,
                x_dropout: float = 0.0, out_dropout: float = 0.0, fuse_shrink: bool | None = None,
                out: torch.Tensor | None = None, xa: torch.Tensor | None = None,
                accumulate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x @ weight^T + keep_out * (xa @ lora_B^T) + bias, with xa = scale / (1 - p) * (keep_x * x) @ lora_A^T.

    x (M, K); weight (N, K) any strides; lora_A (r, K); lora_B (N, r); bias (N,) or None. Returns y (M, N)
    and xa (M, r) fp32. keep_x is the keep mask of (seed, m * K + k) when x_dropout > 0 (forward), keep_out
    that of (seed, m * N + n) when out_dropout > 0 (the backward of a dropped-out input). With fuse_shrink the
    shrink runs inside the matmul's K loop (r <= 64), else as a separate pass; None picks per shape.
    `out` (M, N), if given, receives y. `xa` (M, r) fp32 contiguous, if given, is the shrink's result already
    (a caller's own shrink, e.g. grouped): no shrink runs and lora_A only gives r. With `accumulate`, y is
    added to `out`'s values (the grouped backward's dx over its members: no separate add). Decode
    (M <= DECODE_MAX_T) runs _lora_decode_kernel; prefill with a separate shrink the Hopper TMA kernel where
    _tma_programs and _tma_layout allow it, else the pointer kernel.
    """
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    if accumulate and out is None:
        raise ValueError("accumulate adds into `out`: give it")
    y = torch.empty((M, N), device=x.device, dtype=x.dtype) if out is None else out
    if fuse_shrink is None:
        fuse_shrink = xa is None and fuse_shrink_default(M, R)
    if fuse_shrink and (R > MAX_FUSED_RANK or xa is not None):
        raise ValueError(f"fuse_shrink needs r <= {MAX_FUSED_RANK} and no given xa, got r={R}")
    own_shrink = not fuse_shrink and xa is None
    if fuse_shrink:
        xa = torch.empty((M, R), device=x.device, dtype=torch.float32)
    elif own_shrink:
        xa = lora_shrink(x, lora_A, scale, seed, x_dropout)
    if M == 0:
        return y, xa
    if not fuse_shrink and _lora_matmul_tma_launch(x, weight, xa, lora_B, bias, y, seed, out_dropout, accumulate,
                                                   after_shrink=own_shrink):
        return y, xa
    if M <= DECODE_MAX_T:
        # the one-launch forward's shrink on programs of its own (SHRINK_PROGRAMS, read per call) or in every
        # program's K loop
        programs = fuse_shrink and bool(SHRINK_PROGRAMS)
        _lora_decode_launch(x, weight, lora_A, lora_B, scale, bias, y, xa, seed, x_dropout, out_dropout,
                            fuse_shrink and not programs, accumulate=accumulate, shrink_programs=programs)
        return y, xa
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)
    bucket = t_bucket(M)
    key = (bucket, N, K, R, fuse_shrink, x_dropout > 0.0, out_dropout > 0.0, bias is None,
           x.dtype, weight.dtype, lora_A.dtype, lora_B.dtype)
    if accumulate and _lora_matmul_prefill.chosen(key) is None:
        done = []
        _accumulated(y, lambda o: done.append(lora_matmul(x, weight, lora_A, lora_B, scale, bias, seed, x_dropout,
                                                          out_dropout, fuse_shrink, o, None if fuse_shrink else xa)))
        return y, done[0][1]
    _lora_matmul_prefill.launch(key, grid,
        x, weight, lora_A, xa, lora_B, bias if bias is not None else y, y,
        seed if (x_dropout > 0.0 or out_dropout > 0.0) else y,
        M, N, K, R, bucket,
        *x.stride(), *weight.stride(), *lora_A.stride(), *xa.stride(), *lora_B.stride(), *y.stride(),
        scale / (1.0 - x_dropout), max(x_dropout, out_dropout),
        FUSE_SHRINK=fuse_shrink, X_DROPOUT=fuse_shrink and x_dropout > 0.0, OUT_DROPOUT=out_dropout > 0.0,
        HAS_BIAS=bias is not None, FP32_DOT=x.dtype == torch.float32, ACCUMULATE=accumulate,
        BLOCK_R=rank_block(R),
    )
    return y, xa


# ----------------------------------------------------------------------------------------------- weight grad
@triton.jit
def _weight_grad_tile(g_ptr, h_ptr, out_ptr, seed_ptr, pid_n, T, N, R, stride_gt, stride_gn, stride_ht, stride_hr,
                      stride_on, stride_or, dropout_p, HAS_DROPOUT: tl.constexpr, FP32_DOT: tl.constexpr,
                      SPLIT_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
    """Column block pid_n of one weight gradient: sum over this program's share of T of keep * g^T h."""
    pid_r = tl.program_id(1)
    pid_t = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for t0 in range(pid_t * BLOCK_T, T, SPLIT_T * BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        g = tl.load(g_ptr + offs_t.to(tl.int64)[None, :] * stride_gt + offs_n[:, None] * stride_gn,
                    mask=(offs_t[None, :] < T) & (offs_n[:, None] < N), other=0.0)           # (BLOCK_N, BLOCK_T)
        if HAS_DROPOUT:
            g = tl.where(_keep_mask(seed_ptr, offs_t[None, :] * N + offs_n[:, None], dropout_p), g, 0.0)
        h = tl.load(h_ptr + offs_t.to(tl.int64)[:, None] * stride_ht + offs_r[None, :] * stride_hr,
                    mask=(offs_t[:, None] < T) & (offs_r[None, :] < R), other=0.0)           # (BLOCK_T, BLOCK_R)
        acc = _dot_fp32(g.to(tl.float32), h, acc, FP32_DOT)
    store_split(out_ptr, offs_n, offs_r, stride_on, stride_or, acc, (offs_n[:, None] < N) & (offs_r[None, :] < R),
                SPLIT_T)


@triton.jit
def _lora_weight_grad_kernel(
    g_ptr, h_ptr, out_ptr, g2_ptr, h2_ptr, out2_ptr, seed_ptr,
    T, N, N2, R, T_BUCKET,
    stride_gt, stride_gn, stride_ht, stride_hr, stride_on, stride_or,
    stride_g2t, stride_g2n, stride_h2t, stride_h2r, stride_o2n, stride_o2r,
    dropout_p,
    HAS_DROPOUT: tl.constexpr, FP32_DOT: tl.constexpr, SPLIT_T: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Two weight gradients over the same T rows in one launch (the backward's dA^T = (keep x)^T g with the
    dropout mask, and dB = dy^T xa without): column blocks of the first, then of the second (N2 = 0: one)."""
    weight_grad_pair(tl.program_id(0), g_ptr, h_ptr, out_ptr, g2_ptr, h2_ptr, out2_ptr, seed_ptr, T, N, N2, R,
                     stride_gt, stride_gn, stride_ht, stride_hr, stride_on, stride_or,
                     stride_g2t, stride_g2n, stride_h2t, stride_h2r, stride_o2n, stride_o2r,
                     dropout_p, HAS_DROPOUT, FP32_DOT, SPLIT_T, BLOCK_R, BLOCK_N, BLOCK_T)


@triton.jit
def weight_grad_pair(pid, g_ptr, h_ptr, out_ptr, g2_ptr, h2_ptr, out2_ptr, seed_ptr, T, N, N2, R,
                     stride_gt, stride_gn, stride_ht, stride_hr, stride_on, stride_or,
                     stride_g2t, stride_g2n, stride_h2t, stride_h2r, stride_o2n, stride_o2r,
                     dropout_p, HAS_DROPOUT: tl.constexpr, FP32_DOT: tl.constexpr, SPLIT_T: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
    """Column block pid of the pair: (keep g)^T h's N columns first (the dropout mask on g), then g2^T h2's N2;
    also each member's pair in kernels.lora_grouped's weight-grad kernel."""
    n_blocks = tl.cdiv(N, BLOCK_N)
    if pid < n_blocks:
        _weight_grad_tile(g_ptr, h_ptr, out_ptr, seed_ptr, pid, T, N, R, stride_gt, stride_gn, stride_ht, stride_hr,
                          stride_on, stride_or, dropout_p, HAS_DROPOUT, FP32_DOT, SPLIT_T, BLOCK_R, BLOCK_N, BLOCK_T)
    else:
        _weight_grad_tile(g2_ptr, h2_ptr, out2_ptr, seed_ptr, pid - n_blocks, T, N2, R, stride_g2t, stride_g2n,
                          stride_h2t, stride_h2r, stride_o2n, stride_o2r, dropout_p, False, FP32_DOT, SPLIT_T, BLOCK_R,
                          BLOCK_N, BLOCK_T)


_lora_weight_grad = TunedLauncher(triton.autotune(
    weight_grad_configs(), key=["T_BUCKET", "N", "N2", "R", "HAS_DROPOUT"], reset_to_zero=["out_ptr", "out2_ptr"],
    do_bench=tune_bench)(_lora_weight_grad_kernel))


def lora_weight_grads(g: torch.Tensor, h: torch.Tensor, g2: torch.Tensor | None = None,
                      h2: torch.Tensor | None = None, seed: torch.Tensor | None = None,
                      dropout: float = 0.0, rank_major: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """out = sum_t (keep * g)[t, :]^T h[t, :] and, given g2 and h2 over the same T rows, out2 = g2^T h2, in fp32
    and one launch (a launch costs tens of microseconds of host time on the H100's host).

    g (T, N), h (T, r) fp32 -> (N, r), or with rank_major its transpose (r, N) stored contiguous (dA in lora_A's
    layout: no copy when autograd hands it to the parameter); g2 (T, N2), h2 (T, r) fp32 -> (N2, r), or None.
    The mask is the keep mask of (seed, t * N + n), the forward's dropout mask over x; it applies to g only.
    """
    T, N = g.shape
    R = h.shape[1]
    N2 = 0 if g2 is None else g2.shape[1]
    first = (R, N) if rank_major else (N, R)
    if T == 0:
        return (torch.zeros(first, device=g.device, dtype=torch.float32),
                None if g2 is None else torch.zeros((N2, R), device=g.device, dtype=torch.float32))
    has_dropout = dropout > 0.0
    bucket = t_bucket(T)
    key = (bucket, N, N2, R, has_dropout, g.dtype, None if g2 is None else g2.dtype)
    alloc = torch.zeros if _lora_weight_grad.adds_into_output(key, "SPLIT_T") else torch.empty
    out = alloc(first, device=g.device, dtype=torch.float32)
    out2 = out if g2 is None else alloc((N2, R), device=g.device, dtype=torch.float32)
    g2, h2 = (g, h) if g2 is None else (g2, h2)
    block_r = rank_block(R)
    grid = lambda meta: (cdiv(N, meta["BLOCK_N"]) + cdiv(N2, meta["BLOCK_N"]), cdiv(R, block_r), meta["SPLIT_T"])
    _lora_weight_grad.launch(key, grid,
        g, h, out, g2, h2, out2, seed if has_dropout else out,
        T, N, N2, R, bucket,
        *g.stride(), *h.stride(), *out.stride()[::-1 if rank_major else 1], *g2.stride(), *h2.stride(),
        *out2.stride(),
        dropout,
        HAS_DROPOUT=has_dropout, FP32_DOT=g.dtype == torch.float32, BLOCK_R=block_r,
    )
    return out, (None if N2 == 0 else out2)

