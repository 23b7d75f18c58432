"""Review: HF `generate` with adapters beyond greedy search — mixed batches under beam search, sampling with
num_return_sequences, eos / min_new_tokens, static and explicit dynamic caches, continuing from a returned
cache, assisted decoding, encoder-decoders, sliding-window attention with prefixes, and one Triton-interpreter
case. Every mixed row is compared with the same row run alone with its adapter active."""
import copy
import warnings
import zlib

import pytest
import torch
import transformers as T
from transformers import DynamicCache

import ptlm_engine as pe
from tests.helpers import needs_triton, run_alone

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

V = 64
_DEC = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
            vocab_size=V, pad_token_id=0, bos_token_id=1, eos_token_id=None)
_GPT2 = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=V, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
             attn_pdrop=0.0, bos_token_id=1, eos_token_id=None, pad_token_id=0)

BUILD = {
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**_DEC)),
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(**_GPT2)),
    "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**_DEC, sliding_window=12)),
    "gemma2": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(**_DEC, head_dim=8, sliding_window=12)),   # soft-capping
    "gemma3": lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(**_DEC, head_dim=8, sliding_window=12,
                                                             layer_types=["sliding_attention", "full_attention"])),
    "t5": lambda: T.T5ForConditionalGeneration(T.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8,
                                                          vocab_size=V, decoder_start_token_id=0, pad_token_id=0,
                                                          eos_token_id=None, dropout_rate=0.0)),
    "bart": lambda: T.BartForConditionalGeneration(T.BartConfig(
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=V, max_position_embeddings=64, dropout=0.0,
        attention_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=None, decoder_start_token_id=2,
        forced_eos_token_id=None, forced_bos_token_id=None)),
}
_CACHE = {}


