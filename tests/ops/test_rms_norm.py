"""The RMSNorm op (custom ops + autograd) against a float64 reference and transformers' LlamaRMSNorm: values and
gradients, any leading dims, strided input, a frozen weight (no dweight), the inference path, bad input, backends,
torch.library checks, torch.compile."""
import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from ptlm_engine import reference
from ptlm_engine.functional import rms_norm
from ptlm_engine.ops.rms_norm import rms_norm_bwd, rms_norm_fwd
from tests.helpers import (CUDA, DEVICE, DTYPES, assert_grads_match, assert_matches, assert_no_host_sync, captured,
                           leaves, needs_triton, rand)

EPS = 1e-6
ULP = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def _run(fn, x, w, dy):
    y = fn(x, w, EPS)
    y.backward(dy)
    return y, [t.grad if t.requires_grad else None for t in (x, w)]


def assert_hf_equal(out: torch.Tensor, hf: torch.Tensor, dtype) -> None:
    """Equal to HF's output but for rare last-bit differences (the fp32 statistics summed in another order)."""
    assert out.dtype == hf.dtype and out.shape == hf.shape
    diff = (out.float() - hf.float()).abs()
    assert (diff <= ULP[dtype] * hf.float().abs()).all(), diff.max()
    assert (diff == 0).float().mean() >= 0.99


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [
    dict(lead=(3, 7), d=40, train_weight=True),
    dict(lead=(29,), d=24, train_weight=False),
    dict(lead=(2, 3, 5), d=33, train_weight=True, strided=True),
])
def test_forward_backward_matches_float64(case, dtype):
    torch.manual_seed(sum(case["lead"]) + case["d"])
    lead, d = case["lead"], case["d"]
    x = rand(*lead, 2 * d, dtype=dtype)[..., ::2] if case.get("strided") else rand(*lead, d, dtype=dtype)
    x.requires_grad_()
    w = rand(d, dtype=dtype, scale=0.5).requires_grad_(case["train_weight"])
    dy = torch.randn(*lead, d, device=DEVICE, dtype=dtype)
    y, grads = _run(rms_norm, x, w, dy)
    y64, grads64 = _run(reference.rms_norm, *leaves((x, w), torch.float64), dy.double())
    y_lp, grads_lp = _run(reference.rms_norm, *leaves((x, w), dtype), dy)
    assert y.shape == x.shape and y.dtype == dtype
    assert_matches(y, y64, y_lp, dtype, "y")
    assert_grads_match(["dx", "dweight"], grads, grads64, grads_lp, dtype)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if CUDA else []), ids=str)
def test_forward_equals_transformers_llama_rms_norm(dtype):
    torch.manual_seed(1)
    hf = LlamaRMSNorm(96, eps=EPS).to(DEVICE, dtype)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(96) * 0.5 + 1)
    x = rand(4, 11, 96, dtype=dtype, scale=3.0)
    with torch.no_grad():
        assert_hf_equal(rms_norm(x, hf.weight, EPS), hf(x), dtype)


@needs_triton
def test_inference_path_frozen_weight_and_autograd_path_agree():
    """no_grad runs the bare forward (no rstd kept); a frozen weight gets no gradient and no dweight work."""
    torch.manual_seed(2)
    x, w = rand(5, 6, 20, dtype=torch.float32), rand(20, dtype=torch.float32)
    with torch.no_grad():
        y_inference = rms_norm(x, w, EPS)
    xg = x.clone().requires_grad_()
    y = rms_norm(xg, w, EPS)
    assert torch.equal(y, y_inference) and y.grad_fn.next_functions[0][0].name() == "RMSNormFunctionBackward"
    y.sum().backward()
    assert xg.grad is not None and w.grad is None


@pytest.mark.parametrize("x_shape, w_shape, message", [
    ((5, 8), (7,), r"weight: expected shape \(8,\) to match x"),
    ((5, 8), (1, 8), r"weight: expected shape \(8,\)"),
    ((), (1,), r"x: expected shape \(\.\.\., d\)"),
])
def test_bad_shapes_raise_value_error(x_shape, w_shape, message):
    with pytest.raises(ValueError, match=message):
        rms_norm(torch.randn(x_shape, device=DEVICE), torch.randn(w_shape, device=DEVICE), EPS)


def test_bad_dtype_raises_value_error():
    with pytest.raises(ValueError, match=r"x: expected a floating-point dtype"):
        rms_norm(torch.ones(3, 4, dtype=torch.int32, device=DEVICE), torch.ones(4, device=DEVICE), EPS)


def test_reference_backend_matches_float64(monkeypatch):
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    x, w = torch.randn(4, 5, 12), torch.randn(12)
    assert_matches(rms_norm(x, w, EPS), reference.rms_norm(x.double(), w.double(), EPS), None, torch.float32, "y")


@needs_triton
def test_custom_ops_pass_opcheck():
    torch.manual_seed(4)
    x, w = rand(9, 20, dtype=torch.float32).requires_grad_(), rand(20, dtype=torch.float32).requires_grad_()
    torch.library.opcheck(rms_norm_fwd, (x, w, EPS))
    _, rstd = rms_norm_fwd(x.detach(), w.detach(), EPS)
    for need_dweight in (True, False):
        torch.library.opcheck(rms_norm_bwd, (torch.randn_like(x), x.detach(), w.detach(), rstd, need_dweight))


@needs_triton
def test_torch_compile_fullgraph():
    torch.manual_seed(6)
    x, w = rand(2, 7, 16, dtype=torch.float32).requires_grad_(), rand(16, dtype=torch.float32).requires_grad_()
    compiled = torch.compile(lambda x, w: rms_norm(x, w, EPS), backend="aot_eager", fullgraph=True)
    y = compiled(x, w)
    y.backward(torch.ones_like(y))
    y64, (dx64, dw64) = _run(reference.rms_norm, *leaves((x, w), torch.float64), torch.ones_like(y).double())
    assert_matches(y, y64, None, torch.float32, "compiled y")
    assert_matches(x.grad, dx64, None, torch.float32, "compiled dx")
    assert_matches(w.grad, dw64, None, torch.float32, "compiled dweight")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_no_host_sync_and_cuda_graph_replay():
    torch.manual_seed(8)
    x, w = rand(8, 1024, 2048, dtype=torch.bfloat16).requires_grad_(), rand(2048, dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    assert_no_host_sync(lambda: rms_norm(x, w, EPS).backward(dy))
    with torch.no_grad():
        x_in = x.detach().clone()
        graph, y = captured(lambda: rms_norm(x_in, w, EPS))
        x_in.copy_(torch.randn_like(x_in))
        graph.replay()
        assert_matches(y, reference.rms_norm(x_in.double(), w.double(), EPS), None, torch.bfloat16, "graph replay")
