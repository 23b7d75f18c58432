"""What every adapter file format shares: the two file names, PEFT's key prefix, reading and writing them, and
the modules_to_save copies (which PEFT files the same way for every method)."""
from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ptlm_engine import inject
from ptlm_engine.layers import AdapterLayer, LoraLinear, ModulesToSave

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."   # PeftModel -> the method's model wrapper (.base_model) -> the model (.model)


@dataclasses.dataclass(frozen=True)
class Format:
    """One method's file layout.

    peft_type: the config's "peft_type" value; config_type: the config class it stands for.
    read_config(raw, file) -> config: the config from the parsed JSON (ValueError naming `file` if it does
      not fit).
    dump(model, name, config) -> (tensors, json): the adapter's tensors by file key and its JSON config.
    match(model, config, tensors, path, others_saved) -> apply: check every tensor against the model before
      anything changes (ValueError listing the problems, see TensorMatcher; others_saved: the modules_to_save of
      a combined adapter's other parts, whose copies their files hold); `apply(name)`, called under no_grad once
      the API has added adapter `name` from `config`, copies the tensors into its parameters and returns
      `undo()`, which restores whatever outside the adapter it overwrote (load_adapter calls it, and removes
      the adapter, if a later step fails; apply undoes its own partial writes if it raises).
    """
    peft_type: str
    config_type: type
    read_config: Callable[[dict, str], Any]
    dump: Callable[[nn.Module, str, Any], tuple[dict[str, Tensor], dict]]
    match: Callable[[nn.Module, Any, dict[str, Tensor], str], Callable[[str], Callable[[], None]]]


def key(module_path: str, leaf: str, prefix: str = PREFIX) -> str:
    """The file key of `leaf` (e.g. "lora_A.weight") in the module `module_path` ("" for the model itself);
    `prefix`: the model's place in PEFT's model (PREFIX, or PROMPT_LEARNING_PREFIX for prompt-learning files)."""
    return f"{prefix}{module_path}.{leaf}" if module_path else f"{prefix}{leaf}"


def locate(path: str | os.PathLike, revision: str | None = None, subfolder: str | None = None) -> str:
    """The local directory of an adapter: `path` (and its `subfolder`) where it is a directory; else, where
    `path` reads as a Hugging Face Hub repo id ("org/name"), its adapter files at `revision` (and `subfolder`),
    fetched into the Hub's local cache (huggingface_hub; offline, what the cache holds). Anything else comes back
    as given, for the readers to report missing."""
    if os.path.isdir(path) or not isinstance(path, str) or not _HUB_ID.fullmatch(path):
        return os.path.join(path, subfolder) if subfolder else os.fspath(path)
    from huggingface_hub import snapshot_download   # transformers' own dependency
    inside = f"{subfolder.strip('/')}/" if subfolder else ""
    patterns = [f"{inside}{glob}{name}" for glob in ("", "*/") for name in (CONFIG_NAME, WEIGHTS_NAME)]
    try:
        local = snapshot_download(path, revision=revision, allow_patterns=patterns)
    except Exception as e:   # huggingface_hub raises its own errors for unknown repos, revisions and no network
        raise FileNotFoundError(f"{path}: no such directory, and the Hugging Face Hub could not provide it "
                                f"({type(e).__name__}: {e})") from e
    return os.path.join(local, inside) if inside else local


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")   # "org/name": what a relative local path rarely is


def read_json(path: str | os.PathLike) -> tuple[dict, str]:
    """The parsed `path`/adapter_config.json and its file name."""
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
    return raw, file


def read_tensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """The adapter's tensors: adapter_model.safetensors, else the pickled adapter_model.bin that PEFT writes with
    safe_serialization=False (and before 0.6 always), read as PEFT does with weights only."""
    file = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(file):
        pickled = os.path.join(path, PICKLED_WEIGHTS_NAME)
        if os.path.isfile(pickled):
            return _read_pickled(pickled)
        raise FileNotFoundError(f"no adapter weights: neither {file} nor {PICKLED_WEIGHTS_NAME} there")
    try:
        return load_file(file)
    except Exception as e:   # safetensors raises its own error types for truncated or garbled files
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from e


