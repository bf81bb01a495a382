#!/usr/bin/env bash
# The GPU measurements of benchmark_results/throughput_gpu.md, in one short run (under ten minutes) on a
# CUDA machine (about six minutes on an H100):
#   1. each script's update, eager, fp32 and bf16, beside the plain fp32 reference; then the two base
#      scripts' updates with compiled networks (CUDA graphs): compilation takes about a minute each, and
#      the hybrids share their bases' networks;
#   2. one TD3+BC run end to end, 20,000 gradient steps (10,000 of pre-training) with 5 evaluations, on a
#      small local dataset (24 episodes of hopper-medium, made with the command in benchmark_results/README.md),
#      compiled bf16 (eager bf16 if compiling fails).
#   MINARI_DATASETS_PATH=~/minari_datasets bash benchmark_results/gpu_benchmark.sh [OUTPUT_DIR]
# Writes OUTPUT_DIR/throughput_gpu.md (default: benchmark_results/) and the logs beside it.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmark_results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-16}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

timeout 290 python benchmark_results/throughput.py --device cuda --steps "${STEPS:-300}" --repeats 3 \
  --output "$out/throughput_gpu_eager.md" 2>&1 | grep -v Warning | tee "$out/throughput_gpu.log"
timeout 200 python benchmark_results/throughput.py --device cuda --steps "${STEPS:-300}" --repeats 3 --compile \
  --only td3bc_pretrain edac_pretrain --output "$out/throughput_gpu_compiled.md" 2>&1 | grep -v Warning \
  | tee -a "$out/throughput_gpu.log"
{
  echo "# Update throughput on a GPU"
  echo
  echo "Made by \`bash benchmark_results/gpu_benchmark.sh\`."
  for part in eager compiled; do
    echo
    echo "## ${part^} networks"
    echo
    if [ -f "$out/throughput_gpu_$part.md" ]; then tail -n +5 "$out/throughput_gpu_$part.md"
    else echo "(did not finish)"; fi
  done
  echo
  echo "## One run end to end"
  echo
  echo "\`python algos/td3bc_pretrain.py --env-id local-25ep/hopper/medium-v0 --total-steps 20000 --pretrain-steps \
10000 --eval-interval 5000 --eval-episodes 10\` with the flags below; wall time from start to model.pt: dataset \
loading, compilation and 5 evaluations (MuJoCo on the CPU) included."
  echo
  echo "| flags | wall time (s) | final normalised score | gradient steps/s (charts/SPS, last window) |"
  echo "|---|---|---|---|"
} > "$out/throughput_gpu.md"

for flags in "--precision bf16 --compile" "--precision bf16"; do
  name=gpu_$(echo "$flags" | tr -d ' -')
  start=$(date +%s)
  timeout 90 python algos/td3bc_pretrain.py --env-id local-25ep/hopper/medium-v0 --total-steps 20000 \
    --pretrain-steps 10000 --eval-interval 5000 --eval-episodes 10 --log-interval 1000 --run-name "$name" \
    $flags > "$out/$name.log" 2>&1
  status=$?
  seconds=$(( $(date +%s) - start ))
  score=$(grep -o "final normalised score [0-9.-]*" "$out/$name.log" | awk '{print $4}')
  sps=$(python -c "
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator as E
e = E('runs/$name'); e.Reload(); print(f\"{e.Scalars('charts/SPS')[-1].value:.0f}\")" 2>/dev/null)
  [ $status -eq 0 ] || score="failed (exit $status, see $name.log)"
  echo "| \`$flags\` | $seconds | ${score:-?} | ${sps:-?} |" >> "$out/throughput_gpu.md"
  [ $status -eq 0 ] && break  # one run end to end is enough; eager only if the compiled one failed
done
cat "$out/throughput_gpu.md"
