"""Prefix tuning on tiny Llama / GPT-2 / BERT against HF PEFT's PREFIX_TUNING on the same weights: outputs and
gradients (with and without padding, with and without the projection MLP), every generation step against PEFT's
forward teacher-forced on the generated tokens (PEFT 0.21's own generate drops the prefix under transformers 5),
a row whose keys are all padded, other architectures (OPT, RoBERTa, Qwen3, Gemma, GPT-NeoX), files both ways,
mixed batches (prefix adapters of different lengths, LoRA and base rows; each decode step against the forward),
and removal."""
import copy
import json
import warnings
import zlib

import peft
import pytest
import torch
import transformers

import ptlm_engine as pe
from ptlm_engine.layers.prefix import _ENTRY, LAYER_NAME
from tests.helpers import needs_triton, run_alone

pytestmark = [pytest.mark.usefixtures("reference_backend"),
              pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "FEATURE_EXTRACTION"}


def _ids(rows, length=7, seed=3):
    return torch.randint(1, 128, (rows, length), generator=torch.Generator().manual_seed(seed))


def _padding(rows, length=7):
    """Left padding of 0, 2, 1, … tokens per row (an attention mask of 0 then 1)."""
    mask = torch.ones(rows, length, dtype=torch.long)
    for row in range(rows):
        mask[row, :(2 * row) % 3] = 0
    return mask


def _main(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _randomize(model, name):
    """Seeded values in adapter `name`'s prefix Parameters (by their name inside the encoder)."""
    encoder = getattr(model, LAYER_NAME).encoders[name]
    with torch.no_grad():
        for key, p in encoder.named_parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(zlib.crc32(
                f"{name}.{key}".encode()))))


def _pair(tiny, kind, projection=False, tokens=3):
    """Our model with prefix adapter 'a' and PEFT's with the same Parameters."""
    ours = tiny(kind)
    pe.add_adapter(ours, "a", pe.PrefixConfig(num_virtual_tokens=tokens, projection=projection))
    _randomize(ours, "a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny(kind), peft.PrefixTuningConfig(
            task_type=TASK[kind], num_virtual_tokens=tokens, prefix_projection=projection))
    mine = dict(getattr(ours, LAYER_NAME).encoders["a"].named_parameters())
    peft_params = dict(theirs.prompt_encoder["default"].named_parameters())
    assert {k: p.shape for k, p in mine.items()} == {k: p.shape for k, p in peft_params.items()}
    with torch.no_grad():
        for key, p in mine.items():
            peft_params[key].copy_(p)
    return ours, theirs


@pytest.mark.parametrize("kind,projection", [("llama", False), ("llama", True), ("gpt2", False), ("gpt2", True),
                                             ("bert", False)])
def test_outputs_and_gradients_match_peft(tiny, kind, projection):
    ours, theirs = _pair(tiny, kind, projection)
    ours.train(), theirs.train()                                          # no dropout in the tiny models
    ids, mask = _ids(3), _padding(3)
    y = _main(ours(input_ids=ids, attention_mask=mask))
    y_peft = _main(theirs(input_ids=ids, attention_mask=mask))
    valid = mask.bool()
    torch.testing.assert_close(y[valid], y_peft[valid])
    (y[valid].square().sum()).backward()
    (y_peft[valid].square().sum()).backward()
    peft_params = dict(theirs.prompt_encoder["default"].named_parameters())
    for key, p in getattr(ours, LAYER_NAME).encoders["a"].named_parameters():
        torch.testing.assert_close(p.grad, peft_params[key].grad, msg=key)
    with torch.no_grad():                                                 # no mask: HF's own positions
        torch.testing.assert_close(_main(ours(input_ids=ids)), _main(theirs(input_ids=ids)))


def test_fully_padded_row_still_sees_its_prefix_like_peft(tiny):
    """A row whose attention mask is all zeros attends to its prefix alone, as PEFT's mask extended by P leading
    ones makes it: finite logits equal to PEFT's (not NaN, not the uniform attention SDPA gives a row that sees
    no key)."""
    ours, theirs = _pair(tiny, "llama")
    ids, mask = _ids(2, 6), _padding(2, 6)
    mask[1] = 0
    with torch.no_grad():
        y, y_peft = ours(input_ids=ids, attention_mask=mask).logits, theirs(input_ids=ids, attention_mask=mask).logits
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y_peft)


