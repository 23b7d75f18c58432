"""Prefix-attention benchmark: causal attention over [prefix ; sequence] (prefix tuning), providers side by side.

q, k, v (B, H, L, D) and prefixes of P keys / values per head; bf16, causal. "fwd" runs under torch.no_grad,
"fwd+bwd" also takes the gradients of q, k, v and the prefix with torch.autograd.grad against a random dO.
  sdpa_causal     PyTorch SDPA, causal, over the sequence alone (no prefix): the targets' denominator
  ptlm            ptlm_engine.functional.prefix_attention, one prefix (1, H, P, D) shared by every row
                  (an expanded view; its gradient sums the rows); its default backward: one fused pass over
                  key blocks, dQ summed with fp32 atomics (dq_mode="atomic")
  ptlm_ptr        the same with the kernels' pointer loads (PTLM_PREFIX_TMA=0 for this provider only): on
                  Hopper ptlm's forward reads q, k, v through TMA descriptors (its backward does not: slower
                  on the H100, 2026-11-27)
  ptlm_tma        fwd+bwd only: the same with TMA in the backward too (PTLM_PREFIX_TMA=1 for this provider
                  only: q, dO through descriptors, dQ added with bulk reductions)
  ptlm_split      fwd+bwd only: the same with the split, atomic-free backward (dq_mode="split": a dK / dV
                  pass and a dQ pass; what torch.use_deterministic_algorithms(True) selects)
  ptlm_mixed      the same with a prefix per row (B, H, P, D) of mixed lengths (MIXED_FRACTIONS of P, 0 = none)
  sdpa_preconcat  SDPA over k, v already concatenated as [prefix ; seq] (outside the timed call), with the
                  lower-right causal mask (query i sees keys j <= i + P)
  sdpa_concat     the same with the concatenation inside the timed call (what a model without the kernel runs)
  floor           not timed: max(bytes / copy bandwidth, flops / GEMM peak) with the ceilings of the same run

Floor (e bytes per element; pairs = L (L + 1) / 2 + L P query-key pairs per (batch, head)):
  fwd      flops = 4 B H D pairs                       (q k^T and p v)
           bytes = e [4 B H L D + 2 H P D]             (read q, k, v and the shared prefix, write o)
  fwd+bwd  flops = 12 B H D pairs                      (+ dP, dV, dK, dQ; flash backwards, SDPA's and ptlm's
                                                        fused one included, also recompute s: 14; ptlm_split's
                                                        two passes recompute s and dP twice: 18)
           bytes = e [12 B H L D + 4 H P D]            (forward; backward reads q, k, v, o, dO, writes dq, dk, dv)
Every provider's TFLOP/s counts this same work (the prefixed op's pairs), so sdpa_causal, which skips the
prefix, shows the rate at which it would deliver the prefixed result if the prefix were free.
Targets (project brief): ptlm / sdpa_causal <= 1.15, forward and forward+backward; ptlm_mixed / ptlm <= 1.05.

    python -m bench.prefix_attention --out DIR [--lengths 512,2048] [--prefixes 16,64] [--graph]
    python -m bench.prefix_attention --smoke --out DIR      # tiny shapes on CPU (PTLM_BACKEND=reference)
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from bench import harness
from bench.lora import parse_ints

OP = "prefix_attention"
LENGTHS = [512, 2048, 8192]
PREFIXES = [16, 64, 256]
BATCH, HEADS, HEAD_DIM = 8, 32, 128
PROVIDERS = ["floor", "sdpa_causal", "ptlm", "ptlm_ptr", "ptlm_tma", "ptlm_split", "ptlm_mixed", "sdpa_preconcat",
             "sdpa_concat"]
MODES = ["fwd", "fwd+bwd"]
MIXED_FRACTIONS = (1.0, 0.75, 0.5, 0.25, 0.0, 1.0, 0.5, 0.25)    # row b's prefix length / P, cycled over rows

SMOKE = dict(lengths=[16, 40], prefixes=[4], batch=2, heads=2, head_dim=16)

TABLE = harness.table_spec(keys=["B", "H", "D", "L", "P"], values=["ms", "tflops"],
                           ratios=[("ptlm", "sdpa_causal", "ms"), ("ptlm", "ptlm_ptr", "ms"),
                                   ("ptlm", "ptlm_tma", "ms"), ("ptlm_split", "sdpa_causal", "ms"),
                                   ("ptlm", "ptlm_split", "ms"), ("ptlm_mixed", "ptlm", "ms"),
                                   ("ptlm", "sdpa_preconcat", "ms"), ("ptlm", "sdpa_concat", "ms"),
                                   ("ptlm", "floor", "ms")])
TARGETS = [("ptlm", "sdpa_causal", 1.15, "ptlm/sdpa_causal <= 1.15"),
           ("ptlm_mixed", "ptlm", 1.05, "ptlm_mixed/ptlm  <= 1.05")]


# ------------------------------------------------------------------------------------------------ the grid
def pairs(shape: dict) -> int:
    L, P = shape["L"], shape["P"]
    return L * (L + 1) // 2 + L * P


def cost(shape: dict, mode: str, elem_bytes: int = 2) -> tuple[float, float]:
    B, H, D, L, P = (shape[k] for k in ("B", "H", "D", "L", "P"))
    if mode == "fwd":
        return elem_bytes * (4 * B * H * L * D + 2 * H * P * D), 4 * B * H * D * pairs(shape)
    return elem_bytes * (12 * B * H * L * D + 4 * H * P * D), 12 * B * H * D * pairs(shape)


def mixed_lengths(shape: dict, device: torch.device) -> torch.Tensor:
    """(B,) int32: row b's prefix length, MIXED_FRACTIONS of P in turn."""
    fractions = [MIXED_FRACTIONS[b % len(MIXED_FRACTIONS)] for b in range(shape["B"])]
    return torch.tensor([round(f * shape["P"]) for f in fractions], dtype=torch.int32, device=device)


