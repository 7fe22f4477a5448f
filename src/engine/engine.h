// The generation engine: batched autoregressive sampling that reads the trainer's own weight tensors (no copy,
// so an optimizer step is visible to the next rollout), with a paged KV cache, prompt-prefix sharing between
// the samples of a prompt, and continuous batching.
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "engine/kv_cache.h"
#include "engine/sampler.h"
#include "kernels/cpu/registry.h"
#include "models/decoder.h"

namespace rlaif {

struct EngineOptions {
  int64_t max_batch = 64;      // sequences decoded together
  int64_t block_size = 16;     // tokens per KV block
  int64_t num_blocks = 0;      // 0: sized per generate() call for max_batch sequences of the longest request
  int64_t max_prefill_tokens = 8192;  // prompt tokens prefilled in one forward
  bool share_prefix = true;    // prefill a prompt once and fork its samples (false: prefill every sample)
  bool fused_decode = true;    // decode steps through kernels/ (paged attention, fused RoPE + KV write, ...)
  bool cuda_graphs = true;     // on CUDA, replay each batch-size bucket's fused decode step from a captured graph
  // On CUDA, launch the decode step's projections as programmatic dependent launches (kernels/cpu/registry.h):
  // each starts its weight loads while the previous kernel finishes. Opt-in until measured (docs/KERNELS.md).
  bool programmatic_launch = false;
  // On CUDA, quantized projections at one or two rows on tensor cores (bf16 x, q4/q8; kernels/cpu/registry.h) instead of
  // the SIMT GEMV. Opt-in: it measured slower at batch 1 (docs/KERNELS.md, session 12).
  bool quant_few_row_mma = false;
  // Which CUDA few-row GEMV the projections at batch ≤ 8 use (kernels/cpu/registry.h).
  kernels::FewRowKernel few_row_kernel = kernels::FewRowKernel::kStaged;
  // Up to how many rows (sequences in the step) each kind of projection takes the few-row GEMV on CUDA rather than
  // cuBLAS; 0: always cuBLAS. Measured per projection at the 0.5B and 3B decode shapes on the H200 (bench_kernels,
  // docs/PERFORMANCE.md session 6): cuBLAS reads a many-row or long-row weight faster (the LM head at 4.0 TB/s,
  // twice the GEMV; o and down), the GEMV wins where it fuses the norm with q/k/v (0.5B up to 4 rows, 3B at 1) or
  // with SwiGLU's two weights (1 row).
  struct FewRowRows {
    int64_t qkv = 2;       // q/k/v, input norm fused
    int64_t gate_up = 1;   // gate/up, post-attention norm and SwiGLU fused
    int64_t residual = 0;  // o and down, residual add fused (cuBLAS: addmm_ into h)
    int64_t lm_head = 0;   // final norm fused
  } few_row_rows;
  // Above the few-row batch, LoRA's x·Aᵀ as extra columns of each group's base GEMM (models/lora.h
  // pack_lora_rows: a copy of A in the weights' dtype after the group's weight rows, refreshed at every generate())
  // instead of a shrink launch: 3B rank-16 decode of 512 tokens on the H100 went 9,919 -> 11,841 tok/s at batch 64
  // and 1,763 -> 1,952 at batch 8 (docs/PERFORMANCE.md, session 10). In bf16, x·Aᵀ is rounded to bf16 before the
  // expand, as the training forward's autocast does, where the shrink kernel keeps float32.
  bool lora_shrink_in_gemm = true;
  // Above the few-row batch on CUDA, the projections' GEMMs through the cuBLASLt algorithm measured fastest for
  // each shape (kernels/cpu/tuned_linear.h; timed once, in the bucket's eager warm-up step) instead of the
  // heuristic's first choice. Opt-in: on the H100 it measured within ±3% of the heuristic (docs/KERNELS.md).
  bool tuned_gemm = false;
  // Rows a CUDA LoRA expand block serves, 8 or 4 (kernels/cpu/registry.h; the same outputs bit for bit), where the
  // SIMT expands run (t float32, or lora_expand_mma off). 4 doubles the blocks of a batch-64 expand at fewer
  // registers; session 13 measured it slower (H100, 3B r16 batch 64: 11,620 tok/s against 11,848).
  int lora_expand_rows = 8;
  // The CUDA LoRA expands above the few-row batch on tensor cores (kernels/cpu/registry.h lora_expand_mma; within a
  // rounding of the SIMT kernels, not bit-equal). Session 13, H100, 3B r16, 512 new tokens, batch 64: 12,749 tok/s
  // against 12,110 with the SIMT expands (docs/PERFORMANCE.md).
  bool lora_expand_mma = true;
  // Above the few-row batch (with lora_shrink_in_gemm), the o and down projections' LoRA update is added to h by the launch of the
  // RMSNorm that reads h next (kernels::lora_expand_rms_norm: the post-attention norm, the next layer's input norm or
  // the final norm) instead of an expand launch of its own. Opt-in: slower as built (session 13, H100, 3B r16
  // batch 64: 11,826 tok/s against 12,280; its block per row leaves most SMs idle; docs/KERNELS.md).
  bool lora_norm_fusion = false;
  std::vector<int64_t> eos_ids;  // every id that ends a sequence (generation_config.json)
};

struct GenerationRequest {
  std::vector<int32_t> prompt;
  int64_t num_samples = 1;
  SamplingParams params;
};

struct GeneratedSample {
  int64_t request = 0;
  int64_t sample = 0;
  std::vector<int32_t> tokens;             // generated tokens, the EOS included when it ended the sequence
  std::vector<float> logprobs;             // log p under the raw model distribution, per token
  std::vector<float> processed_logprobs;   // log p under the distribution actually sampled from
  std::string finish_reason;               // "stop" (EOS), "stop_string", "length"
};

struct GenerateCallbacks {
  // Called for each new token (streaming).
  std::function<void(int64_t request, int64_t sample, int32_t token)> on_token;
  // Returns true when the generated tokens end in a stop string (the caller owns the tokenizer).
  std::function<bool(int64_t request, int64_t sample, const std::vector<int32_t>& generated)> stop;
  // Called once per sample as soon as it finishes (its slot in generate()'s result is already filled), so a
  // caller can start scoring it while the other samples still decode. Runs on the generating thread.
  std::function<void(const GeneratedSample& done)> on_finish;
};

struct EngineStats {
  int64_t prefill_tokens = 0;
  int64_t decode_tokens = 0;
  int64_t decode_steps = 0;
  double prefill_seconds = 0;
  double decode_seconds = 0;
};

class Engine {
 public:
  Engine(std::shared_ptr<DecoderModel> model, EngineOptions options);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Runs every request to completion; results ordered by (request, sample).
  std::vector<GeneratedSample> generate(const std::vector<GenerationRequest>& requests,
                                        const GenerateCallbacks& callbacks = {});

