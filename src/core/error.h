// Errors users can act on: every exception names its component ("[safetensors] ...") and, where one helps,
// a hint. Invariants that only a bug can break use RLAIF_CHECK (always on, also in release builds).
#pragma once

#include <stdexcept>
#include <string>

#include <fmt/format.h>

namespace rlaif {

// A problem with the user's input, config, files or network: the message says what and where.
class Error : public std::runtime_error {
 public:
  Error(const std::string& component, const std::string& message, const std::string& hint = "")
      : std::runtime_error(format(component, message, hint)), component_(component) {}
  const std::string& component() const { return component_; }

 private:
  static std::string format(const std::string& component, const std::string& message,
                            const std::string& hint) {
    std::string s = "[" + component + "] " + message;
    if (!hint.empty()) s += " (hint: " + hint + ")";
    return s;
  }
  std::string component_;
};

// A broken invariant: a bug in rlaif, never the user's fault.
class InternalError : public std::logic_error {
 public:
  using std::logic_error::logic_error;
};

[[noreturn]] void check_failed(const char* expr, const char* file, int line, const std::string& msg);

}  // namespace rlaif

// RLAIF_CHECK(cond) or RLAIF_CHECK(cond, "fmt {}", args...): always evaluated, throws InternalError.
#define RLAIF_CHECK(cond, ...)                                                                \
  do {                                                                                       \
    if (!(cond)) [[unlikely]]                                                                \
      ::rlaif::check_failed(#cond, __FILE__, __LINE__, ::rlaif::detail::check_msg(__VA_ARGS__)); \
  } while (0)

namespace rlaif::detail {
inline std::string check_msg() { return {}; }
template <typename... Args>
std::string check_msg(fmt::format_string<Args...> f, Args&&... args) {
  return fmt::format(f, std::forward<Args>(args)...);
}
}  // namespace rlaif::detail
