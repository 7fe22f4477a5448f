// LoRA shrink and expand, up to three adapters that share an input per launch. Shrink: a block per (group of up to
// 4 rank columns, tile of up to 8 rows), its 256 threads splitting the input dimension in 16-byte vectors (x read
// once per column group, each A row once per tile), a deterministic block sum.
// Expand: a block per (128 output columns of one adapter, tile of up to 16 rows), a thread per column; B's rows for
// the block and t's rows for the tile go through shared memory in rank chunks of 16 (B rows are rank-strided:
// read directly, a warp's loads would touch 32 rows each), each thread keeping its column's chunk in registers
// across the tile's rows (the tile's base outputs requested before the staging); scaled, rounded, added to the
// base output (rows of any stride: column slices of a packed GEMM's output) and optionally to the residual.
#include "kernels/cuda/lora.h"

#include "kernels/cuda/common.cuh"

namespace rlaif::kernels {

namespace {

using namespace cuda_detail;

constexpr int kWarps = 8;
constexpr int kThreads = 256;
constexpr int kShrinkTile = 8;   // rows a shrink block serves, at most
constexpr int kExpandCols = 128; // output columns (threads) of an expand block
constexpr int kExpandRows = 16;  // rows an expand block serves, at most
constexpr int kRankChunk = 16;   // rank columns staged at a time

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
  int64_t first_block[4];  // adapter i owns blocks [first_block[i], first_block[i + 1]) of blockIdx.x
  float scale[3];
  int count;
};

// Block (column group, row tile): t[s, c] = Σ_d x[s, d] · a_c[d] for the group's C columns c (which may belong
// to different adapters) and the tile's rows s, float32 sums: each thread over its VEC-wide vectors of d (VEC = 1
// when rows or A are not 16-byte aligned), then warp and block sums in a fixed order. C columns a block read x
// once for all of them: at batch 64 the down projection's shrink (16 columns of 11008 inputs) re-read x from L2 once
// per column and A once per row tile, 45 MB for 2 MB of data (11.4 µs, H100, session 8 profile).
template <typename T, int VEC, int C>
__global__ void __launch_bounds__(kThreads) lora_shrink_kernel(const T* __restrict__ x, int64_t S, int64_t D,
                                                                ShrinkArgs args, float* t, int64_t R, int tile) {
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * C, s0 = static_cast<int64_t>(blockIdx.y) * tile;
  const int rows = static_cast<int>(min(static_cast<int64_t>(tile), S - s0));
  const float* a[C];
#pragma unroll
  for (int c = 0; c < C; ++c) {  // column col0 + c: row j of adapter i's A (nullptr past R)
    int64_t j = col0 + c;
    int i = 0;
    while (i + 1 < args.count && j >= args.rank[i]) j -= args.rank[i++];
    a[c] = col0 + c < R ? args.a[i] + j * D : nullptr;
  }
  const T* xs = x + s0 * D;
  float acc[kShrinkTile][C] = {};
  for (int64_t d = static_cast<int64_t>(threadIdx.x) * VEC; d < D; d += kThreads * VEC) {
    float av[C][VEC];
#pragma unroll
    for (int c = 0; c < C; ++c) {
      if (a[c] == nullptr) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) av[c][v] = 0.0f;
      } else if constexpr (VEC == 1) {
        av[c][0] = a[c][d];
      } else {
#pragma unroll
        for (int v = 0; v < VEC; v += 4) {
          const float4 f = *reinterpret_cast<const float4*>(a[c] + d + v);
          av[c][v] = f.x, av[c][v + 1] = f.y, av[c][v + 2] = f.z, av[c][v + 3] = f.w;
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kShrinkTile; ++r) {
      if (r >= rows) break;
      const Vec<T, VEC> xv = load_vec<T, VEC>(xs + r * D + d);
#pragma unroll
      for (int c = 0; c < C; ++c)
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[r][c] += static_cast<float>(xv.v[v]) * av[c][v];
    }
  }
  __shared__ float part[kWarps][kShrinkTile * C];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int r = 0; r < kShrinkTile; ++r)
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const float v = warp_sum(acc[r][c]);
      if (lane == 0) part[warp][r * C + c] = v;
    }
  __syncthreads();
  if (threadIdx.x < kShrinkTile * C) {
    const int r = threadIdx.x / C, c = threadIdx.x % C;
    if (r < rows && col0 + c < R) {
      float sum = 0.0f;
      for (int w = 0; w < kWarps; ++w) sum += part[w][threadIdx.x];
      t[(s0 + r) * R + col0 + c] = sum;
    }
  }
}

