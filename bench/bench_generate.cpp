// Decode throughput of the rlaif engine on a model folder (the random-weight Qwen2.5 shapes that
// bench/hf_generate.py saves): prompt P, N new tokens with sampling, for several batch sizes; plus an optional
// RL rollout workload (prompts × samples, varied prompt lengths). `--quantize q4|q8` quantizes the loaded weights
// on the device first (MLX affine, group 64, bf16 scales: what `rlaif convert` writes), for the quantized engine;
// `--pdl` turns on EngineOptions::programmatic_launch, `--quant-mma` EngineOptions::quant_few_row_mma (the
// tensor-core quantized projections at 1-2 rows), `--few-row-kernel streaming` the session-4 GEMV,
// `--few-row-rows` sets which projections take the few-row GEMV at which batch (EngineOptions::few_row_rows);
// `--lora R` attaches rank-R adapters to every projection first (the RL rollout's decode, as bench_train runs it),
// `--lora-expand-rows 4` sets EngineOptions::lora_expand_rows, `--lora-expand-simt` turns EngineOptions::lora_expand_mma off, `--lora-norm-fusion` sets
// EngineOptions::lora_norm_fusion;
// `--attention-kernel simt` the SIMT paged attention instead of the tensor-core one (kernels/cpu/registry.h).
// Usage: bench_generate --model DIR [--batches 1,16,64] [--prompt 128] [--new 128] [--rollout] [--quantize q4|q8]
//        [--pdl] [--quant-mma] [--few-row-kernel streaming|staged] [--lora R] [--lora-expand-rows 4|8] [--lora-expand-simt] [--lora-norm-fusion]
//        [--attention-kernel tensor-core|simt] --out FILE.json
#include <chrono>
#include <cstdio>
#include <fstream>
#include <random>
#include <sstream>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "engine/engine.h"
#include "models/gguf_model.h"
#include "models/lora.h"
#include "models/quantized_model.h"

using namespace rlaif;

