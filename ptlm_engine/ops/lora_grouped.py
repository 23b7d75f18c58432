"""Grouped LoRA linear: the projections of one block that share their input (q/k/v, gate/up) in one op call.

Chain of names: kernels.lora_grouped (Triton) -> ptlm::lora_linear_grouped_fwd / _bwd and
ptlm::lora_linear_multi_grouped_fwd / _bwd (custom ops, with fakes) -> lora_linear_grouped_op /
lora_linear_multi_grouped_op (validation, backend choice) -> layers.lora_group.ProjectionGroup ->
functional.lora_linear_grouped / lora_linear_multi_grouped.

Forward: one kernel launch for the whole group at decode, two at prefill (the members' shared shrink, then the
grouped matmul); the multi-adapter op always two. All members' outputs come from one autograd node. Backward
takes each member's own output gradient and sums the members' dx; a member without an adapter costs one dy W
GEMM. The multi-adapter op, and the single-adapter op at decode, run each member's backward of ops.lora_multi /
ops.lora (ops.lora's is one launch at decode). At prefill the single-adapter op computes all members' g = s dy B
in one launch (kernels.lora_grouped's shrink each), each member's dx GEMM on its g, and all members' dA and dB in
one more launch: G + 2 launches where the members' own backwards take 3G. Every member's dx kernel adds into the
members' sum in its epilogue (no add launches).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

import torch
from torch import Tensor

from ptlm_engine import reference
from ptlm_engine.ops import lora as lora_ops
from ptlm_engine.ops import lora_multi as multi_ops
from ptlm_engine.ops.checks import (check_adapter_dtypes, check_floating, check_index_range, check_like,
                                   is_index_dtype, unit_stride)
from ptlm_engine.ops.lora import _base_grads, as_dtype, first_order, lora_kernels, takes_custom_op, triton_enabled
from ptlm_engine.ops.lora_multi import LoraSlots, check_slot_shapes, check_slot_tables, token_segments

try:
    from ptlm_engine.kernels import lora_grouped as grouped_kernels
except ImportError:  # pragma: no cover - exercised only where triton is absent
    grouped_kernels = None

MAX_MEMBERS = 3  # the kernels take up to three members (q, k, v)


# ------------------------------------------------------------------------------------------------ validation
def _check_members(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None], fan_in_fan_out: bool,
                   **per_member: Sequence) -> list[int]:
    """What both ops check: member count, x against every weight, biases, dtypes and devices. Returns d_out_g."""
    G = len(weights)
    if not 1 <= G <= MAX_MEMBERS:
        raise ValueError(f"weights: expected 1 to {MAX_MEMBERS} members sharing x, got {G}")
    for name, seq in {"biases": biases, **per_member}.items():
        if len(seq) != G:
            raise ValueError(f"{name}: expected one entry per member ({G}), got {len(seq)}")
    check_floating("x", x)
    d_outs = []
    for g, (w, b) in enumerate(zip(weights, biases)):
        if w.dim() != 2:
            raise ValueError(f"weights[{g}]: expected a 2-D tensor, got shape {tuple(w.shape)}")
        d_out, d_in = (w.shape[1], w.shape[0]) if fan_in_fan_out else w.shape
        if x.dim() < 1 or x.shape[-1] != d_in:
            raise ValueError(f"x: expected shape (..., {d_in}) to match weights[{g}], got {tuple(x.shape)}")
        if b is not None and b.shape != (d_out,):
            raise ValueError(f"biases[{g}]: expected shape ({d_out},), got {tuple(b.shape)}")
        if not (w.dtype == x.dtype and w.device == x.device
                and (b is None or (b.dtype == x.dtype and b.device == x.device))):
            check_like("x", x, {f"weights[{g}]": w, f"biases[{g}]": b})
        d_outs.append(d_out)
    return d_outs


def _check(x: Tensor, weights, biases, lora_As, lora_Bs, scales, dropouts, fan_in_fan_out: bool) -> None:
    d_outs = _check_members(x, weights, biases, fan_in_fan_out, lora_As=lora_As, lora_Bs=lora_Bs, scales=scales,
                            dropouts=dropouts)
    d_in = x.shape[-1]
    for g, (a, b, p) in enumerate(zip(lora_As, lora_Bs, dropouts)):
        if (a is None) != (b is None):
            raise ValueError(f"lora_As[{g}], lora_Bs[{g}]: expected both tensors or both None (no adapter)")
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropouts[{g}]: expected a probability in [0, 1), got {p}")
        if a is None:
            continue
        if a.dim() != 2 or a.shape[0] < 1 or a.shape[1] != d_in:
            raise ValueError(f"lora_As[{g}]: expected shape (r, {d_in}) with r >= 1, got {tuple(a.shape)}")
        if b.dim() != 2 or b.shape != (d_outs[g], a.shape[0]):
            raise ValueError(f"lora_Bs[{g}]: expected shape ({d_outs[g]}, {a.shape[0]}), got {tuple(b.shape)}")
        if a.dtype in (x.dtype, torch.float32) and b.dtype in (x.dtype, torch.float32) and \
                a.device == b.device == x.device:
            continue                                  # the usual case; else the checks below name the tensor
        check_like("x", x, {f"lora_As[{g}]": a, f"lora_Bs[{g}]": b}, dtype=False)
        check_adapter_dtypes("x", x, {f"lora_As[{g}]": a, f"lora_Bs[{g}]": b})


def _check_multi(x: Tensor, weights, biases, slots: Sequence[LoraSlots | None], adapter_index: Tensor,
                 fan_in_fan_out: bool) -> None:
    """Shapes, dtypes and devices; no torch op runs (every grouped layer call of a served batch pays this)."""
    d_outs = _check_members(x, weights, biases, fan_in_fan_out, slots=slots)
    d_in = x.shape[-1]
    if adapter_index.shape != x.shape[:-1] or not is_index_dtype(adapter_index.dtype):
        raise ValueError(f"adapter_index: expected integers of shape {tuple(x.shape[:-1])} (one per token), "
                         f"got {adapter_index.dtype} {tuple(adapter_index.shape)}")
    dtype, device = x.dtype, x.device
    if adapter_index.device != device:
        check_like("x", x, {"adapter_index": adapter_index}, dtype=False)
    S = None
    for g, s in enumerate(slots):
        if s is None:
            continue
        member_S = check_slot_shapes(f"slots[{g}].", s, d_in, d_outs[g])
        if S is not None and member_S != S:
            raise ValueError(f"slots: every member must stack the same number of slots (one mapping indexes all), "
                             f"got {sorted({S, member_S})}")
        S = member_S
        A, B, ranks, scales, dropouts = s
        # The usual case in a few comparisons; check_like names the first offending tensor otherwise.
        if (A.dtype == B.dtype == dtype and A.device == B.device == ranks.device == scales.device == device
                and (dropouts is None or dropouts.device == device)):
            continue
        check_adapter_dtypes("x", x, {f"slots[{g}].lora_A": A, f"slots[{g}].lora_B": B})
        check_like("x", x, {f"slots[{g}].ranks": ranks, f"slots[{g}].scales": scales,
                            f"slots[{g}].dropouts": dropouts}, dtype=False)


# ---------------------------------------------------------------------------------- single adapter: impls
# A member's absent tensor (no bias, no adapter, no dropout) is None, or, inside torch.compile, an empty
# placeholder: the custom ops' autograd treats a list holding a None as one opaque argument, so gradients would
# not reach the other members' tensors in it.
def _given(t: Optional[Tensor]) -> bool:
    return t is not None and t.numel() > 0


def _present(seq: Sequence[Optional[Tensor]]) -> list[Optional[Tensor]]:
    """The list with placeholders read as None."""
    return [t if _given(t) else None for t in seq]


def _placeholders(seq: Sequence[Optional[Tensor]], x: Tensor) -> list[Tensor]:
    """The list with each None replaced by an empty placeholder (for the traced custom ops)."""
    return [x.new_empty((0,)) if t is None else t for t in seq]


def _no_xa(x: Tensor) -> Tensor:
    """The xa output of a member without an adapter: (T, 0) fp32 (an op output cannot be None)."""
    return x.new_empty((x.shape[0], 0), dtype=torch.float32)


def _member_seeds(seeds: Optional[Tensor], on: Sequence[bool]) -> list[Optional[Tensor]]:
    """Member g's dropout seed: seeds[g] as a (1,) view where it draws a mask, else None."""
    return [seeds[g:g + 1] if seeds is not None and flag else None for g, flag in enumerate(on)]


