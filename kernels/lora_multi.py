"""Multi-adapter LoRA linear: each token t picks slot a = idx[t] (or -1, none) of stacked adapters.

    y[t] = x[t] W^T + bias + xa[t] B_a^T,   xa[t] = s_a x[t] A_a^T   (fp32, r_max wide, zero beyond rank_a)

Three kernels, as for the single-adapter op, each reused by backward through strides:
- shrink:      xa = per-row s_a x A_a^T (T, r_max) fp32; also g = s_a dy B_a in backward.
- matmul:      the base GEMM with every row block's adapters expanded in its epilogue: no d_out-wide LoRA
               product in memory; also dx = dy W0 + g A_a in backward. At decode one row block with K split
               across programs (W0 streamed once); at a few tokens of low rank the forward's shrink too, each
               split expanding its own partial shrink (lora_multi_linear: one launch), and with SHRINK_PROGRAMS
               at any T below the TMA tile's the forward's shrink on the launch's own first programs, which the
               matmul programs wait for before they expand; at prefill on Hopper above TMA_MIN_T tokens a
               persistent TMA tile over the shrink's slot-sorted copy of x (TMA cannot gather rows;
               tma_sorted_rows), its output rows stored back to their tokens.
- weight grad: per slot, sum over that slot's tokens of G[t]^T H[t] (dB_a = dy^T xa, dA_a^T = x^T g), over
               device-sorted segments so the work is one pass over the tokens whatever the number of slots.
Row blocks walk the tokens in slot-sorted order, so a block's rows form a few runs of one slot each (slot_runs).
The shrink and the expand take RUNS runs at a time as one tensor-core dot over RUNS x 16 ranks (runs_shrink,
runs_expand): every run's A / B rows are loaded side by side, so the cost of a block does not grow one dependent
step per distinct adapter, and loads stay coalesced along the rank / feature axes. Ranks advance 16 at a time up
to the largest rank among a round's runs (mixed ranks cost no padding to r_max), and rows with no adapter join
no run: they cost only the base GEMM. Nothing reads the mapping on the host, so a CUDA graph can replay with a
new mapping in the same buffers.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .configs import (DECODE_MAX_T, TunedLauncher, cdiv, dependent_launch, next_pow2, prefill_matmul_configs,
                      prune_by_t, prune_split_decode, shrink_configs, split_decode_configs, t_bucket,
                      tma_matmul_configs, tune_bench, wait_flags, weight_grad_configs)
from . import lora as lora_kernels
from .lora import (_accumulated, _descriptor, _dot, _dot_fp32, _keep_mask, _tma_layout, _tma_programs, base_k_step,
                   grouped_tile, split_buffers, split_k_arrive, split_k_program, split_k_total, store_split, store_tile,
                   tma_guarded_launch, tma_k_loop)
from .lora import SHRINK_BLOCK_K, SHRINK_K_STEPS, decode_shrink_split   # lora_multi's own: tests patch them here
from .split_state import arrive_last, count_in, split_state, wait_count

# The multi-adapter prefill runs on the Hopper TMA tile (_multi_matmul_tma_kernel, over the shrink's slot-sorted
# copy of x) above this many tokens, else on the one-pass pointer tile. H100, 2026-11-26 (4096 x 4096, 32 rank-16
# adapters, CUDA graph): the pointer tile ran its GEMM at ~65% of cuBLAS; the TMA base GEMM (716 TFLOP/s) with
# a separate expand pass over y was level with it at T = 1024, 2% faster at 4096 (the pass spent the gain).
# 2026-11-27 (same shapes, programmatic launches off): the TMA tile over the sorted copy 0.0818 ms at T = 1024
# against the pointer tile's 0.0785, so it started above 1024 (the rule the 2026-11-26 prediction set).
# 2026-11-28 at T = 4096 it lost too: 1.05-1.08x the pointer tile forward (1, 4, 32, 128 adapters), 1.20x
# fwd+bwd; its shrink, which also writes the sorted copy, ran 41.8 us against 20.1. So it starts above 8192,
# where it was never timed (PTLM_TMA_PREFILL=1 forces it at any T).
TMA_MIN_T = 8192
# The decode matmuls' forward expand (a given xa; this op's and kernels.lora_grouped's) inside the base GEMM's K
# loop, a (round, 16 ranks) pair every K step (expand_pair), instead of runs_expand's rounds after the loop, where
# each round's dependent loads wait in turn while no W streams. Off until the card has timed it (bench.lora_multi's
# ptlm_in_loop provider turns it on); PTLM_MULTI_IN_LOOP=1 / 0. It replaced a pass over the batch's slot span
# after the loop (H100 2026-11-28, T = 64, 32 adapters: decode kernel 28.5 us against the rounds' 28.3).
EXPAND_IN_LOOP = os.environ.get("PTLM_MULTI_IN_LOOP", "0") == "1"


def expand_in_loop(T: int) -> bool:
    """Whether a forward decode matmul over T tokens expands inside its K loop (read per call: benchmarks switch
    EXPAND_IN_LOOP)."""
    return bool(EXPAND_IN_LOOP) and T <= DECODE_MAX_T


BLOCK_R = 16  # rank granularity: a slot of rank r costs ceil(r / 16) steps
# Elements of the larger operand of a round's dot (RUNS x 16 ranks against the tile's rows or columns): 16 KB
# of fp32, in registers before the dot (runs_expand, runs_shrink).
ROUND_ELEMENTS = tl.constexpr(4096)


@triton.jit
def _block_tokens(order_ptr, pid, T, HAS_ORDER: tl.constexpr, BLOCK: tl.constexpr):
    """The tokens of row block `pid`: positions pid*BLOCK.. of the slot-sorted order when there is one (so a
    block holds few distinct slots), else of the batch as it comes. Returns (tokens, in-range mask)."""
    pos = pid * BLOCK + tl.arange(0, BLOCK)
    mask = pos < T
    if HAS_ORDER:
        return tl.load(order_ptr + pos, mask=mask, other=0), mask
    return pos, mask


@triton.jit
def slot_runs(idx_ptr, order_ptr, pid, T, slot, HAS_ORDER: tl.constexpr, BLOCK: tl.constexpr):
    """(run, runs): each row's run in row block `pid` (0, 1, ...) and the block's number of runs. A run is a
    stretch of the block's consecutive rows (in its order) that share a slot; rows with no adapter start none
    and are never read by a run's step (callers mask them by slot >= 0). Slot-sorted rows: one run per distinct
    slot. The previous row's slot is loaded again rather than shifted in registers (Triton has no shift)."""
    pos = pid * BLOCK + tl.arange(0, BLOCK)
    has_prev = (tl.arange(0, BLOCK) > 0) & (pos < T)
    prev = pos - 1
    if HAS_ORDER:
        prev = tl.load(order_ptr + prev, mask=has_prev, other=0)
    prev_slot = tl.load(idx_ptr + prev, mask=has_prev, other=-1)
    start = ((slot >= 0) & (slot != prev_slot)).to(tl.int32)
    return tl.cumsum(start, axis=0) - 1, tl.sum(start, axis=0)


@triton.jit
def per_row(ptr, slot):
    """Each row's slot's entry of a per-slot table (ranks, scales, dropouts), 0 for rows with no adapter."""
    return tl.load(ptr + tl.maximum(slot, 0), mask=slot >= 0, other=0)


@triton.jit
def round_runs(slot, run, g, RUNS: tl.constexpr):
    """Runs g .. g + RUNS - 1 of a block: (mine (rows, RUNS): row in run j, their slots (RUNS,), -1 past the
    block's runs)."""
    mine = (run[:, None] == g + tl.arange(0, RUNS)[None, :]) & (slot >= 0)[:, None]
    return mine, tl.max(tl.where(mine, slot[:, None], -1), axis=0)


@triton.jit
def _run_ranks(mine, rank):
    """The ranks (RUNS,) of a round's runs from each row's rank (0 past the block's runs)."""
    return tl.max(tl.where(mine, rank[:, None], 0), axis=0)


# ---------------------------------------------------------------------------------------------------- shrink
@triton.jit
def shrink_round(a_ptr, rank, mine, run_slot, first_r, stride_as, stride_ar, BLOCK_R: tl.constexpr):
    """A shrink round's A side, from the rows' ranks and the round's runs (round_runs): the round's A row
    pointers (RUNS, BLOCK_R, 1) for ranks first_r.., their live mask, whether any run of the round has ranks
    there."""
    run_rank = _run_ranks(mine, rank)
    offs_r = first_r + tl.arange(0, BLOCK_R)
    a_rows = (a_ptr + tl.maximum(run_slot, 0).to(tl.int64)[:, None, None] * stride_as
              + offs_r[None, :, None] * stride_ar)
    return a_rows, offs_r[None, :, None] < run_rank[:, None, None], first_r < tl.max(run_rank, axis=0)


@triton.jit
def shrink_round_x(x_ptr, offs_t, rows, k0, K, stride_xt, stride_xk, BLOCK_K: tl.constexpr):
    """A shrink round's x tile from column k0: (x (rows, BLOCK_K) on the round's rows, offs_k, in_k)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    in_k = offs_k < K
    x = tl.load(x_ptr + offs_t.to(tl.int64)[:, None] * stride_xt + offs_k[None, :] * stride_xk,
                mask=rows[:, None] & in_k[None, :], other=0.0)
    return x, offs_k, in_k


@triton.jit
def shrink_round_step(y, x, a_rows, live, offs_t, offs_k, in_k, K, seed_ptr, p, stride_ak, DROPOUT: tl.constexpr,
                      FP32_DOT: tl.constexpr, RUNS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """y (rows, RUNS * BLOCK_R) += keep * x (rows, BLOCK_K) @ the round's A rows side by side, (BLOCK_K, RUNS *
    BLOCK_R); keep: each row's slot's probability p (rows, 1) at the element's logical index t * K + k."""
    if DROPOUT:
        x = tl.where(_keep_mask(seed_ptr, offs_t[:, None] * K + offs_k[None, :], p), x, 0.0)
    a = tl.load(a_rows + offs_k[None, None, :] * stride_ak, mask=live & in_k[None, None, :],
                other=0.0)                                                              # (RUNS, BLOCK_R, BLOCK_K)
    a = a.to(x.dtype)                                         # float32 master adapters: read as x's dtype
    return _dot(x, tl.trans(tl.reshape(a, (RUNS * BLOCK_R, BLOCK_K))), y, FP32_DOT)


