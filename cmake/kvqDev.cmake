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
