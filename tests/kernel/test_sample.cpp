// Sort-free sampling: the CPU reference draws what engine/sampler.cpp's sample_tokens draws (temperature, top-k,
// top-p, min-p) for the same uniforms, an inverse CDF over ATen's softmax for temperature-only rows, ties at a
// cut go to the lower index (an independent stable at::sort), frequencies follow the engine's processed
// distribution (chi-square, CPU and CUDA), and CUDA equals the reference token for token.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "engine/sampler.h"
#include "kernel_test.h"
#include "kernels/cpu/sample.h"

using namespace rlaif;

namespace {

struct Draw {
  at::Tensor tokens, logprobs;
};

// Per-row sampling settings as the op takes them.
struct Filters {
  float temperature = 1.0f;
  int32_t top_k = 0;
  float top_p = 1.0f;
  float min_p = 0.0f;
};

Draw run_sample(const at::Tensor& logits, const std::vector<float>& temps, const std::vector<double>& u) {
  const int64_t S = logits.size(0);
  const auto dev = logits.device();
  Draw d{at::empty({S}, at::TensorOptions().dtype(at::kLong).device(dev)),
         at::empty({S, 2}, at::TensorOptions().dtype(at::kFloat).device(dev))};
  test::poison(d.logprobs);
  kernels::sample(logits, at::tensor(temps, at::kFloat).to(dev), at::tensor(u, at::kDouble).to(dev), d.tokens,
                  d.logprobs);
  return {d.tokens.cpu(), d.logprobs.cpu()};
}

Draw run_filtered(const at::Tensor& logits, const std::vector<Filters>& f, const std::vector<double>& u) {
  const int64_t S = logits.size(0);
  const auto dev = logits.device();
  std::vector<float> t(S), p(S), mp(S);
  std::vector<int32_t> k(S);
  for (int64_t s = 0; s < S; ++s) t[s] = f[s].temperature, k[s] = f[s].top_k, p[s] = f[s].top_p, mp[s] = f[s].min_p;
  Draw d{at::empty({S}, at::TensorOptions().dtype(at::kLong).device(dev)),
         at::empty({S, 2}, at::TensorOptions().dtype(at::kFloat).device(dev))};
  test::poison(d.logprobs);
  kernels::sample(logits, at::tensor(t, at::kFloat).to(dev), at::tensor(k, at::kInt).to(dev),
                  at::tensor(p, at::kFloat).to(dev), at::tensor(mp, at::kFloat).to(dev),
                  at::tensor(u, at::kDouble).to(dev), d.tokens, d.logprobs);
  return {d.tokens.cpu(), d.logprobs.cpu()};
}

std::vector<double> uniforms(std::mt19937_64& g, int64_t n) {
  std::uniform_real_distribution<double> dist(0.0, 1.0);
  std::vector<double> u(n);
  for (auto& x : u) x = dist(g);
  return u;
}

SamplingParams params_of(const Filters& f) {
  SamplingParams p;
  p.temperature = f.temperature, p.top_k = f.top_k, p.top_p = f.top_p, p.min_p = f.min_p;
  return p;
}

// Filter settings covering each filter alone, combined, and the edge values (p = 0 keeps one, k = 1, k > V).
std::vector<Filters> filter_cases(int64_t V) {
  return {{1.0f, 50, 1.0f, 0.0f},  {0.7f, 0, 0.9f, 0.0f},   {1.3f, 0, 1.0f, 0.05f}, {1.0f, 20, 0.8f, 0.02f},
          {0.5f, 5, 0.5f, 0.0f},   {1.0f, 0, 0.0f, 0.0f},   {0.0f, 10, 0.5f, 0.1f}, {1.0f, 1, 1.0f, 0.0f},
          {1.0f, static_cast<int32_t>(V) + 5, 1.0f, 0.0f}, {1.0f, 0, 0.95f, 0.3f}, {2.0f, 0, 0.99f, 0.0f},
          {1.0f, 0, 1.0f, 1.0f}};
}

// Chi-square critical value at p = 1e-6 (Wilson–Hilferty; dof ≥ 1). At p = 0.001 the five settings × two devices
// failed about one run in 200 with a correct sampler (seen: chi2 30.2 at 7 dof, and 6.0 on 20x the draws, same
// logits); a token of p = 0.2 drawn at 0.22 instead adds about 50 at 20000 draws (critical value 42 at 7 dof).
double chi2_critical(int64_t dof) {
  const double d = static_cast<double>(dof), z = 4.7534;
  return d * std::pow(1.0 - 2.0 / (9.0 * d) + z * std::sqrt(2.0 / (9.0 * d)), 3.0);
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

// The engine's sampler (ATen sort + softmax + cumsum) and the reference pick the same token for the same uniform,
// with the same raw and processed log-probs. float32 logits: no ties, which that sampler breaks arbitrarily.
TEST(SampleKernel, CpuReferenceEqualsEngineSampler) {
  const uint64_t seed = test::seed_fresh();
  SCOPED_TRACE(seed);
  for (int64_t V : {37, 1000, 151936}) {
    const int64_t n = V > 10000 ? 2 : 48;  // draws per filter setting (rows of the same logits)
    const at::Tensor row = at::randn({1, V}) * 3;
    const at::Tensor logits = row.expand({n, V}).contiguous();
    for (const Filters& f : filter_cases(V)) {
      SCOPED_TRACE(fmt::format("V={} T={} k={} p={} min_p={}", V, f.temperature, f.top_k, f.top_p, f.min_p));
      const SamplingParams sp = params_of(f);
      std::vector<SampleRng> rngs, copies;
      for (int64_t i = 0; i < n; ++i) rngs.emplace_back(seed, V, i);
      copies = rngs;
      std::vector<SamplerRow> rows;
      std::vector<double> u(n, 0.0);
      for (int64_t i = 0; i < n; ++i) {
        rows.push_back({&sp, &rngs[i], nullptr, nullptr});
        if (!sp.greedy()) u[i] = copies[i].uniform();
      }
      const SampleResult want = sample_tokens(logits, rows);
      const Draw got = run_filtered(logits, std::vector<Filters>(n, f), u);
      for (int64_t i = 0; i < n; ++i) {
        EXPECT_EQ(got.tokens[i].item<int64_t>(), want.tokens[i]) << "draw " << i << " u=" << u[i];
        EXPECT_NEAR(got.logprobs[i][0].item<float>(), want.raw_logprobs[i], 1e-4) << "raw, draw " << i;
        EXPECT_NEAR(got.logprobs[i][1].item<float>(), want.processed_logprobs[i], 1e-4) << "processed, draw " << i;
      }
    }
  }
}

// Exact ties at the top-k and top-p cuts: the kept tokens are the first by (value descending, index ascending),
// taken from a stable ATen sort; every kept token is drawn, no other.
TEST(SampleKernel, TiesAtTheCutGoToTheLowerIndex) {
  const uint64_t seed = test::seed_fresh();
  SCOPED_TRACE(seed);
  std::mt19937_64 g(seed);
  const int64_t V = 64, draws = 4000;
  const at::Tensor row = at::randint(0, 4, {1, V}).to(at::kFloat);  // values 0..3: ~16 tokens per value
  const at::Tensor logits = row.expand({draws, V}).contiguous();
  auto [sorted, order] = at::sort(row[0], /*stable=*/true, /*dim=*/0, /*descending=*/true);
  const int64_t n3 = (row[0] == 3).sum().item<int64_t>();
  ASSERT_GT(n3, 3);
  // top-k cutting into the value-3 group; top-p = a mass reaching halfway into it (all e equal there).
  const double z = at::exp(row[0] - 3).to(at::kDouble).sum().item<double>();
  const int64_t want_p = n3 / 2 + 1;  // ranks 0..n3/2 (exclusive mass (r)/z < p for r ≤ n3/2)
  const float p = static_cast<float>((n3 / 2 + 0.5) / z);
  for (const auto& [f, keep] : std::vector<std::pair<Filters, int64_t>>{{{1.0f, static_cast<int32_t>(n3 - 2), 1.0f, 0.0f}, n3 - 2},
                                                                        {{1.0f, 0, p, 0.0f}, want_p}}) {
    SCOPED_TRACE(fmt::format("k={} p={} keep={}", f.top_k, f.top_p, keep));
    const at::Tensor expected = order.narrow(0, 0, keep);
    std::vector<at::Device> devs = {at::kCPU};
    if (kernels::cuda_kernels_available() && at::hasCUDA()) devs.push_back(at::kCUDA);
    for (const at::Device dev : devs) {
      const Draw d = run_filtered(logits.to(dev), std::vector<Filters>(draws, f), uniforms(g, draws));
      const at::Tensor counts = at::bincount(d.tokens, {}, V);
      EXPECT_TRUE((counts.index_select(0, expected) > 0).all().item<bool>()) << dev << ": a kept token never drawn";
      EXPECT_EQ(counts.index_select(0, expected).sum().item<int64_t>(), draws) << dev << ": a dropped token drawn";
    }
  }
}

// Token frequencies over many uniforms follow the engine's processed distribution (sampler.cpp's
// processed_logprobs) for temperature only, top-k, top-p, min-p and all combined, on the CPU and on CUDA.
TEST(SampleKernel, FrequenciesFollowTheProcessedDistribution) {
  const uint64_t seed = test::seed_fresh();
  SCOPED_TRACE(seed);
  std::mt19937_64 g(seed);
  const int64_t V = 24, draws = 20000;
  const at::Tensor row = at::randn({1, V}) * 0.7;  // flat enough that every setting keeps several tokens
  const at::Tensor logits = row.expand({draws, V}).contiguous();
  std::vector<at::Device> devs = {at::kCPU};
  if (kernels::cuda_kernels_available() && at::hasCUDA()) devs.push_back(at::kCUDA);
  for (const Filters& f : std::vector<Filters>{{0.8f, 0, 1.0f, 0.0f}, {1.0f, 6, 1.0f, 0.0f}, {1.2f, 0, 0.7f, 0.0f},
                                               {1.0f, 0, 1.0f, 0.3f}, {0.9f, 10, 0.85f, 0.05f}}) {
    SCOPED_TRACE(fmt::format("T={} k={} p={} min_p={}", f.temperature, f.top_k, f.top_p, f.min_p));
    const SamplingParams sp = params_of(f);
    SampleRng unused(0, 0, 0);
    const at::Tensor prob = processed_logprobs(row, {{&sp, &unused, nullptr, nullptr}})[0].exp().to(at::kDouble);
    const at::Tensor kept = prob > 0;
    const int64_t n_kept = kept.sum().item<int64_t>();
    ASSERT_GT(n_kept, 1);
    for (const at::Device dev : devs) {
      const Draw d = run_filtered(logits.to(dev), std::vector<Filters>(draws, f), uniforms(g, draws));
      const at::Tensor counts = at::bincount(d.tokens, {}, V).to(at::kDouble);
      EXPECT_EQ(counts.masked_select(kept.logical_not()).sum().item<double>(), 0.0) << dev << ": a dropped token drawn";
      const at::Tensor e = prob.masked_select(kept) * draws, o = counts.masked_select(kept);
      const double chi2 = ((o - e).pow(2) / e).sum().item<double>();
      EXPECT_LT(chi2, chi2_critical(n_kept - 1)) << dev << ": chi-square, " << n_kept - 1 << " dof, p = 1e-6";
    }
  }
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
        // The same rows with every filter setting, cycling over the rows; then with tie-heavy logits (integers).
        const std::vector<Filters> cases = filter_cases(V);
        std::vector<Filters> f(S);
        for (int64_t s = 0; s < S; ++s) f[s] = cases[(s + V) % cases.size()];
        for (const at::Tensor& l : {logits, at::round(logits.to(at::kFloat)).to(dt)}) {
          const Draw fref = run_filtered(l, f, u);
          const Draw fout = run_filtered(l.cuda(), f, u);
          EXPECT_TRUE(fout.tokens.equal(fref.tokens)) << "filtered tokens\n" << fout.tokens << fref.tokens;
          EXPECT_LE((fout.logprobs - fref.logprobs).abs().max().item<float>(), 1e-4) << "filtered log-probs";
        }
      }
    }
  }
}
