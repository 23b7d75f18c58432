"""The GPU benchmark in one call: every op's grid and the model-level runs, as phases under one time budget.

    python -u -m bench.gpu_suite OUT_DIR [--profile full|session] [--phases lora,multi,...] [--budget-s S]
        [--no-graph] [--gradient-checkpointing] [--tuned FILE]
    PTLM_BACKEND=reference python -m bench.gpu_suite OUT_DIR --smoke      # tiny shapes on CPU

Phases (PHASES, in the default order; `--phases` picks and orders them):
  lora         LoRA layer r=16: 3 layer shapes x T x fwd, fwd+bwd x floor, cuBLAS, eager, PEFT, ptlm; CUDA-graph
               timings too at T <= 4096, where plain launches can be launch-bound      (issue 2)
  model_train  the Llama-shaped training step: HF PEFT, ptlm with the fused base ops, ptlm's LoRA alone; each
               as an eager loop and captured in a CUDA graph (pe.capture_train_step)  (issue 2)
  base_ops     the base model's fused RMSNorm, SiLU-mul, RoPE (and loss) at the step's shapes vs HF eager (issue 2)
  lora_ranks   LoRA layer r=8 and r=64 at T=16 and T=4096                               (issue 2)
  multi        multi-adapter LoRA layer: 32 rank-16 adapters at every T, then the A sweep, Zipf rows, mixed
               ranks, base-only rows; fwd+bwd at large T                                (issue 3)
  grouped      q/k/v and gate/up in one launch, one adapter and a 32-adapter batch      (issue 3)
  bottleneck   the fused bottleneck adapter, one adapter and a 32-adapter batch         (issue 4)
  prefix       prefix attention against SDPA without prefix, shared and per-row prefixes (issue 4)
  model_multi  greedy generation with 32 adapters (eager and CUDA-graph loops), training 4 adapters in one
               batch vs one after another, then PEFT's generation                      (issue 3)
Profiles: "full" runs every phase's whole grid (~15 min on an H100, over one device call's limit: run it as
two calls with --phases); "session" (default) runs each phase's most telling points, ordered so that one
device call of ~7 minutes measures what the open targets ask, most important first (see SESSION below).

Every phase has a deadline: the budget's end minus the reserves of the phases after it, so a slow phase skips
its last cases rather than starving the rest; each phase saves the results so far, so a killed run leaves its
files. Writes OUT_DIR/results.json, results.csv, results.md, results.png and tuned.json (the autotuner's
choices, which `--tuned FILE` or PTLM_TUNED=FILE load in a later run to skip tuning), and prints a summary of
at most 90 lines (under 12,000 characters).
"""
from __future__ import annotations

import argparse
import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from bench import (base_ops, bottleneck, harness, lora, lora_grouped, lora_multi, model_generate,
                   model_multi_train, model_train, prefix_attention, report)
from ptlm_engine.kernels import tuned

# CUDA-graph rows up to this T: plain launches of the TMA prefill path were host-bound up to T = 4096 at 4096x4096
# (2026-11-26: fwd+bwd 1.11 ms plain); T = 16384 (full profile) is GPU-bound.
GRAPH_MAX_T = 4096
EXTRA_RANKS, EXTRA_TOKENS = [8, 64], [16, 4096]
EXTRA_PROVIDERS = ["floor", "cublas", "eager", "ptlm"]

log = functools.partial(print, flush=True)


@dataclass(frozen=True)
class Points:
    """What one profile measures of each layer-level phase."""
    lora_shapes: list
    lora_tokens: list
    multi_tokens: list | None            # None: lora_multi's default grid
    grouped: list
    grouped_tokens: list
    bottleneck: dict
    prefix: dict
    train_providers: list | None = None  # model_train's providers where --providers is left at its default


FULL = Points(lora_shapes=lora.LAYER_SHAPES, lora_tokens=lora.TOKENS, multi_tokens=None,
              grouped=list(lora_grouped.GROUPS), grouped_tokens=lora_grouped.TOKENS,
              bottleneck=dict(dims=bottleneck.DIMS, widths=bottleneck.WIDTHS, tokens=bottleneck.TOKENS,
                              adapters=bottleneck.ADAPTERS),
              prefix=dict(lengths=prefix_attention.LENGTHS, prefixes=prefix_attention.PREFIXES))
