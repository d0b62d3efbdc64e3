"""Docs from data (maescale/devtools/report.py, tools/report.py): the docs' generated blocks equal
what the committed JSON gives, and a changed figure in a JSON makes the check fail, naming the block."""

from __future__ import annotations

import json
import re
import runpy
import shutil
from pathlib import Path

import pytest

from maescale.devtools import report
from maescale.devtools.report import BLOCKS, Bench, ReportError, block, check, render, write
from tests.helpers import REPO

TOOL = REPO / "tools" / "report.py"


def _copy_repo_docs(tmp_path: Path) -> Path:
    """The committed outputs and every doc the report reads, as a repository root of their own."""
    root = tmp_path / "repo"
    shutil.copytree(REPO / "bench", root / "bench")
    for doc in REPO.glob("*.md"):
        shutil.copy(doc, root / doc.name)
    return root


def _tool(*args: str, capsys) -> int:
    """tools/report.py's main, in this process (the CLI as a user runs it, without a second torch import)."""
    capsys.readouterr()
    return runpy.run_path(str(TOOL), run_name="report_cli")["main"](list(args))


def _outside_blocks(text: str) -> str:
    return re.sub(r"(<!-- report:([\w.-]+) -->).*?(<!-- /report:\2 -->)", r"\1\3", text, flags=re.S)


def _edit_json(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc, indent=1))


def test_docs_match_the_committed_json():
    """The committed docs are what `tools/report.py --write` makes of the committed JSON (if this fails:
    run `python tools/report.py --write`, look at the diff, and fix the prose around any changed table)."""
    diffs = check(REPO)
    assert not diffs, "\n".join(d.diff() for d in diffs)


def test_the_cli_checks_this_checkout(capsys):
    assert _tool("--check", capsys=capsys) == 0
    assert "every block matches" in capsys.readouterr().out


def test_every_registered_block_is_placed_and_names_its_sources():
    placed = {b.name: b for doc in report.doc_paths(REPO)
              for b in report.find_blocks((REPO / doc).read_text(), doc)}
    assert set(placed) == set(BLOCKS)
    bench = Bench(REPO)
    for name, where in placed.items():
        text = render(name, bench, where.inline)
        files = [p for p, _ in bench.used] + list(bench.cited)
        assert files, name
        if where.inline:
            assert all(f"`{f}`" in text for f in files), name
        else:
            assert text.splitlines()[-1].startswith("*Source: "), name
    # device, date and versions come with the figures where the JSON records them
    h200 = render("h200", bench)
    for fact in ("NVIDIA H200", "2026-11-29", "torch 2.11.0+cu130", "DeepSpeed 0.19.8", "`bench/h200/run2/"):
        assert fact in h200
    assert "AMD EPYC, 2 cores, 2026-11-21" in render("data-loader", bench)


def test_spreads_come_from_the_repeated_runs():
    bench = Bench(REPO)
    rows = report.gpu_rows(bench)
    eager32 = [r for r in rows if r.key == ("loop", "synthetic", "sdpa", "off") and r.micro_batch == 32]
    assert sorted(r.run for r in eager32) == ["1", "2"]
    lo, hi = sorted(r.images_per_s for r in eager32)
    repeats = render("h200-repeats", bench)
    assert f"| {lo:,.0f} | {hi:,.0f} |" in repeats or f"| {hi:,.0f} | {lo:,.0f} |" in repeats
    assert f"{100 * (hi - lo) / lo:.0f}%" in repeats
    # a bare figure carries the spread of its timed windows
    bare = next(r for r in rows if r.kind == "bare" and r.micro_batch == 128 and r.run == "2")
    assert bare.window_range[0] <= bare.images_per_s <= bare.window_range[1]
    # the sizing guide uses the best measured loop rate, not the goal alone
    best_loop = max(r.images_per_s for r in rows if r.kind == "loop" and r.data == "synthetic")
    sizing = render("data-sizing", bench)
    assert f"at {best_loop:,.0f} img/s (best measured loop" in sizing and "not measured" in sizing


