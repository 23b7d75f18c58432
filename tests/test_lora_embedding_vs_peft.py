"""LoRA on token embeddings (LoraEmbedding), end to end, as a PEFT / Unsloth user drives it: parity with
HF PEFT 0.21 on the same weights across architectures and heads (outputs, gradients, padding_idx, repeated tokens,
rank / alpha patterns, rsLoRA, target selection), PEFT's files both ways (save_embedding_layers, tied and untied
heads, modules_to_save, unsupported fields), resizing and inputs_embeds, mixed batches with the other methods,
generation, training, checkpointing, compile, merging, dtype moves, copies, pool staleness, and bad input."""
import copy
import io
import json
import pickle
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import (BartConfig, BartForConditionalGeneration, DistilBertConfig, DistilBertModel, FalconConfig,
                          FalconForCausalLM, Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig,
                          GemmaConfig, GemmaForCausalLM, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig,
                          GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification,
                          MistralConfig, MistralForCausalLM, OPTConfig, OPTForCausalLM, Phi3Config, Phi3ForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM, RobertaConfig,
                          RobertaForSequenceClassification, T5Config, T5ForConditionalGeneration)

import ptlm_engine as pe
from ptlm_engine.layers import LoraEmbedding
from tests.helpers import needs_triton, rel_err, run_alone

V = 96


@pytest.fixture(autouse=True)
def _reference(monkeypatch):
    monkeypatch.setenv("PTLM_BACKEND", "reference")


# ------------------------------------------------------------------------------------------------ models
def _llama(tie=False, cls=LlamaForCausalLM, **kw):
    return cls(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                           intermediate_size=64, vocab_size=V, tie_word_embeddings=tie, pad_token_id=0, **kw))


def _small(kind):
    """A tiny random model of `kind`, its embedding's module name (as target_modules names it) and a linear name."""
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(num_key_value_heads=1, **common)), "embed_tokens", "q_proj"
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=1, **common)), "embed_tokens", "v_proj"
    if kind == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(num_key_value_heads=1, head_dim=16, **common)), "embed_tokens", "k_proj"
    if kind == "gemma":
        return GemmaForCausalLM(GemmaConfig(num_key_value_heads=1, head_dim=16, **common)), "embed_tokens", "q_proj"
    if kind == "gemma2":
        return Gemma2ForCausalLM(Gemma2Config(num_key_value_heads=1, head_dim=16, **common)), "embed_tokens", "o_proj"
    if kind == "gemma3":
        return (Gemma3ForCausalLM(Gemma3TextConfig(num_key_value_heads=1, head_dim=16, **common)), "embed_tokens",
                "q_proj")
    if kind == "phi3":
        return (Phi3ForCausalLM(Phi3Config(num_key_value_heads=2, pad_token_id=0, **common)), "embed_tokens",
                "qkv_proj")
    if kind == "gpt_neox":
        return GPTNeoXForCausalLM(GPTNeoXConfig(**common)), "embed_in", "query_key_value"
    if kind == "falcon":
        return (FalconForCausalLM(FalconConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1,
                                               num_attention_heads=2)), "word_embeddings", "query_key_value")
    if kind == "opt":
        return (OPTForCausalLM(OPTConfig(vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                                         num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=40,
                                         dropout=0.0, pad_token_id=1)), "embed_tokens", "q_proj")
    if kind == "gpt2_wpe":
        return (GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=V, n_positions=32,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)), "wpe", "c_attn")
    if kind == "bart":
        return (BartForConditionalGeneration(BartConfig(
            vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32,
            dropout=0.0, scale_embedding=True, pad_token_id=1)), "embed_tokens", "q_proj")
    if kind == "t5":
        return (T5ForConditionalGeneration(T5Config(vocab_size=V, d_model=32, d_kv=16, d_ff=64, num_layers=1,
                                                    num_heads=2, dropout_rate=0.0)), "embed_tokens", "q")
    if kind == "roberta_cls":
        return (RobertaForSequenceClassification(RobertaConfig(
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=40, pad_token_id=1,
            num_labels=3, **common)), "word_embeddings", "query")
    if kind == "distilbert":
        return (DistilBertModel(DistilBertConfig(vocab_size=V, dim=32, hidden_dim=64, n_layers=1, n_heads=2,
                                                 dropout=0.0, attention_dropout=0.0, pad_token_id=0)),
                "word_embeddings", "q_lin")
    if kind == "llama_cls":
        return _llama(cls=LlamaForSequenceClassification, num_labels=3), "embed_tokens", "q_proj"
    raise KeyError(kind)


def _build(kind, seed=0):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, emb, lin = _small(kind)
    return model.eval(), emb, lin


def _peft_model(model, config):
    import peft
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, config)


def _ours_key(peft_name, name="a"):
    """PEFT's trainable parameter name -> ours (adapter "default" -> `name`)."""
    n = peft_name.removeprefix("base_model.model.")
    n = n.replace(".lora_embedding_A.default", f".lora_A.{name}.weight")
    n = n.replace(".lora_embedding_B.default", f".lora_B.{name}.weight")
    return n.replace(".default.", f".{name}.")


def _randomize(model, seed=0, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype))


def _twins(base, ours_config, peft_config, seed=3):
    """(ours, PEFT's) over copies of `base`, the same random adapter values in both."""
    ours = copy.deepcopy(base)
    pe.add_adapter(ours, "a", ours_config)
    _randomize(ours, seed)
    theirs = _peft_model(copy.deepcopy(base), peft_config)
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if p.requires_grad:
                p.copy_(mine[_ours_key(n)])
    return ours, theirs.eval()


