// Paged decode attention in one launch (flash-decoding): grid (P, KV, S), each block takes one partition of one
// sequence's context for the G query heads sharing a KV head (K and V read once per KV head), computes its scores,
// their max m and exp-sum l, and the unnormalised sum of exp(score - m) * V. A sequence whose context spans one
// partition writes its output directly; otherwise each block leaves (m, l, o) in a workspace and the last block to
// arrive (an atomic count per sequence and KV head) rescales and sums the partitions. The grid is sized by
// max_context, never by the lengths, so a captured CUDA graph replays correctly while they change.
// Optionally the decode step's RoPE + KV write (rope_kv_write) happens in the same launch: every block rotates q
// (into shared memory), and the block holding the new token writes its rotated k and its v into the cache first.
#include "kernels/cuda/paged_attention.h"

#include <cmath>

#include "kernels/cuda/common.cuh"

namespace rlaif::kernels {

namespace {

using namespace cuda_detail;

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;  // tokens per thread group whose K and V rows are loaded together

struct AttnParams {
  const void* q;
  int64_t q_stride;  // elements between tokens
  void* k_cache;
  void* v_cache;
  const int* block_tables;
  int64_t bt_stride;
  const int* context_lens;
  int max_context, block_size, KV, G, hd, part_tokens, P;
  float scale;
  // Fused RoPE + KV write (rope_kv_write's inputs); k_new == nullptr when not fused.
  const void* k_new;
  int64_t k_stride;
  const void* v_new;
  int64_t v_stride;
  const void* positions;
  const void* slots;
  const float* inv_freq;
  bool pos64, slot64;
  float* part_ml;  // [S, H, P, 2]: each partition's max and exp-sum
  float* part_o;   // [S, H, P, hd]: each partition's unnormalised output
  int* arrivals;   // [S, KV]: partitions done, zero before the launch
  void* out;       // [S, H, hd]
};

__device__ __forceinline__ int64_t index_at(const void* p, bool is64, int64_t i) {
  return is64 ? static_cast<const int64_t*>(p)[i] : static_cast<const int32_t*>(p)[i];
}

__device__ __forceinline__ int64_t cache_row(const AttnParams& p, const int* table, int t) {
  return static_cast<int64_t>(table[t / p.block_size]) * p.block_size + t % p.block_size;
}

// rope_kv_write's rotation of this lane's E elements of one head (element i = lane·E + j pairs with i ± hd/2,
// held by lane ^ NT/2, or by this lane itself when one lane holds the whole head). All lanes of the warp call it.
template <typename T, int E>
__device__ __forceinline__ void rotate(float (&x)[E], const float (&c)[E], const float (&sn)[E], int lane, int NT) {
  float other[E];
#pragma unroll
  for (int j = 0; j < E; ++j) other[j] = NT > 1 ? __shfl_xor_sync(0xffffffffu, x[j], NT / 2) : x[(j + E / 2) % E];
  const bool first_half = NT > 1 ? lane < NT / 2 : false;
#pragma unroll
  for (int j = 0; j < E; ++j) {
    const bool first = NT > 1 ? first_half : j < E / 2;
    // first half: x1·c − x2·s; second half: x2·c + x1·s (each product and the sum rounded as ATen's ops)
    const float a = static_cast<float>(to<T>(x[j] * c[j]));
    const float b = static_cast<float>(to<T>(first ? -other[j] * sn[j] : other[j] * sn[j]));
    x[j] = static_cast<float>(to<T>(a + b));
  }
}

// Thread group grp (NT = hd / E consecutive lanes, E elements = 16 bytes each; NT divides 32) takes tokens
// grp, grp + groups, ... of each chunk of C = groups · kUnroll tokens, with its K and V rows loaded together, and
// keeps its own online softmax (max m, exp-sum l, output acc) per query head: no block-wide barrier in the loop.
// The groups then merge by shuffles (inside a warp) and through shared memory (across warps).
template <typename T, int E, int MAX_G, bool ROPE>
__global__ void __launch_bounds__(kThreads) attn_decode_kernel(const AttnParams p) {
  const int part = blockIdx.x, kvh = blockIdx.y, s = blockIdx.z;
  const int G = p.G, hd = p.hd, NT = hd / E, groups = kThreads / NT;
  const int grp = threadIdx.x / NT, lane = threadIdx.x % NT, warp = threadIdx.x / 32, wl = threadIdx.x % 32;
  const int64_t head_base = (static_cast<int64_t>(s) * p.KV + kvh) * G;  // row of the first query head in [S, H]
  T* out = static_cast<T*>(p.out) + head_base * hd;
  const int len = min(p.context_lens[s], p.max_context);
  if (len <= 0) {  // padding row: zeros
    if (part == 0)
      for (int i = threadIdx.x; i < G * hd; i += kThreads) out[i] = to<T>(0.0f);
    return;
  }
  const int start = part * p.part_tokens;
  if (start >= len) return;
  const int end = min(start + p.part_tokens, len);
  const int nparts = (len + p.part_tokens - 1) / p.part_tokens;

  extern __shared__ float smem[];
  float* q_s = smem;               // [G][hd]: the (rotated) query rows
  float* o_s = q_s + G * hd;       // [kWarps][G][hd]: the warps' outputs
  float* ml_s = o_s + kWarps * G * hd;  // [kWarps][G][2]: the warps' max and exp-sum
  __shared__ float M_s[MAX_G], inv_L_s[MAX_G];
  __shared__ bool last_s;

  float c[E], sn[E];
  if constexpr (ROPE) {
    const float pos = static_cast<float>(index_at(p.positions, p.pos64, s));
#pragma unroll
    for (int j = 0; j < E; ++j) {
      const float angle = pos * p.inv_freq[(lane * E + j) % (hd / 2)];
      c[j] = static_cast<float>(to<T>(cosf(angle)));  // full-range cosf/sinf, as rope_kv_write
      sn[j] = static_cast<float>(to<T>(sinf(angle)));
    }
  }
  // q rows to shared memory; the trip count is uniform so whole warps reach rotate's shuffles.
  const T* qbase = static_cast<const T*>(p.q) + s * p.q_stride + static_cast<int64_t>(kvh) * G * hd + lane * E;
  for (int g0 = 0; g0 < G; g0 += groups) {
    const int g = g0 + grp;
    float x[E];
    Vec<T, E> qv;
    if (g < G) qv = load_vec<T, E>(qbase + g * hd);
#pragma unroll
    for (int j = 0; j < E; ++j) x[j] = g < G ? static_cast<float>(qv.v[j]) : 0.0f;
    if constexpr (ROPE) rotate<T, E>(x, c, sn, lane, NT);
    if (g < G)
#pragma unroll
      for (int j = 0; j < E; ++j) q_s[g * hd + lane * E + j] = x[j];
  }
  const int* table = p.block_tables + s * p.bt_stride;
  T* kc = static_cast<T*>(p.k_cache);
  T* vc = static_cast<T*>(p.v_cache);
  if constexpr (ROPE) {
    // The new token (len − 1) is in the last partition: its block writes it before reading (no other block of
    // this launch reads that row). Every group computes the rotation (whole warps shuffle); group 0 stores.
    if (part == nparts - 1) {
      const int64_t slot = index_at(p.slots, p.slot64, s);
      if (slot >= 0) {
        const Vec<T, E> kv = load_vec<T, E>(static_cast<const T*>(p.k_new) + s * p.k_stride + kvh * hd + lane * E);
        float kf[E];
#pragma unroll
        for (int j = 0; j < E; ++j) kf[j] = static_cast<float>(kv.v[j]);
        rotate<T, E>(kf, c, sn, lane, NT);
        if (grp == 0) {
          Vec<T, E> ko, vo = load_vec<T, E>(static_cast<const T*>(p.v_new) + s * p.v_stride + kvh * hd + lane * E);
#pragma unroll
          for (int j = 0; j < E; ++j) ko.v[j] = to<T>(kf[j]);
          store_vec<T, E>(kc + (slot * p.KV + kvh) * hd + lane * E, ko);
          store_vec<T, E>(vc + (slot * p.KV + kvh) * hd + lane * E, vo);
        }
      }
    }
  }
  __syncthreads();  // q_s written; the new token's K/V visible to the block's reads

  float m[MAX_G], l[MAX_G], acc[MAX_G][E];
#pragma unroll
  for (int g = 0; g < MAX_G; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.0f;
#pragma unroll
    for (int j = 0; j < E; ++j) acc[g][j] = 0.0f;
  }
  const int chunk = groups * kUnroll;
  for (int t0 = start; t0 < end; t0 += chunk) {  // t0 is uniform: every lane reaches the shuffles
    Vec<T, E> kb[kUnroll], vb[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = t0 + u * groups + grp;
      if (t < end) {
        const int64_t at = (cache_row(p, table, t) * p.KV + kvh) * hd + lane * E;
        kb[u] = load_vec<T, E>(kc + at);
        vb[u] = load_vec<T, E>(vc + at);
      }
    }
#pragma unroll
    for (int g = 0; g < MAX_G; ++g) {
      if (g >= G) break;
      float qv[E];
#pragma unroll
      for (int j = 0; j < E; ++j) qv[j] = q_s[g * hd + lane * E + j];
      float sc[kUnroll];
      float mx = m[g];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        float dot = 0.0f;
        const int t = t0 + u * groups + grp;
        if (t < end)
#pragma unroll
          for (int j = 0; j < E; ++j) dot += qv[j] * static_cast<float>(kb[u].v[j]);
        for (int off = NT / 2; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
        // q·k and the scaling each rounded to T, as the spec
        sc[u] = t < end ? static_cast<float>(to<T>(static_cast<float>(to<T>(dot)) * p.scale)) : -INFINITY;
        mx = fmaxf(mx, sc[u]);
      }
      if (mx == -INFINITY) continue;  // this group has no token in the chunk (and had none before)
      const float corr = expf(m[g] - mx);  // 0 while m is −inf
      l[g] *= corr;
#pragma unroll
      for (int j = 0; j < E; ++j) acc[g][j] *= corr;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (sc[u] == -INFINITY) continue;
        const float e = expf(sc[u] - mx);
        l[g] += e;
#pragma unroll
        for (int j = 0; j < E; ++j) acc[g][j] += e * static_cast<float>(vb[u].v[j]);
      }
      m[g] = mx;
    }
  }

