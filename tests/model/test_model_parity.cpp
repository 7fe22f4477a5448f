// Qwen2/Llama forward parity with transformers: random tiny models saved by tests/reference/make_tiny_models.py
// (tied/untied, sharded, GQA, llama3 rope, biases), logits and target log-probs for a left- and right-padded
// batch. RLAIF_TEST_DEVICE=cuda runs the same checks on the GPU, plus bf16 against transformers' bf16.
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <map>

#include "core/error.h"
#include "core/safetensors.h"
#include "models/decoder.h"
#include "models/weights.h"
#include "model_test.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace rlaif;

namespace {

double max_abs_on(const at::Tensor& a, const at::Tensor& b, const at::Tensor& mask) {
  at::Tensor d = (a.to(at::kCPU, at::kDouble) - b.to(at::kDouble)).abs();
  if (d.dim() == 3) d = d.amax(-1);
  return d.masked_select(mask.to(at::kBool)).max().item<double>();
}

double rel_err_on(const at::Tensor& a, const at::Tensor& ref, const at::Tensor& mask) {
  at::Tensor m = mask.to(at::kBool);
  if (a.dim() == 3) m = m.unsqueeze(-1).expand_as(a);
  at::Tensor x = a.to(at::kCPU, at::kDouble).masked_select(m), r = ref.to(at::kDouble).masked_select(m);
  return ((x - r).norm() / r.norm()).item<double>();
}

class ModelParity : public ::testing::TestWithParam<const char*> {};

TEST_P(ModelParity, Fp32LogitsAndLogprobsMatchTransformers) {
  const fs::path dir = test::reference_dir() / GetParam();
  auto ref = load_safetensors(dir / "expected_fp32.safetensors");
  auto model = DecoderModel::load(dir, {at::kFloat, test::test_device()});
  const at::Tensor &ids = ref["input_ids"], &mask = ref["attention_mask"];

  at::Tensor logits = model->forward(ids, mask);
  EXPECT_EQ(logits.sizes(), ref["logits"].sizes());
  const double logit_err = max_abs_on(logits, ref["logits"], mask);
  std::printf("[fp32 %s] %s: max |logits - transformers| = %.2e\n", test::test_device().str().c_str(), GetParam(), logit_err);
  EXPECT_LE(logit_err, 1e-4) << GetParam();

  for (int64_t chunk : {5, 1024}) {  // a chunk that splits rows unevenly, and one that holds them all
    at::Tensor lp = model->token_logprobs(ids, mask, ref["targets"], chunk);
    const double lp_err = max_abs_on(lp, ref["logprobs"], mask);
    std::printf("[fp32 %s] %s: chunk %ld max |logprobs - transformers| = %.2e\n", test::test_device().str().c_str(),
                GetParam(), static_cast<long>(chunk), lp_err);
    EXPECT_LE(lp_err, 1e-5) << GetParam() << " chunk " << chunk;
  }
  // Padding must not leak into real positions: the padded ids' values are irrelevant.
  at::Tensor other = ids.clone().masked_fill(mask.eq(0), 17);
  EXPECT_LE(max_abs_on(model->forward(other, mask), ref["logits"], mask), 1e-4);
}

TEST_P(ModelParity, Bf16WithinTransformersOwnBf16Error) {
  const fs::path dir = test::reference_dir() / GetParam();
  if (test::test_device().is_cpu() || !fs::exists(dir / "expected_bf16.safetensors"))
    GTEST_SKIP() << "bf16 parity runs on the GPU machine (RLAIF_TEST_DEVICE=cuda, reference made with --bf16-device)";
  auto ref32 = load_safetensors(dir / "expected_fp32.safetensors");
  auto ref16 = load_safetensors(dir / "expected_bf16.safetensors");
  auto model = DecoderModel::load(dir, {at::kBFloat16, test::test_device()});
  const at::Tensor &ids = ref32["input_ids"], &mask = ref32["attention_mask"];
  at::Tensor logits = model->forward(ids, mask).to(at::kFloat);
  const double ours_vs_hf16 = rel_err_on(logits, ref16["logits"], mask);
  const double ours_vs_fp32 = rel_err_on(logits, ref32["logits"], mask);
  const double hf16_vs_fp32 = rel_err_on(ref16["logits"], ref32["logits"], mask);
  std::printf("[bf16] %s: |ours-hf_bf16|/|hf_bf16| = %.2e, |ours-fp32|/|fp32| = %.2e, |hf_bf16-fp32|/|fp32| = %.2e\n",
              GetParam(), ours_vs_hf16, ours_vs_fp32, hf16_vs_fp32);
  // bf16 keeps 8 mantissa bits (relative rounding 2^-9 ≈ 2e-3 per op); across a few layers the error reaches
  // 1e-2 in norm. We require ours to be as close to the fp32 truth as transformers' own bf16 run is (+50%).
  EXPECT_LE(ours_vs_hf16, 2e-2);
  EXPECT_LE(ours_vs_fp32, 1.5 * hf16_vs_fp32 + 1e-3);
  at::Tensor lp = model->token_logprobs(ids, mask, ref32["targets"]);
  const double lp_err = max_abs_on(lp, ref32["logprobs"], mask);
  std::printf("[bf16] %s: max |logprob - fp32 logprob| = %.3e\n", GetParam(), lp_err);
  EXPECT_LE(lp_err, 0.1);
}

INSTANTIATE_TEST_SUITE_P(TinyModels, ModelParity, ::testing::ValuesIn(test::kTinyModels),
                         [](const auto& info) { return std::string(info.param); });

TEST(ModelLoading, ConfigsOfRealCheckpointsParse) {
  // The real Qwen2.5-7B config.json (v4 spelling: rope_theta at top level).
  ModelConfig c = load_model_config(test::shared_data() / "qwen2.5");
  EXPECT_EQ(c.family, "qwen2");
  EXPECT_EQ(c.hidden_size, 3584);
  EXPECT_EQ(c.num_layers, 28);
  EXPECT_EQ(c.num_kv_heads, 4);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_DOUBLE_EQ(c.rope.theta, 1000000.0);
  EXPECT_TRUE(c.qkv_bias);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.vocab_size, 152064);
}

