"""LoRA on an embedding table (HF PEFT's lora_embedding_A / _B), one adapter for all tokens or one per token.

y[t] = es (E[id_t] + s_a A_a[:, id_t]^T B_a^T), A (r, V), B (d, r), es the embedding's own output scale.

Chain of names: kernels.lora_embedding (Triton forward) -> ptlm::lora_embedding_fwd / _bwd (custom ops) ->
lora_embedding_multi_op / lora_embedding_op -> layers.lora_embedding.LoraEmbedding ->
functional.lora_embedding_multi / lora_embedding.

Backward reuses the multi-adapter LoRA kernels: g = s_a es dy B_a is their shrink (kernels.lora_multi), dB_a
the weight gradient over slot a's tokens of es dy and the saved xa = s_a A_a[:, id]; dA_a[:, v] sums g over
slot a's tokens with id v, a scatter-add (none for padding_idx, as F.embedding, which PEFT's layer calls). It
saves ids, the token index and grouping and the r-wide xa only. No LoRA dropout: PEFT applies none to embeddings.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ptlm_engine import reference
from ptlm_engine.ops.checks import (check_adapter_dtypes, check_floating, check_index_range, check_like, is_index_dtype,
                                    unit_stride)
from ptlm_engine.ops.lora import as_dtype, eager_function, run_op, triton_enabled
from ptlm_engine.ops.lora_multi import LoraSlots, check_slot_shapes, check_slot_tables, token_segments

try:
    from ptlm_engine.kernels import lora_embedding as embedding_kernels
    from ptlm_engine.kernels import lora_multi as multi_kernels
except ImportError:  # pragma: no cover - exercised only where triton is absent
    embedding_kernels = multi_kernels = None


# ------------------------------------------------------------------------------------------ implementations
def _forward(ids: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, ranks: Tensor, scales: Tensor,
             adapter_index: Tensor, order: Tensor, bounds: Tensor, padding_idx: int,
             embed_scale: float) -> tuple[Tensor, Tensor]:
    """ids (T,) -> y (T, d), xa (T, r_pad) fp32 = s_a A_a[:, id] per token (saved for backward)."""
    width = multi_kernels.padded_rank(lora_A.shape[1])
    return embedding_kernels.lora_embedding_forward(ids, weight, lora_A, lora_B, adapter_index, order, ranks, scales,
                                                    embed_scale, width)


def _backward(dy: Tensor, ids: Tensor, xa: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, ranks: Tensor,
              scales: Tensor, adapter_index: Tensor, order: Tensor, bounds: Tensor, padding_idx: int,
              embed_scale: float, need_dw: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dA (S, r_max, V), dB (S, d, r_max), dE (V, d) or an empty tensor without need_dw)."""
    S, r_max, V = lora_A.shape
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    dy = dy if embed_scale == 1.0 else dy * embed_scale
    g = multi_kernels.lora_multi_shrink(dy, lora_B.transpose(1, 2), adapter_index, ranks, scales, order,
                                        mask_x=False)                                      # (T, r_pad) fp32
    ids = ids.long()
    kept = (adapter_index >= 0) & (ids >= 0) & (ids < V)
    if padding_idx >= 0:
        kept = kept & (ids != padding_idx)
    # one row per (slot, vocabulary entry); tokens that give A no gradient add into a last row, then dropped
    rows = torch.where(kept, adapter_index.long() * V + ids, S * V)
    d_a = g.new_zeros((S * V + 1, g.shape[1])).index_add_(0, rows, g)[:-1, :r_max]
    d_a = d_a.view(S, V, r_max).transpose(1, 2)                                            # (S, r_max, V)
    d_b = multi_kernels.lora_multi_weight_grad(dy, xa, order, bounds, ranks, r_max)       # (S, d, r_max) fp32
    d_w = dy.new_empty((0,))
    if need_dw:
        in_table = (ids >= 0) & (ids < V) & (ids != padding_idx)
        d_w = torch.zeros_like(weight, dtype=torch.float32).index_add_(
            0, torch.where(in_table, ids, 0), torch.where(in_table[:, None], dy.float(), 0)).to(weight.dtype)
    return as_dtype(d_a, lora_A.dtype).contiguous(), as_dtype(d_b, lora_B.dtype).contiguous(), d_w


