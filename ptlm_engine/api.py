"""The adapter lifecycle on any nn.Module: add, activate, merge, disable, remove, unload, and mixed batches
(one adapter per row).

Per-model state (the adapters' configs, slot ids and targeted modules, which one is active or merged, the
mixed batch in progress, the base's requires_grad flags from before the first adapter) lives in one
AdapterRegistry on the model; per-layer state lives in the layers.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ptlm_engine import inject
from ptlm_engine.config import LoraConfig
from ptlm_engine.layers import AdapterLayer, LoraLinear
from ptlm_engine.pool import AdapterBatch, free_slot

_REGISTRY = "ptlm_adapters"


@dataclasses.dataclass
class AdapterRegistry:
    # LoraConfig, BottleneckConfig, PrefixConfig, PromptConfig, or a tuple of them (one task, several methods)
    configs: dict[str, object] = dataclasses.field(default_factory=dict)
    # Each adapter's slot id, the same in every layer's pool, so one per-token index serves every layer.
    slots: dict[str, int] = dataclasses.field(default_factory=dict)
    targets: dict[str, list[str]] = dataclasses.field(default_factory=dict)   # the adapter layers each one got
    active: str | None = None
    merged: str | None = None
    batch: AdapterBatch | None = None                                         # inside adapter_batch
    disabled: int = 0                    # disable_adapters blocks in progress (nested blocks count each)
    remerge: str | None = None           # the merged adapter the outermost of them took out, to merge back on exit
    # Each base Parameter's requires_grad before the first adapter, by name (load_state_dict(assign=True) replaces
    # the Parameter objects).
    base_requires_grad: dict[str, bool] = dataclasses.field(default_factory=dict)

    def __getstate__(self) -> dict:
        # A copy of the model inside adapter_batch would keep the block's mapping (and its layers theirs) for good.
        if self.batch is not None:
            raise RuntimeError("cannot copy or pickle a model inside adapter_batch: leave the block first")
        return self.__dict__


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself, also when torch.compile has wrapped it (its OptimizedModule keeps it in _orig_mod), or
    DataParallel / DistributedDataParallel (in .module)."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def registry(model: nn.Module) -> AdapterRegistry:
    reg = getattr(unwrap(model), _REGISTRY, None)
    if reg is None:
        raise ValueError(f"{type(unwrap(model)).__name__} has no adapters (add one with add_adapter)")
    return reg


def _known(reg: AdapterRegistry, name: str) -> None:
    if name not in reg.configs:
        raise ValueError(f"no adapter named {name!r}; the model has {sorted(reg.configs)}")


_BATCH_CLAIM = threading.Lock()   # adapter_batch's check and claim of a model's registry, as one step


def _not_in_batch(reg: AdapterRegistry | None, what: str) -> None:
    # The layers of a mixed batch hold its mapping and slot layout, which a lifecycle change would invalidate.
    if reg is not None and reg.batch is not None:
        raise ValueError(f"cannot {what} inside adapter_batch; leave the block first")


def check_new_name(model: nn.Module, name: str) -> None:
    # Adapter names become ModuleDict / ParameterDict keys, so they must be valid attribute names there.
    if not isinstance(name, str) or not name or "." in name or hasattr(nn.ModuleDict(), name) \
            or hasattr(nn.ParameterDict(), name):
        raise ValueError(f"adapter name must be a non-empty string without '.' that is not a Module attribute, "
                         f"got {name!r}")
    reg = getattr(model, _REGISTRY, None)
    _not_in_batch(reg, "add an adapter")
    if reg is not None and name in reg.configs:
        raise ValueError(f"the model already has an adapter named {name!r} (remove_adapter it first)")


def adapter_configs(model: nn.Module) -> dict[str, object]:
    """The adapters on the model, by name (empty when there are none)."""
    reg = getattr(unwrap(model), _REGISTRY, None)
    return {} if reg is None else {name: _copy_config(config) for name, config in reg.configs.items()}


def _copy_config(config):
    """A copy of an adapter's config (or tuple of them) that changing does not change the adapter; a prompt
    config's tokenizer object is shared, not copied."""
    if isinstance(config, tuple):
        return tuple(_copy_config(part) for part in config)
    tokenizer = getattr(config, "tokenizer", None)
    return copy.deepcopy(config, {} if tokenizer is None else {id(tokenizer): tokenizer})


