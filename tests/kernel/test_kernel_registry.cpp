// The kernel registry: a CUDA build (RLAIF_CUDA=ON) has every CUDA kernel registered, also on machines without a
// GPU, so a link that dropped kernels/cuda/register.cu fails here on the CPU CI; a CPU build has none.
#include <gtest/gtest.h>

#include "kernel_test.h"
#include "core/error.h"
#include "kernels/cpu/registry.h"

using namespace rlaif;

TEST(KernelRegistry, CudaKernelsPresentExactlyInCudaBuilds) {
  const bool cuda_build = test::built_with_cuda();
  EXPECT_EQ(kernels::cuda_kernels_available(), cuda_build) << "CMakeCache says RLAIF_CUDA=" << cuda_build;
  const kernels::KernelRegistry& r = kernels::kernel_registry();
  for (const void* fn : {reinterpret_cast<const void*>(r.rms_norm_cuda), reinterpret_cast<const void*>(r.add_rms_norm_cuda),
                         reinterpret_cast<const void*>(r.rope_kv_write_cuda),
                         reinterpret_cast<const void*>(r.paged_attention_decode_cuda),
                         reinterpret_cast<const void*>(r.silu_mul_cuda)})
    EXPECT_EQ(fn != nullptr, cuda_build);
}

TEST(KernelRegistry, MissingCudaKernelIsAClearError) {
  // The error path of the dispatchers, without needing a CUDA tensor: a pointer that is never set.
  kernels::KernelRegistry& r = kernels::kernel_registry();
  kernels::cuda_kernels_available();  // registration happens on first use: let it happen before the pointer is cleared
  auto saved = r.silu_mul_cuda;
  r.silu_mul_cuda = nullptr;
  try {
    kernels::cuda_kernel(&kernels::KernelRegistry::silu_mul_cuda, "silu_mul");
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("silu_mul"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("RLAIF_CUDA"), std::string::npos) << e.what();
  }
  r.silu_mul_cuda = saved;
}
