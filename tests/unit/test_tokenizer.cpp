// Tokenizer: llama.cpp's Qwen2 test vectors (46/46) with both Qwen tokenizer formats, the stories260K SPM
// golden ids, streaming detokenization, invalid UTF-8, special-token handling and error cases.
#include <gtest/gtest.h>

#include <fstream>
#include <random>
#include <sstream>
#include <thread>

#include "core/error.h"
#include "core/gguf.h"
#include "core/io.h"
#include "test_util.h"
#include "text/tokenizer.h"

namespace fs = std::filesystem;
using namespace rlaif;

namespace {

const Tokenizer& qwen25() {
  static const Tokenizer t = Tokenizer::from_dir(test::shared_data() / "qwen2.5");
  return t;
}
const Tokenizer& qwen3() {
  static const Tokenizer t = Tokenizer::from_dir(test::shared_data() / "qwen3-tokenizer");
  return t;
}
const Tokenizer& stories() {
  static const Tokenizer t = Tokenizer::from_gguf(*GgufFile::open(test::shared_data() / "models" / "stories260K.gguf"));
  return t;
}

// llama.cpp's vocab test files: inputs separated by "\n__ggml_vocab_test__\n", one line of ids per input.
void expect_llama_cpp_vectors(const Tokenizer& tok) {
  const fs::path dir = test::shared_data() / "tokenizer-tests";
  const std::string inp = read_file(dir / "qwen2.inp");
  const std::string sep = "\n__ggml_vocab_test__\n";
  std::vector<std::string> texts;
  for (size_t pos = 0; pos < inp.size();) {
    const size_t e = inp.find(sep, pos);
    ASSERT_NE(e, std::string::npos);
    texts.push_back(inp.substr(pos, e - pos));
    pos = e + sep.size();
  }
  std::istringstream out(read_file(dir / "qwen2.out"));
  std::string line;
  size_t i = 0, passed = 0;
  for (; i < texts.size() && std::getline(out, line); ++i) {
    std::vector<int32_t> want;
    std::istringstream ls(line);
    for (int32_t id; ls >> id;) want.push_back(id);
    const auto got = tok.encode(texts[i], false);
    EXPECT_EQ(got, want) << "vector " << i << ": '" << texts[i] << "'";
    EXPECT_EQ(tok.decode(got), texts[i]) << "vector " << i;
    passed += got == want;
  }
  EXPECT_EQ(i, 46u);
  EXPECT_EQ(passed, 46u);
}

const std::vector<int32_t> kStoriesIds = {403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426,
                                          338, 401, 396, 267, 337, 410, 408, 419, 292, 411, 322, 265, 282, 295, 433};
const std::string kStoriesText =
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park";

}  // namespace

TEST(Tokenizer, LlamaCppQwen2VectorsWithQwen25VocabMerges) { expect_llama_cpp_vectors(qwen25()); }
TEST(Tokenizer, LlamaCppQwen2VectorsWithQwen3TokenizerJson) { expect_llama_cpp_vectors(qwen3()); }

TEST(Tokenizer, QwenSpecialTokensAndMetadata) {
  const Tokenizer& t = qwen25();
  EXPECT_EQ(t.vocab_size(), 151665);
  EXPECT_EQ(qwen3().vocab_size(), 151669);
  EXPECT_EQ(t.token_to_id("<|im_start|>"), 151644);
  EXPECT_EQ(t.id_to_token(151645), "<|im_end|>");
  EXPECT_EQ(t.id_to_token(9707), "Hello");
  EXPECT_TRUE(t.is_special(151643));
  EXPECT_FALSE(t.is_special(151657));  // <tool_call> is an added but not special token
  EXPECT_FALSE(t.is_special(9707));
  EXPECT_EQ(t.eos_id(), 151645);
  EXPECT_EQ(t.pad_id(), 151643);
  EXPECT_FALSE(t.bos_id().has_value());
  EXPECT_FALSE(t.add_bos());
  EXPECT_FALSE(t.is_spm());
  const std::string chat = "<|im_start|>user\nhi<|im_end|>";
  const auto ids = t.encode(chat);
  EXPECT_EQ(ids.front(), 151644);
  EXPECT_EQ(ids.back(), 151645);
  EXPECT_EQ(t.decode(ids), chat);
  EXPECT_EQ(t.decode(ids, /*skip_special=*/true), "user\nhi");
  // parse_special=false: the markers are plain text, so no special id appears.
  for (int32_t id : t.encode(chat, false)) EXPECT_LT(id, 151643);
  EXPECT_EQ(t.decode(t.encode(chat, false)), chat);
  // <tool_call> is not special, so it is still matched with parse_special=false (as HF's split_special_tokens).
  const auto tc = t.encode("a<tool_call>b", false);
  EXPECT_NE(std::find(tc.begin(), tc.end(), 151657), tc.end());
  // Out-of-range ids decode to nothing, as in HF.
  EXPECT_EQ(t.decode({9707, 999999, -3}), "Hello");
}

