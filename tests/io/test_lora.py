"""LoRA adapter files (io/lora.py): the PEFT layout and config fields, round trips, bias="all" beside another
adapter's modules_to_save, PEFT configs read, and PEFT files whose init rewrote the base weights."""
import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import ptlm_engine as pe
from ptlm_engine import io

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
    """PiSSA / OLoRA move the principal part of W0 into A and B and leave W0 - B0 A0 in the base layer, which
    PEFT redoes on loading; here such a file is refused (it loaded onto the unchanged W0: the part counted twice)."""
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
