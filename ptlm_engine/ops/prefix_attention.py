"""Attention over [prefix ; sequence] (prefix tuning) as torch.library custom ops with autograd, dispatching
to Triton or the reference.

Chain of names: kernels.prefix_attention (Triton kernels + launchers) -> ptlm::prefix_attention_fwd / _bwd
(custom ops, with fake implementations for torch.compile and CUDA graphs) -> prefix_attention_op (validation,
backend choice) -> functional.prefix_attention.

Backward saves the inputs, the output and the fp32 log-sum-exp (B, Hq, Lq) only; the kernels recompute the
probabilities. Its dQ is summed with fp32 atomics in one fused pass by default, or by a separate, bitwise
reproducible pass (dq_mode="split", or dq_mode=None under torch.use_deterministic_algorithms(True)). A shared
prefix passed as an expanded view (batch stride 0) is read in place; its gradient is computed per row, and
autograd's expand backward sums the rows.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ptlm_engine import reference
from ptlm_engine.ops.checks import check_floating, check_like
from ptlm_engine.ops.lora import eager_function, run_op, triton_enabled

try:  # Triton is a Linux-only dependency; without it the op runs the reference.
    from ptlm_engine.kernels import prefix_attention as attention_kernels
except ImportError:  # pragma: no cover - exercised only where triton is absent
    attention_kernels = None


# ------------------------------------------------------------------------------------------ implementations
def _forward(q: Tensor, k: Tensor, v: Tensor, prefix_k: Optional[Tensor], prefix_v: Optional[Tensor],
             prefix_lengths: Optional[Tensor], key_padding_mask: Optional[Tensor], causal: bool,
             scale: float, dq_mode: Optional[str]) -> tuple[Tensor, Tensor]:
    """o (B, Hq, Lq, D) and lse (B, Hq, Lq) fp32 (saved for backward); dq_mode is the backward's."""
    return attention_kernels.prefix_attention_fwd(q, k, v, prefix_k, prefix_v, prefix_lengths, key_padding_mask,
                                                  causal, scale)


def _backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Optional[Tensor], prefix_v: Optional[Tensor],
              prefix_lengths: Optional[Tensor], key_padding_mask: Optional[Tensor], o: Tensor, lse: Tensor,
              causal: bool, scale: float, dq_mode: Optional[str]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv, and per-row dprefix_k, dprefix_v (empty (0,) without a prefix)."""
    return attention_kernels.prefix_attention_bwd(do, q, k, v, prefix_k, prefix_v, prefix_lengths,
                                                  key_padding_mask, o, lse, causal, scale, dq_mode=dq_mode)


# ------------------------------------------------------------------------------------------------ custom ops
# torch.compile and other tracers see these opaque ops (with fake implementations); eager calls take the
# cheaper autograd.Function below, which runs the same implementations with less host overhead per launch.
prefix_attention_fwd = torch.library.custom_op("ptlm::prefix_attention_fwd", _forward, mutates_args=())
prefix_attention_bwd = torch.library.custom_op("ptlm::prefix_attention_bwd", _backward, mutates_args=())


@prefix_attention_fwd.register_fake
def _(q, k, v, prefix_k, prefix_v, prefix_lengths, key_padding_mask, causal, scale, dq_mode):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@prefix_attention_bwd.register_fake
def _(do, q, k, v, prefix_k, prefix_v, prefix_lengths, key_padding_mask, o, lse, causal, scale, dq_mode):
    prefix_shape = (*k.shape[:2], prefix_k.shape[2], k.shape[3]) if prefix_k is not None else (0,)
    return (q.new_empty(q.shape), k.new_empty(k.shape), k.new_empty(k.shape), k.new_empty(prefix_shape),
            k.new_empty(prefix_shape))


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, prefix_lengths, key_padding_mask, causal, scale, dq_mode = inputs
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, prefix_lengths, key_padding_mask, *output)
    ctx.causal, ctx.scale, ctx.dq_mode = causal, scale, dq_mode


def _grads(ctx, do, bwd):
    """The op's input gradients, with `bwd` the custom op (traced) or its implementation (eager)."""
    q, k, v, prefix_k, prefix_v, prefix_lengths, key_padding_mask, o, lse = ctx.saved_tensors
    dq, dk, dv, dpk, dpv = bwd(do, q, k, v, prefix_k, prefix_v, prefix_lengths, key_padding_mask, o, lse,
                               ctx.causal, ctx.scale, ctx.dq_mode)
    need = ctx.needs_input_grad
    grads = (dq, dk, dv) + ((dpk, dpv) if prefix_k is not None else (None, None))
    return (*(g if n else None for g, n in zip(grads, need)), None, None, None, None, None)


