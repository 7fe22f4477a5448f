// LoRA shrink and expand, up to three adapters that share an input per launch. Shrink, two kernels: a block per
// (group of up to 4 rank columns, row tile), or for long inputs at batch a block per (K split, tile of up to 16
// rows) staging x and A through shared memory, the splits' partial sums added in order by the last block of each
// tile (one launch, deterministic).
// Expand: a block per (128 output columns of one adapter, tile of up to 8 rows), a thread per column holding its
// rank chunk of B (16 columns) in registers; t's rows for the tile go through shared memory; the tile's base outputs
// are requested before the staging. Scaled, rounded, added to the base output (rows of any stride: column slices of
// a packed GEMM's output) and optionally to the residual — or, for gate/up, followed by SwiGLU in the same thread.
// Above the few-row batch the expands run on tensor cores (lora_expand_mma). One adapter's expand into the residual
// can also carry the next RMSNorm (lora_expand_rms_norm: a block per row).
#include "kernels/cuda/lora.h"

#include "kernels/cpu/lora.h"  // kLoraNormMaxRank

#include "kernels/cuda/common.cuh"

#include <algorithm>
#include <type_traits>

namespace rlaif::kernels {

namespace {

using namespace cuda_detail;

constexpr int kThreads = 256;
constexpr int kShrinkRows = 16;  // rows of a shrink tile
constexpr int kShrinkK = 128;    // input columns a shrink block stages at a time
constexpr int kShrinkCols = 64;  // rank columns a shrink pass covers (kThreads / kShrinkCols threads a column)
constexpr int kMaxShrinkTiles = 1024;  // row tiles that may split K (one counter each)
constexpr int64_t kMaxSplits = 32;
constexpr int64_t kSplitMinInputs = 4096, kSplitMinRows = 32;  // where the split shrink runs (split_wins)
constexpr int kColsTile = 8;  // rows a column-group shrink block serves, at most
static_assert(kThreads == kShrinkCols * kShrinkRows / 4, "a shrink thread owns one column and 4 rows");

// Splits of row tile i finished so far in the running shrink launch; its last block resets it to 0. Launches on
// one device are stream-ordered (the decode step's single stream), so one set of counters serves them all.
__device__ unsigned int g_shrink_done[kMaxShrinkTiles];
constexpr int kExpandCols = 128; // output columns (threads) of an expand block
constexpr int kRankChunk = 16;   // rank columns staged at a time
// The expand kernels' ROWS, the rows a block serves at most, is 8 (the default) or 4 (kernels::lora_expand_rows).
// Resident expand blocks an SM is compiled for: 6 at 8 rows (≤ 80 registers; a batch-64 gate/up expand is 688
// blocks), 8 at 4 rows (≤ 64 registers, 1376 blocks). Session 12's Nsight Compute reading of the 8-row gate/up
// expand at batch 64: 15.4 µs, latency-bound at 29% achieved occupancy, 10.7 cycles between a warp's instructions.
template <int ROWS>
constexpr int kExpandBlocksPerSm = ROWS == 8 ? 6 : 8;

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
__global__ void __launch_bounds__(kThreads) lora_shrink_cols_kernel(const T* __restrict__ x, int64_t S, int64_t D,
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
  float acc[kColsTile][C] = {};
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
    for (int r = 0; r < kColsTile; ++r) {
      if (r >= rows) break;
      const Vec<T, VEC> xv = load_vec<T, VEC>(xs + r * D + d);
#pragma unroll
      for (int c = 0; c < C; ++c)
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[r][c] += static_cast<float>(xv.v[v]) * av[c][v];
    }
  }
  __shared__ float part[kThreads / 32][kColsTile * C];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int r = 0; r < kColsTile; ++r)
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const float v = warp_sum(acc[r][c]);
      if (lane == 0) part[warp][r * C + c] = v;
    }
  __syncthreads();
  if (threadIdx.x < kColsTile * C) {
    const int r = threadIdx.x / C, c = threadIdx.x % C;
    if (r < rows && col0 + c < R) {
      float sum = 0.0f;
      for (int w = 0; w < kThreads / 32; ++w) sum += part[w][threadIdx.x];
      t[(s0 + r) * R + col0 + c] = sum;
    }
  }
}

