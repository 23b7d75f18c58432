"""The bottleneck-adapter op (custom ops + autograd) against a float64 reference: values and gradients of every
input, any leading dims, both placements, bias-free adapters, the inference path, the reference fallbacks, bad
input, backends, torch.library checks."""
import pytest
import torch

from ptlm_engine import reference
from ptlm_engine.functional import bottleneck_adapter
from ptlm_engine.ops.bottleneck import bottleneck_bwd, bottleneck_fwd
from tests.helpers import (CUDA, DEVICE, DTYPES, assert_grads_match, assert_matches, assert_no_host_sync, captured,
                           far_apart_rows, needs_triton, rand)


def _inputs(lead, d, m, dtype, residual=False, biases=True):
    """h, down_weight, down_bias, up_weight, up_bias, residual: every one a leaf that requires grad."""
    g = lambda *s, scale=1.0: rand(*s, dtype=dtype, scale=scale).requires_grad_()
    return (g(*lead, d), g(m, d, scale=d ** -0.5), g(m) if biases else None, g(d, m, scale=m ** -0.5),
            g(d) if biases else None, g(*lead, d) if residual else None)


def _run(fn, tensors, dy, act, scale):
    h, wd, bd, wu, bu, res = tensors
    y = fn(h, wd, bd, wu, bu, act, scale, res)
    y.backward(dy)
    return y, [None if t is None else t.grad for t in tensors]


def _leaves(tensors, dtype):
    return [None if t is None else t.detach().to(dtype).requires_grad_() for t in tensors]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [
    dict(lead=(3, 7), d=40, m=12, act="gelu"),
    dict(lead=(2, 11), d=36, m=5, act="relu", residual=True),
    dict(lead=(17,), d=24, m=20, act="silu", residual=True, biases=False),
])
def test_forward_backward_matches_float64(case, dtype):
    case = dict(case)
    act, lead = case.pop("act"), case["lead"]
    torch.manual_seed(sum(lead) + case["m"])
    ts = _inputs(dtype=dtype, **case)
    dy = torch.randn(*lead, case["d"], device=DEVICE, dtype=dtype)
    y, grads = _run(bottleneck_adapter, ts, dy, act, 1.5)
    y64, grads64 = _run(reference.bottleneck_adapter, _leaves(ts, torch.float64), dy.double(), act, 1.5)
    y_lp, grads_lp = _run(reference.bottleneck_adapter, _leaves(ts, dtype), dy, act, 1.5)
    assert y.shape == y64.shape and y.dtype == dtype
    assert_matches(y, y64, y_lp, dtype, "y")
    assert_grads_match(["dh", "d_down_weight", "d_down_bias", "d_up_weight", "d_up_bias", "dresidual"], grads,
                       grads64, grads_lp, dtype)


@needs_triton
@pytest.mark.parametrize("T", [5, 70])
def test_rows_far_apart_in_memory(T):
    """h, the residual and dy rows 2^31 elements apart (as in a T · d >= 2^31 input): 64-bit row offsets."""
    torch.manual_seed(T)
    ts = list(_inputs((T,), 24, 6, torch.float16, residual=True))
    ts[0], ts[5] = (far_apart_rows(t.detach()).requires_grad_() for t in (ts[0], ts[5]))
    dy = far_apart_rows(torch.randn(T, 24, device=DEVICE, dtype=torch.float16))
    y, grads = _run(bottleneck_adapter, ts, dy, "gelu", 1.5)
    y64, grads64 = _run(reference.bottleneck_adapter, _leaves(ts, torch.float64), dy.double(), "gelu", 1.5)
    y_lp, grads_lp = _run(reference.bottleneck_adapter, _leaves(ts, torch.float16), dy.contiguous(), "gelu", 1.5)
    assert_matches(y, y64, y_lp, torch.float16, "y")
    assert_grads_match(["dh", "d_down_weight", "d_down_bias", "d_up_weight", "d_up_bias", "dresidual"], grads,
                       grads64, grads_lp, torch.float16)


@needs_triton
def test_strided_biases():
    """Biases as strided views: the kernels read them as contiguous, so the op hands them contiguous ones."""
    torch.manual_seed(6)
    h, wd, _, wu, _, _ = _inputs((4,), 7, 3, torch.float32)
    bd, bu = torch.randn(3, 2, device=DEVICE)[:, 0], torch.randn(7, 2, device=DEVICE)[:, 1]
    torch.testing.assert_close(bottleneck_adapter(h, wd, bd, wu, bu, "relu", 0.5),
                               bottleneck_adapter(h, wd, bd.contiguous(), wu, bu.contiguous(), "relu", 0.5))


