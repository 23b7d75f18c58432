"""The demo (`ptlm demo`): end to end on the reference backend for a few steps, its exit status when the reloaded
adapter differs, its argument checks, and the kernel timings table."""
from __future__ import annotations

import re

import pytest
import torch

from ptlm_engine import cli, demo


@pytest.fixture(autouse=True)
def reference_backend(monkeypatch):
    monkeypatch.setenv("PTLM_BACKEND", "reference")


def table_row(text: str, label: str) -> list[str]:
    """The three values (base, adapted, reloaded) of one row of the comparison table."""
    match = re.search(rf"^\s*{re.escape(label)}\s+(\S+)\s+(\S+)\s+(\S+)\s*$", text, re.MULTILINE)
    assert match, f"no {label!r} row in:\n{text}"
    return list(match.groups())


def test_demo_trains_saves_reloads_and_prints_the_table(capsys, tmp_path):
    out = tmp_path / "adapter"
    threads = torch.get_num_threads()
    assert cli.main(["demo", "--steps", "12", "--out", str(out), "--device", "cpu"]) == 0
    assert torch.get_num_threads() == threads   # the demo's single-thread setting does not leak
    text = capsys.readouterr().out
    assert "backend  reference (PyTorch)" in text
    assert re.search(r"params\s+16,384 trainable of 98,624", text)   # r=8 on 7 projections x 2 layers
    assert "adapted (12 steps)" in text
    base_loss, adapted_loss, reloaded_loss = map(float, table_row(text, "toy-task loss"))
    assert adapted_loss < base_loss / 2 and reloaded_loss == adapted_loss
    base_acc, adapted_acc, reloaded_acc = (float(v.rstrip("%")) for v in table_row(text, "next-token accuracy"))
    assert adapted_acc > base_acc + 20 and reloaded_acc == adapted_acc
    base_diff, adapted_diff, reloaded_diff = map(float, table_row(text, "max |logits - adapted|"))
    assert base_diff > 0 and adapted_diff == 0 and reloaded_diff <= demo.MATCH_TOL
    assert re.search(r"reloaded vs adapted: max abs diff \S+ <= \S+: OK", text)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_demo_exits_nonzero_when_the_reloaded_adapter_differs(monkeypatch, capsys):
    load_adapter = demo.pe.load_adapter

    def load_and_corrupt(model, path, name):
        load_adapter(model, path, name=name)
        with torch.no_grad():
            model.model.layers[0].self_attn.q_proj.lora_B[name].weight.add_(0.5)

    monkeypatch.setattr(demo.pe, "load_adapter", load_and_corrupt)
    assert cli.main(["demo", "--steps", "1"]) == 1
    assert "MISMATCH" in capsys.readouterr().out


@pytest.mark.parametrize("args,match", [
    (["--device", "bogus"], "argument --device: not a torch device"),
    (["--device", "cuda:7" if torch.cuda.is_available() else "cuda"], "argument --device: .* no such CUDA device"),
    (["--out", __file__], "argument --out: .* exists and is not a directory"),
])
def test_demo_arguments_are_checked_before_it_runs(monkeypatch, capsys, args, match):
    monkeypatch.setattr(demo, "run", lambda *a: pytest.fail("the demo ran"))
    with pytest.raises(SystemExit) as done:
        cli.main(["demo", *args])
    assert done.value.code == 2 and re.search(match, capsys.readouterr().err)


def test_kernel_timings_table(monkeypatch):
    """The CUDA-only timing table, with a stand-in for do_bench and tiny shapes on the CPU."""
    testing = pytest.importorskip("triton.testing")
    times = iter([1.0, 3.0, 2.0, 1.0, 3.0, 2.0])   # cuBLAS, eager, lora_linear for each T

    def fake_do_bench(fn, return_mode):
        fn()   # the timed call still runs: it must work on these tensors
        return next(times)

    monkeypatch.setattr(testing, "do_bench", fake_do_bench)
    lines = demo.kernel_timings(torch.device("cpu"), torch.float32, (64, 32), (1, 4), 4)
    assert "64x32, r=4" in lines[0] and "reference" in lines[0]
    assert len(lines) == 4
    for line, t in zip(lines[2:], (1, 4)):
        assert line.split() == [str(t), "1.0000", "3.0000", "2.0000", "2.00x", "0.67x"]
