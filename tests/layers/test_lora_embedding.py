"""LoRA on token embeddings (LoraEmbedding) in models: against HF PEFT's LoRA Embedding on the same weights
(outputs, gradients, files both ways, merging, mixed batches), mixed-batch training and generation against each
row alone, what "all-linear" and the refusals leave out."""
import copy
import warnings

import pytest
import torch
from torch import nn
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, OPTConfig, OPTForCausalLM

import ptlm_engine as pe
from ptlm_engine.layers import LoraEmbedding
from tests.helpers import assert_loads_like_peft, assert_reloads_same, needs_triton, peft_file, run_alone

EMBEDDING = {"llama": "embed_tokens", "gpt2": "wte", "bert": "word_embeddings"}
LINEAR = {"llama": "q_proj", "gpt2": "c_attn", "bert": "query"}


@pytest.fixture(autouse=True)
def _reference(reference_backend):
    pass


def _peft(model, config):
    import peft
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, config)


def _targets(kind):
    return [EMBEDDING[kind], LINEAR[kind]]


def _pair(tiny, kind, randomize_adapters):
    """(ours, PEFT's) over copies of tiny(kind), LoRA r=4 alpha=8 on its token embedding and one projection, the
    same random values in both."""
    ours = tiny(kind)
    pe.add_adapter(ours, "a", pe.LoraConfig(r=4, alpha=8, target_modules=_targets(kind)))
    randomize_adapters(ours, seed=3)
    import peft
    theirs = _peft(tiny(kind), peft.LoraConfig(r=4, lora_alpha=8, target_modules=_targets(kind)))
    ours_params = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if p.requires_grad:                 # PEFT's key -> ours: lora_embedding_A.default -> lora_A.a.weight
                mine = name.removeprefix("base_model.model.").replace(".default", ".a")
                mine = mine.replace("lora_embedding_A.a", "lora_A.a.weight").replace("lora_embedding_B.a",
                                                                                   "lora_B.a.weight")
                p.copy_(ours_params[mine])
    return ours, theirs.eval()


