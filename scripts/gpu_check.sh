#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py) as one command, with what it needs carried in .gpu-check/ (git-ignored).
#
#   bash scripts/gpu_check.sh prepare   # on a CPU machine with network, in the checkout the device call sends:
#                                       # wheels + the stories260K tokenizer + TinyStories' validation text (~2.2 MiB)
#   bash scripts/gpu_check.sh [ARGS]    # on the GPU machine (no network): install the wheels offline into
#                                       # /tmp/gpu-check-site, then gpu_check.py under a total limit of
#                                       # GPU_CHECK_LIMIT seconds (default 300); report into $OUT (the device tool
#                                       # returns it), else docs/results/gpu-run/. ARGS go to gpu_check.py (--only ...).
#
# The GPU machine has torch 2.11 + CUDA 13, transformers 5.17, accelerate, safetensors, pyyaml, peft, typer, rich
# and their dependencies (click, shellingham, markdown-it-py, mdurl, pygments, annotated-doc), but not datasets or
# lm-eval (no row needs them; gpu_check.py makes them unimportable to prove it). spp runs from the checkout
# (PYTHONPATH), so no spp wheel goes stale. The carried wheels are fallbacks at the tested lower bounds
# (docs/install.md), installed only where the machine's version is missing or below spp's floor: typer 0.20.0 and
# rich 14.3.0 (the CLI; typer 0.2x's later releases need pydantic, which the machine lacks) and peft 0.20.0 (the
# train row's reference). Together about 1.3 MiB.
set -uo pipefail
cd "$(dirname "$0")/.."
ASSETS=.gpu-check
WHEELS=(typer==0.20.0 rich==14.3.0 peft==0.20.0)
PY=${PYTHON:-python3}  # the interpreter that has torch (plain python3 on the GPU machine)

if [ "${1:-}" = prepare ]; then
    DATA=${SPP_DATA:-../shared/data}
    rm -rf "$ASSETS" && mkdir -p "$ASSETS/wheels" "$ASSETS/stories260K-hf" || exit 1
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
        -d "$ASSETS/wheels" "${WHEELS[@]}" || exit 1
    cp "$DATA"/stories260K-hf/{tokenizer.json,tokenizer.model,tokenizer_config.json} "$ASSETS/stories260K-hf/" || exit 1
    cp "$DATA/tinystories/tinystories_val.txt" "$ASSETS/" || exit 1
    ls -l "$ASSETS"/wheels && du -sh "$ASSETS"
    exit 0
fi

[ -d "$ASSETS/wheels" ] || { echo "error: no $ASSETS/ here: run 'bash scripts/gpu_check.sh prepare' first" >&2; exit 2; }
SITE=/tmp/gpu-check-site
OUTDIR=${OUT:-docs/results/gpu-run}
mkdir -p "$OUTDIR"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$OUTDIR/gpu_check.log"
# which carried wheels are needed: a package missing here, or older than the wheel (= spp's tested floor)
NEEDED=$("$PY" - "${WHEELS[@]}" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
for spec in sys.argv[1:]:
    name, want = spec.split("==")
    try:
        have = tuple(int(p) for p in version(name).split(".")[:3] if p.isdigit())
    except PackageNotFoundError:
        have = ()
    if have < tuple(int(p) for p in want.split(".")):
        print(name)
PY
)
for name in $NEEDED; do
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$ASSETS"/wheels/"$name"-*.whl || exit 1
done
echo "carried wheels installed: ${NEEDED:-none needed}" | tee -a "$OUTDIR/gpu_check.log"
export PYTHONPATH="$PWD:$SITE" PYTHONUNBUFFERED=1
"$PY" -c "import torch, transformers, accelerate, peft, typer, rich, safetensors, yaml; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'peft', peft.__version__, 'typer', typer.__version__)" 2>&1 | tee -a "$OUTDIR/gpu_check.log"
LIMIT=${GPU_CHECK_LIMIT:-300}
# the script's own budget ends its rows 25 s before the hard limit, so the report is always written
timeout -k 10 "$LIMIT" "$PY" scripts/gpu_check.py --output "$OUTDIR" --budget $((LIMIT - 25)) \
    --assets "$ASSETS" "$@" 2>&1 | tee -a "$OUTDIR/gpu_check.log"
