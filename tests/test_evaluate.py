"""evaluate.py: MedMNIST metrics, calibration, the SQLite store under reruns and kills, CLI errors."""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from medmnist.evaluator import getACC, getAUC

import data
import db
import evaluate

ROOT = Path(__file__).resolve().parents[1]


def random_scores(n=200, k=9, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 2 * np.eye(k)[labels] * rng.random((n, 1))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return labels, probs


def test_acc_and_auc_are_medmnists_on_the_same_scores():
    labels, probs = random_scores()
    m = evaluate.classification_metrics(labels, probs, [str(i) for i in range(9)])
    assert m["acc"] == getACC(labels, probs, "multi-class")
    assert m["auc"] == getAUC(labels, probs, "multi-class")
    assert m["acc"] == pytest.approx((probs.argmax(1) == labels).mean())


def test_per_class_precision_recall_and_confusion_matrix_count_correctly():
    labels, probs = random_scores()
    m = evaluate.classification_metrics(labels, probs, [str(i) for i in range(9)])
    pred = probs.argmax(1)
    for c, row in enumerate(m["per_class"]):
        assert row["precision"] == pytest.approx(((pred == c) & (labels == c)).sum() / (pred == c).sum())
        assert row["recall"] == pytest.approx(((pred == c) & (labels == c)).sum() / (labels == c).sum())
        assert m["confusion_matrix"][c][c] == ((pred == c) & (labels == c)).sum()
    assert np.sum(m["confusion_matrix"]) == len(labels)


def test_ece_is_zero_when_confidence_equals_accuracy():
    # 10 predictions at 80% confidence, 8 of them right.
    probs = np.full((10, 2), 0.2)
    probs[:, 0] = 0.8
    labels = np.array([0] * 8 + [1] * 2)
    assert evaluate.expected_calibration_error(probs, labels) == pytest.approx(0.0)


def test_ece_measures_overconfidence():
    probs = np.full((10, 2), 0.05)
    probs[:, 0] = 0.95
    labels = np.array([0] * 5 + [1] * 5)  # 95% confident, 50% right
    assert evaluate.expected_calibration_error(probs, labels) == pytest.approx(0.45)


def test_explained_images_are_a_fixed_choice():
    assert evaluate.explanation_indices(100, "10") == evaluate.explanation_indices(100, "10")
    assert sorted(evaluate.explanation_indices(100, "all")) == list(range(100))
    assert evaluate.explanation_indices(5, "10") != []


# ----------------------------------------------------------------------------- end to end

def test_evaluate_writes_metrics_plots_and_one_row_per_explained_image(evaluated_run):
    run_dir, metrics = evaluated_run
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["tta"] is False and saved["provenance"]["synthetic"] is True
    assert {"acc", "auc", "ece", "per_class", "confusion_matrix"} <= set(saved)
    assert saved["acc"] > 0.8
    for name in ("confusion_matrix.png", "ig_examples.png"):
        assert (run_dir / "images" / name).stat().st_size > 0
    conn = db.connect(run_dir / "explanations.db", create=False)
    assert conn.execute("SELECT COUNT(*) FROM explanations").fetchone()[0] == 60
    assert saved["ig"]["explained"] == 60 and saved["ig"]["mean_relative_completeness_error"] < 0.05


def test_evaluate_reports_quality_keys_and_draws_both_quality_figures(evaluated_run):
    run_dir, metrics = evaluated_run
    saved = json.loads((run_dir / "metrics.json").read_text())
    for key in ("deletion_auc", "deletion_auc_random", "insertion_auc", "insertion_auc_random",
                "randomization_spearman", "mask_mass", "mask_area", "completeness_share"):
        assert np.isfinite(saved[key]), key
    assert saved["quality_images"] == 60 and saved["randomization_check"] in ("passed", "failed")
    assert list(saved["randomization_by_stage"]) == ["classifier", "features.4", "features.3",
                                                     "features.2", "features.1", "features.0"]
    for name in ("faithfulness.png", "sanity_randomization.png"):
        assert (run_dir / "images" / name).stat().st_size > 0


def test_stored_rows_agree_with_the_model(evaluated_run, syn_dir):
    run_dir, metrics = evaluated_run
    conn = db.connect(run_dir / "explanations.db", create=False)
    rows = db.find(conn, metrics["ig"]["run_id"], with_arrays=True)
    assert all(r["pred_label"] == int(np.argmax(r["probs"])) for r in rows)
    assert all(abs(r["confidence"] - float(np.max(r["probs"]))) < 1e-6 for r in rows)
    sums = [float(r["attribution"].astype(np.float64).sum()) for r in rows]
    gaps = [r["score"] - r["baseline_score"] + r["delta"] for r in rows]
    assert np.allclose(sums, gaps, rtol=0.02, atol=0.02)  # float16 storage rounding


def test_rerun_with_same_settings_adds_no_rows(evaluated_run, syn_dir, capsys):
    run_dir, metrics = evaluated_run
    again = evaluate.main(["--checkpoint", str(run_dir / "best.pt"), "--data-dir", str(syn_dir),
                           "--explain", "60", "--images", str(run_dir / "images")])
    assert "nothing to compute" in capsys.readouterr().out
    assert again["ig"]["run_id"] == metrics["ig"]["run_id"]
    conn = db.connect(run_dir / "explanations.db", create=False)
    assert conn.execute("SELECT COUNT(*) FROM explanations").fetchone()[0] == 60


def test_tta_is_recorded_in_the_metrics(trained_run, syn_dir, tmp_path):
    m = evaluate.main(["--checkpoint", str(trained_run / "best.pt"), "--data-dir", str(syn_dir),
                       "--tta", "--explain", "0", "--images", str(tmp_path), "--db", str(tmp_path / "e.db")])
    assert m["tta"] is True and m["acc"] > 0.8


def test_data_with_another_md5_is_refused(trained_run, tmp_path):
    data.write_synthetic(tmp_path / data.synthetic_file_name(28), 28, seed=5,
                         counts={"train": 20, "val": 10, "test": 10})
    with pytest.raises(data.DataError, match="MD5"):
        evaluate.main(["--checkpoint", str(trained_run / "best.pt"), "--data-dir", str(tmp_path)])


def test_killed_writer_leaves_a_consistent_db_and_resume_completes(trained_run, syn_dir, tmp_path):
    dbp = tmp_path / "e.db"
    cmd = [sys.executable, "evaluate.py", "--checkpoint", str(trained_run / "best.pt"),
           "--data-dir", str(syn_dir), "--explain", "all", "--db", str(dbp), "--ig-batch", "4",
           "--n-steps", "64", "--images", str(tmp_path), "--threads", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stored = 0
    try:
        deadline = time.time() + 120
        while time.time() < deadline and stored < 12:
            time.sleep(0.05)
            if dbp.exists():
                try:
                    stored = sqlite3.connect(dbp).execute("SELECT COUNT(*) FROM explanations").fetchone()[0]
                except sqlite3.OperationalError:
                    pass  # tables not created yet
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    conn = sqlite3.connect(dbp)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    partial = conn.execute("SELECT COUNT(*) FROM explanations").fetchone()[0]
    assert 12 <= partial < 300 and partial % 4 == 0  # whole batches only
    conn.close()
    subprocess.run(cmd[:-2] + ["--threads", "2", "--n-steps", "64"], cwd=ROOT, check=True,
                   capture_output=True, timeout=300)
    conn = sqlite3.connect(dbp)
    total, distinct = conn.execute(
        "SELECT COUNT(*), COUNT(DISTINCT image_index) FROM explanations").fetchone()
    assert total == distinct == 300


def run_cli(*args):
    return subprocess.run([sys.executable, "evaluate.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=180)


def test_missing_checkpoint_exits_1_and_says_to_train(tmp_path):
    result = run_cli("--checkpoint", str(tmp_path / "best.pt"))
    assert result.returncode == 1 and "python train.py" in result.stderr
    assert "Traceback" not in result.stderr


def test_db_path_that_is_not_a_db_exits_1(tmp_path, trained_run, syn_dir):
    (tmp_path / "x.db").write_text("plain text, not sqlite " * 50)
    result = run_cli("--checkpoint", str(trained_run / "best.pt"), "--data-dir", str(syn_dir),
                     "--db", str(tmp_path / "x.db"), "--images", str(tmp_path))
    assert result.returncode == 1 and "not an SQLite database" in result.stderr
    assert "Traceback" not in result.stderr


def test_db_cli_summarises_a_store(evaluated_run):
    run_dir, _ = evaluated_run
    result = subprocess.run([sys.executable, "db.py", str(run_dir / "explanations.db")], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "60 explanations" in result.stdout
    assert "quality ig: 60 images" in result.stdout


def test_db_cli_refuses_a_file_that_is_not_a_db(tmp_path):
    (tmp_path / "x.db").write_text("no" * 100)
    result = subprocess.run([sys.executable, "db.py", str(tmp_path / "x.db")], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "not an SQLite database" in result.stderr
