// Engine loop: admit (reserve KV blocks) → prefill (prompt once, fork samples) → decode_step (one token for
// every running sequence) → retire (free blocks, let waiting requests in). The model step runs on the weights'
// device with ATen ops and the numerics of models/layers.h, so its log-probs equal the training forward's.
#include "engine/engine.h"

#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <chrono>
#include <deque>
#include <numeric>
#include <optional>
#include <unordered_set>
#include <utility>

#include "core/error.h"
#include "core/logging.h"
#include "kernels/cpu/lora.h"
#include "kernels/cpu/paged_attention.h"
#include "kernels/cpu/quant_small_linear.h"
#include "kernels/cpu/registry.h"
#include "kernels/cpu/rms_norm.h"
#include "kernels/cpu/sample.h"
#include "kernels/cpu/silu_mul.h"
#include "kernels/cpu/small_linear.h"
#include "kernels/cpu/tuned_linear.h"
#include "models/layers.h"
#include "models/lora.h"

namespace rlaif {

namespace {
double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

struct Engine::Seq {
  int64_t request = 0, sample = 0;
  const SamplingParams* params = nullptr;
  std::vector<int32_t> context;    // prompt + generated
  int64_t prompt_len = 0;
  int64_t cached = 0;              // tokens whose K/V are in the cache
  std::vector<int> blocks;
  std::vector<int32_t> generated;
  std::vector<float> logprobs, processed;
  std::optional<SampleRng> rng;
  int64_t max_len = 0;             // prompt + max_new_tokens: the most blocks it may ever hold
  std::string finish;
};

Engine::Engine(std::shared_ptr<DecoderModel> model, EngineOptions options)
    : model_(std::move(model)), options_(std::move(options)), inv_freq_(rope_inv_freq(model_->config())) {
  RLAIF_CHECK(options_.max_batch > 0 && options_.block_size > 0, "engine options");
  inv_freq_dev_ = inv_freq_.to(model_->weights().embed.device());
}

Engine::~Engine() { drop_graphs(); }

void Engine::drop_graphs() {
  for (auto& [b, g] : graphs_)
    if (g.graph) kernels::kernel_registry().graph_destroy(g.graph);
  graphs_.clear();
}

std::string Engine::backend() const {
  const at::Tensor& w = model_->weights().embed;
  return fmt::format("{}, {}", w.device().is_cuda() ? "cuda" : "cpu", c10::toString(w.scalar_type()));
}

int64_t Engine::blocks_for(int64_t tokens) const { return (tokens + options_.block_size - 1) / options_.block_size; }

// Worst-case blocks for a request: the shared full prompt blocks once, then each sample's own tail.
int64_t Engine::reservation(const GenerationRequest& r) const {
  const int64_t total = static_cast<int64_t>(r.prompt.size()) + r.params.max_new_tokens;
  const int64_t shared = options_.share_prefix ? static_cast<int64_t>(r.prompt.size()) / options_.block_size : 0;
  return shared + r.num_samples * (blocks_for(total) - shared);
}

void Engine::ensure_cache(const std::vector<GenerationRequest>& requests) {
  int64_t need = 0, longest = 0;
  for (const auto& r : requests) {
    need = std::max(need, reservation(r));
    longest = std::max<int64_t>(longest, static_cast<int64_t>(r.prompt.size()) + r.params.max_new_tokens);
  }
  int64_t blocks = options_.num_blocks > 0 ? options_.num_blocks
                                           : std::max(need, options_.max_batch * blocks_for(longest));
  if (options_.num_blocks > 0 && need > blocks)
    throw Error("engine", fmt::format("one request needs {} KV blocks but the cache has {}", need, blocks),
                "raise the engine's num_blocks or lower max_new_tokens / num_samples");
  if (cache_ && cache_->num_blocks() >= blocks && max_blocks_per_seq_ >= blocks_for(longest)) return;
  drop_graphs();  // captured graphs point into the old cache
  max_blocks_per_seq_ = blocks_for(longest);
  const at::Tensor& w = model_->weights().embed;
  cache_ = std::make_unique<PagedKvCache>(model_->config(), blocks, options_.block_size, w.scalar_type(), w.device());
}

void Engine::grow_blocks(Seq& s, int64_t new_len) {
  while (static_cast<int64_t>(s.blocks.size()) < blocks_for(new_len)) {
    s.blocks.push_back(cache_->alloc());
  }
}

void Engine::release(Seq& s) {
  for (int b : s.blocks) cache_->release(b);
  s.blocks.clear();
}

at::Tensor Engine::forward_step(const std::vector<Seq*>& seqs, const std::vector<std::vector<int32_t>>& new_tokens) {
  const ModelConfig& c = model_->config();
  const ModelWeights& W = model_->weights();
  const at::Device dev = W.embed.device();
  const at::ScalarType dt = W.embed.scalar_type();
  const int64_t S = static_cast<int64_t>(seqs.size()), H = c.num_heads, KV = c.num_kv_heads, hd = c.head_dim;
  const int64_t bs = options_.block_size;
  int64_t Tq = 0, Lk = 0;
  // Fresh prompts on the GPU (every prefill): each sequence attends only to its own new tokens, so causal
  // flash attention over the right-padded batch replaces the gather from the cache — a real query at position j
  // sees keys 0..j, all its own; padding queries come last and are never read.
  bool fresh = dev.is_cuda();
  for (int64_t i = 0; i < S; ++i) fresh = fresh && seqs[i]->cached == 0;
  for (int64_t i = 0; i < S; ++i) {
    Tq = std::max<int64_t>(Tq, new_tokens[i].size());
    Lk = std::max<int64_t>(Lk, seqs[i]->cached + new_tokens[i].size());
  }
  // Host-side index tensors: new tokens padded to Tq, their cache rows, and every context row padded to Lk.
  std::vector<int64_t> tok(S * Tq, 0), pos(S * Tq, 0), write_rows, write_src, ctx(S * Lk, 0), key_pos(S * Lk, 1 << 30),
      last(S, 0);
  for (int64_t i = 0; i < S; ++i) {
    Seq& s = *seqs[i];
    const int64_t n = new_tokens[i].size(), start = s.cached;
    grow_blocks(s, start + n);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t p = start + j;
      tok[i * Tq + j] = new_tokens[i][j];
      pos[i * Tq + j] = p;
      write_rows.push_back(s.blocks[p / bs] * bs + p % bs);
      write_src.push_back(i * Tq + j);
    }
    for (int64_t j = n; j < Tq; ++j) pos[i * Tq + j] = start + n - 1;  // padding queries repeat the last position
    for (int64_t p = 0; !fresh && p < start + n; ++p) {  // fresh prompts attend without reading the cache back
      ctx[i * Lk + p] = s.blocks[p / bs] * bs + p % bs;
      key_pos[i * Lk + p] = p;
    }
    last[i] = i * Tq + n - 1;
    s.cached = start + n;
  }
  auto to_dev = [&](const std::vector<int64_t>& v, std::vector<int64_t> shape) {
    return at::tensor(v, at::kLong).view(shape).to(dev);
  };
  const at::Tensor tokens = to_dev(tok, {S, Tq}), positions = to_dev(pos, {S, Tq});
  const at::Tensor rows = to_dev(write_rows, {-1}), src = to_dev(write_src, {-1});
  at::Tensor ctx_rows, allowed;
  if (!fresh) {
    ctx_rows = to_dev(ctx, {S * Lk});
    allowed = to_dev(key_pos, {S, 1, 1, Lk}) <= positions.view({S, 1, Tq, 1});          // [S, 1, Tq, Lk]
  }

