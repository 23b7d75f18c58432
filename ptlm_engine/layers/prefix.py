"""Prefix tuning (Li & Liang, 2021) inside a transformers model, computing what HF PEFT's PREFIX_TUNING does.

PEFT hands the model its prefix as a past key/value cache of length P: in every layer the attention sees P
extra keys and values (no rotary: they never pass through the projections), the real tokens take positions
P … P+L-1, and the attention mask gains P leading ones. Here the prefix never enters the cache (which holds
only real tokens, so generation works unchanged) and is added by the attention function at every call:

- `PrefixTuning`, a child of the model root ("ptlm_prefix"), holds each adapter's `PrefixEncoder` and, while it
  has adapters, switches `config._attn_implementation` to a registered ptlm attention function
  ("ptlm_prefix_sdpa" / "ptlm_prefix_eager", named after the implementation it replaces and falls back to),
  with a mask function of the same name that records, on each mask it makes, whether that mask is exactly
  causal (or bidirectional) AND a key-padding mask.
- A forward pre-hook on the backbone (the innermost module holding every self-attention layer whose forward
  takes position_ids: model.base_model in most models, model.decoder in OPT's) shifts every row's position ids
  by its P, building them as the model does where the caller gave none (HF's arange after the cached tokens,
  or an architecture's own rule, layers.positions), as PEFT's cache of P does.
- The attention function (after rotary and the KV-cache update) takes the layer's prefix keys / values per row
  and runs functional.prefix_attention with causal / key_padding_mask from the recorded layout: the prefix is
  never concatenated. Rows of a mixed batch may have different adapters, different P or none: prefix_lengths
  says how many of the padded P_max entries each row sees. Where the mask is not a recorded layout, attention
  dropout is active in training, or attention weights are asked for, it falls back to the original
  implementation over [prefix ; keys] with the mask extended by the prefix columns, which is PEFT's own
  computation (dropout included).
"""
from __future__ import annotations

import dataclasses
import inspect
import sys
from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import (ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface,
                                        bidirectional_mask_function, causal_mask_function, prepare_padding_mask)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ptlm_engine import functional
from ptlm_engine.config import PrefixConfig
from ptlm_engine.layers.base import AdapterLayer, autocast_on
from ptlm_engine.layers.lora import adapter_dtype
from ptlm_engine.layers.positions import position_rule
from ptlm_engine.layers.prompt import UNUSED_COLUMNS
from ptlm_engine.pool import stamp, unchanged

LAYER_NAME = "ptlm_prefix"               # the PrefixTuning module's attribute on the model root
ORIGINAL_IMPLEMENTATIONS = ("sdpa", "eager")
_IMPLEMENTATION = "ptlm_prefix_{}"        # the registered attention / mask function replacing each original
_ENTRY = "_ptlm_prefix_attention"         # in an attention module's __dict__: (PrefixTuning, layer index)
_LAYOUT = "_ptlm_mask_layout"             # on a mask tensor our mask function made: its MaskLayout


# -------------------------------------------------------------------------------------------------- geometry
@dataclasses.dataclass(frozen=True)
class PrefixGeometry:
    """The prefix's shape, as PEFT derives it from the model config: per layer, keys and values of
    `num_heads` heads of `head_dim` (the key/value heads on grouped-query models)."""
    num_layers: int
    num_heads: int
    head_dim: int

    @property
    def token_dim(self) -> int:
        """PEFT's token_dim: the width of one layer's keys (the projection's input width)."""
        return self.num_heads * self.head_dim

    @property
    def width(self) -> int:
        """Per virtual token: keys and values of every layer, (num_layers, 2, num_heads, head_dim) flattened."""
        return self.num_layers * 2 * self.token_dim


