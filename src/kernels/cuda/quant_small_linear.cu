// Few-row projections with MLX affine-quantized weights: a warp per task of M output rows (a SwiGLU task: P gate
// rows and their up rows), lanes over the rows' 16-byte chunks of packed words (32 values at 4 bits, 16 at 8; a
// chunk lies in one group). The task's rows' next chunks are all requested before any arithmetic (four a lane at
// batch 1: a 2048-input q4 row is only two chunks a lane), and the next task's rows are prefetched to L2 (the first
// before the staging). Every block first stages the N ≤ 8 input rows in shared memory as float32 — normalised by
// the fused RMSNorm when there is one — together with each chunk's sum of x, so a chunk costs Σ x·q per row plus
// one s·Σx·q + b·Σx: the dequantization's scale and bias leave the inner loop. x is laid out chunk-interleaved
// ([row][float4 of the chunk][chunk]), so the 32 lanes' reads of their chunks' x are consecutive 16-byte words (no
// bank conflicts), and each is read once for the task's M rows.
#include "kernels/cuda/quant_small_linear.h"

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

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

// scale[n] = rms_norm's 1 / rms of input row n < rows (RMSNorm's float32 sum of squares; kernels/cpu/rms_norm.h),
// by the block's warps n·kWarps/N ...; every thread calls it; it ends with a barrier.
template <typename T, int N>
__device__ __forceinline__ void norm_scales(const T* __restrict__ x, int rows, int64_t K, const T* __restrict__ norm_w,
                                            float eps, float* scale) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t KV = K / kVec;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
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
  if (norm_w != nullptr) norm_scales<T, N>(x, rows, K, norm_w, eps, scale);
  const int lane = threadIdx.x % 32;
  // Item (row n, vector v): its values converted (normalised) into their chunk's float4s; the chunk's lanes sum.
  const int64_t total = N * KV;
#pragma unroll 4  // several vectors of x requested at once (a 11008-input row is 5-6 trips a thread)
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
// line, spread over the lanes): issued before the staging or the previous task's arithmetic, so the row's loads
// then wait on L2, not on memory. Rolled loops: one trip a lane at 3B's row lengths.
__device__ __forceinline__ void prefetch_row(const void* w, int bytes, const void* sb0, const void* sb1,
                                             int sb_bytes) {
  const char* p = static_cast<const char*>(w);
  const int lane = threadIdx.x % 32;
#pragma unroll 1
  for (int off = lane * 128; off < bytes; off += 32 * 128) asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p + off));
#pragma unroll 1
  for (int off = lane * 128; off < sb_bytes; off += 32 * 128) {
    asm volatile("prefetch.global.L2 [%0];\n" ::"l"(static_cast<const char*>(sb0) + off));
    asm volatile("prefetch.global.L2 [%0];\n" ::"l"(static_cast<const char*>(sb1) + off));
  }
}

// A word's eight 4-bit values as f = 0.5 + q/32, exactly: each value, moved three bits up in its byte, becomes by a
// byte permute the top mantissa bits of 0.5 (0x3F000000). One instruction a value, against two for the exact q of
// unpack_word (permute, subtract 2^23); dot_rows takes Σ x·q = 32·Σ x·f − 16·Σ x. With q in the mantissa's top
// bits, the subtraction cancels about one bit, not seven.
__device__ __forceinline__ void unpack_q4_offset(uint32_t w, float (&f)[8]) {
  const uint32_t lo = (w & 0x0F0F0F0Fu) << 3, hi = (w >> 1) & 0x78787878u;  // bytes: values 0,2,4,6 and 1,3,5,7
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(__byte_perm(lo, 0x3F000000u, 0x7044 | (i << 8)));
    f[2 * i + 1] = __uint_as_float(__byte_perm(hi, 0x3F000000u, 0x7044 | (i << 8)));
  }
}

