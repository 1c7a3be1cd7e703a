"""Tables, JSON and plots of the recovery study (`scripts/study.py` calls `write_report`); a module, not a script.

Everything here is computed from the cell records the study produced: rows are flattened, the
fraction of the pruning loss recovered is added, seeds are averaged (mean ± sample standard
deviation), the learning rate of each recipe is the one its sweep chose on the validation slice
(`study.sweep`), and `study.md`, `study.json`, `study_ppl_vs_sparsity.png`, `study_lr_sweep.png`
and `study_loss_curves.png` are written into the output directory, each file atomically.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
from dataclasses import asdict
from pathlib import Path

from spp.io.text import markdown_table
from spp.report import gap_recovered  # (log PPL_pruned − log PPL_after) / (log PPL_pruned − log PPL_dense)

SET_TITLES = {"tinystories": "TinyStories (2nd half)", "wikitext": "WikiText-2"}
KIND_ORDER = ("none", "spp", "masked_lora", "full", "hira", "lora")
RECOVERY_ORDER = ("none", "spp", "masked_lora", "full", "hira", "lora-merged", "lora-unmerged")
SPARSE = ("spp", "masked_lora", "full")
KIND_LABELS = {"none": "none (pruned)", "spp": "SPP", "masked_lora": "masked LoRA", "full": "masked full FT",
               "hira": "HiRA (PEFT)", "lora": "LoRA (PEFT)", "lora-merged": "LoRA (PEFT) merged",
               "lora-unmerged": "LoRA (PEFT) unmerged, + dense branch"}
METHOD_RANK = {"dense": 0, "wanda": 1, "sparsegpt": 2, "magnitude": 3}  # table order
NUMERIC = ("val_nll", "ppl_tinystories", "ppl_wikitext", "recovered_tinystories", "recovered_wikitext", "sparsity",
           "pruned_not_plus_zero", "kept_zero", "trainable", "step_s", "final_loss")
COLORS = {"spp": "tab:blue", "masked_lora": "tab:purple", "full": "tab:green", "hira": "tab:olive",
          "lora": "tab:orange", "lora-merged": "tab:orange", "lora-unmerged": "tab:red", "none": "black"}


# --------------------------------------------------------------------------- rows


def recipe(row: dict) -> tuple[str, str, str, str]:
    """(method, pattern, adapter, distill): what a learning rate is chosen for."""
    return row["method"], row["pattern"], row["adapter"], row["distill"]


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
        for r in record["rows"]:
            rows.append({**common, "recovery": r["recovery"], "val_nll": r["val_nll"],
                         "ppl_tinystories": r["ppl"]["tinystories"], "ppl_wikitext": r["ppl"]["wikitext"],
                         "sparsity": r["sparsity"], "pruned_not_plus_zero": r["pruned_not_plus_zero"],
                         "kept_zero": r["kept_zero"], "trainable": r["trainable"],
                         "dense_adapter_params": r.get("dense_adapter_params", 0)})
    dense = next((r for r in rows if r["method"] == "dense"), None)
    pruned = {(r["method"], r["pattern"], r["seed"]): r for r in rows if r["recovery"] == "none"}
    for r in rows:
        base = pruned.get((r["method"], r["pattern"], r["seed"]))
        for name in SET_TITLES:
            ok = dense is not None and base is not None and r["method"] != "dense" and "diverged" not in r
            r[f"recovered_{name}"] = (gap_recovered(dense[f"ppl_{name}"], base[f"ppl_{name}"], r[f"ppl_{name}"])
                                      if ok else None)
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Average over seeds: one entry per (method, pattern, recovery, distill, lr) with `n` and `<field>_mean/_sd`
    (sample standard deviation, None for one seed)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if not r.get("diverged"):
            groups.setdefault((r["method"], r["pattern"], r["recovery"], r["distill"], r["lr"]), []).append(r)
    out = []
    for (method, pattern, recovery, distill, lr), members in groups.items():
        entry = {"method": method, "pattern": pattern, "recovery": recovery, "adapter": members[0]["adapter"],
                 "distill": distill, "lr": lr, "n": len(members), "seeds": sorted(m["seed"] for m in members)}
        for key in NUMERIC:
            values = [m[key] for m in members if m.get(key) is not None]
            entry[f"{key}_mean"] = statistics.fmean(values) if values else None
            entry[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else None
        entry["val_nll_first_seed"] = min(members, key=lambda m: m["seed"]).get("val_nll")  # the seed the sweep chose with
        out.append(entry)
    return sorted(out, key=lambda e: (METHOD_RANK.get(e["method"], 9), e["method"], e["pattern"],
                                      RECOVERY_ORDER.index(e["recovery"]), e["distill"], e["lr"] or 0))


def chosen_rates(rows: list[dict], sweeps: dict) -> dict[tuple, float]:
    """(method, pattern, adapter, distill) -> the learning rate its sweep chose on the validation NLL.

    Recipes without a sweep (the tiny grid) take their rate of lowest validation NLL with their lowest seed.
    """
    out = {tuple(key.split("/")): found["best"] for key, found in sweeps.items() if found.get("best") is not None}
    unswept = [r for r in rows if r["adapter"] != "none" and not r.get("diverged") and "/".join(recipe(r)) not in sweeps]
    for r in sorted(unswept, key=lambda r: (-r["seed"], -r["val_nll"])):  # the last written wins
        out[recipe(r)] = r["lr"]
    return out


def at_chosen(summary: list[dict], chosen: dict) -> list[dict]:
    """The summary entries of every recipe at its chosen rate (plus the pruned models and the dense model)."""
    return [e for e in summary if e["recovery"] == "none" or e["method"] == "dense" or chosen.get(recipe(e)) == e["lr"]]


def best_recipe(entries: list[dict], recoveries: tuple[str, ...]) -> dict | None:
    """Of the chosen-rate entries whose recovery is in `recoveries`: the lowest validation NLL with the
    sweep's seed (the criterion and the data that chose the rates; the held-out sets never choose)."""
    pool = [e for e in entries if e["recovery"] in recoveries and e["val_nll_first_seed"] is not None]
    return min(pool, key=lambda e: e["val_nll_first_seed"]) if pool else None


# --------------------------------------------------------------------------- markdown


def fmt(value, kind: str = "ppl", sd=None) -> str:
    """A number as the tables show it: `ppl` 3 decimals below 10, 1 below 1000, else none; `frac` 2 decimals;
    `nll` 4; `pct` a percentage; `lr` %g; `count` with thousands separators. With `sd`: 'mean ± sd'."""
    if value is None:
        return "–"
    if kind == "ppl":
        digits = 3 if value < 10 else 1 if value < 1000 else 0
        text = f"{{:.{digits}f}}"
    else:
        text = {"frac": "{:.2f}", "nll": "{:.4f}", "pct": "{:.1%}", "lr": "{:g}", "count": "{:,.0f}"}[kind]
    return text.format(value) + (f" ± {text.format(sd)}" if sd is not None else "")


def pm(entry: dict, key: str, kind: str = "ppl") -> str:
    """An entry's `key` as 'mean ± sd' (the sd with the mean's format), or the mean alone for one seed."""
    return fmt(entry[f"{key}_mean"], kind, entry[f"{key}_sd"])


def label(entry: dict) -> str:
    """'masked LoRA + KD', 'LoRA (PEFT) merged', '– (dense model)'."""
    if entry.get("method") == "dense":
        return "– (dense model)"
    return KIND_LABELS.get(entry["recovery"], entry["recovery"]) + (" + KD" if entry.get("distill") == "kd" else "")


def _quality_cells(e: dict) -> list[str]:
    return [pm(e, "ppl_tinystories"), pm(e, "ppl_wikitext"), pm(e, "recovered_tinystories", "frac"),
            pm(e, "recovered_wikitext", "frac"), fmt(e["sparsity_mean"], "pct")]