TEST(Tokenizer, InvalidUtf8BecomesByteTokensAndRoundTrips) {
  std::mt19937 rng(7);
  for (const Tokenizer* t : {&qwen25(), &stories()}) {
    for (const std::string& s : {std::string("\xff"), std::string("ab\xc3"), std::string("\xe2\x82 x"),
                                 std::string("\xed\xa0\x80 surrogate"), std::string("ok \xc0\xaf overlong"),
                                 std::string("\xf4\x90\x80\x80 too big"), std::string("caf\xc3\xa9\x80")}) {
      const auto ids = t->encode(s);
      EXPECT_EQ(t->decode(ids), s) << s;
    }
    for (int k = 0; k < 200; ++k) {
      std::string s(rng() % 40, '\0');
      // Random bytes, minus the lead bytes of U+0300-U+037F: a valid base + combining mark would be changed by
      // Qwen's NFC normalizer (as in HF), which is not what this checks.
      for (char& c : s) {
        do c = static_cast<char>(rng() % 256);
        while (static_cast<unsigned char>(c) == 0xCC || static_cast<unsigned char>(c) == 0xCD);
      }
      EXPECT_EQ(t->decode(t->encode(s, false)), s);
    }
  }
  // Each invalid byte is exactly its byte-level token: 0xFF is "ÿ" (U+00FF) in GPT-2's byte alphabet.
  EXPECT_EQ(qwen25().encode("\xff"), std::vector<int32_t>{*qwen25().token_to_id("\xc3\xbf")});
  EXPECT_EQ(stories().encode("\xff"), (std::vector<int32_t>{*stories().token_to_id("\xe2\x96\x81"),
                                                          *stories().token_to_id("<0xFF>")}));  // ▁ = space prefix
}

TEST(Tokenizer, StreamDecoderNeverSplitsUtf8AndConcatenatesToDecode) {
  for (const Tokenizer* t : {&qwen25(), &stories()}) {
    for (const std::string text : {"héllo 世界 🤗👨‍👩‍👧 ok", "Once upon a time 🐉 in 東京", "plain ascii", "\xf0\x9f"}) {
      const auto ids = t->encode(text);
      Tokenizer::StreamDecoder sd(*t);
      std::string all;
      for (int32_t id : ids) {
        const std::string piece = sd.push(id);
        // Each piece is whole characters: valid UTF-8 on its own unless the input itself was invalid.
        if (text != std::string("\xf0\x9f")) {
          size_t i = 0;
          while (i < piece.size()) {
            const auto c = static_cast<unsigned char>(piece[i]);
            const size_t n = c < 0x80 ? 1 : c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : 2;
            ASSERT_LE(i + n, piece.size()) << "split char in '" << piece << "'";
            i += n;
          }
        }
        all += piece;
      }
      all += sd.flush();
      EXPECT_EQ(all, t->decode(ids)) << text;
    }
  }
  // A 4-byte emoji split over byte tokens is held back until complete.
  const Tokenizer& s = stories();
  Tokenizer::StreamDecoder sd(s);
  EXPECT_EQ(sd.push(*s.token_to_id("<0xF0>")), "");
  EXPECT_EQ(sd.push(*s.token_to_id("<0x9F>")), "");
  EXPECT_EQ(sd.push(*s.token_to_id("<0xA4>")), "");
  EXPECT_EQ(sd.push(*s.token_to_id("<0x97>")), "🤗");
  EXPECT_EQ(sd.flush(), "");
}