// acc[m][n] = Σ over row w[m]'s chunks of s·Σ x·q + b·Σ x, in every lane (each lane sums its chunks lane,
// lane + 32, ..., then the warp adds them). The M rows' next U chunks (and their scales and biases) are all
// requested before any arithmetic: at batch 1 a 2048-input q4 row is only two chunks a lane, so one row alone keeps
// too few bytes in flight. Each staged x float4 is read once for the M rows.
template <typename S, int BITS, int N, int M, int U>
__device__ __forceinline__ void dot_rows(const Stage& st, const uint4* const (&w)[M], const S* const (&scales)[M],
                                         const S* const (&biases)[M], int cpg_shift, float (&acc)[M][N]) {
  constexpr int kPer = 32 / BITS, kF4 = 128 / BITS / 4, kF4PerWord = kPer / 4;
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int n = 0; n < N; ++n) acc[m][n] = 0.0f;
  const int C = static_cast<int>(st.C);
  for (int c0 = threadIdx.x % 32; c0 < C; c0 += U * 32) {
    uint4 wv[U][M];
    float s[U][M], b[U][M];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + u * 32;
#pragma unroll
      for (int m = 0; m < M; ++m)
        if (c < C) wv[u][m] = __ldcs(w[m] + c);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + u * 32;
#pragma unroll
      for (int m = 0; m < M; ++m)
        if (c < C) {
          s[u][m] = static_cast<float>(scales[m][c >> cpg_shift]);
          b[u][m] = static_cast<float>(biases[m][c >> cpg_shift]);
        }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + u * 32;
      if (c >= C) break;
      float dq[M][N];
#pragma unroll
      for (int m = 0; m < M; ++m)
#pragma unroll
        for (int n = 0; n < N; ++n) dq[m][n] = 0.0f;
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        float4 xv[N][kF4PerWord];
#pragma unroll
        for (int n = 0; n < N; ++n)
#pragma unroll
          for (int f = 0; f < kF4PerWord; ++f) xv[n][f] = st.x[(n * kF4 + t * kF4PerWord + f) * C + c];
#pragma unroll
        for (int m = 0; m < M; ++m) {
          const uint32_t word = t == 0 ? wv[u][m].x : t == 1 ? wv[u][m].y : t == 2 ? wv[u][m].z : wv[u][m].w;
          float q[kPer];
          if constexpr (BITS == 4) unpack_q4_offset(word, q);
          else unpack_word<BITS>(word, q);
#pragma unroll
          for (int f = 0; f < kF4PerWord; ++f)
#pragma unroll
            for (int n = 0; n < N; ++n) {
              dq[m][n] = fmaf(xv[n][f].x, q[4 * f], dq[m][n]);
              dq[m][n] = fmaf(xv[n][f].y, q[4 * f + 1], dq[m][n]);
              dq[m][n] = fmaf(xv[n][f].z, q[4 * f + 2], dq[m][n]);
              dq[m][n] = fmaf(xv[n][f].w, q[4 * f + 3], dq[m][n]);
            }
        }
      }
#pragma unroll
      for (int n = 0; n < N; ++n) {
        const float xs = st.sums[n * C + c];
#pragma unroll
        for (int m = 0; m < M; ++m) {
          const float xq = BITS == 4 ? fmaf(32.0f, dq[m][n], -16.0f * xs) : dq[m][n];
          acc[m][n] = fmaf(s[u][m], xq, fmaf(b[u][m], xs, acc[m][n]));
        }
      }
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int n = 0; n < N; ++n) acc[m][n] = warp_sum(acc[m][n]);
}

// Chunks a lane has in flight per row (U of dot_rows): four 16-byte chunks a lane over the M rows at one or two
// input rows (24 warps a multiprocessor then keep about 48 KB in flight); six for a lone row at one input row (the
// down projection: 2048 rows of 344 chunks leave 16 warps a multiprocessor; eight spill); two beyond (more
// registers and arithmetic per chunk).
template <int N, int M>
constexpr int kChunksInFlight = N == 1 && M == 1 ? 6 : (N <= 2 ? 4 : 2) / M > 0 ? (N <= 2 ? 4 : 2) / M : 1;

// Both kernels' prologue: the warp's first task's rows towards L2; under a programmatic launch, the wait for the
// previous kernel (the weights do not depend on it; x, the norm's input and the residual do); then the staging.
template <typename T, int N, int BITS, typename Prefetch>
__device__ __forceinline__ Stage begin_tasks(Prefetch& prefetch, int64_t first, int64_t tasks, bool pdl,
                                             const T* __restrict__ x, int rows, int64_t K, const T* norm_w, float eps,
                                             T* normed) {
  if (first < tasks) prefetch(first);
  pdl_begin(pdl);
  return stage_rows<T, N, 128 / BITS>(x, rows, K, norm_w, eps, normed);
}

// Blocks a multiprocessor holds at once at N input rows: three at one (at most 85 registers: 24 warps, each with
// its M·U chunks in flight), two at two, else as the registers allow.
template <int N>
constexpr int kMinBlocks = N == 1 ? 3 : N == 2 ? 2 : 1;

