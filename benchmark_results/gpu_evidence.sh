#!/usr/bin/env bash
# The experiments of experiments.toml on one CUDA machine, many runs at a time, inside a time limit:
#   bash benchmark_results/gpu_evidence.sh WORK_DIR SECONDS JOBS EXPERIMENT [EXPERIMENT ...] [SWEEP FLAGS]
# 1. makes the datasets the experiments need from the committed behaviour policies, all at once, under
#    WORK_DIR/minari (those already there are kept);
# 2. runs the experiments with common/sweep.py, JOBS runs at a time, each with --compile (CUDA graphs), and
#    after SECONDS in all stops the sweep with SIGTERM: every run saves its checkpoint, and the same command,
#    run again, resumes them. Then `python benchmark_results/plot.py --export --runs-dir WORK_DIR/runs` (here
#    or wherever the run directories are copied) turns their logs into data/*.csv, the figures and the tables.
set -uo pipefail
if [ $# -lt 4 ]; then
  echo "usage: bash benchmark_results/gpu_evidence.sh WORK_DIR SECONDS JOBS EXPERIMENT [EXPERIMENT ...]" >&2
  exit 2
fi
work=$(mkdir -p "$1" && cd "$1" && pwd) || exit 1  # from where the script was started
seconds=$2 jobs=$3
shift 3
cd "$(dirname "$0")/.."
export MINARI_DATASETS_PATH=$work/minari PYTHONUNBUFFERED=1
mkdir -p "$work/logs"
started=$(date +%s)

# The medium datasets the experiments declare, one "namespace env" per line.
needed=$(python - "$@" <<'EOF'
import sys, tomllib
experiments = tomllib.load(open("benchmark_results/experiments.toml", "rb"))
names = [a for a in sys.argv[1:next((i for i, a in enumerate(sys.argv) if a.startswith("--")), len(sys.argv))]]
names = list(experiments) if names == ["all"] else names
unknown = [name for name in names if name not in experiments]
if unknown:
    sys.exit(f"error: no experiment {', '.join(unknown)} in experiments.toml; it declares: {', '.join(experiments)}")
datasets = {d for name in names for c in experiments[name]["conditions"].values()
            for d in (c.get("datasets") if isinstance(c, dict) else None) or experiments[name]["datasets"]}
print("\n".join(sorted(f"{d.split('/')[0]} {d.split('/')[1]}" for d in datasets if d.endswith("/medium-v0"))))
EOF
) || exit 1
P=benchmark_results/behaviour_policies
makers=()
while read -r namespace env; do
  if [ -z "$env" ] || [ -d "$MINARI_DATASETS_PATH/$namespace/$env/medium-v0" ]; then continue; fi
  gym_id=$(case $env in halfcheetah) echo HalfCheetah-v5;; walker2d) echo Walker2d-v5;; *) echo Hopper-v5;; esac)
  noise="--protocol mean-plus-noise --medium-policy $P/mean_plus_noise/${env}_medium.npz --namespace $namespace"
  case $namespace in  # the commands of benchmark_results/README.md, "How to reproduce"
    local) flags="--medium-policy $P/${env}_medium.npz$([ "$env" = hopper ] && echo " --seed 1")" ;;
    local-noise) flags=$noise ;;
    local-noise-100k) flags="$noise --medium-size 100000" ;;
    local-noise-25ep) flags="$noise --medium-size 14000" ;;
    *) echo "error: no recipe for $namespace/$env/medium-v0; make it as benchmark_results/README.md says" >&2
       exit 1 ;;
  esac
  echo "making $namespace/$env/medium-v0"
  # shellcheck disable=SC2086  # $flags is a list of flags
  python common/make_dataset.py --env-id "$gym_id" --random-size 0 $flags \
    > "$work/logs/data_${namespace}_$env.log" 2>&1 &
  makers+=("$!:$namespace/$env")
done <<< "$needed"
for maker in "${makers[@]}"; do
  wait "${maker%%:*}" || { echo "error: making ${maker#*:} failed; see $work/logs" >&2; exit 1; }
done
echo "datasets ready after $(( $(date +%s) - started )) s"

left=$(( seconds - ($(date +%s) - started) ))
# --foreground: Ctrl-C reaches the sweep, which stops its runs as at the time limit.
timeout --foreground -s TERM "$(( left > 1 ? left : 1 ))" python common/sweep.py "$@" --jobs "$jobs" --threads 1 \
  --work-dir "$work" --extra-flags=--compile > "$work/logs/sweep.log" 2>&1
status=$?
tail -n 5 "$work/logs/sweep.log"
echo "stopped after $(( $(date +%s) - started )) s; run directories in $work/runs"
if [ $status -eq 124 ]; then exit 0; fi  # the time limit: the runs saved, and the same command resumes them
exit $status
