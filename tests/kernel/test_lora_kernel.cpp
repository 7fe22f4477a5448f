// LoRA shrink/expand: the CPU reference equals layers::project's adapter math (PEFT's: input cast to float32,
// x·Aᵀ·Bᵀ·scale rounded to the output dtype, then added; `h + project(x)` with a residual), and CUDA equals the
// CPU reference for a group of three adapters of different ranks, in place, and with a residual.
#include <gtest/gtest.h>

#include "kernel_test.h"
#include "kernels/cpu/lora.h"
#include "models/layers.h"

using namespace rlaif;

namespace {

// One projection with an adapter, as layers::project sees it.
LayerWeights one_projection(int64_t O, int64_t D, int64_t r, at::ScalarType dt) {
  LayerWeights L;
  L.wq = (at::randn({O, D}) * 0.05).to(dt);
  L.lora[0].a = at::randn({r, D}) * 0.1;
  L.lora[0].b = at::randn({O, r}) * 0.1;
  L.lora[0].scale = 2.0;
  return L;
}

}  // namespace

TEST(LoraKernel, CpuReferenceEqualsLayersProject) {
  SCOPED_TRACE(test::seed_fresh());
  for (at::ScalarType dt : test::activation_dtypes()) {
    SCOPED_TRACE(c10::toString(dt));
    const int64_t S = 5, D = 48, O = 40, r = 8;
    const LayerWeights L = one_projection(O, D, r, dt);
    const at::Tensor x = at::randn({S, D}).to(dt);
    const at::Tensor want = layers::project(x, L, Proj::kQ, AdapterMode{true, false});
    const at::Tensor base = layers::project(x, L, Proj::kQ, AdapterMode{false, false});
    at::Tensor t = at::empty({S, r});
    kernels::lora_shrink_cpu(x, {L.lora[0].a}, t);
    at::Tensor out = at::empty_like(base);
    test::poison(out);
    kernels::lora_expand_cpu(t, {L.lora[0].b}, {L.lora[0].scale}, {base}, {}, {out});
    EXPECT_LE(test::rel_err(out, want), test::tolerance(dt));
    const at::Tensor h = at::randn({S, O}).to(dt), h_want = h + want;
    kernels::lora_expand_cpu(t, {L.lora[0].b}, {L.lora[0].scale}, {base}, h, {h});
    EXPECT_LE(test::rel_err(h, h_want), test::tolerance(dt)) << "with the residual";
  }
}

TEST(LoraKernel, CudaEqualsCpuReference) {
  RLAIF_REQUIRE_CUDA_KERNELS();
  SCOPED_TRACE(test::seed_fresh());
  for (at::ScalarType dt : test::activation_dtypes()) {
    for (int64_t S : {1, 7, 64}) {
      SCOPED_TRACE(fmt::format("{} S={}", c10::toString(dt), S));
      const int64_t D = 896;
      const std::vector<int64_t> outs_dim = {896, 128, 100}, ranks = {16, 8, 4};
      std::vector<at::Tensor> a, b, ys, ys_gpu, a_gpu, b_gpu;
      for (size_t i = 0; i < 3; ++i) {
        a.push_back(at::randn({ranks[i], D}) * 0.05);
        b.push_back(at::randn({outs_dim[i], ranks[i]}) * 0.1);
        ys.push_back(at::randn({S, outs_dim[i]}).to(dt));
        a_gpu.push_back(a.back().cuda());
        b_gpu.push_back(b.back().cuda());
        ys_gpu.push_back(ys.back().cuda());
      }
      const at::Tensor x = at::randn({S, D}).to(dt);
      at::Tensor t = at::empty({S, 28}), t_gpu = at::empty({S, 28}, x.options().dtype(at::kFloat).device(at::kCUDA));
      kernels::lora_shrink_cpu(x, a, t);
      test::poison(t_gpu);
      kernels::lora_shrink(x.cuda(), a_gpu, t_gpu);
      EXPECT_LE(test::rel_err(t_gpu, t), 1e-5) << "shrink";
      const std::vector<double> scales = {2.0, 0.5, 1.0};
      kernels::lora_expand_cpu(t, b, scales, ys, {}, ys);
      kernels::lora_expand(t.cuda(), b_gpu, scales, ys_gpu, {}, ys_gpu);
      for (size_t i = 0; i < 3; ++i) EXPECT_LE(test::rel_err(ys_gpu[i], ys[i]), test::tolerance(dt)) << "expand " << i;
      const at::Tensor h = at::randn({S, 896}).to(dt);
      at::Tensor h_ref = h.clone(), h_gpu = h.cuda();
      const at::Tensor y0 = at::randn({S, 896}).to(dt);
      const at::Tensor t0 = t.narrow(1, 0, 16).contiguous();
      kernels::lora_expand_cpu(t0, {b[0]}, {2.0}, {y0}, h_ref, {h_ref});
      kernels::lora_expand(t0.cuda(), {b_gpu[0]}, {2.0}, {y0.cuda()}, h_gpu, {h_gpu});
      EXPECT_LE(test::rel_err(h_gpu, h_ref), test::tolerance(dt)) << "with the residual";
    }
  }
}

