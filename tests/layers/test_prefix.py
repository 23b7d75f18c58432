"""The prefix-tuning layer's parts: PEFT's encoder layout and geometry, the served values' cache, the mask layouts
the mask function records (and the fallback where there is none), and the checks that refuse a model."""
import copy
import warnings

import peft
import pytest
import torch
from torch import nn
from transformers import AttentionInterface, PretrainedConfig
from transformers.masking_utils import (ALL_MASK_ATTENTION_FUNCTIONS, and_masks, bidirectional_mask_function,
                                        causal_mask_function, sliding_window_overlay)

import ptlm_engine as pe
from ptlm_engine.layers import prefix
from ptlm_engine.layers.prefix import _LAYOUT, LAYER_NAME, PrefixGeometry, prefix_geometry

pytestmark = [pytest.mark.usefixtures("reference_backend"),
              pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]


@pytest.mark.parametrize("kind,geometry", [("llama", PrefixGeometry(2, 2, 16)), ("gpt2", PrefixGeometry(2, 4, 16)),
                                           ("bert", PrefixGeometry(2, 4, 16))])
@pytest.mark.parametrize("projection", [False, True])
def test_encoder_has_peft_layout(tiny, kind, geometry, projection):
    """PEFT's PrefixEncoder: the same Parameter names and shapes (token_dim = key/value heads x head_dim on a
    grouped-query Llama), the same geometry from the config."""
    model = tiny(kind)
    assert prefix_geometry(model.config) == geometry
    pe.add_adapter(model, "a", pe.PrefixConfig(num_virtual_tokens=3, projection=projection, encoder_hidden_size=24))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny(kind), peft.PrefixTuningConfig(
            task_type="FEATURE_EXTRACTION", num_virtual_tokens=3, prefix_projection=projection,
            encoder_hidden_size=24))
    ours = {k: p.shape for k, p in getattr(model, LAYER_NAME).encoders["a"].named_parameters()}
    assert ours == {k: p.shape for k, p in theirs.prompt_encoder["default"].named_parameters()}
    assert ours["embedding.weight"] == (3, geometry.token_dim if projection else geometry.width)


def test_served_values_are_kept_until_the_parameters_change(tiny):
    model = tiny("llama")
    pe.add_adapter(model, "a", pe.PrefixConfig(num_virtual_tokens=3, projection=True))
    encoder = getattr(model, LAYER_NAME).encoders["a"]
    first = encoder.served(torch.float32)
    assert encoder.served(torch.float32) is first and not first.requires_grad
    half = encoder.served(torch.float16)
    assert half.dtype == torch.float16 and encoder.served(torch.float16) is half
    with torch.no_grad():
        encoder.transform[2].bias.add_(1.0)                        # bumps the version counter
    again = encoder.served(torch.float32)
    torch.testing.assert_close(again, first + 1.0)
    with torch.enable_grad():
        assert encoder.values().requires_grad
    copied = copy.deepcopy(model)                                  # a copy computes its own values
    torch.testing.assert_close(getattr(copied, LAYER_NAME).encoders["a"].served(torch.float32), again)


def test_plain_prefix_serves_its_parameter_without_a_copy(tiny):
    model = tiny("gpt2")
    pe.add_adapter(model, "a", pe.PrefixConfig(num_virtual_tokens=3))
    encoder = getattr(model, LAYER_NAME).encoders["a"]
    assert encoder.served(torch.float32).data_ptr() == encoder.embedding.weight.data_ptr()


@pytest.mark.parametrize("original", ["sdpa", "eager"])
def test_mask_function_records_exact_layouts_only(tiny, original):
    model = tiny("llama")
    model.set_attn_implementation(original)
    pe.add_adapter(model, "a", pe.PrefixConfig(num_virtual_tokens=2))
    make = ALL_MASK_ATTENTION_FUNCTIONS[model.config._attn_implementation]
    padding = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    common = dict(batch_size=2, q_length=3, kv_length=5, q_offset=2, kv_offset=0, attention_mask=padding,
                  dtype=torch.float32, allow_is_causal_skip=True)
    mask = make(mask_function=causal_mask_function, **common)
    layout = getattr(mask, _LAYOUT)
    assert layout.causal and (layout.q_length, layout.kv_length) == (3, 5) and torch.equal(layout.padding, padding)
    torch.testing.assert_close(mask, ALL_MASK_ATTENTION_FUNCTIONS[original](mask_function=causal_mask_function,
                                                                             **common))
    assert not getattr(make(mask_function=bidirectional_mask_function, **common), _LAYOUT).causal
    window = and_masks(causal_mask_function, sliding_window_overlay(2))
    assert getattr(make(mask_function=window, **common), _LAYOUT, None) is None


