// LoRA shrink/expand: CPU reference (plain loops, the spec) and the device dispatcher.
#include "kernels/cpu/lora.h"

#include "kernels/cpu/common.h"
#include "kernels/cpu/rms_norm.h"
#include "kernels/cpu/silu_mul.h"

namespace rlaif::kernels {

namespace {

int64_t total_rank(const std::vector<at::Tensor>& a) {
  int64_t r = 0;
  for (const auto& t : a) r += t.size(0);
  return r;
}

void check_shrink(const at::Tensor& x, const std::vector<at::Tensor>& a, const at::Tensor& t) {
  check_activation(x, "lora_shrink", "x");
  RLAIF_CHECK(x.dim() == 2 && x.is_contiguous() && !a.empty(), "lora_shrink: x must be a contiguous [S, D], with adapters");
  for (const auto& ai : a)
    RLAIF_CHECK(ai.scalar_type() == at::kFloat && ai.dim() == 2 && ai.size(1) == x.size(1) && ai.is_contiguous() &&
                    ai.device() == x.device(),
                "lora_shrink: A must be a contiguous float32 [r, {}] on {}", x.size(1), x.device().str());
  RLAIF_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 2 && t.size(0) == x.size(0) &&
                  t.size(1) == total_rank(a) && t.device() == x.device(),
              "lora_shrink: t must be a contiguous float32 [{}, {}]", x.size(0), total_rank(a));
}

void check_expand(const at::Tensor& t, const std::vector<at::Tensor>& b, const std::vector<double>& scales,
                  const std::vector<at::Tensor>& ys, const at::Tensor& residual, const std::vector<at::Tensor>& outs) {
  RLAIF_CHECK(!b.empty() && b.size() <= 3 && scales.size() == b.size() && ys.size() == b.size() &&
                  outs.size() == b.size(),
              "lora_expand: 1-3 adapters, each with a scale, a base output and an out");
  RLAIF_CHECK((t.scalar_type() == at::kFloat || t.scalar_type() == ys[0].scalar_type()) && t.dim() == 2 &&
                  t.stride(1) == 1,
              "lora_expand: t must be [S, R] float32 or of the outputs' dtype, with contiguous rows");
  int64_t r = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    check_activation(ys[i], "lora_expand", "y");
    check_same(outs[i], ys[i], "lora_expand", "out");
    RLAIF_CHECK(b[i].scalar_type() == at::kFloat && b[i].dim() == 2 && b[i].is_contiguous() &&
                    b[i].device() == t.device() && ys[i].device() == t.device(),
                "lora_expand: B must be a contiguous float32 [O, r] on {}", t.device().str());
    RLAIF_CHECK(ys[i].dim() == 2 && ys[i].stride(1) == 1 && ys[i].size(0) == t.size(0) &&
                    ys[i].size(1) == b[i].size(0) && outs[i].sizes() == ys[i].sizes() && outs[i].stride(1) == 1,
                "lora_expand: y/out {} must be [{}, {}] with contiguous rows", i, t.size(0), b[i].size(0));
    r += b[i].size(1);
  }
  RLAIF_CHECK(r == t.size(1), "lora_expand: the adapters' ranks sum to {}, t has {} columns", r, t.size(1));
  if (residual.defined()) {
    check_same(residual, ys[0], "lora_expand", "residual");
    RLAIF_CHECK(b.size() == 1 && residual.sizes() == ys[0].sizes() && residual.is_contiguous(),
                "lora_expand: a residual goes with one adapter and has its output's shape");
  }
}

void check_expand_silu(const at::Tensor& t, const std::vector<at::Tensor>& b, const std::vector<double>& scales,
                       const at::Tensor& gate, const at::Tensor& up, const at::Tensor& out) {
  RLAIF_CHECK(b.size() == 2, "lora_expand_silu_mul: two adapters (gate, up)");
  check_expand(t, b, scales, {gate, up}, {}, {gate, up});
  check_same(out, gate, "lora_expand_silu_mul", "out");
  RLAIF_CHECK(up.sizes() == gate.sizes() && out.sizes() == gate.sizes() && out.is_contiguous(),
              "lora_expand_silu_mul: gate, up and a contiguous out of one shape [S, F]");
}