# One device call: the decode and prefill ends of every target, the 32-adapter cases, the largest bottleneck T.
SESSION = Points(lora_shapes=[(4096, 4096), (4096, 11008)], lora_tokens=[1, 16, 64, 1024, 4096],
                 multi_tokens=[1, 64, 1024, 4096], grouped=["qkv", "gate_up"], grouped_tokens=[1, 16, 4096],
                 bottleneck=dict(dims=[768, 4096], widths=[64, 256], tokens=[16384], adapters=[1, 32]),
                 prefix=dict(lengths=[2048, 8192], prefixes=[16, 256]),
                 train_providers=["peft", "ptlm_fused"])   # ptlm's LoRA alone: measured 2026-11-26
SMOKE = Points(lora_shapes=lora.SMOKE_SHAPES, lora_tokens=lora.SMOKE_TOKENS, multi_tokens=None,
               grouped=["qkv_gqa"], grouped_tokens=lora_grouped.SMOKE_TOKENS,
               bottleneck=dict(dims=bottleneck.SMOKE_DIMS, widths=bottleneck.SMOKE_WIDTHS,
                               tokens=bottleneck.SMOKE_TOKENS[:1], adapters=bottleneck.SMOKE_ADAPTERS),
               prefix=dict(lengths=prefix_attention.SMOKE["lengths"][:1], prefixes=prefix_attention.SMOKE["prefixes"]))

# name -> seconds the phases before it leave it (session: the default phases' reserves sum to its 400 s budget).
# model_train's first ptlm model tunes every kernel of the step (~100 s on 2026-11-26), then its graph rows.
SESSION_RESERVE_S = {"lora": 75, "multi": 55, "prefix": 45, "bottleneck": 25, "base_ops": 20, "grouped": 20,
                     "model_train": 160, "lora_ranks": 30, "model_multi": 150}
FULL_RESERVE_S = {"lora": 240, "model_train": 150, "base_ops": 60, "lora_ranks": 60, "multi": 180, "grouped": 90,
                  "bottleneck": 120, "prefix": 150, "model_multi": 240}
PHASES = list(FULL_RESERVE_S)
# model_train last: whole-step CUDA graphs run there for the first time on a card, and a device fault in a replay
# would leave the process's CUDA context unusable for every phase after it (each phase's files are saved).
SESSION_PHASES = ["lora", "multi", "prefix", "bottleneck", "base_ops", "grouped", "model_train"]
# phases whose ptlm rows miss their targets by more than launch overhead explains: each kernel's share logged
KERNEL_PHASES = ["lora", "multi", "bottleneck", "prefix"]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="output directory (at most 5 files are written)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes and model on CPU")
    p.add_argument("--profile", choices=["full", "session"], default="session")
    p.add_argument("--phases", type=lambda s: s.split(","), help=f"which phases, in order, of {','.join(PHASES)}")
    p.add_argument("--budget-s", type=float, help="no new case starts after this many seconds (400; full: 1000)")
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph timings")
    p.add_argument("--kernel-phases", type=lambda s: [x for x in s.split(",") if x], default=KERNEL_PHASES,
                   help="phases whose ptlm cases also log each kernel's time per call (torch.profiler, ~0.3 s a "
                        f"case; default {','.join(KERNEL_PHASES)}; '' for none)")
    p.add_argument("--tuned", type=Path, help="autotuner choices of an earlier run (its tuned.json) to start from")
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=50.0)
    model_train.add_arguments(p)
    args = p.parse_args(argv)
    model_train.resolve(args)
    args.phases = args.phases or (SESSION_PHASES if args.profile == "session" and not args.smoke else PHASES)
    unknown = sorted(set(args.phases) - set(PHASES))
    if unknown:
        p.error(f"unknown phases {unknown}; known: {PHASES}")
    args.budget_s = args.budget_s or (400.0 if args.profile == "session" else 1000.0)
    args.points = SMOKE if args.smoke else SESSION if args.profile == "session" else FULL
    args.reserve_s = (dict.fromkeys(PHASES, 0.0) if args.smoke
                      else SESSION_RESERVE_S if args.profile == "session" else FULL_RESERVE_S)
    return args