  const EngineStats& stats() const { return stats_; }
  const EngineOptions& options() const { return options_; }
  std::string backend() const;  // e.g. "cpu, float32"

 private:
  struct Seq;
  void ensure_cache(const std::vector<GenerationRequest>& requests);
  int64_t blocks_for(int64_t tokens) const;
  int64_t reservation(const GenerationRequest& r) const;
  // Runs the model over each sequence's new tokens, writing their K/V; returns logits at each last token [S, V].
  at::Tensor forward_step(const std::vector<Seq*>& seqs, const std::vector<std::vector<int32_t>>& new_tokens);
  // A decode step's inputs, packed into one buffer so one copy moves them to the device (views of `dev`; the
  // `host_*` views are where the host writes them; on the CPU both are the same memory).
  struct StepInputs {
    at::Tensor host, dev;
    at::Tensor tokens, positions, slots, uniform, temperature, context_lens, block_tables;
    at::Tensor host_tokens, host_positions, host_slots, host_uniform, host_temperature, host_context_lens,
        host_block_tables;
  };
  // The sampler's outputs (tokens int64 [rows], log-probs float [rows, 2]) on the device and their host copy.
  struct StepOutputs {
    at::Tensor dev, host, tokens, logprobs, host_tokens, host_logprobs;
  };
  static StepInputs make_step_inputs(int64_t rows, int64_t width, const at::Device& dev);
  static StepOutputs make_step_outputs(int64_t rows, const at::Device& dev);
  // One new token per sequence through the fused kernels, attention read straight from the paged cache
  // (fixed shapes: the step a CUDA graph can capture), then sampled (on the device when every row only needs
  // temperature or greedy sampling: kernels/cpu/sample.h).
  SampleResult decode_step(const std::vector<Seq*>& seqs);
  // The decode computation on device tensors only (no host data), so a CUDA graph can capture it. Returns
  // logits [rows, V].
  at::Tensor decode_compute(const StepInputs& in, int64_t max_context);
  void drop_graphs();
  bool use_fused_decode();  // false (logged once, with the reason) where the kernels cannot serve
  void grow_blocks(Seq& s, int64_t new_len);
  void release(Seq& s);

  std::shared_ptr<DecoderModel> model_;
  EngineOptions options_;
  std::unique_ptr<PagedKvCache> cache_;
  at::Tensor inv_freq_;
  EngineStats stats_;
  bool fallback_logged_ = false;
  at::Tensor inv_freq_dev_;
  int64_t max_blocks_per_seq_ = 1;  // block-table width: the longest sequence the cache was sized for
  struct DecodeGraph {
    void* graph = nullptr;
    StepInputs in;
    StepOutputs out;
    at::Tensor logits;
  };
  std::map<int64_t, DecodeGraph> graphs_;  // by batch-size bucket
  // Where the projection weights were when the graphs were captured: a graph replays those addresses, so a moved
  // weight (pack_lora_rows, by this engine or another on the same model) drops them.
  size_t weights_at_ = 0;
};

}  // namespace rlaif
