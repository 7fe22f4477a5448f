// Llama family (Llama-2, 3, 3.1, 3.2, SmolLM2, TinyLlama): optional attention/MLP biases and llama3 rope
// frequency scaling. Its forward is the shared decoder (models/decoder.cpp).
#include "models/model_config.h"

namespace rlaif {

ModelConfig parse_llama_config(const nlohmann::json& j, const std::string& source) {
  ModelConfig c;
  c.family = "llama";
  c.architecture = "LlamaForCausalLM";
  config_json::parse_common(j, source, c);
  const bool attention_bias = config_json::get_bool_or(j, "attention_bias", false, source);
  c.qkv_bias = attention_bias;
  c.o_bias = attention_bias;
  c.mlp_bias = config_json::get_bool_or(j, "mlp_bias", false, source);
  return c;
}

}  // namespace rlaif
