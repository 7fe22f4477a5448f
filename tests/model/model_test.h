// Helpers shared by the model-label tests: which device they run on (RLAIF_TEST_DEVICE=cuda on the GPU machine,
// see scripts/device.sh) and the tiny reference models tests/reference/make_tiny_models.py writes.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <string>

namespace rlaif::test {

inline at::Device test_device() {
  const char* d = std::getenv("RLAIF_TEST_DEVICE");
  return d && std::string(d) == "cuda" ? at::Device(at::kCUDA) : at::Device(at::kCPU);
}

inline constexpr const char* kTinyModels[] = {"qwen2_untied", "qwen2_tied_sharded", "llama3_gqa", "llama_bias_tied"};

}  // namespace rlaif::test
