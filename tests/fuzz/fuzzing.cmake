# Included by the top-level CMakeLists.txt (inside the tests block) when FP4MOE_BUILD_FUZZERS is on.
# Probes for a clang that links -fsanitize=fuzzer,address; when found, builds tests/fuzz with it via
# ExternalProject and registers the ctest tests `fuzz_safetensors_seeds` (writes both seed corpora),
# `fuzz_safetensors` and `fuzz_checkpoint_config` (label fuzz, each runs for FP4MOE_FUZZ_SECONDS).
# Otherwise says so loudly.
include(ExternalProject)

find_program(FP4MOE_FUZZ_CXX NAMES clang++ clang++-19 clang++-18 clang++-17 clang++-16 clang++-15
             clang++-14 DOC "clang++ used to build the libFuzzer targets")
set(_fuzz_ok FALSE)
set(_fuzz_why "no clang++ found (install the Debian packages clang and libclang-rt-14-dev)")
if(FP4MOE_FUZZ_CXX)
  set(_probe_dir ${CMAKE_CURRENT_BINARY_DIR}/fuzz_probe)
  file(MAKE_DIRECTORY ${_probe_dir})
  file(WRITE ${_probe_dir}/probe.cpp
       "#include <cstdint>\n#include <cstddef>\n"
       "extern \"C\" int LLVMFuzzerTestOneInput(const uint8_t*, size_t) { return 0; }\n")
  execute_process(
    COMMAND ${FP4MOE_FUZZ_CXX} -fsanitize=fuzzer,address,undefined ${_probe_dir}/probe.cpp
            -o ${_probe_dir}/probe
    RESULT_VARIABLE _probe_rc OUTPUT_VARIABLE _probe_out ERROR_VARIABLE _probe_out)
  if(_probe_rc EQUAL 0)
    set(_fuzz_ok TRUE)
  else()
    set(_fuzz_why "${FP4MOE_FUZZ_CXX} cannot link -fsanitize=fuzzer,address (install the Debian "
                  "package libclang-rt-14-dev or the compiler-rt of your clang): ${_probe_out}")
  endif()
endif()

if(NOT _fuzz_ok)
  message(WARNING "fp4moe: the fuzz test (ctest -L fuzz) is NOT registered: ${_fuzz_why}")
  return()
endif()

set(_fuzz_bin ${CMAKE_CURRENT_BINARY_DIR}/fuzz)
ExternalProject_Add(fp4moe_fuzz
  SOURCE_DIR ${CMAKE_CURRENT_SOURCE_DIR}/tests/fuzz
  BINARY_DIR ${_fuzz_bin}
  CMAKE_ARGS -DCMAKE_CXX_COMPILER=${FP4MOE_FUZZ_CXX} -DCMAKE_BUILD_TYPE=RelWithDebInfo
             -Dnlohmann_json_DIR=${nlohmann_json_DIR}
  BUILD_ALWAYS ON
  INSTALL_COMMAND ""
  BUILD_BYPRODUCTS ${_fuzz_bin}/fuzz_safetensors ${_fuzz_bin}/fuzz_checkpoint_config
                   ${_fuzz_bin}/make_safetensors_seeds)

add_test(NAME fuzz_safetensors_seeds
         COMMAND ${_fuzz_bin}/make_safetensors_seeds ${_fuzz_bin}/corpus ${_fuzz_bin}/corpus_config)
set_tests_properties(fuzz_safetensors_seeds PROPERTIES LABELS fuzz
                     FIXTURES_SETUP fuzz_safetensors_corpus)
# New interesting inputs go into the corpus directory; a crash leaves its input under artifacts/.
file(MAKE_DIRECTORY ${_fuzz_bin}/artifacts)
add_test(NAME fuzz_safetensors
         COMMAND ${_fuzz_bin}/fuzz_safetensors -max_total_time=${FP4MOE_FUZZ_SECONDS}
                 -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1
                 -artifact_prefix=${_fuzz_bin}/artifacts/ ${_fuzz_bin}/corpus)
set_tests_properties(fuzz_safetensors PROPERTIES LABELS fuzz
                     FIXTURES_REQUIRED fuzz_safetensors_corpus
                     TIMEOUT 600)
# config.json + hf_quant_config.json + index (see fuzz_checkpoint_config.cpp for the input layout).
add_test(NAME fuzz_checkpoint_config
         COMMAND ${_fuzz_bin}/fuzz_checkpoint_config -max_total_time=${FP4MOE_FUZZ_SECONDS}
                 -rss_limit_mb=2048 -max_len=16384 -timeout=10 -print_final_stats=1
                 -artifact_prefix=${_fuzz_bin}/artifacts/ ${_fuzz_bin}/corpus_config)
set_tests_properties(fuzz_checkpoint_config PROPERTIES LABELS fuzz
                     FIXTURES_REQUIRED fuzz_safetensors_corpus
                     TIMEOUT 600)
message(STATUS "fp4moe: fuzz test registered (${FP4MOE_FUZZ_CXX}, ${FP4MOE_FUZZ_SECONDS} s; "
               "ctest -L fuzz)")
