// MLX affine quantization kernels: the CPU quant_linear equals ATen's x · dequant(W)ᵀ (the format's definition),
// and on CUDA quantize/dequantize equal the CPU reference bit for bit and quant_linear (GEMV path ≤ 8 rows,
// dequantize + cuBLAS beyond) equals it within the kernel tolerance; the tensor-core path (quant_linear_mma) too.
#include <gtest/gtest.h>

#include <tuple>

#include "kernel_test.h"
#include "kernels/cpu/quant.h"

using namespace rlaif;

TEST(QuantKernel, CpuQuantLinearEqualsAtenLinearOfDequantizedWeights) {
  SCOPED_TRACE(test::seed_fresh());
  for (at::ScalarType dt : test::activation_dtypes()) {
    for (int64_t bits : {4, 8}) {
      const int64_t O = 40, K = 256, group = 64;
      const kernels::QuantMatrix p = test::quantize_cpu(at::randn({O, K}) * 0.1, bits, group, at::kBFloat16);
      at::Tensor deq = at::empty({O, K}, at::kFloat);
      kernels::dequantize_affine_cpu(p.wq, p.scales, p.biases, bits, group, deq);
      const at::Tensor x = at::randn({5, K}).to(dt);
      at::Tensor out = at::empty({5, O}, x.options());
      test::poison(out);
      kernels::quant_linear_cpu(x, p.wq, p.scales, p.biases, bits, group, out);
      EXPECT_LE(test::rel_err(out, at::linear(x.to(at::kFloat), deq)), test::tolerance(dt))
          << c10::toString(dt) << " bits " << bits;
    }
  }
}

TEST(QuantKernel, CudaQuantizeAndDequantizeEqualCpuBitForBit) {
  RLAIF_REQUIRE_CUDA_KERNELS();
  SCOPED_TRACE(test::seed_fresh());
  for (at::ScalarType wdt : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (int64_t bits : {4, 8}) {
      for (int64_t group : {32, 64, 128, 512}) {  // 32-128: the vector kernel (group/8 lanes); 512: one thread
        SCOPED_TRACE(fmt::format("{} bits {} group {}", c10::toString(wdt), bits, group));
        at::Tensor w = (at::randn({37, 512}) * 0.05).to(wdt);
        w[0].zero_();
        w[1].fill_(-0.25);
        const kernels::QuantMatrix ref = test::quantize_cpu(w, bits, group, wdt);
        const at::Tensor wc = w.cuda();
        kernels::QuantMatrix got{at::full_like(ref.wq, -1, at::kCUDA), at::empty_like(ref.scales, at::kCUDA),
                                 at::empty_like(ref.biases, at::kCUDA), bits, group};
        test::poison(got.scales);
        kernels::quantize_affine(wc, bits, group, got.wq, got.scales, got.biases);
        EXPECT_TRUE(got.wq.cpu().equal(ref.wq)) << "packed words";
        EXPECT_TRUE(got.scales.cpu().equal(ref.scales)) << "scales";
        EXPECT_TRUE(got.biases.cpu().equal(ref.biases)) << "biases";
        for (at::ScalarType odt : {at::kFloat, at::kBFloat16}) {
          at::Tensor dref = at::empty({37, 512}, odt), dgot = at::empty({37, 512}, odt).cuda();
          kernels::dequantize_affine_cpu(ref.wq, ref.scales, ref.biases, bits, group, dref);
          test::poison(dgot);
          kernels::dequantize_affine(got.wq, got.scales, got.biases, bits, group, dgot);
          EXPECT_TRUE(dgot.cpu().equal(dref)) << "dequantized " << c10::toString(odt);
        }
      }
    }
  }
}

