"""Compile every kernel variant and autotune config for an H100 (sm_90) on any machine, with the ptxas that
ships in Triton's wheel: catches what only the GPU compiler rejects (the CPU tests run Triton's interpreter),
and reports whether the tensor-core path uses Hopper's wgmma. Compiled without the launch-time
specializations (16-divisible pointers and sizes, unit strides as constants), so the software pipelining and
shared memory seen here are not those of a real launch: read those on the GPU.

The H100 runs Triton 3.6; to compile with its front end and ptxas on this machine, install that wheel into a
venv over the system packages (`python -m venv --system-site-packages V && V/bin/pip install --no-deps
triton==3.6.0`) and run this script with V/bin/python (every first config compiled that way on 2026-11-26).

Run as a script (the kernels must be imported without TRITON_INTERPRET): `python sm90_compile.py [--all]
[--usage]` (--usage: each variant's registers and spilled bytes from ptxas -v, unspecialised, so an upper bound)
prints one JSON object per compiled variant: each kernel's first config by default (~1 min cold), or with
--all every autotune config (144 compiles, ~6 min cold on a 2-core CPU; all compiled on 2026-11-25).
"""
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "compile checks need the compiled (not interpreted) kernels"

import triton  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # run as a script: the repository's bench package
from bench.sm90_usage import TARGET, ptxas_usage  # noqa: E402

from ptlm_engine.kernels import bottleneck as B  # noqa: E402
from ptlm_engine.kernels import bottleneck_multi as BM  # noqa: E402
from ptlm_engine.kernels import cross_entropy as CE  # noqa: E402
from ptlm_engine.kernels import lora as L  # noqa: E402
from ptlm_engine.kernels import lora_embedding as LE  # noqa: E402
from ptlm_engine.kernels import lora_grouped as G  # noqa: E402
from ptlm_engine.kernels import lora_multi as M  # noqa: E402
from ptlm_engine.kernels import prefix_attention as PA  # noqa: E402
from ptlm_engine.kernels import rms_norm as RN  # noqa: E402
from ptlm_engine.kernels import rotary as RO  # noqa: E402
from ptlm_engine.kernels import silu_mul as SM  # noqa: E402


def _types(dtype: str, ptrs: dict, consts: dict) -> dict:
    return {name: f"*{dtype}" if t == "x" else t(name, dtype, consts) if callable(t) else t
            for name, t in ptrs.items()}


def _tma_desc(name: str, dtype: str, consts: dict) -> str:
    """A host-side TMA descriptor's type names its block shape, which kernels.lora's pre_hook sets per config."""
    descs = {d: SimpleNamespace() for d in ("x_desc", "w_desc", "xa_desc", "b_desc", "y_desc")}
    L._tma_block_shapes({**descs, **consts})
    fp32 = name == "xa_desc" and consts["R"] > 0          # with R = 0 x stands in for the unread xa
    return f"tensordesc<{'fp32' if fp32 else dtype}[{', '.join(map(str, descs[name].block_shape))}]>"


# kernel -> (pointer/scalar types, one flag set per variant); "x" marks pointers in the layer's dtype
LORA_MATMUL = ({"x_ptr": "x", "w_ptr": "x", "a_ptr": "x", "b_ptr": "x", "bias_ptr": "x", "y_ptr": "x",
                "xa_ptr": "*fp32", "seed_ptr": "*i64", "shrink_scale": "fp32", "dropout_p": "fp32"},
               [dict(FUSE_SHRINK=True, X_DROPOUT=True, OUT_DROPOUT=False, HAS_BIAS=True, ACCUMULATE=False),
                dict(FUSE_SHRINK=False, X_DROPOUT=False, OUT_DROPOUT=True, HAS_BIAS=False, ACCUMULATE=True)])
