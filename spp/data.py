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


def read_text_documents(path: Path, field: str = "text") -> list[str]:
    """Documents from a local file: a `.txt` is one document; `.jsonl`/`.json` records give `field`.

    Raises:
        SppError: missing or empty file, bad JSON (naming the line), or a record without `field`.
    """
    path = Path(path)
    if not path.is_file():
        raise SppError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            records = []
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            records.append(json.loads(line))
                        except json.JSONDecodeError as exc:
                            raise SppError(f"{path}:{lineno} is not valid JSON: {exc.msg}") from exc
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
