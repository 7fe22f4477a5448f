// Whole-model quantization, LoRA merging and MLX-folder writing for `rlaif convert` and the live generator.
#include "models/quantized_model.h"

#include "core/error.h"
#include "core/io.h"
#include "core/logging.h"
#include "models/gguf_model.h"
#include "models/lora.h"

namespace rlaif {

namespace fs = std::filesystem;

namespace {

// The plain weight tensor of projection p (LayerWeights::weight is read-only).
at::Tensor& proj_weight(LayerWeights& L, int p) {
  at::Tensor* w[kNumProj] = {&L.wq, &L.wk, &L.wv, &L.wo, &L.w_gate, &L.w_up, &L.w_down};
  return *w[p];
}

const char* dtype_json_name(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return "bfloat16";
    case at::kHalf: return "float16";
    default: return "float32";
  }
}

// mlx_lm's rule for one checkpoint tensor: linear/embedding weights whose input dim the group size divides.
bool quantize_this(const ModelWeights& w, WeightSlot slot, int layer, const at::Tensor& t, const QuantSpec& spec) {
  return quantized_slot(w, slot, layer) != nullptr && t.defined() && t.dim() == 2 && quantizable(t.size(1), spec);
}

// Whether q's scales and biases survive a round trip through float16 unchanged (GGUF's d and m are fp16; the
// biases −8·d and −128·d are too unless they overflow).
bool exact_in_half(const QuantizedTensor& q) {
  for (const at::Tensor* t : {&q.scales, &q.biases})
    if (!at::equal(t->to(at::kHalf).to(t->scalar_type()), *t)) return false;
  return true;
}

}  // namespace

void quantize_model_weights(ModelWeights& w, const ModelConfig& c, const QuantSpec& spec, at::ScalarType dtype) {
  for (const auto& [name, where] : expected_tensors(c)) {
    at::Tensor& t = weight_ref(w, where.first, where.second);
    if (!quantize_this(w, where.first, where.second, t, spec)) continue;
    QuantizedTensor& q = *quantized_slot(w, where.first, where.second);
    q = quantize_weight(t.detach().to(dtype), spec, dtype);
    const bool table = where.first == WeightSlot::kEmbed || where.first == WeightSlot::kLmHead;
    t = table ? q.dequantize(t.scalar_type()) : at::Tensor();
  }
  if (c.tie_word_embeddings) {
    w.lm_head = w.embed;
    w.lm_head_q = w.embed_q;
  }
  // As at load: on the GPU the q/k/v and gate/up groups become one buffer each (one kernel a group above 8 rows).
  if (w.embed.defined() && !w.embed.is_cpu()) pack_projection_groups(w);
}

void dequantize_model_weights(ModelWeights& w, at::ScalarType dtype) {
  for (auto& L : w.layers)
    for (int p = 0; p < kNumProj; ++p)
      if (L.quant[p].defined()) {
        proj_weight(L, p) = L.quant[p].dequantize(dtype);
        L.quant[p] = QuantizedTensor{};
      }
  const bool tied = w.lm_head.defined() && w.lm_head.is_same(w.embed);
  if (w.embed_q.defined()) w.embed = w.embed_q.dequantize(dtype);
  if (w.lm_head_q.defined() && !tied) w.lm_head = w.lm_head_q.dequantize(dtype);
  if (tied) w.lm_head = w.embed;
  w.embed_q = w.lm_head_q = QuantizedTensor{};
}

int64_t requantize_weights(ModelWeights& dst, const ModelWeights& src) {
  RLAIF_CHECK(dst.layers.size() == src.layers.size(), "requantize_weights: {} vs {} layers", dst.layers.size(),
              src.layers.size());
  at::NoGradGuard no_grad;
  int64_t n = 0;
  for (size_t l = 0; l < dst.layers.size(); ++l)
    for (int p = 0; p < kNumProj; ++p)
      if (dst.layers[l].quant[p].defined()) {
        requantize_into(dst.layers[l].quant[p], src.layers[l].weight(static_cast<Proj>(p)));
        ++n;
      }
  const bool tied = dst.lm_head_q.defined() && dst.lm_head_q.wq.is_same(dst.embed_q.wq);
  if (dst.embed_q.defined()) {
    requantize_into(dst.embed_q, src.embed);
    dst.embed.copy_(dst.embed_q.dequantize(dst.embed.scalar_type()));  // the engine's copy (ModelWeights::embed_q)
    ++n;
  }
  if (dst.lm_head_q.defined() && !tied) {
    requantize_into(dst.lm_head_q, src.lm_head);
    dst.lm_head.copy_(dst.lm_head_q.dequantize(dst.lm_head.scalar_type()));
    ++n;
  }
  return n;
}

