// The run configuration: one YAML file (sections model, teacher, training, rlaif, data, logging, hardware) parsed
// once into plain structs. Every key is used or rejected: unknown keys and wrong types are errors naming the key
// path and line; keys that do not apply here (hardware.use_mps) are warnings naming them.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include "teacher/teacher_config.h"

namespace rlaif {

struct ModelConfig {
  std::string name_or_path;
  std::string dtype = "bfloat16";  // float32, bfloat16, float16
  int max_seq_len = 2048;
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
  std::string lr_scheduler = "cosine";
  int seed = 42;
  int save_steps = 100;
  int eval_steps = 100;
};

struct RlaifConfig {
  int num_samples_per_prompt = 4;
  double reward_threshold = 0.0;
  int top_samples_per_prompt = 0;  // 0: all
  double kl_coef = 0.05;
  double temperature = 0.8;
  double top_p = 1.0;
  int max_new_tokens = 512;
};

struct DataConfig {
  std::string train_file;
  std::string eval_file;
};

struct LoggingConfig {
  std::string output_dir = "runs/latest";
  std::string log_level = "info";
};

struct HardwareConfig {
  std::string device = "auto";  // auto, cpu, cuda, cuda:N
};

struct RunConfig {
  std::filesystem::path path;
  ModelConfig model;
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
