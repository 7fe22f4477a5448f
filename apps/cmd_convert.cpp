// `rlaif convert`: an HF folder, a GGUF file or an rlaif checkpoint → an MLX-format folder, optionally 4- or 8-bit
// affine-quantized (docs/FORMATS.md), as the original convert_to_mlx.py --hf-path --mlx-path --quantize did.
// `--quantize keep` (the default for GGUF sources) writes the source's own quantization without re-quantizing.
#include <chrono>
#include <cstdio>
#include <filesystem>

#include "command.h"
#include "core/error.h"
#include "core/logging.h"
#include "models/quantized_model.h"
#include "models/weights.h"

namespace rlaif::app {
namespace {

struct ConvertOpts {
  std::string src, out, quantize, dtype = "bf16";  // quantize "" = keep for a .gguf source, else none
  int64_t group_size = 64;
};

QuantSpec parse_quantize(const std::string& q, int64_t group_size) {
  if (q == "none" || q == "keep") return {};
  if (q == "q4" || q == "q4_bit") return {4, group_size};
  if (q == "q8" || q == "q8_bit") return {8, group_size};
  throw Error("convert", fmt::format("unknown --quantize '{}'", q),
              "use q4, q8, keep or none (q4_bit and q8_bit also work)");
}

void draw_progress(int64_t done, int64_t total) {
  constexpr int kWidth = 30;
  const int filled = static_cast<int>(kWidth * done / std::max<int64_t>(total, 1));
  std::fprintf(stderr, "\r[%s%s] %lld/%lld tensors", std::string(filled, '#').c_str(),
               std::string(kWidth - filled, '.').c_str(), static_cast<long long>(done), static_cast<long long>(total));
  if (done == total) std::fputc('\n', stderr);
  std::fflush(stderr);
}

int run(const ConvertOpts& o) {
  const bool gguf = std::filesystem::path(o.src).extension() == ".gguf";
  const std::string quantize = o.quantize.empty() ? (gguf ? "keep" : "none") : o.quantize;
  const QuantSpec spec = parse_quantize(quantize, o.group_size);
  const bool keep = quantize == "keep";
  if (spec.enabled() && (o.group_size < 8 || o.group_size % 8 != 0))
    throw Error("convert", fmt::format("--group-size {} must be a positive multiple of 8", o.group_size),
                "MLX uses 32, 64 (default) or 128");
  const at::ScalarType dtype = parse_torch_dtype(o.dtype);
  const auto t0 = std::chrono::steady_clock::now();
  ConvertSource src = load_convert_source(o.src, keep);
  const std::string how = spec.enabled() ? fmt::format(" with {}-bit quantization, group size {}", spec.bits, spec.group_size)
                          : keep && src.model->weights().quantized() ? " keeping the source's quantization"
                                                                       : "";
  log_info("Converting {} ({} source, {} {} layers) to {}{}", o.src, src.kind, src.model->config().architecture,
           src.model->config().num_layers, o.out, how);
  const ConvertStats st = write_mlx_folder(src, o.out, spec, dtype, draw_progress);
  if (src.files_dir.empty())
    log_warn("{} has no tokenizer files to copy; {} holds weights and config.json only", o.src, o.out);
  const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  log_info("Wrote {}: {} tensors ({} quantized), {:.1f} MB of weights, {} tokenizer/template files, in {:.1f} s",
           o.out, st.tensors, st.quantized, st.bytes / 1e6, st.copied_files.size(), dt);
  return 0;
}

const RegisterCommand kRegister{Command{
    "convert", "Convert a model (HF folder, GGUF, rlaif checkpoint) to an MLX-format folder, optionally quantized",
    [](CLI::App& sub) -> std::function<int()> {
      auto o = std::make_shared<ConvertOpts>();
      sub.add_option("--hf-path", o->src, "source: HF model folder, .gguf file or rlaif checkpoint directory")
          ->required();
      sub.add_option("--out,--mlx-path", o->out, "destination folder")->required();
      sub.add_option("--quantize,-q", o->quantize,
                     "q4, q8 (re-quantize), keep (the source's own quantization, written as it is: GGUF Q8_0/Q4_0/Q4_1 "
                     "repacked losslessly, MLX folders unchanged) or none; default keep for a .gguf source, else none "
                     "(also q4_bit, q8_bit)");
      sub.add_option("--group-size", o->group_size, "quantization group size along the input dim")
          ->capture_default_str();
      sub.add_option("--dtype", o->dtype, "bf16, f16 or f32: unquantized tensors and the scales/biases")
          ->capture_default_str();
      return [o]() { return run(*o); };
    }}};

}  // namespace
}  // namespace rlaif::app
