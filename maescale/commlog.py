"""The communication recorder: every collective a rank issues while it is on, with what it moves.

:class:`CommRecorder` wraps ``torch.distributed``'s collective functions (and the two DeepSpeed
captured when its backend started, :data:`maescale.compat.DS_CAPTURED_COMM_FUNCTIONS`) for the
duration of a ``with`` block and records each call: the operation, the group ("control" for the
CPU control group, "dp" for the data-parallel group every other collective of a data-parallel job
runs on), the elements and bytes of the tensor handed to it (the input of a reduce-scatter or
reduce, the output of an all-gather, the tensor of an all-reduce or broadcast), whether it was
asynchronous, and when it was issued relative to the step's backward: between the start of its last
micro-batch's backward and backward's last operation, the moment the last parameter gradient
arrived (a tensor hook on every parameter, which runs before the gradient is accumulated and before
anything a post-accumulate hook launches), so a collective launched by the last gradient counts as
issued after backward, as it overlaps nothing. Nothing is synchronised: unlike DeepSpeed's
``comms_logger``, which synchronises after every operation, the recorder leaves the overlap it
measures alone. Off (the default) it costs nothing: nothing is wrapped.

``train.profile_at`` turns it on for the profiled steps (:mod:`maescale.profiling`);
``tools/bench_comm.py`` runs the real loop on W ranks and tabulates it.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from maescale import compat

# torch.distributed function -> (kind, which argument holds the counted tensor(s))
_FUNCTIONS: dict[str, tuple[str, str]] = {
    "all_reduce": ("all_reduce", "tensor"),
    "all_reduce_coalesced": ("all_reduce", "tensors"),
    "reduce": ("reduce", "tensor"),
    "broadcast": ("broadcast", "tensor"),
    "reduce_scatter_tensor": ("reduce_scatter", "input"),
    "reduce_scatter_single": ("reduce_scatter", "input"),
    "_reduce_scatter_base": ("reduce_scatter", "input"),
    "reduce_scatter": ("reduce_scatter", "input_list"),
    "all_gather_into_tensor": ("all_gather", "output_tensor"),
    "all_gather_single": ("all_gather", "output_tensor"),
    "_all_gather_base": ("all_gather", "output_tensor"),
    "all_gather": ("all_gather", "tensor_list"),
    "all_to_all_single": ("all_to_all", "input"),
    "barrier": ("barrier", ""),
}


@dataclass
class CommCall:
    """One recorded collective."""

    step: int
    kind: str
    function: str
    group: str
    elements: int
    bytes: int
    dtype: str
    async_op: bool
    t: float  # time.perf_counter() at issue
    in_backward: bool | None = None  # issued between the start of the step's (last) backward and its last gradient
    backward_left: float | None = None  # the share of that backward still to run when it was issued (0 after it)


_SIGNATURES: dict[str, Any] = {}


def _bind(fn: Callable[..., Any], fn_name: str, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call's arguments by parameter name (signatures cached per function)."""
    import inspect

    sig = _SIGNATURES.get(fn_name)
    if sig is None:
        sig = _SIGNATURES[fn_name] = inspect.signature(fn)
    try:
        return dict(sig.bind_partial(*args, **kwargs).arguments)
    except TypeError:
        return dict(kwargs)


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for t in value if isinstance(t, torch.Tensor)]
    return []


