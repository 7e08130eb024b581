#!/usr/bin/env bash
# Wheels for a GPU machine that has torch, timm and peft but no package index (the device machine of issue 9):
# the project's other run-time packages, for its Python (default 3.12, manylinux x86_64), into .whl/ (ignored
# by git). Carry .whl/ to that machine, then, in the repository root there:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
#   bash .ci/gpu_check.sh "$OUT"
# Usage: bash .ci/device_wheels.sh [PYTHON_VERSION]
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip download -q --only-binary=:all: --python-version "${1:-3.12}" --platform manylinux2014_x86_64 \
    --no-deps -d .whl gin-config==0.5.0 google-crc32c==1.7.1 simplejpeg==1.9.0  # the versions run there so far
ls .whl
