"""The hold-out rule (`val_set_size`) and its stability across --resume; hub names offline fail in a second."""

from __future__ import annotations

import json
import random
import time

import pytest
from typer.testing import CliRunner

from spp import hub
from spp.cli import app
from spp.data import requested_validation_count, split_train_val, validation_count, validation_note
from spp.errors import SppError

# --------------------------------------------------------------------------- val_set_size (pure)


@pytest.mark.parametrize("n, asked, held_out", [
    (100, 0, 0), (100, 10, 10), (100, 50, 50),  # a count is taken as is up to half
    (100, 51, 50), (101, 51, 50), (2000, 2000, 1000), (1, 1, 0), (5, 5, 2),  # more than half: capped at ⌊n/2⌋
    (100, 0.1, 10), (100, 0.5, 50), (30, 0.1, 3), (9, 0.25, 2),  # a fraction is rounded to the nearest count
    (100, 0.9, 50), (7, 0.5, 3),  # round(3.5) = 4 > ⌊7/2⌋
])
def test_validation_count_is_a_count_or_a_fraction_capped_at_half(n, asked, held_out):
    assert validation_count(n, asked) == held_out
    train, val = split_train_val(n, asked, seed=3)
    assert len(val) == held_out and len(train) >= n / 2 and sorted(train + val) == list(range(n))


def test_the_note_names_the_asked_and_the_capped_count():
    assert validation_note(100, 50) is None and validation_note(100, 0.5) is None
    assert validation_note(2000, 2000) == ("note: val_set_size=2000 asks for 2000 of 2000 examples, which would leave "
                                           "fewer than half to train on; holding out 1000 instead")
    note = validation_note(100, 0.9)
    assert "val_set_size=0.9 asks for 90 of 100" in note and "holding out 50 instead" in note
    assert "\n" not in note


