// Generation engine against transformers: greedy generate token for token (64 new tokens, prompts of different
// lengths batched together, with and without prefix sharing), engine log-probs against the training forward's,
// continuous batching with more requests than batch slots, seeds, and live weight updates.
#include <gtest/gtest.h>

#include <cstdlib>
#include <nlohmann/json.hpp>

#include "core/io.h"
#include "engine/engine.h"
#include "models/lora.h"
#include "models/quantized_model.h"
#include "model_test.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace rlaif;

namespace {

struct Case {
  std::vector<int32_t> prompt, tokens;
};

std::vector<Case> greedy_cases(const fs::path& dir) {
  std::vector<Case> out;
  for (const auto& c : nlohmann::json::parse(read_file(dir / "expected_greedy.json")))
    out.push_back({c["prompt"].get<std::vector<int32_t>>(), c["tokens"].get<std::vector<int32_t>>()});
  return out;
}

// Every projection kind on the few-row GEMVs up to their 8 rows (the defaults send some kinds to cuBLAS), so
// that the tests below cover each fused kernel of the decode step.
EngineOptions every_few_row() {
  EngineOptions o;
  o.few_row_rows = {8, 8, 8, 8};
  return o;
}

// LoRA's x·Aᵀ by the shrink kernel (or ATen on the CPU), not out of the base GEMMs (the default since session 10).
EngineOptions shrink_kernel(EngineOptions o = {}) {
  o.lora_shrink_in_gemm = false;
  return o;
}

// The o and down updates added to h by the next RMSNorm's launch (kernels::lora_expand_rms_norm), not their own.
EngineOptions norm_fusion() {
  EngineOptions o;
  o.lora_norm_fusion = true;
  return o;
}

class EngineParity : public ::testing::TestWithParam<std::tuple<const char*, bool>> {};

// |engine log-prob − training forward log-prob| over every generated token: the trainer's view is one row
// [prompt + tokens], log p of each generated token given its prefix.
struct LogprobGap {
  double mean = 0, max = 0;
  int64_t tokens = 0;
};

LogprobGap engine_vs_trainer(const DecoderModel& model, const std::vector<GenerationRequest>& reqs,
                             const std::vector<GeneratedSample>& out) {
  at::NoGradGuard ng;  // adapters may require grad; the comparison needs no graph
  double sum = 0;
  LogprobGap g;
  for (const auto& s : out) {
    const auto& prompt = reqs[s.request].prompt;
    std::vector<int64_t> ids(prompt.begin(), prompt.end());
    ids.insert(ids.end(), s.tokens.begin(), s.tokens.end());
    const at::Tensor t = at::tensor(ids, at::kLong).view({1, -1});
    const at::Tensor lp = model.token_logprobs(t, at::ones_like(t), at::roll(t, -1, 1)).cpu();
    for (size_t j = 0; j < s.tokens.size(); ++j) {
      const double d = std::abs(lp[0][prompt.size() - 1 + j].item<double>() - s.logprobs[j]);
      sum += d;
      g.max = std::max(g.max, d);
      ++g.tokens;
    }
  }
  g.mean = sum / g.tokens;
  return g;
}

TEST_P(EngineParity, GreedyEqualsTransformersGenerate) {
  const auto [name, share] = GetParam();
  const fs::path dir = test::reference_dir() / name;
  auto model = DecoderModel::load(dir, {at::kFloat, test::test_device()});
  EngineOptions opt;
  opt.share_prefix = share;
  opt.block_size = 8;  // prompts and outputs cross several blocks
  Engine engine(model, opt);
  const auto cases = greedy_cases(dir);
  std::vector<GenerationRequest> reqs;
  for (const auto& c : cases) {
    GenerationRequest r;
    r.prompt = c.prompt;
    r.num_samples = 2;  // both samples of a greedy request must be identical (forked prefix, own tails)
    r.params.temperature = 0;
    r.params.max_new_tokens = 64;
    reqs.push_back(r);
  }
  auto out = engine.generate(reqs);
  ASSERT_EQ(out.size(), cases.size() * 2);
  for (size_t i = 0; i < out.size(); ++i) {
    EXPECT_EQ(out[i].tokens, cases[out[i].request].tokens) << name << " request " << out[i].request << " sample "
                                                             << out[i].sample;
    EXPECT_EQ(out[i].finish_reason, "length");
  }
}

INSTANTIATE_TEST_SUITE_P(TinyModels, EngineParity, ::testing::Combine(::testing::ValuesIn(test::kTinyModels), ::testing::Bool()),
                         [](const auto& info) {
                           return std::string(std::get<0>(info.param)) +
                                  (std::get<1>(info.param) ? "_shared_prefix" : "_no_sharing");
                         });

TEST(Engine, LogprobsEqualTrainingForward) {
  const fs::path dir = test::reference_dir() / "llama3_gqa";
  auto model = DecoderModel::load(dir, {at::kFloat, test::test_device()});
  Engine engine(model, {});
  std::vector<GenerationRequest> reqs(3);
  for (int i = 0; i < 3; ++i) {
    reqs[i].prompt = {static_cast<int32_t>(10 + i), 20, 30, static_cast<int32_t>(40 + 7 * i)};
    reqs[i].prompt.resize(4 + 3 * i, 7);
    reqs[i].num_samples = 3;
    reqs[i].params.temperature = 1.0;
    reqs[i].params.max_new_tokens = 24;
    reqs[i].params.seed = 5;
  }
  auto out = engine.generate(reqs);
  // Temperature 1 with no filters: the processed distribution is the raw one.
  for (const auto& s : out)
    for (size_t j = 0; j < s.tokens.size(); ++j) EXPECT_NEAR(s.logprobs[j], s.processed_logprobs[j], 1e-5);
  const LogprobGap g = engine_vs_trainer(*model, reqs, out);
  std::printf("[engine fp32 %s] engine vs training-forward log-probs over %ld tokens: mean abs %.2e, max %.2e\n",
              test::test_device().str().c_str(), static_cast<long>(g.tokens), g.mean, g.max);
  EXPECT_LE(g.mean, 1e-5);
}

// LoRA on every projection (B randomised so the update is not zero): the engine's decode (on CUDA: the few-row
// GEMVs and the LoRA shrink/expand kernels; on the CPU: ATen) gives the training forward's log-probs, at a batch
// of 6 rows (the few-row path) and of 16 (cuBLAS + LoRA kernels); also with x·Aᵀ out of the base GEMMs
// (lora_shrink_in_gemm: the expand kernels or their CPU references take it), and with the o and down updates
// carried into the next RMSNorm (lora_norm_fusion).
TEST(Engine, LoraLogprobsEqualTrainingForward) {
  const fs::path dir = test::reference_dir() / "qwen2_untied";
  auto model = DecoderModel::load(dir, {at::kFloat, test::test_device()});
  attach_lora(*model, LoraConfig{8, 16, 0.0}, 11);
  {
    at::NoGradGuard ng;
    at::manual_seed(3);
    for (auto& [name, t] : lora_parameters(*model))
      if (name.find("lora_B") != std::string::npos) t.copy_(at::randn(t.sizes()) * 0.05);
  }
  // The shrink kernel first; x·Aᵀ as extra columns of the base GEMMs (pack_lora_rows, the default) last: it moves
  // the weights.
  for (const auto& [requests, opt] :
       {std::pair{int64_t{2}, shrink_kernel()}, std::pair{int64_t{2}, shrink_kernel(every_few_row())},
        std::pair{int64_t{4}, shrink_kernel()}, std::pair{int64_t{4}, EngineOptions{}},
        std::pair{int64_t{2}, EngineOptions{}}, std::pair{int64_t{4}, norm_fusion()}}) {
    Engine engine(model, opt);
    std::vector<GenerationRequest> reqs(requests);
    for (int64_t i = 0; i < requests; ++i) {
      reqs[i].prompt = {static_cast<int32_t>(5 + i), 17, 33, 2, static_cast<int32_t>(60 + i)};
      reqs[i].num_samples = requests == 2 ? 3 : 4;
      reqs[i].params.temperature = 1.0;
      reqs[i].params.max_new_tokens = 16;
      reqs[i].params.seed = 9;
    }
    const LogprobGap g = engine_vs_trainer(*model, reqs, engine.generate(reqs));
    std::printf("[engine lora%s%s fp32 %s] %ld rows: engine vs training forward over %ld tokens: mean abs %.2e, "
                "max %.2e\n",
                opt.lora_shrink_in_gemm ? " shrink-in-gemm" : "", opt.lora_norm_fusion ? " norm-fused" : "",
                test::test_device().str().c_str(),
                static_cast<long>(requests == 2 ? 6 : 16),
                static_cast<long>(g.tokens), g.mean, g.max);
    EXPECT_LE(g.mean, 1e-5) << requests << " requests";
  }
}

// Quantized weights (q8 in groups of 16: every projection; q4 in groups of 32: all but down, whose 112 inputs the
// group does not divide): the engine's decode (on CUDA the quantized few-row kernels at 6 rows, dequantize + cuBLAS
// at 16) gives the training forward's log-probs on the same quantized model.
TEST(Engine, QuantizedLogprobsEqualTrainingForward) {
  const fs::path dir = test::reference_dir() / "qwen2_untied";
  for (const auto& [bits, group, pack] : {std::tuple{int64_t{8}, int64_t{16}, false}, std::tuple{int64_t{4}, int64_t{32}, false},
                                          std::tuple{int64_t{4}, int64_t{32}, true}}) {
    auto model = DecoderModel::load(dir, {at::kFloat, test::test_device()});
    quantize_model_weights(model->weights(), model->config(), QuantSpec{bits, group}, at::kFloat);
    const LayerWeights& L0 = model->weights().layers[0];
    ASSERT_TRUE(L0.quant[static_cast<int>(Proj::kQ)].defined());
    // Packed q/k/v and gate/up words (what quantize_model_weights does on the GPU): 16 rows run one quantized GEMM
    // a group. On the CPU the unpacked passes run one per projection.
    if (pack) {
      pack_projection_groups(model->weights());
      ASSERT_TRUE(packed_quant({&L0.quant[static_cast<int>(Proj::kQ)], &L0.quant[static_cast<int>(Proj::kK)],
                                &L0.quant[static_cast<int>(Proj::kV)]}).defined());
      ASSERT_TRUE(packed_quant({&L0.quant[static_cast<int>(Proj::kGate)], &L0.quant[static_cast<int>(Proj::kUp)]})
                      .defined());
    }
    for (int64_t requests : {2, 4}) {
      Engine engine(model, EngineOptions{});
      std::vector<GenerationRequest> reqs(requests);
      for (int64_t i = 0; i < requests; ++i) {
        reqs[i].prompt = {static_cast<int32_t>(7 + i), 21, 3, static_cast<int32_t>(40 + i)};
        reqs[i].num_samples = requests == 2 ? 3 : 4;
        reqs[i].params.temperature = 1.0;
        reqs[i].params.max_new_tokens = 16;
        reqs[i].params.seed = 5;
      }
      const LogprobGap g = engine_vs_trainer(*model, reqs, engine.generate(reqs));
      std::printf("[engine q%ld%s fp32 %s] %ld rows: engine vs training forward over %ld tokens: mean abs %.2e, max "
                  "%.2e\n", static_cast<long>(bits), pack ? " packed" : "", test::test_device().str().c_str(),
                  static_cast<long>(requests == 2 ? 6 : 16), static_cast<long>(g.tokens), g.mean, g.max);
      EXPECT_LE(g.mean, 1e-5) << "q" << bits << ", " << requests << " requests";
    }
  }
}

// `n` prompts of 4 tokens, 4 samples each at temperature 1: the bf16 GPU checks' workload.
std::vector<GenerationRequest> sampled_requests(int n, int64_t max_new_tokens, uint64_t seed) {
  std::vector<GenerationRequest> reqs(n);
  for (int i = 0; i < n; ++i) {
    reqs[i].prompt = {static_cast<int32_t>(3 + i), 9, 27, 81};
    reqs[i].num_samples = 4;
    reqs[i].params.temperature = 1.0;
    reqs[i].params.max_new_tokens = max_new_tokens;
    reqs[i].params.seed = seed;
  }
  return reqs;
}

TEST(Engine, Bf16LogprobsAgainstTrainingForwardOnGpu) {
  if (test::test_device().is_cpu()) GTEST_SKIP() << "the bf16 figure is measured on the GPU (RLAIF_TEST_DEVICE=cuda)";
  const fs::path dir = test::reference_dir() / "qwen2_untied";
  auto model = DecoderModel::load(dir, {at::kBFloat16, test::test_device()});
  // 16 rows decode through cuBLAS; 8 rows through the few-row GEMVs with the RMSNorm fused in (every_few_row) and
  // through the default mix of GEMVs and cuBLAS.
  EngineOptions tuned;  // the GEMMs through timed cuBLASLt algorithms
  tuned.tuned_gemm = true;
  for (const auto& [requests, opt] : {std::pair{4, EngineOptions{}}, std::pair{2, every_few_row()},
                                      std::pair{2, EngineOptions{}}, std::pair{4, tuned}}) {
    Engine engine(model, opt);
    const std::vector<GenerationRequest> reqs = sampled_requests(requests, 32, 3);
    const LogprobGap g = engine_vs_trainer(*model, reqs, engine.generate(reqs));
    // Both paths round to bf16 at every matmul, but in different kernels and orders (paged split-K attention vs
    // dense eager attention): differences of a few bf16 ulps of the logits are expected, not 1e-5.
    std::printf("[engine bf16 %s%s] %d rows: engine (fused kernels, CUDA graphs) vs training forward over %ld tokens: "
                "mean abs %.2e, max %.2e\n",
                test::test_device().str().c_str(), opt.tuned_gemm ? ", tuned GEMMs" : "", requests * 4,
                static_cast<long>(g.tokens), g.mean, g.max);
    EXPECT_LE(g.mean, 5e-2) << requests * 4 << " rows";
  }
}

// bf16 weights with float32 LoRA adapters at 16 rows: the shrink kernel (x·Aᵀ in float32) and x·Aᵀ out of the base
// GEMM (lora_shrink_in_gemm: rounded to bf16, as the training forward's autocast rounds it) both stay within bf16's
// error of the training forward (its expands on tensor cores, EngineOptions::lora_expand_mma), and so do an engine
// whose graphs were captured before the weights moved, one whose expands run on the SIMT kernels and one that adds
// the o and down updates in the next RMSNorm's launch (EngineOptions::lora_norm_fusion).
TEST(Engine, Bf16LoraShrinkKernelAndInGemmOnGpu) {
  if (test::test_device().is_cpu()) GTEST_SKIP() << "the bf16 figure is measured on the GPU (RLAIF_TEST_DEVICE=cuda)";
  auto model = DecoderModel::load(test::reference_dir() / "qwen2_untied", {at::kBFloat16, test::test_device()});
  attach_lora(*model, LoraConfig{8, 16, 0.0}, 5);
  {
    at::NoGradGuard ng;
    at::manual_seed(4);
    for (auto& [name, t] : lora_parameters(*model))
      if (name.find("lora_B") != std::string::npos) t.copy_(at::randn(t.sizes()) * 0.05);
  }
  EngineOptions simt;  // the expands on the SIMT kernels (the default: tensor cores, t in bf16 from the GEMM)
  simt.lora_expand_mma = false;
  Engine plain(model, shrink_kernel()), packing(model, EngineOptions{}), simt_expand(model, simt),
      fused(model, norm_fusion());
  const std::vector<GenerationRequest> reqs = sampled_requests(4, 32, 7);
  // The plain engine captures its graphs first; the packing one then moves the weights ([W; A]); the plain one's
  // next call must notice and capture again rather than replay the old addresses.
  for (auto [engine, name] : {std::pair{&plain, "shrink kernel"}, std::pair{&packing, "shrink in the GEMM"},
                              std::pair{&plain, "shrink kernel, after the weights moved"},
                              std::pair{&simt_expand, "shrink in the GEMM, SIMT expands"},
                              std::pair{&fused, "shrink in the GEMM, o/down updates in the next norm"}}) {
    const LogprobGap g = engine_vs_trainer(*model, reqs, engine->generate(reqs));
    std::printf("[engine lora bf16 %s, %s] 16 rows: engine vs training forward over %ld tokens: mean abs %.2e, "
                "max %.2e\n",
                test::test_device().str().c_str(), name, static_cast<long>(g.tokens), g.mean, g.max);
    EXPECT_LE(g.mean, 5e-2) << name;
  }
}

// The tensor-core paged attention (bf16, head dim 64 here) inside the engine: 64 rows decoding up to 100 tokens
// give a grid of 64 sequences × 2 KV heads × 4 partitions, where the engine takes it; the SIMT kernel on the same
// requests is the comparison. Both stay within bf16's error of the training forward.
TEST(Engine, Bf16TensorCoreAttentionAgainstTrainingForwardOnGpu) {
  if (test::test_device().is_cpu()) GTEST_SKIP() << "the tensor-core attention runs on the GPU (RLAIF_TEST_DEVICE=cuda)";
  const fs::path dir = test::reference_dir() / "qwen2_hd64";
  auto model = DecoderModel::load(dir, {at::kBFloat16, test::test_device()});
  const kernels::AttentionKernel before = kernels::attention_kernel();
  for (kernels::AttentionKernel k : {kernels::AttentionKernel::kTensorCore, kernels::AttentionKernel::kSimt}) {
    kernels::set_attention_kernel(k);
    Engine engine(model, EngineOptions{});
    const std::vector<GenerationRequest> reqs = sampled_requests(16, 96, 5);
    const LogprobGap g = engine_vs_trainer(*model, reqs, engine.generate(reqs));
    const char* name = k == kernels::AttentionKernel::kSimt ? "simt" : "tensor-core";
    std::printf("[engine bf16 %s, %s attention] 64 rows: engine vs training forward over %ld tokens: mean abs %.2e, "
                "max %.2e\n", test::test_device().str().c_str(), name, static_cast<long>(g.tokens), g.mean, g.max);
    EXPECT_LE(g.mean, 5e-2) << name;
  }
  kernels::set_attention_kernel(before);
}

TEST(Engine, ContinuousBatchingMatchesRunningAlone) {
  const fs::path dir = test::reference_dir() / "qwen2_untied";
  auto model = DecoderModel::load(dir, {at::kFloat, test::test_device()});
  EngineOptions small;
  small.max_batch = 3;  // 10 requests × 1 sample through 3 slots: sequences finish and others join
  small.block_size = 4;
  std::vector<GenerationRequest> reqs(10);
  for (int i = 0; i < 10; ++i) {
    reqs[i].prompt.assign(2 + i % 4, static_cast<int32_t>(3 + i));
    reqs[i].prompt.push_back(100 + i);
    reqs[i].params.temperature = 0.8;
    reqs[i].params.top_k = 50;
    reqs[i].params.seed = 11;
    reqs[i].params.max_new_tokens = 5 + 3 * (i % 5);
  }
  Engine batched(model, small);
  // on_finish reports each sample once, as it finishes (shortest first here), with its final contents.
  std::vector<GeneratedSample> finished;
  GenerateCallbacks cb;
  cb.on_finish = [&](const GeneratedSample& g) { finished.push_back(g); };
  auto together = batched.generate(reqs, cb);
  ASSERT_EQ(finished.size(), together.size());
  for (const auto& f : finished) {
    EXPECT_EQ(f.tokens, together[f.request].tokens) << "request " << f.request;
    EXPECT_EQ(f.finish_reason, "length");
  }
  EXPECT_LT(finished.front().tokens.size(), finished.back().tokens.size()) << "short samples are reported first";
  for (int i = 0; i < 10; ++i) {
    Engine alone(model, {});
    auto one = alone.generate({reqs[i]});
    // Request index seeds the stream, so run alone it must be request i again: pad with dummies before it.
    std::vector<GenerationRequest> padded(i + 1, reqs[i]);
    for (auto& p : padded) p.params.max_new_tokens = 1;
    padded[i] = reqs[i];
    auto again = alone.generate(padded);
    EXPECT_EQ(together[i].tokens, again[i].tokens) << "request " << i;
    EXPECT_EQ(together[i].tokens.size(), static_cast<size_t>(reqs[i].params.max_new_tokens));
  }
}

TEST(Engine, SeedReproducesAndPrefixSharingDoesNotChangeSamples) {
  const fs::path dir = test::reference_dir() / "llama_bias_tied";
  auto model = DecoderModel::load(dir, {at::kFloat, test::test_device()});
  GenerationRequest r;
  r.prompt = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11};
  r.num_samples = 4;
  r.params.temperature = 1.2;
  r.params.top_p = 0.9;
  r.params.max_new_tokens = 20;
  r.params.seed = 1234;
  EngineOptions shared, unshared;
  unshared.share_prefix = false;
  auto a = Engine(model, shared).generate({r});
  auto b = Engine(model, shared).generate({r});
  auto c = Engine(model, unshared).generate({r});
  for (int k = 0; k < 4; ++k) {
    EXPECT_EQ(a[k].tokens, b[k].tokens);
    EXPECT_EQ(a[k].tokens, c[k].tokens);
  }
  EXPECT_NE(a[0].tokens, a[1].tokens) << "samples of one prompt must differ";
  r.params.seed = 99;
  auto d = Engine(model, shared).generate({r});
  EXPECT_NE(a[0].tokens, d[0].tokens);
}

