// safetensors parsing and validation. Checks follow the reference implementation: header length within
// the file, valid JSON, known dtypes, shape × dtype size == byte span, spans contiguous and inside the buffer.
#include "core/safetensors.h"

#include <fmt/ranges.h>

#include <algorithm>
#include <cstring>

#include <nlohmann/json.hpp>

#include "core/error.h"

namespace rlaif {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

struct DTypeInfo {
  DType type;
  std::string_view name;
  size_t size;
};
constexpr DTypeInfo kDTypes[] = {
    {DType::kBool, "BOOL", 1}, {DType::kU8, "U8", 1},     {DType::kI8, "I8", 1},
    {DType::kI16, "I16", 2},   {DType::kU16, "U16", 2},   {DType::kF16, "F16", 2},
    {DType::kBF16, "BF16", 2}, {DType::kI32, "I32", 4},   {DType::kU32, "U32", 4},
    {DType::kF32, "F32", 4},   {DType::kF64, "F64", 8},   {DType::kI64, "I64", 8},
    {DType::kU64, "U64", 8},   {DType::kF8E4M3, "F8_E4M3", 1}, {DType::kF8E5M2, "F8_E5M2", 1},
};
constexpr uint64_t kMaxHeader = 100'000'000;  // the reference implementation's limit

[[noreturn]] void fail(const fs::path& p, const std::string& msg, const std::string& hint = "") {
  throw Error("safetensors", fmt::format("{}: {}", p.string(), msg),
              hint.empty() ? "the file is damaged or not a safetensors file; re-download or re-save it" : hint);
}

}  // namespace

size_t dtype_size(DType t) {
  for (const auto& d : kDTypes)
    if (d.type == t) return d.size;
  RLAIF_CHECK(false, "unknown dtype {}", static_cast<int>(t));
  return 0;
}

std::string_view dtype_name(DType t) {
  for (const auto& d : kDTypes)
    if (d.type == t) return d.name;
  RLAIF_CHECK(false, "unknown dtype {}", static_cast<int>(t));
  return {};
}

DType parse_dtype(std::string_view name, const std::string& where) {
  for (const auto& d : kDTypes)
    if (d.name == name) return d.type;
  std::string known;
  for (const auto& d : kDTypes) known += (known.empty() ? "" : ", ") + std::string(d.name);
  throw Error("safetensors", fmt::format("{}unknown dtype '{}'", where.empty() ? "" : where + ": ", name),
              "supported dtypes: " + known);
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const fs::path& path) {
  auto st = std::make_shared<SafetensorsFile>();
  st->file_ = MappedFile::open(path, MappedFile::Mode::kPrivateWritable);
  const size_t size = st->file_->size();
  uint8_t* base = st->file_->data();
  if (size < 8) fail(path, fmt::format("truncated: {} bytes, shorter than the 8-byte header length", size));
  uint64_t header_len = 0;
  std::memcpy(&header_len, base, 8);  // little-endian on every platform we build for
  if (header_len > kMaxHeader) fail(path, fmt::format("header length {} exceeds the 100 MB limit", header_len));
  if (header_len > size - 8)
    fail(path, fmt::format("header length {} runs past the end of the file ({} bytes): truncated?", header_len, size));
  json header;
  try {
    header = json::parse(base + 8, base + 8 + header_len);
  } catch (const json::parse_error& e) {
    fail(path, fmt::format("invalid JSON header: {}", e.what()));
  }
  if (!header.is_object()) fail(path, "header is not a JSON object");

  uint8_t* buffer = base + 8 + header_len;
  const size_t buffer_size = size - 8 - header_len;
  struct Span {
    size_t begin, end;
    size_t index;
  };
  std::vector<Span> spans;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const json& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) fail(path, "__metadata__ is not an object of strings");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string()) fail(path, fmt::format("__metadata__ key '{}' is not a string", m.key()));
        st->metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string where = fmt::format("{}: tensor '{}'", path.string(), name);
    if (!v.is_object() || !v.contains("dtype") || !v.contains("shape") || !v.contains("data_offsets") ||
        !v["dtype"].is_string() || !v["shape"].is_array() || !v["data_offsets"].is_array() ||
        v["data_offsets"].size() != 2)
      fail(path, fmt::format("tensor '{}' needs dtype (string), shape (array), data_offsets ([begin, end])", name));
    TensorView t;
    t.name = name;
    t.dtype = parse_dtype(v["dtype"].get<std::string>(), where);
    for (const auto& d : v["shape"]) {
      if (!d.is_number_unsigned()) fail(path, fmt::format("tensor '{}' has a non-integer or negative dimension", name));
      t.shape.push_back(d.get<int64_t>());
    }
    const auto& off = v["data_offsets"];
    if (!off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      fail(path, fmt::format("tensor '{}' has non-integer data_offsets", name));
    const uint64_t b = off[0].get<uint64_t>(), e = off[1].get<uint64_t>();
    if (b > e) fail(path, fmt::format("tensor '{}' has data_offsets [{}, {}] with begin after end", name, b, e));
    if (e > buffer_size)
      fail(path, fmt::format("tensor '{}' data_offsets [{}, {}] run past the data buffer ({} bytes): truncated?",
                             name, b, e, buffer_size));
    __int128 expect = dtype_size(t.dtype);
    for (int64_t d : t.shape) expect *= d;
    if (expect != static_cast<__int128>(e - b))
      fail(path, fmt::format("tensor '{}' shape {} of {} needs {} bytes but data_offsets span {}", name,
                             fmt::join(t.shape, "x"), dtype_name(t.dtype), static_cast<uint64_t>(expect), e - b));
    t.data = buffer + b;
    t.nbytes = e - b;
    spans.push_back({b, e, st->tensors_.size()});
    st->tensors_.push_back(std::move(t));
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  size_t cursor = 0;
  for (const auto& s : spans) {
    if (s.begin < cursor)
      fail(path, fmt::format("tensor '{}' overlaps the previous tensor (offset {} < {})",
                             st->tensors_[s.index].name, s.begin, cursor));
    if (s.begin > cursor)
      fail(path, fmt::format("gap of {} unused bytes before tensor '{}'", s.begin - cursor, st->tensors_[s.index].name));
    cursor = s.end;
  }
  if (cursor != buffer_size)
    fail(path, fmt::format("{} bytes after the last tensor are not described by the header", buffer_size - cursor));
  for (size_t i = 0; i < st->tensors_.size(); ++i) st->index_[st->tensors_[i].name] = i;
  return st;
}

