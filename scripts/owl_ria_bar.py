"""Issue 14's bar on stories260K: Wanda+OWL vs uniform Wanda at 70%, RIA 2:4 vs Wanda 2:4 (perplexity).

Calibration: 64 windows of 256 tokens at seeded offsets from the first half of the TinyStories
validation text (cut as `scripts/study.py` cuts it); perplexity: the first 200 windows of 256
tokens of the second half (`spp.eval.perplexity`, the Wanda/SparseGPT protocol). Every cell goes
through `spp.prune.run_prune` exactly as `spp prune` runs it; OWL uses the published M = 5, λ = 0.08.
Each cell is run for each calibration seed; the output is a JSON record and a Markdown table.

    OMP_NUM_THREADS=1 python scripts/owl_ria_bar.py --seeds 0,1,2 --json docs/results/owl_ria.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

# (label, method, pattern, sparsity, owl): the bar's cells first, then context rows
CELLS = [
    ("wanda 70%", "wanda", "unstructured", 0.7, False),
    ("wanda + OWL 70%", "wanda", "unstructured", 0.7, True),
    ("wanda 2:4", "wanda", "2:4", None, False),
    ("ria 2:4", "ria", "2:4", None, False),
    ("ria 70%", "ria", "unstructured", 0.7, False),
    ("sparsegpt 70%", "sparsegpt", "unstructured", 0.7, False),
    ("sparsegpt + OWL 70%", "sparsegpt", "unstructured", 0.7, True),
    ("magnitude 70%", "magnitude", "unstructured", 0.7, False),
    ("magnitude + OWL 70%", "magnitude", "unstructured", 0.7, True),
    ("wanda 50%", "wanda", "unstructured", 0.5, False),
    ("wanda + OWL 50%", "wanda", "unstructured", 0.5, True),
    ("ria 50%", "ria", "unstructured", 0.5, False),
]


def run(model: str, text: str, seeds: list[int], eval_windows: int = 200, eval_seqlen: int = 256) -> dict:
    from study import split_halves

    from spp.config import PruneConfig
    from spp.eval.perplexity import perplexity, tokenize_text
    from spp.models import load_model, load_tokenizer
    from spp.prune import run_prune

    first, second = split_halves(Path(text).read_text(encoding="utf-8"))
    tokenizer = load_tokenizer(model)
    eval_ids = tokenize_text(tokenizer, second)
    dense = load_model(model, "float32", "cpu").eval()
    with torch.no_grad():
        dense_ppl = perplexity(dense, eval_ids, eval_seqlen, 8, eval_windows).ppl
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "calib_first_half.txt"
        calib.write_text(first, encoding="utf-8")
        for seed in seeds:
            for label, method, pattern, sparsity, owl in CELLS:
                cfg = PruneConfig(model=model, output=str(Path(tmp) / "out"), method=method, pattern=pattern,
                                  sparsity=sparsity, owl=owl, calib=str(calib), nsamples=64, seqlen=256, seed=seed,
                                  device="cpu", dtype="float32", overwrite=True)
                start = time.perf_counter()
                report = run_prune(cfg)
                seconds = time.perf_counter() - start
                manifest = json.loads((Path(tmp) / "out" / "spp_manifest.json").read_text())
                with torch.no_grad():
                    ppl = perplexity(report.model.eval(), eval_ids, eval_seqlen, 8, eval_windows).ppl
                owl_record = manifest["details"].get("owl")
                rows.append(dict(label=label, method=method, pattern=pattern, owl=owl, seed=seed, ppl=ppl,
                                 achieved=report.total_sparsity, requested=cfg.sparsity, prune_seconds=seconds,
                                 blocks=manifest["details"]["blocks"],
                                 outlier_share=owl_record["outlier_share"] if owl_record else None))
                print(f"seed {seed} {label:22s} ppl {ppl:10.3f} achieved {report.total_sparsity:.4f} "
                      f"({seconds:.1f} s)", file=sys.stderr)
    return {"model": model, "text": text, "dense_ppl": dense_ppl, "eval_windows": eval_windows,
            "eval_seqlen": eval_seqlen, "calibration": "64 x 256 tokens of the first half", "seeds": seeds,
            "threads": torch.get_num_threads(), "rows": rows}


def table(result: dict) -> str:
    """Mean (min–max over seeds) perplexity and achieved sparsity per cell."""
    lines = ["| cell | PPL TinyStories (mean over seeds) | per seed | achieved sparsity | prune s (mean) |",
             "|---|---:|---|---:|---:|", f"| dense | {result['dense_ppl']:.3f} | – | 0% | – |"]
    by_label: dict[str, list[dict]] = {}
    for row in result["rows"]:
        by_label.setdefault(row["label"], []).append(row)
    for label, rows in by_label.items():
        ppls = [r["ppl"] for r in rows]
        achieved = sorted({f"{r['achieved']:.4%}" for r in rows})
        lines.append(f"| {label} | {sum(ppls) / len(ppls):.2f} | {', '.join(f'{p:.2f}' for p in ppls)} | "
                     f"{', '.join(achieved)} | {sum(r['prune_seconds'] for r in rows) / len(rows):.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT.parent / "shared/data/stories260K-hf"))
    parser.add_argument("--text", default=str(ROOT.parent / "shared/data/tinystories/tinystories_val.txt"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--json", help="write the records here")
    args = parser.parse_args(argv)
    result = run(args.model, args.text, [int(s) for s in args.seeds.split(",")])
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
