"""Tables, JSON and plots of the recovery study (`scripts/study.py` calls `write_report`).

Everything here is computed from the cell records the study produced: rows are flattened, the
fraction of the pruning loss recovered is added, seeds are averaged (mean ± sample standard
deviation), the learning rate of each recipe is the one its sweep chose on the validation slice
(`study.sweep`), and `study.md`, `study.json`, `study_ppl_vs_sparsity.png`, `study_lr_sweep.png`
and `study_loss_curves.png` are written into the output directory, each file atomically.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from pathlib import Path

SET_TITLES = {"tinystories": "TinyStories (2nd half)", "wikitext": "WikiText-2"}
KIND_ORDER = ("none", "spp", "masked_lora", "full", "hira", "lora")
RECOVERY_ORDER = ("none", "spp", "masked_lora", "full", "hira", "lora-merged", "lora-unmerged")
SPARSE = ("spp", "masked_lora", "full")
KIND_LABELS = {"none": "none (pruned)", "spp": "SPP", "masked_lora": "masked LoRA", "full": "masked full FT",
               "hira": "HiRA (PEFT)", "lora": "LoRA (PEFT)", "lora-merged": "LoRA (PEFT) merged",
               "lora-unmerged": "LoRA (PEFT) unmerged, + dense branch"}
METHOD_RANK = {"dense": 0, "wanda": 1, "sparsegpt": 2, "magnitude": 3}  # table order
NUMERIC = ("val_nll", "ppl_tinystories", "ppl_wikitext", "recovered_tinystories", "recovered_wikitext", "sparsity",
           "pruned_not_plus_zero", "kept_zero", "trainable", "step_s", "infer_tokens_per_s", "final_loss")


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


def mean_sd(values: list) -> tuple[float | None, float | None]:
    """(mean, sample standard deviation) of the non-None values; sd is None for fewer than 2."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


# --------------------------------------------------------------------------- rows


def flatten(records: dict[str, dict]) -> list[dict]:
    """One flat row per final model of every cell (diverged cells: one row without numbers)."""
    rows = []
    for record in records.values():
        cell, train = record["cell"], record.get("train")
        common = {"method": cell["method"], "pattern": cell["pattern"], "seed": cell["seed"],
                  "adapter": cell["adapter"], "distill": cell.get("distill", ""),
                  "lr": record.get("learning_rate") if cell["adapter"] != "none" else None,
                  "step_s": train["step_s"] if train else None,
                  "final_loss": train["losses"][-1] if train and train["losses"] else None}
        if record.get("diverged"):
            rows.append({**common, "recovery": cell["adapter"] if cell["adapter"] != "lora" else "lora-merged",
                         "diverged": record["diverged"], "trainable": record.get("trainable")})
            continue
        for r in record["rows"]:
            rows.append({**common, "recovery": r["recovery"], "val_nll": r.get("val_nll"),
                         "ppl_tinystories": r["ppl"]["tinystories"], "ppl_wikitext": r["ppl"]["wikitext"],
                         "sparsity": r["sparsity"], "pruned_not_plus_zero": r.get("pruned_not_plus_zero"),
                         "kept_zero": r.get("kept_zero"), "trainable": r["trainable"],
                         "dense_adapter_params": r.get("dense_adapter_params", 0),
                         "infer_s": r["infer_s"], "infer_tokens_per_s": r["infer_tokens_per_s"]})
    dense = next((r for r in rows if r["method"] == "dense"), None)
    pruned = {(r["method"], r["pattern"], r["seed"]): r for r in rows if r["recovery"] == "none"}
    for r in rows:
        base = pruned.get((r["method"], r["pattern"], r["seed"]))
        for name in ("tinystories", "wikitext"):
            ok = (dense is not None and base is not None and r["method"] != "dense"
                  and r.get(f"ppl_{name}") is not None)
            r[f"recovered_{name}"] = (recovered_fraction(base[f"ppl_{name}"], r[f"ppl_{name}"], dense[f"ppl_{name}"])
                                      if ok else None)
    return rows


def _order(entry: dict) -> tuple:
    rec = entry["recovery"]
    return (METHOD_RANK.get(entry["method"], 9), entry["method"], entry["pattern"],
            RECOVERY_ORDER.index(rec) if rec in RECOVERY_ORDER else 99, entry.get("distill", ""), entry.get("lr") or 0)


