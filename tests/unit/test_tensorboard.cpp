// TensorBoard event files are read back by TensorBoard's own reader (EventAccumulator, PyPI tensorboard) with
// the tags, steps and values written; CRC32C matches the published check value.
#include <gtest/gtest.h>

#include <fstream>

#include "core/tensorboard.h"
#include "test_util.h"

using namespace rlaif;

TEST(TensorBoard, Crc32cCheckValue) {
  EXPECT_EQ(crc32c("123456789", 9), 0xE3069283u);  // the CRC-32C check value (RFC 3720)
}

TEST(TensorBoard, EventAccumulatorReadsOurScalars) {
  const auto dir = test::temp_dir("tensorboard");
  {
    TensorBoardWriter w(dir / "tb");
    for (int step = 1; step <= 5; ++step) {
      w.scalar("reward/mean", 0.1 * step, step);
      w.scalar("train/loss", 1.0 / step, step);
    }
    w.flush();
  }
  const std::string script = R"PY(
import sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1]); acc.Reload()
tags = acc.Tags()["scalars"]
assert sorted(tags) == ["reward/mean", "train/loss"], tags
r = acc.Scalars("reward/mean")
assert [e.step for e in r] == [1, 2, 3, 4, 5], r
assert all(abs(e.value - 0.1 * e.step) < 1e-6 for e in r), r
l = acc.Scalars("train/loss")
assert abs(l[3].value - 0.25) < 1e-7, l
print("ok")
)PY";
  std::ofstream(dir / "read.py") << script;
  std::string out;
  EXPECT_EQ(test::run_command(test::python() + " " + (dir / "read.py").string() + " " + (dir / "tb").string(), &out), 0)
      << out;
}
