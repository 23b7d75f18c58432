"""Multi-adapter LoRA layer benchmark: every token with its own adapter (or none), providers side by side.

    y[t] = x[t] W0ᵀ + s_a x[t] A_aᵀ B_aᵀ,   a = adapter_index[t]   (-1: the base layer alone)

A case is a layer (d_in × d_out), T tokens and an assignment of the rows to adapters:
  adapters  A: the adapters loaded (stacked slots) and drawn from
  assign    uniform: every adapter gets T/A rows (T < A: T distinct adapters); zipf: each row draws adapter k
            with probability ∝ (k+1)^-1.1 (a few popular adapters, a long tail). Either way the rows come in a
            seeded random order, as interleaved requests do.
  r         16 for every adapter, or "mixed": each adapter's rank drawn from {8, 16, 32, 64, 128} (seeded)
  base_pct  percent of the rows with no adapter (-1)
The assignment and the ranks depend only on the case, so every provider and every run sees the same batch.

Providers (W0 frozen everywhere; "fwd" runs under torch.no_grad, "fwd+bwd" takes the gradients of x and of the
stacked A and B with torch.autograd.grad against a random dy, so nothing accumulates into .grad):
  cublas          x W0ᵀ alone via F.linear: the base layer (fwd+bwd: dx only)
  ptlm            ptlm_engine.functional.lora_linear_multi (Triton on CUDA), given the batch's token grouping
                  (token_segments) made once per set, outside the timed call: per-batch work that a model does
                  once for all its layers (AdapterBatch.tokens), as gather_bmm's row -> slot map
  ptlm_tma        T > 64 on Hopper: ptlm with the TMA tile over the shrink's slot-sorted copy of x at prefill
                  (kernels.lora.TMA_PREFILL forced for the call) instead of the one-pass pointer tile it takes up
                  to kernels.lora_multi.TMA_MIN_T tokens: the side-by-side
  ptlm_serial     Hopper, where the op launches a shrink then a matmul (not the few tokens it serves in one
                  launch): ptlm with the matmul an ordinary launch after the shrink instead of its programmatic
                  dependent (kernels.configs.PDL off for the call): what the overlap saves
  ptlm_in_loop    T <= 64 where the op launches a shrink then the decode matmul: ptlm with the matmul's expand
                  inside its K loop, a round a K step (kernels.lora_multi.EXPAND_IN_LOOP on for the call, off by
                  default until timed) instead of the runs' rounds after the loop
  ptlm_one_launch the forward as one launch where the op launches a shrink then the pointer-tile matmul (those
                  decodes, and prefill up to kernels.lora_multi.TMA_MIN_T tokens): the shrink on the matmul launch's
                  own first programs (kernels.lora_multi.SHRINK_PROGRAMS on for the call, off by default until
                  timed; at decode with EXPAND_IN_LOOP too), the matmul programs waiting for it before they expand,
                  instead of a shrink launch and its memset
  ptlm_mean_rank  mixed ranks only: ptlm on the same rows with every adapter at the rows' mean rank (the mean of
                  r_a(t) over the rows with an adapter, rounded): the same LoRA flops at one rank
  gather_bmm      torch: each row's A and B gathered from the stack (padded to r_max), two bmm, added to
                  F.linear; skipped where the gathered weights would exceed 4 GiB
  peft            HF PEFT's lora.Linear with the A adapters loaded, called with adapter_names (one per row,
                  "__base__" for none): fwd only (PEFT's mixed batches are inference-only), A <= 32, T <= 1024
                  (it loops over the adapters in Python: several ms a call); never captured in a CUDA graph
                  (it builds index tensors from Python lists on every call)
  floor           not timed: max(bytes / copy bandwidth, flops / GEMM peak) with the ceilings of the same run

Floor (b = bytes per element; the adapter bytes count each adapter the rows use once, the flops each row's rank):
  fwd      bytes = b·[d_in·d_out + Σ_{adapters used} r_a(d_in+d_out) + T(d_in+d_out)]
           flops = 2T·d_in·d_out + 2·Σ_t r_a(t)·(d_in+d_out)
  fwd+bwd  bytes = b·[2·d_in·d_out + 3·Σ_{adapters used} r_a(d_in+d_out) + T(3·d_in + 2·d_out)]
           flops = 4T·d_in·d_out + 6·Σ_t r_a(t)·(d_in+d_out)          (as bench/lora.py, per row's adapter)

    python -m bench.lora_multi --out DIR [--full] [--graph] [--shapes 4096x4096] [--tokens 16,4096] \\
        [--adapters 4,128] [--assign zipf] [--ranks 16,mixed] [--base-pct 0,50] [--providers ...] [--modes fwd]
    python -m bench.lora_multi --smoke --out DIR          # tiny shapes, float32 on CPU (PTLM_BACKEND=reference)
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bench import harness
from bench.lora import parse_ints, parse_shapes, ptlm_backend
from ptlm_engine.kernels.configs import DECODE_MAX_T
from ptlm_engine.functional import LoraSlots

OP = "lora_linear_multi"
LAYER_SHAPES = [(4096, 4096), (4096, 11008)]                    # (d_in, d_out): attention, up/gate
TOKENS = [1, 16, 64, 256, 1024, 4096]
ADAPTERS = [1, 4, 32, 128]
ASSIGNS = ["uniform", "zipf"]
RANKS = [16, "mixed"]
BASE_PCTS = [0, 50]
PROVIDERS = ["floor", "cublas", "ptlm", "ptlm_serial", "ptlm_in_loop", "ptlm_one_launch", "ptlm_tma", "ptlm_mean_rank",
             "gather_bmm", "peft"]
MODES = ["fwd", "fwd+bwd"]
MIXED_RANKS = [8, 16, 32, 64, 128]
ZIPF_S = 1.1
SEED = 0
SCALE = 2.0                                                      # alpha / r with alpha = 2r, as in bench/lora.py
PEFT_MAX_ADAPTERS, PEFT_MAX_T = 32, 1024
GATHER_MAX_BYTES = 4 << 30

# The default grid (the GPU suite's phase): 32 rank-16 adapters with uniform rows at every T on both layers; on
# the first layer the other adapter counts at SWEEP_TOKENS and, one at a time, Zipf rows, mixed ranks and 50%
# base-only rows at VARIANT_TOKENS; fwd+bwd at TRAIN_TOKENS. --full runs the whole product in both modes.
CORE_ADAPTERS = 32
SWEEP_TOKENS = [1, 16, 256, 4096]
VARIANT_TOKENS = [16, 256, 4096]
TRAIN_TOKENS = [256, 4096]

SMOKE_SHAPES = [(64, 96)]
SMOKE_TOKENS = [1, 16]
SMOKE_SWEEP_TOKENS = SMOKE_VARIANT_TOKENS = SMOKE_TRAIN_TOKENS = [16]

POINT_KEYS = ["d_in", "d_out", "adapters", "assign", "r", "base_pct", "T"]
TABLE = harness.table_spec(keys=POINT_KEYS, ratios=[("ptlm", "cublas", "ms"), ("ptlm", "floor", "ms"),
                                                    ("peft", "ptlm", "ms"), ("gather_bmm", "ptlm", "ms"),
                                                    ("ptlm", "ptlm_mean_rank", "ms"), ("ptlm", "ptlm_serial", "ms"),
                                                    ("ptlm", "ptlm_in_loop", "ms"), ("ptlm", "ptlm_one_launch", "ms")])

# vLLM's multi-LoRA layer (cuBLAS base GEMM + its lora_shrink / lora_expand, rank 16, bf16, one call captured in
# a CUDA graph) on the project's H100: /work/shared/design-notes.md. (d_in, d_out, T, adapters) -> its time over
# the same H100's cuBLAS base GEMM (ms / ms): compared with ptlm / cuBLAS of the run, so that another card (the
# H200) is not judged against the H100's absolute times.
VLLM_OVER_CUBLAS = {(4096, 4096, 1, 1): 0.034 / 0.023, (4096, 4096, 64, 32): 0.047 / 0.022,
                    (4096, 4096, 256, 32): 0.059 / 0.028, (4096, 4096, 1024, 32): 0.095 / 0.049,
                    (4096, 4096, 4096, 32): 0.297 / 0.182, (4096, 11008, 64, 32): 0.083 / 0.046,
                    (4096, 11008, 4096, 32): 0.739 / 0.530}


# ------------------------------------------------------------------------------------------------ the batch
def point(d_in: int, d_out: int, t: int, adapters: int = CORE_ADAPTERS, assign: str = "uniform", r=16,
          base_pct: int = 0) -> dict:
    return {"d_in": d_in, "d_out": d_out, "adapters": adapters, "assign": assign, "r": r, "base_pct": base_pct,
            "T": t}


def row_adapters(shape: dict) -> torch.Tensor:
    """(T,) int64 on the CPU: each row's adapter, -1 for base-only rows; seeded, so fixed per case."""
    g = torch.Generator().manual_seed(SEED)
    t, a = shape["T"], shape["adapters"]
    if shape["assign"] == "uniform":
        rows = torch.arange(t) % a
    elif shape["assign"] == "zipf":
        rows = torch.multinomial(torch.arange(1, a + 1, dtype=torch.float64) ** -ZIPF_S, t, replacement=True,
                                 generator=g)
    else:
        raise ValueError(f"unknown assignment {shape['assign']!r}")
    rows = rows[torch.randperm(t, generator=g)]
    rows[torch.randperm(t, generator=g)[:round(t * shape["base_pct"] / 100)]] = -1
    return rows


