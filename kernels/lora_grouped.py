"""Grouped LoRA linear: the G <= 3 projections of one block that share their input x (q/k/v, gate/up) in one launch.

    y_g = x W_g^T + bias_g + s_g dropout_g(x) A_g^T B_g^T,   g = 0 … G-1

Every member keeps its own W_g (no concatenated copy of the base weights), bias, adapter and output (T, d_out_g);
d_out, the rank, and whether a member has an adapter at all differ freely between members. The same two
kernels exist for the single-adapter op and for the multi-adapter op (each member holds stacked slots and every
token picks its slot, as in kernels.lora_multi):
- shrink: xa_g = s_g dropout_g(x) A_g^T for every member with an adapter, in one K loop: each x tile is loaded
  once and multiplied by every member's A tile (the members' A's concatenated, without the copy). The
  single-adapter op runs it at prefill only (kernels.lora.fuse_shrink_default); the multi-adapter op always.
- matmul: one grid over every member's tiles, member after member. A program finds its member from its tile
  index and runs that member's tile of kernels.lora's (or kernels.lora_multi's) matmul; each member's branch is
  compiled with that member's own pointer and stride specializations. At decode the single-adapter tile computes
  its xa in the base K loop, so the whole group is one launch. A member without an adapter runs the base tile.
  At prefill on Hopper the single-adapter op runs each member's GEMM through kernels.lora's TMA kernel instead
  (after the one shared shrink, the first as its programmatic dependent), where every member has an adapter and
  meets TMA's layout rules; the multi-adapter op runs each member with adapters on kernels.lora_multi's TMA tile
  over the shrink's slot-sorted copy of x (made once for all members), one without on kernels.lora's base GEMM.
  Under kernels.lora_multi.SHRINK_PROGRAMS the multi-adapter forward is one launch wherever the pointer tiles
  run (lora_grouped_multi_linear): every member's shrink on the launch's first programs, each member's tiles
  waiting on that member's own counter before they expand.
The single-adapter op's backward at prefill adds two kernels over per-member inputs (each member's own dy):
- shrink each: g_g = s_g / (1 - p_g) dy_g B_g for every member in one launch (members side by side in the grid);
  each member's dx GEMM then takes its g through kernels.lora.lora_matmul(xa=g_g).
- weight grads: dA_g^T = (keep_g x)^T g_g and dB_g = dy_g^T xa_g for every member in one launch, the column
  blocks of the 2G products in one grid (kernels.lora's weight-grad tile; x is read once per member's dA).

Floor (b bytes per element, N = Σ d_out_g, r_g the ranks): bytes = b·[d_in·N + Σ r_g(d_in + d_out_g) + T(d_in + N)],
flops = 2T·d_in·N + 2T·Σ r_g(d_in + d_out_g). On the H100 (3.0 TB/s, 790 TFLOP/s), bf16, r = 16 per member:
Llama-7B q/k/v 4096 -> 3 x 4096: 0.0338 ms at T = 1 (memory), 0.526 ms at T = 4096 (compute); GQA q/k/v
4096 -> 4096 + 2 x 1024: 0.0170 / 0.264 ms; gate/up 4096 -> 2 x 11008: 0.0605 / 0.940 ms. The fusion moves the
same GEMM bytes and flops as G separate calls; it saves G-1 launches at decode, 2G-2 at prefill (one shrink and
one matmul instead of G of each) and G-1 passes of the shrink over x (bench/NOTES.md).
Backward at prefill (N = Σ d_out_g): shrink each bytes = b·T·N + 4T·Σ r_g, flops = 2T·Σ r_g d_out_g; weight grads
bytes = b·T·(G·d_in + N) + 8T·Σ r_g + 4Σ r_g(d_in + d_out_g), flops = 2T·Σ r_g(d_in + d_out_g). Llama-7B q/k/v,
bf16, r = 16, T = 4096: shrink 0.034 ms, weight grads 0.068 ms (both memory-bound); 3G Triton launches become G + 2.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents

from . import lora_multi as multi
from .configs import (DECODE_MAX_T, TunedLauncher, cdiv, decode_matmul_configs, dependent_launch, next_pow2,
                      prefill_matmul_configs, prune_by_t, shrink_configs, t_bucket, tune_bench, weight_grad_configs)
from .lora import (MAX_FUSED_RANK, _dot, _keep_mask, _tma_programs, fuse_shrink_default, grouped_tile,
                   lora_matmul_tile, lora_matmul_tma, rank_block, store_split, weight_grad_pair)
from .lora_multi import BLOCK_R as MULTI_BLOCK_R
from .lora_multi import (TMA_MIN_T, _block_tokens, _decode_shrink_program, _prefill_shrink_program,
                         copy_sorted_rows, expand_in_loop, lora_multi_matmul, multi_matmul_tile, padded_rank, per_row,
                         round_runs, row_dropout, row_scale, shrink_round, shrink_round_pick, shrink_round_rows,
                         shrink_round_step, shrink_round_x, shrink_runs, shrink_share, slot_runs, wait_flags)
from .split_state import split_state

MAX_MEMBERS = 3  # q, k, v: the largest group of projections sharing one input in the supported models


def _padded(items: list, fill) -> list:
    """A member list filled up to MAX_MEMBERS: the kernels take three members' arguments, and the MEMBERS
    constexpr compiles the unused ones away."""
    return items + [fill] * (MAX_MEMBERS - len(items))


# ---------------------------------------------------------------------------------------------------- shrink
@triton.jit
def _shrink_step(acc, x, offs_t, offs_k, K, a_ptr, R, stride_ar, stride_ak, seed_ptr, dropout_p,
                 DROPOUT: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_R: tl.constexpr):
    """acc += keep * x @ A^T over this program's BLOCK_R ranks of one member; x is the tile every member shares."""
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    if DROPOUT:  # this member's own mask: its seed, the element's logical index t * K + k
        x = tl.where(_keep_mask(seed_ptr, offs_t[:, None] * K + offs_k[None, :], dropout_p), x, 0.0)
    a = tl.load(a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                mask=(offs_r[None, :] < R) & (offs_k[:, None] < K), other=0.0)              # (BLOCK_K, BLOCK_R)
    return _dot(x, a.to(x.dtype), acc, FP32_DOT)          # float32 master adapters: read as x's dtype


