"""The benchmark harness every op's benchmark uses: grids, timing, the card's ceilings, result files.

A benchmark is declared Triton-tutorial style as a `Grid`: a list of shapes x providers x modes, a function
that builds the rotating input sets of one shape, and a function that turns (shape, provider, mode, sets)
into one zero-argument call per set. The harness times each case with `triton.testing.do_bench` medians on
CUDA (a plain perf_counter loop on CPU, for the smoke mode), optionally also as CUDA-graph replays, and
derives GB/s, TFLOP/s and the distance to the physical floor from the ceilings measured in the same run.

Rotating input sets: consecutive timed calls cycle through several distinct sets of random inputs (weights
too), together several times the L2 size, so no call finds its operands in L2 left by the previous one — as in
a real model, where the next layer has other weights. do_bench also flushes L2 before each timed call.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import gc
import importlib.metadata
import io
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

# Row columns in the order they are written; ops add their own shape fields between "mode" and "ms".
LEAD_COLUMNS = ["op", "provider", "mode", "timing"]
METRIC_COLUMNS = ["ms", "gbps", "tflops", "floor_ms", "x_floor", "first_call_s", "note"]


# ------------------------------------------------------------------------------------------------ environment
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    """Card, library versions, date and the backend switches, recorded with every result file."""
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return {
        "card": card,
        "device": str(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "ptlm_engine": _version("ptlm_engine"),
        "git_commit": _git_commit(),
        "PTLM_BACKEND": os.environ.get("PTLM_BACKEND"),
        # every kernel switch the run was started with (PTLM_MULTI_SHRINK_PROGRAMS=1, PTLM_PDL=0, ...)
        "ptlm_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("PTLM_")},
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def pick_device(smoke: bool) -> torch.device:
    if smoke:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU, or pass --smoke for the tiny CPU check")
    return torch.device("cuda")


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------- timing
def host_launch_us(device: torch.device, calls: int = 2000) -> float:
    """Host microseconds per eager op on a one-element tensor (an elementwise kernel launch on CUDA): the plain
    rows' host-bound floor. 2026-11-27 every plain row of the H100 suite, cuBLAS's and eager PyTorch's too, ran
    1.5-5x slower than on 2026-11-26 with the same device times; logged per phase so the host's state shows."""
    x = torch.zeros(1, device=device)
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        x.add_(1.0)
    sync(device)
    return (time.perf_counter() - start) / calls * 1e6


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device: torch.device, warmup_ms: float, rep_ms: float) -> float:
    """Median milliseconds of one call of fn (its first call already made by the caller).

    The garbage collector is off while timing: where the host is the bottleneck (small T, plain launches) a
    collection inside the window would show up as device time.
    """
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _time_ms(fn, device, warmup_ms, rep_ms)
    finally:
        if gc_was_enabled:
            gc.enable()


def _time_ms(fn: Callable[[], Any], device: torch.device, warmup_ms: float, rep_ms: float) -> float:
    if device.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    # CPU (smoke mode): the same warmup / repetition budget, each call timed on its own.
    end = time.perf_counter() + warmup_ms / 1e3
    while time.perf_counter() < end:
        fn()
    times = []
    end = time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or time.perf_counter() < end:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def graph_ms(calls: list[Callable[[], Any]], device: torch.device, warmup_ms: float, rep_ms: float,
             min_calls: int = 8) -> float:
    """Median milliseconds per call when at least min_calls calls (cycling the sets) replay as one CUDA graph.

    Small-T numbers outside a graph are bound by host launch cost; this is the number a serving engine that
    captures its decode step would see.
    """
    if device.type != "cuda":
        raise RuntimeError("CUDA graphs need a CUDA device")
    sequence = calls * math.ceil(min_calls / len(calls))
    # Warm up on a side stream before capture, as torch.cuda.graph requires for autograd and allocator state.
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for call in calls:
            call()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in sequence:
            call()
    try:
        return time_ms(graph.replay, device, warmup_ms, rep_ms) / len(sequence)
    finally:
        del graph


