// config.json → ModelConfig: family lookup plus the fields every Llama-style family shares. Key names and
// both rope spellings (v4 "rope_theta"/"rope_scaling", v5 "rope_parameters") follow transformers.
#include "models/model_config.h"

#include "core/error.h"
#include "core/io.h"

namespace rlaif {

using nlohmann::json;

ModelConfig parse_qwen2_config(const json& j, const std::string& source);
ModelConfig parse_llama_config(const json& j, const std::string& source);

const std::vector<ModelFamily>& model_families() {
  static const std::vector<ModelFamily> kFamilies = {
      {"qwen2", {"Qwen2ForCausalLM"}, {"qwen2"}, parse_qwen2_config},
      {"llama", {"LlamaForCausalLM"}, {"llama"}, parse_llama_config},
  };
  return kFamilies;
}

namespace config_json {

static const json* find(const json& j, const char* key) {
  auto it = j.find(key);
  return it == j.end() || it->is_null() ? nullptr : &*it;
}

int64_t get_int(const json& j, const char* key, const std::string& source) {
  const json* v = find(j, key);
  if (!v) throw Error("config", fmt::format("{}: missing required key '{}'", source, key));
  if (!v->is_number_integer())
    throw Error("config", fmt::format("{}: key '{}' must be an integer, got {}", source, key, v->dump()));
  return v->get<int64_t>();
}

int64_t get_int_or(const json& j, const char* key, int64_t fallback, const std::string& source) {
  return find(j, key) ? get_int(j, key, source) : fallback;
}

double get_double_or(const json& j, const char* key, double fallback, const std::string& source) {
  const json* v = find(j, key);
  if (!v) return fallback;
  if (!v->is_number()) throw Error("config", fmt::format("{}: key '{}' must be a number, got {}", source, key, v->dump()));
  return v->get<double>();
}

bool get_bool_or(const json& j, const char* key, bool fallback, const std::string& source) {
  const json* v = find(j, key);
  if (!v) return fallback;
  if (!v->is_boolean()) throw Error("config", fmt::format("{}: key '{}' must be true or false, got {}", source, key, v->dump()));
  return v->get<bool>();
}

static void parse_rope(const json& j, const std::string& source, RopeConfig& r) {
  // transformers v5 writes rope_parameters {rope_type, rope_theta, ...}; v4 checkpoints write rope_theta at the
  // top level and rope_scaling {type|rope_type, factor, ...} (or null).
  const json* params = find(j, "rope_parameters");
  if (!params) params = find(j, "rope_scaling");
  r.theta = get_double_or(j, "rope_theta", r.theta, source);
  if (!params) return;
  if (!params->is_object()) throw Error("config", fmt::format("{}: rope parameters must be an object", source));
  r.theta = get_double_or(*params, "rope_theta", r.theta, source);
  std::string type = "default";
  if (const json* t = find(*params, "rope_type")) type = t->get<std::string>();
  else if (const json* t2 = find(*params, "type")) type = t2->get<std::string>();
  if (type != "default" && type != "llama3")
    throw Error("config", fmt::format("{}: rope type '{}' is not supported", source, type),
                "supported rope types: default, llama3");
  r.type = type;
  if (type == "llama3") {
    r.factor = get_double_or(*params, "factor", r.factor, source);
    r.low_freq_factor = get_double_or(*params, "low_freq_factor", r.low_freq_factor, source);
    r.high_freq_factor = get_double_or(*params, "high_freq_factor", r.high_freq_factor, source);
    r.original_max_position_embeddings =
        get_int(*params, "original_max_position_embeddings", source + " rope parameters");
  }
}

static std::vector<int64_t> int_or_list(const json& j, const char* key, const std::string& source) {
  const json* v = find(j, key);
  if (!v) return {};
  if (v->is_number_integer()) return {v->get<int64_t>()};
  if (v->is_array()) {
    std::vector<int64_t> out;
    for (const auto& e : *v) {
      if (!e.is_number_integer()) throw Error("config", fmt::format("{}: '{}' must hold integers", source, key));
      out.push_back(e.get<int64_t>());
    }
    return out;
  }
  throw Error("config", fmt::format("{}: '{}' must be an integer or a list of integers", source, key));
}

void parse_common(const json& j, const std::string& source, ModelConfig& c) {
  c.vocab_size = get_int(j, "vocab_size", source);
  c.hidden_size = get_int(j, "hidden_size", source);
  c.intermediate_size = get_int(j, "intermediate_size", source);
  c.num_layers = get_int(j, "num_hidden_layers", source);
  c.num_heads = get_int(j, "num_attention_heads", source);
  c.num_kv_heads = get_int_or(j, "num_key_value_heads", c.num_heads, source);
  c.head_dim = get_int_or(j, "head_dim", c.hidden_size / c.num_heads, source);
  c.max_position_embeddings = get_int_or(j, "max_position_embeddings", 4096, source);
  c.rms_norm_eps = get_double_or(j, "rms_norm_eps", 1e-6, source);
  c.tie_word_embeddings = get_bool_or(j, "tie_word_embeddings", false, source);
  parse_rope(j, source, c.rope);
  if (const json* d = find(j, "torch_dtype")) c.dtype = d->get<std::string>();
  if (const json* d = find(j, "dtype")) c.dtype = d->get<std::string>();
  if (auto b = int_or_list(j, "bos_token_id", source); !b.empty()) c.bos_token_id = b[0];
  c.eos_token_ids = int_or_list(j, "eos_token_id", source);
  if (auto p = int_or_list(j, "pad_token_id", source); !p.empty()) c.pad_token_id = p[0];
  const std::string act = find(j, "hidden_act") ? j["hidden_act"].get<std::string>() : "silu";
  if (act != "silu")
    throw Error("config", fmt::format("{}: hidden_act '{}' is not supported", source, act), "supported: silu");
  if (c.num_heads <= 0 || c.num_kv_heads <= 0 || c.num_heads % c.num_kv_heads != 0)
    throw Error("config", fmt::format("{}: num_attention_heads {} must be a positive multiple of num_key_value_heads {}",
                                      source, c.num_heads, c.num_kv_heads));
  if (c.head_dim % 2 != 0) throw Error("config", fmt::format("{}: head_dim {} must be even for rotary embeddings", source, c.head_dim));
}

}  // namespace config_json

ModelConfig parse_model_config(const json& j, const std::string& source) {
  if (!j.is_object()) throw Error("config", fmt::format("{}: not a JSON object", source));
  std::vector<std::string> archs;
  if (auto it = j.find("architectures"); it != j.end() && it->is_array())
    for (const auto& a : *it) archs.push_back(a.get<std::string>());
  const std::string model_type = j.value("model_type", "");
  std::string supported;
  for (const auto& f : model_families()) {
    for (const auto& a : f.architectures) {
      supported += (supported.empty() ? "" : ", ") + a;
      for (const auto& have : archs)
        if (have == a) return f.parse(j, source);
    }
  }
  if (archs.empty())
    for (const auto& f : model_families())
      for (const auto& t : f.model_types)
        if (t == model_type) return f.parse(j, source);
  throw Error("config",
              fmt::format("{}: unsupported architecture {} (model_type '{}')", source,
                          archs.empty() ? std::string("(none)") : archs[0], model_type),
              "supported architectures: " + supported);
}

ModelConfig load_model_config(const std::filesystem::path& dir) {
  const auto path = dir / "config.json";
  if (!std::filesystem::exists(path))
    throw Error("config", fmt::format("no config.json in '{}'", dir.string()),
                "point at a Hugging Face model folder");
  json j;
  try {
    j = json::parse(read_file(path));
  } catch (const json::parse_error& e) {
    throw Error("config", fmt::format("{}: invalid JSON: {}", path.string(), e.what()));
  }
  return parse_model_config(j, path.string());
}

}  // namespace rlaif