def test_a_given_4d_mask_takes_the_fallback(tiny, monkeypatch):
    """A 4-D mask of the caller's own is no recorded layout: the original sdpa runs over [prefix ; keys] with
    the mask extended, the same as the fused path on the equivalent 2-D mask."""
    calls = []
    concatenated = prefix._concatenated
    monkeypatch.setattr(prefix, "_concatenated", lambda *a: calls.append(1) or concatenated(*a))
    model = tiny("llama")
    pe.add_adapter(model, "a", pe.PrefixConfig(num_virtual_tokens=3))
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    padding = torch.ones(2, 6, dtype=torch.long)
    padding[1, :2] = 0
    full = torch.ones(6, 6, dtype=torch.bool).tril()[None, None] & padding.bool()[:, None, None, :]   # (2,1,6,6)
    with torch.no_grad():
        fused = model(input_ids=ids, attention_mask=padding).logits
        fallback = model(input_ids=ids, attention_mask=full, position_ids=torch.arange(6)[None]).logits
    torch.testing.assert_close(fallback[padding.bool()], fused[padding.bool()])
    assert len(calls) == 2                                         # the fallback ran in both layers, once


class _NoRegistry(nn.Module):
    """A model with a transformers config whose attention is torch's own."""

    def __init__(self, **config):
        super().__init__()
        self.config = PretrainedConfig(**config)
        self.config._attn_implementation = "sdpa"
        self.attn = nn.MultiheadAttention(8, 2)


@pytest.mark.parametrize("change,match", [
    (lambda m: nn.Linear(2, 2), "needs a transformers model"),
    (lambda m: _NoRegistry(num_hidden_layers=1, hidden_size=8, num_attention_heads=2),
     "does not go through transformers' attention registry"),
    (lambda m: _NoRegistry(num_hidden_layers=1), "needs hidden_size, num_attention_heads in the model config"),
    (lambda m: setattr(m.config, "_attn_implementation_internal", "flash_attention_2") or m, "'flash_attention_2'"),
    (lambda m: m.gradient_checkpointing_enable() or m, "gradient checkpointing"),
    (lambda m: setattr(m.config, "is_encoder_decoder", True) or m, "cross-attention"),
    (lambda m: setattr(m.config, "layer_types", ["chunked_attention", "full_attention"]) or m,
     "supports full and sliding-window attention layers"),
    (lambda m: setattr(m, LAYER_NAME, nn.Identity()) or m, "already has an attribute"),
])
def test_unsupported_models_are_refused_before_any_change(tiny, change, match):
    model = change(tiny("llama"))
    before = dict(model.named_modules())
    with pytest.raises(ValueError, match=match):
        pe.add_adapter(model, "a", pe.PrefixConfig(num_virtual_tokens=2))
    assert dict(model.named_modules()) == before and not hasattr(model, "ptlm_adapters")


def test_gradient_checkpointing_turned_on_later_is_caught(tiny, ids):
    """HF Trainer's gradient_checkpointing=True turns it on after the adapter exists: its recomputation runs
    without the prefix (reentrant: no gradient for it), so a training pass refuses; inference still runs."""
    model = tiny("llama")
    pe.add_adapter(model, "a", pe.PrefixConfig(num_virtual_tokens=2))
    model.train().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="does not work with gradient checkpointing"):
        model(input_ids=ids, labels=ids)
    with torch.no_grad():
        model(input_ids=ids)
    model.gradient_checkpointing_disable()
    model(input_ids=ids, labels=ids).loss.backward()


