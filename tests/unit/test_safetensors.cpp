// safetensors reader/writer: files written by the reference Python `safetensors` library read back exactly,
// our writer's files load in Python, and every kind of malformed file is a clear error, never a crash.
#include <gtest/gtest.h>

#include <cstring>
#include <fstream>

#include "core/error.h"
#include "core/safetensors.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace rlaif;

namespace {

void write_bytes(const fs::path& p, const std::string& s) {
  std::ofstream(p, std::ios::binary) << s;
}

std::string with_header(const std::string& json, const std::string& data) {
  std::string out(8, '\0');
  const uint64_t n = json.size();
  std::memcpy(out.data(), &n, 8);
  return out + json + data;
}

// Expects open() to throw rlaif::Error whose message contains `needle`.
void expect_error(const fs::path& p, const std::string& needle) {
  try {
    SafetensorsFile::open(p);
    FAIL() << "no error for " << p;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(p.filename().string()), std::string::npos) << "names the file: " << e.what();
  }
}

}  // namespace

TEST(Safetensors, ReadsEveryDtypeWrittenByPythonSafetensors) {
  const fs::path dir = test::temp_dir("st_python");
  const std::string script = R"PY(
import sys, numpy as np, torch
from safetensors.torch import save_file
t = {
  "bf16": torch.arange(12, dtype=torch.float32).reshape(3, 4).to(torch.bfloat16) / 4,
  "f16": torch.tensor([1.5, -2.25, 65504.0], dtype=torch.float16),
  "f32": torch.tensor([[1.0, -0.5], [3.25, 7.0]]),
  "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
  "u8": torch.tensor([0, 200, 255], dtype=torch.uint8),
  "i32": torch.tensor([-7, 1 << 30], dtype=torch.int32),
  "u32": torch.tensor([1, 4000000000], dtype=torch.uint32),
  "i64": torch.tensor([-(1 << 40), 5], dtype=torch.int64),
  "empty": torch.zeros(0, 3),
}
save_file(t, sys.argv[1] + "/a.safetensors", metadata={"format": "pt"})
)PY";
  write_bytes(dir / "make.py", script);
  std::string out;
  ASSERT_EQ(test::run_command(test::python() + " " + (dir / "make.py").string() + " " + dir.string(), &out), 0) << out;

  auto f = SafetensorsFile::open(dir / "a.safetensors");
  EXPECT_EQ(f->metadata().at("format"), "pt");
  EXPECT_EQ(f->tensors().size(), 9u);
  const TensorView* bf16 = f->find("bf16");
  ASSERT_TRUE(bf16);
  EXPECT_EQ(bf16->dtype, DType::kBF16);
  EXPECT_EQ(bf16->shape, (std::vector<int64_t>{3, 4}));
  uint16_t raw;
  std::memcpy(&raw, bf16->data + 2 * 5, 2);  // element 5 = 1.25 = 0x3FA0 in bf16
  EXPECT_EQ(raw, 0x3FA0);
  const TensorView* f16 = f->find("f16");
  std::memcpy(&raw, f16->data + 4, 2);  // 65504 = 0x7BFF in fp16
  EXPECT_EQ(raw, 0x7BFF);
  float f32[4];
  std::memcpy(f32, f->find("f32")->data, 16);
  EXPECT_EQ(f32[2], 3.25f);
  EXPECT_EQ(static_cast<int8_t>(f->find("i8")->data[0]), -128);
  EXPECT_EQ(f->find("u8")->data[1], 200);
  uint32_t u32[2];
  std::memcpy(u32, f->find("u32")->data, 8);
  EXPECT_EQ(u32[1], 4000000000u);
  int64_t i64[2];
  std::memcpy(i64, f->find("i64")->data, 16);
  EXPECT_EQ(i64[0], -(int64_t(1) << 40));
  EXPECT_EQ(f->find("empty")->nbytes, 0u);
  EXPECT_EQ(f->find("nope"), nullptr);
}

