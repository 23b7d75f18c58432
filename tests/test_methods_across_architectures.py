"""Bottleneck adapters and prompt tuning across many tiny Hugging Face architectures and options, end to end
through the public API.

Bottleneck adapters have no HF PEFT equivalent: they are checked against a plain-PyTorch reference written here
(Houlsby et al., 2019; Pfeiffer et al., 2021; He et al., 2022: y = out + s · up(act(down(LN?(h)))) with h the
projection's output for the sequential placements and the sub-layer's input for parallel ones), applied with
ordinary forward hooks to an untouched copy of the same base model. Prompt tuning is checked against HF PEFT 0.21's
PromptTuning on the same weights, and against each row run alone in mixed batches."""
from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
import torch.nn.functional as F
import transformers as T
from torch import nn

import ptlm_engine as pe
from ptlm_engine.layers.prompt import LAYER_NAME as PROMPT
from tests.helpers import run_alone

pytestmark = [pytest.mark.usefixtures("reference_backend"),
              pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

V = 64
_DEC = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
            vocab_size=V)
_ENC = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=V,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
_GPT2 = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=V, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
             attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)

BUILD = {
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**_DEC)),
    "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**_DEC)),
    "mixtral": lambda: T.MixtralForCausalLM(T.MixtralConfig(**_DEC, num_local_experts=2, num_experts_per_tok=1)),
    "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**_DEC)),
    "qwen3": lambda: T.Qwen3ForCausalLM(T.Qwen3Config(**_DEC, head_dim=8)),
    "phi3": lambda: T.Phi3ForCausalLM(T.Phi3Config(**_DEC, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "gemma": lambda: T.GemmaForCausalLM(T.GemmaConfig(**_DEC, head_dim=8)),
    "gemma2": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(**_DEC, head_dim=8)),
    "gemma3": lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(**_DEC, head_dim=8)),
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(**_GPT2)),
    "bert": lambda: T.BertModel(T.BertConfig(**_ENC)),
    "roberta": lambda: T.RobertaModel(T.RobertaConfig(**_ENC)),
    "xlmr": lambda: T.XLMRobertaForSequenceClassification(T.XLMRobertaConfig(**_ENC, num_labels=3)),
    "electra": lambda: T.ElectraModel(T.ElectraConfig(**_ENC, embedding_size=16)),
    # Without a bottleneck placement table (and, last two, encoder-decoders).
    "gpt_neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**{k: v for k, v in _ENC.items() if "dropout" not in k})),
    "gptj": lambda: T.GPTJForCausalLM(T.GPTJConfig(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, vocab_size=V)),
    "opt": lambda: T.OPTForCausalLM(T.OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                ffn_dim=64, vocab_size=V, word_embed_proj_dim=32, dropout=0.0)),
    "falcon": lambda: T.FalconForCausalLM(T.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                         vocab_size=V)),
    "distilbert": lambda: T.DistilBertModel(T.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                                               vocab_size=V, dropout=0.0, attention_dropout=0.0)),
    "albert": lambda: T.AlbertModel(T.AlbertConfig(hidden_size=32, embedding_size=16, num_hidden_layers=2,
                                                   num_attention_heads=4, intermediate_size=64, vocab_size=V)),
    "t5": lambda: T.T5ForConditionalGeneration(T.T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=4, d_kv=8,
                                                          vocab_size=V, decoder_start_token_id=0)),
    "bart": lambda: T.BartForConditionalGeneration(T.BartConfig(d_model=32, encoder_layers=1, decoder_layers=1,
                                                                encoder_attention_heads=4, decoder_attention_heads=4,
                                                                encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=V)),
}
_CACHE: dict[str, nn.Module] = {}


