// Few-row projections with MLX affine-quantized weights: a warp per output row, or per part of a long row (a
// SwiGLU warp takes the gate and the up row together), lanes over the row's 16-byte chunks of packed words (32
// values at 4 bits, 16 at 8; a chunk lies in one group), up to four chunks a lane per weight row in flight,
// requested before the block's staging and, for a warp's next row, before the current row's sums and epilogue.
// Every block stages the N ≤ 8 input rows in shared memory as float32 — normalised by the fused RMSNorm when
// there is one — together with each chunk's sum of x, so a chunk costs Σ x·q per row plus one s·Σx·q + b·Σx: the
// dequantization's scale and bias leave the inner loop. x is laid out chunk-interleaved ([row][float4 of the
// chunk][chunk]), so the 32 lanes' reads of their chunks' x are consecutive 16-byte words (no bank conflicts).
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

constexpr int kU = 4;  // 16-byte chunks a lane has in flight per weight row (one round of a part)

// A lane's round of one weight row: chunks c0, c0 + 32, ... below c_end (at most kU), with their groups' scale and
// bias, loaded into registers (issued early, consumed later).
template <typename S>
struct RowLoad {
  uint4 w[kU];
  float s[kU], b[kU];

  __device__ __forceinline__ void issue(const uint4* __restrict__ row, const S* __restrict__ scales,
                                        const S* __restrict__ biases, int64_t c0, int64_t c_end, int cpg_shift) {
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t c = c0 + u * 32;
      if (c < c_end) w[u] = __ldcs(row + c);
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t c = c0 + u * 32;
      if (c < c_end) {
        s[u] = static_cast<float>(scales[c >> cpg_shift]);
        b[u] = static_cast<float>(biases[c >> cpg_shift]);
      }
    }
  }
};

// acc[n] += s·Σ x·q + b·Σ x over the round's chunks (loaded by ld.issue with the same c0, c_end).
template <typename S, int BITS, int N>
__device__ __forceinline__ void fma_round(const Stage& st, const RowLoad<S>& ld, int64_t c0, int64_t c_end,
                                          float (&acc)[N]) {
  constexpr int kPer = 32 / BITS, kF4 = 128 / BITS / 4;
  const int64_t C = st.C;
#pragma unroll
  for (int u = 0; u < kU; ++u) {
    const int64_t c = c0 + u * 32;
    if (c >= c_end) break;
    const uint32_t words[4] = {ld.w[u].x, ld.w[u].y, ld.w[u].z, ld.w[u].w};
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
    for (int n = 0; n < N; ++n) acc[n] = fmaf(ld.s[u], dq[n], fmaf(ld.b[u], st.sums[n * C + c], acc[n]));
  }
}

// Where a work item lies: item = (output row over the segments in order) · split + part.
struct Item {
  int si = 0;
  int64_t row = 0;
  int part = 0;
};

