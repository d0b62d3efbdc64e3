# maescale: `make demo` sets up and trains the demo; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup demo test test-fast clean

# The venv is (re)built when pyproject.toml changes. torch/torchvision are pinned as a pair
# in pyproject.toml; pip would otherwise pick a local CPU-only torch that breaks torchvision.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# The demo starts fresh each time (a second `tools/train.py configs/demo.yaml` would resume).
# It ends with the kNN accuracy of the trained encoder on held-out images against its initialisation.
demo: $(STAMP)
	$(PY) tools/make_demo_data.py --output demo_data
	rm -rf runs/demo
	$(PY) tools/train.py configs/demo.yaml
	$(PY) tools/probe.py --history runs/demo

# Two pytest-xdist workers, one per core of the CI machine; the real-SLURM tests share one cluster
# and run in order on one of them (--dist loadgroup, tests/conftest.py).
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=20

test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup -m "not slow"

clean:
	rm -rf runs demo_data .pytest_cache
