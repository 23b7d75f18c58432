"""Rotary position embedding (transformers' apply_rotary_pos_emb with rotate_half) as torch.library custom ops
with autograd, dispatching to Triton or the reference.

Chain of names: kernels.rotary (Triton kernel + launcher) -> ptlm::rotary_fwd / _bwd (custom ops, with fake
implementations for torch.compile and CUDA graphs) -> apply_rotary_op (validation, backend choice) ->
functional.apply_rotary (and base_ops' patched apply_rotary_pos_emb).

q and k are read through their strides (HF's transposed views) and never written: the outputs are new contiguous
tensors in the callers' layout. Backward saves cos and sin only; q's and k's gradients come out in q's and k's
memory order (HF's (B, L, H, D) projections: the transpose and view back to the projection are then free).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ptlm_engine import reference
from ptlm_engine.ops.checks import check_floating, check_like
from ptlm_engine.ops.lora import eager_function, run_op, triton_enabled

try:  # Triton is a Linux-only dependency; without it every op runs the reference.
    from ptlm_engine.kernels import rotary as rotary_kernels
except ImportError:  # pragma: no cover - exercised only where triton is absent
    rotary_kernels = None


def runs_triton(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> bool:
    """The kernel takes one dtype (fp32 / fp16 / bf16) for all four, an even head dim and cos / sin that need no
    gradient; the rest runs the reference (PyTorch's type promotion, rotate_half of an odd head dim)."""
    return (triton_enabled(q) and q.dtype in rotary_kernels.SUPPORTED_DTYPES and k.dtype == q.dtype
            and cos.dtype == q.dtype and sin.dtype == q.dtype and q.shape[-1] % 2 == 0
            and not (torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad)))


# ------------------------------------------------------------------------------------------ implementations
def _heads_first(t: Tensor, unsqueeze_dim: int) -> Tensor:
    """The (B, H, L, D) view of q or k (laid out (B, L, H, D) with unsqueeze_dim 2)."""
    return t if unsqueeze_dim == 1 else t.transpose(1, 2)


def _unit_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _tables(cos: Tensor, sin: Tensor, batch: int) -> tuple[Tensor, Tensor]:
    """cos, sin as (B, L, D) views (a batch of 1 broadcast with stride 0)."""
    return (_unit_last(cos).expand(batch, *cos.shape[1:]), _unit_last(sin).expand(batch, *sin.shape[1:]))


def _forward(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int) -> tuple[Tensor, Tensor]:
    """(q_embed, k_embed): contiguous, shaped as q and k."""
    q_out, k_out = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype,
                                                                                     device=k.device)
    cos, sin = _tables(cos, sin, q.shape[0])
    rotary_kernels.rotary(_heads_first(_unit_last(q), unsqueeze_dim), _heads_first(_unit_last(k), unsqueeze_dim),
                          cos, sin, _heads_first(q_out, unsqueeze_dim), _heads_first(k_out, unsqueeze_dim))
    return q_out, k_out


def memory_order(t: Tensor) -> list[int]:
    """t's dims from the outermost in memory to the innermost, the last dim innermost."""
    return sorted(range(t.dim() - 1), key=lambda i: -t.stride(i)) + [t.dim() - 1]


def _empty_in_order(like: Tensor, shape, order: list[int]) -> Tensor:
    """A dense tensor of `shape` whose memory runs in `order` (memory_order of another tensor)."""
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return like.new_empty([shape[i] for i in order]).permute(inverse)


def _backward(dq_out: Tensor, dk_out: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int, q_order: list[int],
              k_order: list[int]) -> tuple[Tensor, Tensor]:
    """(dq, dk), shaped as q and k and laid out in their memory orders."""
    dq = _empty_in_order(dq_out, dq_out.shape, q_order)
    dk = _empty_in_order(dk_out, dk_out.shape, k_order)
    cos, sin = _tables(cos, sin, dq_out.shape[0])
    rotary_kernels.rotary(_heads_first(_unit_last(dq_out), unsqueeze_dim),
                          _heads_first(_unit_last(dk_out), unsqueeze_dim), cos, sin,
                          _heads_first(dq, unsqueeze_dim), _heads_first(dk, unsqueeze_dim), backward=True)
    return dq, dk


