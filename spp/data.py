"""Text data for every stage: local files first, hub datasets through `datasets` when named.

Calibration windows (prune), instruction and plain-text training data (train) and
perplexity text (eval) all start here. A local `.txt` is read in text mode as one
document; `.jsonl` / `.json` hold records with a `text` field.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from spp.errors import SppError


def not_a_file(path: Path) -> str:
    """Why `path` cannot be read as a file, for a message: `is a directory, not a file` or `does not exist`."""
    return "is a directory, not a file" if Path(path).expanduser().is_dir() else "does not exist"


def read_jsonl(path: Path) -> list:
    """One JSON value per non-empty line.

    Raises:
        SppError: a line that is not valid JSON (naming the file and line number).
    """
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise SppError(f"{path}:{lineno} is not valid JSON: {exc.msg}") from exc
    return records


def read_text_documents(path: Path, field: str = "text") -> list[str]:
    """Documents from a local file: a `.txt` is one document; `.jsonl`/`.json` records give `field`.

    Raises:
        SppError: missing or empty file, bad JSON (naming the line), or a record without `field`.
    """
    path = Path(path)
    if not path.is_file():
        raise SppError(f"data file {path} {not_a_file(path)}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            records = read_jsonl(path)
        elif suffix == ".json":
            try:
                records = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise SppError(f"{path} is not valid JSON: {exc}") from exc
            if not isinstance(records, list):
                raise SppError(f"{path} must hold a JSON list of records")
        else:
            text = path.read_text(encoding="utf-8")
            if not text.strip():
                raise SppError(f"data file {path} is empty")
            return [text]
    except UnicodeDecodeError as exc:
        raise SppError(f"data file {path} is not UTF-8 text") from exc
    docs = []
    for i, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise SppError(f"{path}: record {i} has no string field {field!r}")
        docs.append(record[field])
    if not any(d.strip() for d in docs):
        raise SppError(f"data file {path} is empty")
    return docs


def tokenize_stream(tokenizer, documents: list[str]) -> torch.Tensor:
    """Tokenize documents as one stream of ids, joined by the EOS token (no BOS/EOS added per document).

    Returns:
        LongTensor (n_tokens,).
    """
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for i, doc in enumerate(documents):
        if i and eos is not None:
            ids.append(eos)
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------- calibration

HUB_CALIBRATION = {"c4": "allenai/c4", "wikitext2": "Salesforce/wikitext"}  # --calib name -> hub dataset
_C4_SHARD = "en/c4-train.00000-of-01024.json.gz"
_C4_TRIES_PER_SAMPLE = 100


def calibration_windows(tokenizer, calib: str, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`nsamples` windows of `seqlen` token ids for calibration, from a local file or a hub dataset.

    A local `.txt` / `.jsonl` / `.json` is tokenized as one stream (documents joined by EOS)
    and the windows start at seeded random offsets. `c4` and `wikitext2` load through
    `datasets` (see `c4_windows`, `wikitext2_windows`).

    Returns:
        LongTensor (nsamples, seqlen).

    Raises:
        SppError: missing/empty file, too few tokens (says how many the file has), or a hub load failure.
    """
    if calib == "c4":
        return c4_windows(tokenizer, nsamples, seqlen, seed)
    if calib == "wikitext2":
        return wikitext2_windows(tokenizer, nsamples, seqlen, seed)
    path = Path(calib)
    if not path.exists():
        raise SppError(f"--calib {calib}: no such file (use a .txt/.jsonl/.json path, c4 or wikitext2)")
    stream = tokenize_stream(tokenizer, read_text_documents(path))
    return random_windows(stream, nsamples, seqlen, seed, source=f"--calib {calib}")