def _dx_base(dy: Tensor, weight: Tensor, fan_in_fan_out: bool, dx: Optional[Tensor]) -> Tensor:
    """dx + dy W0 for a member without an adapter (one GEMM adding into dx), or dy W0 when dx is None."""
    w0 = weight.t() if fan_in_fan_out else weight                                          # (d_out, d_in)
    return dy @ w0 if dx is None else dx.addmm_(dy, w0)


def _sum_members(dys: list[Optional[Tensor]], x: Tensor, weights: list[Tensor], lora_As: list[Optional[Tensor]],
                 fan_in_fan_out: bool, need_dx: bool,
                 member_backward: Callable[[int, Tensor, Optional[Tensor]], tuple[Optional[Tensor], Tensor, Tensor]]
                 ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """(dx or an empty tensor, [dA_g], [dB_g]) from each member's backward on its own dy (None: that output got
    no gradient), member_backward(g, dy, dx) -> (dx plus the member's part (into dx where the kernel adds into
    its output), or None without dx; dA_g, dB_g) for members with an adapter; the base dx alone, and empty
    dA_g / dB_g, for the others."""
    dx = None
    d_as, d_bs = [], []
    for g, (dy, a) in enumerate(zip(dys, lora_As)):
        if dy is None or a is None:
            d_as.append(x.new_empty((0,)))
            d_bs.append(x.new_empty((0,)))
            if dy is not None and need_dx:
                dx = _dx_base(dy, weights[g], fan_in_fan_out, dx)
        else:
            total, d_a, d_b = member_backward(g, dy, dx)
            dx = dx if total is None else total
            d_as.append(d_a)
            d_bs.append(d_b)
    if dx is None:
        dx = x.new_zeros(x.shape) if need_dx else x.new_empty((0,))
    return dx, d_as, d_bs


def _forward(x: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]], lora_As: list[Optional[Tensor]],
             lora_Bs: list[Optional[Tensor]], scales: list[float], dropouts: list[float], seeds: Optional[Tensor],
             fan_in_fan_out: bool) -> tuple[list[Tensor], list[Tensor]]:
    """x (T, d_in) -> ([y_g (T, d_out_g)], [xa_g (T, r_g) fp32 = s_g dropout_g(x) A_g^T, saved for backward])."""
    biases, lora_As, lora_Bs = _present(biases), _present(lora_As), _present(lora_Bs)
    ws = [w.t() if fan_in_fan_out else w for w in weights]                          # (d_out_g, d_in) views
    ys, xas = grouped_kernels.lora_grouped_matmul(x, ws, lora_As, lora_Bs, scales, biases,
                                                  _member_seeds(seeds, [p > 0.0 for p in dropouts]), dropouts)
    return ys, [_no_xa(x) if xa is None else xa for xa in xas]