torch.library.register_autograd("ptlm::prefix_attention_fwd",
                                lambda ctx, do, _dlse: _grads(ctx, do, prefix_attention_bwd),
                                setup_context=_setup_context)


PrefixAttentionFunction = eager_function("PrefixAttentionFunction", _forward, _setup_context,
                                         lambda ctx, do, _dlse: _grads(ctx, do, _backward))


# ----------------------------------------------------------------------------------------------- entry point
def _check(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor | None, prefix_v: Tensor | None,
           prefix_lengths: Tensor | None, key_padding_mask: Tensor | None) -> None:
    if q.dim() != 4:
        raise ValueError(f"q: expected shape (B, Hq, Lq, D), got {tuple(q.shape)}")
    check_floating("q", q)
    batch, hq, lq, d = q.shape
    if k.dim() != 4 or k.shape[0] != batch or k.shape[3] != d or k.shape[2] < lq:
        raise ValueError(f"k: expected shape ({batch}, Hkv, Lk, {d}) with Lk >= {lq}, got {tuple(k.shape)}")
    hkv, lk = k.shape[1], k.shape[2]
    if hkv < 1 or hq % hkv:
        raise ValueError(f"k: expected a number of heads dividing {hq} (the heads of q), got {hkv}")
    if v.shape != k.shape:
        raise ValueError(f"v: expected shape {tuple(k.shape)} (the shape of k), got {tuple(v.shape)}")
    if (prefix_k is None) != (prefix_v is None):
        raise ValueError("prefix_k, prefix_v: expected both or neither")
    if prefix_k is not None:
        if prefix_k.dim() != 4 or prefix_k.shape[:2] != (batch, hkv) or prefix_k.shape[3] != d:
            raise ValueError(f"prefix_k: expected shape ({batch}, {hkv}, P, {d}), got {tuple(prefix_k.shape)}")
        if prefix_v.shape != prefix_k.shape:
            raise ValueError(f"prefix_v: expected shape {tuple(prefix_k.shape)} (the shape of prefix_k), "
                             f"got {tuple(prefix_v.shape)}")
    if prefix_lengths is not None:
        if prefix_k is None:
            raise ValueError("prefix_lengths: given without prefix_k / prefix_v")
        if prefix_lengths.shape != (batch,) or prefix_lengths.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"prefix_lengths: expected shape ({batch},) of int32, got "
                             f"{tuple(prefix_lengths.shape)} of {prefix_lengths.dtype}")
    if key_padding_mask is not None and (key_padding_mask.shape != (batch, lk)
                                         or key_padding_mask.dtype != torch.bool):
        raise ValueError(f"key_padding_mask: expected shape ({batch}, {lk}) of bool, got "
                         f"{tuple(key_padding_mask.shape)} of {key_padding_mask.dtype}")
    check_like("q", q, {"k": k, "v": v, "prefix_k": prefix_k, "prefix_v": prefix_v})
    check_like("q", q, {"prefix_lengths": prefix_lengths, "key_padding_mask": key_padding_mask}, dtype=False)


def prefix_attention_op(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor | None, prefix_v: Tensor | None,
                        prefix_lengths: Tensor | None, causal: bool, key_padding_mask: Tensor | None,
                        scale: float | None, *, dq_mode: str | None = None) -> Tensor:
    """functional.prefix_attention; dq_mode picks the backward's dQ strategy (see the module docstring)."""
    _check(q, k, v, prefix_k, prefix_v, prefix_lengths, key_padding_mask)
    if attention_kernels is not None and dq_mode is not None and dq_mode not in attention_kernels.DQ_MODES:
        raise ValueError(f"dq_mode: expected one of {attention_kernels.DQ_MODES} or None, got {dq_mode!r}")
    if not (triton_enabled(q) and q.dtype in attention_kernels.SUPPORTED_DTYPES
            and q.shape[3] <= attention_kernels.MAX_HEAD_DIM):
        return reference.prefix_attention(q, k, v, prefix_k, prefix_v, prefix_lengths, causal=causal,
                                          key_padding_mask=key_padding_mask, scale=scale)
    scale = q.shape[3] ** -0.5 if scale is None else float(scale)
    if prefix_lengths is not None and prefix_lengths.dtype != torch.int32:
        prefix_lengths = prefix_lengths.to(torch.int32)
    args = (q, k, v, prefix_k, prefix_v, prefix_lengths, key_padding_mask, bool(causal), scale, dq_mode)
    o, _ = run_op(args, prefix_attention_fwd, PrefixAttentionFunction, _forward, (q, k, v, prefix_k, prefix_v))
    return o
