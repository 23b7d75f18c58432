"""Grouped LoRA kernels against float64 references: members with different d_out, a member without an adapter,
mixed and large ranks, fused and separate shrink, poisoned outputs; dropout masks equal to the per-member
kernels' with the same seeds; the multi-adapter pair with random mappings (-1 rows), mixed ranks, slots a
member lacks (rank 0) and a member without slots, rows as they come and slot-sorted.

On the CPU these run under TRITON_INTERPRET=1 on small shapes (fp32 and fp16); the `gpu` tests repeat them at
Llama shapes in bf16.
"""
import pytest
import torch
import triton.language as tl

from ptlm_engine.kernels import lora as K
from ptlm_engine.kernels import lora_grouped as G
from ptlm_engine.kernels import lora_multi as M
from tests.helpers import CUDA, DEVICE, DTYPES, assert_matches, lora_slots64, needs_triton, rand, record_launches

pytestmark = needs_triton


def _members(d_in, d_outs, ranks, dtype, biased):
    """Per member: W (d_out, d_in), A (r, d_in) / B (d_out, r) or None (no adapter), bias or None, scale."""
    ws = [rand(n, d_in, dtype=dtype, scale=d_in ** -0.5) for n in d_outs]
    As = [None if r is None else rand(r, d_in, dtype=dtype, scale=d_in ** -0.5) for r in ranks]
    Bs = [None if r is None else rand(n, r, dtype=dtype, scale=r ** -0.5) for n, r in zip(d_outs, ranks)]
    biases = [rand(n, dtype=dtype) if b else None for n, b in zip(d_outs, biased)]
    scales = [1.7, 0.6, 2.5][:len(d_outs)]
    return ws, As, Bs, biases, scales


def _check_grouped(T, d_in, d_outs, ranks, dtype, fuse_shrink, biased=(True, False, True)):
    ws, As, Bs, biases, scales = _members(d_in, d_outs, ranks, dtype, biased)
    x = rand(T, d_in, dtype=dtype)
    outs = [torch.full((T, n), float("nan"), device=DEVICE, dtype=dtype) for n in d_outs]   # poisoned
    ys, xas = G.lora_grouped_matmul(x, ws, As, Bs, scales, biases, fuse_shrink=fuse_shrink, outs=outs)
    for g, (w, a, b, bias, s) in enumerate(zip(ws, As, Bs, biases, scales)):
        assert ys[g] is outs[g]
        y64 = x.double() @ w.double().t() + (0 if bias is None else bias.double())
        y_torch = x @ w.t() + (0 if bias is None else bias)
        if a is None:
            assert xas[g] is None
        else:
            xa64 = s * x.double() @ a.double().t()
            assert xas[g].dtype == torch.float32 and xas[g].shape == (T, a.shape[0])
            assert_matches(xas[g], xa64, s * (x @ a.t()), dtype, f"member {g}'s xa")
            y64 = y64 + xa64 @ b.double().t()
            y_torch = y_torch + xas[g].to(dtype) @ b.t()
        assert_matches(ys[g], y64, y_torch, dtype, f"member {g}'s y")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,d_in,d_outs,ranks,fuse_shrink", [
    (1, 37, (29, 13, 13), (4, None, 7), True),        # decode, GQA-like: k narrower than q, k without adapter
    (5, 37, (29, 13, 13), (4, None, 7), False),
    (70, 33, (47, 19), (17, 5), None),                # prefill: the shared shrink, then the grouped matmul
    (13, 45, (53, 21, 21), (40, 90, None), False),    # r = 90: the shrink spans two rank blocks
])
def test_grouped_kernels_odd_shapes(T, d_in, d_outs, ranks, fuse_shrink, dtype):
    torch.manual_seed(T + d_in)
    _check_grouped(T, d_in, d_outs, ranks, dtype, fuse_shrink)


def test_grouped_empty_tokens_and_one_member():
    ws, As, Bs, biases, scales = _members(16, (8, 4), (2, 3), torch.float32, (False, True))
    ys, xas = G.lora_grouped_matmul(torch.empty(0, 16, device=DEVICE), ws, As, Bs, scales, biases)
    assert [y.shape for y in ys] == [(0, 8), (0, 4)] and [xa.shape for xa in xas] == [(0, 2), (0, 3)]
    torch.manual_seed(2)
    _check_grouped(3, 16, (8,), (2,), torch.float32, None, biased=(True,))


