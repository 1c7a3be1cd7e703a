"""The mask file: one bit-packed keep-mask per pruned tensor, in `spp/masks.safetensors` (`MASK_FILE`).

Keys are tensor names as they appear in the model's saved safetensors files. Each
mask is stored as uint8 of shape (out, ceil(in / 8)): bit i of byte k holds the
keep-flag of input column 8k + i ("little" bit order), for every output row. The
safetensors metadata records, per key, the stored weight's shape and its layout:
`linear` (weight stored (out, in)) or `conv1d` (GPT-2's Conv1D, stored (in, out)).
The file's sha256 is the mask's identity: merge copies it unchanged. It lives in a subfolder so that a
loader reading every top-level `*.safetensors` of a model directory gets the weights only; outputs
of older spp have it at the top as `masks.safetensors`, which every stage still reads
(`spp.io.checkpoint.mask_path`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open

from spp.errors import SppError

FORMAT = "spp-mask"
VERSION = "1"
LAYOUTS = ("linear", "conv1d")
_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool (..., out, in) mask along `in` into uint8 (..., out, ceil(in / 8)), little bit order."""
    in_features = mask.shape[-1]
    pad = (-in_features) % 8
    bits = torch.nn.functional.pad(mask.to(torch.uint8), (0, pad))
    bits = bits.view(*mask.shape[:-1], -1, 8)  # (..., out, in/8, 8)
    return (bits * _BIT_WEIGHTS).sum(dim=-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of `pack_bits`: uint8 (out, ceil(in / 8)) -> bool (out, in)."""
    bits = (packed.unsqueeze(-1) & _BIT_WEIGHTS) != 0  # (out, in/8, 8)
    return bits.flatten(1)[:, :in_features]


def save_masks(path: Path, masks: dict[str, torch.Tensor], layouts: dict[str, str]) -> None:
    """Write keep-masks (bool, in the stored weight's shape) bit-packed to `path`.

    Args:
        path: the file to write (normally `<dir>/spp/masks.safetensors`; its folder is made if missing).
        masks: saved tensor name -> bool mask shaped like the stored weight.
        layouts: saved tensor name -> "linear" or "conv1d".
    """
    packed = {}
    for name, mask in masks.items():
        mask = mask.detach().to("cpu", torch.bool)
        packed[name] = pack_bits(mask.t() if layouts[name] == "conv1d" else mask)
    save_packed_masks(path, packed, {name: tuple(mask.shape) for name, mask in masks.items()}, layouts)


def save_packed_masks(path: Path, packed: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]],
                      layouts: dict[str, str]) -> None:
    """`save_masks` for masks already packed (`pack_bits` of the (out, in) view), written without a copy.

    Args:
        path: as `save_masks`'s.
        packed: saved tensor name -> uint8 (out, ceil(in / 8)).
        shapes: saved tensor name -> the stored weight's shape. layouts: as `save_masks`'s.
    """
    from spp.io.checkpoint import save_tensors_streamed

    metadata = {"format": FORMAT, "version": VERSION}
    for name in packed:
        if layouts[name] not in LAYOUTS:
            raise ValueError(f"unknown layout {layouts[name]!r} for {name}")
        metadata[name] = json.dumps({"shape": list(shapes[name]), "layout": layouts[name], "bitorder": "little"})
    # safetensors' order for tensors of one dtype, and sorted metadata keys: equal masks give equal files, so equal
    # sha256 (the mask's identity)
    names = sorted(packed)
    specs = {name: (torch.uint8, tuple(packed[name].shape)) for name in names}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_tensors_streamed(specs, ({name: packed[name]} for name in names), Path(path), dict(sorted(metadata.items())))


def check_format(path: Path, metadata: dict) -> None:
    """Refuse a safetensors file whose metadata does not name spp's mask format (`FORMAT`).

    Raises:
        SppError: naming the file and the format it records.
    """
    if metadata.get("format") != FORMAT:
        raise SppError(f"{path} is not an spp mask file (metadata format={metadata.get('format')!r})")


def load_masks(path: Path,
               names: Callable[[str], bool] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a mask file back into bool masks in the stored weight's shape.

    Args:
        path: the mask file.
        names: decode only the entries whose saved name it accepts (one block's, 1 byte a weight while held);
            None: every entry.

    Returns:
        (masks, layouts), both keyed by saved tensor name.

    Raises:
        SppError: the file is missing, corrupt, or not an spp mask file (names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise SppError(f"mask file {path} does not exist (is this an `spp prune` output?)")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            packed = {name: f.get_tensor(name) for name in f.keys() if names is None or names(name)}
    except (SafetensorError, OSError, ValueError) as exc:
        raise SppError(f"mask file {path} is corrupt or truncated: {exc}") from exc
    check_format(path, metadata)
    masks, layouts = {}, {}
    for name, bits in packed.items():
        try:
            info = json.loads(metadata[name])
            shape, layout = info["shape"], info["layout"]
        except (KeyError, json.JSONDecodeError) as exc:
            raise SppError(f"mask file {path}: entry {name} has no valid metadata") from exc
        in_features = shape[0] if layout == "conv1d" else shape[1]
        out_in = unpack_bits(bits, in_features)
        masks[name] = out_in.t().contiguous() if layout == "conv1d" else out_in
        layouts[name] = layout
    return masks, layouts