@needs_triton
def test_only_the_adapter_trains_and_inference_matches_training():
    """A frozen input (no dh computed) and no_grad (z not kept) give the same y as the autograd path."""
    torch.manual_seed(3)
    h, wd, bd, wu, bu, res = _inputs((9,), 32, 8, torch.float32, residual=True)
    y = bottleneck_adapter(h.detach(), wd, bd, wu, bu, "gelu", 0.5, res.detach())
    y.sum().backward()
    assert h.grad is None and res.grad is None and wd.grad is not None and bu.grad is not None
    with torch.no_grad():
        y_inf = bottleneck_adapter(h, wd, bd, wu, bu, "gelu", 0.5, res)
    assert torch.equal(y.detach(), y_inf)


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_relu_keeps_nan(train):
    """A NaN reaching a ReLU adapter comes out NaN, as torch.relu(nan) and nn.ReLU give (PEFT-style adapters built
    from nn.ReLU propagate it): a NaN that vanishes would hide a diverged run. Parallel placement: the NaN is in h,
    the residual is finite; the other rows keep float64's values (regression: the kernels' ReLU, Triton's maximum,
    returned 0 for NaN)."""
    torch.manual_seed(6)
    h, wd, bd, wu, bu, res = _inputs((3,), 6, 3, torch.float32, residual=True)
    with torch.no_grad():
        h[0, 2] = float("nan")
    with torch.set_grad_enabled(train):
        y = bottleneck_adapter(h, wd, bd, wu, bu, "relu", 1.0, res)
    y64 = reference.bottleneck_adapter(*[t.double() for t in (h, wd, bd, wu, bu)], "relu", 1.0, res.double())
    assert torch.isnan(y64[0]).all() and torch.isnan(y[0]).all()
    assert_matches(y[1:], y64[1:], None, torch.float32, "rows without NaN")


def test_reference_fallbacks(monkeypatch):
    """float64, widths over 256 and PTLM_BACKEND=reference all run the PyTorch reference."""
    torch.manual_seed(4)
    ts = _inputs((5,), 8, 300, torch.float64)
    expected = reference.bottleneck_adapter(*ts[:5], "silu", 2.0, ts[5])
    torch.testing.assert_close(bottleneck_adapter(*ts[:5], "silu", 2.0), expected)
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    ts32 = [None if t is None else t.detach().float() for t in ts]
    y = bottleneck_adapter(*ts32[:5], "silu", 2.0)
    assert_matches(y, expected, None, torch.float32, "reference backend")


@pytest.mark.parametrize("bad, message", [
    (dict(act="tanh"), r"act: expected one of 'relu', 'gelu', 'silu', got 'tanh'"),
    (dict(wd=(0, 8)), r"down_weight: expected shape \(m, 8\) with m >= 1"),
    (dict(wd=(3, 7)), r"down_weight: expected shape \(m, 8\)"),
    (dict(wu=(8, 2)), r"up_weight: expected shape \(8, 3\)"),
    (dict(bd=(4,)), r"down_bias: expected shape \(3,\)"),
    (dict(bu=(3,)), r"up_bias: expected shape \(8,\)"),
    (dict(res=(5, 7)), r"residual: expected shape \(5, 8\) \(the shape of h\)"),
])
def test_bad_shapes_raise_value_error(bad, message):
    shapes = dict(h=(5, 8), wd=(3, 8), bd=(3,), wu=(8, 3), bu=(8,), res=(5, 8)) | {k: v for k, v in bad.items()
                                                                                 if k != "act"}
    t = {k: torch.randn(*s, device=DEVICE) for k, s in shapes.items()}
    with pytest.raises(ValueError, match=message):
        bottleneck_adapter(t["h"], t["wd"], t["bd"], t["wu"], t["bu"], bad.get("act", "relu"), 1.0, t["res"])


