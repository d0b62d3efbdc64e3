"""Developer tools used by ``tools/`` and the tests, never by a training job: step and data
benchmarks (:mod:`.bench`, :mod:`.data_bench`), memory accounting (:mod:`.memory`), the
preemption soak (:mod:`.soak`) and reconstruction pictures of a checkpoint (:mod:`.visualize`).
The core package (everything else under ``maescale/``) imports nothing from here; a test checks it.
"""
