"""Checkpoint directories: file names, atomic output directories, hashing and safetensors headers.

An spp output is a plain `save_pretrained` directory plus `spp/masks.safetensors` and
`spp_manifest.json`. It is always built in a sibling `DIR.partial/` and renamed into
place at the end, so a crash leaves either the complete output or none. Every output
file gets its mode from the umask, as `open()` gives it (safetensors' writer alone leaves
0600). This module owns the file-name constants; no other module spells a file name. Reading a model
directory as a whole (names, shapes, mask file, manifest) is `spp.io.reader`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Iterator

from spp.errors import SppError

# The mask file (safetensors format), in a subfolder: loaders that read every top-level *.safetensors of a directory
# without an index (vLLM, sglang) would otherwise load the uint8 masks under the weights' names.
MASK_FILE = "spp/masks.safetensors"
LEGACY_MASK_FILE = "masks.safetensors"  # where older spp outputs have it; still read (`mask_path`), never written
MANIFEST_FILE = "spp_manifest.json"
RESOLVED_CONFIG_FILE = "spp_config.yaml"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"  # PEFT's names, so the files look familiar
ADAPTER_CONFIG_FILE = "adapter_config.json"
RESULTS_FILE = "results.json"
PARTIAL_SUFFIX = ".partial"
LOCK_SUFFIX = ".lock"


def partial_path(output: Path) -> Path:
    """The fixed sibling where `output` is built (fixed so a resumed run can find it)."""
    output = Path(os.path.abspath(output))  # `.` and `..` have no name to add a suffix to
    return output.with_name(output.name + PARTIAL_SUFFIX)


def lock_path(output: Path) -> Path:
    """`output.lock`, the lock a run holds while it builds `output` (`atomic_dir`): a sibling, never in the output."""
    output = Path(os.path.abspath(output))
    return output.with_name(output.name + LOCK_SUFFIX)


def check_not_an_input(output: Path, inputs, flag: str = "--output", in_place: str | None = None,
                       overwrite: bool = False) -> None:
    """Refuse, before any work, an output that is, contains or lies inside one of the stage's inputs.

    Writing `output` replaces it whole and first clears its build directory `output.partial/`, so an input in
    either would be lost, or read while it is replaced. Paths are compared with symlinks resolved. Inputs that do
    not exist here (a hub id, a hub data set) are skipped, and so is the output's own `RESOLVED_CONFIG_FILE` given as
    the config (read whole before any work; the run writes its own). The one exception is `in_place`: the input
    (`--model` of prune, merge and export) that `output` may equal with `overwrite` (by its own path, not through a
    symlink), because those stages read it into the complete replacement they build in `output.partial/`, rename
    that over it, and read nothing after.

    Args:
        output: the directory the stage writes.
        inputs: (label, path) pairs, e.g. ("--model", "pruned"); a None or empty path is skipped.
        flag: how the message names the output.

    Raises:
        SppError: one line naming the output, the input and how they relate.
    """
    output = Path(output).expanduser()
    partial = partial_path(Path(os.path.abspath(output)))  # named also for `--output .`
    targets = [(t, t.resolve(), Path(os.path.abspath(t))) for t in (output, partial)]
    for label, given in inputs:
        path = Path(str(given)).expanduser() if given else None
        if path is None or not path.exists() or path.resolve() == targets[0][1] / RESOLVED_CONFIG_FILE:
            continue
        real = path.resolve()
        for target, target_real, target_abs in targets:
            relation = ("is" if real == target_real else "contains" if target_real in real.parents
                        else "lies inside" if real in target_real.parents else None)
            if relation is None:
                continue
            own_path = Path(os.path.abspath(path)) == target_abs and not target.is_symlink()  # the rename's target
            if relation == "is" and target == output and label == in_place and own_path:
                if overwrite:
                    continue
                raise SppError(f"{flag} {output} is {label} {given}: pass --overwrite to replace it in place (built "
                               f"in {partial.name}, then renamed over it), or choose another {flag}")
            where = f"{flag} {output}" if target == output else f"{flag} {output} is built in {target}, which"
            resolved = f"both are {real}" if relation == "is" else f"{target_real} and {real}"
            symlinks = ("" if (target_real, real) == (target_abs, Path(os.path.abspath(path)))
                        else f" (symlinks resolved: {resolved})")
            raise SppError(f"{where} {relation} {label} {given}{symlinks}: an output must lie outside every input "
                           f"(it is replaced whole); choose another {flag}")


def check_output_dir(output: Path, overwrite: bool, flag: str = "--output") -> None:
    """Refuse an existing output (unless `overwrite`) or an unwritable parent, before any heavy work.

    Raises:
        SppError: naming the directory and the flag that would allow it.
    """
    output = Path(output)
    if output.is_symlink():  # the final rename would replace the link, not the directory it points to
        raise SppError(f"{flag} {output} is a symlink (to {os.readlink(output)}): spp replaces its output whole; "
                       "pass the directory itself or another path")
    owner = _read_lock(lock_path(output))
    if owner is not None and not _lock_is_stale(owner):
        raise _held(output, owner, flag)
    if output.exists() and not output.is_dir():  # --overwrite would not help: say so at once
        raise SppError(f"{flag} {output} exists and is not a directory")
    if output.exists() and not overwrite:
        raise SppError(f"{flag} {output} already exists; pass --overwrite to replace it")
    probe = output.resolve().parent
    while not probe.exists():  # the first existing ancestor decides whether we can create the rest
        probe = probe.parent
    if not probe.is_dir():
        raise SppError(f"{flag} {output}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise SppError(f"{flag} {output}: cannot write into {probe} (permission denied)")


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root`, first giving each file the umask's mode (`follow_umask`)."""
    mode = umask_file_mode()
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), mode)  # any file a writer or a copy left 0600 or read-only
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories; the rename is still atomic
        pass
    finally:
        os.close(fd)


