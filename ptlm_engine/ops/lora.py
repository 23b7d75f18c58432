"""Fused LoRA linear as torch.library custom ops with autograd, dispatching to Triton or the reference.

Chain of names: kernels.lora (Triton kernels + launchers) -> ptlm::lora_linear_fwd / _bwd (custom ops, with
fake implementations for torch.compile and CUDA graphs) -> lora_linear_op (validation, backend choice) ->
layers.lora.LoraLinear -> functional.lora_linear.

Backward saves x and the r-wide xa = s * dropout(x) A^T only (never a d_out-wide intermediate or the dropout
mask: the kernels regenerate it from the seed).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from ptlm_engine import reference
from ptlm_engine.ops.checks import check_adapter_dtypes, check_floating, check_like, unit_stride

try:  # Triton is a Linux-only dependency; without it every op runs the reference.
    from ptlm_engine.kernels import lora as lora_kernels
    _HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    lora_kernels = None
    _HAVE_TRITON = False


def triton_enabled(x: Tensor) -> bool:
    """PTLM_BACKEND=reference|triton forces a backend; unset, Triton runs where it can (CUDA, or the CPU
    interpreter, when TRITON_INTERPRET=1 was set before the kernels were imported) and the PyTorch
    reference runs elsewhere."""
    backend = os.environ.get("PTLM_BACKEND", "")
    if backend == "reference":
        return False
    if backend == "triton":
        if not _HAVE_TRITON:
            raise RuntimeError("PTLM_BACKEND=triton, but triton is not installed")
        return True
    if backend:
        raise ValueError(f"PTLM_BACKEND must be 'reference' or 'triton', got {backend!r}")
    return _HAVE_TRITON and (x.is_cuda or lora_kernels.INTERPRETED)


# ------------------------------------------------------------------------------------------ implementations
def _forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scale: float,
             dropout: float, seed: Optional[Tensor], fan_in_fan_out: bool) -> tuple[Tensor, Tensor]:
    """x (T, d_in) -> y (T, d_out), xa (T, r) fp32 = scale * dropout(x) A^T (saved for backward)."""
    w = weight.t() if fan_in_fan_out else weight                                    # (d_out, d_in) view
    return lora_kernels.lora_matmul(x, w, lora_A, lora_B, scale, bias, seed, x_dropout=dropout)


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in dtype; without a trip into torch when it already is (the usual case: each .to() costs ~1 us)."""
    return t if t.dtype == dtype else t.to(dtype)


def _backward(dy: Tensor, x: Tensor, xa: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float,
              dropout: float, seed: Optional[Tensor], fan_in_fan_out: bool,
              need_dx: bool) -> tuple[Tensor, Tensor, Tensor]:
    """g = s/(1-p) dy B (T, r); dx = dy W0 + keep * (g A); dA = g^T (keep * x); dB = dy^T xa."""
    return backward_into(dy, x, xa, weight, lora_A, lora_B, scale, dropout, seed, fan_in_fan_out, need_dx, None)


