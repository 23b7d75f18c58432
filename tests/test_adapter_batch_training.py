"""Multi-task training through pe.adapter_batch (ptlm_engine/api.py; the block without torch.no_grad), as a user
of HF PEFT / transformers writes it: one step's gradients and several optimizer steps against each adapter trained
alone on its own rows (float64 models, every method and combined adapters), gradient accumulation across blocks
and remaps, gradient checkpointing, backward after the block, HF Trainer recipes, torch.compile, low precision."""
import copy
import tempfile
import zlib

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import ptlm_engine as pe
from tests.helpers import needs_triton

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

VOCAB = 128
MAPPING = ["a", "b", None, "a"]
LENGTH = 5


def _ids(rows=4, length=LENGTH, seed=3):
    return torch.randint(1, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def _weights(rows=4, dtype=torch.float64):
    """Fixed random weights of a linear, row-separable loss on the model's main output (non-zero everywhere)."""
    return torch.randn(rows, LENGTH, VOCAB, dtype=dtype, generator=torch.Generator().manual_seed(7))


def _randomize(model):
    """Seeded random values (by parameter name) in every adapter tensor: LoRA B and bottleneck up start at zero."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad or any(k in n for k in (".lora_", "ptlm_", "modules_to_save")):
                gen = torch.Generator().manual_seed(zlib.crc32(n.encode()))
                p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))


def _main(model, ids, **kw):
    out = model(input_ids=ids, **kw)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _loss(model, ids, rows, w, **kw):
    """sum over rows i of <output_i, w[rows[i]]>: the last LENGTH positions (prompt tuning prepends tokens), or a
    classifier's logits against the first position's weights. A sum of per-row losses, so each adapter's gradient
    in a mixed batch is the sum of its rows' gradients alone."""
    if "attention_mask" in kw:
        kw = {**kw, "attention_mask": kw["attention_mask"][rows]}
    o = _main(model, ids, **kw)
    if o.dim() == 2:
        return (o * w[rows][:, 0, :o.shape[-1]]).sum()
    o = o[:, -ids.shape[1]:]
    return (o * w[rows][:, :o.shape[1], :o.shape[-1]].to(o.dtype)).sum()


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _adapter_names(mapping):
    return list(dict.fromkeys(n for n in mapping if n is not None))


def _alone_grads(model, mapping, ids, w, **kw):
    """Each mapped adapter active alone on its own rows; the active adapter is put back."""
    before = pe.active_adapter(model)
    model.zero_grad(set_to_none=True)
    for name in _adapter_names(mapping):
        rows = [i for i, n in enumerate(mapping) if n == name]
        pe.set_active_adapter(model, name)
        _loss(model, ids[rows], rows, w, **kw).backward()
    pe.set_active_adapter(model, before)
    grads = _grads(model)
    model.zero_grad(set_to_none=True)
    return grads


def _assert_same_grads(got, want, rel=1e-10, what=""):
    assert sorted(got) == sorted(want), f"{what}: gradients for {sorted(set(got) ^ set(want))} only on one side"
    for n in want:
        err = (got[n] - want[n]).abs().max().item()
        scale = want[n].abs().max().item()
        assert err <= rel * max(scale, 1e-30), f"{what}{n}: off by {err:.3e} (gradient max {scale:.3e})"


def _llama64(hidden=32, layers=2):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=48, vocab_size=VOCAB)).double()


def _model(tiny, kind, a, b, dtype=torch.float64):
    model = (_llama64(layers=1) if kind == "llama1" else tiny(kind)).to(dtype)
    pe.add_adapter(model, "a", a)
    pe.add_adapter(model, "b", b)
    _randomize(model)
    return model.train()