// One kernel for both ops. Work item: one output row's part [part·P, min(C, (part+1)·P)) of its chunks (a row of
// more than 32·kU chunks is split over `split` consecutive warps of a block, their sums met in shared memory); for
// SILU an item is the gate row and the up row together (segments 0 and 1). A warp requests its first item's
// weights before the block stages x, and each next item's right after the current one's arithmetic (its sums, the
// meeting of the parts and the epilogue run while they arrive), one item further ahead prefetched to L2. The grid
// covers every item once (capped at 16 blocks per SM: a 151936-row head takes ~9 items a warp).
template <typename T, typename S, int BITS, int N, bool SILU>
__global__ void __launch_bounds__(kThreads)
    quant_small_linear_kernel(const T* __restrict__ x, int rows, int64_t K, QSegments<T, S> segs,
                              const T* residual, const T* norm_w, float eps, T* normed, int cpg_shift, int split,
                              int64_t part_chunks) {
  constexpr int kW = SILU ? 2 : 1;  // weight rows an item reads
  const int64_t C = K * BITS / 128, groups = C >> cpg_shift;
  int64_t out_rows = 0;
  for (int i = 0; i < (SILU ? 1 : segs.count); ++i) out_rows += segs.s[i].rows;
  const int64_t items = out_rows * split, stride = static_cast<int64_t>(gridDim.x) * kWarps;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  auto locate = [&](int64_t item) {
    Item it;
    it.part = static_cast<int>(item % split);
    it.row = item / split;
    if constexpr (!SILU)
      while (it.si + 1 < segs.count && it.row >= segs.s[it.si].rows) it.row -= segs.s[it.si++].rows;
    return it;
  };
  RowLoad<S> ld[kW];
  auto weight_of = [&](const Item& it, int k) -> const QSegment<T, S>& { return segs.s[SILU ? k : it.si]; };
  auto issue = [&](const Item& it) {
    const int64_t cb = it.part * part_chunks, ce = min(C, cb + part_chunks);
#pragma unroll
    for (int k = 0; k < kW; ++k) {
      const QSegment<T, S>& seg = weight_of(it, k);
      ld[k].issue(seg.w + it.row * C, seg.scales + it.row * groups, seg.biases + it.row * groups, cb + lane, ce,
                  cpg_shift);
    }
  };
  auto prefetch = [&](int64_t item) {
    if (item >= items) return;
    const Item it = locate(item);
    const int64_t cb = it.part * part_chunks, ce = min(C, cb + part_chunks);
#pragma unroll
    for (int k = 0; k < kW; ++k) {
      const QSegment<T, S>& seg = weight_of(it, k);
      prefetch_row(seg.w + it.row * C + cb, (ce - cb) * 16, seg.scales + it.row * groups,
                   seg.biases + it.row * groups, groups * static_cast<int64_t>(sizeof(S)));
    }
  };
  const int64_t base0 = static_cast<int64_t>(blockIdx.x) * kWarps;
  if (base0 + warp < items) issue(locate(base0 + warp));
  prefetch(base0 + warp + stride);
  const Stage st = stage_rows<T, N, 128 / BITS>(x, rows, K, norm_w, eps, normed);
  __shared__ float parts[kWarps][kW][N];
  for (int64_t base = base0; base < items; base += stride) {  // block-uniform: every warp meets the barriers
    const int64_t item = base + warp;
    const bool valid = item < items;
    const Item it = valid ? locate(item) : Item{};
    float acc[kW][N];
#pragma unroll
    for (int k = 0; k < kW; ++k)
#pragma unroll
      for (int n = 0; n < N; ++n) acc[k][n] = 0.0f;
    if (valid) {
      const int64_t cb = it.part * part_chunks, ce = min(C, cb + part_chunks);
#pragma unroll
      for (int k = 0; k < kW; ++k) {
        fma_round<S, BITS, N>(st, ld[k], cb + lane, ce, acc[k]);
        // A part longer than one round (inputs beyond 32·kU·8 chunks): its later rounds one after another.
        const QSegment<T, S>& seg = weight_of(it, k);
        for (int64_t r = cb + 32 * kU; r < ce; r += 32 * kU) {
          ld[k].issue(seg.w + it.row * C, seg.scales + it.row * groups, seg.biases + it.row * groups, r + lane, ce,
                      cpg_shift);
          fma_round<S, BITS, N>(st, ld[k], r + lane, ce, acc[k]);
        }
      }
    }
    if (item + stride < items) {
      issue(locate(item + stride));
      prefetch(item + 2 * stride);
    }
#pragma unroll
    for (int k = 0; k < kW; ++k)
#pragma unroll
      for (int n = 0; n < N; ++n) acc[k][n] = warp_sum(acc[k][n]);
    if (split > 1) {
      if (lane == 0)
#pragma unroll
        for (int k = 0; k < kW; ++k)
#pragma unroll
          for (int n = 0; n < N; ++n) parts[warp][k][n] = acc[k][n];
      __syncthreads();
      if (valid && it.part == 0)
#pragma unroll
        for (int k = 0; k < kW; ++k)
#pragma unroll
          for (int n = 0; n < N; ++n) {
            float sum = 0.0f;
            for (int j = 0; j < split; ++j) sum += parts[warp + j][k][n];
            acc[k][n] = sum;
          }
      __syncthreads();
    }
    if (!valid || it.part != 0) continue;
#pragma unroll
    for (int n = 0; n < N; ++n) {
      if (lane != n || n >= rows) continue;
      if constexpr (SILU) {
        const int64_t F = segs.s[0].rows;
        const float gf = static_cast<float>(to<T>(acc[0][n]));
        const T silu = to<T>(gf / (1.0f + expf(-gf)));  // kernels/cpu/silu_mul.h's two roundings
        segs.s[0].out[n * F + it.row] = to<T>(static_cast<float>(silu) * static_cast<float>(to<T>(acc[1][n])));
      } else {
        const QSegment<T, S>& seg = segs.s[it.si];
        const int64_t at = n * seg.rows + it.row;
        T y = to<T>(acc[0][n]);
        if (seg.bias) y = to<T>(static_cast<float>(y) + static_cast<float>(seg.bias[it.row]));
        if (residual) y = to<T>(static_cast<float>(residual[at]) + static_cast<float>(y));
        seg.out[at] = y;
      }
    }
  }
}

