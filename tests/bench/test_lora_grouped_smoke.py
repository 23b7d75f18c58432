"""CPU smoke test of bench/lora_grouped.py: tiny shapes, the PyTorch reference backend; the floor arithmetic, and
that every provider computes the same layers."""
import pytest
import torch

from bench import lora_grouped


@pytest.fixture(autouse=True)
def reference_backend(monkeypatch):
    monkeypatch.setenv("PTLM_BACKEND", "reference")


def test_smoke_writes_rows_for_every_provider(tmp_path):
    results = lora_grouped.main(["--smoke", "--out", str(tmp_path), "--groups", "qkv_gqa", "--tokens", "16",
                                 "--warmup-ms", "0", "--rep-ms", "1"])
    # multi_grouped_serial times anything only where the matmul would launch as the shrink's dependent (Hopper)
    assert [r["provider"] for r in results.rows] == [p for p in lora_grouped.PROVIDERS if p != "multi_grouped_serial"]
    assert all(r["ms"] > 0 and r["floor_ms"] > 0 for r in results.rows)
    assert "| qkv_gqa | 64 | 64+16+16 | 16 | fwd | plain |" in (tmp_path / "lora_grouped.md").read_text()


def test_floor_counts_x_once_and_every_member():
    shape = {"group": "qkv", "d_in": 4096, "d_outs": "4096+4096+4096", "T": 1}
    nbytes, flops = lora_grouped.cost(shape, "fwd")
    assert nbytes == 2 * (4096 * 12288 + 16 * 3 * 8192 + (4096 + 12288))
    assert flops == 2 * 4096 * 12288 + 2 * 16 * 3 * 8192
    assert abs(nbytes / 3.0e12 * 1e3 - 0.0338) < 5e-4                  # kernels/lora_grouped.py's floor, in ms


def test_providers_compute_the_same_layers():
    torch.manual_seed(0)
    shape = {"group": "qkv_gqa", "d_in": 64, "d_outs": "64+16+16", "T": 16}
    (s,) = lora_grouped.make_sets(shape, 1, torch.device("cpu"), torch.float32, lora_grouped.PROVIDERS)
    with torch.no_grad():
        ys = {p: lora_grouped._forward(p, s)[0]() for p in lora_grouped.PROVIDERS if p != "floor"}
    for grouped, separate in (("grouped", "separate"), ("multi_grouped", "multi_separate")):
        for y, y_sep in zip(ys[grouped], ys[separate]):
            torch.testing.assert_close(y, y_sep)
    assert not torch.allclose(ys["grouped"][0], ys["cublas"][0])


def test_the_one_launch_provider_turns_the_shrink_programs_on_for_its_calls_only(monkeypatch):
    from types import SimpleNamespace

    from ptlm_engine.kernels import lora_multi as multi_kernels
    seen = []
    monkeypatch.setattr(lora_grouped, "_forward", lambda provider, s: (
        lambda: seen.append((provider, multi_kernels.SHRINK_PROGRAMS, multi_kernels.EXPAND_IN_LOOP)), []))
    (call,) = lora_grouped.make_calls({}, "multi_grouped_one_launch", "fwd", [SimpleNamespace(dys=None)])
    call()
    assert seen == [("multi_grouped_one_launch", True, True)]
    assert (multi_kernels.SHRINK_PROGRAMS, multi_kernels.EXPAND_IN_LOOP) == (False, False)
