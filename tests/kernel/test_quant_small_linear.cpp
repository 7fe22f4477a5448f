// Few-row projections with quantized weights: the CPU reference equals the ATen composition it stands for
// (transformers' RMSNorm, x · dequant(W)ᵀ in float32 rounded once, `y + bias`, `h + y`, silu(g)·u), and CUDA equals
// the CPU reference for every row count, both bit widths, the MLX group sizes, all three scale dtypes, and the
// decode shapes of the 0.5B and 3B models (K = 896, 2048, 4864, 11008), with grids that make warps take several rows.
#include <gtest/gtest.h>

#include "kernel_test.h"
#include "kernels/cpu/quant.h"
#include "kernels/cpu/quant_small_linear.h"
#include "models/layers.h"

using namespace rlaif;

namespace {

kernels::QuantMatrix to_cuda(const kernels::QuantMatrix& q) {
  return {q.wq.cuda(), q.scales.cuda(), q.biases.cuda(), q.bits, q.group_size};
}

// x · dequant(W)ᵀ in float32 by ATen, rounded to dt once.
at::Tensor aten_linear(const at::Tensor& x, const kernels::QuantMatrix& q, at::ScalarType dt) {
  at::Tensor deq = at::empty({q.rows(), x.size(1)}, at::kFloat);
  kernels::dequantize_affine_cpu(q.wq, q.scales, q.biases, q.bits, q.group_size, deq);
  return at::linear(x.to(at::kFloat), deq).to(dt);
}

at::Tensor rand_weight(int64_t O, int64_t K) { return at::randn({O, K}) * 0.05; }

}  // namespace

TEST(QuantSmallLinearKernel, CpuReferenceEqualsAtenComposition) {
  SCOPED_TRACE(test::seed_fresh());
  for (at::ScalarType dt : test::activation_dtypes()) {
    for (int64_t bits : {4, 8}) {
      SCOPED_TRACE(fmt::format("{} bits {}", c10::toString(dt), bits));
      const int64_t N = 3, K = 256, group = 64;
      const at::Tensor x = at::randn({N, K}).to(dt), norm_w = (1.0 + at::randn({K}) * 0.1).to(dt);
      const std::vector<kernels::QuantMatrix> ws = {test::quantize_cpu(rand_weight(96, K), bits, group, at::kBFloat16),
                                                    test::quantize_cpu(rand_weight(32, K), bits, group, at::kBFloat16),
                                                    test::quantize_cpu(rand_weight(32, K), bits, group, at::kBFloat16)};
      const std::vector<at::Tensor> bs = {at::randn({96}).to(dt), at::Tensor(), at::randn({32}).to(dt)};
      std::vector<at::Tensor> outs;
      for (const auto& w : ws) outs.push_back(at::full({N, w.rows()}, std::nan(""), x.options()));
      at::Tensor normed = at::empty_like(x);
      kernels::quant_small_linear_cpu(x, ws, bs, {}, outs, {norm_w, 1e-6, normed});
      const at::Tensor xn = layers::rms_norm(x, norm_w, 1e-6);
      EXPECT_LE(test::rel_err(normed, xn), test::tolerance(dt)) << "normed";
      for (size_t i = 0; i < ws.size(); ++i) {
        at::Tensor want = aten_linear(xn, ws[i], dt);
        if (bs[i].defined()) want = want + bs[i];
        EXPECT_LE(test::rel_err(outs[i], want), test::tolerance(dt)) << "segment " << i;
      }
      // With the residual: h + y.
      const at::Tensor h = at::randn({N, 96}).to(dt), h_want = h + aten_linear(x, ws[0], dt);
      at::Tensor h_out = h.clone();
      kernels::quant_small_linear_cpu(x, {ws[0]}, {at::Tensor()}, h_out, {h_out});
      EXPECT_LE(test::rel_err(h_out, h_want), test::tolerance(dt)) << "residual";
      // SwiGLU: silu(gate(x)) · up(x).
      const kernels::QuantMatrix gate = test::quantize_cpu(rand_weight(80, K), bits, group, at::kBFloat16),
                                 up = test::quantize_cpu(rand_weight(80, K), bits, group, at::kBFloat16);
      at::Tensor act = at::empty({N, 80}, x.options());
      kernels::quant_small_linear_silu_mul_cpu(x, gate, up, act, {norm_w, 1e-6, at::Tensor()});
      const at::Tensor act_want = at::silu(aten_linear(xn, gate, dt)) * aten_linear(xn, up, dt);
      EXPECT_LE(test::rel_err(act, act_want), test::tolerance(dt)) << "silu_mul";
    }
  }
}

