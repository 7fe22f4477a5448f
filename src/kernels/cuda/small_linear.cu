// Few-row projections as a bandwidth-bound GEMV: one warp per output row streams that weight row once (16-byte
// loads, eight in flight per lane, cache-streaming so weights do not evict the activations) and dots it with all
// N ≤ 8 input rows, which stay in L1/L2. Several weights sharing x (q, k, v) are one launch; the residual add
// and SwiGLU's silu·up happen in the epilogue with the roundings of the ATen ops they replace.
#include "kernels/cuda/small_linear.h"

#include "kernels/cpu/small_linear.h"
#include "kernels/cuda/common.cuh"

namespace rlaif::kernels {

namespace {

using namespace cuda_detail;

constexpr int kWarps = 8;  // rows per block
constexpr int kUnroll = 8;  // weight vectors in flight per lane (a 2048-wide bf16 row in one round)

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

// acc[n] += Σ_k x[n, k] · w[k] over this lane's share of k (lane·VEC + i·32·VEC).
template <typename T, int N, int VEC>
__device__ __forceinline__ void dot_rows(const T* __restrict__ x, const T* __restrict__ w, int64_t K, float (&acc)[N]) {
  constexpr int64_t kStep = 32 * VEC;
  const int lane = threadIdx.x % 32;
  int64_t k = lane * VEC;
  for (; k + (kUnroll - 1) * kStep < K; k += kUnroll * kStep) {
    Vec<T, VEC> wv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) wv[u] = load_stream<T, VEC>(w + k + u * kStep);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int n = 0; n < N; ++n) {
        const Vec<T, VEC> xv = load_vec<T, VEC>(x + n * K + k + u * kStep);
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[n] += static_cast<float>(wv[u].v[j]) * static_cast<float>(xv.v[j]);
      }
    }
  }
  for (; k < K; k += kStep) {
    const Vec<T, VEC> wv = load_stream<T, VEC>(w + k);
#pragma unroll
    for (int n = 0; n < N; ++n) {
      const Vec<T, VEC> xv = load_vec<T, VEC>(x + n * K + k);
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[n] += static_cast<float>(wv.v[j]) * static_cast<float>(xv.v[j]);
    }
  }
#pragma unroll
  for (int n = 0; n < N; ++n) acc[n] = warp_sum(acc[n]);
}

// grid ceil(rows of all segments / kWarps), kWarps·32 threads.
template <typename T, int N, int VEC>
__global__ void __launch_bounds__(kWarps * 32) small_linear_kernel(const T* __restrict__ x, int64_t K,
                                                                    Segments<T> segs, const T* residual) {
  int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  int si = 0;
  while (si < segs.count && row >= segs.s[si].rows) row -= segs.s[si++].rows;
  if (si == segs.count) return;
  const Segment<T> seg = segs.s[si];
  float acc[N];
#pragma unroll
  for (int n = 0; n < N; ++n) acc[n] = 0.0f;
  dot_rows<T, N, VEC>(x, seg.w + row * K, K, acc);
  const int lane = threadIdx.x % 32;
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
                                                                             int64_t F) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
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

template <typename T>
void launch(const at::Tensor& x, const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& biases,
            const at::Tensor& residual, const std::vector<at::Tensor>& outs) {
  const int64_t N = x.size(0), K = x.size(1);
  Segments<T> segs;
  int64_t rows = 0;
  bool vec = vectorizable<T>(x, {});
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
  const unsigned grid = static_cast<unsigned>((rows + kWarps - 1) / kWarps);
  constexpr int V = kVec<T>;
  if (vec) {
    RLAIF_WITH_ROWS(N, small_linear_kernel<T, R, V><<<grid, kWarps * 32, 0, stream>>>(x.data_ptr<T>(), K, segs, res));
  } else {
    RLAIF_WITH_ROWS(N, small_linear_kernel<T, R, 1><<<grid, kWarps * 32, 0, stream>>>(x.data_ptr<T>(), K, segs, res));
  }
  check_launch("small_linear_kernel");
}

template <typename T>
void launch_silu(const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& out) {
  const int64_t N = x.size(0), K = x.size(1), F = w_gate.size(0);
  if (N == 0 || F == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool vec = vectorizable<T>(x, {&w_gate, &w_up});
  const unsigned grid = static_cast<unsigned>((F + kWarps - 1) / kWarps);
  constexpr int V = kVec<T>;
  const T *xp = x.data_ptr<T>(), *g = w_gate.data_ptr<T>(), *u = w_up.data_ptr<T>();
  T* o = out.data_ptr<T>();
  if (vec) {
    RLAIF_WITH_ROWS(N, small_linear_silu_mul_kernel<T, R, V><<<grid, kWarps * 32, 0, stream>>>(xp, K, g, u, o, F));
  } else {
    RLAIF_WITH_ROWS(N, small_linear_silu_mul_kernel<T, R, 1><<<grid, kWarps * 32, 0, stream>>>(xp, K, g, u, o, F));
  }
  check_launch("small_linear_silu_mul_kernel");
}

}  // namespace

void small_linear_cuda(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                       const std::vector<at::Tensor>& biases, const at::Tensor& residual,
                       const std::vector<at::Tensor>& outs) {
  if (x.scalar_type() == at::kFloat) launch<float>(x, weights, biases, residual, outs);
  else launch<at::BFloat16>(x, weights, biases, residual, outs);
}

void small_linear_silu_mul_cuda(const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
                                const at::Tensor& out) {
  if (x.scalar_type() == at::kFloat) launch_silu<float>(x, w_gate, w_up, out);
  else launch_silu<at::BFloat16>(x, w_gate, w_up, out);
}

}  // namespace rlaif::kernels