def active_adapter(model: nn.Module) -> str | None:
    """The name of the adapter the model runs outside mixed batches (set_active_adapter's), or None: none active,
    or no adapters at all."""
    reg = getattr(unwrap(model), _REGISTRY, None)
    return None if reg is None else reg.active


def add_adapter(model: nn.Module, name: str, config) -> None:
    """Give the places `config` targets a new adapter `name`, the identity at first: LoRA layers wrap the
    targeted modules in place, other methods add their modules (the method follows the config's type, see
    inject.METHODS). `config` may be a list of configs of different methods (e.g. LoRA + prefix): one task
    whose parts all run, train, activate and map to rows together under the one name.

    The first adapter on a model becomes active (the base freezes, it trains); later ones stay inactive and
    frozen until set_active_adapter. Everything is validated before the model changes.
    """
    model = unwrap(model)
    check_new_name(model, name)
    parts = _parts(config)
    methods = [inject.method_for(part) for part in parts]
    parts = [dataclasses.replace(part) for part in parts]   # our own copies, validated again
    targets = [method.find_targets(model, part) for method, part in zip(methods, parts)]
    # Every part's new layers: a module one part keeps a copy of must hold none of another part's layers.
    saved = inject.find_modules_to_save(model, _modules_to_save(parts), [p for paths in targets for p in paths])
    _check_parts_saved(model, parts)

    reg = getattr(model, _REGISTRY, None)
    if reg is None:
        flags = {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)}
        reg = AdapterRegistry(base_requires_grad=flags)
        setattr(model, _REGISTRY, reg)
    slot = free_slot(reg.slots.values())
    # Parameters, not inference tensors (they train, and the pool stamps them)
    with torch.inference_mode(False), inject.replacing(model):
        for method, part, paths in zip(methods, parts, targets):
            for path in paths:
                method.attach(model, path, name, part, slot)
        for target in saved:
            inject.wrap_for_saving(model, target).add_adapter(name)
    reg.configs[name] = parts[0] if len(parts) == 1 else tuple(parts)
    reg.slots[name], reg.targets[name] = slot, [path for paths in targets for path in paths]
    inject.link_projection_groups(model)   # q/k/v and gate/up LoRA layers of a block run in one grouped op
    inject.sync_fast_paths(model)          # torch's fused encoder layers would skip the adapter layers
    if reg.disabled:
        _enable_layers(model, False)       # inside disable_adapters the new layers are skipped too
    if len(reg.configs) == 1:
        set_active_adapter(model, name)
    else:
        _set_trainable(model, reg)


def _parts(config) -> list:
    """The configs of one adapter: [config], or the list of a task that combines methods, with at most one config
    per method, in inject.METHODS' order (LoRA first: it wraps modules that other methods may hook; a combined
    adapter's files load back in the same order)."""
    if not isinstance(config, (list, tuple)):
        return [config]
    if not config:
        raise ValueError("config must be an adapter config or a non-empty list of them")
    kinds = [type(part) for part in config]
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"a combined adapter takes at most one config per method, got "
                         f"{[k.__name__ for k in kinds]}")
    order = list(inject.METHODS)
    return sorted(config, key=lambda part: next((i for i, kind in enumerate(order) if isinstance(part, kind)),
                                                len(order)))


def _modules_to_save(parts: list) -> list[str] | None:
    names = [n for part in parts for n in (getattr(part, "modules_to_save", None) or [])]
    return list(dict.fromkeys(names)) or None


def set_active_adapter(model: nn.Module, name: str | None) -> None:
    """Make `name` the adapter every layer runs (None: none does). Freezes every base parameter and every
    other adapter; this adapter's own parameters (LoRA weights, bottleneck / prefix / prompt parameters,
    modules_to_save copies) and the biases its `bias` mode names become trainable."""
    model = unwrap(model)
    reg = registry(model)
    _not_in_batch(reg, "change the active adapter")
    if name is not None:
        _known(reg, name)
    merged = reg.merged if reg.merged is not None else reg.remerge
    if merged is not None and merged != name:
        raise ValueError(f"adapter {merged!r} is merged into the base weights; unmerge_adapter it first")
    reg.active = name
    for _, layer in inject.adapter_layers(model):
        layer.active_adapter = name
    _set_trainable(model, reg)