// The launch shape for rows of C chunks: the fewest warps a row (1, 2, 4 or 8) whose parts fit one round of kU
// chunks a lane (more warps and rounds beyond 8·32·kU chunks), and the blocks to cover every item, at most 16 per
// multiprocessor.
struct Shape {
  int split = 1;
  int64_t part_chunks = 0;
  unsigned blocks = 1;
};
Shape shape_for(int64_t out_rows, int64_t C) {
  Shape sh;
  while (sh.split < kWarps && (C + sh.split - 1) / sh.split > 32 * kU) sh.split *= 2;
  sh.part_chunks = (C + sh.split - 1) / sh.split;
  const int64_t cap = 16 * static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  sh.blocks = static_cast<unsigned>(std::max<int64_t>(1, std::min((out_rows * sh.split + kWarps - 1) / kWarps, cap)));
  return sh;
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

// Launches the kernel for `segs` (SILU: gate and up) over x, with N rounded up to 1, 2, 4 or 8.
template <bool SILU, typename T, typename S, int BITS>
void launch(const at::Tensor& x, const QSegments<T, S>& segs, const at::Tensor& residual, const InputNorm& norm,
            int cpg_shift) {
  const int64_t N = x.size(0), K = x.size(1);
  int64_t out_rows = 0;
  for (int i = 0; i < (SILU ? 1 : segs.count); ++i) out_rows += segs.s[i].rows;
  const Shape sh = shape_for(out_rows, K * BITS / 128);
  const T* nw = norm.weight.defined() ? static_cast<const T*>(norm.weight.data_ptr()) : nullptr;
  T* normed = norm.normed.defined() ? static_cast<T*>(norm.normed.data_ptr()) : nullptr;
  const T* res = residual.defined() ? static_cast<const T*>(residual.data_ptr()) : nullptr;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  RLAIF_QUANT_ROWS(N, {
    auto kernel = quant_small_linear_kernel<T, S, BITS, R, SILU>;
    const size_t smem = static_cast<size_t>(quant_small_linear_stage_bytes(R, K, BITS));
    allow_dynamic_smem(kernel, smem, SILU ? "quant_small_linear_silu_mul" : "quant_small_linear");
    kernel<<<sh.blocks, kThreads, smem, stream>>>(static_cast<const T*>(x.data_ptr()), static_cast<int>(N), K, segs,
                                                  res, nw, static_cast<float>(norm.eps), normed, cpg_shift, sh.split,
                                                  sh.part_chunks);
  });
  check_launch(SILU ? "quant_small_linear_kernel (silu_mul)" : "quant_small_linear_kernel");
}

}  // namespace

void quant_small_linear_cuda(const at::Tensor& x, const std::vector<QuantMatrix>& weights,
                             const std::vector<at::Tensor>& biases, const at::Tensor& residual,
                             const std::vector<at::Tensor>& outs, const InputNorm& norm) {
  if (x.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const QuantMatrix& w0 = weights[0];
  dispatch(x.scalar_type(), w0.scales.scalar_type(), w0.bits, [&](auto t_tag, auto s_tag, auto bits_tag) {
    using T = decltype(t_tag);
    using S = decltype(s_tag);
    QSegments<T, S> segs;
    for (size_t i = 0; i < weights.size(); ++i) segs.s[i] = segment<T, S>(weights[i], biases[i], outs[i]);
    segs.count = static_cast<int>(weights.size());
    launch<false, T, S, decltype(bits_tag)::value>(x, segs, residual, norm, chunk_group_shift(w0));
  });
}

void quant_small_linear_silu_mul_cuda(const at::Tensor& x, const QuantMatrix& gate, const QuantMatrix& up,
                                      const at::Tensor& out, const InputNorm& norm) {
  if (x.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  dispatch(x.scalar_type(), gate.scales.scalar_type(), gate.bits, [&](auto t_tag, auto s_tag, auto bits_tag) {
    using T = decltype(t_tag);
    using S = decltype(s_tag);
    QSegments<T, S> segs;
    segs.s[0] = segment<T, S>(gate, {}, out);
    segs.s[1] = segment<T, S>(up, {}, out);
    segs.count = 2;
    launch<true, T, S, decltype(bits_tag)::value>(x, segs, {}, norm, chunk_group_shift(gate));
  });
}

}  // namespace rlaif::kernels
