// YAML run-config parser: a table of known keys per section, walked recursively, so an unknown key can be named
// with its full path and line and a did-you-mean hint (edit distance to the keys of its section).
#include "rl/config.h"

#include <algorithm>
#include <functional>
#include <map>

#include <fmt/format.h>
#include <yaml-cpp/yaml.h>

#include "core/error.h"
#include "core/io.h"
#include "core/logging.h"

namespace rlaif {

namespace {

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j)
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

int line_of(const YAML::Node& n) { return n.Mark().line + 1; }

// Known keys of one mapping: each sets a struct field or descends into a sub-mapping.
class Section {
 public:
  using Setter = std::function<void(const YAML::Node&, const std::string& path)>;
  Section(std::string file, std::vector<std::string>* warnings) : file_(std::move(file)), warnings_(warnings) {}

  template <typename T>
  Section& field(const std::string& key, T* dst) {
    setters_[key] = [this, dst](const YAML::Node& n, const std::string& path) { *dst = scalar<T>(n, path); };
    return *this;
  }
  Section& list(const std::string& key, std::vector<std::string>* dst) {
    setters_[key] = [this, dst](const YAML::Node& n, const std::string& path) {
      if (!n.IsSequence())
        throw Error("config", fmt::format("{}: '{}' must be a list of strings (line {})", file_, path, line_of(n)));
      dst->clear();
      for (const auto& e : n) dst->push_back(scalar<std::string>(e, path));
    };
    return *this;
  }
  Section& custom(const std::string& key, Setter s) {
    setters_[key] = std::move(s);
    return *this;
  }
  Section& sub(const std::string& key, std::function<void(Section&)> fill) {
    setters_[key] = [this, fill](const YAML::Node& n, const std::string& path) {
      Section s(file_, warnings_);
      fill(s);
      s.walk(n, path);
    };
    return *this;
  }
  // A key accepted with a warning because it does not apply to rlaif.
  Section& not_applicable(const std::string& key, const std::string& why) {
    ignored_[key] = why;
    return *this;
  }

  void walk(const YAML::Node& node, const std::string& prefix) {
    if (!node || node.IsNull()) return;
    if (!node.IsMap())
      throw Error("config", fmt::format("{}: '{}' must be a mapping (line {})", file_, prefix, line_of(node)));
    for (const auto& kv : node) {
      const std::string key = kv.first.as<std::string>();
      const std::string path = prefix.empty() ? key : prefix + "." + key;
      if (auto it = setters_.find(key); it != setters_.end()) {
        it->second(kv.second, path);
      } else if (auto ig = ignored_.find(key); ig != ignored_.end()) {
        const std::string w = fmt::format("{}: key '{}' (line {}) does not apply and is ignored: {}", file_, path,
                                          line_of(kv.first), ig->second);
        log_warn("[config] {}", w);
        warnings_->push_back(w);
      } else {
        throw Error("config", fmt::format("{}: unknown key '{}' (line {})", file_, path, line_of(kv.first)), hint(key));
      }
    }
  }

  template <typename T>
  T scalar(const YAML::Node& n, const std::string& path) {
    if (!n.IsScalar())
      throw Error("config", fmt::format("{}: key '{}' (line {}) must be a {}", file_, path, line_of(n), type_name<T>()));
    try {
      return n.as<T>();
    } catch (const YAML::Exception&) {
      throw Error("config", fmt::format("{}: key '{}' (line {}) must be a {}, got '{}'", file_, path, line_of(n),
                                        type_name<T>(), n.Scalar()));
    }
  }

  const std::string& file() const { return file_; }

 private:
  template <typename T>
  static const char* type_name() {
    if constexpr (std::is_same_v<T, bool>) return "boolean";
    else if constexpr (std::is_integral_v<T>) return "integer";
    else if constexpr (std::is_floating_point_v<T>) return "number";
    else return "string";
  }
  std::string hint(const std::string& key) const {
    std::string best;
    size_t best_d = 4;  // suggest only close names
    for (const auto& [k, s] : setters_) {
      const size_t d = edit_distance(key, k);
      if (d < best_d) best_d = d, best = k;
    }
    std::string keys;
    for (const auto& [k, s] : setters_) keys += (keys.empty() ? "" : ", ") + k;
    return best.empty() ? "known keys here: " + keys : fmt::format("did you mean '{}'?", best);
  }

