"""LoraLinear on its own: parameters and keys, forward and gradients against plain PyTorch, merging, dtypes,
dropout, several adapters, and the Triton kernels through the layer."""
import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import ptlm_engine as pe
from ptlm_engine.layers import LoraLinear
from tests.helpers import max_abs_diff, needs_triton, randomize_trainable64


def _layer(kind="linear", bias=True, d_in=24, d_out=40, r=4, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out, bias=bias) if kind == "linear" else Conv1D(d_out, d_in)
    layer = LoraLinear(base, fan_in_fan_out=kind == "conv1d")
    layer.add_adapter("a", r=r, scale=2.0, dropout=0.0)
    with torch.no_grad():
        layer.lora_B["a"].weight.normal_()
    return base, layer


def _expected(layer, x, name="a"):
    """Plain PyTorch: x W0ᵀ + b + scale · x Aᵀ Bᵀ."""
    w = layer.weight.t() if layer.fan_in_fan_out else layer.weight                  # (d_out, d_in)
    y = x @ w.t() + (0 if layer.bias is None else layer.bias)
    return y + layer.scale[name] * (x @ layer.lora_A[name].weight.t()) @ layer.lora_B[name].weight.t()


@pytest.fixture(autouse=True)
def _reference(reference_backend):
    pass


def test_holds_base_parameters_under_their_own_names():
    base, layer = _layer()
    assert layer.weight is base.weight and layer.bias is base.bias
    assert layer.original_module is base and base not in list(layer.modules())
    assert sorted(layer.state_dict()) == ["bias", "lora_A.a.weight", "lora_B.a.weight", "weight"]
    assert layer.lora_A["a"].weight.shape == (4, 24) and layer.lora_B["a"].weight.shape == (40, 4)


def test_new_adapter_is_identity_with_peft_init():
    base, layer = _layer()
    layer.add_adapter("b", r=8, scale=1.0, dropout=0.0)
    layer.active_adapter = "b"
    assert torch.count_nonzero(layer.lora_B["b"].weight) == 0
    bound = 1 / math.sqrt(24)   # kaiming_uniform(a=sqrt(5)) on fan_in 24
    a = layer.lora_A["b"].weight
    assert a.abs().max() <= bound and a.std() > 0.2 * bound
    x = torch.randn(3, 24)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)


@pytest.mark.parametrize("kind,bias", [("linear", True), ("linear", False), ("conv1d", True)])
def test_forward_and_grads_match_plain_pytorch(kind, bias):
    _, layer = _layer(kind, bias)
    layer.active_adapter = "a"
    layer.weight.requires_grad_(False)
    x = torch.randn(2, 5, 24, requires_grad=True)                                   # (B, T, d_in)
    y = layer(x)
    assert y.shape == (2, 5, 40)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, layer.lora_A["a"].weight, layer.lora_B["a"].weight], dy)
    y_ref = _expected(layer, x)
    grads_ref = torch.autograd.grad(y_ref, [x, layer.lora_A["a"].weight, layer.lora_B["a"].weight], dy)
    torch.testing.assert_close(y, y_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


def test_no_active_adapter_or_disabled_is_the_base_layer():
    base, layer = _layer("conv1d")
    x = torch.randn(3, 24)
    torch.testing.assert_close(layer(x), base(x))                                    # none active
    layer.active_adapter = "a"
    layer.adapters_enabled = False
    torch.testing.assert_close(layer(x), base(x))


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_then_unmerge(kind):
    base, layer = _layer(kind)
    layer.active_adapter = "a"
    x = torch.randn(3, 24)
    w0 = base.weight.detach().clone()
    y = layer(x)
    layer.merge("a")
    assert layer.merged_adapter == "a"
    torch.testing.assert_close(base(x), y)                                           # the base weight itself holds it
    torch.testing.assert_close(layer(x), y)
    with pytest.raises(ValueError, match="already merged"):
        layer.merge("a")
    layer.unmerge()
    torch.testing.assert_close(base.weight, w0)
    torch.testing.assert_close(layer(x), y)


def test_bf16_base_with_fp32_adapter():
    torch.manual_seed(0)
    base = nn.Linear(24, 40).to(torch.bfloat16)
    layer = LoraLinear(base, fan_in_fan_out=False)
    layer.add_adapter("a", r=4, scale=2.0, dropout=0.0)
    layer.active_adapter = "a"
    a, b = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    assert a.dtype == b.dtype == torch.float32                                       # full-precision trainables
    with torch.no_grad():
        b.normal_()
    x = torch.randn(3, 24, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16                                                 # what the base returns
    y.float().sum().backward()
    assert a.grad.dtype == b.grad.dtype == torch.float32
    y64 = _expected(layer.double(), x.double())
    torch.testing.assert_close(y.double(), y64, rtol=2e-2, atol=2e-2)


def test_autocast_runs_in_the_autocast_dtype():
    _, layer = _layer()
    layer.active_adapter = "a"
    x = torch.randn(3, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), _expected(layer, x), rtol=3e-2, atol=3e-2)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(24, 40), fan_in_fan_out=False)
    layer.add_adapter("a", r=4, scale=2.0, dropout=0.5)
    layer.active_adapter = "a"
    with torch.no_grad():
        layer.lora_B["a"].weight.normal_()
    x = torch.randn(16, 24)
    layer.eval()
    torch.testing.assert_close(layer(x), _expected(layer, x))
    layer.train()
    assert not torch.allclose(layer(x), _expected(layer, x))


