// MLX affine quantization: CPU references (the spec of docs/FORMATS.md, step by step in float32) and the
// device dispatchers. quant_linear parallelises over output rows (at::parallel_for) so model tests stay fast.
#include "kernels/cpu/quant.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels/cpu/common.h"

namespace rlaif::kernels {

namespace {

bool is_float_dtype(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kBFloat16 || s == at::kHalf;
}

bool is_word_dtype(const at::Tensor& t) { return t.scalar_type() == at::kUInt32 || t.scalar_type() == at::kInt; }

// Reads element i of a float32/bfloat16/float16 tensor as float (CPU, contiguous).
float load_float(const at::Tensor& t, int64_t i) {
  switch (t.scalar_type()) {
    case at::kFloat: return t.data_ptr<float>()[i];
    case at::kBFloat16: return static_cast<float>(t.data_ptr<at::BFloat16>()[i]);
    default: return static_cast<float>(t.data_ptr<at::Half>()[i]);
  }
}

// Stores float v rounded (to nearest even) to t's dtype.
void store_float(const at::Tensor& t, int64_t i, float v) {
  switch (t.scalar_type()) {
    case at::kFloat: t.data_ptr<float>()[i] = v; break;
    case at::kBFloat16: t.data_ptr<at::BFloat16>()[i] = static_cast<at::BFloat16>(v); break;
    default: t.data_ptr<at::Half>()[i] = static_cast<at::Half>(v); break;
  }
}

const uint32_t* words(const at::Tensor& wq) { return static_cast<const uint32_t*>(wq.data_ptr()); }

// Dequantizes row o of W into `row` (K floats): scale·q + bias, product and sum each rounded to float32.
void dequant_row(const at::Tensor& wq, const at::Tensor& scales, const at::Tensor& biases, int64_t bits,
                 int64_t group_size, int64_t o, float* row) {
  const int64_t words_per_row = wq.size(1), K = words_per_row * 32 / bits, groups = K / group_size;
  const int64_t per_word = 32 / bits;
  const uint32_t mask = (1u << bits) - 1;
  const uint32_t* w = words(wq) + o * words_per_row;
  for (int64_t g = 0; g < groups; ++g) {
    const float s = load_float(scales, o * groups + g), b = load_float(biases, o * groups + g);
    for (int64_t k = g * group_size; k < (g + 1) * group_size; ++k) {
      const uint32_t q = (w[k / per_word] >> ((k % per_word) * bits)) & mask;
      const float prod = s * static_cast<float>(q);
      row[k] = prod + b;
    }
  }
}

}  // namespace

void check_quant_packed(const at::Tensor& wq, const at::Tensor& scales, const at::Tensor& biases, int64_t bits,
                        int64_t group_size, const char* op) {
  RLAIF_CHECK(wq.defined() && is_word_dtype(wq) && wq.dim() == 2 && wq.is_contiguous(),
              "{}: wq must be a contiguous uint32/int32 [O, K*bits/32] tensor", op);
  const int64_t O = wq.size(0), K = wq.size(1) * 32 / bits;
  check_quant_params(K, bits, group_size);
  for (const at::Tensor* t : {&scales, &biases})
    RLAIF_CHECK(t->defined() && is_float_dtype(*t) && t->is_contiguous() && t->dim() == 2 && t->size(0) == O &&
                    t->size(1) == K / group_size && t->device() == wq.device(),
                "{}: scales/biases must be contiguous float [{}, {}] on {}", op, O, K / group_size, wq.device().str());
  RLAIF_CHECK(scales.scalar_type() == biases.scalar_type(), "{}: scales and biases differ in dtype", op);
}

int64_t quant_packed_cols(int64_t in_features, int64_t bits) { return in_features * bits / 32; }

void check_quant_params(int64_t in_features, int64_t bits, int64_t group_size) {
  RLAIF_CHECK(bits == 4 || bits == 8, "quantization: bits must be 4 or 8, got {}", bits);
  RLAIF_CHECK(group_size >= 8 && group_size % (32 / bits) == 0 && in_features % group_size == 0,
              "quantization: group_size {} must be ≥ 8, a multiple of {} and divide the input dim {}", group_size,
              32 / bits, in_features);
}

void quantize_affine_cpu(const at::Tensor& w, int64_t bits, int64_t group_size, const at::Tensor& wq,
                         const at::Tensor& scales, const at::Tensor& biases) {
  RLAIF_CHECK(w.defined() && is_float_dtype(w) && w.dim() == 2 && w.is_contiguous() && w.is_cpu(),
              "quantize_affine_cpu: w must be a contiguous float [O, K] CPU tensor");
  const int64_t O = w.size(0), K = w.size(1);
  check_quant_packed(wq, scales, biases, bits, group_size, "quantize_affine");
  RLAIF_CHECK(wq.size(0) == O && wq.size(1) == quant_packed_cols(K, bits), "quantize_affine: wq shape {} for w {}",
              wq.sizes(), w.sizes());
  const float n_bins = static_cast<float>((1 << bits) - 1), eps = 1e-7f;
  const int64_t groups = K / group_size, per_word = 32 / bits;
  uint32_t* out = static_cast<uint32_t*>(wq.data_ptr());
  at::parallel_for(0, O, 1, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t base = o * K + g * group_size;
        // MLX's GPU kernels start w_max at 0 (and w_min at the largest float): see docs/FORMATS.md.
        float w_min = std::numeric_limits<float>::max(), w_max = 0.0f;
        for (int64_t i = 0; i < group_size; ++i) {
          const float v = load_float(w, base + i);
          w_min = std::min(w_min, v);
          w_max = std::max(w_max, v);
        }
        float scale = std::max((w_max - w_min) / n_bins, eps);
        const bool side = std::abs(w_min) > std::abs(w_max);
        scale = side ? scale : -scale;
        const float edge = side ? w_min : w_max;
        const float q0 = std::round(edge / scale);  // half away from zero, as Metal's and CUDA's round()
        const bool at_zero = q0 == 0.0f;
        scale = at_zero ? scale : edge / q0;  // the edge value (and so 0) lands exactly on a level
        const float bias = at_zero ? 0.0f : edge;
        store_float(scales, o * groups + g, scale);
        store_float(biases, o * groups + g, bias);
        for (int64_t i = 0; i < group_size; i += per_word) {
          uint32_t word = 0;
          for (int64_t j = 0; j < per_word; ++j) {
            const float v = load_float(w, base + i + j);
            const float q = std::min(std::max(std::round((v - bias) / scale), 0.0f), n_bins);
            word |= static_cast<uint32_t>(q) << (j * bits);
          }
          out[(base + i) / per_word] = word;
        }
      }
    }
  });
}