TEST(ModelLoading, Llama31StyleRopeScalingParses) {
  const auto j = nlohmann::json::parse(R"({"architectures":["LlamaForCausalLM"],"vocab_size":128256,
    "hidden_size":2048,"intermediate_size":8192,"num_hidden_layers":16,"num_attention_heads":32,
    "num_key_value_heads":8,"rope_theta":500000.0,"tie_word_embeddings":true,"eos_token_id":[128001,128008,128009],
    "rope_scaling":{"factor":32.0,"high_freq_factor":4.0,"low_freq_factor":1.0,
    "original_max_position_embeddings":8192,"rope_type":"llama3"}})");
  ModelConfig c = parse_model_config(j, "llama-3.2-1b/config.json");
  EXPECT_EQ(c.rope.type, "llama3");
  EXPECT_DOUBLE_EQ(c.rope.factor, 32.0);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int64_t>{128001, 128008, 128009}));
}

TEST(ModelLoading, UnsupportedArchitectureListsSupported) {
  const auto j = nlohmann::json::parse(R"({"architectures":["GPT2LMHeadModel"],"vocab_size":5})");
  try {
    parse_model_config(j, "gpt2/config.json");
    FAIL();
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("GPT2LMHeadModel"), std::string::npos) << m;
    EXPECT_NE(m.find("Qwen2ForCausalLM"), std::string::npos) << m;
    EXPECT_NE(m.find("LlamaForCausalLM"), std::string::npos) << m;
  }
}

TEST(ModelLoading, MissingAndUnexpectedTensorsAreListed) {
  const fs::path src = test::reference_dir() / "qwen2_untied";
  const fs::path dir = test::temp_dir("bad_ckpt");
  fs::copy_file(src / "config.json", dir / "config.json");
  auto tensors = load_safetensors(src / "model.safetensors");
  tensors.erase("model.layers.1.mlp.up_proj.weight");
  tensors["model.layers.1.mlp.extra.weight"] = at::zeros({2});
  save_safetensors(dir / "model.safetensors", tensors);
  try {
    DecoderModel::load(dir);
    FAIL();
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("missing tensors: model.layers.1.mlp.up_proj.weight"), std::string::npos) << m;
    EXPECT_NE(m.find("unexpected tensors: model.layers.1.mlp.extra.weight"), std::string::npos) << m;
  }
}

