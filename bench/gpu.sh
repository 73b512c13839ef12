#!/usr/bin/env bash
# One prepared GPU run (about 8 minutes): overhead, time to first comparison and memory with a Qwen2.5-0.5B-shaped
# model (random init, bfloat16), while nvidia-smi samples GPU utilisation every 500 ms.
#
# On a machine with network:  bash bench/gpu_wheels.sh        (wheels into .whl/)
# On the GPU machine:         bash bench/gpu.sh               (installs .whl/ into /tmp/site if present)
# Results: bench/results/*-qwen05.json, bench/results/gpu-nvidia-smi.csv, tables in BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=$PWD:/tmp/site   # rf_notebook and the demo files come from this working tree
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p bench/results
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -lms 500 \
  > bench/results/gpu-nvidia-smi.csv &
smi=$!
trap 'kill $smi 2>/dev/null || true' EXIT
python3 -m bench.overhead --model qwen05 --runs 4 --num-chunks 8 --max-steps 64 --batch-size 16 --repeats 2
python3 -m bench.first_comparison --model qwen05 --runs 4 --num-chunks 8 --max-steps 64 --batch-size 16 --repeats 1
python3 -m bench.memory --model qwen05 --runs 1 4 8
kill $smi
python3 - <<'PY'
import csv, statistics
rows = [r for r in csv.reader(open("bench/results/gpu-nvidia-smi.csv")) if len(r) == 3]
util = [float(r[1]) for r in rows]
print(f"GPU utilisation over {len(util)} samples: mean {statistics.mean(util):.0f}%, median {statistics.median(util):.0f}%")
PY
