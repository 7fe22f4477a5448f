// `rlaif tokenize`: encodes text (or every line of a JSONL file) with a model's tokenizer, or decodes ids —
// for checking what the model sees. Tokenizer from a Hugging Face directory or a GGUF file.
#include <cstdio>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "command.h"
#include "core/error.h"
#include "core/gguf.h"
#include "text/tokenizer.h"

namespace rlaif::app {
namespace {

Tokenizer load_tokenizer(const std::string& path) {
  if (std::filesystem::is_directory(path)) return Tokenizer::from_dir(path);
  if (!std::filesystem::exists(path)) throw Error("tokenize", fmt::format("{} does not exist", path));
  return Tokenizer::from_gguf(*GgufFile::open(path));
}

nlohmann::json encode_json(const Tokenizer& tok, const std::string& text, bool special, bool pieces) {
  const auto ids = tok.encode(text, special);
  nlohmann::json j = {{"ids", ids}};
  if (pieces) {
    auto& p = j["pieces"] = nlohmann::json::array();
    for (int32_t id : ids) p.push_back(tok.id_to_token(id));
  }
  return j;
}

void print_line(const std::string& s) {
  std::fwrite(s.data(), 1, s.size(), stdout);
  std::fputc('\n', stdout);
}

const RegisterCommand kRegister{Command{
    "tokenize", "Encode text to token ids (or decode ids) with a model's tokenizer",
    [](CLI::App& sub) -> std::function<int()> {
      struct Opts {
        std::string tokenizer, text, file, field = "prompt", decode;
        bool pieces = false, no_special = false, jsonl = false;
      };
      auto o = std::make_shared<Opts>();
      sub.add_option("--tokenizer", o->tokenizer, "tokenizer directory (tokenizer.json or vocab.json+merges.txt) or .gguf")
          ->required();
      auto* text = sub.add_option("--text", o->text, "text to encode");
      auto* file = sub.add_option("--file", o->file, "JSONL file: encode one field of every line, print JSONL");
      sub.add_option("--field", o->field, "field of --file to encode")->capture_default_str();
      auto* dec = sub.add_option("--decode", o->decode, "space-separated ids to decode, e.g. \"9707 11 1879\"");
      text->excludes(file)->excludes(dec);
      file->excludes(dec);
      sub.add_flag("--pieces", o->pieces, "also print each id's token piece");
      sub.add_flag("--no-special", o->no_special, "treat special tokens' text as plain text");
      sub.add_flag("--jsonl", o->jsonl, "print --text's result as a JSON line");
      return [o, text]() {
        const Tokenizer tok = load_tokenizer(o->tokenizer);
        const bool special = !o->no_special;
        if (!o->decode.empty()) {
          std::istringstream in(o->decode);
          std::vector<int32_t> ids;
          std::string w;
          while (in >> w) {
            try {
              ids.push_back(std::stoi(w));
            } catch (const std::exception&) {
              throw Error("tokenize", fmt::format("--decode: '{}' is not an integer id", w));
            }
          }
          print_line(tok.decode(ids, o->no_special));
          return 0;
        }
        if (!o->file.empty()) {
          std::ifstream in(o->file, std::ios::binary);
          if (!in) throw Error("tokenize", fmt::format("cannot open {}", o->file));
          size_t lineno = 0;
          for (std::string line; std::getline(in, line);) {
            ++lineno;
            if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
            nlohmann::json row;
            try {
              row = nlohmann::json::parse(line);
            } catch (const nlohmann::json::exception& e) {
              throw Error("tokenize", fmt::format("{}:{}: invalid JSON: {}", o->file, lineno, e.what()));
            }
            if (!row.contains(o->field) || !row[o->field].is_string())
              throw Error("tokenize", fmt::format("{}:{}: no string field '{}'", o->file, lineno, o->field), "use --field");
            print_line(encode_json(tok, row[o->field].get<std::string>(), special, o->pieces).dump());
          }
          return 0;
        }
        if (text->count() == 0) throw Error("tokenize", "nothing to do", "pass --text, --file or --decode");
        const nlohmann::json j = encode_json(tok, o->text, special, o->pieces);
        if (o->jsonl) {
          print_line(j.dump());
          return 0;
        }
        std::string ids;
        for (int32_t id : j["ids"]) ids += (ids.empty() ? "" : " ") + std::to_string(id);
        print_line(ids);
        if (o->pieces) print_line(j["pieces"].dump());
        return 0;
      };
    }}};

}  // namespace
}  // namespace rlaif::app