def adapter_ranks(shape: dict) -> list[int]:
    if shape["r"] == "mixed":
        g = torch.Generator().manual_seed(SEED + 1)
        return [MIXED_RANKS[i] for i in torch.randint(len(MIXED_RANKS), (shape["adapters"],), generator=g)]
    return [int(shape["r"])] * shape["adapters"]


def rank_sums(shape: dict) -> tuple[int, int, int]:
    """(Σ r_a over the adapters the rows use, Σ r_a(t) over the rows, rows with an adapter)."""
    rows = row_adapters(shape)
    rows = rows[rows >= 0]
    ranks = torch.tensor(adapter_ranks(shape))
    return int(ranks[rows.unique()].sum()), int(ranks[rows].sum()), rows.numel()


def mean_rank(shape: dict) -> int:
    """The rows' mean rank: every adapter at this rank does the same LoRA flops as the mixed-rank batch."""
    _, row_sum, n_rows = rank_sums(shape)
    return round(row_sum / n_rows)


def cost(shape: dict, mode: str, elem_bytes: int = 2) -> tuple[float, float]:
    d_in, d_out, t = shape["d_in"], shape["d_out"], shape["T"]
    io = d_in + d_out
    adapter_sum, row_sum, _ = rank_sums(shape)
    if mode == "fwd":
        return elem_bytes * (d_in * d_out + adapter_sum * io + t * io), 2 * t * d_in * d_out + 2 * row_sum * io
    return (elem_bytes * (2 * d_in * d_out + 3 * adapter_sum * io + t * (3 * d_in + 2 * d_out)),
            4 * t * d_in * d_out + 6 * row_sum * io)


