"""FSDP2 sharding of a mixture-of-experts model: a tiny pruned Mixtral (4 experts, top-2) whose fused expert weights
`spp.train.fsdp.load_sharded_model` builds from their saved per-expert tensors, with adapted experts modules' stacked tensors
and masks sharded along the expert axis (two ranks, torchrun, gloo); `spp train --distributed fsdp` on it, with two ranks
and with one, against one unsharded process.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import MOE_CONFIGS
from spp.io.checkpoint import ADAPTER_WEIGHTS_FILE
from spp.train import run_train
from test_fsdp import assert_adapter_close, cli_args, log_records, tiny_cfg, torchrun


@pytest.fixture(scope="module")
def pruned_mixtral(shared_data, text_file, tmp_path_factory) -> Path:
    """`spp prune --method wanda --pattern 2:4` of a seeded random tiny Mixtral (vocab 512, the stories260K tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from spp.config import PruneConfig
    from spp.io.checkpoint import save_model
    from spp.prune import run_prune

    kwargs = dict(MOE_CONFIGS["mixtral"], vocab_size=512, bos_token_id=1, eos_token_id=2, max_position_embeddings=256)
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("mixtral")
    save_model(AutoModelForCausalLM.from_config(config, dtype=torch.float32),
               AutoTokenizer.from_pretrained(shared_data / "stories260K-hf"), directory / "dense")
    run_prune(PruneConfig(model=str(directory / "dense"), output=str(directory / "pruned"), method="wanda",
                          pattern="2:4", calib=str(text_file), nsamples=4, seqlen=32, device="cpu"))
    return directory / "pruned"


def test_fsdp_two_ranks_on_mixtral_match_one_process_and_merge(pruned_mixtral, text_file, tmp_path):
    """Losses and the gathered adapter (α, β of every fused expert weight and linear layer) equal one unsharded
    process; the run's own pruned-zero check passes (it raises otherwise); the adapter merges and verifies."""
    kw = dict(max_steps=2, save_steps=2, eval_steps=2)
    single = tmp_path / "single"
    run_train(tiny_cfg(pruned_mixtral, text_file, single, **kw))
    sharded = tmp_path / "fsdp"
    result = torchrun(cli_args(tiny_cfg(pruned_mixtral, text_file, sharded, distributed="fsdp", **kw)), tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]

    one, two = log_records(single), log_records(sharded)
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        for key in ("loss", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5)
    ref, got = load_file(str(single / ADAPTER_WEIGHTS_FILE)), load_file(str(sharded / ADAPTER_WEIGHTS_FILE))
    assert "model.layers.1.mlp.experts.down_proj.spp_alpha" in got
    assert_adapter_close(got, ref, rtol=1e-5)

    from spp.config import MergeConfig
    from spp.merge import run_merge
    from spp.verify import verify_checkpoint

    run_merge(MergeConfig(model=str(pruned_mixtral), adapter=str(sharded), output=str(tmp_path / "merged")))
    verify_checkpoint(tmp_path / "merged")


@pytest.mark.parametrize("kind", ["spp", "masked_lora", "full"])
def test_one_rank_fsdp_on_mixtral_equals_unsharded(pruned_mixtral, text_file, tmp_path, kind):
    """Every kind, with activation checkpointing: the experts' masks are expert-sharded uint8 parameters."""
    kw = dict(max_steps=2, batch_size=4, val_set_size=0, adapter=kind)
    plain = run_train(tiny_cfg(pruned_mixtral, text_file, tmp_path / "plain", **kw))
    sharded = run_train(tiny_cfg(pruned_mixtral, text_file, tmp_path / "fsdp", distributed="fsdp",
                                 gradient_checkpointing=True, **kw))
    assert sharded.adapted_modules == plain.adapted_modules
    assert sharded.train_loss == pytest.approx(plain.train_loss, rel=1e-6)
    assert_adapter_close(load_file(str(tmp_path / "fsdp" / ADAPTER_WEIGHTS_FILE)),
                         load_file(str(tmp_path / "plain" / ADAPTER_WEIGHTS_FILE)), rtol=1e-5)


def test_sharded_mixtral_starts_and_steps_as_the_unsharded_model(pruned_mixtral, tmp_path):
    """Two ranks, every kind: the sharded loader's adapter init equals `add_adapter` on the whole model (same random
    draws: `add_adapter` adapts in model order), each rank's half batch gives the whole batch's gradients, at rest each
    rank holds 2 of the 4 experts of every fused weight, adapter tensor and uint8 mask, and the tensors
    `AdaptedWeight.forward` builds W_eff from (and hands to `functional_call`) are whole; the gathered adapter file
    is byte for byte the unsharded one, and the gathered pruned-zero check passes."""
    import json
    import os
    import subprocess

    from test_fsdp import TORCHRUN

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(TORCHRUN + [__file__, str(pruned_mixtral), str(tmp_path)], env=env, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "rank0.json").read_text())
    expected = {"spp": (["spp_alpha", "spp_beta"], []), "masked_lora": (["lora_A", "lora_B"], []),
                "full": ([], ["state"])}  # masked LoRA rebuilds its mask from W and the kept zeros' indices
    assert sorted(report) == sorted(expected)
    for kind, (tensors, masked) in expected.items():
        at_rest, in_forward = report[kind]["at_rest"], report[kind]["in_forward"]
        assert report[kind]["init_equal"], kind
        assert report[kind]["gradient_error"] < 1e-5, (kind, report[kind]["gradient_error"])
        assert all(local[0] == 2 and full[0] == 4 for local, full in at_rest.values())
        assert {name.split(".experts.")[1] for name in at_rest if name.startswith("model.layers.0.")} == \
            {f"{where}.{p}" for p in ("gate_up_proj", "down_proj") for where in ("base_layer", *masked)} | \
            {f"adapted.{p}.{t}" for p in ("gate_up_proj", "down_proj") for t in tensors}
        assert len(in_forward) >= 4 and all(shape[0] == 4 and not dtensor for shape, dtensor in in_forward)
        # the gathered adapter file holds the unsharded one's tensors: names, dtypes, shapes, values
        got = load_file(str(tmp_path / kind / "sharded" / ADAPTER_WEIGHTS_FILE))
        ref = load_file(str(tmp_path / kind / "whole" / ADAPTER_WEIGHTS_FILE))
        assert "model.layers.1.mlp.experts.down_proj." + (tensors or ["full_weight"])[0] in got
        assert got.keys() == ref.keys() and all(torch.equal(got[k], v) for k, v in ref.items()), kind


