"""The documentation, read literally by a new user: README.md, bench/README.md and the public docstrings.

Every Python block of README.md runs as written (extracted from the file, so it stays in sync), the README's CPU
shell commands run as subprocesses, and the claims that are cheap to check on a CPU are checked.
"""
from __future__ import annotations

import ast
import json
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import ptlm_engine as pe
from ptlm_engine import cli, demo, functional

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
BENCH_README = (REPO / "bench" / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
SUBPROCESS_TIMEOUT = 240

# Blocks that cannot run on a CPU, by an explicit rule: name -> predicate on the block's source.
CPU_SKIP_RULES = {
    "CUDA only: the block moves the model to the GPU (model.cuda()) to capture a CUDA graph":
        lambda src: ".cuda()" in src,
}


def _skip_reason(src: str) -> str | None:
    if torch.cuda.is_available():
        return None
    return next((name for name, rule in CPU_SKIP_RULES.items() if rule(src)), None)


@pytest.fixture(autouse=True)
def reference_backend(monkeypatch):
    monkeypatch.setenv("PTLM_BACKEND", "reference")


def _env():
    return {**os.environ, "PTLM_BACKEND": "reference", "PYTHONWARNINGS": "ignore"}


# --------------------------------------------------------------------- the README's shell commands, started at once
# Each subprocess pays ~10 s of imports; they start before the first test (an autouse fixture) and run beside the
# in-process tests; the tests that read their results come last in the file.
_PROCS: dict[str, tuple[subprocess.Popen, Path]] = {}


def _commands(root: Path) -> dict[str, tuple[list[str], Path]]:
    ptlm = shutil.which("ptlm") or "ptlm"
    return {
        "ptlm_demo": ([ptlm, "demo", "--steps", "2", "--out", str(root / "demo_out")], root),
        "python_m_default": ([sys.executable, "-m", "ptlm_engine"], root),
        "suite_smoke": ([sys.executable, "-m", "bench.gpu_suite", str(root / "suite"), "--smoke", "--phases", "lora",
                         "--warmup-ms", "0", "--rep-ms", "1"], REPO),
    }


@pytest.fixture(scope="module", autouse=True)
def shell(tmp_path_factory):
    root = tmp_path_factory.mktemp("shell")
    for key, (cmd, cwd) in _commands(root).items():
        try:
            proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
        except FileNotFoundError as e:
            proc = e
        _PROCS[key] = (proc, root)

    def result(key):
        proc, root = _PROCS[key]
        if isinstance(proc, Exception):
            pytest.fail(f"{key}: could not start {proc}")
        out, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
        _PROCS[key] = (subprocess.CompletedProcess(proc.args, proc.returncode, out, err), root) \
            if isinstance(proc, subprocess.Popen) else _PROCS[key]
        return _PROCS[key][0], root
    yield result
    for proc, _ in _PROCS.values():
        if isinstance(proc, subprocess.Popen) and proc.poll() is None:
            proc.kill()


def test_demo_exit_status_is_1_when_the_reloaded_model_differs(monkeypatch, capsys):
    """README: exit status 1 if the largest logit difference between adapted and reloaded is above 1e-4."""
    load = pe.load_adapter

    def corrupting_load(model, path, name="default", **kw):
        load(model, path, name=name, **kw)
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if "lora_B" in n).add_(1.0)
        return name
    monkeypatch.setattr(pe, "load_adapter", corrupting_load)
    assert demo.run(steps=1, device="cpu") == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_demo_options_and_defaults():
    """README: `--steps N` (40), `--out DIR`, `--device` (`cuda` when there is one); `ptlm bench` goes to the
    suite; the package's docstring of cli names `demo` (the default) and `bench`."""
    args = cli.parser().parse_args(["demo"])
    assert args.steps == 40 and args.out is None
    assert args.device == ("cuda" if torch.cuda.is_available() else "cpu")
    args = cli.parser().parse_args(["demo", "--steps", "3", "--out", "somewhere"])
    assert (args.steps, args.out) == (3, "somewhere")


def test_ptlm_bench_runs_the_suite_from_a_checkout(monkeypatch, tmp_path):
    """README: `ptlm bench ...` runs bench/gpu_suite.py from a checkout (arguments unchanged)."""
    monkeypatch.chdir(REPO)
    from bench import gpu_suite
    got = []
    monkeypatch.setattr(gpu_suite, "main", got.append)
    assert cli.main(["bench", str(tmp_path), "--smoke", "--phases", "lora"]) == 0
    assert got == [[str(tmp_path), "--smoke", "--phases", "lora"]]


def test_every_bench_script_has_smoke():
    """bench/README: "Each script also has `--smoke`: tiny shapes on the CPU" (the timing scripts; report.py
    regenerates files and sm90_usage.py only compiles)."""
    not_timing = {"__init__.py", "harness.py", "report.py", "sm90_usage.py"}
    missing = [p.name for p in sorted((REPO / "bench").glob("*.py"))
               if p.name not in not_timing and "smoke" not in p.read_text()]
    assert not missing


# ------------------------------------------------------------------------------------------ README Python blocks
def test_readme_python_blocks_are_the_ones_reviewed():
    assert len(PYTHON_BLOCKS) == 5
    assert "LlamaForCausalLM(LlamaConfig(" in PYTHON_BLOCKS[0]
    assert [_skip_reason(b) is not None for b in PYTHON_BLOCKS] == \
        [False, False, not torch.cuda.is_available(), False, False]


def _run_blocks(upto: int, where: Path) -> dict:
    """Blocks 0..upto in one namespace, as a user pasting them in order; CPU-skipped blocks are left out."""
    ns: dict = {"__name__": "__readme__"}
    cwd = os.getcwd()
    os.chdir(where)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i, src in enumerate(PYTHON_BLOCKS[:upto + 1]):
                if _skip_reason(src) is None:
                    torch.manual_seed(0)
                    exec(compile(src, f"README.md python block {i}", "exec"), ns)
    finally:
        os.chdir(cwd)
    return ns


@pytest.mark.parametrize("index", range(5), ids=["api", "fuse_base_ops", "capture_train_step", "other_methods",
                                                  "mixed_batches"])
