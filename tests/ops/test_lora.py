"""The LoRA op (custom ops + autograd) against a float64 reference: values and gradients, any leading dims,
strided inputs, Conv1D layout, dropout, trainable base weights, bad input, backends, torch.library checks."""
import pytest
import torch

from ptlm_engine import reference
from ptlm_engine.functional import lora_linear
from ptlm_engine.kernels import lora as K
from ptlm_engine.ops.lora import lora_linear_fwd, triton_enabled
from tests.helpers import (CUDA, DEVICE, DTYPES, assert_grads_match, assert_matches, assert_no_host_sync, captured,
                           far_apart_rows, needs_triton, rand)


def _inputs(lead, d_in, d_out, r, dtype, fan_in_fan_out=False, bias=True, train_base=False):
    g = lambda *s, scale=1.0: rand(*s, dtype=dtype, scale=scale)
    x = g(*lead, d_in).requires_grad_()
    w = g(d_in, d_out, scale=d_in ** -0.5) if fan_in_fan_out else g(d_out, d_in, scale=d_in ** -0.5)
    w.requires_grad_(train_base)
    b = g(d_out).requires_grad_(train_base) if bias else None
    a = g(r, d_in, scale=d_in ** -0.5).requires_grad_()
    bb = g(d_out, r, scale=r ** -0.5).requires_grad_()
    return x, w, b, a, bb


def _run(fn, tensors, dy, **kw):
    y = fn(*tensors, **kw)
    y.backward(dy)
    return y, [t.grad if t is not None and t.requires_grad else None for t in tensors]


def _leaf64(t):
    return None if t is None else t.detach().double().requires_grad_(t.requires_grad)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [
    dict(lead=(3, 7), d_in=33, d_out=45, r=4),
    dict(lead=(29,), d_in=40, d_out=24, r=1, bias=False),
    dict(lead=(2, 3, 5), d_in=24, d_out=37, r=9, fan_in_fan_out=True),
    dict(lead=(17,), d_in=31, d_out=19, r=3, train_base=True),
])
def test_forward_backward_matches_float64(case, dtype):
    torch.manual_seed(sum(case["lead"]) + case["r"])
    fif = case.get("fan_in_fan_out", False)
    ts = _inputs(dtype=dtype, **case)
    dy = torch.randn(*case["lead"], case["d_out"], device=DEVICE, dtype=dtype)
    y, grads = _run(lora_linear, ts, dy, scale=1.5, fan_in_fan_out=fif)
    ts64 = [_leaf64(t) for t in ts]
    y64, grads64 = _run(reference.lora_linear, ts64, dy.double(), scale=1.5, fan_in_fan_out=fif)
    ts_lp = [_leaf64(t) for t in ts]
    ts_lp = [None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad) for t in ts_lp]
    y_lp, grads_lp = _run(reference.lora_linear, ts_lp, dy, scale=1.5, fan_in_fan_out=fif)
    assert y.shape == y64.shape and y.dtype == dtype
    assert_matches(y, y64, y_lp, dtype, "y")
    assert_grads_match(["dx", "dW", "dbias", "dA", "dB"], grads, grads64, grads_lp, dtype)


@needs_triton
@pytest.mark.parametrize("T", [5, 70])     # the fused decode shrink; the separate shrink + prefill matmul
def test_float32_adapters_on_a_half_precision_base(T):
    """Trainable float32 master adapters on an fp16 base: the op reads them as they are (no cast in the graph)
    and returns float32 gradients for them, within fp16's own error of the float64 result."""
    torch.manual_seed(T)
    x, w, b, a, bb = _inputs((T,), 40, 24, 6, torch.float16)
    a, bb = (t.detach().float().requires_grad_() for t in (a, bb))
    ts = [x, w, b, a, bb]
    dy = torch.randn(T, 24, device=DEVICE, dtype=torch.float16)
    y, grads = _run(lora_linear, ts, dy, scale=1.5, dropout=0.0)
    y64, grads64 = _run(reference.lora_linear, [_leaf64(t) for t in ts], dy.double(), scale=1.5)
    ts_lp = [None if t is None else t.detach().clone().requires_grad_(t.requires_grad) for t in ts]
    y_lp, grads_lp = _run(reference.lora_linear, ts_lp, dy, scale=1.5)
    assert y.dtype == torch.float16 and y.grad_fn.name() == "LoraLinearFunctionBackward"
    assert_matches(y, y64, y_lp, torch.float16, "y")
    for name, g, g64, g_lp, dtype in zip(["dx", "dA", "dB"], [grads[0], *grads[3:]], [grads64[0], *grads64[3:]],
                                         [grads_lp[0], *grads_lp[3:]], [torch.float16, torch.float32, torch.float32]):
        assert g.dtype == dtype, name
        assert_matches(g, g64, g_lp, torch.float16, name)
    with pytest.raises(ValueError, match=r"lora_A: expected dtype torch.float16 \(the dtype of x\) or torch.float32"):
        lora_linear(x, w, b, a.bfloat16(), bb)


