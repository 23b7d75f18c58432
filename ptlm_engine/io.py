"""Adapter files in HF PEFT's LoRA layout, both ways: adapter_config.json + adapter_model.safetensors.

Tensor keys, with the adapter name left out (PEFT puts it back on loading):
  base_model.model.<module>.lora_A.weight     (r, d_in)
  base_model.model.<module>.lora_B.weight     (d_out, r)
  base_model.model.<module>.<key>             each state-dict entry of a modules_to_save copy
  base_model.model.<module>.base_layer.bias   bias of a LoRA-wrapped module (bias "all" / "lora_only")
  base_model.model.<module>.bias              bias of any other module (bias "all")
Loading validates the config and every tensor against the model before changing anything, and undoes its
changes if copying the tensors in fails anyway.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ptlm_engine import api, inject
from ptlm_engine.config import ALL_LINEAR, LoraConfig
from ptlm_engine.layers import ModulesToSave

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."   # PeftModel -> LoraModel (.base_model) -> the model (.model)

# PEFT config keys that do not change what a loaded LoRA adapter computes (bookkeeping, initialisation
# schemes whose result is in the file, fan_in_fan_out which follows the layer type here as in PEFT).
_INERT_PEFT_KEYS = {"peft_type", "auto_mapping", "base_model_name_or_path", "revision", "task_type",
                    "inference_mode", "peft_version", "fan_in_fan_out", "init_lora_weights", "loftq_config",
                    "eva_config", "corda_config", "lora_ga_config", "megatron_config", "megatron_core",
                    "qalora_group_size", "ensure_weight_tying"}
# PEFT config keys read into LoraConfig (PEFT name -> ours).
_PEFT_FIELDS = {"r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "target_modules",
                "layers_to_transform": "layers_to_transform", "use_rslora": "use_rslora", "bias": "bias",
                "modules_to_save": "modules_to_save"}
_LAYER_NAMES = {"layers", "h", "layer"}   # the block-stack names inject's layer index understands


# ------------------------------------------------------------------------------------------------------ save
def save_adapter(model: nn.Module, name: str, path: str | os.PathLike) -> None:
    """Write adapter `name` to the directory `path` (created if needed) in PEFT's LoRA layout; HF PEFT loads
    it with PeftModel.from_pretrained(base_model, path)."""
    model = api.unwrap(model)
    reg = api.registry(model)
    if name not in reg.configs:
        raise ValueError(f"no adapter named {name!r}; the model has {sorted(reg.configs)}")
    config = reg.configs[name]
    layers = [(p, layer) for p, layer in inject.lora_layers(model) if name in layer.lora_A]
    tensors: dict[str, Tensor] = {}
    for p, layer in layers:
        tensors[_key(p, "lora_A.weight")] = layer.lora_A[name].weight
        tensors[_key(p, "lora_B.weight")] = layer.lora_B[name].weight
    lora_paths = {p for p, _ in layers}
    for p, bias in _bias_params(model, config.bias, lora_paths).items():
        # PEFT's LoRA layer holds the wrapped module as `base_layer`, so that is where PEFT files its bias.
        tensors[_key(p, "base_layer.bias" if p in lora_paths else "bias")] = bias
    for p, wrapper in inject.saved_modules(model):
        if name in wrapper.modules_to_save:
            for key, value in wrapper.modules_to_save[name].state_dict().items():
                tensors[_key(p, key)] = value
    # Own contiguous CPU copies: safetensors refuses tensors that share memory (tied weights in a copy).
    tensors = {k: v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True) for k, v in tensors.items()}

    target_modules = config.target_modules
    if target_modules is None or target_modules == ALL_LINEAR:
        target_modules = sorted(p for p, _ in layers)   # what was resolved, as PEFT records "all-linear"
    peft_config = {
        "peft_type": "LORA", "task_type": None, "inference_mode": True,
        "base_model_name_or_path": getattr(model, "name_or_path", None) or None,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout, "use_rslora": config.use_rslora,
        "target_modules": target_modules, "layers_to_transform": config.layers_to_transform,
        "layers_pattern": None, "fan_in_fan_out": any(layer.fan_in_fan_out for _, layer in layers),
        "bias": config.bias, "modules_to_save": config.modules_to_save,
    }
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(peft_config, f, indent=2, sort_keys=True)


def _key(module_path: str, leaf: str) -> str:
    """The file key of `leaf` (e.g. "lora_A.weight") in the module `module_path` ("" for the model itself)."""
    return f"{PREFIX}{module_path}.{leaf}" if module_path else f"{PREFIX}{leaf}"


def _bias_params(model: nn.Module, mode: str, lora_paths: set[str],
                 skip: Sequence[str] = ()) -> dict[str, nn.Parameter]:
    """The base biases that go with an adapter, by module name: none, every one ("all"), or those of the
    modules the adapter's LoRA layers wrap, `lora_paths` ("lora_only"); never those in `skip` (modules_to_save,
    whose copies carry their own)."""
    if mode == "none":
        return {}
    return {p: module._parameters["bias"] for p, module in inject.base_modules(model, skip)
            if module._parameters.get("bias") is not None and (mode == "all" or p in lora_paths)}


# ------------------------------------------------------------------------------------------------------ load
def load_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default") -> str:
    """Add the adapter stored in the directory `path` (written by save_adapter or by HF PEFT) as `name`;
    it becomes active if it is the model's first. Returns `name`.

    Raises FileNotFoundError for a missing file and ValueError for anything that does not fit (bad JSON or
    safetensors, a peft_type other than LORA, PEFT features this engine lacks, missing, extra or misshapen
    tensors); the model is then left as it was. Loading a bias other than "none" overwrites those base biases,
    as in PEFT.
    """
    model = api.unwrap(model)
    api.check_new_name(model, name)
    config = read_config(path)
    tensors = _read_tensors(path)
    targets = inject.find_lora_targets(model, config)
    saved = inject.find_modules_to_save(model, config.modules_to_save)
    lora_weights, copies, biases = _match_tensors(model, config, targets, saved, tensors, path)

    old_biases = [(param, param.detach().clone()) for param, _ in biases]
    api.add_adapter(model, name, config)
    try:
        with torch.no_grad():
            for target, (lora_A, lora_B) in lora_weights.items():
                layer = model.get_submodule(target)
                layer.lora_A[name].weight.copy_(lora_A)
                layer.lora_B[name].weight.copy_(lora_B)
            for target, state in copies.items():
                model.get_submodule(target).modules_to_save[name].load_state_dict(state)
            for param, value in biases:
                param.copy_(value)
    except BaseException:
        with torch.no_grad():
            for param, value in old_biases:
                param.copy_(value)
        api.remove_adapter(model, name)
        raise
    return name


def read_config(path: str | os.PathLike) -> LoraConfig:
    """The LoraConfig in `path`/adapter_config.json (PEFT's field names)."""
    file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no adapter config: {file} does not exist")
    try:
        with open(file) as f:
            raw = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not a readable JSON file ({e})") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("peft_type") != "LORA":
        raise ValueError(f"{file}: peft_type {raw.get('peft_type')!r} is not supported (only 'LORA')")
    for key, value in raw.items():
        if key not in _PEFT_FIELDS and key not in _INERT_PEFT_KEYS and key != "layers_pattern" \
                and value not in (None, False, {}, [], ""):
            raise ValueError(f"{file}: {key}={value!r} asks for a PEFT feature this engine does not support")
    pattern = raw.get("layers_pattern")
    if pattern and not set([pattern] if isinstance(pattern, str) else pattern) <= _LAYER_NAMES:
        raise ValueError(f"{file}: layers_pattern {pattern!r} is not supported (layer indices are found in "
                         f"{sorted(_LAYER_NAMES)})")
    fields = {ours: raw[peft] for peft, ours in _PEFT_FIELDS.items() if raw.get(peft) is not None}
    try:
        return LoraConfig(**fields)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from e


def _read_tensors(path: str | os.PathLike) -> dict[str, Tensor]:
    file = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no adapter weights: {file} does not exist (only safetensors are read)")
    try:
        return load_file(file)
    except Exception as e:   # safetensors raises its own error types for truncated or garbled files
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from e


def _match_tensors(model: nn.Module, config: LoraConfig, targets: list[str], saved: list[str],
                   tensors: dict[str, Tensor], path) -> tuple[dict, dict, list]:
    """Pair every file tensor with its place in the model and check its shape, before anything changes:
    (LoRA weights by target, copy state dicts by modules_to_save name, [(bias Parameter, value)])."""
    remaining = dict(tensors)
    problems = []

    def take(key: str, shape: tuple[int, ...]) -> Tensor | None:
        value = remaining.pop(key, None)
        if value is None:
            problems.append(f"missing {key}")
        elif tuple(value.shape) != tuple(shape):
            problems.append(f"{key}: shape {tuple(value.shape)}, the model needs {tuple(shape)}")
        elif not value.dtype.is_floating_point:
            problems.append(f"{key}: dtype {value.dtype} is not floating point")
        else:
            return value
        return None

    lora_weights = {}
    for target in targets:
        layer = inject.as_lora_layer(model.get_submodule(target))
        lora_A = take(_key(target, "lora_A.weight"), (config.r, layer.in_features))
        lora_B = take(_key(target, "lora_B.weight"), (layer.out_features, config.r))
        lora_weights[target] = (lora_A, lora_B)

    copies = {}
    for target in saved:
        module = model.get_submodule(target)
        original = module.original_module if isinstance(module, ModulesToSave) else module   # another adapter's
        copies[target] = {key: take(_key(target, key), value.shape)
                          for key, value in original.state_dict().items()}
        # With bias "all", PEFT also files this module's biases as <module>.original_module.bias and
        # <module>.modules_to_save.bias: the base's own, and a duplicate of the copy's.
        duplicates = (_key(target, "original_module."), _key(target, "modules_to_save."))
        for key in [k for k in remaining if k.startswith(duplicates)]:
            del remaining[key]

    biases = []
    for module_path, param in _bias_params(model, config.bias, set(targets), saved).items():
        # PEFT files a bias under base_layer where its LoRA layer wraps the module, which depends on the
        # adapters PEFT's model had when saving: take either key, expect the one this adapter implies.
        plain, wrapped = _key(module_path, "bias"), _key(module_path, "base_layer.bias")
        expected, other = (wrapped, plain) if module_path in targets else (plain, wrapped)
        biases.append((param, take(other if other in remaining else expected, param.shape)))

    problems += [f"unexpected {key}" for key in sorted(remaining)]
    if problems:
        shown = "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else "")
        raise ValueError(f"{path}: the adapter does not fit this {type(model).__name__} "
                         f"({len(problems)} problem(s)):\n  {shown}")
    return lora_weights, copies, biases
