// GGUF → DecoderModel. llama.cpp's converter permutes q/k rows of Llama models into the interleaved (GPT-J)
// rotary layout; our decoder, like transformers, rotates halves (NeoX), so those rows are permuted back here.
// Q8_0/Q4_0/Q4_1 blocks are MLX affine groups of 32 in another byte layout, so they can stay packed.
#include "models/gguf_model.h"

#include <ATen/Parallel.h>

#include <cstring>
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

bool gguf_repackable(GgmlType type) {
  return type == GgmlType::kQ8_0 || type == GgmlType::kQ4_0 || type == GgmlType::kQ4_1;
}

namespace {

uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);  // GGUF is little-endian, as every host rlaif builds for
  return v;
}

uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// One ggml block (32 elements) → `bits` MLX words (element i at bits (i mod 32/bits)·bits of word i/(32/bits)),
// its scale and bias. Block layouts: ggml/src/ggml-common.h (block_q8_0, block_q4_0, block_q4_1); values:
// dequantize_row_q8_0/q4_0/q4_1 in ggml/src/ggml-quants.c.
void repack_block(GgmlType type, const uint8_t* blk, uint32_t* words, float* scale, float* bias) {
  const float d = fp16_to_f32(load_u16(blk));
  *scale = d;
  if (type == GgmlType::kQ8_0) {
    // int8 q → unsigned q + 128 flips the top bit of each byte; four little-endian bytes are one word.
    for (int j = 0; j < 8; ++j) words[j] = load_u32(blk + 2 + 4 * j) ^ 0x80808080u;
    *bias = -128.0f * d;
    return;
  }
  // 4 bits: byte i holds element i in its low nibble and element i + 16 in its high nibble.
  const uint8_t* qs = blk + (type == GgmlType::kQ4_1 ? 4 : 2);
  for (int j = 0; j < 4; ++j) {
    uint32_t word = 0;
    for (int e = 0; e < 8; ++e) {
      const int i = 8 * j + e;
      const uint32_t nib = i < 16 ? qs[i] & 0xFu : qs[i - 16] >> 4;
      word |= nib << (4 * e);
    }
    words[j] = word;
  }
  *bias = type == GgmlType::kQ4_1 ? fp16_to_f32(load_u16(blk + 2)) : -8.0f * d;
}

}  // namespace

QuantizedTensor repack_gguf_tensor(const GgufTensor& t, at::ScalarType scale_dtype) {
  if (!gguf_repackable(t.type) || t.dims.size() != 2)
    throw Error("gguf", fmt::format("tensor '{}' ({}, {} dims) cannot be repacked as MLX affine weights", t.name,
                                    ggml_type_name(t.type), t.dims.size()),
                "only 2-D Q8_0, Q4_0 and Q4_1 tensors map onto MLX's format");
  const GgmlTypeInfo& info = ggml_type_info(t.type);
  const int64_t in = t.dims[0], out = t.dims[1], blocks = in / info.block_size;
  const int64_t bits = t.type == GgmlType::kQ8_0 ? 8 : 4;
  RLAIF_CHECK(in % info.block_size == 0 && t.nbytes == static_cast<size_t>(out * blocks * info.type_size),
              "repack_gguf_tensor: '{}' holds {} bytes for [{}, {}]", t.name, t.nbytes, out, in);
  at::Tensor wq = at::empty({out, in * bits / 32}, at::kInt);
  at::Tensor scales = at::empty({out, blocks}, at::kFloat), biases = at::empty({out, blocks}, at::kFloat);
  auto* wp = static_cast<uint32_t*>(wq.data_ptr());
  float* sp = scales.data_ptr<float>();
  float* bp = biases.data_ptr<float>();
  // Blocks run row-major over [out, in/32], as do the groups; a block of 32 elements is `bits` words.
  at::parallel_for(0, out * blocks, 4096, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) repack_block(t.type, t.data + b * info.type_size, wp + b * bits, sp + b, bp + b);
  });
  return {wq, scales.to(scale_dtype), biases.to(scale_dtype), bits, 32};
}

