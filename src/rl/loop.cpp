// Implementation of the RL loop. Each phase is a short function; state that a resume will need (step, data
// position, optimizer, KL controller) lives in Run.
#include "rl/loop.h"

#include <ATen/core/grad_mode.h>

#include <chrono>
#include <cmath>
#include <fstream>
#include <map>
#include <numeric>

#include "core/error.h"
#include "core/io.h"
#include "core/logging.h"
#include "core/tensorboard.h"
#include "engine/bundle.h"
#include "engine/engine.h"
#include "models/lora.h"
#include "rl/data.h"
#include "teacher/scorer.h"
#include "train/advantages.h"
#include "train/batch.h"
#include "train/kl_controller.h"
#include "train/losses.h"
#include "train/optim.h"

namespace rlaif {

namespace fs = std::filesystem;

nlohmann::json StepMetrics::to_json() const {
  return {{"step", step}, {"epoch", epoch}, {"reward/mean", reward_mean}, {"reward/std", reward_std},
          {"reward/min", reward_min}, {"reward/max", reward_max}, {"accuracy", accuracy}, {"loss", loss},
          {"policy_loss", policy_loss}, {"kl", kl}, {"beta", beta}, {"lr", lr}, {"grad_norm", grad_norm},
          {"clip_fraction", clip_fraction}, {"sampler_trainer_logprob_mad", sampler_trainer_logprob_mad},
          {"samples", samples}, {"kept", kept}, {"unscored", unscored}, {"zero_variance_groups", zero_variance_groups},
          {"generated_tokens", generated_tokens}, {"trained_tokens", trained_tokens}, {"time/generate_s", generate_s},
          {"time/score_s", score_s}, {"time/train_s", train_s}, {"teacher/calls", teacher_calls},
          {"teacher/cache_hits", cache_hits}};
}

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

struct Run {
  const RunConfig& cfg;
  ModelBundle bundle;
  std::unique_ptr<Engine> engine;
  std::unique_ptr<teacher::Scorer> scorer;
  std::unique_ptr<train::AdamW> opt;
  train::LrSchedule schedule;
  train::LossOptions loss_opt;
  train::AdvantageOptions adv_opt;
  train::KlControllerOptions kl_opt;
  train::KlControllerState kl;
  std::vector<PromptRow> rows;
  std::unique_ptr<PromptSampler> sampler;
  LoraConfig lora;
  int64_t step = 0, total_steps = 0;
  int64_t pad_id = 0;
};

// One sample of the current step.
struct Sample {
  int64_t row = 0, group = 0;
  std::vector<int32_t> prompt;
  GeneratedSample gen;
  std::optional<double> reward;
  bool verified = false, correct = false;
};

at::Device pick_device(const std::string& name) {
  if (name == "cpu") return at::kCPU;
  if (name == "auto") return at::hasCUDA() ? at::Device(at::kCUDA) : at::Device(at::kCPU);
  if (name.rfind("cuda", 0) == 0) {
    if (!at::hasCUDA()) throw Error("train", fmt::format("hardware.device is '{}' but no CUDA device is available", name),
                                    "use hardware.device: cpu");
    return at::Device(name);
  }
  throw Error("train", fmt::format("hardware.device '{}' is not one of auto, cpu, cuda, cuda:N", name));
}

template <typename E>
E pick(const std::string& key, const std::string& v, std::initializer_list<std::pair<const char*, E>> options) {
  for (const auto& [name, e] : options)
    if (v == name) return e;
  throw Error("config", fmt::format("{}: unknown value '{}'", key, v));
}

// Checkpoint files: the adapter (PEFT) or full weights, optimizer state, and trainer_state.json.
constexpr const char* kTrainerState = "trainer_state.json";

void setup(Run& r, const fs::path& resume_dir) {
  const RunConfig& c = r.cfg;
  if (c.model.name_or_path.empty()) throw Error("config", "model.name_or_path is required");
  if (c.data.train_file.empty()) throw Error("config", "data.train_file is required");
  // Keys that parse but whose features are not built yet: said out loud, never silently ignored.
  auto not_yet = [](bool set, const char* key) {
    if (set) log_warn("[config] {} is not implemented yet (evaluation and checkpoints: issue 8) and is ignored", key);
  };
  not_yet(!c.data.eval_file.empty(), "data.eval_file");
  not_yet(c.data.max_eval_samples != DataConfig{}.max_eval_samples, "data.max_eval_samples");
  not_yet(c.training.eval_steps != TrainingConfig{}.eval_steps, "training.eval_steps");
  not_yet(c.training.save_every_epochs != 0, "training.save_every_epochs");
  not_yet(c.training.save_every_batches != 0, "training.save_every_batches");
  not_yet(c.training.save_merged, "training.save_merged");
  not_yet(c.training.baseline_eval_batches != 0, "training.baseline_eval_batches");
  not_yet(c.training.bf16, "training.bf16");
  not_yet(c.training.gradient_checkpointing, "training.gradient_checkpointing");
  const at::Device dev = pick_device(c.hardware.device);
  // Trainable weights are float32 on the CPU; on the GPU the base model runs in model.dtype (LoRA stays fp32).
  const std::string dtype = dev.is_cpu() ? "float32" : c.model.dtype;
  r.bundle = load_bundle(c.model.name_or_path, {parse_torch_dtype(dtype), dev});
  DecoderModel& m = *r.bundle.model;
  r.pad_id = r.bundle.tokenizer.pad_id().value_or(r.bundle.eos_ids.empty() ? 0 : r.bundle.eos_ids[0]);

  train::NamedParams params;
  if (c.model.use_lora) {
    r.lora = {c.model.lora_r, c.model.lora_alpha, c.model.lora_dropout, c.model.lora_target_modules};
    if (resume_dir.empty()) {
      attach_lora(m, r.lora, static_cast<uint64_t>(c.training.seed));
    } else {
      if (!fs::exists(resume_dir / "adapter_config.json"))
        throw Error("train", fmt::format("{} has no LoRA adapter (adapter_config.json) but model.use_lora is true",
                                         resume_dir.string()),
                    "resume with the config the checkpoint was made with");
      load_peft_adapter(m, resume_dir);
      r.lora.dropout = c.model.lora_dropout;
    }
    params = lora_parameters(m);
  } else {
    if (c.rlaif.kl_coef > 0)
      throw Error("config", "rlaif.kl_coef > 0 with model.use_lora: false needs a frozen reference copy, not supported yet",
                  "set rlaif.kl_coef: 0 for full fine-tuning, or use LoRA (the reference is the same weights with adapters off)");
    params = m.named_weights();
    if (!resume_dir.empty()) {
      auto saved = load_safetensors(resume_dir / "model.safetensors");
      at::NoGradGuard ng;
      for (auto& [n, t] : params) {
        auto it = saved.find(n);
        if (it == saved.end())
          throw Error("train", fmt::format("{}: model.safetensors lacks '{}'", resume_dir.string(), n));
        t.copy_(it->second);
      }
    }
    for (auto& [n, t] : params) t.set_requires_grad(true);
  }
  r.opt = std::make_unique<train::AdamW>(params, train::AdamWOptions{c.training.adam_beta1, c.training.adam_beta2,
                                                                     c.training.adam_epsilon, c.training.weight_decay});

  r.rows = load_prompt_rows(c.data.train_file, c.data.prompt_field, c.data.max_train_samples);
  r.sampler = std::make_unique<PromptSampler>(static_cast<int64_t>(r.rows.size()), c.training.seed, c.data.shuffle);
  const int64_t per_epoch = (static_cast<int64_t>(r.rows.size()) + c.training.batch_size - 1) / c.training.batch_size;
  r.total_steps = c.training.max_steps > 0 ? c.training.max_steps : per_epoch * c.training.num_epochs;
  r.schedule = {train::parse_lr_schedule(c.training.lr_scheduler), c.training.learning_rate, c.training.warmup_steps,
                r.total_steps, c.training.min_lr_ratio};

  using LO = train::LossOptions;
  r.loss_opt.kind = pick<LO::Kind>("rlaif.policy_loss", c.rlaif.policy_loss,
                                   {{"ppo_clip", LO::Kind::kPpoClip}, {"reinforce", LO::Kind::kReinforce}});
  r.loss_opt.norm = pick<LO::Norm>("rlaif.loss_normalization", c.rlaif.loss_normalization,
                                   {{"token", LO::Norm::kToken}, {"sequence", LO::Norm::kSequence},
                                    {"constant", LO::Norm::kConstant}});
  r.loss_opt.kl_estimator = pick<LO::KlEstimator>("rlaif.kl_estimator", c.rlaif.kl_estimator,
                                                  {{"k1", LO::KlEstimator::kK1}, {"k3", LO::KlEstimator::kK3}});
  r.loss_opt.clip_low = c.rlaif.clip_low;
  r.loss_opt.clip_high = c.rlaif.clip_high;
  r.loss_opt.max_len_norm = c.rlaif.max_len_norm > 0 ? c.rlaif.max_len_norm : c.rlaif.max_new_tokens;
  r.loss_opt.kl_in_reward = c.rlaif.kl_in_reward;
  if (c.rlaif.is_truncation > 0) r.loss_opt.is_truncation = c.rlaif.is_truncation;

  using AO = train::AdvantageOptions;
  r.adv_opt.scheme = pick<AO::Scheme>("rlaif.advantage_scheme", c.rlaif.advantage_scheme,
                                      {{"group", AO::Scheme::kGroup}, {"mad_tanh", AO::Scheme::kMadTanh}});
  r.adv_opt.baseline = pick<AO::Baseline>("rlaif.advantage_baseline", c.rlaif.advantage_baseline,
                                          {{"mean", AO::Baseline::kMean}, {"leave_one_out", AO::Baseline::kLeaveOneOut},
                                           {"none", AO::Baseline::kNone}});
  r.adv_opt.normalize_std = c.rlaif.normalize_advantage_std;
  r.adv_opt.eps = c.rlaif.advantage_eps;
  r.adv_opt.drop_zero_variance = c.rlaif.drop_zero_variance_groups;
  if (c.rlaif.top_samples_per_prompt > 0) r.adv_opt.top_samples_per_prompt = c.rlaif.top_samples_per_prompt;
  if (c.rlaif.reward_threshold > 0) r.adv_opt.reward_threshold = c.rlaif.reward_threshold;

  r.kl_opt = {c.rlaif.kl_coef, c.rlaif.target_kl, c.rlaif.kl_horizon, c.rlaif.kl_gain, 0.2, c.rlaif.kl_coef_min,
              c.rlaif.kl_coef_max};
  r.kl = train::kl_controller_init(r.kl_opt);
  if (!resume_dir.empty()) {
    r.opt->load_state_dict(load_safetensors(resume_dir / "optimizer.safetensors"));
    const auto st = nlohmann::json::parse(read_file(resume_dir / kTrainerState), nullptr, false);
    if (st.is_discarded()) throw Error("train", fmt::format("{}: invalid JSON", (resume_dir / kTrainerState).string()));
    try {
      r.step = st.at("global_step").get<int64_t>();
      r.sampler->seek(st.at("epoch").get<int64_t>(), st.at("index").get<int64_t>());
      r.kl = st.at("kl_controller").get<train::KlControllerState>();
    } catch (const nlohmann::json::exception& e) {
      throw Error("train", fmt::format("{}: {}", (resume_dir / kTrainerState).string(), e.what()),
                  "the checkpoint is damaged; resume from an earlier one");
    }
    log_info("[train] resumed from {} at step {} (epoch {}, prompt {})", resume_dir.string(), r.step,
             r.sampler->epoch(), r.sampler->index());
  }

  EngineOptions eo;
  eo.max_batch = std::max<int64_t>(64, static_cast<int64_t>(c.training.batch_size) * c.rlaif.num_samples_per_prompt);
  eo.eos_ids = r.bundle.eos_ids;
  r.engine = std::make_unique<Engine>(r.bundle.model, eo);
  r.scorer = std::make_unique<teacher::Scorer>(c.teacher);
  log_info("[train] {} on {} ({}), {} prompts, {} steps, {} x {} samples per step, {} ({} trainable tensors)",
           c.model.name_or_path, r.engine->backend(), dtype, r.rows.size(), r.total_steps, c.training.batch_size,
           c.rlaif.num_samples_per_prompt, c.model.use_lora ? "LoRA" : "full fine-tuning", params.size());
}

std::vector<Sample> rollout(Run& r, StepMetrics& m) {
  const RunConfig& c = r.cfg;
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<int64_t> batch = r.sampler->next_batch(c.training.batch_size);
  m.epoch = r.sampler->epoch();
  std::vector<GenerationRequest> reqs;
  for (int64_t row : batch) {
    GenerationRequest q;
    q.prompt = r.bundle.encode_prompt(r.rows[row].prompt, c.model.chat_template, c.model.system_prompt);
    q.num_samples = c.rlaif.num_samples_per_prompt;
    q.params.temperature = c.rlaif.temperature;
    q.params.top_p = c.rlaif.top_p;
    const int64_t room = c.model.max_seq_len - static_cast<int64_t>(q.prompt.size());
    if (room < 1)
      throw Error("train", fmt::format("{}: prompt {} is {} tokens, model.max_seq_len is {}", c.data.train_file, row + 1,
                                       q.prompt.size(), c.model.max_seq_len),
                  "raise model.max_seq_len or shorten the prompt");
    q.params.max_new_tokens = std::min<int64_t>(c.rlaif.max_new_tokens, room);
    q.params.seed = static_cast<uint64_t>(c.training.seed) * 7919ULL + static_cast<uint64_t>(r.step);
    reqs.push_back(std::move(q));
  }
  r.bundle.model->set_training(false);
  auto gens = r.engine->generate(reqs);
  std::vector<Sample> out;
  for (auto& g : gens) {
    Sample s;
    s.row = batch[g.request];
    s.group = g.request;
    s.prompt = reqs[g.request].prompt;
    m.generated_tokens += static_cast<int64_t>(g.tokens.size());
    s.gen = std::move(g);
    out.push_back(std::move(s));
  }
  m.generate_s = seconds_since(t0);
  return out;
}

void score(Run& r, std::vector<Sample>& samples, StepMetrics& m) {
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<teacher::ScoreRequest> reqs;
  for (const auto& s : samples) {
    const PromptRow& row = r.rows[s.row];
    reqs.push_back({fmt::format("{}:{}:{}", r.step, s.group, s.gen.sample), row.prompt,
                    r.bundle.tokenizer.decode(s.gen.tokens, /*skip_special=*/true), row.language, row.answer, row.tests});
  }
  auto results = r.scorer->score(reqs);
  int64_t checked = 0, passed = 0;
  for (size_t i = 0; i < samples.size(); ++i) {
    RLAIF_CHECK(results[i].id == reqs[i].id, "score result {} paired with {}", results[i].id, reqs[i].id);
    samples[i].reward = results[i].reward;
    for (const auto& t : results[i].tiers)
      if (t.name == "exact_answer" || t.name == "tests") {
        ++checked;
        passed += t.passed;
      }
    if (!results[i].reward) ++m.unscored;
  }
  m.accuracy = checked ? static_cast<double>(passed) / checked : -1;
  m.teacher_calls = r.scorer->step_stats().api.calls;
  m.cache_hits = r.scorer->step_stats().cache_hits;
  m.score_s = seconds_since(t0);
}

void update(Run& r, std::vector<Sample>& samples, StepMetrics& m) {
  const RunConfig& c = r.cfg;
  const auto t0 = std::chrono::steady_clock::now();
  DecoderModel& model = *r.bundle.model;
  const at::Device dev = model.weights().embed.device();

  // advantages: unscored samples never enter the loss (and never get a default reward).
  std::vector<double> rewards;
  std::vector<int64_t> groups, index;
  for (size_t i = 0; i < samples.size(); ++i)
    if (samples[i].reward) {
      rewards.push_back(*samples[i].reward);
      groups.push_back(samples[i].group);
      index.push_back(static_cast<int64_t>(i));
    }
  m.samples = static_cast<int64_t>(samples.size());
  if (!rewards.empty()) {
    const double mean = std::accumulate(rewards.begin(), rewards.end(), 0.0) / rewards.size();
    double var = 0;
    for (double x : rewards) var += (x - mean) * (x - mean);
    m.reward_mean = mean;
    m.reward_std = std::sqrt(var / rewards.size());
    m.reward_min = *std::min_element(rewards.begin(), rewards.end());
    m.reward_max = *std::max_element(rewards.begin(), rewards.end());
  }
  const bool use_ref = c.model.use_lora && (r.kl.beta > 0 || c.rlaif.kl_in_reward);
  auto pack = [&](const std::vector<int64_t>& which) {
    std::vector<train::SequenceView> views;
    for (int64_t i : which) views.push_back({&samples[i].prompt, &samples[i].gen.tokens, &samples[i].gen.logprobs});
    return train::pack_sequences(views, r.pad_id, dev);
  };
  if (c.rlaif.kl_in_reward && use_ref && !index.empty()) {
    at::NoGradGuard ng;
    auto p = pack(index);
    at::Tensor lp = model.token_logprobs(p.tokens, p.attention_mask, p.targets);
    AdaptersOff off(model);
    at::Tensor ref = model.token_logprobs(p.tokens, p.attention_mask, p.targets);
    rewards = train::apply_kl_to_rewards(rewards, lp, ref, p.completion_mask, r.kl.beta, r.loss_opt.kl_estimator).rewards;
  }
  const train::AdvantageResult adv = train::compute_advantages(rewards, groups, r.adv_opt);
  m.zero_variance_groups = adv.zero_variance_groups;
  std::vector<int64_t> kept;
  std::vector<double> kept_adv;
  for (size_t k = 0; k < index.size(); ++k)
    if (adv.keep[k]) {
      kept.push_back(index[k]);
      kept_adv.push_back(adv.advantages[k]);
    }
  m.kept = static_cast<int64_t>(kept.size());
  m.beta = r.kl.beta;
  m.lr = r.schedule.lr_at(r.step);
  if (kept.empty()) {
    log_info("[train] step {}: no sample carries a learning signal (all groups zero-variance or unscored)", r.step);
    m.train_s = seconds_since(t0);
    return;
  }

  // update: micro-batches share one loss denominator, so accumulation equals one big batch.
  train::LossOptions lo = r.loss_opt;
  lo.kl_beta = use_ref && !c.rlaif.kl_in_reward ? r.kl.beta : 0.0;
  const auto full = pack(kept);
  const double denom = train::loss_denominator(full.completion_mask, lo);
  const int64_t micro = std::max<int64_t>(1, c.training.gradient_accumulation_steps);
  const int64_t per = (static_cast<int64_t>(kept.size()) + micro - 1) / micro;
  double loss = 0, pol = 0, kl_sum = 0, clip = 0, mad_sum = 0;
  int64_t tokens = 0;
  model.set_training(true);
  for (int64_t s = 0; s < static_cast<int64_t>(kept.size()); s += per) {
    std::vector<int64_t> part(kept.begin() + s, kept.begin() + std::min<int64_t>(s + per, kept.size()));
    std::vector<double> part_adv(kept_adv.begin() + s, kept_adv.begin() + s + part.size());
    auto p = pack(part);
    train::LossInputs in;
    in.new_logprobs = model.token_logprobs(p.tokens, p.attention_mask, p.targets);
    in.sampler_logprobs = p.sampler_logprobs;
    in.advantages = at::tensor(part_adv, at::kDouble).to(dev, at::kFloat);
    in.mask = p.completion_mask;
    if (lo.kl_beta > 0) {
      at::NoGradGuard ng;
      AdaptersOff off(model);
      in.ref_logprobs = model.token_logprobs(p.tokens, p.attention_mask, p.targets);
    }
    auto res = train::policy_loss(in, lo, denom);
    res.loss.backward();
    const double n = res.tokens;
    loss += res.loss.item<double>();
    pol += res.policy_loss;
    kl_sum += res.kl_mean * n;
    clip += res.clip_fraction * n;
    mad_sum += ((in.new_logprobs.detach() - p.sampler_logprobs).abs() * p.completion_mask).sum().item<double>();
    tokens += res.tokens;
  }
  model.set_training(false);
  m.grad_norm = train::clip_grad_norm(r.opt->params(), c.training.max_grad_norm);
  r.opt->step(m.lr);
  r.opt->zero_grad();
  m.loss = loss;
  m.policy_loss = pol;
  m.kl = tokens ? kl_sum / tokens : 0;
  m.clip_fraction = tokens ? clip / tokens : 0;
  m.sampler_trainer_logprob_mad = tokens ? mad_sum / tokens : 0;
  m.trained_tokens = tokens;
  if (use_ref) train::kl_controller_update(r.kl, r.kl_opt, m.kl, static_cast<int64_t>(samples.size()));
  m.train_s = seconds_since(t0);
}

void log_step(const Run& r, const StepMetrics& m) {
  const double total = m.generate_s + m.score_s + m.train_s;
  log_info("[train] step {}/{} (epoch {}) | reward {:.3f} ± {:.3f} [{:.2f}, {:.2f}]{} | loss {:.4f} kl {:.2e} β {:.3g} "
           "lr {:.2e} | gen {:.0f} tok/s, train {:.0f} tok/s | time gen {:.0f}% score {:.0f}% train {:.0f}% ({:.1f} s) | "
           "kept {}/{}, zero-var groups {}, unscored {}, teacher calls {}, cache hits {} | |Δlogp| {:.1e}",
           m.step, r.total_steps, m.epoch, m.reward_mean, m.reward_std, m.reward_min, m.reward_max,
           m.accuracy >= 0 ? fmt::format(" acc {:.0f}%", 100 * m.accuracy) : "", m.loss, m.kl, m.beta, m.lr,
           m.generate_s > 0 ? m.generated_tokens / m.generate_s : 0.0, m.train_s > 0 ? m.trained_tokens / m.train_s : 0.0,
           100 * m.generate_s / total, 100 * m.score_s / total, 100 * m.train_s / total, total, m.kept, m.samples,
           m.zero_variance_groups, m.unscored, m.teacher_calls, m.cache_hits, m.sampler_trainer_logprob_mad);
}

// Writes a checkpoint atomically: everything goes to a temporary directory, renamed into place at the end, so
// a crash mid-save leaves the previous checkpoint as it was.
fs::path save_checkpoint(Run& r, const fs::path& out_dir, const std::string& name) {
  const RunConfig& c = r.cfg;
  const fs::path final_dir = out_dir / name, tmp = out_dir / (name + ".tmp");
  remove_tree(tmp);
  fs::create_directories(tmp);
  DecoderModel& m = *r.bundle.model;
  if (c.model.use_lora) {
    save_peft_adapter(m, r.lora, tmp, c.model.name_or_path);
  } else {
    std::map<std::string, at::Tensor> w;
    for (const auto& [n, t] : m.named_weights()) w[n] = t;
    save_safetensors(tmp / "model.safetensors", w);
  }
  save_safetensors(tmp / "optimizer.safetensors", r.opt->state_dict());
  const nlohmann::json st = {{"global_step", r.step}, {"epoch", r.sampler->epoch()}, {"index", r.sampler->index()},
                             {"kl_controller", r.kl}, {"seed", c.training.seed}, {"total_steps", r.total_steps},
                             {"model", c.model.name_or_path}};
  write_file_atomic(tmp / kTrainerState, st.dump(2));
  remove_tree(final_dir);
  rename_path(tmp, final_dir);
  return final_dir;
}

// Step checkpoints in output_dir, oldest first (by global step).
std::vector<fs::path> step_checkpoints(const fs::path& out_dir) {
  std::vector<std::pair<int64_t, fs::path>> found;
  if (!fs::exists(out_dir)) return {};
  for (const std::string& n : list_dir(out_dir)) {
    const fs::path entry = out_dir / n;
    const auto gs = n.rfind("-gs");
    if (n.rfind("checkpoint-", 0) != 0 || gs == std::string::npos || n.size() > 4 && n.substr(n.size() - 4) == ".tmp")
      continue;
    if (!fs::exists(entry / kTrainerState)) continue;
    const std::string digits = n.substr(gs + 3);
    if (digits.empty() || digits.find_first_not_of("0123456789") != std::string::npos) continue;
    found.push_back({std::stoll(digits), entry});
  }
  std::sort(found.begin(), found.end());
  std::vector<fs::path> out;
  for (auto& f : found) out.push_back(f.second);
  return out;
}

}  // namespace