def answer(entries: list[dict], method: str, pattern: str) -> tuple[str, str]:
    """The headline for one pruned model: a sentence and a table (best sparsity-preserving recipe,
    best `adapter: spp` recipe, best LoRA merged and the same unmerged, next to the pruned model)."""
    mine = [e for e in entries if (e["method"], e["pattern"]) == (method, pattern)]
    best_sparse, best_spp, best_lora = (best_recipe(mine, r) for r in (SPARSE, ("spp",), ("lora-merged",)))
    unmerged = next((e for e in mine if best_lora and e["recovery"] == "lora-unmerged"
                     and (e["distill"], e["lr"]) == (best_lora["distill"], best_lora["lr"])), None)
    rows = [("pruned, no recovery", next((e for e in mine if e["recovery"] == "none"), None)),
            ("best sparsity-preserving recipe", best_sparse),
            ("best `adapter: spp` recipe", best_spp if best_spp is not best_sparse else None),
            ("best PEFT LoRA, merged", best_lora), ("the same LoRA, unmerged", unmerged)]
    lines = [[what, label(e), fmt(e["lr"], "lr"), *_quality_cells(e), fmt(e["pruned_not_plus_zero_mean"], "count"),
              str(e["n"])] for what, e in rows if e is not None]
    text = markdown_table(["", "recipe", "lr", "PPL TinyStories", "PPL WikiText-2", "recovered (TS)", "recovered (WT)",
                           "sparsity after merge", "pruned entries ≠ +0.0", "seeds"], lines, "---rrrrrrr")
    if not (best_sparse and best_lora and best_sparse["recovered_tinystories_mean"] is not None):
        return "", text
    a, b = best_sparse["recovered_tinystories_mean"], best_lora["recovered_tinystories_mean"]
    return (f"**{method} {pattern}: the best sparsity-preserving recipe, {label(best_sparse)} at "
            f"{fmt(best_sparse['lr'], 'lr')}, recovers {a:.2f} of the log-perplexity gap in-domain "
            f"({best_sparse['recovered_wikitext_mean']:.2f} on WikiText-2) and keeps "
            f"{fmt(best_sparse['sparsity_mean'], 'pct')} sparsity after merge — "
            f"{'at least as much as' if a >= b else 'less than'} the best PEFT LoRA, {label(best_lora)} at "
            f"{fmt(best_lora['lr'], 'lr')}: {b:.2f} ({best_lora['recovered_wikitext_mean']:.2f} on WikiText-2), "
            f"{fmt(best_lora['sparsity_mean'], 'pct')} sparse after its merge.** Means over {best_sparse['n']} and "
            f"{best_lora['n']} seeds; recipes and rates were chosen on the validation slice, never on these held-out "
            "sets."), text


def chosen_table(entries: list[dict]) -> str:
    """Every recipe at its chosen rate: quality, sparsity, kept zeros, trainable parameters."""
    lines = [[e["method"], e["pattern"], label(e), fmt(e["lr"], "lr"), pm(e, "val_nll", "nll"), *_quality_cells(e),
              fmt(e["pruned_not_plus_zero_mean"], "count"), fmt(e["kept_zero_mean"], "count"),
              fmt(e["trainable_mean"], "count"), str(e["n"])] for e in entries]
    return markdown_table(["method", "pattern", "recovery", "lr", "val NLL", "PPL TS", "PPL WT", "recovered (TS)",
                           "recovered (WT)", "sparsity", "pruned ≠ +0.0", "kept_zero", "trainable", "seeds"], lines,
                          "----" + "r" * 10)


def _recipe_order(key: tuple) -> tuple:
    method, pattern, adapter, distill = key
    return METHOD_RANK.get(method, 9), pattern, KIND_ORDER.index(adapter) if adapter in KIND_ORDER else 9, distill


def common_rate_table(summary: list[dict], chosen: dict, common: float) -> str:
    """Seed 0 of every recipe at its chosen rate and at the common rate, side by side."""
    seed0 = {(*recipe(e), e["lr"]): e for e in summary if e["recovery"] not in ("none", "lora-unmerged")
             and e["method"] != "dense" and 0 in e["seeds"]}
    lines = []
    for key, lr in sorted(chosen.items(), key=lambda kv: _recipe_order(kv[0])):
        best, at_common = seed0.get((*key, lr)), seed0.get((*key, common))
        cells = [fmt(e and e[f"recovered_{s}_mean"], "frac") for s in SET_TITLES for e in (best, at_common)]
        lines.append([key[0], key[1], label(best or at_common or {"recovery": key[2], "distill": key[3]}),
                      fmt(lr, "lr"), *cells])
    return markdown_table(["method", "pattern", "recovery", "chosen lr", "recovered TS at chosen", f"TS at {common:g}",
                           "recovered WT at chosen", f"WT at {common:g}"], lines, "----rrrr")


def sweep_table(rows: list[dict], sweeps: dict, chosen: dict, grids: dict[str, tuple]) -> str:
    """Seed 0 of every sweep: validation NLL (the criterion), held-out perplexity and recovery, what was chosen;
    a rate outside the recovery's first grid (`grids`, the study's `LR_GRIDS`) is an extension."""
    lines = []
    seed0 = [r for r in rows if r["adapter"] != "none" and r["recovery"] != "lora-unmerged" and r["seed"] == 0]
    for r in sorted(seed0, key=lambda r: (*_recipe_order(recipe(r)), r["lr"])):
        found = sweeps.get("/".join(recipe(r)), {})
        notes = []
        if chosen.get(recipe(r)) == r["lr"]:
            notes.append("**chosen**" + (" (at the grid's edge)" if found.get("edge") else ""))
        if r.get("diverged"):
            notes.append(f"diverged at step {r['diverged']}")
        if found and r["lr"] not in found.get("grid", grids.get(r["adapter"], ())):
            notes.append("extension")
        lines.append([r["method"], r["pattern"], label(r), fmt(r["lr"], "lr"), fmt(r.get("val_nll"), "nll"),
                      fmt(r.get("ppl_tinystories")), fmt(r.get("ppl_wikitext")),
                      fmt(r.get("recovered_tinystories"), "frac"), fmt(r.get("recovered_wikitext"), "frac"),
                      fmt(r.get("sparsity"), "pct"), "; ".join(notes)])
    return markdown_table(["method", "pattern", "recovery", "lr", "val NLL", "PPL TS", "PPL WT", "recovered (TS)",
                           "recovered (WT)", "sparsity", ""], lines, "----rrrrrr-")


def cost_table(rows: list[dict]) -> str:
    """Median step time per recovery and objective over the seed-0 cells (all seeds where none has seed 0)."""
    kinds = sorted({(r["adapter"], r["distill"]) for r in rows if r["adapter"] != "none" and r.get("step_s")},
                   key=lambda k: (KIND_ORDER.index(k[0]) if k[0] in KIND_ORDER else 9, k[1]))
    lines = []
    for adapter, distill in kinds:
        members = [r for r in rows if (r["adapter"], r["distill"]) == (adapter, distill) and r.get("step_s")]
        members = [r for r in members if r["seed"] == 0] or members
        trainable = statistics.median(r["trainable"] for r in members if r.get("trainable") is not None)
        lines.append([label({"recovery": adapter, "distill": distill}), fmt(trainable, "count"),
                      f"{1000 * statistics.median(r['step_s'] for r in members):.0f}",
                      str(len({(r["method"], r["pattern"], r["lr"], r["seed"]) for r in members}))])
    return markdown_table(["recovery", "trainable", "train step (ms, median)", "cells"], lines, "-rrr")


# --------------------------------------------------------------------------- plots


def _figure(columns: int, height: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, columns, figsize=(5.5 * columns, height), squeeze=False)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    plt.close(fig)


