#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv, installs spp, then runs
#   bash scripts/quickstart.sh demo    # installs spp alone; the whole method on the embedded default (spp demo)
#   bash scripts/quickstart.sh test    # installs spp with its test extras; the test suite
# Torch comes first and pinned, so pip does not pull a multi-GB CUDA build on a CPU
# machine; override with SPP_TORCH_SPEC (e.g. "torch" on a GPU box) and, for the
# CPU wheel elsewhere, PIP_EXTRA_INDEX_URL pointing at PyTorch's CPU index.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-test}
case "$what" in
  test) package=".[test]" ;;  # pytest, hypothesis and what the tests import
  demo) package="." ;;        # the demo needs spp alone
  *) echo "usage: bash scripts/quickstart.sh {demo|test} [args...]" >&2; exit 2 ;;
esac
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q "${SPP_TORCH_SPEC:-torch==2.13.0}"
fi
pins=()
[ "${SPP_CONSTRAINTS:-constraints.txt}" = none ] || pins=(-c "${SPP_CONSTRAINTS:-constraints.txt}")
.venv/bin/pip install -q "${pins[@]}" -e "$package"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
case "$what" in
  test) shift || true; exec .venv/bin/python -m pytest "$@" ;;
  demo) shift || true; exec .venv/bin/spp demo "$@" ;;
esac
