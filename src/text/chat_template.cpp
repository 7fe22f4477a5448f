// ChatTemplate: loads HF chat templates (tokenizer_config.json / chat_template.jinja) and renders them with
// the same variables transformers passes to jinja2.
#include "text/chat_template.h"

#include "core/gguf.h"

#include "core/error.h"
#include "core/io.h"
#include "text/jinja.h"

namespace rlaif {

namespace {

// A special token in tokenizer_config.json: a string, or an AddedToken dict {"content": ...}.
std::string token_text(const nlohmann::json& j) {
  if (j.is_string()) return j.get<std::string>();
  if (j.is_object() && j.contains("content") && j["content"].is_string()) return j["content"].get<std::string>();
  return "";
}

}  // namespace

ChatTemplate ChatTemplate::from_string(std::string source, std::string name) {
  ChatTemplate t;
  t.tmpl_ = jinja::parse(source, name);
  t.name_ = std::move(name);
  t.source_ = std::move(source);
  return t;
}

ChatTemplate ChatTemplate::from_dir(const std::filesystem::path& dir) {
  const auto config_path = dir / "tokenizer_config.json";
  const auto jinja_path = dir / "chat_template.jinja";
  nlohmann::json config = nlohmann::json::object();
  if (std::filesystem::exists(config_path)) {
    try {
      config = nlohmann::json::parse(read_file(config_path));
    } catch (const nlohmann::json::exception& e) {
      throw Error("chat_template", fmt::format("{}: invalid JSON: {}", config_path.string(), e.what()));
    }
  }
  ChatTemplate t;
  if (std::filesystem::exists(jinja_path)) {
    t = from_string(read_file(jinja_path), jinja_path.string());
  } else if (config.contains("chat_template")) {
    const auto& ct = config["chat_template"];
    const std::string name = config_path.string() + ":chat_template";
    if (ct.is_string()) {
      t = from_string(ct.get<std::string>(), name);
    } else if (ct.is_array()) {
      const nlohmann::json* found = nullptr;
      for (const auto& entry : ct)
        if (entry.is_object() && entry.value("name", "") == "default" && entry.contains("template")) found = &entry;
      if (!found || !(*found)["template"].is_string())
        throw Error("chat_template", fmt::format("{}: chat_template list has no \"default\" entry", config_path.string()),
                    "use ChatTemplate::from_string with the template you want");
      t = from_string((*found)["template"].get<std::string>(), name + "[default]");
    } else {
      throw Error("chat_template", fmt::format("{}: \"chat_template\" must be a string or a list", config_path.string()));
    }
  } else {
    throw Error("chat_template", fmt::format("no chat template in {}", dir.string()),
                "expected chat_template.jinja or a \"chat_template\" key in tokenizer_config.json");
  }
  for (const char* key : {"bos_token", "eos_token", "unk_token", "pad_token"}) {
    if (config.contains(key)) {
      const std::string tok = token_text(config[key]);
      if (!tok.empty()) t.special_tokens_[key] = tok;
    }
  }
  return t;
}

void ChatTemplate::set_special_tokens(std::string bos, std::string eos) {
  special_tokens_.erase("bos_token");
  special_tokens_.erase("eos_token");
  if (!bos.empty()) special_tokens_["bos_token"] = std::move(bos);
  if (!eos.empty()) special_tokens_["eos_token"] = std::move(eos);
}

template <typename Json>
std::string ChatTemplate::render_impl(const Json& messages, bool add_generation_prompt, const Json& tools,
                                      const Json& extra_context) const {
  RLAIF_CHECK(tmpl_ != nullptr, "ChatTemplate used before loading");
  if (!messages.is_array()) throw Error("chat_template", "messages must be a JSON array of message objects");
  if (!tools.is_null() && !tools.is_array()) throw Error("chat_template", "tools must be a JSON array or null");
  if (!extra_context.is_object()) throw Error("chat_template", "extra_context must be a JSON object");
  // Same variables, same precedence as transformers: special tokens, then the call's keyword arguments.
  std::map<std::string, jinja::Value> vars;
  for (auto it = special_tokens_.begin(); it != special_tokens_.end(); ++it)
    vars[it.key()] = jinja::Value::from_json(it.value());
  for (auto it = extra_context.begin(); it != extra_context.end(); ++it)
    vars[it.key()] = jinja::Value::from_json(it.value());
  vars["messages"] = jinja::Value::from_json(messages);
  vars["tools"] = jinja::Value::from_json(tools);
  vars["documents"] = jinja::Value::none();
  vars["add_generation_prompt"] = jinja::Value::boolean(add_generation_prompt);
  return jinja::render(*tmpl_, vars);
}

std::string ChatTemplate::render(const nlohmann::json& messages, bool add_generation_prompt,
                                 const nlohmann::json& tools, const nlohmann::json& extra_context) const {
  return render_impl(messages, add_generation_prompt, tools, extra_context);
}

std::string ChatTemplate::render(const nlohmann::ordered_json& messages, bool add_generation_prompt,
                                 const nlohmann::ordered_json& tools,
                                 const nlohmann::ordered_json& extra_context) const {
  return render_impl(messages, add_generation_prompt, tools, extra_context);
}

std::string ChatTemplate::render(const std::vector<ChatMessage>& messages, bool add_generation_prompt) const {
  nlohmann::ordered_json arr = nlohmann::ordered_json::array();
  for (const auto& m : messages) {
    nlohmann::ordered_json j = {{"role", m.role}, {"content", m.content}};
    if (m.extra.is_object())
      for (auto it = m.extra.begin(); it != m.extra.end(); ++it) j[it.key()] = it.value();
    arr.push_back(std::move(j));
  }
  return render(arr, add_generation_prompt);
}

ChatTemplate ChatTemplate::from_gguf(const GgufFile& f) {
  const std::string path = f.path().string();
  if (!f.has("tokenizer.chat_template"))
    throw Error("chat", fmt::format("{} has no tokenizer.chat_template metadata", path),
                "use the model's Hugging Face tokenizer directory instead");
  ChatTemplate t = from_string(f.get_string("tokenizer.chat_template"), path + ":tokenizer.chat_template");
  auto token = [&](const char* id_key) -> std::string {
    if (!f.has(id_key) || !f.has("tokenizer.ggml.tokens")) return "";
    const auto& tokens = f.get_string_array("tokenizer.ggml.tokens");
    const uint32_t id = f.get_u32(id_key);
    return id < tokens.size() ? tokens[id] : "";
  };
  t.set_special_tokens(token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id"));
  return t;
}

}  // namespace rlaif
