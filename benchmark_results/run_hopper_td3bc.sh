#!/usr/bin/env bash
# Experiments 1, 3 and 4 of benchmark_results/README.md: TD3+BC on the local hopper-medium dataset.
#   1. pre-trained actor and critics vs from scratch;
#   3. what is pre-trained: actor and critics, actor only, critics only, nothing;
#   4. where LayerNorm is (with pre-training): both networks, actor only, critics only, neither.
# Three seeds each, JOBS (default 2) runs at a time with one thread each. A finished run is skipped and an
# interrupted one resumes from its checkpoint, so re-running this script continues where it stopped.
#   bash benchmark_results/run_hopper_td3bc.sh        then   python benchmark_results/plot.py --export
set -euo pipefail
cd "$(dirname "$0")/.."
export STEPS=20000 PRETRAIN=10000 EVAL_INTERVAL=2000
DATASET=local/hopper/medium-v0

for seed in 0 1 2; do
  echo "pretrained $seed --pretrain actor-critic"
  echo "scratch $seed --pretrain none"
  echo "actor_only $seed --pretrain actor"
  echo "critic_only $seed --pretrain critic"
  echo "layernorm_actor_only $seed --no-critic-layernorm"
  echo "layernorm_critic_only $seed --no-actor-layernorm"
  echo "layernorm_none $seed --no-actor-layernorm --no-critic-layernorm"
done | sed "s|^|hopper_td3bc td3bc_pretrain.py $DATASET |" | xargs -P "${JOBS:-2}" -L 1 bash benchmark_results/run_one.sh
