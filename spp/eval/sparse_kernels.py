"""`spp eval --sparse-kernels`: run a 2:4 model's linears on PyTorch's semi-structured sparse kernels.

Every linear with a 2:4 mask entry gets its weight replaced, once, by
`torch.sparse.to_sparse_semi_structured(W)` (cuSPARSELt: the kept half of W plus 2-bit
position metadata), so `F.linear` dispatches to the sparse matmul. Before the evaluation the
logits of a probe batch are compared with the dense model's, and prefill and decode speed of
both are measured in the same run (CUDA events, after warm-up).

Where it applies, in torch 2.13 (checked before the model is loaded, each refusal one line):
a CUDA GPU; `--dtype float16` or `bfloat16` (cuSPARSELt also takes int8 and fp8, which spp
does not produce); 2-D `nn.Linear` weights (not GPT-2's Conv1D, not fused 3-D experts) whose
dimensions are multiples of torch's minimum (16 × 16 for fp16/bf16, read from torch itself);
a mask in which every group of 4 consecutive inputs of each row keeps at most 2; no unmerged
`--adapter`. A mixture-of-experts model's fused expert weights stay dense here (the kernels take
2-D weights only); its attention and shared-expert linears are converted. Source: PyTorch's semi-structured sparsity docs (`torch.sparse.to_sparse_semi_structured`).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from spp.errors import SppError

SPARSE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
LOGIT_TOLERANCE = 2e-2  # max |sparse − dense| over max |dense| on the probe batch (fp16/bf16 rounding differs)


def nm_violations(keep: torch.Tensor, n: int = 2, m: int = 4) -> int:
    """Groups of `m` consecutive inputs (per output row of a bool (out, in) mask) that keep more than `n`.

    Raises:
        ValueError: `in` is not a multiple of `m`.
    """
    out_features, in_features = keep.shape
    if in_features % m:
        raise ValueError(f"input dimension {in_features} is not a multiple of {m}")
    return int((keep.view(out_features, in_features // m, m).sum(-1) > n).sum())


def min_shape(dtype: torch.dtype) -> tuple[int, int]:
    """torch's own minimum (and multiple) of the weight's rows and columns for cuSPARSELt in `dtype`."""
    from torch.sparse.semi_structured import SparseSemiStructuredTensorCUSPARSELT

    c = SparseSemiStructuredTensorCUSPARSELT._DTYPE_SHAPE_CONSTRAINTS[dtype]
    return c.sparse_min_rows, c.sparse_min_cols


def refusal(name: str, keep: torch.Tensor, layout: str, dtype: torch.dtype) -> str | None:
    """Why the masked weight `name` cannot run on the 2:4 kernels, or None when it can."""
    if layout != "linear" or keep.dim() != 2:
        return f"{name} is not a 2-D nn.Linear weight (layout {layout}, shape {tuple(keep.shape)})"
    rows, cols = min_shape(dtype)
    if keep.shape[0] % rows or keep.shape[1] % cols:
        return (f"{name} has shape {tuple(keep.shape)}; cuSPARSELt needs both dimensions to be multiples of "
                f"({rows}, {cols}) in {str(dtype)[6:]}")
    bad = nm_violations(keep)
    if bad:
        return f"{name} is not 2:4 sparse: {bad} groups of 4 inputs keep more than 2 (prune with --pattern 2:4)"
    return None


def check_sparse_kernels(checkpoint, dtype: str, adapter: str | None, device: torch.device) -> dict[str, torch.Tensor]:
    """Refuse, in one line, a model the 2:4 kernels cannot run; else its masks by parameter name.

    Raises:
        SppError: an adapter is given, the dtype is not fp16/bf16, there is no mask file, a masked weight cannot be
            converted (`refusal`), or there is no CUDA device (checked last, so every other problem shows first).
    """
    if adapter:
        raise SppError("--sparse-kernels runs a merged model: merge the adapter first (spp merge), then evaluate that")
    if dtype not in SPARSE_DTYPES:
        raise SppError(f"--sparse-kernels needs --dtype float16 or bfloat16 (not {dtype}): cuSPARSELt has no "
                       "float32 2:4 kernel")
    masks, layouts = checkpoint.read_masks()  # refuses a directory without a mask file
    masks = {saved: keep for saved, keep in masks.items() if checkpoint.piece_of(saved) is None}  # experts stay dense
    for saved in sorted(masks):
        reason = refusal(saved, masks[saved], layouts[saved], SPARSE_DTYPES[dtype])
        if reason:
            raise SppError(f"--sparse-kernels: {reason}")
    if device.type != "cuda":
        raise SppError(f"--sparse-kernels needs a CUDA GPU (cuSPARSELt 2:4 kernels); --device is {device}")
    return {checkpoint.parameter_name(saved): keep for saved, keep in masks.items()}


def to_semi_structured(model: nn.Module, names: list[str]) -> int:
    """Replace each named weight by its semi-structured form, in place; returns how many were converted."""
    from torch.sparse import to_sparse_semi_structured

    modules = dict(model.named_modules())
    for name in names:
        module = modules[name.removesuffix(".weight")]
        module.weight = nn.Parameter(to_sparse_semi_structured(module.weight.detach().contiguous()),
                                     requires_grad=False)
    return len(names)


def _cuda_seconds(fn, repeats: int) -> float:
    """Mean seconds of `fn()` over `repeats` calls after 3 warm-up calls, timed with CUDA events."""
    for _ in range(3):
        fn()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    begin.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / 1000 / repeats


@torch.inference_mode()
def speed(model: nn.Module, ids: torch.Tensor, decode_steps: int = 32) -> dict[str, float]:
    """Prefill tokens/s of `ids` (batch, seq) in one forward, and decode tokens/s of `decode_steps` single-token steps
    with the KV cache (one token per sequence per step)."""
    prefill = _cuda_seconds(lambda: model(ids, use_cache=False), repeats=5)

    def decode():
        out = model(ids, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(decode_steps):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

    total = _cuda_seconds(decode, repeats=2)
    decode_only = max(total - prefill, 1e-9)
    return {"prefill_tokens_per_s": ids.numel() / prefill, "decode_tokens_per_s": decode_steps * ids.shape[0] / decode_only}


def apply_sparse_kernels(model: nn.Module, masks: dict[str, torch.Tensor], vocab_size: int,
                         probe_tokens: int = 512) -> dict:
    """Measure the dense model, convert its 2:4 linears, check the logits agree, measure again.

    Raises:
        SppError: the sparse logits differ from the dense ones by more than `LOGIT_TOLERANCE` (relative).
    """
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab_size, (1, probe_tokens), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.inference_mode():
        dense_logits = model(ids).logits.float()
    dense_speed = speed(model, ids)
    start = time.perf_counter()
    converted = to_semi_structured(model, sorted(masks))
    convert_s = time.perf_counter() - start
    with torch.inference_mode():
        sparse_logits = model(ids).logits.float()
    difference = float((sparse_logits - dense_logits).abs().max() / dense_logits.abs().max().clamp_min(1e-12))
    if not difference <= LOGIT_TOLERANCE:
        raise SppError(f"--sparse-kernels: the 2:4 kernels' logits differ from the dense model's by {difference:.3g} "
                       f"(relative), above {LOGIT_TOLERANCE}; evaluate without --sparse-kernels")
    sparse_speed = speed(model, ids)
    return {"converted_linears": converted, "convert_s": convert_s, "logit_max_rel_difference": difference,
            "probe_tokens": probe_tokens, "dense": dense_speed, "sparse": sparse_speed,
            "prefill_speedup": sparse_speed["prefill_tokens_per_s"] / dense_speed["prefill_tokens_per_s"],
            "decode_speedup": sparse_speed["decode_tokens_per_s"] / dense_speed["decode_tokens_per_s"],
            "backend": "cusparselt", "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(device)}
