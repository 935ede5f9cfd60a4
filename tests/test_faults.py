"""Faults: a killed rank, two writers on one store, a full disk, readers during writes, an output
folder that cannot be written. Each test checks what is stored afterwards."""
import errno
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import db
import evaluate
import files
import model as model_lib
import quality
import train

pytestmark = pytest.mark.trains  # every test here trains a model

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def integrity(path):
    with sqlite3.connect(path) as con:
        return con.execute("PRAGMA integrity_check").fetchone()[0]


def rows_by_method(path):
    """{method: (rows, distinct image indices)} of the store's explanations."""
    with sqlite3.connect(path) as con:
        return {m: (n, d) for m, n, d in con.execute(
            "SELECT method, COUNT(*), COUNT(DISTINCT image_index) FROM explanations GROUP BY method")}


def image_sets(path):
    with sqlite3.connect(path) as con:
        out = {}
        for m, i in con.execute("SELECT method, image_index FROM explanations"):
            out.setdefault(m, set()).add(i)
        return out


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """A fresh folder holding the trained checkpoint: (run dir, checkpoint)."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained_run / "best.pt", run / "best.pt")
    return run, run / "best.pt"


def eval_cmd(checkpoint, syn_dir, *extra):
    return ["evaluate.py", "--checkpoint", str(checkpoint), "--data-dir", str(syn_dir), "--threads", "1", *extra]


# ----------------------------------------------------------------------------- a killed rank

def worker_pid(rank, marker, timeout=60):
    """The pid of torchrun's worker process of `rank` whose command line contains `marker`."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for d in Path("/proc").iterdir():
            try:
                cmd, env = (d / "cmdline").read_bytes(), (d / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker.encode() in cmd and f"RANK={rank}".encode() in env:
                return int(d.name)
        time.sleep(0.05)
    raise AssertionError(f"no rank {rank} process with {marker} appeared")


def committed_rows(path):
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1) as con:
            return con.execute("SELECT COUNT(*) FROM explanations").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_a_rank_killed_mid_explanation_is_completed_by_the_rerun(run_copy, syn_dir, tmp_path):
    run, checkpoint = run_copy
    shards = tmp_path / "shards"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *eval_cmd(checkpoint, syn_dir, "--explain", "all", "--methods", "ig,occlusion", "--ig-batch", "8",
                     "--quality", "0", "--shard-dir", str(shards))]
    first = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    victim = worker_pid(1, str(shards))
    end = time.monotonic() + 120
    while committed_rows(next(shards.glob("*-rank1.db"), shards / "none")) < 8 and time.monotonic() < end:
        time.sleep(0.02)  # until rank 1 has committed a batch of its shard
    os.kill(victim, signal.SIGKILL)
    first.communicate(timeout=120)
    assert first.returncode != 0  # torchrun stops the job when a rank dies
    stores = [run / "explanations.db", *shards.glob("*.db")]
    assert len(stores) == 3 and all(integrity(p) == "ok" for p in stores)

    rerun = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    every = set(range(300))  # --explain all: the whole synthetic test split
    assert image_sets(run / "explanations.db") == {"ig": every, "occlusion": every}
    assert rows_by_method(run / "explanations.db") == {"ig": (300, 300), "occlusion": (300, 300)}
    assert integrity(run / "explanations.db") == "ok"
    assert list(shards.iterdir()) == []


# ----------------------------------------------------------------------------- two writers

def test_two_evaluate_runs_on_one_store_both_finish_without_duplicates(run_copy, syn_dir):
    run, checkpoint = run_copy
    cmd = [sys.executable, *eval_cmd(checkpoint, syn_dir, "--explain", "150", "--ig-batch", "8", "--quality", "10",
                                     "--methods", "ig,saliency", "--explain-errors", "0")]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    for p, err in zip(procs, errors, strict=True):
        assert "Traceback" not in err and "database is locked" not in err
        assert p.returncode == 0 or (p.returncode == 1 and "error:" in err), err[-2000:]
    assert any(p.returncode == 0 for p in procs)
    assert rows_by_method(run / "explanations.db") == {"ig": (150, 150), "saliency": (150, 150)}
    with sqlite3.connect(run / "explanations.db") as con:
        rows = 10 * (2 + len(quality.CONTROLS))  # 10 images: ig, saliency and the controls, each once
        counted = con.execute("SELECT COUNT(*), COUNT(DISTINCT image_index || method) FROM quality").fetchone()
        assert counted == (rows, rows)
    assert integrity(run / "explanations.db") == "ok"


# ----------------------------------------------------------------------------- a full disk

