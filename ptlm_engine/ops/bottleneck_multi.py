"""Multi-adapter bottleneck adapters: every token picks its own adapter (or none) from stacked slots, in one pass.

Chain of names: kernels.bottleneck_multi (Triton) -> ptlm::bottleneck_multi_fwd / _bwd (custom ops) ->
bottleneck_adapter_multi_op -> functional.bottleneck_adapter_multi.

Backward saves h and z (T, m_max) only; each slot's weight gradients come from its own tokens, so a mixed batch
trains several adapters at once.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ptlm_engine import reference
from ptlm_engine.ops.bottleneck import check_adapter_tensors, check_residual, check_same, runs_triton
from ptlm_engine.ops.checks import check_index_range, check_table_range, is_index_dtype, unit_stride
from ptlm_engine.ops.lora import _needs_grad, as_dtype, first_order, takes_custom_op
from ptlm_engine.ops.lora_multi import token_segments

try:
    from ptlm_engine.kernels import bottleneck_multi as multi_kernels
except ImportError:  # pragma: no cover - exercised only where triton is absent
    multi_kernels = None


class BottleneckSlots(NamedTuple):
    """A layer's bottleneck adapters stacked where one kernel launch reaches all of them.

    down_weight (S, m_max, d), down_bias (S, m_max), up_weight (S, d, m_max) and up_bias (S, d), in h's dtype,
    hold slot s's adapter in its first sizes[s] rows / columns and zeros beyond; sizes (S,) int32 widths (0: an
    empty slot, whose tokens pass through unchanged), scales (S,) float32 and acts (S,) int32 activation codes
    (BOTTLENECK_ACT_CODES: 0 relu, 1 gelu, 2 silu) live on h's device. Kernels loop only over each slot's own
    width, so mixed widths cost no padding to m_max.
    """
    down_weight: Tensor
    down_bias: Tensor
    up_weight: Tensor
    up_bias: Tensor
    sizes: Tensor
    scales: Tensor
    acts: Tensor


def _check(h: Tensor, slots: BottleneckSlots, adapter_index: Tensor, residual: Tensor | None) -> None:
    if h.dim() < 1:
        raise ValueError(f"h: expected shape (..., d), got {tuple(h.shape)}")
    d = h.shape[-1]
    wd = slots.down_weight
    if wd.dim() != 3 or wd.shape[1] < 1 or wd.shape[2] != d:
        raise ValueError(f"down_weight: expected stacked slots (S, m_max, {d}) with m_max >= 1, got {tuple(wd.shape)}")
    S, m_max = wd.shape[:2]
    expected = {"down_bias": (S, m_max), "up_weight": (S, d, m_max), "up_bias": (S, d), "sizes": (S,),
                "scales": (S,), "acts": (S,)}
    for name, shape in expected.items():
        if tuple(getattr(slots, name).shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(getattr(slots, name).shape)}")
    for name in ("sizes", "acts"):
        if not is_index_dtype(getattr(slots, name).dtype):
            raise ValueError(f"{name}: expected integers, got {getattr(slots, name).dtype}")
    if tuple(adapter_index.shape) != tuple(h.shape[:-1]) or not is_index_dtype(adapter_index.dtype):
        raise ValueError(f"adapter_index: expected integers of shape {tuple(h.shape[:-1])} (one per token), "
                         f"got {adapter_index.dtype} {tuple(adapter_index.shape)}")
    check_residual(h, residual)
    check_adapter_tensors(h, {"down_weight": wd, "down_bias": slots.down_bias, "up_weight": slots.up_weight,
                              "up_bias": slots.up_bias})
    check_same(h, {"residual": residual})
    check_same(h, {"sizes": slots.sizes, "scales": slots.scales, "acts": slots.acts, "adapter_index": adapter_index},
               dtype=False)


# ------------------------------------------------------------------------------------------ implementations
def _slot_blocks(T: int) -> bool:
    """Row passes walk blocks of one slot's rows at prefill, where a block of unsorted tokens would hold many
    slots; at decode row blocks of the batch as it comes, their distinct slots spread over programs."""
    return T > multi_kernels.DECODE_MAX_T


def _forward(h: Tensor, down_weight: Tensor, down_bias: Tensor, up_weight: Tensor, up_bias: Tensor, sizes: Tensor,
             scales: Tensor, acts: Tensor, adapter_index: Tensor, order: Tensor, bounds: Tensor,
             residual: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """h (T, d) -> y (T, d), z (T, m_max) per token's own slot and width (saved for backward)."""
    segments = (order, bounds) if _slot_blocks(h.shape[0]) else None
    wd, bd, wu, bu = (as_dtype(t, h.dtype) for t in (down_weight, down_bias, up_weight, up_bias))  # fp32 masters
    return multi_kernels.bottleneck_multi_forward(h, wd, bd, wu, bu, sizes, scales, acts, adapter_index, segments,
                                                  residual)