TEST(Tokenizer, Stories260KGoldenIds) {
  const Tokenizer& t = stories();
  EXPECT_TRUE(t.is_spm());
  EXPECT_EQ(t.vocab_size(), 512);
  EXPECT_EQ(t.bos_id(), 1);
  EXPECT_EQ(t.eos_id(), 2);
  EXPECT_FALSE(t.pad_id().has_value());  // 0xFFFFFFFF in the file
  EXPECT_TRUE(t.add_bos());
  EXPECT_TRUE(t.is_special(1));
  EXPECT_EQ(t.id_to_token(403), "\xe2\x96\x81Once");
  // The README's golden generation decodes to the published text, and encoding that text (llama.cpp SPM:
  // space prefix, highest-score bigram merges) gives back exactly those ids.
  EXPECT_EQ(t.decode(kStoriesIds), kStoriesText);
  EXPECT_EQ(t.encode(kStoriesText), kStoriesIds);
  // BOS first: with skip_special the space prefix is still removed from the first text token.
  std::vector<int32_t> with_bos = {1};
  with_bos.insert(with_bos.end(), kStoriesIds.begin(), kStoriesIds.end());
  EXPECT_EQ(t.decode(with_bos, true), kStoriesText);
  // Special tokens in text (llama.cpp parse_special): "<s>" is BOS; without parsing it is spelled out.
  EXPECT_EQ(t.encode("<s>Once").front(), 1);
  EXPECT_NE(t.encode("<s>Once", false).front(), 1);
  EXPECT_TRUE(t.encode("").empty());
  // Characters missing from the 512-piece vocab fall back to UTF-8 byte tokens.
  ASSERT_TRUE(t.token_to_id("\xe2\x96\x81").has_value());
  EXPECT_FALSE(t.token_to_id("\xce\xa9").has_value());
  EXPECT_EQ(t.encode("\xce\xa9"), (std::vector<int32_t>{*t.token_to_id("\xe2\x96\x81"), *t.token_to_id("<0xCE>"),
                                                        *t.token_to_id("<0xA9>")}));
}

TEST(Tokenizer, ErrorsNameTheFile) {
  const fs::path dir = test::temp_dir("tokenizer_errors");
  try {
    Tokenizer::from_dir(dir);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("vocab.json"), std::string::npos) << e.what();
  }
  std::ofstream(dir / "tokenizer.json") << "{ not json";
  try {
    Tokenizer::from_dir(dir);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("tokenizer.json"), std::string::npos) << e.what();
  }
  std::ofstream(dir / "tokenizer.json") << R"({"model": {"type": "WordPiece", "vocab": {}}})";
  try {
    Tokenizer::from_dir(dir);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("WordPiece"), std::string::npos) << e.what();
  }
}

TEST(Tokenizer, ConcurrentEncodeEqualsSequential) {
  // encode() is const and shares one per-word cache between threads: results must not depend on that.
  const Tokenizer& t = qwen3();
  std::vector<std::string> texts;
  for (int i = 0; i < 200; ++i) texts.push_back(fmt::format("item {} of the list: naïve café {} 🤗 x{}y", i, i * 7919, i % 13));
  std::vector<std::vector<int32_t>> want;
  for (const auto& s : texts) want.push_back(t.encode(s));
  std::vector<int> bad(4, 0);
  std::vector<std::thread> th;
  for (int k = 0; k < 4; ++k)
    th.emplace_back([&, k] {
      for (int rep = 0; rep < 5; ++rep)
        for (size_t i = 0; i < texts.size(); ++i) bad[k] += t.encode(texts[(i + k * 37) % texts.size()]) != want[(i + k * 37) % texts.size()];
    });
  for (auto& x : th) x.join();
  EXPECT_EQ(bad, std::vector<int>(4, 0));
  EXPECT_THROW(Tokenizer().encode("x"), InternalError);
}
