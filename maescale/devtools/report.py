"""Docs from data: the measured figures of the docs, generated from the committed JSON under ``bench/``.

A doc holds a generated block between two markers; everything between them belongs to this module
(``tools/report.py --write`` rewrites it, ``--check`` fails when it differs)::

    <!-- report:NAME -->
    ...generated table...
    <!-- /report:NAME -->

Both markers on one line make an *inline* block, for a figure inside a sentence:
``... <!-- report:NAME -->8 kills survived ...<!-- /report:NAME --> ...``. Prose outside the markers
stays hand-written. The docs searched for markers are the repository's top-level ``*.md`` and
``bench/**/*.md`` (:data:`DOC_GLOBS`); a block name appears once in all of them.

Every block names its sources by construction: a block function reads files only through
:class:`Bench` (``bench.json(path)``, ``bench.cite(path)``), which records them, and :func:`render`
appends them: a table block ends with a ``*Source: ...*`` line giving each file with the device,
date and versions its JSON records (a folder's ``env.json`` describes every file beside it); an
inline block ends with the file names in brackets.

Adding a table (a scaling table, a future ``bench/comm*.json``) is one function in one place::

    @block("comm")
    def _comm(bench: Bench) -> str:
        doc = bench.json("bench/comm.json")          # recorded as a source; missing -> clear error
        rows = [[r["op"], f"{r['gb_per_s']:.1f}"] for r in doc["results"]]
        return table(["collective", "GB/s"], "lr", rows)

in this module, next to its peers (the registry fills at import), then put ``<!-- report:comm -->``
and ``<!-- /report:comm -->`` (on lines of their own) where it goes in a doc and run
``python tools/report.py --write``. Helpers: :func:`table`, :func:`num`, :func:`pct`, :func:`span`
(a range over runs), :func:`spread`; for the GPU check's runs :func:`gpu_rows` (every measured
variant of every run, with its window range) and :func:`best_rates` (the fastest bare step and loop),
which a scaling table can build on. ``tests/test_report.py`` then keeps the doc in
step with the JSON. A registered block that no doc places, a marker naming no registered block, a
begin marker without its end and a name used twice are errors that name the file and line.
Figures must come from the JSON (or from code, like the analytic FLOPs); a number typed into a
block function is exactly the drift this module exists to prevent.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

DOC_GLOBS = ("*.md", "bench/**/*.md")
_MARK = re.compile(r"<!-- (/?)report:([A-Za-z0-9_.-]+) -->")

BlockFn = Callable[["Bench"], str]
BLOCKS: dict[str, BlockFn] = {}


class ReportError(Exception):
    """A doc, a marker or an input file that the report cannot use; the message says which and why."""


def block(name: str) -> Callable[[BlockFn], BlockFn]:
    """Register ``fn(bench) -> markdown`` as the generator of the doc block ``name``."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"block name {name!r}: use letters, digits, '-', '_' or '.'")

    def register(fn: BlockFn) -> BlockFn:
        if name in BLOCKS:
            raise ValueError(f"block {name!r} is registered twice ({BLOCKS[name].__name__}, {fn.__name__})")
        BLOCKS[name] = fn
        return fn
    return register


# --- reading the committed outputs -----------------------------------------------------------

@dataclass
class Bench:
    """Read access to the repository's committed outputs, recording every file a block reads."""

    root: Path
    _cache: dict[str, Any] = field(default_factory=dict)
    used: list[tuple[str, str | None]] = field(default_factory=list)  # (path, key) in first-use order
    cited: dict[str, str] = field(default_factory=dict)  # path -> what it is, for non-JSON sources

    def json(self, path: str, key: str | None = None) -> Any:
        """The JSON at ``path`` (relative to the repository root), or its top-level ``key``.

        The file (and the key) becomes a source of the block being rendered."""
        if path not in self._cache:
            file = self.root / path
            if not file.is_file():
                raise ReportError(f"{path}: not found (the block reads it; commit the benchmark's JSON there)")
            try:
                self._cache[path] = json.loads(file.read_text())
            except json.JSONDecodeError as e:
                raise ReportError(f"{path}: not valid JSON ({e})") from None
        doc = self._cache[path]
        if key is not None:
            if not isinstance(doc, dict) or key not in doc:
                raise ReportError(f"{path}: has no top-level key {key!r}")
            doc = doc[key]
        if (path, key) not in self.used:
            self.used.append((path, key))
        return doc

    def glob(self, pattern: str) -> list[str]:
        """Paths (relative, sorted) of the files matching ``pattern`` under the root."""
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.glob(pattern) if p.is_file())

    def cite(self, path: str, what: str) -> None:
        """Record a source that is not a JSON file (code, for analytic figures)."""
        self.cited[path] = what

    def reset(self) -> None:
        self.used, self.cited = [], {}


def _cudnn(v: Any) -> str:
    if isinstance(v, int):
        return f"{v // 10000}.{v % 10000 // 100}.{v % 100}"
    return str(v)


_VERSIONS = (("python", "Python"), ("torch", "torch"), ("torchvision", "torchvision"), ("cuda", "CUDA"),
             ("cudnn", "cuDNN"), ("deepspeed", "DeepSpeed"), ("timm", "timm"), ("pillow", "Pillow"))