// kThreads threads a block; warp w of block b takes task b·kWarps + w, then every gridDim.x·kWarps-th task after
// it; task t is the M output rows t·M … t·M + M − 1, counted over the segments in order (a grid capped near one
// wave, so a long head stages its input once per block, not once per 8 tasks).
template <typename T, typename S, int BITS, int N, int M>
__global__ void __launch_bounds__(kThreads, kMinBlocks<N>)
    quant_small_linear_kernel(const T* __restrict__ x, int rows, int64_t K, QSegments<T, S> segs,
                              const T* residual, const T* norm_w, float eps, T* normed, int cpg_shift, bool pdl) {
  const int64_t C = K * BITS / 128, groups = C >> cpg_shift, stride = static_cast<int64_t>(gridDim.x) * kWarps;
  int64_t total = 0;
  for (int i = 0; i < segs.count; ++i) total += segs.s[i].rows;
  const int64_t tasks = (total + M - 1) / M;
  // Row r (counted over all segments) → its segment and row within it; si == count past the last.
  auto locate = [&](int64_t r, int& si) {
    si = 0;
    while (si < segs.count && r >= segs.s[si].rows) r -= segs.s[si++].rows;
    return r;
  };
  auto prefetch = [&](int64_t t) {
#pragma unroll
    for (int m = 0; m < M; ++m) {
      int si;
      const int64_t r = locate(t * M + m, si);
      if (si < segs.count)
        prefetch_row(segs.s[si].w + r * C, static_cast<int>(C * 16), segs.s[si].scales + r * groups,
                     segs.s[si].biases + r * groups, static_cast<int>(groups * sizeof(S)));
    }
  };
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const Stage st = begin_tasks<T, N, BITS>(prefetch, first, tasks, pdl, x, rows, K, norm_w, eps, normed);
  const int lane = threadIdx.x % 32;
  for (int64_t t = first; t < tasks; t += stride) {  // warp-uniform
    if (t + stride < tasks) prefetch(t + stride);
    int si[M];
    int64_t row[M];
    const uint4* w[M];
    const S* sc[M];
    const S* bi[M];
#pragma unroll
    for (int m = 0; m < M; ++m) {
      row[m] = locate(t * M + m, si[m]);
      // A row past the last (the last task's tail) reads segment 0's row 0 again and writes nothing.
      const QSegment<T, S>& seg = segs.s[si[m] < segs.count ? si[m] : 0];
      const int64_t r = si[m] < segs.count ? row[m] : 0;
      w[m] = seg.w + r * C;
      sc[m] = seg.scales + r * groups;
      bi[m] = seg.biases + r * groups;
    }
    float acc[M][N];
    dot_rows<S, BITS, N, M, kChunksInFlight<N, M>>(st, w, sc, bi, cpg_shift, acc);
#pragma unroll
    for (int m = 0; m < M; ++m) {
#pragma unroll
      for (int n = 0; n < N; ++n) {
        if (lane != (m * N + n) % 32 || n >= rows || si[m] >= segs.count) continue;
        const QSegment<T, S>& seg = segs.s[si[m]];
        const int64_t at = n * seg.rows + row[m];
        T y = to<T>(acc[m][n]);
        if (seg.bias) y = to<T>(static_cast<float>(y) + static_cast<float>(seg.bias[row[m]]));
        if (residual) y = to<T>(static_cast<float>(residual[at]) + static_cast<float>(y));
        seg.out[at] = y;
      }
    }
  }
}

