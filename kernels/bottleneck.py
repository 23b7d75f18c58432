"""Fused bottleneck adapter: y = base + s * (act(h Wd^T + bd) Wu^T + bu), forward and backward kernels.

base is h (Houlsby / Pfeiffer: the adapter's output joins its own input) or a given residual (the parallel
placement: the adapter reads the sublayer's input h, its output joins the sublayer's output). h (T, d);
Wd (m, d); Wu (d, m); act relu, gelu (exact, erf) or silu; m <= MAX_WIDTH = 256.

Forward, one kernel: a program owns BLOCK_T rows. Pass 1 streams their h over d in BLOCK_D chunks into
z = h Wd^T + bd (BLOCK_T x m fp32 accumulators), then a = act(z) in the input dtype; pass 2 streams d again:
y = base + s (a Wu^T + bu), chunk by chunk, each written once. h is read twice (the second read of a row block
mostly from L2) and never written. Saved for backward: z (T x m) in the input dtype, what PyTorch's own
autograd keeps, half the bytes of fp32 (m/d of y's bytes; d-wide intermediates never touch memory). Where the
row blocks alone leave SMs idle (small T) a grid axis splits pass 2's columns, each program repeating pass 1
with Wd from L2. Width tiles from SPLIT_FORWARD_M_PAD = 256 on run it as two GEMMs instead, z = h Wd^T + bd in
(BLOCK_T, BLOCK_M) tiles (_down_kernel, z stored), then pass 2 on the stored z (_up_kernel): the fused kernel's
whole-width fp32 z tile leaves it 32-row blocks there, each reading both weights from L2 again. The backward's
rows kernel takes the same GEMM tiles there (_rows_backward_tiled_kernel).

Backward, two kernels (g = s dy is never materialised):
- rows:  da = dy Wu over d; then a = act(z) and dz = s da act'(z), both (T x m) in the input dtype.
- grads: a program owns BLOCK_D columns and one contiguous chunk of rows: dh = [dy +] dz Wd on its tile, and
         over its rows the partial sums dWu = s dy^T a, dWd = dz^T h, dbu = s sum dy, dbd = sum dz, stored per
         chunk; the last chunk of a column block to finish (kernels.split_state's counters) adds them up in
         chunk order (deterministic) and writes the gradients in the weights' dtypes. No reduction or cast
         launches follow (2026-11-26 they were 8 of the backward's 11 launches, 29 of its 155 us at d = 768).
dy is read twice (once per kernel), h once, dh written once; a and dz (m wide) are re-read per column block,
mostly from L2. Wide bottlenecks (width tile >= WIDE_M_PAD = 128, or 64 at d >= 2048: wide_backward) split the
grads kernel in two, since two (BLOCK_D, m) fp32 tiles beside dh's left only 32-column blocks:
- weight grads: a program owns a (BLOCK_D, BLOCK_M) tile of one of dWu, dWd^T over one chunk of rows (one fp32
         accumulator: m tiles up to 256 wide, so dy and h are read once per m tile), chunks summed as above;
- input grad:  dh = [dy +] dz Wd, the forward's pass 2 (rows_expand) with dz for a and Wd^T for Wu.

Floor (H100: 3.0 TB/s copy, 790 TFLOP/s bf16; b bytes per element; [..] only with a residual):
  fwd      bytes = b (2 T d [+ T d] + 2 m d)      flops = 4 T d m
  fwd+bwd  bytes = b (5 T d [+ T d] + 6 m d)      flops = 12 T d m
           (backward reads dy and h and writes dh; the residual's gradient is dy itself)
  T = 16384 bf16 forward: d = 768: 50.3 MB, 0.0168 ms; d = 4096: 268 MB, 0.0895 ms (at m = 256 the 68.7 GFLOP
  take 0.087 ms: both limits meet). Eager PyTorch reaches 22% (0.075 ms) and 35% (0.256 ms) of the floor;
  the target is >= 80%: <= 0.021 ms and <= 0.112 ms. Not yet measured on a GPU.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .bottleneck_configs import (MAX_SPLIT, down_configs, grads_configs, prune_down, prune_grads, prune_rows,
                                 prune_weight_grad, rows_configs, rows_tiled_configs, split_limit,
                                 weight_grad_configs)
from .configs import INTERPRETED, TunedLauncher, cdiv, next_pow2, t_bucket, tune_bench  # noqa: F401
from .lora import _dot
from .split_state import arrive_last, split_state

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_WIDTH = 256           # the fused kernels hold a row block's whole bottleneck in registers
MIN_WIDTH_TILE = 16       # tl.dot needs 16 along every dimension
# Width tiles from here on take the wide backward: the weight gradients in (d, m) tiles without dh, dh its own
# kernel. The narrow kernel holds the whole width twice per column block beside its dh tile: at m = 256 the
# tuner could only fit 32-column blocks, re-reading a and dz 128 times at d = 4096 (H100, 2026-11-27, T = 16384,
# bf16: 2.51 ms, the whole fwd+bwd 3.1x eager PyTorch's). Half that width takes it too where d is large: at
# m = 64 the pair ran 0.468 ms at d = 4096 against the fused kernel's 0.536, 0.131 against 0.127 at d = 768
# (2026-11-28, the same shapes, fwd+bwd, CUDA graphs).
WIDE_M_PAD = 128
WIDE_MIN_D = 2048
# Width tiles from here on take the split forward (_down_kernel, then _up_kernel): the fused kernel's (BLOCK_T,
# 256) fp32 z tile left it 32-row blocks, so every 32 rows read Wd and Wu from L2 again (2 GB of L2 reads at
# d = 4096, T = 16384: 288 us for a 90 us floor, H100, 2026-11-28). The split GEMM keeps 128-row tiles.
SPLIT_FORWARD_M_PAD = 256

# Activation codes, as in BottleneckSlots.acts (jit code may read only constexpr globals).
RELU = tl.constexpr(0)
GELU = tl.constexpr(1)
SILU = tl.constexpr(2)
_INV_SQRT2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


def width_tile(m: int) -> int:
    """The register tile of a bottleneck of width m: a power of two, at least MIN_WIDTH_TILE."""
    return max(MIN_WIDTH_TILE, next_pow2(m))


@functools.lru_cache(maxsize=None)
def target_programs(device: torch.device, per_sm: int = 2) -> int:
    """Programs that keep every SM busy: per_sm per SM on CUDA; a few on the CPU (the interpreter), so small
    test shapes still take the split paths."""
    if device.type == "cuda":
        return per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def column_shares(programs: int, D: int, meta: dict, device: torch.device) -> int:
    """Pass 2's column shares per row block: more than one only where `programs` (row blocks x slot lanes) leave
    SMs idle."""
    return max(1, min(cdiv(D, meta["BLOCK_D"]), target_programs(device) // programs))


def row_grid(T: int, D: int, meta: dict, lanes: int, device: torch.device) -> tuple[int, int]:
    """(row blocks x column shares, slot lanes)."""
    blocks = cdiv(T, meta["BLOCK_T"])
    return blocks * column_shares(blocks * lanes, D, meta, device), lanes


def forward_outputs(h: torch.Tensor, width: int, save_z: bool,
                    out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A forward's outputs in h's dtype: y (T, d), `out` where given, and z (T, width) with save_z."""
    T, D = h.shape
    y = torch.empty((T, D), device=h.device, dtype=h.dtype) if out is None else out
    return y, torch.empty((T, width), device=h.device, dtype=h.dtype) if save_z else None


