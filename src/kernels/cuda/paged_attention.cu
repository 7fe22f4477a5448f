// Paged decode attention in three launches, split over partitions of the context so that one long sequence
// still spreads over many blocks. The grid is sized by max_context (never by the actual lengths), so a captured
// CUDA graph replays correctly while lengths change; blocks past a sequence's length return at once.
//   1. qk:     grid (P, KV, S). Scores of the partition's tokens for all G query heads sharing the KV head
//              (K read once per KV head), stored in float32, plus the partition's max and sum of exp.
//   2. pv:     grid (P, KV, S). Global max/sum from the partition stats, p = to_dtype(exp(s - max) / sum) exactly
//              as the spec rounds it, and the partition's sum of p * V in float32.
//   3. reduce: grid (H, S). Sum of the partitions' outputs (already normalised), rounded to the dtype.
// Keeping the probabilities exact costs the score round trip (4 bytes per token and query head, against 2*hd*2
// bytes of K/V per token and KV head: about 1/8 more traffic for Qwen2.5-3B bf16).
#include "kernels/cuda/paged_attention.h"

#include <cmath>

#include "kernels/cuda/common.cuh"

namespace rlaif::kernels {

namespace {

using namespace cuda_detail;

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;  // tokens per thread group whose loads are in flight together

struct AttnParams {
  const void* q;
  int64_t q_stride;  // elements between tokens
  const void* k_cache;
  const void* v_cache;
  const int* block_tables;
  int64_t bt_stride;
  const int* context_lens;
  int max_context, block_size, KV, G, hd, part_tokens, P;
  float scale;
  float* scores;       // [S, H, P * part_tokens]
  float* part_max;     // [S, H, P]
  float* part_sum;     // [S, H, P]
  float* partial_out;  // [S, H, P, hd]
  void* out;           // [S, H, hd]
};

// The block's share of the work: sequence s, KV head kvh, tokens [start, end). False when it has none.
struct Slice {
  int s, kvh, part, start, end;
  int64_t head_base;  // row of the first query head of this KV head in [S, H]
};

__device__ __forceinline__ bool block_slice(const AttnParams& p, Slice& w) {
  w.part = blockIdx.x;
  w.kvh = blockIdx.y;
  w.s = blockIdx.z;
  const int len = min(p.context_lens[w.s], p.max_context);
  w.start = w.part * p.part_tokens;
  w.end = min(w.start + p.part_tokens, len);
  w.head_base = static_cast<int64_t>(w.s) * p.KV * p.G + static_cast<int64_t>(w.kvh) * p.G;
  return w.start < len;
}

__device__ __forceinline__ int64_t cache_row(const AttnParams& p, const int* table, int t) {
  return static_cast<int64_t>(table[t / p.block_size]) * p.block_size + t % p.block_size;
}

// Each token is handled by NT = hd / E consecutive lanes, E elements (16 bytes) each; NT divides 32.
template <typename T, int E, int MAX_G>
__global__ void __launch_bounds__(kThreads) attn_qk_kernel(const AttnParams p) {
  Slice w;
  if (!block_slice(p, w)) return;
  extern __shared__ float sc_s[];  // [G][part_tokens]
  const int G = p.G, hd = p.hd, NT = hd / E, groups = kThreads / NT;
  const int grp = threadIdx.x / NT, lane = threadIdx.x % NT;
  const int64_t score_stride = static_cast<int64_t>(p.P) * p.part_tokens;

  float qr[MAX_G][E];
  const T* qbase = static_cast<const T*>(p.q) + w.s * p.q_stride + static_cast<int64_t>(w.kvh) * G * hd + lane * E;
#pragma unroll
  for (int g = 0; g < MAX_G; ++g) {
    if (g < G) {
      const Vec<T, E> qv = load_vec<T, E>(qbase + g * hd);
#pragma unroll
      for (int j = 0; j < E; ++j) qr[g][j] = static_cast<float>(qv.v[j]);
    }
  }
  const int* table = p.block_tables + w.s * p.bt_stride;
  const T* kc = static_cast<const T*>(p.k_cache);
  // t0 is uniform over the block, so every lane reaches the shuffles below.
  for (int t0 = w.start; t0 < w.end; t0 += groups * kUnroll) {
    Vec<T, E> kv[kUnroll];  // kept in T (half the registers of float for bf16), converted at each use
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = t0 + u * groups + grp;
      if (t < w.end) {
        kv[u] = load_vec<T, E>(kc + (cache_row(p, table, t) * p.KV + w.kvh) * hd + lane * E);
      } else {
#pragma unroll
        for (int j = 0; j < E; ++j) kv[u].v[j] = to<T>(0.0f);
      }
    }
#pragma unroll
    for (int g = 0; g < MAX_G; ++g) {
      if (g >= G) break;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        float dot = 0.0f;
#pragma unroll
        for (int j = 0; j < E; ++j) dot += qr[g][j] * static_cast<float>(kv[u].v[j]);
        for (int off = NT / 2; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
        const int t = t0 + u * groups + grp;
        if (lane == 0 && t < w.end) {
          const float sc = static_cast<float>(to<T>(static_cast<float>(to<T>(dot)) * p.scale));  // as the spec
          sc_s[g * p.part_tokens + (t - w.start)] = sc;
          p.scores[(w.head_base + g) * score_stride + t] = sc;
        }
      }
    }
  }
  __syncthreads();
  const int n = w.end - w.start, warp = threadIdx.x / 32, wl = threadIdx.x % 32;
  for (int g = warp; g < G; g += kWarps) {
    const float* sc = sc_s + g * p.part_tokens;
    float m = -INFINITY;
    for (int i = wl; i < n; i += 32) m = fmaxf(m, sc[i]);
    m = warp_max(m);
    float l = 0.0f;
    for (int i = wl; i < n; i += 32) l += expf(sc[i] - m);
    l = warp_sum(l);
    if (wl == 0) {
      p.part_max[(w.head_base + g) * p.P + w.part] = m;
      p.part_sum[(w.head_base + g) * p.P + w.part] = l;
    }
  }
}

template <typename T, int E, int MAX_G>
__global__ void __launch_bounds__(kThreads) attn_pv_kernel(const AttnParams p) {
  Slice w;
  if (!block_slice(p, w)) return;
  extern __shared__ float smem[];
  const int G = p.G, hd = p.hd, NT = hd / E, groups = kThreads / NT;
  float* p_s = smem;                     // [G][part_tokens]: this partition's probabilities, rounded to T
  float* red = smem + G * p.part_tokens; // [groups][hd]: the thread groups' sums, added at the end
  __shared__ float max_s[MAX_G], inv_sum_s[MAX_G];
  const int len = min(p.context_lens[w.s], p.max_context);
  const int nparts = (len + p.part_tokens - 1) / p.part_tokens;
  const int warp = threadIdx.x / 32, wl = threadIdx.x % 32;
  for (int g = warp; g < G; g += kWarps) {
    const float* pm = p.part_max + (w.head_base + g) * p.P;
    const float* ps = p.part_sum + (w.head_base + g) * p.P;
    float m = -INFINITY;
    for (int i = wl; i < nparts; i += 32) m = fmaxf(m, pm[i]);
    m = warp_max(m);
    float l = 0.0f;
    for (int i = wl; i < nparts; i += 32) l += ps[i] * expf(pm[i] - m);
    l = warp_sum(l);
    if (wl == 0) {
      max_s[g] = m;
      inv_sum_s[g] = 1.0f / l;  // softmax multiplies by the reciprocal of the sum, as ATen's does
    }
  }
  __syncthreads();
  const int n = w.end - w.start;
  const int64_t score_stride = static_cast<int64_t>(p.P) * p.part_tokens;
  for (int i = threadIdx.x; i < G * n; i += kThreads) {
    const int g = i / n, j = i % n;
    const float e = expf(p.scores[(w.head_base + g) * score_stride + w.start + j] - max_s[g]);
    p_s[g * p.part_tokens + j] = static_cast<float>(to<T>(e * inv_sum_s[g]));
  }
  __syncthreads();

  const int grp = threadIdx.x / NT, lane = threadIdx.x % NT;
  const int* table = p.block_tables + w.s * p.bt_stride;
  const T* vc = static_cast<const T*>(p.v_cache);
  float acc[MAX_G][E];
#pragma unroll
  for (int g = 0; g < MAX_G; ++g)
#pragma unroll
    for (int j = 0; j < E; ++j) acc[g][j] = 0.0f;
  for (int t0 = w.start; t0 < w.end; t0 += groups * kUnroll) {
    Vec<T, E> vv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = t0 + u * groups + grp;
      if (t < w.end) vv[u] = load_vec<T, E>(vc + (cache_row(p, table, t) * p.KV + w.kvh) * hd + lane * E);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = t0 + u * groups + grp;
      if (t >= w.end) break;
#pragma unroll
      for (int g = 0; g < MAX_G; ++g) {
        if (g >= G) break;
        const float pg = p_s[g * p.part_tokens + (t - w.start)];
#pragma unroll
        for (int j = 0; j < E; ++j) acc[g][j] += pg * static_cast<float>(vv[u].v[j]);
      }
    }
  }
  // Sum the thread groups' partial outputs head by head through shared memory (G is uniform: the barriers
  // inside the branch are reached by the whole block).
#pragma unroll
  for (int g = 0; g < MAX_G; ++g) {
    if (g >= G) break;
#pragma unroll
    for (int j = 0; j < E; ++j) red[grp * hd + lane * E + j] = acc[g][j];
    __syncthreads();
    float* dst = p.partial_out + ((w.head_base + g) * p.P + w.part) * hd;
    for (int d = threadIdx.x; d < hd; d += kThreads) {
      float sum = 0.0f;
      for (int r = 0; r < groups; ++r) sum += red[r * hd + d];
      dst[d] = sum;
    }
    __syncthreads();
  }
}