def test_bad_dtype_and_device_raise_value_error():
    h, wd, wu = (torch.randn(*s, device=DEVICE) for s in [(5, 8), (3, 8), (8, 3)])
    with pytest.raises(ValueError, match=r"up_weight: expected dtype torch.float32"):
        bottleneck_adapter(h, wd, None, wu.half(), None)
    with pytest.raises(ValueError, match=r"residual: expected dtype torch.float32"):
        bottleneck_adapter(h, wd, None, wu, None, residual=h.double())
    with pytest.raises(ValueError, match=r"h: expected a floating-point dtype"):
        bottleneck_adapter(h.long(), wd.long(), None, wu.long(), None)
    if CUDA:
        with pytest.raises(ValueError, match=r"down_weight: expected device"):
            bottleneck_adapter(h, wd.cpu(), None, wu, None)


@needs_triton
def test_custom_ops_pass_opcheck():
    torch.manual_seed(6)
    for residual, biases in [(False, True), (True, False)]:
        h, wd, bd, wu, bu, res = (None if t is None else t.detach() for t in _inputs((9,), 20, 6, torch.float32,
                                                                                      residual, biases))
        args = (h.requires_grad_(), wd.requires_grad_(), bd, wu.requires_grad_(), bu, res, 1.5, 1)
        torch.library.opcheck(bottleneck_fwd, args,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
        _, z = bottleneck_fwd(*args)
        torch.library.opcheck(bottleneck_bwd, (torch.randn_like(h), h.detach(), z, wd.detach(), wu.detach(), 1.5, 1,
                                               residual, True), test_utils=("test_schema", "test_faketensor"))


@needs_triton
def test_torch_compile_fullgraph():
    torch.manual_seed(7)
    ts = _inputs((2, 5), 16, 8, torch.float32, residual=True)
    compiled = torch.compile(lambda *t: bottleneck_adapter(*t[:5], "gelu", 2.0, t[5]), backend="aot_eager",
                             fullgraph=True)
    y = compiled(*ts)
    y.sum().backward()
    y64 = reference.bottleneck_adapter(*[t.double() for t in ts[:5]], "gelu", 2.0, ts[5].double())
    assert_matches(y, y64, None, torch.float32, "compiled y")
    assert all(t.grad is not None for t in ts)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("T", [8, 4096])
def test_forward_backward_have_no_host_sync_and_replay_in_a_cuda_graph(T):
    torch.manual_seed(T)
    h, wd, bd, wu, bu, _ = _inputs((T,), 4096, 64, torch.bfloat16)
    dy = torch.randn(T, 4096, device=DEVICE, dtype=torch.bfloat16)

    def step():
        y = bottleneck_adapter(h, wd, bd, wu, bu, "relu", 2.0)
        y.backward(dy)
        return y

    assert_no_host_sync(step)
    with torch.no_grad():
        h_in = h.detach().clone()
        graph, y = captured(lambda: bottleneck_adapter(h_in, wd, bd, wu, bu, "relu", 2.0))
        h_in.copy_(torch.randn_like(h_in))                        # new inputs in the same buffer
        graph.replay()
        y64 = reference.bottleneck_adapter(h_in.double(), wd.double(), bd.double(), wu.double(), bu.double(), "relu",
                                           2.0)
        assert_matches(y, y64, None, torch.bfloat16, "graph replay")


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_float32_masters_on_fp16_get_float32_gradients_under_a_scaled_loss(backend, monkeypatch):
    """fp16 h with float32 adapter weights and the loss times 65536 (GradScaler's initial scale): the weights'
    gradients (~1e6 here, beyond fp16's 65504) are float32 sums, finite and close to float64's; an inf would make
    GradScaler skip every step. The values are those of the weights read as fp16."""
    monkeypatch.setenv("PTLM_BACKEND", backend)
    torch.manual_seed(5)
    h = (30 * torch.randn(32, 64)).half().to(DEVICE)
    values = (torch.randn(8, 64) * 0.2, torch.randn(8), torch.randn(64, 8) * 0.2, torch.randn(64))
    weights = [t.to(DEVICE).requires_grad_() for t in values]
    y = bottleneck_adapter(h, *weights, "relu", 1.0)
    assert y.dtype == torch.float16
    (y.float().square().mean() * 65536).backward()
    weights64 = [w.detach().half().double().requires_grad_() for w in weights]
    y64 = bottleneck_adapter(h.double(), *weights64, "relu", 1.0)
    (y64.square().mean() * 65536).backward()
    torch.testing.assert_close(y.double(), y64, rtol=2e-2, atol=2e-2)
    for w, w64 in zip(weights, weights64):
        assert w.grad.dtype == torch.float32
        assert_matches(w.grad, w64.grad, None, torch.float16, "weight gradient")