@needs_triton
def test_non_contiguous_input():
    torch.manual_seed(5)
    x, w, b, a, bb = _inputs((6, 22), 18, 26, 2, torch.float32)
    xt = x.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # (6, 22, 18) strided
    assert not xt.is_contiguous()
    y = lora_linear(xt, w, b, a, bb, scale=0.5)
    y64 = reference.lora_linear(xt.double(), w.double(), b.double(), a.double(), bb.double(), 0.5)
    assert_matches(y, y64, None, torch.float32, "y")


@pytest.mark.parametrize("lead,expanded", [((0,), False), ((0, 3), False), ((1,), False), ((4,), True)],
                         ids=["empty", "batch0_3d", "one", "expanded"])
def test_empty_single_token_and_expanded_inputs(lead, expanded):
    """No token (T = 0, also a 3-D batch of 0), one token, and an x expanded from one row (stride 0, as
    x[:1].expand(4, -1) gives): y has x's leading dims and float64's values, as F.linear gives for any of them."""
    torch.manual_seed(8)
    x, w, b, a, bb = (t.detach() for t in _inputs((1,) if expanded else lead, 7, 5, 3, torch.float32))
    x = x.expand(*lead, 7)
    y = lora_linear(x, w, b, a, bb, scale=0.5)
    y64 = reference.lora_linear(x.double(), w.double(), b.double(), a.double(), bb.double(), 0.5)
    assert y.shape == (*lead, 5)
    assert_matches(y, y64, None, torch.float32, "y")


@needs_triton
@pytest.mark.parametrize("T", [5, 70])     # decode; prefill
def test_rows_far_apart_in_memory(T):
    """x and dy rows 2^31 elements apart (as in a T · d_in >= 2^31 input): row offsets are 64-bit in every kernel."""
    torch.manual_seed(T)
    x, w, b, a, bb = _inputs((T,), 24, 40, 4, torch.float16)
    xf = far_apart_rows(x.detach()).requires_grad_()
    dy = far_apart_rows(torch.randn(T, 40, device=DEVICE, dtype=torch.float16))
    ts = [xf, w, b, a, bb]
    y, grads = _run(lora_linear, ts, dy, scale=0.5, dropout=0.0)
    y64, grads64 = _run(reference.lora_linear, [_leaf64(t) for t in ts], dy.double(), scale=0.5)
    ts_lp = [None if t is None else t.detach().clone().requires_grad_(t.requires_grad) for t in ts]
    y_lp, grads_lp = _run(reference.lora_linear, ts_lp, dy.contiguous(), scale=0.5)
    assert_matches(y, y64, y_lp, torch.float16, "y")
    assert_grads_match(["dx", "dW", "dbias", "dA", "dB"], grads, grads64, grads_lp, torch.float16)


@needs_triton
def test_dropout_uses_one_mask_for_forward_and_backward():
    torch.manual_seed(11)
    p = 0.4
    x, w, b, a, bb = _inputs((21,), 26, 34, 3, torch.float32)
    dy = torch.randn(21, 34, device=DEVICE)
    state = torch.random.get_rng_state() if not CUDA else torch.cuda.get_rng_state()
    y, grads = _run(lora_linear, (x, w, b, a, bb), dy, scale=2.0, dropout=p)
    # The op draws its Philox seed from the default generator: replay it to recover the mask it used.
    if CUDA:
        torch.cuda.set_rng_state(state)
    else:
        torch.random.set_rng_state(state)
    seed = torch.randint(0, 2**31 - 1, (1,), device=DEVICE)
    keep = K.lora_shrink(torch.ones(21, 26, device=DEVICE), torch.eye(26, device=DEVICE), 1.0, seed, p) * (1 - p) > .5
    assert 0 < keep.float().mean() < 1
    ts64 = [_leaf64(t) for t in (x, w, b, a, bb)]
    y64, grads64 = _run(reference.lora_linear, ts64, dy.double(), scale=2.0, keep_mask=keep.double(), dropout=p)
    assert_matches(y, y64, None, torch.float32, "y")
    for name, g, g64 in zip(["dx", "dW", "dbias", "dA", "dB"], grads, grads64):
        if g is not None:
            assert_matches(g, g64, None, torch.float32, name)


