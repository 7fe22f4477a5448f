// The kernel registry and the weak hook through which a CUDA build's kernels register themselves.
#include "kernels/cpu/registry.h"

#include <atomic>

#include "core/error.h"

// Weak: resolves to nullptr when kernels/cuda/register.cu is not in the link (CPU-only builds).
extern "C" __attribute__((weak)) bool rlaif_register_cuda_kernels();

namespace rlaif::kernels {

KernelRegistry& kernel_registry() {
  static KernelRegistry registry;
  return registry;
}

bool cuda_kernels_available() {
  static const bool available = rlaif_register_cuda_kernels != nullptr && rlaif_register_cuda_kernels();
  return available;
}

namespace {
std::atomic<bool> g_programmatic_launch{false};
std::atomic<bool> g_quant_few_row_mma{false};
std::atomic<FewRowKernel> g_few_row_kernel{FewRowKernel::kStreaming};
std::atomic<int> g_few_row_split{0};
std::atomic<AttentionKernel> g_attention_kernel{AttentionKernel::kTensorCore};
std::atomic<int> g_lora_expand_rows{8};
std::atomic<bool> g_lora_expand_mma{false};
}  // namespace

void set_lora_expand_mma(bool on) { g_lora_expand_mma.store(on); }
bool lora_expand_mma() { return g_lora_expand_mma.load(); }

void set_lora_expand_rows(int rows) {
  RLAIF_CHECK(rows == 4 || rows == 8, "LoRA expand rows {} (4 or 8)", rows);
  g_lora_expand_rows.store(rows);
}
int lora_expand_rows() { return g_lora_expand_rows.load(); }

void set_few_row_split(int warps) {
  RLAIF_CHECK(warps == 0 || warps == 1 || warps == 2 || warps == 4 || warps == 8, "few-row split {} (0, 1, 2, 4 or 8)",
              warps);
  g_few_row_split.store(warps);
}
int few_row_split() { return g_few_row_split.load(); }

void set_few_row_kernel(FewRowKernel k) { g_few_row_kernel.store(k); }
FewRowKernel few_row_kernel() { return g_few_row_kernel.load(); }
void set_attention_kernel(AttentionKernel k) { g_attention_kernel.store(k); }
AttentionKernel attention_kernel() { return g_attention_kernel.load(); }

void set_programmatic_launch(bool on) { g_programmatic_launch.store(on); }
bool programmatic_launch() { return g_programmatic_launch.load(); }
void set_quant_few_row_mma(bool on) { g_quant_few_row_mma.store(on); }
bool quant_few_row_mma() { return g_quant_few_row_mma.load(); }

void throw_no_cuda_kernel(const char* name) {
  throw Error("kernels", fmt::format("{}: the tensors are on CUDA but this build has no CUDA kernels", name),
              "configure with -DRLAIF_CUDA=ON (and link rlaif_register_cuda_kernels, see docs/KERNELS.md)");
}

}  // namespace rlaif::kernels