TEST(QuantSmallLinearKernel, InputsThatDoNotFitTheStagingAreRejected) {
  EXPECT_TRUE(kernels::quant_small_linear_fits(2, 11008, 4));
  EXPECT_FALSE(kernels::quant_small_linear_fits(4, 11008, 4));
  EXPECT_FALSE(kernels::quant_small_linear_fits(9, 64, 4));
  const kernels::QuantMatrix w = test::quantize_cpu(rand_weight(8, 11008), 4, 64, at::kBFloat16);
  at::Tensor out = at::empty({4, 8});
  EXPECT_THROW(kernels::quant_small_linear_cpu(at::randn({4, 11008}), {w}, {at::Tensor()}, {}, {out}), std::exception);
}

TEST(QuantSmallLinearKernel, CudaEqualsCpuReference) {
  RLAIF_REQUIRE_CUDA_KERNELS();
  SCOPED_TRACE(test::seed_fresh());
  struct Shape {
    int64_t K, O;
  };
  // The inputs of the 0.5B (896, down 4864) and 3B (2048, down 11008) projections (outputs cut to keep the CPU
  // reference quick), and rows of fewer chunks than
  // lanes (K = 256: 8 chunks at 4 bits).
  // Past the grid's 16 blocks per SM (2112 on an H100, 16896 rows or row parts): 20000 rows of 256 inputs, and
  // 5000 rows of 11008 split over 4 or 8 warps each.
  for (const Shape& sh : {Shape{896, 896}, Shape{4864, 264}, Shape{2048, 520}, Shape{11008, 264}, Shape{256, 40},
                          Shape{256, 20000}, Shape{11008, 5000}}) {
    for (int64_t N : {1, 2, 3, 5, 8}) {
      for (int64_t bits : {4, 8}) {
        if (!kernels::quant_small_linear_fits(N, sh.K, bits)) continue;
        for (int64_t group : {32, 64, 128}) {
          if (sh.K % group != 0 || (sh.O > 1000 && group != 64)) continue;
          for (at::ScalarType dt : test::activation_dtypes()) {
            const at::ScalarType sdt = group == 32 ? at::kHalf : group == 64 ? at::kBFloat16 : at::kFloat;
            SCOPED_TRACE(fmt::format("K {} O {} N {} bits {} group {} x {} scales {}", sh.K, sh.O, N, bits, group,
                                     c10::toString(dt), c10::toString(sdt)));
            const at::Tensor x = at::randn({N, sh.K}).to(dt);
            const kernels::QuantMatrix w = test::quantize_cpu(rand_weight(sh.O, sh.K), bits, group, sdt),
                                       w2 = test::quantize_cpu(rand_weight(24, sh.K), bits, group, sdt);
            const at::Tensor bias = at::randn({sh.O}).to(dt);
            std::vector<at::Tensor> ref = {at::empty({N, sh.O}, x.options()), at::empty({N, 24}, x.options())};
            kernels::quant_small_linear_cpu(x, {w, w2}, {bias, at::Tensor()}, {}, ref);
            std::vector<at::Tensor> got = {at::empty({N, sh.O}, x.options().device(at::kCUDA)),
                                           at::empty({N, 24}, x.options().device(at::kCUDA))};
            for (auto& g : got) test::poison(g);
            kernels::quant_small_linear(x.cuda(), {to_cuda(w), to_cuda(w2)}, {bias.cuda(), at::Tensor()}, {}, got);
            EXPECT_LE(test::rel_err(got[0], ref[0]), test::tolerance(dt)) << "segment 0 (bias)";
            EXPECT_LE(test::rel_err(got[1], ref[1]), test::tolerance(dt)) << "segment 1";
            // The residual, in place.
            const at::Tensor h = at::randn({N, sh.O}).to(dt);
            at::Tensor h_ref = h.clone(), h_gpu = h.cuda();
            kernels::quant_small_linear_cpu(x, {w}, {at::Tensor()}, h_ref, {h_ref});
            kernels::quant_small_linear(x.cuda(), {to_cuda(w)}, {at::Tensor()}, h_gpu, {h_gpu});
            EXPECT_LE(test::rel_err(h_gpu, h_ref), test::tolerance(dt)) << "residual";
            // SwiGLU over the same rows (gate w, up another weight of its shape), no norm.
            const kernels::QuantMatrix up = test::quantize_cpu(rand_weight(sh.O, sh.K), bits, group, sdt);
            at::Tensor act_ref = at::empty({N, sh.O}, x.options()), act = at::empty({N, sh.O}, x.options().device(at::kCUDA));
            test::poison(act);
            kernels::quant_small_linear_silu_mul_cpu(x, w, up, act_ref);
            kernels::quant_small_linear_silu_mul(x.cuda(), to_cuda(w), to_cuda(up), act);
            EXPECT_LE(test::rel_err(act, act_ref), test::tolerance(dt)) << "silu_mul";
          }
        }
      }
    }
  }
}

