"""The study script in miniature (`scripts/study.py --grid tiny`): a few steps on a couple of cells of
stories260K through spp's own prune, train, merge and perplexity entries, so the study cannot rot. Checks the
outputs against each other and against formulas, never against stored numbers."""

import importlib.util
import json
import math
import os
import socket
import sys
from pathlib import Path
from types import SimpleNamespace

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


# --------------------------------------------------------------------------- the SmolLM2 study (issue 28), on fixtures


def smollm2_record(study, cell, ppl=None, val_nll=None, sparsity=0.5, bad=0, items=None):
    """A cell record as `run_cell` / `score_cell` write it: a model row, or (zeroshot) its tasks from 0/1 `items`."""
    record = {"key": cell.key, "cell": study.asdict(cell), "rows": [], "learning_rate": cell.lr, "cpu_s": 60.0}
    if cell.zeroshot:
        tasks = {}
        for name, (acc, baseline) in items.items():
            n, mean = len(acc), sum(acc) / len(acc)
            tasks[name] = {"acc": mean, "acc_stderr": math.sqrt(mean * (1 - mean) / (n - 1)), "item_acc": acc,
                           "baseline": baseline}
        record.update(of=study.dataclasses.replace(cell, zeroshot=False).key, zeroshot={"tasks": tasks})
    else:
        record["rows"] = [{"recovery": cell.adapter if cell.adapter != "lora" else "lora-merged",
                           "ppl": {"wikitext": ppl, "val": math.exp(val_nll or 3.0)},
                           "nll": {"val": val_nll, "wikitext": math.log(ppl)}, "val_nll": val_nll,
                           "sparsity": sparsity, "pruned_not_plus_zero": bad, "verify_exit": 0}]
    return record


def test_the_smollm2_base_of_each_pattern_is_the_best_pruned_in_the_cache(study):
    records = {}
    for method, ppl in (("wanda", 212.5), ("sparsegpt", 116.5), ("alps", 101.9)):
        assert study.best_pruned(records, "2:4") is None  # until every method's pruned model is measured
        records[study.Cell(method, "2:4").key] = smollm2_record(study, study.Cell(method, "2:4"), ppl)
    assert study.best_pruned(records, "2:4") == "alps"
    records[study.Cell("alps", "2:4").key]["rows"][0]["ppl"]["wikitext"] = 300.0
    assert study.best_pruned(records, "2:4") == "sparsegpt"  # read from the cache, not fixed
    cells, _ = study.plan_smollm2("full", ("full", "spp", "masked_lora", "lora"), (0,), records)
    recovered = {c.method for c in cells if c.adapter != "none" and c.pattern == "2:4"}
    assert recovered == {"sparsegpt"}
    assert not any(c.adapter != "none" for c in cells if c.pattern == "70%")  # its pruned cells are not in yet


