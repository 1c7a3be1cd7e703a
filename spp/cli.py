"""The `spp` command line: one short function per subcommand (parse flags -> config -> run_<stage> -> print).

Heavy imports (torch, transformers, lm-eval) happen inside the commands so that
`spp --help` stays fast. Every command runs inside `_reporting_errors`, which turns
an `SppError` into one `error: ...` line on stderr and exit code 1; any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import sys
import types
import typing
from pathlib import Path
from typing import Optional

import typer
import typer._click.exceptions
import typer.core
from typer import _click as click

from spp import __version__
from spp.config import (EvalConfig, ExportConfig, MergeConfig, PruneConfig, TrainConfig, flag_of, merge_into,
                        parse_set, read_train_config, read_yaml)
from spp.errors import SppError
from spp.quiet import quiet_output

class _OneLineUsageErrors(typer.core.TyperGroup):
    """click's usage errors (an unknown option, a missing or malformed value) as one `error: ...` line on stderr,
    exit code 2, like every other bad input; click itself prints the usage, a hint and the error on four lines."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:  # a bare `spp`: the help, as click prints it
            exc.show()
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            command = exc.ctx.command_path if getattr(exc, "ctx", None) is not None else "spp"
            print(f"error: {exc.format_message()} (see `{command} --help`)", file=sys.stderr)
            sys.exit(exc.exit_code)
        except typer.Abort:  # end of input at a prompt
            print("error: aborted", file=sys.stderr)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)  # a command's typer.Exit(code) comes back as its code