def _opt():
    return transformers.OPTForCausalLM(transformers.OPTConfig(
        hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4, vocab_size=128,
        max_position_embeddings=40, word_embed_proj_dim=64, pad_token_id=1, dropout=0.0, attention_dropout=0.0))


def _roberta():
    return transformers.RobertaModel(transformers.RobertaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=128,
        max_position_embeddings=40, pad_token_id=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=128)


@pytest.mark.parametrize("build,task", [
    (_opt, "CAUSAL_LM"), (_roberta, "FEATURE_EXTRACTION"),
    (lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**SHAPE, num_key_value_heads=2, head_dim=24)),
     "CAUSAL_LM"),
    (lambda: transformers.GemmaForCausalLM(transformers.GemmaConfig(**SHAPE, num_key_value_heads=2, head_dim=24)),
     "CAUSAL_LM"),
    (lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**SHAPE, rotary_pct=0.5)), "CAUSAL_LM"),
], ids=["opt", "roberta", "qwen3_head_dim_24", "gemma_head_dim_24", "neox_partial_rotary"])
def test_other_architectures_match_peft(build, task):
    """OPTForCausalLM runs model.decoder, not its base_model (the prefix's hook sits on the decoder), and counts
    positions over the attention mask; RoBERTa numbers them from pad_token_id + 1 over the non-pad tokens; Qwen3
    (with q / k norms) and Gemma have a head_dim other than hidden_size / heads; GPT-NeoX rotates a part of each
    head only. With left padding (pad tokens in the ids) and no position ids given, each equals PEFT's prefix (a
    cache of P)."""
    torch.manual_seed(0)
    base = build().eval()
    ours = copy.deepcopy(base)
    pe.add_adapter(ours, "a", pe.PrefixConfig(num_virtual_tokens=3))
    _randomize(ours, "a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(task_type=task,
                                                                                   num_virtual_tokens=3))
    weight = getattr(ours, LAYER_NAME).encoders["a"].embedding.weight
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.copy_(weight)
    mask = _padding(3)
    ids = _ids(3).clamp_min(2).masked_fill(mask == 0, 1)
    with torch.no_grad():
        y, y_peft, y_base = (_main(m(input_ids=ids, attention_mask=mask)) for m in (ours, theirs, base))
    valid = mask.bool()
    assert not torch.allclose(y[valid], y_base[valid])
    torch.testing.assert_close(y[valid], y_peft[valid])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_each_generation_step_matches_peft_teacher_forced(tiny, kind):
    """Greedy generation with a left-padded row; PEFT runs the generated sequences with the position ids
    generate builds from the mask (it shifts given position ids by P, as the prefix's cache would)."""
    ours, theirs = _pair(tiny, kind, tokens=4)
    ids, mask = _ids(2, 5), _padding(2, 5)
    with torch.no_grad():
        out = ours.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, output_logits=True,
                            return_dict_in_generate=True, pad_token_id=0)
        full = torch.cat([mask, torch.ones(2, 5, dtype=torch.long)], dim=1)
        positions = (full.cumsum(-1) - 1).masked_fill(full == 0, 0)
        forced = theirs(input_ids=out.sequences, attention_mask=full, position_ids=positions).logits
    assert len(out.logits) == 5
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, forced[:, ids.shape[1] - 1 + step], msg=f"step {step}")


