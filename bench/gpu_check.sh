#!/usr/bin/env bash
# The GPU check of relattn, in one call of at most ~10 minutes on a GPU machine (written for the lent
# H100: python3 with torch, nvcc, cmake, ninja, pytest, compute-sanitizer; no network):
#
#   1. build the library for this GPU's architecture and install it into python/relattn (CMake + Ninja)
#   2. smoke test: one CUDA forward against the CPU op
#   3. every CUDA test: pytest tests/python -k cuda
#   4. compute-sanitizer memcheck and racecheck (then synccheck, initcheck if time is left) on
#      bench/gpu_sanitize_case.py
#   5. bench/gpu_bench.py: relattn vs SDPA / FlexAttention / eager, forward and forward+backward (with the
#      targets of the backward issue), CSV + markdown + PNG
#
# Every step runs under a time limit cut from one overall budget, keeping a share for the steps after it
# (RELATTN_CHECK_SANITIZER_RESERVE_S=100 and RELATTN_CHECK_BENCH_RESERVE_S=150 seconds), and the script goes on
# after a failing step; a summary of all steps comes last. Everything lands in $OUT (the device tool brings it back; at
# most 8 files) and is copied to bench/results/gpu/:
#   gpu_check.log (all output)  summary.md  build.log  pytest.log  sanitizer.log  bench.csv  bench.md  bench.png
#
#   bash bench/gpu_check.sh                 # OUT defaults to bench/results/gpu/check-<date>
#   RELATTN_CHECK_BUDGET_S=570 PYTHON=python3 bash bench/gpu_check.sh
#   RELATTN_CHECK_STEPS="smoke bench" bash bench/gpu_check.sh   # only these steps (the build always runs);
#                                           # steps: smoke pytest sanitizer bench (default: all), packing
#                                           # (bench/packing_bench.py on the GPU) and decode
#                                           # (bench/decode_bench.py on the GPU), only when named
#   RELATTN_PYTEST_K="cuda and backward" bash bench/gpu_check.sh  # a narrower test selection (default:
#                                           # "cuda and not aoti": the AOTInductor CUDA compile takes a
#                                           # minute; RELATTN_PYTEST_K="cuda and aoti" runs it)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
OUT=${OUT:-$ROOT/bench/results/gpu/check-$(date +%Y%m%d-%H%M%S)}
BUDGET=${RELATTN_CHECK_BUDGET_S:-570}
JOBS=${MAX_JOBS:-$(nproc)}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
T0=$SECONDS
export PYTHONUNBUFFERED=1
# cuBLAS (the table-gradient GEMMs) is deterministic only with a fixed workspace; torch insists on it under
# torch.use_deterministic_algorithms(True), which the determinism tests turn on.
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}

remaining() { echo $((BUDGET - (SECONDS - T0))); }
# Seconds kept for the later steps while a step runs, so that one slow step cannot leave the others no time
# (a step is cut short instead; a second call with RELATTN_CHECK_STEPS=... finishes what was cut): the
# benchmark's share while the sanitizers run, the sanitizers' and the benchmark's while pytest runs.
BENCH_RESERVE=${RELATTN_CHECK_BENCH_RESERVE_S:-150}
SANITIZER_RESERVE=${RELATTN_CHECK_SANITIZER_RESERVE_S:-100}
STEP_RESERVE=0
STEPS=" ${RELATTN_CHECK_STEPS:-smoke pytest sanitizer bench} "
wants() { [[ "$STEPS" == *" $1 "* ]]; }
declare -a STEP_NAMES=() STEP_RESULTS=()
# step NAME MAX_SECONDS CMD...: runs CMD under min(MAX_SECONDS, time left), logs and records its result.
step() {
  local name=$1 max=$2
  shift 2
  local left
  left=$(remaining)
  local avail=$(( left - 10 - STEP_RESERVE ))
  local limit=$(( max < avail ? max : avail ))
  if (( limit < 5 )); then
    echo "=== [$(date +%T)] $name: SKIPPED (no time left)"
    STEP_NAMES+=("$name"); STEP_RESULTS+=("skipped (budget)")
    return 124
  fi
  echo "=== [$(date +%T)] $name (limit ${limit}s)"
  echo "+ $*"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  local took=$((SECONDS - start))
  local verdict="ok"
  (( rc == 124 || rc == 137 )) && verdict="TIMEOUT"
  (( rc != 0 && rc != 124 && rc != 137 )) && verdict="FAILED"
  echo "=== [$(date +%T)] $name: $verdict (rc=$rc, ${took}s)"
  STEP_NAMES+=("$name"); STEP_RESULTS+=("$verdict (rc=$rc, ${took}s)")
  return $rc
}
skip() { echo "=== $1: SKIPPED ($2)"; STEP_NAMES+=("$1"); STEP_RESULTS+=("skipped ($2)"); }

