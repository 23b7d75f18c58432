"""Autotune config generators, pruning rules and shape buckets shared by the kernels.

Lists are short on purpose: every (shape bucket, dtype) key benchmarks each surviving config once, and a
benchmark grid touches hundreds of keys. Under TRITON_INTERPRET=1 (CPU tests) every generator yields one
small config: the interpreter is slow and autotuning there would only multiply the test time.
"""
from __future__ import annotations

import copy
import os
from concurrent.futures import ThreadPoolExecutor

import triton
from triton.runtime.errors import OutOfResources
from triton.tools.tensor_descriptor import TensorDescriptor

try:                                    # Triton's parallel compile (3.5+; private, so optional)
    from triton.runtime._async_compile import AsyncCompileMode
except ImportError:
    AsyncCompileMode = None

from . import tuned

# Triton decides at decoration time whether a kernel is compiled or interpreted, so read the flag once.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# PTLM_AUTOTUNE=0: no tuning runs (quick GPU test sessions, debugging); each new key launches the first of its
# configs that survives pruning and fits the GPU (TunedLauncher).
AUTOTUNE = os.environ.get("PTLM_AUTOTUNE", "1") != "0"
DECODE_MAX_T = 64  # at or below this many tokens a linear layer is memory-bound: GEMV-like tiles
# PTLM_DECODE_SPLIT=0 keeps the decode kernels' unsplit configs only (no arrival counters): side-by-side runs,
# and a fallback should the split path misbehave on some GPU.
DECODE_SPLIT = os.environ.get("PTLM_DECODE_SPLIT", "1") != "0"
# Programmatic dependent launch (Hopper on): a matmul launched right after the shrink that writes its xa starts
# streaming W0 as soon as every shrink program runs (they signal at their start), and waits for the shrink's
# end (griddepcontrol.wait) only before its expand reads xa. PTLM_PDL=0 launches them one after the other.
PDL = os.environ.get("PTLM_PDL", "1") != "0"   # read at each launch: benchmarks time both ways in one run
_PDL_CAPABLE: dict = {}


def dependent_launch(device) -> bool:
    """Whether kernels on `device` signal and wait as programmatic dependent launches: PDL set, compiled (the
    interpreter runs no inline PTX), compute capability 9+ (the griddepcontrol instructions)."""
    capable = _PDL_CAPABLE.get(device)
    if capable is None:
        import torch
        capable = _PDL_CAPABLE[device] = (not INTERPRETED and device.type == "cuda"
                                          and torch.cuda.get_device_capability(device)[0] >= 9)
    return PDL and capable


def wait_flags(wait_prior: bool, x) -> dict:
    """A matmul's launch arguments as the dependent of the shrink launched just before it, where the device
    takes programmatic dependent launches (dependent_launch), else as an ordinary launch."""
    if wait_prior and dependent_launch(x.device):
        return {"WAIT_PRIOR": True, "launch_pdl": True}
    return {"WAIT_PRIOR": False}


# Host-side helpers in plain Python: triton.cdiv / next_power_of_2 cost microseconds a call in Triton 3.8.
def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def t_bucket(t: int) -> int:
    """Autotune key for the token count: powers of two up to 16384, so a new T reuses a tuned config."""
    return min(next_pow2(t), 16384)


def tune_bench(fn, quantiles):
    """Short autotuning runs (ms): the candidates differ by far more than the noise of a 20 ms run."""
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


def _cfg(warps, stages, pre_hook=None, **meta):
    return triton.Config(meta, num_warps=warps, num_stages=stages, pre_hook=pre_hook)


def decode_matmul_configs():
    """Skinny-M tiles for small T: many programs along N, long K steps, deep pipelines to keep HBM busy.

    GROUP_M=8 spans every row block at T <= 64, so the programs sharing a W0 tile run side by side and W0
    streams from HBM once (with GROUP_M=1 each row block swept all of W0 in turn: measured 2.5x cuBLAS at
    4096x4096, T=64, against 1.1x at T <= 16 where one row block covers T).
    """
    if INTERPRETED:
        return [_cfg(4, 1, BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=8)]
    tiles = [_cfg(4, 4, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8)
             for bm in (16, 32, 64) for bn, bk in ((16, 256), (32, 128), (32, 256), (64, 128))]
    # More bytes in flight per SM for T <= 16, where the v3 kernel sat 7-18% behind cuBLAS (not yet measured).
    deeper = [_cfg(w, s, BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8)
              for bn, bk, w, s in ((16, 512, 4, 3), (32, 512, 4, 3), (32, 256, 8, 6), (64, 256, 8, 4))]
    return tiles + deeper


