"""Whether the Hugging Face hub can be used, decided before any hub load so that offline fails in a second.

Every name that needs the hub (`--calib c4`, `--ppl wikitext2`, `--data org/name`, `--model org/name`,
`--tasks` without `--task-data`) passes through `require_hub` first. With `HF_HUB_OFFLINE` or
`HF_DATASETS_OFFLINE` set, no network attempt is made at all; otherwise one TCP connection to the hub
host (or to the HTTPS proxy) is tried with a short timeout, once per process. When the hub cannot be
used, the name fails at once with one line naming the local alternative, so `datasets` and
`huggingface_hub` never start their retries and warnings. A copy already in the local Hugging Face
cache is still used (the libraries read it in offline mode).
"""

from __future__ import annotations

import functools
import os
import threading
import urllib.parse
import urllib.request
from pathlib import Path

from spp.errors import SppError, first_line

PROBE_TIMEOUT_S = 1.5  # DNS + TCP connect; the hub answers in well under this where it is reachable
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_TRUE = {"1", "true", "yes", "on"}  # huggingface_hub's reading of a boolean variable


def offline_variable() -> str | None:
    """The first of HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set to a true value (1/true/yes/on), else None."""
    for name in OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().lower() in _TRUE:
            return name
    return None


def hub_address() -> tuple[str, int]:
    """(host, port) a hub request would connect to first: the HTTPS proxy if one applies, else the endpoint."""
    endpoint = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    proxy = urllib.request.getproxies().get(endpoint.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(host):
        parsed = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if parsed.hostname:
            return parsed.hostname, parsed.port or 80
    return host, port


@functools.lru_cache(maxsize=1)
def _probe(host: str, port: int, timeout: float) -> str | None:
    """None when a TCP connection to host:port opens within `timeout` s (name lookup included), else why not.

    The connection runs in a daemon thread because a name lookup has no timeout of its own.
    """
    import socket

    outcome: list = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(type(exc).__name__)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        return f"{host}:{port} did not answer within {timeout:g} s"
    return None if outcome[0] is None else f"{host}:{port} cannot be reached ({outcome[0]})"


def hub_unavailable() -> str | None:
    """Why the hub cannot be used now (an offline variable, or no answer from its host), or None."""
    variable = offline_variable()
    if variable:
        return f"{variable}={os.environ[variable]} is set"
    return _probe(*hub_address(), PROBE_TIMEOUT_S)


def cache_dirs() -> list[Path]:
    """The local Hugging Face caches a hub name may already be in (hub files, then `datasets`' own)."""
    home = Path(os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface")
    hub = Path(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or home / "hub")
    return [hub, Path(os.environ.get("HF_DATASETS_CACHE") or home / "datasets")]


def is_cached(name: str, kind: str) -> bool:
    """Whether `name` (a `kind` = "model" or "dataset" repo id) has a copy in a local Hugging Face cache."""
    hub, datasets_cache = cache_dirs()
    repo = f"{kind}s--{name.replace('/', '--')}"
    return (hub / repo).is_dir() or (kind == "dataset" and (datasets_cache / name.replace("/", "___")).is_dir())


def require_hub(what: str, name: str, kind: str, alternative: str) -> None:
    """Stop at once, with one line naming the local alternative, when `name` needs the unusable hub.

    Args:
        what: the user's words for the input, e.g. "--calib c4".
        name: the hub repo id.
        kind: "model" or "dataset".
        alternative: what to pass instead, e.g. "pass --calib PATH (a local .txt/.jsonl/.json file)".

    Raises:
        SppError: the hub cannot be used and `name` is not in the local cache.
    """
    reason = hub_unavailable()
    if reason and not is_cached(name, kind):
        raise SppError(f"{what} needs the Hugging Face hub ({name}), which cannot be used: {reason}; {alternative}")


def load_dataset(refusal, *args, **kwargs):
    """`datasets.load_dataset(*args, **kwargs)` in one attempt; any failure (network, missing files, a bad split:
    all mean "not loadable") becomes one `SppError(refusal(reason))`, `reason` the failure's first line. Callers
    pass `require_hub` first, so offline fails before `datasets` is imported."""
    try:
        import datasets

        return datasets.load_dataset(*args, **kwargs)
    except Exception as exc:
        raise SppError(refusal(first_line(exc))) from exc