# ------------------------------------------------------------------------------------------------ the phases
GridPhase = tuple[str, harness.Grid, bool]      # (name, grid, time CUDA graphs too?)


def lora_grids(args, device: torch.device, graph: bool) -> list[GridPhase]:
    pts = args.points

    def grid(tokens):
        return lora.grid(pts.lora_shapes, tokens, [16], lora.PROVIDERS, lora.MODES, device)
    small = [t for t in pts.lora_tokens if t <= GRAPH_MAX_T]
    large = [t for t in pts.lora_tokens if t > GRAPH_MAX_T]
    return [(f"LoRA r=16, T<={GRAPH_MAX_T}", grid(small), graph), (f"LoRA r=16, T>{GRAPH_MAX_T}", grid(large), False)]


def lora_rank_grids(args, device: torch.device, graph: bool) -> list[GridPhase]:
    tokens = args.points.lora_tokens[:1] if args.smoke else EXTRA_TOKENS
    return [("LoRA r=8/64", lora.grid(args.points.lora_shapes, tokens, EXTRA_RANKS, EXTRA_PROVIDERS, lora.MODES,
                                      device), False)]


def multi_grids(args, device: torch.device, graph: bool) -> list[GridPhase]:
    points = lora_multi.points_by_mode(args.smoke, False, lora_multi.MODES)
    if args.points.multi_tokens is not None:          # the session: the 32-adapter core at fewer T, then variants
        shapes, tokens = lora_multi.LAYER_SHAPES, args.points.multi_tokens
        # the adapter sweep at T = 64 too: whether decode's cost over cuBLAS there grows with the adapters (the
        # runs of the expand) or comes with the 64-row tile itself (2026-11-28: 28.3 us at A = 32, 16-19 at T = 16)
        points = {"fwd": lora_multi.default_points(shapes[:1], tokens, [16, 64, 4096], [256]),
                  "fwd+bwd": lora_multi.train_points(shapes[:1], [4096])}
    return lora_multi.phases(points, lora_multi.PROVIDERS, device, graph, lora_multi.layer_dtype(device))


def grouped_grids(args, device: torch.device, graph: bool) -> list[GridPhase]:
    groups = lora_grouped.SMOKE_GROUPS if args.smoke else lora_grouped.GROUPS
    groups = {k: v for k, v in groups.items() if k in args.points.grouped}
    dtype = lora_multi.layer_dtype(device)
    return [("grouped q/k/v, gate/up", lora_grouped.grid(groups, args.points.grouped_tokens, lora_grouped.PROVIDERS,
                                                         ["fwd"], device, dtype), graph)]


def bottleneck_grids(args, device: torch.device, graph: bool) -> list[GridPhase]:
    dtype = lora_multi.layer_dtype(device)
    # CUDA-graph timings too: they tell the GPU time of fwd+bwd from its host time (2026-11-26: ptlm 1.43 ms plain
    # against eager's 0.89, cause unknown)
    return [("bottleneck adapter", bottleneck.grid(**args.points.bottleneck, providers=bottleneck.PROVIDERS,
                                                   modes=bottleneck.MODES, device=device, dtype=dtype), graph)]


def prefix_grids(args, device: torch.device, graph: bool) -> list[GridPhase]:
    sizes = prefix_attention.SMOKE if args.smoke else dict(batch=prefix_attention.BATCH, heads=prefix_attention.HEADS,
                                                           head_dim=prefix_attention.HEAD_DIM)
    sizes = {**sizes, **args.points.prefix}
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    return [("prefix attention", prefix_attention.grid(**sizes, providers=prefix_attention.PROVIDERS,
                                                       modes=prefix_attention.MODES, device=device, dtype=dtype),
             False)]


