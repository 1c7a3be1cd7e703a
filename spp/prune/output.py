"""What `spp prune` writes: the pruned model, its mask file (keyed by saved tensor name), the resolved config and
the manifest with per-module and per-block records; and the report `spp prune` prints.

`write_output` takes what `spp.prune.prune_model` changed (`PrunedModel`) and writes it into the partial
directory `run_prune` renames when complete. A fused mixture-of-experts weight's (E, out, in) mask becomes one
entry per saved per-expert tensor (`Checkpoint.split`). Nothing here prunes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from spp.config import to_dict, write_yaml
from spp.prune.experts import module_records
from spp.sparsity import block_name, block_tallies, tally


@dataclass
class PruneReport:
    """What `run_prune` did: sparsity per block (name, numel, pruned) and in total."""

    output: Path
    method: str
    pattern: str
    requested_sparsity: float
    blocks: list[tuple[str, int, int]]
    total_sparsity: float
    kept_zero: int
    wall_time_s: float
    dampening_retries: list[dict] = field(default_factory=list)
    _model: nn.Module | None = field(default=None, repr=False)  # the pruned model, when still in memory
    requested_blocks: dict[str, float] = field(default_factory=dict)  # block -> requested sparsity (its weights' mean)
    dense_layers: list[str] = field(default_factory=list)  # decoder-block linears left dense (--targets/--ignore)
    expert_fallbacks: int = 0  # saved expert tensors pruned by magnitude: too few routed tokens (expert_min_tokens)
    # block -> the mean relative reconstruction error of its layers, where H was held (SparseGPT, ALPS, --record-error)
    block_errors: dict[str, float] = field(default_factory=dict)
    mean_error: float | None = None  # over every layer with an error
    refine: dict | None = None  # --refine's totals: method, guard, swaps, layers changed, error before/after

    @property
    def model(self) -> nn.Module:
        """The pruned model: the one pruned in memory, or (streamed) loaded from the output on first use."""
        if self._model is None:
            from spp.models import load_model

            self._model = load_model(str(self.output))
        return self._model



def write_output(cfg, checked, model, pruned, start, tmp: Path) -> PruneReport:
    """Save the pruned model (unless `model` is None: already written), masks (keyed by saved tensor name, in stored
    shape), config and manifest into `tmp` (the partial directory, renamed by the caller)."""
    from spp.io.checkpoint import RESOLVED_CONFIG_FILE, MASK_FILE, save_model
    from spp.io.reader import read_checkpoint
    from spp.io.manifest import Manifest, peak_memory_bytes, write_manifest
    from spp.io.maskfile import save_packed_masks

    keep_by_param, layouts, module_stats, retries = pruned.masks, pruned.layouts, pruned.module_stats, pruned.retries
    plan = pruned.plan
    requested = {plan.params[name]: sparsity for name, sparsity in plan.sparsity.items()}
    block_details = _block_details(module_stats, requested)
    blocks = [(name, row["numel"], row["pruned"]) for name, row in block_details.items()]
    totals = tally(module_stats.values())
    kept_zero = totals["kept_zero"]
    if model is not None:  # a streamed prune has written the model already (`spp.prune.save_streamed_output`)
        save_model(model, checked.tokenizer, tmp, cfg.max_shard_size)
    written = read_checkpoint(tmp)  # the mask file and manifest name tensors as they were just saved
    stored, stored_layouts = {}, {}
    for param, packed in keep_by_param.items():  # (E?, out, ceil(in / 8)): a fused weight splits along E and out
        for name, piece in written.split(param, packed).items():  # a fused expert weight: one per saved tensor
            stored[name], stored_layouts[name] = piece, layouts[param]
    save_packed_masks(tmp / MASK_FILE, stored, {name: written.tensors[name].shape for name in stored}, stored_layouts)
    modules = module_records(written, module_stats, requested, layouts)
    errors = [(param, r["reconstruction_error"]) for param, s in module_stats.items()  # an expert weight: per piece
              for r in s.get("pieces", [s]) if "reconstruction_error" in r]
    block_errors = {b: sum(e) / len(e) for b, e in _by_block(errors).items()}
    for name, error in block_errors.items():
        block_details[name]["reconstruction_error"] = error
    mean_error = sum(e for _, e in errors) / len(errors) if errors else None
    refine = _refine_totals(cfg, modules)
    fallbacks = 0 if cfg.method == "magnitude" else sum(m.get("method") == "magnitude" for m in modules.values())
    write_yaml(tmp / RESOLVED_CONFIG_FILE, cfg)
    details = {
        "method": cfg.method,
        "pattern": cfg.pattern,
        "requested_sparsity": cfg.sparsity,
        "achieved_sparsity": totals["sparsity"],
        "kept_zero": kept_zero,
        "blocks": block_details,
        "owl": pruned.owl,
        "dense_layers": [name for full in plan.dense for name in written.saved_tensors_of(plan.params[full])],
        "modules": modules,
        "expert_fallbacks": fallbacks,  # saved expert tensors pruned by magnitude (< expert_min_tokens routed tokens)
        "calibration": None if checked.windows is None else {
            "source": cfg.calib, "nsamples": cfg.nsamples, "seqlen": checked.seqlen, "seed": cfg.seed,
        },
        "dampening_retries": retries,
        "reconstruction_error": mean_error,  # the mean over layers of modules.*.reconstruction_error (None: no H held)
        "refine": refine,
        "source": checked.checkpoint.source,  # a GGUF file's record: the weights pruned were dequantized from it
    }
    wall = time.perf_counter() - start
    write_manifest(tmp, Manifest(stage="prune", settings=to_dict(cfg), inputs=checked.inputs,  # hashed at the start
                                 conditions=checked.conditions,
                                 details=details, wall_time_s=wall, peak_memory=peak_memory_bytes()))
    return PruneReport(output=Path(cfg.output), method=cfg.method, pattern=cfg.pattern,
                       requested_sparsity=cfg.sparsity, blocks=blocks, total_sparsity=totals["sparsity"],
                       kept_zero=kept_zero, wall_time_s=time.perf_counter() - start, dampening_retries=retries,
                       _model=model, requested_blocks={b: d["requested"] for b, d in block_details.items()},
                       dense_layers=list(plan.dense), expert_fallbacks=fallbacks, block_errors=block_errors,
                       mean_error=mean_error, refine=refine)


def _by_block(values: list[tuple[str, float]]) -> dict[str, list[float]]:
    """(parameter name, value) pairs grouped by decoder block (`spp.sparsity.block_name`), in order."""
    out: dict[str, list[float]] = {}
    for name, value in values:
        out.setdefault(block_name(name), []).append(value)
    return out


def _refine_totals(cfg, modules: dict[str, dict]) -> dict | None:
    """The manifest's `refine`: the refinement, its guard, and over every refined layer the swaps, the layers it
    changed and the mean errors before and after (expected |ε|; relative reconstruction error where H was held)."""
    if cfg.refine == "none":
        return None
    records = [m for m in modules.values() if "refine" in m]
    out = {"method": cfg.refine, "guard": cfg.dsnot_guard, "layers": len(records),
           "swaps": sum(r["refine"]["swaps"] for r in records),
           "layers_changed": sum(r["refine"]["swaps"] > 0 for r in records)}
    pairs = {"expected_error": ("expected_error_before", "expected_error_after"),
             "reconstruction_error": ("reconstruction_error_before", None)}
    for key, (before, after) in pairs.items():
        rows = [r for r in records if before in r["refine"]]
        if rows:
            out[key + "_before"] = sum(r["refine"][before] for r in rows) / len(rows)
            out[key + "_after"] = sum((r["refine"][after] if after else r[key]) for r in rows) / len(rows)
    return out


def _block_details(module_stats: dict[str, dict], requested: dict[str, float]) -> dict[str, dict]:
    """Per block: its weights, pruned count, requested sparsity (the mean of its layers', weighted by size) and
    achieved sparsity; what the manifest records and `spp verify` and the pipeline report show."""
    with_requested = {name: {**s, "requested_pruned": requested[name] * s["numel"]} for name, s in module_stats.items()}
    table = block_tallies(with_requested, ("numel", "pruned", "requested_pruned"))
    return {b: {"requested": r["requested_pruned"] / r["numel"], "achieved": r["pruned"] / r["numel"],
                "numel": r["numel"], "pruned": r["pruned"]} for b, r in table.items()}


def input_hashes(model: str, checkpoint, calib: str | None) -> dict[str, str]:
    """sha256 of the local model directory's files (of the file, for a GGUF file) and of a local calibration file
    (hub ids are recorded as such). Computed once per run, before any weight is loaded: the manifest records it, and
    so does the progress, which `--resume` compares with it (`spp.io.progress.check_resumable`).

    Args:
        model: `--model` as given; `checkpoint` is what it resolved to (`spp.io.reader.Checkpoint`).
        calib: `--calib` when the run reads calibration data (`spp.prune.needs_calibration`), else None.
    """
    from spp.io.checkpoint import sha256_file

    out = {}
    model_dir = Path(model)
    if checkpoint.source:
        out[checkpoint.source["file"]] = checkpoint.source["sha256"]
    elif model_dir.is_dir():
        for path in sorted(p for p in model_dir.iterdir() if p.is_file()):
            out[str(path)] = sha256_file(path)
    else:
        out[model] = "hub"
    if calib is not None and Path(calib).is_file():
        out[str(calib)] = sha256_file(Path(calib))
    return out