def test_readme_python_block_runs(index, tmp_path):
    """Each README Python block runs as written (after the blocks before it), in a temp directory, on the CPU."""
    reason = _skip_reason(PYTHON_BLOCKS[index])
    if reason is not None:
        pytest.skip(f"README python block {index}: {reason}")
    ns = _run_blocks(index, tmp_path)
    if index == 0:
        assert sorted(os.listdir(tmp_path / "out" / "sst2")) == ["adapter_config.json", "adapter_model.safetensors"]
        assert pe.adapter_configs(ns["model"]) == {} and ns["base_logits"].shape == (2, 16, 64)
    if index == 1:
        promised = ast.literal_eval(re.search(r"pe\.fuse_base_ops\(model\)\s+#\s*(\{.*?\})", README).group(1))
        assert ns["counts"] == promised
    if index == 3:
        configs = pe.adapter_configs(ns["model"])
        assert set(configs) == {"houlsby", "prefix", "prompt", "both"}
        assert [type(c).__name__ for c in configs["both"]] == ["LoraConfig", "PrefixConfig"]
    if index == 4:
        assert ns["logits"].shape == (4, 16, 64)
        assert ns["out"].shape[0] == 4 and ns["out"].shape[1] <= 16 + 8


# ----------------------------------------------------------------------------------------------- helpers for claims
def _llama(vocab=64, **kw):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, intermediate_size=128, vocab_size=vocab,
                                            **kw)).eval()


def _gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()


def _randomize(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(k in n for k in ("lora_", "ptlm_", "prefix", "prompt")):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _ids(rows=2, length=8, vocab=64):
    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(2))


def _lora_paths(model):
    return sorted(n for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "r"))


def _ranks(model, adapter):
    return {n: m.r[adapter] for n, m in model.named_modules() if hasattr(m, "r") and isinstance(m.r, dict)
            and adapter in m.r}


# ------------------------------------------------------------------------------------------ README: API claims
def test_public_names_exist_and_have_docstrings():
    """ptlm_engine.__all__ is the public API; the brief's rule (and the project's habit: every other public call
    has one) is that each name has a docstring of its own, since README mentions only some of them.
    `pe.active_adapter` has none (and README does not name it either): help(pe.active_adapter) says nothing
    about returning None for a model without adapters, or the name in use otherwise."""
    undocumented = [n for n in pe.__all__ if not (getattr(pe, n).__doc__ or "").strip()
                    or getattr(pe, n).__doc__ is type(getattr(pe, n)).__doc__]
    assert not undocumented, f"public names without a docstring: {undocumented}"


def test_every_pe_name_the_readmes_use_is_public():
    used = set(re.findall(r"\bpe\.([A-Za-z_]\w*)", README + BENCH_README))
    used |= set(re.findall(r"ptlm_engine\.([a-z_]\w*)\b(?!\.)", BENCH_README)) - {"kernels", "functional"}
    assert used <= set(pe.__all__), used - set(pe.__all__)
    for op in re.findall(r"ptlm_engine\.functional\.(\w+)", README + BENCH_README):
        assert callable(getattr(functional, op)), op


def test_files_the_readme_names_exist():
    """Paths the READMEs point to (`.ci/run`, tables' files, results) exist in the checkout."""
    named = ["ptlm_engine/reference.py", "ptlm_engine/base_ops.py", "ptlm_engine/captured_step.py",
             "ptlm_engine/bottleneck_sites.py", "ptlm_engine/pool.py", "ptlm_engine/inject.py", "ptlm_engine/cli.py",
             "ptlm_engine/demo.py", "ptlm_engine/layers", "ptlm_engine/ops", "ptlm_engine/io", "kernels/tuned_configs",
             "kernels/prefix_attention.py", "bench/NOTES.md", "bench/results", ".ci/run", "tests/bench/test_smoke.py",
             "tests/kernels/sm90_compile.py"]
    named += [f"bench/results/{f}" for f in re.findall(r"`bench/results/([\w.-]+)`", README)]
    named += [f"bench/results/{f}" for f in re.findall(r"`(h100-[\w.-]+\.md)`", README)]
    named += [f"bench/{f}" for f in re.findall(r"^\| `(\w+\.(?:py|sh))` \|", BENCH_README, re.M)]
    missing = [p for p in named if not (REPO / p).exists()]
    assert not missing


def test_lifecycle_claims_of_the_api_block(tmp_path):
    """README: the first adapter added is active, the base freezes and that adapter trains; later adapters stay
    inactive; merge/unmerge keep the outputs; disable_adapters gives the base outputs; unload restores modules."""
    model = _llama()
    ids = _ids()
    base = model(input_ids=ids).logits
    pe.add_adapter(model, "a", pe.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    assert pe.active_adapter(model) == "a"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n and ".a." in n for n in trainable)
    pe.add_adapter(model, "b", pe.LoraConfig(r=4, target_modules=["q_proj"]))
    assert pe.active_adapter(model) == "a"
    _randomize(model)
    adapted = model(input_ids=ids).logits
    assert not torch.allclose(adapted, base)
    pe.merge_adapter(model, "a")
    torch.testing.assert_close(model(input_ids=ids).logits, adapted, atol=1e-5, rtol=1e-5)
    pe.unmerge_adapter(model, "a")
    with pe.disable_adapters(model):
        torch.testing.assert_close(model(input_ids=ids).logits, base)
    pe.set_active_adapter(model, "b")
    assert {n for n, p in model.named_parameters() if p.requires_grad} and \
        all(".b." in n for n, p in model.named_parameters() if p.requires_grad)
    pe.unload(model)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))
    torch.testing.assert_close(model(input_ids=ids).logits, base)


def test_lora_config_lists_the_readmes_fields():
    """README: `LoraConfig` takes r, alpha, dropout, target_modules, exclude_modules, layers_to_transform,
    layers_pattern, use_rslora, bias, modules_to_save, rank_pattern, alpha_pattern."""
    listed = re.search(r"`LoraConfig` takes PEFT's LoRA fields:(.*?)\.\n", README, re.S).group(1)
    fields = set(re.findall(r"`(\w+)`", listed)) - {"None"}
    assert fields == {f.name for f in pe.LoraConfig.__dataclass_fields__.values()}


