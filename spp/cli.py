"""The `spp` command line: one short function per subcommand (parse flags -> config -> run_<stage> -> print).

Heavy imports (torch, transformers, lm-eval) happen inside the commands so that
`spp --help` stays fast. Every command runs inside `_reporting_errors`, which turns
an `SppError` into one `error: ...` line on stderr and exit code 1; any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from typing import Optional

import typer

from spp import __version__
from spp.errors import SppError

app = typer.Typer(
    help="Prune LLMs (Wanda, SparseGPT, magnitude), fine-tune them with SPP, merge and evaluate, keeping every zero.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
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
            raise typer.Exit(1) from None
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
