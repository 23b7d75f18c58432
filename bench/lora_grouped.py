"""Grouped LoRA benchmark: the projections of one block that share x (q/k/v, gate/up), separately and in one op.

    y_g = x W_gᵀ + s·(x A_gᵀ) B_gᵀ,   g = 0 … G-1,   rank 16 for every member

Groups (Llama-7B shapes, d_in = 4096): qkv 4096 -> 4096, 4096, 4096; qkv_gqa 4096 -> 4096, 1024, 1024 (8 KV heads of
32); gate_up 4096 -> 11008, 11008. Providers (W0 frozen; "fwd" under torch.no_grad, "fwd+bwd" also takes the
gradients of x and of every A and B with torch.autograd.grad):
  cublas          the G base GEMMs x W_gᵀ via F.linear (fwd+bwd: dx only)
  separate        G calls of ptlm_engine.functional.lora_linear: today's per-layer path
  grouped         one call of ptlm_engine.functional.lora_linear_grouped
  multi_separate  G calls of lora_linear_multi, 32 rank-16 adapters with uniform rows (T < 32: T adapters)
  multi_grouped   one call of lora_linear_multi_grouped on the same batch
  multi_grouped_serial  Hopper: multi_grouped with its matmul an ordinary launch after the grouped shrink, not
                  the shrink's programmatic dependent (kernels.configs.PDL off for the call)
  multi_grouped_one_launch  multi_grouped in one launch: every member's shrink on the matmul launch's own first
                  programs (kernels.lora_multi.SHRINK_PROGRAMS, with EXPAND_IN_LOOP at decode, on for the call;
                  off by default until timed), each member's tiles waiting for their own xa
  floor           not timed: max(bytes / copy bandwidth, flops / GEMM peak) with the ceilings of the same run

Floor (b bytes per element, N = Σ d_out_g, x read once, as the grouped op does; A_used = adapters the rows use,
1 for the single-adapter providers):
  fwd      bytes = b·[d_in·N + A_used·Σ r(d_in + d_out_g) + T(d_in + N)]
           flops = 2T·d_in·N + 2T·Σ r(d_in + d_out_g)
  fwd+bwd  bytes = b·[2·d_in·N + 3·A_used·Σ r(d_in + d_out_g) + T(3·d_in + 2N)],
           flops = 4T·d_in·N + 6T·Σ r(d_in + d_out_g)                  (as bench/lora.py, summed over members)
The multi providers share the floor of the single-adapter ones up to the adapters' bytes; the table's ratios
compare each pair (grouped / separate) and each against cuBLAS's G base GEMMs.

    python -m bench.lora_grouped --out DIR [--graph] [--groups qkv,gate_up] [--tokens 1,16] [--modes fwd]
    python -m bench.lora_grouped --smoke --out DIR          # tiny shapes on CPU (PTLM_BACKEND=reference)
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench import harness
from bench.lora import parse_ints, ptlm_backend
from ptlm_engine.functional import LoraSlots

OP = "lora_grouped"
GROUPS = {"qkv": (4096, (4096, 4096, 4096)), "qkv_gqa": (4096, (4096, 1024, 1024)), "gate_up": (4096, (11008, 11008))}
SMOKE_GROUPS = {"qkv": (64, (64, 64, 64)), "qkv_gqa": (64, (64, 16, 16)), "gate_up": (64, (96, 96))}
TOKENS = [1, 16, 64, 256, 1024, 4096]
SMOKE_TOKENS = [1, 16]
PROVIDERS = ["floor", "cublas", "separate", "grouped", "multi_separate", "multi_grouped", "multi_grouped_serial",
             "multi_grouped_one_launch"]
MODES = ["fwd", "fwd+bwd"]
R = 16
SCALE = 2.0
ADAPTERS = 32                      # the multi providers: uniform rows over this many rank-16 adapters

TABLE = harness.table_spec(keys=["group", "d_in", "d_outs", "T"],
                           ratios=[("grouped", "separate", "ms"), ("grouped", "cublas", "ms"),
                                   ("grouped", "floor", "ms"), ("multi_grouped", "multi_separate", "ms"),
                                   ("multi_grouped", "cublas", "ms"), ("multi_grouped", "multi_grouped_serial", "ms"),
                                   ("multi_grouped", "multi_grouped_one_launch", "ms")])


# ------------------------------------------------------------------------------------------------ the grid
def _widths(shape: dict) -> list[int]:
    return [int(n) for n in shape["d_outs"].split("+")]


def cost(shape: dict, mode: str, elem_bytes: int = 2, adapters: int = 1) -> tuple[float, float]:
    d_in, t, outs = shape["d_in"], shape["T"], _widths(shape)
    n = sum(outs)
    lora = sum(R * (d_in + d_out) for d_out in outs)                       # Σ r (d_in + d_out_g)
    if mode == "fwd":
        return elem_bytes * (d_in * n + adapters * lora + t * (d_in + n)), 2 * t * d_in * n + 2 * t * lora
    return (elem_bytes * (2 * d_in * n + 3 * adapters * lora + t * (3 * d_in + 2 * n)),
            4 * t * d_in * n + 6 * t * lora)


@dataclass
class GroupSet:
    """One rotating set of inputs for every provider: random, never zero."""
    x: torch.Tensor                 # (T, d_in), requires grad
    ws: list[torch.Tensor]          # (d_out_g, d_in), frozen
    As: list[torch.Tensor]          # (r, d_in), requires grad
    Bs: list[torch.Tensor]          # (d_out_g, r), requires grad
    slots: list[LoraSlots]          # 32 stacked rank-16 adapters per member (multi providers)
    index: torch.Tensor             # (T,) int32, uniform rows over the adapters
    dys: list[torch.Tensor]         # (T, d_out_g), the upstream gradients for fwd+bwd


def make_sets(shape: dict, n: int, device: torch.device, dtype: torch.dtype, providers) -> list[GroupSet]:
    d_in, t, outs = shape["d_in"], shape["T"], _widths(shape)
    multi = any(p.startswith("multi") for p in providers)

    def rand(*size, std=1.0, grad=False):
        return (torch.randn(*size, device=device, dtype=dtype) * std).requires_grad_(grad)

    def slots(d_out):
        return LoraSlots(rand(ADAPTERS, R, d_in, std=d_in ** -0.5, grad=True), rand(ADAPTERS, d_out, R, std=R ** -0.5,
                                                                                   grad=True),
                         torch.full((ADAPTERS,), R, device=device, dtype=torch.int32),
                         torch.full((ADAPTERS,), SCALE, device=device, dtype=torch.float32))
    index = (torch.randperm(t, generator=torch.Generator().manual_seed(0)) % ADAPTERS).to(device, torch.int32)
    return [GroupSet(x=rand(t, d_in, grad=True), ws=[rand(o, d_in, std=d_in ** -0.5) for o in outs],
                     As=[rand(R, d_in, std=d_in ** -0.5, grad=True) for _ in outs],
                     Bs=[rand(o, R, std=R ** -0.5, grad=True) for o in outs],
                     slots=[slots(o) for o in outs] if multi else [], index=index,
                     dys=[rand(t, o) for o in outs])
            for _ in range(n)]


def set_bytes(shape: dict, elem_bytes: int, providers) -> int:
    multi = any(p.startswith("multi") for p in providers)
    return int(cost(shape, "fwd", elem_bytes, ADAPTERS if multi else 1)[0])


def _forward(provider: str, s: GroupSet):
    """(forward of one set returning every member's output, the tensors whose gradients fwd+bwd takes)."""
    from ptlm_engine import functional as fn
    if provider != "cublas" and s.x.is_cuda and ptlm_backend(s.x) != "triton":
        raise RuntimeError("ptlm would run its PyTorch reference on CUDA, not the Triton kernels: is the package "
                           "installed (ptlm_engine.kernels importable) and PTLM_BACKEND unset?")
    members = range(len(s.ws))
    nones = [None] * len(s.ws)
    lora = [s.x, *s.As, *s.Bs]
    multi = [s.x, *(t for sl in s.slots for t in (sl.lora_A, sl.lora_B))]
    if provider == "cublas":
        return (lambda: [F.linear(s.x, w) for w in s.ws]), [s.x]
    if provider == "separate":
        return (lambda: [fn.lora_linear(s.x, s.ws[g], None, s.As[g], s.Bs[g], SCALE) for g in members]), lora
    if provider == "grouped":
        return (lambda: fn.lora_linear_grouped(s.x, s.ws, nones, s.As, s.Bs, [SCALE] * len(s.ws))), lora
    if provider == "multi_separate":
        return (lambda: [fn.lora_linear_multi(s.x, s.ws[g], None, s.slots[g], s.index) for g in members]), multi
    if provider.startswith("multi_grouped"):  # the serial and one-launch ones: switched in make_calls
        return (lambda: fn.lora_linear_multi_grouped(s.x, s.ws, nones, s.slots, s.index)), multi
    raise ValueError(f"unknown provider {provider!r}")


def make_calls(shape: dict, provider: str, mode: str, sets: list[GroupSet]):
    if provider == "multi_grouped_serial":  # what the dependent launch saves; only where one would happen
        from ptlm_engine.kernels import configs as kernel_configs
        if not kernel_configs.dependent_launch(sets[0].x.device):
            return None
        calls = harness.mode_calls([(*_forward("multi_grouped", s), s.dys) for s in sets], mode)
        return [harness.with_setting(kernel_configs, "PDL", False, call) for call in calls]
    if provider == "multi_grouped_one_launch":
        from ptlm_engine.kernels import lora_multi as multi_kernels
        calls = harness.mode_calls([(*_forward(provider, s), s.dys) for s in sets], mode)
        calls = [harness.with_setting(multi_kernels, "EXPAND_IN_LOOP", True, call) for call in calls]
        return [harness.with_setting(multi_kernels, "SHRINK_PROGRAMS", True, call) for call in calls]
    return harness.mode_calls([(*_forward(provider, s), s.dys) for s in sets], mode)


def grid(groups: dict, tokens, providers, modes, device: torch.device,
         dtype: torch.dtype = torch.bfloat16) -> harness.Grid:
    elem = torch.finfo(dtype).bits // 8
    shapes = [{"group": name, "d_in": d_in, "d_outs": "+".join(map(str, outs)), "T": t}
              for name, (d_in, outs) in groups.items() for t in tokens]
    return harness.Grid(op=OP, shapes=shapes, providers=list(providers), modes=list(modes),
                        make_sets=lambda shape, n: make_sets(shape, n, device, dtype, providers),
                        set_bytes=lambda shape: set_bytes(shape, elem, providers),
                        make_calls=make_calls,
                        cost=lambda shape, mode: cost(shape, mode, elem))


# ------------------------------------------------------------------------------------------------- summaries
def summary(rows: list[dict]) -> list[str]:
    """One line per (group, mode, timing, T): ms of every provider, grouped / separate and grouped / cuBLAS."""
    by: dict[tuple, dict[str, float]] = {}
    for row in rows:
        if row["op"] == OP and row.get("ms"):
            for timing in ("plain", "graph") if row["timing"] == "floor" else (row["timing"],):
                by.setdefault((row["group"], row["mode"], timing, row["T"]), {})[row["provider"]] = row["ms"]
    cols = {"floor": "floor", "cublas": "cublas", "separate": "separate", "grouped": "grouped",
            "multi_separate": "m_sep", "multi_grouped": "m_grp", "multi_grouped_serial": "m_serial",
            "multi_grouped_one_launch": "m_1launch"}
    lines = [f"{'group':>8} {'mode':>7} {'timing':>6} {'T':>5} | " + " ".join(f"{c:>9}" for c in cols.values())
             + " | grp/sep grp/cuB mgrp/msep mgrp/m1l"]
    for (group, mode, timing, t), v in by.items():
        if set(v) <= {"floor"}:
            continue

        def ratio(num, den):
            return f"{v[num] / v[den]:7.2f}" if num in v and den in v else f"{'-':>7}"
        lines.append(f"{group:>8} {mode:>7} {timing:>6} {t:>5} | "
                     + " ".join(f"{v[c]:9.4f}" if c in v else f"{'-':>9}" for c in cols)
                     + f" | {ratio('grouped', 'separate')} {ratio('grouped', 'cublas')} "
                       f"{ratio('multi_grouped', 'multi_separate')}  "
                       f"{ratio('multi_grouped', 'multi_grouped_one_launch')}")
    return lines


# ---------------------------------------------------------------------------------------------------- command
def main(argv: list[str] | None = None) -> harness.Results:
    p = harness.bench_parser(__doc__, "lora_grouped", harness.LAYER_SMOKE)
    p.add_argument("--groups", type=lambda s: s.split(","), help=f"only these of {','.join(GROUPS)}")
    p.add_argument("--tokens", type=parse_ints, help="T list, e.g. 1,16,4096")
    harness.add_grid_arguments(p, PROVIDERS, ["fwd"])
    args = p.parse_args(argv)
    start = time.monotonic()
    device = harness.pick_device(args.smoke)
    groups = SMOKE_GROUPS if args.smoke else GROUPS
    groups = {k: v for k, v in groups.items() if args.groups is None or k in args.groups}
    tokens = args.tokens or (SMOKE_TOKENS if args.smoke else TOKENS)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16   # CPU bf16 matmuls are emulated
    g = grid(groups, tokens, args.providers, args.modes, device, dtype)
    return harness.run_layer_bench(args, start, device, [(None, g, args.graph and device.type == "cuda")], OP, TABLE,
                                   "lora_grouped", ptlm_backend(torch.empty(1, device=device, dtype=torch.bfloat16)),
                                   lambda r: summary(r.rows))


if __name__ == "__main__":
    main()
