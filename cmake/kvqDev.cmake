# Settings shared by kvq's own tests, benchmark and examples (never applied to consumers).

# kvq_dev_flags(target): warnings, and the numeric contract's requirement of no fast math.
function(kvq_dev_flags target)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra>
    $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall,-Wextra -lineinfo>)
  target_link_libraries(${target} PRIVATE kvq::kvq)
  if(OpenMP_CXX_FOUND)
    target_compile_options(${target} PRIVATE
      $<$<COMPILE_LANGUAGE:CXX>:${OpenMP_CXX_FLAGS}> $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=${OpenMP_CXX_FLAGS}>)
    target_link_libraries(${target} PRIVATE OpenMP::OpenMP_CXX)
  endif()
endfunction()

find_package(OpenMP COMPONENTS CXX)

# Parallel builds: the presets use Ninja without a job count, so a build runs as many jobs as the
# machine has cores (ninja's default, cores + 2, capped here). Compiles also take a slot of the
# kvq_compile pool, one per core and at most one per 1.5 GiB of memory: nvcc peaks below 0.5 GiB
# on kvq's largest translation units (every kernel instantiated), so the cap only binds on machines
# with far less memory than cores, and 2-core CI machines build two at a time.
if(CMAKE_GENERATOR MATCHES "Ninja" AND NOT DEFINED CMAKE_JOB_POOL_COMPILE)
  cmake_host_system_information(RESULT _kvq_cores QUERY NUMBER_OF_LOGICAL_CORES)
  cmake_host_system_information(RESULT _kvq_mem_mib QUERY TOTAL_PHYSICAL_MEMORY)
  math(EXPR _kvq_jobs "${_kvq_mem_mib} * 2 / 3072")
  if(_kvq_jobs GREATER _kvq_cores)
    set(_kvq_jobs ${_kvq_cores})
  endif()
  if(_kvq_jobs LESS 1)
    set(_kvq_jobs 1)
  endif()
  set_property(GLOBAL APPEND PROPERTY JOB_POOLS kvq_compile=${_kvq_jobs})
  set(CMAKE_JOB_POOL_COMPILE kvq_compile)
  message(STATUS "kvq: up to ${_kvq_jobs} compile jobs (${_kvq_cores} cores, ${_kvq_mem_mib} MiB)")
endif()
