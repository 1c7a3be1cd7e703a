"""The `spp run` report: the numbers of a finished run, side by side, from what the stages left on disk.

Perplexities and zero-shot accuracies come from each eval folder's `results.json`;
sparsity is counted in the saved weights themselves (the masked tensors of the pruned
and of the merged model, which must agree); trainable parameters are the entries of
the saved adapter; wall time and peak memory come from each stage's manifest. This
module reads files and formats tables; it runs nothing. It also holds the two records `spp.pipeline`
hands it: `Step` (one planned stage) and `StepResult` (what happened to it).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from spp.io.checkpoint import (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, MANIFEST_FILE, RESULTS_FILE, mask_path,
                               read_json, safetensors_files, safetensors_keys)
from spp.io.text import markdown_table

REPORT_MD = "report.md"
REPORT_JSON = "report.json"
STDERR = "stderr"  # a row's "<task> acc stderr" key: shown as "acc ± stderr" in the results table


@dataclass
class Step:
    """One stage of one setting: where it writes, its config, and the files whose newer mtime makes it stale."""

    stage: str
    setting: str  # "dense" or the sweep setting's folder name
    label: str  # e.g. "wanda-2of4/prune", "dense/eval"
    folder: Path
    config: object
    upstream: list[Path] = field(default_factory=list)
    command: str = ""


@dataclass
class StepResult:
    """What happened to one step: `ran`, `resumed`, `skipped (up to date)`, or outside --from/--until."""

    label: str
    stage: str
    status: str
    reason: str | None
    wall_time_s: float | None
    peak_memory: dict
    command: str


@dataclass
class PipelineReport:
    """The run's results: one row per model, what each step did, and the report files."""

    output: Path
    steps: list[StepResult]
    rows: list[dict]
    settings: list[dict]
    markdown: str
    table: str  # just the results table (what `spp demo` prints)
    machine: str = ""  # the run conditions the stages' manifests record (spp.io.conditions), in words
    paired: str = ""  # the zero-shot paired differences (`paired_table`), "" without per-item results


def weight_sparsity(model_dir: Path, tensor_names: list[str]) -> float | None:
    """Fraction of exact zeros over the named tensors of a saved model, counted in the weights themselves."""
    from safetensors import safe_open

    if not model_dir.is_dir() or not tensor_names:
        return None
    wanted, zeros, total = set(tensor_names), 0, 0
    for shard in safetensors_files(model_dir):
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                if name in wanted:
                    tensor = f.get_tensor(name)
                    zeros += int((tensor == 0).sum())
                    total += tensor.numel()
                    wanted.discard(name)
    return zeros / total if total and not wanted else None


def adapter_parameter_count(train_dir: Path) -> int | None:
    """Number of trainable numbers in the saved adapter (every entry of its tensors, whatever the kind)."""
    path = train_dir / ADAPTER_WEIGHTS_FILE
    if not path.is_file():
        return None
    return sum(math.prod(shape) for _, shape in safetensors_keys(path).values())


def adapter_label(train_dir: Path) -> str:
    """The adapter's name for the table, from the `kind` its `adapter_config.json` records (SPP when absent)."""
    path = train_dir / ADAPTER_CONFIG_FILE
    kind = read_json(path, what="adapter config").get("kind", "spp") if path.is_file() else "spp"
    from spp.adapter import ADAPTERS

    return ADAPTERS[kind].label if kind in ADAPTERS else kind


def _eval_numbers(folder: Path) -> dict:
    """{"ppl <set> @<seqlen>": value, "<task> acc": value, "<task> acc stderr": value, ...} from an eval folder's
    results (empty if absent); the seqlen in the key keeps perplexities of different window lengths apart, as `spp
    eval` prints them."""
    results = _results(folder)
    out = {}
    for name, entry in (results.get("perplexity") or {}).items():
        out[f"ppl {Path(name).name if '/' in name else name} @{entry['seqlen']}"] = entry["ppl"]  # a file: its base name
    for name, task in ((results.get("zeroshot") or {}).get("tasks") or {}).items():
        for metric in ("acc", "acc_norm"):
            if metric in task:
                out[f"{name} {metric}"] = task[metric]
                if task.get(f"{metric}_stderr") is not None:
                    out[f"{name} {metric} {STDERR}"] = task[f"{metric}_stderr"]
    return out


def _results(folder: Path) -> dict:
    """An eval folder's results.json, {} if it has none."""
    return read_json(folder / RESULTS_FILE, what="results") if (folder / RESULTS_FILE).is_file() else {}


