"""Against HF PEFT on the same weights: the same trainable parameters, outputs, gradients, merged weights,
training curve and targeted modules, and adapter files exchanged both ways."""
import warnings
import zlib

import peft
import pytest
import torch

import ptlm_engine as pe
from ptlm_engine import inject
from tests.helpers import needs_triton

pytestmark = [pytest.mark.usefixtures("reference_backend"),
              pytest.mark.filterwarnings("ignore::UserWarning"),   # PEFT: "fan_in_fan_out ... Conv1D"
              pytest.mark.filterwarnings("ignore::FutureWarning")]


# (model kind, our config, the same adapter as PEFT's config)
CASES = {
    "llama": ("llama", dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"])),
    "gpt2_bias_all": ("gpt2", dict(r=4, alpha=16, target_modules=["c_attn", "c_proj"], bias="all")),
    "bert_saved_classifier": ("bert_cls", dict(r=2, alpha=4, target_modules=["query", "value"], bias="lora_only",
                                               modules_to_save=["classifier"])),
    "llama_rslora_layer1": ("llama", dict(r=8, alpha=8, use_rslora=True, target_modules=["o_proj", "down_proj"],
                                          layers_to_transform=[1])),
    # per-module ranks and alphas (the first matching key wins, so their order counts), one module excluded
    "llama_patterns": ("llama", dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                     rank_pattern={r"layers\.1\.self_attn\.q_proj": 2, "v_proj": 8, ".*_proj": 3},
                                     alpha_pattern={"down_proj": 3}, exclude_modules=["layers.0.down_proj"])),
    "gpt2_rslora_patterns": ("gpt2", dict(r=4, alpha=16, use_rslora=True, target_modules="all-linear",
                                          exclude_modules=r".*\.h\.0\.attn\.c_proj", rank_pattern={"c_fc": 6},
                                          alpha_pattern={r"h\.1\.mlp\.c_proj": 5})),
}


def _peft_config(kw):
    names = {"alpha": "lora_alpha", "dropout": "lora_dropout"}
    return peft.LoraConfig(**{names.get(k, k): v for k, v in kw.items()})


def _canonical(name: str, adapter: str) -> str:
    """A parameter's name with PEFT's wrapping and the adapter name taken out, the same in both models."""
    name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
    return name.replace(f".{adapter}.", ".<adapter>.")


def _trainable(model, adapter):
    # PEFT's bias="all" also unfreezes the bias of a modules_to_save module's original, which never runs.
    return {_canonical(n, adapter): p for n, p in model.named_parameters()
            if p.requires_grad and ".original_module." not in n}


def _pair(tiny, case):
    """Our model with adapter 'a' and PEFT's with 'default', the same random values in every trainable tensor."""
    kind, kw = CASES[case]
    ours, theirs = tiny(kind), tiny(kind)
    pe.add_adapter(ours, "a", pe.LoraConfig(**kw))
    theirs = peft.get_peft_model(theirs, _peft_config(kw))
    mine, peft_params = _trainable(ours, "a"), _trainable(theirs, "default")
    assert mine.keys() == peft_params.keys()
    with torch.no_grad():
        for name, p in mine.items():
            gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            peft_params[name].copy_(p)
    return ours, theirs


@pytest.mark.parametrize("case", CASES)
def test_outputs_and_gradients(tiny, ids, case, output):
    ours, theirs = _pair(tiny, case)
    ours.train(), theirs.train()                                                     # dropout 0: deterministic
    y, y_peft = output(ours, ids), output(theirs, ids)
    torch.testing.assert_close(y, y_peft)
    (y.square().sum()).backward()
    (y_peft.square().sum()).backward()
    peft_params = _trainable(theirs, "default")
    for name, p in _trainable(ours, "a").items():
        torch.testing.assert_close(p.grad, peft_params[name].grad, msg=name)


