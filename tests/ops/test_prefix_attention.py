"""The prefix-attention op (custom ops + autograd) against a float64 reference: values and gradients through
the functional call with HF-layout (transposed) inputs and a shared prefix expanded over the batch, a query
that sees no key, edge shapes and masks (grouped-query ratios, odd head dims, Lq < Lk, P > L, no or an empty
prefix, fully padded rows, per-row lengths out of range, negative scales, fp16 logits in the hundreds), the
reference's own semantics, bad input, both dQ modes of the backward, backends, torch.library checks,
torch.compile."""
import zlib

import pytest
import torch
import torch.nn.functional as F

from ptlm_engine import reference
from ptlm_engine.functional import prefix_attention
from ptlm_engine.kernels import prefix_attention as K
from ptlm_engine.ops.prefix_attention import prefix_attention_fwd, prefix_attention_op
from tests.helpers import (CUDA, DEVICE, DTYPES, assert_matches, assert_no_host_sync, captured, far_apart_rows,
                           needs_triton)


def _inputs(B, Hq, Hkv, Lq, Lk, P, D, dtype, shared=True):
    """Leaves: q, k, v in HF's layout ((B, L, H, D) storage seen as (B, H, L, D)), prefix_k, prefix_v of one
    shared prefix (1, Hkv, P, D); the op gets them expanded over the batch."""
    g = lambda *s: torch.randn(*s, dtype=torch.float64).to(DEVICE, dtype)
    q = g(B, Lq, Hq, D).requires_grad_()
    k, v = (g(B, Lk, Hkv, D).requires_grad_() for _ in range(2))
    pk, pv = (g(1 if shared else B, Hkv, P, D).requires_grad_() for _ in range(2))
    return q, k, v, pk, pv


def _run(fn, leaves, do, **kw):
    """Forward through fn as an HF attention would call it, backward of do; the output in (B, Lq, Hq, D)."""
    q, k, v, pk, pv = leaves
    B = q.shape[0]
    o = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), pk.expand(B, -1, -1, -1),
           pv.expand(B, -1, -1, -1), **kw).transpose(1, 2)
    o.backward(do)
    return o, [t.grad for t in leaves]


def _leaves(leaves, dtype):
    return [t.detach().to(dtype).requires_grad_() for t in leaves]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_backward_matches_float64(dtype):
    torch.manual_seed(1)
    B, Lq, Lk = 3, 5, 12
    leaves = _inputs(B, 4, 2, Lq, Lk, 7, 24, dtype)
    padded_from = torch.tensor([0, 4, 11], device=DEVICE)
    kw = dict(prefix_lengths=torch.tensor([7, 0, 3], dtype=torch.int32, device=DEVICE),
              key_padding_mask=torch.arange(Lk, device=DEVICE)[None, :] >= padded_from[:, None], scale=0.3)
    do = torch.randn(B, Lq, 4, 24, device=DEVICE, dtype=dtype)
    o, grads = _run(prefix_attention, leaves, do, **kw)
    o64, grads64 = _run(reference.prefix_attention, _leaves(leaves, torch.float64), do.double(), **kw)
    o_lp, grads_lp = _run(reference.prefix_attention, _leaves(leaves, dtype), do, **kw)
    assert o.dtype == dtype
    assert_matches(o, o64, o_lp, dtype, "o")
    for name, g, g64, g_lp in zip(["dq", "dk", "dv", "dprefix_k", "dprefix_v"], grads, grads64, grads_lp):
        assert g.shape == g64.shape and g.dtype == dtype, name          # the shared prefix's grad: rows summed
        assert_matches(g, g64, g_lp, dtype, name)