def _backward(dys: list[Optional[Tensor]], x: Tensor, xas: list[Tensor], weights: list[Tensor],
              lora_As: list[Optional[Tensor]], lora_Bs: list[Optional[Tensor]], scales: list[float],
              dropouts: list[float], seeds: Optional[Tensor], fan_in_fan_out: bool,
              need_dx: bool) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Each member's LoRA backward on its own dy (None: that output got no gradient); dx summed.
    Returns (dx or an empty tensor, [dA_g], [dB_g]) with empty tensors for members without an adapter."""
    lora_As, lora_Bs = _present(lora_As), _present(lora_Bs)
    live = [g for g, (dy, a) in enumerate(zip(dys, lora_As)) if dy is not None and a is not None]
    if not any(need_dx and lora_kernels.decode_backward_fuses(dys[g], lora_As[g]) for g in live):
        return _grouped_backward(dys, x, xas, weights, lora_As, lora_Bs, scales, dropouts, seeds, fan_in_fan_out,
                                 need_dx, live)

    def member_backward(g, dy, dx):  # decode: ops.lora's one-launch backward per member, adding into dx
        seed = seeds[g:g + 1] if dropouts[g] > 0.0 else None
        return lora_ops.backward_into(dy, x, xas[g], weights[g], lora_As[g], lora_Bs[g], scales[g], dropouts[g],
                                      seed, fan_in_fan_out, need_dx, dx)
    return _sum_members(dys, x, weights, lora_As, fan_in_fan_out, need_dx, member_backward)


def _grouped_backward(dys: list[Optional[Tensor]], x: Tensor, xas: list[Tensor], weights: list[Tensor],
                      lora_As: list[Optional[Tensor]], lora_Bs: list[Optional[Tensor]], scales: list[float],
                      dropouts: list[float], seeds: Optional[Tensor], fan_in_fan_out: bool, need_dx: bool,
                      live: list[int]) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """_backward at prefill (or without dx): the live members' g_g = s_g/(1-p_g) dy_g B_g in one launch, each
    member's dx = dy_g W0_g + keep_g * (g_g A_g) GEMM on that g, every dA_g and dB_g in one launch."""
    g_scales = {g: scales[g] / (1.0 - dropouts[g]) for g in live}
    member_seeds = _member_seeds(seeds, [p > 0.0 for p in dropouts])
    grads = {}
    if live:
        live_dys = [dys[g] for g in live]
        b_ts = [lora_Bs[g].t() for g in live]                                       # (r_g, d_out_g) views
        gs = grouped_kernels.lora_grouped_shrink_each(live_dys, b_ts, [g_scales[g] for g in live])
        d_as, d_bs = grouped_kernels.lora_grouped_weight_grads(x, gs, live_dys, [xas[g] for g in live],
                                                               [member_seeds[g] for g in live],
                                                               [dropouts[g] for g in live], rank_major=True)
        grads = dict(zip(live, zip(gs, b_ts, d_as, d_bs)))

    def member_backward(g, dy, dx):
        g_g, b_t, d_a, d_b = grads[g]
        if need_dx:  # the dx GEMM adds into the members' sum so far: no separate add
            w0 = weights[g].t() if fan_in_fan_out else weights[g]                   # (d_out, d_in) view
            dx, _ = lora_kernels.lora_matmul(dy, w0.t(), b_t, lora_As[g].t(), g_scales[g], None, member_seeds[g],
                                             out_dropout=dropouts[g], out=dx, xa=g_g, accumulate=dx is not None)
        return dx, as_dtype(d_a, lora_As[g].dtype), as_dtype(d_b, lora_Bs[g].dtype)
    return _sum_members(dys, x, weights, lora_As, fan_in_fan_out, need_dx, member_backward)


