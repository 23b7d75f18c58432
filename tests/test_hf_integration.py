"""An adapted model among the rest of the Hugging Face ecosystem (save_pretrained / from_pretrained, PEFT's
auto classes, accelerate's meta-device init and offload hooks, generate options, pipelines, encoder-decoder
models, torch.save / deepcopy / export), as an expert PEFT user expects it to behave."""
from __future__ import annotations

import copy
import io
import json
import warnings

import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, BartConfig,
                          BartForConditionalGeneration, BertConfig, BertForSequenceClassification, GPT2Config,
                          GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration)

import ptlm_engine as pe
from tests.helpers import LogitsOf

pytestmark = pytest.mark.usefixtures("reference_backend")


# ------------------------------------------------------------------------------------------------ pieces
def _llama(**kw) -> LlamaForCausalLM:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, intermediate_size=128, vocab_size=128,
                                            pad_token_id=0, eos_token_id=1, bos_token_id=2, **kw)).eval()


def _gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=32,
                                          bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                          attn_pdrop=0.0)).eval()


def _t5() -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16,
                                               vocab_size=128, decoder_start_token_id=0, pad_token_id=0,
                                               eos_token_id=1, dropout_rate=0.0)).eval()


def _bart() -> BartForConditionalGeneration:
    torch.manual_seed(0)
    return BartForConditionalGeneration(BartConfig(
        d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=128, max_position_embeddings=64, dropout=0.0,
        attention_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
        forced_eos_token_id=None)).eval()


def _bert_cls(problem_type: str, num_labels: int) -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=128,
        max_position_embeddings=32, num_labels=num_labels, problem_type=problem_type, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)).eval()


def _randomize(model, seed=0, scale=0.3) -> None:
    """Fresh random values in every trainable tensor (LoRA B, bottleneck up start at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _ids(rows=2, length=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (rows, length), generator=gen)


CONFIGS = {
    "lora": lambda: pe.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    "prompt": lambda: pe.PromptConfig(num_virtual_tokens=4),
    "prefix": lambda: pe.PrefixConfig(num_virtual_tokens=4),
    "bottleneck": lambda: pe.BottleneckConfig(bottleneck=8),
}


def _adapted(method: str, seed=0) -> LlamaForCausalLM:
    model = _llama()
    pe.add_adapter(model, "a", CONFIGS[method]())
    _randomize(model, seed)
    return model


def _greedy(model, ids, steps):
    """Greedy decoding by full forwards, no cache: the ground truth for generate's greedy tokens."""
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


def _quiet_load(cls, path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_pretrained(path, **kw).eval()


# ------------------------------------------------------------------------------------- PEFT's auto classes
def test_lora_adapter_file_loads_with_peft_autopeftmodel(tmp_path):
    """peft.AutoPeftModelForCausalLM.from_pretrained(adapter_dir) loads the base model named in the adapter's
    base_model_name_or_path and applies the adapter. A LoRA file without task_type carries `auto_mapping`
    ({"base_model_class", "parent_library"}), as PEFT's save_pretrained writes it, for AutoPeftModel to pick the
    class by (regression: "Cannot infer the auto class from the config")."""
    import peft
    _llama().save_pretrained(tmp_path / "base")
    model = _quiet_load(AutoModelForCausalLM, tmp_path / "base")
    pe.add_adapter(model, "a", pe.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    _randomize(model)
    pe.save_adapter(model, "a", tmp_path / "adapter")
    ids = _ids()
    expected = model(input_ids=ids).logits
    theirs = _quiet_load(peft.AutoPeftModelForCausalLM, tmp_path / "adapter")
    torch.testing.assert_close(theirs(input_ids=ids).logits, expected)


# ---------------------------------------------------------------------------- accelerate: meta device, offload
@pytest.mark.parametrize("method", ["lora", "bottleneck"])
def test_meta_init_then_to_empty_and_load(method):
    """The meta-device flow of big-model loading and FSDP: build under accelerate.init_empty_weights, inject
    adapters, `model.to_empty(device=...)`, then load_state_dict, as PEFT's LoRA layers allow (its
    low_cpu_mem_usage path creates adapters on meta): single and mixed batches give the source model's outputs
    (regression: the pools copied their scalars off the meta device, "Cannot copy out of meta tensor")."""
    import accelerate
    source = _adapted(method)
    ids = _ids()
    expected = source(input_ids=ids).logits
    with accelerate.init_empty_weights():
        model = LlamaForCausalLM(source.config)
    pe.add_adapter(model, "a", CONFIGS[method]())
    model.to_empty(device="cpu")
    model.load_state_dict(source.state_dict())
    model.model.rotary_emb.inv_freq.copy_(source.model.rotary_emb.inv_freq)     # a non-persistent buffer
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected)
        with pe.adapter_batch(model, ["a", None]):
            torch.testing.assert_close(model(input_ids=ids).logits[0], expected[0])


def test_meta_init_then_assign_load_serves_mixed_batch():
    """The other meta-device flow: adapters injected on a meta model, then load_state_dict(..., assign=True)
    (what transformers' and accelerate's loaders do): single and mixed batches serve the loaded weights (the
    pool, still on meta, moves to the weights' device without copying from meta)."""
    import accelerate
    source = _adapted("lora")
    ids = _ids()
    expected = source(input_ids=ids).logits
    with accelerate.init_empty_weights():
        model = LlamaForCausalLM(source.config)
    pe.add_adapter(model, "a", CONFIGS["lora"]())
    model.load_state_dict(source.state_dict(), assign=True)
    model.model.rotary_emb.inv_freq = source.model.rotary_emb.inv_freq.clone()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected)
        with pe.adapter_batch(model, ["a", None]):
            torch.testing.assert_close(model(input_ids=ids).logits[0], expected[0])


