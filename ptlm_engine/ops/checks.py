"""Input checks shared by the ops' entry points: each raises ValueError naming the tensor and what it expected."""
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
            raise ValueError(f"{name}: expected device {ref.device} (the device of {ref_name}), got {t.device}")