# the decode kernel: forward (fused shrink, dropout, bias), its unfused form, and the one-launch backward
LORA_DECODE = ({**{f"{p}_ptr": "x" for p in ("x", "w", "a", "b", "bias", "y", "x2", "dk", "dn")},
                **{f"{p}_ptr": "*fp32" for p in ("xa", "h", "part")}, "seed_ptr": "*i64",
                "count_ptr": "*i32", "scale": "fp32", "dropout_p": "fp32"},
               [dict(FUSE_SHRINK=True, X_DROPOUT=True, OUT_DROPOUT=False, HAS_BIAS=True, WEIGHT_GRADS=False,
                     ACCUMULATE=False, BLOCK_M=16),
                dict(FUSE_SHRINK=False, X_DROPOUT=False, OUT_DROPOUT=False, HAS_BIAS=False, WEIGHT_GRADS=False,
                     ACCUMULATE=False, BLOCK_M=64),
                dict(FUSE_SHRINK=True, X_DROPOUT=False, OUT_DROPOUT=True, HAS_BIAS=False, WEIGHT_GRADS=True,
                     ACCUMULATE=True, BLOCK_M=64),
                # the forward's shrink on the launch's own programs
                dict(FUSE_SHRINK=False, X_DROPOUT=True, OUT_DROPOUT=False, HAS_BIAS=True, WEIGHT_GRADS=False,
                     ACCUMULATE=False, BLOCK_M=16, SHRINK_SPLIT=8)])
# the Hopper TMA matmul: forward layout with bias, and the backward's dx (W0 and A transposed, output dropout)
LORA_MATMUL_TMA = ({**{d: _tma_desc for d in ("x_desc", "w_desc", "xa_desc", "b_desc", "y_desc")},
                    "bias_ptr": "x", "seed_ptr": "*i64", "dropout_p": "fp32"},
                   [dict(W_KMAJOR=True, B_RMAJOR=True, OUT_DROPOUT=False, HAS_BIAS=True, ACCUMULATE=False, R=16,
                         WAIT_PRIOR=True, NUM_SMS=132),
                    dict(W_KMAJOR=False, B_RMAJOR=False, OUT_DROPOUT=True, HAS_BIAS=False, ACCUMULATE=True, R=16,
                         WAIT_PRIOR=False, NUM_SMS=132),
                    dict(W_KMAJOR=False, B_RMAJOR=False, OUT_DROPOUT=False, HAS_BIAS=False, ACCUMULATE=False, R=0,
                         WAIT_PRIOR=False, NUM_SMS=132)])     # the base GEMM alone (kernels.lora_multi's prefill dx)
MULTI_MATMUL = ({"x_ptr": "x", "w_ptr": "x", "b_ptr": "x", "bias_ptr": "x", "y_ptr": "x", "xa_ptr": "*fp32",
                 "idx_ptr": "*i32", "order_ptr": "*i32", "ranks_ptr": "*i32", "dropouts_ptr": "*fp32",
                 "seed_ptr": "*i64", "a_ptr": "x", "scales_ptr": "*fp32", "count_ptr": "*i32"},
                [dict(HAS_ORDER=True, OUT_DROPOUT=False, HAS_BIAS=True, ACCUMULATE=False, WAIT_PRIOR=True),
                 dict(HAS_ORDER=False, OUT_DROPOUT=True, HAS_BIAS=False, ACCUMULATE=False, WAIT_PRIOR=False),
                 dict(HAS_ORDER=True, OUT_DROPOUT=True, HAS_BIAS=False, ACCUMULATE=True,  # the expand over y
                      WAIT_PRIOR=False),
                 # the forward in one launch: its own shrink programs, with input dropout
                 dict(HAS_ORDER=True, OUT_DROPOUT=False, HAS_BIAS=True, ACCUMULATE=False, WAIT_PRIOR=False,
                      SHRINK_BLOCK_T=64, X_DROPOUT=True)])


def _multi_tma_desc(name: str, dtype: str, consts: dict) -> str:
    bm, bn, bk = consts["BLOCK_M"], consts["BLOCK_N"], consts["BLOCK_K"]
    block = [bm, bk] if name == "xs_desc" else [bn, bk] if consts["W_KMAJOR"] else [bk, bn]
    return f"tensordesc<{dtype}[{', '.join(map(str, block))}]>"


