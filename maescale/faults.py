"""Fault injection for reliability tests: named points in the code that can sleep or fail.

Set ``MAESCALE_FAULTS`` to a comma-separated list of ``point[@step]=action`` where action is
``sleep:SECONDS``, ``oserror`` (raise ``OSError(ENOSPC)``), ``exit`` (``os._exit(1)``, a crash
with no clean-up) or, for ``train.batch``, ``nan`` (the batch becomes NaN on every rank) or
``nan:R`` (on rank R only; see :func:`maybe_poison`). Example: ``MAESCALE_FAULTS="checkpoint.before_commit@10=sleep:60"`` pauses
the save of step 10 after every rank has written, before the manifest and rename, so a test can
SIGKILL the job in the middle of a checkpoint. Unset (always, in real runs) it costs nothing.
"""

from __future__ import annotations

import errno
import logging
import os
import time

log = logging.getLogger(__name__)


def _parse(spec: str) -> dict[tuple[str, int | None], str]:
    rules: dict[tuple[str, int | None], str] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        point, _, action = item.partition("=")
        name, _, step = point.partition("@")
        rules[(name, int(step) if step else None)] = action
    return rules


def _action(name: str, step: int | None) -> str | None:
    spec = os.environ.get("MAESCALE_FAULTS")
    if not spec:
        return None
    rules = _parse(spec)
    return rules.get((name, step)) or rules.get((name, None))


def maybe_poison(batch, step: int, rank: int = 0):
    """The batch, or a NaN copy of it when ``train.batch@STEP=nan`` (or ``nan:RANK`` for this
    rank) is configured."""
    action = _action("train.batch", step)
    if action == "nan" or action == f"nan:{rank}":
        log.warning("fault injection: NaN batch at step %d on rank %d", step, rank)
        return batch * float("nan")
    return batch


def fault_point(name: str, step: int | None = None) -> None:
    """Run the action configured for ``name`` (at ``step``), if any."""
    action = _action(name, step)
    if action is None:
        return
    log.warning("fault injection: %s at step %s -> %s", name, step, action)
    if action.startswith("sleep:"):
        time.sleep(float(action.split(":", 1)[1]))
    elif action == "oserror":
        raise OSError(errno.ENOSPC, f"injected fault at {name}: No space left on device")
    elif action == "exit":
        os._exit(1)
    else:
        raise ValueError(f"MAESCALE_FAULTS: unknown action {action!r} for {name}")
