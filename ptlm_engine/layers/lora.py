"""LoraLinear: an nn.Linear or GPT-2 Conv1D with named LoRA adapters, computed by the fused op."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ptlm_engine import functional


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """New adapters are float32 on a half-precision base (as PEFT's autocast_adapter_dtype), so the optimizer
    updates full-precision LoRA weights; on any other base they take the base dtype."""
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


def compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """The one dtype the fused op runs in: the autocast dtype inside torch.autocast (what F.linear would use
    there), else the base weight's dtype.

    x, the LoRA weights (float32 on a half-precision base) and, under autocast, W0 and the bias are cast to it,
    so the layer returns the dtype the base layer returns, as PEFT's LoRA layer does. PEFT computes the LoRA
    branch in the LoRA weights' dtype and casts the sum back; here that branch runs in the base dtype (the
    Triton kernels keep its r-wide intermediate in float32), and the gradients reach float32 LoRA weights
    through the casts.
    """
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


class LoraLinear(nn.Module):
    """y = x W0ᵀ + bias + scale · dropout(x) Aᵀ Bᵀ with the active adapter; the base layer's x W0ᵀ + bias
    when no adapter is active, adapters are disabled, or the active one is merged into W0.

    `weight` and `bias` are the base layer's own Parameter objects, registered under the same names, so the
    model's state-dict keys (`...q_proj.weight`) do not change. The base module itself is kept in
    `original_module`, outside the module tree, so that removing the last adapter puts back that very object.
    Adapters live in `lora_A` / `lora_B` (ModuleDicts of bias-free nn.Linear keyed by adapter name: parameters
    `...q_proj.lora_A.<name>.weight`), with their rank, scale and dropout in plain dicts keyed the same way, so
    a per-row adapter mapping can later pick any of them inside one call. One adapter is active at a time.
    """

    def __init__(self, base: nn.Module, fan_in_fan_out: bool):
        super().__init__()
        self.register_parameter("weight", base.weight)   # (d_out, d_in), or (d_in, d_out) with fan_in_fan_out
        self.register_parameter("bias", base.bias)       # (d_out,) or None
        self.fan_in_fan_out = fan_in_fan_out
        d_out, d_in = self.weight.shape[::-1] if fan_in_fan_out else self.weight.shape
        self.in_features, self.out_features = d_in, d_out
        self.__dict__["original_module"] = base           # a plain attribute: not a submodule
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.scale: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self.active_adapter: str | None = None
        self.adapters_enabled = True
        self.merged_adapter: str | None = None
        self.training = base.training

    def add_adapter(self, name: str, r: int, scale: float, dropout: float) -> None:
        """A new adapter is the identity: A kaiming-uniform (a=sqrt(5), as PEFT), B zero."""
        factory = {"device": self.weight.device, "dtype": adapter_dtype(self.weight.dtype)}
        lora_A = nn.Linear(self.in_features, r, bias=False, **factory)       # weight (r, d_in)
        lora_B = nn.Linear(r, self.out_features, bias=False, **factory)      # weight (d_out, r)
        nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(lora_B.weight)
        self.lora_A[name], self.lora_B[name] = lora_A, lora_B
        self.r[name], self.scale[name], self.dropout[name] = r, scale, dropout

    def remove_adapter(self, name: str) -> None:
        if self.merged_adapter == name:
            self.unmerge()
        if self.active_adapter == name:
            self.active_adapter = None
        del self.lora_A[name], self.lora_B[name], self.r[name], self.scale[name], self.dropout[name]

    def forward(self, x: Tensor) -> Tensor:
        name = self.active_adapter
        if not self.adapters_enabled or self.merged_adapter is not None or name not in self.lora_A:
            return F.linear(x, self.weight.t() if self.fan_in_fan_out else self.weight, self.bias)
        dtype = compute_dtype(x, self.weight)
        bias = None if self.bias is None else self.bias.to(dtype)
        return functional.lora_linear(
            x.to(dtype), self.weight.to(dtype), bias,
            self.lora_A[name].weight.to(dtype), self.lora_B[name].weight.to(dtype),
            self.scale[name], self.dropout[name] if self.training else 0.0, self.fan_in_fan_out)

    def delta_weight(self, name: str) -> Tensor:
        """scale · B A in float32, laid out like `weight`."""
        delta = self.scale[name] * (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float())
        return delta.t() if self.fan_in_fan_out else delta                  # (d_out, d_in) or (d_in, d_out)

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """W0 += scale · B A, summed in float32 and rounded once to W0's dtype."""
        if self.merged_adapter is not None:
            raise ValueError(f"adapter {self.merged_adapter!r} is already merged into this layer")
        self.weight.copy_(self.weight.float() + self.delta_weight(name))
        self.merged_adapter = name

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 -= scale · B A; in half precision W0 comes back up to one rounding of the merged weight."""
        self.weight.copy_(self.weight.float() - self.delta_weight(self.merged_adapter))
        self.merged_adapter = None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"fan_in_fan_out={self.fan_in_fan_out}, adapters={list(self.lora_A)}, "
                f"active={self.active_adapter!r}, merged={self.merged_adapter!r}")