def prefix_geometry(config) -> PrefixGeometry:
    """PEFT's rule (_prepare_prompt_learning_config): token_dim = hidden_size and num_attention_heads heads,
    or on models with num_key_value_heads, those heads of head_dim (hidden_size / heads unless set)."""
    fields = {f: getattr(config, f, None) for f in ("num_hidden_layers", "hidden_size", "num_attention_heads")}
    missing = [f for f, v in fields.items() if not isinstance(v, int) or v <= 0]
    if missing:
        raise ValueError(f"prefix tuning needs {', '.join(missing)} in the model config "
                         f"({type(config).__name__})")
    layers, hidden, heads = fields.values()
    kv_heads = getattr(config, "num_key_value_heads", None)
    head_dim = getattr(config, "head_dim", None) if kv_heads is not None else None
    if head_dim is None:
        if hidden % heads:
            raise ValueError(f"prefix tuning: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
        head_dim = hidden // heads
    return PrefixGeometry(layers, heads if kv_heads is None else kv_heads, head_dim)


# --------------------------------------------------------------------------------------------------- encoder
class PrefixEncoder(nn.Module):
    """One adapter's prefix, as PEFT's PrefixEncoder: `embedding` (P, width) itself, or with projection an
    embedding (P, token_dim) -> Linear(token_dim, encoder_hidden_size) -> tanh -> Linear(..., width).

    `values()` computes the (P, width) keys and values of every layer; `served(dtype)` is the same without
    autograd, computed once and kept (in each dtype asked for) until the Parameters change (their stamp), so
    that serving never runs the MLP per step.
    """

    def __init__(self, num_virtual_tokens: int, geometry: PrefixGeometry, projection: bool,
                 encoder_hidden_size: int | None, device: torch.device, dtype: torch.dtype):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.projection = projection
        if projection:
            hidden = encoder_hidden_size or geometry.token_dim            # PEFT's default: token_dim
            self.embedding = nn.Embedding(num_virtual_tokens, geometry.token_dim, **factory)
            self.transform = nn.Sequential(nn.Linear(geometry.token_dim, hidden, **factory), nn.Tanh(),
                                           nn.Linear(hidden, geometry.width, **factory))
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, geometry.width, **factory)
        self._served: dict[torch.dtype, tuple[tuple, Tensor]] = {}

    @property
    def num_virtual_tokens(self) -> int:
        return self.embedding.num_embeddings

    def values(self) -> Tensor:
        """(P, width) in the Parameters' dtype, with autograd."""
        weight = self.embedding.weight
        return self.transform(weight) if self.projection else weight

    def trains(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())

    def served(self, dtype: torch.dtype) -> Tensor:
        """(P, width) in `dtype` without autograd, kept until the Parameters change (computed in the graph when
        traced: a trace cannot check the stamps)."""
        if torch.compiler.is_compiling():
            return self.values().detach().to(dtype)
        params = list(self.parameters())
        kept = self._served.get(dtype)
        if kept is not None and unchanged(kept[0], params):
            return kept[1]
        with torch.inference_mode(False), torch.no_grad():   # kept across calls: no inference tensors
            values = self.values().to(dtype)
        self._served[dtype] = (stamp(params), values)
        return values

    def __getstate__(self) -> dict:
        # Weakrefs do not pickle; a copy computes its values again.
        return {**self.__dict__, "_served": {}}


# ------------------------------------------------------------------------------------------ the forward pass
@dataclasses.dataclass(frozen=True)
class MaskLayout:
    """A mask that is exactly causal (query i sees keys j <= kv_length - q_length + i) or bidirectional, AND
    the key padding `padding` (B, kv_length) bool (None: no padding)."""
    causal: bool
    padding: Tensor | None
    q_length: int
    kv_length: int