lora_linear_grouped_fwd = torch.library.custom_op("ptlm::lora_linear_grouped_fwd", _forward, mutates_args=())
lora_linear_grouped_bwd = torch.library.custom_op("ptlm::lora_linear_grouped_bwd", _backward, mutates_args=())


@lora_linear_grouped_fwd.register_fake
def _(x, weights, biases, lora_As, lora_Bs, scales, dropouts, seeds, fan_in_fan_out):
    ys = [x.new_empty((x.shape[0], w.shape[1] if fan_in_fan_out else w.shape[0])) for w in weights]
    xas = [x.new_empty((x.shape[0], 0 if a is None else a.shape[0]), dtype=torch.float32) for a in _present(lora_As)]
    return ys, xas


@lora_linear_grouped_bwd.register_fake
def _(dys, x, xas, weights, lora_As, lora_Bs, scales, dropouts, seeds, fan_in_fan_out, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty((0,))
    live = [dy is not None and _given(a) for dy, a in zip(dys, lora_As)]
    return (dx, [torch.empty_like(a) if on else x.new_empty((0,)) for a, on in zip(lora_As, live)],
            [torch.empty_like(b) if on else x.new_empty((0,)) for b, on in zip(lora_Bs, live)])


def _save(ctx, x, weights, biases, lora_As, lora_Bs, xas, scales, dropouts, seeds, fan_in_fan_out) -> None:
    ctx.save_for_backward(x, seeds, *weights, *lora_As, *lora_Bs, *xas)
    ctx.members, ctx.scales, ctx.dropouts, ctx.fan_in_fan_out = len(weights), scales, dropouts, fan_in_fan_out
    ctx.has_bias = [_given(b) for b in biases]


def _member_grads(ctx, dys, x, lora_As, dx, d_as, d_bs, need_x, need_w, need_bias, need_A, need_B):
    """The input gradients both grouped ops return, from their backward's (dx, [dA_g], [dB_g]): base grads
    where the user made W0 or a bias trainable, None for members without an output gradient or an adapter."""
    d_ws, d_biases = [], []
    for g, dy in enumerate(dys):
        d_w, d_bias = (None, None) if dy is None else _base_grads((None, need_w[g], need_bias[g]), dy, x,
                                                                  ctx.fan_in_fan_out, ctx.has_bias[g])
        d_ws.append(d_w)
        d_biases.append(d_bias)
    live = [dy is not None and _given(a) for dy, a in zip(dys, lora_As)]
    d_as = [d if on and need else None for d, on, need in zip(d_as, live, need_A)]
    d_bs = [d if on and need else None for d, on, need in zip(d_bs, live, need_B)]
    return (dx if need_x else None), d_ws, d_biases, d_as, d_bs


def _grads(ctx, dys, bwd, need_x: bool, need_w, need_bias, need_A, need_B):
    """Per input list: (dx, [dW_g], [dbias_g], [dA_g], [dB_g]), with `bwd` the custom op (traced) or its
    implementation (eager)."""
    G = ctx.members
    x, seeds, *rest = ctx.saved_tensors
    weights, lora_As, lora_Bs, xas = rest[:G], rest[G:2 * G], rest[2 * G:3 * G], rest[3 * G:]
    dx, d_as, d_bs = bwd(list(dys), x, list(xas), list(weights), list(lora_As), list(lora_Bs), ctx.scales,
                         ctx.dropouts, seeds, ctx.fan_in_fan_out, need_x)
    return _member_grads(ctx, dys, x, lora_As, dx, d_as, d_bs, need_x, need_w, need_bias, need_A, need_B)


def _setup_context(ctx, inputs, output):
    x, weights, biases, lora_As, lora_Bs, scales, dropouts, seeds, fan_in_fan_out = inputs
    _save(ctx, x, weights, biases, lora_As, lora_Bs, output[1], scales, dropouts, seeds, fan_in_fan_out)


def _member_flags(need, G: int) -> list[list[bool]]:
    """The custom op's needs_input_grad for its four member lists (a list input may report one bool)."""
    return [[flag] * G if isinstance(flag, bool) else list(flag) for flag in need[1:5]]


def _op_backward(ctx, dys, _dxas):
    need = ctx.needs_input_grad
    return (*_grads(ctx, dys, lora_linear_grouped_bwd, need[0], *_member_flags(need, ctx.members)),
            None, None, None, None)


torch.library.register_autograd("ptlm::lora_linear_grouped_fwd", _op_backward, setup_context=_setup_context)


def _split(tensors: tuple, G: int) -> list[list]:
    """The eager Function's flat tensor arguments back into [weights, biases, lora_As, lora_Bs]."""
    return [list(tensors[i * G:(i + 1) * G]) for i in range(4)]


class LoraLinearGroupedFunction(torch.autograd.Function):
    """Eager autograd path over the same implementations as the custom ops. autograd.Function tracks only
    tensors passed directly, so the members' tensors come flat: weights, biases, lora_As, lora_Bs.
    Old-style forward(ctx, ...): see ops.lora.eager_function."""

    @staticmethod
    def forward(ctx, x, scales, dropouts, seeds, fan_in_fan_out, *tensors):
        G = len(scales)
        ys, xas = _forward(x, *_split(tensors, G), scales, dropouts, seeds, fan_in_fan_out)
        _save(ctx, x, *_split(tensors, G), xas, scales, dropouts, seeds, fan_in_fan_out)
        ctx.set_materialize_grads(False)   # an output nobody used costs its member's backward nothing
        return (*ys, *xas)

    @staticmethod
    @first_order("LoraLinearGroupedFunction")
    def backward(ctx, *grads):
        G, need = ctx.members, ctx.needs_input_grad
        need_lists = [need[5 + i * G:5 + (i + 1) * G] for i in range(4)]
        dx, *lists = _grads(ctx, grads[:G], _backward, need[0], *need_lists)
        return dx, None, None, None, None, *(t for lst in lists for t in lst)


# ----------------------------------------------------------------------------------- multi-adapter: impls
def _multi_forward(x: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]], lora_As: list[Optional[Tensor]],
                   lora_Bs: list[Optional[Tensor]], ranks: list[Optional[Tensor]], scales: list[Optional[Tensor]],
                   dropouts: list[Optional[Tensor]], adapter_index: Tensor, order: Tensor, bounds: Tensor,
                   seeds: Optional[Tensor], fan_in_fan_out: bool) -> tuple[list[Tensor], list[Tensor]]:
    """x (T, d_in) -> ([y_g (T, d_out_g)], [xa_g (T, r_pad_g) fp32 per token, saved for backward])."""
    biases, lora_As, lora_Bs, ranks = _present(biases), _present(lora_As), _present(lora_Bs), _present(ranks)
    scales, dropouts = _present(scales), _present(dropouts)
    ws = [w.t() if fan_in_fan_out else w for w in weights]                          # (d_out_g, d_in) views
    live = [g for g, a in enumerate(lora_As) if a is not None]
    member_seeds = _member_seeds(seeds, [p is not None for p in dropouts])
    xas: list[Optional[Tensor]] = [None] * len(weights)
    xs = multi_ops.multi_kernels.tma_sorted_rows(x, *ws) if live else None   # Hopper prefill: x's rows sorted for TMA
    if live and xs is None and grouped_kernels.grouped_one_launch(x.shape[0]):
        ys, xas = grouped_kernels.lora_grouped_multi_linear(x, ws, lora_As, lora_Bs, adapter_index, ranks, scales,
                                                             biases, order, dropouts, member_seeds)
        return ys, [_no_xa(x) if xa is None else xa for xa in xas]
    if live:
        shrunk = grouped_kernels.lora_grouped_multi_shrink(
            x, [lora_As[g] for g in live], adapter_index, [ranks[g] for g in live], [scales[g] for g in live], order,
            [dropouts[g] for g in live], [member_seeds[g] for g in live], x_sorted=xs)
        for g, xa in zip(live, shrunk):
            xas[g] = xa
    ys = grouped_kernels.lora_grouped_multi_matmul(x, ws, xas, lora_Bs, adapter_index, ranks, biases, order,
                                                   after_shrink=bool(live), x_sorted=xs)
    return ys, [_no_xa(x) if xa is None else xa for xa in xas]


