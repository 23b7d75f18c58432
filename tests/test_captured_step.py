"""capture_train_step: the warm-up leaves parameters and optimizer state as they were (AdamW fresh and mid-run,
SGD with momentum); the eager form equals a plain training loop (tiny Llama with ptlm's LoRA, gradient clipping);
bad batches and arguments are refused before anything runs. On CUDA: the captured step equals eager steps (ptlm
LoRA, with fused base ops, HF PEFT), a tensor learning rate filled in place takes effect."""
import copy
import warnings

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import ptlm_engine as pe
from ptlm_engine.captured_step import _Snapshot
from tests.helpers import rel_err

VOCAB = 61


def _llama(device="cpu", lora=True):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LlamaForCausalLM(LlamaConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, intermediate_size=80, vocab_size=VOCAB,
                                             attn_implementation="sdpa", use_cache=False)).to(device)
    model.requires_grad_(False)
    if lora:
        pe.add_adapter(model, "a", pe.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.1)
    return model.train()


def _batches(n, device="cpu", seq=11):
    gen = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (2, seq), generator=gen)
        out.append({"input_ids": ids.to(device), "labels": ids.to(device)})
    return out


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _plain_loop(model, optimizer, batches, max_grad_norm=None):
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        if max_grad_norm is not None:
            nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return torch.stack(losses)


