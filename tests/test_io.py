"""io/: atomic output directories, the mask file, manifests and safetensors checks."""

import errno
import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spp.errors import SppError
from spp.io.checkpoint import (
    MASK_FILE,
    atomic_dir,
    partial_path,
    proc_self_status,
    read_json,
    safetensors_keys,
    sha256_file,
    write_json,
)
from spp.io.manifest import Manifest, read_manifest, settings_sha256, write_manifest
from spp.io.reader import Checkpoint
from spp.io.maskfile import load_masks, pack_bits, save_masks, unpack_bits


def test_atomic_dir_renames_only_on_success(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as part:
        assert part == partial_path(out)
        (part / "a.txt").write_text("x")
        assert not out.exists()
    assert (out / "a.txt").read_text() == "x"
    assert not partial_path(out).exists()


def test_atomic_dir_removes_partial_on_error(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError):
        with atomic_dir(out) as part:
            (part / "a.txt").write_text("x")
            raise ValueError("boom")
    assert not out.exists() and not partial_path(out).exists()


def test_atomic_dir_refuses_existing_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(SppError, match="already exists"):
        with atomic_dir(out):
            pass
    assert (out / "old.txt").exists()
    with pytest.raises(RuntimeError):  # a failed overwrite keeps the old output
        with atomic_dir(out, overwrite=True) as part:
            (part / "new.txt").write_text("new")
            raise RuntimeError
    assert (out / "old.txt").exists()
    with atomic_dir(out, overwrite=True) as part:
        (part / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["new.txt"]


def test_atomic_dir_refuses_a_symlink_output_and_builds_dot_beside_it(tmp_path, monkeypatch):
    """A symlinked output would have its link replaced, not the directory it names (and `.old` left behind); `.`
    has no name to put `.partial` after: both were tracebacks."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(SppError, match="is a symlink"):
        with atomic_dir(tmp_path / "link", overwrite=True):
            pass
    assert (tmp_path / "link").is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
    monkeypatch.chdir(tmp_path / "real")
    with atomic_dir(".", overwrite=True) as part:
        assert part == tmp_path / "real.partial"
        (part / "a.txt").write_text("x")
    assert (tmp_path / "real" / "a.txt").read_text() == "x"


def test_atomic_dir_clears_a_stale_partial_but_resume_keeps_it(tmp_path):
    out = tmp_path / "out"
    partial_path(out).mkdir()
    (partial_path(out) / "stale").write_text("s")
    with atomic_dir(out, resume=True) as part:
        assert (part / "stale").exists()
    partial_path(out).mkdir()
    (partial_path(out) / "stale").write_text("s")
    with atomic_dir(tmp_path / "out2") as part:
        pass
    with atomic_dir(out, overwrite=True) as part:
        assert not (part / "stale").exists()


@pytest.mark.parametrize("code,words", [(errno.ENOSPC, "no space left"), (errno.EACCES, "permission denied")])
def test_atomic_dir_reports_disk_errors_and_leaves_nothing(tmp_path, code, words):
    out = tmp_path / "out"
    with pytest.raises(SppError, match=words):
        with atomic_dir(out) as part:
            (part / "half").write_text("x")
            raise OSError(code, "simulated")
    assert list(tmp_path.iterdir()) == []


def _write_lock(out, pid, host):
    """The lock file a run building `out` holds (as `atomic_dir` writes it): its pid and host."""
    (tmp := out.with_name(out.name + ".lock")).write_text(json.dumps({"pid": pid, "host": host}))
    return tmp


def test_atomic_dir_refuses_a_live_lock_naming_its_owner_and_keeps_its_partial(tmp_path):
    import socket

    out = tmp_path / "out"
    partial_path(out).mkdir()
    (partial_path(out) / "first-run.txt").write_text("being written")
    here = socket.gethostname()
    for pid, host in ((os.getppid(), here), (12345, "another-host")):  # alive here; on a host we cannot check
        _write_lock(out, pid, host)
        with pytest.raises(SppError) as raised:
            with atomic_dir(out, overwrite=True):
                pass
        line = str(raised.value)
        assert f"pid {pid} on {host}" in line and "\n" not in line and str(out) in line
        assert (partial_path(out) / "first-run.txt").read_text() == "being written" and not out.exists()
    with pytest.raises(SppError, match="another-host"):  # refused before any work, by check_output_dir too
        from spp.io.checkpoint import check_output_dir

        check_output_dir(out, overwrite=True)


def test_atomic_dir_takes_over_a_dead_owners_lock_and_leaves_none(tmp_path):
    import socket
    import subprocess
    import sys

    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid names no process now
    lock = _write_lock(out, dead.pid, socket.gethostname())
    partial_path(out).mkdir()
    (partial_path(out) / "killed-run.txt").write_text("left by a kill")
    with atomic_dir(out) as part:
        held = json.loads(lock.read_text())
        assert (held["pid"], held["host"]) == (os.getpid(), socket.gethostname())
        assert not (part / "killed-run.txt").exists()  # a run without resume starts over
        (part / "a.txt").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the lock is gone and never was in the output
    assert [p.name for p in out.iterdir()] == ["a.txt"]
    with pytest.raises(ValueError):  # a failed run releases its lock too
        with atomic_dir(tmp_path / "failed"):
            raise ValueError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_json_roundtrip_and_errors(tmp_path):
    write_json(tmp_path / "a.json", {"k": [1, 2]})
    assert read_json(tmp_path / "a.json") == {"k": [1, 2]}
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(SppError, match="not valid JSON"):
        read_json(tmp_path / "bad.json")
    with pytest.raises(SppError, match="does not exist"):
        read_json(tmp_path / "missing.json")


@settings(max_examples=40, deadline=None)
@given(out=st.integers(1, 9), inp=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_pack_bits_roundtrip_and_size(out, inp, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(out, inp, generator=g) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (out, (inp + 7) // 8)
    assert torch.equal(unpack_bits(packed, inp), mask)


def test_pack_bits_little_bit_order():
    mask = torch.zeros(1, 9, dtype=torch.bool)
    mask[0, 0] = mask[0, 3] = mask[0, 8] = True
    assert pack_bits(mask).tolist() == [[0b1001, 1]]


def test_mask_file_roundtrip_with_layouts(tmp_path):
    g = torch.Generator().manual_seed(0)
    masks = {"a.weight": torch.rand(6, 16, generator=g) > 0.5, "b.weight": torch.rand(16, 6, generator=g) > 0.5}
    layouts = {"a.weight": "linear", "b.weight": "conv1d"}
    save_masks(tmp_path / MASK_FILE, masks, layouts)
    loaded, loaded_layouts = load_masks(tmp_path / MASK_FILE)
    assert loaded_layouts == layouts
    for k in masks:
        assert torch.equal(loaded[k], masks[k])
    # packed along the input axis: at most numel/8 bytes + padding per output row
    keys = safetensors_keys(tmp_path / MASK_FILE)
    assert keys["a.weight"] == ("U8", [6, 2]) and keys["b.weight"] == ("U8", [6, 2])


def test_mask_file_corrupt_or_foreign(tmp_path):
    path = tmp_path / MASK_FILE
    save_masks(path, {"a": torch.ones(2, 8, dtype=torch.bool)}, {"a": "linear"})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SppError, match="corrupt|truncated"):
        load_masks(path)
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2, dtype=torch.uint8)}, str(path))
    with pytest.raises(SppError, match="not an spp mask file"):
        load_masks(path)
    with pytest.raises(SppError, match="does not exist"):
        load_masks(tmp_path / "nope.safetensors")


def test_safetensors_keys_detects_truncation(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"w": torch.randn(4, 4)}, str(path))
    assert safetensors_keys(path) == {"w": ("F32", [4, 4])}
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(SppError, match="truncated or corrupt"):
        safetensors_keys(path)


def test_manifest_roundtrip_and_mask_hash(tmp_path):
    save_masks(tmp_path / MASK_FILE, {"a": torch.ones(2, 8, dtype=torch.bool)}, {"a": "linear"})
    (tmp_path / "config.json").write_text("{}")
    m = write_manifest(tmp_path, Manifest(stage="prune", settings={"b": 1, "a": 2}, details={"x": 1}))
    assert m.mask_sha256 == sha256_file(tmp_path / MASK_FILE)
    assert set(m.outputs) == {MASK_FILE, "config.json"}
    back = read_manifest(tmp_path)
    assert back.settings_sha256 == settings_sha256({"a": 2, "b": 1}) and back.details == {"x": 1}
    checkpoint = Checkpoint(directory=tmp_path, config=None, model=None, tensors={}, saved_names={},
                            mask_sha256=sha256_file(tmp_path / MASK_FILE))
    assert checkpoint.check_mask_hash(m.mask_sha256, "the manifest") == m.mask_sha256
    with pytest.raises(SppError, match="different base"):
        checkpoint.check_mask_hash("0" * 64, "the adapter config")
    raw = json.loads((tmp_path / "spp_manifest.json").read_text())
    raw["schema_version"] = 99
    (tmp_path / "spp_manifest.json").write_text(json.dumps(raw))
    with pytest.raises(SppError, match="schema"):
        read_manifest(tmp_path)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="VmHWM is Linux's")
def test_a_stage_started_by_a_larger_process_records_its_own_peak_memory():
    import subprocess
    import sys

    held = torch.ones(64 * 2**20, dtype=torch.uint8)  # this process's peak: 64 MiB above a child's that holds nothing
    child = "import json; from spp.io.manifest import peak_memory_bytes; print(json.dumps(peak_memory_bytes()))"
    peak = json.loads(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True,
                                     env={**os.environ, "PYTHONPATH": os.getcwd()}).stdout)["host_rss"]
    here = int(proc_self_status("VmHWM")) * 1024
    assert 0 < peak < here - 48 * 2**20  # ru_maxrss would report at least this process's peak
    del held


# --------------------------------------------------------------------------- what the writers leave on disk


def _chain(root, shared_data):
    """prune -> train -> merge of the hidden-64 tiny LLaMA with stories260K tokenizer files; returns the four dirs."""
    from conftest import save_tiny_stories_llama
    from spp.config import MergeConfig, PruneConfig, TrainConfig, merge_into
    from spp.merge import run_merge
    from spp.prune import run_prune
    from spp.train import run_train

    text = root / "stories.txt"
    text.write_text((shared_data / "tinystories" / "tinystories_val.txt").read_text()[:12000])
    dense, pruned, train, merged = (root / name for name in ("dense", "pruned", "train", "merged"))
    save_tiny_stories_llama(dense, shared_data)
    run_prune(PruneConfig(model=str(dense), output=str(pruned), method="wanda", pattern="2:4", calib=str(text),
                          nsamples=4, seqlen=64, device="cpu"))
    run_train(merge_into(TrainConfig, [("test", dict(
        base_model=str(pruned), data_path=str(text), output_dir=str(train), cutoff_len=64, micro_batch_size=4,
        batch_size=4, max_steps=2, save_steps=1, logging_steps=1, eval_steps=2, val_set_size=2))]))
    run_merge(MergeConfig(model=str(pruned), adapter=str(train), output=str(merged)))
    return dense, pruned, train, merged


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_outputs_follow_the_umask_and_keep_every_tokenizer_file(shared_data, tmp_path, umask):
    from transformers import AutoTokenizer

    previous = os.umask(umask)
    try:
        dense, pruned, train, merged = _chain(tmp_path, shared_data)
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask  # what open() gives a new file; safetensors' own writer gives 0600
    files = [p for out in (pruned, train, merged) for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "optimizer.safetensors" for p in files)
    assert any(p.as_posix().endswith("/" + MASK_FILE) for p in files)
    wrong = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in files
             if p.stat().st_mode & 0o777 != expected}
    assert not wrong, f"expected {oct(expected)}: {wrong}"

    for out in (pruned, merged):  # every tokenizer file of the input, and no loading options baked in
        assert {"tokenizer.json", "tokenizer.model", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
        assert (out / "tokenizer.model").read_bytes() == (dense / "tokenizer.model").read_bytes()
        config = json.loads((out / "tokenizer_config.json").read_text())
        assert not {"local_files_only", "is_local"} & set(config)
        sample = "Once upon a time, there was a little girl."
        assert AutoTokenizer.from_pretrained(out)(sample).input_ids == AutoTokenizer.from_pretrained(dense)(sample).input_ids


def test_a_resume_counts_a_setting_added_since_the_interruption_as_its_default(tmp_path):
    """A prune or block-wise run interrupted before spp gained a setting resumes when that setting is at its default
    (as a train --resume does), and names it when it is not."""
    from spp.io.progress import check_resumable, start_progress

    conditions = {"torch_threads": 1}
    start_progress(tmp_path, {"method": "wanda", "nsamples": 4}, 3, conditions, {})  # recorded before `new_knob` existed
    now = {"method": "wanda", "nsamples": 4, "new_knob": 0.5}
    assert check_resumable(tmp_path, now, conditions, {}, defaults={"new_knob": 0.5, "unrelated": 1}) == 0
    with pytest.raises(SppError, match=r"^--resume: new_knob was 0\.5 in the interrupted run but is 0\.7 now "):
        check_resumable(tmp_path, {**now, "new_knob": 0.7}, conditions, {}, defaults={"new_knob": 0.5})
    with pytest.raises(SppError, match=r"^--resume: new_knob was None in the interrupted run"):
        check_resumable(tmp_path, now, conditions, {})  # no defaults given: the missing setting differs