class CommRecorder:
    """Records every collective issued inside ``with recorder:`` (see the module docstring)."""

    def __init__(self, control_group: Any = None):
        self.control_group = control_group
        self.calls: list[CommCall] = []
        self.step = 0
        # step -> (start of the last micro-batch's backward, arrival of its last parameter gradient)
        self.backward: dict[int, tuple[float, float]] = {}
        self._open: float | None = None
        self._last_grad: float | None = None
        self._hooks: list[Any] = []
        self._saved: list[tuple[Any, str, Any]] = []

    # ------------------------------------------------------------------ marks from the step
    def attach(self, model: torch.nn.Module) -> None:
        """Watch ``model``'s parameter gradients arrive (for the end of the backward window)."""
        self._hooks = [p.register_hook(self._grad_arrives) for p in model.parameters() if p.requires_grad]

    def _grad_arrives(self, grad: torch.Tensor) -> None:
        self._last_grad = time.perf_counter()

    def backward_start(self) -> None:
        self._open = time.perf_counter()
        self._last_grad = None

    def backward_end(self) -> None:
        if self._open is not None:
            end = self._last_grad if self._last_grad is not None else time.perf_counter()
            self.backward[self.step] = (self._open, end)
            self._open = None

    # ------------------------------------------------------------------ wrapping
    def __enter__(self) -> "CommRecorder":
        import torch.distributed as dist

        for name, (kind, arg) in _FUNCTIONS.items():
            fn = getattr(dist, name, None)
            if fn is not None:
                self._patch(dist, name, fn, kind, arg)
        backend = compat.deepspeed_comm_backend()
        if backend is not None:
            for attr in compat.DS_CAPTURED_COMM_FUNCTIONS:
                fn = getattr(backend, attr, None)
                if fn is not None and getattr(fn, "__name__", "") in _FUNCTIONS:
                    kind, arg = _FUNCTIONS[fn.__name__]
                    self._patch(backend, attr, fn, kind, arg, fn.__name__)
        return self

    def __exit__(self, *exc: Any) -> None:
        for owner, name, fn in reversed(self._saved):
            setattr(owner, name, fn)
        self._saved = []
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _patch(self, owner: Any, name: str, fn: Callable[..., Any], kind: str, arg: str,
               fn_name: str | None = None) -> None:
        recorder, fn_name = self, fn_name or name

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            recorder._record(fn, fn_name, kind, arg, args, kwargs)
            return fn(*args, **kwargs)

        wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
        wrapper.__name__ = fn_name
        self._saved.append((owner, name, fn))
        setattr(owner, name, wrapper)

    def _record(self, fn: Callable[..., Any], fn_name: str, kind: str, arg: str, args: tuple, kwargs: dict) -> None:
        bound = _bind(fn, fn_name, args, kwargs)
        tensors = _tensors(bound.get(arg)) if arg else []
        group = bound.get("group")
        name = "control" if group is not None and group is self.control_group else "dp"
        self.calls.append(CommCall(self.step, kind, fn_name, name, sum(t.numel() for t in tensors),
                                   sum(t.numel() * t.element_size() for t in tensors),
                                   str(tensors[0].dtype).replace("torch.", "") if tensors else "",
                                   bool(bound.get("async_op", False)), time.perf_counter()))

    # ------------------------------------------------------------------ results
    def finish(self) -> list[CommCall]:
        """The calls, each marked with whether it was issued during its step's backward."""
        for c in self.calls:
            window = self.backward.get(c.step)
            c.in_backward = window is not None and window[0] <= c.t < window[1]
            c.backward_left = 0.0
            if c.in_backward:
                c.backward_left = (window[1] - c.t) / max(window[1] - window[0], 1e-9)
        return self.calls


def summarize_calls(calls: list[CommCall], steps: int) -> dict[str, dict[str, dict[str, float]]]:
    """Per step (averaged over ``steps``), per group and kind: calls, elements, bytes, the share of
    the elements issued during backward (``issued_in_backward``), the element-weighted share of
    backward still to run at issue (``backward_left_at_issue``: what the network can hide behind),
    and blocking calls."""
    out: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(
        lambda: {"calls": 0.0, "elements": 0.0, "bytes": 0.0, "in_backward_elements": 0.0, "left_elements": 0.0,
                 "blocking_calls": 0.0}))
    for c in calls:
        row = out[c.group][c.kind]
        row["calls"] += 1 / steps
        row["elements"] += c.elements / steps
        row["bytes"] += c.bytes / steps
        row["in_backward_elements"] += (c.elements if c.in_backward else 0) / steps
        row["left_elements"] += c.elements * (c.backward_left or 0.0) / steps
        row["blocking_calls"] += (0 if c.async_op else 1) / steps
    result: dict[str, dict[str, dict[str, float]]] = {}
    for group, kinds in out.items():
        result[group] = {}
        for kind, row in kinds.items():
            row = dict(row)
            row["issued_in_backward"] = row.pop("in_backward_elements") / row["elements"] if row["elements"] else 0.0
            row["backward_left_at_issue"] = row.pop("left_elements") / row["elements"] if row["elements"] else 0.0
            result[group][kind] = row
    return result


def format_summary(rank: int, summary: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """Log lines: one per group and kind."""
    lines = []
    for group in sorted(summary):
        for kind, row in sorted(summary[group].items()):
            lines.append(f"rank {rank} {group:<7} {kind:<15} {row['calls']:6.1f} calls/step {row['elements']:14,.0f} "
                         f"elements/step {row['bytes'] / 2**20:10.2f} MiB/step  issued in backward "
                         f"{100 * row['issued_in_backward']:5.1f}% (with {100 * row['backward_left_at_issue']:4.1f}% "
                         f"of it left)  blocking {row['blocking_calls']:.1f}/step")
    return lines


def calls_as_dicts(calls: list[CommCall]) -> list[dict[str, Any]]:
    return [asdict(c) for c in calls]
