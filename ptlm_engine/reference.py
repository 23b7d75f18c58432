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


def lora_linear_multi(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                      scales: Tensor, adapter_index: Tensor, fan_in_fan_out: bool = False,
                      dropouts: Tensor | None = None, keep_mask: Tensor | None = None) -> Tensor:
    """Each token t with its own adapter a = adapter_index[t]:
    y[t] = x[t] W0^T + bias + s_a dropout_a(x[t]) A_a^T B_a^T.

    x (T, d_in); lora_A (S, r_max, d_in) and lora_B (S, d_out, r_max), stacked slots zero beyond each slot's
    rank; scales (S,); adapter_index (T,) integer slot per token, -1 for the base model alone; dropouts (S,)
    per-slot LoRA dropout with keep_mask (T, d_in) its keep mask, or None.
    """
    w = weight.t() if fan_in_fan_out else weight
    y = x @ w.t()
    if bias is not None:
        y = y + bias
    has = adapter_index >= 0
    slot = adapter_index.clamp_min(0).long()
    coef = scales[slot] * has                                                                      # (T,)
    x_lora = x
    if keep_mask is not None:
        x_lora = x * keep_mask
        coef = coef / (1.0 - dropouts[slot])
    xa = torch.einsum("ti,tri->tr", x_lora, lora_A[slot]) * coef.to(x.dtype)[:, None]             # (T, r_max)
    return y + torch.einsum("tr,tor->to", xa, lora_B[slot])
