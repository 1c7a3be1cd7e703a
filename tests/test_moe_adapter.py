"""Adapters on mixture-of-experts weights: `AdaptedWeight` in memory, `spp train`, `spp merge` and eval.

Tiny random Mixtral and Qwen3-MoE models (4 experts, top-2): in memory, every expert weight and linear
layer magnitude-pruned 2:4 (`prune_2_4`); on disk, `spp prune --method wanda --pattern 2:4` outputs
(per-expert tensors, the mask file keyed by those saved names). Bit-exact comparisons use one experts
kernel throughout (`eager`, or transformers' default on both sides): `eager` and `grouped_mm` sum in
different orders and differ by ~1e-7.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import MOE_CONFIGS, make_moe_model, one_line_error
from spp.adapter.config import AdapterConfig
from spp.adapter.layer import spp_delta
from spp.adapter.model import add_adapter, adapter_state_dict, load_adapter, merge_adapter, save_adapter
from spp.adapter.weight import AdaptedWeight
from spp.errors import SppError
from spp.io.checkpoint import ADAPTER_WEIGHTS_FILE
from spp.io.reader import read_checkpoint
from spp.sparsity import pruned_is_positive_zero
from spp.train import check_pruned_zeros

KINDS = ["spp", "masked_lora", "full"]
EAGER = "eager"


def prune_2_4(model) -> dict[str, torch.Tensor]:
    """Magnitude 2:4 along the input axis of every linear layer and expert weight in the decoder blocks (in place).

    Returns:
        keep-masks by parameter name (a fused expert weight's own name, (E, out, in)).
    """
    from spp.models import decoder_targets
    from spp.prune.masks import apply_mask, nm_mask

    masks = {}
    with torch.no_grad():
        for target in (target for targets in decoder_targets(model) for target in targets.values()):
            W = target.out_in()  # (out, in) or (E, out, in)
            keep = nm_mask(W.abs().reshape(-1, W.shape[-1]), 2, 4).reshape(W.shape)
            W.copy_(apply_mask(W, keep))
            masks[target.param] = keep
    return masks


@pytest.fixture(scope="module")
def tokenizer(shared_data):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared_data / "stories260K-hf")


def _pruned_dir(arch, tokenizer, text_file, tmp_path_factory, **prune) -> Path:
    """`spp prune --method wanda --pattern 2:4` of a seeded random MoE model (vocab 512, the stories260K tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from spp.config import PruneConfig
    from spp.io.checkpoint import save_model
    from spp.prune import run_prune

    kwargs = dict(MOE_CONFIGS[arch], vocab_size=512, bos_token_id=1, eos_token_id=2, max_position_embeddings=256)
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp(arch)
    save_model(AutoModelForCausalLM.from_config(config, dtype=torch.float32), tokenizer, directory / "dense")
    run_prune(PruneConfig(model=str(directory / "dense"), output=str(directory / "pruned"), method="wanda",
                          pattern="2:4", calib=str(text_file), nsamples=4, seqlen=32, device="cpu", **prune))
    return directory / "pruned"


@pytest.fixture(scope="module")
def pruned_mixtral(tokenizer, text_file, tmp_path_factory) -> Path:
    return _pruned_dir("mixtral", tokenizer, text_file, tmp_path_factory)


@pytest.fixture(scope="module")
def pruned_qwen3_moe(tokenizer, text_file, tmp_path_factory) -> Path:
    # small shards: one expert's pieces land in different shards, and merge writes each where it is
    return _pruned_dir("qwen3_moe", tokenizer, text_file, tmp_path_factory, max_shard_size="100KB")


def adapter_cfg(kind: str, **extra) -> AdapterConfig:
    return AdapterConfig(kind=kind, **{"spp_row_groups": 4, "rank": 4, **extra})


def train_steps(model, vocab: int, steps: int = 3, lr: float = 0.1) -> None:
    """A few AdamW steps (large lr, weight decay) on random tokens: moves β, B and the masters far from init."""
    torch.manual_seed(1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.1)
    for _ in range(steps):
        ids = torch.randint(0, vocab, (2, 12))
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


# --------------------------------------------------------------------------- the layer


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("kind", KINDS)
def test_adapted_experts_start_at_the_base_keep_zeros_and_merge_in_memory(arch, kind):
    model = make_moe_model(arch, experts_implementation=EAGER)
    masks = prune_2_4(model)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    base = logits(model, ids)
    adapted = add_adapter(model, adapter_cfg(kind), masks)
    assert [n for n in adapted if ".experts." in n] == [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1)
                                                        for p in ("gate_up_proj", "down_proj")]
    assert not any(n.endswith("mlp.gate") for n in adapted)  # the router is not adapted
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, AdaptedWeight) and experts.params == ["gate_up_proj", "down_proj"]
    E, H, I = 4, MOE_CONFIGS[arch]["hidden_size"], 48
    expected = {"spp": {"spp_alpha": (E, 4, H), "spp_beta": (E, 2 * I)},
                "masked_lora": {"lora_A": (E, 4, H), "lora_B": (E, 2 * I, 4)},
                "full": {"full_weight": (E, 2 * I, H)}}[kind]
    state = adapter_state_dict(model)
    prefix = "model.layers.0.mlp.experts.gate_up_proj."
    assert {k[len(prefix):]: tuple(v.shape) for k, v in state.items() if k.startswith(prefix)} == expected
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [t.data_ptr() for t in state.values()] == [p.data_ptr() for p in trainable]  # the optimizer's order
    assert torch.equal(logits(model, ids), base)  # at init the adapted model is the base, bitwise

    train_steps(model, 128)
    check_pruned_zeros(model, masks)  # base and W_eff +0.0 bitwise at every pruned entry
    for name in ("model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"):
        module, _, p = name.rpartition(".")
        layer = model.get_submodule(module)
        W_eff = layer.effective_weight(getattr(layer.base_layer, p).detach(), masks[name], layer.tensors(p))
        assert pruned_is_positive_zero(W_eff, masks[name]).all() and (W_eff[masks[name]] == 0).float().mean() < 0.01
    trained = logits(model, ids)
    assert (trained - base).abs().max() > 1e-3
    merge_adapter(model, masks)
    assert not any(isinstance(m, AdaptedWeight) for m in model.modules())
    assert torch.equal(logits(model, ids), trained)  # the in-memory merge is the adapter model, bitwise
    for name, keep in masks.items():
        assert pruned_is_positive_zero(model.get_parameter(name), keep).all()


