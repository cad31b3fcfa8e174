#!/usr/bin/env bash
# Set up a benchmark environment (.venv-bench: CPU torch, this pack, scikit-learn, matplotlib, pillow and
# PyPI k-diffusion's sampling module) and run the benchmark; writes benchmarks/BENCHMARKS.md and PNGs.
# Arguments go to benchmarks/run.py (e.g. --quick); `run.sh demo` runs benchmarks/demo.py instead. Never part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv-bench/bin/python ]; then
  "$PY" -m venv .venv-bench
fi
.venv-bench/bin/pip install -q "$TORCH_SPEC"
.venv-bench/bin/pip install -q -e ".[test,bench]"
.venv-bench/bin/pip install -q --no-deps k-diffusion==0.1.1.post1
if [ "${1:-}" = "demo" ]; then
  shift
  exec .venv-bench/bin/python benchmarks/demo.py "$@"
fi
exec .venv-bench/bin/python benchmarks/run.py "$@"
