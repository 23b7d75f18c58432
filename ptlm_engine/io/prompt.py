"""HF PEFT's PROMPT_TUNING file layout, both ways.

Tensor keys (PEFT's prompt-learning PeftModel holds the model itself as `base_model`, without a tuner in between,
so its modules_to_save keys have no ".model"):
  prompt_embeddings             (num_virtual_tokens, token_dim)
  base_model.<module>.<key>     each state-dict entry of a modules_to_save copy
  base_model.<input / output embedding>.weight
                                a base embedding / LM-head weight: PEFT's save_embedding_layers, which loading
                                writes into the model, as PEFT does (not written here, as for LoRA: see io/lora.py)

The config records num_virtual_tokens, token_dim (the embeddings' width), num_transformer_submodules (1: decoder
or encoder models; 2 is PEFT's encoder-decoder layout, not supported here), num_attention_heads and num_layers
(the model's, informative only), the initialisation (prompt_tuning_init RANDOM / SAMPLE_VOCAB / TEXT,
prompt_tuning_init_text, tokenizer_name_or_path) and task_type, which tells PEFT which PeftModel class (and so
which label / token-type handling) to load: written from the model's head (layers.prompt.task_type), read only to
reject encoder-decoders.

The initialisation does not change a loaded adapter (its values are in the file; PEFT skips it too): a TEXT file
reads as init "random" with its init_text and tokenizer name kept, so loading never needs the tokenizer; a
"text" adapter whose tokenizer has no name is written as RANDOM, which PEFT requires of a TEXT config.
"""
from __future__ import annotations

from torch import Tensor, nn

from ptlm_engine import inject
from ptlm_engine.config import PromptConfig
from ptlm_engine.io.files import (PREFIX, PROMPT_LEARNING_PREFIX, Format, TensorMatcher, embedding_weights,
                                  load_copies, overwrite, saved_copies)
from ptlm_engine.layers.prompt import LAYER_NAME, find_prompt_targets, task_type

_INITS = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}
_FROM_PEFT_INIT = {"RANDOM": "random", "SAMPLE_VOCAB": "vocab", "TEXT": "random"}
# Keys that do not change what a loaded prompt computes (bookkeeping; the model's sizes, checked through the
# tensor's shape; the tokenizer's options, used by TEXT initialisation only).
_INERT_PEFT_KEYS = {"peft_type", "auto_mapping", "base_model_name_or_path", "revision", "inference_mode",
                    "peft_version", "token_dim", "num_attention_heads", "num_layers", "tokenizer_kwargs",
                    "task_type", "num_transformer_submodules"}
_READ_KEYS = {"num_virtual_tokens", "prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path",
              "modules_to_save"}


# ------------------------------------------------------------------------------------------------------ save
def dump(model: nn.Module, name: str, config: PromptConfig) -> tuple[dict[str, Tensor], dict]:
    """Adapter `name`'s tensors and JSON config in PEFT's layout (PeftModel.from_pretrained loads them)."""
    prompt = getattr(model, LAYER_NAME).prompt_embeddings[name]                       # (Q, hidden)
    tensors = {"prompt_embeddings": prompt}
    copies = saved_copies(model, name, config.modules_to_save)
    tensors.update({PROMPT_LEARNING_PREFIX + k.removeprefix(PREFIX): v for k, v in copies.items()})
    tokenizer = config.tokenizer if isinstance(config.tokenizer, str) else \
        getattr(config.tokenizer, "name_or_path", None) or None
    init = "random" if config.init == "text" and tokenizer is None else config.init
    model_config = getattr(model, "config", None)
    peft_config = {
        "peft_type": "PROMPT_TUNING", "task_type": task_type(model), "inference_mode": True,
        "base_model_name_or_path": getattr(model, "name_or_path", None) or None,
        "num_virtual_tokens": config.num_virtual_tokens, "token_dim": prompt.shape[1],
        "num_transformer_submodules": 1,
        "num_attention_heads": getattr(model_config, "num_attention_heads", None),
        "num_layers": getattr(model_config, "num_hidden_layers", None),
        "prompt_tuning_init": _INITS[init], "prompt_tuning_init_text": config.init_text,
        "tokenizer_name_or_path": tokenizer, "tokenizer_kwargs": None,
        "modules_to_save": config.modules_to_save,
    }
    return tensors, peft_config


# ------------------------------------------------------------------------------------------------------ load
def read_config(raw: dict, file: str) -> PromptConfig:
    """The PromptConfig in a parsed PEFT PROMPT_TUNING adapter_config.json."""
    for field, value in raw.items():
        if field not in _READ_KEYS and field not in _INERT_PEFT_KEYS and value not in (None, False, {}, [], ""):
            raise ValueError(f"{file}: {field}={value!r} asks for a PEFT feature this engine does not support")
    if raw.get("task_type") == "SEQ_2_SEQ_LM" or raw.get("num_transformer_submodules") not in (None, 1):
        raise ValueError(f"{file}: prompt tuning of encoder-decoder models (task_type SEQ_2_SEQ_LM, "
                         f"num_transformer_submodules 2) is not supported")
    init = raw.get("prompt_tuning_init") or "RANDOM"
    if init not in _FROM_PEFT_INIT:
        raise ValueError(f"{file}: prompt_tuning_init {init!r} is not one of {sorted(_FROM_PEFT_INIT)}")
    try:
        return PromptConfig(num_virtual_tokens=raw.get("num_virtual_tokens"), init=_FROM_PEFT_INIT[init],
                            init_text=raw.get("prompt_tuning_init_text"),
                            tokenizer=raw.get("tokenizer_name_or_path"),
                            modules_to_save=raw.get("modules_to_save") or None)   # PEFT reads [] as none
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from e


def match(model: nn.Module, config: PromptConfig, tensors: dict[str, Tensor], path, _others_saved=()):
    """Check PEFT-layout tensors against the model; return the function that copies them into a newly added
    adapter. Base embedding / LM-head weights in the file overwrite the model's, as in PEFT (undone on failure)."""
    find_prompt_targets(model, config)
    saved = inject.find_modules_to_save(model, config.modules_to_save)
    matcher = TensorMatcher(tensors)
    hidden = model.get_input_embeddings().weight.shape[1]
    prompt = matcher.take("prompt_embeddings", (config.num_virtual_tokens, hidden))
    copies = matcher.copies(model, saved, PROMPT_LEARNING_PREFIX)
    base_writes = embedding_weights(model, matcher, PROMPT_LEARNING_PREFIX)
    matcher.check(path, model)

    def apply(name: str):
        def load():
            getattr(model, LAYER_NAME).prompt_embeddings[name].copy_(prompt)
            load_copies(model, name, copies)
        return overwrite(base_writes, load)
    return apply


FORMAT = Format("PROMPT_TUNING", PromptConfig, read_config, dump, match)
