#!/bin/bash
# Closed-book recall of invented facts, where the adapter's capacity binds
# (experiments/synthetic_facts.py): 18 invented people x 3 attributes = 54 facts, asked in
# 3 trained phrasings (162 training questions), 32 validation questions in a fourth
# phrasing and 216 test questions in 4 more (about 1,560 answer tokens); q_proj and v_proj
# only, R = 16; STEPS steps x 8 questions (about 5 epochs at 100 steps).
# One process, one thread; resumable (a rerun skips finished runs):
#   bash experiments/facts_150.sh A        # seed 0: the deciding rows at 1.2e-2
#   bash experiments/facts_150.sh grid     # seed 0: their second rate, 2.4e-2 (r = 1: 4.8e-2 too)
#   bash experiments/facts_150.sh seed 1   # one more seed of the deciding rows
#   bash experiments/facts_150.sh screen   # seed 0: rank-1 polish (late-prefix) and its bar
#   bash experiments/facts_150.sh grid2    # seed 0: the envelope's r = 2 lower, the authors' higher
#   bash experiments/facts_150.sh rest N   # seed N of the envelope, the authors' objective, DyLoRA
#   bash experiments/facts_150.sh report   # rewrite results.* from the finished runs
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-experiments/results/smollm2-facts}  # another folder runs a seed beside this one
DATA=outputs/synthetic-facts/e18
STEPS=100
[ -f "$DATA/meta.json" ] || python experiments/synthetic_facts.py --output "$DATA" \
  --entities 18 --val-size 32 --syllables 4 --seed 0
SEEDS=0
if [ "${1:-}" = seed ] || [ "${1:-}" = rest ]; then SEEDS=0,${2:?usage: $0 $1 N}; fi
if [ "${1:-}" = report ]; then SEEDS=0,1,2; fi  # the table shows the seeds that ran
# the full grids (the rates every mode may run); a mode narrows one kind's grid with --lr
GRIDS=(--lr lora=1.2e-2,2.4e-2 --lr lora_r=1.2e-2,2.4e-2 --lr lora_r:1=2e-3,1.2e-2,2.4e-2,4.8e-2
  --lr lora_r:2=3e-3,6e-3,1.2e-2,2.4e-2
  --lr lora_2x=1.2e-2,2.4e-2 --lr mat_prefix1=1.2e-2,2.4e-2 --lr matryoshka=1.2e-2,2.4e-2,4.8e-2
  --lr dylora=1.2e-2,2.4e-2 --lr lora_late1=2.4e-2,1.2e-2 --lr lora_1p25x=2.4e-2,1.2e-2)
COMMON=(--output "$OUT" --dataset "$DATA" --format prompt-completion
  --target-modules q_proj,v_proj --steps $STEPS --batch-size 8 --max-length 64
  --train-size 162 --val-size 32 --test-size 216 --warmup-steps $((STEPS / 10))
  --autocast-dtype bfloat16 --threads 1 --eval-batch-size 32
  --rows lora_svd,lora_svd_2x,lora_per_rank,mat_prefix1_trained,matryoshka_paper,matryoshka_trained,dylora,lora_late1_trained,lora_1p25x_svd
  "${GRIDS[@]}")
compare() { python experiments/compare.py "${COMMON[@]}" --seeds "$SEEDS" "$@"; }
case "${1:-}" in
  A) compare --kinds lora --lr lora=1.2e-2
     compare --kinds lora_r --lr lora_r=1.2e-2 --lr lora_r:1=2e-3,1.2e-2,2.4e-2
     for kind in lora_2x mat_prefix1 matryoshka dylora; do
       compare --kinds "$kind" --lr "$kind=1.2e-2"
     done ;;
  grid) compare --kinds lora
        compare --kinds lora_r
        for kind in lora_2x mat_prefix1 matryoshka dylora; do compare --kinds "$kind"; done ;;
  screen) compare --kinds lora_late1
          compare --kinds lora_1p25x ;;
  seed) for kind in lora lora_2x mat_prefix1; do compare --kinds "$kind"; done ;;
  grid2) compare --kinds lora_r
         compare --kinds matryoshka ;;
  rest) for kind in matryoshka dylora lora_r; do compare --kinds "$kind"; done ;;
  report) compare --max-runs 0 ;;  # the full grids recorded in spec.json, no training
  *) echo "usage: $0 A|grid|screen|grid2|seed N|rest N|report" >&2; exit 2 ;;
esac