@dataclass
class MultiSet:
    """One rotating set of inputs: random, never zero (zeros only beyond each adapter's rank)."""
    x: torch.Tensor                          # (T, d_in), requires grad
    w: torch.Tensor                          # (d_out, d_in), frozen
    slots: LoraSlots                         # the A adapters stacked; lora_A and lora_B require grad
    index: torch.Tensor                      # (T,) int32, -1 = no adapter
    dy: torch.Tensor                         # (T, d_out), the upstream gradient for fwd+bwd
    mean_rank_slots: LoraSlots | None        # mixed ranks only: every adapter at the rows' mean rank


def make_slots(ranks: list[int], d_in: int, d_out: int, device: torch.device, dtype: torch.dtype) -> LoraSlots:
    r_max = max(ranks)
    rank = torch.tensor(ranks, device=device, dtype=torch.int32)
    live = (torch.arange(r_max, device=device) < rank[:, None]).to(dtype)              # (A, r_max)
    a = torch.randn(len(ranks), r_max, d_in, device=device, dtype=dtype) * d_in ** -0.5 * live[:, :, None]
    b = torch.randn(len(ranks), d_out, r_max, device=device, dtype=dtype) * r_max ** -0.5 * live[:, None, :]
    scales = torch.full((len(ranks),), SCALE, device=device, dtype=torch.float32)
    return LoraSlots(a.requires_grad_(), b.requires_grad_(), rank, scales)


def make_sets(shape: dict, n: int, device: torch.device, dtype: torch.dtype) -> list[MultiSet]:
    d_in, d_out, t = shape["d_in"], shape["d_out"], shape["T"]
    index = row_adapters(shape).to(device=device, dtype=torch.int32)
    ranks = adapter_ranks(shape)
    mixed = shape["r"] == "mixed"
    return [MultiSet(x=torch.randn(t, d_in, device=device, dtype=dtype).requires_grad_(),
                     w=torch.randn(d_out, d_in, device=device, dtype=dtype) * d_in ** -0.5,
                     slots=make_slots(ranks, d_in, d_out, device, dtype),
                     index=index,
                     dy=torch.randn(t, d_out, device=device, dtype=dtype),
                     mean_rank_slots=make_slots([mean_rank(shape)] * len(ranks), d_in, d_out, device, dtype)
                     if mixed else None)
            for _ in range(n)]


