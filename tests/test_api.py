"""The public lifecycle on tiny HF models: add / activate / train flags / merge / disable / remove / unload,
per-module ranks and exclusions, torch.compile."""
import contextlib

import pytest
import torch
from torch import nn

import ptlm_engine as pe
from ptlm_engine.layers import LoraLinear, ModulesToSave
from tests.helpers import assert_reloads_same, hook_count, needs_triton, run_alone

pytestmark = pytest.mark.usefixtures("reference_backend")


def _trainable(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_per_module_ranks_and_excluded_modules(tiny, ids, output, randomize_adapters):
    llama = tiny("llama")
    config = pe.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 6},
                           alpha_pattern={r"layers\.0\.self_attn\.q_proj": 2},
                           exclude_modules=r"model\.layers\.1\.self_attn\.q_proj")
    pe.add_adapter(llama, "a", config)
    attn = [layer.self_attn for layer in llama.model.layers]
    assert not isinstance(attn[1].q_proj, LoraLinear)
    assert (attn[0].q_proj.r, attn[0].v_proj.r, attn[1].v_proj.r) == ({"a": 4}, {"a": 6}, {"a": 6})
    assert (attn[0].q_proj.scale, attn[0].v_proj.scale) == ({"a": 0.5}, {"a": 8 / 6})
    assert attn[0].v_proj.lora_A["a"].weight.shape == (6, llama.config.hidden_size)
    with pytest.warns(UserWarning, match=r"rank_pattern keys \['k_proj'\] select none"):
        pe.add_adapter(llama, "b", pe.LoraConfig(target_modules=["q_proj"], rank_pattern={"k_proj": 2}))
    with pytest.raises(ValueError, match="matched no module of LlamaForCausalLM outside exclude_modules"):
        pe.add_adapter(llama, "c", pe.LoraConfig(target_modules=["o_proj"], exclude_modules=["o_proj"]))


