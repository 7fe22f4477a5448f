// MLX affine quantization on the GPU: quantize (live re-quantization of trainer weights), dequantize, and
// x · dequant(W)ᵀ — a GEMV kernel for ≤ 8 rows that streams the packed words once (16-byte loads, several in
// flight, nibbles turned into floats by byte permutes) with float32 sums, and for more rows a dequantized scratch
// matrix in x's dtype multiplied by cuBLAS (at::mm). Quantize and dequantize use round-to-nearest float32 ops
// without contraction (__f*_rn), so they equal the CPU reference bit for bit.
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

// docs/FORMATS.md's scale/bias rule for a group with minimum w_min and maximum w_max (w_max starts at 0, as in
// MLX's GPU kernels), in round-to-nearest float32 ops so both quantize kernels equal the CPU reference.
__device__ __forceinline__ void affine_params(float w_min, float w_max, float n_bins, float& scale, float& bias) {
  scale = fmaxf(__fdiv_rn(__fsub_rn(w_max, w_min), n_bins), 1e-7f);
  const bool side = fabsf(w_min) > fabsf(w_max);
  scale = side ? scale : -scale;
  const float edge = side ? w_min : w_max;
  const float q0 = roundf(__fdiv_rn(edge, scale));
  const bool at_zero = q0 == 0.0f;
  scale = at_zero ? scale : __fdiv_rn(edge, q0);
  bias = at_zero ? 0.0f : edge;
}

// One value's level: round((v − bias) / scale) clamped to [0, n_bins].
__device__ __forceinline__ uint32_t quantize_value(float v, float scale, float bias, float n_bins) {
  return static_cast<uint32_t>(fminf(fmaxf(roundf(__fdiv_rn(__fsub_rn(v, bias), scale)), 0.0f), n_bins));
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
  float scale, bias;
  affine_params(w_min, w_max, n_bins, scale, bias);
  scales[id] = static_cast<S>(scale);
  biases[id] = static_cast<S>(bias);
  const int per_word = 32 / bits;
  uint32_t* dst = wq + (row * K + g * group) / per_word;
  for (int i = 0; i < group; i += per_word) {
    uint32_t word = 0;
    for (int j = 0; j < per_word; ++j) {
      word |= quantize_value(static_cast<float>(src[i + j]), scale, bias, n_bins) << (j * bits);
    }
    dst[i / per_word] = word;
  }
}

// The same rule with L = group / 8 consecutive lanes per group, each holding 8 consecutive elements (16-byte
// loads of 2-byte weights, two for float32): min/max by shuffles inside the L lanes, then each lane packs its
// own 8 values (one 4-bit word or two 8-bit words), so loads and stores are coalesced across the warp.
template <typename T, typename S, int BITS>
__global__ void quantize_vec_kernel(const T* __restrict__ w, int64_t total_groups, int group,
                                    uint32_t* __restrict__ wq, S* __restrict__ scales, S* __restrict__ biases) {
  const int L = group / 8;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t gid = tid / L;
  const int sub = static_cast<int>(tid % L);
  const bool active = gid < total_groups;  // inactive lanes still join the shuffles
  const int64_t e0 = gid * group + sub * 8;  // first of this lane's elements (rows are whole groups)
  float v[8];
  if (active) {
    const Vec<T, 8> raw = load_vec<T, 8>(w + e0);
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = static_cast<float>(raw.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = 0.0f;
  }
  float w_min = 3.402823466e38f, w_max = 0.0f;  // MLX's GPU kernels start w_max at 0
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    w_min = fminf(w_min, v[j]);
    w_max = fmaxf(w_max, v[j]);
  }
  for (int off = L / 2; off > 0; off >>= 1) {
    w_min = fminf(w_min, __shfl_xor_sync(0xffffffffu, w_min, off));
    w_max = fmaxf(w_max, __shfl_xor_sync(0xffffffffu, w_max, off));
  }
  if (!active) return;
  const float n_bins = static_cast<float>((1 << BITS) - 1);
  float scale, bias;
  affine_params(w_min, w_max, n_bins, scale, bias);
  if (sub == 0) {
    scales[gid] = static_cast<S>(scale);
    biases[gid] = static_cast<S>(bias);
  }
  uint32_t q[8];
#pragma unroll
  for (int j = 0; j < 8; ++j)
    q[j] = quantize_value(v[j], scale, bias, n_bins);
  if constexpr (BITS == 4) {
    uint32_t word = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) word |= q[j] << (4 * j);
    wq[e0 / 8] = word;
  } else {
    uint2 words = make_uint2(q[0] | q[1] << 8 | q[2] << 16 | q[3] << 24, q[4] | q[5] << 8 | q[6] << 16 | q[7] << 24);
    *reinterpret_cast<uint2*>(wq + e0 / 4) = words;
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

// The 32/BITS values of one packed word as exact floats: each 4- or 8-bit value is moved by a byte permute into
// the low mantissa bits of 2^23 (0x4B000000), and 2^23 is subtracted.
template <int BITS>
__device__ __forceinline__ void unpack_word(uint32_t w, float (&q)[32 / BITS]) {
  if constexpr (BITS == 4) {
    const uint32_t lo = w & 0x0F0F0F0Fu, hi = (w >> 4) & 0x0F0F0F0Fu;  // bytes: values 0,2,4,6 and 1,3,5,7
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      q[2 * i] = __uint_as_float(__byte_perm(lo, 0x4B000000u, 0x7540 + i)) - 8388608.0f;
      q[2 * i + 1] = __uint_as_float(__byte_perm(hi, 0x4B000000u, 0x7540 + i)) - 8388608.0f;
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) q[i] = __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7540 + i)) - 8388608.0f;
  }
}