def test_target_modules_forms():
    """README: target_modules takes names, a regex, "all-linear", or None for the architecture's default;
    "all-linear" leaves out embeddings (and the head)."""
    def targets(config):
        model = _llama()
        pe.add_adapter(model, "x", config)
        return _lora_paths(model)
    names = targets(pe.LoraConfig(target_modules=["q_proj", "v_proj"]))
    assert targets(pe.LoraConfig(target_modules=None)) == names     # Llama's default, as PEFT: q_proj, v_proj
    assert targets(pe.LoraConfig(target_modules=r".*\.(q|v)_proj")) == names
    every = targets(pe.LoraConfig(target_modules="all-linear"))
    assert len(every) == 14 and "lm_head" not in every and not any("embed" in n for n in every)
    assert targets(pe.LoraConfig(target_modules="all-linear", exclude_modules=["o_proj"])) == \
        [n for n in every if not n.endswith("o_proj")]
    assert targets(pe.LoraConfig(target_modules=["q_proj"], layers_to_transform=[1])) == \
        ["model.layers.1.self_attn.q_proj"]


def test_rank_pattern_first_matching_key_wins():
    """README: rank_pattern / alpha_pattern {regex: value}; the first key that matches the end of a module's
    name wins, as in PEFT (matching at a dot: "proj" does not select "q_proj")."""
    model = _llama()
    pe.add_adapter(model, "x", pe.LoraConfig(r=8, target_modules=["q_proj", "v_proj"], rank_pattern={
        "q_proj": 4, r"layers\.0\.self_attn\.q_proj": 2, "proj": 3}, alpha_pattern={"v_proj": 32}))
    ranks = _ranks(model, "x")
    assert ranks["model.layers.0.self_attn.q_proj"] == 4          # the first key wins, not the longest
    assert ranks["model.layers.1.self_attn.q_proj"] == 4
    assert ranks["model.layers.0.self_attn.v_proj"] == 8          # "proj" is not the end at a dot
    layer = model.get_submodule("model.layers.0.self_attn.v_proj")
    assert layer.scale["x"] == 32 / 8
    model = _llama()
    pe.add_adapter(model, "x", pe.LoraConfig(r=8, target_modules=["q_proj"], rank_pattern={
        r"layers\.0\.self_attn\.q_proj": 2, "q_proj": 4}))
    assert _ranks(model, "x") == {"model.layers.0.self_attn.q_proj": 2, "model.layers.1.self_attn.q_proj": 4}


def test_rank_pattern_matches_peft():
    """README: "as in PEFT": the same patterns give PEFT's ranks."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model
    patterns = {"q_proj": 4, r"layers\.0\.self_attn\.q_proj": 2, "v_proj": 6}
    model = _llama()
    pe.add_adapter(model, "x", pe.LoraConfig(r=8, target_modules=["q_proj", "v_proj", "k_proj"],
                                             rank_pattern=patterns))
    peft_model = get_peft_model(_llama(), PeftLoraConfig(r=8, target_modules=["q_proj", "v_proj", "k_proj"],
                                                         rank_pattern=patterns))
    peft_ranks = {n.removeprefix("base_model.model."): m.r["default"] for n, m in peft_model.named_modules()
                  if hasattr(m, "r") and isinstance(m.r, dict) and "default" in m.r}
    assert _ranks(model, "x") == peft_ranks


def test_peft_reads_our_files_and_we_read_peft(tmp_path):
    """README: adapters are saved in HF PEFT's file layout, so PEFT can read ours and we read PEFT's LoRA."""
    from peft import LoraConfig as PeftLoraConfig, PeftModel, get_peft_model
    ids = _ids()
    model = _llama()
    pe.add_adapter(model, "a", pe.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    _randomize(model)
    ours = model(input_ids=ids).logits
    pe.save_adapter(model, "a", tmp_path / "ours")
    theirs = PeftModel.from_pretrained(_llama(), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(theirs(input_ids=ids).logits, ours, atol=1e-5, rtol=1e-5)

    peft_model = get_peft_model(_llama(), PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    _randomize(peft_model, seed=3)
    peft_model.eval()
    expected = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(str(tmp_path / "peft"))
    again = _llama()
    assert pe.load_adapter(again, tmp_path / "peft", name="p") == "p"
    torch.testing.assert_close(again(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_forward_hooks_on_a_target_are_refused():
    """README: forward hooks on a targeted module are refused when adding an adapter."""
    model = _llama()
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *a: None)
    with pytest.raises(ValueError, match="forward hooks"):
        pe.add_adapter(model, "a", pe.LoraConfig(target_modules=["q_proj"]))
    assert not hasattr(model, "ptlm_adapters") and type(model.model.layers[1].self_attn.q_proj) is nn.Linear


def test_accelerate_offload_gives_an_error_naming_the_meta_weights():
    """README: accelerate's offloading (`cpu_offload`) is not supported: a clear error names the meta weights."""
    accelerate = pytest.importorskip("accelerate")
    model = _llama()
    pe.add_adapter(model, "a", pe.LoraConfig(target_modules=["q_proj"]))
    accelerate.cpu_offload(model, execution_device="cpu")
    with torch.no_grad(), pytest.raises(ValueError, match="meta"):
        model(input_ids=_ids())


