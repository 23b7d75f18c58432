"""HF PEFT's PREFIX_TUNING file layout, both ways.

Tensor keys (PEFT's prompt-learning models hold the base model directly as `base_model`, so their
modules_to_save copies are filed under "base_model.<module>", not "base_model.model.<module>" as LoRA's):
  prompt_embeddings          (P, num_layers · 2 · token_dim): every layer's prefix keys and values — with
                             prefix_projection, the MLP's output (PEFT saves that, not the MLP)
  base_model.<module>.<key>  each state-dict entry of a modules_to_save copy
  base_model.<input / output embedding>.weight
                             a base embedding / LM-head weight: PEFT's save_embedding_layers, which loading writes
                             into the model, as PEFT does (not written here, as for LoRA: see io/lora.py)

A projected prefix therefore loads as a plain prefix holding the MLP's output (what it computes): the MLP itself
is not in the file, in PEFT's format as here.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ptlm_engine import inject
from ptlm_engine.config import PrefixConfig
from ptlm_engine.io.files import (PREFIX, PROMPT_LEARNING_PREFIX, Format, TensorMatcher, embedding_weights,
                                  load_copies, overwrite, saved_copies)
from ptlm_engine.layers.prefix import LAYER_NAME, PrefixTuning, find_prefix_targets, prefix_geometry

KEY = "prompt_embeddings"

# PEFT config keys that do not change what a loaded prefix computes: bookkeeping, initialisation (its result is
# in the file), the MLP's width (not in the file), and the geometry, which the tensor's shape is checked against.
_INERT_PEFT_KEYS = {"peft_type", "auto_mapping", "base_model_name_or_path", "revision", "task_type",
                    "inference_mode", "peft_version", "init_weights", "prefix_projection", "encoder_hidden_size",
                    "num_layers", "token_dim", "num_attention_heads"}
# PEFT's task_type per model class name ending: PeftModel.from_pretrained picks the class that applies the prefix
# by it (a PeftModel without task_type runs the base model alone).
_TASK_TYPES = [("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
               ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS")]


# ------------------------------------------------------------------------------------------------------ save
def dump(model: nn.Module, name: str, config: PrefixConfig) -> tuple[dict[str, Tensor], dict]:
    """Adapter `name`'s prefix values and JSON config in PEFT's layout (PeftModel.from_pretrained loads them)."""
    layer: PrefixTuning = getattr(model, LAYER_NAME)
    encoder = layer.encoders[name]
    with torch.no_grad():
        tensors = {KEY: encoder.values()}
    copies = saved_copies(model, name, config.modules_to_save)
    tensors.update({PROMPT_LEARNING_PREFIX + k.removeprefix(PREFIX): v for k, v in copies.items()})
    kind = type(model).__name__
    task = next((task for ending, task in _TASK_TYPES if kind.endswith(ending)), "FEATURE_EXTRACTION")
    g = layer.geometry
    peft_config = {
        "peft_type": "PREFIX_TUNING", "inference_mode": True, "init_weights": None, "task_type": task,
        "base_model_name_or_path": getattr(model, "name_or_path", None) or None,
        "num_virtual_tokens": config.num_virtual_tokens, "num_layers": g.num_layers, "token_dim": g.token_dim,
        "num_attention_heads": g.num_heads, "num_transformer_submodules": 1,
        "prefix_projection": config.projection, "encoder_hidden_size": config.encoder_hidden_size or g.token_dim,
        "modules_to_save": config.modules_to_save,
    }
    return tensors, peft_config


# ------------------------------------------------------------------------------------------------------ load
def read_config(raw: dict, file: str) -> PrefixConfig:
    """The PrefixConfig in a parsed PEFT PREFIX_TUNING adapter_config.json: a plain prefix (see the module
    docstring for prefix_projection)."""
    for field, value in raw.items():
        if field not in _INERT_PEFT_KEYS and field not in ("num_virtual_tokens", "modules_to_save",
                                                           "num_transformer_submodules") \
                and value not in (None, False, {}, [], ""):
            raise ValueError(f"{file}: {field}={value!r} asks for a PEFT feature this engine does not support")
    if raw.get("num_transformer_submodules") not in (None, 1):
        raise ValueError(f"{file}: num_transformer_submodules={raw['num_transformer_submodules']!r}: only "
                         "decoder-only and encoder-only models (1) are supported")
    saved = raw.get("modules_to_save")
    if isinstance(saved, list):   # PEFT's SEQ_CLS adds its defaults to the list every time: drop the repeats
        saved = list(dict.fromkeys(saved))
    try:
        return PrefixConfig(num_virtual_tokens=raw.get("num_virtual_tokens"), modules_to_save=saved or None)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from e


def match(model: nn.Module, config: PrefixConfig, tensors: dict[str, Tensor], path, _others_saved=()):
    """Check PEFT-layout tensors against the model; return the function that copies them into a newly added
    prefix adapter. Base embedding / LM-head weights in the file overwrite the model's, as in PEFT (undone on
    failure)."""
    find_prefix_targets(model, config)
    saved = inject.find_modules_to_save(model, config.modules_to_save)
    width = prefix_geometry(model.config).width
    matcher = TensorMatcher(tensors)
    values = matcher.take(KEY, (config.num_virtual_tokens, width))
    copies = matcher.copies(model, saved, PROMPT_LEARNING_PREFIX)
    base_writes = embedding_weights(model, matcher, PROMPT_LEARNING_PREFIX)
    matcher.check(path, model)

    def apply(name: str):
        def load():
            getattr(model, LAYER_NAME).encoders[name].embedding.weight.copy_(values)
            load_copies(model, name, copies)
        return overwrite(base_writes, load)
    return apply


FORMAT = Format("PREFIX_TUNING", PrefixConfig, read_config, dump, match)
