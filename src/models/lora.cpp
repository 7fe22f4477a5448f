// LoRA attachment and naming (PEFT conventions: kaiming_uniform_(a=sqrt(5)) for A, zeros for B,
// scaling = lora_alpha / r, module paths under base_model.model.).
#include "models/lora.h"

#include <cmath>

#include <map>
#include <set>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/io.h"

namespace rlaif {

static std::string module_path(int layer, int proj) {
  const bool attn = proj <= static_cast<int>(Proj::kO);
  return fmt::format("base_model.model.model.layers.{}.{}.{}", layer, attn ? "self_attn" : "mlp", kProjNames[proj]);
}

void attach_lora(DecoderModel& model, const LoraConfig& cfg, uint64_t seed) {
  if (cfg.r <= 0) throw Error("lora", fmt::format("r must be positive, got {}", cfg.r));
  bool on[kNumProj] = {};
  for (const auto& t : cfg.target_modules) {
    bool found = false;
    for (int p = 0; p < kNumProj; ++p)
      if (t == kProjNames[p]) on[p] = found = true;
    if (!found)
      throw Error("lora", fmt::format("unknown target module '{}'", t),
                  "known: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj");
  }
  at::Generator gen = at::detail::createCPUGenerator(seed);
  for (auto& L : model.weights().layers) {
    for (int p = 0; p < kNumProj; ++p) {
      if (!on[p]) continue;
      const at::Tensor& w = L.weight(static_cast<Proj>(p));
      const int64_t out = w.size(0), in = w.size(1);
      // kaiming_uniform_(a=sqrt(5)) on [r, in]: bound = sqrt(6 / ((1 + a²) · fan_in)) = 1 / sqrt(in).
      const double bound = 1.0 / std::sqrt(static_cast<double>(in));
      at::Tensor a = at::empty({cfg.r, in}, at::kFloat).uniform_(-bound, bound, gen);
      LoraAdapter& ad = L.lora[p];
      ad.a = a.to(w.device()).set_requires_grad(true);
      ad.b = at::zeros({out, cfg.r}, at::TensorOptions().dtype(at::kFloat).device(w.device())).set_requires_grad(true);
      ad.scale = cfg.alpha / static_cast<double>(cfg.r);
      ad.dropout = cfg.dropout;
    }
  }
}

bool has_lora(const DecoderModel& model) {
  for (const auto& L : model.weights().layers)
    for (const auto& a : L.lora)
      if (a.defined()) return true;
  return false;
}

std::vector<std::pair<std::string, at::Tensor>> lora_parameters(const DecoderModel& model) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  const auto& layers = model.weights().layers;
  for (size_t l = 0; l < layers.size(); ++l)
    for (int p = 0; p < kNumProj; ++p) {
      const LoraAdapter& a = layers[l].lora[p];
      if (!a.defined()) continue;
      out.push_back({module_path(static_cast<int>(l), p) + ".lora_A.weight", a.a});
      out.push_back({module_path(static_cast<int>(l), p) + ".lora_B.weight", a.b});
    }
  return out;
}

void save_peft_adapter(const DecoderModel& model, const LoraConfig& cfg, const std::filesystem::path& dir,
                       const std::string& base_model_name) {
  std::filesystem::create_directories(dir);
  std::map<std::string, at::Tensor> tensors;
  for (const auto& [name, t] : lora_parameters(model)) tensors[name] = t;
  if (tensors.empty()) throw Error("lora", "the model has no LoRA adapters to save");
  save_safetensors(dir / "adapter_model.safetensors", tensors, {{"format", "pt"}});
  nlohmann::ordered_json j = {{"peft_type", "LORA"}, {"task_type", "CAUSAL_LM"}, {"base_model_name_or_path", base_model_name},
                              {"r", cfg.r}, {"lora_alpha", cfg.alpha}, {"lora_dropout", cfg.dropout},
                              {"target_modules", cfg.target_modules}, {"bias", "none"}, {"fan_in_fan_out", false},
                              {"use_rslora", false}, {"use_dora", false}, {"inference_mode", true},
                              {"init_lora_weights", true}, {"modules_to_save", nullptr}};
  write_file_atomic(dir / "adapter_config.json", j.dump(2));
}

LoraConfig load_peft_adapter(DecoderModel& model, const std::filesystem::path& dir) {
  const auto cfg_path = dir / "adapter_config.json";
  const auto j = nlohmann::json::parse(read_file(cfg_path), nullptr, false);
  if (j.is_discarded() || !j.is_object()) throw Error("lora", fmt::format("{}: invalid JSON", cfg_path.string()));
  if (j.value("peft_type", "LORA") != "LORA")
    throw Error("lora", fmt::format("{}: peft_type '{}' is not supported", cfg_path.string(), j.value("peft_type", "")),
                "only LoRA adapters are supported");
  if (j.value("use_rslora", false) || j.value("use_dora", false))
    throw Error("lora", fmt::format("{}: rsLoRA/DoRA adapters are not supported", cfg_path.string()));
  LoraConfig cfg;
  try {
    cfg.r = j.at("r").get<int64_t>();
    cfg.alpha = j.at("lora_alpha").get<double>();
    cfg.dropout = j.value("lora_dropout", 0.0);
    const auto& tm = j.at("target_modules");
    cfg.target_modules = tm.is_string() ? std::vector<std::string>{tm.get<std::string>()} : tm.get<std::vector<std::string>>();
  } catch (const nlohmann::json::exception& e) {
    throw Error("lora", fmt::format("{}: {}", cfg_path.string(), e.what()), "expected PEFT's r, lora_alpha, target_modules");
  }
  for (auto& L : model.weights().layers)
    for (auto& a : L.lora) a = LoraAdapter{};
  attach_lora(model, cfg, 0);
  auto tensors = load_safetensors(dir / "adapter_model.safetensors");
  std::vector<std::string> missing;
  std::set<std::string> used;
  for (const auto& [name, t] : lora_parameters(model)) {
    // PEFT may save with or without the adapter name ("default") inside the key.
    std::string key = name;
    if (!tensors.count(key)) {
      const auto dot = key.rfind(".weight");
      key = key.substr(0, dot) + ".default.weight";
    }
    auto it = tensors.find(key);
    if (it == tensors.end()) {
      missing.push_back(name);
      continue;
    }
    if (it->second.sizes() != t.sizes())
      throw Error("lora", fmt::format("{}: tensor '{}' has shape [{}], the model needs [{}]", dir.string(), key,
                                      fmt::join(it->second.sizes(), ", "), fmt::join(t.sizes(), ", ")));
    at::NoGradGuard g;
    const_cast<at::Tensor&>(t).copy_(it->second);
    used.insert(key);
  }
  std::vector<std::string> unexpected;
  for (const auto& [k, v] : tensors)
    if (!used.count(k)) unexpected.push_back(k);
  if (!missing.empty() || !unexpected.empty())
    throw Error("lora", fmt::format("{}: adapter does not match its config ({}{})", dir.string(),
                                    missing.empty() ? "" : "missing: " + fmt::format("{}", fmt::join(missing, ", ")),
                                    unexpected.empty() ? "" : " unexpected: " + fmt::format("{}", fmt::join(unexpected, ", "))));
  return cfg;
}

}  // namespace rlaif
