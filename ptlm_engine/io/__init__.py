"""Adapter files, both ways, in HF PEFT's layout where PEFT has the method: adapter_config.json (with its
"peft_type") + adapter_model.safetensors. Each method's layout is one Format (io/<method>.py); loading
validates the config and every tensor against the model before changing anything, and undoes its changes if
copying the tensors in fails anyway.
"""
from __future__ import annotations

import os

from torch import nn

from ptlm_engine import api
from ptlm_engine.io import lora
from ptlm_engine.io.files import CONFIG_NAME, PREFIX, WEIGHTS_NAME, Format, read_json, read_tensors, write

FORMATS: list[Format] = [lora.FORMAT]

__all__ = ["save_adapter", "load_adapter", "read_config", "FORMATS", "CONFIG_NAME", "WEIGHTS_NAME", "PREFIX"]


def save_adapter(model: nn.Module, name: str, path: str | os.PathLike) -> None:
    """Write adapter `name` to the directory `path` (created if needed); HF PEFT loads the methods it has with
    PeftModel.from_pretrained(base_model, path)."""
    model = api.unwrap(model)
    reg = api.registry(model)
    if name not in reg.configs:
        raise ValueError(f"no adapter named {name!r}; the model has {sorted(reg.configs)}")
    config = reg.configs[name]
    fmt = next(f for f in FORMATS if isinstance(config, f.config_type))
    tensors, file_config = fmt.dump(model, name, config)
    write(path, tensors, file_config)


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default") -> str:
    """Add the adapter stored in the directory `path` (written by save_adapter or by HF PEFT) as `name`;
    it becomes active if it is the model's first. Returns `name`.

    Raises FileNotFoundError for a missing file and ValueError for anything that does not fit (bad JSON or
    safetensors, an unsupported peft_type, PEFT features this engine lacks, missing, extra or misshapen
    tensors); the model is then left as it was.
    """
    model = api.unwrap(model)
    api.check_new_name(model, name)
    raw, file = read_json(path)
    fmt = _format(raw, file)
    config = fmt.read_config(raw, file)
    fmt.load(model, name, config, read_tensors(path), path)
    return name


def read_config(path: str | os.PathLike):
    """The adapter config in `path`/adapter_config.json (a LoraConfig, PrefixConfig, ...)."""
    raw, file = read_json(path)
    return _format(raw, file).read_config(raw, file)


def _format(raw: dict, file: str) -> Format:
    for fmt in FORMATS:
        if raw.get("peft_type") == fmt.peft_type:
            return fmt
    known = ", ".join(repr(f.peft_type) for f in FORMATS)
    raise ValueError(f"{file}: peft_type {raw.get('peft_type')!r} is not supported (only {known})")