def _ids(batch=2, length=9, seed=1, pad=None):
    ids = torch.randint(2, V, (batch, length), generator=torch.Generator().manual_seed(seed))
    ids[:, 1] = ids[:, 3]                                  # a repeated token in every row
    if pad is not None:
        ids[0, -2:] = pad                                  # the padding_idx column
    return ids


def _out(model, ids, **kw):
    cfg = getattr(model, "config", None)
    if getattr(cfg, "is_encoder_decoder", False):
        kw.setdefault("decoder_input_ids", ids[:, :5])
    out = model(input_ids=ids, **kw)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _grads_equal(ours, theirs, rtol=1.3e-4, atol=1e-5):
    theirs_grads = {_ours_key(n): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    checked = 0
    for n, p in ours.named_parameters():
        if p.requires_grad:
            assert (p.grad is None) == (theirs_grads[n] is None), n
            if p.grad is not None:
                torch.testing.assert_close(p.grad, theirs_grads[n], rtol=rtol, atol=atol, msg=n)
                checked += 1
    assert checked == sum(g is not None for g in theirs_grads.values()) > 0


# ------------------------------------------------------------------------------- parity across architectures
ARCHS = ["qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "gpt_neox", "falcon", "opt", "gpt2_wpe",
         "bart", "t5", "roberta_cls", "distilbert", "llama_cls"]


@pytest.mark.parametrize("kind", ARCHS)
def test_outputs_and_gradients_equal_peft_across_architectures(kind):
    """LoRA r=4 on the architecture's token embedding (GPT-NeoX's embed_in, Falcon's word_embeddings, T5's shared,
    BART's scaled encoder / decoder embed_tokens, GPT-2's wpe position table) and one projection: outputs and
    every LoRA gradient equal PEFT's LoRA Embedding on the same weights, with repeated tokens and the padding_idx
    column in the batch (F.embedding gives A's padding column no gradient in PEFT)."""
    import peft
    base, emb, lin = _build(kind)
    pad = getattr(base.config, "pad_token_id", None)
    ours, theirs = _twins(base, pe.LoraConfig(r=4, alpha=8, target_modules=[emb, lin]),
                          peft.LoraConfig(r=4, lora_alpha=8, target_modules=[emb, lin]))
    assert any(isinstance(m, LoraEmbedding) for m in ours.modules())
    ids = _ids(pad=pad)
    y = _out(ours, ids)
    torch.testing.assert_close(y, _out(theirs, ids), rtol=1.3e-5, atol=2e-5)
    y.square().mean().backward()
    _out(theirs, ids).square().mean().backward()
    _grads_equal(ours, theirs)
    for m in ours.modules():
        if isinstance(m, LoraEmbedding) and m.padding_idx is not None and m.lora_A["a"].weight.grad is not None:
            assert torch.all(m.lora_A["a"].weight.grad[:, m.padding_idx] == 0)


# -------------------------------------------------------------------------------- patterns and target choice
def test_rank_pattern_alpha_pattern_and_rslora_on_the_embedding_equal_peft():
    """rank_pattern / alpha_pattern keys that select the embedding give it its own rank and scale, with rsLoRA's
    alpha / sqrt(r), as in PEFT: same shapes, same outputs, same gradients."""
    import peft
    base = _llama()
    kw = dict(r=4, use_rslora=True, target_modules=["embed_tokens", "q_proj"],
              rank_pattern={"embed_tokens": 6}, alpha_pattern={"embed_tokens": 3})
    ours, theirs = _twins(base, pe.LoraConfig(alpha=8, **kw), peft.LoraConfig(lora_alpha=8, **kw))
    layer = ours.model.embed_tokens
    assert layer.lora_A["a"].weight.shape == (6, V) and layer.lora_B["a"].weight.shape == (32, 6)
    assert layer.scale["a"] == pytest.approx(3 / 6 ** 0.5)
    ids = _ids()
    torch.testing.assert_close(_out(ours, ids), _out(theirs, ids))
    _out(ours, ids).sum().backward()
    _out(theirs, ids).sum().backward()
    _grads_equal(ours, theirs)


def _peft_targets(model, config):
    theirs = _peft_model(model, config)
    return sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                  if hasattr(m, "lora_A") and hasattr(m, "base_layer"))


@pytest.mark.parametrize("extra", [dict(layers_to_transform=[1]), dict(exclude_modules=["embed_tokens"]),
                                   dict(exclude_modules=".*layers\\.0\\..*"), dict(layers_to_transform=0,
                                                                                  layers_pattern="layers")])
def test_layers_to_transform_and_exclude_modules_select_the_modules_peft_selects(extra):
    """With layers_to_transform PEFT adapts only modules with a layer index (embed_tokens has none: left out);
    exclude_modules leaves the embedding out by name or regex. The targeted module set equals PEFT's."""
    import peft
    base = _llama()
    targets = ["embed_tokens", "q_proj", "v_proj"]
    ours = copy.deepcopy(base)
    pe.add_adapter(ours, "a", pe.LoraConfig(r=2, target_modules=targets, **extra))
    mine = sorted(n for n, m in ours.named_modules() if hasattr(m, "lora_A") and hasattr(m, "original_module"))
    assert mine == _peft_targets(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=targets, **extra))


