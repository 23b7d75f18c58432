"""Multi-adapter LoRA kernels against float64 references: random mappings with -1 rows, one adapter owning
every row, every row a different adapter, slots with no tokens, mixed ranks, odd shapes, poisoned outputs."""
import pytest
import torch
import triton.language as tl

from ptlm_engine.kernels import lora as K
from ptlm_engine.kernels import lora_multi as M
from tests.helpers import CUDA, DEVICE, DTYPES, assert_matches, lora_slots64, needs_triton, record_launches

pytestmark = needs_triton


def _mapping(kind, T, S):
    if kind == "random":
        return torch.randint(-1, S, (T,), device=DEVICE, dtype=torch.int32)
    if kind == "one":
        return torch.full((T,), S - 1, device=DEVICE, dtype=torch.int32)
    if kind == "none":
        return torch.full((T,), -1, device=DEVICE, dtype=torch.int32)
    return (torch.arange(T, device=DEVICE, dtype=torch.int32) % (S + 1)) - 1   # "each": rows cycle through slots


def _check(T, d_in, d_out, ranks, dtype, kind):
    S, r_max = len(ranks), max(ranks)
    a, b, rk, scales = lora_slots64(S, d_in, d_out, ranks)
    a, b = a.to(DEVICE, dtype), b.to(DEVICE, dtype)
    idx = _mapping(kind, T, S)
    x = torch.randn(T, d_in, device=DEVICE, dtype=dtype)
    w = (torch.randn(d_out, d_in, device=DEVICE, dtype=torch.float64) * d_in ** -0.5).to(dtype)
    bias = torch.randn(d_out, device=DEVICE, dtype=dtype)
    has, slot = idx >= 0, idx.clamp_min(0).long()
    xa64 = torch.einsum("ti,tri->tr", x.double(), a.double()[slot]) * (scales.double()[slot] * has)[:, None]

    order, bounds = M.token_segments(idx, S)
    for rows in (None, order):  # tokens as they come, and walked in slot-sorted order
        xa = M.lora_multi_shrink(x, a, idx, rk, scales, rows)
        assert xa.shape == (T, M.padded_rank(r_max)) and xa.dtype == torch.float32
        assert not xa[:, r_max:].any()
        assert_matches(xa[:, :r_max], xa64, None, dtype, "multi shrink")

        y = torch.full((T, d_out), float("nan"), device=DEVICE, dtype=dtype)   # poisoned
        M.lora_multi_matmul(x, w, xa, b, idx, rk, bias, rows, out=y)
        y64 = x.double() @ w.double().t() + bias.double() + torch.einsum("tr,tor->to", xa64, b.double()[slot])
        y_torch = x @ w.t() + bias + torch.einsum("tr,tor->to", xa[:, :r_max].to(dtype), b[slot])
        assert_matches(y, y64, y_torch, dtype, "multi matmul")

    g = torch.randn(T, d_out, device=DEVICE, dtype=dtype)
    db = M.lora_multi_weight_grad(g, xa, order, bounds, rk, r_max)
    db64 = torch.zeros(S, d_out, r_max, dtype=torch.float64, device=DEVICE)
    db64.index_add_(0, slot[has], torch.einsum("to,tr->tor", g.double()[has], xa64[has]))
    db_t = M.lora_multi_weight_grad(g, xa, order, bounds, rk, r_max, rank_major=True)   # dA's layout
    assert db.shape == (S, d_out, r_max) and db_t.shape == (S, r_max, d_out) and db_t.stride(2) == 1
    if db64.norm() > 0:
        assert_matches(db, db64, None, dtype, "multi weight grad")
        assert_matches(db_t, db64.transpose(1, 2), None, dtype, "multi weight grad, rank-major")
    else:
        assert not db.any() and not db_t.any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["random", "one", "each", "none"])
def test_multi_kernels_mappings(kind, dtype):
    torch.manual_seed(7)
    _check(29, 37, 41, [16, 4, 9, 1], dtype, kind)


@pytest.mark.parametrize("dtype", DTYPES[:2], ids=str)
@pytest.mark.parametrize("T", [29, 70])
def test_multi_kernels_many_runs_per_block(T, dtype, monkeypatch):
    """Blocks with more runs of one slot than a round takes (unsorted rows cycling over 20 slots of mixed
    ranks; rounds cut to 2 runs): several rounds in the shrink, at decode (shared out over split-K programs)
    and at prefill."""
    monkeypatch.setattr(M, "ROUND_ELEMENTS", tl.constexpr(1024))     # the interpreter reads globals per call
    torch.manual_seed(8)
    _check(T, 37, 41, [1 + (7 * i) % 40 for i in range(20)], dtype, "each")


