"""Tables, JSON and plots of the prune-then-tune study (`scripts/study.py` calls `write_report`).

Everything here is computed from the cell records the study produced: rows are flattened,
the fraction of the pruning loss recovered is added, seeds are averaged (mean ± sample
standard deviation), and `study.md`, `study.json`, `study_ppl_vs_sparsity.png` and
`study_loss_curves.png` are written into the output directory, each file atomically.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from pathlib import Path

SET_TITLES = {"tinystories": "TinyStories (2nd half)", "wikitext": "WikiText-2"}
RECOVERY_ORDER = ("none", "spp", "lora-merged", "lora-unmerged", "hira")
PATTERN_ORDER = ("0%", "50%", "75%", "2:4")
METHOD_ORDER = ("dense", "magnitude", "wanda", "sparsegpt")
HEADLINE_METHODS = ("wanda", "sparsegpt")
HEADLINE_PATTERNS = ("50%", "2:4")
NUMERIC = ("ppl_tinystories", "ppl_wikitext", "recovered_tinystories", "recovered_wikitext", "sparsity", "trainable",
           "step_s", "train_mem_bytes", "infer_tokens_per_s", "final_loss")


# --------------------------------------------------------------------------- math


def recovered_fraction(ppl_pruned: float, ppl_after: float, ppl_dense: float) -> float | None:
    """Fraction of the pruning loss recovered, in log-perplexity:

        (log PPL_pruned − log PPL_after) / (log PPL_pruned − log PPL_dense)

    1 means back to the dense model, 0 no better than pruned, < 0 worse than pruned.
    None when pruning did not raise the perplexity (nothing to recover).
    """
    lost = math.log(ppl_pruned) - math.log(ppl_dense)
    if lost <= 0:
        return None
    return (math.log(ppl_pruned) - math.log(ppl_after)) / lost


def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    """(mean, sample standard deviation) of the non-None values; sd is None for fewer than 2."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


# --------------------------------------------------------------------------- rows


def flatten(records: dict[str, dict]) -> list[dict]:
    """One flat row per final model of every cell, with the recovered fractions filled in."""
    rows = []
    for record in records.values():
        cell, train = record["cell"], record.get("train")
        for r in record["rows"]:
            rows.append({
                "method": cell["method"], "pattern": cell["pattern"], "seed": cell["seed"],
                "row_groups": cell["row_groups"], "recovery": r["recovery"],
                "ppl_tinystories": r["ppl"]["tinystories"], "ppl_wikitext": r["ppl"]["wikitext"],
                "sparsity": r["sparsity"], "trainable": r["trainable"],
                "dense_adapter_params": r.get("dense_adapter_params", 0),
                "step_s": train["step_s"] if train else None,
                "train_mem_bytes": train["peak_increase_bytes"] if train else None,
                "final_loss": train["losses"][-1] if train else None,
                "infer_s": r["infer_s"], "infer_tokens_per_s": r["infer_tokens_per_s"],
            })
    dense = next((r for r in rows if r["method"] == "dense"), None)
    pruned = {(r["method"], r["pattern"], r["seed"]): r for r in rows if r["recovery"] == "none"}
    for r in rows:
        base = pruned.get((r["method"], r["pattern"], r["seed"]))
        for name in ("tinystories", "wikitext"):
            ok = dense is not None and base is not None and r["method"] != "dense"
            r[f"recovered_{name}"] = (recovered_fraction(base[f"ppl_{name}"], r[f"ppl_{name}"], dense[f"ppl_{name}"])
                                      if ok else None)
    return rows


def _order(row: dict) -> tuple:
    rec = row["recovery"].split("-r")[0] if row["recovery"].startswith("spp-r") else row["recovery"]
    return (METHOD_ORDER.index(row["method"]), PATTERN_ORDER.index(row["pattern"]),
            RECOVERY_ORDER.index(rec) if rec in RECOVERY_ORDER else 99, row.get("row_groups") or 0)


