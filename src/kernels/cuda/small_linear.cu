// Few-row projections as a bandwidth-bound GEMV: one warp per output row (or 2-8 warps splitting a long row)
// requests its whole share of that weight row at once, into its own shared-memory slots by cp.async (16-byte
// vectors, up to eight a lane in flight, no registers held), before anything else — the wait for the previous
// kernel, the fused RMSNorm — so those latencies overlap it; then dots it with all N ≤ 8 input rows (L1/L2, or
// shared memory when the norm is fused and every block normalises the few rows itself). Several weights sharing x
// (q, k, v) are one launch; the residual add and SwiGLU's silu·up happen in the epilogue with the roundings of the
// ATen ops they replace. These staged kernels are opt-in (kernels/cpu/registry.h FewRowKernel): the session-4
// kernels (namespace streaming) are the default, faster on the 3B shape in the session-5 measurement.
#include "kernels/cuda/small_linear.h"

#include "kernels/cpu/small_linear.h"
#include "kernels/cuda/common.cuh"

namespace rlaif::kernels {

namespace {

using namespace cuda_detail;

constexpr int kWarps = 8;   // warps per block
constexpr int kUnroll = 8;  // 16-byte weight loads in flight per lane: a 2048-wide bf16 row in one round

template <typename T>
struct Segment {
  const T* w = nullptr;
  const T* bias = nullptr;
  T* out = nullptr;
  int64_t rows = 0;
};

template <typename T>
struct Segments {
  Segment<T> s[3];
  int count = 0;
};

// Weights are read once per step: a streaming load keeps them from displacing x in the caches.
template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> load_stream(const T* p) {
  if constexpr (sizeof(T) * VEC == 16) {
    const int4 raw = __ldcs(reinterpret_cast<const int4*>(p));
    return *reinterpret_cast<const Vec<T, VEC>*>(&raw);
  } else {
    return load_vec<T, VEC>(p);
  }
}

// One round of a warp's weight loads, all in flight together: this lane's first `nv` (≤ U) vectors of a part,
// 32·VEC elements apart. With 16-byte vectors they go to the lane's own shared-memory slots by cp.async, so no
// registers are held while they arrive (occupancy stays high); narrower vectors go to registers. fma_round reads
// back exactly the vectors loaded (each lane only its own slots: no barrier needed).
template <typename T, int VEC, int U>
struct Round {
  static constexpr bool kStaged = sizeof(T) * VEC == 16;
  Vec<T, VEC>* slot = nullptr;  // staged: this lane's first slot, slots 32 apart
  Vec<T, VEC> reg[kStaged ? 1 : U];

  __device__ __forceinline__ void load(const T* __restrict__ p, int nv) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (u >= nv) break;
      if constexpr (kStaged) cp_async16(slot + u * 32, p + u * 32 * VEC);
      else reg[u] = load_stream<T, VEC>(p + u * 32 * VEC);
    }
    if constexpr (kStaged) cp_async_commit();
  }
  __device__ __forceinline__ void wait() const {
    if constexpr (kStaged) cp_async_wait_all();
  }
  __device__ __forceinline__ Vec<T, VEC> get(int u) const {
    if constexpr (kStaged) return slot[u * 32];
    else return reg[u];
  }
};

// Shared-memory slots for `rounds_per_warp` staged rounds of U vectors per warp (one element when not staged).
template <typename T, int VEC, int U>
constexpr int kStageBytes = Round<T, VEC, U>::kStaged ? kWarps * U * 32 * 16 : 16;

// This lane's vectors in [k0, k_end), vectors 32·VEC apart.
template <int VEC>
__device__ __forceinline__ int lane_vectors(int64_t k0, int64_t k_end) {
  return k0 < k_end ? static_cast<int>((k_end - k0 + 32 * VEC - 1) / (32 * VEC)) : 0;
}

// acc[n] += Σ x[n, ·] · w over the round's vectors (waited for); xp points at row 0's element of the first
// vector, rows K apart.
template <typename T, int N, int VEC, int U>
__device__ __forceinline__ void fma_round(const T* __restrict__ xp, int64_t K, int nv, const Round<T, VEC, U>& r,
                                          float (&acc)[N]) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    if (u >= nv) break;
    const Vec<T, VEC> wv = r.get(u);