def describe_os_error(exc: OSError, path: Path) -> str:
    """One line for an OSError on an output path, naming disk-full and permission errors as such."""
    if exc.errno == errno.ENOSPC:
        return f"no space left on device while writing {path}; nothing was kept"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied while writing {path}; nothing was kept"
    return f"could not write {path}: {exc.strerror or exc}"


def _read_lock(lock: Path) -> dict | None:
    """The owner a lock file records ({"pid", "host", "since"}); None when there is no lock. A lock that stays
    unreadable (its process died between creating and writing it) reads as {}, which `_lock_is_stale` calls stale."""
    for _ in range(3):
        try:
            owner = json.loads(lock.read_text())
            if isinstance(owner, dict):
                return owner
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, ValueError):
            pass
        time.sleep(0.05)  # its owner may be writing it this moment
    return {}


def _lock_is_stale(owner: dict) -> bool:
    """True for a lock of this host whose process no longer runs (a killed run), or that records no owner.
    A lock of another host cannot be checked from here: it counts as held."""
    pid, host = owner.get("pid"), owner.get("host")
    if not isinstance(pid, int) or not host:
        return True
    if host != socket.gethostname():
        return False
    if pid == os.getpid():  # an earlier run in this process that never released it: no other run has our pid
        return True
    try:
        os.kill(pid, 0)  # signal 0 checks that the process exists, and sends nothing
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: it exists, another user's
        return False
    return False


def _held(output: Path, owner: dict, flag: str = "--output") -> SppError:
    lock = lock_path(output)
    return SppError(f"{flag} {output} is being written by another run (pid {owner.get('pid')} on {owner.get('host')}, "
                    f"since {owner.get('since', '?')}): wait for it to end or choose another {flag} (if that run is "
                    f"gone, delete {lock})")


def take_lock(output: Path) -> Path:
    """Create `lock_path(output)` with O_CREAT | O_EXCL (of two runs exactly one creates it), recording this
    process's pid and host. A stale lock (`_lock_is_stale`) is taken over.

    Raises:
        SppError: a live run holds the lock (naming its pid and host), or the directory is not writable.
    """
    lock = lock_path(output)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(5):
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            owner = _read_lock(lock)
            if owner is not None and not _lock_is_stale(owner):
                raise _held(output, owner) from None
            if owner is not None:
                _break_stale_lock(lock, owner)
            continue
        except OSError as exc:
            raise SppError(describe_os_error(exc, output)) from exc
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
        return lock
    raise SppError(f"could not take the lock {lock}: other runs into --output {output} keep taking it")