// Block (K split z, row tile): the partial sums t_z[s, c] = Σ_{d in split z} x[s, d] · a_c[d] of its up-to-16 rows
// for every rank column c, float32. Each 128-wide chunk of d is staged in shared memory (x converted to float32,
// A's rows for up to 64 columns a pass), the next chunk's loads in flight while the chunk computes; a thread owns
// one column and 4 rows and sums over d in order. With one split the sums are t; with several, each block writes
// its partials and the last block of the row tile to finish (a per-tile counter, reset by that block) adds the
// splits in order z = 0, 1, … — deterministic, one launch. Splitting K is what gives a batch-64 shrink enough
// blocks: session 8's kernel (a block per rank-column group and 8-row tile) ran the down projection's shrink
// (11008 inputs) on 64 blocks in 23.5 µs.
template <typename T, bool VECTOR>
__global__ void __launch_bounds__(kThreads) lora_shrink_split_kernel(const T* __restrict__ x, int64_t S, int64_t D,
                                                                ShrinkArgs args, int64_t R, int chunks_per_split,
                                                                float* __restrict__ part, float* __restrict__ t) {
  constexpr int XV = VECTOR ? 16 / static_cast<int>(sizeof(T)) : 1, AV = VECTOR ? 4 : 1;
  constexpr int XN = kShrinkRows * kShrinkK / XV / kThreads, AN = kShrinkCols * kShrinkK / AV / kThreads;
  // Rows padded by 4 floats: a warp's 16-byte reads of 32 consecutive columns' rows (one phase per 8) hit
  // distinct banks; x reads are warp-wide broadcasts.
  __shared__ __align__(16) float xs[kShrinkRows][kShrinkK + 4];
  __shared__ __align__(16) float as[kShrinkCols][kShrinkK + 4];
  __shared__ bool last;
  const int tile = blockIdx.y, splits = gridDim.x;
  const int64_t s0 = static_cast<int64_t>(tile) * kShrinkRows;
  const int rows = static_cast<int>(min(static_cast<int64_t>(kShrinkRows), S - s0));
  const int64_t chunks = (D + kShrinkK - 1) / kShrinkK;
  const int64_t chunk_begin = static_cast<int64_t>(blockIdx.x) * chunks_per_split;
  const int64_t chunk_end = min(chunks, chunk_begin + chunks_per_split);
  const int c = threadIdx.x % kShrinkCols, rq = threadIdx.x / kShrinkCols;  // column; rows 4rq .. 4rq+3
  for (int64_t p0 = 0; p0 < R; p0 += kShrinkCols) {
    const int ncols = static_cast<int>(min(static_cast<int64_t>(kShrinkCols), R - p0));
    Vec<T, XV> xr[XN];
    Vec<float, AV> ar[AN];
    auto load = [&](int64_t chunk) {  // the chunk's x rows and A rows into registers, zeros past the edges
      const int64_t k0 = chunk * kShrinkK;
#pragma unroll
      for (int n = 0; n < XN; ++n) {
        const int e = threadIdx.x + n * kThreads, row = e / (kShrinkK / XV);
        const int64_t k = k0 + (e % (kShrinkK / XV)) * XV;
        if (row < rows && k < D) xr[n] = load_vec<T, XV>(x + (s0 + row) * D + k);
        else
#pragma unroll
          for (int v = 0; v < XV; ++v) xr[n].v[v] = T(0.0f);
      }
#pragma unroll
      for (int n = 0; n < AN; ++n) {
        const int e = threadIdx.x + n * kThreads, col = e / (kShrinkK / AV);
        const int64_t k = k0 + (e % (kShrinkK / AV)) * AV;
        if (col < ncols && k < D) {
          int64_t j = p0 + col;  // row j of adapter i's A
          int i = 0;
          while (i + 1 < args.count && j >= args.rank[i]) j -= args.rank[i++];
          ar[n] = load_vec<float, AV>(args.a[i] + j * D + k);
        } else {
#pragma unroll
          for (int v = 0; v < AV; ++v) ar[n].v[v] = 0.0f;
        }
      }
    };
    auto store = [&] {
#pragma unroll
      for (int n = 0; n < XN; ++n) {
        const int e = threadIdx.x + n * kThreads, row = e / (kShrinkK / XV), k = (e % (kShrinkK / XV)) * XV;
#pragma unroll
        for (int v = 0; v < XV; ++v) xs[row][k + v] = static_cast<float>(xr[n].v[v]);
      }
#pragma unroll
      for (int n = 0; n < AN; ++n) {
        const int e = threadIdx.x + n * kThreads, col = e / (kShrinkK / AV), k = (e % (kShrinkK / AV)) * AV;
#pragma unroll
        for (int v = 0; v < AV; ++v) as[col][k + v] = ar[n].v[v];
      }
    };
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (chunk_begin < chunk_end) load(chunk_begin);
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      __syncthreads();  // the previous chunk is consumed
      store();
      __syncthreads();
      if (chunk + 1 < chunk_end) load(chunk + 1);  // in flight while this chunk computes
      if (c < ncols) {
#pragma unroll 8
        for (int k = 0; k < kShrinkK; k += 4) {
          const float4 a4 = *reinterpret_cast<const float4*>(&as[c][k]);
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const float4 x4 = *reinterpret_cast<const float4*>(&xs[4 * rq + r][k]);
            acc[r] += x4.x * a4.x;
            acc[r] += x4.y * a4.y;
            acc[r] += x4.z * a4.z;
            acc[r] += x4.w * a4.w;
          }
        }
      }
    }
    if (c < ncols) {
      float* dst = splits == 1 ? t : part + static_cast<int64_t>(blockIdx.x) * S * R;
#pragma unroll
      for (int r = 0; r < 4; ++r)
        if (4 * rq + r < rows) dst[(s0 + 4 * rq + r) * R + p0 + c] = acc[r];
    }
  }
  if (splits == 1) return;
  __threadfence();  // this block's partials are visible device-wide before it is counted
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(&g_shrink_done[tile], 1u) == static_cast<unsigned>(splits - 1);
  __syncthreads();
  if (!last) return;
  __threadfence();
  // Eight splits' partials requested at a time (from L2), then added in order: one dependent round trip per 8
  // splits, not per split (session 9's first version summed one load at a time: the q/k/v shrink took 10 µs).
  for (int o = threadIdx.x; o < rows * R; o += kThreads) {
    const float* p = part + (s0 + o / R) * R + o % R;
    const int64_t stride = S * R;
    float sum = 0.0f;
    for (int z0 = 0; z0 < splits; z0 += 8) {
      float v[8];
#pragma unroll
      for (int z = 0; z < 8; ++z) v[z] = z0 + z < splits ? __ldcg(p + (z0 + z) * stride) : 0.0f;
#pragma unroll
      for (int z = 0; z < 8; ++z)
        if (z0 + z < splits) sum += v[z];
    }
    t[(s0 + o / R) * R + o % R] = sum;
  }
  if (threadIdx.x == 0) g_shrink_done[tile] = 0;  // ready for the next launch (stream order)
}

// Shared memory of an expand block over N adapters: t's rows for its tile, one rank chunk at a time.
template <int N, int ROWS>
struct ExpandStage {
  __align__(16) float t[N][ROWS][kRankChunk];
};

