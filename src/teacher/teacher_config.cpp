// Names of the scoring modes as written in config files.
#include "teacher/teacher_config.h"

#include <fmt/format.h>

#include "core/error.h"

namespace rlaif::teacher {

ScoringMode parse_scoring_mode(const std::string& name) {
  if (name == "relative") return ScoringMode::kRelative;
  if (name == "absolute") return ScoringMode::kAbsolute;
  if (name == "batched_ranked" || name == "ranked") return ScoringMode::kBatchedRanked;
  throw Error("teacher", fmt::format("unknown scoring mode '{}'", name), "use relative, absolute or batched_ranked");
}

const char* scoring_mode_name(ScoringMode mode) {
  switch (mode) {
    case ScoringMode::kRelative: return "relative";
    case ScoringMode::kAbsolute: return "absolute";
    case ScoringMode::kBatchedRanked: return "batched_ranked";
  }
  return "?";
}

}  // namespace rlaif::teacher