def _break_stale_lock(lock: Path, owner: dict) -> None:
    """Remove a stale lock by renaming it to a name of this process first: of two runs that both found it stale
    only one moves it, and a live run's lock that replaced it in the meantime is moved back."""
    claimed = lock.with_name(f"{lock.name}.{os.getpid()}")
    try:
        os.rename(lock, claimed)
    except FileNotFoundError:
        return
    if _read_lock(claimed) == owner:
        claimed.unlink(missing_ok=True)
    else:
        os.rename(claimed, lock)


def release_lock(lock: Path) -> None:
    """Remove a lock `take_lock` returned, if this process still holds it."""
    owner = _read_lock(lock)
    if owner and (owner.get("pid"), owner.get("host")) == (os.getpid(), socket.gethostname()):
        lock.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(output: Path, overwrite: bool = False, resume: bool = False,
               keep_partial: bool | None = None) -> Iterator[Path]:
    """Build a directory in `output.partial/` and rename it to `output` only when the block succeeds.

    A leftover `output.partial/` from an earlier crash is removed first, unless
    `keep_partial` (default: `resume`) asks to keep it (a resumable stage reads its progress from there).
    On an exception the partial directory is removed, except in resumable mode (`resume`), where anything but a
    write error (disk full, permissions) keeps it, so that a later `--resume` can continue. With `overwrite`, an
    existing `output` is replaced only after the new one is complete.

    While the block runs, the process holds `output.lock` (`lock_path`; beside the output, so never part of it,
    and untouched by the renames), a JSON file with its pid and host: a second run into the same output is refused
    in one line naming them, before it touches `output.partial/`. A lock whose process no longer runs (a kill)
    is taken over. The lock is removed however the block ends.

    Yields:
        The partial directory to write into.

    Raises:
        SppError: the output exists without `overwrite`, another run holds its lock, or the disk is full / not
            writable.
    """
    output = Path(os.path.abspath(output))  # `--output .`: the renames need the directory's name
    check_output_dir(output, overwrite)
    partial = partial_path(output)
    lock = take_lock(output)
    try:
        if partial.exists() and not (resume if keep_partial is None else keep_partial):
            shutil.rmtree(partial)
        try:
            partial.mkdir(parents=True, exist_ok=True)
            yield partial
            _fsync_tree(partial)
            if output.exists():
                old = output.with_name(output.name + ".old")
                shutil.rmtree(old, ignore_errors=True)
                output.rename(old)
                partial.rename(output)
                shutil.rmtree(old)
            else:
                partial.rename(output)
            _fsync_dir(output.parent)
        except OSError as exc:
            shutil.rmtree(partial, ignore_errors=True)
            raise SppError(describe_os_error(exc, output)) from exc
        except BaseException as exc:
            os_error = as_os_error(exc)  # a disk-full safetensors write
            if os_error is not None or not resume:
                shutil.rmtree(partial, ignore_errors=True)
            if os_error is not None:
                raise SppError(describe_os_error(os_error, output)) from exc
            raise
    finally:
        release_lock(lock)


