#!/usr/bin/env bash
# The experiments of experiments.toml on one CUDA machine, many runs at a time, inside a time limit:
#   bash benchmark_results/gpu_evidence.sh WORK_DIR SECONDS JOBS EXPERIMENT [EXPERIMENT ...] [SWEEP FLAGS]
# 1. makes the datasets the experiments need from the committed behaviour policies, all at once, under
#    WORK_DIR/minari (those already there are kept);
# 2. runs the experiments with common/sweep.py, JOBS runs at a time, each with --compile (CUDA graphs), and
#    after SECONDS stops the sweep with SIGTERM: every run saves its checkpoint, and the same command, run
#    again, resumes them. Then `python benchmark_results/plot.py --export --runs-dir WORK_DIR/runs` (here or
#    wherever the run directories are copied) turns their logs into data/*.csv, the figures and the tables.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 4 ]; then
  echo "usage: bash benchmark_results/gpu_evidence.sh WORK_DIR SECONDS JOBS EXPERIMENT [EXPERIMENT ...]" >&2
  exit 2
fi
work=$(mkdir -p "$1" && cd "$1" && pwd) seconds=$2 jobs=$3
shift 3
export MINARI_DATASETS_PATH=$work/minari PYTHONUNBUFFERED=1
mkdir -p "$work/logs"
started=$(date +%s)

# The datasets the experiments declare, as "namespace env": local/ (sampled actions) or local-noise/.
needed=$(python - "$@" <<'EOF'
import sys, tomllib
experiments = tomllib.load(open("benchmark_results/experiments.toml", "rb"))
names = [a for a in sys.argv[1:next((i for i, a in enumerate(sys.argv) if a.startswith("--")), len(sys.argv))]]
datasets = {d for name in names for c in experiments[name]["conditions"].values()
            for d in (c.get("datasets") if isinstance(c, dict) else None) or experiments[name]["datasets"]}
print("\n".join(sorted(f"{d.split('/')[0]} {d.split('/')[1]}" for d in datasets if d.endswith("/medium-v0"))))
EOF
) || exit 1
while read -r namespace env; do
  [ -z "$env" ] || [ -d "$MINARI_DATASETS_PATH/$namespace/$env/medium-v0" ] && continue
  gym_id=$(case $env in halfcheetah) echo HalfCheetah-v5;; walker2d) echo Walker2d-v5;; *) echo Hopper-v5;; esac)
  seed=$([ "$env" = hopper ] && echo 1 || echo 0)  # the seeds benchmark_results/README.md gives
  case $namespace in
    local) flags="--medium-policy benchmark_results/behaviour_policies/${env}_medium.npz --seed $seed" ;;
    local-noise) flags="--protocol mean-plus-noise --medium-policy \
benchmark_results/behaviour_policies/mean_plus_noise/${env}_medium.npz" ;;
    *) echo "note: make $namespace/$env/medium-v0 by hand (benchmark_results/README.md)"; continue ;;
  esac
  echo "making $namespace/$env/medium-v0"
  python common/make_dataset.py --env-id "$gym_id" --random-size 0 $flags > "$work/logs/data_${namespace}_$env.log" 2>&1 &
done <<< "$needed"
wait
echo "datasets ready after $(( $(date +%s) - started )) s"

left=$(( seconds - ($(date +%s) - started) ))
python common/sweep.py "$@" --jobs "$jobs" --threads 1 --work-dir "$work" --extra-flags=--compile \
  > "$work/logs/sweep.log" 2>&1 &
sweep=$!
( sleep "$(( left > 0 ? left : 1 ))" && kill -TERM $sweep 2>/dev/null ) &
timer=$!
wait $sweep
kill $timer 2>/dev/null
tail -n 5 "$work/logs/sweep.log"
echo "stopped after $(( $(date +%s) - started )) s; run directories in $work/runs"