std::string reward_curve(const std::vector<StepMetrics>& steps, int width) {
  if (steps.empty()) return "";
  double lo = steps[0].reward_mean, hi = lo;
  for (const auto& s : steps) lo = std::min(lo, s.reward_mean), hi = std::max(hi, s.reward_mean);
  if (hi - lo < 1e-9) hi = lo + 1;
  std::string out = fmt::format("reward (mean per step, {:.3f} .. {:.3f})\n", lo, hi);
  for (const auto& s : steps) {
    const int n = static_cast<int>(std::lround((s.reward_mean - lo) / (hi - lo) * width));
    out += fmt::format("step {:>4} | {:<{}} {:.3f}\n", s.step, std::string(std::max(n, 0), '#'), width, s.reward_mean);
  }
  return out;
}

TrainResult run_training(const RunConfig& cfg, const TrainHooks& hooks, const std::string& resume) {
  fs::path resume_dir;
  if (resume == "latest") {
    const auto all = step_checkpoints(cfg.logging.output_dir);
    if (all.empty())
      throw Error("train", fmt::format("--resume latest: no checkpoint in {}", cfg.logging.output_dir),
                  "checkpoints are written every training.save_steps steps");
    resume_dir = all.back();
  } else if (!resume.empty()) {
    resume_dir = resume;
    if (!fs::exists(resume_dir / kTrainerState))
      throw Error("train", fmt::format("{} is not a checkpoint (no {})", resume, kTrainerState));
  }
  Run r{cfg, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, 0, 0, 0};
  setup(r, resume_dir);
  TrainResult result;
  result.output_dir = cfg.logging.output_dir;
  fs::create_directories(result.output_dir);
  if (!cfg.path.empty() && fs::exists(cfg.path)) write_file_atomic(result.output_dir / "config.yaml", read_file(cfg.path));
  result.metrics_path = result.output_dir / "metrics.jsonl";
  std::ofstream metrics(result.metrics_path, std::ios::app);
  // TensorBoard: the original system's tags where they still apply (docs/METRICS.md lists them).
  TensorBoardWriter tb(result.output_dir / "tensorboard");
  while (r.step < r.total_steps) {
    StepMetrics m;
    m.step = r.step + 1;
    auto samples = rollout(r, m);
    score(r, samples, m);
    update(r, samples, m);
    ++r.step;
    log_step(r, m);
    const nlohmann::json mj = m.to_json();  // kept alive: items() only views it
    metrics << mj.dump() << "\n" << std::flush;
    for (const auto& [tag, v] : mj.items())
      if (v.is_number() && tag != "step" && tag != "epoch") tb.scalar(tag, v.get<double>(), m.step);
    tb.flush();
    result.steps.push_back(m);
    if (hooks.on_step) hooks.on_step(m);
    if (cfg.training.save_steps > 0 && r.step % cfg.training.save_steps == 0 && r.step < r.total_steps) {
      // Named as the original system named them: epoch, batch within the epoch, global step.
      const int64_t batch_in_epoch = (r.sampler->index() + cfg.training.batch_size - 1) / cfg.training.batch_size;
      const auto dir = save_checkpoint(
          r, result.output_dir, fmt::format("checkpoint-e{}-b{}-gs{}", r.sampler->epoch(), batch_in_epoch, r.step));
      log_info("[train] checkpoint {}", dir.string());
      auto all = step_checkpoints(result.output_dir);
      while (cfg.training.save_total_limit > 0 && static_cast<int64_t>(all.size()) > cfg.training.save_total_limit) {
        remove_tree(all.front());
        all.erase(all.begin());
      }
    }
  }
  result.final_checkpoint = save_checkpoint(r, result.output_dir, fmt::format("checkpoint-final-gs{}", r.total_steps));
  return result;
}

}  // namespace rlaif
