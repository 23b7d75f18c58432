"""LoRA on an embedding table, every token with its own adapter (or none), forward kernel.

y[t] = es * (E[id_t] + s_a A_a[:, id_t]^T B_a^T), a = adapter_index[t], over stacked slots A (S, r_max, V),
B (S, d, r_max) in HF PEFT's lora_embedding_A / lora_embedding_B layout (A's columns are vocabulary entries);
es is the embedding's own output scale (Gemma's scaled embeddings; 1 elsewhere). One adapter is S = 1.

A program owns BLOCK_T tokens, taken in slot-sorted order (token_segments), and a range of columns. It gathers
each token's r-wide A column once (xa, scaled, fp32), then per BLOCK_D columns adds, for each run of rows that
share a slot (one or two runs in a sorted block), xa @ B_a's (BLOCK_D, R_PAD) tile on tensor cores (tf32 for a
half-precision table, whose fp32 xa keeps fp16's mantissa; exact for an fp32 one), and the
tokens' E rows. Programs of the first column range also store xa (zero beyond each slot's rank and for rows
without one), what backward needs; dA and dB come from the multi-adapter LoRA kernels (kernels.lora_multi) and
a scatter-add, in ops.lora_embedding. Tokens whose id lies outside [0, V) read nothing and get a zero row.

Floor: bytes = T d b (E rows) + T d b (y) + T r b (A) + S d r b (B) -> at T = 4096, d = 4096, r = 16, bf16:
67 MB, 22 us on an H100 (3.0 TB/s). A's gather reads one sector per (token, rank): T r 32 bytes through L2
(2 MB at T = 4096), once per token since a program spans many column tiles when there are enough token blocks.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import cdiv, next_pow2
from .lora import _dot_fp32

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PROGRAMS = 512          # enough programs to fill a GPU: column ranges are split until token blocks x ranges reach it


def launch_shape(T: int, D: int, r_max: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_T, BLOCK_D, R_PAD, columns per program, num_warps)."""
    r_pad = max(16, next_pow2(r_max))
    block_t = 16 if T <= 16 else 32
    block_d = 128 if r_pad <= 64 else 64
    tiles = cdiv(D, block_d)
    ranges = min(tiles, max(1, cdiv(PROGRAMS, cdiv(T, block_t))))
    return block_t, block_d, r_pad, cdiv(tiles, ranges) * block_d, 4


