"""Finding the modules an adapter config names, and swapping adapter layers in and out of their parents in place.

Nothing here keeps per-model state or copies model code: the model's own modules are wrapped where they sit,
and the wrappers keep the original module objects so that `restore` puts back exactly what was there.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D

from ptlm_engine.bottleneck_sites import attach_bottleneck, find_bottleneck_targets
from ptlm_engine.config import ALL_LINEAR, BottleneckConfig, LoraConfig, PrefixConfig, PromptConfig, selects
from ptlm_engine.layers import AdapterLayer, LoraEmbedding, LoraLinear, ModulesToSave
from ptlm_engine.layers.base import hooked
from ptlm_engine.layers.lora_embedding import check_embedding
from ptlm_engine.layers.lora_group import ProjectionGroup
from ptlm_engine.layers.prefix import LAYER_NAME as PREFIX_LAYER, attach_prefix, find_prefix_targets, hooked_attention
from ptlm_engine.layers.prompt import attach_prompt, find_prompt_targets

# Dispatcher, first match wins: base-layer type -> builder of the LoRA layer that wraps it.
LORA_LAYER_BUILDERS: list[tuple[type[nn.Module], Callable[[nn.Module], LoraLinear]]] = [
    (nn.Linear, lambda module: LoraLinear(module, fan_in_fan_out=False)),
    (Conv1D, lambda module: LoraLinear(module, fan_in_fan_out=True)),   # GPT-2: weight stored (d_in, d_out)
    (nn.Embedding, LoraEmbedding),                                         # named targets only (not all-linear)
]

# Targets used when LoraConfig.target_modules is None, by `model.config.model_type`: the attention query and
# value projections, by the names each architecture gives them (the choice of the LoRA paper and of PEFT).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    **dict.fromkeys(["llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                     "stablelm", "opt", "gptj", "gpt_neo", "bart"], ["q_proj", "v_proj"]),
    **dict.fromkeys(["gpt2", "gpt_bigcode"], ["c_attn"]),
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra", "layoutlm"], ["query", "value"]),
    **dict.fromkeys(["gpt_neox", "bloom", "falcon"], ["query_key_value"]),
    **dict.fromkeys(["t5", "mt5"], ["q", "v"]),
    "deberta-v2": ["query_proj", "value_proj"],
    "distilbert": ["q_lin", "v_lin"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
}


# ------------------------------------------------------------------------------------------------- walking
def _walk(model: nn.Module, aliases: bool = False) -> Iterator[tuple[str, nn.Module]]:
    """Every module of the model except those inside adapter layers (lora_A/lora_B, modules_to_save copies,
    the shared children of a ModulesToSave, an adapter's own modules); the adapter layers themselves are
    included. With `aliases`, a module the model holds under several names (`self.fc2 = self.fc`, a block shared
    by two parents) comes under each of them, first under the name it has without."""
    inside = None   # named_modules() is depth-first, so an adapter layer's subtree directly follows it
    for name, module in model.named_modules(remove_duplicate=not aliases):
        if inside is not None and name.startswith(inside):
            continue
        inside = None
        yield name, module
        if isinstance(module, AdapterLayer):
            inside = name + "."


def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    """Every module carrying adapters, of any method, by dotted name."""
    return [(name, m) for name, m in _walk(model) if isinstance(m, AdapterLayer)]


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLinear]]:
    return [(name, m) for name, m in _walk(model) if isinstance(m, LoraLinear)]


def saved_modules(model: nn.Module) -> list[tuple[str, ModulesToSave]]:
    return [(name, m) for name, m in _walk(model) if isinstance(m, ModulesToSave)]


def base_modules(model: nn.Module, skip: Sequence[str] = (), owner: str | None = None
                 ) -> Iterator[tuple[str, nn.Module]]:
    """Modules holding base parameters of their own, as adapter `owner` runs them: everything but adapter layers'
    insides, adapter modules added to the model, the modules_to_save of which `owner` has its own copy (their
    original parameters never run while it is active: the copy carries its own), and the modules named in
    `skip` and their children. The original module under another adapter's modules_to_save counts as any
    other (it runs for `owner`)."""
    for name, module in _walk(model):
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if isinstance(module, ModulesToSave):
            if owner not in module.modules_to_save:
                yield name, module                     # its parameter table is the original's
                yield from ((f"{name}.{sub}", child) for sub, child in module.original_module.named_modules()
                            if sub)
            continue
        if isinstance(module, AdapterLayer) and not isinstance(module, LoraLinear):
            continue
        yield name, module


# ------------------------------------------------------------------------------------------------ matching
def _matches_names(name: str, names: list[str]) -> bool:
    """PEFT's rule for a list: the dotted module name equals an entry or ends with "." + entry."""
    return any(name == n or name.endswith("." + n) for n in names)


def _named(name: str, spec: list[str] | str) -> bool:
    """Whether target_modules / exclude_modules `spec` (names, or a regex over the whole dotted name) names it."""
    return re.fullmatch(spec, name) is not None if isinstance(spec, str) else _matches_names(name, spec)


def _within_any(name: str, names: list[str]) -> bool:
    """The module is one of `names` (matched as above) or lies inside one."""
    return any(re.match(rf"(?:^|.*\.){re.escape(n)}(?:$|\..*)", name) for n in names)


def layer_index(name: str, layers_pattern: list[str] | str | None = None, leading: bool = True) -> int | None:
    """The layer index of the module `name` as PEFT finds it for layers_to_transform: the number of the first
    "<pattern>.N." part, or without a pattern of the first ".<any>.N." part, else (where PEFT finds none; not
    with leading=False) of a leading "<any>.N." (a plain model's own block list, "layers.N.")."""
    if layers_pattern is None:
        match = re.match(r".*?\.[^.]*\.(\d+)\.", name) or (re.match(r"[^.]*\.(\d+)\.", name) if leading else None)
        return None if match is None else int(match.group(1))
    for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
        match = re.match(rf"(?:|.*?\.)(?:{pattern})\.(\d+)\.", name)
        if match is not None:
            return int(match.group(1))
    return None


def _builder(module: nn.Module) -> Callable[[nn.Module], LoraLinear] | None:
    return next((build for base_type, build in LORA_LAYER_BUILDERS if isinstance(module, base_type)), None)


def _linear(module: nn.Module) -> bool:
    """A linear layer, wrapped or not: what "all-linear" selects (never embeddings, as in PEFT)."""
    if isinstance(module, LoraLinear):
        return not isinstance(module, LoraEmbedding)
    return isinstance(module, (nn.Linear, Conv1D))


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def default_target_modules(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ValueError(f"LoraConfig.target_modules is None and there is no default for model_type "
                         f"{model_type!r}; pass target_modules (names, a regex, or 'all-linear')")
    return DEFAULT_TARGET_MODULES[model_type]


def find_lora_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Names of the modules that get this adapter's LoRA layers (exclude_modules, the modules_to_save and what
    they contain left out, as in PEFT). Raises ValueError when nothing matches or a match cannot carry LoRA;
    warns, as PEFT does, of rank_pattern / alpha_pattern keys that select none of them."""
    spec = default_target_modules(model) if config.target_modules is None else config.target_modules
    excluded = config.exclude_modules
    head = _output_head(model)
    layers = config.layers_to_transform
    layers = None if layers is None else {layers} if isinstance(layers, int) else set(layers)

    def wanted(name: str, module: nn.Module) -> bool:
        if spec == ALL_LINEAR:
            is_head = module is head or name == "lm_head" or name.endswith(".lm_head")
            hit = _linear(module) and not is_head
        elif isinstance(spec, list) and name in spec:
            return excluded is None or not _named(name, excluded)     # named whole: in any layer, as in PEFT
        else:
            hit = _named(name, spec)
        return hit and (layers is None or layer_index(name, config.layers_pattern) in layers) \
            and (excluded is None or not _named(name, excluded))

    # nn.MultiheadAttention passes out_proj's weight to F.multi_head_attention_forward and never calls the
    # module: a LoRA layer there would change nothing.
    unused_linears = _unused_linears(model)
    saved_names = config.modules_to_save or []
    # A module held under several names (self.fc2 = self.fc) is one target, under its first name: any of its
    # names selects it, and its LoRA layer takes its place under every name (wrap_for_lora).
    aliases: dict[int, list[str]] = {}
    targets, targeted = [], set()
    for name, module in _walk(model, aliases=True):
        aliases.setdefault(id(module), []).append(name)
        if not name or id(module) in targeted or _within_any(name, saved_names):
            continue
        if id(module) in unused_linears and wanted(name, module):
            if spec == ALL_LINEAR:
                continue
            raise ValueError(f"target module {name!r} is an nn.MultiheadAttention's out_proj, whose weight the "
                             "attention reads directly (the module is never called): LoRA cannot adapt it")
        if isinstance(module, ModulesToSave):
            # Inside another adapter's modules_to_save a LoRA layer would reach only the original module, not
            # that adapter's copy; named targets there are an error, "all-linear" leaves them out (the file
            # records what it resolved to).
            inside = [] if spec == ALL_LINEAR else [
                f"{name}.{sub}".rstrip(".") for sub, child in module.original_module.named_modules()
                if wanted(f"{name}.{sub}".rstrip("."), child)]
            if inside:
                raise ValueError(f"target module {inside[0]!r} is or lies inside {name!r}, of which adapters "
                                 f"{sorted(module.modules_to_save)} keep their own copies (modules_to_save): "
                                 "LoRA cannot wrap it there; leave it out with exclude_modules")
            continue
        if not wanted(name, module):
            continue
        if not isinstance(module, LoraLinear) and _builder(module) is None:
            supported = ", ".join(f"{t.__module__}.{t.__name__}" for t, _ in LORA_LAYER_BUILDERS)
            raise ValueError(f"target module {name!r} is a {type(module).__module__}.{type(module).__name__}; "
                             f"LoRA supports {supported}")
        if isinstance(module, nn.Embedding):
            check_embedding(name, module)
        if not isinstance(module, LoraLinear) and hooked(module):
            raise ValueError(f"target module {name!r} has forward hooks (its own, or accelerate's), which its LoRA "
                             "layer would bypass: it computes the base projection itself; remove them first, or "
                             "leave the module out (exclude_modules)")
        targets.append(aliases[id(module)][0])
        targeted.add(id(module))
    for target in targets:
        module = model.get_submodule(target)
        saved = next((a for a in aliases[id(module)] if _within_any(a, saved_names)), None)
        if saved is not None:
            raise ValueError(f"target module {target!r} is also {saved!r}, which lies in modules_to_save "
                             f"{saved_names!r}: its copies would hold the LoRA layer; leave it out (exclude_modules)")
    _check_fused_experts(model, spec, targets)
    if not targets:
        where = "" if layers is None else f" in layers {sorted(layers)}"
        unless = "" if excluded is None else f" outside exclude_modules {excluded!r}"
        raise ValueError(f"target_modules {spec!r} matched no module of {type(model).__name__}{where}{unless}")
    for what, patterns in (("rank_pattern", config.rank_pattern), ("alpha_pattern", config.alpha_pattern)):
        unused = [key for key in patterns if not any(selects(key, t) for t in targets)]
        if unused:
            warnings.warn(f"LoraConfig.{what} keys {unused} select none of the targeted modules", stacklevel=3)
    return targets


def _unused_linears(model: nn.Module) -> set[int]:
    """The ids of the Linear modules whose weights the model reads directly without calling them: each
    nn.MultiheadAttention's out_proj."""
    return {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}


def _check_fused_experts(model: nn.Module, spec, targets: list[str]) -> None:
    """Mixture-of-experts models of transformers 5 hold their experts as fused 3-D Parameters, not Linear
    modules. PEFT maps "all-linear" and the transformers-4 expert names (w1 / w2 / w3, gate_proj / up_proj ...)
    onto them (target_parameters), which LoRA layers here cannot wrap: refused rather than silently adapting
    fewer modules than PEFT would."""
    fused = next((name for name, m in model.named_modules() if _fused_experts(m)), None)
    if fused is None:
        return
    missing = [n for n in spec if not any(t == n or t.endswith("." + n) for t in targets)] \
        if isinstance(spec, list) else []
    if spec == ALL_LINEAR or missing:
        what = "'all-linear'" if spec == ALL_LINEAR else f"target_modules {missing}"
        raise ValueError(f"{type(model).__name__} holds its experts as fused parameters ({fused!r}); PEFT maps "
                         f"{what} onto them, which LoRA layers here cannot wrap: name the Linear modules to adapt "
                         "(e.g. the attention projections)")


def _fused_experts(module: nn.Module) -> bool:
    """transformers 5's experts modules: two or more stacked (experts, ·, ·) weights, e.g. gate_up_proj and
    down_proj; a convolution's or a (1, L, d) position table's lone 3-D weight is none."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return False
    return sum(p.dim() == 3 for p in module.parameters(recurse=False)) >= 2


def find_modules_to_save(model: nn.Module, names: list[str] | None, new_layers: Sequence[str] = ()) -> list[str]:
    """Names of the modules that get a trainable copy per adapter; a module inside another match is covered
    by that match. Raises ValueError when no name matches, or a match is or contains an adapter layer, existing
    or among `new_layers` (the paths this call adds): its copies would run without that layer's adapters."""
    if not names:
        return []
    found: list[str] = []
    unused = _unused_linears(model)
    for name, module in _walk(model):
        # PEFT's rule here is a plain suffix (its _set_trainable: "norm" also copies every input_layernorm).
        if not name or not any(name.endswith(n) for n in names) or any(name.startswith(f + ".") for f in found):
            continue
        if isinstance(module, LoraLinear):
            raise ValueError(f"modules_to_save: {name!r} already carries LoRA adapters")
        if isinstance(module, AdapterLayer) and not isinstance(module, ModulesToSave):
            raise ValueError(f"modules_to_save: {name!r} is an adapter layer ({type(module).__name__}), which the "
                             "API drives itself; choose a module of the model")
        if id(module) in unused:
            raise ValueError(f"modules_to_save: {name!r} is an nn.MultiheadAttention's out_proj, whose weight the "
                             "attention reads directly (the module is never called): its copies would never run; "
                             "save the whole attention module instead")
        found.append(name)
    if not found:
        raise ValueError(f"modules_to_save {names!r} matched no module of {type(model).__name__}")
    layers = [path for path, layer in adapter_layers(model) if not isinstance(layer, ModulesToSave)]
    for path in [*layers, *new_layers]:
        inside = next((f for f in found if path.startswith(f + ".") or (path == f and path in new_layers)), None)
        if inside is not None:
            raise ValueError(f"modules_to_save: {inside!r} contains the adapter layer {path!r}, which its "
                             "copies would bypass; choose a module that holds no adapter layer")
    # A prefix layer sits at the root and acts on each self-attention module, which a copy would run without.
    for path in hooked_attention(model, adding=PREFIX_LAYER in new_layers):
        inside = next((f for f in found if path == f or path.startswith(f + ".")), None)
        if inside is not None:
            raise ValueError(f"modules_to_save: {inside!r} is or contains the self-attention module {path!r}, "
                             "which a prefix adapter hooks: its copies would run without the prefix; choose a "
                             "module that holds no adapter layer")
    return found


# ----------------------------------------------------------------------------------------------- replacing
def as_lora_layer(module: nn.Module) -> LoraLinear:
    """The module itself if it already is a LoraLinear, else a new one wrapping it (not yet installed)."""
    return module if isinstance(module, LoraLinear) else _builder(module)(module)


# While `replacing` runs: the ids of the modules the model holds under several names, found once.
_SHARED = "_ptlm_shared_modules"


@contextlib.contextmanager
def replacing(model: nn.Module) -> Iterator[None]:
    """Around a batch of adapter layers put in or taken out: which modules the model holds under several names is
    found in one walk for all of them, where each replacement would otherwise walk the model to find a shared
    module's other places (560 walks of 3,300 modules, ~1 s, for an 80-layer model's all-linear LoRA)."""
    seen, shared = set(), set()
    for _, module in _walk(model, aliases=True):
        (shared if id(module) in seen else seen).add(id(module))
    model.__dict__[_SHARED] = shared
    try:
        yield
    finally:
        model.__dict__.pop(_SHARED, None)


def _holders(model: nn.Module, name: str) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every place the model holds the module `name` (several where it is shared:
    `self.fc2 = self.fc`), outside adapter layers, `name`'s own first."""
    module = model.get_submodule(name)
    parent_name, _, child_name = name.rpartition(".")
    first = model.get_submodule(parent_name)
    holders = [(first, child_name)]
    shared = model.__dict__.get(_SHARED)
    if shared is not None and id(module) not in shared:
        return holders
    for _, parent in _walk(model):
        if not isinstance(parent, AdapterLayer):
            holders += [(parent, key) for key, child in parent._modules.items()
                        if child is module and not (parent is first and key == child_name)]
    return holders


def _replace(model: nn.Module, name: str, new: nn.Module | None) -> None:
    """Put `new` in place of the module `name` wherever the model holds that module (None: delete it there)."""
    holders = _holders(model, name)
    shared = model.__dict__.get(_SHARED)
    if shared is not None and new is not None and len(holders) > 1:
        shared.add(id(new))                        # held under the same names now
    for parent, key in holders:
        if new is None:
            delattr(parent, key)
        else:
            setattr(parent, key, new)


def wrap_for_lora(model: nn.Module, name: str) -> LoraLinear:
    module = model.get_submodule(name)
    layer = as_lora_layer(module)
    if layer is not module:
        _replace(model, name, layer)
    return layer


def wrap_for_saving(model: nn.Module, name: str) -> ModulesToSave:
    module = model.get_submodule(name)
    if isinstance(module, ModulesToSave):
        return module
    wrapper = ModulesToSave(module)
    _replace(model, name, wrapper)
    return wrapper


def restore(model: nn.Module, name: str) -> None:
    """Put the original module back in place of the adapter layer `name` (or delete the layer where it was
    added to the model rather than wrapping a module)."""
    layer = model.get_submodule(name)
    original = layer.release()
    if original is not None:
        original.train(layer.training)
    _replace(model, name, original)


# --------------------------------------------------------------------------------------- torch's fast paths
# Attributes an adapted nn.TransformerEncoderLayer / nn.TransformerEncoder keeps while its fast path is off: the
# value of the switch from before.
_FAST_PATH_WAS = "ptlm_fast_path_was"
_NESTED_WAS = "ptlm_nested_tensor_was"


def sync_fast_paths(model: nn.Module) -> None:
    """Keep torch's encoder fast path off wherever adapter layers would miss it (call after adapters are added or
    removed): in eval mode without gradients (frozen base weights), nn.TransformerEncoderLayer runs one fused op
    (torch._transformer_encoder_layer_fwd) that reads the weights of self_attn, norm1/2 and linear1/2 and calls
    none of those modules, so a LoRA or modules_to_save layer on any of them would be skipped silently. An encoder
    layer holding an adapter layer gets activation_relu_or_gelu = 0 (a per-instance switch that only the fast
    path reads: the activation itself is `activation`), and an nn.TransformerEncoder over such layers
    use_nested_tensor = False (its nested-tensor input is for the fast path; the modules refuse it). Both get
    their own values back once the encoder layer holds no adapter layer."""
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer):
            _switch(module, "activation_relu_or_gelu", _FAST_PATH_WAS, 0, _holds_adapters(module))
        elif isinstance(module, nn.TransformerEncoder) and hasattr(module, "use_nested_tensor"):
            _switch(module, "use_nested_tensor", _NESTED_WAS, False, _holds_adapters(module.layers))