// As quant_small_linear_kernel with gate and up: task t is the P output rows t·P … t·P + P − 1 of both, their
// 2P weight rows read together.
template <typename T, typename S, int BITS, int N, int P>
__global__ void __launch_bounds__(kThreads, kMinBlocks<N>)
    quant_small_linear_silu_mul_kernel(const T* __restrict__ x, int rows, int64_t K, QSegment<T, S> gate,
                                       QSegment<T, S> up, const T* norm_w, float eps, T* normed, int cpg_shift,
                                       bool pdl) {
  constexpr int M = 2 * P;
  const int64_t F = gate.rows, C = K * BITS / 128, groups = C >> cpg_shift;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps, tasks = (F + P - 1) / P;
  auto prefetch = [&](int64_t t) {
    const int sb = static_cast<int>(groups * sizeof(S)), bytes = static_cast<int>(C * 16);
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int64_t r = t * P + p;
      if (r >= F) break;
      prefetch_row(gate.w + r * C, bytes, gate.scales + r * groups, gate.biases + r * groups, sb);
      prefetch_row(up.w + r * C, bytes, up.scales + r * groups, up.biases + r * groups, sb);
    }
  };
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const Stage st = begin_tasks<T, N, BITS>(prefetch, first, tasks, pdl, x, rows, K, norm_w, eps, normed);
  const int lane = threadIdx.x % 32;
  for (int64_t t = first; t < tasks; t += stride) {  // warp-uniform
    if (t + stride < tasks) prefetch(t + stride);
    const uint4* w[M];
    const S* sc[M];
    const S* bi[M];
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int64_t r = t * P + p < F ? t * P + p : 0;  // past the last: row 0 again, not written
      w[2 * p] = gate.w + r * C;
      sc[2 * p] = gate.scales + r * groups;
      bi[2 * p] = gate.biases + r * groups;
      w[2 * p + 1] = up.w + r * C;
      sc[2 * p + 1] = up.scales + r * groups;
      bi[2 * p + 1] = up.biases + r * groups;
    }
    float acc[M][N];
    dot_rows<S, BITS, N, M, kChunksInFlight<N, M>>(st, w, sc, bi, cpg_shift, acc);
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int64_t row = t * P + p;
#pragma unroll
      for (int n = 0; n < N; ++n) {
        if (lane != (p * N + n) % 32 || n >= rows || row >= F) continue;
        const float gf = static_cast<float>(to<T>(acc[2 * p][n]));
        const T silu = to<T>(gf / (1.0f + expf(-gf)));  // kernels/cpu/silu_mul.h's two roundings
        gate.out[n * F + row] = to<T>(static_cast<float>(silu) * static_cast<float>(to<T>(acc[2 * p + 1][n])));
      }
    }
  }
}

// Blocks for `blocks` units of block work (grid-stride beyond): at most as many per multiprocessor as fit at once
// and at most `cap_per_sm` (the SIMT kernels: 4, about one wave, so a long head stages its input once per block).
template <typename Kernel>
unsigned grid_for(Kernel kernel, size_t smem, int64_t blocks, int cap_per_sm) {
  int per_sm = 0;
  const cudaError_t e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem);
  RLAIF_CHECK(e == cudaSuccess, "quant_small_linear: occupancy query: {}", cudaGetErrorString(e));
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t cap = std::max<int64_t>(1, std::min(per_sm, cap_per_sm)) * sms;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(blocks, cap)));
}

// The SIMT kernels' grid: one block per kWarps warp tasks, at most 4 blocks a multiprocessor.
template <typename Kernel>
unsigned grid_for_tasks(Kernel kernel, size_t smem, int64_t tasks) {
  return grid_for(kernel, smem, (tasks + kWarps - 1) / kWarps, 4);
}

// Whether a warp takes several rows at once (2, or 2 gate/up pairs): at one or two input rows, and only where that
// still leaves 16 warps' tasks per multiprocessor (3B's gate/up and LM head, not its q/k/v, o or down).
bool multi_row(int64_t N, int64_t rows_per_task, int64_t rows) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return N <= 2 && rows / rows_per_task >= 16 * sms;
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

