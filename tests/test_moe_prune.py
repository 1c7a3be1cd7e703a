"""Pruning mixture-of-experts models: every saved expert tensor pruned from the tokens routed to its expert.

The references here capture the routing independently of `spp.prune.experts` (a forward hook on the router,
whose output names each token's experts) and prune each saved per-expert tensor (Mixtral's w1/w3/w2) as a
separate matrix with the plain method functions, so a mask computed over the fused gate/up rows, or from
tokens the expert never saw, fails them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import MOE_CONFIGS, make_moe_model, one_line_error
from spp.cli import app
from spp.config import PruneConfig
from spp.errors import SppError
from spp.io.checkpoint import MANIFEST_FILE, MASK_FILE, PRUNE_PROGRESS_DIR, PRUNE_PROGRESS_FILE, partial_path
from spp.io.maskfile import load_masks
from spp.io.reader import read_checkpoint
from spp.prune import METHODS, run_prune
from spp.prune.alps import alps_prune
from spp.prune.experts import expert_down_inputs, prune_expert_weights, routed_inputs
from spp.prune.masks import is_nm_valid, parse_pattern, select_mask
from spp.prune.sparsegpt import accumulate_hessian, hessian_from_sum, sparsegpt_prune
from spp.prune.wanda import magnitude_scores
from spp.verify import verify_checkpoint
from test_prune import char_tokenizer, write_text

NSAMPLES, SEQLEN = 4, 32


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    return write_text(tmp_path_factory.mktemp("calib") / "calib.txt")


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    """Factory: a saved tiny random MoE model of one family (with a character tokenizer), made once per module."""
    made: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in made:
            directory = tmp_path_factory.mktemp(arch) / "model"
            make_moe_model(arch).save_pretrained(directory)
            char_tokenizer().save_pretrained(directory)
            made[arch] = directory
        return made[arch]

    return make


def prune_cfg(model: Path, out: Path, calib: Path, **settings) -> PruneConfig:
    return PruneConfig(model=str(model), output=str(out), calib=str(calib), nsamples=NSAMPLES, seqlen=SEQLEN,
                       device="cpu", blocksize=16, **settings)


def saved(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in read_checkpoint(directory).shards:
        out.update(load_file(str(shard)))
    return out


def details(directory: Path) -> dict:
    return json.loads((directory / MANIFEST_FILE).read_text())["details"]


def expert_pieces(directory: Path) -> dict[str, tuple[str, int, str]]:
    """Saved tensor -> (block-relative fused parameter, expert, 'gate'/'up'/'down'), from the reader's mapping."""
    ckpt = read_checkpoint(directory)
    out = {}
    for param, pieces in ckpt.pieces.items():
        for p in pieces:
            role = "down" if param.endswith("down_proj") else ("gate" if p.rows[0] == 0 else "up")
            out[p.saved] = (param, p.expert, role)
    return out


# --------------------------------------------------------------------------- an independent reference


def routed_by_router(model_dir: Path, pruned_dir: Path, calib: Path, block: int):
    """(X (T, H), top_k_index (T, k)) that reach block `block`'s experts in the sequential pipeline: blocks before
    it pruned (from `pruned_dir`), it and the later ones dense (from `model_dir`). Taken from a forward hook on the
    router (its input and its chosen experts), not from the experts module."""
    from transformers import AutoModelForCausalLM

    from spp.data import calibration_windows
    from spp.models import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(pruned_dir).eval()
    dense = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    for i in range(block, len(model.model.layers)):
        model.model.layers[i].load_state_dict(dense.model.layers[i].state_dict())
    windows = calibration_windows(load_tokenizer(str(model_dir)), str(calib), NSAMPLES, SEQLEN, 0)
    seen = {}
    router = model.model.layers[block].mlp.gate

    def hook(module, args, output):
        seen["X"] = args[0].reshape(-1, args[0].shape[-1]).detach()
        seen["index"] = output[2].detach()

    handle = router.register_forward_hook(hook)
    with torch.no_grad():
        model(windows, use_cache=False)
    handle.remove()
    return seen["X"], seen["index"]