// A warp per output row o; each lane takes 16-byte chunks of the row's words (128/BITS values, inside one group;
// 2^cpg_shift chunks per group),
// U chunks' loads in flight (streaming: weights are read once per step), with their scales and biases. Values are
// dequantized in registers (scale·q + bias) and dotted with the NR rows of x (vector loads, L1/L2-resident).
template <typename T, typename S, int BITS, int NR, int U>
__global__ void __launch_bounds__(kThreads) gemv_chunk_kernel(const T* __restrict__ x, int64_t x_stride,
                                                              const uint4* __restrict__ wq, const S* __restrict__ scales,
                                                              const S* __restrict__ biases, int64_t O, int64_t chunks,
                                                              int cpg_shift, T* __restrict__ out) {
  constexpr int kPer = 32 / BITS;     // values per word
  constexpr int kVals = 4 * kPer;     // values per chunk
  const int lane = threadIdx.x % 32;
  const int64_t o = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  if (o >= O) return;  // warp-uniform
  const uint4* wrow = wq + o * chunks;
  const int64_t groups = chunks >> cpg_shift;  // 2^cpg_shift chunks per group
  const S* srow = scales + o * groups;
  const S* brow = biases + o * groups;
  float acc[NR];
#pragma unroll
  for (int n = 0; n < NR; ++n) acc[n] = 0.0f;
  auto process = [&](const uint4& wv, float s, float b, int64_t c) {
    const uint32_t words[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      float wf[kPer];
      unpack_word<BITS>(words[t], wf);
#pragma unroll
      for (int j = 0; j < kPer; ++j) wf[j] = fmaf(s, wf[j], b);
      const int64_t k0 = c * kVals + t * kPer;
#pragma unroll
      for (int n = 0; n < NR; ++n) {
        const Vec<T, kPer> xv = load_vec<T, kPer>(x + n * x_stride + k0);
#pragma unroll
        for (int j = 0; j < kPer; ++j) acc[n] = fmaf(static_cast<float>(xv.v[j]), wf[j], acc[n]);
      }
    }
  };
  int64_t c = lane;
  for (; c + (U - 1) * 32 < chunks; c += U * 32) {
    uint4 wv[U];
    float s[U], b[U];
#pragma unroll
    for (int u = 0; u < U; ++u) wv[u] = __ldcs(wrow + c + u * 32);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t gi = (c + u * 32) >> cpg_shift;
      s[u] = as_float(srow[gi]);
      b[u] = as_float(brow[gi]);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) process(wv[u], s[u], b[u], c + u * 32);
  }
  for (; c < chunks; c += 32) {
    const int64_t gi = c >> cpg_shift;
    process(__ldcs(wrow + c), as_float(srow[gi]), as_float(brow[gi]), c);
  }
#pragma unroll
  for (int n = 0; n < NR; ++n) acc[n] = warp_sum(acc[n]);
#pragma unroll
  for (int n = 0; n < NR; ++n)
    if (lane == n) out[n * O + o] = to<T>(acc[n]);
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
  // The chunk kernel: whole 16-byte chunks per row, each inside one group, and x rows aligned for its loads.
  constexpr int kPer = 32 / BITS, kVals = 4 * kPer;
  const bool x_fits = reinterpret_cast<uintptr_t>(x.data_ptr()) % (sizeof(T) * kPer) == 0 && x.stride(0) % kPer == 0;
  const int64_t cpg = group / kVals;  // chunks per group: a power of two for MLX's group sizes
  if (wq.size(1) % 4 == 0 && aligned16(w) && group % kVals == 0 && (cpg & (cpg - 1)) == 0 && x_fits) {
    int shift = 0;
    while ((int64_t{1} << shift) < cpg) ++shift;
    gemv_chunk_kernel<T, S, BITS, NR, 4><<<blocks_for(O, kWarps), kThreads, 0, stream>>>(
        x.data_ptr<T>(), x.stride(0), reinterpret_cast<const uint4*>(w), s, b, O, wq.size(1) / 4, shift,
        out.data_ptr<T>());
  } else if (wq.size(1) % 4 == 0 && aligned16(w))
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
      const T* src = static_cast<const T*>(w.data_ptr());
      auto* dst = static_cast<uint32_t*>(wq.data_ptr());
      S* sc = static_cast<S*>(scales.data_ptr());
      S* bi = static_cast<S*>(biases.data_ptr());
      const int64_t lanes = group_size / 8;  // per group in the vector kernel
      if (group_size % 8 == 0 && lanes <= 32 && 32 % lanes == 0 && w.is_contiguous() &&
          reinterpret_cast<uintptr_t>(src) % (8 * sizeof(T)) == 0) {
        const unsigned blocks = blocks_for(n * lanes, kThreads);
        if (bits == 4)
          quantize_vec_kernel<T, S, 4><<<blocks, kThreads, 0, stream>>>(src, n, static_cast<int>(group_size), dst, sc, bi);
        else
          quantize_vec_kernel<T, S, 8><<<blocks, kThreads, 0, stream>>>(src, n, static_cast<int>(group_size), dst, sc, bi);
      } else {
        quantize_kernel<T, S><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(
            src, rows, K, static_cast<int>(bits), static_cast<int>(group_size), dst, sc, bi);
      }
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