# --------------------------------------------------------------------------------------------- PEFT's files
def _peft_saved(base, config, path, tamper=None, **save_kw):
    theirs = _peft_model(copy.deepcopy(base), config)
    _randomize(theirs, seed=7)
    if tamper is not None:
        tamper(theirs)
    theirs.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(path, **save_kw)
    return theirs


def test_peft_file_with_save_embedding_layers_writes_the_base_table(tmp_path):
    """PEFT saves the base embedding weight with an adapter that targets embed_tokens (save_embedding_layers
    "auto"); PeftModel.from_pretrained loads it into the base. load_adapter does the same: a table changed after
    wrapping (new token rows, as after adding tokens) comes back, and the outputs equal PEFT's reloaded model."""
    import peft
    base = _llama()

    def tamper(theirs):
        with torch.no_grad():
            theirs.base_model.model.model.embed_tokens.base_layer.weight[-4:] = 0.5
    theirs = _peft_saved(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
                         tmp_path, tamper)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.model.embed_tokens.base_layer.weight" in keys
    ids = _ids()
    ids[0, 0] = V - 1
    expected = _out(theirs, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(_out(reloaded, ids), expected)
    ours = copy.deepcopy(base)
    pe.load_adapter(ours, tmp_path, name="a")
    torch.testing.assert_close(_out(ours, ids), expected)
    torch.testing.assert_close(ours.model.embed_tokens.weight[-1], torch.full((32,), 0.5))


@pytest.mark.parametrize("tie", [True, False])
def test_peft_file_targeting_embed_tokens_and_lm_head_loads_and_reads_back(tie, tmp_path):
    """A PEFT file with LoRA on both embed_tokens and lm_head (tie_word_embeddings True and False): ours gives
    PEFT's outputs; our save of it gives PEFT's outputs again in PeftModel.from_pretrained."""
    import peft
    base = _llama(tie=tie)
    theirs = _peft_saved(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head"]),
                         tmp_path / "peft")
    ids = _ids()
    expected = _out(theirs, ids)
    ours = copy.deepcopy(base)
    pe.load_adapter(ours, tmp_path / "peft", name="a")
    torch.testing.assert_close(_out(ours, ids), expected)
    pe.save_adapter(ours, "a", tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(_out(back, ids), expected)
    if tie:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_modules_to_save_embedding_with_lora_elsewhere_equals_peft_both_ways(tmp_path):
    """modules_to_save=["embed_tokens"] with LoRA on the projections: the trained copy of the table runs, as in
    PEFT (outputs, gradients of the copy), and files go both ways."""
    import peft
    base = _llama()
    kw = dict(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens"])
    ours, theirs = _twins(base, pe.LoraConfig(alpha=8, **kw), peft.LoraConfig(lora_alpha=8, **kw))
    ids = _ids(pad=0)
    torch.testing.assert_close(_out(ours, ids), _out(theirs, ids))
    _out(ours, ids).square().mean().backward()
    _out(theirs, ids).square().mean().backward()
    _grads_equal(ours, theirs)
    pe.save_adapter(ours, "a", tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(_out(back, ids), _out(ours, ids))
    theirs.save_pretrained(tmp_path / "peft")
    fresh = copy.deepcopy(base)
    pe.load_adapter(fresh, tmp_path / "peft", name="b")
    torch.testing.assert_close(_out(fresh, ids), _out(theirs, ids))


@pytest.mark.parametrize("field", [{"trainable_token_indices": [3, 5]},
                                   {"ensure_weight_tying": True, "target_modules": ["embed_tokens"]}])
def test_peft_files_with_unsupported_embedding_features_are_refused_and_the_model_unchanged(field, tmp_path):
    """trainable_token_indices (PEFT's TrainableTokens on the embedding) and ensure_weight_tying with an embedding
    target change what the adapter computes; a file asking for them is refused with a ValueError naming the field,
    before the model changes."""
    import peft
    base = _llama(tie=True)
    _peft_saved(base, peft.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]), tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg.update(field)
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    ours = copy.deepcopy(base)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(ValueError, match=next(iter(field))):
        pe.load_adapter(ours, tmp_path, name="a")
    assert not pe.adapter_configs(ours) and type(ours.model.embed_tokens) is nn.Embedding
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())


# -------------------------------------------------------------------------- resizing, inputs_embeds, getters
def test_get_input_embeddings_is_the_lora_layer_and_inputs_embeds_bypass_it_as_in_peft():
    """get_input_embeddings returns the LoRA layer (PEFT: its lora.Embedding), whose call applies the adapter; a
    forward given inputs_embeds never calls the embedding, so PEFT and ours both give the base model's output
    for those embeddings."""
    import peft
    base = _llama()
    ours, theirs = _twins(base, pe.LoraConfig(r=4, target_modules=["embed_tokens"]),
                          peft.LoraConfig(r=4, target_modules=["embed_tokens"]))
    ids = _ids()
    assert isinstance(ours.get_input_embeddings(), LoraEmbedding)
    torch.testing.assert_close(ours.get_input_embeddings()(ids), theirs.get_input_embeddings()(ids))
    embeds = base.get_input_embeddings()(ids)
    torch.testing.assert_close(ours(inputs_embeds=embeds).logits, theirs(inputs_embeds=embeds).logits)
    torch.testing.assert_close(ours(inputs_embeds=embeds).logits, base(inputs_embeds=embeds).logits)


def test_resize_before_adding_an_embedding_adapter_equals_peft():
    """model.resize_token_embeddings before the adapter (PEFT's documented order): A has the new vocabulary's
    columns and the new ids get their LoRA rows, as in PEFT."""
    import peft
    base = _llama()
    base.resize_token_embeddings(V + 8)
    ours, theirs = _twins(base, pe.LoraConfig(r=4, target_modules=["embed_tokens"]),
                          peft.LoraConfig(r=4, target_modules=["embed_tokens"]))
    assert ours.model.embed_tokens.lora_A["a"].weight.shape == (4, V + 8)
    ids = _ids()
    ids[:, 0] = V + 5
    torch.testing.assert_close(_out(ours, ids), _out(theirs, ids))


def test_resize_after_adding_an_embedding_adapter_is_refused_as_in_peft():
    """model.resize_token_embeddings with a LoRA embedding in place: transformers refuses PEFT's lora.Embedding
    (TypeError: not an nn.Embedding); ours is refused the same way and the adapted model is left as it was."""
    import peft
    base = _llama()
    ours, theirs = _twins(base, pe.LoraConfig(r=4, target_modules=["embed_tokens"]),
                          peft.LoraConfig(r=4, target_modules=["embed_tokens"]))
    ids = _ids()
    expected = _out(ours, ids)
    with pytest.raises(TypeError):
        theirs.resize_token_embeddings(V + 8)
    with pytest.raises(TypeError, match="not an instance"):
        ours.resize_token_embeddings(V + 8)
    assert isinstance(ours.get_input_embeddings(), LoraEmbedding)
    assert ours.model.embed_tokens.weight.shape == (V, 32)
    torch.testing.assert_close(_out(ours, ids), expected, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- mixed batches
def _multi_method_model():
    """A Llama with an embedding-LoRA adapter "emb", a LoRA on embed_tokens + q_proj "lq", a prompt "pt", a
    prefix "px" and a bottleneck "bn", all with random values."""
    model = _llama()
    pe.add_adapter(model, "emb", pe.LoraConfig(r=4, alpha=8, target_modules=["embed_tokens"]))
    pe.add_adapter(model, "lq", pe.LoraConfig(r=2, alpha=4, target_modules=["embed_tokens", "q_proj"]))
    pe.add_adapter(model, "pt", pe.PromptConfig(num_virtual_tokens=3))
    pe.add_adapter(model, "px", pe.PrefixConfig(num_virtual_tokens=2))
    pe.add_adapter(model, "bn", pe.BottleneckConfig(bottleneck=8))
    for i, name in enumerate(["emb", "lq", "pt", "px", "bn"]):
        pe.set_active_adapter(model, name)
        _randomize(model, seed=10 + i, scale=0.2)
    pe.set_active_adapter(model, "emb")
    return model


ROWS = ["emb", "pt", None, "lq", "px", "bn", "emb"]
Q = 3                                                      # the prompt's virtual tokens


def test_mixed_batch_of_every_method_with_embedding_lora_equals_each_row_alone():
    """A mixed batch of embedding-LoRA, LoRA, prompt, prefix, bottleneck and base rows: each row's logits equal
    that row run alone with its adapter active (PEFT's rule for adapter_names: each row as its own adapter)."""
    model = _multi_method_model()
    ids = _ids(batch=len(ROWS), length=6, seed=4)
    with pe.adapter_batch(model, ROWS), torch.no_grad():
        mixed = model(input_ids=ids).logits
    assert mixed.shape[1] == Q + ids.shape[1]             # the prompt's virtual tokens, left of every row
    for i, name in enumerate(ROWS):
        with torch.no_grad():
            alone = run_alone(model, name, lambda: model(input_ids=ids[i:i + 1]).logits)
        torch.testing.assert_close(mixed[i:i + 1, -alone.shape[1]:], alone, msg=str(name))


def test_mixed_batch_training_of_every_method_gives_each_adapter_its_rows_gradient():
    """Training in one mixed batch: each adapter's gradient equals the sum over its rows of that row alone
    (loss: a sum over rows), the embedding LoRA of two rows included."""
    model = _multi_method_model()
    model.train()
    ids = _ids(batch=len(ROWS), length=6, seed=4)
    params = {n: p for n, p in model.named_parameters() if "lora" in n or "prompt" in n or "prefix" in n
              or "bottleneck" in n}
    assert any("embed_tokens.lora_A.emb" in n for n in params)
    with pe.adapter_batch(model, ROWS):
        logits = model(input_ids=ids).logits
        sum(logits[i, (0 if name == "pt" else Q):].square().sum() for i, name in enumerate(ROWS)).backward()
    mixed = {n: None if p.grad is None else p.grad.clone() for n, p in params.items()}
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    for i, name in enumerate(ROWS):
        if name is None:
            continue
        model.zero_grad()
        run_alone(model, name, lambda: model(input_ids=ids[i:i + 1]).logits.square().sum().backward())
        for n, p in params.items():
            if p.grad is not None:
                expected[n] += p.grad
    for n in params:
        if mixed[n] is None:
            assert expected[n].abs().sum() == 0, n
        else:
            torch.testing.assert_close(mixed[n], expected[n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("mode", ["return_sequences", "left_padding"])
def test_mixed_batch_generation_with_embedding_lora_equals_each_row_alone(mode):
    """generate inside adapter_batch with embedding-LoRA rows: beam search with num_return_sequences (rows
    repeated in place), and left-padded prompts with an attention mask each give, per row, what that row gives
    alone."""
    model = _multi_method_model()
    rows = ["emb", None, "lq", "emb"]
    ids = _ids(batch=len(rows), length=5, seed=6)
    mask = torch.ones_like(ids)
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    if mode == "return_sequences":
        kw.update(num_beams=2, num_return_sequences=2)
    else:
        ids[1, :2] = 0
        mask[1, :2] = 0
        ids[3, :1] = 0
        mask[3, :1] = 0
    with pe.adapter_batch(model, rows), torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, **kw)
    k = kw.get("num_return_sequences", 1)
    for i, name in enumerate(rows):
        keep = mask[i].bool()
        with torch.no_grad():
            alone = run_alone(model, name, lambda: model.generate(input_ids=ids[i:i + 1, keep],
                                                                  attention_mask=mask[i:i + 1, keep], **kw))
        got = out[i * k:(i + 1) * k, ids.shape[1]:]
        assert torch.equal(got, alone[:, alone.shape[1] - got.shape[1]:]), (name, got, alone)


# -------------------------------------------------------------------------------- training machinery
def test_gradient_checkpointing_gives_the_embedding_adapter_the_same_gradients():
    """HF gradient checkpointing (reentrant and not) around blocks fed by a LoRA embedding: the gradients of the
    embedding's A and B equal those without checkpointing."""
    model = _llama()
    pe.add_adapter(model, "a", pe.LoraConfig(r=4, target_modules=["embed_tokens", "v_proj"]))
    _randomize(model)
    model.train()
    ids = _ids()
    model(input_ids=ids, labels=ids).loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for reentrant in (True, False):
        model.zero_grad()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model(input_ids=ids, labels=ids).loss.backward()
        got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert got.keys() == want.keys()
        for n in want:
            torch.testing.assert_close(got[n], want[n], msg=f"{n} reentrant={reentrant}")
        model.gradient_checkpointing_disable()


def test_torch_compile_fullgraph_of_a_scaled_embedding_layer_before_any_eager_call():
    """torch.compile(fullgraph=True) of Gemma 3's LoRA embedding, its first call compiled (embed_scale not yet
    read eagerly), gives the eager output: PEFT's layer compiles (its embed_scale is a tensor)."""
    base, _, _ = _build("gemma3")
    pe.add_adapter(base, "a", pe.LoraConfig(r=4, target_modules=["embed_tokens"]))
    _randomize(base)
    layer = base.model.embed_tokens
    twin = copy.deepcopy(layer)
    ids = _ids()
    torch._dynamo.reset()
    got = torch.compile(layer, fullgraph=True, backend="eager")(ids)
    torch.testing.assert_close(got, twin(ids))


def test_capture_train_step_on_cpu_trains_the_embedding_adapter_as_an_eager_step():
    """pe.capture_train_step runs eagerly off CUDA: its steps equal hand-written AdamW steps on a twin model."""
    model = _llama()
    pe.add_adapter(model, "a", pe.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    _randomize(model)
    twin = copy.deepcopy(model)
    ids = _ids()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    step = pe.capture_train_step(model, opt, {"input_ids": ids, "labels": ids})
    opt2 = torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss = step({"input_ids": ids, "labels": ids})
        opt2.zero_grad()
        loss2 = twin(input_ids=ids, labels=ids).loss
        loss2.backward()
        opt2.step()
        torch.testing.assert_close(torch.as_tensor(loss).detach(), loss2.detach())
    torch.testing.assert_close(model.model.embed_tokens.lora_A["a"].weight, twin.model.embed_tokens.lora_A["a"].weight)
    assert model.model.embed_tokens.lora_A["a"].weight.abs().sum() > 0


# ---------------------------------------------------------------------------- merging, removing, moving
def test_merge_unload_merge_and_disable_with_a_scaled_embedding_equal_peft():
    """Gemma 3 (scaled embedding): merge / unmerge, disable_adapters and unload(merge=True) give PEFT's
    merged outputs; the unloaded model is a plain Gemma 3 whose table holds E + s·(BA)ᵀ."""
    import peft
    base = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                              tie_word_embeddings=False)).eval()
    ours, theirs = _twins(base, pe.LoraConfig(r=4, alpha=8, target_modules=["embed_tokens", "q_proj"]),
                          peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]))
    ids = _ids()
    expected = _out(theirs, ids)
    pe.merge_adapter(ours, "a")
    torch.testing.assert_close(_out(ours, ids), expected, rtol=1e-4, atol=1e-4)
    with pe.disable_adapters(ours):
        torch.testing.assert_close(_out(ours, ids), _out(base, ids), rtol=1e-4, atol=1e-4)
    pe.unmerge_adapter(ours, "a")
    torch.testing.assert_close(_out(ours, ids), expected)
    merged = theirs.merge_and_unload()
    pe.unload(ours, merge=True)
    assert type(ours.model.embed_tokens) is type(base.model.embed_tokens)
    torch.testing.assert_close(ours.model.embed_tokens.weight, merged.model.embed_tokens.weight)
    torch.testing.assert_close(_out(ours, ids), expected, rtol=1e-4, atol=1e-4)


def test_unload_merge_on_a_tied_embedding_is_refused_and_changes_nothing():
    """Llama with tie_word_embeddings: merging the embedding's LoRA would change lm_head too, so
    unload(merge=True) is refused (ValueError) before anything changes: the adapter stays and runs."""
    model = _llama(tie=True)
    pe.add_adapter(model, "a", pe.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    _randomize(model)
    ids = _ids()
    expected = _out(model, ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="tied"):
        pe.unload(model, merge=True)
    assert isinstance(model.model.embed_tokens, LoraEmbedding) and pe.adapter_configs(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(_out(model, ids), expected, rtol=0, atol=0)


def test_remove_one_embedding_adapter_keeps_the_other_and_the_last_restores_the_table():
    """remove_adapter of one of two embedding adapters leaves the other's outputs; removing the last puts back
    the very nn.Embedding object, with its Parameter."""
    model = _llama()
    table = model.model.embed_tokens
    weight = table.weight
    for name in ("a", "b"):
        pe.add_adapter(model, name, pe.LoraConfig(r=2 if name == "a" else 4, target_modules=["embed_tokens"]))
        pe.set_active_adapter(model, name)
        _randomize(model, seed=ord(name))
    ids = _ids()
    expected = _out(model, ids)
    pe.remove_adapter(model, "a")
    torch.testing.assert_close(_out(model, ids), expected)
    pe.remove_adapter(model, "b")
    assert model.model.embed_tokens is table and table.weight is weight


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_keeps_float32_adapters_and_equals_peft(dtype):
    """A half-precision model (adapter added on it, as PEFT's autocast_adapter_dtype): the embedding's A and B
    are float32, outputs equal PEFT's within the dtype's rounding, and the gradients are float32."""
    import peft
    base = _llama().to(dtype)
    ours, theirs = _twins(base, pe.LoraConfig(r=4, alpha=8, target_modules=["embed_tokens"]),
                          peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"]))
    layer = ours.model.embed_tokens
    assert layer.lora_A["a"].weight.dtype == torch.float32
    ids = _ids()
    y = layer(ids)
    y_peft = theirs.base_model.model.model.embed_tokens(ids)
    assert y.dtype == y_peft.dtype == dtype
    torch.testing.assert_close(y, y_peft)
    y.float().square().sum().backward()
    y_peft.float().square().sum().backward()
    assert layer.lora_B["a"].weight.grad.dtype == torch.float32
    _grads_equal(ours, theirs, rtol=2e-2, atol=1e-2)


def test_gemma3_bf16_scaled_embedding_rounds_like_peft():
    """Gemma 3 in bfloat16: the embedding output equals PEFT's, whose base lookup multiplies by embed_scale cast
    to bfloat16 (transformers' rule) and adds the float32 LoRA term times that scale, within bf16 rounding."""
    import peft
    base, _, _ = _build("gemma3")
    base = base.to(torch.bfloat16)
    ours, theirs = _twins(base, pe.LoraConfig(r=4, alpha=8, target_modules=["embed_tokens"]),
                          peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"]))
    ids = _ids()
    y = ours.model.embed_tokens(ids)
    torch.testing.assert_close(y, theirs.base_model.model.model.embed_tokens(ids))
    with pe.disable_adapters(ours):
        assert torch.equal(ours.model.embed_tokens(ids), base.model.embed_tokens(ids))


def test_model_moved_to_half_after_adding_equals_peft_moved_the_same_way():
    """model.half() after the adapter (adapters cast too, as PEFT's .half()): outputs equal PEFT's model moved
    the same way, and the adapter's pool follows the move (served under no_grad)."""
    import peft
    base = _llama()
    ours, theirs = _twins(base, pe.LoraConfig(r=4, alpha=8, target_modules=["embed_tokens"]),
                          peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"]))
    ids = _ids()
    with torch.no_grad():
        ours(input_ids=ids)                       # fills the pool in float32 first
        ours.half()
        theirs.half()
        torch.testing.assert_close(ours.model.embed_tokens(ids), theirs.base_model.model.model.embed_tokens(ids))


def test_deepcopy_pickle_and_state_dict_round_trips_keep_the_embedding_adapter():
    """copy.deepcopy, pickle and a state_dict loaded into a freshly adapted model all give the same outputs;
    state-dict keys keep the table's own name (model.embed_tokens.weight)."""
    model = _llama()
    pe.add_adapter(model, "a", pe.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    _randomize(model)
    ids = _ids()
    expected = _out(model, ids)
    assert "model.embed_tokens.weight" in model.state_dict()
    torch.testing.assert_close(_out(copy.deepcopy(model), ids), expected)
    torch.testing.assert_close(_out(pickle.loads(pickle.dumps(model)), ids), expected)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    fresh = _llama()
    pe.add_adapter(fresh, "a", pe.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    torch.testing.assert_close(_out(fresh, ids), expected)


def test_hot_swapped_embedding_adapter_weights_are_seen_inside_a_block():
    """Inside one adapter_batch block (no grad, the pooled path), writing new values into an embedding adapter
    (copy_, load_state_dict) between calls changes the next call's output: the pool is never stale."""
    model = _multi_method_model()
    ids = _ids(batch=3, length=6, seed=2)
    rows = ["emb", None, "lq"]
    layer = model.model.embed_tokens
    with pe.adapter_batch(model, rows), torch.no_grad():
        first = model(input_ids=ids).logits
        layer.lora_B["emb"].weight.mul_(2.0)
        second = model(input_ids=ids).logits
        layer.lora_A["lq"].load_state_dict({"weight": torch.zeros_like(layer.lora_A["lq"].weight)})
        third = model(input_ids=ids).logits
    assert not torch.allclose(first[0], second[0])
    torch.testing.assert_close(second[1], first[1])
    for i, name in enumerate(rows):
        with torch.no_grad():
            alone = run_alone(model, name, lambda: model(input_ids=ids[i:i + 1]).logits)
        torch.testing.assert_close(third[i:i + 1], alone)
    with torch.no_grad():                         # the one-adapter serving path too
        pe.set_active_adapter(model, "emb")
        a = layer(ids)
        layer.lora_B["emb"].weight.mul_(0.5)
        b = layer(ids)
    assert not torch.allclose(a, b)


# ------------------------------------------------------------------------------------------------ bad input
def test_out_of_range_and_float_ids_raise_like_torch_and_change_nothing():
    """On the CPU an id outside [0, V) raises IndexError as nn.Embedding does, in the one-adapter path and in a
    mixed batch; float ids raise (torch: RuntimeError); the model's outputs afterwards are unchanged."""
    model = _llama()
    pe.add_adapter(model, "a", pe.LoraConfig(r=4, target_modules=["embed_tokens"]))
    _randomize(model)
    ids = _ids()
    expected = _out(model, ids)
    for bad in (V, -1):
        wrong = ids.clone()
        wrong[1, 2] = bad
        with pytest.raises(IndexError):
            nn.Embedding(V, 4)(wrong)
        with pytest.raises(IndexError):
            _out(model, wrong)
        with pytest.raises(IndexError), pe.adapter_batch(model, ["a", None]):
            _out(model, wrong)
    with pytest.raises((RuntimeError, ValueError)):
        model.model.embed_tokens(ids.float())
    torch.testing.assert_close(_out(model, ids), expected, rtol=0, atol=0)


@pytest.mark.parametrize("module", [nn.EmbeddingBag(10, 4), nn.Embedding(10, 4, scale_grad_by_freq=True),
                                    nn.Embedding(10, 4, sparse=True)])
def test_embeddings_the_fused_op_lacks_are_refused_and_the_model_unchanged(module):
    """nn.EmbeddingBag (not a LoRA target in PEFT either), scale_grad_by_freq and sparse tables are refused with
    a ValueError naming the module; the model is left untouched."""
    model = nn.Sequential(module, nn.Linear(4, 4))
    with pytest.raises(ValueError, match="'0'"):
        pe.add_adapter(model, "a", pe.LoraConfig(r=2, target_modules=["0", "1"]))
    assert model[0] is module and type(model[1]) is nn.Linear and not pe.adapter_configs(model)


def test_position_embedding_in_a_mixed_batch_raises_instead_of_mapping_rows_wrongly():
    """GPT-2's wpe (a plain nn.Embedding, LoRA-able in PEFT) is called with position ids of batch size 1 for a
    batch of several rows: in a mixed batch that cannot map rows to adapters; a ValueError is raised rather than
    giving row 0's adapter to every row (PEFT's mixed batch fails there too)."""
    base, emb, _ = _build("gpt2_wpe")
    pe.add_adapter(base, "a", pe.LoraConfig(r=2, target_modules=[emb]))
    _randomize(base)
    ids = _ids()
    try:
        with pe.adapter_batch(base, ["a", None]), torch.no_grad():
            mixed = base(input_ids=ids).logits
    except ValueError:
        return
    for i, name in enumerate(["a", None]):
        with torch.no_grad():
            alone = run_alone(base, name, lambda: base(input_ids=ids[i:i + 1]).logits)
        torch.testing.assert_close(mixed[i:i + 1], alone)


# ------------------------------------------------------------------------------------ Triton (interpreted)
def _backends():
    return ["reference", pytest.param("triton", marks=needs_triton)]


@pytest.mark.parametrize("backend", _backends())
def test_trainable_base_table_under_the_adapter_gets_peft_s_gradient(backend, monkeypatch):
    """A table trained together with its LoRA (requires_grad set on the base weight, as Unsloth's embedding
    training does): its gradient equals PEFT's (F.embedding's: the padding row gets none, repeated ids sum), and
    A's and B's too, on RoBERTa (padding_idx 1)."""
    import peft
    monkeypatch.setenv("PTLM_BACKEND", backend)
    base, emb, lin = _build("roberta_cls")
    ours, theirs = _twins(base, pe.LoraConfig(r=4, alpha=8, target_modules=[emb, lin]),
                          peft.LoraConfig(r=4, lora_alpha=8, target_modules=[emb, lin]))
    table = ours.roberta.embeddings.word_embeddings.weight
    peft_table = theirs.base_model.model.roberta.embeddings.word_embeddings.base_layer.weight
    table.requires_grad_(True)
    peft_table.requires_grad_(True)
    ids = _ids(pad=1)
    y = _out(ours, ids)
    torch.testing.assert_close(y, _out(theirs, ids), rtol=1e-4, atol=1e-5)
    y.square().sum().backward()
    _out(theirs, ids).square().sum().backward()
    torch.testing.assert_close(table.grad, peft_table.grad, rtol=1e-4, atol=1e-6)
    assert torch.all(table.grad[1] == 0)
    lora = ours.roberta.embeddings.word_embeddings
    peft_lora = theirs.base_model.model.roberta.embeddings.word_embeddings
    torch.testing.assert_close(lora.lora_A["a"].weight.grad, peft_lora.lora_embedding_A["default"].grad,
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(lora.lora_B["a"].weight.grad, peft_lora.lora_embedding_B["default"].grad,
                               rtol=1e-4, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_scaled_embedding_in_a_mixed_batch_equals_peft(dtype, monkeypatch):
    """Triton kernels (interpreted): Gemma 3's scaled embedding with two adapters of different ranks in a mixed
    batch (with base rows, repeated ids) gives PEFT's adapter_names forward; A's and B's gradients equal the
    reference backend's."""
    import peft
    monkeypatch.setenv("PTLM_BACKEND", "triton")
    base = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=2, num_key_value_heads=1, head_dim=16)).eval()
    base = base.to(dtype)
    ours, theirs = _twins(base, pe.LoraConfig(r=4, alpha=8, target_modules=["embed_tokens"]),
                          peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"]))
    pe.add_adapter(ours, "b", pe.LoraConfig(r=2, alpha=2, target_modules=["embed_tokens"]))
    pe.set_active_adapter(ours, "b")
    _randomize(ours, seed=9)
    theirs.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["embed_tokens"]))
    layer, peft_layer = ours.model.embed_tokens, theirs.base_model.model.model.embed_tokens
    with torch.no_grad():
        peft_layer.lora_embedding_A["b"].copy_(layer.lora_A["b"].weight)
        peft_layer.lora_embedding_B["b"].copy_(layer.lora_B["b"].weight)
    rows = ["b", None, "a", "b"]
    ids = _ids(batch=4, length=7)
    with pe.adapter_batch(ours, rows), torch.no_grad():
        mixed = layer(ids)
    with torch.no_grad():
        want = peft_layer(ids, adapter_names=["b", "__base__", "default", "b"])
    # fp16: ours reads the float32 A and B as fp16 (one rounding each, documented), PEFT multiplies in float32:
    # within one fp16 ulp of outputs up to ~6
    tol = dict(rtol=2e-3, atol=4e-3) if dtype == torch.float16 else {}
    torch.testing.assert_close(mixed, want, **tol)
    grads = []
    for backend in ("triton", "reference"):
        monkeypatch.setenv("PTLM_BACKEND", backend)
        ours.zero_grad()
        with pe.adapter_batch(ours, rows):
            layer(ids).float().square().sum().backward()
        grads.append([layer.lora_A[n].weight.grad.clone() for n in "ab"] +
                     [layer.lora_B[n].weight.grad.clone() for n in "ab"])
    for got, ref in zip(*grads):          # fp16: sums of fp16 products in another order, held by the norm
        assert rel_err(got, ref) < (4e-3 if dtype == torch.float16 else 1e-5)


@needs_triton
def test_triton_padding_idx_and_repeated_ids_gradients_equal_peft(monkeypatch):
    """Triton kernels (interpreted): DistilBERT's word embeddings (padding_idx 0) with an adapter: outputs, and
    A's gradient (none for the padding column, sums for a repeated id), equal PEFT's."""
    import peft
    monkeypatch.setenv("PTLM_BACKEND", "triton")
    base, emb, lin = _build("distilbert")
    ours, theirs = _twins(base, pe.LoraConfig(r=4, alpha=8, target_modules=[emb]),
                          peft.LoraConfig(r=4, lora_alpha=8, target_modules=[emb]))
    ids = _ids(pad=0)
    y = _out(ours, ids)
    torch.testing.assert_close(y, _out(theirs, ids), rtol=1e-4, atol=1e-5)
    y.square().sum().backward()
    _out(theirs, ids).square().sum().backward()
    _grads_equal(ours, theirs, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------ autocast, float64, generate
@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("batch", [False, True])
def test_embedding_lora_under_autocast_stays_float32_as_peft(backend, batch, monkeypatch):
    """Under torch.autocast(bfloat16) on a float32 model (HF Trainer's bf16=True) an embedding lookup is not an
    autocast op: PEFT's LoRA embedding returns float32, E[ids] + s·A[:, ids]ᵀBᵀ with its matmul autocast to
    bf16 and added to the float32 lookup. Ours returns float32 of the same values (bf16-rounding close), alone and
    in a mixed batch, forward and backward, rather than raising."""
    import peft
    monkeypatch.setenv("PTLM_BACKEND", backend)
    base = _llama()
    ours, theirs = _twins(base, pe.LoraConfig(r=4, alpha=8, target_modules=["embed_tokens"]),
                          peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"]))
    ids = _ids()
    layer, peft_layer = ours.model.embed_tokens, theirs.base_model.model.model.embed_tokens
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_peft = peft_layer(ids)
        if batch:
            with pe.adapter_batch(ours, ["a", "a"]):
                y = layer(ids)
                y.square().sum().backward()
        else:
            y = layer(ids)
            y.square().sum().backward()
    assert y.dtype == y_peft.dtype == torch.float32
    torch.testing.assert_close(y, y_peft, rtol=2e-2, atol=2e-2)
    assert layer.lora_B["a"].weight.grad is not None


def test_float64_and_generate_from_inputs_embeds_equal_peft():
    """A float64 model computes in float64 as PEFT's does; generate from inputs_embeds applies the embedding's
    LoRA to the generated tokens only, as PEFT's does (the prompt's embeddings are given)."""
    import peft
    base = _llama()
    ours, theirs = _twins(base, pe.LoraConfig(r=4, alpha=8, target_modules=["embed_tokens", "q_proj"]),
                          peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]))
    ids = _ids()
    embeds = base.get_input_embeddings()(ids[:1]) + 0.01
    kw = dict(inputs_embeds=embeds, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ours.generate(**kw), theirs.generate(**kw))
    ours64, theirs64 = ours.double(), theirs.double()
    torch.testing.assert_close(_out(ours64, ids), _out(theirs64, ids), rtol=1e-12, atol=1e-12)
