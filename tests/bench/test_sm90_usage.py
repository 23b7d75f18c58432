"""bench/sm90_usage.py on the CPU: the base-model ops' launches recorded at the step's shapes, specialised as an
H100 launch would be and compiled for sm_90 with the wheel's ptxas (a subprocess: compiles need Triton without
its interpreter)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

REPO = Path(__file__).resolve().parents[2]
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.exists(), reason="this triton wheel ships no ptxas")
def test_base_ops_launches_compile_specialised(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "bench.sm90_usage", "--cases", "base_ops", "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / "sm90_usage.json").read_text())["rows"]
    # forward and backward of each op, as the ops launch them (rotary's backward is the same kernel, BACKWARD set)
    assert sorted(r["kernel"] for r in rows) == sorted(
        ["_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_silu_mul_fwd_kernel", "_silu_mul_bwd_kernel",
         "_rotary_kernel", "_rotary_kernel", "_cross_entropy_kernel"])
    assert all(r["ok"] and r["source"] == "fixed" and 0 < r["registers"] <= 255 and r["spilled"] == 0
               for r in rows), rows
    md = (tmp_path / "sm90_usage.md").read_text()
    assert md.count("| base_ops |") == len(rows)
