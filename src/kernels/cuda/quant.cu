// MLX affine quantization on the GPU: quantize (live re-quantization of trainer weights), dequantize, and
// x · dequant(W)ᵀ — a GEMV kernel for ≤ 8 rows that streams the packed words once (16-byte loads, several in
// flight, nibbles turned into floats by byte permutes) with float32 sums, and for more bf16 rows mma.sync on W
// dequantized in registers, split over K (or, where that kernel cannot serve, a dequantized scratch matrix
// multiplied by cuBLAS). Quantize and dequantize use round-to-nearest float32 ops without contraction (__f*_rn), so
// they equal the CPU reference bit for bit.
#include "kernels/cuda/quant.h"

#include <cuda_bf16.h>

#include <algorithm>

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


// ---- Tensor-core path (quant_linear_mma): bf16 x with more rows than the GEMV takes ----
// out[N, O] = x · Wᵀ with W dequantized in registers to bf16 (dequantize_kernel's values, rounded as the
// dequantize + cuBLAS path does) and fed to mma.sync m16n8k16 with float32 accumulation. Block: 4 warps, 64 rows
// of W (16 per warp: the MMA's M) × 64 rows of x (eight 8-wide MMA N tiles); K in chunks of 64. Within a chunk the
// dot product's k order is permuted (it is a sum): for thread (g = lane/4, t = lane%4), the MMA's k columns
// {2t, 2t+1, 2t+8, 2t+9} of k-step s are the chunk's columns 16t + 4s + {0,1,2,3}. So each thread reads one
// contiguous 16-column slice of its two W rows per chunk (8 bytes q4, 16 bytes q8, one group) and one 16-byte
// shared-memory read of x per N tile and pair of k-steps (rows padded by 16 bytes: no bank conflicts).
constexpr int kMmaRows = 64, kMmaCols = 64, kMmaK = 64, kMmaThreads = 128;
constexpr int kXRow = kMmaK + 8;  // bf16 per x row in shared memory

// A thread's 16 quantized values of one W row in one chunk: q4 two words, q8 four.
template <int BITS>
using WSlice = Words<BITS / 2>;

// The slice's 16 values in order, as exact floats (unpack_word's byte permute, not a shift, mask and convert each).
template <int BITS>
__device__ __forceinline__ void slice_values(const WSlice<BITS>& s, float (&v)[16]) {
  constexpr int kPer = 32 / BITS;
#pragma unroll
  for (int i = 0; i < BITS / 2; ++i) {
    float q[kPer];
    unpack_word<BITS>(s.w[i], q);
#pragma unroll
    for (int j = 0; j < kPer; ++j) v[i * kPer + j] = q[j];
  }
}

// The A fragments of a chunk's 4 k-steps from this thread's slices of W rows g (w0) and g + 8 (w1): values 4s ..
// 4s+3 of the slice for k-step s, dequantize_kernel's scale·q + bias rounded to bf16.
template <int BITS>
__device__ __forceinline__ void a_fragments(const WSlice<BITS>& w0, float s0, float b0, const WSlice<BITS>& w1,
                                            float s1, float b1, uint32_t (&a)[4][4]) {
  float q0[16], q1[16];
  slice_values<BITS>(w0, q0);
  slice_values<BITS>(w1, q1);
#pragma unroll
  for (int st = 0; st < 4; ++st) {
    float v[2][4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      v[0][e] = __fadd_rn(__fmul_rn(s0, q0[4 * st + e]), b0);
      v[1][e] = __fadd_rn(__fmul_rn(s1, q1[4 * st + e]), b1);
    }
    a[st][0] = pack_bf16(v[0][0], v[0][1]);  // row g, k 2t, 2t+1
    a[st][1] = pack_bf16(v[1][0], v[1][1]);  // row g+8
    a[st][2] = pack_bf16(v[0][2], v[0][3]);  // row g, k 2t+8, 2t+9
    a[st][3] = pack_bf16(v[1][2], v[1][3]);  // row g+8
  }
}

// acc[j] += the chunk's A · the x tile's rows 8j .. 8j+7 (xs: the chunk's [64][kXRow] x tile), for the N tiles
// inside the rows.
__device__ __forceinline__ void mma_chunk(const __nv_bfloat16 (*xs)[kXRow], const uint32_t (&a)[4][4], int g, int t,
                                          int64_t n0, int64_t N, float (&acc)[8][4]) {
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    if (n0 + j * 8 >= N) break;  // uniform: N tiles past the rows
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      // x row 8j + g, chunk columns 16t + 8u .. +7: the B fragments of k-steps 2u and 2u+1.
      const uint4 xv = *reinterpret_cast<const uint4*>(&xs[j * 8 + g][16 * t + 8 * u]);
      mma_bf16(acc[j], a[2 * u], xv.x, xv.y);
      mma_bf16(acc[j], a[2 * u + 1], xv.z, xv.w);
    }
  }
}