def test_files_both_ways(tiny, tmp_path):
    """Ours -> PEFT loads the same outputs; PEFT (trained with the projection MLP) -> ours loads them."""
    ours, theirs = _pair(tiny, "llama", projection=True)
    ids = _ids(2)
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        pe.save_adapter(ours, "a", tmp_path / "ours")
        loaded = peft.PeftModel.from_pretrained(tiny("llama"), tmp_path / "ours")
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected)

        theirs.save_pretrained(tmp_path / "peft")
        model = tiny("llama")
        pe.load_adapter(model, tmp_path / "peft", name="b")
        assert pe.adapter_configs(model)["b"] == pe.PrefixConfig(num_virtual_tokens=3)   # the MLP's output
        torch.testing.assert_close(model(input_ids=ids).logits, theirs(input_ids=ids).logits)


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_peft_files_load(tiny, tmp_path, kind):
    ours, theirs = _pair(tiny, kind)
    ids = _ids(2)
    theirs.save_pretrained(tmp_path)
    model = tiny(kind)
    pe.load_adapter(model, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(_main(model(input_ids=ids)), _main(theirs(input_ids=ids)))
        pe.save_adapter(model, "default", tmp_path / "again")
        again = peft.PeftModel.from_pretrained(tiny(kind), tmp_path / "again")
        torch.testing.assert_close(_main(again(input_ids=ids)), _main(theirs(input_ids=ids)))


def test_sequence_classifier_round_trip(tiny, tmp_path):
    """BERT classifier with its classifier as modules_to_save, filed as PEFT's SEQ_CLS prompt-learning model does
    (base_model.classifier.*); PEFT 0.21 itself cannot run prefix tuning on BertForSequenceClassification under
    transformers 5 (it looks for a `past_key_values` argument that BertModel renamed `cache`)."""
    model = tiny("bert_cls")
    pe.add_adapter(model, "a", pe.PrefixConfig(num_virtual_tokens=2, modules_to_save=["classifier"]))
    _randomize(model, "a")
    with torch.no_grad():
        model.classifier.modules_to_save["a"].weight.mul_(3.0)
    ids = _ids(2)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    pe.save_adapter(model, "a", tmp_path)
    from safetensors.torch import load_file
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == {
        "prompt_embeddings", "base_model.classifier.weight", "base_model.classifier.bias"}
    loaded = tiny("bert_cls")
    pe.load_adapter(loaded, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected)


def _mixed(tiny, kind):
    """Prefix adapters 'p3' (3 tokens) and 'p5' (5, with the projection MLP), LoRA adapter 'lora'."""
    model = tiny(kind)
    pe.add_adapter(model, "p3", pe.PrefixConfig(num_virtual_tokens=3))
    pe.add_adapter(model, "p5", pe.PrefixConfig(num_virtual_tokens=5, projection=True, encoder_hidden_size=24))
    target = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"]}[kind]
    pe.add_adapter(model, "lora", pe.LoraConfig(r=4, alpha=8, target_modules=target))
    _randomize(model, "p3"), _randomize(model, "p5")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))
    return model


MAPPING = ["p3", "p5", None, "lora", "p5"]


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_mixed_batch_rows_match_each_alone(tiny, kind):
    model = _mixed(tiny, kind)
    pe.set_active_adapter(model, None)
    ids, mask = _ids(len(MAPPING)), _padding(len(MAPPING))
    with torch.no_grad(), pe.adapter_batch(model, MAPPING):
        mixed = _main(model(input_ids=ids, attention_mask=mask))
    with torch.no_grad():
        for row, name in enumerate(MAPPING):
            alone = run_alone(model, name, lambda: _main(model(input_ids=ids[row:row + 1],
                                                               attention_mask=mask[row:row + 1])))
            valid = mask[row].bool()
            torch.testing.assert_close(mixed[row, valid], alone[0, valid], msg=f"row {row} ({name})")
    assert not torch.allclose(mixed[0], mixed[1])


@pytest.mark.parametrize("how", [dict(num_beams=2, num_return_sequences=2),
                                 dict(num_return_sequences=2, do_sample=True, top_k=1)])
def test_mixed_batch_generate(tiny, how):
    """Each input row repeated in place (beams, sequences): every copy keeps its row's adapter."""
    model = _mixed(tiny, "llama")
    pe.set_active_adapter(model, None)
    mapping, ids = ["p5", None, "p3"], _ids(3, 4)
    kw = dict(max_new_tokens=4, pad_token_id=0, **how)
    with torch.no_grad():
        with pe.adapter_batch(model, mapping):
            mixed = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        for row, name in enumerate(mapping):
            alone = run_alone(model, name, lambda: model.generate(ids[row:row + 1], attention_mask=torch.ones_like(
                ids[row:row + 1]), **kw))
            torch.testing.assert_close(mixed[2 * row:2 * row + 2], alone, msg=f"row {row} ({name})")


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_mixed_batch_generation_steps_match_teacher_forced_forward(tiny, backend, monkeypatch):
    """Prefixes of 5 and 3 tokens and a base row, left padding: every decode step's logits (Lq = 1 against the
    cache, each row its own P through prefix_lengths) equal the block's forward of the generated sequences with
    generate's position ids, with a dynamic cache and (reference backend) a static one."""
    monkeypatch.setenv("PTLM_BACKEND", backend)
    model = tiny("llama")
    for name, tokens in (("p3", 3), ("p5", 5)):
        pe.add_adapter(model, name, pe.PrefixConfig(num_virtual_tokens=tokens))
        _randomize(model, name)
    pe.set_active_adapter(model, None)
    ids, mask = _ids(3, 6), _padding(3, 6)
    full = torch.cat([mask, torch.ones(3, 3, dtype=torch.long)], 1)
    positions = (full.cumsum(-1) - 1).masked_fill(full == 0, 0)
    caches = [{}, {"cache_implementation": "static"}] if backend == "reference" else [{}]
    with torch.no_grad(), pe.adapter_batch(model, ["p5", None, "p3"]):
        for kw in caches:
            out = model.generate(ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True, pad_token_id=0, **kw)
            forced = model(input_ids=out.sequences, attention_mask=full, position_ids=positions).logits
            for step, logits in enumerate(out.logits):
                torch.testing.assert_close(logits, forced[:, 5 + step], msg=f"{kw} step {step}")