// Programmatic dependent launch changes when the decode kernels start, not what they compute: the same tokens
// and bit-equal log-probs, in fp32 and bf16, at 1, 3 and 8 rows (the few-row path with every fused kernel).
TEST(Engine, ProgrammaticLaunchGivesTheSameSamples) {
  if (!test::test_device().is_cuda()) GTEST_SKIP() << "programmatic dependent launch is a CUDA feature";
  // Plain and q4 weights (the quantized few-row projections take the launch too).
  for (const bool q4 : {false, true})
  for (at::ScalarType dt : {at::kFloat, at::kBFloat16}) {
    auto model = DecoderModel::load(test::reference_dir() / "qwen2_untied", {dt, test::test_device()});
    if (q4) quantize_model_weights(model->weights(), model->config(), QuantSpec{4, 32}, dt);
    for (int64_t samples : {1, 3, 8}) {
      SCOPED_TRACE(fmt::format("{} {}{} rows", c10::toString(dt), q4 ? "q4 " : "", samples));
      GenerationRequest r;
      r.prompt = {5, 6, 7, 8};
      r.num_samples = samples;
      r.params.temperature = 1.0;
      r.params.max_new_tokens = 24;
      r.params.seed = 7;
      EngineOptions plain = every_few_row(), pdl = every_few_row();
      pdl.programmatic_launch = true;
      const auto a = Engine(model, plain).generate({r});
      const auto b = Engine(model, pdl).generate({r});
      ASSERT_EQ(a.size(), b.size());
      for (size_t k = 0; k < a.size(); ++k) {
        EXPECT_EQ(a[k].tokens, b[k].tokens) << "sample " << k;
        EXPECT_EQ(a[k].logprobs, b[k].logprobs) << "sample " << k;
      }
    }
  }
}