// ---- Tensor-core path at one or two input rows (opt-in: kernels::quant_few_row_mma) ----
// bf16 x, 4- or 8-bit weights, groups of 32, 64 or 128 (WPT = group / 32 chunks of 8 values a lane per group; a
// chunk is one q4 word or two q8 words), every weight's rows a multiple of 8. A block takes 8-row tiles of W
// (grid-stride); its 8 warps split the tile's K in groups and meet in shared memory. Each warp runs mma.sync
// m16n8k16 with x as A (its rows are the input rows; rows ≥ R zero) and W as B (the MMA's N: the tile's 8 rows),
// values as exact bf16 by one LOP3 each: a q4 value as 128 + q (the 0x4300 magic); a q8 value as two, its low
// nibble as 128 + lo and its high one as 2048 + 16·hi (0x4500: bf16's step is 16 there), both against the same x,
// so the MMAs sum x·(2176 + q). A group's MMAs sum Σ x·(kOffset + q) in float32 from zero, so the scale and bias
// stay outside as in the SIMT kernel: acc += s·Σ + (b − kOffset·s)·Σx. Thread (g = lane/4, tq = lane%4) holds W
// row g of the tile at the group's values tq·group/4 … (+ group/4) and supplies the same k slots {2tq, 2tq+1,
// 2tq+8, 2tq+9} of A and B. The LOP3 pairs a q4 word's values as (v0, v4), (v1, v5), (v2, v6), (v3, v7) and a
// q8 chunk's as (v0, v2), (v1, v3), (v4, v6), (v5, v7), so x is staged in that order.
namespace mma_few {

template <int BITS>
constexpr float kOffset = BITS == 4 ? 128.0f : 2176.0f;

// x staged as bf16 pairs, a uint4 per (group, chunk j, input row n, tq): the (a0, a2) of its MMAs, ((x0, x4),
// (x1, x5)) and ((x2, x6), (x3, x7)) for q4, ((x0, x2), (x1, x3)) and ((x4, x6), (x5, x7)) for q8; then Σx per
// (row, group) as float32.
__device__ __forceinline__ int x_at(int gi, int j, int n, int tq, int wpt, int rows) {
  return ((gi * wpt + j) * rows + n) * 4 + tq;
}

__device__ __forceinline__ uint32_t pack_bf16(at::BFloat16 lo, at::BFloat16 hi) {
  return static_cast<uint32_t>(lo.x) | (static_cast<uint32_t>(hi.x) << 16);
}

// Stages the R input rows of x [R, K] (rms_norm(x) with norm_w; block 0 also writes them to `normed`): item
// ((n · groups + gi) · 4 + tq) · WPT + j is the word's 8 values, so a group's 4·WPT items are consecutive lanes and
// their Σx meets by shuffles. Every thread calls it; it ends with a barrier.
template <int R, int WPT, int BITS>
__device__ __forceinline__ void stage(const at::BFloat16* __restrict__ x, int K, const at::BFloat16* __restrict__ norm_w,
                                      float eps, at::BFloat16* normed, uint4* xs, float* sums) {
  constexpr int kIpg = 4 * WPT, kGroup = 32 * WPT;
  const int groups = K / kGroup, total = R * K / 8;
  __shared__ float scale[R];
  if (norm_w != nullptr) norm_scales<at::BFloat16, R>(x, R, K, norm_w, eps, scale);
#pragma unroll 4
  for (int i0 = 0; i0 < total; i0 += kThreads) {  // the same trip count in every lane: the shuffles see all 32
    const int item = i0 + threadIdx.x;
    float sum = 0.0f;
    if (item < total) {
      const int j = item % WPT, tq = (item / WPT) % 4, gi = (item / kIpg) % groups, n = item / (kIpg * groups);
      const int k0 = gi * kGroup + tq * (kGroup / 4) + j * 8;
      Vec<at::BFloat16, 8> v = load_vec<at::BFloat16, 8>(x + static_cast<int64_t>(n) * K + k0);
      if (norm_w != nullptr) {
        const Vec<at::BFloat16, 8> w = load_vec<at::BFloat16, 8>(norm_w + k0);
#pragma unroll
        for (int e = 0; e < 8; ++e) v.v[e] = rms_apply(v.v[e], w.v[e], scale[n]);
        if (normed != nullptr && blockIdx.x == 0) store_vec<at::BFloat16, 8>(normed + static_cast<int64_t>(n) * K + k0, v);
      }
#pragma unroll
      for (int e = 0; e < 8; ++e) sum += static_cast<float>(v.v[e]);
      constexpr int kStep = BITS == 4 ? 4 : 2, kNext = BITS == 4 ? 2 : 4;  // pair (e, e + kStep); 2nd MMA's first
      xs[x_at(gi, j, n, tq, WPT, R)] =
          make_uint4(pack_bf16(v.v[0], v.v[kStep]), pack_bf16(v.v[1], v.v[1 + kStep]),
                     pack_bf16(v.v[kNext], v.v[kNext + kStep]), pack_bf16(v.v[kNext + 1], v.v[kNext + 1 + kStep]));
    }
#pragma unroll
    for (int off = 1; off < kIpg; off <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (item < total && item % kIpg == 0) sums[item / kIpg] = sum;  // = n · groups + gi
  }
  __syncthreads();
}

// c += A · B for one m16n8k16 step: A's rows g + 8 are zero (a1 = a3 = 0).
__device__ __forceinline__ void mma(float (&c)[4], uint32_t a0, uint32_t a2, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1));
}

