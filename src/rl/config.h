// The run configuration: one YAML file (sections model, teacher, training, rlaif, data, logging, hardware) parsed
// once into plain structs. Every key is used or rejected: unknown keys and wrong types are errors naming the key
// path and line; keys that do not apply here (hardware.use_mps) are warnings naming them.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include "teacher/teacher_config.h"

namespace rlaif {

// The `model:` section (named ModelSection: models/model_config.h's ModelConfig is the architecture).
struct ModelSection {
  std::string name_or_path;
  std::string dtype = "bfloat16";  // float32, bfloat16, float16
  int max_seq_len = 2048;
  bool use_lora = true;            // false: full fine-tuning
  int lora_r = 16;
  double lora_alpha = 32;
  double lora_dropout = 0.05;
  std::vector<std::string> lora_target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  bool chat_template = true;       // wrap prompts in the model's chat template (training, eval and scoring alike)
  std::string system_prompt;       // optional system message for the chat template
};

struct TrainingConfig {
  double learning_rate = 1e-5;
  int batch_size = 8;  // prompts per step
  int num_epochs = 1;
  int max_steps = -1;  // -1: num_epochs decides
  int gradient_accumulation_steps = 1;
  double max_grad_norm = 1.0;
  double weight_decay = 0.0;
  int warmup_steps = 0;
  std::string lr_scheduler = "cosine";  // constant, linear, cosine (HF transformers' shapes, with warmup)
  double min_lr_ratio = 0.0;            // floor of the linear/cosine decay as a fraction of learning_rate
  double adam_beta1 = 0.9;
  double adam_beta2 = 0.999;
  double adam_epsilon = 1e-8;
  int seed = 42;
  int save_steps = 100;       // a checkpoint every N optimizer steps (0: only the final one)
  int save_total_limit = 0;   // keep at most N step checkpoints, oldest deleted first (0: keep all)
  int eval_steps = 100;             // evaluate on data.eval_file every N steps (0: off; needs data.eval_file)
  int save_every_epochs = 0;       // a checkpoint at the end of every N epochs (0: off)
  int save_every_batches = 0;      // a checkpoint every N batches within an epoch (0: off)
  bool save_merged = false;        // LoRA: also write a merged HF model folder into each checkpoint
  int baseline_eval_batches = 0;   // before training, evaluate this many batches of batch_size eval prompts (0: off)
  bool bf16 = false;               // autocast the training forward/backward to bfloat16 (fp32 master weights)
  bool gradient_checkpointing = false;  // recompute each decoder layer in backward instead of keeping activations
};

struct RlaifConfig {
  int num_samples_per_prompt = 4;
  double reward_threshold = 0.0;
  int top_samples_per_prompt = 0;  // 0: all
  double kl_coef = 0.05;  // initial beta of the KL penalty (fixed unless target_kl > 0)
  double temperature = 0.8;
  double top_p = 1.0;
  int max_new_tokens = 512;
  // Score each prompt's samples on a worker thread as soon as they have all finished decoding, while the engine
  // decodes the rest (false: score the whole batch after generation). Same rewards either way.
  bool overlap_scoring = true;
  // Advantages (train/advantages.h).
  std::string advantage_scheme = "group";     // group, mad_tanh (the original's tanh((r - median) / 1.4826 MAD))
  std::string advantage_baseline = "mean";    // mean, leave_one_out, none (group scheme)
  bool normalize_advantage_std = true;        // group scheme: divide by the group's std
  double advantage_eps = 1e-4;
  bool drop_zero_variance_groups = true;
  // Policy loss (train/losses.h).
  std::string policy_loss = "ppo_clip";       // ppo_clip, reinforce
  std::string loss_normalization = "token";   // token (dapo), sequence (grpo), constant (dr_grpo)
  double clip_low = 0.2;
  double clip_high = 0.2;                     // DAPO's clip-higher uses 0.28
  double max_len_norm = 0;                    // constant normalisation's length; 0: max_new_tokens
  std::string kl_estimator = "k3";            // k1, k3
  bool kl_in_reward = false;                  // fold the KL into the rewards instead of the loss
  // Adaptive KL controller (train/kl_controller.h): adaptive when target_kl > 0.
  double target_kl = 0.0;
  double kl_horizon = 10000;
  double kl_gain = 1.0;
  double kl_coef_min = 0.0;
  double kl_coef_max = 10.0;
  // Truncated importance-sampling cap when the sampler differs from the trainer (a quantized generator); 0: off.
  double is_truncation = 2.0;
};

struct DataConfig {
  std::string train_file;
  std::string eval_file;
  std::string prompt_field = "prompt";  // JSONL rows: prompt, language, optional answer / tests
  bool shuffle = true;                  // seeded by training.seed, reshuffled each epoch
  int max_train_samples = 0;            // 0: all
  int max_eval_samples = 0;             // 0: all
};

struct LoggingConfig {
  std::string output_dir = "runs/latest";
  std::string log_level = "info";
  bool save_samples = true;  // samples.jsonl: every completion with its reward, per step (docs/METRICS.md)
};

struct HardwareConfig {
  std::string device = "auto";  // auto, cpu, cuda, cuda:N
};

struct RunConfig {
  std::filesystem::path path;
  ModelSection model;
  teacher::TeacherConfig teacher;
  TrainingConfig training;
  RlaifConfig rlaif;
  DataConfig data;
  LoggingConfig logging;
  HardwareConfig hardware;
  std::vector<std::string> warnings;  // keys that do not apply here; also logged
};

// Throws rlaif::Error("config", "<file>: ...") naming the key path and line.
RunConfig load_run_config(const std::filesystem::path& path);
// The same from text; `name` stands for the file in messages.
RunConfig parse_run_config(const std::string& yaml_text, const std::string& name);

}  // namespace rlaif