@triton.jit
def shrink_round_pick(acc, y, mine, RUNS: tl.constexpr, BLOCK_R: tl.constexpr):
    """acc (rows, BLOCK_R) += each row's own run's BLOCK_R columns of a round's y (rows, RUNS * BLOCK_R)."""
    y = tl.reshape(y, (y.shape[0], RUNS, BLOCK_R))
    return acc + tl.sum(tl.where(mine[:, :, None], y, 0.0), axis=1)


@triton.jit
def row_dropout(slot, dropouts_ptr, DROPOUT: tl.constexpr):
    """Each row's slot's dropout probability (rows, 1), 0 without dropout or adapter."""
    if DROPOUT:
        return per_row(dropouts_ptr, slot)[:, None]
    return tl.zeros_like(slot).to(tl.float32)[:, None]


@triton.jit
def row_scale(slot, scales_ptr, dropouts_ptr, DIV_KEEP: tl.constexpr):
    """Each row's s_a, divided by 1 - p_a with DIV_KEEP, as (rows, 1) (0 for rows without an adapter)."""
    scale = per_row(scales_ptr, slot)
    if DIV_KEEP:
        scale = scale / (1.0 - per_row(dropouts_ptr, slot))
    return scale[:, None]


@triton.jit
def _multi_shrink_kernel(
    x_ptr, a_ptr, idx_ptr, order_ptr, ranks_ptr, scales_ptr, dropouts_ptr, seed_ptr, out_ptr, xs_ptr,
    T, K, T_BUCKET,
    stride_xt, stride_xk, stride_as, stride_ar, stride_ak, stride_ot, stride_or,
    HAS_ORDER: tl.constexpr, MASK_X: tl.constexpr, DIV_KEEP: tl.constexpr, FP32_DOT: tl.constexpr,
    STORE_X: tl.constexpr, LAUNCH_DEPENDENTS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_ROUNDS: tl.constexpr = 1,
):
    """Grid (row blocks, rank blocks, SPLIT_K * SPLIT_ROUNDS): program (t, r, g * SPLIT_K + k) shrinks split k of
    K for the rows of row block t in rounds g, g + SPLIT_ROUNDS, ... of its runs (shrink_rounds), into ranks
    r * 16... At decode a block's rounds are a chain of dependent loads (H100 2026-11-28, T = 16: 4.4 us at one
    adapter, 14.1 at 128); SPLIT_ROUNDS programs take them side by side."""
    if LAUNCH_DEPENDENTS:  # the matmul after this launch may start (it waits for what this one writes)
        gdc_launch_dependents()
    pid_t = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_k = tl.program_id(2) % SPLIT_K
    pid_g = tl.program_id(2) // SPLIT_K
    offs_t, mask_t = _block_tokens(order_ptr, pid_t, T, HAS_ORDER, BLOCK_T)
    if STORE_X:
        if (pid_r == 0) & (pid_g == 0):
            copy_sorted_rows(x_ptr, xs_ptr, offs_t, mask_t, pid_t, pid_k, K, stride_xt, stride_xk, SPLIT_K, BLOCK_T,
                             BLOCK_K)
    slot = tl.load(idx_ptr + offs_t, mask=mask_t, other=-1)                                  # (BLOCK_T,)
    run, runs = slot_runs(idx_ptr, order_ptr, pid_t, T, slot, HAS_ORDER, BLOCK_T)
    acc = runs_shrink(tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32), x_ptr, a_ptr, ranks_ptr, dropouts_ptr, seed_ptr,
                      slot, run, runs, offs_t, pid_r * BLOCK_R, pid_k, pid_g, K, stride_xt, stride_xk, stride_as,
                      stride_ar, stride_ak, MASK_X, FP32_DOT, SPLIT_K, SPLIT_ROUNDS, BLOCK_T, BLOCK_R, BLOCK_K)
    acc *= row_scale(slot, scales_ptr, dropouts_ptr, DIV_KEEP)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rows = mask_t
    if SPLIT_ROUNDS > 1:  # the rows of this program's rounds; the others' programs add theirs
        rows &= shrink_round_rows(slot, run, pid_g, SPLIT_ROUNDS, 1, BLOCK_T, BLOCK_K)
    store_split(out_ptr, offs_t, offs_r, stride_ot, stride_or, acc, rows[:, None], SPLIT_K * SPLIT_ROUNDS)