@pytest.mark.parametrize("method", ["lora", "bottleneck"])
def test_accelerate_cpu_offload_is_refused_by_name(method):
    """accelerate.cpu_offload(model) moves every Parameter to the meta device and puts it back in each module's
    pre-forward hook. ptlm's fused layers read their weights directly, so those hooks do not run for the adapter
    weights: not supported (README), and the error says why rather than only naming a device mismatch."""
    import accelerate
    model = _adapted(method)
    accelerate.cpu_offload(model, execution_device="cpu")
    with torch.no_grad(), pytest.raises(ValueError, match="got meta .weights with no data: offloaded by accelerate"):
        model(input_ids=_ids())


# ------------------------------------------------------------------------ configs, checkpoints, other classes
def test_prefix_on_a_model_built_from_an_adapted_models_config():
    """A prefix adapter switches model.config._attn_implementation to 'ptlm_prefix_sdpa' while it is on the
    model. A second model built from that config (AutoModelForCausalLM.from_config(model.config), a reference
    or draft model) inherits the name and runs as a plain model; a prefix adapter added to it reads the name
    back as its original, 'sdpa' (regression: refused, "uses 'ptlm_prefix_sdpa'")."""
    adapted = _adapted("prefix")
    other = AutoModelForCausalLM.from_config(adapted.config).eval()
    ids = _ids()
    base = other(input_ids=ids).logits
    pe.add_adapter(other, "p", pe.PrefixConfig(num_virtual_tokens=4))
    _randomize(other)
    assert not torch.allclose(other(input_ids=ids).logits, base)


# ============================================================================ scenarios that hold (passing)
def test_save_pretrained_keeps_base_keys_and_merged_unload_round_trips(tmp_path):
    """save_pretrained of an adapted model: base keys unchanged (a plain from_pretrained loads the base model,
    ignoring the adapter keys); after pe.unload(merge=True), save_pretrained + from_pretrained gives the adapted
    outputs (as PEFT's merge_and_unload + save_pretrained)."""
    model = _llama()
    base_keys = set(model.state_dict())
    pe.add_adapter(model, "a", CONFIGS["lora"]())
    _randomize(model)
    ids = _ids()
    with pe.disable_adapters(model):
        base = model(input_ids=ids).logits
    adapted = model(input_ids=ids).logits
    assert base_keys <= set(model.state_dict())
    model.save_pretrained(tmp_path / "with")
    torch.testing.assert_close(_quiet_load(AutoModelForCausalLM, tmp_path / "with")(input_ids=ids).logits, base)
    pe.unload(model, merge=True)
    assert set(model.state_dict()) == base_keys
    model.save_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_quiet_load(AutoModelForCausalLM, tmp_path / "merged")(input_ids=ids).logits,
                               adapted, atol=1e-4, rtol=1e-4)     # merged weights round differently


