"""Gradient and parameter communication of maescale's ZeRO-1 step.

DeepSpeed's ZeRO-1 keeps, per AdamW parameter group, one flat 16-bit buffer the model's
parameters live in (``bit16_groups_flat``), split into one equal partition per data-parallel rank,
and an fp32 master copy of this rank's partition that the client AdamW updates. Everything else
of a step is here (:class:`FlatGradSync`), arranged so that a 128-rank job moves the least data,
as early as possible:

* **Gradients live in flat buffers of the same layout.** Each parameter's ``.grad`` is a view
  into a per-group buffer laid out exactly like the group's parameter buffer, so backward writes
  (and accumulates, over micro-batches) straight into it: no per-parameter copy, cat or
  ``p.data`` bookkeeping per step.
* **Reduce-scatter in buckets, during backward.** maescale builds the param groups as buckets in
  backward order (:func:`maescale.optim.param_groups`); a post-accumulate-grad hook per parameter
  counts arrivals, and when a bucket is complete on the last micro-batch its buffer is
  reduce-scattered (``reduce_scatter_single``, asynchronous) while backward goes on with the
  layers below. Each rank receives exactly its partition: P elements leave each rank per step, the
  reduce-scatter volume, not an all-reduce's 2P. Buckets are issued strictly in group order on
  every rank (a bucket that completes early waits for its predecessors), so all ranks enter the
  same collectives in the same order whatever order the hooks fire in; buckets whose parameters
  got no gradient are issued, in order, once backward returns.
* **Parameters come back by all-gather, awaited layer by layer.** After the update each rank's
  new partition is all-gathered into the group's flat buffer asynchronously, in forward order
  (the group of biases and norms first, then the buckets from the input layers up); the model
  waits for a bucket only right before the first layer that uses it
  (:meth:`FlatGradSync.await_module`, which the model calls per layer), so the gathers of later layers overlap the next
  forward. Checkpoints, evaluation and anything else that reads the weights call
  :meth:`FlatGradSync.wait_params` first.

On NCCL an asynchronous collective's ``wait()`` only makes the compute stream wait, so none of
this blocks the host. On gloo (CPU tests) the calls are the same; gloo carries out a
reduce-scatter as an all-reduce internally, so only the calls, not the bytes on the wire, match a
GPU job there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from maescale import compat

log = logging.getLogger(__name__)


@dataclass
class _Bucket:
    """One DeepSpeed param group seen as a communication bucket."""

    index: int
    group: compat.ZeroGroup
    grad: torch.Tensor  # flat gradient buffer, same layout and dtype as ``group.flat``
    shard: torch.Tensor  # this rank's reduced partition (output of the reduce-scatter)
    params: list[nn.Parameter]
    pending: int = 0  # parameters whose gradient has not arrived on this (last) micro-batch
    launched: bool = False
    reduce_work: Any = None
    gather_work: Any = None
    name: str = ""
    numel: int = field(default=0)


class FlatGradSync:
    """Flat gradient buffers, bucketed reduce-scatter from backward hooks, and the parameter
    all-gather of maescale's ZeRO-1 step (see the module docstring).

    ``zero_optimizer`` is DeepSpeed's ZeRO-1 optimizer (``engine.optimizer``); ``group_names``
    names its groups (for logs and the communication recorder).
    """

    def __init__(self, zero_optimizer: Any, group_names: list[str] | None = None):
        self.zero = zero_optimizer
        groups = compat.zero_groups(zero_optimizer)
        self.world = max(1, dist.get_world_size(groups[0].process_group)) if dist.is_initialized() else 1
        self.rank = dist.get_rank(groups[0].process_group) if dist.is_initialized() else 0
        self.buckets: list[_Bucket] = []
        self._bucket_of: dict[int, int] = {}  # id(param) -> bucket index
        for i, g in enumerate(groups):
            grad = torch.zeros_like(g.flat)
            shard = torch.empty_like(g.partitions[self.rank])
            b = _Bucket(i, g, grad, shard, list(g.params), name=(group_names or [])[i] if group_names else f"group{i}",
                        numel=sum(p.numel() for p in g.params))
            self.buckets.append(b)
            for p in g.params:
                self._bucket_of[id(p)] = i
        self._views: dict[int, torch.Tensor] = {}
        self._module_buckets: dict[tuple[int, bool], tuple[int, ...]] = {}
        self._bind_grads()
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad)
                       for b in self.buckets for p in b.params]
        self._last_micro = False
        self._next_launch = 0
        # All-gathers in forward order: the group of biases and norms (used by every layer) first,
        # then the buckets from the input layers up (they are built in backward order).
        order = sorted(self.buckets, key=lambda b: b.index)
        self._gather_order = [b for b in order if b.name.startswith("no_decay")] + \
            [b for b in reversed(order) if not b.name.startswith("no_decay")]
        self.on_issue: Callable[[str, _Bucket], None] | None = None  # the recorder's hook (tests, profiling)

    # ------------------------------------------------------------------ gradients
    def _bind_grads(self) -> None:
        """Make every parameter's ``.grad`` a view into its bucket's flat gradient buffer, at the
        offset its data has in the parameter buffer (DeepSpeed's layout, padding included)."""
        for b in self.buckets:
            base = b.group.flat
            itemsize = base.element_size()
            for p in b.params:
                offset = (p.data_ptr() - base.data_ptr()) // itemsize
                if not 0 <= offset <= base.numel() - p.numel():
                    raise RuntimeError(f"parameter of shape {tuple(p.shape)} does not live in its group's flat buffer "
                                       "(DeepSpeed's ZeRO layout changed? see maescale/compat.py)")
                view = b.grad.narrow(0, offset, p.numel()).view_as(p)
                p.grad = view
                self._views[id(p)] = view

    def start_micro_batch(self, last: bool) -> None:
        """Before each micro-batch's backward: ``last`` marks the accumulation boundary, whose
        backward reduces the buckets as they complete."""
        self._last_micro = last
        if last:
            self._next_launch = 0
            for b in self.buckets:
                b.pending, b.launched, b.reduce_work = len(b.params), False, None

    def _on_grad(self, p: nn.Parameter) -> None:
        view = self._views[id(p)]
        if p.grad is not view:  # someone replaced or cleared .grad (zero_grad(set_to_none)): fold it back
            if p.grad is not None:
                view.add_(p.grad)
            p.grad = view
        if not self._last_micro:
            return
        b = self.buckets[self._bucket_of[id(p)]]
        b.pending -= 1
        if b.pending == 0:
            self._launch_ready()

    def _launch_ready(self) -> None:
        while self._next_launch < len(self.buckets) and self.buckets[self._next_launch].pending <= 0:
            self._launch(self.buckets[self._next_launch])
            self._next_launch += 1

    def _launch(self, b: _Bucket) -> None:
        b.launched = True
        if self.on_issue is not None:
            self.on_issue("reduce_scatter", b)
        if self.world == 1:
            b.shard.copy_(b.grad)
            return
        # Looked up per call (not once): the communication recorder wraps torch.distributed while it runs.
        reduce_scatter = compat.reduce_scatter_function()
        b.reduce_work = reduce_scatter(b.shard, b.grad, group=b.group.process_group, async_op=True)

    def finish_backward(self) -> None:
        """After the last micro-batch's backward: issue, in order, the buckets that are still
        waiting (parameters that got no gradient this step)."""
        for b in self.buckets[self._next_launch:]:
            b.pending = 0
        self._launch_ready()

    def reduced(self) -> list[torch.Tensor]:
        """Wait for the reduce-scatters; returns this rank's summed gradient partition per group
        (not yet divided by the world size) and zeroes the flat buffers for the next step."""
        for b in self.buckets:
            if not b.launched:
                raise RuntimeError("FlatGradSync.reduced() before finish_backward(): a bucket was never reduced")
            if b.reduce_work is not None:
                b.reduce_work.wait()
                b.reduce_work = None
        for b in self.buckets:  # the next step accumulates from zero
            b.grad.zero_()
        return [b.shard for b in self.buckets]

    # ------------------------------------------------------------------ parameters
    def gather_params(self) -> None:
        """After the update: all-gather every group's new partitions (asynchronously, forward order)."""
        all_gather = compat.all_gather_function()
        for b in self._gather_order:
            if self.on_issue is not None:
                self.on_issue("all_gather", b)
            if self.world > 1:
                b.gather_work = all_gather(b.group.flat, b.group.partitions[self.rank], group=b.group.process_group,
                                           async_op=True)

    def await_module(self, module: nn.Module, recurse: bool = True) -> None:
        """Wait for the all-gathers of the buckets holding ``module``'s parameters (the forward
        calls this right before each layer; a no-op once they have arrived)."""
        key = (id(module), recurse)
        indices = self._module_buckets.get(key)
        if indices is None:
            indices = tuple(sorted({self._bucket_of[id(p)] for p in module.parameters(recurse=recurse)
                                    if id(p) in self._bucket_of}))
            self._module_buckets[key] = indices
        for i in indices:
            b = self.buckets[i]
            if b.gather_work is not None:
                b.gather_work.wait()
                b.gather_work = None

    def wait_params(self) -> None:
        """Wait for every pending all-gather (before a checkpoint, evaluation, or the end)."""
        for b in self.buckets:
            if b.gather_work is not None:
                b.gather_work.wait()
                b.gather_work = None

    def close(self) -> None:
        """Wait for what is in flight and remove the hooks."""
        self.wait_params()
        for b in self.buckets:
            if b.reduce_work is not None:
                b.reduce_work.wait()
        for h in self._hooks:
            h.remove()
        self._hooks = []
