"""Shared fixtures: small SYNTHETIC datasets written by data.py, one short training run, one
evaluation, and the shared real-data folder (`realdata`).

Tests take helpers as fixtures (train_argv, make_npz, realdata), never by importing this file.
A test that takes `realdata` is a real-data test: it is skipped, saying what is missing and how to
point at it, where the folder is absent (a user's plain clone); where the folder exists, a skipped
real-data test fails the session (CI has the folder, so its real-data tests must run)."""
import os
import shutil

import numpy as np
import pytest
import torch

import data
import datasets
import realdata as realdata_lib
import synthetic
import train

SMALL = {"train": 1500, "val": 300, "test": 300}
# torch's threads per test process: the machine's two cores go to pytest-xdist's two workers, one
# each (two threads each would ask for four cores); one process alone gets both
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
if os.environ.get("PYTEST_XDIST_WORKER"):
    # the scripts a test starts (make demo, gpu_check.py, explain.py ...) take torch's default, which
    # reads this: one thread each, as the worker has (two on a busy core measured 1.6x slower)
    os.environ["OMP_NUM_THREADS"] = str(THREADS)
TRAINED_EPOCHS = 10  # the synthetic motifs take about 10 small-batch epochs to learn (val ACC ~0.96)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(THREADS)


@pytest.fixture(scope="session")
def threads():
    """--threads for the scripts a test runs: THREADS, as text."""
    return str(THREADS)


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """MD5s and memory maps of the tests' files go to a folder of this session, not the user's cache
    (set in the environment, so the scripts the tests start use it too)."""
    old = os.environ.get(data.CACHE_ENV)
    os.environ[data.CACHE_ENV] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop(data.CACHE_ENV)
    else:
        os.environ[data.CACHE_ENV] = old


@pytest.fixture(scope="session")
def realdata():
    """The shared real-data folder (realdata.folder()); the test is skipped, saying why, without it."""
    why = realdata_lib.missing()
    if why:
        pytest.skip(f"SKIPPED real-data test: {why}")
    return realdata_lib.folder()


# Fixtures that train a model (directly or through one another): their tests are marked `trains`,
# which `make test-fast` leaves out. Tests that train inline carry the mark themselves.
TRAINING_FIXTURES = {"trained_run", "evaluated_run", "untrained_run", "train_argv", "demo"}


# The modules that take longest (minutes, each on one worker under --dist loadscope), dealt out first, by
# their measured totals (setup + call, --durations=0, 2026-12-05: 350 s down to 120 s): dealt last, one of
# them runs alone at the end while the other worker idles. make test passes --no-loadscope-reorder, as
# pytest-xdist 3.8 otherwise deals modules by their number of tests (seen: make demo's module started 11
# minutes into a 21-minute run).
LONGEST_FIRST = ("test_flags.py", "test_readme.py", "test_evaluate.py", "test_train.py", "test_gpu_check.py",
                 "test_distributed.py", "test_bench.py", "test_faults.py", "test_quality.py", "test_slide.py")


def pytest_collection_modifyitems(items):
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if "realdata" in used:
            item.add_marker("realdata")
        if used & TRAINING_FIXTURES:
            item.add_marker("trains")
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


SKIPPED_REAL = []


def pytest_runtest_logreport(report):
    if report.skipped and "realdata" in report.keywords:
        SKIPPED_REAL.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if SKIPPED_REAL and realdata_lib.folder().is_dir():
        session.exitstatus = 1  # the folder is there, so a skipped real-data test hid something


def pytest_terminal_summary(terminalreporter):
    if SKIPPED_REAL and realdata_lib.folder().is_dir():
        terminalreporter.write_line(f"FAILED: {len(SKIPPED_REAL)} real-data test(s) were skipped although "
                                    f"{realdata_lib.folder()} exists: {', '.join(SKIPPED_REAL)}", red=True)


@pytest.fixture(scope="session")
def syn_dir(tmp_path_factory):
    """A data dir holding a small synthetic npz under the name train.py --synthetic looks for."""
    d = tmp_path_factory.mktemp("data")
    synthetic.write_synthetic(d / datasets.synthetic_file_name(28), 28, counts=SMALL, seed=0)
    return d


def train_args(data_dir, out, *extra):
    """train.py's argv for a quiet synthetic run in `out` on THREADS threads, plus `extra` flags."""
    return ["--synthetic", "--data-dir", str(data_dir), "--out", str(out),
            "--figures", str(out / "images"), "--threads", str(THREADS), *extra]


@pytest.fixture(scope="session")
def train_argv():
    return train_args


def made_once(tmp_path_factory, name, make):
    """A folder that make(folder) fills once per test session: under pytest-xdist the first worker to
    get here makes it and the others wait for it, then use it where it lies (FileLock: filelock comes
    with torch). What it holds must be the same whichever worker makes it (seeded, same threads)."""
    from filelock import FileLock
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the workers' common folder
    folder = root / name
    with FileLock(f"{folder}.lock"):
        if not (folder / ".made").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            make(folder)
            (folder / ".made").touch()
    return folder


@pytest.fixture(scope="session")
def trained_run(syn_dir, tmp_path_factory):
    """Run folder of a TRAINED_EPOCHS-epoch training run (batch 32) on the small synthetic set."""
    def make(out):
        train.main(train_args(syn_dir, out, "--epochs", str(TRAINED_EPOCHS), "--batch-size", "32"))
    return made_once(tmp_path_factory, "trained_run", make)


def write_npz(path, size=28, n=6, **override):
    """A tiny MedMNIST-format npz; keyword arguments replace (or, set to None, drop) arrays."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split in datasets.SPLITS:
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 9, (n, 1))
    arrays.update(override)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


@pytest.fixture
def make_npz():
    return write_npz


@pytest.fixture(scope="session")
def evaluated_run(trained_run, syn_dir, tmp_path_factory):
    """A copy of the trained run after `evaluate.py --explain 60 --quality 20`: (run dir, metrics). Its
    own folder, so other tests that evaluate the same checkpoint cannot overwrite its outputs."""
    import json

    import evaluate

    def make(run_dir):
        shutil.copy(trained_run / "best.pt", run_dir / "best.pt")
        evaluate.main(["--checkpoint", str(run_dir / "best.pt"), "--data-dir", str(syn_dir), "--explain", "60",
                       "--quality", "20", "--figures", str(run_dir / "images"), "--threads", str(THREADS)])
    run_dir = made_once(tmp_path_factory, "evaluated_run", make)
    return run_dir, json.loads((run_dir / "metrics.json").read_text())
