// Quantized weights: construction, the projection and embedding paths through kernels/cpu/quant.h, and the
// quantization keys of config.json.
#include "models/quantized.h"

#include "core/error.h"
#include "kernels/cpu/quant.h"

namespace rlaif {

at::Tensor QuantizedTensor::dequantize(at::ScalarType dtype) const {
  at::Tensor out = at::empty({out_features(), in_features()}, wq.options().dtype(dtype));
  kernels::dequantize_affine(wq, scales, biases, bits, group_size, out);
  return out;
}

at::Tensor QuantizedTensor::rows(const at::Tensor& ids, at::ScalarType dtype) const {
  // Only the looked-up rows are dequantized: index the packed rows, then dequantize that small matrix.
  const at::Tensor flat = ids.reshape({-1}).to(wq.device(), at::kLong);
  QuantizedTensor sub{wq.index_select(0, flat), scales.index_select(0, flat), biases.index_select(0, flat), bits,
                      group_size};
  std::vector<int64_t> shape = ids.sizes().vec();
  shape.push_back(in_features());
  return sub.dequantize(dtype).view(shape);
}

QuantizedTensor QuantizedTensor::to(at::Device device) const {
  return {wq.to(device), scales.to(device), biases.to(device), bits, group_size};
}

bool quantizable(int64_t in_features, const QuantSpec& spec) {
  return spec.enabled() && in_features % spec.group_size == 0;
}

QuantizedTensor quantize_weight(const at::Tensor& w, const QuantSpec& spec, at::ScalarType scale_dtype) {
  RLAIF_CHECK(w.dim() == 2 && quantizable(w.size(1), spec), "quantize_weight: {} with group {}", w.sizes(),
              spec.group_size);
  kernels::check_quant_params(w.size(1), spec.bits, spec.group_size);
  const int64_t groups = w.size(1) / spec.group_size;
  const auto opt = w.options();
  QuantizedTensor q{at::empty({w.size(0), kernels::quant_packed_cols(w.size(1), spec.bits)}, opt.dtype(at::kInt)),
                    at::empty({w.size(0), groups}, opt.dtype(scale_dtype)),
                    at::empty({w.size(0), groups}, opt.dtype(scale_dtype)), spec.bits, spec.group_size};
  kernels::quantize_affine(w.detach().contiguous(), spec.bits, spec.group_size, q.wq, q.scales, q.biases);
  return q;
}

void requantize_into(QuantizedTensor& q, const at::Tensor& w) {
  RLAIF_CHECK(w.dim() == 2 && w.size(0) == q.out_features() && w.size(1) == q.in_features() &&
                  w.device() == q.device(),
              "requantize_into: weight {} on {} for a quantized [{}, {}] on {}", w.sizes(), w.device().str(),
              q.out_features(), q.in_features(), q.device().str());
  kernels::quantize_affine(w.detach().contiguous(), q.bits, q.group_size, q.wq, q.scales, q.biases);
}

at::Tensor quant_linear(const at::Tensor& x, const QuantizedTensor& q, const at::Tensor& bias) {
  at::Tensor y;
  if (x.requires_grad()) {
    // Autograd (LoRA on a quantized base): the dequantized temporary carries the gradient to x.
    y = at::linear(x, q.dequantize(x.scalar_type()));
  } else {
    const at::Tensor x2 = x.reshape({-1, x.size(-1)});
    at::Tensor out = at::empty({x2.size(0), q.out_features()}, x.options());
    kernels::quant_linear(x2.stride(1) == 1 ? x2 : x2.contiguous(), q.wq, q.scales, q.biases, q.bits, q.group_size, out);
    std::vector<int64_t> shape = x.sizes().vec();
    shape.back() = q.out_features();
    y = out.view(shape);
  }
  return bias.defined() ? y + bias : y;
}

static QuantSpec parse_spec(const nlohmann::json& q, const std::string& where) {
  QuantSpec s;
  if (!q.is_object() || !q.contains("bits") || !q.contains("group_size") || !q["bits"].is_number_integer() ||
      !q["group_size"].is_number_integer())
    throw Error("model", fmt::format("{}: quantization entry must hold integer 'bits' and 'group_size', got {}", where,
                                     q.dump()));
  s.bits = q["bits"].get<int64_t>();
  s.group_size = q["group_size"].get<int64_t>();
  if (s.bits != 4 && s.bits != 8)
    throw Error("model", fmt::format("{}: {}-bit quantization is not supported", where, s.bits),
                "rlaif runs 4- and 8-bit MLX affine quantization");
  if (q.contains("mode") && q["mode"] != "affine")
    throw Error("model", fmt::format("{}: quantization mode {} is not supported", where, q["mode"].dump()),
                "rlaif runs MLX's affine mode");
  return s;
}

std::optional<QuantSpec> quantization_from_config(const nlohmann::json& config, const std::string& source) {
  for (const char* key : {"quantization", "quantization_config"}) {
    if (!config.contains(key)) continue;
    const auto& q = config[key];
    // HF-style quantization_config of another method (gptq, awq, bitsandbytes): not this format.
    if (q.is_object() && q.contains("quant_method"))
      throw Error("model", fmt::format("{}: {}.quant_method {} is not supported", source, key, q["quant_method"].dump()),
                  "rlaif loads MLX affine-quantized folders (config key 'quantization' with bits and group_size)");
    return parse_spec(q, fmt::format("{} key '{}'", source, key));
  }
  return std::nullopt;
}

QuantSpec quantization_for(const nlohmann::json& config, const std::string& module_path, const QuantSpec& global) {
  if (!config.contains("quantization") || !config["quantization"].contains(module_path)) return global;
  const auto& e = config["quantization"][module_path];
  if (e.is_boolean()) return e.get<bool>() ? global : QuantSpec{};
  return parse_spec(e, "quantization." + module_path);
}

}  // namespace rlaif
