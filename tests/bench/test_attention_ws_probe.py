"""bench/attention_ws_probe.py's kernel through the interpreter: causal grouped-query attention against float64
SDPA, with and without the warp-specialization flag (which only the sm_90 compile acts on), every row written."""
import pytest
import torch

from ptlm_engine.kernels.configs import INTERPRETED

pytestmark = pytest.mark.skipif(not INTERPRETED, reason="the probe's kernel runs on the CPU through TRITON_INTERPRET")


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("warp_spec", [False, True])
def test_probe_kernel_matches_float64(dtype, tol, warp_spec):
    from bench.attention_ws_probe import causal_attention, sdpa
    gen = torch.Generator().manual_seed(3)
    B, H, HKV, L, D = 2, 4, 2, 45, 16                        # L: two full 16-row blocks and a ragged one
    q, k, v = (torch.randn(B, h, L, D, generator=gen).to(dtype) for h in (H, HKV, HKV))
    out = torch.full_like(q, float("nan"))
    got = causal_attention(q, k, v, (16, 16, 4, 1), warp_spec, out=out)
    want = sdpa(q.double(), k.double(), v.double())
    assert got is out and not got.isnan().any()
    torch.testing.assert_close(got.double(), want, rtol=0, atol=tol)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("warp_spec", [False, True])
def test_probe_split_design_matches_float64(dtype, tol, warp_spec):
    """The sequence kernel, then the prefix pass merging by log-sum-exp: attention over [prefix ; sequence]."""
    from bench.attention_ws_probe import causal_attention, prefix_reference
    gen = torch.Generator().manual_seed(4)
    B, H, HKV, L, P, D = 2, 4, 2, 45, 21, 16                 # P: a full 16-key prefix block and a ragged one
    q, k, v = (torch.randn(B, h, L, D, generator=gen).to(dtype) for h in (H, HKV, HKV))
    pk, pv = (torch.randn(B, HKV, P, D, generator=gen).to(dtype) for _ in range(2))
    out = torch.full_like(q, float("nan"))
    got = causal_attention(q, k, v, (16, 16, 4, 1), warp_spec, out=out, prefix_k=pk, prefix_v=pv,
                           merge_block=(16, 16, 4))
    assert got is out and not got.isnan().any()
    torch.testing.assert_close(got.double(), prefix_reference(q, k, v, pk, pv), rtol=0, atol=tol)


def test_probe_smoke_writes_rows(tmp_path):
    from bench import attention_ws_probe
    rows = attention_ws_probe.main(["--smoke", "--out", str(tmp_path)])
    assert {(r["provider"], r["P"]) for r in rows} == {("sdpa", 0), ("ws", 0), ("ws", 5), ("plain", 0), ("plain", 5)}
    assert all(r["max_err"] < 1e-5 for r in rows), rows
    assert (tmp_path / "attention_ws_probe.json").exists()
