"""Shared test pieces: the device and dtypes the kernel tests run on, seeded inputs, errors measured against a
float64 reference and held to PyTorch's own low-precision error, mixed-batch rows run alone."""
from __future__ import annotations

import copy
import math
import warnings
import zlib
from collections.abc import Callable

import pytest
import torch

import ptlm_engine as pe
from ptlm_engine.kernels.configs import INTERPRETED, TunedLauncher

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(not (CUDA or INTERPRETED), reason="needs CUDA or TRITON_INTERPRET=1")
# bf16 only on a GPU: the interpreter computes bf16 dots wrongly.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])


def rand(*shape, dtype, scale=1.0):
    """Normal values drawn in float64 (the same draw for every dtype), scaled, then cast onto DEVICE."""
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(DEVICE, dtype)


def far_apart_rows(t: torch.Tensor) -> torch.Tensor:
    """t (T, d), T >= 2, copied into a view whose last row starts 2^31 elements or more after its first, the rows
    spread over a buffer that is otherwise never touched (virtual memory only, on the CPU): a kernel that
    multiplies row indices by strides in 32 bits addresses memory before the tensor there, as it would on an
    input of T · d >= 2^31 elements. Requires grad as t does."""
    T, d = t.shape
    gap = math.ceil(2**31 / (T - 1) / 64) * 64             # a row stride aligned as TMA needs it
    rows = torch.empty((T - 1) * gap + d, dtype=t.dtype, device=t.device).as_strided((T, d), (gap, 1))
    with torch.no_grad():
        rows.copy_(t)
    return rows.requires_grad_(t.requires_grad)


def bottleneck_slots64(d, sizes, acts):
    """Stacked bottleneck slots in the pool's layout (zeros beyond each width): float64 CPU tensors
    (down_weight, down_bias, up_weight, up_bias), and the flat metadata on DEVICE (widths, scales, act codes)."""
    S, m_max = len(sizes), max(sizes)
    wd = torch.randn(S, m_max, d, dtype=torch.float64) * d ** -0.5
    bd = torch.randn(S, m_max, dtype=torch.float64)
    wu = torch.randn(S, d, m_max, dtype=torch.float64) * m_max ** -0.5
    bu = torch.randn(S, d, dtype=torch.float64)
    for s, m in enumerate(sizes):
        wd[s, m:], bd[s, m:], wu[s, :, m:] = 0, 0, 0
    meta = (torch.tensor(sizes, dtype=torch.int32, device=DEVICE), torch.rand(S, device=DEVICE) + 0.5,
            torch.tensor(acts, dtype=torch.int32, device=DEVICE))
    return (wd, bd, wu, bu), meta


def lora_slots64(S, d_in, d_out, ranks):
    """Stacked LoRA slots in the pool's layout (zeros beyond each rank; rank 0: no adapter in that slot): float64
    CPU tensors lora_A (S, r_max, d_in) and lora_B (S, d_out, r_max), and on DEVICE the ranks and scales."""
    r_max = max(ranks)
    a = torch.randn(S, r_max, d_in, dtype=torch.float64) * d_in ** -0.5
    b = torch.randn(S, d_out, r_max, dtype=torch.float64) * r_max ** -0.5
    for s, r in enumerate(ranks):
        a[s, r:] = 0
        b[s, :, r:] = 0
    return a, b, torch.tensor(ranks, dtype=torch.int32, device=DEVICE), torch.rand(S, device=DEVICE) + 0.5


def record_launches(monkeypatch) -> list[TunedLauncher]:
    """The launchers of every Triton kernel launched from now on, in order (TunedLauncher.launch patched on the
    class: an instance attribute would outlive the test)."""
    launched = []
    launch = TunedLauncher.launch
    monkeypatch.setattr(TunedLauncher, "launch", lambda self, *a, **kw: launched.append(self) or launch(self, *a, **kw))
    return launched


def leaves(tensors, dtype=torch.float64) -> list:
    """Fresh leaves of the same values in `dtype` (float64 for the reference, the layer's dtype for PyTorch's own
    error), requiring grad where the originals do; None stays None."""
    return [None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad) for t in tensors]


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


