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
