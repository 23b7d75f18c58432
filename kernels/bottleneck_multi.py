"""Multi-adapter bottleneck adapters: each token t picks slot a = idx[t] (or -1, none) of stacked adapters.

    y[t] = base[t] + s_a (act_a(h[t] Wd_a^T + bd_a) Wu_a^T + bu_a),     y[t] = base[t] exactly where a = -1

Slots are stacked: Wd (S, m_max, d), bd (S, m_max), Wu (S, d, m_max), bu (S, d), zero beyond each slot's width
m_a; widths, scales and activation codes are device tensors (S,), and nothing reads the mapping on the host, so
a CUDA graph can replay with a new mapping in the same buffers.

The kernels of kernels/bottleneck.py, per slot:
- forward at prefill: the slot-sorted rows cut into BLOCK_T-row blocks that never straddle two slots (at most
  ceil(T / BLOCK_T) + S + 1 of them), so a program runs the fused two-pass adapter once, for one slot, as the
  one-adapter kernel does (a loop over a block's slots, beside a pass that alone takes 243 of the 255
  registers, spilled). At decode a row block of the batch as it comes runs the pass once for each distinct
  slot among its rows, on those rows only, slot lanes spreading them over programs. Rows with no adapter are
  copied.
- backward rows: da, a = act(z), dz per distinct slot likewise.
- backward grads: the slot-sorted rows cut into chunks that never straddle two slots (at most
  ceil(T / CHUNK) + S + 1 of them); a program owns (chunk, column block): dh on its tile, and its partial
  weight gradients added into its slot's (fp32 atomics, so a slot of several chunks sums in any order).
Each slot runs at its own width tile (the next power of two >= 16: 16, 32, 64, 128 or 256 wide), chosen per
slot inside the kernel: mixed widths never cost the compute of the widest; a width pays at most the distance to
its power of two (none for the usual 16 / 32 / 64 / ...), and rows with no adapter cost only their copy.

Floor with A distinct adapters used: as kernels/bottleneck.py with 2 m d replaced by sum over used a of 2 m_a d.
At decode every distinct adapter's weights are read once per row block: the floor's own weight bytes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import bottleneck as single
from .bottleneck import (adapter_forward, adapter_rows_backward, chunk_rows, column_shares,
                         forward_outputs, grad_sums, row_block_and_columns, row_grid, rows_expand, share_columns,
                         wide_chunk_rows, width_tile)
from .bottleneck_configs import (grads_configs, multi_rows_configs, prune_grads, prune_rows, prune_wide_grads,
                                 wide_grads_configs)
from .configs import DECODE_MAX_T, TunedLauncher, cdiv, next_pow2, t_bucket, tune_bench  # noqa: F401
from .lora_multi import token_segments  # noqa: F401

MIN_TILE = tl.constexpr(16)
LOG2_MIN_TILE = tl.constexpr(4)    # width tiles 16 ...
LOG2_MAX_TILE = tl.constexpr(8)    # ... 256 (MAX_WIDTH)
# Past every slot id: "no further slot in this block" (jit code may read only constexpr globals).
NO_SLOT = tl.constexpr(2**30)


@triton.jit
def _next_slot(slot, after):
    """The smallest slot id among a block's rows that is greater than `after` (NO_SLOT when none is): a row
    block of the batch as it comes visits each distinct slot once, in as many steps as it has distinct slots."""
    return tl.min(tl.where(slot > after, slot, NO_SLOT), axis=0)


@triton.jit
def _runs_at_tile(width, c: tl.constexpr):
    """Whether a slot of this width runs at tile 2^c: its width tile, the next power of two >= 16 (none for an
    empty slot, width 0)."""
    w = tl.maximum(width, MIN_TILE)
    return (width > 0) & (w > (1 << c) // 2) & (w <= (1 << c))


@triton.jit
def _copy_rows(tok, rows, base_ptr, y_ptr, d_lo, d_hi, stride_bt, stride_bd, stride_yt, stride_yd,
               BLOCK_D: tl.constexpr):
    """y = base exactly on the rows with no adapter (or an empty slot), columns [d_lo, d_hi)."""
    for d0 in range(d_lo, d_hi, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = rows[:, None] & (offs_d < d_hi)[None, :]
        base = tl.load(base_ptr + tok[:, None] * stride_bt + offs_d[None, :] * stride_bd, mask=mask)
        tl.store(y_ptr + tok[:, None] * stride_yt + offs_d[None, :] * stride_yd, base, mask=mask)


# ---------------------------------------------------------------------------------------------------- forward
@triton.jit
def _slot_forward(h_ptr, base_ptr, y_ptr, z_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr, sizes_ptr, scales_ptr, acts_ptr,
                  slot, tok, rows, D, M_MAX, d_lo, d_hi,
                  stride_ht, stride_hd, stride_bt, stride_bd, stride_yt, stride_yd, stride_zt, stride_zm,
                  stride_wds, stride_wdm, stride_wdd, stride_bds, stride_bdm, stride_wus, stride_wud, stride_wum,
                  stride_bus, stride_bud,
                  STORE_Z: tl.constexpr, FP32_DOT: tl.constexpr, M_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """Slot `slot`'s adapter on the rows `rows` of token block `tok` (columns [d_lo, d_hi) of y), at its width
    tile; a copy of base where the slot is empty."""
    width = tl.minimum(tl.load(sizes_ptr + slot), M_MAX)
    if width > 0:
        scale = tl.load(scales_ptr + slot)
        act = tl.load(acts_ptr + slot)
        s64 = slot.to(tl.int64)
        for c in tl.static_range(LOG2_MIN_TILE, LOG2_MAX_TILE + 1):
            if (1 << c) <= M_PAD:
                if _runs_at_tile(width, c):
                    adapter_forward(
                        h_ptr, base_ptr, y_ptr, z_ptr, wd_ptr + s64 * stride_wds, bd_ptr + s64 * stride_bds,
                        wu_ptr + s64 * stride_wus, bu_ptr + s64 * stride_bus,
                        tok, rows, width, scale, act, D, d_lo, d_hi,
                        stride_ht, stride_hd, stride_bt, stride_bd, stride_yt, stride_yd, stride_zt,
                        stride_zm, stride_wdm, stride_wdd, stride_bdm, stride_wud, stride_wum, stride_bud,
                        True, True, STORE_Z, FP32_DOT, 1 << c, BLOCK_T, BLOCK_D)
    else:  # an empty slot: no adapter
        _copy_rows(tok, rows, base_ptr, y_ptr, d_lo, d_hi, stride_bt, stride_bd, stride_yt, stride_yd, BLOCK_D)


@triton.jit
def segment_chunk(bounds_ptr, S, chunk, CHUNK, S_PAD: tl.constexpr):
    """(segment j, start, end) of chunk number `chunk` of the slot-sorted order: segment j = 0 holds the tokens
    with no adapter, j = a + 1 slot a's (order[bounds[j - 1]:bounds[j]]), each cut into ceil(len / CHUNK)
    chunks; start == end for a chunk number past them all."""
    j = tl.arange(0, S_PAD)
    seg_end = tl.load(bounds_ptr + j, mask=j <= S, other=0)
    seg_start = tl.load(bounds_ptr + j - 1, mask=(j >= 1) & (j <= S), other=0)
    n = tl.cdiv(seg_end - seg_start, CHUNK)
    first = tl.cumsum(n, axis=0) - n
    seg = tl.sum((first + n <= chunk).to(tl.int32), axis=0)
    at = j == seg
    start = tl.sum(tl.where(at, seg_start + (chunk - first) * CHUNK, 0), axis=0)
    end = tl.minimum(tl.sum(tl.where(at, seg_end, 0), axis=0), start + CHUNK)
    return seg, start, end


@triton.jit
def segment_tokens(order_ptr, start, end, BLOCK_T: tl.constexpr):
    """(tokens, live) of rows start..end of the slot-sorted order, BLOCK_T of them."""
    pos = start + tl.arange(0, BLOCK_T)
    rows = pos < end
    return tl.load(order_ptr + pos, mask=rows, other=0).to(tl.int64), rows


@triton.jit
def segment_slot(seg, sizes_ptr, M_MAX):
    """(slot, width) of segment seg: slot seg - 1 and its width; 0 and 0 for segment 0 (no adapter)."""
    slot = tl.maximum(seg - 1, 0)
    return slot, tl.where(seg > 0, tl.minimum(tl.load(sizes_ptr + slot), M_MAX), 0)


@triton.jit
def _segment_forward_kernel(
    h_ptr, base_ptr, y_ptr, z_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr, order_ptr, bounds_ptr, sizes_ptr, scales_ptr,
    acts_ptr,
    T, D, S, M_MAX, T_BUCKET,
    stride_ht, stride_hd, stride_bt, stride_bd, stride_yt, stride_yd, stride_zt, stride_zm,
    stride_wds, stride_wdm, stride_wdd, stride_bds, stride_bdm, stride_wus, stride_wud, stride_wum,
    stride_bus, stride_bud,
    STORE_Z: tl.constexpr, FP32_DOT: tl.constexpr, M_PAD: tl.constexpr, S_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # axis 0: blocks of one slot's rows (segment_chunk); axis 1: pass 2's column shares
    seg, start, end = segment_chunk(bounds_ptr, S, tl.program_id(0), BLOCK_T, S_PAD)
    if start < end:
        d_lo, d_hi = share_columns(tl.program_id(1), tl.num_programs(1), D, BLOCK_D)
        tok, rows = segment_tokens(order_ptr, start, end, BLOCK_T)
        if seg > 0:
            _slot_forward(h_ptr, base_ptr, y_ptr, z_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr, sizes_ptr, scales_ptr,
                          acts_ptr, seg - 1, tok, rows, D, M_MAX, d_lo, d_hi,
                          stride_ht, stride_hd, stride_bt, stride_bd, stride_yt, stride_yd, stride_zt, stride_zm,
                          stride_wds, stride_wdm, stride_wdd, stride_bds, stride_bdm, stride_wus, stride_wud,
                          stride_wum, stride_bus, stride_bud, STORE_Z, FP32_DOT, M_PAD, BLOCK_T, BLOCK_D)
        else:  # the tokens with no adapter
            _copy_rows(tok, rows, base_ptr, y_ptr, d_lo, d_hi, stride_bt, stride_bd, stride_yt, stride_yd, BLOCK_D)


_segment_forward = TunedLauncher(triton.autotune(
    multi_rows_configs(), key=["T_BUCKET", "D", "M_PAD", "S_PAD", "STORE_Z"],
    prune_configs_by={"early_config_prune": prune_rows}, do_bench=tune_bench)(_segment_forward_kernel))


@triton.jit
def _multi_forward_kernel(
    h_ptr, base_ptr, y_ptr, z_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr, idx_ptr, sizes_ptr, scales_ptr, acts_ptr,
    T, D, M_MAX, T_BUCKET,
    stride_ht, stride_hd, stride_bt, stride_bd, stride_yt, stride_yd, stride_zt, stride_zm,
    stride_wds, stride_wdm, stride_wdd, stride_bds, stride_bdm, stride_wus, stride_wud, stride_wum,
    stride_bus, stride_bud,
    STORE_Z: tl.constexpr, FP32_DOT: tl.constexpr, M_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    block, d_lo, d_hi = row_block_and_columns(T, D, BLOCK_T, BLOCK_D)
    tok = (block * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)  # the batch as it comes
    mask_t = tok < T
    lane = tl.program_id(1)             # this program runs the block's distinct slots number lane, lane + lanes, ...
    lanes = tl.num_programs(1)
    slot = tl.load(idx_ptr + tok, mask=mask_t, other=-1)                                      # (BLOCK_T,)
    s = _next_slot(slot, -1)
    k = 0
    while s < NO_SLOT:
        if k % lanes == lane:
            _slot_forward(h_ptr, base_ptr, y_ptr, z_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr, sizes_ptr, scales_ptr,
                          acts_ptr, s, tok, mask_t & (slot == s), D, M_MAX, d_lo, d_hi,
                          stride_ht, stride_hd, stride_bt, stride_bd, stride_yt, stride_yd, stride_zt, stride_zm,
                          stride_wds, stride_wdm, stride_wdd, stride_bds, stride_bdm, stride_wus, stride_wud,
                          stride_wum, stride_bus, stride_bud, STORE_Z, FP32_DOT, M_PAD, BLOCK_T, BLOCK_D)
        k += 1
        s = _next_slot(slot, s)
    plain = mask_t & (slot < 0) & (lane == 0)
    if tl.max(plain.to(tl.int32), axis=0) > 0:
        _copy_rows(tok, plain, base_ptr, y_ptr, d_lo, d_hi, stride_bt, stride_bd, stride_yt, stride_yd, BLOCK_D)


_multi_forward = TunedLauncher(triton.autotune(
    multi_rows_configs(), key=["T_BUCKET", "D", "M_PAD", "STORE_Z"],
    prune_configs_by={"early_config_prune": prune_rows}, do_bench=tune_bench)(_multi_forward_kernel))


def _lanes(T: int, S: int, meta: dict) -> int:
    """Slot lanes per row block of the batch as it comes: as many as the block can hold distinct slots, so a
    decode batch of many adapters runs them side by side."""
    return max(1, min(S, T, meta["BLOCK_T"]))


def bottleneck_multi_forward(h: torch.Tensor, down_weight: torch.Tensor, down_bias: torch.Tensor,
                             up_weight: torch.Tensor, up_bias: torch.Tensor, sizes: torch.Tensor,
                             scales: torch.Tensor, acts: torch.Tensor, adapter_index: torch.Tensor,
                             segments: tuple[torch.Tensor, torch.Tensor] | None = None,
                             residual: torch.Tensor | None = None, save_z: bool = True,
                             out: torch.Tensor | None = None):
    """y[t] = base[t] + s_a (act_a(h[t] Wd_a^T + bd_a) Wu_a^T + bu_a), a = adapter_index[t]; base = h or residual.

    h, residual (T, d) any strides; down_weight (S, m_max, d), down_bias (S, m_max), up_weight (S, d, m_max),
    up_bias (S, d), any strides; sizes (S,) int32 widths, scales (S,) fp32, acts (S,) int32 activation codes;
    adapter_index (T,) int32 (-1, or a slot of size 0: y = base exactly); segments (order, bounds) from
    token_segments(adapter_index, S): blocks of one slot's rows (prefill), or None: row blocks of the batch as
    it comes (decode). Returns y (T, d) and, with save_z, z (T, m_max) in h's dtype, defined on each token's
    own width (backward's input). `out` (T, d), if given, receives y.
    """
    T, D = h.shape
    S, m_max = down_weight.shape[:2]
    y, z = forward_outputs(h, m_max, save_z, out)
    if T == 0:
        return y, z
    base = h if residual is None else residual
    m_pad = width_tile(m_max)
    operands = (h, base, y, y if z is None else z, down_weight, down_bias, up_weight, up_bias)
    strides = (h.stride(0), h.stride(1), base.stride(0), base.stride(1), y.stride(0), y.stride(1),
               0 if z is None else z.stride(0), 0 if z is None else z.stride(1),
               *down_weight.stride(), *down_bias.stride(), *up_weight.stride(), *up_bias.stride())
    consts = dict(STORE_Z=save_z, FP32_DOT=h.dtype == torch.float32, M_PAD=m_pad)
    dtypes = (h.dtype, base.dtype, down_weight.dtype)
    if segments is None:
        grid = lambda meta: row_grid(T, D, meta, _lanes(T, S, meta), h.device)
        _multi_forward.launch((t_bucket(T), D, m_pad, save_z, *dtypes), grid,
            *operands, adapter_index, sizes, scales, acts, T, D, m_max, t_bucket(T), *strides, **consts)
        return y, z
    order, bounds = segments
    s_pad = next_pow2(S + 1)
    grid = lambda meta: _segment_grid(T, D, S, meta, h.device)
    _segment_forward.launch((t_bucket(T), D, m_pad, s_pad, save_z, *dtypes), grid,
        *operands, order, bounds, sizes, scales, acts, T, D, S, m_max, t_bucket(T), *strides, **consts,
        S_PAD=s_pad)
    return y, z


def _segment_grid(T: int, D: int, S: int, meta: dict, device: torch.device) -> tuple[int, int]:
    """(blocks of one slot's rows: each segment adds at most one partial block, column shares where the blocks
    alone leave SMs idle)."""
    blocks = cdiv(T, meta["BLOCK_T"]) + S + 1
    return blocks, column_shares(blocks, D, meta, device)


# --------------------------------------------------------------------------------------------------- backward
@triton.jit
def _slot_rows_backward(dy_ptr, z_ptr, wu_ptr, a_ptr, dz_ptr, sizes_ptr, scales_ptr, acts_ptr, slot, tok, rows, D,
                        M_MAX, stride_dyt, stride_dyd, stride_zt, stride_zm, stride_wus, stride_wud, stride_wum,
                        stride_at, stride_am,
                        FP32_DOT: tl.constexpr, M_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Slot `slot`'s row pass (a, dz) on the rows `rows` of token block `tok`, at its width tile (none where
    the slot is empty)."""
    width = tl.minimum(tl.load(sizes_ptr + slot), M_MAX)
    scale = tl.load(scales_ptr + slot)
    act = tl.load(acts_ptr + slot)
    for c in tl.static_range(LOG2_MIN_TILE, LOG2_MAX_TILE + 1):
        if (1 << c) <= M_PAD:
            if _runs_at_tile(width, c):
                adapter_rows_backward(
                    dy_ptr, z_ptr, wu_ptr + slot.to(tl.int64) * stride_wus, a_ptr, dz_ptr, tok, rows, width, scale,
                    act, D, stride_dyt, stride_dyd, stride_zt, stride_zm, stride_wud, stride_wum, stride_at,
                    stride_am, FP32_DOT, 1 << c, BLOCK_T, BLOCK_D)


@triton.jit
def _segment_rows_backward_kernel(
    dy_ptr, z_ptr, wu_ptr, a_ptr, dz_ptr, order_ptr, bounds_ptr, sizes_ptr, scales_ptr, acts_ptr,
    T, D, S, M_MAX, T_BUCKET,
    stride_dyt, stride_dyd, stride_zt, stride_zm, stride_wus, stride_wud, stride_wum, stride_at, stride_am,
    FP32_DOT: tl.constexpr, M_PAD: tl.constexpr, S_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seg, start, end = segment_chunk(bounds_ptr, S, tl.program_id(0), BLOCK_T, S_PAD)
    if (start < end) & (seg > 0):          # segment 0, the tokens with no adapter, has no row pass
        tok, rows = segment_tokens(order_ptr, start, end, BLOCK_T)
        _slot_rows_backward(dy_ptr, z_ptr, wu_ptr, a_ptr, dz_ptr, sizes_ptr, scales_ptr, acts_ptr, seg - 1, tok,
                            rows, D, M_MAX, stride_dyt, stride_dyd, stride_zt, stride_zm, stride_wus, stride_wud,
                            stride_wum, stride_at, stride_am, FP32_DOT, M_PAD, BLOCK_T, BLOCK_D)


_segment_rows_backward = TunedLauncher(triton.autotune(
    multi_rows_configs(), key=["T_BUCKET", "D", "M_PAD", "S_PAD"], prune_configs_by={"early_config_prune": prune_rows},
    do_bench=tune_bench)(_segment_rows_backward_kernel))


@triton.jit
def _multi_rows_backward_kernel(
    dy_ptr, z_ptr, wu_ptr, a_ptr, dz_ptr, idx_ptr, sizes_ptr, scales_ptr, acts_ptr,
    T, D, M_MAX, T_BUCKET,
    stride_dyt, stride_dyd, stride_zt, stride_zm, stride_wus, stride_wud, stride_wum, stride_at, stride_am,
    FP32_DOT: tl.constexpr, M_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tok = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)  # the batch as it comes
    mask_t = tok < T
    lane = tl.program_id(1)
    lanes = tl.num_programs(1)
    slot = tl.load(idx_ptr + tok, mask=mask_t, other=-1)
    s = _next_slot(slot, -1)
    k = 0
    while s < NO_SLOT:
        if k % lanes == lane:
            _slot_rows_backward(dy_ptr, z_ptr, wu_ptr, a_ptr, dz_ptr, sizes_ptr, scales_ptr, acts_ptr, s, tok,
                                mask_t & (slot == s), D, M_MAX, stride_dyt, stride_dyd, stride_zt, stride_zm,
                                stride_wus, stride_wud, stride_wum, stride_at, stride_am, FP32_DOT, M_PAD, BLOCK_T,
                                BLOCK_D)
        k += 1
        s = _next_slot(slot, s)


_multi_rows_backward = TunedLauncher(triton.autotune(
    multi_rows_configs(), key=["T_BUCKET", "D", "M_PAD"],
    prune_configs_by={"early_config_prune": prune_rows}, do_bench=tune_bench)(_multi_rows_backward_kernel))


@triton.jit
def _dh_without_adapter(dy_ptr, dh_ptr, order_ptr, start, end, offs_d, D, stride_dyt, stride_dyd, stride_dht,
                        stride_dhd, ADD_DY: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """dh = dy (base is h) or 0 (base is the residual) on the rows with no adapter."""
    for t0 in range(start, end, BLOCK_T):
        pos = t0 + tl.arange(0, BLOCK_T)
        live = pos < end
        tok = tl.load(order_ptr + pos, mask=live, other=0).to(tl.int64)
        mask = live[:, None] & (offs_d < D)[None, :]
        if ADD_DY:
            dh = tl.load(dy_ptr + tok[:, None] * stride_dyt + offs_d[None, :] * stride_dyd, mask=mask, other=0.0)
        else:
            dh = tl.zeros((BLOCK_T, BLOCK_D), dtype=dh_ptr.dtype.element_ty)
        tl.store(dh_ptr + tok[:, None] * stride_dht + offs_d[None, :] * stride_dhd, dh, mask=mask)


@triton.jit
def _multi_grads_kernel(
    dy_ptr, h_ptr, a_ptr, dz_ptr, wd_ptr, dh_ptr, order_ptr, bounds_ptr, sizes_ptr, scales_ptr,
    dwu_ptr, dwd_ptr, dbu_ptr, dbd_ptr,
    T, D, S, M_MAX, T_BUCKET, CHUNK,
    stride_dyt, stride_dyd, stride_ht, stride_hd, stride_at, stride_am, stride_wds, stride_wdm, stride_wdd,
    stride_dht, stride_dhd,
    ADD_DY: tl.constexpr, NEED_DH: tl.constexpr, FP32_DOT: tl.constexpr, M_PAD: tl.constexpr,
    S_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    num_d = tl.cdiv(D, BLOCK_D)
    pid_d = tl.program_id(0) % num_d       # column blocks of one chunk run side by side: its a, dz stay in L2
    chunk = tl.program_id(0) // num_d
    seg, start, end = segment_chunk(bounds_ptr, S, chunk, CHUNK, S_PAD)
    if start < end:
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        a_slot, width = segment_slot(seg, sizes_ptr, M_MAX)
        if width == 0:  # no adapter, or an empty slot
            if NEED_DH:
                _dh_without_adapter(dy_ptr, dh_ptr, order_ptr, start, end, offs_d, D, stride_dyt, stride_dyd,
                                    stride_dht, stride_dhd, ADD_DY, BLOCK_T, BLOCK_D)
        else:
            scale = tl.load(scales_ptr + a_slot)
            s64 = a_slot.to(tl.int64)
            for c in tl.static_range(LOG2_MIN_TILE, LOG2_MAX_TILE + 1):
                if (1 << c) <= M_PAD:
                    if _runs_at_tile(width, c):
                        d_wu, d_wd, d_bu, d_bd = grad_sums(
                            dy_ptr, h_ptr, a_ptr, dz_ptr, wd_ptr + s64 * stride_wds, dh_ptr, order_ptr, start, end,
                            offs_d, 0, width, D,
                            stride_dyt, stride_dyd, stride_ht, stride_hd, stride_at, stride_am, stride_wdm,
                            stride_wdd, stride_dht, stride_dhd,
                            True, ADD_DY, NEED_DH, FP32_DOT, 1 << c, BLOCK_T, BLOCK_D)
                        # into slot a's gradients, contiguous (S, D, M_MAX), (S, M_MAX, D), (S, D), (S, M_MAX)
                        offs_m = tl.arange(0, 1 << c)
                        mask_m = offs_m < width
                        mask_d = offs_d < D
                        tl.atomic_add(dwu_ptr + s64 * D * M_MAX + offs_d[:, None] * M_MAX + offs_m[None, :],
                                      scale * d_wu, mask=mask_d[:, None] & mask_m[None, :])
                        tl.atomic_add(dwd_ptr + s64 * M_MAX * D + offs_m[:, None] * D + offs_d[None, :],
                                      d_wd, mask=mask_m[:, None] & mask_d[None, :])
                        tl.atomic_add(dbu_ptr + s64 * D + offs_d, scale * d_bu, mask=mask_d)
                        tl.atomic_add(dbd_ptr + s64 * M_MAX + offs_m, d_bd, mask=mask_m & (pid_d == 0))


@triton.jit
def _multi_weight_grads_kernel(
    dy_ptr, h_ptr, a_ptr, dz_ptr, order_ptr, bounds_ptr, sizes_ptr, scales_ptr, dwu_ptr, dwd_ptr, dbu_ptr, dbd_ptr,
    T, D, S, M_MAX, T_BUCKET, CHUNK,
    stride_dyt, stride_dyd, stride_ht, stride_hd, stride_at, stride_am,
    FP32_DOT: tl.constexpr, M_PAD: tl.constexpr, S_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Wide bottlenecks (kernels.bottleneck.WIDE_M_PAD): a program owns a (BLOCK_D, BLOCK_M) tile of one chunk's
    slot's weight gradients (no dh: _multi_input_grad_kernel's), added into the slot's with fp32 atomics; tiles
    past the slot's width exit."""
    num_m = tl.cdiv(M_MAX, BLOCK_M)
    num_d = tl.cdiv(D, BLOCK_D)
    pid_m = tl.program_id(0) % num_m
    pid_d = (tl.program_id(0) // num_m) % num_d
    seg, start, end = segment_chunk(bounds_ptr, S, tl.program_id(0) // (num_m * num_d), CHUNK, S_PAD)
    a_slot, width = segment_slot(seg, sizes_ptr, M_MAX)
    m_lo = pid_m * BLOCK_M
    if (start < end) & (m_lo < width):
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        d_wu, d_wd, d_bu, d_bd = grad_sums(
            dy_ptr, h_ptr, a_ptr, dz_ptr, dy_ptr, dy_ptr, order_ptr, start, end, offs_d, m_lo, width, D,
            stride_dyt, stride_dyd, stride_ht, stride_hd, stride_at, stride_am, 0, 0, 0, 0,
            True, False, False, FP32_DOT, BLOCK_M, BLOCK_T, BLOCK_D)
        scale = tl.load(scales_ptr + a_slot)
        s64 = a_slot.to(tl.int64)
        offs_m = m_lo + tl.arange(0, BLOCK_M)
        mask_m = offs_m < width
        mask_d = offs_d < D
        # into slot a's gradients, contiguous (S, D, M_MAX), (S, M_MAX, D), (S, D), (S, M_MAX)
        tl.atomic_add(dwu_ptr + s64 * D * M_MAX + offs_d[:, None] * M_MAX + offs_m[None, :], scale * d_wu,
                      mask=mask_d[:, None] & mask_m[None, :])
        tl.atomic_add(dwd_ptr + s64 * M_MAX * D + offs_m[:, None] * D + offs_d[None, :], d_wd,
                      mask=mask_m[:, None] & mask_d[None, :])
        tl.atomic_add(dbu_ptr + s64 * D + offs_d, scale * d_bu, mask=mask_d & (pid_m == 0))
        tl.atomic_add(dbd_ptr + s64 * M_MAX + offs_m, d_bd, mask=mask_m & (pid_d == 0))


@triton.jit
def _multi_input_grad_kernel(
    dy_ptr, dz_ptr, wd_ptr, dh_ptr, order_ptr, bounds_ptr, sizes_ptr,
    T, D, S, M_MAX, T_BUCKET,
    stride_dyt, stride_dyd, stride_zt, stride_zm, stride_wds, stride_wdm, stride_wdd, stride_dht, stride_dhd,
    ADD_DY: tl.constexpr, FP32_DOT: tl.constexpr, M_PAD: tl.constexpr, S_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Wide bottlenecks: dh = [dy +] dz Wd_a over blocks of one slot's rows (axis 0, segment_chunk) and column
    shares (axis 1); rows with no adapter (or an empty slot) get dy or 0."""
    seg, start, end = segment_chunk(bounds_ptr, S, tl.program_id(0), BLOCK_T, S_PAD)
    if start < end:
        d_lo, d_hi = share_columns(tl.program_id(1), tl.num_programs(1), D, BLOCK_D)
        tok, rows = segment_tokens(order_ptr, start, end, BLOCK_T)
        a_slot, width = segment_slot(seg, sizes_ptr, M_MAX)
        offs_m = tl.arange(0, M_PAD)
        mask_m = offs_m < width
        dz = tl.load(dz_ptr + tok[:, None] * stride_zt + offs_m[None, :] * stride_zm,
                     mask=rows[:, None] & mask_m[None, :], other=0.0)                            # (BLOCK_T, M_PAD)
        rows_expand(dz, wd_ptr + a_slot.to(tl.int64) * stride_wds, dy_ptr, dh_ptr, dh_ptr, tok, rows, offs_m, mask_m,
                    1.0, d_lo, d_hi, stride_dyt, stride_dyd, stride_dht, stride_dhd, stride_wdd, stride_wdm, 0,
                    ADD_DY, False, FP32_DOT, BLOCK_T, BLOCK_D)


_multi_weight_grads = TunedLauncher(triton.autotune(
    wide_grads_configs(), key=["T_BUCKET", "D", "M_PAD"], prune_configs_by={"early_config_prune": prune_wide_grads},
    reset_to_zero=["dwu_ptr", "dwd_ptr", "dbu_ptr", "dbd_ptr"], do_bench=tune_bench)(_multi_weight_grads_kernel))
_multi_input_grad = TunedLauncher(triton.autotune(
    multi_rows_configs(), key=["T_BUCKET", "D", "M_PAD", "S_PAD", "ADD_DY"],
    prune_configs_by={"early_config_prune": prune_rows}, do_bench=tune_bench)(_multi_input_grad_kernel))
_multi_grads = TunedLauncher(triton.autotune(
    grads_configs(), key=["T_BUCKET", "D", "M_PAD", "NEED_DH"], prune_configs_by={"early_config_prune": prune_grads},
    reset_to_zero=["dwu_ptr", "dwd_ptr", "dbu_ptr", "dbd_ptr"], do_bench=tune_bench)(_multi_grads_kernel))


def bottleneck_multi_backward(dy: torch.Tensor, h: torch.Tensor, z: torch.Tensor, down_weight: torch.Tensor,
                              up_weight: torch.Tensor, sizes: torch.Tensor, scales: torch.Tensor, acts: torch.Tensor,
                              adapter_index: torch.Tensor, order: torch.Tensor, bounds: torch.Tensor, add_dy: bool,
                              need_dh: bool, segmented_rows: bool = False, rows_per_chunk: int | None = None,
                              out: torch.Tensor | None = None):
    """Gradients of the multi-adapter forward given dy, from h and the forward's z.

    Shapes as for bottleneck_multi_forward; order, bounds from token_segments(adapter_index, S); segmented_rows:
    the row pass walks blocks of one slot's rows (prefill), else row blocks of the batch as they come; add_dy:
    base is h; need_dh: compute dh at all; rows_per_chunk: rows per weight-gradient chunk (None picks per
    shape). `out` (T, d), if given, receives dh. Returns dh (T, d) or None, and in fp32, zero beyond each slot's
    width and for slots with no tokens: d_down_weight (S, m_max, d), d_down_bias (S, m_max), d_up_weight
    (S, d, m_max), d_up_bias (S, d).
    """
    T, D = h.shape
    S, m_max = down_weight.shape[:2]
    dh = (torch.empty((T, D), device=h.device, dtype=h.dtype) if out is None else out) if need_dh else None
    zeros = lambda *shape: torch.zeros(shape, device=h.device, dtype=torch.float32)   # atomics add into them
    d_wd, d_bd, d_wu, d_bu = zeros(S, m_max, D), zeros(S, m_max), zeros(S, D, m_max), zeros(S, D)
    if T == 0:
        return dh, d_wd, d_bd, d_wu, d_bu
    m_pad = width_tile(m_max)
    fp32_dot = h.dtype == torch.float32
    a_dz = torch.empty((2, T, m_max), device=h.device, dtype=h.dtype)   # a = act(z) and dz, one layout
    operands = (dy, z, up_weight, a_dz[0], a_dz[1])
    strides = (dy.stride(0), dy.stride(1), z.stride(0), z.stride(1), *up_weight.stride(), a_dz.stride(1),
               a_dz.stride(2))
    if segmented_rows:
        s_pad = next_pow2(S + 1)
        grid = lambda meta: (cdiv(T, meta["BLOCK_T"]) + S + 1,)
        _segment_rows_backward.launch((t_bucket(T), D, m_pad, s_pad, dy.dtype, up_weight.dtype), grid,
            *operands, order, bounds, sizes, scales, acts, T, D, S, m_max, t_bucket(T), *strides,
            FP32_DOT=fp32_dot, M_PAD=m_pad, S_PAD=s_pad)
    else:
        grid = lambda meta: (cdiv(T, meta["BLOCK_T"]), _lanes(T, S, meta))
        _multi_rows_backward.launch((t_bucket(T), D, m_pad, dy.dtype, up_weight.dtype), grid,
            *operands, adapter_index, sizes, scales, acts, T, D, m_max, t_bucket(T), *strides,
            FP32_DOT=fp32_dot, M_PAD=m_pad)
    if m_pad >= single.WIDE_M_PAD:    # read at each call: bench.bottleneck's ptlm_wide lowers it
        chunk = rows_per_chunk or wide_chunk_rows(T, D, m_pad, h.device)
        chunks = cdiv(T, chunk) + S + 1   # each segment adds at most one partial chunk
        grid = lambda meta: (cdiv(D, meta["BLOCK_D"]) * cdiv(m_max, meta["BLOCK_M"]) * chunks,)
        _multi_weight_grads.launch((t_bucket(T), D, m_pad, dy.dtype), grid,
            dy, h, a_dz[0], a_dz[1], order, bounds, sizes, scales, d_wu, d_wd, d_bu, d_bd,
            T, D, S, m_max, t_bucket(T), chunk,
            dy.stride(0), dy.stride(1), h.stride(0), h.stride(1), a_dz.stride(1), a_dz.stride(2),
            FP32_DOT=fp32_dot, M_PAD=m_pad, S_PAD=next_pow2(S + 1),
        )
        if need_dh:
            grid = lambda meta: _segment_grid(T, D, S, meta, h.device)
            _multi_input_grad.launch((t_bucket(T), D, m_pad, next_pow2(S + 1), add_dy, dy.dtype), grid,
                dy, a_dz[1], down_weight, dh, order, bounds, sizes,
                T, D, S, m_max, t_bucket(T),
                dy.stride(0), dy.stride(1), a_dz.stride(1), a_dz.stride(2), *down_weight.stride(),
                dh.stride(0), dh.stride(1),
                ADD_DY=add_dy, FP32_DOT=fp32_dot, M_PAD=m_pad, S_PAD=next_pow2(S + 1),
            )
        return dh, d_wd, d_bd, d_wu, d_bu
    chunk = rows_per_chunk or chunk_rows(T, D, m_pad, h.device)
    chunks = cdiv(T, chunk) + S + 1       # each segment adds at most one partial chunk
    grid = lambda meta: (cdiv(D, meta["BLOCK_D"]) * chunks,)
    _multi_grads.launch((t_bucket(T), D, m_pad, need_dh, add_dy, dy.dtype), grid,
        dy, h, a_dz[0], a_dz[1], down_weight, dy if dh is None else dh, order, bounds, sizes, scales,
        d_wu, d_wd, d_bu, d_bd,
        T, D, S, m_max, t_bucket(T), chunk,
        dy.stride(0), dy.stride(1), h.stride(0), h.stride(1), a_dz.stride(1), a_dz.stride(2), *down_weight.stride(),
        0 if dh is None else dh.stride(0), 0 if dh is None else dh.stride(1),
        ADD_DY=add_dy, NEED_DH=need_dh, FP32_DOT=fp32_dot, M_PAD=m_pad, S_PAD=next_pow2(S + 1),
    )
    return dh, d_wd, d_bd, d_wu, d_bu
