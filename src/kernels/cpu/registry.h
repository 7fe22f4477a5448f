// The CUDA kernels' function-pointer table: CPU files name CUDA code only through it, so the CPU-only build
// has no CUDA header and no backend #ifdef. kernels/cuda/register.cu fills it (see docs/KERNELS.md).
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <vector>

namespace rlaif::kernels {

struct RopeKvInputs;  // kernels/cpu/paged_attention.h
struct InputNorm;     // kernels/cpu/small_linear.h
struct QuantMatrix;   // kernels/cpu/quant_small_linear.h

// One pointer per op, nullptr until rlaif_register_cuda_kernels() (CUDA builds only) sets it. Signatures equal
// the public ops' (kernels/cpu/<stem>.h); arguments reach them already checked by the dispatcher.
struct KernelRegistry {
  void (*rms_norm_cuda)(const at::Tensor& x, const at::Tensor& w, double eps, const at::Tensor& out) = nullptr;
  void (*add_rms_norm_cuda)(const at::Tensor& h, const at::Tensor& delta, const at::Tensor& w, double eps,
                            const at::Tensor& out) = nullptr;
  void (*rope_kv_write_cuda)(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& positions, const at::Tensor& inv_freq, const at::Tensor& k_cache,
                             const at::Tensor& v_cache, const at::Tensor& slots) = nullptr;
  void (*paged_attention_decode_cuda)(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                      const at::Tensor& block_tables, const at::Tensor& context_lens,
                                      int64_t block_size, int64_t max_context, double scale,
                                      const at::Tensor& out) = nullptr;
  void (*paged_attention_decode_rope_cuda)(const at::Tensor& q, const RopeKvInputs& rope, const at::Tensor& k_cache,
                                           const at::Tensor& v_cache, const at::Tensor& block_tables,
                                           const at::Tensor& context_lens, int64_t block_size, int64_t max_context,
                                           double scale, const at::Tensor& out) = nullptr;
  void (*silu_mul_cuda)(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& out) = nullptr;
  // Few-row projections (decode at small batch), weights streamed once for all rows (kernels/cpu/small_linear.h).
  void (*small_linear_cuda)(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                            const std::vector<at::Tensor>& biases, const at::Tensor& residual,
                            const std::vector<at::Tensor>& outs, const InputNorm& norm) = nullptr;
  void (*small_linear_silu_mul_cuda)(const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
                                     const at::Tensor& out, const InputNorm& norm) = nullptr;
  // LoRA's update for a group of projections sharing an input (kernels/cpu/lora.h).
  void (*lora_shrink_cuda)(const at::Tensor& x, const std::vector<at::Tensor>& a, const at::Tensor& t) = nullptr;
  void (*lora_expand_cuda)(const at::Tensor& t, const std::vector<at::Tensor>& b, const std::vector<double>& scales,
                           const std::vector<at::Tensor>& ys, const at::Tensor& residual,
                           const std::vector<at::Tensor>& outs) = nullptr;
  void (*lora_expand_silu_mul_cuda)(const at::Tensor& t, const std::vector<at::Tensor>& b,
                                    const std::vector<double>& scales, const at::Tensor& gate, const at::Tensor& up,
                                    const at::Tensor& out) = nullptr;
  void (*lora_expand_rms_norm_cuda)(const at::Tensor& t, const at::Tensor& b, double scale, const at::Tensor& y,
                                    const at::Tensor& h, const at::Tensor& w, double eps,
                                    const at::Tensor& out) = nullptr;
  // The decode step's dense projections through tuned cuBLASLt algorithms (kernels/cpu/tuned_linear.h).
  void (*linear_tuned_cuda)(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, const at::Tensor& out,
                            bool accumulate) = nullptr;
  // Few-row projections with MLX affine-quantized weights (kernels/cpu/quant_small_linear.h).
  void (*quant_small_linear_cuda)(const at::Tensor& x, const std::vector<QuantMatrix>& weights,
                                  const std::vector<at::Tensor>& biases, const at::Tensor& residual,
                                  const std::vector<at::Tensor>& outs, const InputNorm& norm) = nullptr;
  void (*quant_small_linear_silu_mul_cuda)(const at::Tensor& x, const QuantMatrix& gate, const QuantMatrix& up,
                                           const at::Tensor& out, const InputNorm& norm) = nullptr;
  // Token sampling without a full sort, top-k/top-p/min-p per row (kernels/cpu/sample.h); filters may be undefined.
  void (*sample_cuda)(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                      const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& uniform,
                      const at::Tensor& tokens, const at::Tensor& logprobs) = nullptr;
  // MLX affine quantization (kernels/cpu/quant.h): quantize, dequantize, and x · dequant(W)ᵀ.
  void (*quantize_affine_cuda)(const at::Tensor& w, int64_t bits, int64_t group_size, const at::Tensor& wq,
                               const at::Tensor& scales, const at::Tensor& biases) = nullptr;
  void (*dequantize_affine_cuda)(const at::Tensor& wq, const at::Tensor& scales, const at::Tensor& biases,
                                 int64_t bits, int64_t group_size, const at::Tensor& out) = nullptr;
  void (*quant_linear_cuda)(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
                            const at::Tensor& biases, int64_t bits, int64_t group_size,
                            const at::Tensor& out) = nullptr;
  void (*quant_linear_mma_cuda)(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
                                const at::Tensor& biases, int64_t bits, int64_t group_size,
                                const at::Tensor& out) = nullptr;
  // CUDA graphs (kernels/cuda/graph.cpp): capture `body` on a side stream into an opaque graph, replay it on
  // the current stream, free it. Tensors `body` allocates live in the graph's private pool.
  void* (*graph_capture)(const std::function<void()>& body) = nullptr;
  void (*graph_replay)(void* graph) = nullptr;
  void (*graph_destroy)(void* graph) = nullptr;
  // Start or stop the profilers' capture range (ncu --profile-from-start off), so a profile of a benchmark's timed
  // region skips its set-up launches.
  void (*profiler_range)(bool start) = nullptr;
};

KernelRegistry& kernel_registry();

// Programmatic dependent launch (Hopper, opt-in: EngineOptions::programmatic_launch): while it is on, the decode
// step's few-row projections (small_linear) launch so that each may start before the previous kernel ends,
// sending their weights towards L2 and waiting for it (griddepcontrol) only before reading its output; they and
// the paged attention let their successor launch early. Off by default; a process-wide setting read at launch.
void set_programmatic_launch(bool on);
bool programmatic_launch();

// Whether quant_small_linear / quant_small_linear_silu_mul take the tensor-core kernel where it serves (bf16 x of
// one or two rows, 4- or 8-bit weights, groups of 32/64/128, rows a multiple of 8; EngineOptions::quant_few_row_mma,
// session 11; opt-in: slower at batch 1 in session 12) instead of the SIMT kernel. Same spec and CPU reference either way.
void set_quant_few_row_mma(bool on);
bool quant_few_row_mma();

// Rows a CUDA LoRA expand block serves (lora_expand, lora_expand_silu_mul; EngineOptions::lora_expand_rows): 8, the
// default (6 blocks an SM at ≤ 80 registers), or 4 (twice the blocks, 8 an SM at ≤ 64 registers). Same sums, same
// order: the outputs are bit-equal. Session 12 measured the 8-row gate/up expand latency-bound at batch 64.
void set_lora_expand_rows(int rows);
int lora_expand_rows();

// Whether the CUDA LoRA expands (lora_expand, lora_expand_silu_mul) take the tensor-core kernels where they serve:
// bf16 outputs whose t is bf16 (a base GEMM's columns: the batched decode step with the shrink in the GEMM), even
// ranks and widths (EngineOptions::lora_expand_mma, session 13). B enters the MMAs as two bf16s (16 bits of it),
// the sums in the tensor cores' order: within a rounding of the CPU reference, not bit-equal to the SIMT kernels.
void set_lora_expand_mma(bool on);
bool lora_expand_mma();

// Which CUDA few-row GEMV small_linear / small_linear_silu_mul launch (EngineOptions::few_row_kernel):
// kStreaming (the process default; the session-4 kernel: norm first, then rounds of register loads) or kStaged
// (each warp's whole share of its weight rows requested into shared memory before the fused norm and the wait for
// the previous kernel; the engine's default since session 6, which also sends only q/k/v and gate/up to these
// GEMVs: EngineOptions). Session 5 (H200, every projection on the GEMV): staged faster for the 0.5B shape at batch
// 1 (751 vs 690 tok/s), slower for the 3B shape (276 vs 294). Same results either way (CPU reference, parity tests).
enum class FewRowKernel { kStaged, kStreaming };
void set_few_row_kernel(FewRowKernel k);
FewRowKernel few_row_kernel();

// Which CUDA kernel paged_attention_decode(_rope) launches for bf16 with head_dim 64 or 128 and at most 16 query
// heads per KV head, where the grid has two blocks per SM (batch × KV heads × partitions): kTensorCore (the
// default; mma.sync for Q·Kᵀ and P·V, p rounded to bf16 before P·V as the training forward's attention does) or
// kSimt (float32 FMAs, p kept in float32; every other shape and smaller grids take it).
// A process-wide setting read at launch, for A/B runs (bench_kernels, bench_generate --attention-kernel).
enum class AttentionKernel { kTensorCore, kSimt };
void set_attention_kernel(AttentionKernel k);
AttentionKernel attention_kernel();
// How many warps share one weight row in small_linear's CUDA GEMV (1, 2, 4 or 8): 0 (default) leaves it to the
// kernel's rule for K. A tuning knob for bench_kernels, which measures every split at the decode shapes.
void set_few_row_split(int warps);
int few_row_split();

// True when this binary holds the CUDA kernels (built with RLAIF_CUDA and linked, see docs/KERNELS.md). The
// first call registers them; thread-safe. Says nothing about whether a CUDA device is present.
bool cuda_kernels_available();

[[noreturn]] void throw_no_cuda_kernel(const char* name);

// The CUDA implementation `field` of op `name` for tensors on CUDA; throws rlaif::Error when this build has none.
template <typename Fn>
Fn cuda_kernel(Fn KernelRegistry::*field, const char* name) {
  Fn fn = cuda_kernels_available() ? kernel_registry().*field : nullptr;
  if (fn == nullptr) throw_no_cuda_kernel(name);
  return fn;
}

}  // namespace rlaif::kernels

// Defined only in kernels/cuda/register.cu. Its callers (registry.cpp) see it as a weak symbol, so a CPU-only
// build links without it; a CUDA build must keep the linker from dropping it (docs/KERNELS.md, "Linking").
extern "C" bool rlaif_register_cuda_kernels();
