"""The prefix-attention kernels against a float64 reference: forward and backward launchers on odd shapes,
grouped-query heads, a KV cache (Lq < Lk), per-row prefix lengths (0 and P included), padded keys, a query
that sees no key, no causal mask, strided inputs and a shared (batch stride 0) prefix; poisoned outputs. Every
backward test runs both dQ modes: the fused pass with atomic dQ and the split (deterministic) passes.

On the CPU these run under TRITON_INTERPRET=1 on small shapes in fp32 and fp16 (the interpreter computes bf16
wrongly); the `gpu` test repeats them at realistic bf16 shapes.
"""
import pytest
import torch

from ptlm_engine import reference
from ptlm_engine.kernels import prefix_attention as K
from tests.helpers import CUDA, DEVICE, DTYPES, assert_matches, needs_triton, rand

pytestmark = needs_triton
GRADS = ["dq", "dk", "dv", "dprefix_k", "dprefix_v"]


def _inputs(B, Hq, Hkv, Lq, Lk, P, D, dtype, lengths=None, pad_left=None, hf_layout=False, shared=False):
    """q, k, v (HF's (B, L, H, D).transpose(1, 2) views with hf_layout), prefix_k / prefix_v (expanded views of
    one prefix with shared), prefix_lengths, key_padding_mask (pad_left[b] padded keys at the left of row b)."""
    if hf_layout:
        q, k, v = (rand(B, L, H, D, dtype=dtype).transpose(1, 2) for L, H in ((Lq, Hq), (Lk, Hkv), (Lk, Hkv)))
    else:
        q, k, v = rand(B, Hq, Lq, D, dtype=dtype), rand(B, Hkv, Lk, D, dtype=dtype), rand(B, Hkv, Lk, D, dtype=dtype)
    pk = pv = None
    if P is not None:
        pk, pv = (rand(1 if shared else B, Hkv, P, D, dtype=dtype).expand(B, -1, -1, -1) for _ in range(2))
    plen = None if lengths is None else torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    kpm = None
    if pad_left is not None:
        kpm = torch.arange(Lk, device=DEVICE)[None, :] >= torch.tensor(pad_left, device=DEVICE)[:, None]
    return (q, k, v, pk, pv), plen, kpm


def _reference_grads(tensors, plen, kpm, causal, scale, do, dtype=torch.float64):
    """The reference's output and (per-row) gradients with its inputs cast to `dtype`."""
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in tensors]
    o = reference.prefix_attention(*leaves, plen, causal=causal, key_padding_mask=kpm, scale=scale)
    o.backward(do.to(dtype))
    return o, [None if t is None else t.grad for t in leaves]


def _check(tensors, plen, kpm, causal, dtype, dq_mode, scale=None):
    q, k, v, pk, pv = tensors
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.full(q.shape, float("nan"), device=DEVICE, dtype=dtype)      # poisoned: every element written
    o, lse = K.prefix_attention_fwd(q, k, v, pk, pv, plen, kpm, causal, scale, out=out)
    assert o is out and lse.shape == q.shape[:3] and lse.dtype == torch.float32
    do = rand(*q.shape, dtype=dtype)
    o64, grads64 = _reference_grads(tensors, plen, kpm, causal, scale, do)
    o_lp, grads_lp = _reference_grads(tensors, plen, kpm, causal, scale, do, dtype)
    assert_matches(o, o64, o_lp, dtype, "o")
    poisoned = tuple(torch.full(t.shape if t is not None else (0,), float("nan"), device=DEVICE, dtype=dtype)
                     for t in tensors)
    grads = K.prefix_attention_bwd(do, q, k, v, pk, pv, plen, kpm, o, lse, causal, scale, out=poisoned,
                                   dq_mode=dq_mode)
    assert all(g is t for g, t in zip(grads, poisoned))
    for name, g, g64, g_lp in zip(GRADS, grads, grads64, grads_lp):
        if g64 is None:  # no prefix: empty gradients
            assert g.shape == (0,), name
            continue
        assert g.shape == g64.shape and g.dtype == dtype, name
        assert_matches(g, g64, g_lp, dtype, name)
    return o, grads


@pytest.mark.parametrize("dq_mode", K.DQ_MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [
    dict(B=2, Hq=4, Hkv=2, Lq=13, Lk=13, P=5, D=16),
    dict(B=2, Hq=4, Hkv=2, Lq=3, Lk=11, P=5, D=24, lengths=[0, 5]),                # KV cache, odd head dim
    dict(B=3, Hq=2, Hkv=1, Lq=1, Lk=19, P=21, D=16, lengths=[21, 3, 17]),          # decode, ragged prefix
    dict(B=2, Hq=2, Hkv=2, Lq=13, Lk=13, P=4, D=16, lengths=[2, 4], pad_left=[5, 0], hf_layout=True),
    dict(B=1, Hq=2, Hkv=1, Lq=37, Lk=45, P=19, D=16, lengths=[19]),               # several blocks of 16 each
], ids=["self", "kv_cache", "decode", "padded_hf_layout", "multi_block"])
def test_matches_float64(case, dtype, dq_mode):
    torch.manual_seed(case["Lq"] * 31 + case["P"])
    case = dict(case)  # the parametrized dict is shared by every dtype and mode: pop from a copy
    lengths, pad_left, hf_layout = (case.pop(k, None) for k in ("lengths", "pad_left", "hf_layout"))
    tensors, plen, kpm = _inputs(**case, dtype=dtype, lengths=lengths, pad_left=pad_left, hf_layout=bool(hf_layout))
    _check(tensors, plen, kpm, causal=True, dtype=dtype, dq_mode=dq_mode)