def _holds_adapters(module: nn.Module) -> bool:
    return any(isinstance(m, AdapterLayer) for m in module.modules())


def _switch(module: nn.Module, attribute: str, keep: str, off: Any, adapted: bool) -> None:
    if adapted and keep not in module.__dict__:
        setattr(module, keep, getattr(module, attribute))
        setattr(module, attribute, off)
    elif not adapted and keep in module.__dict__:
        setattr(module, attribute, module.__dict__.pop(keep))


# ------------------------------------------------------------------------------------------------- methods
@dataclasses.dataclass(frozen=True)
class Method:
    """How one adapter method gets into a model: `find_targets(model, config)` names the places (module paths)
    that get the adapter, validating everything before the model changes; `attach(model, path, name, config,
    slot)` installs (or reuses) the AdapterLayer at `path` and adds adapter `name` to it with slot id `slot`."""
    find_targets: Callable[[nn.Module, Any], list[str]]
    attach: Callable[[nn.Module, str, str, Any, int], None]


def _attach_lora(model: nn.Module, path: str, name: str, config: LoraConfig, slot: int) -> None:
    wrap_for_lora(model, path).add_adapter(name, config.rank_for(path), config.scale_for(path), config.dropout, slot)


# Dispatcher by config type: one entry per adapter method.
METHODS: dict[type, Method] = {
    LoraConfig: Method(find_lora_targets, _attach_lora),
    PrefixConfig: Method(find_prefix_targets, attach_prefix),
    BottleneckConfig: Method(find_bottleneck_targets, attach_bottleneck),
    PromptConfig: Method(find_prompt_targets, attach_prompt),
}


