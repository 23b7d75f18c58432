"""LoRA adapter files (io/lora.py): the PEFT layout and config fields, round trips, bias="all" beside another
adapter's modules_to_save, PEFT configs read, and PEFT files whose init rewrote the base weights."""
import json

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import ptlm_engine as pe
from ptlm_engine import io
from tests.helpers import assert_loads_like_peft, peft_file

pytestmark = pytest.mark.usefixtures("reference_backend")


def test_peft_layout(saved):
    _, path = saved(target_modules=["c_attn"], bias="lora_only", dropout=0.1, use_rslora=True)
    config = json.loads((path / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "fan_in_fan_out",
                                   "bias", "target_modules", "task_type", "modules_to_save")} == {
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "use_rslora": True,
        "fan_in_fan_out": True, "bias": "lora_only", "target_modules": ["c_attn"], "task_type": None,
        "modules_to_save": None}
    tensors = load_file(path / "adapter_model.safetensors")
    assert sorted(tensors) == sorted(f"base_model.model.transformer.h.{i}.attn.c_attn.{leaf}"
                                     for i in range(2) for leaf in ("lora_A.weight", "lora_B.weight",
                                                                    "base_layer.bias"))
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (4, 64)
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (192, 4)


def test_all_linear_is_saved_as_the_resolved_names(saved):
    _, path = saved("llama", target_modules="all-linear", layers_to_transform=1)
    config = json.loads((path / "adapter_config.json").read_text())
    assert len(config["target_modules"]) == 7 and all(".layers.1." in n for n in config["target_modules"])


@pytest.mark.parametrize("kind,kw", [
    ("gpt2", {"target_modules": ["c_attn", "c_proj"], "bias": "all"}),
    ("llama", {"target_modules": r"model\.layers\.\d\.mlp\.(up|down)_proj", "use_rslora": True}),
    ("bert_cls", {"target_modules": ["query"], "modules_to_save": ["classifier"], "bias": "lora_only"}),
])
def test_round_trip(tiny, saved, ids, kind, kw, output):
    model, path = saved(kind, **kw)
    y = output(model, ids)
    fresh = tiny(kind)
    assert pe.load_adapter(fresh, path, name="b") == "b"
    assert pe.active_adapter(fresh) == "b" and pe.adapter_configs(fresh)["b"] == pe.adapter_configs(model)["a"]
    torch.testing.assert_close(output(fresh, ids), y)


def test_bias_all_beside_another_adapters_modules_to_save(tiny, tmp_path, ids, output, randomize_adapters):
    """bias="all" covers the classifier's own bias where another adapter keeps a copy of the classifier (it runs
    for this adapter): trained, saved and loaded as from a plain model, both ways."""
    bert = tiny("bert_cls")
    pe.add_adapter(bert, "s", pe.LoraConfig(r=4, target_modules=["query"], modules_to_save=["classifier"]))
    pe.add_adapter(bert, "a", pe.LoraConfig(r=4, target_modules=["value"], bias="all"))
    pe.set_active_adapter(bert, "a")
    assert bert.classifier.original_module.bias.requires_grad
    randomize_adapters(bert)
    y = output(bert, ids)
    pe.save_adapter(bert, "a", tmp_path / "a")
    plain = tiny("bert_cls")
    pe.load_adapter(plain, tmp_path / "a", "a")
    torch.testing.assert_close(output(plain, ids), y)
    wrapped = tiny("bert_cls")
    pe.add_adapter(wrapped, "s", pe.LoraConfig(r=4, target_modules=["query"], modules_to_save=["classifier"]))
    pe.load_adapter(wrapped, tmp_path / "a", "a")
    pe.set_active_adapter(wrapped, "a")
    torch.testing.assert_close(output(wrapped, ids), y)


def test_read_config_maps_peft_fields(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": ["q_proj"],
        "layers_to_transform": [0, 1], "layers_pattern": "layers", "bias": "none", "use_dora": False,
        "rank_pattern": {}, "task_type": "CAUSAL_LM", "megatron_core": "megatron.core"}))
    assert io.read_config(tmp_path) == pe.LoraConfig(r=16, alpha=32, dropout=0.05, target_modules=["q_proj"],
                                                     layers_to_transform=[0, 1], layers_pattern="layers")


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_lora_file_whose_init_rewrote_the_base_weights(tiny, tmp_path, ids, output, init):
    """PiSSA / OLoRA move the principal part of W0 into A and B and leave W0 - B0 A0 in the base layer, which PEFT
    redoes on loading; load_adapter refuses such a file with a ValueError (computing PEFT's outputs would do too;
    loaded onto the unchanged W0, the principal part would count twice)."""
    theirs = peft.get_peft_model(tiny("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                init_lora_weights=init))
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))                    # "trained"
    theirs.save_pretrained(tmp_path)
    expected = output(theirs.eval(), ids)
    torch.testing.assert_close(output(peft.PeftModel.from_pretrained(tiny("llama"), tmp_path).eval(), ids),
                               expected)                              # PEFT reads its own file back exactly
    ours = tiny("llama")
    try:
        pe.load_adapter(ours, tmp_path, name="a")
    except ValueError:
        return                                                        # a clear refusal is fine too
    torch.testing.assert_close(output(ours, ids), expected)


# ------------------------------------------------------------------- PEFT's own files: what they compute


