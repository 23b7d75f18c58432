"""FusedRMSNorm: a drop-in for transformers' Llama-formula RMSNorm modules that runs the fused rms_norm op."""
from __future__ import annotations

from torch import Tensor, nn

from ptlm_engine import functional


class FusedRMSNorm(nn.Module):
    """Runs functional.rms_norm with the replaced module's own weight Parameter (the same object: state-dict keys,
    optimizers and tied references are unchanged) and its variance_epsilon. The replaced module is kept outside
    the module tree (no second copy of the weight in the state dict) and handed back by restore()."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.weight = original.weight
        self.variance_epsilon = original.variance_epsilon
        self.__dict__["original"] = original          # not a submodule: its weight is self.weight

    def forward(self, hidden_states: Tensor) -> Tensor:
        return functional.rms_norm(hidden_states, self.weight, self.variance_epsilon)

    def restore(self) -> nn.Module:
        """The replaced module, holding this module's weight (whatever .to() or a reassignment made of it since)."""
        original = self.__dict__["original"]
        original.weight = self.weight
        original.variance_epsilon = self.variance_epsilon
        return original

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, replaces {type(self.original).__name__}"
