"""Bottleneck adapter benchmark: y = h + s·(act(h Wdᵀ + bd) Wuᵀ + bu), providers side by side.

A case is (d, m, T, adapters): adapters = 1 is one adapter of width m on every token; adapters = 32 a mixed
batch, every token on one of 32 adapters of width m (T/32 rows each, in a seeded random order), through the
multi-adapter op, which gets the batch's token segments as a model's layers do (computed once per batch, not per
layer call: until 2026-11-26 every timed call sorted the 16384 tokens again).

Providers ("fwd" runs under torch.no_grad, "fwd+bwd" also takes the gradients of h and of the adapter weights
and biases with torch.autograd.grad against a random dy, so nothing accumulates into .grad):
  eager       h + s·F.linear(act(F.linear(h, Wd, bd)), Wu, bu) in plain PyTorch (one adapter)
  ptlm        ptlm_engine.functional.bottleneck_adapter (one adapter) or bottleneck_adapter_multi (mixed batch)
  ptlm_multi  bottleneck_adapter_multi with every token on slot 0 (one adapter): the multi kernels' own cost
  ptlm_wide   fwd+bwd: ptlm with the wide backward at every width (kernels.bottleneck.WIDE_M_PAD lowered to
              16: weight gradients and dh in separate kernels, one adapter or the mixed batch's), beside ptlm's
              fused gradient kernel where it keeps it (m < 128; one adapter also m = 64 at d >= 2048)
  ptlm_split  one adapter: ptlm with the split forward at every width (kernels.bottleneck.SPLIT_FORWARD_M_PAD
              lowered to 16: z = h Wd^T + bd in its own GEMM, then y from the stored z), beside ptlm's fused
              forward kernel where it keeps it (m < 256)
  floor       not timed: max(bytes / copy bandwidth, flops / GEMM peak) with the ceilings of the same run

Floor (b = bytes per element, A adapters used, Houlsby placement: no separate residual):
  fwd      bytes = b·(2·T·d + A·2·m·d)                 h read, y written, the adapters' weights read
           flops = 4·T·d·m
  fwd+bwd  bytes = b·(5·T·d + A·6·m·d)                 backward: dy and h read, dh written; weights read,
           flops = 12·T·d·m                            their gradients written; da, dh, dWu, dWd: 8·T·d·m
The m-wide intermediates (z saved, a and dz in backward: ≤ 3·T·m) are left out: under 2% at m ≤ 64, d = 4096.
Target (the project brief): ptlm fwd at ≥ 80% of the floor's bandwidth (ptlm/floor ≤ 1.25). The design notes'
eager baseline (T = 16384, bf16, relu): d = 768 0.075 ms fwd (22% of the floor), d = 4096 0.256 ms (35%).

    python -m bench.bottleneck --out DIR [--graph] [--dims 768,4096] [--widths 16,64,256] [--tokens 1024,16384] \\
        [--adapters 1,32] [--act relu] [--providers ...] [--modes fwd,fwd+bwd] [--budget-s 300]
    python -m bench.bottleneck --smoke --out DIR        # tiny shapes on CPU (PTLM_BACKEND=reference)
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench import harness
from bench.lora import parse_ints, ptlm_backend
from ptlm_engine.functional import BOTTLENECK_ACT_CODES, BottleneckSlots, token_segments

OP = "bottleneck_adapter"
DIMS = [768, 4096]
WIDTHS = [16, 64, 256]
TOKENS = [1024, 4096, 16384]
ADAPTERS = [1, 32]
PROVIDERS = ["floor", "eager", "ptlm", "ptlm_multi", "ptlm_wide", "ptlm_split"]
MODES = ["fwd", "fwd+bwd"]
SCALE = 2.0
SEED = 0

SMOKE_DIMS, SMOKE_WIDTHS, SMOKE_TOKENS, SMOKE_ADAPTERS = [64], [8], [16, 64], [1, 4]

KEYS = ["d", "m", "T", "adapters"]
TABLE = harness.table_spec(keys=KEYS, ratios=[("ptlm", "eager", "ms"), ("ptlm", "floor", "ms"),
                                              ("ptlm_multi", "ptlm", "ms"), ("ptlm_wide", "ptlm", "ms"),
                                              ("ptlm_split", "ptlm", "ms")])
TARGET = 1.25  # ptlm / floor: at least 80% of the floor's bandwidth


# ------------------------------------------------------------------------------------------------ the grid
def cost(shape: dict, mode: str, elem_bytes: int = 2) -> tuple[float, float]:
    d, m, t = shape["d"], shape["m"], shape["T"]
    used = min(shape["adapters"], t)
    if mode == "fwd":
        return elem_bytes * (2 * t * d + used * 2 * m * d), 4 * t * d * m
    return elem_bytes * (5 * t * d + used * 6 * m * d), 12 * t * d * m


def row_slots(shape: dict) -> torch.Tensor:
    """(T,) int32 on the CPU: each token's adapter, T/A rows each in a seeded random order; fixed per case."""
    g = torch.Generator().manual_seed(SEED)
    t = shape["T"]
    return (torch.arange(t) % shape["adapters"])[torch.randperm(t, generator=g)].to(torch.int32)


