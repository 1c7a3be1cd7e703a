"""The study script in miniature (`scripts/study.py --grid tiny`): a few steps on a couple of cells of
stories260K, so the study cannot rot. Checks the outputs against each other and against formulas,
never against stored numbers."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_{name}_under_test", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def study():
    return load_script("study")


@pytest.fixture(scope="module")
def tiny_run(study, shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    argv = ["--grid", "tiny", "--out", str(root / "out"), "--work", str(root / "work"), "--jobs", "1", "--threads", "1",
            "--model", str(shared_data / "stories260K-hf"),
            "--text", str(shared_data / "tinystories" / "tinystories_val.txt"),
            "--wikitext", str(shared_data / "wikitext-2-raw" / "wikitext-test.txt")]
    report = study.main(argv)
    return argv, report, root / "out", root / "work"


def rows_by(report, recovery):
    return [r for r in report["rows"] if r["recovery"] == recovery and r["method"] != "dense"]


def test_the_report_files_are_written_and_agree(tiny_run):
    _, report, out, _ = tiny_run
    assert sorted(p.name for p in out.iterdir()) == ["study.json", "study.md", "study_loss_curves.png",
                                                      "study_ppl_vs_sparsity.png"]
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "study.json").read_text())
    assert saved["cells"] == report["cells"] == ["dense-0pct-s0-none", "wanda-50pct-s0-none", "wanda-50pct-s0-spp",
                                                  "wanda-50pct-s0-lora"]
    markdown = (out / "study.md").read_text()
    assert {r["recovery"] for r in saved["rows"]} == {"none", "spp", "lora-merged", "lora-unmerged"}
    for row in saved["rows"]:  # every perplexity in the JSON is in the tables, formatted as the report formats it
        assert f"| {row['ppl_tinystories']:.3f} |" in markdown or f"| {row['ppl_tinystories']:.1f} |" in markdown
    assert "minutes on" in markdown


def test_spp_merge_keeps_the_pruned_sparsity_and_lora_merge_loses_it(tiny_run):
    _, report, _, _ = tiny_run
    (pruned,), (spp,), (merged,), (unmerged,) = (rows_by(report, k) for k in ("none", "spp", "lora-merged", "lora-unmerged"))
    assert pruned["sparsity"] == pytest.approx(0.5)  # Wanda 50 %: half of every row
    assert spp["sparsity"] == pruned["sparsity"]
    assert merged["sparsity"] < pruned["sparsity"]
    assert unmerged["sparsity"] == pruned["sparsity"]  # the frozen sparse base, plus a dense adapter
    # merging LoRA changes where the numbers are stored, not the function
    assert merged["ppl_tinystories"] == pytest.approx(unmerged["ppl_tinystories"], rel=1e-4)
    assert spp["trainable"] > 0 and merged["trainable"] > 0


def test_recovered_fraction_follows_the_log_perplexity_formula(tiny_run):
    _, report, _, _ = tiny_run
    dense = next(r for r in report["rows"] if r["method"] == "dense")
    (pruned,) = rows_by(report, "none")
    assert pruned["recovered_tinystories"] == 0
    for row in report["rows"]:
        if row["method"] == "dense":
            continue
        for name in ("tinystories", "wikitext"):
            lost = math.log(pruned[f"ppl_{name}"]) - math.log(dense[f"ppl_{name}"])
            expected = (math.log(pruned[f"ppl_{name}"]) - math.log(row[f"ppl_{name}"])) / lost
            assert row[f"recovered_{name}"] == pytest.approx(expected)


def test_every_adapter_starts_from_the_pruned_model_on_the_same_batch(tiny_run):
    """Zero-initialised β (SPP) and B (LoRA): step 1's loss is the pruned model's on the same data."""
    _, report, _, _ = tiny_run
    losses = {key: rec["train"]["losses"] for key, rec in report["records"].items() if "train" in rec}
    assert set(losses) == {"wanda-50pct-s0-spp", "wanda-50pct-s0-lora"}
    assert all(len(v) == report["settings"]["steps"] for v in losses.values())
    first = [v[0] for v in losses.values()]
    assert first[0] == pytest.approx(first[1], rel=1e-5)
    assert all(math.isfinite(x) for v in losses.values() for x in v)


def test_a_rerun_resumes_from_the_cache_and_recomputes_only_what_is_missing(study, tiny_run):
    argv, report, _, work = tiny_run
    (work / "cells" / "wanda-50pct-s0-spp.json").unlink()  # as if interrupted before this cell finished
    again = study.main(argv)
    runs = json.loads((work / "runs.json").read_text())
    assert [r["cells_computed"] for r in runs] == [4, 1]
    before = {r["recovery"]: r["ppl_tinystories"] for r in report["rows"]}
    after = {r["recovery"]: r["ppl_tinystories"] for r in again["rows"]}
    assert after == pytest.approx(before, rel=1e-6)  # the recomputed cell gives the same numbers


def test_the_full_grid_has_the_issue_cells(study):
    cells = study.grid("full")
    keys = [c.key for c in cells]
    assert len(keys) == len(set(keys))
    seeded = 2 * 2 * 3 * 4  # {wanda, sparsegpt} × {50%, 2:4} × 3 seeds × {none, spp, lora, hira}
    single = (3 * 3 - 4) * 4  # the other method × pattern pairs, one seed
    row_groups = 2 * 2 * 3  # SPP at 3 more row-group settings on the seeded pairs
    assert len(cells) == 1 + seeded + single + row_groups
    first_seed = 1 + 3 * 3 * 4  # dense, then every seed-0 default cell runs first
    assert all(c.seed == 0 and c.row_groups is None for c in cells[:first_seed])
    assert {c.pattern for c in cells} == {"0%", "50%", "75%", "2:4"}
    with pytest.raises(study.SppError, match="--grid"):
        study.grid("huge")


def test_split_halves_cuts_at_a_line_break_after_the_middle(study):
    text = "aaaa\nbbbbbb\ncc\n"
    first, second = study.split_halves(text)
    assert first + second == text
    assert first.endswith("\n") and len(first) >= len(text) // 2
    assert first == "aaaa\nbbbbbb\n"


def test_row_groups_above_the_smallest_layer_are_refused_before_any_work(study, shared_data):
    model = str(shared_data / "stories260K-hf")  # k_proj / v_proj have 32 output rows
    study.check_row_groups(model, [study.Cell("wanda", "50%", "spp", 0, 32)], 16)
    with pytest.raises(study.SppError, match="32 output rows"):
        study.check_row_groups(model, [study.Cell("wanda", "50%", "spp", 0, 64)], 16)
    with pytest.raises(study.SppError, match="at most 32"):
        study.check_row_groups(model, [study.Cell("wanda", "50%", "spp")], 33)


def test_report_only_lists_the_cells_the_cache_lacks(study, tiny_run, tmp_path):
    import shutil

    argv, _, _, work = tiny_run
    copy = tmp_path / "work"
    shutil.copytree(work, copy)
    (copy / "cells" / "wanda-50pct-s0-lora.json").unlink()
    args = list(argv)
    args[args.index("--work") + 1], args[args.index("--out") + 1] = str(copy), str(tmp_path / "out")
    report = study.main(args + ["--report-only"])
    assert report["missing"] == ["wanda-50pct-s0-lora"]
    assert {r["recovery"] for r in report["rows"]} == {"none", "spp"}
    assert "Not run: 1 cells" in (tmp_path / "out" / "study.md").read_text()
    runs = json.loads((copy / "runs.json").read_text())
    assert len(runs) == len(json.loads((work / "runs.json").read_text()))  # a report-only call runs nothing


def test_the_report_tables_accept_a_partial_grid(study, tiny_run):
    """Only seed-1 cells and no dense model (an interrupted or filtered study): tables still build."""
    import study_report  # on sys.path since the study script was loaded

    _, report, _, _ = tiny_run
    rows = [{**r, "seed": 1} for r in report["rows"] if r["method"] != "dense"]
    text = study_report.cost_table(rows, show_memory=False)
    assert text.count("\n") == 1 + len({r["recovery"] for r in rows})  # header rule + one line per recovery
    assert study_report.recovered_fraction(10.0, 10.0, 5.0) == 0
    assert study_report.recovered_fraction(10.0, 5.0, 5.0) == 1
    assert study_report.recovered_fraction(5.0, 4.0, 5.0) is None  # pruning lost nothing
