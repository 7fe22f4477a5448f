// `rlaif generate`: samples from a model with the rlaif engine — streams text for one prompt, writes JSONL
// (text, token ids, log-probs, finish reason) for many.
#include <chrono>
#include <cstdio>

#include <nlohmann/json.hpp>

#include "command.h"
#include "core/error.h"
#include "core/io.h"
#include "core/logging.h"
#include "engine/bundle.h"
#include "engine/engine.h"
#include "rl/data.h"

namespace rlaif::app {
namespace {

struct GenerateOpts {
  std::string model, prompt, prompts, field = "prompt", system, out, device = "auto", dtype = "auto";
  bool chat = false;
  int64_t num_samples = 1, max_batch = 64;
  SamplingParams params;
};

int run(const GenerateOpts& o) {
  const bool cuda = o.device == "cuda" || (o.device == "auto" && at::hasCUDA());
  if (o.device == "cuda" && !at::hasCUDA())
    throw Error("generate", "--device cuda but no CUDA device is available", "use --device cpu");
  const std::string dtype = o.dtype != "auto" ? o.dtype : (cuda ? "bf16" : "fp32");
  ModelBundle b = load_bundle(o.model, {parse_torch_dtype(dtype), cuda ? at::Device(at::kCUDA) : at::Device(at::kCPU)});

  std::vector<std::string> texts;
  if (o.prompts.empty()) texts.push_back(o.prompt);
  else
    for (auto& row : load_prompt_rows(o.prompts, o.field)) texts.push_back(std::move(row.prompt));
  std::vector<GenerationRequest> reqs;
  for (const auto& t : texts) reqs.push_back({b.encode_prompt(t, o.chat, o.system), o.num_samples, o.params});

  EngineOptions eo;
  eo.max_batch = std::max(o.max_batch, o.num_samples);
  eo.eos_ids = b.eos_ids;
  Engine engine(b.model, eo);
  log_info("Generating with rlaif engine ({}) from {}: {} prompt(s) x {} sample(s)", engine.backend(), o.model,
           reqs.size(), o.num_samples);

  const bool stream = reqs.size() == 1 && o.num_samples == 1 && o.out.empty();
  Tokenizer::StreamDecoder decoder(b.tokenizer, /*skip_special=*/true);
  GenerateCallbacks cb;
  if (stream)
    cb.on_token = [&](int64_t, int64_t, int32_t id) {
      const std::string piece = decoder.push(id);
      std::fwrite(piece.data(), 1, piece.size(), stdout);
      std::fflush(stdout);
    };
  if (!o.params.stop_strings.empty())
    cb.stop = [&](int64_t, int64_t, const std::vector<int32_t>& g) {
      const std::string text = b.tokenizer.decode(g, true);
      for (const auto& s : o.params.stop_strings)
        if (text.size() >= s.size() && text.compare(text.size() - s.size(), s.size(), s) == 0) return true;
      return false;
    };
  const auto t0 = std::chrono::steady_clock::now();
  auto results = engine.generate(reqs, cb);
  const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (stream) {
    const std::string rest = decoder.flush();
    std::fwrite(rest.data(), 1, rest.size(), stdout);
    std::fputc('\n', stdout);
  } else {
    std::string jsonl;
    for (const auto& s : results) {
      nlohmann::json j = {{"prompt_index", s.request}, {"sample", s.sample}, {"prompt", texts[s.request]},
                          {"text", b.tokenizer.decode(s.tokens, true)}, {"token_ids", s.tokens},
                          {"logprobs", s.logprobs}, {"finish_reason", s.finish_reason}};
      jsonl += j.dump() + "\n";
    }
    if (o.out.empty()) std::fwrite(jsonl.data(), 1, jsonl.size(), stdout);
    else write_file_atomic(o.out, jsonl);
  }
  int64_t n = 0;
  for (const auto& s : results) n += s.tokens.size();
  const auto& st = engine.stats();
  log_info("{} tokens in {:.2f} s: {:.1f} tokens/s overall, decode {:.1f} tokens/s ({} steps), prefill {} tokens in {:.2f} s",
           n, dt, n / dt, st.decode_seconds > 0 ? st.decode_tokens / st.decode_seconds : 0.0, st.decode_steps,
           st.prefill_tokens, st.prefill_seconds);
  if (!o.out.empty()) log_info("wrote {} samples to {}", results.size(), o.out);
  return 0;
}

const RegisterCommand kRegister{Command{
    "generate", "Sample completions from a model with the rlaif engine",
    [](CLI::App& sub) -> std::function<int()> {
      auto o = std::make_shared<GenerateOpts>();
      o->params.temperature = 0.7;
      o->params.max_new_tokens = 256;
      sub.add_option("--model", o->model, "Hugging Face model folder or .gguf file")->required();
      auto* p = sub.add_option("--prompt", o->prompt, "one prompt (streams the answer)");
      auto* ps = sub.add_option("--prompts", o->prompts, "JSONL file of prompts (writes JSONL)");
      p->excludes(ps);
      sub.add_option("--field", o->field, "field of --prompts holding the prompt")->capture_default_str();
      sub.add_flag("--chat", o->chat, "wrap each prompt in the model's chat template as a user message");
      sub.add_option("--system", o->system, "system message (with --chat)");
      sub.add_option("--num-samples,-n", o->num_samples, "samples per prompt")->capture_default_str()->check(CLI::PositiveNumber);
      sub.add_option("--temperature", o->params.temperature, "0 = greedy")->capture_default_str()->check(CLI::NonNegativeNumber);
      sub.add_option("--top-p", o->params.top_p)->capture_default_str()->check(CLI::Range(0.0, 1.0));
      sub.add_option("--top-k", o->params.top_k, "0 = off")->capture_default_str()->check(CLI::NonNegativeNumber);
      sub.add_option("--min-p", o->params.min_p)->capture_default_str()->check(CLI::Range(0.0, 1.0));
      sub.add_option("--repetition-penalty", o->params.repetition_penalty)->capture_default_str();
      sub.add_option("--presence-penalty", o->params.presence_penalty)->capture_default_str();
      sub.add_option("--max-new-tokens", o->params.max_new_tokens)->capture_default_str()->check(CLI::PositiveNumber);
      sub.add_option("--seed", o->params.seed)->capture_default_str();
      sub.add_option("--stop", o->params.stop_strings, "stop string (repeatable)");
      sub.add_option("--max-batch", o->max_batch, "sequences decoded together")->capture_default_str();
      sub.add_option("--device", o->device, "auto, cpu or cuda")->capture_default_str()->check(CLI::IsMember({"auto", "cpu", "cuda"}));
      sub.add_option("--dtype", o->dtype, "auto, fp32, bf16 or fp16")->capture_default_str();
      sub.add_option("--out", o->out, "write JSONL here instead of stdout");
      return [o, p, ps]() {
        if (p->count() == 0 && ps->count() == 0) throw Error("generate", "give --prompt TEXT or --prompts FILE.jsonl");
        return run(*o);
      };
    }}};

}  // namespace
}  // namespace rlaif::app
