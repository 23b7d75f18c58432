"""Autotune config generators and shape buckets shared by the kernels.

Under TRITON_INTERPRET=1 (CPU tests) every generator yields one small config: the interpreter is slow and
autotuning there would only multiply the test time.
"""
from __future__ import annotations

import os

import triton

DECODE_MAX_T = 64  # at or below this many tokens a linear layer is memory-bound: GEMV-like tiles


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def t_bucket(t: int) -> int:
    """Autotune key for the token count: powers of two up to 16384, so a new T reuses a tuned config."""
    return min(triton.next_power_of_2(max(t, 1)), 16384)


def _config(bm, bn, bk, warps, stages, **extra):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, **extra},
                         num_warps=warps, num_stages=stages)


def decode_matmul_configs():
    """Skinny-M tiles for small T: many programs along N, long K steps, deep pipelines to keep HBM busy."""
    if interpreting():
        return [_config(16, 32, 32, 4, 1, GROUP_M=1)]
    return [_config(bm, bn, bk, w, s, GROUP_M=1)
            for bm in (16, 64)
            for bn in (16, 32, 64)
            for bk in (128, 256)
            for w in (4,)
            for s in (3, 4, 6)
            if bn * bk <= 64 * 256]


def prefill_matmul_configs():
    """Tensor-core tiles for large T, grouped launch order so W0 tiles stay in L2."""
    if interpreting():
        return [_config(32, 32, 32, 4, 1, GROUP_M=2)]
    return [
        _config(128, 256, 64, 8, 3, GROUP_M=8),
        _config(256, 128, 64, 8, 3, GROUP_M=8),
        _config(128, 128, 64, 8, 4, GROUP_M=8),
        _config(128, 128, 64, 4, 4, GROUP_M=8),
        _config(128, 256, 64, 8, 4, GROUP_M=8),
        _config(64, 256, 64, 4, 4, GROUP_M=8),
        _config(128, 64, 64, 4, 4, GROUP_M=8),
        _config(64, 128, 64, 4, 4, GROUP_M=8),
    ]


def shrink_configs():
    """x (T, K) @ A^T (K, r): tiny N, so split K across programs when T is small."""
    if interpreting():
        return [triton.Config({"BLOCK_T": 16, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_T": bt, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bt in (16, 64, 128)
            for bk in (64, 128, 256)
            for w in (4, 8)
            for s in (2, 4)
            if bt * bk <= 128 * 128]


def weight_grad_configs():
    """sum_t G[t, n] H[t, r]: programs over (N, split of T)."""
    if interpreting():
        return [triton.Config({"BLOCK_N": 32, "BLOCK_T": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_T": bt}, num_warps=w, num_stages=s)
            for bn in (64, 128)
            for bt in (64, 128)
            for w in (4, 8)
            for s in (2, 4)]
