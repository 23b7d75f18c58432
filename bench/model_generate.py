"""Model-level generation with many adapters: greedy decoding of a Llama-shaped decoder, mixed batches of 32 adapters.

The decoder of bench/model_train.py (hidden 2048, 16 layers, 32 heads / 8 KV heads, FFN 5632, vocab 32000,
random bf16 weights, SDPA), LoRA r=16 alpha=32 (no dropout) on q, k, v, o, gate, up, down with random non-zero
B, batch 64, prompt 128 random tokens, 64 greedy new tokens. Providers:

  base         the model without adapters
  peft_one     HF PEFT, the 32 adapters loaded, one active
  peft_mixed   HF PEFT, one adapter per row (`adapter_names=`, rows assigned round-robin over the 32)
  ptlm_one     ptlm_engine, the 32 adapters added, one active (`pe.set_active_adapter`)
  ptlm_mixed   ptlm_engine, the same rows inside `pe.adapter_batch(model, names)`
  ptlm_mixed_one_launch  ptlm_mixed with every projection's forward in one launch (kernels.lora_multi's
               SHRINK_PROGRAMS and EXPAND_IN_LOOP on while it runs, captured so; off by default until timed)

Two loops, the same code for every provider (PEFT 0.21's `generate` is wrong under transformers 5, so no
provider uses `generate`; the loops call the model's forward, with `adapter_names=` for peft_mixed):

  eager   prefill, then one forward per new token on a DynamicCache: the HF eager path, bound by the host
  graph   a StaticCache and static token / position buffers; the one-token decode step (forward, argmax,
          position + 1; the cache advances its own on-device length) is captured once in a CUDA graph
          (torch.cuda.CUDAGraph, after warm-up steps on a side stream in which ptlm's Triton kernels autotune)
          and replayed per token; the prefill runs eagerly. On the CPU (smoke) the same static loop runs
          without capture (timing "static"). peft_mixed is not captured: PEFT's mixed batch builds index
          tensors from Python lists on every call.

Bytes bound: a decode step reads every projection's weights and the lm_head, the KV cache (at the mean
context, prompt + new tokens / 2) and, with adapters, each distinct adapter's A and B once; the summary prints
base bytes / (base + adapter bytes), the most ptlm_mixed / base can reach where both stream their bytes at the
same rate (at the defaults: 1.90 GB + 0.60 GB for 32 rank-16 adapters, 0.76).

tok/s = batch x new tokens / wall time of one generation (prefill + every decode step), median of --repeats
runs after a warm-up run. peft_mixed's eager loop decodes only --peft-mixed-tokens tokens (8) per run; its
wall time is extrapolated per decode step: prefill + (new_tokens - 1) x (measured decode time / steps run).
Correctness: the first --check-tokens tokens of --check-rows rows of the mixed batch against the same rows run
alone with their adapter active (eager loop), and the graph loop's tokens against the eager loop's: mismatch
counts (bf16 near-ties can flip a greedy token; the CPU smoke runs in float32). To tell a near-tie from a bug,
the check also reports the max abs difference of the first decode step's logits (after the prefill; the mixed
batch's prefill run once more) between each mixed row and the row alone, next to the adapters' own effect on
them (row alone vs base, min over rows), and the alone run's top-1 - top-2 logit margin where a token first
flips (min over rows): a bug shows a logit difference comparable to the adapters' effect, bf16 rounding one
far below it, and a flip on a small margin.

    python -m bench.model_generate --out DIR [--providers base,ptlm_one,...] [--loops eager,graph] [--repeats 3]
    python -m bench.model_generate --smoke --out DIR      # a tiny decoder on CPU
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import statistics
import time

import torch
from torch import nn

from bench import harness, model_train

OP = "llama_generate"
PROVIDERS = ["base", "ptlm_one", "ptlm_mixed", "ptlm_mixed_one_launch", "peft_one", "peft_mixed"]
LOOPS = ["eager", "graph"]
RANK, ALPHA = 16, 32
# HF generate on the project's H100 (design notes), tok/s, and the targets of the multi-adapter issue.
BASELINE_TOK_S = {"base": 3960, "peft_one": 1977, "peft_mixed": 74}
TARGET_MIXED_VS_BASE, TARGET_MIXED_VS_PEFT = 0.90, 20.0

# Per-row counts of the correctness check, out of `checked_tokens`.
CHECKS = ["mismatch_vs_alone", "differ_from_base", "mismatch_vs_eager"]
# Its logit numbers (eager mixed row only): max |mixed - alone| and min over rows of max |alone - base| of the first
# decode step's logits, and the alone run's top-1 - top-2 margin at the first flipped token (None: no flip).
LOGIT_CHECKS = ["logit_diff_vs_alone", "logit_diff_alone_vs_base", "flip_margin"]

TABLE = harness.table_spec(keys=["layers", "hidden", "batch", "prompt", "new_tokens", "r", "adapters"],
                           values=["tok_s"], ratios=[("ptlm_mixed", "base", "tok_s"),
                                                     ("ptlm_mixed", "peft_mixed", "tok_s"),
                                                     ("ptlm_mixed_one_launch", "ptlm_mixed", "tok_s")])


def cache_argument() -> str:
    """The forward's KV-cache keyword: `cache` in newer transformers 5.x, `past_key_values` before."""
    from transformers import LlamaForCausalLM
    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def adapter_names(count: int) -> list[str]:
    return [f"a{i}" for i in range(count)]


