"""ModulesToSave: a module of which each adapter trains (and saves) its own full copy, as PEFT's
ModulesToSaveWrapper; the original module stays and runs whenever no adapter with a copy is active."""
from __future__ import annotations

import copy

from torch import nn


class ModulesToSave(nn.Module):
    """Runs the active adapter's copy (`modules_to_save[<name>]`), else the original module.

    The original's parameters, buffers and children appear under their own names (state-dict keys such as
    `classifier.weight` do not change); the copies add `classifier.modules_to_save.<name>.weight`. The original
    module object is kept outside the module tree in `original_module` and is what removal puts back.
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        # Share the original's parameter and buffer tables rather than copying entries: whatever replaces a
        # tensor here (model.to() swaps buffers, load_state_dict(assign=True) swaps parameters) then also
        # reaches the original module, which is the one forward() runs.
        self.__dict__["_parameters"] = original._parameters
        self.__dict__["_buffers"] = original._buffers
        self.__dict__["_non_persistent_buffers_set"] = original._non_persistent_buffers_set
        for child_name, child in original.named_children():
            self.add_module(child_name, child)
        self.__dict__["original_module"] = original   # last: __getattr__ falls back to it
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.adapters_enabled = True
        self.training = original.training

    def add_adapter(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def remove_adapter(self, name: str) -> None:
        if self.active_adapter == name:
            self.active_adapter = None
        del self.modules_to_save[name]

    def forward(self, *args, **kwargs):
        name = self.active_adapter
        if self.adapters_enabled and name in self.modules_to_save:
            return self.modules_to_save[name](*args, **kwargs)
        return self.original_module(*args, **kwargs)

    def train(self, mode: bool = True):
        # The original module is outside the tree, so model.train()/eval() would not reach its own flag.
        self.original_module.training = mode
        return super().train(mode)

    def __getattr__(self, name: str):
        # Model code reads attributes of the module it called (embed_tokens.padding_idx, score.out_features).
        try:
            return super().__getattr__(name)
        except AttributeError:
            original = self.__dict__.get("original_module")
            if original is None:
                raise
            return getattr(original, name)
