#!/usr/bin/env bash
# Runs on the GPU machine (see docs/DEVICE.md): builds rlaif with CUDA against the machine's preinstalled torch,
# runs the GPU tests and benchmarks, and writes logs and results under $OUT. The Debian dev packages the build
# needs travel as .deb files in .device/debs (scripts/device_prepare.sh fetches them) and are unpacked into a
# private sysroot, never into /.
# Usage: scripts/device.sh [build|test|bench|quant|lora|train|profile|all]...   (default: all; profile only when named)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/.device/out}
mkdir -p "$OUT"
STAGES=${*:-all}
PY=${RLAIF_DEVICE_PYTHON:-python3}
SYSROOT=$PWD/.device/sysroot
LIBDIR=$SYSROOT/usr/lib/x86_64-linux-gnu
BUILD=${RLAIF_DEVICE_BUILD:-build-device}
RLAIF_BENCH_SHAPES=${RLAIF_BENCH_SHAPES:-0.5b,3b}
TORCH_PREFIX=$($PY -c 'import torch;print(torch.utils.cmake_prefix_path)')
TORCH_LIB=$($PY -c 'import torch,os;print(os.path.join(os.path.dirname(torch.__file__),"lib"))')
log() { echo "[device] $*" | tee -a "$OUT/summary.txt"; }
# The device tool returns at most 8 files: keep the summary loose and pack the logs and JSON results — also when a
# time limit ends the script early (what ran so far still comes back).
pack() {
  local files
  files=$(cd "$OUT" && ls *.log *.json *.csv ncu_detail_*.txt 2>/dev/null)
  [ -n "$files" ] && tar czf "$OUT/results_${STAGES// /_}.tgz" -C "$OUT" $files 2>/dev/null && (cd "$OUT" && rm -f $files)
  cat "$OUT/summary.txt"
}
trap pack EXIT
trap 'log "stopped by a signal"; exit 124' TERM INT
has() { [[ " $STAGES " == *" $1 "* || " $STAGES " == *" all "* ]]; }
# The random-weight benchmark models transformers saves (bench/hf_generate.py); save_model SHAPE saves one if missing.
MD=/tmp/rlaif-bench-models
save_model() {
  [ -f "$MD/qwen2.5-$1-random/config.json" ] || $PY bench/hf_generate.py --models-dir $MD --out /dev/null --shapes "$1" \
    --save-only > /dev/null 2>&1
}

