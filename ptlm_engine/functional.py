"""Public functional calls: one per op, dispatching to the Triton kernels or the PyTorch reference."""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ptlm_engine.ops.bottleneck import BOTTLENECK_ACT_CODES, bottleneck_adapter_op  # noqa: F401
from ptlm_engine.ops.bottleneck_multi import BottleneckSlots, bottleneck_adapter_multi_op
from ptlm_engine.ops.cross_entropy import linear_cross_entropy_op
from ptlm_engine.ops.lora import lora_linear_op
from ptlm_engine.ops.lora_embedding import lora_embedding_multi_op, lora_embedding_op
from ptlm_engine.ops.lora_grouped import lora_linear_grouped_op, lora_linear_multi_grouped_op
from ptlm_engine.ops.lora_multi import LoraSlots, lora_linear_multi_op, token_segments  # noqa: F401
from ptlm_engine.ops.prefix_attention import prefix_attention_op
from ptlm_engine.ops.rms_norm import rms_norm_op
from ptlm_engine.ops.rotary import apply_rotary_op
from ptlm_engine.ops.silu_mul import silu_mul_op


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                scale: float = 1.0, dropout: float = 0.0, fan_in_fan_out: bool = False) -> Tensor:
    """y = x W0^T + bias + scale * dropout(x) A^T B^T, fused.

    x (..., d_in); weight (d_out, d_in) — or (d_in, d_out) with fan_in_fan_out=True (GPT-2's Conv1D);
    bias (d_out,) or None; lora_A (r, d_in); lora_B (d_out, r). Dropout (probability `dropout`) applies to
    the LoRA branch only; pass dropout=0.0 outside training, as PEFT does in eval mode.
    """
    return lora_linear_op(x, weight, bias, lora_A, lora_B, scale, dropout, fan_in_fan_out)


def lora_linear_multi(x: Tensor, weight: Tensor, bias: Tensor | None, slots: LoraSlots,
                      adapter_index: Tensor, fan_in_fan_out: bool = False,
                      segments: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Every token with its own adapter: y[t] = x[t] W0^T + bias + s_a x[t] A_a^T B_a^T, a = adapter_index[t].

    x (..., d_in); slots: the layer's stacked adapters (see LoraSlots); adapter_index (...) integer slot per
    token, -1 for the base model alone; segments: token_segments(adapter_index, S), shared by every layer of
    one batch (computed here when None). Gradients reach each slot's A and B from its own tokens only.
    """
    return lora_linear_multi_op(x, weight, bias, slots, adapter_index, fan_in_fan_out, segments)


def lora_embedding(ids: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float = 1.0,
                   padding_idx: int | None = None, embed_scale: float = 1.0) -> Tensor:
    """LoRA on an embedding table: y = embed_scale * (weight[ids] + scale * A[:, ids]^T B^T), fused.

    ids (...) token ids; weight (V, d); lora_A (r, V) and lora_B (d, r), HF PEFT's lora_embedding_A / _B.
    A's column padding_idx gets no gradient, as F.embedding's table row. Returns (..., d) in weight's dtype.
    """
    return lora_embedding_op(ids, weight, lora_A, lora_B, scale, padding_idx, embed_scale)


def lora_embedding_multi(ids: Tensor, weight: Tensor, slots: LoraSlots, adapter_index: Tensor,
                         padding_idx: int | None = None, embed_scale: float = 1.0,
                         segments: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Every token with its own adapter: y[t] = embed_scale * (weight[id_t] + s_a A_a[:, id_t]^T B_a^T).

    slots: stacked adapters as for lora_linear_multi with d_in = V (lora_A (S, r_max, V), lora_B (S, d, r_max);
    dropouts None); adapter_index (...) as ids, -1 for the table alone; segments as for lora_linear_multi.
    """
    return lora_embedding_multi_op(ids, weight, slots, adapter_index, padding_idx, embed_scale, segments)


def lora_linear_grouped(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None],
                        lora_As: Sequence[Tensor | None], lora_Bs: Sequence[Tensor | None], scales: Sequence[float],
                        dropouts: Sequence[float] | None = None, fan_in_fan_out: bool = False) -> list[Tensor]:
    """Up to three projections of the same x (q/k/v, gate/up) in one op: [lora_linear(x, weights[g], ...)].

    x (..., d_in); per member g: weights[g] (d_out_g, d_in) — or (d_in, d_out_g) with fan_in_fan_out — biases[g]
    (d_out_g,) or None, lora_As[g] (r_g, d_in) and lora_Bs[g] (d_out_g, r_g), or both None for a member without an
    adapter (its base output), scales[g], dropouts[g] (None: no dropout). d_out and r may differ between members;
    the base weights stay separate tensors. Returns [y_g (..., d_out_g)], from one autograd node.
    """
    return lora_linear_grouped_op(x, weights, biases, lora_As, lora_Bs, scales, dropouts, fan_in_fan_out)


