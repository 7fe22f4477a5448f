// Model hyper-parameters as plain structs, parsed once from an HF config.json (or GGUF metadata). Each family
// file (qwen2.cpp, llama.cpp) registers how its config.json maps onto ModelConfig.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace rlaif {

struct RopeConfig {
  std::string type = "default";  // "default" or "llama3"
  double theta = 10000.0;
  // llama3 frequency scaling (rope_type "llama3"): see transformers' _compute_llama3_parameters.
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;
};

struct ModelConfig {
  std::string family;        // "qwen2" or "llama"
  std::string architecture;  // e.g. "Qwen2ForCausalLM"
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  RopeConfig rope;
  bool qkv_bias = false;   // Qwen2 always; Llama with attention_bias
  bool o_bias = false;     // Llama with attention_bias
  bool mlp_bias = false;   // Llama with mlp_bias
  bool tie_word_embeddings = false;
  std::string dtype = "float32";  // the checkpoint's torch dtype name ("bfloat16", ...)
  std::optional<int64_t> bos_token_id;
  std::vector<int64_t> eos_token_ids;
  std::optional<int64_t> pad_token_id;
};

// Reads `dir`/config.json; an unsupported architecture is an Error listing the supported ones.
ModelConfig load_model_config(const std::filesystem::path& dir);
// Parses an already-read config.json; `source` names it in errors.
ModelConfig parse_model_config(const nlohmann::json& j, const std::string& source);

// Helpers the family parsers share: a required or optional key with its type checked, errors naming the key.
namespace config_json {
int64_t get_int(const nlohmann::json& j, const char* key, const std::string& source);
int64_t get_int_or(const nlohmann::json& j, const char* key, int64_t fallback, const std::string& source);
double get_double_or(const nlohmann::json& j, const char* key, double fallback, const std::string& source);
bool get_bool_or(const nlohmann::json& j, const char* key, bool fallback, const std::string& source);
// The fields every Llama-style family shares (sizes, heads, eps, rope, tying, token ids).
void parse_common(const nlohmann::json& j, const std::string& source, ModelConfig& c);
}  // namespace config_json

// A model family: which config.json architectures it serves and how it parses them.
struct ModelFamily {
  std::string name;
  std::vector<std::string> architectures;  // config.json "architectures"
  std::vector<std::string> model_types;    // config.json "model_type"
  ModelConfig (*parse)(const nlohmann::json& j, const std::string& source);
};
const std::vector<ModelFamily>& model_families();

}  // namespace rlaif