  std::string file_;
  std::vector<std::string>* warnings_;
  std::map<std::string, Setter> setters_;
  std::map<std::string, std::string> ignored_;
};

void teacher_section(Section& s, teacher::TeacherConfig& t) {
  s.field("provider", &t.provider)
      .field("model_name", &t.model_name)
      .field("api_key_env", &t.api_key_env)
      .field("base_url", &t.base_url)
      .field("max_concurrency", &t.max_concurrency)
      .field("requests_per_minute", &t.requests_per_minute)
      .field("tokens_per_minute", &t.tokens_per_minute)
      .field("timeout_s", &t.timeout_s)
      .field("max_retries", &t.max_retries)
      .field("backoff_base_s", &t.backoff_base_s)
      .field("backoff_max_s", &t.backoff_max_s)
      .field("temperature", &t.temperature)
      .field("max_tokens", &t.max_tokens)
      .field("cache_path", &t.cache_path)
      .field("teacher_score_cache_max_age_seconds", &t.teacher_score_cache_max_age_seconds)
      .field("relative_eps", &t.relative_eps)
      .custom("scoring_mode",
              [&s, &t](const YAML::Node& n, const std::string& path) {
                const auto v = s.scalar<std::string>(n, path);
                try {
                  t.mode = teacher::parse_scoring_mode(v);
                } catch (const Error&) {
                  throw Error("config", fmt::format("{}: key '{}' (line {}): unknown scoring mode '{}'", s.file(),
                                                    path, line_of(n), v),
                              "use relative, absolute or batched_ranked");
                }
              })
      .sub("rubric", [&t](Section& r) {
        r.field("correctness", &t.rubric.correctness)
            .field("code_quality", &t.rubric.code_quality)
            .field("efficiency", &t.rubric.efficiency)
            .field("documentation", &t.rubric.documentation)
            .field("version", &t.rubric.version)
            .field("adapt_to_prompt", &t.rubric.adapt_to_prompt)
            .sub("language_multipliers", [&t](Section& m) {
              m.field("cpp", &t.rubric.cpp_multiplier)
                  .field("rust", &t.rubric.rust_multiplier)
                  .field("python", &t.rubric.python_multiplier);
            });
      })
      .sub("verifiers", [&t](Section& v) {
        auto& c = t.verifiers;
        v.field("heuristic", &c.heuristic)
            .field("syntax", &c.syntax)
            .field("tests", &c.tests)
            .field("exact_answer", &c.exact_answer)
            .field("teacher", &c.teacher)
            .field("skip_teacher_on_failure", &c.skip_teacher_on_failure)
            .field("heuristic_fail_score", &c.heuristic_fail_score)
            .sub("weights", [&c](Section& w) {
              w.field("syntax", &c.weight_syntax)
                  .field("tests", &c.weight_tests)
                  .field("exact_answer", &c.weight_exact_answer)
                  .field("teacher", &c.weight_teacher);
            })
            .sub("sandbox", [&c](Section& b) {
              auto& x = c.sandbox;
              b.field("cpu_seconds", &x.cpu_seconds)
                  .field("wall_seconds", &x.wall_seconds)
                  .field("memory_mb", &x.memory_mb)
                  .field("max_processes", &x.max_processes)
                  .field("max_file_mb", &x.max_file_mb)
                  .field("max_output_kb", &x.max_output_kb)
                  .field("isolate_network", &x.isolate_network)
                  .field("max_parallel", &x.max_parallel)
                  .field("scratch_dir", &x.scratch_dir);
            });
      });
}

// `value` must be one of `allowed`; otherwise the key is named with the choices.
template <typename Bad>
void one_of(const Bad& bad, const std::string& key, const std::string& value, std::initializer_list<const char*> allowed) {
  std::string list;
  for (const char* a : allowed) {
    if (value == a) return;
    list += (list.empty() ? "" : ", ") + std::string(a);
  }
  bad(key, fmt::format("is '{}'; use {}", value, list));
}

// The training and rlaif sections' values (names and ranges the trainer's math accepts).
template <typename Bad>
void training_rlaif_validate(const RunConfig& c, const Bad& bad) {
  const auto& t = c.training;
  const auto& r = c.rlaif;
  one_of(bad, "training.lr_scheduler", t.lr_scheduler, {"constant", "linear", "cosine"});
  if (t.gradient_accumulation_steps < 1) bad("training.gradient_accumulation_steps", "must be at least 1");
  if (t.max_grad_norm < 0) bad("training.max_grad_norm", "must be >= 0 (0: no clipping)");
  if (t.weight_decay < 0) bad("training.weight_decay", "must be >= 0");
  if (t.warmup_steps < 0) bad("training.warmup_steps", "must be >= 0");
  if (t.save_every_epochs < 0) bad("training.save_every_epochs", "must be >= 0 (0: off)");
  if (t.save_every_batches < 0) bad("training.save_every_batches", "must be >= 0 (0: off)");
  if (t.baseline_eval_batches < 0) bad("training.baseline_eval_batches", "must be >= 0 (0: off)");
  if (t.eval_steps < 0) bad("training.eval_steps", "must be >= 0 (0: off)");
  if (t.min_lr_ratio < 0 || t.min_lr_ratio > 1) bad("training.min_lr_ratio", "must be in [0, 1]");
  if (t.adam_beta1 < 0 || t.adam_beta1 >= 1) bad("training.adam_beta1", "must be in [0, 1)");
  if (t.adam_beta2 < 0 || t.adam_beta2 >= 1) bad("training.adam_beta2", "must be in [0, 1)");
  if (t.adam_epsilon <= 0) bad("training.adam_epsilon", "must be > 0");
  one_of(bad, "rlaif.advantage_scheme", r.advantage_scheme, {"group", "mad_tanh"});
  one_of(bad, "rlaif.advantage_baseline", r.advantage_baseline, {"mean", "leave_one_out", "none"});
  one_of(bad, "rlaif.policy_loss", r.policy_loss, {"ppo_clip", "reinforce"});
  one_of(bad, "rlaif.loss_normalization", r.loss_normalization, {"token", "sequence", "constant"});
  one_of(bad, "rlaif.kl_estimator", r.kl_estimator, {"k1", "k3"});
  if (r.top_samples_per_prompt < 0) bad("rlaif.top_samples_per_prompt", "must be >= 0 (0: all)");
  if (r.advantage_eps < 0) bad("rlaif.advantage_eps", "must be >= 0");
  if (r.clip_low < 0 || r.clip_low >= 1) bad("rlaif.clip_low", "must be in [0, 1)");
  if (r.clip_high < 0) bad("rlaif.clip_high", "must be >= 0");
  if (r.max_len_norm < 0) bad("rlaif.max_len_norm", "must be >= 0 (0: max_new_tokens)");
  if (r.kl_coef < 0) bad("rlaif.kl_coef", "must be >= 0");
  if (r.target_kl < 0) bad("rlaif.target_kl", "must be >= 0 (0: fixed kl_coef)");
  if (r.kl_horizon <= 0) bad("rlaif.kl_horizon", "must be > 0");
  if (r.kl_gain < 0) bad("rlaif.kl_gain", "must be >= 0");
  if (r.kl_coef_min < 0 || r.kl_coef_min > r.kl_coef_max) bad("rlaif.kl_coef_min", "must be in [0, kl_coef_max]");
  if (r.is_truncation < 0) bad("rlaif.is_truncation", "must be >= 0 (0: no importance-sampling correction)");
}

// Values whose type is right but whose meaning is not.
void validate(const RunConfig& c, const std::string& file) {
  const auto bad = [&](const std::string& key, const std::string& why) {
    throw Error("config", fmt::format("{}: key '{}' {}", file, key, why));
  };
  const auto& t = c.teacher;
  if (t.provider != "openai" && t.provider != "anthropic" && t.provider != "local")
    bad("teacher.provider", fmt::format("is '{}'; use openai, anthropic or local", t.provider));
  if (t.max_concurrency < 1) bad("teacher.max_concurrency", "must be at least 1");
  if (t.max_retries < 0) bad("teacher.max_retries", "must be >= 0");
  if (t.timeout_s <= 0) bad("teacher.timeout_s", "must be > 0");
  if (t.max_tokens < 1) bad("teacher.max_tokens", "must be at least 1");
  for (double w : {t.rubric.correctness, t.rubric.code_quality, t.rubric.efficiency, t.rubric.documentation})
    if (w < 0) bad("teacher.rubric", "weights must be >= 0");
  if (t.rubric.correctness + t.rubric.code_quality + t.rubric.efficiency + t.rubric.documentation <= 0)
    bad("teacher.rubric", "weights must not all be 0");
  if (c.rlaif.num_samples_per_prompt < 1) bad("rlaif.num_samples_per_prompt", "must be at least 1");
  if (c.training.batch_size < 1) bad("training.batch_size", "must be at least 1");
  if (c.training.learning_rate <= 0) bad("training.learning_rate", "must be > 0");
  training_rlaif_validate(c, bad);
}

}  // namespace

