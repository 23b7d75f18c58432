"""Multi-adapter LoRA linear: every token picks its own adapter (or none) from stacked slots, in one pass.

Chain of names: kernels.lora_multi (Triton) -> ptlm::lora_linear_multi_fwd / _bwd (custom ops) ->
lora_linear_multi_op -> LoraLinear with a per-row mapping -> functional.lora_linear_multi.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ptlm_engine import reference
from ptlm_engine.ops.checks import (check_adapter_dtypes, check_index_range, check_like, check_table_range,
                                    is_index_dtype, unit_stride)
from ptlm_engine.ops.lora import (_base_grads, as_dtype, eager_function, lora_kernels, run_op,
                                  triton_enabled)

try:
    from ptlm_engine.kernels import lora_multi as multi_kernels
except ImportError:  # pragma: no cover - exercised only where triton is absent
    multi_kernels = None


class LoraSlots(NamedTuple):
    """A layer's adapters stacked where one kernel launch reaches all of them.

    lora_A (S, r_max, d_in) and lora_B (S, d_out, r_max) hold slot s's A and B in their first ranks[s] rows /
    columns and zeros beyond; ranks (S,) int32 and scales (S,) float32 live on the same device. Kernels loop
    only over each slot's own rank, so mixed ranks cost no padding compute. dropouts (S,) float32, the per-slot
    LoRA dropout probability, or None for none (pass it in training mode only, as PEFT applies dropout).
    """
    lora_A: Tensor
    lora_B: Tensor
    ranks: Tensor
    scales: Tensor
    dropouts: Optional[Tensor] = None


def check_slot_shapes(prefix: str, slots: LoraSlots, d_in: int, d_out: int) -> int:
    """The stacked slots' shapes against a layer of d_in -> d_out; returns the slot count S. Errors name each field
    with `prefix` (the grouped op's "slots[g].")."""
    A, B, ranks, scales, dropouts = slots
    if A.dim() != 3 or A.shape[2] != d_in or A.shape[1] < 1:
        raise ValueError(f"{prefix}lora_A: expected stacked slots (S, r_max, {d_in}), got {tuple(A.shape)}")
    S, r_max = A.shape[:2]
    if B.shape != (S, d_out, r_max):        # torch.Size equals the tuple of its sizes
        raise ValueError(f"{prefix}lora_B: expected stacked slots ({S}, {d_out}, {r_max}), got {tuple(B.shape)}")
    for name, t in (("ranks", ranks), ("scales", scales), ("dropouts", dropouts)):
        if t is None and name != "dropouts":
            raise ValueError(f"{prefix}{name}: expected a tensor of shape ({S},), got None")
        if t is not None and t.shape != (S,):
            raise ValueError(f"{prefix}{name}: expected shape ({S},), got {tuple(t.shape)}")
    if not is_index_dtype(ranks.dtype):
        raise ValueError(f"{prefix}ranks: expected integers, got {ranks.dtype}")
    return S


def check_slot_tables(prefix: str, slots: LoraSlots) -> None:
    """The per-slot tables' values (where free: CPU tables, eagerly): ranks in [0, r_max], dropouts in [0, 1)."""
    check_table_range(f"{prefix}ranks", slots.ranks, 0, slots.lora_A.shape[1])
    check_table_range(f"{prefix}dropouts", slots.dropouts, 0.0, 1.0, high_open=True)


def _check(x: Tensor, weight: Tensor, bias: Tensor | None, slots: LoraSlots, adapter_index: Tensor,
           fan_in_fan_out: bool) -> None:
    """Shapes, dtypes and devices only: no torch op runs, since every layer call of a served batch pays this."""
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D tensor, got shape {tuple(weight.shape)}")
    d_out, d_in = (weight.shape[1], weight.shape[0]) if fan_in_fan_out else weight.shape
    if x.dim() < 1 or x.shape[-1] != d_in:
        raise ValueError(f"x: expected shape (..., {d_in}) to match weight, got {tuple(x.shape)}")
    check_slot_shapes("", slots, d_in, d_out)
    A, B, ranks, scales, dropouts = slots
    if bias is not None and bias.shape != (d_out,):
        raise ValueError(f"bias: expected shape ({d_out},), got {tuple(bias.shape)}")
    if adapter_index.shape != x.shape[:-1] or not is_index_dtype(adapter_index.dtype):
        raise ValueError(f"adapter_index: expected integers of shape {tuple(x.shape[:-1])} (one per token), "
                         f"got {adapter_index.dtype} {tuple(adapter_index.shape)}")
    dtype, device = x.dtype, x.device
    # The usual case in a few comparisons; check_like names the first offending tensor otherwise.
    if (weight.dtype == A.dtype == B.dtype == dtype and (bias is None or bias.dtype == dtype)
            and weight.device == A.device == B.device == ranks.device == scales.device == adapter_index.device
            == device and (bias is None or bias.device == device)
            and (dropouts is None or dropouts.device == device)):
        return
    check_like("x", x, {"weight": weight, "bias": bias}, device=False)
    check_adapter_dtypes("x", x, {"lora_A": A, "lora_B": B})
    check_like("x", x, {"weight": weight, "bias": bias, "lora_A": A, "lora_B": B, "ranks": ranks,
                        "scales": scales, "dropouts": dropouts, "adapter_index": adapter_index}, dtype=False)


# ------------------------------------------------------------------------------------------ implementations
def _forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, ranks: Tensor,
             scales: Tensor, adapter_index: Tensor, order: Tensor, bounds: Tensor, dropouts: Optional[Tensor],
             seed: Optional[Tensor], fan_in_fan_out: bool) -> tuple[Tensor, Tensor]:
    """x (T, d_in) -> y (T, d_out), xa (T, r_pad) fp32 = s_a dropout_a(x) A_a^T per token (saved for backward)."""
    w = weight.t() if fan_in_fan_out else weight                                    # (d_out, d_in) view
    # row blocks walk the tokens in slot-sorted order: a block's rows form few runs of one slot
    xs = multi_kernels.tma_sorted_rows(x, w)          # Hopper prefill: the shrink sorts x's rows for TMA
    if xs is None and multi_kernels.one_launch(x.shape[0], lora_A.shape[1]):
        return multi_kernels.lora_multi_linear(x, w, lora_A, lora_B, adapter_index, ranks, scales, bias, order,
                                               dropouts, seed)
    xa = multi_kernels.lora_multi_shrink(x, lora_A, adapter_index, ranks, scales, order, dropouts, seed, x_sorted=xs)
    return multi_kernels.lora_multi_matmul(x, w, xa, lora_B, adapter_index, ranks, bias, order, after_shrink=True,
                                           x_sorted=xs), xa


