"""Fused bottleneck adapter as torch.library custom ops with autograd, dispatching to Triton or the reference.

Chain of names: kernels.bottleneck (Triton kernels + launchers) -> ptlm::bottleneck_fwd / _bwd (custom ops, with
fake implementations for torch.compile and CUDA graphs) -> bottleneck_adapter_op (validation, backend choice)
-> functional.bottleneck_adapter.

Backward saves h and the m-wide pre-activation z only (never a d-wide intermediate); the residual's gradient is
dy itself.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ptlm_engine import reference
from ptlm_engine.ops.checks import check_adapter_dtypes, check_floating, check_like, unit_stride
from ptlm_engine.ops.lora import _needs_grad, as_dtype, eager_function, takes_custom_op, triton_enabled

try:  # Triton is a Linux-only dependency; without it every op runs the reference.
    from ptlm_engine.kernels import bottleneck as bottleneck_kernels
except ImportError:  # pragma: no cover - exercised only where triton is absent
    bottleneck_kernels = None

# Activation name -> code, the codes of BottleneckSlots.acts and of the kernels (RELU, GELU, SILU).
BOTTLENECK_ACT_CODES: dict[str, int] = {name: code for code, name in enumerate(reference.BOTTLENECK_ACTIVATIONS)}


def runs_triton(h: Tensor, width: int) -> bool:
    """The kernels take fp32 / fp16 / bf16 and widths up to their MAX_WIDTH (256); the rest runs the reference."""
    return (triton_enabled(h) and h.dtype in bottleneck_kernels.SUPPORTED_DTYPES
            and width <= bottleneck_kernels.MAX_WIDTH)


# ------------------------------------------------------------------------------------------ implementations
def _forward(h: Tensor, down_weight: Tensor, down_bias: Optional[Tensor], up_weight: Tensor,
             up_bias: Optional[Tensor], residual: Optional[Tensor], scale: float, act: int) -> tuple[Tensor, Tensor]:
    """h (T, d) -> y (T, d), z (T, m) = h Wd^T + bd in h's dtype (saved for backward). The adapter's tensors
    in h's dtype, or float32 master weights, read as h's dtype (a copy of m·d elements each)."""
    wd, bd, wu, bu = (None if t is None else as_dtype(t, h.dtype) for t in (down_weight, down_bias, up_weight, up_bias))
    return bottleneck_kernels.bottleneck_forward(h, wd, bd, wu, bu, scale, act, residual)


def _backward(dy: Tensor, h: Tensor, z: Tensor, down_weight: Tensor, up_weight: Tensor, scale: float, act: int,
              has_residual: bool, need_dh: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dh = [dy +] dz Wd; dWd = dz^T h; dbd = sum dz; dWu = s dy^T a; dbu = s sum dy (dz = s (dy Wu) act'(z)).
    The weight gradients in the weights' dtype: float32 masters get float32 sums, never rounded to h's dtype (an
    fp16 gradient of a GradScaler-scaled loss overflows)."""
    dh, d_wd, d_bd, d_wu, d_bu = bottleneck_kernels.bottleneck_backward(
        dy, h, z, as_dtype(down_weight, h.dtype), as_dtype(up_weight, h.dtype), scale, act, not has_residual, need_dh,
        grad_dtype=down_weight.dtype)
    return (dy.new_empty((0,)) if dh is None else dh), d_wd, d_bd, d_wu, d_bu


# ------------------------------------------------------------------------------------------------ custom ops
# torch.compile and other tracers see these opaque ops (with fake implementations); eager calls take the
# cheaper autograd.Function below, which runs the same implementations with less host overhead per launch.
bottleneck_fwd = torch.library.custom_op("ptlm::bottleneck_fwd", _forward, mutates_args=())
bottleneck_bwd = torch.library.custom_op("ptlm::bottleneck_bwd", _backward, mutates_args=())


@bottleneck_fwd.register_fake
def _(h, down_weight, down_bias, up_weight, up_bias, residual, scale, act):
    return h.new_empty(h.shape), h.new_empty((h.shape[0], down_weight.shape[0]))


@bottleneck_bwd.register_fake
def _(dy, h, z, down_weight, up_weight, scale, act, has_residual, need_dh):
    dh = h.new_empty(h.shape) if need_dh else dy.new_empty((0,))
    m, d = down_weight.shape
    return (dh, torch.empty_like(down_weight), down_weight.new_empty((m,)), torch.empty_like(up_weight),
            up_weight.new_empty((d,)))


def _setup_context(ctx, inputs, output):
    h, down_weight, down_bias, up_weight, up_bias, residual, scale, act = inputs
    ctx.save_for_backward(h, output[1], down_weight, up_weight)
    ctx.scale, ctx.act, ctx.has_residual = scale, act, residual is not None


