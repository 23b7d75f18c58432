"""LoRA-on-embeddings benchmark: y = E[ids] + s · A[:, ids]ᵀ Bᵀ (HF PEFT's LoRA Embedding), providers side by side.

A case is (V, d, r, T, adapters): adapters = 1 is one adapter on every token; adapters = 8 a mixed batch, every
token on one of 8 adapters (T/8 rows each, in a seeded random order), through the multi-adapter op with the
batch's token segments computed once (as a model's batch does).

Providers ("fwd" under torch.no_grad; "fwd+bwd" also takes the gradients of A and B with torch.autograd.grad
against a random dy; the table is frozen):
  lookup    F.embedding(ids, E) alone: the base model's cost
  eager     F.embedding(ids, E) + s · (F.embedding(ids, Aᵀ) @ Bᵀ) in plain PyTorch (one adapter), which is
            PEFT's LoRA Embedding forward without its module overhead
  peft      peft.tuners.lora.Embedding over an nn.Embedding holding E (one adapter)
  ptlm      ptlm_engine.functional.lora_embedding (one adapter) or lora_embedding_multi (mixed batch)
  floor     not timed: bytes / copy bandwidth with the ceilings of the same run

Floor (b bytes per element; A adapters used; r-wide reads of A: one 2-byte element per rank and token):
  fwd      bytes = b·(2·T·d + T·r + A·d·r)            E's rows read, y written, A's columns and B read
  fwd+bwd  bytes = fwd + b·(T·d + 2·A·d·r + A·r·V)    dy read, dB written, dA (r, V) written (PEFT's dense grad)
Flops (2·T·d·r fwd) are negligible. No target in the issues; ptlm should sit near `lookup` at every T.

    python -m bench.lora_embedding --out DIR [--vocab 32000] [--dims 4096] [--ranks 16] [--tokens 1,64,4096,16384] \\
        [--adapters 1,8] [--providers ...] [--modes fwd,fwd+bwd] [--graph] [--budget-s 120]
    python -m bench.lora_embedding --smoke --out DIR        # tiny shapes on CPU (PTLM_BACKEND=reference)
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench import harness
from bench.lora import parse_ints, ptlm_backend
from ptlm_engine.functional import LoraSlots, token_segments

OP = "lora_embedding"
VOCAB, DIMS, RANKS, TOKENS, ADAPTERS = [32000], [4096], [16], [1, 64, 4096, 16384], [1, 8]
PROVIDERS = ["floor", "lookup", "eager", "peft", "ptlm"]
MODES = ["fwd", "fwd+bwd"]
SCALE = 2.0
SEED = 0
SMOKE_VOCAB, SMOKE_DIMS, SMOKE_RANKS, SMOKE_TOKENS, SMOKE_ADAPTERS = [97], [64], [4], [1, 16], [1, 4]

KEYS = ["V", "d", "r", "T", "adapters"]
TABLE = harness.table_spec(keys=KEYS, ratios=[("ptlm", "lookup", "ms"), ("ptlm", "eager", "ms"),
                                              ("ptlm", "peft", "ms"), ("ptlm", "floor", "ms")])


def cost(shape: dict, mode: str, elem_bytes: int = 2) -> tuple[float, float]:
    v, d, r, t = shape["V"], shape["d"], shape["r"], shape["T"]
    used = min(shape["adapters"], t)
    fwd = elem_bytes * (2 * t * d + t * r + used * d * r)
    if mode == "fwd":
        return fwd, 2.0 * t * d * r
    return fwd + elem_bytes * (t * d + 2 * used * d * r + used * r * v), 6.0 * t * d * r


@dataclass
class EmbeddingSet:
    """One rotating set of inputs: random, never zero."""
    ids: torch.Tensor               # (T,)
    table: torch.Tensor             # (V, d), frozen
    slots: LoraSlots                # A (S, r, V), B (S, d, r), requiring grad
    index: torch.Tensor             # (T,) int32
    segments: tuple                 # token_segments(index, S)
    dy: torch.Tensor                # (T, d)


def make_sets(shape: dict, n: int, device: torch.device, dtype: torch.dtype) -> list[EmbeddingSet]:
    v, d, r, t, a = shape["V"], shape["d"], shape["r"], shape["T"], shape["adapters"]
    g = torch.Generator().manual_seed(SEED)
    index = ((torch.arange(t) % a)[torch.randperm(t, generator=g)]).to(device, torch.int32)
    sets = []
    for _ in range(n):
        slots = LoraSlots((torch.randn(a, r, v, device=device, dtype=dtype) * 0.1).requires_grad_(),
                          (torch.randn(a, d, r, device=device, dtype=dtype) * r ** -0.5).requires_grad_(),
                          torch.full((a,), r, device=device, dtype=torch.int32),
                          torch.full((a,), SCALE, device=device))
        sets.append(EmbeddingSet(torch.randint(0, v, (t,), device=device), torch.randn(v, d, device=device,
                                 dtype=dtype), slots, index, token_segments(index, a),
                                 torch.randn(t, d, device=device, dtype=dtype)))
    return sets


def set_bytes(shape: dict, elem_bytes: int = 2) -> int:
    v, d, r, t, a = shape["V"], shape["d"], shape["r"], shape["T"], shape["adapters"]
    return elem_bytes * (v * d + a * r * (v + d) + 2 * t * d)


def _peft_layer(s: EmbeddingSet):
    from peft import LoraConfig
    from peft.tuners.lora import Embedding
    base = torch.nn.Embedding.from_pretrained(s.table, freeze=True)
    r = s.slots.lora_A.shape[1]
    layer = Embedding(base, "default", LoraConfig(r=r, lora_alpha=SCALE * r), r=r, lora_alpha=SCALE * r)
    layer.lora_embedding_A["default"] = torch.nn.Parameter(s.slots.lora_A[0].detach().clone())
    layer.lora_embedding_B["default"] = torch.nn.Parameter(s.slots.lora_B[0].detach().clone())
    return layer, [layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]]


def _forward(provider: str, s: EmbeddingSet):
    """(forward of one set, the tensors whose gradients fwd+bwd takes)."""
    a, b = s.slots.lora_A, s.slots.lora_B
    if provider == "ptlm" and s.ids.is_cuda and ptlm_backend(s.table) != "triton":
        raise RuntimeError("ptlm would run its PyTorch reference on CUDA, not the Triton kernels: is the package "
                           "installed (ptlm_engine.kernels importable) and PTLM_BACKEND unset?")
    if provider == "lookup":
        return (lambda: F.embedding(s.ids, s.table)), []
    if provider == "eager":
        return (lambda: F.embedding(s.ids, s.table) + SCALE * (F.embedding(s.ids, a[0].t()) @ b[0].t())), [a, b]
    if provider == "peft":
        layer, params = _peft_layer(s)
        return (lambda: layer(s.ids)), params
    if provider == "ptlm" and a.shape[0] == 1:
        from ptlm_engine.functional import lora_embedding
        return (lambda: lora_embedding(s.ids, s.table, a[0], b[0], SCALE)), [a, b]
    if provider == "ptlm":
        from ptlm_engine.functional import lora_embedding_multi
        return (lambda: lora_embedding_multi(s.ids, s.table, s.slots, s.index, segments=s.segments)), [a, b]
    raise ValueError(f"unknown provider {provider!r}")


def make_calls(shape: dict, provider: str, mode: str, sets: list[EmbeddingSet]):
    if provider in ("eager", "peft") and shape["adapters"] != 1 or provider == "lookup" and mode != "fwd":
        return None
    return harness.mode_calls([(*_forward(provider, s), s.dy) for s in sets], mode)


def grid(vocab, dims, ranks, tokens, adapters, providers, modes, device: torch.device,
         dtype: torch.dtype = torch.bfloat16) -> harness.Grid:
    elem = torch.finfo(dtype).bits // 8
    shapes = [{"V": v, "d": d, "r": r, "T": t, "adapters": a}
              for v in vocab for d in dims for r in ranks for t in tokens for a in adapters]
    return harness.Grid(op=OP, shapes=shapes, providers=list(providers), modes=list(modes),
                        make_sets=lambda shape, n: make_sets(shape, n, device, dtype),
                        set_bytes=lambda shape: set_bytes(shape, elem),
                        make_calls=make_calls, cost=lambda shape, mode: cost(shape, mode, elem))


def main(argv: list[str] | None = None) -> harness.Results:
    p = harness.bench_parser(__doc__, "lora_embedding", harness.LAYER_SMOKE)
    for flag, what in (("--vocab", "V"), ("--dims", "d"), ("--ranks", "r"), ("--tokens", "T"),
                       ("--adapters", "adapters in the batch")):
        p.add_argument(flag, type=parse_ints, help=f"{what} list, comma-separated")
    harness.add_grid_arguments(p, PROVIDERS, MODES)
    args = p.parse_args(argv)
    start = time.monotonic()
    device = harness.pick_device(args.smoke)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    smoke = args.smoke
    g = grid(args.vocab or (SMOKE_VOCAB if smoke else VOCAB), args.dims or (SMOKE_DIMS if smoke else DIMS),
             args.ranks or (SMOKE_RANKS if smoke else RANKS), args.tokens or (SMOKE_TOKENS if smoke else TOKENS),
             args.adapters or (SMOKE_ADAPTERS if smoke else ADAPTERS), args.providers, args.modes, device, dtype)
    return harness.run_layer_bench(args, start, device, [(None, g, args.graph and device.type == "cuda")], OP, TABLE,
                                   "lora_embedding", ptlm_backend(torch.empty(1, device=device)),
                                   lambda r: r.notes, dtype=str(dtype).removeprefix("torch."))


if __name__ == "__main__":
    main()
