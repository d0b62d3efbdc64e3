"""maescale runs the MAE release's pre-training recipe to the letter: every row of the README's
"maescale vs the MAE release" table is read from the code and configs and must equal the release."""

from __future__ import annotations

import pytest

from maescale.devtools.recipe import RELEASE, markdown, rows


@pytest.mark.parametrize("row", rows(), ids=lambda r: r.what)
def test_each_row_matches_the_release(row):
    assert row.same, f"{row.what}: the release uses {row.release!r}, maescale {row.maescale!r} ({row.where})"


def test_every_release_fact_has_a_row_and_the_table_shows_them():
    table = markdown()
    assert [r.what for r in rows()] == list(RELEASE)
    assert "(differs)" not in table
    assert table.count("\n") == len(RELEASE) + 1


def test_a_changed_default_shows_as_a_difference(monkeypatch):
    """The check can fail: the fine-tuning recipe's token exemption is a difference."""
    import maescale.optim as optim

    real = optim.decays
    monkeypatch.setattr(optim, "decays", lambda name, p, decay_tokens=True: real(name, p, decay_tokens=False))
    row = next(r for r in rows() if r.what == "weight-decay exemptions")
    assert not row.same and "(differs)" in markdown()