@dataclass
class AttentionSet:
    """One rotating set of inputs; every tensor a gradient is taken of is a leaf."""
    q: torch.Tensor          # (B, H, L, D)
    k: torch.Tensor          # (B, H, L, D)
    v: torch.Tensor          # (B, H, L, D)
    prefix_k: torch.Tensor   # (1, H, P, D), shared by every row
    prefix_v: torch.Tensor   # (1, H, P, D)
    rows_k: torch.Tensor     # (B, H, P, D), one prefix per row
    rows_v: torch.Tensor     # (B, H, P, D)
    do: torch.Tensor         # (B, H, L, D), the upstream gradient for fwd+bwd


def make_sets(shape: dict, n: int, device: torch.device, dtype: torch.dtype) -> list[AttentionSet]:
    B, H, D, L, P = (shape[k] for k in ("B", "H", "D", "L", "P"))
    rand = lambda *size: torch.randn(*size, device=device, dtype=dtype).requires_grad_()
    return [AttentionSet(rand(B, H, L, D), rand(B, H, L, D), rand(B, H, L, D), rand(1, H, P, D), rand(1, H, P, D),
                         rand(B, H, P, D), rand(B, H, P, D), torch.randn(B, H, L, D, device=device, dtype=dtype))
            for _ in range(n)]


def set_bytes(shape: dict, elem_bytes: int = 2) -> int:
    B, H, D, L, P = (shape[k] for k in ("B", "H", "D", "L", "P"))
    return elem_bytes * (4 * B * H * L * D + 2 * H * P * D + 2 * B * H * P * D)


def ptlm_backend(x: torch.Tensor) -> str:
    """Which implementation ptlm's prefix_attention runs for x: 'triton', 'reference', or why it cannot run."""
    try:
        from ptlm_engine.ops.prefix_attention import triton_enabled
        return "triton" if triton_enabled(x) else "reference"
    except Exception as e:  # noqa: BLE001 - recorded in the results; the ptlm rows then fail with the error
        return f"unavailable ({type(e).__name__}: {e})"[:200]


def _shared(s: AttentionSet) -> tuple[torch.Tensor, torch.Tensor]:
    B = s.q.shape[0]
    return s.prefix_k.expand(B, -1, -1, -1), s.prefix_v.expand(B, -1, -1, -1)


