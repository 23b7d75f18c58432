"""Adapter configurations: what to adapt, how big, and which extra parameters train with the adapter."""
from __future__ import annotations

import math
from dataclasses import dataclass

BIAS_MODES = ("none", "all", "lora_only")
ALL_LINEAR = "all-linear"


@dataclass
class LoraConfig:
    """A LoRA adapter, with the meaning HF PEFT gives the same fields.

    r: rank of the update B A.  alpha: the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora).
    dropout: dropout probability on the LoRA branch's input, in training only.
    target_modules: which modules get LoRA —
      a list of names, each matching a module whose dotted name equals it or ends with "." + it ("q_proj");
      a string: a regular expression that must match the whole dotted name (re.fullmatch);
      "all-linear": every nn.Linear / GPT-2 Conv1D except the output head (`lm_head`, the output embeddings);
      None: the per-architecture default for the model's `config.model_type` (see inject.DEFAULT_TARGET_MODULES).
    layers_to_transform: only modules in these layer indices (the N in ".layers.N.", ".h.N." or ".layer.N.");
      not with a regex (PEFT rejects that combination too).
    bias: which base biases train with the adapter — "none", "all" (every bias of the model), or "lora_only"
      (the biases of the layers that carry this adapter).
    modules_to_save: names (matched like target_modules) of modules of which the adapter trains and saves a full
      copy; the original module is kept and used whenever the adapter is not active.
    """
    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    layers_to_transform: int | list[int] | None = None
    use_rslora: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise ValueError(f"LoraConfig.alpha must be a finite number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be a probability in [0, 1), got {self.dropout!r}")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"LoraConfig.bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"LoraConfig.use_rslora must be a bool, got {self.use_rslora!r}")
        self.target_modules = _names_or_pattern("target_modules", self.target_modules)
        if isinstance(self.modules_to_save, str):
            raise ValueError("LoraConfig.modules_to_save must be a list of module names, not a string")
        self.modules_to_save = _names_or_pattern("modules_to_save", self.modules_to_save)
        self.layers_to_transform = _layer_indices(self.layers_to_transform)
        if self.layers_to_transform is not None and isinstance(self.target_modules, str) \
                and self.target_modules != ALL_LINEAR:
            raise ValueError("LoraConfig.layers_to_transform cannot be combined with a regex target_modules; "
                             "put the layer indices in the regex instead")

    @property
    def scale(self) -> float:
        """The factor on B A: alpha / r, or alpha / sqrt(r) with rank-stabilized LoRA."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def _names_or_pattern(what: str, value):
    """None, a string (kept as is), or a list of non-empty names (tuples and sets become sorted lists)."""
    if value is None or isinstance(value, str):
        if value == "":
            raise ValueError(f"LoraConfig.{what} must not be an empty string")
        return value
    if isinstance(value, (set, frozenset)):
        value = sorted(value)
    if not isinstance(value, (list, tuple)) or not all(isinstance(n, str) and n for n in value):
        raise ValueError(f"LoraConfig.{what} must be a list of module names, a regex string or None, "
                         f"got {value!r}")
    if not value:
        raise ValueError(f"LoraConfig.{what} must not be an empty list (use None)")
    return list(value)


def _layer_indices(value):
    if value is None:
        return None
    items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(items, (list, tuple)) or not items \
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
        raise ValueError(f"LoraConfig.layers_to_transform must be a non-negative int or a non-empty list of them, "
                         f"got {value!r}")
    return value if isinstance(value, int) else list(value)