def lora_linear_multi_grouped(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None],
                              slots: Sequence[LoraSlots | None], adapter_index: Tensor, fan_in_fan_out: bool = False,
                              segments: tuple[Tensor, Tensor] | None = None) -> list[Tensor]:
    """Up to three projections of the same x in one multi-adapter op: [lora_linear_multi(x, weights[g], ...)].

    slots[g]: member g's stacked adapters (every member stacks the same number of slots, since one
    adapter_index indexes all), or None for a member none of the mapped adapters reach (its base output);
    adapter_index and segments as for lora_linear_multi. Returns [y_g (..., d_out_g)], from one autograd node.
    """
    return lora_linear_multi_grouped_op(x, weights, biases, slots, adapter_index, fan_in_fan_out, segments)


def prefix_attention(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor | None = None, prefix_v: Tensor | None = None,
                     prefix_lengths: Tensor | None = None, *, causal: bool = True,
                     key_padding_mask: Tensor | None = None, scale: float | None = None,
                     dq_mode: str | None = None) -> Tensor:
    """Attention over [prefix ; sequence] in one flash pass (prefix tuning), never concatenating the prefix.

    q (B, Hq, Lq, D); k, v (B, Hkv, Lk, D) with Lk >= Lq (a KV cache: query i sits at sequence position
    Lk - Lq + i) and Hq % Hkv == 0 (q head h reads kv head h // (Hq / Hkv)); any strides. prefix_k, prefix_v
    (B, Hkv, P, D) or None: P keys / values every query of a row sees (no causal mask, no rotary), possibly an
    expanded view of one shared prefix (batch stride 0, never copied); prefix_lengths (B,) int32 or None: row
    b sees only its first prefix_lengths[b] prefix entries (0: none; None: all P). causal: query i sees
    sequence keys j <= Lk - Lq + i; key_padding_mask (B, Lk) bool, True = real key, masks the sequence part
    only. scale defaults to D ** -0.5. A query that sees no key at all outputs 0 (gradient 0).
    Returns (B, Hq, Lq, D), contiguous, in q's dtype. The kernels take fp32 / fp16 / bf16 and D <= 256; other
    inputs run the reference (which concatenates). dq_mode picks the backward: "atomic" (one fused pass, dq
    summed with fp32 atomics, run to run not bitwise equal), "split" (a separate dq pass, deterministic) or None
    (split under torch.use_deterministic_algorithms, else atomic).
    """
    return prefix_attention_op(q, k, v, prefix_k, prefix_v, prefix_lengths, causal, key_padding_mask, scale,
                               dq_mode=dq_mode)


def bottleneck_adapter(h: Tensor, down_weight: Tensor, down_bias: Tensor | None, up_weight: Tensor,
                       up_bias: Tensor | None, act: str = "relu", scale: float = 1.0,
                       residual: Tensor | None = None) -> Tensor:
    """y = (h if residual is None else residual) + scale * (act(h Wd^T + bd) Wu^T + bu), fused.

    h (..., d); down_weight (m, d); down_bias (m,) or None; up_weight (d, m); up_bias (d,) or None; act "relu",
    "gelu" (exact, erf: nn.GELU()) or "silu"; residual (..., d) or None. residual=None is the Houlsby / Pfeiffer
    placement (the adapter's output joins its own input); residual=x the parallel one (the adapter reads the
    sublayer's input h, its output joins the sublayer's output `residual`). The Triton kernels take m <= 256.
    """
    return bottleneck_adapter_op(h, down_weight, down_bias, up_weight, up_bias, act, scale, residual)


