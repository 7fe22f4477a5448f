// LoRA adapters attached to a DecoderModel's projections, initialised as PEFT does (A Kaiming-uniform, B zero,
// so an attached adapter starts as the identity change), named as PEFT names them for export.
#pragma once

#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "models/decoder.h"

namespace rlaif {

struct LoraConfig {
  int64_t r = 16;
  double alpha = 32;
  double dropout = 0.05;
  std::vector<std::string> target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
};

// Attaches fresh adapters (float32, on the weights' device, requires_grad) and freezes nothing itself: the
// caller optimises lora_parameters() only. Unknown target modules are an Error listing the known ones.
void attach_lora(DecoderModel& model, const LoraConfig& cfg, uint64_t seed);
bool has_lora(const DecoderModel& model);
// Adapter tensors with PEFT's names: base_model.model.model.layers.{L}.self_attn.q_proj.lora_A.weight, ...
std::vector<std::pair<std::string, at::Tensor>> lora_parameters(const DecoderModel& model);

// The engine's LoRA shrink inside the base GEMM (EngineOptions::lora_shrink_in_gemm): each group of projections
// sharing an input (ProjGroup) whose every projection has an adapter and a plain weight not requiring grad is laid
// out as one buffer — the weights' rows, then Σ r rows for the adapters' A in the weights' dtype
// (LayerWeights::lora_rows) — its biases likewise followed by zeros; the weight and bias tensors become views of
// it (their values unchanged). One GEMM over [W; A] then gives the base outputs and x·Aᵀ. Groups already laid out
// for the adapters' current ranks stay where they are; returns how many groups this call moved (the weights'
// storage changed: CUDA graphs holding their old addresses are stale). Then refreshes every group's A rows.
int64_t pack_lora_rows(ModelWeights& w);
// Copies each adapter's current A, cast to the weights' dtype, into its group's lora rows: after the adapters
// change (an optimizer step, a loaded adapter).
void refresh_lora_rows(ModelWeights& w);

// PEFT adapter folders: adapter_config.json + adapter_model.safetensors (loads in PeftModel.from_pretrained).
void save_peft_adapter(const DecoderModel& model, const LoraConfig& cfg, const std::filesystem::path& dir,
                       const std::string& base_model_name);
// Attaches the adapter stored in `dir` (replacing any attached one); returns its config. Errors name the file
// and the missing or unexpected tensors.
LoraConfig load_peft_adapter(DecoderModel& model, const std::filesystem::path& dir);

}  // namespace rlaif