if [ ! -d "$SYSROOT" ]; then
  for d in .device/debs/*.deb; do dpkg -x "$d" "$SYSROOT"; done
  # Dev symlinks whose runtime library we did not carry point at the machine's own copy of that soname.
  for l in "$LIBDIR"/*.so; do
    [ -e "$l" ] && continue
    t=$(basename "$(readlink "$l")")   # e.g. libcurl.so.4.8.0
    ver=${t#*.so.}
    ln -sf "/usr/lib/x86_64-linux-gnu/${t%%.so.*}.so.${ver%%.*}" "$l"
  done
fi
# ../shared/data does not travel to the GPU machine; the files GPU tests need are carried in .device/shared.
[ -d .device/shared ] && export RLAIF_SHARED_DATA=$PWD/.device/shared
export PKG_CONFIG_PATH=$LIBDIR/pkgconfig:$SYSROOT/usr/share/pkgconfig
export PKG_CONFIG_SYSROOT_DIR=$SYSROOT
export LD_LIBRARY_PATH=$LIBDIR:$TORCH_LIB:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee -a "$OUT/summary.txt"

PREBUILT=.device/prebuilt.tar.xz  # binaries built here by scripts/device_prebuild.sh, when carried
if has build && [ -f "$PREBUILT" ] && [ -z "${RLAIF_DEVICE_FULL_BUILD:-}" ]; then
  mkdir -p "$BUILD" && tar xJf "$PREBUILT" -C "$BUILD"
  log "no build here: prebuilt binaries of $(cat "$BUILD/PREBUILT_COMMIT") unpacked into $BUILD"
elif has build; then
  t0=$(date +%s)
  rm -f "$BUILD/PREBUILT_COMMIT"  # a warm machine's earlier unpack: this build's binaries replace it
  cmake -S . -B "$BUILD" -G Ninja -DRLAIF_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DRLAIF_PYTHON="$(command -v $PY)" \
    -DCMAKE_PREFIX_PATH="$SYSROOT/usr;$TORCH_PREFIX" -DCMAKE_BUILD_TYPE=Release > "$OUT/cmake.log" 2>&1 \
    || { tail -40 "$OUT/cmake.log"; log "cmake failed"; exit 1; }
  ninja -C "$BUILD" ${RLAIF_DEVICE_TARGETS:-} > "$OUT/build.log" 2>&1 || { grep -E "error|FAILED" -A3 "$OUT/build.log" | head -60; log "build failed"; exit 1; }
  log "build ok in $(( $(date +%s) - t0 )) s"
fi

if has test && [ -f "$BUILD/PREBUILT_COMMIT" ] && [ -f "$PREBUILT" ]; then
  # Prebuilt: no ctest files here, so each carried test binary runs directly (kernel tests: no fixtures), with
  # RLAIF_DEVICE_TESTS's alternatives as a gtest filter.
  filter=$(echo "${RLAIF_DEVICE_TESTS:-}" | sed -E 's/([^|]+)/*\1*/g; s/\|/:/g')
  # Paths the tests read (built in as this machine's paths otherwise); a carried test_engine (model tests) needs
  # transformers' reference models first, made here as the ctest fixture would.
  export RLAIF_SOURCE_DIR=$PWD RLAIF_BINARY_DIR=$PWD/$BUILD RLAIF_PYTHON=$PY
  if [ -x "$BUILD/tests/test_engine" ]; then  # (not `tar t | grep -q`: its early exit fails the pipe under pipefail)
    $PY tests/reference/make_tiny_models.py --out "$BUILD/reference" --bf16-device cuda > "$OUT/reference_models.log" 2>&1 \
      || log "reference models failed (see reference_models.log)"
    export RLAIF_REF_DIR=$PWD/$BUILD/reference
  fi
  for t in $(tar tJf "$PREBUILT" | grep -E '^(\./)?tests/test_[^/]+$'); do  # the carried ones only
    RLAIF_TEST_DEVICE=cuda "$BUILD/$t" ${filter:+--gtest_filter="$filter"} >> "$OUT/ctest_cuda.log" 2>&1 \
      && log "GPU tests $(basename "$t"): passed" || log "GPU tests $(basename "$t"): FAILED"
  done
  grep -E "^\[(fp32|bf16|engine)" "$OUT/ctest_cuda.log" | sort -u >> "$OUT/summary.txt"
  grep -B2 -A20 "Failure" "$OUT/ctest_cuda.log" | head -60
elif has test; then
  # The reference models also get transformers' bf16 outputs on this GPU. GgufRepack needs python's gguf and the
  # SmolLM2 file, which are not carried (CPU CI runs it); set RLAIF_DEVICE_EXCLUDE to override.
  export RLAIF_REF_BF16_DEVICE=cuda
  RLAIF_TEST_DEVICE=cuda ctest --test-dir "$BUILD" -L "model|kernel|golden" ${RLAIF_DEVICE_TESTS:+-R "$RLAIF_DEVICE_TESTS"} \
    -E "${RLAIF_DEVICE_EXCLUDE:-ChatTemplate|GgufRepack}" \
    --output-on-failure -j 4 \
    > "$OUT/ctest_cuda.log" 2>&1
  log "GPU tests (model|kernel|golden, RLAIF_TEST_DEVICE=cuda): $(grep -E 'tests passed' "$OUT/ctest_cuda.log")"
  grep -E "^\[(fp32|bf16|engine)" -r "$BUILD/Testing/Temporary/LastTest.log" | sort -u >> "$OUT/summary.txt" || true
  grep -A30 "FAILED" "$OUT/ctest_cuda.log" | head -60
fi