@triton.jit
def copy_sorted_rows(x_ptr, xs_ptr, offs_t, mask_t, pid_t, pid_k, K, stride_xt, stride_xk, SPLIT_K: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """xs[pid_t * BLOCK_T + i] = x[offs_t[i]] over this split's K columns: x's rows in the block's order, into a
    contiguous (T, K) xs (the TMA matmul's operand: TMA copies rows in place, it cannot gather them)."""
    pos = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = mask_t[:, None] & (offs_k < K)[None, :]
        rows = tl.load(x_ptr + offs_t.to(tl.int64)[:, None] * stride_xt + offs_k[None, :] * stride_xk, mask=mask)
        tl.store(xs_ptr + pos[:, None] * K + offs_k[None, :], rows, mask=mask)


@triton.constexpr_function
def shrink_runs(members, block_t, block_k):
    """Runs a shrink round takes: the round's A tile (of every member: kernels.lora_grouped) and its (BLOCK_T,
    RUNS * 16) sum within ROUND_ELEMENTS each (three members at 16 x 128 spilled 0.9 KB on their own: ptxas,
    sm_90)."""
    return max(1, min(ROUND_ELEMENTS.value // (members * BLOCK_R * block_k),
                      ROUND_ELEMENTS.value // (BLOCK_R * block_t)))


@triton.jit
def shrink_round_rows(slot, run, first_round, round_step, MEMBERS: tl.constexpr, BLOCK_T: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    """The rows with an adapter whose run falls in shrink rounds first_round, first_round + round_step, ..."""
    RUNS: tl.constexpr = shrink_runs(MEMBERS, BLOCK_T, BLOCK_K)
    return ((run // RUNS) % round_step == first_round) & (slot >= 0)


@triton.jit
def runs_shrink(acc, x_ptr, a_ptr, ranks_ptr, dropouts_ptr, seed_ptr, slot, run, runs, offs_t, first_r, pid_k,
                first_round, K, stride_xt, stride_xk, stride_as, stride_ar, stride_ak, DROPOUT: tl.constexpr,
                FP32_DOT: tl.constexpr, SPLIT_K: tl.constexpr, ROUND_STEP: tl.constexpr, BLOCK_T: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc (BLOCK_T, BLOCK_R) += keep * x A_a^T over ranks first_r.. of each row's slot and this program's K
    columns (split as split-K programs split them), for the rows of rounds first_round, first_round + ROUND_STEP,
    ... (shrink_round_rows; the others' stay as they are).

    RUNS runs a round: x's tile (the round's rows) times the round's A rows side by side, (BLOCK_K, RUNS * 16),
    accumulated over K as (BLOCK_T, RUNS * 16), of which each row keeps its own run's 16 columns. The extra
    columns are tensor-core work on data already loaded; a per-slot loop would instead chain a dependent rank
    load, tile loads and a dot per distinct slot of the block (~2 us each on the H100, 2026-11-26).
    kernels.lora_grouped runs the same round for up to three members over one x tile."""
    RUNS: tl.constexpr = shrink_runs(1, BLOCK_T, BLOCK_K)
    p = row_dropout(slot, dropouts_ptr, DROPOUT)
    rank = per_row(ranks_ptr, slot)
    for g in range(first_round * RUNS, runs, ROUND_STEP * RUNS):
        mine, run_slot = round_runs(slot, run, g, RUNS)
        a_rows, live, go = shrink_round(a_ptr, rank, mine, run_slot, first_r, stride_as, stride_ar, BLOCK_R)
        if go:
            rows = (run >= g) & (run < g + RUNS) & (slot >= 0)
            y = tl.zeros((BLOCK_T, RUNS * BLOCK_R), dtype=tl.float32)
            for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
                x, offs_k, in_k = shrink_round_x(x_ptr, offs_t, rows, k0, K, stride_xt, stride_xk, BLOCK_K)
                y = shrink_round_step(y, x, a_rows, live, offs_t, offs_k, in_k, K, seed_ptr, p, stride_ak, DROPOUT,
                                      FP32_DOT, RUNS, BLOCK_R, BLOCK_K)
            acc = shrink_round_pick(acc, y, mine, RUNS, BLOCK_R)
    # ranks past a row's own read zero A rows: an inf in x would leave inf * 0 = NaN there for B's zero rows to
    # carry into y
    return tl.where((first_r + tl.arange(0, BLOCK_R))[None, :] < rank[:, None], acc, 0.0)


_multi_shrink = TunedLauncher(triton.autotune(
    shrink_configs(round_splits=True), key=["T_BUCKET", "K", "HAS_ORDER", "MASK_X", "DIV_KEEP", "STORE_X"],
    prune_configs_by=prune_by_t("BLOCK_T", "SPLIT_K"), reset_to_zero=["out_ptr"],
    do_bench=tune_bench)(_multi_shrink_kernel))


def padded_rank(r_max: int) -> int:
    """xa's width: r_max rounded up to the rank granularity, so every kernel tile stays in bounds."""
    return cdiv(r_max, BLOCK_R) * BLOCK_R


def lora_multi_shrink(x: torch.Tensor, lora_A: torch.Tensor, adapter_index: torch.Tensor, ranks: torch.Tensor,
                      scales: torch.Tensor, order: torch.Tensor | None = None, dropouts: torch.Tensor | None = None,
                      seed: torch.Tensor | None = None, mask_x: bool = True,
                      x_sorted: torch.Tensor | None = None) -> torch.Tensor:
    """xa[t] = scales[a] / (1 - p_a) * (keep * x[t]) @ lora_A[a]^T with a = adapter_index[t] (0 where a = -1).

    x (T, K); lora_A (S, r_max, K) any strides; adapter_index (T,) int32; ranks (S,) int32; scales (S,) fp32;
    order (T,) int32, the tokens sorted by slot (token_segments), or None to take them as they come;
    dropouts (S,) fp32 per-slot LoRA dropout p_a with seed (1,) int64, or None: keep is the keep mask of
    (seed, t * K + k) when mask_x, else only the 1 / (1 - p_a) factor applies (the backward's g = s dy B).
    x_sorted (T, K) contiguous, if given (with order), receives x[order] (see tma_sorted_rows).
    Returns (T, padded_rank(r_max)) fp32, zero beyond each token's rank.
    """
    T, K = x.shape
    width = padded_rank(lora_A.shape[1])
    bucket = t_bucket(T)
    store_x = x_sorted is not None
    if store_x and order is None:
        raise ValueError("x_sorted holds x's rows in `order`: give it")
    key = (bucket, K, order is None, dropouts is None, mask_x, store_x, x.dtype, lora_A.dtype)
    # Split programs add into the output; unsplit, every element is stored once and no memset launches.
    out = (torch.zeros if _multi_shrink.adds_into_output(key, "SPLIT_K", "SPLIT_ROUNDS") else torch.empty)(
        (T, width), device=x.device, dtype=torch.float32)
    if T == 0:
        return out
    grid = lambda meta: (cdiv(T, meta["BLOCK_T"]), width // BLOCK_R, meta["SPLIT_K"] * meta.get("SPLIT_ROUNDS", 1))
    sx, sa = x.stride(), lora_A.stride()
    _multi_shrink.launch(
        key, grid,
        x, lora_A, adapter_index, adapter_index if order is None else order, ranks, scales,
        scales if dropouts is None else dropouts, adapter_index if seed is None else seed, out,
        x_sorted if store_x else x,
        T, K, bucket,
        sx[0], sx[1], sa[0], sa[1], sa[2], width, 1,
        HAS_ORDER=order is not None, MASK_X=dropouts is not None and mask_x, DIV_KEEP=dropouts is not None,
        FP32_DOT=x.dtype == torch.float32, STORE_X=store_x, LAUNCH_DEPENDENTS=dependent_launch(x.device),
        BLOCK_R=BLOCK_R,
    )
    return out


# ---------------------------------------------------------------------------------------------------- matmul
@triton.jit
def multi_matmul_tile(
    pid_m, pid_n, x_ptr, w_ptr, xa_ptr, b_ptr, idx_ptr, order_ptr, ranks_ptr, dropouts_ptr, seed_ptr, bias_ptr,
    y_ptr, M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_xam, stride_xar, stride_bs, stride_bn, stride_br,
    stride_ym, stride_yn,
    HAS_ORDER: tl.constexpr, OUT_DROPOUT: tl.constexpr, HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ACCUMULATE: tl.constexpr = False, WAIT_PRIOR: tl.constexpr = False, IN_LOOP: tl.constexpr = False,
    WAIT_READY: tl.constexpr = False, count_ptr=None, ready_total=0, tiles=0,
):
    """Tile (pid_m, pid_n) of the matmul below; also one member's tile in kernels.lora_grouped. ACCUMULATE adds
    y's values (the grouped backward's dx over its members). IN_LOOP: the forward's expand inside the K loop
    (expanded_k_loop; the grouped decode's, under EXPAND_IN_LOOP).
    WAIT_PRIOR: launched as a dependent of the shrink that writes xa, which may still run: wait for it before
    the expand (nothing before reads what it writes). WAIT_READY: the launch's own shrink programs write xa
    (_multi_matmul_kernel, kernels.lora_grouped's multi matmul): wait until ready_total of them count in at
    count_ptr[0]; the last of the `tiles` tiles past its expand zeroes count_ptr[0:2] for the next launch."""
    offs_m, mask_m = _block_tokens(order_ptr, pid_m, M, HAS_ORDER, BLOCK_M)               # token rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N

    slot = tl.load(idx_ptr + offs_m, mask=mask_m, other=-1)                                  # (BLOCK_M,)
    run, runs = slot_runs(idx_ptr, order_ptr, pid_m, M, slot, HAS_ORDER, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if OUT_DROPOUT:
        # backward dx: each row's LoRA gradient passes its slot's forward dropout mask. Expanded first, while it is
        # all the accumulator holds, the mask applies there and one accumulator serves (a separate LoRA tile
        # beside the base one spilled ~9 KB a thread at 128 x 256: Triton 3.6, ptxas).
        if WAIT_PRIOR:
            gdc_wait()
        acc = runs_expand(acc, slot, run, runs, 0, 1, offs_m, offs_n, mask_n, xa_ptr, b_ptr, ranks_ptr, stride_xam,
                          stride_xar, stride_bs, stride_bn, stride_br, FP32_DOT, BLOCK_R, BLOCK_M, BLOCK_N)
        acc = _slot_dropout(acc, slot, offs_m, offs_n, N, dropouts_ptr, seed_ptr)
    if IN_LOOP and not OUT_DROPOUT:
        acc = expanded_k_loop(acc, x_ptr, w_ptr, offs_m, mask_m, offs_n, mask_n, 0, K, K, slot, run, runs, 0, 1,
                              xa_ptr, b_ptr, ranks_ptr, count_ptr, ready_total, stride_xm, stride_xk, stride_wn,
                              stride_wk, stride_xam, stride_xar, stride_bs, stride_bn, stride_br, WAIT_PRIOR,
                              WAIT_READY, FP32_DOT, BLOCK_R, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        for k0 in range(0, K, BLOCK_K):
            x, w, _, _ = base_k_step(x_ptr, w_ptr, offs_m, mask_m, offs_n, mask_n, k0, K, stride_xm, stride_xk,
                                     stride_wn, stride_wk, BLOCK_K)
            acc = _dot(x, w, acc, FP32_DOT)
        if not OUT_DROPOUT:
            if WAIT_PRIOR:
                gdc_wait()
            if WAIT_READY:
                wait_count(count_ptr, ready_total)
            acc = runs_expand(acc, slot, run, runs, 0, 1, offs_m, offs_n, mask_n, xa_ptr, b_ptr, ranks_ptr,
                              stride_xam, stride_xar, stride_bs, stride_bn, stride_br, FP32_DOT, BLOCK_R, BLOCK_M,
                              BLOCK_N)
    if WAIT_READY and not OUT_DROPOUT:  # the last tile past its expand resets ready and done for the next launch
        if arrive_last(count_ptr, 1, tiles):
            tl.atomic_xchg(count_ptr, 0)
            tl.atomic_xchg(count_ptr + 1, 0)
    store_tile(acc, bias_ptr, y_ptr, offs_m, mask_m, offs_n, mask_n, stride_ym, stride_yn, HAS_BIAS, ACCUMULATE)


@triton.jit
def _slot_dropout(lora, slot, offs_m, offs_n, N, dropouts_ptr, seed_ptr):
    """lora where each row's slot's forward dropout mask (logical index m * N + n) keeps it, else 0: backward
    dx's LoRA term."""
    return tl.where(_keep_mask(seed_ptr, offs_m[:, None] * N + offs_n[None, :], row_dropout(slot, dropouts_ptr, True)),
                    lora, 0.0)


@triton.constexpr_function
def expand_runs(block_m, block_n):
    """Runs a round of the expand takes (runs_expand, expand_pair): B's (RUNS * 16, BLOCK_N) within
    ROUND_ELEMENTS, xa's (BLOCK_M, RUNS * 16) within half of it, beside the (BLOCK_M, BLOCK_N) accumulator (8192
    and 4096 spilled 0.7-2.2 KB at 128 x 128 to 64 x 256: ptxas, sm_90)."""
    return max(1, min(ROUND_ELEMENTS.value // (2 * BLOCK_R * block_m), ROUND_ELEMENTS.value // (BLOCK_R * block_n)))


@triton.jit
def expand_step(lora, mine, run_slot, run_rank, r0, offs_m, offs_n, mask_n, xa_ptr, b_ptr, stride_xam, stride_xar,
                stride_bs, stride_bn, stride_br, FP32_DOT: tl.constexpr, RUNS: tl.constexpr, BLOCK_R: tl.constexpr):
    """lora (rows, BLOCK_N) += ranks r0.. of a round (round_runs: mine, run_slot; run_rank) as one tf32 dot of
    K = RUNS * 16: the rows' xa in their own run's 16 columns (zero in the others) against the round's B rows
    side by side. Loads are coalesced along xa's ranks and B's (RUNS, BLOCK_N, 16) tile; at decode the v2 per-row
    gather read B's ranks 2 bytes of every 32-byte sector at a time."""
    offs_r = r0 + tl.arange(0, BLOCK_R)
    xa = tl.load(xa_ptr + offs_m[:, None, None] * stride_xam + offs_r[None, None, :] * stride_xar,
                 mask=mine[:, :, None], other=0.0)                                     # (rows, RUNS, BLOCK_R)
    b = tl.load(b_ptr + tl.maximum(run_slot, 0).to(tl.int64)[:, None, None] * stride_bs
                + offs_n[None, :, None] * stride_bn + offs_r[None, None, :] * stride_br,
                mask=(offs_r[None, None, :] < run_rank[:, None, None]) & mask_n[None, :, None],
                other=0.0)                                                             # (RUNS, BLOCK_N, BLOCK_R)
    b = tl.reshape(tl.permute(b, (0, 2, 1)), (RUNS * BLOCK_R, b.shape[1]))
    return _dot_fp32(tl.reshape(xa, (xa.shape[0], RUNS * BLOCK_R)), b.to(tl.float32), lora, FP32_DOT)


@triton.jit
def runs_expand(lora, slot, run, runs, first_round, round_step, offs_m, offs_n, mask_n, xa_ptr, b_ptr, ranks_ptr,
                stride_xam, stride_xar, stride_bs, stride_bn, stride_br, FP32_DOT: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """lora (BLOCK_M, BLOCK_N) += each row's xa B_a^T, RUNS runs a round (expand_step), each round over its own
    runs' ranks only. Rounds first_round, first_round + round_step, ... of the block's runs (split-K decode
    programs share them out)."""
    RUNS: tl.constexpr = expand_runs(BLOCK_M, BLOCK_N)
    rank = per_row(ranks_ptr, slot)                                                             # (BLOCK_M,)
    for g in range(first_round * RUNS, runs, round_step * RUNS):
        mine, run_slot = round_runs(slot, run, g, RUNS)                            # (BLOCK_M, RUNS), (RUNS,)
        run_rank = _run_ranks(mine, rank)                                           # (RUNS,)
        for r0 in range(0, tl.max(run_rank, axis=0), BLOCK_R):
            lora = expand_step(lora, mine, run_slot, run_rank, r0, offs_m, offs_n, mask_n, xa_ptr, b_ptr, stride_xam,
                               stride_xar, stride_bs, stride_bn, stride_br, FP32_DOT, RUNS, BLOCK_R)
    return lora


@triton.jit
def expand_pairs(slot, runs, ranks_ptr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(pairs, steps, rank) of a block's expand as (round, 16 ranks) pairs for expand_pair: every round takes the
    steps of the block's largest rank (at decode a few rows; a step past a round's ranks loads nothing), at least
    one; rank (BLOCK_M,) is each row's."""
    RUNS: tl.constexpr = expand_runs(BLOCK_M, BLOCK_N)
    rank = per_row(ranks_ptr, slot)
    steps = tl.maximum(tl.cdiv(tl.max(rank, axis=0), BLOCK_R), 1)
    return tl.cdiv(runs, RUNS) * steps, steps, rank


@triton.jit
def expand_pair(lora, i, steps, slot, run, rank, offs_m, offs_n, mask_n, xa_ptr, b_ptr, stride_xam, stride_xar,
                stride_bs, stride_bn, stride_br, FP32_DOT: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """lora += pair i of the block's expand (expand_pairs): round i // steps, ranks (i % steps) * 16... Past the
    last pair it loads nothing and its dot adds zeros, so the decode matmuls call it once every base K step
    (IN_LOOP): its addresses depend on i and registers alone, its loads pipeline with W's, and the rounds' load
    latencies hide behind W's stream instead of following it."""
    RUNS: tl.constexpr = expand_runs(BLOCK_M, BLOCK_N)
    mine, run_slot = round_runs(slot, run, (i // steps) * RUNS, RUNS)
    return expand_step(lora, mine, run_slot, _run_ranks(mine, rank), (i % steps) * BLOCK_R, offs_m, offs_n, mask_n,
                       xa_ptr, b_ptr, stride_xam, stride_xar, stride_bs, stride_bn, stride_br, FP32_DOT, RUNS, BLOCK_R)


@triton.jit
def expanded_k_loop(acc, x_ptr, w_ptr, offs_m, mask_m, offs_n, mask_n, k_lo, k_hi, K, slot, run, runs, first, step,
                    xa_ptr, b_ptr, ranks_ptr, ready_ptr, ready_total, stride_xm, stride_xk, stride_wn, stride_wk,
                    stride_xam, stride_xar, stride_bs, stride_bn, stride_br, WAIT_PRIOR: tl.constexpr,
                    WAIT_READY: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += x W^T over K columns [k_lo, k_hi) and the expand's pairs first, first + step, ... (expand_pairs),
    one a K step over the loop's last K steps, the pairs left over after it (more pairs than K steps). Whatever
    writes xa is waited for only before those last steps, while W has streamed the others: the shrink this launch
    depends on (WAIT_PRIOR), or this launch's own shrink programs (WAIT_READY: ready_total units counted in at
    ready_ptr)."""
    pairs, steps, rank = expand_pairs(slot, runs, ranks_ptr, BLOCK_R, BLOCK_M, BLOCK_N)
    k_steps = tl.cdiv(tl.maximum(k_hi - k_lo, 0), BLOCK_K)
    k_mid = k_lo + tl.maximum(k_steps - tl.cdiv(tl.maximum(pairs - first, 0), step), 0) * BLOCK_K
    for k0 in range(k_lo, k_mid, BLOCK_K):
        x, w, _, _ = base_k_step(x_ptr, w_ptr, offs_m, mask_m, offs_n, mask_n, k0, K, stride_xm, stride_xk, stride_wn,
                                 stride_wk, BLOCK_K)
        acc = _dot(x, w, acc, FP32_DOT)
    if WAIT_PRIOR:
        gdc_wait()
    if WAIT_READY:
        wait_count(ready_ptr, ready_total)
    for k0 in range(k_mid, k_hi, BLOCK_K):
        x, w, _, _ = base_k_step(x_ptr, w_ptr, offs_m, mask_m, offs_n, mask_n, k0, K, stride_xm, stride_xk, stride_wn,
                                 stride_wk, BLOCK_K)
        acc = _dot(x, w, acc, FP32_DOT)
        acc = expand_pair(acc, first + (k0 - k_mid) // BLOCK_K * step, steps, slot, run, rank, offs_m, offs_n,
                          mask_n, xa_ptr, b_ptr, stride_xam, stride_xar, stride_bs, stride_bn, stride_br, FP32_DOT,
                          BLOCK_R, BLOCK_M, BLOCK_N)
    for i in range(first + tl.cdiv(tl.maximum(k_hi - k_mid, 0), BLOCK_K) * step, pairs, step):
        acc = expand_pair(acc, i, steps, slot, run, rank, offs_m, offs_n, mask_n, xa_ptr, b_ptr, stride_xam,
                          stride_xar, stride_bs, stride_bn, stride_br, FP32_DOT, BLOCK_R, BLOCK_M, BLOCK_N)
    return acc


@triton.jit
def shrink_share(M, WIDTH, SHRINK_SPLIT: tl.constexpr, SHRINK_ROUNDS: tl.constexpr, SHRINK_BLOCK_T: tl.constexpr,
                 BLOCK_R: tl.constexpr):
    """(programs, units, arrivals) of a launch's own shrink programs for one weight of WIDTH padded ranks
    (shrink_layout on the host): at decode (SHRINK_SPLIT > 0, _decode_shrink_program) units of 16 ranks x a round
    group, SHRINK_SPLIT programs each, arriving at a counter of the unit's own; at prefill (SHRINK_BLOCK_T > 0,
    _prefill_shrink_program) one program a unit of SHRINK_BLOCK_T rows x 16 ranks; none without. The weight's
    counters: its arrivals, then ready (the units count in there) and done (the tiles, which reset both)."""
    programs = 0
    units = 0
    arrivals = 0
    if SHRINK_SPLIT > 0:
        units = WIDTH // BLOCK_R * SHRINK_ROUNDS
        programs = units * SHRINK_SPLIT
        arrivals = units
    elif SHRINK_BLOCK_T > 0:
        units = tl.cdiv(M, SHRINK_BLOCK_T) * (WIDTH // BLOCK_R)
        programs = units
    return programs, units, arrivals


def shrink_layout(M: int, width: int, split: int, rounds: int, block_t: int) -> tuple[int, int]:
    """(programs, counters) of shrink_share for one weight (width 0: none): what the launch adds to its grid and
    to split_state's counters."""
    if not width or not (split or block_t):
        return 0, 0
    if split:
        units = width // BLOCK_R * rounds
        return units * split, units + 2
    return cdiv(M, block_t) * (width // BLOCK_R), 2


@triton.jit
def _multi_matmul_kernel(
    x_ptr, w_ptr, xa_ptr, b_ptr, idx_ptr, order_ptr, ranks_ptr, dropouts_ptr, seed_ptr, bias_ptr, y_ptr,
    a_ptr, scales_ptr, count_ptr,
    M, N, K, WIDTH, T_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_xam, stride_xar, stride_bs, stride_bn, stride_br,
    stride_ym, stride_yn, stride_as, stride_ar, stride_ak,
    HAS_ORDER: tl.constexpr, OUT_DROPOUT: tl.constexpr, HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr,
    ACCUMULATE: tl.constexpr, WAIT_PRIOR: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SHRINK_BLOCK_T: tl.constexpr = 0, X_DROPOUT: tl.constexpr = False,
):
    """The prefill matmul's tiles in grouped order. SHRINK_BLOCK_T > 0 (the forward in one launch,
    SHRINK_PROGRAMS): the launch's first cdiv(M, SHRINK_BLOCK_T) x WIDTH / 16 programs shrink (each a row block's
    16 ranks over all of K, written into xa once: no memset, no atomics) and count in; the tiles wait for all of
    them after their K loop, before the expand (as the decode kernel's matmul programs do)."""
    pid = tl.program_id(0)
    if SHRINK_BLOCK_T > 0:
        # named, not `_`: the K loops' `_` would carry a variable of another type
        shrinks, units, arrivals = shrink_share(M, WIDTH, 0, 1, SHRINK_BLOCK_T, BLOCK_R)
        if pid < shrinks:
            _prefill_shrink_program(pid, x_ptr, a_ptr, xa_ptr, idx_ptr, order_ptr, ranks_ptr, scales_ptr,
                                    dropouts_ptr, seed_ptr, count_ptr, M, K, WIDTH, stride_xm, stride_xk, stride_xam,
                                    stride_xar, stride_as, stride_ar, stride_ak, HAS_ORDER, X_DROPOUT, FP32_DOT,
                                    BLOCK_R, SHRINK_BLOCK_T)
        else:
            pid_m, pid_n = grouped_tile(pid - shrinks, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            multi_matmul_tile(pid_m, pid_n, x_ptr, w_ptr, xa_ptr, b_ptr, idx_ptr, order_ptr, ranks_ptr, dropouts_ptr,
                              seed_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk,
                              stride_xam, stride_xar, stride_bs, stride_bn, stride_br, stride_ym, stride_yn, HAS_ORDER,
                              OUT_DROPOUT, HAS_BIAS, FP32_DOT, BLOCK_R, BLOCK_M, BLOCK_N, BLOCK_K, ACCUMULATE,
                              WAIT_PRIOR, False, True, count_ptr, shrinks, tl.num_programs(0) - shrinks)
    else:
        pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        multi_matmul_tile(pid_m, pid_n, x_ptr, w_ptr, xa_ptr, b_ptr, idx_ptr, order_ptr, ranks_ptr, dropouts_ptr,
                          seed_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, stride_xam,
                          stride_xar, stride_bs, stride_bn, stride_br, stride_ym, stride_yn, HAS_ORDER, OUT_DROPOUT,
                          HAS_BIAS, FP32_DOT, BLOCK_R, BLOCK_M, BLOCK_N, BLOCK_K, ACCUMULATE, WAIT_PRIOR)


@triton.jit
def _prefill_shrink_program(q, x_ptr, a_ptr, xa_ptr, idx_ptr, order_ptr, ranks_ptr, scales_ptr, dropouts_ptr,
                            seed_ptr, count_ptr, M, K, WIDTH, stride_xm, stride_xk, stride_xam, stride_xar,
                            stride_as, stride_ar, stride_ak, HAS_ORDER: tl.constexpr, X_DROPOUT: tl.constexpr,
                            FP32_DOT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr):
    """Shrink program q of a prefill launch (_multi_matmul_kernel's SHRINK_BLOCK_T): xa of row block
    q // (WIDTH / 16), ranks (q % (WIDTH / 16)) * 16.., over all of K (runs_shrink), then counted in at
    count_ptr[0]."""
    num_rb = WIDTH // BLOCK_R
    pid_t = q // num_rb
    rb = q % num_rb
    offs_t, mask_t = _block_tokens(order_ptr, pid_t, M, HAS_ORDER, BLOCK_T)
    slot = tl.load(idx_ptr + offs_t, mask=mask_t, other=-1)                                  # (BLOCK_T,)
    run, runs = slot_runs(idx_ptr, order_ptr, pid_t, M, slot, HAS_ORDER, BLOCK_T)
    acc = runs_shrink(tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32), x_ptr, a_ptr, ranks_ptr, dropouts_ptr,
                      seed_ptr, slot, run, runs, offs_t, rb * BLOCK_R, 0, 0, K, stride_xm, stride_xk, stride_as,
                      stride_ar, stride_ak, X_DROPOUT, FP32_DOT, 1, 1, BLOCK_T, BLOCK_R, SHRINK_BLOCK_K)
    acc *= row_scale(slot, scales_ptr, dropouts_ptr, X_DROPOUT)
    offs_r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    tl.store(xa_ptr + offs_t[:, None] * stride_xam + offs_r[None, :] * stride_xar, acc, mask=mask_t[:, None])
    count_in(count_ptr)


_multi_matmul_prefill = TunedLauncher(triton.autotune(                        # ACCUMULATE shares the tiles
    prefill_matmul_configs(), key=["T_BUCKET", "N", "K", "HAS_ORDER", "OUT_DROPOUT", "HAS_BIAS", "SHRINK_BLOCK_T",
                                   "X_DROPOUT"],
    do_bench=tune_bench)(_multi_matmul_kernel))


@triton.jit
def _multi_matmul_tma_kernel(
    xs_desc, w_desc, xa_ptr, b_ptr, idx_ptr, order_ptr, ranks_ptr, dropouts_ptr, seed_ptr, bias_ptr, y_ptr,
    M, N, K, T_BUCKET,
    stride_xam, stride_xar, stride_bs, stride_bn, stride_br, stride_ym, stride_yn,
    W_KMAJOR: tl.constexpr, OUT_DROPOUT: tl.constexpr, HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr,
    ACCUMULATE: tl.constexpr, WAIT_PRIOR: tl.constexpr, BLOCK_R: tl.constexpr, NUM_SMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """The prefill matmul on Hopper: NUM_SMS persistent programs walk the tiles in grouped order; a tile's rows
    are positions of the slot-sorted order (few runs of one slot), its x rows come by TMA from xs, the shrink's
    sorted copy of x (TMA copies rows in place and cannot gather the sorted rows from x), and its output rows
    are stored back to their tokens. The expand opens each tile's MMA chain as the one-adapter TMA kernel's
    LoRA steps do (measured there: 716 TFLOP/s, cuBLAS 706); in backward dx the dropout mask then applies to
    the LoRA term alone. w_desc is W (N, K) with W_KMAJOR, else W^T (K, N)."""
    if WAIT_PRIOR:  # launched as the dependent of the shrink that writes xs and xa
        gdc_wait()
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in range(tl.program_id(0), num_tiles, NUM_SMS):
        pid_m, pid_n = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m, mask_m = _block_tokens(order_ptr, pid_m, M, True, BLOCK_M)                    # token rows
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        slot = tl.load(idx_ptr + offs_m, mask=mask_m, other=-1)                                  # (BLOCK_M,)
        run, runs = slot_runs(idx_ptr, order_ptr, pid_m, M, slot, True, BLOCK_M)
        acc = runs_expand(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), slot, run, runs, 0, 1, offs_m, offs_n,
                          mask_n, xa_ptr, b_ptr, ranks_ptr, stride_xam, stride_xar, stride_bs, stride_bn, stride_br,
                          FP32_DOT, BLOCK_R, BLOCK_M, BLOCK_N)
        if OUT_DROPOUT:
            acc = _slot_dropout(acc, slot, offs_m, offs_n, N, dropouts_ptr, seed_ptr)
        acc = tma_k_loop(acc, xs_desc, w_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, K, W_KMAJOR, FP32_DOT, BLOCK_K)
        store_tile(acc, bias_ptr, y_ptr, offs_m, mask_m, offs_n, mask_n, stride_ym, stride_yn, HAS_BIAS, ACCUMULATE)


def _multi_tma_block_shapes(nargs: dict) -> None:
    """Autotune pre_hook: the descriptors' block shapes under a config (host-side descriptors carry them)."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["xs_desc"].block_shape = [bm, bk]
    nargs["w_desc"].block_shape = [bn, bk] if nargs["W_KMAJOR"] else [bk, bn]


_multi_matmul_tma = TunedLauncher(triton.autotune(
    tma_matmul_configs(_multi_tma_block_shapes), key=["T_BUCKET", "N", "K", "W_KMAJOR", "OUT_DROPOUT", "HAS_BIAS"],
    do_bench=tune_bench)(_multi_matmul_tma_kernel))


def tma_sorted_rows(x: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor | None:
    """A (T, K) buffer for x's rows in slot-sorted order where lora_multi_matmul(x, weight, ...) runs on the TMA
    tile for every one of `weights` (Hopper, fp16 / bf16, more than TMA_MIN_T tokens, weights TMA can copy in
    either layout), else None: the shrink fills it (lora_multi_shrink's x_sorted; x any strides) and the matmul
    reads it (its x_sorted)."""
    T, K = x.shape
    if T <= DECODE_MAX_T or not _tma_programs(x, T, TMA_MIN_T) or K * x.element_size() % 16:
        return None
    if any(_tma_layout(w, True) is None for w in weights):
        return None
    return torch.empty((T, K), device=x.device, dtype=x.dtype)


def _multi_matmul_tma_launch(x_sorted, weight, xa, lora_B, adapter_index, ranks, bias, order, dropouts, seed, y,
                             accumulate: bool, wait_prior: bool) -> bool:
    """_multi_matmul_tma_kernel into y (accumulate: added to its values); wait_prior as _multi_matmul_launch's.
    False (nothing launched) where the TMA path does not run: the weight's layout, or switched off as
    kernels.lora's is (tma_error, tma_guarded_launch); the caller runs the pointer tile then."""
    if lora_kernels.tma_error is not None and not lora_kernels.TMA_PREFILL:
        return False
    M, K = x_sorted.shape
    N = weight.shape[0]
    layout = _tma_layout(weight, True)
    num_sms = _tma_programs(x_sorted, M, -1)
    if layout is None or not num_sms:
        return False
    w_shape, w_strides, w_t = layout
    bucket = t_bucket(M)
    key = (bucket, N, K, not w_t, dropouts is None, bias is None, x_sorted.dtype, weight.dtype, lora_B.dtype)
    known = _multi_matmul_tma.chosen(key)
    if accumulate and known is None:  # tuning runs every candidate: into a temporary, added once
        return _accumulated(y, lambda out: _multi_matmul_tma_launch(x_sorted, weight, xa, lora_B, adapter_index,
                                                                    ranks, bias, order, dropouts, seed, out, False,
                                                                    False))
    # A known config's block shapes go into the descriptors here (its launch skips the pre_hook, which sets
    # them per config while tuning).
    bm, bn, bk = (known["BLOCK_M"], known["BLOCK_N"], known["BLOCK_K"]) if known else (16, 16, 16)
    xs_d = _descriptor(x_sorted, [M, K], [K, 1], [bm, bk])
    w_d = _descriptor(weight, w_shape, w_strides, [bk, bn] if w_t else [bn, bk])
    grid = lambda meta: (min(num_sms, cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"])),)
    sxa, sb, sy = xa.stride(), lora_B.stride(), y.stride()
    return tma_guarded_launch(
        _multi_matmul_tma, key, grid,
        xs_d, w_d, xa, lora_B, adapter_index, order, ranks, xa if dropouts is None else dropouts,
        adapter_index if seed is None else seed, bias if bias is not None else y, y,
        M, N, K, bucket,
        sxa[0], sxa[1], sb[0], sb[1], sb[2], sy[0], sy[1],
        prepared=known is not None,
        W_KMAJOR=not w_t, OUT_DROPOUT=dropouts is not None, HAS_BIAS=bias is not None,
        FP32_DOT=x_sorted.dtype == torch.float32, ACCUMULATE=accumulate, BLOCK_R=BLOCK_R, NUM_SMS=num_sms,
        **wait_flags(wait_prior, x_sorted),
    )


@triton.jit
def _multi_decode_kernel(
    x_ptr, w_ptr, xa_ptr, a_ptr, b_ptr, idx_ptr, order_ptr, ranks_ptr, scales_ptr, dropouts_ptr, seed_ptr, bias_ptr,
    y_ptr, part_ptr, count_ptr,
    M, N, K, WIDTH, T_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_xam, stride_xar, stride_as, stride_ar, stride_ak,
    stride_bs, stride_bn, stride_br, stride_ym, stride_yn,
    HAS_ORDER: tl.constexpr, FUSE_SHRINK: tl.constexpr, X_DROPOUT: tl.constexpr, OUT_DROPOUT: tl.constexpr,
    HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr, WAIT_PRIOR: tl.constexpr, IN_LOOP: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, SHRINK_SPLIT: tl.constexpr = 0, SHRINK_ROUNDS: tl.constexpr = 1,
):
    """The matmul at decode (M <= BLOCK_M rows), as kernels.lora's decode kernel: one row block, so W streams
    from HBM once, K split SPLIT_K ways with the last split of a column block summing the partials; the
    splits share the expand's rounds out (split p takes rounds p, p + SPLIT_K, ...).

    FUSE_SHRINK (the forward at a few tokens, decode_fuses_shrink): no shrink launch before this one. The LoRA
    term is linear in xa, so each split expands its own partial shrink over its K columns, x_k A_a,k^T (scaled,
    with X_DROPOUT's mask); column block 0 also leaves those partials for the last of its splits to sum into
    xa (M, WIDTH), which backward needs. Each program reads the rows' A over its K share from L2: at most
    decode_fuses_shrink's rank budget over BLOCK_N of W's bytes. WAIT_PRIOR: as multi_matmul_tile's. IN_LOOP: the
    forward's expand (given xa) inside the K loop, split p taking pairs p, p + SPLIT_K, ... (expanded_k_loop).

    SHRINK_SPLIT > 0 (the forward at up to DECODE_MAX_T tokens, any rank): no shrink launch either; the launch's
    first WIDTH / 16 x SHRINK_SPLIT x SHRINK_ROUNDS programs are the shrink's (_decode_shrink_program) and write
    xa, and the matmul programs after them wait for it only before they expand, once W has streamed. Programs
    start in launch order (as CUTLASS's serial split-K relies on), so the shrink programs, which wait for
    nothing, hold their SMs before any matmul program waits."""
    pid = tl.program_id(0)
    # named, not `_`: the K loops' `_` would carry a variable of another type
    shrinks, units, arrivals = shrink_share(M, WIDTH, SHRINK_SPLIT, SHRINK_ROUNDS, 0, BLOCK_R)
    if pid < shrinks:
        _decode_shrink_program(pid, x_ptr, a_ptr, xa_ptr, idx_ptr, order_ptr, ranks_ptr, scales_ptr, dropouts_ptr,
                               seed_ptr, part_ptr + SPLIT_K * M * (N + WIDTH), count_ptr + tl.cdiv(N, 16), M, K,
                               WIDTH, stride_xm, stride_xk, stride_xam, stride_xar, stride_as, stride_ar, stride_ak,
                               HAS_ORDER, X_DROPOUT, FP32_DOT, SHRINK_SPLIT, SHRINK_ROUNDS, BLOCK_R, BLOCK_M)
    else:  # a matmul program
        pid_n, pid_k, k_lo, k_hi = split_k_program(pid - shrinks, K, BLOCK_K, SPLIT_K)
        offs_m, mask_m = _block_tokens(order_ptr, 0, M, HAS_ORDER, BLOCK_M)                  # token rows
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N

        slot = tl.load(idx_ptr + offs_m, mask=mask_m, other=-1)                                  # (BLOCK_M,)
        run, runs = slot_runs(idx_ptr, order_ptr, 0, M, slot, HAS_ORDER, BLOCK_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if OUT_DROPOUT:  # backward dx: masked while the LoRA term is all acc holds, as the tile does
            if WAIT_PRIOR:
                gdc_wait()
            acc = runs_expand(acc, slot, run, runs, pid_k, SPLIT_K, offs_m, offs_n, mask_n, xa_ptr, b_ptr, ranks_ptr,
                              stride_xam, stride_xar, stride_bs, stride_bn, stride_br, FP32_DOT, BLOCK_R, BLOCK_M,
                              BLOCK_N)
            acc = _slot_dropout(acc, slot, offs_m, offs_n, N, dropouts_ptr, seed_ptr)
        in_loop: tl.constexpr = IN_LOOP and not FUSE_SHRINK and not OUT_DROPOUT
        shrink_programs: tl.constexpr = SHRINK_SPLIT > 0
        counters = count_ptr + tl.cdiv(N, 16)       # after the column blocks': the shrink units', ready, done
        if in_loop:
            acc = expanded_k_loop(acc, x_ptr, w_ptr, offs_m, mask_m, offs_n, mask_n, k_lo, k_hi, K, slot, run, runs,
                                  pid_k, SPLIT_K, xa_ptr, b_ptr, ranks_ptr, counters + units, units, stride_xm,
                                  stride_xk, stride_wn, stride_wk, stride_xam, stride_xar, stride_bs, stride_bn,
                                  stride_br, WAIT_PRIOR, shrink_programs, FP32_DOT, BLOCK_R, BLOCK_M, BLOCK_N,
                                  BLOCK_K)
        else:
            for k0 in range(k_lo, k_hi, BLOCK_K):
                x, w, _, _ = base_k_step(x_ptr, w_ptr, offs_m, mask_m, offs_n, mask_n, k0, K, stride_xm, stride_xk,
                                         stride_wn, stride_wk, BLOCK_K)
                acc = _dot(x, w, acc, FP32_DOT)
        xa_part = part_ptr + SPLIT_K * M * N + offs_m[:, None] * WIDTH                 # (SPLIT_K, M, WIDTH) partials
        if FUSE_SHRINK:
            acc = _expand_own_shrink(acc, x_ptr, a_ptr, b_ptr, ranks_ptr, scales_ptr, dropouts_ptr, seed_ptr, xa_ptr,
                                     xa_part + pid_k * M * WIDTH, slot, run, runs, offs_m, mask_m, offs_n, mask_n,
                                     pid_n, pid_k, K, WIDTH, stride_xm, stride_xk, stride_xam, stride_xar, stride_as,
                                     stride_ar, stride_ak, stride_bs, stride_bn, stride_br, X_DROPOUT, FP32_DOT,
                                     SPLIT_K, BLOCK_R, BLOCK_M, BLOCK_N, BLOCK_K)
        elif not OUT_DROPOUT and not in_loop:
            if WAIT_PRIOR:
                gdc_wait()
            if shrink_programs:
                wait_count(counters + units, units)
            acc = runs_expand(acc, slot, run, runs, pid_k, SPLIT_K, offs_m, offs_n, mask_n, xa_ptr, b_ptr, ranks_ptr,
                              stride_xam, stride_xar, stride_bs, stride_bn, stride_br, FP32_DOT, BLOCK_R, BLOCK_M,
                              BLOCK_N)
        if shrink_programs:  # the last matmul program past its expand resets ready and done for the next launch
            if arrive_last(counters, units + 1, tl.num_programs(0) - shrinks):
                tl.atomic_xchg(counters + units, 0)
                tl.atomic_xchg(counters + units + 1, 0)
        if SPLIT_K == 1:
            store_tile(acc, bias_ptr, y_ptr, offs_m, mask_m, offs_n, mask_n, stride_ym, stride_yn, HAS_BIAS)
        elif split_k_arrive(acc, part_ptr, count_ptr, pid_n, pid_k, offs_m, mask_m, offs_n, mask_n, M, N, SPLIT_K):
            acc = split_k_total(part_ptr, count_ptr, pid_n, offs_m, mask_m, offs_n, mask_n, M, N, SPLIT_K, BLOCK_M,
                                BLOCK_N)
            store_tile(acc, bias_ptr, y_ptr, offs_m, mask_m, offs_n, mask_n, stride_ym, stride_yn, HAS_BIAS)
            if FUSE_SHRINK:
                if pid_n == 0:  # xa: the sum of column block 0's partial shrinks, in split order
                    for r0 in range(0, WIDTH, BLOCK_R):
                        offs_r = r0 + tl.arange(0, BLOCK_R)
                        xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                        for s in tl.static_range(SPLIT_K):
                            xa += tl.load(xa_part + s * M * WIDTH + offs_r[None, :], mask=mask_m[:, None], other=0.0,
                                          cache_modifier=".cg")
                        tl.store(xa_ptr + offs_m[:, None] * stride_xam + offs_r[None, :] * stride_xar, xa,
                                 mask=mask_m[:, None])


@triton.jit
def _decode_shrink_program(q, x_ptr, a_ptr, xa_ptr, idx_ptr, order_ptr, ranks_ptr, scales_ptr, dropouts_ptr,
                           seed_ptr, ws_ptr, counters, M, K, WIDTH, stride_xm, stride_xk, stride_xam, stride_xar,
                           stride_as, stride_ar, stride_ak, HAS_ORDER: tl.constexpr, X_DROPOUT: tl.constexpr,
                           FP32_DOT: tl.constexpr, SHRINK_SPLIT: tl.constexpr, SHRINK_ROUNDS: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr):
    """Shrink program q of a decode launch (_multi_decode_kernel's SHRINK_SPLIT; also a member's in
    kernels.lora_grouped): ranks rb * 16.. over split ks of K for the rows of rounds g, g + SHRINK_ROUNDS, ... of
    the block's runs (runs_shrink; q = (g * SHRINK_SPLIT + ks) * WIDTH / 16 + rb), its partial stored into ws
    (SHRINK_SPLIT, M, WIDTH) fp32. The last of a unit's (rb, g) SHRINK_SPLIT programs to arrive (at
    counters[unit]) sums the unit's partials into xa in split order (no atomics on xa: no memset, and the same
    bits every run) and counts the unit ready at counters[units]; unit g = 0 also writes zeros for the rows
    without an adapter. Compiled to nothing without shrink programs (the caller's branch is not taken)."""
    if SHRINK_SPLIT > 0:
        num_rb = WIDTH // BLOCK_R
        rb = q % num_rb
        ks = q // num_rb % SHRINK_SPLIT
        g = q // (num_rb * SHRINK_SPLIT)
        offs_m, mask_m = _block_tokens(order_ptr, 0, M, HAS_ORDER, BLOCK_M)                  # token rows
        slot = tl.load(idx_ptr + offs_m, mask=mask_m, other=-1)                                  # (BLOCK_M,)
        run, runs = slot_runs(idx_ptr, order_ptr, 0, M, slot, HAS_ORDER, BLOCK_M)
        acc = runs_shrink(tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), x_ptr, a_ptr, ranks_ptr, dropouts_ptr,
                          seed_ptr, slot, run, runs, offs_m, rb * BLOCK_R, ks, g, K, stride_xm, stride_xk, stride_as,
                          stride_ar, stride_ak, X_DROPOUT, FP32_DOT, SHRINK_SPLIT, SHRINK_ROUNDS, BLOCK_M, BLOCK_R,
                          SHRINK_BLOCK_K)
        acc *= row_scale(slot, scales_ptr, dropouts_ptr, X_DROPOUT)
        rows = mask_m & (shrink_round_rows(slot, run, g, SHRINK_ROUNDS, 1, BLOCK_M, SHRINK_BLOCK_K)
                         | ((g == 0) & (slot < 0)))
        offs_r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
        part = ws_ptr + offs_m[:, None] * WIDTH + offs_r[None, :]                               # split 0's
        tl.store(part + ks * M * WIDTH, acc, mask=rows[:, None])
        unit = g * num_rb + rb
        if arrive_last(counters, unit, SHRINK_SPLIT):
            tl.atomic_xchg(counters + unit, 0)
            total = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for s in tl.static_range(SHRINK_SPLIT):
                total += tl.load(part + s * M * WIDTH, mask=rows[:, None], other=0.0, cache_modifier=".cg")
            tl.store(xa_ptr + offs_m[:, None] * stride_xam + offs_r[None, :] * stride_xar, total, mask=rows[:, None])
            count_in(counters + num_rb * SHRINK_ROUNDS)


@triton.jit
def _expand_own_shrink(acc, x_ptr, a_ptr, b_ptr, ranks_ptr, scales_ptr, dropouts_ptr, seed_ptr, xa_ptr, xa_mine, slot,
                       run, runs, offs_m, mask_m, offs_n, mask_n, pid_n, pid_k, K, WIDTH,
                       stride_xm, stride_xk, stride_xam, stride_xar, stride_as, stride_ar, stride_ak,
                       stride_bs, stride_bn, stride_br, X_DROPOUT: tl.constexpr, FP32_DOT: tl.constexpr,
                       SPLIT_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """acc += (s_a keep x_k A_a,k^T) B_a^T over this split's K columns (runs_shrink's share of split pid_k), 16
    ranks at a time; the rows' runs expanded one by one (a few tokens: a few runs). Column block 0 stores each 16
    ranks' partial shrink, all WIDTH of them (zero past a row's rank): into xa when unsplit, else at xa_mine (its
    rows' pointers into this split's partials)."""
    rank = per_row(ranks_ptr, slot)                                                             # (BLOCK_M,)
    scale = row_scale(slot, scales_ptr, dropouts_ptr, X_DROPOUT)                                # (BLOCK_M, 1)
    max_rank = tl.max(rank, axis=0)
    offs_i = tl.arange(0, BLOCK_R)
    for r0 in range(0, WIDTH, BLOCK_R):
        offs_r = r0 + offs_i
        xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        if r0 < max_rank:
            xa = runs_shrink(xa, x_ptr, a_ptr, ranks_ptr, dropouts_ptr, seed_ptr, slot, run, runs, offs_m, r0, pid_k,
                             0, K, stride_xm, stride_xk, stride_as, stride_ar, stride_ak, X_DROPOUT, FP32_DOT,
                             SPLIT_K, 1, BLOCK_M, BLOCK_R, BLOCK_K)
            xa *= scale
            for g in range(0, runs):
                mine = (run == g) & (slot >= 0)                                                # (BLOCK_M,)
                run_slot = tl.maximum(tl.max(tl.where(mine, slot, -1), axis=0), 0).to(tl.int64)
                run_rank = tl.max(tl.where(mine, rank, 0), axis=0)
                b = tl.load(b_ptr + run_slot * stride_bs + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
                            mask=mask_n[None, :] & (offs_r[:, None] < run_rank), other=0.0)  # (BLOCK_R, BLOCK_N)
                acc = _dot_fp32(tl.where(mine[:, None], xa, 0.0), b.to(tl.float32), acc, FP32_DOT)
        if pid_n == 0:
            if SPLIT_K == 1:
                tl.store(xa_ptr + offs_m[:, None] * stride_xam + offs_r[None, :] * stride_xar, xa,
                         mask=mask_m[:, None])
            else:
                tl.store(xa_mine + offs_r[None, :], xa, mask=mask_m[:, None])
    return acc


_multi_decode = TunedLauncher(triton.autotune(
    split_decode_configs(), key=["T_BUCKET", "N", "K", "HAS_ORDER", "FUSE_SHRINK", "X_DROPOUT", "OUT_DROPOUT",
                                 "HAS_BIAS", "IN_LOOP", "SHRINK_SPLIT", "SHRINK_ROUNDS"],
    prune_configs_by=prune_split_decode(), do_bench=tune_bench)(_multi_decode_kernel))


def lora_multi_matmul(x: torch.Tensor, weight: torch.Tensor, xa: torch.Tensor, lora_B: torch.Tensor,
                      adapter_index: torch.Tensor, ranks: torch.Tensor, bias: torch.Tensor | None = None,
                      order: torch.Tensor | None = None, dropouts: torch.Tensor | None = None,
                      seed: torch.Tensor | None = None, out: torch.Tensor | None = None,
                      accumulate: bool = False, after_shrink: bool = False,
                      x_sorted: torch.Tensor | None = None) -> torch.Tensor:
    """y[t] = x[t] @ weight^T + keep * (xa[t, :r_a] @ lora_B[a, :, :r_a]^T) + bias, a = adapter_index[t] (-1: none).

    x (M, K); weight (N, K) any strides; xa (M, >= r_max) fp32 from lora_multi_shrink; lora_B (S, N, r_max)
    any strides; adapter_index (M,) int32; ranks (S,) int32; bias (N,) or None; order as for the shrink.
    With dropouts (S,) and seed, keep is the keep mask of (seed, t * N + n) against p_a: the backward of a
    dropped-out input. `out` (M, N), if given, receives y; with `accumulate`, y is added to its values (the
    grouped backward's dx over its members: in the matmuls' epilogues at prefill, no add launch).
    after_shrink: the last launch on the stream was the shrink that wrote xa (no other since): on Hopper the
    matmul then launches as its dependent (configs.PDL) and streams W0 while the shrink ends.
    x_sorted: x[order] from the shrink where tma_sorted_rows gave a buffer: the prefill runs on the TMA tile.
    """
    M = x.shape[0]
    N = weight.shape[0]
    if accumulate and out is None:
        raise ValueError("accumulate adds into `out`: give it")
    y = torch.empty((M, N), device=x.device, dtype=x.dtype) if out is None else out
    if M == 0:
        return y
    if M <= DECODE_MAX_T:
        if accumulate:  # the decode kernel splits K into shared partials: its sum goes through a temporary
            _accumulated(y, lambda o: _multi_decode_launch(x, weight, xa, lora_B, adapter_index, ranks, bias, order,
                                                           dropouts, seed, o))
        else:
            _multi_decode_launch(x, weight, xa, lora_B, adapter_index, ranks, bias, order, dropouts, seed, y,
                                 wait_prior=after_shrink)
        return y
    if x_sorted is not None and order is None:
        raise ValueError("x_sorted holds x's rows in `order`: give it")
    if x_sorted is None or not _multi_matmul_tma_launch(x_sorted, weight, xa, lora_B, adapter_index, ranks, bias,
                                                        order, dropouts, seed, y, accumulate, after_shrink):
        _multi_matmul_launch(x, weight, xa, lora_B, adapter_index, ranks, bias, order, dropouts, seed, y, accumulate,
                             after_shrink)
    return y


def _multi_matmul_launch(x, weight, xa, lora_B, adapter_index, ranks, bias, order, dropouts, seed, y,
                         accumulate: bool, wait_prior: bool = False, lora_A=None, scales=None) -> None:
    """The fused matmul at prefill, on the pointer tile (accumulate: added to y's values).
    wait_prior: launched as the dependent of the shrink just launched (lora_multi_matmul's after_shrink).
    With lora_A and scales, the launch's own shrink programs write xa first (dropouts: the forward's input
    mask)."""
    M, N = y.shape
    K = x.shape[1]
    shrinks = lora_A is not None
    key = (t_bucket(M), N, K, order is None, dropouts is None, bias is None, x.dtype, weight.dtype, lora_B.dtype)
    key += ("shrink",) if shrinks else ()
    # tuning runs every candidate: into a temporary, added once
    if accumulate and _multi_matmul_prefill.chosen(key) is None:
        _accumulated(y, lambda out: _multi_matmul_launch(x, weight, xa, lora_B, adapter_index, ranks, bias, order,
                                                         dropouts, seed, out, False))
        return
    width = xa.shape[1]
    shrink_programs, shrink_counters = shrink_layout(M, width, 0, 1, PREFILL_SHRINK_BLOCK_T if shrinks else 0)
    grid = lambda meta: (shrink_programs + cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)
    bucket = key[0]
    counters = split_state(x.device, shrink_counters, 0)[0] if shrinks else adapter_index
    a = lora_A if shrinks else lora_B                           # read only by the shrink programs
    # one stride() tuple per tensor: each stride(i) call is a separate trip into torch
    sx, sw, sxa, sb, sy, sa = x.stride(), weight.stride(), xa.stride(), lora_B.stride(), y.stride(), a.stride()
    _multi_matmul_prefill.launch(
        key,
        grid,
        x, weight, xa, lora_B, adapter_index, adapter_index if order is None else order, ranks,
        xa if dropouts is None else dropouts, adapter_index if seed is None else seed,
        bias if bias is not None else y, y, a, xa if scales is None else scales, counters,
        M, N, K, width, bucket,
        sx[0], sx[1], sw[0], sw[1], sxa[0], sxa[1], sb[0], sb[1], sb[2], sy[0], sy[1], sa[0], sa[1], sa[2],
        HAS_ORDER=order is not None, OUT_DROPOUT=not shrinks and dropouts is not None, HAS_BIAS=bias is not None,
        FP32_DOT=x.dtype == torch.float32, ACCUMULATE=accumulate, BLOCK_R=BLOCK_R,
        SHRINK_BLOCK_T=PREFILL_SHRINK_BLOCK_T if shrinks else 0, X_DROPOUT=shrinks and dropouts is not None,
        **wait_flags(wait_prior and not shrinks, x),
    )


def _multi_decode_launch(x, weight, xa, lora_B, adapter_index, ranks, bias, order, dropouts, seed, y, lora_A=None,
                         scales=None, wait_prior: bool = False) -> None:
    """_multi_decode_kernel into y: the expand of a given xa (dropouts: the backward's output mask), or with
    lora_A and scales its own shrink, written into xa (dropouts: the forward's input mask): fused into each split
    where decode_fuses_shrink, else on shrink programs (decode_shrink_grid). wait_prior: as
    _multi_matmul_launch's."""
    M, K = x.shape
    N = weight.shape[0]
    width = xa.shape[1]
    bucket = t_bucket(M)
    shrinks = lora_A is not None
    fuse = shrinks and decode_fuses_shrink(M, lora_A.shape[1])
    in_loop = expand_in_loop(M) and (shrinks and not fuse or not shrinks and dropouts is None)
    block_m = max(16, next_pow2(M))
    split_shrink, rounds = 0, 1
    if shrinks and not fuse:  # runs: at most one a slot in slot-sorted order, else up to one a row
        split_shrink, rounds = decode_shrink_grid(M, K, M if order is None else min(M, lora_A.shape[0]), block_m)
    key = (bucket, N, K, order is None, fuse, dropouts is None, bias is None, x.dtype, weight.dtype,
           lora_B.dtype) + (("in_loop",) if in_loop else ())     # the tuned choices' keys stay as they were
    key += ("shrink", split_shrink) if split_shrink else ()    # the round groups follow the pool: not tuned apart
    shrink_programs, shrink_counters = shrink_layout(M, width, split_shrink, rounds, 0)
    part, counters = split_buffers(_multi_decode, key, x.device, M * (N + width), N, y,
                                   extra_counters=shrink_counters, extra_workspace=split_shrink * M * width)
    a = lora_A if shrinks else lora_B            # the kernel without a shrink reads no A, nor scales
    sx, sw, sxa, sa, sb, sy = x.stride(), weight.stride(), xa.stride(), a.stride(), lora_B.stride(), y.stride()
    _multi_decode.launch(key, lambda meta: (shrink_programs + cdiv(N, meta["BLOCK_N"]) * meta["SPLIT_K"],),
        x, weight, xa, a, lora_B, adapter_index, adapter_index if order is None else order, ranks,
        ranks if scales is None else scales, xa if dropouts is None else dropouts,
        adapter_index if seed is None else seed, bias if bias is not None else y, y, part, counters,
        M, N, K, width, bucket,
        sx[0], sx[1], sw[0], sw[1], sxa[0], sxa[1], sa[0], sa[1], sa[2], sb[0], sb[1], sb[2], sy[0], sy[1],
        HAS_ORDER=order is not None, FUSE_SHRINK=fuse, X_DROPOUT=shrinks and dropouts is not None,
        OUT_DROPOUT=not shrinks and dropouts is not None, HAS_BIAS=bias is not None,
        FP32_DOT=x.dtype == torch.float32, IN_LOOP=in_loop, BLOCK_R=BLOCK_R, BLOCK_M=block_m,
        SHRINK_SPLIT=split_shrink, SHRINK_ROUNDS=rounds, **wait_flags(wait_prior and not shrinks, x),
    )


# Ranks a fused decode may read from A per program: tokens x r_max (each token may bring its own adapter). With
# BLOCK_N columns a program, the fused shrink reads up to FUSED_SHRINK_RANKS / BLOCK_N of W's bytes in A from L2
# (kernels.lora fuses up to rank 64 for one adapter, MAX_FUSED_RANK).
FUSED_SHRINK_RANKS = 64
# The forward in one launch at every T the pointer tiles serve too (beyond decode_fuses_shrink's few tokens): its
# shrink on programs of its own that come first in the launch (_decode_shrink_program, _prefill_shrink_program)
# instead of a shrink launch, its memset and the gap before the matmul; the matmul programs wait for xa only
# before they expand. Off until the card has timed it (bench.lora_multi's ptlm_one_launch provider turns it on);
# PTLM_MULTI_SHRINK_PROGRAMS=1 / 0.
SHRINK_PROGRAMS = os.environ.get("PTLM_MULTI_SHRINK_PROGRAMS", "0") == "1"
# Rows of a prefill shrink program (all of K, 16 ranks): at T = 1024 and rank 16, 16 programs.
PREFILL_SHRINK_BLOCK_T = 64
# A shrink program's rounds of runs at most (K in kernels.lora's SHRINK_K_STEPS shares): at T = 64 with 32
# adapters (16 rounds of 2 runs, K = 4096) 64 programs of 2 rounds x 4 steps, ~4 us of dependent loads each
# while the matmul programs stream W.
SHRINK_MAX_ROUNDS = 8


def decode_fuses_shrink(T: int, r_max: int) -> bool:
    """Whether lora_multi_linear serves T tokens of slots up to rank r_max by expanding each split's own partial
    shrink: a few tokens of low rank (T = 1..4 at rank 16, T = 1 at 64)."""
    return 0 < T and T * padded_rank(r_max) <= FUSED_SHRINK_RANKS


def one_launch(T: int, r_max: int) -> bool:
    """Whether the forward over T tokens takes lora_multi_linear (one launch) rather than a shrink launch and
    lora_multi_matmul: the few tokens decode_fuses_shrink takes, and with SHRINK_PROGRAMS (read per call) any T
    (the caller keeps the two launches where the TMA tile runs: tma_sorted_rows)."""
    return decode_fuses_shrink(T, r_max) or bool(SHRINK_PROGRAMS) and T > 0


def decode_shrink_grid(M: int, K: int, runs: int, block_m: int) -> tuple[int, int]:
    """(K splits, round groups) of a decode launch's shrink programs (per 16 ranks): SHRINK_K_STEPS K steps a
    round, and the rounds of the most runs the rows can form shared out over at most SHRINK_MAX_ROUNDS groups
    (fewer groups than rounds is only slower). Read from the module per call (tests shrink them)."""
    rounds = cdiv(runs, shrink_runs(1, block_m, SHRINK_BLOCK_K.value))
    return (decode_shrink_split(K, SHRINK_BLOCK_K.value, SHRINK_K_STEPS),
            max(1, min(SHRINK_MAX_ROUNDS, rounds)))


def lora_multi_linear(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                      adapter_index: torch.Tensor, ranks: torch.Tensor, scales: torch.Tensor,
                      bias: torch.Tensor | None = None, order: torch.Tensor | None = None,
                      dropouts: torch.Tensor | None = None,
                      seed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, xa): lora_multi_matmul(x, weight, lora_multi_shrink(x, lora_A, ...), lora_B, ...) in one launch, on
    the decode kernel or the prefill pointer tiles: a launch and its gap saved (at T = 1 the two launches cost
    1.41x cuBLAS against the one-adapter kernel's 1.09x, H100 2026-11-26). Arguments as those two take them."""
    M, K = x.shape
    y = torch.empty((M, weight.shape[0]), device=x.device, dtype=x.dtype)
    xa = torch.empty((M, padded_rank(lora_A.shape[1])), device=x.device, dtype=torch.float32)
    if M <= DECODE_MAX_T:
        _multi_decode_launch(x, weight, xa, lora_B, adapter_index, ranks, bias, order, dropouts, seed, y, lora_A,
                             scales)
    elif M > 0:
        _multi_matmul_launch(x, weight, xa, lora_B, adapter_index, ranks, bias, order, dropouts, seed, y, False,
                             lora_A=lora_A, scales=scales)
    return y, xa


# ----------------------------------------------------------------------------------------------- weight grad
@triton.jit
def _multi_weight_grad_kernel(
    g_ptr, h_ptr, order_ptr, seg_ptr, ranks_ptr, dropouts_ptr, seed_ptr, out_ptr,
    N, T_BUCKET,
    stride_gt, stride_gn, stride_ht, stride_hr, stride_os, stride_on, stride_or,
    MASK_G: tl.constexpr, FP32_DOT: tl.constexpr, SPLIT_T: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    s = tl.program_id(0)
    pid_nr = tl.program_id(1)
    pid_t = tl.program_id(2)
    num_r = tl.num_programs(1) // tl.cdiv(N, BLOCK_N)
    pid_n = pid_nr // num_r
    pid_r = pid_nr % num_r
    rank = tl.load(ranks_ptr + s)
    if pid_r * BLOCK_R < rank:
        start = tl.load(seg_ptr + s)
        end = tl.load(seg_ptr + s + 1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        for t0 in range(start + pid_t * BLOCK_T, end, SPLIT_T * BLOCK_T):
            pos = t0 + tl.arange(0, BLOCK_T)
            rows = tl.load(order_ptr + pos, mask=pos < end, other=0)                      # this slot's tokens
            live = pos < end
            g = tl.load(g_ptr + rows.to(tl.int64)[None, :] * stride_gt + offs_n[:, None] * stride_gn,
                        mask=live[None, :] & (offs_n[:, None] < N), other=0.0)             # (BLOCK_N, BLOCK_T)
            if MASK_G:  # dA: the forward's dropout mask over x (index t * N + n, N = d_in)
                keep = _keep_mask(seed_ptr, rows[None, :] * N + offs_n[:, None], tl.load(dropouts_ptr + s))
                g = tl.where(keep, g, 0.0)
            h = tl.load(h_ptr + rows.to(tl.int64)[:, None] * stride_ht + offs_r[None, :] * stride_hr,
                        mask=live[:, None], other=0.0)                                     # (BLOCK_T, BLOCK_R)
            acc = _dot_fp32(g.to(tl.float32), h, acc, FP32_DOT)
        store_split(out_ptr + s * stride_os, offs_n, offs_r, stride_on, stride_or, acc,
                    (offs_n[:, None] < N) & (offs_r[None, :] < rank), SPLIT_T)


_multi_weight_grad = TunedLauncher(triton.autotune(
    weight_grad_configs(), key=["T_BUCKET", "N", "MASK_G"], reset_to_zero=["out_ptr"],
    do_bench=tune_bench)(_multi_weight_grad_kernel))


def token_segments(adapter_index: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens grouped by slot, on the device with no host sync: (order (T,), bounds (S + 1,)) such that
    order[bounds[a]:bounds[a + 1]] are slot a's tokens; tokens with no adapter (-1) sort before all."""
    order = torch.argsort(adapter_index, stable=True).to(torch.int32)
    counts = torch.zeros(num_slots + 1, device=adapter_index.device, dtype=torch.int32)
    counts.scatter_add_(0, (adapter_index + 1).long(), torch.ones_like(adapter_index, dtype=torch.int32))
    return order, torch.cumsum(counts, 0, dtype=torch.int32)


def lora_multi_weight_grad(g: torch.Tensor, h: torch.Tensor, order: torch.Tensor, bounds: torch.Tensor,
                           ranks: torch.Tensor, r_max: int, dropouts: torch.Tensor | None = None,
                           seed: torch.Tensor | None = None, rank_major: bool = False) -> torch.Tensor:
    """out[a] = sum over slot a's tokens t of (keep * g)[t, :]^T h[t, :r_max], fp32, zero beyond rank a.

    g (T, N); h (T, >= r_max) fp32; order, bounds from token_segments; ranks (S,) int32 -> (S, N, r_max), or
    with rank_major its transpose (S, r_max, N) stored rank-major (lora_A's layout: dA needs no transposed copy).
    With dropouts (S,) and seed, keep is the forward's keep mask of (seed, t * N + n) against p_a.
    """
    T, N = g.shape
    S = ranks.shape[0]
    width = padded_rank(r_max)
    # zeroed: split-T programs add into it, and columns beyond each slot's rank are never stored
    out = torch.zeros((S, width, N) if rank_major else (S, N, width), device=g.device, dtype=torch.float32)
    if T > 0 and S > 0:
        num_r = width // BLOCK_R
        grid = lambda meta: (S, cdiv(N, meta["BLOCK_N"]) * num_r, meta["SPLIT_T"])
        bucket = t_bucket(T)
        sg, sh = g.stride(), h.stride()
        stride_on, stride_or = (1, N) if rank_major else (width, 1)
        _multi_weight_grad.launch(
            (bucket, N, dropouts is None, g.dtype), grid,
            g, h, order, bounds, ranks, h if dropouts is None else dropouts, order if seed is None else seed, out,
            N, bucket,
            sg[0], sg[1], sh[0], sh[1], N * width, stride_on, stride_or,
            MASK_G=dropouts is not None, FP32_DOT=g.dtype == torch.float32, BLOCK_R=BLOCK_R,
        )
    if r_max == width:
        return out
    return out[:, :r_max] if rank_major else out[:, :, :r_max]