// One chunk (8 values) of W row g, w[0] (q8: and w[1]): its MMAs against the staged x uint4 `a` (zeros for rows
// ≥ R).
template <int BITS>
__device__ __forceinline__ void mma_chunk(float (&c)[4], const uint32_t* w, const uint4& a) {
  constexpr uint32_t kMask = 0x000F000Fu, kLo = 0x43004300u, kHi = 0x45004500u;  // bf16 128 + v, 2048 + 16·v
  if constexpr (BITS == 4) {
    mma(c, a.x, a.y, (w[0] & kMask) | kLo, ((w[0] >> 4) & kMask) | kLo);
    mma(c, a.z, a.w, ((w[0] >> 8) & kMask) | kLo, ((w[0] >> 12) & kMask) | kLo);
  } else {  // a word's bytes v0..v3: (v0, v2) in the halves' low bytes, (v1, v3) after >> 8
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t a0 = h == 0 ? a.x : a.z, a2 = h == 0 ? a.y : a.w;
      mma(c, a0, a2, (w[h] & kMask) | kLo, ((w[h] >> 8) & kMask) | kLo);
      mma(c, a0, a2, ((w[h] >> 4) & kMask) | kHi, ((w[h] >> 12) & kMask) | kHi);
    }
  }
}

// NT tiles a task (SwiGLU: gate and up), UG groups' loads in flight a warp (q8: half as many groups, the same
// bytes).
template <typename S, int BITS, int R, int WPT, bool SILU>
__global__ void __launch_bounds__(kThreads, 2)
    kernel(const at::BFloat16* __restrict__ x, int K, QSegments<at::BFloat16, S> segs,
           const at::BFloat16* residual, const at::BFloat16* norm_w, float eps, at::BFloat16* normed, bool pdl) {
  using T = at::BFloat16;
  constexpr int NT = SILU ? 2 : 1, UG = (SILU ? 4 : 8) * 4 / BITS, kGroup = 32 * WPT, kCW = BITS / 4;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ float part[2][kWarps][NT][R][8];  // double-buffered by tile: one barrier a tile
  const int groups = K / kGroup, words_per_row = K * BITS / 32;
  uint4* xs = reinterpret_cast<uint4*>(smem_raw);
  float* sums = reinterpret_cast<float*>(xs + R * K / 8);
  int tiles = 0;
  if constexpr (SILU) tiles = static_cast<int>(segs.s[0].rows / 8);
  else
    for (int i = 0; i < segs.count; ++i) tiles += static_cast<int>(segs.s[i].rows / 8);
  pdl_begin(pdl);  // the weights do not depend on the previous kernel; x, the norm's input and the residual do
  stage<R, WPT, BITS>(x, K, norm_w, eps, normed, xs, sums);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tq = lane % 4;
  const int per_warp = (groups + kWarps - 1) / kWarps, g_begin = warp * per_warp;
  const int g_end = min(groups, g_begin + per_warp);
  int buf = 0;
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x, buf ^= 1) {
    // The task's segments (gate and up, or the one holding the tile) and first row.
    const QSegment<T, S>* seg[NT];
    int64_t row0 = static_cast<int64_t>(tile) * 8;
    if constexpr (SILU) {
      seg[0] = &segs.s[0];
      seg[1] = &segs.s[1];
    } else {
      int si = 0;
      while (row0 >= segs.s[si].rows) row0 -= segs.s[si++].rows;
      seg[0] = &segs.s[si];
    }
    float acc[NT][2] = {};
    for (int gi0 = g_begin; gi0 < g_end; gi0 += UG) {
      Words<WPT * kCW> w[UG][NT];
      S sc[UG][NT][2], bi[UG][NT][2];
#pragma unroll
      for (int u = 0; u < UG; ++u) {
        const int gi = gi0 + u;
        if (gi >= g_end) break;
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          const uint32_t* wq = reinterpret_cast<const uint32_t*>(seg[t]->w);
          w[u][t] = load_words<WPT * kCW>(wq + (row0 + g) * words_per_row + (gi * 4 + tq) * WPT * kCW);
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int64_t at = (row0 + 2 * tq + e) * groups + gi;
            sc[u][t][e] = seg[t]->scales[at];
            bi[u][t][e] = seg[t]->biases[at];
          }
        }
      }
