"""HF PEFT's LoRA file layout, both ways.

Tensor keys, with the adapter name left out (PEFT puts it back on loading):
  base_model.model.<module>.lora_A.weight     (r, d_in)
  base_model.model.<module>.lora_B.weight     (d_out, r)
  base_model.model.<module>.lora_embedding_A  (r, V)      LoRA on an embedding table (V, d)
  base_model.model.<module>.lora_embedding_B  (d, r)
  base_model.model.<module>.<key>             each state-dict entry of a modules_to_save copy
  base_model.model.<module>.base_layer.bias   bias of a LoRA-wrapped module (bias "all" / "lora_only")
  base_model.model.<module>.bias              bias of any other module (bias "all")
  base_model.model.<embed_tokens / lm_head>[.base_layer].weight, or the model's own input / output embedding
                                              a base embedding / head weight: PEFT's save_embedding_layers, which
                                              loading writes into the model, as PEFT does (not written here)
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ptlm_engine import inject
from ptlm_engine.config import ALL_LINEAR, LoraConfig
from ptlm_engine.io.files import (EMBEDDING_LAYER_NAMES, Format, TensorMatcher, embedding_weights, key, load_copies,
                                  overwrite, saved_copies)
from ptlm_engine.layers import LoraEmbedding

# PEFT config keys that do not change what a loaded LoRA adapter computes (bookkeeping, initialisation
# schemes whose result is in the file, fan_in_fan_out which follows the layer type here as in PEFT).
_INERT_PEFT_KEYS = {"peft_type", "auto_mapping", "base_model_name_or_path", "revision", "task_type",
                    "inference_mode", "peft_version", "fan_in_fan_out", "init_lora_weights", "loftq_config",
                    "eva_config", "corda_config", "lora_ga_config", "megatron_config", "megatron_core",
                    "qalora_group_size", "ensure_weight_tying"}
# init_lora_weights values with which PEFT rewrites W0 at init (and again on load).
_BASE_REWRITING_INITS = ("pissa", "olora", "corda")
# PEFT config keys read into LoraConfig (PEFT name -> ours).
_PEFT_FIELDS = {"r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "target_modules",
                "layers_to_transform": "layers_to_transform", "layers_pattern": "layers_pattern",
                "use_rslora": "use_rslora", "bias": "bias",
                "modules_to_save": "modules_to_save", "rank_pattern": "rank_pattern",
                "alpha_pattern": "alpha_pattern", "exclude_modules": "exclude_modules"}


# ------------------------------------------------------------------------------------------------------ save
def dump(model: nn.Module, name: str, config: LoraConfig) -> tuple[dict[str, Tensor], dict]:
    """Adapter `name`'s tensors and JSON config in PEFT's layout (PeftModel.from_pretrained loads them)."""
    layers = [(p, layer) for p, layer in inject.lora_layers(model) if name in layer.lora_A]
    tensors: dict[str, Tensor] = {}
    for p, layer in layers:
        key_A, key_B = layer.file_keys
        tensors[key(p, key_A)] = layer.lora_A[name].weight
        tensors[key(p, key_B)] = layer.lora_B[name].weight
    lora_paths = {p for p, _ in layers}
    for p, bias in _bias_params(model, config.bias, lora_paths, owner=name).items():
        # PEFT's LoRA layer holds the wrapped module as `base_layer`, so that is where PEFT files its bias.
        tensors[key(p, "base_layer.bias" if p in lora_paths else "bias")] = bias
    tensors.update(saved_copies(model, name, config.modules_to_save))

    target_modules = config.target_modules
    if target_modules is None or target_modules == ALL_LINEAR or config.layers_to_transform is not None and any(
            inject.layer_index(p, config.layers_pattern, leading=False) is None for p, _ in layers):
        # What was resolved, as PEFT records "all-linear"; also where PEFT would find no layer index in a target's
        # name (a plain model's top-level block list): a module named whole is taken in any layer.
        target_modules = sorted(p for p, _ in layers)
    peft_config = {
        "peft_type": "LORA", "task_type": None, "inference_mode": True,
        # What PEFT writes without a task_type: the base model's class, which AutoPeftModel loads the base by.
        "auto_mapping": {"base_model_class": type(model).__name__, "parent_library": type(model).__module__},
        "base_model_name_or_path": getattr(model, "name_or_path", None) or None,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout, "use_rslora": config.use_rslora,
        "target_modules": target_modules, "layers_to_transform": config.layers_to_transform,
        # GPT-2's Conv1D layout; PEFT's LoRA embeddings read no such flag (and it warns of it on a Linear)
        "layers_pattern": config.layers_pattern,
        "fan_in_fan_out": any(layer.fan_in_fan_out and not isinstance(layer, LoraEmbedding) for _, layer in layers),
        "bias": config.bias, "modules_to_save": config.modules_to_save, "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern), "exclude_modules": config.exclude_modules,
    }
    return tensors, peft_config


def _bias_params(model: nn.Module, mode: str, lora_paths: set[str], skip: Sequence[str] = (),
                 owner: str | None = None) -> dict[str, nn.Parameter]:
    """The base biases that go with adapter `owner`, by module name: none, every one ("all"), or those of the
    modules its LoRA layers wrap, `lora_paths` ("lora_only"); never those of its modules_to_save (named in
    `skip` before it is added), whose copies carry their own."""
    if mode == "none":
        return {}
    return {p: module._parameters["bias"] for p, module in inject.base_modules(model, skip, owner)
            if module._parameters.get("bias") is not None and (mode == "all" or p in lora_paths)}


# ------------------------------------------------------------------------------------------------------ load
def match(model: nn.Module, config: LoraConfig, tensors: dict[str, Tensor], path,
          others_saved: Sequence[str] = ()):
    """Check PEFT-layout tensors against the model; return the function that copies them into a newly added
    adapter. Loading a bias other than "none" overwrites those base biases, as in PEFT (undone on failure), but
    not those of the modules a combined adapter's other parts keep copies of (`others_saved`); so do embedding /
    LM-head base weights in the file (save_embedding_layers)."""
    targets = inject.find_lora_targets(model, config)
    saved = inject.find_modules_to_save(model, config.modules_to_save)
    others = inject.find_modules_to_save(model, list(others_saved)) if others_saved else []
    lora_weights, copies, base_writes = _match_tensors(model, config, targets, saved, tensors, path, others)

    def apply(name: str):
        def load():
            for target, (lora_A, lora_B) in lora_weights.items():
                layer = model.get_submodule(target)
                layer.lora_A[name].weight.copy_(lora_A)
                layer.lora_B[name].weight.copy_(lora_B)
            load_copies(model, name, copies)
        return overwrite(base_writes, load)
    return apply


def read_config(raw: dict, file: str) -> LoraConfig:
    """The LoraConfig in a parsed PEFT LoRA adapter_config.json."""
    for field, value in raw.items():
        if field not in _PEFT_FIELDS and field not in _INERT_PEFT_KEYS and value not in (None, False, {}, [], ""):
            raise ValueError(f"{file}: {field}={value!r} asks for a PEFT feature this engine does not support")
    init = raw.get("init_lora_weights")
    if isinstance(init, str) and init.lower() == "mica":
        raise ValueError(f"{file}: init_lora_weights='mica' is a LoRA variant (PEFT keeps lora_B frozen), which "
                         "this engine does not implement")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS) or raw.get("loftq_config"):
        # PEFT's PiSSA / OLoRA / CorDA / LoftQ move part of W0 into A and B at init and leave W0 rewritten:
        # PeftModel.from_pretrained redoes that on load; these files on the unchanged base would count it twice.
        raise ValueError(f"{file}: init_lora_weights={init!r} (or loftq_config) rewrites the base weights at "
                         "init, which loading here does not redo; convert the adapter to plain LoRA with PEFT first "
                         "(its path_initial_model_for_weight_conversion)")
    if raw.get("ensure_weight_tying") and (raw.get("modules_to_save") or _names_embedding(raw.get("target_modules"))):
        # PEFT then keeps one trained copy (or one LoRA) for the input embeddings and the tied LM head.
        raise ValueError(f"{file}: ensure_weight_tying=True with modules_to_save or embedding / LM-head targets "
                         "(PEFT then shares one copy between tied modules) is not supported here")
    # PEFT reads an empty list (or layers_pattern "") as none.
    fields = {ours: raw[peft] for peft, ours in _PEFT_FIELDS.items()
              if raw.get(peft) is not None and not (peft != "target_modules" and raw[peft] in ([], ""))}
    try:
        return LoraConfig(**fields)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from e


def _names_embedding(target_modules) -> bool:
    names = [target_modules] if isinstance(target_modules, str) else target_modules or []
    return any(n.rsplit(".", 1)[-1] in EMBEDDING_LAYER_NAMES for n in names)


def _match_tensors(model: nn.Module, config: LoraConfig, targets: list[str], saved: list[str],
                   tensors: dict[str, Tensor], path, others: list[str]) -> tuple[dict, dict, list]:
    """Pair every file tensor with its place in the model and check its shape, before anything changes:
    (LoRA weights by target, copy state dicts by modules_to_save name, [(base bias or weight Parameter, value)])."""
    match = TensorMatcher(tensors)
    lora_weights = {}
    for target in targets:
        layer = inject.as_lora_layer(model.get_submodule(target))
        r = config.rank_for(target)
        key_A, key_B = layer.file_keys
        lora_A = match.take(key(target, key_A), (r, layer.in_features))
        lora_B = match.take(key(target, key_B), (layer.out_features, r))
        lora_weights[target] = (lora_A, lora_B)
    copies = match.copies(model, saved)
    biases = []
    for module_path, param in _bias_params(model, config.bias, set(targets), [*saved, *others]).items():
        # PEFT files a bias under base_layer where its LoRA layer wraps the module, which depends on the
        # adapters PEFT's model had when saving: take either key, expect the one this adapter implies.
        plain, wrapped = key(module_path, "bias"), key(module_path, "base_layer.bias")
        expected, other = (wrapped, plain) if module_path in targets else (plain, wrapped)
        biases.append((param, match.take(other if other in match.remaining else expected, param.shape)))
    biases += embedding_weights(model, match)
    match.check(path, model)
    return lora_weights, copies, biases


FORMAT = Format("LORA", LoraConfig, read_config, dump, match)