def test_every_experts_kernel_runs_the_adapter():
    """grouped_mm (transformers' default), batched_mm and eager give the same adapted model up to summation order."""
    outputs = {}
    for kernel in ("grouped_mm", "batched_mm", EAGER):
        model = make_moe_model("mixtral", experts_implementation=kernel)
        masks = prune_2_4(model)
        torch.manual_seed(0)
        add_adapter(model, adapter_cfg("spp"), masks)
        train_steps(model, 128, steps=2)
        outputs[kernel] = logits(model, torch.arange(12)[None])
    for kernel in ("grouped_mm", "batched_mm"):
        torch.testing.assert_close(outputs[kernel], outputs[EAGER], rtol=1e-5, atol=1e-5)


def test_only_the_targeted_fused_weight_is_adapted():
    model = make_moe_model("mixtral", experts_implementation=EAGER)
    masks = prune_2_4(model)
    gate_up = model.get_parameter("model.layers.0.mlp.experts.gate_up_proj").detach().clone()
    adapted = add_adapter(model, adapter_cfg("masked_lora", target_modules=["mlp.experts.down_proj"]), masks)
    assert adapted == ["model.layers.0.mlp.experts.down_proj", "model.layers.1.mlp.experts.down_proj"]
    assert model.model.layers[0].mlp.experts.params == ["down_proj"]
    assert sorted(adapter_state_dict(model)) == [f"model.layers.{i}.mlp.experts.down_proj.{t}"
                                                 for i in (0, 1) for t in ("lora_A", "lora_B")]
    train_steps(model, 128)
    trained = logits(model, torch.arange(12)[None])
    merge_adapter(model, masks)
    assert torch.equal(model.get_parameter("model.layers.0.mlp.experts.gate_up_proj"), gate_up)
    assert torch.equal(logits(model, torch.arange(12)[None]), trained)


def _reference_weight(kind, W, keep, tensors, scale):
    """W_eff of one expert by the naive formula, differentiable by autograd (float64)."""
    if kind == "spp":
        return W + spp_delta(W, tensors["spp_alpha"], tensors["spp_beta"], scale)
    if kind == "masked_lora":
        return W + keep * (scale * tensors["lora_B"] @ tensors["lora_A"])
    return keep * tensors["full_weight"]


