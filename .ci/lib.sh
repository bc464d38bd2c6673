# .ci/lib.sh: sourced by .ci/gpu-compare and .ci/prebuild.
#
# kvq_configure SRC BUILD: the configuration both build kvq_bench and the GPU tests in (Release,
# sm_90, Ninja, benchmarks and tests on, examples off).
kvq_configure() {
  cmake -S "$1" -B "$2" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DKVQ_BUILD_TESTS=ON -DKVQ_BUILD_BENCHMARKS=ON -DKVQ_BUILD_EXAMPLES=OFF >/dev/null
}
