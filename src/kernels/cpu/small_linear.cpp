// Few-row projections: CPU reference (plain loops, the spec) and the device dispatcher.
#include "kernels/cpu/small_linear.h"

#include <cmath>

#include "kernels/cpu/common.h"
#include "kernels/cpu/rms_norm.h"

namespace rlaif::kernels {

namespace {

void check_x(const at::Tensor& x, const char* op) {
  check_activation(x, op, "x");
  RLAIF_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(0) <= kSmallLinearMaxRows,
              "{}: x must be a contiguous [N, K] with N <= {}, got {}", op, kSmallLinearMaxRows, x.sizes());
}

void check_weight(const at::Tensor& w, const at::Tensor& x, const at::Tensor& out, const char* op) {
  check_same(w, x, op, "weight");
  check_same(out, x, op, "out");
  RLAIF_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(1) == x.size(1), "{}: weight must be a contiguous [O, {}], "
              "got {}", op, x.size(1), w.sizes());
  RLAIF_CHECK(out.dim() == 2 && out.is_contiguous() && out.size(0) == x.size(0) && out.size(1) == w.size(0),
              "{}: out must be a contiguous [{}, {}], got {}", op, x.size(0), w.size(0), out.sizes());
}

void check_args(const at::Tensor& x, const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& biases,
                const at::Tensor& residual, const std::vector<at::Tensor>& outs) {
  check_x(x, "small_linear");
  RLAIF_CHECK(!weights.empty() && weights.size() <= 3 && biases.size() == weights.size() &&
                  outs.size() == weights.size(),
              "small_linear: 1-3 weights, each with a bias slot and an out");
  for (size_t i = 0; i < weights.size(); ++i) {
    check_weight(weights[i], x, outs[i], "small_linear");
    if (biases[i].defined()) {
      check_same(biases[i], x, "small_linear", "bias");
      RLAIF_CHECK(biases[i].dim() == 1 && biases[i].is_contiguous() && biases[i].size(0) == weights[i].size(0),
                  "small_linear: bias {} must be [{}]", i, weights[i].size(0));
    }
  }
  if (residual.defined()) {
    check_same(residual, x, "small_linear", "residual");
    RLAIF_CHECK(weights.size() == 1 && residual.sizes() == outs[0].sizes() && residual.is_contiguous(),
                "small_linear: a residual goes with one weight and has its out's shape");
  }
}

void check_silu_args(const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& out) {
  check_x(x, "small_linear_silu_mul");
  check_weight(w_gate, x, out, "small_linear_silu_mul");
  check_weight(w_up, x, out, "small_linear_silu_mul");
}

// Σ_k x[k]·w[k] in float32, in order.
template <typename T>
float dot(const T* x, const T* w, int64_t K) {
  float acc = 0.0f;
  for (int64_t k = 0; k < K; ++k) acc += static_cast<float>(x[k]) * static_cast<float>(w[k]);
  return acc;
}

template <typename T>
void run(const at::Tensor& x, const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& biases,
         const at::Tensor& residual, const std::vector<at::Tensor>& outs) {
  const int64_t N = x.size(0), K = x.size(1);
  for (size_t i = 0; i < weights.size(); ++i) {
    const int64_t O = weights[i].size(0);
    const T* w = weights[i].data_ptr<T>();
    const T* b = biases[i].defined() ? biases[i].data_ptr<T>() : nullptr;
    const T* r = residual.defined() ? residual.data_ptr<T>() : nullptr;
    T* out = outs[i].data_ptr<T>();
    for (int64_t n = 0; n < N; ++n)
      for (int64_t o = 0; o < O; ++o) {
        float y = dot(x.data_ptr<T>() + n * K, w + o * K, K) + (b ? static_cast<float>(b[o]) : 0.0f);
        T t = static_cast<T>(y);
        if (r) t = static_cast<T>(static_cast<float>(r[n * O + o]) + static_cast<float>(t));
        out[n * O + o] = t;
      }
  }
}