void merge_lora(DecoderModel& model) {
  at::NoGradGuard no_grad;
  for (auto& L : model.weights().layers)
    for (int p = 0; p < kNumProj; ++p) {
      LoraAdapter& a = L.lora[p];
      if (!a.defined()) continue;
      at::Tensor& w = proj_weight(L, p);
      RLAIF_CHECK(w.defined(), "merge_lora: projection {} is quantized; merge into an unquantized base", kProjNames[p]);
      const at::Tensor delta = at::matmul(a.b.to(w.device(), at::kFloat), a.a.to(w.device(), at::kFloat)) * a.scale;
      w = (w.to(at::kFloat) + delta).to(w.scalar_type());
      a = LoraAdapter{};
    }
}

nlohmann::json hf_config_json(const ModelConfig& c) {
  nlohmann::json j = {{"architectures", {c.architecture}},
                      {"model_type", c.family},
                      {"vocab_size", c.vocab_size},
                      {"hidden_size", c.hidden_size},
                      {"intermediate_size", c.intermediate_size},
                      {"num_hidden_layers", c.num_layers},
                      {"num_attention_heads", c.num_heads},
                      {"num_key_value_heads", c.num_kv_heads},
                      {"head_dim", c.head_dim},
                      {"max_position_embeddings", c.max_position_embeddings},
                      {"rms_norm_eps", c.rms_norm_eps},
                      {"rope_theta", c.rope.theta},
                      {"tie_word_embeddings", c.tie_word_embeddings},
                      {"hidden_act", "silu"}};
  if (c.family == "llama") {
    j["attention_bias"] = c.o_bias || c.qkv_bias;
    j["mlp_bias"] = c.mlp_bias;
  }
  if (c.rope.type == "llama3")
    j["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", c.rope.factor},
                         {"low_freq_factor", c.rope.low_freq_factor}, {"high_freq_factor", c.rope.high_freq_factor},
                         {"original_max_position_embeddings", c.rope.original_max_position_embeddings}};
  if (c.bos_token_id) j["bos_token_id"] = *c.bos_token_id;
  if (c.eos_token_ids.size() == 1) j["eos_token_id"] = c.eos_token_ids[0];
  else if (!c.eos_token_ids.empty()) j["eos_token_id"] = c.eos_token_ids;
  if (c.pad_token_id) j["pad_token_id"] = *c.pad_token_id;
  return j;
}

static nlohmann::json read_json(const fs::path& p, const char* what) {
  try {
    return nlohmann::json::parse(read_file(p));
  } catch (const nlohmann::json::exception& e) {
    throw Error("convert", fmt::format("{}: invalid {}: {}", p.string(), what, e.what()));
  }
}

// An HF folder or .gguf file as a float32 CPU model with its config.json and tokenizer folder.
static ConvertSource load_base(const fs::path& path, bool keep_gguf_quantization) {
  ConvertSource s;
  s.model = load_model(path, LoadOptions{at::kFloat, at::kCPU, keep_gguf_quantization});
  if (fs::is_directory(path)) {
    s.config = read_json(path / "config.json", "config.json");
    s.files_dir = path;
    s.kind = "hf";
  } else {
    s.config = hf_config_json(s.model->config());
    s.kind = "gguf";
  }
  return s;
}

ConvertSource load_convert_source(const fs::path& src, bool keep_quantization) {
  if (!fs::exists(src))
    throw Error("convert", fmt::format("source '{}' does not exist", src.string()),
                "pass an HF model folder, a .gguf file or an rlaif checkpoint directory");
  ConvertSource s;
  if (fs::is_directory(src) && fs::exists(src / "trainer_state.json")) {
    const nlohmann::json st = read_json(src / "trainer_state.json", "trainer_state.json");
    if (!st.contains("model") || !st["model"].is_string())
      throw Error("convert", fmt::format("{}: no \"model\" (the base model) in trainer_state.json", src.string()));
    const fs::path base = st["model"].get<std::string>();
    if (!fs::exists(base))
      throw Error("convert", fmt::format("{}: its base model '{}' (trainer_state.json) does not exist here",
                                         src.string(), base.string()),
                  "run convert from the directory training ran in, or fix \"model\" in trainer_state.json");
    s = load_base(base, /*keep_gguf_quantization=*/false);
    s.kind = "checkpoint";
    if (fs::exists(src / "adapter_config.json")) {
      load_peft_adapter(*s.model, src);
      merge_lora(*s.model);
    } else if (fs::exists(src / "model.safetensors")) {
      auto saved = load_safetensors(src / "model.safetensors");
      at::NoGradGuard no_grad;
      for (auto& [name, t] : s.model->named_weights()) {
        auto it = saved.find(name);
        if (it == saved.end())
          throw Error("convert", fmt::format("{}: model.safetensors lacks '{}'", src.string(), name));
        t.copy_(it->second);
      }
    } else {
      throw Error("convert", fmt::format("{}: checkpoint has neither adapter_config.json nor model.safetensors",
                                         src.string()));
    }
  } else if (fs::is_directory(src) || src.extension() == ".gguf") {
    s = load_base(src, keep_quantization);
  } else {
    throw Error("convert", fmt::format("'{}' is neither a model folder, a .gguf file nor a checkpoint", src.string()),
                "pass an HF model folder, a .gguf file or an rlaif checkpoint directory");
  }
  // An MLX-quantized source converts from its dequantized weights unless it keeps them.
  if (s.model->weights().quantized() && !(keep_quantization && s.kind != "checkpoint"))
    dequantize_model_weights(s.model->weights(), at::kFloat);
  s.config.erase("quantization");
  s.config.erase("quantization_config");
  return s;
}

