// GGUF → DecoderModel. llama.cpp's converter permutes q/k rows of Llama models into the interleaved (GPT-J)
// rotary layout; our decoder, like transformers, rotates halves (NeoX), so those rows are permuted back here.
#include "models/gguf_model.h"

#include <set>

#include "core/error.h"
#include "core/logging.h"

namespace rlaif {

namespace fs = std::filesystem;

ModelConfig gguf_model_config(const GgufFile& g) {
  const std::string arch = g.get_string("general.architecture");
  if (arch != "llama" && arch != "qwen2")
    throw Error("gguf", fmt::format("{}: architecture '{}' is not supported", g.path().string(), arch),
                "supported GGUF architectures: llama, qwen2");
  auto key = [&](const char* k) { return arch + "." + k; };
  ModelConfig c;
  c.family = arch;
  c.architecture = arch == "llama" ? "LlamaForCausalLM" : "Qwen2ForCausalLM";
  c.hidden_size = g.get_u32(key("embedding_length"));
  c.intermediate_size = g.get_u32(key("feed_forward_length"));
  c.num_layers = g.get_u32(key("block_count"));
  c.num_heads = g.get_u32(key("attention.head_count"));
  c.num_kv_heads = g.has(key("attention.head_count_kv")) ? g.get_u32(key("attention.head_count_kv")) : c.num_heads;
  c.head_dim = c.hidden_size / c.num_heads;
  if (g.has(key("rope.dimension_count")) && g.get_u32(key("rope.dimension_count")) != c.head_dim)
    throw Error("gguf", fmt::format("{}: partial rotary embeddings (rope.dimension_count {} != head_dim {}) are not supported",
                                    g.path().string(), g.get_u32(key("rope.dimension_count")), c.head_dim));
  c.max_position_embeddings = g.has(key("context_length")) ? g.get_u32(key("context_length")) : 4096;
  c.rms_norm_eps = g.get_f32(key("attention.layer_norm_rms_epsilon"));
  c.rope.theta = g.has(key("rope.freq_base")) ? g.get_f32(key("rope.freq_base")) : 10000.0;
  const GgufTensor* embd = g.find("token_embd.weight");
  if (!embd) throw Error("gguf", fmt::format("{}: no token_embd.weight tensor", g.path().string()));
  c.vocab_size = embd->dims.at(1);
  c.tie_word_embeddings = g.find("output.weight") == nullptr;
  c.qkv_bias = g.find("blk.0.attn_q.bias") != nullptr;
  c.o_bias = g.find("blk.0.attn_output.bias") != nullptr;
  c.mlp_bias = g.find("blk.0.ffn_up.bias") != nullptr;
  if (g.has("tokenizer.ggml.bos_token_id")) c.bos_token_id = g.get_u32("tokenizer.ggml.bos_token_id");
  if (g.has("tokenizer.ggml.eos_token_id")) c.eos_token_ids = {g.get_u32("tokenizer.ggml.eos_token_id")};
  return c;
}

// Inverse of llama.cpp's permute(): rows grouped per head as [hd/2, 2] pairs become [2, hd/2] halves.
static at::Tensor unpermute_rotary_rows(const at::Tensor& w, int64_t heads) {
  const int64_t rows = w.size(0), hd = rows / heads;
  std::vector<int64_t> rest(w.sizes().begin() + 1, w.sizes().end());
  std::vector<int64_t> shape = {heads, hd / 2, 2};
  shape.insert(shape.end(), rest.begin(), rest.end());
  return w.reshape(shape).transpose(1, 2).reshape(w.sizes()).contiguous();
}

std::shared_ptr<DecoderModel> load_gguf_model(const fs::path& path, const LoadOptions& opt) {
  auto g = GgufFile::open(path);
  ModelConfig c = gguf_model_config(*g);
  ModelWeights w;
  w.layers.resize(c.num_layers);
  const auto expected = expected_tensors(c, /*gguf_names=*/true);
  std::vector<std::string> missing;
  size_t used = 0;
  for (const auto& [name, where] : expected) {
    const GgufTensor* t = g->find(name);
    if (!t) {
      missing.push_back(name);
      continue;
    }
    ++used;
    std::vector<float> values = g->dequantize(*t);
    at::Tensor x = at::from_blob(values.data(), t->shape(), at::kFloat).clone();
    if (c.family == "llama" && (where.first == WeightSlot::kQ || where.first == WeightSlot::kQBias))
      x = unpermute_rotary_rows(x, c.num_heads);
    if (c.family == "llama" && (where.first == WeightSlot::kK || where.first == WeightSlot::kKBias))
      x = unpermute_rotary_rows(x, c.num_kv_heads);
    weight_ref(w, where.first, where.second) = x.to(opt.device, opt.dtype);
  }
  if (!missing.empty())
    throw Error("gguf", fmt::format("{}: missing tensors: {}", path.string(), fmt::join(missing, ", ")));
  if (used != g->tensors().size()) {
    std::set<std::string> known;
    for (const auto& e : expected) known.insert(e.first);
    std::vector<std::string> extra;
    for (const auto& t : g->tensors())
      if (!known.count(t.name) && t.name.find("rope_freqs") == std::string::npos) extra.push_back(t.name);
    if (!extra.empty())
      throw Error("gguf", fmt::format("{}: unexpected tensors: {}", path.string(), fmt::join(extra, ", ")));
  }
  if (c.tie_word_embeddings) w.lm_head = w.embed;
  log_debug("loaded {} ({} layers, dim {}, vocab {}) from GGUF", path.filename().string(), c.num_layers,
            c.hidden_size, c.vocab_size);
  return std::make_shared<DecoderModel>(std::move(c), std::move(w));
}

std::shared_ptr<DecoderModel> load_model(const fs::path& path, const LoadOptions& opt) {
  if (fs::is_regular_file(path) && path.extension() == ".gguf") return load_gguf_model(path, opt);
  if (fs::is_directory(path)) return DecoderModel::load(path, opt);
  throw Error("model", fmt::format("'{}' is neither a model folder nor a .gguf file", path.string()),
              "pass a Hugging Face model folder (config.json + safetensors) or a .gguf file");
}

}  // namespace rlaif