def _backward(dy: Tensor, h: Tensor, z: Tensor, down_weight: Tensor, up_weight: Tensor, sizes: Tensor,
              scales: Tensor, acts: Tensor, adapter_index: Tensor, order: Tensor, bounds: Tensor, has_residual: bool,
              need_dh: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per token as the one-adapter op with its own slot; each slot's weight gradients sum over its tokens (float32
    sums, in the slots' dtype: float32 masters' are never rounded to h's)."""
    dh, d_wd, d_bd, d_wu, d_bu = multi_kernels.bottleneck_multi_backward(
        dy, h, z, as_dtype(down_weight, h.dtype), as_dtype(up_weight, h.dtype), sizes, scales, acts, adapter_index,
        order, bounds, not has_residual, need_dh, _slot_blocks(h.shape[0]))
    dtype = down_weight.dtype
    return (dy.new_empty((0,)) if dh is None else dh), d_wd.to(dtype), d_bd.to(dtype), d_wu.to(dtype), d_bu.to(dtype)


# ------------------------------------------------------------------------------------------------ custom ops
bottleneck_multi_fwd = torch.library.custom_op("ptlm::bottleneck_multi_fwd", _forward, mutates_args=())
bottleneck_multi_bwd = torch.library.custom_op("ptlm::bottleneck_multi_bwd", _backward, mutates_args=())


@bottleneck_multi_fwd.register_fake
def _(h, down_weight, down_bias, up_weight, up_bias, sizes, scales, acts, adapter_index, order, bounds, residual):
    return h.new_empty(h.shape), h.new_empty((h.shape[0], down_weight.shape[1]))


@bottleneck_multi_bwd.register_fake
def _(dy, h, z, down_weight, up_weight, sizes, scales, acts, adapter_index, order, bounds, has_residual, need_dh):
    dh = h.new_empty(h.shape) if need_dh else dy.new_empty((0,))
    S, m_max, d = down_weight.shape
    return (dh, torch.empty_like(down_weight), down_weight.new_empty((S, m_max)), torch.empty_like(up_weight),
            up_weight.new_empty((S, d)))


def _setup_context(ctx, inputs, output):
    h, down_weight, down_bias, up_weight, up_bias, sizes, scales, acts, adapter_index, order, bounds, residual = inputs
    ctx.save_for_backward(h, output[1], down_weight, up_weight, sizes, scales, acts, adapter_index, order, bounds)
    ctx.has_residual = residual is not None


def _grads(ctx, dy, bwd):
    """The op's input gradients, with `bwd` the custom op (traced) or its implementation (eager)."""
    h, z, down_weight, up_weight, sizes, scales, acts, adapter_index, order, bounds = ctx.saved_tensors
    need = ctx.needs_input_grad
    dh, d_wd, d_bd, d_wu, d_bu = bwd(dy, h, z, down_weight, up_weight, sizes, scales, acts, adapter_index, order,
                                     bounds, ctx.has_residual, need[0])
    keep = lambda g, i: g if need[i] else None
    return (keep(dh, 0), keep(d_wd, 1), keep(d_bd, 2), keep(d_wu, 3), keep(d_bu, 4), None, None, None, None, None,
            None, keep(dy, 11))


torch.library.register_autograd("ptlm::bottleneck_multi_fwd",
                                lambda ctx, dy, _dz: _grads(ctx, dy, bottleneck_multi_bwd),
                                setup_context=_setup_context)


class BottleneckMultiFunction(torch.autograd.Function):
    """Eager autograd path over the same implementations as the custom ops."""

    @staticmethod
    def forward(h, down_weight, down_bias, up_weight, up_bias, sizes, scales, acts, adapter_index, order, bounds,
                residual):
        return _forward(h, down_weight, down_bias, up_weight, up_bias, sizes, scales, acts, adapter_index, order,
                        bounds, residual)

    setup_context = staticmethod(_setup_context)

    @staticmethod
    @first_order("BottleneckMultiFunction")
    def backward(ctx, dy, _dz):
        return _grads(ctx, dy, _backward)


# ----------------------------------------------------------------------------------------------- entry point
def bottleneck_adapter_multi_op(h: Tensor, slots: BottleneckSlots, adapter_index: Tensor,
                                residual: Tensor | None = None,
                                segments: tuple[Tensor, Tensor] | None = None) -> Tensor:
    _check(h, slots, adapter_index, residual)
    if segments is None:           # a user's call; a served batch's segments come with an index and tables in range
        check_index_range(adapter_index, slots.down_weight.shape[0])
        check_table_range("sizes", slots.sizes, 0, slots.down_weight.shape[1])
        check_table_range("acts", slots.acts, 0, len(reference.BOTTLENECK_ACTIVATIONS) - 1)
    flat = h.dim() != 2
    h2d = h.reshape(-1, h.shape[-1]) if flat else h                                  # (T, d)
    res2d = residual.reshape(h2d.shape) if flat and residual is not None else residual
    index = adapter_index.reshape(-1)                                                # (T,)
    wd, bd, wu, bu = slots.down_weight, slots.down_bias, slots.up_weight, slots.up_bias
    if not runs_triton(h, wd.shape[1]):
        y = reference.bottleneck_adapter_multi(h2d, wd, bd, wu, bu, slots.sizes, slots.scales, slots.acts, index,
                                               res2d)
        return y.reshape(h.shape) if flat else y
    index = unit_stride(index.to(torch.int32))
    sizes, scales, acts = (unit_stride(t.to(dtype)) for t, dtype in
                           ((slots.sizes, torch.int32), (slots.scales, torch.float32), (slots.acts, torch.int32)))
    training = takes_custom_op() or _needs_grad(h, wd, bd, wu, bu, residual)
    if not training:  # inference: no autograd bookkeeping, z is not kept, and decode needs no sort at all
        if not _slot_blocks(h2d.shape[0]):
            segments = None
        elif segments is None:
            segments = token_segments(index, wd.shape[0])
        y, _ = multi_kernels.bottleneck_multi_forward(h2d, *(as_dtype(t, h.dtype) for t in (wd, bd, wu, bu)), sizes,
                                                      scales, acts, index, segments, res2d, save_z=False)
        return y.reshape(h.shape) if flat else y
    order, bounds = token_segments(index, wd.shape[0]) if segments is None else segments
    args = (h2d, wd, bd, wu, bu, sizes, scales, acts, index, order, bounds, res2d)
    if takes_custom_op():
        y, _ = bottleneck_multi_fwd(*args)
    else:
        y, _ = BottleneckMultiFunction.apply(*args)
    return y.reshape(h.shape) if flat else y