#pragma unroll
    for (int n = 0; n < N; ++n) {
      const Vec<T, VEC> xv = load_vec<T, VEC>(xp + n * K + u * 32 * VEC);
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[n] += static_cast<float>(wv.v[j]) * static_cast<float>(xv.v[j]);
    }
  }
}

// The warp's dot of x's rows with w over [k_begin, k_end), whose first round `r` was requested earlier (before
// the norm and the wait for the previous kernel); later rounds (parts longer than U vectors a lane) reuse r's
// slots as they go. Not warp-summed.
template <typename T, int N, int VEC, int U>
__device__ __forceinline__ void dot_rows(const T* __restrict__ x, const T* __restrict__ w, int64_t K, int64_t k_begin,
                                         int64_t k_end, Round<T, VEC, U>& r, float (&acc)[N]) {
  constexpr int64_t kRound = int64_t{U} * 32 * VEC;
  const int64_t k0 = k_begin + (threadIdx.x % 32) * VEC;
  r.wait();
  fma_round<T, N, VEC, U>(x + k0, K, min(lane_vectors<VEC>(k0, k_end), U), r, acc);
  for (int64_t r0 = k0 + kRound; r0 < k_end; r0 += kRound) {
    const int nv = min(lane_vectors<VEC>(r0, k_end), U);
    r.load(w + r0, nv);
    r.wait();
    fma_round<T, N, VEC, U>(x + r0, K, nv, r, acc);
  }
}

// The input's RMSNorm (kernels/cpu/rms_norm.h's roundings) into shared memory: each row's kWarps/N warps (at
// least one) sum its squares and normalise their share of it, two vectors a lane in flight; block 0 also writes
// the rows to `normed`. Returns the rows the projections read: x itself without a norm. Every thread calls it.
template <typename T, int N, int VEC>
__device__ __forceinline__ const T* norm_rows(const T* __restrict__ x, int64_t K, const T* __restrict__ norm_w,
                                              float eps, T* normed) {
  if (norm_w == nullptr) return x;
  extern __shared__ __align__(16) unsigned char xs_raw[];
  T* xs = reinterpret_cast<T*>(xs_raw);  // [N, K]
  __shared__ float ss_part[kWarps];
  constexpr int kWpr = kWarps / N > 0 ? kWarps / N : 1;  // warps per row
  constexpr int kStride = kWpr * 32 * VEC;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int n = warp / kWpr;
  const bool active = n < N;
  const int kK = static_cast<int>(K);
  const int start = ((warp % kWpr) * 32 + lane) * VEC;
  const T* xr = x + n * K;
  float ss = 0.0f;
  if (active) {
    for (int k = start; k < kK; k += 2 * kStride) {
      const bool second = k + kStride < kK;
      const Vec<T, VEC> a = load_vec<T, VEC>(xr + k);
      Vec<T, VEC> b;
      if (second) b = load_vec<T, VEC>(xr + k + kStride);
#pragma unroll
      for (int j = 0; j < VEC; ++j) ss += static_cast<float>(a.v[j]) * static_cast<float>(a.v[j]);
      if (second)
#pragma unroll
        for (int j = 0; j < VEC; ++j) ss += static_cast<float>(b.v[j]) * static_cast<float>(b.v[j]);
    }
  }
  ss = warp_sum(ss);
  if (lane == 0) ss_part[warp] = ss;
  __syncthreads();
  if (active) {
    float total = 0.0f;
#pragma unroll
    for (int j = 0; j < kWpr; ++j) total += ss_part[n * kWpr + j];
    const float scale = rms_scale(total, 1.0f / static_cast<float>(K), eps);
    for (int k = start; k < kK; k += kStride) {
      const Vec<T, VEC> a = load_vec<T, VEC>(xr + k), wv = load_vec<T, VEC>(norm_w + k);
      Vec<T, VEC> o;
#pragma unroll
      for (int j = 0; j < VEC; ++j) o.v[j] = rms_apply(a.v[j], wv.v[j], scale);
      store_vec<T, VEC>(xs + n * K + k, o);
      if (normed != nullptr && blockIdx.x == 0) store_vec<T, VEC>(normed + n * K + k, o);
    }
  }
  __syncthreads();
  return xs;
}

