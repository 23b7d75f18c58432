"""The rotary op (custom ops + autograd) against a float64 reference and transformers' apply_rotary_pos_emb: values
and gradients in both layouts (unsqueeze_dim 1 and 2), GQA, HF's transposed views read in place and never
written, the gradients' memory order, the reference fallbacks, bad input, backends, torch.library checks,
torch.compile."""
import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ptlm_engine import reference
from ptlm_engine.functional import apply_rotary
from ptlm_engine.ops.rotary import rotary_bwd, rotary_fwd
from tests.helpers import (CUDA, DEVICE, DTYPES, assert_grads_match, assert_matches, assert_no_host_sync, captured,
                           leaves, needs_triton, rand)


def _inputs(B, HQ, HK, L, D, dtype, unsqueeze_dim=1, shared_table=True):
    """q, k as HF makes them ((B, L, H, D) projections, viewed (B, H, L, D) for unsqueeze_dim 1), cos, sin."""
    q, k = rand(B, L, HQ, D, dtype=dtype), rand(B, L, HK, D, dtype=dtype)
    if unsqueeze_dim == 1:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    angles = torch.rand(1 if shared_table else B, L, D, dtype=torch.float64) * 6.3
    cos, sin = torch.cos(angles).to(DEVICE, dtype), torch.sin(angles).to(DEVICE, dtype)
    return q.requires_grad_(), k.requires_grad_(), cos, sin


def _run(fn, q, k, cos, sin, dq_out, dk_out, unsqueeze_dim):
    q_out, k_out = fn(q, k, cos, sin, unsqueeze_dim)
    torch.autograd.backward([q_out, k_out], [dq_out, dk_out])
    return (q_out, k_out), [q.grad, k.grad]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
@pytest.mark.parametrize("shape", [(2, 4, 2, 7, 10), (1, 3, 1, 5, 64)], ids=str)
def test_forward_backward_matches_float64(shape, unsqueeze_dim, dtype):
    torch.manual_seed(sum(shape) + unsqueeze_dim)
    q, k, cos, sin = _inputs(*shape, dtype, unsqueeze_dim, shared_table=unsqueeze_dim == 1)
    q_before, k_before = q.detach().clone(), k.detach().clone()
    dq_out, dk_out = torch.randn_like(q), torch.randn_like(k)
    (q_out, k_out), grads = _run(apply_rotary, q, k, cos, sin, dq_out, dk_out, unsqueeze_dim)
    (q64, k64), grads64 = _run(reference.apply_rotary, *leaves((q, k), torch.float64), cos.double(), sin.double(),
                               dq_out.double(), dk_out.double(), unsqueeze_dim)
    (q_lp, k_lp), grads_lp = _run(reference.apply_rotary, *leaves((q, k), dtype), cos, sin, dq_out, dk_out,
                                  unsqueeze_dim)
    assert q_out.grad_fn.name() == "RotaryFunctionBackward"
    assert q_out.shape == q.shape and k_out.shape == k.shape and q_out.is_contiguous() and k_out.is_contiguous()
    assert torch.equal(q, q_before) and torch.equal(k, k_before)               # inputs never written
    assert_matches(q_out, q64, q_lp, dtype, "q_embed")
    assert_matches(k_out, k64, k_lp, dtype, "k_embed")
    assert_grads_match(["dq", "dk"], grads, grads64, grads_lp, dtype)
    # the gradients come out in q's and k's memory order: the transpose and view back to the projection are free
    for grad, t in zip(grads, (q, k)):
        assert [s for s, n in zip(grad.stride(), t.shape) if n > 1] == [s for s, n in zip(t.stride(), t.shape) if n > 1]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if CUDA else []), ids=str)
