"""ProjectionGroup: sibling LoraLinear layers that read the same input (q/k/v, gate/up) run as one grouped op call.

inject.link_projection_groups links them (per architecture, see inject.FUSED_PROJECTIONS); the model's code is
untouched and still calls each projection on its own. The first member called with an input x computes every
member's output in one call of functional.lora_linear_grouped (one adapter active) or lora_linear_multi_grouped
(inside pe.adapter_batch) and keeps the others' outputs, keyed on that x; each other member called with the same
x object (unchanged since: same version counter, same grad mode) returns its kept output, which is then
dropped. Anything else runs the member's own LoraLinear path, so linking changes the number of launches and
never a result: another x, a member that is merged, disabled or on another adapter or batch than its
siblings, torch.compile tracing, the PyTorch reference backend, no member with the adapter, an x created under
torch.inference_mode (it has no version counter to tell an in-place change; torch.no_grad, as `generate` uses,
fuses). A member without the adapter joins the grouped call at decode only (see ProjectionGroup._fused).

All members' outputs come from one autograd node, so gradients are those of the separate layers. A group whose
kept outputs keep going unused (k and v reading another input than q, as in cross-attention) stops fusing.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ptlm_engine import functional
from ptlm_engine.layers.lora import LoraLinear, compute_dtype
from ptlm_engine.ops import lora as lora_ops
from ptlm_engine.ops.lora import as_dtype


class ProjectionGroup:
    """The LoraLinear children `names` of `parent` (2 or 3, same d_in, layout, dtype and device), fused."""

    def __init__(self, parent: nn.Module, names: Sequence[str]):
        self.parent = parent
        self.names = list(names)
        self.members: list[LoraLinear] = [parent._modules[name] for name in self.names]
        self.kept: dict[int, Tensor] = {}      # member position -> its output from the last grouped call
        self.kept_for: tuple | None = None     # (x, its version counter, grad mode, positions computed) of it
        self.hits = self.misses = 0            # kept outputs used / dropped unused

    def output(self, member: LoraLinear, x: Tensor) -> Tensor | None:
        """`member`'s output for x through the group, or None: the member runs its own path."""
        if torch.compiler.is_compiling() or x.is_inference():   # an inference tensor has no version counter
            return None
        position = next(i for i, m in enumerate(self.members) if m is member)
        if self.kept_for is not None:
            key_x, version, grad, covered = self.kept_for
            if key_x is x and version == x._version and grad == torch.is_grad_enabled():
                if position in self.kept:
                    self.hits += 1
                    y = self.kept.pop(position)
                    if not self.kept:
                        self.kept_for = None
                    return y
                if position not in covered:    # left out of the grouped call: its own path
                    return None
            self.misses += 1
            self.kept, self.kept_for = {}, None
        if self.misses > self.hits:            # the members do not read one input here: stop computing in vain
            return None
        fused = self._fused(x, position)
        if fused is None:
            return None
        covered, outputs = fused
        self.kept = {i: y for i, y in zip(covered, outputs) if i != position}
        self.kept_for = (x, x._version, torch.is_grad_enabled(), covered)
        return outputs[covered.index(position)]

    def _fused(self, x: Tensor, position: int) -> tuple[list[int], list[Tensor]] | None:
        """(positions, outputs) of the members computed in one op call for x, the caller among them; or None.

        Members with the adapter (or, in a mixed batch, with any of its adapters) always join. A member without
        one joins at decode only: there the group's single launch beats a separate cuBLAS call, while at prefill
        the Triton GEMM runs below cuBLAS's rate (bench/NOTES.md), so that member keeps cuBLAS."""
        members, first = self.members, self.members[0]
        if any(self.parent._modules.get(name) is not m for name, m in zip(self.names, members)):
            return None                        # a member was replaced since linking (link again)
        batch, weight = first.batch, first.weight
        for m in members:
            if (m.batch is not batch or not m.adapters_enabled or m.merged_adapter is not None
                    or m.weight.dtype != weight.dtype or m.weight.device != weight.device):
                return None
        dtype = compute_dtype(x, weight)
        if (not lora_ops.triton_enabled(x) or dtype not in lora_ops.lora_kernels.SUPPORTED_DTYPES
                or x.dim() < 2 or x.shape[-1] != first.in_features):
            return None
        name = first.active_adapter
        if batch is not None:
            has = [bool(m.batch_adapters) for m in members]
        elif any(m.active_adapter != name for m in members):
            return None
        else:
            has = [name in m.lora_A for m in members]
        decode = x.numel() // x.shape[-1] <= lora_ops.lora_kernels.DECODE_MAX_T
        covered = [i for i, h in enumerate(has) if h or decode]
        if not any(has) or len(covered) < 2 or position not in covered:
            return None
        chosen = [members[i] for i in covered]
        xd = as_dtype(x, dtype)
        weights = [as_dtype(m.weight, dtype) for m in chosen]
        biases = [None if m.bias is None else as_dtype(m.bias, dtype) for m in chosen]
        if batch is not None:
            index, segments = batch.tokens(x)
            slots = [m.batch_slots(dtype) if m.batch_adapters else None for m in chosen]
            return covered, functional.lora_linear_multi_grouped(xd, weights, biases, slots, index,
                                                                 first.fan_in_fan_out, segments)
        adapters = [m._adapter_weights(name, dtype) if name in m.lora_A else (None, None) for m in chosen]
        scales = [m.scale.get(name, 0.0) for m in chosen]
        dropouts = [m.dropout.get(name, 0.0) if m.training else 0.0 for m in chosen]
        return covered, functional.lora_linear_grouped(xd, weights, biases, [a for a, _ in adapters],
                                                       [b for _, b in adapters], scales, dropouts,
                                                       first.fan_in_fan_out)

    def __getstate__(self) -> dict:
        # Copies and pickles start with nothing kept (kept outputs may be non-leaf tensors, which do not copy).
        return {**self.__dict__, "kept": {}, "kept_for": None}

    def __repr__(self) -> str:
        return f"ProjectionGroup({', '.join(self.names)})"