  // Merge the groups of a warp (lanes holding the same elements are NT, 2·NT, ... apart), then the warps.
  auto merge = [](float& m1, float& l1, float m2, float l2, float& a, float& b) {
    const float M = fmaxf(m1, m2);
    a = M == -INFINITY ? 0.0f : expf(m1 - M);
    b = M == -INFINITY ? 0.0f : expf(m2 - M);
    l1 = l1 * a + l2 * b;
    m1 = M;
  };
#pragma unroll
  for (int g = 0; g < MAX_G; ++g) {
    if (g >= G) break;
    for (int off = NT; off < 32; off <<= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m[g], off), l2 = __shfl_xor_sync(0xffffffffu, l[g], off);
      float a, b;
      merge(m[g], l[g], m2, l2, a, b);
#pragma unroll
      for (int j = 0; j < E; ++j) acc[g][j] = acc[g][j] * a + __shfl_xor_sync(0xffffffffu, acc[g][j], off) * b;
    }
    if (wl < NT) {
#pragma unroll
      for (int j = 0; j < E; ++j) o_s[(warp * G + g) * hd + lane * E + j] = acc[g][j];
      if (wl == 0) {
        ml_s[(warp * G + g) * 2] = m[g];
        ml_s[(warp * G + g) * 2 + 1] = l[g];
      }
    }
  }
  __syncthreads();
  const int64_t P = p.P;
  for (int idx = threadIdx.x; idx < G * hd; idx += kThreads) {
    const int g = idx / hd, d = idx % hd;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, ml_s[(w * G + g) * 2]);
    float L = 0.0f, o = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float mw = ml_s[(w * G + g) * 2];
      const float f = mw == -INFINITY ? 0.0f : expf(mw - M);
      L += ml_s[(w * G + g) * 2 + 1] * f;
      o += o_s[(w * G + g) * hd + d] * f;
    }
    if (nparts == 1) {
      out[idx] = to<T>(o * (1.0f / L));
    } else {
      p.part_o[((head_base + g) * P + part) * hd + d] = o;
      if (d == 0) {
        p.part_ml[((head_base + g) * P + part) * 2] = M;
        p.part_ml[((head_base + g) * P + part) * 2 + 1] = L;
      }
    }
  }
  if (nparts == 1) return;
  __threadfence();  // this block's partials are visible device-wide before it is counted
  __syncthreads();
  if (threadIdx.x == 0) last_s = atomicAdd(p.arrivals + s * p.KV + kvh, 1) == nparts - 1;
  __syncthreads();
  if (!last_s) return;
  __threadfence();
  // combine the partitions: M = max m_i, L = Σ l_i·e^(m_i − M), out = Σ o_i·e^(m_i − M) / L; a warp per head for
  // M and L, then every output element's sum with its loads independent (read past L1: __ldcg).
  for (int g = warp; g < G; g += kWarps) {
    const float* ml = p.part_ml + (head_base + g) * P * 2;
    float M = -INFINITY;
    for (int i = wl; i < nparts; i += 32) M = fmaxf(M, __ldcg(ml + 2 * i));
    M = warp_max(M);
    float L = 0.0f;
    for (int i = wl; i < nparts; i += 32) L += __ldcg(ml + 2 * i + 1) * expf(__ldcg(ml + 2 * i) - M);
    L = warp_sum(L);
    if (wl == 0) {
      M_s[g] = M;
      inv_L_s[g] = 1.0f / L;
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x * 4; idx < G * hd; idx += kThreads * 4) {  // hd % 4 == 0
    const int g = idx / hd, d = idx % hd;
    const float* ml = p.part_ml + (head_base + g) * P * 2;
    const float* po = p.part_o + (head_base + g) * P * hd + d;
    float4 o = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 8
    for (int i = 0; i < nparts; ++i) {
      const float f = expf(__ldcg(ml + 2 * i) - M_s[g]);
      const float4 v = __ldcg(reinterpret_cast<const float4*>(po + i * hd));
      o.x += v.x * f;
      o.y += v.y * f;
      o.z += v.z * f;
      o.w += v.w * f;
    }
    const float inv = inv_L_s[g];
    out[idx] = to<T>(o.x * inv);
    out[idx + 1] = to<T>(o.y * inv);
    out[idx + 2] = to<T>(o.z * inv);
    out[idx + 3] = to<T>(o.w * inv);
  }
}

