// Qwen2 family (Qwen2, Qwen2.5, Qwen2.5-Coder): a Llama-style decoder with q/k/v biases and no o/MLP bias.
// Its forward is the shared decoder (models/decoder.cpp); this file says how its config.json maps onto it.
#include "core/error.h"
#include "models/model_config.h"

namespace rlaif {

ModelConfig parse_qwen2_config(const nlohmann::json& j, const std::string& source) {
  ModelConfig c;
  c.family = "qwen2";
  c.architecture = "Qwen2ForCausalLM";
  config_json::parse_common(j, source, c);
  c.qkv_bias = true;
  if (config_json::get_bool_or(j, "use_sliding_window", false, source))
    throw Error("config", fmt::format("{}: use_sliding_window=true is not supported", source),
                "Qwen2.5 checkpoints ship with use_sliding_window=false");
  return c;
}

}  // namespace rlaif