def adapters_run(provider: str, adapters: int) -> int:
    """How many adapters a provider's rows use: none (base), one (*_one) or all of them (*_mixed)."""
    return 0 if provider == "base" else 1 if provider.endswith("_one") else adapters


def row_names(args) -> list[str]:
    """The mixed batch's mapping: row i runs adapter i mod the adapter count."""
    names = adapter_names(args.adapters)
    return [names[i % len(names)] for i in range(args.batch)]


@torch.no_grad()
def randomize_lora_B(model: nn.Module, std: float, seed: int = 1) -> None:
    """B starts at zero (every adapter the identity); random B makes each adapter change the outputs."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def build(family: str, args, config, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A fresh seeded model in eval mode: the base alone, or with args.adapters LoRA adapters (PEFT's or ptlm's)."""
    model = model_train.build_model(config, device, dtype)
    names = adapter_names(args.adapters)
    if family == "peft":
        from peft import LoraConfig, get_peft_model
        lora = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                          target_modules=model_train.TARGET_MODULES, task_type="CAUSAL_LM")
        # Adapters in the model's dtype, as in model_train.py (PEFT would upcast them to fp32).
        model = get_peft_model(model, lora, adapter_name=names[0], autocast_adapter_dtype=False)
        for name in names[1:]:
            model.add_adapter(name, lora)
    elif family == "ptlm":
        import ptlm_engine as pe
        for name in names:
            pe.add_adapter(model, name, pe.LoraConfig(r=args.rank, alpha=args.alpha, dropout=0.0,
                                                      target_modules=model_train.TARGET_MODULES))
    if family != "base":
        randomize_lora_B(model, config.initializer_range)
    return model.eval()


@contextlib.contextmanager
def provider_setup(provider: str, model: nn.Module, names: list[str]):
    """Runs the provider's adapters; yields the extra forward keywords (PEFT's per-row `adapter_names`)."""
    if provider == "ptlm_one":
        import ptlm_engine as pe
        pe.set_active_adapter(model, names[0])
    elif provider == "peft_one":
        model.set_adapter(names[0])
    if provider.startswith("ptlm_mixed"):
        import ptlm_engine as pe
        from ptlm_engine.kernels import lora_multi as multi_kernels
        one_launch = provider == "ptlm_mixed_one_launch"
        with contextlib.ExitStack() as switches:
            for name in ("SHRINK_PROGRAMS", "EXPAND_IN_LOOP") if one_launch else ():
                switches.enter_context(harness.patched(multi_kernels, name, True))
            with pe.adapter_batch(model, names, static=True):   # a serving loop: each pool checked once
                yield {}
    elif provider == "peft_mixed":
        yield {"adapter_names": names}
    else:
        yield {}