def test_several_adapters_one_active():
    base, layer = _layer()
    layer.add_adapter("b", r=2, scale=0.5, dropout=0.0)
    with torch.no_grad():
        layer.lora_B["b"].weight.normal_()
    x = torch.randn(3, 24)
    for name in ("a", "b"):
        layer.active_adapter = name
        torch.testing.assert_close(layer(x), _expected(layer, x, name))
    layer.remove_adapter("b")
    assert layer.active_adapter is None and list(layer.lora_A) == ["a"] and "b" not in layer.scale
    torch.testing.assert_close(layer(x), base(x))


@needs_triton
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_triton_kernels_through_the_layer(kind, monkeypatch):
    _, layer = _layer(kind, d_in=40, d_out=24)
    layer.active_adapter = "a"
    x = torch.randn(6, 40, requires_grad=True)
    params = [x, layer.lora_A["a"].weight, layer.lora_B["a"].weight]
    monkeypatch.setenv("PTLM_BACKEND", "triton")
    y = layer(x)
    grads = torch.autograd.grad(y.square().sum(), params)
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    y_ref = layer(x)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), params)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)


def _graph_nodes(t):
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo += [n for n, _ in node.next_functions]
    return [n.name() for n in seen]


@needs_triton
def test_training_a_float32_adapter_on_a_half_base_casts_nothing(monkeypatch):
    """With the kernels the float32 Parameters go into the op as they are: no cast in the autograd graph (a
    launch each way per layer call), float32 gradients matching the reference path's (which casts)."""
    torch.manual_seed(4)
    layer = LoraLinear(nn.Linear(40, 24).half(), fan_in_fan_out=False)
    layer.add_adapter("a", r=4, scale=2.0, dropout=0.0)
    layer.active_adapter = "a"
    with torch.no_grad():
        layer.lora_B["a"].weight.normal_()
    params = [layer.lora_A["a"].weight, layer.lora_B["a"].weight]
    x = torch.randn(7, 40, dtype=torch.float16)
    monkeypatch.setenv("PTLM_BACKEND", "triton")
    y = layer(x)
    assert "ToCopyBackward0" not in _graph_nodes(y)
    grads = torch.autograd.grad(y.float().square().sum(), params)
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    y_ref = layer(x)
    grads_ref = torch.autograd.grad(y_ref.float().square().sum(), params)
    torch.testing.assert_close(y, y_ref, rtol=2e-3, atol=2e-3)
    for g, g_ref in zip(grads, grads_ref):     # the reference's own fp16 error is ~4e-4 of the largest element
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, g_ref, rtol=0, atol=2e-3 * g_ref.abs().max().item())


