"""Serving many adapters at once: pe.adapter_batch (ptlm_engine/api.py) pushed as a vLLM / S-LoRA / LoRAX user would:
many adapters of mixed ranks and targets in one batch, a serving loop with hot swaps and reloads, generate options,
edge mappings, threads, exceptions, and the state left between blocks. Every mixed row is compared with that row
run alone with its adapter active (README, Mixed batches)."""
import gc
import threading
import zlib

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import ptlm_engine as pe
from tests.helpers import max_abs_diff, needs_triton, run_alone

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

VOCAB = 128
GEN = dict(max_new_tokens=4, min_new_tokens=4, pad_token_id=0, do_sample=False)


def _llama(dtype=torch.float64, layers=2, seed=0):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=48, vocab_size=VOCAB))
    return model.to(dtype).eval()


def _randomize(model, names=None, scale=0.2, salt=0):
    """Seeded random values in every adapter tensor (LoRA B, bottleneck up start at zero)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(k in n for k in (".lora_", "ptlm_", "modules_to_save")) and (
                    names is None or any(f".{a}." in n or n.endswith(f".{a}") for a in names)):
                gen = torch.Generator().manual_seed(zlib.crc32(n.encode()) + salt)
                p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=torch.float64))


def _ids(rows, length=6, seed=3):
    return torch.randint(1, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids, **kw):
    return model(input_ids=ids, **kw).logits


def _assert_rows_alone(model, mapping, ids, mixed, tol=1e-10, **kw):
    for row, name in enumerate(mapping):
        with torch.no_grad():
            alone = run_alone(model, name, lambda: _logits(model, ids[row:row + 1], **kw))
        err = max_abs_diff(mixed[row], alone[0])
        assert err < tol, f"row {row} ({name}) differs from the row alone by {err:.2e}"


# ------------------------------------------------------------------------------------------------------ scale
TARGET_SETS = [["q_proj", "v_proj"], ["k_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"], "all-linear",
               ["q_proj"], ["down_proj"]]


def test_many_adapters_mixed_ranks_and_targets_rows_equal_alone(monkeypatch):
    """64 LoRA adapters of ranks 1..256 (mixed), six different target sets, one batch of 128 rows (every adapter
    at least once, some rows None) on a float64 model: every row equals that row run alone (checked for the first
    row of every eighth adapter and the None rows, to keep the test short)."""
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    model = _llama()
    gen = torch.Generator().manual_seed(5)
    ranks = [1, 2, 3, 256, 7, 64, 128, 16] * 8
    names = [f"ad{i}" for i in range(64)]
    for i, name in enumerate(names):
        pe.add_adapter(model, name, pe.LoraConfig(r=ranks[i], alpha=int(torch.randint(1, 64, (1,), generator=gen)),
                                                  target_modules=TARGET_SETS[i % len(TARGET_SETS)],
                                                  use_rslora=i % 5 == 0))
    _randomize(model, scale=0.05)
    mapping = names + [None] * 8 + [names[int(j)] for j in torch.randint(0, 64, (56,), generator=gen)]
    mapping = [mapping[int(j)] for j in torch.randperm(len(mapping), generator=gen)]
    ids = _ids(len(mapping), length=5)
    with torch.no_grad(), pe.adapter_batch(model, mapping):
        mixed = _logits(model, ids)
    # alone: one row per adapter (rows of the same adapter share the check)
    checked = {}
    for row, name in enumerate(mapping):
        if name in checked or (name is not None and int(name[2:]) % 8):
            continue
        checked[name] = row
    for name, row in checked.items():
        with torch.no_grad():
            alone = run_alone(model, name, lambda: _logits(model, ids[row:row + 1]))
        assert max_abs_diff(mixed[row], alone[0]) < 1e-10, f"row {row} ({name})"


# ------------------------------------------------------------------------------------------ serving loop
def _gen_alone(model, name, ids, mask=None, **kw):
    return run_alone(model, name, lambda: model.generate(ids, attention_mask=mask, **{**GEN, **kw}))


def test_hot_swap_between_blocks_reuses_slots(monkeypatch, tmp_path):
    """A serving loop: adapters removed and added between blocks (the new one takes a freed slot, with another
    rank and other targets), one reloaded from a file under the same name with new weights: each block serves
    exactly what each row gives alone, with the current weights."""
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    model = _llama()
    pe.add_adapter(model, "a", pe.LoraConfig(r=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    pe.add_adapter(model, "b", pe.LoraConfig(r=4, target_modules=["k_proj", "up_proj"]))
    pe.add_adapter(model, "c", pe.BottleneckConfig(bottleneck=8))
    _randomize(model)
    ids = _ids(4)
    for mapping in (["a", "b", None, "c"], ["c", "a", "b", "a"]):
        with torch.no_grad(), pe.adapter_batch(model, mapping):
            mixed = _logits(model, ids)
        _assert_rows_alone(model, mapping, ids, mixed)
    pe.save_adapter(model, "a", tmp_path / "a_old")
    pe.remove_adapter(model, "a")
    pe.add_adapter(model, "d", pe.LoraConfig(r=2, target_modules=["o_proj", "gate_proj"]))   # a's slot
    _randomize(model, ["d"], salt=1)
    mapping = ["d", "b", "d", None]
    with torch.no_grad(), pe.adapter_batch(model, mapping):
        mixed = _logits(model, ids)
    _assert_rows_alone(model, mapping, ids, mixed)
    # "b" reloaded with new weights under the same name
    _randomize(model, ["b"], salt=7)
    pe.save_adapter(model, "b", tmp_path / "b_new")
    with torch.no_grad():
        expected_b = run_alone(model, "b", lambda: _logits(model, ids))
    _randomize(model, ["b"], salt=8)
    pe.remove_adapter(model, "b")
    pe.load_adapter(model, tmp_path / "b_new", name="b")
    pe.load_adapter(model, tmp_path / "a_old", name="a")
    mapping = ["b", "a", "d", "b"]
    with torch.no_grad(), pe.adapter_batch(model, mapping, static=True):
        mixed = _logits(model, ids)
    _assert_rows_alone(model, mapping, ids, mixed)
    assert max_abs_diff(mixed[0], expected_b[0]) < 1e-10


def test_static_blocks_see_weights_changed_between_blocks(monkeypatch):
    """static=True blocks: weights written (copy_ under no_grad, load_state_dict, an optimizer step) between two
    blocks serve in the next block."""
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    model = _llama()
    pe.add_adapter(model, "a", pe.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    pe.add_adapter(model, "b", pe.BottleneckConfig(bottleneck=4))
    _randomize(model)
    ids = _ids(2)
    mapping = ["a", "b"]
    for step in range(2):
        with torch.no_grad(), pe.adapter_batch(model, mapping, static=True):
            mixed = _logits(model, ids)
            mixed2 = _logits(model, ids)
        assert torch.equal(mixed, mixed2)
        _assert_rows_alone(model, mapping, ids, mixed)
        if step == 0:
            _randomize(model, salt=11)
        else:
            pe.set_active_adapter(model, "a")
            opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            pe.set_active_adapter(model, None)


@pytest.mark.parametrize("how", [dict(num_beams=2, num_return_sequences=2)], ids=["beams_x2"])
def test_generate_left_padded_prompts_of_different_lengths(monkeypatch, how):
    """Left-padded prompts of different lengths (attention mask), LoRA + bottleneck + none rows, with beams /
    sequences: each row's tokens equal that row generated alone with the same padding."""
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    model = _llama()
    pe.add_adapter(model, "a", pe.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    pe.add_adapter(model, "b", pe.BottleneckConfig(bottleneck=4))
    pe.add_adapter(model, "c", pe.LoraConfig(r=8, target_modules="all-linear"))
    _randomize(model, scale=0.5)
    ids = _ids(4, 7)
    mask = torch.ones_like(ids)
    for row, pad in enumerate([0, 3, 1, 5]):
        ids[row, :pad], mask[row, :pad] = 0, 0
    mapping = ["a", "b", None, "c"]
    per = how.get("num_return_sequences", 1)
    with torch.no_grad(), pe.adapter_batch(model, mapping):
        mixed = model.generate(ids, attention_mask=mask, **{**GEN, **how})
    for row, name in enumerate(mapping):
        alone = _gen_alone(model, name, ids[row:row + 1], mask[row:row + 1], **how)
        assert torch.equal(mixed[row * per:(row + 1) * per], alone), f"row {row} ({name})"


def test_remap_and_disable_between_generate_calls(monkeypatch):
    """Inside one block: generate, remap, generate again, then generate inside disable_adapters (base tokens on
    every row), then generate again with the remapped mapping."""
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    model = _llama()
    pe.add_adapter(model, "a", pe.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    pe.add_adapter(model, "b", pe.LoraConfig(r=8, target_modules=["gate_proj", "o_proj"]))
    pe.add_adapter(model, "c", pe.BottleneckConfig(bottleneck=4))
    _randomize(model, scale=0.5)
    ids = _ids(3, 5)
    first, second = ["a", "b", "c"], ["c", None, "a"]
    with torch.no_grad(), pe.adapter_batch(model, first):
        out1 = model.generate(ids, **GEN)
        pe.remap_adapter_batch(model, second)
        out2 = model.generate(ids, **GEN)
        with pe.disable_adapters(model):
            out3 = model.generate(ids, **GEN)
        out4 = model.generate(ids, **GEN)
    for mapping, out in ((first, out1), (second, out2), ([None] * 3, out3), (second, out4)):
        for row, name in enumerate(mapping):
            assert torch.equal(out[row:row + 1], _gen_alone(model, name, ids[row:row + 1])), (mapping, row)


# ------------------------------------------------------------------------------------------- edge mappings
def _mixed_methods_model():
    model = _llama()
    pe.add_adapter(model, "lora", pe.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    pe.add_adapter(model, "p3", pe.PromptConfig(num_virtual_tokens=3))
    pe.add_adapter(model, "p5", pe.PromptConfig(num_virtual_tokens=5))
    pe.add_adapter(model, "x2", pe.PrefixConfig(num_virtual_tokens=2))
    pe.add_adapter(model, "x4", pe.PrefixConfig(num_virtual_tokens=4))
    pe.add_adapter(model, "head", pe.LoraConfig(r=2, target_modules=["k_proj"], modules_to_save=["lm_head"]))
    pe.add_adapter(model, "combo", [pe.LoraConfig(r=2, target_modules=["o_proj"]),
                                    pe.PromptConfig(num_virtual_tokens=2)])
    _randomize(model, scale=0.5)
    return model


MIXED = ["p3", "lora", "x4", None, "p5", "head", "x2", "combo"]


def test_prompt_prefix_lora_and_saved_head_rows_forward(monkeypatch):
    """Prompt adapters of different lengths, prefix adapters of different lengths, LoRA, a LoRA with a saved
    lm_head copy, a combined LoRA + prompt adapter and none in one batch, left padding in the mask: each row's
    logits over its real tokens equal that row alone (the virtual positions are the row's own)."""
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    model = _mixed_methods_model()
    ids = _ids(len(MIXED), 6)
    mask = torch.ones_like(ids)
    for row in range(0, len(MIXED), 3):
        ids[row, :2], mask[row, :2] = 0, 0
    with torch.no_grad(), pe.adapter_batch(model, MIXED):
        mixed = _logits(model, ids, attention_mask=mask)
    for row, name in enumerate(MIXED):
        with torch.no_grad():
            alone = run_alone(model, name, lambda: _logits(model, ids[row:row + 1], attention_mask=mask[row:row + 1]))
        real = mask[row].bool()
        err = max_abs_diff(mixed[row, -6:][real], alone[0, -6:][real])
        assert err < 1e-10, f"row {row} ({name}): {err:.2e}"


def test_prompt_prefix_lora_and_saved_head_rows_generate(monkeypatch):
    """The same batch through generate (greedy, left padding): each row's tokens equal that row's alone."""
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    model = _mixed_methods_model()
    ids = _ids(len(MIXED), 6, seed=4)
    mask = torch.ones_like(ids)
    for row in range(1, len(MIXED), 3):
        ids[row, :3], mask[row, :3] = 0, 0
    with torch.no_grad(), pe.adapter_batch(model, MIXED):
        mixed = model.generate(ids, attention_mask=mask, **GEN)
    for row, name in enumerate(MIXED):
        alone = _gen_alone(model, name, ids[row:row + 1], mask[row:row + 1])
        assert torch.equal(mixed[row:row + 1], alone), f"row {row} ({name})"


@pytest.mark.parametrize("mapping", [[None] * 3, ["a"] * 3, ["a"], [None], ["b", "b"]],
                         ids=["all_none", "one_owns_all", "batch_of_1", "batch_of_1_none", "not_overlapping"])
def test_edge_mappings(monkeypatch, mapping):
    """All rows None, one adapter owning all rows, a batch of 1, an adapter whose targets no other adapter has:
    rows equal alone, forward and generate."""
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    model = _llama()
    pe.add_adapter(model, "a", pe.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    pe.add_adapter(model, "b", pe.LoraConfig(r=3, target_modules=["lm_head", "mlp.down_proj"]))
    _randomize(model, scale=0.5)
    ids = _ids(len(mapping), 5)
    with torch.no_grad(), pe.adapter_batch(model, mapping):
        mixed = _logits(model, ids)
        out = model.generate(ids, **GEN)
    _assert_rows_alone(model, mapping, ids, mixed)
    for row, name in enumerate(mapping):
        assert torch.equal(out[row:row + 1], _gen_alone(model, name, ids[row:row + 1]))


def test_every_row_a_different_bottleneck_and_lora(monkeypatch):
    """16 rows, 16 adapters (8 LoRA of ranks 1..128, 8 bottleneck of widths 1..64 and three placements/acts)."""
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    model = _llama()
    names = []
    for i in range(8):
        pe.add_adapter(model, f"l{i}", pe.LoraConfig(r=2 ** i, alpha=3, target_modules="all-linear"))
        pe.add_adapter(model, f"b{i}", pe.BottleneckConfig(bottleneck=i + 1 if i < 7 else 64,
                                                           placement=["houlsby", "pfeiffer", "parallel"][i % 3],
                                                           act=["relu", "gelu", "silu"][i % 3]))
        names += [f"l{i}", f"b{i}"]
    _randomize(model, scale=0.1)
    ids = _ids(16, 5)
    with torch.no_grad(), pe.adapter_batch(model, names):
        mixed = _logits(model, ids)
    _assert_rows_alone(model, names, ids, mixed)


# ------------------------------------------------------------------------------------------------ threads
def test_two_models_served_from_two_threads_at_once(monkeypatch):
    """Two models (LoRA, prefix, prompt and bottleneck adapters on each), each served in its own thread, blocks
    and generate calls interleaving: every result equals the one computed serially."""
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    models = []
    for seed in (0, 1):
        model = _llama(seed=seed)
        pe.add_adapter(model, "a", pe.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        pe.add_adapter(model, "p", pe.PrefixConfig(num_virtual_tokens=2 + seed))
        pe.add_adapter(model, "q", pe.PromptConfig(num_virtual_tokens=3 - seed))
        pe.add_adapter(model, "b", pe.BottleneckConfig(bottleneck=4))
        _randomize(model, scale=0.5, salt=seed)
        models.append(model)
    mappings = [["a", "p", None, "q"], ["q", "b", "p", "a"], ["b", "b", "a", None]]
    ids = _ids(4, 5)
    expected = []
    for model in models:
        outs = []
        for mapping in mappings:
            with torch.no_grad(), pe.adapter_batch(model, mapping):
                outs.append((_logits(model, ids), model.generate(ids, **GEN)))
        expected.append(outs)
    errors, barrier = [], threading.Barrier(2)

    def serve(k):
        try:
            barrier.wait(timeout=30)
            for _ in range(3):
                for mapping, (logits, tokens) in zip(mappings, expected[k]):
                    with torch.no_grad(), pe.adapter_batch(models[k], mapping):
                        got = _logits(models[k], ids)
                        gen = models[k].generate(ids, **GEN)
                    assert max_abs_diff(got, logits) < 1e-12, (k, mapping)
                    assert torch.equal(gen, tokens), (k, mapping)
        except BaseException as e:     # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=serve, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors


# ------------------------------------------------------------------------------ state between blocks, bad input
def test_readme_serving_idiom_leaves_inactive_adapters_frozen():
    """README's serving example opens the block as `with pe.adapter_batch(model, names), torch.no_grad():`, so
    the block closes with gradients enabled, though no layer ran with them: a serving block, which leaves the
    requires_grad flags as they were (regression: it was taken for a training block, leaving every mapped adapter
    trainable, which an optimizer built afterwards would pick up)."""
    model = _llama()
    pe.add_adapter(model, "a", pe.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    pe.add_adapter(model, "b", pe.LoraConfig(r=16, alpha=16, target_modules=["q_proj", "v_proj"]))
    before = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    ids = _ids(4, 16)
    with pe.adapter_batch(model, ["a", "b", None, "a"]), torch.no_grad():     # README, Mixed batches
        model(input_ids=ids)
        model.generate(ids, **GEN)
    after = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert after == before, f"a serving block made {sorted(set(after) - set(before))[:2]}... trainable"


def test_generate_refuses_another_batch_size_given_as_inputs_keyword(monkeypatch):
    """The block maps 2 rows: a batch of 4 given to generate is refused whatever keyword carries it (positional,
    `inputs=`, or inputs_embeds with an explicit input_ids=None), as a forward of 4 rows is (regression: the
    keywords ran silently, 'a' on a row the user mapped to None)."""
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    model = _llama()
    pe.add_adapter(model, "a", pe.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    _randomize(model, scale=0.5)
    ids = _ids(4, 5)
    with torch.no_grad(), pe.adapter_batch(model, ["a", None]):
        with pytest.raises(ValueError, match="adapter_batch maps 2 rows"):
            model.generate(ids, **GEN)                                           # refused, as documented
        with pytest.raises(ValueError, match="adapter_batch maps 2 rows"):
            model.generate(inputs=ids, **GEN)
        with pytest.raises(ValueError, match="adapter_batch maps 2 rows"):
            model.generate(input_ids=None, inputs_embeds=model.get_input_embeddings()(ids), **GEN)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_reference_multi_lora_honours_slot_ranks(monkeypatch, backend):
    """functional.lora_linear_multi with LoraSlots built by hand: a slot's rank says how many of the r_max rows of
    A / columns of B it uses (rank 0: no adapter in that slot), on both backends, with and without segments, also
    where the padding is not zero (regression: the reference multiplied all r_max, off by tens)."""
    monkeypatch.setenv("PTLM_BACKEND", backend)
    from ptlm_engine.functional import LoraSlots, lora_linear_multi, token_segments
    gen = torch.Generator().manual_seed(0)
    S, r, d_in, d_out, T = 3, 8, 24, 20, 13
    A, B = torch.randn(S, r, d_in, generator=gen), torch.randn(S, d_out, r, generator=gen)
    ranks, scales = torch.tensor([2, 8, 0], dtype=torch.int32), torch.tensor([0.5, 1.0, 2.0])
    x, W = torch.randn(T, d_in, generator=gen), torch.randn(d_out, d_in, generator=gen)
    b = torch.randn(d_out, generator=gen)
    idx = torch.tensor([0, 1, 2, -1, 0, 2, 1, 1, 0, -1, 2, 0, 1], dtype=torch.int32)
    expected = x @ W.T + b
    for t in range(T):
        a = int(idx[t])
        if a >= 0:
            k = int(ranks[a])
            expected[t] += scales[a] * (x[t] @ A[a, :k].T) @ B[a, :, :k].T
    slots = LoraSlots(A, B, ranks, scales)
    for segments in (None, token_segments(idx, S)):
        y = lora_linear_multi(x, W, b, slots, idx, segments=segments)
        err = (y - expected).abs().max().item()
        assert err < 1e-4, f"segments={segments is not None}: off by {err:.3g}"


def test_mixed_batch_over_lora_on_routed_moe_experts_is_refused(monkeypatch):
    """LoRA on the expert MLPs (wi / wo) of a SwitchTransformers model: each expert runs on the tokens routed to
    it, a subset the per-row mapping cannot follow, so a mixed batch mapping the adapter is refused by name
    before anything runs (regression: routed tokens silently got the wrong row's adapter, logits off by ~3, or an
    unclear row-count error); the adapter alone still serves."""
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration
    torch.manual_seed(0)
    config = SwitchTransformersConfig(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                      num_decoder_layers=2, num_heads=4, num_experts=2, expert_capacity=64,
                                      num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
                                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0,
                                      router_jitter_noise=0.0)
    model = SwitchTransformersForConditionalGeneration(config).double().eval()
    pe.add_adapter(model, "a", pe.LoraConfig(r=4, target_modules=["wi", "wo"]))
    _randomize(model, scale=0.5)
    ids, decoder_ids = _ids(2, 6, seed=4), _ids(2, 3, seed=9)
    with torch.no_grad(), pytest.raises(ValueError, match="routed experts"):
        with pe.adapter_batch(model, ["a", None]):
            pass
    with torch.no_grad():
        run_alone(model, "a", lambda: model(input_ids=ids, decoder_input_ids=decoder_ids).logits)


def test_training_block_batch_released_by_the_next_forward(monkeypatch):
    """After a training block (backward inside it) no layer keeps the block's AdapterBatch, with its per-shape
    token tensors and snapshots (regression: the layers kept it to refuse a later recomputation, and some never
    let go; they keep a flag now)."""
    import weakref
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    model = _llama()
    pe.add_adapter(model, "a", pe.LoraConfig(r=4, target_modules=["q_proj"]))
    pe.add_adapter(model, "p", pe.PrefixConfig(num_virtual_tokens=2))
    pe.add_adapter(model, "q", pe.PromptConfig(num_virtual_tokens=3))
    pe.add_adapter(model, "h", pe.LoraConfig(r=2, target_modules=["k_proj"], modules_to_save=["lm_head"]))
    _randomize(model, scale=0.5)
    ids = _ids(4, 5)
    with pe.adapter_batch(model, ["a", "p", "q", "h"]):
        model(input_ids=ids, labels=ids).loss.backward()
        batch = weakref.ref(pe.api.registry(model).batch)
    with torch.no_grad():
        model(input_ids=ids)
    gc.collect()
    assert batch() is None


# --------------------------------------------------------------------------- Triton kernels (interpreter)
@needs_triton
def test_triton_mixed_ranks_and_targets_match_float64_reference(monkeypatch):
    """The Triton multi-adapter path (grouped q/k/v with members lacking adapters, ranks 1..64 in one batch, a
    bottleneck row, a None row) against the same batch on a float64 copy run by the reference."""
    import copy
    monkeypatch.delenv("PTLM_BACKEND", raising=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, intermediate_size=40, vocab_size=VOCAB)).eval()
    ranks = [1, 3, 64, 17]
    targets = [["q_proj", "v_proj"], ["k_proj"], "all-linear", ["gate_proj", "down_proj"]]
    names = [f"l{i}" for i in range(4)]
    for name, r, t in zip(names, ranks, targets):
        pe.add_adapter(model, name, pe.LoraConfig(r=r, alpha=7, target_modules=t))
    pe.add_adapter(model, "bn", pe.BottleneckConfig(bottleneck=5, act="gelu"))
    _randomize(model, scale=0.1)
    mapping = ["l2", None, "l0", "bn", "l1", "l3", "l2"]
    ids = _ids(len(mapping), 3)
    model64 = copy.deepcopy(model).double()
    with torch.no_grad(), pe.adapter_batch(model, mapping):
        y = _logits(model, ids)
        step = model(input_ids=ids[:, :1]).logits               # a decode-sized call (T = rows)
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    with torch.no_grad(), pe.adapter_batch(model64, mapping):
        y64 = _logits(model64, ids)
        step64 = model64(input_ids=ids[:, :1]).logits
    assert max_abs_diff(y, y64) < 1e-5 * y64.abs().max().item() + 1e-6
    assert max_abs_diff(step, step64) < 1e-5 * step64.abs().max().item() + 1e-6