def test_forward_equals_transformers_apply_rotary_pos_emb(dtype):
    """HF's rounding order (each product, then the sum) gives the same values bit for bit."""
    torch.manual_seed(1)
    q, k, cos, sin = _inputs(2, 8, 2, 13, 32, dtype)
    with torch.no_grad():
        for ours, theirs in zip(apply_rotary(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
            assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)


@needs_triton
def test_fallbacks_run_the_reference():
    """Mixed dtypes (PyTorch's promotion), an odd head dim and a cos / sin that needs a gradient run the
    reference, which is HF's function."""
    torch.manual_seed(2)
    q, k, cos, sin = _inputs(1, 2, 1, 3, 8, torch.float16)
    cases = [(q, k, cos.float(), sin.float()), (*_inputs(1, 2, 1, 3, 7, torch.float32),),
             (q.float(), k.float(), cos.float().requires_grad_(), sin.float())]
    for args in cases:
        ours, theirs = apply_rotary(*args), apply_rotary_pos_emb(*args)
        assert "Rotary" not in ours[0].grad_fn.name()
        for a, b in zip(ours, theirs):
            assert a.dtype == b.dtype and torch.equal(a, b)
    ours[0].sum().backward()
    assert cases[2][2].grad is not None


@pytest.mark.parametrize("args, message", [
    (dict(unsqueeze_dim=0), r"unsqueeze_dim: expected 1"),
    (dict(q=(2, 4, 5)), r"q: expected a 4-D tensor \(B, H, L, D\)"),
    (dict(k=(2, 1, 6, 8)), r"k: expected shape \(2, H, 5, 8\) to match q"),
    (dict(cos=(3, 5, 8)), r"cos: expected shape \(2, 5, 8\) or \(1, 5, 8\)"),
    (dict(sin=(2, 5, 4)), r"sin: expected shape \(2, 5, 8\) or \(1, 5, 8\)"),
])
def test_bad_shapes_raise_value_error(args, message):
    shapes = dict(q=(2, 4, 5, 8), k=(2, 2, 5, 8), cos=(1, 5, 8), sin=(2, 5, 8))
    t = {name: torch.randn(args.get(name, s), device=DEVICE) for name, s in shapes.items()}
    with pytest.raises(ValueError, match=message):
        apply_rotary(t["q"], t["k"], t["cos"], t["sin"], args.get("unsqueeze_dim", 1))


def test_reference_backend_matches_float64(monkeypatch):
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    q, k, cos, sin = (t.detach() for t in _inputs(2, 2, 1, 4, 6, torch.float32))
    for ours, ref in zip(apply_rotary(q, k, cos, sin), reference.apply_rotary(q.double(), k.double(), cos.double(),
                                                                               sin.double())):
        assert_matches(ours, ref, None, torch.float32, "rotated")


@needs_triton
def test_custom_ops_pass_opcheck():
    torch.manual_seed(4)
    q, k, cos, sin = _inputs(2, 4, 2, 5, 8, torch.float32)
    torch.library.opcheck(rotary_fwd, (q, k, cos, sin, 1))
    for unsqueeze_dim, order in ((1, [0, 2, 1, 3]), (2, [0, 1, 2, 3])):
        dq_out, dk_out = torch.randn(2, 4, 5, 8, device=DEVICE), torch.randn(2, 2, 5, 8, device=DEVICE)
        if unsqueeze_dim == 2:
            dq_out, dk_out = dq_out.transpose(1, 2), dk_out.transpose(1, 2)
        torch.library.opcheck(rotary_bwd, (dq_out, dk_out, cos, sin, unsqueeze_dim, order, order),
                              test_utils=("test_schema", "test_faketensor"))


@needs_triton
def test_torch_compile_fullgraph():
    torch.manual_seed(6)
    q, k, cos, sin = _inputs(2, 4, 2, 5, 8, torch.float32)
    compiled = torch.compile(lambda q, k: apply_rotary(q, k, cos, sin), backend="aot_eager", fullgraph=True)
    q_out, k_out = compiled(q, k)
    (q_out.sum() + 2 * k_out.sum()).backward()
    q_leaf, k_leaf = leaves((q, k))
    (q64, k64), (dq64, dk64) = _run(reference.apply_rotary, q_leaf, k_leaf, cos.double(), sin.double(),
                                    torch.ones_like(q_leaf), 2 * torch.ones_like(k_leaf), 1)
    assert_matches(q_out, q64, None, torch.float32, "compiled q_embed")
    assert_matches(k_out, k64, None, torch.float32, "compiled k_embed")
    assert_matches(q.grad, dq64, None, torch.float32, "compiled dq")
    assert_matches(k.grad, dk64, None, torch.float32, "compiled dk")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_no_host_sync_and_cuda_graph_replay():
    torch.manual_seed(8)
    q, k, cos, sin = _inputs(8, 32, 8, 1024, 64, torch.bfloat16)
    dq_out, dk_out = torch.randn_like(q), torch.randn_like(k)
    assert_no_host_sync(lambda: torch.autograd.backward(apply_rotary(q, k, cos, sin), [dq_out, dk_out]))
    with torch.no_grad():
        q_in, k_in = q.detach().clone(), k.detach().clone()
        graph, (q_out, k_out) = captured(lambda: apply_rotary(q_in, k_in, cos, sin))
        q_in.copy_(torch.randn_like(q_in))
        graph.replay()
        q64, k64 = reference.apply_rotary(q_in.double(), k_in.double(), cos.double(), sin.double())
        assert_matches(q_out, q64, None, torch.bfloat16, "graph replay q")
        assert_matches(k_out, k64, None, torch.bfloat16, "graph replay k")