// How `split` warps share a row of length K so that each warp's part is one round of U vectors per lane (at most
// kWarps warps; beyond that a part takes several rounds), parts `chunk` long in whole 32-lane vector steps.
struct RowSplit {
  int split = 1;
  int64_t chunk = 0;
};
// Parts of a row of length K split `split` ways, in whole 32-lane steps of `vec`-element vectors.
inline RowSplit with_chunks(int split, int64_t K, int64_t vec) {
  const int64_t step = 32 * vec;
  return {split, ((K + split - 1) / split + step - 1) / step * step};
}
inline RowSplit row_split(int64_t K, int64_t vec, int64_t U) {
  int split = 1;
  while (split < kWarps && (K + split - 1) / split > U * 32 * vec) split *= 2;
  return with_chunks(split, K, vec);
}

// grid ceil(rows of all segments / (kWarps / split)), kWarps·32 threads: `split` warps share a row, each taking
// `chunk` of its K, their sums met in shared memory. A warp's weights are requested first, so their latency
// overlaps the wait for the previous kernel and the norm.
template <typename T, int N, int VEC>
__global__ void __launch_bounds__(kWarps * 32) small_linear_kernel(const T* __restrict__ x, int64_t K,
                                                                    Segments<T> segs, const T* residual, int split,
                                                                    int64_t chunk, const T* norm_w, float eps,
                                                                    T* normed, bool pdl) {
  const int warp = threadIdx.x / 32, part = warp % split, lane = threadIdx.x % 32;
  int64_t row = static_cast<int64_t>(blockIdx.x) * (kWarps / split) + warp / split;
  int si = 0;
  while (si < segs.count && row >= segs.s[si].rows) row -= segs.s[si++].rows;
  const bool valid = si < segs.count;
  const Segment<T> seg = valid ? segs.s[si] : Segment<T>{};
  const int64_t k_begin = part * chunk, k_end = min(K, (part + 1) * chunk);
  const T* w = valid ? seg.w + row * K : nullptr;
  __shared__ __align__(16) unsigned char stage[kStageBytes<T, VEC, kUnroll>];
  Round<T, VEC, kUnroll> first;
  first.slot = reinterpret_cast<Vec<T, VEC>*>(stage) + warp * kUnroll * 32 + lane;
  if (valid) first.load(w + k_begin + lane * VEC, lane_vectors<VEC>(k_begin + lane * VEC, k_end));
  pdl_begin(pdl);  // x, the norm's input and the residual depend on the previous kernel
  x = norm_rows<T, N, VEC>(x, K, norm_w, eps, normed);
  if (split == 1 && !valid) return;  // with split > 1 every warp reaches the barrier below
  float acc[N];
#pragma unroll
  for (int n = 0; n < N; ++n) acc[n] = 0.0f;
  if (valid) dot_rows<T, N, VEC, kUnroll>(x, w, K, k_begin, k_end, first, acc);
#pragma unroll
  for (int n = 0; n < N; ++n) acc[n] = warp_sum(acc[n]);
  if (split > 1) {
    __shared__ float partial[kWarps][8];
    if (lane < N) {
#pragma unroll
      for (int n = 0; n < N; ++n)
        if (lane == n) partial[warp][n] = acc[n];
    }
    __syncthreads();
    if (!valid || part != 0) return;
#pragma unroll
    for (int n = 0; n < N; ++n) {
      float sum = 0.0f;
      for (int j = 0; j < split; ++j) sum += partial[warp + j][n];
      acc[n] = sum;
    }
  }
  const float b = seg.bias ? static_cast<float>(seg.bias[row]) : 0.0f;
#pragma unroll
  for (int n = 0; n < N; ++n) {
    if (lane != n) continue;
    const int64_t at = n * seg.rows + row;
    T y = to<T>(acc[n] + b);
    if (residual) y = to<T>(static_cast<float>(residual[at]) + static_cast<float>(y));
    seg.out[at] = y;
  }
}

// SwiGLU: a warp takes one part of a gate row and the same part of its up row, half a round of loads each.
constexpr int kSiluUnroll = kUnroll / 2;

