VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test quick-test

setup:
	bash scripts/setup.sh

# The main job on the embedded default: distil the shipped teacher into a 3-step student (<= 20 min on 2 cores).
demo: setup
	$(VENV)/bin/imagine-flash distill

# The test suite (what CI runs), on 2 pytest-xdist workers with one thread each.
test: setup
	$(PY) -m pytest -q -n 2 tests

# The fast half (under a minute): math, losses, scheduler, config and CLI errors; no training runs (-m "not slow").
quick-test: setup
	$(PY) -m pytest -q -m "not slow" tests
