"""Fault injection for reliability tests: named points in the code that can sleep or fail.

Set ``MAESCALE_FAULTS`` to a comma-separated list of ``point[@step]=action`` where action is
``sleep:SECONDS``, ``oserror`` (raise ``OSError(ENOSPC)``) or ``exit`` (``os._exit(1)``, a crash
with no clean-up). Example: ``MAESCALE_FAULTS="checkpoint.before_commit@10=sleep:60"`` pauses
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


def fault_point(name: str, step: int | None = None) -> None:
    """Run the action configured for ``name`` (at ``step``), if any."""
    spec = os.environ.get("MAESCALE_FAULTS")
    if not spec:
        return
    rules = _parse(spec)
    action = rules.get((name, step)) or rules.get((name, None))
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
