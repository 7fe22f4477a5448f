// Builds the packed tensors on the CPU in one pass, then moves them to the device once.
#include "train/batch.h"

#include <algorithm>

#include "core/error.h"

namespace rlaif::train {

PackedBatch pack_sequences(const std::vector<SequenceView>& seqs, int64_t pad_id, at::Device device) {
  RLAIF_CHECK(!seqs.empty(), "no sequences to pack");
  const int64_t B = static_cast<int64_t>(seqs.size());
  int64_t T = 1;
  bool with_lp = false;
  for (const auto& s : seqs) {
    RLAIF_CHECK(s.prompt && s.completion && !s.prompt->empty(), "a sequence needs a non-empty prompt");
    RLAIF_CHECK(!s.sampler_logprobs || s.sampler_logprobs->size() == s.completion->size(),
                "{} log-probs for {} completion tokens", s.sampler_logprobs ? s.sampler_logprobs->size() : 0,
                s.completion->size());
    T = std::max<int64_t>(T, static_cast<int64_t>(s.prompt->size() + s.completion->size()));
    with_lp |= s.sampler_logprobs != nullptr;
  }
  at::Tensor tokens = at::full({B, T}, pad_id, at::kLong), attn = at::zeros({B, T}, at::kLong);
  at::Tensor targets = at::full({B, T}, pad_id, at::kLong), cmask = at::zeros({B, T}, at::kFloat);
  at::Tensor slp = at::zeros({B, T}, at::kFloat);
  auto tk = tokens.accessor<int64_t, 2>(), am = attn.accessor<int64_t, 2>(), tg = targets.accessor<int64_t, 2>();
  auto cm = cmask.accessor<float, 2>(), lp = slp.accessor<float, 2>();
  for (int64_t b = 0; b < B; ++b) {
    const auto& p = *seqs[b].prompt;
    const auto& c = *seqs[b].completion;
    const int64_t P = static_cast<int64_t>(p.size()), L = P + static_cast<int64_t>(c.size());
    for (int64_t t = 0; t < L; ++t) {
      tk[b][t] = t < P ? p[t] : c[t - P];
      am[b][t] = 1;
    }
    for (int64_t t = 0; t + 1 < L; ++t) tg[b][t] = tk[b][t + 1];
    // Completion token j sits at position P + j and is scored by column P + j - 1.
    for (int64_t j = 0; j < L - P; ++j) {
      cm[b][P + j - 1] = 1;
      if (seqs[b].sampler_logprobs) lp[b][P + j - 1] = (*seqs[b].sampler_logprobs)[j];
    }
  }
  PackedBatch out;
  out.tokens = tokens.to(device);
  out.attention_mask = attn.to(device);
  out.targets = targets.to(device);
  out.completion_mask = cmask.to(device);
  if (with_lp) out.sampler_logprobs = slp.to(device);
  return out;
}

}  // namespace rlaif::train