// The decode step above the few-row batch adds the updates to column slices of one packed q/k/v GEMM output (rows
// of stride Σ O): the CPU reference on the slices equals it on contiguous copies, and CUDA equals the CPU, for row
// counts that fill the 8-row tiles partly (13) and wholly (64).
TEST(LoraKernel, ExpandIntoColumnSlicesOfAPackedOutput) {
  SCOPED_TRACE(test::seed_fresh());
  const bool cuda = at::hasCUDA() && kernels::cuda_kernels_available();
  for (at::ScalarType dt : test::activation_dtypes()) {
    for (int64_t S : {13, 64}) {
      SCOPED_TRACE(fmt::format("{} S={}", c10::toString(dt), S));
      const std::vector<int64_t> outs_dim = {256, 64, 40}, ranks = {16, 16, 8};
      const int64_t total = 360, R = 40;
      std::vector<at::Tensor> b;
      for (size_t i = 0; i < 3; ++i) b.push_back(at::randn({outs_dim[i], ranks[i]}) * 0.1);
      const at::Tensor t = at::randn({S, R}), packed = at::randn({S, total}).to(dt);
      const std::vector<double> scales = {2.0, 0.5, 1.0};
      auto slices = [&](const at::Tensor& p) {
        return std::vector<at::Tensor>{p.narrow(1, 0, 256), p.narrow(1, 256, 64), p.narrow(1, 320, 40)};
      };
      at::Tensor ref_packed = packed.clone();
      std::vector<at::Tensor> ref = slices(ref_packed), contiguous;
      for (const auto& y : ref) contiguous.push_back(y.contiguous());
      kernels::lora_expand_cpu(t, b, scales, ref, {}, ref);
      kernels::lora_expand_cpu(t, b, scales, contiguous, {}, contiguous);
      for (size_t i = 0; i < 3; ++i) EXPECT_TRUE(ref[i].equal(contiguous[i])) << "CPU, slice " << i;
      if (!cuda) continue;
      std::vector<at::Tensor> b_gpu;
      for (const auto& bi : b) b_gpu.push_back(bi.cuda());
      at::Tensor gpu_packed = packed.cuda();
      std::vector<at::Tensor> gpu = slices(gpu_packed);
      kernels::lora_expand(t.cuda(), b_gpu, scales, gpu, {}, gpu);
      EXPECT_LE(test::rel_err(gpu_packed, ref_packed), test::tolerance(dt)) << "CUDA";
      // x·Aᵀ over 8-row tiles equals the reference row by row.
      const at::Tensor x = at::randn({S, 896}).to(dt), a = at::randn({R, 896}) * 0.05;
      at::Tensor t_ref = at::empty({S, R}), t_gpu = at::empty({S, R}, at::TensorOptions().device(at::kCUDA));
      kernels::lora_shrink_cpu(x, {a}, t_ref);
      test::poison(t_gpu);
      kernels::lora_shrink(x.cuda(), {a.cuda()}, t_gpu);
      EXPECT_LE(test::rel_err(t_gpu, t_ref), 1e-5) << "shrink";
    }
  }
}

