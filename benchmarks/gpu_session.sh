#!/usr/bin/env bash
# Everything that only a GPU can tell, in one call of a lent GPU machine:
#   bash benchmarks/gpu_session.sh            (results under $OUT, or benchmarks/results/)
# builds the extension in place, runs the CUDA tests (kernels at real sizes, paged
# memory copies, engine vs oracle with kernels and CUDA graphs), then every benchmark.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
date=$(date +%F)
device=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv

echo "== build"
python3 setup.py build_ext --inplace -q 2>&1 | tail -3

echo "== CUDA tests"
python3 -m pytest -q -m cuda tests -p no:cacheprovider 2>&1 | tee "$out/gpu-tests-$date.log" | tail -25

echo "== kernels"
python3 benchmarks/bench_kernels.py --out "$out/kernels-$device-$date.json" 2>&1 | tail -20
echo "== memory"
python3 benchmarks/bench_memory.py --out "$out" 2>&1 | tail -15
echo "== latency (reference workload)"
python3 benchmarks/latency.py --out "$out/latency-$device-$date.json" 2>&1 | tail -30
