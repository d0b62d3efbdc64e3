"""Property-based tests: any malformed config or override gives ConfigError naming a key,
never a deep traceback from somewhere else."""

from __future__ import annotations

from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maescale.config import Config, ConfigError, config_from_dict, load_config

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ["model", "data", "optim", "train", "checkpoint", "lock", "deepspeed", "slurm", "eval"]
KEYS = {s: list(getattr(Config(), s).__dataclass_fields__) for s in SECTIONS}
ALL_DOTTED = [f"{s}.{k}" for s in SECTIONS for k in KEYS[s]] + ["output_dir", "resume"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=8)


def _check(fn) -> None:
    try:
        fn()
    except ConfigError as exc:
        assert str(exc)
        if exc.key is not None:
            assert exc.key in str(exc)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(ALL_DOTTED), value=values)
def test_any_value_for_any_key_is_accepted_or_a_config_error(key, value):
    text = yaml.safe_dump(value, default_flow_style=True).strip().replace("\n", " ")
    if text.endswith("..."):
        text = text[:-3].strip()
    base = REPO / "configs" / "tiny.yaml"
    _check(lambda: load_config(base, [f"{key}={text}"]))


@settings(max_examples=200, deadline=None)
@given(raw=st.dictionaries(st.sampled_from(SECTIONS + ["output_dir", "resume", "bogus"]), values, max_size=5))
def test_any_document_is_accepted_or_a_config_error(raw):
    _check(lambda: config_from_dict(raw))


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=60))
def test_any_override_string_is_accepted_or_a_config_error(text):
    _check(lambda: load_config(REPO / "configs" / "tiny.yaml", [text]))


@settings(max_examples=100, deadline=None)
@given(content=st.binary(max_size=200))
def test_any_file_content_is_accepted_or_a_config_error(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_bytes(content)
    _check(lambda: load_config(path))