@pytest.mark.parametrize("T,d_in,d_out,ranks", [(1, 20, 24, [8, 3]), (70, 33, 19, [40, 17, 2])])
def test_multi_kernels_shapes_and_ranks(T, d_in, d_out, ranks):
    torch.manual_seed(T)
    _check(T, d_in, d_out, ranks, torch.float32, "random")


@pytest.mark.parametrize("split", [1, 3])
def test_shrink_output_is_zeroed_only_for_split_configs(split, monkeypatch):
    """The shrink skips its output's memset once the key's config is known not to split; a config that splits
    (atomics into the output) still gets a zeroed one. torch.empty is poisoned."""
    torch.manual_seed(6)
    T, d_in, ranks = 37, 40, [5, 16, 9]
    a, _, rk, scales = lora_slots64(len(ranks), d_in, 8, ranks)
    a = a.to(DEVICE, torch.float32)
    x = torch.randn(T, d_in, device=DEVICE)
    idx = _mapping("random", T, len(ranks))
    expected = M.lora_multi_shrink(x, a, idx, rk, scales)        # zeroed output; the key's config is known after
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *shape, **kw: empty(*shape, **kw).fill_(float("nan")))
    for key, (meta, pre_hook) in list(M._multi_shrink.configs.items()):
        monkeypatch.setitem(M._multi_shrink.configs, key, ({**meta, "SPLIT_K": split}, pre_hook))
    xa = M.lora_multi_shrink(x, a, idx, rk, scales)
    assert torch.allclose(xa, expected, rtol=1e-5, atol=1e-5) and not xa[:, max(ranks):].any()


def test_token_segments_group_tokens_by_slot():
    idx = torch.tensor([2, -1, 0, 2, 2, -1, 0], device=DEVICE, dtype=torch.int32)
    order, bounds = M.token_segments(idx, 4)
    assert bounds.tolist() == [2, 4, 4, 7, 7]                   # slot 1 and slot 3 own no tokens
    assert sorted(order[bounds[2]:bounds[3]].tolist()) == [0, 3, 4]
    assert sorted(order[bounds[0]:bounds[1]].tolist()) == [2, 6]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T", [1, 64, 1000])
@pytest.mark.parametrize("kind", ["random", "each"])
def test_multi_kernels_realistic_shapes(T, kind, dtype):
    torch.manual_seed(T)
    _check(T, 4096, 4096, [8, 16, 64, 128] * 8, dtype, kind)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T", [1, 16, 64])
@pytest.mark.parametrize("split", [1, 3])
def test_multi_decode_realistic_split(T, split, dtype, monkeypatch):
    """The split-K multi-adapter decode matmul on a GPU, 32 rank-16 adapters at 4096 x 4096: the counters'
    ordering is only exercised there."""
    import triton
    meta = {**M._multi_decode.autotuner.configs[0].kwargs, "SPLIT_K": split}
    monkeypatch.setattr(M._multi_decode.autotuner, "configs", [triton.Config(meta, num_warps=4, num_stages=3)])
    monkeypatch.setattr(M._multi_decode, "configs", {})
    torch.manual_seed(T)
    _check(T, 4096, 4096, [16] * 32, dtype, "random")


@pytest.mark.parametrize("split", [1, 3])
def test_multi_decode_kernel_splits_and_output_dropout(split, monkeypatch):
    """The decode matmul with its K split 1 or 3 ways (partials summed by the last split of each column block),
    forward and the backward's form (per-slot output dropout on the LoRA term), on poisoned outputs."""
    import triton
    meta = {**M._multi_decode.autotuner.configs[0].kwargs, "SPLIT_K": split}
    monkeypatch.setattr(M._multi_decode.autotuner, "configs", [triton.Config(meta, num_warps=4, num_stages=1)])
    monkeypatch.setattr(M._multi_decode, "configs", {})
    torch.manual_seed(11)
    T, d_in, d_out, ranks = 13, 70, 45, [8, 3, 16]
    S = len(ranks)
    a, b, rk, scales = lora_slots64(S, d_in, d_out, ranks)
    b = b.to(DEVICE, torch.float32)
    idx = _mapping("random", T, S)
    has, slot = idx >= 0, idx.clamp_min(0).long()
    x = torch.randn(T, d_in, device=DEVICE)
    w = torch.randn(d_out, d_in, device=DEVICE) * d_in ** -0.5
    xa = M.lora_multi_shrink(x, a.to(DEVICE, torch.float32), idx, rk, scales)
    lora64 = torch.einsum("tr,tor->to", xa.double()[:, :max(ranks)], b.double()[slot]) * has[:, None]
    y = torch.full((T, d_out), float("nan"), device=DEVICE)
    M.lora_multi_matmul(x, w, xa, b, idx, rk, None, out=y)
    assert_matches(y, x.double() @ w.double().t() + lora64, None, torch.float32, "decode y")
    dropouts, seed = torch.tensor([0.3, 0.0, 0.5], device=DEVICE), torch.tensor([99], device=DEVICE)
    y_drop = M.lora_multi_matmul(x, w, xa, b, idx, rk, None, dropouts=dropouts, seed=seed)
    kept = (y_drop.double() - x.double() @ w.double().t()) / lora64.where(lora64.abs() > 1e-3, torch.nan)
    kept = kept[~kept.isnan()]
    assert torch.all(((kept - 1).abs() < 1e-3) | (kept.abs() < 1e-3)) and (kept.abs() < 1e-3).any()



