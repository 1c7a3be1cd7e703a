"""`spp run`: the whole prune → train → merge → eval chain from one file, skipping what is done.

`run_pipeline(path)` reads a `PipelineConfig`, plans every stage of every sweep setting
(and checks every stage's config, folder names and the --from/--until range before
any work), then runs the stages in order, each through its own `run_<stage>` entry,
writing the layout

    RUN/dense/eval/                         the dense model, evaluated
    RUN/<setting>/prune/                    `spp prune` output (weights + spp/masks.safetensors)
    RUN/<setting>/train/                    `spp train` output (the SPP adapter)
    RUN/<setting>/merged/                   `spp merge` output (a plain HF model, as sparse as prune/)
    RUN/<setting>/eval/{pruned,merged}/     `spp eval` of the pruned and of the merged model
    RUN/report.md, RUN/report.json

A stage is skipped when its folder holds a manifest whose settings (bar the output
path and overwrite/resume flags) hash to the same sha256 as now, whose input files
still have the recorded sha256, whose output files are all present, and which is
newer than the manifests of the stages it reads. Anything else re-runs the stage, and
so every stage after it. An interrupted training run resumes from its last
checkpoint, an interrupted prune from its last finished block. This module does no
math and reads no numbers: `spp.report` builds the report from the stages' manifests
and results files and the saved weights.
"""

from __future__ import annotations

import dataclasses
import gc
import shlex
from pathlib import Path
from typing import Callable

from spp.config import (EvalConfig, MergeConfig, PipelineConfig, PruneConfig, TrainConfig, find_config, flag_names,
                        merge_into, nearest, read_train_config, read_yaml, to_dict)
from spp.errors import SppError, SppInterrupted
from spp.eval import run_eval
from spp.io.checkpoint import MANIFEST_FILE, RESOLVED_CONFIG_FILE, partial_path, sha256_file, write_json
from spp.io.manifest import read_manifest, settings_sha256
from spp.io.trainer_state import checkpoint_dirs
from spp.merge import run_merge
from spp.prune import run_prune
from spp.report import REPORT_JSON, REPORT_MD, PipelineReport, Step, StepResult, build_report, report_json
from spp.train import RESUMABLE_CHANGES, run_train
from spp.typed import coerce, field_defaults

STAGES = ("prune", "train", "merge", "eval")
# Keys that name where a stage writes or how it treats an existing output; they do not change its numbers.
VOLATILE_KEYS = {"output", "output_dir", "overwrite", "resume"}
# Keys the run sets itself, per section: a pipeline file may not set them.
RUN_SET_KEYS = {"prune": {"model", "output", "overwrite", "resume"},
                "train": {"base_model", "output_dir", "overwrite", "resume"},
                "eval": {"model", "adapter", "output", "overwrite"}}


# --------------------------------------------------------------------------- plan


def _absolute_if_local(value: str | None) -> str | None:
    """A path that exists relative to the working directory becomes absolute (so records do not depend on cwd)."""
    if not value:
        return value
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def _absolute_paths(values: dict, keys: tuple[str, ...]) -> dict:
    """`values` with each of `keys` it has made absolute where it names a local path (`_absolute_if_local`)."""
    return values | {key: _absolute_if_local(values[key]) for key in keys if key in values}


def _ppl_entry(spec: str) -> str:
    """A `--ppl` entry with its file made absolute where it is local (`_ppl_file`: PATH, or NAME:PATH's PATH)."""
    file = _ppl_file(spec)
    return _absolute_if_local(spec) if file == spec else f"{spec.partition(':')[0]}:{_absolute_if_local(file)}"


def _check_section(section: str, values: dict) -> None:
    for key in values:
        if key in RUN_SET_KEYS.get(section, ()):
            raise SppError(f"{section}.{key} is set by `spp run` itself (from `model:` and the run layout); remove it")


def setting_name(cfg: PruneConfig) -> str:
    """The folder name of a sweep setting: `wanda-2of4`, `sparsegpt-50pct`, `wanda-owl-70pct`."""
    if cfg.n_m is not None:
        return f"{cfg.method}-{cfg.n_m[0]}of{cfg.n_m[1]}"
    return f"{cfg.method}{'-owl' if cfg.owl else ''}-{cfg.sparsity * 100:g}pct"