@pytest.mark.parametrize("grads,r", [(grads, r) for r in (1, 256) for grads in [("x",), ("lora_A",), ("lora_B",), ()]]
                         + [(("x", "lora_A", "lora_B"), 256)],
                         ids=lambda v: ("-".join(v) or "none") if isinstance(v, tuple) else f"r{v}")
def test_gradients_exactly_where_requires_grad_is_set(grads, r):
    """Each of x, lora_A and lora_B gets a gradient exactly when it requires one (a frozen input, a frozen A or B),
    as autograd gives for torch's own ops, equal to float64 autograd's; with none requiring one the output has no
    graph. r = 1 and r = 256 (all three at r = 1: test_forward_backward_matches_float64)."""
    torch.manual_seed(r)
    ts = _inputs((3,), 7, 5, r, torch.float32)
    for t, name in zip(ts, ("x", "weight", "bias", "lora_A", "lora_B")):
        t.requires_grad_(name in grads)
    if not grads:
        y = lora_linear(*ts, scale=0.7)
        assert not y.requires_grad
        assert_matches(y, reference.lora_linear(*[t.double() for t in ts], 0.7), None, torch.float32, "y")
        return
    dy = torch.randn(3, 5, device=DEVICE)
    y, grads32 = _run(lora_linear, ts, dy, scale=0.7)
    y64, grads64 = _run(reference.lora_linear, [_leaf64(t) for t in ts], dy.double(), scale=0.7)
    assert_matches(y, y64, None, torch.float32, "y")
    assert_grads_match(["dx", "dW", "dbias", "dA", "dB"], grads32, grads64, [None] * 5, torch.float32)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_double_backward_runs_on_the_reference_and_is_refused_by_the_kernels(backend, monkeypatch):
    """A double backward (gradient penalties, MAML: gradients taken with create_graph=True, then differentiated)
    through lora_linear with a trainable base weight. The reference's plain torch ops compute it (float64's
    value); the kernels' gradients are not differentiable themselves, so the kernel path refuses it with a
    RuntimeError naming the double backward, as torch's once_differentiable Functions refuse one, rather than give
    a value missing their terms (regression: d/dx of (sum dL/dA + sum dL/dW) came out silently wrong)."""
    monkeypatch.setenv("PTLM_BACKEND", backend)
    torch.manual_seed(10)
    ts = _inputs((4,), 7, 5, 3, torch.float32, train_base=True)

    def second(fn, x, w, b, a, bb):
        y = fn(x, w, b, a, bb, 0.5)
        grad_a, grad_w = torch.autograd.grad(y.pow(2).sum(), (a, w), create_graph=True)
        return torch.autograd.grad(grad_a.sum() + grad_w.sum(), x)[0]

    want = second(reference.lora_linear, *[_leaf64(t) for t in ts])
    if backend == "triton":
        with pytest.raises(RuntimeError, match="double backward"):
            second(lora_linear, *ts)
    else:
        assert_matches(second(lora_linear, *ts), want, None, torch.float32, "d/dx of the first gradients")


def test_nan_in_x_stays_in_its_row_and_nan_in_lora_A_shows_at_scale_zero():
    """A NaN in one token of x makes that token's output NaN and no other token's; a NaN in lora_A comes out even at
    scale 0 (0 · NaN = NaN, as PEFT's lora_B(lora_A(x)) * scaling gives): a diverged adapter is not hidden."""
    torch.manual_seed(9)
    x, w, b, a, bb = (t.detach().clone() for t in _inputs((3,), 7, 5, 2, torch.float32))
    x[0, 1] = float("nan")
    assert torch.isnan(lora_linear(x, w, b, a, bb, scale=0.5)).any(1).tolist() == [True, False, False]
    a[0, 0] = float("nan")
    assert torch.isnan(lora_linear(x[1:], w, b, a, bb, scale=0.0)).all()


@pytest.mark.parametrize("bad, message", [
    (dict(x=(5, 9)), r"x: expected shape \(\.\.\., 8\)"),
    (dict(a=(0, 8)), r"lora_A: expected shape \(r, 8\) with r >= 1"),
    (dict(a=(3, 7)), r"lora_A: expected shape \(r, 8\)"),
    (dict(b=(6, 2)), r"lora_B: expected shape \(6, 3\)"),
    (dict(bias=(5,)), r"bias: expected shape \(6,\)"),
    (dict(w=(6, 8, 1)), r"weight: expected a 2-D tensor"),
])
def test_bad_shapes_raise_value_error(bad, message):
    shapes = dict(x=(5, 8), w=(6, 8), bias=(6,), a=(3, 8), b=(6, 3)) | bad
    t = {k: torch.randn(*s, device=DEVICE) for k, s in shapes.items()}
    with pytest.raises(ValueError, match=message):
        lora_linear(t["x"], t["w"], t["bias"], t["a"], t["b"])


