"""Attention over [prefix ; sequence] (prefix tuning) in one flash pass, forward and backward.

Every query of row b sees the first prefix_lengths[b] of P prefix keys (no causal mask) and the sequence keys
its causal limit and the key padding mask allow; the prefix is never concatenated into k / v: each program
walks the prefix blocks, then the sequence blocks up to its causal limit, with one online softmax in fp32
(exp2, log2 e folded into the scale). Blocks wholly above the diagonal are skipped; per-element masks apply
only on diagonal and ragged blocks (and, with a key padding mask, on every sequence block).

On Hopper (compute capability 9, fp16 / bf16, 16-byte aligned layouts) q, the sequence's k / v and dO are read
through (B, H, L, D) TMA descriptors, each head clipped at its own length by the copy engine, and the fused
backward adds its dQ tiles with bulk reductions (cp.reduce.async.bulk): fewer registers than the pointer tiles'
addresses take (forward 235 -> 165 at 128 x 64, 8 warps), one reduction per tile instead of a vector atomic per
4 elements. The prefix (few blocks, possibly shared through a zero batch stride) keeps pointer loads; so does
every other GPU and PTLM_PREFIX_TMA=0.

Kernels:
- forward:    o = softmax(q [pk ; k]^T * scale) [pv ; v] and lse (B, Hq, Lq) fp32 (natural log; +inf for a
              query that sees no key, whose output is 0).
- preprocess: delta = rowsum(dO * o) (B, Hq, Lq) fp32.
- dK / dV:    programs over key blocks of the prefix and of the sequence; for its kv head each loops over the
              group's q heads and the q blocks that can see the block. The gradients of a key depend on its
              own column only, so a padded key or a prefix entry past prefix_lengths[b] is zeroed at the store
              instead of masked per element.
- dQ, fused (dq_mode="atomic", the default): the dK / dV kernel with ATOMIC_DQ; for every (q head, q block)
              it visits it also adds scale dS K, (BLOCK_M, D), to a zeroed fp32 (B, Hq, Lq, D) buffer with
              relaxed atomics (dq itself in fp32; other dtypes cast it once at the end). Here dS must drop the
              keys the forward never saw (prefix blocks, padding, no causal mask: one select per element).
- dQ, split (dq_mode="split", or None under torch.use_deterministic_algorithms(True)): programs over q
              blocks, the forward's walk over the keys; no atomics, bitwise reproducible.

Floor (H100: 790 TFLOP/s bf16 dense, 3.0 TB/s): causal self-attention with Lq = Lk = L and a prefix of P has
L (L + 1) / 2 + L P query-key pairs per (batch, q head); forward flops = 4 D per pair (q k^T, p v), backward
at least 8 D (dP, dV, dK, dQ; flash backwards also recompute s: 10 D, SDPA's included). Batch 8, 32 heads x
128, L = 8192: P = 16: forward 4.42 TFLOP -> 5.59 ms, forward + backward 13.2 TFLOP -> 16.8 ms; P = 256:
4.67 TFLOP -> 5.92 ms, 14.0 TFLOP -> 17.7 ms. The prefix adds 2 P / (L + 1) of the flops (0.4% at L = 8192,
P = 16; 6.2% at L = 2048, P = 64 or L = 512, P = 16). Bytes (q, k, v, o, the prefix once) are < 1% of the
time at L >= 512: compute-bound. At decode (Lq = 1) it is memory-bound: bytes = 2 B Hkv (Lk + P) D e (k, v)
-> B = 8, 32 x 128 bf16, Lk = 8192: 1.07 GB -> 0.36 ms.
The split backward spends 14 D per pair (the dK / dV pass recomputes s and dP, the dQ pass both again), 1.4x
SDPA's 10 D: at equal efficiency its forward + backward is ~1.29x SDPA's. The fused one spends 10 D, as SDPA
(FlashAttention-2) does, plus its costs: fp32 atomics of BLOCK_M x D per (key block, q block) tile, i.e.
4 D / BLOCK_N bytes per pair (34 GB of L2 reductions at L = 8192, P = 16, BLOCK_N = 128, the same scheme as
FA2's dQ accumulator), and the buffer's zeroing and cast (10 B per dq element: 2.7 GB -> 0.9 ms at L = 8192,
5% of the floor, as FA2's own). Predicted forward + backward: ~1.05-1.1x SDPA's (the rest: the prefix's own
pairs, the per-element key masks of the prefix blocks, scalar atom.global.add.f32 in the compiled code).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .configs import INTERPRETED, TunedLauncher, cdiv, next_pow2, tune_bench
from .lora import _descriptor, _dot, _tma_sms  # _dot: exact (ieee) for fp32 inputs, as PyTorch's fp32 attention

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
DELTA_BLOCK_M = 64
DQ_MODES = ("atomic", "split")  # the backward's dQ: fused with fp32 atomics, or its own (reproducible) pass
SMEM_BUDGET = 200 * 1024  # bytes of pipelined tiles per program (the H100 has 227 KB of shared memory per SM)
# None: q, the sequence's k / v, dO and the fused backward's dQ sums go through TMA descriptors where they can
# (compiled on compute capability >= 9, fp16 / bf16, 16-byte aligned layouts: _tma_descriptors); True: wherever the
# layouts allow, also under the interpreter and in fp32 (tests); False: never. PTLM_PREFIX_TMA=0 / 1 sets it for
# a process: the benchmark compares the two paths that way.
TMA: bool | None = {"0": False, "1": True}.get(os.environ.get("PTLM_PREFIX_TMA", ""))
# Triton's interpreter has no descriptor reductions: there the TMA path adds dQ with pointer atomics
DESCRIPTOR_REDUCE = tl.constexpr(not INTERPRETED)


# --------------------------------------------------------------------------------------------------- configs
def _tma_blocks(nargs: dict) -> None:
    """A config's pre_hook: each TMA descriptor's block, (1, 1, rows, BLOCK_D) with q / dO / dQ rows of BLOCK_M
    and k / v rows of BLOCK_N (the launchers set them themselves for a known config)."""
    if nargs.get("TMA"):
        for name, rows in _DESC_ROWS.items():
            if nargs.get(name) is not None:
                nargs[name].block_shape = [1, 1, nargs[rows], nargs["BLOCK_D"]]


_DESC_ROWS = {"q_desc": "BLOCK_M", "do_desc": "BLOCK_M", "dq_desc": "BLOCK_M", "k_desc": "BLOCK_N", "v_desc": "BLOCK_N"}


def _cfg(block_m, block_n, warps, stages, pre_hook=_tma_blocks):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages,
                         pre_hook=pre_hook)


def forward_configs():
    """Forward and dQ: a q tile stays on chip while k / v tiles stream through the pipeline."""
    if INTERPRETED:
        return [_cfg(16, 16, 4, 1)]
    prefill = [_cfg(bm, bn, w, s) for bm, bn, w, s in (
        (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3), (128, 32, 4, 4))]
    decode = [_cfg(16, bn, 4, s) for bn, s in ((64, 3), (128, 3), (128, 4))]
    small = [_cfg(32, 32, 4, 2)]  # fits any head dim up to 256
    return prefill + decode + small


def dkdv_configs():
    """dK / dV: a key tile stays on chip while q / dO tiles stream through the pipeline. 128-key tiles take 8
    warps: their two (128, D) fp32 accumulators alone fill 4 warps' registers (D = 128, 32 x 128 at 4 warps
    spilled 4.3 KB a thread, 232 B at 8: Triton 3.6, ptxas)."""
    if INTERPRETED:
        return [_cfg(16, 16, 4, 1)]
    return [_cfg(bm, bn, w, s) for bm, bn, w, s in (
        (32, 128, 8, 3), (64, 128, 8, 3), (16, 128, 8, 3), (32, 64, 4, 3), (64, 64, 8, 3), (16, 64, 4, 3),
        (32, 32, 4, 2))]


def fused_bwd_configs():
    """Fused backward (dK / dV with atomic dQ): a key tile on chip as for dK / dV; tall key tiles (BLOCK_N 128)
    halve the dQ atomics per flop; mostly 8 warps, which share the two (BLOCK_N, D) fp32 accumulators and the
    resident k / v tiles (4 warps spill heavily at BLOCK_N 128, D = 128: sm90_compile's ptxas -v). With TMA
    (one buffer per load per stage, the dQ reduction's fp32 staging) 32 x 128 needs 233 KB of shared memory
    at 3 stages, over the H100's 227 (bf16, D = 128, Triton 3.6: bench.sm90_usage); at 2 stages it fits."""
    if INTERPRETED:
        return [_cfg(16, 16, 4, 1)]
    return [_cfg(bm, bn, w, s) for bm, bn, w, s in (
        (32, 128, 8, 3), (32, 128, 8, 2), (64, 128, 8, 2), (64, 64, 8, 3), (32, 64, 8, 3), (16, 128, 8, 3),
        (64, 64, 4, 3), (32, 32, 4, 2))]


def dq_configs():
    """dQ: like the forward, with dO beside q on chip (pointer loads only: no descriptors to size). 128-query
    tiles take 8 warps: with the (128, D) fp32 dQ accumulator, 4 warps spilled 408 B a thread (D = 128, 128 x 32,
    specialised: Triton 3.6, ptxas; 181 registers and none at 8)."""
    if INTERPRETED:
        return [_cfg(16, 16, 4, 1, None)]
    return [_cfg(bm, bn, w, s, None) for bm, bn, w, s in (
        (128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4), (16, 64, 4, 3), (16, 128, 4, 3),
        (32, 32, 4, 2))]


def _prune(resident: str, streamed: str, ds_tile: bool = False):
    """Drop tiles taller than the queries (decode), tiles whose pipelined buffers (and, with ds_tile, the
    (BLOCK_M, BLOCK_N) dS^T operand of the fused backward's dQ product) overflow shared memory at this head
    dim."""
    def prune(configs, named_args, **kwargs):
        lq, block_d, elem = named_args["LQ_BUCKET"], kwargs["BLOCK_D"], named_args["q_ptr"].element_size()

        def fits(c):
            rows = c.kwargs[resident] + 2 * c.kwargs[streamed] * max(c.num_stages - 1, 1)
            scratch = c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * elem if ds_tile else 0
            if ds_tile and kwargs.get("TMA"):  # the dQ tile's fp32 staging for the bulk reduction
                scratch += c.kwargs["BLOCK_M"] * block_d * 4
            return rows * block_d * elem + scratch <= SMEM_BUDGET and c.kwargs["BLOCK_M"] <= max(16, lq)

        return [c for c in configs if fits(c)] or configs[-1:]
    return {"early_config_prune": prune}


def lq_bucket(lq: int) -> int:
    return min(next_pow2(lq), 16384)


# ---------------------------------------------------------------------------------------------------- helpers
@triton.jit
def _load_tile(ptrs, offs_rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               MASK_ROWS: tl.constexpr):
    """A (rows, BLOCK_D) tile, zero past n_rows (if MASK_ROWS) and past the head dim; unmasked where it can."""
    if MASK_ROWS:
        mask = offs_rows[:, None] < n_rows
        if HEAD_DIM != BLOCK_D:
            mask = mask & (offs_d[None, :] < HEAD_DIM)
        tile = tl.load(ptrs, mask=mask, other=0.0)
    elif HEAD_DIM != BLOCK_D:
        tile = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _key_mask(offs_n, n_end, pos_q, kpm_ptr, stride_kpmn, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
              PADDED: tl.constexpr):
    """Which (query, key) pairs of a block are seen: keys below n_end (and, causal, at or before the query's
    position) if MASKED; real keys if PADDED."""
    seen = offs_n[None, :] >= 0
    if MASKED:
        seen = offs_n[None, :] < n_end
        if CAUSAL:
            seen = seen & (offs_n[None, :] <= pos_q[:, None])
    if PADDED:
        real = tl.load(kpm_ptr + offs_n * stride_kpmn, mask=offs_n < n_end, other=0)
        seen = seen & (real != 0)[None, :]
    return seen


@triton.jit
def _q_block_and_head(LQ, BLOCK_M: tl.constexpr):
    """A 1-D grid, q blocks fastest: a head's blocks run side by side and share its k / v tiles in L2 (and
    B * Hq may pass the 65535 limit of a grid's y axis); within a head the longest causal rows start first."""
    n_blocks = tl.cdiv(LQ, BLOCK_M)
    return n_blocks - 1 - tl.program_id(0) % n_blocks, tl.program_id(0) // n_blocks


@triton.jit
def _row_ptrs(ptr, offs_rows, stride_rows, offs_d, stride_d):
    """(rows, BLOCK_D) pointers, the row offsets in 64 bits: in HF's (B, L, H, D) layout a row is H · D elements,
    so L · stride passes 2^31 at 128k tokens of 128 heads of 128."""
    return ptr + offs_rows.to(tl.int64)[:, None] * stride_rows + offs_d[None, :] * stride_d


@triton.jit
def _head_rows(ptr, b, h, stride_b, stride_h, stride_m, stride_d, offs_m, LQ, offs_d, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """Rows offs_m of head h of batch row b of a (B, H, Lq, D) tensor: (BLOCK_M, BLOCK_D), zero past Lq."""
    return _load_tile(_row_ptrs(ptr + b * stride_b + h * stride_h, offs_m, stride_m, offs_d, stride_d),
                      offs_m, LQ, offs_d, HEAD_DIM, BLOCK_D, True)


@triton.jit
def _desc_rows(desc, b, h, start, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows start.. of head h of batch row b through a (B, H, L, D) TMA descriptor: (ROWS, BLOCK_D), zero past
    L (the copy engine clips each head at its own length, so a tail never reads the next head's rows)."""
    return desc.load([b.to(tl.int32), h.to(tl.int32), start, 0]).reshape(ROWS, BLOCK_D)


@triton.jit
def _q_program(q_ptr, q_desc, HQ, LQ, stride_qb, stride_qh, stride_qm, stride_qd, GROUP: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, TMA: tl.constexpr):
    """A program over q blocks (forward, dQ): its q block pid_m and (batch, q head) pid_bh, batch row b, q head
    h, kv head kvh, rows offs_m, head-dim offsets offs_d and its q tile (BLOCK_M, BLOCK_D)."""
    pid_m, pid_bh = _q_block_and_head(LQ, BLOCK_M)
    b = (pid_bh // HQ).to(tl.int64)
    h = pid_bh % HQ
    kvh = (h // GROUP).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    if TMA:
        q = _desc_rows(q_desc, b, h, pid_m * BLOCK_M, BLOCK_M, BLOCK_D)
    else:
        q = _head_rows(q_ptr, b, h, stride_qb, stride_qh, stride_qm, stride_qd, offs_m, LQ, offs_d, HEAD_DIM,
                       BLOCK_D)
    return pid_m, pid_bh, b, h, kvh, offs_m, offs_d, q


@triton.jit
def _prefix_length(plen_ptr, b, P, HAS_LENGTHS: tl.constexpr):
    """How many of the P prefix entries batch row b sees: prefix_lengths[b] clamped to [0, P], else all."""
    n_prefix = P
    if HAS_LENGTHS:
        n_prefix = tl.minimum(tl.maximum(tl.load(plen_ptr + b), 0), P)
    return n_prefix


@triton.jit
def _kv_bases(k_ptr, v_ptr, b, kvh, stride_kb, stride_kh, stride_vb, stride_vh):
    """Where kv head kvh of batch row b starts in k and in v (the sequence's or the prefix's)."""
    return k_ptr + b * stride_kb + kvh * stride_kh, v_ptr + b * stride_vb + kvh * stride_vh


@triton.jit
def _seq_key_range(pid_m, LQ, LK, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The sequence keys of q block pid_m: (full_end, seq_end); every row sees the keys below full_end (whole
    blocks, no per-element mask); the blocks in [full_end, seq_end) are diagonal or ragged."""
    if CAUSAL:
        # keys up to the block's first query position are seen by every row; past its last, by none
        full_end = (LK - LQ + pid_m * BLOCK_M + 1) // BLOCK_N * BLOCK_N
        seq_end = tl.minimum(LK, LK - LQ + (pid_m + 1) * BLOCK_M)
    else:
        full_end = LK // BLOCK_N * BLOCK_N
        seq_end = LK
    return full_end, seq_end


@triton.jit
def _store_rows(ptr, row, mask_m, offs_d, tile, HEAD_DIM: tl.constexpr):
    """tile (BLOCK_M, BLOCK_D) into rows `row` of a contiguous (rows, HEAD_DIM) tensor, in its dtype."""
    tl.store(ptr + row[:, None] * HEAD_DIM + offs_d[None, :], tile.to(ptr.dtype.element_ty),
             mask=mask_m[:, None] & (offs_d[None, :] < HEAD_DIM))


# --------------------------------------------------------------------------------------------------- forward
@triton.jit
def _attend(acc, l_i, m_i, q, k_ptr, v_ptr, k_desc, v_desc, b, kvh, kpm_ptr, start_n, n_end, pos_q,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_kpmn, qk_scale, offs_n0, offs_d,
            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
            PADDED: tl.constexpr, FP32_DOT: tl.constexpr, TMA: tl.constexpr, NONNEG_SCALE: tl.constexpr):
    """One key block's step of the online softmax (scores in log2 units). TMA: k / v through the descriptors
    (the sequence's keys: n_end is their length, where the copy engine's zero fill starts)."""
    BLOCK_N: tl.constexpr = offs_n0.shape[0]
    offs_n = start_n + offs_n0
    if TMA:
        k = _desc_rows(k_desc, b, kvh, start_n, BLOCK_N, BLOCK_D)
    else:
        k = _load_tile(_row_ptrs(k_ptr, offs_n, stride_kn, offs_d, stride_kd), offs_n, n_end, offs_d,
                       HEAD_DIM, BLOCK_D, MASKED)                                             # (BLOCK_N, BLOCK_D)
    s = _dot(q, tl.trans(k), tl.zeros((q.shape[0], BLOCK_N), tl.float32), FP32_DOT)
    if MASKED or PADDED or not NONNEG_SCALE:
        s = s * qk_scale
        if MASKED or PADDED:
            s = tl.where(_key_mask(offs_n, n_end, pos_q, kpm_ptr, stride_kpmn, MASKED, CAUSAL, PADDED), s,
                         float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet: exp2(-inf) = 0
        p = tl.math.exp2(s - m_ref[:, None])
    else:  # the scale folded into the exponent (one fma an element): max(s) * scale = max(s * scale)
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        m_ref = m_new
        p = tl.math.exp2(s * qk_scale - m_ref[:, None])
    alpha = tl.math.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)
    if TMA:
        v = _desc_rows(v_desc, b, kvh, start_n, BLOCK_N, BLOCK_D)
    else:
        v = _load_tile(_row_ptrs(v_ptr, offs_n, stride_vn, offs_d, stride_vd), offs_n, n_end, offs_d,
                       HEAD_DIM, BLOCK_D, MASKED)
    acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], FP32_DOT)
    return acc, l_i, m_new


@triton.jit
def _prefix_attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, plen_ptr, kpm_ptr, o_ptr, lse_ptr, q_desc, k_desc, v_desc,
    HQ, LQ, LK, P, LQ_BUCKET, LK_BUCKET,
    stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd, stride_pkb, stride_pkh, stride_pkn, stride_pkd,
    stride_pvb, stride_pvh, stride_pvn, stride_pvd, stride_kpmb, stride_kpmn,
    qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_PREFIX: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_PADDING: tl.constexpr, FP32_DOT: tl.constexpr,
    TMA: tl.constexpr, NONNEG_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # TMA: q and the sequence's k / v through (B, H, L, D) descriptors (the prefix, few blocks and possibly
    # shared by every row through a zero batch stride, keeps pointer loads)
    pid_m, pid_bh, b, h, kvh, offs_m, offs_d, q = _q_program(q_ptr, q_desc, HQ, LQ, stride_qb, stride_qh,
                                                             stride_qm, stride_qd, GROUP, HEAD_DIM, BLOCK_D,
                                                             BLOCK_M, TMA)
    offs_n0 = tl.arange(0, BLOCK_N)
    pos_q = LK - LQ + offs_m                                     # the queries' positions in the sequence
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    kpm_base = kpm_ptr + b * stride_kpmb

    if HAS_PREFIX:
        n_prefix = _prefix_length(plen_ptr, b, P, HAS_LENGTHS)
        pk_base, pv_base = _kv_bases(pk_ptr, pv_ptr, b, kvh, stride_pkb, stride_pkh, stride_pvb, stride_pvh)
        full_end = n_prefix // BLOCK_N * BLOCK_N
        for start_n in range(0, full_end, BLOCK_N):
            acc, l_i, m_i = _attend(acc, l_i, m_i, q, pk_base, pv_base, None, None, b, kvh, kpm_base, start_n,
                                    n_prefix, pos_q, stride_pkn, stride_pkd, stride_pvn, stride_pvd, stride_kpmn,
                                    qk_scale, offs_n0, offs_d, HEAD_DIM, BLOCK_D, False, False, False, FP32_DOT,
                                    False, NONNEG_SCALE)
        if full_end < n_prefix:
            acc, l_i, m_i = _attend(acc, l_i, m_i, q, pk_base, pv_base, None, None, b, kvh, kpm_base, full_end,
                                    n_prefix, pos_q, stride_pkn, stride_pkd, stride_pvn, stride_pvd, stride_kpmn,
                                    qk_scale, offs_n0, offs_d, HEAD_DIM, BLOCK_D, True, False, False, FP32_DOT,
                                    False, NONNEG_SCALE)

    k_base, v_base = _kv_bases(k_ptr, v_ptr, b, kvh, stride_kb, stride_kh, stride_vb, stride_vh)
    full_end, seq_end = _seq_key_range(pid_m, LQ, LK, CAUSAL, BLOCK_M, BLOCK_N)
    for start_n in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, b, kvh, kpm_base, start_n, LK,
                                pos_q, stride_kn, stride_kd, stride_vn, stride_vd, stride_kpmn, qk_scale,
                                offs_n0, offs_d, HEAD_DIM, BLOCK_D, False, False, HAS_PADDING, FP32_DOT, TMA,
                                NONNEG_SCALE)
    for start_n in range(full_end, seq_end, BLOCK_N):
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, b, kvh, kpm_base, start_n, LK,
                                pos_q, stride_kn, stride_kd, stride_vn, stride_vd, stride_kpmn, qk_scale,
                                offs_n0, offs_d, HEAD_DIM, BLOCK_D, True, CAUSAL, HAS_PADDING, FP32_DOT, TMA,
                                NONNEG_SCALE)

    seen_any = l_i > 0.0  # a query that sees no key outputs 0 and gets lse = +inf (p = 0 in backward)
    l_safe = tl.where(seen_any, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse = tl.where(seen_any, (m_i + tl.math.log2(l_safe)) * LN2, float("inf"))
    row = pid_bh.to(tl.int64) * LQ + offs_m                      # o (B, Hq, Lq, D) and lse (B, Hq, Lq) contiguous
    mask_m = offs_m < LQ
    tl.store(lse_ptr + row, lse, mask=mask_m)
    _store_rows(o_ptr, row, mask_m, offs_d, o, HEAD_DIM)


_DQ_KEY = ["LQ_BUCKET", "LK_BUCKET", "P", "GROUP", "HEAD_DIM", "CAUSAL", "HAS_PREFIX", "HAS_LENGTHS", "HAS_PADDING"]
_FWD_KEY = _DQ_KEY + ["TMA"]
_prefix_attn_fwd = TunedLauncher(triton.autotune(
    forward_configs(), key=_FWD_KEY, prune_configs_by=_prune("BLOCK_M", "BLOCK_N"),
    do_bench=tune_bench)(_prefix_attn_fwd_kernel))


# -------------------------------------------------------------------------------------------------- backward
@triton.jit
def _delta_kernel(o_ptr, do_ptr, delta_ptr, HQ, LQ, stride_dob, stride_doh, stride_dom, stride_dod,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    n_blocks = tl.cdiv(LQ, BLOCK_M)
    pid_bh = tl.program_id(0) // n_blocks
    offs_m = tl.program_id(0) % n_blocks * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row = pid_bh.to(tl.int64) * LQ + offs_m
    o = _load_tile(o_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], offs_m, LQ, offs_d, HEAD_DIM, BLOCK_D, True)
    do = _head_rows(do_ptr, (pid_bh // HQ).to(tl.int64), pid_bh % HQ, stride_dob, stride_doh, stride_dom, stride_dod,
                    offs_m, LQ, offs_d, HEAD_DIM, BLOCK_D)
    tl.store(delta_ptr + row, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=offs_m < LQ)


@triton.jit
def _dkdv_q_blocks(dk, dv, k, v, seen, q_base, do_base, lse_base, delta_base, dq_base, q_desc, do_desc, dq_desc,
                   b, h, start_m, end_m, offs_n, shift, LQ, stride_qm, stride_qd, stride_dom, stride_dod, sm_scale,
                   qk_scale, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                   CAUSAL: tl.constexpr, ATOMIC_DQ: tl.constexpr, MASK_KEYS: tl.constexpr, FP32_DOT: tl.constexpr,
                   TMA: tl.constexpr):
    """dV += P^T dO, dK += dS^T Q over q blocks [start_m, end_m) of one q head, in transposed form; with
    ATOMIC_DQ also dQ += scale dS K, added to the fp32 rows at dq_base. dK / dV of keys the forward never saw
    are zeroed at the store, their dQ terms are not: MASK_KEYS drops from dS the keys not `seen` (padded, past
    the row's prefix length, past the end: those load as zeros, yet p = exp2(-lse) may overflow).
    TMA: q and dO through their descriptors, and the dQ terms added by the copy engine's bulk reduction
    (one per tile instead of a vector atomic per 4 elements, and no (BLOCK_M, BLOCK_D) address tiles)."""
    for m0 in range(start_m, end_m, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        if TMA:
            q = _desc_rows(q_desc, b, h, m0, BLOCK_M, BLOCK_D)
            do = _desc_rows(do_desc, b, h, m0, BLOCK_M, BLOCK_D)
        else:
            q = _load_tile(_row_ptrs(q_base, offs_m, stride_qm, offs_d, stride_qd), offs_m, LQ, offs_d,
                           HEAD_DIM, BLOCK_D, True)                                           # (BLOCK_M, BLOCK_D)
            do = _load_tile(_row_ptrs(do_base, offs_m, stride_dom, offs_d, stride_dod), offs_m, LQ,
                            offs_d, HEAD_DIM, BLOCK_D, True)
        lse = tl.load(lse_base + offs_m, mask=offs_m < LQ, other=0.0) * LOG2E
        delta = tl.load(delta_base + offs_m, mask=offs_m < LQ, other=0.0)
        s_t = _dot(k, tl.trans(q), tl.zeros((k.shape[0], BLOCK_M), tl.float32), FP32_DOT) * qk_scale
        p_t = tl.math.exp2(s_t - lse[None, :])                                                # (BLOCK_N, BLOCK_M)
        if CAUSAL:  # a diagonal block: key j is seen by query m iff j <= shift + m
            p_t = tl.where(offs_n[:, None] <= shift + offs_m[None, :], p_t, 0.0)
        dv = _dot(p_t.to(do.dtype), do, dv, FP32_DOT)
        dp_t = _dot(v, tl.trans(do), tl.zeros((k.shape[0], BLOCK_M), tl.float32), FP32_DOT)
        ds_t = p_t * (dp_t - delta[None, :])
        if MASK_KEYS:
            ds_t = tl.where(seen[:, None], ds_t, 0.0)
        dk = _dot(ds_t.to(q.dtype), q, dk, FP32_DOT)
        if ATOMIC_DQ:
            dq = _dot(tl.trans(ds_t.to(k.dtype)), k, tl.zeros((BLOCK_M, BLOCK_D), tl.float32), FP32_DOT)
            if TMA and DESCRIPTOR_REDUCE:  # rows past Lq fall outside the head and are dropped
                dq_desc.atomic_add([b.to(tl.int32), h.to(tl.int32), m0, 0],
                                   (dq * sm_scale).reshape(1, 1, BLOCK_M, BLOCK_D))
            else:
                mask = offs_m[:, None] < LQ
                if HEAD_DIM != BLOCK_D:
                    mask = mask & (offs_d[None, :] < HEAD_DIM)
                tl.atomic_add(dq_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], dq * sm_scale, mask=mask,
                              sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_key_block(q_ptr, k_base, v_base, kpm_ptr, do_ptr, lse_ptr, delta_ptr, dk_base, dv_base, dq_ptr,
                    q_desc, do_desc, dq_desc, b, kvh, start_n, n_rows, n_seen, HKV, LQ, LK,
                    stride_qb, stride_qh, stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd,
                    stride_kpmb, stride_kpmn, stride_dob, stride_doh, stride_dom, stride_dod, sm_scale, qk_scale,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                    PADDED: tl.constexpr, ATOMIC_DQ: tl.constexpr, MASK_KEYS: tl.constexpr, FP32_DOT: tl.constexpr,
                    TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK, dV of keys [start_n, start_n + BLOCK_N) of one kv head (rows n_rows of dk_base / dv_base; the first
    n_seen are the keys the forward could see): the group's q heads, the q blocks that can see the block; with
    ATOMIC_DQ also their dQ terms, added to dq_ptr (B, Hq, Lq, D) fp32."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    # A key's gradients depend on its own column only: keys the forward never saw are zeroed at the store.
    seen = offs_n < n_seen
    if PADDED:
        seen = seen & (tl.load(kpm_ptr + b * stride_kpmb + offs_n * stride_kpmn, mask=offs_n < n_rows, other=0) != 0)
    k = _load_tile(_row_ptrs(k_base, offs_n, stride_kn, offs_d, stride_kd), offs_n, n_rows, offs_d,
                   HEAD_DIM, BLOCK_D, True)                                                   # (BLOCK_N, BLOCK_D)
    v = _load_tile(_row_ptrs(v_base, offs_n, stride_vn, offs_d, stride_vd), offs_n, n_rows, offs_d,
                   HEAD_DIM, BLOCK_D, True)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    shift = LK - LQ                                              # query m sits at sequence position shift + m
    end_m = tl.where(tl.max(seen.to(tl.int32), 0) > 0, LQ, 0)  # a block of unseen keys only stores zeros
    if CAUSAL:  # q blocks before first_m see none of the block; from full_m on, all of it
        first_m = tl.maximum(start_n - shift, 0) // BLOCK_M * BLOCK_M
        full_m = tl.maximum(tl.minimum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - shift, 0), BLOCK_M) * BLOCK_M,
                                       end_m), first_m)
    else:
        first_m = 0
        full_m = 0
    for g in range(GROUP):
        h = kvh * GROUP + g
        q_base = q_ptr + b * stride_qb + h * stride_qh
        do_base = do_ptr + b * stride_dob + h * stride_doh
        lse_base = lse_ptr + (b * HKV * GROUP + h) * LQ
        delta_base = delta_ptr + (b * HKV * GROUP + h) * LQ
        dq_base = dq_ptr + (b * HKV * GROUP + h) * LQ * HEAD_DIM
        if CAUSAL:
            dk, dv = _dkdv_q_blocks(dk, dv, k, v, seen, q_base, do_base, lse_base, delta_base, dq_base, q_desc,
                                    do_desc, dq_desc, b, h, first_m, full_m, offs_n, shift, LQ, stride_qm, stride_qd,
                                    stride_dom, stride_dod, sm_scale, qk_scale, offs_d, HEAD_DIM, BLOCK_D, BLOCK_M,
                                    True, ATOMIC_DQ, MASK_KEYS, FP32_DOT, TMA)
        dk, dv = _dkdv_q_blocks(dk, dv, k, v, seen, q_base, do_base, lse_base, delta_base, dq_base, q_desc, do_desc,
                                dq_desc, b, h, full_m, end_m, offs_n, shift, LQ, stride_qm, stride_qd, stride_dom,
                                stride_dod, sm_scale, qk_scale, offs_d, HEAD_DIM, BLOCK_D, BLOCK_M, False, ATOMIC_DQ,
                                MASK_KEYS, FP32_DOT, TMA)
    dk = tl.where(seen[:, None], dk * sm_scale, 0.0)
    dv = tl.where(seen[:, None], dv, 0.0)
    mask = (offs_n[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM)
    out_offs = offs_n[:, None] * HEAD_DIM + offs_d[None, :]      # dk, dv, dpk, dpv contiguous
    tl.store(dk_base + out_offs, dk.to(dk_base.dtype.element_ty), mask=mask)
    tl.store(dv_base + out_offs, dv.to(dv_base.dtype.element_ty), mask=mask)


@triton.jit
def _prefix_attn_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, plen_ptr, kpm_ptr, do_ptr, lse_ptr, delta_ptr,
    dk_ptr, dv_ptr, dpk_ptr, dpv_ptr, dq_ptr, q_desc, do_desc, dq_desc,
    HKV, LQ, LK, P, LQ_BUCKET, LK_BUCKET,
    stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd, stride_pkb, stride_pkh, stride_pkn, stride_pkd,
    stride_pvb, stride_pvh, stride_pvn, stride_pvd, stride_kpmb, stride_kpmn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    sm_scale, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, HAS_PADDING: tl.constexpr, ATOMIC_DQ: tl.constexpr, FP32_DOT: tl.constexpr,
    TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # dK / dV, and with ATOMIC_DQ the fused backward: dQ terms too, added to dq_ptr (B, Hq, Lq, D) fp32 (TMA: q,
    # dO and dq through (B, H, Lq, D) descriptors).
    # A 1-D grid, key blocks fastest: a head's blocks run side by side and share its q / dO tiles in L2 (and
    # B * Hkv may pass the 65535 limit of a grid's y axis). Prefix blocks first, then sequence blocks in
    # order: the heaviest start first.
    n_blocks = tl.cdiv(P, BLOCK_N) + tl.cdiv(LK, BLOCK_N)
    pid_n = tl.program_id(0) % n_blocks
    pid_bkv = tl.program_id(0) // n_blocks
    b = (pid_bkv // HKV).to(tl.int64)
    kvh = (pid_bkv % HKV).to(tl.int64)
    n_prefix_blocks = tl.cdiv(P, BLOCK_N)
    if pid_n < n_prefix_blocks:
        pk_base, pv_base = _kv_bases(pk_ptr, pv_ptr, b, kvh, stride_pkb, stride_pkh, stride_pvb, stride_pvh)
        _dkdv_key_block(q_ptr, pk_base, pv_base, kpm_ptr, do_ptr, lse_ptr, delta_ptr,
                        dpk_ptr + pid_bkv.to(tl.int64) * P * HEAD_DIM, dpv_ptr + pid_bkv.to(tl.int64) * P * HEAD_DIM,
                        dq_ptr, q_desc, do_desc, dq_desc, b, kvh, pid_n * BLOCK_N, P,
                        _prefix_length(plen_ptr, b, P, HAS_LENGTHS), HKV, LQ, LK,
                        stride_qb, stride_qh, stride_qm, stride_qd, stride_pkn, stride_pkd, stride_pvn, stride_pvd,
                        stride_kpmb, stride_kpmn, stride_dob, stride_doh, stride_dom, stride_dod, sm_scale, qk_scale,
                        GROUP, HEAD_DIM, BLOCK_D, False, False, ATOMIC_DQ, ATOMIC_DQ, FP32_DOT, TMA, BLOCK_M,
                        BLOCK_N)  # prefix blocks are few: always masked
    else:
        k_base, v_base = _kv_bases(k_ptr, v_ptr, b, kvh, stride_kb, stride_kh, stride_vb, stride_vh)
        _dkdv_key_block(q_ptr, k_base, v_base, kpm_ptr, do_ptr, lse_ptr, delta_ptr,
                        dk_ptr + pid_bkv.to(tl.int64) * LK * HEAD_DIM, dv_ptr + pid_bkv.to(tl.int64) * LK * HEAD_DIM,
                        dq_ptr, q_desc, do_desc, dq_desc, b, kvh, (pid_n - n_prefix_blocks) * BLOCK_N, LK, LK, HKV,
                        LQ, LK,
                        stride_qb, stride_qh, stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd,
                        stride_kpmb, stride_kpmn, stride_dob, stride_doh, stride_dom, stride_dod, sm_scale, qk_scale,
                        GROUP, HEAD_DIM, BLOCK_D, CAUSAL, HAS_PADDING, ATOMIC_DQ,
                        ATOMIC_DQ and (HAS_PADDING or not CAUSAL), FP32_DOT, TMA, BLOCK_M, BLOCK_N)
        # (causal without padding needs no key mask: keys past Lk lie beyond every real query's causal limit)


@triton.jit
def _dq_k_blocks(dq, q, do, lse, delta, k_ptr, v_ptr, kpm_ptr, start_n, end_n, n_end, pos_q,
                 stride_kn, stride_kd, stride_vn, stride_vd, stride_kpmn, qk_scale, offs_n0, offs_d,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                 CAUSAL: tl.constexpr, PADDED: tl.constexpr, FP32_DOT: tl.constexpr):
    """dQ += dS K over key blocks [start_n, end_n) (unscaled); keys past n_end load as zeros."""
    for n0 in range(start_n, end_n, BLOCK_N):
        offs_n = n0 + offs_n0
        k = _load_tile(_row_ptrs(k_ptr, offs_n, stride_kn, offs_d, stride_kd), offs_n, n_end, offs_d,
                       HEAD_DIM, BLOCK_D, MASKED)
        v = _load_tile(_row_ptrs(v_ptr, offs_n, stride_vn, offs_d, stride_vd), offs_n, n_end, offs_d,
                       HEAD_DIM, BLOCK_D, MASKED)
        s = _dot(q, tl.trans(k), tl.zeros((q.shape[0], BLOCK_N), tl.float32), FP32_DOT) * qk_scale
        p = tl.math.exp2(s - lse[:, None])                                                    # (BLOCK_M, BLOCK_N)
        if MASKED or PADDED:
            p = tl.where(_key_mask(offs_n, n_end, pos_q, kpm_ptr, stride_kpmn, MASKED, CAUSAL, PADDED), p, 0.0)
        dp = _dot(do, tl.trans(v), tl.zeros((q.shape[0], BLOCK_N), tl.float32), FP32_DOT)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq, FP32_DOT)
    return dq


@triton.jit
def _prefix_attn_dq_kernel(
    q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, plen_ptr, kpm_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    HQ, LQ, LK, P, LQ_BUCKET, LK_BUCKET,
    stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd, stride_pkb, stride_pkh, stride_pkn, stride_pkd,
    stride_pvb, stride_pvh, stride_pvn, stride_pvd, stride_kpmb, stride_kpmn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    sm_scale, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_PREFIX: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_PADDING: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m, pid_bh, b, h, kvh, offs_m, offs_d, q = _q_program(q_ptr, None, HQ, LQ, stride_qb, stride_qh, stride_qm,
                                                             stride_qd, GROUP, HEAD_DIM, BLOCK_D, BLOCK_M, False)
    offs_n0 = tl.arange(0, BLOCK_N)
    pos_q = LK - LQ + offs_m
    do = _head_rows(do_ptr, b, h, stride_dob, stride_doh, stride_dom, stride_dod, offs_m, LQ, offs_d, HEAD_DIM,
                    BLOCK_D)
    row = pid_bh.to(tl.int64) * LQ + offs_m
    mask_m = offs_m < LQ
    lse = tl.load(lse_ptr + row, mask=mask_m, other=0.0) * LOG2E
    delta = tl.load(delta_ptr + row, mask=mask_m, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    kpm_base = kpm_ptr + b * stride_kpmb

    if HAS_PREFIX:
        n_prefix = _prefix_length(plen_ptr, b, P, HAS_LENGTHS)
        pk_base, pv_base = _kv_bases(pk_ptr, pv_ptr, b, kvh, stride_pkb, stride_pkh, stride_pvb, stride_pvh)
        full_end = n_prefix // BLOCK_N * BLOCK_N
        dq = _dq_k_blocks(dq, q, do, lse, delta, pk_base, pv_base, kpm_base, 0, full_end, n_prefix, pos_q,
                          stride_pkn, stride_pkd, stride_pvn, stride_pvd, stride_kpmn, qk_scale, offs_n0, offs_d,
                          HEAD_DIM, BLOCK_D, BLOCK_N, False, False, False, FP32_DOT)
        dq = _dq_k_blocks(dq, q, do, lse, delta, pk_base, pv_base, kpm_base, full_end, n_prefix, n_prefix, pos_q,
                          stride_pkn, stride_pkd, stride_pvn, stride_pvd, stride_kpmn, qk_scale, offs_n0, offs_d,
                          HEAD_DIM, BLOCK_D, BLOCK_N, True, False, False, FP32_DOT)

    k_base, v_base = _kv_bases(k_ptr, v_ptr, b, kvh, stride_kb, stride_kh, stride_vb, stride_vh)
    full_end, seq_end = _seq_key_range(pid_m, LQ, LK, CAUSAL, BLOCK_M, BLOCK_N)
    dq = _dq_k_blocks(dq, q, do, lse, delta, k_base, v_base, kpm_base, 0, full_end, LK, pos_q,
                      stride_kn, stride_kd, stride_vn, stride_vd, stride_kpmn, qk_scale, offs_n0, offs_d,
                      HEAD_DIM, BLOCK_D, BLOCK_N, False, False, HAS_PADDING, FP32_DOT)
    dq = _dq_k_blocks(dq, q, do, lse, delta, k_base, v_base, kpm_base, full_end, seq_end, LK, pos_q,
                      stride_kn, stride_kd, stride_vn, stride_vd, stride_kpmn, qk_scale, offs_n0, offs_d,
                      HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, HAS_PADDING, FP32_DOT)
    _store_rows(dq_ptr, row, mask_m, offs_d, dq * sm_scale, HEAD_DIM)


_DKDV_KEY = ["LQ_BUCKET", "LK_BUCKET", "P", "GROUP", "HEAD_DIM", "CAUSAL", "HAS_LENGTHS", "HAS_PADDING", "TMA"]
_prefix_attn_dkdv = TunedLauncher(triton.autotune(
    dkdv_configs(), key=_DKDV_KEY, prune_configs_by=_prune("BLOCK_N", "BLOCK_M"),
    do_bench=tune_bench)(_prefix_attn_dkdv_kernel))
# the same kernel with ATOMIC_DQ: its own tiles; tuning runs add into dq, so each run starts from zeros
_prefix_attn_bwd_fused = TunedLauncher(triton.autotune(
    fused_bwd_configs(), key=_DKDV_KEY, prune_configs_by=_prune("BLOCK_N", "BLOCK_M", ds_tile=True),
    reset_to_zero=["dq_ptr"], do_bench=tune_bench)(_prefix_attn_dkdv_kernel))
_prefix_attn_dq = TunedLauncher(triton.autotune(
    dq_configs(), key=_DQ_KEY, prune_configs_by=_prune("BLOCK_M", "BLOCK_N"),
    do_bench=tune_bench)(_prefix_attn_dq_kernel))


# ------------------------------------------------------------------------------------------------- launchers
def _prefix_args(q: torch.Tensor, prefix_k, prefix_v, prefix_lengths, key_padding_mask):
    """Pointer stand-ins and strides for the optional inputs (absent ones point at q and are never read)."""
    has_prefix = prefix_k is not None and prefix_k.shape[2] > 0
    pk, pv = (prefix_k, prefix_v) if has_prefix else (q, q)
    kpm = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else q
    plen = prefix_lengths.contiguous() if has_prefix and prefix_lengths is not None else q  # read at plen + b
    ptrs = (pk, pv, plen, kpm)
    strides = (*pk.stride(), *pv.stride(), *(kpm.stride() if key_padding_mask is not None else (0, 0)))
    flags = dict(HAS_PREFIX=has_prefix, HAS_LENGTHS=has_prefix and prefix_lengths is not None,
                 HAS_PADDING=key_padding_mask is not None)
    return ptrs, strides, flags


def _tma_applies(t: torch.Tensor, backward: bool = False) -> bool:
    """Whether the TMA path applies to t's device and dtype (see TMA); the layouts are _tma_strides's. The
    backward takes it only where TMA is True: on the H100 (2026-11-27, bf16, B 8, H 32, D 128, L 2048, P 16) its
    dK / dV kernel took 3.34 ms through the descriptors against 2.49 ms with pointer loads (the fused backward's
    TMA configs that fit shared memory are the small tiles)."""
    if TMA is False or (backward and TMA is None):
        return False
    if INTERPRETED or TMA:
        return bool(TMA)
    return (t.is_cuda and t.dtype != torch.float32
            and _tma_sms(t.device.index if t.device.index is not None else torch.cuda.current_device()) > 0)


def _tma_strides(t: torch.Tensor) -> list[int] | None:
    """t's (B, H, L, D) strides as a TMA descriptor takes them (unit last stride, the others positive multiples of
    16 bytes; a size-1 dimension's stride, never used, normalised), or None where t does not qualify."""
    if t.data_ptr() % 16 or t.stride(3) != 1:
        return None
    strides, inner = [1], t.shape[3]
    for dim in (2, 1, 0):
        stride = t.stride(dim) if t.shape[dim] != 1 else inner
        if stride <= 0 or stride * t.element_size() % 16:
            return None
        strides.insert(0, stride)
        inner = stride * t.shape[dim]
    return strides


def _tma_descriptors(launcher: TunedLauncher, key: tuple, block_d: int, operands: dict,
                     backward: bool = False) -> tuple[dict, bool]:
    """{name: TMA descriptor} of the (B, H, L, D) operands {name: tensor} where every one qualifies (see TMA and
    _tma_applies), else {name: None}; and whether the launch is prepared: a known config's blocks are set here, an
    unknown one's by its pre_hook (_tma_blocks) while it tunes."""
    usable = _tma_applies(next(iter(operands.values())), backward)
    strides = {name: _tma_strides(t) for name, t in operands.items()} if usable else {}
    if not usable or any(s is None for s in strides.values()):
        return dict.fromkeys(operands), True
    meta = launcher.chosen(key)
    if meta is None:
        return {name: TensorDescriptor(t, list(t.shape), strides[name], [1, 1, 16, 16])
                for name, t in operands.items()}, False
    return {name: _descriptor(t, list(t.shape), strides[name], [1, 1, meta[_DESC_ROWS[name]], block_d])
            for name, t in operands.items()}, True


def prefix_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor | None,
                         prefix_v: torch.Tensor | None, prefix_lengths: torch.Tensor | None,
                         key_padding_mask: torch.Tensor | None, causal: bool, scale: float,
                         out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """o (B, Hq, Lq, D) contiguous in q's dtype and lse (B, Hq, Lq) fp32 (see the module docstring).

    q (B, Hq, Lq, D); k, v (B, Hkv, Lk, D); prefix_k, prefix_v (B, Hkv, P, D) or None; prefix_lengths (B,)
    int32 or None; key_padding_mask (B, Lk) bool or None; any strides (batch stride 0 for a shared prefix).
    `out`, if given, receives o.
    """
    batch, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    o = torch.empty((batch, hq, lq, d), device=q.device, dtype=q.dtype) if out is None else out
    lse = torch.empty((batch, hq, lq), device=q.device, dtype=torch.float32)
    if o.numel() == 0:
        return o, lse
    (pk, pv, plen, kpm), extra_strides, flags = _prefix_args(q, prefix_k, prefix_v, prefix_lengths,
                                                             key_padding_mask)
    p = pk.shape[2] if flags["HAS_PREFIX"] else 0
    block_d = max(16, next_pow2(d))
    lq_b, lk_b = lq_bucket(lq), lq_bucket(lk)
    key = (lq_b, lk_b, p, hq // hkv, d, causal, *flags.values(), q.dtype)
    descs, prepared = _tma_descriptors(_prefix_attn_fwd, key + (True,), block_d,
                                       {"q_desc": q, "k_desc": k, "v_desc": v})
    tma = descs["q_desc"] is not None
    grid = lambda meta: (cdiv(lq, meta["BLOCK_M"]) * batch * hq,)
    _prefix_attn_fwd.launch(key + (tma,), grid,
        q, k, v, pk, pv, plen, kpm, o, lse, descs["q_desc"], descs["k_desc"], descs["v_desc"],
        hq, lq, lk, p, lq_b, lk_b,
        *q.stride(), *k.stride(), *v.stride(), *extra_strides,
        scale * 1.4426950408889634,
        GROUP=hq // hkv, HEAD_DIM=d, BLOCK_D=block_d, CAUSAL=causal, FP32_DOT=q.dtype == torch.float32, **flags,
        TMA=tma, NONNEG_SCALE=scale >= 0, prepared=prepared,
    )
    return o, lse


def prefix_attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         prefix_k: torch.Tensor | None, prefix_v: torch.Tensor | None,
                         prefix_lengths: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
                         o: torch.Tensor, lse: torch.Tensor, causal: bool, scale: float,
                         out: tuple[torch.Tensor, ...] | None = None,
                         dq_mode: str | None = None) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv, dprefix_k, dprefix_v), contiguous in q's dtype: dq like q, dk / dv like k, dprefix_k /
    dprefix_v (B, Hkv, P, D) per row (their sum over rows is the gradient of a shared prefix), or empty (0,)
    without a prefix. do (B, Hq, Lq, D) any strides; o, lse the forward's. `out`, if given, receives them.

    dq_mode: "atomic" (one pass over key blocks, dQ summed in fp32 with atomics: its last bits vary from run
    to run), "split" (a second pass over q blocks for dQ: bitwise reproducible), or None: "split" under
    torch.use_deterministic_algorithms(True), else "atomic".
    """
    if dq_mode is None:
        dq_mode = "split" if torch.are_deterministic_algorithms_enabled() else "atomic"
    elif dq_mode not in DQ_MODES:
        raise ValueError(f"dq_mode: expected one of {DQ_MODES} or None, got {dq_mode!r}")
    batch, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    (pk, pv, plen, kpm), extra_strides, flags = _prefix_args(q, prefix_k, prefix_v, prefix_lengths,
                                                             key_padding_mask)
    p = pk.shape[2] if flags["HAS_PREFIX"] else 0
    if out is None:
        new = lambda *shape: torch.empty(shape, device=q.device, dtype=q.dtype)
        prefix_shape = (batch, hkv, p, d) if prefix_k is not None else (0,)
        out = (new(batch, hq, lq, d), new(batch, hkv, lk, d), new(batch, hkv, lk, d), new(*prefix_shape),
               new(*prefix_shape))
    dq, dk, dv, dpk, dpv = out
    if lq == 0:
        for grad in (dk, dv, dpk, dpv):
            grad.zero_()
        return out
    delta = torch.empty((batch, hq, lq), device=q.device, dtype=torch.float32)
    block_d = max(16, next_pow2(d))
    _delta_kernel[(cdiv(lq, DELTA_BLOCK_M) * batch * hq,)](o, do, delta, hq, lq, *do.stride(), HEAD_DIM=d,
                                                            BLOCK_D=block_d, BLOCK_M=DELTA_BLOCK_M)
    lq_b, lk_b = lq_bucket(lq), lq_bucket(lk)
    common = (q, k, v, pk, pv, plen, kpm, do, lse, delta)
    strides = (*q.stride(), *k.stride(), *v.stride(), *extra_strides, *do.stride(), scale, scale * 1.4426950408889634)
    consts = dict(GROUP=hq // hkv, HEAD_DIM=d, BLOCK_D=block_d, CAUSAL=causal, FP32_DOT=q.dtype == torch.float32)
    dkdv_flags = {name: flags[name] for name in ("HAS_LENGTHS", "HAS_PADDING")}
    key = (lq_b, lk_b, p, hq // hkv, d, causal, *dkdv_flags.values(), q.dtype)
    grid = lambda meta: ((cdiv(p, meta["BLOCK_N"]) + cdiv(lk, meta["BLOCK_N"])) * batch * hkv,)
    dkdv_outs = (dk, dv, dpk if p else dk, dpv if p else dv)
    if dq_mode == "atomic":
        # dq (contiguous) is its own fp32 accumulator in fp32; other dtypes sum in a buffer, then cast
        dq_acc = dq.zero_() if dq.dtype == torch.float32 else torch.zeros(dq.shape, device=q.device,
                                                                           dtype=torch.float32)
        descs, prepared = _tma_descriptors(_prefix_attn_bwd_fused, key + (True,), block_d,
                                           {"q_desc": q, "do_desc": do, "dq_desc": dq_acc}, backward=True)
        tma = descs["q_desc"] is not None
        _prefix_attn_bwd_fused.launch(key + (tma,), grid, *common, *dkdv_outs, dq_acc, *descs.values(), hkv, lq, lk,
                                      p, lq_b, lk_b, *strides, **consts, **dkdv_flags, ATOMIC_DQ=True, TMA=tma,
                                      prepared=prepared)
        if dq_acc is not dq:
            dq.copy_(dq_acc)
        return out
    descs, prepared = _tma_descriptors(_prefix_attn_dkdv, key + (True,), block_d, {"q_desc": q, "do_desc": do},
                                       backward=True)
    tma = descs["q_desc"] is not None
    _prefix_attn_dkdv.launch(key + (tma,), grid, *common, *dkdv_outs, dk, descs["q_desc"], descs["do_desc"], None,
                             hkv, lq, lk, p, lq_b, lk_b, *strides, **consts, **dkdv_flags, ATOMIC_DQ=False, TMA=tma,
                             prepared=prepared)  # (dq_ptr unused: points at dk)
    key = (lq_b, lk_b, p, hq // hkv, d, causal, *flags.values(), q.dtype)
    grid = lambda meta: (cdiv(lq, meta["BLOCK_M"]) * batch * hq,)
    _prefix_attn_dq.launch(key, grid, *common, dq, hq, lq, lk, p, lq_b, lk_b, *strides, **consts, **flags)
    return out
