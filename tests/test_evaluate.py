"""evaluate.py: MedMNIST metrics, calibration, the SQLite store under reruns and kills, CLI errors."""
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import attribution as attr
import colour
import data
import datasets
import db
import evaluate
import explanations
import model as model_lib
import quality
import synthetic
import train
import trust

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_METHODS = list(attr.DEFAULT_METHODS)  # what evaluated_run stores, for each image


def explained(metrics):
    """Images explained by evaluated_run: its 60, and the model's errors among the rest (--explain-errors)."""
    assert metrics["effective"]["explain"] > 60 and metrics["effective"]["quality"] == 20  # errors: not scored
    return metrics["effective"]["explain"]


def assert_a_drawn_picture(path):
    """A PNG of a sensible size with real content: text, lines or images, not one flat colour."""
    from PIL import Image
    with Image.open(path) as img:
        assert img.format == "PNG" and min(img.size) >= 200, (path, img.size)
        colours = np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0)
    assert len(colours) > 50, path


# ----------------------------------------------------------------------------- end to end

def test_evaluate_writes_metrics_plots_and_one_row_per_explained_image(evaluated_run):
    run_dir, metrics = evaluated_run
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["tta"] is False and saved["provenance"]["synthetic"] is True
    assert {"acc", "auc", "ece", "per_class", "confusion_matrix"} <= set(saved)
    assert saved["acc"] > 0.8
    for name in ("confusion_matrix.png", "ig_examples.png"):
        assert_a_drawn_picture(run_dir / "images" / name)
    conn = db.connect(run_dir / "explanations.db", create=False)
    assert conn.execute("SELECT COUNT(*) FROM explanations").fetchone()[0] == explained(metrics) * len(DEFAULT_METHODS)
    ig = saved["explanations"]["ig"]["quality"]
    assert ig["completeness_images"] == explained(saved) and ig["mean_relative_error"] < 0.05


def test_igs_completeness_is_in_metrics_once_over_every_stored_map(evaluated_run):
    run_dir, _ = evaluated_run
    saved = json.loads((run_dir / "metrics.json").read_text())

    def keys(value, path=""):
        if isinstance(value, dict):
            return [k for key, v in value.items() for k in [f"{path}.{key}", *keys(v, f"{path}.{key}")]]
        return []
    ig = [k for k in keys(saved["explanations"]["ig"]) if "complete" in k or "relative_error" in k]
    assert sorted(ig) == [".quality.completeness_images", ".quality.completeness_share", ".quality.mean_relative_error"]
    assert saved["explanations"]["ig"]["quality"]["completeness_images"] == explained(saved) > 60  # not the scored 20


def test_every_misclassified_test_image_is_explained_beside_the_first_60(evaluated_run, syn_dir):
    run_dir, metrics = evaluated_run
    probs = np.loadtxt(run_dir / "predictions_test.csv", delimiter=",")[:, 1:]  # the run's own predictions
    labels = data.load(syn_dir, 28, synthetic=True).test.labels.numpy().reshape(-1)
    wrong = set(np.flatnonzero(probs.argmax(1) != labels).tolist())
    conn = db.connect(run_dir / "explanations.db", create=False)
    stored = set(db.done_indices(conn, metrics["store"]["run_id"], "test"))
    first = set(explanations.explanation_indices(len(labels), "60"))
    assert wrong - first and wrong <= stored and stored == first | wrong


def test_evaluate_reports_quality_keys_and_draws_both_quality_figures(evaluated_run):
    run_dir, metrics = evaluated_run
    saved = json.loads((run_dir / "metrics.json").read_text())
    ig = saved["explanations"]["ig"]["quality"]
    for key in ("deletion_auc", "deletion_auc_random", "insertion_auc", "insertion_auc_random",
                "randomization_spearman", "mask_mass", "mask_area", "completeness_share", "smooth_mprt",
                "efficient_mprt", "random_logit", "road_morf", "road_lerf"):
        assert np.isfinite(ig[key]), key
    assert ig["images"] == 20 and set(saved["trust"]["ig"]) >= {"mprt", "smooth_mprt", "road", "completeness"}
    assert saved["recommended"] is None or saved["recommended"] in saved["explanations"]
    assert list(ig["randomization_modes"]["top_down"]) == ["classifier", "conv block 5", "conv block 4",
                                                           "conv block 3", "conv block 2", "conv block 1"]  # as figures
    assert "randomization_by_stage" not in ig  # top-down's Spearman per stage: randomization_modes holds it
    fully = ig["randomization_modes"]["top_down"]["conv block 1"]  # the headline is that number, not a 2nd mean
    assert (ig["randomization_spearman"], ig["randomization_ssim"]) == (fully["spearman"], fully["ssim"])
    for name in ("faithfulness.png", "sanity_randomization.png"):
        assert_a_drawn_picture(run_dir / "images" / name)