@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("kind", ["random", "one", "each", "none"])
@pytest.mark.parametrize("round_elements", [4096, 1024])
def test_multi_decode_expand_in_loop(kind, split, round_elements, monkeypatch):
    """The decode matmul's expand inside its K loop (PTLM_MULTI_IN_LOOP), a (round, 16 ranks) pair a K step: mixed
    ranks up to 40 (three rank steps), -1 rows, K split 1 or 3 ways; tokens as they come and slot-sorted. d_in 37
    over 32-wide K steps leaves two steps (one a split) for up to 20 rows' pairs: most pairs follow the loop; with
    rounds cut to 2 runs (1024) more so. An in-loop key of its own."""
    import triton
    monkeypatch.setattr(M, "EXPAND_IN_LOOP", True)
    monkeypatch.setattr(M, "ROUND_ELEMENTS", tl.constexpr(round_elements))  # the interpreter reads globals per call
    meta = {**M._multi_decode.autotuner.configs[0].kwargs, "SPLIT_K": split}
    monkeypatch.setattr(M._multi_decode.autotuner, "configs", [triton.Config(meta, num_warps=4, num_stages=1)])
    monkeypatch.setattr(M._multi_decode, "configs", {})
    torch.manual_seed(12)
    _check(13, 37, 41, [16, 4, 40, 1, 9], torch.float32, kind)
    assert M._multi_decode.configs and all(key[-1] == "in_loop" for key in M._multi_decode.configs)


@pytest.mark.parametrize("T", [8, 61])
def test_multi_decode_expand_in_loop_more_k_steps_than_pairs(T, monkeypatch):
    """K steps outnumber the pairs (d_in 200: seven 32-wide steps, three slots): the steps past the last pair
    load nothing and add nothing."""
    monkeypatch.setattr(M, "EXPAND_IN_LOOP", True)
    torch.manual_seed(T)
    _check(T, 200, 23, [16, 3, 24], torch.float16, "random")


@pytest.mark.parametrize("round_split", [2, 3])
@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("kind", ["random", "each", "none"])
def test_multi_shrink_round_split(kind, split, round_split, monkeypatch):
    """The shrink with a row block's rounds of runs shared out over SPLIT_ROUNDS programs (atomics into a zeroed
    output, each program's rows only), K split 1 or 2 ways, rounds cut to 2 runs; every row a different slot of
    mixed ranks, -1 rows, no adapter at all. torch.empty is poisoned."""
    import triton
    monkeypatch.setattr(M, "ROUND_ELEMENTS", tl.constexpr(1024))     # the interpreter reads globals per call
    meta = {**M._multi_shrink.autotuner.configs[0].kwargs, "SPLIT_K": split, "SPLIT_ROUNDS": round_split}
    monkeypatch.setattr(M._multi_shrink.autotuner, "configs", [triton.Config(meta, num_warps=4, num_stages=1)])
    monkeypatch.setattr(M._multi_shrink, "configs", {})
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *shape, **kw: empty(*shape, **kw).fill_(float("nan")))
    torch.manual_seed(13)
    T, d_in, ranks = 29, 70, [16, 4, 40, 1, 9, 33, 2]
    S = len(ranks)
    a, _, rk, scales = lora_slots64(S, d_in, 8, ranks)
    a = a.to(DEVICE, torch.float32)
    x = torch.randn(T, d_in, device=DEVICE)
    idx = _mapping(kind, T, S)
    has, slot = idx >= 0, idx.clamp_min(0).long()
    xa64 = torch.einsum("ti,tri->tr", x.double(), a.double()[slot]) * (scales.double()[slot] * has)[:, None]
    order, _ = M.token_segments(idx, S)
    for rows in (None, order):
        xa = M.lora_multi_shrink(x, a, idx, rk, scales, rows)
        assert not xa[:, max(ranks):].any()
        assert_matches(xa[:, :max(ranks)], xa64, None, torch.float32, "round-split shrink")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T", [1, 16, 64])
