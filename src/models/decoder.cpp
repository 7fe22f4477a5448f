// Forward pass of the Llama-style decoder (Llama, Qwen2). Numerics follow transformers step by step (RMSNorm
// in float32 then cast, rotary tables in float32, softmax in float32) so logits match it to rounding. Training
// extras: per-layer gradient checkpointing (a custom autograd Function) and the bf16 autocast scope.
#include "models/decoder.h"

#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <atomic>
#include <cmath>
#include <mutex>

#include "core/error.h"
#include "core/logging.h"
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

AttentionKernel parse_attention_kernel(const std::string& name, const std::string& what) {
  if (name == "auto") return AttentionKernel::kAuto;
  if (name == "eager") return AttentionKernel::kEager;
  if (name == "sdpa") return AttentionKernel::kSdpa;
  throw Error("model", fmt::format("{}: unknown attention kernel '{}'", what, name), "use auto, eager or sdpa");
}

at::Tensor positions_from_mask(const at::Tensor& mask) {
  at::Tensor pos = mask.to(at::kLong).cumsum(-1) - 1;
  return pos.masked_fill(mask.eq(0), 1);
}


namespace {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

// What one decoder layer needs besides its weights: shapes, rotary tables, the attention mask, adapter mode.
struct LayerInputs {
  int64_t B = 0, T = 0, H = 0, KV = 0, hd = 0;
  double eps = 0;
  at::Tensor cos, sin;  // [B, 1, T, hd]
  at::Tensor allowed;   // [B, 1, T, T] bool; undefined when `causal` (SDPA builds the causal mask itself)
  bool sdpa = false;    // at::scaled_dot_product_attention instead of layers::attention
  bool causal = false;  // right padding: the causal mask alone is exact for every real query
  bool fused_lora = true;
  bool fused_norm = false;  // at::_fused_rms_norm instead of layers::rms_norm
  AdapterMode mode;
};

at::Tensor train_rms_norm(const at::Tensor& x, const at::Tensor& w, const LayerInputs& in) {
  if (!in.fused_norm || x.scalar_type() != w.scalar_type()) return layers::rms_norm(x, w, in.eps);
  return std::get<0>(at::_fused_rms_norm(x, {x.size(-1)}, w, in.eps));
}

// layers::project with the LoRA update accumulated into the base output by one GEMM epilogue
// (y.addmm_(t, (scale·B)ᵀ): 2 passes over y instead of the 6 of y + (t·Bᵀ · scale).to(y) plus its backward), and
// under autocast no float32 round trip of the input: PEFT's cast to the adapter dtype is undone by the bf16 GEMM
// anyway, and dropout rounds its output once either way. Falls back to layers::project where the dtypes of a
// plain (non-autocast) forward differ (bf16 weights, float32 adapters) or the weight is quantized.
at::Tensor train_project(const at::Tensor& x, const LayerWeights& L, Proj p, const LayerInputs& in) {
  const LoraAdapter& a = L.lora[static_cast<int>(p)];
  const bool autocast = at::autocast::is_autocast_enabled(x.device().type());
  if (!in.fused_lora || !in.mode.enabled || !a.defined() || L.quant[static_cast<int>(p)].defined() ||
      (!autocast && (x.scalar_type() != a.a.scalar_type() || L.weight(p).scalar_type() != a.a.scalar_type())))
    return layers::project(x, L, p, in.mode);
  // 2-D throughout, so the in-place update is on a base tensor (no view bookkeeping in autograd).
  const at::Tensor x2 = x.reshape({-1, x.size(-1)});                                  // [N, I]
  at::Tensor y = layers::linear(x2, L.weight(p), L.bias(p));                           // [N, O]
  const at::Tensor xin = in.mode.training && a.dropout > 0 ? at::dropout(x2, a.dropout, /*train=*/true) : x2;
  const at::Tensor t = at::linear(xin, a.a);                                           // [N, r]
  // In-place ops bypass autocast: give the update GEMM y's dtype explicitly. y is not saved by linear's
  // backward, so accumulating into it is autograd-safe.
  y.addmm_(t.to(y.scalar_type()), (a.b * a.scale).to(y.scalar_type()).t());
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = y.size(1);
  return y.view(shape);                                                                // [.., O]
}

constexpr int64_t kSdpMath = 0;  // at::_fused_sdp_choice's code for the unfused math backend (sdp::SDPBackend)

const char* sdp_backend_name(int64_t b) {
  switch (b) {
    case 0: return "math";
    case 1: return "flash";
    case 2: return "memory-efficient";
    case 3: return "cudnn";
    default: return "other";
  }
}

// Attention through at::scaled_dot_product_attention with transformers' scale 1/sqrt(hd). Under autocast the
// inputs are cast to its dtype first (what autocast does inside the op anyway), so the backend query sees the
// dtypes the kernel will. Grouped K/V go in unrepeated when a fused kernel takes them (enable_gqa: no copy, and
// backward sums the groups inside the kernel); otherwise they are repeated as the eager path does.
at::Tensor sdpa_attention(at::Tensor q, at::Tensor k, at::Tensor v, const LayerInputs& in) {
  const at::DeviceType dt = q.device().type();
  if (at::autocast::is_autocast_enabled(dt)) {
    const at::ScalarType low = at::autocast::get_autocast_dtype(dt);
    q = q.to(low), k = k.to(low), v = v.to(low);
  }
  const std::optional<at::Tensor> mask = in.causal ? std::nullopt : std::optional<at::Tensor>(in.allowed);
  bool gqa = in.KV != in.H;
  int64_t backend = at::_fused_sdp_choice(q, k, v, mask, 0.0, in.causal, std::nullopt, gqa);
  if (gqa && backend == kSdpMath) {
    k = k.repeat_interleave(in.H / in.KV, 1);
    v = v.repeat_interleave(in.H / in.KV, 1);
    gqa = false;
    backend = at::_fused_sdp_choice(q, k, v, mask, 0.0, in.causal, std::nullopt, false);
  }
  // Which kernel trains is a performance fact worth one line per run (math on CUDA means no speed-up).
  static std::atomic<int64_t> logged{-1};
  const int64_t what = backend * 4 + (in.causal ? 2 : 0) + (gqa ? 1 : 0);
  if (logged.exchange(what) != what)
    log_info("training attention: scaled_dot_product_attention on {} ({}, {}, {})", c10::DeviceTypeName(dt),
             sdp_backend_name(backend), in.causal ? "causal" : "boolean mask", gqa ? "grouped K/V" : "repeated K/V");
  return at::scaled_dot_product_attention(q, k, v, mask, 0.0, in.causal, std::nullopt, gqa);
}

// One pre-norm decoder layer: h + attn(norm(h)), then + mlp(norm(.)). [B, T, D] -> [B, T, D].
at::Tensor layer_forward(at::Tensor h, const LayerWeights& L, const LayerInputs& in) {
  const int64_t B = in.B, T = in.T, H = in.H, KV = in.KV, hd = in.hd;
  at::Tensor x = train_rms_norm(h, L.input_norm, in);                                             // [B, T, D]
  at::Tensor q = train_project(x, L, Proj::kQ, in).view({B, T, H, hd}).transpose(1, 2);           // [B, H, T, hd]
  at::Tensor k = train_project(x, L, Proj::kK, in).view({B, T, KV, hd}).transpose(1, 2);          // [B, KV, T, hd]
  at::Tensor v = train_project(x, L, Proj::kV, in).view({B, T, KV, hd}).transpose(1, 2);          // [B, KV, T, hd]
  q = layers::apply_rope(q, in.cos, in.sin);
  k = layers::apply_rope(k, in.cos, in.sin);
  at::Tensor o;
  if (in.sdpa) {
    o = sdpa_attention(q, k, v, in);                                                              // [B, H, T, hd]
  } else {
    if (KV != H) {  // grouped-query attention: each KV head serves H/KV query heads
      k = k.repeat_interleave(H / KV, 1);                                                         // [B, H, T, hd]
      v = v.repeat_interleave(H / KV, 1);
    }
    o = layers::attention(q, k, v, in.allowed);                                                   // [B, H, T, hd]
  }
  o = o.transpose(1, 2).reshape({B, T, H * hd});                                                  // [B, T, H*hd]
  h = h + train_project(o, L, Proj::kO, in);                                                      // [B, T, D]
  x = train_rms_norm(h, L.post_norm, in);
  // SwiGLU as layers::mlp, through train_project.
  at::Tensor g = at::silu(train_project(x, L, Proj::kGate, in)) * train_project(x, L, Proj::kUp, in);  // [B, T, F]
  return h + train_project(g, L, Proj::kDown, in);                                                // [B, T, D]
}

// The layer's tensors that autograd must reach (those requiring grad): full fine-tuning's weights, norms and
// biases, or LoRA's A and B.
std::vector<at::Tensor> trainable_tensors(const LayerWeights& L) {
  std::vector<at::Tensor> out;
  for (const at::Tensor* t : {&L.input_norm, &L.wq, &L.bq, &L.wk, &L.bk, &L.wv, &L.bv, &L.wo, &L.bo, &L.post_norm,
                              &L.w_gate, &L.b_gate, &L.w_up, &L.b_up, &L.w_down, &L.b_down})
    if (t->defined() && t->requires_grad()) out.push_back(*t);
  for (const LoraAdapter& a : L.lora)
    for (const at::Tensor* t : {&a.a, &a.b})
      if (t->defined() && t->requires_grad()) out.push_back(*t);
  return out;
}

bool has_dropout(const LayerWeights& L) {
  for (const LoraAdapter& a : L.lora)
    if (a.defined() && a.dropout > 0) return true;
  return false;
}

// Everything a checkpointed layer's backward needs to redo its forward exactly. Held by the autograd node; the
// weight handles are the model's own leaves, so gradients land on them.
struct LayerCall : torch::CustomClassHolder {
  LayerWeights weights;
  LayerInputs inputs;
  std::vector<at::Tensor> params;  // trainable_tensors(weights), the Function's list input
  at::Device device = at::kCPU;
  bool autocast = false;
  at::ScalarType autocast_dtype = at::kBFloat16;
  at::Tensor rng_state;  // the default generator's state before the forward (dropout), undefined without dropout
};

at::Generator default_generator(const at::Device& d) { return at::globalContext().defaultGenerator(d); }

// A decoder layer whose activations are recomputed in backward (gradient checkpointing): forward saves only
// its input; backward replays the layer under the forward's RNG and autocast state, then differentiates it.
struct CheckpointedLayer : public torch::autograd::Function<CheckpointedLayer> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& h, at::TensorList params,
                            const c10::intrusive_ptr<LayerCall>& call) {
    ctx->save_for_backward({h});
    ctx->saved_data["call"] = c10::IValue::make_capsule(call);
    return layer_forward(h, call->weights, call->inputs);
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const at::Tensor h = ctx->get_saved_variables()[0];
    auto call = c10::static_intrusive_pointer_cast<LayerCall>(ctx->saved_data["call"].toCapsule());
    const bool need_h = ctx->needs_input_grad(0);
    std::vector<at::Tensor> wrt;
    const at::Tensor h_in = h.detach().requires_grad_(need_h);
    if (need_h) wrt.push_back(h_in);
    std::vector<size_t> param_slot;  // which params get a gradient (position in call->params)
    for (size_t i = 0; i < call->params.size(); ++i)
      if (ctx->needs_input_grad(1 + i)) {
        wrt.push_back(call->params[i]);
        param_slot.push_back(i);
      }
    tensor_list result(2 + call->params.size());  // h, each param, the (non-tensor) call
    if (wrt.empty()) return result;

    at::Tensor out;
    {
      // The recompute sees the forward's dropout masks (generator state replayed, then put back so the RNG
      // stream of the rest of the run is untouched) and the forward's autocast precision.
      at::Generator gen;
      at::Tensor current;
      if (call->rng_state.defined()) {
        gen = default_generator(call->device);
        std::lock_guard<std::mutex> lock(gen.mutex());
        current = gen.get_state();
        gen.set_state(call->rng_state);
      }
      AutocastScope ac(call->device.type(), call->autocast_dtype, call->autocast);
      at::AutoGradMode grad_on(true);
      out = layer_forward(h_in, call->weights, call->inputs);
      if (current.defined()) {
        std::lock_guard<std::mutex> lock(gen.mutex());
        gen.set_state(current);
      }
    }
    const tensor_list g = torch::autograd::grad({out}, wrt, {grads[0]}, /*retain_graph=*/false,
                                                /*create_graph=*/false, /*allow_unused=*/true);
    size_t k = 0;
    if (need_h) result[0] = g[k++];
    for (size_t i : param_slot) result[1 + i] = g[k++];
    return result;
  }
};

}  // namespace

