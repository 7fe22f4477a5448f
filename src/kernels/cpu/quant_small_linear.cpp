// Few-row projections with quantized weights: CPU reference (the composition of the reference ops whose numerics
// the spec names: rms_norm, quant_linear, the bias and residual adds, silu_mul) and the device dispatcher.
#include "kernels/cpu/quant_small_linear.h"

#include <cstdint>

#include "kernels/cpu/common.h"
#include "kernels/cpu/quant.h"
#include "kernels/cpu/silu_mul.h"

namespace rlaif::kernels {

int64_t quant_small_linear_stage_bytes(int64_t rows, int64_t in_features, int64_t bits) {
  int64_t padded = 1;
  while (padded < rows) padded *= 2;
  return padded * in_features * 4 + padded * (in_features * bits / 128) * 4;
}

bool quant_small_linear_fits(int64_t rows, int64_t in_features, int64_t bits) {
  return rows <= kSmallLinearMaxRows && quant_small_linear_stage_bytes(rows, in_features, bits) <=
                                            kQuantSmallLinearStageMaxBytes;
}

bool quant_small_linear_takes(const QuantMatrix& w, int64_t rows) {
  if (!w.wq.defined() || w.wq.dim() != 2 || (w.bits != 4 && w.bits != 8) || w.group_size <= 0) return false;
  const int64_t vpc = 128 / w.bits, cpg = w.group_size / vpc, K = w.wq.size(1) * 32 / w.bits;
  return w.group_size % vpc == 0 && (cpg & (cpg - 1)) == 0 && w.wq.is_contiguous() && K % vpc == 0 &&
         aligned16(w.wq) && quant_small_linear_fits(rows, K, w.bits);
}

namespace {

// x (and the norm's weight and output) are read and written in 16-byte vectors.
void check_x(const at::Tensor& x, int64_t bits, const InputNorm& norm, const char* op) {
  check_activation(x, op, "x");
  RLAIF_CHECK(x.dim() == 2 && x.is_contiguous() && quant_small_linear_fits(x.size(0), x.size(1), bits),
              "{}: x must be a contiguous [N, K] with N <= {} whose staging fits {} bytes, got {}", op,
              kSmallLinearMaxRows, kQuantSmallLinearStageMaxBytes, x.sizes());
  RLAIF_CHECK(aligned16(x) && aligned16(norm.weight) && aligned16(norm.normed),
              "{}: x, the norm weight and normed must start 16-byte aligned", op);
}

void check_weight(const QuantMatrix& w, const at::Tensor& x, const at::Tensor& out, const char* op) {
  check_quant_params(x.size(1), w.bits, w.group_size);  // first: check_quant_packed divides by the bits
  check_quant_packed(w.wq, w.scales, w.biases, w.bits, w.group_size, op);
  RLAIF_CHECK(w.wq.size(1) == quant_packed_cols(x.size(1), w.bits) && w.wq.device() == x.device(),
              "{}: packed weight [{}, {}] on {} expected for K = {}", op, w.rows(),
              quant_packed_cols(x.size(1), w.bits), x.device().str(), x.size(1));
  RLAIF_CHECK(quant_small_linear_takes(w, x.size(0)), "{}: the kernels do not take a {}-bit weight of group size {} "
              "for {} rows of {} (quant_small_linear_takes)", op, w.bits, w.group_size, x.size(0), x.size(1));
  check_same(out, x, op, "out");
  RLAIF_CHECK(out.dim() == 2 && out.is_contiguous() && out.size(0) == x.size(0) && out.size(1) == w.rows(),
              "{}: out must be a contiguous [{}, {}], got {}", op, x.size(0), w.rows(), out.sizes());
}

void check_args(const at::Tensor& x, const std::vector<QuantMatrix>& weights, const std::vector<at::Tensor>& biases,
                const at::Tensor& residual, const std::vector<at::Tensor>& outs, const InputNorm& norm) {
  const char* op = "quant_small_linear";
  RLAIF_CHECK(!weights.empty() && weights.size() <= 3 && biases.size() == weights.size() &&
                  outs.size() == weights.size(),
              "{}: 1-3 weights, each with a bias slot and an out", op);
  check_x(x, weights[0].bits, norm, op);
  for (size_t i = 0; i < weights.size(); ++i) {
    check_weight(weights[i], x, outs[i], op);
    RLAIF_CHECK(weights[i].bits == weights[0].bits && weights[i].group_size == weights[0].group_size &&
                    weights[i].scales.scalar_type() == weights[0].scales.scalar_type(),
                "{}: the weights of one launch share bits, group size and scale dtype", op);
    if (biases[i].defined()) {
      check_same(biases[i], x, op, "bias");
      RLAIF_CHECK(biases[i].dim() == 1 && biases[i].is_contiguous() && biases[i].size(0) == weights[i].rows(),
                  "{}: bias {} must be [{}]", op, i, weights[i].rows());
    }
  }
  if (residual.defined()) {
    check_same(residual, x, op, "residual");
    RLAIF_CHECK(weights.size() == 1 && residual.sizes() == outs[0].sizes() && residual.is_contiguous(),
                "{}: a residual goes with one weight and has its out's shape", op);
  }
  check_input_norm(x, norm, op);
}

void check_silu_args(const at::Tensor& x, const QuantMatrix& gate, const QuantMatrix& up, const at::Tensor& out,
                     const InputNorm& norm) {
  const char* op = "quant_small_linear_silu_mul";
  check_x(x, gate.bits, norm, op);
  check_weight(gate, x, out, op);
  check_weight(up, x, out, op);
  RLAIF_CHECK(gate.bits == up.bits && gate.group_size == up.group_size &&
                  gate.scales.scalar_type() == up.scales.scalar_type(),
              "{}: gate and up share bits, group size and scale dtype", op);
  check_input_norm(x, norm, op);
}

// to(x · dequant(W)ᵀ) [N, O] by the reference quant_linear.
at::Tensor linear(const at::Tensor& x, const QuantMatrix& w) {
  at::Tensor y = at::empty({x.size(0), w.rows()}, x.options());
  quant_linear_cpu(x, w.wq, w.scales, w.biases, w.bits, w.group_size, y);
  return y;
}

}  // namespace

void quant_small_linear_cpu(const at::Tensor& x, const std::vector<QuantMatrix>& weights,
                            const std::vector<at::Tensor>& biases, const at::Tensor& residual,
                            const std::vector<at::Tensor>& outs, const InputNorm& norm) {
  check_args(x, weights, biases, residual, outs, norm);
  RLAIF_CHECK(x.is_cpu(), "quant_small_linear_cpu: tensors must be on the CPU");
  const at::Tensor xn = normed_input_cpu(x, norm);
  for (size_t i = 0; i < weights.size(); ++i) {
    at::Tensor y = linear(xn, weights[i]);
    if (biases[i].defined()) y = y + biases[i];  // ATen's add: float32 sum, one rounding
    if (residual.defined()) y = residual + y;
    outs[i].copy_(y);
  }
}

void quant_small_linear(const at::Tensor& x, const std::vector<QuantMatrix>& weights,
                        const std::vector<at::Tensor>& biases, const at::Tensor& residual,
                        const std::vector<at::Tensor>& outs, const InputNorm& norm) {
  if (!x.is_cuda()) return quant_small_linear_cpu(x, weights, biases, residual, outs, norm);
  check_args(x, weights, biases, residual, outs, norm);
  cuda_kernel(&KernelRegistry::quant_small_linear_cuda, "quant_small_linear")(x, weights, biases, residual, outs,
                                                                              norm);
}

void quant_small_linear_silu_mul_cpu(const at::Tensor& x, const QuantMatrix& gate, const QuantMatrix& up,
                                     const at::Tensor& out, const InputNorm& norm) {
  check_silu_args(x, gate, up, out, norm);
  RLAIF_CHECK(x.is_cpu(), "quant_small_linear_silu_mul_cpu: tensors must be on the CPU");
  const at::Tensor xn = normed_input_cpu(x, norm);
  silu_mul_cpu(linear(xn, gate), linear(xn, up), out);
}

void quant_small_linear_silu_mul(const at::Tensor& x, const QuantMatrix& gate, const QuantMatrix& up,
                                 const at::Tensor& out, const InputNorm& norm) {
  if (!x.is_cuda()) return quant_small_linear_silu_mul_cpu(x, gate, up, out, norm);
  check_silu_args(x, gate, up, out, norm);
  cuda_kernel(&KernelRegistry::quant_small_linear_silu_mul_cuda, "quant_small_linear_silu_mul")(x, gate, up, out,
                                                                                                  norm);
}

}  // namespace rlaif::kernels
