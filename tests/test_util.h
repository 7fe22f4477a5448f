// Shared helpers for tests: where the shared data, the reference outputs and the Python interpreter are.
// Paths come from the environment ctest sets (tests/CMakeLists.txt), so tests never guess locations.
#pragma once

#include <filesystem>
#include <string>

namespace rlaif::test {

std::filesystem::path shared_data();   // ../shared/data
std::filesystem::path reference_dir(); // build/reference (made by tests/reference/*.py)
std::filesystem::path source_dir();    // repository root
std::filesystem::path binary_dir();    // build directory
std::string python();                  // the venv's python with transformers & co.
// A fresh empty directory under the build tree for one test's files.
std::filesystem::path temp_dir(const std::string& name);
// Runs a shell command, returns its exit code; stdout+stderr go to `output` when given.
int run_command(const std::string& cmd, std::string* output = nullptr);

}  // namespace rlaif::test
