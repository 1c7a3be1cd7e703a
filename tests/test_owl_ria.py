"""OWL layerwise sparsity, RIA scores, and --targets/--ignore/sparsity_overrides (issue 14).

The math against formulas (OWL's ratios as properties, RIA against a loop), then the mechanics
on tiny random models: ignored layers untouched, absent from the mask file, unadapted by
`spp train`, merge and verify passing; OWL's ratios recorded and reused by --resume; every bad
input one line on stderr.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import TINY_CONFIGS, one_line_error
from spp.cli import app
from spp.config import PruneConfig
from spp.errors import SppInterrupted
from spp.io.checkpoint import MANIFEST_FILE, MASK_FILE, PRUNE_PROGRESS_DIR, PRUNE_PROGRESS_FILE, partial_path
from spp.io.maskfile import load_masks
from spp.prune.masks import nm_mask, pruned_count, unstructured_mask
from spp.prune.owl import outlier_share, owl_sparsities
from spp.prune.ria import ria_scores
from test_prune import char_tokenizer, saved_tensors, write_text


# --------------------------------------------------------------------------- OWL math


@settings(max_examples=200, deadline=None)
@given(D=st.lists(st.floats(0, 1), min_size=1, max_size=12), data=st.data(),
       s=st.floats(0.1, 0.9), lmbda=st.floats(0.0, 0.2))
def test_owl_sparsities_average_to_s_and_span_two_lambda(D, data, s, lmbda):
    n = data.draw(st.lists(st.integers(1, 10_000), min_size=len(D), max_size=len(D)))
    s_l = owl_sparsities(torch.tensor(D, dtype=torch.float64), torch.tensor(n), s, lmbda)
    weighted_mean = float((s_l * torch.tensor(n, dtype=torch.float64)).sum() / sum(n))
    assert weighted_mean == pytest.approx(s, abs=1e-12)
    assert bool(((s_l >= s - 2 * lmbda - 1e-12) & (s_l <= s + 2 * lmbda + 1e-12)).all())
    if max(D) > min(D):
        assert float(s_l.max() - s_l.min()) == pytest.approx(2 * lmbda, abs=1e-12)
        # more outliers, less pruning: the order of s_l is the reverse of D's
        order = sorted(range(len(D)), key=lambda i: D[i])
        assert all(s_l[a] >= s_l[b] - 1e-12 for a, b in zip(order, order[1:]))
    else:
        assert torch.equal(s_l, torch.full_like(s_l, s))


@settings(max_examples=200, deadline=None)
@given(D=st.lists(st.floats(0, 1), min_size=2, max_size=12), s=st.floats(0.1, 0.9), lmbda=st.floats(0.0, 0.2))
def test_owl_sparsities_stay_within_s_plus_minus_lambda_when_the_outlier_shares_are_symmetric(D, s, lmbda):
    """With equal block sizes and D symmetric around its midrange (mean D̃ = λ), every s_l is in [s − λ, s + λ],
    the paper's stated range."""
    mid = (max(D) + min(D)) / 2
    D_sym = D + [2 * mid - d for d in D]
    s_l = owl_sparsities(torch.tensor(D_sym, dtype=torch.float64), torch.ones(len(D_sym)), s, lmbda)
    assert bool(((s_l >= s - lmbda - 1e-9) & (s_l <= s + lmbda + 1e-9)).all())


def test_owl_range_is_two_lambda_not_lambda_in_general():
    """The reference formula bounds s_l by s ± 2λ(1 − 1/L), not s ± λ: one outlier-heavy block of five."""
    s_l = owl_sparsities(torch.tensor([1.0, 0, 0, 0, 0]), torch.ones(5), 0.7, 0.08)
    assert s_l.tolist() == pytest.approx([0.7 - 0.128, 0.732, 0.732, 0.732, 0.732])


def test_outlier_share_counts_scores_above_m_times_the_block_mean():
    # block mean of all 10 scores = (8·1 + 30 + 2) / 10 = 4: only 30 exceeds 5 · 4 = 20
    scores = [torch.tensor([[1.0, 1.0, 1.0, 30.0]]), torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 2.0]])]
    assert outlier_share(scores, 5.0) == pytest.approx(1 / 10)
    assert outlier_share(scores, 10.0) == 0.0


# --------------------------------------------------------------------------- RIA math