def test_every_published_test_of_a_run_is_failed_by_each_control_it_names(evaluated_run):
    _, metrics = evaluated_run
    table = metrics["trust"]
    scored = {t for row in table.values() for t in row}
    assert {t.name for t in trust.TESTS} - {"localisation"} <= scored  # completeness included
    for test in trust.TESTS:
        if test.name in scored:
            assert all(not table[c][test.name]["pass"] for c in test.must_fail), test.name
    assert trust.uninformative(table) == {}
    rec = metrics["recommended"]
    assert rec is None or all(t["pass"] for t in table[rec].values())
    # completeness is asked of the controls that claim it only: the one-step IG, not the input-only map
    assert "completeness" in table["control:ig_1step"] and "completeness" not in table["control:input"]


def test_stored_rows_agree_with_an_independent_forward_pass(evaluated_run, syn_dir):
    run_dir, metrics = evaluated_run
    conn = db.connect(run_dir / "explanations.db", create=False)
    rows = db.find(conn, metrics["store"]["run_id"], with_arrays=True)
    net, _ = model_lib.load_checkpoint(run_dir / "best.pt")
    images = np.load(syn_dir / "pathmnist_synthetic.npz")["test_images"][[r["image_index"] for r in rows]]
    with torch.no_grad():
        probs = torch.softmax(net(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255), 1).numpy()
    assert np.allclose([r["probs"] for r in rows], probs, atol=1e-5)
    assert [r["pred_label"] for r in rows] == probs.argmax(1).tolist()
    sums = [float(r["attribution"].astype(np.float64).sum()) for r in rows]
    gaps = [r["score"] - r["baseline_score"] + r["delta"] for r in rows]
    assert np.allclose(sums, gaps, rtol=0.02, atol=0.02)  # float16 storage rounding


def counting(monkeypatch, module, name):
    """Replace module.name with a wrapper that records each call; returns the list of calls."""
    calls, real = [], getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_identical_rerun_computes_no_explanation_and_no_quality(evaluated_run, syn_dir, monkeypatch, tmp_path):
    shared, metrics = evaluated_run
    run_dir = tmp_path / "run"  # a copy: other tests read the shared run's files meanwhile
    shutil.copytree(shared, run_dir)
    ig_calls = counting(monkeypatch, attr, "explain_batch")
    quality_calls = counting(monkeypatch, quality, "quality_measures")
    again = evaluate.main(["--checkpoint", str(run_dir / "best.pt"), "--data-dir", str(syn_dir),
                           "--explain", "60", "--quality", "20", "--figures", str(run_dir / "images")])
    assert ig_calls == [] and quality_calls == []
    assert again["store"]["run_id"] == metrics["store"]["run_id"]
    assert again["explanations"]["ig"]["quality"]["images"] == 20
    conn = db.connect(run_dir / "explanations.db", create=False)
    assert conn.execute("SELECT COUNT(*) FROM explanations").fetchone()[0] == explained(metrics) * len(DEFAULT_METHODS)


def test_tta_is_recorded_in_the_metrics(trained_run, syn_dir, tmp_path):
    m = evaluate.main(["--checkpoint", str(trained_run / "best.pt"), "--data-dir", str(syn_dir),
                       "--tta", "--explain", "0", "--methods", "ig", "--figures", str(tmp_path),
                       "--db", str(tmp_path / "e.db")])
    assert m["tta"] is True and m["acc"] > 0.8


def test_data_with_another_md5_is_refused(trained_run, tmp_path):
    synthetic.write_synthetic(tmp_path / datasets.synthetic_file_name(28), 28, seed=5,
                         counts={"train": 20, "val": 10, "test": 10})
    with pytest.raises(data.DataError, match="MD5"):
        evaluate.main(["--checkpoint", str(trained_run / "best.pt"), "--data-dir", str(tmp_path)])