def provenance(doc: Any, folder_env: dict | None = None) -> str:
    """Device, date and versions that a benchmark JSON records (``""`` when it records none).

    Looked for in the document's ``env`` / ``machine`` / ``meta`` (and ``versions``) sections, its runs' ``env``, and
    ``folder_env`` (the ``env.json`` beside the file), the document's own values first."""
    env: dict[str, Any] = dict(folder_env or {})
    dates: list[str] = []
    if isinstance(doc, dict):
        runs = doc.get("runs") if isinstance(doc.get("runs"), list) else []
        meta = doc.get("meta") if isinstance(doc.get("meta"), dict) else {}
        parts = [r.get("env") for r in runs if isinstance(r, dict)] + [
            doc.get("env"), doc.get("machine"), meta, meta.get("versions"), doc.get("versions"), doc]
        for part in parts:
            if isinstance(part, dict):
                env.update({k: v for k, v in part.items() if v is not None and not isinstance(v, (dict, list))})
        dates = [str(r["date"]) for r in runs if isinstance(r, dict) and r.get("date")]
        dates += [str(d["date"]) for d in (doc, meta) if d.get("date")]
    if not dates and env.get("date"):
        dates = [str(env["date"])]
    days = sorted({d[:10] for d in dates})
    parts = []
    device = env.get("device_name") or (env.get("device") if env.get("device") not in (None, "cpu", "cuda") else None)
    cpu, cores = env.get("cpu"), env.get("cores")
    if device and cpu and cpu != device:
        parts.append(f"{device} ({cores}-core {cpu} host)" if cores else f"{device} ({cpu} host)")
    elif device or cpu:
        parts.append(f"{device or cpu}, {cores} cores" if cores else str(device or cpu))
    if days:
        parts.append(days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}")
    parts += [f"{label} {_cudnn(env[k]) if k == 'cudnn' else env[k]}" for k, label in _VERSIONS if env.get(k)]
    return ", ".join(parts)


def _paths(files: list[tuple[str, str | None]]) -> str:
    """``bench/h200/{env,bare}.json``, ``bench/data_results.json`` (key ``gpu_decode``): short names of files."""
    by_dir: dict[tuple[str, str | None], list[str]] = {}
    out = []
    for path, key in files:
        if key is None and path.endswith(".json") and "/" in path:
            by_dir.setdefault((path.rsplit("/", 1)[0], None), []).append(path.rsplit("/", 1)[1][:-5])
        else:
            out.append(f"`{path}`" + (f" (key `{key}`)" if key else ""))
    grouped = [f"`{folder}/{stems[0]}.json`" if len(stems) == 1 else f"`{folder}/{{{','.join(stems)}}}.json`"
               for (folder, _), stems in by_dir.items()]
    return ", ".join(grouped + out)


def _sources_line(bench: Bench) -> str:
    """``*Source: ...*``: the files a block read, grouped by what they record."""
    groups: dict[str, list[tuple[str, str | None]]] = {}
    for path, key in bench.used:
        doc = bench._cache[path]
        env_path = str(Path(path).parent / "env.json")
        folder_env = None
        if env_path != path and (bench.root / env_path).is_file():
            folder_env = json.loads((bench.root / env_path).read_text())
        groups.setdefault(provenance(doc[key] if key else doc, folder_env), []).append((path, key))
    parts = [_paths(files) + (f": {prov}" if prov else " (records no device, date or versions)")
             for prov, files in groups.items()]
    parts += [f"`{path}` ({what})" for path, what in bench.cited.items()]
    return "*Source: " + "; ".join(parts) + ". Generated by `tools/report.py` from the committed files.*"


def render(name: str, bench: Bench, inline: bool = False) -> str:
    """The text of block ``name`` with its sources: a ``*Source*`` line (table) or ``(`file`)`` (inline)."""
    if name not in BLOCKS:
        raise ReportError(f"no block {name!r} is registered (known: {', '.join(sorted(BLOCKS))})")
    bench.reset()
    text = BLOCKS[name](bench).strip("\n")
    if not bench.used and not bench.cited:
        raise ReportError(f"block {name!r} read no file: every generated figure needs a source")
    if inline:
        if "\n" in text:
            raise ReportError(f"block {name!r} is placed inline but generates several lines")
        names = [p for p, _ in bench.used] + list(bench.cited)
        return f"{text} ({', '.join(f'`{p}`' for p in dict.fromkeys(names))})"
    return f"{text}\n\n{_sources_line(bench)}"


# --- finding and replacing blocks in the docs ------------------------------------------------

@dataclass(frozen=True)
class Placed:
    """One block's place in a doc: the text between its markers is ``text[start:end]``."""

    doc: str
    name: str
    line: int
    start: int
    end: int
    inline: bool


def doc_paths(root: Path) -> list[str]:
    """The docs searched for markers (:data:`DOC_GLOBS`), relative to ``root``."""
    found: set[str] = set()
    for pattern in DOC_GLOBS:
        found.update(p.relative_to(root).as_posix() for p in root.glob(pattern) if p.is_file())
    return sorted(found)


def find_blocks(text: str, doc: str) -> list[Placed]:
    """The blocks in one doc's ``text`` (markers checked: paired, not nested, in order)."""
    out: list[Placed] = []
    open_: tuple[str, int, int] | None = None  # name, line, end of the begin marker
    for m in _MARK.finditer(text):
        closing, name = m.group(1) == "/", m.group(2)
        line = text.count("\n", 0, m.start()) + 1
        if not closing:
            if open_:
                raise ReportError(f"{doc}:{line}: <!-- report:{name} --> inside block {open_[0]!r} "
                                  f"(opened on line {open_[1]}); close it first with <!-- /report:{open_[0]} -->")
            open_ = (name, line, m.end())
            continue
        if not open_ or open_[0] != name:
            expected = f"<!-- /report:{open_[0]} -->" if open_ else "a begin marker before it"
            raise ReportError(f"{doc}:{line}: <!-- /report:{name} --> does not close an open block "
                              f"(expected {expected})")
        start, end = open_[2], m.start()
        inline = open_[1] == line
        if not inline and not (text[start] == "\n" and text[end - 1] == "\n"):
            raise ReportError(f"{doc}:{open_[1]}: block {name!r}: put each marker on a line of its own, "
                              f"or both on one line for an inline block")
        out.append(Placed(doc, name, open_[1], start, end, inline))
        open_ = None
    if open_:
        raise ReportError(f"{doc}:{open_[1]}: <!-- report:{open_[0]} --> has no <!-- /report:{open_[0]} -->")
    return out


