// save_merged_model: the merged weights under their HF names, and the config/tokenizer files that make the folder
// loadable by AutoModelForCausalLM.from_pretrained.
#include "rl/export.h"

#include <ATen/core/grad_mode.h>

#include <map>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/io.h"
#include "core/logging.h"
#include "models/quantized_model.h"
#include "models/weights.h"

namespace rlaif {

namespace fs = std::filesystem;

namespace {

std::string proj_weight_name(int layer, int proj) {
  const bool attn = proj <= static_cast<int>(Proj::kO);
  return fmt::format("model.layers.{}.{}.{}.weight", layer, attn ? "self_attn" : "mlp", kProjNames[proj]);
}

std::string dtype_json_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kBFloat16: return "bfloat16";
    case at::kHalf: return "float16";
    default: return "float32";
  }
}

// Files beside the weights that tokenizers and generation need; copied verbatim when present.
constexpr const char* kSideFiles[] = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                      "generation_config.json", "vocab.json", "merges.txt", "chat_template.jinja",
                                      "tokenizer.model", "added_tokens.json"};

}  // namespace

void save_merged_model(const DecoderModel& model, const fs::path& source, const fs::path& dir) {
  const ModelWeights& w = model.weights();
  if (w.quantized())
    throw Error("export", fmt::format("{}: LoRA cannot be merged into quantized (MLX) weights", source.string()),
                "set training.save_merged: false and use the PEFT adapter, or start from an unquantized model");
  at::NoGradGuard ng;
  std::map<std::string, at::Tensor> tensors;
  for (const auto& [name, t] : model.named_weights()) tensors[name] = t.detach();
  for (size_t l = 0; l < w.layers.size(); ++l)
    for (int p = 0; p < kNumProj; ++p) {
      const LoraAdapter& a = w.layers[l].lora[p];
      if (!a.defined()) continue;
      const std::string name = proj_weight_name(static_cast<int>(l), p);
      auto it = tensors.find(name);
      RLAIF_CHECK(it != tensors.end(), "merged export: no base weight named {}", name);
      // In float32 whatever the base dtype, then back: the sum is rounded once.
      const at::Tensor delta = at::matmul(a.b.detach().to(at::kFloat), a.a.detach().to(at::kFloat)) * a.scale;
      it->second = (it->second.to(at::kFloat) + delta.to(it->second.device())).to(it->second.scalar_type());
    }
  fs::create_directories(dir);
  const at::ScalarType dtype = w.embed.scalar_type();
  save_safetensors(dir / "model.safetensors", tensors, {{"format", "pt"}});
  const fs::path& src = source;
  if (fs::is_directory(src) && fs::exists(src / "config.json")) {
    auto j = nlohmann::ordered_json::parse(read_file(src / "config.json"));
    // The weights are written in the dtype they were trained in, which may differ from the source's.
    j["torch_dtype"] = dtype_json_name(dtype);
    if (j.contains("dtype")) j["dtype"] = dtype_json_name(dtype);
    write_file_atomic(dir / "config.json", j.dump(2));
    for (const char* f : kSideFiles)
      if (fs::exists(src / f)) write_file_atomic(dir / f, read_file(src / f));
  } else {
    // A model that came without one (GGUF): the keys transformers' Llama/Qwen2 configs read, from its metadata.
    nlohmann::json j = hf_config_json(model.config());
    j["torch_dtype"] = dtype_json_name(dtype);
    write_file_atomic(dir / "config.json", j.dump(2));
    // Once per run: every checkpoint would say the same.
    static bool warned = false;
    if (!warned)
      log_warn("[export] {} is not an HF folder: merged models get weights and a config.json built from its metadata "
               "but no tokenizer files (copy them from the original HF repository)", src.string());
    warned = true;
  }
}

}  // namespace rlaif
