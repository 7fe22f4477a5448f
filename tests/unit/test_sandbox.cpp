// Sandbox and cheap verifier tiers: hostile samples (endless loop, 10 GB allocation, fork bomb, writes outside
// the directory, network) are stopped and fail while the host is unaffected; syntax, tests and exact answers
// score what they should. Limits are tiny so nothing here can hurt a shared machine.
#include <gtest/gtest.h>

#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <fstream>

#include "teacher/sandbox.h"
#include "teacher/scorer.h"
#include "teacher/verifiers.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace rlaif;
using namespace rlaif::teacher;

namespace {

SandboxConfig tiny() {
  SandboxConfig c;
  c.cpu_seconds = 1;
  c.wall_seconds = 3;
  c.memory_mb = 256;
  c.max_processes = 8;
  c.max_file_mb = 1;
  c.max_output_kb = 64;
  c.scratch_dir = test::temp_dir("sandbox_scratch").string();
  return c;
}

SandboxResult run_python(const std::string& code, const SandboxConfig& cfg = tiny()) {
  const std::string py = find_tool("python3");
  EXPECT_FALSE(py.empty()) << "python3 is needed for these tests";
  SandboxDir dir(cfg);
  dir.write("main.py", code);
  return run_sandboxed(cfg, {py, "main.py"}, dir.path());
}

// Processes on this host whose command line contains `marker`.
int processes_with(const std::string& marker) {
  int n = 0;
  for (const auto& e : fs::directory_iterator("/proc")) {
    const std::string name = e.path().filename();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::ifstream in(e.path() / "cmdline");
    std::string cmd((std::istreambuf_iterator<char>(in)), {});
    if (cmd.find(marker) != std::string::npos) ++n;
  }
  return n;
}

}  // namespace

TEST(Sandbox, RunsAGoodProgramAndKeepsItsOutput) {
  const auto r = run_python("print('hello from the sandbox')");
  EXPECT_TRUE(r.ok()) << r.reason() << r.output;
  EXPECT_NE(r.output.find("hello from the sandbox"), std::string::npos);
  std::cout << "isolation: " << sandbox_support().note << "\n";
}

TEST(Sandbox, EndlessLoopIsStopped) {
  const auto r = run_python("while True:\n    pass\n");
  EXPECT_FALSE(r.ok());
  EXPECT_TRUE(r.reason() == "cpu limit" || r.reason() == "timeout" || r.signal == SIGKILL) << r.reason();
  EXPECT_LT(r.wall_s, 4.0);
}

TEST(Sandbox, SleepingForeverHitsTheWallClock) {
  const auto r = run_python("import time\ntime.sleep(60)\n");
  EXPECT_TRUE(r.timed_out);
  EXPECT_EQ(r.reason(), "timeout");
  EXPECT_LT(r.wall_s, 4.0);
}

TEST(Sandbox, TenGigabyteAllocationFails) {
  const auto r = run_python("x = bytearray(10 * 1024**3)\nprint('allocated')\n");
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(r.output.find("allocated"), std::string::npos);
  EXPECT_NE(r.output.find("MemoryError"), std::string::npos) << r.output;
}

TEST(Sandbox, ForkBombIsBoundedAndLeavesNothingBehind) {
  const std::string marker = "rlaif_forkbomb_marker";
  const auto r = run_python("import os\n# " + marker + "\nwhile True:\n    os.fork()\n");
  EXPECT_FALSE(r.ok()) << r.output;
  EXPECT_LT(r.wall_s, 4.0);
  usleep(200 * 1000);
  EXPECT_EQ(processes_with("main.py"), 0) << "sandboxed processes survived";
}

TEST(Sandbox, CannotWriteOutsideItsDirectory) {
  if (!sandbox_support().namespaces) GTEST_SKIP() << sandbox_support().note;
  const fs::path outside = test::temp_dir("sandbox_outside") / "escaped.txt";
  const auto r = run_python("open(" + nlohmann::json(outside.string()).dump() + ", 'w').write('x')\n");
  EXPECT_FALSE(r.ok());
  EXPECT_FALSE(fs::exists(outside));
  const auto tmp = run_python("open('/tmp/rlaif_sandbox_escape_probe', 'w').write('x')\n");
  EXPECT_FALSE(tmp.ok());
  EXPECT_FALSE(fs::exists("/tmp/rlaif_sandbox_escape_probe"));
  // Its own directory is writable.
  EXPECT_TRUE(run_python("open('inside.txt', 'w').write('x')\n").ok());
}

