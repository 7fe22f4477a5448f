#!/usr/bin/env bash
# The full test run (what CI runs): set-up if anything is missing (idempotent), build, then every test.
# Extra arguments go to ctest, e.g. `scripts/test.sh -L unit` or `scripts/test.sh -R Engine`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Tests run two at a time on small tensors: one intra-op thread each avoids OpenMP oversubscription stalls.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
ctest --test-dir build -j "$(nproc)" --output-on-failure "$@"
