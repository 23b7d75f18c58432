"""Autotune config generators and pruning rules for the bottleneck-adapter kernels (kernels/configs.py style).

Row kernels (forward, backward's row pass) hold a BLOCK_T x M_PAD fp32 tile for the whole bottleneck width
and stream d in BLOCK_D chunks; the gradient kernel holds two BLOCK_D x M_PAD fp32 weight-gradient tiles and
streams its rows. Configs whose accumulators would take more than ~64 registers per thread, or whose
pipelined tiles would overflow shared memory, for the width at hand are pruned before tuning. Under
TRITON_INTERPRET=1 each generator yields one small config.
"""
from __future__ import annotations

from .configs import INTERPRETED, _cfg

MAX_SPLIT = 16            # most row chunks of the gradient kernel
SMEM_BUDGET = 160 << 10   # bytes of pipelined tiles a config may stage in shared memory (H100: 227 KiB)


def rows_configs():
    """BLOCK_T rows x the whole width per program, d streamed in BLOCK_D chunks."""
    if INTERPRETED:
        return [_cfg(4, 1, BLOCK_T=32, BLOCK_D=64)]
    return [_cfg(w, s, BLOCK_T=bt, BLOCK_D=bd) for bt, bd, w, s in (
        (64, 64, 4, 3), (64, 128, 8, 3), (128, 64, 8, 3), (32, 128, 4, 4), (128, 128, 8, 2), (64, 64, 8, 2),
        (128, 64, 16, 2), (32, 64, 4, 3), (16, 128, 4, 4), (16, 64, 4, 4))]


def grads_configs():
    """BLOCK_D columns x one chunk of rows per program (the launcher sizes the chunks: see split_limit)."""
    if INTERPRETED:
        return [_cfg(4, 1, BLOCK_T=32, BLOCK_D=64)]
    return [_cfg(w, s, BLOCK_T=bt, BLOCK_D=bd) for bt, bd, w, s in (
        (64, 32, 8, 3), (32, 32, 8, 3), (64, 64, 8, 3), (32, 128, 8, 3), (64, 128, 8, 2), (16, 64, 4, 4))]


def wide_grads_configs():
    """(BLOCK_D, BLOCK_M) tiles of the wide bottlenecks' weight gradients (no dh tile beside them) x one chunk."""
    if INTERPRETED:
        return [_cfg(4, 1, BLOCK_T=16, BLOCK_D=32, BLOCK_M=64)]
    return [_cfg(w, s, BLOCK_T=bt, BLOCK_D=bd, BLOCK_M=bm) for bt, bd, bm, w, s in (
        (32, 128, 128, 8, 4), (64, 128, 128, 8, 2), (64, 64, 128, 4, 3), (64, 128, 64, 4, 3), (32, 64, 256, 8, 3),
        (64, 64, 128, 8, 3))]


def down_configs():
    """(BLOCK_T, BLOCK_M) tiles of z = h Wd^T, d streamed in BLOCK_D chunks: the wide forward's first GEMM."""
    if INTERPRETED:
        return [_cfg(4, 1, BLOCK_T=16, BLOCK_M=32, BLOCK_D=32)]
    # (128, 256) and (64, 256) tiles, and (64, 128) on 4 warps, spilled 156-624 B (ptxas for sm_90, Triton 3.6,
    # unspecialised, 2026-11-28): left out
    return [_cfg(w, s, BLOCK_T=bt, BLOCK_M=bm, BLOCK_D=bd) for bt, bm, bd, w, s in (
        (128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 8, 3), (64, 64, 128, 4, 3))]


def rows_tiled_configs():
    """(BLOCK_T, BLOCK_M) tiles of da = dy Wu for the wide bottlenecks' rows kernel, whose epilogue also holds z
    and act'(z): 128-row tiles spilled 0.7-1 KB there (ptxas for sm_90, Triton 3.6, unspecialised, 2026-11-28)."""
    if INTERPRETED:
        return down_configs()
    return [_cfg(w, s, BLOCK_T=bt, BLOCK_M=bm, BLOCK_D=bd) for bt, bm, bd, w, s in (
        (64, 128, 64, 8, 3), (64, 64, 128, 4, 3), (64, 64, 64, 8, 3), (32, 128, 64, 4, 3))]


def weight_grad_configs():
    """(BLOCK_D, BLOCK_M) tiles of one weight gradient (dWu or dWd^T, one fp32 accumulator) x one chunk of rows:
    the one-adapter wide backward. Wider m tiles than wide_grads_configs' (which hold both gradients): a tile
    reads its chunk's dy or h columns once per m tile, its a or dz columns once per d tile (from L2)."""
    if INTERPRETED:
        return [_cfg(4, 1, BLOCK_T=16, BLOCK_D=32, BLOCK_M=32)]
    return [_cfg(w, s, BLOCK_T=bt, BLOCK_D=bd, BLOCK_M=bm) for bt, bd, bm, w, s in (
        (64, 128, 128, 8, 3), (32, 128, 256, 8, 3), (64, 128, 64, 4, 3), (32, 256, 128, 8, 3), (64, 64, 128, 4, 3))]


