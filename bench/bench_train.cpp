// End-to-end RL step benchmark (issue 7): LoRA on a model folder (the random-weight Qwen2.5-3B shape that
// bench/hf_generate.py saves), P prompts x S samples: rollout with rlaif's Engine (real generation), local
// programmatic scoring in C++, then the update (advantages -> PPO-clip + k3 KL to the adapters-off model ->
// backward -> clip -> AdamW). Reports the step time split, training tokens/s and peak GPU memory as JSON; the
// baseline of the training part is bench/hf_train_step.py (transformers + peft, same loss, same shapes).
// Usage: bench_train --model DIR [--device cuda|cpu] [--prompts 8] [--samples 8] [--new 512] [--out FILE.json]
//        [--micro-batch 4] [--checkpointing] [--attention auto|eager|sdpa] [--full-head] [--no-fused-lora]
//        [--eager-norm] [--phase-times]
// --attention eager, --full-head, --no-fused-lora and --eager-norm undo the training speed-ups one by one (A/B).
#include <c10/core/CachingDeviceAllocator.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <random>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "engine/engine.h"
#include "models/gguf_model.h"
#include "models/lora.h"
#include "train/advantages.h"
#include "train/batch.h"
#include "train/losses.h"
#include "train/optim.h"

using namespace rlaif;

namespace {

struct Options {
  std::string model_dir, device = "cuda", dtype = "bf16", out, attention = "auto";
  int64_t prompts = 8, samples = 8, prompt_len = 128, new_tokens = 512, micro_batch = 4, steps = 3, lora_r = 16;
  double lr = 1e-5, kl_beta = 0.05;
  bool checkpointing = false, no_autocast = false, full_head = false, no_fused_lora = false, phase_times = false;
  bool eager_norm = false, lora_shrink_kernel = false, tuned_gemm = false;
  int lora_expand_rows = 8;
  bool lora_expand_simt = false, lora_norm_fusion = false;
};

constexpr int64_t kChunkRows = 1024;  // token_logprobs' default LM-head chunk

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

void sync(const at::Device& d) {
  if (d.is_cuda()) at::empty({1}, at::TensorOptions().device(d)).cpu();  // forces a device sync
}

// Peak bytes the CUDA caching allocator handed out since the last reset (0 on CPU). Through c10's
// device-allocator interface, so this file compiles in CPU-only builds too.
int64_t peak_bytes(const at::Device& d, bool reset) {
  if (!d.is_cuda()) return 0;
  auto* alloc = c10::getDeviceAllocator(d.type());
  const c10::DeviceIndex idx = d.has_index() ? d.index() : 0;
  const int64_t peak = alloc->getDeviceStats(idx).allocated_bytes[0].peak;  // [0]: all pools together
  if (reset) alloc->resetPeakStats(idx);
  return peak;
}

// The "local scoring" of the benchmark: a cheap programmatic reward with within-group variance (share of
// even token ids, a stand-in for a regex/format check), so the cost is the host-side pass over the tokens.
double local_reward(const std::vector<int32_t>& tokens) {
  if (tokens.empty()) return 0;
  const auto even = std::count_if(tokens.begin(), tokens.end(), [](int32_t t) { return t % 2 == 0; });
  return static_cast<double>(even) / static_cast<double>(tokens.size());
}

struct StepTimes {
  double gen_s = 0, score_s = 0, train_s = 0;
  int64_t generated = 0, loss_tokens = 0, forward_tokens = 0;
  int64_t peak_gen = 0, peak_train = 0;
  double loss = 0, grad_norm = 0;
  // --phase-times: the training time split (each phase ends with a device sync, which perturbs the total a little)
  double policy_fwd_s = 0, ref_fwd_s = 0, backward_s = 0, optim_s = 0;
};

class Bench {
 public:
  explicit Bench(const Options& o)
      : o_(o), dev_(o.device == "cuda" ? at::Device(at::kCUDA, 0) : at::Device(at::kCPU)) {
    model_ = load_model(o.model_dir, {parse_torch_dtype(o.dtype), dev_});
    LoraConfig lc;
    lc.r = o.lora_r;
    lc.alpha = 2.0 * o.lora_r;
    attach_lora(*model_, lc, 0);
    model_->set_gradient_checkpointing(o.checkpointing);
    model_->set_attention(parse_attention_kernel(o.attention, "--attention"));
    model_->set_fused_lora(!o.no_fused_lora);
    model_->set_norm(o.eager_norm ? NormKernel::kEager : NormKernel::kAuto);
    opt_ = std::make_unique<train::AdamW>(lora_parameters(*model_), train::AdamWOptions{});
    EngineOptions eo;
    eo.max_batch = o.prompts * o.samples;  // eos_ids empty: every sample runs its full --new tokens
    eo.lora_shrink_in_gemm = !o.lora_shrink_kernel;
    eo.tuned_gemm = o.tuned_gemm;
    eo.lora_expand_rows = o.lora_expand_rows;
    eo.lora_expand_mma = !o.lora_expand_simt;
    eo.lora_norm_fusion = o.lora_norm_fusion;
    engine_ = std::make_unique<Engine>(model_, eo);
    std::mt19937 g(0);
    std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(model_->config().vocab_size - 1));
    reqs_.resize(o.prompts);
    for (auto& r : reqs_) {
      r.prompt.resize(o.prompt_len);
      for (auto& t : r.prompt) t = tok(g);
      r.num_samples = o.samples;
      r.params.temperature = 1.0;
      r.params.max_new_tokens = o.new_tokens;
    }
  }