def build(kind):
    if kind not in _CACHE:
        torch.manual_seed(sum(map(ord, kind)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = BUILD[kind]().eval()
        model.generation_config.eos_token_id = None
        _CACHE[kind] = model
    return copy.deepcopy(_CACHE[kind])


def _lora_targets(kind):
    return {"gpt2": ["c_attn"], "t5": ["q", "v"]}.get(kind, ["q_proj", "v_proj"])


ADAPTERS = {
    "la": lambda kind: pe.LoraConfig(r=4, alpha=8, target_modules=_lora_targets(kind)),
    "lb": lambda kind: pe.LoraConfig(r=8, alpha=8, target_modules=None),
    "bn": lambda kind: pe.BottleneckConfig(bottleneck=8, placement="houlsby", act="relu"),
    "bn2": lambda kind: pe.BottleneckConfig(bottleneck=4, placement="houlsby", act="gelu"),
    "p2": lambda kind: pe.PrefixConfig(num_virtual_tokens=2),
    "p4": lambda kind: pe.PrefixConfig(num_virtual_tokens=4, projection=True),
    "q2": lambda kind: pe.PromptConfig(num_virtual_tokens=2),
    "q3": lambda kind: pe.PromptConfig(num_virtual_tokens=3, init="vocab"),
    "q9": lambda kind: pe.PromptConfig(num_virtual_tokens=9),
}

GROUPS = {
    "lora": ["la", None, "lb"],
    "bottleneck": ["bn", None, "bn2"],
    "prefix": ["p2", None, "p4"],
    "prompt": ["q2", None, "q3"],
    "mixed": ["la", "bn", None, "p4", "q3"],
}


def adapted(kind, names):
    """build(kind) with the adapters `names` (None skipped), seeded random values in every adapter tensor."""
    model = build(kind)
    for name in dict.fromkeys(n for n in names if n is not None):
        pe.add_adapter(model, name, ADAPTERS[name](kind))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_" in pname or "ptlm_" in pname:
                gen = torch.Generator().manual_seed(zlib.crc32(pname.encode()))
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    pe.set_active_adapter(model, None)
    return model


def left_padded(rows, length=5, seed=3):
    ids = torch.randint(3, V, (rows, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for row in range(rows):
        mask[row, :row % 3] = 0
    return ids.masked_fill(mask == 0, 0), mask


def alone(model, name, run):
    with torch.no_grad():
        return run_alone(model, name, run)


def positions_of(mask):
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


# ============================================================================================ beam search
@pytest.mark.parametrize("group", list(GROUPS))
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_beams_with_return_sequences_mixed_equals_alone(kind, group, reference_backend):
    """num_beams=3, num_return_sequences=2, left padding: every row's sequences (and their beam scores) equal the
    row generated alone."""
    mapping = GROUPS[group]
    model = adapted(kind, mapping)
    ids, mask = left_padded(len(mapping))
    kw = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0,
              output_scores=True, return_dict_in_generate=True)
    with torch.no_grad(), pe.adapter_batch(model, mapping):
        mixed = model.generate(ids, attention_mask=mask, **kw)
    assert mixed.sequences.shape == (2 * len(mapping), 10)
    for row, name in enumerate(mapping):
        one = alone(model, name, lambda: model.generate(ids[row:row + 1], attention_mask=mask[row:row + 1], **kw))
        torch.testing.assert_close(mixed.sequences[2 * row:2 * row + 2], one.sequences, rtol=0, atol=0,
                                   msg=f"row {row} ({name})")
        torch.testing.assert_close(mixed.sequences_scores[2 * row:2 * row + 2], one.sequences_scores,
                                   msg=f"row {row} ({name})")


# ============================================================================================ sampling
def _teacher_forced_logits(model, name, seqs, mask, steps):
    """The row's adapter alone, forward over the generated sequences with generate's position ids: the logits
    that predicted each of the last `steps` tokens."""
    full = torch.cat([mask, torch.ones(mask.shape[0], steps, dtype=mask.dtype)], 1)
    logits = alone(model, name, lambda: model(input_ids=seqs, attention_mask=full,
                                              position_ids=positions_of(full)).logits)
    return logits[:, -steps - 1:-1]


@pytest.mark.parametrize("group", list(GROUPS))
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_sampling_with_return_sequences_mixed_per_step_logits_equal_alone(kind, group, reference_backend):
    """do_sample (temperature, top_p), num_return_sequences=2, a fixed seed: the RNG order differs from a row
    alone, so every sampled sequence's per-step logits are compared with its row's adapter alone teacher-forced
    on the same tokens; with the same seed the mixed batch is reproducible."""
    mapping = GROUPS[group]
    model = adapted(kind, mapping)
    ids, mask = left_padded(len(mapping))
    steps = 5
    kw = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=True, temperature=0.7, top_p=0.9, top_k=0,
              num_return_sequences=2, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad(), pe.adapter_batch(model, mapping):
        torch.manual_seed(1234)
        mixed = model.generate(ids, attention_mask=mask, **kw)
        torch.manual_seed(1234)
        again = model.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(mixed.sequences, again.sequences)
    logits = torch.stack(mixed.logits, 1)                                          # (2n, steps, V)
    for row, name in enumerate(mapping):
        rows = slice(2 * row, 2 * row + 2)
        forced = _teacher_forced_logits(model, name, mixed.sequences[rows], mask[row:row + 1].expand(2, -1), steps)
        torch.testing.assert_close(logits[rows], forced, rtol=1e-4, atol=1e-4, msg=f"row {row} ({name})")


# ============================================================================================ eos / min_new_tokens
@pytest.mark.parametrize("group", ["lora", "prefix", "prompt", "mixed"])
def test_eos_rows_finish_at_different_steps(group, reference_backend):
    """An eos token that one row generates early: that row stops (pad after), the others go on; each row equals
    the row alone, with and without min_new_tokens (which suppresses the early eos)."""
    mapping = GROUPS[group]
    model = adapted("llama", mapping)
    ids, mask = left_padded(len(mapping))
    base = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad(), pe.adapter_batch(model, mapping):
        free = model.generate(ids, attention_mask=mask, **base)
    new = free[:, 5:]
    eos = next(int(t) for t in new[:, 1] if not (new[:, :1] == t).any())   # some row's 2nd token, nobody's 1st
    finish = [next((s for s in range(6) if new[r, s] == eos), 6) for r in range(len(mapping))]
    assert len(set(finish)) > 1, finish
    for extra in (dict(), dict(min_new_tokens=3)):
        kw = dict(base, eos_token_id=eos, **extra)
        with torch.no_grad(), pe.adapter_batch(model, mapping):
            mixed = model.generate(ids, attention_mask=mask, **kw)
        for row, name in enumerate(mapping):
            one = alone(model, name, lambda: model.generate(ids[row:row + 1], attention_mask=mask[row:row + 1], **kw))
            n = one.shape[1]
            assert torch.equal(mixed[row, :n], one[0]), (extra, row, name)
            assert (mixed[row, n:] == 0).all(), (extra, row, name)


@pytest.mark.parametrize("group", ["lora", "prefix", "mixed"])
def test_eos_under_beams_mixed_equals_alone(group, reference_backend):
    """Beam search with an eos some beams hit early (early_stopping=False, length_penalty): each row's returned
    sequences equal the row alone."""
    mapping = GROUPS[group]
    model = adapted("llama", mapping)
    ids, mask = left_padded(len(mapping))
    kw = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0)
    with torch.no_grad(), pe.adapter_batch(model, mapping):
        free = model.generate(ids, attention_mask=mask, **kw)
    eos = int(free[0, 6])
    kw.update(eos_token_id=eos, length_penalty=0.5)
    with torch.no_grad(), pe.adapter_batch(model, mapping):
        mixed = model.generate(ids, attention_mask=mask, **kw)
    for row, name in enumerate(mapping):
        one = alone(model, name, lambda: model.generate(ids[row:row + 1], attention_mask=mask[row:row + 1], **kw))
        n = one.shape[1]
        assert torch.equal(mixed[2 * row:2 * row + 2, :n], one), (row, name)
        rest = mixed[2 * row:2 * row + 2, n:]
        assert ((rest == 0) | (rest == eos)).all(), (row, name)          # HF's beam search pads with either


# ============================================================================================ caches
@pytest.mark.parametrize("group", ["lora", "bottleneck", "prefix"])
def test_static_cache_mixed_equals_dynamic_and_alone(group, reference_backend):
    """cache_implementation='static' in a mixed batch: greedy and beam tokens equal the dynamic cache's and each
    row's alone (static too)."""
    mapping = GROUPS[group]
    model = adapted("llama", mapping)
    ids, mask = left_padded(len(mapping))
    for how in (dict(), dict(num_beams=2, num_return_sequences=2)):
        kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0, **how)
        per = how.get("num_return_sequences", 1)
        with torch.no_grad(), pe.adapter_batch(model, mapping):
            dynamic = model.generate(ids, attention_mask=mask, **kw)
            static = model.generate(ids, attention_mask=mask, cache_implementation="static", **kw)
        assert torch.equal(static, dynamic), how
        for row, name in enumerate(mapping):
            one = alone(model, name, lambda: model.generate(ids[row:row + 1], attention_mask=mask[row:row + 1],
                                                            cache_implementation="static", **kw))
            assert torch.equal(static[per * row:per * (row + 1)], one), (how, row, name)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_static_cache_with_a_prompt_row_is_refused(kind, reference_backend):
    """A mixed batch with a prompt-tuning row cannot use a static cache (prompt.py: generate sizes and masks it
    without the virtual tokens): refused with a ValueError, not wrong tokens."""
    mapping = ["la", None, "q3"]
    model = adapted(kind, mapping)
    ids, mask = left_padded(len(mapping))
    with torch.no_grad(), pe.adapter_batch(model, mapping), pytest.raises(ValueError):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, cache_implementation="static", pad_token_id=0)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_static_cache_with_a_prompt_row_error_names_the_cache(kind, reference_backend):
    mapping = ["la", None, "q3"]
    model = adapted(kind, mapping)
    ids, mask = left_padded(len(mapping))
    kw = dict(max_new_tokens=2, cache_implementation="static", pad_token_id=0)
    with torch.no_grad(), pe.adapter_batch(model, mapping), pytest.raises(ValueError, match="dynamic cache|static"):
        model.generate(ids, attention_mask=mask, **kw)
    with pytest.raises(ValueError, match="dynamic cache|static"):
        alone(model, "q3", lambda: model.generate(ids[2:], attention_mask=mask[2:], **kw))


