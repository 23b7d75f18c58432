"""Every decode config timed alone: which of the split-K decode kernels' configs wins, and by how much.

The autotuner keeps only its winner; this times each config of kernels.lora's `_lora_decode` (forward, and the
one-launch backward) and kernels.lora_multi's `_multi_decode` (32 rank-16 adapters, uniform rows; its own shrink
where the op fuses it, T <= 4) in CUDA-graph
replays, beside cuBLAS's base GEMM (x W0^T, and the backward's dy W0) in the same run, at T = 1 / 16 / 64 on
Llama-7B layer shapes, bf16, W0 rotated over sets that together exceed L2. One line per (op, shape, T):
cuBLAS, then each config's ms and ratio. Configs are named BLOCK_N x BLOCK_K / SPLIT_K / warps / stages.

    python -m bench.decode_configs --out DIR [--shapes 4096x4096,4096x11008] [--tokens 1,16,64]
    TRITON_INTERPRET=1 python -m bench.decode_configs --smoke --out DIR      # tiny shapes on CPU, plain timing
"""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from bench import harness
from bench.lora import parse_ints, parse_shapes

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
TOKENS = [1, 16, 64]
ADAPTERS, RANK = 32, 16


def config_name(config) -> str:
    k = config.kwargs
    return f"{k['BLOCK_N']}x{k['BLOCK_K']}/s{k['SPLIT_K']}/w{config.num_warps}/st{config.num_stages}"


def forced(launcher, config):
    """Run launcher with `config` at every key (its cache emptied; restored by the caller)."""
    launcher.configs = {}
    meta = config.all_kwargs()
    launcher.chosen = lambda key: launcher.configs.setdefault(key, (meta, None))[0]


def timed(calls, device, args) -> float:
    if device.type == "cuda":
        return harness.graph_ms(calls, device, args.warmup_ms, args.rep_ms)
    for call in calls:
        call()
    return harness.time_ms(calls[0], device, args.warmup_ms, args.rep_ms)


def lora_cases(d_in, d_out, T, device, sets):
    from ptlm_engine.kernels import lora as K
    ws = [torch.randn(d_out, d_in, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
          * d_in ** -0.5 for _ in range(sets)]
    dt = ws[0].dtype
    x, dy = torch.randn(T, d_in, device=device, dtype=dt), torch.randn(T, d_out, device=device, dtype=dt)
    a = torch.randn(RANK, d_in, device=device, dtype=torch.float32) * d_in ** -0.5
    b = torch.randn(d_out, RANK, device=device, dtype=torch.float32) * 0.1
    xa = K.lora_shrink(x, a, 2.0)
    base = {"fwd": [lambda w=w: F.linear(x, w) for w in ws], "bwd": [lambda w=w: dy @ w for w in ws]}
    ptlm = {"fwd": [lambda w=w: K.lora_matmul(x, w, a, b, 2.0) for w in ws],
            "bwd": [lambda w=w: K.lora_decode_backward(dy, x, xa, w, a, b, 2.0) for w in ws]}
    return K._lora_decode, base, ptlm


def multi_cases(d_in, d_out, T, device, sets):
    from ptlm_engine.kernels import lora_multi as M
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    ws = [torch.randn(d_out, d_in, device=device, dtype=dt) * d_in ** -0.5 for _ in range(sets)]
    x = torch.randn(T, d_in, device=device, dtype=dt)
    a = torch.randn(ADAPTERS, RANK, d_in, device=device, dtype=dt) * d_in ** -0.5
    b = torch.randn(ADAPTERS, d_out, RANK, device=device, dtype=dt) * 0.1
    idx = (torch.arange(T, device=device) % ADAPTERS).to(torch.int32)
    ranks = torch.full((ADAPTERS,), RANK, device=device, dtype=torch.int32)
    scales = torch.full((ADAPTERS,), 2.0, device=device)
    base = {"fwd": [lambda w=w: F.linear(x, w) for w in ws]}
    if M.decode_fuses_shrink(T, RANK):  # the op's path at a few tokens: the kernel shrinks for itself
        ptlm = {"fwd": [lambda w=w: M.lora_multi_linear(x, w, a, b, idx, ranks, scales) for w in ws]}
    else:
        xa = M.lora_multi_shrink(x, a, idx, ranks, scales)
        ptlm = {"fwd": [lambda w=w: M.lora_multi_matmul(x, w, xa, b, idx, ranks) for w in ws]}
    return M._multi_decode, base, ptlm


def run(args, device, log=print) -> list[dict]:
    rows = []
    for op, cases in (("lora", lora_cases), ("multi", multi_cases)):
        for d_in, d_out in args.shapes:
            sets = harness.rotation_count(2 * d_in * d_out, device)
            for T in args.tokens:
                launcher, base, ptlm = cases(d_in, d_out, T, device, sets)
                saved = launcher.configs
                for mode in ptlm:
                    ref = timed(base[mode], device, args)
                    line = [f"{op:5s} {d_in}x{d_out} T={T:<3d} {mode}: cuBLAS {ref:.4f}"]
                    for config in launcher.autotuner.configs:
                        forced(launcher, config)
                        try:
                            ms = timed(ptlm[mode], device, args)
                        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: reported, next config
                            ms, note = None, f"{type(e).__name__}: {str(e)[:120]}"
                        else:
                            note = None
                        finally:
                            del launcher.chosen
                        rows.append(dict(op=op, d_in=d_in, d_out=d_out, T=T, mode=mode, config=config_name(config),
                                         ms=ms, cublas_ms=ref, note=note))
                        line.append(f"{config_name(config)} " + (f"{ms:.4f} ({ms / ref:.2f})" if ms else "FAILED"))
                    log("  ".join(line))
                launcher.configs = saved
                harness.free_memory()
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = harness.bench_parser(__doc__, "decode_configs", "tiny shapes on CPU (TRITON_INTERPRET=1)")
    p.add_argument("--shapes", type=parse_shapes, default=SHAPES, help="d_inxd_out list")
    p.add_argument("--tokens", type=parse_ints, default=TOKENS, help="T list")
    p.add_argument("--warmup-ms", type=float, default=10.0)
    p.add_argument("--rep-ms", type=float, default=30.0)
    args = p.parse_args(argv)
    if args.smoke:
        args.shapes, args.tokens, args.warmup_ms, args.rep_ms = [(40, 72)], [3], 1.0, 1.0
    device = harness.pick_device(args.smoke)
    rows = run(args, device)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = harness.environment(device)
    (args.out / "decode_configs.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
