// kvq/kvq.cuh: the whole public API of kvq.
//
//   types.hpp      KvView, QuantSpec, Granularity, Variant, scale_shape(), validate()
//   numerics.hpp   the numeric contract (scale rule, rounding, saturation, NaN/Inf)
//   quantize.cuh   host API: compute_scales, quantize, quantize_with_scales, dequantize
//   study.cuh      the same with a Variant: the paper's strategies, for benchmarks and studies
//   device.cuh     device-side building blocks for engines' own kernels
//   paged.hpp      the paged cache: PagedCache, PageStrides, TokenRows, SequenceTable, validation
//   paged.cuh      append_kv, gather_kv on the paged cache
//   attention.hpp  decode attention's shapes, plan and validation
//   attention.cuh  decode_attention over the paged cache
//   reference.hpp  CPU reference of every operation
//   metrics.hpp    error metrics
#pragma once

#include <kvq/attention.cuh>
#include <kvq/device.cuh>
#include <kvq/metrics.hpp>
#include <kvq/numerics.hpp>
#include <kvq/paged.cuh>
#include <kvq/quantize.cuh>
#include <kvq/reference.hpp>
#include <kvq/study.cuh>
#include <kvq/types.hpp>
#include <kvq/version.hpp>