def test_the_split_is_a_pure_function_of_its_arguments():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 300)
        asked = rng.choice([rng.randint(0, 2 * n), round(rng.random() * 0.99, 2)])
        seed = rng.randint(0, 10)
        train, val = split_train_val(n, asked, seed)
        assert (train, val) == split_train_val(n, asked, seed)  # what a --resume recomputes
        assert len(val) == min(requested_validation_count(n, asked), n // 2) and not set(train) & set(val)


# --------------------------------------------------------------------------- val_set_size through spp train


@pytest.fixture(scope="module")
def alpaca_file(tmp_path_factory, shared_data):
    records = json.loads((shared_data / "alpaca" / "alpaca_small.json").read_text())[:24]
    path = tmp_path_factory.mktemp("alpaca") / "alpaca.json"
    path.write_text(json.dumps(records))
    return path


def _train_args(base, data, output, *extra):
    settings = dict(cutoff_len=32, micro_batch_size=4, batch_size=4, save_steps=2, logging_steps=1, eval_steps=2,
                    val_set_size=2000, precision="fp32", learning_rate=2e-2, warmup_ratio=0.0)
    args = ["train", "--config", "alpaca.yaml", "--model", str(base), "--data", str(data), "--output", str(output),
            "--max-steps", "4"]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    return args + list(extra)


def test_alpaca_yaml_runs_on_a_small_file_and_resume_keeps_the_capped_split(pruned_tiny_dir, alpaca_file, tmp_path,
                                                                             monkeypatch):
    """alpaca.yaml's val_set_size=2000 on 24 records: capped at 12 with one note; the resolved config keeps 2000;
    an interrupted run resumed gives the straight run's adapter bit for bit (same split, same order)."""
    from safetensors.torch import load_file

    from spp.config import read_yaml

    straight = tmp_path / "straight"
    result = CliRunner().invoke(app, _train_args(pruned_tiny_dir, alpaca_file, straight))
    assert result.exit_code == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if "val_set_size" in line]
    assert notes == ["note: val_set_size=2000 asks for 2000 of 24 examples, which would leave fewer than half to "
                     "train on; holding out 12 instead"]
    assert read_yaml(straight / "spp_config.yaml")["val_set_size"] == 2000  # what was asked
    details = json.loads((straight / "spp_manifest.json").read_text())["details"]
    assert (details["train_examples"], details["val_examples"]) == (12, 12)

    resumed = tmp_path / "resumed"
    monkeypatch.setenv("SPP_FAULT", "train_sigint:3")  # a Ctrl-C during step 3: its checkpoint is kept
    interrupted = CliRunner().invoke(app, _train_args(pruned_tiny_dir, alpaca_file, resumed))
    assert interrupted.exit_code != 0 and "--resume" in interrupted.stderr
    monkeypatch.delenv("SPP_FAULT")
    result = CliRunner().invoke(app, _train_args(pruned_tiny_dir, alpaca_file, resumed, "--resume"))
    assert result.exit_code == 0, result.stderr
    a, b = load_file(str(straight / "adapter_model.safetensors")), load_file(str(resumed / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    log = [json.loads(line) for line in (resumed / "train_log.jsonl").read_text().splitlines()]
    straight_log = [json.loads(line) for line in (straight / "train_log.jsonl").read_text().splitlines()]
    assert [r.get("val_loss") for r in log] == [r.get("val_loss") for r in straight_log]


# --------------------------------------------------------------------------- the hub, offline


def test_an_offline_variable_means_no_network_attempt(monkeypatch):
    monkeypatch.setattr("socket.create_connection", lambda *a, **k: pytest.fail("a network attempt was made"))
    for variable in hub.OFFLINE_VARIABLES:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
        monkeypatch.setenv(variable, "TRUE")
        assert hub.hub_unavailable() == f"{variable}=TRUE is set"


def test_a_hub_dataset_that_does_not_load_is_one_line_after_one_attempt(monkeypatch):
    """--data org/name with the hub reachable but the load failing: one attempt, one line quoting the first line
    of the library's error (`spp.hub.load_dataset`, which every hub dataset load goes through)."""
    import datasets

    from spp.data import read_alpaca_records

    attempts = []

    def failing(name, **kwargs):
        attempts.append((name, kwargs))
        raise FileNotFoundError("\n  no such dataset on the hub\n  (details)")

    monkeypatch.setattr("spp.hub.hub_unavailable", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(SppError) as exc:
        read_alpaca_records("someone/missing", split="train")
    assert str(exc.value) == "data 'someone/missing' is neither a local file nor a loadable dataset: no such dataset on the hub"
    assert attempts == [("someone/missing", {"split": "train"})]


def _online(monkeypatch, endpoint: str):
    for variable in (*hub.OFFLINE_VARIABLES, "http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                     "ALL_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    hub._probe.cache_clear()


def test_an_unreachable_hub_is_found_in_one_connection(monkeypatch):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _online(monkeypatch, f"http://127.0.0.1:{port}")
    start = time.monotonic()
    assert hub.hub_unavailable() == f"127.0.0.1:{port} cannot be reached (ConnectionRefusedError)"
    assert time.monotonic() - start < hub.PROBE_TIMEOUT_S + 0.5
    monkeypatch.setattr("socket.create_connection", lambda *a, **k: pytest.fail("probed twice"))
    assert hub.hub_unavailable() is not None  # decided once per process
    hub._probe.cache_clear()


def test_a_host_that_does_not_answer_times_out(monkeypatch):
    import threading

    release = threading.Event()

    def hang(*args, **kwargs):  # a name lookup or connect that does not come back until released (no sleep)
        release.wait()
        raise TimeoutError

    monkeypatch.setattr("socket.create_connection", hang)
    hub._probe.cache_clear()
    start = time.monotonic()
    assert hub._probe("hub.invalid", 443, 0.2) == "hub.invalid:443 did not answer within 0.2 s"
    assert time.monotonic() - start < 1
    release.set()
    hub._probe.cache_clear()


def test_a_cached_copy_is_still_used_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    with pytest.raises(SppError, match="needs the Hugging Face hub"):
        hub.require_hub("--calib c4", "allenai/c4", "dataset", "pass --calib PATH")
    (tmp_path / "hub" / "datasets--allenai--c4").mkdir(parents=True)
    (tmp_path / "datasets" / "Salesforce___wikitext").mkdir(parents=True)
    (tmp_path / "hub" / "models--org--model").mkdir(parents=True)
    hub.require_hub("--calib c4", "allenai/c4", "dataset", "pass --calib PATH")
    hub.require_hub("--ppl wikitext2", "Salesforce/wikitext", "dataset", "pass --ppl wikitext2:PATH")
    hub.require_hub("--model org/model", "org/model", "model", "pass --model DIR")


@pytest.fixture(scope="module")
def dense_tiny_dir(tmp_path_factory, shared_data):
    from conftest import save_tiny_stories_llama

    return save_tiny_stories_llama(tmp_path_factory.mktemp("dense") / "tiny", shared_data)


def _offline_cases(dense, pruned, tmp):
    text = tmp / "text.txt"
    text.write_text("Once upon a time there was a tiny model. " * 50)
    return {
        "prune default calib": (["prune", "--model", str(dense), "--output", str(tmp / "p1")],
                                "error: --calib c4 needs the Hugging Face hub (allenai/c4)", "pass --calib PATH"),
        "prune calib wikitext2": (["prune", "--model", str(dense), "--calib", "wikitext2", "--output", str(tmp / "p2")],
                                  "error: --calib wikitext2 needs the Hugging Face hub", "pass --calib PATH"),
        "prune hub model": (["prune", "--model", "some/hub-id", "--calib", str(text), "--output", str(tmp / "p3")],
                            "error: --model some/hub-id needs the Hugging Face hub", "pass --model DIR"),
        "eval ppl wikitext2": (["eval", "--model", str(dense), "--ppl", "wikitext2"],
                               "error: --ppl wikitext2 needs the Hugging Face hub", "--ppl wikitext2:PATH"),
        "eval tasks": (["eval", "--model", str(dense), "--tasks", "boolq"],
                       "error: --tasks boolq (without --task-data) needs the Hugging Face hub", "--task-data DIR"),
        "train hub data": (["train", "--config", "tinystories.yaml", "--model", str(pruned), "--data", "some/hubname",
                            "--output", str(tmp / "t1")], "error: --data some/hubname needs the Hugging Face hub",
                           "pass --data PATH"),
        "alpaca.yaml default data": (["train", "--config", "alpaca.yaml", "--model", str(pruned), "--set",
                                      "precision=fp32", "--output", str(tmp / "t2")],
                                     "error: --data yahma/alpaca-cleaned needs the Hugging Face hub", "pass --data PATH"),
    }


def test_hub_names_offline_fail_at_once_with_one_line_naming_the_local_alternative(dense_tiny_dir, pruned_tiny_dir,
                                                                                   tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("SPP_TASK_DATA", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    for module, name in ((datasets, "load_dataset"), (huggingface_hub, "snapshot_download")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("a hub load was attempted"))
    runner = CliRunner()
    for case, (args, start, alternative) in _offline_cases(dense_tiny_dir, pruned_tiny_dir, tmp_path).items():
        began = time.monotonic()
        result = runner.invoke(app, args)
        elapsed = time.monotonic() - began
        lines = result.stderr.splitlines()
        assert result.exit_code == 1, (case, result.stderr, result.exception)
        assert len(lines) == 1 and lines[0].startswith(start) and alternative in lines[0], (case, lines)
        assert "HF_HUB_OFFLINE=1 is set" in lines[0], (case, lines)
        assert elapsed < 5, (case, elapsed)  # a retry loop took 8 s here before; a timed-out probe 1.5 s
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.txt"]  # no output, no partial output
