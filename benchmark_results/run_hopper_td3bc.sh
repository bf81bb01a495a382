#!/usr/bin/env bash
# Experiments 1, 3 and 4 of benchmark_results/README.md: TD3+BC on the local hopper-medium dataset.
#   1. pre-trained actor and critics vs from scratch;
#   3. what is pre-trained: actor and critics, actor only, critics only, nothing;
#   4. where LayerNorm is (with pre-training): both networks, actor only, critics only, neither.
# Three seeds each, two runs at a time with one thread each. A finished run is skipped and an
# interrupted one resumes from its checkpoint, so re-running this script continues where it stopped.
#   bash benchmark_results/run_hopper_td3bc.sh        then   python benchmark_results/plot.py --export
set -euo pipefail
cd "$(dirname "$0")/.."
export DATASET=${DATASET:-local/hopper/medium-v0} STEPS=${STEPS:-20000} PRETRAIN=${PRETRAIN:-10000}

run_one() {
  local name=$1 seed=$2; shift 2
  local dir="runs/benchmark/hopper_td3bc/$name/seed$seed"
  if [ -f "$dir/model.pt" ]; then return; fi
  if [ -f "$dir/checkpoint.pt" ]; then
    OMP_NUM_THREADS=1 python algos/td3bc_pretrain.py --resume "$dir" > /dev/null 2>> "$dir.log"
  else
    mkdir -p "$(dirname "$dir")"
    OMP_NUM_THREADS=1 python algos/td3bc_pretrain.py --env-id "$DATASET" --seed "$seed" --total-steps "$STEPS" \
      --pretrain-steps "$PRETRAIN" --eval-interval 2000 --eval-episodes 10 --checkpoint-interval 2000 \
      --run-name "benchmark/hopper_td3bc/$name/seed$seed" "$@" > /dev/null 2> "$dir.log"
  fi
  echo "finished $name seed $seed"
}
export -f run_one

for seed in 0 1 2; do
  echo "pretrained $seed --pretrain actor-critic"
  echo "scratch $seed --pretrain none"
  echo "actor_only $seed --pretrain actor"
  echo "critic_only $seed --pretrain critic"
  echo "layernorm_actor_only $seed --no-critic-layernorm"
  echo "layernorm_critic_only $seed --no-actor-layernorm"
  echo "layernorm_none $seed --no-actor-layernorm --no-critic-layernorm"
done | xargs -P 2 -L 1 bash -c 'run_one "$@"' _