std::shared_ptr<DecoderModel> load_gguf_model(const fs::path& path, const LoadOptions& opt) {
  auto g = GgufFile::open(path);
  ModelConfig c = gguf_model_config(*g);
  ModelWeights w;
  w.layers.resize(c.num_layers);
  const auto expected = expected_tensors(c, /*gguf_names=*/true);
  // The packed kernels take float32/bfloat16 activations (kernels/cpu/quant.h); float16 loads dequantize.
  const bool keep = opt.keep_gguf_quantization && (opt.dtype == at::kFloat || opt.dtype == at::kBFloat16);
  std::map<std::string, int64_t> kept;  // ggml type name → tensors kept packed
  int64_t dequantized = 0;
  std::vector<std::string> missing;
  size_t used = 0;
  for (const auto& [name, where] : expected) {
    const GgufTensor* t = g->find(name);
    if (!t) {
      missing.push_back(name);
      continue;
    }
    ++used;
    QuantizedTensor* slot = quantized_slot(w, where.first, where.second);
    if (keep && slot && gguf_repackable(t->type) && t->dims.size() == 2) {
      QuantizedTensor q = repack_gguf_tensor(*t, opt.dtype);
      const bool rotary = c.family == "llama" && (where.first == WeightSlot::kQ || where.first == WeightSlot::kK);
      if (rotary) {
        const int64_t heads = where.first == WeightSlot::kQ ? c.num_heads : c.num_kv_heads;
        q.wq = unpermute_rotary_rows(q.wq, heads);
        q.scales = unpermute_rotary_rows(q.scales, heads);
        q.biases = unpermute_rotary_rows(q.biases, heads);
      }
      if (opt.device != at::kCPU) q = q.to(opt.device);
      if (where.first == WeightSlot::kEmbed || where.first == WeightSlot::kLmHead)
        weight_ref(w, where.first, where.second) = q.dequantize(opt.dtype);  // see ModelWeights::embed_q
      *slot = std::move(q);
      ++kept[std::string(ggml_type_name(t->type))];
      continue;
    }
    if (t->type != GgmlType::kF32 && t->type != GgmlType::kF16 && t->type != GgmlType::kBF16) ++dequantized;
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
  if (c.tie_word_embeddings) {
    w.lm_head = w.embed;
    w.lm_head_q = w.embed_q;
  }
  if (!kept.empty()) {
    std::vector<std::string> parts;
    for (const auto& [type, n] : kept) parts.push_back(fmt::format("{} {}", n, type));
    log_info("{}: kept {} GGUF-quantized tensors packed as MLX affine weights (group 32, scales in {}){}",
             path.filename().string(), fmt::join(parts, ", "), opt.dtype == at::kFloat ? "float32" : "bfloat16",
             dequantized ? fmt::format("; dequantized {} other quantized tensors", dequantized) : "");
  } else if (opt.keep_gguf_quantization && dequantized) {
    log_info("{}: dequantized {} quantized tensors ({}: only Q8_0/Q4_0/Q4_1 stay packed, for float32/bfloat16)",
             path.filename().string(), dequantized, c10::toString(opt.dtype));
  }
  log_debug("loaded {} ({} layers, dim {}, vocab {}) from GGUF", path.filename().string(), c.num_layers,
            c.hidden_size, c.vocab_size);
  pack_projection_groups(w);
  return std::make_shared<DecoderModel>(std::move(c), std::move(w));
}

std::shared_ptr<DecoderModel> load_model(const fs::path& path, const LoadOptions& opt) {
  if (fs::is_regular_file(path) && path.extension() == ".gguf") return load_gguf_model(path, opt);
  if (fs::is_directory(path)) return DecoderModel::load(path, opt);
  throw Error("model", fmt::format("'{}' is neither a model folder nor a .gguf file", path.string()),
              "pass a Hugging Face model folder (config.json + safetensors) or a .gguf file");
}

}  // namespace rlaif