  const AdapterMode mode{/*enabled=*/true, /*training=*/false};  // the engine samples the current policy
  at::Tensor h = layers::embed(W, tokens);                                              // [S, Tq, D]
  auto [cos, sin] = layers::rope_tables(positions, inv_freq_, dt);                       // [S, Tq, hd]
  cos = cos.unsqueeze(1);                                                               // [S, 1, Tq, hd]
  sin = sin.unsqueeze(1);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const LayerWeights& L = W.layers[l];
    at::Tensor x = layers::rms_norm(h, L.input_norm, c.rms_norm_eps);                   // [S, Tq, D]
    at::Tensor q = layers::project(x, L, Proj::kQ, mode).view({S, Tq, H, hd}).transpose(1, 2);  // [S, H, Tq, hd]
    at::Tensor k = layers::project(x, L, Proj::kK, mode).view({S, Tq, KV, hd}).transpose(1, 2); // [S, KV, Tq, hd]
    at::Tensor v = layers::project(x, L, Proj::kV, mode).view({S * Tq, KV, hd});                // [S*Tq, KV, hd]
    q = layers::apply_rope(q, cos, sin);
    const at::Tensor k4 = layers::apply_rope(k, cos, sin);                              // [S, KV, Tq, hd]
    k = k4.transpose(1, 2).reshape({S * Tq, KV, hd});                                   // [S*Tq, KV, hd]
    // Write the new K/V into their cache rows, then attend: over the new tokens themselves (fresh prompts on
    // the GPU), or over each sequence's whole context read back from the cache.
    cache_->keys(l).index_copy_(0, rows, k.index_select(0, src));
    cache_->values(l).index_copy_(0, rows, v.index_select(0, src));
    at::Tensor K = fresh ? k4 : cache_->keys(l).index_select(0, ctx_rows).view({S, Lk, KV, hd}).transpose(1, 2);
    at::Tensor V = fresh ? v.view({S, Tq, KV, hd}).transpose(1, 2)
                         : cache_->values(l).index_select(0, ctx_rows).view({S, Lk, KV, hd}).transpose(1, 2);
    if (KV != H) {
      K = K.repeat_interleave(H / KV, 1);                                               // [S, H, Lk, hd]
      V = V.repeat_interleave(H / KV, 1);
    }
    at::Tensor o = fresh ? at::scaled_dot_product_attention(q, K, V, {}, 0.0, /*is_causal=*/true)
                         : layers::attention(q, K, V, allowed);                         // [S, H, Tq, hd]
    o = o.transpose(1, 2).reshape({S, Tq, H * hd});                                     // [S, Tq, H*hd]
    h = h + layers::project(o, L, Proj::kO, mode);                                              // [S, Tq, D]
    x = layers::rms_norm(h, L.post_norm, c.rms_norm_eps);
    h = h + layers::mlp(x, L, mode);  // [S, Tq, D]
  }
  at::Tensor hl = h.view({S * Tq, -1}).index_select(0, to_dev(last, {S}));              // [S, D]
  return layers::logits(W, layers::rms_norm(hl, W.final_norm, c.rms_norm_eps));        // [S, V]
}

bool Engine::use_fused_decode() {
  if (!options_.fused_decode) return false;
  const at::Tensor& w = model_->weights().embed;
  std::string why;
  if (w.scalar_type() != at::kFloat && w.scalar_type() != at::kBFloat16)
    why = fmt::format("the fused kernels take float32 or bfloat16, the model is {}", c10::toString(w.scalar_type()));
  else if (w.is_cuda() && !kernels::cuda_kernels_available())
    why = "this build has no CUDA kernels (configure with -DRLAIF_CUDA=ON)";
  if (why.empty()) return true;
  if (!fallback_logged_) {
    log_warn("[engine] decoding with the plain libtorch forward instead of the fused kernels: {}", why);
    fallback_logged_ = true;
  }
  return false;
}