  StepTimes step(uint64_t seed) {
    StepTimes st;
    for (auto& r : reqs_) r.params.seed = seed;
    sync(dev_);
    peak_bytes(dev_, true);
    double t0 = now();
    model_->set_training(false);
    const auto gens = engine_->generate(reqs_);
    sync(dev_);
    st.gen_s = now() - t0;
    st.peak_gen = peak_bytes(dev_, true);
    for (const auto& s : gens) st.generated += static_cast<int64_t>(s.tokens.size());

    t0 = now();
    std::vector<double> rewards;
    std::vector<int64_t> groups;
    for (const auto& s : gens) rewards.push_back(local_reward(s.tokens)), groups.push_back(s.request);
    st.score_s = now() - t0;

    t0 = now();
    update(gens, rewards, groups, st);
    sync(dev_);
    st.train_s = now() - t0;
    st.peak_train = peak_bytes(dev_, true);
    return st;
  }

  const Engine& engine() const { return *engine_; }

 private:
  // The loop's update (rl/loop.cpp): group advantages, micro-batches sharing one loss denominator, PPO-clip with
  // the sampler's log-probs, k3 KL to the adapters-off model, one AdamW step.
  void update(const std::vector<GeneratedSample>& gens, const std::vector<double>& rewards,
              const std::vector<int64_t>& groups, StepTimes& st) {
    const train::AdvantageResult adv = train::compute_advantages(rewards, groups, {});
    std::vector<int64_t> kept;
    for (size_t i = 0; i < gens.size(); ++i)
      if (adv.keep[i]) kept.push_back(static_cast<int64_t>(i));
    const auto pack = [&](int64_t from, int64_t n) {
      std::vector<train::SequenceView> views;
      for (int64_t k = from; k < from + n; ++k) {
        const auto& s = gens[kept[k]];
        views.push_back({&reqs_[s.request].prompt, &s.tokens, &s.logprobs});
      }
      return train::pack_sequences(views, 0, dev_);
    };
    train::LossOptions lo;
    lo.kl_beta = o_.kl_beta;
    const int64_t n = static_cast<int64_t>(kept.size());
    const double denom = train::loss_denominator(pack(0, n).completion_mask, lo);  // one for all micro-batches
    model_->set_training(true);
    // Phase clock for --phase-times: adds the time since the last mark to `acc` (after a device sync).
    double mark = now();
    const auto phase = [&](double& acc) {
      if (!o_.phase_times) return;
      sync(dev_);
      const double t = now();
      acc += t - mark;
      mark = t;
    };
    for (int64_t s = 0; s < n; s += o_.micro_batch) {
      const int64_t m = std::min(o_.micro_batch, n - s);
      const train::PackedBatch p = pack(s, m);
      train::LossInputs in;
      {
        // The LM head runs on the completion positions only (the loss never reads the prompt's log-probs).
        const at::Tensor scored = o_.full_head ? at::Tensor() : p.completion_mask;
        AutocastScope ac(dev_.type(), at::kBFloat16, !o_.no_autocast);
        phase(st.optim_s);  // packing: counted with the optimizer's bookkeeping
        in.new_logprobs = model_->token_logprobs(p.tokens, p.attention_mask, p.targets, kChunkRows, scored);
        phase(st.policy_fwd_s);
        if (lo.kl_beta > 0) {
          at::NoGradGuard ng;
          AdaptersOff off(*model_);
          in.ref_logprobs = model_->token_logprobs(p.tokens, p.attention_mask, p.targets, kChunkRows, scored);
        }
        phase(st.ref_fwd_s);
      }
      in.sampler_logprobs = p.sampler_logprobs;
      std::vector<float> a;
      for (int64_t k = s; k < s + m; ++k) a.push_back(static_cast<float>(adv.advantages[kept[k]]));
      in.advantages = at::tensor(a).to(dev_);
      in.mask = p.completion_mask;
      const train::LossResult r = train::policy_loss(in, lo, denom);
      r.loss.backward();
      phase(st.backward_s);
      st.loss += r.loss.item<double>();
      st.loss_tokens += r.tokens;
      st.forward_tokens += p.attention_mask.sum().item<int64_t>();
    }
    model_->set_training(false);
    st.grad_norm = train::clip_grad_norm(opt_->params(), 1.0);
    opt_->step(o_.lr);
    opt_->zero_grad();
    phase(st.optim_s);
  }