def random_windows(stream: torch.Tensor, nsamples: int, seqlen: int, seed: int, source: str) -> torch.Tensor:
    """Cut `nsamples` windows of `seqlen` from a 1-D id stream at seeded random starts.

    Raises:
        SppError: the stream has fewer than max(seqlen, nsamples·seqlen) tokens.
    """
    n_tokens = stream.numel()
    needed = nsamples * seqlen
    if n_tokens < seqlen:
        raise SppError(f"{source} has only {n_tokens} tokens, too short for one window of --seqlen {seqlen}")
    if n_tokens < needed:
        raise SppError(
            f"{source} has only {n_tokens} tokens; --nsamples {nsamples} x --seqlen {seqlen} needs {needed}"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n_tokens - seqlen + 1, (nsamples,), generator=generator)
    offsets = starts[:, None] + torch.arange(seqlen)[None, :]  # (nsamples, seqlen)
    return stream[offsets]


CALIB_ALTERNATIVE = "pass --calib PATH (a local .txt/.jsonl/.json file) instead"
DATA_ALTERNATIVE = "pass --data PATH (a local Alpaca .json/.jsonl or a plain .txt file) instead"


def check_calib_source(calib: str) -> None:
    """Offline, `--calib c4`/`wikitext2` fails here at once (prune calls it before reading any model).

    Raises:
        SppError: the hub cannot be used and the set is not in the local cache (names --calib PATH).
    """
    from spp.hub import require_hub

    if calib in HUB_CALIBRATION:  # the name wins over a file of that name, as in calibration_windows
        require_hub(f"--calib {calib}", HUB_CALIBRATION[calib], "dataset", CALIB_ALTERNATIVE)


def check_data_source(source: str) -> None:
    """Offline, a `--data` hub dataset name fails here at once (train calls it before reading any model).

    Raises:
        SppError: the hub cannot be used and the dataset is not in the local cache (names --data PATH).
    """
    from spp.hub import require_hub

    if source and not Path(source).expanduser().exists() and not looks_like_path(source):
        require_hub(f"--data {source}", source, "dataset", DATA_ALTERNATIVE)


def _load_hub_dataset(calib: str, *args, **kwargs):
    """`datasets.load_dataset` of the hub set `--calib calib` names (`HUB_CALIBRATION`): one attempt, one clear error.

    Offline (`check_calib_source`) it fails at once, before `datasets` is imported.
    """
    from spp import hub

    check_calib_source(calib)
    name = HUB_CALIBRATION[calib]
    return hub.load_dataset(lambda reason: f"--calib {calib}: cannot load {name} from the Hugging Face hub "
                            f"({reason}); {CALIB_ALTERNATIVE}", name, *args, **kwargs)


