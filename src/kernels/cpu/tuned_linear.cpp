// The decode step's dense projections: CPU reference (ATen) and the device dispatcher.
#include "kernels/cpu/tuned_linear.h"

#include "kernels/cpu/common.h"

namespace rlaif::kernels {

namespace {

void check_args(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, const at::Tensor& out) {
  check_activation(x, "linear_tuned", "x");
  check_same(w, x, "linear_tuned", "w");
  check_same(out, x, "linear_tuned", "out");
  RLAIF_CHECK(x.dim() == 2 && w.dim() == 2 && out.dim() == 2 && w.size(1) == x.size(1) && out.size(0) == x.size(0) &&
                  out.size(1) == w.size(0),
              "linear_tuned: x [S, K], w [N, K], out [S, N], got {}, {}, {}", x.sizes(), w.sizes(), out.sizes());
  RLAIF_CHECK(x.stride(1) == 1 && out.stride(1) == 1 && w.is_contiguous(),
              "linear_tuned: x and out need contiguous rows, w must be contiguous");
  if (bias.defined()) {
    check_same(bias, x, "linear_tuned", "bias");
    RLAIF_CHECK(bias.dim() == 1 && bias.size(0) == w.size(0) && bias.is_contiguous(), "linear_tuned: bias must be [N]");
  }
}

}  // namespace

void linear_tuned_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, const at::Tensor& out,
                      bool accumulate) {
  check_args(x, w, bias, out);
  at::Tensor y = at::linear(x, w, bias);
  if (accumulate) y = out + y;
  out.copy_(y);
}

void linear_tuned(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, const at::Tensor& out,
                  bool accumulate) {
  if (!x.is_cuda()) return linear_tuned_cpu(x, w, bias, out, accumulate);
  check_args(x, w, bias, out);
  cuda_kernel(&KernelRegistry::linear_tuned_cuda, "linear_tuned")(x, w, bias, out, accumulate);
}

}  // namespace rlaif::kernels
