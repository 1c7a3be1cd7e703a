"""The one error type a user ever sees.

Raise `SppError` where a bad value is used, with a message that names the
user's thing (flag, file, key, record, module and shape) and says what would be
valid. `spp.cli` prints it as a single `error: ...` line and exits non-zero;
every other exception is a bug and keeps its traceback.
"""


class SppError(Exception):
    """A problem with the user's input or environment, reported as one line."""


def first_line(exc: BaseException) -> str:
    """The first non-blank line of an exception's message, stripped, for an SppError that quotes a library's error;
    the exception's type name when the message is blank."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


class SppInterrupted(SppError):
    """Ctrl-C (SIGINT) stopped a stage after it saved what it could; the message says how to resume.

    `kept` says where the stage stopped and what it kept, `resume` how to continue (a stage's command with
    --resume; `spp run` puts its own advice in its place). The command line exits with 130, the shell's code for
    an interrupted command.
    """

    exit_code = 130

    def __init__(self, kept: str, resume: str = "run the same command with --resume to continue"):
        self.kept = kept
        super().__init__(f"{kept}: {resume}")