def summarise(rows: list[dict]) -> list[dict]:
    """Average over seeds: one entry per (method, pattern, recovery) with `n` and `<field>_mean/_sd`."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["pattern"], r["recovery"]), []).append(r)
    out = []
    for (method, pattern, recovery), members in groups.items():
        entry = {"method": method, "pattern": pattern, "recovery": recovery, "n": len(members),
                 "seeds": sorted(m["seed"] for m in members), "row_groups": members[0]["row_groups"],
                 "dense_adapter_params": members[0]["dense_adapter_params"]}
        for key in NUMERIC:
            entry[f"{key}_mean"], entry[f"{key}_sd"] = mean_sd([m[key] for m in members])
        out.append(entry)
    return sorted(out, key=_order)


# --------------------------------------------------------------------------- markdown


def ppl_decimals(value: float) -> int:
    """3 decimals below 10, 1 below 1000, else none."""
    return 3 if value < 10 else 1 if value < 1000 else 0


def fmt_ppl(value: float | None, decimals: int | None = None) -> str:
    if value is None:
        return "–"
    return f"{value:.{ppl_decimals(value) if decimals is None else decimals}f}"


def fmt_pm(entry: dict, key: str, fmt=None) -> str:
    """'mean ± sd' (sd with the mean's decimals), or the mean alone for one seed."""
    mean, sd = entry[f"{key}_mean"], entry[f"{key}_sd"]
    if mean is None:
        return "–"
    if fmt is None:
        digits = ppl_decimals(mean)
        return fmt_ppl(mean, digits) + (f" ± {fmt_ppl(sd, digits)}" if sd is not None else "")
    return fmt(mean) + (f" ± {fmt(sd)}" if sd is not None else "")


def fmt_frac(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def fmt_pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def table(header: list[str], lines: list[list[str]], align: str | None = None) -> str:
    align = align or "l" * len(header)
    rule = ["---:" if a == "r" else "---" for a in align]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, rule, *lines])


def _recovery_label(entry: dict) -> str:
    if entry.get("method") == "dense":
        return "– (dense model)"
    labels = {"none": "none (pruned)", "spp": "SPP (merged)", "lora-merged": "LoRA merged",
              "lora-unmerged": "LoRA unmerged (+ dense adapter)", "hira": "HiRA (merged)"}
    return labels.get(entry["recovery"], entry["recovery"].replace("spp-r", "SPP r="))


def headline_table(summary: list[dict]) -> str:
    """Wanda and SparseGPT at 50 % and 2:4: perplexity, recovered fraction and final sparsity, mean ± sd over seeds."""
    lines = []
    for e in summary:
        if e["method"] not in HEADLINE_METHODS or e["pattern"] not in HEADLINE_PATTERNS or e["recovery"].startswith("spp-r"):
            continue
        lines.append([e["method"], e["pattern"], _recovery_label(e), fmt_pm(e, "ppl_tinystories"),
                      fmt_pm(e, "ppl_wikitext"), fmt_pm(e, "recovered_tinystories", fmt_frac),
                      fmt_pm(e, "recovered_wikitext", fmt_frac), fmt_pct(e["sparsity_mean"]), str(e["n"])])
    return table(["method", "pattern", "recovery", "PPL TinyStories", "PPL WikiText-2", "recovered (TS)",
                  "recovered (WT)", "sparsity after merge", "seeds"], lines, "lllrrrrrr")


def full_table(summary: list[dict], show_memory: bool) -> str:
    """Every (method, pattern, recovery) at the default settings, with costs (training memory only where
    it is measured per cell: CUDA's peak counter; see `study_markdown`)."""
    lines = []
    for e in summary:
        if e["recovery"].startswith("spp-r"):
            continue
        mem = e["train_mem_bytes_mean"]
        lines.append([e["method"], e["pattern"], _recovery_label(e), str(e["n"]), fmt_pm(e, "ppl_tinystories"),
                      fmt_pm(e, "ppl_wikitext"), fmt_pm(e, "recovered_tinystories", fmt_frac),
                      fmt_pct(e["sparsity_mean"]), f"{e['trainable_mean']:,.0f}",
                      "–" if e["step_s_mean"] is None else f"{1000 * e['step_s_mean']:.0f}",
                      *(["–" if mem is None else f"{mem / 2**20:.1f}"] if show_memory else []),
                      f"{e['infer_tokens_per_s_mean']:,.0f}"])
    header = ["method", "pattern", "recovery", "seeds", "PPL TS", "PPL WT", "recovered (TS)", "sparsity", "trainable",
              "train step (ms)", *(["train mem (MiB)"] if show_memory else []), "eval tokens/s"]
    return table(header, lines, "lll" + "r" * (len(header) - 3))