@dataclass
class Difference:
    """A block whose text in the doc is not what the JSON gives."""

    doc: str
    name: str
    line: int
    current: str
    expected: str

    def diff(self, context: int = 1) -> str:
        """A unified diff, doc text against the generated text."""
        return "\n".join(difflib.unified_diff(self.current.splitlines(), self.expected.splitlines(),
                                              f"{self.doc} (block {self.name})", "generated", n=context, lineterm=""))


def _placed(root: Path, only: Iterable[str] | None = None) -> dict[str, tuple[str, list[Placed]]]:
    docs = {}
    seen: dict[str, Placed] = {}
    for doc in doc_paths(root):
        text = (root / doc).read_text()
        blocks = find_blocks(text, doc)
        for b in blocks:
            if b.name in seen:
                first = seen[b.name]
                raise ReportError(f"{doc}:{b.line}: block {b.name!r} is already placed at {first.doc}:{first.line}; "
                                  f"a block appears once")
            if b.name not in BLOCKS:
                raise ReportError(f"{doc}:{b.line}: no block {b.name!r} is registered in maescale/devtools/report.py "
                                  f"(known: {', '.join(sorted(BLOCKS))})")
            seen[b.name] = b
        if blocks:
            docs[doc] = (text, blocks)
    wanted = set(BLOCKS) if only is None else set(only)
    missing = sorted(wanted - set(seen))
    if missing:
        raise ReportError(f"block(s) {', '.join(missing)} registered but placed in no doc: add "
                          f"<!-- report:NAME --> / <!-- /report:NAME --> where each goes ({', '.join(DOC_GLOBS)})")
    return docs


def _expected(b: Placed, bench: Bench) -> str:
    body = render(b.name, bench, b.inline)
    return body if b.inline else f"\n{body}\n"


def check(root: str | Path) -> list[Difference]:
    """Every block whose text in its doc differs from what the committed JSON under ``root`` gives."""
    root = Path(root)
    bench = Bench(root)
    diffs = []
    for doc, (text, blocks) in _placed(root).items():
        for b in blocks:
            want = _expected(b, bench)
            if text[b.start:b.end] != want:
                diffs.append(Difference(doc, b.name, b.line, text[b.start:b.end].strip("\n"), want.strip("\n")))
    return diffs


def write(root: str | Path) -> list[str]:
    """Rewrite every block from the JSON; returns ``doc: block`` for each block that changed."""
    from maescale.rundir import write_text_atomic

    root = Path(root)
    bench = Bench(root)
    changed = []
    for doc, (text, blocks) in _placed(root).items():
        out, pos = [], 0
        for b in blocks:
            want = _expected(b, bench)
            if text[b.start:b.end] != want:
                changed.append(f"{doc}: {b.name}")
            out += [text[pos:b.start], want]
            pos = b.end
        new = "".join(out) + text[pos:]
        if new != text:
            write_text_atomic(root / doc, new)
    return changed


# --- formatting ------------------------------------------------------------------------------

def table(header: list[str], align: str, rows: list[list[str]]) -> str:
    """A markdown table; ``align`` has one letter per column, ``l`` or ``r``."""
    if len(align) != len(header) or any(len(r) != len(header) for r in rows):
        raise ValueError("table: every row needs one cell per header column and one align letter")
    rule = ["---:" if a == "r" else "---" for a in align]
    return "\n".join("| " + " | ".join(r) + " |" for r in [header, rule, *rows])


def num(x: float | None, digits: int = 0) -> str:
    """``1,240`` / ``0.95``; ``-`` for a missing value."""
    return "-" if x is None else f"{x:,.{digits}f}"


def pct(x: float | None, digits: int = 1) -> str:
    """``36.5%`` from 0.365; ``-`` for a missing value."""
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def span(values: Iterable[float], digits: int = 0, sep: str = "-") -> str:
    """``597-699`` for several values, ``636`` for one (or several equal when rounded)."""
    vals = sorted(values)
    lo, hi = num(vals[0], digits), num(vals[-1], digits)
    return lo if lo == hi else f"{lo}{sep}{hi}"


def spread(values: Iterable[float]) -> float:
    """(largest - smallest) / smallest."""
    vals = list(values)
    return (max(vals) - min(vals)) / min(vals)


def bold(text: str, on: bool = True) -> str:
    """``**text**`` when ``on``."""
    return f"**{text}**" if on else text


# --- analytic FLOPs --------------------------------------------------------------------------

@block("flops")
def _flops(bench: Bench) -> str:
    from maescale.flops import breakdown_table

    bench.cite("maescale/flops.py", "analytic, `python -m maescale.flops`")
    return f"```\n{breakdown_table()}\n```"


# --- CPU step speed and memory (tools/bench_model.py) ----------------------------------------

CPU_BENCH = "bench/bench_model_cpu.json"
_SHORT = {"mae_vit_tiny_patch4": "tiny", "mae_vit_mini_patch8": "mini", "mae_vit_base_patch16": "ViT-B",
          "mae_vit_large_patch16": "ViT-L", "mae_vit_huge_patch14": "ViT-H", "mae_vit_giant_patch14": "ViT-g"}


def _speed_runs(bench: Bench, path: str = CPU_BENCH) -> list[list[dict]]:
    runs = [[r for r in run["results"] if r.get("status") == "ok"]
            for run in bench.json(path)["runs"] if run.get("kind") == "speed"]
    return [r for r in runs if r]


