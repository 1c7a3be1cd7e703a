"""`spp prune --method alps`, `--refine dsnot` and the recorded reconstruction error, end to end on tiny models.

The pure functions are tested in `test_alps.py` and `test_dsnot.py`; here: exact sparsity in each base method's
comparison group after the CLI and `spp verify`, DSnoT's guard on real layers, the manifest's reconstruction error
against a direct computation from the layer's inputs, and the one-line refusals. ALPS's kill/resume is in
`test_faults.py`, its expert weights in `test_moe_prune.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from spp.cli import app
from spp.config import PruneConfig
from spp.errors import SppError
from spp.io.checkpoint import MASK_FILE
from spp.io.maskfile import load_masks
from conftest import one_line_error
from test_prune import save_tiny, saved_tensors, write_text

COMMON = ["--nsamples", "4", "--seqlen", "32", "--device", "cpu", "--set", "dsnot_threshold=0"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny 2-block LLaMA (hidden 32, MLP 64 in test configs) and a calibration text."""
    root = tmp_path_factory.mktemp("methods")
    return save_tiny("llama", root / "model"), write_text(root / "calib.txt")


def prune(tiny, out: Path, *flags: str):
    model, calib = tiny
    result = CliRunner().invoke(app, ["prune", "--model", str(model), "--calib", str(calib), "--output", str(out),
                                      *COMMON, *flags], terminal_width=200)
    assert result.exit_code == 0, result.output
    verified = CliRunner().invoke(app, ["verify", str(out)], terminal_width=200)
    assert verified.exit_code == 0 and "ok:" in verified.stdout, verified.output
    return result, verified, json.loads((out / "spp_manifest.json").read_text())["details"]


def row_pruned(out: Path) -> dict[str, torch.Tensor]:
    """Saved masked tensor -> pruned count per row, (out,)."""
    masks, _ = load_masks(out / MASK_FILE)
    return {name: (~keep).sum(dim=1) for name, keep in masks.items()}


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_alps_prunes_exactly_and_records_its_error(tiny, tmp_path, pattern):
    flags = ["--sparsity", "0.6"] if pattern == "unstructured" else ["--pattern", "2:4"]
    result, verified, details = prune(tiny, tmp_path / "alps", "--method", "alps", *flags)
    masks, _ = load_masks(tmp_path / "alps" / MASK_FILE)
    for name, keep in masks.items():
        out_f, in_f = keep.shape
        if pattern == "unstructured":  # ALPS projects per layer: exactly floor(out·in·s) in the layer
            assert int((~keep).sum()) == int(out_f * in_f * 0.6 + 1e-9), name
        else:
            assert bool((keep.reshape(out_f, -1, 4).sum(-1) == 2).all()), name
        record = details["modules"][name]
        cap = 15 if pattern == "unstructured" else 30  # the default caps (spp.prune.alps.default_iters)
        assert 0 < record["reconstruction_error"] < 1 and record["alps"]["admm_iterations"] <= cap
    # ALPS's error is the layer-wise objective it minimises: below SparseGPT's on most layers
    _, _, sparsegpt = prune(tiny, tmp_path / "sgpt", "--method", "sparsegpt", *flags)
    lower = [details["modules"][n]["reconstruction_error"] <= sparsegpt["modules"][n]["reconstruction_error"] * 1.001
             for n in masks]
    assert sum(lower) >= 0.8 * len(lower), lower
    assert "recon. error" in result.stdout and "mean relative reconstruction error" in result.stdout
    assert "recon. error" in verified.stdout  # spp verify shows what the manifest recorded
    for block, row in details["blocks"].items():
        mine = [m["reconstruction_error"] for n, m in details["modules"].items() if n.startswith(block + ".")]
        assert row["reconstruction_error"] == pytest.approx(sum(mine) / len(mine))


CELLS = [(method, pattern) for method in ("wanda", "sparsegpt", "ria", "magnitude", "alps")
         for pattern in ("unstructured", "2:4")]


