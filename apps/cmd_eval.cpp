// `rlaif eval --config X.yaml [--checkpoint A] [--checkpoint B]...`: scores the base model and/or checkpoints on the
// config's eval set with its scorer (greedy, as during training) and prints one comparison table.
#include <cstdio>

#include "command.h"
#include "core/io.h"
#include "core/logging.h"
#include "rl/config.h"
#include "rl/eval.h"

namespace rlaif::app {
namespace {

const RegisterCommand kRegister{Command{
    "eval", "Compare the base model and checkpoints on data.eval_file with the config's scorer (greedy decoding)",
    [](CLI::App& sub) -> std::function<int()> {
      auto path = std::make_shared<std::string>();
      auto checkpoints = std::make_shared<std::vector<std::string>>();
      auto base = std::make_shared<bool>(false);
      auto out = std::make_shared<std::string>();
      sub.add_option("--config", *path, "YAML run config (model, teacher, data.eval_file)")->required();
      sub.add_option("--checkpoint", *checkpoints, "checkpoint directory (repeatable); none: the base model");
      sub.add_flag("--base", *base, "also evaluate the base model when checkpoints are given");
      sub.add_option("--out", *out, "write the per-row results of every model as JSONL");
      return [path, checkpoints, base, out]() {
        RunConfig cfg = load_run_config(*path);
        set_log_level(parse_log_level(cfg.logging.log_level));
        std::vector<std::string> which;
        if (checkpoints->empty() || *base) which.push_back("");
        which.insert(which.end(), checkpoints->begin(), checkpoints->end());
        std::vector<std::pair<std::string, EvalResult>> results;
        std::string rows_jsonl;
        for (const auto& ck : which) {
          const std::string name = ck.empty() ? "base (" + cfg.model.name_or_path + ")" : ck;
          log_info("[eval] {}", name);
          EvalResult r = evaluate_checkpoint(cfg, ck);
          for (const auto& e : r.per_row)
            rows_jsonl += jsonl_line(nlohmann::json{{"model", name}, {"row", e.row}, {"completion", e.completion},
                                         {"reward", e.reward ? nlohmann::json(*e.reward) : nlohmann::json(nullptr)},
                                         {"correct", e.verified ? nlohmann::json(e.correct) : nlohmann::json(nullptr)}});
          results.push_back({name, std::move(r)});
        }
        const std::string table = eval_table(results);
        std::fwrite(table.data(), 1, table.size(), stdout);
        if (!out->empty()) write_file_atomic(*out, rows_jsonl);
        return 0;
      };
    }}};

}  // namespace
}  // namespace rlaif::app