# ---- 0. the machine -----------------------------------------------------------------------------------
# The device copy of the work tree may have no .git: pass RELATTN_COMMIT=$(git rev-parse --short HEAD) then.
COMMIT=${RELATTN_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
[ -z "${RELATTN_COMMIT:-}" ] && ! git diff --quiet HEAD 2>/dev/null && COMMIT="$COMMIT+dirty"
export RELATTN_COMMIT=$COMMIT
echo "relattn gpu_check: commit $COMMIT, budget ${BUDGET}s, out $OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 || true
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
TORCH=$($PY -c "import torch; print(torch.__version__, 'cuda', torch.version.cuda)" 2>&1 | tail -1)
NVCC=$(nvcc --version 2>/dev/null | tail -1)
CAP=$($PY -c "import torch; c=torch.cuda.get_device_capability(); print(f'{c[0]}{c[1]}')" 2>/dev/null || echo 90)
echo "GPU: $GPU | torch: $TORCH | nvcc: $NVCC | compute capability: $CAP"

# ---- 1. build -----------------------------------------------------------------------------------------
# Only this GPU's architecture (halves the compile); -Xptxas -v puts register/spill counts in build.log.
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-${CAP:0:1}.${CAP:1}}"
TORCH_PREFIX=$($PY -c "import torch; print(torch.utils.cmake_prefix_path)")
BUILD_DIR=build/gpu-check
BUILD_CMD="cmake -S . -B $BUILD_DIR -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH='$TORCH_PREFIX' -DRELATTN_PYTHON='$(command -v $PY)' \
 -DRELATTN_CUDA=ON -DRELATTN_CUDA_ARCHITECTURES=$CAP -DCMAKE_CUDA_FLAGS=-Xptxas=-v \
 && cmake --build $BUILD_DIR -j $JOBS && cmake --install $BUILD_DIR --prefix python/relattn"
BUILD_OK=0
step build 300 bash -c "$BUILD_CMD" > "$OUT/build.log" 2>&1 && BUILD_OK=1
tail -n 5 "$OUT/build.log"
grep -E "error|FAILED" "$OUT/build.log" | head -n 20
export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"

# ---- 2. smoke -----------------------------------------------------------------------------------------
if ! wants smoke; then
  skip smoke "not asked for"
elif (( BUILD_OK )); then
  step smoke 120 $PY - <<'EOF'
import torch, relattn
print("relattn", relattn.__version__, "CUDA kernels built:", relattn.cuda_kernels_built())
assert relattn.cuda_kernels_built(), "the library was built without its CUDA kernels"
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(2, 4, 300, 64, generator=g).bfloat16() for _ in range(3))
kw = dict(rel_k=torch.randn(17, 64), rel_v=torch.randn(17, 64), rel_bias=torch.randn(4, 17),
          buckets=relattn.clip_buckets(8), causal=True)
ref, ref_lse = relattn.attention(q, k, v, **kw, return_lse=True)
out, lse = relattn.attention(q.cuda(), k.cuda(), v.cuda(), **{n: (t.cuda() if torch.is_tensor(t) else t)
                                                               for n, t in kw.items()}, return_lse=True)
err = (out.cpu().float() - ref.float()).abs().max().item()
lerr = (lse.cpu() - ref_lse).abs().max().item()
print(f"smoke: bf16 CUDA vs CPU op: max |out diff| {err:.3g}, max |lse diff| {lerr:.3g}")
assert err < 5e-2 and lerr < 1e-2, "CUDA and CPU disagree"
EOF
else
  skip smoke "build failed"
fi

# ---- 3. tests -----------------------------------------------------------------------------------------
if ! wants pytest; then
  skip pytest-cuda "not asked for"
elif (( BUILD_OK )); then
  TIMEOUT_OPT=()
  $PY -c "import pytest_timeout" 2>/dev/null && TIMEOUT_OPT=(--timeout 120)
  # -v: one line per test as it finishes, so that a run cut by its time limit still shows every result so far
  wants bench && STEP_RESERVE=$BENCH_RESERVE
  wants sanitizer && STEP_RESERVE=$((STEP_RESERVE + SANITIZER_RESERVE))
  step pytest-cuda 240 $PY -m pytest tests/python -k "${RELATTN_PYTEST_K:-cuda and not aoti}" -v -rfEs -p no:cacheprovider "${TIMEOUT_OPT[@]}" \
    > "$OUT/pytest.log" 2>&1
  STEP_RESERVE=0
  tail -n 30 "$OUT/pytest.log"
else
  skip pytest-cuda "build failed"
fi

