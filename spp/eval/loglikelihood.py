"""Log-likelihoods of lm-eval's (context, continuation) requests, each distinct context run once.

lm-eval's `HFLM` scores a request with one forward pass over c ⊕ y[:−1] (c the context's tokens, y the
continuation's), so the k choices of a multiple-choice item run their common context k times, and every position
goes through the output head. With z_k the logits at input position k (from 0),

    log p(y | c) = Σ_{t=1}^{|y|} log softmax(z_{|c|+t−2})[y_t],   greedy = (argmax z_{|c|+t−2} = y_t for every t)

`continuation_logprobs` computes the same sums in two forward passes per batch of distinct contexts:

1. the contexts, right-padded to (B, P). Attention is causal, so padding after a context changes none of its
   positions. The logits at each context's last position give log p(y_1 | c); the key/value cache is kept.
2. every continuation of more than one token: y[:−1], right-padded to (R, S), on its context's cache row, with an
   attention mask that hides the context's padding and position ids |c| + j. Its logits give log p(y_{j+1} | c, y_{≤j}).

Only the scored positions go through the output head (`logits_to_keep` as a boolean mask). An input longer than
`max_length` + 1 tokens loses its start, as in `HFLM`. The sums equal `HFLM`'s up to float rounding (the matrix
shapes differ), which tests/test_eval.py checks item by item against `batch_size=1`. `SharedContextLM` is `HFLM`
with this path for `loglikelihood`, and one progress bar per task; rolling and generation requests stay lm-eval's, as
do all requests of a model whose forward lacks `logits_to_keep` or the cache arguments (`spp.hf.scores_chosen_positions`).
"""

from __future__ import annotations

from typing import Callable

import torch
from lm_eval.models.huggingface import HFLM, eval_logger

from spp.errors import SppError
from spp.hf import forward_with_cache, scores_chosen_positions, select_cache_rows

CPU_BATCH = 4  # contexts per forward on a CPU: measured with scripts/bench_eval.py --zeroshot (docs/results/eval_speed.md)
CUDA_BATCH = 256  # "auto" on CUDA starts here and halves on out-of-memory, as lm-eval's batch_size="auto" does

Request = tuple[list[int], list[int]]  # (context ids, continuation ids), as HFLM tokenizes them