# the Hopper TMA tile over the sorted rows: forward (PDL, bias) and the backward's dx (W0 transposed, dropout, +=)
MULTI_MATMUL_TMA = ({"xs_desc": _multi_tma_desc, "w_desc": _multi_tma_desc, "xa_ptr": "*fp32", "b_ptr": "x",
                     "idx_ptr": "*i32", "order_ptr": "*i32", "ranks_ptr": "*i32", "dropouts_ptr": "*fp32",
                     "seed_ptr": "*i64", "bias_ptr": "x", "y_ptr": "x"},
                    [dict(W_KMAJOR=True, OUT_DROPOUT=False, HAS_BIAS=True, ACCUMULATE=False, WAIT_PRIOR=True,
                          NUM_SMS=132),
                     dict(W_KMAJOR=False, OUT_DROPOUT=True, HAS_BIAS=False, ACCUMULATE=True, WAIT_PRIOR=True,
                          NUM_SMS=132)])
# three members: one with a fused shrink and dropout, one without an adapter, one with a separate shrink's xa
GROUPED_MATMUL = ({"x_ptr": "x", **{f"{p}{g}_ptr": "x" for p in ("w", "a", "b", "bias", "y") for g in range(3)},
                   **{f"xa{g}_ptr": "*fp32" for g in range(3)}, **{f"seed{g}_ptr": "*i64" for g in range(3)},
                   **{f"{p}{g}": "fp32" for p in ("scale", "p") for g in range(3)}},
                  [dict(MEMBERS=3, FUSE0=True, FUSE1=False, FUSE2=False, DROP0=True, DROP1=False, DROP2=False,
                        HAS_BIAS0=True, HAS_BIAS1=False, HAS_BIAS2=True)])
GROUPED_MULTI_MATMUL = ({"x_ptr": "x", "idx_ptr": "*i32", "order_ptr": "*i32",
                         **{f"{p}{g}_ptr": "x" for p in ("w", "b", "bias", "y", "a") for g in range(3)},
                         **{f"{p}{g}_ptr": "*fp32" for p in ("xa", "scales", "dropouts") for g in range(3)},
                         **{f"ranks{g}_ptr": "*i32" for g in range(3)}, **{f"seed{g}_ptr": "*i64" for g in range(3)},
                         "count_ptr": "*i32", "ws_ptr": "*fp32"},
                        [dict(MEMBERS=3, HAS_ORDER=True, LORA0=True, LORA1=False, LORA2=True, HAS_BIAS0=True,
                              HAS_BIAS1=False, HAS_BIAS2=False, WAIT_PRIOR=True, IN_LOOP=in_loop)
                         for in_loop in (False, True)]
                        # the forward in one launch: the members' shrink programs at decode, then at prefill
                        + [dict(MEMBERS=3, HAS_ORDER=True, LORA0=True, LORA1=True, LORA2=True, HAS_BIAS0=True,
                                HAS_BIAS1=False, HAS_BIAS2=False, WAIT_PRIOR=False, IN_LOOP=True, DROP0=True,
                                SHRINK_SPLIT=8, SHRINK_ROUNDS=4, SHRINK_BLOCK_M=64),
                           dict(MEMBERS=2, HAS_ORDER=True, LORA0=True, LORA1=True, LORA2=False, HAS_BIAS0=False,
                                HAS_BIAS1=False, HAS_BIAS2=False, WAIT_PRIOR=False, IN_LOOP=False, DROP1=True,
                                SHRINK_BLOCK_T=64)])


# bottleneck adapters (the multi-adapter kernels compile one copy of the adapter per width tile up to M_PAD's)
BOTTLENECK_SLOTS = {"idx_ptr": "*i32", "order_ptr": "*i32", "bounds_ptr": "*i32", "sizes_ptr": "*i32",
                    "scales_ptr": "*fp32", "acts_ptr": "*i32", "scale": "fp32"}
BOTTLENECK_ROWS = {**{f"{p}_ptr": "x" for p in ("dy", "z", "wu", "a", "dz")}, **BOTTLENECK_SLOTS}
BOTTLENECK_GRADS = {**{f"{p}_ptr": "x" for p in ("dy", "h", "a", "dz", "wd", "dh")},
                    **{f"{p}_ptr": "*fp32" for p in ("dwu", "dwd", "dbu", "dbd")}, **BOTTLENECK_SLOTS}
