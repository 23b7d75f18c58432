"""Numerics, precision and model transforms of adapted models, end to end, against HF PEFT 0.21 and float64 ground
truth (tiny models built from transformers configs; nothing downloaded): half-precision bases and loss scaling,
NaN isolation in mixed batches, merging, dtype and device moves, pickling, state dicts, torch.compile, torch.export,
torch.func, gradient checkpointing."""
from __future__ import annotations

import copy
import io
import pickle
import re
import warnings
import zlib

import peft
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import ptlm_engine as pe
from tests.helpers import LogitsOf, needs_triton

pytestmark = [pytest.mark.usefixtures("reference_backend"),
              pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

VOCAB = 64
METHODS = {
    "lora": lambda: pe.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
    "bottleneck": lambda: pe.BottleneckConfig(bottleneck=8),
    "prefix": lambda: pe.PrefixConfig(num_virtual_tokens=4),
    "prompt": lambda: pe.PromptConfig(num_virtual_tokens=4),
}
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=3e-3, atol=3e-3),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


# ------------------------------------------------------------------------------------------------ pieces
def _llama(dtype=None, hidden=32, layers=1) -> LlamaForCausalLM:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LlamaForCausalLM(LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                                             num_key_value_heads=2, intermediate_size=2 * hidden,
                                             vocab_size=VOCAB))
    return (model if dtype is None else model.to(dtype)).eval()


def _ids(rows=2, length=8, seed=1):
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def _randomize(model, seed=0, scale=0.3):
    """Random values (drawn in float64) in every trainable tensor."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=torch.float64))


def _adapted(method, dtype=None, names=("a",), layers=1):
    """A tiny Llama with one adapter of `method` per name, each random (its own seed); `names[0]` active."""
    model = _llama(dtype, layers=layers)
    for i, name in enumerate(names):
        pe.add_adapter(model, name, METHODS[method]())
        pe.set_active_adapter(model, name)
        _randomize(model, seed=i)
    pe.set_active_adapter(model, names[0])
    return model


def _canonical(name: str, adapter: str) -> str:
    name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
    return name.replace(f".{adapter}.", ".<adapter>.")


def _pair(kw, dtype=None, build=_llama):
    """Our model with LoRA adapter 'a' and PEFT's with 'default' on the same base, the same values (drawn in float64
    per parameter name) in every trainable tensor; returns both models and their trainable tensors by name."""
    ours, theirs = build(dtype), build(dtype)
    pe.add_adapter(ours, "a", pe.LoraConfig(**kw))
    names = {"alpha": "lora_alpha", "dropout": "lora_dropout"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(theirs, peft.LoraConfig(**{names.get(k, k): v for k, v in kw.items()}))
    mine = {_canonical(n, "a"): p for n, p in ours.named_parameters() if p.requires_grad}
    peft_params = {_canonical(n, "default"): p for n, p in theirs.named_parameters()
                   if p.requires_grad and ".original_module." not in n}
    assert mine.keys() == peft_params.keys()
    with torch.no_grad():
        for name, p in mine.items():
            gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            value = 0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.copy_(value)
            peft_params[name].copy_(value)
    return ours, theirs, mine, peft_params


def _rel(out, ref) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _loss_and_grads(model, params, ids, scale=1.0):
    for p in params.values():
        p.grad = None
    out = model(input_ids=ids, labels=ids)
    (out.loss * scale).backward()
    return out.logits.detach(), {n: p.grad for n, p in params.items()}


# ---------------------------------------------------------------------------------- dtypes of the adapters
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_base_keeps_float32_lora_weights_and_model_to_casts_them_as_peft(dtype):
    """On a half-precision base a new LoRA adapter is float32, as PEFT's autocast_adapter_dtype=True default; a
    later model.to(dtype) / .half() / .float() casts them with the model, as it does PEFT's; the model returns the
    base dtype each time."""
    ours, theirs, mine, peft_params = _pair(dict(r=4, target_modules=["q_proj", "v_proj"]), dtype)
    assert {p.dtype for p in mine.values()} == {p.dtype for p in peft_params.values()} == {torch.float32}
    ids = _ids()
    for convert, expected in [(lambda m: m.to(dtype), dtype), (lambda m: m.half(), torch.float16),
                              (lambda m: m.float(), torch.float32)]:
        convert(ours), convert(theirs)
        assert {p.dtype for p in mine.values()} == {p.dtype for p in peft_params.values()} == {expected}
        with torch.no_grad():
            y, y_peft = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
        assert y.dtype == y_peft.dtype == expected
        torch.testing.assert_close(y, y_peft, **TOL[expected])


# ---------------------------------------------------------------------------------- errors against float64
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kw", [dict(r=1, alpha=1, target_modules="all-linear"),
                                dict(r=256, alpha=16, use_rslora=True, target_modules=["q_proj", "down_proj"]),
                                dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
                                     rank_pattern={"o_proj": 2}, alpha_pattern={r"layers\.0\.self_attn\.q_proj": 3})])
def test_half_precision_logits_and_grads_within_peft_error(dtype, kw):
    """fp16 / bf16 models, r=1, r=256 with rsLoRA, and rank / alpha patterns: the logits and every LoRA gradient
    (a causal-LM loss) are within 2x of PEFT's own error, both against PEFT run in float64 on the same weights."""
    ids = _ids()
    _, theirs64, _, params64 = _pair(kw, torch.float64)
    ref_logits, ref_grads = _loss_and_grads(theirs64, params64, ids)
    ours, theirs, mine, peft_params = _pair(kw, dtype)
    logits, grads = _loss_and_grads(ours, mine, ids)
    peft_logits, peft_grads = _loss_and_grads(theirs, peft_params, ids)
    assert logits.dtype == dtype
    assert _rel(logits, ref_logits) <= 2 * _rel(peft_logits, ref_logits) + 1e-4
    for name in mine:
        assert grads[name].dtype == torch.float32, name
        assert _rel(grads[name], ref_grads[name]) <= 2 * _rel(peft_grads[name], ref_grads[name]) + 1e-4, name