# ----------------------------------------------------------------------------------------------------- loops
class EagerGreedy:
    """Greedy decoding with a DynamicCache, one forward per token: what HF's eager generate loop runs."""

    def __init__(self, model: nn.Module, config, forward_kwargs: dict, device: torch.device):
        self.model, self.config, self.forward_kwargs, self.device = model, config, forward_kwargs, device
        self.cache_arg = cache_argument()

    def _next(self, ids: torch.Tensor, cache, logits_out: list | None) -> torch.Tensor:
        logits = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **{self.cache_arg: cache},
                            **self.forward_kwargs).logits
        if logits_out is not None:
            logits_out.append(logits[:, -1].float())                                    # (batch, vocab)
        return logits[:, -1].argmax(-1, keepdim=True)                                   # (batch, 1)

    def generate(self, prompt: torch.Tensor, new_tokens: int,
                 logits_out: list | None = None) -> tuple[torch.Tensor, float, float]:
        """(tokens (batch, new_tokens), prefill seconds, total seconds); with a list `logits_out`, each step's
        logits (batch, vocab, in float32) are appended to it (the check's runs; the timed runs keep none)."""
        from transformers import DynamicCache
        harness.sync(self.device)
        t0 = time.perf_counter()
        cache = DynamicCache(config=self.config)
        tokens = [self._next(prompt, cache, logits_out)]
        harness.sync(self.device)
        t_prefill = time.perf_counter()
        for _ in range(new_tokens - 1):
            tokens.append(self._next(tokens[-1], cache, logits_out))
        out = torch.cat(tokens, dim=1)
        harness.sync(self.device)
        return out, t_prefill - t0, time.perf_counter() - t0


class StaticGreedy:
    """Greedy decoding with a StaticCache; on CUDA the one-token decode step replays as a CUDA graph.

    The step reads and writes only persistent buffers: the token (batch, 1), the position (1, 1) and the cache,
    whose per-layer length lives on the device and advances inside the step, so each replay decodes the next
    token. `capture` warms the step up on a side stream (ptlm's kernels autotune there, the cache allocates)
    before capturing it; the prefill (cache reset, prompt forward) stays eager.
    """

    def __init__(self, model: nn.Module, config, forward_kwargs: dict, batch: int, max_len: int,
                 device: torch.device):
        from transformers import StaticCache
        self.model, self.forward_kwargs, self.device = model, forward_kwargs, device
        self.cache_arg = cache_argument()
        self.cache = StaticCache(config=config, max_cache_len=max_len)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None

    def _next(self, ids: torch.Tensor, position_ids: torch.Tensor) -> None:
        logits = self.model(input_ids=ids, position_ids=position_ids, use_cache=True, logits_to_keep=1,
                            **{self.cache_arg: self.cache}, **self.forward_kwargs).logits
        self.token.copy_(logits[:, -1].argmax(-1, keepdim=True))

    def prefill(self, prompt: torch.Tensor) -> None:
        self.cache.reset()
        self._next(prompt, torch.arange(prompt.shape[1], device=self.device).unsqueeze(0))
        self.position.fill_(prompt.shape[1])

    def step(self) -> None:
        self._next(self.token, self.position)
        self.position.add_(1)

    def capture(self, prompt: torch.Tensor, warmup_steps: int = 2) -> None:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self.prefill(prompt)
            for _ in range(warmup_steps):
                self.step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.step()
        self.graph = graph

    def generate(self, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float, float]:
        """(tokens (batch, new_tokens), prefill seconds, total seconds)."""
        out = torch.empty(self.token.shape[0], new_tokens, dtype=torch.long, device=self.device)
        harness.sync(self.device)
        t0 = time.perf_counter()
        self.prefill(prompt)
        out[:, 0] = self.token[:, 0]
        harness.sync(self.device)
        t_prefill = time.perf_counter()
        for i in range(1, new_tokens):
            if self.graph is None:
                self.step()
            else:
                self.graph.replay()
            out[:, i] = self.token[:, 0]
        harness.sync(self.device)
        return out, t_prefill - t0, time.perf_counter() - t0


