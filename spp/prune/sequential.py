"""Block-by-block pruning: capture every decoder block's call once, then prune one block at a time.

`capture_block_inputs` runs the model once over the calibration windows with every
decoder block replaced by a pass-through, recording the hidden states that reach block 0
and the positional and keyword arguments of *every* block call (attention masks can differ
per layer: Qwen2's `max_window_layers`, Gemma2's alternating sliding/full layers; GPT-2
passes some arguments positionally). Cache objects are dropped. `prune_blocks` then, for
each block: moves it to the device, runs the *unpruned* block with hooks on its linear
layers to collect statistics (and a pre-hook on each experts module recording the routed
tokens: `spp.prune.experts`), prunes every linear layer and expert weight, and runs the *pruned*
block to produce the next block's inputs, as SparseGPT and Wanda do. Forwards are batched over
windows. This module knows nothing about any pruning method: it takes an `accumulate`
function (statistics from layer inputs) and `prune_layer`/`prune_experts` functions (keep-masks).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from spp.models import find_expert_weights, find_linear_layers


class _StopForward(Exception):
    """Raised by the last block's pre-hook: everything after the blocks is not needed."""


@dataclass
class BlockInputs:
    """Calibration inputs of the current block and the recorded extra arguments of every block.

    Attributes:
        hidden: one (batch, seq, hidden) tensor per chunk of windows, inputs of the current block.
        calls: calls[i][c] = (positional args after the hidden states, keyword args) of block i, chunk c.
        hidden_as_kwarg: the model passes the hidden states as `hidden_states=` rather than positionally.
    """

    hidden: list[torch.Tensor]
    calls: list[list[tuple[tuple, dict]]]
    hidden_as_kwarg: bool = False
    storage: torch.device = field(default_factory=lambda: torch.device("cpu"))


def to_device(obj: Any, device: torch.device) -> Any:
    """Move every tensor inside nested tuples/lists/dicts to `device`; other values are kept."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def _drop_caches(obj: Any) -> Any:
    """Replace key/value cache objects by None (we never decode; a cache would only grow)."""
    from transformers import Cache

    if isinstance(obj, Cache):
        return None
    if isinstance(obj, tuple):
        return tuple(_drop_caches(o) for o in obj)
    if isinstance(obj, dict):
        return {k: (False if k == "use_cache" else _drop_caches(v)) for k, v in obj.items()}
    return obj


def _pass_through(*args, **kwargs):
    return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, windows: torch.Tensor, batch_size: int, storage: torch.device
) -> BlockInputs:
    """Record block 0's hidden states and every block's call arguments, for each chunk of windows.

    Blocks are swapped for a pass-through while the model runs (so this costs only the
    embeddings), and the last block's pre-hook stops the forward before the final norm and head.

    Args:
        model: the causal LM (its embeddings on any device).
        blocks: its decoder blocks, from `find_decoder_blocks`.
        windows: (nsamples, seqlen) token ids.
        batch_size: windows per forward.
        storage: where to keep activations and recorded arguments (cpu to offload).
    """
    inputs = BlockInputs(hidden=[], calls=[[] for _ in blocks], storage=torch.device(storage))

    def record(index):
        def hook(module, args, kwargs):
            if index == 0:
                inputs.hidden_as_kwarg = not args
                hidden = args[0] if args else kwargs["hidden_states"]
                inputs.hidden.append(hidden.detach().to(storage))
            rest = {k: v for k, v in kwargs.items() if args or k != "hidden_states"}
            inputs.calls[index].append(to_device(_drop_caches((tuple(args[1:]), rest)), storage))
            if index == len(blocks) - 1:
                raise _StopForward

        return hook

    handles = [b.register_forward_pre_hook(record(i), with_kwargs=True) for i, b in enumerate(blocks)]
    for block in blocks:
        block.forward = _pass_through  # instance attribute shadows the class's forward
    embed_device = model.get_input_embeddings().weight.device
    try:
        for chunk in windows.split(batch_size):
            try:
                model(input_ids=chunk.to(embed_device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for block in blocks:
            del block.forward
        for handle in handles:
            handle.remove()
    return inputs


@torch.no_grad()
def run_block(
    block: nn.Module, index: int, inputs: BlockInputs, device: torch.device, keep_outputs: bool = True
) -> list[torch.Tensor]:
    """Run block `index` on every chunk of `inputs.hidden`; returns its outputs (on `inputs.storage`), or
    an empty list when `keep_outputs` is False (a pass run only for its hooks)."""
    outputs = []
    for hidden, (args, kwargs) in zip(inputs.hidden, inputs.calls[index]):
        args, kwargs = to_device((args, kwargs), device)
        hidden = hidden.to(device)
        out = block(hidden_states=hidden, **kwargs) if inputs.hidden_as_kwarg else block(hidden, *args, **kwargs)
        if isinstance(out, tuple):  # transformers < 5 returned (hidden, ...)
            out = out[0]
        if keep_outputs:
            outputs.append(out.to(inputs.storage))
    return outputs


@contextlib.contextmanager
def _recording(layers: dict[str, nn.Module], accumulate) -> Iterator[dict[str, Any]]:
    """Forward hooks on `layers` that fold each call's input into `accumulate`; yields the statistics by name."""
    stats: dict[str, Any] = {}

    def hook(name):
        def fn(module, args, output):
            stats[name] = accumulate(stats.get(name), args[0].detach())

        return fn

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()


