// RoPE + KV-cache write: one block per token. The token's cos/sin table is computed once into shared memory
// (float32 cosf/sinf, rounded to the dtype), then threads rotate (x_i, x_{i+hd/2}) pairs of every q and k head.
#include "kernels/cuda/rope_kv_write.h"

#include "kernels/cuda/common.cuh"

namespace rlaif::kernels {

namespace {

using namespace cuda_detail;

constexpr int kThreads = 128;

__device__ __forceinline__ int64_t index_at(const void* p, bool is64, int64_t i) {
  return is64 ? static_cast<const int64_t*>(p)[i] : static_cast<const int32_t*>(p)[i];
}

// The rotated pair (x1 at i, x2 at i + half), each product and the sum rounded to T as ATen's three ops are.
template <typename T>
__device__ __forceinline__ void rotate_pair(T x1t, T x2t, T ct, T st, T& o1, T& o2) {
  const float x1 = static_cast<float>(x1t), x2 = static_cast<float>(x2t);
  const float c = static_cast<float>(ct), s = static_cast<float>(st);
  o1 = to<T>(static_cast<float>(to<T>(x1 * c)) + static_cast<float>(to<T>(-x2 * s)));
  o2 = to<T>(static_cast<float>(to<T>(x2 * c)) + static_cast<float>(to<T>(x1 * s)));
}

template <typename T>
__global__ void __launch_bounds__(kThreads) rope_kv_write_kernel(
    T* __restrict__ q, int64_t q_stride, const T* __restrict__ k, int64_t k_stride, const T* __restrict__ v,
    int64_t v_stride, const void* __restrict__ positions, bool pos64, const float* __restrict__ inv_freq,
    T* __restrict__ k_cache, T* __restrict__ v_cache, const void* __restrict__ slots, bool slot64, int H, int KV,
    int hd) {
  extern __shared__ unsigned char smem_raw[];
  T* cos_s = reinterpret_cast<T*>(smem_raw);
  T* sin_s = cos_s + hd / 2;
  const int64_t s = blockIdx.x;
  const int half = hd / 2;
  const float pos = static_cast<float>(index_at(positions, pos64, s));
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const float angle = pos * inv_freq[i];
    cos_s[i] = to<T>(cosf(angle));  // full-range cosf/sinf, never the __cosf intrinsics
    sin_s[i] = to<T>(sinf(angle));
  }
  __syncthreads();
  const int64_t slot = index_at(slots, slot64, s);
  T* qs = q + s * q_stride;
  const T* ks = k + s * k_stride;
  for (int idx = threadIdx.x; idx < (H + KV) * half; idx += blockDim.x) {
    const int head = idx / half, i = idx % half;
    if (head < H) {
      T* row = qs + head * hd;
      rotate_pair<T>(row[i], row[i + half], cos_s[i], sin_s[i], row[i], row[i + half]);
    } else if (slot >= 0) {
      const T* row = ks + (head - H) * hd;
      T* dst = k_cache + (slot * KV + head - H) * hd;
      rotate_pair<T>(row[i], row[i + half], cos_s[i], sin_s[i], dst[i], dst[i + half]);
    }
  }
  if (slot < 0) return;
  const T* vs = v + s * v_stride;
  T* vdst = v_cache + slot * KV * hd;
  for (int i = threadIdx.x; i < KV * hd; i += blockDim.x) vdst[i] = vs[i];
}

template <typename T>
void launch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
            const at::Tensor& inv_freq, const at::Tensor& k_cache, const at::Tensor& v_cache,
            const at::Tensor& slots) {
  const int64_t S = q.size(0);
  if (S == 0) return;
  const int H = static_cast<int>(q.size(1)), KV = static_cast<int>(k.size(1)), hd = static_cast<int>(q.size(2));
  const c10::cuda::CUDAGuard guard(q.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const size_t smem = sizeof(T) * hd;
  rope_kv_write_kernel<T><<<S, kThreads, smem, stream>>>(
      q.data_ptr<T>(), q.stride(0), k.data_ptr<T>(), k.stride(0), v.data_ptr<T>(), v.stride(0), positions.data_ptr(),
      positions.scalar_type() == at::kLong, inv_freq.data_ptr<float>(), k_cache.data_ptr<T>(), v_cache.data_ptr<T>(),
      slots.data_ptr(), slots.scalar_type() == at::kLong, H, KV, hd);
  check_launch("rope_kv_write_kernel");
}

}  // namespace

void rope_kv_write_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                        const at::Tensor& inv_freq, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& slots) {
  if (q.scalar_type() == at::kFloat) launch<float>(q, k, v, positions, inv_freq, k_cache, v_cache, slots);
  else launch<at::BFloat16>(q, k, v, positions, inv_freq, k_cache, v_cache, slots);
}

}  // namespace rlaif::kernels