def assert_grads_match(names, grads, grads64, grads_lp, dtype) -> None:
    """Each gradient present exactly where the float64 one is, of its shape and dtype, and within
    assert_matches of it."""
    for name, g, g64, g_lp in zip(names, grads, grads64, grads_lp):
        assert (g is None) == (g64 is None), name
        if g is not None:
            assert g.shape == g64.shape and g.dtype == dtype, name
            assert_matches(g, g64, g_lp, dtype, name)


def run_alone(model, name, run):
    """run() with only adapter `name` active (None: the base model), the previous active adapter restored."""
    before = pe.active_adapter(model)
    pe.set_active_adapter(model, name)
    try:
        return run()
    finally:
        pe.set_active_adapter(model, before)


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


# ------------------------------------------------------------------------------ bottleneck tests (two files)
def seeded_ids(rows: int, length: int = 6) -> torch.Tensor:
    return torch.randint(0, 128, (rows, length), generator=torch.Generator().manual_seed(3))


def randomize_bottleneck_and_lora(model) -> None:
    """Seeded random values in every bottleneck and LoRA parameter (up and lora_B start at zero)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ptlm_bottleneck." in name or ".lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(zlib.crc32(name.encode()))))


def state_copy(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def assert_base_restored(model, state: dict, hooks: int) -> None:
    """The model's state dict (keys and values) and hook count are those recorded before adapters were added."""
    assert sorted(model.state_dict()) == sorted(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert hook_count(model) == hooks


# ------------------------------------------------------------------------------ files written by HF PEFT
def peft_file(model, config, path, seed=0):
    """PEFT's model over `model` with `config`, random values in every trainable tensor, saved to `path`."""
    import peft
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    theirs.eval()
    theirs.save_pretrained(path)
    return theirs


def assert_loads_like_peft(tiny, kind, theirs, path, ids, output, check_peft=True):
    """PEFT's model `theirs`, saved to `path`: PeftModel.from_pretrained over a fresh tiny(kind) reads the file back
    to its outputs on `ids` (unless check_peft is False), and so does load_adapter (as adapter 'a')."""
    expected = output(theirs, ids)
    if check_peft:
        import peft
        torch.testing.assert_close(output(peft.PeftModel.from_pretrained(tiny(kind), path), ids), expected)
    ours = tiny(kind)
    pe.load_adapter(ours, path, name="a")
    torch.testing.assert_close(output(ours, ids), expected)


# ------------------------------------------------------------------------------------------ ptlm's own files
def assert_reloads_same(tiny, kind, model, name, path, ids, output):
    """Adapter `name` of `model` saved to `path` and loaded under the same name into a fresh tiny(kind) gives the
    model's outputs on `ids`; returns the fresh model."""
    expected = output(model, ids)
    pe.save_adapter(model, name, path)
    fresh = tiny(kind)
    pe.load_adapter(fresh, path, name=name)
    torch.testing.assert_close(output(fresh, ids), expected)
    return fresh


# ------------------------------------------------------------------------------------------ float64 models
def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def pristine_builder(builders: dict[str, Callable[[], torch.nn.Module]]) -> Callable[[str], torch.nn.Module]:
    """build(kind): a fresh copy of the tiny random model `kind` of `builders` (the same weights every call, seeded
    by its name), in eval mode."""
    pristine: dict = {}

    def build(kind: str) -> torch.nn.Module:
        if kind not in pristine:
            torch.manual_seed(zlib.crc32(kind.encode()))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pristine[kind] = builders[kind]().eval()
        return copy.deepcopy(pristine[kind])
    return build


def randomize_trainable(model, seed: int = 0, scale: float = 0.1) -> None:
    """Random values, in each tensor's dtype, in every trainable tensor (LoRA B starts at zero, so a fresh adapter
    changes nothing)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def randomize_trainable64(model, seed: int = 0, scale: float = 0.1) -> None:
    """Random values, drawn in float64, in every trainable tensor (LoRA B starts at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=torch.float64))


class LogitsOf(torch.nn.Module):
    """model(input_ids=x, use_cache=False).logits as a module of one tensor input (what torch.export traces)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(input_ids=x, use_cache=False).logits
