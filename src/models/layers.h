// The decoder's building blocks with transformers' exact numerics, shared by the training forward
// (models/decoder.cpp) and the generation engine (engine/), so both compute the same function.
#pragma once

#include <ATen/ATen.h>

#include "models/weights.h"

namespace rlaif::layers {

// RMSNorm as transformers: normalise in float32, cast back, then scale.
inline at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  at::Tensor h = x.to(at::kFloat);
  h = h * at::rsqrt(h.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return w * h.to(x.scalar_type());
}

inline at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  return at::linear(x, w, b.defined() ? std::optional<at::Tensor>(b) : std::nullopt);
}

// y + the adapter's update for input x, as PEFT computes it: the input cast to the adapter's dtype (dropout while
// training), the update cast back to y's dtype, then added.
inline at::Tensor add_lora(const at::Tensor& y, const at::Tensor& x, const LoraAdapter& a, bool training) {
  at::Tensor xin = x.to(a.a.scalar_type());
  if (training && a.dropout > 0) xin = at::dropout(xin, a.dropout, /*train=*/true);
  return y + (at::linear(at::linear(xin, a.a), a.b) * a.scale).to(y.scalar_type());
}

// One projection of a layer with its LoRA adapter (if attached and enabled). A quantized weight (MLX folders)
// computes with kernels::quant_linear on its packed form.
inline at::Tensor project(const at::Tensor& x, const LayerWeights& L, Proj p, AdapterMode mode) {
  const QuantizedTensor& q = L.quant[static_cast<int>(p)];
  at::Tensor y = q.defined() ? quant_linear(x, q, L.bias(p)) : linear(x, L.weight(p), L.bias(p));
  const LoraAdapter& a = L.lora[static_cast<int>(p)];
  return mode.enabled && a.defined() ? add_lora(y, x, a, mode.training) : y;
}

// Token embeddings [..., D] for ids [...]: from the packed rows when the embedding is quantized.
inline at::Tensor embed(const ModelWeights& W, const at::Tensor& ids) {
  return W.embed_q.defined() ? W.embed_q.rows(ids, W.embed.scalar_type()) : at::embedding(W.embed, ids);
}

// LM-head logits [..., V]: a quantized head (or the quantized embedding, tied) multiplies its packed form, as
// mlx_lm's QuantizedEmbedding.as_linear does.
inline at::Tensor logits(const ModelWeights& W, const at::Tensor& h) {
  return W.lm_head_q.defined() ? quant_linear(h, W.lm_head_q) : at::linear(h, W.lm_head);
}

// SwiGLU MLP of a layer: down(silu(gate(x)) * up(x)), adapters included.
inline at::Tensor mlp(const at::Tensor& x, const LayerWeights& L, AdapterMode mode) {
  return project(at::silu(project(x, L, Proj::kGate, mode)) * project(x, L, Proj::kUp, mode), L, Proj::kDown, mode);
}

// cos/sin tables [..., hd] for float positions [...]: computed in float32, then cast to `dtype`.
inline std::pair<at::Tensor, at::Tensor> rope_tables(const at::Tensor& positions, const at::Tensor& inv_freq,
                                                     at::ScalarType dtype) {
  at::Tensor freqs = positions.to(at::kFloat).unsqueeze(-1) * inv_freq.to(positions.device());  // [..., hd/2]
  at::Tensor emb = at::cat({freqs, freqs}, -1);                                                  // [..., hd]
  return {emb.cos().to(dtype), emb.sin().to(dtype)};
}

// x * cos + rotate_half(x) * sin (the NeoX / transformers layout: halves, not interleaved pairs).
inline at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  at::Tensor rotated = at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
  return x * cos + rotated * sin;
}

// Softmax attention with scores in float32 (transformers' eager path): q [.., H, Tq, hd], k/v [.., H, Tk, hd],
// `allowed` broadcastable to [.., H, Tq, Tk].
inline at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& allowed) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
  at::Tensor scores = (at::matmul(q, k.transpose(-1, -2)) * scale).to(at::kFloat);
  scores = scores.masked_fill(allowed.logical_not(), -std::numeric_limits<float>::infinity());
  return at::matmul(at::softmax(scores, -1).to(q.scalar_type()), v);
}

}  // namespace rlaif::layers