TEST(QuantSmallLinearKernel, CudaFusedNormAndSwigluEqualCpuReference) {
  RLAIF_REQUIRE_CUDA_KERNELS();
  SCOPED_TRACE(test::seed_fresh());
  for (int64_t K : {896, 2048}) {
    for (int64_t N : {1, 2, 4, 7}) {
      for (int64_t bits : {4, 8}) {
        for (at::ScalarType dt : test::activation_dtypes()) {
          SCOPED_TRACE(fmt::format("K {} N {} bits {} {}", K, N, bits, c10::toString(dt)));
          const at::Tensor x = (at::randn({N, K}) * 3).to(dt), norm_w = (1.0 + at::randn({K}) * 0.1).to(dt);
          const kernels::QuantMatrix q = test::quantize_cpu(rand_weight(K, K), bits, 64, at::kBFloat16),
                                     k = test::quantize_cpu(rand_weight(128, K), bits, 64, at::kBFloat16),
                                     gate = test::quantize_cpu(rand_weight(600, K), bits, 64, at::kBFloat16),
                                     up = test::quantize_cpu(rand_weight(600, K), bits, 64, at::kBFloat16);
          std::vector<at::Tensor> ref = {at::empty({N, K}, x.options()), at::empty({N, 128}, x.options())};
          at::Tensor normed_ref = at::empty_like(x);
          kernels::quant_small_linear_cpu(x, {q, k}, {at::Tensor(), at::Tensor()}, {}, ref, {norm_w, 1e-6, normed_ref});
          const auto dev = x.options().device(at::kCUDA);
          std::vector<at::Tensor> got = {at::empty({N, K}, dev), at::empty({N, 128}, dev)};
          at::Tensor normed = at::empty({N, K}, dev);
          test::poison(normed);
          kernels::quant_small_linear(x.cuda(), {to_cuda(q), to_cuda(k)}, {at::Tensor(), at::Tensor()}, {}, got,
                                      {norm_w.cuda(), 1e-6, normed});
          EXPECT_LE(test::rel_err(got[0], ref[0]), test::tolerance(dt)) << "q";
          EXPECT_LE(test::rel_err(got[1], ref[1]), test::tolerance(dt)) << "k";
          EXPECT_LE(test::rel_err(normed, normed_ref), test::tolerance(dt)) << "normed";
          at::Tensor act_ref = at::empty({N, 600}, x.options()), act = at::empty({N, 600}, dev);
          test::poison(act);
          kernels::quant_small_linear_silu_mul_cpu(x, gate, up, act_ref, {norm_w, 1e-6, at::Tensor()});
          kernels::quant_small_linear_silu_mul(x.cuda(), to_cuda(gate), to_cuda(up), act,
                                               {norm_w.cuda(), 1e-6, at::Tensor()});
          EXPECT_LE(test::rel_err(act, act_ref), test::tolerance(dt)) << "silu_mul";
        }
      }
    }
  }
}