@pytest.mark.parametrize("case", ["llama", "gpt2_bias_all"])
def test_merge_unload_and_disable(tiny, ids, case, output):
    ours, theirs = _pair(tiny, case)
    base = tiny(CASES[case][0])
    with pe.disable_adapters(ours), theirs.disable_adapter():
        torch.testing.assert_close(output(ours, ids), output(theirs, ids))
        if CASES[case][1].get("bias", "none") == "none":   # trained biases stay in the base model, as in PEFT
            torch.testing.assert_close(output(ours, ids), output(base, ids))
    pe.merge_adapter(ours, "a")
    theirs.merge_adapter()
    torch.testing.assert_close(output(ours, ids), output(theirs, ids))
    pe.unmerge_adapter(ours, "a")
    theirs.unmerge_adapter()
    merged = pe.unload(ours, merge=True).state_dict()
    merged_peft = theirs.merge_and_unload().state_dict()
    assert merged.keys() == merged_peft.keys()
    for key in merged:
        torch.testing.assert_close(merged[key], merged_peft[key], msg=key)


@pytest.mark.parametrize("kind,kw", [
    ("llama", dict(target_modules=r".*layers\.1\.self_attn\.[qk]_proj")),
    ("llama", dict(target_modules="all-linear")),
    ("gpt2", dict(target_modules="all-linear")),
    ("bert_cls", dict(target_modules="all-linear", modules_to_save=["classifier"])),
    ("llama", dict(target_modules=["q_proj", "up_proj"], layers_to_transform=0)),
    ("gpt2", dict()),
    ("bert", dict(layers_to_transform=[1])),
    ("llama", dict(target_modules="all-linear", exclude_modules=["down_proj", "layers.1.self_attn.k_proj"])),
    ("gpt2", dict(target_modules="all-linear", exclude_modules=r".*\.h\.0\..*")),
    ("bert", dict(target_modules=["query", "key", "value"], exclude_modules=["key"])),
    ("gpt2", dict(target_modules=["c_attn"], layers_to_transform=[1], layers_pattern="h")),
    ("custom", dict(target_modules=["proj"], layers_to_transform=[1])),                    # stages.N first
    ("custom", dict(target_modules=["proj"], layers_to_transform=[1], layers_pattern="blocks")),
    ("custom", dict(target_modules=["proj"], layers_to_transform=0, layers_pattern=["nope", "stages"])),
])
def test_same_modules_targeted(tiny, kind, kw):
    build = _custom if kind == "custom" else lambda: tiny(kind)
    ours = build()
    pe.add_adapter(ours, "a", pe.LoraConfig(**kw))
    theirs = peft.get_peft_model(build(), _peft_config(kw))
    peft_layers = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert {n for n, _ in inject.lora_layers(ours)} == peft_layers


def _custom():
    """A plain PyTorch model whose block list is not a transformers one: stages.S.blocks.B.proj."""
    block = lambda: torch.nn.ModuleDict({"proj": torch.nn.Linear(8, 8)})
    stage = lambda: torch.nn.ModuleDict({"blocks": torch.nn.ModuleList([block() for _ in range(3)])})
    return torch.nn.ModuleDict({"stages": torch.nn.ModuleList([stage() for _ in range(2)])})


@pytest.mark.parametrize("case", CASES)
def test_our_files_load_in_peft(tiny, ids, tmp_path, case, output):
    ours, _ = _pair(tiny, case)
    pe.save_adapter(ours, "a", tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny(CASES[case][0]), tmp_path)
    torch.testing.assert_close(output(theirs, ids), output(ours, ids))


# PEFT writes adapter_config.json with sorted keys, its patterns' keys too: a file of its own keeps their meaning
# only where the sorted order picks the same key (PEFT 0.21 cannot load llama_patterns' file itself).
@pytest.mark.parametrize("case", [*(c for c in CASES if c != "llama_patterns"), "bert_bias_all_saved_classifier",
                                  "llama_all_linear", "llama_sorted_patterns"])
def test_peft_files_load_here(tiny, ids, tmp_path, case, output):
    extra = {"bert_bias_all_saved_classifier": ("bert_cls", dict(target_modules=["query"], bias="all",
                                                                 modules_to_save=["classifier"])),
             "llama_all_linear": ("llama", dict(r=2, target_modules="all-linear")),
             "llama_sorted_patterns": ("llama", dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                     rank_pattern={r"model\.layers\.1\.self_attn\.q_proj": 2,
                                                                   "v_proj": 8, r"z?\w*_proj": 3},
                                                     alpha_pattern={"down_proj": 6}))}
    kind, kw = extra[case] if case in extra else CASES[case]
    theirs = peft.get_peft_model(tiny(kind), _peft_config(kw))
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    theirs.save_pretrained(tmp_path)
    ours = tiny(kind)
    pe.load_adapter(ours, tmp_path, name="sst2")
    torch.testing.assert_close(output(ours, ids), output(theirs.eval(), ids))