def _set_trainable(model: nn.Module, reg: AdapterRegistry) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    name = reg.active
    if name is None:
        return
    bias_mode = next((part.bias for part in _parts(reg.configs[name]) if isinstance(part, LoraConfig)), "none")
    for _, layer in inject.adapter_layers(model):
        if name in layer.adapter_names():
            for p in layer.adapter_parameters(name):
                p.requires_grad_(True)
            if bias_mode == "lora_only" and isinstance(layer, LoraLinear) and layer.bias is not None:
                layer.bias.requires_grad_(True)
    if bias_mode == "all":
        for _, module in inject.base_modules(model, owner=name):
            bias = module._parameters.get("bias")
            if bias is not None:
                bias.requires_grad_(True)


def merge_adapter(model: nn.Module, name: str) -> None:
    """Fold the active adapter into the base weights (W0 += scale · B A): the same outputs without the LoRA
    branch's cost. Its LoRA weights stop receiving gradients until unmerge_adapter."""
    model = unwrap(model)
    reg = registry(model)
    _not_in_batch(reg, "merge an adapter")
    _known(reg, name)
    if not isinstance(reg.configs[name], LoraConfig):
        raise ValueError(f"adapter {name!r} is a {_kinds(reg, name)}: only LoRA adapters merge into the base weights")
    if reg.merged is not None:
        raise ValueError(f"adapter {reg.merged!r} is already merged")
    if reg.disabled:
        raise ValueError("cannot merge an adapter inside disable_adapters (the block computes the base model)")
    if reg.active != name:
        raise ValueError(f"only the active adapter can be merged: {name!r} is not active ({reg.active!r}); "
                         "call set_active_adapter first")
    _check_untied(model, name)
    _merge(model, reg, name)


def _check_untied(model: nn.Module, name: str) -> None:
    """ValueError where a layer of adapter `name` has a weight another module shares (GPT-2's lm_head and wte):
    merging into it would change that module too."""
    owners: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for p in module._parameters.values():
            if p is not None:
                owners.setdefault(id(p), []).append(path)
    for path, layer in inject.lora_layers(model):
        shared = [o for o in owners.get(id(layer.weight), []) if o != path]
        if name in layer.lora_A and shared:
            raise ValueError(f"adapter {name!r} has a LoRA layer at {path!r}, whose weight {shared} share (tied "
                             "weights): merging would change them too; keep the adapter unmerged")


def _check_parts_saved(model: nn.Module, parts: list) -> None:
    """ValueError where one part's modules_to_save lies inside another part's (each part's file holds its own
    copies: a copy inside another's would be neither's)."""
    found = [inject.find_modules_to_save(model, getattr(part, "modules_to_save", None)) for part in parts]
    for i, paths in enumerate(found):
        for j, others in enumerate(found):
            inner = next((p for p in paths for o in others if i != j and p.startswith(o + ".")), None)
            if inner is not None:
                raise ValueError(f"modules_to_save: {inner!r} (of the {type(parts[i]).__name__} part) lies inside a "
                                 f"module the {type(parts[j]).__name__} part keeps a copy of; name it in one part")


def _kinds(reg: AdapterRegistry, name: str) -> str:
    return "+".join(type(part).__name__ for part in _parts(reg.configs[name]))


def unmerge_adapter(model: nn.Module, name: str) -> None:
    """Take a merged adapter back out of the base weights (W0 -= scale · B A)."""
    model = unwrap(model)
    reg = registry(model)
    _not_in_batch(reg, "unmerge an adapter")
    _known(reg, name)
    if reg.remerge == name:                # taken out by disable_adapters: now it stays out when the block ends
        reg.remerge = None
        return
    if reg.merged != name:
        raise ValueError(f"adapter {name!r} is not merged")
    _unmerge(model, reg)


def _merge(model: nn.Module, reg: AdapterRegistry, name: str) -> None:
    for _, layer in inject.lora_layers(model):
        if name in layer.lora_A:
            layer.merge(name)
    reg.merged = name


