"""Block-by-block calibration: capture every decoder block's call once, then walk the blocks one at a time.

`capture_block_inputs` runs the model once over the calibration windows with every
decoder block replaced by a pass-through, recording the hidden states that reach block 0
and the positional and keyword arguments of *every* block call (attention masks can differ
per layer: Qwen2's `max_window_layers`, Gemma2's alternating sliding/full layers; GPT-2
passes some arguments positionally). Cache objects are dropped. `walk_blocks` then yields
one block at a time on the device, after running it with hooks on its chosen linear layers
to collect statistics (and a pre-hook on each experts module of its chosen expert weights recording the routed
tokens: `spp.prune.experts`); once the caller has pruned it, the *pruned* block runs to produce the
next block's inputs, as SparseGPT and Wanda do. A streamed model's blocks stay on the meta device except while
walked (`hold`: read, then released). Forwards are batched over windows. This
module knows nothing about any pruning method: it takes an `accumulate` function
(statistics from layer inputs) and leaves the pruning to its caller (`spp.prune.prune_model`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from spp.models import Target, block_targets
from spp.prune.experts import expert_targets, recording_routes


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
    for hidden, call in zip(inputs.hidden, inputs.calls[index]):
        out = call_block(block, hidden.to(device), to_device(call, device), inputs.hidden_as_kwarg)
        if keep_outputs:
            outputs.append(out.to(inputs.storage))
    return outputs


def call_block(block: nn.Module, hidden: torch.Tensor, call: tuple[tuple, dict], hidden_as_kwarg: bool) -> torch.Tensor:
    """Block output (batch, seq, hidden) for `hidden` and one recorded call's (args, kwargs), on their device."""
    args, kwargs = call
    out = block(hidden_states=hidden, **kwargs) if hidden_as_kwarg else block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out  # transformers < 5 returned (hidden, ...)


@contextlib.contextmanager
def _recording(layers: dict[str, nn.Module], accumulate) -> Iterator[dict[str, Any]]:
    """Forward hooks on `layers` that fold each call's input into `accumulate`; yields the statistics by name,
    complete when the context exits.

    A layer whose input is the very tensor, unchanged, that the layer recorded just before it got (q/k/v_proj,
    gate/up_proj) shares that layer's statistics instead of folding the same numbers again: XᵀX is most of the
    calibration cost of SparseGPT, ALPS and DSnoT's guard. Which layers share is fixed by their first call and
    checked on every later one.
    """
    stats: dict[str, Any] = {}
    shares: dict[str, str] = {}  # layer name -> the layer whose statistics it shares
    last: list = []  # [input tensor, its version counter, the name that folded it]

    def hook(name):
        def fn(module, args, output):
            X = args[0]
            same = bool(last) and last[0] is X and last[1] == X._version
            if name in shares or (same and name not in stats):
                if not same or shares.setdefault(name, last[2]) != last[2]:
                    raise RuntimeError(f"{name} no longer gets the input of {shares[name]}: the block's forward "
                                       f"changed between calls")
                return
            stats[name] = accumulate(stats.get(name), X.detach())
            last[:] = X, X._version, name

        return fn

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()
        last.clear()
        for name, owner in shares.items():
            stats[name] = stats[owner]


@dataclass
class Block:
    """One decoder block on the device, as `walk_blocks` yields it.

    Attributes:
        index: its position among the decoder blocks.
        module: the block, on the device until `finish`.
        targets: the chosen weights (`spp.models.Target`, full names), by block-relative name (`self_attn.q_proj`,
            `mlp.experts.gate_up_proj`), in model order.
        stats: linear layer name -> the statistics `accumulate` folded from its inputs (empty without calibration;
            none for expert weights, whose inputs are their routed tokens); layers fed the same input tensor hold
            one shared object, which consumers read and never change in place.
        routes: experts module name -> its (hidden (T, H), top_k_index (T, k)) per chunk of windows
            (`spp.prune.experts.recording_routes`), or None without calibration.
    """

    index: int
    module: nn.Module
    targets: dict[str, Target]
    stats: dict[str, Any]
    routes: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] | None
    _inputs: BlockInputs | None = field(default=None, repr=False)  # None: nothing to run again (dense pass)
    _last: bool = False
    _device: torch.device | None = None
    _home: torch.device | None = None
    _finished: bool = False

    def finish(self) -> list[torch.Tensor] | None:
        """Hand the block's outputs on to the next block and move the block back home; done once.

        While pruning, the *pruned* block runs here on its inputs (its statistics and routes are dropped
        first), so the next block sees pruned outputs; this block's recorded call arguments are dropped too.
        `walk_blocks` calls this when the next block is asked for; call it sooner to persist the block with
        the next block's inputs.

        Returns:
            The next block's inputs (one (batch, seq, hidden) tensor per chunk of windows), or None for the last
            block or without calibration.
        """
        if not self._finished:
            self.stats, self.routes = {}, None
            if self._inputs is not None and not self._last:
                self._inputs.hidden = run_block(self.module, self.index, self._inputs, self._device)
            if self._inputs is not None:
                self._inputs.calls[self.index] = []
            self.module.to(self._home)
            self._finished = True
        return None if self._inputs is None or self._last else self._inputs.hidden


