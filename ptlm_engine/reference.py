"""Plain-PyTorch definitions of every op: the ground truth for tests, the CPU fallback and a benchmark provider.

Each function here computes exactly what the matching Triton launcher in `ptlm_engine.kernels` computes,
with no fusion, in the input dtype (tests upcast the inputs to float64 for the ground truth).
"""
from __future__ import annotations

import torch
from torch import Tensor


def lora_shrink(x: Tensor, lora_A: Tensor, scale: float, keep_mask: Tensor | None = None,
                dropout: float = 0.0) -> Tensor:
    """xa = scale * dropout(x) @ lora_A^T in float32.   x (T, d_in), lora_A (r, d_in) -> (T, r)."""
    x = x.float()
    if keep_mask is not None:
        x = x * keep_mask / (1.0 - dropout)
    return scale * (x @ lora_A.float().t())


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                scale: float, keep_mask: Tensor | None = None, dropout: float = 0.0,
                fan_in_fan_out: bool = False) -> Tensor:
    """y = x W0^T + bias + scale * dropout(x) A^T B^T.

    x (..., d_in); weight (d_out, d_in), or (d_in, d_out) with fan_in_fan_out (GPT-2's Conv1D);
    lora_A (r, d_in); lora_B (d_out, r); keep_mask: the dropout keep mask (same shape as x) or None.
    """
    w = weight.t() if fan_in_fan_out else weight
    x_lora = x if keep_mask is None else x * keep_mask / (1.0 - dropout)
    y = x @ w.t()
    if bias is not None:
        y = y + bias
    return y + scale * ((x_lora @ lora_A.t()) @ lora_B.t())