def _read_pickled(file: str) -> dict[str, Tensor]:
    try:
        tensors = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:   # unpickling raises many types for garbled files or disallowed objects
        raise ValueError(f"{file}: not a readable torch.save file of tensors ({e})") from e
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                for k, v in tensors.items()):
        raise ValueError(f"{file}: expected a dict of tensors by name, got {type(tensors).__name__}")
    return tensors


def write(path: str | os.PathLike, tensors: dict[str, Tensor], config: dict) -> None:
    # Own contiguous CPU copies: safetensors refuses tensors that share memory (tied weights in a copy). A tensor
    # sharded by FSDP2 (a DTensor) is gathered whole first (a collective: every rank saves, as with FSDP's state
    # dicts).
    tensors = {k: _whole(v).detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
               for k, v in tensors.items()}
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        # top-level keys sorted, as PEFT writes them; nested dicts in their order: the first rank_pattern /
        # alpha_pattern key that matches a module decides, so their order is part of the adapter
        json.dump(dict(sorted(config.items())), f, indent=2)


def _whole(t: Tensor) -> Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def saved_copies(model: nn.Module, name: str, names: list[str] | None) -> dict[str, Tensor]:
    """Adapter `name`'s copies of the modules_to_save `names` (one part's, of a combined adapter: each part's file
    holds its own) by file key: each copy's state dict under its module's path."""
    paths = set(inject.find_modules_to_save(model, names)) if names else set()
    return {key(p, k): v for p, wrapper in inject.saved_modules(model) if p in paths
            for k, v in wrapper.modules_to_save[name].state_dict().items()}


# The modules PEFT's prompt-learning task models add to modules_to_save (PeftModelForSequenceClassification,
# ...ForTokenClassification, ...ForQuestionAnswering), whatever the config says.
TASK_MODULES = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"],
                "QUESTION_ANS": ["qa_outputs"]}
PROMPT_LEARNING = ("PROMPT_TUNING", "PREFIX_TUNING")
PROMPT_LEARNING_PREFIX = "base_model."   # their modules_to_save keys: the model directly under the PeftModel


def with_task_modules(model: nn.Module, tensors: dict[str, Tensor], config: dict) -> None:
    """A single prompt-learning adapter's file (tensors and JSON config, completed in place) as PEFT's task model
    loads it: that model adds the task's modules (TASK_MODULES) to modules_to_save and loads a copy of each from
    the file, so a module the adapter keeps no copy of is filed with its base values (a copy of the base module
    computes what it does) and named in modules_to_save."""
    if config.get("peft_type") not in PROMPT_LEARNING:
        return
    names = list(config.get("modules_to_save") or [])
    added = [n for n in TASK_MODULES.get(config.get("task_type"), []) if n not in names]
    paths: list[str] = []
    for path, module in model.named_modules():      # PEFT's plain-suffix match; a match covers what it holds
        if path and any(path.endswith(n) for n in added) and not any(path.startswith(p + ".") for p in paths):
            paths.append(path)
    taken = [n for n in added if any(p.endswith(n) for p in paths)]
    if not taken:
        return
    for path in paths:
        module = model.get_submodule(path)
        if isinstance(module, (ModulesToSave, LoraLinear)):
            module = module.original_module             # the base module (another adapter's copy or LoRA aside)
        elif isinstance(module, AdapterLayer):
            continue
        for k, v in module.state_dict().items():
            tensors.setdefault(PROMPT_LEARNING_PREFIX + f"{path}.{k}", v)
    config["modules_to_save"] = [*names, *taken]


