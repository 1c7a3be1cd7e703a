"""How far zero-shot accuracies can be trusted: paired differences with intervals, and which tasks to average.

Pure functions on per-item 0/1 scores and lm-eval's summary numbers; `spp.eval.compare_results` prints them.
The intervals follow Miller (2024), "Adding Error Bars to Evals: A Statistical Approach to Language Model
Evaluations" (arXiv:2411.00640): §2 for the standard error of a mean over items, §4 for the paired difference
of two models on the same items, whose variance drops by twice their covariance against unpaired standard errors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from spp.errors import SppError

Z95 = 1.959963984540054  # the 0.975 quantile of the standard normal: a two-sided 95% interval
ABOVE_BASELINE_STDERRS = 2.0  # a task counts in the headline mean when acc − baseline ≥ this many stderrs


@dataclass(frozen=True)
class PairedDifference:
    """mean(b − a) over items with its standard error and 95% interval; `within_noise` when 0 is inside it."""

    diff: float
    stderr: float
    low: float
    high: float
    n: int

    @property
    def within_noise(self) -> bool:
        return self.low <= 0.0 <= self.high


def paired_difference(a: list[float], b: list[float], z: float = Z95) -> PairedDifference:
    """The paired difference of two models scored on the same items, in the same order.

    With d_i = b_i − a_i over n items (0/1 accuracies, or any per-item score):

        d̄ = Σ d_i / n,   s² = Σ (d_i − d̄)² / (n − 1),   SE = s / √n,   interval = d̄ ± z·SE

    (Miller 2024, §4; z = 1.96 for 95%). Pairing removes the items' shared difficulty: SE² = (Var a + Var b −
    2 Cov(a, b)) / n, smaller than the unpaired SE_a² + SE_b² whenever the two models agree on items.

    Raises:
        SppError: the two lists differ in length, or hold fewer than 2 items.
    """
    if len(a) != len(b):
        raise SppError(f"a paired difference needs the same items: {len(a)} scores against {len(b)}")
    n = len(a)
    if n < 2:
        raise SppError(f"a paired difference needs at least 2 items, not {n}")
    d = [y - x for x, y in zip(a, b)]
    mean = sum(d) / n
    stderr = math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1) / n)
    return PairedDifference(mean, stderr, mean - z * stderr, mean + z * stderr, n)


def mean_difference(parts: list[PairedDifference], z: float = Z95) -> PairedDifference:
    """The difference of two means over T tasks, from each task's paired difference.

    D = Σ_t d̄_t / T and SE_D = √(Σ_t SE_t²) / T: the tasks' items are disjoint, so their differences are
    independent and their variances add.

    Raises:
        SppError: no tasks.
    """
    if not parts:
        raise SppError("a mean difference needs at least one task")
    diff = sum(p.diff for p in parts) / len(parts)
    stderr = math.sqrt(sum(p.stderr ** 2 for p in parts)) / len(parts)
    return PairedDifference(diff, stderr, diff - z * stderr, diff + z * stderr, sum(p.n for p in parts))


def above_baseline(acc: float, stderr: float, baseline: float, k: float = ABOVE_BASELINE_STDERRS) -> bool:
    """acc − baseline ≥ k·stderr: the model does better than chance (or than always giving the most common
    answer) by more than the noise of the evaluated item count."""
    return acc - baseline >= k * stderr


def headline_tasks(tasks: dict[str, dict]) -> list[str]:
    """The tasks of one `results.json` `zeroshot.tasks` where the model is above its baseline by 2 stderrs, in
    order. Given the dense model's results, these are the tasks a headline mean over models should use."""
    return [name for name, task in tasks.items()
            if "baseline" in task and task.get("acc_stderr") is not None
            and above_baseline(task["acc"], task["acc_stderr"], task["baseline"])]
