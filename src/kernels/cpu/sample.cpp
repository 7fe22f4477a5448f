// Sort-free sampling: CPU reference (plain loops with a sort for top-k/top-p: the spec) and the device dispatcher.
#include "kernels/cpu/sample.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "kernels/cpu/common.h"

namespace rlaif::kernels {

namespace {

void check_args(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& uniform,
                const at::Tensor& tokens, const at::Tensor& logprobs) {
  check_activation(logits, "sample", "logits");
  RLAIF_CHECK(logits.dim() == 2 && logits.stride(1) == 1 && logits.size(1) > 0,
              "sample: logits must be [S, V] with a contiguous last dim, got {}", logits.sizes());
  const int64_t S = logits.size(0);
  auto vec = [&](const at::Tensor& t, at::ScalarType dt, std::vector<int64_t> shape, const char* name) {
    RLAIF_CHECK(t.defined() && t.scalar_type() == dt && t.sizes() == at::IntArrayRef(shape) && t.is_contiguous() &&
                    t.device() == logits.device(),
                "sample: {} must be a contiguous {} {} on {}", name, c10::toString(dt), at::IntArrayRef(shape),
                logits.device().str());
  };
  vec(temperature, at::kFloat, {S}, "temperature");
  if (top_k.defined()) vec(top_k, at::kInt, {S}, "top_k");
  if (top_p.defined()) vec(top_p, at::kFloat, {S}, "top_p");
  if (min_p.defined()) vec(min_p, at::kFloat, {S}, "min_p");
  vec(uniform, at::kDouble, {S}, "uniform");
  vec(tokens, at::kLong, {S}, "tokens");
  vec(logprobs, at::kFloat, {S, 2}, "logprobs");
}

// The kept set of one row (sample.h): the first n ranks of (y descending, index ascending), n = min(n_k, n_p, n_m).
std::vector<uint8_t> kept_set(const std::vector<float>& y, const std::vector<float>& e, int64_t k, float p,
                              float min_p) {
  const int64_t V = static_cast<int64_t>(y.size());
  std::vector<uint8_t> kept(V, 1);
  const int64_t nk = k > 0 && k < V ? k : V;
  if (nk < V || p < 1.0f) {
    std::vector<int64_t> order(V);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return y[a] > y[b]; });
    int64_t n = nk;
    if (p < 1.0f) {
      double zk = 0;
      for (int64_t r = 0; r < nk; ++r) zk += e[order[r]];
      const double target = static_cast<double>(p) * zk;
      double before = 0;
      int64_t np = 1;
      for (int64_t r = 1; r < nk; ++r) {
        before += e[order[r - 1]];
        if (!(before < target)) break;
        np = r + 1;
      }
      n = std::min(n, np);
    }
    for (int64_t r = n; r < V; ++r) kept[order[r]] = 0;
  }
  if (min_p > 0.0f)
    for (int64_t i = 0; i < V; ++i)
      if (!(e[i] >= std::min(min_p, 1.0f))) kept[i] = 0;
  return kept;
}

template <typename T>
void run(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
         const at::Tensor& min_p, const at::Tensor& uniform, const at::Tensor& tokens, const at::Tensor& logprobs) {
  const int64_t S = logits.size(0), V = logits.size(1);
  for (int64_t s = 0; s < S; ++s) {
    const T* l = logits.data_ptr<T>() + s * logits.stride(0);
    const float t = temperature.data_ptr<float>()[s];
    int64_t best = 0;
    for (int64_t i = 1; i < V; ++i)
      if (static_cast<float>(l[i]) > static_cast<float>(l[best])) best = i;
    const float m = static_cast<float>(l[best]);
    double z_raw = 0;
    for (int64_t i = 0; i < V; ++i) z_raw += std::exp(static_cast<float>(l[i]) - m);
    int64_t tok = best;
    float processed = 0;
    if (t > 0) {
      const float mt = m / t;
      std::vector<float> y(V), e(V);
      for (int64_t i = 0; i < V; ++i) {
        y[i] = static_cast<float>(l[i]) / t;
        e[i] = std::exp(y[i] - mt);
      }
      const std::vector<uint8_t> kept =
          kept_set(y, e, top_k.defined() ? top_k.data_ptr<int32_t>()[s] : 0,
                   top_p.defined() ? top_p.data_ptr<float>()[s] : 1.0f, min_p.defined() ? min_p.data_ptr<float>()[s] : 0.0f);
      double z = 0;
      for (int64_t i = 0; i < V; ++i)
        if (kept[i]) z += e[i];
      const double target = uniform.data_ptr<double>()[s] * z;
      double cum = 0;
      tok = -1;
      for (int64_t i = 0; i < V && tok < 0; ++i) {
        if (!kept[i]) continue;
        cum += e[i];
        if (cum > target) tok = i;
      }
      if (tok < 0)  // rounding put the target at the very end: the last kept token with any mass
        for (tok = V - 1; tok > 0 && !(kept[tok] && e[tok] > 0.0f);) --tok;
      processed = static_cast<float>(y[tok] - mt - std::log(z));
    }
    const float raw = static_cast<float>(static_cast<float>(l[tok]) - m - std::log(z_raw));
    tokens.data_ptr<int64_t>()[s] = tok;
    logprobs.data_ptr<float>()[2 * s] = raw;
    logprobs.data_ptr<float>()[2 * s + 1] = t > 0 ? processed : raw;
  }
}

}  // namespace

void sample_cpu(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& uniform,
                const at::Tensor& tokens, const at::Tensor& logprobs) {
  check_args(logits, temperature, top_k, top_p, min_p, uniform, tokens, logprobs);
  RLAIF_CHECK(logits.is_cpu(), "sample_cpu: tensors must be on the CPU");
  if (logits.scalar_type() == at::kFloat) run<float>(logits, temperature, top_k, top_p, min_p, uniform, tokens, logprobs);
  else run<at::BFloat16>(logits, temperature, top_k, top_p, min_p, uniform, tokens, logprobs);
}

void sample(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
            const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& uniform, const at::Tensor& tokens,
            const at::Tensor& logprobs) {
  if (!logits.is_cuda()) return sample_cpu(logits, temperature, top_k, top_p, min_p, uniform, tokens, logprobs);
  check_args(logits, temperature, top_k, top_p, min_p, uniform, tokens, logprobs);
  cuda_kernel(&KernelRegistry::sample_cuda, "sample")(logits, temperature, top_k, top_p, min_p, uniform, tokens,
                                                      logprobs);
}

void sample(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& uniform,
            const at::Tensor& tokens, const at::Tensor& logprobs) {
  sample(logits, temperature, at::Tensor(), at::Tensor(), at::Tensor(), uniform, tokens, logprobs);
}

}  // namespace rlaif::kernels
