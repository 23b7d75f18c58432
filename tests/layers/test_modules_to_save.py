"""ModulesToSave on its own: the wrapped module's keys, per-adapter copies and switching between them, and the
original module following dtype changes."""
import pytest
import torch
from torch import nn

from ptlm_engine.layers import ModulesToSave

pytestmark = pytest.mark.usefixtures("reference_backend")


def test_modules_to_save_keeps_keys_and_switches_copies():
    torch.manual_seed(0)
    original = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
    wrapper = ModulesToSave(original)
    assert wrapper.state_dict().keys() == original.state_dict().keys()
    wrapper.add_adapter("a")
    assert "modules_to_save.a.0.weight" in wrapper.state_dict()
    with torch.no_grad():
        wrapper.modules_to_save["a"][0].weight.add_(1.0)
    wrapper.eval()
    assert not original.training and not original[1].training
    x = torch.randn(4, 8)
    torch.testing.assert_close(wrapper(x), original(x))                              # none active
    wrapper.active_adapter = "a"
    torch.testing.assert_close(wrapper(x), wrapper.modules_to_save["a"](x))
    assert not torch.allclose(wrapper(x), original(x))


def test_modules_to_save_original_follows_dtype_changes():
    """model.to() replaces buffers; the original module (run when no adapter is active) must see them."""
    original = nn.BatchNorm1d(8).eval()
    wrapper = ModulesToSave(original)
    wrapper.add_adapter("a")
    wrapper.to(torch.float64)
    assert original.running_mean.dtype == original.weight.dtype == torch.float64
    wrapper(torch.randn(4, 8, dtype=torch.float64))
    assert wrapper.num_features == 8                                                 # attributes of the original
