"""Adapter files, both ways, in HF PEFT's layout where PEFT has the method: adapter_config.json (with its
"peft_type") + adapter_model.safetensors. Each method's layout is one Format (io/<method>.py); loading
validates the config and every tensor against the model before changing anything, and undoes its changes if
copying the tensors in fails anyway.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from ptlm_engine import api, inject
from ptlm_engine.io import bottleneck, lora, prefix, prompt
from ptlm_engine.io.files import (CONFIG_NAME, PREFIX, WEIGHTS_NAME, Format, locate, read_json, read_tensors,
                                  with_task_modules, write)

FORMATS: list[Format] = [lora.FORMAT, bottleneck.FORMAT, prefix.FORMAT, prompt.FORMAT]

__all__ = ["save_adapter", "load_adapter", "read_config", "FORMATS", "CONFIG_NAME", "WEIGHTS_NAME", "PREFIX"]


def save_adapter(model: nn.Module, name: str, path: str | os.PathLike) -> None:
    """Write adapter `name` to the directory `path` (created if needed); HF PEFT loads the methods it has with
    PeftModel.from_pretrained(base_model, path). An adapter combining methods writes each part into its own
    subdirectory, named after the part's peft_type in lower case (`path/lora`, `path/prefix_tuning`, ...)."""
    model = api.unwrap(model)
    reg = api.registry(model)
    if name not in reg.configs:
        raise ValueError(f"no adapter named {name!r}; the model has {sorted(reg.configs)}")
    config = reg.configs[name]
    parts = list(config) if isinstance(config, tuple) else [config]
    written = [next(f for f in FORMATS if isinstance(part, f.config_type)) for part in parts]
    if isinstance(config, tuple):
        # A single adapter's save removes nothing: its top-level files are what loading reads, and the
        # subdirectories may be HF PEFT's other adapters (`path/<adapter name>`, a name that can be "lora").
        _clear_other_layout(path, [fmt.peft_type.lower() for fmt in written])
    for part, fmt in zip(parts, written):
        tensors, file_config = fmt.dump(model, name, part)
        if not isinstance(config, tuple):   # a combined adapter's parts load here only (each part's own copies)
            with_task_modules(model, tensors, file_config)
        write(os.path.join(path, fmt.peft_type.lower()) if isinstance(config, tuple) else path,
              tensors, file_config)


def _clear_other_layout(path, part_dirs: list[str]) -> None:
    """Before saving a combined adapter with parts `part_dirs` into `path`: the adapter files an earlier save
    there left that this one would not overwrite and load_adapter would read (a single adapter's top-level files,
    which loading prefers to the parts; part directories of methods this one lacks)."""
    stale = [os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)]
    for fmt in FORMATS:
        sub = fmt.peft_type.lower()
        if sub not in part_dirs:
            stale += [os.path.join(path, sub, CONFIG_NAME), os.path.join(path, sub, WEIGHTS_NAME)]
    for file in stale:
        if os.path.isfile(file):
            os.remove(file)
            folder = os.path.dirname(file)
            if folder != os.fspath(path) and not os.listdir(folder):
                os.rmdir(folder)


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default", *, revision: str | None = None,
                 subfolder: str | None = None) -> str:
    """Add the adapter stored in the directory `path` (written by save_adapter or by HF PEFT) as `name`;
    it becomes active if it is the model's first. Returns `name`. A directory without adapter_config.json whose
    subdirectories hold adapters (as save_adapter writes a combined adapter) loads them as one adapter.
    `path` may also be a Hugging Face Hub repo id ("org/name", at `revision`), as in PeftModel.from_pretrained;
    `subfolder`: the adapter's directory inside `path`.

    Raises FileNotFoundError for a missing file and ValueError for anything that does not fit (bad JSON or
    safetensors, an unsupported peft_type, PEFT features this engine lacks, missing, extra or misshapen
    tensors); the model is then left as it was.
    """
    model = api.unwrap(model)
    api.check_new_name(model, name)
    dirs = _part_dirs(locate(path, revision, subfolder))
    parts = []
    for part_dir in dirs:
        raw, file = read_json(part_dir)
        fmt = _format(raw, file)
        parts.append((fmt, fmt.read_config(raw, file), part_dir))
    configs, applies = [config for _, config, _ in parts], []
    for i, (fmt, config, part_dir) in enumerate(parts):
        others = [n for j, c in enumerate(configs) if j != i for n in (getattr(c, "modules_to_save", None) or [])]
        applies.append(fmt.match(model, config, read_tensors(part_dir), part_dir, others))
    api.add_adapter(model, name, configs[0] if len(configs) == 1 else configs)
    undos = []
    try:
        with torch.no_grad():
            for apply in applies:
                undos.append(apply(name))
    except BaseException:
        with torch.no_grad():
            for undo in reversed(undos):
                undo()
        api.remove_adapter(model, name)
        raise
    return name


def read_config(path: str | os.PathLike, *, revision: str | None = None, subfolder: str | None = None):
    """The adapter config in `path`/adapter_config.json (a LoraConfig, PrefixConfig, ...; a tuple of them for
    a combined adapter's directory); `path`, `revision`, `subfolder` as in load_adapter."""
    configs = []
    for part_dir in _part_dirs(locate(path, revision, subfolder)):
        raw, file = read_json(part_dir)
        configs.append(_format(raw, file).read_config(raw, file))
    return configs[0] if len(configs) == 1 else tuple(configs)


def _part_dirs(path: str | os.PathLike) -> list[str]:
    """[path] for one adapter; the subdirectories holding an adapter config for a combined one."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        # In the order add_adapter keeps a combined adapter's parts (inject.METHODS'), so a round trip keeps it.
        methods = list(inject.METHODS)
        rank = {fmt.peft_type.lower(): methods.index(fmt.config_type) for fmt in FORMATS}
        parts = [os.path.join(path, d) for d in sorted(os.listdir(path), key=lambda d: (rank.get(d, len(rank)), d))
                 if os.path.isfile(os.path.join(path, d, CONFIG_NAME))]
        if parts:
            return parts
    return [os.fspath(path)]


def _format(raw: dict, file: str) -> Format:
    for fmt in FORMATS:
        if raw.get("peft_type") == fmt.peft_type:
            return fmt
    known = ", ".join(repr(f.peft_type) for f in FORMATS)
    raise ValueError(f"{file}: peft_type {raw.get('peft_type')!r} is not supported (only {known})")