@pytest.mark.parametrize("method,pattern", CELLS, ids=[f"{m}-{p}" for m, p in CELLS])
def test_dsnot_keeps_the_base_methods_counts_and_its_guard_never_raises_the_error(tiny, tmp_path, method, pattern):
    flags = ["--method", method] + (["--sparsity", "0.6"] if pattern == "unstructured" else ["--pattern", "2:4"])
    _, _, base = prune(tiny, tmp_path / "base", *flags, "--record-error")
    result, _, details = prune(tiny, tmp_path / "dsnot", *flags, "--refine", "dsnot")
    before, after = row_pruned(tmp_path / "base"), row_pruned(tmp_path / "dsnot")
    masks, _ = load_masks(tmp_path / "dsnot" / MASK_FILE)
    for name, keep in masks.items():
        assert int(before[name].sum()) == int(after[name].sum()), name  # the layer's count, whatever its inputs
        if name.startswith("model.layers.0.") or method == "wanda":  # the same base mask: every swap inside a row
            assert torch.equal(before[name], after[name]), name
        if pattern == "2:4":
            assert bool((keep.reshape(keep.shape[0], -1, 4).sum(-1) == 2).all()), name
        record = details["modules"][name]
        refine = record["refine"]  # the guard is on by default: the full H, so the error never rises
        assert record["reconstruction_error"] <= refine["reconstruction_error_before"] * (1 + 1e-6), name
        if name.startswith("model.layers.0."):  # same inputs as the base run (later blocks see a different block 0)
            assert refine["reconstruction_error_before"] == pytest.approx(base["modules"][name]["reconstruction_error"])
    totals = details["refine"]
    assert totals["method"] == "dsnot" and totals["guard"] is True and totals["layers"] == len(masks)
    assert totals["reconstruction_error_after"] <= totals["reconstruction_error_before"]
    if method in ("wanda", "ria", "magnitude"):
        assert totals["swaps"] > 0  # not vacuous: the threshold is 0 here
        tensors, dense = saved_tensors(tmp_path / "dsnot"), saved_tensors(tiny[0])
        for name, keep in masks.items():  # a regrown weight of a mask-only method is its dense value
            assert torch.equal(tensors[name], torch.where(keep, dense[name], torch.zeros(()))), name
    assert f"{method} + dsnot" in result.stdout and "swaps in" in result.stdout


def test_dsnot_without_the_guard_follows_the_expected_error(tiny, tmp_path):
    _, _, details = prune(tiny, tmp_path / "off", "--method", "wanda", "--refine", "dsnot", "--no-dsnot-guard")
    assert details["refine"]["guard"] is False and details["refine"]["swaps"] > 0
    assert "reconstruction_error_before" not in details["refine"]  # no H held without the guard
    assert all("reconstruction_error" not in m for m in details["modules"].values())
    assert details["refine"]["expected_error_after"] < details["refine"]["expected_error_before"]
    assert PruneConfig(model="m", output="o", dsnot_guard=False).dsnot_guard is False


def test_sparsegpt_dsnot_stays_inside_its_column_blocks(tiny, tmp_path):
    """SparseGPT unstructured prunes floor(out·b·s) in every block of b columns; DSnoT swaps inside them."""
    flags = ["--method", "sparsegpt", "--sparsity", "0.6", "--set", "blocksize=8"]
    prune(tiny, tmp_path / "base", *flags)
    _, _, details = prune(tiny, tmp_path / "dsnot", *flags, "--refine", "dsnot")
    a, _ = load_masks(tmp_path / "base" / MASK_FILE)
    b, _ = load_masks(tmp_path / "dsnot" / MASK_FILE)
    assert details["refine"]["swaps"] > 0
    for name in a:
        blocks = lambda keep: (~keep).reshape(keep.shape[0], -1, 8).sum(-1)  # noqa: E731  (out, in/8)
        assert torch.equal(blocks(a[name]).sum(0), blocks(b[name]).sum(0)), name  # floor(out·8·s) in each block
        if name.startswith("model.layers.0."):  # the same base mask: each row keeps its count in each block
            assert torch.equal(blocks(a[name]), blocks(b[name])), name