def _multi_backward(dys: list[Optional[Tensor]], x: Tensor, xas: list[Tensor], weights: list[Tensor],
                    lora_As: list[Optional[Tensor]], lora_Bs: list[Optional[Tensor]], ranks: list[Optional[Tensor]],
                    scales: list[Optional[Tensor]], dropouts: list[Optional[Tensor]], adapter_index: Tensor,
                    order: Tensor, bounds: Tensor, seeds: Optional[Tensor], fan_in_fan_out: bool,
                    need_dx: bool) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Each member's ops.lora_multi backward on its own dy; dx summed (as _backward)."""
    lora_As, lora_Bs, ranks = _present(lora_As), _present(lora_Bs), _present(ranks)
    scales, dropouts = _present(scales), _present(dropouts)

    def member_backward(g, dy, dx):
        seed = seeds[g:g + 1] if dropouts[g] is not None else None
        total, d_a, d_b = multi_ops.backward_into(dy, x, xas[g], weights[g], lora_As[g], lora_Bs[g], ranks[g],
                                                  scales[g], adapter_index, order, bounds, dropouts[g], seed,
                                                  fan_in_fan_out, need_dx, dx if need_dx else None)
        return total if need_dx else None, d_a, d_b
    return _sum_members(dys, x, weights, lora_As, fan_in_fan_out, need_dx, member_backward)


