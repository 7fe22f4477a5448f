// Fills the kernel registry with this build's CUDA kernels. The CPU side calls this through a weak reference
// (kernels/cpu/registry.cpp), so the symbol must be kept in the link (docs/KERNELS.md, "Linking").
#include "kernels/cpu/registry.h"
#include "kernels/cuda/paged_attention.h"
#include "kernels/cuda/quant.h"
#include "kernels/cuda/quant_small_linear.h"
#include "kernels/cuda/rms_norm.h"
#include "kernels/cuda/rope_kv_write.h"
#include "kernels/cuda/graph.h"
#include "kernels/cuda/lora.h"
#include "kernels/cuda/silu_mul.h"
#include "kernels/cuda/sample.h"
#include "kernels/cuda/small_linear.h"
#include "kernels/cuda/tuned_linear.h"

extern "C" bool rlaif_register_cuda_kernels() {
  using namespace rlaif::kernels;
  KernelRegistry& r = kernel_registry();
  r.rms_norm_cuda = &rms_norm_cuda;
  r.add_rms_norm_cuda = &add_rms_norm_cuda;
  r.rope_kv_write_cuda = &rope_kv_write_cuda;
  r.paged_attention_decode_cuda = &paged_attention_decode_cuda;
  r.paged_attention_decode_rope_cuda = &paged_attention_decode_rope_cuda;
  r.silu_mul_cuda = &silu_mul_cuda;
  r.small_linear_cuda = &small_linear_cuda;
  r.small_linear_silu_mul_cuda = &small_linear_silu_mul_cuda;
  r.sample_cuda = &sample_cuda;
  r.lora_shrink_cuda = &lora_shrink_cuda;
  r.lora_expand_cuda = &lora_expand_cuda;
  r.lora_expand_silu_mul_cuda = &lora_expand_silu_mul_cuda;
  r.lora_expand_rms_norm_cuda = &lora_expand_rms_norm_cuda;
  r.linear_tuned_cuda = &linear_tuned_cuda;
  r.quantize_affine_cuda = &quantize_affine_cuda;
  r.dequantize_affine_cuda = &dequantize_affine_cuda;
  r.quant_linear_cuda = &quant_linear_cuda;
  r.quant_linear_mma_cuda = &quant_linear_mma_cuda;
  r.quant_small_linear_cuda = &quant_small_linear_cuda;
  r.quant_small_linear_silu_mul_cuda = &quant_small_linear_silu_mul_cuda;
  r.graph_capture = &graph_capture_cuda;
  r.graph_replay = &graph_replay_cuda;
  r.graph_destroy = &graph_destroy_cuda;
  r.profiler_range = &profiler_range_cuda;
  return true;
}
