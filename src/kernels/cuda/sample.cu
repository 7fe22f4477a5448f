// Sort-free sampling, one 1024-thread block per row: (1) max and argmax; (2) with top-k/top-p, the cut of the
// (y descending, index ascending) ranking by bisection on the order-preserving uint32 key of y, one block-wide
// count/mass pass per bit (over the row until the open range holds ≤ 2048 tokens, then over those, gathered in
// shared memory), and the cut's index among tied tokens by a tile scan; (3) per-tile float64 sums of the
// kept tokens' exp(y − max y) (tiles of 256 tokens, one warp each) and the raw normaliser; (4) one warp scans the
// tile sums for the tile holding u·Σ, then that tile's 256 tokens for the token. Everything stays on the device
// (no allocation, no host sync), so the sampler is part of the decode step's CUDA graph.
#include "kernels/cuda/sample.h"

#include <cfloat>
#include <cmath>

#include "kernels/cuda/common.cuh"

namespace rlaif::kernels {

namespace {

using namespace cuda_detail;

constexpr int kThreads = 1024;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int kPerLane = 8;
constexpr int kTile = 32 * kPerLane;
constexpr int kCand = 2048;  // bisection candidates held in shared memory

__device__ __forceinline__ double warp_sum_d(double x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// Inclusive prefix sum over the warp's lanes.
__device__ __forceinline__ double warp_scan_d(double x) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const double y = __shfl_up_sync(0xffffffffu, x, off);
    if (lane >= off) x += y;
  }
  return x;
}

// Sums of N values over the block in float64, in place; every thread gets them. partial holds N·kWarpsPerBlock.
template <int N>
__device__ void block_sum_d(double (&v)[N], double* partial) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int n = 0; n < N; ++n) v[n] = warp_sum_d(v[n]);
  __syncthreads();  // partial may still be read by an earlier call
  if (lane == 0)
#pragma unroll
    for (int n = 0; n < N; ++n) partial[n * kWarpsPerBlock + warp] = v[n];
  __syncthreads();
#pragma unroll
  for (int n = 0; n < N; ++n) v[n] = warp_sum_d(lane < kWarpsPerBlock ? partial[n * kWarpsPerBlock + lane] : 0.0);
}

// uint32 key with the order of the float (−0 and +0 equal, as a float compare has them), and its inverse.
__device__ __forceinline__ uint32_t key_of(float y) {
  const uint32_t b = y == 0.0f ? 0u : __float_as_uint(y);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float value_of(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// tile_sum[c] = Σ w(i) over the 256 tokens of tile c (one warp per tile); the caller syncs before reading.
template <typename W>
__device__ void tile_sums(const W& w, int64_t V, double* tile_sum) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t tiles = (V + kTile - 1) / kTile;
  for (int64_t tile = warp; tile < tiles; tile += kWarpsPerBlock) {
    double part = 0.0;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int64_t i = tile * kTile + lane * kPerLane + j;
      if (i >= V) break;
      part += w(i);
    }
    part = warp_sum_d(part);
    if (lane == 0) tile_sum[tile] = part;
  }
}

