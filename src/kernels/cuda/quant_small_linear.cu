// Few-row projections with MLX affine-quantized weights: one warp per output row (a SwiGLU warp takes the gate and
// the up row), lanes over the row's 16-byte chunks of packed words (32 values at 4 bits, 16 at 8; a chunk lies in
// one group), four chunks a lane in flight (two from 4 rows on), the warp's row and its next one prefetched to L2
// ahead (the first before the staging). Every block first stages the N ≤ 8 input rows in shared memory as
// float32 — normalised by the fused RMSNorm when there is one — together with each chunk's sum of x, so a chunk
// costs Σ x·q per row plus one s·Σx·q + b·Σx: the dequantization's scale and bias leave the inner loop. x is laid
// out chunk-interleaved ([row][float4 of the chunk][chunk]), so the 32 lanes' reads of their chunks' x are
// consecutive 16-byte words (no bank conflicts).
#include "kernels/cuda/quant_small_linear.h"

#include <algorithm>

#include "kernels/cuda/common.cuh"

namespace rlaif::kernels {

namespace {

using namespace cuda_detail;

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;

template <typename T, typename S>
struct QSegment {
  const uint4* w = nullptr;  // [rows, chunks]
  const S* scales = nullptr;
  const S* biases = nullptr;
  const T* bias = nullptr;  // the projection's own bias (undefined: none)
  T* out = nullptr;
  int64_t rows = 0;
};

template <typename T, typename S>
struct QSegments {
  QSegment<T, S> s[3];
  int count = 0;
};

// Shared-memory layout of the staged rows: x as float4s at [(n · F4 + f) · C + c] for chunk c < C and float4 f <
// F4 of the chunk (F4 = values per chunk / 4), then the chunk sums at [n · C + c].
struct Stage {
  float4* x;
  float* sums;
  int64_t C;
};

// Stages the rows of x [rows, K] (rms_norm(x) with norm_w; block 0 also writes those rows to `normed`) as the
// first `rows` of N (the rest zeros: the kernels run N = 1, 2, 4 or 8 and never write the padding rows). All
// threads take 16-byte vectors of x (VEC values); the IPC = VPC / VEC consecutive lanes holding one chunk add their
// sums by shuffles. Every thread calls it; it ends with a barrier.
template <typename T, int N, int VPC>
__device__ __forceinline__ Stage stage_rows(const T* __restrict__ x, int rows, int64_t K,
                                            const T* __restrict__ norm_w, float eps, T* normed) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  constexpr int kF4 = VPC / 4, kVec = 16 / sizeof(T), kIpc = VPC / kVec;
  static_assert(kIpc >= 1 && 32 % kIpc == 0 && kVec % 4 == 0, "a chunk is whole vectors of x within one warp");
  const int64_t C = K / VPC, KV = K / kVec;
  Stage st{reinterpret_cast<float4*>(smem_raw), nullptr, C};
  st.sums = reinterpret_cast<float*>(st.x + N * kF4 * C);
  __shared__ float scale[N];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (norm_w != nullptr) {
    // Row n's sum of squares by the warps n·kWpr .. (RMSNorm's float32 sum; kernels/cpu/rms_norm.h).
    __shared__ float part[kWarps];
    constexpr int kWpr = kWarps / N > 0 ? kWarps / N : 1;
    const int n = warp / kWpr;
    float ss = 0.0f;
    if (n < rows)
      for (int64_t v = (warp % kWpr) * 32 + lane; v < KV; v += kWpr * 32) {
        const Vec<T, kVec> xv = load_vec<T, kVec>(x + n * K + v * kVec);
#pragma unroll
        for (int e = 0; e < kVec; ++e) ss += static_cast<float>(xv.v[e]) * static_cast<float>(xv.v[e]);
      }
    ss = warp_sum(ss);
    if (lane == 0) part[warp] = ss;
    __syncthreads();
    if (threadIdx.x < N) {
      float total = 0.0f;
      for (int j = 0; j < kWpr; ++j) total += part[threadIdx.x * kWpr + j];
      scale[threadIdx.x] = rms_scale(total, 1.0f / static_cast<float>(K), eps);
    }
    __syncthreads();
  }
  // Item (row n, vector v): its values converted (normalised) into their chunk's float4s; the chunk's lanes sum.
  const int64_t total = N * KV;
  for (int64_t i0 = 0; i0 < total; i0 += kThreads) {  // same trip count in every lane: the shuffles see all 32
    const int64_t item = i0 + threadIdx.x;
    const int n = static_cast<int>(item / KV);
    const int64_t k0 = (item % KV) * kVec, c = k0 / VPC;
    float sum = 0.0f;
    if (item < total) {
      float v[kVec];
      if (n < rows) {
        Vec<T, kVec> xv = load_vec<T, kVec>(x + n * K + k0);
        if (norm_w != nullptr) {
          const Vec<T, kVec> wv = load_vec<T, kVec>(norm_w + k0);
#pragma unroll
          for (int e = 0; e < kVec; ++e) xv.v[e] = rms_apply(xv.v[e], wv.v[e], scale[n]);
          if (normed != nullptr && blockIdx.x == 0) store_vec<T, kVec>(normed + n * K + k0, xv);
        }
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          v[e] = static_cast<float>(xv.v[e]);
          sum += v[e];
        }
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) v[e] = 0.0f;
      }
      const int f0 = static_cast<int>(k0 % VPC) / 4;
#pragma unroll
      for (int f = 0; f < kVec / 4; ++f)
        st.x[(n * kF4 + f0 + f) * C + c] = make_float4(v[4 * f], v[4 * f + 1], v[4 * f + 2], v[4 * f + 3]);
    }
#pragma unroll
    for (int off = 1; off < kIpc; off <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (item < total && lane % kIpc == 0) st.sums[n * C + c] = sum;
  }
  __syncthreads();
  return st;
}

