#!/usr/bin/env bash
# The GPU check of issue 9, as one run: fast paths equal plain paths (predictions under bf16, gradients in fp32)
# and a CUDA smoke run of every method (pinned episodes, bf16 autocast, all adapters), side by side; then, alone
# on the GPU, every figure: Table 5's default adapters, the step, Table 5's other settings, the data pipeline last
# (about 7 minutes on an H100 before the compiled inference forward, most of it the data stage and compiling).
# The stage limits (210 s, then 370 s) keep the whole script under the device tool's 10 minutes per command;
# what a limit cuts first is perf's last stages (the adapters' other settings, then the data pipeline).
# Usage: bash .ci/gpu_check.sh OUT_DIR    (on a machine with one CUDA GPU; logs and perf.json land in OUT_DIR;
# .ci/device_wheels.sh prepares the packages such a machine may lack)
# SMAT_BENCH_TEST_DEVICE=cpu runs the same steps on the CPU (a dry run of the script; slow for `perf all`).
# PYTHON names the interpreter (default python3). Each stage has a time limit, so a hung stage cannot cost
# the figures of the next one; perf.json is rewritten after each timed row.
set -uo pipefail
out=${1:?usage: bash .ci/gpu_check.sh OUT_DIR}
mkdir -p "$out"
work=$(mktemp -d)  # run directories and caches; only the logs and perf.json go to OUT_DIR
export PYTHONUNBUFFERED=1 SMAT_BENCH_CACHE="$work/cache" SMAT_BENCH_TEST_DEVICE=${SMAT_BENCH_TEST_DEVICE:-cuda}
device=$SMAT_BENCH_TEST_DEVICE
python=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt" || echo "no nvidia-smi"
$python -c "import torch, timm, peft, gin, simplejpeg, google_crc32c, benchmark.run, benchmark.perf
print('torch', torch.__version__, 'timm', timm.__version__, 'peft', peft.__version__, 'device', '$device',
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')" 2>&1 | tee -a "$out/gpu.txt" \
    || { echo "the environment lacks a package (see gpu.txt)"; exit 1; }
status=0

timeout 210 $python -m pytest -q -p no:cacheprovider tests/methods/test_fast_path.py > "$out/fast_path.log" 2>&1 &
tests=$!
smoke_runs() {  # each run's whole log in OUT_DIR/smoke-METHOD.log (kept if the stage limit cuts it), its end here
    for method in pre pmf softmerge smat; do
        echo "== $method"
        $python -m benchmark.run --gin "methods/$method.gin" --smoke --bind "run.device = '$device'" \
            --adapt protonet,full,lora --out "$work/smoke-$method" > "$out/smoke-$method.log" 2>&1
        ran=$?
        tail -n 12 "$out/smoke-$method.log"
        [ $ran -eq 0 ] || return 1
    done
}
export -f smoke_runs
export python device work out
timeout 210 bash -c smoke_runs > "$out/smoke.log" 2>&1 &
smoke=$!
wait $tests || { status=1; echo "fast-path tests FAILED"; }
wait $smoke || { status=1; echo "smoke runs FAILED"; }
tail -n 3 "$out/fast_path.log"; grep -E "^== |ID|OOD" "$out/smoke.log"

timeout 370 $python -m benchmark.perf all --device "$device" --repeats 2 --workers 0 2 8 --json "$out/perf.json" --profile "$out/profiles" \
    2>&1 | tee "$out/perf.log" || status=1
exit $status