def test_cpu_autocast_bf16_training_matches_peft():
    """A float32 model trained under torch.autocast('cpu', bfloat16): bf16 logits, float32 LoRA gradients, each
    within 2x of PEFT's own autocast error against PEFT in float64."""
    kw = dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    ids = _ids()
    _, theirs64, _, params64 = _pair(kw, torch.float64)
    ref_logits, ref_grads = _loss_and_grads(theirs64, params64, ids)
    ours, theirs, mine, peft_params = _pair(kw)
    results = []
    for model, params in ((ours, mine), (theirs, peft_params)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(_loss_and_grads(model, params, ids))
    (logits, grads), (peft_logits, peft_grads) = results
    assert logits.dtype == peft_logits.dtype == torch.bfloat16
    assert _rel(logits, ref_logits) <= 2 * _rel(peft_logits, ref_logits) + 1e-4
    for name in mine:
        assert grads[name].dtype == torch.float32
        assert _rel(grads[name], ref_grads[name]) <= 2 * _rel(peft_grads[name], ref_grads[name]) + 1e-3, name


class _Net(torch.nn.Module):
    """One projection with LoRA and a head: the projection's input is what the caller gives."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(64, 64)
        self.head = torch.nn.Linear(64, 8)

    def forward(self, x):
        return self.head(self.proj(x))


def _net_with_lora(kind, dtype):
    model = _Net().to(dtype)
    if kind == "ours":
        pe.add_adapter(model, "a", pe.LoraConfig(r=4, alpha=8, target_modules=["proj"]))
        pe.add_adapter(model, "b", pe.LoraConfig(r=4, alpha=8, target_modules=["proj"]))
        lora_A, lora_B = model.proj.lora_A.a.weight, model.proj.lora_B.a.weight
    else:
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
        lora_A = model.base_model.model.proj.lora_A.default.weight
        lora_B = model.base_model.model.proj.lora_B.default.weight
    with torch.no_grad():
        lora_A.copy_(0.1 * torch.randn(4, 64, generator=torch.Generator().manual_seed(0)))
        lora_B.copy_(0.1 * torch.randn(64, 4, generator=torch.Generator().manual_seed(1)))
    return model, lora_A, lora_B


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("mixed", [False, True])
def test_fp16_loss_scaled_as_gradscaler_gives_finite_float32_lora_grads_like_peft(monkeypatch, backend, mixed):
    """fp16 base, float32 LoRA weights, the loss times 65536 (torch.amp.GradScaler's initial scale): PEFT computes
    the LoRA branch and so its weight gradients in float32, and dA here is ~1e6, beyond fp16's 65504. The float32
    LoRA gradients are finite and within 2x of PEFT's error against float64, one adapter active or in a mixed
    batch; an inf there makes GradScaler skip the step and halve its scale where PEFT would not."""
    monkeypatch.setenv("PTLM_BACKEND", backend)
    x = 30 * torch.randn(32, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = {}
    for kind, dtype in (("ours", torch.float16), ("peft", torch.float16), ("peft", torch.float64)):
        model, lora_A, lora_B = _net_with_lora(kind, dtype)
        with pe.adapter_batch(model, ["a"] * 32) if kind == "ours" and mixed else _nothing():
            y = model(x.to(dtype))
            (y.float().square().mean() * 65536).backward()
        grads[kind, dtype] = (lora_A.grad, lora_B.grad)
    for i, what in enumerate(["lora_A", "lora_B"]):
        ours, theirs = grads["ours", torch.float16][i], grads["peft", torch.float16][i]
        ref = grads["peft", torch.float64][i]
        assert ours.dtype == torch.float32 and torch.isfinite(theirs).all()
        assert torch.isfinite(ours).all(), f"{what}: non-finite gradient where PEFT's is finite"
        assert _rel(ours, ref) <= 2 * _rel(theirs, ref) + 1e-4, what


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_fp16_inputs_of_1e4_stay_finite_where_peft_does():
    """fp16 inputs of magnitude 1e4 into a LoRA layer: the output is finite where PEFT's is and agrees with it to
    fp16 rounding (the r-wide intermediate stays float32, as PEFT's float32 branch)."""
    ours, _, _ = _net_with_lora("ours", torch.float16)
    theirs, _, _ = _net_with_lora("peft", torch.float16)
    x = (1e4 * torch.randn(4, 64, generator=torch.Generator().manual_seed(3))).half()
    with torch.no_grad():
        y, y_peft = ours(x), theirs(x)
    assert torch.isfinite(y_peft).all() and torch.isfinite(y).all()
    assert _rel(y, y_peft) < 2e-3


# ------------------------------------------------------------------------------------------ merge / unmerge
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kw", [dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
                                dict(r=8, alpha=4, use_rslora=True, target_modules="all-linear")])
def test_merge_and_unmerge_in_half_precision_match_peft(dtype, kw):
    """merge_adapter writes PEFT's merged weights bit for bit (W0 + s·BA summed in float32, rounded once); the
    merged logits are as close to the unmerged ones as PEFT's; unmerge_adapter restores every base weight within
    one rounding of the merged weight (PEFT's own bar), no further from the original overall than PEFT's."""
    ours, theirs, _, _ = _pair(kw, dtype)
    ids = _ids()
    base = {k: v.clone() for k, v in ours.state_dict().items() if "lora_" not in k}
    with torch.no_grad():
        y, y_peft = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    pe.merge_adapter(ours, "a")
    theirs.merge_adapter()
    peft_state = {_canonical(k, "default"): v for k, v in theirs.state_dict().items() if "lora_" not in k}
    for key, value in ours.state_dict().items():
        if "lora_" not in key:
            assert value.dtype == dtype and torch.equal(value, peft_state[key]), key
    with torch.no_grad():
        merged, merged_peft = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    assert _rel(merged, y) <= 2 * _rel(merged_peft, y_peft) + 1e-5
    pe.unmerge_adapter(ours, "a")
    theirs.unmerge_adapter()
    peft_state = {_canonical(k, "default"): v for k, v in theirs.state_dict().items() if "lora_" not in k}
    eps = torch.finfo(dtype).eps
    for key, value in ours.state_dict().items():
        if "lora_" in key:
            continue
        ours_off = (value.double() - base[key].double()).abs()
        peft_off = (peft_state[key].double() - base[key].double()).abs()
        assert ours_off.norm() <= 2 * peft_off.norm() + 1e-12, key
        assert (ours_off <= 2 * eps * base[key].double().abs().clamp_min(0.1)).all(), key


def test_merge_with_modules_to_save_then_save_and_reload():
    """A LoRA adapter with modules_to_save on an fp16 model: merged, it computes what it did unmerged (fp16
    rounding); saved while merged, its file loads into a fresh fp16 model to the unmerged outputs, and into PEFT."""
    kw = dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    ours, theirs, _, _ = _pair(kw, torch.float16)
    ids = _ids()
    with torch.no_grad():
        y = ours(input_ids=ids).logits
        pe.merge_adapter(ours, "a")
        torch.testing.assert_close(ours(input_ids=ids).logits, y, **TOL[torch.float16])
    buf = _tmpdir()
    pe.save_adapter(ours, "a", buf)
    fresh = _llama(torch.float16)
    pe.load_adapter(fresh, buf, name="a")
    loaded_peft = peft.PeftModel.from_pretrained(_llama(torch.float16), buf).eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, y)
        torch.testing.assert_close(loaded_peft(input_ids=ids).logits, theirs(input_ids=ids).logits,
                                   **TOL[torch.float16])


