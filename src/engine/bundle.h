// A model as users name it (an HF folder or a .gguf file) with everything generation needs beside the weights:
// tokenizer, chat template, and every end-of-sequence id (generation_config.json, config.json, tokenizer).
#pragma once

#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "models/decoder.h"
#include "text/chat_template.h"
#include "text/tokenizer.h"

namespace rlaif {

struct ModelBundle {
  std::shared_ptr<DecoderModel> model;
  Tokenizer tokenizer;
  std::optional<ChatTemplate> chat_template;
  std::vector<int64_t> eos_ids;
  std::filesystem::path source;

  // Prompt token ids: the chat template applied to one user message (and an optional system message) when
  // `chat`, else the raw text; BOS prepended when the tokenizer asks for it and the text lacks it.
  std::vector<int32_t> encode_prompt(const std::string& text, bool chat, const std::string& system = "") const;
};

ModelBundle load_bundle(const std::filesystem::path& path, const LoadOptions& opt = {});

}  // namespace rlaif