BOTTLENECK_FORWARD = {**{f"{p}_ptr": "x" for p in ("h", "base", "y", "z", "wd", "bd", "wu", "bu")}, **BOTTLENECK_SLOTS}
KERNELS = {
    "lora.decode": (L._lora_decode, *LORA_DECODE),
    "lora.matmul_prefill": (L._lora_matmul_prefill, *LORA_MATMUL),
    "lora.matmul_tma": (L._lora_matmul_tma, *LORA_MATMUL_TMA),
    "lora.shrink": (L._lora_shrink, {"x_ptr": "x", "a_ptr": "x", "out_ptr": "*fp32", "seed_ptr": "*i64",
                                     "scale": "fp32", "dropout_p": "fp32"},
                   [dict(HAS_DROPOUT=True, LAUNCH_DEPENDENTS=True), dict(HAS_DROPOUT=False, LAUNCH_DEPENDENTS=False)]),
    "lora.weight_grad": (L._lora_weight_grad, {"g_ptr": "x", "h_ptr": "*fp32", "out_ptr": "*fp32", "g2_ptr": "x",
                                               "h2_ptr": "*fp32", "out2_ptr": "*fp32", "seed_ptr": "*i64",
                                               "dropout_p": "fp32"}, [dict(HAS_DROPOUT=True)]),
    "multi.decode": (M._multi_decode, {"x_ptr": "x", "w_ptr": "x", "xa_ptr": "*fp32", "a_ptr": "x", "b_ptr": "x",
                                       "idx_ptr": "*i32", "order_ptr": "*i32", "ranks_ptr": "*i32",
                                       "scales_ptr": "*fp32", "dropouts_ptr": "*fp32", "seed_ptr": "*i64",
                                       "bias_ptr": "x", "y_ptr": "x", "part_ptr": "*fp32", "count_ptr": "*i32"},
                     [dict(HAS_ORDER=True, FUSE_SHRINK=False, X_DROPOUT=False, OUT_DROPOUT=False, HAS_BIAS=True,
                           WAIT_PRIOR=True, IN_LOOP=False, BLOCK_M=64),
                      dict(HAS_ORDER=True, FUSE_SHRINK=False, X_DROPOUT=False, OUT_DROPOUT=False, HAS_BIAS=True,
                           WAIT_PRIOR=True, IN_LOOP=True, BLOCK_M=64),
                      dict(HAS_ORDER=False, FUSE_SHRINK=False, X_DROPOUT=False, OUT_DROPOUT=True, HAS_BIAS=False,
                           WAIT_PRIOR=False, IN_LOOP=False, BLOCK_M=16),
                      dict(HAS_ORDER=True, FUSE_SHRINK=True, X_DROPOUT=False, OUT_DROPOUT=False, HAS_BIAS=True,
                           WAIT_PRIOR=False, IN_LOOP=False, BLOCK_M=16),
                      dict(HAS_ORDER=True, FUSE_SHRINK=True, X_DROPOUT=True, OUT_DROPOUT=False, HAS_BIAS=False,
                           WAIT_PRIOR=False, IN_LOOP=False, BLOCK_M=16),
                      # the launch's own shrink programs (SHRINK_SPLIT), expanding inside the K loop or after it
                      dict(HAS_ORDER=True, FUSE_SHRINK=False, X_DROPOUT=False, OUT_DROPOUT=False, HAS_BIAS=True,
                           WAIT_PRIOR=False, IN_LOOP=True, BLOCK_M=64, SHRINK_SPLIT=8, SHRINK_ROUNDS=8),
                      dict(HAS_ORDER=True, FUSE_SHRINK=False, X_DROPOUT=True, OUT_DROPOUT=False, HAS_BIAS=False,
                           WAIT_PRIOR=False, IN_LOOP=False, BLOCK_M=16, SHRINK_SPLIT=8, SHRINK_ROUNDS=2)]),
    "multi.matmul_prefill": (M._multi_matmul_prefill, *MULTI_MATMUL),
    "multi.matmul_tma": (M._multi_matmul_tma, *MULTI_MATMUL_TMA),
    "multi.shrink": (M._multi_shrink, {"x_ptr": "x", "a_ptr": "x", "idx_ptr": "*i32", "order_ptr": "*i32",
                                       "ranks_ptr": "*i32", "scales_ptr": "*fp32", "dropouts_ptr": "*fp32",
                                       "seed_ptr": "*i64", "out_ptr": "*fp32", "xs_ptr": "x"},
                     [dict(HAS_ORDER=True, MASK_X=True, DIV_KEEP=True, STORE_X=True, LAUNCH_DEPENDENTS=True),
                      dict(HAS_ORDER=False, MASK_X=False, DIV_KEEP=True, STORE_X=False, LAUNCH_DEPENDENTS=False)]),
    "multi.weight_grad": (M._multi_weight_grad, {"g_ptr": "x", "h_ptr": "*fp32", "order_ptr": "*i32",
                                                 "seg_ptr": "*i32", "ranks_ptr": "*i32", "dropouts_ptr": "*fp32",
                                                 "seed_ptr": "*i64", "out_ptr": "*fp32"}, [dict(MASK_G=True)]),
    "bottleneck.forward": (B._forward, BOTTLENECK_FORWARD,
                           [dict(ACT=1, HAS_BD=True, HAS_BU=False, STORE_Z=True, M_PAD=64)]),
    "bottleneck.down": (B._down, BOTTLENECK_FORWARD, [dict(HAS_BD=True, M_PAD=256)]),
    "bottleneck.up": (B._up, BOTTLENECK_FORWARD, [dict(ACT=1, HAS_BU=True, M_PAD=256)]),
    "bottleneck.rows_backward": (B._rows_backward, BOTTLENECK_ROWS, [dict(ACT=2, M_PAD=64)]),
    "bottleneck.rows_backward_tiled": (B._rows_backward_tiled, BOTTLENECK_ROWS, [dict(ACT=1, M_PAD=256)]),
    "bottleneck.grads": (B._grads, {**BOTTLENECK_GRADS, "part_ptr": "*fp32", "count_ptr": "*i32"},
                         [dict(ADD_DY=True, NEED_DH=True, M_PAD=64)]),
    "bottleneck.weight_grads": (B._weight_grads, {**BOTTLENECK_GRADS, "part_ptr": "*fp32", "count_ptr": "*i32"},
                                [dict(M_PAD=256)]),
    "bottleneck.input_grad": (B._input_grad, BOTTLENECK_GRADS, [dict(ADD_DY=True, M_PAD=256)]),
    "bottleneck.multi_forward": (BM._multi_forward, BOTTLENECK_FORWARD, [dict(STORE_Z=True, M_PAD=32)]),
    "bottleneck.segment_forward": (BM._segment_forward, BOTTLENECK_FORWARD,
                                   [dict(STORE_Z=True, M_PAD=64, S_PAD=64), dict(STORE_Z=False, M_PAD=256, S_PAD=8)]),
    "bottleneck.multi_rows_backward": (BM._multi_rows_backward, BOTTLENECK_ROWS, [dict(M_PAD=32)]),
    "bottleneck.segment_rows_backward": (BM._segment_rows_backward, BOTTLENECK_ROWS, [dict(M_PAD=64, S_PAD=64)]),
    "bottleneck.multi_grads": (BM._multi_grads, BOTTLENECK_GRADS,
                               [dict(ADD_DY=False, NEED_DH=True, M_PAD=32, S_PAD=64)]),
    "bottleneck.multi_weight_grads": (BM._multi_weight_grads, BOTTLENECK_GRADS, [dict(M_PAD=256, S_PAD=64)]),
    "bottleneck.multi_input_grad": (BM._multi_input_grad, BOTTLENECK_GRADS,
                                    [dict(ADD_DY=False, M_PAD=256, S_PAD=64)]),
    "grouped.matmul_decode": (G._grouped_matmul_decode, *GROUPED_MATMUL),
    "grouped.matmul_prefill": (G._grouped_matmul_prefill, *GROUPED_MATMUL),
    "grouped.shrink": (G._grouped_shrink, {"x_ptr": "x", **{f"a{g}_ptr": "x" for g in range(3)},
                                           **{f"out{g}_ptr": "*fp32" for g in range(3)},
                                           **{f"seed{g}_ptr": "*i64" for g in range(3)},
                                           **{f"{p}{g}": "fp32" for p in ("scale", "p") for g in range(3)}},
                       [dict(MEMBERS=3, DROP0=True, DROP1=False, DROP2=False, LAUNCH_DEPENDENTS=True)]),
    "grouped.shrink_each": (G._grouped_shrink_each, {**{f"{p}{g}_ptr": "x" for p in ("x", "a") for g in range(3)},
                                                     **{f"out{g}_ptr": "*fp32" for g in range(3)},
                                                     **{f"scale{g}": "fp32" for g in range(3)}}, [dict(MEMBERS=3)]),
    "grouped.weight_grad": (G._grouped_weight_grad, {"x_ptr": "x", **{f"dy{g}_ptr": "x" for g in range(3)},
                                                     **{f"{p}{g}_ptr": "*fp32" for p in ("g", "xa", "da", "db")
                                                        for g in range(3)},
                                                     **{f"seed{g}_ptr": "*i64" for g in range(3)},
                                                     **{f"p{g}": "fp32" for g in range(3)}},
                            [dict(MEMBERS=3, DROP0=True, DROP1=False, DROP2=True)]),
    "grouped.multi_matmul_decode": (G._grouped_multi_matmul_decode, *GROUPED_MULTI_MATMUL),
    "grouped.multi_matmul_prefill": (G._grouped_multi_matmul_prefill, *GROUPED_MULTI_MATMUL),
    "grouped.multi_shrink": (G._grouped_multi_shrink, {"x_ptr": "x", "idx_ptr": "*i32", "order_ptr": "*i32",
                                                       **{f"a{g}_ptr": "x" for g in range(3)},
                                                       **{f"{p}{g}_ptr": t for p, t in (
                                                           ("ranks", "*i32"), ("scales", "*fp32"),
                                                           ("dropouts", "*fp32"), ("seed", "*i64"),
                                                           ("out", "*fp32")) for g in range(3)}, "xs_ptr": "x"},
                             [dict(MEMBERS=3, HAS_ORDER=True, DROP0=True, DROP1=False, DROP2=True, STORE_X=True,
                                   LAUNCH_DEPENDENTS=True),
                              dict(MEMBERS=2, HAS_ORDER=False, DROP0=False, DROP1=False, DROP2=False, STORE_X=False,
                                   LAUNCH_DEPENDENTS=False)]),
}
# prefix attention: 4 q heads per kv head x 128, a prefix with per-row lengths; the delta kernel has no
# autotuner (one fixed tile); the split dK / dV kernel's unused dq_ptr points at dk
PREFIX_INPUTS = {**{f"{p}_ptr": "x" for p in ("q", "k", "v", "pk", "pv", "do", "o")}, "plen_ptr": "*i32",
                 "kpm_ptr": "*u8", "lse_ptr": "*fp32", "delta_ptr": "*fp32", "sm_scale": "fp32", "qk_scale": "fp32"}
