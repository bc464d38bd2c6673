#!/usr/bin/env bash
# kvq issue 18 experiment: decode_mma_kernel modes (KVQ_EXP_DECODE 0-3) in one binary, then main as base.
set -u
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
F='^decode_attention/half/(per_token_head/(B8_T32768_Hq32_Hkv8_D128|B1_T131072|B32_T1024|B128_T2048)|keys_per_channel_page/B8_T32768_Hq32_Hkv8_D128)'
F96='^decode_attention/half/per_token_head/B8_T32768_Hq32_Hkv8_D96'
build() {  # tree dir
  local t0=$SECONDS
  cmake -S "$1" -B "$2" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 -DKVQ_BUILD_TESTS=ON \
    -DKVQ_BUILD_BENCHMARKS=ON -DKVQ_BUILD_EXAMPLES=OFF >/dev/null && cmake --build "$2" --target kvq_bench -j 16 2>&1 | grep -vE "^\[[0-9]+/[0-9]+\]" | tail -3
  echo "=== build $1: $((SECONDS - t0)) s"
}
bench() {  # binary name filter
  "$1" --benchmark_filter="$3" --benchmark_out="$OUT/$2.json" --benchmark_out_format=json 2>&1 | grep -E "^(case|[a-z_]+/)|rror|FAIL|mismatch"
}
build variants/exp build/cmp/exp
for m in 0 1 2 3; do echo "=== mode $m"; KVQ_EXP_DECODE=$m bench build/cmp/exp/bench/kvq_bench exp$m "$F"; done
for m in 0 1; do echo "=== D96 mode $m"; KVQ_EXP_DECODE=$m bench build/cmp/exp/bench/kvq_bench exp${m}_d96 "$F96"; done