def ria_loop(W: torch.Tensor, sq_norm: torch.Tensor, a: float = 0.5) -> torch.Tensor:
    out_features, in_features = W.shape
    S = torch.zeros(out_features, in_features, dtype=torch.float64)
    for i in range(out_features):
        row = sum(abs(float(W[i, k])) for k in range(in_features))
        for j in range(in_features):
            col = sum(abs(float(W[k, j])) for k in range(out_features))
            w = abs(float(W[i, j]))
            rel = (w / row if row else 0.0) + (w / col if col else 0.0)
            S[i, j] = rel * (float(sq_norm[j]) ** 0.5) ** a
    return S


@pytest.mark.parametrize("seed", range(5))
def test_ria_scores_equal_a_loop(seed):
    g = torch.Generator().manual_seed(seed)
    out_features, in_features = int(torch.randint(1, 7, (1,), generator=g)), int(torch.randint(1, 9, (1,), generator=g))
    W = torch.randn(out_features, in_features, generator=g, dtype=torch.float64)
    W[W.abs() < 0.3] = 0  # zeros, and sometimes a whole zero row or column
    if seed == 0:
        W[0] = 0
    sq_norm = torch.rand(in_features, generator=g, dtype=torch.float64) * 10
    expected = ria_loop(W, sq_norm)
    torch.testing.assert_close(ria_scores(W, sq_norm).double(), expected, rtol=1e-5, atol=1e-7)
    assert torch.isfinite(ria_scores(W, sq_norm)).all()


def test_ria_unstructured_ranks_over_the_whole_layer_and_n_m_per_group(tmp_path):
    from spp.prune import _prune_ria

    g = torch.Generator().manual_seed(0)
    W, sq_norm = torch.randn(8, 16, generator=g), torch.rand(16, generator=g)
    _, keep, _ = _prune_ria(W, sq_norm, PruneConfig(model="-", output="-", method="ria", sparsity=0.6), 0.6)
    assert int((~keep).sum()) == pruned_count(W.numel(), 0.6)
    assert torch.equal(keep, unstructured_mask(ria_scores(W, sq_norm), 0.6, per_row=False))
    _, keep, _ = _prune_ria(W, sq_norm, PruneConfig(model="-", output="-", method="ria", pattern="2:4"), 0.5)
    assert torch.equal(keep, nm_mask(ria_scores(W, sq_norm), 2, 4))


# --------------------------------------------------------------------------- models and CLI helpers


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random LLaMA with 4 blocks (untied head), saved with a character tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = tmp_path_factory.mktemp("owl") / "model"
    kwargs = dict(TINY_CONFIGS["llama"], num_hidden_layers=4, tie_word_embeddings=False)
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    return write_text(tmp_path_factory.mktemp("calib") / "calib.txt")


def prune_flags(model_dir, calib, output, *extra):
    return ["prune", "--model", str(model_dir), "--calib", str(calib), "--output", str(output), "--nsamples", "4",
            "--seqlen", "16", "--device", "cpu", *[str(e) for e in extra]]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def manifest_details(directory: Path) -> dict:
    return json.loads((directory / MANIFEST_FILE).read_text())["details"]


# --------------------------------------------------------------------------- --ignore end to end


IGNORE = ["self_attn.o_proj", r"re:model\.layers\.0\.mlp\..*"]


def test_ignored_layers_are_untouched_unmasked_unadapted_and_merge_verify_pass(model_dir, calib, tmp_path):
    from spp.adapter.model import read_adapter_weights

    out = tmp_path / "pruned"
    flags = [x for p in IGNORE for x in ("--ignore", p)]
    result = invoke(*prune_flags(model_dir, calib, out, "--method", "sparsegpt", "--sparsity", "0.6", *flags))
    assert result.exit_code == 0, result.output
    ignored = {f"model.layers.{i}.self_attn.o_proj.weight" for i in range(4)}
    ignored |= {f"model.layers.0.mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")}
    before, after = load_file(str(model_dir / "model.safetensors")), saved_tensors(out)
    for name in ignored:
        assert torch.equal(before[name], after[name]) and before[name].dtype == after[name].dtype, name
    masks, _ = load_masks(out / MASK_FILE)
    assert ignored.isdisjoint(masks) and len(masks) == 4 * 7 - len(ignored)
    details = manifest_details(out)
    assert sorted(details["dense_layers"]) == sorted(ignored)
    assert "7 layers or expert weights left dense" in result.stdout
    assert invoke("verify", out).exit_code == 0

    train = tmp_path / "train"
    result = invoke("train", "--config", "tinystories.yaml", "--model", out, "--data", calib, "--output", train,
                    "--max-steps", "2", "--set", "cutoff_len=16", "--set", "batch_size=4",
                    "--set", "micro_batch_size=4", "--set", "val_set_size=0")
    assert result.exit_code == 0, result.output
    adapted = {key.rpartition(".")[0] + ".weight" for key in read_adapter_weights(train)}
    assert adapted == set(masks)  # every pruned layer adapted, no ignored one
    merged = tmp_path / "merged"
    result = invoke("merge", "--model", out, "--adapter", train, "--output", merged)
    assert result.exit_code == 0, result.output
    assert invoke("verify", merged).exit_code == 0
    merged_tensors = saved_tensors(merged)
    for name in ignored:
        assert torch.equal(before[name], merged_tensors[name]), name