template <typename T, int N, int VEC>
__global__ void __launch_bounds__(kWarps * 32) small_linear_silu_mul_kernel(const T* __restrict__ x, int64_t K,
                                                                             const T* __restrict__ w_gate,
                                                                             const T* __restrict__ w_up, T* out,
                                                                             int64_t F, int split, int64_t chunk,
                                                                             const T* norm_w, float eps,
                                                                             T* normed, bool pdl) {
  const int warp = threadIdx.x / 32, part = warp % split, lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kWarps / split) + warp / split;
  const bool valid = row < F;
  const int64_t k_begin = part * chunk, k_end = min(K, (part + 1) * chunk);
  const T* wg = valid ? w_gate + row * K : nullptr;
  const T* wu = valid ? w_up + row * K : nullptr;
  __shared__ __align__(16) unsigned char stage[2 * kStageBytes<T, VEC, kSiluUnroll>];
  Round<T, VEC, kSiluUnroll> first_g, first_u;
  first_g.slot = reinterpret_cast<Vec<T, VEC>*>(stage) + warp * 2 * kSiluUnroll * 32 + lane;
  first_u.slot = first_g.slot + kSiluUnroll * 32;
  if (valid) {
    const int64_t k0 = k_begin + lane * VEC;
    const int nv = lane_vectors<VEC>(k0, k_end);
    first_g.load(wg + k0, nv);
    first_u.load(wu + k0, nv);
  }
  pdl_begin(pdl);
  x = norm_rows<T, N, VEC>(x, K, norm_w, eps, normed);
  if (split == 1 && !valid) return;
  float g[N], u[N];
#pragma unroll
  for (int n = 0; n < N; ++n) g[n] = u[n] = 0.0f;
  if (valid) {
    dot_rows<T, N, VEC, kSiluUnroll>(x, wg, K, k_begin, k_end, first_g, g);
    dot_rows<T, N, VEC, kSiluUnroll>(x, wu, K, k_begin, k_end, first_u, u);
  }
#pragma unroll
  for (int n = 0; n < N; ++n) {
    g[n] = warp_sum(g[n]);
    u[n] = warp_sum(u[n]);
  }
  if (split > 1) {
    __shared__ float partial[kWarps][2][8];
    if (lane < N) {
#pragma unroll
      for (int n = 0; n < N; ++n)
        if (lane == n) {
          partial[warp][0][n] = g[n];
          partial[warp][1][n] = u[n];
        }
    }
    __syncthreads();
    if (!valid || part != 0) return;
#pragma unroll
    for (int n = 0; n < N; ++n) {
      float sg = 0.0f, su = 0.0f;
      for (int j = 0; j < split; ++j) {
        sg += partial[warp + j][0][n];
        su += partial[warp + j][1][n];
      }
      g[n] = sg;
      u[n] = su;
    }
  }
#pragma unroll
  for (int n = 0; n < N; ++n) {
    if (lane != n) continue;
    const float gf = static_cast<float>(to<T>(g[n]));
    const T silu = to<T>(gf / (1.0f + expf(-gf)));
    out[n * F + row] = to<T>(static_cast<float>(silu) * static_cast<float>(to<T>(u[n])));
  }
}

// The session-4 kernels (FewRowKernel::kStreaming, the default), kept beside the staged ones for A/B
// measurement: the norm first (norm_rows above, all warps of the block), then each warp's weights in rounds of
// eight 16-byte loads into registers, the remainder as one predicated round; gate and up one after the other.
// Under a programmatic launch the weights are prefetched to L2 before the wait.
namespace streaming {

// Warps sharing a row: rows longer than 2048 are split over 2, 4 or 8 warps.
inline int split_rule(int64_t K) {
  int split = 1;
  while (split < kWarps && K >= 2048 * split * 2) split *= 2;
  return split;
}

// Starts this warp's share [k_begin, k_end) of a weight row towards L2 (one prefetch per 128-byte line): issued
// before pdl_wait, it overlaps the previous kernel's tail under a programmatic dependent launch.
template <typename T>
__device__ __forceinline__ void prefetch_row(const T* w, int64_t k_begin, int64_t k_end) {
  constexpr int64_t kLine = 128 / sizeof(T);
  for (int64_t k = k_begin + (threadIdx.x % 32) * kLine; k < k_end; k += 32 * kLine)
    asm volatile("prefetch.global.L2 [%0];\n" ::"l"(w + k));
}

// acc[n] += Σ_k x[n, k] · w[k] over this lane's share (lane·VEC + i·32·VEC) of k in [k_begin, k_end); x rows are
// K apart.
template <typename T, int N, int VEC>
__device__ __forceinline__ void dot_rows(const T* __restrict__ x, const T* __restrict__ w, int64_t K, float (&acc)[N],
                                         int64_t k_begin = 0, int64_t k_end = -1) {
  constexpr int64_t kStep = 32 * VEC;
  const int lane = threadIdx.x % 32;
  if (k_end < 0) k_end = K;
  // Rounds of up to kUnroll vectors a lane, each round's loads in flight together; the last round is predicated
  // (all of a short row: 0.5B's 896 is 3.5 vectors a lane), not one latency per remaining vector.
  for (int64_t k = k_begin + lane * VEC; k < k_end; k += kUnroll * kStep) {
    const int nv = lane_vectors<VEC>(k, k_end);
    Vec<T, VEC> wv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) wv[u] = load_stream<T, VEC>(w + k + (u < nv ? u : 0) * kStep);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (u >= nv) break;
#pragma unroll
      for (int n = 0; n < N; ++n) {
        const Vec<T, VEC> xv = load_vec<T, VEC>(x + n * K + k + u * kStep);
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[n] += static_cast<float>(wv[u].v[j]) * static_cast<float>(xv.v[j]);
      }
    }
  }