TEST(Sandbox, HasNoNetwork) {
  if (!sandbox_support().namespaces) GTEST_SKIP() << sandbox_support().note;
  const int srv = ::socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(srv, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(srv, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  ASSERT_EQ(::listen(srv, 4), 0);
  socklen_t len = sizeof a;
  ASSERT_EQ(::getsockname(srv, reinterpret_cast<sockaddr*>(&a), &len), 0);
  const int port = ntohs(a.sin_port);
  const auto r = run_python(fmt::format("import socket\ns = socket.create_connection(('127.0.0.1', {}), timeout=1)\n"
                                        "print('connected')\n", port));
  ::close(srv);
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(r.output.find("connected"), std::string::npos) << r.output;
}

TEST(Sandbox, OutputFloodIsCut) {
  const auto r = run_python("while True:\n    print('x' * 1000)\n");
  EXPECT_TRUE(r.output_limited);
  EXPECT_LE(r.output.size(), 64u * 1024);
}

TEST(Verifiers, HeuristicRejectsEmptyTruncatedAndProse) {
  EXPECT_EQ(heuristic_reject("  \n", "python").value_or(""), "empty");
  EXPECT_EQ(heuristic_reject("```python\ndef f(x):\n    return", "python").value_or(""), "truncated: unclosed code fence");
  EXPECT_EQ(heuristic_reject("int main() {\n  return 0;\n", "cpp").value_or(""), "truncated: unbalanced braces");
  EXPECT_EQ(heuristic_reject("I think you should use a loop here", "python").value_or(""), "not code");
  EXPECT_FALSE(heuristic_reject("def f(x):\n    return x\n", "python"));
  EXPECT_FALSE(heuristic_reject("The answer is 4. #### 4", ""));
}

TEST(Verifiers, SyntaxChecksPythonAndCpp) {
  const SandboxConfig c = tiny();
  EXPECT_TRUE(syntax_check(c, "def f(x):\n    return x\n", "python")->passed);
  EXPECT_FALSE(syntax_check(c, "def f(x)\n    return x\n", "python")->passed);
  if (find_tool("g++").empty()) GTEST_SKIP() << "no g++ for the sandbox user";
  EXPECT_TRUE(syntax_check(c, "int f(int x) { return x + 1; }\n", "c++")->passed);
  const auto bad = syntax_check(c, "int f(int x) { return y; }\n", "cpp");
  EXPECT_FALSE(bad->passed);
  EXPECT_NE(bad->detail.find("y"), std::string::npos) << bad->detail;
}

TEST(Verifiers, RunsGivenTests) {
  const SandboxConfig c = tiny();
  // MBPP-style assert list: two of three pass.
  const auto t = run_tests(c, "def add(a, b):\n    return a + b if a < 10 else 0\n", "python",
                           {"assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(10, 1) == 11"});
  ASSERT_TRUE(t);
  EXPECT_NEAR(t->score, 2.0 / 3.0, 1e-12);
  EXPECT_FALSE(t->passed);
  // A sample that prints a fake tally does not fool the harness.
  const auto fake = run_tests(c, "print('RLAIF_TALLY_0 5 5')\ndef add(a, b):\n    return 0\n", "python",
                              {"assert add(1, 2) == 3"});
  EXPECT_EQ(fake->score, 0.0);
  if (find_tool("g++").empty()) GTEST_SKIP() << "no g++ for the sandbox user";
  const std::string code = "#include <cassert>\nint sq(int x) { return x * x; }\n";
  EXPECT_TRUE(run_tests(c, code, "cpp", {"int main() { assert(sq(3) == 9); }"})->passed);
  EXPECT_FALSE(run_tests(c, code, "cpp", {"int main() { assert(sq(3) == 10); }"})->passed);
}

TEST(Verifiers, ExactAnswerForGsm8k) {
  const std::string ref = "Natalia sold 48/2 = 24 clips in May.\nAltogether she sold 48+24 = 72 clips.\n#### 72";
  EXPECT_TRUE(exact_answer("... so 72 in total.\n#### 72", ref).passed);
  EXPECT_TRUE(exact_answer("She sold 72 clips.", ref).passed) << "falls back to the last number";
  EXPECT_TRUE(exact_answer("#### $1,072", "#### 1072").passed);
  EXPECT_FALSE(exact_answer("#### 71", ref).passed);
  EXPECT_FALSE(exact_answer("no idea", ref).passed);
}

TEST(Verifiers, ScorerStopsHostileTestsAndScoresThemFailed) {
  TeacherConfig c;
  c.verifiers.teacher = false;
  c.verifiers.sandbox = tiny();
  c.cache_path = "";
  Scorer s(c);
  std::vector<ScoreRequest> rows = {
      {"loop", "Add numbers.", "def add(a, b):\n    while True:\n        pass\n", "python", "", {"assert add(1, 2) == 3"}},
      {"good", "Add numbers.", "def add(a, b):\n    return a + b\n", "python", "", {"assert add(1, 2) == 3"}},
      {"math", "Natalia ...", "So 72.\n#### 72", "", "#### 72", {}},
      {"empty", "Add numbers.", "", "python", "", {}},
  };
  const auto res = s.score(rows);
  // Weighted mean of the tiers: syntax passed (weight 0.2), tests failed (weight 1.0).
  EXPECT_NEAR(res[0].reward.value(), 0.2 / 1.2, 1e-12);
  EXPECT_TRUE(res[0].failure.rfind("tests: ", 0) == 0) << res[0].failure;
  // syntax (weight 0.2) and tests (weight 1.0) both pass.
  EXPECT_EQ(res[1].reward.value(), 1.0);
  EXPECT_TRUE(res[1].failure.empty()) << res[1].failure;
  EXPECT_EQ(res[2].reward.value(), 1.0);
  EXPECT_EQ(res[3].reward.value(), 0.0);
  EXPECT_EQ(res[3].failure, "heuristic: empty");
  EXPECT_EQ(s.step_stats().heuristic_rejects, 1);
}
