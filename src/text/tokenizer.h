// Tokenizers equal to Hugging Face `tokenizers` / llama.cpp: byte-level BPE (tokenizer.json, vocab.json +
// merges.txt, or GGUF "gpt2") and llama.cpp's SentencePiece algorithm (GGUF "llama"). One class, so engine,
// trainer and CLI never care which kind a model uses.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace rlaif {

class GgufFile;
struct TokenizerImpl;

class Tokenizer {
 public:
  // tokenizer.json, else vocab.json + merges.txt (+ added_tokens.json, tokenizer_config.json,
  // special_tokens_map.json). Throws rlaif::Error("tokenizer", ...) naming the file.
  static Tokenizer from_dir(const std::filesystem::path& dir);
  // tokenizer.ggml.model "gpt2" (byte-level BPE, pre-tokenizer from tokenizer.ggml.pre) or "llama" (SPM).
  static Tokenizer from_gguf(const GgufFile& gguf);

  // Never adds BOS (see add_bos()). parse_special=false treats special tokens' text as plain text.
  // Input that is not valid UTF-8: each invalid byte becomes its own byte token (BPE: the byte-level token;
  // SPM: <0xXX>) and splits pre-tokenization there, so decode(encode(x)) == x for any bytes.
  std::vector<int32_t> encode(std::string_view text, bool parse_special = true) const;
  // Byte-exact concatenation of the tokens' bytes (no U+FFFD replacement, unlike HF's lossy String);
  // out-of-range ids are skipped as HF does.
  std::string decode(const std::vector<int32_t>& ids, bool skip_special = false) const;

  int32_t vocab_size() const;  // including added tokens
  std::optional<int32_t> token_to_id(std::string_view token) const;
  std::string id_to_token(int32_t id) const;  // the raw piece ("Ġhello", "▁the", "<0x0A>"); "" if out of range
  bool is_special(int32_t id) const;
  std::optional<int32_t> bos_id() const;
  std::optional<int32_t> eos_id() const;
  std::optional<int32_t> pad_id() const;
  bool add_bos() const;  // whether the model expects BOS prepended
  bool is_spm() const;   // SentencePiece-style (GGUF "llama") rather than byte-level BPE

  // Incremental detokenizer for streaming output: push() returns the newly completed text and never splits
  // a UTF-8 character; the pushes plus flush() concatenate to decode(ids).
  class StreamDecoder {
   public:
    explicit StreamDecoder(const Tokenizer& tok, bool skip_special = false)
        : tok_(&tok), skip_special_(skip_special) {}
    std::string push(int32_t id);
    std::string flush();  // whatever is held back (an incomplete character at the end of the stream)

   private:
    const Tokenizer* tok_;
    bool skip_special_;
    bool first_ = true;
    std::string pending_;
  };

 private:
  std::shared_ptr<const TokenizerImpl> impl_;
};

}  // namespace rlaif