@dataclass
class AdapterSet:
    """One rotating set of inputs: random, never zero."""
    h: torch.Tensor                 # (T, d), requires grad
    slots: BottleneckSlots          # (A, m, d) ... stacked adapters; weights and biases require grad
    index: torch.Tensor             # (T,) int32
    dy: torch.Tensor                # (T, d), the upstream gradient for fwd+bwd
    segments: tuple                 # token_segments(index, A): a model's batch computes them once for every layer


def make_sets(shape: dict, n: int, device: torch.device, dtype: torch.dtype, act: str) -> list[AdapterSet]:
    d, m, t, a = shape["d"], shape["m"], shape["T"], shape["adapters"]

    def rand(*size, std=1.0):
        return (torch.randn(*size, device=device, dtype=dtype) * std).requires_grad_()
    index = row_slots(shape).to(device)
    meta = (torch.full((a,), m, device=device, dtype=torch.int32), torch.full((a,), SCALE, device=device),
            torch.full((a,), BOTTLENECK_ACT_CODES[act], device=device, dtype=torch.int32))
    return [AdapterSet(h=rand(t, d),
                       slots=BottleneckSlots(rand(a, m, d, std=d ** -0.5), rand(a, m), rand(a, d, m, std=m ** -0.5),
                                             rand(a, d), *meta),
                       index=index,
                       dy=torch.randn(t, d, device=device, dtype=dtype),
                       segments=token_segments(index, a))
            for _ in range(n)]


def set_bytes(shape: dict, elem_bytes: int = 2) -> int:
    d, m, t, a = shape["d"], shape["m"], shape["T"], shape["adapters"]
    return elem_bytes * (2 * t * d + a * 2 * m * d)


def _forward(provider: str, s: AdapterSet, act: str):
    """(forward of one set, the tensors whose gradients fwd+bwd takes)."""
    wd, bd, wu, bu = s.slots[:4]
    if provider.startswith("ptlm") and s.h.is_cuda and ptlm_backend(s.h) != "triton":
        raise RuntimeError("ptlm would run its PyTorch reference on CUDA, not the Triton kernels: is the "
                           "package installed (ptlm_engine.kernels importable) and PTLM_BACKEND unset?")
    if provider == "eager":
        fn = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}[act]
        return (lambda: s.h + SCALE * F.linear(fn(F.linear(s.h, wd[0], bd[0])), wu[0], bu[0])), [s.h, wd, bd, wu, bu]
    if provider in ("ptlm", "ptlm_wide", "ptlm_split") and wd.shape[0] == 1:
        from ptlm_engine.functional import bottleneck_adapter
        return (lambda: bottleneck_adapter(s.h, wd[0], bd[0], wu[0], bu[0], act, SCALE)), [s.h, wd, bd, wu, bu]
    if provider in ("ptlm", "ptlm_multi", "ptlm_wide"):
        from ptlm_engine.functional import bottleneck_adapter_multi
        return (lambda: bottleneck_adapter_multi(s.h, s.slots, s.index, segments=s.segments)), [s.h, wd, bd, wu, bu]
    raise ValueError(f"unknown provider {provider!r}")


def make_calls(shape: dict, provider: str, mode: str, sets: list[AdapterSet], act: str):
    if provider in ("eager", "ptlm_multi", "ptlm_split") and shape["adapters"] != 1:
        return None
    if provider == "ptlm_wide" and mode == "fwd":     # the same forward as ptlm
        return None
    calls = harness.mode_calls([(*_forward(provider, s, act), s.dy) for s in sets], mode)
    if provider in ("ptlm_wide", "ptlm_split"):
        from ptlm_engine.kernels import bottleneck as kernels
        setting = "WIDE_M_PAD" if provider == "ptlm_wide" else "SPLIT_FORWARD_M_PAD"
        return [harness.with_setting(kernels, setting, 16, call) for call in calls]
    return calls


def grid(dims, widths, tokens, adapters, providers, modes, device: torch.device, dtype: torch.dtype = torch.bfloat16,
         act: str = "relu") -> harness.Grid:
    elem = torch.finfo(dtype).bits // 8
    shapes = [{"d": d, "m": m, "T": t, "adapters": a} for d in dims for m in widths for t in tokens for a in adapters]
    return harness.Grid(op=OP, shapes=shapes, providers=list(providers), modes=list(modes),
                        make_sets=lambda shape, n: make_sets(shape, n, device, dtype, act),
                        set_bytes=lambda shape: set_bytes(shape, elem),
                        make_calls=lambda shape, provider, mode, sets: make_calls(shape, provider, mode, sets, act),
                        cost=lambda shape, mode: cost(shape, mode, elem))


