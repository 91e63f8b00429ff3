#!/usr/bin/env bash
# The test command: set-up (scripts/setup.sh), then the C++ tests (ctest), the C++ example built against
# the installed package with find_package(relattn), the Python examples (one exports a model that a C++
# example then runs), and the Python tests (pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RELATTN_BUILD_TESTS=1 bash scripts/setup.sh

echo "== ctest"
ctest --test-dir build/cmake --output-on-failure

echo "== C++ example (find_package(relattn) from the installed package)"
prefix=$(cd /tmp && "$PY" -c "import relattn, torch; print(relattn.cmake_prefix_path + ';' + torch.utils.cmake_prefix_path)")
cmake -S examples/cpp -B build/example -G Ninja -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release > build/example-configure.log
cmake --build build/example
./build/example/train_encoder

echo "== Python example (packed sequences)"
"$PY" examples/python/train_packed.py

echo "== Python example (encoder-decoder, greedy decoding with a KVCache)"
"$PY" examples/python/seq2seq_sort.py

echo "== Deployment example (train and export in Python with torch.export + AOTInductor, run from C++)"
"$PY" examples/python/export_encoder.py --out build/export
./build/example/run_exported build/export/copy_back.pt2 build/export/copy_back_io.pt build/export/copy_back_state.pt \
  build/export/copy_back_state_cpp.pt
"$PY" examples/python/export_encoder.py --out build/export --check-cpp-weights build/export/copy_back_state_cpp.pt

echo "== pytest"
"$PY" -m pytest tests/python -q -p no:cacheprovider "$@"