# ---------------------------------------------------------------------------------------------- providers
def peft_applies(shape: dict, mode: str) -> bool:
    return mode == "fwd" and shape["adapters"] <= PEFT_MAX_ADAPTERS and shape["T"] <= PEFT_MAX_T


def gather_bytes(shape: dict, elem_bytes: int = 2) -> int:
    """Bytes of the per-row copies of A and B that gather_bmm materializes."""
    return elem_bytes * shape["T"] * max(adapter_ranks(shape)) * (shape["d_in"] + shape["d_out"])


def _peft_layer(s: MultiSet) -> tuple[nn.Module, list[str]]:
    """PEFT's lora.Linear on W0 with one adapter per slot (a0, a1, ...) and the rows' adapter_names."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear
    with torch.device("meta"):
        base = nn.Linear(s.w.shape[1], s.w.shape[0], bias=False)
    base.weight = nn.Parameter(s.w, requires_grad=False)
    config = LoraConfig(lora_dropout=0.0, init_lora_weights=False)
    ranks = s.slots.ranks.tolist()
    with torch.device("meta"):  # PEFT leaves meta adapters where they are; the real weights are set below
        layer = PeftLinear(base, "a0", config=config, r=ranks[0], lora_alpha=round(SCALE * ranks[0]))
        for i, r in enumerate(ranks[1:], start=1):
            layer.update_layer(f"a{i}", r, lora_alpha=round(SCALE * r), config=config)
    for i, r in enumerate(ranks):
        layer.lora_A[f"a{i}"].weight = nn.Parameter(s.slots.lora_A[i, :r].detach(), requires_grad=False)
        layer.lora_B[f"a{i}"].weight = nn.Parameter(s.slots.lora_B[i, :, :r].detach().contiguous(),
                                                    requires_grad=False)
    names = [f"a{i}" if i >= 0 else "__base__" for i in s.index.tolist()]
    return layer, names


def _forward(provider: str, s: MultiSet):
    """(forward of one set, the tensors whose gradients fwd+bwd takes)."""
    if provider == "cublas":
        return (lambda: F.linear(s.x, s.w)), [s.x]
    if provider in ("ptlm", "ptlm_mean_rank"):
        from ptlm_engine.functional import lora_linear_multi, token_segments
        if s.x.is_cuda and ptlm_backend(s.x) != "triton":
            raise RuntimeError("ptlm would run its PyTorch reference on CUDA, not the Triton kernels: is the "
                               "package installed (ptlm_engine.kernels importable) and PTLM_BACKEND unset?")
        slots = s.slots if provider == "ptlm" else s.mean_rank_slots
        # The tokens grouped by adapter are per-batch work: a model makes them once for all its layers
        # (AdapterBatch.tokens; None where the reference runs), so they are made here, outside the timed call.
        segments = token_segments(s.index, slots.lora_A.shape[0]) if ptlm_backend(s.x) == "triton" else None
        return ((lambda: lora_linear_multi(s.x, s.w, None, slots, s.index, False, segments)),
                [s.x, slots.lora_A, slots.lora_B])
    if provider == "gather_bmm":
        # The row -> slot map and per-row scales are built once per batch, as an engine shares them across layers.
        slot = s.index.clamp_min(0).long()
        row_scale = (s.slots.scales[slot] * (s.index >= 0)).to(s.x.dtype)[:, None]         # (T, 1)

        def fwd():
            xa = torch.bmm(s.x[:, None, :], s.slots.lora_A[slot].transpose(1, 2))          # (T, 1, r_max)
            lora = torch.bmm(xa, s.slots.lora_B[slot].transpose(1, 2))[:, 0]               # (T, d_out)
            return F.linear(s.x, s.w) + lora * row_scale
        return fwd, [s.x, s.slots.lora_A, s.slots.lora_B]
    if provider == "peft":
        layer, names = _peft_layer(s)
        return (lambda: layer(s.x, adapter_names=names)), []  # fwd only: see peft_applies
    raise ValueError(f"unknown provider {provider!r}")


def serial_applies(shape: dict, x: torch.Tensor) -> bool:
    """ptlm_serial differs from ptlm: the matmul would launch as the shrink's dependent."""
    from ptlm_engine.kernels import configs as kernel_configs
    from ptlm_engine.kernels import lora_multi as multi_kernels
    r_max = 128 if shape["r"] == "mixed" else int(shape["r"])
    return (kernel_configs.PDL and kernel_configs.dependent_launch(x.device)
            and not multi_kernels.decode_fuses_shrink(shape["T"], r_max))


