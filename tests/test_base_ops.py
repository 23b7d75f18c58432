"""fuse_base_ops / unfuse_base_ops on tiny transformers models: a LoRA-adapted Llama's loss, logits and LoRA
gradients unchanged by the fused RMSNorm / silu_mul / RoPE ops and loss (fp32 and fp16, the adapter added after or
before; a training step's fused loss returns no logits, eval mode and calls without labels return HF's), state-dict
keys unchanged, idempotence, exact restoration (the same module objects, the class forward, transformers' own
apply_rotary_pos_emb once no fused model holds it), the class and function tables (Mistral, Qwen2, Qwen3 fused;
Gemma's (1 + weight) RMSNorm and gelu MLP not), the loss's keyword arguments, autocast, and where it stays unfused."""
import copy
import gc
import importlib
import math
import pickle
import warnings
import weakref

import pytest
import torch
from torch import nn
from transformers import (GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

import ptlm_engine as pe
from ptlm_engine import base_ops
from ptlm_engine.layers.rms_norm import FusedRMSNorm
from tests.helpers import needs_triton, rel_err

SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, vocab_size=97)
LLAMA = "transformers.models.llama.modeling_llama"
# per dtype: the largest relative error (norm) of the logits and of each LoRA gradient, fused against HF's code
BOUND = {torch.float32: 1e-5, torch.float16: 1e-2}


def _build(config_class, model_class, dtype=torch.float32, **extra):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model_class(config_class(**{**SIZES, **extra})).to(dtype)