@pytest.mark.parametrize("fuse_shrink", [True, False])
def test_grouped_dropout_is_each_members_own_kernel_mask(fuse_shrink):
    """Member g draws the mask kernels.lora draws with member g's seed: per-member masks, shared with backward."""
    torch.manual_seed(4)
    T, d_in = 19, 24
    ws, As, Bs, biases, scales = _members(d_in, (30, 11, 11), (4, 3, None), torch.float32, (True, False, False))
    x = rand(T, d_in, dtype=torch.float32)
    seeds = [torch.tensor([s], device=DEVICE) for s in (123, 456, 789)]
    dropouts = [0.3, 0.5, 0.2]
    ys, xas = G.lora_grouped_matmul(x, ws, As, Bs, scales, biases, seeds, dropouts, fuse_shrink=fuse_shrink)
    for g in range(2):
        y, xa = K.lora_matmul(x, ws[g], As[g], Bs[g], scales[g], biases[g], seeds[g], x_dropout=dropouts[g],
                              fuse_shrink=fuse_shrink)
        torch.testing.assert_close(xas[g], xa, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ys[g], y, rtol=1e-6, atol=1e-6)
    dense = K.lora_matmul(x, ws[0], As[0], Bs[0], scales[0], biases[0], fuse_shrink=fuse_shrink)[1]
    assert not torch.allclose(xas[0], dense)                     # the mask did apply
    torch.testing.assert_close(ys[2], x @ ws[2].t())             # no adapter: its dropout changes nothing


# ------------------------------------------------------------------------------------------ backward at prefill
@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty fills float tensors with NaN: outputs a launcher allocates must be written in full."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t
    monkeypatch.setattr(torch, "empty", poisoned)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,d_outs,ranks", [
    (70, (29, 13, 13), (4, 7, 3)),                    # q/k/v-like: k and v narrower
    (37, (45, 21), (70, 5)),                          # r = 70: two rank blocks, the other member's masked off
    (5, (19,), (6,)),
])
def test_grouped_shrink_each_odd_shapes(T, d_outs, ranks, dtype, poisoned_empty):
    """g_g = s_g dy_g B_g over each member's own dy and d_out; float32 adapters read as dy's dtype, as
    kernels.lora.lora_shrink reads them."""
    torch.manual_seed(T + len(d_outs))
    dys = [rand(T, n, dtype=dtype) for n in d_outs]
    Bs = [rand(n, r, dtype=torch.float32, scale=r ** -0.5) for n, r in zip(d_outs, ranks)]
    scales = [1.7, 0.6, 2.5][:len(d_outs)]
    gs = G.lora_grouped_shrink_each(dys, [b.t() for b in Bs], scales)
    for g, (dy, b, s) in enumerate(zip(dys, Bs, scales)):
        assert gs[g].dtype == torch.float32 and gs[g].shape == (T, b.shape[1])
        assert_matches(gs[g], s * dy.double() @ b.to(dtype).double(), s * (dy @ b.to(dtype)), dtype, f"g[{g}]")
        torch.testing.assert_close(gs[g], K.lora_shrink(dy, b.t(), s), rtol=1e-5, atol=1e-5)
    assert [t.shape for t in G.lora_grouped_shrink_each([d[:0] for d in dys], [b.t() for b in Bs], scales)] == [
        (0, r) for r in ranks]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,d_in,d_outs,ranks", [
    (70, 29, (23, 9, 9), (5, 3, 17)),
    (33, 40, (11, 37), (8, 2)),
    (9, 13, (17,), (4,)),
])
def test_grouped_weight_grads_odd_shapes(T, d_in, d_outs, ranks, dtype, poisoned_empty):
    """dA_g^T = x^T g_g and dB_g = dy_g^T xa_g for every member, against float64."""
    torch.manual_seed(T + d_in)
    x = rand(T, d_in, dtype=dtype)
    dys = [rand(T, n, dtype=dtype) for n in d_outs]
    gs = [rand(T, r, dtype=torch.float32) for r in ranks]
    xas = [rand(T, r, dtype=torch.float32) for r in ranks]
    d_a_ts, d_bs = G.lora_grouped_weight_grads(x, gs, dys, xas)
    for g, (dy, gg, xa) in enumerate(zip(dys, gs, xas)):
        assert d_a_ts[g].shape == (d_in, ranks[g]) and d_bs[g].shape == (d_outs[g], ranks[g])
        assert d_a_ts[g].dtype == d_bs[g].dtype == torch.float32
        assert_matches(d_a_ts[g], x.double().t() @ gg.double(), x.float().t() @ gg, dtype, f"dA[{g}]^T")
        assert_matches(d_bs[g], dy.double().t() @ xa.double(), dy.float().t() @ xa, dtype, f"dB[{g}]")
    d_as, _ = G.lora_grouped_weight_grads(x, gs, dys, xas, rank_major=True)           # lora_A's layout
    for d_a, d_a_t in zip(d_as, d_a_ts):
        assert d_a.shape == d_a_t.t().shape and d_a.is_contiguous()
        torch.testing.assert_close(d_a, d_a_t.t(), rtol=1e-5, atol=1e-5)
    d_a_ts, d_bs = G.lora_grouped_weight_grads(x[:0], [t[:0] for t in gs], [t[:0] for t in dys], [t[:0] for t in xas])
    assert all(not t.any() for t in d_a_ts + d_bs) and [t.shape for t in d_bs] == list(zip(d_outs, ranks))