namespace {

// A projection's weight the few-row kernels can stream: dense, in the activations' dtype, on their device.
bool dense(const at::Tensor& w, const at::Tensor& x) {
  return w.defined() && w.scalar_type() == x.scalar_type() && w.device() == x.device() && w.is_contiguous();
}

const LoraAdapter& adapter(const LayerWeights& L, Proj p) { return L.lora[static_cast<int>(p)]; }

std::vector<const QuantizedTensor*> quant_parts(const LayerWeights& L, const std::vector<Proj>& ps) {
  std::vector<const QuantizedTensor*> qs;
  for (Proj p : ps) qs.push_back(&L.quant[static_cast<int>(p)]);
  return qs;
}

// The adapters of projections `ps` (in order, those that have one) and whether the CUDA LoRA kernels take them.
struct LoraGroup {
  std::vector<at::Tensor> a, b, outs;
  std::vector<double> scales;
  bool expand_fits = true;  // float32 contiguous adapters: kernels::lora_expand takes them (CPU or GPU)
  bool kernels_fit = true;  // and on the GPU: the shrink kernel too
  // t [S, Σr] = x·[A_1; A_2; …]ᵀ (kernels/cpu/lora.h).
  at::Tensor shrink(const at::Tensor& x) const {
    int64_t rank = 0;
    for (const auto& ai : a) rank += ai.size(0);
    const at::Tensor t = at::empty({x.size(0), rank}, x.options().dtype(at::kFloat));
    kernels::lora_shrink(x, a, t);
    return t;
  }
  // What the expand kernels take: `t` (x·Aᵀ from the base GEMM) when given and they fit, else the shrink kernel's
  // t on the GPU; undefined when neither serves (ATen's ops then).
  at::Tensor expand_input(const at::Tensor& x, const at::Tensor& t) const {
    if (t.defined() && expand_fits) return t;
    return kernels_fit ? shrink(x) : at::Tensor();
  }
};

LoraGroup lora_group(const at::Tensor& x, const LayerWeights& L, const std::vector<Proj>& ps,
                     const std::vector<at::Tensor>& ys) {
  LoraGroup g;
  for (size_t i = 0; i < ps.size(); ++i) {
    const LoraAdapter& ad = adapter(L, ps[i]);
    if (!ad.defined()) continue;
    g.expand_fits = g.expand_fits && ad.a.scalar_type() == at::kFloat && ad.b.scalar_type() == at::kFloat &&
                    ad.a.is_contiguous() && ad.b.is_contiguous();
    g.a.push_back(ad.a);
    g.b.push_back(ad.b);
    g.scales.push_back(ad.scale);
    g.outs.push_back(ys[i]);
  }
  g.expand_fits = g.expand_fits && !g.a.empty();
  g.kernels_fit = g.expand_fits && x.is_cuda();
  return g;
}

// Adds the LoRA updates of projections `ps` (sharing input x) to their base outputs `ys` in place (they may be
// column slices of one packed output): on the GPU one shrink and one expand launch for the group
// (kernels/cpu/lora.h), on the CPU ATen ops; with `t` (x·Aᵀ from the base GEMM, EngineOptions::
// lora_shrink_in_gemm) the expand alone, on either device. With `residual` (one projection): residual = residual +
// (y + update), in place.
void add_lora_group(const at::Tensor& x, const LayerWeights& L, const std::vector<Proj>& ps, std::vector<at::Tensor>& ys,
                    const at::Tensor& residual = {}, const at::Tensor& t = {}) {
  const LoraGroup g = lora_group(x, L, ps, ys);
  if (g.a.empty()) {  // x is not read (it may be undefined)
    if (residual.defined()) residual.add_(ys[0]);
    return;
  }
  const at::Tensor xa = g.expand_input(x, t);                                           // [S, Σr]
  if (!xa.defined()) {
    for (size_t i = 0; i < ps.size(); ++i)
      if (adapter(L, ps[i]).defined()) ys[i].copy_(layers::add_lora(ys[i], x, adapter(L, ps[i]), /*training=*/false));
    if (residual.defined()) residual.copy_(residual + ys[0]);
    return;
  }
  if (residual.defined()) kernels::lora_expand(xa, g.b, g.scales, g.outs, residual, {residual});
  else kernels::lora_expand(xa, g.b, g.scales, g.outs, {}, g.outs);
}

// act = silu(gate + update) · (up + update) for the base outputs gu = {gate, up} of x: with adapters on both and
// the GPU kernels (or `t`, x·Aᵀ from the base GEMM), the expand and SwiGLU are one launch
// (kernels::lora_expand_silu_mul); else the expand, then silu_mul.
void lora_swiglu(const at::Tensor& x, const LayerWeights& L, std::vector<at::Tensor>& gu, const at::Tensor& act,
                 const at::Tensor& t = {}) {
  const LoraGroup g = lora_group(x, L, {Proj::kGate, Proj::kUp}, gu);
  if (g.a.size() == 2)
    if (const at::Tensor xa = g.expand_input(x, t); xa.defined())
      return kernels::lora_expand_silu_mul(xa, g.b, g.scales, gu[0], gu[1], act);
  add_lora_group(x, L, {Proj::kGate, Proj::kUp}, gu, {}, t);
  kernels::silu_mul(gu[0], gu[1], act);
}

// A process-wide setting (kernels/cpu/registry.h) set to `value` for this object's lifetime, then restored.
template <typename V>
class ScopedSetting {
 public:
  ScopedSetting(V (*get)(), void (*set)(V), V value) : set_(set), before_(get()) { set_(value); }
  ~ScopedSetting() { set_(before_); }
  ScopedSetting(const ScopedSetting&) = delete;
  ScopedSetting& operator=(const ScopedSetting&) = delete;

 private:
  void (*set_)(V);
  V before_;
};

// Projection p's output width, its weight plain or quantized.
int64_t out_features(const LayerWeights& L, Proj p) {
  const QuantizedTensor& q = L.quant[static_cast<int>(p)];
  return q.defined() ? q.out_features() : L.weight(p).size(0);
}

// The group's biases as one [Σ O] tensor (models/weights.h packed_rows), followed by `tail`'s rows when given:
// undefined when none has one; nullopt when some have one but they are not consecutive rows of one buffer.
std::optional<at::Tensor> packed_bias(const LayerWeights& L, const std::vector<Proj>& ps,
                                      const at::Tensor* tail = nullptr) {
  std::vector<const at::Tensor*> bs;
  bool any_bias = false;
  for (Proj p : ps) {
    bs.push_back(&L.bias(p));
    any_bias = any_bias || L.bias(p).defined();
  }
  if (!any_bias) return at::Tensor();
  if (tail != nullptr) bs.push_back(tail);
  at::Tensor b = packed_rows(bs);
  if (!b.defined()) return std::nullopt;
  return b;
}

// The group's outputs as column slices of y [S, Σ O], in the group's order.
std::vector<at::Tensor> column_slices(const at::Tensor& y, const LayerWeights& L, const std::vector<Proj>& ps) {
  std::vector<at::Tensor> ys;
  int64_t col = 0;
  for (Proj p : ps) {
    ys.push_back(y.narrow(1, col, out_features(L, p)));
    col += out_features(L, p);
  }
  return ys;
}

// A group's packed weight and bias (bias undefined when none has one) when the group's base projections can run as
// one GEMM on x: plain weights in x's dtype and device (adapters are added to the output's column slices
// afterwards). Else an undefined weight. With `w_tail` / `b_tail`, rows that must follow the group's weights and
// biases in the same buffer (packed_group_lora).
std::pair<at::Tensor, at::Tensor> packed_group(const LayerWeights& L, const std::vector<Proj>& ps, const at::Tensor& x,
                                               const at::Tensor* w_tail = nullptr, const at::Tensor* b_tail = nullptr) {
  std::vector<const at::Tensor*> ws;
  for (Proj p : ps) {
    if (L.quant[static_cast<int>(p)].defined()) return {};
    ws.push_back(&L.weight(p));
  }
  if (w_tail != nullptr) ws.push_back(w_tail);
  at::Tensor w = packed_rows(ws);
  if (!w.defined() || w.scalar_type() != x.scalar_type() || w.device() != x.device()) return {};
  const std::optional<at::Tensor> b = packed_bias(L, ps, b_tail);
  if (!b) return {};
  return {w, *b};
}

ProjGroup group_of(const std::vector<Proj>& ps) {
  for (int g = 0; g < kNumProjGroups; ++g)
    if (group_projs(static_cast<ProjGroup>(g)) == ps) return static_cast<ProjGroup>(g);
  RLAIF_CHECK(false, "engine: projections that share no group");
  return ProjGroup::kQkv;
}

// A group's packed weight and bias followed by its LoRA rows (models/lora.h pack_lora_rows; zeros for their bias):
// one GEMM gives the base outputs, then x·Aᵀ in the last Σ r columns. Undefined unless laid out so for x.
std::pair<at::Tensor, at::Tensor> packed_group_lora(const LayerWeights& L, const std::vector<Proj>& ps,
                                                    const at::Tensor& x) {
  const int g = static_cast<int>(group_of(ps));
  if (!L.lora_rows[g].defined()) return {};
  return packed_group(L, ps, x, &L.lora_rows[g], &L.lora_bias_rows[g]);
}

// The projection weights' addresses, hashed: what the decode graphs replay.
size_t weights_address_hash(const ModelWeights& W) {
  size_t h = 0;
  for (const LayerWeights& L : W.layers)
    for (int p = 0; p < kNumProj; ++p) {
      const at::Tensor& w = L.weight(static_cast<Proj>(p));
      h = h * 1000003u ^ std::hash<const void*>{}(w.defined() ? w.data_ptr() : nullptr);
    }
  return h;
}

// Sampling the device sampler covers: temperature or greedy, no filter, no penalty.
bool plain_sampling(const SamplingParams& p, int64_t vocab) {
  return p.repetition_penalty == 1.0 && p.presence_penalty == 0.0 && (p.top_k <= 0 || p.top_k >= vocab) &&
         p.top_p >= 1.0 && p.min_p <= 0.0;
}

// Carves 8-byte-aligned views of the given dtypes and shapes out of a byte buffer, one after another.
struct Carver {
  const at::Tensor& buf;
  int64_t offset = 0;
  static int64_t bytes(at::ScalarType dt, int64_t elements) {
    return (elements * static_cast<int64_t>(c10::elementSize(dt)) + 7) / 8 * 8;
  }
  at::Tensor take(at::ScalarType dt, std::vector<int64_t> shape) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    at::Tensor t = buf.narrow(0, offset, n * static_cast<int64_t>(c10::elementSize(dt))).view(dt).view(shape);
    offset += bytes(dt, n);
    return t;
  }
};

}  // namespace