const TensorView* SafetensorsFile::find(std::string_view name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

Checkpoint Checkpoint::open_file(const fs::path& file) {
  Checkpoint c;
  c.path_ = file;
  c.files_.push_back(SafetensorsFile::open(file));
  for (const auto& t : c.files_[0]->tensors()) c.by_name_[t.name] = {0, &t};
  return c;
}

Checkpoint Checkpoint::open_dir(const fs::path& dir) {
  const fs::path index = dir / "model.safetensors.index.json";
  const fs::path single = dir / "model.safetensors";
  if (!fs::exists(index)) {
    if (!fs::exists(single))
      throw Error("checkpoint", fmt::format("{} has neither model.safetensors nor model.safetensors.index.json",
                                            dir.string()),
                  "point --model at a Hugging Face model folder (safetensors weights)");
    Checkpoint c = open_file(single);
    c.path_ = dir;
    return c;
  }
  json j;
  try {
    j = json::parse(read_file(index));
  } catch (const json::parse_error& e) {
    throw Error("checkpoint", fmt::format("{}: invalid JSON: {}", index.string(), e.what()));
  }
  if (!j.contains("weight_map") || !j["weight_map"].is_object())
    throw Error("checkpoint", fmt::format("{}: no \"weight_map\" object", index.string()));
  Checkpoint c;
  c.path_ = dir;
  std::map<std::string, size_t> file_ids;
  for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
    if (!it.value().is_string())
      throw Error("checkpoint", fmt::format("{}: weight_map['{}'] is not a file name", index.string(), it.key()));
    const std::string shard = it.value().get<std::string>();
    if (!file_ids.count(shard)) {
      file_ids[shard] = c.files_.size();
      c.files_.push_back(SafetensorsFile::open(dir / shard));
    }
    const size_t id = file_ids[shard];
    const TensorView* t = c.files_[id]->find(it.key());
    if (!t)
      throw Error("checkpoint", fmt::format("{}: tensor '{}' is listed in shard {} but not stored there",
                                            index.string(), it.key(), shard));
    c.by_name_[it.key()] = {id, t};
  }
  for (size_t i = 0; i < c.files_.size(); ++i)
    for (const auto& t : c.files_[i]->tensors())
      if (!c.by_name_.count(t.name))
        throw Error("checkpoint", fmt::format("{}: tensor '{}' in {} is missing from the index's weight_map",
                                              index.string(), t.name, c.files_[i]->file()->path().filename().string()));
  return c;
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> n;
  for (const auto& [k, v] : by_name_) n.push_back(k);
  return n;
}

const TensorView* Checkpoint::find(std::string_view name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : it->second.second;
}

std::shared_ptr<MappedFile> Checkpoint::owner(std::string_view name) const {
  auto it = by_name_.find(name);
  RLAIF_CHECK(it != by_name_.end(), "no tensor {}", name);
  return files_[it->second.first]->file();
}

void SafetensorsWriter::add(const std::string& name, DType dtype, const std::vector<int64_t>& shape,
                            const void* data, size_t nbytes) {
  size_t expect = dtype_size(dtype);
  for (int64_t d : shape) expect *= static_cast<size_t>(d);
  RLAIF_CHECK(expect == nbytes, "tensor {}: {} bytes for a shape needing {}", name, nbytes, expect);
  for (const auto& e : entries_) RLAIF_CHECK(e.name != name, "tensor {} added twice", name);
  entries_.push_back({name, dtype, shape, std::string(static_cast<const char*>(data), nbytes)});
}

std::string SafetensorsWriter::serialize() const {
  json header = json::object();
  size_t offset = 0;
  for (const auto& e : entries_) {
    header[e.name] = {{"dtype", dtype_name(e.dtype)}, {"shape", e.shape}, {"data_offsets", {offset, offset + e.bytes.size()}}};
    offset += e.bytes.size();
  }
  if (!metadata_.empty()) header["__metadata__"] = metadata_;
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');  // keep the data buffer 8-byte aligned, as the reference writer does
  std::string out;
  out.reserve(8 + h.size() + offset);
  const uint64_t n = h.size();
  out.append(reinterpret_cast<const char*>(&n), 8);
  out += h;
  for (const auto& e : entries_) out += e.bytes;
  return out;
}

void SafetensorsWriter::write(const fs::path& path) const { write_file_atomic(path, serialize()); }

}  // namespace rlaif
