"""The command line as a whole: version, and help with an example for every subcommand."""

import re

import pytest
from typer.testing import CliRunner

from spp import __version__
from spp.cli import app

SUBCOMMANDS = ["prune", "verify", "train", "merge", "eval", "run", "demo"]


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"spp {__version__}"


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_has_help_with_an_example(name):
    result = CliRunner().invoke(app, [name, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert f"Example: spp {name}" in result.output


def test_top_level_help_lists_every_subcommand():
    result = CliRunner().invoke(app, ["--help"], terminal_width=200)
    assert result.exit_code == 0
    for name in SUBCOMMANDS:
        assert name in result.output


@pytest.mark.parametrize("name", ["", *SUBCOMMANDS])
def test_flags_take_no_value_in_help(name):
    result = CliRunner().invoke(app, [name, "--help"] if name else ["--help"], terminal_width=200)
    assert result.exit_code == 0 and "<bool>" not in result.output
    assert re.search(r"^  -h, --help +Show this message and exit\.$", result.output, re.M), result.output


@pytest.mark.parametrize("command, cls, cli_only", [("prune", "PruneConfig", {"--config", "--set"}),
                                                    ("eval", "EvalConfig", {"--verbose", "--compare"}),
                                                    ("merge", "MergeConfig", set()), ("export", "ExportConfig", set())])
def test_the_command_takes_exactly_the_flags_its_config_declares(command, cls, cli_only):
    """`spp.config.flag_names` is the one list of flags (spp run's reproduce commands use it); the CLI must match it."""
    import typer.main

    from spp import config
    from spp.cli import app

    options = {o for p in typer.main.get_command(app).commands[command].params for o in p.opts if o.startswith("--")}
    assert options - {"--help"} == set(config.flag_names(getattr(config, cls)).values()) | cli_only


def test_no_module_reaches_up_to_the_cli():
    import re
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "spp"
    importers = [p.name for p in package.rglob("*.py") if p.name != "cli.py"
                 and re.search(r"^\s*(from spp\.cli import|from spp import cli|import spp\.cli)", p.read_text(), re.M)]
    assert importers == []


def test_a_prune_error_prints_nothing_on_stdout(tmp_path):
    """Off a terminal the progress display is off, so an error is the only output (rich's transient display used to
    leave a bare newline on stdout before it)."""
    import subprocess
    import sys

    command = [sys.executable, "-c", "from spp.cli import app; app()", "prune", "--model", str(tmp_path / "missing"),
               "--output", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and result.stdout == "", repr(result.stdout)
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr


def test_flags_override_the_config_file_only_where_given(tmp_path, monkeypatch):
    """Options built from the config's fields: a flag left out keeps the YAML's value (not the field's default), a
    default-on switch's --no- form and --set still win, and the direct commands get their fields' defaults."""
    import spp.export
    import spp.merge
    import spp.prune
    from spp.errors import SppError

    seen = {}

    def capture(cfg, **_):
        seen[type(cfg).__name__] = cfg
        raise SppError("captured")

    for module, name in ((spp.prune, "run_prune"), (spp.merge, "run_merge"), (spp.export, "run_export")):
        monkeypatch.setattr(module, name, capture)
    (tmp_path / "prune.yaml").write_text("method: sparsegpt\nnsamples: 7\nseed: 3\nowl: true\n")
    result = CliRunner().invoke(app, ["prune", "--config", str(tmp_path / "prune.yaml"), "--model", "m",
                                      "--output", str(tmp_path / "out"), "--nsamples", "9", "--no-dsnot-guard",
                                      "--set", "seed=5"])
    assert result.exit_code == 1 and "captured" in result.output, result.output
    cfg = seen["PruneConfig"]
    assert (cfg.method, cfg.nsamples, cfg.seed, cfg.owl, cfg.dsnot_guard, cfg.batch_size) == ("sparsegpt", 9, 5, True,
                                                                                             False, 16)
    assert CliRunner().invoke(app, ["merge", "--output", "x"]).exit_code == 1
    assert (seen["MergeConfig"].model, seen["MergeConfig"].adapter, seen["MergeConfig"].output) == (None, "train", "x")
    assert CliRunner().invoke(app, ["export", "--dense", "--model", "a", "--output", "b"]).exit_code == 1
    assert (seen["ExportConfig"].compressed, seen["ExportConfig"].dtype) == (False, "auto")
    result = CliRunner().invoke(app, ["export", "--model", "a"])
    assert result.exit_code == 2 and "Missing option '--output'" in result.output, result.output


@pytest.mark.parametrize("args, needle", [
    (["prune", "--bogus"], "No such option: --bogus (see `spp prune --help`)"),
    (["prune", "--sparsity", "abc"], "Invalid value for '--sparsity'"),
    (["verify"], "Missing argument 'directory'"),
    (["nosuch"], "No such command 'nosuch'"),
])
def test_a_usage_error_is_one_line_and_exit_code_2(args, needle):
    """click would print the usage, a hint, a blank line and the error; spp's contract is one `error:` line."""
    from conftest import one_line_error

    result = CliRunner().invoke(app, args, prog_name="spp")
    assert result.exit_code == 2
    one_line_error(result, needle)


def test_a_bare_spp_still_prints_the_help():
    result = CliRunner().invoke(app, [], prog_name="spp")
    assert result.exit_code == 2 and "Usage: spp [OPTIONS] COMMAND" in result.output and "prune" in result.output