def test_multi_decode_expand_in_loop_realistic(T, dtype, monkeypatch):
    monkeypatch.setattr(M, "EXPAND_IN_LOOP", True)
    torch.manual_seed(T)
    _check(T, 4096, 4096, [16] * 32, dtype, "random")


def _check_fused_decode(T, d_in, d_out, ranks, kind, split, dtype, monkeypatch, stages, shrink_programs=False):
    """lora_multi_linear at decode (one launch: each split expands its own partial shrink, column block 0's
    partials summed into xa; with shrink_programs the launch's own shrink programs write xa) against float64 on
    poisoned outputs, tokens as they come and slot-sorted; with input dropout against the shrink + matmul pair
    under the same seed. K split `split` ways."""
    import triton
    meta = {**M._multi_decode.autotuner.configs[0].kwargs, "SPLIT_K": split}
    monkeypatch.setattr(M._multi_decode.autotuner, "configs", [triton.Config(meta, num_warps=4, num_stages=stages)])
    monkeypatch.setattr(M._multi_decode, "configs", {})
    launches = record_launches(monkeypatch)
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *shape, **kw: empty(*shape, **kw).fill_(float("nan")))
    torch.manual_seed(T + split)
    S, r_max = len(ranks), max(ranks)
    assert M.decode_fuses_shrink(T, r_max) != shrink_programs and not M.decode_fuses_shrink(T + 4, r_max)
    a, b, rk, scales = lora_slots64(S, d_in, d_out, ranks)
    a, b = a.to(DEVICE, dtype), b.to(DEVICE, dtype)
    idx = _mapping(kind, T, S)
    order, _ = M.token_segments(idx, S)
    has, slot = idx >= 0, idx.clamp_min(0).long()
    x = torch.randn(T, d_in, device=DEVICE, dtype=dtype)
    w = (torch.randn(d_out, d_in, device=DEVICE, dtype=torch.float64) * d_in ** -0.5).to(dtype)
    bias = torch.randn(d_out, device=DEVICE, dtype=dtype)
    xa64 = torch.einsum("ti,tri->tr", x.double(), a.double()[slot]) * (scales.double()[slot] * has)[:, None]
    y64 = x.double() @ w.double().t() + bias.double() + torch.einsum("tr,tor->to", xa64, b.double()[slot])
    for rows in (None, order):
        launches.clear()
        y, xa = M.lora_multi_linear(x, w, a, b, idx, rk, scales, bias, rows)
        assert launches == [M._multi_decode]
        assert xa.shape == (T, M.padded_rank(r_max)) and not xa[:, r_max:].any()
        assert_matches(xa[:, :r_max], xa64, None, dtype, "fused decode xa")
        assert_matches(y, y64, None, dtype, "fused decode y")

    dropouts, seed = torch.rand(S, device=DEVICE) * 0.5, torch.tensor([21], device=DEVICE)
    y, xa = M.lora_multi_linear(x, w, a, b, idx, rk, scales, None, order, dropouts, seed)
    xa_pair = M.lora_multi_shrink(x, a, idx, rk, scales, order, dropouts, seed)
    y_pair = M.lora_multi_matmul(x, w, xa_pair, b, idx, rk, None, order)
    assert_matches(xa, xa_pair.double(), None, dtype, "fused decode xa, input dropout")
    assert_matches(y, y_pair.double(), None, dtype, "fused decode y, input dropout")


@pytest.mark.parametrize("dtype", DTYPES[:2], ids=str)
@pytest.mark.parametrize("T,ranks,kind", [(1, [16, 5], "one"), (1, [16, 40], "one"), (3, [16, 5, 9, 12], "each"),
                                          (4, [3, 16, 7], "random"), (2, [16, 8], "none")])
@pytest.mark.parametrize("split", [1, 3])
def test_multi_decode_fuses_its_shrink_at_a_few_tokens(T, ranks, kind, split, dtype, monkeypatch):
    """One row, rows of different slots, -1 rows, no adapter at all, mixed ranks, K split 1 or 3 ways."""
    _check_fused_decode(T, 70, 45, ranks, kind, split, dtype, monkeypatch, stages=1)