def summarise(rows: list[dict]) -> list[dict]:
    """Average over seeds: one entry per (method, pattern, recovery, distill, lr) with `n` and `<field>_mean/_sd`."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if not r.get("diverged"):
            groups.setdefault((r["method"], r["pattern"], r["recovery"], r["distill"], r["lr"]), []).append(r)
    out = []
    for (method, pattern, recovery, distill, lr), members in groups.items():
        entry = {"method": method, "pattern": pattern, "recovery": recovery, "adapter": members[0]["adapter"],
                 "distill": distill, "lr": lr, "n": len(members), "seeds": sorted(m["seed"] for m in members)}
        for key in NUMERIC:
            entry[f"{key}_mean"], entry[f"{key}_sd"] = mean_sd([m.get(key) for m in members])
        first = min(members, key=lambda m: m["seed"])
        entry["val_nll_first_seed"] = first.get("val_nll")  # the seed the sweep chose with
        out.append(entry)
    return sorted(out, key=_order)


def chosen_rates(rows: list[dict], sweeps: dict) -> dict[tuple, float]:
    """(method, pattern, adapter, distill) -> the learning rate its sweep chose on the validation NLL.

    Recipes without a sweep (the tiny grid) take their seed-0 rate of lowest validation NLL.
    """
    out = {}
    for key, found in sweeps.items():
        if found.get("best") is not None:
            out[tuple(key.split("/"))] = found["best"]
    for r in rows:
        recipe = (r["method"], r["pattern"], r["adapter"], r["distill"])
        if r["adapter"] == "none" or "/".join(recipe) in sweeps or r.get("diverged") or r["seed"] != min(
                x["seed"] for x in rows if (x["method"], x["pattern"]) == recipe[:2]):
            continue
        if recipe not in out or r["val_nll"] < next(x["val_nll"] for x in rows if not x.get("diverged") and (
                x["method"], x["pattern"], x["adapter"], x["distill"], x["lr"], x["seed"]) == (*recipe, out[recipe], r["seed"])):
            out[recipe] = r["lr"]
    return out


def at_chosen(summary: list[dict], chosen: dict) -> list[dict]:
    """The summary entries of every recipe at its chosen rate (plus the pruned models and the dense model)."""
    keep = []
    for e in summary:
        if e["recovery"] == "none" or e["method"] == "dense":
            keep.append(e)
        elif chosen.get((e["method"], e["pattern"], e["adapter"], e["distill"])) == e["lr"]:
            keep.append(e)
    return keep


def best_recipe(entries: list[dict], recoveries: tuple[str, ...]) -> dict | None:
    """Of the chosen-rate entries whose recovery is in `recoveries`: the lowest validation NLL with the
    sweep's seed (the criterion and the data that chose the rates; the held-out sets never choose)."""
    pool = [e for e in entries if e["recovery"] in recoveries and e["val_nll_first_seed"] is not None]
    return min(pool, key=lambda e: e["val_nll_first_seed"]) if pool else None


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


def fmt_lr(value: float | None) -> str:
    return "–" if value is None else f"{value:g}"


def fmt_count(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}"


def table(header: list[str], lines: list[list[str]], align: str | None = None) -> str:
    align = align or "l" * len(header)
    rule = ["---:" if a == "r" else "---" for a in align]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, rule, *lines])


def label(entry: dict) -> str:
    """'masked LoRA + KD', 'LoRA (PEFT) merged', '– (dense model)'."""
    if entry.get("method") == "dense":
        return "– (dense model)"
    name = KIND_LABELS.get(entry["recovery"], entry["recovery"])
    return name + (" + KD" if entry.get("distill") == "kd" else "")


def _quality_cells(e: dict) -> list[str]:
    return [fmt_pm(e, "ppl_tinystories"), fmt_pm(e, "ppl_wikitext"), fmt_pm(e, "recovered_tinystories", fmt_frac),
            fmt_pm(e, "recovered_wikitext", fmt_frac), fmt_pct(e["sparsity_mean"])]