# ------------------------------------------------------------------------- gradients against each adapter alone
CASES = {
    "llama-lora-grouped-split": ("llama", lambda: pe.LoraConfig(r=3, alpha=5, target_modules=["q_proj", "k_proj"]),
                                 lambda: pe.LoraConfig(r=2, target_modules=["v_proj", "gate_proj"],
                                                       layers_to_transform=[1], rank_pattern={"gate_proj": 5})),
    "llama-bottleneck-prefix": ("llama1", lambda: pe.BottleneckConfig(bottleneck=5, placement="houlsby", act="relu"),
                                lambda: pe.PrefixConfig(num_virtual_tokens=3, projection=True)),
    "llama-prompts-of-two-lengths": ("llama1", lambda: pe.PromptConfig(num_virtual_tokens=3),
                                     lambda: pe.PromptConfig(num_virtual_tokens=1)),
    "llama-lora+prefix-vs-lora-mts": ("llama1", lambda: [pe.LoraConfig(r=2, target_modules=["q_proj"]),
                                                        pe.PrefixConfig(num_virtual_tokens=2)],
                                      lambda: pe.LoraConfig(r=2, target_modules=["v_proj"],
                                                            modules_to_save=["lm_head"])),
    "gpt2-prompt+lora-vs-bottleneck": ("gpt2", lambda: [pe.PromptConfig(num_virtual_tokens=2),
                                                        pe.LoraConfig(r=2, target_modules=["c_attn"])],
                                       lambda: pe.BottleneckConfig(bottleneck=3, placement="parallel", act="gelu")),
    "gpt2-lora-wte-copy-vs-prefix": ("gpt2", lambda: pe.LoraConfig(r=2, target_modules=["c_attn"],
                                                                   modules_to_save=["wte"]),
                                     lambda: pe.PrefixConfig(num_virtual_tokens=2)),
    "bert-cls-lora-mts-vs-prompt": ("bert_cls", lambda: pe.LoraConfig(r=3, target_modules=["query", "value"],
                                                                      modules_to_save=["classifier"]),
                                    lambda: pe.PromptConfig(num_virtual_tokens=2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_mixed_batch_gradients_equal_each_adapter_alone(tiny, case, reference_backend):
    """One backward of a mixed batch ["a", "b", None, "a"] (left-padded attention mask) gives every adapter
    exactly the gradient of its own rows run alone with it active (README, Mixed batches), for each method,
    combined adapters and modules_to_save copies (float64: to rounding)."""
    kind, a, b = CASES[case]
    model = _model(tiny, kind, a(), b())
    ids, w = _ids(), _weights()
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[3, :1] = 0
    kw = {} if kind == "bert_cls" else {"attention_mask": mask}
    with pe.adapter_batch(model, MAPPING):
        _loss(model, ids, list(range(4)), w, **kw).backward()
    mixed = _grads(model)
    _assert_same_grads(mixed, _alone_grads(model, MAPPING, ids, w, **kw))


OPTIMIZERS = {
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
    "adamw-foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True),
}


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_optimizer_steps_in_a_mixed_batch_equal_training_each_alone(tiny, opt, reference_backend):
    """N optimizer steps on a mixed batch (causal-LM loss summed over tokens, labels with -100) leave each
    adapter where two steps on its own rows alone leave it, whatever the optimizer (fused AdamW bumps no version
    counter: the stacked training path reads the Parameters themselves)."""
    model = _model(tiny, "llama1", pe.LoraConfig(r=3, alpha=5), [pe.BottleneckConfig(bottleneck=3),
                                                               pe.PrefixConfig(num_virtual_tokens=2)])
    twin = copy.deepcopy(model)
    ids = _ids()
    labels = ids.clone()
    labels[0, :2] = -100
    labels[3, 1] = -100

    def loss(m, rows):
        logits = m(input_ids=ids[rows]).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[rows][:, 1:].reshape(-1), reduction="sum")

    with pe.adapter_batch(model, MAPPING):
        optimizer = OPTIMIZERS[opt]([p for p in model.parameters() if p.requires_grad])
        for _ in range(2):
            loss(model, list(range(4))).backward()
            optimizer.step()
            optimizer.zero_grad()
    for name in ("a", "b"):
        pe.set_active_adapter(twin, name)
        optimizer = OPTIMIZERS[opt]([p for p in twin.parameters() if p.requires_grad])
        for _ in range(2):
            loss(twin, [i for i, n in enumerate(MAPPING) if n == name]).backward()
            optimizer.step()
            optimizer.zero_grad()
    theirs = dict(twin.named_parameters())
    for n, p in model.named_parameters():
        assert (p - theirs[n]).abs().max().item() < 1e-10, n


def test_gradient_accumulation_across_blocks_and_remaps(tiny, reference_backend):
    """Accumulating gradients over a block, a remap inside it, and a second block with another mapping sums each
    adapter's rows of every pass, as PyTorch accumulates .grad; a forward before the remap and one after, with one
    backward of their sum, gives the same."""
    model = _model(tiny, "llama1", pe.LoraConfig(r=3, target_modules=["q_proj", "v_proj"]),
                   pe.LoraConfig(r=2, target_modules=["v_proj", "down_proj"]))
    pe.add_adapter(model, "c", pe.BottleneckConfig(bottleneck=3))
    _randomize(model)
    ids, w = _ids(), _weights()
    passes = [["a", "b", "c", None], ["b", "b", "a", "c"], ["c", None, "a", "a"]]
    with pe.adapter_batch(model, passes[0]):
        _loss(model, ids, [0, 1, 2, 3], w).backward()
        pe.remap_adapter_batch(model, passes[1])
        _loss(model, ids, [0, 1, 2, 3], w).backward()
    with pe.adapter_batch(model, passes[2]):
        _loss(model, ids, [0, 1, 2, 3], w).backward()
    mixed = _grads(model)
    model.zero_grad(set_to_none=True)
    want = {}
    for mapping in passes:
        for n, g in _alone_grads(model, mapping, ids, w).items():
            want[n] = want[n] + g if n in want else g
    _assert_same_grads(mixed, want, what="accumulated: ")
    model.zero_grad(set_to_none=True)
    with pe.adapter_batch(model, passes[0]):
        first = _loss(model, ids, [0, 1, 2, 3], w)
        pe.remap_adapter_batch(model, passes[1])
        (first + _loss(model, ids, [0, 1, 2, 3], w)).backward()
    got = _grads(model)
    want01 = {}
    for mapping in passes[:2]:
        for n, g in _alone_grads(model, mapping, ids, w).items():
            want01[n] = want01[n] + g if n in want01 else g
    _assert_same_grads(got, want01, what="one backward over a remap: ")


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_inside_the_block(tiny, reentrant, reference_backend):
    """model.gradient_checkpointing_enable() (both torch.utils.checkpoint flavours) with forward and backward
    inside the block: the recomputation runs the block's mapping, so the gradients are the plain ones."""
    model = _model(tiny, "llama1", pe.LoraConfig(r=3, target_modules=["q_proj", "v_proj", "up_proj"]),
                   [pe.PromptConfig(num_virtual_tokens=2), pe.BottleneckConfig(bottleneck=3)])
    ids, w = _ids(), _weights()
    want = _alone_grads(model, MAPPING, ids, w)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    with pe.adapter_batch(model, MAPPING):
        _loss(model, ids, [0, 1, 2, 3], w).backward()
    _assert_same_grads(_grads(model), want)


def test_compiled_training_across_blocks_of_other_mappings(tiny, reference_backend):
    """torch.compile(model, backend="aot_eager") trained in one block after another with other mappings (and a
    remap): each step's loss and gradients are the eager ones (the compiled graph does not keep a mapping)."""
    model = _model(tiny, "llama1", pe.LoraConfig(r=3, target_modules=["q_proj", "v_proj"]),
                   [pe.BottleneckConfig(bottleneck=3), pe.LoraConfig(r=2, target_modules=["v_proj"])])
    ids = _ids()
    mappings = [["a", "b", None, "a"], ["b", "b", "a", None]]
    eager = []
    for mapping in mappings:
        with pe.adapter_batch(model, mapping):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        eager.append((loss.detach(), _grads(model)))
        model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    try:
        for mapping, (loss_want, grads_want) in zip(mappings, eager):
            with pe.adapter_batch(compiled, mapping):
                loss = compiled(input_ids=ids, labels=ids).loss
                loss.backward()
            assert abs(loss.item() - loss_want.item()) < 1e-12, mapping
            _assert_same_grads(_grads(model), grads_want, rel=1e-9, what=f"{mapping}: ")
            model.zero_grad(set_to_none=True)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["bf16-autocast", "fp16-model"])
def test_low_precision_mixed_batch_gradients_near_alone(tiny, mode, reference_backend):
    """float32 model under CPU bf16 autocast, and a float16 model on the CPU reference: the mixed batch's float32
    adapter gradients match each adapter alone to low-precision rounding."""
    model = _model(tiny, "llama1", pe.LoraConfig(r=3), [pe.PrefixConfig(num_virtual_tokens=2),
                                                       pe.BottleneckConfig(bottleneck=3)],
                   dtype=torch.float16 if mode == "fp16-model" else torch.float32)
    ids, w = _ids(), _weights(dtype=torch.float32)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if mode == "bf16-autocast" else torch.enable_grad
    with pe.adapter_batch(model, MAPPING), ctx():
        _loss(model, ids, [0, 1, 2, 3], w).backward()
    mixed = _grads(model)
    assert mixed and all(g.dtype == torch.float32 for g in mixed.values())
    model.zero_grad(set_to_none=True)
    with ctx():
        want = _alone_grads(model, MAPPING, ids, w)
    _assert_same_grads(mixed, want, rel=3e-2)


def _trainer_run(model, trainer_cls, rows_tasks):
    """One SGD step (lr 0.1, no clipping) of HF Trainer over one batch of all rows, the task in a dataset column."""
    from transformers import TrainingArguments
    ids = _ids(len(rows_tasks))

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows_tasks)

        def __getitem__(self, i):
            return {"input_ids": ids[i], "labels": ids[i], "task": rows_tasks[i]}

    def collate(features):
        return {"input_ids": torch.stack([f["input_ids"] for f in features]),
                "labels": torch.stack([f["labels"] for f in features]), "task": [f["task"] for f in features]}

    params = [p for n, p in model.named_parameters() if ".lora_" in n]
    optimizer = torch.optim.SGD(params, lr=0.1)
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=len(rows_tasks),
                             max_steps=1, remove_unused_columns=False, report_to=[], use_cpu=True,
                             save_strategy="no", lr_scheduler_type="constant", max_grad_norm=0.0,
                             disable_tqdm=True, logging_strategy="no")
    trainer_cls(model=model, args=args, train_dataset=Rows(), data_collator=collate,
                optimizers=(optimizer, None)).train()
    return ids


