"""LoRA targeting (ptlm_engine/inject.py, config.py, io/lora.py) against HF PEFT 0.21: for the same LoRA config on
the same model, ptlm adapts the modules PEFT adapts, with the same rank and scale, trains as many parameters, and
computes PEFT's outputs from the same weights; what it does not support it refuses with a clear error, including
in PEFT files."""
import copy
import re
import warnings

import peft
import pytest
import torch
import transformers as T
from torch import nn

import ptlm_engine as pe
from ptlm_engine import inject
from tests.helpers import pristine_builder

pytestmark = [pytest.mark.usefixtures("reference_backend"),
              pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::RuntimeWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

V = 128
_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=V)
_DECODER = dict(_SMALL, num_key_value_heads=2, intermediate_size=64)
_BERT = dict(_SMALL, intermediate_size=64, max_position_embeddings=40, hidden_dropout_prob=0.0,
             attention_probs_dropout_prob=0.0)

BUILDERS = {
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**_DECODER)),
    "llama_tied": lambda: T.LlamaForCausalLM(T.LlamaConfig(**_DECODER, tie_word_embeddings=True)),
    "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**_DECODER)),
    "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**_DECODER)),
    "gemma": lambda: T.GemmaForCausalLM(T.GemmaConfig(**_DECODER, head_dim=8)),
    "phi3": lambda: T.Phi3ForCausalLM(T.Phi3Config(**dict(_DECODER, num_key_value_heads=4), pad_token_id=0,
                                                   bos_token_id=1, eos_token_id=2)),
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=V, n_positions=32,
                                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                                   bos_token_id=0, eos_token_id=0)),
    "gpt_neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**_SMALL, intermediate_size=64)),
    "falcon": lambda: T.FalconForCausalLM(T.FalconConfig(**_SMALL)),
    "opt": lambda: T.OPTForCausalLM(T.OPTConfig(**_SMALL, ffn_dim=64, max_position_embeddings=64,
                                                word_embed_proj_dim=32, dropout=0.0)),
    "bert": lambda: T.BertModel(T.BertConfig(**_BERT)),
    "bert_cls": lambda: T.BertForSequenceClassification(T.BertConfig(**_BERT, num_labels=3, classifier_dropout=0.0)),
    "roberta": lambda: T.RobertaForSequenceClassification(T.RobertaConfig(**_BERT, pad_token_id=1)),
    "distilbert": lambda: T.DistilBertForSequenceClassification(T.DistilBertConfig(
        dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=V, max_position_embeddings=32, dropout=0.0,
        attention_dropout=0.0, seq_classif_dropout=0.0)),
    "t5": lambda: T.T5ForConditionalGeneration(T.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                          num_decoder_layers=2, num_heads=4, vocab_size=V,
                                                          dropout_rate=0.0, decoder_start_token_id=0)),
    "bart": lambda: T.BartForConditionalGeneration(T.BartConfig(
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=V, max_position_embeddings=32, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0)),
    "mixtral": lambda: T.MixtralForCausalLM(T.MixtralConfig(**_DECODER, num_local_experts=4, num_experts_per_tok=2)),
}
build = pristine_builder(BUILDERS)


def peft_config(kw):
    names = {"alpha": "lora_alpha", "dropout": "lora_dropout"}
    return peft.LoraConfig(**{names.get(k, k): v for k, v in kw.items()})


def ours(kind, kw):
    model = build(kind)
    pe.add_adapter(model, "a", pe.LoraConfig(**kw))
    return model