def answer(entries: list[dict], method: str, pattern: str) -> tuple[str, str]:
    """The headline for one pruned model: a sentence and a table (best sparsity-preserving recipe,
    best `adapter: spp` recipe, best LoRA merged and the same unmerged, next to the pruned model)."""
    mine = [e for e in entries if (e["method"], e["pattern"]) == (method, pattern)]
    pruned = next((e for e in mine if e["recovery"] == "none"), None)
    best_sparse = best_recipe(mine, SPARSE)
    best_spp = best_recipe(mine, ("spp",))
    best_lora = best_recipe(mine, ("lora-merged",))
    unmerged = next((e for e in mine if best_lora and e["recovery"] == "lora-unmerged"
                     and (e["distill"], e["lr"]) == (best_lora["distill"], best_lora["lr"])), None)
    rows = [("pruned, no recovery", pruned), ("best sparsity-preserving recipe", best_sparse),
            ("best `adapter: spp` recipe", best_spp if best_spp is not best_sparse else None),
            ("best PEFT LoRA, merged", best_lora), ("the same LoRA, unmerged", unmerged)]
    lines = [[what, label(e), fmt_lr(e["lr"]), *_quality_cells(e), fmt_count(e["pruned_not_plus_zero_mean"]), str(e["n"])]
             for what, e in rows if e is not None]
    text = table(["", "recipe", "lr", "PPL TinyStories", "PPL WikiText-2", "recovered (TS)", "recovered (WT)",
                  "sparsity after merge", "pruned entries ≠ +0.0", "seeds"], lines, "lllrrrrrrr")
    sentence = ""
    if best_sparse and best_lora and best_sparse["recovered_tinystories_mean"] is not None:
        a, b = best_sparse["recovered_tinystories_mean"], best_lora["recovered_tinystories_mean"]
        verdict = "at least as much as" if a >= b else "less than"
        sentence = (f"**{method} {pattern}: the best sparsity-preserving recipe, {label(best_sparse)} at "
                    f"{fmt_lr(best_sparse['lr'])}, recovers {a:.2f} of the log-perplexity gap in-domain "
                    f"({best_sparse['recovered_wikitext_mean']:.2f} on WikiText-2) and keeps "
                    f"{fmt_pct(best_sparse['sparsity_mean'])} sparsity after merge — {verdict} the best PEFT LoRA, "
                    f"{label(best_lora)} at {fmt_lr(best_lora['lr'])}: {b:.2f} ({best_lora['recovered_wikitext_mean']:.2f} "
                    f"on WikiText-2), {fmt_pct(best_lora['sparsity_mean'])} sparse after its merge.** "
                    f"Means over {best_sparse['n']} and {best_lora['n']} seeds; recipes and rates were chosen on the "
                    "validation slice, never on these held-out sets.")
    return sentence, text


def chosen_table(entries: list[dict]) -> str:
    """Every recipe at its chosen rate: quality, sparsity, kept zeros, trainable parameters."""
    lines = []
    for e in entries:
        lines.append([e["method"], e["pattern"], label(e), fmt_lr(e["lr"]), fmt_pm(e, "val_nll", lambda v: f"{v:.4f}"),
                      *_quality_cells(e), fmt_count(e["pruned_not_plus_zero_mean"]), fmt_count(e["kept_zero_mean"]),
                      fmt_count(e["trainable_mean"]), str(e["n"])])
    return table(["method", "pattern", "recovery", "lr", "val NLL", "PPL TS", "PPL WT", "recovered (TS)",
                  "recovered (WT)", "sparsity", "pruned ≠ +0.0", "kept_zero", "trainable", "seeds"], lines,
                 "llll" + "r" * 10)


def common_rate_table(summary: list[dict], chosen: dict, common: float) -> str:
    """Seed 0 of every recipe at its chosen rate and at the common rate, side by side."""
    seed0 = {}
    for e in summary:
        if e["recovery"] not in ("none", "lora-unmerged") and e["method"] != "dense" and 0 in e["seeds"]:
            seed0[(e["method"], e["pattern"], e["recovery"], e["distill"], e["lr"])] = e
    lines = []
    for (method, pattern, adapter, distill), lr in sorted(chosen.items(), key=lambda kv: (
            METHOD_RANK.get(kv[0][0], 9), kv[0][1], KIND_ORDER.index(kv[0][2]) if kv[0][2] in KIND_ORDER else 9, kv[0][3])):
        recovery = "lora-merged" if adapter == "lora" else adapter
        best, at_common = (seed0.get((method, pattern, recovery, distill, x)) for x in (lr, common))
        name = label({"recovery": recovery, "distill": distill, "method": method})

        def cell(e, key):
            return "–" if e is None or e[f"{key}_mean"] is None else f"{e[f'{key}_mean']:.2f}"
        lines.append([method, pattern, name, fmt_lr(lr), cell(best, "recovered_tinystories"),
                      cell(at_common, "recovered_tinystories"), cell(best, "recovered_wikitext"),
                      cell(at_common, "recovered_wikitext")])
    return table(["method", "pattern", "recovery", "chosen lr", "recovered TS at chosen", f"TS at {common:g}",
                  "recovered WT at chosen", f"WT at {common:g}"], lines, "llllrrrr")