def _tmpdir():
    import tempfile
    return tempfile.mkdtemp(prefix="ptlm_review_")


# ------------------------------------------------------------------------------------------ mixed batches
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nan_in_one_row_stays_in_that_row(method, dtype):
    """A NaN in row 0's input embeddings in a mixed batch: row 1 (another adapter) is finite and equals row 1 run
    alone, serving; training, the other adapter's gradients (from its rows only) stay finite."""
    model = _adapted(method, dtype, names=("a", "b"))
    ids = _ids()
    embeds = model.get_input_embeddings()(ids).detach().clone()
    embeds[0, 3] = float("nan")
    with torch.no_grad():
        with pe.adapter_batch(model, ["a", "b"]):
            y = model(inputs_embeds=embeds).logits
        pe.set_active_adapter(model, "b")
        alone = model(inputs_embeds=embeds[1:]).logits
    assert torch.isfinite(y[1]).all()
    torch.testing.assert_close(y[1:], alone, **TOL[dtype])
    model.train()
    with pe.adapter_batch(model, ["a", "b"]):
        model(inputs_embeds=embeds).logits[1].float().sum().backward()
    b_grads = {n: p.grad for n, p in model.named_parameters() if re.search(r"\.b(\.|$)", n) and p.grad is not None}
    assert b_grads and all(torch.isfinite(g).all() for g in b_grads.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_inf_adapter_weights_stay_in_their_rows(dtype):
    """Adapter 'b' with an inf weight: rows of adapter 'a' and of the base model stay finite in a mixed batch and
    equal those rows run alone."""
    model = _adapted("lora", dtype, names=("a", "b"))
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_B.b.weight.fill_(float("inf"))
    ids = torch.cat([_ids(), _ids(1, seed=5)])
    with torch.no_grad():
        with pe.adapter_batch(model, ["a", "b", None]):
            y = model(input_ids=ids).logits
        for row, name in ((0, "a"), (2, None)):
            pe.set_active_adapter(model, name)
            assert torch.isfinite(y[row]).all()
            torch.testing.assert_close(y[row:row + 1], model(input_ids=ids[row:row + 1]).logits, **TOL[dtype])


def test_adapters_of_different_dtypes_in_one_mixed_batch():
    """An adapter added before model.half() (now fp16) and one added after (float32, as on any half base) serve
    in one mixed batch: each row equals that row run alone."""
    model = _llama()
    pe.add_adapter(model, "a", METHODS["lora"]())
    _randomize(model)
    model.half()
    pe.add_adapter(model, "b", pe.LoraConfig(r=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    pe.set_active_adapter(model, "b")
    _randomize(model, seed=1)
    assert model.model.layers[0].self_attn.q_proj.lora_A.a.weight.dtype == torch.float16
    assert model.model.layers[0].self_attn.q_proj.lora_A.b.weight.dtype == torch.float32
    ids = torch.cat([_ids(), _ids(1, seed=5)])
    with torch.no_grad():
        with pe.adapter_batch(model, ["a", "b", None]):
            y = model(input_ids=ids).logits
        for row, name in enumerate(["a", "b", None]):
            pe.set_active_adapter(model, name)
            torch.testing.assert_close(y[row:row + 1], model(input_ids=ids[row:row + 1]).logits,
                                       **TOL[torch.float16])


# ------------------------------------------------------------------------------------------ model transforms
@pytest.mark.parametrize("method", list(METHODS))
def test_model_transforms_keep_the_adapted_function(method):
    """After adapters exist: torch.func.functional_call (same outputs; substituted adapter values are used, also
    under no_grad on an fp16 base, where layers serve from a cached copy), state_dict / load_state_dict(strict)
    into a fresh adapted model, pickle / torch.save of the whole model, copy.deepcopy, .to('meta') + to_empty +
    load_state_dict, and requires_grad_(False) followed by set_active_adapter."""
    model = _adapted(method)
    ids = _ids()
    with torch.no_grad():
        y = model(input_ids=ids).logits
        params = dict(model.named_parameters())
        torch.testing.assert_close(torch.func.functional_call(model, params, (), {"input_ids": ids}).logits, y)
    fresh = _llama()
    pe.add_adapter(fresh, "a", METHODS[method]())
    fresh.load_state_dict(model.state_dict(), strict=True)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    copies = [fresh, pickle.loads(pickle.dumps(model)), torch.load(buf, weights_only=False), copy.deepcopy(model)]
    empty = copy.deepcopy(model).to("meta").to_empty(device="cpu")
    empty.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        empty.model.rotary_emb.inv_freq.copy_(model.model.rotary_emb.inv_freq)   # a non-persistent buffer
    for other in copies + [empty]:
        with torch.no_grad():
            torch.testing.assert_close(other(input_ids=ids).logits, y)

    half = _adapted(method, torch.float16)
    trainable = [n for n, p in half.named_parameters() if p.requires_grad]
    with torch.no_grad():
        y_half = half(input_ids=ids).logits
        doubled = {n: 2 * p for n, p in half.named_parameters() if n in trainable}
        y_sub = torch.func.functional_call(half, doubled, (), {"input_ids": ids}, strict=False).logits
        for n, p in half.named_parameters():
            if n in trainable:
                p.mul_(2)
        torch.testing.assert_close(y_sub, half(input_ids=ids).logits)
        for n, p in half.named_parameters():
            if n in trainable:
                p.div_(2)
        torch.testing.assert_close(half(input_ids=ids).logits, y_half)

    pe.add_adapter(model, "b", METHODS[method]())
    model.requires_grad_(False)
    pe.set_active_adapter(model, "b")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert any(flags.values()) and all(re.search(r"\.b(\.|$)", n) for n, f in flags.items() if f)


@pytest.mark.parametrize("method", list(METHODS))
def test_dtype_round_trips_after_adapters_exist(method):
    """model.half(), .to(bfloat16) and .float() after an adapter exists: each returns its dtype's logits within
    that dtype's rounding of the float32 model's."""
    model = _adapted(method)
    ids = _ids()
    with torch.no_grad():
        y = model(input_ids=ids).logits
        for convert, dtype, tol in ((lambda m: m.half(), torch.float16, 2e-2), (lambda m: m.to(torch.bfloat16),
                                                                               torch.bfloat16, 1e-1),
                                    (lambda m: m.float(), torch.float32, 1e-1)):
            convert(model)
            out = model(input_ids=ids).logits
            assert out.dtype == dtype
            torch.testing.assert_close(out.float(), y, rtol=tol, atol=tol)


@pytest.mark.parametrize("method", ["lora", "prefix", "bottleneck"])
def test_compile_fullgraph_each_method_and_switching(method):
    """torch.compile(fullgraph=True) of a model with each method gives eager's logits and gradients (aot_eager:
    the custom ops' autograd through AOTAutograd); switching the active adapter, and disable_adapters, under the
    compiled model gives eager's outputs each time (the graph is guarded on the switch, not stale)."""
    torch._dynamo.reset()
    model = _adapted(method, names=("a", "b"), layers=1)
    ids = _ids()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    y = model(input_ids=ids).logits
    y_compiled = compiled(input_ids=ids).logits
    torch.testing.assert_close(y_compiled, y)
    y_compiled.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    y.square().sum().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[n], p.grad, msg=n)
    with torch.no_grad():
        for name in ["b", "a"]:
            pe.set_active_adapter(model, name)
            torch.testing.assert_close(compiled(input_ids=ids).logits, model(input_ids=ids).logits, msg=str(name))
        with pe.disable_adapters(model):
            torch.testing.assert_close(compiled(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_compiled_mixed_batches_follow_each_mapping(method):
    """One compiled model (backend='eager') serves successive adapter_batch blocks with different mappings: each
    row equals that row run alone (the compiled graph is not stuck with the first block's mapping)."""
    torch._dynamo.reset()
    model = _adapted(method, names=("a", "b"), layers=1)
    compiled = torch.compile(model, backend="eager")
    ids = torch.cat([_ids(), _ids(1, seed=5)])
    for mapping in (["a", "b", None], ["b", None, "a"]):
        with torch.no_grad(), pe.adapter_batch(model, mapping):
            y = compiled(input_ids=ids).logits
        with torch.no_grad():
            for row, name in enumerate(mapping):
                pe.set_active_adapter(model, name)
                torch.testing.assert_close(y[row:row + 1], model(input_ids=ids[row:row + 1]).logits,
                                           msg=f"{mapping} row {row}")
        pe.set_active_adapter(model, "a")


def test_torch_export_of_a_half_model_with_float32_adapters():
    """torch.export of an fp16 model with a float32 LoRA adapter runs and matches eager to fp16 rounding."""
    model = _adapted("lora", torch.float16)
    ids = _ids()
    with torch.no_grad():
        y = model(input_ids=ids, use_cache=False).logits
    exported = torch.export.export(LogitsOf(model), (ids,))
    torch.testing.assert_close(exported.module()(ids), y, **TOL[torch.float16])


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gradient_checkpointing_matches_peft(reentrant, dtype):
    """transformers' gradient checkpointing (both use_reentrant values; enable_input_require_grads for the
    reentrant one, as PEFT's prepare recipe): loss and LoRA gradients equal PEFT's under the same checkpointing."""
    ours, theirs, mine, peft_params = _pair(dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
                                            dtype)
    ids = _ids()
    results = []
    for model, params in ((ours, mine), (theirs, peft_params)):
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        if reentrant:
            model.enable_input_require_grads()
        results.append(_loss_and_grads(model, params, ids))
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    for name in mine:
        assert results[0][1][name] is not None, name
        torch.testing.assert_close(results[0][1][name], results[1][1][name], **tol, msg=name)


def test_train_eval_switch_turns_lora_dropout_on_and_off():
    """LoRA dropout runs in train mode only: eval outputs are deterministic and equal dropout-free ones; train
    outputs differ draw to draw, and their mean over many draws approaches the eval output (inverted dropout's
    1/(1-p) scaling, as PEFT's nn.Dropout)."""
    model = _llama()
    pe.add_adapter(model, "a", pe.LoraConfig(r=8, alpha=64, dropout=0.5, target_modules=["q_proj"]))
    _randomize(model, scale=0.5)
    x = model.model.layers[0].self_attn.q_proj
    inp = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.eval()
        y_eval = x(inp)
        torch.testing.assert_close(x(inp), y_eval)
        model.train()
        torch.manual_seed(0)
        draws = torch.stack([x(inp) for _ in range(100)])
        model.eval()
        torch.testing.assert_close(x(inp), y_eval)
    assert not torch.equal(draws[0], draws[1])
    delta = (y_eval - x.original_module(inp)).abs().mean()
    assert (draws.mean(0) - y_eval).abs().mean() < 0.1 * delta


# ------------------------------------------------------------------------------------- Triton (interpreted)
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_kernels_on_a_model_within_peft_error(monkeypatch, dtype):
    """The Triton kernels (interpreted on the CPU) on a whole model, fp32 and fp16, LoRA r=16: logits and LoRA
    gradients within 2x of PEFT's own error against PEFT in float64."""
    kw = dict(r=16, alpha=32, target_modules=["q_proj", "v_proj", "down_proj"])
    ids = _ids()
    _, theirs64, _, params64 = _pair(kw, torch.float64)
    ref_logits, ref_grads = _loss_and_grads(theirs64, params64, ids)
    ours, theirs, mine, peft_params = _pair(kw, dtype)
    peft_logits, peft_grads = _loss_and_grads(theirs, peft_params, ids)
    monkeypatch.setenv("PTLM_BACKEND", "triton")
    logits, grads = _loss_and_grads(ours, mine, ids)
    floor = 1e-6 if dtype == torch.float32 else 1e-4
    assert _rel(logits, ref_logits) <= 2 * _rel(peft_logits, ref_logits) + floor
    for name in mine:
        assert _rel(grads[name], ref_grads[name]) <= 2 * _rel(peft_grads[name], ref_grads[name]) + floor, name


@needs_triton
@pytest.mark.parametrize("method", ["lora", "bottleneck"])
def test_torch_func_grad_over_the_triton_kernels_is_refused_by_name(monkeypatch, method):
    """torch.func.grad over torch.func.functional_call cannot run the Triton ops: torch wraps a custom op's
    autograd in a Function without setup_context, which torch.func refuses, as it refuses the eager Functions.
    The ops say so, and what to use instead, before any kernel runs (the reference backend transforms: below)."""
    monkeypatch.setenv("PTLM_BACKEND", "triton")
    model = _adapted(method)
    ids = _ids()
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def loss(values):
        return torch.func.functional_call(model, values, (), {"input_ids": ids, "labels": ids}, strict=False).loss
    with pytest.raises(RuntimeError, match="torch.func transforms .* cannot differentiate ptlm's Triton kernels"):
        torch.func.grad(loss)(params)


@pytest.mark.parametrize("method", ["lora", "bottleneck"])
def test_torch_func_grad_and_vmap_reference_backend(method):
    """torch.func.grad over functional_call, and vmap of it for per-sample gradients (Opacus-style DP training),
    give autograd's gradients on the reference backend."""
    model = _adapted(method)
    model.train()
    ids = _ids()
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def loss(values, row):
        return torch.func.functional_call(model, values, (), {"input_ids": row[None], "labels": row[None]},
                                          strict=False).loss
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, ids)
    for i in range(ids.shape[0]):
        model.zero_grad(set_to_none=True)
        model(input_ids=ids[i:i + 1], labels=ids[i:i + 1]).loss.backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(per_sample[n][i], p.grad, rtol=1e-4, atol=1e-6, msg=n)
