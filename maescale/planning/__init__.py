"""The plan of a run before it is submitted (``tools/plan.py``, ``tools/submit.py --dry-run``):
length, time and cost, GPU memory, data. Torch-free except for the decoded image sample.

:mod:`maescale.planning.plan` assembles and prints it from :mod:`~maescale.planning.rates`
(measured per-GPU rates), :mod:`maescale.scaling` (communication at a node count),
:mod:`~maescale.planning.memory` (memory per GPU) and :mod:`~maescale.planning.data` (shards,
split, decode); :mod:`~maescale.planning.cli` is the command line,
:mod:`~maescale.planning.scaling_doc` writes ``bench/SCALING.md``.
"""
