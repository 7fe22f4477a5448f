// Sort-free sampling, one 1024-thread block per row: (1) max and argmax, (2) per-tile sums of exp(x − max) in
// float64 (tiles of 256 tokens, one warp each) and the raw normaliser, (3) one warp scans the tile sums for the
// tile holding u·Σ, then that tile's 256 tokens for the token. Everything stays on the device, so the sampler
// is part of the decode step's CUDA graph.
#include "kernels/cuda/sample.h"

#include <cfloat>

#include "kernels/cuda/common.cuh"

namespace rlaif::kernels {

namespace {

using namespace cuda_detail;

constexpr int kThreads = 1024;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int kPerLane = 8;
constexpr int kTile = 32 * kPerLane;

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

// Sum over the block in float64; every thread gets it.
__device__ double block_sum_d(double x, double* partial) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  x = warp_sum_d(x);
  __syncthreads();
  if (lane == 0) partial[warp] = x;
  __syncthreads();
  return warp_sum_d(lane < kWarpsPerBlock ? partial[lane] : 0.0);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) sample_kernel(const T* __restrict__ logits, int64_t row_stride, int64_t V,
                                                          const float* __restrict__ temperature,
                                                          const double* __restrict__ uniform, int64_t* tokens,
                                                          float* logprobs) {
  extern __shared__ double tile_sum[];  // [ceil(V / kTile)]
  __shared__ double partial[kWarpsPerBlock];
  __shared__ float warp_max[kWarpsPerBlock];
  __shared__ int64_t warp_arg[kWarpsPerBlock];
  const int64_t s = blockIdx.x;
  const T* l = logits + s * row_stride;
  const float t = temperature[s];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t tiles = (V + kTile - 1) / kTile;

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

  // (2) tile sums of exp(x/T − max/T) and the raw normaliser Σ exp(x − max).
  double z_raw = 0.0;
  for (int64_t tile = warp; tile < tiles; tile += kWarpsPerBlock) {
    double part = 0.0;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int64_t i = tile * kTile + lane * kPerLane + j;
      if (i >= V) break;
      const float x = static_cast<float>(l[i]);
      const float e_raw = expf(x - m);
      z_raw += e_raw;
      if (!greedy) part += t == 1.0f ? e_raw : expf(x / t - mt);
    }
    part = warp_sum_d(part);
    if (lane == 0) tile_sum[tile] = part;
  }
  z_raw = block_sum_d(z_raw, partial);  // also orders the tile_sum writes before the scan

  // (3) the tile where the cumulative sum passes u·Σ, then the token inside it.
  if (warp == 0) {
    int64_t tok = warp_arg[0];
    double z = 0.0;
    if (!greedy) {
      for (int64_t c = lane; c < tiles; c += 32) z += tile_sum[c];
      z = warp_sum_d(z);
      const double target = uniform[s] * z;
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
      if (tile < 0) tile = last_nonzero, base = target;  // rounding put u·Σ past the end: the last tile with mass
      // Inside the tile: this lane's kPerLane tokens, then the lanes' prefix.
      double e[kPerLane], part = 0.0;
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        const int64_t i = tile * kTile + lane * kPerLane + j;
        e[j] = i < V ? expf(static_cast<float>(l[i]) / t - mt) : 0.0;
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
      tok = __shfl_sync(0xffffffffu, pick, owner);
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
void launch(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& uniform,
            const at::Tensor& tokens, const at::Tensor& logprobs) {
  const int64_t S = logits.size(0), V = logits.size(1);
  if (S == 0) return;
  const c10::cuda::CUDAGuard guard(logits.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const size_t shared = static_cast<size_t>((V + kTile - 1) / kTile) * sizeof(double);
  RLAIF_CHECK(shared <= 48 * 1024, "sample: vocabulary of {} needs {} bytes of tile sums, more than 48 KiB", V, shared);
  sample_kernel<T><<<static_cast<unsigned>(S), kThreads, shared, stream>>>(
      logits.data_ptr<T>(), logits.stride(0), V, temperature.data_ptr<float>(), uniform.data_ptr<double>(),
      tokens.data_ptr<int64_t>(), logprobs.data_ptr<float>());
  check_launch("sample_kernel");
}

}  // namespace

void sample_cuda(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& uniform,
                 const at::Tensor& tokens, const at::Tensor& logprobs) {
  if (logits.scalar_type() == at::kFloat) launch<float>(logits, temperature, uniform, tokens, logprobs);
  else launch<at::BFloat16>(logits, temperature, uniform, tokens, logprobs);
}

}  // namespace rlaif::kernels
