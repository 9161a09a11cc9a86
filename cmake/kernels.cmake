# stmux_embed_kernel(<header> <source.cu> <symbol> [DEPENDS files...])
# Compiles <source.cu> to a fat binary (PTX for compute 7.5, the oldest CUDA
# 13 supports, so that any newer GPU can JIT it; SASS for Ampere and Hopper)
# and writes ${CMAKE_CURRENT_BINARY_DIR}/generated/<header>, a header holding
# its bytes as <symbol> (cmake/embed.cmake). The code that includes it loads
# the kernels at run time (the driver's cuModuleLoadData or the runtime's
# cudaLibraryLoadData), so no target needs CUDA as a language.
function(stmux_embed_kernel header source symbol)
  cmake_parse_arguments(PARSE_ARGV 3 arg "" "" "DEPENDS")
  get_filename_component(stem ${source} NAME_WE)
  set(fatbin ${CMAKE_CURRENT_BINARY_DIR}/${stem}.fatbin)
  add_custom_command(
    OUTPUT ${fatbin}
    COMMAND ${CUDAToolkit_NVCC_EXECUTABLE} -fatbin -O3 -std=c++17 -I${PROJECT_SOURCE_DIR}
            -I${PROJECT_SOURCE_DIR}/include
            -gencode arch=compute_75,code=compute_75 -gencode arch=compute_80,code=sm_80
            -gencode arch=compute_90,code=sm_90 -o ${fatbin} ${CMAKE_CURRENT_SOURCE_DIR}/${source}
    DEPENDS ${source} ${arg_DEPENDS}
    COMMENT "Compiling ${source} to a fat binary")
  add_custom_command(
    OUTPUT ${CMAKE_CURRENT_BINARY_DIR}/generated/${header}
    COMMAND ${CMAKE_COMMAND} -DINPUT=${fatbin} -DOUTPUT=${CMAKE_CURRENT_BINARY_DIR}/generated/${header}
            -DNAME=${symbol} -P ${PROJECT_SOURCE_DIR}/cmake/embed.cmake
    DEPENDS ${fatbin} ${PROJECT_SOURCE_DIR}/cmake/embed.cmake
    COMMENT "Embedding ${source}")
endfunction()