def test_mixed_batch_gradients_per_adapter(tiny):
    model = _mixed(tiny, "gpt2")
    mapping, ids = ["p5", "p3", None, "p5"], _ids(4)
    model.train()
    with pe.adapter_batch(model, mapping):
        model(input_ids=ids, labels=ids).logits.square().mean(dim=(1, 2)).sum().backward()
    layer = getattr(model, LAYER_NAME)
    mixed = {key: p.grad.clone() for key, p in layer.named_parameters()}
    for p in layer.parameters():
        p.grad = None
    for name, rows in [("p5", [0, 3]), ("p3", [1])]:
        pe.set_active_adapter(model, name)
        model(input_ids=ids[rows]).logits.square().mean(dim=(1, 2)).sum().backward()
    for key, p in layer.named_parameters():
        torch.testing.assert_close(mixed[key], p.grad, msg=key)


def test_projection_trains_the_mlp_and_serving_keeps_its_output(tiny):
    model = tiny("llama")
    pe.add_adapter(model, "a", pe.PrefixConfig(num_virtual_tokens=3, projection=True))
    encoder = getattr(model, LAYER_NAME).encoders["a"]
    calls = []
    encoder.transform.register_forward_hook(lambda *_: calls.append(1))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = _ids(2)
    before = [p.detach().clone() for p in encoder.parameters()]
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert len(calls) == 1 and all(not torch.equal(b, p) for b, p in zip(before, encoder.parameters()))
    with torch.no_grad():
        first = model(input_ids=ids).logits
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, pad_token_id=0)
        assert len(calls) == 2                                 # computed once for all serving passes and steps
        optimizer.step()                                       # the same gradient again: new values
        second = model(input_ids=ids).logits
    assert len(calls) == 3 and not torch.allclose(first, second)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_disable_remove_and_unload_restore_the_model(tiny, kind):
    base = tiny(kind)
    model = tiny(kind)
    attn, keys = model.config._attn_implementation, set(model.state_dict())
    pe.add_adapter(model, "a", pe.PrefixConfig(num_virtual_tokens=3))
    pe.add_adapter(model, "b", pe.PrefixConfig(num_virtual_tokens=2))
    assert model.config._attn_implementation == f"ptlm_prefix_{attn}"
    ids = _ids(2)
    with torch.no_grad():
        expected = _main(base(input_ids=ids))
        assert not torch.allclose(_main(model(input_ids=ids)), expected)
        with pe.disable_adapters(model):
            torch.testing.assert_close(_main(model(input_ids=ids)), expected)
        pe.set_active_adapter(model, None)
        torch.testing.assert_close(_main(model(input_ids=ids)), expected)
        pe.remove_adapter(model, "a")
        assert getattr(model, LAYER_NAME).adapter_names() == ["b"]
        pe.unload(model)
        torch.testing.assert_close(_main(model(input_ids=ids)), expected, rtol=0, atol=0)
    assert model.config._attn_implementation == attn and set(model.state_dict()) == keys
    assert not hasattr(model, LAYER_NAME)
    assert not any(_ENTRY in m.__dict__ for m in model.modules())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_eager_and_attention_weights(tiny):
    """An eager model; asking for attention weights runs eager itself over [prefix ; keys] (the fallback),
    which agrees with the fused path and returns weights over P + L keys."""
    ours, theirs = _pair(tiny, "llama")
    ours_eager = tiny("llama")
    ours_eager.set_attn_implementation("eager")
    pe.add_adapter(ours_eager, "a", pe.PrefixConfig(num_virtual_tokens=3))
    with torch.no_grad():
        getattr(ours_eager, LAYER_NAME).encoders["a"].embedding.weight.copy_(
            getattr(ours, LAYER_NAME).encoders["a"].embedding.weight)
        ids, mask = _ids(3), _padding(3)
        fused = ours_eager(input_ids=ids, attention_mask=mask).logits
        out = ours_eager(input_ids=ids, attention_mask=mask, output_attentions=True)
        peft_out = theirs(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(out.logits[valid], fused[valid])
    torch.testing.assert_close(fused[valid], peft_out[valid])
    assert out.attentions[0].shape == (3, 4, 7, 3 + 7)


def test_attention_dropout_runs_peft_computation(tiny):
    """Attention dropout in training: the original sdpa over [prefix ; keys] with the extended mask, which is
    what PEFT computes, the same random draws included."""
    from tests.conftest import _bert_config
    config = _bert_config()
    config.attention_probs_dropout_prob = 0.3
    base = transformers.BertModel(config)
    ours, theirs = _pair(lambda kind: copy.deepcopy(base), "bert")
    ours.train(), theirs.train()
    ids, mask = _ids(2), _padding(2)
    torch.manual_seed(5)
    y = ours(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.manual_seed(5)
    y_peft = theirs(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(y, y_peft)
    ours.eval()
    assert not torch.allclose(ours(input_ids=ids, attention_mask=mask).last_hidden_state, y)


@pytest.mark.parametrize("what,match", [
    ({"num_transformer_submodules": 2}, "num_transformer_submodules"),
    ({"prefix_tuning_extra": 1}, "prefix_tuning_extra"),
    ({"num_virtual_tokens": 4}, r"prompt_embeddings: shape \(3, 128\), the model needs \(4, 128\)"),
])
def test_bad_files_fail_clearly_and_change_nothing(tiny, tmp_path, what, match):
    _, theirs = _pair(tiny, "llama")
    theirs.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**raw, **what}))
    model = tiny("llama")
    attn = model.config._attn_implementation
    with pytest.raises(ValueError, match=match):
        pe.load_adapter(model, tmp_path)
    assert not hasattr(model, LAYER_NAME) and model.config._attn_implementation == attn