TEST(Safetensors, WriterOutputLoadsInPython) {
  const fs::path dir = test::temp_dir("st_writer");
  SafetensorsWriter w;
  const float a[6] = {1, 2, 3, 4, 5, -6.5f};
  const int64_t b[2] = {7, -9};
  w.add("layer.a", DType::kF32, {2, 3}, a, sizeof a);
  w.add("b", DType::kI64, {2}, b, sizeof b);
  w.set_metadata("format", "pt");
  w.write(dir / "ours.safetensors");
  const std::string script =
      "import sys\nfrom safetensors.torch import load_file\nfrom safetensors import safe_open\n"
      "t = load_file(sys.argv[1])\n"
      "assert t['layer.a'].shape == (2, 3) and t['layer.a'][1, 2].item() == -6.5, t\n"
      "assert t['b'].tolist() == [7, -9]\n"
      "assert safe_open(sys.argv[1], 'pt').metadata() == {'format': 'pt'}\nprint('ok')\n";
  write_bytes(dir / "check.py", script);
  std::string out;
  EXPECT_EQ(test::run_command(test::python() + " " + (dir / "check.py").string() + " " +
                                  (dir / "ours.safetensors").string(), &out), 0) << out;
  // And round-trips through our reader.
  auto f = SafetensorsFile::open(dir / "ours.safetensors");
  float back[6];
  std::memcpy(back, f->find("layer.a")->data, sizeof back);
  EXPECT_EQ(back[5], -6.5f);
}

TEST(Safetensors, MalformedFilesAreClearErrors) {
  const fs::path dir = test::temp_dir("st_bad");
  write_bytes(dir / "short.safetensors", "abc");
  expect_error(dir / "short.safetensors", "truncated");

  std::string huge(8, '\0');
  const uint64_t n = 1000;
  std::memcpy(huge.data(), &n, 8);
  write_bytes(dir / "hdr.safetensors", huge + "{}");
  expect_error(dir / "hdr.safetensors", "past the end");

  write_bytes(dir / "json.safetensors", with_header("{\"a\": [", ""));
  expect_error(dir / "json.safetensors", "invalid JSON");

  write_bytes(dir / "range.safetensors",
              with_header(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", std::string(4, 'x')));
  expect_error(dir / "range.safetensors", "run past the data buffer");

  write_bytes(dir / "overlap.safetensors",
              with_header(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                          R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", std::string(8, 'x')));
  expect_error(dir / "overlap.safetensors", "overlaps");

  write_bytes(dir / "dtype.safetensors",
              with_header(R"({"a":{"dtype":"Q7","shape":[1],"data_offsets":[0,1]}})", "x"));
  expect_error(dir / "dtype.safetensors", "unknown dtype 'Q7'");

  write_bytes(dir / "shape.safetensors",
              with_header(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", std::string(8, 'x')));
  expect_error(dir / "shape.safetensors", "needs 12 bytes");

  write_bytes(dir / "fields.safetensors", with_header(R"({"a":{"dtype":"F32"}})", ""));
  expect_error(dir / "fields.safetensors", "needs dtype");

  EXPECT_THROW(SafetensorsFile::open(dir / "missing.safetensors"), Error);
}

TEST(Safetensors, ShardedCheckpointThroughIndex) {
  const fs::path dir = test::temp_dir("st_sharded");
  for (int s = 0; s < 2; ++s) {
    SafetensorsWriter w;
    const float v[2] = {float(s), float(s) + 0.5f};
    w.add("t" + std::to_string(s), DType::kF32, {2}, v, sizeof v);
    w.write(dir / ("model-0000" + std::to_string(s + 1) + "-of-00002.safetensors"));
  }
  write_bytes(dir / "model.safetensors.index.json",
              R"({"metadata":{},"weight_map":{"t0":"model-00001-of-00002.safetensors","t1":"model-00002-of-00002.safetensors"}})");
  auto c = Checkpoint::open_dir(dir);
  EXPECT_EQ(c.names(), (std::vector<std::string>{"t0", "t1"}));
  float v;
  std::memcpy(&v, c.find("t1")->data + 4, 4);
  EXPECT_EQ(v, 1.5f);

  write_bytes(dir / "model.safetensors.index.json",
              R"({"weight_map":{"t0":"model-00001-of-00002.safetensors","t9":"model-00002-of-00002.safetensors"}})");
  EXPECT_THROW(Checkpoint::open_dir(dir), Error);
  EXPECT_THROW(Checkpoint::open_dir(dir / "nowhere"), Error);
}