@pytest.mark.parametrize("in_loop", [False, True])
@pytest.mark.parametrize("T,ranks,kind", [(13, [16, 5, 40, 9, 1], "each"), (13, [16, 5, 40, 9, 1], "random"),
                                          (9, [16, 8], "none"), (6, [24, 3], "one")])
@pytest.mark.parametrize("split", [1, 3])
def test_multi_decode_shrink_programs(T, ranks, kind, split, in_loop, monkeypatch):
    """The decode launch's own shrink programs (SHRINK_PROGRAMS): K steps of 16 and one a program (70 columns:
    5 splits), rounds cut to 2 runs and shared out over up to 3 groups, mixed ranks (three rank blocks), -1 rows,
    no adapter at all; the expand after the K loop or inside it; K split 1 or 3 ways."""
    import triton.language as tl
    monkeypatch.setattr(M, "SHRINK_PROGRAMS", True)
    monkeypatch.setattr(M, "EXPAND_IN_LOOP", in_loop)
    monkeypatch.setattr(M, "SHRINK_BLOCK_K", tl.constexpr(16))        # the interpreter reads globals per call
    monkeypatch.setattr(M, "SHRINK_K_STEPS", 1)
    monkeypatch.setattr(M, "SHRINK_MAX_ROUNDS", 3)
    monkeypatch.setattr(M, "ROUND_ELEMENTS", tl.constexpr(1024))
    assert M.one_launch(T, max(ranks)) and M.decode_shrink_grid(13, 70, 13, 16) == (5, 3)
    _check_fused_decode(T, 70, 45, ranks, kind, split, torch.float32, monkeypatch, stages=1, shrink_programs=True)


@pytest.mark.parametrize("T,kind", [(70, "random"), (70, "each"), (133, "none"), (100, "one")])
@pytest.mark.parametrize("dropout", [False, True])
def test_multi_prefill_shrink_programs(T, kind, dropout, monkeypatch):
    """The prefill forward in one launch (SHRINK_PROGRAMS): 64-row shrink programs (three rank blocks, mixed
    ranks, -1 rows, no adapter at all) ahead of the pointer tiles, which wait for them before they expand;
    against float64 on poisoned outputs, tokens as they come and slot-sorted, and with input dropout against the
    shrink + matmul pair under the same seed; the counters zero after it."""
    from ptlm_engine.kernels.split_state import split_state
    monkeypatch.setattr(M, "SHRINK_PROGRAMS", True)
    launches = record_launches(monkeypatch)
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *shape, **kw: empty(*shape, **kw).fill_(float("nan")))
    torch.manual_seed(T)
    ranks = [16, 5, 40, 9, 1]
    S, r_max, d_in, d_out = len(ranks), max(ranks), 37, 41
    a, b, rk, scales = lora_slots64(S, d_in, d_out, ranks)
    a, b = a.to(DEVICE, torch.float32), b.to(DEVICE, torch.float32)
    idx = _mapping(kind, T, S)
    order, _ = M.token_segments(idx, S)
    has, slot = idx >= 0, idx.clamp_min(0).long()
    x = torch.randn(T, d_in, device=DEVICE)
    w = torch.randn(d_out, d_in, device=DEVICE) * d_in ** -0.5
    bias = torch.randn(d_out, device=DEVICE)
    assert M.one_launch(T, r_max)
    if dropout:
        dropouts, seed = torch.rand(S, device=DEVICE) * 0.5, torch.tensor([21], device=DEVICE)
        y, xa = M.lora_multi_linear(x, w, a, b, idx, rk, scales, bias, order, dropouts, seed)
        xa_pair = M.lora_multi_shrink(x, a, idx, rk, scales, order, dropouts, seed)
        y_pair = M.lora_multi_matmul(x, w, xa_pair, b, idx, rk, bias, order)
        assert_matches(xa, xa_pair.double(), None, torch.float32, "prefill one launch xa, input dropout")
        assert_matches(y, y_pair.double(), None, torch.float32, "prefill one launch y, input dropout")
        return
    xa64 = torch.einsum("ti,tri->tr", x.double(), a.double()[slot]) * (scales.double()[slot] * has)[:, None]
    y64 = x.double() @ w.double().t() + bias.double() + torch.einsum("tr,tor->to", xa64, b.double()[slot])
    for rows in (None, order):
        launches.clear()
        y, xa = M.lora_multi_linear(x, w, a, b, idx, rk, scales, bias, rows)
        assert launches == [M._multi_matmul_prefill]
        assert xa.shape == (T, M.padded_rank(r_max)) and not xa[:, r_max:].any()
        assert_matches(xa[:, :r_max], xa64, None, torch.float32, "prefill one launch xa")
        assert_matches(y, y64, None, torch.float32, "prefill one launch y")
        assert not split_state(x.device, 1, 0)[0].any()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T", [256, 1024])
