// bench/ops_float.cu: the kvq host API instantiated for float (see ops.hpp for why one file per dtype).
#include "ops_impl.cuh"

namespace kvq_bench {
cudaError_t launch_float(const Launch& l) { return launch_as<float>(l); }
}  // namespace kvq_bench