// For each adapter n: acc[n][s] += Σ_j ts[n][s · R + j] · b[n][o, j] (t float32 or bf16, rows R apart) for this
// thread's column o (< O) and the tile rows s (< rows), j in order over its rank r[n], float32 (only the chunk's
// real columns: the CPU reference's order, no padded terms). The thread's chunk of its B row goes straight into
// registers (16-byte loads when B's rows allow; the warp's loads cover 32 consecutive rows), requested before the
// barrier so it overlaps the staging of t. Session 10 (H100, batch 64, Nsight Compute): with B staged in shared
// memory as well, 20 KB a block allowed 5 blocks an SM and the gate/up expand ran 344 blocks at 16% achieved
// occupancy in 16.0 µs.
template <int N, int ROWS, typename TT>
__device__ __forceinline__ void accumulate_updates(const float* const (&b)[N], const int64_t (&r)[N],
                                                   const TT* const (&ts)[N], int64_t O, int64_t R, int rows,
                                                   int64_t o, ExpandStage<N, ROWS>& st, float (&acc)[N][ROWS]) {
  int64_t r_max = 0;
#pragma unroll
  for (int n = 0; n < N; ++n) r_max = max(r_max, r[n]);
  for (int64_t j0 = 0; j0 < r_max; j0 += kRankChunk) {
    float bv[N][kRankChunk];
    int m[N];  // the chunk's real columns of adapter n (≤ 0: none left)
#pragma unroll
    for (int n = 0; n < N; ++n) {
      m[n] = static_cast<int>(min(static_cast<int64_t>(kRankChunk), r[n] - j0));
      const float* row = b[n] + o * r[n] + j0;
      if (r[n] % 4 == 0 && reinterpret_cast<uintptr_t>(b[n]) % 16 == 0) {  // m[n] is a multiple of 4 then
#pragma unroll
        for (int j = 0; j < kRankChunk; j += 4) {
          const float4 v = o < O && j < m[n] ? *reinterpret_cast<const float4*>(row + j)
                                             : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
          bv[n][j] = v.x, bv[n][j + 1] = v.y, bv[n][j + 2] = v.z, bv[n][j + 3] = v.w;
        }
      } else {
#pragma unroll
        for (int j = 0; j < kRankChunk; ++j) bv[n][j] = o < O && j < m[n] ? row[j] : 0.0f;
      }
    }
    __syncthreads();  // the previous chunk of t is consumed
#pragma unroll
    for (int n = 0; n < N; ++n)
      for (int e = threadIdx.x; e < ROWS * kRankChunk; e += kExpandCols) {
        const int row = e / kRankChunk, j = e % kRankChunk;
        st.t[n][row][j] = row < rows && j0 + j < r[n] ? static_cast<float>(ts[n][row * R + j0 + j]) : 0.0f;
      }
    __syncthreads();
#pragma unroll
    for (int n = 0; n < N; ++n) {
#pragma unroll
      for (int s = 0; s < ROWS; ++s) {
        if (s >= rows) break;
#pragma unroll
        for (int j = 0; j < kRankChunk; ++j)
          if (j < m[n]) acc[n][s] += st.t[n][s][j] * bv[n][j];
      }
    }
  }
}

// Block (column tile of adapter i, row tile), thread = output column o: out[s, o] = to(y[s, o] + to(scale ·
// Σ_j t[s, col_i + j] · b_i[o, j])) (j in order, float32), plus the residual (contiguous [S, O]) when given.
template <typename T, typename TT, int ROWS>
__global__ void __launch_bounds__(kExpandCols, kExpandBlocksPerSm<ROWS>) lora_expand_kernel(const TT* __restrict__ t, int64_t S, int64_t R,
                                                                   ExpandArgs<T> args, const T* residual, int tile) {
  int i = 0;
  while (i + 1 < args.count && blockIdx.x >= args.first_block[i + 1]) ++i;
  const int64_t O = args.rows[i];
  const int64_t o0 = (blockIdx.x - args.first_block[i]) * kExpandCols, o = o0 + threadIdx.x;
  const int64_t s0 = static_cast<int64_t>(blockIdx.y) * tile;
  const int rows = static_cast<int>(min(static_cast<int64_t>(tile), S - s0));
  // The tile's base outputs (and residual) requested first: their latency overlaps the staging.
  const bool live = o < O;
  const T* y = args.y[i] + s0 * args.y_stride[i] + o;
  T yv[ROWS], hv[ROWS];
#pragma unroll
  for (int s = 0; s < ROWS; ++s) {
    if (s >= rows) break;
    if (live) yv[s] = y[s * args.y_stride[i]];
    if (live && residual) hv[s] = residual[(s0 + s) * O + o];
  }
  __shared__ ExpandStage<1, ROWS> st;
  float acc[1][ROWS] = {};
  accumulate_updates<1, ROWS, TT>({args.b[i]}, {args.rank[i]}, {t + s0 * R + args.col[i]}, O, R, rows, o, st, acc);
  if (!live) return;
  const float scale = args.scale[i];
  T* out = args.out[i] + s0 * args.out_stride[i] + o;
#pragma unroll
  for (int s = 0; s < ROWS; ++s) {
    if (s >= rows) break;
    const T delta = to<T>(acc[0][s] * scale);
    T v = to<T>(static_cast<float>(yv[s]) + static_cast<float>(delta));
    if (residual) v = to<T>(static_cast<float>(hv[s]) + static_cast<float>(v));
    out[s * args.out_stride[i]] = v;
  }
}

