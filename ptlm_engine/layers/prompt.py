"""PromptTuning: prompt tuning (Lester et al., 2021) on any Hugging Face model that takes `inputs_embeds`, as HF
PEFT's PROMPT_TUNING: each adapter is Q trainable embeddings prepended to the input embeddings.

The layer is a child of the model (`model.ptlm_prompt`) holding only the adapters' (Q, hidden) embeddings, and a
forward pre-hook on the model that rewrites the call's keyword arguments:

- a call whose cache is empty or absent (a plain forward, generate's prefill) gets `inputs_embeds` =
  [Q virtual tokens ; the embedded input_ids (or the given inputs_embeds)], with `attention_mask` gaining Q
  leading ones, per-token `labels` Q leading -100, `token_type_ids` Q leading zeros (as PEFT's classification
  models; its causal-LM and feature-extraction models drop given token types instead), and `position_ids`
  (where given) 0 … Q−1 for the virtual tokens and p + Q for the real ones, question answering's span labels
  (start_positions / end_positions) p + Q (PEFT 0.21 leaves them pointing at the virtual tokens). Without
  position ids the model numbers the Q + L positions 0 … Q+L−1 itself: what PEFT's forward does (it drops
  given position ids, which is the same where they count 0 … L−1, as generate's do without padding). The
  outputs include the Q virtual positions, as PEFT's;
- a call with a non-empty cache continues a sequence whose cache already holds the virtual tokens (generate's
  decoding steps, chunked prefill): nothing is prepended; the mask gains the Q leading positions and given
  position ids move up by Q. (PEFT 0.21 under transformers 5 re-inserts the prompt at every step instead.) A new
  generate call given a non-empty cache (one a previous call returned) is refused by the model's generate, which
  the layer wraps: transformers would take the cached virtual tokens for input tokens and drop Q of the new
  ones before any hook sees them.

Mixed batches (pe.adapter_batch): rows run different prompt adapters (different Q), none, or another method's.
Every row is left-padded to the batch's largest Q, Qmax: row i with q_i virtual tokens is [Qmax − q_i padding
positions ; its q_i virtual tokens ; its tokens], so column Qmax + j holds token j in every row, and the row's
q_i + L valid columns compute what the row computes alone (its tokens at positions p + q_i). Padding positions
are masked (0) as keys; each copies the row's first valid position (embedding, position id, token type), so a
bidirectional encoder computes there exactly the output of that first position and a first-token pooler (BERT's
classifier) reads what the row alone would; a last-token classifier (Llama's, GPT-2's) reads a row without
virtual tokens at its last non-pad token, as alone from its input_ids; a question-answering head's padding
columns get the lowest logit, so a row's span loss is its loss alone. With causal-LM labels, the first label of
a row without virtual tokens is masked too, as alone it predicts nothing.

Per-row layouts are built on the host from the batch's mapping, once per (device, batch size): no device->host
sync. Cache lengths come from `cache.get_seq_length()` (a host int for dynamic caches, which HF reads too).
Static (compileable) caches and 4-D masks are rejected: generate sizes and masks them without the prompt.

The hook is registered first among the model's pre-hooks, so a later one (prefix tuning, which moves every
position by its prefix length P) sees the whole [virtual ; real] sequence.
"""
from __future__ import annotations

import inspect
import math
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ptlm_engine.config import PromptConfig
from ptlm_engine.layers.base import AdapterLayer
from ptlm_engine.layers.lora import adapter_dtype
from ptlm_engine.layers.positions import position_rule

LAYER_NAME = "ptlm_prompt"   # the layer's attribute on the model
# On an attention mask the layer extends by a layout's block: that _Layout's `unused` (a tuple, host ints), for
# prefix tuning's sliding-window check (layers.prefix), which must not count columns a row masks out for the layout.
UNUSED_COLUMNS = "_ptlm_prompt_unused_columns"

