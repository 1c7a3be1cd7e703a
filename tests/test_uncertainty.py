"""spp.eval.uncertainty against hand computations; the baselines of lm-eval samples; --compare's paired table."""

import json
import math

import pytest
from typer.testing import CliRunner

from spp.cli import app
from spp.errors import SppError
from spp.eval import uncertainty as U
from spp.eval.zeroshot import item_scores


def test_paired_difference_by_hand():
    # d = b − a = [0, 1, 0, −1, 1]: mean 0.2; Σ(d − 0.2)² = 0.04 + 0.64 + 0.04 + 1.44 + 0.64 = 2.8;
    # s² = 2.8 / 4 = 0.7; SE = √(0.7 / 5) = √0.14
    diff = U.paired_difference([1, 0, 1, 1, 0], [1, 1, 1, 0, 1])
    assert diff.diff == pytest.approx(0.2) and diff.n == 5
    assert diff.stderr == pytest.approx(math.sqrt(0.14))
    assert (diff.low, diff.high) == pytest.approx((0.2 - 1.959964 * math.sqrt(0.14), 0.2 + 1.959964 * math.sqrt(0.14)))
    assert diff.within_noise
    # d = [1]*8 + [0]*2: mean 0.8, s² = (8·0.04 + 2·0.64) / 9 = 1.6 / 9, SE = √(1.6 / 90) = 0.1333…
    clear = U.paired_difference([0] * 10, [1] * 8 + [0] * 2)
    assert clear.stderr == pytest.approx(math.sqrt(1.6 / 90)) and clear.low == pytest.approx(0.8 - 1.959964 * 0.4 / 3)
    assert not clear.within_noise
    # the mean of the two tasks: (0.2 + 0.8) / 2, SE = √(0.14 + 1.6/90) / 2
    both = U.mean_difference([diff, clear])
    assert both.diff == pytest.approx(0.5) and both.stderr == pytest.approx(math.sqrt(0.14 + 1.6 / 90) / 2)
    assert both.n == 15


def test_paired_difference_is_smaller_than_unpaired_when_models_agree():
    a = [1, 1, 0, 0, 1, 0, 1, 0] * 5
    b = a[:-2] + [1, 1]
    paired = U.paired_difference(a, b)
    def var(x): return sum((v - sum(x) / len(x)) ** 2 for v in x) / (len(x) - 1)
    unpaired = math.sqrt(var(a) / len(a) + var(b) / len(b))
    assert paired.stderr < unpaired / 2


@pytest.mark.parametrize("a,b", [([1, 0], [1]), ([1], [0])])
def test_paired_difference_refuses_unpaired_or_single_items(a, b):
    with pytest.raises(SppError, match="paired difference"):
        U.paired_difference(a, b)


def test_headline_tasks_need_two_stderrs_above_the_baseline():
    tasks = {"piqa": {"acc": 0.60, "acc_stderr": 0.02, "baseline": 0.5},  # 0.10 ≥ 0.04
             "boolq": {"acc": 0.63, "acc_stderr": 0.02, "baseline": 0.62},  # 0.01 < 0.04
             "wikitext": {"word_perplexity": 30.0}}
    assert U.headline_tasks(tasks) == ["piqa"]
    assert U.above_baseline(0.54, 0.02, 0.5) and not U.above_baseline(0.5399, 0.02, 0.5)


def sample(doc_id, target, lls, answers, acc):
    return {"doc_id": doc_id, "target": target, "acc": acc, "filtered_resps": [(ll, False) for ll in lls],
            "arguments": [(f"context {doc_id}", a) for a in answers]}


def test_item_scores_baselines_and_near_ties():
    # one answer set (yes/no) for every item: the majority-class rate (3 of 4 answers are 1) beats chance 0.5
    fixed = [sample(i, t, [-1.0, -2.0], [" no", " yes"], 1.0) for i, t in enumerate([1, 1, 0, 1])]
    scores = item_scores(fixed[::-1])  # item order restored from doc ids
    assert scores["baseline"] == 0.75 and scores["baseline_kind"] == "majority"
    assert scores["item_acc"] == [1, 1, 1, 1] and scores["near_ties"] == 0
    # answers differ per item: chance = mean of 1/choices = (1/4 + 1/2) / 2, however skewed the targets
    varied = [sample(0, 0, [-1.0, -1.00005, -3.0, -4.0], ["a", "b", "c", "d"], 1.0),
              sample(1, 0, [-2.0, -1.0], ["e", "f"], 0.0)]
    scores = item_scores(varied)
    assert scores["baseline"] == pytest.approx(0.375) and scores["baseline_kind"] == "chance"
    assert scores["near_ties"] == 1 and scores["item_acc"] == [1, 0]


def results_file(path, items: dict[str, list[int]], stderr=0.02):
    tasks = {name: {"acc": sum(v) / len(v), "acc_stderr": stderr, "n": len(v), "item_acc": v, "baseline": 0.5}
             for name, v in items.items()}
    path.write_text(json.dumps({"zeroshot": {"tasks": tasks, "mean_acc": None}}))
    return path


def test_compare_prints_paired_differences_and_noise(tmp_path):
    dense = results_file(tmp_path / "dense.json", {"piqa": [1] * 40 + [0] * 10, "boolq": [1, 0] * 25})
    pruned = results_file(tmp_path / "pruned.json", {"piqa": [0] * 40 + [0] * 10, "boolq": [0, 1] * 25})
    result = CliRunner().invoke(app, ["eval", "--compare", str(dense), str(pruned)])
    assert result.exit_code == 0, result.output
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in result.output.splitlines()
            if line.startswith("| ") and line.count("|") == 3}
    expected = U.paired_difference([1] * 40 + [0] * 10, [0] * 50)
    assert rows["piqa acc"] == f"{expected.diff:+.4f} [{expected.low:+.4f}, {expected.high:+.4f}]"  # not noise
    assert rows["boolq acc"].endswith("noise")  # same accuracy, disagreeing on every item: interval holds 0
    # dense is above 0.5 + 2·0.02 on piqa only (boolq acc 0.5): the headline mean is piqa's difference
    assert rows["mean acc over piqa"].startswith(f"{expected.diff:+.4f}")