template <typename T>
void run_silu(const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& out) {
  const int64_t N = x.size(0), K = x.size(1), F = w_gate.size(0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t f = 0; f < F; ++f) {
      const T* xr = x.data_ptr<T>() + n * K;
      const float g = static_cast<float>(static_cast<T>(dot(xr, w_gate.data_ptr<T>() + f * K, K)));
      const float u = static_cast<float>(static_cast<T>(dot(xr, w_up.data_ptr<T>() + f * K, K)));
      const T silu = static_cast<T>(g / (1.0f + std::exp(-g)));
      out.data_ptr<T>()[n * F + f] = static_cast<T>(static_cast<float>(silu) * u);
    }
}

}  // namespace

void check_input_norm(const at::Tensor& x, const InputNorm& norm, const char* op) {
  if (!norm.weight.defined()) return;
  check_same(norm.weight, x, op, "norm weight");
  RLAIF_CHECK(norm.weight.dim() == 1 && norm.weight.is_contiguous() && norm.weight.size(0) == x.size(1),
              "{}: norm weight must be a contiguous [{}], got {}", op, x.size(1), norm.weight.sizes());
  RLAIF_CHECK(x.numel() * static_cast<int64_t>(x.element_size()) <= kSmallLinearNormMaxBytes,
              "{}: with a norm x may take at most {} bytes, got {}", op, kSmallLinearNormMaxBytes,
              x.numel() * x.element_size());
  if (norm.normed.defined()) {
    check_same(norm.normed, x, op, "normed");
    RLAIF_CHECK(norm.normed.sizes() == x.sizes() && norm.normed.is_contiguous(), "{}: normed must be a contiguous {}",
                op, x.sizes());
  }
}

at::Tensor normed_input_cpu(const at::Tensor& x, const InputNorm& norm) {
  if (!norm.weight.defined()) return x;
  at::Tensor xn = norm.normed.defined() ? norm.normed : at::empty_like(x);
  rms_norm_cpu(x, norm.weight, norm.eps, xn);
  return xn;
}

void small_linear_cpu(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                      const std::vector<at::Tensor>& biases, const at::Tensor& residual,
                      const std::vector<at::Tensor>& outs, const InputNorm& norm) {
  check_args(x, weights, biases, residual, outs);
  check_input_norm(x, norm, "small_linear");
  RLAIF_CHECK(x.is_cpu(), "small_linear_cpu: tensors must be on the CPU");
  const at::Tensor xn = normed_input_cpu(x, norm);
  if (x.scalar_type() == at::kFloat) run<float>(xn, weights, biases, residual, outs);
  else run<at::BFloat16>(xn, weights, biases, residual, outs);
}

void small_linear(const at::Tensor& x, const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& biases,
                  const at::Tensor& residual, const std::vector<at::Tensor>& outs, const InputNorm& norm) {
  if (!x.is_cuda()) return small_linear_cpu(x, weights, biases, residual, outs, norm);
  check_args(x, weights, biases, residual, outs);
  check_input_norm(x, norm, "small_linear");
  cuda_kernel(&KernelRegistry::small_linear_cuda, "small_linear")(x, weights, biases, residual, outs, norm);
}

void small_linear_silu_mul_cpu(const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
                               const at::Tensor& out, const InputNorm& norm) {
  check_silu_args(x, w_gate, w_up, out);
  check_input_norm(x, norm, "small_linear_silu_mul");
  RLAIF_CHECK(x.is_cpu(), "small_linear_silu_mul_cpu: tensors must be on the CPU");
  const at::Tensor xn = normed_input_cpu(x, norm);
  if (x.scalar_type() == at::kFloat) run_silu<float>(xn, w_gate, w_up, out);
  else run_silu<at::BFloat16>(xn, w_gate, w_up, out);
}

void small_linear_silu_mul(const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
                           const at::Tensor& out, const InputNorm& norm) {
  if (!x.is_cuda()) return small_linear_silu_mul_cpu(x, w_gate, w_up, out, norm);
  check_silu_args(x, w_gate, w_up, out);
  check_input_norm(x, norm, "small_linear_silu_mul");
  cuda_kernel(&KernelRegistry::small_linear_silu_mul_cuda, "small_linear_silu_mul")(x, w_gate, w_up, out, norm);
}

}  // namespace rlaif::kernels