// The tensor-core path (kernels::quant_few_row_mma: bf16 x of 1-2 rows, q4 or q8 in groups of 32/64/128, rows a
// multiple of 8) against the same CPU reference, within about one bf16 rounding: two segments with a bias and the
// fused norm, the residual in place, SwiGLU; 3B's q/k/v-like and down shapes (K = 2048, 11008), a K of fewer groups
// than the block's 8 warps (896 at 128, 256), and 20000 rows (more 8-row tiles than the grid has blocks). That the
// switch reaches the tensor-core kernel shows as outputs that differ somewhere from the SIMT kernel's (another
// summation order; counted per bit width over the whole test) while both stay within the bound.
TEST(QuantSmallLinearKernel, CudaTensorCorePathEqualsCpuReference) {
  RLAIF_REQUIRE_CUDA_KERNELS();
  SCOPED_TRACE(test::seed_fresh());
  struct Restore {
    ~Restore() { kernels::set_quant_few_row_mma(false); }
  } restore;
  const at::ScalarType dt = at::kBFloat16;
  const double bound = 4e-3;  // bf16 rounds at 2^-8 relative; the reference rounds once
  struct Shape {
    int64_t K, O;
  };
  int64_t differing[2] = {0, 0};  // outputs where the tensor-core kernel's bf16 result is not the SIMT kernel's
  for (const Shape& sh : {Shape{2048, 2048}, Shape{11008, 264}, Shape{896, 128}, Shape{256, 20000}}) {
    for (int64_t N : {1, 2}) {
      for (int64_t group : {32, 64, 128}) {
        if (sh.K % group != 0) continue;
        for (auto [bits, sdt] : {std::pair{4, at::kBFloat16}, {4, at::kHalf}, {4, at::kFloat}, {8, at::kBFloat16},
                                 {8, at::kFloat}}) {
          SCOPED_TRACE(fmt::format("K {} O {} N {} group {} bits {} scales {}", sh.K, sh.O, N, group, bits,
                                   c10::toString(sdt)));
          const at::Tensor x = (at::randn({N, sh.K}) * 3).to(dt), norm_w = (1.0 + at::randn({sh.K}) * 0.1).to(dt);
          const kernels::QuantMatrix w = test::quantize_cpu(rand_weight(sh.O, sh.K), bits, group, sdt),
                                     w2 = test::quantize_cpu(rand_weight(24, sh.K), bits, group, sdt),
                                     up = test::quantize_cpu(rand_weight(sh.O, sh.K), bits, group, sdt);
          const at::Tensor bias = at::randn({sh.O}).to(dt);
          const auto dev = x.options().device(at::kCUDA);
          // Two segments, the first with a bias, behind the fused norm.
          std::vector<at::Tensor> ref = {at::empty({N, sh.O}, x.options()), at::empty({N, 24}, x.options())};
          at::Tensor normed_ref = at::empty_like(x);
          kernels::quant_small_linear_cpu(x, {w, w2}, {bias, at::Tensor()}, {}, ref, {norm_w, 1e-6, normed_ref});
          auto run = [&](bool mma) {
            kernels::set_quant_few_row_mma(mma);
            std::vector<at::Tensor> got = {at::empty({N, sh.O}, dev), at::empty({N, 24}, dev)};
            for (auto& g : got) test::poison(g);
            at::Tensor normed = at::empty({N, sh.K}, dev);
            test::poison(normed);
            kernels::quant_small_linear(x.cuda(), {to_cuda(w), to_cuda(w2)}, {bias.cuda(), at::Tensor()}, {}, got,
                                        {norm_w.cuda(), 1e-6, normed});
            got.push_back(normed);
            return got;
          };
          const std::vector<at::Tensor> simt = run(false), got = run(true);
          EXPECT_LE(test::rel_err(got[0], ref[0]), bound) << "segment 0 (bias)";
          EXPECT_LE(test::rel_err(got[1], ref[1]), bound) << "segment 1";
          EXPECT_LE(test::rel_err(got[2], normed_ref), test::tolerance(dt)) << "normed";
          EXPECT_LE(test::rel_err(simt[0], ref[0]), bound) << "SIMT kernel, segment 0";
          // Two accurate float32 sums agree after the bf16 rounding for most outputs, sometimes all of a launch's
          // (p ≈ 0.3 at 4096), so the differing outputs are counted over the whole test.
          differing[bits == 4 ? 0 : 1] += got[0].ne(simt[0]).sum().item<int64_t>();
          // The residual, in place.
          const at::Tensor h = at::randn({N, sh.O}).to(dt);
          at::Tensor h_ref = h.clone(), h_gpu = h.cuda();
          kernels::quant_small_linear_cpu(x, {w}, {at::Tensor()}, h_ref, {h_ref});
          kernels::set_quant_few_row_mma(true);
          kernels::quant_small_linear(x.cuda(), {to_cuda(w)}, {at::Tensor()}, h_gpu, {h_gpu});
          EXPECT_LE(test::rel_err(h_gpu, h_ref), bound) << "residual";
          // SwiGLU behind the fused norm.
          at::Tensor act_ref = at::empty({N, sh.O}, x.options()), act = at::empty({N, sh.O}, dev);
          test::poison(act);
          kernels::quant_small_linear_silu_mul_cpu(x, w, up, act_ref, {norm_w, 1e-6, at::Tensor()});
          kernels::quant_small_linear_silu_mul(x.cuda(), to_cuda(w), to_cuda(up), act,
                                               {norm_w.cuda(), 1e-6, at::Tensor()});
          EXPECT_LE(test::rel_err(act, act_ref), bound) << "silu_mul";
        }
      }
    }
  }
  // Else the switch did not reach another kernel.
  EXPECT_GT(differing[0], 0) << "q4: the tensor-core kernel gave the SIMT kernel's outputs everywhere";
  EXPECT_GT(differing[1], 0) << "q8: the tensor-core kernel gave the SIMT kernel's outputs everywhere";
}
