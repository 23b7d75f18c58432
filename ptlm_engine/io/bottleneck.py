"""Bottleneck adapter files. HF PEFT has no bottleneck adapters, so the layout is ours, in PEFT's style:
adapter_config.json with "peft_type": "BOTTLENECK" and BottleneckConfig's fields under their own names, and the
tensors, with the adapter name left out as PEFT does:
  base_model.model.<module>.ptlm_bottleneck.down.weight   (m, d)
  base_model.model.<module>.ptlm_bottleneck.down.bias     (m,)
  base_model.model.<module>.ptlm_bottleneck.up.weight     (d, m)
  base_model.model.<module>.ptlm_bottleneck.up.bias       (d,)
  base_model.model.<module>.ptlm_bottleneck.layer_norm.weight   (d,)   with "layer_norm": true only
  base_model.model.<module>.ptlm_bottleneck.layer_norm.bias     (d,)
  base_model.model.<module>.<key>                         each state-dict entry of a modules_to_save copy
where <module> is the module the adapter's output hook sits on (see ptlm_engine/bottleneck_sites.py).
"""
from __future__ import annotations

import dataclasses

from torch import Tensor, nn

from ptlm_engine import inject
from ptlm_engine.bottleneck_sites import find_bottleneck_targets
from ptlm_engine.config import BottleneckConfig
from ptlm_engine.io.files import Format, TensorMatcher, key, load_copies, saved_copies
from ptlm_engine.layers.bottleneck import BottleneckLayer

PEFT_TYPE = "BOTTLENECK"
LEAVES = ("down.weight", "down.bias", "up.weight", "up.bias")   # in adapter_parameters' order
NORM_LEAVES = ("layer_norm.weight", "layer_norm.bias")         # after LEAVES, where the config has layer_norm
_FIELDS = {field.name for field in dataclasses.fields(BottleneckConfig)}
# Keys that do not change what a loaded adapter computes (PEFT's bookkeeping, kept for tools that read them).
_INERT_KEYS = {"peft_type", "task_type", "inference_mode", "base_model_name_or_path", "revision", "peft_version"}


def dump(model: nn.Module, name: str, config: BottleneckConfig) -> tuple[dict[str, Tensor], dict]:
    layers = [(path, layer) for path, layer in inject.adapter_layers(model)
              if isinstance(layer, BottleneckLayer) and name in layer.down]
    leaves = LEAVES + NORM_LEAVES if config.layer_norm else LEAVES
    tensors = {key(path, leaf): param for path, layer in layers
               for leaf, param in zip(leaves, layer.adapter_parameters(name), strict=True)}
    tensors.update(saved_copies(model, name, config.modules_to_save))
    file_config = {"peft_type": PEFT_TYPE, "task_type": None, "inference_mode": True,
                   "base_model_name_or_path": getattr(model, "name_or_path", None) or None,
                   **dataclasses.asdict(config)}
    return tensors, file_config


def match(model: nn.Module, config: BottleneckConfig, tensors: dict[str, Tensor], path, _others_saved=()):
    """Check the file's tensors against the model; return the function that copies them into the newly added
    adapter (it writes nothing outside the adapter, so its undo has nothing to do)."""
    targets = find_bottleneck_targets(model, config)
    saved = inject.find_modules_to_save(model, config.modules_to_save)
    m, d = config.bottleneck, model.config.hidden_size
    shapes = {"down.weight": (m, d), "down.bias": (m,), "up.weight": (d, m), "up.bias": (d,),
              "layer_norm.weight": (d,), "layer_norm.bias": (d,)}
    leaves = LEAVES + NORM_LEAVES if config.layer_norm else LEAVES
    matcher = TensorMatcher(tensors)
    weights = {target: [matcher.take(key(target, leaf), shapes[leaf]) for leaf in leaves] for target in targets}
    copies = matcher.copies(model, saved)
    matcher.check(path, model)

    def apply(name: str):
        for target, values in weights.items():
            for param, value in zip(model.get_submodule(target).adapter_parameters(name), values):
                param.copy_(value)
        load_copies(model, name, copies)
        return lambda: None
    return apply


def read_config(raw: dict, file: str) -> BottleneckConfig:
    unknown = sorted(k for k in raw if k not in _FIELDS and k not in _INERT_KEYS)
    if unknown:
        raise ValueError(f"{file}: unknown bottleneck adapter config keys {unknown} (known: {sorted(_FIELDS)})")
    try:
        return BottleneckConfig(**{k: v for k, v in raw.items() if k in _FIELDS})
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from e


FORMAT = Format(PEFT_TYPE, BottleneckConfig, read_config, dump, match)