@triton.jit
def _lora_embedding_fwd_kernel(
    ids_ptr, index_ptr, order_ptr, w_ptr, a_ptr, b_ptr, ranks_ptr, scales_ptr, y_ptr, xa_ptr,
    T, D, V, R_MAX, WIDTH, COLS, embed_scale,
    stride_w, stride_as, stride_ar, stride_av, stride_bs, stride_bd, stride_br, stride_y,
    FP32_DOT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, R_PAD: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    pos = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    pos_ok = pos < T
    rows = tl.load(order_ptr + pos, mask=pos_ok, other=0).to(tl.int64)             # tokens in slot order
    ids = tl.load(ids_ptr + rows, mask=pos_ok, other=0).to(tl.int64)
    in_vocab = pos_ok & (ids >= 0) & (ids < V)
    ids = tl.where(in_vocab, ids, 0)
    slot = tl.load(index_ptr + rows, mask=pos_ok, other=-1).to(tl.int32)
    slotted = pos_ok & (slot >= 0)
    has = in_vocab & slotted
    # `has` as a select condition or load mask here failed Triton 3.6's sm_90 layout pass (the mask's layout
    # differed from the pointers'); `live` below masks the rows without it
    s = tl.maximum(slot, 0).to(tl.int64)
    rank = tl.load(ranks_ptr + s, mask=slotted, other=0)
    scale = tl.load(scales_ptr + s, mask=slotted, other=0.0)

    # xa (BLOCK_T, R_PAD): each token's A column, gathered once
    kk = tl.arange(0, R_PAD)
    live = has[:, None] & (kk[None, :] < rank[:, None])
    xa = tl.load(a_ptr + s[:, None] * stride_as + kk[None, :] * stride_ar + ids[:, None] * stride_av, mask=live,
                 other=0.0).to(tl.float32) * scale[:, None]
    tl.store(xa_ptr + rows[:, None] * WIDTH + kk[None, :], xa,
             mask=pos_ok[:, None] & (kk[None, :] < WIDTH) & (pid_d == 0))

    # runs: the distinct slots of the (sorted) block, walked in increasing order (each once, sorted or not)
    prev = tl.load(order_ptr + pos - 1, mask=pos_ok & (pos > pid_t * BLOCK_T), other=0)
    prev_slot = tl.load(index_ptr + prev, mask=pos_ok & (pos > pid_t * BLOCK_T), other=-1).to(tl.int32)
    runs = tl.sum((slotted & (slot != prev_slot)).to(tl.int32), axis=0)
    k_ok = kk < R_MAX

    col_end = tl.minimum(pid_d * COLS + COLS, D)
    for c0 in range(pid_d * COLS, col_end, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        col_ok = cols < col_end
        acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        current = tl.full([], -1, tl.int32)
        for _ in range(0, runs):
            current = tl.min(tl.where(slotted & (slot > current), slot, 2147483647), axis=0)
            # (past the block's last slot only if `order` was not slot-sorted: then nothing is read)
            b = tl.load(b_ptr + current.to(tl.int64) * stride_bs + cols[:, None].to(tl.int64) * stride_bd
                        + kk[None, :] * stride_br, mask=col_ok[:, None] & k_ok[None, :] & (current < 2147483647),
                        other=0.0)
            mine = tl.where((slot == current)[:, None], xa, 0.0)                # the run's rows; b (BLOCK_D, R_PAD)
            acc = _dot_fp32(mine, tl.trans(b.to(tl.float32)), acc, FP32_DOT)
        base = tl.load(w_ptr + ids[:, None] * stride_w + cols[None, :], mask=in_vocab[:, None] & col_ok[None, :],
                       other=0.0).to(tl.float32)
        y = ((base + acc) * embed_scale).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], y, mask=pos_ok[:, None] & col_ok[None, :])


def lora_embedding_forward(ids: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                           adapter_index: torch.Tensor, order: torch.Tensor, ranks: torch.Tensor,
                           scales: torch.Tensor, embed_scale: float, width: int,
                           out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y (T, d) in weight's dtype, `out` if given, with unit column stride; xa (T, width) fp32). ids,
    adapter_index (T,) integers, contiguous; order (T,) the tokens sorted by slot (token_segments); weight (V, d)
    with unit column stride; lora_A (S, r_max, V), lora_B (S, d, r_max) any strides, in weight's dtype or fp32;
    ranks (S,) int32, scales (S,) fp32; width: r_max rounded up to a multiple of 16 (padded_rank)."""
    T = ids.shape[0]
    V, D = weight.shape
    r_max = lora_A.shape[1]
    y = torch.empty((T, D), device=weight.device, dtype=weight.dtype) if out is None else out
    xa = torch.empty((T, width), device=weight.device, dtype=torch.float32)
    if T == 0:
        return y, xa
    block_t, block_d, r_pad, cols, warps = launch_shape(T, D, r_max)
    assert r_max <= width <= r_pad, (r_max, width)
    sa, sb = lora_A.stride(), lora_B.stride()
    _lora_embedding_fwd_kernel[(cdiv(T, block_t), cdiv(D, cols))](
        ids, adapter_index, order, weight, lora_A, lora_B, ranks, scales, y, xa,
        T, D, V, r_max, width, cols, float(embed_scale),
        weight.stride(0), sa[0], sa[1], sa[2], sb[0], sb[1], sb[2], y.stride(0),
        FP32_DOT=weight.dtype == torch.float32, BLOCK_T=block_t, BLOCK_D=block_d, R_PAD=r_pad, num_warps=warps,
    )
    return y, xa
