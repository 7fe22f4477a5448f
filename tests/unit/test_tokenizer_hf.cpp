// Tokenizer equality with Hugging Face `tokenizers`, id for id, on every code prompt, all GSM8K test
// questions and answers, HumanEval prompts + solutions, MBPP texts + code and ~470 generated edge cases.
// The expected ids come from tests/reference/tokenizer_reference.py at test time.
#include <gtest/gtest.h>

#include <map>

#include <nlohmann/json.hpp>

#include "core/gguf.h"
#include "core/io.h"
#include "test_util.h"
#include "text/tokenizer.h"

namespace fs = std::filesystem;
using namespace rlaif;
using nlohmann::json;

namespace {

const fs::path& work_dir() {
  static const fs::path d = test::temp_dir("tokenizer_hf");
  return d;
}

std::string script() { return (test::source_dir() / "tests/reference/tokenizer_reference.py").string(); }

// A corpus made by the reference script: "corpus" (datasets + edge cases) or "chars" (every code point).
const std::vector<std::string>& corpus(const std::string& name = "corpus") {
  static std::map<std::string, std::vector<std::string>> cache;
  auto it = cache.find(name);
  if (it != cache.end()) return it->second;
  const fs::path out = work_dir() / (name + ".json");
  std::string log;
  const int rc = test::run_command("RLAIF_SHARED_DATA=" + test::shared_data().string() + " " + test::python() + " " +
                                   script() + " " + name + " " + out.string(), &log);
  if (rc != 0) throw std::runtime_error(name + " generation failed: " + log);
  return cache[name] = json::parse(read_file(out)).get<std::vector<std::string>>();
}

json reference(const std::string& kind, const fs::path& src, const std::string& corpus_name = "corpus") {
  const fs::path out = work_dir() / (kind + "_" + corpus_name + ".json");
  (void)corpus(corpus_name);
  std::string log;
  const std::string cmd = test::python() + " " + script() + " encode " + kind + " " + src.string() + " " +
                          (work_dir() / (corpus_name + ".json")).string() + " " + out.string();
  EXPECT_EQ(test::run_command(cmd, &log), 0) << cmd << "\n" << log;
  return json::parse(read_file(out));
}

const Tokenizer& qwen3_tokenizer() {
  static const Tokenizer t = Tokenizer::from_dir(test::shared_data() / "qwen3-tokenizer");
  return t;
}

void expect_equal_to_hf(const Tokenizer& tok, const json& ref, const std::string& corpus_name = "corpus") {
  const auto& texts = corpus(corpus_name);
  ASSERT_GT(texts.size(), 5000u);
  EXPECT_EQ(tok.vocab_size(), ref["vocab_size"].get<int32_t>());
  size_t mismatches = 0, roundtrips = 0;
  for (size_t i = 0; i < texts.size(); ++i) {
    const auto want = ref["ids"][i].get<std::vector<int32_t>>();
    const auto got = tok.encode(texts[i]);
    if (got != want && ++mismatches <= 5) {
      ADD_FAILURE() << "text " << i << " " << json(texts[i]).dump() << "\n ours: " << json(got).dump()
                    << "\n   hf: " << json(want).dump();
    }
    const std::string dec = tok.decode(want);
    EXPECT_EQ(dec, ref["decoded"][i].get<std::string>()) << "decode of text " << i;
    if (ref["roundtrip"][i].get<bool>()) {
      EXPECT_EQ(dec, texts[i]) << "round trip of text " << i;
      ++roundtrips;
    }
  }
  EXPECT_EQ(mismatches, 0u) << "of " << texts.size();
  EXPECT_GT(roundtrips, texts.size() * 9 / 10);
}

}  // namespace

TEST(TokenizerHf, Qwen25VocabMergesFolderEqualsTransformers) {
  const fs::path dir = test::shared_data() / "qwen2.5";
  expect_equal_to_hf(Tokenizer::from_dir(dir), reference("qwen_dir", dir));
}

TEST(TokenizerHf, Qwen3TokenizerJsonEqualsTokenizers) {
  const fs::path dir = test::shared_data() / "qwen3-tokenizer";
  expect_equal_to_hf(qwen3_tokenizer(), reference("json", dir));
}

TEST(TokenizerHf, SmolLM2GgufEqualsTokenizersBuiltFromGgufVocab) {
  const fs::path file = test::source_dir() / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf";
  ASSERT_TRUE(fs::exists(file)) << "run scripts/setup.sh";
  auto g = GgufFile::open(file);
  expect_equal_to_hf(Tokenizer::from_gguf(*g), reference("gguf_bpe", file));
}

// The GGUF "gpt2" + pre "qwen2" path, on a tokenizer-only GGUF that gguf-py writes from Qwen3's
// tokenizer.json the way llama.cpp's converter does: it must give HF's ids for Qwen3.
TEST(TokenizerHf, QwenGgufEqualsTokenizers) {
  const fs::path src = test::shared_data() / "qwen3-tokenizer";
  const fs::path gguf = work_dir() / "qwen.gguf";
  std::string log;
  ASSERT_EQ(test::run_command(test::python() + " " + script() + " qwen_gguf " + src.string() + " " + gguf.string(), &log), 0) << log;
  auto g = GgufFile::open(gguf);
  const Tokenizer tok = Tokenizer::from_gguf(*g);
  EXPECT_EQ(tok.eos_id(), 151645);
  EXPECT_TRUE(tok.is_special(151644));
  EXPECT_FALSE(tok.is_special(151667));  // <think>: USER_DEFINED, matched in text but not special
  expect_equal_to_hf(tok, reference("json", src));
}

// lstrip/rstrip on added tokens (Qwen's own have none): a variant tokenizer.json with them set.
TEST(TokenizerHf, AddedTokenStripFlagsEqualTokenizers) {
  const fs::path dir = work_dir() / "strip";
  std::string log;
  ASSERT_EQ(test::run_command(test::python() + " " + script() + " strip_variant " +
                              (test::shared_data() / "qwen3-tokenizer").string() + " " + dir.string(), &log), 0) << log;
  expect_equal_to_hf(Tokenizer::from_dir(dir), reference("json", dir));
}

// Every assigned code point (Unicode 14, Python's unicodedata) in a short string ("a" c c "1 " c "'s x"):
// the regex classes (\p{L}, \p{N}, White_Space), case folding in (?i:'s) and NFC agree with HF for each.
TEST(TokenizerHf, EveryCodePointEqualsTokenizers) {
  const fs::path dir = test::shared_data() / "qwen3-tokenizer";
  expect_equal_to_hf(qwen3_tokenizer(), reference("json", dir, "chars"), "chars");
}
