"""The `spp` command line: one short function per subcommand (parse flags -> config -> run_<stage> -> print).

Heavy imports (torch, transformers, lm-eval) happen inside the commands so that
`spp --help` stays fast. Every command runs inside `_reporting_errors`, which turns
an `SppError` into one `error: ...` line on stderr and exit code 1; any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from spp import __version__
from spp.errors import SppError
from spp.quiet import quiet_output

app = typer.Typer(
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


def command(*args, **kwargs):
    """`app.command` with the error wrapper applied."""

    def register(fn):
        return app.command(*args, **kwargs)(_reporting_errors(fn))

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
    model: Optional[str] = typer.Option(None, "--model", help="Local Hugging Face directory, a .gguf file (dequantized once; needs spp-llm[gguf]), or a hub id (downloads from the hub)."),
    output: Optional[str] = typer.Option(None, "--output", help="Output directory (built in OUTPUT.partial, then renamed)."),
    config: Optional[str] = typer.Option(None, "--config", help="A YAML file of prune settings (any PruneConfig key, sparsity_overrides among them); flags, then --set, override it."),
    method: Optional[str] = typer.Option(None, "--method", help="wanda (default), sparsegpt, magnitude, ria or alps (ADMM + conjugate-gradient refit; reuses SparseGPT's Hessian)."),
    pattern: Optional[str] = typer.Option(None, "--pattern", help="unstructured (default), or N:M = at most N kept in every M inputs."),
    sparsity: Optional[float] = typer.Option(None, "--sparsity", help="Fraction pruned, unstructured only (default 0.5)."),
    targets: Optional[list[str]] = typer.Option(None, "--targets", help="Prune only the decoder-block linears these patterns name (fnmatch or re:REGEX, block-relative or full names; repeatable; default *)."),
    ignore: Optional[list[str]] = typer.Option(None, "--ignore", help="Leave the linears these patterns name dense: no mask entry, no adapter (repeatable)."),
    owl: bool = typer.Option(False, "--owl", help="Outlier-weighted layerwise sparsity (OWL): blocks with more outliers are pruned less; unstructured only."),
    owl_m: Optional[float] = typer.Option(None, "--owl-m", help="OWL's outlier threshold M, times a block's mean Wanda score (default 5)."),
    owl_lmbda: Optional[float] = typer.Option(None, "--owl-lmbda", help="OWL's lambda: block sparsities span 2*lambda around --sparsity (default 0.08)."),
    permute_channels: bool = typer.Option(False, "--permute-channels", help="N:M with ria or wanda: reorder the inputs of o_proj and down_proj before forming groups (RIA's channel permutation), folded into v_proj and gate/up_proj so the saved model computes the same function."),
    calib: Optional[str] = typer.Option(None, "--calib", help="A local .txt/.jsonl/.json file, or c4 / wikitext2 (downloaded from the hub; the default c4 needs the network)."),
    nsamples: Optional[int] = typer.Option(None, "--nsamples", help="Number of calibration windows (default 128)."),
    seqlen: Optional[int] = typer.Option(None, "--seqlen", help="Tokens per window (default min(2048, context))."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the calibration window offsets (default 0)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto (default), cpu or cuda: where each block is pruned."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="auto (default), float32, bfloat16 or float16."),
    max_shard_size: Optional[str] = typer.Option(None, "--max-shard-size", help="Largest safetensors shard (default 2GB)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Calibration windows per block forward (default 16)."),
    offload_activations: bool = typer.Option(False, "--offload-activations", help="Keep calibration activations on the CPU."),
    alps_iters: Optional[int] = typer.Option(None, "--alps-iters", help="ALPS: the most ADMM iterations, each about one SparseGPT pass (default 15; the paper's code: 300)."),
    alps_rho: Optional[float] = typer.Option(None, "--alps-rho", help="ALPS: initial ADMM penalty; smaller explores more supports, larger settles sooner (default 0.1)."),
    alps_pcg_steps: Optional[int] = typer.Option(None, "--alps-pcg-steps", help="ALPS: conjugate-gradient steps refitting the kept weights (default 10; 0: none)."),
    refine: Optional[str] = typer.Option(None, "--refine", help="none (default) or dsnot: swap pruned and kept weights per row (in their group) to cut the expected error; needs calibration."),
    dsnot_guard: Optional[bool] = typer.Option(None, "--dsnot-guard/--no-dsnot-guard", help="DSnoT: reject swaps that raise the squared reconstruction error, from each layer's full input Hessian (as --record-error holds it; default on; the paper has no guard)."),
    record_error: bool = typer.Option(False, "--record-error", help="Record wanda/ria/magnitude's reconstruction error: holds each layer's input Hessian, in*in float32 (4*in^2 bytes per layer of a block); sparsegpt/alps record it anyway."),
    expert_min_tokens: Optional[int] = typer.Option(None, "--expert-min-tokens", help="Mixture-of-experts: an expert routed fewer calibration tokens is pruned by magnitude, recorded in the manifest (default 32)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUTPUT (only once the new one is complete)."),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed or interrupted run at its first unfinished block (same settings)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override a config key: --set 'sparsity_overrides={mlp.*: 0.6}' (repeatable)."),
):
    """Prune a causal LM block by block (Wanda, SparseGPT, magnitude, RIA or ALPS; DSnoT refinement) and write it with its mask file.

    Example: spp prune --model ../shared/data/stories260K-hf --method wanda --pattern 2:4 --calib ../shared/data/tinystories/tinystories_val.txt --nsamples 64 --seqlen 256 --output pruned
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from spp.config import PruneConfig, merge_into, parse_set, read_yaml
    from spp.prune import run_prune

    flags = dict(model=model, output=output, method=method, pattern=pattern, sparsity=sparsity, targets=targets,
                 ignore=ignore, owl=owl or None, owl_m=owl_m, owl_lmbda=owl_lmbda,
                 permute_channels=permute_channels or None, calib=calib, nsamples=nsamples,
                 seqlen=seqlen, seed=seed, device=device, dtype=dtype, max_shard_size=max_shard_size,
                 batch_size=batch_size, offload_activations=offload_activations or None, alps_iters=alps_iters,
                 alps_rho=alps_rho, alps_pcg_steps=alps_pcg_steps, refine=refine, dsnot_guard=dsnot_guard,
                 record_error=record_error or None,
                 expert_min_tokens=expert_min_tokens, overwrite=overwrite or None,
                 resume=resume or None)
    layers = [(config, read_yaml(config))] if config else []
    layers += [("flags", {k: v for k, v in flags.items() if v is not None}), ("--set", parse_set(set_ or []))]
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
    model: Optional[str] = typer.Option(None, "--model", help="The pruned model directory (an `spp prune` output)."),
    data: Optional[str] = typer.Option(None, "--data", help="Alpaca .json/.jsonl, a plain .txt, or a datasets hub name (downloads; alpaca.yaml's default is one)."),
    output: Optional[str] = typer.Option(None, "--output", help="The output directory (built in OUTPUT.partial)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many optimizer steps."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="The dense model to distil from (with kd_weight or squarehead_weight > 0)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its last checkpoint."),
    distributed: Optional[str] = typer.Option(None, "--distributed", help="ddp (replicate the model on each process; launch with accelerate launch) or fsdp (shard it with FSDP2; launch with torchrun)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override a config key: --set learning_rate=1e-3 (repeatable)."),
):
    """Fine-tune a pruned model with SPP, masked LoRA or masked full fine-tuning (--set adapter=...); every pruned zero stays zero.

    Example: spp train --config tinystories.yaml --model pruned --data ../shared/data/tinystories/tinystories_val.txt --output train
    """
    import os

    from spp.config import TrainConfig, merge_into, parse_set, read_train_config

    path, values = read_train_config(config)
    flags = {"base_model": model, "data_path": data, "output_dir": output, "max_steps": max_steps, "teacher": teacher,
             "resume": resume or None, "overwrite": overwrite or None, "distributed": distributed}
    cfg = merge_into(TrainConfig, [(str(path), values),
                                   ("flags", {k: v for k, v in flags.items() if v is not None}),
                                   ("--set", parse_set(set_ or []))])
    if cfg.output_dir:
        from pathlib import Path

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
def merge(
    model: Optional[str] = typer.Option(None, "--model", help="The pruned base (default: the one the adapter records)."),
    adapter: str = typer.Option("train", "--adapter", help="The adapter directory (an `spp train` output)."),
    output: str = typer.Option("merged", "--output", help="The merged model directory (built in OUTPUT.partial)."),
    dtype: str = typer.Option("auto", "--dtype", help="The merged weights' dtype: auto (the base's), float32, bfloat16 or float16; the merge math is float32 either way."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory."),
):
    """Merge an adapter (any kind) into its pruned base, shard by shard; the result is a plain HF model, as sparse as the base.

    Example: spp merge --model pruned --adapter train --output merged
    """
    from spp.config import MergeConfig
    from spp.merge import run_merge

    report = run_merge(MergeConfig(model=model, adapter=adapter, output=output, dtype=dtype, overwrite=overwrite))
    print(f"merged {report.n_modules} layers of {report.model} with {report.adapter} "
          f"({report.n_shards} shard(s), every pruned entry +0.0"
          + (f"; {report.kept_zero} kept weights are zero" if report.kept_zero else "") + f") -> {report.output}")


@command("export", no_args_is_help=True)
def export(
    model: str = typer.Option(..., "--model", help="A sparse checkpoint (spp prune/merge output), or with --dense an `spp export` output."),
    output: str = typer.Option(..., "--output", help="The output directory (built in OUTPUT.partial)."),
    compressed: bool = typer.Option(True, "--compressed/--dense", help="Write kept values + the mask file (default), or restore the checkpoint."),
    dtype: str = typer.Option("auto", "--dtype", help="With --dense: the restored weights' dtype: auto (the source's, byte for byte), float32, bfloat16 or float16."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory."),
):
    """Store a sparse checkpoint compressed (kept values + bit-packed mask), or restore it exactly with --dense.

    Example: spp export --model merged --output merged-compressed
    """
    from spp.config import ExportConfig
    from spp.export import run_export

    report = run_export(ExportConfig(model=model, output=output, compressed=compressed, dtype=dtype,
                                     overwrite=overwrite))
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
    model: Optional[str] = typer.Option(None, "--model", help="Local Hugging Face directory (dense, pruned, merged), a .gguf file (needs spp-llm[gguf]), or a hub id (downloads from the hub)."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="An `spp train` output to evaluate unmerged on top of --model."),
    ppl: Optional[list[str]] = typer.Option(None, "--ppl", help="Comma list of PATH (.txt/.jsonl); wikitext2 / c4 (from the hub); or NAME:PATH, a local copy of the set NAME (wikitext2, c4 or ptb)."),
    seqlen: Optional[int] = typer.Option(None, "--seqlen", help="Perplexity window (default: the model's context, at most 4096)."),
    max_windows: Optional[int] = typer.Option(None, "--max-windows", help="Use at most this many perplexity windows per set."),
    tasks: Optional[list[str]] = typer.Option(None, "--tasks", help="Comma list of lm-eval tasks: boolq,piqa,arc_easy,... (data from the hub unless --task-data)."),
    task_data: Optional[str] = typer.Option(None, "--task-data", help="Local task data directory (default $SPP_TASK_DATA; unset: the hub)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate only the first N examples of each task."),
    batch_size: int = typer.Option(1, "--batch-size", help="Perplexity windows / lm-eval requests per forward."),
    num_fewshot: int = typer.Option(0, "--num-fewshot", help="Few-shot examples per prompt (the papers use 0)."),
    output: Optional[str] = typer.Option(None, "--output", help="Write results.json and the manifest here."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16."),
    sparse_kernels: bool = typer.Option(False, "--sparse-kernels", help="Run the 2:4 linears on cuSPARSELt (CUDA, float16/bfloat16); reports speed against dense."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUTPUT."),
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
    if model is None:
        raise SppError("--model is required (or --compare A B ... to compare results)")
    from spp.config import EvalConfig
    from spp.eval import run_eval

    cfg = EvalConfig(model=model, adapter=adapter, ppl=_split_list(ppl), seqlen=seqlen, max_windows=max_windows,
                     tasks=_split_list(tasks), task_data=task_data or os.environ.get("SPP_TASK_DATA") or None,
                     limit=limit, batch_size=batch_size, num_fewshot=num_fewshot, output=output, device=device,
                     dtype=dtype, sparse_kernels=sparse_kernels, overwrite=overwrite)
    with quiet_output(verbose, lm_eval=bool(cfg.tasks)) as noise:
        report = run_eval(cfg)
    table = Table(title=f"{model}" + (f" + adapter {adapter}" if adapter else ""))
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
    for line in noise.summary_lines():
        print(line, file=sys.stderr)
    print(f"report -> {report.output / REPORT_MD}")


@command("demo")
def demo(
    output: str = typer.Option("spp-demo", "--output", help="The run directory (the demo model itself is cached in $XDG_CACHE_HOME/spp)."),
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