def wide_backward(D: int, m_pad: int) -> bool:
    """Whether the backward of a width tile m_pad at hidden size D takes the wide pair of gradient kernels."""
    return m_pad >= WIDE_M_PAD or (2 * m_pad >= WIDE_M_PAD and D >= WIDE_MIN_D)


def split_forward(m_pad: int) -> bool:
    """Whether a width tile m_pad takes the split forward (two GEMMs), and the backward's rows kernel in GEMM
    tiles over m likewise."""
    return m_pad >= SPLIT_FORWARD_M_PAD


def wide_chunk_rows(T: int, D: int, m_pad: int, device: torch.device, gradients: int = 1) -> int:
    """Rows per chunk of the wide gradient kernel: one wave of 128 x 128 tiles (of each of `gradients` weight
    gradients a program may own alone), one program per SM, the fp32 partials of all chunks at most the bytes of
    dy's and h's rows they sum (chunks * m_pad * 4 <= T)."""
    tiles = gradients * cdiv(D, 128) * cdiv(m_pad, 128)
    chunks = min(MAX_SPLIT, max(1, target_programs(device, per_sm=1) // tiles), max(1, T // (4 * m_pad)))
    return cdiv(T, chunks)


def chunk_rows(T: int, D: int, m_pad: int, device: torch.device) -> int:
    """Rows per chunk of the gradient kernel: one wave of 64-wide column blocks, one program per SM (its configs
    hold two m-wide fp32 gradient tiles: 8 warps of ~250 registers fill an SM), at most split_limit chunks
    (their fp32 partials stay a small fraction of the bytes). Two programs per SM were assumed until
    2026-11-26: 16 chunks x 12 column blocks = 192 programs on 132 SMs ran as a full wave and a 45% one (75 us
    at d = 768, T = 16384, 36% of its bytes' bandwidth)."""
    chunks = min(split_limit(T, m_pad), max(1, target_programs(device, per_sm=1) // cdiv(D, 64)))
    return cdiv(T, chunks)


# ------------------------------------------------------------------------------------------------ helpers
@triton.jit
def _activate(z, act):
    """act(z) for an activation code (constexpr in the one-adapter kernels, read per slot in the multi ones)."""
    if act == RELU:
        a = tl.where(z < 0.0, 0.0, z)               # NaN stays NaN, as torch.relu (tl.maximum would drop it)
    elif act == GELU:
        a = 0.5 * z * (1.0 + tl.erf(z * _INV_SQRT2))
    else:
        a = z * tl.sigmoid(z)
    return a


@triton.jit
def _activate_with_grad(z, act):
    """(act(z), act'(z)); relu' is 1 where z > 0, as PyTorch's threshold_backward."""
    if act == RELU:
        a = tl.where(z < 0.0, 0.0, z)
        grad = tl.where(z > 0.0, 1.0, 0.0)
    elif act == GELU:
        cdf = 0.5 * (1.0 + tl.erf(z * _INV_SQRT2))
        a = z * cdf
        grad = cdf + z * tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
    else:
        sig = tl.sigmoid(z)
        a = z * sig
        grad = sig * (1.0 + z * (1.0 - sig))
    return a, grad


@triton.jit
def share_columns(share, shares, D, BLOCK_D: tl.constexpr):
    """Pass 2's columns [lo, hi) of column share `share` of `shares`: equal runs of whole BLOCK_Ds."""
    per = tl.cdiv(tl.cdiv(D, BLOCK_D), shares) * BLOCK_D
    lo = share * per
    return lo, tl.minimum(D, lo + per)


@triton.jit
def row_block_and_columns(T, D, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """(row block, pass 2's columns [lo, hi)) of this program. Grid axis 0 holds row blocks x column shares, the
    shares of one block side by side: their repeated pass 1 finds its h and Wd in L2."""
    shares = tl.num_programs(0) // tl.cdiv(T, BLOCK_T)
    lo, hi = share_columns(tl.program_id(0) % shares, shares, D, BLOCK_D)
    return tl.program_id(0) // shares, lo, hi


@triton.jit
def rows_times_weight(x_ptr, w_ptr, tok, rows, offs_m, mask_m, D, stride_xt, stride_xd, stride_wd, stride_wm,
                      FP32_DOT: tl.constexpr, M_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """x[tok] W over all of d, (BLOCK_T, M_PAD) in fp32: x (T, D) read on the rows `rows`, W[d, m] at
    w_ptr + d stride_wd + m stride_wm read on the columns mask_m (zero beyond). x's rows are read again soon
    (the forward's residual pass, other column shares and slots, the gradient kernel's dy), so they are asked to
    stay in L2 (evict_last); the last reads ask for the opposite (evict_first)."""
    acc = tl.zeros((BLOCK_T, M_PAD), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        x = tl.load(x_ptr + tok[:, None] * stride_xt + offs_d[None, :] * stride_xd,
                    mask=rows[:, None] & mask_d[None, :], other=0.0, eviction_policy="evict_last")  # (BLOCK_T, BLOCK_D)
        w = tl.load(w_ptr + offs_d[:, None] * stride_wd + offs_m[None, :] * stride_wm,
                    mask=mask_d[:, None] & mask_m[None, :], other=0.0)                          # (BLOCK_D, M_PAD)
        acc = _dot(x, w, acc, FP32_DOT)
    return acc


@triton.jit
def gemm_tile(x_ptr, w_ptr, T, D, M, stride_xt, stride_xd, stride_wd, stride_wm, FP32_DOT: tl.constexpr,
              BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's (BLOCK_T, BLOCK_M) tile of x W over all of d, fp32 (x (T, D); W[d, m] at w_ptr + d stride_wd
    + m stride_wm), with its (tok, rows, offs_m, mask_m). A row block's m tiles are neighbours in launch order, so
    its x rows come from L2 after the first."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tok = ((tl.program_id(0) // tiles_m) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    rows = tok < T
    offs_m = (tl.program_id(0) % tiles_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    acc = rows_times_weight(x_ptr, w_ptr, tok, rows, offs_m, mask_m, D, stride_xt, stride_xd, stride_wd, stride_wm,
                            FP32_DOT, BLOCK_M, BLOCK_T, BLOCK_D)
    return acc, tok, rows, offs_m, mask_m


@triton.jit
def adapter_forward(
    h_ptr, base_ptr, y_ptr, z_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr,
    tok, rows, width, scale, act, D, d_lo, d_hi,
    stride_ht, stride_hd, stride_bt, stride_bd, stride_yt, stride_yd, stride_zt, stride_zm,
    stride_wdm, stride_wdd, stride_bdm, stride_wud, stride_wum, stride_bud,
    HAS_BD: tl.constexpr, HAS_BU: tl.constexpr, STORE_Z: tl.constexpr, FP32_DOT: tl.constexpr,
    M_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One adapter over the rows `rows` of token block `tok`: z over all of d, y on columns [d_lo, d_hi)."""
    offs_m = tl.arange(0, M_PAD)
    mask_m = offs_m < width
    # pass 1: z = h Wd^T + bd, all of d
    z = rows_times_weight(h_ptr, wd_ptr, tok, rows, offs_m, mask_m, D, stride_ht, stride_hd, stride_wdd, stride_wdm,
                          FP32_DOT, M_PAD, BLOCK_T, BLOCK_D)
    if HAS_BD:
        z += tl.load(bd_ptr + offs_m * stride_bdm, mask=mask_m, other=0.0).to(tl.float32)[None, :]
    if STORE_Z:  # the first column share keeps z for backward
        tl.store(z_ptr + tok[:, None] * stride_zt + offs_m[None, :] * stride_zm, z.to(z_ptr.dtype.element_ty),
                 mask=rows[:, None] & mask_m[None, :] & (d_lo == 0))
    # zero beyond width (also where an inf in h made z's zero-weight lanes inf * 0 = NaN)
    a = tl.where(mask_m[None, :], _activate(z, act), 0.0).to(wu_ptr.dtype.element_ty)
    # pass 2: y = base + s (a Wu^T + bu), this program's columns
    rows_expand(a, wu_ptr, base_ptr, y_ptr, bu_ptr, tok, rows, offs_m, mask_m, scale, d_lo, d_hi,
                stride_bt, stride_bd, stride_yt, stride_yd, stride_wud, stride_wum, stride_bud,
                True, HAS_BU, FP32_DOT, BLOCK_T, BLOCK_D)


@triton.jit
def rows_expand(a, w_ptr, base_ptr, y_ptr, bu_ptr, tok, rows, offs_m, mask_m, scale, d_lo, d_hi,
                stride_bt, stride_bd, stride_yt, stride_yd, stride_wd, stride_wm, stride_bud,
                HAS_BASE: tl.constexpr, HAS_BU: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_T: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """y = [base +] s (a W^T [+ bu]) on the rows `rows` of token block `tok`, columns [d_lo, d_hi) in BLOCK_D
    chunks, each written once: a (BLOCK_T, M_PAD) on chip, W[d, m] at w_ptr + d stride_wd + m stride_wm."""
    for d0 in range(d_lo, d_hi, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < d_hi
        w = tl.load(w_ptr + offs_d[None, :] * stride_wd + offs_m[:, None] * stride_wm,
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)                          # (M_PAD, BLOCK_D)
        out = _dot(a, w, tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32), FP32_DOT)
        if HAS_BU:
            out += tl.load(bu_ptr + offs_d * stride_bud, mask=mask_d, other=0.0).to(tl.float32)[None, :]
        out = scale * out
        mask = rows[:, None] & mask_d[None, :]
        if HAS_BASE:
            out += tl.load(base_ptr + tok[:, None] * stride_bt + offs_d[None, :] * stride_bd, mask=mask, other=0.0,
                           eviction_policy="evict_first").to(tl.float32)
        tl.store(y_ptr + tok[:, None] * stride_yt + offs_d[None, :] * stride_yd, out.to(y_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit
def adapter_rows_backward(
    dy_ptr, z_ptr, wu_ptr, a_ptr, dz_ptr, tok, rows, width, scale, act, D,
    stride_dyt, stride_dyd, stride_zt, stride_zm, stride_wud, stride_wum, stride_at, stride_am,
    FP32_DOT: tl.constexpr, M_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """For the rows `rows`: da = dy Wu over all of d; stores a = act(z) and dz = s da act'(z)."""
    offs_m = tl.arange(0, M_PAD)
    mask_m = offs_m < width
    da = rows_times_weight(dy_ptr, wu_ptr, tok, rows, offs_m, mask_m, D, stride_dyt, stride_dyd, stride_wud,
                           stride_wum, FP32_DOT, M_PAD, BLOCK_T, BLOCK_D)
    store_a_dz(da, z_ptr, a_ptr, dz_ptr, tok, rows, offs_m, mask_m, scale, act, stride_zt, stride_zm, stride_at,
               stride_am)


@triton.jit
def store_a_dz(da, z_ptr, a_ptr, dz_ptr, tok, rows, offs_m, mask_m, scale, act, stride_zt, stride_zm, stride_at,
               stride_am):
    """Given da on the rows `rows` x columns offs_m: stores a = act(z) and dz = s da act'(z) there."""
    mask = rows[:, None] & mask_m[None, :]
    z = tl.load(z_ptr + tok[:, None] * stride_zt + offs_m[None, :] * stride_zm, mask=mask, other=0.0)
    a, grad = _activate_with_grad(z.to(tl.float32), act)
    offs = tok[:, None] * stride_at + offs_m[None, :] * stride_am
    tl.store(a_ptr + offs, a.to(a_ptr.dtype.element_ty), mask=mask)
    tl.store(dz_ptr + offs, (scale * da * grad).to(dz_ptr.dtype.element_ty), mask=mask)


@triton.jit
def grad_sums(
    dy_ptr, h_ptr, a_ptr, dz_ptr, wd_ptr, dh_ptr, order_ptr, start, end, offs_d, m_lo, width, D,
    stride_dyt, stride_dyd, stride_ht, stride_hd, stride_at, stride_am, stride_wdm, stride_wdd,
    stride_dht, stride_dhd,
    HAS_ORDER: tl.constexpr, ADD_DY: tl.constexpr, NEED_DH: tl.constexpr, FP32_DOT: tl.constexpr,
    M_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Over rows start..end (positions in `order` when HAS_ORDER) on columns offs_d and bottleneck columns
    m_lo + [0, M_PAD): stores dh = [dy +] dz Wd (NEED_DH: only where the tile spans the whole width, m_lo = 0) and
    returns the fp32 sums dy^T a (BLOCK_D, M_PAD), dz^T h (M_PAD, BLOCK_D), sum dy, sum dz."""
    offs_m = m_lo + tl.arange(0, M_PAD)
    mask_m = offs_m < width
    mask_d = offs_d < D
    wd = tl.load(wd_ptr + offs_m[:, None] * stride_wdm + offs_d[None, :] * stride_wdd,
                 mask=mask_m[:, None] & mask_d[None, :], other=0.0)                             # (M_PAD, BLOCK_D)
    d_wu = tl.zeros((BLOCK_D, M_PAD), dtype=tl.float32)
    d_wd = tl.zeros((M_PAD, BLOCK_D), dtype=tl.float32)
    d_bu = tl.zeros((BLOCK_D,), dtype=tl.float32)
    d_bd = tl.zeros((M_PAD,), dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):
        pos = t0 + tl.arange(0, BLOCK_T)
        live = pos < end
        if HAS_ORDER:
            tok = tl.load(order_ptr + pos, mask=live, other=0).to(tl.int64)
        else:
            tok = pos.to(tl.int64)
        mask_td = live[:, None] & mask_d[None, :]
        mask_tm = live[:, None] & mask_m[None, :]
        dy = tl.load(dy_ptr + tok[:, None] * stride_dyt + offs_d[None, :] * stride_dyd, mask=mask_td, other=0.0,
                     eviction_policy="evict_first")
        h = tl.load(h_ptr + tok[:, None] * stride_ht + offs_d[None, :] * stride_hd, mask=mask_td, other=0.0,
                    eviction_policy="evict_first")
        a = tl.load(a_ptr + tok[:, None] * stride_at + offs_m[None, :] * stride_am, mask=mask_tm, other=0.0)
        dz = tl.load(dz_ptr + tok[:, None] * stride_at + offs_m[None, :] * stride_am, mask=mask_tm, other=0.0)
        if NEED_DH:
            dh = _dot(dz, wd, tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32), FP32_DOT)
            if ADD_DY:
                dh += dy.to(tl.float32)
            tl.store(dh_ptr + tok[:, None] * stride_dht + offs_d[None, :] * stride_dhd,
                     dh.to(dh_ptr.dtype.element_ty), mask=mask_td)
        d_wu = _dot(tl.trans(dy), a, d_wu, FP32_DOT)
        d_wd = _dot(tl.trans(dz), h, d_wd, FP32_DOT)
        d_bu += tl.sum(dy.to(tl.float32), axis=0)
        d_bd += tl.sum(dz.to(tl.float32), axis=0)
    return d_wu, d_wd, d_bu, d_bd


# ---------------------------------------------------------------------------------------------------- forward
@triton.jit
def _forward_kernel(
    h_ptr, base_ptr, y_ptr, z_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr,
    T, D, M, T_BUCKET,
    stride_ht, stride_hd, stride_bt, stride_bd, stride_yt, stride_yd, stride_zt, stride_zm,
    stride_wdm, stride_wdd, stride_wud, stride_wum,
    scale,
    ACT: tl.constexpr, HAS_BD: tl.constexpr, HAS_BU: tl.constexpr, STORE_Z: tl.constexpr,
    FP32_DOT: tl.constexpr, M_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    block, d_lo, d_hi = row_block_and_columns(T, D, BLOCK_T, BLOCK_D)
    tok = (block * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    adapter_forward(h_ptr, base_ptr, y_ptr, z_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr,
                    tok, tok < T, M, scale, ACT, D, d_lo, d_hi,
                    stride_ht, stride_hd, stride_bt, stride_bd, stride_yt, stride_yd, stride_zt, stride_zm,
                    stride_wdm, stride_wdd, 1, stride_wud, stride_wum, 1,
                    HAS_BD, HAS_BU, STORE_Z, FP32_DOT, M_PAD, BLOCK_T, BLOCK_D)


_forward = TunedLauncher(triton.autotune(
    rows_configs(), key=["T_BUCKET", "D", "M_PAD", "STORE_Z"], prune_configs_by={"early_config_prune": prune_rows},
    do_bench=tune_bench)(_forward_kernel))


@triton.jit
def _down_kernel(
    h_ptr, wd_ptr, bd_ptr, z_ptr,
    T, D, M, T_BUCKET,
    stride_ht, stride_hd, stride_wdm, stride_wdd, stride_zt, stride_zm,
    HAS_BD: tl.constexpr, FP32_DOT: tl.constexpr, M_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Split forward, first GEMM: z = h Wd^T + bd on a (BLOCK_T, BLOCK_M) tile, in z's dtype."""
    z, tok, rows, offs_m, mask_m = gemm_tile(h_ptr, wd_ptr, T, D, M, stride_ht, stride_hd, stride_wdd, stride_wdm,
                                             FP32_DOT, BLOCK_T, BLOCK_M, BLOCK_D)         # (BLOCK_T, BLOCK_M)
    if HAS_BD:
        z += tl.load(bd_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)[None, :]
    tl.store(z_ptr + tok[:, None] * stride_zt + offs_m[None, :] * stride_zm, z.to(z_ptr.dtype.element_ty),
             mask=rows[:, None] & mask_m[None, :])


@triton.jit
def _up_kernel(
    z_ptr, base_ptr, y_ptr, wu_ptr, bu_ptr,
    T, D, M, T_BUCKET,
    stride_zt, stride_zm, stride_bt, stride_bd, stride_yt, stride_yd, stride_wud, stride_wum,
    scale,
    ACT: tl.constexpr, HAS_BU: tl.constexpr, FP32_DOT: tl.constexpr, M_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Split forward, second GEMM: y = base + s (act(z) Wu^T + bu) on a row block's columns [d_lo, d_hi), the
    fused kernel's pass 2 on the stored z (act of z as the backward recomputes it, in z's dtype)."""
    stored_rows_expand(z_ptr, wu_ptr, base_ptr, y_ptr, bu_ptr, T, D, M, scale, ACT, stride_zt, stride_zm,
                       stride_bt, stride_bd, stride_yt, stride_yd, stride_wud, stride_wum,
                       True, True, HAS_BU, FP32_DOT, M_PAD, BLOCK_T, BLOCK_D)


@triton.jit
def stored_rows_expand(s_ptr, w_ptr, base_ptr, y_ptr, bu_ptr, T, D, M, scale, act, stride_st, stride_sm,
                       stride_bt, stride_bd, stride_yt, stride_yd, stride_wd, stride_wm,
                       ACTIVATE: tl.constexpr, HAS_BASE: tl.constexpr, HAS_BU: tl.constexpr, FP32_DOT: tl.constexpr,
                       M_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """rows_expand on this program's row block and columns (row_block_and_columns) of a (T, M) tensor read from
    memory at s_ptr: act(s) with ACTIVATE (zero past M, in W's dtype), else s as stored."""
    block, d_lo, d_hi = row_block_and_columns(T, D, BLOCK_T, BLOCK_D)
    tok = (block * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    rows = tok < T
    offs_m = tl.arange(0, M_PAD)
    mask_m = offs_m < M
    a = tl.load(s_ptr + tok[:, None] * stride_st + offs_m[None, :] * stride_sm, mask=rows[:, None] & mask_m[None, :],
                other=0.0)                                                                      # (BLOCK_T, M_PAD)
    if ACTIVATE:
        a = tl.where(mask_m[None, :], _activate(a.to(tl.float32), act), 0.0).to(w_ptr.dtype.element_ty)
    rows_expand(a, w_ptr, base_ptr, y_ptr, bu_ptr, tok, rows, offs_m, mask_m, scale, d_lo, d_hi,
                stride_bt, stride_bd, stride_yt, stride_yd, stride_wd, stride_wm, 1,
                HAS_BASE, HAS_BU, FP32_DOT, BLOCK_T, BLOCK_D)


_down = TunedLauncher(triton.autotune(
    down_configs(), key=["T_BUCKET", "D", "M_PAD"], prune_configs_by={"early_config_prune": prune_down},
    do_bench=tune_bench)(_down_kernel))
_up = TunedLauncher(triton.autotune(
    rows_configs(), key=["T_BUCKET", "D", "M_PAD"], prune_configs_by={"early_config_prune": prune_rows},
    do_bench=tune_bench)(_up_kernel))


def bottleneck_forward(h: torch.Tensor, down_weight: torch.Tensor, down_bias: torch.Tensor | None,
                       up_weight: torch.Tensor, up_bias: torch.Tensor | None, scale: float, act: int,
                       residual: torch.Tensor | None = None, save_z: bool = True,
                       out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y = (h or residual) + scale * (act(h down_weight^T + down_bias) up_weight^T + up_bias).

    h (T, d) and residual (T, d) any strides; down_weight (m, d); up_weight (d, m); biases contiguous or None;
    act an activation code (RELU, GELU, SILU). Returns y (T, d) and, with save_z, z = h down_weight^T +
    down_bias (T, m) in h's dtype (backward's input). `out` (T, d), if given, receives y.
    """
    T, D = h.shape
    M = down_weight.shape[0]
    y, z = forward_outputs(h, M, save_z, out)
    if T == 0:
        return y, z
    base = h if residual is None else residual
    m_pad = width_tile(M)
    grid = lambda meta: row_grid(T, D, meta, 1, h.device)
    if split_forward(m_pad):
        if z is None:
            z = torch.empty((T, M), device=h.device, dtype=h.dtype)                          # (T, m) scratch
        _down.launch((t_bucket(T), D, m_pad, down_bias is None, h.dtype),
            lambda meta: (cdiv(T, meta["BLOCK_T"]) * cdiv(M, meta["BLOCK_M"]),),
            h, down_weight, z if down_bias is None else down_bias, z,
            T, D, M, t_bucket(T),
            h.stride(0), h.stride(1), down_weight.stride(0), down_weight.stride(1), z.stride(0), z.stride(1),
            HAS_BD=down_bias is not None, FP32_DOT=h.dtype == torch.float32, M_PAD=m_pad,
        )
        _up.launch((t_bucket(T), D, m_pad, act, up_bias is None, h.dtype, base.dtype), grid,
            z, base, y, up_weight, y if up_bias is None else up_bias,
            T, D, M, t_bucket(T),
            z.stride(0), z.stride(1), base.stride(0), base.stride(1), y.stride(0), y.stride(1),
            up_weight.stride(0), up_weight.stride(1),
            float(scale),
            ACT=act, HAS_BU=up_bias is not None, FP32_DOT=h.dtype == torch.float32, M_PAD=m_pad,
        )
        return y, (z if save_z else None)
    key = (t_bucket(T), D, m_pad, save_z, act, down_bias is None, up_bias is None, h.dtype, base.dtype)
    _forward.launch(key, grid,
        h, base, y, y if z is None else z, down_weight, y if down_bias is None else down_bias, up_weight,
        y if up_bias is None else up_bias,
        T, D, M, t_bucket(T),
        h.stride(0), h.stride(1), base.stride(0), base.stride(1), y.stride(0), y.stride(1),
        0 if z is None else z.stride(0), 0 if z is None else z.stride(1),
        down_weight.stride(0), down_weight.stride(1), up_weight.stride(0), up_weight.stride(1),
        float(scale),
        ACT=act, HAS_BD=down_bias is not None, HAS_BU=up_bias is not None, STORE_Z=save_z,
        FP32_DOT=h.dtype == torch.float32, M_PAD=m_pad,
    )
    return y, z


# --------------------------------------------------------------------------------------------------- backward
@triton.jit
def _rows_backward_kernel(
    dy_ptr, z_ptr, wu_ptr, a_ptr, dz_ptr,
    T, D, M, T_BUCKET,
    stride_dyt, stride_dyd, stride_zt, stride_zm, stride_wud, stride_wum, stride_at, stride_am,
    scale,
    ACT: tl.constexpr, FP32_DOT: tl.constexpr, M_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tok = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    adapter_rows_backward(dy_ptr, z_ptr, wu_ptr, a_ptr, dz_ptr, tok, tok < T, M, scale, ACT, D,
                          stride_dyt, stride_dyd, stride_zt, stride_zm, stride_wud, stride_wum, stride_at, stride_am,
                          FP32_DOT, M_PAD, BLOCK_T, BLOCK_D)


@triton.jit
def _rows_backward_tiled_kernel(
    dy_ptr, z_ptr, wu_ptr, a_ptr, dz_ptr,
    T, D, M, T_BUCKET,
    stride_dyt, stride_dyd, stride_zt, stride_zm, stride_wud, stride_wum, stride_at, stride_am,
    scale,
    ACT: tl.constexpr, FP32_DOT: tl.constexpr, M_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The split path's rows kernel (wide bottlenecks): da = dy Wu on a (BLOCK_T, BLOCK_M) GEMM tile, then a and
    dz there."""
    da, tok, rows, offs_m, mask_m = gemm_tile(dy_ptr, wu_ptr, T, D, M, stride_dyt, stride_dyd, stride_wud,
                                              stride_wum, FP32_DOT, BLOCK_T, BLOCK_M, BLOCK_D)  # (BLOCK_T, BLOCK_M)
    store_a_dz(da, z_ptr, a_ptr, dz_ptr, tok, rows, offs_m, mask_m, scale, ACT, stride_zt, stride_zm, stride_at,
               stride_am)


_rows_backward = TunedLauncher(triton.autotune(
    rows_configs(), key=["T_BUCKET", "D", "M_PAD"], prune_configs_by={"early_config_prune": prune_rows},
    do_bench=tune_bench)(_rows_backward_kernel))
_rows_backward_tiled = TunedLauncher(triton.autotune(
    rows_tiled_configs(), key=["T_BUCKET", "D", "M_PAD"], prune_configs_by={"early_config_prune": prune_down},
    do_bench=tune_bench)(_rows_backward_tiled_kernel))


@triton.jit
def _store_grads(d_wu, d_wd, d_bu, d_bd, dwu_ptr, dwd_ptr, dbu_ptr, dbd_ptr, offs_d, mask_d, offs_m, mask_m, D, M,
                 with_bu, with_bd):
    """Tile (offs_d, offs_m) of dWu (D, M) and dWd (M, D), with with_bu dbu's offs_d (D,) and with with_bd dbd's
    offs_m (M,): contiguous, in the pointers' dtypes."""
    tl.store(dwu_ptr + offs_d[:, None] * M + offs_m[None, :], d_wu.to(dwu_ptr.dtype.element_ty),
             mask=mask_d[:, None] & mask_m[None, :])
    tl.store(dwd_ptr + offs_m[:, None] * D + offs_d[None, :], d_wd.to(dwd_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])
    tl.store(dbu_ptr + offs_d, d_bu.to(dbu_ptr.dtype.element_ty), mask=mask_d & with_bu)
    tl.store(dbd_ptr + offs_m, d_bd.to(dbd_ptr.dtype.element_ty), mask=mask_m & with_bd)


@triton.jit
def _finish_grads(d_wu, d_wd, d_bu, d_bd, dwu_ptr, dwd_ptr, dbu_ptr, dbd_ptr, part_ptr, count_ptr, chunk, CHUNKS,
                  tile, offs_d, offs_m, D, M, with_bu, with_bd):
    """A chunk's sums over one gradient tile: stored as the gradients (one chunk), else as this chunk's partials
    in the workspace, per chunk [dWu (D, M) | dWd (M, D) | dbu (D) | dbd (M)]; the last chunk of the tile to
    arrive (counter `tile`) adds them up in chunk order, whichever it is (deterministic), and stores the sums."""
    mask_m = offs_m < M
    mask_d = offs_d < D
    if CHUNKS == 1:
        _store_grads(d_wu, d_wd, d_bu, d_bd, dwu_ptr, dwd_ptr, dbu_ptr, dbd_ptr, offs_d, mask_d, offs_m, mask_m,
                     D, M, with_bu, with_bd)
    else:
        per_chunk = 2 * D * M + D + M
        part = part_ptr + chunk * per_chunk
        _store_grads(d_wu, d_wd, d_bu, d_bd, part, part + D * M, part + 2 * D * M, part + 2 * D * M + D,
                     offs_d, mask_d, offs_m, mask_m, D, M, with_bu, with_bd)
        if arrive_last(count_ptr, tile, CHUNKS):
            tl.atomic_xchg(count_ptr + tile, 0)
            d_wu = tl.zeros_like(d_wu)
            d_wd = tl.zeros_like(d_wd)
            d_bu = tl.zeros_like(d_bu)
            d_bd = tl.zeros_like(d_bd)
            for c in range(CHUNKS):
                part = part_ptr + c * per_chunk
                d_wu += tl.load(part + offs_d[:, None] * M + offs_m[None, :], mask=mask_d[:, None] & mask_m[None, :],
                                other=0.0, cache_modifier=".cg")
                d_wd += tl.load(part + D * M + offs_m[:, None] * D + offs_d[None, :],
                                mask=mask_m[:, None] & mask_d[None, :], other=0.0, cache_modifier=".cg")
                d_bu += tl.load(part + 2 * D * M + offs_d, mask=mask_d & with_bu, other=0.0, cache_modifier=".cg")
                d_bd += tl.load(part + 2 * D * M + D + offs_m, mask=mask_m & with_bd, other=0.0,
                                cache_modifier=".cg")
            _store_grads(d_wu, d_wd, d_bu, d_bd, dwu_ptr, dwd_ptr, dbu_ptr, dbd_ptr, offs_d, mask_d, offs_m,
                         mask_m, D, M, with_bu, with_bd)


@triton.jit
def _grads_kernel(
    dy_ptr, h_ptr, a_ptr, dz_ptr, wd_ptr, dh_ptr, dwu_ptr, dwd_ptr, dbu_ptr, dbd_ptr, part_ptr, count_ptr,
    T, D, M, T_BUCKET, CHUNK, CHUNKS,
    stride_dyt, stride_dyd, stride_ht, stride_hd, stride_at, stride_am, stride_wdm, stride_wdd,
    stride_dht, stride_dhd,
    scale,
    ADD_DY: tl.constexpr, NEED_DH: tl.constexpr, FP32_DOT: tl.constexpr, M_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Narrow bottlenecks: a program owns BLOCK_D columns over the whole width, dh on its tile included."""
    num_d = tl.cdiv(D, BLOCK_D)
    pid_d = tl.program_id(0) % num_d       # column blocks of one chunk run side by side: its a, dz stay in L2
    chunk = tl.program_id(0) // num_d
    start = chunk * CHUNK
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_wu, d_wd, d_bu, d_bd = grad_sums(
        dy_ptr, h_ptr, a_ptr, dz_ptr, wd_ptr, dh_ptr, dh_ptr, start, tl.minimum(T, start + CHUNK), offs_d, 0, M, D,
        stride_dyt, stride_dyd, stride_ht, stride_hd, stride_at, stride_am, stride_wdm, stride_wdd,
        stride_dht, stride_dhd,
        False, ADD_DY, NEED_DH, FP32_DOT, M_PAD, BLOCK_T, BLOCK_D)
    _finish_grads(scale * d_wu, d_wd, scale * d_bu, d_bd, dwu_ptr, dwd_ptr, dbu_ptr, dbd_ptr, part_ptr, count_ptr,
                  chunk, CHUNKS, pid_d, offs_d, tl.arange(0, M_PAD), D, M, True, pid_d == 0)


@triton.jit
def _rows_product(g_ptr, x_ptr, start, end, offs_d, mask_d, offs_m, mask_m, stride_gt, stride_gd, stride_xt,
                  stride_xm, FP32_DOT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_M: tl.constexpr):
    """Over rows start..end: G[:, offs_d]^T X[:, offs_m] (BLOCK_D, BLOCK_M) and the column sums of G (BLOCK_D,)
    and X (BLOCK_M,), fp32."""
    acc = tl.zeros((BLOCK_D, BLOCK_M), dtype=tl.float32)
    sum_g = tl.zeros((BLOCK_D,), dtype=tl.float32)
    sum_x = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):
        tok = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        live = tok < end
        g = tl.load(g_ptr + tok[:, None] * stride_gt + offs_d[None, :] * stride_gd,
                    mask=live[:, None] & mask_d[None, :], other=0.0)          # (BLOCK_T, BLOCK_D)
        x = tl.load(x_ptr + tok[:, None] * stride_xt + offs_m[None, :] * stride_xm,
                    mask=live[:, None] & mask_m[None, :], other=0.0)          # (BLOCK_T, BLOCK_M)
        acc = _dot(tl.trans(g), x, acc, FP32_DOT)
        sum_g += tl.sum(g.to(tl.float32), axis=0)
        sum_x += tl.sum(x.to(tl.float32), axis=0)
    return acc, sum_g, sum_x


@triton.jit
def _store_weight_grad(acc, bias_d, bias_m, w_ptr, b_ptr, stride_wd, stride_wm, offs_d, mask_d, offs_m, mask_m,
                       with_bias_d, with_bias_m):
    """A (BLOCK_D, BLOCK_M) gradient tile at w_ptr + d stride_wd + m stride_wm in w's dtype, and its bias: over d
    (bias_d at b_ptr + d, with_bias_d) or over m (bias_m at b_ptr + m, with_bias_m)."""
    tl.store(w_ptr + offs_d[:, None] * stride_wd + offs_m[None, :] * stride_wm, acc.to(w_ptr.dtype.element_ty),
             mask=mask_d[:, None] & mask_m[None, :])
    tl.store(b_ptr + offs_d, bias_d.to(b_ptr.dtype.element_ty), mask=mask_d & with_bias_d)
    tl.store(b_ptr + offs_m, bias_m.to(b_ptr.dtype.element_ty), mask=mask_m & with_bias_m)


@triton.jit
def _weight_grads_kernel(
    dy_ptr, h_ptr, a_ptr, dz_ptr, dwu_ptr, dwd_ptr, dbu_ptr, dbd_ptr, part_ptr, count_ptr,
    T, D, M, T_BUCKET, CHUNK, CHUNKS,
    stride_dyt, stride_dyd, stride_ht, stride_hd, stride_at, stride_am,
    scale,
    FP32_DOT: tl.constexpr, M_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Wide bottlenecks (wide_backward): a program owns a (BLOCK_D, BLOCK_M) tile of ONE weight gradient over one
    chunk of rows: dWu = s dy^T a (its m tile 0 also dbu = s sum dy) or dWd^T = h^T dz (its d tile 0 also
    dbd = sum dz). One fp32 accumulator leaves room for m tiles twice as wide as a program holding both (each m
    tile re-reads its dy or h columns). A chunk's tiles run side by side, its rows in L2. Several chunks: partials
    per chunk [dWu (D, M) | dWd (M, D) | dbu (D) | dbd (M)], the last of a tile's chunks to arrive adds them up in
    chunk order (deterministic) and stores the gradient."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_d = tl.cdiv(D, BLOCK_D)
    tiles = num_m * num_d
    pid = tl.program_id(0)
    pid_m = pid % num_m
    pid_d = (pid // num_m) % num_d
    which = (pid // tiles) % 2                        # 0: dWu and dbu; 1: dWd and dbd
    chunk = pid // (2 * tiles)
    start = chunk * CHUNK
    end = tl.minimum(T, start + CHUNK)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_d = offs_d < D
    mask_m = offs_m < M
    if which == 0:
        acc, bias_d, bias_m = _rows_product(dy_ptr, a_ptr, start, end, offs_d, mask_d, offs_m, mask_m, stride_dyt,
                                            stride_dyd, stride_at, stride_am, FP32_DOT, BLOCK_T, BLOCK_D, BLOCK_M)
        acc = scale * acc
        bias_d = scale * bias_d
    else:
        acc, bias_d, bias_m = _rows_product(h_ptr, dz_ptr, start, end, offs_d, mask_d, offs_m, mask_m, stride_ht,
                                            stride_hd, stride_at, stride_am, FP32_DOT, BLOCK_T, BLOCK_D, BLOCK_M)
    with_bias_d = (which == 0) & (pid_m == 0)       # dbu over d, once per d tile
    with_bias_m = (which == 1) & (pid_d == 0)       # dbd over m, once per m tile
    last = pid >= 0                                 # this program stores the gradient (one chunk: every one)
    if CHUNKS > 1:
        # this gradient's place among a chunk's partials (fp32, dWd stored (M, D) as the gradient)
        stride_wd = tl.where(which == 0, M, 1)
        stride_wm = tl.where(which == 0, 1, D)
        w_off = which * D * M
        b_off = 2 * D * M + which * D
        part = part_ptr + chunk * (2 * D * M + D + M)
        _store_weight_grad(acc, bias_d, bias_m, part + w_off, part + b_off, stride_wd, stride_wm, offs_d, mask_d,
                           offs_m, mask_m, with_bias_d, with_bias_m)
        tile = which * tiles + pid_d * num_m + pid_m
        last = arrive_last(count_ptr, tile, CHUNKS)
        if last:
            tl.atomic_xchg(count_ptr + tile, 0)
            acc = tl.zeros_like(acc)
            bias_d = tl.zeros_like(bias_d)
            bias_m = tl.zeros_like(bias_m)
            for c in range(CHUNKS):
                part = part_ptr + c * (2 * D * M + D + M)
                acc += tl.load(part + w_off + offs_d[:, None] * stride_wd + offs_m[None, :] * stride_wm,
                               mask=mask_d[:, None] & mask_m[None, :], other=0.0, cache_modifier=".cg")
                bias_d += tl.load(part + b_off + offs_d, mask=mask_d & with_bias_d, other=0.0, cache_modifier=".cg")
                bias_m += tl.load(part + b_off + offs_m, mask=mask_m & with_bias_m, other=0.0, cache_modifier=".cg")
    if last:
        if which == 0:
            _store_weight_grad(acc, bias_d, bias_m, dwu_ptr, dbu_ptr, M, 1, offs_d, mask_d, offs_m, mask_m,
                               with_bias_d, False)
        else:
            _store_weight_grad(acc, bias_d, bias_m, dwd_ptr, dbd_ptr, 1, D, offs_d, mask_d, offs_m, mask_m, False,
                               with_bias_m)


@triton.jit
def _input_grad_kernel(
    dy_ptr, dz_ptr, wd_ptr, dh_ptr,
    T, D, M, T_BUCKET,
    stride_dyt, stride_dyd, stride_zt, stride_zm, stride_wdm, stride_wdd, stride_dht, stride_dhd,
    ADD_DY: tl.constexpr, FP32_DOT: tl.constexpr, M_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Wide bottlenecks: dh = [dy +] dz Wd on a row block's columns [d_lo, d_hi), the forward's pass 2 with dz
    for a and Wd^T for Wu."""
    stored_rows_expand(dz_ptr, wd_ptr, dy_ptr, dh_ptr, dh_ptr, T, D, M, 1.0, 0, stride_zt, stride_zm,
                       stride_dyt, stride_dyd, stride_dht, stride_dhd, stride_wdd, stride_wdm,
                       False, ADD_DY, False, FP32_DOT, M_PAD, BLOCK_T, BLOCK_D)


_grads = TunedLauncher(triton.autotune(
    grads_configs(), key=["T_BUCKET", "D", "M_PAD", "NEED_DH"], prune_configs_by={"early_config_prune": prune_grads},
    do_bench=tune_bench)(_grads_kernel))
_weight_grads = TunedLauncher(triton.autotune(
    weight_grad_configs(), key=["T_BUCKET", "D", "M_PAD"], prune_configs_by={"early_config_prune": prune_weight_grad},
    do_bench=tune_bench)(_weight_grads_kernel))
_input_grad = TunedLauncher(triton.autotune(
    rows_configs(), key=["T_BUCKET", "D", "M_PAD", "ADD_DY"], prune_configs_by={"early_config_prune": prune_rows},
    do_bench=tune_bench)(_input_grad_kernel))


def bottleneck_backward(dy: torch.Tensor, h: torch.Tensor, z: torch.Tensor, down_weight: torch.Tensor,
                        up_weight: torch.Tensor, scale: float, act: int, add_dy: bool, need_dh: bool,
                        rows_per_chunk: int | None = None, out: torch.Tensor | None = None,
                        grad_dtype: torch.dtype | None = None):
    """Gradients of y = base + s (act(h Wd^T + bd) Wu^T + bu) given dy, from h and the forward's z.

    dy, h (T, d) any strides; z (T, m); down_weight (m, d); up_weight (d, m). add_dy: base is h (dh gains dy);
    need_dh: compute dh at all. rows_per_chunk: rows per partial sum of the weight gradients (None picks per
    shape). `out` (T, d), if given, receives dh. Returns dh (T, d) or None, d_down_weight (m, d) and d_down_bias
    (m,) in down_weight's dtype, d_up_weight (d, m) and d_up_bias (d,) in up_weight's (fp32 sums either way), or
    all four in grad_dtype if given (float32 master weights read here in h's dtype).
    """
    T, D = h.shape
    M = down_weight.shape[0]
    dh = (torch.empty((T, D), device=h.device, dtype=h.dtype) if out is None else out) if need_dh else None
    down_dtype, up_dtype = (grad_dtype, grad_dtype) if grad_dtype is not None else (down_weight.dtype, up_weight.dtype)
    if T == 0:
        return dh, down_weight.new_zeros((M, D), dtype=down_dtype), down_weight.new_zeros((M,), dtype=down_dtype), \
            up_weight.new_zeros((D, M), dtype=up_dtype), up_weight.new_zeros((D,), dtype=up_dtype)
    m_pad = width_tile(M)
    a_dz = torch.empty((2, T, M), device=h.device, dtype=h.dtype)       # a = act(z) and dz, one layout
    rows_args = (dy, z, up_weight, a_dz[0], a_dz[1],
                 T, D, M, t_bucket(T),
                 dy.stride(0), dy.stride(1), z.stride(0), z.stride(1), up_weight.stride(0), up_weight.stride(1),
                 a_dz.stride(1), a_dz.stride(2),
                 float(scale))
    rows_key = (t_bucket(T), D, m_pad, act, dy.dtype)
    if split_forward(m_pad):
        tiles = lambda meta: (cdiv(T, meta["BLOCK_T"]) * cdiv(M, meta["BLOCK_M"]),)
        _rows_backward_tiled.launch(rows_key, tiles,
                                    *rows_args, ACT=act, FP32_DOT=h.dtype == torch.float32, M_PAD=m_pad)
    else:
        _rows_backward.launch(rows_key, lambda meta: (cdiv(T, meta["BLOCK_T"]),),
                              *rows_args, ACT=act, FP32_DOT=h.dtype == torch.float32, M_PAD=m_pad)
    wide = wide_backward(D, m_pad)
    chunk = rows_per_chunk or (wide_chunk_rows(T, D, m_pad, h.device, gradients=2) if wide
                               else chunk_rows(T, D, m_pad, h.device))
    chunks = cdiv(T, chunk)
    d_wu, d_bu = up_weight.new_empty((D, M), dtype=up_dtype), up_weight.new_empty((D,), dtype=up_dtype)
    d_wd, d_bd = down_weight.new_empty((M, D), dtype=down_dtype), down_weight.new_empty((M,), dtype=down_dtype)
    counters, part = (split_state(h.device, 2 * cdiv(D, 16) * cdiv(m_pad, 16), chunks * (2 * D * M + D + M))
                      if chunks > 1 else (d_wu, d_wu))
    if wide:
        grid = lambda meta: (2 * cdiv(D, meta["BLOCK_D"]) * cdiv(M, meta["BLOCK_M"]) * chunks,)
        _weight_grads.launch((t_bucket(T), D, m_pad, dy.dtype), grid,
            dy, h, a_dz[0], a_dz[1], d_wu, d_wd, d_bu, d_bd, part, counters,
            T, D, M, t_bucket(T), chunk, chunks,
            dy.stride(0), dy.stride(1), h.stride(0), h.stride(1), a_dz.stride(1), a_dz.stride(2),
            float(scale),
            FP32_DOT=h.dtype == torch.float32, M_PAD=m_pad,
        )
        if need_dh:
            grid = lambda meta: row_grid(T, D, meta, 1, h.device)
            _input_grad.launch((t_bucket(T), D, m_pad, add_dy, dy.dtype), grid,
                dy, a_dz[1], down_weight, dh,
                T, D, M, t_bucket(T),
                dy.stride(0), dy.stride(1), a_dz.stride(1), a_dz.stride(2), down_weight.stride(0),
                down_weight.stride(1), dh.stride(0), dh.stride(1),
                ADD_DY=add_dy, FP32_DOT=h.dtype == torch.float32, M_PAD=m_pad,
            )
        return dh, d_wd, d_bd, d_wu, d_bu
    grid = lambda meta: (cdiv(D, meta["BLOCK_D"]) * chunks,)
    _grads.launch((t_bucket(T), D, m_pad, need_dh, add_dy, dy.dtype), grid,
        dy, h, a_dz[0], a_dz[1], down_weight, dy if dh is None else dh, d_wu, d_wd, d_bu, d_bd, part, counters,
        T, D, M, t_bucket(T), chunk, chunks,
        dy.stride(0), dy.stride(1), h.stride(0), h.stride(1), a_dz.stride(1), a_dz.stride(2),
        down_weight.stride(0), down_weight.stride(1),
        0 if dh is None else dh.stride(0), 0 if dh is None else dh.stride(1),
        float(scale),
        ADD_DY=add_dy, NEED_DH=need_dh, FP32_DOT=h.dtype == torch.float32, M_PAD=m_pad,
    )
    return dh, d_wd, d_bd, d_wu, d_bu
