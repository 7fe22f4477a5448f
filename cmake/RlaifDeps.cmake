# Third-party dependencies: Debian packages (see scripts/setup.sh) and libtorch from the PyPI torch wheel.

# Python that owns torch and the test references: the repo's venv if present, else python3 on PATH.
if(NOT RLAIF_PYTHON)
  if(EXISTS ${CMAKE_SOURCE_DIR}/.venv/bin/python)
    set(RLAIF_PYTHON ${CMAKE_SOURCE_DIR}/.venv/bin/python CACHE FILEPATH "Python with torch")
  else()
    find_program(RLAIF_PYTHON python3 REQUIRED)
  endif()
endif()

if(NOT Torch_DIR)
  execute_process(COMMAND ${RLAIF_PYTHON} -c "import torch;print(torch.utils.cmake_prefix_path)"
                  OUTPUT_VARIABLE _torch_prefix OUTPUT_STRIP_TRAILING_WHITESPACE
                  RESULT_VARIABLE _torch_rc ERROR_QUIET)
  if(NOT _torch_rc EQUAL 0)
    message(FATAL_ERROR "[cmake] cannot import torch with ${RLAIF_PYTHON} (hint: run scripts/setup.sh, "
                        "or pass -DRLAIF_PYTHON=/path/to/python with torch==2.11.0)")
  endif()
  list(APPEND CMAKE_PREFIX_PATH ${_torch_prefix})
endif()
# Only Hopper matters for our CUDA code; keep torch's cmake from adding a dozen architectures.
set(TORCH_CUDA_ARCH_LIST "9.0")
find_package(Torch REQUIRED QUIET)
# torch's config only names the libraries; the rpath lets the binary find them in the wheel.
get_filename_component(RLAIF_TORCH_LIB_DIR ${TORCH_LIBRARY} DIRECTORY)
set(CMAKE_BUILD_RPATH ${RLAIF_TORCH_LIB_DIR})
set(CMAKE_INSTALL_RPATH ${RLAIF_TORCH_LIB_DIR})

# fmt: libtorch's headers ship fmt 12 (torch/include/fmt), which would shadow Debian's fmt 9 in any file that
# also sees torch's include path. One fmt for all: torch's copy, header-only, for torch-free layers too.
get_filename_component(_torch_root ${RLAIF_TORCH_LIB_DIR} DIRECTORY)
file(COPY ${_torch_root}/include/fmt DESTINATION ${CMAKE_BINARY_DIR}/third_party/include)
add_library(rlaif_fmt INTERFACE)
target_include_directories(rlaif_fmt SYSTEM INTERFACE ${CMAKE_BINARY_DIR}/third_party/include)
target_compile_definitions(rlaif_fmt INTERFACE FMT_HEADER_ONLY=1)
add_library(fmt::fmt ALIAS rlaif_fmt)
find_package(nlohmann_json REQUIRED)
find_package(yaml-cpp REQUIRED)
find_package(CLI11 REQUIRED)
find_package(CURL REQUIRED)
find_package(SQLite3 REQUIRED)
find_package(PkgConfig REQUIRED)
pkg_check_modules(PCRE2 REQUIRED IMPORTED_TARGET libpcre2-8)
pkg_check_modules(UTF8PROC REQUIRED IMPORTED_TARGET libutf8proc)
# cpp-httplib: local fake API servers in tests; later `serve`. Found directly: its .pc file drags in brotli's.
find_path(HTTPLIB_INCLUDE_DIR httplib.h REQUIRED)
find_library(HTTPLIB_LIBRARY cpp-httplib REQUIRED)
add_library(rlaif_httplib INTERFACE)
target_include_directories(rlaif_httplib SYSTEM INTERFACE ${HTTPLIB_INCLUDE_DIR})
target_link_libraries(rlaif_httplib INTERFACE ${HTTPLIB_LIBRARY})
find_package(Threads REQUIRED)
if(RLAIF_TESTS)
  find_package(GTest REQUIRED)
endif()
if(RLAIF_BENCH)
  find_package(benchmark REQUIRED)
endif()

# rlaif_layer(NAME dir DEPS ...): a static library of every .cpp (and, with RLAIF_CUDA, .cu) in src/<dir>.
# Globbing lets several people add files to a layer without touching CMake.
function(rlaif_layer name dir)
  cmake_parse_arguments(A "TORCH" "" "DEPS" ${ARGN})
  file(GLOB _srcs CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/src/${dir}/*.cpp)
  if(NOT _srcs)  # a layer not written yet: an empty interface keeps the link graph whole
    add_library(${name} INTERFACE)
    target_include_directories(${name} INTERFACE ${CMAKE_SOURCE_DIR}/src)
    target_link_libraries(${name} INTERFACE ${A_DEPS})
    return()
  endif()
  add_library(${name} STATIC ${_srcs})
  target_include_directories(${name} PUBLIC ${CMAKE_SOURCE_DIR}/src)
  target_link_libraries(${name} PUBLIC ${A_DEPS})
  target_compile_options(${name} PRIVATE -Wall -Wextra -Wno-unused-parameter)
  if(A_TORCH)  # layers that include ATen share one precompiled header
    target_precompile_headers(${name} REUSE_FROM rlaif_pch)
  endif()
endfunction()

# rlaif_pch: owner of the precompiled header (src/pch.h) that torch-facing targets reuse.
function(rlaif_pch_target)
  add_library(rlaif_pch OBJECT ${CMAKE_SOURCE_DIR}/src/pch.cpp)
  target_link_libraries(rlaif_pch PUBLIC ${TORCH_LIBRARIES} fmt::fmt)
  target_precompile_headers(rlaif_pch PRIVATE ${CMAKE_SOURCE_DIR}/src/pch.h)
endfunction()
