"""Multi-adapter bottleneck kernels against float64 references: random mappings with -1 rows, one slot owning
every row, every row a different slot, slots with no tokens, an empty slot (width 0), mixed widths and
activations, both row orders, poisoned outputs, the saved z, per-slot weight gradients zero beyond each width.
A failing check names the slots whose rows (or weight gradients) are off: on a GPU run, which width tile,
activation or the rows with no adapter went wrong."""
import pytest
import torch

from ptlm_engine import reference
from ptlm_engine.kernels import bottleneck as B
from ptlm_engine.kernels import bottleneck_multi as M
from tests.helpers import CUDA, DEVICE, DTYPES, assert_matches, bottleneck_slots64, needs_triton, rel_err

pytestmark = needs_triton


def _mapping(kind, T, S):
    if kind == "random":
        return torch.randint(-1, S, (T,), device=DEVICE, dtype=torch.int32)
    if kind == "one":
        return torch.full((T,), 1, device=DEVICE, dtype=torch.int32)
    if kind == "none":
        return torch.full((T,), -1, device=DEVICE, dtype=torch.int32)
    return (torch.arange(T, device=DEVICE, dtype=torch.int32) % (S + 1)) - 1   # "each": rows cycle through slots


def _slot_errors(out, ref, idx, sizes, acts, per_row) -> str:
    """Relative error of `out` on each slot's rows (per_row) or slice out[s], worst first, with the slot's
    width and activation; slot -1: the rows with no adapter."""
    errs = []
    for s in idx.unique().tolist():
        if s < 0 and not per_row:
            continue
        part = idx == s if per_row else s
        errs.append((rel_err(out[part], ref[part]), s, sizes[s] if s >= 0 else 0, acts[s] if s >= 0 else None,
                     int((idx == s).sum())))
    worst = sorted(errs, reverse=True)[:6]
    return "; ".join(f"slot {s} (m={m}, act={a}, {n} rows) {e:.1e}" for e, s, m, a, n in worst)


def _assert_slots_match(out, ref, idx, sizes, acts, per_row, dtype, what):
    try:
        assert_matches(out, ref, None, dtype, what)
    except AssertionError as e:
        raise AssertionError(f"{e}; worst slots: {_slot_errors(out, ref, idx, sizes, acts, per_row)}") from None


def _z64(h, wd, bd, idx, sizes):
    """z = h Wd_a^T + bd_a on each row's own width, zero elsewhere (float64)."""
    z = torch.zeros(h.shape[0], wd.shape[1], device=h.device, dtype=torch.float64)
    for s in idx.unique().tolist():
        if s >= 0:
            rows, m = idx == s, sizes[s]
            z[rows, :m] = h[rows].double() @ wd[s, :m].double().t() + bd[s, :m].double()
    return z


def _check(T, d, sizes, acts, dtype, kind, residual, sorted_rows, rows_per_chunk=None):
    S = len(sizes)
    weights64, (sizes_t, scales, acts_t) = bottleneck_slots64(d, sizes, acts)
    wd, bd, wu, bu = (t.to(DEVICE, dtype) for t in weights64)
    idx = _mapping(kind, T, S)
    h = torch.randn(T, d, device=DEVICE, dtype=dtype)
    res = torch.randn(T, d, device=DEVICE, dtype=dtype) if residual else None
    dy = torch.randn(T, d, device=DEVICE, dtype=dtype)
    leaves = [t.detach().double().requires_grad_() for t in (h, wd, bd, wu, bu)]
    y64 = reference.bottleneck_adapter_multi(*leaves, sizes_t, scales.double(), acts_t, idx,
                                             None if res is None else res.double())
    if y64.requires_grad:  # else no row reaches an adapter and base is the residual: every gradient is zero
        y64.backward(dy.double())

    order, bounds = M.token_segments(idx, S)
    y = torch.full((T, d), float("nan"), device=DEVICE, dtype=dtype)     # poisoned: every element must be written
    _, z = M.bottleneck_multi_forward(h, wd, bd, wu, bu, sizes_t, scales, acts_t, idx,
                                      (order, bounds) if sorted_rows else None, res, out=y)
    _assert_slots_match(y, y64, idx, sizes, acts, True, dtype, f"y ({kind})")
    plain = (idx < 0) | (sizes_t[idx.clamp_min(0).long()] == 0)
    assert torch.equal(y[plain], (h if res is None else res)[plain]), "rows with no adapter must pass exactly"
    width = sizes_t[idx.clamp_min(0).long()] * (idx >= 0)                    # each row's own width (0: none)
    defined = torch.arange(z.shape[1], device=DEVICE)[None, :] < width[:, None]
    _assert_slots_match(torch.where(defined, z, 0), _z64(h, wd, bd, idx, sizes), idx, sizes, acts, True, dtype,
                        f"z ({kind})")

    dh = torch.full((T, d), float("nan"), device=DEVICE, dtype=dtype)
    out = M.bottleneck_multi_backward(dy, h, z, wd, wu, sizes_t, scales, acts_t, idx, order, bounds, not residual,
                                      True, sorted_rows, rows_per_chunk, out=dh)
    names = ["dh", "d_down_weight", "d_down_bias", "d_up_weight", "d_up_bias"]
    for name, g, leaf in zip(names, out, leaves):
        assert g.shape == leaf.shape, name
        if leaf.grad is not None and leaf.grad.norm() > 0:
            _assert_slots_match(g, leaf.grad, idx, sizes, acts, name == "dh", dtype,
                                f"{name} ({kind}, residual={residual})")
        else:  # no adapter reached (mapping "none", or dh of a parallel adapter with no rows)
            assert not g.any(), name
    assert torch.equal(dh[plain], dy[plain] if res is None else torch.zeros_like(dy[plain])), \
        "dh of rows with no adapter: dy exactly (base h) or 0 (base the residual)"
    d_wd, d_bd, d_wu = out[1:4]
    for s, m in enumerate(sizes):  # nothing beyond each slot's width
        assert not d_wd[s, m:].any() and not d_bd[s, m:].any() and not d_wu[s, :, m:].any()


