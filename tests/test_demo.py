"""`spp demo`: the built-in corpus, tokenizer and model, and the story its numbers must tell."""

from __future__ import annotations

import json
import math
import re

import pytest
from typer.testing import CliRunner

from spp import demo
from spp.cli import app
from spp.io.checkpoint import MANIFEST_FILE
from spp.pipeline import REPORT_JSON


# --------------------------------------------------------------------------- corpus and tokenizer (fast)


def test_corpus_is_seeded_and_has_the_structure_it_claims():
    stories = demo.demo_corpus(0, 300)
    assert stories == demo.demo_corpus(0, 300) and stories != demo.demo_corpus(1, 300)
    assert len(set(stories)) > 290  # stories vary
    he, she = set(demo.NAMES["he"]), set(demo.NAMES["she"])
    verbs_sg = {sg for sg, _ in demo.ANIMAL_VERBS}
    verbs_pl = {pl for _, pl in demo.ANIMAL_VERBS}
    for story in stories:
        words = story.split()
        hero = re.search(r"(?:named|called) (\w+) \.", story).group(1)
        pronoun = "He" if hero in he else "She"
        assert hero in he | she
        assert f"{pronoun} lived near" in story  # the pronoun agrees with the hero
        assert ("He" if pronoun == "She" else "She") + " showed" not in story
        assert words.count(hero) >= 2  # the hero recurs through the story
        every_day = re.search(r"Every day , the (\w+) (\w+)", story)
        noun, verb = every_day.groups()
        # subject-verb agreement: a singular animal takes the -s form, a plural one the base form
        assert verb in (verbs_sg if noun in demo.ANIMALS else verbs_pl)
        assert noun in demo.ANIMALS or noun in demo.ANIMALS.values()
        assert story.endswith("The end .")


def test_tokenizer_round_trips_the_corpus_and_loads_with_autotokenizer(tmp_path):
    from transformers import AutoTokenizer

    stories = demo.demo_corpus(0, 200)
    tokenizer = demo.demo_tokenizer(stories)
    ids = tokenizer(stories[0], add_special_tokens=False)["input_ids"]
    assert len(ids) == len(stories[0].split()) and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == stories[0]
    for special in ("bos", "eos", "unk", "pad"):
        assert getattr(tokenizer, f"{special}_token") == demo.SPECIAL_TOKENS[special]
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(stories[1], add_special_tokens=False)["input_ids"] == tokenizer(stories[1], add_special_tokens=False)["input_ids"]
    assert loaded.eos_token_id == tokenizer.eos_token_id


def test_model_sizes_suit_every_pattern_and_the_adapter():
    settings = demo.DemoSettings()
    for size in (settings.hidden_size, settings.intermediate_size):
        assert size % 16 == 0  # 2:4, 4:8 and 16 SPP row groups all apply
    assert demo.DemoSettings(steps=1).sha256() != settings.sha256() == demo.DemoSettings().sha256()


def test_the_demo_model_is_cached_under_spp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPP_CACHE", str(tmp_path / "spp-cache"))  # the cache root of every stage (`spp.io.gguf`)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    settings = demo.DemoSettings(train_stories=50, heldout_stories=10, steps=1)
    model_dir = demo.ensure_demo_model(settings, log=None)
    assert model_dir == tmp_path / "spp-cache" / f"demo-{settings.sha256()[:12]}" == demo.demo_model_dir(settings)
    assert (model_dir / MANIFEST_FILE).is_file() and not (tmp_path / "xdg").exists()