def _grads(ctx, dy, bwd):
    """The op's input gradients, with `bwd` the custom op (traced) or its implementation (eager)."""
    h, z, down_weight, up_weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    dh, d_wd, d_bd, d_wu, d_bu = bwd(dy, h, z, down_weight, up_weight, ctx.scale, ctx.act, ctx.has_residual,
                                     need[0])
    keep = lambda g, i: g if need[i] else None
    return keep(dh, 0), keep(d_wd, 1), keep(d_bd, 2), keep(d_wu, 3), keep(d_bu, 4), keep(dy, 5), None, None


torch.library.register_autograd("ptlm::bottleneck_fwd", lambda ctx, dy, _dz: _grads(ctx, dy, bottleneck_bwd),
                                setup_context=_setup_context)


BottleneckFunction = eager_function("BottleneckFunction", _forward, _setup_context,
                                    lambda ctx, dy, _dz: _grads(ctx, dy, _backward))


# ----------------------------------------------------------------------------------------------- entry point
def check_activation(act: str) -> int:
    if act not in BOTTLENECK_ACT_CODES:
        raise ValueError(f"act: expected one of {', '.join(map(repr, BOTTLENECK_ACT_CODES))}, got {act!r}")
    return BOTTLENECK_ACT_CODES[act]


def check_same(h: Tensor, named: dict[str, Tensor | None], dtype: bool = True) -> None:
    """Every tensor on h's device (and, with dtype, in h's dtype); h itself floating-point."""
    check_floating("h", h)
    check_like("h", h, named, dtype)


def check_adapter_tensors(h: Tensor, named: dict[str, Tensor | None]) -> None:
    """The adapter's tensors on h's device, in one dtype: h's, or float32 (master weights on a half-precision h)."""
    check_same(h, named, dtype=False)
    check_adapter_dtypes("h", h, named)
    dtypes = {t.dtype for t in named.values() if t is not None}
    if len(dtypes) > 1:
        raise ValueError(f"{', '.join(named)}: expected one dtype, got {sorted(map(str, dtypes))}")


def check_residual(h: Tensor, residual: Tensor | None) -> None:
    if residual is not None and residual.shape != h.shape:
        raise ValueError(f"residual: expected shape {tuple(h.shape)} (the shape of h), got {tuple(residual.shape)}")


def _check(h: Tensor, down_weight: Tensor, down_bias: Tensor | None, up_weight: Tensor, up_bias: Tensor | None,
           residual: Tensor | None) -> None:
    if h.dim() < 1:
        raise ValueError(f"h: expected shape (..., d), got {tuple(h.shape)}")
    d = h.shape[-1]
    if down_weight.dim() != 2 or down_weight.shape[0] < 1 or down_weight.shape[1] != d:
        raise ValueError(f"down_weight: expected shape (m, {d}) with m >= 1, got {tuple(down_weight.shape)}")
    m = down_weight.shape[0]
    if tuple(up_weight.shape) != (d, m):
        raise ValueError(f"up_weight: expected shape ({d}, {m}), got {tuple(up_weight.shape)}")
    if down_bias is not None and tuple(down_bias.shape) != (m,):
        raise ValueError(f"down_bias: expected shape ({m},), got {tuple(down_bias.shape)}")
    if up_bias is not None and tuple(up_bias.shape) != (d,):
        raise ValueError(f"up_bias: expected shape ({d},), got {tuple(up_bias.shape)}")
    check_residual(h, residual)
    check_adapter_tensors(h, {"down_weight": down_weight, "down_bias": down_bias, "up_weight": up_weight,
                              "up_bias": up_bias})
    check_same(h, {"residual": residual})


def bottleneck_adapter_op(h: Tensor, down_weight: Tensor, down_bias: Tensor | None, up_weight: Tensor,
                          up_bias: Tensor | None, act: str, scale: float, residual: Tensor | None) -> Tensor:
    code = check_activation(act)
    _check(h, down_weight, down_bias, up_weight, up_bias, residual)
    if not runs_triton(h, down_weight.shape[0]):
        return reference.bottleneck_adapter(h, down_weight, down_bias, up_weight, up_bias, act, scale, residual)
    flat = h.dim() != 2
    h2d = h.reshape(-1, h.shape[-1]) if flat else h                                  # (T, d), a view if it can
    res2d = residual.reshape(h2d.shape) if flat and residual is not None else residual
    down_bias, up_bias = unit_stride(down_bias), unit_stride(up_bias)     # the kernels read them as contiguous
    args = (h2d, down_weight, down_bias, up_weight, up_bias, res2d, float(scale), code)
    if takes_custom_op():
        y, _ = bottleneck_fwd(*args)
    elif _needs_grad(h, down_weight, down_bias, up_weight, up_bias, residual):
        y, _ = BottleneckFunction.apply(*args)
    else:  # inference: no autograd bookkeeping, and z is not kept
        wd, bd, wu, bu = (None if t is None else as_dtype(t, h.dtype)
                          for t in (down_weight, down_bias, up_weight, up_bias))
        y, _ = bottleneck_kernels.bottleneck_forward(h2d, wd, bd, wu, bu, float(scale), code, res2d, save_z=False)
    return y.reshape(h.shape) if flat else y