def paired_table(dense: Path, settings: list[str], run: Path) -> str:
    """Zero-shot, per setting: the paired differences (`spp.eval.paired_rows`) of its pruned and merged models from
    dense, and of merged from pruned, on the same items; each mean over the tasks where dense is above its baseline
    by 2 stderr. "" when no eval holds per-item results."""
    from spp.eval import paired_rows

    reference, body = _results(dense), []
    for name in settings:
        pruned, merged = (_results(run / name / "eval" / kind) for kind in ("pruned", "merged"))
        from_pruned = {row[0]: row[1] for row in paired_rows([pruned, merged], reference)}  # by task label
        body += [[name, *row, from_pruned.get(row[0], "—")] for row in paired_rows([reference, pruned, merged])]
    header = ["setting", "task", "pruned − dense", "merged − dense", "merged − pruned"]
    return (markdown_table(header, body, "llrrr") + "\n\nOn the same items, with 95% intervals (`spp.eval.uncertainty`); "
            "\"noise\": the interval holds 0.") if body else ""


def gap_recovered(dense: float, pruned: float, recovered: float) -> float | None:
    """(log p_pruned − log p_spp) / (log p_pruned − log p_dense): the share of the log-perplexity gap SPP closes."""
    gap = math.log(pruned) - math.log(dense)
    return (math.log(pruned) - math.log(recovered)) / gap if gap > 0 else None


def build_report(run: Path, steps: list[Step], results: list[StepResult]) -> PipelineReport:
    """Collect the numbers of a run into rows (dense, then pruned and SPP per setting) and Markdown."""
    by_label = {s.label: s for s in steps}
    dense_numbers = _eval_numbers(by_label["dense/eval"].folder)
    rows = [{"model": "dense", "setting": "dense", **dense_numbers}]
    settings = []
    for step in steps:
        if step.stage != "prune":
            continue
        name = step.setting
        masked = _mask_names(step.folder)
        pruned_numbers = _eval_numbers(run / name / "eval" / "pruned")
        merged_numbers = _eval_numbers(run / name / "eval" / "merged")
        before = weight_sparsity(step.folder, masked)
        after = weight_sparsity(run / name / "merged", masked)
        info = {
            "setting": name, "method": step.config.method, "pattern": step.config.pattern,
            "sparsity_before": before, "sparsity_after": after,
            "sparsity_equal": None if before is None or after is None else before == after,
            "trainable_params": adapter_parameter_count(run / name / "train"),
            "blocks": _prune_blocks(step.folder),
        }
        ppl_keys = [k for k in dense_numbers if k.startswith("ppl ")]
        for key in ppl_keys:
            if key in pruned_numbers and key in merged_numbers:
                info[f"recovered {key}"] = gap_recovered(dense_numbers[key], pruned_numbers[key], merged_numbers[key])
        settings.append(info)
        rows.append({"model": f"{name} pruned", "setting": name, "sparsity": before, **pruned_numbers})
        rows.append({"model": f"{name} + {adapter_label(run / name / 'train')} (merged)", "setting": name, "sparsity": after, **merged_numbers})
    first_prune = next(step for step in steps if step.stage == "prune")
    rows[0]["sparsity"] = weight_sparsity(Path(by_label["dense/eval"].config.model), _mask_names(first_prune.folder))
    table = results_table(rows, settings)
    paired = paired_table(by_label["dense/eval"].folder, [s["setting"] for s in settings], run)
    machine = conditions_line([step.folder for step in steps])
    markdown = "\n\n".join([f"# spp run report: {run}", "## Results", table,
                            *(["## Zero-shot: paired differences", paired] if paired else []),
                            "## Sparsity and trainable parameters", settings_table(settings),
                            "## Sparsity per block (requested, achieved)", block_table(settings),
                            "## Stages", stages_table(results),
                            "## Run conditions", f"The numbers repeat bit for bit only under the same run conditions "
                            f"(threads, device, dtype, processes, versions); these stages ran with: {machine}.",
                            "## Reproduce each stage alone", "```bash\n" + "\n".join(r.command for r in results) + "\n```"])
    return PipelineReport(output=run, steps=results, rows=rows, settings=settings, markdown=markdown + "\n", table=table,
                          machine=machine, paired=paired)