# ------------------------------------------------------------------------------------------------ custom ops
lora_embedding_fwd = torch.library.custom_op("ptlm::lora_embedding_fwd", _forward, mutates_args=())
lora_embedding_bwd = torch.library.custom_op("ptlm::lora_embedding_bwd", _backward, mutates_args=())


@lora_embedding_fwd.register_fake
def _(ids, weight, lora_A, lora_B, ranks, scales, adapter_index, order, bounds, padding_idx, embed_scale):
    width = multi_kernels.padded_rank(lora_A.shape[1])
    return (weight.new_empty((ids.shape[0], weight.shape[1])),
            weight.new_empty((ids.shape[0], width), dtype=torch.float32))


@lora_embedding_bwd.register_fake
def _(dy, ids, xa, weight, lora_A, lora_B, ranks, scales, adapter_index, order, bounds, padding_idx, embed_scale,
      need_dw):
    return torch.empty_like(lora_A), torch.empty_like(lora_B), weight.new_empty(weight.shape if need_dw else (0,))


def _setup_context(ctx, inputs, output):
    ids, weight, lora_A, lora_B, ranks, scales, adapter_index, order, bounds, padding_idx, embed_scale = inputs
    ctx.save_for_backward(ids, output[1], weight, lora_A, lora_B, ranks, scales, adapter_index, order, bounds)
    ctx.padding_idx, ctx.embed_scale = padding_idx, embed_scale


def _grads(ctx, dy, bwd):
    """The op's input gradients, with `bwd` the custom op (traced) or its implementation (eager)."""
    ids, xa, weight, lora_A, lora_B, ranks, scales, adapter_index, order, bounds = ctx.saved_tensors
    need = ctx.needs_input_grad
    d_a, d_b, d_w = bwd(dy, ids, xa, weight, lora_A, lora_B, ranks, scales, adapter_index, order, bounds,
                        ctx.padding_idx, ctx.embed_scale, need[1])
    return (None, d_w if need[1] else None, d_a if need[2] else None, d_b if need[3] else None,
            None, None, None, None, None, None, None)


torch.library.register_autograd("ptlm::lora_embedding_fwd",
                                lambda ctx, dy, _dxa: _grads(ctx, dy, lora_embedding_bwd),
                                setup_context=_setup_context)

# xa is saved for backward, never differentiated: no zero gradient is made for it
LoraEmbeddingFunction = eager_function("LoraEmbeddingFunction", _forward, _setup_context,
                                       lambda ctx, dy, _dxa: _grads(ctx, dy, _backward), grad_outputs=1,
                                       materialize_grads=False)


# ----------------------------------------------------------------------------------------------- entry points
def _check(ids: Tensor, weight: Tensor, slots: LoraSlots, adapter_index: Tensor) -> None:
    if not is_index_dtype(ids.dtype):
        raise ValueError(f"ids: expected integer token ids, got {ids.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected an embedding table (V, d), got shape {tuple(weight.shape)}")
    check_floating("weight", weight)
    V, d = weight.shape
    check_slot_shapes("", slots, V, d)
    check_adapter_dtypes("weight", weight, {"lora_A": slots.lora_A, "lora_B": slots.lora_B})
    if adapter_index.shape != ids.shape or not is_index_dtype(adapter_index.dtype):
        raise ValueError(f"adapter_index: expected integers of shape {tuple(ids.shape)} (one per token), "
                         f"got {adapter_index.dtype} {tuple(adapter_index.shape)}")
    check_like("weight", weight, {"ids": ids, "lora_A": slots.lora_A, "lora_B": slots.lora_B, "ranks": slots.ranks,
                                  "scales": slots.scales, "adapter_index": adapter_index}, dtype=False)
    if ids.device.type == "cpu" and ids.numel() and not torch.compiler.is_compiling():
        low, high = (int(v) for v in torch.aminmax(ids))
        if low < 0 or high >= V:               # as F.embedding (on a GPU a token out of range reads a zero row)
            raise IndexError(f"ids: expected token ids in [0, {V}), got values from {low} to {high}")