Engine::StepInputs Engine::make_step_inputs(int64_t rows, int64_t width, const at::Device& dev) {
  // The packed layout: each input's device view, host view, dtype and columns (0: the block-table width).
  struct Slot {
    at::Tensor StepInputs::*dev;
    at::Tensor StepInputs::*host;
    at::ScalarType dtype;
    int64_t cols;
  };
  const Slot slots[] = {{&StepInputs::tokens, &StepInputs::host_tokens, at::kLong, 1},
                        {&StepInputs::positions, &StepInputs::host_positions, at::kLong, 1},
                        {&StepInputs::slots, &StepInputs::host_slots, at::kLong, 1},
                        {&StepInputs::uniform, &StepInputs::host_uniform, at::kDouble, 1},
                        {&StepInputs::temperature, &StepInputs::host_temperature, at::kFloat, 1},
                        {&StepInputs::context_lens, &StepInputs::host_context_lens, at::kInt, 1},
                        {&StepInputs::block_tables, &StepInputs::host_block_tables, at::kInt, 0}};
  int64_t bytes = 0;
  for (const Slot& s : slots) bytes += Carver::bytes(s.dtype, rows * (s.cols ? s.cols : width));
  StepInputs in;
  const auto bytes_opt = at::TensorOptions().dtype(at::kByte);
  in.host = at::empty({bytes}, dev.is_cuda() ? bytes_opt.pinned_memory(true) : bytes_opt);
  in.dev = dev.is_cuda() ? at::empty({bytes}, bytes_opt.device(dev)) : in.host;
  Carver d{in.dev}, h{in.host};
  for (const Slot& s : slots) {
    const std::vector<int64_t> shape = s.cols ? std::vector<int64_t>{rows} : std::vector<int64_t>{rows, width};
    in.*s.dev = d.take(s.dtype, shape);
    in.*s.host = h.take(s.dtype, shape);
  }
  return in;
}

Engine::StepOutputs Engine::make_step_outputs(int64_t rows, const at::Device& dev) {
  const int64_t bytes = Carver::bytes(at::kLong, rows) + Carver::bytes(at::kFloat, 2 * rows);
  StepOutputs out;
  const auto bytes_opt = at::TensorOptions().dtype(at::kByte);
  out.dev = at::empty({bytes}, bytes_opt.device(dev));
  out.host = dev.is_cuda() ? at::empty({bytes}, bytes_opt.pinned_memory(true)) : out.dev;
  Carver d{out.dev}, h{out.host};
  out.tokens = d.take(at::kLong, {rows});
  out.logprobs = d.take(at::kFloat, {rows, 2});
  out.host_tokens = h.take(at::kLong, {rows});
  out.host_logprobs = h.take(at::kFloat, {rows, 2});
  return out;
}