def plot_ppl_vs_sparsity(entries: list[dict], path: Path) -> None:
    """Perplexity against the sparsity the final model multiplies by, every recipe at its chosen rate
    (seed means): filled = cross-entropy, open = + KD; the pruned models as black squares, dense as a star."""
    fig, axes = _figure(2, 4.4)
    for ax, name in zip(axes.flat, SET_TITLES):
        for e in (e for e in entries if e[f"ppl_{name}_mean"] is not None):
            xy = [e["sparsity_mean"]], [e[f"ppl_{name}_mean"]]
            if e["method"] == "dense":
                ax.plot(*xy, "k*", markersize=13, label="dense")
            elif e["recovery"] == "none":
                ax.plot(*xy, "ks", markersize=8, mfc="white", label=f"{e['method']} {e['pattern']} pruned")
            else:
                color = COLORS.get(e["recovery"], "gray")
                ax.plot(*xy, "o", color=color, markersize=8, mfc="white" if e["distill"] else color,
                        label=f"{label(e)} ({fmt(e['lr'], 'lr')})")
        ax.set(yscale="log", xlabel="fraction of zero weights in the decoder linears after merge", ylabel="perplexity")
        ax.set_title(SET_TITLES[name] + "\neach recipe at its chosen learning rate; open markers: + KD", fontsize=9)
        ax.grid(alpha=0.3)
    handles, labels = axes[0, 1].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    axes[0, 1].legend(unique.values(), unique.keys(), fontsize=6.5, ncol=2)
    _save(fig, path)


def plot_lr_sweep(rows: list[dict], chosen: dict, path: Path) -> None:
    """Validation NLL (the criterion) and recovered fraction in-domain against the learning rate, seed 0:
    solid = cross-entropy, dashed = + KD; the chosen rate circled."""
    seed0 = [r for r in rows if r["adapter"] != "none" and r["recovery"] != "lora-unmerged" and r["seed"] == 0
             and not r.get("diverged")]
    fig, axes = _figure(2, 4.2)
    for key in sorted({recipe(r) for r in seed0}):
        pts = sorted((r for r in seed0 if recipe(r) == key), key=lambda r: r["lr"])
        color, name = COLORS.get(key[2], "gray"), label({"recovery": key[2], "distill": key[3]})
        for ax, y in zip(axes.flat, ("val_nll", "recovered_tinystories")):
            if all(p.get(y) is not None for p in pts):
                ax.plot([p["lr"] for p in pts], [p[y] for p in pts], ("--" if key[3] else "-") + "o", color=color,
                        markersize=4, label=name)
                ax.plot([p["lr"] for p in pts if chosen.get(key) == p["lr"]],
                        [p[y] for p in pts if chosen.get(key) == p["lr"]], "o", color=color, mfc="none", markersize=11)
    vals = [r["val_nll"] for r in seed0]
    recs = [r["recovered_tinystories"] for r in seed0 if r.get("recovered_tinystories") is not None]
    if vals and recs:  # a diverging rate would flatten every other curve: clip the axes, the table has it all
        axes[0, 0].set_ylim(min(vals) - 0.03, min(max(vals), min(vals) + 0.8) + 0.03)
        axes[0, 1].set_ylim(max(min(recs), max(recs) - 0.4) - 0.02, max(recs) + 0.02)
    for ax, title in zip(axes.flat, ("validation NLL (chooses the rate; circled)",
                                     "recovered fraction, TinyStories 2nd half")):
        ax.set(xscale="log", xlabel="peak learning rate")
        ax.set_title(title + "\nsolid: cross-entropy, dashed: + KD (seed 0; points off the scale are in the table)",
                     fontsize=9)
        ax.grid(alpha=0.3)
    axes[0, 1].legend(fontsize=7, ncol=2)
    _save(fig, path)