def _train_config(cfg: PipelineConfig, source: str, base: Path, output: Path) -> tuple[TrainConfig, dict, str | None]:
    """The TrainConfig of one setting; also the inline keys and the named config file (for the command)."""
    inline = dict(cfg.train)
    config_name = inline.pop("config", None)
    _check_section("train", inline)
    inline = _absolute_paths(inline, ("data_path", "teacher", "calib"))
    layers = []
    if config_name is not None:
        path, values = read_train_config(config_name)
        layers.append((str(path), values))
    values = {k: v for _, layer in layers for k, v in layer.items()} | inline
    weights = [coerce(values.get(k), float) for k in ("kd_weight", "squarehead_weight")]  # `1e-3` is a YAML string
    teaching = any(isinstance(w, (int, float)) and w > 0 for w in weights) or values.get("objective") == "blockwise"
    if not values.get("teacher") and teaching:
        inline["teacher"] = _absolute_if_local(cfg.model)  # distillation on: the teacher is the model that was pruned
    layers += [(f"{source}: train", inline), ("spp run", {"base_model": str(base), "output_dir": str(output)})]
    train_cfg = merge_into(TrainConfig, layers)
    if not train_cfg.data_path:
        raise SppError(f"{source}: train: has no data_path (an Alpaca .json/.jsonl, a .txt or a hub dataset name)")
    return train_cfg, inline, config_name


def plan(cfg: PipelineConfig, source: str = "pipeline") -> list[Step]:
    """Every step of the run, in execution order, with its config built and checked.

    Raises:
        SppError: an unknown or run-owned key in a section, a bad value, or two steps that
            would write into the same folder.
    """
    run = Path(cfg.output).expanduser().resolve()
    model = _absolute_if_local(cfg.model)
    _check_section("prune", cfg.prune)
    _check_section("eval", cfg.eval)
    eval_values = _absolute_paths(cfg.eval, ("task_data",))
    if "ppl" in eval_values and isinstance(eval_values["ppl"], list):
        eval_values["ppl"] = [_ppl_entry(str(p)) for p in eval_values["ppl"]]

    def eval_step(setting: str, label: str, folder: Path, model_dir: str, upstream: list[Path]) -> Step:
        ecfg = merge_into(EvalConfig, [(f"{source}: eval", eval_values),
                                       ("spp run", {"model": model_dir, "output": str(folder)})])
        return Step("eval", setting, label, folder, ecfg, upstream, eval_command(ecfg))

    if Path(model).is_dir():
        model_files = sorted(p for p in Path(model).iterdir() if p.is_file())
    else:  # a .gguf file, or a hub id (no local files)
        model_files = [Path(model)] if Path(model).is_file() else []
    prunes, trains, merges, evals = [], [], [], []
    evals.append(eval_step("dense", "dense/eval", run / "dense" / "eval", model, model_files))
    owners: dict[str, int] = {}
    for i, entry in enumerate(cfg.sweep, 1):
        entry = dict(entry)
        name = entry.pop("name", None)
        _check_section("prune", entry)
        values = _absolute_paths({**cfg.prune, **entry}, ("calib",))
        placeholder = str(run / "_")
        pcfg = merge_into(PruneConfig, [(f"{source}: prune + sweep entry {i}", values),
                                        ("spp run", {"model": model, "output": placeholder})])
        name = str(name) if name is not None else setting_name(pcfg)
        if name in ("dense", "") or "/" in name or name.startswith("."):
            raise SppError(f"sweep entry {i}: {name!r} cannot be a setting folder name (use letters, digits, - and _)")
        if name in owners:
            raise SppError(f"sweep entries {owners[name]} and {i} would both write into {run / name}; "
                           f"give one of them a distinct `name:`")
        owners[name] = i
        folder = run / name
        pcfg = dataclasses.replace(pcfg, output=str(folder / "prune"))
        prunes.append(Step("prune", name, f"{name}/prune", folder / "prune", pcfg, [], prune_command(pcfg)))
        tcfg, inline, config_name = _train_config(cfg, source, folder / "prune", folder / "train")
        trains.append(Step("train", name, f"{name}/train", folder / "train", tcfg, [folder / "prune" / MANIFEST_FILE],
                           train_command(tcfg, inline, config_name)))
        mcfg = MergeConfig(model=str(folder / "prune"), adapter=str(folder / "train"), output=str(folder / "merged"))
        merges.append(Step("merge", name, f"{name}/merged", folder / "merged", mcfg,
                           [folder / "prune" / MANIFEST_FILE, folder / "train" / MANIFEST_FILE], merge_command(mcfg)))
        evals.append(eval_step(name, f"{name}/eval/pruned", folder / "eval" / "pruned", str(folder / "prune"),
                               [folder / "prune" / MANIFEST_FILE]))
        evals.append(eval_step(name, f"{name}/eval/merged", folder / "eval" / "merged", str(folder / "merged"),
                               [folder / "merged" / MANIFEST_FILE]))
    return prunes + trains + merges + evals


