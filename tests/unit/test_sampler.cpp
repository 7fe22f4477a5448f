// Sampler against transformers' logits processors: the processed distribution equals theirs (repetition
// penalty, temperature, top-k, top-p, min-p), and sampled token frequencies fit it (chi-square).
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "engine/sampler.h"
#include "models/weights.h"
#include "test_util.h"

using namespace rlaif;

namespace {

struct SamplerCase {
  SamplingParams p;
  std::vector<int32_t> context;
};

std::vector<SamplerCase> cases() {
  std::vector<SamplerCase> c(6);
  c[0].p.temperature = 0.7;
  c[1].p.top_k = 5;
  c[2].p.top_p = 0.8;
  c[3].p.temperature = 1.3;
  c[3].p.top_k = 12;
  c[3].p.top_p = 0.9;
  c[4].p.min_p = 0.1;
  c[5].p.repetition_penalty = 1.5;
  c[5].context = {1, 3, 3, 7, 20};
  return c;
}

// Pearson chi-square statistic over tokens with expected count >= 5 (others pooled).
double chi_square(const std::vector<int64_t>& counts, const at::Tensor& probs, int64_t n, int64_t* dof) {
  double chi = 0, pooled_obs = 0, pooled_exp = 0;
  *dof = -1;
  for (size_t v = 0; v < counts.size(); ++v) {
    const double e = probs[v].item<double>() * n;
    if (e >= 5) {
      chi += (counts[v] - e) * (counts[v] - e) / e;
      ++*dof;
    } else {
      pooled_obs += counts[v];
      pooled_exp += e;
    }
  }
  if (pooled_exp >= 5) {
    chi += (pooled_obs - pooled_exp) * (pooled_obs - pooled_exp) / pooled_exp;
    ++*dof;
  }
  return chi;
}

}  // namespace

TEST(Sampler, ProcessedDistributionEqualsTransformersAndSamplesFitIt) {
  const auto dir = test::temp_dir("sampler");
  const auto cs = cases();
  const int64_t S = cs.size(), V = 40;
  at::manual_seed(17);
  at::Tensor logits = at::randn({S, V}) * 2.5;
  save_safetensors(dir / "in.safetensors", {{"logits", logits}});
  nlohmann::json j = nlohmann::json::array();
  for (const auto& c : cs)
    j.push_back({{"temperature", c.p.temperature}, {"top_k", c.p.top_k}, {"top_p", c.p.top_p}, {"min_p", c.p.min_p},
                 {"repetition_penalty", c.p.repetition_penalty}, {"context", c.context}});
  std::ofstream(dir / "cases.json") << j.dump();
  std::string log;
  ASSERT_EQ(test::run_command(test::python() + " " + (test::source_dir() / "tests/reference/sampler_reference.py").string() +
                                  " " + (dir / "in.safetensors").string() + " " + (dir / "cases.json").string() + " " +
                                  (dir / "out.safetensors").string(), &log), 0) << log;
  auto ref = load_safetensors(dir / "out.safetensors");

  for (int64_t i = 0; i < S; ++i) {
    SampleRng rng(42, i, 0);
    std::vector<int32_t> none;
    SamplerRow row{&cs[i].p, &rng, &cs[i].context, &none};
    at::Tensor ours = processed_logprobs(logits[i].unsqueeze(0), {row})[0];
    const at::Tensor& theirs = ref["case" + std::to_string(i)];
    // Same support (which tokens survive the filters) and the same probabilities on it.
    EXPECT_TRUE(at::equal(at::isinf(ours), at::isinf(theirs))) << "case " << i;
    at::Tensor finite = at::isfinite(theirs);
    EXPECT_LE((ours.masked_select(finite) - theirs.masked_select(finite)).abs().max().item<double>(), 1e-5) << "case " << i;

    // Draw 20000 tokens from this row (a batch of identical rows, each with its own stream).
    const int64_t n = 4000, rounds = 5;
    std::vector<int64_t> counts(V, 0);
    std::vector<SampleRng> rngs;
    for (int64_t k = 0; k < n; ++k) rngs.emplace_back(7 + i, k, 0);
    for (int64_t r = 0; r < rounds; ++r) {
      std::vector<SamplerRow> rows;
      for (int64_t k = 0; k < n; ++k) rows.push_back({&cs[i].p, &rngs[k], &cs[i].context, &none});
      auto res = sample_tokens(logits[i].unsqueeze(0).expand({n, V}), rows);
      const auto allowed = theirs.accessor<float, 1>();
      for (int32_t t : res.tokens) {
        ASSERT_TRUE(std::isfinite(allowed[t])) << "sampled a filtered token " << t;
        ++counts[t];
      }
    }
    int64_t dof = 0;
    const double chi = chi_square(counts, theirs.exp(), n * rounds, &dof);
    // 99.9% quantile of chi-square ~ dof + 3.1*sqrt(2 dof) + 6 (Wilson-Hilferty is tighter; this is generous).
    const double limit = dof + 3.1 * std::sqrt(2.0 * dof) + 6;
    std::printf("case %ld: chi2 %.1f with %ld dof (limit %.1f)\n", static_cast<long>(i), chi, static_cast<long>(dof), limit);
    EXPECT_LE(chi, limit) << "case " << i;
  }
}

TEST(Sampler, GreedyTakesArgmaxAndReportsBothLogprobs) {
  SamplingParams greedy;
  greedy.temperature = 0;
  SampleRng rng(1, 0, 0);
  std::vector<int32_t> none;
  at::Tensor logits = at::tensor({0.1f, 2.0f, -1.0f, 1.5f}).view({1, 4});
  auto r = sample_tokens(logits, {{&greedy, &rng, &none, &none}});
  EXPECT_EQ(r.tokens[0], 1);
  const double expect = 2.0 - std::log(std::exp(0.1) + std::exp(2.0) + std::exp(-1.0) + std::exp(1.5));
  EXPECT_NEAR(r.raw_logprobs[0], expect, 1e-6);
  EXPECT_NEAR(r.processed_logprobs[0], expect, 1e-6);
}
