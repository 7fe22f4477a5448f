// The Llama-style decoder shared by the Llama and Qwen2 families: RMSNorm, rotary embeddings, grouped-query
// attention, SwiGLU. Written with ATen ops so autograd trains it; the engine (engine/) reads the same tensors.
#pragma once

#include <ATen/ATen.h>

#include <filesystem>
#include <memory>

#include "models/model_config.h"
#include "models/weights.h"

namespace rlaif {

class DecoderModel {
 public:
  DecoderModel(ModelConfig config, ModelWeights weights);
  // Loads an HF folder (config.json + safetensors).
  static std::shared_ptr<DecoderModel> load(const std::filesystem::path& dir, const LoadOptions& opt = {});

  // tokens [B, T] int64, mask [B, T] (1 = real token, 0 = padding, left or right) → logits [B, T, V].
  // Positions come from the mask as transformers' generate derives them (cumsum(mask) - 1).
  at::Tensor forward(const at::Tensor& tokens, const at::Tensor& mask) const;
  // The final-normed hidden states [B, T, D] (what the LM head multiplies).
  at::Tensor hidden_states(const at::Tensor& tokens, const at::Tensor& mask) const;
  // log p(targets[b, t] | tokens[b, :t+1]) as float32 [B, T], computing the log-softmax over the vocabulary
  // `chunk_rows` rows at a time (also in backward), so no [B, T, V] logits tensor ever exists.
  at::Tensor token_logprobs(const at::Tensor& tokens, const at::Tensor& mask, const at::Tensor& targets,
                            int64_t chunk_rows = 1024) const;

  // LoRA adapters on (default) or off (the frozen base model: the KL reference, no second copy of the weights);
  // adapter dropout only in training mode.
  void set_adapters_enabled(bool on) { mode_.enabled = on; }
  void set_training(bool on) { mode_.training = on; }
  AdapterMode adapter_mode() const { return mode_; }

  const ModelConfig& config() const { return config_; }
  ModelWeights& weights() { return weights_; }
  const ModelWeights& weights() const { return weights_; }
  std::vector<std::pair<std::string, at::Tensor>> named_weights() const { return rlaif::named_weights(weights_, config_); }

 private:
  ModelConfig config_;
  ModelWeights weights_;
  at::Tensor inv_freq_;  // [hd/2] float32, with llama3 scaling applied
  AdapterMode mode_;
};

// Scope in which the model computes without its adapters (the reference policy).
class AdaptersOff {
 public:
  explicit AdaptersOff(DecoderModel& m) : m_(m), was_(m.adapter_mode().enabled) { m_.set_adapters_enabled(false); }
  ~AdaptersOff() { m_.set_adapters_enabled(was_); }
  AdaptersOff(const AdaptersOff&) = delete;
  AdaptersOff& operator=(const AdaptersOff&) = delete;

 private:
  DecoderModel& m_;
  bool was_;
};

// Rotary inverse frequencies exactly as transformers computes them in float32 (default and llama3).
at::Tensor rope_inv_freq(const ModelConfig& c);
// Positions [B, T] from a padding mask: cumsum - 1, padded slots set to 1 (transformers' generate).
at::Tensor positions_from_mask(const at::Tensor& mask);
// Chunked log-softmax gather with a memory-light backward: hidden [N, D], weight [V, D], targets [N] → [N].
at::Tensor chunked_target_logprobs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                                   int64_t chunk_rows);

}  // namespace rlaif
