"""A rank never goes on training without its launcher.

``torchrun``, ``srun``'s step and submitit start the ranks; when that launcher dies (killed,
crashed, its node agent gone), the ranks are re-parented and nothing would stop them: they would
go on training, and writing the run directory, beside the job that replaces them.
:func:`exit_with_launcher` makes such a rank send itself SIGTERM, which the training loop handles
as any stop signal (checkpoint at the next step boundary, exit); before the loop's handlers are
installed SIGTERM simply ends the process. It watches the parent process id from a daemon
thread (portable, and unlike ``PR_SET_PDEATHSIG`` not fooled by the launcher's spawning thread
exiting). Torch-free: it starts before the heavy imports.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger(__name__)

# Set in a rank's environment by the launchers that own it.
_LAUNCHER_VARS = ("TORCHELASTIC_RUN_ID", "SLURM_STEP_ID", "SUBMITIT_EXECUTOR")


def launched() -> bool:
    """Whether this process was started by a launcher that owns it (torchrun, srun, submitit)."""
    return any(os.environ.get(v) for v in _LAUNCHER_VARS)


def exit_with_launcher(poll_s: float = 1.0, force: bool = False) -> threading.Thread | None:
    """Start the watch (once per process) when launched by a launcher (or ``force``); returns the
    thread, or None when there is nothing to watch (a plain ``python tools/train.py`` may outlive
    its shell under nohup, as users expect)."""
    global _watch
    if _watch is not None:
        return _watch
    if not (force or launched()):
        return None
    parent = os.getppid()
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(poll_s):
            if os.getppid() != parent:
                log.warning("the launcher (pid %d) is gone: stopping (SIGTERM to myself)", parent)
                os.kill(os.getpid(), signal.SIGTERM)
                return

    _watch = threading.Thread(target=watch, name="maescale-parent-watch", daemon=True)
    _watch.start()
    return _watch


_watch: threading.Thread | None = None
