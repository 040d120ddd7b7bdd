#!/usr/bin/env bash
# Everything that only a GPU can tell, in one call of a lent GPU machine, in under 8 minutes:
#   bash benchmarks/gpu_session.sh             results under $OUT (default: a new /tmp folder)
#   bash benchmarks/gpu_session.sh --dry-run   the same Python paths on the CPU (tiny preset,
#                                              Triton interpreter); exits non-zero on failure
#
# Stages, most important first, each under its own time limit and all under one session
# budget (GPU_SESSION_BUDGET_S, default 450 s; a stage that would start with under 15 s
# left is skipped):
#   env          versions, device
#   build        the C++/CUDA extension in place (skipped by --dry-run)
#   cuda-tests   pytest -m cuda (kernels at real sizes, paged memory)
#   fused-tests  the fused RoPE-store kernel's tests, compiled for the GPU
#   oracle-cuda  engine vs the naive oracle on CUDA with the kernels, eager and CUDA graphs
#   latency      native vs retrieval, eager vs graphs (the reference workload, 2 timed runs)
#   kernels      fused RoPE-store, search and splice kernels: ms, GB/s against a copy
#   long         (only with GPU_SESSION_LONG=1: several minutes) block time at frames 100 / 1000
# Each stage writes its log (and JSON / JUnit XML) into the output folder as it ends, and
# stages.tsv gets one line; the summary (summary.json + a one-screen table) comes last.
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "gpu_session.sh: unknown argument '$arg' (only --dry-run)" >&2; exit 2 ;;
  esac
done

py=${PYTHON:-python3}
date=$(date +%F)
out=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/lrag-gpu-session-$date-XXXX")}
mkdir -p "$out"
: > "$out/stages.tsv"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
budget=${GPU_SESSION_BUDGET_S:-450}
started=$(date +%s)
failed=0

if [ "$dry" = 1 ]; then
  # The kernels run in the Triton interpreter, set before triton is first imported.
  export TRITON_INTERPRET=1
  lat_args=(--device cpu --preset tiny --frames 36 --warmup-frames 6 --warmup-blocks 1 --threads 1)
  kernel_args=(--tiny)
  cuda_tests=(tests/ops/test_search_topk.py tests/ops/test_splice.py)
  fused_tests=(tests/ops/test_rope_store.py -k "bad_arguments")
  echo "gpu_session: DRY RUN on the CPU (tiny preset, Triton interpreter): checks the script's paths, measures nothing"
else
  lat_args=()
  kernel_args=()
  cuda_tests=(tests --ignore=tests/oracle)   # the oracle's CUDA tests are the next stage's
  fused_tests=(tests/ops/test_rope_store.py)
fi
echo "gpu_session: output in $out, budget ${budget} s"

# stage NAME LIMIT_S COMMAND...: runs COMMAND under min(LIMIT_S, what is left of the
# budget), its output in $out/NAME.log (tail shown), one line in $out/stages.tsv.
stage() {
  local name=$1 limit=$2; shift 2
  local left=$(( budget - ($(date +%s) - started) ))
  if [ "$left" -lt 15 ]; then
    echo "== $name: skipped, ${left} s of the session budget left"
    printf '%s\tskipped\t0\t0\t%s\n' "$name" "$limit" >> "$out/stages.tsv"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit} s)"
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$? status=ok
  local took=$(( $(date +%s) - t0 ))
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status=timeout; failed=1
  elif [ "$rc" != 0 ]; then status=failed; failed=1; fi
  tail -n 12 "$out/$name.log"
  echo "-- $name: $status (rc $rc) in ${took} s"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$took" "$limit" >> "$out/stages.tsv"
}

stage env 30 "$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
if [ "$dry" = 0 ]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$out/nvidia-smi.csv" 2>&1
  stage build 100 env MAX_JOBS="$(nproc)" "$py" setup.py build_ext --inplace -q
fi
stage cuda-tests 90 "$py" -m pytest -q -p no:cacheprovider -m cuda "${cuda_tests[@]}" \
  --junitxml="$out/cuda-tests.xml"
stage fused-tests 45 "$py" -m pytest -q -p no:cacheprovider "${fused_tests[@]}" --junitxml="$out/fused-tests.xml"
stage oracle-cuda 80 "$py" -m pytest -q -p no:cacheprovider -m cuda tests/oracle/test_oracle.py \
  --junitxml="$out/oracle-cuda-tests.xml"
stage latency 150 "$py" benchmarks/latency.py --modes native,native-graphs,retrieval,retrieval-graphs \
  --repeats 2 "${lat_args[@]}" --out "$out/latency.json"
stage kernels 60 "$py" benchmarks/bench_kernels.py "${kernel_args[@]}" --out "$out/kernels.json"
if [ "${GPU_SESSION_LONG:-0}" = 1 ]; then
  stage long 600 "$py" benchmarks/latency.py --long "${lat_args[@]}" --out "$out/latency-long.json"
fi

echo "== summary"
"$py" -m lrag_engine.bench.session_summary "$out" || failed=1
echo "gpu_session: results in $out"
exit "$failed"