def test_tied_gpt2_head_copy_merged_unload_round_trips(tmp_path):
    """GPT-2 (tied wte / lm_head) with modules_to_save=["lm_head"]: unload(merge=True) puts the trained copy in
    place (untied, as PEFT), and save_pretrained + from_pretrained keeps it (transformers does not re-tie keys
    whose values differ)."""
    model = _gpt2()
    pe.add_adapter(model, "a", pe.LoraConfig(r=4, target_modules=["c_attn"], modules_to_save=["lm_head"]))
    _randomize(model)
    ids = _ids()
    adapted = model(input_ids=ids).logits
    pe.unload(model, merge=True)
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(_quiet_load(GPT2LMHeadModel, tmp_path)(input_ids=ids).logits, adapted,
                               atol=1e-4, rtol=1e-4)


def test_seq_cls_merged_unload_round_trips(tmp_path):
    model = _bert_cls("single_label_classification", 3)
    pe.add_adapter(model, "a", pe.LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
    _randomize(model)
    ids = _ids()
    adapted = model(input_ids=ids).logits
    pe.unload(model, merge=True)
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(_quiet_load(AutoModelForSequenceClassification, tmp_path)(input_ids=ids).logits,
                               adapted, atol=1e-4, rtol=1e-4)     # merged weights round differently


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_generate_options_match_greedy_and_mixed_batch(method):
    """generate's greedy tokens equal full-forward greedy decoding (with the cache and without), with prompt
    lookup (batch 1), and inside adapter_batch with beams / repetition penalty / scores; (PEFT 0.21's own cached
    generate of prompt / prefix adapters drifts from its forward under transformers 5: not a ptlm issue)."""
    model = _adapted(method)
    model.generation_config.eos_token_id = None          # full-length outputs, comparable with _greedy
    ids = _ids()
    expected = _greedy(model, ids, 5)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), expected)
        assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False), expected)
        one = torch.cat([ids[:1], ids[:1]], 1)
        assert torch.equal(model.generate(one, max_new_tokens=5, do_sample=False, prompt_lookup_num_tokens=3),
                           _greedy(model, one, 5))
        options = dict(max_new_tokens=4, do_sample=False, num_beams=2, repetition_penalty=1.3,
                       return_dict_in_generate=True, output_scores=True, output_logits=True)
        alone = model.generate(ids, **options)
        with pe.adapter_batch(model, ["a", "a"]):
            mixed = model.generate(ids, **options)
    assert torch.equal(alone.sequences, mixed.sequences)


def test_text_generation_pipeline_with_offline_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, pipeline
    raw = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w3"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="w3", pad_token="w0", eos_token="w1",
                                  bos_token="w2")
    model = _adapted("lora")
    model.generation_config.eos_token_id = None
    text = "w5 w9 w33 w17"
    ids = tok(text, return_tensors="pt")["input_ids"]
    new = _greedy(model, ids, 4)[0, ids.shape[1]:]
    out = pipeline("text-generation", model=model, tokenizer=tok)(text, max_new_tokens=4, do_sample=False,
                                                                  return_full_text=False)
    assert out[0]["generated_text"].split() == [f"w{i}" for i in new.tolist()]


