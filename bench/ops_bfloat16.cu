// bench/ops_bfloat16.cu: the kvq host API instantiated for __nv_bfloat16 (see ops.hpp for why one file per dtype).
#include "ops_impl.cuh"

namespace kvq_bench {
cudaError_t launch_bfloat16(const Launch& l) { return launch_as<__nv_bfloat16>(l); }
}  // namespace kvq_bench
