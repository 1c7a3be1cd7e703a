"""Run conditions: what, besides the settings and the inputs, changes the float results of a run.

The same settings on the same inputs give bit-identical numbers only under the same
conditions: the number of torch intra-op threads (a matmul or reduction splits its sum
differently with more threads), the device and its kernels (the GPU model, or on a CPU
the instruction set torch dispatches to), the compute dtype, the number of processes
(DDP sums gradients across them), the torch and transformers versions, and torch's
global numeric switches (deterministic algorithms, float32 matmul precision, i.e. TF32).
`run_conditions` builds that record in this one place; prune keeps it with its progress,
train with every checkpoint, and every stage writes it into its manifest.
`check_same_conditions` refuses a `--resume` whose conditions differ. This module does not
decide what a stage does with the record.

Considered and left out: torch inter-op threads (they run independent ops side by side,
each op's sum is unchanged), the CPU model name (kernels are picked by instruction set,
which is recorded), the accelerate version (it only wraps torch's DDP all-reduce), and the
cuDNN switches (the models spp handles have no convolutions).

The inputs are the other half of what a `--resume` must find unchanged: prune keeps the sha256 of its
input files with its progress, train the identity of its base, mask, data and teacher with every
checkpoint (`spp.train.input_identity`), and `check_same_inputs` refuses a `--resume` after any of
them changed, naming the file. `file_identity` is how a file spp does not hash is known.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

from spp.errors import SppError


def run_conditions(device: torch.device | str, dtype: torch.dtype | str, world_size: int = 1) -> dict:
    """The conditions this process computes under, as a JSON-able dict.

    Args:
        device: where the math runs (`cpu`, `cuda`, `cuda:1`, ...); only its type and model are kept.
        dtype: the compute dtype (a torch dtype or its name, e.g. `float32`).
        world_size: the number of processes that share the work.
    """
    import transformers

    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:  # CPU kernels are picked by instruction set (AVX2, AVX512, ...), which changes the sums
        name = f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()}"
    return {
        "torch_threads": torch.get_num_threads(),
        "device": device.type,
        "device_name": name,
        "dtype": str(dtype).removeprefix("torch."),
        "world_size": int(world_size),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


def describe_conditions(conditions: dict) -> str:
    """One short line for people: `2 torch threads, cpu (x86_64 AVX512), float32, 1 process, torch …, transformers …`."""
    if not conditions:
        return "not recorded"
    threads, world = conditions.get("torch_threads"), conditions.get("world_size")
    return (f"{_count(threads, 'torch thread')}, {conditions.get('device')} "
            f"({conditions.get('device_name')}), {conditions.get('dtype')}, "
            f"{_count(world, 'process')}, torch {conditions.get('torch')}, "
            f"transformers {conditions.get('transformers')}")


def _count(n, noun: str) -> str:
    """`1 torch thread`, `2 torch threads`, `2 processes`."""
    return f"{n} {noun}{'' if n == 1 else 'es' if noun.endswith('s') else 's'}"


def _difference(key: str, old, new) -> tuple[str, str]:
    """(what differs, in words; how to match the old run) for one condition."""
    if key == "torch_threads":
        return (f"used {_count(old, 'torch thread')}, this one {new}",
                f"rerun with OMP_NUM_THREADS={old} (or torch.set_num_threads({old}))")
    if key == "world_size":
        return (f"ran on {_count(old, 'process')}, this one on {new}",
                f"launch with {_count(old, 'process')} (accelerate launch --num_processes {old})")
    if key in ("torch", "transformers"):
        return f"used {key} {old}, this one {key} {new}", f"install {key}=={old}"
    if key == "deterministic_algorithms":
        return (f"ran with torch.use_deterministic_algorithms({old}), this one with {new}",
                f"call torch.use_deterministic_algorithms({old})")
    if key == "float32_matmul_precision":
        return (f"ran with float32 matmul precision {old!r}, this one {new!r}",
                f"call torch.set_float32_matmul_precision({old!r})")
    if key in ("device", "device_name"):
        return f"ran on {key.replace('_', ' ')} {old!r}, this one on {new!r}", "run on the same kind of device"
    return f"had {key} {old!r}, this one {new!r}", f"run with {key} {old!r}"


def check_same_conditions(saved: dict | None, now: dict, what: str, start_over: str) -> None:
    """Refuse to continue `what` (e.g. "the interrupted run") when its recorded conditions differ from `now`.

    Args:
        saved: the record kept with the progress or checkpoint (None or empty: an older spp kept none).
        now: `run_conditions(...)` of this process.
        what: the thing being resumed, as the message names it.
        start_over: how to start over instead (e.g. "run without --resume to start over").

    Raises:
        SppError: one line naming the first differing condition, how to match it, and the others that differ.
    """
    if not saved:
        raise SppError(f"--resume: {what} recorded no run conditions (it was made by an older spp), so it cannot be "
                       f"continued bit-exactly; {start_over}")
    changed = [key for key in now if saved.get(key) != now[key]]
    if not changed:
        return
    first = changed[0]
    differs, how = _difference(first, saved.get(first), now[first])
    others = f" (also differs: {', '.join(changed[1:])})" if changed[1:] else ""
    raise SppError(f"--resume: {what} {differs}; {how} to continue bit-exactly, or {start_over}{others}")


def file_identity(path: Path) -> str:
    """`size N bytes, modified T` of a file: what changes when it is rewritten, known without reading it (for the
    files of a model spp did not write, whose hashes no manifest records; hashing them would read the whole model).
    """
    stat = Path(path).stat()
    seconds, nanoseconds = divmod(stat.st_mtime_ns, 10**9)
    return (f"size {stat.st_size} bytes, modified {time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(seconds))}"
            f".{nanoseconds:09d}Z")


def _is_sha256(identity: str | None) -> bool:
    return identity is not None and len(identity) == 64 and all(c in "0123456789abcdef" for c in identity)


def _then_now(old: str | None, new: str | None) -> str:
    """`sha256 abc… then, def… now`, or each identity in words (`absent` for none)."""
    if _is_sha256(old) and _is_sha256(new):
        return f"sha256 {old[:12]}… then, {new[:12]}… now"
    words = [f"sha256 {i[:12]}…" if _is_sha256(i) else i or "absent" for i in (old, new)]
    return f"{words[0]} then, {words[1]} now"


def spelled_alike(value):
    """A setting or input path as a `--resume` compares it: a string as the absolute path it would name from this
    directory (`pruned`, `./pruned/` and `/work/pruned` are one setting), anything else as it is. Applied to both
    sides alike, so a string that is not a path (`wanda`, `2:4`) compares as itself."""
    return os.path.abspath(os.path.expanduser(value)) if isinstance(value, str) and value else value


def check_same_settings(saved: dict, now: dict, start_over: str | None = None) -> None:
    """Refuse a `--resume` whose settings differ from the interrupted run's, each compared by `spelled_alike`.

    Raises:
        SppError: one line naming the first differing setting (the user's own before the `*_sha256` ones), its
            value then and now, and every differing setting; then `start_over` when given.
    """
    changed = sorted((k for k in saved.keys() | now.keys() if spelled_alike(saved.get(k)) != spelled_alike(now.get(k))),
                     key=lambda k: (k.endswith("_sha256"), k))
    if changed:
        first = changed[0]
        raise SppError(f"--resume: {first} was {saved.get(first)!r} in the interrupted run but is {now.get(first)!r} now "
                       f"({len(changed)} setting(s) differ: {', '.join(changed)})" + (f"; {start_over}" if start_over
                                                                                       else ""))


def check_same_inputs(saved: dict | None, now: dict, what: str, start_over: str) -> None:
    """Refuse to continue `what` when an input it recorded changed since.

    Args:
        saved: input (a file's path) -> its identity (a sha256, or `file_identity`), as recorded with the progress
            or checkpoint (None: an older spp recorded none).
        now: the same record for this run.
        what: the thing being resumed, as the message names it.
        start_over: how to start over instead.

    Raises:
        SppError: one line naming the first input that changed, its identity then and now, and the others.
    """
    if saved is None:
        raise SppError(f"--resume: {what} recorded no identity of its inputs (it was made by an older spp), so "
                       f"spp cannot tell whether its model or data changed since; {start_over}")
    named = {spelled_alike(k): k for k in (*saved, *now)}  # each file as given (this run's spelling), by what it names
    saved, now = ({spelled_alike(k): v for k, v in d.items()} for d in (saved, now))
    changed = [key for key in {**saved, **now} if saved.get(key) != now.get(key)]
    if not changed:
        return
    first, others = changed[0], [named[key] for key in changed[1:]]
    also = ""
    if others:
        more = f" and {len(others) - 3} more" if len(others) > 3 else ""
        also = f", and so did {', '.join(others[:3])}{more}"
    raise SppError(f"--resume: {named[first]} changed since {what} ({_then_now(saved.get(first), now.get(first))})"
                   f"{also}; {start_over}")
