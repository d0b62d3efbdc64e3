"""The real SLURM controller of the tests in this folder: one node, this machine (cluster.sh).

One cluster for all the tests of this folder (package scope): started (and, on a fresh machine,
installed) by the first test that asks for it, stopped once they are done if this session started
it, so that its daemons do not idle beside the rest of the suite. Where it cannot exist (not root,
no apt-get, no network to the Debian mirrors, a slurm.conf that is not ours) every test here is
skipped with the reason, which ``pytest -ra`` lists; a set-up that fails is a test error, with the
daemons' logs.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

CLUSTER_SH = Path(__file__).resolve().parent / "cluster.sh"
SKIP_EXIT = 77  # cluster.sh: this machine cannot have the cluster


@dataclass(frozen=True)
class Cluster:
    """The running test cluster: its one partition and slurmctld's log (read for signal/requeue times)."""

    partition: str = "debug"
    ctld_log: Path = Path("/var/log/slurm/slurmctld.log")


def _cluster_sh(action: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER_SH), action], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="package")
def slurm_cluster() -> Iterator[Cluster]:
    # Generous: on a fresh machine this includes apt-get update + install (~20-60 s).
    proc = _cluster_sh("start", timeout=1200)
    if proc.returncode == SKIP_EXIT:
        reason = next((line[len("SKIP: "):] for line in proc.stderr.splitlines() if line.startswith("SKIP: ")),
                      proc.stderr.strip()[-300:])
        pytest.skip(f"no real SLURM: {reason}")
    if proc.returncode != 0:
        pytest.fail(f"could not start the SLURM test cluster (tests/slurm/cluster.sh start, exit "
                    f"{proc.returncode}):\n{proc.stdout}\n{proc.stderr}", pytrace=False)
    started = "cluster: started" in proc.stdout
    try:
        yield Cluster()
    finally:
        if started:  # a cluster someone else started stays up
            stop = _cluster_sh("stop", timeout=120)
            if stop.returncode != 0:
                print(f"tests/slurm/cluster.sh stop failed ({stop.returncode}): {stop.stderr}")


@pytest.fixture(scope="package")
def slurm_shards(tmp_path_factory) -> str:
    """96 smooth 40x40 PNG images in 4 real tar shards (brace pattern), as the e2e tests use."""
    from tests.helpers import write_shards

    return write_shards(tmp_path_factory.mktemp("slurm_shards"), num_images=96, per_shard=24, size=40)


@pytest.fixture
def jobs() -> Iterator[list[str]]:
    """Job ids a test submitted; whatever still runs at its end is cancelled (a failed test must
    not leave the one-node cluster busy for the next)."""
    submitted: list[str] = []
    yield submitted
    for job in submitted:
        if _state(job) not in ENDED:
            subprocess.run(["scancel", job], capture_output=True, timeout=60)


ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED")


def _state(job: str) -> str:
    import re

    proc = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=60)
    found = re.search(r"JobState=(\S+)", proc.stdout)
    return found.group(1) if found else ""


@pytest.fixture(autouse=True)
def _one_worker(request: pytest.FixtureRequest) -> None:
    """Under pytest-xdist these tests must all run on one worker (one cluster, jobs timed against each
    other): ``--dist loadgroup`` marks their ids with the group, and without it they fail here."""
    if os.environ.get("PYTEST_XDIST_WORKER") and not request.node.nodeid.endswith("@slurm"):
        pytest.fail("the real-SLURM tests are not grouped on one pytest-xdist worker: run with "
                    "`--dist loadgroup` (make test does) and pytest < 9.2 (pyproject.toml's test extra)",
                    pytrace=False)
