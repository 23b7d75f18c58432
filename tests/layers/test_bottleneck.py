"""BottleneckLayer on its own, hooked on a toy sub-layer: parameters, identity at init, forward and gradients
against the formula in float64, sequential and parallel adapters, mixed batches (pool and stacked Parameters),
dtypes, the pool following parameter updates, disabling, removal and hooks."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ptlm_engine.layers.bottleneck import LAYER_NAME, BottleneckLayer
from ptlm_engine.pool import AdapterBatch

D = 24
ACT = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


class SubLayer(nn.Module):
    """A sub-layer like Llama's attention: called with keywords, returns (output, extra) when `tuple_out`."""

    def __init__(self, tuple_out: bool):
        super().__init__()
        self.proj = nn.Linear(D, D)
        self.tuple_out = tuple_out

    def forward(self, hidden_states):
        y = torch.tanh(self.proj(hidden_states))
        return (y, "extra") if self.tuple_out else y


@pytest.fixture(autouse=True)
def _reference(reference_backend):
    pass


def _site(tuple_out=False, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    site = SubLayer(tuple_out).to(dtype)
    layer = BottleneckLayer(site, site, D)
    site.add_module(LAYER_NAME, layer)
    return site, layer


def _add(layer, name, m, act="relu", scale=1.0, parallel=False, slot=None, dtype=torch.float32, seed=1,
         layer_norm=False):
    """An adapter (with its LayerNorm where asked), every parameter random (the LayerNorm's weight around 1)."""
    layer.add_adapter(name, m, act, scale, parallel, slot, device=torch.device("cpu"), base_dtype=dtype,
                      layer_norm=layer_norm)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.adapter_parameters(name):
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
        if layer_norm:
            layer.layer_norm[name].weight.add_(1.0)


def _out(site, x):
    y = site(hidden_states=x)
    return y[0] if isinstance(y, tuple) else y


def _expected(site, layer, name, x):
    """The formula in float64: out + s · (act(h Dᵀ + b_d) Uᵀ + b_u), h = out (sequential) or x (parallel), put
    through the adapter's LayerNorm where it has one."""
    down_w, down_b, up_w, up_b, *norm = (p.double() for p in layer.adapter_parameters(name))
    out = torch.tanh(x.double() @ site.proj.weight.double().T + site.proj.bias.double())
    h = x.double() if layer.parallel[name] else out
    if norm:
        h = F.layer_norm(h, (D,), *norm, 1e-5)
    return out + layer.scale[name] * (ACT[layer.act[name]](h @ down_w.T + down_b) @ up_w.T + up_b)


def _assert_forward_and_grads(site, layer, x, grad_rtol):
    """Adapter "a" active: the output, and the gradients of x and of every adapter parameter, match _expected's
    through float64 autograd. Returns the parameters."""
    y = _out(site, x)
    ref = _expected(site, layer, "a", x)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    params = layer.adapter_parameters("a")
    grads = torch.autograd.grad(ref, [x, *params], g.double())
    for got, want in zip([x.grad, *(p.grad for p in params)], grads):
        torch.testing.assert_close(got, want, rtol=grad_rtol, atol=1e-5)
    return params


def test_parameters_keys_and_identity_at_init():
    site, layer = _site(tuple_out=True)
    x = torch.randn(2, 5, D)
    base = site(hidden_states=x)
    layer.add_adapter("a", 7, "relu", 1.0, False, device=torch.device("cpu"), base_dtype=torch.float32)
    layer.active_adapter = "a"
    assert sum(p.numel() for p in layer.adapter_parameters("a")) == 2 * 7 * D + D + 7
    assert sorted(k for k in site.state_dict() if LAYER_NAME in k) == [
        f"{LAYER_NAME}.{leaf}" for leaf in ("down.a.bias", "down.a.weight", "up.a.bias", "up.a.weight")]
    down_w, down_b, up_w, up_b = layer.adapter_parameters("a")
    bound = 1 / math.sqrt(D)                              # kaiming_uniform(a=sqrt(5)) on fan_in D
    assert down_w.abs().max() <= bound and down_w.std() > 0.2 * bound
    assert not down_b.any() and not up_w.any() and not up_b.any()
    y = site(hidden_states=x)
    assert y[1] == "extra" and torch.equal(y[0], base[0])


@pytest.mark.parametrize("act", ["relu", "gelu", "silu"])
@pytest.mark.parametrize("parallel", [False, True])
def test_forward_and_grads_match_the_formula(act, parallel):
    site, layer = _site(tuple_out=parallel)
    _add(layer, "a", 5, act, scale=1.5, parallel=parallel)
    layer.active_adapter = "a"
    x = torch.randn(3, 4, D, requires_grad=True)
    _assert_forward_and_grads(site, layer, x, grad_rtol=1e-5)
    assert site.proj.weight.grad is not None      # the toy base trains here: nothing in the layer freezes it


def test_disabled_and_inactive_give_the_base_output():
    site, layer = _site()
    x = torch.randn(2, 3, D)
    base = _out(site, x)
    _add(layer, "a", 4)
    assert torch.equal(_out(site, x), base)        # no adapter active
    layer.active_adapter = "a"
    assert not torch.equal(_out(site, x), base)
    layer.adapters_enabled = False
    assert torch.equal(_out(site, x), base)


def _layer_with_three(tuple_out=True):
    """Adapters in slots 0 (sequential, relu, m=3), 2 (parallel, gelu, m=6, scale 2), 3 (sequential, silu, m=5);
    slot 1 stands for another method's adapter, which this layer lacks."""
    site, layer = _site(tuple_out)
    _add(layer, "a", 3, "relu", 1.0, False, slot=0, seed=1)
    _add(layer, "b", 6, "gelu", 2.0, True, slot=2, seed=2)
    _add(layer, "c", 5, "silu", 0.5, False, slot=3, seed=3)
    return site, layer


MAPPING = ["a", None, "b", "other", "c", "a"]
SLOT_OF = {"a": 0, "other": 1, "b": 2, "c": 3}


def _alone(site, layer, name, x):
    layer.active_adapter = name
    return _out(site, x)


def _assert_rows_match_alone(site, layer, mapping, slot_of, x, grad):
    """Each row of the mixed batch equals that row run alone with its adapter active. Returns the mixed output."""
    layer.set_batch(AdapterBatch(mapping, slot_of, [x.device]))
    with torch.set_grad_enabled(grad):
        mixed = _out(site, x)
    layer.set_batch(None)
    for row, name in enumerate(mapping):
        alone = _alone(site, layer, name if name in layer.down else None, x[row:row + 1])
        torch.testing.assert_close(mixed[row], alone[0], msg=f"row {row} ({name})")
    return mixed


def _assert_grads_from_own_rows(site, layer, mapping, slot_of, names):
    """The base frozen, each adapter's gradient from the mixed batch equals its rows' run alone. Returns the mixed
    batch's gradients per adapter."""
    for p in site.proj.parameters():
        p.requires_grad_(False)
    x = torch.randn(len(mapping), 4, D)
    g = torch.randn(len(mapping), 4, D)
    layer.set_batch(AdapterBatch(mapping, slot_of, [x.device]))
    (_out(site, x) * g).sum().backward()
    layer.set_batch(None)
    mixed = {n: [p.grad.clone() for p in layer.adapter_parameters(n)] for n in names}
    for n in names:
        for p in layer.adapter_parameters(n):
            p.grad = None
        rows = [i for i, m in enumerate(mapping) if m == n]
        (_alone(site, layer, n, x[rows]) * g[rows]).sum().backward()
        for got, p in zip(mixed[n], layer.adapter_parameters(n)):
            torch.testing.assert_close(got, p.grad, msg=n)
    return mixed


@pytest.mark.parametrize("grad", [False, True])
def test_mixed_batch_rows_match_each_adapter_alone(grad):
    site, layer = _layer_with_three()
    _assert_rows_match_alone(site, layer, MAPPING, SLOT_OF, torch.randn(len(MAPPING), 4, D), grad)


def test_mixed_batch_gradients_reach_each_adapter_from_its_rows():
    site, layer = _layer_with_three()
    _assert_grads_from_own_rows(site, layer, MAPPING, SLOT_OF, "abc")


def test_pool_follows_parameter_updates():
    site, layer = _layer_with_three()
    x = torch.randn(len(MAPPING), 4, D)
    batch = AdapterBatch(MAPPING, SLOT_OF, [x.device])
    layer.set_batch(batch)
    with torch.no_grad():
        _out(site, x)
        layer.up["b"].bias.add_(1.0)                                      # in place: version bump
        layer.down["a"].weight = nn.Parameter(torch.randn_like(layer.down["a"].weight))   # a new Parameter
        mixed = _out(site, x)
    layer.set_batch(None)
    for row in (0, 2):
        torch.testing.assert_close(mixed[row], _alone(site, layer, MAPPING[row], x[row:row + 1])[0])


def test_half_base_keeps_float32_adapters_and_its_own_dtype():
    site, layer = _site(dtype=torch.float16)
    _add(layer, "a", 4, "gelu", 1.0, True, dtype=torch.float16)
    assert all(p.dtype == torch.float32 for p in layer.adapter_parameters("a"))
    layer.active_adapter = "a"
    x = torch.randn(2, 3, D, dtype=torch.float16)
    with torch.no_grad():
        served = _out(site, x)                                           # the pool's fp16 copy
    trained = _out(site, x)                                              # the Parameters cast in the graph
    assert served.dtype == torch.float16 and layer.pool.dtype == torch.float16
    torch.testing.assert_close(served, trained, rtol=0, atol=0)
    torch.testing.assert_close(served.double(), _expected(site, layer, "a", x), rtol=2e-2, atol=2e-2)
    trained.sum().backward()
    assert layer.down["a"].weight.grad.dtype == torch.float32


def test_moving_the_model_moves_the_pool():
    site, layer = _layer_with_three()
    x = torch.randn(len(MAPPING), 4, D, dtype=torch.float64)
    site.double()
    layer.set_batch(AdapterBatch(MAPPING, SLOT_OF, [x.device]))
    with torch.no_grad():
        mixed = _out(site, x)
    layer.set_batch(None)
    assert mixed.dtype == torch.float64 and layer.pool.dtype == torch.float64
    torch.testing.assert_close(mixed[2], _expected(site, layer, "b", x[2]))   # float64 throughout


def test_remove_and_release_undo_the_hooks():
    site, layer = _site()
    reads = SubLayer(False)
    layer.__dict__["reads"] = reads
    _add(layer, "a", 4, parallel=False)
    assert len(site._forward_hooks) == 1 and not reads._forward_pre_hooks
    _add(layer, "b", 4, parallel=True, slot=1)
    _add(layer, "c", 4, parallel=True, slot=2)
    assert len(reads._forward_pre_hooks) == 1
    layer.remove_adapter("b")
    assert len(reads._forward_pre_hooks) == 1
    layer.remove_adapter("c")
    assert not reads._forward_pre_hooks and layer.pool.sizes.tolist()[1:3] == [0, 0]
    assert layer.release() is None
    assert not site._forward_hooks and not site._forward_pre_hooks


def test_deepcopy_hooks_the_copy():
    site, layer = _site(tuple_out=True)
    _add(layer, "a", 4, "silu", 1.0, True)
    layer.active_adapter = "a"
    clone = copy.deepcopy(site)
    x = torch.randn(2, 3, D)
    torch.testing.assert_close(_out(clone, x), _out(site, x))
    with torch.no_grad():
        clone.ptlm_bottleneck.up["a"].bias.add_(1.0)
    assert not torch.allclose(_out(clone, x), _out(site, x))


# ----------------------------------------------------------------------------------- an adapter's own LayerNorm
def test_layer_norm_parameters_and_identity_at_init():
    site, layer = _site()
    x = torch.randn(2, 3, D)
    base = _out(site, x)
    layer.add_adapter("a", 7, "relu", 1.0, False, device=torch.device("cpu"), base_dtype=torch.float32,
                      layer_norm=True)
    layer.add_adapter("b", 7, "relu", 1.0, False, device=torch.device("cpu"), base_dtype=torch.float32)
    assert sum(p.numel() for p in layer.adapter_parameters("a")) == 2 * 7 * D + D + 7 + 2 * D
    assert sum(p.numel() for p in layer.adapter_parameters("b")) == 2 * 7 * D + D + 7      # none unless asked
    norm = layer.layer_norm["a"]
    assert norm.eps == 1e-5 and torch.equal(norm.weight, torch.ones(D)) and not norm.bias.any()
    assert norm.weight.requires_grad and list(layer.layer_norm) == ["a"]
    assert {k for k in site.state_dict() if ".layer_norm." in k} == {f"{LAYER_NAME}.layer_norm.a.weight",
                                                                      f"{LAYER_NAME}.layer_norm.a.bias"}
    layer.active_adapter = "a"
    assert torch.equal(_out(site, x), base)                               # up is zero: still the identity
    layer.remove_adapter("a")
    assert not layer.layer_norm and layer.pool.layer_norms.tolist()[0] is False


@pytest.mark.parametrize("parallel,act", [(False, "gelu"), (True, "silu")])
def test_layer_norm_forward_and_grads_match_plain_pytorch(parallel, act):
    site, layer = _site(tuple_out=parallel)
    _add(layer, "a", 5, act, scale=1.5, parallel=parallel, layer_norm=True)
    layer.active_adapter = "a"
    x = 2.0 * torch.randn(3, 4, D) + 0.5
    x.requires_grad_(True)
    params = _assert_forward_and_grads(site, layer, x, grad_rtol=1e-4)
    assert params[4].grad.abs().sum() > 0 and params[5].grad.abs().sum() > 0


def _layer_with_norms():
    """Slots 0 (sequential, LayerNorm), 1 (another method's), 2 (parallel, none), 3 (sequential, none),
    4 (parallel, LayerNorm)."""
    site, layer = _site(tuple_out=True)
    _add(layer, "a", 3, "relu", 1.0, False, slot=0, seed=1, layer_norm=True)
    _add(layer, "b", 6, "gelu", 2.0, True, slot=2, seed=2)
    _add(layer, "c", 5, "silu", 0.5, False, slot=3, seed=3)
    _add(layer, "d", 4, "gelu", 1.5, True, slot=4, seed=4, layer_norm=True)
    return site, layer


NORM_SLOTS = {"a": 0, "other": 1, "b": 2, "c": 3, "d": 4}


@pytest.mark.parametrize("mapping", [["a", None, "b", "other", "c", "d", "a"],   # with and without LayerNorms
                                     ["d", None, "a", "other"]])                 # every adapter with one
@pytest.mark.parametrize("grad", [False, True])
def test_layer_norm_mixed_batch_rows_match_each_adapter_alone(mapping, grad):
    site, layer = _layer_with_norms()
    x = 2.0 * torch.randn(len(mapping), 4, D) + 0.5
    mixed = _assert_rows_match_alone(site, layer, mapping, NORM_SLOTS, x, grad)
    for row, name in enumerate(mapping):
        if name in ("a", "d"):
            torch.testing.assert_close(mixed[row].double(), _expected(site, layer, name, x[row]), rtol=1e-5,
                                       atol=1e-5)


def test_layer_norm_mixed_batch_gradients_reach_each_adapter_from_its_rows():
    site, layer = _layer_with_norms()
    mixed = _assert_grads_from_own_rows(site, layer, ["a", None, "b", "other", "c", "d", "a"], NORM_SLOTS, "abcd")
    assert len(mixed["a"]) == len(mixed["d"]) == 6


def test_layer_norm_half_base_serves_the_pool_copy_and_follows_updates():
    site, layer = _site(tuple_out=True, dtype=torch.float16)
    _add(layer, "a", 4, "gelu", 1.0, False, slot=0, dtype=torch.float16, layer_norm=True)
    _add(layer, "b", 3, "relu", 1.0, True, slot=1, dtype=torch.float16)
    mapping = ["a", "b", None]
    x = torch.randn(3, 5, D, dtype=torch.float16)
    layer.set_batch(AdapterBatch(mapping, {"a": 0, "b": 1}, [x.device]))
    with torch.no_grad():
        _out(site, x)
        layer.layer_norm["a"].bias.add_(0.5)                           # in place: the pool's copy follows
        served = _out(site, x)
    trained = _out(site, x)                                            # the Parameters stacked, with autograd
    assert layer.pool.dtype == torch.float16
    torch.testing.assert_close(served, trained, rtol=0, atol=0)
    torch.testing.assert_close(served[0].double(), _expected(site, layer, "a", x[0]), rtol=2e-2, atol=2e-2)
    layer.set_batch(None)
    layer.active_adapter = "a"
    with torch.no_grad():
        alone = _out(site, x[:1])                                      # the single-adapter path's pool copy
    torch.testing.assert_close(alone[0].double(), _expected(site, layer, "a", x[0]), rtol=2e-2, atol=2e-2)