def test_compiles_without_graph_breaks():
    _, layer = _layer("conv1d")
    layer.active_adapter = "a"
    x = torch.randn(2, 5, 24, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, _expected(layer, x))
    y.sum().backward()
    assert layer.lora_A["a"].weight.grad is not None and x.grad is not None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_serving_a_float32_adapter_on_a_half_base_reads_the_pool_copy(dtype, monkeypatch):
    """Without gradients the layer reads the adapter from its pool (already in the compute dtype) rather than
    casting it at every call; the output matches the training path's (which reads the float32 B as it is: one
    rounding of B apart) and follows edits of the Parameters."""
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    torch.manual_seed(3)
    base = nn.Linear(24, 40).to(dtype)
    layer = LoraLinear(base, fan_in_fan_out=False)
    layer.add_adapter("a", r=4, scale=2.0, dropout=0.0)
    layer.active_adapter = "a"
    assert layer.lora_A["a"].weight.dtype == torch.float32
    with torch.no_grad():
        layer.lora_B["a"].weight.normal_()
    x = torch.randn(5, 24, dtype=dtype)
    for _ in range(2):
        with torch.no_grad():
            served = layer(x)
        traced = layer(x)                                    # gradients enabled: the casts run in the graph
        assert traced.requires_grad and not served.requires_grad
        atol = 2 * torch.finfo(dtype).eps * traced.abs().max().item()           # B's rounding, at the output
        torch.testing.assert_close(served, traced.detach(), rtol=0, atol=atol)
        with torch.no_grad():
            layer.lora_B["a"].weight.mul_(-2.0)                # an edit the next served call must see
    assert layer.pool.dtype == dtype


# ----------------------------------------------------------------------------- float64 models, autocast
F64_TOL = 1e-12       # float64 computations here are exact to ~1e-15 relative; float32 rounding shows at ~1e-8


# ----------------------------------------------------------------------------------------------- float64 merge
def test_merge_unmerge_float64_keeps_float64_precision(tiny, ids, output):
    """A float64 model: merge_adapter gives the unmerged outputs and unmerge gives back W0, both to float64
    precision, as PEFT's merge does (it computes the delta in the weight's dtype: merged outputs equal the unmerged
    ones to ~1e-16, unmerge restores W0 to ~1e-17). A merge through float32 would be ~1e-8 off. Tolerance 1e-12,
    far above float64 rounding, far below float32's."""
    model = tiny("llama").double()
    pe.add_adapter(model, "a", pe.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_trainable64(model)
    weight = model.model.layers[0].self_attn.q_proj.weight
    w0 = weight.detach().clone()
    with torch.no_grad():
        unmerged = output(model, ids)
    pe.merge_adapter(model, "a")
    with torch.no_grad():
        merged = output(model, ids)
    pe.unmerge_adapter(model, "a")
    assert weight.dtype == torch.float64
    err_out, err_w = max_abs_diff(merged, unmerged), max_abs_diff(weight, w0)
    assert err_out < F64_TOL, f"merged outputs differ from unmerged by {err_out:.2e}"
    assert err_w < F64_TOL, f"unmerge restored W0 only to {err_w:.2e}"


def test_unload_merge_float64_matches_exact_merge(tiny):
    """unload(merge=True) on a float64 model leaves W0 + scale·B·A computed in float64 (what PEFT's
    merge_and_unload gives), not W0 rounded through float32 (~1e-8 off). Tolerance 1e-12."""
    model = tiny("llama").double()
    pe.add_adapter(model, "a", pe.LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    randomize_trainable64(model)
    layer = model.model.layers[0].self_attn.q_proj
    expected = layer.weight.detach() + 2.0 * layer.lora_B["a"].weight.detach() @ layer.lora_A["a"].weight.detach()
    pe.unload(model, merge=True)
    got = model.model.layers[0].self_attn.q_proj.weight
    assert got.dtype == torch.float64
    err = max_abs_diff(got, expected)
    assert err < F64_TOL, f"merged weight off by {err:.2e}"


# ------------------------------------------------------------------------------------- autocast on float64
@pytest.mark.parametrize("config", [
    pe.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
    pe.PrefixConfig(num_virtual_tokens=3),
    pe.BottleneckConfig(bottleneck=8),
], ids=["lora", "prefix", "bottleneck"])
def test_autocast_leaves_float64_model_in_float64(tiny, ids, output, config):
    """torch.autocast never casts float64 tensors (they are not autocast-eligible): a float64 model runs in float64
    inside `torch.autocast("cpu", dtype=torch.bfloat16)`, the base model and HF PEFT's LoRA / prefix models alike.
    So do our LoRA, prefix and bottleneck layers: the same float64 outputs as outside autocast, to 1e-12
    (regression: they cast to bf16 whenever autocast was on, and crashed on bf16 / float64 mixes or came out
    ~1e-3 off)."""
    model = tiny("llama").double()
    pe.add_adapter(model, "a", config)
    randomize_trainable64(model)
    with torch.no_grad():
        expected = output(model, ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = output(model, ids)
    assert got.dtype == torch.float64
    err = max_abs_diff(got, expected)
    assert err < F64_TOL, f"under autocast the float64 model's outputs moved by {err:.2e}"