def test_device_map_cpu_loading_works(tmp_path):
    """README: loading with device_map="cpu" onto one device works."""
    pytest.importorskip("accelerate")
    _llama().save_pretrained(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LlamaForCausalLM.from_pretrained(tmp_path / "base", device_map="cpu").eval()
    base = model(input_ids=_ids()).logits
    pe.add_adapter(model, "a", pe.LoraConfig(target_modules=["q_proj", "v_proj"]))
    torch.testing.assert_close(model(input_ids=_ids()).logits, base)
    _randomize(model)
    assert not torch.allclose(model(input_ids=_ids()).logits, base)


def test_lora_embedding_claims(tmp_path):
    """README: embeddings are targets when named; a new embedding adapter has A = 0 and B normal; no dropout
    applies; files hold lora_embedding_A / lora_embedding_B."""
    from safetensors.torch import load_file
    model = _llama()
    pe.add_adapter(model, "e", pe.LoraConfig(r=4, dropout=0.5, target_modules=["embed_tokens", "q_proj"]))
    emb = model.model.embed_tokens
    A, B = emb.lora_A["e"].weight, emb.lora_B["e"].weight
    assert torch.count_nonzero(A) == 0 and torch.count_nonzero(B) > 0
    _randomize(model)
    model.train()
    with torch.no_grad():
        torch.testing.assert_close(emb(_ids()), emb(_ids()))           # train mode: no dropout on the lookup
    pe.save_adapter(model, "e", tmp_path / "e")
    keys = load_file(tmp_path / "e" / "adapter_model.safetensors")
    assert any(k.endswith("embed_tokens.lora_embedding_A") for k in keys)
    assert any(k.endswith("embed_tokens.lora_embedding_B") for k in keys)


def test_tied_gpt2_embedding_trains_but_does_not_merge():
    """README: an embedding tied to the LM head (GPT-2's wte) trains, but is not merged."""
    model = _gpt2()
    ids = _ids()
    pe.add_adapter(model, "w", pe.LoraConfig(r=4, target_modules=["wte", "c_attn"]))
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.transformer.wte.lora_A["w"].weight.grad is not None
    with pytest.raises(ValueError, match="tied"):
        pe.merge_adapter(model, "w")


# -------------------------------------------------------------------------------------------- fuse_base_ops
def _fused_pair():
    plain, fused = _llama(), _llama()
    for m in (plain, fused):
        pe.add_adapter(m, "a", pe.LoraConfig(r=4, target_modules="all-linear"))
        _randomize(m)
    return plain, fused


def test_fuse_base_ops_same_outputs_gradients_and_keys():
    """README: fuse_base_ops gives the same outputs and gradients, state-dict keys do not change, a training
    forward with labels has logits None, LoRA layers may be added before or after, and unfuse_base_ops puts the
    original modules back."""
    plain, fused = _fused_pair()
    keys = set(fused.state_dict())
    counts = pe.fuse_base_ops(fused)
    assert counts == {"rms_norm": 5, "gated_mlp": 2, "rotary": 1, "loss": 1}
    assert set(fused.state_dict()) == keys
    ids = _ids()
    torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    for m in (plain, fused):
        m.train()
    out_p, out_f = plain(input_ids=ids, labels=ids), fused(input_ids=ids, labels=ids)
    assert out_f.logits is None
    torch.testing.assert_close(out_f.loss, out_p.loss, atol=1e-5, rtol=1e-5)
    out_p.loss.backward()
    out_f.loss.backward()
    grads_p = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    for n, p in fused.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads_p[n], atol=1e-5, rtol=1e-4)
    # an adapter added after fusing
    pe.add_adapter(fused, "late", pe.LoraConfig(r=2, target_modules=["gate_proj"]))
    pe.unfuse_base_ops(fused)
    assert not any("Fused" in type(m).__name__ for m in fused.modules())


# ------------------------------------------------------------------------------------ other methods, combined
def test_bottleneck_parameter_count():
    """README: bottleneck adapters have 2md + d + m parameters each, plus 2d with layer_norm=True; houlsby puts
    one at the attention and one at the FFN output of each block."""
    d, m, layers = 64, 16, 2
    for layer_norm, extra in ((False, 0), (True, 2 * d)):
        model = _llama()
        pe.add_adapter(model, "h", pe.BottleneckConfig(bottleneck=m, placement="houlsby", layer_norm=layer_norm))
        count = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert count == 2 * layers * (2 * m * d + d + m + extra)


def test_new_adapters_change_nothing():
    """Docstrings: a new LoRA adapter (B = 0) and a new bottleneck adapter (up = 0) are the identity."""
    ids = _ids()
    for config in (pe.LoraConfig(target_modules="all-linear"), pe.BottleneckConfig(placement="parallel"),
                   pe.BottleneckConfig(placement="pfeiffer", layer_norm=True)):
        model = _llama()
        base = model(input_ids=ids).logits
        pe.add_adapter(model, "x", config)
        torch.testing.assert_close(model(input_ids=ids).logits, base)


