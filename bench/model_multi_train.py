"""Training several adapters at once: one mixed-batch step against one step per adapter, on the Llama-shaped decoder.

The decoder and LoRA of bench/model_train.py (r=16, alpha=32, dropout 0.05 on q, k, v, o, gate, up, down) with
4 ptlm adapters, batch 8 x 1024 random tokens split over them (2 rows each), causal-LM loss, one AdamW over all
4 adapters' parameters. Providers:

  ptlm_mixed       one step on the whole batch inside `pe.adapter_batch(model, names)` (each row its adapter;
                   the block is entered per step, as a trainer with a new mapping per batch would)
  ptlm_sequential  the 4 adapters one after another: `pe.set_active_adapter`, then a step on its 2 rows

Timings: `plain`, the eager loops above; `graph` (ptlm_mixed only), the mixed step captured in one CUDA graph by
pe.capture_train_step inside one `pe.adapter_batch` block (its mapping fixed for the block, as a captured step
needs) and replayed.

Per row: median seconds per step (the 8 rows: the 4 sub-steps together for ptlm_sequential), each between
two device synchronizations, after warm-up steps (ptlm's kernels autotune in the first), tokens/s, and the peak
memory (reset after the warm-up: steady state, optimizer state in place; model_train.time_steps: a graph row's
is the memory reserved).

    python -m bench.model_multi_train --out DIR [--providers ptlm_mixed,ptlm_sequential] [--timings plain,graph]
        [--steps 5]
    python -m bench.model_multi_train --smoke --out DIR      # a tiny decoder on CPU
"""
from __future__ import annotations

import argparse
import time

import torch

from bench import harness, model_train

OP = "llama_multi_train_step"
PROVIDERS = ["ptlm_mixed", "ptlm_sequential"]
TIMINGS = ["plain", "graph"]
ADAPTERS = 4

TABLE = harness.table_spec(keys=["layers", "hidden", "batch", "seq", "r", "adapters"], values=["tok_s", "peak_gb"],
                           ratios=[("ptlm_mixed", "ptlm_sequential", "tok_s"),
                                   ("ptlm_mixed", "ptlm_sequential", "peak_gb")])