def _trainer_twin_step(twin, ids, rows_tasks):
    """What one SGD step on the mean causal-LM loss over all rows gives each adapter: its rows' token-loss sum
    over the batch's token count, run alone."""
    count = ids.shape[0] * (ids.shape[1] - 1)
    for name in dict.fromkeys(rows_tasks):
        rows = [i for i, t in enumerate(rows_tasks) if t == name]
        pe.set_active_adapter(twin, name)
        logits = twin(input_ids=ids[rows]).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[rows][:, 1:].reshape(-1), reduction="sum")
        (loss / count).backward()
    with torch.no_grad():
        for n, p in twin.named_parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad


def _trainer_model(tiny):
    return _model(tiny, "llama1", pe.LoraConfig(r=3), pe.LoraConfig(r=2, target_modules=["v_proj", "o_proj"]))


TASKS = ["a", "b", "b", "a"]


def _assert_trains_as_alone(tiny, trainer_cls):
    """One Trainer step over TASKS moves each adapter as one SGD step on its own rows alone does."""
    model = _trainer_model(tiny)
    twin = copy.deepcopy(model)
    ids = _trainer_run(model, trainer_cls, TASKS)
    _trainer_twin_step(twin, ids, TASKS)
    theirs = dict(twin.named_parameters())
    for n, p in model.named_parameters():
        assert (p - theirs[n]).abs().max().item() < 1e-7, n    # transformers' loss upcasts logits to float32