// Block (column tile, row tile), thread = column f of gate and up (adapters 0 and 1 of args): out[s, f] =
// silu_mul(to(g + to(scale_0 · t_0 · b_0[f])), to(u + to(scale_1 · t_1 · b_1[f]))) — the expand's rounding, then
// silu_mul's (kernels/cpu/silu_mul.h). Saves the gate/up expand's write and silu_mul's read of [S, 2F].
template <typename T, typename TT, int ROWS>
__global__ void __launch_bounds__(kExpandCols, kExpandBlocksPerSm<ROWS>) lora_expand_silu_kernel(const TT* __restrict__ t, int64_t S,
                                                                        int64_t R, ExpandArgs<T> args, T* out,
                                                                        int tile) {
  const int64_t F = args.rows[0];
  const int64_t o0 = static_cast<int64_t>(blockIdx.x) * kExpandCols, o = o0 + threadIdx.x;
  const int64_t s0 = static_cast<int64_t>(blockIdx.y) * tile;
  const int rows = static_cast<int>(min(static_cast<int64_t>(tile), S - s0));
  const bool live = o < F;
  T gv[ROWS], uv[ROWS];
#pragma unroll
  for (int s = 0; s < ROWS; ++s) {
    if (s >= rows) break;
    if (live) gv[s] = args.y[0][(s0 + s) * args.y_stride[0] + o];
    if (live) uv[s] = args.y[1][(s0 + s) * args.y_stride[1] + o];
  }
  __shared__ ExpandStage<2, ROWS> st;
  float acc[2][ROWS] = {};
  accumulate_updates<2, ROWS, TT>({args.b[0], args.b[1]}, {args.rank[0], args.rank[1]}, {t + s0 * R, t + s0 * R + args.col[1]},
                            F, R, rows, o, st, acc);
  if (!live) return;
#pragma unroll
  for (int s = 0; s < ROWS; ++s) {
    if (s >= rows) break;
    const float g = static_cast<float>(to<T>(static_cast<float>(gv[s]) + static_cast<float>(to<T>(acc[0][s] * args.scale[0]))));
    const T u = to<T>(static_cast<float>(uv[s]) + static_cast<float>(to<T>(acc[1][s] * args.scale[1])));
    const T silu = to<T>(g / (1.0f + expf(-g)));
    out[(s0 + s) * F + o] = to<T>(static_cast<float>(silu) * static_cast<float>(u));
  }
}

// Tensor-core expand (kernels::lora_expand_mma; bf16 outputs whose t is bf16 columns of the base GEMM's output, as
// the batched decode step gives it). A warp owns 8 output columns of one adapter and MT tiles of 16 rows: the update
// t·Bᵀ is m16n8k16 MMAs over the rank in chunks of 16 (columns past the rank are zeros). B is float32; each value
// enters as two bf16s, hi = bf16(b) and lo = bf16(b - hi), so the MMAs see b to 16 bits (the products are exact,
// the sums float32). The SIMT kernels above spend most of their instructions on addressing and predicates around
// the 16 FMAs per output; the MMAs need two instructions per 128 outputs and rank chunk. Session 13's Nsight Compute
// sections of the first version (batch-64 gate/up + SwiGLU, MT = 4: 14.7 µs, ~1,860 instructions a warp at 9.1
// cycles each, 2.6 warps a scheduler) led to this one: each lane's fragment rows become pointers and in-range flags
// once (a load is then one add), 2 row tiles a warp where that still fills the SMs (twice the warps), and SwiGLU's
// division as __fdividef.
constexpr int kMmaWarps = 4;               // warps of a tensor-core expand block
constexpr int kMmaCols = 8 * kMmaWarps;    // output columns of a block

// float32 b → (hi, lo) bf16 pairs with hi + lo = b to 16 significant bits.
__device__ __forceinline__ void split_bf16(float2 v, uint32_t& hi, uint32_t& lo) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(v.x, v.y);
  const float2 hf = __bfloat1622float2(h);
  hi = *reinterpret_cast<const uint32_t*>(&h);
  lo = pack_bf16(v.x - hf.x, v.y - hf.y);
}

__device__ __forceinline__ uint32_t load_pair(const __nv_bfloat16* p) { return *reinterpret_cast<const uint32_t*>(p); }
__device__ __forceinline__ float2 unpack_pair(uint32_t v) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
}
__device__ __forceinline__ float round_bf16(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }

// A lane's fragment rows (16·mt + g + 8·half below the warp's first row) of a bf16 matrix with rows `stride` apart,
// as pointers at column `col` (the base already there) and whether each row is below `rows_left`.
template <int MT>
struct FragRows {
  const __nv_bfloat16* p[MT][2];
  bool ok[MT][2];
  __device__ __forceinline__ FragRows(const __nv_bfloat16* base, int64_t stride, int64_t rows_left) {
    const int g = (threadIdx.x % 32) / 4;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = 16 * mt + g + 8 * half;
        ok[mt][half] = row < rows_left;
        p[mt][half] = base + (ok[mt][half] ? row : 0) * stride;
      }
  }
};

// acc[mt] (C fragments) += t[fragment rows, 0..r) · b[o0 + 8 columns, 0..r)ᵀ: t's rows from `tr` (pairs 4-byte
// aligned: the row stride and the adapter's first column even), `brow` = B's row o0 + g (float32, r even values),
// n_ok whether that row exists.
template <int MT>
__device__ __forceinline__ void mma_update(const FragRows<MT>& tr, const float* brow, bool n_ok, int r,
                                           float (&acc)[MT][4]) {
  const int c = threadIdx.x % 4;
  for (int k0 = 0; k0 < r; k0 += 16) {
    const int k = k0 + 2 * c;
    const bool lo_ok = k < r, hi_ok = k + 8 < r;
    const float2 zero = make_float2(0.0f, 0.0f);
    const float2 v0 = n_ok && lo_ok ? *reinterpret_cast<const float2*>(brow + k) : zero;
    const float2 v1 = n_ok && hi_ok ? *reinterpret_cast<const float2*>(brow + k + 8) : zero;
    uint32_t a[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      a[mt][0] = tr.ok[mt][0] && lo_ok ? load_pair(tr.p[mt][0] + k) : 0u;
      a[mt][1] = tr.ok[mt][1] && lo_ok ? load_pair(tr.p[mt][1] + k) : 0u;
      a[mt][2] = tr.ok[mt][0] && hi_ok ? load_pair(tr.p[mt][0] + k + 8) : 0u;
      a[mt][3] = tr.ok[mt][1] && hi_ok ? load_pair(tr.p[mt][1] + k + 8) : 0u;
    }
    uint32_t h0, l0, h1, l1;
    split_bf16(v0, h0, l0);
    split_bf16(v1, h1, l1);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      mma_bf16(acc[mt], a[mt], h0, h1);
      mma_bf16(acc[mt], a[mt], l0, l1);
    }
  }
}