# --------------------------------------------------------------------------------------------------- measure
def measure(provider: str, loop: str, model: nn.Module, config, prompt: torch.Tensor, args,
            device: torch.device) -> tuple[dict, torch.Tensor | None]:
    """One row (and the last run's tokens): warm-up run, then --repeats timed generations."""
    timing = timing_of(loop, device)
    row = {"op": OP, "provider": provider, "mode": "greedy", "timing": timing, **shape(args, config),
           "adapters": adapters_run(provider, args.adapters)}
    steps = args.peft_mixed_tokens if provider == "peft_mixed" and loop == "eager" else args.new_tokens
    steps = max(2, min(steps, args.new_tokens))

    def fill() -> torch.Tensor:
        tokens = None
        if loop == "graph" and provider == "peft_mixed":
            raise NotImplementedError("PEFT's mixed batch is not capturable: it builds index tensors from "
                                      "Python lists on every call")
        with torch.no_grad(), provider_setup(provider, model, row_names(args)) as forward_kwargs:
            t0 = time.perf_counter()
            if loop == "eager":
                runner = EagerGreedy(model, config, forward_kwargs, device)
            else:
                runner = StaticGreedy(model, config, forward_kwargs, args.batch, args.prompt + args.new_tokens,
                                      device)
                if device.type == "cuda":
                    runner.capture(prompt)
            runner.generate(prompt, min(steps, 4))   # warm-up (and, without a graph, ptlm's autotuning)
            row["first_call_s"] = time.perf_counter() - t0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            walls, prefills, decode_steps = [], [], []
            gc_was_enabled = gc.isenabled()
            gc.disable()
            try:
                for _ in range(args.repeats):
                    tokens, prefill_s, total_s = runner.generate(prompt, steps)
                    step_s = (total_s - prefill_s) / (steps - 1)
                    walls.append(prefill_s + (args.new_tokens - 1) * step_s)
                    prefills.append(prefill_s)
                    decode_steps.append(step_s)
            finally:
                if gc_was_enabled:
                    gc.enable()
        wall = statistics.median(walls)
        row.update(ms=wall * 1e3, tok_s=args.batch * args.new_tokens / wall,
                   prefill_ms=statistics.median(prefills) * 1e3, step_ms=statistics.median(decode_steps) * 1e3,
                   prefill_ms_min=min(prefills) * 1e3, prefill_ms_max=max(prefills) * 1e3,
                   timed_new_tokens=steps)
        if device.type == "cuda":
            row["peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        if steps < args.new_tokens:
            row["note"] = f"{steps} new tokens timed, wall time extrapolated per decode step"
        if timing == "static":
            row["note"] = "CPU: static cache without CUDA-graph capture"
        return tokens

    return row, harness.provider_row(row, fill)


def timing_of(loop: str, device: torch.device) -> str:
    """The row's timing: "eager", "graph", or "static" for the graph loop on the CPU (nothing captured)."""
    return "static" if loop == "graph" and device.type != "cuda" else loop


def shape(args, config) -> dict:
    return {"layers": config.num_hidden_layers, "hidden": config.hidden_size, "batch": args.batch,
            "prompt": args.prompt, "new_tokens": args.new_tokens, "r": args.rank}


@torch.no_grad()
def check_mixed_rows(model: nn.Module, config, prompt: torch.Tensor, mixed_tokens: torch.Tensor, args,
                     device: torch.device) -> dict:
    """The mixed batch's first --check-tokens tokens of --check-rows rows against the same rows decoded alone
    (eager loop) with their adapter active, and with no adapter (the base: shows the adapters matter).

    Logits (LOGIT_CHECKS): the mixed batch's prefill runs once more, in the timed run's mapping (provider_setup of
    ptlm_mixed), for the first decode step's logits of the checked rows; against the row alone (max over rows) and,
    as scale, the row alone against the base (min over rows); and where a row's token first differs from the
    alone run's, the alone run's top-1 - top-2 logit margin at that step (min over rows; None without a flip)."""
    import ptlm_engine as pe
    names, k = row_names(args), args.check_tokens
    rows = range(min(args.check_rows, args.batch))
    mixed_logits: list[torch.Tensor] = []
    with provider_setup("ptlm_mixed", model, names) as forward_kwargs:
        EagerGreedy(model, config, forward_kwargs, device).generate(prompt, 1, mixed_logits)
    vs_alone = vs_base = 0
    diff_vs_alone, alone_vs_base, margins = 0.0, None, []
    for row in rows:
        loop = EagerGreedy(model, config, {}, device)
        pe.set_active_adapter(model, names[row])
        alone_logits: list[torch.Tensor] = []
        alone, _, _ = loop.generate(prompt[row:row + 1], k, alone_logits)
        base_logits: list[torch.Tensor] = []
        with pe.disable_adapters(model):
            base, _, _ = loop.generate(prompt[row:row + 1], k, base_logits)
        vs_alone += int((alone[0] != mixed_tokens[row, :k]).sum())
        vs_base += int((base[0] != mixed_tokens[row, :k]).sum())
        diff_vs_alone = max(diff_vs_alone, float((mixed_logits[0][row] - alone_logits[0][0]).abs().max()))
        effect = float((alone_logits[0][0] - base_logits[0][0]).abs().max())
        alone_vs_base = effect if alone_vs_base is None else min(alone_vs_base, effect)
        flips = (alone[0] != mixed_tokens[row, :k]).nonzero()
        if len(flips):
            top2 = alone_logits[int(flips[0, 0])][0].topk(2).values
            margins.append(float(top2[0] - top2[1]))
    return {"mismatch_vs_alone": vs_alone, "differ_from_base": vs_base, "checked_tokens": len(rows) * k,
            "logit_diff_vs_alone": diff_vs_alone, "logit_diff_alone_vs_base": alone_vs_base,
            "flip_margin": min(margins, default=None)}


def run_family(family: str, providers: list[str], args, device: torch.device, log) -> list[dict]:
    """The rows of one model: build it once (fresh, seeded), then every provider x loop on it."""
    config = model_train.llama_config(args.smoke)
    dtype = torch.float32 if args.smoke else torch.bfloat16   # CPU bf16 matmuls are emulated
    gen = torch.Generator(device="cpu").manual_seed(2)
    prompt = torch.randint(0, config.vocab_size, (args.batch, args.prompt), generator=gen).to(device)
    rows, model, eager_mixed = [], None, None
    try:
        model = build(family, args, config, device, dtype)
        for provider in providers:
            for loop in args.loops:
                if time.monotonic() > args.deadline:
                    rows.append({"op": OP, "provider": provider, "mode": "greedy", "timing": timing_of(loop, device),
                                 **shape(args, config), "ms": None, "note": harness.BUDGET_SKIP_NOTE})
                    continue
                row, tokens = measure(provider, loop, model, config, prompt, args, device)
                base_bytes, adapter_bytes = step_bytes(config, args, row.get("adapters", 0),
                                                       torch.finfo(dtype).bits // 8)
                row.update(step_gb=(base_bytes + adapter_bytes) / 1e9,
                           bytes_bound=base_bytes / (base_bytes + adapter_bytes))
                if provider == "ptlm_mixed" and tokens is not None:
                    k = args.check_tokens
                    if loop == "eager":
                        eager_mixed = tokens
                        row.update(check_mixed_rows(model, config, prompt, tokens, args, device))
                    elif eager_mixed is not None:
                        row["mismatch_vs_eager"] = int((tokens[:, :k] != eager_mixed[:, :k]).sum())
                        row["checked_tokens"] = tokens[:, :k].numel()
                rows.append(row)
                log(row_line(row))
    except Exception as e:  # noqa: BLE001 - a model that cannot be built fails its providers' rows
        done = {(r["provider"], r["timing"]) for r in rows}
        rows += [{"op": OP, "provider": p, "mode": "greedy", "timing": timing_of(loop, device), **shape(args, config),
                  "ms": None, "note": f"{type(e).__name__}: {e}"[:300]}
                 for p in providers for loop in args.loops if (p, timing_of(loop, device)) not in done]
        log(f"  {OP} {family}: FAILED {type(e).__name__}: {str(e)[:200]}")
    finally:
        del model
        harness.free_memory()
    return rows


def step_bytes(config, args, adapters: int, element_size: int = 2) -> tuple[float, float]:
    """(base, adapter) bytes one decode step must read: the 7 projections of every layer, the lm_head and the
    KV cache at the mean context; rank-r A and B of the projections for each of `adapters` distinct adapters."""
    h, kv = config.hidden_size, config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, config.intermediate_size), (h, config.intermediate_size),
              (config.intermediate_size, h)]                       # (d_in, d_out) of q, k, v, o, gate, up, down
    layers = config.num_hidden_layers
    weights = layers * sum(i * o for i, o in shapes) + config.vocab_size * h
    cache = layers * 2 * kv * args.batch * (args.prompt + args.new_tokens / 2)
    lora = adapters * layers * args.rank * sum(i + o for i, o in shapes)
    return element_size * (weights + cache), element_size * lora


