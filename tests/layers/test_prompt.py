"""PromptTuning on its own: initialisation modes, parameter dtype, the per-row layout of mixed batches, the
pre-hook's prefill / continuation rule (a cached decode equals the full forward), its removal, and what it
rejects."""
import copy

import pytest
import torch
from transformers import DynamicCache, StaticCache

import ptlm_engine as pe
from ptlm_engine.layers.prompt import LAYER_NAME, PromptTuning, _layout, initial_prompt, text_token_ids
from tests.helpers import run_alone

pytestmark = pytest.mark.usefixtures("reference_backend")


class WordTokenizer:
    """A stand-in tokenizer: "w<i>" -> i, with a BOS id 1 in front (as Llama's tokenizer adds)."""
    name_or_path = ""

    def __call__(self, text):
        return {"input_ids": [1] + [int(word[1:]) for word in text.split()]}


def test_initial_prompt_modes():
    embeddings = torch.nn.Embedding.from_pretrained(torch.randn(50, 6, dtype=torch.float16))
    weight = embeddings.weight
    torch.manual_seed(0)
    random = initial_prompt(embeddings, pe.PromptConfig(num_virtual_tokens=300))
    assert random.dtype == torch.float32 and random.shape == (300, 6)
    assert abs(random.std().item() - 1) < 0.1 and abs(random.mean().item()) < 0.1
    vocab = initial_prompt(embeddings, pe.PromptConfig(num_virtual_tokens=7, init="vocab"))
    assert all(any(torch.equal(row.half(), w) for w in weight) for row in vocab)
    text = pe.PromptConfig(num_virtual_tokens=7, init="text", init_text="w4 w9", tokenizer=WordTokenizer())
    assert text_token_ids(text, 50) == [1, 4, 9, 1, 4, 9, 1]
    torch.testing.assert_close(initial_prompt(embeddings, text), weight[[1, 4, 9, 1, 4, 9, 1]].float())
    short = pe.PromptConfig(num_virtual_tokens=2, init="text", init_text="w4 w9", tokenizer=WordTokenizer())
    assert text_token_ids(short, 50) == [1, 4]


@pytest.mark.parametrize("text,match", [("w77", "below the model's vocabulary size"), ("", None)])
def test_text_that_does_not_fit_the_vocabulary(text, match):
    class Empty(WordTokenizer):
        def __call__(self, text):
            return {"input_ids": []}
    tokenizer = WordTokenizer() if text else Empty()
    config = pe.PromptConfig(num_virtual_tokens=3, init="text", init_text=text or "x", tokenizer=tokenizer)
    with pytest.raises(ValueError, match=match or "at least one token"):
        text_token_ids(config, 50)


def test_layout_left_pads_rows_to_the_largest_prompt():
    layout = _layout(["a", None, "b", "a"], {"a": 2, "b": 3}, torch.device("cpu"))
    assert layout.names == ("a", "b") and layout.qmax == 3 and layout.padded
    # table rows: a 0-1, b 2-4, then each row's first token 5-8
    assert layout.index.tolist() == [[0, 0, 1], [6, 6, 6], [2, 3, 4], [0, 0, 1]]
    assert layout.mask.tolist() == [[False, True, True], [False] * 3, [True] * 3, [False, True, True]]
    assert layout.positions.tolist() == [[0, 0, 1], [0, 0, 0], [0, 1, 2], [0, 0, 1]]
    assert layout.shift.view(-1).tolist() == [2, 0, 3, 2]
    assert layout.copies_first_token.view(-1).tolist() == [False, True, False, False]
    same = _layout(["a", "a"], {"a": 2}, torch.device("cpu"))
    assert not same.padded and same.index.tolist() == [[0, 1], [0, 1]]


def test_parameters_follow_the_embeddings(tiny):
    model = tiny("llama").half()
    pe.add_adapter(model, "a", pe.PromptConfig(num_virtual_tokens=4))
    prompt = getattr(model, LAYER_NAME).prompt_embeddings["a"]
    assert prompt.dtype == torch.float32 and prompt.shape == (4, 64) and prompt.requires_grad
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [f"{LAYER_NAME}.prompt_embeddings.a"]
    logits = model(input_ids=torch.randint(0, 128, (2, 5))).logits
    assert logits.dtype == torch.float16 and logits.shape == (2, 9, 128)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("given_positions", [False, True])