PREFIX_GRADS = {**PREFIX_INPUTS, **{f"{p}_ptr": "x" for p in ("dk", "dv", "dpk", "dpv")}}
PREFIX_FLAGS = dict(GROUP=4, HEAD_DIM=128, BLOCK_D=128, CAUSAL=True, HAS_PREFIX=True, HAS_LENGTHS=True)
# the pointer variants pass no descriptors (None: constexpr); the TMA variants' descriptors are (1, 1, rows, BLOCK_D)
NO_DESCS = dict(q_desc=None, k_desc=None, v_desc=None, do_desc=None, dq_desc=None, TMA=False)


def _prefix_desc(name: str, dtype: str, consts: dict) -> str:
    return (f"tensordesc<{'fp32' if name == 'dq_desc' else dtype}"
            f"[1, 1, {consts[PA._DESC_ROWS[name]]}, {consts['BLOCK_D']}]>")


PREFIX_DESCS = {name: _prefix_desc for name in PA._DESC_ROWS}
PREFIX_DELTA = SimpleNamespace(autotuner=SimpleNamespace(fn=PA._delta_kernel, configs=[
    triton.Config({"BLOCK_M": PA.DELTA_BLOCK_M}, num_warps=4, num_stages=1)]))
KERNELS.update({
    "prefix.forward": (PA._prefix_attn_fwd, {**PREFIX_INPUTS, **PREFIX_DESCS},
                       [dict(PREFIX_FLAGS, **NO_DESCS, HAS_PADDING=False, NONNEG_SCALE=True),
                        dict(PREFIX_FLAGS, **NO_DESCS, CAUSAL=False, HAS_PADDING=True, NONNEG_SCALE=False),
                        dict(PREFIX_FLAGS, HAS_PADDING=False, NONNEG_SCALE=True, TMA=True)]),
    "prefix.delta": (PREFIX_DELTA, PREFIX_INPUTS, [dict(HEAD_DIM=128, BLOCK_D=128)]),
    "prefix.dkdv": (PA._prefix_attn_dkdv, {**PREFIX_GRADS, "dq_ptr": "x", **PREFIX_DESCS},
                    [dict(PREFIX_FLAGS, **NO_DESCS, HAS_PADDING=True, ATOMIC_DQ=False),
                     dict(PREFIX_FLAGS, HAS_PADDING=True, ATOMIC_DQ=False, TMA=True, dq_desc=None)]),
    "prefix.bwd_fused": (PA._prefix_attn_bwd_fused, {**PREFIX_GRADS, "dq_ptr": "*fp32", **PREFIX_DESCS},
                         [dict(PREFIX_FLAGS, **NO_DESCS, HAS_PADDING=False, ATOMIC_DQ=True),
                          dict(PREFIX_FLAGS, **NO_DESCS, HAS_PADDING=True, ATOMIC_DQ=True),
                          dict(PREFIX_FLAGS, HAS_PADDING=False, ATOMIC_DQ=True, TMA=True)]),
    "prefix.dq": (PA._prefix_attn_dq, {**PREFIX_INPUTS, "dq_ptr": "x"}, [dict(PREFIX_FLAGS, HAS_PADDING=True)]),
})