// Sends a weight row (`bytes` of packed words) and its scales and biases towards L2 (one prefetch per 128-byte
// line, spread over the lanes): issued before the staging or the previous row's arithmetic, so the row's loads
// then wait on L2, not on memory.
__device__ __forceinline__ void prefetch_row(const void* w, int64_t bytes, const void* sb0, const void* sb1,
                                             int64_t sb_bytes) {
  const char* p = static_cast<const char*>(w);
  for (int64_t off = (threadIdx.x % 32) * 128; off < bytes; off += 32 * 128)
    asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p + off));
  if (threadIdx.x % 32 == 0) {
    for (int64_t off = 0; off < sb_bytes; off += 128) {
      asm volatile("prefetch.global.L2 [%0];\n" ::"l"(static_cast<const char*>(sb0) + off));
      asm volatile("prefetch.global.L2 [%0];\n" ::"l"(static_cast<const char*>(sb1) + off));
    }
  }
}

// acc[n] += Σ over row `w`'s chunks of s·Σ x·q + b·Σ x (this lane's chunks lane, lane + 32, ...), not warp-summed.
template <typename S, int BITS, int N>
__device__ __forceinline__ void dot_row(const Stage& st, const uint4* __restrict__ w, const S* __restrict__ scales,
                                        const S* __restrict__ biases, int cpg_shift, float (&acc)[N]) {
  constexpr int kPer = 32 / BITS, kF4 = 128 / BITS / 4;
  constexpr int kUnroll = N >= 4 ? 2 : 4;  // chunks a lane has in flight (more rows: more work per chunk)
  const int64_t C = st.C;
  for (int64_t c0 = threadIdx.x % 32; c0 < C; c0 += kUnroll * 32) {
    uint4 wv[kUnroll];
    float s[kUnroll], b[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t c = c0 + u * 32;
      if (c < C) wv[u] = __ldcs(w + c);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t c = c0 + u * 32;
      if (c < C) {
        s[u] = static_cast<float>(scales[c >> cpg_shift]);
        b[u] = static_cast<float>(biases[c >> cpg_shift]);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t c = c0 + u * 32;
      if (c >= C) break;
      const uint32_t words[4] = {wv[u].x, wv[u].y, wv[u].z, wv[u].w};
      float dq[N];
#pragma unroll
      for (int n = 0; n < N; ++n) dq[n] = 0.0f;
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        float q[kPer];
        unpack_word<BITS>(words[t], q);
#pragma unroll
        for (int f = 0; f < kPer / 4; ++f) {
#pragma unroll
          for (int n = 0; n < N; ++n) {
            const float4 xv = st.x[(n * kF4 + t * (kPer / 4) + f) * C + c];
            dq[n] = fmaf(xv.x, q[4 * f], dq[n]);
            dq[n] = fmaf(xv.y, q[4 * f + 1], dq[n]);
            dq[n] = fmaf(xv.z, q[4 * f + 2], dq[n]);
            dq[n] = fmaf(xv.w, q[4 * f + 3], dq[n]);
          }
        }
      }
#pragma unroll
      for (int n = 0; n < N; ++n) acc[n] = fmaf(s[u], dq[n], fmaf(b[u], st.sums[n * C + c], acc[n]));
    }
  }
}

