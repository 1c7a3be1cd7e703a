#!/usr/bin/env bash
# Issue 25's method comparison (docs/results/pruning_methods.md): stories260K, then SmolLM2-135M from its GGUF file.
# Resumable: rerun it and finished cells are skipped (each cell's record is CELLS/<model>/<cell>@<pattern>.json);
# an interrupted prune resumes. Takes hours on 2 CPU cores; run it in the background:
#   nohup bash scripts/compare_methods.sh [CELLS] > compare.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
CELLS=${1:-runs/compare-methods}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
PY=${PYTHON:-.venv/bin/python}
D=../shared/data
S=$D/stories260K-hf
G=$D/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf
ALL=wanda,sparsegpt,alps,alps/15,alps/30,wanda+dsnot,sparsegpt+dsnot,wanda+dsnot/noguard,alps/paper,alps/50
P=0.7,2:4,0.6,0.5
cmp() { "$PY" scripts/bench_prune.py --compare --calib $D/c4/c4_sample.jsonl --seqlen 512 \
        --ppl wikitext2:$D/wikitext-2-raw/wikitext-test.txt --ppl-seqlen 512 --max-windows 40 "$@"; }
cmp --model $S --cells-dir "$CELLS/stories260K" --nsamples 128 --cells $ALL --patterns $P --report "$CELLS/stories260K.md"
# SmolLM2: the most informative cells first, so a partial run already answers the issue's bars
for cells_patterns in "wanda,sparsegpt,alps,wanda+dsnot 0.7,2:4" "wanda,sparsegpt,alps,wanda+dsnot 0.6,0.5" \
                      "sparsegpt+dsnot,wanda+dsnot/noguard,alps/15,alps/30 $P" "$ALL $P"; do
  set -- $cells_patterns
  cmp --model $G --cells-dir "$CELLS/smollm2" --nsamples 32 --cells "$1" --patterns "$2" --report "$CELLS/smollm2.md"
done
