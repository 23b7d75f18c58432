"""FusedRMSNorm: a drop-in for transformers' Llama-formula RMSNorm modules that runs the fused rms_norm op."""
from __future__ import annotations

from torch import Tensor, nn

from ptlm_engine import functional


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


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
        """The replaced module, holding this module's weight (whatever .to() or a reassignment made of it since),
        in this module's training mode and with the hooks registered on this module since (the dicts themselves,
        which their handles remove from; the replaced module had none: base_ops fuses only hook-free norms)."""
        original = self.__dict__["original"]
        original.weight = self.weight
        original.variance_epsilon = self.variance_epsilon
        original.training = self.training
        for hooks in _HOOK_DICTS:
            if getattr(self, hooks, None):
                setattr(original, hooks, getattr(self, hooks))
        return original

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, replaces {type(self.original).__name__}"
