// Evaluation: greedy completions for held-out prompts, scored by the same scorer and chat template as training,
// summarised as mean reward and accuracy. Used before training (baseline), every training.eval_steps, and by
// `rlaif eval` to compare checkpoints (the original's validate_model.py).
#pragma once

#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/bundle.h"
#include "engine/engine.h"
#include "rl/config.h"
#include "rl/data.h"
#include "teacher/scorer.h"

namespace rlaif {

struct EvalRow {
  int64_t row = 0;  // index into the evaluated rows
  std::string completion;
  std::optional<double> reward;  // empty: the scorer could not score it (counted, never a default)
  bool verified = false, correct = false;
  std::string failure;
};

struct EvalResult {
  double reward_mean = 0;   // over scored rows
  double accuracy = -1;     // share of verified rows (exact answer / tests) that passed; -1 when none was verifiable
  int64_t rows = 0, scored = 0, generated_tokens = 0;
  double seconds = 0;
  std::vector<EvalRow> per_row;
  // {"eval/reward_mean", "eval/accuracy", "eval/rows", "eval/scored", "eval/time_s"} (docs/METRICS.md).
  nlohmann::json summary_json() const;
};

// One prompt as training and evaluation render it: chat template, system prompt, and max_new_tokens cut to what
// model.max_seq_len leaves (a prompt that leaves no room is an Error naming `file` and the 1-based `row`).
GenerationRequest prompt_request(const ModelBundle& bundle, const RunConfig& cfg, const std::string& text,
                                 const std::string& file, int64_t row);

// Greedy decoding (temperature 0, one completion per prompt): deterministic, so two checkpoints are compared on the
// same footing and repeated evaluations of one checkpoint agree. Prompts are rendered exactly as in training
// (model.chat_template, model.system_prompt) and cut to rlaif.max_new_tokens within model.max_seq_len.
// `id_prefix` keeps score-cache keys of different evaluations apart.
EvalResult evaluate(const ModelBundle& bundle, Engine& engine, teacher::Scorer& scorer, const std::vector<PromptRow>& rows,
                    const RunConfig& cfg, const std::string& id_prefix);

// Loads the model of `cfg` (plus the checkpoint's PEFT adapter or full weights when `checkpoint` is not empty) and
// evaluates it on data.eval_file (data.max_eval_samples rows) with the config's scorer.
EvalResult evaluate_checkpoint(const RunConfig& cfg, const std::filesystem::path& checkpoint);

// hardware.device → a device: auto (CUDA when present), cpu, cuda, cuda:N.
at::Device resolve_device(const std::string& name);

// One JSONL line for records that carry model text: a completion cut at max_new_tokens may end inside a UTF-8
// character, so invalid bytes are written as U+FFFD instead of failing the run.
std::string jsonl_line(const nlohmann::json& j);

// The comparison table `rlaif eval` prints: one line per evaluated model.
std::string eval_table(const std::vector<std::pair<std::string, EvalResult>>& results);

}  // namespace rlaif
