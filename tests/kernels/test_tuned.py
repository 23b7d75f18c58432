"""Autotuner choices saved by one process and loaded by another: the loaded key launches without tuning."""
import json

import pytest
import torch

from ptlm_engine.kernels import lora as K
from ptlm_engine.kernels import tuned

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or K.INTERPRETED),
                                reason="needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_saved_choices_load_and_launch_without_tuning(tmp_path, monkeypatch):
    monkeypatch.setattr(tuned, "PRESETS", {})
    launcher = K._lora_shrink
    monkeypatch.setattr(launcher, "configs", {})
    x = torch.randn(37, 40, device=DEVICE)
    a = torch.randn(5, 40, device=DEVICE)
    expected = K.lora_shrink(x, a, 0.5)                             # tunes this key (one candidate when interpreted)
    chosen = dict(launcher.configs)
    assert len(chosen) == 1
    path = tmp_path / "tuned.json"
    assert tuned.save_tuned(path, "card A") >= 1
    data = json.loads(path.read_text())
    assert data["card"] == "card A" and list(data["kernels"]["_lora_shrink_kernel"].values()) == \
        [meta for meta, _ in chosen.values()]

    launcher.configs.clear()
    with pytest.warns(UserWarning, match="tuned on 'card A', not on 'card B'"):
        assert tuned.load_tuned(path, card="card B") == 0
    assert tuned.load_tuned(path, card="card A") >= 1

    def no_tuning(*args, **kwargs):
        raise AssertionError("the loaded key tuned again")
    monkeypatch.setattr(launcher.autotuner, "run", no_tuning)
    torch.testing.assert_close(K.lora_shrink(x, a, 0.5), expected)
    assert launcher.configs == chosen


def test_a_choice_no_longer_offered_tunes_again(monkeypatch):
    launcher = K._lora_shrink
    key = (64, 40, 5, False, torch.float32, torch.float32)
    monkeypatch.setattr(tuned, "PRESETS", {launcher.name: {tuned.key_text(key): {"BLOCK_T": 3, "num_warps": 1}}})
    assert tuned.preset(launcher.name, key, launcher.autotuner.configs) is None
    offered = launcher.autotuner.configs[0]
    monkeypatch.setattr(tuned, "PRESETS", {launcher.name: {tuned.key_text(key): offered.all_kwargs()}})
    assert tuned.preset(launcher.name, key, launcher.autotuner.configs) == (offered.all_kwargs(), offered.pre_hook)
