// Out-of-line failure path of RLAIF_CHECK, kept cold so the check itself costs one branch.
#include "core/error.h"

namespace rlaif {

void check_failed(const char* expr, const char* file, int line, const std::string& msg) {
  std::string s = fmt::format("internal check failed: {} at {}:{}", expr, file, line);
  if (!msg.empty()) s += ": " + msg;
  throw InternalError(s);
}

}  // namespace rlaif