def write_json(path: Path, obj) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path, what: str = "file") -> dict:
    """Read a JSON object, turning a missing or malformed file into an SppError that names it."""
    path = Path(path)
    try:
        with open(path) as f:
            obj = json.load(f)
    except FileNotFoundError as exc:
        raise SppError(f"{what} {path} does not exist") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SppError(f"{what} {path} is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise SppError(f"{what} {path} must hold a JSON object")
    return obj


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def mask_path(directory: Path) -> Path:
    """The mask file of a model directory: `MASK_FILE`, else an older output's `LEGACY_MASK_FILE`, else (neither
    exists) `MASK_FILE`, the path an error names and a writer uses."""
    directory = Path(directory)
    if not (directory / MASK_FILE).is_file() and (directory / LEGACY_MASK_FILE).is_file():
        return directory / LEGACY_MASK_FILE
    return directory / MASK_FILE


def safetensors_files(model_dir: Path) -> list[Path]:
    """The weight shards of a saved model directory (an older output's top-level mask file and adapters excluded),
    sorted."""
    model_dir = Path(model_dir)
    skip = {LEGACY_MASK_FILE, ADAPTER_WEIGHTS_FILE}
    return sorted(p for p in model_dir.glob("*.safetensors") if p.name not in skip)


def safetensors_keys(path: Path) -> dict[str, tuple[str, list[int]]]:
    """Read a safetensors header without loading tensors: name -> (dtype, shape).

    Raises:
        SppError: the file is truncated or its header is corrupt (names the file).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n <= 0 or 8 + n > size:
                raise ValueError("header length out of range")
            header = json.loads(f.read(n))
        end = 0
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            out[name] = (info["dtype"], list(info["shape"]))
            end = max(end, info["data_offsets"][1])
        if 8 + n + end > size:
            raise ValueError(f"data ends at byte {8 + n + end} but the file has {size}")
    except FileNotFoundError as exc:
        raise SppError(f"{path} does not exist") from exc
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise SppError(f"{path} is not a valid safetensors file (truncated or corrupt: {exc})") from exc
    return out


# Tokenizer files a model directory may hold, beyond the tokenizer class's own `vocab_files_names`.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json")
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# How the tokenizer was loaded on this machine (transformers records them in its init kwargs): not part of it.
TOKENIZER_LOAD_OPTIONS = ("local_files_only", "is_local")


def save_model(model, tokenizer, directory: Path, max_shard_size: str = "2GB") -> None:
    """`save_pretrained` the model (safetensors shards of at most `max_shard_size`) and its tokenizer.

    Every tokenizer file of the directory the tokenizer came from that `save_pretrained` does not
    write (e.g. a SentencePiece `tokenizer.model` beside `tokenizer.json`) is copied as it is;
    loading options are dropped from `tokenizer_config.json`; files get their mode from the umask.
    """
    directory = Path(directory)
    model.save_pretrained(str(directory), max_shard_size=max_shard_size)
    save_tokenizer(tokenizer, directory)
    follow_umask(*(p for p in directory.iterdir() if p.is_file()))


def save_tokenizer(tokenizer, directory: Path) -> None:
    """`save_model`'s tokenizer files (nothing for None): `save_pretrained`'s, the source directory's other tokenizer
    files copied as they are, and `tokenizer_config.json` without loading options."""
    if tokenizer is None:
        return
    tokenizer.save_pretrained(str(directory))
    drop_tokenizer_load_options(directory)
    for source in tokenizer_source_files(tokenizer):
        if not (directory / source.name).exists():
            shutil.copyfile(source, directory / source.name)


def tokenizer_source_files(tokenizer) -> list[Path]:
    """The tokenizer files in the directory `tokenizer` was loaded from (none for one built in memory)."""
    names = set(TOKENIZER_FILES) | {n for n in getattr(tokenizer, "vocab_files_names", {}).values() if isinstance(n, str)}
    folders = []
    if getattr(tokenizer, "name_or_path", "") and Path(tokenizer.name_or_path).is_dir():
        folders.append(Path(tokenizer.name_or_path))
    for value in (getattr(tokenizer, "init_kwargs", None) or {}).values():  # a hub tokenizer: files in the cache
        if isinstance(value, str) and Path(value).name in names and Path(value).is_file():
            folders.append(Path(value).parent)
    found = {}
    for folder in folders:
        for name in sorted(names):
            if (folder / name).is_file():
                found.setdefault(name, folder / name)
    return list(found.values())


def drop_tokenizer_load_options(directory: Path) -> None:
    """Remove `TOKENIZER_LOAD_OPTIONS` from `directory/tokenizer_config.json`, if it has any."""
    path = Path(directory) / TOKENIZER_CONFIG_FILE
    if not path.is_file():
        return
    config = read_json(path, what="tokenizer config")
    if any(key in config for key in TOKENIZER_LOAD_OPTIONS):
        write_json(path, {k: v for k, v in config.items() if k not in TOKENIZER_LOAD_OPTIONS})


def set_config_dtype(directory: Path, dtype: str) -> None:
    """Record `dtype` (e.g. "bfloat16") as the weights' dtype in `directory/config.json`, the key transformers
    writes (`dtype`; an older config's `torch_dtype` too), so `from_pretrained(dtype="auto")` loads them as written."""
    path = Path(directory) / "config.json"
    config = read_json(path, what="model config")
    config["dtype"] = dtype
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype
    write_json(path, config)


def proc_self_status(key: str) -> str | None:
    """The value of a field of Linux's /proc/self/status, without its unit ("0022" for Umask, "123456" for VmHWM,
    in kB); None where the file or the field does not exist."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    return next((line.split()[1] for line in lines if line.startswith(key + ":")), None)


def umask_file_mode() -> int:
    """The mode a newly created file gets from the process umask: 0o666 & ~umask (0o644 under 022)."""
    umask = proc_self_status("Umask")  # Linux states it without changing it, so no other thread sees a zero umask
    if umask is not None:
        return 0o666 & ~int(umask, 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def follow_umask(*paths: Path) -> None:
    """Give files the mode the umask gives new files. safetensors' writer (also under `save_pretrained`)
    creates every file 0600, which makes a model in a shared directory unreadable to others."""
    mode = umask_file_mode()
    for path in paths:
        os.chmod(path, mode)


def save_tensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """`safetensors.torch.save_file`, then the file mode from the umask (see `follow_umask`)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    follow_umask(Path(path))


SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "bfloat16": "BF16", "float16": "F16", "uint8": "U8",
                      "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "bool": "BOOL"}


def save_tensors_streamed(specs: dict, chunks, path: Path, metadata: dict | None = None) -> None:
    """Write a safetensors file whose tensors arrive one group at a time, so no process ever holds them all.

    The format is an 8-byte little-endian header length, a JSON header of names, dtypes, shapes and byte
    offsets (padded with spaces to a multiple of 8), then the raw little-endian bytes in offset order
    (the safetensors specification). The header is written from `specs` first, so the tensors must then
    arrive in the order of `specs` with exactly those dtypes and shapes; `safetensors.torch.load_file`
    reads the result like any other file.

    Args:
        specs: name -> (torch dtype, shape), in file order.
        chunks: an iterable of {name: CPU tensor} dicts, together covering `specs` in order.
        path: the file to write. metadata: string -> string, as `save_file`'s.

    Raises:
        RuntimeError: a tensor arrives out of order or with another dtype or shape (a bug in the caller).
    """
    import struct

    import torch

    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for name, (dtype, shape) in specs.items():
        size = dtype.itemsize * math.prod(shape)
        header[name] = {"dtype": SAFETENSORS_DTYPES[str(dtype).removeprefix("torch.")], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    expected = iter(specs.items())
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for chunk in chunks:
            for name, tensor in chunk.items():
                want, (dtype, shape) = next(expected, (None, (None, None)))
                if name != want or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                    raise RuntimeError(f"streamed tensor {name} {tuple(tensor.shape)} {tensor.dtype} does not match "
                                       f"the header's next entry {want} {shape} {dtype}; this is a bug in spp")
                f.write(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy())  # no copy of the bytes
            chunk = tensor = None  # freed before the next group is made
        if next(expected, None) is not None:
            raise RuntimeError(f"{path}: fewer tensors arrived than the header lists; this is a bug in spp")
    follow_umask(Path(path))


# `spp train` outputs: the JSONL log, and resumable checkpoints `checkpoints/step-N/`, each holding the
# adapter files above plus the optimizer (tensors + JSON), trainer state (JSON) and per-rank RNG states.
TRAIN_LOG_FILE = "train_log.jsonl"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step-"
OPTIMIZER_WEIGHTS_FILE = "optimizer.safetensors"
OPTIMIZER_CONFIG_FILE = "optimizer.json"
TRAINER_STATE_FILE = "trainer_state.json"
RNG_FILE_PATTERN = "rng-rank{rank}.safetensors"
SHARDED_STATE_DIR = "sharded"  # distributed: fsdp: each rank's shards of the adapter and AdamW state (DCP)

# `spp prune` progress inside OUTPUT.partial/ (see spp.io.progress); removed before the output is renamed.
PRUNE_PROGRESS_DIR = "prune-progress"
PRUNE_PROGRESS_FILE = "progress.json"
# `spp train` with `objective: blockwise`: its per-block progress inside OUTPUT.partial/, in the same format.
BLOCKWISE_PROGRESS_DIR = "blockwise-progress"


def as_os_error(exc: BaseException) -> OSError | None:
    """The OSError behind `exc`: itself, or the `(os error N)` that safetensors' Rust writer puts in its message
    (it raises SafetensorError, not OSError, when the disk is full). None for anything else."""
    import re

    if isinstance(exc, OSError):
        return exc
    if type(exc).__name__ == "SafetensorError":
        match = re.search(r"\(os error (\d+)\)", str(exc))
        if match:
            code = int(match.group(1))
            return OSError(code, os.strerror(code))
    return None
