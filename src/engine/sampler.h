// Token sampling for the engine: penalties, temperature, top-k, top-p, min-p, then one draw per sequence from
// that sequence's own seeded generator, so a sample never depends on what else shares its batch. For each token
// it reports the log-prob under the raw model distribution (what the trainer compares against) and under the
// processed one (what was actually sampled from).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace rlaif {

struct SamplingParams {
  double temperature = 1.0;   // 0 = greedy
  int64_t top_k = 0;          // 0 = off
  double top_p = 1.0;         // 1 = off
  double min_p = 0.0;         // 0 = off
  double repetition_penalty = 1.0;  // transformers' rule on prompt + generated tokens; 1 = off
  double presence_penalty = 0.0;    // OpenAI's rule on generated tokens; 0 = off
  int64_t max_new_tokens = 128;
  uint64_t seed = 0;
  std::vector<std::string> stop_strings;
  bool greedy() const { return temperature <= 0.0; }
};

// Per-sequence random stream: a counter-free Mersenne Twister seeded from (seed, request, sample).
class SampleRng {
 public:
  SampleRng(uint64_t seed, uint64_t request, uint64_t sample);
  double uniform();  // [0, 1)
 private:
  std::mt19937_64 gen_;
};

struct SamplerRow {
  const SamplingParams* params;
  SampleRng* rng;
  const std::vector<int32_t>* context;    // prompt + generated so far (repetition penalty)
  const std::vector<int32_t>* generated;  // generated so far (presence penalty)
};

struct SampleResult {
  std::vector<int32_t> tokens;
  std::vector<float> raw_logprobs;
  std::vector<float> processed_logprobs;
};

// Processes logits [S, V] (any float dtype, any device) row by row's params and draws one token per row.
SampleResult sample_tokens(const at::Tensor& logits, const std::vector<SamplerRow>& rows);

// The processed distribution's log-probs [S, V] (penalties, temperature, top-k/p, min-p; -inf outside), exposed
// for tests that check sampled frequencies against it.
at::Tensor processed_logprobs(const at::Tensor& logits, const std::vector<SamplerRow>& rows);

}  // namespace rlaif
