// `rlaif chat`: prints the prompt a model's chat template makes of a conversation, byte for byte what
// transformers' apply_chat_template(tokenize=False) gives — for checking prompts before training on them.
#include <cstdio>

#include "command.h"
#include "core/error.h"
#include "core/gguf.h"
#include "core/io.h"
#include "text/chat_template.h"

namespace rlaif::app {
namespace {

using ojson = nlohmann::ordered_json;

ChatTemplate template_from_gguf(const std::string& path) { return ChatTemplate::from_gguf(*GgufFile::open(path)); }

ojson read_json(const std::string& path, const char* what) {
  try {
    return ojson::parse(read_file(path));
  } catch (const nlohmann::json::exception& e) {
    throw Error("chat", fmt::format("{} {}: invalid JSON: {}", what, path, e.what()));
  }
}

const RegisterCommand kRegister{Command{
    "chat", "Render a conversation with a model's chat template and print the prompt",
    [](CLI::App& sub) -> std::function<int()> {
      struct Opts {
        std::string template_dir, gguf, messages, tools, user, system;
        bool no_generation_prompt = false;
      };
      auto o = std::make_shared<Opts>();
      auto* dir = sub.add_option("--template-dir", o->template_dir,
                                 "Hugging Face tokenizer directory (chat_template.jinja or tokenizer_config.json)");
      auto* gguf = sub.add_option("--gguf", o->gguf, "GGUF model file with tokenizer.chat_template metadata");
      dir->excludes(gguf);
      gguf->excludes(dir);
      auto* messages = sub.add_option("--messages", o->messages,
                                      "JSON file: a list of messages, or {\"messages\": [...], \"tools\": [...]}");
      auto* user = sub.add_option("--user", o->user, "a single user message");
      auto* system = sub.add_option("--system", o->system, "a system message before --user");
      messages->excludes(user);
      user->excludes(messages);
      system->needs(user);
      sub.add_option("--tools", o->tools, "JSON file with a list of tool (function) definitions");
      sub.add_flag("--no-generation-prompt", o->no_generation_prompt, "do not open an assistant turn at the end");
      return [o]() {
        if (o->template_dir.empty() == o->gguf.empty())
          throw Error("chat", "give exactly one of --template-dir or --gguf");
        ChatTemplate t = o->gguf.empty() ? ChatTemplate::from_dir(o->template_dir) : template_from_gguf(o->gguf);
        ojson msgs = ojson::array(), tools = nullptr;
        if (!o->messages.empty()) {
          ojson j = read_json(o->messages, "--messages");
          if (j.is_object()) {
            if (j.contains("tools")) tools = j["tools"];
            j = j.contains("messages") ? j["messages"] : ojson();
          }
          if (!j.is_array()) throw Error("chat", fmt::format("--messages {}: expected a list of messages", o->messages));
          msgs = std::move(j);
        } else if (!o->user.empty()) {
          if (!o->system.empty()) msgs.push_back({{"role", "system"}, {"content", o->system}});
          msgs.push_back({{"role", "user"}, {"content", o->user}});
        } else {
          throw Error("chat", "nothing to render", "pass --messages FILE.json or --user TEXT");
        }
        if (!o->tools.empty()) tools = read_json(o->tools, "--tools");
        const std::string prompt = t.render(msgs, !o->no_generation_prompt, tools);
        std::fwrite(prompt.data(), 1, prompt.size(), stdout);
        return 0;
      };
    }}};

}  // namespace
}  // namespace rlaif::app
