// Subcommand registry: each apps/cmd_<name>.cpp registers itself, so adding a command touches one file.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

namespace rlaif::app {

struct Command {
  std::string name;
  std::string help;
  // Adds options to `sub` and returns the action that runs once parsing succeeded; returns exit code.
  std::function<std::function<int()>(CLI::App& sub)> setup;
};

std::vector<Command>& commands();

struct RegisterCommand {
  explicit RegisterCommand(Command c) { commands().push_back(std::move(c)); }
};

}  // namespace rlaif::app
