"""Base-model ops benchmark: RMSNorm, silu(gate) * up, RoPE and the causal-LM loss at the LoRA training step's
shapes (Llama-shaped: hidden 2048, FFN 5632, 32 heads / 8 KV heads of 64, vocab 32000, batch 8 x 1024 tokens),
providers side by side.

Kernels (T = 8192 rows):
  rms_norm  x (T, 2048), a frozen weight (the base's norms: dweight is not computed), eps 1e-6
  silu_mul  gate, up (T, 5632)
  rotary    q (8, 32, 1024, 64) and k (8, 8, 1024, 64) as HF passes them (transposed views of the (B, L, H, D)
            projections, taken inside each call: a view made outside would run its backward on the stream it
            was made on, which invalidates a CUDA-graph capture), cos / sin (1, 1024, 64): one table for the
            batch, as HF's model computes it
  cross_entropy  hidden (T, 2048), a frozen lm_head weight (32000, 2048), targets (T,): the mean loss; fwd+bwd
            takes hidden's gradient (the LoRA step's: the head is frozen). Also the peak memory of one call above
            its inputs (torch.cuda.max_memory_allocated), per provider, in the rows (peak_mb) and the notes.
Providers ("fwd" under torch.no_grad; "fwd+bwd" also takes the gradients of x / gate and up / q and k with
torch.autograd.grad against random output gradients):
  hf        transformers' own code, eager: LlamaRMSNorm, ACT2FN["silu"](gate) * up, apply_rotary_pos_emb,
            ForCausalLMLoss's cross_entropy(lm_head(hidden).float(), targets)
  compiled  torch.compile (inductor) of the same formulas (ptlm_engine.reference); CUDA only
  ptlm      ptlm_engine.functional.rms_norm / silu_mul / apply_rotary (the fused Triton kernels),
            linear_cross_entropy (chunked logits, the loss kernel computing the gradient in place)
  floor     not timed: bytes / copy bandwidth with the ceilings of the same run

Floor (b bytes per element; the flops are negligible):
  rms_norm  fwd  b(2Td + d) + 4T                        fwd+bwd  b(5Td + 2d) + 8T     (rstd: 4 bytes a row)
  silu_mul  fwd  3bTF                                   fwd+bwd  8bTF
  rotary    fwd  b(2B(Hq + Hk)LD + 2LD)                 fwd+bwd  twice the forward
  cross_entropy  compute-bound: fwd 2TdV flops (the logits), fwd+bwd 4TdV (and grad_hidden); bytes b(Td + Vd) + 8T,
            fwd+bwd + bTd
At the shapes above in bf16: rms_norm 22.4 / 56.0 us, silu_mul 92.3 / 246.1 us, rotary 28.0 / 56.1 us (3.0 TB/s),
cross_entropy 1.36 / 2.72 ms (790 TFLOP/s; the loss kernel's own bytes, 2bTV = 1.05 GB, another 350 us at 3.0 TB/s).

    python -m bench.base_ops --out DIR [--kernels rms_norm,cross_entropy] [--graph] [--providers ...] [--modes fwd]
    python -m bench.base_ops --smoke --out DIR          # tiny shapes on CPU (PTLM_BACKEND=reference)
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from bench import harness
from bench.lora import ptlm_backend

OP = "base_ops"
# kernel -> its dims: rms_norm (T, d); silu_mul (T, F); rotary (B, Hq, Hk, L, D); cross_entropy (T, d, V)
SHAPES = {"rms_norm": (8192, 2048), "silu_mul": (8192, 5632), "rotary": (8, 32, 8, 1024, 64),
          "cross_entropy": (8192, 2048, 32000)}
SMOKE_SHAPES = {"rms_norm": (64, 96), "silu_mul": (64, 160), "rotary": (2, 4, 2, 16, 16), "cross_entropy": (64, 32, 97)}
PROVIDERS = ["floor", "hf", "compiled", "ptlm"]
MODES = ["fwd", "fwd+bwd"]
EPS = 1e-6

TABLE = harness.table_spec(keys=["kernel", "dims"], values=["ms", "gbps"],
                           ratios=[("ptlm", "hf", "ms"), ("ptlm", "compiled", "ms"), ("ptlm", "floor", "ms")])


# ------------------------------------------------------------------------------------------------ the grid
def dims(shape: dict) -> tuple[int, ...]:
    return tuple(int(n) for n in shape["dims"].split("x"))


def cost(shape: dict, mode: str, elem_bytes: int = 2) -> tuple[float, float]:
    """(bytes, flops) of the floor."""
    b, kernel, n = elem_bytes, shape["kernel"], dims(shape)
    if kernel == "cross_entropy":
        t, d, v = n
        fwd = b * (t * d + v * d) + 8 * t
        return (fwd, 2.0 * t * d * v) if mode == "fwd" else (fwd + b * t * d, 4.0 * t * d * v)
    if kernel == "rms_norm":
        t, d = n
        fwd, bwd = b * (2 * t * d + d) + 4 * t, b * (3 * t * d + d) + 4 * t
    elif kernel == "silu_mul":
        t, f = n
        fwd, bwd = 3 * b * t * f, 5 * b * t * f
    else:
        batch, hq, hk, length, d = n
        fwd = b * (2 * batch * (hq + hk) * length * d + 2 * length * d)
        bwd = fwd
    return (fwd if mode == "fwd" else fwd + bwd), 0.0


@dataclass
class OpSet:
    """One rotating set of inputs: the op's inputs (those in `wrt` require grad), its output gradient(s)."""
    inputs: tuple
    wrt: list
    dy: object