def sweep_table(rows: list[dict], sweeps: dict, chosen: dict, grids: dict[str, tuple]) -> str:
    """Seed 0 of every sweep: validation NLL (the criterion), held-out perplexity and recovery, what was chosen;
    a rate outside the recovery's first grid (`grids`, the study's `LR_GRIDS`) is an extension."""
    lines = []
    seed0 = [r for r in rows if r["adapter"] != "none" and r["recovery"] != "lora-unmerged" and r["seed"] == 0]
    for r in sorted(seed0, key=lambda r: (METHOD_RANK.get(r["method"], 9), r["pattern"], KIND_ORDER.index(r["adapter"])
                                          if r["adapter"] in KIND_ORDER else 9, r["distill"], r["lr"])):
        recipe = (r["method"], r["pattern"], r["adapter"], r["distill"])
        found = sweeps.get("/".join(recipe), {})
        notes = []
        if chosen.get(recipe) == r["lr"]:
            notes.append("**chosen**" + (" (at the grid's edge)" if found.get("edge") else ""))
        if r.get("diverged"):
            notes.append(f"diverged at step {r['diverged']}")
        if found and r["lr"] not in found.get("grid", grids.get(recipe[2], ())):
            notes.append("extension")
        lines.append([r["method"], r["pattern"], label(r), fmt_lr(r["lr"]),
                      "–" if r.get("val_nll") is None else f"{r['val_nll']:.4f}", fmt_ppl(r.get("ppl_tinystories")),
                      fmt_ppl(r.get("ppl_wikitext")), fmt_frac(r.get("recovered_tinystories")),
                      fmt_frac(r.get("recovered_wikitext")), fmt_pct(r.get("sparsity")), "; ".join(notes)])
    return table(["method", "pattern", "recovery", "lr", "val NLL", "PPL TS", "PPL WT", "recovered (TS)",
                  "recovered (WT)", "sparsity", ""], lines, "llllrrrrrrl")


def cost_table(rows: list[dict]) -> str:
    """Median step time per recovery and objective over the seed-0 cells (no ratios: cells ran under
    different machine loads, see `study_markdown`)."""
    kinds = sorted({(r["adapter"], r["distill"]) for r in rows if r["adapter"] != "none" and r.get("step_s")},
                   key=lambda k: (KIND_ORDER.index(k[0]) if k[0] in KIND_ORDER else 9, k[1]))
    med = {}
    for kind in kinds:
        members = [r for r in rows if (r["adapter"], r["distill"]) == kind and r.get("step_s")]
        members = [r for r in members if r["seed"] == 0] or members
        med[kind] = {"step_s": statistics.median(r["step_s"] for r in members),
                     "trainable": statistics.median(r["trainable"] for r in members if r.get("trainable") is not None),
                     "cells": len({(r["method"], r["pattern"], r["lr"], r["seed"]) for r in members})}
    lines = [[label({"recovery": k[0], "distill": k[1], "method": ""}), f"{m['trainable']:,.0f}",
              f"{1000 * m['step_s']:.0f}", str(m["cells"])] for k, m in med.items()]
    return table(["recovery", "trainable", "train step (ms, median)", "cells"], lines, "lrrr")


# --------------------------------------------------------------------------- plots