@block("cpu-speed")
def _cpu_speed(bench: Bench) -> str:
    head = (f"{'preset':<22}{'px':>4}{'mb':>5} {'variant':<24}{'ms/step':>9}{'range ms':>14}{'img/s':>9}{'vs 1st':>7}"
            f"{'model TF/s':>11}{'hw TF/s':>9}{'1st s':>7}")
    lines = [head]
    for i, results in enumerate(_speed_runs(bench)):
        if i:
            lines.append("")
        first = results[0]
        for r in results:
            rng = f"{r['step_ms_min']:.1f}-{r['step_ms_max']:.1f}"
            lines.append(f"{r['preset']:<22}{r['img_size']:>4}{r['micro_batch']:>5} {r['variant']:<24}"
                         f"{r['step_ms']:>9.1f}{rng:>14}{r['images_per_s']:>9.1f}"
                         f"{r['images_per_s'] / first['images_per_s']:>7.2f}{r['model_tflops']:>11.3f}"
                         f"{r['hardware_tflops']:>9.3f}{r['first_step_s']:>7.1f}")
    reps = sorted({r["repeats"] for run in _speed_runs(bench) for r in run})
    loads = [r["extra"][k] for run in _speed_runs(bench) for r in run for k in ("loadavg_before", "loadavg_after")
             if k in r.get("extra", {})]
    return ("```\n" + "\n".join(lines) + "\n```\n\n"
            f"*ms/step*: median of {'/'.join(map(str, reps))} timed steps; *range ms*: fastest and slowest of them. "
            + (f"1-min load average {span(loads, 1)} around the variants." if loads else ""))


@block("readme-cpu-speed")
def _readme_cpu_speed(bench: Bench) -> str:
    rows = []
    for results in _speed_runs(bench):
        by = {r["variant"]: r for r in results}
        base = by.get("sdpa")
        if base is None:
            continue

        def rel(v: str) -> str:
            return f"{by[v]['images_per_s'] / base['images_per_s']:.2f}x" if v in by else "-"
        rows.append([f"{_SHORT.get(base['preset'], base['preset'])} {base['img_size']} px, {base['micro_batch']}",
                     num(base["images_per_s"], 1 if base["images_per_s"] < 10 else 0),
                     rel("math"), rel("sdpa+compile"), rel("sdpa+ckpt1")])
    return table(["model, batch", "sdpa img/s", "math", "sdpa + compile", "sdpa + checkpointing"], "lrrrr", rows)


def _memory_rows(bench: Bench) -> list[dict]:
    runs = [run for run in bench.json(CPU_BENCH)["runs"] if run.get("kind") == "memory"]
    if not runs:
        raise ReportError(f"{CPU_BENCH}: no run of kind 'memory' (tools/bench_model.py --memory)")
    return runs[-1]["rows"]


@block("memory")
def _memory(bench: Bench) -> str:
    rows = _memory_rows(bench)
    r0 = rows[0]
    head = (f"{'preset':<24}{'params':>8}{'ckpt':>5}{'saved':>9}{'peak':>9}"
            + "".join(f"{f'states z{s}':>11}" for s in range(4)) + "".join(f"{f'max mb z{s}':>10}" for s in range(4)))
    lines = [f"activations in MiB/image ({r0['dtype']}, {r0['img_size']} px, mask {r0['mask_ratio']}); model states "
             f"in GiB/GPU at world size {r0['world_size']}; max micro-batch on {r0['gpu_gib']:g} GiB minus "
             f"{r0['reserve_gib']:g} GiB reserve", head]
    for r in rows:
        lines.append(f"{r['preset']:<24}{r['params'] / 1e6:>7.0f}M{r['act_ckpt_every']:>5}"
                     f"{r['saved_mib_per_image']:>9.2f}{r['peak_mib_per_image']:>9.2f}"
                     + "".join(f"{r['model_states_gib'][s]:>11.2f}" for s in range(4))
                     + "".join(f"{r['max_micro_batch'][s]:>10d}" for s in range(4)))
    return "```\n" + "\n".join(lines) + "\n```"


@block("readme-memory")
def _readme_memory(bench: Bench) -> str:
    rows = {(r["preset"], r["act_ckpt_every"]): r for r in _memory_rows(bench)}
    h0, h1 = rows[("mae_vit_huge_patch14", 0)], rows[("mae_vit_huge_patch14", 1)]
    z = h0.get("zero_stage", 1)
    sizes = ", ".join(f"{_SHORT[p]} {rows[(p, 0)]['max_micro_batch'][z]}"
                      for p in ("mae_vit_base_patch16", "mae_vit_large_patch16") if (p, 0) in rows)
    return (f"ViT-H keeps {h0['peak_mib_per_image']:.1f} MiB/image at peak ({h1['peak_mib_per_image']:.1f} MiB with "
            f"`model.act_ckpt_every=1`). Largest micro-batch per {h0['gpu_gib']:g} GiB GPU ({h0['reserve_gib']:g} GiB "
            f"reserve, ZeRO-{z} x {h0['world_size']}): {sizes}, **ViT-H {h0['max_micro_batch'][z]}**, "
            f"{h1['max_micro_batch'][z]} with checkpointing")


HOST_OVERHEAD = "bench/host_overhead_cpu.json"
_HOST_VARIANTS = (("bare", "bare step"), ("bare-per-param", "bare, master copy per parameter"),
                  ("deepspeed", "DeepSpeed's default step"), ("deepspeed-lean", "DeepSpeed's step, lean guard"),
                  ("loop", "**the loop's step** (maescale's ZeRO-1 step)"))


def _host_rows(bench: Bench) -> dict[tuple[str, str], dict]:
    return {(r["preset"], r["variant"]): r for run in bench.json(HOST_OVERHEAD)["runs"] for r in run["rows"]}


@block("host-overhead")
def _host_overhead(bench: Bench) -> str:
    rows = _host_rows(bench)
    presets = list(dict.fromkeys(p for p, _ in rows))
    out = []
    for variant, label in _HOST_VARIANTS:
        cells = [f"{num(rows[(p, variant)]['aten_ops_per_step'])} ({rows[(p, variant)]['aten_ops_vs_bare']:.2f}x)"
                 if (p, variant) in rows else "-" for p in presets]
        out.append([label, *cells])
    mb = next(iter(rows.values()))["micro_batch"]
    return table(["aten ops per optimizer step", *(f"{_SHORT.get(p, p)}, micro-batch {mb}" for p in presets)],
                 "l" + "r" * len(presets), out)