def test_a_full_disk_mid_explanation_keeps_committed_batches_and_the_rerun_completes(run_copy, syn_dir, monkeypatch):
    run, checkpoint = run_copy
    store = run / "explanations.db"
    real_connect = db.connect

    def small_disk(path, create=True):  # room for a few batches of maps, then SQLITE_FULL
        conn = real_connect(path, create)
        conn.execute(f"PRAGMA max_page_count = {conn.execute('PRAGMA page_count').fetchone()[0] + 40}")
        return conn
    monkeypatch.setattr(db, "connect", small_disk)
    argv = eval_cmd(checkpoint, syn_dir, "--explain", "100", "--ig-batch", "8", "--quality", "0",
                    "--methods", "ig", "--explain-errors", "0")[1:]
    with pytest.raises(db.DBError, match="disk is full") as failure:
        evaluate.main(argv)
    assert str(store) in str(failure.value) and "MB free" in str(failure.value)
    from tqdm import tqdm
    assert not list(tqdm._instances)  # an open bar would be redrawn by tqdm's monitor thread for ever after
    kept, _ = rows_by_method(store)["ig"]
    assert 0 < kept < 100 and kept % 8 == 0  # whole batches only
    assert integrity(store) == "ok"

    monkeypatch.undo()
    evaluate.main(argv)
    assert rows_by_method(store) == {"ig": (100, 100)}


def test_a_full_disk_while_saving_a_checkpoint_keeps_the_previous_one(syn_dir, tmp_path, train_argv, monkeypatch):
    out = tmp_path / "run"
    real_open, opened = open, []

    def full_disk_open(path, mode="r", *args, **kwargs):  # the third last.pt runs out of space halfway
        f = real_open(path, mode, *args, **kwargs)
        if "w" in mode and ".last.tmp" in str(path):
            opened.append(path)
            if len(opened) == 3:
                f.write(b"half a checkpoint")
                f.close()
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return f
    monkeypatch.setattr(model_lib, "open", full_disk_open, raising=False)
    with pytest.raises(files.FileError, match="disk is full") as failure:
        train.main(train_argv(syn_dir, out, "--epochs", "3"))
    assert str(out / "last.pt") in str(failure.value) and "needs about" in str(failure.value)
    _, meta = model_lib.load_checkpoint(out / "last.pt")
    assert [r["epoch"] for r in meta["history"]] == [1, 2]
    model_lib.load_checkpoint(out / "best.pt")
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["best.pt", "history.csv", "last.pt"]

    monkeypatch.undo()
    train.main(train_argv(syn_dir, out, "--epochs", "3", "--resume"))
    _, meta = model_lib.load_checkpoint(out / "last.pt")
    assert [r["epoch"] for r in meta["history"]] == [1, 2, 3]


# ----------------------------------------------------------------------------- readers during writes

def test_readers_during_writes_are_never_blocked_and_see_whole_batches(run_copy, syn_dir):
    run, checkpoint = run_copy
    store = run / "explanations.db"
    writer = subprocess.Popen([sys.executable, *eval_cmd(checkpoint, syn_dir, "--explain", "all", "--ig-batch", "10",
                                                         "--quality", "0", "--methods", "ig,occlusion")],
                              cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while writer.poll() is None and committed_rows(store) == 0:
        time.sleep(0.02)
    seen, slowest, summaries = set(), 0.0, []
    while writer.poll() is None:
        t0 = time.monotonic()
        conn = db.connect(store, create=False)  # this repo's read-only reader
        n_ours = conn.execute("SELECT COUNT(*) FROM explanations").fetchone()[0]
        conn.close()
        with sqlite3.connect(store) as con:  # plain sqlite3
            n_plain = con.execute("SELECT COUNT(*) FROM explanations").fetchone()[0]
        slowest = max(slowest, time.monotonic() - t0)
        seen |= {n_ours, n_plain}
        if len(summaries) < 1:
            summaries.append(subprocess.run([sys.executable, "db.py", str(store)], cwd=ROOT, capture_output=True,
                                            text=True, timeout=60))
        time.sleep(0.05)
    assert writer.wait() == 0, writer.stderr.read()[-2000:]
    assert all(n % 10 == 0 for n in seen), sorted(seen)  # 300 images, batches of 10, two methods
    assert any(0 < n < 600 for n in seen)  # the reads did happen while the writer was writing
    assert slowest < 2.0  # nowhere near the 30 s a blocked reader would wait
    assert summaries[0].returncode == 0 and "explanations" in summaries[0].stdout, summaries[0].stderr


# ----------------------------------------------------------------------------- unwritable output

def test_train_refuses_an_unwritable_out_before_reading_any_data(tmp_path, train_argv):
    (tmp_path / "a_file").write_text("in the way")
    with pytest.raises(files.FileError, match="Cannot write to") as failure:
        train.main(train_argv(tmp_path / "no_data_here", tmp_path / "a_file" / "run"))
    assert "--out" in str(failure.value)


def test_evaluate_refuses_an_unwritable_images_folder_before_any_work(run_copy, tmp_path):
    run, checkpoint = run_copy
    (tmp_path / "a_file").write_text("in the way")
    with pytest.raises(files.FileError, match="Cannot write to") as failure:
        evaluate.main(["--checkpoint", str(checkpoint), "--data-dir", str(tmp_path / "no_data_here"),
                       "--figures", str(tmp_path / "a_file" / "images")])
    assert "--figures" in str(failure.value)
    assert not (run / "explanations.db").exists()
