#!/usr/bin/env bash
# EDAC experiments of benchmark_results/README.md, at the budget a 2-core CPU allows (an EDAC update
# with 10 critics runs at about 5 per second on one core):
#   6. EDAC on local hopper-medium: pre-trained (soft BC, then critics on soft returns) vs from scratch;
#   7. the data-limited regime (24 episodes of hopper-medium, see run_hopper_small.sh): EDAC vs EDAC+BC.
# 6,000 gradient steps, 3,000 of them pre-training, 10 critics, evaluation every 1,000 steps.
# SEEDS (default "0"), JOBS (default 2) runs at a time; finished runs are skipped, interrupted ones resume.
#   bash benchmark_results/run_hopper_edac.sh        then   python benchmark_results/plot.py --export
set -euo pipefail
cd "$(dirname "$0")/.."
export STEPS=6000 PRETRAIN=3000 EVAL_INTERVAL=1000
python common/make_dataset.py --env-id Hopper-v5 --random-size 0 --namespace local-25ep --medium-size 14000 \
  --medium-policy benchmark_results/behaviour_policies/hopper_medium.npz

for seed in ${SEEDS:-0}; do
  echo "hopper_edac edac_pretrain.py local/hopper/medium-v0 pretrained $seed --num-critics 10"
  echo "hopper_edac edac_pretrain.py local/hopper/medium-v0 scratch $seed --num-critics 10 --pretrain none"
  echo "hopper25ep_edac edac_pretrain.py local-25ep/hopper/medium-v0 edac $seed --num-critics 10"
  echo "hopper25ep_edac edac_bc_pretrain.py local-25ep/hopper/medium-v0 edac_bc $seed --num-critics 10"
done | xargs -P "${JOBS:-2}" -L 1 bash benchmark_results/run_one.sh
