#!/usr/bin/env bash
# Builds the CUDA binaries here and packs them into .device/prebuilt.tar.xz, so a device call that carries it skips
# scripts/device.sh's 100-170 s build (same CUDA 13.0.88 there; docs/DEVICE.md, "Skipping the device build").
# Usage: scripts/device_prebuild.sh [target ...]   (default: the benchmarks and the kernel tests device.sh runs)
set -euo pipefail
cd "$(dirname "$0")/.."
B=${RLAIF_PREBUILD_DIR:-build-cuda}
targets=${*:-bench_generate bench_train bench_quant test_lora_kernel test_quant_small_linear test_engine}
if [ ! -f "$B/build.ninja" ]; then
  bash scripts/setup.sh > /dev/null
  cmake -S . -B "$B" -G Ninja -DRLAIF_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_BUILD_TYPE=Release \
    -DRLAIF_PYTHON="$PWD/.venv/bin/python" \
    -DCMAKE_PREFIX_PATH="$(.venv/bin/python -c 'import torch;print(torch.utils.cmake_prefix_path)')" > /dev/null
fi
ninja -C "$B" $targets
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
for t in $targets; do
  f=$(find "$B/bench" "$B/tests" -maxdepth 1 -name "$t" -type f | head -1)
  [ -n "$f" ] || { echo "device_prebuild: no binary for target $t under $B/bench or $B/tests" >&2; exit 1; }
  mkdir -p "$stage/$(dirname "${f#$B/}")"
  strip -o "$stage/${f#$B/}" "$f"
done
# Which tree the binaries are: device.sh logs it beside the results.
echo "$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src bench tests CMakeLists.txt || echo ' with uncommitted changes')" \
  > "$stage/PREBUILT_COMMIT"
mkdir -p .device
# One dictionary larger than all the binaries: they share most of their bytes (the kernels, libtorch glue), so the
# pack is about the size of one of them (six: 12.6 MB, against 63 MB at xz's default 8 MiB dictionary).
tar cf - -C "$stage" . | xz -T0 --lzma2=preset=6,dict=256MiB > .device/prebuilt.tar.xz
echo "device_prebuild: .device/prebuilt.tar.xz ($(du -h .device/prebuilt.tar.xz | cut -f1), $(cat "$stage/PREBUILT_COMMIT"))"
echo "carry it (with .device/debs and .device/shared; 64 MiB in all): the build stage then unpacks it"
