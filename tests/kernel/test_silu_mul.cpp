// silu(gate) * up: the CPU reference equals ATen's at::silu(gate) * up (models/layers.h swiglu), and the CUDA
// kernel equals the CPU reference for a fused [N, 2F] projection's halves and for separate tensors.
#include <gtest/gtest.h>

#include "kernel_test.h"
#include "kernels/cpu/silu_mul.h"

using namespace rlaif;

TEST(SiluMulKernel, CpuReferenceEqualsAtenSiluTimesUp) {
  SCOPED_TRACE(test::seed_fresh());
  for (at::ScalarType dt : test::activation_dtypes()) {
    const at::Tensor gate_up = (at::randn({6, 2 * 100}) * 4).to(dt);
    const at::Tensor g = gate_up.narrow(1, 0, 100), u = gate_up.narrow(1, 100, 100);
    at::Tensor out = at::empty({6, 100}, gate_up.options());
    test::poison(out);
    kernels::silu_mul_cpu(g, u, out);
    EXPECT_LE(test::rel_err(out, at::silu(g) * u), test::tolerance(dt)) << c10::toString(dt);
    EXPECT_TRUE(kernels::silu_mul(gate_up).equal(out)) << "the fused-input form splits gate | up";
  }
}

TEST(SiluMulKernel, CudaEqualsCpuReference) {
  RLAIF_REQUIRE_CUDA_KERNELS();
  SCOPED_TRACE(test::seed_fresh());
  for (at::ScalarType dt : test::activation_dtypes()) {
    for (int64_t n : {1, 7, 64}) {
      for (int64_t f : {11008, 1000, 13}) {  // 11008: Qwen2.5-3B; 1000 and 13: unaligned halves, the scalar path
        SCOPED_TRACE(fmt::format("{} N={} F={}", c10::toString(dt), n, f));
        const at::Tensor gate_up = (at::randn({n, 2 * f}) * 4).to(dt);
        at::Tensor ref = at::empty({n, f}, gate_up.options());
        kernels::silu_mul_cpu(gate_up.narrow(1, 0, f), gate_up.narrow(1, f, f), ref);
        const at::Tensor gu = gate_up.cuda();
        at::Tensor out = at::empty({n, f}, gu.options());
        test::poison(out);
        kernels::silu_mul(gu.narrow(1, 0, f), gu.narrow(1, f, f), out);
        EXPECT_LE(test::rel_err(out, ref), test::tolerance(dt)) << "halves of one tensor";
        test::poison(out);
        kernels::silu_mul(gu.narrow(1, 0, f).contiguous(), gu.narrow(1, f, f).contiguous(), out);
        EXPECT_LE(test::rel_err(out, ref), test::tolerance(dt)) << "two tensors";
      }
    }
  }
}
