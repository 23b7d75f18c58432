"""LoRA on an embedding table, every token with its own adapter (or none), forward kernel.

y[t] = es * (E[id_t] + s_a A_a[:, id_t]^T B_a^T), a = adapter_index[t], over stacked slots A (S, r_max, V),
B (S, d, r_max) in HF PEFT's lora_embedding_A / lora_embedding_B layout (A's columns are vocabulary entries);
es is the embedding's own output scale (Gemma's scaled embeddings; 1 elsewhere). One adapter is S = 1.

A program owns BLOCK_T tokens × BLOCK_D columns: it gathers each token's E row and its r-wide A column, and
adds the rank-r product with B one rank at a time (each row may read another slot's B, so no tensor-core tile
is shared). Programs of the first column block also store xa[t] = s_a A_a[:, id_t] (fp32, zero beyond the
slot's rank and for rows without one), what backward needs; dA and dB come from the multi-adapter LoRA
kernels (kernels.lora_multi) and a scatter-add, in ops.lora_embedding.

Floor: bytes = T d b (E rows) + T d b (y) + T r 4 (A, xa) -> at T = 4096, d = 4096, bf16: 67 MB, 22 us on an
H100 (3.0 TB/s); B (S d r) stays in L2. Tokens whose id lies outside [0, V) read nothing and get a zero row.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import cdiv, next_pow2

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def block_sizes(T: int, D: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps): 16 tokens × up to 256 columns a program."""
    block_d = min(256, max(16, next_pow2(D)))
    return min(16, max(1, next_pow2(T))), block_d, max(1, min(4, block_d // 64))


@triton.jit
def _lora_embedding_fwd_kernel(
    ids_ptr, index_ptr, w_ptr, a_ptr, b_ptr, ranks_ptr, scales_ptr, y_ptr, xa_ptr,
    T, D, V, R_MAX, WIDTH, embed_scale,
    stride_w, stride_as, stride_ar, stride_av, stride_bs, stride_bd, stride_br, stride_y,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    ids = tl.load(ids_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    in_vocab = row_ok & (ids >= 0) & (ids < V)
    ids = tl.where(in_vocab, ids, 0)
    slot = tl.load(index_ptr + rows, mask=row_ok, other=-1)
    has = in_vocab & (slot >= 0)
    s = tl.where(has, slot, 0).to(tl.int64)
    rank = tl.load(ranks_ptr + s, mask=has, other=0)
    scale = tl.load(scales_ptr + s, mask=has, other=0.0)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    a_col = a_ptr + s * stride_as + ids * stride_av                                 # (BLOCK_T,) A_a[0, id]
    b_rows = b_ptr + s[:, None] * stride_bs + cols[None, :].to(tl.int64) * stride_bd  # (BLOCK_T, BLOCK_D)
    xa_row = xa_ptr + rows.to(tl.int64) * WIDTH
    first = pid_d == 0
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for k in range(0, R_MAX):
        live = has & (k < rank)
        a = tl.load(a_col + k * stride_ar, mask=live, other=0.0).to(tl.float32) * scale       # (BLOCK_T,)
        tl.store(xa_row + k, a, mask=row_ok & first)
        b = tl.load(b_rows + k * stride_br, mask=live[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc += a[:, None] * b
    for k in range(R_MAX, WIDTH):                                                   # xa's padding columns
        tl.store(xa_row + k, tl.zeros((BLOCK_T,), dtype=tl.float32), mask=row_ok & first)
    base = tl.load(w_ptr + ids[:, None] * stride_w + cols[None, :], mask=in_vocab[:, None] & col_ok[None, :],
                   other=0.0).to(tl.float32)
    y = (base + acc) * embed_scale
    tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def lora_embedding_forward(ids: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                           adapter_index: torch.Tensor, ranks: torch.Tensor, scales: torch.Tensor,
                           embed_scale: float, width: int,
                           out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y (T, d) in weight's dtype, `out` if given, with unit column stride; xa (T, width) fp32). ids,
    adapter_index (T,) int32 or int64 contiguous; weight (V, d) with unit column stride; lora_A (S, r_max, V),
    lora_B (S, d, r_max) any strides, any float dtype; ranks (S,) int32, scales (S,) fp32; width >= r_max."""
    T = ids.shape[0]
    V, D = weight.shape
    r_max = lora_A.shape[1]
    y = torch.empty((T, D), device=weight.device, dtype=weight.dtype) if out is None else out
    xa = torch.empty((T, width), device=weight.device, dtype=torch.float32)
    if T == 0:
        return y, xa
    block_t, block_d, warps = block_sizes(T, D)
    sa, sb = lora_A.stride(), lora_B.stride()
    _lora_embedding_fwd_kernel[(cdiv(T, block_t), cdiv(D, block_d))](
        ids, adapter_index, weight, lora_A, lora_B, ranks, scales, y, xa,
        T, D, V, r_max, width, float(embed_scale),
        weight.stride(0), sa[0], sa[1], sa[2], sb[0], sb[1], sb[2], y.stride(0),
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=warps,
    )
    return y, xa
