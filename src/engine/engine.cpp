// Engine loop: admit (reserve KV blocks) → prefill (prompt once, fork samples) → decode_step (one token for
// every running sequence) → retire (free blocks, let waiting requests in). The model step runs on the weights'
// device with ATen ops and the numerics of models/layers.h, so its log-probs equal the training forward's.
#include "engine/engine.h"

#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <chrono>
#include <deque>
#include <numeric>
#include <unordered_set>

#include "core/error.h"
#include "core/logging.h"
#include "kernels/cpu/paged_attention.h"
#include "kernels/cpu/registry.h"
#include "kernels/cpu/rms_norm.h"
#include "kernels/cpu/rope_kv_write.h"
#include "kernels/cpu/silu_mul.h"
#include "models/layers.h"

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
    for (int64_t p = 0; p < start + n; ++p) {
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
  const at::Tensor ctx_rows = to_dev(ctx, {S * Lk}), kpos = to_dev(key_pos, {S, 1, 1, Lk});
  const at::Tensor allowed = kpos <= positions.view({S, 1, Tq, 1});                      // [S, 1, Tq, Lk]

  const AdapterMode mode{/*enabled=*/true, /*training=*/false};  // the engine samples the current policy
  at::Tensor h = at::embedding(W.embed, tokens);                                        // [S, Tq, D]
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
    k = layers::apply_rope(k, cos, sin).transpose(1, 2).reshape({S * Tq, KV, hd});      // [S*Tq, KV, hd]
    // Write the new K/V into their cache rows, then read each sequence's whole context back.
    cache_->keys(l).index_copy_(0, rows, k.index_select(0, src));
    cache_->values(l).index_copy_(0, rows, v.index_select(0, src));
    at::Tensor K = cache_->keys(l).index_select(0, ctx_rows).view({S, Lk, KV, hd}).transpose(1, 2);  // [S, KV, Lk, hd]
    at::Tensor V = cache_->values(l).index_select(0, ctx_rows).view({S, Lk, KV, hd}).transpose(1, 2);
    if (KV != H) {
      K = K.repeat_interleave(H / KV, 1);                                               // [S, H, Lk, hd]
      V = V.repeat_interleave(H / KV, 1);
    }
    at::Tensor o = layers::attention(q, K, V, allowed);                                 // [S, H, Tq, hd]
    o = o.transpose(1, 2).reshape({S, Tq, H * hd});                                     // [S, Tq, H*hd]
    h = h + layers::project(o, L, Proj::kO, mode);                                              // [S, Tq, D]
    x = layers::rms_norm(h, L.post_norm, c.rms_norm_eps);
    h = h + layers::mlp(x, L, mode);  // [S, Tq, D]
  }
  at::Tensor hl = h.view({S * Tq, -1}).index_select(0, to_dev(last, {S}));              // [S, D]
  return at::linear(layers::rms_norm(hl, W.final_norm, c.rms_norm_eps), W.lm_head);    // [S, V]
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

at::Tensor Engine::decode_compute(const at::Tensor& tokens, const at::Tensor& positions, const at::Tensor& slots,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t max_context) {
  namespace K = kernels;
  const ModelConfig& c = model_->config();
  const ModelWeights& W = model_->weights();
  const int64_t S = tokens.size(0), H = c.num_heads, KV = c.num_kv_heads, hd = c.head_dim;
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
  const AdapterMode mode{/*enabled=*/true, /*training=*/false};

  at::Tensor h = at::embedding(W.embed, tokens);                                        // [S, D]
  at::Tensor x = K::rms_norm(h, W.layers[0].input_norm, c.rms_norm_eps);               // [S, D]
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const LayerWeights& L = W.layers[l];
    at::Tensor q = layers::project(x, L, Proj::kQ, mode).view({S, H, hd});              // [S, H, hd]
    at::Tensor k = layers::project(x, L, Proj::kK, mode).view({S, KV, hd});             // [S, KV, hd]
    at::Tensor v = layers::project(x, L, Proj::kV, mode).view({S, KV, hd});             // [S, KV, hd]
    K::rope_kv_write(q, k, v, positions, inv_freq_dev_, cache_->keys(l), cache_->values(l), slots);
    at::Tensor o = K::paged_attention_decode(q, cache_->keys(l), cache_->values(l), block_tables, context_lens,
                                             options_.block_size, max_context, scale);  // [S, H, hd]
    h = h + layers::project(o.view({S, H * hd}), L, Proj::kO, mode);                     // [S, D]
    x = K::rms_norm(h, L.post_norm, c.rms_norm_eps);
    at::Tensor act = at::empty({S, c.intermediate_size}, h.options());
    K::silu_mul(layers::project(x, L, Proj::kGate, mode), layers::project(x, L, Proj::kUp, mode), act);  // [S, F]
    h = h + layers::project(act, L, Proj::kDown, mode);                                  // [S, D]
    const at::Tensor& next_norm = l + 1 < c.num_layers ? W.layers[l + 1].input_norm : W.final_norm;
    x = K::rms_norm(h, next_norm, c.rms_norm_eps);
  }
  return at::linear(x, W.lm_head);                                                      // [S, V]
}