def test_cached_continuation_equals_the_full_forward(tiny, kind, given_positions):
    """Prefill with the prompt, then feed the rest with the cache: the cache already holds the virtual tokens,
    so the continuation's mask gains them and its positions move up by Q."""
    model = tiny(kind)
    pe.add_adapter(model, "a", pe.PromptConfig(num_virtual_tokens=3))
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits                      # (2, 3 + 7, V)
        cache = DynamicCache(config=model.config)
        positions = {"position_ids": torch.arange(7).expand(2, 7)} if given_positions else {}
        first = model(input_ids=ids[:, :4], attention_mask=mask[:, :4], cache=cache, use_cache=True,
                      **{k: v[:, :4] for k, v in positions.items()}).logits
        assert cache.get_seq_length() == 3 + 4
        rest = model(input_ids=ids[:, 4:], attention_mask=mask, cache=cache, use_cache=True,
                     **{k: v[:, 4:] for k, v in positions.items()}).logits
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full)


def test_rejects_static_caches_and_4d_masks(tiny):
    model = tiny("llama")
    pe.add_adapter(model, "a", pe.PromptConfig(num_virtual_tokens=3))
    ids = torch.randint(0, 128, (1, 4))
    with pytest.raises(ValueError, match="dynamic cache"):
        model(input_ids=ids, cache=StaticCache(config=model.config, max_cache_len=16), use_cache=True)
    with pytest.raises(ValueError, match="2-D attention_mask"):
        model(input_ids=ids, attention_mask=torch.ones(1, 1, 4, 4))


def test_release_removes_the_hook_and_copies_keep_their_own(tiny):
    model = tiny("gpt2")
    pe.add_adapter(model, "a", pe.PromptConfig(num_virtual_tokens=3))
    assert len(model._forward_pre_hooks) == 1 and isinstance(getattr(model, LAYER_NAME), PromptTuning)
    twin = copy.deepcopy(model)
    pe.remove_adapter(model, "a")
    assert not model._forward_pre_hooks and not model._forward_pre_hooks_with_kwargs
    assert not hasattr(model, LAYER_NAME)
    ids = torch.randint(0, 128, (1, 4))
    assert twin(input_ids=ids).logits.shape == (1, 7, 128)                           # the copy still prepends
    assert model(input_ids=ids).logits.shape == (1, 4, 128)


# ------------------------------------------------------------------------- positions by the model's own rule
VOCAB = 128


def _roberta(decoder=False):
    from transformers import RobertaConfig, RobertaForCausalLM, RobertaModel
    config = RobertaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                           vocab_size=VOCAB, max_position_embeddings=40, pad_token_id=1, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0, is_decoder=decoder)
    torch.manual_seed(0)
    return (RobertaForCausalLM if decoder else RobertaModel)(config).eval()


def _opt():
    from transformers import OPTConfig, OPTForCausalLM
    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                                    vocab_size=VOCAB, max_position_embeddings=64, word_embed_proj_dim=64,
                                    dropout=0.0, attention_dropout=0.0, pad_token_id=1)).eval()


def _with_prompts(model, prefix=False):
    """Prompt adapters of 3 and 5 virtual tokens (and a prefix adapter), random values."""
    pe.add_adapter(model, "p3", pe.PromptConfig(num_virtual_tokens=3))
    pe.add_adapter(model, "p5", pe.PromptConfig(num_virtual_tokens=5))
    if prefix:
        pe.add_adapter(model, "pre", pe.PrefixConfig(num_virtual_tokens=2))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model


def _ids(rows, length=6):
    return torch.randint(2, VOCAB, (rows, length), generator=torch.Generator().manual_seed(3))   # never pad (1)


Q = {"p3": 3, "p5": 5}


