"""Which hosts a failed job should be requeued without, and whether the cluster can still run it.

Leaving a node out costs a trip through the queue (SLURM holds a requeued job for 120 s, then it
waits for nodes), while a restart inside the allocation costs seconds. Most failures are not the
node's (a software error, a peer's lost connection, a kill by the OOM killer), so a host is left
out only when

* the failure reads as the node's own (SLURM's node failure, a GPU's ECC or Xid error, a GPU
  that fell off the bus), or
* the same host was named by an earlier failure of this job (a second strike),

and only when the partition keeps enough usable nodes without it (and without the hosts the job
already excludes): otherwise the requeued job would wait forever, and a restart inside the
allocation is the better bet. The job's ``ExcNodeList`` grows; the user's own ``--exclude`` and
earlier exclusions stay in it.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

# What a node's own failure looks like in srun's errors or a task's last error.
NODE_FAULT = re.compile(r"node fail|NODE_FAIL|uncorrectable ECC|ECC error|\bXid\b|fallen off the bus|GPU is lost|"
                        r"no CUDA-capable device", re.IGNORECASE)
# sinfo's node states (``%t``) in which a node will not take a job.
UNUSABLE_STATES = ("down", "drain", "drng", "fail", "failg", "maint", "inval", "futr", "npc", "boot", "pow", "resv")

Query = Callable[[list[str]], str]


def run_query(cmd: list[str]) -> str:
    """Run a SLURM query command and return its output (raises on failure or after 60 s)."""
    return subprocess.run(cmd, check=True, timeout=60, capture_output=True, text=True).stdout


def is_node_fault(texts: Iterable[str | None]) -> bool:
    """Whether any of ``texts`` (srun's errors, the culprit's own error) names a node's failure."""
    return any(t and NODE_FAULT.search(t) for t in texts)


def struck_before(history: Sequence[dict[str, Any]]) -> set[str]:
    """Hosts named by an earlier failure (a restart, requeue or stop event) of this job."""
    return {h for event in history for h in (event.get("hosts") or []) + (event.get("excluded") or [])}


def expand(hostlist: str, query: Query = run_query) -> list[str]:
    """``node[017,023]`` -> ``["node017", "node023"]`` (``scontrol show hostnames``)."""
    if not hostlist or hostlist in ("(null)", "None"):
        return []
    return query(["scontrol", "show", "hostnames", hostlist]).split()


def job_fields(job_id: str, query: Query = run_query) -> dict[str, str]:
    """``scontrol show job`` as a dict (``Partition``, ``ExcNodeList``, ``NumNodes`` ...)."""
    text = query(["scontrol", "show", "job", "--oneliner", job_id])
    return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", text))


def usable_nodes(partition: str, query: Query = run_query) -> set[str]:
    """The partition's nodes that can take a job (not down, drained, failing or reserved)."""
    out = query(["sinfo", "--noheader", "--Node", "--partition", partition, "--format", "%N %t"])
    nodes = set()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and not parts[1].rstrip("*~#!%$@^-").lower().startswith(UNUSABLE_STATES):
            nodes.add(parts[0])
    return nodes


@dataclass
class Exclusion:
    """What to do about the hosts a failure named: ``exclude`` is the job's whole new
    ``ExcNodeList`` (``None``: restart inside the allocation instead); ``why`` says which rule."""

    exclude: list[str] | None
    why: str


def plan_exclusion(job_id: str, nodes_needed: int, hosts: Sequence[str], node_fault: bool,
                   history: Sequence[dict[str, Any]], query: Query = run_query) -> Exclusion:
    """Decide whether to requeue ``job_id`` without ``hosts`` (see the module docstring)."""
    if not hosts:
        return Exclusion(None, "the failure names no host")
    repeat = sorted(set(hosts) & struck_before(history))
    if not node_fault and not repeat:
        return Exclusion(None, f"the first failure on {','.join(hosts)} that does not read as the node's own")
    why = "the node's own failure" if node_fault else f"{','.join(repeat)} failed before in this job"
    try:
        fields = job_fields(job_id, query)
        excluded = set(expand(fields.get("ExcNodeList", ""), query)) | set(expand(",".join(hosts), query))
        usable = usable_nodes(fields["Partition"], query) - excluded
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError, KeyError) as exc:
        return Exclusion(None, f"{why}, but SLURM could not be asked what the partition has left ({exc})")
    if len(usable) < nodes_needed:
        return Exclusion(None, f"{why}, but partition {fields['Partition']} would keep {len(usable)} usable node(s) "
                         f"without {','.join(sorted(excluded))} and the job needs {nodes_needed}")
    return Exclusion(sorted(excluded), why)


def exclusion_commands(job_id: str, exclude: Sequence[str]) -> list[list[str]]:
    """Requeue ``job_id`` with ``ExcNodeList`` set to ``exclude``: hold it on its way back to the
    queue, update it while it is pending, release it (SLURM then holds it for BeginTime)."""
    return [["scontrol", "requeuehold", job_id],
            ["scontrol", "update", f"JobId={job_id}", f"ExcNodeList={','.join(exclude)}"],
            ["scontrol", "release", job_id]]