namespace {

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

void sync(const at::Device& d) {
  if (d.is_cuda()) at::empty({1}, at::TensorOptions().device(d)).cpu();  // forces a device sync
}

std::vector<int32_t> random_prompt(std::mt19937& g, int64_t n, int64_t vocab) {
  std::uniform_int_distribution<int32_t> u(0, static_cast<int32_t>(vocab - 1));
  std::vector<int32_t> p(n);
  for (auto& t : p) t = u(g);
  return p;
}

// Runs the requests once, timed from a synchronized device; returns (generated tokens, seconds).
std::pair<int64_t, double> timed_generate(Engine& engine, const std::vector<GenerationRequest>& reqs,
                                          const at::Device& dev) {
  sync(dev);
  const double t0 = now();
  auto res = engine.generate(reqs);
  sync(dev);
  const double dt = now() - t0;
  int64_t n = 0;
  for (const auto& s : res) n += s.tokens.size();
  return {n, dt};
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"rlaif generation benchmark"};
  std::string model_dir, out, batches = "1,16,64", device = "cuda", dtype = "bf16", quantize;
  int64_t prompt = 128, new_tokens = 128, lora_r = 0;
  int lora_expand_rows = 8;
  bool rollout = false, pdl = false, lora_shrink_kernel = false, tuned_gemm = false, quant_mma = false;
  bool lora_expand_simt = false, lora_norm_fusion = false;
  app.add_option("--model", model_dir, "HF folder or .gguf")->required();
  app.add_option("--out", out, "JSON results file");
  app.add_option("--batches", batches);
  app.add_option("--prompt", prompt);
  app.add_option("--new", new_tokens);
  app.add_option("--device", device);
  app.add_option("--dtype", dtype);
  app.add_flag("--rollout", rollout, "also run 64 prompts x 8 samples, prompts 100-1024, up to 1024 new tokens");
  app.add_option("--quantize", quantize, "q4 or q8: quantize the weights (group 64) before generating")
      ->check(CLI::IsMember({"q4", "q8"}));
  app.add_flag("--pdl", pdl, "launch the decode projections as programmatic dependent launches (EngineOptions)");
  app.add_flag("--quant-mma", quant_mma,
               "quantized projections at 1-2 rows on tensor cores (EngineOptions::quant_few_row_mma; bf16, q4/q8)");
  std::string few_row = "staged";
  app.add_option("--few-row-kernel", few_row, "CUDA GEMV at batch <= 8: staged (default) or streaming (session 4)")
      ->check(CLI::IsMember({"staged", "streaming"}));
  app.add_option("--lora", lora_r, "attach LoRA adapters of this rank to every projection (0: none)");
  app.add_flag("--lora-shrink-kernel", lora_shrink_kernel,
               "LoRA's x·Aᵀ by its own shrink launch, not as extra columns of the base GEMMs (EngineOptions)");
  app.add_flag("--tuned-gemm", tuned_gemm, "the projections' GEMMs through timed cuBLASLt algorithms (EngineOptions)");
  app.add_option("--lora-expand-rows", lora_expand_rows, "rows a CUDA LoRA expand block serves (EngineOptions)")
      ->check(CLI::IsMember({4, 8}));
  app.add_flag("--lora-expand-simt", lora_expand_simt,
               "the batched CUDA LoRA expands on the SIMT kernels, not tensor cores (EngineOptions::lora_expand_mma)");
  app.add_flag("--lora-norm-fusion", lora_norm_fusion,
               "the o/down LoRA updates added by the next RMSNorm's launch (EngineOptions::lora_norm_fusion)");
  std::string attention = "tensor-core";
  app.add_option("--attention-kernel", attention, "CUDA paged attention: tensor-core (default) or simt")
      ->check(CLI::IsMember({"tensor-core", "simt"}));
  std::string few_row_rows;
  app.add_option("--few-row-rows", few_row_rows,
                 "QKV,GATE_UP,RESIDUAL,LM_HEAD: most rows each projection kind sends to the few-row GEMV "
                 "(EngineOptions::few_row_rows; default the engine's, 8,8,8,8 = every kind up to 8 rows)");
  CLI11_PARSE(app, argc, argv);
  EngineOptions::FewRowRows rows_policy;
  if (!few_row_rows.empty()) {
    std::vector<int64_t> v;
    std::stringstream rs(few_row_rows);
    for (std::string x; std::getline(rs, x, ',');) v.push_back(std::stoll(x));
    if (v.size() != 4) {
      std::fprintf(stderr, "--few-row-rows takes four numbers (qkv,gate_up,residual,lm_head), got '%s'\n",
                   few_row_rows.c_str());
      return 2;
    }
    rows_policy = {v[0], v[1], v[2], v[3]};
  }
  const std::string rows_text = fmt::format("{},{},{},{}", rows_policy.qkv, rows_policy.gate_up, rows_policy.residual,
                                            rows_policy.lm_head);