@needs_triton
def test_triton_kernel_through_the_model(tiny, monkeypatch):
    """The fused kernel (Triton's interpreter on the CPU; its backward is covered by the op's own tests): a mixed
    batch with per-row prefix lengths and padding, against the reference backend."""
    model = tiny("llama")
    pe.add_adapter(model, "p3", pe.PrefixConfig(num_virtual_tokens=3))
    _randomize(model, "p3")
    ids, mask = _ids(2, 5), _padding(2, 5)
    logits = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("PTLM_BACKEND", backend)
        with torch.no_grad(), pe.adapter_batch(model, ["p3", None]):
            logits[backend] = model(input_ids=ids, attention_mask=mask).logits[mask.bool()]
    torch.testing.assert_close(logits["triton"], logits["reference"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_realistic_bf16_llama_on_gpu_matches_peft_within_its_own_error(monkeypatch):
    """A Llama at realistic width on the GPU, bf16, a 16-token prefix through the fused Triton kernel, with
    padding: our logits and prefix gradient are within 2x of PEFT's own bf16 error, both against PEFT in fp32."""
    monkeypatch.setenv("PTLM_BACKEND", "triton")
    config = transformers.LlamaConfig(hidden_size=1024, num_hidden_layers=2, num_attention_heads=16,
                                      num_key_value_heads=4, intermediate_size=2816, vocab_size=1000,
                                      max_position_embeddings=512)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).cuda().eval()
    ours = copy.deepcopy(base)
    pe.add_adapter(ours, "a", pe.PrefixConfig(num_virtual_tokens=16))
    theirs = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16))
    mine = getattr(ours, LAYER_NAME).encoders["a"].embedding.weight
    peft_weight = theirs.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        mine.copy_(0.5 * torch.randn_like(mine))
        peft_weight.copy_(mine)
    ids = torch.randint(0, 1000, (2, 256), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :37] = 0
    valid = mask.bool()

    def run(model, weight, dtype):
        model.to(dtype)
        weight.grad = None
        logits = model(input_ids=ids, attention_mask=mask).logits.float()[valid]
        logits.square().mean().backward()
        return logits.detach(), weight.grad.float()

    ref_logits, ref_grad = run(theirs, peft_weight, torch.float32)
    peft_logits, peft_grad = run(theirs, peft_weight, torch.bfloat16)
    our_logits, our_grad = run(ours, mine, torch.bfloat16)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    assert torch.isfinite(our_logits).all()
    assert rel(our_logits, ref_logits) <= 2 * rel(peft_logits, ref_logits) + 1e-3
    assert rel(our_grad, ref_grad) <= 2 * rel(peft_grad, ref_grad) + 1e-3
