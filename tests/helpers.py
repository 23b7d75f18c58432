"""Shared checks: errors measured against a float64 reference and held to PyTorch's own low-precision error."""
from __future__ import annotations

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, computed in float64; NaN/inf anywhere in out fails the check by returning inf."""
    out = out.detach().double()
    if not torch.isfinite(out).all():
        return float("inf")
    ref = ref.detach().double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


# The least error bound granted per dtype even when PyTorch's own error happens to be tiny.
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2, torch.float64: 1e-12}


def assert_matches(out: torch.Tensor, ref64: torch.Tensor, torch_lowp: torch.Tensor | None, dtype, what: str,
                   factor: float = 2.0) -> None:
    """The kernel's error against float64 is at most `factor` x PyTorch's own error in `dtype` (or the floor)."""
    err = rel_err(out, ref64)
    bound = FLOOR[dtype]
    if torch_lowp is not None:
        bound = max(bound, factor * rel_err(torch_lowp, ref64))
    assert err <= bound, f"{what}: relative error {err:.3e} > bound {bound:.3e} ({dtype})"


def assert_no_host_sync(step) -> None:
    """step() once to autotune (tuning synchronizes), then again with every device-to-host synchronization an
    error: what a serving loop or a CUDA graph needs of the op."""
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def captured(run):
    """run() once eagerly, then captured in a CUDA graph: (graph, run's outputs), which each replay rewrites for
    whatever the graph's input buffers then hold."""
    run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    return graph, out
