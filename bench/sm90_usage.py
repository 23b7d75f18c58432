"""Registers, spills and shared memory of the kernels ptlm's ops launch at the benchmarks' shapes, compiled for an
H100 (sm_90) on any machine, as a real launch specialises them.

tests/kernels/sm90_compile.py compiles every kernel variant unspecialised (every pointer and integer opaque): it
catches what only the GPU compiler rejects, but its registers and shared memory are not a launch's (a decode
kernel read 218 registers there and 114 in a launch's specialisation, where unit strides are constants and
16-divisible pointers and sizes let loads vectorise). Here the ops themselves run, at real shapes on the `meta`
device (no storage, no compute), with Triton's launches recorded instead of run and the H100's choices made
where they depend on the card (132 SMs, compute capability 9: the TMA paths, programmatic dependent launches,
per-SM program counts). Each recorded launch is then specialised by Triton's own binder for an sm_90 target
(the types, constants and divisibility a launch with those arguments gets on the GPU) and compiled with the
config the H100 would run: the package's H100 choice for that key where there is one ("preset"), else the
first config left after the autotuner's pruning ("first"; --all: every one, with the arguments the launch
made for its own config: a split-K candidate of a key whose choice does not split finds no workspace there
and fails to compile, which says nothing of the kernel).

    python -m bench.sm90_usage [--cases multi,lora,...] [--all] [--out DIR]

Prints one line per (kernel, key, config): registers a thread, bytes spilled, shared memory, wgmma / TMA in
the PTX; with --out writes sm90_usage.json and .md there. Compiled with the installed Triton: the H100 runs 3.6
(run this with a venv holding it, as sm90_compile.py's docstring says, for the GPU's front end). A compile that
fails is reported in its row, not raised. Not the card: no timing, and ptxas's registers are not occupancy's
whole story (the launch's shared memory is, with them).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "compiles need the compiled (not interpreted) kernels"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

from bench import harness  # noqa: E402
from ptlm_engine import functional  # noqa: E402
from ptlm_engine.kernels import configs as kernel_configs  # noqa: E402
from ptlm_engine.kernels import tuned  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
CARD = "NVIDIA H100 80GB HBM3"
H100_SMS = 132
BF16 = torch.bfloat16


# ------------------------------------------------------------------------------------------- recording launches
class Launch:
    """One kernel launch as an op made it: the JIT function, its arguments, and where its config comes from (a
    TunedLauncher and its key, an Autotuner, or fixed in the call's keywords)."""

    def __init__(self, fn, args, kwargs, launcher=None, key=None, autotuner=None):
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.launcher, self.key, self.autotuner = launcher, key, autotuner

    def configs(self, every: bool) -> list[tuple[str, triton.Config | None]]:
        """(source, config) pairs to compile: None for a launch whose keywords fix its config."""
        tuner = self.launcher.autotuner if self.launcher is not None else self.autotuner
        if tuner is None:
            return [("fixed", None)]
        if self.launcher is not None and not every:
            meta = self.launcher.chosen(self.key)
            if meta is not None:
                return [("preset", next(c for c in tuner.configs if c.all_kwargs() == meta))]
        tuner.nargs = dict(zip(tuner.arg_names, self.args))    # prune_configs reads it, as in Autotuner.run
        pruned = tuner.prune_configs(self.kwargs)
        return [("first" if i == 0 else "candidate", c) for i, c in enumerate(pruned if every else pruned[:1])]


@contextlib.contextmanager
def h100_recording(launches: list):
    """While entered: every Triton launch appended to `launches` instead of run; ptlm on its Triton path on the
    `meta` device, answering the card questions as the H100 does; the H100's tuned choices loaded."""
    from ptlm_engine.kernels import bottleneck, lora, lora_grouped, lora_multi, prefix_attention, rms_norm

    def tuned_launch(launcher, key, grid, *args, prepared=False, **kwargs):
        launches.append(Launch(launcher.autotuner.fn, args, kwargs, launcher=launcher, key=key))

    def autotuned_run(tuner, *args, **kwargs):
        launches.append(Launch(tuner.fn, args, kwargs, autotuner=tuner))

    def jit_run(fn, *args, grid, warmup, **kwargs):
        launches.append(Launch(fn, args, kwargs))

    def tma_programs(x, M, min_tokens=None):
        min_tokens = lora.DECODE_MAX_T if min_tokens is None else min_tokens
        if lora.TMA_PREFILL is False or (lora.TMA_PREFILL is None and M <= min_tokens):
            return 0
        return H100_SMS if x.dtype != torch.float32 else 0

    def prefix_tma(t):
        return t.dtype != torch.float32 and prefix_attention.TMA is not False

    with contextlib.ExitStack() as stack:
        stack.enter_context(harness.env_vars(PTLM_BACKEND="triton", PTLM_TUNED_CACHE="0"))  # the package's choices only
        tuned.load_card(CARD)
        for owner, name, value in [
            (kernel_configs.TunedLauncher, "launch", tuned_launch), (Autotuner, "run", autotuned_run),
            (JITFunction, "run", jit_run),
            *((module, "_tma_programs", tma_programs) for module in (lora, lora_grouped, lora_multi)),
            (prefix_attention, "_tma_applies", prefix_tma),
            *((module, "dependent_launch", lambda device: kernel_configs.PDL)
              for module in (kernel_configs, lora, lora_multi, lora_grouped)),
            (bottleneck, "target_programs", lambda device, per_sm=2: per_sm * H100_SMS),
            (rms_norm, "grad_programs", lambda device: 4 * H100_SMS),
        ]:
            stack.enter_context(harness.patched(owner, name, value))
        yield


# ------------------------------------------------------------------------------------------------------ the ops
def _t(*shape, dtype=BF16, grad=False):
    return torch.empty(*shape, device="meta", dtype=dtype).requires_grad_(grad)


def _backward(out, *tensors):
    outs = out if isinstance(out, (list, tuple)) else [out]
    torch.autograd.grad(outs, tensors, [torch.empty_like(o) for o in outs])


def case_lora():
    """kernels.lora at bench.lora's 4096 x 4096, r = 16: decode and prefill, forward and forward + backward."""
    w = _t(4096, 4096)
    for T, train in ((1, False), (16, False), (64, False), (4096, False), (1, True), (4096, True)):
        x, A, B = _t(T, 4096, grad=train), _t(16, 4096, grad=train), _t(4096, 16, grad=train)
        y = functional.lora_linear(x, w, None, A, B, scale=2.0, dropout=0.05 if train else 0.0)
        if train:
            _backward(y, x, A, B)


def _slots(S, r, d_in, d_out, train=False):
    return functional.LoraSlots(_t(S, r, d_in, grad=train), _t(S, d_out, r, grad=train),
                                _t(S, dtype=torch.int32), _t(S, dtype=torch.float32))


def case_multi():
    """kernels.lora_multi at bench.lora_multi's core points: 4096 x 4096, 32 rank-16 slots."""
    w = _t(4096, 4096)
    for T, train in ((1, False), (4, False), (16, False), (64, False), (256, False), (1024, False),
                     (4096, False), (64, True), (4096, True)):
        slots = _slots(32, 16, 4096, 4096, train)
        x, index = _t(T, 4096, grad=train), _t(T, dtype=torch.int32)
        segments = (_t(T, dtype=torch.int32), _t(33, dtype=torch.int32))
        y = functional.lora_linear_multi(x, w, None, slots, index, segments=segments)
        if train:
            _backward(y, x, slots.lora_A, slots.lora_B)


def case_grouped():
    """kernels.lora_grouped at the Llama step's q / k / v (2048 -> 2048, 512, 512): one adapter and 32 slots."""
    outs = (2048, 512, 512)
    ws = [_t(n, 2048) for n in outs]
    for T, train in ((64, False), (8192, True)):
        x = _t(T, 2048, grad=train)
        As, Bs = [_t(16, 2048, grad=train) for _ in outs], [_t(n, 16, grad=train) for n in outs]
        ys = functional.lora_linear_grouped(x, ws, [None] * 3, As, Bs, [2.0] * 3, [0.05 if train else 0.0] * 3)
        if train:
            _backward(ys, x, *As, *Bs)
    for T in (64, 1024, 4096):
        x, index = _t(T, 2048), _t(T, dtype=torch.int32)
        segments = (_t(T, dtype=torch.int32), _t(33, dtype=torch.int32))
        functional.lora_linear_multi_grouped(x, ws, [None] * 3, [_slots(32, 16, 2048, n) for n in outs], index,
                                             segments=segments)


def case_prefix():
    """kernels.prefix_attention at bench.prefix_attention's B = 8, 32 heads x 128, L = 2048, P = 16, causal."""
    q, k, v = (_t(8, 32, 2048, 128, grad=True) for _ in range(3))
    pk, pv = _t(8, 32, 16, 128, grad=True), _t(8, 32, 16, 128, grad=True)
    o = functional.prefix_attention(q, k, v, pk, pv)
    _backward(o, q, k, v, pk, pv)


def case_bottleneck():
    """kernels.bottleneck(_multi) at bench.bottleneck's T = 16384 (one adapter and 32): d = 768, m = 64 and
    d = 4096, m = 256 (the wide backward)."""
    for d, m in ((768, 64), (4096, 256)):
        h = _t(16384, d, grad=True)
        wd, bd, wu, bu = _t(m, d, grad=True), _t(m, grad=True), _t(d, m, grad=True), _t(d, grad=True)
        _backward(functional.bottleneck_adapter(h, wd, bd, wu, bu, "relu"), h, wd, bd, wu, bu)
        slots = functional.BottleneckSlots(*(_t(32, *s, grad=True) for s in ((m, d), (m,), (d, m), (d,))),
                                           sizes=_t(32, dtype=torch.int32), scales=_t(32, dtype=torch.float32),
                                           acts=_t(32, dtype=torch.int32))
        for T in (16, 16384):
            x, index = _t(T, d, grad=True), _t(T, dtype=torch.int32)
            out = functional.bottleneck_adapter_multi(x, slots, index)
            _backward(out, x, *slots[:4])


def case_base_ops():
    """The fused base-model ops at the Llama step's shapes: 8 x 1024 tokens, hidden 2048, FFN 5632, 32 heads."""
    x, w = _t(8, 1024, 2048, grad=True), _t(2048, grad=True)
    _backward(functional.rms_norm(x, w, 1e-6), x, w)
    g, u = _t(8, 1024, 5632, grad=True), _t(8, 1024, 5632, grad=True)
    _backward(functional.silu_mul(g, u), g, u)
    q, k = _t(8, 32, 1024, 64, grad=True), _t(8, 8, 1024, 64, grad=True)
    cos, sin = _t(8, 1024, 64), _t(8, 1024, 64)
    _backward(functional.apply_rotary(q, k, cos, sin), q, k)
    hidden, lm_head = _t(8192, 2048, grad=True), _t(32000, 2048, grad=True)
    _backward(functional.linear_cross_entropy(hidden, lm_head, _t(8192, dtype=torch.int64)), hidden, lm_head)


CASES = {"lora": case_lora, "multi": case_multi, "grouped": case_grouped, "prefix": case_prefix,
         "bottleneck": case_bottleneck, "base_ops": case_base_ops}


# ---------------------------------------------------------------------------------------------------- compiling
def _descriptor_copies(args: tuple) -> list:
    """A TMA config's pre_hook writes its block shapes into the launch's descriptors: give it copies."""
    copies = {id(a): copy.copy(a) for a in args if isinstance(a, TensorDescriptor)}
    return [copies.get(id(a), a) for a in args]


def specialised_compile(launch: Launch, config: triton.Config | None):
    """The kernel a launch with these arguments and this config compiles to on an sm_90 GPU: Triton's binder
    specialises them (types, constants, 16-divisibility) as JITFunction.run does, for the H100's target."""
    args, kwargs = _descriptor_copies(launch.args), dict(launch.kwargs)
    if config is not None:
        kwargs.update(config.all_kwargs())
        if config.pre_hook is not None:
            config.pre_hook({**dict(zip(launch.fn.arg_names, args)), **kwargs})
    backend = make_backend(TARGET)
    binder = create_function_from_signature(launch.fn.signature, launch.fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = launch.fn._pack_args(backend, kwargs, bound, specialization, options)
    source = ASTSource(fn=launch.fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=TARGET, options=options.__dict__)


def ptxas_usage(ptx: str) -> dict:
    """Registers a thread and bytes spilled (stores), as ptxas -v reports them for sm_90a."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        report = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True,
                                text=True).stderr
    registers = re.findall(r"Used (\d+) registers", report)
    spilled = re.findall(r"(\d+) bytes spill stores", report)
    return {"registers": int(registers[0]) if registers else None, "spilled": int(spilled[0]) if spilled else None}


def _flags(launch: Launch) -> dict:
    """The launch's boolean / small constexpr flags, to tell its variants apart in a row."""
    return {k: v for k, v in launch.kwargs.items() if isinstance(v, bool) and k.isupper() and v}


def rows_for(case: str, launches: list, every: bool, seen: set) -> list[dict]:
    rows = []
    for launch in launches:
        for source, config in launch.configs(every):
            meta = config.all_kwargs() if config is not None else {
                k: v for k, v in launch.kwargs.items() if k.isupper() or k in ("num_warps", "num_stages")}
            ident = (launch.fn.__name__, repr(launch.key), repr(sorted(_flags(launch))), repr(sorted(meta.items())))
            if ident in seen:
                continue
            seen.add(ident)
            row = {"case": case, "kernel": launch.fn.__name__, "key": None if launch.key is None else
                   [str(k) for k in launch.key], "flags": sorted(_flags(launch)), "source": source,
                   "config": {k: v for k, v in meta.items() if k not in ("num_warps", "num_stages", "num_ctas",
                                                                          "maxnreg")},
                   "warps": meta.get("num_warps"), "stages": meta.get("num_stages")}
            start = time.perf_counter()
            try:
                kernel = specialised_compile(launch, config)
                ptx = kernel.asm["ptx"]
                row.update(ok=True, warps=kernel.metadata.num_warps, stages=kernel.metadata.num_stages,
                           shared=kernel.metadata.shared, wgmma="wgmma" in ptx,
                           tma="cp.async.bulk.tensor" in ptx, **ptxas_usage(ptx))
            except Exception as e:  # noqa: BLE001 - reported in the row
                row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
            row["compile_s"] = round(time.perf_counter() - start, 1)
            rows.append(row)
            print(_line(row), flush=True)
    return rows


def _line(row: dict) -> str:
    head = f"{row['case']:10s} {row['kernel']:34s} {row['source']:9s} {json.dumps(row['config'])} " \
           f"w{row['warps']} s{row['stages']}"
    if not row["ok"]:
        return f"{head}  FAILED {row['error']}"
    return (f"{head}  regs {row['registers']} spill {row['spilled']} B smem {row['shared'] // 1024} KB"
            f"{' wgmma' if row['wgmma'] else ''}{' tma' if row['tma'] else ''}  key {row['key']} {row['flags']}")


def markdown(rows: list[dict], meta: dict) -> str:
    out = [f"# sm_90 usage of the kernels ptlm launches (compiled, not run; {meta['date']})", "",
           f"triton {meta['triton']}, torch {meta['torch']}; configs: the package's H100 choice (preset) or the first "
           "after pruning (first)", "",
           "| case | kernel | key | flags | config | warps | stages | source | registers | spilled B | smem KB "
           "| wgmma | tma |", "|" + "---|" * 13]
    for r in rows:
        cells = [r["case"], r["kernel"], " ".join(r["key"] or []), " ".join(r["flags"]),
                 " ".join(f"{k}={v}" for k, v in r["config"].items()), r["warps"], r["stages"], r["source"]]
        cells += ([r["registers"], r["spilled"], r["shared"] // 1024, "y" if r["wgmma"] else "",
                   "y" if r["tma"] else ""] if r["ok"] else ["FAILED: " + r["error"][:80], "", "", "", ""])
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(out) + "\n"


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {','.join(CASES)}")
    p.add_argument("--all", action="store_true", help="every config left after pruning, not only the one run")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    rows, seen = [], set()
    for case in args.cases.split(","):
        launches: list[Launch] = []
        with h100_recording(launches), torch.device("meta"):
            CASES[case]()
        rows += rows_for(case, launches, args.all, seen)
    if args.out is not None:
        meta = {"date": time.strftime("%Y-%m-%d"), "triton": triton.__version__, "torch": torch.__version__}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sm90_usage.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (args.out / "sm90_usage.md").write_text(markdown(rows, meta))
    return rows


if __name__ == "__main__":
    sys.exit(0 if all(r["ok"] for r in main()) else 1)