// Block (32 columns of adapter i, 16·MT rows), warp w: columns o0 = 8w + 8 of them; lane (g, c) holds rows g and
// g + 8 of each row tile and columns o0 + 2c, +1 (the C fragment), whose base outputs (and residual) it requests
// before the MMAs. Outputs as lora_expand_kernel's: out = to(y + to(scale · update)), then to(h + out).
template <int MT>
__global__ void __launch_bounds__(kMmaWarps * 32) lora_expand_mma_kernel(const __nv_bfloat16* __restrict__ t, int64_t S,
                                                                       int64_t R, ExpandArgs<at::BFloat16> args,
                                                                       const at::BFloat16* residual) {
  int i = 0;
  while (i + 1 < args.count && blockIdx.x >= args.first_block[i + 1]) ++i;
  const int64_t O = args.rows[i];
  const int lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const int64_t o0 = (blockIdx.x - args.first_block[i]) * kMmaCols + (threadIdx.x / 32) * 8;
  if (o0 >= O) return;  // the whole warp: no MMA waits for it
  const int64_t s0 = static_cast<int64_t>(blockIdx.y) * 16 * MT, o = o0 + 2 * c, left = S - s0;
  const bool o_ok = o < O;
  const auto* y = reinterpret_cast<const __nv_bfloat16*>(args.y[i]);
  const auto* h = reinterpret_cast<const __nv_bfloat16*>(residual);
  const FragRows<MT> yr(y + s0 * args.y_stride[i] + o, args.y_stride[i], left);
  uint32_t yv[MT][2] = {}, hv[MT][2] = {};
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half)
      if (yr.ok[mt][half] && o_ok) {
        yv[mt][half] = load_pair(yr.p[mt][half]);
        if (h) hv[mt][half] = load_pair(h + (s0 + 16 * mt + g + 8 * half) * O + o);
      }
  float acc[MT][4] = {};
  const FragRows<MT> tr(t + s0 * R + args.col[i], R, left);
  const int r = static_cast<int>(args.rank[i]);
  mma_update<MT>(tr, args.b[i] + (o0 + g) * r, o0 + g < O, r, acc);
  const float scale = args.scale[i];
  auto* out = reinterpret_cast<__nv_bfloat16*>(args.out[i]) + s0 * args.out_stride[i] + o;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      if (!yr.ok[mt][half] || !o_ok) continue;
      const float2 yf = unpack_pair(yv[mt][half]);
      float v0 = round_bf16(yf.x + round_bf16(acc[mt][2 * half] * scale));
      float v1 = round_bf16(yf.y + round_bf16(acc[mt][2 * half + 1] * scale));
      if (h) {
        const float2 hf = unpack_pair(hv[mt][half]);
        v0 = hf.x + v0, v1 = hf.y + v1;
      }
      *reinterpret_cast<__nv_bfloat162*>(out + (16 * mt + g + 8 * half) * args.out_stride[i]) =
          __floats2bfloat162_rn(v0, v1);
    }
}

// The gate/up form (adapters 0 and 1 over the same F columns): out[s, f] = silu_mul of the two updated outputs,
// with lora_expand_silu_kernel's roundings (the division by __fdividef: within 2 float32 ulps before the bf16
// rounding); out is contiguous [S, F].
template <int MT>
__global__ void __launch_bounds__(kMmaWarps * 32) lora_expand_silu_mma_kernel(const __nv_bfloat16* __restrict__ t,
                                                                            int64_t S, int64_t R,
                                                                            ExpandArgs<at::BFloat16> args,
                                                                            at::BFloat16* out) {
  const int64_t F = args.rows[0];
  const int lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const int64_t o0 = static_cast<int64_t>(blockIdx.x) * kMmaCols + (threadIdx.x / 32) * 8;
  if (o0 >= F) return;
  const int64_t s0 = static_cast<int64_t>(blockIdx.y) * 16 * MT, o = o0 + 2 * c, left = S - s0;
  const bool o_ok = o < F;
  const auto* gate = reinterpret_cast<const __nv_bfloat16*>(args.y[0]);
  const auto* up = reinterpret_cast<const __nv_bfloat16*>(args.y[1]);
  const FragRows<MT> gr(gate + s0 * args.y_stride[0] + o, args.y_stride[0], left);
  const FragRows<MT> ur(up + s0 * args.y_stride[1] + o, args.y_stride[1], left);
  uint32_t gv[MT][2] = {}, uv[MT][2] = {};
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half)
      if (gr.ok[mt][half] && o_ok) {
        gv[mt][half] = load_pair(gr.p[mt][half]);
        uv[mt][half] = load_pair(ur.p[mt][half]);
      }
  float acc_g[MT][4] = {}, acc_u[MT][4] = {};
  const auto* tb = reinterpret_cast<const __nv_bfloat16*>(t) + s0 * R;
  const int rg = static_cast<int>(args.rank[0]), ru = static_cast<int>(args.rank[1]);
  const bool n_ok = o0 + g < F;
  mma_update<MT>(FragRows<MT>(tb + args.col[0], R, left), args.b[0] + (o0 + g) * rg, n_ok, rg, acc_g);
  mma_update<MT>(FragRows<MT>(tb + args.col[1], R, left), args.b[1] + (o0 + g) * ru, n_ok, ru, acc_u);
  auto* dst = reinterpret_cast<__nv_bfloat16*>(out) + s0 * F + o;
  const float sg = args.scale[0], su = args.scale[1];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      if (!gr.ok[mt][half] || !o_ok) continue;
      const float2 gf = unpack_pair(gv[mt][half]), uf = unpack_pair(uv[mt][half]);
      float res[2];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float gg = round_bf16((e ? gf.y : gf.x) + round_bf16(acc_g[mt][2 * half + e] * sg));
        const float uu = round_bf16((e ? uf.y : uf.x) + round_bf16(acc_u[mt][2 * half + e] * su));
        res[e] = round_bf16(__fdividef(gg, 1.0f + __expf(-gg))) * uu;
      }
      *reinterpret_cast<__nv_bfloat162*>(dst + (16 * mt + g + 8 * half) * F) = __floats2bfloat162_rn(res[0], res[1]);
    }
}