class PrefixContext:
    """One forward pass's prefixes: per row the first lengths[b] of P keys / values in every layer.

    Either one adapter for every row (`rows` None: its (P, width) values, handed to the op as an expanded view,
    never copied per row), or per row (`rows` (n,) index into [none, adapter 0, adapter 1, …], gathered once
    per pass into (n, P_max, width); rows without a prefix read zeros and see none of them).

    For the sliding-window check (`window_need`), on the host: `tokens` each row's P (an int: every row's),
    `unused` each row's leading columns a mixed batch's prompt layout added and the row masks out (None: none),
    `total` the pass's key columns before any sliding cache dropped old ones (None: not known)."""

    def __init__(self, layer: "PrefixTuning", names: list[str], rows: Tensor | None, lengths: Tensor | None,
                 n: int, tokens: int | tuple[int, ...], unused: tuple[int, ...] | None = None,
                 total: int | None = None):
        self.layer, self.names, self.rows, self.lengths, self.n = layer, names, rows, lengths, n
        self.tokens, self.unused, self.total = tokens, unused, total
        self._values: dict[torch.dtype, Tensor] = {}
        self._needs: dict[tuple[int, int], tuple[int, int, int]] = {}

    def window_need(self, columns: int, window: int) -> tuple[int, int, int]:
        """(row, P, its columns) of the row with a prefix that needs the most of a sliding window of `window`, at
        a layer whose attention got `columns` keys: its P virtual tokens and its columns, which are the pass's
        (before a sliding cache dropped its oldest ones) less the padding columns a mixed batch's prompt layout put
        before the row, which it masks out and does not have alone. The row's own padding counts, as it does alone
        and in PEFT's prefix cache (which sits before it). Host ints only (no device sync), once per pass."""
        key = columns, window
        if key not in self._needs:
            unused = self.unused
            if self.total is not None:
                columns = max(columns, self.total)
            elif columns >= window:              # a sliding cache may have dropped leading (unused) columns
                unused = None
            tokens = (self.tokens,) * self.n if isinstance(self.tokens, int) else self.tokens
            unused = (0,) * self.n if unused is None else unused
            _, row = max((p - unused[b], -b) for b, p in enumerate(tokens) if p > 0)   # the first of the most
            self._needs[key] = -row, tokens[-row], columns - unused[-row]
        return self._needs[key]

    def values(self, dtype: torch.dtype) -> Tensor:
        """(P, width) shared, or (n, P_max, width) per row, in `dtype`; computed at the pass's first layer."""
        if dtype not in self._values:
            encoders = [self.layer.encoders[name] for name in self.names]
            if self.rows is None:
                encoder = encoders[0]
                values = encoder.values().to(dtype) if encoder.trains() else encoder.served(dtype)
            else:
                values = self.layer.gathered(encoders, self.rows, self.n, dtype)
            self._values[dtype] = values
        return self._values[dtype]

    def prefix(self, layer_idx: int, batch: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Layer `layer_idx`'s prefix keys and values, each (batch, num_heads, P, head_dim), views."""
        g = self.layer.geometry
        values = self.values(dtype)
        if self.rows is None:
            values = values.unsqueeze(0)
        rows, p = values.shape[:2]
        kv = values.view(rows, p, g.num_layers, 2, g.num_heads, g.head_dim)[:, :, layer_idx]
        kv = kv.permute(2, 0, 3, 1, 4)                                            # (2, rows, heads, P, head_dim)
        if rows != batch:                                                         # one adapter: a stride-0 view
            kv = kv.expand(2, batch, *kv.shape[2:])
        return kv[0], kv[1]


class PrefixTuning(AdapterLayer):
    """The model's prefix adapters (`encoders`, one PrefixEncoder per adapter name) and the hooks that apply
    them: the attention implementation switched to ptlm's, the position pre-hook on the backbone, and each
    self-attention module's entry (this layer and its layer index). `release` undoes all of it exactly."""

    def __init__(self, model: nn.Module, backbone: nn.Module, attention: list[tuple[nn.Module, int]],
                 geometry: PrefixGeometry, original: str):
        super().__init__()
        self.geometry = geometry
        self.encoders = nn.ModuleDict()
        self.original = original                     # the attention implementation replaced (and fallen back to)
        self.batch = None                            # a mixed batch's mapping (pool.AdapterBatch), or None
        self.context: PrefixContext | None = None    # set by the pre-hook for the duration of one forward pass
        self._batch_cache: dict[tuple, tuple] = {}
        # Model objects this layer hooks, kept outside the module tree.
        self.__dict__["_model_config"] = model.config
        self.__dict__["_attention"] = [module for module, _ in attention]
        self.__dict__["_backbone"] = backbone
        self._previous_implementation = model.config._attn_implementation
        params = list(inspect.signature(backbone.forward).parameters)      # of the bound method: no `self`
        self._inputs = {name: params.index(name) if name in params else None
                        for name in ("input_ids", "inputs_embeds", "position_ids", "attention_mask")}
        # The modules that hold HF's gradient-checkpointing switch, which may be turned on after this layer exists.
        self.__dict__["_checkpointing"] = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
        _register(original)
        for module, index in attention:
            module.__dict__[_ENTRY] = (self, index)
        self._hooks = [backbone.register_forward_pre_hook(self._before_forward, with_kwargs=True),
                       backbone.register_forward_hook(self._after_forward, always_call=True)]
        model.config._attn_implementation = _IMPLEMENTATION.format(original)

    @property
    def implementation(self) -> str:
        return _IMPLEMENTATION.format(self.original)

    # ---- adapters
    def add_adapter(self, name: str, config: PrefixConfig, slot: int, device: torch.device,
                    dtype: torch.dtype) -> None:
        self.encoders[name] = PrefixEncoder(config.num_virtual_tokens, self.geometry, config.projection,
                                            config.encoder_hidden_size, device, adapter_dtype(dtype))
        self.slot[name] = slot

    def adapter_names(self) -> list[str]:
        return list(self.encoders)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.encoders[name].parameters())

    def remove_adapter(self, name: str) -> None:
        if self.active_adapter == name:
            self.active_adapter = None
        del self.encoders[name], self.slot[name]

    def set_batch(self, batch) -> None:
        self.batch, self._batch_cache = batch, {}

    def release(self) -> None:
        for hook in self._hooks:
            hook.remove()
        for module in self._attention:
            module.__dict__.pop(_ENTRY, None)
        self._model_config._attn_implementation = self._previous_implementation
        self.context = None
        return None

    # ---- the forward pass
    def _positional(self, name: str, args: tuple, kwargs: dict) -> bool:
        index = self._inputs[name]
        return name not in kwargs and index is not None and index < len(args)

    def _argument(self, name: str, args: tuple, kwargs: dict):
        return args[self._inputs[name]] if self._positional(name, args, kwargs) else kwargs.get(name)

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict):
        """Set this pass's PrefixContext and shift each row's position ids by its number of virtual tokens."""
        self.context = None
        if self._model_config._attn_implementation != self.implementation:
            raise RuntimeError(f"prefix adapters need config._attn_implementation {self.implementation!r}, but it "
                               f"was changed to {self._model_config._attn_implementation!r} while they are on the "
                               "model; remove them before changing the attention implementation")
        ids = self._argument("input_ids", args, kwargs)
        inputs = ids if ids is not None else self._argument("inputs_embeds", args, kwargs)
        if not self.adapters_enabled or inputs is None:
            return None
        found = self._rows(inputs.shape[0], inputs.device)
        if found is None:
            return None
        if module.training and torch.is_grad_enabled() and any(m.gradient_checkpointing for m in self._checkpointing):
            # Its recomputation runs outside this pass, without the prefix: reentrant checkpointing would drop the
            # prefix's gradient, non-reentrant fail in its checks.
            raise ValueError("prefix tuning does not work with gradient checkpointing (as in PEFT); "
                             "model.gradient_checkpointing_disable() first")
        names, rows, lengths, offsets, tokens = found
        mask = self._argument("attention_mask", args, kwargs)
        unused = getattr(mask, UNUSED_COLUMNS, None) if isinstance(mask, Tensor) else None
        total = self._key_columns(kwargs, inputs.shape[1]) \
            if getattr(self._model_config, "sliding_window", None) is not None else None
        self.context = PrefixContext(self, names, rows, lengths, inputs.shape[0], tokens,
                                     unused if unused is not None and len(unused) == inputs.shape[0] else None, total)
        positions = self._argument("position_ids", args, kwargs)
        positions = self._default_positions(ids, inputs, args, kwargs, offsets) if positions is None \
            else positions + offsets
        if self._positional("position_ids", args, kwargs):
            index = self._inputs["position_ids"]
            args = (*args[:index], positions, *args[index + 1:])
        else:
            kwargs = {**kwargs, "position_ids": positions}
        return args, kwargs

    @staticmethod
    def _key_columns(kwargs: dict, length: int) -> int | None:
        """The key columns of this pass's attention before a sliding cache drops any: the cached tokens and the
        `length` new ones, where the cache tells them on the host (not a static cache: its count is a tensor)."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None:
            return length
        if getattr(cache, "is_compileable", False) or not hasattr(cache, "get_seq_length"):
            return None
        past = cache.get_seq_length()
        return past + length if isinstance(past, int) else None

    def _default_positions(self, ids: Tensor | None, inputs: Tensor, args: tuple, kwargs: dict, offsets) -> Tensor:
        """The position ids the model would number the tokens with after a cache of P more entries (each row's P,
        `offsets`), as PEFT's prefix cache makes it: (1 or n, L)."""
        n, length = inputs.shape[:2]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        rule, pad = position_rule(self._model_config)
        if rule == "padding_idx":
            if ids is None:     # from embeddings the model can tell neither pads nor the cache: it ignores both
                return torch.arange(pad + 1, pad + 1 + length, device=inputs.device).unsqueeze(0)
            real = ids.ne(pad).long()
            return (real.cumsum(1) + past + offsets) * real + pad
        if rule == "attention_mask":
            mask = self._argument("attention_mask", args, kwargs)
            mask = torch.ones(n, past + length, device=inputs.device) if mask is None else mask
            mask = mask.long()
            return ((mask.cumsum(1) + offsets) * mask - 1)[:, -length:]
        return torch.arange(past, past + length, device=inputs.device).unsqueeze(0) + offsets    # (1, L)

    def _after_forward(self, module: nn.Module, args: tuple, output):
        self.context = None   # attention outside a pass of the backbone gets no prefix (see _attention)

    def _rows(self, n: int, device: torch.device):
        """(adapter names, rows, lengths, position offsets, tokens) of a batch of n rows, or None when no row has
        a prefix. One adapter for all rows: rows and lengths None, offsets and tokens its P (an int). Else rows
        (n,) long: 0 for none, 1 + k for names[k]; lengths (n,) int32 (None when every row sees all P_max
        entries); offsets (n, 1) long; tokens each row's P (a tuple). Built on the host from the mapping (no device
        sync), kept per batch size."""
        if self.batch is None:
            name = self.active_adapter
            if name not in self.encoders:
                return None
            p = self.encoders[name].num_virtual_tokens
            return [name], None, None, p, p
        key = (device, n)
        self.batch.check_rows(n)                                                   # also on a hit (see check_rows)
        if key not in self._batch_cache:
            here = {slot: name for name, slot in self.batch.adapters.items() if name in self.encoders}
            slots = self.batch.row_slots(n)
            names = list(dict.fromkeys(here[s] for s in slots if s in here))
            if not names:
                found = None
            elif len(names) == 1 and all(s in here for s in slots):
                p = self.encoders[names[0]].num_virtual_tokens
                found = names, None, None, p, p
            else:
                tokens = [self.encoders[here[s]].num_virtual_tokens if s in here else 0 for s in slots]
                with torch.inference_mode(False):                                  # kept across calls
                    rows = torch.tensor([1 + names.index(here[s]) if s in here else 0 for s in slots],
                                        dtype=torch.long, device=device)
                    lengths = None if min(tokens) == max(tokens) else torch.tensor(tokens, dtype=torch.int32,
                                                                                   device=device)
                    offsets = torch.tensor(tokens, dtype=torch.long, device=device).unsqueeze(1)
                found = names, rows, lengths, offsets, tuple(tokens)
            self._batch_cache[key] = found
        return self._batch_cache[key]

    def gathered(self, encoders: list[PrefixEncoder], rows: Tensor, n: int, dtype: torch.dtype) -> Tensor:
        """(n, P_max, width): row b's adapter's values, zero-padded to the longest P (zeros for rows without
        one). With gradients it is built in the graph (each adapter gets its own rows' gradient); serving keeps
        it for the batch until a Parameter changes."""
        trains = any(encoder.trains() for encoder in encoders) or torch.compiler.is_compiling()   # in the graph
        key = ("values", rows.device, n, dtype)
        params = [p for encoder in encoders for p in encoder.parameters()]
        kept = self._batch_cache.get(key)
        if not trains and kept is not None and unchanged(kept[0], params):
            return kept[1]
        p_max = max(encoder.num_virtual_tokens for encoder in encoders)
        with torch.inference_mode(False):                     # kept across calls when serving
            each = [encoder.values().to(dtype) if trains else encoder.served(dtype) for encoder in encoders]
            stack = [each[0].new_zeros(p_max, self.geometry.width)] + [
                nn.functional.pad(values, (0, 0, 0, p_max - values.shape[0])) for values in each]
            values = torch.stack(stack).index_select(0, rows)                     # (n, P_max, width)
        if not trains:
            self._batch_cache[key] = (stamp(params), values)
        return values

    def __getstate__(self) -> dict:
        # The batch cache holds weakrefs (which do not pickle) and is rebuilt on use.
        return {**self.__dict__, "_batch_cache": {}, "context": None}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        _register(self.original)   # an unpickled model's config names the implementation: register it here too

    def extra_repr(self) -> str:
        g = self.geometry
        return (f"layers={g.num_layers}, heads={g.num_heads}, head_dim={g.head_dim}, "
                f"adapters={list(self.encoders)}, active={self.active_adapter!r}, replaces={self.original!r}")