TEST(ModelLoading, WeightsAreZeroCopyViewsOfTheFile) {
  const fs::path dir = test::reference_dir() / "qwen2_untied";
  auto model = DecoderModel::load(dir, {at::kFloat, at::kCPU});
  auto st = SafetensorsFile::open(dir / "model.safetensors");
  // Different mappings of one file: compare bytes, and check the tensor is not an owning copy (from_blob).
  const TensorView* v = st->find("model.layers.0.self_attn.q_proj.weight");
  ASSERT_TRUE(v);
  EXPECT_EQ(std::memcmp(model->weights().layers[0].wq.data_ptr(), v->data, v->nbytes), 0);
  EXPECT_FALSE(model->weights().layers[0].wq.storage().resizable());
}


// pack_projection_groups (done at load time on the GPU) makes each layer's q/k/v and gate/up views of one buffer:
// the forward is unchanged, full fine-tuning still sees separate parameters with the gradients of unpacked ones,
// and an in-place update of a parameter is what the group's one GEMM (packed_rows) reads.
TEST(ModelLoading, PackedProjectionGroupsTrainAsSeparateParameters) {
  const fs::path dir = test::reference_dir() / "qwen2_untied";
  auto ref = load_safetensors(dir / "expected_fp32.safetensors");
  auto plain = DecoderModel::load(dir, {at::kFloat, at::kCPU});
  auto packed = DecoderModel::load(dir, {at::kFloat, at::kCPU});
  pack_projection_groups(packed->weights());
  const LayerWeights& L = packed->weights().layers[0];
  const LayerWeights& P = plain->weights().layers[0];
  const at::Tensor qkv = packed_rows({&L.wq, &L.wk, &L.wv}), gate_up = packed_rows({&L.w_gate, &L.w_up});
  ASSERT_TRUE(qkv.defined());
  ASSERT_TRUE(gate_up.defined());
  ASSERT_TRUE(packed_rows({&L.bq, &L.bk, &L.bv}).defined());  // Qwen2 has q/k/v biases
  EXPECT_TRUE(at::equal(qkv, at::cat({P.wq, P.wk, P.wv})));
  EXPECT_TRUE(at::equal(gate_up, at::cat({P.w_gate, P.w_up})));
  EXPECT_FALSE(packed_rows({&L.wq, &L.wv}).defined()) << "not consecutive rows";
  EXPECT_FALSE(packed_rows({&L.wq, &P.wk}).defined()) << "two buffers";

  const at::Tensor &ids = ref["input_ids"], &mask = ref["attention_mask"], &targets = ref["targets"];
  auto grads = [&](DecoderModel& m) {
    auto params = m.named_weights();
    for (auto& [n, t] : params) t.set_requires_grad(true);
    (m.token_logprobs(ids, mask, targets) * mask).sum().backward();
    std::map<std::string, at::Tensor> g;
    for (auto& [n, t] : params) {
      g[n] = t.grad().clone();
      t.set_requires_grad(false);
    }
    return g;
  };
  const auto g_packed = grads(*packed), g_plain = grads(*plain);
  ASSERT_EQ(g_packed.size(), g_plain.size());
  for (const auto& [n, g] : g_plain)
    EXPECT_LE((g_packed.at(n) - g).norm().item<double>(), 1e-5 * g.norm().item<double>() + 1e-12) << n;

  {  // an optimizer-style in-place step on one parameter
    at::NoGradGuard no_grad;
    packed->weights().layers[0].wk.add_(1.0);
  }
  EXPECT_TRUE(at::equal(qkv.narrow(0, L.wq.size(0), L.wk.size(0)), P.wk + 1.0));
  EXPECT_TRUE(at::equal(qkv.narrow(0, 0, L.wq.size(0)), P.wq)) << "neighbours untouched";
}

}  // namespace