def test_multi_prefill_shrink_programs_realistic(T, dtype, monkeypatch):
    """The prefill one launch at 4096 x 4096 with 32 rank-16 adapters on a GPU (the waits only happen there)."""
    monkeypatch.setattr(M, "SHRINK_PROGRAMS", True)
    torch.manual_seed(T)
    _check(T, 4096, 4096, [16] * 32, dtype, "random")
    S = 32
    a, b, rk, scales = lora_slots64(S, 4096, 4096, [16] * 32)
    a, b = a.to(DEVICE, dtype), b.to(DEVICE, dtype)
    idx = _mapping("random", T, S)
    order, _ = M.token_segments(idx, S)
    x = torch.randn(T, 4096, device=DEVICE, dtype=dtype)
    w = (torch.randn(4096, 4096, device=DEVICE) * 4096 ** -0.5).to(dtype)
    y, xa = M.lora_multi_linear(x, w, a, b, idx, rk, scales, None, order)
    xa_pair = M.lora_multi_shrink(x, a, idx, rk, scales, order)
    assert_matches(xa, xa_pair.double(), None, dtype, "prefill one launch xa")
    assert_matches(y, M.lora_multi_matmul(x, w, xa_pair, b, idx, rk, None, order).double(), None, dtype,
                   "prefill one launch y")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T", [16, 64])
@pytest.mark.parametrize("split", [1, 3])
def test_multi_decode_shrink_programs_realistic(T, split, dtype, monkeypatch):
    """The decode launch's own shrink programs at 4096 x 4096 with 32 rank-16 adapters on a GPU: the counters'
    waits and ordering are only exercised there."""
    monkeypatch.setattr(M, "SHRINK_PROGRAMS", True)
    monkeypatch.setattr(M, "EXPAND_IN_LOOP", True)
    _check_fused_decode(T, 4096, 4096, [16] * 32, "random", split, dtype, monkeypatch, stages=3,
                        shrink_programs=True)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T,ranks,kind", [(1, [16] * 32, "random"), (4, [16] * 32, "each"),
                                          (1, [8, 16, 64, 16], "one")])
@pytest.mark.parametrize("split", [1, 3])
def test_multi_decode_fuses_its_shrink_realistic(T, ranks, kind, split, dtype, monkeypatch):
    """The fused decode at 4096 x 4096 on a GPU: the split partials' ordering is only exercised there."""
    _check_fused_decode(T, 4096, 4096, ranks, kind, split, dtype, monkeypatch, stages=3)


HOPPER = CUDA and torch.cuda.get_device_capability()[0] >= 9