def _backward(dy: Tensor, x: Tensor, xa: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, ranks: Tensor,
              scales: Tensor, adapter_index: Tensor, order: Tensor, bounds: Tensor, dropouts: Optional[Tensor],
              seed: Optional[Tensor], fan_in_fan_out: bool, need_dx: bool) -> tuple[Tensor, Tensor, Tensor]:
    """g = s_a/(1-p_a) dy B_a (T, r_pad); dx = dy W0 + keep * (g A_a); dA_a = sum_{t in a} g^T (keep * x);
    dB_a = sum_{t in a} dy^T xa. keep: the forward's dropout mask, regenerated from the seed."""
    return backward_into(dy, x, xa, weight, lora_A, lora_B, ranks, scales, adapter_index, order, bounds, dropouts,
                         seed, fan_in_fan_out, need_dx, None)


def backward_into(dy: Tensor, x: Tensor, xa: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, ranks: Tensor,
                  scales: Tensor, adapter_index: Tensor, order: Tensor, bounds: Tensor, dropouts: Optional[Tensor],
                  seed: Optional[Tensor], fan_in_fan_out: bool, need_dx: bool,
                  dx_sum: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """_backward, with dx added into dx_sum (T, d_in) when given, which is then returned as dx: the grouped
    op's sum over its members (in the dx matmuls' epilogues at prefill, no add launch)."""
    w_t = weight if fan_in_fan_out else weight.t()                                  # (d_in, d_out) view
    dys = multi_kernels.tma_sorted_rows(dy, w_t) if need_dx else None
    g = multi_kernels.lora_multi_shrink(dy, lora_B.transpose(1, 2), adapter_index, ranks, scales, order, dropouts,
                                        seed, mask_x=False, x_sorted=dys)
    if need_dx:
        dx = multi_kernels.lora_multi_matmul(dy, w_t, g, lora_A.transpose(1, 2), adapter_index, ranks, None, order,
                                             dropouts, seed, out=dx_sum, accumulate=dx_sum is not None,
                                             after_shrink=True, x_sorted=dys)
    else:
        dx = dy.new_empty((0,)) if dx_sum is None else dx_sum
    r_max = lora_A.shape[1]
    d_a = multi_kernels.lora_multi_weight_grad(x, g, order, bounds, ranks, r_max, dropouts, seed, rank_major=True)
    d_b = multi_kernels.lora_multi_weight_grad(dy, xa, order, bounds, ranks, r_max)
    # fp32 sums, in the slots' layouts: one cast each (none for fp32 slots), contiguous as the fakes say (a copy
    # only for fp32 slots whose r_max the kernels pad)
    return dx, as_dtype(d_a, lora_A.dtype).contiguous(), as_dtype(d_b, lora_B.dtype).contiguous()


# ------------------------------------------------------------------------------------------------ custom ops
lora_linear_multi_fwd = torch.library.custom_op("ptlm::lora_linear_multi_fwd", _forward, mutates_args=())
lora_linear_multi_bwd = torch.library.custom_op("ptlm::lora_linear_multi_bwd", _backward, mutates_args=())


@lora_linear_multi_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, ranks, scales, adapter_index, order, bounds, dropouts, seed, fan_in_fan_out):
    d_out = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    width = multi_kernels.padded_rank(lora_A.shape[1])
    return x.new_empty((x.shape[0], d_out)), x.new_empty((x.shape[0], width), dtype=torch.float32)