# ------------------------------------------------------------------------------- attention and mask functions
def _original_function(module: nn.Module, original: str) -> Callable:
    """The function the model would call for `original`: sdpa from the registry; eager is the model's own
    module-level eager_attention_forward (the registry has none, each model passes its own)."""
    if original == "eager":
        return getattr(sys.modules[type(module).__module__], "eager_attention_forward")
    return ALL_ATTENTION_FUNCTIONS[original]


def _exact_layout(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                  original: str, kwargs: dict):
    """(causal, key_padding_mask, key, value) saying exactly what `attention_mask` means to the original
    implementation, or None where it is not a recorded layout (then the caller falls back)."""
    lq, lk = query.shape[2], key.shape[2]
    if attention_mask is None:
        if original == "eager":                     # eager with no mask: every query sees every key
            return False, None, key, value
        # sdpa_attention_forward's rule: is_causal only for more than one query, with upper-left alignment,
        # which it gets by cutting the keys to the queries' length (an empty static-cache tail).
        causal = kwargs.get("is_causal")
        causal = lq > 1 and (getattr(module, "is_causal", True) if causal is None else causal)
        if causal and lk > lq:
            key, value = key[:, :, :lq], value[:, :, :lq]
        return causal, None, key, value
    layout = getattr(attention_mask, _LAYOUT, None)
    if layout is None or (layout.q_length, layout.kv_length) != (lq, lk) or attention_mask.shape[0] not in (
            1, query.shape[0]):
        return None
    padding = layout.padding
    if padding is not None and padding.shape[0] != query.shape[0]:
        return None
    return layout.causal, padding, key, value


