// MLX affine quantization on the GPU: quantize (live re-quantization of trainer weights), dequantize, and
// x · dequant(W)ᵀ — a GEMV kernel for ≤ 8 rows that streams the packed words once with float32 sums, and for more
// rows a dequantized scratch matrix in x's dtype multiplied by cuBLAS (at::mm). Quantize and dequantize use
// round-to-nearest float32 ops without contraction (__f*_rn), so they equal the CPU reference bit for bit.
#include "kernels/cuda/quant.h"

#include "kernels/cuda/common.cuh"

namespace rlaif::kernels {

namespace {

using namespace cuda_detail;

constexpr int kThreads = 256;
constexpr int kMaxGemvRows = 8;

template <typename S>
__device__ __forceinline__ float as_float(S v) {
  return static_cast<float>(v);
}

// One thread per (row, group): min/max, the scale/bias rule of docs/FORMATS.md, then the packed words.
template <typename T, typename S>
__global__ void quantize_kernel(const T* __restrict__ w, int64_t rows, int64_t K, int bits, int group,
                                uint32_t* __restrict__ wq, S* __restrict__ scales, S* __restrict__ biases) {
  const int64_t groups = K / group;
  const int64_t id = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (id >= rows * groups) return;
  const int64_t row = id / groups, g = id % groups;
  const T* src = w + row * K + g * group;
  float w_min = 3.402823466e38f, w_max = 0.0f;  // MLX's GPU kernels start w_max at 0
  for (int i = 0; i < group; ++i) {
    const float v = static_cast<float>(src[i]);
    w_min = fminf(w_min, v);
    w_max = fmaxf(w_max, v);
  }
  const float n_bins = static_cast<float>((1 << bits) - 1);
  float scale = fmaxf(__fdiv_rn(__fsub_rn(w_max, w_min), n_bins), 1e-7f);
  const bool side = fabsf(w_min) > fabsf(w_max);
  scale = side ? scale : -scale;
  const float edge = side ? w_min : w_max;
  const float q0 = roundf(__fdiv_rn(edge, scale));
  const bool at_zero = q0 == 0.0f;
  scale = at_zero ? scale : __fdiv_rn(edge, q0);
  const float bias = at_zero ? 0.0f : edge;
  scales[id] = static_cast<S>(scale);
  biases[id] = static_cast<S>(bias);
  const int per_word = 32 / bits;
  uint32_t* dst = wq + (row * K + g * group) / per_word;
  for (int i = 0; i < group; i += per_word) {
    uint32_t word = 0;
    for (int j = 0; j < per_word; ++j) {
      const float v = static_cast<float>(src[i + j]);
      const float q = fminf(fmaxf(roundf(__fdiv_rn(__fsub_rn(v, bias), scale)), 0.0f), n_bins);
      word |= static_cast<uint32_t>(q) << (j * bits);
    }
    dst[i / per_word] = word;
  }
}

// One thread per packed word: 32/bits outputs of scale·q + bias.
template <typename S, typename O, int BITS>
__global__ void dequantize_kernel(const uint32_t* __restrict__ wq, const S* __restrict__ scales,
                                  const S* __restrict__ biases, int64_t words, int64_t K, int group,
                                  O* __restrict__ out) {
  constexpr int kPer = 32 / BITS;
  constexpr uint32_t kMask = (1u << BITS) - 1;
  const int64_t id = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (id >= words) return;
  const int64_t k0 = id * kPer;  // flat element index (rows are whole words)
  const int64_t row = k0 / K, col = k0 % K;
  const int64_t gi = row * (K / group) + col / group;
  const float s = as_float(scales[gi]), b = as_float(biases[gi]);
  const uint32_t word = wq[id];
#pragma unroll
  for (int j = 0; j < kPer; ++j)
    out[k0 + j] = static_cast<O>(__fadd_rn(__fmul_rn(s, static_cast<float>((word >> (j * BITS)) & kMask)), b));
}

// A warp per output row o: lanes walk the row's words (coalesced; WV = 4 words per 16-byte load when rows allow,
// so more bytes are in flight), dequantize in registers and accumulate NR rows of x in float32; then a warp sum.
template <typename T, typename S, int BITS, int NR, int WV>
__global__ void gemv_kernel(const T* __restrict__ x, int64_t x_stride, const uint32_t* __restrict__ wq,
                            const S* __restrict__ scales, const S* __restrict__ biases, int64_t O, int64_t K,
                            int group, T* __restrict__ out) {
  constexpr int kPer = 32 / BITS;
  constexpr uint32_t kMask = (1u << BITS) - 1;
  const int lane = threadIdx.x % 32;
  const int64_t o = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (o >= O) return;
  const int64_t words = K / kPer, groups = K / group;
  const uint32_t* wrow = wq + o * words;
  float acc[NR];
#pragma unroll
  for (int n = 0; n < NR; ++n) acc[n] = 0.0f;
  for (int64_t vi = lane; vi < words / WV; vi += 32) {
    uint32_t wv[WV];
    if constexpr (WV == 4) {
      const uint4 u = __ldg(reinterpret_cast<const uint4*>(wrow) + vi);
      wv[0] = u.x;
      wv[1] = u.y;
      wv[2] = u.z;
      wv[3] = u.w;
    } else {
      wv[0] = __ldg(wrow + vi);
    }
#pragma unroll
    for (int t = 0; t < WV; ++t) {
      const int64_t k0 = (vi * WV + t) * kPer;
      const int64_t gi = o * groups + k0 / group;
      const float s = as_float(scales[gi]), b = as_float(biases[gi]);
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        const float w = s * static_cast<float>((wv[t] >> (j * BITS)) & kMask) + b;
#pragma unroll
        for (int n = 0; n < NR; ++n) acc[n] += static_cast<float>(x[n * x_stride + k0 + j]) * w;
      }
    }
  }
#pragma unroll
  for (int n = 0; n < NR; ++n) {
    const float v = warp_sum(acc[n]);
    if (lane == 0) out[n * O + o] = to<T>(v);
  }
}

template <typename F>
void dispatch_scale(at::ScalarType st, F&& f) {
  if (st == at::kFloat) f(float{});
  else if (st == at::kBFloat16) f(at::BFloat16{});
  else f(at::Half{});
}

unsigned blocks_for(int64_t n, int threads) { return static_cast<unsigned>((n + threads - 1) / threads); }

template <typename S, typename O>
void launch_dequantize(const at::Tensor& wq, const at::Tensor& scales, const at::Tensor& biases, int64_t bits,
                       int64_t group, const at::Tensor& out, cudaStream_t stream) {
  const int64_t words = wq.numel(), K = out.size(1);
  if (words == 0) return;
  const auto* w = static_cast<const uint32_t*>(wq.data_ptr());
  const S* s = static_cast<const S*>(scales.data_ptr());
  const S* b = static_cast<const S*>(biases.data_ptr());
  O* o = static_cast<O*>(out.data_ptr());
  if (bits == 4)
    dequantize_kernel<S, O, 4><<<blocks_for(words, kThreads), kThreads, 0, stream>>>(w, s, b, words, K, group, o);
  else
    dequantize_kernel<S, O, 8><<<blocks_for(words, kThreads), kThreads, 0, stream>>>(w, s, b, words, K, group, o);
  check_launch("dequantize_kernel");
}

template <typename T, typename S, int BITS, int NR>
void launch_gemv_rows(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales, const at::Tensor& biases,
                      int64_t group, const at::Tensor& out, cudaStream_t stream) {
  const int64_t O = wq.size(0), K = x.size(1);
  constexpr int kWarps = kThreads / 32;
  const auto* w = static_cast<const uint32_t*>(wq.data_ptr());
  const S* s = static_cast<const S*>(scales.data_ptr());
  const S* b = static_cast<const S*>(biases.data_ptr());
  if (wq.size(1) % 4 == 0 && aligned16(w))
    gemv_kernel<T, S, BITS, NR, 4><<<blocks_for(O, kWarps), kThreads, 0, stream>>>(
        x.data_ptr<T>(), x.stride(0), w, s, b, O, K, static_cast<int>(group), out.data_ptr<T>());
  else
    gemv_kernel<T, S, BITS, NR, 1><<<blocks_for(O, kWarps), kThreads, 0, stream>>>(
        x.data_ptr<T>(), x.stride(0), w, s, b, O, K, static_cast<int>(group), out.data_ptr<T>());
  check_launch("gemv_kernel");
}

template <typename T, typename S, int BITS>
void launch_gemv(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales, const at::Tensor& biases,
                 int64_t group, const at::Tensor& out, cudaStream_t stream) {
  switch (x.size(0)) {
    case 1: return launch_gemv_rows<T, S, BITS, 1>(x, wq, scales, biases, group, out, stream);
    case 2: return launch_gemv_rows<T, S, BITS, 2>(x, wq, scales, biases, group, out, stream);
    case 3: return launch_gemv_rows<T, S, BITS, 3>(x, wq, scales, biases, group, out, stream);
    case 4: return launch_gemv_rows<T, S, BITS, 4>(x, wq, scales, biases, group, out, stream);
    case 5: return launch_gemv_rows<T, S, BITS, 5>(x, wq, scales, biases, group, out, stream);
    case 6: return launch_gemv_rows<T, S, BITS, 6>(x, wq, scales, biases, group, out, stream);
    case 7: return launch_gemv_rows<T, S, BITS, 7>(x, wq, scales, biases, group, out, stream);
    default: return launch_gemv_rows<T, S, BITS, 8>(x, wq, scales, biases, group, out, stream);
  }
}

}  // namespace

