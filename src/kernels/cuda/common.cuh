// Helpers shared by the CUDA kernels: 16-byte vectors of activations, float conversion, warp/block reductions
// and the launch check. Included only by .cu files.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

#include "core/error.h"
#include "kernels/cpu/registry.h"  // programmatic_launch()

namespace rlaif::kernels::cuda_detail {

// N elements loaded or stored as one aligned access (16 bytes for 8 bf16 or 4 fp32).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

// float32 → T with round-to-nearest-even, as ATen's casts (c10::BFloat16 uses __float2bfloat16 on sm_80+).
template <typename T>
__device__ __forceinline__ T to(float x) {
  return static_cast<T>(x);
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ __forceinline__ float block_sum(float x) {
  __shared__ float partial[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  x = warp_sum(x);
  __syncthreads();  // partial may still be read by an earlier call
  if (lane == 0) partial[warp] = x;
  __syncthreads();
  x = lane < warps ? partial[lane] : 0.0f;
  return warp_sum(x);
}

// Elements per 16-byte access for T.
template <typename T>
constexpr int kVec = 16 / sizeof(T);

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// RMSNorm's roundings (kernels/cpu/rms_norm.h): the scale from the float32 sum of squares, as the CPU reference
// (times 1/D, IEEE sqrt and division), and one normalised element w · to(a · scale).
__device__ __forceinline__ float rms_scale(float sum_sq, float inv_d, float eps) {
  return 1.0f / sqrtf(sum_sq * inv_d + eps);
}
template <typename T>
__device__ __forceinline__ T rms_apply(T a, T w, float scale) {
  return to<T>(static_cast<float>(w) * static_cast<float>(to<T>(static_cast<float>(a) * scale)));
}
// The norm's second pass over one row (x and out at the row's start): each thread re-reads only the VEC-wide
// vectors of x it wrote itself in the first pass, so no barrier is needed.
template <typename T, int VEC>
__device__ __forceinline__ void rms_apply_row(const T* x, const T* w, T* out, int D, float scale) {
  for (int i = threadIdx.x * VEC; i < D; i += blockDim.x * VEC) {
    const Vec<T, VEC> a = load_vec<T, VEC>(x + i), wv = load_vec<T, VEC>(w + i);
    Vec<T, VEC> o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) o.v[j] = rms_apply(a.v[j], wv.v[j], scale);
    store_vec<T, VEC>(out + i, o);
  }
}

// 16-byte global → shared copies that bypass registers (and L1): cp_async_commit closes a group,
// cp_async_wait<N> waits until at most N groups are in flight, cp_async_wait_all for every copy of this thread.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// Tensor cores (mma.sync, sm_80+): two floats as a bf16 pair (round to nearest even, lo in the low half); c += a·b
// for one m16n8k16 tile with bf16 operands and float32 accumulation (fragments as the PTX ISA lays them out);
// ldmatrix loads of four 8×8 bf16 tiles from shared memory, each lane giving one 16-byte row address (lanes 8i..8i+7
// the rows of tile i), plain or transposed.
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

// Lets `kernel` take `bytes` of dynamic shared memory: the opt-in needed once its static and dynamic shared memory
// together pass 48 KB (a kernel with 33 KB of static slots needs it from 15 KB of dynamic); `op` names the caller.
template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, size_t bytes, const char* op) {
  if (bytes == 0) return;
  cudaFuncAttributes attr{};
  cudaError_t e = cudaFuncGetAttributes(&attr, kernel);
  RLAIF_CHECK(e == cudaSuccess, "{}: reading the kernel's attributes: {}", op, cudaGetErrorString(e));
  if (attr.sharedSizeBytes + bytes <= 48 * 1024) return;
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  RLAIF_CHECK(e == cudaSuccess, "{}: {} bytes of dynamic shared memory beside {} static: {}", op, bytes,
              attr.sharedSizeBytes, cudaGetErrorString(e));
}

// The 32/BITS values of one packed word as exact floats: each 4- or 8-bit value is moved by a byte permute into
// the low mantissa bits of 2^23 (0x4B000000), and 2^23 is subtracted.
template <int BITS>
__device__ __forceinline__ void unpack_word(uint32_t w, float (&q)[32 / BITS]) {
  if constexpr (BITS == 4) {
    const uint32_t lo = w & 0x0F0F0F0Fu, hi = (w >> 4) & 0x0F0F0F0Fu;  // bytes: values 0,2,4,6 and 1,3,5,7
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      q[2 * i] = __uint_as_float(__byte_perm(lo, 0x4B000000u, 0x7540 + i)) - 8388608.0f;
      q[2 * i + 1] = __uint_as_float(__byte_perm(hi, 0x4B000000u, 0x7540 + i)) - 8388608.0f;
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) q[i] = __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7540 + i)) - 8388608.0f;
  }
}

