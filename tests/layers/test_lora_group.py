"""Projection groups (inject.link_projection_groups + layers.lora_group): a linked tiny Llama with LoRA on all
seven projections gives the unlinked model's outputs and gradients, with one adapter active and in a mixed
batch, in one grouped launch per group; kept outputs are never stale; linking follows the model's adapters."""
import copy
import zlib

import pytest
import torch
from torch import nn

import ptlm_engine as pe
from ptlm_engine import inject
from ptlm_engine.kernels import lora as K
from ptlm_engine.kernels import lora_multi as multi_kernels
from ptlm_engine.kernels.configs import TunedLauncher

pytestmark = [pytest.mark.skipif(not (torch.cuda.is_available() or K.INTERPRETED),
                                 reason="groups run the Triton kernels: needs CUDA or TRITON_INTERPRET=1"),
              pytest.mark.filterwarnings("ignore::UserWarning")]
ALL_SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _randomize_lora(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(zlib.crc32(name.encode()))))


@pytest.fixture
def llama(tiny):
    """Tiny Llama, adapters in its first block (the interpreter is slow): "a" (r=4) on all seven projections, "b"
    (r=8) on q, v and up only (so k and gate are group members without "b")."""
    model = tiny("llama")
    pe.add_adapter(model, "a", pe.LoraConfig(r=4, alpha=8, target_modules=ALL_SEVEN, layers_to_transform=[0]))
    pe.add_adapter(model, "b", pe.LoraConfig(r=8, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                             layers_to_transform=[0]))
    _randomize_lora(model)
    return model


@pytest.fixture
def launches(monkeypatch):
    """The names of the Triton kernels launched, in order."""
    names = []
    launch = TunedLauncher.launch

    def counting(self, key, grid, *args, **kwargs):
        names.append(self.autotuner.fn.__name__)
        return launch(self, key, grid, *args, **kwargs)
    monkeypatch.setattr(TunedLauncher, "launch", counting)
    return names


def _ids(rows, length, seed=1):
    return torch.randint(0, 128, (rows, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_one_adapter_matches_the_unlinked_model(llama, launches):
    ids = _ids(2, 8)
    assert inject.link_projection_groups(llama) == 2                     # q/k/v and gate/up
    # One launch per group at 16 tokens (decode), members without "b" included; "a" also has o_proj, down_proj.
    expected = {"a": ["_grouped_matmul_kernel", "_lora_decode_kernel"] * 2, "b": ["_grouped_matmul_kernel"] * 2}
    for name in ("a", "b"):
        pe.set_active_adapter(llama, name)
        launches.clear()
        linked = _logits(llama, ids)
        assert launches == expected[name]
        inject.unlink_projection_groups(llama)
        torch.testing.assert_close(linked, _logits(llama, ids), rtol=1e-5, atol=1e-5)
        inject.link_projection_groups(llama)


def test_prefill_leaves_members_without_the_adapter_to_cublas(llama, launches):
    """At 80 tokens k and gate (without "b") run their base layers (cuBLAS): q and v one shrink and one matmul
    launch, up_proj alone its own shrink and matmul."""
    pe.set_active_adapter(llama, "b")
    ids = _ids(2, 40)
    inject.link_projection_groups(llama)
    launches.clear()
    linked = _logits(llama, ids)
    assert launches == ["_grouped_shrink_kernel", "_grouped_matmul_kernel", "_lora_shrink_kernel",
                        "_lora_matmul_kernel"]
    inject.unlink_projection_groups(llama)
    torch.testing.assert_close(linked, _logits(llama, ids), rtol=1e-5, atol=1e-5)


def test_training_gradients_match_the_unlinked_model(llama):
    ids = _ids(2, 6)
    llama.train()
    grads = []
    for link in (False, True):
        if link:
            inject.link_projection_groups(llama)
        llama(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in llama.named_parameters() if p.grad is not None})
        llama.zero_grad(set_to_none=True)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 7
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)


def test_mixed_batch_matches_the_unlinked_model(llama, launches):
    ids = _ids(3, 5)
    llama.train()                                                        # grads of both adapters, no dropout
    results = []
    for link in (False, True):
        if link:
            inject.link_projection_groups(llama)
        with pe.adapter_batch(llama, ["a", None, "b"]):
            launches.clear()
            logits = llama(input_ids=ids).logits
            forward = list(launches)
            logits.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in llama.named_parameters() if p.grad is not None}
        results.append((logits.detach(), grads))
        llama.zero_grad(set_to_none=True)
    # per group one shared shrink and one matmul launch; o_proj and down_proj alone (15 tokens: decode kernels);
    # each a single launch with the shrink on its own programs (PTLM_MULTI_SHRINK_PROGRAMS=1)
    if multi_kernels.SHRINK_PROGRAMS:
        assert forward == ["_grouped_multi_matmul_kernel", "_multi_decode_kernel"] * 2
    else:
        assert forward == ["_grouped_multi_shrink_kernel", "_grouped_multi_matmul_kernel", "_multi_shrink_kernel",
                           "_multi_decode_kernel"] * 2
    (y0, g0), (y1, g1) = results
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    assert g0.keys() == g1.keys() and any(".lora_B.b." in n for n in g0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=n)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(12, 10), nn.Linear(12, 6, bias=False), nn.Linear(12, 6)


