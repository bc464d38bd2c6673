# tests/consumer_check.cmake: does an engine's CMake project get kvq both supported ways?
#
#   cmake -DKVQ_BUILD_DIR=<kvq build tree> -DKVQ_SOURCE_DIR=<kvq source> -DKVQ_WORK_DIR=<scratch>
#         [-DKVQ_CONFIG=Release] [-DKVQ_GENERATOR=Ninja] [-DKVQ_CXX_COMPILER=g++] [-DKVQ_CUDA_ROOT=/usr/local/cuda]
#         [-DKVQ_CUDA_COMPILER=nvcc -DKVQ_CUDA_ARCHITECTURES=80|90]
#         -P consumer_check.cmake
#
# 1. cmake --install <kvq build tree> --prefix <scratch>/prefix
# 2. examples/consumer with find_package(kvq CONFIG REQUIRED) against that prefix: configure, build, run.
# 3. examples/consumer with add_subdirectory(<kvq source>): configure, build, run.
# Each build makes two programs, the C++ one (must print "kvq consumer OK") and the CUDA one (must
# print "kvq consumer CUDA OK"; it runs without a GPU too). Any failure stops with a non-zero exit.
cmake_minimum_required(VERSION 3.25)

foreach(var KVQ_BUILD_DIR KVQ_SOURCE_DIR KVQ_WORK_DIR)
  if(NOT ${var})
    message(FATAL_ERROR "consumer_check.cmake: -D${var}=... is required")
  endif()
endforeach()

set(consumer_src "${KVQ_SOURCE_DIR}/examples/consumer")
set(prefix "${KVQ_WORK_DIR}/prefix")
file(REMOVE_RECURSE "${KVQ_WORK_DIR}")

# Runs a command, echoing it; stops the script with its output when it fails.
function(run_step what)
  message(STATUS "consumer check: ${what}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "consumer check: ${what} failed (${rc}):\n${ARGN}\n${out}")
  endif()
  set(step_output "${out}" PARENT_SCOPE)
endfunction()

# Options passed to every configure of the consumer: same generator, compiler and CUDA toolkit
# as the kvq build, so the check does not depend on what happens to be first in PATH.
set(common_args -DCMAKE_BUILD_TYPE=Release)
if(KVQ_GENERATOR)
  list(APPEND common_args -G "${KVQ_GENERATOR}")
endif()
if(KVQ_CXX_COMPILER)
  list(APPEND common_args "-DCMAKE_CXX_COMPILER=${KVQ_CXX_COMPILER}")
endif()
if(KVQ_CUDA_ROOT)
  list(APPEND common_args "-DCUDAToolkit_ROOT=${KVQ_CUDA_ROOT}")
endif()
if(KVQ_CUDA_COMPILER)
  list(APPEND common_args "-DCMAKE_CUDA_COMPILER=${KVQ_CUDA_COMPILER}")
endif()
if(KVQ_CUDA_ARCHITECTURES)  # a list, passed with | for ; (a -D value cannot hold a CMake list here)
  string(REPLACE "|" ";" archs "${KVQ_CUDA_ARCHITECTURES}")
  file(WRITE "${KVQ_WORK_DIR}/cuda_init.cmake" "set(CMAKE_CUDA_ARCHITECTURES \"${archs}\" CACHE STRING \"\")\n")
  list(APPEND common_args -C "${KVQ_WORK_DIR}/cuda_init.cmake")
endif()
set(config_args)
if(KVQ_CONFIG)
  set(config_args --config "${KVQ_CONFIG}")
endif()

run_step("install kvq to ${prefix}" "${CMAKE_COMMAND}" --install "${KVQ_BUILD_DIR}" --prefix "${prefix}" ${config_args})
foreach(f include/kvq/types.hpp include/kvq/numerics.hpp include/kvq/reference.hpp)
  if(NOT EXISTS "${prefix}/${f}")
    message(FATAL_ERROR "consumer check: ${f} was not installed")
  endif()
endforeach()
file(GLOB_RECURSE config_files "${prefix}/*/kvqConfig.cmake" "${prefix}/*/kvqConfigVersion.cmake")
list(LENGTH config_files n)
if(NOT n EQUAL 2)
  message(FATAL_ERROR "consumer check: expected kvqConfig.cmake and kvqConfigVersion.cmake, found: ${config_files}")
endif()

# Builds and runs the consumer in <scratch>/<name> with extra configure arguments.
function(check_consumer name)
  set(bin "${KVQ_WORK_DIR}/${name}")
  run_step("${name}: configure" "${CMAKE_COMMAND}" -S "${consumer_src}" -B "${bin}" ${common_args} ${ARGN})
  run_step("${name}: build" "${CMAKE_COMMAND}" --build "${bin}" ${config_args})
  foreach(program kvq_consumer kvq_consumer_cuda)
    set(exe "${bin}/${program}")
    if(KVQ_CONFIG AND EXISTS "${bin}/${KVQ_CONFIG}/${program}")  # multi-config generators
      set(exe "${bin}/${KVQ_CONFIG}/${program}")
    endif()
    run_step("${name}: run ${program}" "${exe}")
    set(ok "kvq consumer OK")
    if(program STREQUAL "kvq_consumer_cuda")
      set(ok "kvq consumer CUDA OK")
    endif()
    if(NOT step_output MATCHES "${ok}")
      message(FATAL_ERROR "consumer check: ${name} ${program} printed no OK:\n${step_output}")
    endif()
    message(STATUS "consumer check: ${name}: ${step_output}")
  endforeach()
endfunction()

check_consumer(find_package "-DCMAKE_PREFIX_PATH=${prefix}")
# It must have found the package just installed, not another copy.
file(STRINGS "${KVQ_WORK_DIR}/find_package/CMakeCache.txt" kvq_dir REGEX "^kvq_DIR:")
string(FIND "${kvq_dir}" "${prefix}/" at)
if(NOT at GREATER -1)
  message(FATAL_ERROR "consumer check: find_package(kvq) used ${kvq_dir}, not ${prefix}")
endif()
check_consumer(add_subdirectory -DKVQ_CONSUMER_USE_SUBDIRECTORY=ON "-DKVQ_SOURCE_DIR=${KVQ_SOURCE_DIR}")

message(STATUS "consumer check passed")