@needs_triton
@pytest.mark.parametrize("dq_mode", K.DQ_MODES)
def test_rows_far_apart_in_memory(dq_mode):
    """q, k, v and dO with token rows 2^31 elements apart (as a sequence whose L · H · D passes 2^31 in HF's
    layout): 64-bit row offsets in the forward and in each backward."""
    torch.manual_seed(2)
    Lq, Lk, H, D = 5, 9, 2, 16
    far = lambda t: far_apart_rows(t.detach().reshape(t.shape[1], -1)).view(t.shape).requires_grad_()
    leaves = list(_inputs(1, H, H, Lq, Lk, 3, D, torch.float16))
    leaves[:3] = [far(t) for t in leaves[:3]]
    do = far(torch.randn(1, Lq, H, D, device=DEVICE, dtype=torch.float16)).detach()
    op = lambda q, k, v, pk, pv, **kw: prefix_attention_op(q, k, v, pk, pv, None, True, None, 0.3, dq_mode=dq_mode)
    o, grads = _run(op, leaves, do)
    o64, grads64 = _run(reference.prefix_attention, _leaves(leaves, torch.float64), do.double(), scale=0.3)
    o_lp, grads_lp = _run(reference.prefix_attention, _leaves(leaves, torch.float16), do.contiguous(), scale=0.3)
    assert_matches(o, o64, o_lp, torch.float16, "o")
    for name, g, g64, g_lp in zip(["dq", "dk", "dv", "dprefix_k", "dprefix_v"], grads, grads64, grads_lp):
        assert_matches(g, g64, g_lp, torch.float16, name)


@needs_triton
def test_query_that_sees_no_key_gives_zero_and_finite_gradients():
    torch.manual_seed(2)
    leaves = _inputs(2, 2, 2, 4, 4, 3, 16, torch.float32, shared=False)
    kpm = torch.tensor([[True] * 4, [False] * 4], device=DEVICE)
    plen = torch.tensor([3, 0], dtype=torch.int32, device=DEVICE)
    do = torch.randn(2, 4, 2, 16, device=DEVICE)
    o, grads = _run(prefix_attention, leaves, do, prefix_lengths=plen, key_padding_mask=kpm)
    assert torch.equal(o[1], torch.zeros_like(o[1]))
    assert all(torch.isfinite(g).all() and torch.equal(g[1], torch.zeros_like(g[1])) for g in grads)
    o_ref, grads_ref = _run(reference.prefix_attention, _leaves(leaves, torch.float32), do, prefix_lengths=plen,
                            key_padding_mask=kpm)
    assert torch.equal(o_ref[1], torch.zeros_like(o_ref[1]))
    assert all(torch.isfinite(g).all() and torch.equal(g[1], torch.zeros_like(g[1])) for g in grads_ref)


EDGE_CASES = {
    # name: (B, Hq, Hkv, Lq, Lk, P (None: no prefix), D, keywords of the call, lengths and padding as lists)
    "decode_gqa4_d96_mixed_lengths": (2, 4, 1, 1, 17, 3, 96, dict(prefix_lengths=[1, 3])),
    "gqa8_d112_P_larger_than_L": (1, 8, 1, 3, 17, 20, 112, {}),
    "no_prefix_odd_L17_d64": (2, 2, 2, 17, 17, None, 64, {}),
    "empty_prefix_P0": (1, 1, 1, 3, 3, 0, 16, {}),
    "bidirectional_d8_Lq_lt_Lk": (2, 2, 2, 5, 9, 2, 8, dict(causal=False)),
    "d80_zero_and_full_lengths": (2, 2, 1, 3, 3, 5, 80, dict(prefix_lengths=[0, 5])),
    "d256_L1": (1, 1, 1, 1, 1, 1, 256, {}),
    "all_keys_padded_prefix_still_seen": (2, 2, 1, 4, 6, 3, 16, dict(
        prefix_lengths=[2, 3], key_padding_mask=[[False] * 6, [True, False, True, False, True, True]])),
    "lengths_out_of_range_clamped": (2, 2, 1, 5, 5, 4, 16, dict(prefix_lengths=[7, -2])),
    "negative_scale": (1, 1, 1, 3, 3, 2, 16, dict(scale=-0.7)),
    # gradients too, in both dQ modes
    "gqa4_d80_P20_lengths": (2, 4, 1, 5, 9, 20, 80, dict(prefix_lengths=[20, 3])),
    "gqa8_d96_padding": (2, 8, 1, 3, 3, 2, 96, dict(prefix_lengths=[0, 2],
                                                   key_padding_mask=[[False] * 3, [True, False, True]])),
    "negative_scale_bidirectional": (1, 2, 2, 17, 17, 3, 16, dict(scale=-0.9, causal=False)),
}
GRAD_CASES = ["gqa4_d80_P20_lengths", "gqa8_d96_padding", "negative_scale_bidirectional"]


