// Paged decode attention in one launch (flash-decoding): grid (P, KV·hs, S), each block takes one partition of one
// sequence's context for the G query heads sharing a KV head (or a 1/hs share of them when the grid is small).
// The block copies the partition's K and V rows into shared memory with cp.async (all loads in flight at once),
// computes the scores with threads over tokens (q read from shared memory, no shuffle per token), one softmax max
// per head for the whole partition, then P·V with lanes over head dimensions. A sequence whose context spans one
// partition writes its output directly; otherwise each block leaves (m, l, o) in a workspace and the last block to
// arrive (an atomic count per sequence, KV head and head split, which it resets) rescales and sums the partitions. The grid is
// sized by max_context, never by the lengths, so a captured CUDA graph replays correctly while they change.
// Optionally the decode step's RoPE + KV write (rope_kv_write) happens in the same launch: every block rotates q
// (into shared memory), and the block holding the new token writes its rotated k and its v into the cache and
// into its own shared tiles.
#include "kernels/cuda/paged_attention.h"

#include <cmath>
#include <mutex>
#include <type_traits>

#include "kernels/cuda/common.cuh"

namespace rlaif::kernels {

namespace {

using namespace cuda_detail;

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;

struct AttnParams {
  const void* q;
  int64_t q_stride;  // elements between tokens
  void* k_cache;
  void* v_cache;
  const int* block_tables;
  int64_t bt_stride;
  const int* context_lens;
  int max_context, block_size, KV, G, hd, part_tokens, P;
  int tpt;  // threads per token in the score phase
  int hs, gb;  // head splits per KV head (blockIdx.y = kvh·hs + split) and query heads per split
  bool pdl;    // programmatic dependent launch on (kernels/cpu/registry.h)
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
  int* arrivals;   // [S, KV, hs]: partitions done, zero before the launch
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

// After a block wrote its partition's partials (part_o, part_ml) for query heads head_base .. head_base + G − 1:
// counts it at arrivals[count_at]; the last block to arrive (which resets the counter) rescales and sums every
// partition into out: M = max m_i, L = Σ l_i·e^(m_i − M), out = Σ o_i·e^(m_i − M) / L; a warp per head for M and L,
// then every output element's sum with its loads independent (read past L1: __ldcg). All threads call it.
template <typename T>
__device__ void combine_partitions(const AttnParams& p, int64_t head_base, int G, int nparts, int64_t count_at,
                                   T* out) {
  __shared__ float M_s[16], inv_L_s[16];
  __shared__ bool last_s;
  const int warp = threadIdx.x / 32, wl = threadIdx.x % 32;
  __threadfence();  // this block's partials are visible device-wide before it is counted
  __syncthreads();
  if (threadIdx.x == 0) {
    int* count = p.arrivals + count_at;
    last_s = atomicAdd(count, 1) == nparts - 1;
    if (last_s) atomicExch(count, 0);  // every partition has counted: the next launch finds the counter at zero
  }
  __syncthreads();
  if (!last_s) return;
  __threadfence();
  const int64_t P = p.P;
  const int hd = p.hd;
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

// The pieces of the fused RoPE + KV write both kernels share. rope_tables: cos/sin per head dimension of sequence
// s's position, rounded as rope_kv_write, into shared memory (the caller syncs). lane_rope: this lane's E of them.
template <typename T>
__device__ __forceinline__ void rope_tables(const AttnParams& p, int s, int hd, float* cos_s, float* sin_s) {
  const float pos = static_cast<float>(index_at(p.positions, p.pos64, s));
  for (int i = threadIdx.x; i < hd; i += blockDim.x) {
    const float angle = pos * p.inv_freq[i % (hd / 2)];
    cos_s[i] = static_cast<float>(to<T>(cosf(angle)));  // full-range cosf/sinf, as rope_kv_write
    sin_s[i] = static_cast<float>(to<T>(sinf(angle)));
  }
}
template <int E>
__device__ __forceinline__ void lane_rope(const float* cos_s, const float* sin_s, int lane, float (&c)[E],
                                          float (&sn)[E]) {
#pragma unroll
  for (int j = 0; j < E; ++j) {
    c[j] = cos_s[lane * E + j];
    sn[j] = sin_s[lane * E + j];
  }
}
// Query row g at qbase + g·hd (this lane's E elements; zeros for g ≥ G) as floats, rotated when ROPE. Whole warps
// call it (rotate shuffles).
template <typename T, int E, bool ROPE>
__device__ __forceinline__ void load_q_row(const T* qbase, int g, int G, int hd, const float (&c)[E],
                                           const float (&sn)[E], int lane, int NT, float (&x)[E]) {
  Vec<T, E> qv;
  if (g < G) qv = load_vec<T, E>(qbase + g * hd);
#pragma unroll
  for (int j = 0; j < E; ++j) x[j] = g < G ? static_cast<float>(qv.v[j]) : 0.0f;
  if constexpr (ROPE) rotate<T, E>(x, c, sn, lane, NT);
}
// The new token's rotated k and its v for KV head kvh of sequence s (this lane's E elements). Whole warps call it.
template <typename T, int E>
__device__ __forceinline__ void new_token_kv(const AttnParams& p, int s, int kvh, int hd, const float (&c)[E],
                                             const float (&sn)[E], int lane, int NT, Vec<T, E>& ko, Vec<T, E>& vo) {
  const Vec<T, E> kv = load_vec<T, E>(static_cast<const T*>(p.k_new) + s * p.k_stride + kvh * hd + lane * E);
  float kf[E];
#pragma unroll
  for (int j = 0; j < E; ++j) kf[j] = static_cast<float>(kv.v[j]);
  rotate<T, E>(kf, c, sn, lane, NT);
#pragma unroll
  for (int j = 0; j < E; ++j) ko.v[j] = to<T>(kf[j]);
  vo = load_vec<T, E>(static_cast<const T*>(p.v_new) + s * p.v_stride + kvh * hd + lane * E);
}

// Shared-memory layout of one block (launch() sizes it the same way): K and V tiles [PT][row_bytes] with rows
// padded by 16·TPT bytes (the eight lanes of a 16-byte access phase, TPT per token, hit eight different bank
// groups), q [G][hd] floats, probabilities [PT][MAX_G] floats, cache rows [PT]; the per-warp outputs of P·V
// [kWarps][G][hd] reuse the K tile.
struct SmemLayout {
  int row_bytes, k_off, v_off, q_off, p_off, rows_off, bytes;
  __host__ __device__ SmemLayout(int PT, int hd, int G, int max_g, int elem, int tpt) {
    row_bytes = hd * elem + 16 * tpt;
    const int tile = PT * row_bytes, o_bytes = kWarps * G * hd * 4;
    k_off = 0;
    v_off = ((tile > o_bytes ? tile : o_bytes) + 15) / 16 * 16;
    q_off = v_off + (tile + 15) / 16 * 16;
    p_off = q_off + G * hd * 4;
    rows_off = p_off + PT * max_g * 4;
    bytes = rows_off + PT * 8;
  }
};

// Phase 1 (scores) takes TPT threads per token, interleaved over hd in 16-byte vectors; phase 2 (P·V) groups of
// hd / 4 lanes per token row, tokens spread over the groups. Blocks of one KV head may split its query heads.
template <typename T, int MAX_G, bool ROPE>
__global__ void __launch_bounds__(kThreads) attn_decode_kernel(const AttnParams p) {
  constexpr int E = kVec<T>;
  if (p.pdl) pdl_trigger();  // the next projection may launch and start its weight loads
  const int part = blockIdx.x, kvh = blockIdx.y / p.hs, split = blockIdx.y % p.hs, s = blockIdx.z;
  const int G = min(p.gb, p.G - split * p.gb), hd = p.hd, PT = p.part_tokens;  // this block's query heads
  // row of the block's first query head in [S, H]
  const int64_t head_base = (static_cast<int64_t>(s) * p.KV + kvh) * p.G + split * p.gb;
  T* out = static_cast<T*>(p.out) + head_base * hd;
  const int len = min(p.context_lens[s], p.max_context);
  if (len <= 0) {  // padding row: zeros
    if (part == 0)
      for (int i = threadIdx.x; i < G * hd; i += kThreads) out[i] = to<T>(0.0f);
    return;
  }
  const int start = part * PT;
  if (start >= len) return;
  const int n = min(PT, len - start);  // tokens of this partition
  const int nparts = (len + PT - 1) / PT;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  const SmemLayout lay(PT, hd, p.gb, MAX_G, sizeof(T), p.tpt);
  unsigned char* k_s = smem_raw + lay.k_off;
  unsigned char* v_s = smem_raw + lay.v_off;
  float* q_s = reinterpret_cast<float*>(smem_raw + lay.q_off);
  float* p_s = reinterpret_cast<float*>(smem_raw + lay.p_off);
  int64_t* rows_s = reinterpret_cast<int64_t*>(smem_raw + lay.rows_off);
  float* o_s = reinterpret_cast<float*>(k_s);  // after the scores
  __shared__ float red_s[kWarps][MAX_G];
  __shared__ float M_s[MAX_G];
  const int warp = threadIdx.x / 32, wl = threadIdx.x % 32;

  // The partition's cache rows and (RoPE) the rotation's cos/sin per head dimension, each computed once.
  __shared__ float cos_s[128], sin_s[128];  // hd ≤ 128
  const int* table = p.block_tables + s * p.bt_stride;
  for (int i = threadIdx.x; i < n; i += kThreads) rows_s[i] = cache_row(p, table, start + i) * p.KV + kvh;
  if constexpr (ROPE) rope_tables<T>(p, s, hd, cos_s, sin_s);
  __syncthreads();  // rows_s, cos_s, sin_s

  // K and V rows of the partition → shared tiles, every 16-byte piece in flight at once.
  const int NT = hd / E, groups = kThreads / NT, grp = threadIdx.x / NT, lane = threadIdx.x % NT;
  T* kc = static_cast<T*>(p.k_cache);
  T* vc = static_cast<T*>(p.v_cache);
  const int vr = NT, vr_shift = __ffs(NT) - 1;  // 16-byte pieces per row (a power of two)
  for (int i = threadIdx.x; i < n * vr; i += kThreads) {
    const int t = i >> vr_shift, piece = i & (vr - 1);
    const int64_t at = rows_s[t] * hd + piece * E;
    cp_async16(k_s + t * lay.row_bytes + piece * 16, kc + at);
    cp_async16(v_s + t * lay.row_bytes + piece * 16, vc + at);
  }

  // While they fly: q rows (rotated) to shared memory, as float, by groups of NT lanes; the trip count is uniform
  // so whole warps reach rotate's shuffles.
  float c[E], sn[E];
  if constexpr (ROPE) lane_rope<E>(cos_s, sin_s, lane, c, sn);
  const T* qbase = static_cast<const T*>(p.q) + s * p.q_stride + (static_cast<int64_t>(kvh) * p.G + split * p.gb) * hd +
                   lane * E;
  for (int g0 = 0; g0 < G; g0 += groups) {
    const int g = g0 + grp;
    float x[E];
    load_q_row<T, E, ROPE>(qbase, g, G, hd, c, sn, lane, NT, x);
    if (g < G)
#pragma unroll
      for (int j = 0; j < E; ++j) q_s[g * hd + lane * E + j] = x[j];
  }
  cp_async_wait_all();
  if constexpr (ROPE) {
    __syncthreads();  // every copy landed before the new token's row is overwritten
    // The new token (len − 1) is in the last partition: its block rotates k, writes k and v to the cache (later
    // steps read them) and over the copies in its tiles (the copies may predate the write).
    if (part == nparts - 1) {
      const int64_t slot = index_at(p.slots, p.slot64, s);
      if (slot >= 0) {  // every group rotates (whole warps shuffle); group 0 stores
        Vec<T, E> ko, vo;
        new_token_kv<T, E>(p, s, kvh, hd, c, sn, lane, NT, ko, vo);
        if (grp == 0) {
          if (split == 0) {  // one block per KV head writes the cache
            store_vec<T, E>(kc + (slot * p.KV + kvh) * hd + lane * E, ko);
            store_vec<T, E>(vc + (slot * p.KV + kvh) * hd + lane * E, vo);
          }
          const int nt = n - 1;  // the new token's row in the tiles
          store_vec<T, E>(reinterpret_cast<T*>(k_s + nt * lay.row_bytes) + lane * E, ko);
          store_vec<T, E>(reinterpret_cast<T*>(v_s + nt * lay.row_bytes) + lane * E, vo);
        }
      }
    }
  }
  __syncthreads();  // tiles complete (every thread waited for its own copies)

  // Phase 1, scores: token i / TPT; its TPT threads take interleaved 16-byte vectors of the head dimension (adjacent
  // lanes, adjacent banks) and their sums meet by shuffles.
  const int TPT = p.tpt;
  const int tok = threadIdx.x / TPT, sl = threadIdx.x % TPT;
  float sc[MAX_G];
  {
    float dot[MAX_G];
#pragma unroll
    for (int g = 0; g < MAX_G; ++g) dot[g] = 0.0f;
    if (tok < n) {
      const T* krow = reinterpret_cast<const T*>(k_s + tok * lay.row_bytes);
      const float* qrow = q_s;
      for (int d0 = sl * E; d0 < hd; d0 += TPT * E) {
        const Vec<T, E> kv = *reinterpret_cast<const Vec<T, E>*>(krow + d0);
        float kf[E];
#pragma unroll
        for (int j = 0; j < E; ++j) kf[j] = static_cast<float>(kv.v[j]);
#pragma unroll
        for (int g = 0; g < MAX_G; ++g) {
          if (g < G) {
#pragma unroll
            for (int j = 0; j < E; j += 4) {
              const float4 qv = *reinterpret_cast<const float4*>(qrow + g * hd + d0 + j);
              dot[g] = fmaf(qv.x, kf[j], dot[g]);
              dot[g] = fmaf(qv.y, kf[j + 1], dot[g]);
              dot[g] = fmaf(qv.z, kf[j + 2], dot[g]);
              dot[g] = fmaf(qv.w, kf[j + 3], dot[g]);
            }
          }
        }
      }
    }
#pragma unroll
    for (int g = 0; g < MAX_G; ++g) {
      for (int off = TPT / 2; off > 0; off >>= 1) dot[g] += __shfl_xor_sync(0xffffffffu, dot[g], off);
      // q·k and the scaling each rounded to T, as the spec
      sc[g] = tok < n && g < G ? static_cast<float>(to<T>(static_cast<float>(to<T>(dot[g])) * p.scale)) : -INFINITY;
    }
  }
  // One max per head over the partition (the TPT copies of a score are equal: max does not mind).
#pragma unroll
  for (int g = 0; g < MAX_G; ++g) {
    const float m = warp_max(sc[g]);
    if (wl == 0) red_s[warp][g] = m;
  }
  __syncthreads();
  float mx[MAX_G];
#pragma unroll
  for (int g = 0; g < MAX_G; ++g) {
    mx[g] = red_s[0][g];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) mx[g] = fmaxf(mx[g], red_s[w][g]);
    if (threadIdx.x == 0) M_s[g] = mx[g];
  }
  __syncthreads();  // red_s is reused for the sums
  // p = exp(score − M), kept in float32; slice 0 of each token stores it and counts it once in the sum.
#pragma unroll
  for (int g = 0; g < MAX_G; ++g) {
    const float e = tok < n && g < G ? expf(sc[g] - mx[g]) : 0.0f;
    if (tok < n && sl == 0) p_s[tok * MAX_G + g] = e;
    const float l = warp_sum(sl == 0 ? e : 0.0f);
    if (wl == 0) red_s[warp][g] = l;
  }
  __syncthreads();  // p_s, the sums; the K tile is free from here (o_s)

  // Phase 2, P·V: groups of R = hd / 4 lanes, lane li holds elements 4·li .. 4·li + 3 of every head's output.
  constexpr int E2 = 4;
  const int R = hd / E2, ngroups = kThreads / R, g2 = threadIdx.x / R, li = threadIdx.x % R;
  float acc[MAX_G][E2];
#pragma unroll
  for (int g = 0; g < MAX_G; ++g)
#pragma unroll
    for (int j = 0; j < E2; ++j) acc[g][j] = 0.0f;
  for (int t = g2; t < n; t += ngroups) {
    const Vec<T, E2> vv = *reinterpret_cast<const Vec<T, E2>*>(reinterpret_cast<const T*>(v_s + t * lay.row_bytes) +
                                                                 li * E2);
    float pr[MAX_G];  // the token's probabilities, 16-byte reads where the row allows
    if constexpr (MAX_G % 4 == 0) {
#pragma unroll
      for (int g = 0; g < MAX_G; g += 4) {
        const float4 v4 = *reinterpret_cast<const float4*>(p_s + t * MAX_G + g);
        pr[g] = v4.x;
        pr[g + 1] = v4.y;
        pr[g + 2] = v4.z;
        pr[g + 3] = v4.w;
      }
    } else {
#pragma unroll
      for (int g = 0; g < MAX_G; ++g) pr[g] = p_s[t * MAX_G + g];
    }
#pragma unroll
    for (int g = 0; g < MAX_G; ++g) {
      if (g >= G) break;
      const float pg = pr[g];
#pragma unroll
      for (int j = 0; j < E2; ++j) acc[g][j] = fmaf(pg, static_cast<float>(vv.v[j]), acc[g][j]);
    }
  }
  // The groups of a warp (lanes holding the same elements are R, 2R, ... apart) by shuffles, then the warps.
#pragma unroll
  for (int g = 0; g < MAX_G; ++g) {
    if (g >= G) break;
#pragma unroll
    for (int j = 0; j < E2; ++j) {
      for (int off = R; off < 32; off <<= 1) acc[g][j] += __shfl_xor_sync(0xffffffffu, acc[g][j], off);
      if (wl < R) o_s[(warp * G + g) * hd + li * E2 + j] = acc[g][j];
    }
  }
  __syncthreads();
  const int64_t P = p.P;
  for (int idx = threadIdx.x; idx < G * hd; idx += kThreads) {
    const int g = idx / hd, d = idx % hd;
    float o = 0.0f, L = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      o += o_s[(w * G + g) * hd + d];
      L += red_s[w][g];
    }
    if (nparts == 1) {
      out[idx] = to<T>(o * (1.0f / L));
    } else {
      p.part_o[((head_base + g) * P + part) * hd + d] = o;
      if (d == 0) {
        p.part_ml[((head_base + g) * P + part) * 2] = M_s[g];
        p.part_ml[((head_base + g) * P + part) * 2 + 1] = L;
      }
    }
  }
  if (nparts == 1) return;
  combine_partitions<T>(p, head_base, G, nparts, (s * p.KV + kvh) * p.hs + split, out);
}

// ---- Tensor-core path (attn_mma_kernel): bf16, head_dim 64 or 128, at most 16 query heads per KV head ----
// Block (partition of PT tokens, KV head, sequence), 4 warps. The K and V rows land in shared memory by cp.async
// (rows padded by 16 bytes: ldmatrix's eight row addresses hit distinct bank groups); the G query heads are the
// 16-row M side of mma.sync m16n8k16 (rows G..15 zero). Scores: warp w takes tokens [w·PT/4, (w+1)·PT/4), Q·Kᵀ
// with K rows as the col-major B operand. Softmax: one max and sum per head over the partition (warps meet in
// shared memory); p = exp(score − max) rounded to bf16 into shared memory (the MMA's A operand). P·V: warp w takes
// head dimensions [w·hd/4, (w+1)·hd/4), V through ldmatrix.trans. Partials and the combine as attn_decode_kernel.
template <int HD, int PT>
struct MmaLayout {
  static constexpr int kRow = HD * 2 + 16;   // bytes per K/V/Q row in shared memory
  static constexpr int kPRow = PT * 2 + 16;  // bytes per P row
  static constexpr int kK = 0, kV = PT * kRow, kQ = 2 * PT * kRow, kP = kQ + 16 * kRow, kRows = kP + 16 * kPRow;
  static constexpr int kBytes = kRows + PT * 8;
};

template <int HD, int PT, bool ROPE>
__global__ void __launch_bounds__(kThreads) attn_mma_kernel(const AttnParams p) {
  using T = at::BFloat16;
  using L = MmaLayout<HD, PT>;
  constexpr int E = kVec<T>, NT = HD / E;  // 16-byte pieces per row
  constexpr int TW = PT / kWarps;           // tokens per warp in the scores
  constexpr int DW = HD / kWarps;           // head dimensions per warp in P·V
  static_assert(TW % 8 == 0 && DW % 16 == 0 && PT % 16 == 0, "attn_mma_kernel: tile shape");
  if (p.pdl) pdl_trigger();
  const int part = blockIdx.x, kvh = blockIdx.y, s = blockIdx.z, G = p.G;
  const int64_t head_base = (static_cast<int64_t>(s) * p.KV + kvh) * G;
  T* out = static_cast<T*>(p.out) + head_base * HD;
  const int len = min(p.context_lens[s], p.max_context);
  if (len <= 0) {
    if (part == 0)
      for (int i = threadIdx.x; i < G * HD; i += kThreads) out[i] = to<T>(0.0f);
    return;
  }
  const int start = part * PT;
  if (start >= len) return;
  const int n = min(PT, len - start), nparts = (len + PT - 1) / PT;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* k_s = smem_raw + L::kK;
  unsigned char* v_s = smem_raw + L::kV;
  unsigned char* q_s = smem_raw + L::kQ;
  unsigned char* p_s = smem_raw + L::kP;
  int64_t* rows_s = reinterpret_cast<int64_t*>(smem_raw + L::kRows);
  __shared__ float cos_s[HD], sin_s[HD];
  __shared__ float red_m[kWarps][16], red_l[kWarps][16];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  const int* table = p.block_tables + s * p.bt_stride;
  for (int i = threadIdx.x; i < n; i += kThreads) rows_s[i] = cache_row(p, table, start + i) * p.KV + kvh;
  if constexpr (ROPE) rope_tables<T>(p, s, HD, cos_s, sin_s);
  __syncthreads();  // rows_s, cos_s, sin_s

  T* kc = static_cast<T*>(p.k_cache);
  T* vc = static_cast<T*>(p.v_cache);
  for (int i = threadIdx.x; i < n * NT; i += kThreads) {
    const int t = i / NT, piece = i % NT;
    const int64_t at = rows_s[t] * HD + piece * E;
    cp_async16(k_s + t * L::kRow + piece * 16, kc + at);
    cp_async16(v_s + t * L::kRow + piece * 16, vc + at);
  }
  // V rows past the context meet p = 0 in P·V: zeros, not whatever the buffer held (0 · NaN is NaN).
  for (int i = n * NT + threadIdx.x; i < PT * NT; i += kThreads)
    *reinterpret_cast<uint4*>(v_s + (i / NT) * L::kRow + (i % NT) * 16) = make_uint4(0, 0, 0, 0);

  // q rows (rotated, rounded to bf16 as rope_kv_write) → shared memory rows 0..15, zeros past G; groups of NT lanes.
  const int groups = kThreads / NT, grp = threadIdx.x / NT, gl = threadIdx.x % NT;
  float c[E], sn[E];
  if constexpr (ROPE) lane_rope<E>(cos_s, sin_s, gl, c, sn);
  const T* qbase = static_cast<const T*>(p.q) + s * p.q_stride + static_cast<int64_t>(kvh) * G * HD + gl * E;
  for (int g0 = 0; g0 < 16; g0 += groups) {
    const int g = g0 + grp;
    float x[E];
    load_q_row<T, E, ROPE>(qbase, g, G, HD, c, sn, gl, NT, x);
    Vec<T, E> qo;
#pragma unroll
    for (int j = 0; j < E; ++j) qo.v[j] = to<T>(x[j]);
    store_vec<T, E>(reinterpret_cast<T*>(q_s + g * L::kRow) + gl * E, qo);
  }
  cp_async_wait_all();
  if constexpr (ROPE) {
    __syncthreads();  // every copy landed before the new token's row is overwritten
    if (part == nparts - 1) {
      const int64_t slot = index_at(p.slots, p.slot64, s);
      if (slot >= 0 && threadIdx.x < 32) {  // one warp: NT ≤ 16 lanes hold the row; whole-warp shuffles
        const int l = threadIdx.x % NT;  // warp 0's lanes: their group lane is their lane modulo NT, as gl
        Vec<T, E> ko, vo;
        new_token_kv<T, E>(p, s, kvh, HD, c, sn, l, NT, ko, vo);
        if (threadIdx.x < NT) {
          store_vec<T, E>(kc + (slot * p.KV + kvh) * HD + l * E, ko);
          store_vec<T, E>(vc + (slot * p.KV + kvh) * HD + l * E, vo);
          store_vec<T, E>(reinterpret_cast<T*>(k_s + (n - 1) * L::kRow) + l * E, ko);
          store_vec<T, E>(reinterpret_cast<T*>(v_s + (n - 1) * L::kRow) + l * E, vo);
        }
      }
    }
  }
  __syncthreads();  // tiles and q complete

  // Scores: S[g, t] for this warp's TW tokens. A = Q (16 × HD), from ldmatrix rows lane % 16, k half lane / 16.
  constexpr int KS = HD / 16, NQ = TW / 8;
  uint32_t qa[KS][4];
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) ldmatrix_x4(qa[ks], q_s + (lane % 16) * L::kRow + (ks * 16 + (lane / 16) * 8) * 2);
  float sc[NQ][4];
#pragma unroll
  for (int j = 0; j < NQ; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) sc[j][e] = 0.0f;
    const int tb = warp * TW + j * 8;
#pragma unroll
    for (int k2 = 0; k2 < KS / 2; ++k2) {  // four 8×8 tiles: this n tile's token rows, dimensions k2·32 + 8·(lane / 8)
      uint32_t b[4];
      ldmatrix_x4(b, k_s + (tb + lane % 8) * L::kRow + (k2 * 32 + (lane / 8) * 8) * 2);
      mma_bf16(sc[j], qa[2 * k2], b[0], b[1]);
      mma_bf16(sc[j], qa[2 * k2 + 1], b[2], b[3]);
    }
  }
  // Fragment (j, e): head row lane / 4 (+ 8 for e ≥ 2), token warp·TW + 8j + 2·(lane % 4) + (e % 2).
  const int r0 = lane / 4;
  float m_lo = -INFINITY, m_hi = -INFINITY;
#pragma unroll
  for (int j = 0; j < NQ; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int t = warp * TW + j * 8 + 2 * (lane % 4) + (e % 2), g = r0 + (e >= 2 ? 8 : 0);
      // q·k and the scaling each rounded to bf16, as the spec; masked past the context and past G
      const float v = static_cast<float>(to<T>(static_cast<float>(to<T>(sc[j][e])) * p.scale));
      sc[j][e] = t < n && g < G ? v : -INFINITY;
      if (e < 2) m_lo = fmaxf(m_lo, sc[j][e]);
      else m_hi = fmaxf(m_hi, sc[j][e]);
    }
  }