def test_a_changed_json_value_fails_the_check_naming_its_blocks(tmp_path, capsys):
    root = _copy_repo_docs(tmp_path)
    assert check(root) == []

    def faster(doc):  # the loop's best measured rate
        r = next(r for r in doc["results"] if r["micro_batch"] == 128 and r["overrides"] == ["model.compile=graphs"])
        r["images_per_s"] = 1400.0
    _edit_json(root / "bench/h200/run2/loop_compile.json", faster)
    named = {d.name for d in check(root)}
    # every table built on that rate, and nothing else
    assert named == {"h200", "h200-loop-vs-bare", "readme-h200", "data-sizing", "readme-cores"}

    assert _tool("--check", "--root", str(root), capsys=capsys) == 1
    out = capsys.readouterr()
    assert "block 'readme-cores' differs" in out.out and "1,400" in out.out and "--write" in out.err

    assert sorted(write(root)) == sorted(f"{d}: {n}" for d, n in [
        ("bench/RESULTS.md", "h200"), ("bench/RESULTS.md", "h200-loop-vs-bare"), ("README.md", "readme-h200"),
        ("bench/DATA.md", "data-sizing"), ("README.md", "readme-cores")])
    assert check(root) == []
    assert "**1,400**" in (root / "bench/RESULTS.md").read_text()
    # the prose outside the blocks is left as it was
    for doc in ("README.md", "bench/RESULTS.md", "bench/DATA.md"):
        assert _outside_blocks((REPO / doc).read_text()) == _outside_blocks((root / doc).read_text()), doc


def test_an_edited_doc_table_fails_the_check(tmp_path):
    root = _copy_repo_docs(tmp_path)
    data = root / "bench/DATA.md"
    text = data.read_text()
    assert "**3.35x**" in text
    data.write_text(text.replace("**3.35x**", "**3.6x**"))
    [d] = check(root)
    assert (d.doc, d.name) == ("bench/DATA.md", "data-loader") and "3.6x" in d.diff() and "3.35x" in d.diff()


def test_the_check_needs_the_json(tmp_path):
    root = _copy_repo_docs(tmp_path)
    (root / "bench/soak.json").unlink()
    with pytest.raises(ReportError, match=r"bench/soak.json: not found"):
        check(root)


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.replace("<!-- /report:comm -->", ""),  # the README's last block
     r"README.md:\d+: <!-- report:comm --> has no <!-- /report:comm -->"),
    (lambda t: t.replace("<!-- /report:host-overhead -->", ""),
     r"README.md:\d+: <!-- report:comm --> inside block 'host-overhead' \(opened on line \d+\); close it first"),
    (lambda t: t.replace("<!-- /report:soak -->", ""),
     r"README.md:\d+: <!-- report:readme-data --> inside block 'soak'"),
    (lambda t: t + "\n<!-- report:nonesuch -->\nx\n<!-- /report:nonesuch -->\n", r"README.md:\d+: no block 'nonesuch'"),
    (lambda t: t + "\n<!-- report:flops -->\nx\n<!-- /report:flops -->\n", r"block 'flops' is already placed at "),
    (lambda t: t.replace("<!-- report:soak -->", "").replace("<!-- /report:soak -->", ""),
     r"block\(s\) soak registered but placed in no doc"),
    (lambda t: t.replace("<!-- /report:readme-data -->", "text <!-- /report:readme-data -->"),
     r"block 'readme-data': put each marker on a line of its own"),
])
def test_marker_mistakes_are_named(tmp_path, capsys, edit, message):
    root = _copy_repo_docs(tmp_path)
    readme = root / "README.md"
    readme.write_text(edit(readme.read_text()))
    with pytest.raises(ReportError, match=message):
        check(root)
    assert _tool("--check", "--root", str(root), capsys=capsys) == 2
    assert "error: " in capsys.readouterr().err


def test_a_new_table_is_one_registered_function(tmp_path, monkeypatch):
    """What another helper does to add a table (here a made-up bench/links.json): register, place the markers, write."""
    root = _copy_repo_docs(tmp_path)
    monkeypatch.setattr(report, "BLOCKS", dict(BLOCKS))
    (root / "bench/links.json").write_text(json.dumps({
        "date": "2026-12-07T10:00:00+00:00", "env": {"device_name": "NVIDIA H100", "torch": "2.11.0"},
        "results": [{"op": "all_gather", "gb_per_s": 41.3}]}))

    @block("links")
    def _links(bench: Bench) -> str:
        doc = bench.json("bench/links.json")
        return report.table(["collective", "GB/s"], "lr", [[r["op"], f"{r['gb_per_s']:.1f}"] for r in doc["results"]])

    with pytest.raises(ReportError, match="links registered but placed in no doc"):
        check(root)
    scaling = root / "bench/SCALING.md"
    scaling.write_text(scaling.read_text() + "\n<!-- report:links -->\n<!-- /report:links -->\n")
    assert [d.name for d in check(root)] == ["links"]
    assert write(root) == ["bench/SCALING.md: links"]
    text = scaling.read_text()
    assert "| all_gather | 41.3 |" in text
    assert "*Source: `bench/links.json`: NVIDIA H100, 2026-12-07, torch 2.11.0." in text
    assert check(root) == []
    with pytest.raises(ValueError, match="registered twice"):
        block("links")(_links)
