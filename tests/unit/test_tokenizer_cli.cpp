// `rlaif tokenize` end to end: ids printed by the binary equal HF tokenizers' ids for the same text, decode
// prints the text back, and bad input is a clear error with a non-zero exit code.
#include <gtest/gtest.h>

#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "test_util.h"

using namespace rlaif;

namespace {
std::string rlaif_bin() { return (test::binary_dir() / "apps" / "rlaif").string(); }
std::string qwen_dir() { return (test::shared_data() / "qwen3-tokenizer").string(); }
}  // namespace

TEST(TokenizeCli, IdsEqualHfTokenizersAndDecodeRoundTrips) {
  const std::string text = "def add(a, b):\n    return a + b  # 合計 🤗<|im_end|>";
  const std::string quoted = nlohmann::json(text).dump();  // a JSON string is also a valid Python literal here
  std::string ref;
  const std::string py = test::python() + " -c 'import sys,tokenizers; t=tokenizers.Tokenizer.from_file(sys.argv[1]+\"/tokenizer.json\"); "
                         "print(\" \".join(map(str, t.encode(" + quoted + ", add_special_tokens=False).ids)))' " + qwen_dir();
  ASSERT_EQ(test::run_command(py, &ref), 0) << ref;
  std::string out;
  ASSERT_EQ(test::run_command(rlaif_bin() + " tokenize --tokenizer " + qwen_dir() + " --text '" + text + "'", &out), 0) << out;
  EXPECT_EQ(out, ref);
  std::string dec;
  ASSERT_EQ(test::run_command(rlaif_bin() + " tokenize --tokenizer " + qwen_dir() + " --decode '" + ref + "'", &dec), 0);
  EXPECT_EQ(dec, text + "\n");
}

TEST(TokenizeCli, JsonlFileAndPieces) {
  const auto dir = test::temp_dir("tokenize_cli");
  {
    std::ofstream f(dir / "in.jsonl");
    f << R"({"prompt": "Hello world"})" << "\n" << R"({"prompt": "Hi"})" << "\n";
  }
  std::string out;
  ASSERT_EQ(test::run_command(rlaif_bin() + " tokenize --tokenizer " + qwen_dir() + " --pieces --file " +
                              (dir / "in.jsonl").string(), &out), 0) << out;
  std::istringstream lines(out);
  std::string l1, l2;
  std::getline(lines, l1);
  std::getline(lines, l2);
  const auto j1 = nlohmann::json::parse(l1);
  EXPECT_EQ(j1["pieces"], nlohmann::json::parse(R"(["Hello", "Ġworld"])"));
  EXPECT_EQ(j1["ids"].size(), 2u);
  EXPECT_EQ(nlohmann::json::parse(l2)["pieces"], nlohmann::json::parse(R"(["Hi"])"));
  EXPECT_NE(test::run_command(rlaif_bin() + " tokenize --tokenizer " + qwen_dir() + " --file " +
                              (dir / "in.jsonl").string() + " --field nope", &out), 0);
  EXPECT_NE(out.find("nope"), std::string::npos) << out;
  EXPECT_NE(test::run_command(rlaif_bin() + " tokenize --tokenizer /does/not/exist --text x", &out), 0);
  EXPECT_NE(out.find("/does/not/exist"), std::string::npos) << out;
}