@pytest.mark.gpu                    # also in GPU sessions (-m gpu): bf16 on Hopper's TMA
@pytest.mark.skipif(not (K.INTERPRETED or HOPPER), reason="needs TRITON_INTERPRET=1 or a Hopper GPU")
@pytest.mark.parametrize("kind", ["random", "each", "one", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] if K.INTERPRETED else [torch.bfloat16], ids=str)
def test_multi_prefill_on_the_tma_path(dtype, kind, monkeypatch):
    """Prefill (T > DECODE_MAX_T) on the TMA tile: the shrink copies x's rows in slot-sorted order (x strided
    here), the persistent tiles read them by TMA, expand their runs and store each row back to its token. Forward
    with bias, and the backward dx form (W0 transposed, per-slot output dropout), against float64 and against the
    pointer tile, on poisoned outputs; each twice (the first call of a key tunes)."""
    monkeypatch.setattr(K, "TMA_PREFILL", True)
    launches = record_launches(monkeypatch)
    torch.manual_seed(12)
    T, d_in, d_out, ranks = M.DECODE_MAX_T + 9, 40, 72, [16, 3, 24]   # 16-byte aligned rows: TMA's rule
    S = len(ranks)
    a, b, rk, scales = lora_slots64(S, d_in, d_out, ranks)
    a, b = a.to(DEVICE, dtype), b.to(DEVICE, dtype)
    idx = _mapping(kind, T, S)
    order, _ = M.token_segments(idx, S)
    has, slot = idx >= 0, idx.clamp_min(0).long()
    x = torch.randn(T, 2 * d_in, device=DEVICE, dtype=dtype)[:, ::2]                       # strided rows
    w = (torch.randn(d_out, d_in, device=DEVICE, dtype=torch.float64) * d_in ** -0.5).to(dtype)
    bias = torch.randn(d_out, device=DEVICE, dtype=dtype)
    xs = M.tma_sorted_rows(x, w)
    assert xs is not None and xs.shape == (T, d_in) and xs.is_contiguous()
    xs.fill_(float("nan"))
    xa = M.lora_multi_shrink(x, a, idx, rk, scales, order, x_sorted=xs)
    assert torch.equal(xs, x[order.long()])
    assert torch.equal(xa, M.lora_multi_shrink(x, a, idx, rk, scales, order))
    lora64 = torch.einsum("tr,tor->to", xa.double()[:, :max(ranks)], b.double()[slot]) * has[:, None]
    y64 = x.double() @ w.double().t() + bias.double() + lora64
    for _ in range(2):
        launches.clear()
        y = torch.full((T, d_out), float("nan"), device=DEVICE, dtype=dtype)
        M.lora_multi_matmul(x, w, xa, b, idx, rk, bias, order, out=y, x_sorted=xs)
        assert launches == [M._multi_matmul_tma]
        assert_matches(y, y64, None, dtype, "multi prefill, TMA tile")

    dropouts, seed = torch.tensor([0.3, 0.0, 0.5], device=DEVICE), torch.tensor([5], device=DEVICE)
    w_t = w.t()                                                   # dx's dy @ W0 reads W transposed
    dy = torch.randn(T, d_out, device=DEVICE, dtype=dtype)
    dys = M.tma_sorted_rows(dy, w_t)
    g = M.lora_multi_shrink(dy, b.transpose(1, 2), idx, rk, scales, order, dropouts, seed, mask_x=False,
                            x_sorted=dys)
    dx = [M.lora_multi_matmul(dy, w_t, g, a.transpose(1, 2), idx, rk, None, order, dropouts, seed, x_sorted=dys)
          for _ in range(2)]
    fused = M.lora_multi_matmul(dy, w_t, g, a.transpose(1, 2), idx, rk, None, order, dropouts, seed)
    assert M._multi_matmul_prefill in launches
    for got in dx:
        assert_matches(got, fused.double(), None, dtype, "multi prefill dx, TMA tile against the pointer tile")
    base = dy.double() @ w.double()
    if kind != "none":
        assert not torch.equal(fused.double(), base)              # the LoRA term is there, masked in places
    with pytest.raises(ValueError, match="order"):
        M.lora_multi_matmul(x, w, xa, b, idx, rk, bias, None, x_sorted=xs)
    with pytest.raises(ValueError, match="order"):
        M.lora_multi_shrink(x, a, idx, rk, scales, None, x_sorted=xs)


def test_tma_sorted_rows_only_where_the_tma_tile_runs(monkeypatch):
    """No buffer at decode, with TMA off, or (compiled) below TMA_MIN_T tokens and off Hopper."""
    x, w = torch.zeros(M.DECODE_MAX_T + 9, 40, device=DEVICE), torch.zeros(72, 40, device=DEVICE)
    monkeypatch.setattr(K, "TMA_PREFILL", False)
    assert M.tma_sorted_rows(x, w) is None
    monkeypatch.setattr(K, "TMA_PREFILL", True)
    assert M.tma_sorted_rows(x[:M.DECODE_MAX_T], w) is None
    assert M.tma_sorted_rows(x, w) is not None
    odd = torch.zeros(x.shape[0], 37, device=DEVICE)                    # TMA copies rows of 16-byte multiples
    assert M.tma_sorted_rows(odd, torch.zeros(72, 37, device=DEVICE)) is None
    assert M.tma_sorted_rows(x, torch.zeros(40, 72, device=DEVICE)[:, ::2].t()) is None   # W of unit stride neither way
    monkeypatch.setattr(K, "TMA_PREFILL", None)
    if K.INTERPRETED or not HOPPER:
        assert M.tma_sorted_rows(torch.zeros(4 * M.TMA_MIN_T, 40, device=DEVICE), w) is None


def test_matmul_launches_as_the_shrinks_dependent_only_on_hopper():
    """Programmatic dependent launch (configs.PDL) needs compute capability 9+ and compiled kernels: elsewhere the
    matmul after the shrink is an ordinary launch."""
    x = torch.zeros(2, 3, device=DEVICE)
    assert M.wait_flags(False, x) == {"WAIT_PRIOR": False}
    if K.INTERPRETED or not HOPPER:
        assert M.wait_flags(True, x) == {"WAIT_PRIOR": False}
    else:
        assert M.wait_flags(True, x) == {"WAIT_PRIOR": True, "launch_pdl": True}


