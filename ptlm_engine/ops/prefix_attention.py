"""Attention over [prefix ; sequence] (prefix tuning): validation and the backend choice.

Chain of names: kernels.prefix_attention (Triton) -> ptlm::prefix_attention_fwd / _bwd (custom ops) ->
prefix_attention_op -> functional.prefix_attention.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ptlm_engine import reference


def _check(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor | None, prefix_v: Tensor | None,
           prefix_lengths: Tensor | None, key_padding_mask: Tensor | None) -> None:
    if q.dim() != 4:
        raise ValueError(f"q: expected shape (B, Hq, Lq, D), got {tuple(q.shape)}")
    if not q.dtype.is_floating_point:
        raise ValueError(f"q: expected a floating-point dtype, got {q.dtype}")
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
            raise ValueError(f"prefix_lengths: expected shape ({batch},) of int32, got {tuple(prefix_lengths.shape)} "
                             f"of {prefix_lengths.dtype}")
    if key_padding_mask is not None and (key_padding_mask.shape != (batch, lk) or key_padding_mask.dtype != torch.bool):
        raise ValueError(f"key_padding_mask: expected shape ({batch}, {lk}) of bool, got "
                         f"{tuple(key_padding_mask.shape)} of {key_padding_mask.dtype}")
    named = {"k": k, "v": v, "prefix_k": prefix_k, "prefix_v": prefix_v}
    for name, t in named.items():
        if t is None:
            continue
        if t.dtype != q.dtype:
            raise ValueError(f"{name}: expected dtype {q.dtype} (the dtype of q), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} (the device of q), got {t.device}")
    for name, t in {"prefix_lengths": prefix_lengths, "key_padding_mask": key_padding_mask}.items():
        if t is not None and t.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} (the device of q), got {t.device}")


def prefix_attention_op(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor | None, prefix_v: Tensor | None,
                        prefix_lengths: Tensor | None, causal: bool, key_padding_mask: Tensor | None,
                        scale: float | None) -> Tensor:
    _check(q, k, v, prefix_k, prefix_v, prefix_lengths, key_padding_mask)
    return reference.prefix_attention(q, k, v, prefix_k, prefix_v, prefix_lengths, causal=causal,
                                      key_padding_mask=key_padding_mask, scale=scale)