def in_loop_applies(shape: dict) -> bool:
    """ptlm_in_loop and ptlm_one_launch differ from ptlm: a decode the op serves with a shrink launch and a matmul
    (not the few tokens whose matmul shrinks for itself)."""
    from ptlm_engine.kernels import lora_multi as multi_kernels
    r_max = 128 if shape["r"] == "mixed" else int(shape["r"])
    return shape["T"] <= DECODE_MAX_T and not multi_kernels.decode_fuses_shrink(shape["T"], r_max)


def one_launch_applies(shape: dict) -> bool:
    """ptlm_one_launch differs from ptlm: the decodes of in_loop_applies, and prefill on the pointer tile."""
    from ptlm_engine.kernels import lora_multi as multi_kernels
    return in_loop_applies(shape) or DECODE_MAX_T < shape["T"] <= multi_kernels.TMA_MIN_T


def make_calls(shape: dict, provider: str, mode: str, sets: list[MultiSet]):
    if ((provider == "peft" and not peft_applies(shape, mode))
            or (provider == "ptlm_mean_rank" and shape["r"] != "mixed")
            or (provider == "ptlm_tma" and (shape["T"] <= DECODE_MAX_T or sets[0].x.device.type != "cuda"))
            or (provider == "ptlm_serial" and not serial_applies(shape, sets[0].x))
            or (provider == "ptlm_in_loop" and not in_loop_applies(shape))
            or (provider == "ptlm_one_launch" and not one_launch_applies(shape))
            or (provider == "gather_bmm" and gather_bytes(shape, sets[0].x.element_size()) > GATHER_MAX_BYTES)):
        return None
    if provider == "ptlm_tma":  # forward and backward both on the TMA tile
        from ptlm_engine.kernels import lora as lora_kernels
        calls = harness.mode_calls([(*_forward("ptlm", s), s.dy) for s in sets], mode)
        return [harness.with_setting(lora_kernels, "TMA_PREFILL", True, call) for call in calls]
    if provider == "ptlm_serial":
        from ptlm_engine.kernels import configs as kernel_configs
        calls = harness.mode_calls([(*_forward("ptlm", s), s.dy) for s in sets], mode)
        return [harness.with_setting(kernel_configs, "PDL", False, call) for call in calls]
    if provider in ("ptlm_in_loop", "ptlm_one_launch"):
        from ptlm_engine.kernels import lora_multi as multi_kernels
        calls = harness.mode_calls([(*_forward("ptlm", s), s.dy) for s in sets], mode)
        calls = [harness.with_setting(multi_kernels, "EXPAND_IN_LOOP", True, call) for call in calls]
        if provider == "ptlm_one_launch":
            calls = [harness.with_setting(multi_kernels, "SHRINK_PROGRAMS", True, call) for call in calls]
        return calls
    return harness.mode_calls([(*_forward(provider, s), s.dy) for s in sets], mode)


def grid(points: list[dict], providers, modes, device: torch.device,
         dtype: torch.dtype = torch.bfloat16) -> harness.Grid:
    elem = torch.finfo(dtype).bits // 8
    return harness.Grid(op=OP, shapes=points, providers=list(providers), modes=list(modes),
                        make_sets=lambda shape, n: make_sets(shape, n, device, dtype),
                        set_bytes=lambda shape: int(cost(shape, "fwd", elem)[0]),  # the bytes one call touches
                        make_calls=make_calls,
                        cost=lambda shape, mode: cost(shape, mode, elem))


# ------------------------------------------------------------------------------------------------ the grids
def default_points(shapes, tokens, sweep_tokens, variant_tokens) -> list[dict]:
    points = [point(d_in, d_out, t) for d_in, d_out in shapes for t in tokens]
    d_in, d_out = shapes[0]
    for t in sweep_tokens:
        points += [point(d_in, d_out, t, adapters=a) for a in ADAPTERS if a != CORE_ADAPTERS]
    for t in variant_tokens:
        points += [point(d_in, d_out, t, assign="zipf"), point(d_in, d_out, t, r="mixed"),
                   point(d_in, d_out, t, base_pct=50)]
    return points


def train_points(shapes, tokens) -> list[dict]:
    return ([point(d_in, d_out, t) for d_in, d_out in shapes for t in tokens]
            + [point(*shapes[0], tokens[-1], r="mixed")])


def full_points(shapes, tokens) -> list[dict]:
    return [point(d_in, d_out, t, adapters=a, assign=assign, r=r, base_pct=pct)
            for (d_in, d_out), a, assign, r, pct, t in itertools.product(shapes, ADAPTERS, ASSIGNS, RANKS,
                                                                         BASE_PCTS, tokens)]