def base_ops_grids(args, device: torch.device, graph: bool) -> list[GridPhase]:
    shapes = base_ops.SMOKE_SHAPES if args.smoke else base_ops.SHAPES
    providers = [p for p in base_ops.PROVIDERS if p != "compiled"]     # torch.compile's warm-up: tens of seconds
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    return [("base-model ops", base_ops.grid(shapes, providers, base_ops.MODES, device, dtype), graph)]


def model_train_rows(args, device: torch.device, deadline: float) -> list[dict]:
    args.deadline = deadline
    if args.points.train_providers and args.providers == model_train.PROVIDERS:
        args.providers = args.points.train_providers
    return model_train.run(args, device, log)


def model_multi_rows(args, device: torch.device, deadline: float) -> list[dict]:
    """Generation without PEFT, training several adapters, then PEFT's generation, in order of importance."""
    common = ["--out", str(args.out)] + (["--smoke"] if args.smoke else [])
    generate = model_generate.parse_args(common)
    train = model_multi_train.parse_args(common + ["--steps", str(args.steps), "--warmup", str(args.warmup)])
    generate.deadline = train.deadline = deadline
    peft = [p for p in model_generate.PROVIDERS if p.startswith("peft")]
    generate.providers = [p for p in model_generate.PROVIDERS if p not in peft]
    rows = model_generate.run(generate, device, log)
    rows += model_multi_train.run(train, device, log)
    generate.providers = peft
    return rows + model_generate.run(generate, device, log)


GRID_PHASES: dict[str, Callable[..., list[GridPhase]]] = {
    "lora": lora_grids, "lora_ranks": lora_rank_grids, "multi": multi_grids, "grouped": grouped_grids,
    "bottleneck": bottleneck_grids, "prefix": prefix_grids, "base_ops": base_ops_grids}
ROW_PHASES: dict[str, Callable[..., list[dict]]] = {"model_train": model_train_rows, "model_multi": model_multi_rows}
TABLES = {lora.OP: lora.TABLE, model_train.OP: model_train.TABLE, base_ops.OP: base_ops.TABLE,
          lora_multi.OP: lora_multi.TABLE, lora_grouped.OP: lora_grouped.TABLE, bottleneck.OP: bottleneck.TABLE,
          prefix_attention.OP: prefix_attention.TABLE, model_generate.OP: model_generate.TABLE,
          model_multi_train.OP: model_multi_train.TABLE}


def deadlines(phases: list[str], reserve_s: dict[str, float], start: float, budget_s: float) -> dict[str, float]:
    """Each phase stops starting cases when only the reserves of the phases after it are left."""
    out, later = {}, 0.0
    for name in reversed(phases):
        out[name] = start + budget_s - later
        later += reserve_s[name]
    return out


# ------------------------------------------------------------------------------------------------- summary
def target_notes(rows: list[dict]) -> list[str]:
    return (lora.target_checks(rows) + model_train.summary(rows) + lora_multi.target_checks(rows)
            + bottleneck.target_checks(rows) + prefix_attention.target_checks(rows)
            + model_generate.summary(rows) + model_multi_train.summary(rows))