def split_decode_configs():
    """kernels.lora's decode kernel: one row block (BLOCK_M set by T), BLOCK_N columns, K split SPLIT_K ways.

    The first is v4's choice at 4096x4096, T <= 64 (H100, 2026-11-26: 32 columns, no split, 1.09x cuBLAS). The
    others keep ~128 programs on the 132 SMs with wider column blocks, so each program reads A (the fused
    shrink) over 1/SPLIT_K of K instead of all of it: 128 columns over 4 splits read 1/32 of W's bytes in A,
    32 columns unsplit half. Each compiles for sm_90 at 16 and 64 rows, forward and backward, without spills
    in at most 227 KB of shared memory (Triton 3.8, launch specializations emulated); 128 columns need 8 warps
    for that, 256 columns spilled at any split.
    """
    if INTERPRETED:
        return [_cfg(4, 1, BLOCK_N=32, BLOCK_K=32, SPLIT_K=2)]
    configs = [_cfg(w, s, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk) for bn, bk, sk, w, s in (
        (32, 256, 1, 4, 4), (64, 128, 1, 4, 4), (64, 256, 2, 4, 3), (64, 128, 4, 4, 4), (128, 128, 2, 8, 4),
        (128, 128, 4, 8, 4), (128, 128, 4, 8, 3), (128, 128, 8, 8, 3), (32, 256, 1, 4, 6), (64, 128, 2, 4, 6))]
    if not DECODE_SPLIT:
        configs = [c for c in configs if c.kwargs["SPLIT_K"] == 1]
    return configs


def prune_split_decode():
    """Drop decode configs with splits past K's blocks, column blocks far wider than N, or an fp32 tile of
    more than 64 registers a thread."""
    def prune(configs, named_args, **kwargs):
        n, k, bm = named_args["N"], named_args["K"], kwargs["BLOCK_M"]
        kept = [c for c in configs if c.kwargs["SPLIT_K"] <= cdiv(k, c.kwargs["BLOCK_K"])
                and c.kwargs["BLOCK_N"] <= max(16, next_pow2(n))
                and bm * c.kwargs["BLOCK_N"] <= 64 * 32 * c.num_warps]
        return kept or configs[:1]
    return {"early_config_prune": prune}


def prefill_matmul_configs():
    """Tensor-core tiles for large T, grouped launch order so W0 tiles stay in L2."""
    if INTERPRETED:
        return [_cfg(4, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)]
    return [_cfg(w, s, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, GROUP_M=8) for bm, bn, w, s in (
        (128, 256, 8, 3), (256, 128, 8, 3), (128, 256, 8, 4), (128, 128, 8, 4), (128, 128, 4, 4),
        (64, 256, 4, 4), (128, 64, 4, 4), (64, 128, 4, 4), (64, 64, 4, 4))]


def tma_matmul_configs(pre_hook=None):
    """Hopper tiles for the persistent TMA GEMM (kernels.lora's prefill path on sm_90).

    Shared memory per config (bf16): stages x (BLOCK_M + BLOCK_N) x BLOCK_K x 2 B for the pipeline, plus the
    epilogue's half-tile store buffer and the LoRA steps' xa / B tiles (~32 KB at 128x256): 128x256x64 fits
    three stages of the H100's 227 KB, 128x128x64 four. The smaller tiles are for T a few hundred, where
    128x256 tiles would leave most of the 132 SMs idle. `pre_hook` sets the descriptors' block shapes per
    config (host-side descriptors carry them).
    """
    if INTERPRETED:
        return [_cfg(4, 1, pre_hook, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)]
    return [_cfg(w, s, pre_hook, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, GROUP_M=8) for bm, bn, w, s in (
        (128, 256, 8, 3), (256, 128, 8, 3), (128, 128, 8, 4), (128, 128, 4, 4), (64, 128, 4, 4),
        (128, 64, 4, 4))]