def build(kind: str) -> nn.Module:
    """A fresh copy of the tiny model `kind` (the same random weights every call), in eval mode."""
    if kind not in _CACHE:
        torch.manual_seed(sum(map(ord, kind)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _CACHE[kind] = BUILD[kind]().eval()
    return copy.deepcopy(_CACHE[kind])


def ids_for(rows: int, length: int = 6, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, V, (rows, length), generator=torch.Generator().manual_seed(seed))


def main(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def state_of(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def hooks_of(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def randomize(model, seed: int = 0, scale: float = 0.2) -> None:
    """Random values in every adapter tensor, of every adapter (a new bottleneck's up projection is zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad or "ptlm_" in n or "lora_" in n:
                p.copy_(scale * torch.randn(p.shape, generator=gen))


# ===================================================================================== bottleneck reference
# Per family: the block list, and per site (attention, FFN): the module whose output a sequential adapter changes
# (the attention's / FFN's output projection, after its dropout for BERT), and the sub-layer whose input a parallel
# adapter reads.
_LLAMA_REF = ("model.layers", (("self_attn", "self_attn"), ("mlp", "mlp")))
REF_SITES = {
    **dict.fromkeys(["llama", "mistral", "mixtral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3"],
                    _LLAMA_REF),
    "gpt2": ("transformer.h", (("attn", "attn"), ("mlp", "mlp"))),
    **{k: (prefix + "encoder.layer", (("attention.output.dropout", "attention"), ("output.dropout", "intermediate")))
       for k, prefix in [("bert", ""), ("roberta", ""), ("xlmr", "roberta."), ("electra", "")]},
}
REF_KINDS = {"houlsby": (0, 1), "pfeiffer": (1,), "parallel": (0, 1)}
ACT = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


def _layer_norm(h, w, b):
    h32 = h.float()
    mean = h32.mean(-1, keepdim=True)
    var = (h32 - mean).square().mean(-1, keepdim=True)
    return ((h32 - mean) / torch.sqrt(var + 1e-5) * w + b)


def reference_model(kind: str, adapted: nn.Module, name: str, config: pe.BottleneckConfig, leaves: bool = False):
    """A fresh base model of `kind` with hand-written bottleneck adapters in plain hooks, holding copies of the
    weights adapter `name` of `adapted` has (float32, as leaves that require grad when `leaves`). Returns
    (model, {ptlm parameter name: reference leaf})."""
    model = build(kind)
    for p in model.parameters():
        p.requires_grad_(False)
    blocks, sites = REF_SITES[kind]
    named = dict(adapted.named_parameters())
    params, inputs = {}, {}
    layers = range(model.config.num_hidden_layers) if config.layers_to_transform is None else \
        ([config.layers_to_transform] if isinstance(config.layers_to_transform, int) else config.layers_to_transform)
    for index in layers:
        for k in REF_KINDS[config.placement]:
            at, reads = sites[k]
            prefix = f"{blocks}.{index}.{at}.ptlm_bottleneck"
            leaves_here = []
            for leaf in ["down.{}.weight", "down.{}.bias", "up.{}.weight", "up.{}.bias"] + (
                    ["layer_norm.{}.weight", "layer_norm.{}.bias"] if config.layer_norm else []):
                key = f"{prefix}.{leaf.format(name)}"
                params[key] = named[key].detach().float().clone().requires_grad_(leaves)
                leaves_here.append(params[key])

            def adapter(h, ps=leaves_here):
                dw, db, uw, ub, *ln = ps
                h = h.float()
                if ln:
                    h = _layer_norm(h, *ln)
                return config.scale * (ACT[config.act](h @ dw.T + db) @ uw.T + ub)

            def add(module, args, out, key=(index, k), adapter=adapter):
                first = out[0] if isinstance(out, tuple) else out
                h = inputs.pop(key) if config.placement == "parallel" else first
                y = (first.float() + adapter(h)).to(first.dtype)
                return (y, *out[1:]) if isinstance(out, tuple) else y

            def keep(module, args, kwargs, key=(index, k)):
                inputs[key] = args[0] if args else kwargs["hidden_states"]

            model.get_submodule(f"{blocks}.{index}.{at}").register_forward_hook(add)
            model.get_submodule(f"{blocks}.{index}.{reads}").register_forward_pre_hook(keep, with_kwargs=True)
    return model, params


# The architectures with a placement table, and (placement, act, scale, layer_norm) combinations.
BN_KINDS = ["llama", "mistral", "mixtral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3", "gpt2", "bert",
            "roberta", "xlmr", "electra"]
BN_CONFIGS = {"houlsby-relu-ln": ("houlsby", "relu", 1.0, True), "pfeiffer-gelu": ("pfeiffer", "gelu", 1.0, False),
              "parallel-silu": ("parallel", "silu", 4.0, False), "parallel-gelu-ln": ("parallel", "gelu", 2.0, True)}


def _bn_config(combo, **kw):
    placement, act, scale, layer_norm = BN_CONFIGS[combo]
    return pe.BottleneckConfig(bottleneck=kw.pop("bottleneck", 4), placement=placement, act=act, scale=scale,
                               layer_norm=layer_norm, **kw)


def _enc_inputs(kind, rows=2, length=6):
    ids = ids_for(rows, length)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("kind,combo", [(kind, list(BN_CONFIGS)[(i + j) % 4]) for i, kind in enumerate(BN_KINDS)
                                        for j in (0, 2)])
def test_bottleneck_equals_hand_written_reference_on_each_architecture(kind, combo):
    """On every architecture of the placement table, a new adapter is the identity, has 2md + d + m parameters
    (+ 2d with its LayerNorm) per site, and with random weights equals the papers' adapter at the papers' places
    (hand-written hooks on the untouched base); disable_adapters gives the base; unload restores it exactly."""
    model = build(kind)
    kw = _enc_inputs(kind)
    base, state, hooks = main(model(**kw)), state_of(model), hooks_of(model)
    config = _bn_config(combo)
    pe.add_adapter(model, "a", config)
    torch.testing.assert_close(main(model(**kw)), base, rtol=0, atol=0)
    d, m = model.config.hidden_size, 4
    sites = 2 * len(REF_KINDS[config.placement])
    per = 2 * m * d + d + m + (2 * d if config.layer_norm else 0)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sites * per
    randomize(model)
    ours = main(model(**kw))
    assert not torch.allclose(ours, base)
    ref, _ = reference_model(kind, model, "a", config)
    torch.testing.assert_close(ours, main(ref(**kw)), rtol=1e-5, atol=1e-5)
    with pe.disable_adapters(model):
        torch.testing.assert_close(main(model(**kw)), base, rtol=0, atol=0)
    pe.unload(model)
    assert sorted(model.state_dict()) == sorted(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()) and hooks_of(model) == hooks
    assert all(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(main(model(**kw)), base, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kind", ["gpt_neox", "gptj", "opt", "falcon", "distilbert", "albert", "t5", "bart"])
def test_bottleneck_on_an_architecture_without_sites_fails_clearly_and_changes_nothing(kind):
    """Architectures without a placement table are refused with a ValueError naming the model type, before any
    change: no adapter, no hook, no new parameter, nothing frozen."""
    model = build(kind)
    state, hooks = state_of(model), hooks_of(model)
    with pytest.raises(ValueError, match=model.config.model_type):
        pe.add_adapter(model, "a", pe.BottleneckConfig(bottleneck=4))
    assert sorted(model.state_dict()) == sorted(state) and hooks_of(model) == hooks
    assert all(p.requires_grad for p in model.parameters())
    assert not pe.adapter_configs(model)
    pe.add_adapter(model, "lora", pe.LoraConfig(r=2, target_modules="all-linear"))   # the model is still usable
    assert list(pe.adapter_configs(model)) == ["lora"]


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_prompt_on_an_encoder_decoder_fails_clearly_and_changes_nothing(kind):
    model = build(kind)
    hooks = hooks_of(model)
    with pytest.raises(ValueError, match="encoder-decoder"):
        pe.add_adapter(model, "a", pe.PromptConfig(num_virtual_tokens=3))
    assert hooks_of(model) == hooks and not hasattr(model, PROMPT) and not pe.adapter_configs(model)


@pytest.mark.parametrize("fields", [dict(bottleneck=0), dict(bottleneck=-4), dict(bottleneck=2.5),
                                    dict(bottleneck="8"), dict(placement="sequential"), dict(placement="Houlsby"),
                                    dict(act="tanh"), dict(act="GELU"), dict(scale=float("nan")),
                                    dict(scale=float("inf")), dict(layer_norm="yes"), dict(layers_to_transform=[-1]),
                                    dict(layers_to_transform=[5])])
def test_bad_bottleneck_configs_fail_clearly_and_change_nothing(fields):
    model = build("llama")
    state, hooks = state_of(model), hooks_of(model)
    with pytest.raises(ValueError):
        pe.add_adapter(model, "a", pe.BottleneckConfig(**fields))
    assert sorted(model.state_dict()) == sorted(state) and hooks_of(model) == hooks and not pe.adapter_configs(model)
    assert all(p.requires_grad for p in model.parameters())


def test_merging_a_bottleneck_adapter_is_refused_clearly():
    """A bottleneck adapter has a non-linearity, so it cannot fold into the base weights: merge_adapter raises a
    ValueError and the model keeps computing the adapter."""
    model = build("llama")
    pe.add_adapter(model, "a", pe.BottleneckConfig(bottleneck=4))
    randomize(model)
    ids = ids_for(2)
    before = main(model(input_ids=ids))
    with pytest.raises(ValueError, match="only LoRA"):
        pe.merge_adapter(model, "a")
    torch.testing.assert_close(main(model(input_ids=ids)), before, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("kind,combo", [("llama", "houlsby-relu-ln"), ("gpt2", "parallel-gelu-ln"),
                                        ("bert", "pfeiffer-gelu"), ("gemma2", "parallel-silu")])
def test_bottleneck_gradients_equal_the_reference(kind, combo):
    """Training: loss and every adapter parameter's gradient equal the hand-written reference's; the base stays
    frozen (no gradient)."""
    model = build(kind).train()
    config = _bn_config(combo)
    pe.add_adapter(model, "a", config)
    randomize(model)
    kw = _enc_inputs(kind)
    target = torch.randn(2, 6, main(model(**kw)).shape[-1], generator=torch.Generator().manual_seed(2))
    (main(model(**kw)) * target).sum().backward()
    ref, leaves = reference_model(kind, model, "a", config, leaves=True)
    (main(ref.train()(**kw)) * target).sum().backward()
    named = dict(model.named_parameters())
    assert len(leaves) == sum(p.requires_grad for p in model.parameters())
    for key, leaf in leaves.items():
        torch.testing.assert_close(named[key].grad, leaf.grad, rtol=1e-4, atol=1e-5, msg=key)
    assert all(p.grad is None for n, p in named.items() if "ptlm_bottleneck" not in n)


def test_bottleneck_in_train_mode_with_dropout_equals_reference_under_the_same_seed():
    """BERT with hidden dropout 0.1 in train mode: the adapter sits after the dense projection's dropout (AdapterHub's
    BertSelfOutput / BertOutput) and draws no random numbers itself, so with one seed ours equals the reference;
    in eval mode both are deterministic."""
    torch.manual_seed(0)
    base = T.BertModel(T.BertConfig(**{**_ENC, "hidden_dropout_prob": 0.1})).eval()
    _CACHE["bert_dropout"] = base
    REF_SITES["bert_dropout"] = REF_SITES["bert"]
    model = build("bert_dropout")
    config = _bn_config("houlsby-relu-ln")
    pe.add_adapter(model, "a", config)
    randomize(model)
    ref, _ = reference_model("bert_dropout", model, "a", config)
    kw = _enc_inputs("bert")
    model.train(), ref.train()
    assert all(m.training for m in model.modules())
    torch.manual_seed(7)
    ours = main(model(**kw))
    torch.manual_seed(7)
    torch.testing.assert_close(ours, main(ref(**kw)), rtol=1e-5, atol=1e-5)
    model.eval(), ref.eval()
    assert not any(m.training for m in model.modules())
    torch.testing.assert_close(main(model(**kw)), main(ref(**kw)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_bottleneck_gradients_with_gradient_checkpointing_equal_without(kind):
    """HF gradient checkpointing recomputes each block in backward (the hooks fire again): the gradients equal those
    of a plain backward, and the loss does too."""
    grads = []
    for checkpointing in (False, True):
        model = build(kind).train()
        pe.add_adapter(model, "a", _bn_config("parallel-gelu-ln"))
        randomize(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        main(model(**_enc_inputs(kind))).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


# ------------------------------------------------------------------------------------- half precision
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind,combo", [("llama", "houlsby-relu-ln"), ("gpt2", "parallel-silu"),
                                        ("bert", "pfeiffer-gelu")])
def test_bottleneck_on_a_half_precision_base(kind, combo, dtype):
    """A half-precision base: adapter Parameters are float32 (as PEFT keeps adapter weights), outputs are in the
    base dtype, and serving (no_grad) and training forwards are within half-precision rounding of the float32
    reference on the same half base; gradients reach the float32 Parameters."""
    model = build(kind).to(dtype)
    config = _bn_config(combo)
    pe.add_adapter(model, "a", config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    randomize(model)
    kw = _enc_inputs(kind)
    ref, _ = reference_model(kind, model, "a", config)
    ref = ref.to(dtype)
    with torch.no_grad():
        served, expected = main(model(**kw)), main(ref(**kw))
    tol = dict(rtol=3e-2, atol=3e-2) if dtype == torch.bfloat16 else dict(rtol=5e-3, atol=5e-3)
    assert served.dtype == dtype
    torch.testing.assert_close(served.float(), expected.float(), **tol)
    out = main(model(**kw))
    torch.testing.assert_close(out.float(), expected.float(), **tol)
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in trainable)


# ------------------------------------------------------------------------------------------ lifecycle
@pytest.mark.parametrize("kind,combo,saved", [("qwen3", "houlsby-relu-ln", None), ("gpt2", "parallel-gelu-ln", None),
                                              ("xlmr", "pfeiffer-gelu", ["classifier"]),
                                              ("phi3", "parallel-silu", None)])
def test_bottleneck_files_round_trip_across_architectures(tmp_path, kind, combo, saved):
    """save_adapter then load_adapter into a fresh model gives the same outputs and the same config; loading into
    a model of another architecture (other module paths) fails with a ValueError and adds nothing."""
    model = build(kind)
    config = _bn_config(combo, layers_to_transform=[1], modules_to_save=saved)
    pe.add_adapter(model, "a", config)
    randomize(model)
    kw = _enc_inputs(kind)
    expected = main(model(**kw))
    pe.save_adapter(model, "a", tmp_path / "a")
    fresh = build(kind)
    pe.load_adapter(fresh, tmp_path / "a", name="b")
    torch.testing.assert_close(main(fresh(**kw)), expected, rtol=0, atol=0)
    assert pe.adapter_configs(fresh)["b"] == pe.adapter_configs(model)["a"]
    other = build("gpt2" if kind == "xlmr" else "bert")      # other module paths
    hooks = hooks_of(other)
    with pytest.raises(ValueError):
        pe.load_adapter(other, tmp_path / "a", name="b")
    assert not pe.adapter_configs(other) and hooks_of(other) == hooks


def test_removing_one_of_two_adapters_at_shared_sites_keeps_the_other_exactly():
    """Two adapters sharing sites (a parallel one and a Houlsby one with LayerNorm): removing one leaves the other's
    outputs bit for bit, removing both restores the base modules, hooks and outputs."""
    model = build("llama")
    ids = ids_for(2)
    base, state, hooks = main(model(input_ids=ids)), state_of(model), hooks_of(model)
    pe.add_adapter(model, "par", _bn_config("parallel-silu"))
    pe.add_adapter(model, "seq", _bn_config("houlsby-relu-ln", bottleneck=6))
    randomize(model)
    pe.set_active_adapter(model, "seq")
    seq = main(model(input_ids=ids))
    pe.set_active_adapter(model, "par")
    par = main(model(input_ids=ids))
    pe.remove_adapter(model, "seq")
    torch.testing.assert_close(main(model(input_ids=ids)), par, rtol=0, atol=0)
    pe.add_adapter(model, "seq2", _bn_config("houlsby-relu-ln", bottleneck=6))
    pe.remove_adapter(model, "par")
    pe.set_active_adapter(model, "seq2")
    torch.testing.assert_close(main(model(input_ids=ids)), base, rtol=0, atol=0)   # a new adapter: identity
    assert not torch.allclose(seq, base)
    pe.remove_adapter(model, "seq2")
    assert sorted(model.state_dict()) == sorted(state) and hooks_of(model) == hooks
    assert not any(n.endswith("ptlm_bottleneck") for n, _ in model.named_modules())
    torch.testing.assert_close(main(model(input_ids=ids)), base, rtol=0, atol=0)


# ============================================================================ mixed batches of methods
LORA_TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "qwen2": ["q_proj", "v_proj"],
                "bert": ["query", "value"]}
MIXED = ["bn", "p3", None, "both", "lora", "p5", "bn"]
Q_OF = {"p3": 3, "p5": 5, "both": 2}


def _mixed_methods(kind):
    """A Houlsby adapter with LayerNorm, a parallel one inside a task with a prompt ('both'), prompts of 3 and 5
    virtual tokens, and LoRA, all with random weights."""
    model = build(kind)
    pe.add_adapter(model, "bn", _bn_config("houlsby-relu-ln"))
    pe.add_adapter(model, "p3", pe.PromptConfig(num_virtual_tokens=3))
    pe.add_adapter(model, "both", [_bn_config("parallel-silu", bottleneck=6), pe.PromptConfig(num_virtual_tokens=2)])
    pe.add_adapter(model, "lora", pe.LoraConfig(r=4, target_modules=LORA_TARGETS[kind]))
    pe.add_adapter(model, "p5", pe.PromptConfig(num_virtual_tokens=5, init="vocab"))
    randomize(model)
    return model


def _left_padded(rows, length=7):
    ids = ids_for(rows, length)
    mask = torch.ones_like(ids)
    for row in range(rows):
        mask[row, :row % 3] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2"])
def test_mixed_batch_of_bottleneck_prompt_and_lora_rows_equal_each_row_alone(kind):
    """Rows with bottleneck, prompt, bottleneck+prompt, LoRA and no adapter, left-padded with a mask: each row's
    last q_i + L logits equal the row run alone with its adapter active (README: 'Every method, and any mix of
    them, works in pe.adapter_batch row by row')."""
    model = _mixed_methods(kind)
    ids, mask = _left_padded(len(MIXED))
    with torch.no_grad(), pe.adapter_batch(model, MIXED):
        mixed = model(input_ids=ids, attention_mask=mask).logits
    qmax = max(Q_OF.values())
    assert mixed.shape[:2] == (len(MIXED), qmax + ids.shape[1])
    for row, name in enumerate(MIXED):
        alone = run_alone(model, name,
                          lambda: model(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1]).logits)
        keep = mask[row].bool()
        got = mixed[row, qmax - Q_OF.get(name, 0):]
        q = Q_OF.get(name, 0)
        valid = torch.cat([torch.ones(q, dtype=torch.bool), keep])
        torch.testing.assert_close(got[valid], alone[0][valid], msg=f"row {row} ({name})")


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_mixed_generation_with_beams_and_return_sequences_equals_each_row_alone(kind):
    """generate with beams and num_return_sequences in a mixed batch (bottleneck, prompt, both, LoRA, none;
    left padding): each row's returned sequences equal the row generated alone; greedy search gives the same
    tokens with use_cache=False and from inputs_embeds."""
    model = _mixed_methods(kind)
    mapping = ["both", None, "bn", "p5", "lora"]
    ids, mask = _left_padded(len(mapping), length=5)
    kw = dict(max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0)
    greedy = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad(), pe.adapter_batch(model, mapping):
        mixed = model.generate(ids, attention_mask=mask, **kw)
        cached = model.generate(ids, attention_mask=mask, **greedy)
        # Without a cache every step is a prefill; from inputs_embeds generate returns the new tokens only.
        assert torch.equal(model.generate(ids, attention_mask=mask, use_cache=False, **greedy), cached)
        embeds = model.get_input_embeddings()(ids)
        assert torch.equal(model.generate(inputs_embeds=embeds, attention_mask=mask, **greedy), cached[:, 5:])
    for row, name in enumerate(mapping):
        with torch.no_grad():
            alone = run_alone(model, name, lambda: model.generate(ids[row:row + 1], attention_mask=mask[row:row + 1],
                                                                  **kw))
        torch.testing.assert_close(mixed[2 * row:2 * row + 2], alone, rtol=0, atol=0, msg=f"row {row} ({name})")


def test_task_with_bottleneck_and_prompt_equals_reference_and_round_trips(tmp_path):
    """One task made of a parallel bottleneck adapter and a prompt: the output equals the reference adapters on
    [prompt ; embeddings]; the task saves and loads back to the same outputs."""
    model = build("llama")
    config = _bn_config("parallel-gelu-ln")
    pe.add_adapter(model, "t", [config, pe.PromptConfig(num_virtual_tokens=3)])
    randomize(model)
    ids = ids_for(2)
    ours = model(input_ids=ids).logits
    ref, _ = reference_model("llama", model, "t", config)
    prompt = getattr(model, PROMPT).prompt_embeddings["t"].detach()
    embeds = torch.cat([prompt.expand(2, 3, -1), ref.get_input_embeddings()(ids)], dim=1)
    torch.testing.assert_close(ours, ref(inputs_embeds=embeds).logits, rtol=1e-5, atol=1e-5)
    pe.save_adapter(model, "t", tmp_path / "t")
    fresh = build("llama")
    pe.load_adapter(fresh, tmp_path / "t", name="t")
    torch.testing.assert_close(fresh(input_ids=ids).logits, ours, rtol=0, atol=0)


# ====================================================================================== prompt tuning
_CLS = dict(num_labels=3)
BUILD.update({
    "llama_cls": lambda: T.LlamaForSequenceClassification(T.LlamaConfig(**_DEC, pad_token_id=0, **_CLS)),
    "qwen2_cls": lambda: T.Qwen2ForSequenceClassification(T.Qwen2Config(**_DEC, pad_token_id=0, **_CLS)),
    "roberta_cls": lambda: T.RobertaForSequenceClassification(T.RobertaConfig(**_ENC, **_CLS)),
    "distilbert_cls": lambda: T.DistilBertForSequenceClassification(T.DistilBertConfig(
        dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=V, dropout=0.0, attention_dropout=0.0,
        seq_classif_dropout=0.0, **_CLS)),
    "bert_tok": lambda: T.BertForTokenClassification(T.BertConfig(**_ENC, **_CLS)),
    "bert_qa": lambda: T.BertForQuestionAnswering(T.BertConfig(**_ENC)),
    "electra_cls": lambda: T.ElectraForSequenceClassification(T.ElectraConfig(**_ENC, embedding_size=16, **_CLS)),
})
TASK = {"SEQ_CLS": ("_cls",), "TOKEN_CLS": ("_tok",), "QUESTION_ANS": ("_qa",)}


def task_of(kind):
    return next((task for task, ends in TASK.items() if kind.endswith(ends)), "CAUSAL_LM")


def prompt_pair(kind, q=3, **peft_kw):
    """Our model with prompt adapter 'a' and PEFT's PromptTuning over the same base, holding the same prompt (and,
    for classifiers, the same head: PEFT's modules_to_save copy starts as the original)."""
    ours = build(kind)
    pe.add_adapter(ours, "a", pe.PromptConfig(num_virtual_tokens=q))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(build(kind), peft.PromptTuningConfig(task_type=task_of(kind),
                                                                           num_virtual_tokens=q, **peft_kw))
    with torch.no_grad():
        getattr(ours, PROMPT).prompt_embeddings["a"].normal_(0, 0.5, generator=torch.Generator().manual_seed(4))
        theirs.prompt_encoder.default.embedding.weight.copy_(getattr(ours, PROMPT).prompt_embeddings["a"])
    return ours, theirs


def prompt_inputs(kind, rows=2, length=6):
    ids = ids_for(rows, length)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    kw = {"input_ids": ids.masked_fill(mask == 0, 0 if kind != "roberta_cls" else 1), "attention_mask": mask}
    task = task_of(kind)
    if task == "CAUSAL_LM":
        kw["labels"] = kw["input_ids"].masked_fill(mask == 0, -100)
    elif task == "SEQ_CLS":
        kw["labels"] = torch.arange(rows) % 3
    elif task == "TOKEN_CLS":
        kw["labels"] = (kw["input_ids"] % 3).masked_fill(mask == 0, -100)
    return kw


@pytest.mark.parametrize("kind", ["mistral", "qwen3", "phi3", "gemma", "gemma2", "gpt_neox", "gptj", "opt", "falcon",
                                  "llama_cls", "qwen2_cls", "roberta_cls", "distilbert_cls"])
def test_prompt_outputs_loss_and_gradient_equal_peft_across_architectures(kind):
    """Logits, loss and the prompt's gradient equal HF PEFT's PromptTuning on the same weights (left-padded mask,
    labels with -100), on decoders with rotary / learned / ALiBi positions and on encoder classifiers."""
    extra = dict(token_dim=32, num_attention_heads=4, num_layers=2) if kind == "distilbert_cls" else {}
    ours, theirs = prompt_pair(kind, **extra)
    ours.train(), theirs.train()
    kw = prompt_inputs(kind)
    out, out_peft = ours(**kw), theirs(**kw)
    torch.testing.assert_close(out.logits, out_peft.logits)
    torch.testing.assert_close(out.loss, out_peft.loss)
    out.loss.backward(), out_peft.loss.backward()
    torch.testing.assert_close(getattr(ours, PROMPT).prompt_embeddings["a"].grad,
                               theirs.prompt_encoder.default.embedding.weight.grad)


def test_prompt_token_classification_labels_skip_the_virtual_tokens():
    """A token classifier gets logits for Q + L positions; per-token labels get Q leading -100, so the loss is the
    base loss of the real tokens' logits (PEFT 0.21 leaves the labels L long, which the head cannot take)."""
    model = build("bert_tok")
    pe.add_adapter(model, "a", pe.PromptConfig(num_virtual_tokens=3))
    kw = prompt_inputs("bert_tok")
    out = model(**kw)
    assert out.logits.shape == (2, 9, 3)
    expected = F.cross_entropy(out.logits[:, 3:].reshape(-1, 3), kw["labels"].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_prompt_with_a_narrow_embedding_width_prepends_to_the_embeddings():
    """ELECTRA / ALBERT embed at embedding_size (16) and project to hidden_size (32): a prompt lives in the
    embeddings' width, as inputs_embeds do, and equals the base fed [prompt ; embeddings]."""
    model = build("electra_cls")
    pe.add_adapter(model, "a", pe.PromptConfig(num_virtual_tokens=3))
    prompt = getattr(model, PROMPT).prompt_embeddings["a"]
    assert prompt.shape == (3, 16)
    kw = prompt_inputs("electra_cls")
    out = model(**kw)
    embeds = torch.cat([prompt.detach().expand(2, 3, 16), model.get_input_embeddings()(kw["input_ids"])], dim=1)
    with pe.disable_adapters(model):
        mask = torch.cat([torch.ones(2, 3, dtype=torch.long), kw["attention_mask"]], dim=1)
        base = model(inputs_embeds=embeds, attention_mask=mask, labels=kw["labels"])
    torch.testing.assert_close(out.logits, base.logits)
    torch.testing.assert_close(out.loss, base.loss)


@pytest.mark.parametrize("kind", ["llama_cls", "qwen2_cls"])
def test_mixed_batch_on_a_last_token_classifier_with_right_padding_equals_each_row_alone(kind):
    """LlamaForSequenceClassification pools the last non-pad token, found from input_ids and pad_token_id. With
    right padding (the tokenizers' default for these heads) and a prompt row in the batch, the rows without a
    prompt (base, LoRA) still pool their own last real token, as they do alone, though the model gets
    inputs_embeds."""
    model = build(kind)
    pe.add_adapter(model, "p", pe.PromptConfig(num_virtual_tokens=3))
    pe.add_adapter(model, "lora", pe.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    randomize(model)
    ids = ids_for(3)
    ids[:, 4:] = 0                                                           # right padding, pad_token_id 0
    mask = (ids != 0).long()
    mapping = ["p", None, "lora"]
    with torch.no_grad(), pe.adapter_batch(model, mapping):
        mixed = model(input_ids=ids, attention_mask=mask).logits
    for row, name in enumerate(mapping):
        alone = run_alone(model, name, lambda: model(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1]))
        torch.testing.assert_close(mixed[row], alone.logits[0], msg=f"row {row} ({name})")


def test_question_answering_span_positions_follow_the_shifted_tokens():
    """A QA head with a prompt returns start/end logits over Q + L columns, token j at column Q + j: the span labels
    (start_positions / end_positions) index the input tokens, so they move up by Q, as per-token labels get Q
    leading -100, and the loss is the base loss of the real tokens' logits (PEFT 0.21's
    PeftModelForQuestionAnswering leaves them unshifted, pointing at virtual tokens)."""
    model = build("bert_qa")
    pe.add_adapter(model, "a", pe.PromptConfig(num_virtual_tokens=3))
    ids = ids_for(2)
    start, end = torch.tensor([1, 2]), torch.tensor([2, 4])
    out = model(input_ids=ids, start_positions=start, end_positions=end)
    assert out.start_logits.shape == (2, 3 + 6)
    expected = (F.cross_entropy(out.start_logits, start + 3) + F.cross_entropy(out.end_logits, end + 3)) / 2
    torch.testing.assert_close(out.loss, expected)


def test_question_answering_in_a_mixed_batch_equals_each_row_alone():
    """Rows with prompts of different lengths, and none, in one QA batch: each row's span logits over its own
    columns equal its logits alone, the padding columns before a shorter prompt carry no softmax mass, and the
    batch's span loss is the mean of the rows' losses alone."""
    model = build("bert_qa")
    pe.add_adapter(model, "a", pe.PromptConfig(num_virtual_tokens=3))
    pe.add_adapter(model, "b", pe.PromptConfig(num_virtual_tokens=5))
    randomize(model)
    ids = ids_for(3)
    start, end = torch.tensor([1, 0, 5]), torch.tensor([2, 4, 5])
    mapping = ["a", "b", None]
    with torch.no_grad(), pe.adapter_batch(model, mapping):
        mixed = model(input_ids=ids, start_positions=start, end_positions=end)
    losses = []
    for row, (name, q) in enumerate(zip(mapping, (3, 5, 0))):
        alone = run_alone(model, name, lambda: model(input_ids=ids[row:row + 1], start_positions=start[row:row + 1],
                                                     end_positions=end[row:row + 1]))
        torch.testing.assert_close(mixed.start_logits[row, 5 - q:], alone.start_logits[0].detach())
        torch.testing.assert_close(mixed.end_logits[row, 5 - q:], alone.end_logits[0].detach())
        losses.append(alone.loss.detach())
    torch.testing.assert_close(mixed.loss, torch.stack(losses).mean())


# ------------------------------------------------------------------------------------- prompt caching
@pytest.mark.parametrize("kind", ["llama", "gpt2", "opt", "gemma2"])
def test_prompt_cache_continuation_and_left_padded_generation(kind):
    """A forward that continues a returned cache (chunked prefill, with and without a mask covering the real
    tokens only) equals the one-pass forward; a left-padded row generates what it generates alone unpadded
    (positions of its own, as PEFT's unpadded row has)."""
    model = build(kind)
    pe.add_adapter(model, "a", pe.PromptConfig(num_virtual_tokens=3))
    randomize(model, scale=0.5)
    ids = ids_for(2, 8)
    with torch.no_grad():
        full = model(input_ids=ids).logits
        for with_mask in (False, True):
            first = model(input_ids=ids[:, :5], use_cache=True,
                          **({"attention_mask": torch.ones(2, 5, dtype=torch.long)} if with_mask else {}))
            cache = getattr(first, "past_key_values", None) or first.cache
            rest = model(input_ids=ids[:, 5:], cache=cache, use_cache=True,
                         **({"attention_mask": torch.ones(2, 8, dtype=torch.long)} if with_mask else {}))
            torch.testing.assert_close(rest.logits, full[:, 3 + 5:])
        batch = torch.cat([ids[:1, :6], F.pad(ids[1:, :4], (2, 0))])
        mask = torch.ones_like(batch)
        mask[1, :2] = 0
        kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        padded = model.generate(batch, attention_mask=mask, **kw)
        alone = model.generate(ids[1:, :4], **kw)
    assert torch.equal(padded.sequences[1, 6:], alone.sequences[0, 4:])
    torch.testing.assert_close(torch.stack(padded.logits)[:, 1], torch.stack(alone.logits)[:, 0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prompt_on_a_half_precision_base_equals_peft(dtype):
    """On a half-precision base the prompt Parameter stays float32 (as PEFT's) and is cast when prepended: logits
    equal PEFT's on the same half model; the gradient reaches the float32 prompt."""
    ours, theirs = prompt_pair("llama")
    ours.to(dtype), theirs.to(dtype)
    with torch.no_grad():
        for p in (getattr(ours, PROMPT).prompt_embeddings["a"], theirs.prompt_encoder.default.embedding.weight):
            p.data = p.data.float()
    kw = prompt_inputs("llama")
    out, out_peft = ours(**kw), theirs(**kw)
    assert out.logits.dtype == dtype
    torch.testing.assert_close(out.logits, out_peft.logits)
    out.loss.backward()
    assert getattr(ours, PROMPT).prompt_embeddings["a"].grad.dtype == torch.float32


@pytest.mark.parametrize("kind", ["roberta_cls", "llama_cls", "gpt2", "distilbert_cls"])
def test_prompt_files_both_ways_with_peft_on_more_heads(tmp_path, kind):
    """PEFT's PROMPT_TUNING file (random prompt and, for classifiers, its saved head) loads to PEFT's outputs; ours,
    saved again, loads in PEFT to the same outputs."""
    extra = dict(token_dim=32, num_attention_heads=4, num_layers=2) if kind == "distilbert_cls" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(build(kind), peft.PromptTuningConfig(task_type=task_of(kind),
                                                                           num_virtual_tokens=3, **extra))
    randomize(theirs, scale=0.3)
    theirs.eval().save_pretrained(tmp_path / "peft")
    kw = {k: v for k, v in prompt_inputs(kind).items() if k != "labels"}
    expected = main(theirs(**kw))
    ours = build(kind)
    pe.load_adapter(ours, tmp_path / "peft", name="x")
    torch.testing.assert_close(main(ours(**kw)), expected)
    pe.save_adapter(ours, "x", tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(build(kind), tmp_path / "ours").eval()
    torch.testing.assert_close(main(back(**kw)), expected)