def summary(results: harness.Results, rows: list[dict], skipped: int, out: Path, wall_s: float) -> list[str]:
    m, c = results.meta, results.ceilings
    lines = [f"ptlm_engine GPU suite on {m['card']}: torch {m['torch']}, triton {m['triton']}, "
             f"transformers {m['transformers']}, peft {m['peft']}, ptlm backend {m['ptlm_backend']}",
             f"ceilings: copy {c['copy_GBps'] / 1e3:.2f} TB/s (read+write), {c['gemm_dtype']} GEMM "
             f"{c['gemm_TFLOPs']:.4g} TFLOP/s; autotuner choices from "
             f"{', '.join(Path(f).name for f in m.get('tuned_sources', [])) or 'no file'}", ""]

    def block(part: list[str], title: str | None = None):
        if part:
            lines.extend(([title] if title else []) + part + [""])
    block(lora.compact_table(rows, 16))
    block(lora.ratio_lines(rows, [16], "graph"), "CUDA-graph replay, r=16: ptlm/cuBLAS (fwd) and ptlm/base (fwd+bwd)")
    block(lora.ratio_lines(rows, EXTRA_RANKS, "plain"),
          "Other ranks, plain launches: ptlm/cuBLAS (fwd) and ptlm/base (fwd+bwd)")
    block(lora.target_checks(rows), "Targets:")
    block(model_train.summary(rows))
    block(base_ops.compact_table(rows))
    block(lora_multi.summary(rows))
    grouped = lora_grouped.summary(rows)
    block(grouped if len(grouped) > 1 else [], "Grouped projections, ms")
    block(bottleneck.compact_table(rows) + bottleneck.compact_table(rows, "graph") + bottleneck.target_checks(rows))
    block(prefix_attention.compact_table(rows) + prefix_attention.target_checks(rows))
    block(model_generate.summary(rows) + model_multi_train.summary(rows))
    untimed = [r for r in rows if r.get("ms") is None]
    over_budget = sum(1 for r in untimed if r.get("note") == harness.BUDGET_SKIP_NOTE)
    failed = len(untimed) - over_budget
    lines.append(f"{len(rows)} rows, {failed} failed, {skipped + over_budget} cases skipped for the budget; "
                 f"{wall_s:.0f} s; files in {out}")
    return lines


# ---------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> harness.Results:
    args = parse_args(argv)
    start = time.monotonic()
    device = harness.pick_device(args.smoke)
    if args.tuned:
        log(f"autotuner choices loaded: {tuned.load_tuned(args.tuned)} from {args.tuned}")
    probe = torch.empty(1, device=device, dtype=torch.bfloat16)
    meta = {**harness.environment(device), "ptlm_backend": lora.ptlm_backend(probe), "smoke": args.smoke,
            "profile": args.profile, "phases": args.phases}
    if device.type == "cuda" and meta["ptlm_backend"] != "triton":
        log("WARNING: ptlm_engine would run its PyTorch reference, not Triton: its rows will fail. Install the "
            "package (pip install --no-build-isolation -e .) and leave PTLM_BACKEND unset.")
    log(f"[{time.monotonic() - start:5.0f} s] ceilings")
    ceilings = harness.measure_ceilings(device, args.warmup_ms, args.rep_ms, smoke=args.smoke)
    results = harness.Results(meta, ceilings, [], tables=TABLES)
    rows, skipped = results.rows, 0
    graph = not args.no_graph and device.type == "cuda"

    def save():
        results.meta["wall_s"] = time.monotonic() - start
        results.meta["skipped_cases"] = skipped
        results.meta["tuned_sources"] = tuned.SOURCES.get(meta["card"], [])   # a sibling card's file, say
        results.notes = target_notes(rows)
        harness.save(results, args.out, "results")
        tuned.save_tuned(args.out / "tuned.json", meta["card"])

    phase_deadlines = deadlines(args.phases, args.reserve_s, start, args.budget_s)
    for name in args.phases:
        deadline = phase_deadlines[name]
        log(f"[{time.monotonic() - start:5.0f} s] phase {name} (until {deadline - start:.0f} s); host "
            f"{harness.host_launch_us(device):.1f} us per eager op")
        if name in ROW_PHASES:
            if time.monotonic() < deadline:
                rows.extend(ROW_PHASES[name](args, device, deadline))
            else:
                skipped += 1
        else:
            for title, grid, timed_graph in GRID_PHASES[name](args, device, graph):
                log(f"[{time.monotonic() - start:5.0f} s] {title}: {len(grid.shapes)} shape points")
                opt = harness.RunOptions(device, args.warmup_ms, args.rep_ms, timed_graph, deadline, log,
                                         kernels=name in args.kernel_phases)
                new_rows, n_skipped = harness.run_grid(grid, ceilings, opt)
                rows.extend(new_rows)
                skipped += n_skipped
        save()
    report.plot(results, args.out / "results.png")
    wall_s = time.monotonic() - start
    save()
    log("\n".join(summary(results, rows, skipped, args.out, wall_s)))
    return results


if __name__ == "__main__":
    main()
