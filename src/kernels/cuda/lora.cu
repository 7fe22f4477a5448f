// LoRA shrink and expand, up to three adapters that share an input per launch. Shrink: a block per (rank column,
// tile of up to 8 rows), its 256 threads splitting the input dimension in 16-byte vectors (each A row read once
// per tile, not once per row; enough blocks and loads in flight for an 11008-wide input), a deterministic block
// sum. Expand: a thread per (output column, tile of rows: 1 up to 8 rows, 4 above), t·Bᵀ over the rank with the B
// row kept in L1 across the tile's rows, scaled, rounded, added to the base output (rows of any stride: column
// slices of a packed GEMM's output) and optionally to the residual.
#include "kernels/cuda/lora.h"

#include "kernels/cuda/common.cuh"

namespace rlaif::kernels {

namespace {

using namespace cuda_detail;

constexpr int kWarps = 8;
constexpr int kThreads = 256;
constexpr int kShrinkTile = 8;  // rows a shrink block serves

struct ShrinkArgs {
  const float* a[3];
  int64_t rank[3];
  int count;
};

template <typename T>
struct ExpandArgs {
  const float* b[3];
  const T* y[3];
  T* out[3];
  int64_t rows[3], rank[3], col[3], y_stride[3], out_stride[3];
  float scale[3];
  int count;
};

// Block (col, tile): t[s, col] = Σ_d x[s, d] · a_col[d] for the tile's rows s, float32 sums: each thread over its
// VEC-wide vectors of d (VEC = 1 when rows or A are not 16-byte aligned), then warp and block sums in a fixed order.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) lora_shrink_kernel(const T* __restrict__ x, int64_t S, int64_t D,
                                                                ShrinkArgs args, float* t, int64_t R) {
  const int64_t col = blockIdx.x, s0 = static_cast<int64_t>(blockIdx.y) * kShrinkTile;
  const int rows = static_cast<int>(min(static_cast<int64_t>(kShrinkTile), S - s0));
  int64_t j = col;
  int i = 0;
  while (i + 1 < args.count && j >= args.rank[i]) j -= args.rank[i++];
  const float* a = args.a[i] + j * D;
  const T* xs = x + s0 * D;
  float acc[kShrinkTile] = {};
  for (int64_t d = static_cast<int64_t>(threadIdx.x) * VEC; d < D; d += kThreads * VEC) {
    float av[VEC];
    if constexpr (VEC == 1) {
      av[0] = a[d];
    } else {
#pragma unroll
      for (int v = 0; v < VEC; v += 4) {
        const float4 f = *reinterpret_cast<const float4*>(a + d + v);
        av[v] = f.x, av[v + 1] = f.y, av[v + 2] = f.z, av[v + 3] = f.w;
      }
    }
#pragma unroll
    for (int r = 0; r < kShrinkTile; ++r) {
      if (r >= rows) break;
      const Vec<T, VEC> xv = load_vec<T, VEC>(xs + r * D + d);
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[r] += static_cast<float>(xv.v[v]) * av[v];
    }
  }
  __shared__ float part[kWarps][kShrinkTile];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int r = 0; r < kShrinkTile; ++r) {
    const float v = warp_sum(acc[r]);
    if (lane == 0) part[warp][r] = v;
  }
  __syncthreads();
  if (threadIdx.x < rows) {
    float sum = 0.0f;
    for (int w = 0; w < kWarps; ++w) sum += part[w][threadIdx.x];
    t[(s0 + threadIdx.x) * R + col] = sum;
  }
}

// Thread (output column of adapter i, tile of rows): out[s, o] = to(y[s, o] + to(scale · Σ_j t[s, col_i + j] ·
// b_i[o, j])), plus the residual (contiguous [S, O]) when given.
template <typename T>
__global__ void __launch_bounds__(kThreads) lora_expand_kernel(const float* __restrict__ t, int64_t S, int64_t R,
                                                                ExpandArgs<T> args, const T* residual, int tile) {
  int64_t o = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  int i = 0;
  while (i < args.count && o >= args.rows[i]) o -= args.rows[i++];
  if (i == args.count) return;
  const int64_t O = args.rows[i], r = args.rank[i];
  const float* b = args.b[i] + o * r;
  const int64_t s_end = min(S, (static_cast<int64_t>(blockIdx.y) + 1) * tile);
  for (int64_t s = static_cast<int64_t>(blockIdx.y) * tile; s < s_end; ++s) {
    const float* ts = t + s * R + args.col[i];
    float d = 0.0f;
    for (int64_t j = 0; j < r; ++j) d += ts[j] * b[j];
    const T delta = to<T>(d * args.scale[i]);
    T y = to<T>(static_cast<float>(args.y[i][s * args.y_stride[i] + o]) + static_cast<float>(delta));
    if (residual) y = to<T>(static_cast<float>(residual[s * O + o]) + static_cast<float>(y));
    args.out[i][s * args.out_stride[i] + o] = y;
  }
}

