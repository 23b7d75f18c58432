#!/usr/bin/env bash
# One device call of at most ~9 minutes on a Hopper card (H100, H200): install, the gpu-marked tests (bf16
# correctness, sync-free and CUDA-graph checks; no tuning: each shape takes its first config that fits), then
# bench.gpu_suite's session profile. Writes 8 files to OUT (gpu_tests.log, suite.log, results.json/.csv/.md/.png, tuned.json,
# triton-cache.txz, or its two parts .a / .b in place of the png); prints the suite's summary, then the test verdicts.
#
#   bash bench/gpu_session.sh OUT [--tests-s 100] [gpu_suite arguments, e.g. --phases multi,prefix --tuned FILE]
#   A follow-up call on the warm machine: bash bench/gpu_session.sh OUT --tests-s 0 --phases model_multi --budget-s 240
#
# Compiled kernels outlive the machine: Triton's cache (binaries only) comes back as OUT/triton-cache.txz (or
# .txz.a and .txz.b); put the file(s) in .device-cache/ (git ignores the folder) and name .device-cache in the
# next call's `carry`: the 2026-11-26 suite spent 187 of its 334 s in first calls, mostly compiling.
set -u
out=${1:?usage: bash bench/gpu_session.sh OUT [--tests-s S] [gpu_suite arguments]}
shift
tests_s=100
if [ "${1:-}" = "--tests-s" ]; then tests_s=$2; shift 2; fi
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# One absolute cache path on every machine: a cache entry names its files by absolute path.
export TRITON_CACHE_DIR=/tmp/ptlm-triton-cache TRITON_STORE_BINARY_ONLY=1
mkdir -p "$TRITON_CACHE_DIR"
if ls .device-cache/triton-cache.txz* >/dev/null 2>&1; then
    cat .device-cache/triton-cache.txz* | tar -xJf - -C "$TRITON_CACHE_DIR" &&
        echo "triton cache: $(ls "$TRITON_CACHE_DIR" | wc -l) entries carried in"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
if ! python3 -m pip install -q --no-build-isolation --no-deps -e . >"$out/suite.log" 2>&1; then
    cat "$out/suite.log"; exit 1