def _concatenated(function: Callable, module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                  attention_mask: Tensor | None, prefix_k: Tensor, prefix_v: Tensor, lengths: Tensor | None,
                  original: str, kwargs: dict):
    """The original implementation over [prefix ; keys], the mask extended by the prefix columns (each row
    sees its first lengths[b]): PEFT's own computation."""
    batch, _, lq, _ = query.shape
    p = prefix_k.shape[2]
    seen = torch.ones(batch, p, dtype=torch.bool, device=query.device) if lengths is None else \
        torch.arange(p, device=query.device) < lengths[:, None]                                       # (B, P)
    if attention_mask is None:
        causal, _, key, value = _exact_layout(module, query, key, value, None, original, kwargs)
        lk = key.shape[2]
        attention_mask = torch.ones(lq, lk, dtype=torch.bool, device=query.device)
        if causal:
            attention_mask = attention_mask.tril(lk - lq)
        attention_mask = attention_mask.expand(batch, 1, lq, lk)
        if original == "eager":
            attention_mask = _additive(attention_mask, query.dtype)
    heads = attention_mask.shape[1]
    columns = seen[:, None, None, :].expand(batch, heads, lq, p)
    if attention_mask.dtype != torch.bool:
        columns = _additive(columns, attention_mask.dtype)
    mask = torch.cat([columns, attention_mask.expand(batch, *attention_mask.shape[1:])], dim=-1)
    key = torch.cat([prefix_k, key], dim=2)
    value = torch.cat([prefix_v, value], dim=2)
    return function(module, query, key, value, mask, **kwargs)


