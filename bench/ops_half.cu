// bench/ops_half.cu: the kvq host API instantiated for __half (see ops.hpp for why one file per dtype).
#include "ops_impl.cuh"

namespace kvq_bench {
cudaError_t launch_half(const Launch& l) { return launch_as<__half>(l); }
}  // namespace kvq_bench
