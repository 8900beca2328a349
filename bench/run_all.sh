#!/usr/bin/env bash
# Run the speed/memory benchmarks (train_step, objective_step, inference, scaling, layer)
# with --write:
# updates the "## Speed and memory" blocks of BENCHMARKS.md and bench/results/*.json.
# Extra arguments go to every script:
#   bash bench/run_all.sh                                   # CPU, float32, 1 thread (~30 min)
#   bash bench/run_all.sh --device cuda --dtype bfloat16    # on a GPU
#   bash bench/run_all.sh --smoke                           # seconds, checks that all run
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
echo "== train_step" >&2
"$PY" bench/train_step.py --write --profile "$@"
echo "== objective_step" >&2
"$PY" bench/objective_step.py --write "$@"
echo "== inference" >&2
"$PY" bench/inference.py --write "$@"
echo "== scaling" >&2
"$PY" bench/scaling.py --write "$@"
echo "== layer" >&2
"$PY" bench/layer.py --write "$@"