#pragma unroll
  for (int n = 0; n < N; ++n) acc[n] = warp_sum(acc[n]);
}

// grid ceil(rows of all segments / (kWarps / split)), kWarps·32 threads: `split` warps share a row (split_rule),
// each taking `chunk` of its K, their sums met in shared memory.
template <typename T, int N, int VEC>
__global__ void __launch_bounds__(kWarps * 32) small_linear_kernel(const T* __restrict__ x, int64_t K,
                                                                    Segments<T> segs, const T* residual, int split,
                                                                    int64_t chunk, const T* norm_w, float eps,
                                                                    T* normed, bool pdl) {
  const int warp = threadIdx.x / 32, part = warp % split;
  int64_t row = static_cast<int64_t>(blockIdx.x) * (kWarps / split) + warp / split;
  int si = 0;
  while (si < segs.count && row >= segs.s[si].rows) row -= segs.s[si++].rows;
  const bool valid = si < segs.count;
  const Segment<T> seg = valid ? segs.s[si] : Segment<T>{};
  // The weights do not depend on the previous kernel; x, the norm's input and the residual do.
  if (pdl && valid) prefetch_row(seg.w + row * K, part * chunk, min(K, (part + 1) * chunk));
  pdl_begin(pdl);
  x = norm_rows<T, N, VEC>(x, K, norm_w, eps, normed);
  if (split == 1 && !valid) return;  // with split > 1 every warp reaches the barrier below
  float acc[N];
#pragma unroll
  for (int n = 0; n < N; ++n) acc[n] = 0.0f;
  if (valid) dot_rows<T, N, VEC>(x, seg.w + row * K, K, acc, part * chunk, min(K, (part + 1) * chunk));
  const int lane = threadIdx.x % 32;
  if (split > 1) {
    __shared__ float partial[kWarps][8];
    if (lane < N) {
#pragma unroll
      for (int n = 0; n < N; ++n)
        if (lane == n) partial[warp][n] = acc[n];
    }
    __syncthreads();
    if (!valid || part != 0) return;
#pragma unroll
    for (int n = 0; n < N; ++n) {
      float sum = 0.0f;
      for (int j = 0; j < split; ++j) sum += partial[warp + j][n];
      acc[n] = sum;
    }
  }
  const float b = seg.bias ? static_cast<float>(seg.bias[row]) : 0.0f;
#pragma unroll
  for (int n = 0; n < N; ++n) {
    if (lane != n) continue;
    const int64_t at = n * seg.rows + row;
    T y = to<T>(acc[n] + b);
    if (residual) y = to<T>(static_cast<float>(residual[at]) + static_cast<float>(y));
    seg.out[at] = y;
  }
}

