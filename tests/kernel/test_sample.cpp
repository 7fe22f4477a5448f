// Sort-free sampling: the CPU reference draws what an independent inverse CDF over ATen's softmax draws (cumsum
// in float64 + searchsorted, as engine/sampler.cpp does), its frequencies follow softmax(logits / T) (chi-square),
// greedy rows take ATen's argmax, the log-probs equal ATen's log_softmax at the token; CUDA equals the reference.
#include <gtest/gtest.h>

#include <random>

#include "kernel_test.h"
#include "kernels/cpu/sample.h"

using namespace rlaif;

namespace {

struct Draw {
  at::Tensor tokens, logprobs;
};

Draw run_sample(const at::Tensor& logits, const std::vector<float>& temps, const std::vector<double>& u) {
  const int64_t S = logits.size(0);
  const auto dev = logits.device();
  Draw d{at::empty({S}, at::TensorOptions().dtype(at::kLong).device(dev)),
         at::empty({S, 2}, at::TensorOptions().dtype(at::kFloat).device(dev))};
  kernels::sample(logits, at::tensor(temps, at::kFloat).to(dev), at::tensor(u, at::kDouble).to(dev), d.tokens,
                  d.logprobs);
  return {d.tokens.cpu(), d.logprobs.cpu()};
}

std::vector<double> uniforms(std::mt19937_64& g, int64_t n) {
  std::uniform_real_distribution<double> dist(0.0, 1.0);
  std::vector<double> u(n);
  for (auto& x : u) x = dist(g);
  return u;
}

}  // namespace

TEST(SampleKernel, CpuReferenceIsTheInverseCdfOfAtenSoftmax) {
  const uint64_t seed = test::seed_fresh();
  SCOPED_TRACE(seed);
  std::mt19937_64 g(seed);
  for (at::ScalarType dt : test::activation_dtypes()) {
    for (int64_t V : {37, 1000, 151936}) {
      SCOPED_TRACE(fmt::format("{} V={}", c10::toString(dt), V));
      const int64_t S = 6;
      const at::Tensor logits = (at::randn({S, V}) * 3).to(dt);
      const std::vector<float> temps = {1.0f, 0.7f, 0.0f, 1.3f, -1.0f, 1.0f};
      const std::vector<double> u = uniforms(g, S);
      const Draw d = run_sample(logits, temps, u);
      const at::Tensor x = logits.to(at::kFloat);
      for (int64_t s = 0; s < S; ++s) {
        const int64_t tok = d.tokens[s].item<int64_t>();
        const at::Tensor raw = at::log_softmax(x[s], -1);
        EXPECT_NEAR(d.logprobs[s][0].item<float>(), raw[tok].item<float>(), 1e-4) << "raw log-prob, row " << s;
        if (temps[s] <= 0) {
          EXPECT_EQ(tok, x[s].argmax().item<int64_t>()) << "greedy row " << s;
          EXPECT_EQ(d.logprobs[s][1].item<float>(), d.logprobs[s][0].item<float>());
          continue;
        }
        const at::Tensor proc = at::log_softmax(x[s] / temps[s], -1);
        EXPECT_NEAR(d.logprobs[s][1].item<float>(), proc[tok].item<float>(), 1e-4) << "processed log-prob, row " << s;
        const at::Tensor cdf = proc.to(at::kDouble).exp().cumsum(0);
        const at::Tensor target = at::full({1}, u[s], at::kDouble) * cdf[V - 1];
        EXPECT_EQ(tok, at::searchsorted(cdf, target, false, /*right=*/true).item<int64_t>()) << "row " << s;
      }
    }
  }
}

TEST(SampleKernel, CpuFrequenciesFollowTheTemperedSoftmax) {
  const uint64_t seed = test::seed_fresh();
  SCOPED_TRACE(seed);
  std::mt19937_64 g(seed);
  const int64_t V = 12, draws = 20000;
  const float T = 0.8f;
  const at::Tensor logits = at::randn({1, V}).expand({draws, V}).contiguous();
  const Draw d = run_sample(logits, std::vector<float>(draws, T), uniforms(g, draws));
  const at::Tensor p = at::softmax(logits[0] / T, -1).to(at::kDouble);
  const at::Tensor counts = at::bincount(d.tokens, {}, V).to(at::kDouble);
  const double chi2 = ((counts - p * draws).pow(2) / (p * draws)).sum().item<double>();
  EXPECT_LT(chi2, 31.26) << "chi-square, 11 degrees of freedom, p = 0.001";
}

TEST(SampleKernel, CudaEqualsCpuReference) {
  RLAIF_REQUIRE_CUDA_KERNELS();
  const uint64_t seed = test::seed_fresh();
  SCOPED_TRACE(seed);
  std::mt19937_64 g(seed);
  for (at::ScalarType dt : test::activation_dtypes()) {
    for (int64_t V : {37, 256, 1000, 49152, 151936}) {
      for (int64_t S : {1, 5, 64}) {
        SCOPED_TRACE(fmt::format("{} V={} S={}", c10::toString(dt), V, S));
        // Rows of a wider tensor: the row stride differs from V.
        const at::Tensor wide = (at::randn({S, V + 8}) * 4).to(dt);
        const at::Tensor logits = wide.narrow(1, 3, V);
        std::vector<float> temps(S);
        for (int64_t s = 0; s < S; ++s) temps[s] = std::vector<float>{1.0f, 0.0f, 0.6f, 1.5f}[s % 4];
        const std::vector<double> u = uniforms(g, S);
        const Draw ref = run_sample(logits, temps, u);
        const Draw out = run_sample(logits.cuda(), temps, u);
        EXPECT_TRUE(out.tokens.equal(ref.tokens)) << "tokens";
        EXPECT_LE((out.logprobs - ref.logprobs).abs().max().item<float>(), 1e-4) << "log-probs";
      }
    }
  }
}
