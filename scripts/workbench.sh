#!/usr/bin/env bash
# The main job: set-up, then the positional-encoding workbench (arguments go to it; --help lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
RELATTN_BUILD_TESTS=${RELATTN_BUILD_TESTS:-0} bash scripts/setup.sh
cd /tmp && exec "${PYTHON:-python3}" -m relattn.workbench --out "$OLDPWD/workbench_out" "$@"