def _unmerge(model: nn.Module, reg: AdapterRegistry) -> None:
    for _, layer in inject.lora_layers(model):
        if layer.merged_adapter is not None:
            layer.unmerge()
    reg.merged = None


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes its base outputs: every adapter layer (LoRA branches, bottleneck,
    prefix and prompt adapters, modules_to_save copies), also of adapters added inside, is skipped, and a merged
    adapter is taken out of the weights and merged again on exit. Biases trained under bias "all" / "lora_only"
    are the base model's own and keep their trained values, as in PEFT.

    The lifecycle calls work inside, with the merged adapter counting as merged: merge_adapter is refused,
    set_active_adapter to another adapter asks for unmerge_adapter first (which then keeps it out of the weights
    after the block), and remove_adapter of it leaves nothing to merge back."""
    model = unwrap(model)
    reg = registry(model)
    if reg.disabled == 0 and reg.merged is not None:
        reg.remerge = reg.merged
        _unmerge(model, reg)
    reg.disabled += 1
    _enable_layers(model, False)
    try:
        yield model
    finally:
        reg.disabled -= 1
        if reg.disabled == 0 and not reg.configs:                     # every adapter removed inside
            delattr(model, _REGISTRY)
        elif reg.disabled == 0:
            _enable_layers(model, True)
            name, reg.remerge = reg.remerge, None
            if name is not None:
                _merge(model, reg, name)


def _enable_layers(model: nn.Module, enabled: bool) -> None:
    for _, layer in inject.adapter_layers(model):
        layer.adapters_enabled = enabled


@contextmanager
def adapter_batch(model: nn.Module, names: Sequence[str | None], static: bool = False) -> Iterator[nn.Module]:
    """Inside the block, row i of the model's input runs adapter names[i] (None: the base model alone); every
    adapter layer computes all rows in one pass (LoRA layers in one multi-adapter op; a modules_to_save module
    runs its original on every row and each mapped adapter's copy on that adapter's rows).

    The batch size must equal len(names), except inside model.generate, whose beam search and
    num_return_sequences repeat each row in place (row i -> rows i·k … i·k+k-1): the mapping is repeated the
    same way. An adapter leaves the layers its config did not target to the base model for its rows, as running
    that row alone with the adapter active does. Inside disable_adapters every row gets the base outputs.

    Training: in the block the mapped adapters' parameters are the model's trainable parameters (everything
    else frozen, base biases too: every row shares them), and each adapter gets the gradient of its own rows
    alone. In train mode each row's LoRA branch gets its own adapter's dropout.

    Serving: when no gradient reaches an adapter, a layer reads its pool, a stacked copy of its adapters that is
    copied again lazily, per adapter, when that adapter's Parameters changed since the last copy (another
    object, another storage, or a bumped version counter: optimizer steps, copy_ and load_state_dict all bump
    it); inside model.generate, whose steps run no user code in between, once per generate call, and with
    `static=True` (a serving loop of one's own that changes no adapter inside the block) once per block. In-place
    writes through `.data` bypass the version counter and are not seen. With gradients, or inside torch.compile,
    a layer stacks the Parameters themselves on the fly instead.

    Backward may also run after the block (HF Trainer's training_step calls it after compute_loss): a block in
    which a layer ran with gradients enabled leaves its mapped adapters trainable (requires_grad;
    set_active_adapter freezes all but one again). Gradient checkpointing, which recomputes the forward inside
    backward, needs backward inside the block: after it, the recomputation raises RuntimeError.

    On exit the active adapter, the requires_grad flags (but the above) and the layers are as before. Raises
    ValueError, before anything changes, for an empty mapping, a name that is neither a string nor None, an
    unknown adapter, a merged adapter (mixed batches need unmerged weights), or an adapter missing from a layer
    its config targeted.
    """
    model = unwrap(model)
    reg = registry(model)
    _check_mapping(model, reg, names)
    layers = [layer for _, layer in inject.adapter_layers(model)]
    batch = AdapterBatch(names, reg.slots, {p.device for p in model.parameters()})
    batch.frozen = object() if static else None
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    own_generate = model.__dict__.get("generate")   # an instance attribute of the user's own, put back on exit
    with _BATCH_CLAIM:                                 # another thread's block is refused from the claim on
        _not_in_batch(reg, "open another adapter_batch")
        reg.batch = batch
    mapped = set()                                     # the mapped adapters' Parameters
    hooks = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in layers:
            for name in batch.adapters:
                if name in layer.adapter_names():
                    for p in layer.adapter_parameters(name):
                        p.requires_grad_(True)
                        mapped.add(p)
            layer.set_batch(batch)
        if callable(getattr(model, "generate", None)):
            model.generate = _expanding(model.generate, batch)
        # Each forward pass's inputs tell the layers how many tokens a row holds (AdapterBatch.before_forward).
        hooks += [model.register_forward_pre_hook(batch.before_forward, with_kwargs=True),
                  model.register_forward_hook(batch.after_forward, always_call=True)]
        yield model
    finally:
        reg.batch = None
        for hook in hooks:
            hook.remove()
        # A block whose layers ran with gradients may leave a graph whose backward runs after it (HF Trainer calls
        # backward after compute_loss): its mapped adapters stay trainable, or autograd would drop their gradients.
        for layer in layers:
            layer.set_batch(None)
            layer.after_block = batch.used
        for p, flag in requires_grad:
            p.requires_grad_(flag or (batch.trained and p in mapped))
        if own_generate is None:
            model.__dict__.pop("generate", None)
        else:
            model.__dict__["generate"] = own_generate


def remap_adapter_batch(model: nn.Module, names: Sequence[str | None]) -> None:
    """Inside pe.adapter_batch: row i runs adapter names[i] (None: the base model) from now on, without leaving
    the block. The new mapping has as many rows as the block's, and its adapters are among the block's (the
    trainable parameters and the layers' slots stay as the block set them; an adapter may have no rows).

    The batch's per-token tensors (slot index, token grouping) are rewritten in place, so a CUDA graph captured
    inside the block (pe.capture_train_step, a captured decode step) replays the new mapping: serving or
    training a changing task mix at graph speed. That holds for LoRA and bottleneck adapters; prefix, prompt and
    modules_to_save adapters build per-row layouts on the host, so a block mapping any of them refuses to remap
    (open a new block for a new mapping there). ValueError, before anything changes, outside a block, for a
    mapping of another length, an adapter the block does not map, or such an adapter in the block.
    """
    model = unwrap(model)
    reg = registry(model)
    batch = reg.batch
    if batch is None:
        raise ValueError("remap_adapter_batch works inside an adapter_batch block; open one first")
    _check_mapping(model, reg, names)
    if len(names) != len(batch.names):
        raise ValueError(f"remap_adapter_batch: the block maps {len(batch.names)} rows, got {len(names)} names")
    outside = [name for name in dict.fromkeys(names) if name is not None and name not in batch.adapters]
    if outside:
        raise ValueError(f"remap_adapter_batch: {outside} not among the block's adapters "
                         f"{sorted(batch.adapters)}: open a new adapter_batch for them")
    for path, layer in inject.adapter_layers(model):
        held = [name for name in batch.adapters if name in layer.adapter_names()]
        if held and not layer.remaps_in_place:
            raise ValueError(f"remap_adapter_batch: {path} ({type(layer).__name__}) holds {held}, whose per-row "
                             f"layout is built on the host; open a new adapter_batch for a new mapping")
    # The layers keep what they built from the block's adapter set (per-slot ranks and scales, pool slots):
    # unchanged, and a captured graph holds those very tensors. Layers holding none of the block's adapters
    # built nothing from its rows.
    batch.remap(names)


def _check_mapping(model: nn.Module, reg: AdapterRegistry, names: Sequence[str | None]) -> None:
    if isinstance(names, str) or not isinstance(names, Sequence) or len(names) == 0:
        raise ValueError(f"adapter_batch needs a non-empty list with one adapter name (or None) per row, "
                         f"got {names!r}")
    for name in names:
        if name is not None and not isinstance(name, str):
            raise ValueError(f"adapter_batch: each row's adapter must be a name or None, got {name!r}")
    mapped = [name for name in dict.fromkeys(names) if name is not None]
    for name in mapped:
        _known(reg, name)
    if reg.merged is not None:
        raise ValueError(f"adapter {reg.merged!r} is merged into the base weights, which every row would get; "
                         f"mixed batches need unmerged weights (unmerge_adapter it first)")
    for name in mapped:
        slot = reg.slots[name]
        routed = next((path for path in reg.targets[name] if ".experts." in f".{path}."), None)
        if routed is not None:
            # A mixture-of-experts layer runs each expert on the tokens routed to it: a subset the per-row
            # mapping cannot follow (transformers' expert lists are named "experts").
            raise ValueError(f"adapter {name!r} has layers in routed experts ({routed!r}), which get a subset of "
                             "the tokens: mixed batches cannot map their rows; serve it alone (set_active_adapter)")
        for path in reg.targets[name]:
            try:
                layer = model.get_submodule(path)
            except AttributeError:
                layer = None
            if not isinstance(layer, AdapterLayer) or name not in layer.adapter_names() \
                    or layer.slot.get(name) != slot:
                raise ValueError(f"adapter {name!r} is missing from {path!r}, a layer its config targets (expected "
                                 f"in slot {slot}); the model was changed outside ptlm_engine's API")


def _expanding(generate, batch: AdapterBatch):
    """model.generate, during which each mapped row may appear several times in place (beams, sequences), and the
    adapters' Parameters do not change (each layer checks its pool once per call: AdapterBatch.frozen)."""
    @functools.wraps(generate)
    def generate_mixed(*args, **kwargs):
        # Only generate's own repeats (beams, sequences) may multiply the rows: its input has one row per name.
        inputs = args[0] if args else next((kwargs[k] for k in ("inputs", "input_ids", "inputs_embeds")
                                            if kwargs.get(k) is not None), None)
        if isinstance(inputs, torch.Tensor) and inputs.dim() >= 2 and inputs.shape[0] != len(batch.names):
            raise ValueError(f"adapter_batch maps {len(batch.names)} rows, but generate got a batch of "
                             f"{inputs.shape[0]}: its batch size (dim 0) must equal the number of names")
        frozen = batch.frozen                              # a static block's token holds for its whole lifetime
        batch.expanding, batch.frozen = True, object() if frozen is None else frozen
        try:
            return generate(*args, **kwargs)
        finally:
            batch.expanding, batch.frozen = False, frozen
    return generate_mixed


def remove_adapter(model: nn.Module, name: str) -> None:
    """Delete adapter `name` (unmerging it first). Layers left without adapters become their original modules
    again; after the last adapter the base parameters get back the requires_grad they had before the first."""
    model = unwrap(model)
    reg = registry(model)
    _not_in_batch(reg, "remove an adapter")
    _known(reg, name)
    if reg.merged == name:
        _unmerge(model, reg)
    if reg.remerge == name:
        reg.remerge = None
    with inject.replacing(model):
        for path, layer in inject.adapter_layers(model):
            if name in layer.adapter_names():
                layer.remove_adapter(name)
                if not layer.adapter_names():
                    inject.restore(model, path)
    del reg.configs[name], reg.slots[name], reg.targets[name]
    inject.link_projection_groups(model)
    inject.sync_fast_paths(model)
    if reg.active == name:
        # Every layer was told the name, also those without it: an adapter added later under it must not run.
        reg.active = None
        for _, layer in inject.adapter_layers(model):
            layer.active_adapter = None
    if reg.configs:
        _set_trainable(model, reg)
    else:
        _release(model, reg)


def unload(model: nn.Module, merge: bool = False) -> nn.Module:
    """Remove every adapter and put all original modules back; returns the model it was given.

    merge=False: merged adapters are unmerged first, so the base weights are the base model's again.
    merge=True: the active adapter is merged into the base weights and its modules_to_save copies' values are
    written into the original modules, leaving a plain model that computes what the adapted model did.
    """
    given, model = model, unwrap(model)
    reg = registry(model)
    _not_in_batch(reg, "unload")
    if merge and reg.active is not None and reg.merged is None and isinstance(reg.configs[reg.active], LoraConfig):
        _check_untied(model, reg.active)
    if merge and reg.active is not None and not isinstance(reg.configs[reg.active], LoraConfig):
        raise ValueError(f"unload(merge=True): the active adapter {reg.active!r} is a {_kinds(reg, reg.active)}: "
                         "only LoRA adapters merge into the base weights (unload without merge, or activate a "
                         "LoRA adapter)")
    flags = []                             # a merged copy's Parameters take the original's requires_grad
    if merge and reg.active is not None:
        if reg.merged is None:
            _merge(model, reg, reg.active)
        for _, wrapper in inject.saved_modules(model):
            if reg.active in wrapper.modules_to_save:
                # The copy itself takes the module's place (as PEFT's merge_and_unload): writing its values into
                # the original would also change whatever shares its Parameters (GPT-2's tied wte / lm_head).
                kept, original = wrapper.modules_to_save[reg.active], wrapper.original_module
                flags += zip(kept.parameters(), original.parameters())
                wrapper.replace_original(kept)
    elif reg.merged is not None:
        _unmerge(model, reg)
    inject.unlink_projection_groups(model)
    with inject.replacing(model):
        for path, _ in inject.adapter_layers(model):
            inject.restore(model, path)
    inject.sync_fast_paths(model)
    _release(model, reg)
    for copied, original in flags:
        copied.requires_grad_(original.requires_grad)
    return given


def _release(model: nn.Module, reg: AdapterRegistry) -> None:
    """The model has no adapters left: its base Parameters get back their requires_grad, and the registry goes
    (inside disable_adapters once the outermost block ends: adapters added inside stay disabled until then)."""
    for n, p in model.named_parameters(remove_duplicate=False):    # tied names each (an unload may untie them)
        if n in reg.base_requires_grad:
            p.requires_grad_(reg.base_requires_grad[n])
    if reg.disabled == 0:
        delattr(model, _REGISTRY)