def make_sets(shape: dict, n: int, device: torch.device, dtype: torch.dtype) -> list[OpSet]:
    def rand(*size, grad=False, std=1.0):
        return (torch.randn(*size, device=device, dtype=dtype) * std).requires_grad_(grad)

    kernel, d = shape["kernel"], dims(shape)
    sets = []
    for _ in range(n):
        if kernel == "rms_norm":
            x = rand(*d, grad=True)
            sets.append(OpSet((x, rand(d[1], std=0.1) + 1), [x], rand(*d)))
        elif kernel == "cross_entropy":
            t, hidden_size, vocab = d
            hidden = rand(t, hidden_size, grad=True)
            targets = torch.randint(0, vocab, (t,), device=device)
            sets.append(OpSet((hidden, rand(vocab, hidden_size, std=hidden_size ** -0.5), targets), [hidden],
                              torch.ones((), device=device)))
        elif kernel == "silu_mul":
            gate, up = rand(*d, grad=True, std=2.0), rand(*d, grad=True)
            sets.append(OpSet((gate, up), [gate, up], rand(*d)))
        else:
            batch, hq, hk, length, hd = d
            q, k = rand(batch, length, hq, hd, grad=True), rand(batch, length, hk, hd, grad=True)  # the projections
            angles = torch.rand(1, length, hd, device=device) * 6.3
            sets.append(OpSet((q, k, angles.cos().to(dtype), angles.sin().to(dtype)),
                              [q, k], (rand(batch, hq, length, hd), rand(batch, hk, length, hd))))
    return sets


def set_bytes(shape: dict, elem_bytes: int = 2) -> int:
    return int(cost(shape, "fwd", elem_bytes)[0])


def _rotary_args(s: OpSet) -> tuple:
    """q, k as HF's attention passes them, (B, H, L, D) views of the projections; cos, sin."""
    q, k, cos, sin = s.inputs
    return q.transpose(1, 2), k.transpose(1, 2), cos, sin


def _hf(kernel: str, s: OpSet):
    if kernel == "cross_entropy":  # transformers' ForCausalLMLoss on the lm_head's logits
        hidden, weight, targets = s.inputs
        return lambda: torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight).float(), targets)
    if kernel == "rms_norm":
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
        x, weight = s.inputs
        norm = LlamaRMSNorm(weight.shape[0], eps=EPS).to(x.device, x.dtype).requires_grad_(False)
        norm.weight.copy_(weight)
        return lambda: norm(x)
    if kernel == "silu_mul":
        from transformers.activations import ACT2FN
        act, (gate, up) = ACT2FN["silu"], s.inputs
        return lambda: act(gate) * up
    from transformers.models.llama import modeling_llama
    rotary = modeling_llama.apply_rotary_pos_emb
    rotary = getattr(rotary, "ptlm_original", rotary)            # transformers' own, even under fuse_base_ops
    return lambda: rotary(*_rotary_args(s))


def _compiled(kernel: str, s: OpSet):
    from ptlm_engine import reference
    if kernel == "cross_entropy":
        fn = torch.compile(reference.linear_cross_entropy)
        return lambda: fn(*s.inputs)
    if kernel == "rms_norm":
        fn = torch.compile(reference.rms_norm)
        return lambda: fn(*s.inputs, EPS)
    if kernel == "silu_mul":
        fn = torch.compile(reference.silu_mul)
        return lambda: fn(*s.inputs)
    fn = torch.compile(reference.apply_rotary)
    return lambda: fn(*_rotary_args(s))


def _ptlm(kernel: str, s: OpSet):
    from ptlm_engine import functional
    if s.wrt[0].is_cuda and ptlm_backend(s.wrt[0]) != "triton":
        raise RuntimeError("ptlm would run its PyTorch reference on CUDA, not the Triton kernels: is the "
                           "package installed (ptlm_engine.kernels importable) and PTLM_BACKEND unset?")
    if kernel == "cross_entropy":
        return lambda: functional.linear_cross_entropy(*s.inputs)
    if kernel == "rms_norm":
        return lambda: functional.rms_norm(*s.inputs, EPS)
    if kernel == "silu_mul":
        return lambda: functional.silu_mul(*s.inputs)
    return lambda: functional.apply_rotary(*_rotary_args(s))


FORWARDS = {"hf": _hf, "compiled": _compiled, "ptlm": _ptlm}


# (kernel, dims, provider, mode) -> peak memory of one call above its inputs, MB (CUDA; the loss only)
PEAK_MB: dict[tuple, float] = {}