lora_linear_multi_grouped_fwd = torch.library.custom_op("ptlm::lora_linear_multi_grouped_fwd", _multi_forward,
                                                        mutates_args=())
lora_linear_multi_grouped_bwd = torch.library.custom_op("ptlm::lora_linear_multi_grouped_bwd", _multi_backward,
                                                        mutates_args=())


@lora_linear_multi_grouped_fwd.register_fake
def _(x, weights, biases, lora_As, lora_Bs, ranks, scales, dropouts, adapter_index, order, bounds, seeds,
      fan_in_fan_out):
    ys = [x.new_empty((x.shape[0], w.shape[1] if fan_in_fan_out else w.shape[0])) for w in weights]
    widths = [0 if a is None else multi_ops.multi_kernels.padded_rank(a.shape[1]) for a in _present(lora_As)]
    return ys, [x.new_empty((x.shape[0], w), dtype=torch.float32) for w in widths]


@lora_linear_multi_grouped_bwd.register_fake
def _(dys, x, xas, weights, lora_As, lora_Bs, ranks, scales, dropouts, adapter_index, order, bounds, seeds,
      fan_in_fan_out, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty((0,))
    live = [dy is not None and _given(a) for dy, a in zip(dys, lora_As)]
    return (dx, [torch.empty_like(a) if on else x.new_empty((0,)) for a, on in zip(lora_As, live)],
            [torch.empty_like(b) if on else x.new_empty((0,)) for b, on in zip(lora_Bs, live)])


def _multi_save(ctx, x, weights, biases, lora_As, lora_Bs, ranks, scales, dropouts, adapter_index, order, bounds,
                seeds, fan_in_fan_out, xas) -> None:
    ctx.save_for_backward(x, adapter_index, order, bounds, seeds, *weights, *lora_As, *lora_Bs, *ranks, *scales,
                          *dropouts, *xas)
    ctx.members, ctx.fan_in_fan_out = len(weights), fan_in_fan_out
    ctx.has_bias = [_given(b) for b in biases]


def _multi_grads(ctx, dys, bwd, need_x: bool, need_w, need_bias, need_A, need_B):
    """As _grads, for the multi-adapter op."""
    G = ctx.members
    x, adapter_index, order, bounds, seeds, *rest = ctx.saved_tensors
    weights, lora_As, lora_Bs, ranks, scales, dropouts, xas = (list(rest[i * G:(i + 1) * G]) for i in range(7))
    dx, d_as, d_bs = bwd(list(dys), x, xas, weights, lora_As, lora_Bs, ranks, scales, dropouts, adapter_index, order,
                         bounds, seeds, ctx.fan_in_fan_out, need_x)
    return _member_grads(ctx, dys, x, lora_As, dx, d_as, d_bs, need_x, need_w, need_bias, need_A, need_B)


def _multi_setup_context(ctx, inputs, output):
    _multi_save(ctx, *inputs, output[1])


def _multi_op_backward(ctx, dys, _dxas):
    need = ctx.needs_input_grad
    return (*_multi_grads(ctx, dys, lora_linear_multi_grouped_bwd, need[0], *_member_flags(need, ctx.members)),
            *[None] * 8)


torch.library.register_autograd("ptlm::lora_linear_multi_grouped_fwd", _multi_op_backward,
                                setup_context=_multi_setup_context)


class LoraLinearMultiGroupedFunction(torch.autograd.Function):
    """Eager autograd path of the multi-adapter grouped op; the members' tensors come flat (weights, biases,
    lora_As, lora_Bs, then ranks, scales, dropouts, which get no gradient). Old-style forward(ctx, ...): see
    ops.lora.eager_function."""

    @staticmethod
    def forward(ctx, x, adapter_index, order, bounds, seeds, fan_in_fan_out, G, *tensors):
        weights, biases, lora_As, lora_Bs = _split(tensors, G)
        ranks, scales, dropouts = _split(tensors[4 * G:], G)[:3]
        ys, xas = _multi_forward(x, weights, biases, lora_As, lora_Bs, ranks, scales, dropouts, adapter_index, order,
                                 bounds, seeds, fan_in_fan_out)
        _multi_save(ctx, x, weights, biases, lora_As, lora_Bs, ranks, scales, dropouts, adapter_index, order, bounds,
                    seeds, fan_in_fan_out, xas)
        ctx.set_materialize_grads(False)
        return (*ys, *xas)

    @staticmethod
    @first_order("LoraLinearMultiGroupedFunction")
    def backward(ctx, *grads):
        G, need = ctx.members, ctx.needs_input_grad
        need_lists = [need[7 + i * G:7 + (i + 1) * G] for i in range(4)]
        dx, *lists = _multi_grads(ctx, grads[:G], _multi_backward, need[0], *need_lists)
        return dx, None, None, None, None, None, None, *(t for lst in lists for t in lst), *[None] * (3 * G)


# ----------------------------------------------------------------------------------------------- entry points
def _runs_triton(x: Tensor) -> bool:
    return triton_enabled(x) and x.dtype in lora_kernels.SUPPORTED_DTYPES


def _needs_grad(x: Tensor, *members: Sequence[Tensor | None]) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(
        t is not None and t.requires_grad for seq in members for t in seq))