// kThreads threads a block; warp w of block b takes output rows b·kWarps + w, then every gridDim.x·kWarps-th row
// after it, over the segments in order (a grid capped near one wave, so a long head stages its input once per
// block, not once per 8 rows).
template <typename T, typename S, int BITS, int N>
__global__ void __launch_bounds__(kThreads)
    quant_small_linear_kernel(const T* __restrict__ x, int rows, int64_t K, QSegments<T, S> segs,
                              const T* residual, const T* norm_w, float eps, T* normed, int cpg_shift) {
  const int64_t C = K * BITS / 128, groups = C >> cpg_shift, stride = static_cast<int64_t>(gridDim.x) * kWarps;
  // Row r (counted over all segments) → its segment and row within it; si == count past the last.
  auto locate = [&](int64_t r, int& si) {
    si = 0;
    while (si < segs.count && r >= segs.s[si].rows) r -= segs.s[si++].rows;
    return r;
  };
  auto prefetch = [&](int64_t r) {
    int si;
    r = locate(r, si);
    if (si < segs.count)
      prefetch_row(segs.s[si].w + r * C, C * 16, segs.s[si].scales + r * groups, segs.s[si].biases + r * groups,
                   groups * static_cast<int64_t>(sizeof(S)));
  };
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  prefetch(first);
  const Stage st = stage_rows<T, N, 128 / BITS>(x, rows, K, norm_w, eps, normed);
  const int lane = threadIdx.x % 32;
  for (int64_t r = first;; r += stride) {
    int si;
    const int64_t row = locate(r, si);
    if (si == segs.count) return;  // warp-uniform
    prefetch(r + stride);
    const QSegment<T, S>& seg = segs.s[si];
    float acc[N];
#pragma unroll
    for (int n = 0; n < N; ++n) acc[n] = 0.0f;
    dot_row<S, BITS, N>(st, seg.w + row * st.C, seg.scales + row * groups, seg.biases + row * groups, cpg_shift,
                        acc);
#pragma unroll
    for (int n = 0; n < N; ++n) acc[n] = warp_sum(acc[n]);
#pragma unroll
    for (int n = 0; n < N; ++n) {
      if (lane != n || n >= rows) continue;
      const int64_t at = n * seg.rows + row;
      T y = to<T>(acc[n]);
      if (seg.bias) y = to<T>(static_cast<float>(y) + static_cast<float>(seg.bias[row]));
      if (residual) y = to<T>(static_cast<float>(residual[at]) + static_cast<float>(y));
      seg.out[at] = y;
    }
  }
}