def run_inputs(cfg: PipelineConfig, steps: list[Step], path: Path) -> list[tuple[str, str]]:
    """(what, path or name) of every input the run reads: the model, the pipeline file, each stage's calibration
    text, training data, teacher, perplexity files and task data; each once, in run order."""
    inputs = [("model:", cfg.model), ("the pipeline file", str(path))]
    for step in steps:
        c = step.config
        if step.stage == "prune":
            inputs.append(("prune calib:", c.calib))
        elif step.stage == "train":
            inputs += [("train data_path:", c.data_path), ("train teacher:", c.teacher), ("train calib:", c.calib)]
        elif step.stage == "eval":
            inputs += [("eval ppl:", _ppl_file(spec)) for spec in c.ppl]
            inputs.append(("eval task_data:", c.task_data))
    return [(what, value) for what, value in dict.fromkeys(inputs) if value]


def _ppl_file(spec: str) -> str:
    """The file (or set name) of a `--ppl` entry: PATH, NAME:PATH or NAME, as `spp.eval.perplexity.ppl_text` reads it."""
    name, sep, rest = spec.partition(":")
    return rest if sep and rest and not Path(spec).exists() else spec


def check_run_inputs(cfg: PipelineConfig, steps: list[Step], path: Path) -> None:
    """Before any stage runs: refuse a local input that does not exist (a value written as a path: `spp.data.
    looks_like_path`; a name such as `c4` or a hub id is left to its stage), and a stage folder that is, contains or
    lies inside one of the run's inputs (symlinks resolved). Unlike `spp prune --output MODEL --overwrite`, a run
    never replaces its model in place.

    Raises:
        SppError: naming the input (`what: PATH does not exist`), or the stage folder and the input
            (`spp.io.checkpoint.check_not_an_input`).
    """
    from spp.data import looks_like_path
    from spp.io.checkpoint import check_not_an_input

    inputs = run_inputs(cfg, steps, path)
    for what, value in inputs:
        if looks_like_path(value) and not Path(value).expanduser().exists():
            raise SppError(f"{what} {value} does not exist")
    for step in steps:
        check_not_an_input(step.folder, inputs, flag=f"the {step.label} folder")


def stage_range(from_stage: str | None, until_stage: str | None) -> tuple[str, ...]:
    """The stages between --from and --until, inclusive.

    Raises:
        SppError: an unknown stage name, or --from after --until.
    """
    for flag, value in (("--from", from_stage), ("--until", until_stage)):
        if value is not None and value not in STAGES:
            raise SppError(f"{flag} {value!r} is not a stage{nearest(value, STAGES)}; stages: {', '.join(STAGES)}")
    first = STAGES.index(from_stage) if from_stage else 0
    last = STAGES.index(until_stage) if until_stage else len(STAGES) - 1
    if first > last:
        raise SppError(f"--from {from_stage} comes after --until {until_stage}")
    return STAGES[first : last + 1]


# --------------------------------------------------------------------------- reproducing commands


def _flags(cfg, defaults, command: str, written: tuple[str, ...]) -> list[str]:
    """`--key value`, in field order, for every key of `cfg` but the `written` ones that differs from `defaults`;
    `--set key=value` for a key without a flag (`spp prune` takes `--set`).

    Raises:
        SppError: such a key has no flag and the command takes no `--set`.
    """
    flags = flag_names(type(cfg))
    out = []
    for key in (f.name for f in dataclasses.fields(cfg) if f.name not in written):
        value = getattr(cfg, key)
        if key in VOLATILE_KEYS or value == getattr(defaults, key, object()) or value is None:
            continue
        if key not in flags and command == "prune":
            out += ["--set", f"{key}={_yaml_scalar(value)}"]
            continue
        if key not in flags:
            raise SppError(f"{command}: {key}={value!r} cannot be given on the `spp {command}` command line")
        flag = flags[key]
        if isinstance(value, bool):  # a default-on switch is turned off by its --no- form (--no-dsnot-guard)
            out.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            out += [flag, ",".join(str(v) for v in value)]
        else:
            out += [flag, str(value)]
    return out


def _join(words: list[str]) -> str:
    return " ".join(shlex.quote(w) for w in words)