// Block (column tile of adapter i, row tile), thread = output column o: out[s, o] = to(y[s, o] + to(scale ·
// Σ_j t[s, col_i + j] · b_i[o, j])) (j in order, float32), plus the residual (contiguous [S, O]) when given.
template <typename T>
__global__ void __launch_bounds__(kExpandCols) lora_expand_kernel(const float* __restrict__ t, int64_t S, int64_t R,
                                                                   ExpandArgs<T> args, const T* residual, int tile) {
  int i = 0;
  while (i + 1 < args.count && blockIdx.x >= args.first_block[i + 1]) ++i;
  const int64_t O = args.rows[i], r = args.rank[i];
  const int64_t o0 = (blockIdx.x - args.first_block[i]) * kExpandCols, o = o0 + threadIdx.x;
  const int64_t s0 = static_cast<int64_t>(blockIdx.y) * tile;
  const int rows = static_cast<int>(min(static_cast<int64_t>(tile), S - s0));
  const float* b = args.b[i];
  const float* ts = t + s0 * R + args.col[i];
  // The tile's base outputs (and residual) requested first: their latency overlaps the staging below.
  const bool live = o < O;
  const T* y = args.y[i] + s0 * args.y_stride[i] + o;
  T yv[kExpandRows], hv[kExpandRows];
#pragma unroll
  for (int s = 0; s < kExpandRows; ++s) {
    if (s >= rows) break;
    if (live) yv[s] = y[s * args.y_stride[i]];
    if (live && residual) hv[s] = residual[(s0 + s) * O + o];
  }
  // Rows padded to 20 floats: the 16-byte reads of 8 consecutive threads (one access phase) hit distinct banks.
  __shared__ __align__(16) float b_s[kExpandCols][kRankChunk + 4];
  __shared__ __align__(16) float t_s[kExpandRows][kRankChunk];
  float acc[kExpandRows] = {};
  for (int64_t j0 = 0; j0 < r; j0 += kRankChunk) {
    __syncthreads();  // the previous chunk is consumed
    for (int e = threadIdx.x; e < kExpandCols * kRankChunk; e += kExpandCols) {
      const int row = e / kRankChunk, j = e % kRankChunk;  // consecutive threads: consecutive floats of B
      b_s[row][j] = o0 + row < O && j0 + j < r ? b[(o0 + row) * r + j0 + j] : 0.0f;
    }
    for (int e = threadIdx.x; e < kExpandRows * kRankChunk; e += kExpandCols) {
      const int row = e / kRankChunk, j = e % kRankChunk;
      t_s[row][j] = row < rows && j0 + j < r ? ts[row * R + j0 + j] : 0.0f;
    }
    __syncthreads();
    float bv[kRankChunk];
#pragma unroll
    for (int j = 0; j < kRankChunk; j += 4) {
      const float4 v = *reinterpret_cast<const float4*>(&b_s[threadIdx.x][j]);
      bv[j] = v.x, bv[j + 1] = v.y, bv[j + 2] = v.z, bv[j + 3] = v.w;
    }
    // Only the chunk's real columns: the sum runs over j in the CPU reference's order, no padded terms.
    const int n = static_cast<int>(min(static_cast<int64_t>(kRankChunk), r - j0));
#pragma unroll
    for (int s = 0; s < kExpandRows; ++s) {
      if (s >= rows) break;
#pragma unroll
      for (int j = 0; j < kRankChunk; ++j)
        if (j < n) acc[s] += t_s[s][j] * bv[j];
    }
  }
  if (!live) return;
  const float scale = args.scale[i];
  T* out = args.out[i] + s0 * args.out_stride[i] + o;
#pragma unroll
  for (int s = 0; s < kExpandRows; ++s) {
    if (s >= rows) break;
    const T delta = to<T>(acc[s] * scale);
    T v = to<T>(static_cast<float>(yv[s]) + static_cast<float>(delta));
    if (residual) v = to<T>(static_cast<float>(hv[s]) + static_cast<float>(v));
    out[s * args.out_stride[i]] = v;
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
  // Four columns and 8 rows a block (x read once per 4 columns, A once per 8 rows); fewer columns, then fewer rows,
  // while the grid would have fewer blocks than a third of the SMs (the reads come from L2: fewer, larger blocks
  // move fewer bytes; batch 64: q/k/v 4 columns, gate/up 4, o and down 2).
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int tile = kShrinkTile, C = 4;
  auto blocks = [&] { return ((R + C - 1) / C) * ((S + tile - 1) / tile); };
  while (C > 1 && 3 * blocks() < sms) C /= 2;
  while (tile > 2 && 3 * blocks() < sms) tile /= 2;
  const dim3 grid(static_cast<unsigned>((R + C - 1) / C), static_cast<unsigned>((S + tile - 1) / tile));
  constexpr int kVec = 16 / sizeof(T);
  bool vec = D % kVec == 0 && aligned16(x.data_ptr());
  for (const auto& ai : a) vec = vec && aligned16(ai.data_ptr());  // rows of D floats: aligned when D % 4 == 0
  auto* stream = at::cuda::getCurrentCUDAStream().stream();
  auto run = [&](auto vec_c, auto cols_c) {
    constexpr int V = decltype(vec_c)::value, CC = decltype(cols_c)::value;
    lora_shrink_kernel<T, V, CC><<<grid, kThreads, 0, stream>>>(x.data_ptr<T>(), S, D, args, t.data_ptr<float>(), R,
                                                               tile);
  };
  auto with_cols = [&](auto vec_c) {
    if (C == 4) run(vec_c, std::integral_constant<int, 4>{});
    else if (C == 2) run(vec_c, std::integral_constant<int, 2>{});
    else run(vec_c, std::integral_constant<int, 1>{});
  };
  if (vec) with_cols(std::integral_constant<int, kVec>{});
  else with_cols(std::integral_constant<int, 1>{});
  check_launch("lora_shrink_kernel");
}

template <typename T>
void expand(const at::Tensor& t, const std::vector<at::Tensor>& b, const std::vector<double>& scales,
            const std::vector<at::Tensor>& ys, const at::Tensor& residual, const std::vector<at::Tensor>& outs) {
  const int64_t S = t.size(0), R = t.size(1);
  ExpandArgs<T> args{};
  int64_t col = 0, blocks = 0;
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
    args.first_block[i] = blocks;
    col += b[i].size(1);
    blocks += (b[i].size(0) + kExpandCols - 1) / kExpandCols;
  }
  args.first_block[b.size()] = blocks;
  args.count = static_cast<int>(b.size());
  if (blocks == 0 || S == 0) return;
  const c10::cuda::CUDAGuard guard(t.device());
  // Up to 16 rows a block (B staged once for them); fewer while the grid would leave SMs idle.
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int tile = kExpandRows;
  while (tile > 1 && blocks * ((S + tile - 1) / tile) < 2 * sms) tile /= 2;
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>((S + tile - 1) / tile));
  lora_expand_kernel<T><<<grid, kExpandCols, 0, at::cuda::getCurrentCUDAStream()>>>(
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