@pytest.mark.parametrize("make_opt, steps_before", [
    (lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1), 0),
    (lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1), 2),
    (lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9), 0),
], ids=["adamw_fresh", "adamw_mid_run", "sgd_momentum"])
def test_warmup_snapshot_leaves_no_trace(make_opt, steps_before):
    """Steps taken between a snapshot and its restore change nothing the following steps see."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3))
    twin = copy.deepcopy(model)
    opt, twin_opt = make_opt(list(model.parameters())), make_opt(list(twin.parameters()))
    xs = torch.randn(6, 4, 7)

    def step(m, o, x):
        m(x).square().mean().backward()
        o.step()
        o.zero_grad(set_to_none=True)

    for x in xs[:steps_before]:
        step(model, opt, x)
        step(twin, twin_opt, x)
    snapshot = _Snapshot(list(model.parameters()), opt)
    for x in torch.randn(3, 4, 7):                       # the warm-up: other data, real updates
        step(model, opt, x)
    snapshot.restore()
    for x in xs[steps_before:]:
        step(model, opt, x)
        step(twin, twin_opt, x)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
def test_eager_form_equals_a_plain_loop(max_grad_norm, monkeypatch):
    """Off CUDA the step runs eagerly: the same losses and adapter weights as the loop it stands for."""
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    model = _llama()
    twin = copy.deepcopy(model)
    batches = _batches(3)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    step = pe.capture_train_step(model, opt, batches[0], max_grad_norm=max_grad_norm)
    assert not step.graphed
    got = torch.stack([step(b) for b in batches])
    twin_opt = torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad], lr=1e-2)
    want = _plain_loop(twin, twin_opt, batches, max_grad_norm)
    assert torch.equal(got, want)
    for name, value in _trainable(twin).items():
        assert torch.equal(_trainable(model)[name], value), name


def test_bad_batches_and_arguments_are_refused(monkeypatch):
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    model = _llama()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = _batches(1)[0]
    with pytest.raises(ValueError, match="CUDA device"):
        pe.capture_train_step(model, opt, batch, graph=True)
    with pytest.raises(ValueError, match="warmup"):
        pe.capture_train_step(model, opt, batch, warmup=0)
    with pytest.raises(ValueError, match="empty"):
        pe.capture_train_step(model, opt, {})
    before = _trainable(model)
    step = pe.capture_train_step(model, opt, {**batch, "return_dict": True})
    bad = [
        ({"input_ids": batch["input_ids"]}, "keys"),
        ({**batch, "return_dict": True, "labels": batch["labels"][:, :5]}, r"shape \(2, 11\)"),
        ({**batch, "return_dict": True, "labels": batch["labels"].int()}, "dtype torch.int64"),
        ({**batch, "return_dict": False}, "must equal"),
    ]
    for value, message in bad:
        with pytest.raises(ValueError, match=message):
            step(value)
    assert all(torch.equal(v, before[n]) for n, v in _trainable(model).items())      # nothing ran
    no_loss = pe.capture_train_step(model, opt, {"input_ids": batch["input_ids"]})
    with pytest.raises(ValueError, match="no loss"):
        no_loss({"input_ids": batch["input_ids"]})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("provider", ["ptlm", "ptlm_fused", "peft"])
def test_captured_step_equals_eager_steps_on_cuda(provider):
    """Replays on new batches give the eager loop's losses and weights (fp32, no dropout; transformers' attention
    takes an explicit causal mask under capture, so up to rounding)."""
    def build():
        if provider == "peft":
            from peft import LoraConfig, get_peft_model
            base = _llama("cuda", lora=False)
            model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
            torch.manual_seed(1)
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.normal_(0, 0.1)
            return model.train()
        model = _llama("cuda")
        if provider == "ptlm_fused":
            pe.fuse_base_ops(model)
        return model

    model, twin = build(), build()
    batches = _batches(5, "cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    step = pe.capture_train_step(model, opt, batches[0], max_grad_norm=1.0, warmup=2)
    assert step.graphed
    got = torch.stack([step(b) for b in batches])
    twin_opt = torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    want = _plain_loop(twin, twin_opt, batches, 1.0)
    assert rel_err(got, want) <= 1e-4, (got, want)
    for name, value in _trainable(twin).items():
        assert rel_err(_trainable(model)[name], value) <= 1e-3, name
    if provider == "ptlm_fused":
        pe.unfuse_base_ops(model)
        pe.unfuse_base_ops(twin)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_tensor_learning_rate_filled_in_place_takes_effect():
    model = _llama("cuda")
    lr = torch.tensor(1e-2, device="cuda")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, capturable=True)
    batches = _batches(3, "cuda")
    step = pe.capture_train_step(model, opt, batches[0], warmup=1)
    step(batches[0])
    before = _trainable(model)
    lr.fill_(0.0)
    step(batches[1])
    after = _trainable(model)
    assert all(torch.equal(after[n], v) for n, v in before.items())
    lr.fill_(1e-2)
    step(batches[2])
    assert any(not torch.equal(_trainable(model)[n], v) for n, v in before.items())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
def test_mixed_batch_step_inside_one_adapter_batch(device, monkeypatch):
    """Two adapters trained in one mixed batch, the step captured inside one pe.adapter_batch block, the rows
    swapping adapters halfway through pe.remap_adapter_batch: the eager loop's losses and both adapters' weights
    (on the CPU: the eager form)."""
    if device == "cpu":
        monkeypatch.setenv("PTLM_BACKEND", "reference")

    def build():
        model = _llama(device, lora=False)
        for name in ("a", "b"):
            pe.add_adapter(model, name, pe.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
        torch.manual_seed(2)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".lora_" in n:
                    p.normal_(0, 0.1)
        return model

    names, swapped = ["a", "b"], ["b", "a"]       # one row each; the rows swap adapters halfway
    model, twin = build(), build()
    batches = _batches(4, device)
    opts = [torch.optim.AdamW([p for n, p in m.named_parameters() if ".lora_" in n], lr=1e-2) for m in (model, twin)]
    with pe.adapter_batch(model, names):
        step = pe.capture_train_step(model, opts[0], batches[0], warmup=2)
        assert step.graphed == (device == "cuda")
        got = [step(b) for b in batches[:2]]
        pe.remap_adapter_batch(model, swapped)
        got = torch.stack(got + [step(b) for b in batches[2:]])
    with pe.adapter_batch(twin, names):
        want = _plain_loop(twin, opts[1], batches[:2])
        pe.remap_adapter_batch(twin, swapped)
        want = torch.cat([want, _plain_loop(twin, opts[1], batches[2:])])
    assert rel_err(got, want) <= 1e-4, (got, want)
    lora = lambda m: {n: p.detach() for n, p in m.named_parameters() if ".lora_" in n}
    for name, value in lora(twin).items():
        assert rel_err(lora(model)[name], value) <= 1e-3, name


def test_eager_captured_step_ignores_gradients_left_before_it(monkeypatch):
    """Off CUDA the step runs eagerly, and as a replay uses its batch's gradients alone: none left from before
    (it used to add them to whatever .grad held)."""
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    model = _llama()
    twin = copy.deepcopy(model)
    batch, stale = _batches(2)
    model(**stale).loss.backward()                     # gradients left by, say, a diagnostic backward

    def sgd(m):
        return torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)

    step = pe.capture_train_step(model, sgd(model), batch)
    step(batch)
    twin_opt = sgd(twin)
    twin(**batch).loss.backward()
    twin_opt.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        if p.requires_grad:
            assert torch.equal(p, q), name


def test_serving_after_a_replay_sees_the_parameters_it_wrote(tiny, ids):
    """A replay writes the trainable Parameters from the graph: no optimizer hook runs and no version counter
    moves, so the step itself tells the serving copies (the adapters' pools) that they are stale. A stand-in graph
    writes the Parameters as a replayed optimizer step does."""
    model = tiny("llama")
    for name in ("a", "b"):
        pe.add_adapter(model, name, pe.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    pe.set_active_adapter(model, "a")
    params = [p for p in model.parameters() if p.requires_grad]
    batch = {"input_ids": ids, "labels": ids}
    step = pe.capture_train_step(model, torch.optim.SGD(params, lr=0.1), batch, graph=False)

    class Replay:
        def replay(self):
            for p in params:
                p.data.add_(0.5)                     # through .data: as a graph, no version counter moves
    step.graph, step.loss = Replay(), torch.zeros(())

    def served():
        with torch.no_grad(), pe.adapter_batch(model, ["a", "b"]):
            return model(input_ids=ids).logits
    before = served()
    step(batch)
    after = served()
    with pe.adapter_batch(model, ["a", "b"]):        # with gradients: the Parameters themselves, stacked
        expected = model(input_ids=ids).logits.detach()
    torch.testing.assert_close(after, expected)
    assert not torch.allclose(after, before)
