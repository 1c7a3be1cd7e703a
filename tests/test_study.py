"""The study script in miniature (`scripts/study.py --grid tiny`): a few steps on a couple of cells of
stories260K through spp's own prune, train, merge and perplexity entries, so the study cannot rot. Checks the
outputs against each other and against formulas, never against stored numbers."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    if str(REPO / "scripts") not in sys.path:  # as `python scripts/NAME.py` has it: its helper modules beside it
        sys.path.insert(0, str(REPO / "scripts"))
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
    argv = ["--grid", "tiny", "--out", str(root / "out"), "--work", str(root / "work"),
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
                                                      "study_lr_sweep.png", "study_ppl_vs_sparsity.png"]
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "study.json").read_text())
    assert saved["cells"] == report["cells"] == ["dense-0pct-s0-none", "wanda-50pct-s0-none", "wanda-50pct-s0-spp",
                                                  "wanda-50pct-s0-masked_lora", "wanda-50pct-s0-full",
                                                  "wanda-50pct-s0-lora", "wanda-50pct-s0-hira", "wanda-50pct-s0-spp-kd"]
    markdown = (out / "study.md").read_text()
    assert {r["recovery"] for r in saved["rows"]} == {"none", "spp", "masked_lora", "full", "hira", "lora-merged",
                                                      "lora-unmerged"}
    for row in saved["rows"]:  # every perplexity in the JSON is in the tables, formatted as the report formats it
        assert f"| {row['ppl_tinystories']:.3f} |" in markdown or f"| {row['ppl_tinystories']:.1f} |" in markdown
    assert "minutes on" in markdown


def test_sparsity_preserving_merges_keep_every_pruned_zero_and_lora_merge_loses_them(tiny_run):
    _, report, _, _ = tiny_run
    (pruned,), (merged,), (unmerged,) = (rows_by(report, k) for k in ("none", "lora-merged", "lora-unmerged"))
    assert pruned["sparsity"] == pytest.approx(0.5)  # Wanda 50 %: half of every row
    keeping = [r for k in ("spp", "masked_lora", "full", "hira") for r in rows_by(report, k)]
    assert len(keeping) == 5  # SPP twice (with and without distillation)
    for row in keeping:
        assert row["sparsity"] == pruned["sparsity"]
        assert row["pruned_not_plus_zero"] == 0  # bitwise +0.0 where the mask says pruned
    spp = next(r for r in keeping if r["recovery"] == "spp")
    assert merged["sparsity"] < pruned["sparsity"]
    assert merged["pruned_not_plus_zero"] > 0
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
    """Every adapter starts as the identity (β, B zero; full's update zero): step 1's cross-entropy is the
    pruned model's on the same data, distilling or not."""
    _, report, _, _ = tiny_run
    losses = {key: rec["train"]["losses"] for key, rec in report["records"].items() if "train" in rec}
    assert len(losses) == 6
    assert all(len(v) == report["settings"]["steps"] for v in losses.values())
    first = [v[0] for v in losses.values()]
    assert first == pytest.approx([first[0]] * len(first), rel=1e-5)
    assert all(math.isfinite(x) for v in losses.values() for x in v)
    kd = report["records"]["wanda-50pct-s0-spp-kd"]["train"]["kd_losses"]
    assert len(kd) == report["settings"]["steps"] and all(x >= 0 for x in kd)  # a KL divergence


def test_a_rerun_resumes_from_the_cache_and_recomputes_only_what_is_missing(study, tiny_run):
    argv, report, _, work = tiny_run
    (work / "cells" / "wanda-50pct-s0-spp.json").unlink()  # as if interrupted before this cell finished
    again = study.main(argv)
    runs = json.loads((work / "runs.json").read_text())
    assert [r["cells_computed"] for r in runs] == [8, 1]
    before = {r["recovery"]: r["ppl_tinystories"] for r in report["rows"]}
    after = {r["recovery"]: r["ppl_tinystories"] for r in again["rows"]}
    assert after == pytest.approx(before, rel=1e-6)  # the recomputed cell gives the same numbers


def fake_records(study, cells, val_nll):
    """Cell records as the cache holds them, with validation NLL `val_nll(cell)` (None: diverged)."""
    out = {}
    for c in cells:
        value = val_nll(c)
        out[c.key] = ({"cell": {}, "diverged": 7, "rows": []} if value is None
                      else {"cell": {}, "rows": [{"val_nll": value}]})
    return out


def test_the_full_grid_sweeps_then_seeds_then_distils(study):
    cells, sweeps = study.plan("full", {})
    keys = [c.key for c in cells]
    assert len(keys) == len(set(keys))
    assert keys[:4] == ["dense-0pct-s0-none", "wanda-2of4-s0-none", "wanda-2of4-s1-none", "wanda-2of4-s2-none"]
    assert len(cells) == 4 + sum(len(g) for g in study.LR_GRIDS.values())  # KD waits for its twin's choice
    assert all(c.seed == 0 and not c.distill for c in cells[4:])
    assert all(study.COMMON_RATE in g and len(g) >= 3 for g in study.LR_GRIDS.values())
    assert max(study.LR_GRIDS["lora"]) >= 4e-2
    # every rate has an interior minimum: each recipe chooses it, runs 2 more seeds, and KD starts around it
    best = {k: sorted(g)[1] for k, g in study.LR_GRIDS.items()}
    records = fake_records(study, cells, lambda c: abs(math.log(c.lr / best[c.adapter])) if c.lr else 5.0)
    cells, sweeps = study.plan("full", records)
    assert all(sweeps[f"wanda/2:4/{k}/"]["best"] == best[k] for k in best)
    seeded = {c.adapter for c in cells if c.seed > 0 and c.adapter != "none"}
    assert seeded == set(study.HEADLINE_KINDS)  # HiRA is not a headline candidate: one seed
    assert all(c.lr == best[c.adapter] for c in cells if c.seed > 0 and c.adapter != "none")
    kd = [c for c in cells if c.distill == "kd" and c.seed == 0]
    assert sorted(c.lr for c in kd if c.adapter == "spp") == list(study.kd_grid(best["spp"]))
    # KD seeds only where KD beat its cross-entropy twin on validation (here: SPP)
    records.update(fake_records(study, kd, lambda c: abs(math.log(c.lr / best[c.adapter])) - (
        1.0 if c.adapter == "spp" else -1.0)))
    cells, _ = study.plan("full", records)
    assert {c.adapter for c in cells if c.distill and c.seed > 0} == {"spp"}
    with pytest.raises(study.SppError, match="--grid"):
        study.plan("huge", {})


def test_a_sweep_whose_best_rate_is_at_an_edge_is_extended_then_stops(study):
    recipe = ("wanda", "2:4", "lora", "")

    def run(val_nll):
        records = {}
        while True:
            found = study.sweep(recipe, records, 0)
            todo = [lr for lr in found["rates"] if study.Cell(*recipe[:3], 0, lr).key not in records]
            if not todo:
                return found
            records.update(fake_records(study, [study.Cell(*recipe[:3], 0, lr) for lr in todo],
                                        lambda c: val_nll(c.lr)))

    found = run(lambda lr: -lr)  # always better higher: two rungs up, then it stops at the edge
    assert found["rates"][-2:] == [8e-2, 1.6e-1] and found["best"] == 1.6e-1 and found["edge"]
    found = run(lambda lr: abs(math.log(lr / 8e-2)))  # the first extension finds the minimum inside
    assert found["best"] == 8e-2 and not found["edge"] and found["rates"][-1] == 1.6e-1
    found = run(lambda lr: None if lr >= 2e-2 else lr)  # high rates diverge, the lowest is best: extended down
    assert found["rates"][0] < min(study.LR_GRIDS["lora"]) and found["best"] == found["rates"][0]


def test_split_halves_cuts_at_a_line_break_after_the_middle(study):
    text = "aaaa\nbbbbbb\ncc\n"
    first, second = study.split_halves(text)
    assert first + second == text
    assert first.endswith("\n") and len(first) >= len(text) // 2
    assert first == "aaaa\nbbbbbb\n"


def test_row_groups_above_the_smallest_layer_are_refused_by_spp_train(study, tiny_run, capsys):
    """SPP needs r ≤ the output rows of every adapted layer: `spp train` refuses, naming the layer, and the study
    stops with that one-line error."""
    argv, _, _, _ = tiny_run
    with pytest.raises(SystemExit) as stopped:  # k_proj / v_proj of stories260K have 32 output rows
        study.main(argv + ["--spp-row-groups", "64", "--only", "wanda-50pct-s0-spp"])
    assert stopped.value.code == 1
    assert "32 output rows, fewer than spp_row_groups=64" in capsys.readouterr().err


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
    assert {r["recovery"] for r in report["rows"]} == {"none", "spp", "masked_lora", "full", "hira"}
    assert "Not run: 1 cells" in (tmp_path / "out" / "study.md").read_text()
    runs = json.loads((copy / "runs.json").read_text())
    assert len(runs) == len(json.loads((work / "runs.json").read_text()))  # a report-only call runs nothing


def test_the_report_tables_accept_a_partial_grid(study, tiny_run):
    """Only seed-1 cells and no dense model (an interrupted or filtered study): tables still build."""
    import study_report  # beside the study script, on sys.path since it was loaded

    _, report, _, _ = tiny_run
    rows = [{**r, "seed": 1} for r in report["rows"] if r["method"] != "dense"]
    text = study_report.cost_table(rows)
    trained = {(r["adapter"], r["distill"]) for r in rows if r["adapter"] != "none"}
    assert text.count("\n") == 1 + len(trained)  # header rule + one line per recovery and objective
    from spp.report import gap_recovered  # the study's recovered fraction: (dense, pruned, after)

    assert gap_recovered(5.0, 10.0, 10.0) == 0
    assert gap_recovered(5.0, 10.0, 5.0) == 1
    assert gap_recovered(5.0, 5.0, 4.0) is None  # pruning lost nothing


def test_the_bar_and_owl_ria_presets_write_their_pages_through_the_cli(study, shared_data, tmp_path):
    """Two more presets in miniature, a few cells each: the page's table, verdicts and commands come from the run."""
    common = ["--grid", "tiny", "--model", str(shared_data / "stories260K-hf"),
              "--text", str(shared_data / "tinystories" / "tinystories_val.txt")]
    report = study.main(common + ["--preset", "bar", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "bar"),
                                  "--only", "dense*,wanda-2of4-s0-none,wanda-2of4-s0-spp,wanda-2of4-s0-lora-lr0.01"])
    page = (tmp_path / "out" / "recovery_bar.md").read_text()
    assert "| recovery | lr | PPL (held-out) | recovered | sparsity after merge |" in page
    (spp,) = [r for r in report["bar_rows"] if r["kind"] == "spp"]
    (lora,) = [r for r in report["bar_rows"] if r["kind"] == "lora"]
    assert spp["pruned_not_plus_zero"] == 0 and spp["verify_exit"] == 0 and lora["pruned_not_plus_zero"] > 0
    assert spp["lr"] == 0.08 and lora["lr"] == 0.01  # tinystories.yaml's rate for spp; the cell's for PEFT LoRA
    assert "spp train --config tinystories.yaml" in page and "`adapter: spp` at the config's default rate" in page
    report = study.main(common + ["--preset", "owl_ria", "--seeds", "0", "--kinds", "", "--out", str(tmp_path / "out"),
                                  "--work", str(tmp_path / "owl"),
                                  "--only", "dense*,wanda-70pct-*,wanda-owl-70pct-*,wanda-2of4-*,ria-2of4-*"])
    page = (tmp_path / "out" / "owl_ria.md").read_text()
    assert page.count("**met**") + page.count("**not met**") == 3
    owl = next(r for r in report["records"].values() if r["cell"]["owl"])
    assert owl["prune"]["owl"]["outlier_share"] and "| model.layers.0 |" in page