@pytest.mark.gpu
@pytest.mark.skipif(K.INTERPRETED or not HOPPER, reason="needs a Hopper GPU (griddepcontrol)")
@pytest.mark.parametrize("T", [16, 64, 200])
def test_dependent_matmul_matches_ordinary_launches(T, unsplit_shrinks):
    """The matmul launched as the shrink's programmatic dependent (it streams W0 while the shrink ends and waits
    for xa before its expand) gives what ordinary launches give, bit for bit: eager, and replayed from a CUDA
    graph with a new mapping written into the same buffers; also the grouped pair (shrinks unsplit, in one summation
    order: see unsplit_shrinks)."""
    from ptlm_engine.kernels import lora_grouped as G
    torch.manual_seed(T)
    S, d_in, d_out, dtype = 32, 4096, 4096, torch.bfloat16
    a, b, rk, scales = lora_slots64(S, d_in, d_out, [16] * S)
    a, b = a.to(DEVICE, dtype), b.to(DEVICE, dtype)
    x = torch.randn(T, d_in, device=DEVICE, dtype=dtype)
    w = (torch.randn(d_out, d_in, device=DEVICE) * d_in ** -0.5).to(dtype)
    idx = _mapping("random", T, S)
    order, _ = M.token_segments(idx, S)

    def pair(dependent):
        xa = M.lora_multi_shrink(x, a, idx, rk, scales, order)
        return M.lora_multi_matmul(x, w, xa, b, idx, rk, None, order, after_shrink=dependent)

    def grouped(dependent):
        xas = G.lora_grouped_multi_shrink(x, [a, a], idx, [rk, rk], [scales, scales], order)
        return torch.cat(G.lora_grouped_multi_matmul(x, [w, w[:1000]], xas, [b, b[:, :1000]], idx, [rk, rk],
                                                     order=order, after_shrink=dependent), 1)

    for run in (pair, grouped):
        want = run(False)
        assert torch.equal(run(True), want)
        run(True)                                         # tuned and compiled before the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got = run(True)
        idx.copy_(_mapping("random", T, S))
        order.copy_(M.token_segments(idx, S)[0])
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(got, run(False))

@pytest.mark.gpu
@pytest.mark.parametrize("path", ["decode", "onepass", "tma"])
def test_multi_matmul_accumulates_into_out(path, monkeypatch):
    """accumulate=True adds the product (the backward dx form: output dropout) to out's values, on each path; a
    key's first call (which tunes) and the next one alike."""
    if path == "tma" and not (K.INTERPRETED or HOPPER):
        pytest.skip("needs TRITON_INTERPRET=1 or a Hopper GPU")
    monkeypatch.setattr(K, "TMA_PREFILL", path == "tma")
    torch.manual_seed(13)
    dtype = torch.float32 if K.INTERPRETED else torch.bfloat16
    T = 13 if path == "decode" else M.DECODE_MAX_T + 9
    d_in, d_out, ranks = 40, 72, [8, 3, 16]
    S = len(ranks)
    a, b, rk, scales = lora_slots64(S, d_in, d_out, ranks)
    a, b = a.to(DEVICE, dtype), b.to(DEVICE, dtype)
    idx = _mapping("random", T, S)
    order = None if path == "decode" else M.token_segments(idx, S)[0]
    x = torch.randn(T, d_in, device=DEVICE, dtype=dtype)
    w = torch.randn(d_out, d_in, device=DEVICE, dtype=dtype) * d_in ** -0.5
    xs = M.tma_sorted_rows(x, w) if path == "tma" else None
    assert (xs is not None) == (path == "tma")
    xa = M.lora_multi_shrink(x, a, idx, rk, scales, order, x_sorted=xs)
    dropouts, seed = torch.tensor([0.3, 0.0, 0.5], device=DEVICE), torch.tensor([7], device=DEVICE)
    for _ in range(2):        # the first accumulating call of the key tunes (into a temporary)
        start = torch.randn(T, d_out, device=DEVICE, dtype=dtype)
        out = start.clone()
        M.lora_multi_matmul(x, w, xa, b, idx, rk, None, order, dropouts, seed, out=out, accumulate=True, x_sorted=xs)
        want = M.lora_multi_matmul(x, w, xa, b, idx, rk, None, order, dropouts, seed, x_sorted=xs)
        assert_matches(out, start.double() + want.double(), None, dtype, f"accumulated, {path}")
    with pytest.raises(ValueError, match="out"):
        M.lora_multi_matmul(x, w, xa, b, idx, rk, accumulate=True)