# ------------------------------------------------------------------------------------------------ custom ops
# torch.compile and other tracers see these opaque ops (with fake implementations); eager calls take the
# cheaper autograd.Function below, which runs the same implementations with less host overhead per launch.
rotary_fwd = torch.library.custom_op("ptlm::rotary_fwd", _forward, mutates_args=())
rotary_bwd = torch.library.custom_op("ptlm::rotary_bwd", _backward, mutates_args=())


@rotary_fwd.register_fake
def _(q, k, cos, sin, unsqueeze_dim):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@rotary_bwd.register_fake
def _(dq_out, dk_out, cos, sin, unsqueeze_dim, q_order, k_order):
    return _empty_in_order(dq_out, dq_out.shape, q_order), _empty_in_order(dk_out, dk_out.shape, k_order)


def _setup_context(ctx, inputs, output):
    q, k, cos, sin, unsqueeze_dim = inputs
    ctx.save_for_backward(cos, sin)
    ctx.unsqueeze_dim, ctx.q_order, ctx.k_order = unsqueeze_dim, memory_order(q), memory_order(k)


def _grads(ctx, dq_out, dk_out, bwd):
    """The op's input gradients, with `bwd` the custom op (traced) or its implementation (eager)."""
    cos, sin = ctx.saved_tensors
    need = ctx.needs_input_grad
    dq, dk = bwd(dq_out, dk_out, cos, sin, ctx.unsqueeze_dim, ctx.q_order, ctx.k_order)
    return (dq if need[0] else None), (dk if need[1] else None), None, None, None


torch.library.register_autograd("ptlm::rotary_fwd", lambda ctx, dq_out, dk_out: _grads(ctx, dq_out, dk_out, rotary_bwd),
                                setup_context=_setup_context)


RotaryFunction = eager_function("RotaryFunction", _forward, _setup_context,
                                lambda ctx, dq_out, dk_out: _grads(ctx, dq_out, dk_out, _backward))


# ----------------------------------------------------------------------------------------------- entry point
def _check(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int) -> None:
    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"unsqueeze_dim: expected 1 (q (B, H, L, D)) or 2 (q (B, L, H, D)), got {unsqueeze_dim}")
    layout = "(B, H, L, D)" if unsqueeze_dim == 1 else "(B, L, H, D)"
    if q.dim() != 4:
        raise ValueError(f"q: expected a 4-D tensor {layout}, got shape {tuple(q.shape)}")
    b, l, d = q.shape[0], q.shape[3 - unsqueeze_dim], q.shape[3]
    expected = f"({b}, H, {l}, {d})" if unsqueeze_dim == 1 else f"({b}, {l}, H, {d})"
    if k.dim() != 4 or (k.shape[0], k.shape[3 - unsqueeze_dim], k.shape[3]) != (b, l, d):
        raise ValueError(f"k: expected shape {expected} to match q, got {tuple(k.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[0] not in (1, b) or tuple(t.shape[1:]) != (l, d):
            raise ValueError(f"{name}: expected shape ({b}, {l}, {d}) or (1, {l}, {d}), got {tuple(t.shape)}")
    check_floating("q", q)
    check_like("q", q, {"k": k, "cos": cos, "sin": sin}, dtype=False)


def apply_rotary_op(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int) -> tuple[Tensor, Tensor]:
    _check(q, k, cos, sin, unsqueeze_dim)
    if not runs_triton(q, k, cos, sin):
        q_out, k_out = reference.apply_rotary(q, k, cos, sin, unsqueeze_dim)   # laid out as the inputs
        return q_out.contiguous(), k_out.contiguous()
    return apply_checked(q, k, cos, sin, unsqueeze_dim)


def apply_checked(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int) -> tuple[Tensor, Tensor]:
    """The kernel's path for inputs already accepted (apply_rotary_op's checks, or runs_fused): no second check
    per attention call."""
    return run_op((q, k, cos, sin, int(unsqueeze_dim)), rotary_fwd, RotaryFunction, _forward, (q, k))


def runs_fused(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int) -> bool:
    """Whether apply_rotary_op takes these inputs (their shapes) and runs the kernel on them (backend, dtypes):
    base_ops' patched apply_rotary_pos_emb calls transformers' own function otherwise."""
    try:
        _check(q, k, cos, sin, unsqueeze_dim)
    except ValueError:
        return False
    return runs_triton(q, k, cos, sin)
