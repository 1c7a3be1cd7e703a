"""RIA's channel permutation for N:M on stories260K: perplexity with and without it, and what it reaches.

The protocol of `scripts/owl_ria_bar.py` (docs/results/owl_ria.md): calibration 64 windows of 256 tokens at seeded
offsets from the first half of the TinyStories validation text; perplexity on the first 200 windows of 256 tokens of
the second half. Every cell runs through `spp.prune.run_prune` as `spp prune` runs it, the permutation through
`--permute-channels`; every output is checked with `spp.verify`. Per consumer layer (o_proj, down_proj) it records
the N:M kept score Σ S before and after the fold (`spp.prune.permute.kept_score`), and the share of the pruned
weights the permutation can reach.

    OMP_NUM_THREADS=1 python scripts/permute_bar.py --seeds 0,1,2 --json docs/results/ria_permute.json \
        --md docs/results/ria_permute.md
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import DATA, split_halves

# (label, method, pattern, permute)
CELLS = [("wanda 2:4", "wanda", "2:4", False), ("wanda 2:4 + permute", "wanda", "2:4", True),
         ("ria 2:4", "ria", "2:4", False), ("ria 2:4 + permute", "ria", "2:4", True),
]


def recording_kept_scores(log: list[dict]):
    """Wrap `spp.prune.permute_block` (the driver's one call) to log each consumer's kept score before/after."""
    import spp.prune as driver
    from spp.prune.permute import SCORES, kept_score

    original = driver.permute_block

    def wrapped(block, targets, stats, method, n_m):
        before = {name: SCORES[method](t.out_in(), stats[name]) for name, t in targets.items() if name in stats}
        done = original(block, targets, stats, method, n_m)
        for name, t in targets.items():
            if name.endswith(("o_proj", "down_proj")) and name in before:
                after = SCORES[method](t.out_in(), stats[name])
                log.append(dict(layer=t.name, permuted=t.name in done, before=float(kept_score(before[name], *n_m)),
                                after=float(kept_score(after, *n_m))))
        return done

    driver.permute_block = wrapped
    return original


def run(model: str, text: str, seeds: list[int], eval_windows: int = 200, eval_seqlen: int = 256) -> dict:
    import spp.prune as driver
    from spp.config import PruneConfig
    from spp.eval.perplexity import perplexity, tokenize_text
    from spp.models import decoder_targets, load_model, load_tokenizer
    from spp.prune import run_prune
    from spp.verify import verify_checkpoint

    first, second = split_halves(Path(text).read_text(encoding="utf-8"))
    eval_ids = tokenize_text(load_tokenizer(model), second)
    dense = load_model(model, "float32", "cpu").eval()
    with torch.no_grad():
        dense_ppl = perplexity(dense, eval_ids, eval_seqlen, 8, eval_windows).ppl
    sizes = {t.name: t.weight.numel() for block in decoder_targets(dense) for t in block.values()}
    reach = sum(v for k, v in sizes.items() if k.endswith(("o_proj", "down_proj"))) / sum(sizes.values())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "calib_first_half.txt"
        calib.write_text(first, encoding="utf-8")
        for seed in seeds:
            for label, method, pattern, permute in CELLS:
                out = Path(tmp) / "out"
                cfg = PruneConfig(model=model, output=str(out), method=method, pattern=pattern,
                                  permute_channels=permute, calib=str(calib), nsamples=64, seqlen=256, seed=seed,
                                  device="cpu", dtype="float32", overwrite=True)
                log: list[dict] = []
                original = recording_kept_scores(log)
                try:
                    start = time.perf_counter()
                    report = run_prune(cfg)
                    seconds = time.perf_counter() - start
                finally:
                    driver.permute_block = original
                verify_checkpoint(out)  # raises SppError unless every saved weight is N:M and matches its mask
                with torch.no_grad():
                    ppl = perplexity(report.model.eval(), eval_ids, eval_seqlen, 8, eval_windows).ppl
                rows.append(dict(label=label, seed=seed, ppl=ppl, achieved=report.total_sparsity,
                                 prune_seconds=seconds, verify_ok=True, layers=log))
                print(f"seed {seed} {label:22s} ppl {ppl:9.3f} ({seconds:.1f} s)", file=sys.stderr)
    return {"model": model, "text": text, "dense_ppl": dense_ppl, "eval_windows": eval_windows,
            "eval_seqlen": eval_seqlen, "calibration": "64 x 256 tokens of the first half", "seeds": seeds,
            "reach": reach, "threads": torch.get_num_threads(), "rows": rows}


def report(result: dict) -> str:
    lines = ["| cell | PPL TinyStories (mean over seeds) | per seed | spp verify | layers permuted | "
             "kept score Σ S, o_proj + down_proj (after / before) |",
             "|---|---:|---|---|---:|---:|", f"| dense | {result['dense_ppl']:.3f} | – | – | – | – |"]
    by_label: dict[str, list[dict]] = {}
    for row in result["rows"]:
        by_label.setdefault(row["label"], []).append(row)
    for label, rows in by_label.items():
        ppls = [r["ppl"] for r in rows]
        layers = [layer for r in rows for layer in r["layers"]]
        permuted = f"{sum(x['permuted'] for x in layers)} of {len(layers)}" if layers else "–"
        gain = (f"{sum(x['after'] for x in layers) / sum(x['before'] for x in layers):.4f}" if layers else "–")
        lines.append(f"| {label} | {sum(ppls) / len(ppls):.2f} | {', '.join(f'{p:.2f}' for p in ppls)} | "
                     f"{'pass' if all(r['verify_ok'] for r in rows) else 'FAIL'} | {permuted} | {gain} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DATA / "stories260K-hf"))
    parser.add_argument("--text", default=str(DATA / "tinystories" / "tinystories_val.txt"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--md", type=Path)
    args = parser.parse_args()
    result = run(args.model, args.text, [int(s) for s in args.seeds.split(",")])
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    text = ("# RIA's channel permutation for N:M on stories260K\n\n"
            f"Written by `python scripts/permute_bar.py` (torch {torch.__version__}, {result['threads']} thread(s)). "
            f"Model `{result['model']}`; calibration {result['calibration']} of `{result['text']}` (seeds "
            f"{', '.join(map(str, result['seeds']))}); perplexity on the first {result['eval_windows']} windows of "
            f"{result['eval_seqlen']} tokens of the second half, the protocol of owl_ria.md. `+ permute` is "
            "`--permute-channels` (heuristic allocation, then one round of linear sum assignment, folded into "
            "v_proj and gate/up_proj). The kept score is the N:M-kept Σ of the method's scores over o_proj and "
            "down_proj, after the fold over before.\n\n"
            f"The permutation reaches o_proj and down_proj only: {result['reach']:.1%} of the pruned weights.\n\n"
            + report(result))
    print(text)
    if args.md:
        args.md.write_text(text + "\n")


if __name__ == "__main__":
    main()
