// Llama-architecture GGUF files (llama.cpp / ollama models) as a DecoderModel: config from the GGUF metadata,
// tensors dequantized to the compute dtype (or Q8_0/Q4_0/Q4_1 repacked, value for value, into MLX affine form),
// and Q/K rows permuted back from llama.cpp's interleaved rotary layout.
#pragma once

#include <filesystem>
#include <memory>

#include "core/gguf.h"
#include "models/decoder.h"
#include "models/quantized.h"

namespace rlaif {

ModelConfig gguf_model_config(const GgufFile& gguf);

// Whether a ggml type is MLX affine quantization with group size 32 in another layout (docs/FORMATS.md, "GGUF"):
// Q8_0 (8 bits), Q4_0 and Q4_1 (4 bits).
bool gguf_repackable(GgmlType type);
// A Q8_0/Q4_0/Q4_1 matrix (row-major [out, in] = dims reversed) as MLX affine words, group 32, without changing a
// value: Q8_0 q' = q+128, scale d, bias −128·d; Q4_0 scale d, bias −8·d; Q4_1 scale d, bias m. The words are
// built on the CPU; scales and biases are computed in float32 (exact: d and m are fp16) and stored in
// `scale_dtype` (bfloat16 rounds them). Error naming the tensor for any other type or shape.
QuantizedTensor repack_gguf_tensor(const GgufTensor& t, at::ScalarType scale_dtype);

// With opt.keep_gguf_quantization and a float32/bfloat16 dtype, every repackable projection and the embedding stay
// quantized (repack_gguf_tensor, scales in opt.dtype); a log line counts what was kept.
std::shared_ptr<DecoderModel> load_gguf_model(const std::filesystem::path& path, const LoadOptions& opt = {});
// Loads a model from an HF folder or a .gguf file.
std::shared_ptr<DecoderModel> load_model(const std::filesystem::path& path, const LoadOptions& opt = {});

}  // namespace rlaif