// lora_expand_rms_norm: a block per row s, a thread per VEC consecutive columns (rms_norm_kernel's mapping up to
// 512 threads): t's row goes to shared memory; each thread's update is Σ_j t[j] ·
// b[o, j] in order for its VEC columns (B's rows, float32, four at a time when r allows), then h = to(h + to(y +
// to(scale · update))), its square summed; after the block sum, out = w · to(h · rms scale) from the thread's own
// h (no second barrier). B is read whole by every row's block (O · r floats from L2).
template <typename T, typename TT, int VEC>
__global__ void __launch_bounds__(512) lora_expand_rms_norm_kernel(const TT* __restrict__ t, int64_t R, int r,
                                                                    const float* __restrict__ b, float scale,
                                                                    const T* __restrict__ y, int64_t y_stride,
                                                                    T* __restrict__ h, const T* __restrict__ w,
                                                                    T* __restrict__ out, int D, float inv_d,
                                                                    float eps) {
  __shared__ float ts[kLoraNormMaxRank];
  const int64_t s = blockIdx.x, base = s * D;
  const bool b4 = r % 4 == 0 && reinterpret_cast<uintptr_t>(b) % 16 == 0;
  for (int j = threadIdx.x; j < r; j += blockDim.x) ts[j] = static_cast<float>(t[s * R + j]);
  __syncthreads();
  float ss = 0.0f;
  for (int i = threadIdx.x * VEC; i < D; i += blockDim.x * VEC) {
    const Vec<T, VEC> yv = load_vec<T, VEC>(y + s * y_stride + i);
    Vec<T, VEC> hv = load_vec<T, VEC>(h + base + i);
    float acc[VEC] = {};
    if (b4) {
#pragma unroll 2
      for (int j = 0; j < r; j += 4) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float4 bv = *reinterpret_cast<const float4*>(b + static_cast<int64_t>(i + e) * r + j);
          acc[e] += ts[j] * bv.x;
          acc[e] += ts[j + 1] * bv.y;
          acc[e] += ts[j + 2] * bv.z;
          acc[e] += ts[j + 3] * bv.w;
        }
      }
    } else {
      for (int j = 0; j < r; ++j)
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[e] += ts[j] * b[static_cast<int64_t>(i + e) * r + j];
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const T v = to<T>(static_cast<float>(yv.v[e]) + static_cast<float>(to<T>(acc[e] * scale)));
      hv.v[e] = to<T>(static_cast<float>(hv.v[e]) + static_cast<float>(v));
      ss += static_cast<float>(hv.v[e]) * static_cast<float>(hv.v[e]);
    }
    store_vec<T, VEC>(h + base + i, hv);
  }
  ss = block_sum(ss);
  rms_apply_row<T, VEC>(h + base, w, out + base, D, rms_scale(ss, inv_d, eps));
}

// Session 8's shrink: a block per (group of up to 4 rank columns, tile of up to 8 rows).
template <typename T>
void shrink_cols(const at::Tensor& x, const ShrinkArgs& args, const at::Tensor& t, bool vec, cudaStream_t stream) {
  const int64_t S = x.size(0), D = x.size(1), R = t.size(1);
  // Four columns and 8 rows a block (x read once per 4 columns, A once per 8 rows); fewer columns, then fewer rows,
  // while the grid would have fewer blocks than a third of the SMs (the reads come from L2: fewer, larger blocks
  // move fewer bytes; batch 64: q/k/v 4 columns, gate/up 4, o 2).
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int tile = kColsTile, C = 4;
  auto blocks = [&] { return ((R + C - 1) / C) * ((S + tile - 1) / tile); };
  while (C > 1 && 3 * blocks() < sms) C /= 2;
  while (tile > 2 && 3 * blocks() < sms) tile /= 2;
  const dim3 grid(static_cast<unsigned>((R + C - 1) / C), static_cast<unsigned>((S + tile - 1) / tile));
  auto run = [&](auto vec_c, auto cols_c) {
    constexpr int V = decltype(vec_c)::value, CC = decltype(cols_c)::value;
    lora_shrink_cols_kernel<T, V, CC><<<grid, kThreads, 0, stream>>>(x.data_ptr<T>(), S, D, args,
                                                                    t.data_ptr<float>(), R, tile);
  };
  auto with_cols = [&](auto vec_c) {
    if (C == 4) run(vec_c, std::integral_constant<int, 4>{});
    else if (C == 2) run(vec_c, std::integral_constant<int, 2>{});
    else run(vec_c, std::integral_constant<int, 1>{});
  };
  if (vec) with_cols(std::integral_constant<int, kVec<T>>{});
  else with_cols(std::integral_constant<int, 1>{});
  check_launch("lora_shrink_cols_kernel");
}

// K split across blocks (lora_shrink_split_kernel).
template <typename T>
void shrink_split(const at::Tensor& x, const ShrinkArgs& args, const at::Tensor& t, bool vec, cudaStream_t stream) {
  const int64_t S = x.size(0), D = x.size(1), R = t.size(1);
  // K split until the grid has about one block per SM (batch 64: 4 row tiles; down 29 splits of 3 chunks), at
  // most 32 splits (the last block's sum over them is the launch's serial tail); none once the row tiles fill the
  // GPU.
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t tiles = (S + kShrinkRows - 1) / kShrinkRows, chunks = (D + kShrinkK - 1) / kShrinkK;
  int64_t splits = tiles > kMaxShrinkTiles
                       ? 1
                       : std::clamp((sms + tiles - 1) / tiles, int64_t{1}, std::min<int64_t>(chunks, kMaxSplits));
  const int64_t per_split = (chunks + splits - 1) / splits;
  splits = (chunks + per_split - 1) / per_split;
  const at::Tensor part = splits > 1 ? at::empty({splits, S, R}, t.options()) : at::Tensor();
  const dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(tiles));
  auto run = [&](auto kernel) {
    kernel<<<grid, kThreads, 0, stream>>>(x.data_ptr<T>(), S, D, args, R, static_cast<int>(per_split),
                                          part.defined() ? part.data_ptr<float>() : nullptr, t.data_ptr<float>());
  };
  if (vec) run(lora_shrink_split_kernel<T, true>);
  else run(lora_shrink_split_kernel<T, false>);
  check_launch("lora_shrink_split_kernel");
}

