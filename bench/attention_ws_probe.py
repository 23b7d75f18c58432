"""Does Triton 3.6's Hopper warp specialization pay for causal attention? A probe before building on it.

Triton 3.6 runs a warp-specialization pass on sm_90 for a loop written `tl.range(..., warp_specialize=True)`
at num_warps=4 (found 2026-11-27 by compiling for sm_90 on the CPU; its docstring says Blackwell only): a
producer warpgroup issues the TMA loads of q, k and v, two consumer warpgroups (232 registers each) take 64 of the
tile's 128 query rows each, so one group's softmax can run while the other's QK^T / PV run on the tensor cores:
FA3's ping-pong, which kernels.prefix_attention cannot express (bench/NOTES.md, "Prefix attention forward").

The pass is narrow. It compiled only a kernel whose one loop is the whole work: a second loop (the causal
diagonal block), any tl.dot or pointer load outside the loop (the prefix's blocks, before or after), or a
branch choosing the prefix's or the sequence's descriptor inside it made it crash or silently skip. So this
probe's kernel is that one loop: causal attention over the sequence alone, the causal mask applied in every
block (not only the diagonal one), q / k / v through (B, H, L, D) descriptors, grouped-query heads.

Side by side in one run (B = 8, 32 q heads / 8 kv heads x 128, bf16, causal, CUDA-graph replays): PyTorch SDPA,
ptlm's prefix_attention without a prefix, this kernel with and without warp specialization at a few tiles.
If `ws` beats `plain` and ptlm by ~1.3x, the prefix kernel can be split: this kernel for the sequence, then
a pass that attends to the prefix and merges the two by their log-sum-exps (an extra read of q and the
partial output: ~0.1 ms at L = 2048, ~2% of the work at 8192).

    python -m bench.attention_ws_probe --out DIR [--lengths 2048,8192]
    TRITON_INTERPRET=1 python -m bench.attention_ws_probe --smoke --out DIR   # fp32, tiny, checks only
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from bench import harness

LN2 = math.log(2.0)
# (BLOCK_M, BLOCK_N, num_warps, num_stages); warp specialization only at 4 warps (its consumers take 2 x 4 more)
CONFIGS = {"ws": [(128, 64, 4, 2), (128, 64, 4, 3), (128, 128, 4, 2)],
           "plain": [(128, 64, 8, 3), (128, 32, 4, 4), (128, 128, 8, 2)]}


@triton.jit
def _causal_fwd_kernel(q_desc, k_desc, v_desc, o_ptr, H, L, qk_scale, GROUP: tl.constexpr, D: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WARP_SPEC: tl.constexpr):
    """o (B, H, L, D) contiguous; one program per (query block, batch x head); every block masked (see above)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    kvh = h // GROUP
    q = q_desc.load([b, h, pid_m * BLOCK_M, 0]).reshape(BLOCK_M, D)
    offs_q = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    for start_n in tl.range(0, (pid_m + 1) * BLOCK_M, BLOCK_N, warp_specialize=WARP_SPEC):
        k = k_desc.load([b, kvh, start_n, 0]).reshape(BLOCK_N, D)
        s = tl.dot(q, k.T)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        # keys past L sit past every stored query: the causal mask alone keeps them out
        s = tl.where(offs_n[None, :] <= offs_q[:, None], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = v_desc.load([b, kvh, start_n, 0]).reshape(BLOCK_N, D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    o = acc / l_i[:, None]
    offs_d = tl.arange(0, D)
    rows = bh * L + offs_q          # int32 (the host checks): int64 offsets made the consumers spill
    tl.store(o_ptr + rows[:, None] * D + offs_d[None, :], o.to(o_ptr.dtype.element_ty), mask=(offs_q < L)[:, None])


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: tuple, warp_spec: bool,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, H, L, D), k / v (B, Hkv, L, D) contiguous -> o (B, H, L, D), causal, scale D^-0.5."""
    B, H, L, D = q.shape
    block_m, block_n, warps, stages = config
    o = torch.empty_like(q) if out is None else out
    if q.numel() >= 2**31:
        raise ValueError(f"q: at most 2**31 - 1 elements (int32 offsets), got {q.numel()}")
    q_desc = TensorDescriptor.from_tensor(q, [1, 1, block_m, D])
    k_desc = TensorDescriptor.from_tensor(k, [1, 1, block_n, D])
    v_desc = TensorDescriptor.from_tensor(v, [1, 1, block_n, D])
    _causal_fwd_kernel[(triton.cdiv(L, block_m), B * H)](
        q_desc, k_desc, v_desc, o, H, L, D ** -0.5 / LN2, GROUP=H // k.shape[1], D=D, BLOCK_M=block_m,
        BLOCK_N=block_n, WARP_SPEC=warp_spec, num_warps=warps, num_stages=stages)
    return o


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def run(args) -> list[dict]:
    device = harness.pick_device(args.smoke)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    B, H, HKV, D = (1, 2, 1, 16) if args.smoke else (8, 32, 8, 128)
    lengths = [37] if args.smoke else args.lengths
    configs = {name: [(16, 16, 4, 1)] for name in CONFIGS} if args.smoke else CONFIGS
    rows = []
    for L in lengths:
        gen = torch.Generator(device=device).manual_seed(L)
        q, k, v = (torch.randn(B, h, L, D, device=device, dtype=dtype, generator=gen) for h in (H, HKV, HKV))
        want = sdpa(q.double(), k.double(), v.double()) if args.smoke else sdpa(q, k, v)
        flops = 4 * B * H * D * L * (L + 1) / 2                     # causal: the pairs at or below the diagonal
        cases = [("sdpa", None, lambda: sdpa(q, k, v))]
        if not args.smoke:
            from ptlm_engine.functional import prefix_attention
            cases.append(("ptlm_prefix_attention", None, lambda: prefix_attention(q, k, v, causal=True)))
        for name, tiles in configs.items():
            for config in tiles:
                out = torch.full_like(q, float("nan"))               # poisoned: every row must be written
                cases.append((name, config, lambda c=config, w=name == "ws", o=out: causal_attention(q, k, v, c, w,
                                                                                                   out=o)))
        for name, config, call in cases:
            row = {"L": L, "provider": name, "config": None if config is None else "x".join(map(str, config))}
            try:
                got = call()
                row["max_err"] = float((got.double() - want.double()).abs().max())
                if device.type == "cuda":
                    row["ms"] = harness.graph_ms([call], device, args.warmup_ms, args.rep_ms)
                    row["tflops"] = flops / row["ms"] / 1e9
            except Exception as e:                                   # noqa: BLE001 - a config the GPU refuses
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--lengths", type=lambda s: [int(v) for v in s.split(",")], default=[2048, 8192])
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=100.0)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    rows = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    device = harness.pick_device(args.smoke)
    (args.out / "attention_ws_probe.json").write_text(json.dumps(
        {"environment": harness.environment(device), "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
