"""spp.report: the numbers the `spp run` report gives (weight sparsity counted in the saved tensors)."""

import json

import pytest
from safetensors.torch import load_file

from conftest import saved_moe
from test_pipeline import cli


def test_sparsity_counts_the_weights_left_dense(tmp_path, shared_data, corpus):
    """`--ignore 'mlp.experts.*'` prunes attention only: eval and the `spp run` report count the dense experts as
    kept, rather than reporting the masked weights' 50% as the model's sparsity."""
    from spp.report import _mask_names, weight_sparsity

    dense = saved_moe(tmp_path / "dense", "mixtral", shared_data)
    cli("prune", "--model", dense, "--method", "magnitude", "--pattern", "2:4", "--ignore", "mlp.experts.*",
        "--output", tmp_path / "pruned")
    state = load_file(str(tmp_path / "pruned" / "model.safetensors"))
    attention = sum(t.numel() for n, t in state.items() if "self_attn" in n and n.endswith("proj.weight"))
    experts = sum(t.numel() for n, t in state.items() if ".experts." in n)
    expected = attention / 2 / (attention + experts)
    result = cli("eval", "--model", tmp_path / "pruned", "--ppl", corpus, "--seqlen", 64, "--max-windows", 1,
                 "--device", "cpu", "--output", tmp_path / "eval")
    sparsity = json.loads((tmp_path / "eval" / "results.json").read_text())["sparsity"]
    assert sparsity["sparsity"] == pytest.approx(expected) and sparsity["masked_sparsity"] == 0.5
    assert sparsity["dense_tensors"] == 2 * 3 * 4 and "24 tensors dense" in result.output
    assert weight_sparsity(tmp_path / "pruned", _mask_names(tmp_path / "pruned")) == pytest.approx(expected)


def test_run_report_gives_each_accuracy_its_stderr_and_the_paired_differences(tmp_path):
    """The results table shows "acc ± stderr"; the paired table has, per setting and task, pruned and merged against
    dense and merged against pruned on the same items, and a mean over the tasks dense is above its baseline on."""
    from spp.eval import _interval
    from spp.eval.uncertainty import mean_difference, paired_difference
    from spp.io.checkpoint import RESULTS_FILE
    from spp.report import _eval_numbers, paired_table, results_table

    def task(items, baseline):  # as results.json holds a zero-shot task
        acc = sum(items) / len(items)
        return {"acc": acc, "acc_stderr": (acc * (1 - acc) / (len(items) - 1)) ** 0.5, "baseline": baseline,
                "item_acc": items, "files": {"test": "sha-of-the-items"}}

    items = {"dense": ([1] * 30 + [0] * 10, [1, 0] * 20), "pruned": ([1] * 20 + [0] * 20, [0, 1] * 20),
             "merged": ([1] * 28 + [0] * 12, [1, 1, 0, 0] * 10)}
    folders = {"dense": tmp_path / "dense", "pruned": tmp_path / "w" / "eval" / "pruned",
               "merged": tmp_path / "w" / "eval" / "merged"}
    for kind, folder in folders.items():
        folder.mkdir(parents=True)
        piqa, boolq = items[kind]
        tasks = {"piqa": task(piqa, 0.5), "boolq": task(boolq, 0.62)}
        (folder / RESULTS_FILE).write_text(json.dumps({"zeroshot": {"tasks": tasks}}))

    rows = [{"model": kind, "setting": "w", **_eval_numbers(folder)} for kind, folder in folders.items()]
    table = results_table(rows, [{"setting": "w"}])
    assert table.splitlines()[0] == "| model | sparsity | piqa acc | boolq acc |"  # no column of its own for stderr
    assert f"| {0.75:.4f} ± {rows[0]['piqa acc stderr']:.4f} |" in table

    lines = paired_table(folders["dense"], ["w"], tmp_path).splitlines()
    assert lines[0] == "| setting | task | pruned − dense | merged − dense | merged − pruned |"
    assert lines[1] == "|:---|:---|---:|---:|---:|"
    cells = {line.split("|")[2].strip(): [c.strip() for c in line.split("|")[3:6]] for line in lines[2:5]}
    assert list(cells) == ["piqa acc", "boolq acc", "mean acc over piqa"]  # boolq: dense 0.5 is below 0.62

    def pair(a, b, task):
        return paired_difference(items[a][task], items[b][task])

    assert cells["piqa acc"] == [_interval(pair("dense", "pruned", 0)), _interval(pair("dense", "merged", 0)),
                                 _interval(pair("pruned", "merged", 0))]
    assert cells["boolq acc"][2] == _interval(pair("pruned", "merged", 1))
    assert cells["mean acc over piqa"][2] == _interval(mean_difference([pair("pruned", "merged", 0)]))
    assert paired_table(tmp_path / "nowhere", ["w"], tmp_path) == ""  # no dense items: no table