COLORS = {"spp": "tab:blue", "masked_lora": "tab:purple", "full": "tab:green", "hira": "tab:olive",
          "lora": "tab:orange", "lora-merged": "tab:orange", "lora-unmerged": "tab:red", "none": "black"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ppl_vs_sparsity(entries: list[dict], path: Path) -> None:
    """Perplexity against the sparsity the final model multiplies by, every recipe at its chosen rate
    (seed means): filled = cross-entropy, open = + KD; the pruned models as black squares, dense as a star."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for ax, name in zip(axes, ("tinystories", "wikitext")):
        key = f"ppl_{name}_mean"
        for e in entries:
            if e[key] is None:
                continue
            if e["method"] == "dense":
                ax.plot([e["sparsity_mean"]], [e[key]], "k*", markersize=13, label="dense")
            elif e["recovery"] == "none":
                ax.plot([e["sparsity_mean"]], [e[key]], "ks", markersize=8, mfc="white",
                        label=f"{e['method']} {e['pattern']} pruned")
            else:
                color = COLORS.get(e["recovery"], "gray")
                ax.plot([e["sparsity_mean"]], [e[key]], "o", color=color, markersize=8,
                        mfc="white" if e["distill"] else color, label=f"{label(e)} ({fmt_lr(e['lr'])})")
        ax.set_yscale("log")
        ax.set_xlabel("fraction of zero weights in the decoder linears after merge")
        ax.set_ylabel("perplexity")
        ax.set_title(SET_TITLES[name] + "\neach recipe at its chosen learning rate; open markers: + KD", fontsize=9)
        ax.grid(alpha=0.3)
    handles, labels = axes[1].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    axes[1].legend(unique.values(), unique.keys(), fontsize=6.5, ncol=2)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def plot_lr_sweep(rows: list[dict], chosen: dict, path: Path) -> None:
    """Validation NLL (the criterion) and recovered fraction in-domain against the learning rate, seed 0:
    solid = cross-entropy, dashed = + KD; the chosen rate circled."""
    plt = _pyplot()
    seed0 = [r for r in rows if r["adapter"] != "none" and r["recovery"] != "lora-unmerged" and r["seed"] == 0
             and not r.get("diverged")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for recipe in sorted({(r["method"], r["pattern"], r["adapter"], r["distill"]) for r in seed0}):
        pts = sorted((r for r in seed0 if (r["method"], r["pattern"], r["adapter"], r["distill"]) == recipe),
                     key=lambda r: r["lr"])
        style = "--" if recipe[3] else "-"
        color = COLORS.get(recipe[2], "gray")
        name = label({"recovery": recipe[2], "distill": recipe[3], "method": ""})
        for ax, key in zip(axes, ("val_nll", "recovered_tinystories")):
            if any(p.get(key) is None for p in pts):
                continue
            ax.plot([p["lr"] for p in pts], [p[key] for p in pts], style + "o", color=color, markersize=4, label=name)
            best = [p for p in pts if chosen.get(recipe) == p["lr"]]
            ax.plot([p["lr"] for p in best], [p[key] for p in best], "o", color=color, mfc="none", markersize=11)
    vals = [r["val_nll"] for r in seed0 if r.get("val_nll") is not None]
    recs = [r["recovered_tinystories"] for r in seed0 if r.get("recovered_tinystories") is not None]
    if vals and recs:  # a diverging rate would flatten every other curve: clip the axes, the table has it all
        axes[0].set_ylim(min(vals) - 0.03, min(max(vals), min(vals) + 0.8) + 0.03)
        axes[1].set_ylim(max(min(recs), max(recs) - 0.4) - 0.02, max(recs) + 0.02)
    for ax, title in zip(axes, ("validation NLL (chooses the rate; circled)", "recovered fraction, TinyStories 2nd half")):
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate")
        ax.set_title(title + "\nsolid: cross-entropy, dashed: + KD (seed 0; points off the scale are in the table)",
                     fontsize=9)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def plot_loss_curves(records: dict[str, dict], chosen: dict, path: Path, window: int = 10) -> None:
    """Training cross-entropy per step (moving average over `window` steps) of every recipe at its
    chosen rate, seed 0, one panel per pruned model; dashed = trained with KD."""
    plt = _pyplot()
    curves: dict[tuple, dict] = {}
    for record in records.values():
        cell = record["cell"]
        recipe = (cell["method"], cell["pattern"], cell["adapter"], cell.get("distill", ""))
        if record.get("train") and cell["seed"] == 0 and chosen.get(recipe) == record["learning_rate"]:
            curves.setdefault(recipe[:2], {})[recipe[2:]] = record["train"]["losses"]
    panels = sorted(curves)
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.8), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        for (adapter, distill), losses in sorted(curves[panel].items()):
            k = max(1, min(window, len(losses)))
            smooth = [statistics.fmean(losses[max(0, i - k + 1): i + 1]) for i in range(len(losses))]
            ax.plot(range(1, len(losses) + 1), smooth, "--" if distill else "-", color=COLORS.get(adapter),
                    label=label({"recovery": adapter, "distill": distill, "method": ""}))
        ax.set_title(f"{panel[0]} {panel[1]}: each recipe at its chosen rate", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel(f"train cross-entropy ({window}-step mean)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
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


def write_report(out: Path, settings, cells: list, records: dict[str, dict], runs: list[dict], span: dict,
                 sweeps: dict | None = None, notes: list[str] | None = None, *, grids: dict[str, tuple],
                 common_rate: float) -> dict:
    """Write `study.md`, `study.json` and the three plots into `out`. Returns the JSON object.

    `grids` (recovery -> its first learning-rate grid) and `common_rate` are the study's `LR_GRIDS` and
    `COMMON_RATE`, which the text and the sweep table name."""
    from dataclasses import asdict

    sweeps = sweeps or {}
    out.mkdir(parents=True, exist_ok=True)
    rows = flatten(records)
    summary = summarise(rows)
    chosen = chosen_rates(rows, sweeps)
    entries = at_chosen(summary, chosen)
    mine = [r for r in runs if r.get("settings_sha256") == settings.sha256()]
    report = {"settings": asdict(settings), "settings_sha256": settings.sha256(), "cells": [c.key for c in cells],
              "runs": mine, "span_minutes": span["span_minutes"], "cell_minutes": span["cell_minutes"],
              "missing": span["missing"], "max_concurrent": span["max_concurrent"], "environment": environment(settings),
              "split": span["split"], "sweeps": sweeps, "notes": list(notes or []),
              "chosen_rates": {"/".join(k): v for k, v in chosen.items()}, "summary": summary, "rows": rows,
              "records": records}
    _write_text(out / "study.json", json.dumps(report, indent=1, default=str))
    plot_ppl_vs_sparsity(entries, out / "study_ppl_vs_sparsity.png")
    plot_lr_sweep(rows, chosen, out / "study_lr_sweep.png")
    plot_loss_curves(records, chosen, out / "study_loss_curves.png")
    _write_text(out / "study.md", study_markdown(settings, summary, rows, entries, chosen, report, grids, common_rate))
    return report


def _adapter_share(report: dict) -> str:
    """'x%–y%': trainable parameters of the adapters as a share of the model's parameters."""
    shares = [r["trainable"] / rec["model_params"] for rec in report["records"].values() for r in rec["rows"]
              if r["trainable"]]
    if not shares:
        return "–"
    low, high = f"{100 * min(shares):.0f}%", f"{100 * max(shares):.0f}%"
    return low if low == high else f"{low}–{high}"


def _grids_line(sweeps: dict, grids: dict[str, tuple]) -> str:
    parts = []
    for adapter, grid in grids.items():
        ran = sorted({lr for key, s in sweeps.items() if key.split("/")[2] == adapter for lr in s["rates"]})
        extra = sorted(set(ran) - set(grid))
        parts.append(f"{KIND_LABELS[adapter]} {{{', '.join(f'{x:g}' for x in grid)}}}"
                     + (f" + extended to {', '.join(f'{x:g}' for x in extra)}" if extra else ""))
    return "; ".join(parts)


def study_markdown(settings, summary: list[dict], rows: list[dict], entries: list[dict], chosen: dict,
                   report: dict, grids: dict[str, tuple], common_rate: float) -> str:
    """The human-readable report: the answer, setup, time taken, the tables, the plots, and what it does not show."""
    dense = next((e for e in summary if e["method"] == "dense"), None)
    env, split, runs = report["environment"], report["split"] or {}, report["runs"]
    cores = env["cpu_cores"]
    where = f"{env.get('gpu')} (CUDA)" if settings.device.startswith("cuda") else f"{cores} CPU cores"
    loads = [round(r["load_avg_1min_start"], 1) for r in runs if r["cells_computed"]]
    missing = report["missing"]
    done = len(report["cells"]) - len(missing)
    order = [tuple(k.split("-s")[0].split("-")) for k in report["cells"]]  # run order: the first --pairs first
    pairs = sorted({(e["method"], e["pattern"]) for e in entries if e["method"] != "dense"},
                   key=lambda mp: next((i for i, (m, p) in enumerate(order) if m == mp[0]
                                        and p == mp[1].replace(":", "of").replace("%", "pct")), len(order)))
    several = len(pairs) > 1

    def named(e: dict) -> str:
        return (f"{e['method']} {e['pattern']} " if several else "") + label(e)
    answers = [answer(entries, m, p) for m, p in pairs]
    diverged = [r for r in rows if r.get("diverged")]
    kd = [e for e in entries if e["distill"] == "kd" and e["recovery"] != "lora-unmerged"]
    kd_deltas = []
    for e in kd:
        plain = next((x for x in entries if (x["method"], x["pattern"], x["recovery"], x["distill"]) ==
                      (e["method"], e["pattern"], e["recovery"], "")), None)
        if plain and plain["recovered_tinystories_mean"] is not None and e["recovered_tinystories_mean"] is not None:
            kd_deltas.append((named(plain), e["recovered_tinystories_mean"] - plain["recovered_tinystories_mean"],
                              e["recovered_wikitext_mean"] - plain["recovered_wikitext_mean"]))
    libs = env["libraries"]
    wt_trade = []  # (recipe, WT recovered at the chosen rate, at the common rate), seed 0, where the common rate did better
    for (method, pattern, adapter, distill), lr in chosen.items():
        recovery = "lora-merged" if adapter == "lora" else adapter
        pick = {r["lr"]: r for r in rows if (r["method"], r["pattern"], r["recovery"], r["distill"], r["seed"]) ==
                (method, pattern, recovery, distill, 0) and not r.get("diverged")}
        at, common = pick.get(lr), pick.get(common_rate)
        if at and common and lr != common_rate and at["recovered_wikitext"] is not None and (
                common["recovered_wikitext"] - at["recovered_wikitext"] > 0.1):
            wt_trade.append((named({"recovery": recovery, "distill": distill, "method": method, "pattern": pattern}),
                             at["recovered_wikitext"], common["recovered_wikitext"]))
    parts = [
        "# Recovery study: which fine-tuning wins back what pruning lost, and which keeps the sparsity",
        "",
        f"Generated by `python scripts/study.py` (settings sha256 `{report['settings_sha256'][:12]}`); "
        "every number below comes from that run (`study.json` holds each cell, its loss curve, the sweeps and the "
        "settings). The earlier study (every pruning method and pattern, every adapter at one rate of 4e-3) is in "
        "git history (commit 7a71e1a).",
        "",
        f"**{done} of {len(report['cells'])} cells took {report['span_minutes']:.0f} minutes on {where}** "
        f"(from the first pruning to the last cell written; the cells' own compute times sum to "
        f"{report['cell_minutes']:.0f} minutes, with up to {report['max_concurrent']} cells computing at once, "
        f"1 torch thread each; 1-minute load average when each round started: {loads or 'not recorded'}; the "
        "machine was shared with other work, so times are upper bounds). Libraries: "
        + ", ".join(f"{k} {v}" for k, v in libs.items()) + ".",
        "",
        *([f"**Not run: {len(missing)} cells** (the session ended before the grid finished; "
           f"`python scripts/study.py` resumes and adds them): {', '.join(f'`{k}`' for k in missing)}.", ""]
          if missing else []),
        "## The answer",
        "",
    ]
    for sentence, text in answers:
        parts += [sentence, "", text, ""]
    parts += [
        "Recovered = (log PPL_pruned − log PPL_after) / (log PPL_pruned − log PPL_dense), per seed, then averaged: 1 is "
        "back to dense, 0 no better than pruned. \"Pruned entries ≠ +0.0\" counts the entries the mask marks pruned "
        "that are not bitwise +0.0 in the weights the final model multiplies by (0 means every zero kept); "
        "LoRA unmerged keeps the sparse base but adds a dense rank-r branch at inference.",
        "",
        "![perplexity vs sparsity after merge](study_ppl_vs_sparsity.png)",
        "",
        "## Setup",
        "",
        f"- Model: `{settings.model}`. Dense perplexity: TinyStories "
        f"{fmt_ppl(dense['ppl_tinystories_mean']) if dense else '–'}, WikiText-2 "
        f"{fmt_ppl(dense['ppl_wikitext_mean']) if dense else '–'}.",
        f"- Text: `{settings.text}` cut at character {split.get('cut_at_char', '?')} of {split.get('text_chars', '?')} "
        "(the first line break after the middle). The first half calibrates pruning "
        f"({settings.calib_nsamples} windows of {settings.calib_seqlen} tokens at seeded random offsets) and is the "
        f"fine-tuning data: {split.get('train_windows', '?')} windows of {settings.seqlen} tokens for training, "
        f"the last {split.get('val_windows', '?')} windows held out as the **validation slice** that chooses "
        "every learning rate and the best recipe.",
        f"- Perplexity (reported, never used for a choice): first {settings.eval_windows} windows of "
        f"{settings.eval_seqlen} tokens of the second half and of `{settings.wikitext}` (read in text mode), the "
        f"Wanda/SparseGPT protocol (`spp.eval.perplexity`); tokens available: {split.get('eval_tokens_available', '?')}.",
        f"- Training: {settings.steps} AdamW steps (no weight decay) of {settings.batch_size} × {settings.seqlen} "
        f"tokens, linear warmup over {settings.warmup_ratio:g} of the steps then linear decay to 0, gradient clip "
        f"{settings.max_grad_norm:g}, the same data order and seed for every recovery, every linear layer of every "
        "decoder block adapted.",
        f"- Recoveries: SPP ({settings.spp_row_groups} row groups, scale {settings.lora_alpha:g}/{settings.lora_r}); "
        f"masked LoRA W + M ⊙ (s·B·A) (rank {settings.lora_r}, s = {settings.lora_alpha:g}/{settings.lora_r}, M the "
        "keep-mask); masked full fine-tuning (the kept weights, gradient masked); all three through "
        "`spp.adapter.model.add_adapter` / `merge_adapter`, as `spp train --set adapter=KIND` runs them. PEFT LoRA "
        f"(rank {settings.lora_r}, alpha {settings.lora_alpha:g}, merged with `merge_and_unload`) and PEFT HiRA "
        f"(rank {settings.hira_r}, W + W ⊙ (B·A), which keeps W's zeros).",
        f"- Distillation (\"+ KD\"): loss = {settings.ce_weight:g} · cross-entropy + {settings.kd_weight:g} · "
        f"T²·KL(dense teacher ‖ student) per target token at T = {settings.kd_temperature:g} "
        "(`spp.train.losses.kd_kl_sum`), the teacher being the dense model before pruning. Weight 1 puts the two "
        "terms on the same per-token scale (both are nats per token). SquareHead was not run here.",
        f"- Learning rates: every recovery × objective is swept with seed 0 over its grid ({_grids_line(report['sweeps'], grids)}); "
        "rates are rungs of one ladder about ×2 apart; when the lowest validation NLL is at an edge of the grid the "
        "next rung is added (at most twice per edge). The rate with the lowest validation NLL is chosen. "
        "The headline candidates (SPP, masked LoRA, masked full FT and PEFT LoRA with cross-entropy, and a + KD "
        "recipe where it beat its cross-entropy twin on validation) then run seeds 1 and 2 at their chosen rate; "
        "every other cell has seed 0 only (to fit the shared CPU). The best recipe of a family is the one with the "
        "lowest seed-0 validation NLL at its chosen rate. The + KD sweeps start at the cross-entropy choice and its "
        f"two neighbours. The common rate {common_rate:g} (the SPP paper's, and the earlier study's) is in every "
        "cross-entropy grid.",
        "- Seeds: the seed sets the calibration windows, the adapter initialisation and the data order. "
        "Mean ± sample standard deviation over the seeds where there are several.",
        "",
        "## Every recovery at its chosen rate",
        "",
        chosen_table([e for e in entries if e["method"] != "dense" or True]),
        "",
        f"## Chosen rate vs the common rate {common_rate:g} (seed 0)",
        "",
        common_rate_table(summary, chosen, common_rate),
        "",
        "## The learning-rate sweeps (seed 0)",
        "",
        "![learning-rate sweeps](study_lr_sweep.png)",
        "",
        sweep_table(rows, report["sweeps"], chosen, grids),
        "",
        *([f"Diverged (non-finite loss; training stopped, no model to measure): "
           + ", ".join(f"{label(r)} at {fmt_lr(r['lr'])}" for r in diverged) + ".", ""] if diverged else []),
        "## Cost per recovery (median over the seed-0 cells)",
        "",
        cost_table(rows),
        "",
        "Cells ran two at a time on a machine shared with other work whose load changed several-fold during the "
        f"run (1-minute load {min(loads) if loads else '?'}–{max(loads) if loads else '?'} at the starts of the "
        "rounds; the + KD cells ran last, at the lowest load), so these step times do not compare recoveries: "
        "`bench.md` has side-by-side timings and memory. Distillation adds the dense teacher's forward pass to every step.",
        "",
        "## Training loss",
        "",
        "![training loss curves](study_loss_curves.png)",
        "",
        "## What this does and does not show",
        "",
        "- It shows, on a real (tiny) LLaMA-architecture model and one pruned model per row, how much of the pruning "
        "loss each recovery wins back when each gets its own learning rate, chosen without looking at the reported "
        "sets, and that spp's three recoveries and HiRA keep every pruned zero through the merge while LoRA's merge "
        "makes the weights dense.",
        *([("- Distillation from the dense model (logit KL, weight 1, T = 1), each recipe at its own chosen rate, "
            "changed the recovered fraction by "
            + ", ".join(f"{n} {100 * a:+.0f} points in-domain ({100 * b:+.0f} on WikiText-2)" for n, a, b in kd_deltas)
            + ". The fine-tuning text is the model's own training domain, where cross-entropy is already a good "
            "target; the published sparse models that gain most from distillation (SquareHead, Kurtic et al. 2023) "
            "are billions of parameters trained on far more tokens. SquareHead was not measured here.")]
          if kd_deltas else []),
        *([("- The rates are chosen for in-domain validation loss, and a higher rate that wins in-domain can lose "
            "out of domain: recovered on WikiText-2 (seed 0) at the chosen rate vs at "
            f"{common_rate:g}: " + ", ".join(f"{n} {a:.2f} vs {b:.2f}" for n, a, b in wt_trade)
            + ". A user who cares about general text more than the fine-tuning domain should choose on such text.")]
          if wt_trade else []),
        "- It does not show that the same holds for a 7B model: stories260K has 260K parameters, a 512-token "
        f"vocabulary and a 64-wide residual stream, and the adapters here train {_adapter_share(report)} of the "
        "model's parameter count (masked full fine-tuning trains every kept weight). Perplexity is the only quality "
        "measure (no zero-shot tasks), and only the pruned models above are measured.",
        "- Fine-tuning also adapts the model to the evaluation text's format: the perplexity protocol reads one "
        "stream of stories separated by blank lines, while the model was trained one story at a time. That is why "
        "a recovered fraction can exceed 1 (better than the dense model), on WikiText-2 especially.",
        "- The rates are chosen with one seed on a 16k-token validation slice; the held-out numbers of the other "
        "seeds at the same rate show how much that choice moves.",
        *[f"- {note}" for note in report.get("notes", [])],
        "",
    ]
    return "\n".join(parts)
