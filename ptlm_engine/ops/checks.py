"""Input checks shared by the ops' entry points (each raises ValueError naming the tensor and what it expected),
and the one fix-up of inputs they share (unit_stride)."""
from __future__ import annotations

import torch
from torch import Tensor


def check_floating(name: str, t: Tensor) -> None:
    if not t.dtype.is_floating_point:
        raise ValueError(f"{name}: expected a floating-point dtype, got {t.dtype}")


def check_adapter_dtypes(ref_name: str, ref: Tensor, named: dict[str, Tensor | None]) -> None:
    """Adapter weights in ref's dtype or float32 (trainable master weights on a half-precision base: the kernels
    read them as they are, so no cast runs per call, and their gradients come out in float32)."""
    for name, t in named.items():
        if t is not None and t.dtype != ref.dtype and t.dtype != torch.float32:
            raise ValueError(f"{name}: expected dtype {ref.dtype} (the dtype of {ref_name}) or torch.float32, "
                             f"got {t.dtype}")


def unit_stride(t: Tensor | None) -> Tensor | None:
    """A 1-D t with unit stride (a copy only where it has none): the kernels read biases, per-slot ranks, scales
    and dropouts and per-token adapter indices as contiguous vectors."""
    return t if t is None or t.dim() != 1 or t.stride(0) == 1 else t.contiguous()


def is_index_dtype(dtype: torch.dtype) -> bool:
    """Integers only: a bool mask passed as a slot index is refused, as torch's own index ops refuse it."""
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def check_table_range(name: str, table: Tensor | None, low: float, high: float, high_open: bool = False) -> None:
    """A per-slot table's values in [low, high] ([low, high) with high_open), checked where it costs no device
    sync, as check_index_range: a user's tables reach the kernels as they are (a rank above r_max reads past the
    slot, a dropout of 1 divides by zero)."""
    if table is None or table.device.type != "cpu" or table.numel() == 0 or torch.compiler.is_compiling():
        return
    lo, hi = (v.item() for v in torch.aminmax(table))
    if lo < low or hi > high or (high_open and hi >= high) or lo != lo or hi != hi:
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name}: expected values in [{low}, {high}{bracket}, got values from {lo} to {hi}")


def check_index_range(index: Tensor, count: int) -> None:
    """adapter_index values in [-1, count) (-1: no adapter). Checked where it costs no device sync (a CPU index,
    eagerly): on a GPU the serving path stays sync-free, and an index out of range is the caller's error there
    (as an out-of-range index into any tensor is)."""
    if index.device.type != "cpu" or index.numel() == 0 or torch.compiler.is_compiling():
        return
    low, high = (int(v) for v in torch.aminmax(index))
    if low < -1 or high >= count:
        raise ValueError(f"adapter_index: expected slot ids in [-1, {count}) (-1: no adapter), got values from "
                         f"{low} to {high}")


def check_like(ref_name: str, ref: Tensor, named: dict[str, Tensor | None], dtype: bool = True,
               device: bool = True) -> None:
    """Every tensor of `named` (None: absent, skipped) in ref's dtype (with dtype) and on ref's device (with
    device), tensor by tensor in order."""
    for name, t in named.items():
        if t is None:
            continue
        if dtype and t.dtype != ref.dtype:
            raise ValueError(f"{name}: expected dtype {ref.dtype} (the dtype of {ref_name}), got {t.dtype}")
        if device and t.device != ref.device:
            why = (" (weights with no data: offloaded by accelerate hooks, which ptlm's layers do not run since they "
                   "read their weights directly, or a model built empty and never loaded)") if t.is_meta else ""
            raise ValueError(f"{name}: expected device {ref.device} (the device of {ref_name}), got {t.device}{why}")
