// The Llama-style decoder shared by the Llama and Qwen2 families: RMSNorm, rotary embeddings, grouped-query
// attention, SwiGLU. Written with ATen ops so autograd trains it; the engine (engine/) reads the same tensors.
#pragma once

#include <ATen/ATen.h>

#include <filesystem>
#include <memory>
#include <string>

#include "models/model_config.h"
#include "models/weights.h"

namespace rlaif {

// How the training forward computes attention. kEager: the float32 score matrix of layers::attention
// (transformers' eager numerics, bit-for-bit the parity tests' path). kSdpa: at::scaled_dot_product_attention
// (flash / memory-efficient kernels on CUDA: no [B, H, T, T] tensor kept for backward), causal-only when the
// padding is on the right (exact for every real query: padded keys come after all real ones), with the
// boolean mask otherwise. kAuto: kSdpa on CUDA, kEager elsewhere.
enum class AttentionKernel { kAuto, kEager, kSdpa };
// RMSNorm of the training forward. kEager: layers::rms_norm (transformers' op sequence: normalise in float32,
// cast, then scale). kFused: at::_fused_rms_norm (one kernel each way on CUDA; scales before the single rounding,
// so bf16 outputs may differ by one ulp). kAuto: kFused on CUDA, kEager elsewhere.
enum class NormKernel { kAuto, kEager, kFused };

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
  // `score_mask` [B, T] (optional; nonzero = wanted, e.g. the completion mask): the LM head runs on those
  // positions only and every other entry is 0 with no gradient (the prompt's logits are never needed).
  at::Tensor token_logprobs(const at::Tensor& tokens, const at::Tensor& mask, const at::Tensor& targets,
                            int64_t chunk_rows = 1024, const at::Tensor& score_mask = {}) const;

  void set_attention(AttentionKernel k) { attention_ = k; }
  AttentionKernel attention() const { return attention_; }
  void set_norm(NormKernel k) { norm_ = k; }
  NormKernel norm() const { return norm_; }
  // LoRA in this forward (on by default): the update accumulated into the base projection's output by one GEMM,
  // no float32 round trip of the input under autocast. Off: layers::project, PEFT's op sequence (the engine's).
  void set_fused_lora(bool on) { fused_lora_ = on; }
  bool fused_lora() const { return fused_lora_; }

  // LoRA adapters on (default) or off (the frozen base model: the KL reference, no second copy of the weights);
  // adapter dropout only in training mode.
  void set_adapters_enabled(bool on) { mode_.enabled = on; }
  void set_training(bool on) { mode_.training = on; }
  AdapterMode adapter_mode() const { return mode_; }

  // Gradient checkpointing: while grad mode is on, each decoder layer keeps only its input hidden states
  // [B, T, D] and recomputes its activations in backward (same adapters, same dropout masks, same autocast
  // state as the forward), trading one extra layer forward for O(layers · B · T · D) activation memory.
  // No effect under NoGradGuard (nothing is saved there anyway).
  void set_gradient_checkpointing(bool on) { checkpointing_ = on; }
  bool gradient_checkpointing() const { return checkpointing_; }

  const ModelConfig& config() const { return config_; }
  ModelWeights& weights() { return weights_; }
  const ModelWeights& weights() const { return weights_; }
  std::vector<std::pair<std::string, at::Tensor>> named_weights() const { return rlaif::named_weights(weights_, config_); }

 private:
  ModelConfig config_;
  ModelWeights weights_;
  at::Tensor inv_freq_;  // [hd/2] float32, with llama3 scaling applied
  AdapterMode mode_;
  bool checkpointing_ = false;
  AttentionKernel attention_ = AttentionKernel::kAuto;
  bool fused_lora_ = true;
  NormKernel norm_ = NormKernel::kAuto;
};

// Mixed precision for the training forward: inside the scope ATen's autocast runs matmuls (linear, matmul, ...)
// on `device_type` in `dtype` (bf16) while the parameters stay float32 masters; the residual stream, norms,
// softmax and log-probs stay float32. Call backward after the scope ends (as torch.autocast advises); layers
// recomputed by gradient checkpointing and the LM-head chunks re-enter the forward's precision themselves.
// Nested scopes restore the outer state; leaving the outermost one frees autocast's cached weight casts.
class AutocastScope {
 public:
  AutocastScope(at::DeviceType device_type, at::ScalarType dtype = at::kBFloat16, bool enabled = true);
  ~AutocastScope();
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  at::DeviceType device_type_;
  bool was_enabled_;
  at::ScalarType was_dtype_;
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

// "auto", "eager" or "sdpa" (config files, command lines); anything else is an Error naming `what`.
AttentionKernel parse_attention_kernel(const std::string& name, const std::string& what);

// Rotary inverse frequencies exactly as transformers computes them in float32 (default and llama3).
at::Tensor rope_inv_freq(const ModelConfig& c);
// Positions [B, T] from a padding mask: cumsum - 1, padded slots set to 1 (transformers' generate).
at::Tensor positions_from_mask(const at::Tensor& mask);
// Chunked log-softmax gather with a memory-light backward: hidden [N, D], weight [V, D], targets [N] → [N].
at::Tensor chunked_target_logprobs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                                   int64_t chunk_rows);

}  // namespace rlaif