def backward_into(dy: Tensor, x: Tensor, xa: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float,
                  dropout: float, seed: Optional[Tensor], fan_in_fan_out: bool, need_dx: bool,
                  dx_sum: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """_backward, with dx added into dx_sum (T, d_in) when given, which is then returned as dx: the grouped
    op's sum over its members, in the dx kernels' epilogues (no add launch)."""
    g_scale = scale / (1.0 - dropout)
    w0 = weight.t() if fan_in_fan_out else weight                                    # (d_out, d_in) view
    if need_dx and lora_kernels.decode_backward_fuses(dy, lora_A):  # dx, dA and dB in one launch
        return lora_kernels.lora_decode_backward(dy, x, xa, w0, lora_A, lora_B, g_scale, seed, dropout, dx_sum)
    if need_dx:  # dx and g in one pass: dy's shrink by B rides along the dy @ W0 K loop
        dx, g = lora_kernels.lora_matmul(dy, w0.t(), lora_B.t(), lora_A.t(), g_scale, None, seed,
                                         out_dropout=dropout, out=dx_sum, accumulate=dx_sum is not None)
    else:
        g = lora_kernels.lora_shrink(dy, lora_B.t(), g_scale)
        dx = dy.new_empty((0,)) if dx_sum is None else dx_sum
    # one launch for both, dA in lora_A's layout (a transposed gradient costs autograd a copy into .grad)
    d_a, d_b = lora_kernels.lora_weight_grads(x, g, dy, xa, seed, dropout, rank_major=True)
    return dx, as_dtype(d_a, lora_A.dtype), as_dtype(d_b, lora_B.dtype)


def _base_grads(need, dy: Tensor, x: Tensor, fan_in_fan_out: bool, has_bias: bool):
    """The frozen base gets gradients only when the user made W0 or the bias trainable."""
    d_w = (x.t() @ dy if fan_in_fan_out else dy.t() @ x) if need[1] else None
    d_bias = dy.sum(0) if has_bias and need[2] else None
    return d_w, d_bias


# ------------------------------------------------------------------------------------------------ custom ops
# torch.compile and other tracers see these opaque ops (with fake implementations); eager calls take the
# cheaper autograd.Function below, which runs the same implementations with less host overhead per launch.
lora_linear_fwd = torch.library.custom_op("ptlm::lora_linear_fwd", _forward, mutates_args=())
lora_linear_bwd = torch.library.custom_op("ptlm::lora_linear_bwd", _backward, mutates_args=())


@lora_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scale, dropout, seed, fan_in_fan_out):
    d_out = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    return x.new_empty((x.shape[0], d_out)), x.new_empty((x.shape[0], lora_A.shape[0]), dtype=torch.float32)


@lora_linear_bwd.register_fake
def _(dy, x, xa, weight, lora_A, lora_B, scale, dropout, seed, fan_in_fan_out, need_dx):
    dx = x.new_empty(x.shape) if need_dx else dy.new_empty((0,))
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scale, dropout, seed, fan_in_fan_out = inputs
    ctx.save_for_backward(x, output[1], weight, lora_A, lora_B, seed)
    ctx.scale, ctx.dropout, ctx.fan_in_fan_out = scale, dropout, fan_in_fan_out
    ctx.has_bias = bias is not None


def _grads(ctx, dy, bwd):
    """The op's input gradients, with `bwd` the custom op (traced) or its implementation (eager)."""
    x, xa, weight, lora_A, lora_B, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, d_a, d_b = bwd(dy, x, xa, weight, lora_A, lora_B, ctx.scale, ctx.dropout, seed, ctx.fan_in_fan_out,
                       need[0])
    d_w, d_bias = _base_grads(need, dy, x, ctx.fan_in_fan_out, ctx.has_bias)
    return (dx if need[0] else None), d_w, d_bias, d_a, d_b, None, None, None, None


torch.library.register_autograd("ptlm::lora_linear_fwd", lambda ctx, dy, _dxa: _grads(ctx, dy, lora_linear_bwd),
                                setup_context=_setup_context)


def first_order(name: str):
    """A Function's backward that refuses create_graph=True: the kernels' gradients are not differentiable
    themselves, so a double backward (gradient penalties, MAML) would miss their terms silently
    (once_differentiable's error node is not connected to the inputs: torch reports them "not used")."""
    def wrap(backward):
        def checked(ctx, *grads):
            if torch.is_grad_enabled():
                raise RuntimeError(f"{name}: ptlm's kernels have no double backward (create_graph=True); "
                                   "PTLM_BACKEND=reference runs the plain-PyTorch ops, which have one")
            return backward(ctx, *grads)
        return checked
    return wrap


def eager_function(name: str, forward, setup_context, backward, grad_outputs: int | None = None,
                   materialize_grads: bool = True) -> type[torch.autograd.Function]:
    """An op's eager autograd Function over the same implementations as its custom ops: forward(*args), then
    setup_context(ctx, args, output) (the custom op's), backward(ctx, *output_grads) -> the inputs' gradients.
    grad_outputs: only the first so many outputs are differentiable (the rest, saved for backward, get no zero
    gradient made for them); materialize_grads=False: backward gets None for an output nobody used.
    Old-style forward(ctx, ...): a Function with a separate setup_context makes torch bind the arguments with
    inspect.signature on every call (tens of microseconds of host time per layer)."""
    def run_forward(ctx, *args):
        out = forward(*args)
        setup_context(ctx, args, out)
        if grad_outputs is not None:
            ctx.mark_non_differentiable(*out[grad_outputs:])
        ctx.set_materialize_grads(materialize_grads)
        return out
    return type(name, (torch.autograd.Function,), {"forward": staticmethod(run_forward),
                                                   "backward": staticmethod(first_order(name)(backward))})