# Heads whose labels are per sequence (left as they are); causal-LM heads shift per-token labels by one.
_SEQUENCE_HEADS = ("ForSequenceClassification", "ForMultipleChoice", "ForNextSentencePrediction")
_CAUSAL_HEADS = ("ForCausalLM", "LMHeadModel")
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def task_type(model: nn.Module) -> str:
    """PEFT's task_type for the model's head (its class name), which decides how PEFT treats labels."""
    name = type(model).__name__
    if name.endswith(_CAUSAL_HEADS):
        return "CAUSAL_LM"
    for suffix, task in (("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
                         ("ForQuestionAnswering", "QUESTION_ANS")):
        if name.endswith(suffix):
            return task
    return "FEATURE_EXTRACTION"


# -------------------------------------------------------------------------------------------- initialisation
def _tokenizer(config: PromptConfig):
    if not isinstance(config.tokenizer, str):
        return config.tokenizer
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(config.tokenizer)
    except (OSError, ValueError) as e:
        raise ValueError(f"PromptConfig.tokenizer {config.tokenizer!r} could not be loaded ({e})") from e


def text_token_ids(config: PromptConfig, vocab_size: int) -> list[int]:
    """init_text's token ids (with the tokenizer's special tokens, as PEFT), repeated / cut to Q."""
    ids = list(_tokenizer(config)(config.init_text)["input_ids"])
    if not ids or not all(isinstance(i, int) and 0 <= i < vocab_size for i in ids):
        raise ValueError(f"PromptConfig.init_text tokenizes to {ids!r}: need at least one token id below the "
                         f"model's vocabulary size {vocab_size}")
    q = config.num_virtual_tokens
    return (ids * math.ceil(q / len(ids)))[:q]


def initial_prompt(embeddings: nn.Module, config: PromptConfig) -> Tensor:
    """(Q, hidden) float32 on the device of `embeddings` (the model's input embedding module), as PEFT's
    PromptEmbedding: "random" N(0, 1) (an nn.Embedding's init), "vocab" the embeddings of randomly drawn token
    ids, "text" those of init_text's tokens: the module's outputs, as PEFT takes them (Gemma's scale its rows by
    sqrt(hidden)), without autograd. The N(0, 1) values are drawn on the CPU in every mode and before the token
    ids, as PEFT draws them, so the same seed gives PEFT's values."""
    weight = embeddings.weight
    q, (vocab_size, hidden) = config.num_virtual_tokens, weight.shape
    prompt = torch.randn(q, hidden)
    if config.init == "random":
        return prompt.to(weight.device)
    if config.init == "vocab":
        ids = torch.randint(0, vocab_size, (q,), dtype=torch.long)
    else:
        ids = torch.tensor(text_token_ids(config, vocab_size), dtype=torch.long)
    with torch.no_grad():
        return embeddings(ids.to(weight.device)).float()


# ------------------------------------------------------------------------------------------- per-row layout
@dataclass(frozen=True)
class _Layout:
    """Where each row's virtual tokens go, for one (device, batch size, mapping).

    names: the prompt adapters in the order their embeddings are concatenated into the gather table, after
      which come the rows' first real embeddings (the padding copied by rows without virtual tokens).
    qmax: the width of the virtual block; padded: whether any row has fewer than qmax virtual tokens.
    index (n, qmax): each block position's row of the gather table.
    mask (n, qmax) bool: True at virtual tokens, False at padding.
    positions (n, qmax): the virtual tokens' positions 0 … q_i−1 (0 at padding).
    copies_first_token (n, 1) bool: rows without virtual tokens, whose padding copies their first token.
    shift (n, 1): q_i, what each row's real positions move up by.
    unused: Qmax − q_i per row, on the host: the padding columns the layout puts before a row's virtual tokens.
    """
    names: tuple[str, ...]
    qmax: int
    padded: bool
    index: Tensor
    mask: Tensor
    positions: Tensor
    copies_first_token: Tensor
    shift: Tensor
    unused: tuple[int, ...]


def _layout(row_names: list[str | None], lengths: dict[str, int], device: torch.device) -> _Layout:
    names = tuple(dict.fromkeys(name for name in row_names if name is not None))
    offsets, total = {}, 0
    for name in names:
        offsets[name], total = total, total + lengths[name]
    qs = [0 if name is None else lengths[name] for name in row_names]
    qmax = max(qs)
    index, mask, positions = [], [], []
    for row, (name, q) in enumerate(zip(row_names, qs)):
        pad = qmax - q
        first = total + row if name is None else offsets[name]
        index.append([first] * pad + [first + j for j in range(q)])
        mask.append([False] * pad + [True] * q)
        positions.append([0] * pad + list(range(q)))
    with torch.inference_mode(False):   # kept across calls (see pool.AdapterPool)
        def tensor(values, dtype=torch.long):
            return torch.tensor(values, dtype=dtype, device=device)
        return _Layout(names, qmax, min(qs) < qmax, tensor(index), tensor(mask, torch.bool), tensor(positions),
                       tensor([[q == 0] for q in qs], torch.bool), tensor([[q] for q in qs]),
                       tuple(qmax - q for q in qs))


def _extended_mask(layout: _Layout, mask: Tensor) -> Tensor:
    """[the layout's block mask ; `mask`], noting on it (UNUSED_COLUMNS) each row's unused leading columns."""
    extended = torch.cat([layout.mask.to(mask.dtype), mask], dim=1)
    setattr(extended, UNUSED_COLUMNS, layout.unused)
    return extended


def _cache_length(cache) -> int:
    if cache is None:
        return 0
    if isinstance(cache, (tuple, list)):                      # legacy ((key, value), ...) per layer
        return cache[0][0].shape[-2] if len(cache) else 0
    if getattr(cache, "is_compileable", False):
        raise ValueError("prompt tuning needs a dynamic cache: a static (compileable) cache is sized and masked "
                         "without the virtual tokens")
    return cache.get_seq_length()


class _PromptGenerate:
    """A prompt-tuned model's generate (an instance attribute while the layer exists; holding the model weakly, as
    base_ops' forwards do, and rebuilt for a copy): refuses a non-empty cache where a prompt adapter applies."""

    def __init__(self, model: nn.Module):
        self._model = weakref.ref(model)

    def __call__(self, *args, **kwargs):
        model = self._model()
        layer = getattr(model, LAYER_NAME, None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if isinstance(layer, PromptTuning) and layer.applies() and _cache_length(cache) > 0:
            raise ValueError("prompt tuning: generate given a cache that holds tokens (one a previous generate "
                             "returned) is not supported: transformers counts the cached virtual tokens as input "
                             "tokens and would feed cached tokens again; generate from the whole sequence without "
                             "the cache")
        return type(model).generate(model, *args, **kwargs)

    def __reduce__(self):
        return type(self), (self._model(),)


class PromptTuning(AdapterLayer):
    """Prompt-tuning adapters of one model: `prompt_embeddings[<name>]` (Q, hidden), float32 on a half-precision
    base (as PEFT keeps them; cast to the embeddings' dtype when prepended), else the embeddings' dtype; on
    their device. The forward pre-hook on the model is removed again by `release`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.prompt_embeddings = nn.ParameterDict()
        self.batch = None                                  # a mixed batch's mapping (pool.AdapterBatch), or None
        self._layouts: dict[tuple, _Layout] = {}
        self.__dict__["_model"] = model                    # a plain attribute: not a submodule
        forward = inspect.signature(model.forward).parameters
        self._arg_names = [n for n, p in forward.items() if p.kind in _POSITIONAL]
        task = task_type(model)
        self._labels = ("shifted" if task == "CAUSAL_LM" else
                        "sequence" if type(model).__name__.endswith(_SEQUENCE_HEADS) else "per_token")
        self._hook_id = model.register_forward_pre_hook(self._prepend, with_kwargs=True, prepend=True).id
        if "generate" not in model.__dict__ and callable(getattr(model, "generate", None)):
            model.__dict__["generate"] = _PromptGenerate(model)

    # ------------------------------------------------------------------------------------------ adapters
    def add_adapter(self, name: str, prompt: Tensor, slot: int) -> None:
        """Adapter `name` with initial embeddings `prompt` (Q, hidden) and model-wide slot id `slot`."""
        weight = self._model.get_input_embeddings().weight
        self.prompt_embeddings[name] = nn.Parameter(prompt.to(weight.device, adapter_dtype(weight.dtype)))
        self.slot[name] = slot
        self._layouts = {}

    def adapter_names(self) -> list[str]:
        return list(self.prompt_embeddings)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [self.prompt_embeddings[name]]

    def remove_adapter(self, name: str) -> None:
        if self.active_adapter == name:
            self.active_adapter = None
        del self.prompt_embeddings[name], self.slot[name]
        self._layouts = {}

    def set_batch(self, batch) -> None:
        self.batch, self._layouts = batch, {}

    def release(self) -> None:
        self._drop_head_hook()
        model = self._model
        model._forward_pre_hooks.pop(self._hook_id, None)
        model._forward_pre_hooks_with_kwargs.pop(self._hook_id, None)
        if isinstance(model.__dict__.get("generate"), _PromptGenerate):
            del model.__dict__["generate"]
        return None

    def applies(self) -> bool:
        """Whether a call now prepends virtual tokens to some row (the active adapter's, or a mapped one's)."""
        if not self.adapters_enabled:
            return False
        if self.batch is None:
            return self.active_adapter in self.prompt_embeddings
        return any(self.batch.adapters.get(name) == slot for name, slot in self.slot.items())

    # ------------------------------------------------------------------------------------------ the hook
    def _row_names(self, n: int) -> list[str | None] | None:
        """Each row's prompt adapter (None: no virtual tokens), or None when no row has one."""
        if self.batch is None:
            return [self.active_adapter] * n if self.active_adapter in self.prompt_embeddings else None
        names = {slot: name for name, slot in self.slot.items() if self.batch.adapters.get(name) == slot}
        if not names:
            return None
        return [names.get(slot) for slot in self.batch.row_slots(n)]

    def _layout_for(self, n: int, device: torch.device) -> _Layout | None:
        key = (device, n, self.active_adapter if self.batch is None else None)
        if self.batch is not None:
            self.batch.check_rows(n)                                                # also on a hit (see check_rows)
        if key not in self._layouts:
            row_names = self._row_names(n)
            lengths = {name: p.shape[0] for name, p in self.prompt_embeddings.items()}
            self._layouts[key] = None if row_names is None else _layout(row_names, lengths, device)
        return self._layouts[key]

    def _prepend(self, model: nn.Module, args: tuple, kwargs: dict):
        self._drop_head_hook()                             # a call that failed before its head ran left it
        if not self.applies():
            return None
        kw = {**dict(zip(self._arg_names, args)), **kwargs}
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        tokens = embeds if embeds is not None else ids
        if tokens is None:
            return None
        if tokens.dim() != (3 if embeds is not None else 2):
            raise ValueError(f"prompt tuning takes input_ids (batch, length) or inputs_embeds (batch, length, "
                             f"hidden), got shape {tuple(tokens.shape)}")
        layout = self._layout_for(tokens.shape[0], tokens.device)
        if layout is None:
            return None
        # The cache first: generate builds a 4-D mask (or a dict of them) for a static cache, which the cache's
        # error names better than the mask's.
        cached = _cache_length(kw.get("cache", kw.get("past_key_values")))
        mask = kw.get("attention_mask")
        if mask is not None and (not isinstance(mask, Tensor) or mask.dim() != 2):
            raise ValueError("prompt tuning needs a 2-D attention_mask (batch, length), got "
                             f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}")
        if cached == 0:
            self._prefill(kw, layout, ids, embeds)
        else:
            self._continue(kw, layout, tokens.shape[1], cached)
        return (), kw

    def _prefill(self, kw: dict, layout: _Layout, ids: Tensor | None, embeds: Tensor | None) -> None:
        if embeds is None:
            embeds = self._model.get_input_embeddings()(ids)                              # (n, L, hidden)
        n, length = embeds.shape[:2]
        table = [self.prompt_embeddings[name].to(embeds.dtype) for name in layout.names]
        if layout.padded:
            table.append(embeds[:, 0])                                                    # (n, hidden)
        block = torch.cat(table)[layout.index.view(-1)].view(n, layout.qmax, -1)          # (n, Qmax, hidden)
        kw["input_ids"], kw["inputs_embeds"] = None, torch.cat([block, embeds], dim=1)

        mask, positions = kw.get("attention_mask"), kw.get("position_ids")
        if mask is not None or layout.padded:
            if mask is None:
                mask = torch.ones(n, length, dtype=torch.long, device=embeds.device)
            kw["attention_mask"] = _extended_mask(layout, mask)
        if positions is not None:
            real, virtual = positions + layout.shift, layout.positions                    # (n, L), (n, Qmax)
        elif layout.padded:
            real, virtual = self._own_positions(layout, ids, length, embeds.device)
        if positions is not None or (layout.padded and real is not None):
            first = torch.where(layout.copies_first_token, real[:, :1], virtual)
            kw["position_ids"] = torch.cat([first, real], dim=1)                          # (n, Qmax + L)
        types = kw.get("token_type_ids")
        if types is not None:
            first = torch.where(layout.copies_first_token, types[:, :1], 0)
            kw["token_type_ids"] = torch.cat([first.expand(n, layout.qmax), types], dim=1)
        for span in ("start_positions", "end_positions"):                               # question answering
            given = kw.get(span)
            if isinstance(given, Tensor) and given.shape == (n,):
                # token p sits at column Qmax + p; p >= L (ignored by the loss) stays past the last column
                kw[span] = torch.where(given < length, given + layout.qmax, layout.qmax + length)
        if self._labels == "sequence" and layout.padded and ids is not None:
            self._pool_like_alone(layout, ids)
        elif layout.padded and isinstance(getattr(self._model, "qa_outputs", None), nn.Module):
            self._hide_padding_spans(layout, n, length)
        labels = kw.get("labels")
        if labels is not None and self._labels != "sequence" and labels.shape == (n, length):
            head = labels.new_full((n, layout.qmax), -100)
            if self._labels == "shifted" and layout.padded:
                # Alone, a row without virtual tokens predicts nothing for its first token.
                first = torch.where(layout.copies_first_token, -100, labels[:, :1])
                labels = torch.cat([first, labels[:, 1:]], dim=1)
            kw["labels"] = torch.cat([head, labels], dim=1)

    def _pool_like_alone(self, layout: _Layout, ids: Tensor) -> None:
        """Last-token classifiers (HF's ...ForSequenceClassification with a `score` head and a pad_token_id) pool,
        given inputs_embeds, every row's last column; alone, a row without virtual tokens keeps its input_ids and
        pools its last non-pad token (HF's rule), column Qmax + j here. A hook on the head, for this call only,
        puts those rows' logits of that column in the last one (the head's other columns are not returned)."""
        head = getattr(self._model, "score", None)
        pad = getattr(getattr(self._model, "config", None), "pad_token_id", None)
        if not isinstance(head, nn.Module) or pad is None:
            return
        n, length = ids.shape
        own = (torch.arange(length, device=ids.device) * ids.ne(pad)).argmax(-1)               # (n,)
        last = torch.where(layout.copies_first_token[:, 0], own + layout.qmax, layout.qmax + length - 1)

        def pick(module, args, out):
            self._drop_head_hook()
            if not (isinstance(out, Tensor) and out.dim() == 3 and out.shape[:2] == (n, layout.qmax + length)):
                return None
            pooled = out[torch.arange(n, device=out.device), last.to(out.device)]              # (n, labels)
            return torch.cat([out[:, :-1], pooled.unsqueeze(1)], dim=1)
        self._head_hook = head.register_forward_hook(pick)

    def _hide_padding_spans(self, layout: _Layout, n: int, length: int) -> None:
        """Question answering (a `qa_outputs` head) in a padded mixed layout: the padding columns before a row's
        virtual tokens are no positions of that row alone, so their span logits are the dtype's lowest value (no
        softmax mass: the span loss is the row's alone), for this call only."""
        padding = torch.cat([~layout.mask, layout.mask.new_zeros((n, length))], dim=1)           # (n, Qmax + L)

        def hide(module, args, out):
            self._drop_head_hook()
            if not (isinstance(out, Tensor) and out.dim() == 3 and out.shape[:2] == padding.shape):
                return None
            return out.masked_fill(padding.to(out.device).unsqueeze(-1), torch.finfo(out.dtype).min)
        self._head_hook = self._model.qa_outputs.register_forward_hook(hide)

    _head_hook = None                      # a head's one-call hook (_pool_like_alone, _hide_padding_spans)

    def _drop_head_hook(self) -> None:
        if self._head_hook is not None:
            self._head_hook.remove()
            self._head_hook = None

    def _continue(self, kw: dict, layout: _Layout, length: int, cached: int) -> None:
        mask, positions = kw.get("attention_mask"), kw.get("position_ids")
        if mask is not None or layout.padded:
            if mask is None:
                mask = torch.ones(layout.mask.shape[0], cached - layout.qmax + length, dtype=torch.long,
                                  device=layout.mask.device)
            kw["attention_mask"] = _extended_mask(layout, mask)
        if positions is not None:
            kw["position_ids"] = positions + layout.shift
        elif layout.padded:
            own = self._own_positions(layout, kw.get("input_ids"), length, layout.shift.device,
                                      past=cached - layout.qmax)[0]
            if own is not None:
                kw["position_ids"] = own

    def _own_positions(self, layout: _Layout, ids: Tensor | None, length: int, device: torch.device,
                       past: int | None = None) -> tuple[Tensor | None, Tensor | None]:
        """Where a padded layout needs position ids the caller did not give: (real (n, L), virtual (n, Qmax)), each
        row's as it numbers them alone (its q_i virtual tokens, then its tokens; `past`: the cached tokens beyond
        the padding, at a decoding step, where only real ones come), by the model's own rule (layers.positions).
        None where the model's numbering over the padded attention mask already gives them (OPT's running count;
        RoBERTa's from embeddings at a decoding step, which ignores the cache alone too)."""
        rule, pad = position_rule(getattr(self._model, "config", None))
        if rule == "attention_mask" or (rule == "padding_idx" and past is not None and ids is None):
            return None, None
        start = 0 if past is None else past
        real = torch.arange(start, start + length, device=device).unsqueeze(0) + layout.shift        # (n, L)
        virtual = layout.positions
        if rule == "padding_idx":
            # Alone, a row reaches the model as embeddings where virtual tokens are prepended (sequential from
            # pad + 1), else as its input_ids, numbered over its non-pad tokens after its cache: a row without
            # virtual tokens at the prefill, every row at a decoding step.
            real, virtual = real + pad + 1, virtual + pad + 1
            if ids is not None:
                kept = ids.ne(pad).long()
                fairseq = (kept.cumsum(1) + start + layout.shift) * kept + pad
                real = fairseq if past is not None else torch.where(layout.copies_first_token, fairseq, real)
        return real, virtual

    def extra_repr(self) -> str:
        return f"adapters={ {n: tuple(p.shape) for n, p in self.prompt_embeddings.items()} }, " \
               f"active={self.active_adapter!r}"


# ------------------------------------------------------------------------------------------- the method
def find_prompt_targets(model: nn.Module, config: PromptConfig) -> list[str]:
    """[LAYER_NAME]: the one place a prompt adapter goes. Raises ValueError when the model cannot take one (no
    input embeddings, a forward without inputs_embeds, an encoder-decoder) or the text to initialise from does
    not tokenize."""
    existing = getattr(model, LAYER_NAME, None)
    if existing is not None and not isinstance(existing, PromptTuning):
        raise ValueError(f"{type(model).__name__} already has an attribute {LAYER_NAME!r}")
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    weight = getattr(embeddings, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"prompt tuning needs the model's input embeddings: {type(model).__name__} has no "
                         "get_input_embeddings() returning an embedding module with a (vocab, hidden) weight")
    if "inputs_embeds" not in inspect.signature(model.forward).parameters:
        raise ValueError(f"prompt tuning passes inputs_embeds, which {type(model).__name__}.forward does not take")
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise ValueError("prompt tuning of encoder-decoder models is not supported")
    if config.init == "text":
        text_token_ids(config, weight.shape[0])
    return [LAYER_NAME]


def attach_prompt(model: nn.Module, path: str, name: str, config: PromptConfig, slot: int) -> None:
    layer = getattr(model, path, None)
    if layer is None:
        layer = PromptTuning(model).train(model.training)
        setattr(model, path, layer)
    layer.add_adapter(name, initial_prompt(model.get_input_embeddings(), config), slot)