// Ranks that are not a multiple of the expand's 16-column chunks (nor of the shrink's 4-column groups), adapters
// whose widths end inside a 128-column block, row counts that end inside a row tile, and inputs both wide and of
// odd width (the shrink's scalar path): CUDA equals the CPU reference, with expand blocks of 8 and of 4 rows
// (kernels::lora_expand_rows), which give the same outputs bit for bit.
TEST(LoraKernel, CudaRanksWidthsAndRowTilesOfEveryShape) {
  RLAIF_REQUIRE_CUDA_KERNELS();
  SCOPED_TRACE(test::seed_fresh());
  struct Restore {
    ~Restore() { kernels::set_lora_expand_rows(8); }
  } restore;
  for (at::ScalarType dt : test::activation_dtypes()) {
    for (int64_t S : {3, 37, 64}) {
      for (int64_t D : {11008, 1001}) {
        SCOPED_TRACE(fmt::format("{} S={} D={}", c10::toString(dt), S, D));
        // 22 + 42 = 64 columns: the shrink's 4-column groups include one that spans the two adapters.
        const std::vector<int64_t> outs_dim = {1000, 300}, ranks = {22, 42};
        std::vector<at::Tensor> a, b, a_gpu, b_gpu, ys;
        for (size_t i = 0; i < 2; ++i) {
          a.push_back(at::randn({ranks[i], D}) * 0.02);
          b.push_back(at::randn({outs_dim[i], ranks[i]}) * 0.1);
          a_gpu.push_back(a.back().cuda());
          b_gpu.push_back(b.back().cuda());
          ys.push_back(at::randn({S, outs_dim[i]}).to(dt));
        }
        const at::Tensor x = at::randn({S, D}).to(dt);
        at::Tensor t = at::empty({S, 64}), t_gpu = at::empty({S, 64}, at::TensorOptions().device(at::kCUDA));
        kernels::lora_shrink_cpu(x, a, t);
        test::poison(t_gpu);
        kernels::lora_shrink(x.cuda(), a_gpu, t_gpu);
        EXPECT_LE(test::rel_err(t_gpu, t), 1e-5) << "shrink";
        const std::vector<double> scales = {0.75, 2.0};
        const std::vector<at::Tensor> ys_in = {ys[0].clone(), ys[1].clone()};
        kernels::lora_expand_cpu(t, b, scales, ys, {}, ys);
        const at::Tensor h = at::randn({S, 1000}).to(dt), y0 = at::randn({S, 1000}).to(dt);
        const at::Tensor t0 = t.narrow(1, 0, 22).contiguous();
        at::Tensor h_ref = h.clone();
        kernels::lora_expand_cpu(t0, {b[0]}, {0.75}, {y0}, h_ref, {h_ref});
        std::vector<at::Tensor> first;  // the 8-row blocks' outputs
        for (int rows : {8, 4}) {
          SCOPED_TRACE(fmt::format("expand rows {}", rows));
          kernels::set_lora_expand_rows(rows);
          std::vector<at::Tensor> out = {ys_in[0].cuda(), ys_in[1].cuda()};
          kernels::lora_expand(t.cuda(), b_gpu, scales, out, {}, out);
          for (size_t i = 0; i < 2; ++i) EXPECT_LE(test::rel_err(out[i], ys[i]), test::tolerance(dt)) << "expand " << i;
          // One adapter with the residual: h = h + (y + update).
          at::Tensor h_gpu = h.cuda();
          kernels::lora_expand(t0.cuda(), {b_gpu[0]}, {0.75}, {y0.cuda()}, h_gpu, {h_gpu});
          EXPECT_LE(test::rel_err(h_gpu, h_ref), test::tolerance(dt)) << "with the residual";
          out.push_back(h_gpu);
          if (first.empty()) first = out;
          else
            for (size_t i = 0; i < out.size(); ++i) EXPECT_TRUE(out[i].equal(first[i])) << "output " << i;
        }
      }
    }
  }
}

