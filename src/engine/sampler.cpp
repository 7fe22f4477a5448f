// Sampler implementation: filters as masks on the [S, V] logits (batched on the logits' device), then an
// inverse-CDF draw with a host-side uniform per row.
#include "engine/sampler.h"

#include <limits>

#include "core/error.h"

namespace rlaif {

SampleRng::SampleRng(uint64_t seed, uint64_t request, uint64_t sample) {
  std::seed_seq seq{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), static_cast<uint32_t>(request),
                    static_cast<uint32_t>(request >> 32), static_cast<uint32_t>(sample), 0x72'6c'61'69u};
  gen_.seed(seq);
}

double SampleRng::uniform() { return std::generate_canonical<double, 53>(gen_); }

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Repetition and presence penalties on one row (in place, float32).
void apply_penalties(at::Tensor row, const SamplerRow& r) {
  const SamplingParams& p = *r.params;
  const auto dev = row.device();
  if (p.repetition_penalty != 1.0 && r.context && !r.context->empty()) {
    at::Tensor ids = at::tensor(std::vector<int64_t>(r.context->begin(), r.context->end()), at::kLong).to(dev);
    ids = std::get<0>(at::_unique(ids));
    at::Tensor v = row.index_select(0, ids);
    row.index_copy_(0, ids, at::where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty));
  }
  if (p.presence_penalty != 0.0 && r.generated && !r.generated->empty()) {
    at::Tensor ids = at::tensor(std::vector<int64_t>(r.generated->begin(), r.generated->end()), at::kLong).to(dev);
    ids = std::get<0>(at::_unique(ids));
    row.index_copy_(0, ids, row.index_select(0, ids) - p.presence_penalty);
  }
}

at::Tensor column(const std::vector<double>& v, const at::Tensor& like) {
  return at::tensor(v, at::kDouble).to(like.device(), at::kFloat).unsqueeze(1);
}

// Penalties per row (rare, so row by row), then temperature, top-k, top-p and min-p batched over all rows with
// one sort. Greedy rows keep their penalised logits unfiltered.
at::Tensor process(const at::Tensor& logits, const std::vector<SamplerRow>& rows) {
  const int64_t S = logits.size(0), V = logits.size(1);
  RLAIF_CHECK(logits.dim() == 2 && S == static_cast<int64_t>(rows.size()), "logits [S,V] for S rows");
  at::Tensor x = logits.to(at::kFloat).clone();
  std::vector<double> temp(S), k(S), p(S), minp(S), greedy(S);
  bool any_sort = false, any_minp = false, any_greedy = false;
  for (int64_t i = 0; i < S; ++i) {
    const SamplingParams& sp = *rows[i].params;
    if (sp.repetition_penalty != 1.0 || sp.presence_penalty != 0.0) apply_penalties(x[i], rows[i]);
    greedy[i] = sp.greedy();
    temp[i] = sp.greedy() ? 1.0 : sp.temperature;
    k[i] = sp.greedy() || sp.top_k <= 0 ? V : std::min<int64_t>(sp.top_k, V);
    p[i] = sp.greedy() ? 1.0 : sp.top_p;
    minp[i] = sp.greedy() ? 0.0 : sp.min_p;
    any_sort = any_sort || k[i] < V || p[i] < 1.0;
    any_minp = any_minp || minp[i] > 0.0;
    any_greedy = any_greedy || greedy[i];
  }
  const at::Tensor penalised = any_greedy ? x.clone() : at::Tensor();
  x = x / column(temp, x);
  if (any_sort) {
    auto [sorted, order] = at::sort(x, /*dim=*/1, /*descending=*/true);
    at::Tensor rank = at::arange(V, x.options().dtype(at::kLong)).unsqueeze(0);
    at::Tensor drop = rank >= column(k, x).to(at::kLong);                              // top-k
    // top-p: keep the smallest prefix whose mass reaches p; drop a token when the mass before it already does.
    // The mass in float64, as the kernels' reference sums it: a float32 cumsum over a 151936-token vocabulary
    // drifts by ~1e-4 and moved the cut by a token (a processed log-prob off by 2.5e-3).
    at::Tensor probs = at::softmax(sorted.masked_fill(drop, kNegInf).to(at::kDouble), 1);
    drop = drop.logical_or((probs.cumsum(1) - probs) >= column(p, x));
    drop.select(1, 0).fill_(false);                                                    // always keep the best
    x = x.masked_fill(at::zeros_like(drop).scatter_(1, order, drop), kNegInf);
  }
  if (any_minp) {
    at::Tensor probs = at::softmax(x, 1);
    x = x.masked_fill(probs < std::get<0>(probs.max(1, true)) * column(minp, x), kNegInf);
  }
  if (any_greedy) x = at::where(column(greedy, x) > 0, penalised, x);
  return x;
}

}  // namespace

at::Tensor processed_logprobs(const at::Tensor& logits, const std::vector<SamplerRow>& rows) {
  return at::log_softmax(process(logits, rows), -1);
}

SampleResult sample_tokens(const at::Tensor& logits, const std::vector<SamplerRow>& rows) {
  const int64_t S = logits.size(0);
  at::Tensor raw = at::log_softmax(logits.to(at::kFloat), -1);    // [S, V]
  at::Tensor proc = at::log_softmax(process(logits, rows), -1);   // [S, V]
  // Inverse CDF: the first token whose cumulative probability exceeds u.
  std::vector<double> u(S, 0.0);
  std::vector<uint8_t> greedy(S, 0);
  for (int64_t i = 0; i < S; ++i) {
    greedy[i] = rows[i].params->greedy();
    if (!greedy[i]) u[i] = rows[i].rng->uniform();
  }
  at::Tensor cdf = proc.to(at::kDouble).exp().cumsum(-1);          // [S, V]
  at::Tensor uu = at::tensor(u, at::kDouble).to(cdf.device()).unsqueeze(1) * cdf.select(1, cdf.size(1) - 1).unsqueeze(1);
  at::Tensor drawn = at::searchsorted(cdf, uu, /*out_int32=*/false, /*right=*/true).squeeze(1).clamp_max(cdf.size(1) - 1);
  at::Tensor argmax = proc.argmax(-1);
  at::Tensor g = at::tensor(std::vector<int64_t>(greedy.begin(), greedy.end()), at::kLong).to(cdf.device()).to(at::kBool);
  at::Tensor tokens = at::where(g, argmax, drawn);                 // [S]
  at::Tensor idx = tokens.unsqueeze(1);
  at::Tensor raw_lp = raw.gather(1, idx).squeeze(1).cpu().contiguous();
  at::Tensor proc_lp = proc.gather(1, idx).squeeze(1).cpu().contiguous();
  tokens = tokens.cpu().contiguous();
  SampleResult r;
  r.tokens.assign(tokens.data_ptr<int64_t>(), tokens.data_ptr<int64_t>() + S);
  r.raw_logprobs.assign(raw_lp.data_ptr<float>(), raw_lp.data_ptr<float>() + S);
  r.processed_logprobs.assign(proc_lp.data_ptr<float>(), proc_lp.data_ptr<float>() + S);
  return r;
}

}  // namespace rlaif
