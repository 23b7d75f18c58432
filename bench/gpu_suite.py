"""The whole GPU benchmark in one call: about 420 s on an H100 (half of it ptlm's autotuning), 520 s at most.

    python -u -m bench.gpu_suite OUT_DIR [--budget-s 520] [--no-graph] [--no-model] [--no-multi]
        [--no-model-multi] [--gradient-checkpointing]
    PTLM_BACKEND=reference python -m bench.gpu_suite OUT_DIR --smoke      # tiny shapes on CPU

Phases, in order of importance; each one saves the results so far, so even a killed run leaves its files:
  1. the card's ceilings (copy bandwidth, bf16 GEMM)
  2. LoRA layer, r=16: the three layer shapes x all T x fwd, fwd+bwd x floor, cuBLAS, eager, PEFT, ptlm;
     CUDA-graph timings too at T <= 256, where plain launches are launch-bound
  3. the model training step: HF PEFT, then ptlm
  4. LoRA layer, r=8 and r=64 at T=16 and T=4096: floor, cuBLAS, eager, ptlm
  5. multi-adapter LoRA layer, bench/lora_multi.py's default grid: 32 rank-16 adapters at every T on both
     layers, then A = 1, 4, 128, Zipf rows, mixed ranks and 50% base-only rows on 4096x4096, fwd, and fwd+bwd
     at T = 256 and 4096; CUDA-graph timings too at every T (PEFT's mixed batch, plain only, A <= 32, T <= 1024)
  6. the model with many adapters: greedy generation (bench/model_generate.py: base and ptlm's one-adapter and
     32-adapter mixed batch, eager and CUDA-graph loops), training 4 adapters in one mixed batch against one
     after another (bench/model_multi_train.py), then PEFT's one-adapter and mixed-batch generation
Phase 2 stops starting new cases when only --model-reserve-s + --multi-reserve-s + --model-multi-reserve-s of
the budget are left, phase 4 when --multi-reserve-s + --model-multi-reserve-s are left, phase 5 when
--model-multi-reserve-s are left; phase 6 uses what remains (rows it has no time for say so).

Writes OUT_DIR/results.json, results.csv, results.md and results.png (4 files) and prints a summary of at
most 90 lines (under 12,000 characters).
"""
from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import torch

from bench import harness, lora, lora_multi, model_generate, model_multi_train, model_train, report

GRAPH_MAX_T = 256
EXTRA_RANKS, EXTRA_TOKENS = [8, 64], [16, 4096]
EXTRA_PROVIDERS = ["floor", "cublas", "eager", "ptlm"]

log = functools.partial(print, flush=True)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="output directory (at most 4 files are written)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes and model on CPU")
    p.add_argument("--budget-s", type=float, default=520.0, help="no new case starts after this many seconds")
    p.add_argument("--model-reserve-s", type=float, default=150.0, help="seconds phase 2 leaves for phase 3")
    p.add_argument("--multi-reserve-s", type=float, default=120.0, help="seconds phases 2-4 leave for phase 5")
    p.add_argument("--model-multi-reserve-s", type=float, default=120.0, help="seconds phases 2-5 leave for phase 6")
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph timings")
    p.add_argument("--no-model", action="store_true", help="skip the model training step")
    p.add_argument("--no-multi", action="store_true", help="skip the multi-adapter layer")
    p.add_argument("--no-model-multi", action="store_true",
                   help="skip the model with many adapters (generation, mixed-batch training)")
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=50.0)
    model_train.add_arguments(p)
    args = p.parse_args(argv)
    model_train.resolve(args)
    return args


def lora_phases(args, device: torch.device, start: float):
    """(name, grid, graph timings?, deadline) for phases 2 and 4."""
    shapes = lora.SMOKE_SHAPES if args.smoke else lora.LAYER_SHAPES
    tokens = lora.SMOKE_TOKENS if args.smoke else lora.TOKENS
    extra_tokens = tokens[:1] if args.smoke else EXTRA_TOKENS
    graph = not args.no_graph and device.type == "cuda"
    extra_deadline = multi_deadline(args, start) - (0 if args.no_multi else args.multi_reserve_s)
    main_deadline = extra_deadline - (0 if args.no_model else args.model_reserve_s)

    def grid(ranks, tok, providers):
        return lora.grid(shapes, tok, ranks, providers, lora.MODES, device)
    small = [t for t in tokens if t <= GRAPH_MAX_T]
    large = [t for t in tokens if t > GRAPH_MAX_T]
    main = [("LoRA r=16, T<=256", grid([16], small, lora.PROVIDERS), graph, main_deadline),
            ("LoRA r=16, T>256", grid([16], large, lora.PROVIDERS), False, main_deadline)]
    extra = [("LoRA r=8/64", grid(EXTRA_RANKS, extra_tokens, EXTRA_PROVIDERS), False, extra_deadline)]
    return main, extra


def multi_deadline(args, start: float) -> float:
    """When phase 5 stops starting cases: phase 6's reserve before the end of the budget."""
    return start + args.budget_s - (0 if args.no_model_multi else args.model_multi_reserve_s)


def model_multi_phase(args, device: torch.device, start: float, log) -> list[dict]:
    """Phase 6, in order of importance: generation without PEFT, training several adapters, PEFT's generation."""
    common = ["--out", str(args.out)] + (["--smoke"] if args.smoke else [])
    generate = model_generate.parse_args(common)
    train = model_multi_train.parse_args(common + ["--steps", str(args.steps), "--warmup", str(args.warmup)])
    generate.deadline = train.deadline = start + args.budget_s
    peft = [p for p in model_generate.PROVIDERS if p.startswith("peft")]
    generate.providers = [p for p in model_generate.PROVIDERS if p not in peft]
    rows = model_generate.run(generate, device, log)
    rows += model_multi_train.run(train, device, log)
    generate.providers = peft
    return rows + model_generate.run(generate, device, log)