ConvertStats write_mlx_folder(const ConvertSource& src, const fs::path& out, const QuantSpec& spec,
                              at::ScalarType dtype, const std::function<void(int64_t, int64_t)>& progress) {
  const ModelConfig& c = src.model->config();
  ModelWeights& w = src.model->weights();
  const auto expected = expected_tensors(c);
  std::map<std::string, at::Tensor> tensors;
  std::map<std::string, QuantSpec> module_specs;  // module path → its quantization
  ConvertStats stats;
  at::NoGradGuard no_grad;
  int64_t done = 0;
  for (const auto& [name, where] : expected) {
    const std::string m = name.substr(0, name.size() - std::string(".weight").size());
    auto put = [&](const QuantizedTensor& q, at::ScalarType scale_dtype) {
      tensors[name] = q.wq.contiguous().view(at::kUInt32);
      tensors[m + ".scales"] = q.scales.to(scale_dtype).contiguous();
      tensors[m + ".biases"] = q.biases.to(scale_dtype).contiguous();
      module_specs[m] = {q.bits, q.group_size};
      ++stats.quantized;
    };
    const QuantizedTensor* held = quantized_slot(w, where.first, where.second);
    if (held && held->defined()) {
      put(held->to(at::kCPU), exact_in_half(*held) ? at::kHalf : held->scales.scalar_type());
    } else {
      const at::Tensor t = weight_ref(w, where.first, where.second).detach().to(dtype).contiguous();
      if (spec.enabled() && quantize_this(w, where.first, where.second, t, spec))
        put(quantize_weight(t, spec, dtype), dtype);
      else
        tensors[name] = t;
    }
    if (progress) progress(++done, static_cast<int64_t>(expected.size()));
  }
  for (const auto& [n, t] : tensors) stats.bytes += static_cast<int64_t>(t.nbytes());
  stats.tensors = static_cast<int64_t>(tensors.size());
  fs::create_directories(out);
  save_safetensors(out / "model.safetensors", tensors, {{"format", "mlx"}});

  nlohmann::json config = src.config;
  config["torch_dtype"] = dtype_json_name(dtype);
  if (!module_specs.empty()) {
    // The most common (bits, group size) is the global entry; mlx_lm's per-module entries carry the others.
    std::map<std::pair<int64_t, int64_t>, int64_t> counts;
    for (const auto& [m, q] : module_specs) ++counts[{q.bits, q.group_size}];
    const auto global = std::max_element(counts.begin(), counts.end(),
                                         [](const auto& a, const auto& b) { return a.second < b.second; })->first;
    nlohmann::json q = {{"group_size", global.second}, {"bits", global.first}};
    for (const auto& [m, ms] : module_specs)
      if (std::pair{ms.bits, ms.group_size} != global) q[m] = {{"group_size", ms.group_size}, {"bits", ms.bits}};
    config["quantization"] = q;
    config["quantization_config"] = q;
  }
  write_file_atomic(out / "config.json", config.dump(4) + "\n");
  static const char* kFiles[] = {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                                 "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                                 "chat_template.json", "generation_config.json", "tokenizer.model"};
  if (!src.files_dir.empty())
    for (const char* f : kFiles)
      if (fs::exists(src.files_dir / f)) {
        write_file_atomic(out / f, read_file(src.files_dir / f));
        stats.copied_files.push_back(f);
      }
  return stats;
}

}  // namespace rlaif