def _additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool mask as eager's additive one: 0 where allowed, the dtype's minimum elsewhere."""
    return torch.zeros((), dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


_UNFUSED_OPTIONS = ("softcap", "s_aux")


def _attention_function(original: str) -> Callable:
    def prefix_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                                 attention_mask: Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                                 **kwargs):
        """HF attention interface: q (B, Hq, L, D), k / v (B, Hkv, Lk, D) after rotary and the cache update;
        returns ((B, L, Hq, D), None) — or what the original returns where it runs."""
        function = _original_function(module, original)
        entry = module.__dict__.get(_ENTRY)
        layer, layer_idx = entry if entry is not None else (None, None)
        context = None if layer is None or not layer.adapters_enabled else layer.context
        if context is None:        # no prefix in this pass (or not a hooked self-attention): the original, as is
            return function(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        g = layer.geometry
        if key.shape[1] != g.num_heads or key.shape[3] != g.head_dim:
            raise ValueError(f"prefix tuning: layer {layer_idx}'s keys have shape {tuple(key.shape)}, but the prefix "
                             f"has {g.num_heads} heads of {g.head_dim} (from the model config)")
        if autocast_on(query) and torch.float64 not in (query.dtype, value.dtype):
            # Under autocast q / k may come out of rotary in float32 while v is in the autocast dtype; the original
            # implementation's matmuls run in the autocast dtype, and so does the fused op (autocast leaves float64
            # as it is).
            dtype = torch.get_autocast_dtype(query.device.type)
            query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
        window = kwargs.get("sliding_window")
        if window is not None:
            row, p, columns = context.window_need(key.shape[2], window)
            if p + columns > window:
                # PEFT's prefix, a cache of P, leaves the window of the later queries; here every query sees it all.
                of_row = f" of row {row}" if context.n > 1 else ""
                raise ValueError(f"prefix tuning: layer {layer_idx} attends within a sliding window of {window} "
                                 f"tokens, shorter than the {p} virtual + {columns} tokens{of_row}; a prefix works "
                                 "with sliding-window attention only while the window holds the whole sequence")
        prefix_k, prefix_v = context.prefix(layer_idx, query.shape[0], query.dtype)
        lengths = context.lengths
        exact = _exact_layout(module, query, key, value, attention_mask, original, kwargs)
        # Options of the attention function the fused op does not have (Gemma2's logit soft-capping, attention
        # sinks) run the original over [prefix ; keys].
        unfused = any(kwargs.get(option) is not None for option in _UNFUSED_OPTIONS)
        if exact is None or unfused or dropout > 0.0 or kwargs.get("output_attentions"):
            return _concatenated(function, module, query, key, value, attention_mask, prefix_k, prefix_v, lengths,
                                 original, {"scaling": scaling, "dropout": dropout, **kwargs})
        causal, padding, key, value = exact
        out = functional.prefix_attention(query, key, value, prefix_k, prefix_v, lengths, causal=causal,
                                          key_padding_mask=padding, scale=scaling)          # (B, Hq, L, D)
        return out.transpose(1, 2).contiguous(), None

    return prefix_attention_forward


def _mask_function(original: str) -> Callable:
    def prefix_mask(*, batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                    mask_function: Callable = causal_mask_function, attention_mask: Tensor | None = None, **kwargs):
        """The original's mask, with its MaskLayout recorded on it where it is exactly causal / bidirectional
        AND padding (not a sliding window, packed sequences or any other pattern)."""
        mask = ALL_MASK_ATTENTION_FUNCTIONS[original](
            batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
            mask_function=mask_function, attention_mask=attention_mask, **kwargs)
        causal = {causal_mask_function: True, bidirectional_mask_function: False}.get(mask_function)
        if isinstance(mask, Tensor) and causal is not None and isinstance(q_offset, int) \
                and isinstance(kv_offset, int) and (not causal or q_offset - kv_offset == kv_length - q_length):
            padding = None
            if attention_mask is not None:
                padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)[:, kv_offset:kv_offset + kv_length]
                padding = padding.to(device=mask.device, dtype=torch.bool)
            setattr(mask, _LAYOUT, MaskLayout(causal, padding, q_length, kv_length))
        return mask

    return prefix_mask


def _register(original: str) -> None:
    name = _IMPLEMENTATION.format(original)
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _attention_function(original))
        AttentionMaskInterface.register(name, _mask_function(original))


# ------------------------------------------------------------------------------------------ finding, attaching
_USES_REGISTRY: dict[type, bool] = {}   # module class -> whether its forward calls the attention registry


def _uses_registry(cls: type) -> bool:
    if cls not in _USES_REGISTRY:
        try:
            _USES_REGISTRY[cls] = "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(cls.forward)
        except (OSError, TypeError):
            _USES_REGISTRY[cls] = False
    return _USES_REGISTRY[cls]


def _self_attention(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The self-attention modules that call transformers' attention registry (not cross-attention), outside
    adapter layers."""
    found, inside = [], None
    for name, module in model.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        inside = name + "." if isinstance(module, AdapterLayer) else None
        if inside is None and _uses_registry(type(module)) and not getattr(module, "is_cross_attention", False) \
                and "CrossAttention" not in type(module).__name__:
            found.append((name, module))
    return found


