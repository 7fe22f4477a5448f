// Forward pass of the Llama-style decoder (Llama, Qwen2). Numerics follow transformers step by step (RMSNorm
// in float32 then cast, rotary tables in float32, softmax in float32) so logits match it to rounding.
#include "models/decoder.h"

#include <cmath>

#include "core/error.h"
#include "models/layers.h"

namespace rlaif {

DecoderModel::DecoderModel(ModelConfig config, ModelWeights weights)
    : config_(std::move(config)), weights_(std::move(weights)), inv_freq_(rope_inv_freq(config_)) {}

std::shared_ptr<DecoderModel> DecoderModel::load(const std::filesystem::path& dir, const LoadOptions& opt) {
  ModelConfig c = load_model_config(dir);
  ModelWeights w = load_hf_weights(dir, c, opt);
  return std::make_shared<DecoderModel>(std::move(c), std::move(w));
}

at::Tensor rope_inv_freq(const ModelConfig& c) {
  const int64_t dim = c.head_dim;
  at::Tensor exponent = at::arange(0, dim, 2, at::kLong).to(at::kFloat) / static_cast<double>(dim);
  at::Tensor inv_freq = 1.0 / at::pow(c.rope.theta, exponent);
  if (c.rope.type == "llama3") {
    const double factor = c.rope.factor, low = c.rope.low_freq_factor, high = c.rope.high_freq_factor;
    const double old_len = static_cast<double>(c.rope.original_max_position_embeddings);
    const double low_freq_wavelen = old_len / low, high_freq_wavelen = old_len / high;
    at::Tensor wavelen = 2 * M_PI / inv_freq;
    at::Tensor scaled = at::where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq);
    at::Tensor smooth = (old_len / wavelen - low) / (high - low);
    at::Tensor smoothed = (1 - smooth) * scaled / factor + smooth * scaled;
    at::Tensor medium = (wavelen >= high_freq_wavelen).logical_and(wavelen <= low_freq_wavelen);
    inv_freq = at::where(medium, smoothed, scaled);
  }
  return inv_freq;
}

at::Tensor positions_from_mask(const at::Tensor& mask) {
  at::Tensor pos = mask.to(at::kLong).cumsum(-1) - 1;
  return pos.masked_fill(mask.eq(0), 1);
}


at::Tensor DecoderModel::hidden_states(const at::Tensor& tokens, const at::Tensor& mask) const {
  const ModelConfig& c = config_;
  const int64_t B = tokens.size(0), T = tokens.size(1), H = c.num_heads, KV = c.num_kv_heads, hd = c.head_dim;
  const at::Device dev = weights_.embed.device();
  const at::ScalarType dt = weights_.embed.scalar_type();
  RLAIF_CHECK(tokens.dim() == 2 && mask.sizes() == tokens.sizes(), "tokens [B,T] and mask [B,T]");
  const at::Tensor ids = tokens.to(dev, at::kLong);
  const at::Tensor m = mask.to(dev, at::kBool);

  const AdapterMode mode = mode_;
  at::Tensor h = at::embedding(weights_.embed, ids);                             // [B, T, D]
  auto [cos, sin] = layers::rope_tables(positions_from_mask(m), inv_freq_, dt);   // [B, T, hd]
  cos = cos.unsqueeze(1);                                                        // [B, 1, T, hd]
  sin = sin.unsqueeze(1);

  // Causal mask AND key padding; each query also sees itself so padded rows stay finite (never read).
  at::Tensor causal = at::ones({T, T}, at::TensorOptions().dtype(at::kBool).device(dev)).tril();
  at::Tensor allowed = causal.unsqueeze(0).logical_and(m.unsqueeze(1));          // [B, T, T]
  allowed = allowed.logical_or(at::eye(T, at::TensorOptions().dtype(at::kBool).device(dev)).unsqueeze(0));
  allowed = allowed.unsqueeze(1);                                                // [B, 1, T, T]

  for (const LayerWeights& L : weights_.layers) {
    at::Tensor x = layers::rms_norm(h, L.input_norm, c.rms_norm_eps);                    // [B, T, D]
    at::Tensor q = layers::project(x, L, Proj::kQ, mode).view({B, T, H, hd}).transpose(1, 2);    // [B, H, T, hd]
    at::Tensor k = layers::project(x, L, Proj::kK, mode).view({B, T, KV, hd}).transpose(1, 2);   // [B, KV, T, hd]
    at::Tensor v = layers::project(x, L, Proj::kV, mode).view({B, T, KV, hd}).transpose(1, 2);   // [B, KV, T, hd]
    q = layers::apply_rope(q, cos, sin);
    k = layers::apply_rope(k, cos, sin);
    if (KV != H) {  // grouped-query attention: each KV head serves H/KV query heads
      k = k.repeat_interleave(H / KV, 1);                                        // [B, H, T, hd]
      v = v.repeat_interleave(H / KV, 1);
    }
    at::Tensor o = layers::attention(q, k, v, allowed);                          // [B, H, T, hd]
    o = o.transpose(1, 2).reshape({B, T, H * hd});                               // [B, T, H*hd]
    h = h + layers::project(o, L, Proj::kO, mode);                                       // [B, T, D]
    x = layers::rms_norm(h, L.post_norm, c.rms_norm_eps);
    h = h + layers::mlp(x, L, mode);  // [B, T, D]
  }
  return layers::rms_norm(h, weights_.final_norm, c.rms_norm_eps);                       // [B, T, D]
}

at::Tensor DecoderModel::forward(const at::Tensor& tokens, const at::Tensor& mask) const {
  return at::linear(hidden_states(tokens, mask), weights_.lm_head);              // [B, T, V]
}

at::Tensor DecoderModel::token_logprobs(const at::Tensor& tokens, const at::Tensor& mask, const at::Tensor& targets,
                                        int64_t chunk_rows) const {
  at::Tensor h = hidden_states(tokens, mask);                                    // [B, T, D]
  const int64_t B = h.size(0), T = h.size(1);
  at::Tensor flat = chunked_target_logprobs(h.reshape({B * T, h.size(2)}), weights_.lm_head,
                                            targets.to(h.device(), at::kLong).reshape({B * T}), chunk_rows);
  return flat.view({B, T});                                                      // [B, T] float32
}

}  // namespace rlaif