def test_layer_keys_and_a_new_adapter_is_the_identity_with_peft_init():
    torch.manual_seed(0)
    base = nn.Embedding(11, 6, padding_idx=2)
    layer = LoraEmbedding(base)
    layer.add_adapter("a", r=3, scale=2.0, dropout=0.3)
    layer.active_adapter = "a"
    assert layer.weight is base.weight and layer.bias is None
    assert sorted(layer.state_dict()) == ["lora_A.a.weight", "lora_B.a.weight", "weight"]
    assert torch.count_nonzero(layer.lora_A["a"].weight) == 0 and layer.lora_B["a"].weight.std() > 0.5
    assert layer.dropout["a"] == 0.0                  # PEFT's LoRA embedding applies no dropout
    ids = torch.tensor([[0, 2, 10]])
    torch.testing.assert_close(layer(ids), base(ids), rtol=0, atol=0)
    assert "num_embeddings=11" in repr(layer)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_outputs_and_gradients_equal_peft(kind, tiny, ids, output, randomize_adapters):
    ours, theirs = _pair(tiny, kind, randomize_adapters)
    ours.train()
    theirs.train()
    ids = ids.clone()
    ids[0, :2] = 1                                   # a repeated token: its A column sums two gradients
    torch.testing.assert_close(output(ours, ids), output(theirs, ids))
    output(ours, ids).square().mean().backward()
    output(theirs, ids).square().mean().backward()
    grads = {n.removeprefix("base_model.model."): p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    for name, p in ours.named_parameters():
        if p.grad is None:
            continue
        peft_name = name.replace("lora_A.a.weight", "lora_A.default.weight").replace(
            "lora_B.a.weight", "lora_B.default.weight")
        if EMBEDDING[kind] + ".lora" in name:
            peft_name = name.replace("lora_A.a.weight", "lora_embedding_A.default").replace(
                "lora_B.a.weight", "lora_embedding_B.default")
        torch.testing.assert_close(p.grad, grads[peft_name], msg=name)
    assert sum(EMBEDDING[kind] in n for n, p in ours.named_parameters() if p.grad is not None) == 2


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_files_both_ways_with_peft(kind, tiny, ids, output, tmp_path, randomize_adapters):
    import peft
    theirs = peft_file(tiny(kind), peft.LoraConfig(r=4, lora_alpha=8, target_modules=_targets(kind)),
                       tmp_path / "peft")
    assert_loads_like_peft(tiny, kind, theirs, tmp_path / "peft", ids, output)
    ours, _ = _pair(tiny, kind, randomize_adapters)
    assert_reloads_same(tiny, kind, ours, "a", tmp_path / "ours", ids, output)
    theirs = peft.PeftModel.from_pretrained(tiny(kind), tmp_path / "ours")
    torch.testing.assert_close(output(theirs, ids), output(ours, ids))


def test_merge_unmerge_and_unload(tiny, ids, output, randomize_adapters):
    ours, theirs = _pair(tiny, "llama", randomize_adapters)
    table = ours.model.embed_tokens.weight.detach().clone()
    expected = output(ours, ids)
    pe.merge_adapter(ours, "a")
    theirs.merge_adapter()
    torch.testing.assert_close(output(ours, ids), output(theirs, ids))
    torch.testing.assert_close(output(ours, ids), expected, rtol=1e-4, atol=1e-5)
    pe.unmerge_adapter(ours, "a")
    torch.testing.assert_close(ours.model.embed_tokens.weight, table, rtol=0, atol=1e-6)
    pe.unload(ours)
    assert type(ours.model.embed_tokens) is nn.Embedding


def test_gpt2s_tied_embedding_trains_but_is_not_merged(tiny, ids, output, randomize_adapters):
    """GPT-2 ties wte to lm_head: the adapter runs on the lookup only (the head reads the base table), and merging
    it, which would change the head too, is refused; unload puts the nn.Embedding back, still tied."""
    ours, theirs = _pair(tiny, "gpt2", randomize_adapters)
    torch.testing.assert_close(output(ours, ids), output(theirs, ids))
    with pytest.raises(ValueError, match="tied weights"):
        pe.merge_adapter(ours, "a")
    pe.unload(ours)
    assert type(ours.transformer.wte) is nn.Embedding and ours.lm_head.weight is ours.transformer.wte.weight


def test_mixed_batch_rows_equal_peft_and_each_row_alone(tiny, ids, output, randomize_adapters):
    import peft
    ours, theirs = _pair(tiny, "llama", randomize_adapters)
    config = peft.LoraConfig(r=8, lora_alpha=8, target_modules=["embed_tokens"])
    theirs.add_adapter("b", config)
    pe.add_adapter(ours, "b", pe.LoraConfig(r=8, alpha=8, target_modules=["embed_tokens"]))
    randomize_adapters(ours, seed=5)                     # a's and b's values, copied into PEFT's
    layer, peft_layer = ours.model.embed_tokens, theirs.base_model.model.model.embed_tokens
    with torch.no_grad():
        for name, peft_name in (("a", "default"), ("b", "b")):
            peft_layer.lora_embedding_A[peft_name].copy_(layer.lora_A[name].weight)
            peft_layer.lora_embedding_B[peft_name].copy_(layer.lora_B[name].weight)
        for block, peft_block in zip(ours.model.layers, theirs.base_model.model.model.layers):
            peft_block.self_attn.q_proj.lora_A["default"].weight.copy_(block.self_attn.q_proj.lora_A["a"].weight)
            peft_block.self_attn.q_proj.lora_B["default"].weight.copy_(block.self_attn.q_proj.lora_B["a"].weight)
    rows = ["a", "b", None, "a"]
    batch = torch.cat([ids, ids.flip(1)])
    with pe.adapter_batch(ours, rows), torch.no_grad():
        mixed = output(ours, batch)
    with torch.no_grad():
        peft_mixed = theirs(input_ids=batch, adapter_names=["default", "b", "__base__", "default"]).logits
    torch.testing.assert_close(mixed, peft_mixed)
    for i, name in enumerate(rows):
        with torch.no_grad():
            alone = run_alone(ours, name, lambda: output(ours, batch[i:i + 1]))
        torch.testing.assert_close(mixed[i:i + 1], alone)


def test_mixed_batch_greedy_generation_and_training_equal_each_row_alone(tiny, ids, randomize_adapters):
    ours = tiny("llama")
    for name, r in (("a", 4), ("b", 8)):
        pe.add_adapter(ours, name, pe.LoraConfig(r=r, alpha=8, target_modules=["embed_tokens", "v_proj"]))
    randomize_adapters(ours, seed=1)
    pe.set_active_adapter(ours, "b")
    randomize_adapters(ours, seed=2)
    rows = ["a", None, "b"]
    batch = torch.cat([ids, ids[:1].flip(1)])
    with pe.adapter_batch(ours, rows), torch.no_grad():
        generated = ours.generate(batch, max_new_tokens=4, do_sample=False)
    for i, name in enumerate(rows):
        alone = run_alone(ours, name, lambda: ours.generate(batch[i:i + 1], max_new_tokens=4, do_sample=False))
        assert torch.equal(generated[i:i + 1], alone)

    params = {n: p for n, p in ours.named_parameters() if "lora" in n}
    with pe.adapter_batch(ours, rows):
        ours(input_ids=batch, labels=batch).loss.backward()
    mixed = {n: p.grad.clone() for n, p in params.items()}
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    for i, name in enumerate(rows):
        if name is None:
            continue
        ours.zero_grad()
        run_alone(ours, name, lambda: ours(input_ids=batch[i:i + 1], labels=batch[i:i + 1]).loss.backward())
        for n, p in params.items():
            if p.grad is not None:
                expected[n] += p.grad / len(rows)     # the mixed loss is the mean of the rows' own means
    for n in params:
        torch.testing.assert_close(mixed[n], expected[n], rtol=1e-4, atol=1e-6, msg=n)
    assert mixed["model.embed_tokens.lora_A.a.weight"].abs().sum() > 0


def test_all_linear_leaves_embeddings_out_and_odd_embeddings_are_refused(tiny):
    model = tiny("llama")
    pe.add_adapter(model, "a", pe.LoraConfig(r=2, target_modules="all-linear"))
    assert type(model.model.embed_tokens) is nn.Embedding
    opt = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                                   num_attention_heads=2, word_embed_proj_dim=32, max_position_embeddings=40))
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="embed_positions.*its own forward"):
        pe.add_adapter(opt, "a", pe.LoraConfig(r=2, target_modules=["embed_tokens", "embed_positions"]))
    assert opt.state_dict().keys() == before.keys() and not pe.adapter_configs(opt)
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0), nn.Linear(4, 4))
    with pytest.raises(ValueError, match="max_norm"):
        pe.add_adapter(model, "a", pe.LoraConfig(r=2, target_modules=["0"]))