AutocastScope::AutocastScope(at::DeviceType device_type, at::ScalarType dtype, bool enabled)
    : device_type_(device_type),
      was_enabled_(at::autocast::is_autocast_enabled(device_type)),
      was_dtype_(at::autocast::get_autocast_dtype(device_type)) {
  at::autocast::set_autocast_enabled(device_type_, enabled);
  at::autocast::set_autocast_dtype(device_type_, dtype);
  at::autocast::increment_nesting();
}

AutocastScope::~AutocastScope() {
  // Leaving the outermost scope drops the cached low-precision copies of the weights (torch.autocast's __exit__).
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  at::autocast::set_autocast_enabled(device_type_, was_enabled_);
  at::autocast::set_autocast_dtype(device_type_, was_dtype_);
}

at::Tensor DecoderModel::hidden_states(const at::Tensor& tokens, const at::Tensor& mask) const {
  const ModelConfig& c = config_;
  const int64_t B = tokens.size(0), T = tokens.size(1);
  const at::Device dev = weights_.embed.device();
  const at::ScalarType dt = weights_.embed.scalar_type();
  RLAIF_CHECK(tokens.dim() == 2 && mask.sizes() == tokens.sizes(), "tokens [B,T] and mask [B,T]");
  const at::Tensor ids = tokens.to(dev, at::kLong);
  const at::Tensor m = mask.to(dev, at::kBool);

  LayerInputs in;
  in.B = B, in.T = T, in.H = c.num_heads, in.KV = c.num_kv_heads, in.hd = c.head_dim, in.eps = c.rms_norm_eps;
  in.mode = mode_;
  in.fused_lora = fused_lora_;
  in.fused_norm = norm_ == NormKernel::kFused || (norm_ == NormKernel::kAuto && dev.is_cuda());
  at::Tensor h = at::embedding(weights_.embed, ids);                             // [B, T, D]
  auto [cos, sin] = layers::rope_tables(positions_from_mask(m), inv_freq_, dt);   // [B, T, hd]
  in.cos = cos.unsqueeze(1);                                                     // [B, 1, T, hd]
  in.sin = sin.unsqueeze(1);

  in.sdpa = attention_ == AttentionKernel::kSdpa || (attention_ == AttentionKernel::kAuto && dev.is_cuda());
  // Right padding (no real token after a padded one, one device sync): a real query's causal window holds only
  // real keys, so SDPA needs no mask and may take its fastest kernels. Padded queries then read padded keys;
  // their outputs are never scored.
  in.causal = in.sdpa && (T < 2 || !m.narrow(1, 1, T - 1).gt(m.narrow(1, 0, T - 1)).any().item<bool>());
  if (!in.causal) {
    // Causal mask AND key padding; each query also sees itself so padded rows stay finite (never read).
    at::Tensor causal = at::ones({T, T}, at::TensorOptions().dtype(at::kBool).device(dev)).tril();
    at::Tensor allowed = causal.unsqueeze(0).logical_and(m.unsqueeze(1));        // [B, T, T]
    allowed = allowed.logical_or(at::eye(T, at::TensorOptions().dtype(at::kBool).device(dev)).unsqueeze(0));
    in.allowed = allowed.unsqueeze(1);                                           // [B, 1, T, T]
  }

  const bool checkpoint = checkpointing_ && at::GradMode::is_enabled();
  const bool autocast = at::autocast::is_autocast_enabled(dev.type());
  for (const LayerWeights& L : weights_.layers) {
    std::vector<at::Tensor> params = checkpoint ? trainable_tensors(L) : std::vector<at::Tensor>{};
    if (!checkpoint || (params.empty() && !h.requires_grad())) {  // nothing to differentiate: plain forward
      h = layer_forward(h, L, in);
      continue;
    }
    auto call = c10::make_intrusive<LayerCall>();
    call->weights = L;
    call->inputs = in;
    call->params = std::move(params);
    call->device = dev;
    call->autocast = autocast;
    call->autocast_dtype = at::autocast::get_autocast_dtype(dev.type());
    if (in.mode.training && has_dropout(L)) {
      at::Generator gen = default_generator(dev);
      std::lock_guard<std::mutex> lock(gen.mutex());
      call->rng_state = gen.get_state();
    }
    h = CheckpointedLayer::apply(h, at::TensorList(call->params), call);
  }
  return train_rms_norm(h, weights_.final_norm, in);                                     // [B, T, D]
}

