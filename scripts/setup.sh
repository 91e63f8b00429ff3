#!/usr/bin/env bash
# Installs what is missing, then builds relattn (library, GoogleTest suite) and installs the Python
# package with the torch already present. Called by scripts/test.sh and scripts/workbench.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_PIN=${RELATTN_TORCH_PIN:-torch==2.14.1}   # the CUDA build on local disk: exercises the CUDA compile

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "relattn setup: no torch installed; installing $TORCH_PIN"
  "$PY" -m pip install "$TORCH_PIN"
fi

need=()
for spec in pytest:pytest expecttest:expecttest tqdm:tqdm matplotlib:matplotlib setuptools:setuptools wheel:wheel; do
  "$PY" -c "import ${spec%%:*}" 2>/dev/null || need+=("${spec##*:}")
done
command -v cmake >/dev/null || need+=(cmake)
command -v ninja >/dev/null || need+=(ninja)
if [ ${#need[@]} -gt 0 ]; then
  echo "relattn setup: installing ${need[*]}"
  "$PY" -m pip install "${need[@]}"
fi

if [ "${RELATTN_BUILD_TESTS:-1}" = 1 ] && ! compgen -G "/usr/lib/*/cmake/GTest/GTestConfig.cmake" >/dev/null \
   && ! compgen -G "/usr/lib/cmake/GTest/GTestConfig.cmake" >/dev/null; then
  echo "relattn setup: installing GoogleTest (libgtest-dev)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libgtest-dev
fi

mkdir -p build
echo "relattn setup: building (log: build/build.log)"
if ! RELATTN_BUILD_TESTS=${RELATTN_BUILD_TESTS:-1} "$PY" -m pip install --no-build-isolation --no-deps -v . \
     > build/build.log 2>&1; then
  tail -n 60 build/build.log
  echo "relattn setup: BUILD FAILED (full log: build/build.log)" >&2
  exit 1
fi
grep -A4 "relattn: building WITHOUT CUDA" build/build.log || true
(cd /tmp && "$PY" -c "
import torch, relattn
print('relattn', relattn.__version__, '| torch', torch.__version__, '| CUDA kernels:',
      'built' if relattn.cuda_kernels_built() else 'NOT BUILT (CPU only)')")
