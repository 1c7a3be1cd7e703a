"""A training checkpoint's files besides the adapter: loop state, data position, RNG, AdamW state, and the log.

`checkpoints/step-N/` holds (names in `spp.io.checkpoint`):
- `trainer_state.json`: the `LoopState` fields, `data_position` (a record for people: the step alone fixes the
  data order), `python_random` (`random.getstate()`) and `grad_scaler` (fp16's loss scale, else null);
- `rng-rank{r}.safetensors`: process r's torch RNG state (`torch`, and `cuda.i` per CUDA device);
- unsharded runs: `optimizer.safetensors` (AdamW's tensors keyed `<param name>/<state key>`) and `optimizer.json`
  (its param groups, the non-tensor state and the parameter names, in order).
A checkpoint is built as `step-N.tmp/` and renamed when complete (`new_checkpoint`, `commit_checkpoint`).
This module knows files only; `spp.train.loop` decides when to write them.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from spp.errors import SppError
from spp.io.checkpoint import (CHECKPOINT_PREFIX, CHECKPOINTS_DIR, OPTIMIZER_CONFIG_FILE, OPTIMIZER_WEIGHTS_FILE,
                               RNG_FILE_PATTERN, TRAINER_STATE_FILE, read_json, save_tensors, write_json)


@dataclass
class LoopState:
    """Where training stands; all of it is saved in every checkpoint (as JSON)."""

    step: int = 0  # optimizer steps done
    tokens_seen: int = 0  # non-padding input tokens, all processes
    train_loss: float | None = None  # loss of the last step
    val_loss: float | None = None  # last validation loss
    run_conditions: dict = field(default_factory=dict)  # spp.io.conditions the run computes under (--resume checks)
    inputs: dict = field(default_factory=dict)  # spp.train.input_identity: what the run trains from (--resume checks)


def checkpoint_dirs(workdir: Path) -> list[Path]:
    """Complete checkpoints under `workdir/checkpoints`, oldest first (temporary ones are ignored)."""
    root = Path(workdir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def checkpoint_tmp(workdir: Path, step: int) -> Path:
    """`checkpoints/step-N.tmp/`, where the checkpoint of step N is built (not created here)."""
    return Path(workdir) / CHECKPOINTS_DIR / f"{CHECKPOINT_PREFIX}{step}.tmp"


def new_checkpoint(workdir: Path, step: int) -> Path:
    """Create `checkpoint_tmp(workdir, step)` empty (a leftover of a crash is removed first)."""
    tmp = checkpoint_tmp(workdir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit_checkpoint(workdir: Path, step: int, keep: int) -> Path:
    """Rename the complete `step-N.tmp/` to `step-N/`, then drop all but the newest `keep` checkpoints."""
    tmp = checkpoint_tmp(workdir, step)
    final = tmp.with_name(f"{CHECKPOINT_PREFIX}{step}")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in checkpoint_dirs(workdir)[:-keep]:
        shutil.rmtree(old)
    return final


def save_optimizer(optimizer, names: list[str], directory: Path) -> None:
    """`optimizer.safetensors` (the state's tensors keyed `<param name>/<state key>`) and `optimizer.json` (the
    param groups, the rest of the state and `names`) of an unsharded optimizer whose parameters are `names`."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{names[index]}/{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{names[index]}/{key}"] = value
    save_tensors(tensors, directory / OPTIMIZER_WEIGHTS_FILE)
    write_json(directory / OPTIMIZER_CONFIG_FILE, {"param_groups": state["param_groups"], "scalars": scalars,
                                                   "param_names": names})


def load_optimizer(optimizer, names: list[str], directory: Path) -> None:
    """Restore `save_optimizer`'s files into `optimizer` (in place).

    Raises:
        SppError: the files hold the state of other parameters than `names`.
    """
    from safetensors.torch import load_file

    tensors = load_file(str(directory / OPTIMIZER_WEIGHTS_FILE))
    config = read_json(directory / OPTIMIZER_CONFIG_FILE, what="optimizer state")
    if config["param_names"] != names:
        raise SppError("the checkpoint's optimizer holds other parameters than this model's adapter")
    index = {name: i for i, name in enumerate(names)}
    state: dict[int, dict] = {}
    for flat, value in list(tensors.items()) + list(config["scalars"].items()):
        name, _, key = flat.rpartition("/")
        state.setdefault(index[name], {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": config["param_groups"]})


def save_rng(directory: Path, rank: int) -> None:
    """This process's torch (and CUDA) RNG state, as `rng-rank{rank}.safetensors`."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_tensors(rng, directory / RNG_FILE_PATTERN.format(rank=rank))


def load_rng(checkpoint: Path, rank: int) -> None:
    """Restore `save_rng`'s state of process `rank`.

    Raises:
        SppError: the checkpoint has no RNG state for `rank` (written with fewer processes).
    """
    from safetensors.torch import load_file

    rng_path = checkpoint / RNG_FILE_PATTERN.format(rank=rank)
    if not rng_path.is_file():
        raise SppError(f"checkpoint {checkpoint} has no RNG state for process {rank} "
                       "(was it written with another number of processes?)")
    rng = load_file(str(rng_path))
    torch.set_rng_state(rng["torch"])
    cuda_states = [rng[f"cuda.{i}"] for i in range(sum(k.startswith("cuda.") for k in rng))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)


def data_position(n_examples: int, batch_size: int, seed: int, step: int) -> dict:
    """Where step `step` leaves the data: a record for people; the step alone fixes the order."""
    epoch, batch_in_epoch = divmod(step, n_examples // batch_size)
    return {"epoch": epoch, "batch_in_epoch": batch_in_epoch, "examples": n_examples, "batch_size": batch_size,
            "seed": seed}


def write_trainer_state(directory: Path, state: LoopState, position: dict, grad_scaler: dict | None) -> None:
    """`trainer_state.json`: the loop state, the data position, Python's RNG state and the fp16 loss scale."""
    version, internal, gauss = random.getstate()
    write_json(directory / TRAINER_STATE_FILE, {**asdict(state), "data_position": position,
                                                "python_random": [version, list(internal), gauss],
                                                "grad_scaler": grad_scaler})


def read_trainer_state(checkpoint: Path, n_examples: int) -> tuple[LoopState, dict | None]:
    """Read `trainer_state.json` and restore Python's RNG state from it.

    Returns:
        (the loop state, the fp16 loss scaler's state or None).

    Raises:
        SppError: the data now gives another number of training examples than the checkpointed run had.
    """
    raw = read_json(checkpoint / TRAINER_STATE_FILE, what="trainer state")
    saved_examples = raw.pop("data_position")["examples"]
    if saved_examples != n_examples:
        raise SppError(f"--resume: the data now gives {n_examples} training examples but the interrupted run had "
                       f"{saved_examples}; the data changed, so the run cannot continue in the same order")
    scaler = raw.pop("grad_scaler", None)
    version, internal, gauss = raw.pop("python_random")
    random.setstate((version, tuple(internal), gauss))
    return LoopState(**raw), scaler


def truncate_log(log_path: Path, step: int) -> None:
    """Drop log records after `step` (a resumed run redoes those steps)."""
    if not log_path.is_file():
        return
    kept = [line for line in log_path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    log_path.write_text("".join(line + "\n" for line in kept))
