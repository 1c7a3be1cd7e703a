"""spp.io.reader: a model directory resolved once (names, shards, manifest, mask file)."""

from __future__ import annotations

import torch

from spp.io.reader import read_checkpoint


def test_the_mask_file_is_decoded_once_per_checkpoint(pruned_tiny_dir, monkeypatch):
    import spp.io.maskfile as maskfile

    calls = []
    real = maskfile.load_masks
    monkeypatch.setattr(maskfile, "load_masks", lambda path: calls.append(path) or real(path))
    checkpoint = read_checkpoint(pruned_tiny_dir)
    masks, layouts = checkpoint.read_masks()
    assert masks and set(layouts) == set(masks)
    by_parameter = checkpoint.masks_by_parameter()
    again, _ = checkpoint.read_masks()
    assert len(calls) == 1 and again is masks
    assert all(by_parameter[checkpoint.parameter_name(saved)] is keep for saved, keep in masks.items())
    assert all(keep.dtype == torch.bool for keep in masks.values())