def points_by_mode(smoke: bool, full: bool, modes) -> dict[str, list[dict]]:
    """mode -> the points it runs: the default grid or, with full, every combination in both modes."""
    shapes = SMOKE_SHAPES if smoke else LAYER_SHAPES
    tokens = SMOKE_TOKENS if smoke else TOKENS
    if full:
        return {mode: full_points(shapes, tokens) for mode in modes}
    default = {"fwd": default_points(shapes, tokens, SMOKE_SWEEP_TOKENS if smoke else SWEEP_TOKENS,
                                     SMOKE_VARIANT_TOKENS if smoke else VARIANT_TOKENS),
               "fwd+bwd": train_points(shapes, SMOKE_TRAIN_TOKENS if smoke else TRAIN_TOKENS)}
    return {mode: default[mode] for mode in modes}


def layer_dtype(device: torch.device) -> torch.dtype:
    """bf16, except float32 on the CPU (smoke), where bf16 matmuls are emulated and slow to set up per shape."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def phases(points: dict[str, list[dict]], providers, device: torch.device, graph: bool,
           dtype: torch.dtype = torch.bfloat16) -> list[tuple[str, harness.Grid, bool]]:
    """(name, grid, time CUDA graphs?) per mode. With graphs, PEFT runs in a grid of its own after the others, on
    the points where it applies: it cannot be captured."""
    out = []
    for mode, pts in points.items():
        if graph and "peft" in providers:
            out += [(f"multi-LoRA {mode}, CUDA graphs too",
                     grid(pts, [p for p in providers if p != "peft"], [mode], device, dtype), True),
                    (f"multi-LoRA {mode}, PEFT",
                     grid([p for p in pts if peft_applies(p, mode)], ["peft"], [mode], device, dtype), False)]
        else:
            out.append((f"multi-LoRA {mode}", grid(pts, providers, [mode], device, dtype), graph))
    return [(name, g, timed_graph) for name, g, timed_graph in out if g.shapes and set(g.providers) - {"floor"}]


# ------------------------------------------------------------------------------------------------- summaries
def _cases(rows: list[dict]) -> list[tuple[dict, str, str, dict[str, float]]]:
    """(point, mode, timing, {provider: ms}) over this op's timed rows; the floor goes under both timings."""
    cases: dict[tuple, dict[str, float]] = {}
    for row in rows:
        if row["op"] != OP or not row.get("ms"):
            continue
        key = tuple(row[k] for k in POINT_KEYS)
        for timing in ("plain", "graph") if row["timing"] == "floor" else (row["timing"],):
            cases.setdefault((key, row["mode"], timing), {})[row["provider"]] = row["ms"]
    return [(dict(zip(POINT_KEYS, key)), mode, timing, ms) for (key, mode, timing), ms in cases.items()]


def _is_core(p: dict) -> bool:
    """32 rank-16 adapters, uniform rows, every row with an adapter."""
    return (p["adapters"], p["assign"], p["r"], p["base_pct"]) == (CORE_ADAPTERS, "uniform", 16, 0)


def _label(p: dict, with_t: bool = True) -> str:
    """The case in a few words: the layer, T, A, and whatever differs from uniform rank-16 rows with adapters."""
    words = [f"{p['d_in']}x{p['d_out']}"] + [f"T={p['T']}"] * with_t + [f"A={p['adapters']}"]
    words += [p["assign"]] * (p["assign"] != "uniform") + [f"r={p['r']}"] * (p["r"] != 16)
    words += [f"{p['base_pct']}% base-only"] * (p["base_pct"] != 0)
    return " ".join(words)


def _check(mode: str, cases: str, ratio: str, limit: str, timing: str) -> str:
    return f"multi {mode:7s} {cases:13s} {ratio:14s} {limit:7s} [{timing}]"


def _verdict(label: str, ratios: dict[str, float], limit: float, at_least: bool = False,
             floor_spread: dict[str, float] | None = None) -> list[str]:
    """'label: n/m pass; worst x at case' (nothing where no case was measured)."""
    if not ratios:
        return []
    worst = (min if at_least else max)(ratios, key=ratios.get)
    passed = sum(v >= limit if at_least else v <= limit for v in ratios.values())
    floor = f" (the floor's own max/min {floor_spread[worst]:.2f})" if floor_spread else ""
    return [f"{label}: {passed}/{len(ratios)} pass; worst {ratios[worst]:.2f}{floor} at {worst}"]


