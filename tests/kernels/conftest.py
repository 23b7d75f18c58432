"""Fixtures shared by the kernel tests."""
import pytest

from ptlm_engine.kernels import lora as K
from ptlm_engine.kernels import tuned
from tests.kernels.tuning_helpers import config_like, refusing


@pytest.fixture
def shrink(monkeypatch):
    """K._lora_shrink with no choices made or loaded, offering (too_big, fits), the first refused by the GPU."""
    launcher = K._lora_shrink
    fits = launcher.autotuner.configs[0]
    too_big = config_like(fits, BLOCK_T=2 * fits.kwargs["BLOCK_T"])
    tried = []
    monkeypatch.setattr(tuned, "PRESETS", {})
    monkeypatch.setattr(launcher, "configs", {})
    monkeypatch.setattr(launcher.autotuner, "configs", [too_big, fits])
    monkeypatch.setattr(launcher.autotuner, "fn", refusing(launcher, too_big.kwargs["BLOCK_T"], tried))
    return launcher, too_big, fits, tried