template <typename T, typename S, int BITS, int N>
__global__ void __launch_bounds__(kThreads)
    quant_small_linear_silu_mul_kernel(const T* __restrict__ x, int rows, int64_t K, QSegment<T, S> gate,
                                       QSegment<T, S> up, const T* norm_w, float eps, T* normed, int cpg_shift) {
  const int64_t F = gate.rows, C = K * BITS / 128, groups = C >> cpg_shift;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  auto prefetch = [&](int64_t r) {
    if (r >= F) return;
    const int64_t sb = groups * static_cast<int64_t>(sizeof(S));
    prefetch_row(gate.w + r * C, C * 16, gate.scales + r * groups, gate.biases + r * groups, sb);
    prefetch_row(up.w + r * C, C * 16, up.scales + r * groups, up.biases + r * groups, sb);
  };
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  prefetch(first);
  const Stage st = stage_rows<T, N, 128 / BITS>(x, rows, K, norm_w, eps, normed);
  const int lane = threadIdx.x % 32;
  for (int64_t row = first; row < F; row += stride) {
    prefetch(row + stride);
    float g[N], u[N];
#pragma unroll
    for (int n = 0; n < N; ++n) g[n] = u[n] = 0.0f;
    dot_row<S, BITS, N>(st, gate.w + row * st.C, gate.scales + row * groups, gate.biases + row * groups, cpg_shift,
                        g);
    dot_row<S, BITS, N>(st, up.w + row * st.C, up.scales + row * groups, up.biases + row * groups, cpg_shift, u);
#pragma unroll
    for (int n = 0; n < N; ++n) {
      g[n] = warp_sum(g[n]);
      u[n] = warp_sum(u[n]);
    }
#pragma unroll
    for (int n = 0; n < N; ++n) {
      if (lane != n || n >= rows) continue;
      const float gf = static_cast<float>(to<T>(g[n]));
      const T silu = to<T>(gf / (1.0f + expf(-gf)));  // kernels/cpu/silu_mul.h's two roundings
      gate.out[n * F + row] = to<T>(static_cast<float>(silu) * static_cast<float>(to<T>(u[n])));
    }
  }
}

// Blocks for `rows` output rows: one per kWarps rows, at most four per multiprocessor (about one wave).
unsigned grid_for(int64_t rows) {
  const int64_t cap = 4 * static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  return static_cast<unsigned>(std::max<int64_t>(1, std::min((rows + kWarps - 1) / kWarps, cap)));
}


template <typename T, typename S>
QSegment<T, S> segment(const QuantMatrix& w, const at::Tensor& bias, const at::Tensor& out) {
  QSegment<T, S> s;
  s.w = reinterpret_cast<const uint4*>(w.wq.data_ptr());
  s.scales = static_cast<const S*>(w.scales.data_ptr());
  s.biases = static_cast<const S*>(w.biases.data_ptr());
  s.bias = bias.defined() ? static_cast<const T*>(bias.data_ptr()) : nullptr;
  s.out = static_cast<T*>(out.data_ptr());
  s.rows = w.rows();
  return s;
}

// log2 of the chunks per group (a power of two: MLX's group sizes 32, 64, 128 over 128/bits-value chunks).
int chunk_group_shift(const QuantMatrix& w) {
  const int64_t cpg = w.group_size / (128 / w.bits);
  int shift = 0;
  while ((int64_t{1} << shift) < cpg) ++shift;
  return shift;
}

// Runs `f` with x's type T, the scale type S and the bits as compile-time values.
template <typename F>
void dispatch(at::ScalarType x_type, at::ScalarType scale_type, int64_t bits, F&& f) {
  auto with_t = [&](auto t_tag) {
    using T = decltype(t_tag);
    auto with_s = [&](auto s_tag) {
      using S = decltype(s_tag);
      if (bits == 4) f(T{}, S{}, std::integral_constant<int, 4>{});
      else f(T{}, S{}, std::integral_constant<int, 8>{});
    };
    if (scale_type == at::kFloat) with_s(float{});
    else if (scale_type == at::kBFloat16) with_s(at::BFloat16{});
    else with_s(at::Half{});
  };
  if (x_type == at::kFloat) with_t(float{});
  else with_t(at::BFloat16{});
}