@pytest.mark.parametrize("dq_mode", K.DQ_MODES)
def test_encoder_without_causal_mask_or_prefix(dq_mode):
    torch.manual_seed(3)
    tensors, _, kpm = _inputs(2, 3, 3, 14, 14, None, 16, torch.float32, pad_left=[0, 9])
    _, grads = _check(tensors, None, kpm, causal=False, dtype=torch.float32, dq_mode=dq_mode, scale=0.3)
    assert grads[3].shape == (0,) and grads[4].shape == (0,)


@pytest.mark.parametrize("dq_mode", K.DQ_MODES)
def test_query_that_sees_no_key_outputs_zero_with_zero_gradients(dq_mode):
    """Row 1: every key padded and no prefix (length 0) -> output 0, finite zero gradients, lse +inf."""
    torch.manual_seed(4)
    tensors, plen, kpm = _inputs(2, 2, 1, 6, 9, 3, 16, torch.float32, lengths=[3, 0], pad_left=[2, 9])
    o, grads = _check(tensors, plen, kpm, causal=True, dtype=torch.float32, dq_mode=dq_mode)
    assert torch.equal(o[1], torch.zeros_like(o[1]))
    _, lse = K.prefix_attention_fwd(*tensors, plen, kpm, True, 0.25)
    assert torch.isinf(lse[1]).all() and torch.isfinite(lse[0]).all()
    for name, g in zip(GRADS, grads):
        assert torch.equal(g[1], torch.zeros_like(g[1])), name


@pytest.mark.parametrize("dq_mode", K.DQ_MODES)
def test_shared_prefix_is_read_in_place(dq_mode):
    """An expanded view (batch stride 0) is read as is; the per-row gradients match the reference's."""
    torch.manual_seed(5)
    tensors, plen, _ = _inputs(3, 4, 2, 9, 9, 6, 16, torch.float32, lengths=[6, 1, 0], shared=True)
    assert tensors[3].stride(0) == 0
    _check(tensors, plen, None, causal=True, dtype=torch.float32, dq_mode=dq_mode)


def test_dq_mode_follows_the_determinism_switch(monkeypatch):
    """dq_mode=None takes the fused (atomic) backward, or the split passes under
    torch.use_deterministic_algorithms(True); an explicit mode wins; an unknown one is a ValueError."""
    torch.manual_seed(6)
    (q, k, v, pk, pv), plen, _ = _inputs(1, 2, 1, 5, 5, 3, 16, torch.float32, lengths=[2])
    o, lse = K.prefix_attention_fwd(q, k, v, pk, pv, plen, None, True, 0.25)
    launched = []
    for name in ("_prefix_attn_bwd_fused", "_prefix_attn_dkdv", "_prefix_attn_dq"):
        launcher = getattr(K, name)
        monkeypatch.setattr(launcher, "launch", lambda *a, _name=name, _launch=launcher.launch, **kw:
                            (launched.append(_name), _launch(*a, **kw)))
    bwd = lambda **kw: K.prefix_attention_bwd(torch.randn_like(q), q, k, v, pk, pv, plen, None, o, lse, True, 0.25,
                                              **kw)
    bwd()
    assert launched == ["_prefix_attn_bwd_fused"]
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        launched.clear()
        bwd()
        assert launched == ["_prefix_attn_dkdv", "_prefix_attn_dq"]
        launched.clear()
        bwd(dq_mode="atomic")
        assert launched == ["_prefix_attn_bwd_fused"]
    finally:
        torch.use_deterministic_algorithms(deterministic)
    with pytest.raises(ValueError, match=r"dq_mode: expected one of \('atomic', 'split'\) or None, got 'fused'"):
        bwd(dq_mode="fused")


@pytest.fixture
def tma_launches(monkeypatch):
    """Forces the TMA path (K.TMA = True: any dtype, also under the interpreter, where dQ still adds with
    pointer atomics) and records each launch's TMA flag."""
    monkeypatch.setattr(K, "TMA", True)
    flags = []
    for launcher in (K._prefix_attn_fwd, K._prefix_attn_bwd_fused, K._prefix_attn_dkdv):
        monkeypatch.setattr(launcher, "launch", lambda *a, _launch=launcher.launch, **kw:
                            (flags.append(kw["TMA"]), _launch(*a, **kw))[1])
    return flags


