"""The fused bottleneck-adapter kernels against float64 references: forward and backward, every activation,
with and without a residual and biases, odd shapes, strided inputs, split weight-gradient chunks, poisoned
outputs.

On the CPU these run under TRITON_INTERPRET=1 on small shapes (bf16 is skipped there: the interpreter computes
bf16 dots wrongly); on a GPU the `gpu` tests repeat them at realistic shapes in bf16.
"""
import pytest
import torch

from ptlm_engine import reference
from ptlm_engine.kernels import bottleneck as K
from ptlm_engine.ops.bottleneck import BOTTLENECK_ACT_CODES
from tests.helpers import CUDA, DEVICE, DTYPES, assert_matches, needs_triton, rand

pytestmark = needs_triton
ACTS = list(BOTTLENECK_ACT_CODES)


def _grads(h, wd, bd, wu, bu, residual, act, scale, dy):
    """y and the gradients of h, wd, bd, wu, bu through the reference, in the inputs' own dtype."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (h, wd, bd, wu, bu)]
    y = reference.bottleneck_adapter(*leaves, act, scale, residual)
    y.backward(dy)
    return y.detach(), [None if t is None else t.grad for t in leaves]


def _check_case(T, d, m, act, dtype, residual=False, biases=True, strided=False, rows_per_chunk=None):
    code, scale = BOTTLENECK_ACT_CODES[act], 1.7
    h = rand(T, 2 * d, dtype=dtype)[:, ::2] if strided else rand(T, d, dtype=dtype)
    wd = rand(d, m, dtype=dtype, scale=d ** -0.5).t() if strided else rand(m, d, dtype=dtype, scale=d ** -0.5)
    wu = rand(d, m, dtype=dtype, scale=m ** -0.5)
    bd, bu = (rand(m, dtype=dtype), rand(d, dtype=dtype)) if biases else (None, None)
    res = rand(T, d, dtype=dtype) if residual else None
    dy = rand(T, d, dtype=dtype)
    up64 = lambda t: None if t is None else t.double()
    y64, grads64 = _grads(*map(up64, (h, wd, bd, wu, bu, res)), act, scale, dy.double())
    y_lp, grads_lp = _grads(h, wd, bd, wu, bu, res, act, scale, dy)
    z64 = h.double() @ wd.double().t() + (bd.double() if biases else 0)

    y = torch.full((T, d), float("nan"), device=DEVICE, dtype=dtype)     # poisoned: every element must be written
    _, z = K.bottleneck_forward(h, wd, bd, wu, bu, scale, code, res, out=y)
    assert z.shape == (T, m) and z.dtype == dtype
    assert_matches(y, y64, y_lp, dtype, f"y ({act})")
    assert_matches(z, z64, h @ wd.t() + (bd if biases else 0), dtype, "z")

    dh = torch.full((T, d), float("nan"), device=DEVICE, dtype=dtype)
    out = K.bottleneck_backward(dy, h, z, wd, wu, scale, code, not residual, True, rows_per_chunk, out=dh)
    assert out[0] is dh
    for name, g, g64, g_lp in zip(["dh", "d_down_weight", "d_down_bias", "d_up_weight", "d_up_bias"], out,
                                  grads64, grads_lp):
        if g64 is not None:
            assert g.shape == g64.shape and g.dtype == dtype, name                  # the weights' dtype
            assert_matches(g, g64, g_lp, dtype, f"{name} ({act}, residual={residual})")


@pytest.mark.parametrize("residual", [False, True], ids=["houlsby", "parallel"])
@pytest.mark.parametrize("act", ACTS)
def test_kernels_every_activation(act, residual):
    """T=37 in chunks of 16 rows: three partial weight-gradient sums."""
    torch.manual_seed(ACTS.index(act) + 10 * residual)
    _check_case(37, 72, 24, act, torch.float32, residual, rows_per_chunk=16)


@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
@pytest.mark.parametrize("act,residual", [("gelu", False), ("silu", True)])
def test_kernels_half_precision(act, residual, dtype):
    torch.manual_seed(5 + residual)
    _check_case(29, 72, 24, act, dtype, residual, rows_per_chunk=16)


@pytest.mark.parametrize("T,d,m,act", [(1, 100, 5, "gelu"), (70, 33, 40, "silu"), (19, 64, 16, "relu")])
def test_kernels_odd_shapes(T, d, m, act):
    torch.manual_seed(T + m)
    _check_case(T, d, m, act, torch.float32)


def test_kernels_strided_inputs_and_no_biases():
    torch.manual_seed(3)
    _check_case(21, 40, 9, "gelu", torch.float32, residual=True, biases=False, strided=True)


@pytest.mark.parametrize("T,d,m,act,dtype,residual,biases,strided,rows_per_chunk", [
    (37, 72, 200, "gelu", torch.float32, False, True, False, 16),     # 4 m tiles of 64, the last ragged; 3 chunks
    (21, 40, 128, "silu", torch.float16, True, False, False, None),
    (19, 33, 100, "relu", torch.float32, False, True, True, 8),
])
def test_wide_backward(T, d, m, act, dtype, residual, biases, strided, rows_per_chunk):
    """Widths from WIDE_M_PAD on: the weight gradients in (d, m) tiles, dh its own kernel."""
    assert K.width_tile(m) >= K.WIDE_M_PAD
    torch.manual_seed(T + m)
    _check_case(T, d, m, act, dtype, residual, biases, strided, rows_per_chunk)


@pytest.mark.parametrize("T,d,m,act,dtype,residual,biases,strided", [
    (37, 72, 40, "gelu", torch.float32, False, True, False),     # 2 m tiles of 32, the last ragged
    (21, 40, 9, "silu", torch.float16, True, False, True),
    (1, 33, 16, "relu", torch.float32, True, True, False),
])
def test_split_forward(T, d, m, act, dtype, residual, biases, strided, monkeypatch):
    """Width tiles from SPLIT_FORWARD_M_PAD on (lowered here): z = h Wd^T + bd in its own GEMM, then y from the
    stored z, and the backward's rows kernel in (BLOCK_T, BLOCK_M) tiles; the whole-width kernels never launch.
    Without save_z, y alone (z in a scratch buffer)."""
    monkeypatch.setattr(K, "SPLIT_FORWARD_M_PAD", 16)
    for launcher in (K._forward, K._rows_backward):
        monkeypatch.setattr(launcher, "launch", lambda *a, **k: pytest.fail("a whole-width kernel launched"))
    torch.manual_seed(T + m)
    _check_case(T, d, m, act, dtype, residual, biases, strided)
    h, wd, wu = rand(T, d, dtype=dtype), rand(m, d, dtype=dtype, scale=d ** -0.5), rand(d, m, dtype=dtype)
    y, z = K.bottleneck_forward(h, wd, None, wu, None, 0.5, BOTTLENECK_ACT_CODES[act], save_z=False)
    y_z, _ = K.bottleneck_forward(h, wd, None, wu, None, 0.5, BOTTLENECK_ACT_CODES[act])
    assert z is None and torch.equal(y, y_z)


def test_wide_backward_rule_and_half_width_at_large_d(monkeypatch):
    """The wide pair from WIDE_M_PAD on, and from half of it where d >= WIDE_MIN_D (here lowered to a tiny d)."""
    assert K.wide_backward(4096, 64) and K.wide_backward(128, 128) and not K.wide_backward(768, 64)
    assert not K.wide_backward(4096, 32)
    monkeypatch.setattr(K, "WIDE_MIN_D", 40)
    assert K.wide_backward(41, K.width_tile(50))
    torch.manual_seed(50)
    _check_case(23, 41, 50, "relu", torch.float32, False, True, False, None)


def test_backward_without_dh_and_empty_token_dimension():
    torch.manual_seed(4)
    h, wd, wu = rand(11, 24, dtype=torch.float32), rand(6, 24, dtype=torch.float32), rand(24, 6, dtype=torch.float32)
    _, z = K.bottleneck_forward(h, wd, None, wu, None, 1.0, 0)
    dh, d_wd, *_ = K.bottleneck_backward(torch.ones_like(h), h, z, wd, wu, 1.0, 0, True, False)
    assert dh is None and torch.isfinite(d_wd).all()
    empty = torch.empty(0, 24, device=DEVICE)
    y, z = K.bottleneck_forward(empty, wd, None, wu, None, 1.0, 0)
    assert y.shape == (0, 24) and z.shape == (0, 6)
    dh, d_wd, d_bd, d_wu, d_bu = K.bottleneck_backward(empty, empty, z, wd, wu, 1.0, 0, True, True)
    assert dh.shape == (0, 24) and not d_wd.any() and d_bd.shape == (6,) and not d_wu.any() and d_bu.shape == (24,)


@pytest.mark.parametrize("m", [12, 130], ids=["narrow", "wide"])
def test_chunked_weight_gradients_are_deterministic_and_leave_the_counters_zero(m):
    """The last chunk of each gradient tile sums every chunk's partials in chunk order: a second launch gives the
    same bits, and the arrival counters are zero again after each (as a CUDA graph replay needs)."""
    from ptlm_engine.kernels.split_state import split_state
    torch.manual_seed(6)
    h, dy = rand(45, 80, dtype=torch.float32), rand(45, 80, dtype=torch.float32)
    wd, wu = rand(m, 80, dtype=torch.float32, scale=0.1), rand(80, m, dtype=torch.float32, scale=0.3)
    _, z = K.bottleneck_forward(h, wd, None, wu, None, 1.3, 2)
    first = K.bottleneck_backward(dy, h, z, wd, wu, 1.3, 2, True, True, rows_per_chunk=8)   # 6 chunks
    assert not split_state(h.device, 1, 0)[0].any()
    second = K.bottleneck_backward(dy, h, z, wd, wu, 1.3, 2, True, True, rows_per_chunk=8)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    whole = K.bottleneck_backward(dy, h, z, wd, wu, 1.3, 2, True, True, rows_per_chunk=64)  # one chunk
    for a, b in zip(first[1:], whole[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_activation_codes_match_the_kernels():
    assert BOTTLENECK_ACT_CODES == {"relu": K.RELU.value, "gelu": K.GELU.value, "silu": K.SILU.value}


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("residual", [False, True], ids=["houlsby", "parallel"])
@pytest.mark.parametrize("T,d,m,act", [(4096, 4096, 64, "relu"), (2049, 768, 256, "gelu"), (3, 4096, 48, "silu")])
def test_kernels_realistic_shapes(T, d, m, act, residual):
    torch.manual_seed(T + m)
    _check_case(T, d, m, act, torch.bfloat16, residual)