@pytest.mark.parametrize("kind", KINDS)
def test_batched_function_gradients_equal_a_per_expert_reference(kind):
    """float64: the adapted experts' output and the gradients of every adapter tensor equal autograd through
    W_eff[e] built expert by expert from the naive formula (`spp_delta`, B·A, M ⊙ W)."""
    model = make_moe_model("mixtral", experts_implementation=EAGER)
    masks = prune_2_4(model)
    experts = model.model.layers[0].mlp.experts.double()
    keeps = {p: masks[f"model.layers.0.mlp.experts.{p}"] for p in ("gate_up_proj", "down_proj")}
    cfg = adapter_cfg(kind, spp_row_groups=5)  # 5 groups: 96 and 64 rows are not divisible by 5
    torch.manual_seed(0)
    adapted = AdaptedWeight(experts, cfg, keeps, ["gate_up_proj", "down_proj"])
    with torch.no_grad():  # away from init, so every term of every gradient is non-zero
        for p in adapted.params:
            for t in adapted.tensors(p).values():
                t.add_(torch.randn_like(t) * 0.1)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(10, 64, dtype=torch.float64, generator=gen)
    top_k = torch.randint(0, 4, (10, 2), generator=gen)
    top_w = torch.rand(10, 2, dtype=torch.float64, generator=gen)
    probe = torch.randn(10, 64, dtype=torch.float64, generator=gen)
    (adapted(x, top_k, top_w) * probe).sum().backward()

    reference, leaves = {}, {}
    for p in adapted.params:
        leaves[p] = {t: v.detach().clone().requires_grad_(True) for t, v in adapted.tensors(p).items()}
        W = getattr(experts, p).detach()
        reference[p] = torch.stack([_reference_weight(kind, W[e], keeps[p][e].double(),
                                                      {t: v[e] for t, v in leaves[p].items()}, cfg.scale)
                                    for e in range(W.shape[0])])
    y = torch.func.functional_call(experts, reference, (x, top_k, top_w))
    (y * probe).sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(adapted(x, top_k, top_w), y, rtol=1e-12, atol=1e-12)
    for p in adapted.params:
        for t, v in adapted.tensors(p).items():
            assert v.grad is not None and v.grad.abs().max() > 0
            torch.testing.assert_close(v.grad, leaves[p][t].grad, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- spp train


def _train_cfg(base, data, output, **overrides):
    from spp.config import TrainConfig, merge_into

    settings = dict(base_model=str(base), data_path=str(data), output_dir=str(output), cutoff_len=32,
                    micro_batch_size=2, batch_size=4, max_steps=12, save_steps=2, logging_steps=1, eval_steps=6,
                    val_set_size=4, learning_rate=0.3, warmup_ratio=0.0, spp_row_groups=4)
    return merge_into(TrainConfig, [("test", {**settings, **overrides})])


def test_spp_train_lowers_the_validation_loss_and_resumes_bit_for_bit(pruned_mixtral, text_file, tmp_path,
                                                                         monkeypatch):
    import json

    from spp.errors import SppInterrupted
    from spp.train import run_train

    report = run_train(_train_cfg(pruned_mixtral, text_file, tmp_path / "straight"))
    log = [json.loads(line) for line in (tmp_path / "straight" / "train_log.jsonl").read_text().splitlines()]
    first = next(r["val_loss"] for r in log if r["step"] == 0)
    assert report.val_loss < first - 0.03, (first, report.val_loss)  # 6.237 -> 6.155 when written
    straight = load_file(str(tmp_path / "straight" / ADAPTER_WEIGHTS_FILE))
    assert "model.layers.0.mlp.experts.gate_up_proj.spp_alpha" in straight
    assert report.trainable_params == sum(t.numel() for t in straight.values())

    monkeypatch.setenv("SPP_FAULT", "train_sigint:2")
    with pytest.raises(SppInterrupted):
        run_train(_train_cfg(pruned_mixtral, text_file, tmp_path / "resumed"))
    monkeypatch.delenv("SPP_FAULT")
    resumed_report = run_train(_train_cfg(pruned_mixtral, text_file, tmp_path / "resumed", resume=True))
    assert resumed_report.resumed_from == 2
    resumed = load_file(str(tmp_path / "resumed" / ADAPTER_WEIGHTS_FILE))
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_activation_checkpointing_gives_the_same_adapter(pruned_mixtral, text_file, tmp_path):
    """Recomputing a block in backward rebuilds W_eff through the same Function: the same adapter, bitwise."""
    from spp.train import run_train

    for out, checkpointing in (("a", False), ("b", True)):
        run_train(_train_cfg(pruned_mixtral, text_file, tmp_path / out, max_steps=2, val_set_size=0,
                             gradient_checkpointing=checkpointing))
    a, b = (load_file(str(tmp_path / out / ADAPTER_WEIGHTS_FILE)) for out in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ddp_two_processes_match_one(pruned_mixtral, text_file, tmp_path):
    """DDP needs nothing MoE-specific: every expert's adapter tensors get a gradient (zero for an expert no token
    reached), so no parameter is unused. Two CPU processes under `accelerate launch` match one process."""
    import sys

    from spp.train import run_train
    from test_train import SPP_MAIN, cli_args, log_records, spp_command

    settings = dict(max_steps=3, batch_size=8, micro_batch_size=2, learning_rate=2e-2)
    run_train(_train_cfg(pruned_mixtral, text_file, tmp_path / "single", **settings))
    script = tmp_path / "spp_main.py"
    script.write_text(SPP_MAIN + "\n")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script)]
    cfg = _train_cfg(pruned_mixtral, text_file, tmp_path / "ddp", **settings)
    result = spp_command(*cli_args(cfg), "--set", f"spp_row_groups={cfg.spp_row_groups}",
                         env={"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}, launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    for one, two in zip(log_records(tmp_path / "single")[1:], log_records(tmp_path / "ddp")[1:]):
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    single = load_file(str(tmp_path / "single" / ADAPTER_WEIGHTS_FILE))
    ddp = load_file(str(tmp_path / "ddp" / ADAPTER_WEIGHTS_FILE))
    assert single.keys() == ddp.keys()
    assert max(float((single[k] - ddp[k]).abs().max()) for k in single) <= 1e-5  # gradient all-reduce sums in another order


# --------------------------------------------------------------------------- spp merge, verify, eval


def _adapter_dir(pruned: Path, kind: str, directory: Path):
    """An adapter trained in memory on `pruned` (eager kernel), saved as `spp train` saves it; returns the model."""
    from transformers import AutoModelForCausalLM

    ckpt = read_checkpoint(pruned)
    model = AutoModelForCausalLM.from_pretrained(pruned, experts_implementation=EAGER).eval()
    cfg = adapter_cfg(kind, base_model=str(pruned), mask_sha256=ckpt.mask_sha256)
    torch.manual_seed(0)
    add_adapter(model, cfg, ckpt.masks_by_parameter())
    train_steps(model, 512)
    save_adapter(model, cfg, directory)
    return model


@pytest.mark.parametrize("arch,kind", [("mixtral", "spp"), ("mixtral", "masked_lora"), ("mixtral", "full"),
                                       ("qwen3_moe", "spp")])
def test_merge_keeps_every_pruned_zero_verifies_and_reloads_as_the_adapter_model(
        arch, kind, pruned_mixtral, pruned_qwen3_moe, tmp_path):
    from transformers import AutoModelForCausalLM

    from spp.cli import app
    from spp.config import MergeConfig
    from spp.merge import run_merge

    pruned = {"mixtral": pruned_mixtral, "qwen3_moe": pruned_qwen3_moe}[arch]
    adapter_model = _adapter_dir(pruned, kind, tmp_path / "adapter")
    report = run_merge(MergeConfig(model=str(pruned), adapter=str(tmp_path / "adapter"), output=str(tmp_path / "merged")))
    assert report.n_modules == 2 * (4 + 2)  # per block: q, k, v, o and the two fused expert weights (no router)
    assert (report.n_shards > 1) == (arch == "qwen3_moe")  # the Qwen3-MoE base is saved in small shards
    result = CliRunner().invoke(app, ["verify", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output

    masks, _ = read_checkpoint(pruned).read_masks()  # keyed by the saved per-expert names
    saved = {}
    for shard in sorted((tmp_path / "merged").glob("*.safetensors")):
        saved.update(load_file(str(shard)))
    experts = [k for k in masks if ".experts." in k]
    assert len(experts) == 2 * 4 * 3  # blocks × experts × (gate, up, down)
    for name, keep in masks.items():
        assert pruned_is_positive_zero(saved[name], keep).all(), name

    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(2))
    expected = logits(adapter_model, ids)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", experts_implementation=EAGER).eval()
    assert torch.equal(logits(reloaded, ids), expected)  # same weights bitwise, same kernel: same logits
    base = AutoModelForCausalLM.from_pretrained(pruned, experts_implementation=EAGER).eval()
    assert (logits(base, ids) - expected).abs().max() > 1e-3
    merge_adapter(adapter_model, read_checkpoint(pruned).masks_by_parameter())
    for name, param in adapter_model.named_parameters():  # streaming merge == in-memory merge, tensor by tensor
        assert torch.equal(param, reloaded.get_parameter(name)), name


def test_eval_with_the_adapter_equals_eval_of_the_merged_model(pruned_mixtral, text_file, tmp_path):
    from spp.config import EvalConfig, MergeConfig
    from spp.eval import run_eval
    from spp.merge import run_merge

    _adapter_dir(pruned_mixtral, "spp", tmp_path / "adapter")
    run_merge(MergeConfig(model=str(pruned_mixtral), adapter=str(tmp_path / "adapter"), output=str(tmp_path / "merged")))
    ppl = {}
    for name, model, extra in (("unmerged", pruned_mixtral, {"adapter": str(tmp_path / "adapter")}),
                               ("merged", tmp_path / "merged", {}), ("pruned", pruned_mixtral, {})):
        results = run_eval(EvalConfig(model=str(model), ppl=[str(text_file)], seqlen=32, max_windows=4,
                                      device="cpu", dtype="float32", **extra)).results
        (ppl[name],) = (entry["ppl"] for entry in results["perplexity"].values())
    assert ppl["unmerged"] == ppl["merged"] != ppl["pruned"]  # both run transformers' default kernel on equal weights


# --------------------------------------------------------------------------- bad inputs


def test_an_adapter_that_does_not_fit_the_experts_is_one_error_line(pruned_mixtral, tmp_path):
    from transformers import AutoModelForCausalLM

    from spp.cli import app

    _adapter_dir(pruned_mixtral, "spp", tmp_path / "adapter")
    path = tmp_path / "adapter" / ADAPTER_WEIGHTS_FILE
    weights = load_file(str(path))
    key = "model.layers.1.mlp.experts.gate_up_proj.spp_alpha"
    weights[key] = weights[key][:3].contiguous()  # three experts' α for a four-expert base
    save_file(weights, str(path), metadata={"format": "spp-adapter"})
    result = CliRunner().invoke(app, ["merge", "--model", str(pruned_mixtral), "--adapter", str(tmp_path / "adapter"),
                                      "--output", str(tmp_path / "merged")])
    one_line_error(result, "model.layers.1.mlp.experts.gate_up_proj", "spp_alpha (3, 4, 64)", "(4, 4, 64)")
    assert not (tmp_path / "merged").exists()
    model = AutoModelForCausalLM.from_pretrained(pruned_mixtral).eval()
    with pytest.raises(SppError, match=r"gate_up_proj.spp_alpha has shape \(3, 4, 64\), the model needs \(4, 4, 64\)"):
        load_adapter(model, tmp_path / "adapter", read_checkpoint(pruned_mixtral).masks_by_parameter())

    model = make_moe_model("mixtral")
    masks = prune_2_4(model)
    with torch.no_grad():  # expert 3 of block 1: one pruned entry that is not +0.0 in the base
        expert = model.get_parameter("model.layers.1.mlp.experts.down_proj")[3]
        row, col = (~masks["model.layers.1.mlp.experts.down_proj"][3]).nonzero()[0].tolist()
        expert[row, col] = -0.0
    with pytest.raises(SppError, match=r"^model.layers.1.mlp.experts.down_proj: 1 entries the mask marks pruned are "
                                       r"not \+0.0 in the base weight"):
        add_adapter(model, adapter_cfg("spp"), masks)
    assert not any(isinstance(m, AdaptedWeight) for m in model.modules())

    with pytest.raises(SppError, match=r"model.layers.0.mlp.experts.gate_up_proj \(expert 0\) has 96 output rows, "
                                       r"fewer than spp_row_groups=100"):
        add_adapter(model, adapter_cfg("spp", spp_row_groups=100, target_modules=["mlp.experts.*"]))
    assert not any(isinstance(m, AdaptedWeight) for m in model.modules())  # nothing changed
