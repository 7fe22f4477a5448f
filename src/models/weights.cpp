// Weight name table (HF ↔ GGUF ↔ slot) and loading from safetensors checkpoints with zero-copy mmap views.
#include "models/weights.h"

#include <map>
#include <set>

#include "core/error.h"
#include "core/io.h"
#include "core/logging.h"
#include "core/safetensors.h"
#include <fmt/ranges.h>

namespace rlaif {

namespace fs = std::filesystem;

const std::vector<WeightName>& weight_names() {
  using S = WeightSlot;
  static const std::vector<WeightName> kNames = {
      {S::kEmbed, "model.embed_tokens.weight", "token_embd.weight", false},
      {S::kFinalNorm, "model.norm.weight", "output_norm.weight", false},
      {S::kLmHead, "lm_head.weight", "output.weight", false},
      {S::kInputNorm, "model.layers.{L}.input_layernorm.weight", "blk.{L}.attn_norm.weight", true},
      {S::kQ, "model.layers.{L}.self_attn.q_proj.weight", "blk.{L}.attn_q.weight", true},
      {S::kQBias, "model.layers.{L}.self_attn.q_proj.bias", "blk.{L}.attn_q.bias", true},
      {S::kK, "model.layers.{L}.self_attn.k_proj.weight", "blk.{L}.attn_k.weight", true},
      {S::kKBias, "model.layers.{L}.self_attn.k_proj.bias", "blk.{L}.attn_k.bias", true},
      {S::kV, "model.layers.{L}.self_attn.v_proj.weight", "blk.{L}.attn_v.weight", true},
      {S::kVBias, "model.layers.{L}.self_attn.v_proj.bias", "blk.{L}.attn_v.bias", true},
      {S::kO, "model.layers.{L}.self_attn.o_proj.weight", "blk.{L}.attn_output.weight", true},
      {S::kOBias, "model.layers.{L}.self_attn.o_proj.bias", "blk.{L}.attn_output.bias", true},
      {S::kPostNorm, "model.layers.{L}.post_attention_layernorm.weight", "blk.{L}.ffn_norm.weight", true},
      {S::kGate, "model.layers.{L}.mlp.gate_proj.weight", "blk.{L}.ffn_gate.weight", true},
      {S::kGateBias, "model.layers.{L}.mlp.gate_proj.bias", "blk.{L}.ffn_gate.bias", true},
      {S::kUp, "model.layers.{L}.mlp.up_proj.weight", "blk.{L}.ffn_up.weight", true},
      {S::kUpBias, "model.layers.{L}.mlp.up_proj.bias", "blk.{L}.ffn_up.bias", true},
      {S::kDown, "model.layers.{L}.mlp.down_proj.weight", "blk.{L}.ffn_down.weight", true},
      {S::kDownBias, "model.layers.{L}.mlp.down_proj.bias", "blk.{L}.ffn_down.bias", true},
  };
  return kNames;
}

static bool slot_present(WeightSlot s, const ModelConfig& c) {
  using S = WeightSlot;
  switch (s) {
    case S::kLmHead: return !c.tie_word_embeddings;
    case S::kQBias: case S::kKBias: case S::kVBias: return c.qkv_bias;
    case S::kOBias: return c.o_bias;
    case S::kGateBias: case S::kUpBias: case S::kDownBias: return c.mlp_bias;
    default: return true;
  }
}

static std::string with_layer(const char* pattern, int layer) {
  std::string s = pattern;
  if (auto p = s.find("{L}"); p != std::string::npos) s.replace(p, 3, std::to_string(layer));
  return s;
}

std::vector<std::pair<std::string, std::pair<WeightSlot, int>>> expected_tensors(const ModelConfig& c,
                                                                                 bool gguf_names) {
  std::vector<std::pair<std::string, std::pair<WeightSlot, int>>> out;
  for (const auto& n : weight_names()) {
    if (!slot_present(n.slot, c)) continue;
    const char* pattern = gguf_names ? n.gguf : n.hf;
    if (!n.per_layer) {
      out.push_back({pattern, {n.slot, -1}});
      continue;
    }
    for (int l = 0; l < c.num_layers; ++l) out.push_back({with_layer(pattern, l), {n.slot, l}});
  }
  return out;
}

at::Tensor& weight_ref(ModelWeights& w, WeightSlot slot, int layer) {
  using S = WeightSlot;
  switch (slot) {
    case S::kEmbed: return w.embed;
    case S::kFinalNorm: return w.final_norm;
    case S::kLmHead: return w.lm_head;
    default: break;
  }
  RLAIF_CHECK(layer >= 0 && layer < static_cast<int>(w.layers.size()), "layer {}", layer);
  LayerWeights& L = w.layers[layer];
  switch (slot) {
    case S::kInputNorm: return L.input_norm;
    case S::kQ: return L.wq;
    case S::kQBias: return L.bq;
    case S::kK: return L.wk;
    case S::kKBias: return L.bk;
    case S::kV: return L.wv;
    case S::kVBias: return L.bv;
    case S::kO: return L.wo;
    case S::kOBias: return L.bo;
    case S::kPostNorm: return L.post_norm;
    case S::kGate: return L.w_gate;
    case S::kGateBias: return L.b_gate;
    case S::kUp: return L.w_up;
    case S::kUpBias: return L.b_up;
    case S::kDown: return L.w_down;
    case S::kDownBias: return L.b_down;
    default: break;
  }
  RLAIF_CHECK(false, "unhandled slot {}", static_cast<int>(slot));
  return w.embed;
}

static at::ScalarType to_scalar_type(DType t, const std::string& name) {
  switch (t) {
    case DType::kF32: return at::kFloat;
    case DType::kF16: return at::kHalf;
    case DType::kBF16: return at::kBFloat16;
    case DType::kF64: return at::kDouble;
    case DType::kI64: return at::kLong;
    case DType::kI32: return at::kInt;
    case DType::kI16: return at::kShort;
    case DType::kI8: return at::kChar;
    case DType::kU8: return at::kByte;
    case DType::kBool: return at::kBool;
    case DType::kU32: return at::kUInt32;
    case DType::kU16: return at::kUInt16;
    case DType::kU64: return at::kUInt64;
    default:
      throw Error("weights", fmt::format("tensor '{}' has dtype {} which cannot be used as a weight", name, dtype_name(t)));
  }
}

at::ScalarType parse_torch_dtype(const std::string& name) {
  if (name == "bf16" || name == "bfloat16") return at::kBFloat16;
  if (name == "fp16" || name == "f16" || name == "float16" || name == "half") return at::kHalf;
  if (name == "fp32" || name == "f32" || name == "float32" || name == "float") return at::kFloat;
  throw Error("weights", fmt::format("unknown dtype '{}'", name), "use bf16, fp16 or fp32");
}

namespace {

// "model.layers.0.mlp.up_proj.weight" → "model.layers.0.mlp.up_proj" (the module path MLX keys scales by).
std::string module_of(const std::string& weight_name) {
  const std::string suffix = ".weight";
  if (weight_name.size() <= suffix.size() || weight_name.compare(weight_name.size() - suffix.size(), suffix.size(), suffix) != 0)
    return "";
  return weight_name.substr(0, weight_name.size() - suffix.size());
}

bool quantizable_slot(WeightSlot s) {
  using S = WeightSlot;
  switch (s) {
    case S::kEmbed: case S::kLmHead: case S::kQ: case S::kK: case S::kV: case S::kO: case S::kGate: case S::kUp:
    case S::kDown:
      return true;
    default:
      return false;
  }
}

// A zero-copy tensor over a checkpoint view (the mapping stays alive while the tensor does).
at::Tensor view_tensor(const Checkpoint& ckpt, const std::string& name, at::ScalarType st) {
  const TensorView* v = ckpt.find(name);
  auto owner = ckpt.owner(name);
  return at::from_blob(v->data, v->shape, [owner](void*) {}, at::TensorOptions().dtype(st));
}

}  // namespace

ModelWeights load_hf_weights(const fs::path& dir, const ModelConfig& c, const LoadOptions& opt) {
  const Checkpoint ckpt = Checkpoint::open_dir(dir);
  const auto expected = expected_tensors(c);
  // MLX-quantized folders: a weight is quantized exactly when "<module>.scales" exists (mlx_lm's load rule).
  const fs::path config_path = dir / "config.json";
  const nlohmann::json config = fs::exists(config_path) ? nlohmann::json::parse(read_file(config_path), nullptr, false)
                                                        : nlohmann::json::object();
  const std::optional<QuantSpec> qspec = config.is_object() ? quantization_from_config(config, config_path.string())
                                                            : std::nullopt;
  auto is_quantized = [&](const std::string& name) {
    const std::string m = module_of(name);
    return qspec && !m.empty() && ckpt.find(m + ".scales") != nullptr;
  };
  std::set<std::string> expected_names;
  for (const auto& e : expected) {
    expected_names.insert(e.first);
    if (is_quantized(e.first)) {
      expected_names.insert(module_of(e.first) + ".scales");
      expected_names.insert(module_of(e.first) + ".biases");
    }
  }

  std::vector<std::string> missing, unexpected;
  for (const auto& n : expected_names)
    if (!ckpt.find(n)) missing.push_back(n);
  for (const auto& name : ckpt.names()) {
    if (expected_names.count(name)) continue;
    // Tolerated extras: rotary buffers some old Llama checkpoints saved, and a redundant copy of a tied head.
    if (name.find("rotary_emb.inv_freq") != std::string::npos) continue;
    if (c.tie_word_embeddings && name.rfind("lm_head.", 0) == 0) continue;
    unexpected.push_back(name);
  }
  if (!missing.empty() || !unexpected.empty()) {
    std::string msg = fmt::format("{}: checkpoint does not match its config.json ({} {} layers)", dir.string(),
                                  c.architecture, c.num_layers);
    if (!missing.empty()) msg += fmt::format("; missing tensors: {}", fmt::join(missing, ", "));
    if (!unexpected.empty()) msg += fmt::format("; unexpected tensors: {}", fmt::join(unexpected, ", "));
    throw Error("weights", msg, "the files may be from another model or a different transformers version");
  }

  ModelWeights w;
  w.layers.resize(c.num_layers);
  for (const auto& [name, where] : expected) {
    if (is_quantized(name)) {
      const std::string m = module_of(name);
      if (!quantizable_slot(where.first))
        throw Error("weights", fmt::format("{}: '{}' has quantization scales, but only linear and embedding weights "
                                           "can be quantized", dir.string(), name));
      const QuantSpec spec = quantization_for(config, m, *qspec);
      const TensorView* v = ckpt.find(name);
      const at::ScalarType sst = to_scalar_type(ckpt.find(m + ".scales")->dtype, m + ".scales");
      if (v->dtype != DType::kU32 || v->shape.size() != 2 || !spec.enabled() ||
          (sst != at::kFloat && sst != at::kBFloat16 && sst != at::kHalf) ||
          ckpt.find(m + ".biases")->dtype != ckpt.find(m + ".scales")->dtype)
        throw Error("weights", fmt::format("{}: quantized '{}' must be uint32 [out, in*bits/32] with float scales and "
                                           "biases of one dtype", dir.string(), m));
      // The packed words keep their representation: int32 over the same bits, zero-copy on the CPU.
      QuantizedTensor q{view_tensor(ckpt, name, at::kInt), view_tensor(ckpt, m + ".scales", sst),
                        view_tensor(ckpt, m + ".biases", sst), spec.bits, spec.group_size};
      const int64_t in = q.in_features();
      if (!quantizable(in, spec) || q.scales.sizes() != at::IntArrayRef({q.out_features(), in / spec.group_size}) ||
          q.biases.sizes() != q.scales.sizes())
        throw Error("weights", fmt::format("{}: '{}' scales/biases {} do not fit {}-bit words {} with group size {}",
                                           dir.string(), m, q.scales.sizes(), spec.bits, q.wq.sizes(), spec.group_size));
      if (opt.device != at::kCPU) q = q.to(opt.device);
      if (where.first == WeightSlot::kEmbed || where.first == WeightSlot::kLmHead)
        weight_ref(w, where.first, where.second) = q.dequantize(opt.dtype);  // see ModelWeights::embed_q
      *quantized_slot(w, where.first, where.second) = std::move(q);
      continue;
    }
    const TensorView* v = ckpt.find(name);
    const at::ScalarType st = to_scalar_type(v->dtype, name);
    // Zero-copy view of the private mapping; the deleter keeps the mapping alive as long as the tensor.
    at::Tensor t = view_tensor(ckpt, name, st);
    if (st != opt.dtype || opt.device != at::kCPU) t = t.to(opt.device, opt.dtype);
    weight_ref(w, where.first, where.second) = t;
  }
  if (c.tie_word_embeddings) {
    w.lm_head = w.embed;
    w.lm_head_q = w.embed_q;
  }

  // Shapes against the config, so a mismatched checkpoint fails here and not deep inside a matmul.
  const int64_t D = c.hidden_size, F = c.intermediate_size, hd = c.head_dim;
  auto expect_shape = [&](WeightSlot slot, int layer, std::vector<int64_t> shape, const std::string& what) {
    const QuantizedTensor* q = quantized_slot(w, slot, layer);
    const std::vector<int64_t> got = q && q->defined() ? std::vector<int64_t>{q->out_features(), q->in_features()}
                                                       : weight_ref(w, slot, layer).sizes().vec();
    if (got != shape)
      throw Error("weights", fmt::format("{}: {} has shape [{}], config.json implies [{}]", dir.string(), what,
                                         fmt::join(got, ", "), fmt::join(shape, ", ")));
  };
  using S = WeightSlot;
  expect_shape(S::kEmbed, -1, {c.vocab_size, D}, "model.embed_tokens.weight");
  for (int l = 0; l < c.num_layers; ++l) {
    const std::string p = fmt::format("layer {} ", l);
    expect_shape(S::kQ, l, {c.num_heads * hd, D}, p + "q_proj");
    expect_shape(S::kK, l, {c.num_kv_heads * hd, D}, p + "k_proj");
    expect_shape(S::kV, l, {c.num_kv_heads * hd, D}, p + "v_proj");
    expect_shape(S::kO, l, {D, c.num_heads * hd}, p + "o_proj");
    expect_shape(S::kGate, l, {F, D}, p + "gate_proj");
    expect_shape(S::kUp, l, {F, D}, p + "up_proj");
    expect_shape(S::kDown, l, {D, F}, p + "down_proj");
  }
  // On the CPU with matching dtype the tensors are zero-copy views of the file; elsewhere they were copied anyway.
  if (opt.device != at::kCPU) pack_projection_groups(w);
  return w;
}

void pack_rows(const std::vector<at::Tensor*>& parts) {
  std::vector<at::Tensor> ts;
  for (at::Tensor* t : parts) {
    if (!t->defined() || t->dim() < 1 || t->scalar_type() != parts[0]->scalar_type() ||
        t->device() != parts[0]->device() || t->sizes().slice(1) != parts[0]->sizes().slice(1))
      return;
    ts.push_back(t->detach());
  }
  if (packed_rows({parts.begin(), parts.end()}).defined()) return;  // already one buffer
  const at::Tensor buf = at::cat(ts, 0);
  int64_t row = 0;
  for (at::Tensor* t : parts) {
    const int64_t rows = t->size(0);
    *t = buf.narrow(0, row, rows);
    row += rows;
  }
}

void pack_projection_groups(ModelWeights& w) {
  at::NoGradGuard no_grad;
  for (LayerWeights& L : w.layers) {
    // A group whose weights are all quantized alike packs their words, scales and biases (packed_quant).
    const auto pack_group = [&](std::initializer_list<Proj> ps, std::vector<at::Tensor*> plain) {
      std::vector<at::Tensor*> words, scales, biases;
      const QuantizedTensor& first = L.quant[static_cast<int>(*ps.begin())];
      for (Proj p : ps) {
        QuantizedTensor& q = L.quant[static_cast<int>(p)];
        if (!q.defined()) continue;
        if (q.bits != first.bits || q.group_size != first.group_size) return;
        words.push_back(&q.wq);
        scales.push_back(&q.scales);
        biases.push_back(&q.biases);
      }
      if (words.empty()) {
        pack_rows(plain);
      } else if (words.size() == ps.size()) {
        pack_rows(words);
        pack_rows(scales);
        pack_rows(biases);
      }
    };
    pack_group({Proj::kQ, Proj::kK, Proj::kV}, {&L.wq, &L.wk, &L.wv});
    pack_rows({&L.bq, &L.bk, &L.bv});
    pack_group({Proj::kGate, Proj::kUp}, {&L.w_gate, &L.w_up});
    pack_rows({&L.b_gate, &L.b_up});
  }
}

QuantizedTensor packed_quant(const std::vector<const QuantizedTensor*>& parts) {
  if (parts.empty()) return {};
  std::vector<const at::Tensor*> words, scales, biases;
  for (const QuantizedTensor* q : parts) {
    if (!q->defined() || q->bits != parts[0]->bits || q->group_size != parts[0]->group_size) return {};
    words.push_back(&q->wq);
    scales.push_back(&q->scales);
    biases.push_back(&q->biases);
  }
  QuantizedTensor packed;
  packed.wq = packed_rows(words);
  packed.scales = packed_rows(scales);
  packed.biases = packed_rows(biases);
  if (!packed.wq.defined() || !packed.scales.defined() || !packed.biases.defined()) return {};
  packed.bits = parts[0]->bits;
  packed.group_size = parts[0]->group_size;
  return packed;
}

at::Tensor packed_rows(const std::vector<const at::Tensor*>& parts) {
  if (parts.empty() || !parts[0]->defined()) return {};
  const at::Tensor& first = *parts[0];
  int64_t rows = 0;
  int64_t next = first.storage_offset();
  for (const at::Tensor* t : parts) {
    if (!t->defined() || !t->is_contiguous() || t->dim() != first.dim() || t->sizes().slice(1) != first.sizes().slice(1) ||
        t->scalar_type() != first.scalar_type() || !t->storage().is_alias_of(first.storage()) ||
        t->storage_offset() != next)
      return {};
    next += t->numel();
    rows += t->size(0);
  }
  std::vector<int64_t> shape = first.sizes().vec();
  shape[0] = rows;
  return first.as_strided(shape, first.strides());
}

bool ModelWeights::quantized() const {
  if (embed_q.defined() || lm_head_q.defined()) return true;
  for (const auto& L : layers)
    for (const auto& q : L.quant)
      if (q.defined()) return true;
  return false;
}

const QuantizedTensor* quantized_slot(const ModelWeights& w, WeightSlot slot, int layer) {
  return quantized_slot(const_cast<ModelWeights&>(w), slot, layer);
}

QuantizedTensor* quantized_slot(ModelWeights& w, WeightSlot slot, int layer) {
  using S = WeightSlot;
  switch (slot) {
    case S::kEmbed: return &w.embed_q;
    case S::kLmHead: return &w.lm_head_q;
    case S::kQ: return &w.layers.at(layer).quant[static_cast<int>(Proj::kQ)];
    case S::kK: return &w.layers.at(layer).quant[static_cast<int>(Proj::kK)];
    case S::kV: return &w.layers.at(layer).quant[static_cast<int>(Proj::kV)];
    case S::kO: return &w.layers.at(layer).quant[static_cast<int>(Proj::kO)];
    case S::kGate: return &w.layers.at(layer).quant[static_cast<int>(Proj::kGate)];
    case S::kUp: return &w.layers.at(layer).quant[static_cast<int>(Proj::kUp)];
    case S::kDown: return &w.layers.at(layer).quant[static_cast<int>(Proj::kDown)];
    default: return nullptr;
  }
}

const at::Tensor& LayerWeights::weight(Proj p) const {
  const at::Tensor* w[kNumProj] = {&wq, &wk, &wv, &wo, &w_gate, &w_up, &w_down};
  return *w[static_cast<int>(p)];
}

const std::vector<Proj>& group_projs(ProjGroup g) {
  static const std::vector<Proj> groups[kNumProjGroups] = {
      {Proj::kQ, Proj::kK, Proj::kV}, {Proj::kO}, {Proj::kGate, Proj::kUp}, {Proj::kDown}};
  return groups[static_cast<int>(g)];
}

const at::Tensor& LayerWeights::bias(Proj p) const {
  const at::Tensor* b[kNumProj] = {&bq, &bk, &bv, &bo, &b_gate, &b_up, &b_down};
  return *b[static_cast<int>(p)];
}

std::vector<std::pair<std::string, at::Tensor>> named_weights(const ModelWeights& w, const ModelConfig& c) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  auto& mw = const_cast<ModelWeights&>(w);
  for (const auto& [name, where] : expected_tensors(c)) {
    const QuantizedTensor* q = quantized_slot(mw, where.first, where.second);
    if (q && q->defined()) {
      const std::string m = module_of(name);
      out.push_back({name, q->wq.view(at::kUInt32)});  // MLX stores the words as U32
      out.push_back({m + ".scales", q->scales});
      out.push_back({m + ".biases", q->biases});
      continue;
    }
    out.push_back({name, weight_ref(mw, where.first, where.second)});
  }
  return out;
}

}  // namespace rlaif

