"""Prompt tuning on tiny HF models against HF PEFT's PROMPT_TUNING on the same weights: outputs, loss, gradients,
initialisation; generation step by step against PEFT's forward teacher-forced on the generated tokens (PEFT
0.21's own generate re-inserts the prompt at every step under transformers 5) and against HF's generate from
[prompt ; embeddings]; files both ways; mixed batches (two prompt adapters of different lengths, LoRA, none)
row by row against each row alone, in forward, loss, gradients and generation; disabling, removal, bad input."""
import copy
import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import PreTrainedTokenizerFast

import ptlm_engine as pe
from ptlm_engine import inject
from ptlm_engine.layers.prompt import LAYER_NAME
from tests.helpers import run_alone

pytestmark = [pytest.mark.usefixtures("reference_backend"),
              pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

TASKS = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "FEATURE_EXTRACTION", "bert_cls": "SEQ_CLS"}
LORA_TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"],
                "bert_cls": ["query", "value"]}


def _ids(rows, length=6, seed=3):
    return torch.randint(1, 128, (rows, length), generator=torch.Generator().manual_seed(seed))


def _prompt(model, name):
    return getattr(model, LAYER_NAME).prompt_embeddings[name]


def _pair(tiny, kind, q=5):
    """Our model with prompt adapter 'a' and PEFT's with 'default', holding the same embeddings."""
    ours = tiny(kind)
    pe.add_adapter(ours, "a", pe.PromptConfig(num_virtual_tokens=q))
    theirs = peft.get_peft_model(tiny(kind), peft.PromptTuningConfig(task_type=TASKS[kind], num_virtual_tokens=q))
    with torch.no_grad():
        theirs.prompt_encoder.default.embedding.weight.copy_(_prompt(ours, "a"))
    return ours, theirs


