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

namespace {

// Σ r of group g's adapters when every projection of it has one and a plain weight the layout may re-bind; else 0.
int64_t lora_group_rank(const LayerWeights& L, ProjGroup g) {
  int64_t r = 0;
  const at::Tensor& first = L.weight(group_projs(g)[0]);
  for (Proj p : group_projs(g)) {
    const at::Tensor& w = L.weight(p);
    const LoraAdapter& ad = L.lora[static_cast<int>(p)];
    if (!ad.defined() || !w.defined() || w.requires_grad() || w.scalar_type() != first.scalar_type() ||
        w.device() != first.device() || w.size(1) != first.size(1) ||
        L.bias(p).defined() != L.bias(group_projs(g)[0]).defined())
      return 0;
    r += ad.a.size(0);
  }
  return r;
}

}  // namespace

int64_t pack_lora_rows(ModelWeights& w) {
  at::NoGradGuard no_grad;
  int64_t laid_out = 0;
  for (LayerWeights& L : w.layers) {
    for (int gi = 0; gi < kNumProjGroups; ++gi) {
      const auto g = static_cast<ProjGroup>(gi);
      const std::vector<Proj>& ps = group_projs(g);
      const int64_t r = lora_group_rank(L, g);
      if (r == 0) {
        L.lora_rows[gi] = L.lora_bias_rows[gi] = at::Tensor();
        continue;
      }
      std::vector<at::Tensor*> ws, bs;
      for (Proj p : ps) {
        ws.push_back(&L.weight(p));
        bs.push_back(&L.bias(p));
      }
      ws.push_back(&L.lora_rows[gi]);
      bs.push_back(&L.lora_bias_rows[gi]);
      if (L.lora_rows[gi].defined() && L.lora_rows[gi].size(0) == r && packed_rows({ws.begin(), ws.end()}).defined())
        continue;
      const at::Tensor& first = L.weight(ps[0]);
      L.lora_rows[gi] = at::empty({r, first.size(1)}, first.options());  // A's copy: refresh_lora_rows fills it
      pack_rows(ws);
      const bool biased = L.bias(ps[0]).defined();
      L.lora_bias_rows[gi] = biased ? at::zeros({r}, L.bias(ps[0]).options()) : at::Tensor();
      if (biased) pack_rows(bs);
      ++laid_out;
    }
  }
  refresh_lora_rows(w);
  return laid_out;
}

void refresh_lora_rows(ModelWeights& w) {
  at::NoGradGuard no_grad;
  for (LayerWeights& L : w.layers)
    for (int gi = 0; gi < kNumProjGroups; ++gi) {
      if (!L.lora_rows[gi].defined()) continue;
      int64_t row = 0;
      for (Proj p : group_projs(static_cast<ProjGroup>(gi))) {
        const at::Tensor& a = L.lora[static_cast<int>(p)].a;
        L.lora_rows[gi].narrow(0, row, a.size(0)).copy_(a);
        row += a.size(0);
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
