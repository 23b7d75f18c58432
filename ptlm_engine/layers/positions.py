"""How an architecture numbers its tokens where the caller gives no position ids.

HF's usual rule is an arange after the cached tokens. Where a model does otherwise, the prefix and prompt
layers, which must build position ids themselves (a prefix shifts every row's by its P; a mixed batch of
prompt adapters pads rows to the longest prompt), build them by the model's own rule, so that each row gets
the positions it gets alone.
"""
from __future__ import annotations

# By config.model_type:
# "padding_idx": fairseq's numbering from pad_token_id + 1 over the non-pad input_ids (RoBERTa family); from
#   inputs_embeds, which tell no pads, sequential from pad_token_id + 1 (the cache ignored too);
# "attention_mask": the running count of the attention mask's ones, from 0 (OPT).
DEFAULT_POSITIONS: dict[str, str] = {
    **dict.fromkeys(["roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "roberta-prelayernorm",
                     "data2vec-text"], "padding_idx"),
    "opt": "attention_mask",
}


def position_rule(config) -> tuple[str | None, int | None]:
    """(rule, pad_token_id) for a model config: rule None is HF's arange; "padding_idx" only where the config has
    a pad_token_id (the rule numbers from it)."""
    rule = DEFAULT_POSITIONS.get(getattr(config, "model_type", None))
    pad = getattr(config, "pad_token_id", None)
    if rule == "padding_idx" and pad is None:
        return None, None
    return rule, pad
