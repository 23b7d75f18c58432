"""Host-side cost (CPU time to issue the work, no device compute) of a LoRA training step and of ptlm's LoRA ops.

On a slow host a small-batch step is partly host-bound: every eager PyTorch op costs tens of microseconds to
dispatch there and every Triton launch about as much. This tool runs the same Python paths with the device work
taken out, so that providers can be compared and regressions caught on any CPU:

- Triton launches are stubbed: triton's JITFunction.run (InterpretedFunction.run under TRITON_INTERPRET=1) and
  Autotuner.run count the call and return; Autotuner.best_config is the first config (no tuning).
  PTLM_BACKEND=triton forces ptlm's Triton path (its host code) on non-CUDA tensors; PTLM_AUTOTUNE=0.
  `--tma h100` (default) takes the Hopper TMA prefill path where a bf16 run on the H100 takes it (T > 64;
  kernels.lora._tma_programs answers 132 SMs, everything after it runs as on the card: descriptors, pre-hooks).
- Layer ops (ptlm_engine.functional.lora_linear; lora_linear_grouped for q/k/v; lora_linear_multi with its
  segments given, 4 slots) run on the `meta` device at the real shapes (d = 2048, k / v 512, r = 16, bf16 base,
  fp32 adapters as ptlm's layers pass them, T = 1 and 8192): the tensors have no storage and the ops ptlm calls
  there (empty, zeros, views, randint) have C++ meta kernels. The same ops on the CPU at d = 64, T = 1 stand
  beside `eager` (x W^T + s·dropout(x) A^T B^T in plain PyTorch, fp32), the yardstick: its elementwise ops have
  only Python meta kernels (below). fwd: under no_grad, no dropout; fwd+bwd: dropout 0.05, autograd.grad of x
  and the adapters.
- The eager decode step of mixed-batch serving (`decode`; bench/model_generate.py's model and providers: base,
  ptlm_one, ptlm_mixed inside `pe.adapter_batch(static=True)`, peft_mixed with `adapter_names=`): one token per
  row of a batch of 64 (32 adapters round-robin, LoRA r=16 on the 7 projections) on a DynamicCache of an 8-token
  prompt, cropped back after each step, the same 16-layer tiny-width decoder in float32 on the CPU. This is the
  host cost `model.generate` pays per token inside `pe.adapter_batch` without CUDA graphs.
- The training step (bench/model_train.py: llama_config, build_model, add_lora; forward with labels, backward,
  AdamW(foreach=True, the CUDA default), zero_grad) runs on the CPU as a proxy of the same structure: 16 layers,
  32 / 8 heads, LoRA r=16 on the 7 projections with dropout 0.05, but hidden 64, FFN 128, vocab 256, batch 8 x 16
  tokens (T = 128 > 64: the prefill paths), float32 (the CPU has no fast bf16 GEMM), one thread, denormals
  flushed (stubbed kernels leave their outputs uninitialised). The compute left is a few microseconds per op.
  Not `meta`: most elementwise ops' meta kernels are Python (torch._refs / _prims), 100-300 us each against
  ~4 us on the CPU (mul, dropout, silu), so a meta step measures those. `--model-device meta` runs it anyway,
  at the full size in bf16 (transformers' packed-sequence check, a .item(), is replaced by its ops without the
  sync; torch.is_autocast_enabled answers False for "meta", where torch raises).

Per row: host µs, the median and the minimum of --steps steps / --reps calls after warm-up (the cases interleaved
in rounds, gc off while timing; on a shared VM the median moves by up to 2x between runs, the minimum by ~5%:
compare minimums for regressions), aten ops dispatched (a TorchDispatchMode), torch API calls from Python (a
TorchFunctionMode: functions, Tensor methods and attribute reads), Triton launches, all per step / call; the counts
come from a separate pass. For the ptlm step, the top functions by own time (cProfile over --profile-steps steps,
per step; cProfile inflates small Python calls). Triton's own launch work (argument binding, the driver call, and
for TMA kernels encoding each descriptor) is not in host µs: `+launches` adds --launch-us (24 µs: one 21-argument
launch on the H100's host, 2026-11-26) per launch.

measured 2026-11-26 on this CPU (AMD EPYC VM, 2 vCPUs; torch 2.13.0+cpu, triton 3.8.0, transformers 5.24.0, peft
0.21.2; --steps 40 --reps 400; the H100's host is slower), median / min: training step PEFT 111 / 88.5 ms (7093
aten ops, 4189 torch calls), ptlm 107 / 81.6 ms (4587 aten ops, 13841 torch calls) plus 509 Triton launches
(+12 ms at 24 µs); one layer fwd+bwd at T = 8192: lora_linear 497 / 347 µs (5 launches), grouped q/k/v
1016 / 844 µs (13); at T = 1 on the CPU, lora_linear 259 / 233 µs (3 launches) against eager 253 / 220 µs
(41 aten ops). Eager decode step (2026-11-27, --steps 40, results/cpu-2026-11-27-host-decode.*), median / min:
base 28.1 / 23.2 ms, ptlm_one 43.5 / 31.4 (64 launches), ptlm_mixed 45.4 / 33.9 (128 launches; 1.46x base by the
minimum), peft_mixed 600 / 499 (21x base).

    python -m bench.host_overhead --out DIR [--parts model,layers,decode] [--providers peft,ptlm] [--steps 10] \\
        [--warmup 3] [--reps 200] [--profile-steps 3] [--tma h100|off] [--model-device cpu|meta]
    python -m bench.host_overhead --smoke --out DIR      # 2 layers, a few steps / calls: seconds
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import json
import os
import pstats
import statistics
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import ptlm_engine as pe
from bench import harness, model_generate, model_train

STEM = "host_overhead"
# ptlm_fused: ptlm + pe.fuse_base_ops (its RoPE patch fuses only inside the fused model's attention, so the
# providers' steps can interleave)
PROVIDERS = ["peft", "ptlm", "ptlm_fused"]
PARTS = ["model", "layers", "decode"]
DECODE_PROVIDERS = ["base", "ptlm_one", "ptlm_mixed", "peft_mixed"]
LAUNCH_US = 24.0          # one Triton launch with ~21 arguments on the H100's host (2026-11-26)
H100_SMS = 132
REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------- the stubbed device
class HostOnly:
    """While entered: Triton launches counted and skipped, ptlm forced onto its Triton path, the H100's TMA choice
    (with tma), one CPU thread, denormals flushed. Everything is put back on exit (the kernels' chosen configs
    too, so a test process keeps its own)."""

    def __init__(self, tma: bool = True):
        self.tma = tma
        self.launches = 0

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        try:
            self._patch()
        except BaseException:
            self._stack.close()
            raise
        return self

    def _patch(self) -> None:
        import triton.runtime.autotuner as autotuner
        import triton.runtime.jit as jit
        self._stack.enter_context(harness.env_vars(PTLM_BACKEND="triton", PTLM_AUTOTUNE="0"))
        from ptlm_engine.kernels import lora as lora_kernels
        from ptlm_engine.kernels import tuned

        def count(*args, **kwargs):
            self.launches += 1

        targets = [(jit.JITFunction, "run"), (autotuner.Autotuner, "run")]
        try:
            from triton.runtime.interpreter import InterpretedFunction
            targets.append((InterpretedFunction, "run"))
        except ImportError:  # pragma: no cover - older Triton
            pass
        for cls, name in targets:
            self._stack.enter_context(harness.patched(cls, name, count))
        self._stack.enter_context(harness.patched(autotuner.Autotuner, "best_config",
                                           property(lambda at: at.configs[0], lambda at, value: None)))
        if self.tma:
            self._stack.enter_context(harness.patched(lora_kernels, "_tma_programs", _h100_tma_programs))
        chosen = [(launcher, dict(launcher.configs)) for launcher in tuned.LAUNCHERS]
        self._stack.callback(lambda: [setattr(launcher, "configs", saved) for launcher, saved in chosen])
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self._stack.callback(torch.set_num_threads, threads)
        torch.set_flush_denormal(True)
        self._stack.callback(torch.set_flush_denormal, False)

    def __exit__(self, *exc):
        self._stack.close()


def _h100_tma_programs(x: torch.Tensor, M: int, min_tokens: int | None = None) -> int:
    """kernels.lora._tma_programs as it answers for a bf16 layer on the H100 (132 SMs): the device checks left
    out, the switches (PTLM_TMA_PREFILL, a disabled TMA path) and the caller's token threshold kept."""
    from ptlm_engine.kernels import lora as lora_kernels
    min_tokens = lora_kernels.DECODE_MAX_T if min_tokens is None else min_tokens
    if lora_kernels.TMA_PREFILL is False or (lora_kernels.TMA_PREFILL is None and (
            M <= min_tokens or lora_kernels.tma_error is not None)):
        return 0
    return H100_SMS


