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

With a prefix, the kernel cannot take the prefix's keys (see above), so the probe also runs the split design:
this kernel over the sequence (writing o and each row's log-sum-exp), then `_prefix_merge_kernel`, which attends
to the prefix and merges in place, the sequence's (lse, o) being the online softmax's state after its keys. The
merge costs a read of q and of o and a second write of o: 3 x B·H·L·D·2 bytes, 0.40 GB (~0.13 ms) at L = 2048,
1.6 GB (~0.54 ms, ~7% of the attention) at L = 8192.

Side by side in one run (B = 8, 32 q heads / 8 kv heads x 128, bf16, causal, CUDA-graph replays): PyTorch SDPA,
ptlm's prefix_attention without and with a prefix (P = 16), this kernel with and without warp specialization at
a few tiles, and the split design on each flag's first tile; each row's max error against SDPA (no prefix) or
ptlm's prefix_attention (prefix), on poisoned outputs.

    python -m bench.attention_ws_probe --out DIR [--lengths 2048,8192] [--prefix 16]
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
def _causal_fwd_kernel(q_desc, k_desc, v_desc, o_ptr, lse_ptr, H, L, qk_scale, GROUP: tl.constexpr,
                       D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WARP_SPEC: tl.constexpr,
                       STORE_LSE: tl.constexpr):
    """o (B, H, L, D) contiguous; one program per (query block, batch x head); every block masked (see above).
    STORE_LSE: each row's log2-sum-exp2 of its scores into lse (B, H, L) fp32, for _prefix_merge_kernel."""
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
    if STORE_LSE:
        tl.store(lse_ptr + rows, m_i + tl.math.log2(l_i), mask=offs_q < L)


@triton.jit
def _prefix_merge_kernel(q_ptr, pk_ptr, pv_ptr, o_ptr, lse_ptr, H, L, P, qk_scale, GROUP: tl.constexpr,
                         D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr):
    """The prefix's share of o, in place: o (B, H, L, D) holds the sequence's softmax output and lse (B, H, L) its
    log2-sum-exp2, which is the online softmax's state (m = lse, l = 1, acc = o) after the sequence's keys; the
    prefix's keys (B, Hkv, P, D) contiguous, seen by every query, continue it."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    kvh = bh % H // GROUP
    offs_q = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    mask_q = (offs_q < L)[:, None]
    rows = bh * L + offs_q
    q = tl.load(q_ptr + rows[:, None] * D + offs_d[None, :], mask=mask_q, other=0.0)
    acc = tl.load(o_ptr + rows[:, None] * D + offs_d[None, :], mask=mask_q, other=0.0).to(tl.float32)
    m_i = tl.load(lse_ptr + rows, mask=offs_q < L, other=0.0)
    l_i = tl.full((BLOCK_M,), 1.0, tl.float32)
    prefix = (b * (H // GROUP) + kvh) * P * D
    for start in range(0, P, BLOCK_P):
        offs_p = start + tl.arange(0, BLOCK_P)
        mask_p = offs_p < P
        pk = tl.load(pk_ptr + prefix + offs_p[:, None] * D + offs_d[None, :], mask=mask_p[:, None], other=0.0)
        s = tl.where(mask_p[None, :], tl.dot(q, pk.T) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        pv = tl.load(pv_ptr + prefix + offs_p[:, None] * D + offs_d[None, :], mask=mask_p[:, None], other=0.0)
        acc = tl.dot(p.to(pv.dtype), pv, acc * alpha[:, None])
        m_i = m_new
    tl.store(o_ptr + rows[:, None] * D + offs_d[None, :], (acc / l_i[:, None]).to(o_ptr.dtype.element_ty),
             mask=mask_q)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: tuple, warp_spec: bool,
                     out: torch.Tensor | None = None, prefix_k: torch.Tensor | None = None,
                     prefix_v: torch.Tensor | None = None, merge_block: tuple = (64, 32, 4)) -> torch.Tensor:
    """q (B, H, L, D), k / v (B, Hkv, L, D) contiguous -> o (B, H, L, D), causal, scale D^-0.5. With prefix_k /
    prefix_v (B, Hkv, P, D) contiguous, seen by every query: the split design (the sequence kernel, then
    _prefix_merge_kernel with merge_block = (BLOCK_M, BLOCK_P, warps))."""
    B, H, L, D = q.shape
    block_m, block_n, warps, stages = config
    o = torch.empty_like(q) if out is None else out
    if q.numel() >= 2**31:
        raise ValueError(f"q: at most 2**31 - 1 elements (int32 offsets), got {q.numel()}")
    lse = torch.empty((B, H, L), device=q.device, dtype=torch.float32) if prefix_k is not None else o
    qk_scale = D ** -0.5 / LN2
    q_desc = TensorDescriptor.from_tensor(q, [1, 1, block_m, D])
    k_desc = TensorDescriptor.from_tensor(k, [1, 1, block_n, D])
    v_desc = TensorDescriptor.from_tensor(v, [1, 1, block_n, D])
    _causal_fwd_kernel[(triton.cdiv(L, block_m), B * H)](
        q_desc, k_desc, v_desc, o, lse, H, L, qk_scale, GROUP=H // k.shape[1], D=D, BLOCK_M=block_m,
        BLOCK_N=block_n, WARP_SPEC=warp_spec, STORE_LSE=prefix_k is not None, num_warps=warps, num_stages=stages)
    if prefix_k is not None:
        merge_m, merge_p, merge_warps = merge_block
        _prefix_merge_kernel[(triton.cdiv(L, merge_m), B * H)](
            q, prefix_k, prefix_v, o, lse, H, L, prefix_k.shape[2], qk_scale, GROUP=H // k.shape[1], D=D,
            BLOCK_M=merge_m, BLOCK_P=merge_p, num_warps=merge_warps)
    return o


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def prefix_reference(q, k, v, prefix_k, prefix_v):
    """Attention over [prefix ; sequence] in float64, the prefix seen by every query, causal over the sequence."""
    L, P = q.shape[2], prefix_k.shape[2]
    keys, values = torch.cat([prefix_k, k], 2).double(), torch.cat([prefix_v, v], 2).double()
    seen = torch.cat([torch.ones(L, P, dtype=torch.bool), torch.ones(L, L, dtype=torch.bool).tril()], 1)
    return F.scaled_dot_product_attention(q.double(), keys, values, attn_mask=seen.to(q.device), enable_gqa=True)


def run(args) -> list[dict]:
    device = harness.pick_device(args.smoke)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    B, H, HKV, D = (1, 2, 1, 16) if args.smoke else (8, 32, 8, 128)
    lengths, P = ([37], 5) if args.smoke else (args.lengths, args.prefix)
    configs = {name: [(16, 16, 4, 1)] for name in CONFIGS} if args.smoke else CONFIGS
    merge = (16, 16, 4) if args.smoke else (64, 32, 4)
    rows = []
    for L in lengths:
        gen = torch.Generator(device=device).manual_seed(L)
        q, k, v = (torch.randn(B, h, L, D, device=device, dtype=dtype, generator=gen) for h in (H, HKV, HKV))
        pk, pv = (torch.randn(B, HKV, P, D, device=device, dtype=dtype, generator=gen) for _ in range(2))
        flops = 4 * B * H * D * L * (L + 1) / 2                     # causal: the pairs at or below the diagonal
        # (provider, config, prefix length, call, what its output is compared with)
        if args.smoke:
            want, want_prefix = sdpa(q.double(), k.double(), v.double()), prefix_reference(q, k, v, pk, pv)
        else:
            from ptlm_engine.functional import prefix_attention
            want = sdpa(q, k, v)
            want_prefix = prefix_attention(q, k, v, pk, pv, causal=True)
        cases = [("sdpa", None, 0, lambda: sdpa(q, k, v), want)]
        if not args.smoke:
            cases += [("ptlm_prefix_attention", None, 0, lambda: prefix_attention(q, k, v, causal=True), want),
                      ("ptlm_prefix_attention", None, P, lambda: prefix_attention(q, k, v, pk, pv, causal=True),
                       want_prefix)]
        for name, tiles in configs.items():
            for i, config in enumerate(tiles):
                out = torch.full_like(q, float("nan"))               # poisoned: every row must be written
                cases.append((name, config, 0, lambda c=config, w=name == "ws", o=out: causal_attention(
                    q, k, v, c, w, out=o), want))
                if i == 0:                                           # the split design, on the first tile
                    out_p = torch.full_like(q, float("nan"))
                    cases.append((name, config, P, lambda c=config, w=name == "ws", o=out_p: causal_attention(
                        q, k, v, c, w, out=o, prefix_k=pk, prefix_v=pv, merge_block=merge), want_prefix))
        for name, config, prefix, call, reference in cases:
            row = {"L": L, "P": prefix, "provider": name,
                   "config": None if config is None else "x".join(map(str, config))}
            try:
                got = call()
                row["max_err"] = float((got.double() - reference.double()).abs().max())
                if device.type == "cuda":
                    row["ms"] = harness.graph_ms([call], device, args.warmup_ms, args.rep_ms)
                    row["tflops"] = (flops + 4 * B * H * D * L * prefix) / row["ms"] / 1e9
            except Exception as e:                                   # noqa: BLE001 - a config the GPU refuses
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--lengths", type=lambda s: [int(v) for v in s.split(",")], default=[2048, 8192])
    p.add_argument("--prefix", type=int, default=16, help="prefix length P of the split-design rows")
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