def walk_blocks(
    blocks: nn.ModuleList,
    inputs: BlockInputs | None,
    accumulate: Callable[[Any, torch.Tensor], Any] | None,
    device: torch.device,
    chosen: list[dict[str, Target]] | None = None,
    start: int = 0,
    dense: bool = False,
    hold: Callable[[int], contextlib.AbstractContextManager] | None = None,
) -> Iterator[Block]:
    """Yield each decoder block on `device` with the statistics of its chosen layers, calibration flowing block to block.

    Pruning (the default): block i is yielded with statistics from its *unpruned* run on its inputs; the caller
    prunes it in place; then (`Block.finish`) the *pruned* block runs to give block i + 1's inputs, as SparseGPT
    and Wanda do, and `inputs.hidden` holds them. Dense (`dense=True`, OWL's pass over the unpruned model): one
    run of each block gives both its statistics and the next block's inputs, and `inputs` is left as it was, so
    pruning can start from block 0's inputs afterwards. One block's activations are held at a time.

    Args:
        blocks: decoder blocks (on the CPU; each is moved to `device` while it is yielded).
        inputs: from `capture_block_inputs`, or None for methods without calibration (magnitude): no statistics,
            no runs.
        accumulate: (state or None, X (..., in)) -> state, called for every input batch of a chosen layer; None
            collects nothing (and, while pruning, the block still runs to feed the next one).
        device: where each block runs.
        chosen: per block index, the targets to yield by block-relative name (default: every target of the block,
            `spp.models.block_targets`); the others get no statistics.
        start: the first block to yield (a resumed run: blocks before it are already pruned and `inputs.hidden`
            holds block `start`'s inputs).
        dense: the statistics pass described above.
        hold: block index -> a context entered before the block is used and left once the caller is done with it
            (after `finish`): a streamed model's blocks are read from the checkpoint and released there
            (`spp.prune.prune_model`). None: the blocks are all in memory.
    """
    state = inputs
    if dense and inputs is not None:
        state = BlockInputs(hidden=inputs.hidden, calls=inputs.calls, hidden_as_kwarg=inputs.hidden_as_kwarg,
                            storage=inputs.storage)
    for index, module in enumerate(blocks):
        if index < start:
            if state is not None:
                state.calls[index] = []
            continue
        with hold(index) if hold is not None else contextlib.nullcontext():
            yield from _walk_one(index, module, state, accumulate, device, chosen, dense, len(blocks))


def _walk_one(index, module, state, accumulate, device, chosen, dense, n_blocks) -> Iterator[Block]:
    """`walk_blocks` for one block: its statistics pass, the yield, then `finish`."""
    home = next(module.parameters()).device
    module.to(device)
    targets = block_targets(module) if chosen is None else chosen[index]
    experts = expert_targets(targets)
    last = index + 1 == n_blocks
    stats, routes = {}, None
    if state is not None and accumulate is not None:
        layers = {n: t.module for n, t in targets.items() if n not in experts}
        modules = {n.rsplit(".", 1)[0]: t.module for n, t in experts.items()}
        with _recording(layers, accumulate) as stats, recording_routes(modules, state.storage) as routes:
            outputs = run_block(module, index, state, device, keep_outputs=dense and not last)
        if dense and not last:
            state.hidden = outputs
    block = Block(index, module, targets, stats, routes, _inputs=None if dense else state, _last=last,
                  _device=device, _home=home)
    del stats, routes  # the block holds them, and drops them before it runs again
    yield block
    block.finish()