def test_training_curve(tiny):
    """20 AdamW steps on the same data from the same start: the loss curves agree."""
    ours, theirs = _pair(tiny, "llama")
    batches = torch.randint(0, 128, (2, 4, 12), generator=torch.Generator().manual_seed(2)).repeat(10, 1, 1)
    curves = []
    for model, params in ((ours, _trainable(ours, "a")), (theirs, _trainable(theirs, "default"))):
        model.train()
        optimizer = torch.optim.AdamW(params.values(), lr=1e-2)
        losses = []
        for batch in batches:
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        curves.append(losses)
    assert curves[0][-1] < curves[0][0] - 0.05                                       # it does learn
    torch.testing.assert_close(torch.tensor(curves[0]), torch.tensor(curves[1]), rtol=1e-4, atol=1e-5)


def test_bf16_model(tiny, ids, output):
    """On a bf16 model both keep float32 LoRA weights and return bf16; PEFT runs the LoRA branch in fp32, we
    in bf16 (see layers.lora.compute_dtype), so they agree to bf16 precision."""
    ours, theirs = _pair(tiny, "llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, theirs = ours.to(torch.bfloat16), theirs.to(torch.bfloat16)
    for model in (ours, theirs):   # .to() cast everything: put float32 LoRA weights back, as a fresh adapter has
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()
    y, y_peft = output(ours, ids), output(theirs, ids)
    assert y.dtype == y_peft.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_peft.float(), rtol=2e-2, atol=2e-2)


@needs_triton
@pytest.mark.parametrize("case", ["llama", "gpt2_bias_all"])
def test_triton_kernels_match_peft(tiny, ids, monkeypatch, case, output):
    ours, theirs = _pair(tiny, case)
    monkeypatch.setenv("PTLM_BACKEND", "triton")
    y, y_peft = output(ours, ids), output(theirs, ids)
    torch.testing.assert_close(y, y_peft, rtol=1e-4, atol=1e-4)
    y.square().sum().backward()
    y_peft.square().sum().backward()
    peft_params = _trainable(theirs, "default")
    for name, p in _trainable(ours, "a").items():
        torch.testing.assert_close(p.grad, peft_params[name].grad, rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_realistic_bf16_llama_on_gpu_matches_peft_within_its_own_error(monkeypatch):
    """A Llama at realistic width on the GPU, bf16, LoRA r=16 on all 7 projections, fused Triton kernels: our
    logits and LoRA gradients are within 2x of PEFT's own bf16 error, both measured against PEFT in fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM
    monkeypatch.setenv("PTLM_BACKEND", "triton")
    config = LlamaConfig(hidden_size=1024, num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=4,
                         intermediate_size=2816, vocab_size=1000, max_position_embeddings=512)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).cuda().eval()
    ours = LlamaForCausalLM(config).cuda().eval()
    ours.load_state_dict(base.state_dict())
    pe.add_adapter(ours, "a", pe.LoraConfig(r=16, alpha=32, target_modules=targets))
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    mine, peft_params = _trainable(ours, "a"), _trainable(theirs, "default")
    with torch.no_grad():
        for name, p in mine.items():
            p.copy_(0.02 * torch.randn_like(p))
            peft_params[name].copy_(p)
    ids = torch.randint(0, 1000, (2, 256), device="cuda")

    def run(model, dtype):
        model.to(dtype)
        for p in model.parameters():
            p.grad = None
        logits = model(input_ids=ids).logits.float()
        logits.square().mean().backward()
        grads = {n: p.grad.float() for n, p in _trainable(model, "a" if model is ours else "default").items()}
        return logits.detach(), grads

    ref_logits, ref_grads = run(theirs, torch.float32)
    peft_logits, peft_grads = run(theirs, torch.bfloat16)
    our_logits, our_grads = run(ours, torch.bfloat16)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    assert torch.isfinite(our_logits).all()
    assert rel(our_logits, ref_logits) <= 2 * rel(peft_logits, ref_logits) + 1e-3
    for name, g in our_grads.items():
        assert rel(g, ref_grads[name]) <= 2 * rel(peft_grads[name], ref_grads[name]) + 1e-3, name