def _flatness(cases, mode: str, timing: str) -> tuple[dict[str, float], dict[str, float]]:
    """ptlm's max/min time over A = 4..128 at otherwise equal rank-16 cases, and the floor's max/min there."""
    groups: dict[str, list[tuple[float, float]]] = {}
    for p, m, t, v in cases:
        if m == mode and t == timing and p["r"] == 16 and 4 <= p["adapters"] <= 128 and "ptlm" in v:
            groups.setdefault(_label({**p, "adapters": "4..128"}), []).append((v["ptlm"], v.get("floor", math.nan)))
    groups = {k: list(zip(*g)) for k, g in groups.items() if len(g) > 1}
    return ({k: max(ms) / min(ms) for k, (ms, _) in groups.items()},
            {k: max(fl) / min(fl) for k, (_, fl) in groups.items()})


def target_checks(rows: list[dict]) -> list[str]:
    """One line per target, mode and timing: how many cases pass and the worst one."""
    cases = _cases(rows)
    lines = []
    for timing in ("plain", "graph"):
        core = {_label(p): v["ptlm"] / v["cublas"] for p, mode, t, v in cases
                if mode == "fwd" and t == timing and _is_core(p) and "ptlm" in v and "cublas" in v}
        lines += _verdict(_check("fwd", "A=32 r=16", "ptlm/cuBLAS", "<= 1.10", timing), core, 1.10)
        peft = {_label(p): v["peft"] / v["ptlm"] for p, mode, t, v in cases
                if mode == "fwd" and t == timing and _is_core(p) and p["T"] >= 256 and "peft" in v and "ptlm" in v}
        lines += _verdict(_check("fwd", "A=32 T>=256", "PEFT/ptlm", ">= 100", timing), peft, 100, at_least=True)
        for mode in MODES:
            spread, floor_spread = _flatness(cases, mode, timing)
            lines += _verdict(_check(mode, "A=4..128", "ptlm max/min", "<= 1.10", timing), spread, 1.10,
                              floor_spread=floor_spread)
            mixed = {_label(p): v["ptlm"] / v["ptlm_mean_rank"] for p, m, t, v in cases
                     if m == mode and t == timing and "ptlm" in v and "ptlm_mean_rank" in v}
            lines += _verdict(_check(mode, "mixed ranks", "ptlm/mean rank", "<= 1.10", timing), mixed, 1.10)
    vllm = {}
    for p, mode, timing, v in cases:
        key = (p["d_in"], p["d_out"], p["T"], p["adapters"])
        if (mode == "fwd" and timing == "graph" and key in VLLM_OVER_CUBLAS and "ptlm" in v and "cublas" in v
                and (p["assign"], p["r"], p["base_pct"]) == ("uniform", 16, 0)):
            vllm[_label(p)] = v["ptlm"] / v["cublas"] / VLLM_OVER_CUBLAS[key]
    # rel: ptlm / cuBLAS of this run over vLLM / cuBLAS of the H100 (VLLM_OVER_CUBLAS)
    lines += _verdict(_check("fwd", "vLLM's points", "ptlm/vLLM rel", "<= 1.00", "graph"), vllm, 1.00)
    return lines


def _cells(v: dict[str, float], providers) -> str:
    return " ".join(f"{v[k]:7.3f}" if k in v else f"{'-':>7}" for k in providers)


def _ratio(num: float | None, den: float | None, width: int = 5) -> str:
    return f"{num / den:{width}.2f}" if num and den else f"{'-':>{width}}"