def _edge_case(name):
    """EDGE_CASES[name]: fp32 leaves as _inputs makes them (a prefix per row; None where P is None) and the
    call's keywords with lengths (int32) and padding (bool) on DEVICE."""
    B, Hq, Hkv, Lq, Lk, P, D, kw = EDGE_CASES[name]
    torch.manual_seed(zlib.crc32(name.encode()))
    leaves = list(_inputs(B, Hq, Hkv, Lq, Lk, P or 0, D, torch.float32, shared=False))
    if P is None:
        leaves[3:] = [None, None]
    kw = dict(kw)
    if "prefix_lengths" in kw:
        kw["prefix_lengths"] = torch.tensor(kw["prefix_lengths"], dtype=torch.int32, device=DEVICE)
    if "key_padding_mask" in kw:
        kw["key_padding_mask"] = torch.tensor(kw["key_padding_mask"], device=DEVICE)
    return leaves, kw


@needs_triton
@pytest.mark.parametrize("name", [name for name in EDGE_CASES if name not in GRAD_CASES])
def test_edge_shapes_and_masks_match_float64(name):
    """Grouped-query ratios 4 and 8, head dims 8 / 64 / 80 / 96 / 112 / 256, a decode step and Lq < Lk without
    the causal mask, more prefix entries than tokens, no prefix or an empty one, per-row lengths 0, P and out
    of range (clamped to [0, P]), a negative scale: SDPA's semantics over [prefix ; keys], as the reference
    (itself checked against SDPA below) computes them in float64. A row whose keys are all padded still
    attends to its prefix, as PEFT's attention mask extended by P leading ones makes it."""
    leaves, kw = _edge_case(name)
    q, k, v, pk, pv = (None if t is None else t.detach() for t in leaves)
    args = [q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), pk, pv]
    o = prefix_attention(*args, **kw)
    o64 = reference.prefix_attention(*(None if a is None else a.double() for a in args), **kw)
    assert o.shape == o64.shape and o.is_contiguous()
    assert_matches(o, o64, None, torch.float32, name)


@needs_triton
@pytest.mark.parametrize("dq_mode", K.DQ_MODES)
@pytest.mark.parametrize("name", GRAD_CASES)
def test_gradients_on_edge_shapes_match_float64(name, dq_mode):
    """fp32 output and gradients of q, k, v and the per-row prefix from each backward (fused with atomic dQ,
    split) against the reference in float64: grouped-query heads summing into one kv head, P > Lk with
    per-row lengths, a row with no prefix and every key padded, a negative scale without the causal mask."""
    leaves, kw = _edge_case(name)
    do = torch.randn_like(leaves[0])
    o, grads = _run(prefix_attention, leaves, do, dq_mode=dq_mode, **kw)
    o64, grads64 = _run(reference.prefix_attention, _leaves(leaves, torch.float64), do.double(), **kw)
    assert_matches(o, o64, None, torch.float32, "o")
    for grad_name, g, g64 in zip(["dq", "dk", "dv", "dprefix_k", "dprefix_v"], grads, grads64):
        assert_matches(g, g64, None, torch.float32, grad_name)