at::Tensor Engine::decode_step(const std::vector<Seq*>& seqs) {
  const at::Device dev = model_->weights().embed.device();
  const int64_t S = static_cast<int64_t>(seqs.size()), bs = options_.block_size;
  // CUDA graphs: shapes fixed per batch bucket (padding rows write nowhere and attend to nothing).
  const bool graphs = options_.cuda_graphs && dev.is_cuda() && kernels::kernel_registry().graph_capture;
  int64_t rows = S;
  if (graphs) {
    rows = 1;
    while (rows < S) rows *= 2;
    rows = std::min(rows, std::max(options_.max_batch, S));
  }
  const int64_t width = graphs ? max_blocks_per_seq_ : 0;
  int64_t max_blocks = std::max<int64_t>(width, 1);
  for (Seq* s : seqs) {
    grow_blocks(*s, s->cached + 1);
    max_blocks = std::max<int64_t>(max_blocks, s->blocks.size());
  }
  std::vector<int64_t> tok(rows, 0), pos(rows, 0), slot(rows, -1);
  std::vector<int32_t> table(rows * max_blocks, 0), lens(rows, 0);
  for (int64_t i = 0; i < S; ++i) {
    Seq& s = *seqs[i];
    const int64_t p = s.cached;
    tok[i] = s.context.back();
    pos[i] = p;
    slot[i] = s.blocks[p / bs] * bs + p % bs;
    std::copy(s.blocks.begin(), s.blocks.end(), table.begin() + i * max_blocks);
    lens[i] = static_cast<int32_t>(p + 1);
    s.cached = p + 1;
  }
  const at::Tensor tokens = at::tensor(tok, at::kLong), positions = at::tensor(pos, at::kLong);
  const at::Tensor slots = at::tensor(slot, at::kLong), context_lens = at::tensor(lens, at::kInt);
  const at::Tensor block_tables = at::tensor(table, at::kInt).view({rows, max_blocks});
  const int64_t max_context = max_blocks * bs;
  if (!graphs || max_blocks != max_blocks_per_seq_)
    return decode_compute(tokens.to(dev), positions.to(dev), slots.to(dev), block_tables.to(dev), context_lens.to(dev),
                          max_context).narrow(0, 0, S);

  auto it = graphs_.find(rows);
  if (it == graphs_.end()) {
    // First step of this bucket: run it eagerly (warm-up), then capture the same computation on static inputs.
    DecodeGraph g;
    g.tokens = tokens.to(dev);
    g.positions = positions.to(dev);
    g.slots = slots.to(dev);
    g.block_tables = block_tables.to(dev);
    g.context_lens = context_lens.to(dev);
    at::Tensor logits = decode_compute(g.tokens, g.positions, g.slots, g.block_tables, g.context_lens, max_context);
    g.graph = kernels::kernel_registry().graph_capture([&] {
      g.logits = decode_compute(g.tokens, g.positions, g.slots, g.block_tables, g.context_lens, max_context);
    });
    graphs_.emplace(rows, std::move(g));
    return logits.narrow(0, 0, S);
  }
  DecodeGraph& g = it->second;
  g.tokens.copy_(tokens, /*non_blocking=*/false);
  g.positions.copy_(positions);
  g.slots.copy_(slots);
  g.block_tables.copy_(block_tables);
  g.context_lens.copy_(context_lens);
  kernels::kernel_registry().graph_replay(g.graph);
  return g.logits.narrow(0, 0, S);
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
    const bool fused = use_fused_decode();
    at::Tensor logits = fused ? decode_step(batch) : forward_step(batch, last);
    SampleResult sr = sample_rows(logits, batch);
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
