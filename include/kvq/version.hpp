// kvq/version.hpp: the library's version, and the namespace every declaration of kvq lives in.
//
// Everything kvq declares (the host API, the device blocks, the CPU reference, the details) is in
// the inline namespace kvq::v<major>_<minor>. Callers write kvq::quantize; the linker sees
// kvq::v0_1::quantize. Two libraries of one process that include different kvq versions thus get
// different symbols, instead of one silently taking the other's template instantiations (as CUB
// and Thrust do with their versioned namespaces).
#pragma once

#define KVQ_VERSION_MAJOR 0
#define KVQ_VERSION_MINOR 1
#define KVQ_VERSION_PATCH 0

/// Opens and closes namespace kvq and its versioned inline namespace.
#define KVQ_NAMESPACE_BEGIN \
  namespace kvq {           \
  inline namespace v0_1 {
#define KVQ_NAMESPACE_END \
  } /* namespace v0_1 */  \
  } /* namespace kvq */
