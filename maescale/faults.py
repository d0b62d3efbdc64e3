"""Fault injection for reliability tests: named points in the code that can sleep, fail or hang.

Set ``MAESCALE_FAULTS`` to a comma-separated list of ``point[@step][:rRANK][:aATTEMPT]=action``.
``:rR`` limits a rule to rank R (``RANK``/``SLURM_PROCID``), ``:aA`` to attempt A of a job (the
supervisor's restarts count attempts from 0 in ``MAESCALE_ATTEMPT``). Actions:

* ``sleep:SECONDS``; ``hang`` (sleep for good, the GIL released: a stalled rank);
* ``oserror`` (raise ``OSError(ENOSPC)``); ``exit`` (``os._exit(1)``, a crash with no clean-up);
  ``kill`` (SIGKILL to this process, as the OOM killer or a lost node would);
* for ``train.batch`` (keyed by optimizer step): ``nan`` (the batch becomes NaN on every rank) or
  ``nan:R`` (on rank R only; see :func:`maybe_poison`);
* for ``data.batch`` (keyed by the stream position: the N-th micro-batch this rank has drawn from
  its data, so a rollback that skips it meets clean data): ``nan`` or ``nan:R``
  (:func:`maybe_poison_data`);
* for ``train.grads``, ``nan:R`` (rank R's partition of the reduced gradients becomes NaN after the
  reduction, on that rank only; see :func:`maybe_poison_grads`).

Example: ``MAESCALE_FAULTS="checkpoint.before_commit@10=sleep:60"`` pauses the save of step 10
after every rank has written, before the manifest and rename, so a test can SIGKILL the job in
the middle of a checkpoint. Unset (always, in real runs) it costs nothing.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time

log = logging.getLogger(__name__)


def _rank() -> int:
    return int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0)


def _parse(spec: str) -> list[tuple[str, int | None, int | None, int | None, str]]:
    rules = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        point, _, action = item.partition("=")
        head, *quals = point.split(":")
        name, _, step = head.partition("@")
        rank = attempt = None
        for q in quals:
            if q.startswith("r") and q[1:].isdigit():
                rank = int(q[1:])
            elif q.startswith("a") and q[1:].isdigit():
                attempt = int(q[1:])
            else:
                raise ValueError(f"MAESCALE_FAULTS: unknown qualifier {q!r} in {item!r} (use :rRANK or :aATTEMPT)")
        rules.append((name, int(step) if step else None, rank, attempt, action))
    return rules


def _action(name: str, step: int | None) -> str | None:
    spec = os.environ.get("MAESCALE_FAULTS")
    if not spec:
        return None
    rank, attempt = _rank(), int(os.environ.get("MAESCALE_ATTEMPT", "0") or 0)
    found = None
    for rname, rstep, rrank, rattempt, action in _parse(spec):
        if rname != name or (rrank is not None and rrank != rank) or (rattempt is not None and rattempt != attempt):
            continue
        if rstep == step:
            return action
        if rstep is None and found is None:
            found = action
    return found


def maybe_poison(batch, step: int, rank: int = 0):
    """The batch, or a NaN copy of it when ``train.batch@STEP=nan`` (or ``nan:RANK`` for this
    rank) is configured."""
    action = _action("train.batch", step)
    if action == "nan" or action == f"nan:{rank}":
        log.warning("fault injection: NaN batch at step %d on rank %d", step, rank)
        return batch * float("nan")
    return batch


def maybe_poison_data(batch, position: int, rank: int = 0):
    """The batch, or a NaN copy of it when ``data.batch@POSITION=nan`` (or ``nan:RANK``) names the
    ``position``-th micro-batch this rank has drawn (a poisoned stretch of data)."""
    action = _action("data.batch", position)
    if action == "nan" or action == f"nan:{rank}":
        log.warning("fault injection: NaN data at stream position %d on rank %d", position, rank)
        return batch * float("nan")
    return batch


def maybe_poison_grads(grads: list, step: int, rank: int = 0) -> list:
    """``grads`` (this rank's reduced gradient partitions), the first made NaN in place when
    ``train.grads@STEP=nan:RANK`` names this rank: a fault on one rank only, after the reduction,
    which only the guard's all-reduce can make every rank see."""
    action = _action("train.grads", step)
    if grads and action == f"nan:{rank}":
        log.warning("fault injection: NaN gradient partition at step %d on rank %d", step, rank)
        grads[0].fill_(float("nan"))
    return grads


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
    elif action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "hang":
        while True:
            time.sleep(3600)
    else:
        raise ValueError(f"MAESCALE_FAULTS: unknown action {action!r} for {name}")