SIZES, ACTS = [24, 5, 40, 0, 16], [1, 0, 2, 0, 2]  # mixed widths (tiles 16, 32, 64), one empty slot, every act


@pytest.mark.parametrize("kind,residual,sorted_rows", [("random", False, True), ("random", True, False),
                                                        ("one", True, True), ("each", False, False),
                                                        ("none", False, True), ("none", True, False)])
def test_multi_kernels_mappings(kind, residual, sorted_rows):
    """T=41 in chunks of 16 rows: a slot's gradient can sum several chunks (atomics); d=72: two column shares
    where the row blocks alone leave programs idle."""
    torch.manual_seed(7)
    _check(41, 72, SIZES, ACTS, torch.float32, kind, residual, sorted_rows, rows_per_chunk=16)


@pytest.mark.parametrize("sorted_rows", [True, False], ids=["slot blocks", "as they come"])
def test_multi_forward_column_shares(sorted_rows, monkeypatch):
    """Where the row blocks leave SMs idle, pass 2's columns split over programs (d=72: two shares of 64 and 8
    columns); the CPU's 4 target programs never split at these T, so the target is raised here."""
    monkeypatch.setattr(B, "target_programs", lambda device, per_sm=2: 64)
    torch.manual_seed(10)
    _check(41, 72, SIZES, ACTS, torch.float32, "random", True, sorted_rows)


@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
def test_multi_kernels_half_precision(dtype):
    torch.manual_seed(8)
    _check(29, 40, SIZES, ACTS, dtype, "random", False, True)


def test_multi_kernels_realistic_widths_half_precision():
    """The realistic gpu test's widths and activations (tile 16 for widths 8 and 16, 32, 64, 128, 256, an empty
    slot) and its mapping "each" at T=64 as rows come, in fp16 at a small d."""
    torch.manual_seed(64)
    sizes = [16, 64, 48, 256, 0, 32, 128, 8]
    _check(64, 40, sizes, [i % 3 for i in range(len(sizes))], torch.float16, "each", False, False)


def test_multi_kernels_wide_slot_and_decode_lanes():
    """A width-256 tile beside a width-3 one; 6 tokens of 6 distinct slots spread over slot lanes."""
    torch.manual_seed(9)
    _check(6, 24, [3, 256, 7, 16, 9, 1], [0, 1, 2, 1, 0, 2], torch.float32, "each", True, False)


@pytest.mark.parametrize("kind,residual,sorted_rows", [("random", False, True), ("one", True, False),
                                                        ("each", True, True), ("none", False, False)])
def test_multi_kernels_wide_backward(kind, residual, sorted_rows):
    """A widest tile from WIDE_M_PAD on: the weight gradients in (d, m) tiles of each chunk's slot (tiles past a
    narrow slot's width skip), dh its own kernel over blocks of one slot's rows. Widths 150 (3 tiles of 64 under
    the interpreter, the last ragged), 64, 5 and an empty slot; T = 41 in chunks of 16 rows."""
    torch.manual_seed(11)
    _check(41, 40, [150, 64, 0, 5], [1, 2, 0, 0], torch.float32, kind, residual, sorted_rows, rows_per_chunk=16)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("T,sorted_rows", [(1, False), (64, False), (4096, True)])
@pytest.mark.parametrize("kind", ["random", "each", "one"])
def test_multi_kernels_realistic_shapes(T, kind, sorted_rows):
    torch.manual_seed(T)
    sizes = [16, 64, 48, 256, 0, 32, 128, 8] * 4
    _check(T, 4096, sizes, [i % 3 for i in range(len(sizes))], torch.bfloat16, kind, T % 2 == 1, sorted_rows)
