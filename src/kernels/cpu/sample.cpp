// Sort-free sampling: CPU reference (plain loops, the spec) and the device dispatcher.
#include "kernels/cpu/sample.h"

#include <cmath>

#include "kernels/cpu/common.h"

namespace rlaif::kernels {

namespace {

void check_args(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& uniform,
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
  vec(uniform, at::kDouble, {S}, "uniform");
  vec(tokens, at::kLong, {S}, "tokens");
  vec(logprobs, at::kFloat, {S, 2}, "logprobs");
}

template <typename T>
void run(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& uniform,
         const at::Tensor& tokens, const at::Tensor& logprobs) {
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
      double z = 0;
      for (int64_t i = 0; i < V; ++i) z += std::exp(static_cast<float>(l[i]) / t - mt);
      const double target = uniform.data_ptr<double>()[s] * z;
      double cum = 0;
      tok = -1;
      for (int64_t i = 0; i < V && tok < 0; ++i) {
        const double e = std::exp(static_cast<float>(l[i]) / t - mt);
        cum += e;
        if (cum > target) tok = i;
      }
      if (tok < 0)  // rounding put the target at the very end: the last token with any mass
        for (tok = V - 1; tok > 0 && std::exp(static_cast<float>(l[tok]) / t - mt) == 0.0f;) --tok;
      processed = static_cast<float>(static_cast<float>(l[tok]) / t - mt - std::log(z));
    }
    const float raw = static_cast<float>(static_cast<float>(l[tok]) - m - std::log(z_raw));
    tokens.data_ptr<int64_t>()[s] = tok;
    logprobs.data_ptr<float>()[2 * s] = raw;
    logprobs.data_ptr<float>()[2 * s + 1] = t > 0 ? processed : raw;
  }
}

}  // namespace

void sample_cpu(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& uniform,
                const at::Tensor& tokens, const at::Tensor& logprobs) {
  check_args(logits, temperature, uniform, tokens, logprobs);
  RLAIF_CHECK(logits.is_cpu(), "sample_cpu: tensors must be on the CPU");
  if (logits.scalar_type() == at::kFloat) run<float>(logits, temperature, uniform, tokens, logprobs);
  else run<at::BFloat16>(logits, temperature, uniform, tokens, logprobs);
}

void sample(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& uniform,
            const at::Tensor& tokens, const at::Tensor& logprobs) {
  if (!logits.is_cuda()) return sample_cpu(logits, temperature, uniform, tokens, logprobs);
  check_args(logits, temperature, uniform, tokens, logprobs);
  cuda_kernel(&KernelRegistry::sample_cuda, "sample")(logits, temperature, uniform, tokens, logprobs);
}

}  // namespace rlaif::kernels