fi
start=$(date +%s)
if [ "$tests_s" -gt 0 ]; then
    # The tests least often run on a GPU first (the cap cuts the rest): the matmuls launched as the shrinks'
    # programmatic dependents (the suite turns that off if they fail), the captured training step and the
    # in-place remap (tiny models, seconds); the split-K decode kernels (-k decode), the multi-adapter prefill on
    # the TMA GEMM and the realistic-shape multi-adapter kernels (mixed ranks, every row its own adapter); then the
    # base-model ops, prefix attention, the multi-adapter bottleneck, the CUDA-graph and model-level checks; last
    # the LoRA kernels' other tests (each test runs once).
    lora_files="tests/kernels/test_lora.py tests/kernels/test_lora_multi.py tests/kernels/test_lora_grouped.py"
    first_lora="decode|multi_prefill|accumulates|realistic"
    groups=("tests/kernels/test_lora_multi.py tests/kernels/test_lora.py -k dependent"
            "tests/test_captured_step.py tests/test_adapter_batch.py -k captured_step|learning_rate|mixed_batch_step|remap"
            "$lora_files -k $first_lora"
            "$(ls tests/kernels/test_{rms_norm,silu_mul,rotary,cross_entropy}.py 2>/dev/null | tr '\n' ' ') tests/kernels/test_prefix_attention.py tests/kernels/test_bottleneck_multi.py tests/ops tests/layers tests/test_*.py tests/kernels/test_bottleneck.py"
            "$lora_files -k not ($first_lora|dependent)")
    codes=""
    : >"$out/gpu_tests.log"
    # Groups after the first in parallel worker processes (pytest-xdist, on the device image): the test phase is
    # bound by Triton's compiles, one core each (s3 and s4 were cut at 60 / 90 s while compiling), and the host
    # has 16. The first group stays serial: it decides PTLM_PDL. GPU_TEST_WORKERS=0: every group serial.
    workers=${GPU_TEST_WORKERS:-8}
    if [ "$workers" -gt 0 ] && ! python3 -c "import xdist" 2>/dev/null; then workers=0; fi
    parallel=()
    for group in "${groups[@]}"; do
        left=$(( tests_s - ($(date +%s) - start) ))   # timeout 0 would mean no limit at all
        [ "$left" -gt 5 ] || break
        files=${group%% -k *}
        if [ "$files" != "$group" ]; then select=(-k "${group#* -k }"); select[1]=${select[1]//|/ or }; else select=(); fi
        # shellcheck disable=SC2086
        # timeout signals its whole process group: the workers end with the run
        PTLM_AUTOTUNE=0 timeout "$left" python3 -m pytest -m gpu -v -p no:cacheprovider -rfE --tb=short \
            ${parallel[@]+"${parallel[@]}"} $files ${select[@]+"${select[@]}"} >>"$out/gpu_tests.log" 2>&1
        code=$?
        codes="$codes${codes:+, }$code"
        if [ "$workers" -gt 0 ]; then parallel=(-n "$workers" --dist load); fi
        if [ "$group" = "${groups[0]}" ] && [ "$code" != 0 ]; then
            if [ "$code" = 124 ] && grep -q " PASSED" "$out/gpu_tests.log" &&
                    ! grep -qE " (FAILED|ERROR)" "$out/gpu_tests.log"; then
                # cut by the cap while compiling (2026-11-27: two passed, the third compiling at 60 s): PDL stays on
                echo "the dependent-launch tests were cut at the cap, none failed: PTLM_PDL stays on"
            else
                # the matmuls as the shrinks' programmatic dependents misbehaved: the suite launches them one
                # after the other
                export PTLM_PDL=0; echo "PTLM_PDL=0: the dependent-launch tests exited $code"
            fi
        fi
    done
    tests="gpu tests: exit $codes after $(( $(date +%s) - start )) s (124: cut at ${tests_s} s)"
else
    tests="gpu tests: skipped (--tests-s 0)"
fi
# Autotuner choices: the package's for this card load by themselves (kernels/tuned_configs); an earlier call's
# on this warm machine (/tmp outlives a call) go over them.
tuned=()
if [ -f /tmp/ptlm-session-tuned.json ]; then tuned=(--tuned /tmp/ptlm-session-tuned.json); fi
python3 -u -m bench.gpu_suite "$out" "${tuned[@]}" "$@" >>"$out/suite.log" 2>&1
rc=$?
if [ -f "$out/tuned.json" ]; then cp "$out/tuned.json" /tmp/ptlm-session-tuned.json; fi
if [ $rc -ne 0 ]; then tail -30 "$out/suite.log" | cut -c1-200; fi
# The device tool returns the last 12,000 characters: the suite's summary first, the test verdicts last.
sed -n '/^ptlm_engine GPU suite on/,$p' "$out/suite.log" | cut -c1-160 | head -70
echo "suite: exit $rc"
# xz: 2026-11-27's gzip of one session's cache was over the tool's 16 MiB per file. Over 15 MiB it comes back
# in two parts in place of results.png (8 files at most); over 30 MiB not at all.
command -v xz >/dev/null || echo "triton cache: no xz on this machine, not returned"
tar -cf - -C "$TRITON_CACHE_DIR" . 2>/dev/null | xz -T0 -6 >"$out/triton-cache.txz" || rm -f "$out/triton-cache.txz"
size=$(stat -c %s "$out/triton-cache.txz" 2>/dev/null || echo 0)
if [ "$size" -gt $((30 << 20)) ]; then
    rm -f "$out/triton-cache.txz"; echo "triton cache: $((size >> 20)) MiB compressed, not returned"
elif [ "$size" -gt $((15 << 20)) ]; then
    split -b 15M -a 1 "$out/triton-cache.txz" "$out/triton-cache.txz."
    rm -f "$out/triton-cache.txz" "$out/results.png"; echo "triton cache: $((size >> 20)) MiB in two parts"
fi
echo "$tests"
if [ -f "$out/gpu_tests.log" ]; then
    grep -oE " (PASSED|FAILED|ERROR|SKIPPED)" "$out/gpu_tests.log" | sort | uniq -c
    grep -E " (FAILED|ERROR)|^E  " "$out/gpu_tests.log" | cut -c1-220 | head -20
fi
