"""Model-level LoRA training step: a Llama-shaped decoder, HF PEFT against ptlm_engine.

The decoder of the design notes (hidden 2048, 16 layers, 32 heads / 8 KV heads, FFN 5632, vocab 32000, random
bf16 weights, SDPA attention), LoRA r=16 alpha=32 dropout=0.05 on q, k, v, o, gate, up and down, batch 8 x 1024
random tokens, causal-LM loss, AdamW on the LoRA parameters. Each provider gets a fresh model built from the
same seed; the bench freezes the base before adding adapters, so both train exactly the LoRA parameters (the
row's `trainable` count is checked against r·(d_in+d_out) summed over the targeted layers).

Per provider and timing: median seconds per step (forward, backward, optimizer step, zero_grad; each step between
two device synchronizations) after warm-up steps — ptlm's kernels autotune in the first — and the peak memory
allocated (torch.cuda.max_memory_allocated, reset after the warm-up, so it covers steady-state steps with the
optimizer state in place; a graph row's replays allocate nothing, so its peak is the memory reserved: the graph's
pool and everything live). Timing `plain`: the eager loop. Timing `graph`: the same step captured in one CUDA graph
by pe.capture_train_step (PEFT's too: the same helper works on any model whose step has no host sync) and
replayed, which takes the host's per-op cost out of the step; capture_s is its warm-up plus capture. Off CUDA a
graph row runs the step eagerly (its note says so).

    python -m bench.model_train --out DIR [--providers peft,ptlm] [--timings plain,graph] [--steps 10] \
        [--gradient-checkpointing]
    python -m bench.model_train --smoke --out DIR      # a tiny decoder on CPU
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from torch import nn

from bench import harness

OP = "llama_train_step"
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# ptlm: the LoRA layers alone on HF's model code; ptlm_fused: also the base model's RMSNorm, SiLU-mul, RoPE and
# loss on ptlm's fused kernels (pe.fuse_base_ops), as Unsloth / Liger do: the step's elementwise passes.
PROVIDERS = ["peft", "ptlm_fused", "ptlm"]
TIMINGS = ["plain", "graph"]
# (provider, timing) rows in order of importance (a deadline cuts the last): the target's pair first; the graph
# rows after the eager rows they stand beside.
ORDER = [("peft", "plain"), ("ptlm_fused", "plain"), ("ptlm_fused", "graph"), ("peft", "graph"), ("ptlm", "plain"),
         ("ptlm", "graph")]
RANK, ALPHA, DROPOUT = 16, 32, 0.05
# The PEFT step measured on the project's H100 (shared/anchors/h100-model-2026-11-25.json) and the goal.
BASELINE_PEFT_S, BASELINE_PEFT_GB = 0.131, 16.1
TARGET_SPEEDUP = 1.3

TABLE = harness.table_spec(keys=["layers", "hidden", "batch", "seq", "r"], values=["ms", "peak_gb"],
                           ratios=[("ptlm", "peft", "ms"), ("ptlm", "peft", "peak_gb"),
                                   ("ptlm_fused", "peft", "ms"), ("ptlm_fused", "peft", "peak_gb")])


def llama_config(smoke: bool):
    from transformers import LlamaConfig
    size = (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=256) if smoke else
            dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=5632, vocab_size=32000))
    return LlamaConfig(**size, max_position_embeddings=4096, attn_implementation="sdpa", use_cache=False)


def build_model(config, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.to(dtype)
    model.requires_grad_(False)  # the frozen base: only the adapters train
    return model.train()


def expected_lora_params(model: nn.Module, rank: int) -> int:
    return sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in TARGET_MODULES)


def add_lora(model: nn.Module, provider: str, rank: int, alpha: int, dropout: float,
             peft_fp32_adapters: bool = False) -> nn.Module:
    if provider == "peft":
        from peft import LoraConfig, get_peft_model
        # PEFT by default upcasts bf16 adapters to fp32, which casts every LoRA input to an fp32 copy (measured
        # on the H100: 0.216 s/step and 26 GB instead of ~0.13 s / 16 GB). Kept in the model's dtype unless
        # asked, like ptlm's adapters: the comparison is between implementations, not precisions.
        return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                                                target_modules=TARGET_MODULES, task_type="CAUSAL_LM"),
                              autocast_adapter_dtype=peft_fp32_adapters)
    if provider in ("ptlm", "ptlm_fused"):
        import ptlm_engine as pe
        missing = [n for n in ("add_adapter", "set_active_adapter", "LoraConfig") if not hasattr(pe, n)]
        if missing:
            raise RuntimeError(f"ptlm_engine has no {', '.join(missing)}: the adapter API "
                               "(pe.add_adapter / pe.LoraConfig / pe.set_active_adapter) is not in this checkout")
        pe.add_adapter(model, "a", pe.LoraConfig(r=rank, alpha=alpha, dropout=dropout,
                                                 target_modules=TARGET_MODULES))
        pe.set_active_adapter(model, "a")
        if provider == "ptlm_fused":
            pe.fuse_base_ops(model)
        return model
    raise ValueError(f"unknown provider {provider!r}")


def time_steps(step, row: dict, args, device: torch.device) -> None:
    """Time `step` (one training step returning its loss) into `row`: --warmup untimed steps (ptlm autotunes in
    the first), then the median of --steps, each between device synchronizations; tokens/s, loss, peak memory.

    peak_gb: the most memory allocated during the timed steps; for a graph row, whose replays allocate nothing
    (the graph's private pool holds its activations), the most memory reserved instead, with the allocator's
    unused cache emptied first: the pool and everything live. reserved_gb: that reserved peak for every row."""
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    harness.sync(device)
    row["first_call_s"] = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        harness.sync(device)
        t0 = time.perf_counter()
        loss = step()
        harness.sync(device)
        times.append(time.perf_counter() - t0)
    row["ms"] = statistics.median(times) * 1e3
    row["tok_s"] = args.batch * args.seq / (row["ms"] / 1e3)
    row["loss"] = float(loss)
    if device.type == "cuda":
        row["reserved_gb"] = torch.cuda.max_memory_reserved(device) / 1e9
        graph = row.get("timing") == "graph"
        row["peak_gb"] = row["reserved_gb"] if graph else torch.cuda.max_memory_allocated(device) / 1e9
    if not math.isfinite(row["loss"]):
        row["note"] = f"non-finite loss {row['loss']}"


def captured_step(model: nn.Module, opt, ids: torch.Tensor, row: dict, args, device: torch.device):
    """The step on `ids` captured by pe.capture_train_step (--warmup steps first) as a zero-argument call;
    capture_s (warm-up and capture) and, off CUDA, a note go into `row`."""
    import ptlm_engine as pe
    t0 = time.perf_counter()
    batch = {"input_ids": ids, "labels": ids}
    captured = pe.capture_train_step(model, opt, batch, warmup=args.warmup)
    harness.sync(device)
    row["capture_s"] = time.perf_counter() - t0
    if not captured.graphed:
        row["note"] = f"no CUDA graph on {device.type}: the step ran eagerly"
    return lambda: captured(batch)


def measure(provider: str, args, device: torch.device, timing: str = "plain") -> dict:
    """One provider's row: build a fresh model, add LoRA, warm up (graph: capture), time steps, free everything."""
    config = llama_config(args.smoke)
    shape = {"layers": config.num_hidden_layers, "hidden": config.hidden_size, "batch": args.batch,
             "seq": args.seq, "r": args.rank}
    mode = "train+ckpt" if args.gradient_checkpointing else "train"
    row = {"op": OP, "provider": provider, "mode": mode, "timing": timing, **shape}

    def fill() -> None:
        model = build_model(config, device, torch.bfloat16)
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        expected = expected_lora_params(model, args.rank)
        model = add_lora(model, provider, args.rank, args.alpha, args.dropout, args.peft_fp32_adapters)
        params = [p for p in model.parameters() if p.requires_grad]
        row["trainable"] = sum(p.numel() for p in params)
        row["adapter_dtype"] = ",".join(sorted({str(p.dtype).removeprefix("torch.") for p in params}))
        if row["trainable"] != expected:
            row["note"] = f"trainable {row['trainable']} != expected LoRA params {expected}"
        opt = torch.optim.AdamW(params, lr=1e-4)
        gen = torch.Generator(device="cpu").manual_seed(1)
        ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen).to(device)

        def eager_step() -> torch.Tensor:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        step = captured_step(model, opt, ids, row, args, device) if timing == "graph" else eager_step
        time_steps(step, row, args, device)
        # the eager step's kernels (a graph row runs the same kernels, and its wall time is theirs)
        if args.profile_steps and device.type == "cuda" and timing == "plain":
            row["gpu_ms"], row["profile"] = kernel_profile(step, args.profile_steps)
        if provider == "ptlm_fused":   # the RoPE patch back to transformers' own once no fused model holds it
            import ptlm_engine as pe
            pe.unfuse_base_ops(model)

    harness.provider_row(row, fill)
    return row