// C fragment: acc[j] = W rows r0 (e 0, 1) and r1 (e 2, 3) for x rows n0 + 8j + 2t, + 1: bf16 into out, or float32
// partial sums into part[split] when K is split.
__device__ __forceinline__ void store_tile(const float (&acc)[8][4], int64_t r0, int64_t r1, int t, int64_t n0,
                                          int64_t N, int64_t O, __nv_bfloat16* out, float* part) {
#pragma unroll
  for (int j = 0; j < 8; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t n = n0 + j * 8 + 2 * t + (e & 1), r = e < 2 ? r0 : r1;
      if (n >= N || r >= O) continue;
      if (part != nullptr) part[(blockIdx.z * N + n) * O + r] = acc[j][e];
      else out[n * O + r] = __float2bfloat16_rn(acc[j][e]);
    }
  }
}

// grid (ceil(O / 64), ceil(N / 64), splits), 128 threads. K % 64 == 0, group % 16 == 0, x rows 16-byte aligned.
// Split z takes chunks [z·per_split, (z+1)·per_split) of K: with one split the block writes bf16 `out`, else its
// float32 partial sums to part[z][n][r] (split_reduce_kernel adds them). Splitting K keeps every SM busy when
// O/64 · N/64 blocks would not (a 2048-row projection at 64 rows is 32 blocks).
template <typename S, int BITS>
__global__ void __launch_bounds__(kMmaThreads)
    mma_kernel(const __nv_bfloat16* __restrict__ x, int64_t x_stride, const uint32_t* __restrict__ wq,
               const S* __restrict__ scales, const S* __restrict__ biases, int64_t O, int64_t N, int64_t K,
               int group, int per_split, __nv_bfloat16* __restrict__ out, float* __restrict__ part) {
  __shared__ __align__(16) __nv_bfloat16 xs[2][kMmaCols][kXRow];
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kMmaRows, n0 = static_cast<int64_t>(blockIdx.y) * kMmaCols;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t words = K * BITS / 32, groups = K / group;
  const int64_t r0 = m0 + warp * 16 + g, r1 = r0 + 8;  // this thread's two W rows
  const bool ok0 = r0 < O, ok1 = r1 < O;
  const int chunk_begin = static_cast<int>(blockIdx.z) * per_split;
  const int chunk_end = min(static_cast<int>(K / kMmaK), chunk_begin + per_split);

  auto load_x = [&](int buf, int chunk) {
    const int64_t k0 = static_cast<int64_t>(chunk) * kMmaK;
    for (int i = threadIdx.x; i < kMmaCols * (kMmaK / 8); i += kMmaThreads) {
      const int r = i / (kMmaK / 8), c = i % (kMmaK / 8);
      __nv_bfloat16* dst = &xs[buf][r][c * 8];
      if (n0 + r < N) cp_async16(dst, x + (n0 + r) * x_stride + k0 + c * 8);
      else *reinterpret_cast<int4*>(dst) = make_int4(0, 0, 0, 0);
    }
    cp_async_commit();
  };
  // Column of this thread's slice in a chunk, and the slice's words within a row.
  auto slice_of = [&](int64_t row, int chunk) {
    return wq + row * words + (static_cast<int64_t>(chunk) * kMmaK + 16 * t) * BITS / 32;
  };
  auto group_of = [&](int chunk) { return (static_cast<int64_t>(chunk) * kMmaK + 16 * t) / group; };

  float acc[8][4];
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0.0f;

  // This thread's W slices and their groups' scale and bias for a chunk (zeros past the last row).
  struct Operand {
    WSlice<BITS> w0{}, w1{};
    float s0 = 0.0f, b0 = 0.0f, s1 = 0.0f, b1 = 0.0f;
  };
  auto load_operand = [&](int chunk) {
    Operand o;
    const int64_t gi = group_of(chunk);
    if (ok0) {
      o.w0 = load_words<BITS / 2>(slice_of(r0, chunk));
      o.s0 = as_float(scales[r0 * groups + gi]);
      o.b0 = as_float(biases[r0 * groups + gi]);
    }
    if (ok1) {
      o.w1 = load_words<BITS / 2>(slice_of(r1, chunk));
      o.s1 = as_float(scales[r1 * groups + gi]);
      o.b1 = as_float(biases[r1 * groups + gi]);
    }
    return o;
  };
  Operand cur = load_operand(chunk_begin);
  load_x(0, chunk_begin);
  for (int chunk = chunk_begin; chunk < chunk_end; ++chunk) {
    const int buf = (chunk - chunk_begin) & 1;
    // The next chunk's x into the other buffer and its W operand into registers while this one computes.
    Operand next;
    if (chunk + 1 < chunk_end) {
      load_x(buf ^ 1, chunk + 1);
      next = load_operand(chunk + 1);
    }
    uint32_t a[4][4];
    a_fragments<BITS>(cur.w0, cur.s0, cur.b0, cur.w1, cur.s1, cur.b1, a);
    if (chunk + 1 < chunk_end) cp_async_wait<1>();
    else cp_async_wait<0>();
    __syncthreads();  // this chunk's x tile landed for every thread
    mma_chunk(xs[buf], a, g, t, n0, N, acc);
    __syncthreads();  // every warp is done with buf before the next iteration's copy into it
    cur = next;
  }
  store_tile(acc, r0, r1, t, n0, N, O, out, part);
}