def bottleneck_adapter_multi(h: Tensor, slots: BottleneckSlots, adapter_index: Tensor, residual: Tensor | None = None,
                             segments: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Every token with its own adapter: y[t] = base[t] + s_a (act_a(h[t] Wd_a^T + bd_a) Wu_a^T + bu_a),
    a = adapter_index[t], base = h or residual; y[t] = base[t] exactly where a = -1 (or slot a is empty).

    h (..., d); slots: the layer's stacked adapters (see BottleneckSlots; activation codes BOTTLENECK_ACT_CODES);
    adapter_index (...) integer slot per token; residual (..., d) or None, as for bottleneck_adapter; segments:
    token_segments(adapter_index, S), shared with every other multi-adapter op of the batch (computed here when
    None). Gradients reach each slot's weights from its own tokens only.
    """
    return bottleneck_adapter_multi_op(h, slots, adapter_index, residual, segments)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """transformers' LlamaRMSNorm, fused: weight * cast(x * rsqrt(mean(x^2) + eps)), statistics in fp32.

    x (..., d), any strides; weight (d,). The normalized x is rounded to x's dtype before the multiply by weight,
    as HF does, so half-precision outputs equal HF's; the output dtype is promote(x, weight). Backward saves x
    and one fp32 per row, and computes weight's gradient only where weight requires grad. The kernels take fp32
    / fp16 / bf16 and d <= 16384; other inputs run the reference.
    """
    return rms_norm_op(x, weight, eps)


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up, fused: a gated MLP's act_fn(gate_proj(x)) * up_proj(x) with act silu (Llama, Mistral,
    Qwen), silu rounded to the dtype before the product as in HF.

    gate, up (..., F) of one shape and dtype, any strides (a fused gate/up projection's column halves are read in
    place). Backward saves gate and up only and returns both gradients from one launch.
    """
    return silu_mul_op(gate, up)


def apply_rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1) -> tuple[Tensor, Tensor]:
    """transformers' apply_rotary_pos_emb (rotate_half), fused, q and k in one launch: (q cos + rotate_half(q) sin,
    k cos + rotate_half(k) sin), each product rounded to the dtype before the sum as in HF.

    unsqueeze_dim=1: q (B, Hq, L, D), k (B, Hk, L, D); unsqueeze_dim=2: q (B, L, Hq, D), k (B, L, Hk, D); any
    strides (HF's transposed views are read in place, never written). cos, sin (B, L, D) or (1, L, D); they get no
    gradient. Returns new contiguous tensors shaped as q and k. The kernel takes one dtype (fp32 / fp16 / bf16)
    for all four and an even D; other inputs run the reference.
    """
    return apply_rotary_op(q, k, cos, sin, unsqueeze_dim)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100,
                         reduction: str = "mean", bias: Tensor | None = None,
                         num_items_in_batch: Tensor | int | None = None) -> Tensor:
    """cross_entropy(hidden @ weight^T + bias, targets) as transformers' causal-LM loss computes it (the logits in
    hidden's dtype, upcast to fp32), without ever holding all logits: rows in chunks, each chunk's logits turned
    into their gradient in place and multiplied out at once (Liger-Kernel's fused linear cross-entropy).

    hidden (..., d); weight (V, d) (an lm_head's); targets (...) integer, ignore_index where no loss is taken;
    bias (V,) or None. reduction "mean" (over the targets not ignored; NaN where all are, as torch gives) or "sum";
    num_items_in_batch (with "mean"): the sum divided by it instead, transformers' convention for gradient
    accumulation. Returns the fp32 loss (float64 for float64 inputs). The gradients are computed in the forward
    (grad_weight only where weight requires grad) and scaled by the backward; under no_grad only the loss is.
    """
    return linear_cross_entropy_op(hidden, weight, targets, ignore_index, reduction, bias, num_items_in_batch)
