// The weight tensors of a decoder model, shared by the trainer (autograd leaves) and the generation engine
// (read in place). Loading maps checkpoint names onto slots through one data table (weights.cpp).
#pragma once

#include <ATen/ATen.h>

#include <filesystem>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "models/model_config.h"
#include "models/quantized.h"

namespace rlaif {

// A LoRA adapter on one projection: y = x·Wᵀ + b + scale · (dropout(x)·Aᵀ)·Bᵀ, as PEFT computes it.
struct LoraAdapter {
  at::Tensor a;        // [r, in]
  at::Tensor b;        // [out, r]
  double scale = 0.0;  // lora_alpha / r
  double dropout = 0.0;
  bool defined() const { return a.defined(); }
};

// The seven adapted projections of a layer, in PEFT's target-module names.
enum class Proj { kQ = 0, kK, kV, kO, kGate, kUp, kDown };
constexpr int kNumProj = 7;
constexpr const char* kProjNames[kNumProj] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};

// Projections that share an input in the decode step, each group's in packing order (group_projs).
enum class ProjGroup { kQkv = 0, kO, kGateUp, kDown };
constexpr int kNumProjGroups = 4;
const std::vector<Proj>& group_projs(ProjGroup g);

// How adapters apply in a forward: off computes the frozen base model (the KL reference under LoRA, with no
// second copy of the weights); dropout only while training.
struct AdapterMode {
  bool enabled = true;
  bool training = false;
};

struct LayerWeights {
  at::Tensor input_norm;               // [D]
  at::Tensor wq, bq, wk, bk, wv, bv;   // [H*hd, D], [KV*hd, D] (+ biases)
  at::Tensor wo, bo;                   // [D, H*hd]
  at::Tensor post_norm;                // [D]
  at::Tensor w_gate, b_gate, w_up, b_up;  // [F, D]
  at::Tensor w_down, b_down;           // [D, F]
  LoraAdapter lora[kNumProj];          // empty unless LoRA is attached (models/lora.h)
  // Projections loaded quantized (MLX format) hold their weight here and leave the plain tensor undefined;
  // layers::project dispatches on which one is set.
  QuantizedTensor quant[kNumProj];
  // Per group, when pack_lora_rows (models/lora.h) laid it out: the rows right after the group's packed weight
  // holding its adapters' A in the weights' dtype ([Σ r, D]), and the zeros after its packed bias ([Σ r]; undefined
  // when the group has no bias).
  at::Tensor lora_rows[kNumProjGroups], lora_bias_rows[kNumProjGroups];

  const at::Tensor& weight(Proj p) const;
  const at::Tensor& bias(Proj p) const;
  at::Tensor& weight(Proj p) { return const_cast<at::Tensor&>(std::as_const(*this).weight(p)); }
  at::Tensor& bias(Proj p) { return const_cast<at::Tensor&>(std::as_const(*this).bias(p)); }
};

struct ModelWeights {
  at::Tensor embed;       // [V, D]
  at::Tensor final_norm;  // [D]
  at::Tensor lm_head;     // [V, D]; the same tensor as `embed` when tied
  std::vector<LayerWeights> layers;
  // Quantized embedding / untied head (MLX folders). `embed` and `lm_head` then hold dequantized copies as well,
  // because engine/ and decoder.cpp index `embed` and multiply `lm_head` directly; layers::embed/layers::logits
  // compute from the packed form.
  QuantizedTensor embed_q, lm_head_q;
  bool quantized() const;
};

// Where a tensor lives in ModelWeights; the name table maps each slot to its HF and GGUF names.
enum class WeightSlot {
  kEmbed, kFinalNorm, kLmHead, kInputNorm, kQ, kQBias, kK, kKBias, kV, kVBias, kO, kOBias,
  kPostNorm, kGate, kGateBias, kUp, kUpBias, kDown, kDownBias
};

struct WeightName {
  WeightSlot slot;
  const char* hf;    // "{L}" stands for the layer index
  const char* gguf;  // llama.cpp's name, same convention
  bool per_layer;
};
const std::vector<WeightName>& weight_names();

// Expected HF name → slot for a config (only the tensors this config has, e.g. biases only if enabled).
std::vector<std::pair<std::string, std::pair<WeightSlot, int>>> expected_tensors(const ModelConfig& c,
                                                                                 bool gguf_names = false);
at::Tensor& weight_ref(ModelWeights& w, WeightSlot slot, int layer);

struct LoadOptions {
  at::ScalarType dtype = at::kFloat;
  at::Device device = at::kCPU;
  // GGUF files: Q8_0/Q4_0/Q4_1 projections and embeddings stay quantized, repacked losslessly into MLX affine
  // form (models/gguf_model.h), instead of being dequantized. Off by default: the trainer needs plain weights.
  bool keep_gguf_quantization = false;
};

// Loads an HF folder (config.json + safetensors, sharded or not). Tensors whose dtype and device already
// match are zero-copy views of the file mapping (private, so in-place updates never touch the file).
// Missing or unexpected tensors are an Error listing them.
ModelWeights load_hf_weights(const std::filesystem::path& dir, const ModelConfig& c, const LoadOptions& opt);

// Lays each layer's q/k/v weights (and their biases) and gate/up weights out as consecutive rows of one buffer,
// the tensors becoming views of it, so a batched decode step can run each group as one GEMM (packed_rows).
// The group is copied once into the new buffer and the old tensors are freed, so memory does not grow; the
// tensors stay separate parameters. A group whose weights are all quantized with the same bits and group size has
// its packed words, scales and biases laid out the same way (packed_quant). Groups mixed in quantization, dtype or
// device, or partly missing, are left as they are.
void pack_projection_groups(ModelWeights& w);
// Replaces `parts` by views of one buffer holding their rows in order, values unchanged; nothing when they already
// are (packed_rows) or differ in dtype, device or row shape.
void pack_rows(const std::vector<at::Tensor*>& parts);
// The rows of `parts` as one [Σ rows, cols] tensor when they are consecutive rows of one buffer (as
// pack_projection_groups lays them out), else undefined; every part undefined gives undefined too.
at::Tensor packed_rows(const std::vector<const at::Tensor*>& parts);
// The quantized weights `parts` as one [Σ out, in] QuantizedTensor when their words, scales and biases are each
// consecutive rows of one buffer (pack_projection_groups) with the same bits and group size, else undefined.
QuantizedTensor packed_quant(const std::vector<const QuantizedTensor*>& parts);

// Every weight with its HF name, in checkpoint order (a tied lm_head is listed once, as the embedding). A
// quantized weight is listed as its three MLX tensors: <name> (packed words, uint32), <prefix>.scales, .biases.
std::vector<std::pair<std::string, at::Tensor>> named_weights(const ModelWeights& w, const ModelConfig& c);
// The quantized form of a slot's weight, or nullptr (weights and embeddings only).
const QuantizedTensor* quantized_slot(const ModelWeights& w, WeightSlot slot, int layer);
QuantizedTensor* quantized_slot(ModelWeights& w, WeightSlot slot, int layer);

at::ScalarType parse_torch_dtype(const std::string& name);

// Whole safetensors files as named tensors (adapters, optimizer state, reference outputs). Loaded tensors own
// their memory (copied out of the mapping); saving writes atomically and moves tensors to CPU first.
std::map<std::string, at::Tensor> load_safetensors(const std::filesystem::path& path);
void save_safetensors(const std::filesystem::path& path, const std::map<std::string, at::Tensor>& tensors,
                      const std::map<std::string, std::string>& metadata = {});  // "bf16"/"bfloat16", "fp32"/"float32", ...

}  // namespace rlaif
