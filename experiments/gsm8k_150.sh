#!/bin/bash
# The real GSM8K where rank matters: 150 steps x 4 examples (<= 320 tokens, which keeps
# 96 % of question + worked solution whole; the median is about 170), 32 validation /
# 128 test problems, R = 16. Two processes side by side, one thread each, sharing the
# folder (resumable):
#   bash experiments/gsm8k_150.sh A & bash experiments/gsm8k_150.sh B
# A trains LoRA (equal steps) then the default objective; B LoRA at equal compute (twice
# the steps); `kind K` trains one of them. Seed 0 first, at the 40-step comparison's
# choice (2e-3); `grid` widens the grids of LoRA and the default to 8e-3 on seed 0;
# `seed N` then runs the deciding rows of one more seed at the chosen rates, and
# `report` rewrites the tables from the runs so far.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
OUT=experiments/results/smollm2-gsm8k-150
SEEDS=0
if [ "${1:-}" = seed ]; then SEEDS=0,${2:?usage: $0 seed N}; fi
if [ "${1:-}" = report ]; then SEEDS=0,1,2; fi
COMMON=(--output "$OUT" --dataset ../shared/data/gsm8k --steps 150 --batch-size 4
  --max-length 320 --train-size 600 --val-size 32 --test-size 128 --warmup-steps 15
  --autocast-dtype bfloat16 --threads 1 --seeds $SEEDS --eval-batch-size 8
  --rows lora_svd,lora_svd_2x,mat_prefix1_trained
  --lr lora=2e-3,8e-3 --lr lora_2x=2e-3 --lr mat_prefix1=2e-3,8e-3)
compare() { python experiments/compare.py "${COMMON[@]}" "$@"; }
case "${1:-}" in
  A) compare --kinds lora
     compare --kinds mat_prefix1 ;;
  B) compare --kinds lora_2x ;;
  kind) compare --kinds "${2:?usage: $0 kind lora|lora_2x|mat_prefix1}" ;;
  grid) compare --kinds mat_prefix1
        compare --kinds lora ;;
  seed) for kind in mat_prefix1 lora_2x lora; do compare --kinds "$kind"; done ;;
  report) compare --report ;;
  *) echo "usage: $0 A|B|kind K|grid|seed N|report" >&2; exit 2 ;;
esac