def test_gemma3s_scaled_embedding_equals_peft(randomize_adapters):
    """Gemma 3 scales its embedding's output (embed_scale): the LoRA term is scaled with it, as in PEFT."""
    import peft
    torch.manual_seed(0)
    base = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                              head_dim=16)).eval()
    ours = copy.deepcopy(base)
    pe.add_adapter(ours, "a", pe.LoraConfig(r=4, alpha=8, target_modules=["embed_tokens"]))
    randomize_adapters(ours)
    theirs = _peft(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"]))
    layer, peft_layer = ours.model.embed_tokens, theirs.base_model.model.model.embed_tokens
    with torch.no_grad():
        peft_layer.lora_embedding_A["default"].copy_(layer.lora_A["a"].weight)
        peft_layer.lora_embedding_B["default"].copy_(layer.lora_B["a"].weight)
    ids = torch.randint(0, 64, (2, 7))
    torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)
    with pe.disable_adapters(ours):
        torch.testing.assert_close(ours(input_ids=ids).logits, base(input_ids=ids).logits)


@needs_triton
def test_triton_layer_in_a_mixed_training_batch_equals_the_reference(tiny, ids, randomize_adapters, monkeypatch):
    """The fused forward and the backward's kernels through the model, against the reference backend."""
    model = tiny("llama")
    for name, r in (("a", 4), ("b", 2)):
        pe.add_adapter(model, name, pe.LoraConfig(r=r, alpha=8, target_modules=["embed_tokens"]))
    randomize_adapters(model)
    pe.set_active_adapter(model, "b")
    randomize_adapters(model, seed=1)
    results = []
    for backend in ("reference", "triton"):
        monkeypatch.setenv("PTLM_BACKEND", backend)
        model.zero_grad()
        with pe.adapter_batch(model, ["b", "a"]):
            logits = model(input_ids=ids).logits
            logits.square().mean().backward()
        results.append([logits.detach()] + [p.grad.clone() for n, p in model.named_parameters() if "lora" in n])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
