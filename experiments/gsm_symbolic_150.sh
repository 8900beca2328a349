#!/bin/bash
# GSM-Symbolic where rank matters: 150 steps x 4 examples (<= 256 tokens, so worked
# solutions are not cut), 32 validation / 128 test problems, R = 16.
# Two processes side by side, one thread each, sharing the folder (resumable):
#   bash experiments/gsm_symbolic_150.sh A & bash experiments/gsm_symbolic_150.sh B
# Process A trains LoRA and the default objective; B the authors' objective, LoRA at
# equal compute (twice the steps), then the per-rank envelope. Once seed 0 has chosen the
# learning rates, `seed N` runs the deciding rows (the default, LoRA at equal compute, LoRA)
# of one more seed in one process, so seeds 1 and 2 can run side by side:
#   bash experiments/gsm_symbolic_150.sh seed 1 & bash experiments/gsm_symbolic_150.sh seed 2
# `grid` widens the seed-0 learning-rate grids of the deciding rows (1.6e-2, then 4e-3);
# `screen` trains the cheaper nested variants on seed 0, then LoRA at equal compute at
# 1.6e-2, then the remaining variants (the default on half the micro-batches, the SVD
# re-basis, nested dropout over components, the full rank weighted 3/4, and the LoRA bar
# of the first at 1.5x the steps). `rest` runs the authors' objective on seeds 1 and 2,
# the envelope at r = 2, 4, 8 (seed 0) and LoRA at equal compute at 4e-3. Pairs that
# share the folder and run side by side:
#   bash experiments/gsm_symbolic_150.sh grid & bash experiments/gsm_symbolic_150.sh screen
#   bash experiments/gsm_symbolic_150.sh rest & bash experiments/gsm_symbolic_150.sh screen
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
OUT=experiments/results/smollm2-gsm-symbolic-150
SEEDS=0,1,2
if [ "${1:-}" = seed ]; then SEEDS=0,${2:?usage: $0 seed N}; fi
case "${1:-}" in grid|screen|rest) SEEDS=0 ;; esac
COMMON=(--output "$OUT" --steps 150 --batch-size 4 --max-length 256 --train-size 600
  --val-size 32 --test-size 128 --warmup-steps 15 --autocast-dtype bfloat16 --threads 1
  --seeds $SEEDS --eval-batch-size 8
  --rows lora_svd,lora_svd_2x,lora_per_rank,matryoshka_trained,mat_prefix1_trained,mat_mixed_trained,mat_late_trained,mat_prefix1_every2_trained,lora_1p5x_svd,mat_rebase_trained,mat_prefix1_w75_trained,mat_geometric_trained
  --lr lora=4e-3,8e-3,1.6e-2 --lr lora_2x=4e-3,8e-3,1.6e-2 --lr lora_r=8e-3 --lr lora_r:1=2e-2
  --lr matryoshka=8e-3 --lr mat_prefix1=4e-3,8e-3,1.6e-2
  --lr mat_mixed=8e-3 --lr mat_late=8e-3 --lr mat_prefix1_every2=8e-3
  --lr lora_1p5x=8e-3 --lr mat_rebase=8e-3 --lr mat_prefix1_w75=8e-3
  --lr mat_geometric=8e-3)
compare() { python experiments/compare.py "${COMMON[@]}" "$@"; }
case "${1:-}" in
  A) compare --kinds lora,mat_prefix1 ;;
  B) compare --kinds matryoshka,lora_2x
     compare --kinds lora_r ;;
  seed) for kind in mat_prefix1 lora_2x lora; do compare --kinds "$kind"; done ;;
  grid) compare --kinds lora --lr lora=8e-3,1.6e-2
        compare --kinds mat_prefix1 --lr mat_prefix1=8e-3,1.6e-2
        compare --kinds lora
        compare --kinds mat_prefix1 ;;
  screen) compare --kinds mat_mixed
          compare --kinds mat_late
          compare --kinds lora_2x --lr lora_2x=8e-3,1.6e-2
          compare --kinds mat_prefix1_every2
          compare --kinds mat_rebase
          compare --kinds mat_geometric
          compare --kinds mat_prefix1_w75
          compare --kinds lora_1p5x ;;
  rest) compare --kinds matryoshka --seeds 0,1,2
        compare --kinds lora,lora_r
        compare --kinds lora_2x ;;
  report) compare --report ;;
  *) echo "usage: $0 A|B|seed N|grid|screen|rest|report" >&2; exit 2 ;;
esac