template <typename T, int N, int VEC>
__global__ void __launch_bounds__(kWarps * 32) small_linear_silu_mul_kernel(const T* __restrict__ x, int64_t K,
                                                                             const T* __restrict__ w_gate,
                                                                             const T* __restrict__ w_up, T* out,
                                                                             int64_t F, const T* norm_w, float eps,
                                                                             T* normed, bool pdl) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (pdl && row < F) {  // the weights do not depend on the previous kernel
    prefetch_row(w_gate + row * K, 0, K);
    prefetch_row(w_up + row * K, 0, K);
  }
  pdl_begin(pdl);
  x = norm_rows<T, N, VEC>(x, K, norm_w, eps, normed);
  if (row >= F) return;
  float g[N], u[N];
#pragma unroll
  for (int n = 0; n < N; ++n) g[n] = u[n] = 0.0f;
  dot_rows<T, N, VEC>(x, w_gate + row * K, K, g);
  dot_rows<T, N, VEC>(x, w_up + row * K, K, u);
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int n = 0; n < N; ++n) {
    if (lane != n) continue;
    const float gf = static_cast<float>(to<T>(g[n]));
    const T silu = to<T>(gf / (1.0f + expf(-gf)));
    out[n * F + row] = to<T>(static_cast<float>(silu) * static_cast<float>(to<T>(u[n])));
  }
}

}  // namespace streaming

// Runs the statement with `R`, a compile-time copy of the row count N (the accumulators are registers).
#define RLAIF_WITH_ROWS(N, ...)                               \
  switch (N) {                                                \
    case 1: { constexpr int R = 1; __VA_ARGS__; } break;      \
    case 2: { constexpr int R = 2; __VA_ARGS__; } break;      \
    case 3: { constexpr int R = 3; __VA_ARGS__; } break;      \
    case 4: { constexpr int R = 4; __VA_ARGS__; } break;      \
    case 5: { constexpr int R = 5; __VA_ARGS__; } break;      \
    case 6: { constexpr int R = 6; __VA_ARGS__; } break;      \
    case 7: { constexpr int R = 7; __VA_ARGS__; } break;      \
    default: { constexpr int R = 8; __VA_ARGS__; } break;     \
  }

template <typename T>
bool vectorizable(const at::Tensor& x, std::initializer_list<const at::Tensor*> ws) {
  bool ok = x.size(1) % kVec<T> == 0 && aligned16(x.data_ptr());
  for (const at::Tensor* w : ws) ok = ok && aligned16(w->data_ptr());
  return ok;
}

// The norm's kernel arguments and shared memory (rows of x as T).
template <typename T>
struct NormArgs {
  const T* w = nullptr;
  float eps = 0.0f;
  T* normed = nullptr;
  size_t smem = 0;
};

template <typename T>
NormArgs<T> norm_args(const at::Tensor& x, const InputNorm& norm) {
  NormArgs<T> a;
  if (!norm.weight.defined()) return a;
  a.w = norm.weight.data_ptr<T>();
  a.eps = static_cast<float>(norm.eps);
  a.normed = norm.normed.defined() ? norm.normed.data_ptr<T>() : nullptr;
  a.smem = static_cast<size_t>(x.numel()) * sizeof(T);
  return a;
}