def method_for(config: Any) -> Method:
    method = METHODS.get(type(config))
    if method is None:
        known = ", ".join(t.__name__ for t in METHODS)
        raise ValueError(f"config must be one of {known}, got {type(config).__name__}")
    return method


# ------------------------------------------------------------------------------------- grouped projections
# Sibling projections that read one input, by `model.config.model_type`: their LoRA layers run as one grouped op
# (layers.lora_group). GPT-2's c_attn and gpt_neox / bloom / falcon's query_key_value already are one layer;
# encoder-decoder models (BART, T5), whose cross-attention k and v read another input than q, are left out.
FUSED_PROJECTIONS: dict[str, list[tuple[str, ...]]] = {
    **dict.fromkeys(["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "stablelm"],
                    [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")]),
    **dict.fromkeys(["mixtral", "opt", "gptj", "gpt_neo", "phi"], [("q_proj", "k_proj", "v_proj")]),
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra", "layoutlm"], [("query", "key", "value")]),
    "deberta-v2": [("query_proj", "key_proj", "value_proj")],
    "distilbert": [("q_lin", "k_lin", "v_lin")],
}


def link_projection_groups(model: nn.Module, groups: Sequence[Sequence[str]] | None = None) -> int:
    """Link the LoRA layers of each block that read one input into ProjectionGroups, which compute them in one
    grouped op call; returns the number of groups. Replaces the model's earlier links, so calling it again
    after every adapter added or removed keeps them current (a stale link only falls back to the separate path).

    groups: names of sibling modules, by default FUSED_PROJECTIONS for the model's model_type (none for other
    models). The LoraLinear children of one module among such names, with the same d_in, layout, dtype and
    device, form a group when there are at least two of them.
    """
    unlink_projection_groups(model)
    if groups is None:
        groups = FUSED_PROJECTIONS.get(getattr(getattr(model, "config", None), "model_type", None), [])
    count = 0
    for _, parent in _walk(model):
        for names in groups:
            kinds: dict[tuple, list[str]] = {}
            for name in names:
                layer = parent._modules.get(name)
                if isinstance(layer, LoraLinear):
                    kind = (layer.in_features, layer.fan_in_fan_out, layer.weight.dtype, layer.weight.device)
                    kinds.setdefault(kind, []).append(name)
            for linked in kinds.values():
                if len(linked) >= 2:
                    group = ProjectionGroup(parent, linked)
                    for layer in group.members:
                        layer.group = group
                    count += 1
    return count


def unlink_projection_groups(model: nn.Module) -> None:
    """Every LoRA layer of the model back to its own separate path (idempotent)."""
    for _, layer in lora_layers(model):
        layer.group = None