@needs_triton
def test_fp16_logits_in_the_hundreds_within_sdpas_own_error():
    """fp16 q, keys and prefix keys of magnitude ~20 (logits in the hundreds, a one-hot softmax): the output
    stays finite and its error against float64 is at most 2x that of torch's fp16 SDPA over the concatenation
    with an explicit mask."""
    torch.manual_seed(11)
    B, H, L, P, D = 1, 2, 5, 2, 16
    q, k, v, pk, pv = (magnitude * t.detach() for magnitude, t in
                       zip((20, 20, 1, 20, 1), _inputs(B, H, H, L, L, P, D, torch.float16, shared=False)))
    args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), pk, pv)
    o = prefix_attention(*args)
    o64 = reference.prefix_attention(*(a.double() for a in args))
    mask = torch.cat([torch.ones(L, P, dtype=torch.bool), torch.ones(L, L, dtype=torch.bool).tril()], 1)
    o_sdpa = F.scaled_dot_product_attention(args[0], torch.cat([pk, args[1]], 2), torch.cat([pv, args[2]], 2),
                                            attn_mask=mask.to(DEVICE))
    assert_matches(o, o64, o_sdpa, torch.float16, "o")


def test_reference_equals_sdpa_over_the_concatenation():
    """The reference's definition: causal attention over [prefix ; sequence] with the prefix always seen, and
    a KV cache's queries at the last Lq positions; lengths (clamped to [0, P]) and padding drop keys from the
    softmax, and a row whose keys are all padded attends to its prefix alone."""
    torch.manual_seed(3)
    B, H, Lq, Lk, P, D = 3, 2, 3, 8, 4, 16
    q, k, v = torch.randn(B, H, Lq, D), torch.randn(B, H, Lk, D), torch.randn(B, H, Lk, D)
    pk, pv = torch.randn(B, H, P, D), torch.randn(B, H, P, D)
    plen, kpm = torch.tensor([7, 2, -2]), torch.arange(Lk)[None, :] >= torch.tensor([0, 8, 3])[:, None]
    allowed = torch.cat([(torch.arange(P)[None, :] < plen[:, None])[:, None, None, :].expand(B, 1, Lq, P),
                         torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq)[None, None] & kpm[:, None, None, :]], -1)
    want = F.scaled_dot_product_attention(q, torch.cat([pk, k], 2), torch.cat([pv, v], 2), attn_mask=allowed)
    got = reference.prefix_attention(q, k, v, pk, pv, plen, key_padding_mask=kpm)
    torch.testing.assert_close(got, want)
    assert torch.equal(reference.prefix_attention(q, k, v, pk[:, :, :0], pv[:, :, :0]),
                       reference.prefix_attention(q, k, v))


@pytest.mark.parametrize("bad, message", [
    (dict(q=(2, 4, 5)), r"q: expected shape \(B, Hq, Lq, D\)"),
    (dict(k=(2, 2, 3, 16), v=(2, 2, 3, 16)), r"k: expected shape \(2, Hkv, Lk, 16\) with Lk >= 5"),
    (dict(k=(2, 3, 7, 16), v=(2, 3, 7, 16)), r"k: expected a number of heads dividing 4"),
    (dict(v=(2, 2, 7, 8)), r"v: expected shape \(2, 2, 7, 16\)"),
    (dict(pk=(2, 2, 3, 8), pv=(2, 2, 3, 8)), r"prefix_k: expected shape \(2, 2, P, 16\)"),
    (dict(pv=(2, 2, 4, 16)), r"prefix_v: expected shape \(2, 2, 3, 16\)"),
    (dict(pv=None), r"prefix_k, prefix_v: expected both or neither"),
    (dict(plen=(3,)), r"prefix_lengths: expected shape \(2,\) of int32"),
    (dict(kpm=(2, 5)), r"key_padding_mask: expected shape \(2, 7\) of bool"),
])
def test_bad_input_raises_value_error(bad, message):
    shapes = dict(q=(2, 4, 5, 16), k=(2, 2, 7, 16), v=(2, 2, 7, 16), pk=(2, 2, 3, 16), pv=(2, 2, 3, 16), plen=(2,),
                  kpm=(2, 7)) | bad
    t = {name: None if s is None else torch.randn(*s, device=DEVICE) for name, s in shapes.items()}
    plen = None if t["plen"] is None else t["plen"].to(torch.int32)
    kpm = None if t["kpm"] is None else t["kpm"] > 0
    with pytest.raises(ValueError, match=message):
        prefix_attention(t["q"], t["k"], t["v"], t["pk"], t["pv"], plen, key_padding_mask=kpm)


