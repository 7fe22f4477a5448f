// `rlaif chat`: the printed prompt equals transformers' rendering of the same conversation, for a
// tokenizer directory and for a GGUF file's embedded template; bad inputs exit non-zero with a message.
#include <gtest/gtest.h>

#include <cstdlib>

#include <nlohmann/json.hpp>

#include "core/io.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace rlaif;
using ojson = nlohmann::ordered_json;

namespace {

std::string rlaif_bin() {
  if (const char* b = std::getenv("RLAIF_BIN")) return b;
  return (test::binary_dir() / "apps" / "rlaif").string();
}

// transformers' rendering of one case with the template at `spec` (NAME=PATH, see the reference script).
std::string reference(const ojson& c, const std::string& spec, bool agp, const fs::path& dir) {
  write_file_atomic(dir / "cases.json", ojson::array({c}).dump());
  std::string log;
  const std::string cmd = fmt::format("{} {} conversations --cases {} --template {} --out {}", test::python(),
                                      (test::source_dir() / "tests/reference/chat_template_render.py").string(),
                                      (dir / "cases.json").string(), spec, (dir / "out.json").string());
  EXPECT_EQ(test::run_command(cmd, &log), 0) << log;
  for (const auto& r : ojson::parse(read_file(dir / "out.json")))
    if (r["add_generation_prompt"] == agp) return r["ordered"]["text"].get<std::string>();
  return "<missing>";
}

}  // namespace

TEST(ChatCli, TemplateDirWithSystemAndUserMatchesTransformers) {
  ASSERT_TRUE(fs::exists(rlaif_bin())) << rlaif_bin();
  const ojson c = {{"name", "cli"},
                   {"messages", {{{"role", "system"}, {"content", "Be brief — très."}}, {{"role", "user"}, {"content", "Sort a list in C++"}}}}};
  const fs::path qwen = test::shared_data() / "qwen2.5";
  const fs::path dir = test::temp_dir("chat_cli_template_dir");
  std::string out;
  ASSERT_EQ(test::run_command(fmt::format("{} chat --template-dir {} --system '{}' --user '{}' 2>/dev/null", rlaif_bin(),
                                          qwen.string(), "Be brief — très.", "Sort a list in C++"),
                              &out),
            0)
      << out;
  EXPECT_EQ(out, reference(c, "qwen2.5=" + qwen.string(), true, dir));
}

TEST(ChatCli, MessagesFileWithToolsAndNoGenerationPrompt) {
  ASSERT_TRUE(fs::exists(rlaif_bin())) << rlaif_bin();
  ojson c;
  for (const auto& x : ojson::parse(read_file(test::source_dir() / "tests/data/chat_templates/conversations.json")))
    if (x["name"] == "multi_step_tools") c = x;
  ASSERT_FALSE(c.is_null());
  const fs::path dir = test::temp_dir("chat_cli_messages");
  write_file_atomic(dir / "conv.json", ojson{{"messages", c["messages"]}, {"tools", c["tools"]}}.dump());
  const fs::path qwen3 = test::shared_data() / "qwen3-tokenizer";
  std::string out;
  ASSERT_EQ(test::run_command(fmt::format("{} chat --template-dir {} --messages {} --no-generation-prompt 2>/dev/null",
                                          rlaif_bin(), qwen3.string(), (dir / "conv.json").string()),
                              &out),
            0)
      << out;
  EXPECT_EQ(out, reference(c, "qwen3=" + qwen3.string(), false, dir));
}

TEST(ChatCli, GgufEmbeddedTemplateMatchesTransformers) {
  const fs::path gguf = test::source_dir() / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf";
  if (!fs::exists(gguf)) GTEST_SKIP() << "scripts/setup.sh did not fetch " << gguf;
  ASSERT_TRUE(fs::exists(rlaif_bin())) << rlaif_bin();
  const ojson c = {{"name", "cli"}, {"messages", {{{"role", "user"}, {"content", "Hi"}}}}};
  const fs::path dir = test::temp_dir("chat_cli_gguf");
  std::string out;
  ASSERT_EQ(test::run_command(fmt::format("{} chat --gguf {} --user Hi 2>/dev/null", rlaif_bin(), gguf.string()), &out), 0) << out;
  // The fixture is the same template, extracted from this GGUF with gguf-py (tests/data/chat_templates/README.md).
  EXPECT_EQ(out, reference(c, "smollm2=" + (test::source_dir() / "tests/data/chat_templates/smollm2.jinja").string(), true, dir));
}

TEST(ChatCli, BadInputsFailWithAMessage) {
  ASSERT_TRUE(fs::exists(rlaif_bin())) << rlaif_bin();
  std::string out;
  EXPECT_EQ(test::run_command(fmt::format("{} chat --template-dir {} --user x", rlaif_bin(), test::temp_dir("chat_cli_empty").string()), &out), 1);
  EXPECT_NE(out.find("no chat template"), std::string::npos) << out;
  EXPECT_EQ(test::run_command(fmt::format("{} chat --template-dir {}", rlaif_bin(), (test::shared_data() / "qwen2.5").string()), &out), 1);
  EXPECT_NE(out.find("nothing to render"), std::string::npos) << out;
}