def lora_embedding_multi_op(ids: Tensor, weight: Tensor, slots: LoraSlots, adapter_index: Tensor,
                            padding_idx: Optional[int] = None, embed_scale: float = 1.0,
                            segments: tuple[Tensor, Tensor] | None = None) -> Tensor:
    _check(ids, weight, slots, adapter_index)
    if slots.dropouts is not None:
        raise ValueError("dropouts: LoRA on an embedding has no dropout (as in PEFT); pass None")
    if padding_idx is not None:     # as F.embedding: in [-V, V), a negative one counts from the end
        V = weight.shape[0]
        if not -V <= padding_idx < V:
            raise ValueError(f"padding_idx: expected a value in [{-V}, {V}) (the table's rows), got {padding_idx}")
        padding_idx = int(padding_idx) % V
    if segments is None:
        check_index_range(adapter_index, slots.lora_A.shape[0])
        check_slot_tables("", slots)
    flat_ids, index = ids.reshape(-1), adapter_index.reshape(-1)                    # (T,)
    lora_A, lora_B = slots.lora_A, slots.lora_B     # in weight's dtype, or float32 masters (fp32 gradients)
    if not (triton_enabled(weight) and weight.dtype in embedding_kernels.SUPPORTED_DTYPES):
        y = reference.lora_embedding_multi(flat_ids, weight, lora_A, lora_B, slots.scales, index, slots.ranks,
                                           padding_idx, embed_scale)
    else:
        index = unit_stride(as_dtype(index, torch.int32))
        order, bounds = token_segments(index, lora_A.shape[0]) if segments is None else segments
        args = (unit_stride(flat_ids), weight if weight.stride(1) == 1 else weight.contiguous(), lora_A, lora_B,
                unit_stride(as_dtype(slots.ranks, torch.int32)), unit_stride(as_dtype(slots.scales, torch.float32)),
                index, order, bounds, -1 if padding_idx is None else int(padding_idx), float(embed_scale))
        y, _ = run_op(args, lora_embedding_fwd, LoraEmbeddingFunction, _forward, args[1:4])
    return y.reshape(*ids.shape, weight.shape[1])


def lora_embedding_op(ids: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float,
                      padding_idx: Optional[int] = None, embed_scale: float = 1.0) -> Tensor:
    """One adapter for every token: the multi-adapter op over one slot (views, nothing copied)."""
    if lora_A.dim() != 2 or lora_A.shape[0] < 1 or lora_B.dim() != 2:
        raise ValueError(f"lora_A, lora_B: expected (r, V) and (d, r) with r >= 1, got {tuple(lora_A.shape)} and "
                         f"{tuple(lora_B.shape)}")
    device, T = weight.device, ids.numel()
    slots = LoraSlots(lora_A[None], lora_B[None], torch.full((1,), lora_A.shape[0], dtype=torch.int32, device=device),
                      torch.full((1,), float(scale), dtype=torch.float32, device=device))
    index = torch.zeros(ids.shape, dtype=torch.int32, device=device)
    # every token in slot 0, in order: the grouping without a sort (nor a host-to-device copy)
    segments = None
    if triton_enabled(weight):
        segments = (torch.arange(T, dtype=torch.int32, device=device),
                    torch.arange(2, dtype=torch.int32, device=device) * T)      # bounds: slot 0 owns [0, T)
    return lora_embedding_multi_op(ids, weight, slots, index, padding_idx, embed_scale, segments)