@needs_triton
def test_strided_bias():
    """A bias that is a strided view (a column of a fused table): the kernels read biases as contiguous, so the op
    hands them a contiguous one."""
    torch.manual_seed(6)
    x, w, b, a, bb = _inputs((4,), 7, 5, 3, torch.float32)
    strided = torch.randn(5, 2, device=DEVICE)[:, 0]
    assert strided.stride(0) == 2
    torch.testing.assert_close(lora_linear(x, w, strided, a, bb, scale=0.5),
                               lora_linear(x, w, strided.contiguous(), a, bb, scale=0.5))


def test_bad_dtype_device_and_dropout_raise_value_error():
    x, w, a, b = (torch.randn(*s, device=DEVICE) for s in [(5, 8), (6, 8), (3, 8), (6, 3)])
    with pytest.raises(ValueError, match=r"lora_B: expected dtype torch.float32"):
        lora_linear(x, w, None, a, b.half())
    with pytest.raises(ValueError, match=r"dropout"):
        lora_linear(x, w, None, a, b, dropout=1.0)
    if CUDA:
        with pytest.raises(ValueError, match=r"lora_A: expected device"):
            lora_linear(x, w, None, a.cpu(), b)


def test_backend_env(monkeypatch):
    x = torch.randn(3, 4, device=DEVICE)
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    assert not triton_enabled(x)
    monkeypatch.setenv("PTLM_BACKEND", "triton")
    assert triton_enabled(x)
    monkeypatch.setenv("PTLM_BACKEND", "cuda")
    with pytest.raises(ValueError, match="PTLM_BACKEND"):
        triton_enabled(x)
    monkeypatch.delenv("PTLM_BACKEND")
    assert triton_enabled(x) == (CUDA or K.INTERPRETED)


def test_reference_backend_matches_float64(monkeypatch):
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    torch.manual_seed(2)
    ts = _inputs((4, 5), 12, 10, 2, torch.float32)
    y = lora_linear(*ts, scale=3.0)
    y64 = reference.lora_linear(*[t.double() for t in ts], 3.0)
    assert_matches(y, y64, None, torch.float32, "y")


@needs_triton
def test_custom_op_passes_opcheck():
    torch.manual_seed(4)
    x, w, b, a, bb = _inputs((9,), 20, 12, 2, torch.float32)
    for seed, p in [(None, 0.0), (torch.tensor([7], device=DEVICE), 0.25)]:
        torch.library.opcheck(lora_linear_fwd, (x, w, b, a, bb, 1.5, p, seed, False),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@needs_triton
def test_torch_compile_fullgraph():
    torch.manual_seed(6)
    ts = _inputs((2, 7), 16, 24, 4, torch.float32)
    compiled = torch.compile(lambda *t: lora_linear(*t, scale=2.0), backend="aot_eager", fullgraph=True)
    y = compiled(*ts)
    y.sum().backward()
    y64 = reference.lora_linear(*[t.double() for t in ts], 2.0)
    assert_matches(y, y64, None, torch.float32, "compiled y")
    assert ts[3].grad is not None and ts[4].grad is not None


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("T", [8, 300])
def test_forward_backward_have_no_host_sync_and_replay_in_a_cuda_graph(T):
    torch.manual_seed(T)
    x, w, b, a, bb = _inputs((T,), 512, 384, 16, torch.bfloat16)
    dy = torch.randn(T, 384, device=DEVICE, dtype=torch.bfloat16)

    def step():
        y = lora_linear(x, w, b, a, bb, scale=2.0, dropout=0.1)
        y.backward(dy)
        return y

    assert_no_host_sync(step)
    with torch.no_grad():
        x_in = x.detach().clone()
        graph, y = captured(lambda: lora_linear(x_in, w, b, a.detach(), bb.detach(), scale=2.0))
        x_in.copy_(torch.randn_like(x_in))                        # new inputs in the same buffer
        graph.replay()
        y64 = reference.lora_linear(x_in.double(), w.double(), b.double(), a.double(), bb.double(), 2.0)
        assert_matches(y, y64, None, torch.bfloat16, "graph replay")
