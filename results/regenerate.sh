#!/usr/bin/env bash
# Every result in results/ (tables and figures; results/perf/ has its own README), from one code version.
# From the project root after the README's setup, on the embedded mini benchmark (2 CPU cores, no GPU):
#   bash results/regenerate.sh [RUNS_DIR]      (default runs/results; delete it first to start afresh)
set -euo pipefail
runs=${1:-runs/results}
# The four methods of Table 1 on md_mini, ProtoNet, as one sweep of gin files run on this machine.
python -m slurm.sweep --local --gin benchmark/setups/md_mini.gin --grid 'gin=[methods/pre.gin, methods/pmf.gin, methods/softmerge.gin, methods/smat.gin]' \
    --out "$runs/methods"
# Fig. 3: SMAT's ID/OOD trade-off over the expert sparsity tau and the number of experts M.
python -m slurm.sweep --local --gin methods/smat.gin \
    --grid 'smat.target_sparsity=[0.5, 0.7, 0.9]' --grid 'smat.num_experts=[2, 4, 8]' --out "$runs/tau_m"
python -m benchmark.leaderboard "$runs" --out results --commands results/regenerate.sh