at::Tensor DecoderModel::forward(const at::Tensor& tokens, const at::Tensor& mask) const {
  return at::linear(hidden_states(tokens, mask), weights_.lm_head);              // [B, T, V]
}

at::Tensor DecoderModel::token_logprobs(const at::Tensor& tokens, const at::Tensor& mask, const at::Tensor& targets,
                                        int64_t chunk_rows, const at::Tensor& score_mask) const {
  at::Tensor h = hidden_states(tokens, mask);                                    // [B, T, D]
  const int64_t B = h.size(0), T = h.size(1), D = h.size(2);
  at::Tensor flat_targets = targets.to(h.device(), at::kLong).reshape({B * T});
  at::Tensor rows;  // the scored positions of the flattened [B * T] (undefined: all of them)
  if (score_mask.defined()) {
    RLAIF_CHECK(score_mask.sizes() == tokens.sizes(), "score_mask [B,T] like tokens");
    rows = score_mask.to(h.device()).reshape({B * T}).ne(0).nonzero().squeeze(1);  // one device sync
  }
  at::Tensor head = weights_.lm_head;
  const at::DeviceType dt = head.device().type();
  if (at::autocast::is_autocast_enabled(dt)) {
    // The chunked log-softmax recomputes logits in backward, outside the autocast scope: cast explicitly so
    // forward and backward both multiply in the autocast dtype (the cast is differentiable for full FT).
    const at::ScalarType low = at::autocast::get_autocast_dtype(dt);
    h = h.to(low);
    head = head.to(low);
  }
  h = h.reshape({B * T, D});
  if (!rows.defined()) return chunked_target_logprobs(h, head, flat_targets, chunk_rows).view({B, T});
  const at::Tensor picked = chunked_target_logprobs(h.index_select(0, rows), head, flat_targets.index_select(0, rows),
                                                    chunk_rows);              // [rows] float32
  // index_copy is differentiable in its source: the scored positions get their gradient, the rest none.
  return at::zeros({B * T}, picked.options()).index_copy(0, rows, picked).view({B, T});  // [B, T] float32
}

}  // namespace rlaif
