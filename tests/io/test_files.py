"""Adapter files through save_adapter / load_adapter (ptlm_engine/io/__init__.py and io/files.py): Hub repo ids,
missing and bad files (LoRA files here) that must fail clearly without touching the model, rollback when copying
fails, the name check, combined adapters (one part directory per method) and saving over the other layout."""
import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import ptlm_engine as pe
from ptlm_engine import io
from ptlm_engine.layers import LoraLinear
from tests.helpers import assert_reloads_same

pytestmark = pytest.mark.usefixtures("reference_backend")


def test_hub_repo_ids_come_through_the_hub_cache(tiny, saved, ids, output, monkeypatch, tmp_path):
    """A repo id ("org/name") is fetched with huggingface_hub (here a stand-in serving tmp_path), with its
    revision and subfolder; a failure there is a FileNotFoundError naming the id."""
    import huggingface_hub
    model, path = saved(target_modules=["c_attn"])              # tmp_path / "a"
    calls = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, allow_patterns))
        if repo_id != "org/adapters":
            raise huggingface_hub.errors.RepositoryNotFoundError(f"{repo_id} not found")
        return str(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    fresh = tiny("gpt2")
    pe.load_adapter(fresh, "org/adapters", name="b", revision="v1", subfolder="a")
    torch.testing.assert_close(output(fresh, ids), output(model, ids))
    assert calls == [("org/adapters", "v1", ["a/adapter_config.json", "a/adapter_model.safetensors",
                                             "a/*/adapter_config.json", "a/*/adapter_model.safetensors"])]
    assert io.read_config("org/adapters", subfolder="a") == pe.LoraConfig(r=4, alpha=8, target_modules=["c_attn"])
    state = _state(fresh)
    with pytest.raises(FileNotFoundError, match="org/missing: no such directory, and the Hugging Face Hub"):
        pe.load_adapter(fresh, "org/missing", name="c")
    _assert_unchanged(fresh, state, adapters=["b"])
    monkeypatch.chdir(tmp_path)                                  # a local directory wins over a repo id
    (tmp_path / "org").mkdir()
    pe.save_adapter(model, "a", tmp_path / "org" / "local")
    pe.load_adapter(fresh, "org/local", name="d")
    assert len(calls) == 3


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, state, adapters=()):
    assert list(pe.adapter_configs(model)) == list(adapters)
    assert sorted(model.state_dict()) == sorted(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_missing_files(tiny, saved, tmp_path):
    gpt2, path = saved(target_modules=["c_attn"])
    fresh = tiny("gpt2")
    state = _state(fresh)
    with pytest.raises(FileNotFoundError, match="adapter_config.json does not exist"):
        pe.load_adapter(fresh, tmp_path / "nowhere")
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.bin"):
        pe.load_adapter(fresh, path)
    _assert_unchanged(fresh, state)


def _corrupt(path, what):
    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    config, tensors = json.loads(config_file.read_text()), load_file(weights_file)
    key = "base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"
    if what == "json":
        config_file.write_text("{not json")
    elif what == "safetensors":
        weights_file.write_bytes(weights_file.read_bytes()[:100])
    elif what == "peft_type":
        config["peft_type"] = "IA3"
    elif what == "dora":
        config["use_dora"] = True
    elif what == "rank":
        config["r"] = 0
    elif what == "rank_pattern":   # layer 1's c_attn at rank 3: the file's tensors there are rank 4
        config["rank_pattern"] = {r"h\.1\.attn\.c_attn": 3}
    elif what == "bad_pattern":
        config["rank_pattern"] = {"c_attn(": 3}
    elif what == "shape":
        tensors[key] = tensors[key][:, :2].contiguous()
    elif what == "missing":
        del tensors[key]
    elif what == "extra":
        tensors["base_model.model.transformer.h.1.attn.c_proj.lora_A.weight"] = tensors[key].clone()
    elif what == "targets":
        config["target_modules"] = ["c_fc"]
    if what not in ("json", "safetensors"):
        config_file.write_text(json.dumps(config))
        save_file(tensors, weights_file)


@pytest.mark.parametrize("what,match", [
    ("json", "not a readable JSON file"),
    ("safetensors", "not a readable safetensors file"),
    ("peft_type", "peft_type 'IA3' is not supported"),
    ("dora", "use_dora=True asks for a PEFT feature"),
    ("rank", "r must be a positive integer"),
    ("rank_pattern", r"h.1.attn.c_attn.lora_A.weight: shape \(4, 64\), the model needs \(3, 64\)"),
    ("bad_pattern", "not a valid regular expression"),
    ("shape", r"lora_B.weight: shape \(192, 2\), the model needs \(192, 4\)"),
    ("missing", r"missing base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"),
    ("extra", "unexpected base_model.model.transformer.h.1.attn.c_proj.lora_A.weight"),
    ("targets", "missing .*c_fc.lora_A.weight"),
])
def test_bad_files_fail_clearly_and_change_nothing(tiny, saved, what, match):
    _, path = saved(target_modules=["c_attn"], bias="all")
    fresh = tiny("gpt2")
    pe.add_adapter(fresh, "other", pe.LoraConfig(r=2, target_modules=["c_proj"]))
    state = _state(fresh)
    _corrupt(path, what)
    with pytest.raises(ValueError, match=match):
        pe.load_adapter(fresh, path, name="a")
    _assert_unchanged(fresh, state, adapters=["other"])
    assert not isinstance(fresh.transformer.h[0].attn.c_attn, LoraLinear)


def test_failure_while_copying_rolls_back(tiny, saved, monkeypatch):
    _, path = saved("bert_cls", target_modules=["query"], modules_to_save=["classifier"], bias="all")
    fresh = tiny("bert_cls")
    state = _state(fresh)
    flags = {n: p.requires_grad for n, p in fresh.named_parameters()}
    copies, real_copy = [], torch.Tensor.copy_

    def copy_failing_once(self, src, *args, **kwargs):
        copies.append(self)
        if len(copies) == 9:   # 4 LoRA weights, 2 classifier tensors, then 2 base biases already overwritten
            raise RuntimeError("device lost")
        return real_copy(self, src, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "copy_", copy_failing_once)
    with pytest.raises(RuntimeError, match="device lost"):
        pe.load_adapter(fresh, path, name="a")
    monkeypatch.undo()
    _assert_unchanged(fresh, state)
    assert {n: p.requires_grad for n, p in fresh.named_parameters()} == flags


def test_name_taken(saved, randomize_adapters):
    """Loading under a name the model already has is refused before anything changes: that adapter keeps its own
    values (the file's would silently replace them)."""
    gpt2, path = saved(target_modules=["c_attn"])
    randomize_adapters(gpt2, seed=1)                                   # 'a' no longer holds the file's values
    state = _state(gpt2)
    with pytest.raises(ValueError, match="already has an adapter named 'a'"):
        pe.load_adapter(gpt2, path, name="a")
    _assert_unchanged(gpt2, state, adapters=["a"])


@pytest.mark.parametrize("kind,parts", [
    # LoRA keeps a copy of lm_head; the prefix part has no modules_to_save of its own
    ("llama", lambda: [pe.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
                       pe.PrefixConfig(num_virtual_tokens=3)]),
    # the bottleneck part keeps the copy; the prompt part has none
    ("llama", lambda: [pe.BottleneckConfig(bottleneck=8, modules_to_save=["lm_head"]),
                       pe.PromptConfig(num_virtual_tokens=3)]),
    # the prompt part keeps the classifier; the LoRA part trains every base bias (bias="all")
    ("bert_cls", lambda: [pe.LoraConfig(r=4, target_modules=["query"], bias="all"),
                          pe.PromptConfig(num_virtual_tokens=3, modules_to_save=["classifier"])]),
])
def test_combined_adapter_with_modules_to_save_round_trips(tiny, tmp_path, ids, output, randomize_adapters, kind,
                                                           parts):
    """Each part's file holds the copies of its own modules_to_save, and a LoRA part's bias="all" leaves out the
    modules another part keeps a copy of (every part's file held all the adapter's copies, which loading
    refused, and the classifier copy's bias was taken as the base classifier's)."""
    model = tiny(kind)
    pe.add_adapter(model, "a", parts())
    randomize_adapters(model)
    assert_reloads_same(tiny, kind, model, "a", tmp_path / "a", ids, output)


def test_saving_a_combined_adapter_over_a_single_one_loads_the_combined_one(tiny, tmp_path, ids, output,
                                                                           randomize_adapters):
    """Saving a combined adapter into a directory that held a single one removes the top-level files first
    (they stayed, and loading, which prefers them, silently gave back the old adapter)."""
    model = tiny("llama")
    pe.add_adapter(model, "old", pe.LoraConfig(r=2, target_modules=["q_proj"]))
    pe.add_adapter(model, "a", [pe.LoraConfig(r=4, target_modules=["v_proj"]),
                                pe.PrefixConfig(num_virtual_tokens=3)])
    pe.set_active_adapter(model, "a")
    randomize_adapters(model)
    expected = output(model, ids)
    path = tmp_path / "checkpoint"
    pe.save_adapter(model, "old", path)
    pe.save_adapter(model, "a", path)           # the same checkpoint directory, written again
    fresh = tiny("llama")
    pe.load_adapter(fresh, path, name="a")
    assert pe.adapter_configs(fresh)["a"] == pe.adapter_configs(model)["a"]
    torch.testing.assert_close(output(fresh, ids), expected)
    pe.save_adapter(model, "old", path)         # and back: loading reads the top-level files; the part
    back = tiny("llama")                        # directories stay (they may be PEFT's adapters, see below)
    pe.load_adapter(back, path, name="old")
    assert pe.adapter_configs(back)["old"] == pe.adapter_configs(model)["old"]


def test_saving_keeps_a_peft_adapter_named_like_a_combined_part(tiny, tmp_path, randomize_adapters):
    """PEFT's save_pretrained of a model with adapters "default" and "lora" files the second in `dir/lora/`.
    Saving one of ours into `dir` (the default one, loaded and fine-tuned) keeps that other adapter's files: only
    part directories of a combined adapter we wrote are cleared (regression: every `dir/<method>/` was removed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"]))
        theirs.add_adapter("lora", peft.LoraConfig(r=2, target_modules=["v_proj"]))
    theirs.save_pretrained(tmp_path)
    assert (tmp_path / "lora" / "adapter_config.json").is_file()
    ours = tiny("llama")
    pe.load_adapter(ours, tmp_path, name="default")
    randomize_adapters(ours)
    pe.save_adapter(ours, "default", tmp_path)
    assert (tmp_path / "lora" / "adapter_config.json").is_file()
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------ combined adapters: parts' files
# ------------------------------------------------------------------------------------------ files, seq-cls heads
@pytest.mark.parametrize("other", [pe.PrefixConfig(num_virtual_tokens=3), pe.PromptConfig(num_virtual_tokens=3)],
                         ids=["prefix", "prompt"])
def test_trained_classifier_copy_of_lora_part_survives_save_and_load(tiny, tmp_path, ids, output, randomize_adapters,
                                                                     other):
    """The LoRA part keeps a trained copy of the classifier (modules_to_save), the prefix / prompt part none. The
    reloaded adapter computes what the saved one did: the classifier copy PEFT's SEQ_CLS task model keeps is filed
    for single prompt-learning adapters only, so no base classifier in the other part's file overwrites the LoRA
    part's trained copy on loading."""
    model = tiny("bert_cls")
    pe.add_adapter(model, "a", [pe.LoraConfig(r=4, target_modules=["query"], modules_to_save=["classifier"]), other])
    randomize_adapters(model)
    assert_reloads_same(tiny, "bert_cls", model, "a", tmp_path / "a", ids, output)


@pytest.mark.parametrize("other", [pe.PrefixConfig(num_virtual_tokens=3), pe.PromptConfig(num_virtual_tokens=3)],
                         ids=["prefix", "prompt"])
def test_lora_bias_all_with_prompt_learning_part_on_seq_cls_loads_back(tiny, tmp_path, ids, output,
                                                                      randomize_adapters, other):
    """LoRA(bias="all") + a prefix / prompt part on a sequence classifier: the files save_adapter writes load back
    to the same outputs (regression: the LoRA part's file held a classifier bias that loading then refused as
    unexpected)."""
    model = tiny("bert_cls")
    pe.add_adapter(model, "a", [pe.LoraConfig(r=4, target_modules=["query"], bias="all"), other])
    randomize_adapters(model)
    assert_reloads_same(tiny, "bert_cls", model, "a", tmp_path / "a", ids, output)


@pytest.mark.parametrize("other", [pe.PrefixConfig(num_virtual_tokens=2), pe.PromptConfig(num_virtual_tokens=2)],
                         ids=["prefix", "prompt"])
def test_lora_on_classifier_with_prompt_learning_part_saves(tiny, tmp_path, ids, output, randomize_adapters, other):
    """LoRA on the classifier + a prefix / prompt part of the same adapter on a sequence classifier: what
    add_adapter accepts also saves and loads back to the same outputs (regression: save_adapter refused, the
    classifier "already carries LoRA adapters")."""
    model = tiny("bert_cls")
    pe.add_adapter(model, "a", [pe.LoraConfig(r=3, target_modules=["query", "classifier"]), other])
    randomize_adapters(model)
    assert_reloads_same(tiny, "bert_cls", model, "a", tmp_path / "a", ids, output)


def test_resaving_a_loaded_combined_adapter_gives_identical_files(tiny, tmp_path, randomize_adapters):
    """Saved, loaded and saved again, a combined adapter's files are the same, also on a sequence classifier whose
    prompt part keeps a classifier copy (the prefix part's file must not hold the base classifier the first time
    and the trained copy the second)."""
    from safetensors.torch import load_file
    model = tiny("bert_cls")
    pe.add_adapter(model, "a", [pe.LoraConfig(r=3, target_modules=["query"]), pe.PrefixConfig(num_virtual_tokens=2),
                                pe.PromptConfig(num_virtual_tokens=2, modules_to_save=["classifier"])])
    randomize_adapters(model)
    pe.save_adapter(model, "a", tmp_path / "first")
    fresh = tiny("bert_cls")
    pe.load_adapter(fresh, tmp_path / "first", name="a")
    pe.save_adapter(fresh, "a", tmp_path / "second")
    for part in ("lora", "prefix_tuning", "prompt_tuning"):
        first = load_file(tmp_path / "first" / part / "adapter_model.safetensors")
        second = load_file(tmp_path / "second" / part / "adapter_model.safetensors")
        assert sorted(first) == sorted(second), part
        for k in first:
            assert torch.equal(first[k], second[k]), f"{part}: {k}"


def test_loaded_combined_adapter_keeps_its_config(tiny, tmp_path, randomize_adapters):
    """A combined adapter's config, loaded back (and read_config of its directory), lists its parts in the
    adapter's own order (the methods' order, LoRA first), not in the order of the part directories' names: the
    loaded adapter's config equals the saved one's."""
    from ptlm_engine.io import read_config
    model = tiny("llama")
    pe.add_adapter(model, "a", [pe.PromptConfig(num_virtual_tokens=2), pe.BottleneckConfig(bottleneck=4),
                                pe.LoraConfig(r=2, target_modules=["q_proj"])])
    randomize_adapters(model)
    pe.save_adapter(model, "a", tmp_path / "a")
    fresh = tiny("llama")
    pe.load_adapter(fresh, tmp_path / "a", name="a")
    assert pe.adapter_configs(fresh)["a"] == pe.adapter_configs(model)["a"]
    assert read_config(tmp_path / "a") == pe.adapter_configs(model)["a"]