def shrink_configs(round_splits: bool = False):
    """x (T, K) @ A^T (K, r): r is tiny, so small T splits K across programs (atomics) to fill the GPU.
    round_splits: the multi-adapter shrinks' decode configs also split a row block's rounds of runs
    (SPLIT_ROUNDS programs side by side, kernels.lora_multi._multi_shrink_kernel)."""
    if INTERPRETED:
        return [_cfg(4, 1, BLOCK_T=16, BLOCK_K=32, SPLIT_K=1)]
    decode = [_cfg(4, 3, BLOCK_T=bt, BLOCK_K=128, SPLIT_K=s) for bt in (16, 64) for s in (1, 8, 32)]
    if round_splits:
        decode += [_cfg(4, 3, BLOCK_T=16, BLOCK_K=128, SPLIT_K=s, SPLIT_ROUNDS=g) for s in (8, 32) for g in (4, 8)]
    # Prefill splits K 2 or 4 ways too: at T=4096, K=4096 the best unsplit config ran 64 programs on the
    # 132 SMs, 0.030 ms against a 0.011 ms floor (H100, 2026-11-26), 14% of the layer's forward.
    prefill = [_cfg(4, 3, BLOCK_T=bt, BLOCK_K=bk, SPLIT_K=1) for bt in (64, 128) for bk in (64, 128)]
    prefill += [_cfg(4, 3, BLOCK_T=bt, BLOCK_K=128, SPLIT_K=s) for bt in (64, 128) for s in (2, 4)]
    return decode + prefill


def weight_grad_configs():
    """sum_t G[t, n] H[t, r]: programs over N, and over splits of T when N alone leaves SMs idle."""
    if INTERPRETED:
        return [_cfg(4, 1, BLOCK_N=32, BLOCK_T=32, SPLIT_T=1)]
    return [_cfg(4, 3, BLOCK_N=bn, BLOCK_T=bt, SPLIT_T=s) for bn in (64, 128) for bt in (64, 128) for s in (1, 8, 32)]


def prune_by_t(row_block: str, split: str | None = None):
    """Drop configs whose row tile is far larger than T, wide K/T-splits (beyond 4) at T > 1024, where the
    row blocks alone nearly fill the GPU, and split rounds of runs past decode (a prefill block holds few runs)."""
    def prune(configs, named_args, **kwargs):
        t = named_args["T_BUCKET"]
        kept = [c for c in configs if c.kwargs[row_block] <= max(16, t)
                and (split is None or c.kwargs[split] <= 4 or t <= 1024)
                and (c.kwargs.get("SPLIT_ROUNDS", 1) == 1 or t <= DECODE_MAX_T)]
        return kept or configs[:1]
    return {"early_config_prune": prune}


