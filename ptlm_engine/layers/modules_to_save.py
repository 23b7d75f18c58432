"""ModulesToSave: a module of which each adapter trains (and saves) its own full copy, as PEFT's
ModulesToSaveWrapper; the original module stays and runs whenever no adapter with a copy is active, and in a
mixed batch each row runs its own adapter's copy."""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ptlm_engine.layers.base import AdapterLayer


class ModulesToSave(AdapterLayer):
    """Runs the active adapter's copy (`modules_to_save[<name>]`), else the original module.

    The original's parameters, buffers and children appear under their own names (state-dict keys such as
    `classifier.weight` do not change); the copies add `classifier.modules_to_save.<name>.weight`. The original
    module object is kept outside the module tree in `original_module` and is what removal puts back.
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        self.batch = None                                # a mixed batch's mapping (pool.AdapterBatch), or None
        self._batch_rows: dict[tuple, dict[str, Tensor]] = {}
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
        self.training = original.training

    def add_adapter(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def replace_original(self, module: nn.Module) -> None:
        """Hold `module` as the original from now on (base_ops' unfuse gives back the module it replaced), sharing
        its tables as __init__ does; the children are the same objects."""
        self.__dict__["_parameters"] = module._parameters
        self.__dict__["_buffers"] = module._buffers
        self.__dict__["_non_persistent_buffers_set"] = module._non_persistent_buffers_set
        self.__dict__["original_module"] = module

    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.modules_to_save[name].parameters())

    def release(self) -> nn.Module:
        return self.original_module

    def set_batch(self, batch) -> None:
        self.batch, self._batch_rows = batch, {}

    def remove_adapter(self, name: str) -> None:
        if self.active_adapter == name:
            self.active_adapter = None
        del self.modules_to_save[name]

    def forward(self, *args, **kwargs):
        if self.batch is not None:
            return self._batch_forward(args, kwargs)
        name = self.active_adapter
        if self.adapters_enabled and name in self.modules_to_save:
            return self.modules_to_save[name](*args, **kwargs)
        return self.original_module(*args, **kwargs)

    def _batch_forward(self, args: tuple, kwargs: dict):
        """The original on every row, then each mapped adapter's copy on its own rows only (the batch dimension
        of the tensor arguments is dim 0), its output written over those rows: rows without a copy keep the
        original's output, and gradients reach each copy from its rows alone. Refused before anything runs for
        arguments that are not split by row (a tensor of another first dimension, a cache, a tuple): a decoder
        layer's position ids or KV cache cannot be cut into rows this way."""
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor) and a.dim() >= 1), None)
        copies = self._rows(first) if self.adapters_enabled and first is not None else {}
        for key, a in (*enumerate(args), *kwargs.items()) if copies else ():
            by_rows = isinstance(a, Tensor) and (a.dim() == 0 or a.shape[0] == first.shape[0])
            if not (by_rows or a is None or isinstance(a, (bool, int, float, str))):
                what = f"{type(a).__name__} of shape {tuple(a.shape)}" if isinstance(a, Tensor) else type(a).__name__
                raise NotImplementedError(
                    f"modules_to_save {type(self.original_module).__name__} in a mixed batch (adapter_batch): its "
                    f"argument {key!r} is a {what}, not split by row (batch of {first.shape[0]}); a module whose "
                    "copies run on a mixed batch takes row-first tensors and plain values only")
        out = self.original_module(*args, **kwargs)
        for name, rows in copies.items():
            if not isinstance(out, Tensor) or out.dim() < 1 or out.shape[0] != first.shape[0]:
                raise NotImplementedError(f"{type(self.original_module).__name__} returns "
                                          f"{type(out).__name__}: a module_to_save in a mixed batch must return "
                                          "one tensor with the batch in dim 0")
            pick = [a.index_select(0, rows) if isinstance(a, Tensor) and a.dim() >= 1 else a for a in args]
            kw = {k: v.index_select(0, rows) if isinstance(v, Tensor) and v.dim() >= 1 else v
                  for k, v in kwargs.items()}
            out = out.index_copy(0, rows, self.modules_to_save[name](*pick, **kw).to(out.dtype))
        return out

    def _rows(self, first: Tensor) -> dict[str, Tensor]:
        """Adapter name -> (rows,) indices of its rows in an input whose batch is first.shape[0], built on the host
        from the mapping (no device sync) once per (device, batch size)."""
        key = (first.device, first.shape[0])
        self.batch.check_rows(first.shape[0])                                       # also on a hit (see check_rows)
        if key not in self._batch_rows:
            slots = self.batch.row_slots(first.shape[0])
            with torch.inference_mode(False):   # kept across calls (see pool.AdapterPool)
                self._batch_rows[key] = {
                    name: torch.tensor([i for i, s in enumerate(slots) if s == self.batch.adapters[name]],
                                       dtype=torch.long, device=first.device)
                    for name in self.modules_to_save if name in self.batch.adapters}
        return self._batch_rows[key]

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
