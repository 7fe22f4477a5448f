// Few-row projections as a bandwidth-bound GEMV: one warp per output row (or 2-8 warps splitting a long row)
// streams that weight row once (16-byte loads, eight in flight per lane, cache-streaming so weights do not evict
// the activations) and dots it with all N ≤ 8 input rows, which stay in L1/L2 (or, with the input's RMSNorm
// fused, in shared memory: every block normalises the few rows itself). Several weights sharing x (q, k, v) are
// one launch; the residual add and SwiGLU's silu·up happen in the epilogue with the roundings of the ATen ops they
// replace. Under a programmatic dependent launch the weights start towards L2 before the previous kernel ends.
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

// The input's RMSNorm (kernels/cpu/rms_norm.h's roundings) into shared memory, a warp per row; block 0 also
// writes it to `normed`. Returns the rows the projections read: x itself without a norm.
template <typename T, int N, int VEC>
__device__ __forceinline__ const T* norm_rows(const T* __restrict__ x, int64_t K, const T* __restrict__ norm_w,
                                              float eps, T* normed) {
  if (norm_w == nullptr) return x;
  extern __shared__ __align__(16) unsigned char xs_raw[];
  T* xs = reinterpret_cast<T*>(xs_raw);  // [N, K]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int n = warp; n < N; n += kWarps) {
    const T* xr = x + n * K;
    float ss = 0.0f;
    for (int64_t k = lane * VEC; k < K; k += 32 * VEC) {
      const Vec<T, VEC> a = load_vec<T, VEC>(xr + k);
#pragma unroll
      for (int j = 0; j < VEC; ++j) ss += static_cast<float>(a.v[j]) * static_cast<float>(a.v[j]);
    }
    ss = warp_sum(ss);
    const float scale = rms_scale(ss, 1.0f / static_cast<float>(K), eps);
    for (int64_t k = lane * VEC; k < K; k += 32 * VEC) {
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
  int64_t k = k_begin + lane * VEC;
  for (; k + (kUnroll - 1) * kStep < k_end; k += kUnroll * kStep) {
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
  for (; k < k_end; k += kStep) {
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

// grid ceil(rows of all segments / (kWarps / split)), kWarps·32 threads: `split` warps share a row, each taking
// `chunk` of its K (long rows get more loads in flight), their sums met in shared memory.
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
  if (pdl) {  // the weights do not depend on the previous kernel; x, the norm's input and the residual do
    if (valid) prefetch_row(seg.w + row * K, part * chunk, min(K, (part + 1) * chunk));
    pdl_trigger();
    pdl_wait();
  }
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
  if (pdl) {  // the weights do not depend on the previous kernel
    if (row < F) {
      prefetch_row(w_gate + row * K, 0, K);
      prefetch_row(w_up + row * K, 0, K);
    }
    pdl_trigger();
    pdl_wait();
  }
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
  // Rows longer than 2048 are shared by 2, 4 or 8 warps (a down projection's 11008: 4), in chunks of whole
  // 32-lane vector rounds.
  int split = 1;
  while (split < kWarps && K >= 2048 * split * 2) split *= 2;
  constexpr int V = kVec<T>;
  const int64_t step = 32 * (vec ? V : 1);
  const int64_t chunk = ((K + split - 1) / split + step - 1) / step * step;
  const int64_t rows_per_block = kWarps / split;
  const unsigned grid = static_cast<unsigned>((rows + rows_per_block - 1) / rows_per_block);
  const NormArgs<T> na = norm_args<T>(x, norm);
  const bool pdl = programmatic_launch();
  if (vec) {
    RLAIF_WITH_ROWS(N, allow_dynamic_smem(small_linear_kernel<T, R, V>, na.smem, "small_linear");
                    launch_kernel(pdl, small_linear_kernel<T, R, V>, grid, kWarps * 32, na.smem, stream,
                                  x.data_ptr<T>(), K, segs, res, split, chunk, na.w, na.eps, na.normed, pdl));
  } else {
    RLAIF_WITH_ROWS(N, allow_dynamic_smem(small_linear_kernel<T, R, 1>, na.smem, "small_linear");
                    launch_kernel(pdl, small_linear_kernel<T, R, 1>, grid, kWarps * 32, na.smem, stream,
                                  x.data_ptr<T>(), K, segs, res, split, chunk, na.w, na.eps, na.normed, pdl));
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
  const unsigned grid = static_cast<unsigned>((F + kWarps - 1) / kWarps);
  constexpr int V = kVec<T>;
  const T *xp = x.data_ptr<T>(), *g = w_gate.data_ptr<T>(), *u = w_up.data_ptr<T>();
  T* o = out.data_ptr<T>();
  const NormArgs<T> na = norm_args<T>(x, norm);
  const bool pdl = programmatic_launch();
  if (vec) {
    RLAIF_WITH_ROWS(N, allow_dynamic_smem(small_linear_silu_mul_kernel<T, R, V>, na.smem, "small_linear_silu_mul");
                    launch_kernel(pdl, small_linear_silu_mul_kernel<T, R, V>, grid, kWarps * 32, na.smem,
                                  stream, xp, K, g, u, o, F, na.w, na.eps, na.normed, pdl));
  } else {
    RLAIF_WITH_ROWS(N, allow_dynamic_smem(small_linear_silu_mul_kernel<T, R, 1>, na.smem, "small_linear_silu_mul");
                    launch_kernel(pdl, small_linear_silu_mul_kernel<T, R, 1>, grid, kWarps * 32, na.smem,
                                  stream, xp, K, g, u, o, F, na.w, na.eps, na.normed, pdl));
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