def test_trainer_training_step_recipe(tiny, reference_backend):
    """HF Trainer with training_step overridden to open adapter_batch over the batch's task column (forward and
    backward inside it): one step moves each adapter as a step on its own rows alone does."""
    from transformers import Trainer

    class MixedTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            with pe.adapter_batch(model, inputs.pop("task")):
                return super().training_step(model, inputs, num_items_in_batch)

    _assert_trains_as_alone(tiny, MixedTrainer)


# ------------------------------------------------------------------------------------- backward after the block
def test_backward_after_the_block_exits_trains_every_mapped_adapter(tiny, reference_backend):
    """The loss computed inside `with pe.adapter_batch(...)` and `.backward()` called after the block (the pattern
    torch documents for autocast, and what HF Trainer does when compute_loss opens the block) gives every mapped
    adapter its rows' gradient: a block whose layers ran with gradients leaves its mapped adapters trainable
    (regression: the exit restored requires_grad=False and autograd's AccumulateGrad skipped them silently);
    set_active_adapter freezes all but one again."""
    model = _model(tiny, "llama1", pe.LoraConfig(r=3), [pe.BottleneckConfig(bottleneck=3),
                                                       pe.PrefixConfig(num_virtual_tokens=2)])
    ids, w = _ids(), _weights()
    want = _alone_grads(model, MAPPING, ids, w)
    with pe.adapter_batch(model, MAPPING):
        loss = _loss(model, ids, [0, 1, 2, 3], w)
    loss.backward()
    _assert_same_grads(_grads(model), want, what="backward after the block: ")
    pe.set_active_adapter(model, "a")
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".b." in n)


