// RMSNorm kernels: one block per row, 16-byte accesses, float32 sum of squares reduced over the block.
// The optional residual add writes the rounded h back first, so the norm sees exactly what ATen's h + delta holds.
#include "kernels/cuda/rms_norm.h"

#include "kernels/cuda/common.cuh"

namespace rlaif::kernels {

namespace {

using namespace cuda_detail;

// x [rows, D]; with ADD, x is h and gets h + delta (rounded) in place before the norm.
template <typename T, int VEC, bool ADD>
__global__ void rms_norm_kernel(T* __restrict__ x, const T* __restrict__ delta, const T* __restrict__ w,
                                T* __restrict__ out, int D, float inv_d, float eps) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * D;
  float ss = 0.0f;
  for (int i = threadIdx.x * VEC; i < D; i += blockDim.x * VEC) {
    Vec<T, VEC> a = load_vec<T, VEC>(x + base + i);
    if constexpr (ADD) {
      const Vec<T, VEC> d = load_vec<T, VEC>(delta + base + i);
#pragma unroll
      for (int j = 0; j < VEC; ++j) a.v[j] = to<T>(static_cast<float>(a.v[j]) + static_cast<float>(d.v[j]));
      store_vec<T, VEC>(x + base + i, a);
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) ss += static_cast<float>(a.v[j]) * static_cast<float>(a.v[j]);
  }
  ss = block_sum(ss);
  rms_apply_row<T, VEC>(x + base, w, out + base, D, rms_scale(ss, inv_d, eps));
}

template <typename T, bool ADD>
void launch(const at::Tensor& x, const at::Tensor* delta, const at::Tensor& w, double eps, const at::Tensor& out) {
  const int D = static_cast<int>(x.size(-1));
  const int64_t rows = x.numel() / D;
  if (rows == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  T* xp = x.data_ptr<T>();
  const T* dp = delta ? delta->data_ptr<T>() : nullptr;
  const bool vec = D % kVec<T> == 0 && aligned16(xp) && aligned16(w.data_ptr()) && aligned16(out.data_ptr()) &&
                   (dp == nullptr || aligned16(dp));
  const int per_thread = vec ? kVec<T> : 1;
  const int threads = std::clamp((D / per_thread + 31) / 32 * 32, 32, 1024);
  const float inv_d = 1.0f / static_cast<float>(D);
  if (vec)
    rms_norm_kernel<T, kVec<T>, ADD><<<rows, threads, 0, stream>>>(xp, dp, w.data_ptr<T>(), out.data_ptr<T>(), D,
                                                                   inv_d, static_cast<float>(eps));
  else
    rms_norm_kernel<T, 1, ADD><<<rows, threads, 0, stream>>>(xp, dp, w.data_ptr<T>(), out.data_ptr<T>(), D, inv_d,
                                                             static_cast<float>(eps));
  check_launch("rms_norm_kernel");
}

template <bool ADD>
void dispatch(const at::Tensor& x, const at::Tensor* delta, const at::Tensor& w, double eps, const at::Tensor& out) {
  if (x.scalar_type() == at::kFloat) launch<float, ADD>(x, delta, w, eps, out);
  else launch<at::BFloat16, ADD>(x, delta, w, eps, out);
}

}  // namespace

void rms_norm_cuda(const at::Tensor& x, const at::Tensor& w, double eps, const at::Tensor& out) {
  dispatch<false>(x, nullptr, w, eps, out);
}

void add_rms_norm_cuda(const at::Tensor& h, const at::Tensor& delta, const at::Tensor& w, double eps,
                       const at::Tensor& out) {
  dispatch<true>(h, &delta, w, eps, out);
}

}  // namespace rlaif::kernels