if has bench; then
  # Same run, same card: the random-weight models saved by transformers, rlaif on them, then transformers'
  # generate on the same weights (the slowest part last, so a time limit cuts the baseline, not our figures).
  $PY bench/copy_bandwidth.py "$OUT/copy_bandwidth.json" | tee -a "$OUT/summary.txt"
  $PY bench/hf_generate.py --models-dir $MD --out /dev/null --shapes "$RLAIF_BENCH_SHAPES" --save-only \
    > "$OUT/hf_models.log" 2>&1 || log "saving the benchmark models failed (see hf_models.log)"
  for s in ${RLAIF_BENCH_SHAPES//,/ }; do
    "$BUILD/bench/bench_generate" --model "$MD/qwen2.5-$s-random" --batches ${RLAIF_BENCH_BATCHES:-1,2,4,8,16,64} --out "$OUT/rlaif_generate_$s.json" \
      ${RLAIF_BENCH_ROLLOUT:+--rollout} > "$OUT/rlaif_generate_$s.log" 2>&1 || log "bench_generate $s failed"
    sed "s/^/$s /" "$OUT/rlaif_generate_$s.log" | grep "tok/s" | tee -a "$OUT/summary.txt"
    # Beside the default, same run: each variant of RLAIF_BENCH_VARIANTS ("name=bench_generate arguments;..."):
    # programmatic dependent launches, the other GEMV, other few-row row counts, at the few-row batch sizes.
    IFS=';' read -ra variants <<< "${RLAIF_BENCH_VARIANTS:-pdl=--pdl;streaming=--few-row-kernel streaming;session5=--few-row-rows 8,8,8,8}"
    for v in "${variants[@]}"; do
      name=${v%%=*}; args=${v#*=}
      "$BUILD/bench/bench_generate" --model "$MD/qwen2.5-$s-random" --batches ${RLAIF_VARIANT_BATCHES:-1,8} $args \
        --out "$OUT/rlaif_generate_${s}_$name.json" > "$OUT/rlaif_generate_${s}_$name.log" 2>&1 \
        || log "bench_generate $s $name failed"
      sed "s/^/$s /" "$OUT/rlaif_generate_${s}_$name.log" | grep "tok/s" | tee -a "$OUT/summary.txt"
    done
  done
  "$BUILD/bench/bench_kernels" --out "$OUT/bench_kernels.json" > "$OUT/bench_kernels.log" 2>&1 || log "bench_kernels failed"
  grep -v "^few_row" "$OUT/bench_kernels.log" | tail -22
  if [ "${RLAIF_BENCH_HF:-1}" != 0 ]; then  # RLAIF_BENCH_HF=0: no transformers baseline (engine-only A/B runs)
    $PY bench/hf_generate.py --models-dir $MD --out "$OUT/hf_generate.json" --shapes "$RLAIF_BENCH_SHAPES" \
      > "$OUT/hf_generate.log" 2>&1 || log "hf_generate failed (see hf_generate.log)"
    grep -E "tok/s" "$OUT/hf_generate.log" | tee -a "$OUT/summary.txt"
  fi
fi

if has quant; then
  # Issue 5: quantized projections per layer, re-quantization, and the quantized engine's decode on the 3B shape
  # (weights quantized on the device after loading) beside the bf16 engine in the same run.
  "$BUILD/bench/bench_quant" --out "$OUT/bench_quant.json" > "$OUT/bench_quant.log" 2>&1 || log "bench_quant failed"
  tail -20 "$OUT/bench_quant.log" | tee -a "$OUT/summary.txt"
  # The fused layers again with the tensor-core few-row path (kernels::quant_few_row_mma), same run.
  "$BUILD/bench/bench_quant" --quant-mma --out "$OUT/bench_quant_mma.json" > "$OUT/bench_quant_mma.log" 2>&1 \
    || log "bench_quant --quant-mma failed"
  grep -E "^N=(1|2):" "$OUT/bench_quant_mma.log" | sed "s/^/quant-mma /" | tee -a "$OUT/summary.txt"
  save_model 3b
  if [ -f "$MD/qwen2.5-3b-random/config.json" ]; then
    for q in bf16 q4 q8; do  # bf16: the same-run baseline
      args=(); [ $q != bf16 ] && args=(--quantize $q)
      "$BUILD/bench/bench_generate" --model "$MD/qwen2.5-3b-random" "${args[@]}" \
        --out "$OUT/rlaif_generate_3b_$q.json" > "$OUT/rlaif_generate_3b_$q.log" 2>&1 || log "bench_generate 3b $q failed"
      sed "s/^/3b $q /" "$OUT/rlaif_generate_3b_$q.log" | grep "tok/s" | tee -a "$OUT/summary.txt"
    done
    # The q4 engine under each opt-in variant of RLAIF_QUANT_VARIANTS ("name=bench_generate arguments;..."; default:
    # the tensor-core few-row projections) at RLAIF_QUANT_VARIANT_BATCHES, beside the runs above.
    IFS=';' read -ra variants <<< "${RLAIF_QUANT_VARIANTS:-mma=--quant-mma}"
    for v in "${variants[@]}"; do
      name=${v%%=*}; args=${v#*=}
      "$BUILD/bench/bench_generate" --model "$MD/qwen2.5-3b-random" --quantize q4 $args \
        --batches ${RLAIF_QUANT_VARIANT_BATCHES:-1,2} --out "$OUT/rlaif_generate_3b_q4_$name.json" \
        > "$OUT/rlaif_generate_3b_q4_$name.log" 2>&1 || log "bench_generate 3b q4 $name failed"
      sed "s/^/3b q4 $name /" "$OUT/rlaif_generate_3b_q4_$name.log" | grep "tok/s" | tee -a "$OUT/summary.txt"
    done
  fi
fi

if has lora; then
  # Issue 7's rollout decode: rank-16 LoRA on every projection, 512 new tokens (bench_train's generation), beside
  # the same batches without adapters.
  save_model 3b
  for l in 0 16; do
    "$BUILD/bench/bench_generate" --model "$MD/qwen2.5-3b-random" --batches ${RLAIF_LORA_BATCHES:-8,64} --new 512 --lora $l \
      --out "$OUT/rlaif_generate_3b_lora$l.json" > "$OUT/rlaif_generate_3b_lora$l.log" 2>&1 || log "bench_generate 3b lora $l failed"
    sed "s/^/3b new 512 /" "$OUT/rlaif_generate_3b_lora$l.log" | grep "tok/s" | tee -a "$OUT/summary.txt"
  done
  # The same adapters under the engine variants of RLAIF_LORA_VARIANTS ("name=bench_generate arguments;..."), same
  # run: x·Aᵀ by its own shrink launch (the default takes it from the base GEMMs), and the GEMMs' cuBLASLt
  # algorithms timed per shape.
  IFS=';' read -ra variants <<< "${RLAIF_LORA_VARIANTS:-kernel=--lora-shrink-kernel;tuned=--tuned-gemm}"
  for v in "${variants[@]}"; do
    name=${v%%=*}; args=${v#*=}
    "$BUILD/bench/bench_generate" --model "$MD/qwen2.5-3b-random" --batches ${RLAIF_LORA_BATCHES:-8,64} --new 512 --lora 16 \
      $args --out "$OUT/rlaif_generate_3b_lora16_$name.json" > "$OUT/rlaif_generate_3b_lora16_$name.log" 2>&1 \
      || log "bench_generate 3b lora 16 $name failed"
    sed "s/^/3b new 512 /" "$OUT/rlaif_generate_3b_lora16_$name.log" | grep "tok/s" | tee -a "$OUT/summary.txt"
  done
fi

if [[ " $STAGES " == *" profile "* ]]; then
  # Where a decode step's time goes: Nsight Compute's kernel times over a window of decode launches.
  for spec in ${RLAIF_PROFILE-0.5b:64 3b:64 3b:1}; do  # set but empty: no window
    # shape:batch[:launches to skip before the window[:bench_generate arguments, commas for spaces]]
    IFS=: read -r s b skip extra <<< "$spec"
    args="${RLAIF_PROFILE_ARGS:-} ${extra//,/ }"
    tag=${s}_b$b${extra:+_$(echo "$extra" | tr -c 'a-zA-Z0-9\n' '_')}
    save_model $s
    # RLAIF_PROFILE_KERNELS (a regex) profiles only the kernels it names, wherever they fall (e.g. the decode
    # step's kernels without a skip that depends on the prefill's launch count).
    # --profile-from-start off: only bench_generate's timed generate (its cudaProfilerStart/Stop range) counts, so
    # the skip starts at its prefill and set-up launches (adapters, quantization) never fill the window.
    timeout 240 ncu --clock-control none --csv --metrics gpu__time_duration.sum ${RLAIF_PROFILE_KERNELS:+-k "regex:$RLAIF_PROFILE_KERNELS"} \
      --profile-from-start off --launch-skip ${skip:-${RLAIF_PROFILE_SKIP:-2000}} \
      --launch-count ${RLAIF_PROFILE_COUNT:-600} "$BUILD/bench/bench_generate" --model "$MD/qwen2.5-$s-random" \
      --batches $b --new 64 $args > "$OUT/ncu_$tag.csv" 2> "$OUT/ncu_$tag.log" || log "ncu $spec failed"
    log "profile $s batch $b $args (ncu window):"
    $PY bench/ncu_summary.py "$OUT/ncu_$tag.csv" --sequence 8 | head -44 | tee -a "$OUT/summary.txt"
  done
  # Why a kernel is slow: Nsight Compute's sections for one decode launch of each named kernel (RLAIF_PROFILE_DETAIL:
  # shape:batch:kernel-regex[:matching launches to skip[:bench_generate arguments, commas for spaces]] ...).
  for spec in ${RLAIF_PROFILE_DETAIL:-}; do
    IFS=: read -r s b k skip extra <<< "$spec"
    args="${RLAIF_PROFILE_ARGS:-} ${extra//,/ }"
    tag=$(echo "${s}_b${b}_${k}_$extra" | tr -c 'a-zA-Z0-9\n' '_')
    save_model $s
    timeout 120 ncu --section SpeedOfLight --section Occupancy --section LaunchStats --section SchedulerStats \
      --section WarpStateStats --section MemoryWorkloadAnalysis --section SourceCounters -k "regex:$k" \
      --profile-from-start off --launch-skip ${skip:-300} --launch-count 1 \
      "$BUILD/bench/bench_generate" --model "$MD/qwen2.5-$s-random" --batches $b --new 64 $args \
      > "$OUT/ncu_detail_$tag.txt" 2>&1 || log "ncu detail $spec failed"
    log "detail $spec:"; grep -E "Duration|Registers|Achieved Occupancy|Theoretical Occupancy|Memory Throughput|Block Limit|Warp Cycles Per Issued|Grid Size|Stall|One or More|No Eligible|Compute \(SM\)|Waves|Dynamic Shared" \
      "$OUT/ncu_detail_$tag.txt" | head -30 | tee -a "$OUT/summary.txt"
  done
fi

if has train; then
  # Issue 7's end-to-end step, LoRA on the 3B shape, against transformers + peft on the same card. RLAIF_TRAIN_RUNS
  # picks the runs (default all): main, kernel (the LoRA shrink kernels), ckpt (checkpointing, micro-batch 8),
  # hf (transformers + peft), old (the pre-optimisation training path: eager attention, full head, PEFT's LoRA
  # ops, eager norm); variant (only when named: the main configuration plus RLAIF_TRAIN_VARIANT_ARGS, e.g.
  # '--lora-norm-fusion', right after main for a same-machine A/B).
  save_model 3b
  # The card's clocks, power and temperature every 0.5 s while the runs go: the training phase (compute-bound) took
  # 2.6 s on one machine and 3.4-3.7 s on others with the same code, while the memory-bound generation did not move.
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu --format=csv \
    -lms 500 > "$OUT/gpu_clocks_train.csv" 2>/dev/null &
  clocks_pid=$!
  runs=" ${RLAIF_TRAIN_RUNS:-main kernel ckpt hf old} "
  train() {  # train NAME FILE-SUFFIX bench_train-arguments...
    local name=$1 suffix=$2; shift 2
    [[ $runs == *" $name "* ]] || return 0
    "$BUILD/bench/bench_train" --model "$MD/qwen2.5-3b-random" "$@" --out "$OUT/rlaif_train_3b$suffix.json" \
      > "$OUT/rlaif_train_3b$suffix.log" 2>&1 || log "bench_train $name failed"
  }
  train main ""
  train variant _variant ${RLAIF_TRAIN_VARIANT_ARGS:-}  # only when RLAIF_TRAIN_RUNS names it
  train kernel _kernel --lora-shrink-kernel --steps 2
  train ckpt _ckpt --micro-batch 8 --checkpointing --steps 2
  if [[ $runs == *" hf "* ]]; then
    $PY bench/hf_train_step.py --model "$MD/qwen2.5-3b-random" --out "$OUT/hf_train_3b.json" > "$OUT/hf_train_3b.log" \
      2>&1 || log "hf_train_step failed"
  fi
  train old _old --attention eager --full-head --no-fused-lora --eager-norm --steps 2
  kill $clocks_pid 2>/dev/null
  log "SM clock during the train stage (MHz, min/median/max): $(awk -F', ' 'NR > 1 {print $2+0}' "$OUT/gpu_clocks_train.csv" \
    | sort -n | awk '{a[NR]=$1} END {if (NR) print a[1] "/" a[int((NR+1)/2)] "/" a[NR]}')"
  grep -E "^step" "$OUT"/rlaif_train_3b*.log "$OUT"/hf_train_3b.log 2>/dev/null | tee -a "$OUT/summary.txt"
  grep -iE "phase|attention:" "$OUT/rlaif_train_3b.log" 2>/dev/null | head -8 | tee -a "$OUT/summary.txt"
fi
