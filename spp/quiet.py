"""Library output that tells an `spp` user nothing, dropped in one place; everything else still shows.

`NOISE` is the allow-list: each entry names the logger that emits a message, a pattern
for it, and why it says nothing to an `spp` user. `quiet_output()` attaches one
`NoiseFilter` to those loggers, turns off transformers' info logs and loading bars, and
(with `lm_eval=True`) skips lm-eval's `git describe` probe, its per-task request-building
bars (`spp.eval` shows one bar per task) and the "Generating split" bars of the data sets
lm-eval builds; all of it is undone on exit. The filter counts
what it drops, so an entry with a `summary` (per-request truncation) comes back as one
line from `NoiseFilter.summary_lines`. With `verbose=True` nothing is dropped or turned off.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class Noise:
    """One allow-listed library message."""

    name: str
    logger: str  # the logging.Logger that emits it (filters see only records created on their own logger)
    pattern: str  # re.match against the formatted message
    why: str  # why an spp user loses nothing without it
    summary: str | None = None  # one line for all dropped copies: format fields {n} and the pattern's named groups


NOISE: tuple[Noise, ...] = (
    Noise("aggregation", "lm_eval.api.task",
          r"\[Task: [^\]]+\] metric \S+ is defined, but aggregation is not\.",
          "registered task YAMLs name the metric only; lm-eval then uses its default (mean), as published"),
    Noise("higher_is_better", "lm_eval.api.task",
          r"\[Task: [^\]]+\] metric \S+ is defined, but higher_is_better is not\.",
          "same as aggregation: the default is the published direction"),
    Noise("pretrained_not_str", "lm_eval.models.huggingface",
          r"`pretrained` model kwarg is not of type `str`",
          "spp evaluates the model it already loaded (and checked) by design"),
    Noise("pretrained_initialized", "lm_eval.models.huggingface",
          r"Passed an already-initialized model through `pretrained`",
          "same: the in-memory model, one process"),
    Noise("num_fewshot_default", "lm_eval.evaluator",
          r"Overwriting default num_fewshot of \S+ from None to \d+$",
          "the task has no default; --num-fewshot is applied as given"),
    Noise("truncation", "lm_eval.models.huggingface",
          r"Combined length of context \(\d+\) and continuation \(\d+\) exceeds model's maximum length "
          r"\((?P<max_length>\d+)\)\. Truncating \d+ tokens from the left\.",
          "one line per request; the count is what matters",
          summary="lm-eval truncated {n} requests to the model's context of {max_length} tokens "
                  "(dropping the start of each long prompt)"),
)


class NoiseFilter(logging.Filter):
    """Drops (or, when `drop` is False, only counts) records that match an entry of `entries`."""

    def __init__(self, entries: tuple[Noise, ...] = NOISE, drop: bool = True):
        super().__init__()
        self.entries, self.drop = entries, drop
        self._patterns = [re.compile(entry.pattern) for entry in entries]
        self.counts: Counter[str] = Counter()
        self.fields: dict[str, dict[str, str]] = {}  # entry name -> named groups of its last match

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        for entry, pattern in zip(self.entries, self._patterns):
            match = pattern.match(message) if record.name == entry.logger else None
            if match:
                self.counts[entry.name] += 1
                self.fields[entry.name] = match.groupdict()
                return not self.drop
        return True

    def summary_lines(self) -> list[str]:
        """One line per summarised entry that matched at least once."""
        return [entry.summary.format(n=self.counts[entry.name], **self.fields[entry.name])
                for entry in self.entries if entry.summary and self.counts[entry.name]]


@contextmanager
def quiet_output(verbose: bool = False, lm_eval: bool = False) -> Iterator[NoiseFilter]:
    """Drop the allow-listed library output for the duration; yield the filter (its counts and summary).

    Args:
        verbose: show everything (the filter still counts, so the summary lines stay available).
        lm_eval: also quiet lm-eval's git probe and data-set bars (imports lm-eval, so only when it runs).
    """
    noise = NoiseFilter(drop=not verbose)
    loggers = {logging.getLogger(entry.logger) for entry in NOISE}  # created now if the library is not imported yet
    with ExitStack() as stack:
        for logger in loggers:
            logger.addFilter(noise)
            stack.callback(logger.removeFilter, noise)
        if not verbose:
            stack.enter_context(quiet_transformers())  # our progress and table say it all
            if lm_eval:
                stack.enter_context(_no_git_probe())
                stack.enter_context(_no_request_bars())
                stack.callback(_quiet_datasets())
        yield noise


@contextmanager
def quiet_transformers(level: int = logging.WARNING) -> Iterator[None]:
    """Transformers' loading bars off and its logs below `level` (a `logging` level) dropped, for the duration."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity(level)
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _quiet_datasets():
    """No "Generating validation split" bars for the small JSON files lm-eval reads; returns the undo."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    return (lambda: None) if was_disabled else datasets.enable_progress_bars


@contextmanager
def _no_git_probe():
    """lm-eval's `simple_evaluate` runs `git describe` in the current directory to store a commit hash.

    Outside a checkout git prints `fatal: not a git repository` straight to file descriptor 2,
    past any logging filter. The hash is of wherever the user stands, not of the model, and
    spp drops it (its manifest records its own provenance), so the probe is not run at all:
    `get_git_commit_hash` returns None, as lm-eval's own fallback does outside a repository.
    Replacing the function is narrower than redirecting descriptor 2, which would also hide
    progress bars and real warnings written meanwhile, and than setting GIT_* variables,
    which still leave git to print its error.
    """
    import lm_eval.evaluator as evaluator

    probe = getattr(evaluator, "get_git_commit_hash", None)  # None if renamed upstream: the noise test will say so
    if probe is not None:
        evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        if probe is not None:
            evaluator.get_git_commit_hash = probe


@contextmanager
def _no_request_bars():
    """lm-eval draws a tqdm bar per task while building its requests (`Task.build_all_requests`); spp draws one
    bar per task while scoring them (`spp.eval.loglikelihood`). tqdm reads `TQDM_DISABLE` only when it is
    imported, so the module's `tqdm` is swapped for a disabled one for the duration."""
    import functools

    import lm_eval.api.task as task

    bar = task.tqdm
    task.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        task.tqdm = bar