template <typename T>
void shrink(const at::Tensor& x, const std::vector<at::Tensor>& a, const at::Tensor& t) {
  const int64_t S = x.size(0), D = x.size(1), R = t.size(1);
  int64_t col = 0;
  for (const auto& ai : a) {
    for (int64_t j = 0; j < ai.size(0); ++j, ++col)
      for (int64_t s = 0; s < S; ++s) {
        float acc = 0.0f;
        for (int64_t d = 0; d < D; ++d)
          acc += static_cast<float>(x.data_ptr<T>()[s * D + d]) * ai.data_ptr<float>()[j * D + d];
        t.data_ptr<float>()[s * R + col] = acc;
      }
  }
}

template <typename T, typename TT>
void expand(const at::Tensor& t, const std::vector<at::Tensor>& b, const std::vector<double>& scales,
            const std::vector<at::Tensor>& ys, const at::Tensor& residual, const std::vector<at::Tensor>& outs) {
  const int64_t S = t.size(0), R = t.stride(0);
  const TT* tp = t.data_ptr<TT>();
  int64_t col = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    const int64_t O = b[i].size(0), r = b[i].size(1);
    for (int64_t s = 0; s < S; ++s)
      for (int64_t o = 0; o < O; ++o) {
        float d = 0.0f;
        for (int64_t j = 0; j < r; ++j) d += static_cast<float>(tp[s * R + col + j]) * b[i].data_ptr<float>()[o * r + j];
        const T delta = static_cast<T>(d * static_cast<float>(scales[i]));
        T y = static_cast<T>(static_cast<float>(ys[i].data_ptr<T>()[s * ys[i].stride(0) + o]) +
                             static_cast<float>(delta));
        if (residual.defined()) y = static_cast<T>(static_cast<float>(residual.data_ptr<T>()[s * O + o]) + static_cast<float>(y));
        outs[i].data_ptr<T>()[s * outs[i].stride(0) + o] = y;
      }
    col += r;
  }
}

}  // namespace

void lora_shrink_cpu(const at::Tensor& x, const std::vector<at::Tensor>& a, const at::Tensor& t) {
  check_shrink(x, a, t);
  RLAIF_CHECK(x.is_cpu(), "lora_shrink_cpu: tensors must be on the CPU");
  if (x.scalar_type() == at::kFloat) shrink<float>(x, a, t);
  else shrink<at::BFloat16>(x, a, t);
}

void lora_shrink(const at::Tensor& x, const std::vector<at::Tensor>& a, const at::Tensor& t) {
  if (!x.is_cuda()) return lora_shrink_cpu(x, a, t);
  check_shrink(x, a, t);
  cuda_kernel(&KernelRegistry::lora_shrink_cuda, "lora_shrink")(x, a, t);
}

void lora_expand_cpu(const at::Tensor& t, const std::vector<at::Tensor>& b, const std::vector<double>& scales,
                     const std::vector<at::Tensor>& ys, const at::Tensor& residual, const std::vector<at::Tensor>& outs) {
  check_expand(t, b, scales, ys, residual, outs);
  RLAIF_CHECK(t.is_cpu(), "lora_expand_cpu: tensors must be on the CPU");
  if (ys[0].scalar_type() == at::kFloat) expand<float, float>(t, b, scales, ys, residual, outs);
  else if (t.scalar_type() == at::kFloat) expand<at::BFloat16, float>(t, b, scales, ys, residual, outs);
  else expand<at::BFloat16, at::BFloat16>(t, b, scales, ys, residual, outs);
}

void lora_expand(const at::Tensor& t, const std::vector<at::Tensor>& b, const std::vector<double>& scales,
                 const std::vector<at::Tensor>& ys, const at::Tensor& residual, const std::vector<at::Tensor>& outs) {
  if (!t.is_cuda()) return lora_expand_cpu(t, b, scales, ys, residual, outs);
  check_expand(t, b, scales, ys, residual, outs);
  cuda_kernel(&KernelRegistry::lora_expand_cuda, "lora_expand")(t, b, scales, ys, residual, outs);
}