def test_adapt_unpruned_adapts_the_dense_layers_too(model_dir, calib, tmp_path):
    from spp.adapter.model import read_adapter_weights

    out = tmp_path / "pruned"
    assert invoke(*prune_flags(model_dir, calib, out, "--targets", "mlp.*")).exit_code == 0
    train = tmp_path / "train"
    result = invoke("train", "--config", "tinystories.yaml", "--model", out, "--data", calib, "--output", train,
                    "--max-steps", "1", "--set", "cutoff_len=16", "--set", "batch_size=4",
                    "--set", "micro_batch_size=4", "--set", "val_set_size=0", "--set", "adapt_unpruned=true")
    assert result.exit_code == 0, result.output
    assert len({key.rpartition(".")[0] for key in read_adapter_weights(train)}) == 4 * 7
    result = invoke("merge", "--model", out, "--adapter", train, "--output", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    assert invoke("verify", tmp_path / "merged").exit_code == 0


# --------------------------------------------------------------------------- OWL end to end


def test_owl_records_block_sparsities_and_verify_shows_them(model_dir, calib, tmp_path):
    out = tmp_path / "owl"
    result = invoke(*prune_flags(model_dir, calib, out, "--owl", "--sparsity", "0.7", "--owl-lmbda", "0.1"))
    assert result.exit_code == 0, result.output
    details = manifest_details(out)
    owl = details["owl"]
    assert (owl["m"], owl["lmbda"]) == (5.0, 0.1) and len(owl["sparsity"]) == 4
    assert max(owl["sparsity"]) - min(owl["sparsity"]) == pytest.approx(0.2)
    blocks = details["blocks"]
    assert [blocks[f"model.layers.{i}"]["requested"] for i in range(4)] == pytest.approx(owl["sparsity"])
    numel = [blocks[f"model.layers.{i}"]["numel"] for i in range(4)]
    assert sum(s * n for s, n in zip(owl["sparsity"], numel)) / sum(numel) == pytest.approx(0.7)
    for i in range(4):  # per-row floors: achieved is at most the request, within one weight per row
        row = blocks[f"model.layers.{i}"]
        assert row["requested"] - 0.05 < row["achieved"] <= row["requested"] + 1e-9
    for name, module in details["modules"].items():
        assert module["requested"] == pytest.approx(owl["sparsity"][int(name.split(".")[2])])
    assert "requested" in result.stdout
    verified = invoke("verify", out)
    assert verified.exit_code == 0 and "requested" in verified.stdout
    shown = f"{blocks['model.layers.0']['requested']:.2%}"
    assert shown in verified.stdout


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_owl_works_with_every_unstructured_method(model_dir, calib, tmp_path, method):
    out = tmp_path / method
    assert invoke(*prune_flags(model_dir, calib, out, "--owl", "--method", method, "--sparsity", "0.6")).exit_code == 0
    details = manifest_details(out)
    assert len(set(details["owl"]["sparsity"])) > 1 and details["calibration"] is not None
    assert invoke("verify", out).exit_code == 0


def test_owl_leaves_ignored_and_overridden_layers_out_of_the_statistic(model_dir, calib, tmp_path):
    config = tmp_path / "prune.yaml"
    config.write_text(yaml.safe_dump({"owl": True, "sparsity": 0.6, "ignore": ["self_attn.o_proj"],
                                      "sparsity_overrides": {"mlp.down_proj": 0.3}}))
    out = tmp_path / "out"
    assert invoke(*prune_flags(model_dir, calib, out, "--config", config)).exit_code == 0
    details = manifest_details(out)
    for name, module in details["modules"].items():
        block = int(name.split(".")[2])
        expected = 0.3 if "down_proj" in name else details["owl"]["sparsity"][block]
        assert module["requested"] == pytest.approx(expected), name
    assert not any("o_proj" in name for name in details["modules"])
    # the OWL mean over the layers it sets (neither ignored nor overridden), weighted by size, is --sparsity
    owl_layers = [(m["numel"], m["requested"]) for n, m in details["modules"].items() if "down_proj" not in n]
    assert sum(n * s for n, s in owl_layers) / sum(n for n, _ in owl_layers) == pytest.approx(0.6)


def test_owl_resume_reuses_the_recorded_ratios(model_dir, calib, tmp_path, monkeypatch):
    import spp.prune
    from spp.prune import run_prune

    def cfg(output, **flags):
        return PruneConfig(model=str(model_dir), output=str(output), method="wanda", sparsity=0.7, owl=True,
                           calib=str(calib), nsamples=4, seqlen=16, batch_size=3, device="cpu", **flags)

    run_prune(cfg(tmp_path / "straight"))

    def ctrl_c_at_block_2(index, n_blocks, name):
        if index == 2:
            raise KeyboardInterrupt

    with pytest.raises(SppInterrupted):
        run_prune(cfg(tmp_path / "out"), on_module=ctrl_c_at_block_2)
    progress = json.loads((partial_path(tmp_path / "out") / PRUNE_PROGRESS_DIR / PRUNE_PROGRESS_FILE).read_text())
    assert progress["blocks_done"] == 2 and len(progress["owl"]["sparsity"]) == 4

    def no_second_pass(*args, **kwargs):
        raise AssertionError("--resume recomputed OWL's statistics")

    monkeypatch.setattr(spp.prune, "owl_block_sparsities", no_second_pass)
    run_prune(cfg(tmp_path / "out", resume=True))
    a, b = (saved_tensors(tmp_path / d) for d in ("straight", "out"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "straight" / MASK_FILE).read_bytes() == (tmp_path / "out" / MASK_FILE).read_bytes()
    assert manifest_details(tmp_path / "straight")["owl"] == manifest_details(tmp_path / "out")["owl"]


# --------------------------------------------------------------------------- patterns, overrides, config


def test_overrides_targets_and_config_precedence(model_dir, calib, tmp_path):
    config = tmp_path / "prune.yaml"
    config.write_text(yaml.safe_dump({"method": "magnitude", "sparsity": 0.25, "targets": ["re:.*_proj"],
                                      "sparsity_overrides": {"mlp.*": 0.75, "re:model\\.layers\\.3\\.mlp\\..*": 0.75}}))
    out = tmp_path / "out"
    result = invoke(*prune_flags(model_dir, calib, out, "--config", config, "--sparsity", "0.5",
                                 "--set", "method=wanda"))
    assert result.exit_code == 0, result.output
    details = manifest_details(out)
    assert details["method"] == "wanda"  # --set over the file
    assert {m["requested"] for n, m in details["modules"].items() if ".mlp." in n} == {0.75}
    assert {m["requested"] for n, m in details["modules"].items() if ".self_attn." in n} == {0.5}  # flag over file


def _config_file(tmp_path, values):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


BAD = [
    ("invalid regex", ["--ignore", "re:self_attn.(q"], r"--ignore: 're:self_attn\.\(q' is not a valid regular expression"),
    ("matches nothing", ["--ignore", "mlp.nope"], r"--ignore 'mlp\.nope' match no linear layer .*their names are: mlp\.down_proj"),
    ("lm_head", ["--ignore", "lm_head"], r"--ignore 'lm_head' names lm_head, which is outside the decoder blocks"),
    ("embeddings", ["--targets", "re:.*embed_tokens"], r"names model\.embed_tokens, which is outside the decoder blocks"),
    ("override outside", [{"sparsity_overrides": {"lm_head": 0.5}}], r"sparsity_overrides 'lm_head' names lm_head"),
    ("overlapping overrides", [{"sparsity_overrides": {"mlp.*": 0.5, "*down_proj": 0.6}}],
     r"sparsity_overrides '(mlp\.\*|\*down_proj)' \(0\.[56]\) and '(mlp\.\*|\*down_proj)' \(0\.[56]\) both select "
     r"model\.layers\.0\.mlp\.down_proj; give each layer one sparsity"),
    ("override of an ignored layer", ["--ignore", "mlp.*", {"sparsity_overrides": {"mlp.up_proj": 0.5}}],
     r"selects only layers that --targets/--ignore leave dense"),
    ("override out of range", [{"sparsity_overrides": {"mlp.*": 1.0}}], r"sparsity_overrides: mlp\.\*=1\.0 is out of range"),
    ("ignore everything", ["--ignore", "*"], r"leave no linear layer to prune"),
    ("owl with N:M", ["--owl", "--pattern", "2:4"], r"--owl needs --pattern unstructured: 2:4 fixes every layer's sparsity at 0\.5"),
    ("overrides with N:M", ["--pattern", "2:4", {"sparsity_overrides": {"mlp.*": 0.6}}], r"sparsity_overrides need --pattern unstructured"),
    ("owl lambda too large", ["--owl", "--sparsity", "0.9", "--owl-lmbda", "0.2"], r"OWL sets block model\.layers\.\d to sparsity 1\.\d+, outside \[0, 1\)"),
    ("unknown yaml key", [{"owl_lambda": 0.1}], r"unknown key 'owl_lambda' in .*bad\.yaml \(did you mean 'owl_lmbda'\?\)"),
    ("bad --set", ["--set", "owl_m=-1"], r"--owl-m=-1\.0 is out of range"),
]


@pytest.mark.parametrize("case,flags,message", BAD, ids=[c[0] for c in BAD])
def test_bad_layer_choices_fail_with_one_line_and_leave_nothing(case, flags, message, model_dir, calib, tmp_path):
    args = []
    for flag in flags:
        args += ["--config", _config_file(tmp_path, flag)] if isinstance(flag, dict) else [flag]
    before = sorted(p.name for p in tmp_path.iterdir())
    result = invoke(*prune_flags(model_dir, calib, tmp_path / "out", *args))
    one_line_error(result, pattern=message)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output dir, no .partial


def test_train_with_only_dense_targets_is_refused(model_dir, calib, tmp_path):
    out = tmp_path / "pruned"
    assert invoke(*prune_flags(model_dir, calib, out, "--targets", "mlp.*")).exit_code == 0
    train = tmp_path / "train"
    result = invoke("train", "--config", "tinystories.yaml", "--model", out, "--data", calib, "--output", train,
                    "--max-steps", "1", "--set", "cutoff_len=16", "--set", "batch_size=4",
                    "--set", "micro_batch_size=4", "--set", "val_set_size=0", "--set", "target_modules=[self_attn.*]")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and "nothing to adapt" in lines[0], result.stderr
    assert not train.exists() and not partial_path(train).exists()


def test_pipeline_reproduce_command_and_block_table_carry_the_layer_choice(model_dir, calib, tmp_path):
    import shlex

    from spp.config import merge_into, parse_set
    from spp.pipeline import prune_command
    from spp.report import _prune_blocks, block_table

    cfg = PruneConfig(model=str(model_dir), output=str(tmp_path / "out"), targets=[r"re:.*\.(q|k)_proj", "mlp.*"],
                      ignore=["model.layers.0.*"], sparsity_overrides={"mlp.*": 0.6}, owl=True, calib=str(calib),
                      nsamples=4, seqlen=16, device="cpu")
    words = shlex.split(prune_command(cfg))
    flags = {}
    for i, word in enumerate(words):
        if word in ("--targets", "--ignore"):
            flags.setdefault(word[2:], []).append(words[i + 1])
    i = words.index("--set")
    rebuilt = merge_into(PruneConfig, [("flags", {"model": cfg.model, "output": cfg.output, "owl": True,
                                                  "calib": cfg.calib, "nsamples": 4, "seqlen": 16, "device": "cpu",
                                                  **flags}), ("--set", parse_set([words[i + 1]]))])
    assert rebuilt == cfg
    assert invoke(*words[1:]).exit_code == 0
    table = block_table([{"setting": "s", "blocks": _prune_blocks(tmp_path / "out")}])
    assert "| s | model.layers.1 |" in table and "model.layers.0" not in table  # block 0 wholly ignored


def test_sweep_settings_with_and_without_owl_get_their_own_folders():
    from spp.pipeline import setting_name

    plain = PruneConfig(model="m", output="o", sparsity=0.7)
    assert (setting_name(plain), setting_name(PruneConfig(model="m", output="o", sparsity=0.7, owl=True))) == (
        "wanda-70pct", "wanda-owl-70pct")