def c4_windows(tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Windows from the first English C4 train shard, sampled as the reference pruners do.

    Each window: draw random documents until one is longer than `seqlen` tokens, then a
    random window inside it. Gives up after `_C4_TRIES_PER_SAMPLE · nsamples` draws.

    Returns:
        LongTensor (nsamples, seqlen).
    """
    import random

    data = _load_hub_dataset("c4", data_files={"train": _C4_SHARD}, split="train")
    rng = random.Random(seed)
    windows, tries = [], 0
    while len(windows) < nsamples:
        tries += 1
        if tries > _C4_TRIES_PER_SAMPLE * nsamples:
            raise SppError(
                f"c4: found only {len(windows)} of {nsamples} documents longer than --seqlen {seqlen} "
                f"in {tries - 1} draws; lower --seqlen or use --calib PATH"
            )
        doc = data[rng.randint(0, len(data) - 1)]["text"]
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        if len(ids) <= seqlen:
            continue
        start = rng.randint(0, len(ids) - seqlen - 1)
        windows.append(ids[start : start + seqlen])
    return torch.tensor(windows, dtype=torch.long)


def wikitext2_windows(tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Windows from the WikiText-2 (raw) train split joined into one stream, at seeded random offsets.

    Returns:
        LongTensor (nsamples, seqlen).
    """
    data = _load_hub_dataset("wikitext2", "wikitext-2-raw-v1", split="train")
    stream = tokenize_stream(tokenizer, ["\n\n".join(data["text"])])
    return random_windows(stream, nsamples, seqlen, seed, source="wikitext2 (train)")


# --------------------------------------------------------------------------- training data
#
# An example is a pair (input_ids, labels) of equal-length int lists; a label of
# IGNORE_INDEX marks a position that is not a target (a prompt token when
# train_on_inputs is false, or padding). The model predicts labels[t] from ids[:t].

IGNORE_INDEX = -100

# The two Alpaca prompt shapes (instruction with and without an input), in our own words;
# the section headers are the ones Alpaca-style models and tools expect.
ALPACA_PROMPTS = {
    "input": (
        "Here is a task, together with some context for it. Write a reply that does what the task asks.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    ),
    "no_input": (
        "Here is a task. Write a reply that does what it asks.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:\n"
    ),
}
ALPACA_REQUIRED = ("instruction", "output")


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca prompt for one record: the `input` template when `input_text` is non-empty, else `no_input`."""
    if input_text.strip():
        return ALPACA_PROMPTS["input"].format(instruction=instruction, input=input_text)
    return ALPACA_PROMPTS["no_input"].format(instruction=instruction)


def looks_like_path(source: str) -> bool:
    """Whether a data name is meant as a local file (starts with . / ~, or ends .json/.jsonl/.txt), not a hub name."""
    return source.startswith((".", "/", "~")) or Path(source).suffix.lower() in (".json", ".jsonl", ".txt")


def _load_hub_records(name: str, split: str) -> list[dict]:
    """Records of a `datasets` hub dataset (or a local dataset directory), as plain dicts.

    Raises:
        SppError: the hub cannot be used (at once, naming --data PATH), or the dataset does not load.
    """
    from spp import hub

    check_data_source(name)
    dataset = hub.load_dataset(lambda reason: f"data {name!r} is neither a local file nor a loadable dataset: "
                               f"{reason}", name, split=split)
    return [dict(row) for row in dataset]


def read_alpaca_records(source: str, split: str = "train") -> list[dict]:
    """Alpaca records {instruction, input, output} from a local .json/.jsonl file or a hub dataset name.

    `input` may be missing or null (read as ""); `instruction` and `output` are required strings.

    Raises:
        SppError: a missing or empty file, bad JSON, or a record without a required field
            (naming the record's index and the field).
    """
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".jsonl":
            records = read_jsonl(path)
        else:
            try:
                records = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise SppError(f"data file {path} is not valid JSON: {exc}") from exc
            if not isinstance(records, list):
                raise SppError(f"data file {path} must hold a JSON list of Alpaca records")
    elif path.exists() or looks_like_path(source):
        raise SppError(f"data file {source} {not_a_file(path)}")
    else:
        records = _load_hub_records(source, split)
    if not records:
        raise SppError(f"data {source} holds no records")
    out = []
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise SppError(f"{source}: record {i} is not an object with instruction/input/output")
        for key in ALPACA_REQUIRED:
            if key not in record or record[key] is None:
                raise SppError(f"{source}: record {i} has no {key!r} field (Alpaca records need instruction and output)")
        input_text = record.get("input") or ""
        for key, value in (("instruction", record["instruction"]), ("input", input_text), ("output", record["output"])):
            if not isinstance(value, str):
                raise SppError(f"{source}: record {i} field {key!r} is {type(value).__name__}, not a string")
        out.append({"instruction": record["instruction"], "input": input_text, "output": record["output"]})
    return out


def tokenize_instruction(tokenizer, record: dict, cutoff_len: int, train_on_inputs: bool,
                         add_eos_token: bool = True) -> tuple[list[int], list[int]]:
    """One Alpaca record -> (input_ids, labels), at most `cutoff_len` tokens.

    ids = BOS? + tokens(prompt) + tokens(output) + EOS (EOS only when it fits), cut to
    `cutoff_len`. Prompt and response are tokenized separately so the boundary is exact.
    labels = ids, with the prompt positions set to IGNORE_INDEX unless `train_on_inputs`.
    """
    prompt_ids = tokenizer(alpaca_prompt(record["instruction"], record["input"]))["input_ids"]
    output_ids = tokenizer(record["output"], add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + output_ids)[:cutoff_len]
    if add_eos_token and tokenizer.eos_token_id is not None and len(ids) < cutoff_len:
        ids.append(tokenizer.eos_token_id)
    labels = list(ids)
    if not train_on_inputs:
        n_prompt = min(len(prompt_ids), len(ids))
        labels[:n_prompt] = [IGNORE_INDEX] * n_prompt
    return ids, labels


def text_windows(tokenizer, documents: list[str], cutoff_len: int) -> list[tuple[list[int], list[int]]]:
    """Plain text for language-model training: one token stream cut into `cutoff_len` windows.

    The stream is BOS (if the tokenizer has one) + the documents joined by EOS. Windows
    do not overlap; a last window shorter than 2 tokens is dropped. Every token is a target.

    Returns:
        [(ids, labels)] with labels == ids.
    """
    stream = tokenize_stream(tokenizer, documents).tolist()
    if tokenizer.bos_token_id is not None:
        stream = [tokenizer.bos_token_id] + stream
    windows = [stream[i:i + cutoff_len] for i in range(0, len(stream), cutoff_len)]
    return [(w, list(w)) for w in windows if len(w) >= 2]


def target_count_of(labels: list[int]) -> int:
    """Target tokens of one example, counted as the loss counts them: labels[1:] ≠ IGNORE_INDEX
    (position 0 is never predicted; see `spp.train.loop.target_count`)."""
    return sum(label != IGNORE_INDEX for label in labels[1:])


def requested_validation_count(n_examples: int, val_set_size: int | float) -> int:
    """The hold-out `val_set_size` asks for: an int is a count, a float in [0, 1) a fraction of
    `n_examples` rounded to the nearest integer (Python's `round`)."""
    if isinstance(val_set_size, float):
        return int(round(n_examples * val_set_size))
    return int(val_set_size)


def validation_count(n_examples: int, val_set_size: int | float) -> int:
    """Examples held out for validation: the requested count, capped at ⌊n_examples / 2⌋ so that at
    least half of the examples are left for training (a small local file works with any config)."""
    return min(requested_validation_count(n_examples, val_set_size), n_examples // 2)


def validation_note(n_examples: int, val_set_size: int | float) -> str | None:
    """The one-line note for a capped hold-out (naming the asked and the capped count), else None."""
    asked, held_out = requested_validation_count(n_examples, val_set_size), validation_count(n_examples, val_set_size)
    if asked == held_out:
        return None
    return (f"note: val_set_size={val_set_size} asks for {asked} of {n_examples} examples, which would leave fewer "
            f"than half to train on; holding out {held_out} instead")


def split_train_val(n_examples: int, val_set_size: int | float, seed: int) -> tuple[list[int], list[int]]:
    """Shuffle example indices with `seed` and hold out the first `validation_count` for validation.

    A pure function of its arguments, so a `--resume` (same data, same recorded `val_set_size`
    and seed) gets the same split.

    Returns:
        (train_indices, val_indices).
    """
    n_val = validation_count(n_examples, val_set_size)
    order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed)).tolist()
    return order[n_val:], order[:n_val]


def pad_batch(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples into tensors.

    Returns:
        input_ids (B, T) padded with `pad_id`, attention_mask (B, T) 1 on real tokens,
        labels (B, T) padded with IGNORE_INDEX; T is the longest example.
    """
    from torch.nn.utils.rnn import pad_sequence

    def padded(rows, value):
        return pad_sequence([torch.tensor(row, dtype=torch.long) for row in rows], batch_first=True, padding_value=value)

    return {"input_ids": padded([ids for ids, _ in examples], pad_id),
            "attention_mask": padded([[1] * len(ids) for ids, _ in examples], 0),
            "labels": padded([labels for _, labels in examples], IGNORE_INDEX)}