LoraLinearFunction = eager_function("LoraLinearFunction", _forward, _setup_context,
                                    lambda ctx, dy, _dxa: _grads(ctx, dy, _backward))


# ----------------------------------------------------------------------------------------------- entry point
def _check(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
           fan_in_fan_out: bool, dropout: float) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D tensor, got shape {tuple(weight.shape)}")
    d_out, d_in = (weight.shape[1], weight.shape[0]) if fan_in_fan_out else weight.shape
    if x.dim() < 1 or x.shape[-1] != d_in:
        raise ValueError(f"x: expected shape (..., {d_in}) to match weight, got {tuple(x.shape)}")
    if lora_A.dim() != 2 or lora_A.shape[0] < 1 or lora_A.shape[1] != d_in:
        raise ValueError(f"lora_A: expected shape (r, {d_in}) with r >= 1, got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if lora_B.dim() != 2 or tuple(lora_B.shape) != (d_out, r):
        raise ValueError(f"lora_B: expected shape ({d_out}, {r}), got {tuple(lora_B.shape)}")
    if bias is not None and tuple(bias.shape) != (d_out,):
        raise ValueError(f"bias: expected shape ({d_out},), got {tuple(bias.shape)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout}")
    check_like("x", x, {"weight": weight, "bias": bias})
    check_like("x", x, {"lora_A": lora_A, "lora_B": lora_B}, dtype=False)
    check_adapter_dtypes("x", x, {"lora_A": lora_A, "lora_B": lora_B})
    check_floating("x", x)


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def takes_custom_op() -> bool:
    """Whether the ops take their torch.library custom ops: while torch.compile traces.

    torch.func transforms (grad, vmap, jacrev over functional_call) run neither those (torch wraps a custom op's
    autograd in a Function without setup_context, which torch.func refuses) nor the eager Functions: refused
    here by name, rather than with torch's error from deep inside the op."""
    if torch._C._are_functorch_transforms_active():
        raise RuntimeError("torch.func transforms (grad, vmap, jacrev, ...) cannot differentiate ptlm's Triton "
                           "kernels: use loss.backward() / torch.autograd.grad, or PTLM_BACKEND=reference (plain "
                           "PyTorch ops, which torch.func transforms)")
    return torch.compiler.is_compiling()


def run_op(args: tuple, custom_op, function: type[torch.autograd.Function], forward,
           grad_inputs: tuple[Tensor | None, ...]):
    """An op's three paths on the same args: its torch.library custom op while torch.compile traces
    (takes_custom_op), its eager autograd Function where one of grad_inputs needs a gradient, else the bare forward
    (inference: no autograd bookkeeping at all)."""
    if takes_custom_op():
        return custom_op(*args)
    if _needs_grad(*grad_inputs):
        return function.apply(*args)
    return forward(*args)


def lora_linear_op(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                   scale: float, dropout: float, fan_in_fan_out: bool) -> Tensor:
    _check(x, weight, bias, lora_A, lora_B, fan_in_fan_out, dropout)
    # At decode the whole op is a few microseconds of GPU time, so the host path avoids needless views.
    flat = x.dim() != 2
    x2d = x.reshape(-1, x.shape[-1]) if flat else x                                 # (T, d_in), a view if it can
    if not (triton_enabled(x) and x.dtype in lora_kernels.SUPPORTED_DTYPES):
        keep = None
        if dropout > 0.0:
            keep = torch.rand_like(x2d) >= dropout
        y = reference.lora_linear(x2d, weight, bias, lora_A, lora_B, scale, keep, dropout, fan_in_fan_out)
    else:
        seed = torch.randint(0, 2**31 - 1, (1,), device=x.device) if dropout > 0.0 else None
        bias = unit_stride(bias)
        args = (x2d, weight, bias, lora_A, lora_B, float(scale), float(dropout), seed, fan_in_fan_out)
        y, _ = run_op(args, lora_linear_fwd, LoraLinearFunction, _forward, (x, weight, bias, lora_A, lora_B))
    return y.reshape(*x.shape[:-1], y.shape[-1]) if flat else y
