"""CPU smoke test of bench/base_ops.py: tiny shapes, the PyTorch reference backend; the floor arithmetic, and that
the providers compute the same ops."""
import pytest
import torch

from bench import base_ops


@pytest.fixture(autouse=True)
def reference_backend(monkeypatch):
    monkeypatch.setenv("PTLM_BACKEND", "reference")


def test_smoke_writes_rows_for_every_kernel(tmp_path):
    results = base_ops.main(["--smoke", "--out", str(tmp_path), "--warmup-ms", "0", "--rep-ms", "1"])
    timed = [r for r in results.rows if r["provider"] != "floor"]
    # 3 kernels x 2 modes x (hf, ptlm): the compiled provider is CUDA only
    assert sorted({(r["kernel"], r["mode"], r["provider"]) for r in timed}) == sorted(
        (k, m, p) for k in base_ops.SHAPES for m in base_ops.MODES for p in ("hf", "ptlm"))
    assert all(r["ms"] > 0 and r["floor_ms"] > 0 and r["gbps"] > 0 for r in timed)
    assert "| rms_norm | 64x96 | fwd | plain |" in (tmp_path / "base_ops.md").read_text()


def test_floors_at_the_training_shapes():
    costs = {(kernel, mode): base_ops.cost({"kernel": kernel, "dims": "x".join(map(str, dims))}, mode)
             for kernel, dims in base_ops.SHAPES.items() for mode in base_ops.MODES}
    floors_us = {key: nbytes / 3.0e6 for key, (nbytes, _) in costs.items() if key[0] != "cross_entropy"}
    expected = {("rms_norm", "fwd"): 22.4, ("rms_norm", "fwd+bwd"): 56.0, ("silu_mul", "fwd"): 92.3,
                ("silu_mul", "fwd+bwd"): 246.1, ("rotary", "fwd"): 28.0, ("rotary", "fwd+bwd"): 56.1}
    assert floors_us == pytest.approx(expected, abs=0.06)                  # the module docstring's numbers
    loss_ms = {mode: costs["cross_entropy", mode][1] / 790e9 for mode in base_ops.MODES}   # compute-bound
    assert loss_ms == pytest.approx({"fwd": 1.36, "fwd+bwd": 2.72}, abs=0.005)


@pytest.mark.parametrize("kernel", list(base_ops.SMOKE_SHAPES))
def test_providers_compute_the_same_op(kernel):
    torch.manual_seed(0)
    shape = {"kernel": kernel, "dims": "x".join(map(str, base_ops.SMOKE_SHAPES[kernel]))}
    (s,) = base_ops.make_sets(shape, 1, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        hf, ptlm = base_ops._hf(kernel, s)(), base_ops._ptlm(kernel, s)()
    for a, b in zip(*((out,) if torch.is_tensor(out) else out for out in (hf, ptlm))):
        torch.testing.assert_close(a, b)
