// Few-row projections: the CPU reference equals the ATen math it replaces in the decode step (at::linear with
// bias, `h + linear(x)`, `silu(linear) * linear`), and the CUDA kernels equal the CPU reference, including
// several weights in one launch, a residual aliasing the output, and shapes off the 16-byte path.
#include <gtest/gtest.h>

#include "kernel_test.h"
#include "kernels/cpu/small_linear.h"

using namespace rlaif;

namespace {

at::Tensor rnd(std::vector<int64_t> shape, at::ScalarType dt, double scale = 1.0) {
  return (at::randn(shape) * scale).to(dt);
}

}  // namespace

TEST(SmallLinearKernel, CpuReferenceEqualsAtenLinear) {
  SCOPED_TRACE(test::seed_fresh());
  for (at::ScalarType dt : test::activation_dtypes()) {
    for (int64_t n : {1, 3, 8}) {
      SCOPED_TRACE(fmt::format("{} N={}", c10::toString(dt), n));
      const int64_t K = 100;
      const at::Tensor x = rnd({n, K}, dt), wq = rnd({24, K}, dt, 0.1), wk = rnd({8, K}, dt, 0.1),
                       bq = rnd({24}, dt), bk = rnd({8}, dt);
      at::Tensor q = at::empty({n, 24}, x.options()), k = at::empty({n, 8}, x.options());
      test::poison(q);
      test::poison(k);
      kernels::small_linear_cpu(x, {wq, wk}, {bq, at::Tensor()}, at::Tensor(), {q, k});
      EXPECT_LE(test::rel_err(q, at::linear(x, wq, bq)), test::tolerance(dt)) << "with bias";
      EXPECT_LE(test::rel_err(k, at::linear(x, wk)), test::tolerance(dt)) << "without bias";

      const at::Tensor h = rnd({n, 24}, dt), expected = h + at::linear(x, wq);
      kernels::small_linear_cpu(x, {wq}, {at::Tensor()}, h, {h});  // in place, as the decode step adds to h
      EXPECT_LE(test::rel_err(h, expected), test::tolerance(dt)) << "residual";

      const at::Tensor wg = rnd({16, K}, dt, 0.3), wu = rnd({16, K}, dt, 0.3);
      at::Tensor act = at::empty({n, 16}, x.options());
      test::poison(act);
      kernels::small_linear_silu_mul_cpu(x, wg, wu, act);
      EXPECT_LE(test::rel_err(act, at::silu(at::linear(x, wg)) * at::linear(x, wu)), test::tolerance(dt)) << "swiglu";
    }
  }
}

TEST(SmallLinearKernel, CudaEqualsCpuReference) {
  RLAIF_REQUIRE_CUDA_KERNELS();
  SCOPED_TRACE(test::seed_fresh());
  struct Shape {
    int64_t K, O1, O2, O3;
  };
  // Qwen2.5-3B and -0.5B q/k/v, a down projection's K, and K = 100 (not a multiple of 8: the scalar path).
  for (Shape sh : {Shape{2048, 2048, 256, 256}, Shape{896, 896, 128, 128}, Shape{11008, 64, 0, 0}, Shape{100, 40, 8, 8}}) {
    for (at::ScalarType dt : test::activation_dtypes()) {
      for (int64_t n = 1; n <= kernels::kSmallLinearMaxRows; n += n < 4 ? 1 : 4) {
        SCOPED_TRACE(fmt::format("{} N={} K={}", c10::toString(dt), n, sh.K));
        std::vector<at::Tensor> w, b, ref, out;
        for (int64_t o : {sh.O1, sh.O2, sh.O3}) {
          if (o == 0) continue;
          w.push_back(rnd({o, sh.K}, dt, 0.05));
          b.push_back(w.size() == 2 ? at::Tensor() : rnd({o}, dt));
          ref.push_back(at::empty({n, o}, w.back().options()));
        }
        const at::Tensor x = rnd({n, sh.K}, dt);
        kernels::small_linear_cpu(x, w, b, at::Tensor(), ref);
        std::vector<at::Tensor> wc, bc;
        for (size_t i = 0; i < w.size(); ++i) {
          wc.push_back(w[i].cuda());
          bc.push_back(b[i].defined() ? b[i].cuda() : at::Tensor());
          out.push_back(at::empty_like(ref[i]).cuda());
          test::poison(out.back());
        }
        const at::Tensor xc = x.cuda();
        kernels::small_linear(xc, wc, bc, at::Tensor(), out);
        for (size_t i = 0; i < w.size(); ++i) EXPECT_LE(test::rel_err(out[i], ref[i]), test::tolerance(dt)) << "weight " << i;

        const at::Tensor h = rnd({n, sh.O1}, dt);
        at::Tensor href = h.clone();
        kernels::small_linear_cpu(x, {w[0]}, {b[0]}, href, {href});
        at::Tensor hc = h.cuda();
        kernels::small_linear(xc, {wc[0]}, {bc[0]}, hc, {hc});
        EXPECT_LE(test::rel_err(hc, href), test::tolerance(dt)) << "residual in place";

        const at::Tensor wu = rnd({sh.O1, sh.K}, dt, 0.05);
        at::Tensor act_ref = at::empty({n, sh.O1}, x.options()), act = at::empty({n, sh.O1}, xc.options());
        kernels::small_linear_silu_mul_cpu(x, w[0], wu, act_ref);
        test::poison(act);
        kernels::small_linear_silu_mul(xc, wc[0], wu.cuda(), act);
        EXPECT_LE(test::rel_err(act, act_ref), test::tolerance(dt)) << "swiglu";
      }
    }
  }
}