def prune_command(cfg: PruneConfig) -> str:
    """The `spp prune` command that makes this step's output alone."""
    defaults = PruneConfig(model=cfg.model, output=cfg.output, pattern=cfg.pattern)
    words = ["spp", "prune", "--model", cfg.model, "--output", cfg.output, "--method", cfg.method, "--pattern", cfg.pattern]
    if cfg.n_m is None:
        words += ["--sparsity", f"{cfg.sparsity:g}"]
    for key in ("targets", "ignore"):
        if getattr(cfg, key) != getattr(defaults, key):
            words += [w for p in getattr(cfg, key) for w in (f"--{key}", p)]
    if cfg.sparsity_overrides:
        words += ["--set", "sparsity_overrides=" + _yaml_scalar(cfg.sparsity_overrides)]
    # targets and ignore are repeated flags and sparsity_overrides a --set mapping, not `--flag a,b`
    written = ("model", "output", "method", "pattern", "sparsity", "targets", "ignore", "sparsity_overrides")
    return _join(words + _flags(cfg, defaults, "prune", written))


def train_command(cfg: TrainConfig, inline: dict, config_name: str | None) -> str:
    """`spp train` with the named config (if any), the paths, and `--set` for each inline key."""
    words = ["spp", "train", "--config", config_name or str(Path(cfg.output_dir) / RESOLVED_CONFIG_FILE)]
    words += ["--model", cfg.base_model, "--data", cfg.data_path, "--output", cfg.output_dir]
    if config_name:
        for key, value in inline.items():
            if key != "data_path":
                words += ["--set", f"{key}={_yaml_scalar(value)}"]
    return _join(words)


def _yaml_scalar(value) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def merge_command(cfg) -> str:
    return _join(["spp", "merge", "--model", cfg.model, "--adapter", cfg.adapter, "--output", cfg.output])


def eval_command(cfg: EvalConfig) -> str:
    defaults = EvalConfig(model=cfg.model, ppl=cfg.ppl, tasks=cfg.tasks)
    words = ["spp", "eval", "--model", cfg.model]
    words += ["--ppl", ",".join(cfg.ppl)] if cfg.ppl else []
    words += ["--tasks", ",".join(cfg.tasks)] if cfg.tasks else []
    return _join(words + _flags(cfg, defaults, "eval", ("model", "ppl", "tasks")) + ["--output", cfg.output])


# --------------------------------------------------------------------------- up to date?


def comparable_settings(settings: dict) -> dict:
    """A stage's settings without the keys that only say where and how it writes."""
    return {k: v for k, v in settings.items() if k not in VOLATILE_KEYS}


NO_OUTPUT = "no output yet"  # the stale reason of a step that never ran; `spp run` then says just "running"


def stale_reason(step: Step) -> str | None:
    """Why `step` must run, or None when its folder is complete and made from the same inputs.

    Compares: the manifest's settings sha256 (volatile keys dropped) with the step's,
    the recorded sha256 of every input file with the file now, the recorded outputs with
    the folder, and the manifest's mtime with its upstream files' (a newer upstream means
    it was made from something older).
    """
    manifest_path = step.folder / MANIFEST_FILE
    if not manifest_path.is_file():
        return NO_OUTPUT if not step.folder.exists() else f"{step.folder} has no {MANIFEST_FILE}"
    try:
        manifest = read_manifest(step.folder)
    except SppError as exc:
        return str(exc)
    if manifest.stage != step.stage:
        return f"{step.folder} holds a {manifest.stage} output, not {step.stage}"
    # A setting added to spp after the folder was made was at its default then, as in a --resume of train.
    recorded = comparable_settings({**field_defaults(step.config), **manifest.settings})
    now = comparable_settings(to_dict(step.config))  # what the step's stage would record in its manifest
    if settings_sha256(recorded) != settings_sha256(now):
        changed = sorted(k for k in recorded.keys() | now.keys() if recorded.get(k) != now.get(k))
        return f"settings changed ({', '.join(changed)})"
    for path, digest in manifest.inputs.items():
        if digest == "hub":
            continue
        if not Path(path).is_file():
            return f"input {path} is gone"
        if sha256_file(Path(path)) != digest:
            return f"input {path} changed"
    for rel in manifest.outputs:
        if not (step.folder / rel).is_file():
            return f"{step.folder / rel} is missing"
    mtime = manifest_path.stat().st_mtime_ns
    for up in step.upstream:
        if up.exists() and up.stat().st_mtime_ns > mtime:
            return f"{up} is newer"
    return None


def resumable_train(step: Step) -> bool:
    """True when `train.partial/` holds a checkpoint made with the same settings (so `resume` continues it)."""
    partial = partial_path(step.folder)
    if not partial.is_dir() or not checkpoint_dirs(partial) or not (partial / RESOLVED_CONFIG_FILE).is_file():
        return False
    saved, now = read_yaml(partial / RESOLVED_CONFIG_FILE), to_dict(step.config)
    return all(saved.get(k) == now.get(k) for k in saved.keys() | now.keys() if k not in RESUMABLE_CHANGES)