def _worker(base: str, out_dir: str) -> None:
    """Under torchrun (2 ranks), for each kind: the pruned Mixtral adapted whole (every rank) and loaded sharded;
    their adapter tensors at init, their gradients on one global batch (each sharded rank half of it), the
    experts' local and global shapes at rest and what every `AdaptedWeight.forward` reads."""
    import json

    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, distribute_tensor

    from spp.adapter.config import AdapterConfig
    from spp.adapter.weight import AdaptedWeight
    from spp.adapter.model import add_adapter, adapter_state_dict, save_adapter
    from spp.io.reader import read_checkpoint
    from spp.models import load_model
    from spp.train import check_layer_zeros
    from spp.train.fsdp import gathered_layers, load_sharded_model, save_adapter_gathered

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    checkpoint = read_checkpoint(Path(base), need_manifest=True)
    masks = checkpoint.masks_by_parameter()
    torch.manual_seed(1)
    ids = torch.randint(0, 512, (4, 16))  # one global batch; rank k takes rows 2k, 2k+1
    forward, report, seen = AdaptedWeight.forward, {}, []

    def recording(self, *args, **kwargs):
        for p in self.params if self.fused else []:
            mask = self._state(p) if self.kind == "full" else None  # masked LoRA's state is (k, 3) indices
            for tensor in (getattr(self.base_layer, p), *self.tensors(p).values(), mask):
                if tensor is not None:
                    seen.append((list(tensor.shape), isinstance(tensor, DTensor)))
        return forward(self, *args, **kwargs)

    def gradients(model, batch) -> dict:
        model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    for kind in ("spp", "masked_lora", "full"):
        cfg = AdapterConfig(kind=kind, spp_row_groups=4, rank=4)
        torch.manual_seed(0)
        whole = load_model(base, dtype="float32")
        add_adapter(whole, cfg, masks)
        init = {k: v.clone() for k, v in adapter_state_dict(whole).items()}
        with torch.no_grad():  # β and B away from 0, so every gradient is non-trivial
            for v in adapter_state_dict(whole).values():
                v.add_(torch.randn_like(v) * 1e-2)
        reference = gradients(whole, ids)
        torch.manual_seed(0)
        sharded, _ = load_sharded_model(checkpoint, torch.float32, cfg, masks)
        init_equal = all(torch.equal(v.full_tensor(), init[k]) for k, v in adapter_state_dict(sharded).items())
        trained = dict(whole.named_parameters())
        with torch.no_grad():  # the reference's moved tensors, each rank its shard
            for name, p in sharded.named_parameters():
                if p.requires_grad:
                    p.copy_(distribute_tensor(trained[name].detach(), p.device_mesh, p.placements))
        AdaptedWeight.forward = recording
        seen.clear()
        sharded.train()
        got = gradients(sharded, ids[2 * rank : 2 * rank + 2])  # FSDP averages the two halves' mean losses
        AdaptedWeight.forward = forward
        error = max(float((got[n].full_tensor() - r).abs().max() / r.abs().max()) for n, r in reference.items())
        at_rest = {name: (list(p.to_local().shape), list(p.shape)) for name, p in sharded.named_parameters()
                   if ".experts." in name}
        for name, layer, W, tensors in gathered_layers(sharded):  # `full`'s noise above also moved pruned entries
            if kind != "full":
                check_layer_zeros(name, layer, W, masks, tensors)
        save_adapter_gathered(sharded, cfg, Path(out_dir) / kind / "sharded", rank == 0)
        if rank == 0:
            save_adapter(whole, cfg, Path(out_dir) / kind / "whole")
        report[kind] = {"init_equal": init_equal, "gradient_error": error, "at_rest": at_rest, "in_forward": list(seen)}
    if rank == 0:
        (Path(out_dir) / "rank0.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    import sys

    _worker(sys.argv[1], sys.argv[2])