def context_groups(requests: list[Request], max_length: int) -> list[tuple[tuple[int, ...], list[int]]]:
    """(context ids, indices of its requests) for each distinct context, longest answer first.

    A request of more than `max_length` + 1 tokens keeps its last `max_length` + 1 (HFLM's left truncation); its
    context is what remains before the continuation.

    Raises:
        SppError: a continuation longer than `max_length` (it cannot be scored in one window).
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (context, continuation) in enumerate(requests):
        if not continuation or len(continuation) > max_length:
            raise SppError(f"an lm-eval request has a continuation of {len(continuation)} tokens; the model "
                           f"scores 1 to {max_length}")
        tokens = (context + continuation)[-(max_length + 1):]
        groups.setdefault(tuple(tokens[: len(tokens) - len(continuation)]), []).append(i)
    # Longest answer first, then longest context: the second pass pads every answer of a batch to its longest,
    # and answers outweigh contexts in most multiple-choice tasks (PIQA pads 1.1x its tokens so, 1.8x by context).
    return sorted(groups.items(), key=lambda g: (-max(len(requests[i][1]) for i in g[1]), -len(g[0])))


def _score_batch(model, groups, requests: list[Request], device) -> dict[int, tuple[float, bool]]:
    """The two passes of the module docstring for one batch of context groups: request index -> (log p, greedy)."""
    lengths = [len(context) for context, _ in groups]
    P = max(lengths)
    ids = torch.zeros(len(groups), P, dtype=torch.long)  # (B, P); the pad id is never attended to by a real token
    last = torch.zeros(len(groups), P, dtype=torch.bool)
    for b, (context, _) in enumerate(groups):
        ids[b, : lengths[b]] = torch.tensor(context)
        last[b, lengths[b] - 1] = True
    rows = [(b, i) for b, (_, members) in enumerate(groups) for i in members if len(requests[i][1]) > 1]
    if rows:
        out, cache = forward_with_cache(model, input_ids=ids.to(device), logits_to_keep=last.to(device))
    else:
        out = model(input_ids=ids.to(device), use_cache=False, logits_to_keep=last.to(device))
    first_logp, first_greedy = _picked(out.logits, [requests[i][1][0] for _, members in groups for i in members],
                                       [b for b, (_, members) in enumerate(groups) for _ in members])
    members = [i for _, group in groups for i in group]
    scores = {i: (float(first_logp[k]), bool(first_greedy[k])) for k, i in enumerate(members)}
    if not rows:
        return scores
    cache = select_cache_rows(cache, torch.tensor([b for b, _ in rows], device=device))
    S = max(len(requests[i][1]) - 1 for _, i in rows)
    suffix = torch.zeros(len(rows), S, dtype=torch.long)  # (R, S): y[:-1] of each continuation, right-padded
    mask = torch.zeros(len(rows), P + S, dtype=torch.long)  # over the cache's P positions, then the suffix's S
    keep = torch.zeros(len(rows), S, dtype=torch.bool)
    for r, (b, i) in enumerate(rows):
        y = requests[i][1]
        suffix[r, : len(y) - 1] = torch.tensor(y[:-1])
        mask[r, : lengths[b]] = 1
        mask[r, P : P + len(y) - 1] = 1
        keep[r, : len(y) - 1] = True
    positions = torch.tensor(lengths)[[b for b, _ in rows]][:, None] + torch.arange(S)  # (R, S): |c| + j
    logits = forward_with_cache(model, cache, input_ids=suffix.to(device), attention_mask=mask.to(device),
                                position_ids=positions.to(device), logits_to_keep=keep.to(device))[0].logits
    targets = [t for _, i in rows for t in requests[i][1][1:]]
    logp, greedy = _picked(logits, targets, list(range(len(targets))))  # logits rows: by row, then by position
    offset = 0
    for _, i in rows:
        n = len(requests[i][1]) - 1
        before, was_greedy = scores[i]
        scores[i] = (before + float(logp[offset : offset + n].sum()), was_greedy and bool(greedy[offset : offset + n].all()))
        offset += n
    return scores


def _picked(logits: torch.Tensor, targets: list[int], rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """For each k: log softmax(logits[rows[k]])[targets[k]] (float32) and whether targets[k] is the argmax, on the
    CPU; logits (N, V) stay on their device, so only 2 numbers per target are copied."""
    rows_t = torch.tensor(rows, device=logits.device)
    targets_t = torch.tensor(targets, device=logits.device)
    logp = logits.float().log_softmax(-1)[rows_t]  # (K, V)
    picked = logp.gather(1, targets_t[:, None]).squeeze(1)
    return picked.cpu(), (logp.argmax(-1) == targets_t).cpu()


def continuation_logprobs(model, requests: list[Request], max_length: int, batch_size: int | None = None,
                          advance: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
    """(log p(y | c), greedy) of every request, `batch_size` distinct contexts per forward pass.

    Args:
        model: a causal LM whose forward takes `logits_to_keep`, `past_key_values`, `position_ids`.
        requests: (context ids, continuation ids) pairs; the context is non-empty.
        max_length: the model's window (HFLM's `max_length`).
        batch_size: contexts per forward; None = `CPU_BATCH` on a CPU, on CUDA `CUDA_BATCH` halved at each
            out-of-memory error (lm-eval's "auto").
        advance: called with the number of requests finished after each batch (a progress bar).

    Returns:
        One (summed log-probability in nats, whether greedy decoding gives y) per request, in order.
    """
    device = next(model.parameters()).device
    auto = batch_size is None and device.type == "cuda"
    size = batch_size or (CUDA_BATCH if auto else CPU_BATCH)
    groups = context_groups(requests, max_length)
    results: list = [None] * len(requests)
    start = 0
    with torch.inference_mode():
        while start < len(groups):
            chunk = groups[start : start + size]
            try:
                scores = _score_batch(model, chunk, requests, device)
            except torch.cuda.OutOfMemoryError:
                if not auto or size == 1:
                    raise
                size //= 2
                torch.cuda.empty_cache()
                continue
            for i, score in scores.items():
                results[i] = score
            start += len(chunk)
            if advance is not None:
                advance(sum(len(members) for _, members in chunk))
    return results


def chosen_answers(instances, scores: list[tuple[float, bool]]) -> dict[int, tuple[int, float]]:
    """doc id -> (the choice lm-eval's `acc` picks, the margin between the two best log-likelihoods; inf for one
    choice), from lm-eval's log-likelihood instances and their (log p, greedy) scores in the same order."""
    docs: dict[int, list] = {}
    for inst, (ll, _) in zip(instances, scores):
        docs.setdefault(inst.doc_id, []).append((inst.idx, ll))
    out = {}
    for doc, choices in docs.items():
        lls = [ll for _, ll in sorted(choices)]
        ranked = sorted(lls, reverse=True)
        out[doc] = (lls.index(ranked[0]), ranked[0] - ranked[1] if len(ranked) > 1 else float("inf"))
    return out


class SharedContextLM(HFLM):
    """lm-eval's `HFLM` on an in-memory model, with `continuation_logprobs` for its log-likelihood requests.

    Args:
        model, tokenizer: the loaded model and its tokenizer.
        batch_size: see `continuation_logprobs` (None: the device's default).
        progress: a `rich.progress.Progress` that gets one bar per task, labelled by `labels[task_name]`.
    """

    def __init__(self, model, tokenizer, batch_size: int | None = None, progress=None,
                 labels: dict[str, str] | None = None):
        auto = batch_size is None and next(model.parameters()).device.type == "cuda"
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size="auto" if auto else batch_size or CPU_BATCH)
        self.contexts_per_batch, self.progress, self.labels = batch_size, progress, labels or {}
        self._advance = None

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        """HFLM's tokenization, then `continuation_logprobs`, task by task so that each task has its bar."""
        by_task: dict[str, list[int]] = {}
        for k, request in enumerate(requests):
            by_task.setdefault(request.task_name, []).append(k)
        results: list = [None] * len(requests)
        for task, indices in by_task.items():
            if self.progress is not None:
                bar = self.progress.add_task(self.labels.get(task, str(task)), total=len(indices))
                self._advance = lambda n, bar=bar: self.progress.advance(bar, n)
            scores = super().loglikelihood([requests[k] for k in indices], disable_tqdm=True)
            for k, score in zip(indices, scores):
                results[k] = score
        self._advance = None
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if override_bs is not None or not scores_chosen_positions(self.model):  # loglikelihood_rolling's windows
            # (wikitext), or a model without the arguments the shared-context path needs: lm-eval's own path
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        pairs = [(context, continuation) for _, context, continuation in requests]
        for context, continuation in pairs:  # HFLM's warning, word for word: spp.quiet sums these into one line
            if len(context) + len(continuation) > self.max_length + 1:
                eval_logger.warning(
                    f"Combined length of context ({len(context)}) and continuation ({len(continuation)}) exceeds "
                    f"model's maximum length ({self.max_length}). Truncating "
                    f"{len(context) + len(continuation) - self.max_length + 1} tokens from the left.")
        scores = continuation_logprobs(self.model, pairs, self.max_length, self.contexts_per_batch, self._advance)
        for (pair, _, _), score in zip(requests, scores):
            self.cache_hook.add_partial("loglikelihood", pair, score)
        return scores
