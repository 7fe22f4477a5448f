// `rlaif train --config X.yaml`: runs the RLAIF loop and ends with a reward curve and the paths of what it wrote.
#include <cstdio>

#include "command.h"
#include "core/logging.h"
#include "rl/config.h"
#include "rl/loop.h"

namespace rlaif::app {
namespace {

const RegisterCommand kRegister{Command{
    "train", "Fine-tune a model by RL from AI feedback (config sections: model, teacher, training, rlaif, data, logging, hardware)",
    [](CLI::App& sub) -> std::function<int()> {
      auto path = std::make_shared<std::string>();
      auto resume = std::make_shared<std::string>();
      sub.add_option("--config", *path, "YAML run config")->required();
      sub.add_option("--resume", *resume, "continue from a checkpoint directory, or 'latest' in logging.output_dir");
      return [path, resume]() {
        RunConfig cfg = load_run_config(*path);
        set_log_level(parse_log_level(cfg.logging.log_level));
        TrainResult res = run_training(cfg, {}, *resume);
        const std::string curve = reward_curve(res.steps);
        std::fwrite(curve.data(), 1, curve.size(), stdout);
        std::printf("metrics:    %s\ncheckpoint: %s\n", res.metrics_path.c_str(), res.final_checkpoint.c_str());
        return 0;
      };
    }}};

}  // namespace
}  // namespace rlaif::app
