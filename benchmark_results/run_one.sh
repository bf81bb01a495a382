#!/usr/bin/env bash
# One benchmark run, used by the run_*.sh scripts (several at a time through xargs):
#   bash benchmark_results/run_one.sh FOLDER SCRIPT DATASET CONDITION SEED [SCRIPT FLAGS...]
# writes runs/benchmark/FOLDER/CONDITION/seedSEED with STEPS gradient steps (PRETRAIN of them
# pre-training), evaluating every EVAL_INTERVAL steps on 10 episodes, on one thread. A finished run
# (model.pt) is skipped and an interrupted one resumes from its checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
folder=$1 script=$2 dataset=$3 condition=$4 seed=$5; shift 5
dir="runs/benchmark/$folder/$condition/seed$seed"
if [ -f "$dir/model.pt" ]; then exit 0; fi
export OMP_NUM_THREADS=1
if [ -f "$dir/checkpoint.pt" ]; then
  python "algos/$script" --resume "$dir" > /dev/null 2>> "$dir.log"
else
  mkdir -p "$(dirname "$dir")"
  python "algos/$script" --env-id "$dataset" --seed "$seed" --total-steps "${STEPS:-20000}" \
    --pretrain-steps "${PRETRAIN:-10000}" --eval-interval "${EVAL_INTERVAL:-2000}" --eval-episodes 10 \
    --checkpoint-interval "${EVAL_INTERVAL:-2000}" --run-name "benchmark/$folder/$condition/seed$seed" "$@" \
    > /dev/null 2> "$dir.log"
fi
echo "finished $folder $condition seed $seed"