@pytest.mark.parametrize("config", [
    pe.PrefixConfig(num_virtual_tokens=2, modules_to_save=["layers.1"]),
    [pe.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["layers.1.self_attn"]),
     pe.PrefixConfig(num_virtual_tokens=2)],
], ids=["prefix", "lora+prefix"])
def test_modules_to_save_over_hooked_attention_is_refused(tiny, config):
    """A copy of a self-attention module the prefix hooks (or of a layer holding one) would run without the
    prefix; refused before any change, whether the prefix comes in the same call or was there before."""
    model = tiny("llama")
    with pytest.raises(ValueError, match=r"modules_to_save: 'model.layers.1(.self_attn)?' is or contains the "
                                         r"self-attention module 'model.layers.1.self_attn', which a prefix"):
        pe.add_adapter(model, "a", config)
    assert not hasattr(model, "ptlm_adapters")
    pe.add_adapter(model, "p", pe.PrefixConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="which a prefix adapter hooks"):
        pe.add_adapter(model, "b", pe.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["layers.1"]))


def test_changing_the_attention_implementation_underneath_is_caught(tiny):
    model = tiny("llama")
    pe.add_adapter(model, "a", pe.PrefixConfig(num_virtual_tokens=2))
    assert model.config._attn_implementation in AttentionInterface._global_mapping
    model.config._attn_implementation = "eager"
    with pytest.raises(RuntimeError, match="was changed to 'eager'"):
        model(input_ids=torch.zeros(1, 3, dtype=torch.long))


def test_backbone_arguments_positional_or_keyword(tiny):
    """The position pre-hook sits on the backbone (model.base_model): a direct call of it gets the prefix too,
    with its arguments passed by position or by keyword."""
    model = tiny("llama")
    pe.add_adapter(model, "a", pe.PrefixConfig(num_virtual_tokens=3))
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    mask, positions = torch.ones(2, 5, dtype=torch.long), torch.arange(5)[None]
    with torch.no_grad():
        by_keyword = model.model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
        by_position = model.model(ids, mask, positions).last_hidden_state
        default = model.model(ids).last_hidden_state
        with pe.disable_adapters(model):
            base = model.model(ids).last_hidden_state
    torch.testing.assert_close(by_position, by_keyword)
    torch.testing.assert_close(default, by_keyword)
    assert not torch.allclose(default, base)


# --------------------------------------------------------------- training: autocast, one layer, fused optimizers
def test_prefix_tuning_trains_under_cpu_bf16_autocast_like_peft(tiny, ids):
    """Mixed-precision training (torch.autocast, as Trainer(bf16=True) does) of a Llama prefix adapter trains as
    PEFT's does: the same loss and a float32 gradient close to PEFT's. Llama's rotary embedding returns float32
    q / k under autocast while v stays bfloat16; the prefix layer casts q / k / v to the autocast dtype."""
    ours = tiny("llama")
    pe.add_adapter(ours, "p", pe.PrefixConfig(num_virtual_tokens=3))
    theirs = peft.get_peft_model(tiny("llama"), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with torch.no_grad():
        values = 0.1 * torch.randn(ours.ptlm_prefix.encoders["p"].embedding.weight.shape,
                                   generator=torch.Generator().manual_seed(0))
        ours.ptlm_prefix.encoders["p"].embedding.weight.copy_(values)
        theirs.prompt_encoder["default"].embedding.weight.copy_(values)
    ours.train(), theirs.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_peft = theirs(input_ids=ids, labels=ids).loss
        loss = ours(input_ids=ids, labels=ids).loss
    loss.backward(), loss_peft.backward()
    torch.testing.assert_close(loss, loss_peft, rtol=2e-2, atol=2e-2)
    grad, grad_peft = ours.ptlm_prefix.encoders["p"].embedding.weight.grad, \
        theirs.prompt_encoder["default"].embedding.weight.grad
    assert grad.dtype == torch.float32
    assert ((grad - grad_peft).norm() / grad_peft.norm()).item() < 5e-2


def _one_layer_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=1, intermediate_size=64, vocab_size=64)).eval()