def test_reconstruction_error_equals_a_direct_computation(tiny, tmp_path):
    """The manifest's error of the first layer is ‖X(W − Ŵ)ᵀ‖²/‖XWᵀ‖² with X its inputs on the calibration windows."""
    from spp.data import calibration_windows
    from spp.models import load_model, load_tokenizer

    model_dir, calib = tiny
    for method in ("wanda", "sparsegpt"):
        out = tmp_path / method
        _, _, details = prune(tiny, out, "--method", method, "--record-error")
        name = "model.layers.0.self_attn.q_proj.weight"
        dense = load_model(str(model_dir), "float32", "cpu")
        windows = calibration_windows(load_tokenizer(str(model_dir)), str(calib), 4, 32, 0)
        captured = []
        layer = dense.model.layers[0].self_attn.q_proj
        handle = layer.register_forward_hook(lambda m, args, out: captured.append(args[0].reshape(-1, args[0].shape[-1])))
        with torch.no_grad():
            dense(input_ids=windows)
        handle.remove()
        X = torch.cat(captured).double()
        W, W_hat = layer.weight.detach().double(), saved_tensors(out)[name].double()
        direct = float(((X @ (W - W_hat).t()) ** 2).sum() / ((X @ W.t()) ** 2).sum())
        assert details["modules"][name]["reconstruction_error"] == pytest.approx(direct, rel=1e-4)


def test_bad_refine_and_alps_inputs_fail_in_one_line(tiny, tmp_path, monkeypatch):
    model, calib = tiny
    base = ["prune", "--model", str(model), "--output", str(tmp_path / "out"), "--nsamples", "4", "--seqlen", "32",
            "--device", "cpu"]
    cases = [
        (["--calib", str(calib), "--refine", "obs"], r"refine='obs' should be one of 'none', 'dsnot'"),
        (["--calib", str(calib), "--method", "obs", "--refine", "dsnot"], r"method='obs' should be one of"),
        (["--calib", str(tmp_path / "none.txt"), "--method", "magnitude", "--refine", "dsnot"], r"--calib .*none\.txt"),
        (["--calib", str(calib), "--method", "alps", "--alps-iters", "0"], r"--alps-iters=0 is out of range"),
    ]
    for flags, message in cases:
        one_line_error(CliRunner().invoke(app, [*base, *flags]), pattern=message)
        assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing half-written
    # an unusable Hessian: one line naming the layer, and no output or partial left behind
    import spp.prune

    monkeypatch.setattr(spp.prune, "hessian_from_sum", lambda H, n: torch.full_like(H, float("nan")))
    result = CliRunner().invoke(app, [*base, "--calib", str(calib), "--method", "alps"])
    one_line_error(result, pattern=r"module model\.layers\.0\.self_attn\.q_proj: the calibration Hessian has non-finite")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_magnitude_dsnot_without_windows_is_refused():
    from spp.prune import prune_model
    from test_prune import make_model

    cfg = PruneConfig(model="m", output="o", method="magnitude", refine="dsnot", device="cpu")
    with pytest.raises(SppError, match=r"^--refine dsnot needs calibration windows .*--method magnitude; give --calib$"):
        prune_model(make_model("llama"), None, cfg, torch.device("cpu"))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_alps_and_dsnot_in_half_precision(tiny, tmp_path, dtype):
    """Computed in float32 from the stored dtype, written back in it, as SparseGPT: exact 2:4, verify passes."""
    _, _, details = prune(tiny, tmp_path / "out", "--method", "alps", "--pattern", "2:4", "--refine", "dsnot",
                          "--dtype", dtype)
    tensors = saved_tensors(tmp_path / "out")
    for name, record in details["modules"].items():
        assert tensors[name].dtype == getattr(torch, dtype) and 0 < record["reconstruction_error"] < 1, name
