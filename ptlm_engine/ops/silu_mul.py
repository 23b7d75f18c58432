"""The gated MLP's silu(gate) * up as torch.library custom ops with autograd, dispatching to Triton or the
reference.

Chain of names: kernels.silu_mul (Triton kernels + launchers) -> ptlm::silu_mul_fwd / _bwd (custom ops, with fake
implementations for torch.compile and CUDA graphs) -> silu_mul_op (validation, backend choice) ->
functional.silu_mul (base_ops' gated-MLP forward).

Backward saves gate and up only (silu is recomputed), where PyTorch's autograd keeps silu(gate) as well; both
gradients come from one launch.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ptlm_engine import reference
from ptlm_engine.ops.checks import check_floating, check_like
from ptlm_engine.ops.lora import eager_function, run_op, triton_enabled

try:  # Triton is a Linux-only dependency; without it every op runs the reference.
    from ptlm_engine.kernels import silu_mul as silu_mul_kernels
except ImportError:  # pragma: no cover - exercised only where triton is absent
    silu_mul_kernels = None


def runs_triton(gate: Tensor) -> bool:
    return triton_enabled(gate) and gate.dtype in silu_mul_kernels.SUPPORTED_DTYPES


# ------------------------------------------------------------------------------------------ implementations
def _forward(gate: Tensor, up: Tensor) -> Tensor:
    """gate, up (T, F) -> y (T, F)."""
    return silu_mul_kernels.silu_mul_forward(gate, up)


def _backward(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """(dgate, dup), each (T, F)."""
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    return silu_mul_kernels.silu_mul_backward(dy, gate, up)


# ------------------------------------------------------------------------------------------------ custom ops
# torch.compile and other tracers see these opaque ops (with fake implementations); eager calls take the
# cheaper autograd.Function below, which runs the same implementations with less host overhead per launch.
silu_mul_fwd = torch.library.custom_op("ptlm::silu_mul_fwd", _forward, mutates_args=())
silu_mul_bwd = torch.library.custom_op("ptlm::silu_mul_bwd", _backward, mutates_args=())


@silu_mul_fwd.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)


@silu_mul_bwd.register_fake
def _(dy, gate, up):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grads(ctx, dy, bwd):
    """The op's input gradients, with `bwd` the custom op (traced) or its implementation (eager)."""
    gate, up = ctx.saved_tensors
    need = ctx.needs_input_grad
    d_gate, d_up = bwd(dy, gate, up)
    return (d_gate if need[0] else None), (d_up if need[1] else None)


torch.library.register_autograd("ptlm::silu_mul_fwd", lambda ctx, dy: _grads(ctx, dy, silu_mul_bwd),
                                setup_context=_setup_context)


SiluMulFunction = eager_function("SiluMulFunction", _forward, _setup_context,
                                 lambda ctx, dy: _grads(ctx, dy, _backward))


# ----------------------------------------------------------------------------------------------- entry point
def _check(gate: Tensor, up: Tensor) -> None:
    if gate.dim() < 1:
        raise ValueError(f"gate: expected shape (..., F), got {tuple(gate.shape)}")
    if up.shape != gate.shape:
        raise ValueError(f"up: expected shape {tuple(gate.shape)} (the shape of gate), got {tuple(up.shape)}")
    check_floating("gate", gate)
    check_like("gate", gate, {"up": up})


def _rows(t: Tensor) -> Tensor:
    """(T, F), a view where it can be (t itself if 2-D: no view node in the autograd graph), unit column stride."""
    t2d = t if t.dim() == 2 else t.reshape(-1, t.shape[-1])
    return t2d if t2d.stride(-1) == 1 or t2d.shape[-1] == 1 else t2d.contiguous()


def silu_mul_op(gate: Tensor, up: Tensor) -> Tensor:
    _check(gate, up)
    if not runs_triton(gate):
        return reference.silu_mul(gate, up)
    y = run_op((_rows(gate), _rows(up)), silu_mul_fwd, SiluMulFunction, _forward, (gate, up))
    return y if gate.dim() == 2 else y.reshape(gate.shape)