#pragma unroll
  for (int off = 1; off < 4; off <<= 1) {
    m_lo = fmaxf(m_lo, __shfl_xor_sync(0xffffffffu, m_lo, off));
    m_hi = fmaxf(m_hi, __shfl_xor_sync(0xffffffffu, m_hi, off));
  }
  if (lane % 4 == 0) {
    red_m[warp][r0] = m_lo;
    red_m[warp][r0 + 8] = m_hi;
  }
  __syncthreads();
  float M_lo = red_m[0][r0], M_hi = red_m[0][r0 + 8];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) {
    M_lo = fmaxf(M_lo, red_m[w][r0]);
    M_hi = fmaxf(M_hi, red_m[w][r0 + 8]);
  }
  float l_lo = 0.0f, l_hi = 0.0f;
#pragma unroll
  for (int j = 0; j < NQ; ++j) {
    const int t = warp * TW + j * 8 + 2 * (lane % 4);
    float e[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {  // −inf scores (masked) give 0, and rows past G (max −inf) too
      const float M = k < 2 ? M_lo : M_hi;
      e[k] = sc[j][k] == -INFINITY ? 0.0f : expf(sc[j][k] - M);
    }
    l_lo += e[0] + e[1];
    l_hi += e[2] + e[3];
    *reinterpret_cast<uint32_t*>(p_s + r0 * L::kPRow + t * 2) = pack_bf16(e[0], e[1]);
    *reinterpret_cast<uint32_t*>(p_s + (r0 + 8) * L::kPRow + t * 2) = pack_bf16(e[2], e[3]);
  }
#pragma unroll
  for (int off = 1; off < 4; off <<= 1) {
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, off);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, off);
  }
  if (lane % 4 == 0) {
    red_l[warp][r0] = l_lo;
    red_l[warp][r0 + 8] = l_hi;
  }
  __syncthreads();  // P and the sums

  // P·V for this warp's DW head dimensions: A = P (16 × PT), B = V (PT × DW) through ldmatrix.trans.
  constexpr int NV = DW / 8;
  float acc[NV][4];