def test_bad_dtype_raises_value_error():
    q, k = torch.randn(1, 2, 3, 16, device=DEVICE), torch.randn(1, 2, 3, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"v: expected dtype torch.float32"):
        prefix_attention(q, k, k.half())
    with pytest.raises(ValueError, match=r"key_padding_mask: expected shape \(1, 3\) of bool"):
        prefix_attention(q, k, k, key_padding_mask=torch.ones(1, 3, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match=r"prefix_lengths: given without prefix_k"):
        prefix_attention(q, k, k, prefix_lengths=torch.ones(1, dtype=torch.int32, device=DEVICE))


@needs_triton
@pytest.mark.parametrize("dq_mode", K.DQ_MODES)
def test_dq_mode_reaches_the_backward(dq_mode, monkeypatch):
    """The op's dq_mode keyword picks the backward's launchers (both match float64); an unknown mode raises."""
    torch.manual_seed(9)
    leaves = _inputs(2, 2, 1, 5, 7, 3, 16, torch.float32)
    plen = torch.tensor([3, 1], dtype=torch.int32, device=DEVICE)
    launched = []
    for name in ("_prefix_attn_bwd_fused", "_prefix_attn_dq"):
        launcher = getattr(K, name)
        monkeypatch.setattr(launcher, "launch", lambda *a, _name=name, _launch=launcher.launch, **kw:
                            (launched.append(_name), _launch(*a, **kw)))
    op = lambda q, k, v, pk, pv, **kw: prefix_attention_op(q, k, v, pk, pv, plen, True, None, None, dq_mode=dq_mode)
    do = torch.randn(2, 5, 2, 16, device=DEVICE)
    o, grads = _run(op, leaves, do)
    assert launched == ["_prefix_attn_bwd_fused" if dq_mode == "atomic" else "_prefix_attn_dq"]
    _, grads64 = _run(reference.prefix_attention, _leaves(leaves, torch.float64), do.double(), prefix_lengths=plen)
    for name, g, g64 in zip(["dq", "dk", "dv", "dprefix_k", "dprefix_v"], grads, grads64):
        assert_matches(g, g64, None, torch.float32, name)
    with pytest.raises(ValueError, match=r"dq_mode: expected one of \('atomic', 'split'\) or None, got 'x'"):
        prefix_attention_op(*(t.transpose(1, 2) for t in leaves[:3]), None, None, None, True, None, None,
                            dq_mode="x")


@needs_triton
def test_backends_and_inference_path_agree(monkeypatch):
    torch.manual_seed(4)
    q, k, v, pk, pv = (t.detach() for t in _inputs(2, 2, 1, 6, 6, 3, 16, torch.float32, shared=False))
    args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), pk, pv,
            torch.tensor([1, 3], device=DEVICE))                 # int64 lengths are accepted
    o64 = reference.prefix_attention(*(a.double() if a.is_floating_point() else a for a in args))
    assert_matches(prefix_attention(*args), o64, None, torch.float32, "inference path")
    assert_matches(prefix_attention(*(a.double() if a.is_floating_point() else a for a in args)), o64, None,
                   torch.float64, "float64 runs the reference")
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    assert_matches(prefix_attention(*args), o64, None, torch.float32, "reference backend")


@needs_triton
def test_custom_op_passes_opcheck():
    torch.manual_seed(5)
    q, k, v, pk, pv = _inputs(2, 4, 2, 3, 7, 5, 16, torch.float32, shared=False)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    plen = torch.tensor([5, 2], dtype=torch.int32, device=DEVICE)
    kpm = torch.tensor([[True] * 7, [False] * 2 + [True] * 5], device=DEVICE)
    torch.library.opcheck(prefix_attention_fwd, (q, k, v, pk, pv, plen, kpm, True, 0.25, None))
    torch.library.opcheck(prefix_attention_fwd, (q, k, v, None, None, None, None, False, 0.25, "split"),
                          test_utils=("test_schema", "test_faketensor"))