at::Tensor Engine::decode_compute(const StepInputs& in, int64_t max_context) {
  namespace K = kernels;
  // The kernel settings are process-wide: this engine's for the step's launches (and a capture of them), then as
  // they were.
  const ScopedSetting<bool> programmatic(K::programmatic_launch, K::set_programmatic_launch,
                                         options_.programmatic_launch && model_->weights().embed.is_cuda());
  const ScopedSetting<K::FewRowKernel> few_row_choice(K::few_row_kernel, K::set_few_row_kernel,
                                                      options_.few_row_kernel);
  const ScopedSetting<bool> quant_mma(K::quant_few_row_mma, K::set_quant_few_row_mma, options_.quant_few_row_mma);
  const ScopedSetting<int> expand_rows(K::lora_expand_rows, K::set_lora_expand_rows, options_.lora_expand_rows);
  const ScopedSetting<bool> expand_mma(K::lora_expand_mma, K::set_lora_expand_mma, options_.lora_expand_mma);
  const ModelConfig& c = model_->config();
  const ModelWeights& W = model_->weights();
  const int64_t S = in.tokens.size(0), H = c.num_heads, KV = c.num_kv_heads, hd = c.head_dim;
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
  // Few rows on the GPU: bandwidth-bound GEMVs with q/k/v in one launch and the residual and SwiGLU fused, for the
  // kinds of projection and row counts where they beat cuBLAS (EngineOptions::few_row_rows).
  const bool gpu = W.embed.is_cuda();
  auto small_for = [&](int64_t max_rows) { return gpu && S <= std::min(max_rows, K::kSmallLinearMaxRows); };
  const EngineOptions::FewRowRows& rows = options_.few_row_rows;
  const bool small_qkv = small_for(rows.qkv), small_gate_up = small_for(rows.gate_up),
             small_residual = small_for(rows.residual), small_lm_head = small_for(rows.lm_head);

  at::Tensor h = layers::embed(W, in.tokens);                                          // [S, D]
  const AdapterMode base{/*enabled=*/false, /*training=*/false};  // adapters go through add_lora_group
  const double eps = c.rms_norm_eps;
  // An o or down update not yet in h (EngineOptions::lora_norm_fusion): the next RMSNorm of h adds it in its own
  // launch (norm_h); any other reader of h adds it first (flush_h).
  struct PendingUpdate {
    at::Tensor t, y, b;  // x·Aᵀ and the base output (columns of the GEMM's output), B
    double scale = 0.0;
  } pending;
  auto flush_h = [&] {
    if (!pending.t.defined()) return;
    K::lora_expand(pending.t, {pending.b}, {pending.scale}, {pending.y}, h, {h});
    pending = {};
  };
  auto norm_h = [&](const at::Tensor& norm_w) {
    if (!pending.t.defined()) return K::rms_norm(h, norm_w, eps);
    at::Tensor x = at::empty_like(h);
    K::lora_expand_rms_norm(pending.t, pending.b, pending.scale, pending.y, h, norm_w, eps, x);
    pending = {};
    return x;
  };
  // A norm of h fused into the few-row launch that reads it (no launch of its own) when h fits its shared memory.
  const bool norm_fuses = gpu && h.numel() * h.element_size() <= K::kSmallLinearNormMaxBytes;
  // Quantized projections (MLX folders, a re-quantized generator) at up to 8 rows on the GPU: the quantized few-row
  // kernels (kernels/cpu/quant_small_linear.h) when they take every weight of the group ps (same bits, group size
  // and scale dtype), which `qs` then holds.
  const bool small_quant = gpu && S <= K::kSmallLinearMaxRows;
  auto quant_fits = [&](const std::vector<const QuantizedTensor*>& ws, std::vector<K::QuantMatrix>& qs) {
    qs.clear();
    for (const QuantizedTensor* q : ws) {
      if (!small_quant || !q->defined()) return false;
      qs.push_back({q->wq, q->scales, q->biases, q->bits, q->group_size});
      if (!K::quant_small_linear_takes(qs.back(), S) || q->bits != qs[0].bits ||
          q->group_size != qs[0].group_size || q->scales.scalar_type() != qs[0].scales.scalar_type())
        return false;
    }
    return true;
  };
  auto quant_group = [&](const LayerWeights& L, const std::vector<Proj>& ps, std::vector<K::QuantMatrix>& qs) {
    return quant_fits(quant_parts(L, ps), qs);
  };
  // Whether projections `ps` reading in_x fit one few-row launch, and that launch (norm: rms_norm of in_x first).
  auto few_row_fits = [&](const at::Tensor& in_x, const LayerWeights& L, const std::vector<Proj>& ps, bool small) {
    bool fits = small && ps.size() <= 3;
    for (Proj p : ps) fits = fits && dense(L.weight(p), in_x);
    return fits;
  };
  auto few_row = [&](const at::Tensor& in_x, const LayerWeights& L, const std::vector<Proj>& ps,
                     const K::InputNorm& norm) {
    std::vector<at::Tensor> ws, bs, ys;
    for (Proj p : ps) {
      ws.push_back(L.weight(p));
      bs.push_back(L.bias(p));
      ys.push_back(at::empty({S, L.weight(p).size(0)}, in_x.options()));
    }
    K::small_linear(in_x, ws, bs, at::Tensor(), ys, norm);
    return ys;
  };
  // The step's dense GEMMs: with EngineOptions::tuned_gemm on the GPU through the cuBLASLt algorithm timed for
  // their shape (kernels/cpu/tuned_linear.h), else ATen's (the heuristic's choice).
  const bool tuned = gpu && options_.tuned_gemm;
  auto linear = [&](const at::Tensor& in_x, const at::Tensor& w, const at::Tensor& b) {
    if (!tuned) return at::linear(in_x, w, b);
    at::Tensor y = at::empty({in_x.size(0), w.size(0)}, in_x.options());
    K::linear_tuned(in_x, w, b, y, /*accumulate=*/false);
    return y;
  };
  auto add_linear = [&](const at::Tensor& in_x, const at::Tensor& w) -> at::Tensor {  // h += x·wᵀ in the epilogue
    if (!tuned) return h.addmm_(in_x, w.t());
    K::linear_tuned(in_x, w, {}, h, /*accumulate=*/true);
    return h;
  };
  // The base outputs of projections sharing in_x: one few-row launch when it can; else one GEMM over the group's
  // packed weights (models/weights.h; outputs are column slices of its result, which add_lora_group updates in
  // place); else layers::project each.
  auto project_group = [&](const at::Tensor& in_x, const LayerWeights& L, const std::vector<Proj>& ps, bool small,
                           at::Tensor* lora_t = nullptr) {
    if (few_row_fits(in_x, L, ps, small)) return few_row(in_x, L, ps, {});
    // With the group's LoRA rows: x·Aᵀ comes out of the same GEMM, after the base outputs.
    if (lora_t != nullptr && options_.lora_shrink_in_gemm) {
      if (const auto [w, b] = packed_group_lora(L, ps, in_x); w.defined()) {
        const at::Tensor y = linear(in_x, w, b);                                       // [S, Σ O + Σ r]
        const int64_t r = L.lora_rows[static_cast<int>(group_of(ps))].size(0);
        *lora_t = y.narrow(1, y.size(1) - r, r);                                       // [S, Σ r]
        return column_slices(y, L, ps);
      }
    }
    if (const auto [w, b] = packed_group(L, ps, in_x); w.defined())
      return column_slices(linear(in_x, w, b), L, ps);                                 // [S, Σ O] sliced
    // Quantized: one GEMM over the group's packed words (its biases packed too, or none).
    if (const QuantizedTensor q = packed_quant(quant_parts(L, ps)); q.defined()) {
      if (const auto b = packed_bias(L, ps)) return column_slices(quant_linear(in_x, q, *b), L, ps);
    }
    std::vector<at::Tensor> ys;
    for (Proj p : ps) ys.push_back(layers::project(in_x, L, p, base));
    return ys;
  };
  // The base outputs of projections reading x = rms_norm(h, norm_w): the norm fused into their launch when it can,
  // x materialised (written by that launch) only for the adapters that need it; else x = rms_norm, then project_group.
  auto normed_group = [&](const at::Tensor& norm_w, const LayerWeights& L, const std::vector<Proj>& ps, bool small,
                          at::Tensor& x, at::Tensor* lora_t) {
    bool lora = false;
    for (Proj p : ps) lora = lora || adapter(L, p).defined();
    if (std::vector<K::QuantMatrix> qs; quant_group(L, ps, qs)) {  // the quantized kernels stage the norm themselves
      flush_h();
      x = lora ? at::empty_like(h) : at::Tensor();
      std::vector<at::Tensor> bs, ys;
      for (size_t i = 0; i < ps.size(); ++i) {
        bs.push_back(L.bias(ps[i]));
        ys.push_back(at::empty({S, qs[i].rows()}, h.options()));
      }
      K::quant_small_linear(h, qs, bs, {}, ys, {norm_w, eps, x});
      return ys;
    }
    if (!norm_fuses || !few_row_fits(h, L, ps, small)) {
      x = norm_h(norm_w);
      return project_group(x, L, ps, small, lora_t);
    }
    flush_h();
    x = lora ? at::empty_like(h) : at::Tensor();
    return few_row(h, L, ps, {norm_w, eps, x});
  };
  // A few-row launch's input for rms_norm(h, norm_w): h with the norm fused in when it fits, else the norm's rows.
  auto norm_input = [&](const at::Tensor& norm_w) {
    flush_h();
    if (norm_fuses) return std::pair<at::Tensor, K::InputNorm>{h, {norm_w, eps, at::Tensor()}};
    return std::pair<at::Tensor, K::InputNorm>{K::rms_norm(h, norm_w, eps), {}};
  };
  // h += project(in_x) (adapter included), the add fused into the projection or the LoRA expand.
  auto residual_proj = [&](const at::Tensor& in_x, const LayerWeights& L, Proj p) {
    flush_h();
    if (std::vector<K::QuantMatrix> qs; !adapter(L, p).defined() && quant_group(L, {p}, qs)) {
      K::quant_small_linear(in_x, qs, {L.bias(p)}, h, {h});
      return h;
    }
    if (!adapter(L, p).defined()) {
      if (small_residual && dense(L.weight(p), in_x)) {
        K::small_linear(in_x, {L.weight(p)}, {L.bias(p)}, h, {h});
        return h;
      }
      // h += x·Wᵀ in the GEMM's epilogue (beta = 1): no separate add over [S, D].
      if (dense(L.weight(p), in_x) && !L.bias(p).defined()) return add_linear(in_x, L.weight(p));
      return h + layers::project(in_x, L, p, base);
    }
    if (options_.lora_shrink_in_gemm && !small_residual) {  // h += y + update, x·Aᵀ out of the base GEMM
      if (const auto [w, b] = packed_group_lora(L, {p}, in_x); w.defined()) {
        const at::Tensor y = linear(in_x, w, b);                                       // [S, O + r]
        const int64_t O = out_features(L, p);
        std::vector<at::Tensor> ys{y.narrow(1, 0, O)};
        const at::Tensor t = y.narrow(1, O, y.size(1) - O);
        const LoraAdapter& ad = adapter(L, p);
        if (options_.lora_norm_fusion && lora_group(in_x, L, {p}, ys).expand_fits &&
            K::lora_expand_rms_norm_takes(t, ad.b, ys[0], h)) {
          pending = {t, ys[0], ad.b, ad.scale};  // added by the next norm_h (or flush_h)
          return h;
        }
        add_lora_group(in_x, L, {p}, ys, h, t);
        return h;
      }
    }
    if (!in_x.is_cuda()) {
      const at::Tensor y = project_group(in_x, L, {p}, small_residual)[0];
      return h + layers::add_lora(y, in_x, adapter(L, p), /*training=*/false);
    }
    if (!small_residual && dense(L.weight(p), in_x) && !L.bias(p).defined()) {
      // h += x·Wᵀ in the GEMM's epilogue, then h += the update (the expand kernel, in place).
      std::vector<at::Tensor> hs{add_linear(in_x, L.weight(p))};
      add_lora_group(in_x, L, {p}, hs);
      return h;
    }
    std::vector<at::Tensor> y = project_group(in_x, L, {p}, small_residual);
    add_lora_group(in_x, L, {p}, y, h);
    return h;
  };
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const LayerWeights& L = W.layers[l];
    at::Tensor x;                                                                       // [S, D] normalised h
    at::Tensor t;                                                                       // [S, Σ r] x·Aᵀ, if from the GEMM
    std::vector<at::Tensor> qkv = normed_group(L.input_norm, L, {Proj::kQ, Proj::kK, Proj::kV}, small_qkv, x, &t);  // [S, (H+2KV)·hd]
    add_lora_group(x, L, {Proj::kQ, Proj::kK, Proj::kV}, qkv, {}, t);
    const at::Tensor q = qkv[0].view({S, H, hd});                                       // [S, H, hd]
    const at::Tensor k = qkv[1].view({S, KV, hd});                                      // [S, KV, hd]
    const at::Tensor v = qkv[2].view({S, KV, hd});
    at::Tensor o = at::empty({S, H, hd}, q.options());                                 // [S, H, hd]
    K::paged_attention_decode_rope(q, {k, v, in.positions, inv_freq_dev_, in.slots}, cache_->keys(l),
                                   cache_->values(l), in.block_tables, in.context_lens, options_.block_size,
                                   max_context, scale, o);  // RoPE, the new token's K/V written, attention
    h = residual_proj(o.view({S, H * hd}), L, Proj::kO);                                // [S, D]
    at::Tensor act = at::empty({S, c.intermediate_size}, h.options());                  // [S, F]
    const bool swiglu = small_gate_up && dense(L.w_gate, h) && dense(L.w_up, h) && !L.b_gate.defined() && !L.b_up.defined() &&
                        !adapter(L, Proj::kGate).defined() && !adapter(L, Proj::kUp).defined();
    std::vector<K::QuantMatrix> qgu;
    if (!L.b_gate.defined() && !L.b_up.defined() && !adapter(L, Proj::kGate).defined() &&
        !adapter(L, Proj::kUp).defined() && quant_group(L, {Proj::kGate, Proj::kUp}, qgu)) {
      flush_h();
      K::quant_small_linear_silu_mul(h, qgu[0], qgu[1], act, {L.post_norm, eps, at::Tensor()});
    } else if (swiglu) {
      const auto [in_x, norm] = norm_input(L.post_norm);
      K::small_linear_silu_mul(in_x, L.w_gate, L.w_up, act, norm);
    } else {
      x = norm_h(L.post_norm);
      at::Tensor t_gu;
      std::vector<at::Tensor> gu = project_group(x, L, {Proj::kGate, Proj::kUp}, small_gate_up, &t_gu);  // [S, F] each
      lora_swiglu(x, L, gu, act, t_gu);
    }
    h = residual_proj(act, L, Proj::kDown);                                             // [S, D]
  }
  if (std::vector<K::QuantMatrix> qs; quant_fits({&W.lm_head_q}, qs)) {
    flush_h();
    at::Tensor logits = at::empty({S, qs[0].rows()}, h.options());
    K::quant_small_linear(h, qs, {at::Tensor()}, {}, {logits}, {W.final_norm, eps, at::Tensor()});
    return logits;                                                                      // [S, V]
  }
  if (small_lm_head && !W.lm_head_q.defined() && dense(W.lm_head, h)) {
    at::Tensor logits = at::empty({S, W.lm_head.size(0)}, h.options());
    const auto [in_x, norm] = norm_input(W.final_norm);
    K::small_linear(in_x, {W.lm_head}, {at::Tensor()}, at::Tensor(), {logits}, norm);
    return logits;                                                                      // [S, V]
  }
  return layers::logits(W, norm_h(W.final_norm));                                     // [S, V]
}

