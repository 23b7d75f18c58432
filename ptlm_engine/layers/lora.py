"""LoraLinear: an nn.Linear or GPT-2 Conv1D with named LoRA adapters, computed by the fused op."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ptlm_engine import functional
from ptlm_engine.layers.base import AdapterLayer, autocast_on
from ptlm_engine.ops.lora import as_dtype
from ptlm_engine.ops.lora_multi import LoraSlots
from ptlm_engine.pool import AdapterBatch, AdapterPool, free_slot, scalar_dtype, slot_values


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """New adapters are float32 on a half-precision base (as PEFT's autocast_adapter_dtype), so the optimizer
    updates full-precision LoRA weights; on any other base they take the base dtype."""
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


def lora_pool(d_in: int, d_out: int, device: torch.device, dtype: torch.dtype) -> AdapterPool:
    """A LoraLinear's pool in the LoraSlots layout: lora_A (S, r_max, d_in), lora_B (S, d_out, r_max), ranks (S,)
    int32, scales (S,) float32."""
    return AdapterPool(LoraSlots, {"lora_A": (None, d_in), "lora_B": (d_out, None)},
                       {"ranks": torch.int32, "scales": torch.float32}, device, dtype)


def compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """The one dtype the fused op runs in: the autocast dtype inside torch.autocast (what F.linear would use
    there; not for float64, which autocast does not cast), else the base weight's dtype.

    x, the LoRA weights (float32 on a half-precision base) and, under autocast, W0 and the bias are cast to it,
    so the layer returns the dtype the base layer returns, as PEFT's LoRA layer does. PEFT computes the LoRA
    branch in the LoRA weights' dtype and casts the sum back; here that branch runs in the base dtype (the
    Triton kernels keep its r-wide intermediate in float32), and the gradients reach float32 LoRA weights
    through the casts.
    """
    if autocast_on(x) and torch.float64 not in (x.dtype, weight.dtype):
        return torch.get_autocast_dtype(x.device.type)     # autocast leaves float64 tensors as they are
    return weight.dtype


class LoraLinear(AdapterLayer):
    """y = x W0ᵀ + bias + scale · dropout(x) Aᵀ Bᵀ with the active adapter; the base layer's x W0ᵀ + bias
    when no adapter is active, adapters are disabled, or the active one is merged into W0.

    `weight` and `bias` are the base layer's own Parameter objects, registered under the same names, so the
    model's state-dict keys (`...q_proj.weight`) do not change. The base module itself is kept in
    `original_module`, outside the module tree, so that removing the last adapter puts back that very object.
    Adapters live in `lora_A` / `lora_B` (ModuleDicts of bias-free nn.Linear keyed by adapter name: parameters
    `...q_proj.lora_A.<name>.weight`), with their rank, scale and dropout in plain dicts keyed the same way, so
    a per-row adapter mapping can pick any of them inside one call.

    One adapter is active at a time, unless a mixed batch is set (`set_batch`, done by pe.adapter_batch): then
    each row runs its own adapter through the multi-adapter op. Each adapter has a slot id (`slot`, model-wide
    when added through the API) and a copy in `pool`, the stacked LoraSlots the op reads when serving. When
    gradients reach an adapter, its Parameters are stacked on the fly instead, so each one gets its own.
    """

    remaps_in_place = True      # rows reach it through the batch's token index and grouping
    file_keys = ("lora_A.weight", "lora_B.weight")    # A's and B's leaves in PEFT's files

    def __init__(self, base: nn.Module, fan_in_fan_out: bool):
        super().__init__()
        self.register_parameter("weight", base.weight)   # (d_out, d_in), or (d_in, d_out) with fan_in_fan_out
        self.register_parameter("bias", getattr(base, "bias", None))   # (d_out,) or None (an embedding has none)
        self.fan_in_fan_out = fan_in_fan_out
        d_out, d_in = self.weight.shape[::-1] if fan_in_fan_out else self.weight.shape
        self.in_features, self.out_features = d_in, d_out
        self.__dict__["original_module"] = base           # a plain attribute: not a submodule
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.scale: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self.pool = lora_pool(d_in, d_out, self.weight.device, self.weight.dtype)
        self.merged_adapter: str | None = None
        self.batch: AdapterBatch | None = None
        self.batch_adapters: dict[int, str] = {}          # slot id -> name, for the batch's adapters this layer has
        self.batch_ranks: Tensor | None = None             # (batch.num_slots,) int32, for the stacked path
        self.batch_scales: Tensor | None = None            # (batch.num_slots,) float32, for the stacked path
        self.batch_dropouts: Tensor | None = None          # (batch.num_slots,) float32, or None: no dropout
        self.training = base.training

    def add_adapter(self, name: str, r: int, scale: float, dropout: float, slot: int | None = None) -> None:
        """A new adapter is the identity: A kaiming-uniform (a=sqrt(5), as PEFT), B zero. `slot` is its slot id
        (the model's, through the API), by default the lowest one free in this layer."""
        factory = {"device": self.weight.device, "dtype": adapter_dtype(self.weight.dtype)}
        lora_A = nn.Linear(self.in_features, r, bias=False, **factory)       # weight (r, d_in)
        lora_B = nn.Linear(r, self.out_features, bias=False, **factory)      # weight (d_out, r)
        self.init_adapter(lora_A.weight, lora_B.weight)
        self.lora_A[name], self.lora_B[name] = lora_A, lora_B
        self.r[name], self.scale[name], self.dropout[name] = r, scale, dropout
        self.slot[name] = free_slot(self.slot.values()) if slot is None else slot
        self.pool.put(self.slot[name], [lora_A.weight, lora_B.weight], scales=scale)

    @staticmethod
    @torch.no_grad()
    def init_adapter(lora_A: Tensor, lora_B: Tensor) -> None:
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        nn.init.zeros_(lora_B)

    def adapter_names(self) -> list[str]:
        return list(self.lora_A)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [self.lora_A[name].weight, self.lora_B[name].weight]

    def release(self) -> nn.Module:
        # The layer's Parameters may have been replaced (load_state_dict(assign=True)): hand back the current ones.
        original = self.original_module
        original.weight, original.bias = self.weight, self.bias
        return original

    def remove_adapter(self, name: str) -> None:
        if self.merged_adapter == name:
            self.unmerge()
        if self.active_adapter == name:
            self.active_adapter = None
        self.pool.clear(self.slot[name])
        del self.lora_A[name], self.lora_B[name], self.r[name], self.scale[name], self.dropout[name]
        del self.slot[name]

    @torch.inference_mode(False)   # its tensors are kept across calls (see AdapterPool)
    def set_batch(self, batch: AdapterBatch | None) -> None:
        """Run the per-row mapping `batch` (None: back to the active adapter). The pool gets room for every slot
        id the batch indexes, so that rows of an adapter this layer lacks read an empty slot: the base output."""
        self.batch = batch
        if batch is None:
            self.batch_adapters, self.batch_ranks, self.batch_scales, self.batch_dropouts = {}, None, None, None
            return
        self.batch_adapters, here = batch.layer_slots(self.lora_A)
        if batch.num_slots:
            self.pool.reserve(batch.num_slots - 1)
        # Per slot 0 … num_slots-1, built once here: ranks and scales for the stacked path (0 where this layer
        # lacks the slot's adapter), dropout probabilities for both paths (None when all are 0).
        device = self.weight.device
        self.batch_ranks = slot_values(here, self.r, torch.int32, device)
        self.batch_scales = slot_values(here, self.scale, scalar_dtype(self.weight.dtype), device)
        self.batch_dropouts = slot_values(here, self.dropout, torch.float32, device) \
            if any(self.dropout[n] for n in self.batch_adapters.values()) else None

    def _base_forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.t() if self.fan_in_fan_out else self.weight, self.bias)

    # The ProjectionGroup (layers.lora_group) this layer shares its input with, set by
    # inject.link_projection_groups: q/k/v or gate/up then run as one grouped op call.
    group = None

    def forward(self, x: Tensor) -> Tensor:
        if self.after_block and self.batch is None:
            self.check_recomputation()
        if self.group is not None:
            y = self.group.output(self, x)                 # None: the group cannot run fused, go on alone
            if y is not None:
                return y
        if self.batch is not None and self.adapters_enabled:
            return self._batch_forward(x)
        name = self.active_adapter
        if not self.adapters_enabled or self.merged_adapter is not None or name not in self.lora_A:
            return self._base_forward(x)
        dtype = compute_dtype(x, self.weight)
        bias = None if self.bias is None else as_dtype(self.bias, dtype)
        lora_A, lora_B = self._adapter_weights(name, dtype)
        return functional.lora_linear(
            as_dtype(x, dtype), as_dtype(self.weight, dtype), bias, lora_A, lora_B,
            self.scale[name], self.dropout[name] if self.training else 0.0, self.fan_in_fan_out)

    def _adapter_weights(self, name: str, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The adapter's A (r, d_in) and B (d_out, r) in the compute dtype, or float32 as they are.

        Training float32 adapters on a half-precision base passes the Parameters themselves: the op reads them
        as they are and returns float32 gradients (no cast launched per layer call, forward or backward).
        Serving one reads the pool's copy, already cast and checked against the Parameters' stamps."""
        lora_A, lora_B = self.lora_A[name].weight, self.lora_B[name].weight
        if (lora_A.dtype == dtype and lora_B.dtype == dtype) or torch.compiler.is_compiling() or (
                torch.is_grad_enabled() and (lora_A.requires_grad or lora_B.requires_grad)):
            as_is = (dtype, torch.float32)
            return (lora_A if lora_A.dtype in as_is else lora_A.to(dtype),
                    lora_B if lora_B.dtype in as_is else lora_B.to(dtype))
        self.pool.place(self.weight.device, dtype)
        slot, r = self.slot[name], self.r[name]
        self.pool.sync(slot, (lora_A, lora_B))
        return self.pool.lora_A[slot, :r], self.pool.lora_B[slot, :, :r]

    def _batch_forward(self, x: Tensor) -> Tensor:
        index, segments = self.batch.tokens(x)             # (...) slot per token; checks the batch size first
        if not self.batch_adapters:                        # no row's adapter is in this layer
            return self._base_forward(x)
        dtype = compute_dtype(x, self.weight)
        bias = None if self.bias is None else as_dtype(self.bias, dtype)
        return functional.lora_linear_multi(as_dtype(x, dtype), as_dtype(self.weight, dtype), bias,
                                            self.batch_slots(dtype), index, self.fan_in_fan_out, segments)

    def batch_slots(self, dtype: torch.dtype) -> LoraSlots:
        """The mixed batch's adapters in this layer as the multi-adapter op reads them, in `dtype`."""
        trains = torch.is_grad_enabled() and any(
            self.lora_A[name].weight.requires_grad or self.lora_B[name].weight.requires_grad
            for name in self.batch_adapters.values())
        # A traced graph cannot check the pool's stamps, so it stacks inside the graph, which is always current.
        slots = self._stacked_slots(dtype) if trains or torch.compiler.is_compiling() else self._pooled_slots(dtype)
        if self.training:                                  # LoRA dropout applies in training mode only, as in PEFT
            slots = slots._replace(dropouts=self.batch_dropouts)
        return slots

    def _pooled_slots(self, dtype: torch.dtype) -> LoraSlots:
        """The cached stack, with the batch's adapters copied in again where their Parameters changed (checked
        once per AdapterBatch.frozen token where the batch has one: inside generate, once a call)."""
        self.pool.place(self.weight.device, dtype)
        self.pool.sync_batch(self._batch_params, self.batch_adapters, self.adapter_parameters, self.batch.frozen)
        return self.pool.slots(self.batch.num_slots)

    def _batch_params(self) -> list[Tensor]:
        """The batch's adapters' Parameters, flat: read through plain dicts rather than Module attribute lookup,
        as serving does this in every layer at every step."""
        modules_A, modules_B = self.lora_A._modules, self.lora_B._modules
        return [p for name in self.batch_adapters.values()
                for p in (modules_A[name]._parameters["weight"], modules_B[name]._parameters["weight"])]

    def _stacked_slots(self, dtype: torch.dtype) -> LoraSlots:
        """The batch's adapters' own Parameters stacked, zero-padded to their largest rank, so that autograd
        routes each slot's gradient to that adapter's leaves; slots of other adapters are zeros. An adapter with
        no rows since a remap gets no gradient (None, as in a block without it), not zeros."""
        r_max = max(self.r[name] for name in self.batch_adapters.values())
        # float32 master adapters stay float32 (the ops read them as the compute dtype): a stack cast to fp16 would
        # get fp16 gradients, which overflow under a GradScaler's loss scale where the fp32 ones do not
        if dtype in (torch.float16, torch.bfloat16) and any(
                self.lora_A[name].weight.dtype == torch.float32 for name in self.batch_adapters.values()):
            dtype = torch.float32
        blank_A = self.weight.new_zeros(r_max, self.in_features, dtype=dtype)
        blank_B = self.weight.new_zeros(self.out_features, r_max, dtype=dtype)
        stack_A, stack_B = [], []
        for slot in range(self.batch.num_slots):
            name = self.batch_adapters.get(slot)
            if name is None:
                stack_A.append(blank_A)
                stack_B.append(blank_B)
                continue
            pad = r_max - self.r[name]
            lora_A, lora_B = self.lora_A[name].weight, self.lora_B[name].weight
            if not self.batch.has_rows(slot):
                lora_A, lora_B = lora_A.detach(), lora_B.detach()
            stack_A.append(F.pad(lora_A.to(dtype), (0, 0, 0, pad)))                       # (r_max, d_in)
            stack_B.append(F.pad(lora_B.to(dtype), (0, pad)))                             # (d_out, r_max)
        return LoraSlots(torch.stack(stack_A), torch.stack(stack_B), self.batch_ranks, self.batch_scales)

    def _apply(self, fn, recurse=True):
        # model.to() / .half() / .cuda() convert the Parameters; the pool follows, refilled by the next sync.
        super()._apply(fn, recurse)
        self.pool.move(self.weight.device, self.weight.dtype)
        self.set_batch(self.batch)                         # its per-slot tensors to the new device
        return self

    def _merge_dtype(self) -> torch.dtype:
        return torch.promote_types(self.weight.dtype, torch.float32)        # float32, or float64 on a float64 base

    def delta_weight(self, name: str) -> Tensor:
        """scale · B A in float32 (float64 on a float64 base), laid out like `weight`."""
        dtype = self._merge_dtype()
        delta = self.scale[name] * (self.lora_B[name].weight.to(dtype) @ self.lora_A[name].weight.to(dtype))
        return delta.t() if self.fan_in_fan_out else delta                  # (d_out, d_in) or (d_in, d_out)

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """W0 += scale · B A, summed in float32 (float64 on a float64 base) and rounded once to W0's dtype."""
        if self.merged_adapter is not None:
            raise ValueError(f"adapter {self.merged_adapter!r} is already merged into this layer")
        self.weight.copy_(self.weight.to(self._merge_dtype()) + self.delta_weight(name))
        self.merged_adapter = name

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 -= scale · B A; in half precision W0 comes back up to one rounding of the merged weight."""
        self.weight.copy_(self.weight.to(self._merge_dtype()) - self.delta_weight(self.merged_adapter))
        self.merged_adapter = None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"fan_in_fan_out={self.fan_in_fan_out}, adapters={list(self.lora_A)}, "
                f"active={self.active_adapter!r}, merged={self.merged_adapter!r}")