# --------------------------------------------------------------------------- run


def reset_peak_memory() -> None:
    """Reset this process's peak RSS (Linux: /proc/self/clear_refs) and CUDA peak, so each stage reports its own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def resumable_prune(step: Step) -> bool:
    """True when `prune.partial/` holds the per-block progress of an interrupted prune."""
    from spp.io.progress import progress_dir

    return progress_dir(partial_path(step.folder)).is_dir()


def run_step(step: Step, resume: bool, log: Callable[[str], None] = print) -> bool:
    """Run one step's stage entry with its output replaced (or, for prune and train, resumed).

    Returns:
        Whether it resumed: False when it ran from the start, also after its --resume was refused.
    """
    run = {"prune": run_prune, "train": run_train, "merge": run_merge, "eval": run_eval}[step.stage]
    try:
        run(dataclasses.replace(step.config, overwrite=True, **({"resume": True} if resume else {})))
        return resume
    except SppError as exc:
        if not (resume and str(exc).startswith("--resume:")):
            raise
        # e.g. the calibration text changed, or another torch thread count (spp.io.conditions)
        log(f"{step.label}: cannot resume ({exc}); starting over")
        run(dataclasses.replace(step.config, overwrite=True))
        return False


def run_pipeline(path: Path, from_stage: str | None = None, until_stage: str | None = None, force: bool = False,
                 log: Callable[[str], None] = print) -> PipelineReport:
    """Run (or bring up to date) every stage of the pipeline file `path`, then write the report.

    Args:
        path: the pipeline YAML.
        from_stage, until_stage: run only the stages in this range; stages before it must be up to date.
        force: re-run every stage in the range even when it is up to date.
        log: where progress lines go.

    Raises:
        SppError: any bad input (before any stage runs), or a stage's own error.
    """
    path = find_config(str(path), kind="pipeline")  # a file, or a pipeline bundled with spp (pipeline_stories.yaml)
    cfg = merge_into(PipelineConfig, [(str(path), read_yaml(path))])  # unknown top-level keys are errors
    in_range = stage_range(from_stage, until_stage)
    steps = plan(cfg, source=str(path))
    check_run_inputs(cfg, steps, path)
    for step in steps:  # everything before the range must already be there
        if STAGES.index(step.stage) < STAGES.index(in_range[0]):
            reason = stale_reason(step)
            if reason:
                raise SppError(f"--from {in_range[0]}: {step.label} is not up to date ({reason}); run without --from")
    run = Path(cfg.output).expanduser().resolve()
    from spp.io.checkpoint import check_output_dir
    from spp.io.reader import read_checkpoint

    check_output_dir(run, overwrite=True, flag="output:")  # a file there, or an unwritable parent
    read_checkpoint(cfg.model)  # every stage starts from it: refuse a damaged one before any work
    run.mkdir(parents=True, exist_ok=True)
    results = []
    for step in steps:
        if step.stage not in in_range:
            results.append(_result(step, "skipped (before --from)" if STAGES.index(step.stage) < STAGES.index(in_range[0])
                                   else "not run (after --until)", None))
            continue
        reason = "--force" if force else stale_reason(step)
        if reason is None:
            log(f"{step.label}: skipped (up to date)")
            results.append(_result(step, "skipped (up to date)", None))
            continue
        resume = not force and ((step.stage == "train" and resumable_train(step)) or
                                (step.stage == "prune" and resumable_prune(step)))
        reason = "interrupted" if resume else reason
        why = "" if reason == NO_OUTPUT else f" ({reason})"  # why a step runs again; a first run needs no reason
        log(f"{step.label}: {'resuming where it stopped' if resume else 'running'}{why}")
        reset_peak_memory()
        try:
            resumed = run_step(step, resume, log)
        except SppInterrupted as exc:  # the stage's own advice names its command; here the run file continues it
            raise SppInterrupted(f"{step.label}: {exc.kept}", f"run `spp run {path}` again to continue where it "
                                 "stopped") from None
        gc.collect()
        results.append(_result(step, "resumed" if resumed else "ran", reason))
    report = build_report(run, steps, results)
    write_json(run / REPORT_JSON, report_json(report))
    (run / REPORT_MD).write_text(report.markdown)
    return report


def _result(step: Step, status: str, reason: str | None) -> StepResult:
    wall, memory = None, {}
    if (step.folder / MANIFEST_FILE).is_file():
        manifest = read_manifest(step.folder)
        wall, memory = manifest.wall_time_s, manifest.peak_memory
    return StepResult(step.label, step.stage, status, reason, wall, memory, step.command)