def kernel_profile(step, steps: int, top: int = 14) -> tuple[float, list[str]]:
    """The step's GPU time by kernel (torch.profiler over `steps` steps, per step): the kernels' total ms per
    step (against the step's wall time: how host-bound it is) and lines for the log, where the time goes."""
    times = harness.kernel_times([step], torch.device("cuda"), steps, top=10_000)
    total_ms = sum(us for _, us, _ in times) / 1e3
    lines = [f"GPU kernels, ms per step (of {total_ms:.1f}):"]
    for name, us, n in times[:top]:
        lines.append(f"  {us / 1e3:7.2f}  x{n:<5g} {name[:90]}")
    return total_ms, lines


def cases(providers: list[str], timings: list[str]) -> list[tuple[str, str]]:
    """The (provider, timing) rows to run: ORDER's first, then any others in the given order."""
    wanted = [(p, t) for p in providers for t in timings]
    return sorted(wanted, key=lambda c: ORDER.index(c) if c in ORDER else len(ORDER) + wanted.index(c))


def run(args, device: torch.device, log=print) -> list[dict]:
    """The rows of cases(); once args.deadline (if set) has passed, the rows left are skipped (ms None, a
    note)."""
    rows = []
    for provider, timing in cases(args.providers, args.timings):
        if time.monotonic() > (getattr(args, "deadline", None) or math.inf):
            row = {"op": OP, "provider": provider, "mode": "train", "timing": timing, "ms": None,
                   "note": "skipped: the phase's deadline had passed"}
        else:
            row = measure(provider, args, device, timing)
        rows.append(row)
        log_row(row, log)
    return rows