// The shrink's two kernels: K split across blocks for long inputs at batch (64 × 11008, 32 × 4096; the last block
// of a row tile adds the partial sums, more than 64 rank columns in passes), column groups elsewhere (one row,
// a prefill length): CUDA equals the CPU reference in each case, and a second launch reproduces the first bit for
// bit (the per-tile counters were reset; the sum order is fixed).
TEST(LoraKernel, CudaShrinkSplitsPassesAndRepeats) {
  RLAIF_REQUIRE_CUDA_KERNELS();
  SCOPED_TRACE(test::seed_fresh());
  for (at::ScalarType dt : test::activation_dtypes()) {
    for (const auto& [S, D] : std::vector<std::pair<int64_t, int64_t>>{{1, 2048}, {64, 11008}, {32, 4096}, {17, 136}, {2200, 256}}) {
      SCOPED_TRACE(fmt::format("{} S={} D={}", c10::toString(dt), S, D));
      const std::vector<int64_t> ranks = {64, 32, 16};  // 112 columns: two passes
      std::vector<at::Tensor> a, a_gpu;
      for (int64_t r : ranks) {
        a.push_back(at::randn({r, D}) * 0.02);
        a_gpu.push_back(a.back().cuda());
      }
      const at::Tensor x = at::randn({S, D}).to(dt), x_gpu = x.cuda();
      at::Tensor t = at::empty({S, 112}), t_gpu = at::empty({S, 112}, at::TensorOptions().device(at::kCUDA));
      kernels::lora_shrink_cpu(x, a, t);
      test::poison(t_gpu);
      kernels::lora_shrink(x_gpu, a_gpu, t_gpu);
      EXPECT_LE(test::rel_err(t_gpu, t), 1e-5);
      at::Tensor again = at::empty_like(t_gpu);
      test::poison(again);
      kernels::lora_shrink(x_gpu, a_gpu, again);
      EXPECT_TRUE(again.equal(t_gpu)) << "a second launch differs";
    }
  }
}

// The gate/up update with SwiGLU after it: the CPU reference equals ATen's silu(gate') · up' over layers::project's
// adapter math, and CUDA's single launch equals the CPU reference on column halves of one packed output.
TEST(LoraKernel, ExpandSiluMulEqualsExpandThenSwiGLU) {
  SCOPED_TRACE(test::seed_fresh());
  const bool cuda = at::hasCUDA() && kernels::cuda_kernels_available();
  for (at::ScalarType dt : test::activation_dtypes()) {
    for (int64_t S : {1, 5, 64}) {
      SCOPED_TRACE(fmt::format("{} S={}", c10::toString(dt), S));
      const int64_t D = 96, F = 300;
      LayerWeights L;
      L.w_gate = (at::randn({F, D}) * 0.1).to(dt);
      L.w_up = (at::randn({F, D}) * 0.1).to(dt);
      for (Proj p : {Proj::kGate, Proj::kUp}) {
        const int64_t r = p == Proj::kGate ? 16 : 20;  // 20: a second rank chunk of 4
        L.lora[static_cast<int>(p)].a = at::randn({r, D}) * 0.1;
        L.lora[static_cast<int>(p)].b = at::randn({F, r}) * 0.1;
        L.lora[static_cast<int>(p)].scale = p == Proj::kGate ? 2.0 : 0.5;
      }
      const LoraAdapter &ag = L.lora[static_cast<int>(Proj::kGate)], &au = L.lora[static_cast<int>(Proj::kUp)];
      const at::Tensor x = at::randn({S, D}).to(dt);
      const AdapterMode with{true, false}, without{false, false};
      const at::Tensor want = at::silu(layers::project(x, L, Proj::kGate, with)) * layers::project(x, L, Proj::kUp, with);
      const at::Tensor packed = at::cat({layers::project(x, L, Proj::kGate, without), layers::project(x, L, Proj::kUp, without)}, 1);
      at::Tensor t = at::empty({S, 36});
      kernels::lora_shrink_cpu(x, {ag.a, au.a}, t);
      at::Tensor out = at::empty({S, F}, x.options());
      test::poison(out);
      kernels::lora_expand_silu_mul_cpu(t, {ag.b, au.b}, {ag.scale, au.scale}, packed.narrow(1, 0, F),
                                        packed.narrow(1, F, F), out);
      EXPECT_LE(test::rel_err(out, want), test::tolerance(dt)) << "CPU reference";
      if (!cuda) continue;
      const at::Tensor packed_gpu = packed.cuda();
      at::Tensor first;  // with 8-row expand blocks; 4-row blocks give it bit for bit
      for (int rows : {8, 4}) {
        kernels::set_lora_expand_rows(rows);
        at::Tensor out_gpu = at::empty({S, F}, packed_gpu.options());
        test::poison(out_gpu);
        kernels::lora_expand_silu_mul(t.cuda(), {ag.b.cuda(), au.b.cuda()}, {ag.scale, au.scale},
                                      packed_gpu.narrow(1, 0, F), packed_gpu.narrow(1, F, F), out_gpu);
        kernels::set_lora_expand_rows(8);
        EXPECT_LE(test::rel_err(out_gpu, out), test::tolerance(dt)) << "CUDA, expand rows " << rows;
        if (!first.defined()) first = out_gpu;
        else EXPECT_TRUE(out_gpu.equal(first)) << "4-row blocks against 8-row ones";
      }
    }
  }
}