#pragma unroll
  for (int j = 0; j < NV; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0.0f;
#pragma unroll
  for (int kt = 0; kt < PT / 16; ++kt) {
    uint32_t pa[4];
    ldmatrix_x4(pa, p_s + (lane % 16) * L::kPRow + (kt * 16 + (lane / 16) * 8) * 2);
#pragma unroll
    for (int j = 0; j < NV; j += 2) {  // tiles: (tokens lo, dims j), (hi, j), (lo, j + 1), (hi, j + 1)
      const int m = lane / 8;
      uint32_t b[4];
      ldmatrix_x4_trans(b, v_s + (kt * 16 + (m % 2) * 8 + lane % 8) * L::kRow +
                               (warp * DW + (j + m / 2) * 8) * 2);
      mma_bf16(acc[j], pa, b[0], b[1]);
      mma_bf16(acc[j + 1], pa, b[2], b[3]);
    }
  }
  float L_lo = 0.0f, L_hi = 0.0f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    L_lo += red_l[w][r0];
    L_hi += red_l[w][r0 + 8];
  }
  const int64_t P = p.P;
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    const int d = warp * DW + j * 8 + 2 * (lane % 4);
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // rows r0 and r0 + 8
      const int g = r0 + 8 * h;
      if (g >= G) continue;
      const float o0 = acc[j][2 * h], o1 = acc[j][2 * h + 1], Lg = h ? L_hi : L_lo;
      if (nparts == 1) {
        out[g * HD + d] = to<T>(o0 * (1.0f / Lg));
        out[g * HD + d + 1] = to<T>(o1 * (1.0f / Lg));
      } else {
        float* po = p.part_o + ((head_base + g) * P + part) * HD + d;
        *reinterpret_cast<float2*>(po) = make_float2(o0, o1);
        if (warp == 0 && j == 0 && lane % 4 == 0) {
          p.part_ml[((head_base + g) * P + part) * 2] = h ? M_hi : M_lo;
          p.part_ml[((head_base + g) * P + part) * 2 + 1] = Lg;
        }
      }
    }
  }
  if (nparts == 1) return;
  combine_partitions<T>(p, head_base, G, nparts, s * p.KV + kvh, out);
}