def _adapt(model):
    """A LoRA adapter on all 7 projections, its weights random (B starts at zero) and the same on every copy."""
    pe.add_adapter(model, "a", pe.LoraConfig(r=4, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def _ids(vocab=SIZES["vocab_size"], shape=(2, 9), seed=2):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _step(model, **kwargs):
    """The next-token loss, the logits (None where the fused loss skips them) and every trainable parameter's
    gradient."""
    ids = _ids()
    model.zero_grad()
    out = model(input_ids=ids, labels=ids, **kwargs)
    out.loss.backward()
    logits = None if out.logits is None else out.logits.detach()
    return out.loss.detach(), logits, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same_step(got, want, dtype, n_grads=2 * 7 * 2, bound=None):
    bound = bound or BOUND[dtype]
    assert rel_err(got[0], want[0]) <= bound, "loss"
    assert got[1] is None or rel_err(got[1], want[1]) <= bound, "logits"
    assert got[2].keys() == want[2].keys() and len(want[2]) == n_grads
    for name, grad in want[2].items():
        assert rel_err(got[2][name], grad) <= bound, name


def _assert_eval_as_before(model, want, dtype):
    """Eval mode (with labels, no_grad) returns HF's logits and loss."""
    model.eval()
    with torch.no_grad():
        out = model(input_ids=_ids(), labels=_ids())
    model.train()
    assert rel_err(out.logits, want[1]) <= BOUND[dtype] and rel_err(out.loss, want[0]) <= BOUND[dtype]


def _norms(model):
    return {name: m for name, m in model.named_modules() if type(m).__name__.endswith("RMSNorm")}


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_fused_llama_trains_lora_as_the_original(dtype):
    modeling = importlib.import_module(LLAMA)
    gc.collect()                  # fused models other tests left behind: dead holders of the RoPE patch go
    original_rotary = getattr(modeling.apply_rotary_pos_emb, "ptlm_original", modeling.apply_rotary_pos_emb)
    base = _build(LlamaConfig, LlamaForCausalLM, dtype)
    model = copy.deepcopy(base)
    _adapt(model)
    want = _step(model)
    keys, norms = list(model.state_dict()), _norms(model)

    counts = pe.fuse_base_ops(model)
    assert counts == {"rms_norm": 5, "gated_mlp": 2, "rotary": 1, "loss": 1}
    assert pe.fuse_base_ops(model) == counts                                   # idempotent
    assert list(model.state_dict()) == keys
    assert all(isinstance(m, FusedRMSNorm) for m in _norms(model).values())
    assert model.model.norm.weight is norms["model.norm"].weight                # the same Parameter
    assert modeling.apply_rotary_pos_emb is not original_rotary
    got = _step(model)
    assert got[1] is None                              # the fused loss of a training step materializes no logits
    _assert_same_step(got, want, dtype)
    _assert_eval_as_before(model, want, dtype)

    if dtype == torch.float32:  # fused first, the adapter added afterwards: the LoRA layers sit inside the MLP
        other = copy.deepcopy(base)
        pe.fuse_base_ops(other)
        _adapt(other)
        _assert_same_step(_step(other), want, dtype)
        pe.unfuse_base_ops(other)
        assert modeling.apply_rotary_pos_emb is not original_rotary           # `model` still holds the patch

    pe.unfuse_base_ops(model)
    assert _norms(model) == norms                                              # the very same modules back
    assert all("forward" not in layer.mlp.__dict__ for layer in model.model.layers)
    assert "forward" not in model.__dict__                                     # the class forward: HF's loss
    assert modeling.apply_rotary_pos_emb is original_rotary
    assert list(model.state_dict()) == keys
    pe.unfuse_base_ops(model)                                                  # a second undo changes nothing
    assert _norms(model) == norms and modeling.apply_rotary_pos_emb is original_rotary


@pytest.mark.parametrize("config_class, model_class, counts", [
    (MistralConfig, MistralForCausalLM, {"rms_norm": 5, "gated_mlp": 2, "rotary": 1, "loss": 1}),
    (Qwen2Config, Qwen2ForCausalLM, {"rms_norm": 5, "gated_mlp": 2, "rotary": 1, "loss": 1}),
    (Qwen3Config, Qwen3ForCausalLM, {"rms_norm": 9, "gated_mlp": 2, "rotary": 1, "loss": 1}),  # + q_norm, k_norm
    (GemmaConfig, GemmaForCausalLM, {"rms_norm": 0, "gated_mlp": 0, "rotary": 0, "loss": 0}),  # (1 + weight), gelu
])
def test_tables_cover_mistral_qwen_and_leave_gemma(config_class, model_class, counts):
    model = _build(config_class, model_class, head_dim=16)
    assert pe.fuse_base_ops(model) == counts
    modules = [name for name in base_ops.ROTARY_FUNCTIONS if name.endswith(config_class.model_type)]
    for name in modules:   # the patched function equals the original (fp16: the same values bit for bit)
        modeling = importlib.import_module(name)
        patched = modeling.apply_rotary_pos_emb
        q, k = torch.randn(2, 9, 4, 16).half().transpose(1, 2), torch.randn(2, 9, 2, 16).half().transpose(1, 2)
        cos, sin = torch.randn(1, 9, 16).half(), torch.randn(1, 9, 16).half()
        for ours, theirs in zip(patched(q, k, cos, sin), patched.ptlm_original(q, k, cos, sin)):
            assert torch.equal(ours, theirs)
    pe.unfuse_base_ops(model)
    assert not any(isinstance(m, FusedRMSNorm) or "forward" in m.__dict__ for m in model.modules())
    for name in modules:
        assert not hasattr(importlib.import_module(name).apply_rotary_pos_emb, "ptlm_original")


def test_rotary_patch_falls_back_to_transformers_without_triton(monkeypatch):
    """Where the fused op does not run (here: the reference backend) the patched function calls HF's own."""
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    model = _build(LlamaConfig, LlamaForCausalLM)
    pe.fuse_base_ops(model)
    try:
        patched = importlib.import_module(LLAMA).apply_rotary_pos_emb
        q, k = torch.randn(1, 4, 5, 16, requires_grad=True), torch.randn(1, 2, 5, 16)
        cos, sin = torch.randn(1, 5, 16), torch.randn(1, 5, 16)
        q_out, _ = patched(q, k, cos, sin)
        assert "Rotary" not in q_out.grad_fn.name()
        assert torch.equal(q_out, patched.ptlm_original(q, k, cos, sin)[0])
    finally:
        pe.unfuse_base_ops(model)


@needs_triton
def test_rotary_patch_fuses_only_inside_fused_models(monkeypatch):
    """The patched function is module-global, but only a fused model's attention runs the fused op: an unfused
    Llama in the same process, and a direct call, get transformers' function; an exception raised inside a fused
    attention closes its scope."""
    fused_calls = []
    apply_checked = base_ops.apply_checked
    monkeypatch.setattr(base_ops, "apply_checked", lambda *args: fused_calls.append(1) or apply_checked(*args))
    fused, plain = _build(LlamaConfig, LlamaForCausalLM), _build(LlamaConfig, LlamaForCausalLM)
    want = plain(input_ids=_ids()).logits
    pe.fuse_base_ops(fused)
    try:
        assert torch.equal(plain(input_ids=_ids()).logits, want) and fused_calls == []
        q, k = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16)
        cos, sin = torch.randn(1, 5, 16), torch.randn(1, 5, 16)
        importlib.import_module(LLAMA).apply_rotary_pos_emb(q, k, cos, sin)
        assert fused_calls == []
        fused(input_ids=_ids())
        assert len(fused_calls) == SIZES["num_hidden_layers"]

        def fail(module, args, output):
            raise RuntimeError("o_proj failed")
        handle = fused.model.layers[0].self_attn.o_proj.register_forward_hook(fail)
        with pytest.raises(RuntimeError, match="o_proj failed"):
            fused(input_ids=_ids())
        handle.remove()
        assert base_ops._rotary_depth() == 0
        assert torch.equal(plain(input_ids=_ids()).logits, want) and len(fused_calls) == SIZES["num_hidden_layers"] + 1
    finally:
        pe.unfuse_base_ops(fused)
    assert not any(base_ops._scope_hooks(m) or m._forward_hooks for m in fused.modules())


def test_fused_model_pickles_and_its_copy_holds_the_patch(monkeypatch):
    """pickle round trip of a fused, adapted Llama: the same fused ops and loss; the copy holds the RoPE patch after
    the original's unfuse, and its own unfuse puts transformers' function back."""
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    modeling = importlib.import_module(LLAMA)
    gc.collect()
    original_rotary = getattr(modeling.apply_rotary_pos_emb, "ptlm_original", modeling.apply_rotary_pos_emb)
    model = _build(LlamaConfig, LlamaForCausalLM)
    _adapt(model)
    counts = pe.fuse_base_ops(model)
    want = model(input_ids=_ids(), labels=_ids()).loss
    twin = pickle.loads(pickle.dumps(model))
    assert base_ops._counts(twin) == counts == {"rms_norm": 5, "gated_mlp": 2, "rotary": 1, "loss": 1}
    pe.unfuse_base_ops(model)
    assert modeling.apply_rotary_pos_emb is not original_rotary
    assert torch.equal(twin(input_ids=_ids(), labels=_ids()).loss, want)
    pe.unfuse_base_ops(twin)
    assert modeling.apply_rotary_pos_emb is original_rotary


@pytest.mark.parametrize("kwargs", [
    dict(num_items_in_batch=7),
    dict(ignore_index=int(_ids()[0, 4])),                                  # a label that occurs
    dict(shift_labels=torch.randint(-1, SIZES["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(3)),
         ignore_index=-1),
    dict(autocast=True),
], ids=["num_items_in_batch", "ignore_index", "shift_labels", "autocast"])
def test_fused_loss_takes_transformers_loss_arguments(kwargs, monkeypatch):
    """The loss's keyword arguments as ForCausalLMLoss reads them, and F.linear's autocast (bf16 logits), with every
    parameter trainable (the head's weight gradient too). The reference backend: the chunk logic without the
    interpreter's cost."""
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    kwargs = dict(kwargs)
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=kwargs.pop("autocast", False))
    base = _build(LlamaConfig, LlamaForCausalLM)
    model = copy.deepcopy(base)
    assert pe.fuse_base_ops(model)["loss"] == 1
    n_grads = len(list(base.parameters()))
    with autocast:
        want, got = _step(base, **kwargs), _step(model, **kwargs)
    assert got[1] is None
    _assert_same_step(got, want, torch.float32, n_grads, bound=2e-2 if autocast._enabled else None)
    pe.unfuse_base_ops(model)


def test_loss_left_unfused_where_it_does_not_apply(monkeypatch):
    """A training call without labels, one asking for a tuple, and (with the adapter's layers) an adapter on lm_head
    run the class forward and return HF's logits; loss=False and an adapter on lm_head before fusing leave the loss
    unfused."""
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    base = _build(LlamaConfig, LlamaForCausalLM)
    model = copy.deepcopy(base)
    assert pe.fuse_base_ops(model, loss=False)["loss"] == 0 and "forward" not in model.__dict__
    assert pe.fuse_base_ops(model)["loss"] == 1
    want = base(input_ids=_ids(), labels=_ids())
    assert rel_err(model(input_ids=_ids()).logits, want.logits) <= BOUND[torch.float32]
    loss, logits = model(input_ids=_ids(), labels=_ids(), return_dict=False)[:2]
    assert rel_err(loss, want.loss) <= BOUND[torch.float32] and rel_err(logits, want.logits) <= BOUND[torch.float32]
    pe.add_adapter(model, "head", pe.LoraConfig(r=2, target_modules=["lm_head"]))
    assert model(input_ids=_ids(), labels=_ids()).logits is not None
    pe.unfuse_base_ops(model)
    assert pe.fuse_base_ops(model)["loss"] == 0
    pe.unfuse_base_ops(model)


def test_fused_loss_forward_follows_deep_copies_and_keeps_no_cycle(monkeypatch):
    """A deep copy's forward runs the copy (its zeroed head gives loss log V); a dropped fused model is freed at once,
    its MLPs too (no reference cycle: it stops holding the RoPE patch without waiting for the garbage collector)."""
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    model = _build(LlamaConfig, LlamaForCausalLM)
    pe.fuse_base_ops(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.lm_head.weight.zero_()
    loss = twin(input_ids=_ids(), labels=_ids()).loss
    assert loss.item() == pytest.approx(math.log(SIZES["vocab_size"]), rel=1e-6)
    assert model(input_ids=_ids(), labels=_ids()).loss.item() != pytest.approx(loss.item())
    refs = [weakref.ref(model), weakref.ref(twin), weakref.ref(model.model.layers[0].mlp)]
    gc.disable()
    try:
        del model, twin
        assert all(ref() is None for ref in refs)
    finally:
        gc.enable()


def _small_llama(dtype=torch.float32, **extra):
    return _build(LlamaConfig, LlamaForCausalLM, dtype, **extra)


def test_gated_mlp_fusion_leaves_other_silu_mlps_alone(monkeypatch):
    """FalconH1's MLP has gate_proj / up_proj / down_proj and a SiLU act_fn, but computes
    down(up(x) * silu(gate(x) * gate_multiplier)) * down_multiplier: fuse_base_ops leaves it alone, so the outputs
    stay the model's (regression: matched by structure, it was given down(silu(gate(x)) * up(x)))."""
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
    (backward of the scaled loss); the fused loss's LoRA gradients agree with HF's to 1e-2 (regression: computing
    (softmax - onehot) / num_items_in_batch in fp16 before the scaler's factor underflowed, ~17% off)."""
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    vocab = 8192
    base = _small_llama(torch.float16, vocab_size=vocab)
    _adapt(base)
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
    transformers' loss; the fused loss takes it too and gives the same loss (regression: a ValueError)."""
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    base = _small_llama()
    fused = copy.deepcopy(base)
    pe.fuse_base_ops(fused)
    x = _ids()
    shift = torch.nn.functional.pad(x, (0, 1), value=-100)[..., 1:].reshape(-1)
    want = base(input_ids=x, labels=x, shift_labels=shift).loss
    got = fused(input_ids=x, labels=x, shift_labels=shift).loss
    assert rel_err(got, want) <= 1e-5


def test_fuse_after_modules_to_save_mlp_keeps_training_the_copy(monkeypatch):
    """LoRA with modules_to_save=["mlp"] first, then fuse_base_ops: the adapter's trainable MLP copy still runs,
    gets its gradients and sets the loss. The ModulesToSave wrapper exposes the original's gate_proj / up_proj /
    down_proj / act_fn (its children and __getattr__); fusing the wrapper itself would run the frozen original."""
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    config = pe.LoraConfig(r=4, target_modules=["v_proj"], modules_to_save=["mlp"])
    base = _small_llama()
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
    unfuse_base_ops: no FusedRMSNorm is left, neither among the ModulesToSave copies nor as a wrapped
    original_module; unfuse gives back the original modules."""
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    from ptlm_engine.layers.rms_norm import FusedRMSNorm
    model = _small_llama()
    pe.fuse_base_ops(model)
    pe.add_adapter(model, "a", pe.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                             modules_to_save=["input_layernorm", "post_attention_layernorm"]))
    pe.unfuse_base_ops(model)
    left = [name for name, m in model.named_modules() if isinstance(m, FusedRMSNorm)]
    left += [f"{name}.original_module" for name, m in model.named_modules()
             if isinstance(getattr(m, "original_module", None), FusedRMSNorm)]
    assert left == []



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_llama_bf16_on_cuda():
    """The Triton kernels on the GPU, bf16: the fused step's loss and gradients within bf16's error of HF's, eval
    logits bitwise close (the ops replicate HF's roundings)."""
    base = _build(LlamaConfig, LlamaForCausalLM, torch.bfloat16, max_position_embeddings=64).cuda()
    _adapt(base)
    ids = torch.randint(0, SIZES["vocab_size"], (4, 33), device="cuda")
    ids[0, :5] = -100

    def step():
        base.zero_grad()
        out = base(input_ids=ids.clamp_min(0), labels=ids)
        out.loss.backward()
        base.eval()
        with torch.no_grad():
            logits = base(input_ids=ids.clamp_min(0)).logits
        base.train()
        return out.loss.detach(), logits, {n: p.grad.clone() for n, p in base.named_parameters() if p.requires_grad}

    want = step()
    assert pe.fuse_base_ops(base) == {"rms_norm": 5, "gated_mlp": 2, "rotary": 1, "loss": 1}
    try:
        got = step()
    finally:
        pe.unfuse_base_ops(base)
    assert rel_err(got[0], want[0]) <= 1e-2
    assert rel_err(got[1], want[1]) <= 1e-2
    for name, grad in want[2].items():
        assert rel_err(got[2][name], grad) <= 3e-2, name


def test_fused_loss_under_autocast_leaves_float64_head_in_float64(tiny, ids):
    """fuse_base_ops' fused causal-LM loss under `torch.autocast("cpu", dtype=torch.bfloat16)` on a float64 model:
    transformers' lm_head is not autocast there (float64 is not eligible), so its loss is
    cross_entropy(float64 logits .float()), and the fused loss leaves the float64 head in float64 as well
    (regression: it cast hidden and weight to bf16, ~3e-5 off). Tolerance 2e-6 (a few float32 roundings of a loss
    of ~5)."""
    model = tiny("llama").double().train()
    fused = tiny("llama").double().train()
    assert pe.fuse_base_ops(fused)["loss"] == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(input_ids=ids, labels=ids).loss
        got = fused(input_ids=ids, labels=ids).loss
    err = abs(got.item() - expected.item())
    assert err < 2e-6, f"fused loss {got.item()!r} vs transformers' {expected.item()!r} (off by {err:.1e})"


# ----------------------------------------------------------------------- what the fused modules must not drop
class _ScaledHead(nn.Linear):
    """An nn.Linear subclass with its own forward (muP / Granite-style output scaling; quantized heads are
    nn.Linear subclasses whose forward is not F.linear(x, weight, bias) either)."""

    def forward(self, x):
        return super().forward(x) * 0.5


def _halve_grad_output(module, grad_output):
    return (grad_output[0] * 0.5,)


def _same_training_step(base, **fuse):
    fused = copy.deepcopy(base)
    pe.fuse_base_ops(fused, **fuse)
    want = _step(base)
    _assert_same_step(_step(fused), want, torch.float32, n_grads=len(want[2]))


def test_the_loss_is_not_fused_over_a_head_with_its_own_forward():
    base = _build(LlamaConfig, LlamaForCausalLM)
    head = _ScaledHead(SIZES["hidden_size"], SIZES["vocab_size"], bias=False)
    head.weight = base.lm_head.weight
    base.lm_head = head
    _same_training_step(base)


@pytest.mark.parametrize("where", ["lm_head", "norm"])
def test_modules_with_backward_hooks_are_not_fused(where):
    """A backward hook (gradient scaling, clipping, importance tracking) runs only where the module runs: the fused
    loss never calls lm_head, a fused norm replaces the module."""
    base = _build(LlamaConfig, LlamaForCausalLM)
    (base.lm_head if where == "lm_head" else base.model.norm).register_full_backward_pre_hook(_halve_grad_output)
    _same_training_step(base, loss=where == "lm_head")


def test_unfuse_puts_norms_back_in_the_models_mode_with_the_hooks_registered_meanwhile():
    """The replaced norms sit outside the module tree while fused (model.eval() does not reach them): unfuse gives
    them the fused modules' mode, and the hooks registered on those (their dicts: the handles still remove them)."""
    model = _build(LlamaConfig, LlamaForCausalLM)
    pe.fuse_base_ops(model)
    model.eval()
    calls = []
    handle = model.model.norm.register_forward_hook(lambda module, args, output: calls.append(1))
    pe.unfuse_base_ops(model)
    assert [name for name, m in model.named_modules() if m.training] == []
    with torch.no_grad():
        model(input_ids=_ids())
    handle.remove()
    with torch.no_grad():
        model(input_ids=_ids())
    assert calls == [1]


def test_fused_loss_runs_on_meta_tensors(monkeypatch):
    """The fused loss's autocast check holds on the meta device (shape inference), which has no autocast state:
    torch.is_autocast_enabled("meta") raises, as the adapter layers' check did before layers.base.autocast_on.
    (The reference backend: the interpreter cannot run kernels on storage-less tensors.)"""
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    hidden = torch.empty(4, 8, device="meta")
    head = nn.Linear(8, 11, bias=False, device="meta")
    loss = base_ops._head_loss(hidden, head, torch.zeros(4, dtype=torch.long, device="meta"), -100, None)
    assert loss.shape == () and loss.device.type == "meta"