// x·Aᵀ taken from a base GEMM's last columns (EngineOptions::lora_shrink_in_gemm): t in the outputs' dtype with the
// GEMM's row stride. The CPU reference equals itself on t converted to float32 (exact), and CUDA's expand, with and
// without the residual, and its SwiGLU expand equal the CPU reference.
TEST(LoraKernel, ExpandTakesTOfTheOutputsDtypeInAGemmsColumns) {
  SCOPED_TRACE(test::seed_fresh());
  const bool cuda = at::hasCUDA() && kernels::cuda_kernels_available();
  for (at::ScalarType dt : test::activation_dtypes()) {
    for (int64_t S : {3, 64}) {
      SCOPED_TRACE(fmt::format("{} S={}", c10::toString(dt), S));
      const int64_t O = 200, r = 12;
      const at::Tensor b = at::randn({O, r}) * 0.1, b2 = at::randn({O, r}) * 0.1;
      const at::Tensor gemm = at::randn({S, 2 * O + 2 * r}).to(dt);  // [gate | up | t_gate | t_up]
      const at::Tensor t = gemm.narrow(1, 2 * O, 2 * r), t1 = gemm.narrow(1, 2 * O, r);
      const at::Tensor y = gemm.narrow(1, 0, O), h = at::randn({S, O}).to(dt);
      at::Tensor h_ref = h.clone(), h_float = h.clone();
      kernels::lora_expand_cpu(t1, {b}, {1.5}, {y}, h_ref, {h_ref});
      kernels::lora_expand_cpu(t1.to(at::kFloat).contiguous(), {b}, {1.5}, {y}, h_float, {h_float});
      EXPECT_TRUE(h_ref.equal(h_float)) << "CPU: t of the outputs' dtype, strided rows";
      at::Tensor act = at::empty({S, O}, y.options());
      kernels::lora_expand_silu_mul_cpu(t, {b, b2}, {1.5, 0.5}, gemm.narrow(1, 0, O), gemm.narrow(1, O, O), act);
      if (!cuda) continue;
      const at::Tensor gemm_gpu = gemm.cuda();
      at::Tensor h_gpu = h.cuda();
      kernels::lora_expand(gemm_gpu.narrow(1, 2 * O, r), {b.cuda()}, {1.5}, {gemm_gpu.narrow(1, 0, O)}, h_gpu, {h_gpu});
      EXPECT_LE(test::rel_err(h_gpu, h_ref), test::tolerance(dt)) << "CUDA expand with the residual";
      at::Tensor ys_gpu = gemm_gpu.narrow(1, 0, O).clone();
      at::Tensor ys_ref = y.clone();
      std::vector<at::Tensor> outs_gpu{ys_gpu}, outs_ref{ys_ref};
      kernels::lora_expand(gemm_gpu.narrow(1, 2 * O, r), {b.cuda()}, {1.5}, outs_gpu, {}, outs_gpu);
      kernels::lora_expand_cpu(t1, {b}, {1.5}, outs_ref, {}, outs_ref);
      EXPECT_LE(test::rel_err(ys_gpu, ys_ref), test::tolerance(dt)) << "CUDA expand";
      at::Tensor act_gpu = at::empty({S, O}, gemm_gpu.options());
      test::poison(act_gpu);
      kernels::lora_expand_silu_mul(gemm_gpu.narrow(1, 2 * O, 2 * r), {b.cuda(), b2.cuda()}, {1.5, 0.5},
                                    gemm_gpu.narrow(1, 0, O), gemm_gpu.narrow(1, O, O), act_gpu);
      EXPECT_LE(test::rel_err(act_gpu, act), test::tolerance(dt)) << "CUDA SwiGLU expand";
    }
  }
}

