// Chat templates: renders a conversation into the prompt string exactly as transformers'
// apply_chat_template(tokenize=False) does, using the Jinja-subset interpreter in text/jinja.h.
#pragma once

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace rlaif {

class GgufFile;

namespace jinja {
struct Template;
}

struct ChatMessage {
  std::string role;
  std::string content;
  nlohmann::json extra;  // extra message keys: tool_calls, name, reasoning_content, ...
};

class ChatTemplate {
 public:
  // Parses now, so syntax errors and unknown tags surface here (rlaif::Error naming `name` and the line).
  static ChatTemplate from_string(std::string source, std::string name = "chat_template");
  // A Hugging Face model/tokenizer directory: chat_template.jinja if present (transformers gives it
  // priority), else tokenizer_config.json's "chat_template" (a string, or a list of {name, template} from
  // which "default" is taken). bos/eos/unk/pad tokens come from tokenizer_config.json when it names them.
  static ChatTemplate from_dir(const std::filesystem::path& dir);
  // tokenizer.chat_template of a GGUF file, with its BOS/EOS token texts; Error if the file has none.
  static ChatTemplate from_gguf(const GgufFile& gguf);

  // Renders as transformers' apply_chat_template(tokenize=False): variables messages,
  // add_generation_prompt, tools (array or null), documents (null), the special tokens, plus `extra_context`.
  // nlohmann::json objects are key-sorted, so `tojson` prints their keys alphabetically; pass
  // nlohmann::ordered_json to keep the caller's key order (what Python dicts would print).
  std::string render(const nlohmann::json& messages, bool add_generation_prompt,
                     const nlohmann::json& tools = nullptr,
                     const nlohmann::json& extra_context = nlohmann::json::object()) const;
  std::string render(const nlohmann::ordered_json& messages, bool add_generation_prompt,
                     const nlohmann::ordered_json& tools = nullptr,
                     const nlohmann::ordered_json& extra_context = nlohmann::ordered_json::object()) const;
  std::string render(const std::vector<ChatMessage>& messages, bool add_generation_prompt) const;

  // Empty strings leave the variable undefined, as transformers does for tokens a tokenizer lacks.
  void set_special_tokens(std::string bos, std::string eos);
  const std::string& name() const { return name_; }
  const std::string& source() const { return source_; }

 private:
  template <typename Json>
  std::string render_impl(const Json& messages, bool add_generation_prompt, const Json& tools,
                          const Json& extra_context) const;

  std::string name_, source_;
  std::shared_ptr<const jinja::Template> tmpl_;
  nlohmann::json special_tokens_ = nlohmann::json::object();  // bos_token, eos_token, ...
};

}  // namespace rlaif