RunConfig parse_run_config(const std::string& yaml_text, const std::string& name) {
  YAML::Node root;
  try {
    root = YAML::Load(yaml_text);
  } catch (const YAML::ParserException& e) {
    throw Error("config", fmt::format("{}: YAML syntax error at line {}: {}", name, e.mark.line + 1, e.msg));
  }
  RunConfig c;
  c.path = name;
  Section top(name, &c.warnings);
  top.sub("model", [&c](Section& s) {
       s.field("name_or_path", &c.model.name_or_path)
           .field("dtype", &c.model.dtype)
           .field("max_seq_len", &c.model.max_seq_len)
           .field("use_lora", &c.model.use_lora)
           .field("lora_r", &c.model.lora_r)
           .field("lora_alpha", &c.model.lora_alpha)
           .field("lora_dropout", &c.model.lora_dropout)
           .list("lora_target_modules", &c.model.lora_target_modules)
           .field("chat_template", &c.model.chat_template)
           .field("system_prompt", &c.model.system_prompt);
     })
      .sub("teacher", [&c](Section& s) { teacher_section(s, c.teacher); })
      .sub("training", [&c](Section& s) {
        auto& t = c.training;
        s.field("learning_rate", &t.learning_rate)
            .field("batch_size", &t.batch_size)
            .field("num_epochs", &t.num_epochs)
            .field("max_steps", &t.max_steps)
            .field("gradient_accumulation_steps", &t.gradient_accumulation_steps)
            .field("max_grad_norm", &t.max_grad_norm)
            .field("weight_decay", &t.weight_decay)
            .field("warmup_steps", &t.warmup_steps)
            .field("lr_scheduler", &t.lr_scheduler)
            .field("min_lr_ratio", &t.min_lr_ratio)
            .field("adam_beta1", &t.adam_beta1)
            .field("adam_beta2", &t.adam_beta2)
            .field("adam_epsilon", &t.adam_epsilon)
            .field("seed", &t.seed)
            .field("save_steps", &t.save_steps)
            .field("save_total_limit", &t.save_total_limit)
            .field("eval_steps", &t.eval_steps)
            .field("save_every_epochs", &t.save_every_epochs)
            .field("save_every_batches", &t.save_every_batches)
            .field("save_merged", &t.save_merged)
            .field("baseline_eval_batches", &t.baseline_eval_batches)
            .field("bf16", &t.bf16)
            .field("gradient_checkpointing", &t.gradient_checkpointing);
      })
      .sub("rlaif", [&c](Section& s) {
        auto& r = c.rlaif;
        s.field("num_samples_per_prompt", &r.num_samples_per_prompt)
            .field("reward_threshold", &r.reward_threshold)
            .field("top_samples_per_prompt", &r.top_samples_per_prompt)
            .field("kl_coef", &r.kl_coef)
            .field("temperature", &r.temperature)
            .field("top_p", &r.top_p)
            .field("max_new_tokens", &r.max_new_tokens)
            .field("overlap_scoring", &r.overlap_scoring)
            .field("advantage_scheme", &r.advantage_scheme)
            .field("advantage_baseline", &r.advantage_baseline)
            .field("normalize_advantage_std", &r.normalize_advantage_std)
            .field("advantage_eps", &r.advantage_eps)
            .field("drop_zero_variance_groups", &r.drop_zero_variance_groups)
            .field("policy_loss", &r.policy_loss)
            .field("loss_normalization", &r.loss_normalization)
            .field("clip_low", &r.clip_low)
            .field("clip_high", &r.clip_high)
            .field("max_len_norm", &r.max_len_norm)
            .field("kl_estimator", &r.kl_estimator)
            .field("kl_in_reward", &r.kl_in_reward)
            .field("target_kl", &r.target_kl)
            .field("kl_horizon", &r.kl_horizon)
            .field("kl_gain", &r.kl_gain)
            .field("kl_coef_min", &r.kl_coef_min)
            .field("kl_coef_max", &r.kl_coef_max)
            .field("is_truncation", &r.is_truncation);
      })
      .sub("data", [&c](Section& s) {
        s.field("train_file", &c.data.train_file)
            .field("eval_file", &c.data.eval_file)
            .field("prompt_field", &c.data.prompt_field)
            .field("shuffle", &c.data.shuffle)
            .field("max_train_samples", &c.data.max_train_samples)
            .field("max_eval_samples", &c.data.max_eval_samples);
      })
      .sub("logging", [&c](Section& s) {
        s.field("output_dir", &c.logging.output_dir)
            .field("log_level", &c.logging.log_level)
            .field("save_samples", &c.logging.save_samples);
      })
      .sub("hardware", [&c](Section& s) {
        s.field("device", &c.hardware.device)
            .not_applicable("use_mps", "Apple MPS is not a backend of rlaif (CPU or CUDA; see hardware.device)");
      });
  if (root && !root.IsNull()) top.walk(root, "");
  validate(c, name);
  return c;
}

RunConfig load_run_config(const std::filesystem::path& path) {
  if (!std::filesystem::exists(path))
    throw Error("config", fmt::format("config file {} does not exist", path.string()));
  return parse_run_config(read_file(path), path.string());
}

}  // namespace rlaif