def multi_phases(args, device: torch.device, start: float):
    """(name, grid, graph timings?, deadline) for phase 5."""
    graph = not args.no_graph and device.type == "cuda"
    points = lora_multi.points_by_mode(args.smoke, False, lora_multi.MODES)
    return [(name, grid, timed_graph, multi_deadline(args, start)) for name, grid, timed_graph in
            lora_multi.phases(points, lora_multi.PROVIDERS, device, graph, lora_multi.layer_dtype(device))]


def summary(results: harness.Results, rows: list[dict], skipped: int, out: Path, wall_s: float) -> list[str]:
    m, c = results.meta, results.ceilings
    lines = [f"ptlm_engine GPU suite on {m['card']}: torch {m['torch']}, triton {m['triton']}, "
             f"transformers {m['transformers']}, peft {m['peft']}, ptlm backend {m['ptlm_backend']}",
             f"ceilings: copy {c['copy_GBps'] / 1e3:.2f} TB/s (read+write), {c['gemm_dtype']} GEMM "
             f"{c['gemm_TFLOPs']:.4g} TFLOP/s", ""]
    lines += lora.compact_table(rows, 16) + [""]
    graph_lines = lora.ratio_lines(rows, [16], "graph")
    if graph_lines:
        lines += ["CUDA-graph replay, r=16: ptlm/cuBLAS (fwd) and ptlm/base (fwd+bwd)"] + graph_lines + [""]
    extra_lines = lora.ratio_lines(rows, EXTRA_RANKS, "plain")
    if extra_lines:
        lines += ["Other ranks, plain launches: ptlm/cuBLAS (fwd) and ptlm/base (fwd+bwd)"] + extra_lines + [""]
    lines += ["Targets:"] + lora.target_checks(rows) + [""]
    lines += model_train.summary(rows) + [""]
    multi_lines = lora_multi.summary(rows)
    if multi_lines:
        lines += multi_lines + [""]
    model_multi_lines = model_generate.summary(rows) + model_multi_train.summary(rows)
    if model_multi_lines:
        lines += model_multi_lines + [""]
    failed = sum(1 for r in rows if r.get("ms") is None)
    lines.append(f"{len(rows)} rows, {failed} failed, {skipped} cases skipped for the budget; {wall_s:.0f} s; "
                 f"files in {out}")
    return lines


def main(argv: list[str] | None = None) -> harness.Results:
    args = parse_args(argv)
    start = time.monotonic()
    device = harness.pick_device(args.smoke)
    probe = torch.empty(1, device=device, dtype=torch.bfloat16)
    meta = {**harness.environment(device), "ptlm_backend": lora.ptlm_backend(probe), "smoke": args.smoke}
    if device.type == "cuda" and meta["ptlm_backend"] != "triton":
        log("WARNING: ptlm_engine would run its PyTorch reference, not Triton: its rows will fail. Install the "
            "package (pip install --no-build-isolation -e .) and leave PTLM_BACKEND unset.")
    log(f"[{time.monotonic() - start:5.0f} s] ceilings")
    ceilings = harness.measure_ceilings(device, args.warmup_ms, args.rep_ms, smoke=args.smoke)
    results = harness.Results(meta, ceilings, [], tables={lora.OP: lora.TABLE, model_train.OP: model_train.TABLE,
                                                          lora_multi.OP: lora_multi.TABLE,
                                                          model_generate.OP: model_generate.TABLE,
                                                          model_multi_train.OP: model_multi_train.TABLE})
    rows, skipped = results.rows, 0

    def save():
        results.meta["wall_s"] = time.monotonic() - start
        results.meta["skipped_cases"] = skipped
        results.notes = (lora.target_checks(rows) + model_train.summary(rows) + lora_multi.target_checks(rows)
                         + model_generate.summary(rows) + model_multi_train.summary(rows))
        harness.save(results, args.out, "results")

    def run_lora(phases):
        nonlocal skipped
        for name, grid, graph, deadline in phases:
            log(f"[{time.monotonic() - start:5.0f} s] {name}: {len(grid.shapes)} shape points")
            opt = harness.RunOptions(device, args.warmup_ms, args.rep_ms, graph, deadline, log)
            new_rows, n_skipped = harness.run_grid(grid, ceilings, opt)
            rows.extend(new_rows)
            skipped += n_skipped
            save()

    main_phases, extra_phases = lora_phases(args, device, start)
    run_lora(main_phases)
    if not args.no_model:
        log(f"[{time.monotonic() - start:5.0f} s] model training step")
        rows.extend(model_train.run(args, device, log))
        save()
    run_lora(extra_phases)
    if not args.no_multi:
        run_lora(multi_phases(args, device, start))
    if not args.no_model_multi:
        log(f"[{time.monotonic() - start:5.0f} s] model with many adapters: generation, mixed-batch training")
        rows.extend(model_multi_phase(args, device, start, log))
        save()
    report.plot(results, args.out / "results.png")
    wall_s = time.monotonic() - start
    save()
    log("\n".join(summary(results, rows, skipped, args.out, wall_s)))
    return results


if __name__ == "__main__":
    main()