void dequantize_affine_cpu(const at::Tensor& wq, const at::Tensor& scales, const at::Tensor& biases, int64_t bits,
                           int64_t group_size, const at::Tensor& out) {
  check_quant_packed(wq, scales, biases, bits, group_size, "dequantize_affine");
  RLAIF_CHECK(wq.is_cpu(), "dequantize_affine_cpu: tensors must be on the CPU");
  const int64_t O = wq.size(0), K = wq.size(1) * 32 / bits;
  RLAIF_CHECK(out.defined() && is_float_dtype(out) && out.is_contiguous() && out.dim() == 2 && out.size(0) == O &&
                  out.size(1) == K,
              "dequantize_affine: out must be a contiguous float [{}, {}] tensor", O, K);
  at::parallel_for(0, O, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row(K);
    for (int64_t o = begin; o < end; ++o) {
      dequant_row(wq, scales, biases, bits, group_size, o, row.data());
      for (int64_t k = 0; k < K; ++k) store_float(out, o * K + k, row[k]);
    }
  });
}

void quant_linear_cpu(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales, const at::Tensor& biases,
                      int64_t bits, int64_t group_size, const at::Tensor& out) {
  check_activation(x, "quant_linear", "x");
  check_same(out, x, "quant_linear", "out");
  check_quant_packed(wq, scales, biases, bits, group_size, "quant_linear");
  RLAIF_CHECK(x.is_cpu() && wq.is_cpu(), "quant_linear_cpu: tensors must be on the CPU");
  const int64_t N = x.size(0), K = x.size(1), O = wq.size(0);
  RLAIF_CHECK(x.dim() == 2 && x.stride(1) == 1 && K == wq.size(1) * 32 / bits,
              "quant_linear: x must be [N, {}] with a contiguous last dim, got {}", wq.size(1) * 32 / bits, x.sizes());
  RLAIF_CHECK(out.dim() == 2 && out.size(0) == N && out.size(1) == O && out.is_contiguous(),
              "quant_linear: out must be a contiguous [{}, {}] tensor", N, O);
  // x in float32 once, so the inner loop is plain float math.
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const float* xp = xf.data_ptr<float>();
  std::vector<float> acc(static_cast<size_t>(N * O));
  at::parallel_for(0, O, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row(K);
    for (int64_t o = begin; o < end; ++o) {
      dequant_row(wq, scales, biases, bits, group_size, o, row.data());
      for (int64_t n = 0; n < N; ++n) {
        const float* xr = xp + n * K;
        float s = 0.0f;
        for (int64_t k = 0; k < K; ++k) s += xr[k] * row[k];
        acc[n * O + o] = s;
      }
    }
  });
  for (int64_t i = 0; i < N * O; ++i) store_float(out, i, acc[i]);
}