TEST(QuantKernel, CudaQuantLinearEqualsCpuReference) {
  RLAIF_REQUIRE_CUDA_KERNELS();
  SCOPED_TRACE(test::seed_fresh());
  for (at::ScalarType dt : test::activation_dtypes()) {
    for (int64_t bits : {4, 8}) {
      for (int64_t n : {1, 3, 8, 9, 64}) {  // 1-8: the GEMV kernel; 9 and 64: dequantize + cuBLAS
        // 3B shapes (the chunk kernel: 16-byte chunks inside one group), 16-wide groups (q4: 16-byte word loads
        // spanning two groups; q8: the chunk kernel) and an odd word count per row (one word per load).
        for (auto [O, K, group] : {std::tuple<int64_t, int64_t, int64_t>{2048, 2048, 64}, {260, 11008, 64},
                                   {64, 256, 16}, {33, 40, 8}}) {
          if (K * bits / 32 % 4 == 0 && group == 8) continue;
          SCOPED_TRACE(fmt::format("{} bits {} N={} O={} K={} group {}", c10::toString(dt), bits, n, O, K, group));
          const kernels::QuantMatrix p = test::quantize_cpu(at::randn({O, K}) * 0.05, bits, group, at::kBFloat16);
          const at::Tensor x = at::randn({n, K}).to(dt);
          at::Tensor ref = at::empty({n, O}, x.options());
          kernels::quant_linear_cpu(x, p.wq, p.scales, p.biases, bits, group, ref);
          at::Tensor out = at::empty({n, O}, x.options()).cuda();
          test::poison(out);
          kernels::quant_linear(x.cuda(), p.wq.cuda(), p.scales.cuda(), p.biases.cuda(), bits, group, out);
          EXPECT_LE(test::rel_err(out, ref), test::tolerance(dt));
        }
      }
    }
  }
}

// The tensor-core path's spec (W rounded to bf16 after dequantization) stays within bf16 tolerance of quant_linear
// (W in float32), and on CUDA the mma.sync kernel equals its CPU path: several N tiles with a partial one, W rows
// not a multiple of the 64-row tile, groups of 16 / 32 / 64 (one or several per 64-column chunk), q4 and q8,
// bf16 and fp16 scales.
TEST(QuantKernel, MmaPathEqualsQuantLinearAndCudaEqualsCpu) {
  SCOPED_TRACE(test::seed_fresh());
  const bool cuda = kernels::cuda_kernels_available() && at::hasCUDA();
  for (int64_t bits : {4, 8}) {
    for (auto [O, K, group] : {std::tuple<int64_t, int64_t, int64_t>{2048, 2048, 64}, {260, 11008, 64},
                               {64, 256, 16}, {100, 128, 32}}) {
      for (at::ScalarType sdt : {at::kBFloat16, at::kHalf}) {
        if (sdt == at::kHalf && O > 300) continue;
        const kernels::QuantMatrix p = test::quantize_cpu(at::randn({O, K}) * 0.05, bits, group, sdt);
        for (int64_t n : {9, 64, 100}) {
          SCOPED_TRACE(fmt::format("bits {} N={} O={} K={} group {} scales {}", bits, n, O, K, group,
                                   c10::toString(sdt)));
          const at::Tensor x = at::randn({n, K}).to(at::kBFloat16);
          at::Tensor ref = at::empty({n, O}, x.options()), mma = at::empty({n, O}, x.options());
          kernels::quant_linear_cpu(x, p.wq, p.scales, p.biases, bits, group, ref);
          test::poison(mma);
          kernels::quant_linear_mma(x, p.wq, p.scales, p.biases, bits, group, mma);
          EXPECT_LE(test::rel_err(mma, ref), test::tolerance(at::kBFloat16)) << "cpu path vs quant_linear";
          if (!cuda) continue;
          at::Tensor out = at::empty({n, O}, x.options()).cuda();
          test::poison(out);
          kernels::quant_linear_mma(x.cuda(), p.wq.cuda(), p.scales.cuda(), p.biases.cuda(), bits, group, out);
          EXPECT_LE(test::rel_err(out, mma), test::tolerance(at::kBFloat16)) << "cuda vs cpu path";
        }
      }
    }
  }
}