@pytest.mark.parametrize("group", ["lora", "bottleneck", "prefix", "prompt", "mixed"])
def test_explicit_dynamic_cache_equals_default(group, reference_backend):
    """An empty DynamicCache passed explicitly (past_key_values= / cache=) gives what generate's own gives."""
    mapping = GROUPS[group]
    model = adapted("llama", mapping)
    ids, mask = left_padded(len(mapping))
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad(), pe.adapter_batch(model, mapping):
        expected = model.generate(ids, attention_mask=mask, **kw)
        given = model.generate(ids, attention_mask=mask, cache=DynamicCache(config=model.config), **kw)
        legacy_name = model.generate(ids, attention_mask=mask, past_key_values=DynamicCache(config=model.config),
                                     **kw)
    assert torch.equal(given, expected)
    assert torch.equal(legacy_name, expected)


@pytest.mark.parametrize("group", ["lora", "bottleneck", "prefix"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_continue_from_returned_cache_equals_one_call(kind, group, reference_backend):
    """generate 3 tokens, then 3 more from the returned sequences and cache (attention mask extended): the
    tokens equal one 6-token call, in a mixed batch with left padding and for each row alone."""
    mapping = GROUPS[group]
    model = adapted(kind, mapping)
    ids, mask = left_padded(len(mapping))
    kw = dict(do_sample=False, pad_token_id=0, return_dict_in_generate=True)

    def run(ids, mask):
        whole = model.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, **kw).sequences
        first = model.generate(ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3, **kw)
        longer = torch.cat([mask, torch.ones(mask.shape[0], 3, dtype=mask.dtype)], 1)
        second = model.generate(first.sequences, attention_mask=longer, cache=first.cache, max_new_tokens=3,
                                min_new_tokens=3, **kw).sequences
        return whole, second

    with torch.no_grad(), pe.adapter_batch(model, mapping):
        whole, second = run(ids, mask)
    assert torch.equal(second, whole)
    for row, name in enumerate(mapping):
        w, s = alone(model, name, lambda: run(ids[row:row + 1], mask[row:row + 1]))
        assert torch.equal(s, w), (row, name)
        assert torch.equal(second[row:row + 1], s), (row, name)


# ============================================================================================ assisted decoding
def _repetitive(rows=1):
    base = torch.randint(3, V, (rows, 4), generator=torch.Generator().manual_seed(5))
    return torch.cat([base, base, base[:, :2]], 1)


@pytest.mark.parametrize("name", ["la", "bn", "p4", "q3"])
def test_prompt_lookup_in_a_one_row_block_equals_greedy(name, reference_backend):
    """Assisted generation (prompt_lookup_num_tokens=2; batch 1 only in HF) inside adapter_batch(model, [name])
    and with the adapter active: the tokens of plain greedy search with the adapter alone."""
    model = adapted("llama", [name, "la"] if name != "la" else [name, "lb"])
    ids = _repetitive()
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = alone(model, name, lambda: model.generate(ids, **kw))
    got = alone(model, name, lambda: model.generate(ids, prompt_lookup_num_tokens=2, **kw))
    assert torch.equal(got, expected)
    with torch.no_grad(), pe.adapter_batch(model, [name]):
        mixed = model.generate(ids, prompt_lookup_num_tokens=2, **kw)
    assert torch.equal(mixed, expected)


@pytest.mark.parametrize("name", ["la", "p4", "q3"])
def test_assistant_model_equals_greedy(name, reference_backend):
    """An assistant model (the base model without adapters) drafts; the adapted model's tokens are greedy's."""
    model = adapted("llama", [name])
    assistant = build("llama")
    ids = _repetitive()
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = alone(model, name, lambda: model.generate(ids, **kw))
    got = alone(model, name, lambda: model.generate(ids, assistant_model=assistant, **kw))
    assert torch.equal(got, expected)
    with torch.no_grad(), pe.adapter_batch(model, [name]):
        mixed = model.generate(ids, assistant_model=assistant, **kw)
    assert torch.equal(mixed, expected)


def test_prompt_tuned_assistant_is_refused_not_wrong(reference_backend):
    """A prompt-tuned assistant (the model itself, or a copy) gets its own cache back in every generate call that
    assisted decoding makes, which prompt tuning refuses (transformers would slice the cached virtual tokens off
    the input): a ValueError, never wrong tokens. (Its message speaks of 'a cache ... a previous generate
    returned', which the user never passed.)"""
    model = adapted("llama", ["q3"])
    ids = _repetitive()
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    with pytest.raises(ValueError, match="prompt tuning"):
        alone(model, "q3", lambda: model.generate(ids, assistant_model=model, **kw))


# ============================================================================================ encoder-decoder
@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_encoder_decoder_mixed_beams_right_padded_equals_alone(kind, reference_backend):
    """T5 / BART, LoRA adapters of two ranks and a base row, right-padded encoder inputs with a mask, beams with
    num_return_sequences, and sampling's per-step logits: each row as alone."""
    mapping = ["la", None, "lb"]
    model = adapted(kind, mapping)
    pad = model.config.pad_token_id
    ids = torch.randint(3, V, (3, 6), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    mask[2, 5:] = 0
    ids = ids.masked_fill(mask == 0, pad)
    kw = dict(max_new_tokens=4, min_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False,
              output_scores=True, return_dict_in_generate=True)
    with torch.no_grad(), pe.adapter_batch(model, mapping):
        mixed = model.generate(ids, attention_mask=mask, **kw)
    for row, name in enumerate(mapping):
        n = int(mask[row].sum())
        one = alone(model, name, lambda: model.generate(ids[row:row + 1, :n], **kw))
        assert torch.equal(mixed.sequences[2 * row:2 * row + 2], one.sequences), (row, name)
        torch.testing.assert_close(mixed.sequences_scores[2 * row:2 * row + 2], one.sequences_scores,
                                   rtol=1e-4, atol=1e-4)
    sample = dict(max_new_tokens=4, min_new_tokens=4, do_sample=True, num_return_sequences=2, output_logits=True,
                  return_dict_in_generate=True)
    with torch.no_grad(), pe.adapter_batch(model, mapping):
        torch.manual_seed(0)
        mixed = model.generate(ids, attention_mask=mask, **sample)
    logits = torch.stack(mixed.logits, 1)
    for row, name in enumerate(mapping):
        rows = slice(2 * row, 2 * row + 2)
        dec = mixed.sequences[rows]
        forced = alone(model, name, lambda: model(input_ids=ids[row:row + 1].expand(2, -1),
                                                  attention_mask=mask[row:row + 1].expand(2, -1),
                                                  decoder_input_ids=dec[:, :-1]).logits)
        torch.testing.assert_close(logits[rows], forced, rtol=1e-4, atol=1e-4, msg=f"row {row} ({name})")


# ============================================================================================ sliding window
@pytest.mark.parametrize("kind", ["mistral", "gemma2", "gemma3"])
def test_sliding_window_prefix_within_window_mixed_beams_equal_alone(kind, reference_backend):
    """Window 12; prefixes of 2 and 4, LoRA and base rows; 5 prompt tokens + 3 new + P <= 12: beams and greedy,
    mixed rows equal alone; the prefix row's logits equal the model's own attention over [prefix ; keys] (a
    prefix cache passed to the base model, PEFT's computation)."""
    mapping = ["p2", None, "p4", "la"]
    model = adapted(kind, mapping)
    ids, mask = left_padded(len(mapping))
    for how in (dict(), dict(num_beams=3, num_return_sequences=2), dict(cache_implementation="static")):
        kw = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0, **how)
        per = how.get("num_return_sequences", 1)
        with torch.no_grad(), pe.adapter_batch(model, mapping):
            mixed = model.generate(ids, attention_mask=mask, **kw)
        for row, name in enumerate(mapping):
            one = alone(model, name, lambda: model.generate(ids[row:row + 1], attention_mask=mask[row:row + 1],
                                                            **kw))
            assert torch.equal(mixed[per * row:per * (row + 1)], one), (how, row, name)


def _peft_style_prefix_logits(model, name, ids):
    """The base model given the adapter's prefix as a DynamicCache of P entries (PEFT's computation), ids unpadded."""
    from ptlm_engine.layers.prefix import LAYER_NAME
    layer = getattr(model, LAYER_NAME)
    g = layer.geometry
    values = layer.encoders[name].values().detach()
    p = values.shape[0]
    kv = values.view(p, g.num_layers, 2, g.num_heads, g.head_dim).permute(1, 2, 3, 0, 4)   # (layers, 2, H, P, D)
    with pe.disable_adapters(model):
        cache = DynamicCache(config=model.config)
        for i in range(g.num_layers):
            cache.update(kv[i, 0].unsqueeze(0), kv[i, 1].unsqueeze(0), i)
        mask = torch.ones(1, p + ids.shape[1], dtype=torch.long)
        return model(input_ids=ids, cache=cache, attention_mask=mask,
                     position_ids=torch.arange(p, p + ids.shape[1]).unsqueeze(0)).logits


@pytest.mark.parametrize("kind", ["mistral", "gemma3"])
def test_sliding_window_prefix_equals_prefix_cache_within_window(kind, reference_backend):
    model = adapted(kind, ["p4"])
    ids = torch.randint(3, V, (1, 8), generator=torch.Generator().manual_seed(9))      # 4 + 8 = 12 = window
    with torch.no_grad():
        ours = alone(model, "p4", lambda: model(input_ids=ids).logits)
        theirs = _peft_style_prefix_logits(model, "p4", ids)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["mistral", "gemma3"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_sliding_window_prefix_beyond_window_is_refused(kind, cache, reference_backend):
    """README: the window must hold the prefix and the whole sequence, else a clear error — also where only the
    generated tokens push the sequence past the window (5 + 4 + 6 > 12), in a mixed batch and alone."""
    mapping = ["p2", None, "p4"]
    model = adapted(kind, mapping)
    ids, mask = left_padded(len(mapping))
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    if cache == "static":
        kw["cache_implementation"] = "static"
    with torch.no_grad(), pe.adapter_batch(model, mapping), pytest.raises(ValueError, match="sliding window"):
        model.generate(ids, attention_mask=mask, **kw)
    with pytest.raises(ValueError, match="sliding window"):
        alone(model, "p4", lambda: model.generate(ids[:1], attention_mask=mask[:1], **kw))
    # the base row alone is fine
    alone(model, None, lambda: model.generate(ids[:1], attention_mask=mask[:1], **kw))


@pytest.mark.parametrize("kind", ["mistral", "gemma3"])
@pytest.mark.parametrize("mapping", [["p4", "q3"], ["p2", "q9"]], ids=["prompt_row", "long_prompt_row"])
def test_sliding_window_prefix_row_next_to_a_prompt_row_equals_alone(kind, mapping, reference_backend):
    """A prefix row next to a prompt-tuning row that fits the window alone is not refused and equals itself alone.
    prompt_row (regression): the check counted the Qmax padding columns the prompt layout puts before every row
    (4 virtual + 9 > 12, alone 4 + 7). long_prompt_row: 9 virtual tokens make the mixed sequence (9 + 5 + 2 fed
    back) longer than the window of 12, so the sliding caches drop their oldest columns, the prefix row's layout
    padding: the check counts the columns before that drop less that padding (2 virtual + 7 tokens <= 12)."""
    model = adapted(kind, mapping)
    ids, mask = left_padded(len(mapping))
    kw = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    expected = [alone(model, name, lambda: model.generate(ids[row:row + 1], attention_mask=mask[row:row + 1], **kw))
                for row, name in enumerate(mapping)]
    with torch.no_grad(), pe.adapter_batch(model, mapping):
        mixed = model.generate(ids, attention_mask=mask, **kw)
    for row, one in enumerate(expected):
        assert torch.equal(mixed[row:row + 1], one), row


@pytest.mark.parametrize("kind", ["mistral", "gemma3"])
def test_sliding_window_prefix_row_next_to_a_prompt_row_beyond_window_is_refused(kind, reference_backend):
    """The prompt layout's padding columns do not count, the row's own tokens do: 4 virtual + 5 tokens + 4 fed
    back > 12 is refused in the mixed batch with the numbers of the row alone; the prompt row alone is fine."""
    mapping = ["p4", "q3"]
    model = adapted(kind, mapping)
    ids, mask = left_padded(len(mapping))
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    refused = r"sliding window of 12 tokens, shorter than the 4 virtual \+ 9 tokens"
    with torch.no_grad(), pe.adapter_batch(model, mapping), pytest.raises(ValueError, match=refused + " of row 0;"):
        model.generate(ids, attention_mask=mask, **kw)
    with pytest.raises(ValueError, match=refused + ";"):
        alone(model, "p4", lambda: model.generate(ids[:1], attention_mask=mask[:1], **kw))
    alone(model, "q3", lambda: model.generate(ids[1:], attention_mask=mask[1:], **kw))


# ============================================================================================ right padding
@pytest.mark.parametrize("group", ["prefix", "prompt", "mixed"])
def test_right_padded_forward_mixed_equals_alone(group, reference_backend):
    """Right padding (a forward, as for scoring; HF's generate wants left padding): each row's valid positions
    equal the row alone with the same mask."""
    mapping = GROUPS[group]
    model = adapted("llama", mapping)
    ids = torch.randint(3, V, (len(mapping), 6), generator=torch.Generator().manual_seed(11))
    mask = torch.ones_like(ids)
    for row in range(len(mapping)):
        mask[row, 6 - row % 3:] = 0
    with torch.no_grad(), pe.adapter_batch(model, mapping):
        mixed = model(input_ids=ids, attention_mask=mask).logits
    q = {"q2": 2, "q3": 3}
    qmax = max(q.get(n, 0) for n in mapping)
    for row, name in enumerate(mapping):
        one = alone(model, name, lambda: model(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1]).logits)
        valid = mask[row].bool()
        got = mixed[row, qmax:][valid]
        torch.testing.assert_close(got, one[0, q.get(name, 0):][valid], rtol=1e-4, atol=1e-4,
                                   msg=f"{row} {name}")


# ============================================================================================ Triton interpreter
@needs_triton
def test_triton_mixed_batch_under_beams_equals_alone(monkeypatch):
    """Triton kernels (interpreted on the CPU, fp32): LoRA, bottleneck, prefix and base rows under beams."""
    monkeypatch.setenv("PTLM_BACKEND", "triton")
    mapping = ["la", "bn", None, "p4"]
    model = adapted("llama", mapping)
    ids, mask = left_padded(len(mapping), length=4)
    kw = dict(max_new_tokens=3, min_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False,
              pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad(), pe.adapter_batch(model, mapping):
        mixed = model.generate(ids, attention_mask=mask, **kw)
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    for row, name in enumerate(mapping):
        one = alone(model, name, lambda: model.generate(ids[row:row + 1], attention_mask=mask[row:row + 1], **kw))
        assert torch.equal(mixed.sequences[2 * row:2 * row + 2], one.sequences), (row, name)
        torch.testing.assert_close(mixed.sequences_scores[2 * row:2 * row + 2], one.sequences_scores,
                                   rtol=1e-4, atol=1e-4)