void quantize_affine(const at::Tensor& w, int64_t bits, int64_t group_size, const at::Tensor& wq,
                     const at::Tensor& scales, const at::Tensor& biases) {
  if (!w.is_cuda()) return quantize_affine_cpu(w, bits, group_size, wq, scales, biases);
  RLAIF_CHECK(w.dim() == 2 && w.is_contiguous() && is_float_dtype(w) && wq.device() == w.device(),
              "quantize_affine: w must be a contiguous float [O, K] tensor on wq's device");
  check_quant_packed(wq, scales, biases, bits, group_size, "quantize_affine");
  RLAIF_CHECK(wq.size(0) == w.size(0) && wq.size(1) == quant_packed_cols(w.size(1), bits),
              "quantize_affine: wq shape {} for w {}", wq.sizes(), w.sizes());
  cuda_kernel(&KernelRegistry::quantize_affine_cuda, "quantize_affine")(w, bits, group_size, wq, scales, biases);
}

void dequantize_affine(const at::Tensor& wq, const at::Tensor& scales, const at::Tensor& biases, int64_t bits,
                       int64_t group_size, const at::Tensor& out) {
  if (!wq.is_cuda()) return dequantize_affine_cpu(wq, scales, biases, bits, group_size, out);
  check_quant_packed(wq, scales, biases, bits, group_size, "dequantize_affine");
  RLAIF_CHECK(out.is_contiguous() && is_float_dtype(out) && out.device() == wq.device() && out.dim() == 2 &&
                  out.size(0) == wq.size(0) && out.size(1) == wq.size(1) * 32 / bits,
              "dequantize_affine: out must be a contiguous float [O, K] tensor on wq's device");
  cuda_kernel(&KernelRegistry::dequantize_affine_cuda, "dequantize_affine")(wq, scales, biases, bits, group_size, out);
}

void quant_linear(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales, const at::Tensor& biases,
                  int64_t bits, int64_t group_size, const at::Tensor& out) {
  if (!x.is_cuda()) return quant_linear_cpu(x, wq, scales, biases, bits, group_size, out);
  check_activation(x, "quant_linear", "x");
  check_same(out, x, "quant_linear", "out");
  check_quant_packed(wq, scales, biases, bits, group_size, "quant_linear");
  RLAIF_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) == wq.size(1) * 32 / bits && wq.device() == x.device(),
              "quant_linear: x must be [N, {}] with a contiguous last dim on wq's device, got {}",
              wq.size(1) * 32 / bits, x.sizes());
  RLAIF_CHECK(out.dim() == 2 && out.size(0) == x.size(0) && out.size(1) == wq.size(0) && out.is_contiguous(),
              "quant_linear: out must be a contiguous [{}, {}] tensor", x.size(0), wq.size(0));
  cuda_kernel(&KernelRegistry::quant_linear_cuda, "quant_linear")(x, wq, scales, biases, bits, group_size, out);
}

void quant_linear_mma(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales, const at::Tensor& biases,
                      int64_t bits, int64_t group_size, const at::Tensor& out) {
  check_same(out, x, "quant_linear_mma", "out");
  check_quant_packed(wq, scales, biases, bits, group_size, "quant_linear_mma");
  const int64_t K = wq.size(1) * 32 / bits;
  RLAIF_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.stride(1) == 1 && x.size(1) == K &&
                  wq.device() == x.device(),
              "quant_linear_mma: x must be a bfloat16 [N, {}] with a contiguous last dim on wq's device, got {} {}", K,
              c10::toString(x.scalar_type()), x.sizes());
  RLAIF_CHECK(K % 64 == 0 && group_size % 16 == 0, "quant_linear_mma: needs K % 64 == 0 and group_size % 16 == 0, "
              "got K {} and group_size {}", K, group_size);
  RLAIF_CHECK(out.dim() == 2 && out.size(0) == x.size(0) && out.size(1) == wq.size(0) && out.is_contiguous(),
              "quant_linear_mma: out must be a contiguous [{}, {}] tensor", x.size(0), wq.size(0));
  if (x.is_cuda()) {
    cuda_kernel(&KernelRegistry::quant_linear_mma_cuda, "quant_linear_mma")(x, wq, scales, biases, bits, group_size,
                                                                            out);
    return;
  }
  const at::Tensor w = at::empty({wq.size(0), K}, x.options());
  dequantize_affine_cpu(wq, scales, biases, bits, group_size, w);
  out.copy_(at::matmul(x.to(at::kFloat), w.to(at::kFloat).t()));
}

}  // namespace rlaif::kernels