@contextlib.contextmanager
def _meta_model_patches():
    """What a Hugging Face training step needs to run on `meta` (see the module docstring)."""
    import transformers.masking_utils as masking
    is_autocast_enabled = torch.is_autocast_enabled

    def no_packed_sequences(position_ids):
        # the original's ops, without its `.all()` (an .item(): a sync on CUDA, an error on meta): None means
        # one sequence per row, which is what these inputs are
        first = position_ids[:, :1] - 1
        packed = (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)
        packed[:, -1] == 0  # noqa: B015 - the comparison the original reduces
        return None

    def autocast_enabled(*args):
        return False if args and args[0] == "meta" else is_autocast_enabled(*args)

    with harness.patched(masking, "find_packed_sequence_indices", no_packed_sequences), \
            harness.patched(torch, "is_autocast_enabled", autocast_enabled):
        yield


# ----------------------------------------------------------------------------------------------- measurements
class _AtenCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


class _CallCounter(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def counts(fn, host: HostOnly) -> dict:
    """aten ops, torch API calls and Triton launches of one call of fn (already warm)."""
    with _CallCounter() as calls:
        fn()
    before = host.launches
    with _AtenCounter() as aten:
        fn()
    return {"aten_ops": sum(aten.ops.values()), "torch_calls": calls.calls, "triton_launches": host.launches - before,
            "top_aten": dict(aten.ops.most_common(8))}


def host_times(fns: list, warmup: int, reps: int, rounds: int) -> list[list[float]]:
    """Microseconds of each call of each fn: `warmup` calls each, then `rounds` rounds in which every fn makes
    reps / rounds calls, so that the slow spells of a shared host fall on all of them alike. The garbage collector
    is off while timing."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    gc.collect()
    gc.disable()
    times: list[list[float]] = [[] for _ in fns]
    try:
        for _ in range(rounds):
            for fn, out in zip(fns, times):
                for _ in range(max(1, reps // rounds)):
                    t0 = time.perf_counter()
                    fn()
                    out.append((time.perf_counter() - t0) * 1e6)
    finally:
        gc.enable()
    return times


def profile_top(fn, calls: int, top: int) -> list[dict]:
    """The `top` functions by own time over `calls` calls of fn (cProfile), per call."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    rows = []
    for (path, line, name), (_, ncalls, tottime, cumtime, _) in stats.items():
        where = path if path.startswith("{") or path == "~" else f"{_short(path)}:{line}"
        rows.append({"function": f"{where}({name})", "own_us": tottime / calls * 1e6,
                     "cum_us": cumtime / calls * 1e6, "calls": ncalls / calls})
    return sorted(rows, key=lambda r: -r["own_us"])[:top]


def _short(path: str) -> str:
    """A path relative to the checkout, or from site-packages on."""
    if path.startswith(str(REPO)):
        return os.path.relpath(path, REPO)
    return path.split("site-packages/")[-1]


def measure(cases: list[tuple[dict, object]], host: HostOnly, warmup: int, reps: int, rounds: int,
            launch_us: float) -> list[dict]:
    """Rows of (row fields, zero-argument call) cases: host µs (median and min), counts. A case whose first call
    fails keeps its row with the error."""
    rows, live = [], []
    for fields, fn in cases:
        row = dict(fields)
        rows.append(row)
        try:
            fn()                                 # first call: the launchers' config choice, caches
            live.append((row, fn))
        except Exception as e:  # noqa: BLE001 - a failing case leaves its row with the error
            row["host_us"] = None
            row["note"] = f"{type(e).__name__}: {e}"[:300]
    for (row, fn), times in zip(live, host_times([fn for _, fn in live], warmup, reps, rounds)):
        row["host_us"], row["min_us"] = statistics.median(times), min(times)
        row.update(counts(fn, host))
        row["launch_est_us"] = row["host_us"] + launch_us * row["triton_launches"]
    return rows


# ------------------------------------------------------------------------------------------- (a) training step
def proxy_config(smoke: bool, device: str):
    """The decoder of bench/model_train.py: full size on meta; on the CPU its structure at tiny widths."""
    config = model_train.llama_config(smoke or device == "cpu")
    if device == "cpu" and not smoke:
        config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads = 16, 32, 8
        config.head_dim = config.hidden_size // config.num_attention_heads
    return config


def train_step(provider: str, args, device: torch.device):
    """A fresh model with `provider`'s LoRA, its optimizer and one step as a zero-argument call."""
    meta = device.type == "meta"
    config = proxy_config(args.smoke, device.type)
    model = model_train.build_model(config, device, torch.bfloat16 if meta else torch.float32)
    model = model_train.add_lora(model, provider, args.rank, model_train.ALPHA, model_train.DROPOUT)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    batch, seq = args.batch or (2 if args.smoke else 8), args.seq or (40 if args.smoke else 16)
    if meta and not args.smoke and not args.seq:
        seq = 1024
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1)).to(device)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step.model = model
    shape = {"layers": config.num_hidden_layers, "hidden": config.hidden_size, "T": batch * seq, "r": args.rank,
             "dtype": "bf16" if meta else "fp32", "trainable": sum(p.numel() for p in params)}
    return step, shape