@block("loop-step-ops")
def _loop_step_ops(bench: Bench) -> str:
    rows = _host_rows(bench)
    presets = list(dict.fromkeys(p for p, _ in rows))
    parts = [f"{_SHORT.get(p, p)} {rows[(p, 'loop')]['aten_ops_vs_bare']:.2f}x" for p in presets if (p, "loop") in rows]
    return "the loop's step runs " + ", ".join(parts) + " the aten ops of the flat bare step on CPU"


@block("soak")
def _soak(bench: Bench) -> str:
    s = bench.json("bench/soak.json")
    return (f"{len(s['kills'])} kills survived, {s['steps_recomputed']} steps recomputed, "
            f"{num(s['leftover_bytes'])} bytes of checkpoint left behind, final weights "
            + ("bitwise equal to" if s["identical"] else "NOT equal to")
            + f" an uninterrupted run of {s['steps']} steps, {s['nproc']} processes, {s['seconds']:.0f} s in all")


# --- the GPU check (bench/gpu_check.sh): H200 runs --------------------------------------------

GPU_RUNS = "bench/h200"  # every folder at or below it with an env.json is one run of gpu_check.sh


@dataclass(frozen=True)
class GpuRow:
    """One measured variant at one micro-batch in one run."""

    run: str  # "1", "2", ... in date order
    folder: str
    kind: str  # autocast | bare | loop
    key: tuple  # the variant, comparable across runs
    order: int
    label: str
    micro_batch: int
    images_per_s: float
    window_range: tuple[float, float] | None  # images/s of the slowest and fastest window
    windows: str
    mfu: float | None
    mfu_of_ceiling: float | None
    launches: float | None
    aten_ops: float | None
    idle: float | None
    peak_mem_gib: float | None
    attn: str = "sdpa"
    compile: str = "off"
    data: str = "synthetic"


_BARE = {("autocast", "sdpa", "off"): (0, "plain PyTorch autocast step (what most MAE code runs)"),
         ("bf16", "sdpa", "off"): (1, "bare bf16, eager SDPA"),
         ("bf16", "cudnn", "off"): (2, "bare bf16, cuDNN attention"),
         ("bf16", "sdpa", "blocks"): (3, "bare bf16, compiled blocks"),
         ("bf16", "sdpa", "graphs"): (4, "bare bf16, blocks as CUDA graphs")}
_LOOP = {("synthetic", "off"): (5, "loop, eager"), ("synthetic", "blocks"): (6, "loop, compiled blocks"),
         ("synthetic", "graphs"): (7, "loop, blocks as CUDA graphs"),
         ("shards", "off"): (8, "loop, JPEG shards, CPU decode ({workers} workers)"),
         ("gpu_decode", "off"): (9, "loop, JPEG shards, GPU decode")}


def _compile_mode(value: Any) -> str:
    text = "off" if value is None else str(value).lower()
    return {"true": "blocks", "on": "blocks", "false": "off", "none": "off"}.get(text, text)


def gpu_runs(bench: Bench, base: str = GPU_RUNS) -> list[tuple[str, str]]:
    """``(label, folder)`` of every run of the GPU check under ``base``, labelled 1, 2, ... by date."""
    folders = [str(Path(p).parent) for p in bench.glob(f"{base}/**/env.json")]
    folders.sort(key=lambda f: str(json.loads((bench.root / f / "env.json").read_text()).get("date", "")))
    if not folders:
        raise ReportError(f"{base}: no env.json below it (bench/gpu_check.sh writes one per run)")
    return [(str(i + 1), f) for i, f in enumerate(folders)]


def gpu_rows(bench: Bench, base: str = GPU_RUNS) -> list[GpuRow]:
    """Every measured variant of every run under ``base`` (bare.json, loop*.json), sorted for tables."""
    rows: list[GpuRow] = []
    for run, folder in gpu_runs(bench, base):
        env = bench.json(f"{folder}/env.json")
        peak, ceiling = env.get("peak_tflops"), env.get("matmul_tflops")

        def of_ceiling(mfu: float | None) -> float | None:
            return mfu * peak / ceiling if mfu is not None and peak and ceiling else None

        if (bench.root / folder / "bare.json").is_file():
            for r_run in bench.json(f"{folder}/bare.json")["runs"]:
                win = r_run["args"].get("window") or r_run.get("env", {}).get("window") or 1
                for r in r_run["results"]:
                    if r.get("status") != "ok":
                        continue
                    comp = _compile_mode(r.get("compile"))
                    key = (r["precision"], r["attn_impl"], comp)
                    kind = "autocast" if r["precision"] == "autocast" else "bare"
                    order, label = _BARE.get(key, (4.5, f"bare {r['precision']}, {r['attn_impl']}, compile {comp}"))
                    prof = r.get("extra", {}).get("profile") or {}
                    mb = r["micro_batch"]
                    rows.append(GpuRow(run, folder, kind, (kind, *key), order, label, mb, r["images_per_s"],
                                       (1e3 * mb / r["step_ms_max"], 1e3 * mb / r["step_ms_min"]),
                                       f"{r['repeats']} x {win} steps", r["mfu"], of_ceiling(r["mfu"]),
                                       prof.get("kernel_launches"), prof.get("aten_ops"),
                                       prof.get("device_idle_fraction"), r.get("peak_mem_gib"),
                                       r["attn_impl"], comp))
        for path in bench.glob(f"{folder}/loop*.json"):
            doc = bench.json(path)
            for r in doc["results"]:
                if r.get("status") != "ok":
                    continue
                opts = dict(o.split("=", 1) for o in r["overrides"] if "=" in o)
                comp, attn = _compile_mode(opts.get("model.compile")), opts.get("model.attn_impl", "sdpa")
                other = sorted(o for o in r["overrides"]
                               if o.split("=", 1)[0] not in ("model.compile", "model.attn_impl"))
                order, label = _LOOP.get((r["data"], comp), (9.5, f"loop, {r['data']}, compile {comp}"))
                if attn != "sdpa" or other:
                    order, label = order + 0.5, f"{label}, {' '.join([f'attn {attn}'] * (attn != 'sdpa') + other)}"
                prof = r.get("profile") or {}
                rows.append(GpuRow(run, folder, "loop", ("loop", r["data"], attn, comp, *other), order,
                                   label.format(workers=doc["args"].get("workers")), r["micro_batch"],
                                   r["images_per_s"], None, f"1 x {doc['args']['steps']} steps", r["mfu"],
                                   of_ceiling(r["mfu"]), prof.get("kernel_launches"), prof.get("aten_ops"),
                                   prof.get("device_idle_fraction"), r.get("peak_mem_gib"), attn, comp, r["data"]))
    rows.sort(key=lambda r: (r.micro_batch, r.order, r.label, int(r.run)))
    return rows


