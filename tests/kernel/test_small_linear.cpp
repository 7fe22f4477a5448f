// Few-row projections: the CPU reference equals the ATen math it replaces in the decode step (at::linear with
// bias, `h + linear(x)`, `silu(linear) * linear`), and the CUDA kernels equal the CPU reference, including
// several weights in one launch, a residual aliasing the output, and shapes off the 16-byte path.
#include <gtest/gtest.h>

#include "kernel_test.h"
#include "kernels/cpu/small_linear.h"
#include "models/layers.h"

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

// Both CUDA GEMVs (kernels/cpu/registry.h FewRowKernel) against the CPU reference.
TEST(SmallLinearKernel, CudaEqualsCpuReference) {
  RLAIF_REQUIRE_CUDA_KERNELS();
  SCOPED_TRACE(test::seed_fresh());
  for (kernels::FewRowKernel kernel : {kernels::FewRowKernel::kStaged, kernels::FewRowKernel::kStreaming}) {
    kernels::set_few_row_kernel(kernel);
    SCOPED_TRACE(kernel == kernels::FewRowKernel::kStaged ? "staged" : "streaming");
    struct Shape {
      int64_t K, O1, O2, O3;
    };
    // Qwen2.5-3B and -0.5B q/k/v, the 3B and 0.5B down projections' K (rows split over 8 and 4 warps, the last
    // vector round partial), K = 20000 (more than one round per warp) and K = 100 (not a multiple of 8: the scalar
    // path).
    for (Shape sh : {Shape{2048, 2048, 256, 256}, Shape{896, 896, 128, 128}, Shape{11008, 64, 0, 0},
                     Shape{4864, 96, 0, 0}, Shape{20000, 16, 0, 0}, Shape{100, 40, 8, 8}}) {
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
  kernels::set_few_row_kernel(kernels::FewRowKernel::kStaged);
}

// The input's RMSNorm fused in: the CPU reference equals transformers' norm (models/layers.h) then at::linear, and
// the CUDA kernels (every block normalising the rows into shared memory, block 0 writing them out) equal it.
TEST(SmallLinearKernel, FusedInputNormEqualsNormThenLinear) {
  SCOPED_TRACE(test::seed_fresh());
  const double eps = 1e-6;
  for (at::ScalarType dt : test::activation_dtypes()) {
    for (int64_t K : {int64_t{2048}, int64_t{896}, int64_t{100}}) {
      for (int64_t n : {1, 3, 8}) {
        SCOPED_TRACE(fmt::format("{} N={} K={}", c10::toString(dt), n, K));
        const at::Tensor h = rnd({n, K}, dt, 3.0), nw = (1.0 + at::randn({K}) * 0.1).to(dt);
        const at::Tensor wq = rnd({40, K}, dt, 0.05), wk = rnd({8, K}, dt, 0.05), bq = rnd({40}, dt);
        const at::Tensor wg = rnd({24, K}, dt, 0.05), wu = rnd({24, K}, dt, 0.05);
        const at::Tensor xn = layers::rms_norm(h, nw, eps);
        at::Tensor q = at::empty({n, 40}, h.options()), k = at::empty({n, 8}, h.options()), normed = at::empty_like(h);
        test::poison(normed);
        kernels::small_linear_cpu(h, {wq, wk}, {bq, at::Tensor()}, at::Tensor(), {q, k}, {nw, eps, normed});
        EXPECT_LE(test::rel_err(normed, xn), test::tolerance(dt)) << "normed rows";
        EXPECT_LE(test::rel_err(q, at::linear(xn, wq, bq)), test::tolerance(dt)) << "q";
        EXPECT_LE(test::rel_err(k, at::linear(xn, wk)), test::tolerance(dt)) << "k";
        at::Tensor act = at::empty({n, 24}, h.options());
        kernels::small_linear_silu_mul_cpu(h, wg, wu, act, {nw, eps, at::Tensor()});
        EXPECT_LE(test::rel_err(act, at::silu(at::linear(xn, wg)) * at::linear(xn, wu)), test::tolerance(dt))
            << "swiglu";
        if (!kernels::cuda_kernels_available() || !at::hasCUDA()) continue;

        for (kernels::FewRowKernel kernel : {kernels::FewRowKernel::kStaged, kernels::FewRowKernel::kStreaming}) {
          kernels::set_few_row_kernel(kernel);
          SCOPED_TRACE(kernel == kernels::FewRowKernel::kStaged ? "staged" : "streaming");
          const at::Tensor hc = h.cuda(), nwc = nw.cuda();
          at::Tensor qc = at::empty_like(q).cuda(), kc = at::empty_like(k).cuda(), normed_c = at::empty_like(h).cuda();
          test::poison(qc);
          test::poison(normed_c);
          kernels::small_linear(hc, {wq.cuda(), wk.cuda()}, {bq.cuda(), at::Tensor()}, at::Tensor(), {qc, kc},
                                {nwc, eps, normed_c});
          EXPECT_LE(test::rel_err(normed_c.cpu(), normed), test::tolerance(dt)) << "cuda normed rows";
          EXPECT_LE(test::rel_err(qc.cpu(), q), test::tolerance(dt)) << "cuda q";
          EXPECT_LE(test::rel_err(kc.cpu(), k), test::tolerance(dt)) << "cuda k";
          const at::Tensor r = rnd({n, 40}, dt);
          at::Tensor rc = r.cuda(), rref = r.clone();
          kernels::small_linear_cpu(h, {wq}, {bq}, rref, {rref}, {nw, eps, at::Tensor()});
          kernels::small_linear(hc, {wq.cuda()}, {bq.cuda()}, rc, {rc}, {nwc, eps, at::Tensor()});
          EXPECT_LE(test::rel_err(rc.cpu(), rref), test::tolerance(dt)) << "cuda residual";
          at::Tensor act_c = at::empty_like(act).cuda();
          test::poison(act_c);
          kernels::small_linear_silu_mul(hc, wg.cuda(), wu.cuda(), act_c, {nwc, eps, at::Tensor()});
          EXPECT_LE(test::rel_err(act_c.cpu(), act), test::tolerance(dt)) << "cuda swiglu";
        }
        kernels::set_few_row_kernel(kernels::FewRowKernel::kStaged);
      }
    }
  }
}