def _row_alone(model, name, ids):
    pe.set_active_adapter(model, name)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_mixed_batch_rows_equal_rows_alone_for_every_method():
    """README: every method, and any mix of them, works in pe.adapter_batch row by row: each row's output equals
    that row run alone with its adapter active (None: base)."""
    model = _llama()
    pe.add_adapter(model, "lora", pe.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    pe.add_adapter(model, "bn", pe.BottleneckConfig(bottleneck=8))
    pe.add_adapter(model, "prefix", pe.PrefixConfig(num_virtual_tokens=4, projection=True))
    pe.add_adapter(model, "prompt", pe.PromptConfig(num_virtual_tokens=3, init="vocab"))
    pe.add_adapter(model, "both", [pe.LoraConfig(r=4, target_modules=["q_proj"]),
                                   pe.PrefixConfig(num_virtual_tokens=2)])
    _randomize(model)
    names = ["lora", "bn", None, "prefix", "prompt", "both"]
    ids = _ids(rows=len(names))
    with pe.adapter_batch(model, names), torch.no_grad():
        mixed = model(input_ids=ids).logits
    for i, name in enumerate(names):
        if name is None:
            with pe.disable_adapters(model), torch.no_grad():
                alone = model(input_ids=ids[i:i + 1]).logits
        else:
            alone = _row_alone(model, name, ids[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1, -alone.shape[1]:], alone[:, -alone.shape[1]:], atol=1e-5,
                                   rtol=1e-5, msg=f"row {i} ({name})")


def test_mixed_batch_generate_keeps_each_rows_adapter_with_beams():
    """README: inside adapter_batch, model.generate keeps each row's adapter (beams too)."""
    model = _llama()
    pe.add_adapter(model, "a", pe.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    pe.add_adapter(model, "b", pe.LoraConfig(r=16, alpha=16, target_modules=["q_proj", "v_proj"]))
    _randomize(model)
    ids = _ids(rows=3, length=6)
    kw = dict(max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)
    with pe.adapter_batch(model, ["a", "b", None]), torch.no_grad():
        mixed = model.generate(ids, **kw)
    pe.set_active_adapter(model, "b")
    with torch.no_grad():
        alone = model.generate(ids[1:2], **kw)
    assert torch.equal(mixed[1:2, :alone.shape[1]], alone)


def test_mixed_batch_training_gradients_from_own_rows_and_remap():
    """README: without no_grad the block trains, gradients reach each adapter from its own rows only; adapters
    stay trainable after the block; remap_adapter_batch works for LoRA and is refused for prefix adapters."""
    model = _llama()
    for n in ("a", "b"):
        pe.add_adapter(model, n, pe.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    _randomize(model)
    ids = _ids(rows=2)
    with pe.adapter_batch(model, ["a", None]):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()                                                     # after the block, as HF Trainer does
    q = model.model.layers[0].self_attn.q_proj
    assert q.lora_B["a"].weight.grad is not None and q.lora_B["a"].weight.requires_grad
    assert q.lora_B["b"].weight.grad is None
    with pe.adapter_batch(model, ["a", "b"]), torch.no_grad():
        pe.remap_adapter_batch(model, ["b", "a"])
        remapped = model(input_ids=ids).logits
    torch.testing.assert_close(remapped[0:1], _row_alone(model, "b", ids[0:1]), atol=1e-5, rtol=1e-5)
    pe.add_adapter(model, "p", pe.PrefixConfig(num_virtual_tokens=2))
    with pe.adapter_batch(model, ["a", "p"]), pytest.raises(ValueError, match="per-row"):
        pe.remap_adapter_batch(model, ["p", "a"])


def test_half_precision_base_keeps_fp32_adapters():
    """README: on an fp16 / bf16 base the adapter weights (LoRA, bottleneck) are kept in fp32."""
    model = _llama().to(torch.bfloat16)
    pe.add_adapter(model, "a", pe.LoraConfig(target_modules=["q_proj"]))
    pe.add_adapter(model, "b", pe.BottleneckConfig(bottleneck=8))
    dtypes = {p.dtype for n, p in model.named_parameters() if "lora_" in n or "ptlm_bottleneck" in n}
    assert dtypes == {torch.float32}
    assert model(input_ids=_ids()).logits.dtype == torch.bfloat16


def test_torch_func_grad_runs_on_the_reference_backend():
    """README: torch.func transforms (grad over functional_call) run on the reference backend."""
    model = _llama()
    pe.add_adapter(model, "a", pe.LoraConfig(r=4, target_modules=["q_proj"]))
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    ids = _ids()

    def loss(p):
        return torch.func.functional_call(model, p, (), {"input_ids": ids, "labels": ids}).loss
    grads = torch.func.grad(loss)(params)
    assert set(grads) == set(params)


RESULTS = REPO / "bench" / "results"


def _md_rows(path, first: str) -> list[dict]:
    """The rows of the Markdown table in `path` whose header starts with `first`, as {header: cell}."""
    rows, header = [], None
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|"):
            header = None
        elif cells[0] == first:
            header = cells
        elif header is not None and not set(cells[0]) <= {"-"}:
            rows.append(dict(zip(header, cells)))
    return rows


def test_readme_benchmark_table_matches_the_results_file():
    """README: the H100 table (device time relative to cuBLAS, CUDA graphs) is the ptlm/cublas column of
    bench/results/h100-2026-11-28-s4-lora-train.md (fwd+bwd rows: against the base's fwd+bwd) and of -kernels.md
    (32 uniform rank-16 adapters), and the training-step numbers are -lora-train.md's."""
    lora = {(int(r["d_out"]), int(r["T"]), r["mode"]): float(r["ptlm/cublas"])
            for r in _md_rows(RESULTS / "h100-2026-11-28-s4-lora-train.md", "d_in")
            if r.get("r") == "16" and r["timing"] == "graph" and r["d_in"] == "4096"}
    multi = {int(r["T"]): float(r["ptlm/cublas"]) for r in _md_rows(RESULTS / "h100-2026-11-28-s4-kernels.md", "d_in")
             if (r["adapters"], r["assign"], r["r"], r["base_pct"], r["mode"], r["timing"])
             == ("32", "uniform", "16", "0", "fwd", "graph")}
    table = re.search(r"\| layer \| T = 1 .*?\n\n", README, re.S).group(0).splitlines()[2:]
    tokens = [1, 16, 64, 1024, 4096]
    rows = {"4096×4096 fwd": (4096, "fwd"), "4096×11008 fwd": (11008, "fwd"),
            "4096×4096 fwd+bwd": (4096, "fwd+bwd"), "4096×11008 fwd+bwd": (11008, "fwd+bwd")}
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        label = re.sub(r"\s*\[.*?\]|\s*/ base fwd\+bwd", "", cells[0]).strip()
        for t, cell in zip(tokens, cells[1:]):
            if cell == "—":
                continue
            value = float(re.match(r"[\d.]+", cell).group(0))
            if label in rows:
                measured = lora[(*rows[label][:1], t, rows[label][1])]
            else:
                assert label.startswith("32 adapters"), label
                measured = multi[t]
            assert abs(measured - value) <= 0.0051, (label, t, measured, value)
    train = (RESULTS / "h100-2026-11-28-s4-lora-train.md").read_text()
    assert "peft       plain 0.1844 s/step  21.89 GB" in train and "graph 0.1475 s/step" in train
    assert "ptlm_fused plain 0.1789 s/step  12.58 GB loss 10.150 | graph 0.0878 s/step  14.49 GB" in train
    text = " ".join(README.split())
    assert "0.0878 s and 14.5 GB; HF PEFT 0.1844 s and 21.9 GB (0.1475 s captured): 2.10×" in text
    assert round(0.1844 / 0.0878, 2) == 2.10 and round(0.1475 / 0.0878, 2) == 1.68


def test_readme_speed_figures_match_the_results():
    """README (Benchmarks) states its H100 figures as in bench/results/h100-2026-11-28-s4-kernels.md, each with its
    direction: prefix attention takes 1.49x / 1.50x SDPA's time; the bottleneck adapter (m 64) is faster than eager
    PyTorch by 2.45x / 1.76x (d 768) and 2.09x / 1.86x (d 4096, the wide backward), CUDA graphs; PEFT's mixed batch
    is 73x slower at T = 1024 (plain)."""
    md = RESULTS / "h100-2026-11-28-s4-kernels.md"
    text = " ".join(README.split())
    prefix = {r["mode"]: float(r["ptlm ms"]) / float(r["sdpa_causal ms"]) for r in _md_rows(md, "B")
              if (r["L"], r["P"], r["timing"]) == ("2048", "16", "plain")}
    assert (round(prefix["fwd"], 2), round(prefix["fwd+bwd"], 2)) == (1.49, 1.50)
    assert "1.49× SDPA's time forward, 1.50× forward+backward" in text
    speedups = {}
    for r in _md_rows(md, "d"):
        if (r["m"], r["adapters"], r["timing"]) == ("64", "1", "graph"):
            ptlm = float(r["ptlm_wide"] if r["d"] == "4096" and r["mode"] == "fwd+bwd" else r["ptlm"])
            speedups[(r["d"], r["mode"])] = round(float(r["eager"]) / ptlm, 2)
    assert speedups == {("768", "fwd"): 2.45, ("768", "fwd+bwd"): 1.76, ("4096", "fwd"): 2.09,
                        ("4096", "fwd+bwd"): 1.86}
    assert "d 768 forward 2.45×, forward+backward 1.76×; d 4096 2.09× and 1.86×" in text
    peft = next(float(r["peft/ptlm"]) for r in _md_rows(md, "d_in")
                if (r["adapters"], r["T"], r["mode"], r["timing"]) == ("32", "1024", "fwd", "plain"))
    assert round(peft) == 73 and "73× faster than PEFT's mixed batch at T = 1024" in text


# ------------------------------------------------------------------------ functional ops: the docstrings' contracts
def _r(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype)


def test_functional_lora_linear_and_grouped():
    x, W, b, A, B = _r(2, 3, 8), _r(5, 8), _r(5), _r(4, 8), _r(5, 4)
    y = functional.lora_linear(x, W, b, A, B, scale=2.0)
    torch.testing.assert_close(y, x @ W.T + b + 2.0 * (x @ A.T) @ B.T)
    torch.testing.assert_close(functional.lora_linear(x, W.T.contiguous(), b, A, B, 2.0, fan_in_fan_out=True), y)
    W2, A2, B2 = _r(7, 8), _r(2, 8), _r(7, 2)
    ys = functional.lora_linear_grouped(x, [W, W2, W2], [b, None, None], [A, A2, None], [B, B2, None],
                                        [2.0, 0.5, 1.0])
    assert [tuple(t.shape) for t in ys] == [(2, 3, 5), (2, 3, 7), (2, 3, 7)]
    torch.testing.assert_close(ys[0], y)
    torch.testing.assert_close(ys[1], x @ W2.T + 0.5 * (x @ A2.T) @ B2.T)
    torch.testing.assert_close(ys[2], x @ W2.T)


def _slots(S, r_max, ranks, d_in, d_out):
    A, B = torch.zeros(S, r_max, d_in, dtype=torch.float64), torch.zeros(S, d_out, r_max, dtype=torch.float64)
    for s, r in enumerate(ranks):
        A[s, :r], B[s, :, :r] = _r(r, d_in), _r(d_out, r)
    return functional.LoraSlots(A, B, torch.tensor(ranks, dtype=torch.int32),
                                torch.tensor([2.0, 0.5][:S], dtype=torch.float32))


def test_functional_lora_linear_multi_and_grouped():
    x, W, b = _r(2, 3, 8), _r(5, 8), _r(5)
    slots = _slots(2, 4, [4, 2], 8, 5)
    index = torch.tensor([[0, 1, -1], [1, -1, 0]])
    y = functional.lora_linear_multi(x, W, b, slots, index)
    assert y.shape == (2, 3, 5)
    for i in range(2):
        for t in range(3):
            a = int(index[i, t])
            want = x[i, t] @ W.T + b
            if a >= 0:
                want = want + float(slots.scales[a]) * (x[i, t] @ slots.lora_A[a].T) @ slots.lora_B[a].T
            torch.testing.assert_close(y[i, t], want)
    W2 = _r(6, 8)
    ys = functional.lora_linear_multi_grouped(x, [W, W2], [b, None], [slots, None], index)
    torch.testing.assert_close(ys[0], y)
    torch.testing.assert_close(ys[1], x @ W2.T)


def test_functional_lora_embedding_and_multi():
    V, d, r = 10, 6, 3
    ids, weight, A, B = torch.randint(0, V, (2, 4)), _r(V, d), _r(r, V), _r(d, r)
    y = functional.lora_embedding(ids, weight, A, B, scale=2.0, embed_scale=1.5)
    torch.testing.assert_close(y, 1.5 * (weight[ids] + 2.0 * A[:, ids].permute(1, 2, 0) @ B.T))
    assert y.dtype == weight.dtype and y.shape == (2, 4, d)
    slots = _slots(2, 3, [3, 1], V, d)
    index = torch.tensor([[0, -1, 1, 0], [1, 1, -1, 0]])
    ym = functional.lora_embedding_multi(ids, weight, slots, index)
    for i in range(2):
        for t in range(4):
            a, tok = int(index[i, t]), int(ids[i, t])
            want = weight[tok].clone()
            if a >= 0:
                want += float(slots.scales[a]) * slots.lora_A[a][:, tok] @ slots.lora_B[a].T
            torch.testing.assert_close(ym[i, t], want)


def test_functional_bottleneck_adapter_and_multi():
    h, res = _r(2, 3, 8), _r(2, 3, 8)
    Wd, bd, Wu, bu = _r(4, 8), _r(4), _r(8, 4), _r(8)
    for act, fn in (("relu", F.relu), ("gelu", nn.GELU()), ("silu", F.silu)):
        y = functional.bottleneck_adapter(h, Wd, bd, Wu, bu, act=act, scale=0.5)
        torch.testing.assert_close(y, h + 0.5 * (fn(h @ Wd.T + bd) @ Wu.T + bu))
    y = functional.bottleneck_adapter(h, Wd, None, Wu, None, residual=res)
    torch.testing.assert_close(y, res + F.relu(h @ Wd.T) @ Wu.T)
    S, m_max = 2, 4
    slots = functional.BottleneckSlots(
        torch.stack([Wd, torch.cat([Wd[:2], torch.zeros(2, 8, dtype=torch.float64)])]),
        torch.stack([bd, torch.cat([bd[:2], torch.zeros(2, dtype=torch.float64)])]),
        torch.stack([Wu, torch.cat([Wu[:, :2], torch.zeros(8, 2, dtype=torch.float64)], 1)]),
        torch.stack([bu, bu]), torch.tensor([4, 2], dtype=torch.int32), torch.tensor([1.0, 2.0]),
        torch.tensor([functional.BOTTLENECK_ACT_CODES["relu"], functional.BOTTLENECK_ACT_CODES["silu"]],
                     dtype=torch.int32))
    assert S == slots.down_weight.shape[0] and m_max == slots.down_weight.shape[1]
    index = torch.tensor([[0, 1, -1], [-1, 0, 1]])
    y = functional.bottleneck_adapter_multi(h, slots, index)
    for i in range(2):
        for t in range(3):
            a = int(index[i, t])
            if a < 0:
                assert torch.equal(y[i, t], h[i, t])
                continue
            fn = F.relu if a == 0 else F.silu
            want = h[i, t] + float(slots.scales[a]) * (fn(h[i, t] @ slots.down_weight[a].T + slots.down_bias[a])
                                                       @ slots.up_weight[a].T + slots.up_bias[a])
            torch.testing.assert_close(y[i, t], want)


def test_functional_prefix_attention():
    Bsz, Hq, Hkv, Lq, Lk, P, D = 2, 4, 2, 3, 5, 2, 8
    q, k, v = _r(Bsz, Hq, Lq, D), _r(Bsz, Hkv, Lk, D), _r(Bsz, Hkv, Lk, D)
    pk, pv = _r(Bsz, Hkv, P, D), _r(Bsz, Hkv, P, D)
    lengths = torch.tensor([2, 1], dtype=torch.int32)
    out = functional.prefix_attention(q, k, v, pk, pv, lengths)
    assert out.shape == (Bsz, Hq, Lq, D) and out.is_contiguous() and out.dtype == q.dtype
    for b in range(Bsz):
        for h in range(Hq):
            kv = h // (Hq // Hkv)
            keys = torch.cat([pk[b, kv, :int(lengths[b])], k[b, kv]])
            vals = torch.cat([pv[b, kv, :int(lengths[b])], v[b, kv]])
            scores = q[b, h] @ keys.T * D ** -0.5
            n_pre = int(lengths[b])
            for i in range(Lq):
                scores[i, n_pre + Lk - Lq + i + 1:] = -math.inf
            torch.testing.assert_close(out[b, h], scores.softmax(-1) @ vals)
    mask = torch.ones(Bsz, Lk, dtype=torch.bool)
    mask[1] = False
    none = functional.prefix_attention(q, k, v, pk, pv, torch.tensor([2, 0], dtype=torch.int32),
                                       key_padding_mask=mask)
    assert torch.count_nonzero(none[1]) == 0                   # a query that sees no key outputs 0


def test_functional_rms_norm_and_silu_mul():
    x, w = torch.randn(2, 3, 8, dtype=torch.float16), torch.randn(8)
    y = functional.rms_norm(x, w, eps=1e-6)
    assert y.dtype == torch.promote_types(x.dtype, w.dtype)
    xf = x.float()
    torch.testing.assert_close(y, w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).half().float())
    gate, up = _r(2, 5), _r(2, 5)
    torch.testing.assert_close(functional.silu_mul(gate, up), F.silu(gate) * up)



def test_functional_apply_rotary_returns_contiguous_tensors():
    """functional.apply_rotary's docstring: "unsqueeze_dim=2: q (B, L, Hq, D) ... any strides (HF's transposed views
    are read in place, never written) ... Returns new contiguous tensors shaped as q and k". On the reference
    backend (PTLM_BACKEND=reference, float64, CPU tensors: everything the kernels do not take) the outputs of a
    transposed-view input keep the input's strides and are not contiguous: reference.apply_rotary returns
    `q * cos + rotate_half(q) * sin` without .contiguous()."""
    def rotate_half(t):
        return torch.cat([-t[..., t.shape[-1] // 2:], t[..., :t.shape[-1] // 2]], -1)
    Bsz, Hq, Hk, L, D = 2, 4, 2, 3, 6
    q, k, cos, sin = _r(Bsz, Hq, L, D), _r(Bsz, Hk, L, D), _r(1, L, D), _r(1, L, D)
    rq, rk = functional.apply_rotary(q, k, cos, sin)
    torch.testing.assert_close(rq, q * cos[:, None] + rotate_half(q) * sin[:, None])
    torch.testing.assert_close(rk, k * cos[:, None] + rotate_half(k) * sin[:, None])
    tq, tk = functional.apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos.expand(Bsz, L, D),
                                     sin.expand(Bsz, L, D), unsqueeze_dim=2)
    assert tq.shape == (Bsz, L, Hq, D) and tk.shape == (Bsz, L, Hk, D)
    torch.testing.assert_close(tq, rq.transpose(1, 2))
    torch.testing.assert_close(tk, rk.transpose(1, 2))
    assert rq.is_contiguous() and rk.is_contiguous()
    assert tq.is_contiguous() and tk.is_contiguous(), f"strides {tq.stride()} / {tk.stride()}"


def test_functional_linear_cross_entropy():
    hidden, weight, bias = torch.randn(2, 4, 8), torch.randn(11, 8), torch.randn(11)
    targets = torch.randint(0, 11, (2, 4))
    targets[0, 0] = -100
    logits = (hidden @ weight.T + bias).float()
    mean = functional.linear_cross_entropy(hidden, weight, targets, bias=bias)
    assert mean.dtype == torch.float32
    torch.testing.assert_close(mean, F.cross_entropy(logits.view(-1, 11), targets.view(-1)))
    total = functional.linear_cross_entropy(hidden, weight, targets, reduction="sum", bias=bias)
    torch.testing.assert_close(total, F.cross_entropy(logits.view(-1, 11), targets.view(-1), reduction="sum"))
    torch.testing.assert_close(functional.linear_cross_entropy(hidden, weight, targets, bias=bias,
                                                               num_items_in_batch=5), total / 5)
    assert functional.linear_cross_entropy(hidden, weight, torch.full((2, 4), -100)).isnan()
    assert functional.linear_cross_entropy(hidden.double(), weight.double(), targets).dtype == torch.float64

# --------------------------------------------------------------------------------- api.py / config.py docstrings
def test_api_docstring_claims():
    """api.py: adapter_batch raises ValueError for a merged adapter and a batch of another size; disable_adapters
    takes a merged adapter out and merges it back; adapter_configs returns copies; unload(merge=True) leaves a
    plain model computing the adapted outputs; remove_adapter of the last adapter restores requires_grad."""
    ids = _ids()
    model = _llama()
    base = model(input_ids=ids).logits
    model.lm_head.weight.requires_grad_(False)
    pe.add_adapter(model, "a", pe.LoraConfig(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    _randomize(model)
    with torch.no_grad():
        model.lm_head.modules_to_save["a"].weight.mul_(1.5)
    adapted = model(input_ids=ids).logits
    with pytest.raises(ValueError, match="batch size"), pe.adapter_batch(model, ["a", None, "a"]), torch.no_grad():
        model(input_ids=ids)
    pe.merge_adapter(model, "a")
    with pytest.raises(ValueError, match="merged"), pe.adapter_batch(model, ["a", None]):
        pass
    with pe.disable_adapters(model):
        torch.testing.assert_close(model(input_ids=ids).logits, base, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(input_ids=ids).logits, adapted, atol=1e-5, rtol=1e-5)
    config = pe.adapter_configs(model)["a"]
    config.r = 99
    assert pe.adapter_configs(model)["a"].r == 8
    pe.unload(model, merge=True)
    assert type(model.lm_head) is nn.Linear and not hasattr(model, "ptlm_adapters")
    torch.testing.assert_close(model(input_ids=ids).logits, adapted, atol=1e-5, rtol=1e-5)
    model = _llama()
    model.lm_head.weight.requires_grad_(False)
    pe.add_adapter(model, "a", pe.LoraConfig(target_modules=["q_proj"]))
    pe.remove_adapter(model, "a")
    assert not model.lm_head.weight.requires_grad and model.model.embed_tokens.weight.requires_grad


def test_config_docstring_claims():
    """config.py: modules_to_save "norm" also takes each "input_layernorm"; bias "lora_only" trains the biases of
    the adapter's layers; PromptConfig init="text" needs init_text and a tokenizer; PrefixConfig projection is
    Embedding (P, token_dim) -> Linear(token_dim, encoder_hidden_size = token_dim) -> tanh -> Linear(.., layers ·
    2 · token_dim) with token_dim = kv heads × head_dim on a grouped-query model."""
    model = _llama()
    pe.add_adapter(model, "a", pe.LoraConfig(target_modules=["q_proj"], modules_to_save=["norm"]))
    saved = {n.removesuffix(".modules_to_save") for n, _ in model.named_modules() if n.endswith("modules_to_save")}
    assert "model.layers.0.input_layernorm" in saved and "model.norm" in saved
    model = _llama(attention_bias=True)
    pe.add_adapter(model, "a", pe.LoraConfig(target_modules=["q_proj"], bias="lora_only"))
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")) == \
        ["model.layers.0.self_attn.q_proj.bias", "model.layers.1.self_attn.q_proj.bias"]
    with pytest.raises(ValueError, match="tokenizer"):
        pe.PromptConfig(init="text", init_text="hello")
    model = _llama()
    pe.add_adapter(model, "p", pe.PrefixConfig(num_virtual_tokens=3, projection=True))
    shapes = [tuple(p.shape) for p in model.parameters() if p.requires_grad]
    token_dim = 2 * (64 // 4)
    assert shapes == [(3, token_dim), (token_dim, token_dim), (token_dim,), (2 * 2 * token_dim, token_dim),
                      (2 * 2 * token_dim,)]


# ------------------------------------------------------------- results of the README's shell commands (started early)
def test_ptlm_demo_prints_what_the_readme_says_and_keeps_the_files(shell):
    """README: `ptlm demo --steps N --out DIR` prints loss and next-token accuracy of the base, adapted and
    reloaded models, the largest logit difference (exit 1 above 1e-4), trainable and total parameters, the backend
    and the wall time; --out keeps the adapter files (adapter_config.json + adapter_model.safetensors)."""
    done, root = shell("ptlm_demo")
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for text in ("toy-task loss", "next-token accuracy", "base", "adapted (2 steps)", "reloaded",
                 "max |logits - adapted|", "trainable of", "backend  reference", "wall time",
                 "training 2 AdamW steps"):
        assert text in out, (text, out)
    assert re.search(r"max abs diff \S+ <= 0\.0001: OK", out), out
    assert sorted(os.listdir(root / "demo_out")) == ["adapter_config.json", "adapter_model.safetensors"]


def test_python_m_ptlm_engine_is_the_demo_with_40_steps_in_seconds(shell):
    """README: `python -m ptlm_engine` is the same command as `ptlm`; the demo is the default command, --steps
    defaults to 40, and it takes a few seconds on a CPU."""
    done, _ = shell("python_m_default")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "training 40 AdamW steps" in done.stdout
    wall = float(re.search(r"wall time ([\d.]+) s", done.stdout).group(1))
    assert wall < 30, wall


def test_bench_suite_smoke_command_writes_the_documented_files(shell):
    """bench/README: `PTLM_BACKEND=reference python -m bench.gpu_suite OUT --smoke` (here one phase) writes
    results.json, results.csv, results.md, tuned.json (results.png only with matplotlib, else a message), and
    the printed summary stays under 12,000 characters."""
    done, root = shell("suite_smoke")
    assert done.returncode == 0, done.stderr[-3000:]
    files = set(os.listdir(root / "suite"))
    assert {"results.json", "results.csv", "results.md", "tuned.json"} <= files
    try:
        import matplotlib  # noqa: F401
        assert "results.png" in files
    except ImportError:
        assert "matplotlib" in done.stdout + done.stderr
    summary = done.stdout[done.stdout.index("ptlm_engine GPU suite on"):]
    assert len(summary) < 12_000
    assert json.loads((root / "suite" / "results.json").read_text())["meta"]["ptlm_backend"] == "reference"