namespace {

// The tensor-core expands' contract (kernels::lora_expand_mma): within a rounding of the CPU reference. B enters the
// MMAs to 16 bits and the sums run in the tensor cores' order, so a float32 sum that lies within ~1e-7 of a bf16
// rounding boundary may round the other way (then the output moves by a few ulps); everything else is bit-equal.
// At most 1% of the outputs may differ, each by at most 4 bf16 ulps (1/32 of its size) plus 1/512 of the largest.
void expect_within_rounding(const at::Tensor& got, const at::Tensor& want, const std::string& what) {
  const at::Tensor g = got.cpu().to(at::kFloat), w = want.cpu().to(at::kFloat);
  const at::Tensor diff = (g - w).abs(), bound = w.abs() / 32 + w.abs().max() / 512;
  EXPECT_EQ(diff.gt(bound).sum().item<int64_t>(), 0) << what << ": max difference " << diff.max().item<float>();
  EXPECT_LE(g.ne(w).to(at::kFloat).mean().item<double>(), 0.01) << what << ": share of outputs that differ";
}

struct RestoreExpandMma {
  ~RestoreExpandMma() { kernels::set_lora_expand_mma(false); }
};

}  // namespace

// The tensor-core expands (bf16 t in a base GEMM's columns, as the batched decode step has it) against the CPU
// reference: three adapters in place on column slices of a packed output (q/k/v-like widths, ranks of one, two and
// a partial 16-column chunk), one with the residual, and the SwiGLU form; row counts that give a warp 1, 2 and 4
// tiles of 16 rows on a 132-SM card and widths that end inside a 32-column block.
TEST(LoraKernel, CudaTensorCoreExpandWithinARoundingOfTheCpuReference) {
  RLAIF_REQUIRE_CUDA_KERNELS();
  SCOPED_TRACE(test::seed_fresh());
  RestoreExpandMma restore;
  kernels::set_lora_expand_mma(true);
  const auto bf = at::TensorOptions().dtype(at::kBFloat16);
  for (int64_t S : {9, 64, 100}) {
    SCOPED_TRACE(fmt::format("S={}", S));
    // q/k/v-like: [y_q | y_k | y_v | t_q | t_k | t_v] in one GEMM output.
    const std::vector<int64_t> outs_dim = {2048, 256, 200}, ranks = {16, 32, 6};
    const int64_t width = 2048 + 256 + 200, R = 54;
    const at::Tensor gemm = at::randn({S, width + R}, bf);
    std::vector<at::Tensor> b, b_gpu;
    for (size_t i = 0; i < 3; ++i) {
      b.push_back(at::randn({outs_dim[i], ranks[i]}) * 0.1);
      b_gpu.push_back(b.back().cuda());
    }
    const std::vector<double> scales = {2.0, 0.5, 1.0};
    auto slices = [&](const at::Tensor& p) {
      return std::vector<at::Tensor>{p.narrow(1, 0, 2048), p.narrow(1, 2048, 256), p.narrow(1, 2304, 200)};
    };
    at::Tensor ref_packed = gemm.clone(), gpu_packed = gemm.cuda();
    std::vector<at::Tensor> ref = slices(ref_packed), gpu = slices(gpu_packed);
    kernels::lora_expand_cpu(ref_packed.narrow(1, width, R), b, scales, ref, {}, ref);
    kernels::lora_expand(gpu_packed.narrow(1, width, R), b_gpu, scales, gpu, {}, gpu);
    for (size_t i = 0; i < 3; ++i) expect_within_rounding(gpu[i], ref[i], fmt::format("expand {}", i));
    // o/down-like: h = h + (y + update), t the GEMM's last 16 columns.
    const at::Tensor od = at::randn({S, 2048 + 16}, bf), h = at::randn({S, 2048}, bf);
    at::Tensor h_ref = h.clone(), h_gpu = h.cuda();
    const at::Tensor od_gpu = od.cuda();
    kernels::lora_expand_cpu(od.narrow(1, 2048, 16), {b[0].narrow(1, 0, 16).contiguous()}, {0.75},
                             {od.narrow(1, 0, 2048)}, h_ref, {h_ref});
    kernels::lora_expand(od_gpu.narrow(1, 2048, 16), {b_gpu[0].narrow(1, 0, 16).contiguous()}, {0.75},
                         {od_gpu.narrow(1, 0, 2048)}, h_gpu, {h_gpu});
    expect_within_rounding(h_gpu, h_ref, "with the residual");
    // gate/up + SwiGLU: [gate | up | t_gate | t_up]; F = 4096 at S = 100 gives 2 row tiles a warp, 11008 at 64 gives 4.
    for (int64_t F : {1000, 4096, 11008}) {
      const int64_t rg = 16, ru = 22;
      const at::Tensor gu = at::randn({S, 2 * F + rg + ru}, bf), bg = at::randn({F, rg}) * 0.1,
                       bu = at::randn({F, ru}) * 0.1;
      at::Tensor act = at::empty({S, F}, bf);
      kernels::lora_expand_silu_mul_cpu(gu.narrow(1, 2 * F, rg + ru), {bg, bu}, {2.0, 0.5}, gu.narrow(1, 0, F),
                                        gu.narrow(1, F, F), act);
      const at::Tensor gu_gpu = gu.cuda();
      at::Tensor act_gpu = at::empty({S, F}, gu_gpu.options());
      test::poison(act_gpu);
      kernels::lora_expand_silu_mul(gu_gpu.narrow(1, 2 * F, rg + ru), {bg.cuda(), bu.cuda()}, {2.0, 0.5},
                                    gu_gpu.narrow(1, 0, F), gu_gpu.narrow(1, F, F), act_gpu);
      expect_within_rounding(act_gpu, act, fmt::format("SwiGLU expand F={}", F));
    }
  }
}

