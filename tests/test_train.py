"""train.py: learning, outputs, reproducibility, resume, early stopping, failures."""
import csv
import subprocess
import sys
from pathlib import Path

import pytest

import data
import model as model_lib
import train

ROOT = Path(__file__).resolve().parents[1]


def without_seconds(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def test_short_run_learns_the_synthetic_classes(trained_run):
    _, meta = model_lib.load_checkpoint(trained_run / "best.pt")
    best = max(row["val_acc"] for row in meta["history"])
    assert best >= 0.8  # chance is 1/9


def test_run_writes_checkpoints_history_and_curves(trained_run):
    for name in ("best.pt", "last.pt", "history.csv", "images/accuracy_epoch.png"):
        assert (trained_run / name).stat().st_size > 0, name
    with open(trained_run / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == train.HISTORY_COLUMNS
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]


def test_checkpoint_records_provenance_and_settings(trained_run, syn_dir):
    _, meta = model_lib.load_checkpoint(trained_run / "last.pt")
    prov = meta["provenance"]
    assert prov["synthetic"] is True and prov["dataset"] == "pathmnist-synthetic"
    assert prov["md5"] == data.calculate_md5(syn_dir / "pathmnist_synthetic.npz")
    assert meta["settings"]["seed"] == 0 and meta["settings"]["epochs"] == 4
    assert len(meta["class_names"]) == 9


def test_normalisation_comes_from_the_training_split(trained_run, syn_dir):
    net, _ = model_lib.load_checkpoint(trained_run / "best.pt")
    ds = data.load(syn_dir, 28, synthetic=True)
    assert net.config["mean"] == pytest.approx(data.channel_stats(ds.train.images)[0])


def test_same_seed_gives_the_same_history(syn_dir, tmp_path, train_argv):
    a = train.main(train_argv(syn_dir, tmp_path / "a", "--epochs", "2"))
    b = train.main(train_argv(syn_dir, tmp_path / "b", "--epochs", "2"))
    assert without_seconds(a) == without_seconds(b)


def test_resume_continues_exactly_where_the_run_stopped(syn_dir, tmp_path, trained_run, train_argv):
    train.main(train_argv(syn_dir, tmp_path, "--epochs", "2"))
    resumed = train.main(train_argv(syn_dir, tmp_path, "--epochs", "4", "--resume"))
    _, straight = model_lib.load_checkpoint(trained_run / "last.pt")
    assert [r["epoch"] for r in resumed] == [1, 2, 3, 4]
    assert without_seconds(resumed) == without_seconds(straight["history"])


def test_early_stopping_fires_on_a_plateau(syn_dir, tmp_path, train_argv):
    # With lr 0 the weights never change, so the validation loss cannot improve after epoch 1.
    history = train.main(train_argv(syn_dir, tmp_path, "--epochs", "10", "--lr", "0", "--patience", "2"))
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert model_lib.read_checkpoint(tmp_path / "last.pt")["train_state"]["bad_epochs"] == 2


def test_ctrl_c_keeps_last_finished_epoch_and_resume_completes(syn_dir, tmp_path, monkeypatch, train_argv):
    real_epoch, calls = train.train_epoch, []

    def interrupted_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)
    monkeypatch.setattr(train, "train_epoch", interrupted_in_epoch_2)
    train.main(train_argv(syn_dir, tmp_path, "--epochs", "3"))
    state = model_lib.read_checkpoint(tmp_path / "last.pt")
    assert state["train_state"]["epoch"] == 1
    monkeypatch.setattr(train, "train_epoch", real_epoch)
    history = train.main(train_argv(syn_dir, tmp_path, "--epochs", "3", "--resume"))
    assert [r["epoch"] for r in history] == [1, 2, 3]


def test_nan_loss_stops_with_a_clear_error(syn_dir, tmp_path, monkeypatch, train_argv):
    monkeypatch.setattr(train.F, "cross_entropy", lambda logits, y: logits.sum() * float("nan"))
    with pytest.raises(train.TrainingError, match="Lower --lr"):
        train.main(train_argv(syn_dir, tmp_path, "--epochs", "1"))


def test_resume_onto_other_data_is_refused(syn_dir, tmp_path, trained_run, train_argv):
    (tmp_path / "last.pt").write_bytes((trained_run / "last.pt").read_bytes())
    other = tmp_path / "other"
    other.mkdir()
    data.write_synthetic(other / "pathmnist_synthetic.npz", 28, seed=1,
                                   counts={"train": 50, "val": 20, "test": 20})
    with pytest.raises(train.TrainingError, match="trained on"):
        train.main(train_argv(other, tmp_path, "--epochs", "5", "--resume"))


def run_cli(*args):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_help_explains_every_flag():
    out = run_cli("--help").stdout
    for flag in ("--epochs", "--batch-size", "--lr", "--patience", "--seed", "--device",
                 "--data-dir", "--size", "--out", "--synthetic", "--resume", "--threads"):
        assert flag in out


def test_corrupt_data_exits_1_with_a_paragraph_not_a_traceback(tmp_path):
    (tmp_path / "pathmnist_synthetic.npz").write_bytes(b"garbage")
    result = run_cli("--synthetic", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run"))
    assert result.returncode == 1
    assert result.stderr.startswith("error:") and "Traceback" not in result.stderr
    assert "Delete it and rerun" in result.stderr


def test_resume_without_a_run_exits_1_and_says_how_to_train(tmp_path, syn_dir, train_argv):
    result = run_cli(*train_argv(syn_dir, tmp_path / "none", "--resume"))
    assert result.returncode == 1 and "python train.py" in result.stderr
    assert "Traceback" not in result.stderr