def _collect_statistics(block, index, inputs, layers, accumulate, device, experts_modules=None):
    """Run the unpruned block with a forward hook on each linear layer feeding `accumulate`, and a pre-hook on each
    of `experts_modules` recording its routed tokens (`spp.prune.experts.recording_routes`); returns
    (statistics by layer name, routes by experts module name)."""
    from spp.prune.experts import recording_routes

    with _recording(layers, accumulate) as stats, recording_routes(experts_modules or {}, inputs.storage) as routes:
        run_block(block, index, inputs, device, keep_outputs=False)
    return stats, routes


@torch.no_grad()
def dense_statistics(
    blocks: nn.ModuleList,
    inputs: BlockInputs,
    accumulate: Callable[[Any, torch.Tensor], Any],
    reduce: Callable[[int, dict[str, nn.Module], dict[str, Any]], Any],
    device: torch.device,
    chosen: Callable[[int, str], bool] | None = None,
) -> list[Any]:
    """One pass over the *unpruned* model: per block, statistics of its chosen layers, reduced to one value.

    Each block runs once, with the hooks of `_collect_statistics` on, and its outputs feed the
    next block (dense outputs: nothing is pruned yet). `inputs` is left as it was, so pruning can
    start from block 0's inputs afterwards. OWL's outlier shares come from here.

    Args:
        reduce: (block index, chosen layers by name, their statistics) -> the block's value.
        chosen: (block index, layer name) -> whether the layer takes part (default: all).

    Returns:
        One value per block.
    """
    hidden, values = inputs.hidden, []
    for index, block in enumerate(blocks):
        home = next(block.parameters()).device
        block.to(device)
        layers = {n: m for n, m in find_linear_layers(block).items() if chosen is None or chosen(index, n)}
        state = BlockInputs(hidden=hidden, calls=inputs.calls, hidden_as_kwarg=inputs.hidden_as_kwarg,
                            storage=inputs.storage)
        with _recording(layers, accumulate) as stats:
            hidden = run_block(block, index, state, device, keep_outputs=index + 1 < len(blocks))
        values.append(reduce(index, layers, stats))
        block.to(home)
    return values


def prune_blocks(
    blocks: nn.ModuleList,
    inputs: BlockInputs | None,
    accumulate: Callable[[Any, torch.Tensor], Any] | None,
    prune_layer: Callable[[int, str, nn.Module, Any], torch.Tensor],
    device: torch.device,
    on_module: Callable[[int, str], None] | None = None,
    on_block_done: Callable[[int, nn.Module, dict, BlockInputs | None], None] | None = None,
    start: int = 0,
    chosen: Callable[[int, str], bool] | None = None,
    prune_experts: Callable[[int, dict, dict | None], dict[str, torch.Tensor]] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Prune every linear layer of every block, in order, each block seeing the pruned blocks before it.

    Args:
        blocks: decoder blocks (on the CPU; each is moved to `device` while it is pruned).
        inputs: from `capture_block_inputs`, or None for methods without calibration (magnitude).
        accumulate: (state or None, X (..., in)) -> state, called for every input batch of a layer.
        prune_layer: (block index, layer name, layer, state) -> bool keep-mask (out, in); it
            updates the layer's weight in place.
        device: where each block runs.
        on_module: called with (block index, layer name) before each layer is pruned (progress).
        on_block_done: called with (block index, block, its masks, next block's inputs) after each
            block, the place to persist per-block state.
        start: the first block to prune (a resumed run: blocks before it are already pruned and
            `inputs.hidden` holds block `start`'s inputs); skipped blocks get an empty dict.
        chosen: (block index, layer name) -> whether the layer is pruned (default: all); the others
            are left as they are and get no statistics and no mask.
        prune_experts: (block index, chosen expert weights by name (`spp.models.ExpertWeight`), the routed
            tokens of each experts module or None) -> keep-mask (E, out, in) by name, for a mixture-of-experts
            block (`spp.prune.experts`); None leaves expert weights alone.

    Returns:
        One dict per block: layer name (relative to the block) -> keep-mask (out, in) ((E, out, in) for an
        expert weight), on the CPU.
    """
    masks = []
    for index, block in enumerate(blocks):
        if index < start:
            masks.append({})
            if inputs is not None:
                inputs.calls[index] = []
            continue
        home = next(block.parameters()).device
        block.to(device)
        layers = {n: m for n, m in find_linear_layers(block).items() if chosen is None or chosen(index, n)}
        experts = {n: w for n, w in find_expert_weights(block).items()
                   if prune_experts is not None and (chosen is None or chosen(index, n))}
        stats, routes = {}, None
        if inputs is not None and accumulate is not None:
            modules = {n.rsplit(".", 1)[0]: w.experts for n, w in experts.items()}
            stats, routes = _collect_statistics(block, index, inputs, layers, accumulate, device, modules)
        block_masks = {}
        for name, layer in layers.items():
            if on_module is not None:
                on_module(index, name)
            block_masks[name] = prune_layer(index, name, layer, stats.pop(name, None)).cpu()
        del stats
        if experts:
            block_masks.update(prune_experts(index, experts, routes))
        del routes
        if inputs is not None and index + 1 < len(blocks):
            inputs.hidden = run_block(block, index, inputs, device)  # pruned outputs feed the next block
        if inputs is not None:
            inputs.calls[index] = []  # this block's recorded arguments are no longer needed
        block.to(home)
        masks.append(block_masks)
        if on_block_done is not None:
            on_block_done(index, block, block_masks, inputs)
    return masks