def test_the_smollm2_plan_runs_defaults_first_then_sweeps_then_scores_the_chosen_rate(study):
    from spp.config import read_yaml

    kinds = ("full", "spp", "masked_lora", "lora")
    cells, _ = study.plan_smollm2("full", kinds, (0,), {})
    pruned = [c for c in cells if not c.zeroshot]
    assert len(pruned) == 1 + 9 and {(c.method, c.pattern) for c in pruned[1:]} == {
        (m, p) for m in study.SMOLLM2_METHODS for p in study.SMOLLM2_PATTERNS}
    rates = read_yaml(REPO / "configs" / "smollm2.yaml")["learning_rate"]
    for (adapter, _, objective), grid in study.SMOLLM2_RECIPES.items():
        assert len(grid) == (1 if objective == "blockwise" else 3) and all(lr in study.SMOLLM2_LADDER for lr in grid)
        if not objective and adapter in rates:
            assert grid[1] == rates[adapter]  # the middle rung is the config's default rate
    records = {c.key: smollm2_record(study, c, 100.0 if c.method == "alps" else 200.0) for c in pruned}
    cells, sweeps = study.plan_smollm2("full", kinds, (0,), records)
    todo = [c for c in cells if c.key not in records]
    defaults = todo[:len(study.SMOLLM2_RECIPES) * 2]
    assert [c.pattern for c in defaults] == ["70%"] * 5 + ["2:4"] * 5  # 70% first, every recipe at its default rate
    middle = {recipe: grid[len(grid) // 2] for recipe, grid in study.SMOLLM2_RECIPES.items()}
    assert all(c.method == "alps" and c.lr == middle[(c.adapter, c.distill, c.objective)] and not c.zeroshot
               for c in defaults)
    assert todo[10:13] == [study.Cell("dense", "0%", zeroshot=True), study.Cell("alps", "70%", zeroshot=True),
                           study.Cell("alps", "2:4", zeroshot=True)]
    # no rate chosen yet: no recovery scored but Alpaca's (one cell, at alpaca.yaml's rate)
    assert [c.key for c in todo if c.zeroshot and c.adapter != "none"] == ["alps-2of4-s0-spp-alpaca-zeroshot"]
    assert todo[-1].zeroshot and todo[-1].adapter == "none"  # the other pruned models are scored last
    # every rate runs; the spp sweep's best is its top rung each time: extended twice upwards, then chosen at the edge
    for _ in range(4):
        runs = [c for c in cells if c.lr is not None and not c.zeroshot and c.key not in records]
        records.update({c.key: smollm2_record(study, c, 80.0, (-c.lr if c.adapter == "spp" else abs(
            math.log(c.lr / middle[(c.adapter, c.distill, c.objective)])))) for c in runs})
        cells, sweeps = study.plan_smollm2("full", kinds, (0,), records)
    spp = sweeps["2:4/spp/kd/"]
    assert spp["rates"] == [1e-3, 4e-3, 1.2e-2, 4e-2, 1.2e-1] and spp["best"] == 1.2e-1 and spp["edge"]
    blockwise = sweeps["70%/full//blockwise"]  # one rate, not swept: never extended, though it is both edges
    assert blockwise["rates"] == [1e-3] and blockwise["best"] == 1e-3 and not blockwise["edge"]
    scored = [c for c in cells if c.zeroshot and c.adapter != "none"]
    assert {(c.pattern, c.adapter, c.objective, c.lr) for c in scored if c.data == "c4"} == {
        (p, a, o, 1.2e-1 if a == "spp" else middle[(a, d, o)]) for p in ("70%", "2:4") for (a, d, o) in
        study.SMOLLM2_RECIPES}
    (alpaca,) = [c for c in cells if c.data == "alpaca" and not c.zeroshot]
    assert (alpaca.method, alpaca.pattern, alpaca.adapter) == ("alps", "2:4", "spp")
    settings = study.StudySettings(**study.PRESETS["smollm2"][0])
    data = study.StudyData("calib", {"c4": "c4_train.txt", "alpaca": "alpaca.json"}, "val.txt", {}, {})
    argv = " ".join(study.train_command(alpaca, settings, data, Path("p"), Path("o"), "smollm2.yaml"))
    assert "--config alpaca.yaml" in argv and "--max-steps 20" in argv and "--teacher" not in argv
    assert all(f"--set {x}" in argv for x in study.ALPACA_SHRINK)
    blockwise = next(c for c in cells if c.objective == "blockwise")
    argv = " ".join(study.train_command(blockwise, settings, data, Path("p"), Path("o"), "smollm2.yaml"))
    assert "--set objective=blockwise --set nsamples=320" in argv and "--max-steps" not in argv  # 320 x 256 tokens
    assert f"--teacher {settings.model}" in argv and "kd_weight" not in argv


def test_kept_models_are_the_best_rate_of_each_recipe_until_scored(study, tmp_path):
    cells = [study.Cell("alps", "2:4", "spp", lr=lr, distill="kd", data="c4") for lr in (1e-3, 4e-3, 1.2e-2)]
    running = study.Cell("alps", "2:4", "spp", lr=4e-2, distill="kd", data="c4")  # another worker's, unsaved
    for c in cells + [running]:
        (tmp_path / "kept" / c.key).mkdir(parents=True)
    records = {c.key: smollm2_record(study, c, 80.0, abs(math.log(c.lr / 4e-3))) for c in cells}
    study.tidy_kept(tmp_path, records)
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == sorted([cells[1].key, running.key])
    final = study.dataclasses.replace(cells[1], zeroshot=True)
    records[final.key] = smollm2_record(study, final, items={"piqa": ([1, 0], 0.5)})
    study.tidy_kept(tmp_path, records)
    assert [p.name for p in (tmp_path / "kept").iterdir()] == [running.key]


def test_workers_sharing_a_work_directory_run_different_cells(study, tmp_path, monkeypatch):
    cells = [study.Cell(m, "2:4", zeroshot=True) for m in ("wanda", "sparsegpt", "alps")]
    s, ran = study.StudySettings(), []

    def run_cell(cell, *args):
        ran.append(cell.key)
        return {**smollm2_record(study, cell, items={"piqa": ([1, 0], 0.5)}), "settings_sha256": s.sha256(),
                "wall_s": 1.0, "zeroshot": {"mean_acc": 0.5}}

    def other_worker_finishes(seconds):  # the fake clock: while this worker waits, the holder saves its cell
        assert seconds == study.CLAIM_POLL_S
        study.save_record(tmp_path, cells[0], run_cell(cells[0]) | {"by": "the other worker"})
        held.unlink()

    held = study.lock_path(tmp_path / "claims" / cells[0].key)  # as another live process (our parent) holds it
    held.parent.mkdir()
    held.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    assert study.claim(tmp_path, cells[0]) is None
    monkeypatch.setattr(study, "run_cell", run_cell)
    monkeypatch.setattr(study.time, "sleep", other_worker_finishes)
    monkeypatch.setattr(study, "tidy_kept", lambda *a: None)
    timing = study.run_grid(lambda records: (cells, {}), s, tmp_path, SimpleNamespace(split={}), "",
                            log=lambda line: None)
    assert ran == [cells[1].key, cells[2].key, cells[0].key]  # the held cell skipped, then run by the other
    assert timing["cells_computed"] == 2
    assert study.cached_records(tmp_path, s)[cells[0].key]["by"] == "the other worker"
    assert not list((tmp_path / "claims").glob("*.lock"))  # every lock released


def smollm2_fixture(study):
    """Dense, two pruned 2:4 models, three chosen recoveries of the best and PEFT LoRA, each scored on 3 tasks."""
    import random

    rng = random.Random(0)

    def items(p, n=200):
        return [int(rng.random() < p) for _ in range(n)]

    dense_items = {"piqa": (items(0.65), 0.5), "arc_easy": (items(0.5), 0.25), "boolq": (items(0.5), 0.62)}
    models = [(study.Cell("dense", "0%"), 29.2, None, 0.0, 0, 1.0),
              (study.Cell("wanda", "2:4"), 212.5, None, 0.5, 0, 0.8),
              (study.Cell("alps", "2:4"), 101.9, None, 0.5, 0, 0.85),
              (study.Cell("alps", "2:4", "full", lr=1e-4, distill="kd", data="c4"), 70.0, 3.30, 0.5, 0, 0.95),
              (study.Cell("alps", "2:4", "spp", lr=1.2e-2, distill="kd", data="c4"), 60.0, 3.35, 0.5, 0, 0.97),
              (study.Cell("alps", "2:4", "full", lr=1e-3, data="c4", objective="blockwise"), 90.0, 3.50, 0.5, 0, 0.9),
              (study.Cell("alps", "2:4", "lora", lr=1e-3, distill="kd", data="c4"), 65.0, 3.32, 0.0, 53084160, 0.96)]
    records, sweeps = {}, {}
    for cell, ppl, val, sparsity, bad, keep in models:
        records[cell.key] = smollm2_record(study, cell, ppl, val, sparsity, bad)
        scored = study.dataclasses.replace(cell, zeroshot=True)
        # each model answers like dense on a share `keep` of the items, otherwise wrong
        tasks = {t: ([a if rng.random() < keep else 0 for a in acc], b) for t, (acc, b) in dense_items.items()}
        records[scored.key] = smollm2_record(study, scored, items=tasks)
        if cell.lr is not None:
            sweeps["/".join((cell.pattern, cell.adapter, cell.distill, cell.objective))] = {
                "rates": [cell.lr], "best": cell.lr, "edge": False, "grid": [cell.lr]}
    return records, sweeps


def test_the_smollm2_report_pairs_every_model_with_dense_and_lora_and_picks_the_best_on_validation(study):
    import study_report

    from spp.eval.uncertainty import paired_difference

    records, sweeps = smollm2_fixture(study)
    summary = study_report.smollm2_summary(records, sweeps)
    dense = next(m for m in summary["models"] if m["role"] == "dense")
    t = dense["zeroshot"]
    expected = [n for n in t if t[n]["acc"] - t[n]["baseline"] >= 2 * t[n]["acc_stderr"]]
    assert summary["headline_tasks"] == expected and "boolq" not in expected  # boolq's majority rate is 0.62
    by_key = {m["key"]: m for m in summary["models"]}
    spp = by_key["alps-2of4-s0-spp-lr0.012-kd-c4"]
    lora = by_key["alps-2of4-s0-lora-lr0.001-kd-c4"]
    for task in ("piqa", "arc_easy", "boolq"):  # against a hand computation of the paired difference
        d = [b - a for a, b in zip(t[task]["item_acc"], spp["zeroshot"][task]["item_acc"])]
        mean = sum(d) / len(d)
        se = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))
        got = spp["vs_dense"][task]
        assert got["diff"] == pytest.approx(mean) and got["low"] == pytest.approx(mean - 1.959963984540054 * se)
    parts = [paired_difference(lora["zeroshot"][n]["item_acc"], spp["zeroshot"][n]["item_acc"]) for n in expected]
    assert spp["vs_lora"]["mean"]["diff"] == pytest.approx(sum(p.diff for p in parts) / len(parts))
    assert spp["headline_mean"] == pytest.approx(sum(spp["zeroshot"][n]["acc"] for n in expected) / len(expected))
    # the best sparsity-preserving recipe is chosen on validation NLL (full, 3.30), not on WikiText-2 (spp's 60.0)
    assert summary["headline"]["2:4"] == {"best": "alps-2of4-s0-full-lr0.0001-kd-c4", "base": "alps-2of4-s0-none",
                                          "lora": lora["key"], "dense": "dense-0pct-s0-none"}
    assert lora["vs_lora"] is None and dense["vs_dense"] is None
    assert {m["role"] for m in summary["models"]} == {"dense", "pruned", "chosen"}


