"""Where each bottleneck placement puts its adapters on tiny Llama / GPT-2 / BERT models (the placement table,
ptlm_engine/bottleneck_sites.py), and their outputs against hand-written hooks at the papers' places."""
import pytest
import torch
import torch.nn.functional as F

import ptlm_engine as pe
from ptlm_engine import inject
from ptlm_engine.layers.bottleneck import BottleneckLayer
from tests.helpers import assert_base_restored, hook_count, randomize_bottleneck_and_lora, seeded_ids, state_copy

pytestmark = [pytest.mark.usefixtures("reference_backend")]

ACT = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}
BLOCKS = {"llama": "model.layers", "gpt2": "transformer.h", "bert": "encoder.layer"}
# Per model: (attention site, FFN site) where the layers go (the hooked modules), the projections whose outputs
# the papers' sequential adapters change (the tiny models have no dropout, so the sites' outputs are these), and
# the sub-layers whose inputs parallel adapters read.
SITES = {"llama": ("self_attn", "mlp"), "gpt2": ("attn", "mlp"),
         "bert": ("attention.output.dropout", "output.dropout")}
PROJECTIONS = {"llama": ("self_attn.o_proj", "mlp.down_proj"), "gpt2": ("attn.c_proj", "mlp.c_proj"),
               "bert": ("attention.output.dense", "output.dense")}
READS = {"llama": ("self_attn", "mlp"), "gpt2": ("attn", "mlp"), "bert": ("attention", "intermediate")}
KINDS = {"houlsby": (0, 1), "pfeiffer": (1,), "parallel": (0, 1)}


def _expected(tiny, kind, adapted, name, config, ids, output):
    """The base model with plain hooks at the papers' places using `adapted`'s adapter `name`: sequential adapters
    on the projections' outputs, parallel ones reading the sub-layer's input and adding to the projection's output."""
    model = tiny(kind)
    inputs = {}
    for index in range(2) if config.layers_to_transform is None else [config.layers_to_transform]:
        block = f"{BLOCKS[kind]}.{index}"
        for k in KINDS[config.placement]:
            layer = adapted.get_submodule(f"{block}.{SITES[kind][k]}.ptlm_bottleneck")
            def adapter(h, params=[p.detach() for p in layer.adapter_parameters(name)]):
                down_w, down_b, up_w, up_b = params
                return config.scale * (ACT[config.act](h @ down_w.T + down_b) @ up_w.T + up_b)

            def add(module, args, out, key=(index, k), adapter=adapter):
                return out + adapter(inputs.pop(key) if config.placement == "parallel" else out)

            def keep(module, args, kwargs, key=(index, k)):
                inputs[key] = args[0] if args else kwargs["hidden_states"]

            model.get_submodule(f"{block}.{PROJECTIONS[kind][k]}").register_forward_hook(add)
            model.get_submodule(f"{block}.{READS[kind][k]}").register_forward_pre_hook(keep, with_kwargs=True)
    return output(model, ids)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("placement,act", [("houlsby", "relu"), ("pfeiffer", "gelu"), ("parallel", "silu")])
def test_placements_match_hooks_at_the_papers_places(tiny, kind, placement, act, output):
    model = tiny(kind)
    ids = seeded_ids(2)
    base, state, hooks = output(model, ids), state_copy(model), hook_count(model)
    config = pe.BottleneckConfig(bottleneck=8, placement=placement, act=act,
                                 scale=2.0 if placement == "parallel" else 1.0)
    pe.add_adapter(model, "a", config)
    layers = inject.adapter_layers(model)
    assert [p for p, _ in layers] == [f"{BLOCKS[kind]}.{i}.{SITES[kind][k]}.ptlm_bottleneck"
                                      for i in range(2) for k in KINDS[placement]]
    assert all(isinstance(layer, BottleneckLayer) for _, layer in layers)
    d = model.config.hidden_size
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == len(layers) * (2 * 8 * d + d + 8)
    assert set(state) <= set(model.state_dict())                       # the base's keys stay as they were
    torch.testing.assert_close(output(model, ids), base, rtol=0, atol=0)   # a new adapter is the identity

    randomize_bottleneck_and_lora(model)
    y = output(model, ids)
    assert not torch.allclose(y, base)
    torch.testing.assert_close(y, _expected(tiny, kind, model, "a", config, ids, output))
    with pe.disable_adapters(model):
        torch.testing.assert_close(output(model, ids), base, rtol=0, atol=0)
    pe.unload(model)
    assert_base_restored(model, state, hooks)
    torch.testing.assert_close(output(model, ids), base, rtol=0, atol=0)