class TensorMatcher:
    """Pairs file tensors with their places in a model before anything changes: `take` pops a key and checks
    its shape, collecting every problem; `check` raises one ValueError listing them all and the unused keys."""

    def __init__(self, tensors: dict[str, Tensor]):
        self.remaining = dict(tensors)
        self.problems: list[str] = []

    def take(self, file_key: str, shape: tuple[int, ...]) -> Tensor | None:
        value = self.remaining.pop(file_key, None)
        if value is None:
            self.problems.append(f"missing {file_key}")
        elif tuple(value.shape) != tuple(shape):
            self.problems.append(f"{file_key}: shape {tuple(value.shape)}, the model needs {tuple(shape)}")
        elif not value.dtype.is_floating_point:
            self.problems.append(f"{file_key}: dtype {value.dtype} is not floating point")
        else:
            return value
        return None

    def copies(self, model: nn.Module, saved: list[str], prefix: str = PREFIX) -> dict[str, dict[str, Tensor]]:
        """The modules_to_save copies' state dicts, by module path (file keys under `prefix`, see key())."""
        copies = {}
        for target in saved:
            module = model.get_submodule(target)
            original = module.original_module if isinstance(module, ModulesToSave) else module   # another adapter's
            copies[target] = {k: self.take(key(target, k, prefix), value.shape)
                              for k, value in original.state_dict().items()}
        # PEFT also files entries of a modules_to_save module as <module>.original_module.<key> and
        # <module>.modules_to_save.<key> where it saves the module's whole state besides the copy (LoRA's bias
        # "all" for biases, save_embedding_layers for a copied embedding / LM head): the base's own, and a
        # duplicate of the copy's. Neither is loaded (as the copy's own keys are).
        duplicates = tuple(key(target, leaf, prefix) for target in saved
                           for leaf in ("original_module.", "modules_to_save."))
        for k in [k for k in self.remaining if duplicates and k.startswith(duplicates)]:
            del self.remaining[k]
        return copies

    def check(self, path, model: nn.Module) -> None:
        problems = self.problems + [f"unexpected {k}" for k in sorted(self.remaining)]
        if problems:
            shown = "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else "")
            raise ValueError(f"{path}: the adapter does not fit this {type(model).__name__} "
                             f"({len(problems)} problem(s)):\n  {shown}")


def load_copies(model: nn.Module, name: str, copies: dict[str, dict[str, Tensor]]) -> None:
    for target, state in copies.items():
        model.get_submodule(target).modules_to_save[name].load_state_dict(state)


# ------------------------------------------------------------------------------- base embedding tables
# Module names whose base weights PEFT files with an adapter (its EMBEDDING_LAYER_NAMES: save_embedding_layers,
# on by default where a LoRA's target_modules names one of them, or where the vocabulary was resized).
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def embedding_weights(model: nn.Module, match: TensorMatcher, prefix: str = PREFIX) -> list:
    """[(base weight Parameter, value)] for the base embedding / LM-head weights the file holds (PEFT's
    save_embedding_layers, for every method; PeftModel.from_pretrained writes them into the model): under
    `prefix`<module>.base_layer.weight where PEFT's LoRA layer wrapped the module, else `prefix`<module>.weight
    (`prefix` as in key())."""
    # PEFT files the tables by the model's own names (GPT-2's transformer.wte, BERT's word_embeddings, T5's
    # shared): the model's input and output embeddings, whatever their names.
    tables = [get() for get in (getattr(model, n, None) for n in ("get_input_embeddings", "get_output_embeddings"))
              if callable(get)]
    found = []
    for k in list(match.remaining):
        if not (k.startswith(prefix) and k.endswith(".weight")):
            continue
        path = k.removeprefix(prefix).removesuffix(".weight").removesuffix(".base_layer")
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue                                   # not a module of this model: reported as unexpected
        if path.rsplit(".", 1)[-1] not in EMBEDDING_LAYER_NAMES and not any(module is t for t in tables):
            continue
        weight = module._parameters.get("weight") if not isinstance(module, ModulesToSave) else None
        if isinstance(weight, nn.Parameter):
            found.append((weight, match.take(k, weight.shape)))
    return found


def overwrite(writes: list[tuple[nn.Parameter, Tensor]], load: Callable[[], None]) -> Callable[[], None]:
    """Call `load()` (which fills the new adapter's own parameters), then copy each value of `writes` into its
    base parameter (biases, embedding tables; under no_grad, as Format.apply runs); returns undo(), which
    restores those base parameters, and restores them itself before re-raising if any step fails."""
    old_values = [(param, param.detach().clone()) for param, _ in writes]

    def undo():
        for param, value in old_values:
            param.copy_(value)
    try:
        load()
        for param, value in writes:
            param.copy_(value)
    except BaseException:
        undo()
        raise
    return undo