# ------------------------------------------------------------------------------------------ PEFT -> ptlm
def test_peft_lora_file_with_lm_head_target_loads(tiny, ids, tmp_path, output):
    """LoRA on lm_head: PEFT's save_pretrained (save_embedding_layers="auto") also writes the base head,
    `lm_head.base_layer.weight`, and writes it into the model on loading; load_adapter takes it as PEFT does and
    computes PEFT's outputs."""
    theirs = peft_file(tiny("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]), tmp_path)
    assert "base_model.model.lm_head.base_layer.weight" in load_file(tmp_path / "adapter_model.safetensors")
    assert_loads_like_peft(tiny, "llama", theirs, tmp_path, ids, output)


def test_peft_lora_file_with_ensure_weight_tying_loads_or_is_refused_clearly(tiny, ids, tmp_path, output):
    """GPT-2 (lm_head tied to wte), modules_to_save=["lm_head"], ensure_weight_tying=True: PEFT keeps one trained
    copy for wte and lm_head (its file lists modules_to_save ["transformer.wte"] and holds both keys).
    load_adapter refuses such a file with a ValueError naming ensure_weight_tying (computing PEFT's outputs would
    do too; an "unexpected key" error naming neither the field nor the tying would not)."""
    config = peft.LoraConfig(r=4, target_modules=["c_attn"], modules_to_save=["lm_head"], ensure_weight_tying=True)
    theirs = peft_file(tiny("gpt2"), config, tmp_path)
    expected = output(theirs, ids)
    torch.testing.assert_close(output(peft.PeftModel.from_pretrained(tiny("gpt2"), tmp_path), ids), expected)
    ours = tiny("gpt2")
    try:
        pe.load_adapter(ours, tmp_path, name="a")
    except ValueError as e:                                   # a clear refusal would be acceptable
        assert "ensure_weight_tying" in str(e), str(e)
        return
    torch.testing.assert_close(output(ours, ids), expected)


@pytest.mark.parametrize("field,value", [("exclude_modules", []), ("modules_to_save", []),
                                         ("layers_to_transform", [])])
def test_peft_lora_file_with_an_empty_list_loads(tiny, ids, tmp_path, output, field, value):
    """PEFT writes an empty list as given (training scripts often default these fields to []) and reads it as
    "none"; load_adapter reads it as none too (LoraConfig itself still refuses an empty list)."""
    theirs = peft_file(tiny("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"], **{field: value}), tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())[field] == value
    assert_loads_like_peft(tiny, "llama", theirs, tmp_path, ids, output)


def test_peft_modules_to_save_names_match_as_peft_matches_them(tiny, ids, tmp_path, output):
    """PEFT matches a modules_to_save entry as a plain suffix of the module name (utils/other.py _set_trainable:
    key.endswith(name)): "norm" on Llama keeps copies of model.norm and of every input_layernorm /
    post_attention_layernorm, and its file holds all five. load_adapter matches the same five and computes PEFT's
    outputs (regression: a match at a dot only expected model.norm alone and refused the file)."""
    theirs = peft_file(tiny("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["norm"]),
                        tmp_path)
    assert_loads_like_peft(tiny, "llama", theirs, tmp_path, ids, output)


def test_peft_layers_to_transform_leaves_exact_target_names_alone(tiny, ids, tmp_path, output):
    """PEFT applies layers_to_transform only to targets matched as a name suffix; an entry equal to the whole
    module name targets it whatever its layer (tuners_utils.check_target_module_exists: `key in target_modules`
    skips the layer check). target_modules ["query", "classifier"] with layers_to_transform [0] on BERT: PEFT
    puts LoRA on layer 0's query and on the classifier, which has no layer index; load_adapter takes both and
    computes PEFT's outputs."""
    config = peft.LoraConfig(r=4, target_modules=["query", "classifier"], layers_to_transform=[0])
    theirs = peft_file(tiny("bert_cls"), config, tmp_path)
    assert "base_model.model.classifier.lora_A.weight" in load_file(tmp_path / "adapter_model.safetensors")
    assert_loads_like_peft(tiny, "bert_cls", theirs, tmp_path, ids, output, check_peft=False)


# ------------------------------------------------------------------------------------------ ptlm -> PEFT
class _Blocks(nn.Module):
    """A plain PyTorch model whose block list is the top-level `layers` (layers.N.proj)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.ModuleDict({"proj": nn.Linear(8, 8)}) for _ in range(3)])

    def forward(self, x):
        for block in self.layers:
            x = block["proj"](x)
        return x


def test_layers_to_transform_on_a_top_level_block_list_loads_in_peft(tmp_path, randomize_adapters):
    """A plain model whose block list is top-level ("layers.1.proj"): PEFT finds no layer index there (its pattern
    needs a segment before the block list), so save_adapter names the resolved targets (as it does for
    "all-linear"), which PEFT matches exactly: PeftModel.from_pretrained loads the file and computes our outputs
    (regression: the file gave target_modules ["proj"] + layers_to_transform [1], and PEFT raised "Target modules
    {'proj'} not found")."""
    ours = _Blocks()
    pe.add_adapter(ours, "a", pe.LoraConfig(r=2, target_modules=["proj"], layers_to_transform=[1]))
    randomize_adapters(ours)
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ours(x)
    pe.save_adapter(ours, "a", tmp_path)
    theirs = peft.PeftModel.from_pretrained(_Blocks(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), expected)
