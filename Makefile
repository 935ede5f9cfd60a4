# make run   - set up .venv, train on PathMNIST (downloads it on first use), then evaluate
# make demo  - the same end to end, offline, on the SYNTHETIC dataset (not PathMNIST)
# make test  - set up .venv and run the test suite
# make bench - speed and storage against the original approach, side by side (a few minutes)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup run demo test bench
setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

run: setup
	$(PY) train.py
	$(PY) evaluate.py

demo: setup
	$(PY) train.py --synthetic --epochs 8
	$(PY) evaluate.py --checkpoint runs/pathmnist-synthetic_28/best.pt
	$(PY) db.py runs/pathmnist-synthetic_28/explanations.db

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench.py
