"""Reproducers found in review of base_ops / the fused ops / capture_train_step (each fails on the current code)."""
import copy
import warnings

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import ptlm_engine as pe
from tests.helpers import rel_err

SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, vocab_size=97)


def _llama(dtype=torch.float32, **extra):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LlamaForCausalLM(LlamaConfig(**{**SIZES, **extra})).to(dtype)


def _ids(vocab=SIZES["vocab_size"], shape=(2, 9), seed=2):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _lora(model):
    pe.add_adapter(model, "a", pe.LoraConfig(r=4, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def test_gated_mlp_fusion_leaves_other_silu_mlps_alone(monkeypatch):
    """FalconH1's MLP has gate_proj / up_proj / down_proj and a SiLU act_fn, but computes
    down(up(x) * silu(gate(x) * gate_multiplier)) * down_multiplier. fuse_base_ops matches MLPs by structure, not by
    a table, and replaces its forward with down(silu(gate(x)) * up(x)): the model's outputs silently change."""
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    from transformers import FalconH1Config, FalconH1ForCausalLM
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = FalconH1ForCausalLM(FalconH1Config(
            vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1,
            mamba_d_state=16, mamba_chunk_size=16, mlp_multipliers=[0.5, 2.0])).eval()
    x = _ids(shape=(1, 8))
    with torch.no_grad():
        want = model(input_ids=x).logits
    pe.fuse_base_ops(model)
    with torch.no_grad():
        got = model(input_ids=x).logits
    pe.unfuse_base_ops(model)
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-5), (got - want).abs().max()


def test_fused_loss_keeps_loss_scaling_fp16_with_num_items_in_batch(monkeypatch):
    """fp16 training with a GradScaler and HF Trainer's gradient accumulation (num_items_in_batch = the tokens of
    all micro-batches). HF's loss rounds the logits' gradient to fp16 *after* the scaler's factor is applied
    (backward of the scaled loss); the fused loss computes (softmax - onehot) / num_items_in_batch in fp16 in the
    forward, where it underflows, and multiplies by the scaler's factor only in backward. The LoRA gradients differ
    from HF's by up to ~17% (they agree to fp16 rounding without the scaler's factor)."""
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    vocab = 8192
    base = _llama(torch.float16, vocab_size=vocab)
    _lora(base)
    fused = copy.deepcopy(base)
    pe.fuse_base_ops(fused)
    x = _ids(vocab, (2, 256), seed=0)
    scale = 65536.0                                    # GradScaler's initial scale
    num_items = torch.tensor(8 * x.numel())            # 8 accumulated micro-batches like this one

    def grads(model):
        model.zero_grad()
        out = model(input_ids=x, labels=x, num_items_in_batch=num_items)
        (out.loss * scale).backward()                  # what GradScaler.scale(loss).backward() does
        return {n: p.grad.float() / scale for n, p in model.named_parameters() if p.grad is not None}

    want, got = grads(base), grads(fused)
    assert want.keys() == got.keys() and want
    worst = max(rel_err(got[n], want[n]) for n in want)
    assert worst <= 1e-2, worst


def test_fused_loss_takes_flat_shift_labels(monkeypatch):
    """ForCausalLMLoss flattens shift_labels (shift_labels.view(-1)), so a (B * L,) shift_labels works with
    transformers' loss; the fused loss refuses it with a ValueError."""
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    base = _llama()
    fused = copy.deepcopy(base)
    pe.fuse_base_ops(fused)
    x = _ids()
    shift = torch.nn.functional.pad(x, (0, 1), value=-100)[..., 1:].reshape(-1)
    want = base(input_ids=x, labels=x, shift_labels=shift).loss
    got = fused(input_ids=x, labels=x, shift_labels=shift).loss
    assert rel_err(got, want) <= 1e-5


def test_eager_captured_step_ignores_gradients_left_before_it(monkeypatch):
    """Off CUDA the step runs eagerly, but unlike the captured step (which zeroes the gradients before its warm-up
    and capture: every replay's gradients are its batch's alone) it adds the batch's gradients to whatever .grad
    the parameters already hold, so the first step's update differs from the captured step's."""
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    model = _llama()
    model.requires_grad_(False)
    _lora(model)
    model.train()
    twin = copy.deepcopy(model)
    x = _ids()
    batch = {"input_ids": x, "labels": x}
    model(**{"input_ids": _ids(seed=5), "labels": _ids(seed=5)}).loss.backward()  # e.g. a diagnostic backward

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


def test_fuse_after_modules_to_save_mlp_keeps_training_the_copy(monkeypatch):
    """LoRA with modules_to_save=["mlp"] first, then fuse_base_ops: the ModulesToSave wrapper exposes the
    original's gate_proj / up_proj / down_proj / act_fn (its children and __getattr__), so _fusable_mlp takes the
    wrapper itself and gives it the fused forward, which runs the original (frozen) projections: the adapter's
    trainable MLP copy is bypassed, gets no gradient, and its weights do not affect the output."""
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    config = pe.LoraConfig(r=4, target_modules=["v_proj"], modules_to_save=["mlp"])
    base = _llama()
    pe.add_adapter(base, "a", config)
    with torch.no_grad():                              # the copies trained away from the original MLP
        for layer in base.model.layers:
            for p in layer.mlp.modules_to_save["a"].parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    fused = copy.deepcopy(base)
    pe.fuse_base_ops(fused)
    x = _ids()

    def step(model):
        model.zero_grad()
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    (want_loss, want), (got_loss, got) = step(base), step(fused)
    assert got.keys() == want.keys(), sorted(set(want) - set(got))
    assert rel_err(got_loss, want_loss) <= 1e-5


def test_unfuse_restores_modules_fused_before_modules_to_save(monkeypatch):
    """fuse_base_ops, then LoRA with modules_to_save on the decoder norms (LongLoRA-style trainable norms), then
    unfuse_base_ops: the FusedRMSNorm modules inside the ModulesToSave wrappers (the copies and the wrapped
    original_module) stay, as do the wrappers' MLP / attention forwards where those are saved. unfuse does not
    give back the original modules."""
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    from ptlm_engine.layers.rms_norm import FusedRMSNorm
    model = _llama()
    pe.fuse_base_ops(model)
    pe.add_adapter(model, "a", pe.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                             modules_to_save=["input_layernorm", "post_attention_layernorm"]))
    pe.unfuse_base_ops(model)
    left = [name for name, m in model.named_modules() if isinstance(m, FusedRMSNorm)]
    left += [f"{name}.original_module" for name, m in model.named_modules()
             if isinstance(getattr(m, "original_module", None), FusedRMSNorm)]
    assert left == []