template <typename T>
void launch(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& block_tables,
            const at::Tensor& context_lens, int64_t block_size, int64_t max_context, double scale,
            const at::Tensor& out, const RopeKvInputs* rope) {
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
  if (rope)
    RLAIF_CHECK(aligned16(rope->k.data_ptr()) && aligned16(rope->v.data_ptr()) && rope->k.stride(0) % E == 0 &&
                    rope->v.stride(0) % E == 0,
                "paged_attention_decode_cuda: k and v need 16-byte aligned rows");
  RLAIF_CHECK(max_context < (int64_t{1} << 31) && block_size < (int64_t{1} << 31), "paged_attention_decode_cuda: "
              "max_context {} / block_size {} overflow int32", max_context, block_size);
  const c10::cuda::CUDAGuard guard(q.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  // Partition length: a multiple of the chunk the block's thread groups take in one round, as long as possible
  // (fewer partials to combine, at most 512 tokens) while the grid still gives every SM two blocks; decided by
  // max_context only, so a captured graph stays valid.
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int chunk = static_cast<int>(kThreads / NT) * kUnroll;
  auto parts = [&](int64_t pt) { return std::max<int64_t>(1, (max_context + pt - 1) / pt); };
  int64_t part_tokens = chunk;
  while (part_tokens < 512 && part_tokens < max_context && S * KV * parts(part_tokens * 2) >= 2 * sms) part_tokens *= 2;
  const int64_t P = parts(part_tokens);
  const size_t smem = sizeof(float) * (G * hd * (1 + kWarps) + kWarps * G * 2);
  RLAIF_CHECK(smem <= 227 * 1024, "paged_attention_decode_cuda: shared memory {} bytes", smem);

  // Workspace from the caching allocator on the current stream (capture-safe under at::cuda::CUDAGraph); the
  // arrival counters are zeroed by a memset on the stream (a memset node in a captured graph).
  const int64_t floats = S * H * P * (2 + hd);
  at::Tensor ws = at::empty({floats + S * KV}, q.options().dtype(at::kFloat));
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
  p.part_tokens = static_cast<int>(part_tokens);
  p.P = static_cast<int>(P);
  p.scale = static_cast<float>(scale);
  p.part_o = ws.data_ptr<float>();  // first: its float4 reads need 16-byte alignment
  p.part_ml = p.part_o + S * H * P * hd;
  p.arrivals = reinterpret_cast<int*>(p.part_o + floats);
  p.out = out.data_ptr();
  if (rope) {
    p.k_new = rope->k.data_ptr();
    p.k_stride = rope->k.stride(0);
    p.v_new = rope->v.data_ptr();
    p.v_stride = rope->v.stride(0);
    p.positions = rope->positions.data_ptr();
    p.pos64 = rope->positions.scalar_type() == at::kLong;
    p.slots = rope->slots.data_ptr();
    p.slot64 = rope->slots.scalar_type() == at::kLong;
    p.inv_freq = rope->inv_freq.data_ptr<float>();
  }
  const cudaError_t err = cudaMemsetAsync(p.arrivals, 0, sizeof(int) * S * KV, stream);
  RLAIF_CHECK(err == cudaSuccess, "paged_attention_decode_cuda: memset failed: {}", cudaGetErrorString(err));

  const dim3 grid(static_cast<unsigned>(P), static_cast<unsigned>(KV), static_cast<unsigned>(S));
  auto go = [&](auto max_g) {
    constexpr int MG = decltype(max_g)::value;
    auto run = [&](auto kernel) {
      if (smem > 48 * 1024) {
        const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                   static_cast<int>(smem));
        RLAIF_CHECK(e == cudaSuccess, "paged_attention_decode_cuda: {} bytes of shared memory: {}", smem,
                    cudaGetErrorString(e));
      }
      kernel<<<grid, kThreads, smem, stream>>>(p);
      check_launch("attn_decode_kernel");
    };
    if (rope) run(attn_decode_kernel<T, E, MG, true>);
    else run(attn_decode_kernel<T, E, MG, false>);
  };
  if (G <= 1) go(std::integral_constant<int, 1>{});
  else if (G <= 2) go(std::integral_constant<int, 2>{});
  else if (G <= 4) go(std::integral_constant<int, 4>{});
  else if (G <= 8) go(std::integral_constant<int, 8>{});
  else go(std::integral_constant<int, 16>{});
}

void dispatch(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& block_tables,
              const at::Tensor& context_lens, int64_t block_size, int64_t max_context, double scale,
              const at::Tensor& out, const RopeKvInputs* rope) {
  if (q.scalar_type() == at::kFloat)
    launch<float>(q, k_cache, v_cache, block_tables, context_lens, block_size, max_context, scale, out, rope);
  else
    launch<at::BFloat16>(q, k_cache, v_cache, block_tables, context_lens, block_size, max_context, scale, out, rope);
}

}  // namespace

void paged_attention_decode_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t block_size,
                                 int64_t max_context, double scale, const at::Tensor& out) {
  dispatch(q, k_cache, v_cache, block_tables, context_lens, block_size, max_context, scale, out, nullptr);
}

void paged_attention_decode_rope_cuda(const at::Tensor& q, const RopeKvInputs& rope, const at::Tensor& k_cache,
                                      const at::Tensor& v_cache, const at::Tensor& block_tables,
                                      const at::Tensor& context_lens, int64_t block_size, int64_t max_context,
                                      double scale, const at::Tensor& out) {
  dispatch(q, k_cache, v_cache, block_tables, context_lens, block_size, max_context, scale, out, &rope);
}

}  // namespace rlaif::kernels