def _forward(provider: str, s: AttentionSet, lengths: torch.Tensor):
    """(forward of one set, the tensors whose gradients fwd+bwd takes)."""
    L, P = s.q.shape[2], s.prefix_k.shape[2]
    if provider == "sdpa_causal":
        return (lambda: F.scaled_dot_product_attention(s.q, s.k, s.v, is_causal=True)), [s.q, s.k, s.v]
    if provider in ("ptlm", "ptlm_ptr", "ptlm_tma", "ptlm_split", "ptlm_mixed"):
        from ptlm_engine.functional import prefix_attention
        from ptlm_engine.ops.prefix_attention import prefix_attention_op
        if s.q.is_cuda and ptlm_backend(s.q) != "triton":
            raise RuntimeError("ptlm would run its PyTorch reference on CUDA, not the Triton kernels: is the "
                               "package installed (ptlm_engine.kernels importable) and PTLM_BACKEND unset?")
        if provider in ("ptlm", "ptlm_ptr", "ptlm_tma"):
            return (lambda: prefix_attention(s.q, s.k, s.v, *_shared(s))), [s.q, s.k, s.v, s.prefix_k, s.prefix_v]
        if provider == "ptlm_split":
            return ((lambda: prefix_attention_op(s.q, s.k, s.v, *_shared(s), None, True, None, None, dq_mode="split")),
                    [s.q, s.k, s.v, s.prefix_k, s.prefix_v])
        return ((lambda: prefix_attention(s.q, s.k, s.v, s.rows_k, s.rows_v, lengths)),
                [s.q, s.k, s.v, s.rows_k, s.rows_v])
    mask = causal_lower_right(L, L + P)
    if provider == "sdpa_preconcat":
        pk, pv = _shared(s)
        kc = torch.cat([pk, s.k], 2).detach().requires_grad_()
        vc = torch.cat([pv, s.v], 2).detach().requires_grad_()
        return (lambda: F.scaled_dot_product_attention(s.q, kc, vc, attn_mask=mask)), [s.q, kc, vc]
    if provider == "sdpa_concat":
        def concat_then_attend():
            pk, pv = _shared(s)
            return F.scaled_dot_product_attention(s.q, torch.cat([pk, s.k], 2), torch.cat([pv, s.v], 2),
                                                  attn_mask=mask)
        return concat_then_attend, [s.q, s.k, s.v, s.prefix_k, s.prefix_v]
    raise ValueError(f"unknown provider {provider!r}")


def make_calls(shape: dict, provider: str, mode: str, sets: list[AttentionSet]):
    if provider in ("ptlm_split", "ptlm_tma") and mode == "fwd":  # the same forward as ptlm
        return None
    lengths = mixed_lengths(shape, sets[0].q.device)
    calls = harness.mode_calls([(*_forward(provider, s, lengths), s.do) for s in sets], mode)
    if provider in ("ptlm_ptr", "ptlm_tma"):  # the same kernels with TMA off, or on in the backward too
        from ptlm_engine.kernels import prefix_attention as kernels
        return [harness.with_setting(kernels, "TMA", provider == "ptlm_tma", call) for call in calls]
    return calls


def grid(lengths, prefixes, batch, heads, head_dim, providers, modes, device: torch.device,
         dtype: torch.dtype = torch.bfloat16) -> harness.Grid:
    elem = torch.finfo(dtype).bits // 8
    shapes = [{"B": batch, "H": heads, "D": head_dim, "L": L, "P": P} for L in lengths for P in prefixes]
    return harness.Grid(op=OP, shapes=shapes, providers=list(providers), modes=list(modes),
                        make_sets=lambda shape, n: make_sets(shape, n, device, dtype),
                        set_bytes=lambda shape: set_bytes(shape, elem),
                        make_calls=make_calls,
                        cost=lambda shape, mode: cost(shape, mode, elem))


