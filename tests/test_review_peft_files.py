"""Review: adapter-file interop with HF PEFT 0.21 in depth (io/*.py), the cases PEFT users produce that the
other file tests leave out. Each LoRA case goes both ways: PEFT's save_pretrained -> pe.load_adapter gives PEFT's
outputs, and pe.add_adapter + random weights + pe.save_adapter -> PeftModel.from_pretrained gives ours."""
import json
import warnings

import peft
import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file

import ptlm_engine as pe
from ptlm_engine import inject
from ptlm_engine.io import read_config
from tests.helpers import pristine_builder, randomize_trainable

pytestmark = [pytest.mark.usefixtures("reference_backend"),
              pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::RuntimeWarning")]

V = 96
_DEC = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, vocab_size=V)
_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=V,
             max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
             classifier_dropout=0.0)

BUILDERS = {
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**_DEC, num_hidden_layers=2)),
    "llama3": lambda: T.LlamaForCausalLM(T.LlamaConfig(**_DEC, num_hidden_layers=3)),
    "llama_tied": lambda: T.LlamaForCausalLM(T.LlamaConfig(**_DEC, num_hidden_layers=2, tie_word_embeddings=True)),
    "llama_wide": lambda: T.LlamaForCausalLM(T.LlamaConfig(**dict(_DEC, hidden_size=48, num_attention_heads=4),
                                                           num_hidden_layers=2)),
    "llama_cls": lambda: T.LlamaForSequenceClassification(T.LlamaConfig(**_DEC, num_hidden_layers=2, num_labels=3,
                                                                        pad_token_id=0)),
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=V, n_positions=40,
                                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                                   bos_token_id=0, eos_token_id=0)),
    "bert": lambda: T.BertModel(T.BertConfig(**_BERT)),
    "bert_cls": lambda: T.BertForSequenceClassification(T.BertConfig(**_BERT, num_labels=3)),
    "bert_tok": lambda: T.BertForTokenClassification(T.BertConfig(**_BERT, num_labels=5)),
    "bert_qa": lambda: T.BertForQuestionAnswering(T.BertConfig(**_BERT)),
    "t5": lambda: T.T5ForConditionalGeneration(T.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                          num_decoder_layers=2, num_heads=4, vocab_size=V,
                                                          dropout_rate=0.0, decoder_start_token_id=0)),
}
build = pristine_builder(BUILDERS)


IDS = torch.randint(1, V, (2, 7), generator=torch.Generator().manual_seed(1))


def out(model, ids=IDS):
    with torch.no_grad():
        cfg = getattr(model, "config", None)
        if getattr(cfg, "is_encoder_decoder", False):
            o = model(input_ids=ids, decoder_input_ids=ids)
        else:
            o = model(input_ids=ids)
    for name in ("logits", "start_logits", "last_hidden_state"):
        if getattr(o, name, None) is not None:
            return o[name] if name != "start_logits" else torch.cat([o.start_logits, o.end_logits], -1)
    raise AssertionError(type(o))


def peft_saved(kind, config, path, adapter_name="default", **save_kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(build(kind), config, adapter_name=adapter_name)
    randomize_trainable(theirs, scale=0.2)
    theirs.eval()
    theirs.save_pretrained(path, **save_kw)
    return theirs


def from_pretrained(kind, path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(build(kind), path, **kw).eval()


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, type(m)) for n, m in model.named_modules()])


def assert_unchanged(model, snap):
    state, modules = snap
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert not pe.adapter_configs(model)


def assert_load_refused(kind, path, match=None):
    """Loading the files in `path` into a fresh `kind` model raises a ValueError (matching `match`) and changes
    nothing."""
    ours = build(kind)
    snap = snapshot(ours)
    with pytest.raises(ValueError, match=match):
        pe.load_adapter(ours, path, name="a")
    assert_unchanged(ours, snap)


def _ours_kw(peft_kw):
    """The pe.LoraConfig fields for a PEFT LoraConfig's kwargs (inert ones dropped)."""
    rename = {"lora_alpha": "alpha", "lora_dropout": "dropout"}
    drop = {"task_type", "init_lora_weights", "fan_in_fan_out"}
    return {rename.get(k, k): v for k, v in peft_kw.items() if k not in drop}


