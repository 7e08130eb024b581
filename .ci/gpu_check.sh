#!/usr/bin/env bash
# The GPU check of issue 9, as one run: fast paths equal plain paths under bf16, a CUDA smoke run of every
# method (pinned episodes, bf16 autocast, all adapters), then every performance figure.
# Usage: bash .ci/gpu_check.sh OUT_DIR    (on a machine with one CUDA GPU; logs and perf.json land in OUT_DIR)
# SMAT_BENCH_TEST_DEVICE=cpu runs the same steps on the CPU (a dry run of the script; slow for `perf all`).
set -uo pipefail
out=${1:?usage: bash .ci/gpu_check.sh OUT_DIR}
mkdir -p "$out"
work=$(mktemp -d)  # run directories and caches; only the logs and perf.json go to OUT_DIR
export PYTHONUNBUFFERED=1 SMAT_BENCH_CACHE="$work/cache" SMAT_BENCH_TEST_DEVICE=${SMAT_BENCH_TEST_DEVICE:-cuda}
device=$SMAT_BENCH_TEST_DEVICE
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt" || echo "no nvidia-smi"
python -m pytest -q tests/methods/test_fast_path.py 2>&1 | tee "$out/fast_path.log"
status=$?
for method in pre pmf softmerge smat; do
    python -m benchmark.run --gin "methods/$method.gin" --smoke --bind "run.device = '$device'" \
        --adapt protonet,full,lora --out "$work/smoke-$method" 2>&1 | tail -n 20 >> "$out/smoke.log" || status=1
done
python -m benchmark.perf all --device "$device" --compile-merge --json "$out/perf.json" 2>&1 | tee "$out/perf.log" || status=1
exit $status