def _fixed(fn, *configs):
    """A kernel launched with fixed tiles (no autotuner), in the shape main() reads."""
    return SimpleNamespace(autotuner=SimpleNamespace(fn=fn, configs=list(configs)))


def _rms_tiles(T: int, d: int):
    block_t, block_d, warps = RN.block_shape(T, d)
    return triton.Config({"BLOCK_T": block_t, "BLOCK_D": block_d}, num_warps=warps, num_stages=1)


# base-model ops with their launchers' tiles at the training step's shapes: rms_norm d = 2048 (one row a program)
# and d = 128 (Qwen3's per-head norms: several rows), silu_mul's F = 5632, rotary's D = 64
SILU_BLOCK, SILU_WARPS = SM.block_size(5632)
ROTARY_L, ROTARY_HALF, ROTARY_WARPS = RO.block_shape(1024, 64)
KERNELS.update({
    "rms_norm.forward": (_fixed(RN._rms_norm_fwd_kernel, _rms_tiles(8192, 2048), _rms_tiles(8192, 128)),
                         {"x_ptr": "x", "w_ptr": "x", "y_ptr": "x", "rstd_ptr": "*fp32", "eps": "fp32"},
                         [dict(STORE_RSTD=True)]),
    "rms_norm.backward": (_fixed(RN._rms_norm_bwd_kernel, _rms_tiles(8192, 2048)),
                          {"dy_ptr": "x", "x_ptr": "x", "w_ptr": "x", "rstd_ptr": "*fp32", "dx_ptr": "x",
                           "dw_ptr": "*fp32"}, [dict(HAS_DW=True), dict(HAS_DW=False)]),
    "silu_mul.forward": (_fixed(SM._silu_mul_fwd_kernel, triton.Config({"BLOCK": SILU_BLOCK}, num_warps=SILU_WARPS,
                                                                        num_stages=1)),
                         {"g_ptr": "x", "u_ptr": "x", "y_ptr": "x"}, [{}]),
    "silu_mul.backward": (_fixed(SM._silu_mul_bwd_kernel, triton.Config({"BLOCK": SILU_BLOCK}, num_warps=SILU_WARPS,
                                                                         num_stages=1)),
                          {f"{p}_ptr": "x" for p in ("dy", "g", "u", "dg", "du")}, [{}]),
    "rotary": (_fixed(RO._rotary_kernel, triton.Config({"BLOCK_L": ROTARY_L, "BLOCK_HALF": ROTARY_HALF},
                                                       num_warps=ROTARY_WARPS, num_stages=1)),
               {f"{p}_ptr": "x" for p in ("q", "k", "cos", "sin", "qo", "ko")},
               [dict(BACKWARD=False), dict(BACKWARD=True)]),
})
# LoRA on embeddings at d = 4096 and many token blocks, r = 16 and r = 128 (its 64-column tiles)
_EMB = [LE.launch_shape(16384, 4096, r) for r in (16, 128)]
KERNELS["lora_embedding.forward"] = (
    _fixed(LE._lora_embedding_fwd_kernel, *(triton.Config({"BLOCK_T": bt, "BLOCK_D": bd, "R_PAD": rp}, num_warps=w,
                                                          num_stages=1) for bt, bd, rp, _, w in _EMB)),
    {"ids_ptr": "*i64", "index_ptr": "*i32", "order_ptr": "*i32", "w_ptr": "x", "a_ptr": "x", "b_ptr": "x",
     "ranks_ptr": "*i32", "scales_ptr": "*fp32", "y_ptr": "x", "xa_ptr": "*fp32", "embed_scale": "fp32"}, [{}])
