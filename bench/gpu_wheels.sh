#!/usr/bin/env bash
# Fetch, on a machine with network, the wheels that bench/gpu.sh installs on a GPU machine without one.
# The GPU image has Python 3.12 with torch, accelerate, pandas, pyarrow, fsspec, xxhash and huggingface-hub;
# it lacks trl, datasets (and dill, multiprocess), greenlet, and has other transformers / peft versions.
# Usage: bash bench/gpu_wheels.sh   ->   .whl/ (ignored by git; pass it to the device run with carry=[".whl"])
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl trl==1.16.0 transformers==5.24.0 peft==0.21.2 datasets==5.2.0 tokenizers==0.23.3 \
  dill==0.4.0 multiprocess==0.70.18 greenlet==3.5.6
ls -la .whl
