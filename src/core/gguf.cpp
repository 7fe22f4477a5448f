// GGUF parsing with bounds checks on every read (a malformed file is an Error, never a crash), and the
// block dequantizers, written to do the same float operations in the same order as gguf-py/ggml so
// results are bit-identical.
#include "core/gguf.h"

#include <array>
#include <cstring>
#include <limits>

#include <fmt/format.h>

#include "core/error.h"

namespace rlaif {

namespace {

constexpr std::array<GgmlTypeInfo, 32> kTypes = {{
    {GgmlType::kF32, "F32", 1, 4},          {GgmlType::kF16, "F16", 1, 2},
    {GgmlType::kQ4_0, "Q4_0", 32, 18},      {GgmlType::kQ4_1, "Q4_1", 32, 20},
    {GgmlType::kQ5_0, "Q5_0", 32, 22},      {GgmlType::kQ5_1, "Q5_1", 32, 24},
    {GgmlType::kQ8_0, "Q8_0", 32, 34},      {GgmlType::kQ8_1, "Q8_1", 32, 36},
    {GgmlType::kQ2_K, "Q2_K", 256, 84},     {GgmlType::kQ3_K, "Q3_K", 256, 110},
    {GgmlType::kQ4_K, "Q4_K", 256, 144},    {GgmlType::kQ5_K, "Q5_K", 256, 176},
    {GgmlType::kQ6_K, "Q6_K", 256, 210},    {GgmlType::kQ8_K, "Q8_K", 256, 292},
    {GgmlType::kIQ2_XXS, "IQ2_XXS", 256, 66}, {GgmlType::kIQ2_XS, "IQ2_XS", 256, 74},
    {GgmlType::kIQ3_XXS, "IQ3_XXS", 256, 98}, {GgmlType::kIQ1_S, "IQ1_S", 256, 50},
    {GgmlType::kIQ4_NL, "IQ4_NL", 32, 18},  {GgmlType::kIQ3_S, "IQ3_S", 256, 110},
    {GgmlType::kIQ2_S, "IQ2_S", 256, 82},   {GgmlType::kIQ4_XS, "IQ4_XS", 256, 136},
    {GgmlType::kI8, "I8", 1, 1},            {GgmlType::kI16, "I16", 1, 2},
    {GgmlType::kI32, "I32", 1, 4},          {GgmlType::kI64, "I64", 1, 8},
    {GgmlType::kF64, "F64", 1, 8},          {GgmlType::kIQ1_M, "IQ1_M", 256, 56},
    {GgmlType::kBF16, "BF16", 1, 2},        {GgmlType::kTQ1_0, "TQ1_0", 256, 54},
    {GgmlType::kTQ2_0, "TQ2_0", 256, 66},   {GgmlType::kMXFP4, "MXFP4", 32, 17},
}};

constexpr int kQK = 32;    // elements per block of the legacy quants
constexpr int kQKK = 256;  // elements per super-block of the K-quants

inline uint16_t rd16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}
inline float rdh(const uint8_t* p) { return fp16_to_f32(rd16(p)); }

// Legacy 32-element blocks: low nibbles are elements 0..15, high nibbles 16..31.
void deq_q4_0(const uint8_t* b, float* y) {
  const float d = rdh(b);
  for (int j = 0; j < 16; ++j) {
    y[j] = d * static_cast<float>((b[2 + j] & 0x0F) - 8);
    y[j + 16] = d * static_cast<float>((b[2 + j] >> 4) - 8);
  }
}
void deq_q4_1(const uint8_t* b, float* y) {
  const float d = rdh(b), m = rdh(b + 2);
  for (int j = 0; j < 16; ++j) {
    y[j] = d * static_cast<float>(b[4 + j] & 0x0F) + m;
    y[j + 16] = d * static_cast<float>(b[4 + j] >> 4) + m;
  }
}
void deq_q5_0(const uint8_t* b, float* y) {
  const float d = rdh(b);
  uint32_t qh;
  std::memcpy(&qh, b + 2, 4);
  for (int j = 0; j < 16; ++j) {
    const int lo = (b[6 + j] & 0x0F) | (((qh >> j) & 1) << 4);
    const int hi = (b[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
    y[j] = d * static_cast<float>(lo - 16);
    y[j + 16] = d * static_cast<float>(hi - 16);
  }
}
void deq_q5_1(const uint8_t* b, float* y) {
  const float d = rdh(b), m = rdh(b + 2);
  uint32_t qh;
  std::memcpy(&qh, b + 4, 4);
  for (int j = 0; j < 16; ++j) {
    const int lo = (b[8 + j] & 0x0F) | (((qh >> j) & 1) << 4);
    const int hi = (b[8 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
    y[j] = d * static_cast<float>(lo) + m;
    y[j + 16] = d * static_cast<float>(hi) + m;
  }
}
void deq_q8_0(const uint8_t* b, float* y) {
  const float d = rdh(b);
  for (int j = 0; j < kQK; ++j) y[j] = static_cast<float>(static_cast<int8_t>(b[2 + j])) * d;
}

// K-quants: 256-element super-blocks with 6-bit or 4-bit sub-block scales.
void deq_q2_k(const uint8_t* b, float* y) {
  const uint8_t* scales = b;
  const uint8_t* qs = b + 16;
  const float d = rdh(b + 80), dmin = rdh(b + 82);
  for (int h = 0; h < 2; ++h)
    for (int s = 0; s < 4; ++s)
      for (int l = 0; l < 32; ++l) {
        const int idx = h * 128 + s * 32 + l;
        const int sub = idx / 16;
        const float dl = d * static_cast<float>(scales[sub] & 0x0F);
        const float ml = dmin * static_cast<float>(scales[sub] >> 4);
        y[idx] = dl * static_cast<float>((qs[h * 32 + l] >> (2 * s)) & 3) - ml;
      }
}
void deq_q3_k(const uint8_t* b, float* y) {
  const uint8_t* hmask = b;
  const uint8_t* qs = b + 32;
  const uint8_t* sc = b + 96;
  const float d = rdh(b + 108);
  float dl[16];
  for (int i = 0; i < 16; ++i) {
    const int lo = (sc[i % 8] >> (4 * (i / 8))) & 0x0F;
    const int hi = (sc[8 + i % 4] >> (2 * (i / 4))) & 0x03;
    dl[i] = d * static_cast<float>(static_cast<int8_t>(static_cast<uint8_t>(lo | (hi << 4))) - 32);
  }
  for (int h = 0; h < 2; ++h)
    for (int s = 0; s < 4; ++s)
      for (int l = 0; l < 32; ++l) {
        const int idx = h * 128 + s * 32 + l;
        const int ql = (qs[h * 32 + l] >> (2 * s)) & 3;
        const int bit = (hmask[l] >> (idx / 32)) & 1;
        y[idx] = dl[idx / 16] * static_cast<float>(ql - ((bit ^ 1) << 2));
      }
}
// The 12-byte packing of eight 6-bit scales and mins shared by Q4_K and Q5_K.
void k_scale_min(const uint8_t* s, int j, int* sc, int* m) {
  if (j < 4) {
    *sc = s[j] & 0x3F;
    *m = s[j + 4] & 0x3F;
  } else {
    *sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 2) & 0x30);
    *m = (s[j + 4] >> 4) | ((s[j] >> 2) & 0x30);
  }
}
void deq_q4_k(const uint8_t* b, float* y) {
  const float d = rdh(b), dmin = rdh(b + 2);
  const uint8_t* qs = b + 16;
  for (int sub = 0; sub < 8; ++sub) {
    int sc, m;
    k_scale_min(b + 4, sub, &sc, &m);
    const float d1 = d * static_cast<float>(sc), m1 = dmin * static_cast<float>(m);
    const int c = sub / 2, k = sub % 2;
    for (int l = 0; l < 32; ++l) y[sub * 32 + l] = d1 * static_cast<float>((qs[c * 32 + l] >> (4 * k)) & 0x0F) - m1;
  }
}
void deq_q5_k(const uint8_t* b, float* y) {
  const float d = rdh(b), dmin = rdh(b + 2);
  const uint8_t* qh = b + 16;
  const uint8_t* qs = b + 48;
  for (int sub = 0; sub < 8; ++sub) {
    int sc, m;
    k_scale_min(b + 4, sub, &sc, &m);
    const float d1 = d * static_cast<float>(sc), m1 = dmin * static_cast<float>(m);
    const int c = sub / 2, k = sub % 2;
    for (int l = 0; l < 32; ++l) {
      const int q = ((qs[c * 32 + l] >> (4 * k)) & 0x0F) | (((qh[l] >> sub) & 1) << 4);
      y[sub * 32 + l] = d1 * static_cast<float>(q) - m1;
    }
  }
}
void deq_q6_k(const uint8_t* b, float* y) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = rdh(b + 208);
  for (int h = 0; h < 2; ++h)
    for (int l = 0; l < 64; ++l)
      for (int k = 0; k < 2; ++k) {
        const int idx = h * 128 + k * 64 + l;
        const int lo = (ql[h * 64 + l] >> (4 * k)) & 0x0F;
        const int s = idx % 128 / 32;  // which 2-bit field of qh holds this element's high bits
        const int hi = (qh[h * 32 + idx % 32] >> (2 * s)) & 3;
        const float dl = d * static_cast<float>(sc[idx / 16]);
        y[idx] = dl * static_cast<float>(static_cast<int8_t>(static_cast<uint8_t>(lo | (hi << 4))) - 32);
      }
}

using BlockFn = void (*)(const uint8_t*, float*);
BlockFn block_fn(GgmlType t) {
  switch (t) {
    case GgmlType::kQ4_0: return deq_q4_0;
    case GgmlType::kQ4_1: return deq_q4_1;
    case GgmlType::kQ5_0: return deq_q5_0;
    case GgmlType::kQ5_1: return deq_q5_1;
    case GgmlType::kQ8_0: return deq_q8_0;
    case GgmlType::kQ2_K: return deq_q2_k;
    case GgmlType::kQ3_K: return deq_q3_k;
    case GgmlType::kQ4_K: return deq_q4_k;
    case GgmlType::kQ5_K: return deq_q5_k;
    case GgmlType::kQ6_K: return deq_q6_k;
    default: return nullptr;
  }
}

bool is_plain(GgmlType t) {
  switch (t) {
    case GgmlType::kF32: case GgmlType::kF16: case GgmlType::kBF16: case GgmlType::kF64:
    case GgmlType::kI8: case GgmlType::kI16: case GgmlType::kI32: case GgmlType::kI64:
      return true;
    default:
      return false;
  }
}

template <typename T>
void convert(const void* src, float* dst, int64_t n) {
  const auto* p = static_cast<const uint8_t*>(src);
  for (int64_t i = 0; i < n; ++i) {
    T v;
    std::memcpy(&v, p + i * sizeof(T), sizeof(T));
    dst[i] = static_cast<float>(v);
  }
}

// Bounds-checked cursor over the mapped file; every overrun names the file and what was being read.
class Reader {
 public:
  Reader(const uint8_t* data, size_t size, const std::filesystem::path& path) : p_(data), size_(size), path_(path) {}
  [[noreturn]] void fail(const std::string& msg) const {
    throw Error("gguf", fmt::format("{}: {}", path_.string(), msg), "the file is not a valid GGUF file or is truncated");
  }
  void need(size_t n, const char* what) const {
    if (n > size_ - pos_) fail(fmt::format("truncated while reading {} at offset {} (file size {})", what, pos_, size_));
  }
  template <typename T>
  T read(const char* what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, p_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  std::string read_string(const char* what) {
    const uint64_t n = read<uint64_t>(what);
    if (n > size_ - pos_) fail(fmt::format("{} has length {} beyond the end of the file", what, n));
    std::string s(reinterpret_cast<const char*>(p_ + pos_), n);
    pos_ += n;
    return s;
  }
  size_t pos() const { return pos_; }
  size_t size() const { return size_; }

 private:
  const uint8_t* p_;
  size_t size_;
  size_t pos_ = 0;
  const std::filesystem::path& path_;
};

size_t scalar_size(GgufValueType t) {
  switch (t) {
    case GgufValueType::kU8: case GgufValueType::kI8: case GgufValueType::kBool: return 1;
    case GgufValueType::kU16: case GgufValueType::kI16: return 2;
    case GgufValueType::kU32: case GgufValueType::kI32: case GgufValueType::kF32: return 4;
    case GgufValueType::kU64: case GgufValueType::kI64: case GgufValueType::kF64: return 8;
    default: return 0;
  }
}

bool is_unsigned(GgufValueType t) {
  return t == GgufValueType::kU8 || t == GgufValueType::kU16 || t == GgufValueType::kU32 || t == GgufValueType::kU64;
}
bool is_signed(GgufValueType t) {
  return t == GgufValueType::kI8 || t == GgufValueType::kI16 || t == GgufValueType::kI32 || t == GgufValueType::kI64;
}
bool is_float(GgufValueType t) { return t == GgufValueType::kF32 || t == GgufValueType::kF64; }

// Reads one scalar of type t widened to u64 / i64 / double / bool.
template <typename Out>
Out read_scalar(Reader& r, GgufValueType t) {
  switch (t) {
    case GgufValueType::kU8: return static_cast<Out>(r.read<uint8_t>("u8 value"));
    case GgufValueType::kI8: return static_cast<Out>(r.read<int8_t>("i8 value"));
    case GgufValueType::kU16: return static_cast<Out>(r.read<uint16_t>("u16 value"));
    case GgufValueType::kI16: return static_cast<Out>(r.read<int16_t>("i16 value"));
    case GgufValueType::kU32: return static_cast<Out>(r.read<uint32_t>("u32 value"));
    case GgufValueType::kI32: return static_cast<Out>(r.read<int32_t>("i32 value"));
    case GgufValueType::kU64: return static_cast<Out>(r.read<uint64_t>("u64 value"));
    case GgufValueType::kI64: return static_cast<Out>(r.read<int64_t>("i64 value"));
    case GgufValueType::kF32: return static_cast<Out>(r.read<float>("f32 value"));
    case GgufValueType::kF64: return static_cast<Out>(r.read<double>("f64 value"));
    case GgufValueType::kBool: return static_cast<Out>(r.read<uint8_t>("bool value") != 0);
    default: r.fail("internal: not a scalar type");
  }
}

void check_value_type(Reader& r, uint32_t t, const std::string& key) {
  if (t > static_cast<uint32_t>(GgufValueType::kF64))
    r.fail(fmt::format("metadata key '{}' has unknown value type {}", key, t));
}

GgufValue read_value(Reader& r, GgufValueType t, const std::string& key, int depth) {
  GgufValue v;
  v.type = t;
  if (t == GgufValueType::kString) {
    v.value = r.read_string("string value");
  } else if (t == GgufValueType::kBool) {
    v.value = r.read<uint8_t>("bool value") != 0;
  } else if (is_unsigned(t)) {
    v.value = read_scalar<uint64_t>(r, t);
  } else if (is_signed(t)) {
    v.value = read_scalar<int64_t>(r, t);
  } else if (is_float(t)) {
    v.value = read_scalar<double>(r, t);
  } else {  // array
    const uint32_t et = r.read<uint32_t>("array element type");
    check_value_type(r, et, key);
    v.array_type = static_cast<GgufValueType>(et);
    const uint64_t n = r.read<uint64_t>("array length");
    // Every element takes at least one byte (strings eight), so a count beyond the remaining bytes is corrupt.
    const size_t min_elem = v.array_type == GgufValueType::kString || v.array_type == GgufValueType::kArray
                                ? 8 : scalar_size(v.array_type);
    if (n > (r.size() - r.pos()) / min_elem)
      r.fail(fmt::format("metadata key '{}': array length {} exceeds the file", key, n));
    if (v.array_type == GgufValueType::kString) {
      std::vector<std::string> a(n);
      for (auto& s : a) s = r.read_string("array string");
      v.value = std::move(a);
    } else if (v.array_type == GgufValueType::kArray) {
      if (depth > 8) r.fail(fmt::format("metadata key '{}': arrays nested too deeply", key));
      for (uint64_t i = 0; i < n; ++i) {
        const uint32_t inner = r.read<uint32_t>("nested array element type");
        check_value_type(r, inner, key);
        (void)inner;
        r.fail(fmt::format("metadata key '{}': arrays of arrays are not supported", key));
      }
      v.value = GgufNestedArray{n};
    } else if (v.array_type == GgufValueType::kBool) {
      std::vector<bool> a(n);
      for (uint64_t i = 0; i < n; ++i) a[i] = r.read<uint8_t>("bool element") != 0;
      v.value = std::move(a);
    } else if (is_unsigned(v.array_type)) {
      std::vector<uint64_t> a(n);
      for (auto& x : a) x = read_scalar<uint64_t>(r, v.array_type);
      v.value = std::move(a);
    } else if (is_signed(v.array_type)) {
      std::vector<int64_t> a(n);
      for (auto& x : a) x = read_scalar<int64_t>(r, v.array_type);
      v.value = std::move(a);
    } else {
      std::vector<double> a(n);
      for (auto& x : a) x = read_scalar<double>(r, v.array_type);
      v.value = std::move(a);
    }
  }
  return v;
}

}  // namespace

float fp16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1F;
  uint32_t mant = h & 0x3FF;
  uint32_t bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (mant << 13);  // inf / nan (payload kept)
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    int e = 113;
    while ((mant & 0x400) == 0) {
      mant <<= 1;
      --e;
    }
    bits = sign | (static_cast<uint32_t>(e) << 23) | ((mant & 0x3FF) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

float bf16_to_f32(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

const GgmlTypeInfo* ggml_type_info(uint32_t id) {
  for (const auto& t : kTypes)
    if (static_cast<uint32_t>(t.type) == id) return &t;
  return nullptr;
}

const GgmlTypeInfo& ggml_type_info(GgmlType type) {
  const GgmlTypeInfo* t = ggml_type_info(static_cast<uint32_t>(type));
  RLAIF_CHECK(t, "unknown ggml type {}", static_cast<uint32_t>(type));
  return *t;
}

std::string_view ggml_type_name(GgmlType type) { return ggml_type_info(type).name; }

size_t ggml_row_size(GgmlType type, int64_t n) {
  const auto& t = ggml_type_info(type);
  RLAIF_CHECK(n % t.block_size == 0, "{} elements is not a multiple of the {} block size {}", n, t.name, t.block_size);
  return static_cast<size_t>(n / t.block_size * t.type_size);
}

bool ggml_can_dequantize(GgmlType type) { return is_plain(type) || block_fn(type) != nullptr; }

void dequantize_row(GgmlType type, const void* src, float* dst, int64_t n) {
  const auto* p = static_cast<const uint8_t*>(src);
  switch (type) {
    case GgmlType::kF32: std::memcpy(dst, src, static_cast<size_t>(n) * 4); return;
    case GgmlType::kF16:
      for (int64_t i = 0; i < n; ++i) dst[i] = fp16_to_f32(rd16(p + 2 * i));
      return;
    case GgmlType::kBF16:
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(rd16(p + 2 * i));
      return;
    case GgmlType::kF64: convert<double>(src, dst, n); return;
    case GgmlType::kI8: convert<int8_t>(src, dst, n); return;
    case GgmlType::kI16: convert<int16_t>(src, dst, n); return;
    case GgmlType::kI32: convert<int32_t>(src, dst, n); return;
    case GgmlType::kI64: convert<int64_t>(src, dst, n); return;
    default: break;
  }
  const BlockFn fn = block_fn(type);
  if (!fn)
    throw Error("gguf", fmt::format("no CPU dequantizer for ggml type {}", ggml_type_name(type)),
                "supported: F32 F16 BF16 F64 I8-I64 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K");
  const auto& info = ggml_type_info(type);
  RLAIF_CHECK(n % info.block_size == 0, "dequantize_row: {} not a multiple of {}", n, info.block_size);
  for (int64_t b = 0; b < n / info.block_size; ++b) fn(p + b * info.type_size, dst + b * info.block_size);
}

std::string_view gguf_value_type_name(GgufValueType t) {
  static constexpr std::string_view kNames[] = {"u8", "i8", "u16", "i16", "u32", "i32", "f32",
                                                "bool", "string", "array", "u64", "i64", "f64"};
  const auto i = static_cast<uint32_t>(t);
  return i < std::size(kNames) ? kNames[i] : "unknown";
}

size_t GgufValue::array_size() const {
  return std::visit(
      [](const auto& x) -> size_t {
        using T = std::decay_t<decltype(x)>;
        if constexpr (std::is_same_v<T, GgufNestedArray>) return x.count;
        else if constexpr (requires { x.size(); } && !std::is_same_v<T, std::string>) return x.size();
        else return 0;
      },
      value);
}

int64_t GgufTensor::numel() const {
  int64_t n = 1;
  for (int64_t d : dims) n *= d;
  return n;
}

std::vector<int64_t> GgufTensor::shape() const { return {dims.rbegin(), dims.rend()}; }

std::shared_ptr<GgufFile> GgufFile::open(const std::filesystem::path& path) {
  auto f = std::shared_ptr<GgufFile>(new GgufFile());
  f->file_ = MappedFile::open(path);
  Reader r(f->file_->data(), f->file_->size(), path);
  const uint32_t magic = r.read<uint32_t>("magic");
  if (magic != 0x46554747u) r.fail(fmt::format("bad magic 0x{:08x} (expected 'GGUF')", magic));
  f->version_ = r.read<uint32_t>("version");
  if (f->version_ != 2 && f->version_ != 3)
    r.fail(fmt::format("unsupported GGUF version {} (supported: 2, 3)", f->version_));
  const uint64_t n_tensors = r.read<uint64_t>("tensor count");
  const uint64_t n_kv = r.read<uint64_t>("metadata count");
  // A key-value pair takes at least 12 bytes and a tensor info at least 24: larger counts are corrupt.
  if (n_kv > r.size() / 12) r.fail(fmt::format("metadata count {} exceeds the file", n_kv));
  if (n_tensors > r.size() / 24) r.fail(fmt::format("tensor count {} exceeds the file", n_tensors));

  for (uint64_t i = 0; i < n_kv; ++i) {
    std::string key = r.read_string("metadata key");
    const uint32_t t = r.read<uint32_t>("metadata value type");
    check_value_type(r, t, key);
    GgufValue v = read_value(r, static_cast<GgufValueType>(t), key, 0);
    if (f->kv_index_.count(key)) r.fail(fmt::format("duplicate metadata key '{}'", key));
    f->kv_index_.emplace(key, f->kv_.size());
    f->kv_.emplace_back(std::move(key), std::move(v));
  }
  if (f->has("general.alignment")) {
    const uint32_t a = f->get_u32("general.alignment");
    if (a == 0 || (a & (a - 1)) != 0) r.fail(fmt::format("general.alignment {} is not a power of two", a));
    f->alignment_ = a;
  }

  for (uint64_t i = 0; i < n_tensors; ++i) {
    GgufTensor t;
    t.name = r.read_string("tensor name");
    const uint32_t nd = r.read<uint32_t>("tensor dimension count");
    if (nd > 4) r.fail(fmt::format("tensor '{}' has {} dimensions (max 4)", t.name, nd));
    for (uint32_t d = 0; d < nd; ++d) {
      const auto v = r.read<uint64_t>("tensor dimension");
      if (v > (uint64_t{1} << 40)) r.fail(fmt::format("tensor '{}' dimension {} is {}", t.name, d, v));
      t.dims.push_back(static_cast<int64_t>(v));
    }
    const uint32_t type = r.read<uint32_t>("tensor type");
    const GgmlTypeInfo* info = ggml_type_info(type);
    if (!info) r.fail(fmt::format("tensor '{}' has unknown ggml type {}", t.name, type));
    t.type = info->type;
    t.offset = r.read<uint64_t>("tensor offset");
    const int64_t ne0 = t.dims.empty() ? 1 : t.dims[0];
    if (ne0 % info->block_size != 0)
      r.fail(fmt::format("tensor '{}': ne0 {} is not a multiple of the {} block size {}", t.name, ne0, info->name,
                         info->block_size));
    // Overflow-safe product: each dim < 2^40 and at most 4 of them could still overflow, so check as we go.
    unsigned __int128 numel = 1;
    for (int64_t d : t.dims) numel *= static_cast<uint64_t>(d);
    const unsigned __int128 nbytes = numel / info->block_size * info->type_size;
    if (nbytes > f->file_->size()) r.fail(fmt::format("tensor '{}' needs {} bytes, more than the file", t.name,
                                                      static_cast<uint64_t>(nbytes)));
    t.nbytes = static_cast<size_t>(nbytes);
    if (f->tensor_index_.count(t.name)) r.fail(fmt::format("duplicate tensor '{}'", t.name));
    f->tensor_index_.emplace(t.name, f->tensors_.size());
    f->tensors_.push_back(std::move(t));
  }

  const size_t data_start = (r.pos() + f->alignment_ - 1) / f->alignment_ * f->alignment_;
  if (data_start > f->file_->size() && !f->tensors_.empty()) r.fail("no tensor data after the header");
  for (auto& t : f->tensors_) {
    if (t.offset % f->alignment_ != 0)
      r.fail(fmt::format("tensor '{}' offset {} is not aligned to {}", t.name, t.offset, f->alignment_));
    if (t.offset > f->file_->size() || data_start + t.offset + t.nbytes > f->file_->size())
      r.fail(fmt::format("tensor '{}' data [{}, +{}) lies beyond the end of the file ({} bytes)", t.name,
                         data_start + t.offset, t.nbytes, f->file_->size()));
    t.data = f->file_->data() + data_start + t.offset;
  }
  return f;
}

void GgufFile::fail_key(std::string_view key, const std::string& what) const {
  throw Error("gguf", fmt::format("{}: metadata key '{}' {}", path().string(), key, what));
}

bool GgufFile::has(std::string_view key) const { return kv_index_.find(key) != kv_index_.end(); }

const GgufValue& GgufFile::get(std::string_view key) const {
  auto it = kv_index_.find(key);
  if (it == kv_index_.end()) fail_key(key, "is missing");
  return kv_[it->second].second;
}

namespace {
template <typename T>
bool int_value(const GgufValue& v, T* out) {
  if (is_unsigned(v.type)) {
    const uint64_t x = std::get<uint64_t>(v.value);
    if (x > static_cast<uint64_t>(std::numeric_limits<T>::max())) return false;
    *out = static_cast<T>(x);
    return true;
  }
  if (is_signed(v.type)) {
    const int64_t x = std::get<int64_t>(v.value);
    if constexpr (std::is_unsigned_v<T>) {
      if (x < 0 || static_cast<uint64_t>(x) > std::numeric_limits<T>::max()) return false;
    } else {
      if (x < std::numeric_limits<T>::min() || x > std::numeric_limits<T>::max()) return false;
    }
    *out = static_cast<T>(x);
    return true;
  }
  return false;
}
}  // namespace

#define RLAIF_GGUF_INT_GETTER(fn, T)                                                                     \
  T GgufFile::fn(std::string_view key) const {                                                           \
    const GgufValue& v = get(key);                                                                      \
    T out{};                                                                                             \
    if (!int_value(v, &out))                                                                             \
      fail_key(key, fmt::format("is {} (not an integer that fits {})", gguf_value_type_name(v.type), #T)); \
    return out;                                                                                          \
  }
RLAIF_GGUF_INT_GETTER(get_u32, uint32_t)
RLAIF_GGUF_INT_GETTER(get_i32, int32_t)
RLAIF_GGUF_INT_GETTER(get_u64, uint64_t)
RLAIF_GGUF_INT_GETTER(get_i64, int64_t)
#undef RLAIF_GGUF_INT_GETTER

double GgufFile::get_f64(std::string_view key) const {
  const GgufValue& v = get(key);
  if (!is_float(v.type)) fail_key(key, fmt::format("is {}, not a float", gguf_value_type_name(v.type)));
  return std::get<double>(v.value);
}

float GgufFile::get_f32(std::string_view key) const { return static_cast<float>(get_f64(key)); }

bool GgufFile::get_bool(std::string_view key) const {
  const GgufValue& v = get(key);
  if (v.type != GgufValueType::kBool) fail_key(key, fmt::format("is {}, not bool", gguf_value_type_name(v.type)));
  return std::get<bool>(v.value);
}

const std::string& GgufFile::get_string(std::string_view key) const {
  const GgufValue& v = get(key);
  if (v.type != GgufValueType::kString) fail_key(key, fmt::format("is {}, not string", gguf_value_type_name(v.type)));
  return std::get<std::string>(v.value);
}

const std::vector<std::string>& GgufFile::get_string_array(std::string_view key) const {
  const GgufValue& v = get(key);
  if (v.type != GgufValueType::kArray || v.array_type != GgufValueType::kString)
    fail_key(key, "is not an array of strings");
  return std::get<std::vector<std::string>>(v.value);
}

std::vector<float> GgufFile::get_f32_array(std::string_view key) const {
  const GgufValue& v = get(key);
  if (v.type != GgufValueType::kArray || !is_float(v.array_type)) fail_key(key, "is not an array of floats");
  const auto& a = std::get<std::vector<double>>(v.value);
  return {a.begin(), a.end()};
}

std::vector<int32_t> GgufFile::get_i32_array(std::string_view key) const {
  const GgufValue& v = get(key);
  if (v.type != GgufValueType::kArray || !(is_signed(v.array_type) || is_unsigned(v.array_type)))
    fail_key(key, "is not an array of integers");
  std::vector<int32_t> out;
  auto push = [&](auto x) {
    if (x > static_cast<decltype(x)>(std::numeric_limits<int32_t>::max()) ||
        (std::is_signed_v<decltype(x)> && x < static_cast<decltype(x)>(std::numeric_limits<int32_t>::min())))
      fail_key(key, fmt::format("holds {} which does not fit int32", x));
    out.push_back(static_cast<int32_t>(x));
  };
  if (is_signed(v.array_type))
    for (int64_t x : std::get<std::vector<int64_t>>(v.value)) push(x);
  else
    for (uint64_t x : std::get<std::vector<uint64_t>>(v.value)) push(x);
  return out;
}

const GgufTensor* GgufFile::find(std::string_view name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

std::vector<float> GgufFile::dequantize(const GgufTensor& t) const {
  if (!ggml_can_dequantize(t.type))
    throw Error("gguf", fmt::format("{}: tensor '{}' has type {} which has no CPU dequantizer", path().string(), t.name,
                                    ggml_type_name(t.type)));
  std::vector<float> out(static_cast<size_t>(t.numel()));
  dequantize_row(t.type, t.data, out.data(), t.numel());
  return out;
}

}  // namespace rlaif