def lora_linear_grouped_op(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None],
                           lora_As: Sequence[Tensor | None], lora_Bs: Sequence[Tensor | None],
                           scales: Sequence[float], dropouts: Sequence[float] | None,
                           fan_in_fan_out: bool) -> list[Tensor]:
    G = len(weights)
    dropouts = [0.0] * G if dropouts is None else [float(p) for p in dropouts]
    _check(x, weights, biases, lora_As, lora_Bs, scales, dropouts, fan_in_fan_out)
    flat = x.dim() != 2
    x2d = x.reshape(-1, x.shape[-1]) if flat else x                                 # (T, d_in), a view if it can
    weights, biases, lora_As, lora_Bs = list(weights), list(biases), list(lora_As), list(lora_Bs)
    scales = [float(s) for s in scales]
    if not _runs_triton(x):
        keeps = [torch.rand_like(x2d) >= p if p > 0.0 and a is not None else None for p, a in zip(dropouts, lora_As)]
        ys = reference.lora_linear_grouped(x2d, weights, biases, lora_As, lora_Bs, scales, fan_in_fan_out, dropouts,
                                           keeps)
    else:
        drops = any(p > 0.0 and a is not None for p, a in zip(dropouts, lora_As))
        seeds = torch.randint(0, 2**31 - 1, (G,), device=x.device) if drops else None
        biases = [unit_stride(b) for b in biases]
        args = (x2d, weights, biases, lora_As, lora_Bs, scales, dropouts, seeds, fan_in_fan_out)
        if takes_custom_op():
            ys, _ = lora_linear_grouped_fwd(x2d, weights, *(_placeholders(t, x) for t in (biases, lora_As, lora_Bs)),
                                            *args[5:])
        elif _needs_grad(x, weights, biases, lora_As, lora_Bs):
            ys = LoraLinearGroupedFunction.apply(x2d, scales, dropouts, seeds, fan_in_fan_out, *weights, *biases,
                                                 *lora_As, *lora_Bs)[:G]
        else:  # inference: no autograd bookkeeping at all
            ys, _ = _forward(*args)
    return [y.reshape(*x.shape[:-1], y.shape[-1]) for y in ys] if flat else list(ys)