def test_first_adapter_is_active_and_alone_trainable(tiny, ids, output):
    llama = tiny("llama")
    y0 = output(llama, ids)
    pe.add_adapter(llama, "sst2", pe.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    assert pe.active_adapter(llama) == "sst2"
    assert _trainable(llama) == sorted(f"model.layers.{i}.self_attn.{p}_proj.lora_{ab}.sst2.weight"
                                       for i in range(2) for p in "qv" for ab in "AB")
    torch.testing.assert_close(output(llama, ids), y0, rtol=0, atol=0)            # B = 0: the identity

    pe.add_adapter(llama, "mnli", pe.LoraConfig(r=2, target_modules=["k_proj"]))
    assert pe.active_adapter(llama) == "sst2" and all("sst2" in n for n in _trainable(llama))
    pe.set_active_adapter(llama, "mnli")
    assert _trainable(llama) and all(".k_proj.lora_" in n and "mnli" in n for n in _trainable(llama))
    pe.set_active_adapter(llama, None)
    assert _trainable(llama) == []


def test_adapters_switch_outputs(tiny, ids, output, randomize_adapters):
    llama = tiny("llama")
    y0 = output(llama, ids)
    pe.add_adapter(llama, "a", pe.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    pe.add_adapter(llama, "b", pe.LoraConfig(r=4, target_modules=["v_proj", "o_proj"]))
    for name, seed in (("a", 0), ("b", 1)):
        pe.set_active_adapter(llama, name)
        randomize_adapters(llama, seed)
    y_b = output(llama, ids)
    pe.set_active_adapter(llama, "a")
    y_a = output(llama, ids)
    assert not torch.allclose(y_a, y0) and not torch.allclose(y_b, y0) and not torch.allclose(y_a, y_b)
    pe.set_active_adapter(llama, "b")
    torch.testing.assert_close(output(llama, ids), y_b)


@pytest.mark.parametrize("mode", ["none", "all", "lora_only"])
def test_bias_modes(tiny, mode):
    gpt2 = tiny("gpt2")
    pe.add_adapter(gpt2, "a", pe.LoraConfig(r=2, target_modules=["c_attn"], bias=mode))
    biases = [n for n in _trainable(gpt2) if n.endswith(".bias")]
    all_biases = [n for n, _ in gpt2.named_parameters() if n.endswith(".bias")]
    expected = {"none": [], "all": sorted(all_biases),
                "lora_only": [f"transformer.h.{i}.attn.c_attn.bias" for i in range(2)]}[mode]
    assert biases == expected


def test_modules_to_save(tiny, ids, output):
    bert = tiny("bert_cls")
    keys = list(bert.state_dict())
    classifier = bert.classifier
    y0 = output(bert, ids)
    pe.add_adapter(bert, "a", pe.LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    assert isinstance(bert.classifier, ModulesToSave) and bert.classifier.original_module is classifier
    assert {"classifier.modules_to_save.a.weight", "classifier.modules_to_save.a.bias"} <= set(_trainable(bert))
    assert not classifier.weight.requires_grad
    assert set(keys) <= set(bert.state_dict())                                       # base keys unchanged
    with torch.no_grad():
        bert.classifier.modules_to_save["a"].bias.add_(1.0)
    torch.testing.assert_close(output(bert, ids), y0 + 1.0)
    pe.add_adapter(bert, "b", pe.LoraConfig(r=2, target_modules=["value"], modules_to_save=["classifier"]))
    pe.set_active_adapter(bert, "b")
    torch.testing.assert_close(output(bert, ids), y0)                                # b's own, untouched copy
    with pe.disable_adapters(bert):
        pe.set_active_adapter(bert, "a")
        torch.testing.assert_close(output(bert, ids), y0)
    pe.remove_adapter(bert, "a")
    assert isinstance(bert.classifier, ModulesToSave) and list(bert.classifier.modules_to_save) == ["b"]
    pe.unload(bert)
    assert bert.classifier is classifier and list(bert.state_dict()) == keys


def test_merge_disable_unmerge(tiny, ids, output, randomize_adapters):
    gpt2 = tiny("gpt2")
    y0 = output(gpt2, ids)
    pe.add_adapter(gpt2, "a", pe.LoraConfig(r=4, alpha=8, target_modules=["c_attn", "c_fc"]))
    randomize_adapters(gpt2)
    y = output(gpt2, ids)
    pe.merge_adapter(gpt2, "a")
    torch.testing.assert_close(output(gpt2, ids), y)
    with pe.disable_adapters(gpt2):
        torch.testing.assert_close(output(gpt2, ids), y0)
        with pe.disable_adapters(gpt2):
            pass
        torch.testing.assert_close(output(gpt2, ids), y0)                          # still disabled after nesting
    torch.testing.assert_close(output(gpt2, ids), y)
    with pytest.raises(ValueError, match="already merged"):
        pe.merge_adapter(gpt2, "a")
    pe.add_adapter(gpt2, "b", pe.LoraConfig(r=2, target_modules=["c_proj"]))
    with pytest.raises(ValueError, match="unmerge_adapter it first"):
        pe.set_active_adapter(gpt2, "b")
    pe.unmerge_adapter(gpt2, "a")
    torch.testing.assert_close(output(gpt2, ids), y)
    with pytest.raises(ValueError, match="not merged"):
        pe.unmerge_adapter(gpt2, "a")
    with pytest.raises(ValueError, match="only the active adapter can be merged"):
        pe.merge_adapter(gpt2, "b")


def test_disable_adapters_with_lifecycle_calls_inside(tiny, ids, output, randomize_adapters):
    """Inside the block the merged adapter counts as merged: merge_adapter is refused, set_active_adapter to
    another asks for unmerge_adapter first (which keeps it out after the block), removing it leaves nothing to
    merge back; adapters added inside are disabled too."""
    llama = tiny("llama")
    base = output(llama, ids)
    pe.add_adapter(llama, "a", pe.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    pe.add_adapter(llama, "b", pe.LoraConfig(r=4, target_modules=["q_proj"]))
    randomize_adapters(llama)
    y_a = output(llama, ids)
    pe.merge_adapter(llama, "a")
    with pe.disable_adapters(llama):
        with pytest.raises(ValueError, match="cannot merge an adapter inside disable_adapters"):
            pe.merge_adapter(llama, "a")
        with pytest.raises(ValueError, match="'a' is merged into the base weights; unmerge_adapter it first"):
            pe.set_active_adapter(llama, "b")
        pe.add_adapter(llama, "c", pe.LoraConfig(r=4, target_modules=["k_proj"]))
        with torch.no_grad():
            for name, p in llama.named_parameters():
                if ".lora_B.c." in name:
                    p.normal_(generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(output(llama, ids), base)
    assert pe.active_adapter(llama) == "a" and llama.ptlm_adapters.merged == "a"
    torch.testing.assert_close(output(llama, ids), y_a)

    with pe.disable_adapters(llama):
        pe.unmerge_adapter(llama, "a")                     # stays out of the weights after the block
        pe.add_adapter(llama, "d", pe.LoraConfig(r=4, target_modules=["o_proj"]))      # new layers, inside
        with torch.no_grad():
            for name, p in llama.named_parameters():
                if ".lora_B.d." in name:
                    p.normal_(generator=torch.Generator().manual_seed(2))
        pe.set_active_adapter(llama, "d")
        torch.testing.assert_close(output(llama, ids), base)
    assert llama.ptlm_adapters.merged is None
    y_d = output(llama, ids)
    assert not torch.allclose(y_d, base)
    pe.set_active_adapter(llama, "a")
    pe.merge_adapter(llama, "a")
    with pe.disable_adapters(llama):
        pe.remove_adapter(llama, "a")
    assert llama.ptlm_adapters.merged is None and pe.active_adapter(llama) is None
    torch.testing.assert_close(output(llama, ids), base)
    pe.set_active_adapter(llama, "d")
    torch.testing.assert_close(output(llama, ids), y_d)


def test_disable_adapters_inside_a_mixed_batch_block(tiny, ids, output, randomize_adapters):
    """disable_adapters inside adapter_batch gives every row the base model's output, and after it each row has its
    own adapter again, as with one adapter active (the lifecycle calls refused inside the block:
    tests/test_adapter_batch.py)."""
    llama = tiny("llama")
    for name, r in (("a", 4), ("b", 8)):
        pe.add_adapter(llama, name, pe.LoraConfig(r=r, target_modules=["q_proj", "v_proj"]))
        pe.set_active_adapter(llama, name)
        randomize_adapters(llama, seed=r)
    names, ids = ["a", "b", None], torch.cat([ids, ids[:1]])
    with torch.no_grad():
        base = run_alone(llama, None, lambda: output(llama, ids))
        alone = [run_alone(llama, name, lambda: output(llama, ids[row:row + 1]))[0] for row, name in enumerate(names)]
        with pe.adapter_batch(llama, names):
            with pe.disable_adapters(llama):
                torch.testing.assert_close(output(llama, ids), base)
            mixed = output(llama, ids)
    torch.testing.assert_close(mixed, torch.stack(alone))
    assert not torch.allclose(mixed[:2], base[:2])


def test_remove_restores_modules_keys_and_flags(tiny, ids, output, randomize_adapters):
    llama = tiny("llama")
    llama.model.embed_tokens.weight.requires_grad_(False)                           # a user's own choice
    flags = {n: p.requires_grad for n, p in llama.named_parameters()}
    keys = list(llama.state_dict())
    q_proj = llama.model.layers[0].self_attn.q_proj
    y0 = output(llama, ids)
    pe.add_adapter(llama, "a", pe.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    pe.add_adapter(llama, "b", pe.LoraConfig(r=4, target_modules=["q_proj"]))
    randomize_adapters(llama)
    pe.merge_adapter(llama, "a")
    pe.remove_adapter(llama, "a")                                                    # unmerges first
    assert pe.active_adapter(llama) is None and list(pe.adapter_configs(llama)) == ["b"]
    assert isinstance(llama.model.layers[0].self_attn.q_proj, LoraLinear)           # still carries b
    assert not isinstance(llama.model.layers[0].self_attn.v_proj, LoraLinear)
    pe.remove_adapter(llama, "b")
    assert llama.model.layers[0].self_attn.q_proj is q_proj
    assert list(llama.state_dict()) == keys
    assert {n: p.requires_grad for n, p in llama.named_parameters()} == flags
    assert pe.adapter_configs(llama) == {} and not hasattr(llama, "ptlm_adapters")
    torch.testing.assert_close(output(llama, ids), y0)


def test_an_adapter_added_again_under_the_removed_active_name_stays_inactive(tiny, ids):
    """set_active_adapter tells every adapter layer the name, also those without the adapter (v_proj here):
    removing the active adapter resets them all, so a later adapter of that name runs only once activated."""
    llama = tiny("llama")
    pe.add_adapter(llama, "a", pe.LoraConfig(r=4, target_modules=["q_proj"]))
    pe.add_adapter(llama, "b", pe.LoraConfig(r=4, target_modules=["v_proj"]))
    pe.set_active_adapter(llama, "a")
    pe.remove_adapter(llama, "a")
    pe.add_adapter(llama, "a", pe.LoraConfig(r=4, target_modules=["v_proj"]))
    with torch.no_grad():                              # random values in both, without activating either
        for name, p in llama.named_parameters():
            if ".lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    assert pe.active_adapter(llama) is None
    with torch.no_grad():
        with pe.adapter_batch(llama, [None, None]):
            base_rows = llama(input_ids=ids).logits
        plain = llama(input_ids=ids).logits
    torch.testing.assert_close(plain, base_rows)
    pe.remove_adapter(llama, "b")                      # the re-added 'a' is the only one: still inactive
    with torch.no_grad():
        torch.testing.assert_close(llama(input_ids=ids).logits, base_rows)


def test_unload_with_merge_keeps_the_adapted_function(tiny, ids, output, randomize_adapters):
    bert = tiny("bert_cls")
    keys = list(bert.state_dict())
    pe.add_adapter(bert, "a", pe.LoraConfig(r=4, target_modules="all-linear", modules_to_save=["classifier"]))
    randomize_adapters(bert)
    y = output(bert, ids)
    assert pe.unload(bert, merge=True) is bert
    assert not any(isinstance(m, (LoraLinear, ModulesToSave)) for m in bert.modules())
    assert list(bert.state_dict()) == keys
    torch.testing.assert_close(output(bert, ids), y)


@pytest.mark.parametrize("saved", [["lm_head"], ["wte"]])
def test_unload_with_merge_puts_a_copy_of_a_tied_module_in_place(tiny, ids, output, randomize_adapters, saved):
    """GPT-2 ties lm_head to wte; the adapted model runs the adapter's (untied) copy in one and the tied original
    in the other. unload(merge=True) puts the copy in the module's place, as PEFT does (it wrote the copy's
    values into the tied Parameter, changing the other module too)."""
    model = tiny("gpt2")
    keys = list(model.state_dict())
    pe.add_adapter(model, "a", pe.LoraConfig(r=4, alpha=8, target_modules=["c_attn"], modules_to_save=saved))
    randomize_adapters(model, seed=1)
    with torch.no_grad():
        adapted = output(model, ids)
        pe.unload(model, merge=True)
        torch.testing.assert_close(output(model, ids), adapted)
    assert list(model.state_dict()) == keys and not any(isinstance(m, ModulesToSave) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())        # as before the first adapter


@pytest.mark.parametrize("config", [
    pe.BottleneckConfig(bottleneck=8, placement="pfeiffer"),
    pe.PrefixConfig(num_virtual_tokens=3),
    [pe.LoraConfig(r=4, target_modules=["q_proj"]), pe.PrefixConfig(num_virtual_tokens=3)],
], ids=["bottleneck", "prefix", "lora+prefix"])
def test_unload_with_merge_refuses_an_adapter_that_does_not_merge(tiny, ids, output, randomize_adapters, config):
    """Only LoRA folds into the base weights (as merge_adapter says): unload(merge=True) refuses the rest before
    changing anything, where it used to drop them silently."""
    llama = tiny("llama")
    pe.add_adapter(llama, "a", config)
    randomize_adapters(llama)
    y = output(llama, ids)
    with pytest.raises(ValueError, match="unload\\(merge=True\\): the active adapter 'a' is a .*only LoRA adapters"):
        pe.unload(llama, merge=True)
    assert pe.active_adapter(llama) == "a" and llama.ptlm_adapters.merged is None
    torch.testing.assert_close(output(llama, ids), y)


def test_errors_leave_the_model_unchanged(tiny):
    llama = tiny("llama")
    state = {k: v.clone() for k, v in llama.state_dict().items()}
    for name, config in [("a", pe.LoraConfig(target_modules=["nope"])),
                         ("a", pe.LoraConfig(target_modules=["norm"])),
                         ("a", pe.LoraConfig(target_modules=["q_proj"], modules_to_save=["nope"])),
                         ("a.b", pe.LoraConfig()), ("", pe.LoraConfig()), ("keys", pe.LoraConfig()),
                         ("a", "not a config"), ("a", []), ("a", [pe.LoraConfig(r=2), pe.LoraConfig(r=4)]),
                         ("a", [pe.LoraConfig(r=2), pe.LoraConfig(target_modules=["nope"])])]:
        with pytest.raises(ValueError):
            pe.add_adapter(llama, name, config)
    with pytest.raises(ValueError, match="has no adapters"):
        pe.set_active_adapter(llama, "a")
    assert not any(isinstance(m, LoraLinear) for m in llama.modules()) and not hasattr(llama, "ptlm_adapters")
    pe.add_adapter(llama, "a", pe.LoraConfig(r=2))
    with pytest.raises(ValueError, match="already has an adapter named 'a'"):
        pe.add_adapter(llama, "a", pe.LoraConfig(r=2))
    with pytest.raises(ValueError, match="no adapter named 'x'"):
        pe.set_active_adapter(llama, "x")
    pe.unload(llama)
    assert all(torch.equal(v, state[k]) for k, v in llama.state_dict().items())


def test_torch_compile(tiny, ids, output, randomize_adapters):
    llama = tiny("llama")
    pe.add_adapter(llama, "a", pe.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], dropout=0.1))
    randomize_adapters(llama)
    y = output(llama, ids)
    compiled = torch.compile(llama, backend="aot_eager")
    y_compiled = output(compiled, ids)
    y_compiled.sum().backward()
    torch.testing.assert_close(y_compiled, y)
    assert all(p.grad is not None for n, p in llama.named_parameters() if p.requires_grad)
    with pe.disable_adapters(compiled):                                              # the API sees through it
        y0 = output(compiled, ids)
    assert not torch.allclose(y0, y)


def test_hf_trainer_trains_only_the_adapter(tiny, tmp_path):
    from transformers import Trainer, TrainingArguments

    bert = tiny("bert_cls")
    pe.add_adapter(bert, "a", pe.LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
    before = {n: p.detach().clone() for n, p in bert.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 128, (8,), generator=gen), "labels": torch.tensor(i % 3)}
            for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True)
    Trainer(model=bert, args=args, train_dataset=data).train()
    changed = {n for n, p in bert.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n, p in bert.named_parameters() if p.requires_grad}
    assert any(".lora_B.a." in n for n in changed) and "classifier.modules_to_save.a.weight" in changed


@pytest.mark.filterwarnings("ignore::FutureWarning")   # transformers: gradient_checkpointing_enable's new name
@pytest.mark.parametrize("backend,reentrant", [("reference", True), ("reference", False),
                                               pytest.param("triton", False, marks=needs_triton)])
@pytest.mark.parametrize("mixed", [False, True])
def test_gradient_checkpointing_recomputes_the_same_dropout(tiny, monkeypatch, backend, reentrant, mixed):
    """transformers' gradient checkpointing reruns each block's forward in backward: LoRA dropout must draw the
    same masks there (its seed comes from torch's generator, whose state checkpointing restores), one adapter
    active or two trained at once in a mixed batch."""
    monkeypatch.setenv("PTLM_BACKEND", backend)
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    results = []
    for checkpointing in (False, True):
        llama = tiny("llama")
        torch.manual_seed(0)                                                     # lora_A's initialisation
        pe.add_adapter(llama, "a", pe.LoraConfig(r=4, alpha=8, dropout=0.3, target_modules=["q_proj", "down_proj"]))
        pe.add_adapter(llama, "b", pe.LoraConfig(r=2, dropout=0.2, target_modules=["q_proj", "k_proj", "v_proj"]))
        with torch.no_grad():
            for name, p in llama.named_parameters():
                if ".lora_B." in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
        llama.train()
        if checkpointing:
            llama.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            llama.enable_input_require_grads()
        torch.manual_seed(123)
        with pe.adapter_batch(llama, ["b", "a"]) if mixed else contextlib.nullcontext():
            llama(input_ids=ids, labels=ids).loss.backward()
        results.append({n: p.grad for n, p in llama.named_parameters() if p.requires_grad})
    plain, checkpointed = results
    assert plain.keys() == checkpointed.keys() and all(g is not None for g in plain.values())
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


# ------------------------------------------------------------------ robustness: names, copies, wrappers
def _randomize_named(model, seed=0, match=("lora_", "ptlm_", "modules_to_save")):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in match):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _flags(model):
    return {n: p.requires_grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["get", "copy", "setdefault"])
def test_prompt_adapter_name_clashing_with_parameterdict_methods(tiny, ids, output, name):
    """Prompt adapters live in an nn.ParameterDict, whose methods (get, copy, setdefault, fromkeys, popitem) cannot
    be keys. Such a name either works, or is refused with a ValueError before anything changes (no registry, no
    prompt layer or hook left behind, as a KeyError halfway through add_adapter once did)."""
    llama = tiny("llama")
    keys = list(llama.state_dict())
    y0 = output(llama, ids)
    try:
        pe.add_adapter(llama, name, pe.PromptConfig(num_virtual_tokens=2))
    except ValueError:
        assert not hasattr(llama, "ptlm_adapters") and not hasattr(llama, "ptlm_prompt")
        assert list(llama.state_dict()) == keys and not llama._forward_pre_hooks
        torch.testing.assert_close(output(llama, ids), y0)
    else:
        assert pe.adapter_configs(llama).keys() == {name} and pe.active_adapter(llama) == name


def test_adapter_configs_returns_copies(tiny, ids, output, randomize_adapters, tmp_path):
    """adapter_configs returns copies: mutating what it returned leaves the model's adapter alone (what
    save_adapter writes, which biases set_active_adapter trains)."""
    llama = tiny("llama")
    pe.add_adapter(llama, "a", pe.LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    randomize_adapters(llama)
    y = output(llama, ids)
    config = pe.adapter_configs(llama)["a"]
    config.alpha = 800.0
    config.bias = "all"
    assert pe.adapter_configs(llama)["a"].alpha == 8 and pe.adapter_configs(llama)["a"].bias == "none"
    pe.set_active_adapter(llama, "a")
    assert not any(p.requires_grad for n, p in llama.named_parameters() if n.endswith(".bias"))
    pe.save_adapter(llama, "a", tmp_path)
    fresh = tiny("llama")
    pe.load_adapter(fresh, tmp_path, "a")
    torch.testing.assert_close(output(fresh, ids), y)


def test_unload_after_load_state_dict_assign_restores_base_requires_grad(tiny):
    """load_state_dict(assign=True) replaces the Parameter objects (the layers follow it); unload still gives the
    base Parameters the requires_grad flags they had before the first adapter, remembered by name (regression:
    remembered by Parameter object, the new Parameters stayed frozen)."""
    llama = tiny("llama")
    before = _flags(llama)
    assert all(before.values())
    pe.add_adapter(llama, "a", pe.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    state = {k: v.clone() for k, v in llama.state_dict().items()}
    llama.load_state_dict(state, strict=True, assign=True)
    pe.unload(llama)
    assert _flags(llama) == before


def test_merging_into_a_tied_weight_is_refused(tiny, ids, output):
    """GPT-2's lm_head shares its weight with wte: folding B A into it would change the input embeddings too (the
    merged model computing something else than the adapted one). merge_adapter and unload(merge=True) refuse it
    before anything changes."""
    gpt2 = tiny("gpt2")
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    pe.add_adapter(gpt2, "a", pe.LoraConfig(r=4, target_modules=["lm_head"]))
    _randomize_named(gpt2)
    y = output(gpt2, ids)
    with pytest.raises(ValueError, match="tied"):
        pe.merge_adapter(gpt2, "a")
    with pytest.raises(ValueError, match="tied"):
        pe.unload(gpt2, merge=True)
    torch.testing.assert_close(output(gpt2, ids), y, rtol=0, atol=0)


def test_data_parallel_wrapped_model(tiny, ids, output, tmp_path):
    """The API sees through an nn.DataParallel wrapper (on the CPU it just calls its module) as through
    torch.compile: the adapter's registry lives on the model itself, and save_adapter writes the model's own keys
    (not base_model.model.module.model...), which load_adapter puts into a plain model."""
    llama = tiny("llama")
    wrapped = nn.DataParallel(llama)
    pe.add_adapter(wrapped, "a", pe.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    _randomize_named(llama)
    assert list(pe.adapter_configs(llama)) == ["a"]
    assert_reloads_same(tiny, "llama", wrapped, "a", tmp_path, ids, output)


def test_adapters_added_inside_disable_adapters_after_removing_all(tiny, ids, output):
    """disable_adapters skips adapters added inside the block too, also after the last adapter was removed inside
    it: the block's count survives (regression: it went with the registry, and a later adapter ran)."""
    llama = tiny("llama")
    base = output(llama, ids)
    pe.add_adapter(llama, "a", pe.LoraConfig(r=4, target_modules=["q_proj"]))
    with pe.disable_adapters(llama):
        pe.remove_adapter(llama, "a")
        pe.add_adapter(llama, "b", pe.LoraConfig(r=4, target_modules=["v_proj"]))
        _randomize_named(llama)
        torch.testing.assert_close(output(llama, ids), base)


def test_unload_of_a_compiled_model_returns_it(tiny):
    """unload returns the model it was given: for a torch.compile'd model (which the API sees through) the compiled
    wrapper, not the inner module, so `model = pe.unload(model)` keeps the compilation."""
    llama = tiny("llama")
    compiled = torch.compile(llama, backend="eager")
    pe.add_adapter(compiled, "a", pe.LoraConfig(r=4, target_modules=["q_proj"]))
    assert pe.unload(compiled) is compiled
    assert not any(isinstance(m, LoraLinear) for m in llama.modules())


@pytest.mark.parametrize("first,layer", [
    (pe.PrefixConfig(num_virtual_tokens=2), "ptlm_prefix"),
    (pe.BottleneckConfig(bottleneck=4, layers_to_transform=0), "ptlm_bottleneck"),
], ids=["prefix", "bottleneck"])
def test_modules_to_save_naming_another_adapters_layer(tiny, ids, output, first, layer):
    """modules_to_save naming a prefix / bottleneck adapter layer (the plain suffix rule also matches "prefix",
    "bottleneck") is refused as one naming a LoRA layer is: wrapped in a ModulesToSave, the layer would be out of
    the API's reach. Either way disable_adapters gives the base outputs and unload leaves the base model (keys
    and outputs)."""
    llama = tiny("llama")
    keys = list(llama.state_dict())
    base = output(llama, ids)
    pe.add_adapter(llama, "p", first)
    _randomize_named(llama)
    try:
        pe.add_adapter(llama, "a", pe.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=[layer]))
    except ValueError:
        pass
    with pe.disable_adapters(llama):
        torch.testing.assert_close(output(llama, ids), base)
    pe.unload(llama)
    assert list(llama.state_dict()) == keys
    torch.testing.assert_close(output(llama, ids), base)


# ------------------------------------------------------------ combined adapters: parts and their copies
def _snapshot_all(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, hook_count(model),
            [type(m).__name__ for m in model.modules()], {n: p.requires_grad for n, p in model.named_parameters()})


def _assert_restored_all(model, snapshot):
    state, hooks, types, flags = snapshot
    assert sorted(model.state_dict()) == sorted(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert hook_count(model) == hooks
    assert [type(m).__name__ for m in model.modules()] == types
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


# ------------------------------------------------------------------ LoRA part targeting another part's copy
@pytest.mark.parametrize("kind,lora,other", [
    ("llama", pe.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]),
     pe.PromptConfig(num_virtual_tokens=2, modules_to_save=["lm_head"])),
    ("llama", pe.LoraConfig(r=4, target_modules=["gate_proj"]),
     pe.BottleneckConfig(bottleneck=4, placement="pfeiffer", layers_to_transform=[0],
                         modules_to_save=["layers.1.mlp"])),
    ("bert_cls", pe.LoraConfig(r=4, target_modules=["query", "classifier"]),
     pe.PrefixConfig(num_virtual_tokens=2, modules_to_save=["classifier"])),
], ids=["prompt-lm_head", "bottleneck-mlp", "prefix-classifier"])
def test_lora_part_inside_another_parts_modules_to_save(tiny, ids, output, kind, lora, other):
    """A LoRA part targeting a module that another part of the same adapter keeps a copy of: alone, a LoraConfig
    leaves its own modules_to_save out of its targets (as PEFT), and a module that already carries LoRA is refused
    as modules_to_save. Within one combined adapter the config is refused before anything changes; an adapter
    that were accepted would have to map in a mixed batch and go away cleanly (no ModulesToSave wrapping a
    LoraLinear left behind)."""
    model = tiny(kind)
    before = _snapshot_all(model)
    try:
        pe.add_adapter(model, "a", [lora, other])
    except ValueError:
        _assert_restored_all(model, before)
        assert not hasattr(model, "ptlm_adapters")
        return
    x = ids[:1]
    with torch.no_grad():
        alone = output(model, x)
        with pe.adapter_batch(model, ["a", None]):
            mixed = output(model, torch.cat([x, x]))
    q = getattr(other, "num_virtual_tokens", 0) if isinstance(other, pe.PromptConfig) else 0
    torch.testing.assert_close(mixed[0, -alone.shape[1]:] if q else mixed[0], alone[0])
    pe.remove_adapter(model, "a")
    _assert_restored_all(model, before)


# ---------------------------------------------------------------------------------------- saving combined adapters
@pytest.mark.parametrize("lora_saved,other_saved", [(["down_proj"], ["mlp"]), (["mlp"], ["down_proj"])],
                         ids=["lora-inner", "lora-outer"])
def test_nested_modules_to_save_across_parts_save_and_load(tiny, tmp_path, ids, output, randomize_adapters,
                                                           lora_saved, other_saved):
    """One part keeps a copy of `mlp`, the other of `down_proj` (inside it): add_adapter refuses it before anything
    changes; an adapter that were accepted would have to save and load back to the same outputs (regression: it
    was accepted, and save_adapter raised "modules_to_save ['down_proj'] matched no module")."""
    model = tiny("llama")
    before = _snapshot_all(model)
    try:
        pe.add_adapter(model, "a", [pe.LoraConfig(r=3, target_modules=["q_proj"], modules_to_save=lora_saved),
                                    pe.PromptConfig(num_virtual_tokens=2, modules_to_save=other_saved)])
    except ValueError:
        _assert_restored_all(model, before)
        return
    randomize_adapters(model)
    assert_reloads_same(tiny, "llama", model, "a", tmp_path / "a", ids, output)