// The split kernel where it measured faster (H100, batch 64, session 9: the down projection's shrink over 11008
// inputs 12.6 µs against 23.5); elsewhere its extra round trips (partials, counter, the last block's sum) cost
// more than they save (q/k/v 10.0 µs against 7.6; batch 8 decode 1,564 tok/s against 1,750).
bool split_wins(int64_t S, int64_t D) { return D >= kSplitMinInputs && S >= kSplitMinRows; }

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
  bool vec = D % kVec<T> == 0 && aligned16(x.data_ptr());
  for (const auto& ai : a) vec = vec && aligned16(ai.data_ptr());  // rows of D floats: aligned when D % 4 == 0
  cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  if (split_wins(S, D)) shrink_split<T>(x, args, t, vec, stream);
  else shrink_cols<T>(x, args, t, vec, stream);
}

// The expand's kernel arguments for adapters b (columns of t in order) and a block per block_cols columns of each.
template <typename T>
ExpandArgs<T> expand_args(const std::vector<at::Tensor>& b, const std::vector<double>& scales,
                          const std::vector<at::Tensor>& ys, const std::vector<at::Tensor>& outs,
                          int64_t block_cols = kExpandCols) {
  ExpandArgs<T> args{};
  int64_t col = 0, blocks = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    args.b[i] = b[i].data_ptr<float>();
    args.y[i] = ys[i].data_ptr<T>();
    args.out[i] = outs.empty() ? nullptr : outs[i].data_ptr<T>();
    args.rows[i] = b[i].size(0);
    args.rank[i] = b[i].size(1);
    args.col[i] = col;
    args.y_stride[i] = ys[i].stride(0);
    args.out_stride[i] = outs.empty() ? 0 : outs[i].stride(0);
    args.scale[i] = static_cast<float>(scales[i]);
    args.first_block[i] = blocks;
    col += b[i].size(1);
    blocks += (b[i].size(0) + block_cols - 1) / block_cols;
  }
  args.first_block[b.size()] = blocks;
  args.count = static_cast<int>(b.size());
  return args;
}

// The expand grid (`blocks` column tiles × row tiles of up to ROWS = kernels::lora_expand_rows() rows, each thread
// reusing its B chunk over them; fewer rows while the grid would leave SMs idle) and t's element type — float32
// (lora_shrink's) or the outputs' (columns of a base GEMM's output): launch(tp, grid, tile, ROWS as an
// integral_constant) with tp typed accordingly, on t's device; nothing when empty.
template <typename T, typename Launch>
void launch_expand(const at::Tensor& t, int64_t blocks, Launch&& launch) {
  const int64_t S = t.size(0);
  if (blocks == 0 || S == 0) return;
  const c10::cuda::CUDAGuard guard(t.device());
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int rows = lora_expand_rows();
  int tile = rows;
  while (tile > 1 && blocks * ((S + tile - 1) / tile) < 2 * sms) tile /= 2;
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>((S + tile - 1) / tile));
  auto with_rows = [&](auto rows_tag) {
    if (t.scalar_type() == at::kFloat) launch(static_cast<const float*>(t.data_ptr()), grid, tile, rows_tag);
    else launch(static_cast<const T*>(t.data_ptr()), grid, tile, rows_tag);
  };
  if (rows == 4) with_rows(std::integral_constant<int, 4>{});
  else with_rows(std::integral_constant<int, 8>{});
}

// Whether the tensor-core expand serves (kernels::lora_expand_mma): bf16 t (a base GEMM's columns) and outputs,
// every bf16 pair it moves 4-byte aligned (even ranks, widths and row strides), B's float pairs 8-byte aligned.
bool mma_expand_fits(const at::Tensor& t, const std::vector<at::Tensor>& b, const std::vector<at::Tensor>& ys,
                     const std::vector<at::Tensor>& outs, const at::Tensor& extra) {
  auto aligned = [](const at::Tensor& x, int64_t bytes) {
    return reinterpret_cast<uintptr_t>(x.data_ptr()) % bytes == 0;
  };
  if (!lora_expand_mma() || t.scalar_type() != at::kBFloat16 || ys[0].scalar_type() != at::kBFloat16) return false;
  if (t.stride(1) != 1 || t.stride(0) % 2 != 0 || !aligned(t, 4)) return false;
  for (size_t i = 0; i < b.size(); ++i) {
    if (b[i].size(1) % 2 != 0 || b[i].size(0) % 2 != 0 || !aligned(b[i], 8)) return false;
    if (ys[i].stride(0) % 2 != 0 || !aligned(ys[i], 4)) return false;
    if (!outs.empty() && (outs[i].stride(0) % 2 != 0 || !aligned(outs[i], 4))) return false;
  }
  return !extra.defined() || aligned(extra, 4);
}

// The tensor-core expand's grid (`blocks` of 32 columns × row tiles of 16·MT rows): MT = 4 while that leaves at
// least 16 warps an SM, else 2 (batch-64 gate/up: 2,752 warps) or 1 (more, shorter warps for narrow outputs).
template <typename Launch>
void launch_expand_mma(const at::Tensor& t, int64_t blocks, Launch&& launch) {
  const int64_t S = t.size(0);
  if (blocks == 0 || S == 0) return;
  const c10::cuda::CUDAGuard guard(t.device());
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  auto tiles = [&](int mt) { return (S + 16 * mt - 1) / (16 * mt); };
  int mt = 4;
  while (mt > 1 && blocks * kMmaWarps * tiles(mt) < 16 * sms) mt /= 2;
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(tiles(mt)));
  const auto* tp = static_cast<const __nv_bfloat16*>(t.data_ptr());
  if (mt == 4) launch(tp, grid, std::integral_constant<int, 4>{});
  else if (mt == 2) launch(tp, grid, std::integral_constant<int, 2>{});
  else launch(tp, grid, std::integral_constant<int, 1>{});
}