@lora_linear_multi_bwd.register_fake
def _(dy, x, xa, weight, lora_A, lora_B, ranks, scales, adapter_index, order, bounds, dropouts, seed,
      fan_in_fan_out, need_dx):
    dx = x.new_empty(x.shape) if need_dx else dy.new_empty((0,))
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B)


def _setup_context(ctx, inputs, output):
    (x, weight, bias, lora_A, lora_B, ranks, scales, adapter_index, order, bounds, dropouts, seed,
     fan_in_fan_out) = inputs
    ctx.save_for_backward(x, output[1], weight, lora_A, lora_B, ranks, scales, adapter_index, order, bounds,
                          dropouts, seed)
    ctx.fan_in_fan_out, ctx.has_bias = fan_in_fan_out, bias is not None


def _grads(ctx, dy, bwd):
    """The op's input gradients, with `bwd` the custom op (traced) or its implementation (eager)."""
    x, xa, weight, lora_A, lora_B, ranks, scales, adapter_index, order, bounds, dropouts, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, d_a, d_b = bwd(dy, x, xa, weight, lora_A, lora_B, ranks, scales, adapter_index, order, bounds, dropouts,
                       seed, ctx.fan_in_fan_out, need[0])
    d_w, d_bias = _base_grads(need, dy, x, ctx.fan_in_fan_out, ctx.has_bias)
    return (dx if need[0] else None), d_w, d_bias, d_a, d_b, None, None, None, None, None, None, None, None


torch.library.register_autograd("ptlm::lora_linear_multi_fwd",
                                lambda ctx, dy, _dxa: _grads(ctx, dy, lora_linear_multi_bwd),
                                setup_context=_setup_context)


# xa is saved for backward, never differentiated: no zero gradient is made for it
LoraLinearMultiFunction = eager_function("LoraLinearMultiFunction", _forward, _setup_context,
                                         lambda ctx, dy, _dxa: _grads(ctx, dy, _backward), grad_outputs=1,
                                         materialize_grads=False)


# ----------------------------------------------------------------------------------------------- entry point
def token_segments(adapter_index: Tensor, num_slots: int) -> tuple[Tensor, Tensor]:
    """(order, bounds): the tokens sorted by slot and each slot's range in that order, computed on the device.

    Every layer of a model sees the same mapping: compute this once per batch and pass it to every call as
    `segments`, instead of letting each call sort the tokens again.
    """
    return multi_kernels.token_segments(adapter_index.reshape(-1).to(torch.int32), num_slots)


def lora_linear_multi_op(x: Tensor, weight: Tensor, bias: Tensor | None, slots: LoraSlots,
                         adapter_index: Tensor, fan_in_fan_out: bool,
                         segments: tuple[Tensor, Tensor] | None = None) -> Tensor:
    _check(x, weight, bias, slots, adapter_index, fan_in_fan_out)
    if segments is None:           # a user's call; a served batch's segments come with an index and tables in range
        check_index_range(adapter_index, slots.lora_A.shape[0])
        check_slot_tables("", slots)
    # Every layer of a served batch pays this path: views and casts only where the inputs need them.
    flat = x.dim() != 2
    x2d = x.reshape(-1, x.shape[-1]) if flat else x                                 # (T, d_in)
    index = adapter_index.reshape(-1) if adapter_index.dim() != 1 else adapter_index  # (T,)
    dropouts = slots.dropouts
    if not (triton_enabled(x) and x.dtype in lora_kernels.SUPPORTED_DTYPES):
        keep = None
        if dropouts is not None:
            keep = torch.rand_like(x2d) >= dropouts[index.clamp_min(0).long()][:, None]
        y = reference.lora_linear_multi(x2d, weight, bias, slots.lora_A, slots.lora_B, slots.scales, index,
                                        fan_in_fan_out, dropouts, keep, slots.ranks)
    else:
        index, bias = unit_stride(as_dtype(index, torch.int32)), unit_stride(bias)
        # The batch's token grouping: shared by every layer (AdapterBatch.tokens); sorted here only when not given.
        order, bounds = token_segments(index, slots.lora_A.shape[0]) if segments is None else segments
        seed = None
        if dropouts is not None:
            dropouts = unit_stride(as_dtype(dropouts, torch.float32))
            seed = torch.randint(0, 2**31 - 1, (1,), device=x.device)
        args = (x2d, weight, bias, slots.lora_A, slots.lora_B, unit_stride(as_dtype(slots.ranks, torch.int32)),
                unit_stride(as_dtype(slots.scales, torch.float32)), index, order, bounds, dropouts, seed,
                fan_in_fan_out)
        y, _ = run_op(args, lora_linear_multi_fwd, LoraLinearMultiFunction, _forward, args[:5])
    return y.reshape(*x.shape[:-1], y.shape[-1]) if flat else y