def model_rows(args, host: HostOnly) -> tuple[list[dict], list[dict]]:
    """The training step's rows, the providers' steps interleaved, and the ptlm step's profile."""
    device = torch.device(args.model_device)
    patches = _meta_model_patches() if device.type == "meta" else contextlib.nullcontext()
    with patches:
        cases = []
        for provider in args.providers:
            step, shape = train_step(provider, args, device)
            cases.append(({"part": "model", "case": "train_step", "provider": provider, "mode": "fwd+bwd+opt",
                           "device": device.type, **shape}, step))
        rows = measure(cases, host, args.warmup, args.steps, args.steps, args.launch_us)
        profile = []
        profiled = [(row, step) for row, (_, step) in zip(rows, cases)
                    if row["provider"].startswith("ptlm") and row["host_us"] is not None]
        if profiled and args.profile_steps:       # the last ptlm provider's (ptlm or ptlm_fused): one profile
            row, step = profiled[-1]
            profile = [{"provider": row["provider"], **r} for r in profile_top(step, args.profile_steps, args.top)]
        for _, step in cases:                     # ptlm_fused's RoPE patch back to transformers' own
            pe.unfuse_base_ops(step.model)
    return rows, profile


# -------------------------------------------------------------------------------------------- (b) layer ops
def layer_grid(smoke: bool) -> list[tuple[str, int, int, list[int]]]:
    """(device, q_proj width d, k / v width, token counts): the real shapes on meta, d=64 at T=1 on the CPU (beside
    the eager yardstick); smoke: tiny widths only."""
    if smoke:
        return [("meta", 64, 16, [1, 80]), ("cpu", 64, 16, [1])]
    return [("meta", 2048, 512, [1, 8192]), ("cpu", 64, 16, [1])]