def _block():
    torch.manual_seed(0)
    block = _Block()
    pe.add_adapter(block, "a", pe.LoraConfig(r=2, alpha=4, target_modules=["q", "k", "v"]))
    _randomize_lora(block)
    assert inject.link_projection_groups(block, [("q", "k", "v")]) == 1
    return block


def _alone(block, name, x):
    """The layer's own path (its group's link bypassed)."""
    layer = getattr(block, name)
    group, layer.group = layer.group, None
    try:
        return layer(x)
    finally:
        layer.group = group


def test_kept_outputs_are_never_stale(launches):
    block = _block()
    x = torch.randn(3, 12)
    with torch.no_grad():
        q = block.q(x)
        x.add_(1.0)                                      # in place: the outputs kept for k and v are stale
        k, v = block.k(x), block.v(x)
        for name, y in (("q", q), ("k", k), ("v", v)):
            torch.testing.assert_close(y, _alone(block, name, x - 1.0 if name == "q" else x), rtol=1e-5, atol=1e-6)
        launches.clear()
        k2 = block.k(x)                                  # k twice on one x: no kept output to reuse wrongly
        torch.testing.assert_close(k2, k)
        assert block.v(x) is not None and block.q(torch.randn(3, 12)).shape == (3, 10)
    y_grad = block.q(x)                                  # kept under no_grad, asked for with grad enabled:
    assert block.k(x).requires_grad and y_grad.requires_grad   # recomputed, not the kept no-grad output
    with torch.inference_mode():                         # no version counter to check: each layer alone
        launches.clear()
        x_inf = torch.randn(3, 12)
        ys = [getattr(block, n)(x_inf) for n in "qkv"]
        assert launches == ["_lora_decode_kernel"] * 3
        torch.testing.assert_close(ys[1], _alone(block, "k", x_inf))


def test_a_group_whose_members_read_different_inputs_stops_fusing(launches):
    block = _block()
    x, other = torch.randn(4, 12), torch.randn(4, 12)
    with torch.no_grad():
        for _ in range(2):                                # cross-attention-like: k and v read another input
            ys = block.q(x), block.k(other), block.v(other)
            for name, y, inp in zip("qkv", ys, (x, other, other)):
                torch.testing.assert_close(y, _alone(block, name, inp), rtol=1e-5, atol=1e-6)
        launches.clear()
        block.q(x), block.k(other), block.v(other)
    assert launches == ["_lora_decode_kernel"] * 3


def test_state_changes_fall_back_to_each_layer(launches):
    block = _block()
    x = torch.randn(2, 12)
    with torch.no_grad():
        pe.merge_adapter(block, "a")                      # merged: every layer its own base GEMM
        launches.clear()
        merged = [getattr(block, n)(x) for n in "qkv"]
        assert launches == []
        pe.unmerge_adapter(block, "a")
        with pe.disable_adapters(block):
            assert [getattr(block, n)(x).shape[-1] for n in "qkv"] == [10, 6, 6] and launches == []
        launches.clear()
        fused = [getattr(block, n)(x) for n in "qkv"]
        assert launches == ["_grouped_matmul_kernel"]
    for y_merged, y in zip(merged, fused):
        torch.testing.assert_close(y_merged, y, rtol=1e-4, atol=1e-5)


def test_linking_follows_the_models_adapters(tiny, llama):
    assert inject.link_projection_groups(llama) == inject.link_projection_groups(llama) == 2   # idempotent
    layers = dict(inject.lora_layers(llama))
    group = layers["model.layers.0.self_attn.q_proj"].group
    assert group.members == [layers[f"model.layers.0.self_attn.{n}"] for n in ("q_proj", "k_proj", "v_proj")]
    copied = copy.deepcopy(llama)                                          # groups follow the copy's own layers
    copied_q = dict(inject.lora_layers(copied))["model.layers.0.self_attn.q_proj"]
    assert copied_q.group is not group and copied_q in copied_q.group.members
    pe.remove_adapter(llama, "a")                                          # k, gate lose their last adapter
    assert inject.link_projection_groups(llama) == 1                      # q/v; up alone is no group
    inject.unlink_projection_groups(llama)
    assert all(layer.group is None for _, layer in inject.lora_layers(llama))
    gpt2, bert = tiny("gpt2"), tiny("bert")
    pe.add_adapter(gpt2, "a", pe.LoraConfig(r=2, target_modules=["c_attn", "c_fc"]))
    pe.add_adapter(bert, "a", pe.LoraConfig(r=2, target_modules=["query", "key", "value"]))
    assert inject.link_projection_groups(gpt2) == 0 and inject.link_projection_groups(bert) == 2
