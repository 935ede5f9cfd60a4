# make run   - set up .venv, train on PathMNIST (downloads it on first use), then evaluate
# make demo  - the same end to end, offline, on the SYNTHETIC dataset (not PathMNIST)
# make test  - set up .venv and run the test suite (what CI runs)
# make test-fast - the tests that train nothing (under 2 minutes), for quick loops
# make lint  - ruff with the repository's config (ruff.toml)
# make bench - speed and storage against the original approach, side by side (a few minutes)
# make bench-memory - peak memory of whole train.py and evaluate.py runs per phase, 28 to 224 px (hours on
#              2 CPU cores; ARGS go to bench_memory.py, e.g. ARGS="--sizes 28 64")
# make real  - this repo's model against MedMNIST's ResNet-18 on the real RetinaMNIST file of the
#              shared real-data folder, 3 seeds each (real.py; about an hour on 2 CPU cores)
# make gpu-check - on a machine with an NVIDIA GPU: every GPU code path once, numbers and checks into
#              runs/gpu_check/gpu_check.json (gpu_check.py; about 8 minutes). It uses the machine's own
#              python3 and torch (a GPU node's may be older than requirements.txt's); ARGS go to gpu_check.py
# make seeds SEEDS="0 1 2" ARGS="--synthetic --epochs 8"
#            - train and evaluate one run per seed into runs/seeds/seed<N>, then summarise them
#              (mean +- sd) in runs/seeds/summary.html; ARGS go to train.py
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

SEEDS ?= 0 1 2
ARGS ?=

.PHONY: setup run demo test test-fast lint bench bench-memory real gpu-check seeds
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
	$(PY) evaluate.py --checkpoint runs/pathmnist-synthetic_28/best.pt --quality 100
	$(PY) db.py runs/pathmnist-synthetic_28/explanations.db
	@echo "report: runs/pathmnist-synthetic_28/report.html (open it in a browser)"

test: setup
	$(PY) -m pytest -q -rs -n auto --dist loadscope --no-loadscope-reorder

test-fast: setup
	$(PY) -m pytest -q -rs -n auto --dist loadscope --no-loadscope-reorder -m "not trains"

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) bench.py

bench-memory: setup
	$(PY) bench_memory.py $(ARGS)

real: setup
	$(PY) real.py

gpu-check:
	$(PYTHON) gpu_check.py $(ARGS)

seeds: setup
	@for s in $(SEEDS); do \
	  $(PY) train.py $(ARGS) --seed $$s --out runs/seeds/seed$$s && \
	  $(PY) evaluate.py --checkpoint runs/seeds/seed$$s/best.pt || exit 1; \
	done
	$(PY) report.py $(addprefix runs/seeds/seed,$(SEEDS)) --out runs/seeds/summary.html
