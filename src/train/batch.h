// Packs (prompt, completion) token sequences into the right-padded [B, T] tensors the loss consumes, with the
// completion mask and the sampler's per-token log-probs aligned to token_logprobs' columns (column t scores
// token t+1). Only completion tokens, the EOS included, are 1 in the mask: never the prompt, never padding.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace rlaif::train {

struct SequenceView {
  const std::vector<int32_t>* prompt = nullptr;
  const std::vector<int32_t>* completion = nullptr;       // generated tokens, EOS included when it ended the sequence
  const std::vector<float>* sampler_logprobs = nullptr;   // one per completion token (optional)
};

struct PackedBatch {
  at::Tensor tokens;            // [B, T] int64, right-padded with pad_id
  at::Tensor attention_mask;    // [B, T] int64: 1 on prompt + completion
  at::Tensor targets;           // [B, T] int64: tokens shifted left by one (pad_id in the last column)
  at::Tensor completion_mask;   // [B, T] float32: 1 where the target is a completion token
  at::Tensor sampler_logprobs;  // [B, T] float32 aligned with targets (0 off the mask); undefined if none given
};

// T = the longest prompt + completion. A sequence with an empty completion has an all-zero completion mask.
PackedBatch pack_sequences(const std::vector<SequenceView>& seqs, int64_t pad_id, at::Device device = at::kCPU);

}  // namespace rlaif::train