#pragma unroll
      for (int u = 0; u < UG; ++u) {
        const int gi = gi0 + u;
        if (gi >= g_end) break;
        const float xsum = g < R ? sums[g * groups + gi] : 0.0f;
        uint4 a[WPT];
#pragma unroll
        for (int j = 0; j < WPT; ++j) a[j] = g < R ? reinterpret_cast<const uint4*>(xs)[x_at(gi, j, g, tq, WPT, R)]
                                                   : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
          for (int j = 0; j < WPT; ++j) mma_chunk<BITS>(c, &w[u][t].w[j * kCW], a[j]);
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float s = static_cast<float>(sc[u][t][e]), b = static_cast<float>(bi[u][t][e]);
            acc[t][e] = fmaf(s, c[e], fmaf(b - kOffset<BITS> * s, xsum, acc[t][e]));
          }
        }
      }
    }
    // C fragment: c[e] is input row g, tile row 2tq + e. The warps' K slices meet in shared memory.
    if (g < R)
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        part[buf][warp][t][g][2 * tq] = acc[t][0];
        part[buf][warp][t][g][2 * tq + 1] = acc[t][1];
      }
    __syncthreads();
    if (threadIdx.x < R * 8) {
      const int n = threadIdx.x / 8, r = threadIdx.x % 8;
      float y[NT];
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        y[t] = 0.0f;
        for (int v = 0; v < kWarps; ++v) y[t] += part[buf][v][t][n][r];
      }
      const QSegment<T, S>& s0 = *seg[0];
      const int64_t at = n * s0.rows + row0 + r;
      if constexpr (SILU) {
        const float gf = static_cast<float>(to<T>(y[0]));
        const T silu = to<T>(gf / (1.0f + expf(-gf)));  // kernels/cpu/silu_mul.h's two roundings
        s0.out[at] = to<T>(static_cast<float>(silu) * static_cast<float>(to<T>(y[1])));
      } else {
        T out = to<T>(y[0]);
        if (s0.bias) out = to<T>(static_cast<float>(out) + static_cast<float>(s0.bias[row0 + r]));
        if (residual) out = to<T>(static_cast<float>(residual[at]) + static_cast<float>(out));
        s0.out[at] = out;
      }
    }
  }
}

}  // namespace mma_few

// Runs the statement with `R`, the compile-time row count the kernel runs for N rows: 1, 2, 4 or 8 (the
// accumulators are registers; padding rows are zeros, never written).
#define RLAIF_QUANT_ROWS(N, ...)                                   \
  if ((N) <= 1) { constexpr int R = 1; __VA_ARGS__; }              \
  else if ((N) <= 2) { constexpr int R = 2; __VA_ARGS__; }         \
  else if ((N) <= 4) { constexpr int R = 4; __VA_ARGS__; }         \
  else { constexpr int R = 8; __VA_ARGS__; }

// Whether the tensor-core path takes these weights for x (kernels::quant_few_row_mma on): bf16 x of one or two
// rows, 4- or 8-bit weights in groups of 32, 64 or 128, every weight's rows a multiple of 8 (the tile), and x staged as
// bf16 within the SIMT kernel's staging limit.
bool mma_few_takes(const at::Tensor& x, const std::vector<const QuantMatrix*>& ws) {
  if (!quant_few_row_mma() || x.scalar_type() != at::kBFloat16 || x.size(0) > 2) return false;
  const int64_t K = x.size(1), g = ws[0]->group_size;
  if (g != 32 && g != 64 && g != 128) return false;
  if (x.size(0) * K * 2 + x.size(0) * (K / g) * 4 > kQuantSmallLinearStageMaxBytes) return false;
  for (const QuantMatrix* w : ws)
    if (w->bits != ws[0]->bits || w->group_size != g || w->rows() % 8 != 0) return false;
  return true;
}

// Launches mma_few::kernel for N ≤ 2 rows of bf16 x over the segments (SILU: gate and up): one block per 8-row
// tile up to the blocks the multiprocessors hold at once.
template <bool SILU, typename S, int BITS>
void launch_mma_few(int64_t N, int64_t K, int64_t group, int64_t tiles, const QSegments<at::BFloat16, S>& segs,
                    const at::BFloat16* x, const at::BFloat16* res, const at::BFloat16* nw, float eps,
                    at::BFloat16* normed, bool pdl, cudaStream_t stream) {
  auto go = [&](auto r_tag, auto wpt_tag) {
    constexpr int R = decltype(r_tag)::value, WPT = decltype(wpt_tag)::value;
    auto kernel = mma_few::kernel<S, BITS, R, WPT, SILU>;
    const size_t smem = static_cast<size_t>(R * K * 2 + R * (K / group) * 4);
    allow_dynamic_smem(kernel, smem, "quant_small_linear (tensor cores)");
    const unsigned grid = grid_for(kernel, smem, tiles, std::numeric_limits<int>::max());
    launch_kernel(pdl, kernel, grid, kThreads, smem, stream, x, static_cast<int>(K), segs, res, nw, eps, normed, pdl);
  };
  auto with_wpt = [&](auto r_tag) {
    if (group == 32) go(r_tag, std::integral_constant<int, 1>{});
    else if (group == 64) go(r_tag, std::integral_constant<int, 2>{});
    else go(r_tag, std::integral_constant<int, 4>{});
  };
  if (N == 1) with_wpt(std::integral_constant<int, 1>{});
  else with_wpt(std::integral_constant<int, 2>{});
}

}  // namespace