# ------------------------------------------------------------------------------------ LoRA, both directions
LORA_CASES = {
    "ltt_int_pattern": ("llama3", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                       layers_to_transform=1, layers_pattern="layers")),
    "ltt_list_pattern_list": ("llama3", dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                             layers_to_transform=[0, 2], layers_pattern=["layers"])),
    "rank_alpha_regex_keys": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
                                            rank_pattern={r"model\.layers\.0\.self_attn\.q_proj": 2,
                                                          r"layers\.\d\.self_attn\.o_proj": 6},
                                            alpha_pattern={r"layers\.1\.self_attn\.v_proj": 3})),
    "rank_alpha_suffix_keys_rslora": ("llama", dict(r=4, lora_alpha=8, use_rslora=True,
                                                    target_modules=["q_proj", "v_proj", "gate_proj"],
                                             rank_pattern={"gate_proj": 2, "v_proj": 8},
                                             alpha_pattern={"q_proj": 32, "gate_proj": 1})),
    "regex_target": ("llama", dict(r=4, target_modules=r"model\.layers\.[01]\.(self_attn\.k_proj|mlp\.up_proj)")),
    "all_linear_exclude": ("llama", dict(r=2, target_modules="all-linear",
                                         exclude_modules=["down_proj", "layers.0.self_attn.q_proj"])),
    "dropout_init_false": ("llama", dict(r=4, lora_dropout=0.3, init_lora_weights=False,
                                         target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")),
    "gpt2_fifo_bias_all": ("gpt2", dict(r=4, lora_alpha=16, fan_in_fan_out=True, bias="all",
                                        target_modules=["c_attn", "c_fc"], task_type="CAUSAL_LM")),
    "gpt2_bias_lora_only": ("gpt2", dict(r=4, fan_in_fan_out=True, bias="lora_only", target_modules=["c_proj"])),
    "llama_seqcls_score": ("llama_cls", dict(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["score"],
                                             task_type="SEQ_CLS")),
    "llama_seqcls_implicit": ("llama_cls", dict(r=4, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")),
    "bert_seqcls_classifier_bias_all": ("bert_cls", dict(r=4, target_modules=["query", "value"], bias="all",
                                                         modules_to_save=["classifier"], task_type="SEQ_CLS")),
    "bert_seqcls_all_linear": ("bert_cls", dict(r=2, target_modules="all-linear", task_type="SEQ_CLS")),
    "bert_tokcls": ("bert_tok", dict(r=4, target_modules=["query", "value"], task_type="TOKEN_CLS")),
    "bert_qa": ("bert_qa", dict(r=4, target_modules=["query", "key"], task_type="QUESTION_ANS")),
    "bert_feature": ("bert", dict(r=4, target_modules=["query", "dense"], bias="lora_only",
                                  task_type="FEATURE_EXTRACTION")),
    "t5_seq2seq": ("t5", dict(r=4, target_modules=["q", "v", "wo"], task_type="SEQ_2_SEQ_LM")),
    "lm_head_untied": ("llama", dict(r=4, target_modules=["q_proj", "lm_head"])),
    "embed_and_lm_head_untied": ("llama", dict(r=4, target_modules=["embed_tokens", "lm_head"])),
    "lm_head_tied": ("llama_tied", dict(r=4, target_modules=["v_proj", "lm_head"])),
}


@pytest.mark.parametrize("case", LORA_CASES)
def test_peft_lora_file_loads_with_peft_outputs(case, tmp_path):
    kind, kw = LORA_CASES[case]
    theirs = peft_saved(kind, peft.LoraConfig(**kw), tmp_path)
    ours = build(kind)
    pe.load_adapter(ours, tmp_path, name="x")
    torch.testing.assert_close(out(ours), out(theirs), atol=1e-5, rtol=1e-5)
    # the same trainable-parameter count as PEFT's (modules it adapts, ranks, copies)
    peft_n = sum(p.numel() for n, p in theirs.named_parameters() if p.requires_grad
                 and ".original_module." not in n)
    pe.set_active_adapter(ours, "x")
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == peft_n


# Our side of the implicit SEQ_CLS head copy: PEFT's task model adds it, a plain LoraConfig does not.
_OUR_HEAD_COPY = {"llama_seqcls_implicit": dict(modules_to_save=["score"]),
                 "bert_seqcls_all_linear": dict(modules_to_save=["classifier"])}


@pytest.mark.parametrize("case", LORA_CASES)
def test_our_lora_file_loads_in_peft(case, tmp_path):
    kind, kw = LORA_CASES[case]
    ours = build(kind)
    pe.add_adapter(ours, "mine", pe.LoraConfig(**{**_ours_kw(kw), **_OUR_HEAD_COPY.get(case, {})}))
    randomize_trainable(ours, seed=3, scale=0.2)
    pe.save_adapter(ours, "mine", tmp_path)
    theirs = from_pretrained(kind, tmp_path)
    torch.testing.assert_close(out(theirs), out(ours), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["rank_alpha_suffix_keys_rslora", "llama_seqcls_score", "gpt2_fifo_bias_all",
                                  "t5_seq2seq"])
def test_peft_file_reloaded_and_resaved_by_us_loads_in_peft(case, tmp_path):
    """PEFT file -> ours -> our file -> PEFT: the outputs PEFT started with."""
    kind, kw = LORA_CASES[case]
    theirs = peft_saved(kind, peft.LoraConfig(**kw), tmp_path / "peft")
    ours = build(kind)
    pe.load_adapter(ours, tmp_path / "peft", name="x")
    pe.save_adapter(ours, "x", tmp_path / "ours")
    back = from_pretrained(kind, tmp_path / "ours")
    torch.testing.assert_close(out(back), out(theirs), atol=1e-5, rtol=1e-5)


def test_all_linear_on_a_sequence_classifier_without_task_type_targets_what_peft_targets():
    """PEFT's "all-linear" leaves out only the output embeddings (get_output_embeddings(), None on a classifier),
    so without a task_type a Llama classifier's `score` gets LoRA too."""
    kw = dict(r=2, target_modules="all-linear")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(build("llama_cls"), peft.LoraConfig(**kw))
    peft_layers = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
    ours = build("llama_cls")
    pe.add_adapter(ours, "a", pe.LoraConfig(**kw))
    assert {n for n, _ in inject.lora_layers(ours)} == peft_layers


# ------------------------------------------------------------------------- PEFT's directory layouts
def test_non_default_adapter_name_is_saved_in_a_subfolder_and_loads(tmp_path):
    """get_peft_model(..., adapter_name="sst2").save_pretrained(d) writes d/sst2/: loading d, d/sst2 or
    d with subfolder="sst2" gives PEFT's outputs."""
    theirs = peft_saved("llama", peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), tmp_path,
                        adapter_name="sst2")
    assert (tmp_path / "sst2" / "adapter_config.json").is_file()
    assert not (tmp_path / "adapter_config.json").exists()
    for where, kw in [(tmp_path / "sst2", {}), (tmp_path, dict(subfolder="sst2")), (tmp_path, {})]:
        ours = build("llama")
        pe.load_adapter(ours, where, name="sst2", **kw)
        torch.testing.assert_close(out(ours), out(theirs), atol=1e-5, rtol=1e-5)


def test_multi_adapter_peft_directory_loads_each_adapter(tmp_path):
    """A PeftModel with 'default' and 'second' saves default at the top and second in d/second/: each loads."""
    theirs = peft_saved("llama", peft.LoraConfig(r=4, target_modules=["q_proj"]), tmp_path)
    theirs.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj", "up_proj"]))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if ".second." in n:
                p.normal_(0, 0.2)
    theirs.save_pretrained(tmp_path)
    assert (tmp_path / "second" / "adapter_config.json").is_file()
    ours = build("llama")
    pe.load_adapter(ours, tmp_path, name="default")
    pe.load_adapter(ours, tmp_path, name="second", subfolder="second")
    theirs.set_adapter("default")
    pe.set_active_adapter(ours, "default")
    torch.testing.assert_close(out(ours), out(theirs), atol=1e-5, rtol=1e-5)
    theirs.set_adapter("second")
    pe.set_active_adapter(ours, "second")
    torch.testing.assert_close(out(ours), out(theirs), atol=1e-5, rtol=1e-5)


def test_two_non_default_peft_adapters_in_one_directory_are_not_merged_into_one(tmp_path):
    """PEFT with adapters 'x' and 'y' (neither 'default') writes d/x/ and d/y/ and nothing at the top. Loading d
    must not silently make one combined adapter out of two independent LoRA adapters: either a clear error or
    (at least) not the sum of both."""
    theirs = peft_saved("llama", peft.LoraConfig(r=4, target_modules=["q_proj"]), tmp_path, adapter_name="x")
    theirs.add_adapter("y", peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if ".y." in n:
                p.normal_(0, 0.2)
    theirs.save_pretrained(tmp_path)
    assert (tmp_path / "x" / "adapter_config.json").is_file() and (tmp_path / "y" / "adapter_config.json").is_file()
    ours = build("llama")
    snap = snapshot(ours)
    try:
        pe.load_adapter(ours, tmp_path, name="xy")
    except ValueError:
        assert_unchanged(ours, snap)
        return
    outs = out(ours)
    theirs.set_adapter("x")
    ox = out(theirs)
    theirs.set_adapter("y")
    oy = out(theirs)
    assert torch.allclose(outs, ox, atol=1e-5) or torch.allclose(outs, oy, atol=1e-5), \
        "two independent PEFT adapters were loaded as one adapter summing both"


def _bin_file(tmp_path):
    theirs = peft_saved("llama", peft.LoraConfig(r=4, target_modules=["q_proj"]), tmp_path,
                        safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file() and not (tmp_path / "adapter_model.safetensors").exists()
    return theirs


def test_garbled_bin_file_is_refused_clearly_and_changes_nothing(tmp_path):
    """A truncated adapter_model.bin fails with a ValueError naming the file; the model is unchanged."""
    _bin_file(tmp_path)
    data = (tmp_path / "adapter_model.bin").read_bytes()
    (tmp_path / "adapter_model.bin").write_bytes(data[: len(data) // 2])
    assert_load_refused("llama", tmp_path, "adapter_model.bin")


def test_peft_bin_file_loads(tmp_path):
    theirs = _bin_file(tmp_path)
    ours = build("llama")
    pe.load_adapter(ours, tmp_path, name="a")
    torch.testing.assert_close(out(ours), out(theirs), atol=1e-5, rtol=1e-5)


def test_directory_with_both_safetensors_and_bin_reads_safetensors_as_peft(tmp_path):
    theirs = peft_saved("llama", peft.LoraConfig(r=4, target_modules=["q_proj"]), tmp_path)
    decoy = {k: torch.zeros_like(v) for k, v in load_file(tmp_path / "adapter_model.safetensors").items()}
    torch.save(decoy, tmp_path / "adapter_model.bin")
    expected = out(from_pretrained("llama", tmp_path))
    torch.testing.assert_close(expected, out(theirs))
    ours = build("llama")
    pe.load_adapter(ours, tmp_path, name="a")
    torch.testing.assert_close(out(ours), expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ prefix / prompt tuning
PREFIX_TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "FEATURE_EXTRACTION"}


@pytest.mark.parametrize("kind,projection", [("llama", False), ("gpt2", True), ("bert", True)])
def test_prefix_files_both_ways(kind, projection, tmp_path):
    cfg = peft.PrefixTuningConfig(task_type=PREFIX_TASK[kind], num_virtual_tokens=3, prefix_projection=projection,
                                  encoder_hidden_size=16 if projection else None)
    theirs = peft_saved(kind, cfg, tmp_path / "peft")
    ours = build(kind)
    pe.load_adapter(ours, tmp_path / "peft", name="p")
    torch.testing.assert_close(out(ours), out(theirs), atol=1e-5, rtol=1e-5)

    mine = build(kind)
    pe.add_adapter(mine, "p", pe.PrefixConfig(num_virtual_tokens=3, projection=projection,
                                              encoder_hidden_size=16 if projection else None))
    randomize_trainable(mine, seed=4, scale=0.2)
    pe.save_adapter(mine, "p", tmp_path / "ours")
    back = from_pretrained(kind, tmp_path / "ours")
    torch.testing.assert_close(out(back), out(mine), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {f"w{i}": i for i in range(V - 1)} | {"[UNK]": V - 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("tok")
    T.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(path)
    return str(path)


PROMPT_TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "FEATURE_EXTRACTION", "bert_cls": "SEQ_CLS"}


@pytest.mark.parametrize("kind,init", [("llama", "TEXT"), ("gpt2", "TEXT"), ("gpt2", "RANDOM"), ("bert", "TEXT"),
                                       ("bert_cls", "TEXT")])
def test_prompt_files_both_ways(kind, init, tmp_path, tokenizer_dir):
    text = dict(prompt_tuning_init_text="w3 w4 w5", tokenizer_name_or_path=tokenizer_dir) if init == "TEXT" else {}
    cfg = peft.PromptTuningConfig(task_type=PROMPT_TASK[kind], num_virtual_tokens=4, prompt_tuning_init=init, **text)
    theirs = peft_saved(kind, cfg, tmp_path / "peft")
    ours = build(kind)
    pe.load_adapter(ours, tmp_path / "peft", name="q")
    torch.testing.assert_close(out(ours), out(theirs), atol=1e-5, rtol=1e-5)
    pe.save_adapter(ours, "q", tmp_path / "ours")
    back = from_pretrained(kind, tmp_path / "ours")
    torch.testing.assert_close(out(back), out(theirs), atol=1e-5, rtol=1e-5)
    if init == "TEXT":
        saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
        assert saved["prompt_tuning_init_text"] == "w3 w4 w5"


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_t5_prompt_learning_files_are_refused_clearly_and_change_nothing(method, tmp_path):
    cfg = (peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3) if method == "prefix" else
           peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3))
    peft_saved("t5", cfg, tmp_path)
    assert_load_refused("t5", tmp_path, "num_transformer_submodules|encoder-decoder")


# ------------------------------------------------------------------------------------------ malformed inputs
UNSUPPORTED = {
    "IA3": lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "LOHA": lambda: peft.LoHaConfig(r=4, target_modules=["q_proj", "v_proj"]),
    "LOKR": lambda: peft.LoKrConfig(r=4, target_modules=["q_proj", "v_proj"]),
    "ADALORA": lambda: peft.AdaLoraConfig(r=4, target_modules=["q_proj", "v_proj"], total_step=10),
    "VERA": lambda: peft.VeraConfig(r=4, target_modules=["q_proj", "o_proj"]),
    "DORA": lambda: peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True),
    "P_TUNING": lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=16),
    "LN_TUNING": lambda: peft.LNTuningConfig(target_modules=["input_layernorm"]),
}


@pytest.mark.parametrize("what", UNSUPPORTED)
def test_unsupported_peft_methods_are_refused_by_name_and_change_nothing(what, tmp_path):
    peft_saved("llama", UNSUPPORTED[what](), tmp_path)
    ours = build("llama")
    pe.add_adapter(ours, "keep", pe.LoraConfig(r=2, target_modules=["k_proj"]))
    snap = snapshot(ours)
    with pytest.raises(ValueError, match="use_dora" if what == "DORA" else what):
        pe.load_adapter(ours, tmp_path, name="bad")
    state, modules = snap
    assert [(n, type(m)) for n, m in ours.named_modules()] == modules
    assert all(torch.equal(v, state[k]) for k, v in ours.state_dict().items())
    assert list(pe.adapter_configs(ours)) == ["keep"]
    with pytest.raises(ValueError, match="use_dora" if what == "DORA" else what):
        read_config(tmp_path)


def _edit(path, fn):
    tensors = load_file(path / "adapter_model.safetensors")
    fn(tensors)
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("what,match", [
    ("missing", r"missing base_model\.model\.model\.layers\.1\.self_attn\.v_proj\.lora_B\.weight"),
    ("extra", r"unexpected base_model\.model\.model\.layers\.0\.mlp\.up_proj\.lora_A\.weight"),
    ("extra_foreign", r"unexpected base_model\.model\.nonsense\.weight"),
    ("shape", r"shape"),
    ("int_dtype", r"floating point"),
])
def test_tensor_problems_in_a_peft_file_are_refused_and_change_nothing(what, match, tmp_path):
    peft_saved("llama", peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), tmp_path)
    k = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"

    def change(t):
        if what == "missing":
            del t[k]
        elif what == "extra":
            t["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 32)
        elif what == "extra_foreign":
            t["base_model.model.nonsense.weight"] = torch.zeros(3)
        elif what == "shape":
            t[k] = torch.zeros(t[k].shape[0], 3)
        elif what == "int_dtype":
            t[k] = t[k].to(torch.int32)
    _edit(tmp_path, change)
    assert_load_refused("llama", tmp_path, match)


@pytest.mark.parametrize("src,dst,match", [
    ("llama3", "llama", r"unexpected .*layers\.2\."),          # adapter of a 3-layer model, 2-layer base
    ("llama", "llama3", r"missing .*layers\.2\."),             # and the other way round
    ("llama", "llama_wide", r"shape"),                         # another hidden size
    ("llama", "gpt2", r"matched no module|missing|unexpected"),  # another architecture
])
def test_base_model_mismatch_is_refused_and_changes_nothing(src, dst, match, tmp_path):
    peft_saved(src, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), tmp_path)
    assert_load_refused(dst, tmp_path, match)


def test_layers_to_transform_beyond_the_model_is_refused(tmp_path):
    """An adapter for layer 2 only (of a 3-layer model) matches nothing in a 2-layer model."""
    peft_saved("llama3", peft.LoraConfig(r=4, target_modules=["q_proj"], layers_to_transform=[2]), tmp_path)
    assert_load_refused("llama", tmp_path)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_prompt_learning_file_for_another_base_is_refused(method, tmp_path):
    cfg = (peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3) if method == "prefix" else
           peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    peft_saved("llama3", cfg, tmp_path)
    assert_load_refused("llama_wide" if method == "prompt" else "llama", tmp_path, "shape")


def test_trainable_token_indices_file_is_refused_by_name(tmp_path):
    peft_saved("llama", peft.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[3, 7]), tmp_path)
    assert_load_refused("llama", tmp_path, "trainable_token_indices")


# ------------------------------------------------------------------- findings: save_embedding_layers, layouts
# PEFT's save_embedding_layers=True (or "auto" after the vocabulary was resized) files the base model's input and
# output embeddings by their module names (get_input_embeddings / get_output_embeddings), whatever they are
# called, and for prompt-learning adapters under "base_model.<module>". PeftModel.from_pretrained writes them in.
EMB_FILES = {
    "llama_lora": ("llama", lambda: peft.LoraConfig(r=4, target_modules=["q_proj"])),
    "gpt2_lora_wte": ("gpt2", lambda: peft.LoraConfig(r=4, target_modules=["c_attn"])),
    "bert_lora_word_embeddings": ("bert", lambda: peft.LoraConfig(r=4, target_modules=["query"])),
    "t5_lora_shared": ("t5", lambda: peft.LoraConfig(r=4, target_modules=["q"], task_type="SEQ_2_SEQ_LM")),
    "llama_prompt": ("llama", lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
    "llama_prefix": ("llama", lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
}


@pytest.mark.parametrize("case", list(EMB_FILES))
def test_peft_file_with_save_embedding_layers_loads_like_peft(case, tmp_path):
    kind, config = EMB_FILES[case]
    peft_saved(kind, config(), tmp_path, save_embedding_layers=True)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tables = [k for k in tensors if k != "prompt_embeddings" and "lora_" not in k]
    assert tables, "PEFT wrote no embedding table"
    for k in tables:                                  # a changed row, in every copy (tied tables hold two)
        tensors[k][int(IDS[0, 0])] = 0.25
    save_file(tensors, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    expected = out(from_pretrained(kind, tmp_path))
    ours = build(kind)
    pe.load_adapter(ours, tmp_path, name="a")
    torch.testing.assert_close(out(ours), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["llama_lora", "llama_prompt", "llama_prefix"])
def test_base_tables_from_a_peft_file_stay_in_the_model_not_in_our_save(case, tmp_path):
    """The tables such a file holds are written into the model's own embeddings (as PEFT does); save_adapter then
    writes the adapter alone, for every method (the tables are the base's now, not the adapter's); a file whose
    table does not fit is refused with the model unchanged."""
    kind, config = EMB_FILES[case]
    peft_saved(kind, config(), tmp_path / "peft", save_embedding_layers=True)
    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    table = next(k for k in tensors if k.endswith("embed_tokens.weight"))
    tensors[table][int(IDS[0, 0])] = 0.25
    save_file(tensors, tmp_path / "peft" / "adapter_model.safetensors", metadata={"format": "pt"})
    ours = build(kind)
    pe.load_adapter(ours, tmp_path / "peft", name="a")
    torch.testing.assert_close(ours.model.embed_tokens.weight[int(IDS[0, 0])], torch.full((32,), 0.25))
    pe.save_adapter(ours, "a", tmp_path / "ours")
    written = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert not [k for k in written if k.endswith(("embed_tokens.weight", "lm_head.weight"))], sorted(written)
    tensors[table] = tensors[table][:-1]
    save_file(tensors, tmp_path / "peft" / "adapter_model.safetensors", metadata={"format": "pt"})
    assert_load_refused(kind, tmp_path / "peft", "embed_tokens.weight: shape")


def test_saving_beside_a_peft_adapter_named_lora_keeps_its_files(tmp_path):
    peft_saved("llama", peft.LoraConfig(r=4, target_modules=["q_proj"]), tmp_path, adapter_name="lora")
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    ours = build("llama")
    pe.add_adapter(ours, "mine", pe.LoraConfig(r=2, target_modules=["v_proj"]))
    pe.save_adapter(ours, "mine", tmp_path)
    assert (tmp_path / "lora" / "adapter_config.json").is_file()
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
