// RMSNorm CPU reference (plain loops: the spec the CUDA kernel must match) and the device dispatcher.
#include "kernels/cpu/rms_norm.h"

#include <cmath>

#include "kernels/cpu/common.h"

namespace rlaif::kernels {

namespace {

void check_args(const at::Tensor& x, const at::Tensor* delta, const at::Tensor& w, const at::Tensor& out,
                const char* op) {
  check_activation(x, op, "x");
  RLAIF_CHECK(x.dim() >= 1 && x.is_contiguous(), "{}: x must be contiguous with at least one dim", op);
  check_same(w, x, op, "w");
  check_same(out, x, op, "out");
  RLAIF_CHECK(w.dim() == 1 && w.size(0) == x.size(-1) && w.is_contiguous(), "{}: w must be [{}]", op, x.size(-1));
  RLAIF_CHECK(out.sizes() == x.sizes() && out.is_contiguous(), "{}: out must be contiguous {}", op, x.sizes());
  if (delta != nullptr) {
    check_same(*delta, x, op, "delta");
    RLAIF_CHECK(delta->sizes() == x.sizes() && delta->is_contiguous(), "{}: delta must be contiguous {}", op, x.sizes());
  }
}

// One row: optional residual add (rounded to T, written back), then the norm. ATen's mean multiplies the sum by
// 1/D (MeanOps), and eps joins in float32; rsqrt is computed as 1/sqrt, both correctly rounded.
template <typename T>
void norm_rows(T* x, const T* delta, const T* w, T* out, int64_t rows, int64_t D, double eps) {
  const float inv_d = 1.0f / static_cast<float>(D), feps = static_cast<float>(eps);
  for (int64_t r = 0; r < rows; ++r) {
    T* xr = x + r * D;
    if (delta != nullptr)
      for (int64_t i = 0; i < D; ++i) xr[i] = static_cast<T>(static_cast<float>(xr[i]) + static_cast<float>(delta[r * D + i]));
    float ss = 0.0f;
    for (int64_t i = 0; i < D; ++i) ss += static_cast<float>(xr[i]) * static_cast<float>(xr[i]);
    const float scale = 1.0f / std::sqrt(ss * inv_d + feps);
    for (int64_t i = 0; i < D; ++i) {
      const T normed = static_cast<T>(static_cast<float>(xr[i]) * scale);
      out[r * D + i] = static_cast<T>(static_cast<float>(w[i]) * static_cast<float>(normed));
    }
  }
}

template <typename T>
void run_cpu(const at::Tensor& x, const at::Tensor* delta, const at::Tensor& w, double eps, const at::Tensor& out) {
  const int64_t D = x.size(-1);
  norm_rows<T>(x.data_ptr<T>(), delta ? delta->data_ptr<T>() : nullptr, w.data_ptr<T>(), out.data_ptr<T>(),
               x.numel() / D, D, eps);
}

}  // namespace

void rms_norm_cpu(const at::Tensor& x, const at::Tensor& w, double eps, const at::Tensor& out) {
  check_args(x, nullptr, w, out, "rms_norm");
  RLAIF_CHECK(x.is_cpu(), "rms_norm_cpu: tensors must be on the CPU");
  if (x.scalar_type() == at::kFloat) run_cpu<float>(x, nullptr, w, eps, out);
  else run_cpu<at::BFloat16>(x, nullptr, w, eps, out);
}

void add_rms_norm_cpu(const at::Tensor& h, const at::Tensor& delta, const at::Tensor& w, double eps,
                      const at::Tensor& out) {
  check_args(h, &delta, w, out, "add_rms_norm");
  RLAIF_CHECK(h.is_cpu(), "add_rms_norm_cpu: tensors must be on the CPU");
  if (h.scalar_type() == at::kFloat) run_cpu<float>(h, &delta, w, eps, out);
  else run_cpu<at::BFloat16>(h, &delta, w, eps, out);
}

void rms_norm(const at::Tensor& x, const at::Tensor& w, double eps, const at::Tensor& out) {
  if (!x.is_cuda()) return rms_norm_cpu(x, w, eps, out);
  check_args(x, nullptr, w, out, "rms_norm");
  cuda_kernel(&KernelRegistry::rms_norm_cuda, "rms_norm")(x, w, eps, out);
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  rms_norm(x, w, eps, out);
  return out;
}

void add_rms_norm(const at::Tensor& h, const at::Tensor& delta, const at::Tensor& w, double eps, const at::Tensor& out) {
  if (!h.is_cuda()) return add_rms_norm_cpu(h, delta, w, eps, out);
  check_args(h, &delta, w, out, "add_rms_norm");
  cuda_kernel(&KernelRegistry::add_rms_norm_cuda, "add_rms_norm")(h, delta, w, eps, out);
}

}  // namespace rlaif::kernels