// Which kernel ran: b = 1 + 2^-8 + 2^-23 and t = 1, y = 0, scale 1. The float32 sum (CPU reference, SIMT kernels)
// lies just above the tie between 1 and 1 + 2^-7 and rounds up; the MMAs see b to 16 bits (hi 1 + 2^-7, lo -2^-8),
// exactly the tie, which rounds to even: 1. So lora_expand_mma's setting is proven to switch kernels.
TEST(LoraKernel, CudaTensorCoreExpandProbe) {
  RLAIF_REQUIRE_CUDA_KERNELS();
  RestoreExpandMma restore;
  const int64_t S = 16, O = 32;
  const at::Tensor gemm = at::zeros({S, O + 2}, at::TensorOptions().dtype(at::kBFloat16));
  gemm.narrow(1, O, 1).fill_(1.0);
  const at::Tensor b = at::zeros({O, 2});
  b.narrow(1, 0, 1).fill_(1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -23));
  auto run = [&](bool mma) {
    kernels::set_lora_expand_mma(mma);
    const at::Tensor g = gemm.cuda();
    at::Tensor out = at::empty({S, O}, g.options());
    test::poison(out);
    kernels::lora_expand(g.narrow(1, O, 2), {b.cuda()}, {1.0}, {g.narrow(1, 0, O)}, {}, {out});
    return out.cpu().to(at::kFloat);
  };
  at::Tensor ref = at::empty({S, O}, gemm.options());
  kernels::lora_expand_cpu(gemm.narrow(1, O, 2), {b}, {1.0}, {gemm.narrow(1, 0, O)}, {}, {ref});
  const float up = 1.0f + std::ldexp(1.0f, -7);
  EXPECT_TRUE(ref.to(at::kFloat).eq(up).all().item<bool>()) << "CPU reference";
  EXPECT_TRUE(run(false).eq(up).all().item<bool>()) << "SIMT kernel";
  EXPECT_TRUE(run(true).eq(1.0f).all().item<bool>()) << "tensor-core kernel";
}

