#!/usr/bin/env bash
# The GPU check of issue 9, as one run: fast paths equal plain paths (predictions under bf16, gradients in fp32)
# and a CUDA smoke run of every method (pinned episodes, bf16 autocast, all adapters), side by side; then, alone
# on the GPU, every figure: Table 5's default adapters, the step, Table 5's other settings, the data pipeline last
# (about 7 minutes on an H100 before the compiled inference forward, most of it the data stage and compiling).
# Usage: bash .ci/gpu_check.sh OUT_DIR    (on a machine with one CUDA GPU; .ci/device_wheels.sh prepares the
# packages such a machine may lack; a copy without .git names its commit with SMAT_BENCH_CODE_VERSION=<sha>)
# OUT_DIR gets four files, within the device tool's eight: gpu_check.log (the environment and each stage's
# outcome), perf.json (rewritten after each timed row), perf.log, and logs.tgz (the fast-path and smoke logs
# and the step profiles, packed again after each stage).
# The whole script keeps to GPU_CHECK_BUDGET_S seconds (default 560, under the device tool's 10 minutes per
# command with time left for installing the wheels): the checks get at most 210 s, perf what is left, so a
# limit cuts perf's last stages first (the adapters' other settings, then the data pipeline).
# SMAT_BENCH_TEST_DEVICE=cpu runs the same steps on the CPU (a dry run of the script; slow for `perf all`).
# PYTHON names the interpreter (default python3).
set -uo pipefail
out=${1:?usage: bash .ci/gpu_check.sh OUT_DIR}
mkdir -p "$out"
budget=${GPU_CHECK_BUDGET_S:-560}
work=$(mktemp -d)  # run directories, caches and the detailed logs; OUT_DIR gets only the four files above
logs="$work/logs"
mkdir -p "$logs"
export PYTHONUNBUFFERED=1 SMAT_BENCH_CACHE="$work/cache" SMAT_BENCH_TEST_DEVICE=${SMAT_BENCH_TEST_DEVICE:-cuda}
device=$SMAT_BENCH_TEST_DEVICE
python=${PYTHON:-python3}
pack() { tar czf "$out/logs.tgz" -C "$work" logs; }
{
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"
$python -c "import torch, timm, peft, gin, simplejpeg, google_crc32c, benchmark.run, benchmark.perf
print('torch', torch.__version__, 'timm', timm.__version__, 'peft', peft.__version__, 'device', '$device',
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA', 'code', benchmark.run.code_version())" \
    || { echo "the environment lacks a package (see above)"; exit 1; }
status=0

timeout 210 $python -m pytest -q -p no:cacheprovider tests/methods/test_fast_path.py > "$logs/fast_path.log" 2>&1 &
tests=$!
smoke_runs() {  # each run's whole log in logs/smoke-METHOD.log (kept if the stage limit cuts it), its end here
    for method in pre pmf softmerge smat; do
        echo "== $method"
        $python -m benchmark.run --gin "methods/$method.gin" --smoke --bind "run.device = '$device'" \
            --adapt protonet,full,lora --out "$work/smoke-$method" > "$logs/smoke-$method.log" 2>&1
        ran=$?
        tail -n 12 "$logs/smoke-$method.log"
        [ $ran -eq 0 ] || { echo "== $method exited $ran"; return 1; }
    done
}
export -f smoke_runs
export python device work logs
timeout 210 bash -c smoke_runs > "$logs/smoke.log" 2>&1 &
smoke=$!
wait $tests; ran=$?
[ $ran -eq 0 ] || { status=1; echo "fast-path tests FAILED (exit $ran; 124: cut at 210 s)"; }
wait $smoke; ran=$?
[ $ran -eq 0 ] || { status=1; echo "smoke runs FAILED (exit $ran; 124: cut at 210 s)"; }
tail -n 3 "$logs/fast_path.log"; echo; grep -E "^== |ID|OOD" "$logs/smoke.log"
pack

left=$((budget - SECONDS - 10))  # 10 s to pack the logs at the end
if [ $left -lt 30 ]; then
    status=1; echo "perf all NOT RUN: ${left} s left of ${budget}"
else
    echo "perf all: ${left} s left of ${budget}"
    timeout $left $python -m benchmark.perf all --device "$device" --repeats 2 --workers 0 2 8 \
        --json "$out/perf.json" --profile "$logs/profiles" > "$out/perf.log" 2>&1
    ran=$?
    [ $ran -eq 0 ] || { status=1; echo "perf all FAILED (exit $ran; 124: cut at ${left} s; what it measured is in perf.json)"; }
    grep -E "^(# |\| |SMAT step|plain bf16)| step +([0-9]|—)" "$out/perf.log"  # the tables, steps and ratios
fi
pack
exit $status
} 2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