def test_killed_writer_leaves_a_consistent_db_and_resume_completes(trained_run, syn_dir, tmp_path, threads):
    dbp = tmp_path / "e.db"
    cmd = [sys.executable, "evaluate.py", "--checkpoint", str(trained_run / "best.pt"),
           "--data-dir", str(syn_dir), "--explain", "120", "--explain-errors", "0", "--db", str(dbp), "--ig-batch", "4",
           "--n-steps", "64", "--quality", "0", "--methods", "ig", "--figures", str(tmp_path), "--threads", "1"]
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
    assert 12 <= partial < 120 and partial % 4 == 0  # whole batches only
    conn.close()
    subprocess.run(cmd[:-2] + ["--threads", threads, "--n-steps", "64"], cwd=ROOT, check=True,
                   capture_output=True, timeout=300)
    conn = sqlite3.connect(dbp)
    total, distinct = conn.execute(
        "SELECT COUNT(*), COUNT(DISTINCT image_index) FROM explanations").fetchone()
    assert total == distinct == 120


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
                     "--db", str(tmp_path / "x.db"), "--figures", str(tmp_path))
    assert result.returncode == 1 and "not an SQLite database" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_finished_store_is_one_file_that_reading_leaves_as_it_is(evaluated_run):
    run_dir, _ = evaluated_run
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    assert "explanations.db-wal" not in before  # no write-ahead log left beside it
    result = subprocess.run([sys.executable, "db.py", str(run_dir / "explanations.db")], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_db_cli_summarises_a_store(evaluated_run):
    run_dir, metrics = evaluated_run
    result = subprocess.run([sys.executable, "db.py", str(run_dir / "explanations.db")], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and f"{explained(metrics)} explanations" in result.stdout
    assert "quality ig: 20 images" in result.stdout


def test_db_cli_refuses_a_file_that_is_not_a_db(tmp_path):
    (tmp_path / "x.db").write_text("no" * 100)
    result = subprocess.run([sys.executable, "db.py", str(tmp_path / "x.db")], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "not an SQLite database" in result.stderr


# ----------------------------------------------------------------------------- which class is explained

@pytest.fixture(scope="module")
def untrained_run(syn_dir, tmp_path_factory):
    """A checkpoint of an untrained model on the synthetic set: most of its predictions are wrong."""
    ds = data.load(syn_dir, 28, synthetic=True)
    torch.manual_seed(3)
    net = model_lib.build(mean=colour.channel_stats(ds.train.images)[0])
    path = tmp_path_factory.mktemp("untrained") / "best.pt"
    args = train.parse_args(["--synthetic"])  # the metadata train.py writes, for a model it never trained
    model_lib.save_checkpoint(path, net.eval(), {
        "class_names": ds.class_names, "task": ds.task, "provenance": ds.provenance(),
        "settings": {**{k: getattr(args, k) for k in train.RESULT_SETTINGS if k != "world_size"}, "world_size": 1},
        "colour_reference": colour.colour_reference(ds.train.images, ds.val.images), "history": [],
        "best_epoch": None, "torch": str(torch.__version__)})
    return path


def explained_rows(checkpoint, syn_dir, tmp_path, *flags):
    evaluate.main(["--checkpoint", str(checkpoint), "--data-dir", str(syn_dir), "--explain", "40",
                   "--quality", "0", "--methods", "ig", "--db", str(tmp_path / "e.db"), "--figures", str(tmp_path),
                   *flags])
    conn = db.connect(tmp_path / "e.db", create=False)
    return db.find(conn, db.get_run(conn)["run_id"])


def test_target_pred_explains_the_predicted_class_even_when_it_is_wrong(untrained_run, syn_dir, tmp_path):
    rows = explained_rows(untrained_run, syn_dir, tmp_path, "--target", "pred")
    assert sum(r["true_label"] != r["pred_label"] for r in rows) >= 10
    assert [r["target"] for r in rows] == [r["pred_label"] for r in rows]


def test_target_true_explains_the_true_class(untrained_run, syn_dir, tmp_path):
    rows = explained_rows(untrained_run, syn_dir, tmp_path, "--target", "true")
    assert sum(r["true_label"] != r["pred_label"] for r in rows) >= 10
    assert [r["target"] for r in rows] == [r["true_label"] for r in rows]


def test_stored_scores_are_the_models_outputs_at_the_image_and_at_the_mean_colour(untrained_run, syn_dir, tmp_path):
    rows = explained_rows(untrained_run, syn_dir, tmp_path, "--target", "true")
    net, _ = model_lib.load_checkpoint(untrained_run)
    images = np.load(syn_dir / "pathmnist_synthetic.npz")["test_images"][[r["image_index"] for r in rows]]
    pixels = np.load(syn_dir / "pathmnist_synthetic.npz")["train_images"].astype(np.float64) / 255
    flat = torch.tensor(pixels.mean((0, 1, 2)), dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, 28, 28)
    targets = torch.tensor([r["target"] for r in rows])
    with torch.no_grad():
        at_image = net(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)[torch.arange(len(rows)), targets]
        at_mean = net(flat)[0, targets]
    assert np.allclose([r["score"] for r in rows], at_image.numpy(), atol=1e-4)
    assert np.allclose([r["baseline_score"] for r in rows], at_mean.numpy(), atol=1e-4)


def test_printed_count_is_the_count_the_store_added(trained_run, syn_dir, tmp_path, monkeypatch, capsys):
    real = db.insert_explanations
    monkeypatch.setattr(db, "insert_explanations", lambda conn, rows: real(conn, rows[1:]))  # one row per batch lost
    evaluate.main(["--checkpoint", str(trained_run / "best.pt"), "--data-dir", str(syn_dir), "--explain", "8",
                   "--ig-batch", "4", "--quality", "0", "--methods", "ig", "--db", str(tmp_path / "e.db"),
                   "--figures", str(tmp_path), "--explain-errors", "0"])
    assert "Stored 6 explanations" in capsys.readouterr().out


def test_metrics_json_describes_everything_stored_after_a_smaller_rerun(trained_run, syn_dir, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "best.pt").write_bytes((trained_run / "best.pt").read_bytes())

    def run(n):
        evaluate.main(["--checkpoint", str(run_dir / "best.pt"), "--data-dir", str(syn_dir), "--explain", n,
                       "--quality", n, "--methods", "ig", "--explain-errors", "0"])
        return json.loads((run_dir / "metrics.json").read_text())
    run("12")
    saved = run("4")
    assert saved["explanations"]["ig"]["quality"]["completeness_images"] == 12
    assert saved["explanations"]["ig"]["quality"]["images"] == 12
    assert saved["requested"] == {"explain": "4", "explain_errors": 0, "quality": "4"}
    assert saved["effective"] == {"explain": 4, "quality": 4}
    assert (run_dir / "images" / "ig_examples.png").is_file()  # the run's figures stay in its folder


def test_tta_is_refused_for_a_model_trained_without_flips(syn_dir, tmp_path, train_argv):
    import train
    train.main(train_argv(syn_dir, tmp_path, "--epochs", "1", "--flips", "off"))
    with pytest.raises(evaluate.EvaluateError, match="without them"):
        evaluate.main(["--checkpoint", str(tmp_path / "best.pt"), "--data-dir", str(syn_dir), "--tta"])


def test_methods_all_stores_scores_and_draws_every_method_beside_the_controls(trained_run, syn_dir, tmp_path, capsys):
    m = evaluate.main(["--checkpoint", str(trained_run / "best.pt"), "--data-dir", str(syn_dir),
                       "--explain", "8", "--quality", "2", "--methods", "all", "--explain-errors", "0",
                       "--db", str(tmp_path / "e.db"),
                       "--figures", str(tmp_path)])
    conn = db.connect(tmp_path / "e.db", create=False)
    run = m["store"]["run_id"]
    assert db.explanation_methods(conn, run) == ["ig", *sorted(list(attr.METHODS)[1:])]
    assert all(len(db.done_indices(conn, run, "test", method)) == 8 for method in attr.METHODS)
    assert sorted(m["explanations"]) == sorted(attr.METHODS)
    assert sorted(m["controls"]) == ["control:edge", "control:ig_1step", "control:input", "control:random"]
    scored = [e["quality"] for e in m["explanations"].values()] + list(m["controls"].values())
    assert all(q["images"] == 2 and set(q["randomization_modes"]) == {"top_down", "bottom_up", "single"}
               for q in scored)
    assert sorted(m["trust"]) == sorted([*attr.METHODS, *m["controls"]])
    table = capsys.readouterr().out
    assert all(f"  {name} " in table for name in m["trust"])  # one table of methods x measures
    assert (tmp_path / "methods.png").stat().st_size > 20_000 and (tmp_path / "sanity_randomization.png").exists()


def test_an_unknown_method_is_refused_with_the_list():
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--methods", "ig,lime"])
    assert attr.methods_arg("gradcam,saliency") == ["ig", "saliency", "gradcam"]


def test_medmnists_resnet18_trains_and_is_explained_through_the_same_scripts(tmp_path, train_argv, threads):
    import synthetic
    import train
    small = tmp_path / "data"
    synthetic.write_synthetic(small / "pathmnist_synthetic.npz", 28, counts={"train": 64, "val": 16, "test": 16})
    train.main(train_argv(small, tmp_path / "r18", "--epochs", "1", "--arch", "resnet18", "--batch-size", "32"))
    m = evaluate.main(["--checkpoint", str(tmp_path / "r18" / "best.pt"), "--data-dir", str(small), "--explain", "4",
                       "--quality", "1", "--methods", "ig,gradcam", "--threads", threads, "--explain-errors", "0"])
    assert m["params"] == 11_689_512 - 9_408 - 513_000 + 1_728 + 4_617  # see test_bench
    assert m["explanations"]["ig"]["quality"]["completeness_images"] == 4
    assert set(m["explanations"]) == {"ig", "gradcam"} and len(m["controls"]) == len(quality.CONTROLS)
    assert list(m["explanations"]["ig"]["quality"]["randomization_modes"]["top_down"])[:2] == ["classifier", "layer4"]