  Options o_;
  at::Device dev_;
  std::shared_ptr<DecoderModel> model_;
  std::unique_ptr<train::AdamW> opt_;
  std::unique_ptr<Engine> engine_;
  std::vector<GenerationRequest> reqs_;
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"rlaif RL-step benchmark (LoRA): generation / scoring / training"};
  Options o;
  app.add_option("--model", o.model_dir, "HF folder or .gguf")->required();
  app.add_option("--out", o.out, "JSON results file");
  app.add_option("--device", o.device, "cuda or cpu");
  app.add_option("--dtype", o.dtype, "weights dtype (bf16, fp32)");
  app.add_option("--prompts", o.prompts);
  app.add_option("--samples", o.samples, "samples per prompt");
  app.add_option("--prompt-len", o.prompt_len);
  app.add_option("--new", o.new_tokens, "new tokens per sample (no EOS: every sample runs to this length)");
  app.add_option("--micro-batch", o.micro_batch, "sequences per forward/backward (gradient accumulation)");
  app.add_option("--steps", o.steps, "timed steps after one warm-up step");
  app.add_option("--lora-r", o.lora_r);
  app.add_option("--kl-beta", o.kl_beta, "0: no reference forward");
  app.add_flag("--checkpointing", o.checkpointing, "gradient checkpointing");
  app.add_flag("--no-autocast", o.no_autocast, "train forward in the weights' dtype (no bf16 autocast)");
  app.add_option("--attention", o.attention, "training attention: auto (sdpa on CUDA), eager, sdpa");
  app.add_flag("--full-head", o.full_head, "LM head on every position, not only the completion's");
  app.add_flag("--no-fused-lora", o.no_fused_lora, "LoRA through PEFT's op sequence (layers::project)");
  app.add_flag("--lora-shrink-kernel", o.lora_shrink_kernel,
               "the engine's LoRA x·Aᵀ by its own shrink launch, not as extra columns of the base GEMMs");
  app.add_flag("--tuned-gemm", o.tuned_gemm, "the engine's GEMMs through timed cuBLASLt algorithms");
  app.add_option("--lora-expand-rows", o.lora_expand_rows, "rows a CUDA LoRA expand block serves (EngineOptions)")
      ->check(CLI::IsMember({4, 8}));
  app.add_flag("--lora-expand-simt", o.lora_expand_simt, "the engine's batched LoRA expands on the SIMT kernels");
  app.add_flag("--lora-norm-fusion", o.lora_norm_fusion, "the engine's o/down LoRA updates in the next RMSNorm");
  app.add_flag("--eager-norm", o.eager_norm, "RMSNorm through transformers' op sequence (not the fused kernel)");
  app.add_flag("--phase-times", o.phase_times, "split the training time (policy forward / reference forward / "
               "backward / optimizer; syncs after each)");
  CLI11_PARSE(app, argc, argv);

  Bench bench(o);
  bench.step(1);  // warm-up: allocator, kernels, CUDA graphs
  nlohmann::json steps = nlohmann::json::array();
  StepTimes sum;
  for (int64_t i = 0; i < o.steps; ++i) {
    const StepTimes st = bench.step(2 + i);
    const double total = st.gen_s + st.score_s + st.train_s;
    std::printf("step %ld: %.2f s = gen %.2f s (%.0f%%) + score %.4f s + train %.2f s | gen %.0f tok/s, train %.0f "
                "tok/s (loss tokens) | peak GPU gen %.2f GB, train %.2f GB\n",
                static_cast<long>(i), total, st.gen_s, 100 * st.gen_s / total, st.score_s, st.train_s,
                st.generated / st.gen_s, st.loss_tokens / st.train_s, st.peak_gen / 1e9, st.peak_train / 1e9);
    steps.push_back({{"generate_s", st.gen_s}, {"score_s", st.score_s}, {"train_s", st.train_s},
                     {"generated_tokens", st.generated}, {"loss_tokens", st.loss_tokens},
                     {"forward_tokens", st.forward_tokens}, {"peak_gpu_bytes_generate", st.peak_gen},
                     {"peak_gpu_bytes_train", st.peak_train}, {"loss", st.loss}, {"grad_norm", st.grad_norm}});
    if (o.phase_times) {
      steps.back()["phases_s"] = {{"policy_forward", st.policy_fwd_s}, {"reference_forward", st.ref_fwd_s},
                                  {"backward", st.backward_s}, {"optimizer_and_packing", st.optim_s}};
      std::printf("  train split: policy forward %.3f s, reference forward %.3f s, backward %.3f s, optimizer and "
                  "packing %.3f s\n", st.policy_fwd_s, st.ref_fwd_s, st.backward_s, st.optim_s);
    }
    sum.gen_s += st.gen_s, sum.score_s += st.score_s, sum.train_s += st.train_s;
    sum.generated += st.generated, sum.loss_tokens += st.loss_tokens, sum.forward_tokens += st.forward_tokens;
    sum.peak_gen = std::max(sum.peak_gen, st.peak_gen), sum.peak_train = std::max(sum.peak_train, st.peak_train);
  }
  const double total = sum.gen_s + sum.score_s + sum.train_s;
  nlohmann::json summary = {
      {"impl", "rlaif"}, {"model", o.model_dir}, {"device", o.device}, {"backend", bench.engine().backend()},
      {"prompts", o.prompts}, {"samples", o.samples}, {"prompt_len", o.prompt_len}, {"new_tokens", o.new_tokens},
      {"micro_batch", o.micro_batch}, {"lora_r", o.lora_r}, {"kl_beta", o.kl_beta}, {"autocast_bf16", !o.no_autocast},
      {"gradient_checkpointing", o.checkpointing}, {"attention", o.attention},
      {"lm_head_rows", o.full_head ? "all" : "completion"}, {"fused_lora", !o.no_fused_lora},
      {"fused_rms_norm", !o.eager_norm && o.device == "cuda"}, {"lora_shrink_in_gemm", !o.lora_shrink_kernel},
      {"tuned_gemm", o.tuned_gemm}, {"lora_expand_rows", o.lora_expand_rows},
      {"lora_expand_mma", !o.lora_expand_simt}, {"lora_norm_fusion", o.lora_norm_fusion}, {"steps", o.steps},
      {"step_s", total / o.steps}, {"generate_s", sum.gen_s / o.steps}, {"score_s", sum.score_s / o.steps},
      {"train_s", sum.train_s / o.steps}, {"generate_fraction", sum.gen_s / total},
      {"score_fraction", sum.score_s / total}, {"train_fraction", sum.train_s / total},
      {"generate_tokens_per_s", sum.generated / sum.gen_s},
      {"train_tokens_per_s", sum.loss_tokens / sum.train_s},
      {"train_forward_tokens_per_s", sum.forward_tokens / sum.train_s},
      {"peak_gpu_bytes_generate", sum.peak_gen}, {"peak_gpu_bytes_train", sum.peak_train}, {"per_step", steps}};
  std::printf("%s\n", summary.dump(1).c_str());
  if (!o.out.empty()) std::ofstream(o.out) << summary.dump(1);
  return 0;
}