def plot_loss_curves(records: dict[str, dict], chosen: dict, path: Path, window: int = 10) -> None:
    """Training cross-entropy per step (moving average over `window` steps) of every recipe at its
    chosen rate, seed 0, one panel per pruned model; dashed = trained with KD."""
    curves: dict[tuple, dict] = {}
    for record in records.values():
        cell = record["cell"]
        key = (cell["method"], cell["pattern"], cell["adapter"], cell.get("distill", ""))
        if record.get("train") and cell["seed"] == 0 and chosen.get(key) == record["learning_rate"]:
            curves.setdefault(key[:2], {})[key[2:]] = record["train"]["losses"]
    if not curves:
        return
    fig, axes = _figure(len(curves), 3.8)
    for ax, panel in zip(axes.flat, sorted(curves)):
        for (adapter, distill), losses in sorted(curves[panel].items()):
            k = max(1, min(window, len(losses)))
            smooth = [statistics.fmean(losses[max(0, i - k + 1): i + 1]) for i in range(len(losses))]
            ax.plot(range(1, len(losses) + 1), smooth, "--" if distill else "-", color=COLORS.get(adapter),
                    label=label({"recovery": adapter, "distill": distill}))
        ax.set_title(f"{panel[0]} {panel[1]}: each recipe at its chosen rate", fontsize=9)
        ax.set(xlabel="step", ylabel=f"train cross-entropy ({window}-step mean)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    _save(fig, path)


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

    `span` holds `cell_minutes` (the cells' compute time), `missing` (planned cells not in the cache) and `split`
    (where the text was cut); `grids` (recovery -> its first learning-rate grid) and `common_rate` are the study's
    `LR_GRIDS` and `COMMON_RATE`, which the text and the sweep table name."""
    sweeps = sweeps or {}
    out.mkdir(parents=True, exist_ok=True)
    rows = flatten(records)
    summary = summarise(rows)
    chosen = chosen_rates(rows, sweeps)
    entries = at_chosen(summary, chosen)
    from spp.models import load_model

    report = {"settings": asdict(settings), "settings_sha256": settings.sha256(), "cells": [c.key for c in cells],
              "model_params": sum(p.numel() for p in load_model(settings.model, "float32", "cpu").parameters()),
              "runs": [r for r in runs if r.get("settings_sha256") == settings.sha256()], **span,
              "environment": environment(settings), "sweeps": sweeps, "notes": list(notes or []),
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
    shares = [r["trainable"] / report["model_params"] for rec in report["records"].values() for r in rec["rows"]
              if r["trainable"]]
    low, high = (f"{100 * f(shares):.0f}%" for f in (min, max)) if shares else ("–", "–")
    return low if low == high else f"{low}–{high}"


def _grids_line(sweeps: dict, grids: dict[str, tuple]) -> str:
    parts = []
    for adapter, grid in grids.items():
        ran = {lr for key, s in sweeps.items() if key.split("/")[2] == adapter for lr in s["rates"]}
        extra = sorted(ran - set(grid))
        parts.append(f"{KIND_LABELS[adapter]} {{{', '.join(f'{x:g}' for x in grid)}}}"
                     + (f" + extended to {', '.join(f'{x:g}' for x in extra)}" if extra else ""))
    return "; ".join(parts)


def study_markdown(settings, summary: list[dict], rows: list[dict], entries: list[dict], chosen: dict,
                   report: dict, grids: dict[str, tuple], common_rate: float) -> str:
    """The human-readable report: the answer, setup, time taken, the tables, the plots, and what it does not show."""
    s = settings
    dense = next((e for e in summary if e["method"] == "dense"), None)
    env, split, missing = report["environment"], report["split"], report["missing"]
    where = f"{env['gpu']} (CUDA)" if s.device.startswith("cuda") and env.get("gpu") else f"{env['cpu_cores']} CPU cores"
    loads = [round(r["load_avg_1min_start"], 1) for r in report["runs"] if r["cells_computed"]]
    order = [k.split("-s")[0] for k in report["cells"]]  # run order: the first --pairs first
    pairs = sorted({(e["method"], e["pattern"]) for e in entries if e["method"] != "dense"}, key=lambda mp: next(
        (i for i, k in enumerate(order) if k == f"{mp[0]}-{mp[1].replace(':', 'of').replace('%', 'pct')}"), len(order)))
    diverged = [r for r in rows if r.get("diverged")]
    kd_deltas = []
    for e in entries:
        plain = next((x for x in entries if e["distill"] == "kd" and e["recovery"] != "lora-unmerged"
                      and (x["method"], x["pattern"], x["recovery"], x["distill"]) ==
                      (e["method"], e["pattern"], e["recovery"], "")), None)
        if plain and None not in (plain["recovered_tinystories_mean"], e["recovered_tinystories_mean"]):
            kd_deltas.append(((f"{e['method']} {e['pattern']} " if len(pairs) > 1 else "") + label(plain),
                              e["recovered_tinystories_mean"] - plain["recovered_tinystories_mean"],
                              e["recovered_wikitext_mean"] - plain["recovered_wikitext_mean"]))
    parts = [
        "# Recovery study: which fine-tuning wins back what pruning lost, and which keeps the sparsity", "",
        f"Generated by `python scripts/study.py` (settings sha256 `{report['settings_sha256'][:12]}`); every number "
        "below comes from that run (`study.json` holds each cell, its loss curve, the sweeps and the settings).", "",
        f"**{len(report['cells']) - len(missing)} of {len(report['cells'])} cells took {report['cell_minutes']:.0f} "
        f"minutes on {where}** (the cells' own compute times, one cell at a time; 1-minute load average when each "
        f"round started: {loads or 'not recorded'}; on a shared machine times are upper bounds). Libraries: "
        + ", ".join(f"{k} {v}" for k, v in env["libraries"].items()) + ".", "",
        *([f"**Not run: {len(missing)} cells** (`python scripts/study.py` resumes and adds them): "
           f"{', '.join(f'`{k}`' for k in missing)}.", ""] if missing else []),
        "## The answer", "",
    ]
    for sentence, text in (answer(entries, m, p) for m, p in pairs):
        parts += [sentence, "", text, ""]
    parts += [
        "Recovered = (log PPL_pruned − log PPL_after) / (log PPL_pruned − log PPL_dense), per seed, then averaged: 1 is "
        "back to dense, 0 no better than pruned. \"Pruned entries ≠ +0.0\" counts the entries the mask marks pruned "
        "that are not bitwise +0.0 in the weights the final model multiplies by (0 means every zero kept); "
        "LoRA unmerged keeps the sparse base but adds a dense rank-r branch at inference.", "",
        "![perplexity vs sparsity after merge](study_ppl_vs_sparsity.png)", "",
        "## Setup", "",
        f"- Model: `{s.model}`. Dense perplexity: TinyStories {fmt(dense and dense['ppl_tinystories_mean'])}, "
        f"WikiText-2 {fmt(dense and dense['ppl_wikitext_mean'])}.",
        f"- Text: `{s.text}` cut at character {split['cut_at_char']} of {split['text_chars']} (the first line break "
        f"after the middle). The first half calibrates pruning ({s.calib_nsamples} windows of {s.calib_seqlen} tokens "
        "at seeded random offsets) and is the fine-tuning data, `spp train`'s windows of "
        f"{s.seqlen} tokens, up to character {split['val_at_char']}; the rest of it ({split['val_tokens']} tokens) "
        "is the **validation slice** that chooses every learning rate and the best recipe.",
        f"- Perplexity (reported, never used for a choice): first {s.eval_windows} windows of {s.eval_seqlen} tokens "
        f"of the second half and of `{s.wikitext}` (read in text mode), the Wanda/SparseGPT protocol "
        f"(`spp eval`); tokens available: {split['eval_tokens_available']}.",
        f"- Training: {s.steps} AdamW steps (no weight decay) of {s.batch_size} × {s.seqlen} tokens, linear warmup over "
        f"{s.warmup_ratio:g} of the steps then linear decay to 0, gradient clip {s.max_grad_norm:g}, the same data "
        "order and seed for every recovery, every linear layer of every decoder block adapted.",
        f"- Recoveries: SPP ({s.spp_row_groups} row groups, scale {s.lora_alpha:g}/{s.lora_r}); masked LoRA "
        f"W + M ⊙ (s·B·A) (rank {s.lora_r}, s = {s.lora_alpha:g}/{s.lora_r}, M the keep-mask); masked full "
        "fine-tuning (the kept weights, gradient masked); all three trained by `spp train` "
        f"and merged by `spp merge`. PEFT LoRA (rank {s.lora_r}, alpha {s.lora_alpha:g}, merged with "
        f"`merge_and_unload`) and PEFT HiRA (rank {s.lora_r}, W + W ⊙ (B·A), which keeps W's zeros), trained on "
        "the same examples in the same order with the same loss, schedule and optimizer.",
        f"- Distillation (\"+ KD\"): loss = {s.ce_weight:g} · cross-entropy + {s.kd_weight:g} · T²·KL(dense teacher ‖ "
        f"student) per target token at T = {s.kd_temperature:g} (`kd_weight`, `teacher`), the teacher being the dense "
        "model before pruning. Weight 1 puts the two terms on the same per-token scale (both are nats per token).",
        f"- Learning rates: every recovery × objective is swept with seed 0 over its grid "
        f"({_grids_line(report['sweeps'], grids)}); rates are rungs of one ladder about ×2 apart; when the lowest "
        "validation NLL is at an edge of the grid the next rung is added (at most twice per edge). The rate with the "
        "lowest validation NLL is chosen. The headline candidates (SPP, masked LoRA, masked full FT and PEFT LoRA "
        "with cross-entropy, and a + KD recipe where it beat its cross-entropy twin on validation) then run seeds 1 "
        "and 2 at their chosen rate; every other cell has seed 0 only. The best recipe of a family is the one with "
        "the lowest seed-0 validation NLL at its chosen rate. The + KD sweeps start at the cross-entropy choice and "
        f"its two neighbours. The common rate {common_rate:g} (the SPP paper's) is in every cross-entropy grid.",
        "- Seeds: the seed sets the calibration windows, the adapter initialisation and the data order. "
        "Mean ± sample standard deviation over the seeds where there are several.", "",
        "## Every recovery at its chosen rate", "", chosen_table(entries), "",
        f"## Chosen rate vs the common rate {common_rate:g} (seed 0)", "",
        common_rate_table(summary, chosen, common_rate), "",
        "## The learning-rate sweeps (seed 0)", "", "![learning-rate sweeps](study_lr_sweep.png)", "",
        sweep_table(rows, report["sweeps"], chosen, grids), "",
        *([f"Diverged (non-finite loss; training stopped, no model to measure): "
           + ", ".join(f"{label(r)} at {fmt(r['lr'], 'lr')}" for r in diverged) + ".", ""] if diverged else []),
        "## Cost per recovery (median over the seed-0 cells)", "", cost_table(rows), "",
        "Cells ran on a machine whose load may change during the run, so these step times do not compare "
        "recoveries: `bench.md` has side-by-side timings and memory. Distillation adds the dense teacher's forward "
        "pass to every step.", "",
        "## Training loss", "", "![training loss curves](study_loss_curves.png)", "",
        "## What this does and does not show", "",
        "- It shows, on one model and one pruned model per row, how much of the pruning loss each recovery wins back "
        "when each gets its own learning rate, chosen without looking at the reported sets, and that spp's three "
        "recoveries and HiRA keep every pruned zero through the merge while LoRA's merge makes the weights dense.",
        *([("- Distillation from the dense model, each recipe at its own chosen rate, changed the recovered fraction "
            "by " + ", ".join(f"{n} {100 * a:+.0f} points in-domain ({100 * b:+.0f} on WikiText-2)"
                              for n, a, b in kd_deltas) + ".")] if kd_deltas else []),
        f"- It does not show that the same holds for other models: the adapters here train {_adapter_share(report)} "
        "of the model's parameter count (masked full fine-tuning trains every kept weight). Perplexity is the only "
        "quality measure (no zero-shot tasks), and only the pruned models above are measured.",
        "- Fine-tuning also adapts the model to the evaluation text's format, so a recovered fraction can exceed 1 "
        "(better than the dense model), on WikiText-2 especially.",
        "- The rates are chosen with one seed on the validation slice; the held-out numbers of the other seeds at "
        "the same rate show how much that choice moves.",
        *[f"- {note}" for note in report["notes"]], "",
    ]
    return "\n".join(parts)


# --------------------------------------------------------------------------- the other presets' pages

PAGES = {"bar": "recovery_bar", "smollm2": "smollm2", "owl_ria": "owl_ria"}  # preset -> the page's file stem
BARS = {"spp": 0.75, "masked_lora": 0.78}  # adapter: KIND at the config's default rate must recover at least this


def cell_name(cell: dict) -> str:
    """'dense', 'wanda-2:4', 'wanda-2:4+full+kd/c4' (smollm2's names)."""
    if cell["method"] == "dense":
        return "dense"
    return (f"{cell['method']}-{cell['pattern']}" + (f"+{cell['adapter']}" if cell["adapter"] != "none" else "")
            + ("+kd" if cell.get("distill") else "") + (f"+{cell['objective']}" if cell.get("objective") else "")
            + (f"/{cell['data']}" if cell.get("data") else ""))


def owl_label(cell: dict) -> str:
    """'wanda + OWL 70%', 'ria 2:4' (owl_ria's names)."""
    return f"{cell['method']}{' + OWL' if cell.get('owl') else ''} {cell['pattern']}"


def _machine(settings, runs: list[dict]) -> dict:
    """`environment`, with the threads, load and time of the last run and how many calls computed cells."""
    import torch

    last = runs[-1] if runs else {}
    return {**environment(settings), "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": last.get("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "unset")),
            "load_avg_1min_end": last.get("load_avg_1min_end", os.getloadavg()[0]),
            "finished": last.get("finished_utc", "not run"), "calls": len([r for r in runs if r["cells_computed"]])}


def write_page(preset: str, out: Path, settings, records: dict[str, dict], runs: list[dict], span: dict,
               bench: list[dict] | None = None, machine: str = "unstated", sweeps: dict | None = None) -> dict:
    """Write PAGE.md and PAGE.json (`PAGES`) of a preset other than the stories study into `out`. Returns the JSON
    (for smollm2 with `summary`, `smollm2_summary`'s tables and headline, from which the README block is rendered)."""
    out.mkdir(parents=True, exist_ok=True)
    runs = [r for r in runs if r.get("settings_sha256") == settings.sha256()]
    report = {"preset": preset, "settings": asdict(settings), "settings_sha256": settings.sha256(), **span,
              "machine": _machine(settings, runs), "runs": runs, "sweeps": sweeps or {}, "records": records}
    if preset == "smollm2":
        report["summary"] = smollm2_summary(records, sweeps or {})
    text = (owl_markdown(report, settings, bench, machine) if preset == "owl_ria" else
            {"bar": bar_markdown, "smollm2": smollm2_markdown}[preset](report, settings))
    _write_text(out / f"{PAGES[preset]}.json", json.dumps(report, indent=1, default=str))
    _write_text(out / f"{PAGES[preset]}.md", text)
    print(text)
    return report


def _rows(records: dict[str, dict]) -> list[tuple[dict, dict]]:
    """(record, row) of every final model, in run order (LoRA unmerged left out)."""
    return [(rec, r) for rec in records.values() for r in rec["rows"] if r["recovery"] != "lora-unmerged"]


def bar_markdown(report: dict, s) -> str:
    """recovery_bar.md: the table of every recovery against dense and pruned, the bar's verdicts, the commands."""
    m, recs = report["machine"], list(report["records"].values())
    ppl = {name: next((r["rows"][0]["ppl"]["tinystories"] for r in recs if r["cell"]["method"] == method
                       and r["cell"]["adapter"] == "none"), float("nan"))
           for name, method in (("dense", "dense"), ("pruned", "wanda"))}
    rows = [{**r, "recovery": f"spp train adapter={r['recovery']}" if r["recovery"] in SPARSE else "PEFT LoRA (merged)",
             "kind": rec["cell"]["adapter"], "lr": rec["learning_rate"], "ppl": r["ppl"]["tinystories"],
             "recovered": gap_recovered(ppl["dense"], ppl["pruned"], r["ppl"]["tinystories"]),
             "verify_exit": r.get("verify_exit")} for rec, r in _rows(report["records"])
            if rec["cell"]["adapter"] != "none"]
    report["bar_rows"] = rows
    sparse, lora = [r for r in rows if r["kind"] in SPARSE], [r for r in rows if r["kind"] == "lora"]
    best_sparse = max(sparse, key=lambda r: r["recovered"], default=None)
    best_lora = max(lora, key=lambda r: r["recovered"], default=None)
    table = [["dense", "–", f"{ppl['dense']:.3f}"] + ["–"] * 5,
             ["Wanda 2:4, no recovery", "–", f"{ppl['pruned']:.2f}", "0.00"] + ["–"] * 4]
    for r in rows:
        verify = "–" if r["verify_exit"] is None else ("passes" if r["verify_exit"] == 0 else f"exit {r['verify_exit']}")
        table.append([r["recovery"], f"{r['lr']:g}", f"{r['ppl']:.3f}", f"{r['recovered']:.3f}",
                      f"{100 * r['sparsity']:.1f}%", f"{r['pruned_not_plus_zero']:,}", f"{r['kept_zero']:,}", verify])

    def verdict(ok: bool) -> str:
        return "**pass**" if ok else "**FAIL**"
    bullets = []
    if best_sparse and best_lora:
        bullets.append(f"- Best sparsity-preserving recipe ≥ PEFT LoRA's best: {best_sparse['recovery']} recovers "
                       f"{best_sparse['recovered']:.3f}, PEFT LoRA's best ({best_lora['lr']:g}) "
                       f"{best_lora['recovered']:.3f}: {verdict(best_sparse['recovered'] >= best_lora['recovered'])}.")
    if sparse:
        kept = all(r["pruned_not_plus_zero"] == 0 for r in sparse)
        bullets.append(f"- Every entry the mask marks pruned is +0.0 after `spp merge`, for every kind: {verdict(kept)} "
                       "(kept_zero: " + ", ".join(f"{r['kind']} {r['kept_zero']:,}" for r in sparse) + ")"
                       + (f"; PEFT LoRA's merge leaves {lora[0]['pruned_not_plus_zero']:,} pruned entries non-zero."
                          if lora else "."))
    for kind, bar in BARS.items():
        if r := next((x for x in sparse if x["kind"] == kind), None):
            bullets.append(f"- `adapter: {kind}` at the config's default rate ({r['lr']:g}) recovers ≥ {bar}: "
                           f"{r['recovered']:.3f}, {verdict(r['recovered'] >= bar)}.")
    calls = m["calls"]
    return "\n".join([
        "# Recovery bar (issue 10), measured in one run", "",
        f"Generated by `python scripts/study.py --preset bar` (finished {m['finished']}) in "
        f"{report['cell_minutes']:.1f} minutes" + (f" over {calls} calls (later calls reuse the finished cells)"
                                                    if calls > 1 else " (one call, from scratch)") + ": "
        f"{m['platform']}, {m['cpu_cores']} CPU cores shared with other work (1-minute load "
        f"{m['load_avg_1min_end']:.1f} at the end), OMP_NUM_THREADS={m['OMP_NUM_THREADS']} for the script and every "
        f"`spp` command it ran (torch threads: {m['torch_threads']}). Versions: "
        + ", ".join(f"{k} {v}" for k, v in m["libraries"].items()) + ".", "",
        f"Setup: TRAIN is the first half by characters of `{s.text}`, the held-out text its second half; Wanda 2:4 "
        f"calibrated on TRAIN ({s.calib_nsamples} × {s.calib_seqlen} tokens); every recovery trains {s.steps} steps "
        "of 8 × 256 tokens from TRAIN with the config's schedule (5 warmup steps, linear decay, clip 1.0, seed 42); "
        f"perplexity over the first {s.eval_windows} windows of {s.eval_seqlen} tokens of the held-out half "
        "(`spp eval`). The `spp` rows are the real CLI at `configs/tinystories.yaml`'s default learning rate for the "
        "kind; PEFT LoRA (r = 8, alpha 16, the seven projections) trains on the same windows in the same order with "
        "the same schedule, at each rate listed. Recovered = share of the log-perplexity gap won back.", "",
        markdown_table(["recovery", "lr", "PPL (held-out)", "recovered", "sparsity after merge", "pruned entries ≠ +0.0",
                        "kept_zero", "spp verify"], table, "-rrrrrr-"), "",
        "## The bar", "", *bullets, "",
        "## Commands", "", "```", *[c for rec in recs for c in rec["commands"]], "```", ""])


SMOLLM2_PATTERN_ORDER = ("2:4", "70%", "50%")
HEADLINE_PATTERNS = ("2:4", "70%")


def _interval(d) -> dict:
    return {"diff": d.diff, "stderr": d.stderr, "low": d.low, "high": d.high, "n": d.n, "within_noise": d.within_noise}


def paired_against(reference: dict | None, tasks: dict | None, headline: list[str]) -> dict | None:
    """Paired differences (`spp.eval.uncertainty`) of `tasks` from `reference` (results.json `zeroshot.tasks`) on the
    same items: per task, and `mean` over the `headline` tasks; None without both, a task left out where the items
    differ in number. Each: {diff, stderr, low, high (95%), n, within_noise}."""
    from spp.eval.uncertainty import mean_difference, paired_difference

    if not reference or not tasks:
        return None
    per = {name: paired_difference(ref["item_acc"], tasks[name]["item_acc"]) for name, ref in reference.items()
           if len(ref.get("item_acc") or []) > 1 and len((tasks.get(name) or {}).get("item_acc") or []) ==
           len(ref["item_acc"])}
    out = {name: _interval(d) for name, d in per.items()}
    if headline and all(n in per for n in headline):
        out["mean"] = _interval(mean_difference([per[n] for n in headline]))
    return out


def smollm2_summary(records: dict[str, dict], sweeps: dict) -> dict:
    """The study's models, their roles and comparisons, from the cell records and the sweeps (`plan_smollm2`).

    Each measured model: WikiText-2 perplexity, validation NLL, sparsity after merge, pruned entries ≠ +0.0, `spp
    verify`'s exit, CPU seconds (training, merge, measuring and its zero-shot cell), its zero-shot tasks (from the
    `zeroshot` cell of the same key), their mean over the headline tasks (those where dense is above its baseline by
    2 stderr, `spp.eval.uncertainty.headline_tasks`) and paired differences against dense and against the same
    pattern's PEFT LoRA at its chosen rate. Roles: dense, pruned, `chosen` (a recovery at its sweep's best rate),
    `selection` (the sweep's other rates), alpaca. `headline[pattern]`: the sparsity-preserving recovery with the
    lowest validation NLL among the chosen (the reported text plays no part in choosing), with dense, its pruned
    base and PEFT LoRA.
    """
    from spp.eval.uncertainty import headline_tasks

    scored = {r["of"]: r for r in records.values() if r["cell"].get("zeroshot")}
    models = []
    for key, rec in records.items():
        cell = rec["cell"]
        rows = [r for r in rec.get("rows", []) if r["recovery"] != "lora-unmerged"]
        if cell.get("zeroshot") or not rows:
            continue
        row, zs = rows[0], scored.get(key)
        recipe = "/".join((cell["pattern"], cell["adapter"], cell.get("distill", ""), cell.get("objective", "")))
        role = ("dense" if cell["method"] == "dense" else "pruned" if cell["adapter"] == "none" else "alpaca"
                if cell.get("data") == "alpaca" else "chosen" if (sweeps.get(recipe) or {}).get("best") == cell["lr"]
                else "selection")
        models.append({"key": key, "name": cell_name(cell), "role": role, "recipe": recipe, "method": cell["method"],
                       "pattern": cell["pattern"], "adapter": cell["adapter"], "objective": cell.get("objective", ""),
                       "lr": rec.get("learning_rate") if cell["adapter"] != "none" else None,
                       "ppl": row["ppl"]["wikitext"], "val_nll": row["nll"].get("val"),
                       "sparsity": row["sparsity"], "pruned_not_plus_zero": row["pruned_not_plus_zero"],
                       "verify_exit": row.get("verify_exit"),
                       "cpu_s": rec.get("cpu_s", float("nan")) + (zs or {}).get("cpu_s", 0.0),
                       "zeroshot": (zs or {}).get("zeroshot", {}).get("tasks")})
    dense = next((m for m in models if m["role"] == "dense"), None)
    headline = headline_tasks(dense["zeroshot"]) if dense and dense["zeroshot"] else []
    lora = {m["pattern"]: m for m in models if m["role"] == "chosen" and m["adapter"] == "lora"}
    for m in models:
        m["headline_mean"] = (sum(m["zeroshot"][t]["acc"] for t in headline) / len(headline)
                              if headline and m["zeroshot"] and all(t in m["zeroshot"] for t in headline) else None)
        m["vs_dense"] = paired_against(dense and dense["zeroshot"], m["zeroshot"], headline) if m is not dense else None
        reference = lora.get(m["pattern"])
        m["vs_lora"] = (paired_against(reference["zeroshot"], m["zeroshot"], headline)
                        if reference and m is not reference else None)
    top = {}
    for pattern in HEADLINE_PATTERNS:
        sparse = [m for m in models if m["pattern"] == pattern and m["role"] == "chosen" and m["adapter"] in SPARSE
                  and m["zeroshot"] and m["val_nll"] is not None]
        if not sparse:
            continue
        best = min(sparse, key=lambda m: m["val_nll"])
        base = next((m for m in models if m["role"] == "pruned" and m["pattern"] == pattern
                     and m["method"] == best["method"]), None)
        top[pattern] = {"best": best["key"], "base": base and base["key"], "lora": lora.get(pattern, {}).get("key"),
                        "dense": dense and dense["key"]}
    return {"headline_tasks": headline, "models": models, "headline": top}


def _acc(task: dict | None) -> str:
    return "–" if not task else f"{task['acc']:.3f} ± {task.get('acc_stderr', 0):.3f}"


def _diff(d: dict | None) -> str:
    return "–" if not d else f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" + (" noise" if d["within_noise"]
                                                                                      else "")


def _rate(m: dict, sweeps: dict) -> str:
    if m["lr"] is None:
        return "–"
    found = sweeps.get(m["recipe"]) or {}
    return f"{m['lr']:g}" + (" (edge)" if found.get("edge") and found.get("best") == m["lr"] else "")


def sweep_label(recipe: str) -> str:
    """A smollm2 sweep key "PATTERN/adapter/distill/objective" in words: "2:4 masked LoRA + KD", "70% masked full FT,
    block-wise"."""
    pattern, adapter, distill, objective = recipe.split("/")
    return (f"{pattern} {KIND_LABELS[adapter]}" + (" + KD" if distill == "kd" else "")
            + (f", {objective.replace('blockwise', 'block-wise')}" if objective else ""))


def smollm2_tables(summary: dict, tasks: list[str], sweeps: dict) -> list[str]:
    """Markdown: per pattern the dense row, the pruned models and the recoveries at their chosen rates (and Alpaca);
    then each sweep's rates with validation NLL and perplexity."""
    models, headline = summary["models"], summary["headline_tasks"]
    dense = [m for m in models if m["role"] == "dense"]
    lines = []
    for pattern in [p for p in SMOLLM2_PATTERN_ORDER if any(m["pattern"] == p for m in models)]:
        shown = dense + [m for m in models if m["pattern"] == pattern and m["role"] in ("pruned", "chosen", "alpaca")]
        table = [[m["name"], _rate(m, sweeps), "–" if m["val_nll"] is None else f"{m['val_nll']:.4f}",
                  f"{m['ppl']:.2f}", "0%" if m["role"] == "dense" else f"{m['sparsity']:.1%}",
                  f"{m['pruned_not_plus_zero']:,}", "–" if m["verify_exit"] is None else str(m["verify_exit"]),
                  f"{m['cpu_s'] / 60:.0f}", *(_acc((m["zeroshot"] or {}).get(t)) for t in tasks),
                  "–" if m["headline_mean"] is None else f"{m['headline_mean']:.3f}",
                  _diff((m["vs_dense"] or {}).get("mean")), _diff((m["vs_lora"] or {}).get("mean"))] for m in shown]
        lines += [f"### {pattern}", "", markdown_table(
            ["model", "lr", "val NLL", "wiki ppl @512", "sparsity after merge", "pruned ≠ +0.0", "verify", "CPU min",
             *tasks, f"mean ({len(headline)} tasks)", "Δ vs dense [95%]", "Δ vs PEFT LoRA [95%]"], table,
            "--" + "r" * (len(tasks) + 9)), ""]
    sweep_rows = []
    for recipe, found in sweeps.items():
        runs = {m["lr"]: m for m in models if m["recipe"] == recipe and m["role"] in ("chosen", "selection")}
        sweep_rows += [[sweep_label(recipe), "{" + ", ".join(f"{x:g}" for x in found["grid"]) + "}", f"{lr:g}",
                        "–" if lr not in runs else f"{runs[lr]['val_nll']:.4f}",
                        "–" if lr not in runs else f"{runs[lr]['ppl']:.2f}",
                        "chosen" + (" (edge)" if found.get("edge") else "") if lr == found.get("best") else ""]
                       for lr in found["rates"]]
    if sweep_rows:
        lines += ["### Learning-rate sweeps (validation slice of the C4 recovery text)", "",
                  markdown_table(["recipe", "first grid", "lr", "val NLL", "wiki ppl @512", ""], sweep_rows, "---rr-"),
                  ""]
    return lines


def smollm2_headline(report: dict) -> str:
    """The README's headline block from the study JSON (`write_page`'s smollm2 report): at 2:4 and 70%, dense, the
    best-pruned base, the best sparsity-preserving recovery and PEFT LoRA, with the paired zero-shot differences of
    the headline-task mean against dense and against PEFT LoRA, and one sentence per pattern for a user choosing."""
    summary = report["summary"]
    by_key = {m["key"]: m for m in summary["models"]}
    s, tasks = report["settings"], summary["headline_tasks"]
    lines = [f"WikiText-2 perplexity: protocol text, seqlen {s['eval_seqlen']}, first {s['eval_windows']} windows. "
             f"Zero-shot: the mean accuracy over the {len(tasks)} tasks where dense is above chance by 2 stderr "
             f"({', '.join(tasks)}), the first {s['limit']} items of each (all of a smaller task); Δ: paired "
             "difference on the same items "
             "with its 95% interval, \"noise\" when it holds 0.", "",
             "| pattern | model | sparsity after merge | WikiText-2 ppl @512 | mean acc | Δ vs dense "
             "| Δ vs PEFT LoRA |",
             "|---|---|---:|---:|---:|---:|---:|"]
    sentences = []
    for pattern, top in summary["headline"].items():
        for role in ("dense", "base", "best", "lora"):
            m = by_key.get(top[role])
            if m is None:
                continue
            label = ("dense" if role == "dense" else f"{m['method']} (no recovery)" if role == "base" else
                     "PEFT LoRA + KD, merged" if role == "lora" else
                     m["name"].split("+", 1)[1].replace("/c4", "") + f" (lr {m['lr']:g})")
            sparsity = "0%" if role == "dense" else f"{m['sparsity']:.1%}"
            lines.append(f"| {pattern} | {label} | {sparsity} | "
                         f"{m['ppl']:.1f} | " + ("–" if m["headline_mean"] is None else f"{m['headline_mean']:.3f}")
                         + f" | {_diff((m['vs_dense'] or {}).get('mean'))} | "
                         + f"{_diff((m['vs_lora'] or {}).get('mean'))} |")
        best, lora = by_key[top["best"]], by_key.get(top["lora"])
        d = (best["vs_lora"] or {}).get("mean")
        if lora and d:
            verdict = ("is within noise of" if d["within_noise"] else "trails" if d["diff"] < 0 else "beats")
            sentences.append(
                f"At {pattern}, {best['name']} {verdict} PEFT LoRA on the zero-shot mean ({_diff(d)}) and keeps every "
                f"pruned entry +0.0, where LoRA's merge fills {lora['pruned_not_plus_zero']:,} of them"
                + (": for a model that must stay sparse it is the recipe to use." if d["within_noise"] or d["diff"] > 0
                   else ": that gap is what keeping the sparsity costs here."))
    return "\n".join(lines + [""] + sentences) + "\n"


def smollm2_markdown(report: dict, s) -> str:
    """smollm2.md: the tables per pattern, the sweeps, the README headline block, how it was made."""
    m, tasks = report["machine"], s.tasks.split(",")
    summary = report["summary"]
    return "\n".join([
        f"# SmolLM2-135M-Instruct: dense → pruned → recovered ({m['cpu_cores']}-core CPU, {m['torch_threads']} "
        f"torch thread(s) a worker, {platform.machine()})", "",
        f"From `{Path(s.model).name}` (GGUF Q4_1, dequantized by `spp` to float32). Pruning: Wanda, SparseGPT and ALPS "
        f"(spp's defaults), calibrated on {s.calib_nsamples} windows of {s.calib_seqlen} tokens of "
        f"`{Path(s.calib).name}`."
        f" WikiText-2 perplexity: protocol text, seqlen {s.eval_seqlen}, first {s.eval_windows} windows. Recovery of "
        f"the best-pruned base (lowest WikiText-2 perplexity before recovery) with every recipe on the same "
        f"{s.steps * s.batch_size * s.seqlen:,} tokens of C4 (documents 200–999 less the last {s.val_share:.0%}, "
        f"{s.steps} steps of {s.batch_size} × {s.seqlen}; block-wise: the same count of windows, its default epochs), "
        "each at the best of its rates on the validation slice (that last share), never on WikiText-2. Zero-shot: "
        f"lm-eval {m['libraries'].get('lm_eval')} on the local task copies, first {s.limit} items per task, 0-shot, "
        f"`acc` ± stderr; the mean over the tasks where dense is above chance by 2 stderr "
        f"({', '.join(summary['headline_tasks']) or 'dense not scored yet'}); Δ: paired differences with 95% "
        "intervals (`spp.eval.uncertainty`). CPU min: the cell's process CPU time, zero-shot included. Written by "
        "`python scripts/study.py --preset smollm2`.", "",
        *smollm2_tables(summary, tasks, report.get("sweeps") or {}),
        "## README headline block", "", smollm2_headline(report) if summary["headline"] else "(not measured yet)", "",
        f"Not run yet: {len(report['missing'])} cells" + (f" ({', '.join(report['missing'])})" if report["missing"]
                                                         else "") + ".", "",
        f"Report written {m['finished']}; the cells took {report['cell_minutes']:.0f} min in all; versions "
        f"{m['libraries']}.", ""])


def owl_markdown(report: dict, s, bench: list[dict] | None = None, machine: str = "unstated") -> str:
    """owl_ria.md: the bar's verdicts, perplexity after pruning per cell and seed, OWL's block sparsities, perplexity
    after recovery, and (with `bench`) OWL's timing against plain pruning."""
    from common import format_owl_table

    recs = list(report["records"].values())
    dense = next(r["rows"][0]["ppl"]["tinystories"] for r in recs if r["cell"]["method"] == "dense")
    pruned = [dict(label=owl_label(r["cell"]), seed=r["cell"]["seed"], ppl=r["rows"][0]["ppl"]["tinystories"],
                   achieved=r["prune"]["achieved_sparsity"], seconds=r["prune"]["seconds"], blocks=r["prune"]["blocks"],
                   owl=r["prune"]["owl"]) for r in recs if r["cell"]["method"] != "dense" and r["cell"]["adapter"] == "none"]
    recovered = [dict(label=owl_label(r["cell"]), adapter=r["cell"]["adapter"], seed=r["cell"]["seed"],
                      ppl=r["rows"][0]["ppl"]["tinystories"] if r["rows"] else float("nan"), lr=r["learning_rate"],
                      steps=r["train"].get("steps")) for r in recs if r["cell"]["adapter"] != "none"]
    by_label: dict[str, list[dict]] = {}
    for row in pruned:
        by_label.setdefault(row["label"], []).append(row)

    def mean(label: str, key: str) -> float:
        return statistics.fmean(r[key] for r in by_label[label])
    table = [["dense", f"{dense:.3f}", "–", "0%", "–"]] + [
        [label, f"{mean(label, 'ppl'):.2f}", ", ".join(f"{r['ppl']:.2f}" for r in rows),
         ", ".join(sorted({f"{r['achieved']:.4%}" for r in rows})), f"{mean(label, 'seconds'):.1f}"]
        for label, rows in by_label.items()]
    parts = ["# OWL and RIA on stories260K (issue 14's bar)",
             "Written by `python scripts/study.py --preset owl_ria` from its cells and `scripts/bench_prune.py --owl` "
             f"(`bench_owl.json`); nothing typed in by hand. Machine: {machine}; "
             f"{report['machine']['torch_threads']} torch thread(s). Timings on a loaded shared machine are upper "
             "bounds and noisy.",
             "## Perplexity after pruning (no recovery)",
             f"Model `{s.model}`; calibration {s.calib_nsamples} x {s.calib_seqlen} tokens of the first half of "
             f"`{s.text}` (cut at the first line break after the middle), seeds "
             f"{sorted({r['seed'] for r in pruned})} (the seed draws the calibration windows); perplexity on the first "
             f"{s.eval_windows} windows of {s.eval_seqlen} tokens of the second half (`spp eval`). OWL at the published "
             "M = 5, λ = 0.08, not tuned. Every cell ran through `spp prune`.",
             markdown_table(["cell", "PPL TinyStories (mean over seeds)", "per seed", "achieved sparsity",
                             "prune s (mean)"], table, "-r-rr")]
    if {"wanda 70%", "wanda + OWL 70%", "wanda 2:4", "ria 2:4"} <= set(by_label):
        parts[2:2] = ["## The bar", "\n".join(owl_verdicts(by_label, mean))]
        owl0 = min(by_label["wanda + OWL 70%"], key=lambda r: r["seed"])
        parts += ["## OWL's block sparsities (Wanda + OWL 70%, seed 0)", owl_note(owl0), markdown_table(
            ["block", "outlier share D_l", "requested s_l", "achieved"],
            [[name, f"{share:.4f}", f"{b['requested']:.4f}", f"{b['achieved']:.4f}"]
             for (name, b), share in zip(owl0["blocks"].items(), owl0["owl"]["outlier_share"])], "-rrr")]
    if recovered:
        groups: dict[tuple, list[dict]] = {}
        for r in recovered:
            groups.setdefault((r["label"], r["adapter"]), []).append(r)
        ppl_pruned = {(r["label"], r["seed"]): r["ppl"] for r in pruned}
        lines = [[label, adapter, f"{g[0]['lr']:g}", str(g[0]["steps"]),
                  f"{statistics.fmean(ppl_pruned[(label, r['seed'])] for r in g):.2f}",
                  f"{statistics.fmean(r['ppl'] for r in g):.2f}",
                  ", ".join(f"{r['ppl']:.2f}" for r in g) + f" (seeds {', '.join(str(r['seed']) for r in g)})"]
                 for (label, adapter), g in groups.items()]
        parts += ["## After recovery",
                  "Each pruned model trained with the bundled `configs/tinystories.yaml` as `spp train --config "
                  "tinystories.yaml --set adapter=KIND` runs it (the kind's learning rate from that file, "
                  + (f"{s.steps} steps" if s.steps else "one epoch over the first half in 128-token windows, 64 held out")
                  + "), merged with `spp merge`, perplexity as above. The calibration seed sets the mask; the training "
                  "seed is the file's (42). The file's default recipe, not the study's best recipe per cell (no "
                  "distillation, no rate sweep).",
                  markdown_table(["cell", "adapter", "lr", "steps", "PPL pruned (mean)",
                                  "PPL after recovery, merged (mean)", "per seed"], lines, "--rrrr-")]
    if bench:
        r0 = bench[0]
        runs = ", ".join(f"{r['impl']} {r['method']} {r['seconds']:.1f} s" for r in bench)
        parts += ["## Timing: OWL's statistics pass against plain pruning",
                  f"`scripts/bench_prune.py --owl`: random LLaMA, {r0['layers']} layers, {r0['params'] / 1e6:.0f}M "
                  f"parameters, {r0['nsamples']}x{r0['seqlen']} calibration tokens, {r0['device']}, {r0['threads']} "
                  "thread(s), spp with and without OWL alternating, best of 3 each. The issue expected under 1.6x.",
                  format_owl_table(bench) + f"\n\nEvery run, in the order they ran (alternating): {runs}."]
    return "\n\n".join(parts) + "\n"


def owl_verdicts(by_label: dict[str, list[dict]], mean) -> list[str]:
    """The bar's three checks, each stated with the numbers that decide it."""
    uniform, owl = mean("wanda 70%", "ppl"), mean("wanda + OWL 70%", "ppl")
    achieved = [r["achieved"] for r in by_label["wanda + OWL 70%"]]
    off = max(abs(a - 0.7) for a in achieved) * 100
    wanda24, ria24 = mean("wanda 2:4", "ppl"), mean("ria 2:4", "ppl")
    per_seed = [(a["ppl"], b["ppl"]) for a in by_label["wanda + OWL 70%"] for b in by_label["wanda 70%"]
                if b["seed"] == a["seed"]]
    return [
        f"- Wanda + OWL 70% below uniform Wanda 70%: **{'met' if owl < uniform else 'not met'}** — mean perplexity "
        f"{owl:.2f} vs {uniform:.2f} ({sum(o < u for o, u in per_seed)} of {len(per_seed)} seeds lower).",
        f"- Wanda + OWL achieved overall sparsity within 0.5 pp of 70%: **{'met' if off <= 0.5 else 'not met'}** — "
        f"{min(achieved):.4%} to {max(achieved):.4%} ({off:.2f} pp below). Uniform Wanda at 70% itself achieves "
        f"{mean('wanda 70%', 'achieved'):.4%}: Wanda prunes floor(in·s) per row, and this model's rows have 64 "
        "or 172 inputs (floor(64·0.7)/64 = 68.75%).",
        f"- RIA 2:4 no worse than Wanda 2:4: **{'met' if ria24 <= wanda24 else 'not met'}** — mean perplexity "
        f"{ria24:.2f} vs {wanda24:.2f}.",
    ]


def owl_note(row: dict, s: float = 0.7, lmbda: float = 0.08) -> str:
    """What OWL's requested block sparsities show about their range (the published formula allows s ± 2λ(1 − 1/L))."""
    requested = [b["requested"] for b in row["blocks"].values()]
    worst = max(requested, key=lambda x: abs(x - s))
    beyond = abs(worst - s) > lmbda
    return (f"The ratios span {max(requested) - min(requested):.4f} (2λ = {2 * lmbda:g}); the farthest from s is "
            f"{worst:.4f}, {'outside' if beyond else 'inside'} s ± λ = [{s - lmbda:g}, {s + lmbda:g}]. The published "
            "formula bounds s_l by s ± 2λ(1 − 1/L), not by the paper's s ± λ (docs/commands.md, OWL). Requested values "
            f"average to {s:g} weighted by block size; achieved values are lower by the per-row floor.")
