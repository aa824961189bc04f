# The two set-up commands of the README:
#   make demo   prepare the local corpus shards and train the tiny preset on CPU with 2 ranks
#   make test   run the test suite
# (and: make report   the research report, reports/<timestamp>/REPORT.md, 35 minutes on 2 cores)
# Both create the virtual environment .venv from the requirements*.txt first (once), with the project
# installed in it in editable mode (pip install -e .), so every script imports it from anywhere.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
NPROC ?= 2

.PHONY: demo test lint report venv system-deps

$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-trackers.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-trackers.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

venv: $(VENV)/.installed

# Slurm and munge for the launcher's one-node Slurm test (skipped with a reason where they
# cannot be installed, e.g. without root or apt).
system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v slurmctld >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null) \
		|| echo "note: could not install slurm-wlm/munge; the Slurm test will be skipped"; \
	fi

demo: venv
	$(PY) -m data.prepare_corpus
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) train_gpt.py --preset tiny

test: venv system-deps
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check .

report: venv
	$(PY) -m experiments.report
