"""Public functional calls: one per op, dispatching to the Triton kernels or the PyTorch reference."""
from __future__ import annotations

from torch import Tensor

from ptlm_engine.ops.lora import lora_linear_op
from ptlm_engine.ops.lora_multi import LoraSlots, lora_linear_multi_op, token_segments  # noqa: F401


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