SampleResult Engine::decode_step(const std::vector<Seq*>& seqs) {
  const at::Device dev = model_->weights().embed.device();
  const int64_t S = static_cast<int64_t>(seqs.size()), bs = options_.block_size;
  const int64_t vocab = model_->config().vocab_size;
  // CUDA graphs: shapes fixed per batch bucket (padding rows write nowhere and attend to nothing).
  const bool graphs = options_.cuda_graphs && dev.is_cuda() && kernels::kernel_registry().graph_capture;
  int64_t rows = S;
  if (graphs) {
    rows = 1;
    while (rows < S) rows *= 2;
    rows = std::min(rows, std::max(options_.max_batch, S));
  }
  int64_t max_blocks = std::max<int64_t>(graphs ? max_blocks_per_seq_ : 0, 1);
  for (Seq* s : seqs) {
    grow_blocks(*s, s->cached + 1);
    max_blocks = std::max<int64_t>(max_blocks, s->blocks.size());
  }
  const bool use_graph = graphs && max_blocks == max_blocks_per_seq_;
  // The device sampler serves a step when every row only needs temperature or greedy sampling.
  bool device_sampling = dev.is_cuda();
  for (Seq* s : seqs) device_sampling = device_sampling && plain_sampling(*s->params, vocab);

  DecodeGraph* g = nullptr;
  StepInputs eager;
  if (use_graph) {
    auto it = graphs_.find(rows);
    if (it == graphs_.end()) {
      DecodeGraph fresh;
      fresh.in = make_step_inputs(rows, max_blocks, dev);
      fresh.out = make_step_outputs(rows, dev);
      it = graphs_.emplace(rows, std::move(fresh)).first;
    }
    g = &it->second;
  } else {
    eager = make_step_inputs(rows, max_blocks, dev);
  }
  const StepInputs& in = g ? g->in : eager;
  // Host side of the inputs: padding rows write nowhere (slot −1), attend to nothing and sample greedily.
  in.host.zero_();
  auto* tok = in.host_tokens.data_ptr<int64_t>();
  auto* pos = in.host_positions.data_ptr<int64_t>();
  auto* slot = in.host_slots.data_ptr<int64_t>();
  auto* uni = in.host_uniform.data_ptr<double>();
  auto* temp = in.host_temperature.data_ptr<float>();
  auto* lens = in.host_context_lens.data_ptr<int32_t>();
  auto* table = in.host_block_tables.data_ptr<int32_t>();
  for (int64_t i = 0; i < rows; ++i) slot[i] = -1;
  for (int64_t i = 0; i < S; ++i) {
    Seq& s = *seqs[i];
    const int64_t p = s.cached;
    tok[i] = s.context.back();
    pos[i] = p;
    slot[i] = s.blocks[p / bs] * bs + p % bs;
    std::copy(s.blocks.begin(), s.blocks.end(), table + i * max_blocks);
    lens[i] = static_cast<int32_t>(p + 1);
    s.cached = p + 1;
    if (device_sampling && !s.params->greedy()) {
      temp[i] = static_cast<float>(s.params->temperature);
      uni[i] = s.rng->uniform();  // one uniform per sampled row and step, as sample_tokens draws it
    }
  }
  if (in.dev.data_ptr() != in.host.data_ptr()) in.dev.copy_(in.host, /*non_blocking=*/true);
  const int64_t max_context = max_blocks * bs;

  at::Tensor logits;
  StepOutputs eager_out;
  const StepOutputs* out = nullptr;
  if (g) {
    if (!g->graph) {
      // First step of this bucket: run it eagerly (warm-up), capture it on the static buffers, then replay —
      // the replay recomputes the same step (same K/V writes, same draws).
      decode_compute(g->in, max_context);
      g->graph = kernels::kernel_registry().graph_capture([&] {
        g->logits = decode_compute(g->in, max_context);
        kernels::sample(g->logits, g->in.temperature, g->in.uniform, g->out.tokens, g->out.logprobs);
      });
    }
    kernels::kernel_registry().graph_replay(g->graph);
    logits = g->logits;
    out = &g->out;
  } else {
    logits = decode_compute(in, max_context);
    if (device_sampling) {
      eager_out = make_step_outputs(rows, dev);
      kernels::sample(logits, in.temperature, in.uniform, eager_out.tokens, eager_out.logprobs);
      out = &eager_out;
    }
  }
  if (!device_sampling) {
    std::vector<SamplerRow> sampler_rows;
    for (Seq* s : seqs) sampler_rows.push_back({s->params, &*s->rng, &s->context, &s->generated});
    return sample_tokens(logits.narrow(0, 0, S), sampler_rows);
  }
  out->host.copy_(out->dev);  // waits for the step
  SampleResult r;
  const int64_t* t = out->host_tokens.data_ptr<int64_t>();
  const float* lp = out->host_logprobs.data_ptr<float>();
  for (int64_t i = 0; i < S; ++i) {
    r.tokens.push_back(static_cast<int32_t>(t[i]));
    r.raw_logprobs.push_back(lp[2 * i]);
    r.processed_logprobs.push_back(lp[2 * i + 1]);
  }
  return r;
}

