#!/usr/bin/env bash
# kvq issue 18: base (main) vs new (whole-row stages) decode attention, then new's attention tests + racecheck.
set -u
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
ln -sfn "$PWD/tests/data" variants/new/tests/data 2>/dev/null
export KVQ_TEST_DATA_DIR=$PWD/tests/data
F='^decode_attention/half/.*(B8_T32768_Hq32_Hkv8_D128|B1_T131072|B32_T1024|B128_T2048|D256|Hq128)'
OUT=$OUT timeout 330 bash .ci/gpu-compare '-*' "$F" variants/base variants/new
echo "=== compare rc $?"
t0=$SECONDS
cmake --build build/compare/new --target kvq_gpu_tests -j 16 2>&1 | grep -vE "^\[[0-9]+/[0-9]+\]" | tail -5
echo "=== new tests build $((SECONDS-t0)) s"
KVQ_REQUIRE_GPU=1 timeout 100 build/compare/new/tests/kvq_gpu_tests --gtest_filter='*DecodeAttention*' --gtest_brief=1 2>&1 | tail -8
echo "=== new attention tests rc ${PIPESTATUS[0]}"
KVQ_TEST_SHAPES=small timeout 120 compute-sanitizer --tool racecheck --error-exitcode 1 build/compare/new/tests/kvq_gpu_tests --gtest_filter='GpuDecodeAttention*' > $OUT/race.log 2>&1
echo "=== racecheck rc $?"; grep -E "SUMMARY|PASSED|FAILED" $OUT/race.log | tail -4
