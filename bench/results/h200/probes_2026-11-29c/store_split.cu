// nvcc does not always keep a 16-byte store whole (bench/results/h200.md, "What changed"): the
// four float4 stores below go to addresses that are all 16-byte aligned when out is, yet nvcc
// 13.0 emits st.global.v4.f32 for three of them and four st.global.f32 for the first (k = 0).
// Compile only, no GPU:
//   nvcc -std=c++17 -arch=sm_90 -O3 -ptx -o - store_split.cu | grep -E "entry|st.global"
__global__ void scale_rows(const float4* __restrict__ x, float s, float* __restrict__ out, long n) {
  const long i = blockIdx.x * 256L + threadIdx.x;
  if (i >= n) return;
  for (int k = 0; k < 4; ++k) {
    const float4 v = x[i + k * n];
    *reinterpret_cast<float4*>(out + 4 * (i + k * n)) = make_float4(v.x * s, v.y * s, v.z * s, v.w * s);
  }
}
