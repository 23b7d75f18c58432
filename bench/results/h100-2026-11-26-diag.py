"""One-off GPU diagnosis (untracked): TMA kernel variants, pointer vs TMA, host overhead, failing tests."""
import cProfile
import io
import os
import pstats
import shutil
import subprocess
import sys
import time

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

OUT = sys.argv[1]
ONLY = sys.argv[2].split(",") if len(sys.argv) > 2 else ["tma", "ptr", "host", "tests"]
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
T0 = time.time()
ROOT = os.path.dirname(os.path.abspath(__file__))


def log(*a):
    print(f"[{time.time() - T0:5.0f}s]", *a, flush=True)


def bench(fn):
    if not CUDA:
        fn()
        return float("nan")
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


# ------------------------------------------------------------------ 1. TMA kernel variants (source edits)
LORA_CALL = "acc = _tma_lora_steps(acc, xa_desc, b_desc, off_m, off_n, B_RMAJOR, FP32_DOT, R, BLOCK_R)"
K_LOOP_END = "            acc = _dot(x, w, acc, FP32_DOT)\n"
VARIANTS = {
    "v0": [],
    "nolora_noflat": [(LORA_CALL, "pass"), ("flatten=not OUT_DROPOUT", "flatten=False")],
    "nolora": [(LORA_CALL, "pass")],
    "noflat": [("flatten=not OUT_DROPOUT", "flatten=False")],
    "lora_after": [(LORA_CALL, "pass"), (K_LOOP_END, K_LOOP_END + "        if not OUT_DROPOUT:\n            "
                                         + LORA_CALL + "\n")],
}


def variant_module(name, edits):
    pkg = f"/tmp/diag/kv_{name}"
    os.makedirs(pkg, exist_ok=True)
    for f in ("configs.py", "tuned.py"):
        shutil.copy(os.path.join(ROOT, "kernels", f), pkg)
    open(os.path.join(pkg, "__init__.py"), "w").close()
    src = open(os.path.join(ROOT, "kernels", "lora.py")).read()
    for old, new in edits:
        assert src.count(old) >= 1, (name, old)
        src = src.replace(old, new, 1)
    open(os.path.join(pkg, "lora.py"), "w").write(src)
    sys.path.insert(0, "/tmp/diag")
    import importlib
    return importlib.import_module(f"kv_{name}.lora")