// Arrival counters that every launch leaves at zero (the last block of a sequence, KV head and split resets its
// own), so the decode step needs no memset node per layer: one zeroed buffer per device, made on first use outside
// a stream capture. nullptr when a launch needs more counters than it holds, or when it could not be made (first
// use inside a capture): that launch zeroes counters in its workspace by a memset, as before.
constexpr int64_t kPersistentArrivals = int64_t{1} << 16;

int* persistent_arrivals(int64_t count, cudaStream_t stream) {
  if (count > kPersistentArrivals) return nullptr;
  static std::mutex mu;
  static int* buffers[64] = {};
  int dev = 0;
  RLAIF_CHECK(cudaGetDevice(&dev) == cudaSuccess && dev < 64, "paged_attention_decode_cuda: device {}", dev);
  const std::lock_guard<std::mutex> lock(mu);
  if (buffers[dev] != nullptr) return buffers[dev];
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  RLAIF_CHECK(cudaStreamIsCapturing(stream, &capture) == cudaSuccess, "paged_attention_decode_cuda: capture status");
  if (capture != cudaStreamCaptureStatusNone) return nullptr;
  int* b = nullptr;
  if (cudaMalloc(&b, sizeof(int) * kPersistentArrivals) != cudaSuccess) {
    (void)cudaGetLastError();  // e.g. another thread's capture forbids it now: fall back, try again later
    return nullptr;
  }
  const cudaError_t e = cudaMemset(b, 0, sizeof(int) * kPersistentArrivals);
  RLAIF_CHECK(e == cudaSuccess, "paged_attention_decode_cuda: zeroing the arrival counters: {}", cudaGetErrorString(e));
  buffers[dev] = b;  // kept for the process's life, like the CUDA context
  return b;
}