template <typename T>
void expand(const at::Tensor& t, const std::vector<at::Tensor>& b, const std::vector<double>& scales,
            const std::vector<at::Tensor>& ys, const at::Tensor& residual, const std::vector<at::Tensor>& outs) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (mma_expand_fits(t, b, ys, outs, residual)) {
      const ExpandArgs<T> args = expand_args<T>(b, scales, ys, outs, kMmaCols);
      launch_expand_mma(t, args.first_block[b.size()], [&](const __nv_bfloat16* tp, dim3 grid, auto mt) {
        lora_expand_mma_kernel<decltype(mt)::value><<<grid, kMmaWarps * 32, 0, at::cuda::getCurrentCUDAStream()>>>(
            tp, t.size(0), t.stride(0), args, residual.defined() ? residual.data_ptr<T>() : nullptr);
        check_launch("lora_expand_mma_kernel");
      });
      return;
    }
  }
  const ExpandArgs<T> args = expand_args<T>(b, scales, ys, outs);
  launch_expand<T>(t, args.first_block[b.size()], [&](auto* tp, dim3 grid, int tile, auto rows_tag) {
    using TT = std::remove_const_t<std::remove_pointer_t<decltype(tp)>>;
    lora_expand_kernel<T, TT, decltype(rows_tag)::value><<<grid, kExpandCols, 0, at::cuda::getCurrentCUDAStream()>>>(
        tp, t.size(0), t.stride(0), args, residual.defined() ? residual.data_ptr<T>() : nullptr, tile);
    check_launch("lora_expand_kernel");
  });
}

template <typename T>
void expand_silu(const at::Tensor& t, const std::vector<at::Tensor>& b, const std::vector<double>& scales,
                 const at::Tensor& gate, const at::Tensor& up, const at::Tensor& out) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (mma_expand_fits(t, b, {gate, up}, {}, out)) {
      const ExpandArgs<T> args = expand_args<T>(b, scales, {gate, up}, {}, kMmaCols);
      launch_expand_mma(t, (gate.size(1) + kMmaCols - 1) / kMmaCols, [&](const __nv_bfloat16* tp, dim3 grid, auto mt) {
        lora_expand_silu_mma_kernel<decltype(mt)::value><<<grid, kMmaWarps * 32, 0,
                                                           at::cuda::getCurrentCUDAStream()>>>(
            tp, t.size(0), t.stride(0), args, out.data_ptr<T>());
        check_launch("lora_expand_silu_mma_kernel");
      });
      return;
    }
  }
  const ExpandArgs<T> args = expand_args<T>(b, scales, {gate, up}, {});
  launch_expand<T>(t, (gate.size(1) + kExpandCols - 1) / kExpandCols, [&](auto* tp, dim3 grid, int tile,
                                                                          auto rows_tag) {
    using TT = std::remove_const_t<std::remove_pointer_t<decltype(tp)>>;
    lora_expand_silu_kernel<T, TT, decltype(rows_tag)::value><<<grid, kExpandCols, 0, at::cuda::getCurrentCUDAStream()>>>(
        tp, t.size(0), t.stride(0), args, out.data_ptr<T>(), tile);
    check_launch("lora_expand_silu_kernel");
  });
}

template <typename T>
void expand_rms_norm(const at::Tensor& t, const at::Tensor& b, double scale, const at::Tensor& y, const at::Tensor& h,
                     const at::Tensor& w, double eps, const at::Tensor& out) {
  const int64_t S = h.size(0);
  const int D = static_cast<int>(h.size(1));
  if (S == 0) return;
  const c10::cuda::CUDAGuard guard(h.device());
  // rms_norm's launch (a 16-byte vector a thread: the sums of squares meet in the same order) up to 512 threads
  // (D = 4096 in bf16); wider rows take several vectors a thread.
  const int threads = std::clamp((D / kVec<T> + 31) / 32 * 32, 32, 512);
  auto run = [&](const auto* tp) {
    using TT = std::remove_const_t<std::remove_pointer_t<decltype(tp)>>;
    lora_expand_rms_norm_kernel<T, TT, kVec<T>><<<S, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
        tp, t.stride(0), static_cast<int>(b.size(1)), b.data_ptr<float>(), static_cast<float>(scale),
        y.data_ptr<T>(), y.stride(0), h.data_ptr<T>(), w.data_ptr<T>(), out.data_ptr<T>(), D,
        1.0f / static_cast<float>(D), static_cast<float>(eps));
  };
  if (t.scalar_type() == at::kFloat) run(t.data_ptr<float>());
  else run(t.data_ptr<T>());
  check_launch("lora_expand_rms_norm_kernel");
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

void lora_expand_silu_mul_cuda(const at::Tensor& t, const std::vector<at::Tensor>& b, const std::vector<double>& scales,
                               const at::Tensor& gate, const at::Tensor& up, const at::Tensor& out) {
  if (gate.scalar_type() == at::kFloat) expand_silu<float>(t, b, scales, gate, up, out);
  else expand_silu<at::BFloat16>(t, b, scales, gate, up, out);
}

void lora_expand_rms_norm_cuda(const at::Tensor& t, const at::Tensor& b, double scale, const at::Tensor& y,
                               const at::Tensor& h, const at::Tensor& w, double eps, const at::Tensor& out) {
  if (h.scalar_type() == at::kFloat) expand_rms_norm<float>(t, b, scale, y, h, w, eps, out);
  else expand_rms_norm<at::BFloat16>(t, b, scale, y, h, w, eps, out);
}

}  // namespace rlaif::kernels