@triton.jit
def plain_tma_mm(a_desc, b_desc, c_desc, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (pid // group) * GROUP_M
    gm = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % gm
    pid_n = (pid % group) // gm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = a_desc.load([pid_m * BLOCK_M, k])
        b = b_desc.load([pid_n * BLOCK_N, k])
        acc = tl.dot(a, b.T, acc)
    c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(c_desc.dtype))


def tma_section():
    M = N = K = 4096 if CUDA else 96
    R = 16
    dt = torch.bfloat16 if CUDA else torch.float16
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(M, K, device=DEV, dtype=dt, generator=g)
    w = torch.randn(N, K, device=DEV, dtype=dt, generator=g) * 0.02
    xa = torch.randn(M, R, device=DEV, dtype=torch.float32, generator=g)
    b = torch.randn(N, R, device=DEV, dtype=dt, generator=g)
    y = torch.empty(M, N, device=DEV, dtype=dt)
    flops = 2 * M * N * K
    ref = torch.mm(x, w.t())
    log(f"cuBLAS mm {M}x{N}x{K}: {bench(lambda: torch.mm(x, w.t())):.4f} ms "
        f"({flops / bench(lambda: torch.mm(x, w.t())) / 1e9:.0f} TFLOP/s)")
    # plain Triton TMA GEMM, non-persistent: what Triton 3.6 reaches on this card with no LoRA, no persistence
    for bm, bn, bk, st, wp in ((128, 256, 64, 3, 8), (128, 256, 64, 4, 8), (128, 128, 64, 4, 8), (256, 128, 64, 3, 8)):
        if not CUDA:
            bm, bn, bk, st, wp = 32, 32, 32, 1, 4
        try:
            a_d = TensorDescriptor(x, [M, K], [K, 1], [bm, bk])
            b_d = TensorDescriptor(w, [N, K], [K, 1], [bn, bk])
            c_d = TensorDescriptor(y, [M, N], [N, 1], [bm, bn])
            grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
            fn = lambda: plain_tma_mm[grid](a_d, b_d, c_d, M, N, K, bm, bn, bk, 8, num_warps=wp, num_stages=st)
            t = bench(fn)
            err = (y.float() - ref.float()).abs().max().item()
            log(f"plain TMA mm {bm}x{bn}x{bk} s{st} w{wp}: {t:.4f} ms {flops / t / 1e9:.0f} TFLOP/s err {err:.3g}")
        except Exception as e:  # noqa: BLE001
            log(f"plain TMA mm {bm}x{bn}x{bk} s{st} w{wp}: FAILED {type(e).__name__}: {str(e)[:300]}")
        if not CUDA:
            break
    y_ref = (x.float() @ w.float().t() + xa @ b.float().t())
    for name, edits in VARIANTS.items():
        if time.time() - T0 > 235:
            log("tma variants: out of time")
            break
        try:
            mod = variant_module(name, edits)
            mod.TMA_PREFILL = True
            L = mod._lora_matmul_tma
            configs = list(L.autotuner.configs)
            for cfg in configs[:(4 if name == 'v0' else 2)] if CUDA else configs[:1]:
                L.autotuner.configs = [cfg]
                L.configs.clear()
                tag = f"{name:14s} {cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']} s{cfg.num_stages} w{cfg.num_warps}"
                try:
                    for wt in ((False, True) if name == "v0" else (False,)):
                        wmat = w.t().contiguous().t() if wt else w          # wt: W given as (K, N) row-major -> W^T layout
                        fn = lambda: mod.lora_matmul_tma(x, wmat, xa, b, None, y)
                        t = bench(fn)
                        fn()
                        err = ((y.float() - y_ref).abs().max() / y_ref.abs().max()).item()
                        log(f"{tag} {'Wt' if wt else 'W '}: {t:.4f} ms {flops / t / 1e9:.0f} TFLOP/s rel.err {err:.2e}")
                except Exception as e:  # noqa: BLE001
                    log(f"{tag}: FAILED {type(e).__name__}: {str(e)[:300]}")
        except Exception as e:  # noqa: BLE001
            log(f"variant {name}: FAILED {type(e).__name__}: {str(e)[:300]}")


# ------------------------------------------------------------------ 2. pointer vs TMA forward, shrink alone
def ptr_section():
    from ptlm_engine.kernels import lora as K
    dt = torch.bfloat16 if CUDA else torch.float16
    for T, d_in, d_out in ((4096, 4096, 4096), (1024, 4096, 4096), (4096, 4096, 11008)) if CUDA else ((80, 64, 48),):
        x = torch.randn(T, d_in, device=DEV, dtype=dt)
        w = torch.randn(d_out, d_in, device=DEV, dtype=dt) * 0.02
        a = torch.randn(16, d_in, device=DEV, dtype=dt) * 0.02
        b = torch.randn(d_out, 16, device=DEV, dtype=dt) * 0.02
        flops = 2 * T * d_in * d_out
        cub = bench(lambda: torch.mm(x, w.t()))
        row = [f"T={T} {d_in}x{d_out}: cuBLAS {cub:.4f}"]
        row.append(f"shrink {bench(lambda: K.lora_shrink(x, a, 2.0)):.4f}")
        for mode in (False, None):
            K.TMA_PREFILL = mode
            t = bench(lambda: K.lora_matmul(x, w, a, b, 2.0))
            row.append(f"{'ptr' if mode is False else 'tma'} {t:.4f} ({flops / t / 1e9:.0f} TF, x{t / cub:.2f})")
        K.TMA_PREFILL = None
        log(" | ".join(row))


# ------------------------------------------------------------------ 3. host overhead
@triton.jit
def tiny_kernel(p, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, a17, a18, a19, a20,
                BLOCK: tl.constexpr, F1: tl.constexpr, F2: tl.constexpr):
    tl.store(p + tl.arange(0, BLOCK), tl.zeros((BLOCK,), tl.float32))


def host_section():
    from ptlm_engine import functional as F
    from ptlm_engine.kernels import lora as K
    dt = torch.bfloat16 if CUDA else torch.float16
    d = 4096 if CUDA else 64
    p = torch.empty(64, device=DEV)
    ints = list(range(1, 21))
    fn = lambda: tiny_kernel[(1,)](p, *ints, BLOCK=64, F1=True, F2=False)
    fn()
    n = 2000 if CUDA else 20
    t = time.perf_counter()
    for _ in range(n):
        fn()
    log(f"tiny 21-arg launch: {(time.perf_counter() - t) / n * 1e6:.1f} us host")
    t = time.perf_counter()
    for _ in range(n):
        TensorDescriptor(p.view(8, 8), [8, 8], [8, 1], [8, 8])
    log(f"TensorDescriptor(): {(time.perf_counter() - t) / n * 1e6:.1f} us host")
    for T in ((1, 4096) if CUDA else (1, 80)):
        x = torch.randn(T, d, device=DEV, dtype=dt, requires_grad=True)
        w = torch.randn(d, d, device=DEV, dtype=dt) * 0.02
        a = (torch.randn(16, d, device=DEV, dtype=dt) * 0.02).requires_grad_()
        b = (torch.randn(d, 16, device=DEV, dtype=dt) * 0.02).requires_grad_()
        dy = torch.randn(T, d, device=DEV, dtype=dt)

        def fwd():
            with torch.no_grad():
                F.lora_linear(x, w, None, a, b, 2.0)

        def fwdbwd():
            F.lora_linear(x, w, None, a, b, 2.0).backward(dy)

        def eager():
            y = x @ w.t() + 2.0 * ((x @ a.t()) @ b.t())
            y.backward(dy)

        for name, f in (("fwd", fwd), ("fwd+bwd", fwdbwd), ("eager fwd+bwd", eager)):
            for _ in range(3):
                f()
            if CUDA:
                torch.cuda.synchronize()
            m = 200 if CUDA else 3
            t = time.perf_counter()
            for _ in range(m):
                f()
            host = (time.perf_counter() - t) / m * 1e6
            if CUDA:
                torch.cuda.synchronize()
            wall = (time.perf_counter() - t) / m * 1e6
            log(f"T={T} {name}: host {host:.1f} us/call, wall {wall:.1f} us/call")
        if T == 1 or not CUDA:
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(100 if CUDA else 2):
                fwdbwd()
            pr.disable()
            s = io.StringIO()
            pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(28)
            print("\n".join(line[:170] for line in s.getvalue().splitlines()[6:40]), flush=True)


# ------------------------------------------------------------------ 4. the failing GPU tests, with tracebacks
def tests_section():
    env = dict(os.environ, PTLM_AUTOTUNE="0")
    sel = ["tests/kernels/test_bottleneck_multi.py::test_multi_kernels_realistic_shapes",
           "tests/kernels/test_lora.py::test_tma_path_is_automatic_on_hopper_bf16"]
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "--tb=short",
           "-k", "random-1- or each-64 or one-64 or 4096-4096", *sel]
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=70)
        out = r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        out += "\n[tests cut]"
    print("\n".join(line[:200] for line in out.splitlines()[-45:]), flush=True)


if __name__ == "__main__":
    sections = dict(tma=tma_section, ptr=ptr_section, host=host_section, tests=tests_section)
    for name in ONLY:
        log(f"== {name}")
        try:
            sections[name]()
        except Exception as e:  # noqa: BLE001
            import traceback
            traceback.print_exc(limit=4)
            log(f"{name} FAILED: {type(e).__name__}: {str(e)[:300]}")
