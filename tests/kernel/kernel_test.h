// Helpers shared by the kernel parity tests: fresh random inputs, poisoned outputs, the relative error, and the
// CUDA gate: skip without a device or in a CPU-only build, fail when a CUDA build lost its kernels at link time.
#pragma once

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <random>
#include <sstream>

#include "kernels/cpu/quant.h"
#include "kernels/cpu/quant_small_linear.h"
#include "kernels/cpu/registry.h"
#include "test_util.h"

namespace rlaif::test {

// A new seed every run (inputs must differ between runs); tests print it with SCOPED_TRACE for replay.
inline uint64_t seed_fresh() {
  std::random_device rd;
  // RLAIF_TEST_SEED replays a failure: the traces print the seed a run used.
  const char* fixed = std::getenv("RLAIF_TEST_SEED");
  const uint64_t seed = fixed ? std::strtoull(fixed, nullptr, 10) : (static_cast<uint64_t>(rd()) << 32) | rd();
  at::manual_seed(seed);
  return seed;
}

// ‖out − ref‖ / ‖ref‖ in float64 on the CPU; infinity when anything is NaN/inf (an unwritten, poisoned element).
inline double rel_err(const at::Tensor& out, const at::Tensor& ref) {
  const at::Tensor o = out.cpu().to(at::kDouble), r = ref.cpu().to(at::kDouble);
  const double num = (o - r).norm().item<double>(), den = r.norm().item<double>();
  if (!std::isfinite(num)) return std::numeric_limits<double>::infinity();
  if (den == 0) return num == 0 ? 0.0 : std::numeric_limits<double>::infinity();  // an all-zero reference: exact
  return num / den;
}

// NaN everywhere, so an element a kernel fails to write fails the comparison.
inline void poison(const at::Tensor& t) { t.fill_(std::numeric_limits<double>::quiet_NaN()); }

// float32: the kernels and references evaluate the same formula in float32, differing only in summation order
// (and cosf/expf ulps): ~1e-7 relative. bfloat16: an order difference of 1 float32 ulp can flip the final (or an
// intermediate) rounding to bfloat16, i.e. 2^-8 relative on that element; a few such flips and the rounding of
// the inputs of later steps stay far below 1e-2, while any indexing or formula error lands near 1.
inline double tolerance(at::ScalarType dt) { return dt == at::kFloat ? 1e-5 : 1e-2; }

// Whether this build directory was configured with RLAIF_CUDA=ON (read from its CMakeCache.txt: no #ifdef).
inline bool built_with_cuda() {
  std::ifstream in(binary_dir() / "CMakeCache.txt");
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str().find("RLAIF_CUDA:BOOL=ON") != std::string::npos;
}

inline std::vector<at::ScalarType> activation_dtypes() { return {at::kFloat, at::kBFloat16}; }

// w [O, K] quantized by the CPU reference into MLX's packed form (words, scales, biases in scale_dtype).
inline kernels::QuantMatrix quantize_cpu(const at::Tensor& w, int64_t bits, int64_t group, at::ScalarType scale_dtype) {
  const int64_t O = w.size(0), K = w.size(1);
  kernels::QuantMatrix q{at::empty({O, K * bits / 32}, at::kInt), at::empty({O, K / group}, scale_dtype),
                         at::empty({O, K / group}, scale_dtype), bits, group};
  kernels::quantize_affine_cpu(w, bits, group, q.wq, q.scales, q.biases);
  return q;
}

}  // namespace rlaif::test

// In a test body: returns (skipped) unless a CUDA device and this build's CUDA kernels are both there.
#define RLAIF_REQUIRE_CUDA_KERNELS()                                                                         \
  do {                                                                                                       \
    if (!::rlaif::kernels::cuda_kernels_available()) {                                                       \
      if (::rlaif::test::built_with_cuda())                                                                  \
        FAIL() << "RLAIF_CUDA=ON build without its CUDA kernels: rlaif_register_cuda_kernels was not linked " \
                  "(docs/KERNELS.md, Linking)";                                                              \
      GTEST_SKIP() << "built without RLAIF_CUDA";                                                            \
    }                                                                                                        \
    if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";                                                    \
  } while (0)