namespace rlaif {

static DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kF32;
    case at::kHalf: return DType::kF16;
    case at::kBFloat16: return DType::kBF16;
    case at::kDouble: return DType::kF64;
    case at::kLong: return DType::kI64;
    case at::kInt: return DType::kI32;
    case at::kShort: return DType::kI16;
    case at::kChar: return DType::kI8;
    case at::kByte: return DType::kU8;
    case at::kBool: return DType::kBool;
    case at::kUInt32: return DType::kU32;
    default: RLAIF_CHECK(false, "no safetensors dtype for {}", c10::toString(t)); return DType::kF32;
  }
}

std::map<std::string, at::Tensor> load_safetensors(const fs::path& path) {
  auto f = SafetensorsFile::open(path);
  std::map<std::string, at::Tensor> out;
  for (const auto& v : f->tensors())
    out[v.name] = at::from_blob(v.data, v.shape, at::TensorOptions().dtype(to_scalar_type(v.dtype, v.name))).clone();
  return out;
}

void save_safetensors(const fs::path& path, const std::map<std::string, at::Tensor>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  SafetensorsWriter w;
  for (const auto& [name, t] : tensors) {
    at::Tensor c = t.detach().to(at::kCPU).contiguous();
    w.add(name, to_dtype(c.scalar_type()), c.sizes().vec(), c.data_ptr(), c.nbytes());
  }
  for (const auto& [k, v] : metadata) w.set_metadata(k, v);
  w.write(path);
}

}  // namespace rlaif