// W consecutive packed words (1, 2, 4 or 8) in one or two streaming loads (8- or 16-byte aligned from 2 words): a
// thread's slice of a quantized weight row for the tensor-core kernels.
template <int W>
struct Words {
  uint32_t w[W];
};

template <int W>
__device__ __forceinline__ Words<W> load_words(const uint32_t* p) {
  static_assert(W == 1 || W == 2 || W == 4 || W == 8, "1, 2, 4 or 8 words");
  Words<W> r;
  if constexpr (W == 1) {
    r.w[0] = __ldcs(p);
  } else if constexpr (W == 2) {
    const uint2 v = __ldcs(reinterpret_cast<const uint2*>(p));
    r.w[0] = v.x;
    r.w[1] = v.y;
  } else {
#pragma unroll
    for (int h = 0; h < W / 4; ++h) {
      const uint4 v = __ldcs(reinterpret_cast<const uint4*>(p) + h);
      r.w[4 * h] = v.x;
      r.w[4 * h + 1] = v.y;
      r.w[4 * h + 2] = v.z;
      r.w[4 * h + 3] = v.w;
    }
  }
  return r;
}

// Programmatic dependent launch (kernels/cpu/registry.h): pdl_wait() returns once the kernels this one depends
// on have finished and their writes are visible (at once without such a launch); pdl_trigger() lets the next
// kernel start launching. Loads that do not depend on the previous kernel go before pdl_wait().
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }
__device__ __forceinline__ void pdl_trigger() { asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory"); }
// Under a programmatic launch (`pdl`), lets the next kernel launch, then waits for the previous one: the start of
// a projection that has sent its weights (which never depend on the previous kernel) on their way first.
__device__ __forceinline__ void pdl_begin(bool pdl) {
  if (!pdl) return;
  pdl_trigger();
  pdl_wait();
}

// kernel<<<grid, block, smem, stream>>>(args...) through cudaLaunchKernelEx with one launch attribute; a failure
// throws naming `what` (e.g. "programmatic launch"). Followed by check_launch.
template <typename... Params, typename... Args>
void launch_with(const cudaLaunchAttribute& attr, const char* what, void (*kernel)(Params...), dim3 grid, dim3 block,
                 size_t smem, cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute a = attr;
  config.attrs = &a;
  config.numAttrs = 1;
  const cudaError_t err = cudaLaunchKernelEx(&config, kernel, static_cast<Params>(std::forward<Args>(args))...);
  if (err != cudaSuccess) throw InternalError(fmt::format("[kernels] {} failed: {}", what, cudaGetErrorString(err)));
}

// kernel<<<grid, block, smem, stream>>>(args...), as a programmatic dependent launch when `programmatic` (the
// caller's reading of kernels::programmatic_launch(), also passed to the kernel). Followed by check_launch.
template <typename... Params, typename... Args>
void launch_kernel(bool programmatic, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                   cudaStream_t stream, Args&&... args) {
  if (!programmatic) {
    kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
    return;
  }
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  launch_with(attr, "programmatic launch", kernel, grid, block, smem, stream, std::forward<Args>(args)...);
}

// Every launch is followed by this: a bad configuration surfaces at its own call, not at a later sync.
inline void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw InternalError(fmt::format("[kernels] launch of {} failed: {}", kernel, cudaGetErrorString(err)));
}

}  // namespace rlaif::kernels::cuda_detail