def test_roberta_rows_of_different_prompt_lengths_get_their_own_positions():
    """RoBERTa numbers from padding_idx + 1 (from embeddings, which prompt tuning passes: sequentially; from
    input_ids over the non-pad tokens): a padded mixed layout builds each row's position ids by that rule."""
    model = _with_prompts(_roberta())
    mapping = ["p3", "p5", None]
    ids = _ids(len(mapping))
    ids[2, 3] = 1                                  # a pad id inside the row without a prompt: fairseq skips it
    with torch.no_grad():
        with pe.adapter_batch(model, mapping):
            mixed = model(input_ids=ids).last_hidden_state
        for row, name in enumerate(mapping):
            alone = run_alone(model, name, lambda: model(input_ids=ids[row:row + 1]).last_hidden_state)
            torch.testing.assert_close(mixed[row, 5 - Q.get(name, 0):], alone[0], msg=f"row {row} ({name})")


@pytest.mark.parametrize("kind", ["roberta", "opt"])
def test_padded_layout_positions_at_prefill_and_decoding_steps_match_each_row_alone(kind):
    """Left-padded rows (OPT counts the mask's ones; RoBERTa numbers non-pad ids after its cache) of prompt
    adapters of different lengths, a prefix and no adapter: the prefill and two decoding steps without position
    ids, each row's logits against the same steps run alone."""
    model = _with_prompts(_roberta(decoder=True) if kind == "roberta" else _opt(), prefix=True)
    mapping = ["p3", "p5", "pre", None]
    ids = _ids(len(mapping))
    mask = torch.ones_like(ids)
    for row, pad in enumerate([2, 1, 2, 3]):
        mask[row, :pad], ids[row, :pad] = 0, 1
    steps = _ids(len(mapping), 2)

    def run(rows):
        cache = DynamicCache()
        out = [model(input_ids=ids[rows], attention_mask=mask[rows], cache=cache, use_cache=True).logits]
        step_mask = mask[rows]
        for j in range(steps.shape[1]):
            step_mask = torch.cat([step_mask, torch.ones_like(step_mask[:, :1])], dim=1)
            out.append(model(input_ids=steps[rows, j:j + 1], attention_mask=step_mask, cache=cache,
                             use_cache=True).logits)
        return out

    with torch.no_grad():
        with pe.adapter_batch(model, mapping):
            mixed = run(slice(None))
        for row, name in enumerate(mapping):
            alone = run_alone(model, name, lambda: run(slice(row, row + 1)))
            q = Q.get(name, 0)
            valid = torch.cat([torch.ones(q, dtype=torch.bool), mask[row].bool()])
            torch.testing.assert_close(mixed[0][row, 5 - q:][valid], alone[0][0, valid], msg=f"row {row} prefill")
            for j in range(1, len(mixed)):
                torch.testing.assert_close(mixed[j][row], alone[j][0], msg=f"row {row} ({name}) step {j}")


@pytest.mark.parametrize("init", ["vocab", "text"])
def test_token_initialisation_takes_the_embedding_modules_outputs_as_peft(init):
    """Gemma's input embeddings scale the rows they look up by sqrt(hidden); PEFT's SAMPLE_VOCAB / TEXT init calls
    the embedding module, so the same seed gives its values, and virtual tokens as large as real ones."""
    from transformers import GemmaConfig, GemmaForCausalLM
    torch.manual_seed(0)
    base = GemmaForCausalLM(GemmaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=128, vocab_size=128, head_dim=16))
    ours = copy.deepcopy(base)
    text = {"init_text": "w4 w9", "tokenizer": WordTokenizer()} if init == "text" else {}
    torch.manual_seed(7)
    pe.add_adapter(ours, "a", pe.PromptConfig(num_virtual_tokens=4, init=init, **text))
    ids = [1, 4, 9, 1] if init == "text" else None
    embeddings = base.get_input_embeddings()
    if init == "vocab":
        torch.manual_seed(7)
        torch.randn(4, 64)                                          # the N(0, 1) draw comes first, as in PEFT
        ids = torch.randint(0, 128, (4,)).tolist()
    with torch.no_grad():
        expected = embeddings(torch.tensor(ids))
    torch.testing.assert_close(ours.ptlm_prompt.prompt_embeddings["a"].detach(), expected)
    assert not torch.allclose(expected, embeddings.weight[ids])     # the module scales its rows