@needs_triton
def test_torch_compile_fullgraph():
    torch.manual_seed(6)
    leaves = _inputs(2, 2, 2, 5, 5, 3, 16, torch.float32)
    do = torch.randn(2, 5, 2, 16, device=DEVICE)
    compiled = torch.compile(prefix_attention, backend="aot_eager", fullgraph=True)
    o, grads = _run(compiled, leaves, do)
    o64, grads64 = _run(reference.prefix_attention, _leaves(leaves, torch.float64), do.double())
    assert_matches(o, o64, None, torch.float32, "compiled o")
    for g, g64 in zip(grads, grads64):
        assert_matches(g, g64, None, torch.float32, "compiled grads")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_bf16_realistic_shapes_within_sdpas_own_error():
    """B=2, 32 heads x 128, L=1024, P=64 mixed lengths: the op's bf16 error against float64 is at most 2x that
    of PyTorch SDPA in bf16 over the concatenation with an explicit mask, forward and backward."""
    torch.manual_seed(7)
    B, H, L, P, D = 2, 32, 1024, 64, 128
    leaves = _inputs(B, H, H, L, L, P, D, torch.bfloat16, shared=False)
    plen = torch.tensor([64, 17], dtype=torch.int32, device=DEVICE)
    do = torch.randn(B, L, H, D, device=DEVICE, dtype=torch.bfloat16)

    def sdpa(q, k, v, pk, pv, prefix_lengths):
        seen = (torch.arange(P, device=DEVICE)[None, :] < prefix_lengths[:, None])[:, None, None, :]
        causal = torch.ones(L, L, dtype=torch.bool, device=DEVICE).tril()[None, None]
        mask = torch.cat([seen.expand(B, 1, L, P), causal.expand(B, 1, L, L)], -1)
        return F.scaled_dot_product_attention(q, torch.cat([pk, k], 2), torch.cat([pv, v], 2), attn_mask=mask)

    o, grads = _run(prefix_attention, leaves, do, prefix_lengths=plen)
    o64, grads64 = _run(reference.prefix_attention, _leaves(leaves, torch.float64), do.double(), prefix_lengths=plen)
    o_sdpa, grads_sdpa = _run(sdpa, _leaves(leaves, torch.bfloat16), do, prefix_lengths=plen)
    assert_matches(o, o64, o_sdpa, torch.bfloat16, "o")
    for name, g, g64, g_sdpa in zip(["dq", "dk", "dv", "dprefix_k", "dprefix_v"], grads, grads64, grads_sdpa):
        assert_matches(g, g64, g_sdpa, torch.bfloat16, name)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_no_host_sync_and_cuda_graph_replay():
    torch.manual_seed(8)
    q, k, v, pk, pv = _inputs(2, 8, 2, 300, 300, 16, 64, torch.bfloat16)
    plen = torch.tensor([16, 5], dtype=torch.int32, device=DEVICE)
    do = torch.randn(2, 300, 8, 64, device=DEVICE, dtype=torch.bfloat16)
    step = lambda: _run(prefix_attention, (q, k, v, pk, pv), do, prefix_lengths=plen)
    assert_no_host_sync(step)
    with torch.no_grad():
        q_in = q.detach().clone()
        run = lambda: prefix_attention(q_in.transpose(1, 2), k.detach().transpose(1, 2), v.detach().transpose(1, 2),
                                       pk.detach().expand(2, -1, -1, -1), pv.detach().expand(2, -1, -1, -1), plen)
        graph, o = captured(run)
        q_in.copy_(torch.randn_like(q_in))                        # new inputs in the same buffer
        graph.replay()
        o64 = reference.prefix_attention(q_in.double().transpose(1, 2), k.double().transpose(1, 2),
                                         v.double().transpose(1, 2), pk.double().expand(2, -1, -1, -1),
                                         pv.double().expand(2, -1, -1, -1), plen)
        assert_matches(o, o64, None, torch.bfloat16, "graph replay")