  kernels::set_attention_kernel(attention == "simt" ? kernels::AttentionKernel::kSimt
                                                   : kernels::AttentionKernel::kTensorCore);
  const at::Device dev = device == "cuda" ? at::Device(at::kCUDA) : at::Device(at::kCPU);
  auto model = load_model(model_dir, {parse_torch_dtype(dtype), dev});
  if (!quantize.empty()) {
    const QuantSpec spec{quantize == "q4" ? 4 : 8, 64};
    quantize_model_weights(model->weights(), model->config(), spec, parse_torch_dtype(dtype));
    std::printf("quantized the weights to %s (group 64)\n", quantize.c_str());
  }
  if (lora_r > 0) {
    // PEFT's initialisation leaves B zero; a random B makes the update real work on real numbers.
    LoraConfig lc;
    lc.r = lora_r;
    lc.alpha = 2.0 * lora_r;
    attach_lora(*model, lc, 0);
    for (auto& [name, t] : lora_parameters(*model))
      if (name.find("lora_B") != std::string::npos) t.detach().normal_(0.0, 0.01);
    std::printf("attached LoRA adapters of rank %ld to every projection\n", static_cast<long>(lora_r));
  }
  const int64_t V = model->config().vocab_size;
  nlohmann::json results = nlohmann::json::array();
  std::mt19937 g(0);
  std::stringstream ss(batches);
  for (std::string b; std::getline(ss, b, ',');) {
    const int64_t B = std::stoll(b);
    EngineOptions opt;
    opt.max_batch = std::max<int64_t>(B, 1);
    opt.programmatic_launch = pdl;
    opt.quant_few_row_mma = quant_mma;
    opt.few_row_kernel = few_row == "staged" ? kernels::FewRowKernel::kStaged : kernels::FewRowKernel::kStreaming;
    opt.few_row_rows = rows_policy;
    opt.lora_shrink_in_gemm = !lora_shrink_kernel;
    opt.lora_expand_rows = lora_expand_rows;
    opt.lora_expand_mma = !lora_expand_simt;
    opt.lora_norm_fusion = lora_norm_fusion;
    opt.tuned_gemm = tuned_gemm;
    Engine engine(model, opt);
    std::vector<GenerationRequest> reqs(B);
    for (auto& r : reqs) {
      r.prompt = random_prompt(g, prompt, V);
      r.params.temperature = 1.0;
      r.params.max_new_tokens = new_tokens;
      r.params.seed = 1;
    }
    auto warm = reqs;
    for (auto& r : warm) r.params.max_new_tokens = 8;
    engine.generate(warm);
    // Only the timed generate is inside the profilers' capture range (device.sh's ncu runs start outside it).
    auto* range = kernels::kernel_registry().profiler_range;
    if (range) range(true);
    const auto [n, dt] = timed_generate(engine, reqs, dev);
    if (range) range(false);
    const double decode_s = engine.stats().decode_seconds, prefill_s = engine.stats().prefill_seconds;
    const std::string variant = std::string(pdl ? " pdl" : "") + (quant_mma ? " quant-mma" : "") +
                                (few_row == "streaming" ? " streaming GEMV" : "") +
                                (few_row_rows.empty() ? "" : " few-row rows " + rows_text) +
                                (lora_r > 0 ? fmt::format(" lora r{}", lora_r) : "") +
                                (lora_shrink_kernel ? " shrink kernel" : "") + (tuned_gemm ? " tuned gemm" : "") +
                                (lora_expand_rows != 8 ? fmt::format(" expand rows {}", lora_expand_rows) : "") +
                                (lora_expand_simt ? " simt expand" : "") + (lora_norm_fusion ? " norm fusion" : "") +
                                (attention == "simt" ? " simt attention" : "");
    std::printf("rlaif %s%s batch %ld: %.1f tok/s (%ld tokens in %.3f s)\n", engine.backend().c_str(), variant.c_str(),
                static_cast<long>(B), n / dt, static_cast<long>(n), dt);
    results.push_back({{"impl", "rlaif"}, {"batch", B}, {"new_tokens", n}, {"seconds", dt}, {"tokens_per_s", n / dt},
                       {"backend", engine.backend()}, {"prefill_seconds_total", prefill_s},
                       {"decode_seconds_total", decode_s}, {"programmatic_launch", pdl},
                       {"quant_few_row_mma", quant_mma}, {"few_row_kernel", few_row},
                       {"few_row_rows", rows_text}, {"lora_rank", lora_r}, {"attention_kernel", attention},
                       {"lora_shrink_in_gemm", !lora_shrink_kernel}, {"tuned_gemm", tuned_gemm},
                       {"lora_expand_rows", lora_expand_rows}, {"lora_expand_mma", !lora_expand_simt},
                       {"lora_norm_fusion", lora_norm_fusion}});
  }
  if (rollout) {
    EngineOptions opt;
    opt.max_batch = 512;
    Engine engine(model, opt);
    std::uniform_int_distribution<int64_t> len(100, 1024);
    std::vector<GenerationRequest> reqs(64);
    for (auto& r : reqs) {
      r.prompt = random_prompt(g, len(g), V);
      r.num_samples = 8;
      r.params.temperature = 1.0;
      r.params.max_new_tokens = 1024;
      r.params.seed = 2;
    }
    const auto [n, dt] = timed_generate(engine, reqs, dev);
    std::printf("rlaif rollout 64x8: %.1f tok/s (%ld tokens in %.1f s)\n", n / dt, static_cast<long>(n), dt);
    results.push_back({{"impl", "rlaif"}, {"workload", "rollout_64x8"}, {"new_tokens", n}, {"seconds", dt},
                       {"tokens_per_s", n / dt}});
  }
  if (!out.empty())
    std::ofstream(out) << nlohmann::json{{"model", model_dir}, {"quantize", quantize.empty() ? "none" : quantize},
                                         {"results", results}}.dump(1);
  return 0;
}
