// silu(gate) * up: CPU reference (plain loops, the spec) and the device dispatcher.
#include "kernels/cpu/silu_mul.h"

#include <cmath>

#include "kernels/cpu/common.h"

namespace rlaif::kernels {

namespace {

void check_args(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& out) {
  check_activation(gate, "silu_mul", "gate");
  check_same(up, gate, "silu_mul", "up");
  check_same(out, gate, "silu_mul", "out");
  RLAIF_CHECK(gate.dim() == 2 && up.sizes() == gate.sizes() && out.sizes() == gate.sizes(),
              "silu_mul: gate, up and out must all be [N, F], got {}, {}, {}", gate.sizes(), up.sizes(), out.sizes());
  RLAIF_CHECK(gate.stride(1) == 1 && up.stride(1) == 1 && out.is_contiguous(),
              "silu_mul: gate/up need a contiguous last dim and out must be contiguous");
}

template <typename T>
void run(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& out) {
  const int64_t N = gate.size(0), F = gate.size(1);
  for (int64_t r = 0; r < N; ++r) {
    const T* g = gate.data_ptr<T>() + r * gate.stride(0);
    const T* u = up.data_ptr<T>() + r * up.stride(0);
    T* o = out.data_ptr<T>() + r * F;
    for (int64_t i = 0; i < F; ++i) {
      const float x = static_cast<float>(g[i]);
      const T silu = static_cast<T>(x / (1.0f + std::exp(-x)));  // ATen's silu: x / (1 + exp(-x)) in float32
      o[i] = static_cast<T>(static_cast<float>(silu) * static_cast<float>(u[i]));
    }
  }
}

}  // namespace

void silu_mul_cpu(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& out) {
  check_args(gate, up, out);
  RLAIF_CHECK(gate.is_cpu(), "silu_mul_cpu: tensors must be on the CPU");
  if (gate.scalar_type() == at::kFloat) run<float>(gate, up, out);
  else run<at::BFloat16>(gate, up, out);
}

void silu_mul(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& out) {
  if (!gate.is_cuda()) return silu_mul_cpu(gate, up, out);
  check_args(gate, up, out);
  cuda_kernel(&KernelRegistry::silu_mul_cuda, "silu_mul")(gate, up, out);
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  RLAIF_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "silu_mul: gate_up must be [N, 2F], got {}",
              gate_up.sizes());
  const int64_t F = gate_up.size(1) / 2;
  at::Tensor out = at::empty({gate_up.size(0), F}, gate_up.options());
  silu_mul(gate_up.narrow(1, 0, F), gate_up.narrow(1, F, F), out);
  return out;
}

}  // namespace rlaif::kernels
