"""Adapter configurations: what to adapt, how big, and which extra parameters train with the adapter."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

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
    layers_to_transform: only modules in these layer indices: the N of the first ".<name>.N." in a module's
      dotted name, or of the first "<layers_pattern>.N." with layers_pattern (e.g. "blocks"); not with a regex
      (PEFT rejects that combination too). A target_modules entry equal to a module's whole dotted name takes it
      in any layer, as in PEFT.
    layers_pattern: the name(s) of the model's block list, for layers_to_transform.
    bias: which base biases train with the adapter — "none", "all" (every bias of the model), or "lora_only"
      (the biases of the layers that carry this adapter).
    modules_to_save: names of modules of which the adapter trains and saves a full copy; the original module is
      kept and used whenever the adapter is not active. As in PEFT, a name matches every module whose dotted name
      ends with it, dot or not ("norm" also takes each "input_layernorm").
    rank_pattern / alpha_pattern: {regex: rank} / {regex: alpha} for the modules that differ from r / alpha; a
      module takes the first key that matches the end of its dotted name at a dot (PEFT's get_pattern_key:
      re.match(r"(.*\\.)?(key)$", name)), e.g. {"v_proj": 16, r"layers\\.0\\.self_attn\\.q_proj": 4}.
    exclude_modules: modules never targeted, matched as target_modules (names or a regex).
    """
    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    layers_to_transform: int | list[int] | None = None
    layers_pattern: list[str] | str | None = None
    use_rslora: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    exclude_modules: list[str] | str | None = None

    def __post_init__(self):
        _positive("LoraConfig.r", self.r)
        if not _finite(self.alpha):
            raise ValueError(f"LoraConfig.alpha must be a finite number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be a probability in [0, 1), got {self.dropout!r}")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"LoraConfig.bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"LoraConfig.use_rslora must be a bool, got {self.use_rslora!r}")
        self.target_modules = _names_or_pattern("LoraConfig.target_modules", self.target_modules)
        if isinstance(self.target_modules, str) and self.target_modules.lower() == ALL_LINEAR:
            self.target_modules = ALL_LINEAR                            # PEFT reads it in any case
        if isinstance(self.modules_to_save, str):
            raise ValueError("LoraConfig.modules_to_save must be a list of module names, not a string")
        self.modules_to_save = _names_or_pattern("LoraConfig.modules_to_save", self.modules_to_save)
        self.layers_to_transform = _layer_indices(self.layers_to_transform, "LoraConfig")
        self.layers_pattern = _names_or_pattern("LoraConfig.layers_pattern", self.layers_pattern)
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ValueError("LoraConfig.layers_pattern needs layers_to_transform (it only says where layer indices "
                             "are)")
        self.rank_pattern = _pattern_dict("LoraConfig.rank_pattern", self.rank_pattern, _positive_int,
                                          "a positive integer")
        self.alpha_pattern = _pattern_dict("LoraConfig.alpha_pattern", self.alpha_pattern, _finite,
                                           "a finite number")
        self.exclude_modules = _names_or_pattern("LoraConfig.exclude_modules", self.exclude_modules)
        if self.layers_to_transform is not None and isinstance(self.target_modules, str) \
                and self.target_modules != ALL_LINEAR:
            raise ValueError("LoraConfig.layers_to_transform cannot be combined with a regex target_modules; "
                             "put the layer indices in the regex instead")

    @property
    def scale(self) -> float:
        """The factor on B A of a module without a pattern: alpha / r, or alpha / sqrt(r) with rank-stabilized
        LoRA."""
        return self._scaling(self.alpha, self.r)

    def rank_for(self, module: str) -> int:
        """The rank of the module with dotted name `module` (rank_pattern, else r)."""
        key = pattern_key(self.rank_pattern, module)
        return self.r if key is None else self.rank_pattern[key]

    def scale_for(self, module: str) -> float:
        """The factor on B A of the module `module`: its alpha over its rank (its square root with rsLoRA), as
        PEFT's LoRA layer computes it from the patterns."""
        key = pattern_key(self.alpha_pattern, module)
        return self._scaling(self.alpha if key is None else self.alpha_pattern[key], self.rank_for(module))

    def _scaling(self, alpha: float, r: int) -> float:
        return alpha / (math.sqrt(r) if self.use_rslora else r)


