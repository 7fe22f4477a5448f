// GGUF reader (llama.cpp's single-file model format, versions 2 and 3) and CPU dequantization of ggml
// block types. The file is mmapped; tensor data are zero-copy views. Spec: ggml/docs/gguf.md.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "core/io.h"

namespace rlaif {

// ggml tensor types with the ids used in GGUF files (gaps are ids ggml has retired).
enum class GgmlType : uint32_t {
  kF32 = 0, kF16 = 1, kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ8_1 = 9,
  kQ2_K = 10, kQ3_K = 11, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14, kQ8_K = 15,
  kIQ2_XXS = 16, kIQ2_XS = 17, kIQ3_XXS = 18, kIQ1_S = 19, kIQ4_NL = 20, kIQ3_S = 21, kIQ2_S = 22,
  kIQ4_XS = 23, kI8 = 24, kI16 = 25, kI32 = 26, kI64 = 27, kF64 = 28, kIQ1_M = 29, kBF16 = 30,
  kTQ1_0 = 34, kTQ2_0 = 35, kMXFP4 = 39,
};

struct GgmlTypeInfo {
  GgmlType type;
  std::string_view name;   // as ggml spells it: "Q4_K", "BF16"
  int64_t block_size;      // elements per block
  int64_t type_size;       // bytes per block
};

// nullptr for an id this reader does not know.
const GgmlTypeInfo* ggml_type_info(uint32_t id);
const GgmlTypeInfo& ggml_type_info(GgmlType type);
std::string_view ggml_type_name(GgmlType type);
// Bytes of a row of n elements; n must be a multiple of the block size (RLAIF_CHECK).
size_t ggml_row_size(GgmlType type, int64_t n);
// Whether dequantize_row handles this type.
bool ggml_can_dequantize(GgmlType type);

// Converts n elements (n a multiple of the block size) to float, exactly as ggml/gguf-py do.
// Throws rlaif::Error("gguf", ...) for a type without a CPU dequantizer.
void dequantize_row(GgmlType type, const void* src, float* dst, int64_t n);

float fp16_to_f32(uint16_t h);
float bf16_to_f32(uint16_t h);

// Metadata value types as numbered in the file.
enum class GgufValueType : uint32_t {
  kU8 = 0, kI8 = 1, kU16 = 2, kI16 = 3, kU32 = 4, kI32 = 5, kF32 = 6, kBool = 7, kString = 8,
  kArray = 9, kU64 = 10, kI64 = 11, kF64 = 12,
};
std::string_view gguf_value_type_name(GgufValueType t);

struct GgufNestedArray {
  uint64_t count = 0;
};

// One metadata value. Scalars keep their exact value (integers as u64/i64, floats as double);
// arrays keep the element type; arrays of arrays are kept as their element count only.
struct GgufValue {
  GgufValueType type = GgufValueType::kU8;
  GgufValueType array_type = GgufValueType::kU8;  // element type when type == kArray
  std::variant<uint64_t, int64_t, double, bool, std::string, std::vector<uint64_t>, std::vector<int64_t>,
               std::vector<double>, std::vector<bool>, std::vector<std::string>, GgufNestedArray>
      value;
  size_t array_size() const;
};

struct GgufTensor {
  std::string name;
  GgmlType type = GgmlType::kF32;
  std::vector<int64_t> dims;   // ne0 first, as stored in the file (ne0 = contiguous dimension)
  uint64_t offset = 0;         // relative to the data section
  const uint8_t* data = nullptr;
  size_t nbytes = 0;
  int64_t numel() const;
  // Row-major (torch-style) shape: dims reversed.
  std::vector<int64_t> shape() const;
};

class GgufFile {
 public:
  // Opens and validates the file; every malformation is an rlaif::Error naming the file.
  static std::shared_ptr<GgufFile> open(const std::filesystem::path& path);

  uint32_t version() const { return version_; }
  uint32_t alignment() const { return alignment_; }
  const std::filesystem::path& path() const { return file_->path(); }
  const std::shared_ptr<MappedFile>& file() const { return file_; }

  // Metadata in file order, and lookup. Accessors throw rlaif::Error naming key and file when the key is
  // missing or its type does not fit (integers convert between widths when the value fits).
  const std::vector<std::pair<std::string, GgufValue>>& metadata() const { return kv_; }
  bool has(std::string_view key) const;
  const GgufValue& get(std::string_view key) const;
  uint32_t get_u32(std::string_view key) const;
  int32_t get_i32(std::string_view key) const;
  uint64_t get_u64(std::string_view key) const;
  int64_t get_i64(std::string_view key) const;
  float get_f32(std::string_view key) const;
  double get_f64(std::string_view key) const;
  bool get_bool(std::string_view key) const;
  const std::string& get_string(std::string_view key) const;
  const std::vector<std::string>& get_string_array(std::string_view key) const;
  std::vector<float> get_f32_array(std::string_view key) const;
  std::vector<int32_t> get_i32_array(std::string_view key) const;

  const std::vector<GgufTensor>& tensors() const { return tensors_; }
  const GgufTensor* find(std::string_view name) const;
  // Dequantizes a whole tensor to float; Error naming tensor and type when unsupported.
  std::vector<float> dequantize(const GgufTensor& t) const;

 private:
  [[noreturn]] void fail_key(std::string_view key, const std::string& what) const;
  std::shared_ptr<MappedFile> file_;
  uint32_t version_ = 0;
  uint32_t alignment_ = 32;
  std::vector<std::pair<std::string, GgufValue>> kv_;
  std::map<std::string, size_t, std::less<>> kv_index_;
  std::vector<GgufTensor> tensors_;
  std::map<std::string, size_t, std::less<>> tensor_index_;
};

}  // namespace rlaif