TEST(Engine, InPlaceWeightUpdateChangesNextGeneration) {
  const fs::path dir = test::reference_dir() / "qwen2_untied";
  auto model = DecoderModel::load(dir, {at::kFloat, test::test_device()});
  Engine engine(model, {});
  GenerationRequest r;
  r.prompt = {5, 6, 7};
  r.params.temperature = 0;
  r.params.max_new_tokens = 16;
  auto before = engine.generate({r});
  {
    at::NoGradGuard g;  // an optimizer step, as the trainer does it: in place, same tensors
    model->weights().lm_head.add_(at::randn_like(model->weights().lm_head) * 0.5);
  }
  auto after = engine.generate({r});
  EXPECT_NE(before[0].tokens, after[0].tokens);
  // And it equals what a fresh reading of the same weights gives: nothing stale anywhere.
  auto fresh = Engine(model, {}).generate({r});
  EXPECT_EQ(after[0].tokens, fresh[0].tokens);
}

TEST(Engine, StopsOnEveryEosIdAndStopCallback) {
  const fs::path dir = test::reference_dir() / "qwen2_untied";
  auto model = DecoderModel::load(dir, {at::kFloat, test::test_device()});
  const auto cases = greedy_cases(dir);
  GenerationRequest r;
  r.prompt = cases[0].prompt;
  r.params.temperature = 0;
  r.params.max_new_tokens = 64;
  EngineOptions opt;
  opt.eos_ids = {999999, cases[0].tokens[6]};  // the 7th greedy token acts as an EOS id
  auto out = Engine(model, opt).generate({r});
  const auto first = std::find(cases[0].tokens.begin(), cases[0].tokens.end(), cases[0].tokens[6]);
  const size_t n = first - cases[0].tokens.begin() + 1;
  EXPECT_EQ(out[0].finish_reason, "stop");
  EXPECT_EQ(out[0].tokens, std::vector<int32_t>(cases[0].tokens.begin(), cases[0].tokens.begin() + n));
  GenerateCallbacks cb;
  cb.stop = [](int64_t, int64_t, const std::vector<int32_t>& g) { return g.size() == 3; };
  auto stopped = Engine(model, {}).generate({r}, cb);
  EXPECT_EQ(stopped[0].finish_reason, "stop_string");
  EXPECT_EQ(stopped[0].tokens.size(), 3u);
}

}  // namespace