def _best(rows: list[GpuRow], kind: str, mb: int, data: str | None = "synthetic") -> GpuRow | None:
    cands = [r for r in rows if r.kind == kind and r.micro_batch == mb and (data is None or r.data == data)]
    return max(cands, key=lambda r: r.images_per_s, default=None)


def _same_variant_bare(rows: list[GpuRow], loop: GpuRow) -> GpuRow | None:
    return next((b for b in rows if b.kind == "bare" and b.run == loop.run and b.micro_batch == loop.micro_batch
                 and b.attn == loop.attn and b.compile == loop.compile), None)


@block("h200")
def _h200(bench: Bench) -> str:
    rows = gpu_rows(bench)
    best = {(k, mb): _best(rows, k, mb) for mb in {r.micro_batch for r in rows} for k in ("bare", "loop")}
    out = []
    for r in rows:
        top = r is best.get((r.kind, r.micro_batch))
        rng = "-" if r.window_range is None else f"{num(r.window_range[0])}-{num(r.window_range[1])}"
        mfu = pct(r.mfu) + (f" ({pct(r.mfu_of_ceiling)})" if r.mfu_of_ceiling is not None else "")
        out.append([str(r.micro_batch), bold(r.label, top), r.run, bold(num(r.images_per_s), top), r.windows, rng,
                    mfu, num(r.launches), num(r.aten_ops), pct(r.idle, 0), num(r.peak_mem_gib, 1)])
    ceilings = []
    for run, folder in gpu_runs(bench):
        env = bench.json(f"{folder}/env.json")
        ceilings.append(f"run {run} {num(env.get('matmul_tflops'))}")
    peak = bench.json(f"{gpu_runs(bench)[0][1]}/env.json").get("peak_tflops")
    return (table(["micro-batch", "what", "run", "img/s", "timed", "slowest-fastest window", "MFU (of ceiling)",
                   "launches/step", "aten ops/step", "GPU idle", "peak GiB"], "rlrrlrrrrrr", out)
            + f"\n\nMFU against the datasheet's {num(peak, 1)} TFLOP/s; in brackets against the bf16 matmul ceiling "
            f"measured at the start of the run: {', '.join(ceilings)} TFLOP/s.")


@block("h200-repeats")
def _h200_repeats(bench: Bench) -> str:
    rows = gpu_rows(bench)
    runs = [label for label, _ in gpu_runs(bench)]
    groups: dict[tuple, list[GpuRow]] = {}
    for r in rows:
        groups.setdefault((r.micro_batch, r.key), []).append(r)
    out = []
    for (mb, _), rs in groups.items():
        if len(rs) < 2:
            continue
        by = {r.run: r for r in rs}
        out.append([str(mb), rs[0].label, *(num(by[k].images_per_s) if k in by else "-" for k in runs),
                    f"{100 * spread(r.images_per_s for r in rs):.0f}%"])
    return table(["micro-batch", "what", *(f"run {k}" for k in runs), "spread (max-min)/min"],
                 "rl" + "r" * (len(runs) + 1), out)


@block("h200-loop-vs-bare")
def _h200_loop_vs_bare(bench: Bench) -> str:
    rows = gpu_rows(bench)
    out = []
    for loop in rows:
        if loop.kind != "loop" or loop.data != "synthetic":
            continue
        bare = _same_variant_bare(rows, loop)
        if bare is None:
            continue
        out.append([str(loop.micro_batch), loop.label.removeprefix("loop, "), loop.run, num(loop.images_per_s),
                    num(bare.images_per_s), bold(f"{loop.images_per_s / bare.images_per_s:.2f}")])
    return table(["micro-batch", "variant", "run", "loop img/s", "bare img/s", "loop / bare"], "rlrrrr", out)


@block("readme-h200")
def _readme_h200(bench: Bench) -> str:
    rows = gpu_rows(bench)
    cols = [("autocast", "plain PyTorch autocast step", ("autocast", "autocast", "sdpa", "off")),
            ("bare", "bare, eager", ("bare", "bf16", "sdpa", "off")),
            ("bare", "bare, CUDA-graphed blocks", ("bare", "bf16", "sdpa", "graphs")),
            ("loop", "**loop, eager**", ("loop", "synthetic", "sdpa", "off")),
            ("loop", "**loop, CUDA-graphed blocks**", ("loop", "synthetic", "sdpa", "graphs"))]
    out = []
    for mb in sorted({r.micro_batch for r in rows}):
        line = [str(mb)]
        for kind, _, key in cols:
            got = [r for r in rows if r.key == key and r.micro_batch == mb]
            if not got:
                line.append("-")
            elif len(got) == 1:
                line.append(bold(f"{num(got[0].images_per_s)} ({pct(got[0].mfu)})", kind == "loop"))
            else:
                line.append(f"{span(r.images_per_s for r in got)} ({len(got)} runs)")
        ratios: dict[str, list[float]] = {}
        for loop in (r for r in rows if r.kind == "loop" and r.data == "synthetic" and r.micro_batch == mb):
            bare = _same_variant_bare(rows, loop)
            if bare is not None and loop.attn == "sdpa":
                ratios.setdefault(loop.compile, []).append(loop.images_per_s / bare.images_per_s)
        name = {"off": "eager", "graphs": "graphs", "blocks": "compiled"}
        eager_first = sorted(ratios.items(), key=lambda kv: kv[0] != "off")
        line.append(", ".join(f"{span(v, 2)} {name.get(c, c)}" for c, v in eager_first))
        out.append(line)
    runs = gpu_runs(bench)
    return (table(["micro-batch", *(c[1] for c in cols), "loop / bare (same variant, same run)"], "rrrrrrl", out)
            + f"\n\nImages/s per GPU (MFU against the datasheet peak). A range is over the {len(runs)} runs of the "
            "same script that measured the variant; a bare figure is the median of timed windows of back-to-back "
            "steps, a loop figure one log window of the real loop (window spreads: `bench/RESULTS.md`).")