@pytest.mark.parametrize("dq_mode", K.DQ_MODES)
@pytest.mark.parametrize("case", [
    dict(B=2, Hq=4, Hkv=2, Lq=13, Lk=13, P=5, D=16),
    dict(B=2, Hq=2, Hkv=2, Lq=13, Lk=13, P=4, D=16, lengths=[2, 4], pad_left=[5, 0], hf_layout=True),
    dict(B=1, Hq=2, Hkv=1, Lq=37, Lk=45, P=19, D=16, lengths=[19], hf_layout=True),
    dict(B=2, Hq=4, Hkv=2, Lq=3, Lk=11, P=5, D=24, lengths=[0, 5]),          # the blocks zero-filled past D
    dict(B=2, Hq=3, Hkv=3, Lq=21, Lk=21, P=None, D=32, scale=-0.3),           # negative scale, no prefix
], ids=["self", "padded_hf_layout", "multi_block_hf_layout", "kv_cache_odd_head_dim", "negative_scale"])
def test_tma_path_matches_float64(case, dq_mode, tma_launches):
    """q, k, v, dO (and on a GPU the dQ sums) through (B, H, L, D) descriptors: the last block of each head
    is clipped by the copy engine, not by the next head's rows; HF's transposed layout keeps its strides."""
    torch.manual_seed(case["Lq"] + case["D"])
    case = dict(case)
    lengths, pad_left, hf_layout, scale = (case.pop(k, None) for k in ("lengths", "pad_left", "hf_layout", "scale"))
    tensors, plen, kpm = _inputs(**case, dtype=torch.float32, lengths=lengths, pad_left=pad_left,
                                 hf_layout=bool(hf_layout))
    _check(tensors, plen, kpm, causal=True, dtype=torch.float32, dq_mode=dq_mode, scale=scale)
    assert tma_launches == [True, True]


def test_tma_path_falls_back_where_a_layout_does_not_qualify(tma_launches):
    """A q whose row stride is not a multiple of 16 bytes (25 halves) keeps the pointer loads, forward and
    backward; a k like it, the forward only (the backward's descriptors are q's and dO's)."""
    torch.manual_seed(8)
    q, k, v, pk, pv = _inputs(1, 2, 1, 7, 7, 3, 16, torch.float16)[0]
    misaligned = rand(1, 2, 7, 25, dtype=torch.float16)[..., :16]
    _check((misaligned, k, v, pk, pv), None, None, causal=True, dtype=torch.float16, dq_mode="atomic")
    _check((q, misaligned[:, :1], v, pk, pv), None, None, causal=True, dtype=torch.float16, dq_mode="split")
    assert tma_launches == [False, False, False, True]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dq_mode", K.DQ_MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Lq,D", [(1024, 128), (1, 128), (1000, 64)])
def test_realistic_shapes(Lq, D, dtype, dq_mode):
    torch.manual_seed(Lq + D)
    tensors, plen, kpm = _inputs(2, 32, 32 if D == 128 else 8, Lq, 1024, 64, D, dtype, lengths=[64, 17],
                                 pad_left=[0, 100], hf_layout=True)
    _check(tensors, plen, kpm, causal=True, dtype=dtype, dq_mode=dq_mode)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dq_mode", K.DQ_MODES)
def test_pointer_path_at_a_realistic_shape(dq_mode, monkeypatch):
    """On Hopper the kernels take TMA by default; the pointer loads (PTLM_PREFIX_TMA=0, other GPUs) too."""
    monkeypatch.setattr(K, "TMA", False)
    torch.manual_seed(10)
    tensors, plen, kpm = _inputs(2, 32, 8, 1000, 1024, 64, 128, torch.bfloat16, lengths=[64, 17],
                                 pad_left=[0, 100], hf_layout=True)
    _check(tensors, plen, kpm, causal=True, dtype=torch.bfloat16, dq_mode=dq_mode)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_both_dq_modes_at_a_bf16_llama_shape_and_split_reproduces_bitwise():
    """Batch 2, 32 q heads over 8 kv heads x 128, L = 2048, a shared prefix of 64 with mixed lengths, causal,
    bf16: both dQ modes within 2x PyTorch's own bf16 error of float64; the split passes reproduce bitwise."""
    torch.manual_seed(9)
    tensors, plen, _ = _inputs(2, 32, 8, 2048, 2048, 64, 128, torch.bfloat16, lengths=[64, 23], hf_layout=True,
                               shared=True)
    for dq_mode in K.DQ_MODES:
        _check(tensors, plen, None, causal=True, dtype=torch.bfloat16, dq_mode=dq_mode)
    q, k, v, pk, pv = tensors
    o, lse = K.prefix_attention_fwd(q, k, v, pk, pv, plen, None, True, 128 ** -0.5)
    do = rand(*q.shape, dtype=torch.bfloat16)
    runs = [K.prefix_attention_bwd(do, q, k, v, pk, pv, plen, None, o, lse, True, 128 ** -0.5, dq_mode="split")
            for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))
