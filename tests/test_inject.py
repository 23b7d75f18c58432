"""Target matching (names, regex, all-linear, layer indices, per-architecture defaults) and in-place
replacement / restoration of modules."""
import pytest
from torch import nn
from transformers.pytorch_utils import Conv1D

import ptlm_engine as pe
from ptlm_engine import inject
from ptlm_engine.config import LoraConfig
from ptlm_engine.layers import LoraLinear

LLAMA_ATTN = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"]
LLAMA_MLP = [f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up", "down")]


def _targets(model, **kw):
    return sorted(inject.find_lora_targets(model, LoraConfig(**kw)))


def test_names_match_the_module_name_suffix(tiny):
    llama = tiny("llama")
    assert _targets(llama, target_modules=["q_proj", "self_attn.v_proj"]) == \
        [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv"]


def test_suffix_must_be_a_whole_name_part(tiny):
    with pytest.raises(ValueError, match="matched no module"):
        _targets(tiny("llama"), target_modules=["proj"])


def test_regex_matches_the_full_name(tiny):
    llama = tiny("llama")
    assert _targets(llama, target_modules=r".*\.1\.self_attn\.(q|k)_proj") == \
        ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.q_proj"]
    with pytest.raises(ValueError, match="matched no module"):
        _targets(llama, target_modules=r"q_proj")                                  # fullmatch, not search


def test_all_linear_skips_the_output_head(tiny):
    assert _targets(tiny("llama"), target_modules="all-linear") == sorted(LLAMA_ATTN + LLAMA_MLP)
    gpt2 = _targets(tiny("gpt2"), target_modules="all-linear")                       # Conv1D everywhere, tied lm_head
    assert gpt2 == sorted(f"transformer.h.{i}.{m}" for i in range(2)
                          for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    bert = _targets(tiny("bert_cls"), target_modules="all-linear", modules_to_save=["classifier"])
    assert "bert.pooler.dense" in bert and "classifier" not in bert                 # modules_to_save win


def test_layers_to_transform(tiny):
    llama = tiny("llama")
    assert _targets(llama, target_modules=["q_proj"], layers_to_transform=1) == ["model.layers.1.self_attn.q_proj"]
    assert _targets(tiny("gpt2"), target_modules=["c_attn"], layers_to_transform=[0]) == \
        ["transformer.h.0.attn.c_attn"]
    assert _targets(tiny("bert"), target_modules=["query"], layers_to_transform=[1]) == \
        ["encoder.layer.1.attention.self.query"]
    with pytest.raises(ValueError, match=r"in layers \[5\]"):
        _targets(llama, target_modules=["q_proj"], layers_to_transform=[5])


def test_layer_index_as_peft_finds_it():
    assert inject.layer_index("model.layers.3.self_attn.q_proj") == 3
    assert inject.layer_index("stages.0.blocks.2.proj") == 2                     # PEFT: a part after the first
    assert inject.layer_index("stages.0.blocks.2.proj", "stages") == 0
    assert inject.layer_index("stages.0.blocks.2.proj", ["h", "blocks"]) == 2
    assert inject.layer_index("model.experts.3.layers.1.w") == 3                 # the first numbered part
    assert inject.layer_index("layers.4.proj") == 4                              # where PEFT finds none
    assert inject.layer_index("lm_head") is None and inject.layer_index("a.b", "layers") is None


def test_plain_model_block_list_at_the_top():
    model = nn.ModuleDict({"layers": nn.ModuleList([nn.ModuleDict({"proj": nn.Linear(4, 4)}) for _ in range(3)])})
    assert _targets(model, target_modules=["proj"], layers_to_transform=[0, 2]) == ["layers.0.proj", "layers.2.proj"]
    with pytest.raises(ValueError, match="layers_pattern needs layers_to_transform"):
        LoraConfig(target_modules=["proj"], layers_pattern="layers")


@pytest.mark.parametrize("kind,expected", [
    ("llama", ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]),
    ("gpt2", ["transformer.h.0.attn.c_attn"]),
    ("bert", ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value"]),
])
def test_per_architecture_defaults(tiny, kind, expected):
    assert _targets(tiny(kind), layers_to_transform=0) == expected


def test_unknown_architecture_needs_targets():
    with pytest.raises(ValueError, match="no default for model_type None"):
        _targets(nn.Sequential(nn.Linear(2, 2)))


def test_unsupported_module_type_is_named(tiny):
    with pytest.raises(ValueError, match=r"'model.norm' is a transformers.models.llama.modeling_llama.LlamaRMSNorm; "
                                         r"LoRA supports torch.nn.modules.linear.Linear"):
        _targets(tiny("llama"), target_modules=["norm"])


def test_wrap_and_restore_in_place(tiny):
    gpt2 = tiny("gpt2")
    original = gpt2.transformer.h[0].attn.c_attn
    keys = list(gpt2.state_dict())
    layer = inject.wrap_for_lora(gpt2, "transformer.h.0.attn.c_attn")
    assert gpt2.transformer.h[0].attn.c_attn is layer and layer.fan_in_fan_out
    assert inject.wrap_for_lora(gpt2, "transformer.h.0.attn.c_attn") is layer       # idempotent
    assert list(gpt2.state_dict()) == keys
    inject.restore(gpt2, "transformer.h.0.attn.c_attn")
    assert gpt2.transformer.h[0].attn.c_attn is original and isinstance(original, Conv1D)


def test_existing_lora_layers_are_targets_but_their_insides_are_not(tiny):
    llama = tiny("llama")
    layer = inject.wrap_for_lora(llama, "model.layers.0.self_attn.q_proj")
    layer.add_adapter("a", r=2, scale=1.0, dropout=0.0)
    assert _targets(llama, target_modules="all-linear") == sorted(LLAMA_ATTN + LLAMA_MLP)   # no lora_A.a
    assert isinstance(llama.get_submodule(LLAMA_ATTN[0]), LoraLinear)


def test_named_targets_inside_another_adapters_modules_to_save_are_an_error(tiny):
    """A LoRA layer there would reach only the original module, not the other adapter's copy; "all-linear"
    leaves such modules out (its file records the names it resolved to)."""
    bert = tiny("bert")
    pe.add_adapter(bert, "s", pe.LoraConfig(r=4, target_modules=["query"], modules_to_save=["pooler"]))
    with pytest.raises(ValueError, match="target module 'pooler.dense' is or lies inside 'pooler', of which "
                                         r"adapters \['s'\] keep their own copies"):
        pe.add_adapter(bert, "a", pe.LoraConfig(r=4, target_modules=["dense"]))
    assert list(pe.adapter_configs(bert)) == ["s"]
    pe.add_adapter(bert, "a", pe.LoraConfig(r=4, target_modules=["dense"], exclude_modules=["pooler.dense"]))
    pe.add_adapter(bert, "b", pe.LoraConfig(r=4, target_modules="all-linear"))
    assert not any(path.startswith("pooler.") for path in bert.ptlm_adapters.targets["b"])


@pytest.mark.parametrize("hook", ["forward", "pre", "instance"])
def test_targets_with_forward_hooks_are_refused(tiny, hook):
    """A LoRA layer computes the base projection itself, so a hook on the module it wraps (a user's, or one
    accelerate's add_hook_to_module installs as an instance forward) would stop running: refused, not bypassed."""
    llama = tiny("llama")
    v_proj = llama.model.layers[0].self_attn.v_proj
    if hook == "forward":
        v_proj.register_forward_hook(lambda module, args, out: 2 * out)
    elif hook == "pre":
        v_proj.register_forward_pre_hook(lambda module, args: None)
    else:
        v_proj.forward = v_proj.forward
    with pytest.raises(ValueError, match="target module 'model.layers.0.self_attn.v_proj' has forward hooks"):
        pe.add_adapter(llama, "a", pe.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert not hasattr(llama, "ptlm_adapters")
    pe.add_adapter(llama, "a", pe.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                             exclude_modules=["model.layers.0.self_attn.v_proj"]))


def test_modules_to_save_matching(tiny):
    bert = tiny("bert_cls")
    assert inject.find_modules_to_save(bert, ["classifier", "score"]) == ["classifier"]
    with pytest.raises(ValueError, match="matched no module"):
        inject.find_modules_to_save(bert, ["score"])
    inject.wrap_for_lora(bert, "bert.pooler.dense")
    with pytest.raises(ValueError, match="already carries LoRA"):
        inject.find_modules_to_save(bert, ["pooler.dense"])
