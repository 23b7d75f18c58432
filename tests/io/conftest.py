"""Shared fixtures for the adapter-file tests."""
import pytest

import ptlm_engine as pe


@pytest.fixture
def saved(tiny, tmp_path, randomize_adapters):
    """saved(kind="gpt2", **config) -> (a tiny model with a random adapter 'a', the directory it is in)."""
    def save(kind="gpt2", **kw):
        model = tiny(kind)
        pe.add_adapter(model, "a", pe.LoraConfig(**{"r": 4, "alpha": 8, **kw}))
        randomize_adapters(model)
        pe.save_adapter(model, "a", tmp_path / "a")
        return model, tmp_path / "a"
    return save