@triton.jit
def _store_xa(acc, out_ptr, offs_t, mask_t, R, stride_ot, stride_or, SPLIT_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """Write (or, with split programs, add) one member's (BLOCK_T, BLOCK_R) xa tile: tokens offs_t, columns below R."""
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    store_split(out_ptr, offs_t, offs_r, stride_ot, stride_or, acc, mask_t[:, None] & (offs_r[None, :] < R), SPLIT_K)


@triton.jit
def _grouped_shrink_kernel(
    x_ptr, a0_ptr, a1_ptr, a2_ptr, out0_ptr, out1_ptr, out2_ptr, seed0_ptr, seed1_ptr, seed2_ptr,
    T, K, R0, R1, R2, T_BUCKET,
    stride_xt, stride_xk, stride_a0r, stride_a0k, stride_a1r, stride_a1k, stride_a2r, stride_a2k,
    stride_o0t, stride_o0r, stride_o1t, stride_o1r, stride_o2t, stride_o2r,
    scale0, scale1, scale2, p0, p1, p2,
    MEMBERS: tl.constexpr, DROP0: tl.constexpr, DROP1: tl.constexpr, DROP2: tl.constexpr, FP32_DOT: tl.constexpr,
    LAUNCH_DEPENDENTS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    if LAUNCH_DEPENDENTS:  # the first member's TMA matmul may start (it waits for xa)
        gdc_launch_dependents()
    pid_t = tl.program_id(0)
    pid_k = tl.program_id(2)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    acc0 = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_t.to(tl.int64)[:, None] * stride_xt + offs_k[None, :] * stride_xk,
                    mask=(offs_t[:, None] < T) & (offs_k[None, :] < K), other=0.0)          # (BLOCK_T, BLOCK_K)
        acc0 = _shrink_step(acc0, x, offs_t, offs_k, K, a0_ptr, R0, stride_a0r, stride_a0k, seed0_ptr, p0,
                            DROP0, FP32_DOT, BLOCK_R)
        if MEMBERS > 1:
            acc1 = _shrink_step(acc1, x, offs_t, offs_k, K, a1_ptr, R1, stride_a1r, stride_a1k, seed1_ptr, p1,
                                DROP1, FP32_DOT, BLOCK_R)
        if MEMBERS > 2:
            acc2 = _shrink_step(acc2, x, offs_t, offs_k, K, a2_ptr, R2, stride_a2r, stride_a2k, seed2_ptr, p2,
                                DROP2, FP32_DOT, BLOCK_R)
    mask_t = offs_t < T
    _store_xa(acc0 * scale0, out0_ptr, offs_t, mask_t, R0, stride_o0t, stride_o0r, SPLIT_K, BLOCK_R)
    if MEMBERS > 1:
        _store_xa(acc1 * scale1, out1_ptr, offs_t, mask_t, R1, stride_o1t, stride_o1r, SPLIT_K, BLOCK_R)
    if MEMBERS > 2:
        _store_xa(acc2 * scale2, out2_ptr, offs_t, mask_t, R2, stride_o2t, stride_o2r, SPLIT_K, BLOCK_R)


_grouped_shrink = TunedLauncher(triton.autotune(
    shrink_configs(), key=["T_BUCKET", "K", "R0", "R1", "R2", "MEMBERS", "DROP0", "DROP1", "DROP2"],
    prune_configs_by=prune_by_t("BLOCK_T", "SPLIT_K"), reset_to_zero=["out0_ptr", "out1_ptr", "out2_ptr"],
    do_bench=tune_bench)(_grouped_shrink_kernel))


def lora_grouped_shrink(x: torch.Tensor, lora_As: Sequence[torch.Tensor], scales: Sequence[float],
                        seeds: Sequence[torch.Tensor | None] | None = None,
                        dropouts: Sequence[float] | None = None) -> list[torch.Tensor]:
    """xa_g = scales[g] / (1 - p_g) * (keep_g * x) @ lora_As[g]^T in fp32 for every member, x read once.

    x (T, K); lora_As[g] (r_g, K) any strides, 1 to 3 members; dropouts[g] = p_g with seeds[g] (1,) int64:
    keep_g is the keep mask of (seeds[g], t * K + k), as kernels.lora's for one member. Returns (T, r_g) each.
    """
    T, K = x.shape
    G = len(lora_As)
    ranks = [a.shape[0] for a in lora_As]
    if T == 0:
        return [torch.empty((0, r), device=x.device, dtype=torch.float32) for r in ranks]
    dropouts = [0.0] * G if dropouts is None else list(dropouts)
    drop = [p > 0.0 for p in dropouts]
    bucket = t_bucket(T)
    key = (bucket, K, *ranks, *drop, x.dtype, *(t.dtype for t in lora_As))
    alloc = torch.zeros if _grouped_shrink.adds_into_output(key, "SPLIT_K") else torch.empty
    outs = [alloc((T, r), device=x.device, dtype=torch.float32) for r in ranks]
    seeds = [s if d else outs[g] for g, (s, d) in enumerate(zip(seeds or [None] * G, drop))]
    a, o, sd = _padded(list(lora_As), lora_As[0]), _padded(outs, outs[0]), _padded(seeds, seeds[0])
    strides = [(t.stride(0), t.stride(1)) for t in a + o]
    scale = _padded([s / (1.0 - p) for s, p in zip(scales, dropouts)], 0.0)
    block_r = rank_block(max(ranks))
    grid = lambda meta: (cdiv(T, meta["BLOCK_T"]), cdiv(max(ranks), block_r), meta["SPLIT_K"])
    _grouped_shrink.launch(key, grid,
        x, *a, *o, *sd,
        T, K, *_padded(ranks, 0), bucket,
        x.stride(0), x.stride(1), *(s for pair in strides for s in pair),
        *scale, *_padded(dropouts, 0.0),
        MEMBERS=G, DROP0=drop[0], DROP1=G > 1 and drop[1], DROP2=G > 2 and drop[2],
        FP32_DOT=x.dtype == torch.float32, LAUNCH_DEPENDENTS=dependent_launch(x.device), BLOCK_R=block_r,
    )
    return outs


# ---------------------------------------------------------------------------------------------------- matmul
@triton.jit
def _member_ends(M, N0, N1, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Where member 0's and member 1's tiles end in the matmul grid: member 0's tiles first, then member 1's,
    then member 2's, each in kernels.lora's grouped order (a member's branch is its own tile function)."""
    num_m = tl.cdiv(M, BLOCK_M)
    end0 = num_m * tl.cdiv(N0, BLOCK_N)
    return end0, end0 + num_m * tl.cdiv(N1, BLOCK_N)


@triton.jit
def _grouped_matmul_kernel(
    x_ptr,
    w0_ptr, a0_ptr, xa0_ptr, b0_ptr, bias0_ptr, y0_ptr, seed0_ptr,
    w1_ptr, a1_ptr, xa1_ptr, b1_ptr, bias1_ptr, y1_ptr, seed1_ptr,
    w2_ptr, a2_ptr, xa2_ptr, b2_ptr, bias2_ptr, y2_ptr, seed2_ptr,
    M, K, T_BUCKET, N0, N1, N2, R0, R1, R2,
    stride_xm, stride_xk,
    stride_w0n, stride_w0k, stride_a0r, stride_a0k, stride_xa0m, stride_xa0r, stride_b0n, stride_b0r,
    stride_y0m, stride_y0n,
    stride_w1n, stride_w1k, stride_a1r, stride_a1k, stride_xa1m, stride_xa1r, stride_b1n, stride_b1r,
    stride_y1m, stride_y1n,
    stride_w2n, stride_w2k, stride_a2r, stride_a2k, stride_xa2m, stride_xa2r, stride_b2n, stride_b2r,
    stride_y2m, stride_y2n,
    scale0, scale1, scale2, p0, p1, p2,
    MEMBERS: tl.constexpr, FUSE0: tl.constexpr, FUSE1: tl.constexpr, FUSE2: tl.constexpr,
    DROP0: tl.constexpr, DROP1: tl.constexpr, DROP2: tl.constexpr,
    HAS_BIAS0: tl.constexpr, HAS_BIAS1: tl.constexpr, HAS_BIAS2: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    end0, end1 = _member_ends(M, N0, N1, BLOCK_M, BLOCK_N)
    if pid < end0:
        pid_m, pid_n = grouped_tile(pid, M, N0, BLOCK_M, BLOCK_N, GROUP_M)
        lora_matmul_tile(pid_m, pid_n, x_ptr, w0_ptr, a0_ptr, xa0_ptr, b0_ptr, bias0_ptr, y0_ptr, seed0_ptr,
                         M, N0, K, R0, stride_xm, stride_xk, stride_w0n, stride_w0k, stride_a0r, stride_a0k,
                         stride_xa0m, stride_xa0r, stride_b0n, stride_b0r, stride_y0m, stride_y0n, scale0, p0,
                         FUSE0, DROP0, False, HAS_BIAS0, FP32_DOT, BLOCK_R, BLOCK_M, BLOCK_N, BLOCK_K)
    elif MEMBERS > 1:
        if pid < end1:
            pid_m, pid_n = grouped_tile(pid - end0, M, N1, BLOCK_M, BLOCK_N, GROUP_M)
            lora_matmul_tile(pid_m, pid_n, x_ptr, w1_ptr, a1_ptr, xa1_ptr, b1_ptr, bias1_ptr, y1_ptr, seed1_ptr,
                             M, N1, K, R1, stride_xm, stride_xk, stride_w1n, stride_w1k, stride_a1r, stride_a1k,
                             stride_xa1m, stride_xa1r, stride_b1n, stride_b1r, stride_y1m, stride_y1n, scale1, p1,
                             FUSE1, DROP1, False, HAS_BIAS1, FP32_DOT, BLOCK_R, BLOCK_M, BLOCK_N, BLOCK_K)
        elif MEMBERS > 2:
            pid_m, pid_n = grouped_tile(pid - end1, M, N2, BLOCK_M, BLOCK_N, GROUP_M)
            lora_matmul_tile(pid_m, pid_n, x_ptr, w2_ptr, a2_ptr, xa2_ptr, b2_ptr, bias2_ptr, y2_ptr, seed2_ptr,
                             M, N2, K, R2, stride_xm, stride_xk, stride_w2n, stride_w2k, stride_a2r, stride_a2k,
                             stride_xa2m, stride_xa2r, stride_b2n, stride_b2r, stride_y2m, stride_y2n, scale2, p2,
                             FUSE2, DROP2, False, HAS_BIAS2, FP32_DOT, BLOCK_R, BLOCK_M, BLOCK_N, BLOCK_K)


_MATMUL_KEY = ["T_BUCKET", "K", "N0", "N1", "N2", "R0", "R1", "R2", "MEMBERS", "FUSE0", "FUSE1", "FUSE2",
               "DROP0", "DROP1", "DROP2", "HAS_BIAS0", "HAS_BIAS1", "HAS_BIAS2"]
_grouped_matmul_decode = TunedLauncher(triton.autotune(
    decode_matmul_configs(), key=_MATMUL_KEY, prune_configs_by=prune_by_t("BLOCK_M"),
    do_bench=tune_bench)(_grouped_matmul_kernel))
_grouped_matmul_prefill = TunedLauncher(triton.autotune(
    prefill_matmul_configs(), key=_MATMUL_KEY, do_bench=tune_bench)(_grouped_matmul_kernel))


def _tile_grid(M: int, widths: list[int]):
    """The matmul grid: every member's (row block, column block) tiles, one after another."""
    return lambda meta: (cdiv(M, meta["BLOCK_M"]) * sum(cdiv(n, meta["BLOCK_N"]) for n in widths),)


def lora_grouped_matmul(x: torch.Tensor, weights: Sequence[torch.Tensor], lora_As: Sequence[torch.Tensor | None],
                        lora_Bs: Sequence[torch.Tensor | None], scales: Sequence[float],
                        biases: Sequence[torch.Tensor | None] | None = None,
                        seeds: Sequence[torch.Tensor | None] | None = None,
                        dropouts: Sequence[float] | None = None, fuse_shrink: bool | None = None,
                        outs: Sequence[torch.Tensor] | None = None
                        ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """y_g = x @ weights[g]^T + xa_g @ lora_Bs[g]^T + biases[g] for 1 to 3 members in one launch (two at prefill).

    x (M, K); weights[g] (N_g, K) any strides; lora_As[g] (r_g, K) and lora_Bs[g] (N_g, r_g), or both None for a
    member without an adapter (its y_g is the base output); biases[g] (N_g,) or None; xa_g = scales[g] / (1 - p_g)
    * (keep_g * x) @ lora_As[g]^T, with dropouts[g] = p_g and seeds[g] (1,) int64 as in lora_grouped_shrink.
    With fuse_shrink (every r_g <= 64) each member's shrink runs inside its tiles' K loops, else all members'
    shrinks run first as one lora_grouped_shrink; None picks per shape as kernels.lora does for the largest rank.
    Returns ([y_g (M, N_g)], [xa_g (M, r_g) fp32, or None without an adapter]); `outs`, if given, receive y_g.
    """
    M, K = x.shape
    G = len(weights)
    has_lora = [a is not None for a in lora_As]
    ranks = [a.shape[0] if a is not None else 0 for a in lora_As]
    biases = [None] * G if biases is None else list(biases)
    dropouts = [0.0] * G if dropouts is None else list(dropouts)
    seeds = [None] * G if seeds is None else list(seeds)
    ys = [torch.empty((M, w.shape[0]), device=x.device, dtype=x.dtype) for w in weights] if outs is None else list(outs)
    if fuse_shrink is None:
        fuse_shrink = fuse_shrink_default(M, max(ranks))
    if fuse_shrink and max(ranks) > MAX_FUSED_RANK:
        raise ValueError(f"fuse_shrink needs r <= {MAX_FUSED_RANK}, got ranks {ranks}")
    lora = [g for g in range(G) if has_lora[g]]
    xas: list[torch.Tensor | None] = [None] * G
    if fuse_shrink:
        for g in lora:
            xas[g] = torch.empty((M, ranks[g]), device=x.device, dtype=torch.float32)
    elif lora:
        shrunk = lora_grouped_shrink(x, [lora_As[g] for g in lora], [scales[g] for g in lora],
                                     [seeds[g] for g in lora], [dropouts[g] for g in lora])
        for g, xa in zip(lora, shrunk):
            xas[g] = xa
    if M == 0:
        return ys, xas
    # At prefill on Hopper each member's GEMM runs the TMA kernel, faster than this file's pointer tiles by far
    # more than one grid's smaller tail saves; x was still read once, by the shared shrink. Should a later member
    # not fit TMA's layout rules, the grouped kernel below recomputes every member.
    if not fuse_shrink and all(has_lora) and all(
            lora_matmul_tma(x, weights[g], xas[g], lora_Bs[g], biases[g], ys[g], after_shrink=g == 0)
            for g in range(G)):
        return ys, xas
    # A member without an adapter reads none of its LoRA pointers (R = 0); the xa one must still be fp32.
    fp32 = next((xa for xa in xas if xa is not None), None)
    if fp32 is None:
        fp32 = torch.empty(1, device=x.device, dtype=torch.float32)
    drop = [fuse_shrink and has_lora[g] and dropouts[g] > 0.0 for g in range(G)]
    members, strides = [], []
    for g in range(G):
        w, a, xa, b = weights[g], lora_As[g], xas[g], lora_Bs[g]
        lora_g = a is not None
        members += [w, a if lora_g else w, xa if lora_g else fp32, b if lora_g else w,
                    ys[g] if biases[g] is None else biases[g], ys[g], seeds[g] if drop[g] else ys[g]]
        strides += [w.stride(0), w.stride(1), *(a.stride() if lora_g else (0, 0)),
                    *(xa.stride() if lora_g else (0, 0)), *(b.stride() if lora_g else (0, 0)),
                    ys[g].stride(0), ys[g].stride(1)]
    members += members[:7] * (MAX_MEMBERS - G)
    strides += strides[:10] * (MAX_MEMBERS - G)
    fuse = [fuse_shrink and has_lora[g] for g in range(G)]
    has_bias = [b is not None for b in biases]
    widths = [w.shape[0] for w in weights]
    kernel = _grouped_matmul_decode if M <= DECODE_MAX_T else _grouped_matmul_prefill
    bucket = t_bucket(M)
    key = (bucket, K, *widths, *ranks, *fuse, *drop, *has_bias, x.dtype,
           *(t.dtype for t in weights), *(t.dtype for t in lora_As if t is not None),
           *(t.dtype for t in lora_Bs if t is not None))
    kernel.launch(key, _tile_grid(M, widths),
        x, *members,
        M, K, bucket, *_padded(widths, 0), *_padded(ranks, 0),
        x.stride(0), x.stride(1), *strides,
        *_padded([s / (1.0 - p) for s, p in zip(scales, dropouts)], 0.0), *_padded(dropouts, 0.0),
        MEMBERS=G, **_flags("FUSE", fuse), **_flags("DROP", drop), **_flags("HAS_BIAS", has_bias),
        FP32_DOT=x.dtype == torch.float32, BLOCK_R=rank_block(max(ranks)),
    )
    return ys, xas


def _flags(name: str, values: list[bool]) -> dict[str, bool]:
    """NAME0..NAME2 constexprs: a member's flag, False for the members the group does not have."""
    return {f"{name}{g}": v for g, v in enumerate(_padded(list(values), False))}


# -------------------------------------------------------------------------- single adapter: backward at prefill
# The backward of a group needs per-member inputs (each member's own dy), so these two kernels take every
# member's tensors apart; each is one launch for the whole group where the members' own backwards take G.
@triton.jit
def _member_shrink(x_ptr, a_ptr, out_ptr, pid_k, T, K, R, stride_xt, stride_xk, stride_ar, stride_ak, stride_ot,
                   stride_or, scale, FP32_DOT: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """One member's (BLOCK_T, BLOCK_R) tile of scale * x @ A^T over this program's share of its own K."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_t.to(tl.int64)[:, None] * stride_xt + offs_k[None, :] * stride_xk,
                    mask=(offs_t[:, None] < T) & (offs_k[None, :] < K), other=0.0)          # (BLOCK_T, BLOCK_K)
        acc = _shrink_step(acc, x, offs_t, offs_k, K, a_ptr, R, stride_ar, stride_ak, a_ptr, 0.0, False, FP32_DOT,
                           BLOCK_R)
    _store_xa(acc * scale, out_ptr, offs_t, offs_t < T, R, stride_ot, stride_or, SPLIT_K, BLOCK_R)


@triton.jit
def _grouped_shrink_each_kernel(
    x0_ptr, a0_ptr, out0_ptr, x1_ptr, a1_ptr, out1_ptr, x2_ptr, a2_ptr, out2_ptr,
    T, K0, K1, K2, R0, R1, R2, T_BUCKET,
    stride_x0t, stride_x0k, stride_a0r, stride_a0k, stride_o0t, stride_o0r,
    stride_x1t, stride_x1k, stride_a1r, stride_a1k, stride_o1t, stride_o1r,
    stride_x2t, stride_x2k, stride_a2r, stride_a2k, stride_o2t, stride_o2r,
    scale0, scale1, scale2,
    MEMBERS: tl.constexpr, FP32_DOT: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Axis 2 holds every member's K splits, member after member: a program runs one member's shrink tile."""
    member = tl.program_id(2) // SPLIT_K
    pid_k = tl.program_id(2) % SPLIT_K
    if member == 0:
        _member_shrink(x0_ptr, a0_ptr, out0_ptr, pid_k, T, K0, R0, stride_x0t, stride_x0k, stride_a0r, stride_a0k,
                       stride_o0t, stride_o0r, scale0, FP32_DOT, SPLIT_K, BLOCK_R, BLOCK_T, BLOCK_K)
    elif MEMBERS > 1:
        if member == 1:
            _member_shrink(x1_ptr, a1_ptr, out1_ptr, pid_k, T, K1, R1, stride_x1t, stride_x1k, stride_a1r,
                           stride_a1k, stride_o1t, stride_o1r, scale1, FP32_DOT, SPLIT_K, BLOCK_R, BLOCK_T, BLOCK_K)
        elif MEMBERS > 2:
            _member_shrink(x2_ptr, a2_ptr, out2_ptr, pid_k, T, K2, R2, stride_x2t, stride_x2k, stride_a2r,
                           stride_a2k, stride_o2t, stride_o2r, scale2, FP32_DOT, SPLIT_K, BLOCK_R, BLOCK_T, BLOCK_K)


_grouped_shrink_each = TunedLauncher(triton.autotune(
    shrink_configs(), key=["T_BUCKET", "K0", "K1", "K2", "R0", "R1", "R2", "MEMBERS"],
    prune_configs_by=prune_by_t("BLOCK_T", "SPLIT_K"), reset_to_zero=["out0_ptr", "out1_ptr", "out2_ptr"],
    do_bench=tune_bench)(_grouped_shrink_each_kernel))


def lora_grouped_shrink_each(xs: Sequence[torch.Tensor], lora_As: Sequence[torch.Tensor],
                             scales: Sequence[float]) -> list[torch.Tensor]:
    """out_g = scales[g] * xs[g] @ lora_As[g]^T in fp32 for 1 to 3 members with inputs of their own, one launch.

    xs[g] (T, K_g), all in one dtype and over the same T rows; lora_As[g] (r_g, K_g) any strides (read in xs'
    dtype, as kernels.lora.lora_shrink does). The backward's g_g = s_g / (1 - p_g) dy_g @ B_g: xs = dys,
    lora_As = [B_g^T]. No dropout. Returns (T, r_g) each.
    """
    T = xs[0].shape[0]
    G = len(xs)
    widths = [x.shape[1] for x in xs]
    ranks = [a.shape[0] for a in lora_As]
    if T == 0:
        return [torch.empty((0, r), device=xs[0].device, dtype=torch.float32) for r in ranks]
    bucket = t_bucket(T)
    key = (bucket, *widths, *ranks, xs[0].dtype, *(a.dtype for a in lora_As))
    alloc = torch.zeros if _grouped_shrink_each.adds_into_output(key, "SPLIT_K") else torch.empty
    outs = [alloc((T, r), device=xs[0].device, dtype=torch.float32) for r in ranks]
    members, strides = [], []
    for x, a, out in zip(xs, lora_As, outs):
        members += [x, a, out]
        strides += [*x.stride(), *a.stride(), *out.stride()]
    members += members[:3] * (MAX_MEMBERS - G)
    strides += strides[:6] * (MAX_MEMBERS - G)
    block_r = rank_block(max(ranks))
    grid = lambda meta: (cdiv(T, meta["BLOCK_T"]), cdiv(max(ranks), block_r), G * meta["SPLIT_K"])
    _grouped_shrink_each.launch(key, grid,
        *members,
        T, *_padded(widths, 0), *_padded(ranks, 0), bucket,
        *strides,
        *_padded(list(scales), 0.0),
        MEMBERS=G, FP32_DOT=xs[0].dtype == torch.float32, BLOCK_R=block_r,
    )
    return outs


@triton.jit
def _grouped_weight_grad_kernel(
    x_ptr,
    g0_ptr, dy0_ptr, xa0_ptr, da0_ptr, db0_ptr, seed0_ptr,
    g1_ptr, dy1_ptr, xa1_ptr, da1_ptr, db1_ptr, seed1_ptr,
    g2_ptr, dy2_ptr, xa2_ptr, da2_ptr, db2_ptr, seed2_ptr,
    T, K, N0, N1, N2, R0, R1, R2, T_BUCKET,
    stride_xt, stride_xk,
    stride_g0t, stride_g0r, stride_dy0t, stride_dy0n, stride_xa0t, stride_xa0r, stride_da0k, stride_da0r,
    stride_db0n, stride_db0r,
    stride_g1t, stride_g1r, stride_dy1t, stride_dy1n, stride_xa1t, stride_xa1r, stride_da1k, stride_da1r,
    stride_db1n, stride_db1r,
    stride_g2t, stride_g2r, stride_dy2t, stride_dy2n, stride_xa2t, stride_xa2r, stride_da2k, stride_da2r,
    stride_db2n, stride_db2r,
    p0, p1, p2,
    MEMBERS: tl.constexpr, DROP0: tl.constexpr, DROP1: tl.constexpr, DROP2: tl.constexpr, FP32_DOT: tl.constexpr,
    SPLIT_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Axis 0 holds the column blocks of member 0's dA^T and dB, then member 1's, then member 2's."""
    pid = tl.program_id(0)
    k_blocks = tl.cdiv(K, BLOCK_N)
    end0 = k_blocks + tl.cdiv(N0, BLOCK_N)
    end1 = end0 + k_blocks + tl.cdiv(N1, BLOCK_N)
    if pid < end0:
        weight_grad_pair(pid, x_ptr, g0_ptr, da0_ptr, dy0_ptr, xa0_ptr, db0_ptr, seed0_ptr, T, K, N0, R0,
                         stride_xt, stride_xk, stride_g0t, stride_g0r, stride_da0k, stride_da0r,
                         stride_dy0t, stride_dy0n, stride_xa0t, stride_xa0r, stride_db0n, stride_db0r,
                         p0, DROP0, FP32_DOT, SPLIT_T, BLOCK_R, BLOCK_N, BLOCK_T)
    elif MEMBERS > 1:
        if pid < end1:
            weight_grad_pair(pid - end0, x_ptr, g1_ptr, da1_ptr, dy1_ptr, xa1_ptr, db1_ptr, seed1_ptr, T, K, N1, R1,
                             stride_xt, stride_xk, stride_g1t, stride_g1r, stride_da1k, stride_da1r,
                             stride_dy1t, stride_dy1n, stride_xa1t, stride_xa1r, stride_db1n, stride_db1r,
                             p1, DROP1, FP32_DOT, SPLIT_T, BLOCK_R, BLOCK_N, BLOCK_T)
        elif MEMBERS > 2:
            weight_grad_pair(pid - end1, x_ptr, g2_ptr, da2_ptr, dy2_ptr, xa2_ptr, db2_ptr, seed2_ptr, T, K, N2, R2,
                             stride_xt, stride_xk, stride_g2t, stride_g2r, stride_da2k, stride_da2r,
                             stride_dy2t, stride_dy2n, stride_xa2t, stride_xa2r, stride_db2n, stride_db2r,
                             p2, DROP2, FP32_DOT, SPLIT_T, BLOCK_R, BLOCK_N, BLOCK_T)


_grouped_weight_grad = TunedLauncher(triton.autotune(
    weight_grad_configs(), key=["T_BUCKET", "K", "N0", "N1", "N2", "R0", "R1", "R2", "MEMBERS", "DROP0", "DROP1",
                                "DROP2"],
    reset_to_zero=[f"{p}{g}_ptr" for p in ("da", "db") for g in range(3)],
    do_bench=tune_bench)(_grouped_weight_grad_kernel))


def lora_grouped_weight_grads(x: torch.Tensor, gs: Sequence[torch.Tensor], dys: Sequence[torch.Tensor],
                              xas: Sequence[torch.Tensor], seeds: Sequence[torch.Tensor | None] | None = None,
                              dropouts: Sequence[float] | None = None, rank_major: bool = False
                              ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every member's LoRA weight gradients in one launch: dA_g^T = (keep_g * x)^T gs[g] and dB_g = dys[g]^T xas[g]
    (kernels.lora.lora_weight_grads' pair, for 1 to 3 members sharing x).

    x (T, K) the forward's input; gs[g] (T, r_g) fp32 (the backward's s_g / (1 - p_g) dy_g B_g); dys[g] (T, N_g)
    in x's dtype; xas[g] (T, r_g) fp32 the forward's; keep_g the keep mask of (seeds[g], t * K + k) where
    dropouts[g] = p_g > 0 (the forward's mask of member g), on the dA product only. Returns ([dA_g^T (K, r_g)],
    or with rank_major [dA_g (r_g, K)] stored contiguous (lora_A's layout), [dB_g (N_g, r_g)]) in fp32.
    """
    T, K = x.shape
    G = len(gs)
    widths = [dy.shape[1] for dy in dys]
    ranks = [g.shape[1] for g in gs]
    a_shape = (lambda r: (r, K)) if rank_major else (lambda r: (K, r))
    if T == 0:
        zeros = lambda shape: torch.zeros(shape, device=x.device, dtype=torch.float32)
        return [zeros(a_shape(r)) for r in ranks], [zeros((n, r)) for n, r in zip(widths, ranks)]
    dropouts = [0.0] * G if dropouts is None else list(dropouts)
    seeds = [None] * G if seeds is None else list(seeds)
    drop = [p > 0.0 for p in dropouts]
    bucket = t_bucket(T)
    key = (bucket, K, *widths, *ranks, *drop, x.dtype, *(dy.dtype for dy in dys))
    alloc = torch.zeros if _grouped_weight_grad.adds_into_output(key, "SPLIT_T") else torch.empty
    d_as = [alloc(a_shape(r), device=x.device, dtype=torch.float32) for r in ranks]
    d_bs = [alloc((n, r), device=x.device, dtype=torch.float32) for n, r in zip(widths, ranks)]
    members, strides = [], []
    for g in range(G):
        members += [gs[g], dys[g], xas[g], d_as[g], d_bs[g], seeds[g] if drop[g] else d_as[g]]
        strides += [*gs[g].stride(), *dys[g].stride(), *xas[g].stride(), *d_as[g].stride()[::-1 if rank_major else 1],
                    *d_bs[g].stride()]
    members += members[:6] * (MAX_MEMBERS - G)
    strides += strides[:10] * (MAX_MEMBERS - G)
    block_r = rank_block(max(ranks))
    grid = lambda meta: (G * cdiv(K, meta["BLOCK_N"]) + sum(cdiv(n, meta["BLOCK_N"]) for n in widths),
                         cdiv(max(ranks), block_r), meta["SPLIT_T"])
    _grouped_weight_grad.launch(key, grid,
        x, *members,
        T, K, *_padded(widths, 0), *_padded(ranks, 0), bucket,
        x.stride(0), x.stride(1), *strides,
        *_padded(dropouts, 0.0),
        MEMBERS=G, **_flags("DROP", drop), FP32_DOT=x.dtype == torch.float32, BLOCK_R=block_r,
    )
    return d_as, d_bs


# ------------------------------------------------------------------------------------- multi-adapter shrink
@triton.jit
def _grouped_multi_shrink_kernel(
    x_ptr, idx_ptr, order_ptr,
    a0_ptr, ranks0_ptr, scales0_ptr, dropouts0_ptr, seed0_ptr, out0_ptr,
    a1_ptr, ranks1_ptr, scales1_ptr, dropouts1_ptr, seed1_ptr, out1_ptr,
    a2_ptr, ranks2_ptr, scales2_ptr, dropouts2_ptr, seed2_ptr, out2_ptr, xs_ptr,
    T, K, T_BUCKET, WIDTH0, WIDTH1, WIDTH2,
    stride_xt, stride_xk,
    stride_a0s, stride_a0r, stride_a0k, stride_o0t, stride_o0r,
    stride_a1s, stride_a1r, stride_a1k, stride_o1t, stride_o1r,
    stride_a2s, stride_a2r, stride_a2k, stride_o2t, stride_o2r,
    MEMBERS: tl.constexpr, HAS_ORDER: tl.constexpr, DROP0: tl.constexpr, DROP1: tl.constexpr, DROP2: tl.constexpr,
    FP32_DOT: tl.constexpr, STORE_X: tl.constexpr, LAUNCH_DEPENDENTS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_ROUNDS: tl.constexpr = 1,
):
    """The grid of kernels.lora_multi._multi_shrink_kernel (rounds split SPLIT_ROUNDS ways too), every member's
    ranks r * 16.. in program (t, r, g * SPLIT_K + k)."""
    if LAUNCH_DEPENDENTS:  # the grouped matmul after this launch may start (it waits for what this one writes)
        gdc_launch_dependents()
    pid_t = tl.program_id(0)
    pid_k = tl.program_id(2) % SPLIT_K
    pid_g = tl.program_id(2) // SPLIT_K
    first_r = tl.program_id(1) * BLOCK_R
    offs_t, mask_t = _block_tokens(order_ptr, pid_t, T, HAS_ORDER, BLOCK_T)
    if STORE_X:  # x's rows in slot-sorted order, once for every member's TMA tile
        if (tl.program_id(1) == 0) & (pid_g == 0):
            copy_sorted_rows(x_ptr, xs_ptr, offs_t, mask_t, pid_t, pid_k, K, stride_xt, stride_xk, SPLIT_K, BLOCK_T,
                             BLOCK_K)
    slot = tl.load(idx_ptr + offs_t, mask=mask_t, other=-1)                                  # (BLOCK_T,)
    run, runs = slot_runs(idx_ptr, order_ptr, pid_t, T, slot, HAS_ORDER, BLOCK_T)
    acc0 = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    # kernels.lora_multi.runs_shrink's rounds, each x tile loaded once for every member
    RUNS: tl.constexpr = shrink_runs(MEMBERS, BLOCK_T, BLOCK_K)
    p0 = row_dropout(slot, dropouts0_ptr, DROP0)
    p1 = row_dropout(slot, dropouts1_ptr, DROP1)
    p2 = row_dropout(slot, dropouts2_ptr, DROP2)
    rank0 = per_row(ranks0_ptr, slot)
    rank1 = per_row(ranks1_ptr, slot) if MEMBERS > 1 else rank0
    rank2 = per_row(ranks2_ptr, slot) if MEMBERS > 2 else rank0
    for g in range(pid_g * RUNS, runs, SPLIT_ROUNDS * RUNS):
        mine, run_slot = round_runs(slot, run, g, RUNS)                    # the members share the rows' runs
        a0_rows, live0, go = shrink_round(a0_ptr, rank0, mine, run_slot, first_r, stride_a0s, stride_a0r, BLOCK_R)
        a1_rows, live1, a2_rows, live2 = a0_rows, live0, a0_rows, live0
        if MEMBERS > 1:
            a1_rows, live1, go1 = shrink_round(a1_ptr, rank1, mine, run_slot, first_r, stride_a1s, stride_a1r, BLOCK_R)
            go = go | go1
        if MEMBERS > 2:
            a2_rows, live2, go2 = shrink_round(a2_ptr, rank2, mine, run_slot, first_r, stride_a2s, stride_a2r, BLOCK_R)
            go = go | go2
        if go:  # some member's run of the round has ranks in this program's 16
            rows = (run >= g) & (run < g + RUNS) & (slot >= 0)
            y0 = tl.zeros((BLOCK_T, RUNS * BLOCK_R), dtype=tl.float32)
            y1 = tl.zeros((BLOCK_T, RUNS * BLOCK_R), dtype=tl.float32)
            y2 = tl.zeros((BLOCK_T, RUNS * BLOCK_R), dtype=tl.float32)
            for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
                x, offs_k, in_k = shrink_round_x(x_ptr, offs_t, rows, k0, K, stride_xt, stride_xk, BLOCK_K)
                y0 = shrink_round_step(y0, x, a0_rows, live0, offs_t, offs_k, in_k, K, seed0_ptr, p0, stride_a0k,
                                       DROP0, FP32_DOT, RUNS, BLOCK_R, BLOCK_K)
                if MEMBERS > 1:
                    y1 = shrink_round_step(y1, x, a1_rows, live1, offs_t, offs_k, in_k, K, seed1_ptr, p1,
                                           stride_a1k, DROP1, FP32_DOT, RUNS, BLOCK_R, BLOCK_K)
                if MEMBERS > 2:
                    y2 = shrink_round_step(y2, x, a2_rows, live2, offs_t, offs_k, in_k, K, seed2_ptr, p2,
                                           stride_a2k, DROP2, FP32_DOT, RUNS, BLOCK_R, BLOCK_K)
            acc0 = shrink_round_pick(acc0, y0, mine, RUNS, BLOCK_R)
            if MEMBERS > 1:
                acc1 = shrink_round_pick(acc1, y1, mine, RUNS, BLOCK_R)
            if MEMBERS > 2:
                acc2 = shrink_round_pick(acc2, y2, mine, RUNS, BLOCK_R)
    # ranks past a row's own: zero, not the inf * 0 = NaN an inf in x leaves there (kernels.lora_multi.runs_shrink)
    lanes = (first_r + tl.arange(0, BLOCK_R))[None, :]
    rows = mask_t
    if SPLIT_ROUNDS > 1:  # the rows of this program's rounds; the others' programs add theirs
        rows &= shrink_round_rows(slot, run, pid_g, SPLIT_ROUNDS, MEMBERS, BLOCK_T, BLOCK_K)
    acc0 = tl.where(lanes < rank0[:, None], acc0 * row_scale(slot, scales0_ptr, dropouts0_ptr, DROP0), 0.0)
    _store_xa(acc0, out0_ptr, offs_t, rows, WIDTH0, stride_o0t, stride_o0r, SPLIT_K * SPLIT_ROUNDS, BLOCK_R)
    if MEMBERS > 1:
        acc1 = tl.where(lanes < rank1[:, None], acc1 * row_scale(slot, scales1_ptr, dropouts1_ptr, DROP1), 0.0)
        _store_xa(acc1, out1_ptr, offs_t, rows, WIDTH1, stride_o1t, stride_o1r, SPLIT_K * SPLIT_ROUNDS, BLOCK_R)
    if MEMBERS > 2:
        acc2 = tl.where(lanes < rank2[:, None], acc2 * row_scale(slot, scales2_ptr, dropouts2_ptr, DROP2), 0.0)
        _store_xa(acc2, out2_ptr, offs_t, rows, WIDTH2, stride_o2t, stride_o2r, SPLIT_K * SPLIT_ROUNDS, BLOCK_R)


_grouped_multi_shrink = TunedLauncher(triton.autotune(
    shrink_configs(round_splits=True),
    key=["T_BUCKET", "K", "MEMBERS", "HAS_ORDER", "DROP0", "DROP1", "DROP2", "STORE_X"],
    prune_configs_by=prune_by_t("BLOCK_T", "SPLIT_K"), reset_to_zero=["out0_ptr", "out1_ptr", "out2_ptr"],
    do_bench=tune_bench)(_grouped_multi_shrink_kernel))


def lora_grouped_multi_shrink(x: torch.Tensor, lora_As: Sequence[torch.Tensor], adapter_index: torch.Tensor,
                              ranks: Sequence[torch.Tensor], scales: Sequence[torch.Tensor],
                              order: torch.Tensor | None = None,
                              dropouts: Sequence[torch.Tensor | None] | None = None,
                              seeds: Sequence[torch.Tensor | None] | None = None,
                              x_sorted: torch.Tensor | None = None) -> list[torch.Tensor]:
    """kernels.lora_multi.lora_multi_shrink for 1 to 3 members in one launch, each x tile read once for all.

    x (T, K); lora_As[g] (S, r_max_g, K) any strides; adapter_index (T,) int32 (-1: none); ranks[g] (S,) int32;
    scales[g] (S,) fp32; order as for lora_multi_shrink; dropouts[g] (S,) fp32 with seeds[g] (1,) int64, or None:
    member g's keep mask is the one of (seeds[g], t * K + k) against its slot's p; x_sorted as for
    lora_multi_shrink (shared by the members' TMA tiles). Returns (T, padded_rank(r_max_g)) fp32 per member, zero
    beyond each token's rank.
    """
    T, K = x.shape
    G = len(lora_As)
    widths = [padded_rank(a.shape[1]) for a in lora_As]
    if T == 0:
        return [torch.empty((0, w), device=x.device, dtype=torch.float32) for w in widths]
    dropouts = [None] * G if dropouts is None else list(dropouts)
    seeds = [None] * G if seeds is None else list(seeds)
    drop = [p is not None for p in dropouts]
    store_x = x_sorted is not None
    if store_x and order is None:
        raise ValueError("x_sorted holds x's rows in `order`: give it")
    bucket = t_bucket(T)
    key = (bucket, K, G, order is None, *drop, store_x, x.dtype, *(a.dtype for a in lora_As))
    alloc = torch.zeros if _grouped_multi_shrink.adds_into_output(key, "SPLIT_K", "SPLIT_ROUNDS") else torch.empty
    outs = [alloc((T, w), device=x.device, dtype=torch.float32) for w in widths]
    members, strides = [], []
    for g in range(G):
        a, out = lora_As[g], outs[g]
        members += [a, ranks[g], scales[g], dropouts[g] if drop[g] else scales[g],
                    seeds[g] if drop[g] else ranks[g], out]
        strides += [*a.stride(), *out.stride()]
    members += members[:6] * (MAX_MEMBERS - G)
    strides += strides[:5] * (MAX_MEMBERS - G)
    grid = lambda meta: (cdiv(T, meta["BLOCK_T"]), max(widths) // MULTI_BLOCK_R,
                         meta["SPLIT_K"] * meta.get("SPLIT_ROUNDS", 1))
    _grouped_multi_shrink.launch(key, grid,
        x, adapter_index, adapter_index if order is None else order, *members, x_sorted if store_x else x,
        T, K, bucket, *_padded(widths, 0),
        x.stride(0), x.stride(1), *strides,
        MEMBERS=G, HAS_ORDER=order is not None, **_flags("DROP", drop),
        FP32_DOT=x.dtype == torch.float32, STORE_X=store_x, LAUNCH_DEPENDENTS=dependent_launch(x.device),
        BLOCK_R=MULTI_BLOCK_R,
    )
    return outs


# ------------------------------------------------------------------------------------- multi-adapter matmul
@triton.jit
def _multi_member_tile(pid_m, pid_n, x_ptr, w_ptr, xa_ptr, b_ptr, idx_ptr, order_ptr, ranks_ptr, bias_ptr, y_ptr,
                       M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, stride_xam, stride_xar,
                       stride_bs, stride_bn, stride_br, stride_ym, stride_yn,
                       HAS_LORA: tl.constexpr, HAS_ORDER: tl.constexpr, HAS_BIAS: tl.constexpr,
                       FP32_DOT: tl.constexpr, WAIT_PRIOR: tl.constexpr, IN_LOOP: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       WAIT_READY: tl.constexpr = False, ready_ptr=None, ready_total=0, tiles=0):
    """One member's tile: kernels.lora_multi's, or the bare base GEMM tile for a member none of the batch's
    adapters reach (rows in batch order: each row's output is its own; it reads no xa, so waits for nothing).
    WAIT_READY: the member's xa comes from this launch's shrink programs (ready_total count in at ready_ptr)."""
    if HAS_LORA:
        multi_matmul_tile(pid_m, pid_n, x_ptr, w_ptr, xa_ptr, b_ptr, idx_ptr, order_ptr, ranks_ptr, xa_ptr, idx_ptr,
                          bias_ptr, y_ptr, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, stride_xam,
                          stride_xar, stride_bs, stride_bn, stride_br, stride_ym, stride_yn,
                          HAS_ORDER, False, HAS_BIAS, FP32_DOT, BLOCK_R, BLOCK_M, BLOCK_N, BLOCK_K,
                          WAIT_PRIOR=WAIT_PRIOR, IN_LOOP=IN_LOOP, WAIT_READY=WAIT_READY, count_ptr=ready_ptr,
                          ready_total=ready_total, tiles=tiles)
    else:
        lora_matmul_tile(pid_m, pid_n, x_ptr, w_ptr, w_ptr, xa_ptr, w_ptr, bias_ptr, y_ptr, idx_ptr, M, N, K, 0,
                         stride_xm, stride_xk, stride_wn, stride_wk, 0, 0, 0, 0, 0, 0, stride_ym, stride_yn, 1.0, 0.0,
                         False, False, False, HAS_BIAS, FP32_DOT, BLOCK_R, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _member_shrink_program(q, x_ptr, a_ptr, xa_ptr, idx_ptr, order_ptr, ranks_ptr, scales_ptr, dropouts_ptr, seed_ptr,
                           ws_ptr, counters, M, K, WIDTH, stride_xm, stride_xk, stride_xam, stride_xar, stride_as,
                           stride_ar, stride_ak, HAS_ORDER: tl.constexpr, X_DROPOUT: tl.constexpr,
                           FP32_DOT: tl.constexpr, SHRINK_SPLIT: tl.constexpr, SHRINK_ROUNDS: tl.constexpr,
                           SHRINK_BLOCK_M: tl.constexpr, SHRINK_BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr):
    """Shrink program q of one member: kernels.lora_multi's decode or prefill shrink program over the member's A."""
    if SHRINK_SPLIT > 0:
        _decode_shrink_program(q, x_ptr, a_ptr, xa_ptr, idx_ptr, order_ptr, ranks_ptr, scales_ptr, dropouts_ptr,
                               seed_ptr, ws_ptr, counters, M, K, WIDTH, stride_xm, stride_xk, stride_xam, stride_xar,
                               stride_as, stride_ar, stride_ak, HAS_ORDER, X_DROPOUT, FP32_DOT, SHRINK_SPLIT,
                               SHRINK_ROUNDS, BLOCK_R, SHRINK_BLOCK_M)
    elif SHRINK_BLOCK_T > 0:
        _prefill_shrink_program(q, x_ptr, a_ptr, xa_ptr, idx_ptr, order_ptr, ranks_ptr, scales_ptr, dropouts_ptr,
                                seed_ptr, counters, M, K, WIDTH, stride_xm, stride_xk, stride_xam, stride_xar,
                                stride_as, stride_ar, stride_ak, HAS_ORDER, X_DROPOUT, FP32_DOT, BLOCK_R,
                                SHRINK_BLOCK_T)


@triton.jit
def _grouped_multi_matmul_kernel(
    x_ptr, idx_ptr, order_ptr,
    w0_ptr, xa0_ptr, b0_ptr, ranks0_ptr, bias0_ptr, y0_ptr, a0_ptr, scales0_ptr, dropouts0_ptr, seed0_ptr,
    w1_ptr, xa1_ptr, b1_ptr, ranks1_ptr, bias1_ptr, y1_ptr, a1_ptr, scales1_ptr, dropouts1_ptr, seed1_ptr,
    w2_ptr, xa2_ptr, b2_ptr, ranks2_ptr, bias2_ptr, y2_ptr, a2_ptr, scales2_ptr, dropouts2_ptr, seed2_ptr,
    count_ptr, ws_ptr,
    M, K, T_BUCKET, N0, N1, N2, WIDTH0, WIDTH1, WIDTH2,
    stride_xm, stride_xk,
    stride_w0n, stride_w0k, stride_xa0m, stride_xa0r, stride_b0s, stride_b0n, stride_b0r, stride_y0m, stride_y0n,
    stride_a0s, stride_a0r, stride_a0k,
    stride_w1n, stride_w1k, stride_xa1m, stride_xa1r, stride_b1s, stride_b1n, stride_b1r, stride_y1m, stride_y1n,
    stride_a1s, stride_a1r, stride_a1k,
    stride_w2n, stride_w2k, stride_xa2m, stride_xa2r, stride_b2s, stride_b2n, stride_b2r, stride_y2m, stride_y2n,
    stride_a2s, stride_a2r, stride_a2k,
    MEMBERS: tl.constexpr, HAS_ORDER: tl.constexpr, LORA0: tl.constexpr, LORA1: tl.constexpr, LORA2: tl.constexpr,
    HAS_BIAS0: tl.constexpr, HAS_BIAS1: tl.constexpr, HAS_BIAS2: tl.constexpr, FP32_DOT: tl.constexpr,
    WAIT_PRIOR: tl.constexpr, IN_LOOP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DROP0: tl.constexpr = False, DROP1: tl.constexpr = False, DROP2: tl.constexpr = False,
    SHRINK_SPLIT: tl.constexpr = 0, SHRINK_ROUNDS: tl.constexpr = 1, SHRINK_BLOCK_M: tl.constexpr = 16,
    SHRINK_BLOCK_T: tl.constexpr = 0,
):
    """Every member's tiles, member after member. With shrink programs (the forward in one launch,
    kernels.lora_multi.SHRINK_PROGRAMS: SHRINK_SPLIT > 0 at decode, SHRINK_BLOCK_T > 0 at prefill) the launch's
    first programs are the members' shrinks (member 0's, then 1's, then 2's: kernels.lora_multi's decode or
    prefill shrink programs, each over its member's A with its own dropout DROP_g) writing each xa_g; a member's
    tiles wait for its own shrink only, before they expand. Without, xa_g comes from lora_grouped_multi_shrink."""
    pid = tl.program_id(0)
    shrinking: tl.constexpr = SHRINK_SPLIT > 0 or SHRINK_BLOCK_T > 0
    # WIDTH_g is 0 for a member whose xa the launch does not shrink (shrink_layout's widths): no programs
    programs0, units0, arrivals0 = shrink_share(M, WIDTH0, SHRINK_SPLIT, SHRINK_ROUNDS, SHRINK_BLOCK_T, BLOCK_R)
    programs1, units1, arrivals1 = shrink_share(M, WIDTH1, SHRINK_SPLIT, SHRINK_ROUNDS, SHRINK_BLOCK_T, BLOCK_R)
    programs2, units2, arrivals2 = shrink_share(M, WIDTH2, SHRINK_SPLIT, SHRINK_ROUNDS, SHRINK_BLOCK_T, BLOCK_R)
    counters1 = count_ptr + tl.where(programs0 > 0, arrivals0 + 2, 0)              # each member's counters
    counters2 = counters1 + tl.where(programs1 > 0, arrivals1 + 2, 0)
    ws1 = ws_ptr + SHRINK_SPLIT * M * WIDTH0                                    # each member's decode partials
    ws2 = ws1 + SHRINK_SPLIT * M * WIDTH1
    shrinks = programs0 + programs1 + programs2
    end0, end1 = _member_ends(M, N0, N1, BLOCK_M, BLOCK_N)
    if pid < shrinks:
        if pid < programs0:
            _member_shrink_program(pid, x_ptr, a0_ptr, xa0_ptr, idx_ptr, order_ptr, ranks0_ptr, scales0_ptr,
                                   dropouts0_ptr, seed0_ptr, ws_ptr, count_ptr, M, K, WIDTH0, stride_xm, stride_xk,
                                   stride_xa0m, stride_xa0r, stride_a0s, stride_a0r, stride_a0k, HAS_ORDER, DROP0,
                                   FP32_DOT, SHRINK_SPLIT, SHRINK_ROUNDS, SHRINK_BLOCK_M, SHRINK_BLOCK_T, BLOCK_R)
        elif pid < programs0 + programs1:
            _member_shrink_program(pid - programs0, x_ptr, a1_ptr, xa1_ptr, idx_ptr, order_ptr, ranks1_ptr,
                                   scales1_ptr, dropouts1_ptr, seed1_ptr, ws1, counters1, M, K, WIDTH1, stride_xm,
                                   stride_xk, stride_xa1m, stride_xa1r, stride_a1s, stride_a1r, stride_a1k, HAS_ORDER,
                                   DROP1, FP32_DOT, SHRINK_SPLIT, SHRINK_ROUNDS, SHRINK_BLOCK_M, SHRINK_BLOCK_T,
                                   BLOCK_R)
        else:
            _member_shrink_program(pid - programs0 - programs1, x_ptr, a2_ptr, xa2_ptr, idx_ptr, order_ptr,
                                   ranks2_ptr, scales2_ptr, dropouts2_ptr, seed2_ptr, ws2, counters2, M, K, WIDTH2,
                                   stride_xm, stride_xk, stride_xa2m, stride_xa2r, stride_a2s, stride_a2r, stride_a2k,
                                   HAS_ORDER, DROP2, FP32_DOT, SHRINK_SPLIT, SHRINK_ROUNDS, SHRINK_BLOCK_M,
                                   SHRINK_BLOCK_T, BLOCK_R)
    else:
        pid -= shrinks
        if pid < end0:
            pid_m, pid_n = grouped_tile(pid, M, N0, BLOCK_M, BLOCK_N, GROUP_M)
            _multi_member_tile(pid_m, pid_n, x_ptr, w0_ptr, xa0_ptr, b0_ptr, idx_ptr, order_ptr, ranks0_ptr,
                               bias0_ptr, y0_ptr, M, N0, K, stride_xm, stride_xk, stride_w0n, stride_w0k,
                               stride_xa0m, stride_xa0r, stride_b0s, stride_b0n, stride_b0r, stride_y0m, stride_y0n,
                               LORA0, HAS_ORDER, HAS_BIAS0, FP32_DOT, WAIT_PRIOR, IN_LOOP, BLOCK_R, BLOCK_M, BLOCK_N,
                               BLOCK_K, shrinking, count_ptr + arrivals0, units0, end0)
        elif MEMBERS > 1:
            if pid < end1:
                pid_m, pid_n = grouped_tile(pid - end0, M, N1, BLOCK_M, BLOCK_N, GROUP_M)
                _multi_member_tile(pid_m, pid_n, x_ptr, w1_ptr, xa1_ptr, b1_ptr, idx_ptr, order_ptr, ranks1_ptr,
                                   bias1_ptr, y1_ptr, M, N1, K, stride_xm, stride_xk, stride_w1n, stride_w1k,
                                   stride_xa1m, stride_xa1r, stride_b1s, stride_b1n, stride_b1r, stride_y1m,
                                   stride_y1n, LORA1, HAS_ORDER, HAS_BIAS1, FP32_DOT, WAIT_PRIOR, IN_LOOP, BLOCK_R,
                                   BLOCK_M, BLOCK_N, BLOCK_K, shrinking, counters1 + arrivals1, units1, end1 - end0)
            elif MEMBERS > 2:
                pid_m, pid_n = grouped_tile(pid - end1, M, N2, BLOCK_M, BLOCK_N, GROUP_M)
                _multi_member_tile(pid_m, pid_n, x_ptr, w2_ptr, xa2_ptr, b2_ptr, idx_ptr, order_ptr, ranks2_ptr,
                                   bias2_ptr, y2_ptr, M, N2, K, stride_xm, stride_xk, stride_w2n, stride_w2k,
                                   stride_xa2m, stride_xa2r, stride_b2s, stride_b2n, stride_b2r, stride_y2m,
                                   stride_y2n, LORA2, HAS_ORDER, HAS_BIAS2, FP32_DOT, WAIT_PRIOR, IN_LOOP, BLOCK_R,
                                   BLOCK_M, BLOCK_N, BLOCK_K, shrinking, counters2 + arrivals2, units2,
                                   tl.num_programs(0) - shrinks - end1)


_MULTI_MATMUL_KEY = ["T_BUCKET", "K", "N0", "N1", "N2", "MEMBERS", "HAS_ORDER", "LORA0", "LORA1", "LORA2",
                     "HAS_BIAS0", "HAS_BIAS1", "HAS_BIAS2", "IN_LOOP", "DROP0", "DROP1", "DROP2", "SHRINK_SPLIT",
                     "SHRINK_BLOCK_T"]
_grouped_multi_matmul_decode = TunedLauncher(triton.autotune(
    decode_matmul_configs(), key=_MULTI_MATMUL_KEY, prune_configs_by=prune_by_t("BLOCK_M"),
    do_bench=tune_bench)(_grouped_multi_matmul_kernel))
_grouped_multi_matmul_prefill = TunedLauncher(triton.autotune(
    prefill_matmul_configs(), key=_MULTI_MATMUL_KEY, do_bench=tune_bench)(_grouped_multi_matmul_kernel))


def lora_grouped_multi_matmul(x: torch.Tensor, weights: Sequence[torch.Tensor], xas: Sequence[torch.Tensor | None],
                              lora_Bs: Sequence[torch.Tensor | None], adapter_index: torch.Tensor,
                              ranks: Sequence[torch.Tensor | None],
                              biases: Sequence[torch.Tensor | None] | None = None,
                              order: torch.Tensor | None = None,
                              outs: Sequence[torch.Tensor] | None = None,
                              after_shrink: bool = False,
                              x_sorted: torch.Tensor | None = None) -> list[torch.Tensor]:
    """kernels.lora_multi.lora_multi_matmul for 1 to 3 members in one launch.

    x (M, K); weights[g] (N_g, K) any strides; xas[g] (M, >= r_max_g) fp32 from lora_grouped_multi_shrink,
    lora_Bs[g] (S, N_g, r_max_g) and ranks[g] (S,) int32, or all three None for a member without adapters (its
    y_g is the base output); biases[g] (N_g,) or None; adapter_index (M,) int32; order as for the shrink.
    Returns [y_g (M, N_g)]; `outs`, if given, receive them. after_shrink: as lora_multi_matmul's (the grouped
    shrink was the last launch). x_sorted: x[order] from the grouped shrink (lora_multi.tma_sorted_rows gave
    the buffer): the members then run on TMA tiles one by one (below), not in this kernel.
    """
    M, K = x.shape
    G = len(weights)
    biases = [None] * G if biases is None else list(biases)
    ys = [torch.empty((M, w.shape[0]), device=x.device, dtype=x.dtype) for w in weights] if outs is None else list(outs)
    if M == 0:
        return ys
    has_lora = [b is not None for b in lora_Bs]
    # At prefill on Hopper, member by member on TMA tiles: a member with adapters on kernels.lora_multi's (over the
    # shrink's sorted copy of x), one without on kernels.lora's base GEMM (x as it comes); the pointer tiles below
    # ran their GEMM at ~65% of cuBLAS. Should a member not fit TMA's layout rules, the grouped kernel below
    # recomputes every member.
    def member_on_tma(g: int) -> bool:
        if not has_lora[g]:
            return lora_matmul_tma(x, weights[g], None, None, biases[g], ys[g], min_tokens=TMA_MIN_T)
        lora_multi_matmul(x, weights[g], xas[g], lora_Bs[g], adapter_index, ranks[g], biases[g], order, out=ys[g],
                          after_shrink=after_shrink and g == 0, x_sorted=x_sorted)
        return True

    # with no adapter at all the members' base GEMMs need no sorted x
    on_tma = x_sorted is not None if any(has_lora) else M > DECODE_MAX_T and _tma_programs(x, M, TMA_MIN_T)
    if not (on_tma and all(map(member_on_tma, range(G)))):
        _grouped_multi_launch(x, weights, xas, lora_Bs, adapter_index, ranks, biases, order, ys, after_shrink)
    return ys


def grouped_one_launch(T: int) -> bool:
    """Whether the forward over T tokens takes lora_grouped_multi_linear (one launch) rather than
    lora_grouped_multi_shrink and lora_grouped_multi_matmul: under kernels.lora_multi.SHRINK_PROGRAMS (read per
    call), wherever the pointer tiles run (the caller keeps the two launches where the TMA tiles run)."""
    return bool(multi.SHRINK_PROGRAMS) and T > 0


def lora_grouped_multi_linear(x: torch.Tensor, weights: Sequence[torch.Tensor],
                              lora_As: Sequence[torch.Tensor | None], lora_Bs: Sequence[torch.Tensor | None],
                              adapter_index: torch.Tensor, ranks: Sequence[torch.Tensor | None],
                              scales: Sequence[torch.Tensor | None],
                              biases: Sequence[torch.Tensor | None] | None = None,
                              order: torch.Tensor | None = None,
                              dropouts: Sequence[torch.Tensor | None] | None = None,
                              seeds: Sequence[torch.Tensor | None] | None = None,
                              ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """(ys, xas): lora_grouped_multi_matmul(x, weights, lora_grouped_multi_shrink(x, lora_As, ...), ...) in one
    launch on the pointer tiles (decode or prefill): the members' shrinks on the launch's first programs, each
    member's tiles waiting for its own xa before they expand (kernels.lora_multi.lora_multi_linear's scheme). A
    member g with lora_As[g] None has no adapters (its xa is None). Arguments as those two take them."""
    M, K = x.shape
    G = len(weights)
    dropouts = [None] * G if dropouts is None else list(dropouts)
    seeds = [None] * G if seeds is None else list(seeds)
    ys = [torch.empty((M, w.shape[0]), device=x.device, dtype=x.dtype) for w in weights]
    xas = [None if a is None else torch.empty((M, padded_rank(a.shape[1])), device=x.device, dtype=torch.float32)
           for a in lora_As]
    if M > 0:
        _grouped_multi_launch(x, weights, xas, lora_Bs, adapter_index, ranks,
                              [None] * G if biases is None else list(biases), order, ys, False,
                              (lora_As, scales, dropouts, seeds))
    return ys, xas


def _grouped_multi_launch(x, weights, xas, lora_Bs, adapter_index, ranks, biases, order, ys, after_shrink: bool,
                          shrinks: tuple | None = None) -> None:
    """_grouped_multi_matmul_kernel into ys; with shrinks = (lora_As, scales, dropouts, seeds) the launch's own
    shrink programs write xas first (dropouts: the forward's input masks), else xas are given."""
    M, K = x.shape
    G = len(weights)
    has_lora = [b is not None for b in lora_Bs]
    lora_As, scales, dropouts, seeds = shrinks if shrinks is not None else ([None] * G,) * 4
    fp32 = next((xa for xa in xas if xa is not None), None)   # the base-only tile's (unread) xa pointer: fp32
    if fp32 is None:
        fp32 = torch.empty(1, device=x.device, dtype=torch.float32)
    widths = [w.shape[0] for w in weights]
    shrink_widths = [xa.shape[1] if lora_g and shrinks is not None else 0 for xa, lora_g in zip(xas, has_lora)]
    decode = M <= DECODE_MAX_T
    kernel = _grouped_multi_matmul_decode if decode else _grouped_multi_matmul_prefill
    bucket = t_bucket(M)
    in_loop = expand_in_loop(M)
    drop = [p is not None for p in dropouts]
    split_shrink, rounds, block_t, block_m = 0, 1, 0, 16
    if shrinks is not None and any(has_lora):
        if decode:  # kernels.lora_multi's grid of decode shrink programs, per member
            block_m = max(16, next_pow2(M))
            slots = min(a.shape[0] for a in lora_As if a is not None)
            split_shrink, rounds = multi.decode_shrink_grid(M, K, M if order is None else min(M, slots), block_m)
        else:
            block_t = multi.PREFILL_SHRINK_BLOCK_T
    layouts = [multi.shrink_layout(M, w, split_shrink, rounds, block_t) for w in shrink_widths]
    shrink_programs, counters = (sum(column) for column in zip(*layouts))
    workspace = split_shrink * M * sum(shrink_widths)
    count, ws = split_state(x.device, counters, workspace) if counters else (adapter_index, fp32)
    members, strides = [], []
    for g in range(G):
        w, xa, b, y, a = weights[g], xas[g], lora_Bs[g], ys[g], lora_As[g]
        lora_g = has_lora[g]
        reads_a = a is not None and lora_g
        members += [w, xa if lora_g else fp32, b if lora_g else w, ranks[g] if lora_g else adapter_index,
                    y if biases[g] is None else biases[g], y, a if reads_a else w,
                    scales[g] if reads_a else fp32, dropouts[g] if drop[g] else fp32,
                    seeds[g] if drop[g] else adapter_index]
        strides += [*w.stride(), *(xa.stride() if lora_g else (0, 0)), *(b.stride() if lora_g else (0, 0, 0)),
                    *y.stride(), *(a.stride() if reads_a else (0, 0, 0))]
    members += members[:10] * (MAX_MEMBERS - G)
    strides += strides[:12] * (MAX_MEMBERS - G)
    has_bias = [b is not None for b in biases]
    key = (bucket, K, *widths, order is None, *has_lora, *has_bias, x.dtype, *(w.dtype for w in weights),
           *(b.dtype for b in lora_Bs if b is not None)) + (("in_loop",) if in_loop else ())
    key += (("shrink", split_shrink, block_t, *drop) if shrink_programs else ())
    tiles = _tile_grid(M, widths)
    kernel.launch(key, lambda meta: (shrink_programs + tiles(meta)[0],),
        x, adapter_index, adapter_index if order is None else order, *members, count, ws,
        M, K, bucket, *_padded(widths, 0), *_padded(shrink_widths, 0),
        x.stride(0), x.stride(1), *strides,
        MEMBERS=G, HAS_ORDER=order is not None, **_flags("LORA", has_lora), **_flags("HAS_BIAS", has_bias),
        FP32_DOT=x.dtype == torch.float32, IN_LOOP=in_loop, BLOCK_R=MULTI_BLOCK_R,
        **_flags("DROP", [d and shrink_programs > 0 for d in drop]),
        SHRINK_SPLIT=split_shrink, SHRINK_ROUNDS=rounds, SHRINK_BLOCK_M=block_m, SHRINK_BLOCK_T=block_t,
        **wait_flags(after_shrink, x),
    )
