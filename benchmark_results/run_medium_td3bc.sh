#!/usr/bin/env bash
# Experiment 2 of benchmark_results/README.md: experiment 1 (TD3+BC, pre-trained actor and critics vs
# from scratch) on the local walker2d-medium and halfcheetah-medium datasets, rebuilt first from the
# committed SAC behaviour policies if they are missing. Three seeds, JOBS (default 2) runs at a time
# with one thread each; finished runs are skipped and interrupted ones resume.
#   bash benchmark_results/run_medium_td3bc.sh        then   python benchmark_results/plot.py --export
set -euo pipefail
cd "$(dirname "$0")/.."
export STEPS=20000 PRETRAIN=10000 EVAL_INTERVAL=2000
python common/make_dataset.py --env-id Walker2d-v5 --random-size 0 --medium-policy benchmark_results/behaviour_policies/walker2d_medium.npz
python common/make_dataset.py --env-id HalfCheetah-v5 --random-size 0 --medium-policy benchmark_results/behaviour_policies/halfcheetah_medium.npz

for env in walker2d halfcheetah; do
  for seed in 0 1 2; do
    echo "${env}_td3bc td3bc_pretrain.py local/$env/medium-v0 pretrained $seed --pretrain actor-critic"
    echo "${env}_td3bc td3bc_pretrain.py local/$env/medium-v0 scratch $seed --pretrain none"
  done
done | xargs -P "${JOBS:-2}" -L 1 bash benchmark_results/run_one.sh