def _slot_field(slots: Sequence[LoraSlots | None], name: str, dtype: torch.dtype | None = None) -> list:
    """Each member's slots.<name>, cast to dtype (and with unit stride) if given; None where a member has no slots
    (or no dropouts)."""
    fields = [None if s is None else getattr(s, name) for s in slots]
    return fields if dtype is None else [t if t is None else unit_stride(as_dtype(t, dtype)) for t in fields]


def lora_linear_multi_grouped_op(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None],
                                 slots: Sequence[LoraSlots | None], adapter_index: Tensor, fan_in_fan_out: bool,
                                 segments: tuple[Tensor, Tensor] | None = None) -> list[Tensor]:
    _check_multi(x, weights, biases, slots, adapter_index, fan_in_fan_out)
    num_slots = next((s.lora_A.shape[0] for s in slots if s is not None), None)
    if segments is None and num_slots is not None:   # a user's call (a served batch's segments come checked)
        check_index_range(adapter_index, num_slots)
        for g, member in enumerate(slots):
            if member is not None:
                check_slot_tables(f"slots[{g}].", member)
    G = len(weights)
    flat = x.dim() != 2
    x2d = x.reshape(-1, x.shape[-1]) if flat else x                                 # (T, d_in)
    index = adapter_index.reshape(-1) if adapter_index.dim() != 1 else adapter_index  # (T,)
    weights, biases = list(weights), list(biases)
    lora_As, lora_Bs = _slot_field(slots, "lora_A"), _slot_field(slots, "lora_B")
    dropouts = _slot_field(slots, "dropouts", torch.float32)
    if not _runs_triton(x):
        slot = index.clamp_min(0).long()
        keeps = [None if p is None else torch.rand_like(x2d) >= p[slot][:, None] for p in dropouts]
        ys = reference.lora_linear_multi_grouped(x2d, weights, biases, lora_As, lora_Bs, _slot_field(slots, "scales"),
                                                 index, fan_in_fan_out, dropouts, keeps, _slot_field(slots, "ranks"))
    else:
        index, biases = unit_stride(as_dtype(index, torch.int32)), [unit_stride(b) for b in biases]
        order, bounds = token_segments(index, num_slots or 0) if segments is None else segments
        seeds = torch.randint(0, 2**31 - 1, (G,), device=x.device) if any(p is not None for p in dropouts) else None
        ranks, scales = _slot_field(slots, "ranks", torch.int32), _slot_field(slots, "scales", torch.float32)
        args = (x2d, weights, biases, lora_As, lora_Bs, ranks, scales, dropouts, index, order, bounds, seeds,
                fan_in_fan_out)
        if takes_custom_op():
            ys, _ = lora_linear_multi_grouped_fwd(x2d, weights, *(_placeholders(t, x) for t in args[2:8]), *args[8:])
        elif _needs_grad(x, weights, biases, lora_As, lora_Bs):
            ys = LoraLinearMultiGroupedFunction.apply(x2d, index, order, bounds, seeds, fan_in_fan_out, G, *weights,
                                                      *biases, *lora_As, *lora_Bs, *ranks, *scales, *dropouts)[:G]
        else:  # inference: no autograd bookkeeping at all
            ys, _ = _multi_forward(*args)
    return [y.reshape(*x.shape[:-1], y.shape[-1]) for y in ys] if flat else list(ys)