def test_grouped_weight_grads_dropout_is_each_members_own_kernel_mask():
    """Member g's dA carries the mask kernels.lora.lora_weight_grads draws with member g's seed (the forward's
    mask over x); dB none. A member without dropout stays unmasked."""
    torch.manual_seed(5)
    T, d_in, d_outs, ranks = 71, 26, (30, 11, 11), (4, 3, 5)
    x = rand(T, d_in, dtype=torch.float32)
    dys = [rand(T, n, dtype=torch.float32) for n in d_outs]
    gs = [rand(T, r, dtype=torch.float32) for r in ranks]
    xas = [rand(T, r, dtype=torch.float32) for r in ranks]
    seeds = [torch.tensor([s], device=DEVICE) for s in (123, 456, 789)]
    dropouts = [0.3, 0.0, 0.5]
    d_a_ts, d_bs = G.lora_grouped_weight_grads(x, gs, dys, xas, seeds, dropouts)
    for g in range(3):
        d_a_t, d_b = K.lora_weight_grads(x, gs[g], dys[g], xas[g], seeds[g], dropouts[g])
        torch.testing.assert_close(d_a_ts[g], d_a_t, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(d_bs[g], d_b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(d_a_ts[0], x.t() @ gs[0], rtol=1e-3, atol=1e-3)     # the mask did apply
    torch.testing.assert_close(d_a_ts[1], x.t() @ gs[1], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- multi-adapter
def _slots(S, d_in, d_out, ranks, dtype):
    """Stacked slots in the pool's layout (zeros beyond each rank; rank 0: the member lacks that adapter)."""
    a, b, ranks, scales = lora_slots64(S, d_in, d_out, ranks)
    return a.to(DEVICE, dtype), b.to(DEVICE, dtype), ranks, scales


def _mapping(kind, T, S):
    if kind == "random":
        return torch.randint(-1, S, (T,), device=DEVICE, dtype=torch.int32)
    return (torch.arange(T, device=DEVICE, dtype=torch.int32) % (S + 1)) - 1   # "each": rows cycle through slots


def _multi_batch(T, d_in, d_outs, member_ranks, dtype, kind, S=4):
    """A grouped multi-adapter batch: per member its stacked slots (A, B, ranks, scales) or None (no slots), its
    W; a bias on member 0 only; x, the row -> slot mapping and the slot-sorted order."""
    members = [None if r is None else _slots(S, d_in, n, r, dtype) for n, r in zip(d_outs, member_ranks)]
    ws = [rand(n, d_in, dtype=dtype, scale=d_in ** -0.5) for n in d_outs]
    biases = [rand(d_outs[0], dtype=dtype)] + [None] * (len(d_outs) - 1)
    x = rand(T, d_in, dtype=dtype)
    idx = _mapping(kind, T, S)
    order, _ = M.token_segments(idx, S)
    return members, ws, biases, x, idx, order


def _check_member(g, y, xa, x, idx, w, bias, member, dtype, what, y_lowp=None):
    """Member g's y and xa (fp32, padded rank width; None without slots) against float64; y_lowp: PyTorch's own
    low-precision result from the same xa, the tolerance's yardstick."""
    has, slot = idx >= 0, idx.clamp_min(0).long()
    y64 = x.double() @ w.double().t() + (0 if bias is None else bias.double())
    if member is None:
        assert xa is None
    else:
        a, b, _, scales = member
        r_max = a.shape[1]
        xa64 = torch.einsum("ti,tri->tr", x.double(), a.double()[slot]) * (scales.double()[slot] * has)[:, None]
        assert xa.shape == (x.shape[0], M.padded_rank(r_max)) and not xa[:, r_max:].any()
        assert_matches(xa[:, :r_max], xa64, None, dtype, f"member {g}'s xa, {what}")
        y64 = y64 + torch.einsum("tr,tor->to", xa64, b.double()[slot])
    assert_matches(y, y64, y_lowp, dtype, f"member {g}'s y, {what}")


def _check_multi(T, d_in, d_outs, member_ranks, dtype, kind):
    members, ws, biases, x, idx, order = _multi_batch(T, d_in, d_outs, member_ranks, dtype, kind)
    slot = idx.clamp_min(0).long()
    live = [g for g, m in enumerate(members) if m is not None]
    for rows in (None, order) if T <= M.DECODE_MAX_T else (order,):   # the op sorts the rows at prefill
        xs = None if rows is None else M.tma_sorted_rows(x, *ws)         # Hopper (or forced TMA): sorted for TMA
        shrunk = G.lora_grouped_multi_shrink(x, [members[g][0] for g in live], idx, [members[g][2] for g in live],
                                             [members[g][3] for g in live], rows, x_sorted=xs)
        if xs is not None:
            assert torch.equal(xs, x[order.long()])
        xas = [None] * len(d_outs)
        for g, xa in zip(live, shrunk):
            xas[g] = xa
        outs = [torch.full((T, n), float("nan"), device=DEVICE, dtype=dtype) for n in d_outs]   # poisoned
        G.lora_grouped_multi_matmul(x, ws, xas, [None if m is None else m[1] for m in members], idx,
                                    [None if m is None else m[2] for m in members], biases, rows, outs=outs,
                                    x_sorted=xs)
        for g, (w, bias, m) in enumerate(zip(ws, biases, members)):
            y_torch = x @ w.t() + (0 if bias is None else bias)
            if m is not None:
                y_torch = y_torch + torch.einsum("tr,tor->to", xas[g][:, :m[0].shape[1]].to(dtype), m[1][slot])
            _check_member(g, outs[g], xas[g], x, idx, w, bias, m, dtype, f"sorted rows: {rows is not None}",
                          y_torch)


@pytest.mark.parametrize("kind,dtype", [("random", torch.float32), ("each", torch.float16)]
                         + ([("random", torch.bfloat16)] if CUDA else []), ids=str)
def test_grouped_multi_kernels_mappings(kind, dtype):
    """q with four slots of mixed ranks, k without any slot, v lacking two of the adapters (rank 0)."""
    torch.manual_seed(7)
    _check_multi(29, 37, (41, 17, 17), ([16, 4, 9, 1], None, [0, 20, 3, 0]), dtype, kind)


@pytest.mark.parametrize("T", [29, 70])
def test_grouped_multi_kernels_many_runs_per_block(T, monkeypatch):
    """Rounds cut to 2 runs (unsorted rows cycle through the slots: a run per row): the grouped shrink's rounds
    over one x tile for every member, and the member tiles' expand rounds, at decode and at prefill."""
    monkeypatch.setattr(M, "ROUND_ELEMENTS", tl.constexpr(1024))     # the interpreter reads globals per call
    torch.manual_seed(8)
    _check_multi(T, 37, (41, 17, 17), ([16, 4, 9, 1], None, [0, 20, 3, 0]), torch.float32, "each")


@pytest.mark.parametrize("kind", ["random", "each", "one", "none"])
def test_grouped_multi_decode_expand_in_loop(kind, monkeypatch):
    """The member tiles' expand inside their K loop (kernels.lora_multi.EXPAND_IN_LOOP) at decode: ranks up to
    20 (two rank steps), a member without slots, slots of rank 0; the prefill (T = 70) keeps the rounds after the
    loop."""
    monkeypatch.setattr(M, "EXPAND_IN_LOOP", True)
    monkeypatch.setattr(G._grouped_multi_matmul_decode, "configs", {})
    torch.manual_seed(9)
    _check_multi(29, 37, (41, 17, 17), ([16, 4, 9, 1], None, [0, 20, 3, 0]), torch.float32, kind)
    assert G._grouped_multi_matmul_decode.configs and all(key[-1] == "in_loop"
                                                          for key in G._grouped_multi_matmul_decode.configs)


@pytest.mark.parametrize("round_split", [2, 3])
def test_grouped_multi_shrink_round_split(round_split, monkeypatch):
    """The grouped shrink's rounds shared out over SPLIT_ROUNDS programs (rounds cut to 2 runs, a run per row),
    K split 2 ways: every member's rows of a program's rounds only, added into zeroed outputs."""
    import triton
    monkeypatch.setattr(M, "ROUND_ELEMENTS", tl.constexpr(1024))     # the interpreter reads globals per call
    meta = {**G._grouped_multi_shrink.autotuner.configs[0].kwargs, "SPLIT_K": 2, "SPLIT_ROUNDS": round_split}
    monkeypatch.setattr(G._grouped_multi_shrink.autotuner, "configs",
                        [triton.Config(meta, num_warps=4, num_stages=1)])
    monkeypatch.setattr(G._grouped_multi_shrink, "configs", {})
    torch.manual_seed(10)
    _check_multi(29, 37, (41, 17, 17), ([16, 4, 9, 1], None, [0, 20, 3, 0]), torch.float32, "each")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("T", [1, 64])
def test_grouped_multi_decode_expand_in_loop_llama_shapes(T, monkeypatch):
    monkeypatch.setattr(M, "EXPAND_IN_LOOP", True)
    torch.manual_seed(T)
    _check_multi(T, 4096, (4096, 1024, 1024), ([8, 16, 64, 128], None, [16, 0, 16, 32]), torch.bfloat16, "random")


def test_grouped_multi_kernels_prefill_two_members():
    torch.manual_seed(8)
    _check_multi(70, 33, (19, 26), ([40, 17, 2, 8], [5, 5, 5, 5]), torch.float32, "random")


def test_grouped_multi_dropout_is_each_members_own_kernel_mask():
    torch.manual_seed(9)
    T, d_in, S = 23, 24, 3
    members = [_slots(S, d_in, n, r, torch.float32) for n, r in ((20, [4, 8, 2]), (12, [3, 3, 6]))]
    x = rand(T, d_in, dtype=torch.float32)
    idx = _mapping("random", T, S)
    dropouts = [torch.tensor([0.3, 0.0, 0.6], device=DEVICE), torch.tensor([0.5, 0.2, 0.0], device=DEVICE)]
    seeds = [torch.tensor([11], device=DEVICE), torch.tensor([12], device=DEVICE)]
    xas = G.lora_grouped_multi_shrink(x, [m[0] for m in members], idx, [m[2] for m in members],
                                      [m[3] for m in members], None, dropouts, seeds)
    for g, (a, _, ranks, scales) in enumerate(members):
        expected = M.lora_multi_shrink(x, a, idx, ranks, scales, None, dropouts[g], seeds[g])
        torch.testing.assert_close(xas[g], expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(xas[0], M.lora_multi_shrink(x, members[0][0], idx, members[0][2], members[0][3]))


def _check_one_launch(T, d_in, d_outs, member_ranks, dtype, kind, monkeypatch, dropout=False):
    """lora_grouped_multi_linear (SHRINK_PROGRAMS: the members' shrinks on the launch's first programs) on
    poisoned outputs against float64, rows as they come and slot-sorted (decode) or sorted (prefill), one launch
    each; with input dropout against the shrink + matmul pair under the same seeds; the counters zero after."""
    from ptlm_engine.kernels.split_state import split_state
    monkeypatch.setattr(M, "SHRINK_PROGRAMS", True)
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *shape, **kw: empty(*shape, **kw).fill_(float("nan")))
    launches = record_launches(monkeypatch)
    members, ws, biases, x, idx, order = _multi_batch(T, d_in, d_outs, member_ranks, dtype, kind)
    As, Bs, ranks, scales = ([None if m is None else m[i] for m in members] for i in range(4))
    kernel = G._grouped_multi_matmul_decode if T <= M.DECODE_MAX_T else G._grouped_multi_matmul_prefill
    assert G.grouped_one_launch(T)
    if dropout:
        live = [g for g, m in enumerate(members) if m is not None]
        S = As[live[0]].shape[0]
        dropouts = [None if m is None else torch.rand(S, device=DEVICE) * 0.5 for m in members]
        seeds = [None if m is None else torch.tensor([20 + g], device=DEVICE) for g, m in enumerate(members)]
        ys, xas = G.lora_grouped_multi_linear(x, ws, As, Bs, idx, ranks, scales, biases, order, dropouts, seeds)
        assert not split_state(x.device, 1, 0)[0].any()
        shrunk = G.lora_grouped_multi_shrink(x, [As[g] for g in live], idx, [ranks[g] for g in live],
                                             [scales[g] for g in live], order, [dropouts[g] for g in live],
                                             [seeds[g] for g in live])
        pair_xas = [None] * len(d_outs)
        for g, xa in zip(live, shrunk):
            pair_xas[g] = xa
        pair = G.lora_grouped_multi_matmul(x, ws, pair_xas, Bs, idx, ranks, biases, order)
        for g in range(len(d_outs)):
            if pair_xas[g] is not None:
                assert_matches(xas[g], pair_xas[g].double(), None, dtype, f"member {g}'s xa, input dropout")
            assert_matches(ys[g], pair[g].double(), None, dtype, f"member {g}'s y, input dropout")
        return
    for rows in (None, order) if T <= M.DECODE_MAX_T else (order,):
        launches.clear()
        ys, xas = G.lora_grouped_multi_linear(x, ws, As, Bs, idx, ranks, scales, biases, rows)
        assert launches == [kernel]
        assert not split_state(x.device, 1, 0)[0].any()
        for g, (w, bias, m) in enumerate(zip(ws, biases, members)):
            _check_member(g, ys[g], xas[g], x, idx, w, bias, m, dtype, f"one launch, sorted rows: {rows is not None}")


ONE_LAUNCH_MEMBERS = {"k without slots": ([16, 4, 9, 1], None, [0, 20, 3, 0]),
                      "three with slots": ([16, 4, 9, 1], [5, 5, 5, 5], [0, 20, 3, 0])}


@pytest.mark.parametrize("in_loop", [False, True])
@pytest.mark.parametrize("T,kind,members", [(13, "each", "k without slots"), (13, "random", "three with slots"),
                                            (9, "none", "k without slots"), (6, "one", "three with slots")])
def test_grouped_multi_decode_shrink_programs(T, kind, members, in_loop, monkeypatch):
    """The grouped decode in one launch: every member's shrink programs (K steps of 16, one a program: 37
    columns, 3 splits; rounds cut to 2 runs over up to 3 groups) ahead of the member tiles, which wait for their
    own member's xa (counters and partials of their own); q with four slots of mixed ranks up to 20 (two rank
    blocks), k without slots or with, v lacking two adapters (rank 0); the expand after the K loop or inside it."""
    monkeypatch.setattr(M, "EXPAND_IN_LOOP", in_loop)
    monkeypatch.setattr(M, "SHRINK_BLOCK_K", tl.constexpr(16))        # the interpreter reads globals per call
    monkeypatch.setattr(M, "SHRINK_K_STEPS", 1)
    monkeypatch.setattr(M, "SHRINK_MAX_ROUNDS", 3)
    monkeypatch.setattr(M, "ROUND_ELEMENTS", tl.constexpr(1024))
    assert M.decode_shrink_grid(13, 37, 13, 16) == (3, 3)
    torch.manual_seed(T + in_loop)
    _check_one_launch(T, 37, (41, 17, 17), ONE_LAUNCH_MEMBERS[members], torch.float32, kind, monkeypatch)


@pytest.mark.parametrize("T,kind,members", [(70, "random", "k without slots"), (133, "each", "three with slots")])
def test_grouped_multi_prefill_shrink_programs(T, kind, members, monkeypatch):
    """The grouped prefill in one launch: 64-row shrink programs per member ahead of the pointer tiles."""
    torch.manual_seed(T)
    _check_one_launch(T, 37, (41, 17, 17), ONE_LAUNCH_MEMBERS[members], torch.float32, kind, monkeypatch)


@pytest.mark.parametrize("T", [13, 70])
def test_grouped_multi_shrink_programs_input_dropout(T, monkeypatch):
    """Each member's input dropout in its own shrink programs: the pair's masks under the same seeds."""
    torch.manual_seed(T)
    _check_one_launch(T, 24, (20, 12), ([4, 8, 2, 0], [3, 3, 6, 1]), torch.float32, "random", monkeypatch,
                      dropout=True)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("T", [1, 64, 1000])
def test_grouped_multi_shrink_programs_realistic(T, monkeypatch):
    """The grouped one launch at Llama q/k/v shapes in bf16 (the members' counters and waits only race on a GPU):
    mixed ranks up to 128, a member without slots, slots a member lacks; decode with the in-loop expand."""
    monkeypatch.setattr(M, "EXPAND_IN_LOOP", True)
    torch.manual_seed(T)
    _check_one_launch(T, 4096, (4096, 1024, 1024), ([8, 16, 64, 128], None, [16, 0, 16, 32]), torch.bfloat16,
                      "random", monkeypatch)


# --------------------------------------------------------------------------------------------------------- gpu
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T", [1, 61, 2049])
@pytest.mark.parametrize("d_outs,ranks", [((4096, 1024, 1024), (16, 16, 16)), ((11008, 11008), (16, None)),
                                          ((4096, 4096, 4096), (64, 128, 8))])
def test_grouped_kernels_llama_shapes(T, d_outs, ranks, dtype):
    torch.manual_seed(T)
    _check_grouped(T, 4096, d_outs, ranks, dtype, None if max(r or 0 for r in ranks) <= 64 else False,
                   biased=(False,) * len(d_outs))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=str)
@pytest.mark.parametrize("T", [1, 64, 1000])
def test_grouped_multi_kernels_llama_shapes(T, dtype):
    torch.manual_seed(T)
    _check_multi(T, 4096, (4096, 1024, 1024), ([8, 16, 64, 128], None, [16, 0, 16, 32]), dtype, "random")


@pytest.mark.skipif(not (K.INTERPRETED or (CUDA and torch.cuda.get_device_capability()[0] >= 9)),
                    reason="needs TRITON_INTERPRET=1 or a Hopper GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] if K.INTERPRETED else [torch.float16,
                                                                                       torch.bfloat16], ids=str)
def test_grouped_prefill_runs_each_member_on_the_tma_path(dtype, monkeypatch):
    """With TMA forced, a prefill group whose members all have adapters runs one shared shrink and one TMA
    matmul per member, never the grouped pointer kernel; a member without an adapter keeps the grouped kernel."""
    monkeypatch.setattr(K, "TMA_PREFILL", True)
    launched = record_launches(monkeypatch)
    torch.manual_seed(9)
    _check_grouped(77, 40, (72, 24, 24), (8, 16, 8), dtype, False)        # 16-byte aligned rows: TMA's rule
    assert [k.name for k in launched] == ["_grouped_shrink_kernel"] + ["_lora_matmul_tma_kernel"] * 3
    launched.clear()
    _check_grouped(77, 40, (72, 24, 24), (8, None, 8), dtype, False)
    assert [k.name for k in launched] == ["_grouped_shrink_kernel", "_grouped_matmul_kernel"]


@pytest.mark.gpu
@pytest.mark.skipif(not (K.INTERPRETED or (CUDA and torch.cuda.get_device_capability()[0] >= 9)),
                    reason="needs TRITON_INTERPRET=1 or a Hopper GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] if K.INTERPRETED else [torch.bfloat16], ids=str)
def test_grouped_multi_prefill_runs_each_member_on_the_tma_path(dtype, monkeypatch):
    """With TMA forced, a mixed-batch prefill group runs member by member: the grouped shrink sorts x's rows once,
    each member with adapters runs kernels.lora_multi's TMA tile over them, a member without adapters kernels.lora's
    TMA base GEMM over x as it comes; never the grouped pointer kernel."""
    monkeypatch.setattr(K, "TMA_PREFILL", True)
    launched = record_launches(monkeypatch)
    torch.manual_seed(10)
    _check_multi(77, 40, (72, 24, 24), ([16, 4, 9, 1], None, [0, 20, 3, 0]), dtype, "random")
    names = [k.name for k in launched]
    matmuls = [n for n in names if "shrink" not in n]
    assert matmuls == ["_multi_matmul_tma_kernel", "_lora_matmul_tma_kernel", "_multi_matmul_tma_kernel"], names