def log_row(row: dict, log=print) -> None:
    profile = row.pop("profile", [])
    name = f"{row['provider']} {row['timing']}"
    if row["ms"] is None:
        log(f"  {OP} {name}: FAILED {row['note']}")
    else:
        log(f"  {OP} {name}: {row['ms'] / 1e3:.4f} s/step, {row['tok_s']:,.0f} tok/s, "
            f"peak {row.get('peak_gb') or 0:.2f} GB, trainable {row['trainable']:,} {row['adapter_dtype']}, "
            + (f"kernels {row['gpu_ms']:.1f} ms, " if "gpu_ms" in row else "")
            + f"warm-up {row['first_call_s']:.1f} s" + (f", capture {row['capture_s']:.1f} s" if "capture_s" in row
                                                     else "") + (f"  [{row['note']}]" if row.get("note") else ""))
        for line in profile:
            log(line)


def summary(rows: list[dict]) -> list[str]:
    """A line per provider (its timings side by side), and per ptlm provider its speed against PEFT's eager loop
    (the target's yardstick: PEFT as its users run it) and against PEFT's step captured the same way."""
    by = {(r["provider"], r["timing"]): r for r in rows if r["op"] == OP and r.get("ms")}
    lines = [f"PEFT baseline of the design notes (H100): {BASELINE_PEFT_S:.3f} s/step, {BASELINE_PEFT_GB} GB peak"]
    for provider in dict.fromkeys(p for p, _ in by):
        cells = [f"{t:5s} {r['ms'] / 1e3:.4f} s/step {r.get('peak_gb') or 0:6.2f} GB loss {r['loss']:.3f}"
                 for (p, t), r in by.items() if p == provider]
        lines.append(f"{provider:10s} " + " | ".join(cells))
    for provider in dict.fromkeys(p for p, _ in by if p != "peft"):
        cells, memory = [], []
        for (p, timing), r in by.items():
            for base in dict.fromkeys([("peft", "plain"), ("peft", timing)]) if p == provider else ():
                if base in by:
                    speedup = by[base]["ms"] / r["ms"]
                    cells.append(f"{timing} vs PEFT {base[1]} {speedup:.2f}x "
                                 f"{'PASS' if speedup >= TARGET_SPEEDUP else 'FAIL'}")
                    peaks = r.get("peak_gb"), by[base].get("peak_gb")
                    memory.append("n/a" if None in peaks else "PASS" if peaks[0] <= peaks[1] else "FAIL")
        if cells:
            lines.append(f"{provider} (target >= {TARGET_SPEEDUP}x, memory <= PEFT's): " + ", ".join(cells)
                         + f"; memory {'/'.join(memory)}")
    return lines


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--providers", type=lambda s: s.split(","), default=PROVIDERS, help=",".join(PROVIDERS))
    p.add_argument("--timings", type=lambda s: s.split(","), default=TIMINGS,
                   help="plain: the eager loop; graph: the step captured by pe.capture_train_step")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (ptlm autotunes in the first)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (8; smoke: 2)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (1024; smoke: 32)")
    p.add_argument("--rank", type=int, default=RANK)
    p.add_argument("--alpha", type=int, default=ALPHA)
    p.add_argument("--dropout", type=float, default=DROPOUT)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--profile-steps", type=int, default=2,
                   help="after timing, steps under torch.profiler: the GPU time by kernel, in the log (0: none)")
    p.add_argument("--peft-fp32-adapters", action="store_true",
                   help="PEFT's default autocast of bf16 adapters to fp32 (off: adapters stay bf16, as ptlm's)")


def resolve(args) -> None:
    """Fill the sizes that depend on --smoke."""
    args.batch = args.batch or (2 if args.smoke else 8)
    args.seq = args.seq or (32 if args.smoke else 1024)


def main(argv: list[str] | None = None) -> harness.Results:
    p = harness.bench_parser(__doc__, "model_train", harness.MODEL_SMOKE)
    add_arguments(p)
    args = p.parse_args(argv)
    resolve(args)
    return harness.run_model_bench(args, run, summary, OP, TABLE, "model_train")


if __name__ == "__main__":
    main()
