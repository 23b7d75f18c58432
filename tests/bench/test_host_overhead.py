"""CPU smoke test of bench/host_overhead.py: the 2-layer decoder and tiny layer ops with Triton's launches stubbed;
its rows, profile and files, and that everything the tool patches is put back afterwards."""
import json
import os

import torch
import triton.runtime.autotuner as autotuner
import triton.runtime.jit as jit
from transformers.models.llama import modeling_llama as llama

from bench import host_overhead
from ptlm_engine.kernels import lora as lora_kernels


def test_smoke_rows_profile_files_and_restore(tmp_path, monkeypatch):
    monkeypatch.setenv("PTLM_BACKEND", "reference")
    patched = (jit.JITFunction.run, autotuner.Autotuner.run, lora_kernels._tma_programs, torch.get_num_threads())
    result = host_overhead.main(["--smoke", "--out", str(tmp_path)])

    rows = result["rows"]
    assert all(r["host_us"] and r["host_us"] > 0 for r in rows), [r.get("note") for r in rows]
    step = {r["provider"]: r for r in rows if r["part"] == "model"}
    # both providers train the same LoRA parameters (r=16 on 2 layers of hidden 64, as in model_train's smoke test)
    assert step["peft"]["trainable"] == step["ptlm"]["trainable"] == step["ptlm_fused"]["trainable"] == 32768
    assert step["peft"]["triton_launches"] == 0
    assert 0 < step["ptlm"]["triton_launches"] < step["ptlm_fused"]["triton_launches"]
    assert all(r["aten_ops"] > 0 and r["torch_calls"] > 0 for r in step.values())
    layer = {(r["case"], r["provider"], r["mode"], r["device"], r["T"]): r for r in rows if r["part"] == "layer"}
    for device, _, _, tokens in host_overhead.layer_grid(smoke=True):
        for T in tokens:
            cases = ["lora_linear", "lora_linear_grouped_qkv"] + (["lora_linear_multi"] if T == 1 else [])
            for case in cases:
                fwd, train = layer[case, "ptlm", "fwd", device, T], layer[case, "ptlm", "fwd+bwd", device, T]
                assert 0 < fwd["triton_launches"] < train["triton_launches"], (case, device, T)
    assert layer["lora_linear", "eager", "fwd+bwd", "cpu", 1]["triton_launches"] == 0
    assert len(result["profile"]) == 15 and all(p["own_us"] >= 0 for p in result["profile"])
    decode = {r["provider"]: r for r in rows if r["part"] == "decode"}
    assert list(decode) == host_overhead.DECODE_PROVIDERS
    assert decode["base"]["triton_launches"] == decode["peft_mixed"]["triton_launches"] == 0
    assert 0 < decode["ptlm_one"]["triton_launches"] <= decode["ptlm_mixed"]["triton_launches"]
    assert (decode["ptlm_mixed"]["adapters"], decode["ptlm_one"]["adapters"], decode["base"]["adapters"]) == (2, 1, 0)

    assert json.loads((tmp_path / "host_overhead.json").read_text())["rows"] == json.loads(json.dumps(rows))
    md = (tmp_path / "host_overhead.md").read_text()
    assert "| model | train_step | ptlm | fwd+bwd+opt | cpu | 80 |" in md and "top functions by own time" in md

    assert (jit.JITFunction.run, autotuner.Autotuner.run, lora_kernels._tma_programs,
            torch.get_num_threads()) == patched
    assert "best_config" not in vars(autotuner.Autotuner)
    assert not hasattr(llama.apply_rotary_pos_emb, "ptlm_original")          # ptlm_fused's RoPE patch released
    assert os.environ["PTLM_BACKEND"] == "reference"