def best_rates(bench: Bench) -> tuple[GpuRow, GpuRow]:
    """The fastest bare step and the fastest loop (synthetic data) measured at any micro-batch."""
    rows = gpu_rows(bench)
    bare = max((r for r in rows if r.kind == "bare"), key=lambda r: r.images_per_s)
    loop = max((r for r in rows if r.kind == "loop" and r.data == "synthetic"), key=lambda r: r.images_per_s)
    return bare, loop


# --- input pipeline (tools/bench_data.py) and device decode (tools/bench_decode.py) ----------

DATA = "bench/data_results.json"
_SET_LABEL = {"500x375": "~500x375", "2000x1500": "~2000x1500"}


def _load_averages(section: dict) -> list[float]:
    """The 1-min load averages recorded before the runs and after each image set."""
    return ([x for s in section["sets"].values() for x in s.get("load_average_after", [])[:1]]
            + section.get("load_average_before", [])[:1])


@block("data-loader")
def _data_loader(bench: Bench) -> str:
    d = bench.json(DATA)
    out = []
    for name, s in d["sets"].items():
        runs = s["runs"]

        def best(k: str, digits: int = 1) -> str:
            return f"{num(s[k], digits)} (worst {num(min(runs[k]), digits)})" if k in runs else num(s[k], digits)
        out.append([f"{s['images']} x {name} JPEG q{d['settings']['jpeg_quality']} (~{s['mean_jpeg_kb']:.0f} kB)",
                    best("imagefolder"), best("maescale"), best("maescale_plain"), best("raw_tar_read", 0),
                    f"**{s['speedup_vs_imagefolder']:.2f}x**", f"{s['cpu_time_speedup']:.2f}x"])
    loads = _load_averages(d)
    return (table(["images", "ImageFolder+RRC+ToTensor", "maescale", "maescale (fast_decode off)", "raw tar read",
                   "speedup", "speedup, CPU time"], "lrrrrrr", out)
            + f"\n\nImages/s per worker process, best (and worst) of {d['settings']['repeats']} runs; the speedup is "
            f"best against best; the CPU-time speedup is one measurement (1-min load average "
            f"{span(loads, 1)} during the runs).")


@block("readme-data")
def _readme_data(bench: Bench) -> str:
    d = bench.json(DATA)
    out = []
    for name, s in d["sets"].items():
        out.append([f"{s['images']} x {_SET_LABEL.get(name, name)} JPEG q{d['settings']['jpeg_quality']}",
                    num(s["imagefolder"], 1), num(s["maescale"], 1),
                    f"{s['speedup_vs_imagefolder']:.2f}x ({s['cpu_time_speedup']:.2f}x by CPU time)",
                    num(s["raw_tar_read"], 0)])
    return table(["images", "ImageFolder + RRC + ToTensor", "maescale", "speedup", "raw tar read (ceiling)"],
                 "lrrrr", out) + f"\n\nBest of {d['settings']['repeats']} runs each (the worst: `bench/DATA.md`)."


def _sizing_rates(bench: Bench) -> list[tuple[str, float]]:
    target = bench.json(DATA, "gpu_decode")["settings"].get("target_images_per_s_per_gpu")
    _, loop = best_rates(bench)
    rates = [(f"{num(loop.images_per_s)} img/s (best measured loop, ViT-H micro-batch {loop.micro_batch}, "
              f"run {loop.run})", loop.images_per_s)]
    if target:
        rates.append((f"{num(target)} img/s (the issue's goal, not measured)", float(target)))
    return rates


_PATHS = (("full_decode_fast", "CPU decode (fast_decode, default)"),
          ("full_decode_plain", "CPU decode (fast_decode off)"), ("gpu_decode", "gpu_decode (worker share)"))


@block("data-sizing")
def _data_sizing(bench: Bench) -> str:
    g = bench.json(DATA, "gpu_decode")
    rates = _sizing_rates(bench)
    out = []
    for name, s in g["sets"].items():
        for key, label in _PATHS:
            ms = s["worker_ms_per_image"][key]
            wp = s["worker_process_ms_per_image"].get(key)
            runs = s["runs"].get(key, [ms])
            out.append([f"{name} JPEG q{g['settings']['jpeg_quality']} (~{s['mean_jpeg_kb']:.0f} kB)", label,
                        f"{ms:.3f} ms ({span(runs, 3)})", num(s["images_per_s_per_core"][key]),
                        *(f"{rate * ms / 1e3:.1f}" for _, rate in rates), "-" if wp is None else f"{wp:.3f} ms"])
    node = []
    for name, s in g["sets"].items():
        for key, label in _PATHS:
            wp = s["worker_process_ms_per_image"].get(key)
            if wp is not None:
                node.append([name, label, *(f"{8 * rate * wp / 1e3:.0f}" for _, rate in rates)])
    heads = [f"worker cores per GPU at {label}" for label, _ in rates]
    loads = _load_averages(g)
    bare, loop = best_rates(bench)
    return (table(["images", "path", f"worker CPU per image (best of {g['settings']['repeats']}; range)",
                   "images/s per core", *heads, "DataLoader worker process CPU per image"],
                  "ll" + "r" * (3 + len(rates)), out)
            + f"\n\n1-min load average {span(loads, 1)} during the runs. The best rates measured per GPU (ViT-H, "
            f"H200): the loop {num(loop.images_per_s)} img/s, the bare model step {num(bare.images_per_s)} img/s "
            f"(micro-batch {bare.micro_batch}, run {bare.run}). "
            "Per 8-GPU node, from the worker-process column (add the 8 training processes' own cores):\n\n"
            + table(["images", "path", *(f"worker cores at 8 x {label.split(' (')[0]}" for label, _ in rates)],
                    "ll" + "r" * len(rates), node))