# the loss's chunk kernel at the training step's vocabulary (V = 32000: BLOCK_V = MAX_BLOCK_V, several steps a row)
CE_BLOCK, CE_WARPS = CE.block_shape(32000)
KERNELS["cross_entropy"] = (_fixed(CE._cross_entropy_kernel, triton.Config({"BLOCK_V": CE_BLOCK}, num_warps=CE_WARPS,
                                                                          num_stages=1)),
                            {"x_ptr": "x", "targets_ptr": "*i64", "loss_ptr": "*fp32", "scale_ptr": "*fp32"},
                            [dict(WRITE_GRAD=True), dict(WRITE_GRAD=False)])


def compile_one(launcher, types: dict, consts: dict, num_warps: int, num_stages: int):
    fn = launcher.autotuner.fn
    signature, constexprs = {}, {}
    defaults = {p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}
    for i, name in enumerate(fn.arg_names):
        if name in consts or name in defaults:        # a constexpr a config leaves out takes its default
            signature[name], constexprs[(i,)] = "constexpr", consts.get(name, defaults.get(name))
        else:
            signature[name] = types.get(name, "i32")
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})


def main(every_config: bool, dtype: str = "bf16", usage: bool = False) -> None:
    for name, (launcher, ptrs, variants) in KERNELS.items():
        configs = launcher.autotuner.configs if every_config else launcher.autotuner.configs[:1]
        for flags in variants:
            for config in configs:
                consts = {"FP32_DOT": dtype == "fp32", "BLOCK_R": 16, **flags, **config.kwargs}
                row = {"kernel": name, "flags": flags, "config": config.kwargs, "warps": config.num_warps,
                       "stages": config.num_stages}
                try:
                    kernel = compile_one(launcher, _types(dtype, ptrs, consts), consts, config.num_warps,
                                         config.num_stages)
                    row.update(ok=True, wgmma="wgmma" in kernel.asm["ptx"],
                               tma="cp.async.bulk.tensor" in kernel.asm["ptx"])
                    if usage:
                        row.update(ptxas_usage(kernel.asm["ptx"]))
                except Exception as e:  # noqa: BLE001 - reported, and the test fails on it
                    row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main("--all" in sys.argv[1:], usage="--usage" in sys.argv[1:])