def hooked_attention(model: nn.Module, adding: bool = False) -> list[str]:
    """Paths of the self-attention modules the model's prefix layer acts on (with adding: would act on, as one
    is added now); none without one. A copy of such a module (modules_to_save) would run without the prefix."""
    if not adding and not isinstance(getattr(model, LAYER_NAME, None), PrefixTuning):
        return []
    return [name for name, _ in _self_attention(model)]


def _backbone(model: nn.Module, attention: list[str]) -> nn.Module | None:
    """The innermost module holding every self-attention module whose forward takes the tokens (input_ids or
    inputs_embeds) and position_ids: the one that runs in every pass (OPTForCausalLM calls model.decoder, not
    its base_model; a one-layer model's decoder layer takes position_ids but not the tokens), or None."""
    parts = [name.split(".") for name in attention]
    common = 0
    while all(len(p) > common and p[common] == parts[0][common] for p in parts):
        common += 1
    for depth in range(common, -1, -1):
        module = model.get_submodule(".".join(parts[0][:depth]))
        parameters = inspect.signature(module.forward).parameters
        if "position_ids" in parameters and ("input_ids" in parameters or "inputs_embeds" in parameters):
            return module
    return None


def find_prefix_targets(model: nn.Module, config: PrefixConfig) -> list[str]:
    """[LAYER_NAME] once the model is checked: a transformers decoder or encoder whose self-attention runs
    through the attention registry with 'sdpa' or 'eager', one attention module per layer, a backbone taking
    position_ids. Raises ValueError naming what does not fit."""
    layer = getattr(model, LAYER_NAME, None)
    if isinstance(layer, PrefixTuning):
        return [LAYER_NAME]
    if layer is not None:
        raise ValueError(f"the model already has an attribute {LAYER_NAME!r}, which prefix tuning needs")
    _check_model(model)
    return [LAYER_NAME]