@pytest.mark.parametrize("build,targets", [(_t5, ["q", "v"]), (_bart, ["q_proj", "v_proj"])])
def test_encoder_decoder_lora_matches_peft_and_mixed_generate(tmp_path, build, targets):
    """LoRA on q/v of T5 / BART (self and cross attention of the decoder too): PEFT reads the file to the same
    logits; in a mixed batch each row generates (beam search) as alone. Prompt / prefix tuning are refused with a
    clear error."""
    import peft
    model = build()
    pe.add_adapter(model, "a", pe.LoraConfig(r=4, target_modules=targets))
    _randomize(model)
    assert sum(("EncDecAttention" in n or "encoder_attn" in n) and n.endswith(".lora_A")
               for n, _ in model.named_modules()) == 4
    ids, dec = _ids(), _ids(2, 5)
    logits = model(input_ids=ids, decoder_input_ids=dec).logits
    pe.save_adapter(model, "a", tmp_path)
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path).eval()
    torch.testing.assert_close(theirs(input_ids=ids, decoder_input_ids=dec).logits, logits)
    with torch.no_grad():
        ours = model.generate(ids, max_new_tokens=3, num_beams=2, do_sample=False)
        with pe.disable_adapters(model):
            base = model.generate(ids, max_new_tokens=3, num_beams=2, do_sample=False)
        with pe.adapter_batch(model, ["a", None]):
            mixed = model.generate(ids, max_new_tokens=3, num_beams=2, do_sample=False)
    assert torch.equal(mixed[0], ours[0]) and torch.equal(mixed[1], base[1])
    with pytest.raises(ValueError, match="encoder-decoder"):
        pe.add_adapter(build(), "p", pe.PromptConfig(num_virtual_tokens=4))
    with pytest.raises(ValueError, match="cross-attention"):
        pe.add_adapter(build(), "p", pe.PrefixConfig(num_virtual_tokens=4))


@pytest.mark.parametrize("method", list(CONFIGS))
def test_torch_save_deepcopy_and_export(method):
    """torch.save / torch.load of the whole model and copy.deepcopy give the same outputs and generate tokens,
    and the copies are independent of the original; torch.export of the forward matches eager (LoRA and prefix:
    the fused op's custom op and the registered attention function)."""
    model = _adapted(method)
    ids = _ids()
    expected = model(input_ids=ids).logits
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    copied = copy.deepcopy(model)
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected)
    torch.testing.assert_close(copied(input_ids=ids).logits, expected)
    _randomize(copied, seed=7)
    pe.unload(copied)
    torch.testing.assert_close(model(input_ids=ids).logits, expected)
    with torch.no_grad():
        assert torch.equal(loaded.generate(ids, max_new_tokens=3, do_sample=False),
                           model.generate(ids, max_new_tokens=3, do_sample=False))
    if method not in ("lora", "prefix"):
        return
    exported = torch.export.export(LogitsOf(model), (ids,))
    torch.testing.assert_close(exported.module()(ids), expected)


@pytest.mark.parametrize("problem_type,num_labels", [("single_label_classification", 3),
                                                     ("multi_label_classification", 3), ("regression", 1)])
def test_sequence_classification_problem_types(problem_type, num_labels):
    labels = {"single_label_classification": torch.tensor([0, 2]),
              "multi_label_classification": torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]),
              "regression": torch.tensor([0.3, -1.2])}[problem_type]
    for config in [pe.LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]),
                   pe.PromptConfig(num_virtual_tokens=4), pe.PrefixConfig(num_virtual_tokens=4)]:
        model = _bert_cls(problem_type, num_labels)
        pe.add_adapter(model, "a", config)
        _randomize(model)
        out = model(input_ids=_ids(), labels=labels)
        assert out.logits.shape == (2, num_labels)
        out.loss.backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_prompt_tuning_with_gradient_checkpointing_and_input_grads():
    """PEFT calls enable_input_require_grads for prompt learning with checkpointing: the prompt still gets its
    gradient under reentrant checkpointing; trainable counts equal PEFT's for the same LoRA config."""
    import peft
    model = _adapted("prompt")
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    ids = _ids()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    ours = _llama()
    pe.add_adapter(ours, "a", pe.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    theirs = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert (ours.num_parameters(only_trainable=True), ours.num_parameters()) == theirs.get_nb_trainable_parameters()


def test_prompt_and_prefix_files_load_with_autopeftmodel(tmp_path):
    import peft
    _llama().save_pretrained(tmp_path / "base")
    for method in ["prompt", "prefix"]:
        model = _quiet_load(AutoModelForCausalLM, tmp_path / "base")
        pe.add_adapter(model, "a", CONFIGS[method]())
        _randomize(model)
        pe.save_adapter(model, "a", tmp_path / method)
        assert json.loads((tmp_path / method / "adapter_config.json").read_text())["base_model_name_or_path"]
        ids = _ids()
        theirs = _quiet_load(peft.AutoPeftModelForCausalLM, tmp_path / method)
        torch.testing.assert_close(theirs(input_ids=ids).logits, model(input_ids=ids).logits)