# ------------------------------------------------------------------------------------------------- summaries
def _by_case(rows: list[dict], timing: str) -> dict[tuple, dict[str, float]]:
    """(d, m, T, adapters, mode) -> {provider: ms}, the floor included."""
    out: dict[tuple, dict[str, float]] = {}
    for row in rows:
        if row["op"] == OP and row.get("ms") and row["timing"] in (timing, "floor"):
            out.setdefault((*(row[k] for k in KEYS), row["mode"]), {})[row["provider"]] = row["ms"]
    return out


def target_checks(rows: list[dict]) -> list[str]:
    """Per timing: the fwd cases at >= 80% of the floor, and the mixed batch of 32 against one adapter."""
    lines = []
    for timing in ("plain", "graph"):
        cases = _by_case(rows, timing)
        fwd = {k: v["ptlm"] / v["floor"] for k, v in cases.items() if k[4] == "fwd" and "ptlm" in v and "floor" in v}
        if fwd:
            worst = max(fwd, key=fwd.get)
            lines.append(f"fwd ptlm/floor <= {TARGET} [{timing}]: {sum(v <= TARGET for v in fwd.values())}/{len(fwd)}"
                         f" pass; worst {fwd[worst]:.2f} at d={worst[0]} m={worst[1]} T={worst[2]} A={worst[3]}")
        mixed = [(k, v["ptlm"] / cases[(*k[:3], 1, k[4])]["ptlm"]) for k, v in cases.items()
                 if k[3] > 1 and "ptlm" in v and "ptlm" in cases.get((*k[:3], 1, k[4]), {})]
        if mixed:
            cells = " ".join(f"d{k[0]} m{k[1]} T{k[2]} {k[4]} {r:.2f}" for k, r in mixed)
            lines.append(f"mixed batch / one adapter [{timing}]: {cells}")
    return lines


def compact_table(rows: list[dict], timing: str = "plain") -> list[str]:
    """One line per case: every provider's ms in both modes and ptlm's share of the floor's bandwidth."""
    cases = _by_case(rows, timing)
    keys = dict.fromkeys(k[:4] for k in cases)
    if not keys:
        return []
    providers = [p for p in PROVIDERS if any(p in v for v in cases.values())]
    head = f"{'d':>5} {'m':>4} {'T':>6} {'A':>3} | " + " | ".join(
        f"{mode}: " + " ".join(f"{p:>10}" for p in providers) + f" {'%floor':>6}" for mode in MODES)
    lines = [f"Bottleneck adapter, ms ({timing} launches)", head]
    for key in keys:
        parts = []
        for mode in MODES:
            v = cases.get((*key, mode), {})
            cells = " ".join(f"{v[p]:10.4f}" if p in v else f"{'-':>10}" for p in providers)
            share = f"{100 * v['floor'] / v['ptlm']:6.0f}" if "ptlm" in v and "floor" in v else f"{'-':>6}"
            parts.append(f"{mode}: {cells} {share}")
        lines.append(f"{key[0]:>5} {key[1]:>4} {key[2]:>6} {key[3]:>3} | " + " | ".join(parts))
    return lines


# ---------------------------------------------------------------------------------------------------- command
def main(argv: list[str] | None = None) -> harness.Results:
    p = harness.bench_parser(__doc__, "bottleneck", harness.LAYER_SMOKE)
    p.add_argument("--dims", type=parse_ints, help="d list, e.g. 768,4096")
    p.add_argument("--widths", type=parse_ints, help="m list, e.g. 16,64")
    p.add_argument("--tokens", type=parse_ints, help="T list, e.g. 1024,16384")
    p.add_argument("--adapters", type=parse_ints, help="adapters in the batch, e.g. 1,32")
    p.add_argument("--act", default="relu", choices=list(BOTTLENECK_ACT_CODES))
    harness.add_grid_arguments(p, PROVIDERS, MODES)
    args = p.parse_args(argv)
    start = time.monotonic()
    device = harness.pick_device(args.smoke)
    dtype = torch.float32 if args.smoke else torch.bfloat16     # CPU bf16 matmuls are emulated and slow
    g = grid(args.dims or (SMOKE_DIMS if args.smoke else DIMS), args.widths or (SMOKE_WIDTHS if args.smoke else WIDTHS),
             args.tokens or (SMOKE_TOKENS if args.smoke else TOKENS),
             args.adapters or (SMOKE_ADAPTERS if args.smoke else ADAPTERS), args.providers, args.modes, device, dtype,
             args.act)
    return harness.run_layer_bench(args, start, device, [(None, g, args.graph and device.type == "cuda")], OP, TABLE,
                                   "bottleneck", ptlm_backend(torch.empty(1, device=device)),
                                   lambda r: compact_table(r.rows) + r.notes, target_checks, act=args.act,
                                   dtype=str(dtype).removeprefix("torch."))


if __name__ == "__main__":
    main()