std::vector<GeneratedSample> Engine::generate(const std::vector<GenerationRequest>& requests,
                                              const GenerateCallbacks& cb) {
  for (size_t i = 0; i < requests.size(); ++i) {
    const auto& r = requests[i];
    if (r.prompt.empty()) throw Error("engine", fmt::format("request {} has an empty prompt", i), "start with BOS or text");
    if (r.num_samples < 1) throw Error("engine", fmt::format("request {}: num_samples must be >= 1", i));
    if (r.params.max_new_tokens < 1) throw Error("engine", fmt::format("request {}: max_new_tokens must be >= 1", i));
    if (r.num_samples > options_.max_batch)
      throw Error("engine", fmt::format("request {} asks {} samples, more than max_batch {}", i, r.num_samples,
                                        options_.max_batch));
  }
  ensure_cache(requests);
  // LoRA's A rows for the shrink inside the base GEMM, refreshed from the adapters the trainer updates. A new layout
  // moves the weights: graphs captured on the old addresses (this engine's or another's) go.
  if (options_.lora_shrink_in_gemm) pack_lora_rows(model_->weights());
  if (const size_t where = weights_address_hash(model_->weights()); where != weights_at_) {
    drop_graphs();
    weights_at_ = where;
  }
  at::NoGradGuard no_grad;
  std::vector<int64_t> offset(requests.size() + 1, 0);
  for (size_t i = 0; i < requests.size(); ++i) offset[i + 1] = offset[i] + requests[i].num_samples;
  std::vector<GeneratedSample> results(offset.back());
  std::deque<int64_t> waiting(requests.size());
  std::iota(waiting.begin(), waiting.end(), 0);
  std::vector<std::unique_ptr<Seq>> running;
  // Blocks the running sequences may still allocate; admission keeps free blocks above this, so no sequence
  // ever has to be preempted.
  auto outstanding = [&] {
    int64_t n = 0;
    for (const auto& s : running) n += blocks_for(s->max_len) - static_cast<int64_t>(s->blocks.size());
    return n;
  };
  std::unordered_set<int64_t> eos(options_.eos_ids.begin(), options_.eos_ids.end());

  // Appends a sampled token; returns true when the sequence is finished.
  auto accept = [&](Seq& s, int32_t token, float lp, float plp) {
    s.generated.push_back(token);
    s.context.push_back(token);
    s.logprobs.push_back(lp);
    s.processed.push_back(plp);
    if (cb.on_token) cb.on_token(s.request, s.sample, token);
    if (eos.count(token)) s.finish = "stop";
    else if (static_cast<int64_t>(s.generated.size()) >= s.params->max_new_tokens) s.finish = "length";
    else if (cb.stop && cb.stop(s.request, s.sample, s.generated)) s.finish = "stop_string";
    return !s.finish.empty();
  };
  auto sample_rows = [&](const at::Tensor& logits, const std::vector<Seq*>& seqs) {
    std::vector<SamplerRow> rows;
    for (Seq* s : seqs) rows.push_back({s->params, &*s->rng, &s->context, &s->generated});
    return sample_tokens(logits, rows);
  };
  auto retire = [&](Seq& s) {
    release(s);
    GeneratedSample& g = results[offset[s.request] + s.sample];
    g = {s.request, s.sample, std::move(s.generated), std::move(s.logprobs), std::move(s.processed), s.finish};
    if (cb.on_finish) cb.on_finish(g);
  };

  while (!waiting.empty() || !running.empty()) {
    // admit + prefill: requests whose worst-case blocks fit, as many as the batch allows.
    std::vector<int64_t> admitted;
    int64_t slots = options_.max_batch - static_cast<int64_t>(running.size()), prefill_tokens = 0;
    int64_t budget = cache_->free_blocks() - outstanding();
    while (!waiting.empty()) {
      const auto& r = requests[waiting.front()];
      const int64_t need = reservation(r);
      const int64_t prompt_copies = options_.share_prefix ? 1 : r.num_samples;
      if (r.num_samples > slots || need > budget) break;
      if (!admitted.empty() && prefill_tokens + prompt_copies * static_cast<int64_t>(r.prompt.size()) > options_.max_prefill_tokens)
        break;
      admitted.push_back(waiting.front());
      waiting.pop_front();
      slots -= r.num_samples;
      budget -= need;
      prefill_tokens += prompt_copies * static_cast<int64_t>(r.prompt.size());
    }
    if (!admitted.empty()) {
      const auto t0 = std::chrono::steady_clock::now();
      std::vector<std::unique_ptr<Seq>> fresh;
      std::vector<Seq*> prefill;
      std::vector<std::vector<int32_t>> prompts;
      for (int64_t ri : admitted) {
        const auto& r = requests[ri];
        const int64_t copies = options_.share_prefix ? 1 : r.num_samples;
        for (int64_t k = 0; k < copies; ++k) {
          auto s = std::make_unique<Seq>();
          s->request = ri;
          s->sample = k;
          s->params = &r.params;
          s->context = r.prompt;
          s->prompt_len = r.prompt.size();
          s->rng.emplace(r.params.seed, ri, k);
          s->max_len = static_cast<int64_t>(r.prompt.size()) + r.params.max_new_tokens;
          prefill.push_back(s.get());
          prompts.push_back(r.prompt);
          fresh.push_back(std::move(s));
        }
      }
      at::Tensor logits = forward_step(prefill, prompts);                                 // [P, V]
      stats_.prefill_tokens += prefill_tokens;
      // fork: every sample of a prompt shares its full blocks; a partial last block is copied (copy-on-write).
      std::vector<Seq*> firsts;
      std::vector<int64_t> rows;
      for (size_t p = 0; p < fresh.size(); ++p) {
        Seq& base = *fresh[p];
        const auto& r = requests[base.request];
        if (options_.share_prefix) {
          const int64_t full = base.prompt_len / options_.block_size;
          const bool partial = base.prompt_len % options_.block_size != 0;
          for (int64_t k = 1; k < r.num_samples; ++k) {
            auto s = std::make_unique<Seq>(base);
            s->sample = k;
            s->rng.emplace(r.params.seed, base.request, k);
            s->blocks.assign(base.blocks.begin(), base.blocks.begin() + full);
            for (int b : s->blocks) cache_->retain(b);
            if (partial) {
              s->blocks.push_back(cache_->alloc());
              cache_->copy_block(base.blocks.back(), s->blocks.back());
            }
            firsts.push_back(s.get());
            rows.push_back(p);
            running.push_back(std::move(s));
          }
        }
        firsts.push_back(&base);
        rows.push_back(p);
      }
      for (auto& s : fresh) running.push_back(std::move(s));
      at::Tensor row_index = at::tensor(rows, at::kLong).to(logits.device());
      SampleResult sr = sample_rows(logits.index_select(0, row_index), firsts);
      for (size_t i = 0; i < firsts.size(); ++i) accept(*firsts[i], sr.tokens[i], sr.raw_logprobs[i], sr.processed_logprobs[i]);
      stats_.prefill_seconds += seconds_since(t0);
    } else if (running.empty()) {
      throw Error("engine", fmt::format("request {} needs more KV blocks than the cache has", waiting.front()));
    }

    // retire finished sequences (possibly right after their first token).
    auto retire_done = [&] {
      for (auto& s : running)
        if (!s->finish.empty()) retire(*s);
      running.erase(std::remove_if(running.begin(), running.end(), [](const auto& s) { return !s->finish.empty(); }),
                    running.end());
    };
    retire_done();
    if (running.empty()) continue;

    // decode_step: one new token for every running sequence.
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<Seq*> batch;
    std::vector<std::vector<int32_t>> last;
    for (auto& s : running) {
      batch.push_back(s.get());
      last.push_back({s->context.back()});
    }
    SampleResult sr = use_fused_decode() ? decode_step(batch) : sample_rows(forward_step(batch, last), batch);
    for (size_t i = 0; i < batch.size(); ++i) accept(*batch[i], sr.tokens[i], sr.raw_logprobs[i], sr.processed_logprobs[i]);
    stats_.decode_tokens += static_cast<int64_t>(batch.size());
    stats_.decode_steps += 1;
    stats_.decode_seconds += seconds_since(t0);
    retire_done();
  }
  RLAIF_CHECK(cache_->free_blocks() == cache_->num_blocks(), "KV blocks leaked: {} of {} free", cache_->free_blocks(),
              cache_->num_blocks());
  return results;
}

}  // namespace rlaif