def summary(rows: list[dict]) -> list[str]:
    """The forward of 32 rank-16 adapters (plain and graph), fwd+bwd, base-only rows, then the targets."""
    cases = _cases(rows)
    by_case = {(tuple(p.values()), mode, t): v for p, mode, t, v in cases}
    lines = []
    core = [(p, v, by_case.get((tuple(p.values()), mode, "graph"), {})) for p, mode, t, v in cases
            if mode == "fwd" and t == "plain" and _is_core(p)]
    if core:
        lines += ["Multi-adapter LoRA fwd, 32 rank-16 adapters, uniform rows, ms",
                  f"{'layer':>10} {'T':>5} | {'floor':>7} | plain: {'cuBLAS':>7} {'ptlm':>7} {'gather':>7} "
                  f"{'peft':>7} {'p/cuB':>5} {'peft/p':>6} | graph: {'cuBLAS':>7} {'ptlm':>7} {'gather':>7} "
                  f"{'p/cuB':>5}"]
        lines += [f"{p['d_in']:>5}x{p['d_out']:<5} {p['T']:>5} | {_cells(v, ['floor'])} |        "
                  f"{_cells(v, ['cublas', 'ptlm', 'gather_bmm', 'peft'])} {_ratio(v.get('ptlm'), v.get('cublas'))} "
                  f"{_ratio(v.get('peft'), v.get('ptlm'), 6)} |        {_cells(g, ['cublas', 'ptlm', 'gather_bmm'])} "
                  f"{_ratio(g.get('ptlm'), g.get('cublas'))}" for p, v, g in core]
    train = [(p, v) for p, mode, t, v in cases if mode == "fwd+bwd" and t == "plain"]
    if train:
        lines += ["Multi-adapter LoRA fwd+bwd (dx and every adapter's dA, dB), plain, ms: "
                  "floor, base layer, ptlm, ptlm at mean rank, gather_bmm; ptlm/base"]
        lines += [f"  {_label(p):32s} {_cells(v, ['floor', 'cublas', 'ptlm', 'ptlm_mean_rank', 'gather_bmm'])} "
                  f"{_ratio(v.get('ptlm'), v.get('cublas'))}" for p, v in train]
    for timing in ("plain", "graph"):
        half: dict[str, list[str]] = {}
        for p, mode, t, v in cases:
            all_adapters = by_case.get((tuple({**p, "base_pct": 0}.values()), mode, t), {})
            if mode == "fwd" and t == timing and p["base_pct"] == 50 and "ptlm" in v and "ptlm" in all_adapters:
                half.setdefault(_label({**p, "base_pct": 0}, with_t=False), []).append(
                    f"T{p['T']} {v['ptlm'] / all_adapters['ptlm']:.2f}")
        lines += [f"50% base-only rows, ptlm / all rows with adapters, {case} [{timing}]: {' '.join(cells)}"
                  for case, cells in half.items()]
    timing = "graph" if any(t == "graph" for _, _, t, _ in cases) else "plain"   # plain rows are host-bound
    for other, what in (("ptlm_tma", "prefill, pointer tile / TMA tile over sorted rows"),
                        ("ptlm_in_loop", "decode, the expand after the K loop / inside it"),
                        ("ptlm_one_launch", "a shrink launch + the matmul / one launch")):
        passes = [f"{_label(p)} {mode} {v['ptlm'] / v[other]:.2f}" for p, mode, t, v in cases
                  if t == timing and "ptlm" in v and other in v]
        if passes:
            lines.append(f"{what} (ptlm / {other}) [{timing}]: {', '.join(passes)}")
    checks = target_checks(rows)
    return lines + (["Multi-adapter targets:"] + checks if checks else [])


# ---------------------------------------------------------------------------------------------------- command
def select(points: list[dict], args) -> list[dict]:
    """The points matching every list given on the command line."""
    wanted = {"adapters": args.adapters, "assign": args.assign, "r": args.ranks, "base_pct": args.base_pct,
              "T": args.tokens}

    def keep(p):
        return ((args.shapes is None or (p["d_in"], p["d_out"]) in args.shapes)
                and all(values is None or p[k] in values for k, values in wanted.items()))
    return [p for p in points if keep(p)]


def parse_ranks(text: str) -> list:
    return [v if v == "mixed" else int(v) for v in text.split(",") if v]


def main(argv: list[str] | None = None) -> harness.Results:
    p = harness.bench_parser(__doc__, "lora_multi", harness.LAYER_SMOKE)
    p.add_argument("--full", action="store_true", help="every shape x T x A x assignment x rank x base-only "
                   "share, both modes (default: the suite's grid)")
    p.add_argument("--shapes", type=parse_shapes, help="only these d_inxd_out, e.g. 4096x4096")
    p.add_argument("--tokens", type=parse_ints, help="only these T, e.g. 16,4096")
    p.add_argument("--adapters", type=parse_ints, help="only these A, e.g. 4,128")
    p.add_argument("--assign", type=lambda s: s.split(","), help="only these assignments: uniform,zipf")
    p.add_argument("--ranks", type=parse_ranks, help="only these ranks: 16,mixed")
    p.add_argument("--base-pct", type=parse_ints, help="only these shares of base-only rows: 0,50")
    harness.add_grid_arguments(p, PROVIDERS, MODES)
    args = p.parse_args(argv)
    start = time.monotonic()
    device = harness.pick_device(args.smoke)
    points = {mode: select(pts, args) for mode, pts in points_by_mode(args.smoke, args.full, args.modes).items()}
    graph = args.graph and device.type == "cuda"
    return harness.run_layer_bench(args, start, device,
                                   phases(points, args.providers, device, graph, layer_dtype(device)), OP, TABLE,
                                   "lora_multi", ptlm_backend(torch.empty(1, device=device, dtype=torch.bfloat16)),
                                   lambda r: summary(r.rows), target_checks)


if __name__ == "__main__":
    main()