app = typer.Typer(
    cls=_OneLineUsageErrors,
    help="Prune LLMs (Wanda, SparseGPT, RIA, ALPS, magnitude; OWL layerwise; DSnoT), fine-tune them with SPP, merge, export and evaluate, keeping every zero.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: flags show no "<bool>" as if they took a value
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _reporting_errors(fn):
    """Run a command; an SppError becomes one line on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SppError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise typer.Exit(getattr(exc, "exit_code", 1)) from None
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            raise typer.Exit(130) from None

    return wrapper


@dataclasses.dataclass(frozen=True)
class ConfigFlags:
    """A command parameter's default standing for one option per flagged field of `cls` (`spp.config.option`), in
    field order; the command receives the options given, as one dict of field name -> value.

    With `layered` (a YAML file lies under the flags) an option left out is unset, so it does not override the file;
    otherwise it shows and takes the field's default, and a field without one is required unless named in `optional`.
    """

    cls: type
    layered: bool = False
    optional: tuple[str, ...] = ()

    def options(self) -> list[inspect.Parameter]:
        hints = typing.get_type_hints(self.cls)
        params = []
        for field in dataclasses.fields(self.cls):
            if "help" not in field.metadata:
                continue
            hint = hints[field.name]
            if isinstance(hint, types.UnionType):  # `int | None` -> int
                hint = next(t for t in typing.get_args(hint) if t is not type(None))
            if typing.get_origin(hint) is typing.Literal:
                hint = str
            flag = flag_of(field)
            if field.default is True and "/" not in flag:  # a default-on switch is turned off by its --no- form
                flag += "/--no-" + flag[2:]
            if self.layered or field.name in self.optional:
                default = None
            elif field.default is dataclasses.MISSING:
                default = None if field.default_factory is not dataclasses.MISSING else ...
            else:
                default = field.default
            option = typer.Option(default, flag, help=field.metadata["help"])
            params.append(inspect.Parameter(field.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=option,
                                            annotation=Optional[hint]))
        return params


def command(*args, **kwargs):
    """`app.command` with the error wrapper applied, and each `ConfigFlags` parameter expanded into its options."""

    def register(fn):
        params, groups = [], {}
        for param in inspect.signature(fn, eval_str=True).parameters.values():
            if isinstance(param.default, ConfigFlags):
                options = param.default.options()
                groups[param.name] = [option.name for option in options]
                params += options
            else:
                params.append(param)

        @functools.wraps(fn)
        def collect(**values):
            for name, keys in groups.items():
                values[name] = {key: value for key in keys if (value := values.pop(key)) is not None}
            return fn(**values)

        collect.__signature__ = inspect.Signature(params)
        return app.command(*args, **kwargs)(_reporting_errors(collect))

    return register


def _version(value: bool):
    if value:
        print(f"spp {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
):
    """spp: prune -> train -> merge -> eval, with every pruned zero kept."""


@command("env")
def env():
    """Print spp's version and git revision, Python, the OS, torch (with CUDA/MPS) and the versions of the libraries
    spp depends on, each checked against constraints.txt. Paste it into a bug report."""
    from rich.console import Console
    from rich.table import Table

    from spp.env import environment

    table = Table(show_header=False, box=None)
    for row in environment():
        table.add_row(*row)
    Console().print(table)


# --------------------------------------------------------------------------- prune / verify


def _sparsity_table(title: str, blocks: list[tuple[str, int, int]], total: float, requested: dict | None = None,
                    errors: dict | None = None, mean_error: float | None = None):
    """Per block: weights, pruned, achieved sparsity, the requested one when it varies (OWL, overrides), and the
    mean relative reconstruction error of its layers when recorded (total row: the mean over all layers)."""
    from rich.table import Table

    requested = requested if requested and len({round(v, 9) for v in requested.values()}) > 1 else None
    table = Table(title=title)
    table.add_column("block")
    table.add_column("weights", justify="right")
    table.add_column("pruned", justify="right")
    if requested:
        table.add_column("requested", justify="right")
    table.add_column("sparsity", justify="right")
    if errors:
        table.add_column("recon. error", justify="right")
    for name, numel, pruned in blocks:
        wanted = [f"{requested[name]:.2%}" if name in requested else "-"] if requested else []
        error = [f"{errors[name]:.4f}" if name in errors else "-"] if errors else []
        table.add_row(name, f"{numel:,}", f"{pruned:,}", *wanted, f"{pruned / numel:.2%}" if numel else "-", *error)
    table.add_row("total", f"{sum(b[1] for b in blocks):,}", f"{sum(b[2] for b in blocks):,}",
                  *([""] if requested else []), f"{total:.2%}",
                  *([f"{mean_error:.4f}" if mean_error is not None else ""] if errors else []))
    return table


@command("prune")
def prune(
    config: Optional[str] = typer.Option(None, "--config", help="A YAML file of prune settings (any PruneConfig key, sparsity_overrides among them); flags, then --set, override it."),
    flags: dict = ConfigFlags(PruneConfig, layered=True),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override a config key: --set 'sparsity_overrides={mlp.*: 0.6}' (repeatable)."),
):
    """Prune a causal LM block by block (Wanda, SparseGPT, magnitude, RIA or ALPS; DSnoT refinement) and write it with its mask file.

    Example: spp prune --model ../shared/data/stories260K-hf --method wanda --pattern 2:4 --calib ../shared/data/tinystories/tinystories_val.txt --nsamples 64 --seqlen 256 --output pruned
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from spp.prune import run_prune

    layers = [(config, read_yaml(config))] if config else []
    layers += [("flags", flags), ("--set", parse_set(set_ or []))]
    given = {k for _, layer in layers for k in layer}
    for key in ("model", "output"):
        if key not in given:
            raise SppError(f"--{key} is required (or `{key}:` in --config)")
    cfg = merge_into(PruneConfig, layers)
    if config:
        from spp.io.checkpoint import check_not_an_input

        check_not_an_input(Path(cfg.output), [("--config", config)])  # the stage checks its other inputs
    console = Console()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    # off when stdout is not a terminal: rich would write a bare newline on exit, before any error line
    with quiet_output(), Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("checking inputs", total=None)

        def on_module(index: int, n_blocks: int, name: str) -> None:
            progress.update(task, total=n_blocks, completed=index, description=f"pruning {name}")

        report = run_prune(cfg, on_module=on_module)
    owl_note = (" + OWL" if cfg.owl else "") + (f" + {cfg.refine}" if cfg.refine != "none" else "")
    title = f"{report.method}{owl_note} {report.pattern} -> {report.output} ({report.wall_time_s:.1f} s)"
    console.print(_sparsity_table(title, report.blocks, report.total_sparsity, report.requested_blocks,
                                  report.block_errors, report.mean_error))
    if report.mean_error is not None:
        console.print(f"mean relative reconstruction error {report.mean_error:.4f} (tr(dW H dW^T) / tr(W H W^T) "
                      "per layer, on its calibration inputs)")
    if report.refine:
        r = report.refine
        before = (f"; reconstruction error {r['reconstruction_error_before']:.4f} -> {r['reconstruction_error_after']:.4f}"
                  if "reconstruction_error_before" in r else "")
        console.print(f"{r['method']}{' (guard)' if r['guard'] else ''}: {r['swaps']:,} swaps in {r['layers_changed']} "
                      f"of {r['layers']} layers; mean |expected error| {r['expected_error_before']:.4g} -> "
                      f"{r['expected_error_after']:.4g}{before}")
    if report.dense_layers:
        console.print(f"{len(report.dense_layers)} layers or expert weights left dense (no mask entry, not in the total): "
                      f"{', '.join(report.dense_layers[:4])}{' …' if len(report.dense_layers) > 4 else ''}")
    if report.kept_zero:
        console.print(f"{report.kept_zero} kept weights are zero (counted, not pruned)")
    if report.expert_fallbacks:
        console.print(f"[yellow]{report.expert_fallbacks} expert tensors had fewer than {cfg.expert_min_tokens} "
                      "calibration tokens and were pruned by magnitude (tokens and method per tensor: "
                      "the manifest's details.modules)[/yellow]")
    for retry in report.dampening_retries:
        console.print(f"[yellow]{retry['module']}: Cholesky needed dampening {retry['percdamp_used']:g}[/yellow]")


@command("verify")
def verify(directory: str = typer.Argument(..., help="An spp output directory (prune or merge).")):
    """Check a checkpoint against its mask file and manifest; non-zero exit on any violation.

    Example: spp verify pruned
    """
    from rich.console import Console

    from spp.verify import verify_checkpoint

    report = verify_checkpoint(directory)
    console = Console()
    console.print(_sparsity_table(f"{report.directory} ({report.pattern})", report.blocks, report.total_sparsity,
                                  report.requested_blocks, report.block_errors, report.mean_error))
    console.print(f"ok: {report.tensors_checked} masked tensors and {report.files_checked} files match the manifest; "
                  f"every pruned entry is +0.0" + (f"; {report.kept_zero} kept weights are zero" if report.kept_zero else ""))


@command("train", no_args_is_help=True)
def train(
    config: str = typer.Option(..., "--config", help="A YAML file, or the name of a bundled config (alpaca.yaml, tinystories.yaml, smollm2.yaml)."),
    flags: dict = ConfigFlags(TrainConfig, layered=True),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override a config key: --set learning_rate=1e-3 (repeatable)."),
):
    """Fine-tune a pruned model with SPP, masked LoRA or masked full fine-tuning (--set adapter=...); every pruned zero stays zero.

    Example: spp train --config tinystories.yaml --model pruned --data ../shared/data/tinystories/tinystories_val.txt --output train
    """
    path, values = read_train_config(config)
    cfg = merge_into(TrainConfig, [(str(path), values), ("flags", flags), ("--set", parse_set(set_ or []))])
    if cfg.output_dir:
        from spp.io.checkpoint import check_not_an_input

        check_not_an_input(Path(cfg.output_dir), [("--config", path)])  # the stage checks its other inputs
    from spp.train import run_train

    with quiet_output():
        report = run_train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        from rich.console import Console

        # with a teacher the training loss adds the distillation terms; validation is plain cross-entropy either way
        train = "train loss (cross-entropy + distillation)" if cfg.teacher else "train loss"
        if cfg.objective == "blockwise":  # steps are summed over the blocks
            train = "block-wise loss (mean over blocks of the last epoch)"
        val = f", validation cross-entropy {report.val_loss:.4f}" if report.val_loss is not None else ""
        Console().print(f"trained {report.steps} steps on {report.world_size} process(es): {train} "
                        f"{report.train_loss:.4f}{val}; {report.trainable_params:,} trainable parameters in "
                        f"{report.adapted_modules} layers -> {report.output}")


@command("merge")
def merge(flags: dict = ConfigFlags(MergeConfig)):
    """Merge an adapter (any kind) into its pruned base, shard by shard; the result is a plain HF model, as sparse as the base.

    Example: spp merge --model pruned --adapter train --output merged
    """
    from spp.merge import run_merge

    report = run_merge(MergeConfig(**flags))
    print(f"merged {report.n_modules} layers of {report.model} with {report.adapter} "
          f"({report.n_shards} shard(s), every pruned entry +0.0"
          + (f"; {report.kept_zero} kept weights are zero" if report.kept_zero else "") + f") -> {report.output}")


@command("export", no_args_is_help=True)
def export(flags: dict = ConfigFlags(ExportConfig)):
    """Store a sparse checkpoint compressed (kept values + bit-packed mask), or restore it exactly with --dense.

    Example: spp export --model merged --output merged-compressed
    """
    from spp.export import run_export

    report = run_export(ExportConfig(**flags))
    mib = 1 << 20
    if report.direction == "compressed":
        print(f"compressed {report.tensors} masked tensors: {report.dense_bytes / mib:.1f} MiB dense -> "
              f"{report.compressed_bytes / mib:.1f} MiB (values + mask, {report.ratio:.3f}x); directory "
              f"{report.total_bytes_in / mib:.1f} -> {report.total_bytes_out / mib:.1f} MiB -> {report.output}")
    else:
        print(f"restored {report.tensors} masked tensors ({report.total_bytes_in / mib:.1f} -> "
              f"{report.total_bytes_out / mib:.1f} MiB) -> {report.output}")


# --------------------------------------------------------------------------- eval


def _split_list(values: Optional[list[str]]) -> list[str]:
    """`--tasks a,b --tasks c` -> [a, b, c]."""
    return [item.strip() for value in values or [] for item in value.split(",") if item.strip()]


@command("eval")
def eval_(
    paths: Optional[list[str]] = typer.Argument(None, help="With --compare: results directories or JSON files."),
    flags: dict = ConfigFlags(EvalConfig, optional=("model",)),
    compare: bool = typer.Option(False, "--compare", help="Print earlier results side by side instead of evaluating."),
    verbose: bool = typer.Option(False, "--verbose", help="Show every library message (by default spp.quiet drops the ones listed there)."),
):
    """Perplexity (Wanda/SparseGPT protocol) and lm-eval zero-shot accuracy; or --compare earlier results.

    Example: spp eval --model merged --ppl wikitext2 --tasks boolq,piqa --output eval
    """
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if compare:
        from spp.eval import compare_results

        print(compare_results(paths or []))
        return
    if paths:
        raise SppError(f"unexpected argument {paths[0]!r} (positional paths are only for --compare)")
    if "model" not in flags:
        raise SppError("--model is required (or --compare A B ... to compare results)")
    from spp.eval import run_eval

    cfg = EvalConfig(**flags | {"ppl": _split_list(flags.get("ppl")), "tasks": _split_list(flags.get("tasks")),
                                "task_data": flags.get("task_data") or os.environ.get("SPP_TASK_DATA") or None})
    with quiet_output(verbose, lm_eval=bool(cfg.tasks)) as noise:
        report = run_eval(cfg)
    table = Table(title=f"{cfg.model}" + (f" + adapter {cfg.adapter}" if cfg.adapter else ""))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for metric, value in report.rows:
        table.add_row(metric, value)
    console.print(table)
    for name, task in ((report.results.get("zeroshot") or {}).get("tasks") or {}).items():
        if task.get("approximate"):
            console.print(f"[yellow]{name} is approximate: {task['approximate']}[/yellow]")
        if task.get("note"):
            console.print(f"[yellow]{name}: {task['note']}[/yellow]")
    for line in noise.summary_lines():  # on stderr, where the library's own lines would have gone
        print(line, file=sys.stderr)
    if report.output:
        console.print(f"results -> {report.output}")


# --------------------------------------------------------------------------- run / demo


@command("run", no_args_is_help=True)
def run(
    pipeline: str = typer.Argument(..., help="A pipeline YAML: model, output, prune, sweep, train, eval."),
    from_stage: Optional[str] = typer.Option(None, "--from", help="Start at this stage (prune, train, merge, eval); earlier ones must be up to date."),
    until_stage: Optional[str] = typer.Option(None, "--until", help="Stop after this stage."),
    force: bool = typer.Option(False, "--force", help="Re-run the stages in range even when they are up to date."),
):
    """Prune, train, merge and evaluate from one file, skipping stages that are up to date; writes RUN/report.md.

    Example: spp run configs/pipeline_stories.yaml --until prune
    """
    from spp.pipeline import REPORT_MD, run_pipeline

    with quiet_output(lm_eval=True) as noise:
        report = run_pipeline(Path(pipeline), from_stage, until_stage, force)
    print(report.table)
    if report.paired:
        print("\nzero-shot, paired differences:\n" + report.paired)
    for line in noise.summary_lines():
        print(line, file=sys.stderr)
    print(f"report -> {report.output / REPORT_MD}")


@command("demo")
def demo(
    output: str = typer.Option("spp-demo", "--output", help="The run directory (the demo model itself is cached in $SPP_CACHE, default $XDG_CACHE_HOME/spp)."),
):
    """The whole method offline in a few CPU minutes: a built-in small LLaMA, Wanda 2:4 and 50%, SPP, merge, eval.

    Example: spp demo --output /tmp/spp-demo
    """
    from spp.demo import run_demo
    from spp.pipeline import REPORT_MD

    with quiet_output():
        report = run_demo(Path(output))
    print(report.table)
    print(f"machine: {report.machine} (the table repeats bit for bit under these conditions)")
    print(f"report -> {report.output / REPORT_MD}")