def theirs(kind, kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(build(kind), peft_config(kw))


def our_layers(model):
    return {n: (layer.r["a"], pytest.approx(layer.scale["a"])) for n, layer in inject.lora_layers(model)
            if "a" in layer.r}


def peft_layers(model):
    return {n.removeprefix("base_model.model."): (m.r["default"], m.scaling["default"])
            for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def ids():
    return torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(1))


def output(model, x):
    with torch.no_grad():
        if getattr(model.config, "is_encoder_decoder", False):
            out = model(input_ids=x, decoder_input_ids=x)
        else:
            out = model(input_ids=x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def randomize(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


# ------------------------------------------------------------------------------------------- the passing grid
KINDS = ["llama", "llama_tied", "mistral", "qwen2", "gemma", "phi3", "gpt2", "gpt_neox", "falcon", "opt", "bert",
         "bert_cls", "roberta", "distilbert", "t5", "bart"]
GRID = [
    *((k, dict(r=4, alpha=8, target_modules="all-linear")) for k in KINDS),
    *((k, dict(r=4, alpha=8)) for k in KINDS if k not in ("phi3", "distilbert")),   # PEFT has no default for these
    *((k, dict(r=4, alpha=16, target_modules="all-linear", exclude_modules=r".*\.1\..*", use_rslora=True))
      for k in ("llama", "gpt2", "t5", "bart", "falcon")),
    ("phi3", dict(r=4, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
                  rank_pattern={"gate_up_proj": 8}, use_rslora=True)),
    ("phi3", dict(r=4, target_modules=["self_attn.qkv_proj"], layers_to_transform=1)),
    ("t5", dict(r=4, target_modules=["q", "v"], layers_to_transform=1)),               # block.N.layer.M: the first
    ("t5", dict(r=4, target_modules=["q", "k", "wi"], layers_to_transform=[0], layers_pattern="block")),
    ("t5", dict(r=4, target_modules=["q", "v", "lm_head"], bias="all")),
    ("t5", dict(r=4, target_modules=["q", "v", "wo"], bias="lora_only")),
    ("bart", dict(r=4, target_modules="all-linear", rank_pattern={"fc1": 2}, alpha_pattern={"decoder.*": 2})),
    ("bart", dict(r=4, target_modules=["q_proj", "fc1"], bias="all", layers_to_transform=[1])),
    ("gpt_neox", dict(r=4, target_modules=["query_key_value"],
                      rank_pattern={r"layers\.1\.attention\.query_key_value": 2},
                      alpha_pattern={"query_key_value": 3})),
    ("falcon", dict(r=4, target_modules=["query_key_value", "dense"], use_rslora=True, bias="lora_only")),
    ("gpt2", dict(r=4, target_modules=["lm_head", "c_attn"])),                           # tied head
    ("gpt2", dict(r=4, target_modules=["c_attn", "c_fc"], layers_to_transform=[1], layers_pattern=["h"])),
    ("gpt2", dict(r=4, target_modules=["c_attn"], modules_to_save=["wte"])),
    ("gpt2", dict(r=4, target_modules=["c_attn", "c_proj"], modules_to_save=["mlp.c_proj"])),
    ("llama_tied", dict(r=4, target_modules=["lm_head", "q_proj"])),
    ("llama_tied", dict(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"])),
    ("llama", dict(r=4, target_modules=["model.layers.0.self_attn.q_proj", "v_proj"], layers_to_transform=1)),
    ("llama", dict(r=4, target_modules=["q_proj"], modules_to_save=["norm"])),              # suffix, not at a dot
    ("llama", dict(r=4, target_modules="all-linear", modules_to_save=["lm_head"])),
    ("llama", dict(r=4, target_modules=r"model\.layers\.\d+\.self_attn\.(q|v)_proj",
                   exclude_modules=["layers.1.self_attn.v_proj"], rank_pattern={"v_proj": 2})),
    ("llama", dict(r=4, target_modules=["q_proj", "v_proj"],
                   rank_pattern={"q_proj": 2, "model.layers.1.self_attn.q_proj": 6},
                   alpha_pattern={r"layers\.[01]\.self_attn\.v_proj": 32})),
    ("mistral", dict(r=4, alpha=16, target_modules="all-linear", exclude_modules=["mlp"])),
    ("bert_cls", dict(r=4, target_modules=["query", "classifier"], layers_to_transform=[0])),
    ("bert_cls", dict(r=4, target_modules=["query", "dense"], modules_to_save=["dense"])),
    ("bert_cls", dict(r=4, target_modules=["query", "value"], modules_to_save=["output"])),
    ("bert", dict(r=4, target_modules=["query"], layers_to_transform=[0], layers_pattern=["encoder", "layer"])),
    ("roberta", dict(r=4, target_modules="all-linear", modules_to_save=["classifier"])),
    ("distilbert", dict(r=4, target_modules=["q_lin", "v_lin"], modules_to_save=["pre_classifier", "classifier"],
                        bias="all")),
    ("opt", dict(r=4, target_modules=["q_proj", "fc1"], bias="lora_only", modules_to_save=["lm_head"])),
    ("llama", dict(r=4, target_modules=["q_proj", "embed_tokens"], rank_pattern={"embed_tokens": 2})),
    ("gpt2", dict(r=4, target_modules=["wte", "c_attn"])),                               # tied to the head
    ("opt", dict(r=4, target_modules=["embed_tokens", "q_proj"])),
    ("bert_cls", dict(r=4, target_modules=["word_embeddings", "query"])),
    ("bart", dict(r=4, target_modules=["embed_tokens", "q_proj"])),                       # scaled, shared table
    ("t5", dict(r=4, target_modules=["shared", "q"])),
]


@pytest.mark.parametrize("kind,kw", GRID, ids=[f"{k}-{i}" for i, (k, _) in enumerate(GRID)])
def test_grid_same_modules_ranks_scales_and_trainable_count(kind, kw):
    mine, peft_model = ours(kind, kw), theirs(kind, kw)
    assert our_layers(mine) == peft_layers(peft_model)
    assert trainable(mine) == trainable(peft_model)


_GENERIC = 2 * len(KINDS) - 2 + 5       # the all-linear / default / rslora rows; the hand-picked rows follow
OUTPUT_CASES = GRID[_GENERIC:]


@pytest.mark.parametrize("kind,kw", OUTPUT_CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(OUTPUT_CASES)])
def test_grid_our_files_compute_peft_outputs(kind, kw, tmp_path):
    mine = ours(kind, kw)
    randomize(mine)
    pe.save_adapter(mine, "a", tmp_path)
    loaded = peft.PeftModel.from_pretrained(build(kind), tmp_path).eval()
    torch.testing.assert_close(output(mine, ids()), output(loaded, ids()))


@pytest.mark.parametrize("kind,kw,match", [
    ("llama", dict(target_modules=["q_proj", "input_layernorm"]), "LlamaRMSNorm"),
    ("llama", dict(target_modules=["mlp"]), "LlamaMLP"),
    ("llama", dict(target_modules=r".*(q_proj|norm)"), "LlamaRMSNorm"),
    ("llama", dict(target_modules=["nope"]), "matched no module"),
    ("llama", dict(target_modules=["q_proj"], exclude_modules=["q_proj"]), "matched no module"),
    ("opt", dict(target_modules=["q_proj", "embed_positions"]), "its own forward"),   # positions, not tokens
    ("phi3", dict(), "no default for model_type 'phi3'"),
])
def test_grid_refusals_are_clear(kind, kw, match):
    with pytest.raises(ValueError, match=match):
        ours(kind, dict(r=4, **kw))


@pytest.mark.parametrize("extra,field", [
    (dict(use_dora=True), "use_dora"), (dict(lora_bias=True), "lora_bias"),
    (dict(target_modules=["q_proj"], target_parameters=["self_attn.v_proj.weight"]), "target_parameters"),
    (dict(layer_replication=[[0, 2], [1, 2]]), "layer_replication"),
    (dict(trainable_token_indices=[1, 2, 3]), "trainable_token_indices"),
    (dict(alora_invocation_tokens=[5, 6]), "alora_invocation_tokens"),
])
def test_grid_peft_files_with_unsupported_fields_are_refused_by_name(tmp_path, extra, field):
    model = theirs("llama", {**dict(r=4, target_modules=["q_proj", "v_proj"]), **extra})
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=field):
        pe.load_adapter(build("llama"), tmp_path, name="a")


@pytest.mark.parametrize("init", [False, "gaussian", "orthogonal", "eva", "lora_ga"])
def test_grid_peft_files_with_inert_inits_load_exactly(tmp_path, init):
    """These init_lora_weights values only choose A and B's starting values (the file holds the trained ones)."""
    model = theirs("llama", dict(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=init))
    randomize(model)
    model.save_pretrained(tmp_path)
    mine = build("llama")
    pe.load_adapter(mine, tmp_path, name="a")
    assert trainable(mine) == trainable(model)
    torch.testing.assert_close(output(mine, ids()), output(model.eval(), ids()))


# ----------------------------------------------------------------------------- differences PEFT's users meet
@pytest.mark.parametrize("spelling", ["ALL-LINEAR", "All-Linear"])
def test_all_linear_is_case_insensitive_as_in_peft(spelling):
    """PEFT reads target_modules="all-linear" case-insensitively (tuners_utils._maybe_include_all_linear_layers:
    `peft_config.target_modules.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND`), so "ALL-LINEAR" adapts every linear
    layer but the head; so does ptlm (regression: the string was taken as a regex, "matched no module")."""
    kw = dict(r=4, target_modules=spelling)
    assert our_layers(ours("llama", kw)) == peft_layers(theirs("llama", kw))


def test_peft_mica_file_is_refused_by_name(tmp_path):
    """init_lora_weights="mica" is a LoRA *variant* in PEFT 0.21 (LoraConfig field metadata lora_variants=["mica"];
    variants.MiCALinearVariant.init registers lora_B as a frozen weight): only lora_A trains, also after
    PeftModel.from_pretrained(..., is_trainable=True). Such a file is refused by name (regression: it loaded and
    trained lora_B too, so continued training silently differed from PEFT's)."""
    model = theirs("llama", dict(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="mica"))
    randomize(model)
    model.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(build("llama"), tmp_path, is_trainable=True)
    assert not any(p.requires_grad for n, p in reloaded.named_parameters() if "lora_B" in n)
    with pytest.raises(ValueError, match="init_lora_weights='mica'"):
        pe.load_adapter(build("llama"), tmp_path, name="a")


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "w1", "w2", "w3"]])
def test_mixtral_expert_targets_are_refused_by_name(targets):
    """On transformers v5 Mixtral's experts are fused parameters (mlp.experts.gate_up_proj / down_proj), no longer
    nn.Linear modules. PEFT 0.21 maps the targets users give (the v4 names w1/w2/w3 of every Mixtral recipe, and
    "all-linear") onto them (utils/transformers_weight_conversion._convert_peft_config_moe) and adapts the experts.
    LoRA layers here cannot wrap fused parameters, so such a config is refused by name (regression: the attention
    projections alone were adapted, with no error: a much smaller adapter than PEFT's)."""
    kw = dict(r=4, target_modules=targets)
    expected = {n for n in peft_layers(theirs("mixtral", kw)) if not n.endswith(".base_layer")}
    assert any(".mlp.experts" in n for n in expected)
    with pytest.raises(ValueError, match="holds its experts as fused parameters"):
        ours("mixtral", kw)


def test_torch_conv1d_refusal_is_unambiguous():
    """PEFT adapts torch.nn.Conv1d (lora.layer.Conv1d); ptlm supports nn.Linear and transformers' GPT-2 Conv1D
    only, and its refusal names the classes with their modules, so torch's Conv1d and transformers' Conv1D are told
    apart (regression: "is a Conv1d; LoRA supports Linear, Conv1D")."""
    model = nn.ModuleDict({"conv": nn.Conv1d(4, 4, 1), "proj": nn.Linear(4, 4)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert "conv" in {n.removeprefix("base_model.model.") for n, m in peft.get_peft_model(
            copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=["conv", "proj"])).named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}
    with pytest.raises(ValueError) as info:
        pe.add_adapter(model, "a", pe.LoraConfig(r=2, target_modules=["conv", "proj"]))
    message = str(info.value)
    assert re.search(r"torch\.nn\.(modules\.conv\.)?Conv1d|transformers|GPT-2|not supported", message), message
