"""Where bottleneck adapters go, per architecture (by `model.config.model_type`), and attaching them there.

Every block (the N in ".layers.N", ".h.N", ".layer.N") has an attention site and an FFN site. A site names the
module whose output the adapter changes (`at`: the BottleneckLayer becomes its child and hooks it) and the
sub-layer whose input a parallel adapter reads (`reads`), both relative to the block:

- Llama-like decoders: `self_attn` (its output is o_proj's; the tuple's first element) and `mlp` (down_proj's
  output). The sub-layer modules are hooked rather than o_proj / down_proj themselves, so that LoRA can still wrap
  those projections (its wrapper replaces the module object, which would drop hooks on it).
- GPT-2: `attn` and `mlp`: c_proj's output after the residual dropout, where AdapterHub applies them too.
- BERT-likes: `attention.output.dropout` and `output.dropout`: the dense projection's output after its dropout,
  before the residual add and LayerNorm, exactly where AdapterHub's BertSelfOutput / BertOutput call their
  adapters; a parallel adapter reads the input of `attention` / `intermediate` (the residual input).

Placements: "houlsby" uses both sites, "pfeiffer" the FFN site only, "parallel" both sites with the adapter
reading the sub-layer's input (He et al., 2022; for pre-LN models that is the normalised input the sub-layer
itself reads, where AdapterHub's parallel adapter reads the block's residual stream instead).
"""
from __future__ import annotations

import dataclasses
import re

from torch import nn

from ptlm_engine.config import BottleneckConfig
from ptlm_engine.layers import AdapterLayer
from ptlm_engine.layers.bottleneck import LAYER_NAME, BottleneckLayer


@dataclasses.dataclass(frozen=True)
class Site:
    at: str      # the module whose output the adapter changes, relative to the block
    reads: str   # the sub-layer whose input a parallel adapter reads, relative to the block


@dataclasses.dataclass(frozen=True)
class BlockSites:
    attention: Site
    ffn: Site


_DECODER = BlockSites(attention=Site("self_attn", "self_attn"), ffn=Site("mlp", "mlp"))
_GPT2 = BlockSites(attention=Site("attn", "attn"), ffn=Site("mlp", "mlp"))
_BERT = BlockSites(attention=Site("attention.output.dropout", "attention"),
                   ffn=Site("output.dropout", "intermediate"))

SITES: dict[str, BlockSites] = {
    **dict.fromkeys(["llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"],
                    _DECODER),
    "gpt2": _GPT2,
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra"], _BERT),
}

PLACEMENT_SITES: dict[str, tuple[str, ...]] = {
    "houlsby": ("attention", "ffn"),
    "pfeiffer": ("ffn",),
    "parallel": ("attention", "ffn"),
}

_BLOCK = re.compile(r"(?:.*\.)?(?:layers|h|layer)\.(\d+)")


def _block_sites(model: nn.Module) -> BlockSites:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SITES:
        raise ValueError(f"bottleneck adapters have no placement table for model_type {model_type!r} "
                         f"({type(model).__name__}); supported: {', '.join(sorted(SITES))}")
    return SITES[model_type]


def _blocks(model: nn.Module) -> dict[int, str]:
    """Block index -> the block's dotted name (the first one found per index)."""
    blocks: dict[int, str] = {}
    for name, _ in model.named_modules():
        match = _BLOCK.fullmatch(name)
        if match is not None:
            blocks.setdefault(int(match.group(1)), name)
    return blocks


def _covered(path: str, names: list[str]) -> bool:
    """The module `path` or one containing it matches a modules_to_save name (PEFT's list rule)."""
    parts = path.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(p == n or p.endswith("." + n) for p in prefixes for n in names)


def _check_reachable(model: nn.Module, path: str) -> None:
    """The module exists and lies inside no adapter layer (a LoRA or modules_to_save wrapper would hide the
    bottleneck layer from the API, or not call the module at all)."""
    module, parts = model, path.split(".")
    for i, part in enumerate(parts):
        module = module._modules.get(part)
        if module is None:
            raise ValueError(f"bottleneck adapter: {type(model).__name__} has no module {path!r} "
                             f"(expected from its model_type's placement table)")
        if isinstance(module, AdapterLayer):
            raise ValueError(f"bottleneck adapter: {path!r} lies inside {'.'.join(parts[:i + 1])!r}, a "
                             f"{type(module).__name__}; add the bottleneck adapter before wrapping that module")


def find_bottleneck_targets(model: nn.Module, config: BottleneckConfig) -> list[str]:
    """The paths of the BottleneckLayers the config puts in the model (`<site>.ptlm_bottleneck`). Raises
    ValueError for an unsupported model_type, layer indices the model lacks, a module missing from the model, or
    a site hidden inside another adapter layer or inside the config's modules_to_save."""
    table = _block_sites(model)
    blocks = _blocks(model)
    if not blocks:
        raise ValueError(f"bottleneck adapter: found no blocks ('.layers.N', '.h.N', '.layer.N') in "
                         f"{type(model).__name__}")
    layers = config.layers_to_transform
    layers = sorted(blocks) if layers is None else [layers] if isinstance(layers, int) else sorted(set(layers))
    missing = [i for i in layers if i not in blocks]
    if missing:
        raise ValueError(f"BottleneckConfig.layers_to_transform {missing} not among the model's blocks "
                         f"{min(blocks)}..{max(blocks)}")
    targets = []
    for index in layers:
        for kind in PLACEMENT_SITES[config.placement]:
            site: Site = getattr(table, kind)
            for path in (f"{blocks[index]}.{site.at}", f"{blocks[index]}.{site.reads}"):
                _check_reachable(model, path)
                if _covered(path, config.modules_to_save or []):
                    raise ValueError(f"bottleneck adapter: {path!r} lies inside a module of modules_to_save "
                                     f"{config.modules_to_save!r}")
            targets.append(f"{blocks[index]}.{site.at}.{LAYER_NAME}")
    return targets


def _reads(model: nn.Module, layer_path: str) -> str:
    """The sub-layer a parallel adapter at `layer_path` reads: the site whose `at` suffix leaves a block name."""
    at = layer_path.rpartition(".")[0]
    table = _block_sites(model)
    for site in (table.attention, table.ffn):
        block = at.removesuffix("." + site.at)
        if block != at and _BLOCK.fullmatch(block):
            return f"{block}.{site.reads}"
    raise ValueError(f"bottleneck adapter: {layer_path!r} is no site of the placement table")


def attach_bottleneck(model: nn.Module, path: str, name: str, config: BottleneckConfig, slot: int) -> None:
    """Add adapter `name` to the BottleneckLayer at `path`, creating it (and its hooks) on first use. The
    sub-layer's first parameter (its first projection's weight) gives the base dtype and the device."""
    at = path.rpartition(".")[0]
    site = model.get_submodule(at)
    reads = model.get_submodule(_reads(model, path))
    layer = site._modules.get(LAYER_NAME)
    if layer is None:
        layer = BottleneckLayer(site, reads, model.config.hidden_size)
        layer.train(site.training)
        site.add_module(LAYER_NAME, layer)
    base = next(reads.parameters())
    layer.add_adapter(name, config.bottleneck, config.act, config.scale, config.placement == "parallel", slot,
                      device=base.device, base_dtype=base.dtype, layer_norm=config.layer_norm)