def _main(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _inputs(kind, rows=2, length=6):
    """input_ids, a left-padded attention mask, labels for the head, token types for BERT."""
    ids = _ids(rows, length)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    kw = {"input_ids": ids, "attention_mask": mask}
    if TASKS[kind] == "CAUSAL_LM":
        kw["labels"] = ids.masked_fill(mask == 0, -100)
    if kind == "bert_cls":
        kw["labels"] = torch.arange(rows) % 3
    if kind.startswith("bert"):
        kw["token_type_ids"] = (torch.arange(length) >= length // 2).long().expand(rows, length)
    return kw


# ------------------------------------------------------------------------------------------ against PEFT
@pytest.mark.parametrize("kind", TASKS)
def test_outputs_loss_and_gradients_match_peft(tiny, kind):
    ours, theirs = _pair(tiny, kind)
    ours.train(), theirs.train()                                         # no dropout in the tiny models
    kw = _inputs(kind)
    if kind == "bert":   # PEFT's feature extraction drops token types (it would not prepend zeros)
        kw = {k: v for k, v in kw.items() if k != "token_type_ids"}
    out, out_peft = ours(**kw), theirs(**kw)
    torch.testing.assert_close(_main(out), _main(out_peft))
    loss, loss_peft = (out.loss, out_peft.loss) if "labels" in kw else (_main(out).square().mean(),
                                                                        _main(out_peft).square().mean())
    torch.testing.assert_close(loss, loss_peft)
    loss.backward(), loss_peft.backward()
    torch.testing.assert_close(_prompt(ours, "a").grad, theirs.prompt_encoder.default.embedding.weight.grad)
    assert all(p.grad is None for n, p in ours.named_parameters() if LAYER_NAME not in n)   # base frozen


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A word-level tokenizer saved where AutoTokenizer (ours and PEFT's) finds it: "w<i>" -> i."""
    vocab = {f"w{i}": i for i in range(127)} | {"[UNK]": 127}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("init,peft_init", [("random", "RANDOM"), ("vocab", "SAMPLE_VOCAB"), ("text", "TEXT")])
def test_initialisation_matches_peft(tiny, tokenizer_dir, init, peft_init):
    """The same seed gives PEFT's values bit for bit; text: w5 w7 w9 repeated to 7 tokens."""
    text = dict(init_text="w5 w7 w9", tokenizer=tokenizer_dir) if init == "text" else {}
    torch.manual_seed(5)
    ours = tiny("llama")
    pe.add_adapter(ours, "a", pe.PromptConfig(num_virtual_tokens=7, init=init, **text))
    torch.manual_seed(5)
    theirs = peft.get_peft_model(tiny("llama"), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=7, prompt_tuning_init=peft_init,
        prompt_tuning_init_text=text.get("init_text"), tokenizer_name_or_path=text.get("tokenizer")))
    assert torch.equal(_prompt(ours, "a"), theirs.prompt_encoder.default.embedding.weight)
    if init == "text":
        embed = ours.get_input_embeddings().weight
        torch.testing.assert_close(_prompt(ours, "a"), embed[[5, 7, 9, 5, 7, 9, 5]])


def _generate(model, ids, **kw):
    return model.generate(ids, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True, **kw)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_each_generation_step_matches_peft_teacher_forced(tiny, kind):
    """PEFT's forward on [input ; generated] (positions 0 … Q+L+T−1) gives, at each step, our step's logits."""
    ours, theirs = _pair(tiny, kind, q=4)
    ids = _ids(2)
    with torch.no_grad():
        out = _generate(ours, ids, max_new_tokens=5)
        forced = theirs(input_ids=out.sequences).logits                               # (2, 4 + 6 + 5, V)
    assert torch.equal(out.sequences[:, :6], ids) and out.sequences.shape == (2, 11)
    torch.testing.assert_close(torch.stack(out.logits, dim=1), forced[:, 4 + 6 - 1:-1])


@pytest.mark.parametrize("kw", [dict(num_beams=3, num_return_sequences=2), dict(do_sample=True, top_k=20),
                                dict(do_sample=True, num_return_sequences=3)])
def test_beams_and_sampling_match_hf_generate_from_prompted_embeddings(tiny, kw):
    """HF's generate from inputs_embeds = [prompt ; embeddings] (left-padded mask) is the same search."""
    model = tiny("llama")
    pe.add_adapter(model, "a", pe.PromptConfig(num_virtual_tokens=3))
    ids, mask = _ids(2), torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    with torch.no_grad():
        torch.manual_seed(0)
        ours = model.generate(ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0, **kw)
        embeds = torch.cat([_prompt(model, "a").expand(2, 3, 64), model.get_input_embeddings()(ids)], dim=1)
        with pe.disable_adapters(model):
            torch.manual_seed(0)
            hf = model.generate(inputs_embeds=embeds, attention_mask=torch.cat([torch.ones(2, 3).long(), mask], 1),
                                max_new_tokens=4, pad_token_id=0, **kw)
    assert torch.equal(ours[:, 6:], hf)
    assert torch.equal(ours[:, :6], ids.repeat_interleave(ours.shape[0] // 2, dim=0))


# ------------------------------------------------------------------------------------------------- files
@pytest.mark.parametrize("kind", ["llama", "bert_cls"])
def test_files_both_ways(tiny, tmp_path, kind):
    saved = ["classifier"] if kind == "bert_cls" else None
    ours = tiny(kind)
    pe.add_adapter(ours, "a", pe.PromptConfig(num_virtual_tokens=4, modules_to_save=saved))
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    kw = {k: v for k, v in _inputs(kind).items() if k != "labels"}
    pe.save_adapter(ours, "a", tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny(kind), tmp_path / "ours")
    torch.testing.assert_close(_main(theirs(**kw)), _main(ours(**kw)))

    peft_model = peft.get_peft_model(tiny(kind), peft.PromptTuningConfig(task_type=TASKS[kind], num_virtual_tokens=3))
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = tiny(kind)
    pe.load_adapter(loaded, tmp_path / "peft", name="b")
    torch.testing.assert_close(_main(loaded(**kw)), _main(peft_model.eval()(**kw)))
    assert pe.adapter_configs(loaded)["b"].num_virtual_tokens == 3


@pytest.mark.parametrize("change,match", [
    (dict(task_type="SEQ_2_SEQ_LM"), "encoder-decoder"), (dict(prompt_tuning_init="NOPE"), "prompt_tuning_init"),
    (dict(num_virtual_tokens=0), "positive"), (dict(token_dim=32), None), (dict(encoder_depth=3), "not support")])
def test_bad_files_fail_clearly_and_change_nothing(tiny, tmp_path, change, match):
    model = tiny("llama")
    pe.add_adapter(model, "a", pe.PromptConfig(num_virtual_tokens=4))
    pe.save_adapter(model, "a", tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text()) | change
    (tmp_path / "adapter_config.json").write_text(json.dumps(raw))
    if change.get("token_dim"):   # the tensor is what is checked against the model
        save_file({"prompt_embeddings": torch.zeros(4, 32)}, tmp_path / "adapter_model.safetensors")
        match = "shape"
    before = dict(model.state_dict())
    with pytest.raises(ValueError, match=match):
        pe.load_adapter(model, tmp_path, name="b")
    assert list(pe.adapter_configs(model)) == ["a"] and model.state_dict().keys() == before.keys()


# ------------------------------------------------------------------------------------------ mixed batches
MAPPING = ["p3", "lora", None, "p5", "p3"]
Q = {"p3": 3, "p5": 5}


def _mixed_model(tiny, kind):
    model = tiny(kind)
    pe.add_adapter(model, "p3", pe.PromptConfig(num_virtual_tokens=3))
    pe.add_adapter(model, "p5", pe.PromptConfig(num_virtual_tokens=5, init="vocab"))
    pe.add_adapter(model, "lora", pe.LoraConfig(r=4, target_modules=LORA_TARGETS[kind]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert_cls"])
def test_mixed_rows_match_each_row_alone(tiny, kind):
    """Row i's last q_i + L columns (its virtual tokens, then its tokens at Qmax + j) equal the row alone;
    BERT's classifier reads column 0, where padding copies the row's first position."""
    model = _mixed_model(tiny, kind)
    kw = {k: v for k, v in _inputs(kind, rows=len(MAPPING)).items() if k != "labels"}
    with torch.no_grad(), pe.adapter_batch(model, MAPPING):
        mixed = _main(model(**kw))
    qmax = 5
    assert mixed.shape[:2] == ((5, 3) if kind == "bert_cls" else (5, qmax + 6))
    for row, name in enumerate(MAPPING):
        alone = run_alone(model, name, lambda: _main(model(**{k: v[row:row + 1] for k, v in kw.items()})))
        got = mixed[row] if kind == "bert_cls" else mixed[row, qmax - Q.get(name, 0):]
        torch.testing.assert_close(got, alone[0], msg=f"row {row} ({name})")
    assert not torch.isnan(mixed).any()


def test_mixed_loss_and_gradients_match_each_row_alone(tiny):
    """Training several prompt adapters in one batch: the loss is the mean over every row's labelled tokens (as
    the rows alone, summed per row, divided by the count), each adapter's gradient comes from its rows alone."""
    model = _mixed_model(tiny, "llama")
    model.train()
    kw = _inputs("llama", rows=len(MAPPING))
    with pe.adapter_batch(model, MAPPING):
        out = model(**kw)
        out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    total, count = 0.0, 0
    for row, name in enumerate(MAPPING):
        labels = kw["labels"][row:row + 1]
        # Alone, a row's loss averages its labelled tokens after the first, and the first too behind a prompt.
        n = (labels[:, 1:] != -100).sum() + (labels[:, 0] != -100).sum() * (name in Q)
        loss = run_alone(model, name, lambda: model(**{k: v[row:row + 1] for k, v in kw.items()}).loss)
        if name is not None:
            pe.set_active_adapter(model, name)
            (loss * n).backward()
            pe.set_active_adapter(model, None)
        total, count = total + loss.detach() * n, count + n
    torch.testing.assert_close(out.loss, total / count)
    for name, grad in grads.items():
        param = dict(model.named_parameters())[name]
        torch.testing.assert_close(grad, param.grad / count, msg=name)
    assert {n.split(".")[-1] for n in grads if LAYER_NAME in n} == {"p3", "p5"}


def test_mixed_generation_matches_each_row_alone(tiny):
    model = _mixed_model(tiny, "llama")
    kw = _inputs("llama", rows=len(MAPPING))
    ids, mask = kw["input_ids"], kw["attention_mask"]
    with torch.no_grad(), pe.adapter_batch(model, MAPPING):
        greedy = _generate(model, ids, attention_mask=mask, max_new_tokens=4)
        beams = model.generate(ids, attention_mask=mask, max_new_tokens=3, num_beams=2, num_return_sequences=2,
                               pad_token_id=0)
    for row, name in enumerate(MAPPING):
        one = dict(attention_mask=mask[row:row + 1])
        alone = run_alone(model, name, lambda: _generate(model, ids[row:row + 1], max_new_tokens=4, **one))
        assert torch.equal(greedy.sequences[row], alone.sequences[0]), f"row {row} ({name})"
        torch.testing.assert_close(torch.stack(greedy.logits)[:, row], torch.stack(alone.logits)[:, 0])
        alone_beams = run_alone(model, name, lambda: model.generate(ids[row:row + 1], max_new_tokens=3, num_beams=2,
                                                                    num_return_sequences=2, pad_token_id=0, **one))
        assert torch.equal(beams[2 * row:2 * row + 2], alone_beams), f"row {row} ({name})"


@pytest.mark.skipif(not any(t.__name__ == "PrefixConfig" for t in inject.METHODS), reason="needs prefix tuning")
def test_prompt_composes_with_prefix_in_one_adapter(tiny):
    """A task with a prefix and a prompt: generation steps equal the forward teacher-forced on its output, and
    in a mixed batch with prefix-only, prompt-only and base rows each row equals the row alone."""
    model = tiny("llama")
    pe.add_adapter(model, "both", [pe.PrefixConfig(num_virtual_tokens=4), pe.PromptConfig(num_virtual_tokens=3)])
    pe.add_adapter(model, "prefix", pe.PrefixConfig(num_virtual_tokens=2))
    pe.add_adapter(model, "prompt", pe.PromptConfig(num_virtual_tokens=2))
    ids = _ids(4)
    with torch.no_grad():
        out = _generate(model, ids[:2], max_new_tokens=3)
        forced = model(input_ids=out.sequences).logits
        torch.testing.assert_close(torch.stack(out.logits, dim=1), forced[:, 3 + 6 - 1:-1])
        mapping = ["both", "prefix", "prompt", None]
        with pe.adapter_batch(model, mapping):
            mixed = model(input_ids=ids).logits
    for row, name in enumerate(mapping):
        q = {"both": 3, "prompt": 2}.get(name, 0)
        alone = run_alone(model, name, lambda: model(input_ids=ids[row:row + 1]).logits)
        torch.testing.assert_close(mixed[row, 3 - q:], alone[0], msg=f"row {row} ({name})")


# ----------------------------------------------------------------------------------- lifecycle and errors
def test_disable_remove_and_unload_restore_the_model(tiny):
    model, base = tiny("llama"), tiny("llama")
    state = copy.deepcopy(base.state_dict())
    ids = _ids(2)
    pe.add_adapter(model, "a", pe.PromptConfig(num_virtual_tokens=3))
    pe.add_adapter(model, "b", [pe.LoraConfig(r=2, target_modules=["q_proj"]), pe.PromptConfig(num_virtual_tokens=2)])
    with pe.disable_adapters(model):
        torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits)
    pe.remove_adapter(model, "a")
    assert getattr(model, LAYER_NAME).adapter_names() == ["b"] and len(model._forward_pre_hooks) == 1
    pe.unload(model)
    assert not model._forward_pre_hooks and not model._forward_pre_hooks_with_kwargs and not hasattr(model, LAYER_NAME)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits)


class NoEmbeds(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids):
        return self.embed(input_ids)


@pytest.mark.parametrize("make,config,match", [
    (lambda tiny: tiny("llama"), lambda: pe.PromptConfig(num_virtual_tokens=0), "positive"),
    (lambda tiny: tiny("llama"), lambda: pe.PromptConfig(init="nope"), "init"),
    (lambda tiny: tiny("llama"), lambda: pe.PromptConfig(init="text", init_text="w1"), "tokenizer"),
    (lambda tiny: tiny("llama"), lambda: pe.PromptConfig(init="text", init_text="w1", tokenizer="/no/such/dir"),
     "could not be loaded"),
    (lambda tiny: NoEmbeds(), lambda: pe.PromptConfig(), "inputs_embeds"),
    (lambda tiny: nn.Linear(2, 2), lambda: pe.PromptConfig(), "input embeddings"),
])
def test_bad_configs_and_models_fail_before_any_change(tiny, make, config, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = make(tiny)
    with pytest.raises(ValueError, match=match):
        pe.add_adapter(model, "a", config())
    assert not hasattr(model, LAYER_NAME) and not model._forward_pre_hooks


@pytest.mark.parametrize("mapping", [None, ["p3", None, "p5"]], ids=["one_adapter", "mixed_batch"])
def test_generate_again_from_a_returned_cache_is_refused(tiny, mapping):
    """transformers slices a new generate call's input by the cache's length, which holds the Q virtual tokens
    too: it would feed tokens the cache holds again (wrong tokens, nothing raised). Refused, clearly; generating
    from the whole sequence gives what one uninterrupted generate does."""
    model = tiny("llama")
    pe.add_adapter(model, "p3", pe.PromptConfig(num_virtual_tokens=3))
    pe.add_adapter(model, "p5", pe.PromptConfig(num_virtual_tokens=5, init="vocab"))
    rows = 1 if mapping is None else len(mapping)
    ids = torch.randint(1, 128, (rows, 6), generator=torch.Generator().manual_seed(3))
    kw = dict(pad_token_id=0, do_sample=False, return_dict_in_generate=True)

    def run():
        whole = model.generate(ids, max_new_tokens=6, min_new_tokens=6, **kw)
        first = model.generate(ids, max_new_tokens=3, min_new_tokens=3, **kw)
        with pytest.raises(ValueError, match="generate given a cache that holds tokens .* is not supported"):
            model.generate(first.sequences, cache=first.cache, max_new_tokens=3, min_new_tokens=3, **kw)
        again = model.generate(first.sequences, max_new_tokens=3, min_new_tokens=3, **kw)
        torch.testing.assert_close(again.sequences, whole.sequences, rtol=0, atol=0)

    with torch.no_grad():
        if mapping is None:
            run_alone(model, "p3", run)
        else:
            with pe.adapter_batch(model, mapping):
                run()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_mixed_batch_on_gpu_with_triton_kernels(tiny, monkeypatch):
    """bf16 on CUDA, LoRA rows through the Triton kernels: each mixed row within bf16 error of the row alone,
    float32 prompt Parameters cast to bf16 when prepended, and generation runs without NaN."""
    monkeypatch.setenv("PTLM_BACKEND", "triton")
    model = _mixed_model(tiny, "llama").cuda().to(torch.bfloat16)
    for name, p in model.named_parameters():   # .to() cast everything: float32 adapters, as a fresh one has
        if p.requires_grad or LAYER_NAME in name or "lora_" in name:
            p.data = p.data.float()
    kw = {k: v.cuda() for k, v in _inputs("llama", rows=len(MAPPING)).items() if k != "labels"}
    with torch.no_grad(), pe.adapter_batch(model, MAPPING):
        mixed = model(**kw).logits
        out = model.generate(**kw, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert mixed.dtype == torch.bfloat16 and not torch.isnan(mixed).any() and out.shape == (5, 10)
    for row, name in enumerate(MAPPING):
        alone = run_alone(model, name, lambda: model(**{k: v[row:row + 1] for k, v in kw.items()}).logits)
        torch.testing.assert_close(mixed[row, 5 - Q.get(name, 0):].float(), alone[0].float(), rtol=2e-2, atol=2e-2)