def peak_mb(call, device: torch.device) -> float:
    """Memory one call (after a warm-up call) allocates at its peak above what was allocated before it, MB."""
    call()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    call()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20


def make_calls(shape: dict, provider: str, mode: str, sets: list[OpSet]):
    if provider == "compiled" and not sets[0].wrt[0].is_cuda:
        return None                                   # inductor on the CPU: a C++ build per shape, not worth a smoke
    calls = harness.mode_calls([(FORWARDS[provider](shape["kernel"], s), s.wrt, s.dy) for s in sets], mode)
    if shape["kernel"] == "cross_entropy" and sets[0].wrt[0].is_cuda:
        PEAK_MB[(shape["kernel"], shape["dims"], provider, mode)] = peak_mb(calls[0], sets[0].wrt[0].device)
    return calls


def memory_notes(rows: list[dict]) -> list[str]:
    """peak_mb into the rows measured (plain timing), and one note per loss case: each provider's peak memory."""
    for row in rows:
        key = (row.get("kernel"), row.get("dims"), row["provider"], row["mode"])
        if key in PEAK_MB and row["timing"] == "plain":
            row["peak_mb"] = PEAK_MB[key]
    cases: dict[tuple, list[str]] = {}
    for (kernel, dim, provider, mode), mb in PEAK_MB.items():
        cases.setdefault((kernel, dim, mode), []).append(f"{provider} {mb:.0f}")
    return [f"{kernel} {dim} {mode}: peak memory above the inputs, MB: {', '.join(v)}"
            for (kernel, dim, mode), v in cases.items()]


def grid(shapes: dict, providers, modes, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> harness.Grid:
    elem = torch.finfo(dtype).bits // 8
    points = [{"kernel": kernel, "dims": "x".join(map(str, d))} for kernel, d in shapes.items()]
    return harness.Grid(op=OP, shapes=points, providers=list(providers), modes=list(modes),
                        make_sets=lambda shape, n: make_sets(shape, n, device, dtype),
                        set_bytes=lambda shape: set_bytes(shape, elem),
                        make_calls=make_calls,
                        cost=lambda shape, mode: cost(shape, mode, elem))


# ------------------------------------------------------------------------------------------------- summaries
def compact_table(rows: list[dict], timing: str = "plain") -> list[str]:
    """One line per kernel and mode: every provider's ms, ptlm's GB/s, its speed-up on HF and share of the floor."""
    cases: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        if row["op"] == OP and row.get("ms") and row["timing"] in (timing, "floor"):
            cases.setdefault((row["kernel"], row["dims"], row["mode"]), {})[row["provider"]] = row
    if not any(set(v) - {"floor"} for v in cases.values()):
        return []
    timed = [p for p in PROVIDERS if any(p in v for v in cases.values())]
    lines = [f"Base-model ops, ms ({timing} launches)",
             f"{'kernel':>13} {'dims':>18} {'mode':>8} | " + " ".join(f"{p:>9}" for p in timed)
             + f" | {'ptlm GB/s':>9} {'hf/ptlm':>7} {'%floor':>6}"]
    for (kernel, dim, mode), v in cases.items():
        cells = " ".join(f"{v[p]['ms']:9.4f}" if p in v else f"{'-':>9}" for p in timed)
        ptlm = v.get("ptlm")
        gbps = f"{ptlm['gbps']:9.0f}" if ptlm else f"{'-':>9}"
        speedup = f"{v['hf']['ms'] / ptlm['ms']:7.2f}" if ptlm and "hf" in v else f"{'-':>7}"
        share = f"{100 * v['floor']['ms'] / ptlm['ms']:6.0f}" if ptlm and "floor" in v else f"{'-':>6}"
        lines.append(f"{kernel:>13} {dim:>18} {mode:>8} | {cells} | {gbps} {speedup} {share}")
    return lines


# ---------------------------------------------------------------------------------------------------- command
def main(argv: list[str] | None = None) -> harness.Results:
    p = harness.bench_parser(__doc__, "base_ops", harness.LAYER_SMOKE)
    p.add_argument("--kernels", type=lambda s: s.split(","), default=list(SHAPES), help=",".join(SHAPES))
    harness.add_grid_arguments(p, PROVIDERS, MODES)
    args = p.parse_args(argv)
    start = time.monotonic()
    device = harness.pick_device(args.smoke)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    table = SMOKE_SHAPES if args.smoke else SHAPES
    unknown = set(args.kernels) - table.keys()
    if unknown:
        p.error(f"unknown kernels {sorted(unknown)}: choose from {','.join(table)}")
    g = grid({k: table[k] for k in args.kernels}, args.providers, args.modes, device, dtype)
    return harness.run_layer_bench(args, start, device, [(None, g, args.graph and device.type == "cuda")], OP, TABLE,
                                   "base_ops", ptlm_backend(torch.empty(1, device=device, dtype=dtype)),
                                   lambda r: compact_table(r.rows) + compact_table(r.rows, "graph") + r.notes,
                                   checks=memory_notes, dtype=str(dtype).removeprefix("torch."))


if __name__ == "__main__":
    main()
