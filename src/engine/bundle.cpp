// Loading a model folder or GGUF file together with its tokenizer, chat template and stop ids.
#include "engine/bundle.h"

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/gguf.h"
#include "core/io.h"
#include "models/gguf_model.h"

namespace rlaif {

namespace fs = std::filesystem;

static void add_ids(std::vector<int64_t>& out, const nlohmann::json& v) {
  if (v.is_number_integer()) out.push_back(v.get<int64_t>());
  if (v.is_array())
    for (const auto& e : v)
      if (e.is_number_integer()) out.push_back(e.get<int64_t>());
}

ModelBundle load_bundle(const fs::path& path, const LoadOptions& opt) {
  ModelBundle b{load_model(path, opt), Tokenizer(), std::nullopt, {}, path};
  if (fs::is_directory(path)) {
    b.tokenizer = Tokenizer::from_dir(path);
    if (fs::exists(path / "chat_template.jinja") || fs::exists(path / "tokenizer_config.json")) {
      try {
        b.chat_template = ChatTemplate::from_dir(path);
      } catch (const Error&) {
        b.chat_template.reset();  // a folder without a template: --chat will say so
      }
    }
    if (fs::exists(path / "generation_config.json")) {
      const auto j = nlohmann::json::parse(read_file(path / "generation_config.json"), nullptr, false);
      if (j.is_discarded()) throw Error("model", fmt::format("{}: invalid JSON", (path / "generation_config.json").string()));
      if (j.contains("eos_token_id")) add_ids(b.eos_ids, j["eos_token_id"]);
    }
  } else {
    auto g = GgufFile::open(path);
    b.tokenizer = Tokenizer::from_gguf(*g);
    if (g->has("tokenizer.chat_template")) b.chat_template = ChatTemplate::from_gguf(*g);
  }
  for (int64_t id : b.model->config().eos_token_ids) b.eos_ids.push_back(id);
  if (b.eos_ids.empty() && b.tokenizer.eos_id()) b.eos_ids.push_back(*b.tokenizer.eos_id());
  std::sort(b.eos_ids.begin(), b.eos_ids.end());
  b.eos_ids.erase(std::unique(b.eos_ids.begin(), b.eos_ids.end()), b.eos_ids.end());
  return b;
}

std::vector<int32_t> ModelBundle::encode_prompt(const std::string& text, bool chat, const std::string& system) const {
  std::string rendered = text;
  if (chat) {
    if (!chat_template)
      throw Error("generate", fmt::format("{} has no chat template", source.string()), "drop --chat to use raw text");
    nlohmann::json messages = nlohmann::json::array();
    if (!system.empty()) messages.push_back({{"role", "system"}, {"content", system}});
    messages.push_back({{"role", "user"}, {"content", text}});
    rendered = chat_template->render(messages, /*add_generation_prompt=*/true);
  }
  std::vector<int32_t> ids = tokenizer.encode(rendered, /*parse_special=*/true);
  if (tokenizer.add_bos() && tokenizer.bos_id() && (ids.empty() || ids[0] != *tokenizer.bos_id()))
    ids.insert(ids.begin(), *tokenizer.bos_id());
  return ids;
}

}  // namespace rlaif
