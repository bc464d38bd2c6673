// tests/fast_math/every_kernel.cu: one translation unit that instantiates every kernel of kvq
// (every operation, dtype and variant of the host API, the paged cache and decode attention, and
// the device blocks of device.cuh), so
// that its PTX can be compared as built with and without --use_fast_math (CMakeLists.txt here).
// It is compiled to PTX only, never linked or run.
#include <kvq/kvq.cuh>

namespace {

template <class T>
cudaError_t every_op(const T* x, std::int8_t* q, float* scales, T* y, const kvq::KvView& view, const kvq::QuantSpec& spec,
                     kvq::Variant variant, cudaStream_t stream) {
  cudaError_t err = kvq::compute_scales(x, view, spec, scales, variant, stream);
  if (err == cudaSuccess) err = kvq::quantize(x, view, spec, q, scales, variant, stream);
  if (err == cudaSuccess) err = kvq::quantize_with_scales(x, scales, view, spec, q, variant, stream);
  if (err == cudaSuccess) err = kvq::dequantize(q, scales, view, spec, y, variant, stream);
  return err;
}

}  // namespace

// External linkage: the name of a kernel in an anonymous namespace carries a hash of the compile
// flags, which would make the two PTX files differ in names alone.
namespace kvq_fast_math_check {

template <class T>
__global__ void device_blocks(const T* x, std::int8_t* q, float* scales, T* y, std::int64_t n) {
  namespace dev = kvq::device;
  const float scale = dev::quantize_row_warp(x, n, q, scales);
  dev::dequantize_row_warp(q, n, scale, y);
  const auto f = dev::load<16 / sizeof(T)>(x);
  dev::store(q + 32, dev::quantize(f, scale));
  dev::store(y + 32, dev::dequantize<T>(dev::load<16 / sizeof(T)>(q + 32), scale));
  scales[1] = dev::warp_amax(scale);
  dev::quantize_row(dev::RowLanes<8>::this_thread(), x + 64, n, q + 64, scales + 2);
  dev::dequantize_row(dev::RowLanes<16>::this_thread(), q + 64, n, scale, y + 64);
}

}  // namespace kvq_fast_math_check

/// The paged cache's and decode attention's kernels (both schemes: the scheme is a run-time field).
template <class T>
cudaError_t paged_ops(const T* x, T* y, const kvq::PagedCache& cache, const kvq::SequenceTable& seqs,
                      const std::int64_t* slots, const kvq::TokenPositions& positions, const kvq::DecodePlan& plan,
                      void* workspace, cudaStream_t stream) {
  const kvq::TokenRows rows = kvq::dense_rows(4, cache.kv_heads, cache.head_dim);
  cudaError_t err = kvq::append_kv(x, x, rows, slots, positions, cache, nullptr, stream);
  if (err == cudaSuccess) err = kvq::gather_kv(cache, seqs, y, y + 1024, rows, nullptr, stream);
  const kvq::QueryRows q = kvq::dense_queries(1, cache.kv_heads, cache.head_dim);
  if (err == cudaSuccess)
    err = kvq::decode_attention(x, q, cache, seqs, 1.0f, y, q, nullptr, plan, workspace, plan.workspace_bytes, nullptr,
                                stream);
  return err;
}

template <class T>
cudaError_t instantiate(const T* x, std::int8_t* q, float* scales, T* y, const kvq::KvView& view,
                        const kvq::QuantSpec& spec, kvq::Variant variant, cudaStream_t stream) {
  kvq_fast_math_check::device_blocks<<<1, 32, 0, stream>>>(x, q, scales, y, view.channels);
  const cudaError_t err = every_op(x, q, scales, y, view, spec, variant, stream);
  return err != cudaSuccess ? err
                            : paged_ops(x, y, kvq::PagedCache{}, kvq::SequenceTable{}, nullptr, kvq::TokenPositions{},
                                        kvq::DecodePlan{}, nullptr, stream);
}

template cudaError_t instantiate(const float*, std::int8_t*, float*, float*, const kvq::KvView&, const kvq::QuantSpec&,
                                 kvq::Variant, cudaStream_t);
template cudaError_t instantiate(const __half*, std::int8_t*, float*, __half*, const kvq::KvView&,
                                 const kvq::QuantSpec&, kvq::Variant, cudaStream_t);
template cudaError_t instantiate(const __nv_bfloat16*, std::int8_t*, float*, __nv_bfloat16*, const kvq::KvView&,
                                 const kvq::QuantSpec&, kvq::Variant, cudaStream_t);
