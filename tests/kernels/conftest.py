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


@pytest.fixture
def unsplit_shrinks(monkeypatch):
    """Every shrink launcher offers only its unsplit configs (SPLIT_K = 1, no SPLIT_ROUNDS), with no choice made
    or loaded: split shrinks add their partials with fp32 atomics, in no fixed order, so two runs of the same
    launch may differ in their last bits; the tests that hold two launch modes to bit equality need each shrink's
    sum in one fixed order."""
    for launcher in tuned.LAUNCHERS:
        if "shrink" in launcher.name and "SPLIT_K" in launcher.autotuner.configs[0].kwargs:
            monkeypatch.setattr(launcher, "configs", {})
            monkeypatch.setattr(launcher.autotuner, "configs",
                                [c for c in launcher.autotuner.configs
                                 if all(v == 1 for k, v in c.kwargs.items() if k.startswith("SPLIT"))])