template <typename T>
void shrink(const at::Tensor& x, const std::vector<at::Tensor>& a, const at::Tensor& t) {
  const int64_t S = x.size(0), D = x.size(1), R = t.size(1);
  if (S == 0 || R == 0) return;
  ShrinkArgs args{};
  for (size_t i = 0; i < a.size(); ++i) {
    args.a[i] = a[i].data_ptr<float>();
    args.rank[i] = a[i].size(0);
  }
  args.count = static_cast<int>(a.size());
  const c10::cuda::CUDAGuard guard(x.device());
  const dim3 grid(static_cast<unsigned>(R), static_cast<unsigned>((S + kShrinkTile - 1) / kShrinkTile));
  constexpr int kVec = 16 / sizeof(T);
  bool vec = D % kVec == 0 && aligned16(x.data_ptr());
  for (const auto& ai : a) vec = vec && aligned16(ai.data_ptr());  // rows of D floats: aligned when D % 4 == 0
  auto* stream = at::cuda::getCurrentCUDAStream().stream();
  if (vec)
    lora_shrink_kernel<T, kVec><<<grid, kThreads, 0, stream>>>(x.data_ptr<T>(), S, D, args, t.data_ptr<float>(), R);
  else
    lora_shrink_kernel<T, 1><<<grid, kThreads, 0, stream>>>(x.data_ptr<T>(), S, D, args, t.data_ptr<float>(), R);
  check_launch("lora_shrink_kernel");
}

template <typename T>
void expand(const at::Tensor& t, const std::vector<at::Tensor>& b, const std::vector<double>& scales,
            const std::vector<at::Tensor>& ys, const at::Tensor& residual, const std::vector<at::Tensor>& outs) {
  const int64_t S = t.size(0), R = t.size(1);
  ExpandArgs<T> args{};
  int64_t total = 0, col = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    args.b[i] = b[i].data_ptr<float>();
    args.y[i] = ys[i].data_ptr<T>();
    args.out[i] = outs[i].data_ptr<T>();
    args.rows[i] = b[i].size(0);
    args.rank[i] = b[i].size(1);
    args.col[i] = col;
    args.y_stride[i] = ys[i].stride(0);
    args.out_stride[i] = outs[i].stride(0);
    args.scale[i] = static_cast<float>(scales[i]);
    col += b[i].size(1);
    total += b[i].size(0);
  }
  args.count = static_cast<int>(b.size());
  if (total == 0 || S == 0) return;
  const c10::cuda::CUDAGuard guard(t.device());
  // One row per thread up to 8 rows (enough threads for the few-row decode), 4 above (B read a quarter as often).
  const int tile = S <= 8 ? 1 : 4;
  const dim3 grid(static_cast<unsigned>((total + kThreads - 1) / kThreads), static_cast<unsigned>((S + tile - 1) / tile));
  lora_expand_kernel<T><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      t.data_ptr<float>(), S, R, args, residual.defined() ? residual.data_ptr<T>() : nullptr, tile);
  check_launch("lora_expand_kernel");
}

}  // namespace

void lora_shrink_cuda(const at::Tensor& x, const std::vector<at::Tensor>& a, const at::Tensor& t) {
  if (x.scalar_type() == at::kFloat) shrink<float>(x, a, t);
  else shrink<at::BFloat16>(x, a, t);
}

void lora_expand_cuda(const at::Tensor& t, const std::vector<at::Tensor>& b, const std::vector<double>& scales,
                      const std::vector<at::Tensor>& ys, const at::Tensor& residual, const std::vector<at::Tensor>& outs) {
  if (ys[0].scalar_type() == at::kFloat) expand<float>(t, b, scales, ys, residual, outs);
  else expand<at::BFloat16>(t, b, scales, ys, residual, outs);
}

}  // namespace rlaif::kernels
