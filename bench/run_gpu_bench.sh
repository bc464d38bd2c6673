#!/usr/bin/env bash
# bench/run_gpu_bench.sh: the whole benchmark run on a GPU machine, in one command.
#
#   OUT=/some/dir bash bench/run_gpu_bench.sh [STEP...]
#   STEP: build default paper torch plot (default: all five, in that order), and decode (only when
#         named): kvq_bench's decode_attention cases and bench/compare_decode.py's peers (SDPA, and
#         FlashInfer from the wheels in KVQ_WHEELS, default build/wheels: bench/get_peer_wheels.sh
#         fetches them; carry that directory to the GPU machine) -> decode_kvq.json, decode.json, decode.md
#
# Run from the repository root. Needs nvcc (13.0 was used), CMake >= 3.25, Ninja, Google Benchmark
# (find_package), and Python with torch, triton and matplotlib; no network. Budget: < 10 minutes
# on one H200. Every step has a time limit, and the steps share one deadline (KVQ_DEADLINE_S,
# default 570 s), so a slow step cannot take the time of the ones after it; a step that fails or
# runs out of time is reported and the others still run. Writes six files to $OUT:
#   run.log     everything printed (build, tables, comparison), with each step's exit status and time
#   bench.json  kvq_bench's default workload (Google Benchmark JSON)
#   paper.json  kvq_bench --paper (the paper's table; input of the plot)
#   torch.json  compare_torch.py: kvq and PyTorch (eager, torch.compile) times, row by row
#   compare.md  the comparison as a markdown table
#   plot.png    GB/s against tensor size per variant and for torch.compile, copy bandwidth as a line
set -uo pipefail

OUT=${OUT:-$PWD/build/gpu-out}
BUILD=${KVQ_BUILD_DIR:-build/gpu}
PYTHON=${PYTHON:-python3}
DEADLINE=${KVQ_DEADLINE_S:-570}
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(build default paper torch plot)
BENCH=$BUILD/bench/kvq_bench

mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
failed=()

# step NAME CAP_SECONDS RESERVE_SECONDS COMMAND...: runs COMMAND for at most CAP seconds, and never
# past the deadline less RESERVE (the time kept for the steps after it).
step() {
  local name=$1 cap=$2 reserve=$3
  shift 3
  local left=$((DEADLINE - SECONDS - reserve))
  ((left < cap)) && cap=$left
  if ((cap < 10)); then
    echo "=== $name: skipped, the deadline is too close ($SECONDS s of $DEADLINE s used) ==="
    failed+=("$name(skipped)")
    return 1
  fi
  echo "=== $name: $* (limit ${cap} s) ==="
  local t0=$SECONDS
  timeout --kill-after=10 "$cap" "$@"
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0)) s (total $SECONDS s) ==="
  ((rc == 124)) && echo "=== $name: ran out of time ==="
  ((rc == 0)) || failed+=("$name")
  return $rc
}

wants() { [[ " ${STEPS[*]} " == *" $1 "* ]]; }

echo "kvq GPU benchmark run, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,temperature.gpu,power.limit \
  --format=csv 2>/dev/null || echo "nvidia-smi: not available"
nvcc --version 2>/dev/null | tail -1
"$PYTHON" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' 2>/dev/null ||
  echo "torch/triton: not importable with $PYTHON"

if wants build; then
  # A fresh build tree skips tests and examples (no GoogleTest needed); an existing one (.ci/gpu-check's)
  # keeps its options, so its tests stay configured for the next check.
  fresh=()
  [ -f "$BUILD/CMakeCache.txt" ] || fresh=(-DKVQ_BUILD_TESTS=OFF -DKVQ_BUILD_EXAMPLES=OFF)
  if ! { step configure 60 290 cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
           -DCMAKE_CUDA_ARCHITECTURES=90 "${fresh[@]}" -DKVQ_BUILD_BENCHMARKS=ON &&
         step build 200 280 cmake --build "$BUILD" --target kvq_bench -j "$(nproc)"; }; then
    # Timing a kvq_bench left from an earlier tree would report numbers of code that is not this one.
    echo "=== the build did not complete: no timing step runs (they would time a stale kvq_bench) ==="
    STEPS=()
  fi
fi

# Reserves: the least the later steps need (default 60 s, paper 90 s, torch 180 s, plot 10 s).
# compare_torch.py stops timing new rows 30 s before its limit, so that it still writes its files.
wants default && step default 200 280 "$BENCH" --benchmark_out="$OUT/bench.json" --benchmark_out_format=json
wants paper && step paper 120 190 "$BENCH" --paper --benchmark_out="$OUT/paper.json" --benchmark_out_format=json
torch_cap=$((DEADLINE - SECONDS - 10))
((torch_cap > 300)) && torch_cap=300
wants torch && step torch "$torch_cap" 10 "$PYTHON" bench/compare_torch.py --kvq-json "$OUT/bench.json" \
  "$OUT/paper.json" --deadline-s $((torch_cap - 30)) --out-json "$OUT/torch.json" --out-md "$OUT/compare.md"
if wants decode; then
  step decode_kvq 150 60 "$BENCH" --benchmark_filter='^decode_attention/' --benchmark_out="$OUT/decode_kvq.json" \
    --benchmark_out_format=json
  wheels=()
  [ -d "${KVQ_WHEELS:-build/wheels}" ] && wheels=(--wheels "${KVQ_WHEELS:-build/wheels}")
  step decode_peers 240 0 "$PYTHON" bench/compare_decode.py --kvq-json "$OUT/decode_kvq.json" "${wheels[@]}" \
    --out-json "$OUT/decode.json" --out-md "$OUT/decode.md"
fi
if wants plot; then
  kvq_json=()
  for f in "$OUT/paper.json" "$OUT/bench.json"; do [ -s "$f" ] && kvq_json+=("$f"); done
  torch_json=()
  [ -s "$OUT/torch.json" ] && torch_json=(--torch-json "$OUT/torch.json")
  if [ ${#kvq_json[@]} -gt 0 ]; then
    step plot 30 0 "$PYTHON" bench/plot_results.py --kvq-json "${kvq_json[@]}" "${torch_json[@]}" --out "$OUT/plot.png"
  else
    echo "=== plot: skipped, no kvq JSON in $OUT ===" && failed+=("plot(skipped)")
  fi
fi

echo "=== done in $SECONDS s; files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')==="
if [ ${#failed[@]} -gt 0 ]; then
  echo "=== FAILED or skipped: ${failed[*]} ==="
  exit 1
fi
