#!/usr/bin/env bash
# One device call of at most ~9 minutes on an H100: install, the gpu-marked tests (bf16 correctness, sync-free
# and CUDA-graph checks; first autotune config only), then bench.gpu_suite's session profile. Writes 7 files
# to OUT (gpu_tests.log, suite.log, results.json/.csv/.md/.png, tuned.json); prints the suite's summary, then
# the test verdicts.
#
#   bash bench/gpu_session.sh OUT [--tests-s 120] [gpu_suite arguments, e.g. --phases multi,prefix --tuned FILE]
set -u
out=${1:?usage: bash bench/gpu_session.sh OUT [--tests-s S] [gpu_suite arguments]}
shift
tests_s=120
if [ "${1:-}" = "--tests-s" ]; then tests_s=$2; shift 2; fi
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
if ! python3 -m pip install -q --no-build-isolation --no-deps -e . >"$out/suite.log" 2>&1; then
    cat "$out/suite.log"; exit 1
fi
start=$(date +%s)
PTLM_AUTOTUNE=0 timeout "$tests_s" python3 -m pytest -m gpu -q -p no:cacheprovider -rfE tests >"$out/gpu_tests.log" 2>&1
tests="gpu tests: exit $? after $(( $(date +%s) - start )) s (124: cut at ${tests_s} s)"
python3 -u -m bench.gpu_suite "$out" "$@" >>"$out/suite.log" 2>&1
rc=$?
if [ $rc -ne 0 ]; then tail -30 "$out/suite.log" | cut -c1-200; fi
# The device tool returns the last 12,000 characters: the suite's summary first, the test verdicts last.
sed -n '/^ptlm_engine GPU suite on/,$p' "$out/suite.log" | cut -c1-160 | head -70
echo "suite: exit $rc"
echo "$tests"
grep -E "passed|failed|skipped|error|FAILED|ERROR" "$out/gpu_tests.log" | cut -c1-200 | tail -12
