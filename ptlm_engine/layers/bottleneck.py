"""BottleneckLayer: bottleneck adapters (Houlsby et al., 2019; parallel ones, He et al., 2022) on the output of one
sub-layer of a model, computed by the fused op from forward hooks.

The layer is added as a child (`ptlm_bottleneck`) of the module whose output it changes and hooks that module,
rather than replacing it: the model's module tree and its state-dict keys stay as they were (the adapter adds
`<module>.ptlm_bottleneck.{down,up}.<name>.{weight,bias}`), and removing the last adapter removes the hooks and
the child. Where a bottleneck adapter goes in each architecture is inject's table (ptlm_engine/bottleneck_sites.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ptlm_engine import functional
from ptlm_engine.reference import read_as
from ptlm_engine.layers.base import AdapterLayer
from ptlm_engine.layers.lora import adapter_dtype, compute_dtype
from ptlm_engine.ops.bottleneck import BOTTLENECK_ACT_CODES
from ptlm_engine.ops.bottleneck_multi import BottleneckSlots
from ptlm_engine.pool import AdapterBatch, AdapterPool, free_slot, scalar_dtype, slot_values

LAYER_NAME = "ptlm_bottleneck"   # the layer's attribute name in the module it hooks
LAYER_NORM_EPS = 1e-5            # of an adapter's own LayerNorm (BottleneckConfig.layer_norm)


def bottleneck_pool(d: int, device: torch.device, dtype: torch.dtype) -> AdapterPool:
    """A BottleneckLayer's pool in the BottleneckSlots layout: down_weight (S, m_max, d), down_bias (S, m_max),
    up_weight (S, d, m_max), up_bias (S, d); sizes (S,) int32, scales (S,) float32, acts (S,) int32. An empty
    slot has size 0 and scale 0, so rows that index it get their input back unchanged. Besides, the adapters'
    LayerNorms: ln_weight (S, d), ln_bias (S, d), zero where an adapter has none, and layer_norms (S,) bool."""
    return AdapterPool(BottleneckSlots,
                       {"down_weight": (None, d), "down_bias": (None,), "up_weight": (d, None), "up_bias": (d,),
                        "ln_weight": (d,), "ln_bias": (d,)},
                       {"sizes": torch.int32, "scales": torch.float32, "acts": torch.int32, "layer_norms": torch.bool},
                       device, dtype)


def _hidden_states(args: tuple, kwargs: dict) -> Tensor | None:
    """A sub-layer's input: its first positional argument, or `hidden_states` where the model passes keywords
    (Llama's decoder layer calls self_attn(hidden_states=...))."""
    return args[0] if args else kwargs.get("hidden_states")



def _master(p: Tensor, dtype: torch.dtype) -> Tensor:
    """An adapter tensor as the ops take it in `dtype`: float32 master weights on a half-precision base as they
    are (the ops read them as `dtype` and return float32 gradients, which a GradScaler-scaled loss cannot overflow
    as fp16 ones would), anything else cast."""
    return p if p.dtype == torch.float32 and dtype in (torch.float16, torch.bfloat16) else p.to(dtype)

class BottleneckLayer(AdapterLayer):
    """Named bottleneck adapters on the output of `site` (a sub-layer, or the module right after its output
    projection), y = out + scale · up(act(down(h))), one adapter active at a time or one per row in a mixed batch;
    h is normalised first by the adapter's own LayerNorm where it has one (`layer_norm`), out staying as it is.

    Sequential adapters (placements "houlsby", "pfeiffer") read h = out, the site's output. Parallel adapters read
    h = the input of `reads`, the sub-layer the site belongs to, captured by a forward pre-hook registered while the
    layer has a parallel adapter. A site returning a tuple (Llama's and GPT-2's attention) has its first element
    changed. Adapters are nn.Linear `down` (d -> m) and `up` (m -> d) in ModuleDicts keyed by adapter name:
    2·m·d + d + m parameters each, and 2·d more for an nn.LayerNorm in `layer_norm` where the adapter has one.

    The op runs in the compute dtype of layers.lora (the autocast dtype, else the site output's dtype) and the
    result is cast back to the output's dtype; adapters are float32 on a half-precision base. A mixed batch reads
    the pool (serving) or the Parameters stacked on the fly (when gradients reach them), as LoraLinear does.
    """

    remaps_in_place = True      # rows reach it through the batch's token index and grouping

    def __init__(self, site: nn.Module, reads: nn.Module, d: int):
        super().__init__()
        self.d = d
        # Plain attributes, not submodules: the layer itself is the site's child.
        self.__dict__["site"] = site
        self.__dict__["reads"] = reads
        self.down = nn.ModuleDict()
        self.up = nn.ModuleDict()
        self.layer_norm = nn.ModuleDict()                  # only the adapters that have one
        self.bottleneck: dict[str, int] = {}
        self.act: dict[str, str] = {}
        self.scale: dict[str, float] = {}
        self.parallel: dict[str, bool] = {}
        self.pool: AdapterPool | None = None
        self.batch: AdapterBatch | None = None
        self.batch_adapters: dict[int, str] = {}          # slot id -> name, for the batch's adapters this layer has
        self.batch_sizes: Tensor | None = None             # (batch.num_slots,) int32, for the stacked path
        self.batch_scales: Tensor | None = None            # (batch.num_slots,) float32
        self.batch_acts: Tensor | None = None              # (batch.num_slots,) int32
        # Which of the batch's rows normalise their adapter's input: None (none), True (every row with an adapter
        # here), or a (num_slots + 1,) bool tensor per slot id whose last entry (index -1) is False.
        self.batch_layer_norms: bool | Tensor | None = None
        # Which of the batch's rows read the sub-layer's input: False (none), True (all), or, when this layer has
        # sequential and parallel adapters of the batch, a (num_slots + 1,) bool tensor per slot id whose last
        # entry (index -1: rows without an adapter here) is False.
        self.batch_parallel: bool | Tensor = False
        self._input: Tensor | None = None                  # the sub-layer's input, between the two hooks
        self._output_hook = site.register_forward_hook(self._on_output)
        self._input_hook = None

    # ------------------------------------------------------------------------------------------- adapters
    def add_adapter(self, name: str, bottleneck: int, act: str, scale: float, parallel: bool,
                    slot: int | None = None, *, device: torch.device, base_dtype: torch.dtype,
                    layer_norm: bool = False) -> None:
        """A new adapter is the identity: `up` is zero (weight and bias); `down` is initialised as AdapterHub's
        "mam_adapter" init (He et al.'s code): kaiming-uniform weight (a=sqrt(5), nn.Linear's default), zero bias;
        with `layer_norm`, a LayerNorm over d (weight 1, bias 0) on the adapter's input.
        Parameters are float32 on a half-precision `base_dtype`, else in it."""
        factory = {"device": device, "dtype": adapter_dtype(base_dtype)}
        down = nn.Linear(self.d, bottleneck, **factory)                     # weight (m, d), bias (m,)
        up = nn.Linear(bottleneck, self.d, **factory)                       # weight (d, m), bias (d,)
        nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        nn.init.zeros_(down.bias)
        nn.init.zeros_(up.weight)
        nn.init.zeros_(up.bias)
        self.down[name], self.up[name] = down, up
        if layer_norm:
            self.layer_norm[name] = nn.LayerNorm(self.d, eps=LAYER_NORM_EPS, **factory)
        self.bottleneck[name], self.act[name], self.scale[name], self.parallel[name] = bottleneck, act, scale, parallel
        self.slot[name] = free_slot(self.slot.values()) if slot is None else slot
        if self.pool is None:
            self.pool = bottleneck_pool(self.d, device, base_dtype)
        self.pool.put(self.slot[name], self.adapter_parameters(name), scales=scale, acts=BOTTLENECK_ACT_CODES[act],
                      layer_norms=layer_norm)
        if parallel and self._input_hook is None:
            self._input_hook = self.reads.register_forward_pre_hook(self._on_input, with_kwargs=True)

    def adapter_names(self) -> list[str]:
        return list(self.down)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """down weight (m, d), down bias (m,), up weight (d, m), up bias (d,) [, LayerNorm weight (d,), bias (d,)]"""
        down, up = self.down[name], self.up[name]
        if name in self.layer_norm:
            norm = self.layer_norm[name]
            return [down.weight, down.bias, up.weight, up.bias, norm.weight, norm.bias]
        return [down.weight, down.bias, up.weight, up.bias]

    def remove_adapter(self, name: str) -> None:
        if self.active_adapter == name:
            self.active_adapter = None
        self.pool.clear(self.slot[name])
        del self.down[name], self.up[name], self.bottleneck[name], self.act[name], self.scale[name]
        if name in self.layer_norm:
            del self.layer_norm[name]
        del self.parallel[name], self.slot[name]
        if self._input_hook is not None and not any(self.parallel.values()):
            self._input_hook.remove()
            self._input_hook = None

    def release(self) -> None:
        """Remove the hooks; the API then deletes the layer from the site module."""
        self._output_hook.remove()
        if self._input_hook is not None:
            self._input_hook.remove()
            self._input_hook = None
        self._input = None
        return None

    @torch.inference_mode(False)   # its tensors are kept across calls (see pool.AdapterPool)
    def set_batch(self, batch: AdapterBatch | None) -> None:
        """Run the per-row mapping `batch` (None: back to the active adapter). The pool gets room for every slot
        id the batch indexes, so that rows of adapters this layer lacks (other methods', other layers') read an
        empty slot and keep the site's output."""
        self.batch = batch
        if batch is None:
            self.batch_adapters, self.batch_sizes, self.batch_scales, self.batch_acts = {}, None, None, None
            self.batch_parallel, self.batch_layer_norms = False, None
            return
        self.batch_adapters, here = batch.layer_slots(self.down)
        if batch.num_slots:
            self.pool.reserve(batch.num_slots - 1)
        device = self.pool.device
        self.batch_sizes = slot_values(here, self.bottleneck, torch.int32, device)
        self.batch_scales = slot_values(here, self.scale, scalar_dtype(self.pool.dtype), device)
        acts = {name: BOTTLENECK_ACT_CODES[act] for name, act in self.act.items()}
        self.batch_acts = slot_values(here, acts, torch.int32, device)
        norms = {self.batch_adapters[slot] in self.layer_norm for slot in self.batch_adapters}
        if norms == {True, False}:
            has_norm = {name: name in self.layer_norm for name in self.down}
            self.batch_layer_norms = slot_values([*here, None], has_norm, torch.bool, device)
        else:
            self.batch_layer_norms = True if norms == {True} else None
        kinds = {self.parallel[n] for n in self.batch_adapters.values()}
        if len(kinds) == 2:
            self.batch_parallel = torch.tensor([n is not None and self.parallel[n] for n in here] + [False],
                                               device=device)
        else:
            self.batch_parallel = kinds == {True}

    # -------------------------------------------------------------------------------------------- forward
    def _on_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._input = _hidden_states(args, kwargs)

    def _on_output(self, module: nn.Module, args: tuple, output):
        x, self._input = self._input, None                 # never kept beyond the call
        if self.after_block and self.batch is None:
            self.check_recomputation()
        if not self.adapters_enabled:
            return None
        out = output[0] if isinstance(output, tuple) else output
        if self.batch is not None:
            y = self._batch_forward(out, x)
        elif self.active_adapter in self.down:
            y = self._single_forward(self.active_adapter, out, x)
        else:
            return None
        return (y, *output[1:]) if isinstance(output, tuple) else y

    def _parallel_input(self, x: Tensor | None, out: Tensor) -> Tensor:
        if x is None or x.shape != out.shape:
            raise RuntimeError(f"a parallel bottleneck adapter needs the input of {type(self.reads).__name__} with "
                               f"the shape of its output {tuple(out.shape)}, got "
                               f"{None if x is None else tuple(x.shape)}")
        return x

    def _single_forward(self, name: str, out: Tensor, x: Tensor | None) -> Tensor:
        dtype = compute_dtype(out, out)
        weights = self._adapter_weights(name, dtype, out.device)
        if self.parallel[name]:
            h, residual = self._parallel_input(x, out).to(dtype), out.to(dtype)
        else:
            h, residual = out.to(dtype), None
        if name in self.layer_norm:        # the adapter reads LN(h); the residual stays the stream
            residual = h if residual is None else residual
            h = self._layer_norm(h, *weights[4:])
        y = functional.bottleneck_adapter(h, *weights[:4], self.act[name], self.scale[name], residual)
        return y.to(out.dtype)

    def _adapter_weights(self, name: str, dtype: torch.dtype, device: torch.device) -> list[Tensor]:
        """The adapter's tensors (as adapter_parameters) in the compute dtype: the pool's cast copy when serving a
        float32 adapter on a half-precision base (no casts per call), else the Parameters cast in the graph
        (gradients reach them)."""
        params = self.adapter_parameters(name)
        if all(p.dtype == dtype for p in params) or torch.compiler.is_compiling() or (
                torch.is_grad_enabled() and any(p.requires_grad for p in params)):
            return [_master(p, dtype) for p in params]
        self.pool.place(device, dtype)
        slot, m = self.slot[name], self.bottleneck[name]
        self.pool.sync(slot, params)
        pool = self.pool
        weights = [pool.down_weight[slot, :m], pool.down_bias[slot, :m], pool.up_weight[slot, :, :m],
                   pool.up_bias[slot]]
        return weights + [pool.ln_weight[slot], pool.ln_bias[slot]] if name in self.layer_norm else weights

    def _batch_forward(self, out: Tensor, x: Tensor | None) -> Tensor:
        index, segments = self.batch.tokens(out)           # (...) slot per token; checks the batch size first
        if not self.batch_adapters:                        # no row's adapter is in this layer
            return out
        dtype = compute_dtype(out, out)
        slots, norms = self.batch_slots(dtype, out.device)
        h, residual = out.to(dtype), None
        if self.batch_parallel is True:
            h, residual = self._parallel_input(x, out).to(dtype), h
        elif isinstance(self.batch_parallel, Tensor):      # per token: the sub-layer's input or its output
            reads_input = self.batch_parallel[index].unsqueeze(-1)                       # (..., 1)
            h, residual = torch.where(reads_input, self._parallel_input(x, out).to(dtype), h), h
        if norms is not None:              # rows with a LayerNorm read LN(h); the residual stays the stream
            residual = h if residual is None else residual
            h = self._normalised_rows(h, index, *norms)
        y = functional.bottleneck_adapter_multi(h, slots, index, residual, segments)
        return y.to(out.dtype)

    def _layer_norm(self, h: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """LN(h) · weight + bias in h's dtype, weight and bias (d,) or per token (..., d): computed in float32 with
        weight and bias read as h's dtype, rounded once. float32 masters (training on a half-precision base) get
        float32 gradients (an fp16 sum over the tokens overflows under a GradScaler's loss scale), and their
        pool's h-dtype copies (serving) give the same values."""
        wide = torch.promote_types(h.dtype, torch.float32)
        normed = F.layer_norm(h.to(wide), (self.d,), eps=LAYER_NORM_EPS)
        return (normed * read_as(weight, h.dtype).to(wide) + read_as(bias, h.dtype).to(wide)).to(h.dtype)

    def _normalised_rows(self, h: Tensor, index: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """h (..., d) with each row normalised by its adapter's LayerNorm (weight, bias (num_slots, d), gathered
        per token on the device), rows whose adapter has none left as they are."""
        normalised = self._layer_norm(h, weight[index], bias[index])
        if self.batch_layer_norms is True:  # rows without an adapter here keep the residual whatever they read
            return normalised
        return torch.where(self.batch_layer_norms[index].unsqueeze(-1), normalised, h)

    def batch_slots(self, dtype: torch.dtype, device: torch.device
                    ) -> tuple[BottleneckSlots, tuple[Tensor, Tensor] | None]:
        """The mixed batch's adapters in this layer as the multi op reads them, in `dtype` on `device`, and their
        LayerNorms' weights and biases (num_slots, d) each, None where no adapter of the batch has one."""
        trains = torch.is_grad_enabled() and any(p.requires_grad for p in self._batch_params())
        # A traced graph cannot check the pool's stamps, so it stacks inside the graph, which is always current.
        if trains or torch.compiler.is_compiling():
            return self._stacked_slots(dtype)
        self.pool.place(device, dtype)
        self.pool.sync_batch(self._batch_params, self.batch_adapters, self.adapter_parameters, self.batch.frozen)
        count = self.batch.num_slots
        norms = None if self.batch_layer_norms is None else (self.pool.ln_weight[:count], self.pool.ln_bias[:count])
        return self.pool.slots(count), norms

    def _batch_params(self) -> list[Tensor]:
        """The batch's adapters' Parameters, flat, in adapter_parameters' order: read through plain dicts rather
        than Module attribute lookup, as serving does this in every layer at every step."""
        downs, ups, norms = self.down._modules, self.up._modules, self.layer_norm._modules
        return [p for name in self.batch_adapters.values()
                for module in ((downs[name], ups[name], norms[name]) if name in norms else (downs[name], ups[name]))
                for p in (module._parameters["weight"], module._parameters["bias"])]

    def _stacked_slots(self, dtype: torch.dtype) -> tuple[BottleneckSlots, tuple[Tensor, Tensor] | None]:
        """The batch's adapters' own Parameters stacked, zero-padded to their widest bottleneck, so that autograd
        routes each slot's gradient to that adapter's leaves; slots of other adapters are zeros, as are the
        LayerNorm slots of adapters without one."""
        m_max = max(self.bottleneck[name] for name in self.batch_adapters.values())
        params = self._batch_params()
        if any(_master(p, dtype) is p and p.dtype != dtype for p in params):
            dtype = torch.float32                          # float32 masters stacked as they are (see _master)
        like = self.pool.down_weight
        zeros = like.new_zeros(self.d, dtype=dtype)                                       # (d,)
        blank = [like.new_zeros(m_max, self.d, dtype=dtype), like.new_zeros(m_max, dtype=dtype),
                 like.new_zeros(self.d, m_max, dtype=dtype), zeros, zeros, zeros]
        stacks = [[] for _ in range(4 if self.batch_layer_norms is None else 6)]
        for slot in range(self.batch.num_slots):
            name = self.batch_adapters.get(slot)
            if name is None:
                tensors = blank
            else:
                pad = m_max - self.bottleneck[name]
                live = self.batch.has_rows(slot)                  # no rows since a remap: no gradient (None)
                down_weight, down_bias, up_weight, up_bias, *norm = (
                    _master(p if live else p.detach(), dtype) for p in self.adapter_parameters(name))
                tensors = [F.pad(down_weight, (0, 0, 0, pad)), F.pad(down_bias, (0, pad)),   # (m_max, d), (m_max,)
                           F.pad(up_weight, (0, pad)), up_bias, *(norm or blank[4:])]       # (d, m_max), (d,)...
            for stack, tensor in zip(stacks, tensors):
                stack.append(tensor)
        stacked = [torch.stack(stack) for stack in stacks]
        slots = BottleneckSlots(*stacked[:4], self.batch_sizes, self.batch_scales, self.batch_acts)
        return slots, (tuple(stacked[4:]) or None)

    def _apply(self, fn, recurse=True):
        # model.to() / .half() / .cuda() convert the Parameters; the pool and the batch's per-slot tensors follow.
        super()._apply(fn, recurse)
        if self.down:
            self.pool.move(next(iter(self.down.values())).weight.device, self.pool.dtype)
            self.set_batch(self.batch)
        return self

    def extra_repr(self) -> str:
        adapters = {n: (self.bottleneck[n], self.act[n], "parallel" if self.parallel[n] else "sequential",
                        *(["layer_norm"] if n in self.layer_norm else [])) for n in self.down}
        return f"d={self.d}, adapters={adapters}, active={self.active_adapter!r}"
