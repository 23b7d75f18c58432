"""Every kernel variant compiles for an H100 (sm_90) here, on the CPU, with the ptxas in Triton's wheel: the
interpreter that runs the other CPU tests accepts code the GPU compiler rejects (a plain global in jit code
was one). The prefill GEMMs must take Hopper's wgmma path, the TMA matmul also its TMA copies."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

SCRIPT = Path(__file__).with_name("sm90_compile.py")
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.exists(), reason="this triton wheel ships no ptxas")
def test_every_kernel_variant_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert {row["kernel"] for row in rows} == {"lora.decode", "lora.matmul_prefill", "lora.matmul_tma",
                                               "lora.shrink", "lora.weight_grad", "multi.decode",
                                               "multi.matmul_prefill", "multi.matmul_tma", "multi.shrink",
                                               "multi.weight_grad", "grouped.matmul_decode",
                                               "grouped.matmul_prefill", "grouped.shrink",
                                               "grouped.shrink_each", "grouped.weight_grad",
                                               "grouped.multi_matmul_decode", "grouped.multi_matmul_prefill",
                                               "grouped.multi_shrink", "bottleneck.forward", "bottleneck.down",
                                               "bottleneck.up", "bottleneck.rows_backward",
                                               "bottleneck.rows_backward_tiled", "bottleneck.grads",
                                               "bottleneck.multi_forward", "bottleneck.multi_rows_backward",
                                               "bottleneck.segment_forward", "bottleneck.segment_rows_backward",
                                               "bottleneck.multi_grads", "bottleneck.weight_grads",
                                               "bottleneck.input_grad", "bottleneck.multi_weight_grads",
                                               "bottleneck.multi_input_grad", "prefix.forward", "prefix.delta",
                                               "prefix.dkdv", "prefix.bwd_fused", "prefix.dq",
                                               "rms_norm.forward", "rms_norm.backward", "silu_mul.forward",
                                               "silu_mul.backward", "rotary", "cross_entropy",
                                               "lora_embedding.forward"}
    failed = [f"{row['kernel']} {row['flags']} {row['config']}: {row['error']}" for row in rows if not row["ok"]]
    assert not failed, "\n".join(failed)
    assert all(row["wgmma"] for row in rows if row["kernel"].endswith("matmul_prefill"))
    assert all(row["wgmma"] and row["tma"] for row in rows if row["kernel"].endswith("matmul_tma"))
    assert all(row["wgmma"] for row in rows if row["kernel"].startswith("prefix.") and row["kernel"] != "prefix.delta")