template <typename T>
void launch(const at::Tensor& x, const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& biases,
            const at::Tensor& residual, const std::vector<at::Tensor>& outs, const InputNorm& norm) {
  const int64_t N = x.size(0), K = x.size(1);
  Segments<T> segs;
  int64_t rows = 0;
  bool vec = vectorizable<T>(x, {}) && (!norm.weight.defined() || aligned16(norm.weight.data_ptr())) &&
             (!norm.normed.defined() || aligned16(norm.normed.data_ptr()));
  for (size_t i = 0; i < weights.size(); ++i) {
    segs.s[i] = {weights[i].data_ptr<T>(), biases[i].defined() ? biases[i].data_ptr<T>() : nullptr,
                 outs[i].data_ptr<T>(), weights[i].size(0)};
    rows += weights[i].size(0);
    vec = vec && aligned16(weights[i].data_ptr());
  }
  segs.count = static_cast<int>(weights.size());
  if (N == 0 || rows == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const T* res = residual.defined() ? residual.data_ptr<T>() : nullptr;
  // Staged: rows longer than one round of loads are shared by 2, 4 or 8 warps (a 3B down projection's 11008: 8).
  constexpr int V = kVec<T>;
  const bool staged = few_row_kernel() == FewRowKernel::kStaged;
  const int forced = few_row_split();  // bench_kernels' tuning override
  const RowSplit rs = forced > 0 ? with_chunks(forced, K, vec ? V : 1)
                      : staged   ? row_split(K, vec ? V : 1, kUnroll)
                                 : with_chunks(streaming::split_rule(K), K, vec ? V : 1);
  const int64_t rows_per_block = kWarps / rs.split;
  const unsigned grid = static_cast<unsigned>((rows + rows_per_block - 1) / rows_per_block);
  const NormArgs<T> na = norm_args<T>(x, norm);
  const bool pdl = programmatic_launch();
  auto go = [&](auto kernel) {
    allow_dynamic_smem(kernel, na.smem, "small_linear");
    launch_kernel(pdl, kernel, grid, kWarps * 32, na.smem, stream, x.data_ptr<T>(), K, segs, res, rs.split, rs.chunk,
                  na.w, na.eps, na.normed, pdl);
  };
  if (vec) {
    RLAIF_WITH_ROWS(N, if (staged) go(small_linear_kernel<T, R, V>); else go(streaming::small_linear_kernel<T, R, V>));
  } else {
    RLAIF_WITH_ROWS(N, if (staged) go(small_linear_kernel<T, R, 1>); else go(streaming::small_linear_kernel<T, R, 1>));
  }
  check_launch("small_linear_kernel");
}

template <typename T>
void launch_silu(const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& out,
                 const InputNorm& norm) {
  const int64_t N = x.size(0), K = x.size(1), F = w_gate.size(0);
  if (N == 0 || F == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool vec = vectorizable<T>(x, {&w_gate, &w_up}) &&
                   (!norm.weight.defined() || aligned16(norm.weight.data_ptr())) &&
                   (!norm.normed.defined() || aligned16(norm.normed.data_ptr()));
  constexpr int V = kVec<T>;
  const bool staged = few_row_kernel() == FewRowKernel::kStaged;
  const RowSplit rs = staged ? row_split(K, vec ? V : 1, kSiluUnroll) : RowSplit{};
  const int64_t rows_per_block = kWarps / rs.split;
  const unsigned grid = static_cast<unsigned>((F + rows_per_block - 1) / rows_per_block);
  const T *xp = x.data_ptr<T>(), *g = w_gate.data_ptr<T>(), *u = w_up.data_ptr<T>();
  T* o = out.data_ptr<T>();
  const NormArgs<T> na = norm_args<T>(x, norm);
  const bool pdl = programmatic_launch();
  auto go = [&](auto kernel) {
    allow_dynamic_smem(kernel, na.smem, "small_linear_silu_mul");
    launch_kernel(pdl, kernel, grid, kWarps * 32, na.smem, stream, xp, K, g, u, o, F, rs.split, rs.chunk, na.w, na.eps,
                  na.normed, pdl);
  };
  auto go_streaming = [&](auto kernel) {
    allow_dynamic_smem(kernel, na.smem, "small_linear_silu_mul");
    launch_kernel(pdl, kernel, grid, kWarps * 32, na.smem, stream, xp, K, g, u, o, F, na.w, na.eps, na.normed, pdl);
  };
  if (vec) {
    RLAIF_WITH_ROWS(N, if (staged) go(small_linear_silu_mul_kernel<T, R, V>);
                    else go_streaming(streaming::small_linear_silu_mul_kernel<T, R, V>));
  } else {
    RLAIF_WITH_ROWS(N, if (staged) go(small_linear_silu_mul_kernel<T, R, 1>);
                    else go_streaming(streaming::small_linear_silu_mul_kernel<T, R, 1>));
  }
  check_launch("small_linear_silu_mul_kernel");
}

}  // namespace

void small_linear_cuda(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                       const std::vector<at::Tensor>& biases, const at::Tensor& residual,
                       const std::vector<at::Tensor>& outs, const InputNorm& norm) {
  if (x.scalar_type() == at::kFloat) launch<float>(x, weights, biases, residual, outs, norm);
  else launch<at::BFloat16>(x, weights, biases, residual, outs, norm);
}

void small_linear_silu_mul_cuda(const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
                                const at::Tensor& out, const InputNorm& norm) {
  if (x.scalar_type() == at::kFloat) launch_silu<float>(x, w_gate, w_up, out, norm);
  else launch_silu<at::BFloat16>(x, w_gate, w_up, out, norm);
}

}  // namespace rlaif::kernels
