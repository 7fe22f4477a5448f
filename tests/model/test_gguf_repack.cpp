// GGUF Q8_0/Q4_0/Q4_1 kept packed: repacked MLX affine weights dequantize to exactly gguf-py's floats (files
// written by gguf-py's own quantizer, and SmolLM2's real tensors), the kept SmolLM2 model generates the greedy
// tokens of the dequantized-at-load model with logits equal up to summation order, and `rlaif convert` writes
// those packed weights unchanged into an MLX folder that loads and generates the same (and `--quantize keep` copies
// an MLX folder's quantization unchanged).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/io.h"
#include "core/safetensors.h"
#include "engine/engine.h"
#include "models/gguf_model.h"
#include "model_test.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace rlaif;
using nlohmann::json;

namespace {

fs::path smollm() { return test::source_dir() / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"; }
std::string rlaif_bin() { return (test::binary_dir() / "apps" / "rlaif").string(); }

// Runs gguf_repack_reference.py with `args`; returns its tensors.json.
json run_reference(const std::string& args, const fs::path& outdir) {
  std::string out;
  const std::string cmd = test::python() + " " +
                          (test::source_dir() / "tests/reference/gguf_repack_reference.py").string() + " " + args;
  EXPECT_EQ(test::run_command(cmd, &out), 0) << cmd << "\n" << out;
  return json::parse(read_file(outdir / "tensors.json"));
}

at::Tensor read_f32(const fs::path& p, const std::vector<int64_t>& shape) {
  const std::string bytes = read_file(p);
  at::Tensor t = at::empty(shape, at::kFloat);
  RLAIF_CHECK(bytes.size() == static_cast<size_t>(t.numel()) * 4, "{}: {} bytes", p.string(), bytes.size());
  std::memcpy(t.data_ptr(), bytes.data(), bytes.size());
  return t;
}

// Our repacked tensor, dequantized by the MLX kernel, against gguf-py's floats: equal as float32 values (a zero
// may differ in sign: −128·d + 128·d is +0 where gguf-py's 0·d is −0 for d < 0; equal under ==).
void expect_repack_exact(const GgufFile& g, const json& ref, const fs::path& dir) {
  for (const auto& r : ref) {
    const std::string name = r["name"];
    SCOPED_TRACE(name + " " + r["type"].get<std::string>());
    const GgufTensor* t = g.find(name);
    ASSERT_TRUE(t);
    const at::Tensor want = read_f32(dir / (name + ".f32"), r["shape"].get<std::vector<int64_t>>());
    if (!gguf_repackable(t->type)) {
      EXPECT_THROW(repack_gguf_tensor(*t, at::kFloat), Error);
      continue;
    }
    const QuantizedTensor q = repack_gguf_tensor(*t, at::kFloat);
    EXPECT_EQ(q.bits, t->type == GgmlType::kQ8_0 ? 8 : 4);
    EXPECT_EQ(q.group_size, 32);
    ASSERT_EQ(q.in_features(), want.size(1));
    ASSERT_LE(want.size(0), q.out_features());
    const at::Tensor got = q.dequantize(at::kFloat).narrow(0, 0, want.size(0));  // the reference may hold a head
    const int64_t differ = got.ne(want).sum().item<int64_t>();
    EXPECT_EQ(differ, 0) << "of " << want.numel() << "; max |diff| " << (got - want).abs().max().item<float>();
  }
}

// Greedy decoding of a short prompt through the engine (one sequence: no batch-sized buffers to fill).
GeneratedSample greedy(std::shared_ptr<DecoderModel> m, int64_t n) {
  EngineOptions opt;
  opt.max_batch = 1;
  Engine engine(std::move(m), opt);
  GenerationRequest req;
  req.prompt = {1, 4194, 2114, 253, 655};
  req.params.temperature = 0;
  req.params.max_new_tokens = n;
  return engine.generate({req}).at(0);
}

}  // namespace

TEST(GgufRepack, Q8_0Q4_0Q4_1FromGgufPyDequantizeExactly) {
  // gguf-py quantizes random matrices (with zero, constant and single-spike rows) to each type and writes them.
  const fs::path dir = test::temp_dir("gguf_repack_quants");
  const json ref = run_reference("write " + dir.string(), dir);
  ASSERT_EQ(ref.size(), 4u);
  auto g = GgufFile::open(dir / "quants.gguf");
  expect_repack_exact(*g, ref, dir);
  // bfloat16 scales round d (documented): the scales are d rounded to bfloat16.
  const GgufTensor* q8 = g->find("w_q8_0");
  const QuantizedTensor f = repack_gguf_tensor(*q8, at::kFloat), b = repack_gguf_tensor(*q8, at::kBFloat16);
  EXPECT_TRUE(at::equal(b.scales, f.scales.to(at::kBFloat16)));
  EXPECT_TRUE(at::equal(b.wq, f.wq));
}

TEST(GgufRepack, SmolLM2TensorsDequantizeExactlyAsGgufPy) {
  // Real llama.cpp output: the Q8_0 embedding (its first 4096 rows) and Q4_1 projections of
  // SmolLM2-135M-Instruct.Q4_1.gguf.
  ASSERT_TRUE(fs::exists(smollm())) << "run scripts/setup.sh";
  const fs::path dir = test::temp_dir("gguf_repack_smollm");
  const json ref = run_reference("dequant " + smollm().string() + " " + dir.string() +
                                     " token_embd.weight:4096 blk.0.attn_q.weight blk.7.ffn_down.weight blk.29.attn_v.weight",
                                 dir);
  ASSERT_EQ(ref.size(), 4u);
  expect_repack_exact(*GgufFile::open(smollm()), ref, dir);
}

TEST(GgufRepack, KeptSmolLM2GeneratesLikeTheDequantizedModel) {
  ASSERT_TRUE(fs::exists(smollm())) << "run scripts/setup.sh";
  // float32 on the test device (RLAIF_TEST_DEVICE=cuda: the CUDA dequantize and gemv kernels on group-32 words).
  const at::Device dev = test::test_device();
  auto plain = load_gguf_model(smollm(), {at::kFloat, dev});
  auto kept = load_gguf_model(smollm(), {at::kFloat, dev, /*keep_gguf_quantization=*/true});
  ASSERT_FALSE(plain->weights().quantized());
  EXPECT_EQ(kept->weights().layers[0].quant[0].device(), dev);
  const ModelWeights& K = kept->weights();
  const ModelWeights& P = plain->weights();
  // Every projection (Q4_1) and the tied embedding (Q8_0) stay packed; those checked equal the dequantized model's
  // tensors exactly: the layout, the nibble order and the Q/K row un-permutation all line up.
  ASSERT_TRUE(K.embed_q.defined());
  EXPECT_EQ(K.embed_q.bits, 8);
  EXPECT_TRUE(K.lm_head_q.wq.is_same(K.embed_q.wq)) << "tied head";
  EXPECT_TRUE(at::equal(K.embed, P.embed)) << "the embedding's dequantized copy";
  for (size_t l = 0; l < K.layers.size(); ++l)
    for (int p = 0; p < kNumProj; ++p) {
      SCOPED_TRACE(fmt::format("layer {} {}", l, kProjNames[p]));
      const QuantizedTensor& q = K.layers[l].quant[p];
      ASSERT_TRUE(q.defined());
      EXPECT_EQ(q.bits, 4);
      EXPECT_FALSE(K.layers[l].weight(static_cast<Proj>(p)).defined());
      if (l == 0 || l == 17 || l + 1 == K.layers.size())  // three layers: the whole set takes seconds
        EXPECT_TRUE(at::equal(q.dequantize(at::kFloat), P.layers[l].weight(static_cast<Proj>(p))));
    }

  // Greedy decoding through the engine: the same 16 tokens, and per-token log-probs equal up to float summation
  // order (the packed kernel's sums vs BLAS).
  const auto want = greedy(plain, 16);
  const auto got = greedy(kept, 16);
  ASSERT_EQ(want.tokens.size(), 16u);
  EXPECT_EQ(got.tokens, want.tokens);
  ASSERT_EQ(got.logprobs.size(), want.logprobs.size());
  float max_diff = 0;
  for (size_t i = 0; i < want.logprobs.size(); ++i) max_diff = std::max(max_diff, std::abs(got.logprobs[i] - want.logprobs[i]));
  std::printf("[gguf repack] %s: max |logprob diff| kept vs dequantized over 16 greedy tokens: %.3g\n",
              dev.str().c_str(), max_diff);
  EXPECT_LE(max_diff, 1e-3);
}

TEST(GgufRepack, ConvertKeepsTheGgufQuantizationAndTheFolderGeneratesTheSame) {
  ASSERT_TRUE(fs::exists(smollm())) << "run scripts/setup.sh";
  const fs::path out = test::temp_dir("gguf_repack_convert") / "mlx";
  std::string log;
  // No --quantize: a GGUF source keeps its quantization. --dtype f32 keeps the norms exact too.
  ASSERT_EQ(test::run_command(rlaif_bin() + " convert --hf-path " + smollm().string() + " --out " + out.string() +
                                  " --dtype f32", &log), 0) << log;
  EXPECT_NE(log.find("keeping the source's quantization"), std::string::npos) << log;
  EXPECT_NE(log.find("(211 quantized)"), std::string::npos) << log;
  const auto config = json::parse(read_file(out / "config.json"));
  // Q4_1 everywhere but the Q8_0 embedding: 4 bits globally, mlx_lm's per-module entry for the embedding.
  EXPECT_EQ(config["quantization"], (json{{"group_size", 32}, {"bits", 4},
                                          {"model.embed_tokens", {{"group_size", 32}, {"bits", 8}}}}));
  const auto ckpt = Checkpoint::open_dir(out);
  const TensorView* q = ckpt.find("model.layers.0.self_attn.q_proj.weight");
  ASSERT_TRUE(q);
  EXPECT_EQ(q->dtype, DType::kU32);
  EXPECT_EQ(q->shape, (std::vector<int64_t>{576, 576 * 4 / 32}));
  EXPECT_EQ(ckpt.find("model.layers.0.self_attn.q_proj.scales")->dtype, DType::kF16) << "fp16 d is exact in fp16";
  EXPECT_EQ(ckpt.find("model.embed_tokens.weight")->shape, (std::vector<int64_t>{49152, 576 * 8 / 32}));

  // The folder holds the very same packed weights (and norms) as the kept GGUF model (scales exact in fp16), and
  // decodes the dequantized-at-load model's greedy tokens.
  auto kept = load_gguf_model(smollm(), {at::kFloat, at::kCPU, /*keep_gguf_quantization=*/true});
  auto folder = DecoderModel::load(out, {at::kFloat, at::kCPU});
  const ModelWeights& K = kept->weights();
  const ModelWeights& F = folder->weights();
  EXPECT_TRUE(at::equal(F.embed_q.wq, K.embed_q.wq));
  EXPECT_TRUE(at::equal(F.embed_q.scales.to(at::kFloat), K.embed_q.scales));
  EXPECT_TRUE(at::equal(F.embed_q.biases.to(at::kFloat), K.embed_q.biases));
  for (size_t l = 0; l < K.layers.size(); ++l)
    for (int p = 0; p < kNumProj; ++p) {
      SCOPED_TRACE(fmt::format("layer {} {}", l, kProjNames[p]));
      const QuantizedTensor &a = F.layers[l].quant[p], &b = K.layers[l].quant[p];
      ASSERT_TRUE(a.defined());
      EXPECT_EQ(a.bits, b.bits);
      EXPECT_TRUE(at::equal(a.wq, b.wq));
      EXPECT_TRUE(at::equal(a.scales.to(at::kFloat), b.scales));
      EXPECT_TRUE(at::equal(a.biases.to(at::kFloat), b.biases));
    }
  EXPECT_TRUE(at::equal(F.final_norm, K.final_norm));
  for (size_t l = 0; l < K.layers.size(); ++l) {
    EXPECT_TRUE(at::equal(F.layers[l].input_norm, K.layers[l].input_norm));
    EXPECT_TRUE(at::equal(F.layers[l].post_norm, K.layers[l].post_norm));
  }
  kept.reset();
  const auto want = greedy(load_gguf_model(smollm(), {at::kFloat, at::kCPU}), 6), got = greedy(folder, 6);
  EXPECT_EQ(got.tokens, want.tokens);
  ASSERT_EQ(got.logprobs.size(), want.logprobs.size());
  for (size_t i = 0; i < want.logprobs.size(); ++i) EXPECT_NEAR(got.logprobs[i], want.logprobs[i], 1e-3);
}

TEST(GgufRepack, ConvertKeepCopiesAnMlxFoldersQuantization) {
  // --quantize keep on an MLX-quantized folder writes its packed tensors unchanged (no dequantize/re-quantize).
  const fs::path dir = test::temp_dir("gguf_repack_keep_mlx");
  const fs::path src = test::reference_dir() / "qwen2_untied";
  std::string log;
  ASSERT_EQ(test::run_command(rlaif_bin() + " convert --hf-path " + src.string() + " --out " + (dir / "q4").string() +
                                  " --quantize q4 --group-size 32", &log), 0) << log;
  ASSERT_EQ(test::run_command(rlaif_bin() + " convert --hf-path " + (dir / "q4").string() + " --out " +
                                  (dir / "kept").string() + " --quantize keep", &log), 0) << log;
  EXPECT_NE(log.find("keeping the source's quantization"), std::string::npos) << log;
  // Every packed tensor of the source comes back with the same words and the same scale/bias values (narrowed to
  // float16 only where that is exact).
  auto a = DecoderModel::load(dir / "q4", {at::kFloat, at::kCPU});
  auto b = DecoderModel::load(dir / "kept", {at::kFloat, at::kCPU});
  int64_t packed = 0;
  for (const auto& [name, where] : expected_tensors(a->config())) {
    const QuantizedTensor *x = quantized_slot(a->weights(), where.first, where.second),
                          *y = quantized_slot(b->weights(), where.first, where.second);
    if (!x || !x->defined()) continue;
    SCOPED_TRACE(name);
    ASSERT_TRUE(y && y->defined());
    EXPECT_EQ(y->bits, x->bits);
    EXPECT_EQ(y->group_size, x->group_size);
    EXPECT_TRUE(at::equal(y->wq, x->wq));
    EXPECT_TRUE(at::equal(y->scales.to(at::kFloat), x->scales.to(at::kFloat)));
    EXPECT_TRUE(at::equal(y->biases.to(at::kFloat), x->biases.to(at::kFloat)));
    ++packed;
  }
  EXPECT_GT(packed, 0);
  EXPECT_EQ(json::parse(read_file(dir / "kept" / "config.json"))["quantization"],
            json::parse(read_file(dir / "q4" / "config.json"))["quantization"]);
}
