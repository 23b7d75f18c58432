"""The adapter configs on their own: LoraConfig validation, scale and per-module rank / alpha patterns;
PrefixConfig validation."""
import pytest

import ptlm_engine as pe


@pytest.mark.parametrize("kw,match", [
    ({"r": 0}, "r must be a positive integer"),
    ({"r": 2.0}, "r must be a positive integer"),
    ({"dropout": 1.0}, "dropout must be a probability"),
    ({"dropout": -0.1}, "dropout must be a probability"),
    ({"bias": "some"}, "bias must be one of"),
    ({"target_modules": []}, "must not be an empty list"),
    ({"target_modules": "q_proj", "layers_to_transform": 0}, "cannot be combined with a regex"),
    ({"layers_to_transform": [-1]}, "layers_to_transform must be"),
    ({"modules_to_save": "classifier"}, "must be a list of module names"),
    ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\] must be a positive integer"),
    ({"rank_pattern": {"q_proj": True}}, "must be a positive integer"),
    ({"rank_pattern": ["q_proj"]}, "rank_pattern must be a dict"),
    ({"rank_pattern": {"": 2}}, "keys must be non-empty"),
    ({"alpha_pattern": {"(q": 2}}, "not a valid regular expression"),
    ({"alpha_pattern": {"q_proj": float("inf")}}, "must be a finite number"),
    ({"exclude_modules": []}, "exclude_modules must not be an empty list"),
])
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        pe.LoraConfig(**kw)


def test_scale():
    assert pe.LoraConfig(r=8, alpha=16).scale == 2.0
    assert pe.LoraConfig(r=16, alpha=16, use_rslora=True).scale == 4.0


def test_rank_and_alpha_patterns_pick_the_first_key_that_ends_the_name():
    config = pe.LoraConfig(r=8, alpha=16, rank_pattern={r"layers\.1\.self_attn\.q_proj": 2, "q_proj": 4},
                           alpha_pattern={"proj": 1})
    assert config.rank_for("model.layers.1.self_attn.q_proj") == 2
    assert config.rank_for("model.layers.0.self_attn.q_proj") == 4
    assert config.rank_for("model.layers.0.self_attn.k_proj") == 8      # "q_proj" ends no other name
    assert config.scale_for("model.layers.0.self_attn.q_proj") == 16 / 4
    assert config.scale_for("model.layers.0.proj") == 1 / 8             # "proj" selects a whole name part only
    rslora = pe.LoraConfig(r=16, alpha=16, use_rslora=True, rank_pattern={"v_proj": 4})
    assert rslora.scale_for("model.layers.0.self_attn.v_proj") == 8.0


@pytest.mark.parametrize("kw,match", [
    (dict(num_virtual_tokens=0), "num_virtual_tokens"),
    (dict(num_virtual_tokens=2.0), "num_virtual_tokens"),
    (dict(projection="yes"), "projection"),
    (dict(encoder_hidden_size=-1), "encoder_hidden_size"),
    (dict(modules_to_save="classifier"), "modules_to_save"),
    (dict(prefix_projection=True), "prefix_projection"),
])
def test_bad_configs(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        pe.PrefixConfig(**kw)