def test_trainer_compute_loss_recipe_trains_every_adapter(tiny, reference_backend):
    """The recipe most HF users write: a Trainer subclass whose compute_loss opens adapter_batch over the batch's
    task column. Trainer.training_step calls accelerator.backward(loss) after compute_loss returns, i.e. after the
    block; each adapter still moves as a step on its own rows alone moves it (regression: "b", not the active
    adapter, was never trained while the logged loss included its rows)."""
    from transformers import Trainer

    class MixedTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            with pe.adapter_batch(model, inputs.pop("task")):
                out = model(**inputs)
            return (out.loss, out) if return_outputs else out.loss

    _assert_trains_as_alone(tiny, MixedTrainer)


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointed_backward_after_the_block_exits(tiny, reentrant, reference_backend):
    """With gradient checkpointing, backward recomputes the forward; after the block the layers no longer know
    its rows' adapters, so the recomputation is refused by name (regression: use_reentrant=True recomputed every
    row with the active adapter, silently wrong gradients; use_reentrant=False raised a CheckpointError about
    saved tensors). Backward inside the block works (test_gradient_checkpointing_inside_the_block)."""
    model = _model(tiny, "llama1", pe.LoraConfig(r=3, target_modules=["q_proj", "v_proj"]),
                   pe.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    ids, w = _ids(), _weights()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    with pe.adapter_batch(model, MAPPING):
        loss = _loss(model, ids, [0, 1, 2, 3], w)
    with pytest.raises(RuntimeError, match="recomputed a forward of a pe.adapter_batch block after the block"):
        loss.backward()


def test_remap_leaves_an_adapter_without_rows_untouched_by_the_optimizer(tiny, reference_backend):
    """After a remap that leaves adapter b no rows, b gets no gradient (None), as in a fresh block with the same
    mapping, so torch optimizers skip it (regression: a .grad of zeros let AdamW move b by momentum and weight
    decay). A traced or captured step still stacks every block adapter (its graph may replay another mapping)."""
    model = _model(tiny, "llama1", pe.LoraConfig(r=2, target_modules=["q_proj"]),
                   pe.LoraConfig(r=2, target_modules=["q_proj"]))
    twin = copy.deepcopy(model)
    ids = _ids(2)
    b_of = lambda m: [p for n, p in m.named_parameters() if ".b." in n]

    def run(m, remap):
        """Step 1 on ["a", "b"]; step 2 on ["a", "a"]: by remap inside the block, or in a new block."""
        with pe.adapter_batch(m, ["a", "b"]):
            optimizer = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
            m(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if remap:
                pe.remap_adapter_batch(m, ["a", "a"])
                m(input_ids=ids, labels=ids).loss.backward()
                grads = [p.grad for p in b_of(m)]
                optimizer.step()
        if not remap:
            with pe.adapter_batch(m, ["a", "a"]):
                m(input_ids=ids, labels=ids).loss.backward()
                grads = [p.grad for p in b_of(m)]
                optimizer.step()
        return grads

    fresh = run(twin, remap=False)
    assert all(g is None for g in fresh)
    remapped = run(model, remap=True)
    theirs = dict(twin.named_parameters())
    moved = [n for n, p in model.named_parameters() if ".b." in n and not torch.equal(p, theirs[n])]
    assert not moved, (f"adapter b had no rows after the remap but the optimizer moved {moved} (its grads: "
                       f"{[None if g is None else g.abs().max().item() for g in remapped]})")


@needs_triton
def test_triton_remap_between_forward_and_backward(monkeypatch):
    """A forward on one mapping, remap_adapter_batch, a forward on the new mapping, then one backward of the
    summed loss: each pass gets its own mapping's gradients, as on the reference backend
    (test_gradient_accumulation_across_blocks_and_remaps). A forward that records a graph reads copies of the
    batch's token tensors (regression: the remap rewrote the saved index in place and backward failed)."""
    monkeypatch.setenv("PTLM_BACKEND", "triton")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, intermediate_size=40, vocab_size=VOCAB))
    pe.add_adapter(model, "a", pe.LoraConfig(r=3, target_modules=["q_proj"]))
    pe.add_adapter(model, "b", pe.LoraConfig(r=2, target_modules=["q_proj"]))
    _randomize(model)
    model.train()
    ids, w = _ids(3, 3), torch.randn(3, 3, VOCAB, generator=torch.Generator().manual_seed(7))
    loss = lambda: (model(input_ids=ids).logits * w).sum()
    first, second = ["a", "b", None], ["b", "a", "a"]
    with pe.adapter_batch(model, first):
        loss().backward()
        pe.remap_adapter_batch(model, second)
        loss().backward()
    want = _grads(model)
    model.zero_grad(set_to_none=True)
    with pe.adapter_batch(model, first):
        total = loss()
        pe.remap_adapter_batch(model, second)
        (total + loss()).backward()
    got = _grads(model)
    assert sorted(got) == sorted(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-5, msg=n)