def row_line(row: dict) -> str:
    head = f"  {OP} {row['provider']:10s} {row['timing']:6s}"
    if row["ms"] is None:
        return f"{head} not timed: {row['note']}"
    checks = "".join(f", {k} {row[k]}" for k in CHECKS if k in row) + logit_checks(row, ", ")
    spread = (f" ({row['prefill_ms_min']:.1f}-{row['prefill_ms_max']:.1f})" if "prefill_ms_min" in row else "")
    return (f"{head} {row['tok_s']:9,.0f} tok/s  prefill {row['prefill_ms']:7.1f} ms{spread}"
            f"  step {row['step_ms']:6.2f} ms"
            f"  peak {row.get('peak_gb') or 0:5.1f} GB  (warm-up {row['first_call_s']:.1f} s{checks})"
            + (f"  [{row['note']}]" if row.get("note") else ""))


def logit_checks(row: dict, lead: str, name=str) -> str:
    """The row's LOGIT_CHECKS that it has, each as `lead name value` (3 significant digits; None: "none")."""
    return "".join(f"{lead}{name(k)} " + ("none" if row[k] is None else f"{row[k]:.3g}")
                   for k in LOGIT_CHECKS if k in row)


def run(args, device: torch.device, log=print) -> list[dict]:
    rows = []
    for family in ("base", "ptlm", "peft"):
        providers = [p for p in args.providers if p.split("_")[0] == family]
        if providers:
            rows += run_family(family, providers, args, device, log)
    return rows