template <typename T>
void launch(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& block_tables,
            const at::Tensor& context_lens, int64_t block_size, int64_t max_context, double scale,
            const at::Tensor& out, const RopeKvInputs* rope) {
  constexpr int E = kVec<T>;
  const int64_t S = q.size(0), H = q.size(1), hd = q.size(2), KV = k_cache.size(1), G = H / KV;
  if (S == 0) return;
  const int64_t NT = hd / E;
  RLAIF_CHECK(hd % E == 0 && hd <= 128 && NT <= 32 && (NT & (NT - 1)) == 0,
              "paged_attention_decode_cuda: head_dim {} unsupported for {} (want {} times a power of two, at most 128)",
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

  // Partition length 128, 64 or 32 tokens: the longest that still gives every SM four blocks (fewer partials to
  // combine), decided by max_context only so a captured graph stays valid. Short partitions split each token's
  // score over 2 or 4 threads so the whole block works.
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  auto parts = [&](int64_t pt) { return std::max<int64_t>(1, (max_context + pt - 1) / pt); };
  int64_t part_tokens = kThreads;
  while (part_tokens > 32 && S * KV * parts(part_tokens) < 4 * sms) part_tokens /= 2;
  const int64_t P = parts(part_tokens);
  // The tensor-core kernel takes bf16 with head_dim 64 or 128 and up to 16 query heads per KV head (the MMA's M);
  // it serves all of a KV head's query heads in one block, so it runs where the grid has two blocks per SM without
  // splitting them. Smaller grids (a few sequences) keep the SIMT kernel and its head split: H100, 3B heads, batch
  // 1, ctx 512: 8.6 µs SIMT against 10.6 µs tensor core; batch 16: 21.3 against 14.9 (session 8).
  const bool mma = std::is_same_v<T, at::BFloat16> && attention_kernel() == AttentionKernel::kTensorCore &&
                   (hd == 64 || hd == 128) && G <= 16 && S * KV * P >= 2 * sms;
  // Too few blocks still (a single sequence): the SIMT kernel splits the KV head's query heads over blocks, each
  // reading the partition's K/V (from L2 after the first) for fewer heads, so the chain per block is shorter.
  int64_t hs = 1;
  while (!mma && hs < G && S * KV * P * hs < 2 * sms) hs *= 2;
  const int64_t gb = (G + std::min(hs, G) - 1) / std::min(hs, G);
  hs = (G + gb - 1) / gb;
  const int64_t tpt = kThreads / part_tokens;
  // Workspace from the caching allocator on the current stream (capture-safe under at::cuda::CUDAGraph); the
  // arrival counters are the persistent ones, or else the workspace's, zeroed by a memset on the stream.
  const int64_t floats = S * H * P * (2 + hd);
  int* arrivals = persistent_arrivals(S * KV * hs, stream);
  at::Tensor ws = at::empty({floats + (arrivals ? 0 : S * KV * hs)}, q.options().dtype(at::kFloat));
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
  p.tpt = static_cast<int>(tpt);
  p.hs = static_cast<int>(hs);
  p.pdl = programmatic_launch();
  p.gb = static_cast<int>(gb);
  p.scale = static_cast<float>(scale);
  p.part_o = ws.data_ptr<float>();  // first: its float4 reads need 16-byte alignment
  p.part_ml = p.part_o + S * H * P * hd;
  p.arrivals = arrivals ? arrivals : reinterpret_cast<int*>(p.part_o + floats);
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
  if (arrivals == nullptr) {
    const cudaError_t err = cudaMemsetAsync(p.arrivals, 0, sizeof(int) * S * KV * hs, stream);
    RLAIF_CHECK(err == cudaSuccess, "paged_attention_decode_cuda: memset failed: {}", cudaGetErrorString(err));
  }

  const dim3 grid(static_cast<unsigned>(P), static_cast<unsigned>(KV * hs), static_cast<unsigned>(S));
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (mma) {
      auto run = [&](auto hd_c, auto pt_c) {
        constexpr int HD = decltype(hd_c)::value, PT = decltype(pt_c)::value;
        const size_t smem = MmaLayout<HD, PT>::kBytes;
        auto kernel = rope ? attn_mma_kernel<HD, PT, true> : attn_mma_kernel<HD, PT, false>;
        allow_dynamic_smem(kernel, smem, "paged_attention_decode_cuda");
        kernel<<<grid, kThreads, smem, stream>>>(p);
        check_launch("attn_mma_kernel");
      };
      auto with_hd = [&](auto hd_c) {
        if (part_tokens == 128) run(hd_c, std::integral_constant<int, 128>{});
        else if (part_tokens == 64) run(hd_c, std::integral_constant<int, 64>{});
        else run(hd_c, std::integral_constant<int, 32>{});
      };
      if (hd == 128) with_hd(std::integral_constant<int, 128>{});
      else with_hd(std::integral_constant<int, 64>{});
      return;
    }
  }
  auto go = [&](auto max_g) {
    constexpr int MG = decltype(max_g)::value;
    const size_t smem = SmemLayout(static_cast<int>(part_tokens), static_cast<int>(hd), static_cast<int>(gb), MG,
                                   static_cast<int>(sizeof(T)), static_cast<int>(tpt)).bytes;
    RLAIF_CHECK(smem <= 227 * 1024, "paged_attention_decode_cuda: shared memory {} bytes", smem);
    auto run = [&](auto kernel) {
      allow_dynamic_smem(kernel, smem, "paged_attention_decode_cuda");
      kernel<<<grid, kThreads, smem, stream>>>(p);
      check_launch("attn_decode_kernel");
    };
    if (rope) run(attn_decode_kernel<T, MG, true>);
    else run(attn_decode_kernel<T, MG, false>);
  };
  if (gb <= 1) go(std::integral_constant<int, 1>{});
  else if (gb <= 2) go(std::integral_constant<int, 2>{});
  else if (gb <= 4) go(std::integral_constant<int, 4>{});
  else if (gb <= 8) go(std::integral_constant<int, 8>{});
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
