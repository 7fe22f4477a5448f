// Cheap verifier tiers (see verifiers.h). Toolchains run only inside the sandbox: compilers see untrusted code too.
#include "teacher/verifiers.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <mutex>
#include <random>
#include <regex>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "teacher/rubric.h"
#include "teacher/sandbox.h"

namespace rlaif::teacher {

namespace {

const std::string& tool(const std::string& name) {
  static std::mutex m;
  static std::map<std::string, std::string> found;
  std::lock_guard<std::mutex> lock(m);
  auto it = found.find(name);
  if (it == found.end()) it = found.emplace(name, find_tool(name)).first;
  return it->second;
}

// Compilers need more address space than the programs they build.
SandboxConfig compile_limits(SandboxConfig c) {
  c.memory_mb = std::max<int64_t>(c.memory_mb, 2048);
  c.cpu_seconds = std::max(c.cpu_seconds, 20.0);
  c.wall_seconds = std::max(c.wall_seconds, 30.0);
  return c;
}

TierResult from_run(const std::string& name, const SandboxResult& r) {
  TierResult t{name, r.ok() ? 1.0 : 0.0, r.ok(), r.reason()};
  if (!r.ok() && !r.output.empty()) t.detail += ": " + r.output.substr(0, 400);
  return t;
}

std::optional<double> parse_number(std::string s) {
  s.erase(std::remove_if(s.begin(), s.end(), [](char c) { return c == ',' || c == '$' || c == ' '; }), s.end());
  static const std::regex kNum(R"(^-?\d+(\.\d+)?)");
  std::smatch m;
  if (!std::regex_search(s, m, kNum)) return std::nullopt;
  return std::stod(m.str());
}

}  // namespace

bool is_code_language(const std::string& language) {
  const std::string l = normalize_language(language);
  return l == "python" || l == "cpp" || l == "rust";
}

std::string code_of(const std::string& completion, const std::string& language) {
  const std::string lang = normalize_language(language);
  std::string first;
  for (size_t pos = completion.find("```"); pos != std::string::npos;) {
    const size_t nl = completion.find('\n', pos);
    if (nl == std::string::npos) break;
    const size_t end = completion.find("```", nl);
    if (end == std::string::npos) break;
    const std::string tag = normalize_language(completion.substr(pos + 3, nl - pos - 3));
    const std::string body = completion.substr(nl + 1, end - nl - 1);
    if (!lang.empty() && tag == lang) return body;
    if (first.empty()) first = body;
    pos = completion.find("```", end + 3);
  }
  return first.empty() ? completion : first;
}

std::optional<std::string> heuristic_reject(const std::string& completion, const std::string& language) {
  if (completion.find_first_not_of(" \t\r\n") == std::string::npos) return "empty";
  if (!is_code_language(language)) return std::nullopt;
  size_t fences = 0;
  for (size_t p = completion.find("```"); p != std::string::npos; p = completion.find("```", p + 3)) ++fences;
  if (fences % 2 == 1) return "truncated: unclosed code fence";
  const std::string code = code_of(completion, language);
  const std::string lang = normalize_language(language);
  if (lang != "python") {
    int depth = 0;
    for (char c : code) depth += c == '{' ? 1 : c == '}' ? -1 : 0;
    if (depth > 0) return "truncated: unbalanced braces";
  }
  static const std::regex kPython(R"((^|\n)\s*(def |class |import |from |return\b|print\(|for |while |if )|=)");
  static const std::regex kBraces(R"([;{}])");
  if (!std::regex_search(code, lang == "python" ? kPython : kBraces)) return "not code";
  return std::nullopt;
}

std::optional<TierResult> syntax_check(const SandboxConfig& cfg, const std::string& code, const std::string& language) {
  const std::string lang = normalize_language(language);
  std::vector<std::string> argv;
  std::string file;
  if (lang == "python" && !tool("python3").empty()) {
    file = "main.py";
    argv = {tool("python3"), "-c", "import ast,sys; ast.parse(open('main.py').read(), 'main.py')"};
  } else if (lang == "cpp" && !tool("g++").empty()) {
    file = "main.cpp";
    argv = {tool("g++"), "-std=c++20", "-fsyntax-only", "main.cpp"};
  } else if (lang == "rust" && !tool("rustc").empty()) {
    file = "main.rs";
    argv = {tool("rustc"), "--edition", "2021", "--crate-type", "lib", "--emit=metadata", "-o", "main.rmeta", "main.rs"};
  } else {
    return std::nullopt;
  }
  SandboxDir dir(cfg);
  dir.write(file, code);
  return from_run("syntax", run_sandboxed(compile_limits(cfg), argv, dir.path()));
}

std::optional<TierResult> run_tests(const SandboxConfig& cfg, const std::string& code, const std::string& language,
                                    const std::vector<std::string>& tests) {
  if (tests.empty()) return std::nullopt;
  const std::string lang = normalize_language(language);
  SandboxDir dir(cfg);
  if (lang == "python" && !tool("python3").empty()) {
    // Each test statement runs on its own, so the tier reports the fraction passed; the nonce keeps a sample
    // from printing a fake tally.
    const std::string nonce = fmt::format("RLAIF_TALLY_{:x}", std::random_device{}() * 2654435761u);
    dir.write("solution.py", code);
    dir.write("tests.json", nlohmann::json(tests).dump());
    dir.write("harness.py", fmt::format(R"(import json
ns = {{"__name__": "__main__"}}
exec(compile(open("solution.py").read(), "solution.py", "exec"), ns)
tests = json.load(open("tests.json"))
passed = 0
for t in tests:
    try:
        exec(compile(t, "test", "exec"), ns)
        passed += 1
    except BaseException as e:
        print("test failed:", type(e).__name__, e)
print("{}", passed, len(tests), flush=True)
)",
                                        nonce));
    const SandboxResult r = run_sandboxed(cfg, {tool("python3"), "harness.py"}, dir.path());
    const size_t at = r.output.rfind(nonce);
    if (!r.ok() || at == std::string::npos) return from_run("tests", r);
    int passed = 0, total = 0;
    if (std::sscanf(r.output.c_str() + at + nonce.size(), "%d %d", &passed, &total) != 2 || total <= 0)
      return TierResult{"tests", 0, false, "no tally"};
    return TierResult{"tests", static_cast<double>(passed) / total, passed == total,
                      fmt::format("{}/{} tests passed", passed, total)};
  }
  std::string all = code + "\n";
  for (const auto& t : tests) all += t + "\n";
  std::vector<std::string> compile;
  if (lang == "cpp" && !tool("g++").empty()) {
    dir.write("main.cpp", all);
    compile = {tool("g++"), "-std=c++20", "-O1", "-o", "prog", "main.cpp"};
  } else if (lang == "rust" && !tool("rustc").empty()) {
    dir.write("main.rs", all);
    compile = {tool("rustc"), "--edition", "2021", "-o", "prog", "main.rs"};
  } else {
    return std::nullopt;
  }
  const SandboxResult c = run_sandboxed(compile_limits(cfg), compile, dir.path());
  if (!c.ok()) {
    TierResult t = from_run("tests", c);
    t.detail = "compile failed: " + t.detail;
    return t;
  }
  return from_run("tests", run_sandboxed(cfg, {(dir.path() / "prog").string()}, dir.path()));
}

std::optional<double> hash_answer(const std::string& text) {
  const size_t p = text.rfind("####");
  if (p == std::string::npos) return std::nullopt;
  return parse_number(text.substr(p + 4));
}

TierResult exact_answer(const std::string& completion, const std::string& answer) {
  const auto want = hash_answer(answer);
  if (!want) return {"exact_answer", 0, false, "reference answer has no '#### N'"};
  auto got = hash_answer(completion);
  if (!got) {
    static const std::regex kLast(R"(-?[\d,]*\d(\.\d+)?)");
    std::optional<double> last;
    for (auto it = std::sregex_iterator(completion.begin(), completion.end(), kLast); it != std::sregex_iterator(); ++it)
      last = parse_number(it->str());
    got = last;
  }
  if (!got) return {"exact_answer", 0, false, "no number in the completion"};
  const bool ok = std::fabs(*got - *want) <= 1e-6 * std::max(1.0, std::fabs(*want));
  return {"exact_answer", ok ? 1.0 : 0.0, ok, fmt::format("got {} want {}", *got, *want)};
}

}  // namespace rlaif::teacher