def test_prefix_tuning_of_a_one_layer_llama_matches_peft():
    """A one-block decoder: the prefix changes the outputs and trains as PEFT's does (same loss, same gradient).
    The prefix's backbone is the module taking the tokens, not the single decoder layer (regression: with one
    self-attention module the prefix was silently ignored)."""
    ours, theirs = _one_layer_llama(), peft.get_peft_model(
        _one_layer_llama(), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    pe.add_adapter(ours, "p", pe.PrefixConfig(num_virtual_tokens=3))
    encoder, encoder_peft = ours.ptlm_prefix.encoders["p"], theirs.prompt_encoder["default"]
    with torch.no_grad():
        encoder.embedding.weight.copy_(torch.randn(encoder.embedding.weight.shape,
                                                   generator=torch.Generator().manual_seed(0)))
        encoder_peft.embedding.weight.copy_(encoder.embedding.weight)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    ours.train(), theirs.train()
    loss, loss_peft = ours(input_ids=ids, labels=ids).loss, theirs(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss, loss_peft)
    loss.backward(), loss_peft.backward()
    torch.testing.assert_close(encoder.embedding.weight.grad, encoder_peft.embedding.weight.grad)


def _eval_loss(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss


def test_trainer_default_fused_adamw_then_evaluate_sees_the_trained_prefix(tiny, tmp_path):
    """HF Trainer's default optimizer (adamw_torch_fused) trains a prefix adapter with projection; evaluate()
    afterwards scores the trained prefix. torch's fused optimizer kernels update the Parameters without bumping
    their version counters, so the prefix's kept MLP output also sees optimizer steps (regression: evaluation
    served the prefix computed before training)."""
    import copy

    from transformers import Trainer, TrainingArguments
    model = tiny("llama")
    pe.add_adapter(model, "p", pe.PrefixConfig(num_virtual_tokens=4, projection=True))
    data = torch.randint(0, 128, (4, 8), generator=torch.Generator().manual_seed(3))
    rows = [{"input_ids": row, "labels": row} for row in data]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, per_device_eval_batch_size=4,
                             max_steps=4, learning_rate=5e-2, report_to=[], save_strategy="no", use_cpu=True,
                             dataloader_num_workers=0, disable_tqdm=True)
    assert "fused" in str(args.optim).lower()
    trainer = Trainer(model=model, args=args, train_dataset=rows, eval_dataset=rows)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    fresh = _eval_loss(copy.deepcopy(model), data).item()    # a copy computes its prefix again
    assert abs(fresh - before) > 1e-3                        # training did change the prefix
    assert after == pytest.approx(fresh, rel=1e-5)


# ---------------------------------------------------------------- attention options: sliding window, soft-capping
def _seeded_prefix_pair(base, tokens=3, task="CAUSAL_LM"):
    """Our copy of `base` with prefix adapter 'a' (seeded values) and PEFT's with the same embedding."""
    ours = copy.deepcopy(base)
    pe.add_adapter(ours, "a", pe.PrefixConfig(num_virtual_tokens=tokens))
    weight = getattr(ours, LAYER_NAME).encoders["a"].embedding.weight
    with torch.no_grad():
        weight.copy_(0.5 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(5)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(task_type=task,
                                                                                   num_virtual_tokens=tokens))
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.copy_(weight)
    return ours, theirs


def _sliding(kind, window):
    """A tiny model attending within a sliding window of `window` tokens: Mistral / Phi-3 (config.sliding_window,
    no layer_types), Gemma2 (layer_types alternating sliding / full, soft-capped logits), Qwen2 with
    use_sliding_window (every layer 'sliding_attention')."""
    from transformers import (Gemma2Config, Gemma2ForCausalLM, MistralConfig, MistralForCausalLM, Phi3Config,
                              Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM)
    torch.manual_seed(0)
    shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=128, sliding_window=window)
    build = {
        "mistral": lambda: MistralForCausalLM(MistralConfig(**shape)),
        "phi3": lambda: Phi3ForCausalLM(Phi3Config(**shape, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                                   attention_dropout=0.0)),
        "gemma2": lambda: Gemma2ForCausalLM(Gemma2Config(**shape, head_dim=24)),
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**shape, use_sliding_window=True, max_window_layers=0)),
    }[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build().eval()


@pytest.mark.parametrize("kind", ["mistral", "phi3"])
def test_a_sliding_window_holding_prefix_and_sequence_matches_peft_and_a_shorter_one_is_refused(kind):
    """Mistral / Phi-3 attend within config.sliding_window (no layer_types). While the window holds the P virtual
    tokens and the whole sequence the prefix is exact (PEFT's equal); where it does not, PEFT's prefix (a cache of
    P) leaves the later queries' window, which the fused prefix does not model: a clear error, not other values."""
    ids = torch.randint(2, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    ours, theirs = _seeded_prefix_pair(_sliding(kind, window=10))          # 3 + 7 tokens: the window holds them
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    ours, _ = _seeded_prefix_pair(_sliding(kind, window=9))
    with torch.no_grad(), pytest.raises(ValueError, match="sliding window of 9 tokens"):
        ours(input_ids=ids)


def test_window_need_counts_a_row_without_the_prompt_layouts_padding():
    """PrefixContext.window_need (host ints): the row with a prefix needing the most of the window, its P and its
    columns: the pass's (before a sliding cache dropped some) less the padding a mixed batch's prompt layout put
    before it; rows without a prefix need nothing. Where the pass's count is unknown and the layer got a window's
    worth of keys (a sliding cache may have dropped some), the layout's padding is not taken off."""
    context = lambda tokens, unused=None, total=None: prefix.PrefixContext(None, [], None, None, 3, tokens, unused,
                                                                           total)
    assert context((4, 0, 2), (3, 0, 3), total=10).window_need(10, 12) == (0, 4, 7)
    assert context((4, 0, 2), (3, 0, 3), total=10).window_need(8, 12) == (0, 4, 7)   # 2 columns dropped
    assert context((4, 0, 2), (3, 0, 3)).window_need(10, 12) == (0, 4, 7)
    assert context((4, 0, 2), (3, 0, 3)).window_need(12, 12) == (0, 4, 12)
    assert context((0, 2, 3)).window_need(5, 12) == (2, 3, 5)
    assert context(2, (1, 0, 0)).window_need(6, 12) == (1, 2, 6)                      # one adapter: the first


@pytest.mark.parametrize("kind", ["gemma2", "qwen2", "mistral"])
def test_sliding_window_layer_types_match_peft_in_each_generation_step(kind):
    """Gemma2 (layer_types alternating 'sliding_attention' / 'full_attention', soft-capped logits) and Qwen2 with
    use_sliding_window (every layer 'sliding_attention') take a prefix as Mistral does, and PEFT 0.21 runs all
    three: with a window of 12 holding 3 virtual + 5 prompt + 4 generated tokens and a left-padded row, every
    greedy step with a dynamic and a static cache (cache_implementation="static") equals PEFT's forward
    teacher-forced on the generated tokens, and so does our forward of them. Regression: a config whose
    layer_types was not all 'full_attention' was refused."""
    ours, theirs = _seeded_prefix_pair(_sliding(kind, window=12))
    ids = torch.randint(2, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    full = torch.cat([mask, torch.ones(2, 4, dtype=torch.long)], 1)
    positions = (full.cumsum(-1) - 1).masked_fill(full == 0, 0)
    with torch.no_grad():
        for kw in ({}, {"cache_implementation": "static"}):
            out = ours.generate(ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                output_logits=True, return_dict_in_generate=True, pad_token_id=0, **kw)
            forced = theirs(input_ids=out.sequences, attention_mask=full, position_ids=positions).logits
            for step, logits in enumerate(out.logits):
                torch.testing.assert_close(logits, forced[:, 4 + step], msg=f"{kw} step {step}")
        y = ours(input_ids=out.sequences, attention_mask=full, position_ids=positions).logits
        with pe.disable_adapters(ours):
            y_base = ours(input_ids=out.sequences, attention_mask=full, position_ids=positions).logits
    valid = full.bool()
    torch.testing.assert_close(y[valid], forced[valid])
    assert not torch.allclose(y[valid], y_base[valid])


@pytest.mark.parametrize("padded", [False, True])
def test_gemma2_soft_capped_attention_matches_peft(padded):
    """Gemma2 passes softcap=attn_logit_softcapping to the attention function, which the fused op does not have:
    the original runs over [prefix ; keys] instead, capping as PEFT's (q_proj scaled up so that the cap bites)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM
    torch.manual_seed(0)
    base = Gemma2ForCausalLM(Gemma2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        vocab_size=128, head_dim=16, layer_types=["full_attention"] * 2, attn_logit_softcapping=1.0,
        attn_implementation="eager")).eval()
    with torch.no_grad():
        for layer in base.model.layers:
            layer.self_attn.q_proj.weight.mul_(20)
    ours, theirs = _seeded_prefix_pair(base)
    ids = torch.randint(2, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :2] = 0
    with torch.no_grad():
        y = ours(input_ids=ids, attention_mask=mask).logits
        y_peft = theirs(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(y[mask.bool()], y_peft[mask.bool()], rtol=1e-5, atol=1e-5)
