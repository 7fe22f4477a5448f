// Chat templates of Qwen2.5, Qwen3, Llama-3.1 and SmolLM2 render byte for byte like transformers'
// render_jinja_template (tests/reference/chat_template_render.py) on every conversation in
// tests/data/chat_templates/conversations.json, and fail wherever transformers fails.
#include <gtest/gtest.h>

#include <fstream>

#include "core/error.h"
#include "core/io.h"
#include "text/chat_template.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace rlaif;
using ojson = nlohmann::ordered_json;

namespace {

fs::path fixtures() { return test::source_dir() / "tests" / "data" / "chat_templates"; }

struct Golden {
  ojson cases;      // name -> case
  ojson expected;   // list of reference results
};

const Golden& golden() {
  static const Golden g = [] {
    Golden out;
    const fs::path dir = test::temp_dir("chat_template_golden");
    const fs::path shared = test::shared_data();
    const std::string cmd = fmt::format(
        "{} {} conversations --cases {} --template qwen2.5={} --template qwen3={} --template llama3.1={} "
        "--template smollm2={} --out {}",
        test::python(), (test::source_dir() / "tests/reference/chat_template_render.py").string(),
        (fixtures() / "conversations.json").string(), (shared / "qwen2.5").string(),
        (shared / "qwen3-tokenizer").string(), (fixtures() / "llama3.1.jinja").string(),
        (fixtures() / "smollm2.jinja").string(), (dir / "ref.json").string());
    std::string log;
    if (test::run_command(cmd, &log) != 0) throw std::runtime_error("reference script failed: " + log);
    for (const auto& c : ojson::parse(read_file(fixtures() / "conversations.json"))) out.cases[c["name"].get<std::string>()] = c;
    out.expected = ojson::parse(read_file(dir / "ref.json"));
    return out;
  }();
  return g;
}

ChatTemplate load(const std::string& name) {
  if (name == "qwen2.5") return ChatTemplate::from_dir(test::shared_data() / "qwen2.5");
  if (name == "qwen3") return ChatTemplate::from_dir(test::shared_data() / "qwen3-tokenizer");
  ChatTemplate t = ChatTemplate::from_string(read_file(fixtures() / (name + ".jinja")), name);
  if (name == "llama3.1") t.set_special_tokens("<|begin_of_text|>", "<|eot_id|>");
  if (name == "smollm2") t.set_special_tokens("<|im_start|>", "<|im_end|>");
  return t;
}

// Renders every case of `tmpl_name` with ordered (Python-like) or key-sorted (nlohmann::json) objects.
void check_template(const std::string& tmpl_name, bool sorted) {
  const Golden& g = golden();
  ChatTemplate t = load(tmpl_name);
  int checked = 0, errors = 0;
  for (const auto& r : g.expected) {
    if (r["template"] != tmpl_name) continue;
    const ojson& c = g.cases.at(r["case"].get<std::string>());
    const bool agp = r["add_generation_prompt"].get<bool>();
    const ojson& want = r[sorted ? "sorted" : "ordered"];
    const std::string label = fmt::format("{} / {} / add_generation_prompt={}", tmpl_name, r["case"].get<std::string>(), agp);
    const ojson tools = c.contains("tools") ? c["tools"] : ojson(nullptr);
    const ojson extra = c.contains("extra_context") ? c["extra_context"] : ojson::object();
    ++checked;
    try {
      std::string got = sorted ? t.render(nlohmann::json::parse(c["messages"].dump()), agp,
                                          nlohmann::json::parse(tools.dump()), nlohmann::json::parse(extra.dump()))
                               : t.render(c["messages"], agp, tools, extra);
      if (want.contains("error")) {
        ADD_FAILURE() << label << ": transformers failed (" << want["error"] << ") but we rendered:\n" << got;
      } else {
        EXPECT_EQ(got, want["text"].get<std::string>()) << label;
      }
    } catch (const Error& e) {
      ++errors;
      if (!want.contains("error")) {
        ADD_FAILURE() << label << ": we failed: " << e.what();
      } else if (want["error"].get<std::string>().rfind("TemplateError: ", 0) == 0) {
        // raise_exception: our error carries the template's own message.
        const std::string msg = want["error"].get<std::string>().substr(15);
        EXPECT_NE(std::string(e.what()).find(msg), std::string::npos) << label << ": " << e.what();
      }
    }
  }
  EXPECT_GT(checked, 20) << "reference produced too few cases for " << tmpl_name;
  EXPECT_LT(errors, checked / 2) << "most cases should render";
}

}  // namespace

TEST(ChatTemplateGolden, Qwen25MatchesTransformers) { check_template("qwen2.5", false); }
TEST(ChatTemplateGolden, Qwen3MatchesTransformers) { check_template("qwen3", false); }
TEST(ChatTemplateGolden, Llama31MatchesTransformers) { check_template("llama3.1", false); }
TEST(ChatTemplateGolden, SmolLM2MatchesTransformers) { check_template("smollm2", false); }
// nlohmann::json sorts object keys; tojson output must then equal transformers' on key-sorted dicts.
TEST(ChatTemplateGolden, Qwen25SortedKeysMatchTransformers) { check_template("qwen2.5", true); }
TEST(ChatTemplateGolden, Llama31SortedKeysMatchTransformers) { check_template("llama3.1", true); }

TEST(ChatTemplateGolden, ChatMessageVectorEqualsJsonMessages) {
  // The std::vector<ChatMessage> overload is the JSON overload with the same keys in the same order.
  ChatTemplate t = load("qwen3");
  const ojson& c = golden().cases.at("reasoning_content_field");
  std::vector<ChatMessage> msgs;
  for (const auto& m : c["messages"]) {
    ChatMessage cm{m["role"], m["content"], nlohmann::json::object()};
    for (auto it = m.begin(); it != m.end(); ++it)
      if (it.key() != "role" && it.key() != "content") cm.extra[it.key()] = nlohmann::json::parse(it.value().dump());
    msgs.push_back(std::move(cm));
  }
  for (const auto& r : golden().expected) {
    if (r["template"] == "qwen3" && r["case"] == "reasoning_content_field" && r["add_generation_prompt"] == true) {
      EXPECT_EQ(t.render(msgs, true), r["ordered"]["text"].get<std::string>());
      return;
    }
  }
  FAIL() << "case missing from reference";
}