def reference_expert_masks(model_dir: Path, pruned_dir: Path, calib: Path, method: str, pattern: str,
                           sparsity: float = 0.5) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Saved expert tensor -> (keep-mask, pruned weight), each pruned alone as a separate linear would be:
    Wanda (|W|·‖X_j‖, per row or per group), RIA and magnitude (one threshold per matrix) or SparseGPT, with X the tokens
    routed to its expert and, for the down matrix, act(X·w1ᵀ) ⊙ (X·w3ᵀ) from the dense saved tensors."""
    original, pieces = saved(model_dir), expert_pieces(model_dir)
    n_m = parse_pattern(pattern)
    out = {}
    for block in range(json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]):
        X, index = routed_by_router(model_dir, pruned_dir, calib, block)
        mine = {s: v for s, v in pieces.items() if v[0].startswith(f"model.layers.{block}.")}
        for name, (param, expert, role) in mine.items():
            X_e = torch.stack([X[t] for t in range(X.shape[0]) if expert in index[t].tolist()])
            if role == "down":
                w = {r: original[s] for s, (p, e, r) in mine.items() if e == expert and r != "down"}
                X_e = F.silu(X_e @ w["gate"].t()) * (X_e @ w["up"].t())
            W = original[name]
            if method == "wanda":
                score = W.abs() * (X_e ** 2).sum(0).sqrt()
                keep = _keep_highest(score, n_m, sparsity, per_row=True)
                out[name] = (keep, torch.where(keep, W, torch.zeros(())))
            elif method == "ria":  # (|W|/Σ_row|W| + |W|/Σ_col|W|) · ‖X_j‖^½, one threshold per matrix
                score = (W.abs() / W.abs().sum(1, keepdim=True) + W.abs() / W.abs().sum(0, keepdim=True))
                keep = _keep_highest(score * (X_e ** 2).sum(0).sqrt() ** 0.5, n_m, sparsity, per_row=False)
                out[name] = (keep, torch.where(keep, W, torch.zeros(())))
            elif method == "magnitude":
                keep = _keep_highest(W.abs(), n_m, sparsity, per_row=False)
                out[name] = (keep, torch.where(keep, W, torch.zeros(())))
            elif method == "alps":  # the shipped settings (PruneConfig's alps_* defaults)
                H = hessian_from_sum(*accumulate_hessian(None, X_e))
                W_new, keep, _ = alps_prune(W, H, n_m, sparsity, max_iter=15)
                out[name] = (keep, W_new)
            else:
                H = hessian_from_sum(*accumulate_hessian(None, X_e))
                W_new, keep, _ = sparsegpt_prune(W, H, n_m, sparsity, blocksize=16)
                out[name] = (keep, W_new)
    return out


def _keep_highest(score: torch.Tensor, n_m, sparsity: float, per_row: bool) -> torch.Tensor:
    """Written out with a stable sort: the lowest scores pruned, lower index first on ties."""
    if n_m is not None:
        n, m = n_m
        groups = score.reshape(score.shape[0], -1, m)
        order = groups.argsort(dim=-1, stable=True)
        keep = torch.ones_like(groups, dtype=torch.bool).scatter(-1, order[..., : m - n], False)
        return keep.reshape(score.shape)
    rows = score if per_row else score.reshape(1, -1)
    k = int(rows.shape[1] * sparsity + 1e-9)
    keep = torch.ones_like(rows, dtype=torch.bool).scatter(-1, rows.argsort(dim=-1, stable=True)[:, :k], False)
    return keep.reshape(score.shape)


@pytest.fixture
def mixtral(moe_dir) -> Path:
    return moe_dir("mixtral")


# --------------------------------------------------------------------------- pure functions


def test_routed_inputs_and_down_inputs_equal_a_per_token_loop():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 8, generator=g)
    index = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(10)])  # (T, k): distinct per token
    gate_up = torch.randn(6, 8, generator=g)  # (2I, H), I = 3
    for expert in range(4):
        rows = [t for t in range(10) if expert in index[t].tolist()]
        X = routed_inputs(hidden, index, expert)
        assert torch.equal(X, hidden[rows])
        expected = torch.stack([F.silu(gate_up[:3] @ hidden[t]) * (gate_up[3:] @ hidden[t]) for t in rows])
        down = expert_down_inputs(X, gate_up, lambda gu: F.silu(gu[:, :3]) * gu[:, 3:])
        torch.testing.assert_close(down, expected)
    assert routed_inputs(hidden, index, 7).shape == (0, 8)  # an expert nobody chose: no rows


def test_an_expert_without_tokens_is_pruned_by_magnitude_and_says_so():
    """Hand-made routes that never choose expert 3: its pieces get magnitude masks, tokens 0, method magnitude."""
    from spp.models import block_targets
    from spp.prune.experts import expert_targets
    from spp.io.reader import Piece

    model = make_moe_model("mixtral")
    block = model.model.layers[0]
    weights = expert_targets(block_targets(block))
    I = MOE_CONFIGS["mixtral"]["intermediate_size"]
    pieces = {"mlp.experts.gate_up_proj": [Piece(f"w{e}.{r}", e, rows) for e in range(4)
                                            for r, rows in ((1, (0, I)), (3, (I, 2 * I)))],
              "mlp.experts.down_proj": [Piece(f"w{e}.2", e, (0, 64)) for e in range(4)]}
    g = torch.Generator().manual_seed(0)
    index = torch.stack([torch.randperm(3, generator=g)[:2] for _ in range(100)])  # experts 0..2 only
    routes = {"mlp.experts": [(torch.randn(100, 64, generator=g), index)]}
    original = {n: w.weight.detach().clone() for n, w in weights.items()}
    cfg = PruneConfig(model="m", output="o", method="wanda", pattern="unstructured", sparsity=0.5)
    done = prune_expert_weights(weights, routes, METHODS["wanda"], METHODS["magnitude"], cfg,
                                {n: 0.5 for n in weights}, pieces, torch.device("cpu"))
    for name, pruned in done.items():
        records = {(p["expert"], tuple(p["rows"])): p for p in pruned.stats["pieces"]}
        for piece in pieces[name]:
            record = records[(piece.expert, piece.rows)]
            W0 = original[name][piece.expert, piece.rows[0]:piece.rows[1]]
            keep = pruned.keep[piece.expert, piece.rows[0]:piece.rows[1]]
            if piece.expert == 3:
                assert (record["tokens"], record["method"]) == (0, "magnitude")
                assert torch.equal(keep, select_mask(magnitude_scores(W0), None, 0.5, per_row=False))
            else:
                assert record["tokens"] == int((index == piece.expert).any(-1).sum()) and record["method"] == "wanda"
                assert (~keep).sum(1).tolist() == [W0.shape[1] // 2] * W0.shape[0]  # Wanda: per row


def test_expert_weights_without_a_saved_mapping_or_with_owl_are_refused():
    from spp.prune.plan import plan_layers
    from spp.prune.experts import check_expert_weights

    model = make_moe_model("mixtral")
    plan = plan_layers(model, PruneConfig(model="m", output="o"))
    pieces = {full: [] for full in plan.sparsity if ".experts." in full}
    check_expert_weights(model, plan, pieces, owl=False)
    with pytest.raises(SppError, match=r"model\.layers\.0\.mlp\.experts\.gate_up_proj: cannot tell which saved"):
        check_expert_weights(model, plan, {}, owl=False)
    with pytest.raises(SppError, match="--owl does not support expert weights"):
        check_expert_weights(model, plan, pieces, owl=True)


# --------------------------------------------------------------------------- the bar


def test_mixtral_wanda_2_4_bar(mixtral, calib, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "cli"
    runner = CliRunner()
    args = ["prune", "--model", str(mixtral), "--method", "wanda", "--pattern", "2:4", "--calib", str(calib),
            "--nsamples", str(NSAMPLES), "--seqlen", str(SEQLEN), "--device", "cpu"]
    result = runner.invoke(app, [*args, "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["verify", str(out)]).exit_code == 0

    tensors, original, pieces = saved(out), saved(mixtral), expert_pieces(out)
    masks, layouts = load_masks(out / MASK_FILE)
    assert len(pieces) == 2 * 4 * 3 and all(".block_sparse_moe.experts." in s for s in pieces)
    for name in pieces:  # every saved expert tensor is 2:4 along its inputs, with its mask
        W = tensors[name]
        assert masks[name].shape == W.shape and layouts[name] == "linear"
        assert (masks[name].reshape(W.shape[0], -1, 4).sum(-1) == 2).all()
        assert is_nm_valid(W != 0, 2, 4) and torch.equal(W, torch.where(masks[name], original[name], torch.zeros(())))
    assert set(masks) == set(pieces) | {n for n in original if "self_attn" in n}
    for name in (n for n in original if n.endswith("block_sparse_moe.gate.weight")):
        assert name not in masks and torch.equal(tensors[name], original[name])  # the router stays dense
    record = details(out)
    assert all(record["modules"][s]["method"] == "wanda" and record["modules"][s]["tokens"] > 0 for s in pieces)
    assert record["expert_fallbacks"] == 0 and record["achieved_sparsity"] == 0.5
    assert sum(b["numel"] for b in record["blocks"].values()) == sum(original[n].numel() for n in masks)

    report = run_prune(prune_cfg(mixtral, tmp_path / "api", calib, method="wanda", pattern="2:4"))
    assert (tmp_path / "api" / MASK_FILE).read_bytes() == (out / MASK_FILE).read_bytes()  # the same run
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(2, 71, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # both use transformers' default expert kernel
        assert torch.equal(reloaded(ids).logits, report.model(ids).logits)


@pytest.mark.parametrize("method,pattern", [("wanda", "2:4"), ("sparsegpt", "unstructured"), ("sparsegpt", "2:4"),
                                            ("magnitude", "unstructured"), ("ria", "unstructured"),
                                            ("alps", "2:4")])
def test_expert_masks_equal_separate_linears(mixtral, calib, tmp_path, method, pattern):
    out = tmp_path / "out"
    run_prune(prune_cfg(mixtral, out, calib, method=method, pattern=pattern))
    reference = reference_expert_masks(mixtral, out, calib, method, pattern)
    masks, _ = load_masks(out / MASK_FILE)
    tensors = saved(out)
    assert reference.keys() <= masks.keys() and len(reference) == 24
    for name, (keep, W) in reference.items():
        assert torch.equal(masks[name], keep), name
        # ALPS's eigendecomposition, ADMM and PCG carry H's summation-order rounding (chunks vs one stack) further than
        # SparseGPT: up to 2e-4 on a few weights of experts with few tokens; the masks are equal
        tol = dict(rtol=1e-2, atol=1e-3) if method == "alps" else dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(tensors[name], W, **tol)
    if method == "magnitude":  # one threshold over w1 and w3 together would not give these masks
        original = saved(mixtral)
        w1, w3 = [n for n in sorted(reference) if ".layers.0." in n and (".experts.0.w1" in n or ".experts.0.w3" in n)]
        joint = select_mask(magnitude_scores(torch.cat([original[w1], original[w3]])), None, 0.5, per_row=False)
        assert not torch.equal(joint, torch.cat([reference[w1][0], reference[w3][0]]))


def test_starved_experts_fall_back_to_magnitude_on_record(mixtral, calib, tmp_path):
    X, index = routed_by_router(mixtral, mixtral, calib, 0)
    counts = [int((index == e).any(-1).sum()) for e in range(4)]
    threshold = min(counts) + 1  # the least-used expert of block 0 (and maybe some of block 1) falls back
    out = tmp_path / "out"
    report = run_prune(prune_cfg(mixtral, out, calib, method="wanda", pattern="unstructured",
                                 expert_min_tokens=threshold))
    original, masks, record = saved(mixtral), load_masks(out / MASK_FILE)[0], details(out)
    pieces = expert_pieces(out)
    fell_back = [s for s in pieces if record["modules"][s]["method"] == "magnitude"]
    for name, (param, expert, role) in pieces.items():
        entry = record["modules"][name]
        assert entry["method"] == ("magnitude" if entry["tokens"] < threshold else "wanda")
        if param.startswith("model.layers.0."):
            assert entry["tokens"] == counts[expert]
        if entry["method"] == "magnitude":
            assert torch.equal(masks[name], select_mask(magnitude_scores(original[name]), None, 0.5, per_row=False))
    assert 3 <= len(fell_back) == record["expert_fallbacks"] == report.expert_fallbacks
    result = CliRunner().invoke(app, ["prune", "--model", str(mixtral), "--output", str(tmp_path / "x"),
                                      "--expert-min-tokens", "0"])
    one_line_error(result, "--expert-min-tokens=0 is out of range")


def test_resume_after_an_interrupt_is_bitwise_the_straight_run(mixtral, calib, tmp_path):
    from spp.errors import SppInterrupted

    def ctrl_c_at_block_1(index, n_blocks, name):
        if index == 1:
            raise KeyboardInterrupt

    settings = dict(method="sparsegpt", pattern="2:4", batch_size=3)  # two chunks of windows
    with pytest.raises(SppInterrupted, match="--resume"):
        run_prune(prune_cfg(mixtral, tmp_path / "out", calib, **settings), on_module=ctrl_c_at_block_1)
    run_prune(prune_cfg(mixtral, tmp_path / "out", calib, resume=True, **settings))
    run_prune(prune_cfg(mixtral, tmp_path / "straight", calib, **settings))
    a, b = saved(tmp_path / "straight"), saved(tmp_path / "out")
    assert a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)
    assert (tmp_path / "straight" / MASK_FILE).read_bytes() == (tmp_path / "out" / MASK_FILE).read_bytes()
    assert details(tmp_path / "straight")["modules"] == details(tmp_path / "out")["modules"]


def test_killed_prune_resumes_bit_for_bit(mixtral, calib, tmp_path):
    """SIGKILL right after block 0 is persisted (`spp.faults`), then --resume: the same files as a straight run."""
    import signal

    from test_faults import spp_child

    args = ["prune", "--model", mixtral, "--calib", calib, "--method", "wanda", "--pattern", "unstructured",
            "--nsamples", NSAMPLES, "--seqlen", SEQLEN, "--device", "cpu"]
    killed = spp_child(*args, "--output", tmp_path / "out", env={"SPP_FAULT": "prune_block:0"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    progress = partial_path(tmp_path / "out") / PRUNE_PROGRESS_DIR / PRUNE_PROGRESS_FILE
    assert json.loads(progress.read_text())["blocks_done"] == 1  # block 0 (with its fused expert masks) kept
    assert CliRunner().invoke(app, [*map(str, args), "--output", str(tmp_path / "out"), "--resume"]).exit_code == 0
    run_prune(prune_cfg(mixtral, tmp_path / "straight", calib, method="wanda"))
    a, b = saved(tmp_path / "straight"), saved(tmp_path / "out")
    assert a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)
    assert (tmp_path / "straight" / MASK_FILE).read_bytes() == (tmp_path / "out" / MASK_FILE).read_bytes()


def test_targets_ignore_and_overrides_name_expert_weights(mixtral, calib, tmp_path):
    out = tmp_path / "out"
    report = run_prune(prune_cfg(mixtral, out, calib, method="wanda", ignore=["mlp.experts.down_proj"],
                                 sparsity_overrides={"mlp.experts.gate_up_proj": 0.75}))
    masks, record, pieces = load_masks(out / MASK_FILE)[0], details(out), expert_pieces(out)
    down = [s for s, v in pieces.items() if v[2] == "down"]
    assert not set(down) & set(masks) and set(down) <= set(record["dense_layers"])
    assert len(report.dense_layers) == 2
    for name in set(pieces) - set(down):
        assert record["modules"][name]["requested"] == 0.75
        assert (~masks[name]).sum(1).tolist() == [48] * masks[name].shape[0]  # floor(64 · 0.75) per row
    verify_checkpoint(out)
    result = CliRunner().invoke(app, ["prune", "--model", str(mixtral), "--output", str(tmp_path / "owl"), "--owl",
                                      "--calib", str(calib), "--nsamples", "2", "--seqlen", "16", "--device", "cpu"])
    one_line_error(result, "--owl does not support expert weights", "--ignore 'mlp.experts.*'")
    assert not (tmp_path / "owl").exists()


@pytest.mark.parametrize("arch", ["qwen3_moe", "olmoe"])
def test_other_families_prune_and_verify(arch, moe_dir, calib, tmp_path):
    from transformers import AutoModelForCausalLM

    model = moe_dir(arch)
    out = tmp_path / "out"
    report = run_prune(prune_cfg(model, out, calib, method="sparsegpt", pattern="2:4"))
    verify_checkpoint(out)
    tensors, original, masks, record = saved(out), saved(model), load_masks(out / MASK_FILE)[0], details(out)
    pieces = expert_pieces(out)
    assert len(pieces) == 24 and all(".mlp.experts." in s for s in pieces)
    for name in pieces:
        assert is_nm_valid(masks[name], 2, 4) and (masks[name].reshape(masks[name].shape[0], -1, 4).sum(-1) == 2).all()
        assert record["modules"][name]["method"] == "sparsegpt" and record["modules"][name]["tokens"] > 0
    routers = [n for n in original if n.endswith("mlp.gate.weight")]
    assert len(routers) == 2 and all(n not in masks and torch.equal(tensors[n], original[n]) for n in routers)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(2, 71, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, report.model(ids).logits)
