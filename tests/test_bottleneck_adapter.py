"""Bottleneck adapters on tiny Llama / GPT-2 / BERT models through the API: mixed batches with LoRA and base rows
(outputs, gradients, generate), training, files, bad configs and bad files, and removal restoring the model
exactly. Where each placement puts them: test_bottleneck_sites.py."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import ptlm_engine as pe
from ptlm_engine.kernels import lora as K
from tests.helpers import (assert_base_restored, hook_count, randomize_bottleneck_and_lora, run_alone,
                           seeded_ids, state_copy)

pytestmark = [pytest.mark.usefixtures("reference_backend")]


def _mixed(tiny, kind):
    """Two sequential bottleneck adapters and a parallel one (different widths, acts and scales; "b" in block 1
    only) and a LoRA adapter on the projections the bottleneck sites follow."""
    model = tiny(kind)
    lora = {"llama": ["q_proj", "o_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"], "bert": ["query", "dense"]}
    pe.add_adapter(model, "a", pe.BottleneckConfig(bottleneck=8, placement="houlsby", act="relu"))
    pe.add_adapter(model, "c", pe.LoraConfig(r=4, alpha=8, target_modules=lora[kind]))
    pe.add_adapter(model, "b", pe.BottleneckConfig(bottleneck=4, placement="parallel", act="gelu", scale=2.0,
                                                   layers_to_transform=[1]))
    pe.add_adapter(model, "d", pe.BottleneckConfig(bottleneck=6, placement="pfeiffer", act="silu", scale=0.5))
    randomize_bottleneck_and_lora(model)
    return model


MAPPING = ["a", "c", None, "b", "d", "a"]


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_mixed_batch_rows_match_each_adapter_alone(tiny, kind, output):
    model = _mixed(tiny, kind)
    ids = seeded_ids(len(MAPPING))
    with torch.no_grad(), pe.adapter_batch(model, MAPPING):
        served = output(model, ids)
    with pe.adapter_batch(model, MAPPING):
        trained = output(model, ids)                  # the stacked Parameters, with autograd
    for row, name in enumerate(MAPPING):
        alone = run_alone(model, name, lambda: output(model, ids[row:row + 1]))
        torch.testing.assert_close(served[row], alone[0], msg=f"row {row} ({name})")
        torch.testing.assert_close(trained[row], alone[0], msg=f"row {row} ({name})")
    assert not any(torch.allclose(served[i], served[j]) for i in range(5) for j in range(i))   # every adapter acts


def test_mixed_batch_gradients_match_each_adapter_alone(tiny, output):
    model = _mixed(tiny, "llama")
    ids = seeded_ids(len(MAPPING))
    g = torch.randn(len(MAPPING), 6, 128, generator=torch.Generator().manual_seed(5))
    with pe.adapter_batch(model, MAPPING):
        (output(model, ids) * g).sum().backward()
    params = {name: [p for n, p in model.named_parameters() if f".{name}." in n and ("ptlm_" in n or "lora_" in n)]
              for name in "abcd"}
    mixed = {name: [p.grad.clone() for p in ps] for name, ps in params.items()}
    assert all(mixed[name] for name in "abcd")
    model.zero_grad()
    for name in "abcd":
        rows = [i for i, n in enumerate(MAPPING) if n == name]
        run_alone(model, name, lambda: (output(model, ids[rows]) * g[rows]).sum().backward())
        for p, got in zip(params[name], mixed[name]):
            torch.testing.assert_close(got, p.grad, msg=name)


def test_generate_mixed_rows(tiny):
    model = _mixed(tiny, "llama")
    ids = seeded_ids(4, length=5)
    mapping = ["a", "c", None, "b"]
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with pe.adapter_batch(model, mapping):
        mixed = model.generate(ids, **kw)
    for row, name in enumerate(mapping):
        alone = run_alone(model, name, lambda: model.generate(ids[row:row + 1], **kw))
        assert torch.equal(mixed[row], alone[0]), f"row {row} ({name})"


def test_training_lowers_the_loss_and_touches_only_the_adapter(tiny):
    model = tiny("llama").train()
    state = state_copy(model)
    pe.add_adapter(model, "a", pe.BottleneckConfig(bottleneck=16, placement="houlsby", act="gelu"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {n.split(".ptlm_bottleneck.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad} \
        == {"down", "up"}
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = seeded_ids(4, length=12)
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items() if k in state)


def test_lora_and_bottleneck_share_modules_and_combine(tiny, ids, output):
    model = tiny("llama")
    base, state, hooks = output(model, ids), state_copy(model), hook_count(model)
    pe.add_adapter(model, "bn", pe.BottleneckConfig(bottleneck=4))
    both = [pe.BottleneckConfig(bottleneck=4, placement="parallel"),
            pe.LoraConfig(r=4, target_modules=["o_proj", "down_proj"])]
    pe.add_adapter(model, "both", both)         # one task, two methods; LoRA wraps o_proj inside a hooked self_attn
    randomize_bottleneck_and_lora(model)
    y_bn = output(model, ids)
    pe.set_active_adapter(model, "both")
    y_both = output(model, ids)
    assert not torch.allclose(y_bn, base) and not torch.allclose(y_both, base) and not torch.allclose(y_bn, y_both)
    with torch.no_grad(), pe.adapter_batch(model, ["bn", "both"]):
        torch.testing.assert_close(output(model, ids), torch.stack([y_bn[0], y_both[1]]))
    pe.remove_adapter(model, "both")
    pe.set_active_adapter(model, "bn")
    torch.testing.assert_close(output(model, ids), y_bn)
    pe.unload(model)
    assert_base_restored(model, state, hooks)
    torch.testing.assert_close(output(model, ids), base, rtol=0, atol=0)


def test_save_load_round_trip(tiny, tmp_path, ids, output):
    model = tiny("llama")
    pe.add_adapter(model, "a", pe.BottleneckConfig(bottleneck=6, placement="parallel", act="silu", scale=4.0,
                                                   layers_to_transform=[1]))
    randomize_bottleneck_and_lora(model)
    pe.save_adapter(model, "a", tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "bottleneck", "placement", "act", "scale", "layers_to_transform")} \
        == {"peft_type": "BOTTLENECK", "bottleneck": 6, "placement": "parallel", "act": "silu", "scale": 4.0,
            "layers_to_transform": [1]}
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert sorted(tensors) == sorted(f"base_model.model.model.layers.1.{site}.ptlm_bottleneck.{leaf}"
                                     for site in ("self_attn", "mlp")
                                     for leaf in ("down.weight", "down.bias", "up.weight", "up.bias"))
    assert tensors["base_model.model.model.layers.1.mlp.ptlm_bottleneck.down.weight"].shape == (6, 64)
    fresh = tiny("llama")
    assert pe.load_adapter(fresh, tmp_path / "a", name="b") == "b"
    assert pe.adapter_configs(fresh)["b"] == pe.adapter_configs(model)["a"]
    torch.testing.assert_close(output(fresh, ids), output(model, ids), rtol=0, atol=0)


def test_round_trip_with_modules_to_save(tiny, tmp_path, ids, output):
    model = tiny("bert_cls")
    pe.add_adapter(model, "a", pe.BottleneckConfig(bottleneck=4, modules_to_save=["classifier"]))
    randomize_bottleneck_and_lora(model)
    with torch.no_grad():
        model.classifier.modules_to_save["a"].weight.add_(1.0)
    pe.save_adapter(model, "a", tmp_path / "a")
    assert "base_model.model.classifier.weight" in load_file(tmp_path / "a" / "adapter_model.safetensors")
    fresh = tiny("bert_cls")
    pe.load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(output(fresh, ids), output(model, ids), rtol=0, atol=0)


def test_layer_norm_adapters_count_train_batch_save_and_load(tiny, tmp_path, output):
    model = tiny("llama")
    pe.add_adapter(model, "ln", pe.BottleneckConfig(bottleneck=6, act="gelu", layer_norm=True))
    pe.add_adapter(model, "plain", pe.BottleneckConfig(bottleneck=6, placement="parallel", scale=2.0))
    randomize_bottleneck_and_lora(model)
    for name, extra in (("ln", 2 * 64), ("plain", 0)):                           # 2md + d + m (+ 2d)
        modules = {}
        for n, p in model.named_parameters():
            if f".{name}." in n and ".ptlm_bottleneck." in n:
                modules[n.split(".ptlm_bottleneck.")[0]] = modules.get(n.split(".ptlm_bottleneck.")[0], 0) + p.numel()
        assert len(modules) == 4 and set(modules.values()) == {2 * 6 * 64 + 64 + 6 + extra}, name
    pe.set_active_adapter(model, "ln")
    assert {n.split(".ptlm_bottleneck.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad} \
        == {"down", "up", "layer_norm"}
    ids = seeded_ids(3)
    y_ln = output(model, ids)
    mapping = ["plain", "ln", None]
    with torch.no_grad(), pe.adapter_batch(model, mapping):
        mixed = output(model, ids)
    for row, name in enumerate(mapping):
        torch.testing.assert_close(mixed[row], run_alone(model, name, lambda: output(model, ids[row:row + 1]))[0])

    pe.save_adapter(model, "ln", tmp_path / "ln")
    assert json.loads((tmp_path / "ln" / "adapter_config.json").read_text())["layer_norm"] is True
    tensors = load_file(tmp_path / "ln" / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.1.mlp.ptlm_bottleneck.layer_norm.weight"].shape == (64,)
    assert len(tensors) == 4 * 6
    fresh = tiny("llama")
    pe.load_adapter(fresh, tmp_path / "ln", name="ln")
    assert pe.adapter_configs(fresh)["ln"] == pe.adapter_configs(model)["ln"]
    torch.testing.assert_close(output(fresh, ids), y_ln, rtol=0, atol=0)

    pe.save_adapter(model, "plain", tmp_path / "plain")                 # a file from before layer_norm existed
    config_file = tmp_path / "plain" / "adapter_config.json"
    old = {k: v for k, v in json.loads(config_file.read_text()).items() if k != "layer_norm"}
    config_file.write_text(json.dumps(old))
    pe.load_adapter(fresh, tmp_path / "plain", name="plain")
    assert pe.adapter_configs(fresh)["plain"].layer_norm is False
    pe.set_active_adapter(model, "plain")
    pe.set_active_adapter(fresh, "plain")
    torch.testing.assert_close(output(fresh, ids), output(model, ids), rtol=0, atol=0)
    with pytest.raises(ValueError, match="layer_norm must be a bool"):
        pe.BottleneckConfig(layer_norm=1)

def test_bad_files_fail_clearly_and_leave_the_model(tiny, tmp_path):
    model = tiny("gpt2")
    pe.add_adapter(model, "a", pe.BottleneckConfig(bottleneck=4))
    pe.save_adapter(model, "a", tmp_path / "a")
    fresh = tiny("gpt2")
    state, hooks = state_copy(fresh), hook_count(fresh)
    config_file, weights_file = tmp_path / "a" / "adapter_config.json", tmp_path / "a" / "adapter_model.safetensors"
    good = json.loads(config_file.read_text())

    def fails(config, match, tensors=None):
        config_file.write_text(json.dumps(config))
        if tensors is not None:
            save_file(tensors, weights_file)
        with pytest.raises(ValueError, match=match):
            pe.load_adapter(fresh, tmp_path / "a")
        assert pe.adapter_configs(fresh) == {}
        assert_base_restored(fresh, state, hooks)

    fails({**good, "reduction_factor": 16}, r"unknown bottleneck adapter config keys \['reduction_factor'\]")
    fails({**good, "placement": "sideways"}, r"adapter_config.json: BottleneckConfig.placement")
    fails({**good, "bottleneck": 0}, r"adapter_config.json: BottleneckConfig.bottleneck")
    fails({**good, "bottleneck": 8}, r"down.weight: shape \(4, 64\), the model needs \(8, 64\)")
    tensors = load_file(weights_file)
    up_bias = "base_model.model.transformer.h.1.mlp.ptlm_bottleneck.up.bias"
    fails(good, f"missing {up_bias}", {k: v for k, v in tensors.items() if k != up_bias})
    fails(good, "unexpected base_model.model.extra", {**tensors, "base_model.model.extra": torch.zeros(1)})
    fails({**good, "layer_norm": True}, r"missing .*ptlm_bottleneck.layer_norm.weight", tensors)


def test_bad_configs_and_models(tiny):
    for kw, match in [({"bottleneck": 0}, "bottleneck must be a positive integer"),
                      ({"placement": "sideways"}, "placement must be one of"),
                      ({"act": "tanh"}, "act must be one of")]:
        with pytest.raises(ValueError, match=match):
            pe.BottleneckConfig(**kw)
    with pytest.raises(ValueError, match=r"no placement table for model_type None .*supported: .*bert.*gpt2.*llama"):
        pe.add_adapter(torch.nn.Sequential(torch.nn.Linear(4, 4)), "a", pe.BottleneckConfig())
    model = tiny("llama")
    state, hooks = state_copy(model), hook_count(model)
    for config, match in [(pe.BottleneckConfig(layers_to_transform=[1, 5]), r"layers_to_transform \[5\] not among"),
                          (pe.BottleneckConfig(modules_to_save=["mlp"]), "lies inside a module of modules_to_save")]:
        with pytest.raises(ValueError, match=match):
            pe.add_adapter(model, "a", config)
        assert pe.adapter_configs(model) == {}
        assert_base_restored(model, state, hooks)
    pe.add_adapter(model, "s", pe.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["mlp"]))
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp' lies inside 'model.layers.0.mlp', a ModulesToSave"):
        pe.add_adapter(model, "a", pe.BottleneckConfig(placement="pfeiffer"))


def test_modules_to_save_may_not_hide_a_bottleneck_layer(tiny):
    """A later adapter's modules_to_save around an existing bottleneck site, or around a site of the same call,
    is refused before the model changes: the copies would run without the bottleneck adapters."""
    model = tiny("llama")
    pe.add_adapter(model, "a", pe.BottleneckConfig(bottleneck=4, placement="pfeiffer", layers_to_transform=[0]))
    state, hooks = state_copy(model), hook_count(model)
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp' contains the adapter layer "
                                         r"'model.layers.0.mlp.ptlm_bottleneck'"):
        pe.add_adapter(model, "s", pe.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["layers.0.mlp"]))
    with pytest.raises(ValueError, match="contains the adapter layer 'model.layers.1.mlp.ptlm_bottleneck'"):
        pe.add_adapter(model, "t", [pe.BottleneckConfig(bottleneck=4, placement="pfeiffer", layers_to_transform=[1]),
                                    pe.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["layers.1.mlp"])])
    assert list(pe.adapter_configs(model)) == ["a"]
    assert_base_restored(model, state, hooks)


@pytest.mark.skipif(not (torch.cuda.is_available() or K.INTERPRETED),
                    reason="needs CUDA or TRITON_INTERPRET=1 set before the kernels are imported")
def test_triton_kernels_through_the_layers(tiny, monkeypatch, output):
    """The fused kernels (interpreted on the CPU) against the reference: one block, a sequential and a parallel
    adapter and a LoRA one (whose multi-adapter kernels share the batch's token segments with the bottleneck
    layers'), mixed rows served, and one adapter's gradients."""
    model = tiny("llama")
    pe.add_adapter(model, "a", pe.BottleneckConfig(bottleneck=8, act="relu", layers_to_transform=[0]))
    pe.add_adapter(model, "b", pe.BottleneckConfig(bottleneck=4, placement="parallel", act="gelu", scale=2.0,
                                                   layers_to_transform=[0]))
    pe.add_adapter(model, "c", pe.LoraConfig(r=2, target_modules=["o_proj"], layers_to_transform=[0]))
    randomize_bottleneck_and_lora(model)
    ids = seeded_ids(4, length=5)

    def run():
        with torch.no_grad(), pe.adapter_batch(model, ["a", "b", None, "c"]):
            mixed = output(model, ids)
        model.zero_grad()
        output(model, ids).square().mean().backward()
        return mixed, [p.grad.clone() for n, p in model.named_parameters() if ".a." in n and "ptlm_" in n]

    want = run()
    monkeypatch.setenv("PTLM_BACKEND", "triton")
    got = run()
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not (torch.cuda.is_available() or K.INTERPRETED),
                    reason="needs CUDA or TRITON_INTERPRET=1 set before the kernels are imported")
def test_triton_kernels_with_layer_norms(tiny, monkeypatch, output):
    """LayerNorm adapters through the fused kernels (interpreted on the CPU) against the reference: a sequential
    one with a LayerNorm beside a parallel one without, mixed rows served and trained (stacked Parameters), and
    the single adapter's gradients, its LayerNorm's included."""
    model = tiny("llama")
    pe.add_adapter(model, "n", pe.BottleneckConfig(bottleneck=8, act="gelu", layer_norm=True, layers_to_transform=[0]))
    pe.add_adapter(model, "p", pe.BottleneckConfig(bottleneck=4, placement="parallel", layers_to_transform=[0]))
    randomize_bottleneck_and_lora(model)
    ids = seeded_ids(3, length=5)

    def run():
        with torch.no_grad(), pe.adapter_batch(model, ["n", None, "p"]):
            served = output(model, ids)
        with pe.adapter_batch(model, ["n", None, "p"]):
            trained = output(model, ids)
        model.zero_grad()
        output(model, ids).square().mean().backward()
        return served, trained.detach(), [p.grad.clone() for n, p in model.named_parameters()
                                          if ".n." in n and "ptlm_" in n]

    want = run()
    assert len(want[2]) == 12                                # two sites, six tensors each
    monkeypatch.setenv("PTLM_BACKEND", "triton")
    got = run()
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-4)
    for g, w in zip(got[2], want[2]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_realistic_bf16_llama_on_gpu_within_pytorchs_own_bf16_error(monkeypatch):
    """A Llama at realistic width, bf16 with float32 adapters (one with its own LayerNorm), fused kernels:
    mixed-batch logits and one adapter's gradients are within 2x of the reference's own bf16 error, both measured
    against the reference in fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(hidden_size=1024, num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=4,
                         intermediate_size=2816, vocab_size=1000, max_position_embeddings=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).cuda().eval()
    pe.add_adapter(model, "a", pe.BottleneckConfig(bottleneck=64, act="relu"))
    pe.add_adapter(model, "b", pe.BottleneckConfig(bottleneck=48, placement="parallel", act="gelu", scale=4.0))
    pe.add_adapter(model, "c", pe.BottleneckConfig(bottleneck=32, act="silu", layer_norm=True))
    adapters = {n: float("layer_norm.weight" in n) + 0.02 * torch.randn_like(p)
                for n, p in model.named_parameters() if ".ptlm_bottleneck." in n}
    ids = torch.randint(0, 1000, (4, 256), device="cuda")

    def run(dtype, backend):
        monkeypatch.setenv("PTLM_BACKEND", backend)
        model.to(dtype)
        for n, p in model.named_parameters():       # .to() cast everything: float32 adapters, as fresh ones are
            if n in adapters:
                p.data = adapters[n].clone()
            p.grad = None
        with torch.no_grad(), pe.adapter_batch(model, ["a", "b", None, "c"]):
            mixed = model(input_ids=ids).logits.float()
        model(input_ids=ids).logits.float().square().mean().backward()       # "a" active: the first added
        return mixed, {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}

    ref_logits, ref_grads = run(torch.float32, "reference")
    torch_logits, torch_grads = run(torch.bfloat16, "reference")
    our_logits, our_grads = run(torch.bfloat16, "triton")
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    assert torch.isfinite(our_logits).all() and sorted(our_grads) == sorted(ref_grads)
    assert rel(our_logits, ref_logits) <= 2 * rel(torch_logits, ref_logits) + 1e-3
    for name, g in our_grads.items():
        assert rel(g, ref_grads[name]) <= 2 * rel(torch_grads[name], ref_grads[name]) + 1e-3, name