def test_the_readme_headline_block_is_rendered_from_the_study_json(study, tmp_path):
    import study_report

    records, sweeps = smollm2_fixture(study)
    settings = study.StudySettings(**study.PRESETS["smollm2"][0])
    span = {"span_minutes": 1.0, "cell_minutes": 2.0, "missing": ["x"], "split": {}}
    report = study_report.write_page("smollm2", tmp_path, settings, records, [], span, sweeps=sweeps)
    saved = json.loads((tmp_path / "smollm2.json").read_text())
    block = study_report.smollm2_headline(saved)
    assert block == study_report.smollm2_headline(report)  # the JSON alone renders it
    by_key = {m["key"]: m for m in saved["summary"]["models"]}
    best = by_key[saved["summary"]["headline"]["2:4"]["best"]]
    d = best["vs_lora"]["mean"]
    assert f"| 2:4 | full+kd (lr 0.0001) | 50.0% | {best['ppl']:.1f} | {best['headline_mean']:.3f} |" in block
    assert f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" in block
    assert "53,084,160" in block and "70%" not in block  # only the patterns measured
    assert block in (tmp_path / "smollm2.md").read_text()
    assert "### 2:4" in (tmp_path / "smollm2.md").read_text()
    assert "| 2:4 SPP + KD | {" in (tmp_path / "smollm2.md").read_text()  # each sweep named in words
    assert study_report.sweep_label("70%/full//blockwise") == "70% masked full FT, block-wise"