def selects(key: str, module: str) -> bool:
    """Whether a rank_pattern / alpha_pattern key selects the module with dotted name `module`."""
    return re.match(rf"(.*\.)?({key})$", module) is not None


def pattern_key(patterns: dict[str, object], module: str) -> str | None:
    """The first key of rank_pattern / alpha_pattern that selects the module `module`, or None."""
    return next((key for key in patterns if selects(key, module)), None)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _pattern_dict(what: str, value, valid, expected: str) -> dict:
    """A {regex: value} dict (None: empty) whose keys compile and whose values pass `valid`."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a dict of module-name patterns, got {value!r}")
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{what}: keys must be non-empty module-name patterns, got {key!r}")
        try:
            re.compile(key)
        except re.error as e:
            raise ValueError(f"{what}: {key!r} is not a valid regular expression ({e})") from e
        if not valid(item):
            raise ValueError(f"{what}[{key!r}] must be {expected}, got {item!r}")
    return dict(value)


def _names_or_pattern(what: str, value):
    """None, a string (kept as is), or a list of non-empty names (tuples and sets become sorted lists)."""
    if value is None or isinstance(value, str):
        if value == "":
            raise ValueError(f"{what} must not be an empty string")
        return value
    if isinstance(value, (set, frozenset)):
        value = sorted(value)
    if not isinstance(value, (list, tuple)) or not all(isinstance(n, str) and n for n in value):
        raise ValueError(f"{what} must be a list of module names, a regex string or None, "
                         f"got {value!r}")
    if not value:
        raise ValueError(f"{what} must not be an empty list (use None)")
    return list(value)


def _layer_indices(value, owner: str):
    if value is None:
        return None
    items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(items, (list, tuple)) or not items \
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
        raise ValueError(f"{owner}.layers_to_transform must be a non-negative int or a non-empty list of them, "
                         f"got {value!r}")
    return value if isinstance(value, int) else list(value)


BOTTLENECK_PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
BOTTLENECK_ACTS = ("relu", "gelu", "silu")


@dataclass
class BottleneckConfig:
    """A bottleneck adapter (Houlsby et al., 2019): h <- h + scale · up(act(down(h))), down d -> m, up m -> d,
    both with biases; `up` starts at zero, so a new adapter changes nothing. 2·m·d + d + m parameters per
    adapter module (2·m·d + d + m + 2·d with layer_norm).

    placement: "houlsby" — after the attention block's output projection and after the FFN's, before each
      residual add / LayerNorm; "pfeiffer" — after the FFN's only; "parallel" — alongside the attention and FFN
      sub-layers (He et al., 2022): the adapter reads the sub-layer's input and its output, times `scale`, is
      added to the sub-layer's output.
    scale: the factor on the adapter's output (1 for the sequential placements in the papers; He et al. use 4
      for parallel adapters).
    layers_to_transform: only the blocks with these indices.
    modules_to_save: as in LoraConfig.
    layer_norm: each adapter module also has its own LayerNorm over d (weight 1, bias 0, eps 1e-5, trained) on
      its input, the residual staying the un-normalised stream (AdapterHub's `ln_before`): h + scale ·
      up(act(down(LN(h)))); parallel: sublayer(x) + scale · up(act(down(LN(x)))).
    """
    bottleneck: int = 64
    placement: str = "houlsby"
    act: str = "relu"
    scale: float = 1.0
    layers_to_transform: int | list[int] | None = None
    modules_to_save: list[str] | None = None
    layer_norm: bool = False

    def __post_init__(self):
        _positive("BottleneckConfig.bottleneck", self.bottleneck)
        if self.placement not in BOTTLENECK_PLACEMENTS:
            raise ValueError(f"BottleneckConfig.placement must be one of {BOTTLENECK_PLACEMENTS}, "
                             f"got {self.placement!r}")
        if self.act not in BOTTLENECK_ACTS:
            raise ValueError(f"BottleneckConfig.act must be one of {BOTTLENECK_ACTS}, got {self.act!r}")
        if not _finite(self.scale):
            raise ValueError(f"BottleneckConfig.scale must be a finite number, got {self.scale!r}")
        if not isinstance(self.layer_norm, bool):
            raise ValueError(f"BottleneckConfig.layer_norm must be a bool, got {self.layer_norm!r}")
        self.layers_to_transform = _layer_indices(self.layers_to_transform, "BottleneckConfig")
        if isinstance(self.modules_to_save, str):
            raise ValueError("BottleneckConfig.modules_to_save must be a list of module names, not a string")
        self.modules_to_save = _names_or_pattern("BottleneckConfig.modules_to_save", self.modules_to_save)


@dataclass
class PrefixConfig:
    """Prefix tuning (Li & Liang, 2021): per layer, num_virtual_tokens trainable key and value vectors that
    every query attends to, as HF PEFT's PrefixTuningConfig.

    projection: reparameterise the prefix through an MLP while training (PEFT's prefix_projection): an
      embedding (P, token_dim) -> Linear(token_dim, encoder_hidden_size) -> tanh -> Linear(..., layers · 2 ·
      token_dim), with PEFT's token_dim: the hidden size, or key/value heads × head_dim on grouped-query models;
      the MLP's output is what inference uses (computed once and kept) and what the adapter file holds.
    encoder_hidden_size: the MLP's width (None: token_dim, as PEFT).
    """
    num_virtual_tokens: int = 20
    projection: bool = False
    encoder_hidden_size: int | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self):
        _positive("PrefixConfig.num_virtual_tokens", self.num_virtual_tokens)
        if not isinstance(self.projection, bool):
            raise ValueError(f"PrefixConfig.projection must be a bool, got {self.projection!r}")
        if self.encoder_hidden_size is not None:
            _positive("PrefixConfig.encoder_hidden_size", self.encoder_hidden_size)
        if isinstance(self.modules_to_save, str):
            raise ValueError("PrefixConfig.modules_to_save must be a list of module names, not a string")
        self.modules_to_save = _names_or_pattern("PrefixConfig.modules_to_save", self.modules_to_save)


PROMPT_INITS = ("random", "vocab", "text")


@dataclass
class PromptConfig:
    """Prompt tuning (Lester et al., 2021): num_virtual_tokens trainable embeddings prepended to the input
    embeddings, as HF PEFT's PromptTuningConfig.

    init: "random" (standard normal, as PEFT's RANDOM), "vocab" (rows of the input embedding matrix sampled at
      random), or "text" (the embeddings of init_text's tokens, repeated / cut to num_virtual_tokens; needs
      `tokenizer`, a tokenizer object or a name/path for transformers.AutoTokenizer).
    """
    num_virtual_tokens: int = 20
    init: str = "random"
    init_text: str | None = None
    tokenizer: object = None
    modules_to_save: list[str] | None = None

    def __post_init__(self):
        _positive("PromptConfig.num_virtual_tokens", self.num_virtual_tokens)
        if self.init not in PROMPT_INITS:
            raise ValueError(f"PromptConfig.init must be one of {PROMPT_INITS}, got {self.init!r}")
        if self.init == "text" and (not self.init_text or self.tokenizer is None):
            raise ValueError("PromptConfig.init='text' needs init_text and a tokenizer")
        if isinstance(self.modules_to_save, str):
            raise ValueError("PromptConfig.modules_to_save must be a list of module names, not a string")
        self.modules_to_save = _names_or_pattern("PromptConfig.modules_to_save", self.modules_to_save)


def _positive(what: str, value) -> None:
    if not _positive_int(value):
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