// grid (H, S): out = sum of the valid partitions' outputs; zeros for an empty context.
template <typename T>
__global__ void attn_reduce_kernel(const AttnParams p) {
  const int h = blockIdx.x, s = blockIdx.y, H = p.KV * p.G;
  const int len = min(p.context_lens[s], p.max_context);
  const int nparts = len > 0 ? (len + p.part_tokens - 1) / p.part_tokens : 0;
  const int64_t head = static_cast<int64_t>(s) * H + h;
  const float* src = p.partial_out + head * p.P * p.hd;
  T* dst = static_cast<T*>(p.out) + head * p.hd;
  for (int d = threadIdx.x; d < p.hd; d += blockDim.x) {
    float sum = 0.0f;
    for (int i = 0; i < nparts; ++i) sum += src[i * p.hd + d];
    dst[d] = to<T>(sum);
  }
}

template <typename T, int E, int MAX_G>
void launch_partitions(const AttnParams& p, dim3 grid, size_t smem_qk, size_t smem_pv, cudaStream_t stream) {
  attn_qk_kernel<T, E, MAX_G><<<grid, kThreads, smem_qk, stream>>>(p);
  check_launch("attn_qk_kernel");
  attn_pv_kernel<T, E, MAX_G><<<grid, kThreads, smem_pv, stream>>>(p);
  check_launch("attn_pv_kernel");
}