# ------------------------------------------------------------------------------------------------- summaries
def _by_case(rows: list[dict]) -> dict[tuple, dict]:
    """(timing, mode, L, P) -> {provider: ms}."""
    by: dict[tuple, dict] = {}
    for row in rows:
        if row["op"] == OP and row.get("ms") and row["timing"] in ("plain", "graph", "floor"):
            timing = "plain" if row["timing"] == "floor" else row["timing"]
            by.setdefault((timing, row["mode"], row["L"], row["P"]), {})[row["provider"]] = row["ms"]
    return by


def target_checks(rows: list[dict]) -> list[str]:
    """One line per target, mode and timing: how many cases pass and the worst one."""
    by = _by_case(rows)
    lines = []
    for timing in ("plain", "graph"):
        for num, den, limit, label in TARGETS:
            for mode in MODES:
                ratios = {(L, P): v[num] / v[den] for (t, m, L, P), v in by.items()
                          if t == timing and m == mode and num in v and den in v}
                if not ratios:
                    continue
                worst = max(ratios, key=ratios.get)
                passed = sum(r <= limit for r in ratios.values())
                lines.append(f"{label} {mode:7s} [{timing}]: {passed}/{len(ratios)} pass; worst "
                             f"{ratios[worst]:.2f} at L={worst[0]} P={worst[1]}")
    return lines


def compact_table(rows: list[dict], timing: str = "plain") -> list[str]:
    """One line per (mode, L, P): every provider's ms and ptlm's TFLOP/s, ptlm / sdpa_causal."""
    by = _by_case(rows)
    flops = {(r["mode"], r["L"], r["P"]): r["tflops"] for r in rows
             if r["op"] == OP and r["provider"] == "ptlm" and r.get("tflops") and r["timing"] == timing}
    names = [p for p in PROVIDERS if any(p in v for v in by.values())]
    if not names:
        return []
    lines = [f"Prefix attention, bf16, causal, ms ({timing} launches)",
             f"{'mode':7s} {'L':>5} {'P':>4} | " + " ".join(f"{p:>14}" for p in names)
             + f" | {'ptlm TFLOP/s':>12} {'ptlm/sdpa_causal':>16}"]
    for (t, mode, L, P), v in by.items():
        if t != timing:
            continue
        cells = " ".join(f"{v[p]:14.3f}" if p in v else f"{'-':>14}" for p in names)
        ratio = f"{v['ptlm'] / v['sdpa_causal']:16.2f}" if "ptlm" in v and "sdpa_causal" in v else f"{'-':>16}"
        tf = flops.get((mode, L, P))
        lines.append(f"{mode:7s} {L:>5} {P:>4} | {cells} | {tf if tf is None else round(tf, 1)!s:>12} {ratio}")
    return lines


# ---------------------------------------------------------------------------------------------------- command
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lengths", type=parse_ints, help="L list, e.g. 512,2048")
    p.add_argument("--prefixes", type=parse_ints, help="P list, e.g. 16,64")
    p.add_argument("--batch", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--head-dim", type=int)
    harness.add_grid_arguments(p, PROVIDERS, MODES)


def main(argv: list[str] | None = None) -> harness.Results:
    p = harness.bench_parser(__doc__, "prefix_attention", harness.LAYER_SMOKE)
    add_arguments(p)
    args = p.parse_args(argv)
    start = time.monotonic()
    device = harness.pick_device(args.smoke)
    sizes = dict(SMOKE) if args.smoke else dict(lengths=LENGTHS, prefixes=PREFIXES, batch=BATCH, heads=HEADS,
                                                head_dim=HEAD_DIM)
    sizes.update({k: getattr(args, k) for k in sizes if getattr(args, k) is not None})
    g = grid(**sizes, providers=args.providers, modes=args.modes, device=device)
    probe = torch.empty(1, device=device, dtype=torch.bfloat16)
    return harness.run_layer_bench(args, start, device, [(None, g, args.graph and device.type == "cuda")], OP, TABLE,
                                   "prefix_attention", ptlm_backend(probe),
                                   lambda r: compact_table(r.rows) + r.notes, target_checks,
                                   mixed_fractions=list(MIXED_FRACTIONS))


if __name__ == "__main__":
    main()
