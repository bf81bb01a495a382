#!/usr/bin/env bash
# Experiments 5 and 7 of benchmark_results/README.md, on small slices of the local hopper-medium data
# (the first episodes the medium policy produced, rebuilt from the committed behaviour policy):
#   5. lambda in {0, 0.1, 0.3, 0.5} for TD3+BC with pre-training, on about 100k transitions;
#   7. data-limited (about 25 episodes): pre-trained TD3+BC vs TD3+BC+CQL.
# Finished runs are skipped and interrupted ones resume. SEEDS="0 1 2" for all three seeds.
#   bash benchmark_results/run_hopper_small.sh        then   python benchmark_results/plot.py --export
set -euo pipefail
cd "$(dirname "$0")/.."
export STEPS=20000 PRETRAIN=10000 EVAL_INTERVAL=2000
SEEDS=${SEEDS:-0}
POLICY=benchmark_results/behaviour_policies/hopper_medium.npz
python common/make_dataset.py --env-id Hopper-v5 --medium-policy $POLICY --random-size 0 --namespace local-100k --medium-size 100000
python common/make_dataset.py --env-id Hopper-v5 --medium-policy $POLICY --random-size 0 --namespace local-25ep --medium-size 14000

for seed in $SEEDS; do
  for lam in 0 0.1 0.3 0.5; do
    echo "hopper100k_lambda td3bc_pretrain.py local-100k/hopper/medium-v0 lam$lam $seed --lam $lam"
  done
  echo "hopper25ep_hybrids td3bc_pretrain.py local-25ep/hopper/medium-v0 td3bc $seed"
  echo "hopper25ep_hybrids td3bc_cql_pretrain.py local-25ep/hopper/medium-v0 td3bc_cql $seed"
done | xargs -P "${JOBS:-2}" -L 1 bash benchmark_results/run_one.sh