def multi_rows_configs():
    """The row kernels' tiles for the multi-adapter kernels, fewer: each compiles one copy of the adapter per
    width tile up to the widest slot's (up to five), so every config costs several times the compile time."""
    if INTERPRETED:
        return rows_configs()
    return [_cfg(w, s, BLOCK_T=bt, BLOCK_D=bd) for bt, bd, w, s in (
        (64, 64, 4, 3), (64, 128, 8, 3), (64, 64, 8, 2), (32, 64, 4, 3), (16, 128, 4, 4), (16, 64, 4, 4))]


def split_limit(t: int, m_pad: int) -> int:
    """Most row chunks worth their fp32 partial weight gradients: chunks * (2 d m) partials, written and read
    once, cost at most ~16% of the bytes the gradient kernel must move (dy, h, dh: 3 T d halves), i.e.
    chunks * m_pad * 16 <= T. (At ~8%, T = 16384, d = 768, m = 64 got 8 chunks x 12 column blocks = 96
    programs on the H100's 132 SMs, each walking 2048 rows: fwd+bwd 1.43 ms against eager's 0.89, 2026-11-26.)"""
    return max(1, min(MAX_SPLIT, t // (16 * m_pad)))


def _fits(config, accumulators: int, staged_elems: int) -> bool:
    """At most 64 fp32 accumulators per thread, and num_stages copies of the loop's tiles (2-byte elements)
    within SMEM_BUDGET."""
    return (accumulators <= 64 * 32 * config.num_warps
            and config.num_stages * staged_elems * 2 <= SMEM_BUDGET)


def prune_rows(configs, named_args, **kwargs):
    """Fit the width; no row tile far larger than T."""
    args = {**named_args, **kwargs}
    t, m_pad = args["T_BUCKET"], args["M_PAD"]
    kept = [c for c in configs if c.kwargs["BLOCK_T"] <= max(16, t)
            and _fits(c, c.kwargs["BLOCK_T"] * m_pad, (c.kwargs["BLOCK_T"] + m_pad) * c.kwargs["BLOCK_D"])]
    return kept or configs[-1:]


def prune_wide_grads(configs, named_args, **kwargs):
    """Tiles within the width, two fp32 gradient tiles in up to 128 registers a thread (nothing else stays on
    chip: no dh tile, no Wd), dy, h, a, dz staged; no row tile far larger than T."""
    args = {**named_args, **kwargs}
    t, m_pad = args["T_BUCKET"], args["M_PAD"]
    kept = [c for c in configs if c.kwargs["BLOCK_T"] <= max(16, t) and c.kwargs["BLOCK_M"] <= m_pad
            and 2 * c.kwargs["BLOCK_D"] * c.kwargs["BLOCK_M"] <= 128 * 32 * c.num_warps
            and _fits(c, 0, 2 * c.kwargs["BLOCK_T"] * (c.kwargs["BLOCK_D"] + c.kwargs["BLOCK_M"]))]
    return kept or configs[-1:]


def prune_down(configs, named_args, **kwargs):
    """Tiles within the width, the fp32 tile in up to 128 registers a thread, h and Wd staged; no row tile far
    larger than T."""
    args = {**named_args, **kwargs}
    t, m_pad = args["T_BUCKET"], args["M_PAD"]
    kept = [c for c in configs if c.kwargs["BLOCK_T"] <= max(16, t) and c.kwargs["BLOCK_M"] <= m_pad
            and c.kwargs["BLOCK_T"] * c.kwargs["BLOCK_M"] <= 128 * 32 * c.num_warps
            and _fits(c, 0, (c.kwargs["BLOCK_T"] + c.kwargs["BLOCK_M"]) * c.kwargs["BLOCK_D"])]
    return kept or configs[-1:]


def prune_weight_grad(configs, named_args, **kwargs):
    """Tiles within the width, the fp32 tile in up to 128 registers a thread; no row tile far larger than T."""
    args = {**named_args, **kwargs}
    t, m_pad = args["T_BUCKET"], args["M_PAD"]
    kept = [c for c in configs if c.kwargs["BLOCK_T"] <= max(16, t) and c.kwargs["BLOCK_M"] <= m_pad
            and c.kwargs["BLOCK_D"] * c.kwargs["BLOCK_M"] <= 128 * 32 * c.num_warps
            and _fits(c, 0, c.kwargs["BLOCK_T"] * (c.kwargs["BLOCK_D"] + c.kwargs["BLOCK_M"]))]
    return kept or configs[-1:]


def prune_grads(configs, named_args, **kwargs):
    """Fit the width (two weight-gradient tiles; dy, h, a, dz staged); no row tile far larger than T."""
    args = {**named_args, **kwargs}
    t, m_pad = args["T_BUCKET"], args["M_PAD"]
    kept = [c for c in configs if c.kwargs["BLOCK_T"] <= max(16, t)
            and _fits(c, 2 * c.kwargs["BLOCK_D"] * m_pad, 2 * c.kwargs["BLOCK_T"] * (c.kwargs["BLOCK_D"] + m_pad))]
    return kept or configs[-1:]