@block("readme-cores")
def _readme_cores(bench: Bench) -> str:
    g = bench.json(DATA, "gpu_decode")
    rates = _sizing_rates(bench)
    out = []
    for name, s in g["sets"].items():
        for key, label in (("full_decode_fast", "CPU decode (default fast path)"),
                           ("gpu_decode", "`gpu_decode` worker share")):
            ms = s["worker_process_ms_per_image"][key]
            out.append([f"{name} (~{s['mean_jpeg_kb']:.0f} kB)", label, f"{ms:.2f} ms", num(1e3 / ms),
                        *(f"{rate * ms / 1e3:.1f}" for _, rate in rates)])
    return table(["JPEGs (q90)", "path", "worker CPU per image", "img/s per core",
                  *(f"cores per GPU at {label}" for label, _ in rates)], "llrr" + "r" * len(rates), out)


DECODE = "bench/h200/decode.json"


@block("decode-device")
def _decode_device(bench: Bench) -> str:
    d = bench.json(DECODE)
    out, work = [], []
    for name, s in d["sets"].items():
        t, n = s["device_ms"], s["launches"]

        def ms(k: str) -> str:
            return f"{t[k]['median_ms']:.2f} ms ({t[k]['min_ms']:.2f})"
        out.append([name, ms("decode"), ms("crop_resize"), ms("normalize"), ms("total"),
                    f"{t['total']['host_cpu_ms']:.2f}", ms("per_image_crop_resize_before"),
                    f"{n['decode_nvjpeg']['launch_calls']} / {n['crop_resize_normalize']['launch_calls']} / "
                    f"{n['per_image_crop_resize_before']['launch_calls']}"])
        w = s["worker"]
        work.append([name, *(f"{w[k]['ms_per_image']:.2f} ms = {num(w[k]['images_per_s_per_core'])} img/s"
                             for k in ("gpu_decode", "cpu_decode_fast", "cpu_decode_plain"))])
    reps = {v["repeats"] for s in d["sets"].values() for v in s["device_ms"].values()}
    return (table(["images", "nvjpeg decode", "crop+resize+flip", "normalise", "whole call", "host ms",
                   "per-image resize (before)", "launches: nvjpeg / ours / before"], "lrrrrrrl", out)
            + f"\n\nDevice time per batch of {d['settings']['batch_size']}: median of "
            f"{'/'.join(map(str, sorted(reps)))} "
            "(fastest in brackets). Worker CPU per image on that host's cores:\n\n"
            + table(["images", "`gpu_decode`", "CPU decode, fast path", "CPU decode, fast_decode off"], "lrrr", work))


_AGREE = (("420_vs_cpu_fast", "4:2:0 vs fast path"), ("420_vs_cpu_plain", "4:2:0 vs plain path"),
          ("444_vs_cpu_fast", "4:4:4 vs fast"), ("444_vs_cpu_plain", "4:4:4 vs plain"),
          ("decoder_vs_libjpeg_fancy_chroma", "nvjpeg vs libjpeg-turbo"),
          ("decoder_vs_libjpeg_replicated_chroma", "nvjpeg vs libjpeg-turbo with replicated chroma"))


def _agree(a: dict) -> str:
    return f"{a['mean']:.2f} / {a['p99_9']:.0f} / {a['max']:.0f}"


@block("decode-agreement")
def _decode_agreement(bench: Bench) -> str:
    d = bench.json(DECODE)
    out = []
    for name, s in d["sets"].items():
        a = s["agreement"]
        out.append([name, *(bold(_agree(a[k]), k.endswith("replicated_chroma")) for k, _ in _AGREE)])
    n = {s["agreement"]["images"] for s in d["sets"].values()}
    return (table(["images", *(label for _, label in _AGREE)], "l" + "l" * len(_AGREE), out)
            + f"\n\nGrey levels 0-255, mean / 99.9th percentile / max over {'/'.join(map(str, sorted(n)))} images.")


@block("decode-420")
def _decode_420(bench: Bench) -> str:
    a = bench.json(DECODE)["sets"]["500x375"]["agreement"]["420_vs_cpu_fast"]
    return f"mean {a['mean']:.2f}, 99.9th percentile {a['p99_9']:.0f}, max {a['max']:.0f}"


# --- the recipe against the MAE release (from code, not measured) -----------------------------

@block("recipe")
def _recipe(bench: Bench) -> str:
    from maescale.devtools.recipe import markdown

    bench.cite("maescale/devtools/recipe.py", "the release's values; maescale's read from configs/ and the code")
    return markdown()



# --- communication per step (tools/bench_comm.py) -------------------------------------------

COMM = "bench/comm.json"


@block("comm")
def _comm(bench: Bench) -> str:
    doc = bench.json(COMM)
    rows = []
    for r in doc["runs"]:
        for group, kinds in (("", r["per_step"]), ("control ", r["control"])):
            for kind, row in sorted(kinds.items()):
                rows.append([_SHORT.get(r["preset"], r["preset"]), str(r["world_size"]), str(r["zero_stage"]),
                             f"{group}{kind}", num(row["calls"], 1), f"{row['elements'] / r['params']:.3f}",
                             pct(row["issued_in_backward"], 0), pct(row.get("backward_left_at_issue"), 0),
                             num(row["blocking_calls"], 1)])
    return table(["model", "ranks", "ZeRO", "collective", "calls/step", "elements / params",
                  "issued in backward", "backward left at issue", "blocking calls"], "lrrlrrrrr", rows)
