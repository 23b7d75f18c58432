"""The silu(gate) * up op (custom ops + autograd) against a float64 reference and transformers' act_fn(gate) * up:
values and gradients, any leading dims, a fused projection's strided halves, the inference path, bad input,
backends, torch.library checks, torch.compile."""
import pytest
import torch
from transformers.activations import ACT2FN

from ptlm_engine import reference
from ptlm_engine.functional import silu_mul
from ptlm_engine.ops.silu_mul import silu_mul_bwd, silu_mul_fwd
from tests.helpers import (CUDA, DEVICE, DTYPES, assert_grads_match, assert_matches, assert_no_host_sync, captured,
                           leaves, needs_triton, rand)
from tests.ops.test_rms_norm import assert_hf_equal


def _run(fn, gate, up, dy):
    y = fn(gate, up)
    y.backward(dy)
    return y, [t.grad if t.requires_grad else None for t in (gate, up)]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [
    dict(lead=(3, 7), F=40),
    dict(lead=(29,), F=24, train_up=False),
    dict(lead=(2, 3), F=33, fused_projection=True),
])
def test_forward_backward_matches_float64(case, dtype):
    torch.manual_seed(sum(case["lead"]) + case["F"])
    lead, F = case["lead"], case["F"]
    if case.get("fused_projection"):        # one (..., 2F) gate/up projection output, split in two views
        gate, up = rand(*lead, 2 * F, dtype=dtype, scale=2.0).requires_grad_().split(F, dim=-1)
        projected = (gate, up)
        gate, up = gate.detach().requires_grad_(), up.detach().requires_grad_()
        assert not projected[0].is_contiguous() and not gate.is_contiguous()
    else:
        gate = rand(*lead, F, dtype=dtype, scale=2.0).requires_grad_()
        up = rand(*lead, F, dtype=dtype).requires_grad_(case.get("train_up", True))
    dy = torch.randn(*lead, F, device=DEVICE, dtype=dtype)
    y, grads = _run(silu_mul, gate, up, dy)
    y64, grads64 = _run(reference.silu_mul, *leaves((gate, up), torch.float64), dy.double())
    y_lp, grads_lp = _run(reference.silu_mul, *leaves((gate, up), dtype), dy)
    assert y.shape == gate.shape and y.dtype == dtype
    assert_matches(y, y64, y_lp, dtype, "y")
    assert_grads_match(["dgate", "dup"], grads, grads64, grads_lp, dtype)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if CUDA else []), ids=str)
def test_forward_equals_transformers_act_fn_times_up(dtype):
    torch.manual_seed(1)
    gate, up = rand(4, 9, 130, dtype=dtype, scale=3.0), rand(4, 9, 130, dtype=dtype)
    with torch.no_grad():
        assert_hf_equal(silu_mul(gate, up), ACT2FN["silu"](gate) * up, dtype)


@needs_triton
def test_inference_path_and_autograd_path_agree():
    torch.manual_seed(2)
    gate, up = rand(5, 21, dtype=torch.float32), rand(5, 21, dtype=torch.float32)
    with torch.no_grad():
        y_inference = silu_mul(gate, up)
    y = silu_mul(gate.requires_grad_(), up)
    assert torch.equal(y, y_inference) and y.grad_fn.name() == "SiluMulFunctionBackward"


def test_bad_input_raises_value_error():
    with pytest.raises(ValueError, match=r"up: expected shape \(3, 4\) \(the shape of gate\)"):
        silu_mul(torch.randn(3, 4, device=DEVICE), torch.randn(3, 5, device=DEVICE))
    with pytest.raises(ValueError, match=r"up: expected dtype torch.float32"):
        silu_mul(torch.randn(3, 4, device=DEVICE), torch.randn(3, 4, device=DEVICE).half())
    with pytest.raises(ValueError, match=r"gate: expected a floating-point dtype"):
        silu_mul(torch.ones(3, 4, dtype=torch.int64, device=DEVICE), torch.ones(3, 4, dtype=torch.int64, device=DEVICE))


def test_reference_backend_matches_float64(monkeypatch):
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    gate, up = torch.randn(4, 12), torch.randn(4, 12)
    assert_matches(silu_mul(gate, up), reference.silu_mul(gate.double(), up.double()), None, torch.float32, "y")


@needs_triton
def test_custom_ops_pass_opcheck():
    torch.manual_seed(4)
    gate, up = (rand(9, 20, dtype=torch.float32).requires_grad_() for _ in range(2))
    torch.library.opcheck(silu_mul_fwd, (gate, up))
    torch.library.opcheck(silu_mul_bwd, (torch.randn_like(gate), gate.detach(), up.detach()))


@needs_triton
def test_torch_compile_fullgraph():
    torch.manual_seed(6)
    gate, up = (rand(2, 7, 16, dtype=torch.float32).requires_grad_() for _ in range(2))
    y = torch.compile(silu_mul, backend="aot_eager", fullgraph=True)(gate, up)
    y.sum().backward()
    y64, (dg64, du64) = _run(reference.silu_mul, *leaves((gate, up), torch.float64), torch.ones_like(y).double())
    assert_matches(y, y64, None, torch.float32, "compiled y")
    assert_matches(gate.grad, dg64, None, torch.float32, "compiled dgate")
    assert_matches(up.grad, du64, None, torch.float32, "compiled dup")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_no_host_sync_and_cuda_graph_replay():
    torch.manual_seed(8)
    gate, up = (rand(8192, 5632, dtype=torch.bfloat16).requires_grad_() for _ in range(2))
    dy = torch.randn_like(gate)
    assert_no_host_sync(lambda: silu_mul(gate, up).backward(dy))
    with torch.no_grad():
        g_in, u_in = gate.detach().clone(), up.detach().clone()
        graph, y = captured(lambda: silu_mul(g_in, u_in))
        g_in.copy_(torch.randn_like(g_in))
        graph.replay()
        assert_matches(y, reference.silu_mul(g_in.double(), u_in.double()), None, torch.bfloat16, "graph replay")