// out[i] = bf16(Σ_z part[z][i]) over `splits` partial sums of `count` elements.
__global__ void split_reduce_kernel(const float* __restrict__ part, int64_t count, int splits,
                                    __nv_bfloat16* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  float sum = 0.0f;
  for (int z = 0; z < splits; ++z) sum += part[z * count + i];
  out[i] = __float2bfloat16_rn(sum);
}

// What mma_kernel needs: bf16 x, whole 64-column chunks, 16-value slices inside a group, 16-byte aligned rows.
bool mma_takes(const at::Tensor& x, const at::Tensor& wq, int64_t group_size) {
  return x.scalar_type() == at::kBFloat16 && x.size(1) % kMmaK == 0 && group_size % 16 == 0 &&
         x.stride(0) % 8 == 0 && aligned16(x.data_ptr()) && aligned16(wq.data_ptr());
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

void quant_linear_mma_cuda(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
                           const at::Tensor& biases, int64_t bits, int64_t group_size, const at::Tensor& out) {
  const int64_t N = x.size(0), O = wq.size(0), K = x.size(1);
  if (N == 0 || O == 0) return;
  RLAIF_CHECK(mma_takes(x, wq, group_size),
              "quant_linear_mma: needs bfloat16 x with K % 64 == 0 (got {}), group_size % 16 == 0 (got {}) and "
              "16-byte aligned rows", K, group_size);
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // Split K until the grid holds about three blocks per multiprocessor, each split at least 4 chunks of 64.
  const int64_t tiles = static_cast<int64_t>(blocks_for(O, kMmaRows)) * blocks_for(N, kMmaCols);
  const int64_t chunks = K / kMmaK, want = 3 * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t splits = std::max<int64_t>(1, std::min((want + tiles - 1) / tiles, chunks / 4));
  const int per_split = static_cast<int>((chunks + splits - 1) / splits);
  splits = (chunks + per_split - 1) / per_split;
  at::Tensor part;
  if (splits > 1) part = at::empty({splits, N, O}, x.options().dtype(at::kFloat));
  const dim3 grid(blocks_for(O, kMmaRows), blocks_for(N, kMmaCols), static_cast<unsigned>(splits));
  const auto* xp = reinterpret_cast<const __nv_bfloat16*>(x.data_ptr());
  auto* op = reinterpret_cast<__nv_bfloat16*>(out.data_ptr());
  float* pp = part.defined() ? part.data_ptr<float>() : nullptr;
  const auto* w = reinterpret_cast<const uint32_t*>(wq.data_ptr());
  dispatch_scale(scales.scalar_type(), [&](auto s_tag) {
    using S = decltype(s_tag);
    const S* sp = scales.data_ptr<S>();
    const S* bp = biases.data_ptr<S>();
    if (bits == 4) {
      mma_kernel<S, 4><<<grid, kMmaThreads, 0, stream>>>(xp, x.stride(0), w, sp, bp, O, N, K,
                                                         static_cast<int>(group_size), per_split, op, pp);
    } else {
      mma_kernel<S, 8><<<grid, kMmaThreads, 0, stream>>>(xp, x.stride(0), w, sp, bp, O, N, K,
                                                         static_cast<int>(group_size), per_split, op, pp);
    }
  });
  check_launch("mma_kernel");
  if (splits > 1) {
    split_reduce_kernel<<<blocks_for(N * O, kThreads), kThreads, 0, stream>>>(pp, N * O, static_cast<int>(splits),
                                                                              op);
    check_launch("split_reduce_kernel");
  }
}

void quant_linear_cuda(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales, const at::Tensor& biases,
                       int64_t bits, int64_t group_size, const at::Tensor& out) {
  const int64_t N = x.size(0);
  if (N == 0 || wq.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (N > kMaxGemvRows) {
    // Many rows, bf16: W dequantized in registers into mma.sync (split over K to fill the GPU), the same bf16-rounded
    // weights the dequantize + cuBLAS path below multiplies without writing and re-reading them.
    if (mma_takes(x, wq, group_size)) {
      quant_linear_mma_cuda(x, wq, scales, biases, bits, group_size, out);
      return;
    }
    // Else one dequantized copy of W in x's dtype, then the tensor cores through cuBLAS.
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
