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

// PEFT adapter folders: adapter_config.json + adapter_model.safetensors (loads in PeftModel.from_pretrained).
void save_peft_adapter(const DecoderModel& model, const LoraConfig& cfg, const std::filesystem::path& dir,
                       const std::string& base_model_name);
// Attaches the adapter stored in `dir` (replacing any attached one); returns its config. Errors name the file
// and the missing or unexpected tensors.
LoraConfig load_peft_adapter(DecoderModel& model, const std::filesystem::path& dir);

}  // namespace rlaif