def _check_model(model: nn.Module) -> tuple[nn.Module, list[tuple[nn.Module, int]], PrefixGeometry, str]:
    kind = type(model).__name__
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        raise ValueError(f"prefix tuning needs a transformers model with a config; {kind} has none")
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "add_cross_attention", False):
        raise ValueError(f"prefix tuning supports decoder-only and encoder-only models; {kind} has cross-attention")
    original = config._attn_implementation or "eager"
    # A model built from an adapted model's config carries ptlm's name (its functions fall back to the original).
    original = next((o for o in ORIGINAL_IMPLEMENTATIONS if original == _IMPLEMENTATION.format(o)), original)
    if original not in ORIGINAL_IMPLEMENTATIONS:
        raise ValueError(f"prefix tuning runs through the {' or '.join(map(repr, ORIGINAL_IMPLEMENTATIONS))} "
                         f"attention; {kind} uses {original!r} (load it with attn_implementation='sdpa')")
    if getattr(config, "reorder_and_upcast_attn", False):
        raise ValueError(f"prefix tuning does not support reorder_and_upcast_attn=True ({kind})")
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if not layer_types <= {"full_attention", "sliding_attention"}:
        # Sliding layers work while their window holds prefix and sequence (checked per call); other kinds
        # (chunked, linear attention) attend in patterns the prefix has no place in.
        raise ValueError(f"prefix tuning supports full and sliding-window attention layers; {kind} has layer "
                         f"types {sorted(layer_types)}")
    if any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        raise ValueError("prefix tuning does not work with gradient checkpointing (as in PEFT); disable it first")
    geometry = prefix_geometry(config)
    found = _self_attention(model)
    if not found:
        raise ValueError(f"{kind}'s attention does not go through transformers' attention registry "
                         "(AttentionInterface): prefix tuning cannot hook it")
    attention = [(module, module.layer_idx if isinstance(getattr(module, "layer_idx", None), int) else i)
                 for i, (_, module) in enumerate(found)]
    if sorted(index for _, index in attention) != list(range(geometry.num_layers)):
        seen = {name for name, _ in found}
        hidden = [name for name, m in model.named_modules() if _uses_registry(type(m)) and name not in seen
                  and not getattr(m, "is_cross_attention", False) and "CrossAttention" not in type(m).__name__]
        inside = f" outside adapter layers; inside them (a modules_to_save copy?): {hidden}" if hidden else ""
        raise ValueError(f"prefix tuning expects one self-attention module per layer ({geometry.num_layers}); "
                         f"{kind} has {[name for name, _ in found]}{inside}")
    backbone = _backbone(model, [name for name, _ in found])
    if backbone is None:
        raise ValueError(f"no module of {kind} holding its attention layers takes position_ids in forward, which "
                         "prefix tuning shifts")
    return backbone, attention, geometry, original


def attach_prefix(model: nn.Module, path: str, name: str, config: PrefixConfig, slot: int) -> None:
    """Add prefix adapter `name` to the model's PrefixTuning at `path`, creating it (and its hooks) first."""
    layer = getattr(model, path, None)
    if layer is None:
        backbone, attention, geometry, original = _check_model(model)
        layer = PrefixTuning(model, backbone, attention, geometry, original)
        layer.train(model.training)
        model.add_module(path, layer)
    # The base's first floating-point Parameter (the prefix layer, added last, comes after the base's own).
    weight = next(p for p in model.parameters() if p.is_floating_point())
    layer.add_adapter(name, config, slot, weight.device, weight.dtype)