def test_an_interrupted_build_leaves_nothing_cached(tmp_path, monkeypatch):
    monkeypatch.delenv("SPP_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    settings = demo.DemoSettings(train_stories=50, heldout_stories=10, steps=1)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("spp.io.checkpoint.save_model", boom)
    with pytest.raises(KeyboardInterrupt):
        demo.ensure_demo_model(settings, log=None)
    assert list((tmp_path / "spp").iterdir()) == []


# --------------------------------------------------------------------------- the real demo (trained once)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The demo model built once in a private cache, and `spp demo` run on it."""
    cache = tmp_path_factory.mktemp("xdg-cache")
    patch = pytest.MonkeyPatch()
    patch.delenv("SPP_CACHE", raising=False)
    patch.setenv("XDG_CACHE_HOME", str(cache))
    output = tmp_path_factory.mktemp("demo") / "run"
    lines: list[str] = []
    report = demo.run_demo(output, log=lines.append)
    yield cache, output, report, lines
    patch.undo()


def test_demo_model_is_cached_atomically_with_its_corpus(demo_run):
    cache, _, _, _ = demo_run
    (model_dir,) = (cache / "spp").iterdir()
    assert model_dir == demo.demo_model_dir(demo.DemoSettings())
    assert model_dir.name == f"demo-{demo.DemoSettings().sha256()[:12]}"
    for name in ("config.json", "model.safetensors", "tokenizer.json", demo.TRAIN_TEXT, demo.HELDOUT_TEXT, MANIFEST_FILE):
        assert (model_dir / name).is_file(), name
    settings = demo.DemoSettings()
    assert (model_dir / demo.TRAIN_TEXT).read_text() == "\n".join(demo.demo_corpus(settings.seed, settings.train_stories)) + "\n"
    assert (model_dir / demo.HELDOUT_TEXT).read_text() != (model_dir / demo.TRAIN_TEXT).read_text()
    import torch

    conditions = json.loads((model_dir / MANIFEST_FILE).read_text())["conditions"]  # what it was trained under
    assert conditions["torch_threads"] == max(1, min(torch.get_num_threads(), 4)) and conditions["dtype"] == "float32"


def test_demo_tells_the_papers_story(demo_run):
    """Pruning hurts; SPP recovers at least half of the log-perplexity gap at 2:4 and at 50%; sparsity is kept."""
    _, output, report, _ = demo_run
    saved = json.loads((output / REPORT_JSON).read_text())
    rows = {row["model"]: row for row in saved["rows"]}
    key = next(k for k in rows["dense"] if k.startswith("ppl "))
    dense = rows["dense"][key]
    assert {s["setting"] for s in saved["settings"]} == {"wanda-2of4", "wanda-50pct"}
    for info in saved["settings"]:
        name = info["setting"]
        pruned, spp = rows[f"{name} pruned"][key], rows[f"{name} + SPP (merged)"][key]
        assert pruned > dense * 1.01, (name, dense, pruned)  # pruning hurts noticeably (about 3% and 12% here)
        recovered = (math.log(pruned) - math.log(spp)) / (math.log(pruned) - math.log(dense))
        assert recovered >= 0.5, (name, dense, pruned, spp)
        assert info[f"recovered {key}"] == pytest.approx(recovered)
        assert info["sparsity_before"] == info["sparsity_after"] == pytest.approx(0.5, abs=1e-9)


def test_demo_table_has_the_shape_the_readme_shows(demo_run):
    """The README's demo table: one row per model in this order, sparsity exactly 50% after pruning and after SPP,
    a recovered share on the merged rows only. Its digits depend on the run conditions, so they are not checked."""
    _, _, report, _ = demo_run
    lines = report.table.strip().splitlines()
    assert lines[0] == "| model | sparsity | ppl heldout.txt @128 | gap recovered (ppl heldout.txt @128) |"
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [c[0] for c in cells] == ["dense", "wanda-2of4 pruned", "wanda-2of4 + SPP (merged)", "wanda-50pct pruned",
                                     "wanda-50pct + SPP (merged)"]
    assert [c[1] for c in cells] == ["0.00%"] + ["50.00%"] * 4
    assert all(re.fullmatch(r"\d+\.\d{4}", c[2]) for c in cells)
    assert [bool(c[3]) for c in cells] == [False, False, True, False, True]
    assert all(re.fullmatch(r"\d+\.\d\d%", c[3]) for c in cells if c[3])


def test_spp_demo_again_reuses_everything_and_prints_the_table(demo_run, monkeypatch):
    cache, output, report, _ = demo_run
    monkeypatch.delenv("SPP_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.setattr(demo, "train_demo_model", lambda *a, **k: pytest.fail("the cached model was not reused"))
    result = CliRunner().invoke(app, ["demo", "--output", str(output)])
    assert result.exit_code == 0, result.output
    assert report.table in result.output
    assert f"machine: {report.machine}" in result.output and "torch thread" in report.machine
    assert result.output.count("skipped (up to date)") == len(report.steps)