void lora_expand_silu_mul_cpu(const at::Tensor& t, const std::vector<at::Tensor>& b,
                              const std::vector<double>& scales, const at::Tensor& gate, const at::Tensor& up,
                              const at::Tensor& out) {
  check_expand_silu(t, b, scales, gate, up, out);
  RLAIF_CHECK(t.is_cpu(), "lora_expand_silu_mul_cpu: tensors must be on the CPU");
  std::vector<at::Tensor> ys{gate.clone(), up.clone()};
  lora_expand_cpu(t, b, scales, ys, {}, ys);
  silu_mul_cpu(ys[0], ys[1], out);
}

void lora_expand_silu_mul(const at::Tensor& t, const std::vector<at::Tensor>& b, const std::vector<double>& scales,
                          const at::Tensor& gate, const at::Tensor& up, const at::Tensor& out) {
  if (!t.is_cuda()) return lora_expand_silu_mul_cpu(t, b, scales, gate, up, out);
  check_expand_silu(t, b, scales, gate, up, out);
  cuda_kernel(&KernelRegistry::lora_expand_silu_mul_cuda, "lora_expand_silu_mul")(t, b, scales, gate, up, out);
}

namespace {

void check_expand_rms_norm(const at::Tensor& t, const at::Tensor& b, double scale, const at::Tensor& y,
                           const at::Tensor& h, const at::Tensor& w, const at::Tensor& out) {
  check_expand(t, {b}, {scale}, {y}, h, {h});
  check_same(out, h, "lora_expand_rms_norm", "out");
  check_same(w, h, "lora_expand_rms_norm", "w");
  RLAIF_CHECK(out.sizes() == h.sizes() && out.is_contiguous() && w.dim() == 1 && w.size(0) == h.size(1) &&
                  w.is_contiguous(),
              "lora_expand_rms_norm: out [S, O] contiguous and w [O], O = {}", h.size(1));
}

}  // namespace

bool lora_expand_rms_norm_takes(const at::Tensor& t, const at::Tensor& b, const at::Tensor& y, const at::Tensor& h) {
  const int64_t vec = 16 / h.element_size();
  return b.size(1) <= kLoraNormMaxRank && h.size(1) % vec == 0 && y.stride(0) % vec == 0 && aligned16(y) &&
         aligned16(h) && h.is_contiguous() && t.stride(1) == 1;
}

void lora_expand_rms_norm_cpu(const at::Tensor& t, const at::Tensor& b, double scale, const at::Tensor& y,
                              const at::Tensor& h, const at::Tensor& w, double eps, const at::Tensor& out) {
  check_expand_rms_norm(t, b, scale, y, h, w, out);
  RLAIF_CHECK(t.is_cpu(), "lora_expand_rms_norm_cpu: tensors must be on the CPU");
  lora_expand_cpu(t, {b}, {scale}, {y}, h, {h});
  rms_norm_cpu(h, w, eps, out);
}

void lora_expand_rms_norm(const at::Tensor& t, const at::Tensor& b, double scale, const at::Tensor& y,
                          const at::Tensor& h, const at::Tensor& w, double eps, const at::Tensor& out) {
  if (!t.is_cuda()) return lora_expand_rms_norm_cpu(t, b, scale, y, h, w, eps, out);
  check_expand_rms_norm(t, b, scale, y, h, w, out);
  RLAIF_CHECK(lora_expand_rms_norm_takes(t, b, y, h),
              "lora_expand_rms_norm: rank {} (at most {}) or rows not 16-byte aligned: the caller asks "
              "lora_expand_rms_norm_takes first", b.size(1), kLoraNormMaxRank);
  cuda_kernel(&KernelRegistry::lora_expand_rms_norm_cuda, "lora_expand_rms_norm")(t, b, scale, y, h, w, eps, out);
}

}  // namespace rlaif::kernels
