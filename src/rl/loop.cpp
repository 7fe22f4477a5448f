// Implementation of the RL loop. Each phase is a short function; state that a resume will need (step, data
// position, optimizer, KL controller) lives in Run.
#include "rl/loop.h"

#include <ATen/core/grad_mode.h>

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
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
#include "rl/eval.h"
#include "rl/export.h"
#include "teacher/scorer.h"
#include "teacher/scoring_pipeline.h"
#include "train/advantages.h"
#include "train/batch.h"
#include "train/kl_controller.h"
#include "train/losses.h"
#include "train/optim.h"

namespace rlaif {

namespace fs = std::filesystem;

nlohmann::json StepMetrics::to_json() const {
  return {{"type", "step"}, {"step", step}, {"epoch", epoch}, {"reward/mean", reward_mean}, {"reward/std", reward_std},
          {"reward/min", reward_min}, {"reward/max", reward_max}, {"accuracy", accuracy}, {"loss", loss},
          {"policy_loss", policy_loss}, {"kl", kl}, {"beta", beta}, {"lr", lr}, {"grad_norm", grad_norm},
          {"clip_fraction", clip_fraction}, {"sampler_trainer_logprob_mad", sampler_trainer_logprob_mad},
          {"samples", samples}, {"kept", kept}, {"unscored", unscored}, {"zero_variance_groups", zero_variance_groups},
          {"generated_tokens", generated_tokens}, {"trained_tokens", trained_tokens}, {"time/generate_s", generate_s},
          {"time/score_s", score_s}, {"time/score_overlap_s", score_overlap_s},
          {"time/train_s", train_s}, {"teacher/calls", teacher_calls},
          {"teacher/cache_hits", cache_hits}, {"teacher/tokens", teacher_tokens}, {"eta_s", eta_s}};
}

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

struct Run {
  explicit Run(const RunConfig& c) : cfg(c) {}
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
  std::vector<PromptRow> rows, eval_rows;
  std::unique_ptr<PromptSampler> sampler;
  LoraConfig lora;
  int64_t step = 0, total_steps = 0;
  int64_t pad_id = 0;
  // Best evaluation so far (reward, step, checkpoint name), restored from best_checkpoint.json on resume.
  double best_reward = -1e300;
  int64_t best_step = -1;
  std::string best_name;
};

// One sample of the current step.
struct Sample {
  int64_t row = 0, group = 0;
  std::vector<int32_t> prompt;
  GeneratedSample gen;
  std::string text;  // the decoded completion, as scored
  std::optional<double> reward;
};


template <typename E>
E pick(const std::string& key, const std::string& v, std::initializer_list<std::pair<const char*, E>> options) {
  for (const auto& [name, e] : options)
    if (v == name) return e;
  throw Error("config", fmt::format("{}: unknown value '{}'", key, v));
}

// Checkpoint files: the adapter (PEFT) or full weights, optimizer state, the dropout RNG, and trainer_state.json
// (written last: a directory without it is incomplete).
constexpr const char* kTrainerState = "trainer_state.json";
constexpr const char* kRngState = "rng_state.safetensors";
constexpr const char* kBestCheckpoint = "best_checkpoint.json";

// LoRA dropout draws from the device's default generator (models/decoder.cpp); its state is part of a checkpoint
// so a resumed run draws the same masks. (Sampling uses per-step seeds and needs nothing saved.)
at::Tensor rng_state(const at::Device& dev) {
  at::Generator gen = at::globalContext().defaultGenerator(dev);
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}

void restore_rng(const fs::path& dir, const at::Device& dev) {
  if (!fs::exists(dir / kRngState)) {
    log_warn("[train] {} has no {}: dropout masks after the resume will differ from an uninterrupted run",
             dir.string(), kRngState);
    return;
  }
  auto t = load_safetensors(dir / kRngState);
  auto it = t.find("default_generator");
  if (it == t.end()) throw Error("train", fmt::format("{}: no tensor 'default_generator'", (dir / kRngState).string()));
  at::Generator gen = at::globalContext().defaultGenerator(dev);
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(it->second);
}

nlohmann::json read_json_file(const fs::path& p, const char* component) {
  const auto j = nlohmann::json::parse(read_file(p), nullptr, false);
  if (j.is_discarded() || !j.is_object())
    throw Error(component, fmt::format("{}: invalid JSON", p.string()),
                "the checkpoint is damaged; resume from an earlier one");
  return j;
}

// A checkpoint passed to --resume is checked before the model is loaded: each missing or unreadable file is named.
void check_checkpoint(const fs::path& dir, bool lora) {
  if (!fs::is_directory(dir)) throw Error("train", fmt::format("{} is not a checkpoint (not a directory)", dir.string()));
  if (!fs::exists(dir / kTrainerState))
    throw Error("train", fmt::format("{} is not a checkpoint (no {})", dir.string(), kTrainerState),
                "an interrupted save leaves no trainer_state.json; resume from an earlier checkpoint or 'latest'");
  const auto st = read_json_file(dir / kTrainerState, "train");
  for (const char* k : {"global_step", "epoch", "index", "kl_controller"})
    if (!st.contains(k))
      throw Error("train", fmt::format("{}: missing key '{}'", (dir / kTrainerState).string(), k),
                  "the checkpoint is damaged; resume from an earlier one");
  std::vector<std::string> need = {"optimizer.safetensors"};
  if (lora) need.insert(need.end(), {"adapter_config.json", "adapter_model.safetensors"});
  else need.push_back("model.safetensors");
  for (const auto& f : need)
    if (!fs::exists(dir / f))
      throw Error("train", fmt::format("{}: missing {}", dir.string(), f),
                  lora && f == "adapter_config.json" ? "the checkpoint may come from a full fine-tuning run (model.use_lora: false)"
                                                     : "the checkpoint is incomplete; resume from an earlier one");
}

void setup(Run& r, const fs::path& resume_dir) {
  const RunConfig& c = r.cfg;
  if (c.model.name_or_path.empty()) throw Error("config", "model.name_or_path is required");
  if (c.data.train_file.empty()) throw Error("config", "data.train_file is required");
  const at::Device dev = resolve_device(c.hardware.device);
  // Trainable weights are float32 on the CPU; on the GPU the base model runs in model.dtype (LoRA stays fp32).
  const std::string dtype = dev.is_cpu() ? "float32" : c.model.dtype;
  r.bundle = load_bundle(c.model.name_or_path, {parse_torch_dtype(dtype), dev});
  DecoderModel& m = *r.bundle.model;
  m.set_gradient_checkpointing(c.training.gradient_checkpointing);
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
  if (!c.data.eval_file.empty())
    r.eval_rows = load_prompt_rows(c.data.eval_file, c.data.prompt_field, c.data.max_eval_samples);
  else if (c.data.max_eval_samples != DataConfig{}.max_eval_samples)
    log_warn("[config] data.max_eval_samples is set but data.eval_file is not: no evaluation set to limit");
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
  // Last, so nothing in setup draws from the generator after it is seeded or restored. A fresh run seeds the
  // dropout generator from training.seed, so two runs of one config draw the same masks.
  if (!resume_dir.empty()) {
    restore_rng(resume_dir, dev);
  } else {
    at::Generator gen = at::globalContext().defaultGenerator(dev);
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_current_seed(static_cast<uint64_t>(c.training.seed));
  }
  log_info("[train] {} on {} ({}), {} prompts, {} steps, {} x {} samples per step, {} ({} trainable tensors)",
           c.model.name_or_path, r.engine->backend(), dtype, r.rows.size(), r.total_steps, c.training.batch_size,
           c.rlaif.num_samples_per_prompt, c.model.use_lora ? "LoRA" : "full fine-tuning", params.size());
}

// Where a sample's score request went: its batch in the scoring pipeline and its position there.
struct ScoreSlot {
  size_t batch = 0, pos = 0;
  std::string id;
};

// The scoring request of one sample; its id ("step:group:sample") is how its result is checked on return.
teacher::ScoreRequest score_request(const Run& r, int64_t row, int64_t group, int64_t sample, std::string text) {
  const PromptRow& p = r.rows[row];
  return {fmt::format("{}:{}:{}", r.step, group, sample), p.prompt, std::move(text), p.language, p.answer, p.tests};
}

// Generation. With rlaif.overlap_scoring, a prompt's samples go to the scoring worker as soon as the last of them
// finishes (engine on_finish, on this thread) while the engine decodes the others; otherwise the whole batch goes
// in one call after generation. Either way each sample's request is recorded in `slots` (by sample index).
std::vector<Sample> rollout(Run& r, StepMetrics& m, const TrainHooks& hooks, teacher::ScoringPipeline& scoring,
                            std::vector<ScoreSlot>& slots,
                            std::chrono::steady_clock::time_point& gen_start,
                            std::chrono::steady_clock::time_point& gen_end) {
  const RunConfig& c = r.cfg;
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<int64_t> batch = r.sampler->next_batch(c.training.batch_size);
  m.epoch = r.sampler->epoch();
  std::vector<GenerationRequest> reqs;
  for (int64_t row : batch) {
    GenerationRequest q = prompt_request(r.bundle, c, r.rows[row].prompt, c.data.train_file, row);
    q.num_samples = c.rlaif.num_samples_per_prompt;
    q.params.temperature = c.rlaif.temperature;
    q.params.top_p = c.rlaif.top_p;
    q.params.seed = static_cast<uint64_t>(c.training.seed) * 7919ULL + static_cast<uint64_t>(r.step);
    reqs.push_back(std::move(q));
  }
  const int64_t n = c.rlaif.num_samples_per_prompt;
  // texts[group][sample]: decoded once, as scored and as logged.
  std::vector<std::vector<std::string>> texts(batch.size(), std::vector<std::string>(n));
  // slots[group][sample]: where the sample's request went (id empty until sent).
  std::vector<std::vector<ScoreSlot>> group_slots(batch.size(), std::vector<ScoreSlot>(n));
  auto send = [&](const std::vector<int64_t>& groups) {
    std::vector<teacher::ScoreRequest> q;
    for (int64_t g : groups)
      for (int64_t k = 0; k < n; ++k) q.push_back(score_request(r, batch[g], g, k, texts[g][k]));
    std::vector<std::string> ids;
    for (const auto& x : q) ids.push_back(x.id);
    const size_t b = scoring.submit(std::move(q));
    for (size_t pos = 0; pos < ids.size(); ++pos)
      group_slots[groups[pos / n]][pos % n] = {b, pos, std::move(ids[pos])};
  };
  auto decode = [&](const GeneratedSample& s) {
    texts[s.request][s.sample] = r.bundle.tokenizer.decode(s.tokens, /*skip_special=*/true);
  };
  std::vector<int64_t> finished(batch.size(), 0);
  GenerateCallbacks cb;
  cb.on_token = hooks.on_rollout_token;
  if (c.rlaif.overlap_scoring)
    cb.on_finish = [&](const GeneratedSample& s) {
      decode(s);
      if (++finished[s.request] == n) send({s.request});
    };
  r.bundle.model->set_training(false);
  gen_start = std::chrono::steady_clock::now();
  auto gens = r.engine->generate(reqs, cb);
  gen_end = std::chrono::steady_clock::now();
  m.generate_s = seconds_since(t0);
  if (!c.rlaif.overlap_scoring) {
    for (const auto& g : gens) decode(g);
    std::vector<int64_t> all(batch.size());
    std::iota(all.begin(), all.end(), int64_t{0});
    send(all);
  }
  std::vector<Sample> out;
  for (auto& g : gens) {
    Sample s;
    s.row = batch[g.request];
    s.group = g.request;
    s.prompt = reqs[g.request].prompt;
    s.text = texts[g.request][g.sample];
    m.generated_tokens += static_cast<int64_t>(g.tokens.size());
    RLAIF_CHECK(!group_slots[g.request][g.sample].id.empty(), "sample {}:{} finished but was never sent to scoring",
                g.request, g.sample);
    slots.push_back(group_slots[g.request][g.sample]);
    s.gen = std::move(g);
    out.push_back(std::move(s));
  }
  return out;
}

// Waits for the scoring worker, then puts each result on its sample. `time/score_s` is the wait after generation
// ended; `time/score_overlap_s` is the scoring time that ran under generation.
void score(std::vector<Sample>& samples, const std::vector<ScoreSlot>& slots, teacher::ScoringPipeline& scoring,
           std::chrono::steady_clock::time_point gen_start, std::chrono::steady_clock::time_point gen_end,
           StepMetrics& m) {
  const auto results = scoring.finish();
  int64_t checked = 0, passed = 0;
  for (size_t i = 0; i < samples.size(); ++i) {
    const ScoreSlot& slot = slots[i];
    const teacher::ScoreResult& res = results.at(slot.batch).at(slot.pos);
    RLAIF_CHECK(res.id == slot.id, "score result {} paired with {}", res.id, slot.id);
    samples[i].reward = res.reward;
    for (const auto& t : res.tiers)
      if (t.name == "exact_answer" || t.name == "tests") {
        ++checked;
        passed += t.passed;
      }
    if (!res.reward) ++m.unscored;
  }
  m.accuracy = checked ? static_cast<double>(passed) / checked : -1;
  const teacher::ScoringStats& st = scoring.stats();
  m.teacher_calls = st.api.calls;
  m.cache_hits = st.cache_hits;
  m.teacher_tokens = st.api.input_tokens + st.api.output_tokens;
  m.score_s = seconds_since(gen_end);
  m.score_overlap_s = teacher::overlap_seconds(scoring.calls(), gen_start, gen_end);
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
    at::Tensor lp = model.token_logprobs(p.tokens, p.attention_mask, p.targets, 1024, p.completion_mask);
    AdaptersOff off(model);
    at::Tensor ref = model.token_logprobs(p.tokens, p.attention_mask, p.targets, 1024, p.completion_mask);
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
    log_info("[train] step {}: no sample carries a learning signal (all groups zero-variance or unscored)", r.step + 1);
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
    {
      // training.bf16: the forwards' matmuls in bfloat16 over float32 master weights; backward after the scope.
      AutocastScope autocast(dev.type(), at::kBFloat16, c.training.bf16);
      in.new_logprobs = model.token_logprobs(p.tokens, p.attention_mask, p.targets, 1024, p.completion_mask);
      if (lo.kl_beta > 0) {
        at::NoGradGuard ng;
        AdaptersOff off(model);
        in.ref_logprobs = model.token_logprobs(p.tokens, p.attention_mask, p.targets, 1024, p.completion_mask);
      }
    }
    in.sampler_logprobs = p.sampler_logprobs;
    in.advantages = at::tensor(part_adv, at::kDouble).to(dev, at::kFloat);
    in.mask = p.completion_mask;
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

std::string format_duration(double s) {
  const auto t = static_cast<int64_t>(std::lround(std::max(s, 0.0)));
  if (t >= 3600) return fmt::format("{}h{:02}m", t / 3600, t / 60 % 60);
  if (t >= 60) return fmt::format("{}m{:02}s", t / 60, t % 60);
  return fmt::format("{}s", t);
}

void log_step(const Run& r, const StepMetrics& m) {
  const double total = m.generate_s + m.score_s + m.train_s;
  log_info("[train] step {}/{} (epoch {}) | reward {:.3f} ± {:.3f} [{:.2f}, {:.2f}]{} | loss {:.4f} policy {:.4f} "
           "kl {:.2e} β {:.3g} lr {:.2e} | gen {:.0f} tok/s, train {:.0f} tok/s | time gen {:.0f}% score {:.0f}% "
           "train {:.0f}% ({:.1f} s{}) | kept {}/{}, zero-var groups {}, unscored {}, teacher calls {} ({} tokens), "
           "cache hits {} | |Δlogp| {:.1e} | ETA {}",
           m.step, r.total_steps, m.epoch, m.reward_mean, m.reward_std, m.reward_min, m.reward_max,
           m.accuracy >= 0 ? fmt::format(" acc {:.0f}%", 100 * m.accuracy) : "", m.loss, m.policy_loss, m.kl, m.beta,
           m.lr, m.generate_s > 0 ? m.generated_tokens / m.generate_s : 0.0,
           m.train_s > 0 ? m.trained_tokens / m.train_s : 0.0, 100 * m.generate_s / total, 100 * m.score_s / total,
           100 * m.train_s / total, total,
           m.score_overlap_s > 0 ? fmt::format("; +{:.1f} s scoring hidden under gen", m.score_overlap_s) : "", m.kept,
           m.samples, m.zero_variance_groups, m.unscored, m.teacher_calls, m.teacher_tokens, m.cache_hits,
           m.sampler_trainer_logprob_mad, format_duration(m.eta_s));
}

// A one-line progress bar, redrawn in place on a terminal (stderr is a TTY); log lines clear it first.
class ProgressBar {
 public:
  explicit ProgressBar(int64_t total) : total_(total), tty_(isatty(STDERR_FILENO) == 1) {}
  void draw(int64_t done, double eta_s, double reward) {
    if (!tty_) return;
    constexpr int kWidth = 30;
    const int fill = total_ > 0 ? static_cast<int>(kWidth * done / total_) : kWidth;
    const std::string line = fmt::format("\r\033[K[{}{}] {}/{} {:.0f}% | reward {:.3f} | ETA {}", std::string(fill, '#'),
                                         std::string(kWidth - fill, '.'), done, total_,
                                         total_ > 0 ? 100.0 * done / total_ : 100.0, reward, format_duration(eta_s));
    std::fwrite(line.data(), 1, line.size(), stderr);
    std::fflush(stderr);
    shown_ = true;
  }
  void clear() {
    if (!shown_) return;
    std::fputs("\r\033[K", stderr);
    std::fflush(stderr);
    shown_ = false;
  }

 private:
  int64_t total_;
  bool tty_, shown_ = false;
};

// Writes a checkpoint atomically: everything goes to a temporary directory, renamed into place at the end, so
// a crash mid-save leaves the previous checkpoint as it was.
// RLAIF_TEST_CRASH_DURING_SAVE=N (tests only): the Nth save dies like a kill -9 after writing the weights, so a
// test can check that the previous checkpoint survives and the half-written one is never resumed from.
void maybe_crash_during_save() {
  static int saves = 0;
  static const char* env = std::getenv("RLAIF_TEST_CRASH_DURING_SAVE");
  if (env && ++saves == std::atoi(env)) {
    log_warn("[train] RLAIF_TEST_CRASH_DURING_SAVE={}: exiting mid-save", env);
    _exit(137);
  }
}

fs::path save_checkpoint(Run& r, const fs::path& out_dir, const std::string& name) {
  const RunConfig& c = r.cfg;
  const fs::path final_dir = out_dir / name, tmp = out_dir / (name + ".tmp");
  remove_tree(tmp);
  fs::create_directories(tmp);
  DecoderModel& m = *r.bundle.model;
  const at::Device dev = m.weights().embed.device();
  if (c.model.use_lora) {
    save_peft_adapter(m, r.lora, tmp, c.model.name_or_path);
    if (c.training.save_merged) save_merged_model(m, c.model.name_or_path, tmp / "merged");
  } else {
    std::map<std::string, at::Tensor> w;
    for (const auto& [n, t] : m.named_weights()) w[n] = t;
    save_safetensors(tmp / "model.safetensors", w);
  }
  maybe_crash_during_save();
  save_safetensors(tmp / "optimizer.safetensors", r.opt->state_dict());
  save_safetensors(tmp / kRngState, {{"default_generator", rng_state(dev)}});
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
    if (n.rfind("checkpoint-", 0) != 0 || gs == std::string::npos || (n.size() > 4 && n.substr(n.size() - 4) == ".tmp"))
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

namespace {

// Half-written checkpoints (a crash mid-save) are never resumed from; they are reported and removed.
void remove_incomplete_checkpoints(const fs::path& out_dir) {
  if (!fs::exists(out_dir)) return;
  for (const std::string& n : list_dir(out_dir))
    if (n.rfind("checkpoint-", 0) == 0 && n.size() > 4 && n.substr(n.size() - 4) == ".tmp") {
      log_warn("[train] removing {}: a checkpoint whose save was interrupted (incomplete, never resumed from)",
               (out_dir / n).string());
      remove_tree(out_dir / n);
    }
}

// On resume, records of steps after the checkpoint (written by the interrupted run) are dropped: the resumed run
// writes them again, so each step appears once.
void keep_records_up_to(const fs::path& path, int64_t step) {
  if (!fs::exists(path)) return;
  std::ifstream in(path);
  std::string kept;
  int64_t dropped = 0;
  for (std::string line; std::getline(in, line);) {
    const auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded()) {  // a line cut by the kill: dropped
      ++dropped;
      continue;
    }
    if (j.is_object() && j.contains("step") && j["step"].is_number_integer() && j["step"].get<int64_t>() > step) {
      ++dropped;
      continue;
    }
    kept += line + "\n";
  }
  if (dropped > 0) {
    log_info("[train] {}: dropped {} records after step {} (the resumed run redoes them)", path.string(), dropped, step);
    write_file_atomic(path, kept);
  }
}

// Summary of one epoch from its steps' metrics (means over steps, sums of counts).
nlohmann::json epoch_summary(int64_t epoch, const std::vector<StepMetrics>& steps) {
  double reward = 0, acc = 0, loss = 0, kl = 0, time = 0;
  int64_t n = 0, n_acc = 0, samples = 0, gen = 0, trained = 0, calls = 0;
  for (const auto& m : steps) {
    if (m.epoch != epoch) continue;
    ++n;
    reward += m.reward_mean;
    loss += m.loss;
    kl += m.kl;
    time += m.generate_s + m.score_s + m.train_s;
    samples += m.samples;
    gen += m.generated_tokens;
    trained += m.trained_tokens;
    calls += m.teacher_calls;
    if (m.accuracy >= 0) acc += m.accuracy, ++n_acc;
  }
  // "step": the step that ended the epoch (so a resume drops the record with that step's).
  return {{"type", "epoch"}, {"epoch", epoch}, {"steps", n}, {"step", n ? steps.back().step : 0},
          {"reward/mean", n ? reward / n : 0.0}, {"accuracy", n_acc ? acc / n_acc : -1.0}, {"loss", n ? loss / n : 0.0},
          {"kl", n ? kl / n : 0.0}, {"samples", samples}, {"generated_tokens", gen}, {"trained_tokens", trained},
          {"teacher/calls", calls}, {"time_s", time}};
}

// Writes every row of an evaluation to eval/eval-gs{step}.jsonl (users read what the model answered).
void write_eval_rows(const fs::path& out_dir, int64_t step, const std::vector<PromptRow>& rows, const EvalResult& e) {
  fs::create_directories(out_dir / "eval");
  std::string text;
  for (const auto& row : e.per_row) {
    nlohmann::json j = {{"row", row.row}, {"prompt", rows[row.row].prompt}, {"completion", row.completion},
                        {"reward", row.reward ? nlohmann::json(*row.reward) : nlohmann::json(nullptr)}};
    if (row.verified) j["correct"] = row.correct;
    if (!row.failure.empty()) j["failure"] = row.failure;
    text += jsonl_line(j);
  }
  write_file_atomic(out_dir / "eval" / fmt::format("eval-gs{}.jsonl", step), text);
}

}  // namespace

TrainResult run_training(const RunConfig& cfg, const TrainHooks& hooks, const std::string& resume) {
  const fs::path out_dir = cfg.logging.output_dir;
  fs::path resume_dir;
  if (!resume.empty() && resume != "latest") check_checkpoint(resume, cfg.model.use_lora);  // before any clean-up
  remove_incomplete_checkpoints(out_dir);
  if (resume == "latest") {
    const auto all = step_checkpoints(out_dir);
    if (all.empty())
      throw Error("train", fmt::format("--resume latest: no complete checkpoint in {}", cfg.logging.output_dir),
                  "checkpoints are written every training.save_steps steps");
    resume_dir = all.back();
  } else if (!resume.empty()) {
    resume_dir = resume;
  }
  if (!resume_dir.empty()) check_checkpoint(resume_dir, cfg.model.use_lora);
  Run r(cfg);
  setup(r, resume_dir);
  TrainResult result;
  result.output_dir = out_dir;
  fs::create_directories(out_dir);
  if (!cfg.path.empty() && fs::exists(cfg.path)) write_file_atomic(out_dir / "config.yaml", read_file(cfg.path));
  result.metrics_path = out_dir / "metrics.jsonl";
  result.samples_path = out_dir / "samples.jsonl";
  if (!resume_dir.empty()) {
    keep_records_up_to(result.metrics_path, r.step);
    keep_records_up_to(result.samples_path, r.step);
    if (fs::exists(out_dir / kBestCheckpoint)) {
      const auto b = read_json_file(out_dir / kBestCheckpoint, "train");
      if (b.value("step", int64_t{-1}) <= r.step && fs::exists(out_dir / b.value("checkpoint", std::string("-")))) {
        r.best_reward = b.value("eval/reward_mean", -1e300);
        r.best_step = b.value("step", int64_t{-1});
        r.best_name = b.value("checkpoint", std::string());
      }
    }
  }
  std::ofstream metrics(result.metrics_path, std::ios::app);
  std::ofstream samples_log;
  if (cfg.logging.save_samples) samples_log.open(result.samples_path, std::ios::app);
  // TensorBoard: the original system's tags where they still apply (docs/METRICS.md lists them).
  TensorBoardWriter tb(out_dir / "tensorboard");
  ProgressBar bar(r.total_steps);
  auto write_record = [&](const nlohmann::json& j, int64_t step) {
    metrics << j.dump() << "\n" << std::flush;
    for (const auto& [tag, v] : j.items())
      if (v.is_number() && tag != "step" && tag != "epoch") tb.scalar(tag, v.get<double>(), step);
    tb.flush();
  };
  auto run_eval = [&](const std::vector<PromptRow>& rows, int64_t step, const std::string& what) {
    bar.clear();
    log_info("[eval] {} on {} prompts (greedy)", what, rows.size());
    EvalResult e = evaluate(r.bundle, *r.engine, *r.scorer, rows, cfg, fmt::format("eval-gs{}", step));
    nlohmann::json j = e.summary_json();
    j["type"] = step == 0 ? "baseline_eval" : "eval";
    j["step"] = step;
    write_record(j, step);
    write_eval_rows(out_dir, step, rows, e);
    result.evals.push_back({step, j});
    log_info("[eval] step {}: reward {:.4f}{}, {}/{} scored ({:.1f} s)", step, e.reward_mean,
             e.accuracy >= 0 ? fmt::format(", accuracy {:.1f}%", 100 * e.accuracy) : "", e.scored, e.rows, e.seconds);
    return e;
  };
  auto prune = [&]() {
    auto all = step_checkpoints(out_dir);
    // The best checkpoint by eval reward is kept whatever the limit.
    std::erase_if(all, [&](const fs::path& p) { return !r.best_name.empty() && p.filename() == r.best_name; });
    std::erase_if(all, [](const fs::path& p) { return p.filename().string().rfind("checkpoint-final-", 0) == 0; });
    while (cfg.training.save_total_limit > 0 && static_cast<int64_t>(all.size()) > cfg.training.save_total_limit) {
      remove_tree(all.front());
      all.erase(all.begin());
    }
  };

  if (cfg.training.baseline_eval_batches > 0 && r.step == 0) {
    const auto& src = r.eval_rows.empty() ? r.rows : r.eval_rows;
    const size_t n = std::min(src.size(), static_cast<size_t>(cfg.training.baseline_eval_batches) * cfg.training.batch_size);
    const std::vector<PromptRow> rows(src.begin(), src.begin() + static_cast<std::ptrdiff_t>(n));
    run_eval(rows, 0, fmt::format("baseline ({} set)", r.eval_rows.empty() ? "training" : "eval"));
  }
  const auto t_start = std::chrono::steady_clock::now();
  const int64_t first_step = r.step;
  const auto n_rows = static_cast<int64_t>(r.rows.size());
  while (r.step < r.total_steps) {
    StepMetrics m;
    m.step = r.step + 1;
    // The epoch this batch starts in (the sampler wraps lazily, at the next batch).
    const int64_t start_epoch = r.sampler->index() >= n_rows ? r.sampler->epoch() + 1 : r.sampler->epoch();
    bar.clear();
    std::vector<ScoreSlot> slots;
    std::chrono::steady_clock::time_point gen_start, gen_end;
    std::vector<Sample> samples;
    {
      teacher::ScoringPipeline scoring(*r.scorer);  // the Scorer is the worker's until finish()
      samples = rollout(r, m, hooks, scoring, slots, gen_start, gen_end);
      score(samples, slots, scoring, gen_start, gen_end, m);
    }
    update(r, samples, m);
    ++r.step;
    m.eta_s = seconds_since(t_start) / static_cast<double>(r.step - first_step) * static_cast<double>(r.total_steps - r.step);
    log_step(r, m);
    write_record(m.to_json(), m.step);
    if (samples_log.is_open()) {
      for (const auto& s : samples)
        samples_log << jsonl_line(nlohmann::json{{"step", m.step}, {"row", s.row}, {"group", s.group}, {"sample", s.gen.sample},
                                      {"completion", s.text},
                                      {"reward", s.reward ? nlohmann::json(*s.reward) : nlohmann::json(nullptr)},
                                      {"tokens", s.gen.tokens.size()}});
      samples_log.flush();
    }
    result.steps.push_back(m);
    if (hooks.on_step) hooks.on_step(m);

    // Epoch boundary: the batch used the epoch's last prompt, or ran over into the next epoch.
    int64_t ended_epoch = -1;
    if (r.sampler->index() >= n_rows) ended_epoch = r.sampler->epoch();
    else if (r.sampler->epoch() > start_epoch) ended_epoch = r.sampler->epoch() - 1;
    if (ended_epoch >= 0) {
      const auto ej = epoch_summary(ended_epoch, result.steps);
      metrics << ej.dump() << "\n" << std::flush;
      log_info("[train] epoch {} done: {} steps, mean reward {:.3f}, mean loss {:.4f}", ended_epoch, ej["steps"].get<int64_t>(),
               ej["reward/mean"].get<double>(), ej["loss"].get<double>());
    }

    const bool last = r.step >= r.total_steps;
    bool new_best = false;
    if (!r.eval_rows.empty() && cfg.training.eval_steps > 0 && (r.step % cfg.training.eval_steps == 0 || last)) {
      const EvalResult e = run_eval(r.eval_rows, r.step, fmt::format("step {}", r.step));
      if (e.scored > 0 && e.reward_mean > r.best_reward) {
        r.best_reward = e.reward_mean;
        new_best = true;
      }
    }
    // Checkpoints named as the original system named them: epoch, batch within the epoch, global step.
    const int64_t batch_in_epoch = (r.sampler->index() + cfg.training.batch_size - 1) / cfg.training.batch_size;
    const bool by_steps = cfg.training.save_steps > 0 && r.step % cfg.training.save_steps == 0;
    const bool by_batches = cfg.training.save_every_batches > 0 && batch_in_epoch % cfg.training.save_every_batches == 0;
    const bool by_epochs = cfg.training.save_every_epochs > 0 && ended_epoch >= 0 &&
                           (ended_epoch + 1) % cfg.training.save_every_epochs == 0;
    std::string saved_name;
    if (last) {
      saved_name = fmt::format("checkpoint-final-gs{}", r.total_steps);
      result.final_checkpoint = save_checkpoint(r, out_dir, saved_name);
    } else if (by_steps || by_batches || by_epochs || new_best) {
      saved_name = fmt::format("checkpoint-e{}-b{}-gs{}", r.sampler->epoch(), batch_in_epoch, r.step);
      log_info("[train] checkpoint {}", save_checkpoint(r, out_dir, saved_name).string());
    }
    if (new_best) {
      r.best_step = r.step;
      r.best_name = saved_name;
      const nlohmann::json b = {{"checkpoint", saved_name}, {"step", r.step}, {"eval/reward_mean", r.best_reward},
                                {"eval/accuracy", result.evals.back().second["eval/accuracy"]}};
      write_file_atomic(out_dir / kBestCheckpoint, b.dump(2));
      log_info("[eval] best checkpoint so far: {} (eval reward {:.4f})", saved_name, r.best_reward);
    }
    if (!saved_name.empty()) prune();
    bar.draw(r.step, m.eta_s, m.reward_mean);
  }
  bar.clear();
  if (result.final_checkpoint.empty())  // resumed from the final checkpoint: nothing left to run
    result.final_checkpoint = out_dir / fmt::format("checkpoint-final-gs{}", r.total_steps);
  if (!r.best_name.empty()) result.best_checkpoint = out_dir / r.best_name;
  return result;
}

}  // namespace rlaif
