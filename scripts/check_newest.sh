#!/usr/bin/env bash
# See the next upstream break before users do: install spp into a throwaway venv with the newest release of
# every dependency (ignoring constraints.txt and pyproject's caps), run the README's four-stage block and a quick
# subset of the suite, and print the versions and pass/fail. Not part of CI, so an upstream release cannot
# block landing; run it before raising the transformers cap or regenerating constraints.txt (docs/install.md).
#   bash scripts/check_newest.sh                 # venv in a temporary folder, removed at the end
#   SPP_NEWEST_VENV=/tmp/newest bash scripts/check_newest.sh   # keep it (then: bash scripts/lock.sh /tmp/newest)
# SPP_TORCH_SPEC picks torch (default: the newest release; on a CPU-only machine name its CPU wheel, e.g.
# torch==2.13.0 here, or a plain install pulls a multi-GB CUDA build).
set -uo pipefail
cd "$(dirname "$0")/.."
venv=${SPP_NEWEST_VENV:-}
if [ -z "$venv" ]; then
  venv=$(mktemp -d)/venv
  trap 'rm -rf "$(dirname "$venv")"' EXIT
fi
log() { printf '%s\n' "$*" >&2; }
python3 -m venv "$venv" && "$venv/bin/pip" install -q --upgrade pip || { log "check_newest: cannot create $venv"; exit 2; }
# every dependency by name only (pyproject's ranges and caps dropped), so pip takes the newest releases
deps=$("$venv/bin/python" - <<'PY'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for spec in project["dependencies"] + project["optional-dependencies"]["test"]:
    name = re.match(r"[A-Za-z0-9._-]+(\[[^\]]*\])?", spec).group(0)
    if not name.startswith("torch"):
        print(name)
PY
)
"$venv/bin/pip" install -q --upgrade "${SPP_TORCH_SPEC:-torch}" && "$venv/bin/pip" install -q --upgrade $deps \
  && "$venv/bin/pip" install -q --no-deps -e . || { log "check_newest: the install failed"; exit 2; }
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# the README's four-stage block (tests/test_readme.py runs each marked block as the README states it), then the
# tests that touch transformers' loading and internals most
"$venv/bin/python" -m pytest -q -p no:cacheprovider -x "tests/test_readme.py::test_readme_block_runs[README.md-0]" \
  tests/test_hf.py tests/test_io.py tests/test_realworld_checkpoints.py tests/test_reader.py tests/test_models.py tests/test_merge.py \
  tests/test_env.py -k "not constraints"
status=$?
echo
"$venv/bin/spp" env
echo
if [ $status -eq 0 ]; then echo "check_newest: PASS on the newest releases above"; else echo "check_newest: FAIL (pytest exit $status)"; fi
exit $status
