// evaluate(): one engine call for all rows (greedy), one scorer call, then the summary. Accuracy counts only the
// verifiable tiers (exact_answer, tests), as the training metrics do.
#include "rl/eval.h"

#include <ATen/core/grad_mode.h>

#include <chrono>

#include "core/error.h"
#include "models/lora.h"
#include "models/weights.h"

namespace rlaif {

namespace fs = std::filesystem;

at::Device resolve_device(const std::string& name) {
  if (name == "cpu") return at::kCPU;
  if (name == "auto") return at::hasCUDA() ? at::Device(at::kCUDA) : at::Device(at::kCPU);
  if (name.rfind("cuda", 0) == 0) {
    if (!at::hasCUDA()) throw Error("config", fmt::format("hardware.device is '{}' but no CUDA device is available", name),
                                    "use hardware.device: cpu");
    return at::Device(name);
  }
  throw Error("config", fmt::format("hardware.device '{}' is not one of auto, cpu, cuda, cuda:N", name));
}

EvalResult evaluate_checkpoint(const RunConfig& cfg, const fs::path& checkpoint) {
  if (cfg.data.eval_file.empty())
    throw Error("eval", fmt::format("{}: data.eval_file is not set", cfg.path.string()),
                "add data.eval_file (JSONL prompts with answer or tests) to the config");
  const auto rows = load_prompt_rows(cfg.data.eval_file, cfg.data.prompt_field, cfg.data.max_eval_samples);
  const at::Device dev = resolve_device(cfg.hardware.device);
  ModelBundle bundle = load_bundle(cfg.model.name_or_path, {parse_torch_dtype(dev.is_cpu() ? "float32" : cfg.model.dtype), dev});
  if (!checkpoint.empty()) {
    if (fs::exists(checkpoint / "adapter_config.json")) {
      load_peft_adapter(*bundle.model, checkpoint);
    } else if (fs::exists(checkpoint / "model.safetensors")) {
      auto saved = load_safetensors(checkpoint / "model.safetensors");
      at::NoGradGuard ng;
      for (auto& [n, t] : bundle.model->named_weights()) {
        auto it = saved.find(n);
        if (it == saved.end())
          throw Error("eval", fmt::format("{}: lacks '{}'", (checkpoint / "model.safetensors").string(), n));
        t.copy_(it->second);
      }
    } else {
      throw Error("eval", fmt::format("{} is not a checkpoint (no adapter_config.json or model.safetensors)",
                                      checkpoint.string()));
    }
  }
  EngineOptions eo;
  eo.eos_ids = bundle.eos_ids;
  Engine engine(bundle.model, eo);
  teacher::Scorer scorer(cfg.teacher);
  return evaluate(bundle, engine, scorer, rows, cfg, checkpoint.empty() ? "eval-base" : "eval-" + checkpoint.string());
}

nlohmann::json EvalResult::summary_json() const {
  return {{"eval/reward_mean", reward_mean}, {"eval/accuracy", accuracy}, {"eval/rows", rows},
          {"eval/scored", scored}, {"eval/generated_tokens", generated_tokens}, {"eval/time_s", seconds}};
}

GenerationRequest prompt_request(const ModelBundle& bundle, const RunConfig& cfg, const std::string& text,
                                 const std::string& file, int64_t row) {
  GenerationRequest q;
  q.prompt = bundle.encode_prompt(text, cfg.model.chat_template, cfg.model.system_prompt);
  const int64_t room = cfg.model.max_seq_len - static_cast<int64_t>(q.prompt.size());
  if (room < 1)
    throw Error("data", fmt::format("{}: prompt {} is {} tokens, model.max_seq_len is {}", file, row + 1, q.prompt.size(),
                                    cfg.model.max_seq_len),
                "raise model.max_seq_len or shorten the prompt");
  q.params.max_new_tokens = std::min<int64_t>(cfg.rlaif.max_new_tokens, room);
  return q;
}

EvalResult evaluate(const ModelBundle& bundle, Engine& engine, teacher::Scorer& scorer, const std::vector<PromptRow>& rows,
                    const RunConfig& cfg, const std::string& id_prefix) {
  const auto t0 = std::chrono::steady_clock::now();
  at::NoGradGuard ng;
  const bool was_training = bundle.model->adapter_mode().training;
  bundle.model->set_training(false);
  std::vector<GenerationRequest> reqs;
  for (size_t i = 0; i < rows.size(); ++i) {
    GenerationRequest q = prompt_request(bundle, cfg, rows[i].prompt, cfg.data.eval_file, static_cast<int64_t>(i));
    q.params.temperature = 0;
    reqs.push_back(std::move(q));
  }
  EvalResult res;
  res.rows = static_cast<int64_t>(rows.size());
  res.per_row.resize(rows.size());
  auto gens = engine.generate(reqs);
  std::vector<teacher::ScoreRequest> sreqs(rows.size());
  for (auto& g : gens) {
    const auto i = static_cast<size_t>(g.request);
    res.per_row[i].row = g.request;
    res.per_row[i].completion = bundle.tokenizer.decode(g.tokens, /*skip_special=*/true);
    res.generated_tokens += static_cast<int64_t>(g.tokens.size());
    sreqs[i] = {fmt::format("{}:{}", id_prefix, i), rows[i].prompt, res.per_row[i].completion, rows[i].language,
                rows[i].answer, rows[i].tests};
  }
  const auto scores = scorer.score(sreqs);
  int64_t verified = 0, passed = 0;
  double sum = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    RLAIF_CHECK(scores[i].id == sreqs[i].id, "eval score {} paired with {}", scores[i].id, sreqs[i].id);
    EvalRow& e = res.per_row[i];
    e.reward = scores[i].reward;
    e.failure = scores[i].failure;
    for (const auto& t : scores[i].tiers)
      if (t.name == "exact_answer" || t.name == "tests") {
        e.verified = true;
        e.correct = t.passed;
      }
    verified += e.verified;
    passed += e.verified && e.correct;
    if (e.reward) {
      ++res.scored;
      sum += *e.reward;
    }
  }
  res.reward_mean = res.scored ? sum / res.scored : 0;
  res.accuracy = verified ? static_cast<double>(passed) / verified : -1;
  bundle.model->set_training(was_training);
  res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return res;
}

std::string jsonl_line(const nlohmann::json& j) {
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
}

std::string eval_table(const std::vector<std::pair<std::string, EvalResult>>& results) {
  size_t w = 5;
  for (const auto& [name, r] : results) w = std::max(w, name.size());
  std::string out = fmt::format("{:<{}}  {:>6}  {:>6}  {:>11}  {:>8}  {:>7}\n", "model", w, "rows", "scored",
                                "reward_mean", "accuracy", "time_s");
  for (const auto& [name, r] : results)
    out += fmt::format("{:<{}}  {:>6}  {:>6}  {:>11.4f}  {:>8}  {:>7.1f}\n", name, w, r.rows, r.scored, r.reward_mean,
                       r.accuracy >= 0 ? fmt::format("{:.1f}%", 100 * r.accuracy) : "n/a", r.seconds);
  return out;
}

}  // namespace rlaif
