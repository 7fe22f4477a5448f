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

// Temperature, top-k, top-p and min-p for one row of penalised float32 logits.
at::Tensor filter_row(at::Tensor row, const SamplingParams& p) {
  if (p.greedy()) return row;
  row = row / p.temperature;
  const int64_t V = row.size(0);
  if (p.top_k > 0 && p.top_k < V) {
    at::Tensor kth = std::get<0>(at::topk(row, p.top_k)).min();
    row = row.masked_fill(row < kth, kNegInf);
  }
  if (p.top_p < 1.0) {
    auto [sorted, order] = at::sort(row, /*dim=*/0, /*descending=*/true);
    at::Tensor probs = at::softmax(sorted, 0);
    // Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before it already does.
    at::Tensor before = probs.cumsum(0) - probs;
    at::Tensor drop_sorted = before >= p.top_p;
    at::Tensor drop = at::zeros_like(drop_sorted).scatter_(0, order, drop_sorted);
    row = row.masked_fill(drop, kNegInf);
  }
  if (p.min_p > 0.0) {
    at::Tensor probs = at::softmax(row, 0);
    row = row.masked_fill(probs < probs.max() * p.min_p, kNegInf);
  }
  return row;
}

at::Tensor process(const at::Tensor& logits, const std::vector<SamplerRow>& rows) {
  RLAIF_CHECK(logits.dim() == 2 && logits.size(0) == static_cast<int64_t>(rows.size()), "logits [S,V] for S rows");
  at::Tensor x = logits.to(at::kFloat).clone();
  for (size_t i = 0; i < rows.size(); ++i) {
    at::Tensor row = x[i];
    apply_penalties(row, rows[i]);
    row.copy_(filter_row(row, *rows[i].params));
  }
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
  at::Tensor raw_lp = raw.gather(1, idx).squeeze(1).cpu(), proc_lp = proc.gather(1, idx).squeeze(1).cpu();
  tokens = tokens.cpu();
  SampleResult r;
  for (int64_t i = 0; i < S; ++i) {
    r.tokens.push_back(static_cast<int32_t>(tokens[i].item<int64_t>()));
    r.raw_logprobs.push_back(raw_lp[i].item<float>());
    r.processed_logprobs.push_back(proc_lp[i].item<float>());
  }
  return r;
}

}  // namespace rlaif