@needs_triton
def test_triton_mixed_batch_gradients_equal_each_adapter_alone(monkeypatch):
    """The Triton kernels (grouped multi-adapter LoRA, multi-adapter bottleneck, prefix attention) in a training
    mixed batch: each adapter's gradient equals its rows alone (float32, tiny odd shapes)."""
    monkeypatch.setenv("PTLM_BACKEND", "triton")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, intermediate_size=40, vocab_size=VOCAB))
    pe.add_adapter(model, "a", [pe.LoraConfig(r=3, target_modules=["q_proj", "k_proj", "v_proj"]),
                                pe.PrefixConfig(num_virtual_tokens=2)])
    pe.add_adapter(model, "b", [pe.LoraConfig(r=2, target_modules=["v_proj", "k_proj"]),
                                pe.BottleneckConfig(bottleneck=3)])
    _randomize(model)
    model.train()
    ids = _ids(3, 3)
    w = torch.randn(3, LENGTH, VOCAB, generator=torch.Generator().manual_seed(7))
    mapping = ["a", "b", None]
    with pe.adapter_batch(model, mapping):
        _loss(model, ids, [0, 1, 2], w).backward()
    mixed = _grads(model)
    want = _alone_grads(model, mapping, ids, w)
    assert sorted(mixed) == sorted(want)
    for n in want:
        torch.testing.assert_close(mixed[n], want[n], rtol=1e-4, atol=1e-5, msg=n)