class TunedLauncher:
    """A per-key config cache in front of a triton Autotuner.

    The Autotuner tunes on a key's first call; on every later call it still rebuilds its key from all the
    kernel's arguments, which costs tens of microseconds of host time, as much as the kernel itself at decode.
    Here the caller passes a cheap key (the shape bucket, flags and dtypes the autotuner keys on) and later
    calls launch the chosen config directly (running the config's pre_hook, if it has one, as the Autotuner would).
    A key whose choice was loaded from an earlier run (kernels.tuned) launches that config without tuning.
    """

    def __init__(self, autotuner):
        self.autotuner = autotuner
        self.name = autotuner.fn.__name__
        self.configs: dict[tuple, tuple[dict, object]] = {}
        tuned.LAUNCHERS.append(self)

    def chosen(self, key: tuple) -> dict | None:
        """The config meta a key launches with, if it is already known (tuned here or loaded); else None."""
        config = self.configs.get(key)
        if config is None:
            config = tuned.preset(self.name, key, self.autotuner.configs)
            if config is None:
                return None
            self.configs[key] = config
        return config[0]

    def adds_into_output(self, key: tuple, *splits: str) -> bool:
        """Whether the key's programs may add into a shared output (a `splits` meta-parameter is not known to be
        1; one a config leaves out is 1): the caller zeroes it then, and skips the memset launch otherwise."""
        meta = self.chosen(key)
        return meta is None or any(meta.get(split, 1) != 1 for split in splits)

    def launch(self, key: tuple, grid, *args, prepared: bool = False, **kwargs):
        """prepared: the caller has done what the key's known config's pre_hook does (`chosen` gave it)."""
        if self.chosen(key) is None:
            if AUTOTUNE:
                self._precompile(args, kwargs)
                self.autotuner[grid](*args, **kwargs)
                best = self.autotuner.best_config
                self.configs[key] = (best.all_kwargs(), best.pre_hook)
                if len(self.autotuner.configs) > 1:      # a choice was made: keep it for later processes
                    tuned.remember(self.name, key, best.all_kwargs())
            else:
                self.configs[key] = self._first_fitting(grid, args, kwargs)
            return
        meta, pre_hook = self.configs[key]
        if pre_hook is not None and not prepared:
            pre_hook({**dict(zip(self.autotuner.arg_names, args)), **kwargs, **meta})
        try:
            self.autotuner.fn[grid](*args, **kwargs, **meta)
        except OutOfResources as refused:
            # A loaded choice this GPU / Triton version refuses (before launching anything): forget it. The caller
            # sized its buffers for that choice's split factors (workspaces, zeroed or not outputs), and an
            # accumulating launch must run once: launch the first candidate of the same splits that fits, untimed
            # (none: the error stands; the next call, with the choice forgotten, chooses afresh).
            if not tuned.forget(self.name, key):
                raise
            del self.configs[key]
            splits = {k: v for k, v in meta.items() if k.startswith("SPLIT")}
            try:
                self.configs[key] = self._first_fitting(grid, args, kwargs, lambda config: all(
                    config.all_kwargs().get(k) == v for k, v in splits.items()))
            except OutOfResources:
                raise RuntimeError(f"{self.name}: the tuned choice {meta} for {key} does not fit this GPU / Triton "
                                   f"({refused}), nor does another config with its splits {splits}; the choice "
                                   "is forgotten: the next call chooses again") from refused

    def _candidates(self, args, kwargs) -> list:
        """The key's configs that survive the Autotuner's pruning, in order."""
        self.autotuner.nargs = dict(zip(self.autotuner.arg_names, args))   # prune_configs reads it, as in its run
        return self.autotuner.prune_configs(kwargs)

    def _precompile(self, args, kwargs, candidates: list | None = None) -> None:
        """Compile a new key's candidate configs side by side before the Autotuner benchmarks them one at a time:
        compiling, not timing, is most of a first tuning (the Llama-shaped training step tuned for 335 s on a
        fresh H100), and Triton's compiles release the GIL (4 configs on 2 cores: 2.3 s in turn, 1.2 s in two
        threads). Best effort: a config that fails here fails again, and is dealt with, where the Autotuner
        compiles it."""
        if AsyncCompileMode is None or INTERPRETED:
            return
        candidates = self._candidates(args, kwargs) if candidates is None else candidates
        if len(candidates) < 2:
            return
        with ThreadPoolExecutor(min(len(candidates), os.cpu_count() or 1)) as pool, \
                AsyncCompileMode(pool, ignore_errors=True):
            for config in candidates:
                call = args
                if config.pre_hook is not None:
                    # A TMA config's pre_hook writes its block shapes into the descriptors: give it copies (one
                    # per descriptor object, as aliased as the originals) so that configs do not share them.
                    copies = {id(v): copy.copy(v) for v in args if isinstance(v, TensorDescriptor)}
                    call = [copies.get(id(v), v) for v in args]
                    config.pre_hook({**dict(zip(self.autotuner.arg_names, call)), **kwargs, **config.all_kwargs()})
                try:
                    self.autotuner.fn.warmup(*call, grid=(1,), **kwargs, **config.all_kwargs())
                except Exception:                         # noqa: BLE001 (best effort, see above)
                    continue

    def _first_fitting(self, grid, args, kwargs, keep=None) -> tuple[dict, object]:
        """Launch the key's pruned configs (those `keep` takes) in order until one fits the GPU (Triton refuses a
        kernel whose shared memory or registers exceed it before launching anything) and return that one. They
        compile side by side first: the first configs, sized for 16-bit tiles, often do not fit in fp32."""
        candidates = [c for c in self._candidates(args, kwargs) if keep is None or keep(c)]
        if not candidates:
            raise OutOfResources(0, 0, "no candidate config")
        self._precompile(args, kwargs, candidates)
        nargs = self.autotuner.nargs
        for i, config in enumerate(candidates):
            meta = config.all_kwargs()
            try:
                if config.pre_hook is not None:
                    config.pre_hook({**nargs, **kwargs, **meta})
                self.autotuner.fn[grid](*args, **kwargs, **meta)
            except OutOfResources:
                if i == len(candidates) - 1:
                    raise
                continue
            return meta, config.pre_hook