def row_group_table(rows: list[dict], default_r: int) -> str:
    """SPP at each row-group setting (seed 0), next to the pruned model."""
    seed0 = [r for r in rows if r["seed"] == 0 and (r["recovery"] == "spp" or r["recovery"].startswith("spp-r"))]
    configs = sorted({(r["method"], r["pattern"]) for r in seed0 if r["recovery"].startswith("spp-r")},
                     key=lambda mp: (METHOD_ORDER.index(mp[0]), PATTERN_ORDER.index(mp[1])))
    lines = []
    for method, pattern in configs:
        members = [r for r in seed0 if (r["method"], r["pattern"]) == (method, pattern)]
        for r in sorted(members, key=lambda r: r["row_groups"] or default_r):
            lines.append([method, pattern, str(r["row_groups"] or default_r), fmt_ppl(r["ppl_tinystories"]),
                          fmt_ppl(r["ppl_wikitext"]), fmt_frac(r["recovered_tinystories"]),
                          fmt_frac(r["recovered_wikitext"]), f"{r['trainable']:,}", f"{1000 * r['step_s']:.0f}",
                          fmt_pct(r["sparsity"])])
    return table(["method", "pattern", "row groups r", "PPL TS", "PPL WT", "recovered (TS)", "recovered (WT)",
                  "trainable", "train step (ms)", "sparsity"], lines, "llrrrrrrrr")


def cost_table(rows: list[dict], show_memory: bool) -> str:
    """Median cost per recovery over all seed-0 default cells, with ratios to LoRA measured in the same run."""
    kinds = [k for k in ("spp", "lora-unmerged", "lora-merged", "hira", "none")
             if any(r["recovery"] == k and r["method"] != "dense" for r in rows)]
    med = {}
    for kind in kinds:
        members = [r for r in rows if r["recovery"] == kind and r["method"] != "dense"]
        members = [r for r in members if r["seed"] == 0] or members  # a partial grid may lack seed 0
        med[kind] = {key: statistics.median([m[key] for m in members]) if all(m[key] is not None for m in members)
                     else None for key in ("trainable", "step_s", "train_mem_bytes", "infer_tokens_per_s")}
    ref = med.get("lora-unmerged")

    def ratio(kind, key):
        if not ref or ref[key] in (None, 0) or med[kind][key] is None:
            return "–"
        return f"{med[kind][key] / ref[key]:.2f}"

    lines = []
    for kind in kinds:
        m = med[kind]
        memory = ["–" if m["train_mem_bytes"] is None else f"{m['train_mem_bytes'] / 2**20:.1f}",
                  ratio(kind, "train_mem_bytes")] if show_memory else []
        lines.append([_recovery_label({"recovery": kind}), f"{m['trainable']:,.0f}",
                      "–" if m["step_s"] is None else f"{1000 * m['step_s']:.0f}", ratio(kind, "step_s"), *memory,
                      f"{m['infer_tokens_per_s']:,.0f}", ratio(kind, "infer_tokens_per_s")])
    header = ["recovery", "trainable", "train step (ms)", "× LoRA", *(["train mem (MiB)", "× LoRA"] if show_memory else []),
              "eval tokens/s", "× LoRA (unmerged)"]
    return table(header, lines, "l" + "r" * (len(header) - 1))


# --------------------------------------------------------------------------- plots


def unmerged_slowdown(rows: list[dict]) -> float | None:
    """Median over LoRA cells of eval time unmerged / merged, both measured in the same worker one after the other."""
    merged = {(r["method"], r["pattern"], r["seed"]): r for r in rows if r["recovery"] == "lora-merged"}
    ratios = [r["infer_s"] / merged[k]["infer_s"] for r in rows if r["recovery"] == "lora-unmerged"
              and (k := (r["method"], r["pattern"], r["seed"])) in merged]
    return statistics.median(ratios) if ratios else None