void quant_small_linear_cuda(const at::Tensor& x, const std::vector<QuantMatrix>& weights,
                             const std::vector<at::Tensor>& biases, const at::Tensor& residual,
                             const std::vector<at::Tensor>& outs, const InputNorm& norm) {
  const int64_t N = x.size(0), K = x.size(1);
  if (N == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool pdl = programmatic_launch();
  const QuantMatrix& w0 = weights[0];
  int64_t rows = 0;
  std::vector<const QuantMatrix*> ws;
  for (const QuantMatrix& w : weights) {
    rows += w.rows();
    ws.push_back(&w);
  }
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
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      if (mma_few_takes(x, ws)) {
        launch_mma_few<false, S, kBits>(N, K, w0.group_size, rows / 8, segs, static_cast<const T*>(x.data_ptr()), res, nw,
                                 static_cast<float>(norm.eps), normed, pdl, stream);
        return;
      }
    }
    RLAIF_QUANT_ROWS(N, {
      const size_t smem = static_cast<size_t>(quant_small_linear_stage_bytes(R, K, kBits));
      auto run = [&](auto m_tag) {
        constexpr int M = decltype(m_tag)::value;
        auto kernel = quant_small_linear_kernel<T, S, kBits, R, M>;
        allow_dynamic_smem(kernel, smem, "quant_small_linear");
        launch_kernel(pdl, kernel, grid_for_tasks(kernel, smem, (rows + M - 1) / M), kThreads, smem, stream,
                      static_cast<const T*>(x.data_ptr()), static_cast<int>(N), K, segs, res, nw,
                      static_cast<float>(norm.eps), normed, chunk_group_shift(w0), pdl);
      };
      if constexpr (R <= 2) {
        if (multi_row(N, 2, rows)) run(std::integral_constant<int, 2>{});
        else run(std::integral_constant<int, 1>{});
      } else {
        run(std::integral_constant<int, 1>{});
      }
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
  const bool pdl = programmatic_launch();
  dispatch(x.scalar_type(), gate.scales.scalar_type(), gate.bits, [&](auto t_tag, auto s_tag, auto bits_tag) {
    using T = decltype(t_tag);
    using S = decltype(s_tag);
    constexpr int kBits = decltype(bits_tag)::value;
    const QSegment<T, S> g = segment<T, S>(gate, {}, out), u = segment<T, S>(up, {}, out);
    const T* nw = norm.weight.defined() ? static_cast<const T*>(norm.weight.data_ptr()) : nullptr;
    T* normed = norm.normed.defined() ? static_cast<T*>(norm.normed.data_ptr()) : nullptr;
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      if (mma_few_takes(x, {&gate, &up})) {
        QSegments<T, S> segs;
        segs.s[0] = g;
        segs.s[1] = u;
        segs.count = 2;
        launch_mma_few<true, S, kBits>(N, K, gate.group_size, gate.rows() / 8, segs, static_cast<const T*>(x.data_ptr()),
                                nullptr, nw, static_cast<float>(norm.eps), normed, pdl, stream);
        return;
      }
    }
    RLAIF_QUANT_ROWS(N, {
      const size_t smem = static_cast<size_t>(quant_small_linear_stage_bytes(R, K, kBits));
      auto run = [&](auto p_tag) {
        constexpr int P = decltype(p_tag)::value;
        auto kernel = quant_small_linear_silu_mul_kernel<T, S, kBits, R, P>;
        allow_dynamic_smem(kernel, smem, "quant_small_linear_silu_mul");
        launch_kernel(pdl, kernel, grid_for_tasks(kernel, smem, (gate.rows() + P - 1) / P), kThreads, smem, stream,
                      static_cast<const T*>(x.data_ptr()), static_cast<int>(N), K, g, u, nw,
                      static_cast<float>(norm.eps), normed, chunk_group_shift(gate), pdl);
      };
      if constexpr (R <= 2) {
        if (multi_row(N, 2, gate.rows())) run(std::integral_constant<int, 2>{});
        else run(std::integral_constant<int, 1>{});
      } else {
        run(std::integral_constant<int, 1>{});
      }
    });
  });
  check_launch("quant_small_linear_silu_mul_kernel");
}

}  // namespace rlaif::kernels