def rotation_count(set_bytes: int, device: torch.device, max_sets: int = 16) -> int:
    """How many distinct input sets to cycle so that together they are 4x the L2 size (2 at least), within
    a quarter of the free device memory."""
    if device.type != "cuda":
        return 2
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    free, _ = torch.cuda.mem_get_info(device)
    want = math.ceil(4 * l2 / max(set_bytes, 1))
    fits = max(1, int(0.25 * free // max(set_bytes, 1)))
    return max(1, min(max(2, want), max_sets, fits))


# --------------------------------------------------------------------------------------------------- ceilings
def measure_ceilings(device: torch.device, warmup_ms: float, rep_ms: float, smoke: bool = False) -> dict:
    """The card's device-to-device copy bandwidth (bytes read + written) and bf16 GEMM rate (random data),
    measured in the same run as the benchmarks they bound."""
    copy_elems = (1 << 21) if smoke else (1 << 29)      # 1 GiB of bf16 on the GPU: far beyond any L2
    src = torch.randn(copy_elems, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    dst.copy_(src)
    copy_ms = time_ms(lambda: dst.copy_(src), device, warmup_ms, rep_ms)
    copy_bytes = 2 * src.numel() * src.element_size()
    del src, dst

    n = 256 if smoke else 8192
    gemm_dtype = torch.float32 if device.type == "cpu" else torch.bfloat16  # CPU bf16 GEMMs are emulated
    a = torch.randn(n, n, device=device, dtype=gemm_dtype)
    b = torch.randn(n, n, device=device, dtype=gemm_dtype)
    a @ b
    gemm_ms = time_ms(lambda: a @ b, device, warmup_ms, rep_ms)
    del a, b
    free_memory()
    return {
        "copy_GBps": copy_bytes / copy_ms / 1e6,
        "gemm_TFLOPs": 2 * n ** 3 / gemm_ms / 1e9,
        "copy_bytes": copy_bytes,
        "gemm_n": n,
        "gemm_dtype": str(gemm_dtype).removeprefix("torch."),
    }


def floor_ms(nbytes: float, flops: float, ceilings: dict) -> float:
    """Physical floor: the op can go no faster than moving its bytes or doing its flops at the ceilings."""
    return max(nbytes / (ceilings["copy_GBps"] * 1e6), flops / (ceilings["gemm_TFLOPs"] * 1e9))


# ------------------------------------------------------------------------------------------------------ grids
def add_grid_arguments(p, providers: list[str], modes: list[str]) -> None:
    """The options every layer benchmark's grid takes: which providers and modes, graph timing, do_bench
    warm-up and repetitions (ms), and the time budget."""
    p.add_argument("--providers", type=lambda s: s.split(","), default=providers, help=",".join(providers))
    p.add_argument("--modes", type=lambda s: s.split(","), default=modes, help=",".join(modes))
    p.add_argument("--graph", action="store_true", help="also time CUDA-graph replays")
    p.add_argument("--warmup-ms", type=float, default=10.0)
    p.add_argument("--rep-ms", type=float, default=50.0)
    p.add_argument("--budget-s", type=float, default=math.inf, help="start no new case after this many seconds")


@contextlib.contextmanager
def patched(owner, name: str, value):
    """owner.name set to value while entered (a class's own attribute, or a module's / an object's), then put
    back as it was (deleted if the class only inherited it)."""
    missing = object()
    old = owner.__dict__.get(name, missing) if isinstance(owner, type) else getattr(owner, name, missing)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if old is missing:
            delattr(owner, name)
        else:
            setattr(owner, name, old)


@contextlib.contextmanager
def env_vars(**values: str):
    """Environment variables set while entered, then put back (unset where they were unset)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def with_setting(module, name: str, value, call: Callable[[], Any]) -> Callable[[], Any]:
    """call with module.name set to value while it runs (a kernel switch that one provider flips)."""
    def switched():
        saved = getattr(module, name)
        setattr(module, name, value)
        try:
            return call()
        finally:
            setattr(module, name, saved)
    return switched


def mode_calls(forwards: list[tuple[Callable[[], Any], list, Any]], mode: str) -> list[Callable[[], Any]]:
    """One zero-argument call per input set from (forward, tensors to differentiate, output gradient) triples:
    the forward under no_grad for mode "fwd", else forward plus the gradients of those tensors."""
    calls = []
    for fwd, wrt, dy in forwards:
        if mode == "fwd":
            def call(fwd=fwd):
                with torch.no_grad():
                    return fwd()
        else:
            def call(fwd=fwd, wrt=wrt, dy=dy):
                return torch.autograd.grad(fwd(), wrt, dy)
        calls.append(call)
    return calls


@dataclass
class Grid:
    """shapes x providers x modes of one op.

    make_sets(shape) -> list of input sets (rotated between calls); set_bytes(shape) -> bytes of one set;
    make_calls(shape, provider, mode, sets) -> one zero-argument call per set, or None where the provider does
    not apply; cost(shape, mode) -> (minimal bytes, flops) for the floor. The provider "floor" is not timed:
    its row holds the floor itself.
    """
    op: str
    shapes: list[dict]
    providers: list[str]
    modes: list[str]
    make_sets: Callable[[dict, int], list]
    set_bytes: Callable[[dict], int]
    make_calls: Callable[[dict, str, str, list], list[Callable[[], Any]] | None]
    cost: Callable[[dict, str], tuple[float, float]]


@dataclass
class RunOptions:
    device: torch.device
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    graph: bool = False
    deadline: float = math.inf            # time.monotonic() after which no new case starts
    log: Callable[[str], None] = print
    kernels: bool = False                 # ptlm providers: each kernel's time per call, in the row and the log


def _row(grid: Grid, shape: dict, provider: str, mode: str, timing: str, ms: float | None,
         nbytes: float, flops: float, floor: float, **extra) -> dict:
    ok = ms is not None and ms > 0
    return {"op": grid.op, "provider": provider, "mode": mode, "timing": timing, **shape,
            "ms": ms,
            "gbps": nbytes / ms / 1e6 if ok else None,
            "tflops": flops / ms / 1e9 if ok else None,
            "floor_ms": floor,
            "x_floor": ms / floor if ok else None,
            **extra}


def run_grid(grid: Grid, ceilings: dict, opt: RunOptions) -> tuple[list[dict], int]:
    """Time every case of the grid; returns (rows, number of cases skipped for the time budget).

    A case that fails (out of memory, a provider that cannot be captured) leaves a row with ms=None and the
    error in `note`, and the grid goes on.
    """
    rows: list[dict] = []
    timed = [p for p in grid.providers if p != "floor"]
    per_shape = len(grid.modes) * len(timed) * (2 if opt.graph else 1)
    skipped = 0
    for i, shape in enumerate(grid.shapes):
        if time.monotonic() > opt.deadline:
            skipped += per_shape * (len(grid.shapes) - i)
            break
        n_sets = rotation_count(grid.set_bytes(shape), opt.device)
        try:
            sets = grid.make_sets(shape, n_sets)
        except torch.OutOfMemoryError as e:
            rows.append(_row(grid, shape, "-", "-", "-", None, 0, 0, math.nan, note=f"OOM building inputs: {e}"[:200]))
            free_memory()
            continue
        for mode in grid.modes:
            nbytes, flops = grid.cost(shape, mode)
            floor = floor_ms(nbytes, flops, ceilings)
            if "floor" in grid.providers:
                rows.append(_row(grid, shape, "floor", mode, "floor", floor, nbytes, flops, floor))
            for provider in timed:
                if time.monotonic() > opt.deadline:
                    skipped += 1
                    continue
                rows.extend(_time_case(grid, shape, provider, mode, sets, nbytes, flops, floor, opt))
        del sets
        free_memory()
    return rows, skipped


def _time_case(grid, shape, provider, mode, sets, nbytes, flops, floor, opt: RunOptions) -> list[dict]:
    label = " ".join(f"{k}={v}" for k, v in shape.items())
    rows = []
    calls = None
    try:
        calls = grid.make_calls(shape, provider, mode, sets)
        if calls is None:
            return []
        # First call per shape: autotuning and compilation happen here, outside the timing.
        t0 = time.perf_counter()
        for call in calls:
            call()
        sync(opt.device)
        first_s = time.perf_counter() - t0
        cycle = itertools.cycle(calls)
        ms = time_ms(lambda: next(cycle)(), opt.device, opt.warmup_ms, opt.rep_ms)
        rows.append(_row(grid, shape, provider, mode, "plain", ms, nbytes, flops, floor, first_call_s=first_s))
        opt.log(f"  {grid.op} {label} {mode:8s} {provider:8s} {ms:9.4f} ms  x_floor {ms / floor:6.2f}"
                f"  (first call {first_s:.1f} s)")
        if opt.kernels and provider.startswith("ptlm"):
            times = kernel_times(calls, opt.device)
            rows[-1]["kernels"] = "; ".join(f"{name[:80]} {us:.1f} us x{n:g}" for name, us, n in times)
            opt.log("\n".join(f"      {us:9.1f} us  x{n:<3g} {name[:100]}" for name, us, n in times))
    except Exception as e:  # noqa: BLE001 - any failure of one case is recorded, the grid goes on
        rows.append(_row(grid, shape, provider, mode, "plain", None, nbytes, flops, floor,
                         note=f"{type(e).__name__}: {e}"[:200]))
        opt.log(f"  {grid.op} {label} {mode} {provider}: FAILED {type(e).__name__}: {str(e)[:120]}")
    if opt.graph and calls is not None and rows[-1]["ms"] is not None:
        try:
            ms = graph_ms(calls, opt.device, opt.warmup_ms, opt.rep_ms)
            rows.append(_row(grid, shape, provider, mode, "graph", ms, nbytes, flops, floor))
            opt.log(f"  {grid.op} {label} {mode:8s} {provider:8s} {ms:9.4f} ms  (CUDA graph)")
        except Exception as e:  # noqa: BLE001
            rows.append(_row(grid, shape, provider, mode, "graph", None, nbytes, flops, floor,
                             note=f"{type(e).__name__}: {e}"[:200]))
            opt.log(f"  {grid.op} {label} {mode} {provider} graph: FAILED {type(e).__name__}: {str(e)[:120]}")
    del calls
    if opt.device.type == "cuda" and rows and rows[-1]["ms"] is None:
        free_memory()  # after an OOM, return the cached blocks before the next case
    return rows


def kernel_times(calls: list[Callable[[], Any]], device: torch.device, reps: int = 6,
                 top: int = 8) -> list[tuple[str, float, float]]:
    """(kernel, µs per call, launches per call) of the `top` kernels by device time over `reps` calls
    (torch.profiler; on the CPU the ops' CPU time): where one call's time goes."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for i in range(reps):
            calls[i % len(calls)]()
        sync(device)
    spent = [(e.key, (e.self_device_time_total if cuda else e.self_cpu_time_total) / reps, e.count / reps)
             for e in prof.key_averages()]
    return sorted([s for s in spent if s[1] > 0], key=lambda s: -s[1])[:top]


# ----------------------------------------------------------------------------------------------- result files
@dataclass
class Results:
    """Everything one run produced; `tables` says how markdown pivots each op (see `markdown`)."""
    meta: dict
    ceilings: dict
    rows: list[dict] = field(default_factory=list)
    tables: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"meta": self.meta, "ceilings": self.ceilings, "tables": self.tables, "notes": self.notes,
                "rows": self.rows}

    @classmethod
    def from_json(cls, data: dict) -> "Results":
        return cls(data["meta"], data["ceilings"], data["rows"], data.get("tables", {}), data.get("notes", []))


def table_spec(keys: list[str], values: list[str] = ("ms",), ratios: list[tuple] = ()) -> dict:
    """How to pivot one op: one line per distinct `keys` (+ mode, timing), one column per provider and value,
    and ratio columns (numerator provider, denominator provider, value)."""
    return {"keys": list(keys), "values": list(values), "ratios": [list(r) for r in ratios]}


def columns(rows: list[dict]) -> list[str]:
    seen = dict.fromkeys(LEAD_COLUMNS)
    for row in rows:
        seen.update(dict.fromkeys(k for k in row if k not in METRIC_COLUMNS))
    seen.update(dict.fromkeys(METRIC_COLUMNS))
    return list(seen)


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 0.1 else f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def pivot(rows: list[dict], op: str, spec: dict) -> tuple[list[str], list[list[Any]]]:
    """Providers side by side: (header, lines) for one op."""
    rows = [r for r in rows if r["op"] == op and r["provider"] != "-"]
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    keys = spec["keys"] + ["mode", "timing"]
    cells: dict[tuple, dict] = {}
    for r in rows:
        timing = "plain" if r["timing"] == "floor" else r["timing"]
        line = tuple(r.get(k) if k != "timing" else timing for k in keys)
        cells.setdefault(line, {})[r["provider"]] = r
    # The floor applies to every timing; copy it into the graph lines.
    for line, by_provider in cells.items():
        if "floor" in providers and "floor" not in by_provider:
            plain = cells.get(line[:-1] + ("plain",), {})
            if "floor" in plain:
                by_provider["floor"] = plain["floor"]
    values = spec["values"]
    header = keys + [f"{p} {v}" if len(values) > 1 else p for p in providers for v in values
                     if not (p == "floor" and v != "ms")]
    header += [f"{n}/{d}" + (f" {v}" if v != "ms" else "") for n, d, v in spec["ratios"]]
    lines = []
    for line, by_provider in cells.items():
        out = list(line)
        out += [by_provider.get(p, {}).get(v) for p in providers for v in values if not (p == "floor" and v != "ms")]
        for n, d, v in spec["ratios"]:
            num, den = by_provider.get(n, {}).get(v), by_provider.get(d, {}).get(v)
            out.append(num / den if num is not None and den else None)
        lines.append(out)
    return header, lines


def markdown(results: Results) -> str:
    m, c = results.meta, results.ceilings
    out = [f"# Benchmarks on {m.get('card')}", "",
           f"torch {m.get('torch')} (CUDA {m.get('cuda')}), triton {m.get('triton')}, "
           f"transformers {m.get('transformers')}, peft {m.get('peft')}, ptlm_engine {m.get('ptlm_engine')} "
           f"(commit {m.get('git_commit')}), {m.get('date')}.", ""]
    if c:
        out += [f"Ceilings measured in this run: copy {c['copy_GBps'] / 1e3:.2f} TB/s (read+write), "
                f"{c['gemm_dtype']} GEMM {c['gemm_TFLOPs']:.4g} TFLOP/s ({c['gemm_n']}³, random data).", ""]
    out += ["Times are medians in milliseconds; `plain` = separate launches (do_bench), `graph` = per call when "
            "replayed in a CUDA graph.", ""]
    for op, spec in results.tables.items():
        header, lines = pivot(results.rows, op, spec)
        if not lines:
            continue
        out += [f"## {op}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(_fmt(v) for v in line) + " |" for line in lines]
        out.append("")
    failed = [r for r in results.rows if r.get("ms") is None]
    if failed:
        out += ["## Failed cases", ""]
        out += [f"- {r['op']} {r['provider']} {r['mode']} "
                + " ".join(f"{k}={r[k]}" for k in results.tables.get(r["op"], {}).get("keys", []) if k in r)
                + f": {r.get('note')}" for r in failed]
        out.append("")
    if results.notes:
        out += ["## Notes", ""] + [f"- {n}" for n in results.notes] + [""]
    return "\n".join(out)


def provider_row(row: dict, fill: Callable[[], Any]) -> Any:
    """fill() builds, warms up and times one provider into `row`, and returns what the caller keeps; a failure
    leaves the row with ms None and the error in its note (and returns None). What fill built is gone with its
    frame before the memory is freed for the next provider."""
    try:
        return fill()
    except Exception as e:  # noqa: BLE001 - a failing provider leaves a row with its error
        row["ms"] = None
        row["note"] = f"{type(e).__name__}: {e}"[:300]
        return None
    finally:
        free_memory()


LAYER_SMOKE = "tiny shapes on CPU (set PTLM_BACKEND=reference)"
# A model-level row that a run's deadline left untimed (ms None): counted as skipped, not as failed.
BUDGET_SKIP_NOTE = "skipped for the time budget"
MODEL_SMOKE = "tiny decoder on CPU"


def bench_parser(doc: str, stem: str, smoke_help: str) -> argparse.ArgumentParser:
    """A bench script's parser with the arguments every script takes: --out (the directory for <stem>.json / .csv
    / .md) and --smoke (what it runs instead: LAYER_SMOKE or MODEL_SMOKE)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help=f"directory for {stem}.json / .csv / .md")
    p.add_argument("--smoke", action="store_true", help=smoke_help)
    return p


def run_layer_bench(args, start: float, device: torch.device, phases: list[tuple[str | None, Grid, bool]], op: str,
                    table: dict, stem: str, backend: str, report: Callable[[Results], list[str]],
                    checks: Callable[[list[dict]], list[str]] | None = None, **meta: Any) -> Results:
    """A layer bench's main once its grids are built: the device's ceilings, each phase (name, grid, timed in a
    CUDA graph too) run until args.budget_s after `start` (a named phase announced first), <stem>.json/.csv/.md
    saved under args.out with the environment, ptlm's `backend` and `meta`, checks(rows) as the notes, then
    report(results)'s lines and a closing count printed."""
    ceilings = measure_ceilings(device, args.warmup_ms, args.rep_ms, smoke=args.smoke)
    info = {**environment(device), "ptlm_backend": backend, "smoke": args.smoke, **meta}
    rows, skipped = [], 0
    for name, grid, graph in phases:
        if name is not None:
            print(f"[{time.monotonic() - start:5.0f} s] {name}: {len(grid.shapes)} points", flush=True)
        opt = RunOptions(device, args.warmup_ms, args.rep_ms, graph, deadline=start + args.budget_s)
        new_rows, n_skipped = run_grid(grid, ceilings, opt)
        rows += new_rows
        skipped += n_skipped
    info.update(skipped_cases=skipped, wall_s=time.monotonic() - start)
    results = Results(info, ceilings, rows, tables={op: table}, notes=checks(rows) if checks else [])
    save(results, args.out, stem)
    print("\n".join(report(results)))
    print(f"{len(rows)} rows, {skipped} cases skipped for the time budget, {info['wall_s']:.0f} s -> {args.out}")
    return results


def run_model_bench(args, run: Callable, summary: Callable, op: str, table: dict, stem: str,
                    **meta: Any) -> Results:
    """A model-level script's main: run its rows on the chosen device, save `stem`.json/.csv/.md under
    args.out with the environment (and `meta`), print the summary lines."""
    start = time.monotonic()
    device = pick_device(args.smoke)
    info = {**environment(device), "smoke": args.smoke, **meta}
    rows = run(args, device)
    info["wall_s"] = time.monotonic() - start
    results = Results(info, {}, rows, tables={op: table}, notes=summary(rows))
    save(results, args.out, stem)
    print("\n".join(results.notes))
    return results


def save(results: Results, out_dir: Path, stem: str) -> list[Path]:
    """Write <stem>.json (everything), <stem>.csv (one line per row) and <stem>.md (pivot tables)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.csv", out_dir / f"{stem}.md"]
    paths[0].write_text(json.dumps(results.to_json(), indent=1, default=str))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns(results.rows), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(results.rows)
    paths[1].write_text(buf.getvalue())
    paths[2].write_text(markdown(results))
    return paths