// One warp: the first index whose cumulative w (index order) exceeds target, or, when rounding put the target
// past the end, the last index with w > 0. w must give the values tile_sums summed; every lane gets the index.
template <typename W>
__device__ int64_t find_first(const W& w, double target, int64_t V, const double* tile_sum) {
  const int lane = threadIdx.x % 32;
  const int64_t tiles = (V + kTile - 1) / kTile;
  double base = 0.0;
  int64_t tile = -1, last_nonzero = 0;
  for (int64_t c0 = 0; c0 < tiles && tile < 0; c0 += 32) {
    const double v = c0 + lane < tiles ? tile_sum[c0 + lane] : 0.0;
    const double incl = warp_scan_d(v);
    const unsigned pass = __ballot_sync(0xffffffffu, base + incl > target);
    const unsigned nz = __ballot_sync(0xffffffffu, v > 0.0);
    if (nz) last_nonzero = c0 + 31 - __clz(nz);
    if (pass) {
      const int first = __ffs(pass) - 1;
      tile = c0 + first;
      base += __shfl_sync(0xffffffffu, incl - v, first);
    } else {
      base += __shfl_sync(0xffffffffu, incl, 31);
    }
  }
  if (tile < 0) tile = last_nonzero, base = -HUGE_VAL;  // nothing passes below: the last token with w > 0
  // Inside the tile: this lane's kPerLane tokens, then the lanes' prefix.
  double e[kPerLane], part = 0.0;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int64_t i = tile * kTile + lane * kPerLane + j;
    e[j] = i < V ? w(i) : 0.0;
    part += e[j];
  }
  const double incl = warp_scan_d(part);
  const unsigned pass = __ballot_sync(0xffffffffu, base + incl > target);
  const unsigned nz = __ballot_sync(0xffffffffu, part > 0.0);
  int64_t pick = -1;
  const int owner = pass ? __ffs(pass) - 1 : (nz ? 31 - __clz(nz) : 0);
  if (lane == owner) {
    double cum = base + incl - part;
    int last = 0;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      if (e[j] > 0.0) last = j;
      cum += e[j];
      if (pick < 0 && cum > target) pick = j;
    }
    if (pick < 0) pick = last;
    pick += tile * kTile + lane * kPerLane;
  }
  return __shfl_sync(0xffffffffu, pick, owner);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    sample_kernel(const T* __restrict__ logits, int64_t row_stride, int64_t V, const float* __restrict__ temperature,
                  const int32_t* __restrict__ top_k, const float* __restrict__ top_p,
                  const float* __restrict__ min_p, const double* __restrict__ uniform, int64_t* tokens,
                  float* logprobs) {
  extern __shared__ double tile_sum[];  // [ceil(V / kTile)]
  __shared__ double partial[4 * kWarpsPerBlock];
  __shared__ float warp_max[kWarpsPerBlock];
  __shared__ int64_t warp_arg[kWarpsPerBlock];
  __shared__ int64_t found;
  __shared__ uint32_t cand_key[kCand];  // bisection candidates: key and e
  __shared__ float cand_e[kCand];
  __shared__ int n_cand_s;
  const int64_t s = blockIdx.x;
  const T* l = logits + s * row_stride;
  const float t = temperature[s];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;

  // (1) max and the first index holding it.
  float best = -FLT_MAX;
  int64_t arg = V;
  for (int64_t i = threadIdx.x; i < V; i += kThreads) {
    const float x = static_cast<float>(l[i]);
    if (x > best || (x == best && i < arg)) best = x, arg = i;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float ob = __shfl_xor_sync(0xffffffffu, best, off);
    const int64_t oa = __shfl_xor_sync(0xffffffffu, arg, off);
    if (ob > best || (ob == best && oa < arg)) best = ob, arg = oa;
  }
  if (lane == 0) warp_max[warp] = best, warp_arg[warp] = arg;
  __syncthreads();
  if (warp == 0) {
    best = warp_max[lane];
    arg = warp_arg[lane];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, off);
      const int64_t oa = __shfl_xor_sync(0xffffffffu, arg, off);
      if (ob > best || (ob == best && oa < arg)) best = ob, arg = oa;
    }
    if (lane == 0) warp_max[0] = best, warp_arg[0] = arg;
  }
  __syncthreads();
  const float m = warp_max[0];
  const bool greedy = !(t > 0.0f);
  const float mt = greedy ? m : m / t;
  const int32_t k = top_k ? top_k[s] : 0;
  const float p = top_p ? top_p[s] : 1.0f, mp = fminf(min_p ? min_p[s] : 0.0f, 1.0f);
  const bool use_k = !greedy && k > 0 && k < V, use_p = !greedy && p < 1.0f, use_m = !greedy && mp > 0.0f;
  const auto y_of = [&](int64_t i) { return static_cast<float>(l[i]) / t; };

  // (2) the kept prefix: key > cut_key, or key == cut_key and index < cut_idx.
  uint32_t cut_key = 0;
  int64_t cut_idx = V;
  if (use_k || use_p) {
    // Counts over the row: [0] tokens with key ≥ thr, [1] with key == thr, [2] mass (Σ e) of key > thr, [3] of
    // key ≥ thr. Once a bisection's open range [lo, hi) holds ≤ kCand tokens they are gathered into shared memory
    // and the remaining passes read only them (plus the fixed count/mass at or above hi).
    bool gathered = false;
    int n_cand = 0;
    double c_hi = 0.0, m_hi = 0.0;
    const auto count = [&](uint32_t thr, bool mass, double (&c)[4]) {
      c[0] = c[1] = c[2] = c[3] = 0.0;
      const int64_t n = gathered ? n_cand : V;
      for (int64_t i = threadIdx.x; i < n; i += kThreads) {
        const float y = gathered ? 0.0f : y_of(i);
        const uint32_t key = gathered ? cand_key[i] : key_of(y);
        if (key < thr) continue;
        c[0] += 1.0;
        if (key == thr) c[1] += 1.0;
        if (mass) {
          const double e = gathered ? cand_e[i] : expf(y - mt);
          c[3] += e;
          if (key > thr) c[2] += e;
        }
      }
      block_sum_d(c, partial);
      if (gathered) c[0] += c_hi, c[2] += m_hi, c[3] += m_hi;
    };
    const auto gather = [&](uint32_t lo, uint64_t hi) {
      if (threadIdx.x == 0) n_cand_s = 0;
      __syncthreads();
      double above[2] = {0.0, 0.0};  // count and mass at or above hi
      for (int64_t i0 = 0; i0 < V; i0 += kThreads) {
        const int64_t i = i0 + threadIdx.x;
        float y = 0.0f;
        uint32_t key = 0;
        bool in = false;
        if (i < V) {
          y = y_of(i);
          key = key_of(y);
          in = key >= lo && key < hi;
          if (key >= hi) above[0] += 1.0, above[1] += expf(y - mt);
        }
        const unsigned b = __ballot_sync(0xffffffffu, in);
        if (b == 0) continue;
        const int leader = __ffs(b) - 1;
        int base = 0;
        if (lane == leader) base = atomicAdd(&n_cand_s, __popc(b));
        base = __shfl_sync(0xffffffffu, base, leader);
        if (in) {
          const int pos = base + __popc(b & ((1u << lane) - 1u));
          cand_key[pos] = key;
          cand_e[pos] = expf(y - mt);
        }
      }
      block_sum_d(above, partial);  // also orders the candidate writes before their reads
      c_hi = above[0], m_hi = above[1], n_cand = n_cand_s, gathered = true;
    };
    // The largest key K with ok(counts at K), given ok(counts at 0): one bit per pass from the top.
    const auto bisect = [&](auto ok, bool mass) {
      gathered = false;
      uint32_t lo = 0;
      uint64_t hi = uint64_t{1} << 32;
      double c_lo = V, c[4];
      c_hi = m_hi = 0.0;
      for (int bit = 31; bit >= 0; --bit) {
        if (!gathered && c_lo - c_hi <= kCand) gather(lo, hi);
        const uint32_t cand = lo | (1u << bit);
        count(cand, mass, c);
        if (ok(c)) lo = cand, c_lo = c[0];
        else hi = cand, c_hi = gathered ? c_hi : c[0];
      }
      return lo;
    };
    double c[4];
    // Top-k: the largest key with at least k tokens at or above it; take k minus those above of its ties.
    uint32_t kc = 0;
    double take = V, ties = V, zk = 0.0;
    if (use_k) {
      kc = bisect([&](const double (&n)[4]) { return n[0] >= k; }, false);
      count(kc, use_p, c);
      ties = c[1], take = k - (c[0] - c[1]);
      zk = c[2] + take * static_cast<double>(expf(value_of(kc) - mt));
    } else if (use_p) {
      count(0, true, c);
      zk = c[3];
    }
    // Top-p: the largest key whose mass at or above reaches p·Z_k; of its ties, those with prefix mass < p·Z_k.
    if (use_p) {
      const double target = static_cast<double>(p) * zk;
      uint32_t pc = key_of(mt);  // p ≤ 0: only rank 0 (the max, first index)
      double take_p = 1.0;
      gathered = false;  // the full row again (top-k's candidates cover another range)
      if (target > 0.0) pc = bisect([&](const double (&n)[4]) { return n[3] >= target; }, true);
      count(pc, true, c);
      if (target > 0.0) {
        const double e = expf(value_of(pc) - mt);
        take_p = e > 0.0 ? fmin(c[1], ceil((target - c[2]) / e)) : c[1];
        take_p = fmax(take_p, 1.0);
      }
      if (!use_k || pc > kc) kc = pc, take = take_p, ties = c[1];
      else if (pc == kc) take = fmin(take, take_p);
    }
    cut_key = kc;
    if (take < ties) {  // the take-th tied token in index order is the last kept one
      const auto tie = [&](int64_t i) { return key_of(y_of(i)) == kc ? 1.0 : 0.0; };
      tile_sums(tie, V, tile_sum);
      __syncthreads();
      if (warp == 0) {
        const int64_t i = find_first(tie, take - 0.5, V, tile_sum);
        if (lane == 0) found = i + 1;
      }
      __syncthreads();
      cut_idx = found;
    }
  }

  // (3) tile sums of the kept tokens' exp(y − max y), and the raw normaliser Σ exp(x − max).
  const bool cut = use_k || use_p;
  const auto weight = [&](int64_t i) -> double {
    const float x = static_cast<float>(l[i]);
    if (t == 1.0f && !cut && !use_m) return expf(x - m);
    const float y = x / t;
    const float e = expf(y - mt);
    if (use_m && !(e >= mp)) return 0.0;
    if (cut) {
      const uint32_t key = key_of(y);
      if (key < cut_key || (key == cut_key && i >= cut_idx)) return 0.0;
    }
    return e;
  };
  double z_raw = 0.0;
  if (greedy) {
    for (int64_t i = threadIdx.x; i < V; i += kThreads) z_raw += expf(static_cast<float>(l[i]) - m);
  } else {
    tile_sums([&](int64_t i) {
      z_raw += expf(static_cast<float>(l[i]) - m);
      return weight(i);
    }, V, tile_sum);
  }
  {
    double zr[1] = {z_raw};
    block_sum_d(zr, partial);  // also orders the tile_sum writes before the scan
    z_raw = zr[0];
  }

  // (4) the tile where the cumulative sum passes u·Σ, then the token inside it.
  if (warp == 0) {
    int64_t tok = warp_arg[0];
    double z = 0.0;
    if (!greedy) {
      const int64_t tiles = (V + kTile - 1) / kTile;
      for (int64_t c0 = lane; c0 < tiles; c0 += 32) z += tile_sum[c0];
      z = warp_sum_d(z);
      tok = find_first(weight, uniform[s] * z, V, tile_sum);
    }
    if (lane == 0) {
      const float x = static_cast<float>(l[tok]);
      const float raw = x - m - static_cast<float>(log(z_raw));
      tokens[s] = tok;
      logprobs[2 * s] = raw;
      logprobs[2 * s + 1] = greedy ? raw : x / t - mt - static_cast<float>(log(z));
    }
  }
}

