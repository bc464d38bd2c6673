// kvq/detail/scale_rows.cuh: where a kernel finds a scale row (QuantSpec::scale_strides).
//
// Kernels number the scale rows of a call as one flattened axis, batch-major: per token, row
// b * tokens + t; per channel, row b * token_groups + g. ScaleRows turns such a row into its
// offset in the scale array; a row's columns (groups along a token row, or channels) are
// contiguous. Contiguous scales (the default) and any layout whose batches follow each other at
// the row stride are `flat`: one multiply, as before strides existed.
#pragma once

#include <kvq/version.hpp>

#include <kvq/detail/config.cuh>
#include <kvq/types.hpp>

#include <climits>
#include <cstdint>

KVQ_NAMESPACE_BEGIN
namespace detail {

struct ScaleRows {
  std::int64_t batch_stride = 0, row_stride = 0;
  bool flat = true;    // batch_stride == rows * row_stride (or one batch)
  FastDivmod row_div;  // flattened row -> (batch, row), where not flat

  ScaleRows() = default;
  /// For a valid, non-empty view and spec that scale_rows_supported() accepts.
  ScaleRows(const KvView& view, const QuantSpec& spec) {
    const ScaleShape shape = scale_shape(view, spec);
    const ScaleStrides st = scale_strides(view, spec);
    batch_stride = st.batch_stride;
    row_stride = st.row_stride;
    flat = shape.batch == 1 || batch_stride == shape.rows * row_stride;
    if (!flat) row_div = FastDivmod(static_cast<std::uint32_t>(shape.rows));
  }

  /// Offset of column 0 of flattened scale row s. Not flat, s < 2^31 (scale_rows_supported): a
  /// 64-bit division here would be a call in every kernel, with the registers it costs.
  __host__ __device__ std::int64_t base(std::int64_t s) const {
    if (flat) return s * row_stride;
    std::uint32_t b, r;
    row_div.divmod(static_cast<std::uint32_t>(s), b, r);
    return static_cast<std::int64_t>(b) * batch_stride + static_cast<std::int64_t>(r) * row_stride;
  }
};

/// Whether ScaleRows can address the scales of a (valid, non-empty) call: always for contiguous
/// scales and any layout whose batches follow each other at the row stride; otherwise for fewer
/// than 2^31 scale rows in all (batch * rows), the reach of its 32-bit division.
inline bool scale_rows_supported(const KvView& view, const QuantSpec& spec) {
  const ScaleShape shape = scale_shape(view, spec);
  const ScaleStrides st = scale_strides(view, spec);
  const bool flat = shape.batch == 1 || st.batch_stride == shape.rows * st.row_stride;
  return flat || shape.batch * shape.rows <= INT32_MAX;
}

/// Whether the scales are contiguous in scale_shape() (a memset can cover them).
inline bool contiguous_scales(const KvView& view, const QuantSpec& spec) {
  const ScaleShape shape = scale_shape(view, spec);
  const ScaleStrides st = scale_strides(view, spec);
  return st.row_stride == shape.cols && (shape.batch == 1 || st.batch_stride == shape.rows * shape.cols);
}

}  // namespace detail
KVQ_NAMESPACE_END
