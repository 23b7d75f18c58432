"""Llama's RMSNorm as torch.library custom ops with autograd, dispatching to Triton or the reference.

Chain of names: kernels.rms_norm (Triton kernels + launchers) -> ptlm::rms_norm_fwd / _bwd (custom ops, with fake
implementations for torch.compile and CUDA graphs) -> rms_norm_op (validation, backend choice) ->
layers.rms_norm.FusedRMSNorm -> functional.rms_norm.

Backward saves x and rstd (one fp32 per row) only; dweight is computed only where weight requires grad (a frozen
base's norms skip its partial sums).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ptlm_engine import reference
from ptlm_engine.ops.checks import check_floating, check_like
from ptlm_engine.ops.lora import eager_function, run_op, triton_enabled

try:  # Triton is a Linux-only dependency; without it every op runs the reference.
    from ptlm_engine.kernels import rms_norm as rms_norm_kernels
except ImportError:  # pragma: no cover - exercised only where triton is absent
    rms_norm_kernels = None


def runs_triton(x: Tensor, weight: Tensor) -> bool:
    """The kernels take fp32 / fp16 / bf16 x and weight (the output in their promoted dtype) and rows up to
    MAX_D; the rest runs the reference."""
    kernels = rms_norm_kernels
    return (triton_enabled(x) and x.dtype in kernels.SUPPORTED_DTYPES and weight.dtype in kernels.SUPPORTED_DTYPES
            and x.shape[-1] <= kernels.MAX_D)


# ------------------------------------------------------------------------------------------ implementations
def _forward(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """x (T, d) -> y (T, d) in promote(x, weight), rstd (T,) fp32 (saved for backward)."""
    return rms_norm_kernels.rms_norm_forward(x, weight, eps)


def _inference(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, None]:
    return rms_norm_kernels.rms_norm_forward(x, weight, eps, store_rstd=False)


def _backward(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, need_dweight: bool) -> tuple[Tensor, Tensor]:
    """dx (T, d); dweight (d,), or an empty tensor without need_dweight."""
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    dx, d_weight = rms_norm_kernels.rms_norm_backward(dy, x, weight, rstd, need_dweight)
    return dx, weight.new_empty((0,)) if d_weight is None else d_weight


# ------------------------------------------------------------------------------------------------ custom ops
# torch.compile and other tracers see these opaque ops (with fake implementations); eager calls take the
# cheaper autograd.Function below, which runs the same implementations with less host overhead per launch.
rms_norm_fwd = torch.library.custom_op("ptlm::rms_norm_fwd", _forward, mutates_args=())
rms_norm_bwd = torch.library.custom_op("ptlm::rms_norm_bwd", _backward, mutates_args=())


@rms_norm_fwd.register_fake
def _(x, weight, eps):
    return (x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype)),
            x.new_empty((x.shape[0],), dtype=torch.float32))


@rms_norm_bwd.register_fake
def _(dy, x, weight, rstd, need_dweight):
    return torch.empty_like(x), torch.empty_like(weight) if need_dweight else weight.new_empty((0,))


def _setup_context(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight, output[1])


def _grads(ctx, dy, bwd):
    """The op's input gradients, with `bwd` the custom op (traced) or its implementation (eager)."""
    x, weight, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, d_weight = bwd(dy, x, weight, rstd, need[1])
    return (dx if need[0] else None), (d_weight if need[1] else None), None


torch.library.register_autograd("ptlm::rms_norm_fwd", lambda ctx, dy, _drstd: _grads(ctx, dy, rms_norm_bwd),
                                setup_context=_setup_context)


RMSNormFunction = eager_function("RMSNormFunction", _forward, _setup_context,
                                 lambda ctx, dy, _drstd: _grads(ctx, dy, _backward), grad_outputs=1)


# ----------------------------------------------------------------------------------------------- entry point
def _check(x: Tensor, weight: Tensor) -> None:
    if x.dim() < 1:
        raise ValueError(f"x: expected shape (..., d), got {tuple(x.shape)}")
    d = x.shape[-1]
    if tuple(weight.shape) != (d,):
        raise ValueError(f"weight: expected shape ({d},) to match x, got {tuple(weight.shape)}")
    check_floating("x", x)
    check_floating("weight", weight)
    check_like("x", x, {"weight": weight}, dtype=False)


def rms_norm_op(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    _check(x, weight)
    if not runs_triton(x, weight):
        return reference.rms_norm(x, weight, eps)
    d = x.shape[-1]
    flat = x.dim() != 2       # 2-D x and y pass as they are: no view nodes in the autograd graph
    x2d = x.reshape(-1, d) if flat else x                                           # (T, d), a view if it can
    x2d = x2d if x2d.stride(-1) == 1 or d == 1 else x2d.contiguous()
    weight = weight if weight.stride(0) == 1 or d == 1 else weight.contiguous()
    y, _ = run_op((x2d, weight, float(eps)), rms_norm_fwd, RMSNormFunction, _inference, (x, weight))
    return y.reshape(x.shape) if flat else y
