#!/usr/bin/env bash
# The GPU check suite in one command, for a GPU machine without network: install the carried wheels into a
# temporary prefix (nothing is installed into the machine's Python), run every check of gpu_checks.py inside the
# time budget and write one JSON report.
#
#   bash modeling_tests/gpu/run_gpu_checks.sh [--cpu-smoke] [--only CHECK ...]
#
# WHEELS   wheel folder (default modeling_tests/gpu/wheels, filled by fill_wheels.sh on a machine with network)
# REPORT   the JSON report (default $OUT/gpu_report.json, or ./gpu_report.json without $OUT)
# BUDGET   seconds for the checks (default 420: with installs and imports the run stays within 8 minutes)
# PYTHON   the interpreter that has PyTorch (default python3)
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-modeling_tests/gpu/wheels}
REPORT=${REPORT:-${OUT:-.}/gpu_report.json}
PREFIX=$(mktemp -d "${TMPDIR:-/tmp}/aligngpt-gpu-site.XXXXXX") || exit 2
trap 'rm -rf "$PREFIX"' EXIT

shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if ((${#wheels[@]})); then
    echo "[gpu-checks] installing ${#wheels[@]} wheels from $WHEELS into $PREFIX"
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --disable-pip-version-check \
        --target "$PREFIX" "${wheels[@]}" || { echo "[gpu-checks] wheel install failed" >&2; exit 2; }
else
    echo "[gpu-checks] no wheels in $WHEELS: using the packages already installed"
fi
export PYTHONPATH="$PREFIX:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
"$PYTHON" modeling_tests/gpu/gpu_checks.py --out "$REPORT" --budget "${BUDGET:-420}" "$@"
