"""Named fault-injection points for crash tests.

`SPP_FAULT=<point>:<n>` makes the process SIGKILL itself the n-th time it reaches
`fault_point(point, n)` (for example `prune_block:1` after block 1 is persisted,
`train_step:3` after step 3, `checkpoint_write:2` in the middle of writing
checkpoint 2). SIGKILL, not an exception, so no cleanup code runs: the test sees
exactly what a lost node leaves behind. A point may send another signal instead
(`train_sigint:3` sends SIGINT after step 3, as a Ctrl-C would). `SPP_FAULT_RANK=<r>`
limits the fault to the process whose `RANK` is r (one lost rank of a multi-process run).
Without the variable this is a no-op.
"""

from __future__ import annotations

import os
import signal


def fault_point(point: str, n: int, sig: int = signal.SIGKILL) -> None:
    """Send `sig` (default: kill) to this process if `$SPP_FAULT` names this point and count."""
    spec = os.environ.get("SPP_FAULT")
    only_rank = os.environ.get("SPP_FAULT_RANK")
    if only_rank is not None and only_rank != os.environ.get("RANK", "0"):
        return
    if spec and spec == f"{point}:{n}":
        os.kill(os.getpid(), sig)