def summary(rows: list[dict]) -> list[str]:
    """A few lines: tokens/s per loop and provider, the target ratios, the correctness check, rows not timed."""
    rows = [r for r in rows if r["op"] == OP]
    if not rows:
        return []
    by = {(r["provider"], r["timing"]): r for r in rows if r.get("ms")}
    timings = list(dict.fromkeys(r["timing"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    r0 = rows[0]
    adapters = max(r.get("adapters", 0) for r in rows)
    lines = [f"Generation tok/s: batch {r0['batch']}, prompt {r0['prompt']} + {r0['new_tokens']} greedy tokens, "
             f"r={r0['r']}, mixed batch of {adapters} adapters round-robin; HF generate on the H100 (design notes): "
             f"base {BASELINE_TOK_S['base']:,}, PEFT one {BASELINE_TOK_S['peft_one']:,}, "
             f"PEFT mixed {BASELINE_TOK_S['peft_mixed']}"]
    for timing in timings:
        lines.append(f"  {timing:6s} " + "  ".join(f"{p} {by[p, timing]['tok_s']:,.0f}" for p in providers
                                                   if (p, timing) in by))
    vs_base = [(t, by["ptlm_mixed", t]["tok_s"] / by["base", t]["tok_s"]) for t in timings
               if ("ptlm_mixed", t) in by and ("base", t) in by]
    peft = by.get(("peft_mixed", "eager"))
    vs_peft = [(t, by["ptlm_mixed", t]["tok_s"] / peft["tok_s"]) for t in timings if peft and ("ptlm_mixed", t) in by]
    if vs_base or vs_peft:
        graph = dict(vs_base).get("graph")
        verdict = "" if graph is None else f" (target >= {TARGET_MIXED_VS_BASE:.2f} [graph]: " + \
            ("PASS)" if graph >= TARGET_MIXED_VS_BASE else "FAIL)")
        best = max((ratio for _, ratio in vs_peft), default=None)
        verdict_peft = "" if best is None else f" (target >= {TARGET_MIXED_VS_PEFT:.0f}x: " + \
            ("PASS)" if best >= TARGET_MIXED_VS_PEFT else "FAIL)")
        # the one-launch experiment (off by default until it wins) on the same line: the summary's lines are few
        one_launch = [(t, by["ptlm_mixed_one_launch", t]["tok_s"] / by["base", t]["tok_s"]) for t in timings
                      if ("ptlm_mixed_one_launch", t) in by and ("base", t) in by]
        lines.append("  ptlm_mixed/base " + " ".join(f"[{t}] {v:.2f}" for t, v in vs_base) + verdict
                     + ("; one launch/base " + " ".join(f"[{t}] {v:.2f}" for t, v in one_launch) if one_launch else "")
                     + "; ptlm_mixed/peft_mixed[eager] " + " ".join(f"[{t}] {v:.1f}x" for t, v in vs_peft)
                     + verdict_peft)
    mixed = next((r for r in rows if r["provider"] == "ptlm_mixed" and "bytes_bound" in r), None)
    if mixed:
        lines.append(f"  decode-step bytes: {mixed['step_gb'] * mixed['bytes_bound']:.2f} GB base, "
                     f"{mixed['step_gb']:.2f} GB with {mixed['adapters']} adapters: at one rate ptlm_mixed/base "
                     f"<= {mixed['bytes_bound']:.2f}")
    checks = [f"[{r['timing']}] " + ", ".join(f"{k.replace('_', ' ')} {r[k]}" for k in CHECKS if k in r)
              + f" of {r['checked_tokens']} first tokens" + logit_checks(r, ", ", lambda k: k.replace("_", " "))
              for r in rows if "checked_tokens" in r]
    if checks:
        lines.append("  ptlm_mixed check " + "; ".join(checks))
    lines += [f"  {r['provider']} [{r['timing']}]: {r['timed_new_tokens']} of {r['new_tokens']} new tokens timed, "
              f"wall time extrapolated" for r in by.values() if r["timed_new_tokens"] < r["new_tokens"]]
    failed = [f"{r['provider']} [{r['timing']}] {r['note'][:80]}" for r in rows if not r.get("ms")]
    if failed:
        lines.append("  not timed: " + "; ".join(failed))
    return lines


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--providers", type=lambda s: s.split(","), default=PROVIDERS, help=",".join(PROVIDERS))
    p.add_argument("--loops", type=lambda s: s.split(","), default=LOOPS, help=",".join(LOOPS))
    p.add_argument("--repeats", type=int, default=None, help="timed generations per row, median (3; smoke: 1)")
    p.add_argument("--batch", type=int, default=None, help="sequences (64; smoke: 4)")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (128; smoke: 8)")
    p.add_argument("--new-tokens", type=int, default=None, help="greedy new tokens (64; smoke: 4)")
    p.add_argument("--adapters", type=int, default=None, help="adapters of the mixed batch (32; smoke: 4)")
    p.add_argument("--peft-mixed-tokens", type=int, default=None,
                   help="new tokens timed in peft_mixed's eager loop, extrapolated (8; smoke: 3)")
    p.add_argument("--rank", type=int, default=RANK)
    p.add_argument("--alpha", type=int, default=ALPHA)
    p.add_argument("--check-rows", type=int, default=2, help="mixed-batch rows checked against runs alone")
    p.add_argument("--check-tokens", type=int, default=4, help="first tokens compared")
    p.add_argument("--budget-s", type=float, default=240.0, help="no new row starts after this many seconds")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = harness.bench_parser(__doc__, "model_generate", harness.MODEL_SMOKE)
    add_arguments(p)
    args = p.parse_args(argv)
    args.repeats = args.repeats or (1 if args.smoke else 3)
    args.batch = args.batch or (4 if args.smoke else 64)
    args.prompt = args.prompt or (8 if args.smoke else 128)
    args.new_tokens = args.new_tokens or (4 if args.smoke else 64)
    args.adapters = args.adapters or (4 if args.smoke else 32)
    args.peft_mixed_tokens = args.peft_mixed_tokens or (3 if args.smoke else 8)
    args.check_tokens = min(args.check_tokens, args.new_tokens)
    unknown = set(args.providers) - set(PROVIDERS) | set(args.loops) - set(LOOPS)
    if unknown:
        p.error(f"unknown providers or loops: {sorted(unknown)}")
    args.deadline = time.monotonic() + args.budget_s
    return args


def main(argv: list[str] | None = None) -> harness.Results:
    args = parse_args(argv)
    return harness.run_model_bench(args, run, summary, OP, TABLE, "model_generate", cache_argument=cache_argument())


if __name__ == "__main__":
    main()