def plot_ppl_vs_sparsity(summary: list[dict], path: Path) -> None:
    """Perplexity against achieved sparsity per pruning method, before (solid) and after SPP (dashed);
    2:4 as squares; LoRA merged as crosses at the sparsity it ends with."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"magnitude": "tab:red", "wanda": "tab:blue", "sparsegpt": "tab:green"}
    dense = next((e for e in summary if e["method"] == "dense"), None)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, name in zip(axes, ("tinystories", "wikitext")):
        key = f"ppl_{name}_mean"
        if dense:
            ax.plot([0], [dense[key]], "k*", markersize=12, label="dense")
        for method, color in colors.items():
            for recovery, style, label in (("none", "-o", "pruned"), ("spp", "--o", "+ SPP")):
                unstructured = [e for e in summary if e["method"] == method and e["recovery"] == recovery
                                and e["pattern"] in ("50%", "75%")]
                unstructured.sort(key=lambda e: e["sparsity_mean"])
                if unstructured:
                    ax.plot([e["sparsity_mean"] for e in unstructured], [e[key] for e in unstructured], style,
                            color=color, label=f"{method} {label}", mfc="white" if recovery == "none" else color)
                nm = [e for e in summary if e["method"] == method and e["recovery"] == recovery and e["pattern"] == "2:4"]
                for e in nm:
                    ax.plot([e["sparsity_mean"]], [e[key]], "s", color=color, mfc="white" if recovery == "none" else color,
                            markersize=8)
            merged = [e for e in summary if e["method"] == method and e["recovery"] == "lora-merged"]
            if merged:
                ax.plot([e["sparsity_mean"] for e in merged], [e[key] for e in merged], "x", color=color,
                        markersize=8, label=f"{method} LoRA merged")
        ax.set_yscale("log")
        ax.set_xlabel("fraction of zero weights in the decoder linears")
        ax.set_ylabel("perplexity")
        ax.set_title(SET_TITLES[name] + "\ncircles: unstructured, squares: 2:4; open: pruned, filled: + SPP", fontsize=9)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def plot_loss_curves(records: dict[str, dict], path: Path, window: int = 10) -> None:
    """Training loss per step (moving average over `window` steps) of SPP, LoRA and HiRA, seed 0,
    one panel per pruned model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[tuple, dict[str, list[float]]] = {}
    for record in records.values():
        cell = record["cell"]
        if record.get("train") and cell["seed"] == 0 and not cell["row_groups"]:
            curves.setdefault((cell["method"], cell["pattern"]), {})[cell["adapter"]] = record["train"]["losses"]
    panels = sorted(curves, key=lambda mp: (METHOD_ORDER.index(mp[0]), PATTERN_ORDER.index(mp[1])))
    if not panels:
        return
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False, sharex=True)
    colors = {"spp": "tab:blue", "lora": "tab:orange", "hira": "tab:green"}
    for ax, panel in zip(axes.flat, panels):
        for adapter, losses in sorted(curves[panel].items()):
            k = max(1, min(window, len(losses)))
            smooth = [statistics.fmean(losses[max(0, i - k + 1): i + 1]) for i in range(len(losses))]
            ax.plot(range(1, len(losses) + 1), smooth, color=colors.get(adapter), label=adapter)
        ax.set_title(f"{panel[0]} {panel[1]}")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("step")
    for ax in axes[:, 0]:
        ax.set_ylabel(f"train loss ({window}-step mean)")
    axes.flat[0].legend()
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def _save_figure(fig, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


# --------------------------------------------------------------------------- the report


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def environment(settings) -> dict:
    """Where the numbers were measured: libraries, CPU, threads, GPU."""
    import torch

    from spp.io.manifest import library_versions

    env = {"libraries": library_versions(), "platform": platform.platform(), "processor": platform.processor(),
           "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
           "device": settings.device}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def write_report(out: Path, settings, cells: list, records: dict[str, dict], runs: list[dict], span: dict) -> dict:
    """Write `study.md`, `study.json` and the two plots into `out`. Returns the JSON object."""
    from dataclasses import asdict

    out.mkdir(parents=True, exist_ok=True)
    rows = flatten(records)
    summary = summarise(rows)
    mine = [r for r in runs if r.get("settings_sha256") == settings.sha256()]
    report = {"settings": asdict(settings), "settings_sha256": settings.sha256(), "cells": [c.key for c in cells],
              "runs": mine, "span_minutes": span["span_minutes"], "cell_minutes": span["cell_minutes"],
              "missing": span["missing"], "max_concurrent": span["max_concurrent"], "environment": environment(settings),
              "split": span["split"], "summary": summary, "rows": rows, "records": records}
    _write_text(out / "study.json", json.dumps(report, indent=1, default=str))
    plot_ppl_vs_sparsity(summary, out / "study_ppl_vs_sparsity.png")
    plot_loss_curves(records, out / "study_loss_curves.png")
    _write_text(out / "study.md", study_markdown(settings, summary, rows, report))
    return report


def _fmt_ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def _adapter_share(report: dict) -> str:
    """'x%–y%': trainable parameters of the default adapters as a share of the model's parameters."""
    shares = [r["trainable"] / rec["model_params"] for rec in report["records"].values() for r in rec["rows"]
              if r["trainable"] and not rec["cell"]["row_groups"]]
    if not shares:
        return "–"
    low, high = f"{100 * min(shares):.0f}%", f"{100 * max(shares):.0f}%"
    return low if low == high else f"{low}–{high}"


def study_markdown(settings, summary: list[dict], rows: list[dict], report: dict) -> str:
    """The human-readable report: setup, time taken, the tables, the plots, and what it does not show."""
    dense = next((e for e in summary if e["method"] == "dense"), None)
    env, split, runs = report["environment"], report["split"] or {}, report["runs"]
    show_memory = settings.device.startswith("cuda")
    cores = env["cpu_cores"]
    where = f"{env.get('gpu')} (CUDA)" if settings.device.startswith("cuda") else f"{cores} CPU cores"
    loads = [round(r["load_avg_1min_start"], 1) for r in runs if r["cells_computed"]]
    missing = report["missing"]
    done = len(report["cells"]) - len(missing)
    seeded = [e for e in summary if e["n"] > 1]
    parts = [
        "# Prune-then-tune study",
        "",
        f"Generated by `python scripts/study.py` (settings sha256 `{report['settings_sha256'][:12]}`); "
        "every number below comes from that run (`study.json` holds each cell, its loss curve and the settings).",
        "",
        f"**{done} of {len(report['cells'])} cells took {report['span_minutes']:.0f} minutes on {where}** "
        f"(from the first pruning to the last cell written; the cells' own compute times sum to "
        f"{report['cell_minutes']:.0f} minutes, with up to {report['max_concurrent']} cells computing at once; "
        f"1-minute load average when the recorded runs started: {loads or 'not recorded'}; the machine was shared "
        "with other work, so times are upper bounds).",
        "",
        *([f"**Not run: {len(missing)} cells** (the session ended before the grid finished; "
           f"`python scripts/study.py` resumes and adds them): {', '.join(f'`{k}`' for k in missing)}.", ""]
          if missing else []),
        "## Setup",
        "",
        f"- Model: `{settings.model}`. Dense perplexity: TinyStories "
        f"{fmt_ppl(dense['ppl_tinystories_mean']) if dense else '–'}, WikiText-2 "
        f"{fmt_ppl(dense['ppl_wikitext_mean']) if dense else '–'}.",
        f"- Text: `{settings.text}` cut at character {split.get('cut_at_char', '?')} of {split.get('text_chars', '?')} "
        "(the first line break after the middle). The first half calibrates pruning "
        f"({settings.calib_nsamples} windows of {settings.calib_seqlen} tokens at seeded random offsets) and "
        f"is the fine-tuning data ({split.get('train_windows', '?')} windows of {settings.seqlen} tokens).",
        f"- Perplexity: first {settings.eval_windows} windows of {settings.eval_seqlen} tokens of the second half "
        f"and of `{settings.wikitext}` (read in text mode), the Wanda/SparseGPT protocol (`spp.eval.perplexity`); "
        f"tokens available: {split.get('eval_tokens_available', '?')}.",
        f"- Recovery: {settings.steps} AdamW steps of {settings.batch_size} × {settings.seqlen} tokens, learning "
        f"rate {settings.learning_rate:g} (linear warmup {settings.warmup_ratio:g} of the steps, then linear decay), "
        f"gradient clip {settings.max_grad_norm:g}, the same data order and seed for every adapter, every linear "
        f"layer of every decoder block adapted. SPP: {settings.spp_row_groups} row groups, scale "
        f"{settings.lora_alpha:g}/{settings.lora_r}; LoRA: rank {settings.lora_r}, alpha {settings.lora_alpha:g}; "
        f"HiRA: rank {settings.hira_r} (PEFT).",
        "- Seeds: the seed sets the calibration windows, the adapter initialisation and the data order. "
        f"{'Configurations with more than one seed show mean ± sample standard deviation.' if seeded else ''}",
        "- Recovered = (log PPL_pruned − log PPL_after) / (log PPL_pruned − log PPL_dense): 1 is back to dense, "
        "0 no better than pruned.",
        "- Sparsity = exact zeros in the decoder linear weights the final model multiplies by. LoRA unmerged keeps "
        "the sparse base but adds a dense low-rank branch at inference (its trainable weights).",
        "",
        "## Headline: Wanda and SparseGPT at 50% and 2:4",
        "",
        headline_table(summary),
        "",
        "![perplexity vs sparsity](study_ppl_vs_sparsity.png)",
        "",
        "## Every pruning method, pattern and recovery",
        "",
        "Train step is the median step time of the cell's training; eval tokens/s is the speed of the perplexity "
        "passes of the final model. "
        + ("Train mem is the peak CUDA memory added during training." if show_memory else
           "Training memory is not compared here: cells share long-lived worker processes whose allocator keeps "
           "memory from earlier cells, so a cell's resident-set peak says little. `bench.md` compares the adapters' "
           "training memory, each in a fresh process."),
        "",
        full_table(summary, show_memory),
        "",
        "## SPP row groups",
        "",
        row_group_table(rows, settings.spp_row_groups),
        "",
        "## Cost per recovery method (median over the seed-0 cells)",
        "",
        cost_table(rows, show_memory),
        "",
        "Cells ran one after another while the load on the machine changed, so the step times and eval speeds of "
        "different cells are only roughly comparable. One comparison is side by side: each LoRA cell evaluated its model "
        "unmerged and then merged in the same process, and the unmerged model took "
        f"{_fmt_ratio(unmerged_slowdown(rows))} the time of the merged one (median over cells). The merged models of "
        "every method run the same dense CPU kernels, so their sparsity buys no speed here; `bench.md` has what "
        "2:4 kernels measured on a GPU.",
        "",
        "## Training loss",
        "",
        "![training loss curves](study_loss_curves.png)",
        "",
        "## What this does and does not show",
        "",
        "- It shows, on a real (tiny) LLaMA-architecture model, that the SPP merge keeps every pruned zero (the "
        "sparsity after merge equals the pruned model's), that LoRA merged gives that sparsity up, and how much of "
        "the pruning loss each method recovers with the same data, steps and seed.",
        "- It does not show that the same holds for a 7B model: stories260K has 260K parameters, a 512-token "
        f"vocabulary and a 64-wide residual stream, and the adapters here train {_adapter_share(report)} of the "
        "model's parameter count. The fine-tuning text is in the model's own training domain. Perplexity on "
        f"{settings.eval_windows} windows per set is the only quality measure (no zero-shot tasks).",
        "- Fine-tuning also adapts the model to the evaluation text's format: the perplexity protocol reads one "
        "stream of stories separated by blank lines, while the model was trained one story at a time. That is why "
        "a recovered fraction can exceed 1 (better than the dense model), on WikiText-2 too.",
        "- One learning rate serves every adapter (no per-method tuning), so a method that prefers another rate "
        "is at a disadvantage. Times on a shared CPU are noisy: compare speeds with `bench.md`, whose ratios come "
        "from measurements taken side by side.",
        "",
    ]
    return "\n".join(parts)
