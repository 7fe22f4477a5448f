// RMSNorm kernels: the CPU reference equals models/layers.h rms_norm (the model's numerics), and the CUDA kernel
// equals the CPU reference on fresh random inputs, fused residual add included.
#include <gtest/gtest.h>

#include "kernel_test.h"
#include "kernels/cpu/rms_norm.h"
#include "models/layers.h"

using namespace rlaif;

namespace {

constexpr double kEps = 1e-6;

// Random rows with a non-zero mean and a spread of scales (not unit-normal only).
at::Tensor rows(int64_t n, int64_t d, at::ScalarType dt) {
  return (at::randn({n, d}) * 3 + 0.5).to(dt);
}

}  // namespace

TEST(RmsNormKernel, CpuReferenceEqualsLayersRmsNorm) {
  SCOPED_TRACE(test::seed_fresh());
  for (at::ScalarType dt : test::activation_dtypes()) {
    for (int64_t d : {64, 67, 2048}) {
      const at::Tensor x = rows(5, d, dt), w = at::randn({d}).to(dt);
      at::Tensor out = at::empty_like(x);
      test::poison(out);
      kernels::rms_norm_cpu(x, w, kEps, out);
      EXPECT_LE(test::rel_err(out, layers::rms_norm(x, w, kEps)), test::tolerance(dt)) << c10::toString(dt) << " D=" << d;
      EXPECT_TRUE(kernels::rms_norm(x, w, kEps).equal(out)) << "the dispatcher runs the CPU reference on CPU tensors";
    }
  }
}

TEST(RmsNormKernel, CpuAddRmsNormEqualsResidualAddThenNorm) {
  SCOPED_TRACE(test::seed_fresh());
  for (at::ScalarType dt : test::activation_dtypes()) {
    const at::Tensor h = rows(4, 96, dt), delta = rows(4, 96, dt), w = at::randn({96}).to(dt);
    const at::Tensor h_ref = h + delta;
    at::Tensor h_io = h.clone(), out = at::empty_like(h);
    test::poison(out);
    kernels::add_rms_norm_cpu(h_io, delta, w, kEps, out);
    EXPECT_TRUE(h_io.equal(h_ref)) << "h + delta is rounded once, as ATen's add";
    EXPECT_LE(test::rel_err(out, layers::rms_norm(h_ref, w, kEps)), test::tolerance(dt)) << c10::toString(dt);
  }
}

TEST(RmsNormKernel, CudaEqualsCpuReference) {
  RLAIF_REQUIRE_CUDA_KERNELS();
  SCOPED_TRACE(test::seed_fresh());
  for (at::ScalarType dt : test::activation_dtypes()) {
    for (int64_t n : {1, 16, 64}) {
      for (int64_t d : {2048, 64, 67, 3584}) {  // 67: the scalar path; 3584: Qwen2.5-7B
        SCOPED_TRACE(fmt::format("{} N={} D={}", c10::toString(dt), n, d));
        const at::Tensor x = rows(n, d, dt), w = at::randn({d}).to(dt), delta = rows(n, d, dt);
        at::Tensor ref = at::empty_like(x), out = at::empty_like(x, at::kCUDA);
        kernels::rms_norm_cpu(x, w, kEps, ref);
        test::poison(out);
        kernels::rms_norm(x.cuda(), w.cuda(), kEps, out);
        EXPECT_LE(test::rel_err(out, ref), test::tolerance(dt));

        at::Tensor h_ref = x.clone(), h = x.cuda();
        kernels::add_rms_norm_cpu(h_ref, delta, w, kEps, ref);
        test::poison(out);
        kernels::add_rms_norm(h, delta.cuda(), w.cuda(), kEps, out);
        EXPECT_TRUE(h.cpu().equal(h_ref)) << "residual sum";
        EXPECT_LE(test::rel_err(out, ref), test::tolerance(dt));
      }
    }
  }
}