template <typename T>
void launch(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& block_tables,
            const at::Tensor& context_lens, int64_t block_size, int64_t max_context, double scale,
            const at::Tensor& out) {
  constexpr int E = kVec<T>;
  const int64_t S = q.size(0), H = q.size(1), hd = q.size(2), KV = k_cache.size(1), G = H / KV;
  if (S == 0) return;
  const int64_t NT = hd / E;
  RLAIF_CHECK(hd % E == 0 && NT <= 32 && (NT & (NT - 1)) == 0,
              "paged_attention_decode_cuda: head_dim {} unsupported for {} (want {} times a power of two up to 32)",
              hd, c10::toString(q.scalar_type()), E);
  RLAIF_CHECK(G <= 16, "paged_attention_decode_cuda: {} query heads per KV head, at most 16 supported", G);
  RLAIF_CHECK(aligned16(q.data_ptr()) && q.stride(0) % E == 0 && aligned16(k_cache.data_ptr()) &&
                  aligned16(v_cache.data_ptr()),
              "paged_attention_decode_cuda: q, k_cache and v_cache need 16-byte aligned rows");
  RLAIF_CHECK(max_context < (int64_t{1} << 31) && block_size < (int64_t{1} << 31), "paged_attention_decode_cuda: "
              "max_context {} / block_size {} overflow int32", max_context, block_size);
  const c10::cuda::CUDAGuard guard(q.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  // Partition length: as long as possible (fewer partials to combine) while the grid still gives every SM two
  // blocks; decided by max_context only, so a captured graph stays valid.
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int part_tokens = 256;
  auto parts = [&](int pt) { return std::max<int64_t>(1, (max_context + pt - 1) / pt); };
  while (part_tokens > 32 && S * KV * parts(part_tokens) < 2 * sms) part_tokens /= 2;
  const int64_t P = parts(part_tokens), score_stride = P * part_tokens;
  const size_t smem_qk = sizeof(float) * G * part_tokens;
  const size_t smem_pv = sizeof(float) * (G * part_tokens + (kThreads / NT) * hd);
  RLAIF_CHECK(smem_pv <= 48 * 1024 && smem_qk <= 48 * 1024, "paged_attention_decode_cuda: shared memory {} bytes",
              smem_pv);

  // Workspace from the caching allocator on the current stream (capture-safe under at::cuda::CUDAGraph).
  at::Tensor ws = at::empty({S * H * (score_stride + 2 * P + P * hd)}, q.options().dtype(at::kFloat));
  AttnParams p{};
  p.q = q.data_ptr();
  p.q_stride = q.stride(0);
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.block_tables = block_tables.data_ptr<int32_t>();
  p.bt_stride = block_tables.stride(0);
  p.context_lens = context_lens.data_ptr<int32_t>();
  p.max_context = static_cast<int>(max_context);
  p.block_size = static_cast<int>(block_size);
  p.KV = static_cast<int>(KV);
  p.G = static_cast<int>(G);
  p.hd = static_cast<int>(hd);
  p.part_tokens = part_tokens;
  p.P = static_cast<int>(P);
  p.scale = static_cast<float>(scale);
  p.scores = ws.data_ptr<float>();
  p.part_max = p.scores + S * H * score_stride;
  p.part_sum = p.part_max + S * H * P;
  p.partial_out = p.part_sum + S * H * P;
  p.out = out.data_ptr();

  const dim3 grid(static_cast<unsigned>(P), static_cast<unsigned>(KV), static_cast<unsigned>(S));
  if (G <= 1) launch_partitions<T, E, 1>(p, grid, smem_qk, smem_pv, stream);
  else if (G <= 2) launch_partitions<T, E, 2>(p, grid, smem_qk, smem_pv, stream);
  else if (G <= 4) launch_partitions<T, E, 4>(p, grid, smem_qk, smem_pv, stream);
  else if (G <= 8) launch_partitions<T, E, 8>(p, grid, smem_qk, smem_pv, stream);
  else launch_partitions<T, E, 16>(p, grid, smem_qk, smem_pv, stream);
  const int reduce_threads = static_cast<int>(std::min<int64_t>(256, (hd + 31) / 32 * 32));
  attn_reduce_kernel<T><<<dim3(static_cast<unsigned>(H), static_cast<unsigned>(S)), reduce_threads, 0, stream>>>(p);
  check_launch("attn_reduce_kernel");
}

}  // namespace

void paged_attention_decode_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t block_size,
                                 int64_t max_context, double scale, const at::Tensor& out) {
  if (q.scalar_type() == at::kFloat)
    launch<float>(q, k_cache, v_cache, block_tables, context_lens, block_size, max_context, scale, out);
  else
    launch<at::BFloat16>(q, k_cache, v_cache, block_tables, context_lens, block_size, max_context, scale, out);
}

}  // namespace rlaif::kernels