# ---- 4. compute-sanitizer ------------------------------------------------------------------------------
CS=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer \
     /opt/nvidia/*/compute-sanitizer 2>/dev/null | head -1)
if ! wants sanitizer; then
  skip sanitizers "not asked for"
elif (( BUILD_OK )) && [ -n "$CS" ]; then
  : > "$OUT/sanitizer.log"
  for tool in memcheck racecheck synccheck initcheck; do
    max=90
    [ "$tool" = synccheck ] || [ "$tool" = initcheck ] && max=60
    # synccheck/initcheck only with time to spare for the benchmark
    if [ "$tool" = synccheck ] || [ "$tool" = initcheck ]; then (( $(remaining) > 330 )) || { skip "sanitizer-$tool" "time kept for the benchmark"; continue; }; fi
    echo "##### $tool" >> "$OUT/sanitizer.log"
    # No caching allocator: its pooled segments would hide an access past a tensor from memcheck/initcheck.
    wants bench && STEP_RESERVE=$BENCH_RESERVE
    step "sanitizer-$tool" $max env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$CS" --tool "$tool" --error-exitcode 9 \
      --print-limit 30 $PY bench/gpu_sanitize_case.py >> "$OUT/sanitizer.log" 2>&1
    STEP_RESERVE=0
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Error|Hazard|not supported" "$OUT/sanitizer.log" | tail -n 5
  done
elif (( BUILD_OK )); then
  skip sanitizers "compute-sanitizer not found"
else
  skip sanitizers "build failed"
fi

# ---- 5. benchmark --------------------------------------------------------------------------------------
if ! wants bench; then
  skip bench "not asked for"
elif (( BUILD_OK )); then
  left=$(remaining)
  step bench $((left - 25)) $PY bench/gpu_bench.py --out "$OUT" --budget-s $((left - 60))
  mkdir -p bench/results/gpu
  for f in bench.csv bench.md bench.png; do [ -f "$OUT/$f" ] && cp "$OUT/$f" "bench/results/gpu/$f"; done
else
  skip bench "build failed"
fi

# ---- 6. packed sequences (only when asked for: RELATTN_CHECK_STEPS="packing") ----------------------------
if wants packing; then
  if (( BUILD_OK )); then
    step packing 180 $PY bench/packing_bench.py --device cuda --dtype bfloat16 --sequences 384 --max-len 2048 \
      --row 16384 --out "$OUT/packing"
    [ -f "$OUT/packing/packing.md" ] && cat "$OUT/packing/packing.md"
  else
    skip packing "build failed"
  fi
fi

# ---- 7. token-by-token decoding (only when asked for: RELATTN_CHECK_STEPS="decode") ----------------------
if wants decode; then
  if (( BUILD_OK )); then
    step decode 150 $PY bench/decode_bench.py --device cuda --dtype bfloat16 --out "$OUT/decode"
    [ -f "$OUT/decode/decode.md" ] && cat "$OUT/decode/decode.md"
  else
    skip decode "build failed"
  fi
fi

# ---- summary -------------------------------------------------------------------------------------------
{
  echo "# relattn gpu_check"
  echo
  echo "commit \`$COMMIT\` · GPU $GPU · torch $TORCH · $NVCC · $(date -Iseconds) · total $((SECONDS - T0))s"
  echo
  echo "| step | result |"
  echo "|---|---|"
  for i in "${!STEP_NAMES[@]}"; do echo "| ${STEP_NAMES[$i]} | ${STEP_RESULTS[$i]} |"; done
  echo
  echo "## ptxas (relattn kernels): registers, spills"
  echo '```'
  DEMANGLE="cat"
  command -v c++filt > /dev/null && DEMANGLE=c++filt
  grep -A3 -E "Compiling entry function '_ZN7relattn" "$OUT/build.log" 2>/dev/null | grep -E "entry|Used|spill" \
    | sed -E "s/.*entry function '([^']+)'.*/\1/" | paste - - - | $DEMANGLE | cut -c1-400 | head -n 60 || true
  echo '```'
  echo
  echo "## pytest"
  echo '```'
  tail -n 3 "$OUT/pytest.log" 2>/dev/null || echo "(no log)"
  # (the short summary's lines; a run cut by its time limit has only the per-test lines)
  grep -E "^(FAILED|ERROR) | (FAILED|ERROR) +\[" "$OUT/pytest.log" 2>/dev/null | head -n 30
  grep -cE " PASSED +\[" "$OUT/pytest.log" 2>/dev/null | sed 's/^/tests passed (per-test lines): /' 
  echo '```'
  echo
  echo "## compute-sanitizer"
  echo '```'
  grep -E "^##### |ERROR SUMMARY|RACECHECK SUMMARY|gpu_sanitize_case: all|not supported" "$OUT/sanitizer.log" \
    2>/dev/null || echo "(not run)"
  # how far each tool got (the last call it started)
  awk '/^##### /{tool=$2} /gpu_sanitize_case: call /{last[tool]=$3} END{for (t in last) print t ": last call started " last[t]}' \
    "$OUT/sanitizer.log" 2>/dev/null
  echo '```'
  echo
  echo "## benchmark (bench.md)"
  if [ -f "$OUT/bench.md" ]; then
    # The forward+backward targets (their verdicts and ratio table), then relattn's and SDPA-flash's runs.
    sed -n '/^## Targets/,/^## All runs/p' "$OUT/bench.md" | grep -v "^## All runs"
    sed -n '/^## All runs/,/^## Kernel breakdown/p' "$OUT/bench.md" | grep -E "^\|" \
      | awk -F'|' 'NR<=2 || $5 ~ /relattn|sdpa_flash/' | head -n 200
    echo
    sed -n '/^## Kernel breakdown/,$p' "$OUT/bench.md"
  else
    echo "(no results)"
  fi
} > "$OUT/summary.md"
cp "$OUT/summary.md" bench/results/gpu/summary.md 2>/dev/null || true
echo
echo "================================================================================================"
cat "$OUT/summary.md"