def _manifest(folder: Path) -> dict | None:
    """A stage folder's `spp_manifest.json` as JSON, or None when it has none."""
    path = Path(folder) / MANIFEST_FILE
    return read_json(path, what="manifest") if path.is_file() else None


def conditions_line(folders: list[Path]) -> str:
    """The distinct run conditions recorded in the manifests of `folders`, in words, joined by ` | `."""
    from spp.io.conditions import describe_conditions

    manifests = [m for m in map(_manifest, folders) if m is not None]
    lines = dict.fromkeys(describe_conditions(m.get("conditions") or {}) for m in manifests)  # distinct, in order
    return " | ".join(lines) or "not recorded"


def _mask_names(prune_dir: Path) -> list[str]:
    """The saved tensors a prune output's sparsity is counted over: every masked one, and those its manifest lists
    as left dense (--ignore, --targets), so pruning a subset of the layers is not reported as its own sparsity."""
    from spp.io.maskfile import load_masks

    path = mask_path(prune_dir)
    if not path.is_file():
        return []
    dense = ((_manifest(prune_dir) or {}).get("details") or {}).get("dense_layers") or []
    return sorted({*load_masks(path)[0], *dense})


def _fmt(value, kind: str = "num") -> str:
    if value is None:
        return "—"
    if kind == "pct":
        return f"{value:.2%}"
    if kind == "int":
        return f"{value:,}"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _with_stderr(row: dict, metric: str) -> str:
    err = row.get(f"{metric} {STDERR}")
    return _fmt(row.get(metric)) + ("" if err is None else f" ± {err:.4f}")


def results_table(rows: list[dict], settings: list[dict]) -> str:
    """Perplexities and zero-shot accuracies side by side: dense, then pruned and merged SPP per setting."""
    metrics = []
    for row in rows:
        metrics += [k for k in row if k not in ("model", "setting", "sparsity") and not k.endswith(f" {STDERR}")
                    and k not in metrics]
    first_ppl = next((m for m in metrics if m.startswith("ppl ")), None)
    recovered = {s["setting"]: s.get(f"recovered {first_ppl}") for s in settings}
    header = ["model", "sparsity", *metrics] + ([f"gap recovered ({first_ppl})"] if first_ppl else [])
    body = []
    for row in rows:
        cells = [row["model"], _fmt(row.get("sparsity"), "pct"), *(_with_stderr(row, m) for m in metrics)]
        if first_ppl:
            spp_row = row["model"].endswith("(merged)")
            cells.append(_fmt(recovered.get(row["setting"]), "pct") if spp_row else "")
        body.append(cells)
    return markdown_table(header, body)


def settings_table(settings: list[dict]) -> str:
    body = [[s["setting"], _fmt(s["sparsity_before"], "pct"), _fmt(s["sparsity_after"], "pct"),
             {True: "yes", False: "NO", None: "—"}[s["sparsity_equal"]], _fmt(s["trainable_params"], "int")] for s in settings]
    return markdown_table(["setting", "sparsity pruned", "sparsity merged", "equal", "trainable params"], body)


def _prune_blocks(prune_dir: Path) -> dict:
    """The prune manifest's per-block record ({block: {requested, achieved, numel, pruned}}), {} if it has none."""
    return ((_manifest(prune_dir) or {}).get("details") or {}).get("blocks") or {}


def block_table(settings: list[dict]) -> str:
    """One row per setting and decoder block: the sparsity asked of it (OWL, overrides) and the one reached."""
    body = [[s["setting"], block, _fmt(row["requested"], "pct"), _fmt(row["achieved"], "pct")]
            for s in settings for block, row in (s.get("blocks") or {}).items()]
    return markdown_table(["setting", "block", "requested", "achieved"], body) if body else "(not recorded)"


def stages_table(results: list[StepResult]) -> str:
    body = []
    for r in results:
        rss = r.peak_memory.get("host_rss")
        cuda = r.peak_memory.get("cuda_allocated")
        memory = "—" if rss is None else f"{rss / 2**20:,.0f} MiB" + (f" (GPU {cuda / 2**20:,.0f} MiB)" if cuda else "")
        body.append([r.label, r.status, "—" if r.wall_time_s is None else f"{r.wall_time_s:.1f}", memory])
    return markdown_table(["stage", "this run", "wall time (s)", "peak memory"], body)


def report_json(report: PipelineReport) -> dict:
    return {"output": str(report.output), "rows": report.rows, "settings": report.settings, "machine": report.machine,
            "steps": [asdict(s) for s in report.steps]}
