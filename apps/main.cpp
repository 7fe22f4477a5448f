// rlaif entry point: parses the command line (CLI11), runs one subcommand, turns errors into exit codes.
#include <algorithm>
#include <cstdio>
#include <exception>
#include <memory>

#include "command.h"
#include "core/error.h"
#include "core/logging.h"

namespace rlaif::app {
std::vector<Command>& commands() {
  static std::vector<Command> c;
  return c;
}
}  // namespace rlaif::app

int main(int argc, char** argv) {
  using namespace rlaif;
  CLI::App app{"rlaif: reinforcement learning from AI feedback for code LLMs, in one process"};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string("rlaif 0.1.0"));
  std::string level = "info";
  app.add_option("--log-level", level, "debug, info, warn, error or off")->capture_default_str();

  std::function<int()> action;
  auto& cmds = app::commands();
  std::sort(cmds.begin(), cmds.end(), [](auto& a, auto& b) { return a.name < b.name; });
  for (auto& c : cmds) {
    CLI::App* sub = app.add_subcommand(c.name, c.help);
    auto run = std::make_shared<std::function<int()>>(c.setup(*sub));
    sub->callback([run, &action] { action = *run; });
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    set_log_level(parse_log_level(level));
    return action ? action() : 0;
  } catch (const Error& e) {
    std::fprintf(stderr, "error: %s\n", redact(e.what()).c_str());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "internal error: %s\n", redact(e.what()).c_str());
    return 2;
  }
}