def measure(provider: str, args, device: torch.device, timing: str = "plain") -> dict:
    """One row: a fresh model with the adapters, warm-up steps (graph: the capture), timed steps, all freed."""
    import ptlm_engine as pe
    config = model_train.llama_config(args.smoke)
    row = {"op": OP, "provider": provider, "mode": "train", "timing": timing, "layers": config.num_hidden_layers,
           "hidden": config.hidden_size, "batch": args.batch, "seq": args.seq, "r": args.rank,
           "adapters": args.adapters}

    def fill() -> None:
        model = model_train.build_model(config, device, torch.bfloat16)
        expected = args.adapters * model_train.expected_lora_params(model, args.rank)
        names = [f"a{i}" for i in range(args.adapters)]
        for name in names:
            pe.add_adapter(model, name, pe.LoraConfig(r=args.rank, alpha=args.alpha, dropout=args.dropout,
                                                      target_modules=model_train.TARGET_MODULES))
        params = [p for name, p in model.named_parameters() if ".lora_" in name]
        row["trainable"] = sum(p.numel() for p in params)
        if row["trainable"] != expected:
            row["note"] = f"LoRA params {row['trainable']} != expected {expected}"
        opt = torch.optim.AdamW(params, lr=1e-4)
        gen = torch.Generator(device="cpu").manual_seed(1)
        ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen).to(device)
        rows_per_adapter = args.batch // args.adapters
        row_names = [names[i // rows_per_adapter] for i in range(args.batch)]

        def train_on(batch_ids: torch.Tensor) -> torch.Tensor:
            loss = model(input_ids=batch_ids, labels=batch_ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        def step() -> torch.Tensor:
            if provider == "ptlm_mixed":
                with pe.adapter_batch(model, row_names):
                    return train_on(ids)
            losses = []
            for i, name in enumerate(names):
                pe.set_active_adapter(model, name)
                losses.append(train_on(ids[i * rows_per_adapter:(i + 1) * rows_per_adapter]))
            return torch.stack(losses).mean()

        if timing == "plain":
            model_train.time_steps(step, row, args, device)
            return
        with pe.adapter_batch(model, row_names):     # one block: the captured step keeps its mapping
            model_train.time_steps(model_train.captured_step(model, opt, ids, row, args, device), row, args, device)

    harness.provider_row(row, fill)
    return row


def cases(providers: list[str], timings: list[str]) -> list[tuple[str, str]]:
    """(provider, timing) rows: every provider eagerly, then the graph row of ptlm_mixed."""
    return ([(p, "plain") for p in providers if "plain" in timings]
            + [(p, "graph") for p in providers if "graph" in timings and p == "ptlm_mixed"])


def run(args, device: torch.device, log=print) -> list[dict]:
    rows = []
    for provider, timing in cases(args.providers, args.timings):
        name = provider if timing == "plain" else f"{provider} (graph)"
        if time.monotonic() > args.deadline:
            rows.append({"op": OP, "provider": provider, "mode": "train", "timing": timing, "batch": args.batch,
                         "seq": args.seq, "r": args.rank, "adapters": args.adapters, "ms": None,
                         "note": harness.BUDGET_SKIP_NOTE})
        else:
            rows.append(measure(provider, args, device, timing))
        r = rows[-1]
        if r["ms"] is None:
            log(f"  {OP} {name}: not timed: {r['note']}")
        else:
            log(f"  {OP} {name:23s} {r['ms'] / 1e3:.4f} s/step, {r['tok_s']:,.0f} tok/s, peak "
                f"{r.get('peak_gb') or 0:.2f} GB, loss {r['loss']:.3f}, warm-up {r['first_call_s']:.1f} s"
                + (f"  [{r['note']}]" if r.get("note") else ""))
    return rows


def summary(rows: list[dict]) -> list[str]:
    rows = [r for r in rows if r["op"] == OP]
    if not rows:
        return []
    r0 = rows[0]
    by = {r["provider"]: r for r in rows if r.get("ms") and r["timing"] == "plain"}
    graph = next((r for r in rows if r.get("ms") and r["timing"] == "graph"), None)
    cells = [f"{p} {r['ms'] / 1e3:.4f} s/step {r['tok_s']:,.0f} tok/s peak {r.get('peak_gb') or 0:.2f} GB "
             f"loss {r['loss']:.3f}" for p, r in by.items()]
    lines = [f"Training {r0['adapters']} adapters, batch {r0['batch']} x {r0['seq']} "
             f"({r0['batch'] // r0['adapters']} rows each), r={r0['r']}: " + "; ".join(cells)]
    if "ptlm_mixed" in by and "ptlm_sequential" in by:
        mixed, seq = by["ptlm_mixed"], by["ptlm_sequential"]
        peaks = mixed.get("peak_gb"), seq.get("peak_gb")
        memory = "" if None in peaks else f", {peaks[0] / peaks[1]:.2f}x the peak memory"
        lines.append(f"  ptlm_mixed/ptlm_sequential: {mixed['tok_s'] / seq['tok_s']:.2f}x the tokens/s{memory}")
    if graph is not None:
        against = [f"{graph['tok_s'] / r['tok_s']:.2f}x {p}'s" for p, r in by.items()]
        lines.append(f"  ptlm_mixed captured in a CUDA graph: {graph['ms'] / 1e3:.4f} s/step, {graph['tok_s']:,.0f} "
                     f"tok/s ({', '.join(against)} tokens/s), peak (reserved) {graph.get('peak_gb') or 0:.2f} GB")
    failed = [f"{r['provider']} {r['note'][:100]}" for r in rows if not r.get("ms")]
    if failed:
        lines.append("  not timed: " + "; ".join(failed))
    return lines


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--providers", type=lambda s: s.split(","), default=PROVIDERS, help=",".join(PROVIDERS))
    p.add_argument("--timings", type=lambda s: s.split(","), default=TIMINGS,
                   help="plain: eager loops; graph: ptlm_mixed captured by pe.capture_train_step")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (ptlm autotunes in the first)")
    p.add_argument("--adapters", type=int, default=ADAPTERS)
    p.add_argument("--batch", type=int, default=8, help="sequences per step, split evenly over the adapters")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (1024; smoke: 16)")
    p.add_argument("--rank", type=int, default=model_train.RANK)
    p.add_argument("--alpha", type=int, default=model_train.ALPHA)
    p.add_argument("--dropout", type=float, default=model_train.DROPOUT)
    p.add_argument("--budget-s", type=float, default=120.0, help="no new provider starts after this many seconds")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = harness.bench_parser(__doc__, "model_multi_train", harness.MODEL_SMOKE)
    add_arguments(p)
    args = p.parse_args(argv)
    args.seq = args.seq or (16 if args.smoke else 1024)
    if args.batch % args.adapters:
        p.error(f"--batch {args.batch} does not split evenly over {args.adapters} adapters")
    unknown = set(args.providers) - set(PROVIDERS)
    if unknown:
        p.error(f"unknown providers: {sorted(unknown)}")
    args.deadline = time.monotonic() + args.budget_s
    return args


def main(argv: list[str] | None = None) -> harness.Results:
    args = parse_args(argv)
    return harness.run_model_bench(args, run, summary, OP, TABLE, "model_multi_train")


if __name__ == "__main__":
    main()