template <typename T>
void launch(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
            const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& uniform, const at::Tensor& tokens,
            const at::Tensor& logprobs) {
  const int64_t S = logits.size(0), V = logits.size(1);
  if (S == 0) return;
  const c10::cuda::CUDAGuard guard(logits.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const size_t shared = static_cast<size_t>((V + kTile - 1) / kTile) * sizeof(double);
  RLAIF_CHECK(shared <= 28 * 1024, "sample: vocabulary of {} needs {} bytes of tile sums, more than 28 KiB", V, shared);
  sample_kernel<T><<<static_cast<unsigned>(S), kThreads, shared, stream>>>(
      logits.data_ptr<T>(), logits.stride(0), V, temperature.data_ptr<float>(),
      top_k.defined() ? top_k.data_ptr<int32_t>() : nullptr, top_p.defined() ? top_p.data_ptr<float>() : nullptr,
      min_p.defined() ? min_p.data_ptr<float>() : nullptr, uniform.data_ptr<double>(), tokens.data_ptr<int64_t>(),
      logprobs.data_ptr<float>());
  check_launch("sample_kernel");
}

}  // namespace

void sample_cuda(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                 const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& uniform,
                 const at::Tensor& tokens, const at::Tensor& logprobs) {
  if (logits.scalar_type() == at::kFloat)
    launch<float>(logits, temperature, top_k, top_p, min_p, uniform, tokens, logprobs);
  else
    launch<at::BFloat16>(logits, temperature, top_k, top_p, min_p, uniform, tokens, logprobs);
}

}  // namespace rlaif::kernels