// Runs the statement with `R`, the compile-time row count the kernel runs for N rows: 1, 2, 4 or 8 (the
// accumulators are registers; padding rows are zeros, never written).
#define RLAIF_QUANT_ROWS(N, ...)                                   \
  if ((N) <= 1) { constexpr int R = 1; __VA_ARGS__; }              \
  else if ((N) <= 2) { constexpr int R = 2; __VA_ARGS__; }         \
  else if ((N) <= 4) { constexpr int R = 4; __VA_ARGS__; }         \
  else { constexpr int R = 8; __VA_ARGS__; }

}  // namespace

void quant_small_linear_cuda(const at::Tensor& x, const std::vector<QuantMatrix>& weights,
                             const std::vector<at::Tensor>& biases, const at::Tensor& residual,
                             const std::vector<at::Tensor>& outs, const InputNorm& norm) {
  const int64_t N = x.size(0), K = x.size(1);
  if (N == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const QuantMatrix& w0 = weights[0];
  int64_t rows = 0;
  for (const QuantMatrix& w : weights) rows += w.rows();
  const unsigned grid = grid_for(rows);
  dispatch(x.scalar_type(), w0.scales.scalar_type(), w0.bits, [&](auto t_tag, auto s_tag, auto bits_tag) {
    using T = decltype(t_tag);
    using S = decltype(s_tag);
    constexpr int kBits = decltype(bits_tag)::value;
    QSegments<T, S> segs;
    for (size_t i = 0; i < weights.size(); ++i) segs.s[i] = segment<T, S>(weights[i], biases[i], outs[i]);
    segs.count = static_cast<int>(weights.size());
    const T* nw = norm.weight.defined() ? static_cast<const T*>(norm.weight.data_ptr()) : nullptr;
    T* normed = norm.normed.defined() ? static_cast<T*>(norm.normed.data_ptr()) : nullptr;
    const T* res = residual.defined() ? static_cast<const T*>(residual.data_ptr()) : nullptr;
    RLAIF_QUANT_ROWS(N, {
      auto kernel = quant_small_linear_kernel<T, S, kBits, R>;
      const size_t smem = static_cast<size_t>(quant_small_linear_stage_bytes(R, K, kBits));
      allow_dynamic_smem(kernel, smem, "quant_small_linear");
      kernel<<<grid, kThreads, smem, stream>>>(static_cast<const T*>(x.data_ptr()), static_cast<int>(N), K, segs, res, nw,
                                              static_cast<float>(norm.eps), normed, chunk_group_shift(w0));
    });
  });
  check_launch("quant_small_linear_kernel");
}

void quant_small_linear_silu_mul_cuda(const at::Tensor& x, const QuantMatrix& gate, const QuantMatrix& up,
                                      const at::Tensor& out, const InputNorm& norm) {
  const int64_t N = x.size(0), K = x.size(1);
  if (N == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const unsigned grid = grid_for(gate.rows());
  dispatch(x.scalar_type(), gate.scales.scalar_type(), gate.bits, [&](auto t_tag, auto s_tag, auto bits_tag) {
    using T = decltype(t_tag);
    using S = decltype(s_tag);
    constexpr int kBits = decltype(bits_tag)::value;
    const QSegment<T, S> g = segment<T, S>(gate, {}, out), u = segment<T, S>(up, {}, out);
    const T* nw = norm.weight.defined() ? static_cast<const T*>(norm.weight.data_ptr()) : nullptr;
    T* normed = norm.normed.defined() ? static_cast<T*>(norm.normed.data_ptr()) : nullptr;
    RLAIF_QUANT_ROWS(N, {
      auto kernel = quant_small_linear_silu_mul_kernel<T, S, kBits, R>;
      const size_t smem = static_cast<size_t>(quant_small_linear_stage_bytes(R, K, kBits));
      allow_dynamic_smem(kernel, smem, "quant_small_linear_silu_mul");
      kernel<<<grid, kThreads, smem, stream>>>(static_cast<const T*>(x.data_ptr()), static_cast<int>(N), K, g, u, nw,
                                              static_cast<float>(norm.eps), normed, chunk_group_shift(gate));
    });
  });
  check_launch("quant_small_linear_silu_mul_kernel");
}

}  // namespace rlaif::kernels