// The o/down update carried into the next RMSNorm (lora_expand_rms_norm): the CPU reference equals `h = h +
// project(x)` with the adapter (layers::project, PEFT's math) followed by layers::rms_norm, and CUDA's single launch
// equals the CPU reference — t float32 (the shrink kernel's) or bf16/fp32 columns of the base GEMM's output (y and t
// slices of one [S, D + r] buffer), rows of 1, 13 and 64, widths 2048 (one vector a thread) and 896, ranks 16, 8
// and 6 (scalar B loads).
TEST(LoraKernel, ExpandRmsNormEqualsProjectThenNorm) {
  SCOPED_TRACE(test::seed_fresh());
  const bool cuda = at::hasCUDA() && kernels::cuda_kernels_available();
  const double eps = 1e-6;
  for (at::ScalarType dt : test::activation_dtypes()) {
    for (int64_t S : {1, 13, 64}) {
      for (int64_t D : {2048, 896}) {
        for (int64_t r : {16, 8, 6}) {
          SCOPED_TRACE(fmt::format("{} S={} D={} r={}", c10::toString(dt), S, D, r));
          const LayerWeights L = one_projection(D, 96, r, dt);
          const LoraAdapter& ad = L.lora[0];
          const at::Tensor x = at::randn({S, 96}).to(dt), h = at::randn({S, D}).to(dt);
          const at::Tensor w = (at::rand({D}) + 0.5).to(dt);
          const at::Tensor want_h = h + layers::project(x, L, Proj::kQ, AdapterMode{true, false});
          const at::Tensor want = layers::rms_norm(want_h, w, eps);
          const at::Tensor base = layers::project(x, L, Proj::kQ, AdapterMode{false, false});
          at::Tensor t = at::empty({S, r});
          kernels::lora_shrink_cpu(x, {ad.a}, t);
          at::Tensor h_ref = h.clone(), out = at::empty_like(h);
          test::poison(out);
          kernels::lora_expand_rms_norm_cpu(t, ad.b, ad.scale, base, h_ref, w, eps, out);
          EXPECT_LE(test::rel_err(h_ref, want_h), test::tolerance(dt)) << "CPU h";
          EXPECT_LE(test::rel_err(out, want), test::tolerance(dt)) << "CPU out";
          if (!cuda) continue;
          // The GEMM's layout: [y | t] in one buffer of the activation dtype (t rounded to it, as the engine's).
          const at::Tensor packed = at::cat({base, t.to(dt)}, 1), packed_gpu = packed.cuda();
          const at::Tensor y_p = packed.narrow(1, 0, D), t_p = packed.narrow(1, D, r);
          at::Tensor h_ref_p = h.clone(), out_ref_p = at::empty_like(h);
          kernels::lora_expand_rms_norm_cpu(t_p, ad.b, ad.scale, y_p, h_ref_p, w, eps, out_ref_p);
          const at::Tensor b_gpu = ad.b.cuda(), w_gpu = w.cuda();
          for (bool gemm_columns : {false, true}) {
            SCOPED_TRACE(gemm_columns ? "t and y in one GEMM output" : "t float32, y contiguous");
            const at::Tensor tg = gemm_columns ? packed_gpu.narrow(1, D, r) : t.cuda();
            const at::Tensor yg = gemm_columns ? packed_gpu.narrow(1, 0, D) : base.cuda();
            if (!kernels::lora_expand_rms_norm_takes(tg, b_gpu, yg, h.cuda())) {
              EXPECT_NE((D + r) % (dt == at::kFloat ? 4 : 8), 0) << "an aligned layout was refused";
              continue;
            }
            at::Tensor h_gpu = h.cuda(), out_gpu = at::empty_like(h_gpu);
            test::poison(out_gpu);
            kernels::lora_expand_rms_norm(tg, b_gpu, ad.scale, yg, h_gpu, w_gpu, eps, out_gpu);
            EXPECT_LE(test::rel_err(h_gpu, gemm_columns ? h_ref_p : h_ref), test::tolerance(dt)) << "CUDA h";
            EXPECT_LE(test::rel_err(out_gpu, gemm_columns ? out_ref_p : out), test::tolerance(dt)) << "CUDA out";
          }
        }
      }
    }
  }
  // Ranks past the staging, and unaligned rows, are refused (the engine then expands and normalises separately).
  const at::Tensor h = at::zeros({2, 64}), y = at::zeros({2, 64});
  EXPECT_FALSE(kernels::lora_expand_rms_norm_takes(at::zeros({2, 300}), at::zeros({64, 300}), y, h));
  EXPECT_FALSE(kernels::lora_expand_rms_norm_takes(at::zeros({2, 4}), at::zeros({64, 4}), at::zeros({2, 66}).narrow(1, 1, 64), h));
  EXPECT_TRUE(kernels::lora_expand_rms_norm_takes(at::zeros({2, 4}), at::zeros({64, 4}), y, h));
}