void quantize_affine_cuda(const at::Tensor& w, int64_t bits, int64_t group_size, const at::Tensor& wq,
                          const at::Tensor& scales, const at::Tensor& biases) {
  const int64_t rows = w.size(0), K = w.size(1), n = rows * (K / group_size);
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(w.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_scale(scales.scalar_type(), [&](auto s_tag) {
    using S = decltype(s_tag);
    dispatch_scale(w.scalar_type(), [&](auto w_tag) {
      using T = decltype(w_tag);
      quantize_kernel<T, S><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(
          static_cast<const T*>(w.data_ptr()), rows, K, static_cast<int>(bits), static_cast<int>(group_size),
          static_cast<uint32_t*>(wq.data_ptr()), static_cast<S*>(scales.data_ptr()), static_cast<S*>(biases.data_ptr()));
    });
  });
  check_launch("quantize_kernel");
}

void dequantize_affine_cuda(const at::Tensor& wq, const at::Tensor& scales, const at::Tensor& biases, int64_t bits,
                            int64_t group_size, const at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(wq.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_scale(scales.scalar_type(), [&](auto s_tag) {
    using S = decltype(s_tag);
    dispatch_scale(out.scalar_type(), [&](auto o_tag) {
      launch_dequantize<S, decltype(o_tag)>(wq, scales, biases, bits, group_size, out, stream);
    });
  });
}

void quant_linear_cuda(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales, const at::Tensor& biases,
                       int64_t bits, int64_t group_size, const at::Tensor& out) {
  const int64_t N = x.size(0);
  if (N == 0 || wq.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (N > kMaxGemvRows) {
    // Many rows: one dequantized copy of W in x's dtype, then the tensor cores through cuBLAS.
    at::Tensor w = at::empty({wq.size(0), x.size(1)}, x.options());
    dequantize_affine_cuda(wq, scales, biases, bits, group_size, w);
    at::mm_out(const_cast<at::Tensor&>(out), x, w.t());
    return;
  }
  dispatch_scale(scales.scalar_type(), [&](auto s_tag) {
    using S = decltype(s_tag);
    if (x.scalar_type() == at::kFloat) {
      if (bits == 4) launch_gemv<float, S, 4>(x, wq, scales, biases, group_size, out, stream);
      else launch_gemv<float, S, 8>(x, wq, scales, biases, group_size, out, stream);
    } else {
      if (bits == 4) launch_gemv<at::BFloat16, S, 4>(x, wq, scales, biases, group_size, out, stream);
      else launch_gemv<at::BFloat16, S, 8>(x, wq, scales, biases, group_size, out, stream);
    }
  });
}

}  // namespace rlaif::kernels
