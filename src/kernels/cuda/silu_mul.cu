// silu(gate) * up: an elementwise kernel over [N, F] rows with their own strides (the halves of a fused
// gate_up projection need no copy), 16-byte accesses when the rows allow them.
#include "kernels/cuda/silu_mul.h"

#include "kernels/cuda/common.cuh"

namespace rlaif::kernels {

namespace {

using namespace cuda_detail;

constexpr int kThreads = 256;

// grid (N, ceil(F / (VEC * kThreads))): one row per blockIdx.x (x has room for any prefill length).
template <typename T, int VEC>
__global__ void silu_mul_kernel(const T* __restrict__ gate, int64_t gate_stride, const T* __restrict__ up,
                                int64_t up_stride, T* __restrict__ out, int64_t F) {
  const int64_t row = blockIdx.x;
  const int64_t i = (static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x) * VEC;
  if (i >= F) return;
  const Vec<T, VEC> g = load_vec<T, VEC>(gate + row * gate_stride + i);
  const Vec<T, VEC> u = load_vec<T, VEC>(up + row * up_stride + i);
  Vec<T, VEC> o;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const float x = static_cast<float>(g.v[j]);
    const T silu = to<T>(x / (1.0f + expf(-x)));  // ATen's silu, rounded as its output tensor is
    o.v[j] = to<T>(static_cast<float>(silu) * static_cast<float>(u.v[j]));
  }
  store_vec<T, VEC>(out + row * F + i, o);
}

template <typename T>
void launch(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& out) {
  const int64_t N = gate.size(0), F = gate.size(1);
  if (N == 0 || F == 0) return;
  const c10::cuda::CUDAGuard guard(gate.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  constexpr int V = kVec<T>;
  const bool vec = F % V == 0 && gate.stride(0) % V == 0 && up.stride(0) % V == 0 && aligned16(gate.data_ptr()) &&
                   aligned16(up.data_ptr()) && aligned16(out.data_ptr());
  const int per_thread = vec ? V : 1;
  const dim3 grid(static_cast<unsigned>(N),
                  static_cast<unsigned>((F + per_thread * kThreads - 1) / (per_thread * kThreads)));
  if (vec)
    silu_mul_kernel<T, V><<<grid, kThreads, 0, stream>>>(gate.data_ptr<T>(), gate.stride(0), up.data_ptr<T>(),
                                                         up.stride(0), out.data_ptr<T>(), F);
  else
    silu_mul_kernel<T, 1><<<grid, kThreads, 0, stream>>>(gate.data_ptr<T>(), gate.stride(0), up.data_ptr<T>(),
                                                         up.stride(0), out.data_ptr<T>(), F);
  check_launch("silu_mul_kernel");
}

}  // namespace

void silu_mul_cuda(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& out) {
  if (gate.scalar_type() == at::kFloat) launch<float>(gate, up, out);
  else launch<at::BFloat16>(gate, up, out);
}

}  // namespace rlaif::kernels