def _tokens(T: int) -> tuple[int, int]:
    """x's (batch, seq): T tokens as the model's layers see them (8 x 1024 in training, one row at T = 1)."""
    return (8, T // 8) if T % 8 == 0 and T >= 64 else (1, T)


def layer_calls(device: str, T: int, mode: str, d: int, kv: int, rank: int, slots: int) -> dict:
    """{(provider, case): zero-argument call}: ptlm's functional LoRA ops (bf16 base, fp32 adapters as ptlm's layers
    pass them; the multi-adapter slots in bf16 as its pool holds them), and on the CPU the eager layer (fp32). fwd:
    under no_grad, no dropout (serving); fwd+bwd: dropout 0.05, the gradients of x and the adapters (training)."""
    from ptlm_engine import functional
    dev, bf16, fp32 = torch.device(device), torch.bfloat16, torch.float32
    train = mode == "fwd+bwd"
    p, scale = (model_train.DROPOUT if train else 0.0), model_train.ALPHA / rank

    def zeros(*shape, dtype=bf16, grad=False):
        return torch.zeros(*shape, device=dev, dtype=dtype).requires_grad_(grad)

    x = zeros(*_tokens(T), d, grad=train)
    dy = {n: zeros(*x.shape[:-1], n) for n in (d, kv)}
    outs = (d, kv, kv)
    Ws = [zeros(n, d) for n in outs]
    As = [zeros(rank, d, dtype=fp32, grad=train) for _ in outs]
    Bs = [zeros(n, rank, dtype=fp32, grad=train) for n in outs]

    def call(forward, wrt, grads):
        if train:
            return lambda: torch.autograd.grad(forward(), wrt, grads)

        def serve():
            with torch.no_grad():
                return forward()
        return serve

    calls = {
        ("ptlm", "lora_linear"): call(lambda: functional.lora_linear(x, Ws[0], None, As[0], Bs[0], scale, p),
                                      (x, As[0], Bs[0]), dy[d]),
        ("ptlm", "lora_linear_grouped_qkv"): call(
            lambda: functional.lora_linear_grouped(x, Ws, [None] * 3, As, Bs, [scale] * 3, [p] * 3),
            (x, *As, *Bs), [dy[n] for n in outs]),
    }
    if T == 1:
        stack = functional.LoraSlots(zeros(slots, rank, d, grad=train), zeros(slots, d, rank, grad=train),
                                     torch.full((slots,), rank, device=dev, dtype=torch.int32),
                                     torch.full((slots,), scale, device=dev, dtype=fp32),
                                     torch.full((slots,), p, device=dev, dtype=fp32) if train else None)
        index = torch.full(x.shape[:-1], slots - 1, device=dev, dtype=torch.int32)
        segments = functional.token_segments(index, slots)
        calls["ptlm", "lora_linear_multi"] = call(
            lambda: functional.lora_linear_multi(x, Ws[0], None, stack, index, segments=segments),
            (x, stack.lora_A, stack.lora_B), dy[d])
    if device == "cpu":
        # The eager layer in fp32 (the CPU has no fast bf16 matmul); its elementwise ops have no C++ meta kernels.
        x32, W32, dy32 = x.detach().float().requires_grad_(train), Ws[0].float(), dy[d].float()
        calls["eager", "lora_linear"] = call(
            lambda: F.linear(x32, W32) + scale * F.linear(F.linear(F.dropout(x32, p, train), As[0]), Bs[0]),
            (x32, As[0], Bs[0]), dy32)
    return calls


def layer_rows(args, host: HostOnly) -> list[dict]:
    cases = []
    for device, d, kv, tokens in layer_grid(args.smoke):
        for T in tokens:
            for mode in ("fwd", "fwd+bwd"):
                for (provider, case), fn in layer_calls(device, T, mode, d, kv, args.rank, args.slots).items():
                    cases.append(({"part": "layer", "case": case, "provider": provider, "mode": mode,
                                   "device": device, "d": d, "T": T, "r": args.rank}, fn))
    return measure(cases, host, args.layer_warmup, args.reps, args.rounds, args.launch_us)


# -------------------------------------------------------------------------------------------- (c) decode step
def decode_rows(args, host: HostOnly) -> list[dict]:
    """One eager decode step per provider (see the module docstring), the providers' steps interleaved."""
    config = proxy_config(args.smoke, "cpu")
    config.use_cache = True
    batch, adapters, prompt_len = (4, 2, 4) if args.smoke else (64, 32, 8)
    gen_args = argparse.Namespace(adapters=adapters, rank=args.rank, alpha=model_generate.ALPHA, batch=batch)
    prompt = torch.randint(0, config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(1))
    cases = []
    with contextlib.ExitStack() as stack:        # each provider its own model: the setups stay entered
        stack.enter_context(torch.no_grad())
        for provider in DECODE_PROVIDERS:
            model = model_generate.build(provider.split("_")[0], gen_args, config, torch.device("cpu"), torch.float32)
            kwargs = stack.enter_context(model_generate.provider_setup(provider, model,
                                                                       model_generate.row_names(gen_args)))
            cases.append(({"part": "decode", "case": "decode_step", "provider": provider, "mode": "fwd",
                           "device": "cpu", "layers": config.num_hidden_layers, "hidden": config.hidden_size,
                           "T": batch, "r": args.rank, "adapters": model_generate.adapters_run(provider, adapters)},
                          _decode_step(model, kwargs, prompt)))
        return measure(cases, host, args.warmup, args.steps, args.steps, args.launch_us)


def _decode_step(model: nn.Module, forward_kwargs: dict, prompt: torch.Tensor):
    """A zero-argument call: one greedy token for every row on top of the prompt's cache, then the cache cropped
    back to the prompt (every call decodes at the same length)."""
    from transformers import DynamicCache
    cache_arg = model_generate.cache_argument()
    cache = DynamicCache()
    logits = model(input_ids=prompt, use_cache=True, **{cache_arg: cache}, **forward_kwargs).logits
    token = logits[:, -1:].argmax(-1)

    def step():
        model(input_ids=token, use_cache=True, **{cache_arg: cache}, **forward_kwargs)
        cache.crop(-1)                           # the step's token out again (negative: as every version reads it)
    return step


# ------------------------------------------------------------------------------------------------------ output
def _line(r: dict) -> str:
    if r["host_us"] is None:
        return f"  {r['case']} {r['provider']} {r['mode']}: FAILED {r['note']}"
    return (f"  {r['case']:24s} {r['provider']:5s} {r['mode']:11s} T={r['T']:<5d} {r['device']:4s} "
            f"host {r['host_us']:10.1f} us (min {r['min_us']:10.1f})  aten {r['aten_ops']:6d}  "
            f"torch calls {r['torch_calls']:6d}  "
            f"launches {r['triton_launches']:4d}")


def markdown(rows: list[dict], profile: list[dict], meta: dict) -> str:
    out = [f"# Host overhead on {meta['card']}", "",
           f"torch {meta['torch']}, triton {meta['triton']}, transformers {meta['transformers']}, peft {meta['peft']}, "
           f"commit {meta['git_commit']}, {meta['date']}. Triton launches stubbed (counted, not run); "
           f"`+launches` adds {meta['launch_us']:g} µs per launch (the H100 host's cost of one).", "",
           "| part | case | provider | mode | device | T | host µs | min µs | +launches µs | aten ops | "
           "torch calls | Triton launches |", "|" + "---|" * 12]
    for r in rows:
        cells = [r["part"], r["case"], r["provider"], r["mode"], r["device"], r["T"]]
        if r["host_us"] is None:
            cells += [f"FAILED: {r['note']}"] + [""] * 5
        else:
            cells += [f"{r['host_us']:.1f}", f"{r['min_us']:.1f}", f"{r['launch_est_us']:.1f}", r["aten_ops"],
                      r["torch_calls"], r["triton_launches"]]
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    if profile:
        out += ["", f"## {profile[0]['provider']} training step: top functions by own time (cProfile, per step)", "",
                "| function | own µs | cumulative µs | calls |", "|---|---|---|---|"]
        out += [f"| `{p['function']}` | {p['own_us']:.0f} | {p['cum_us']:.0f} | {p['calls']:.0f} |" for p in profile]
    return "\n".join(out) + "\n"


def parse_args(argv: list[str] | None):
    p = harness.bench_parser(__doc__, STEM, "2 layers, a few steps / calls: seconds")
    p.add_argument("--parts", type=lambda s: s.split(","), default=PARTS, help=",".join(PARTS))
    p.add_argument("--providers", type=lambda s: s.split(","), default=PROVIDERS,
                   help="of the training step")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (median; 10, smoke 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (3, smoke 1)")
    p.add_argument("--reps", type=int, default=None, help="timed calls per layer case (200, smoke 5)")
    p.add_argument("--layer-warmup", type=int, default=None, help="untimed calls per layer case (20, smoke 1)")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds of the layer cases' calls (10, smoke 1)")
    p.add_argument("--profile-steps", type=int, default=None,
                   help="cProfiled steps of the last ptlm provider (3, smoke 1)")
    p.add_argument("--top", type=int, default=15, help="functions listed from the profile")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (8; smoke 2)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (cpu 16, meta 1024; smoke 40)")
    p.add_argument("--rank", type=int, default=model_train.RANK)
    p.add_argument("--slots", type=int, default=4, help="adapters stacked in the multi-adapter case")
    p.add_argument("--tma", choices=["h100", "off"], default="h100", help="ptlm's prefill path: the H100's TMA or not")
    p.add_argument("--model-device", choices=["cpu", "meta"], default="cpu")
    p.add_argument("--launch-us", type=float, default=LAUNCH_US, help="host µs per Triton launch for +launches")
    args = p.parse_args(argv)
    for name, full, smoke in (("steps", 10, 2), ("warmup", 3, 1), ("reps", 200, 5), ("layer_warmup", 20, 1),
                              ("rounds", 10, 1), ("profile_steps", 3, 1)):
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else full)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.monotonic()
    meta = {**harness.environment(torch.device("cpu")), "smoke": args.smoke, "tma": args.tma,
            "model_device": args.model_device, "launch_us": args.launch_us,
            "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET")}
    rows, profile = [], []
    with HostOnly(tma=args.tma == "h100") as host:
        if "model" in args.parts:
            rows, profile = model_rows(args, host)
        if "layers" in args.parts:
            rows += layer_rows(args, host)
        if "decode" in args.parts:
            rows += decode_rows(args, host)
    for row in rows:
        print(_line(row))
    meta["wall_s"] = time.monotonic() - start
    result = {"meta": meta, "rows": rows, "profile": profile}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{STEM}.json").write_text(json.dumps(result, indent=1, default=str))
    (args.out / f"{STEM}.md").write_text(markdown(rows, profile, meta))
    print(f"{len(rows)} rows, {meta['wall_s']:.0f} s -> {args.out}")
    return result


if __name__ == "__main__":
    main()
