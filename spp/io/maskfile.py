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

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from spp.errors import SppError

FORMAT = "spp-mask"
VERSION = "1"
LAYOUTS = ("linear", "conv1d")
_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool (out, in) matrix along `in` into uint8 (out, ceil(in / 8)), little bit order."""
    out_features, in_features = mask.shape
    pad = (-in_features) % 8
    bits = torch.nn.functional.pad(mask.to(torch.uint8), (0, pad))
    bits = bits.view(out_features, -1, 8)  # (out, in/8, 8)
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
    tensors, metadata = {}, {"format": FORMAT, "version": VERSION}
    for name in sorted(masks):
        mask, layout = masks[name].detach().to("cpu", torch.bool), layouts[name]
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r} for {name}")
        out_in = mask.t() if layout == "conv1d" else mask
        tensors[name] = pack_bits(out_in).contiguous()
        metadata[name] = json.dumps({"shape": list(mask.shape), "layout": layout, "bitorder": "little"})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(_sorted_metadata(save(tensors, metadata=metadata)))


def _sorted_metadata(blob: bytes) -> bytes:
    """The same safetensors bytes with the header's `__metadata__` keys sorted.

    safetensors writes metadata from a Rust HashMap, whose order changes from one process to
    the next; sorting makes equal masks give equal files, and so equal sha256 (the mask's identity).
    The header keeps its length (same keys, same values), so the tensor data does not move.
    """
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    if len(text) > n:  # cannot happen for a reordering; keep safetensors' own bytes rather than guess
        return blob
    return blob[:8] + text + b" " * (n - len(text)) + blob[8 + n :]


def load_masks(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a mask file back into bool masks in the stored weight's shape.

    Returns:
        (masks, layouts), both keyed by saved tensor name.

    Raises:
        SppError: the file is missing, corrupt, or not an spp mask file (names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise SppError(f"mask file {path} does not exist (is this an `spp prune` output?)")
    try:
        packed = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise SppError(f"mask file {path} is corrupt or truncated: {exc}") from exc
    if metadata.get("format") != FORMAT:
        raise SppError(f"{path} is not an spp mask file (metadata format={metadata.get('format')!r})")
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
