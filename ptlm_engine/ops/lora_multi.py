"""Multi-adapter LoRA linear: every token picks its own adapter (or none) from stacked slots, in one pass.

Chain of names: kernels.lora_multi (Triton) -> ptlm::lora_linear_multi_fwd / _bwd (custom ops) ->
lora_linear_multi_op -> LoraLinear with a per-row mapping -> functional.lora_linear_multi.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ptlm_engine import reference


class LoraSlots(NamedTuple):
    """A layer's adapters stacked where one kernel launch reaches all of them.

    lora_A (S, r_max, d_in) and lora_B (S, d_out, r_max) hold slot s's A and B in their first ranks[s] rows /
    columns and zeros beyond; ranks (S,) int32 and scales (S,) float32 live on the same device. Kernels loop
    only over each slot's own rank, so mixed ranks cost no padding compute.
    """
    lora_A: Tensor
    lora_B: Tensor
    ranks: Tensor
    scales: Tensor


def _check(x: Tensor, weight: Tensor, bias: Tensor | None, slots: LoraSlots, adapter_index: Tensor,
           fan_in_fan_out: bool) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D tensor, got shape {tuple(weight.shape)}")
    d_out, d_in = (weight.shape[1], weight.shape[0]) if fan_in_fan_out else weight.shape
    if x.dim() < 1 or x.shape[-1] != d_in:
        raise ValueError(f"x: expected shape (..., {d_in}) to match weight, got {tuple(x.shape)}")
    A, B = slots.lora_A, slots.lora_B
    if A.dim() != 3 or A.shape[2] != d_in or A.shape[1] < 1:
        raise ValueError(f"lora_A: expected stacked slots (S, r_max, {d_in}), got {tuple(A.shape)}")
    S, r_max = A.shape[:2]
    if tuple(B.shape) != (S, d_out, r_max):
        raise ValueError(f"lora_B: expected stacked slots ({S}, {d_out}, {r_max}), got {tuple(B.shape)}")
    if tuple(slots.ranks.shape) != (S,) or tuple(slots.scales.shape) != (S,):
        raise ValueError(f"ranks and scales: expected shape ({S},), got {tuple(slots.ranks.shape)} and "
                         f"{tuple(slots.scales.shape)}")
    if bias is not None and tuple(bias.shape) != (d_out,):
        raise ValueError(f"bias: expected shape ({d_out},), got {tuple(bias.shape)}")
    if tuple(adapter_index.shape) != tuple(x.shape[:-1]) or adapter_index.dtype.is_floating_point:
        raise ValueError(f"adapter_index: expected integers of shape {tuple(x.shape[:-1])} (one per token), "
                         f"got {adapter_index.dtype} {tuple(adapter_index.shape)}")
    for name, t in {"weight": weight, "bias": bias, "lora_A": A, "lora_B": B}.items():
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"{name}: expected dtype {x.dtype} (the dtype of x), got {t.dtype}")
    for name, t in {"weight": weight, "bias": bias, "lora_A": A, "lora_B": B, "ranks": slots.ranks,
                    "scales": slots.scales, "adapter_index": adapter_index}.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (the device of x), got {t.device}")


def lora_linear_multi_op(x: Tensor, weight: Tensor, bias: Tensor | None, slots: LoraSlots,
                         adapter_index: Tensor, fan_in_fan_out: bool) -> Tensor:
    _check(x, weight, bias, slots, adapter_index, fan_in_fan_out)
    flat = x.dim() != 2
    x2d = x.reshape(-1, x.shape[-1]) if flat else x                                 # (T, d_in)
    index = adapter_index.reshape(-1)                                               # (T,)
    y = reference.lora_linear_multi(x2d, weight, bias, slots.lora_A, slots.lora_B, slots.scales, index,
                                    fan_in_fan_out)
    return y.reshape(*x.shape[:-1], y.shape[-1]) if flat else y
