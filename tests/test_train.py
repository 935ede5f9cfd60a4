"""train.py: learning, outputs, reproducibility, resume, early stopping, failures."""
import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TRAINED_EPOCHS
from PIL import Image

import augment
import data
import datasets
import engine
import model as model_lib
import synthetic
import train

pytestmark = pytest.mark.trains  # every test here trains a model

ROOT = Path(__file__).resolve().parents[1]


def without_seconds(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def test_short_run_learns_the_synthetic_classes(trained_run):
    _, meta = model_lib.load_checkpoint(trained_run / "best.pt")
    best = max(row["val_acc"] for row in meta["history"])
    assert best >= 0.8  # chance is 1/9


def test_run_writes_checkpoints_history_and_curves(trained_run):
    for name in ("best.pt", "last.pt", "history.csv"):
        assert (trained_run / name).stat().st_size > 0, name
    with Image.open(trained_run / "images" / "accuracy_epoch.png") as img:
        assert img.size == (1200, 480)  # 10 x 4 inches at 120 dpi: both panels
        assert len(np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0)) > 50
    with open(trained_run / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == train.HISTORY_COLUMNS
    assert [int(r["epoch"]) for r in rows] == list(range(1, TRAINED_EPOCHS + 1))


def test_checkpoint_records_provenance_and_settings(trained_run, syn_dir):
    _, meta = model_lib.load_checkpoint(trained_run / "last.pt")
    prov = meta["provenance"]
    assert prov["synthetic"] is True and prov["dataset"] == "pathmnist-synthetic"
    assert prov["md5"] == data.calculate_md5(syn_dir / "pathmnist_synthetic.npz")
    assert meta["settings"]["seed"] == 0 and meta["settings"]["epochs"] == TRAINED_EPOCHS
    assert len(meta["class_names"]) == 9


def test_normalisation_comes_from_the_training_split(trained_run, syn_dir):
    net, _ = model_lib.load_checkpoint(trained_run / "best.pt")
    pixels = np.load(syn_dir / "pathmnist_synthetic.npz")["train_images"].astype(np.float64) / 255
    for key, expected in (("mean", pixels.mean((0, 1, 2))), ("std", pixels.std((0, 1, 2)))):
        assert net.config[key] == pytest.approx(expected.tolist(), rel=1e-5), key
        assert getattr(net.normalize, key).flatten().tolist() == pytest.approx(expected.tolist(), rel=1e-5)


# ----------------------------------------------------------------------------- model selection

# Scripted losses per epoch: validation is best at epoch 2 and never improves again, while the
# training loss always falls, so a run that watched training loss would neither stop nor keep epoch 2.
VAL_LOSSES = [1.0, 0.8, 0.9, 0.85, 0.95, 0.99, 1.1, 1.2, 1.3, 1.4]
TRAIN_LOSSES = [0.5 - 0.04 * e for e in range(10)]  # below every validation loss, too


@pytest.fixture
def scripted(monkeypatch):
    """Training whose losses are the scripted ones, epoch after epoch (a resume continues the
    script). The real training step still runs, so every epoch has its own weights; returns the
    list of weights seen by each validation."""
    val, tr, weights = iter(VAL_LOSSES), iter(TRAIN_LOSSES), []
    real_epoch = engine.train_epoch

    def train_epoch(*args, **kwargs):
        return next(tr), real_epoch(*args, **kwargs)[1]

    def evaluate_split(model, *args, **kwargs):
        weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return next(val), 0.5
    monkeypatch.setattr(engine, "train_epoch", train_epoch)
    monkeypatch.setattr(engine, "evaluate_split", evaluate_split)
    return weights


def same_weights(path, weights):
    saved = model_lib.read_checkpoint(path)["state_dict"]
    return all(torch.equal(saved[k], v) for k, v in weights.items())


def test_best_checkpoint_holds_the_lowest_validation_loss_epoch(syn_dir, tmp_path, train_argv, scripted):
    train.main(train_argv(syn_dir, tmp_path, "--epochs", "10", "--patience", "3"))
    assert same_weights(tmp_path / "best.pt", scripted[1])  # epoch 2
    assert same_weights(tmp_path / "last.pt", scripted[-1]) and not same_weights(tmp_path / "last.pt", scripted[1])
    assert model_lib.load_checkpoint(tmp_path / "best.pt")[1]["best_epoch"] == 2


def test_training_stops_after_patience_epochs_without_improvement(syn_dir, tmp_path, train_argv, scripted):
    history = train.main(train_argv(syn_dir, tmp_path, "--epochs", "10", "--patience", "3"))
    assert [r["epoch"] for r in history] == [1, 2, 3, 4, 5]  # epochs 3, 4, 5 did not beat epoch 2


def test_learning_rate_halves_after_two_epochs_without_improvement(syn_dir, tmp_path, train_argv, scripted):
    # --patience 3 gives the scheduler a patience of 1: it halves after the 2nd bad epoch (epoch 4).
    history = train.main(train_argv(syn_dir, tmp_path, "--epochs", "10", "--patience", "3"))
    assert [r["lr"] for r in history] == pytest.approx([1e-3, 1e-3, 1e-3, 1e-3, 5e-4])


def test_resume_keeps_the_best_loss_and_the_early_stopping_count(syn_dir, tmp_path, train_argv, scripted):
    train.main(train_argv(syn_dir, tmp_path, "--epochs", "3", "--patience", "3"))
    history = train.main(train_argv(syn_dir, tmp_path, "--epochs", "10", "--patience", "3", "--resume"))
    assert [r["epoch"] for r in history] == [1, 2, 3, 4, 5]
    assert same_weights(tmp_path / "best.pt", scripted[1])  # epoch 4's 0.85 does not beat 0.8
    assert [r["val_loss"] for r in history] == VAL_LOSSES[:5]


# ----------------------------------------------------------------------------- augmentation in use

@pytest.fixture
def jitter_calls(monkeypatch):
    calls = []
    real = augment.colour_jitter

    def counted(*args, **kwargs):
        calls.append(len(args[0]))
        return real(*args, **kwargs)
    monkeypatch.setattr(augment, "colour_jitter", counted)
    return calls


@pytest.mark.parametrize("strength, batches", [("1.0", 12), ("0", 0)])  # 1500 images, batches of 128
def test_colour_jitter_runs_on_every_training_batch_when_asked(syn_dir, tmp_path, train_argv, jitter_calls,
                                                               strength, batches):
    train.main(train_argv(syn_dir, tmp_path, "--epochs", "1", "--colour-jitter", strength,
                          "--stain-jitter", strength))
    assert len(jitter_calls) == batches and sum(jitter_calls) == (1500 if batches else 0)


def test_evaluation_never_jitters_colours(evaluated_run, syn_dir, jitter_calls, tmp_path):
    import shutil

    import evaluate
    run_dir, _ = evaluated_run
    shutil.copy(run_dir / "best.pt", tmp_path / "best.pt")  # metrics.json goes beside it: not the shared run's
    evaluate.main(["--checkpoint", str(tmp_path / "best.pt"), "--data-dir", str(syn_dir), "--tta",
                   "--explain", "4", "--quality", "2", "--db", str(tmp_path / "e.db"), "--figures", str(tmp_path)])
    assert jitter_calls == []


def test_same_seed_gives_the_same_history_and_the_same_checkpoint_bytes(syn_dir, tmp_path, train_argv):
    a = train.main(train_argv(syn_dir, tmp_path / "a", "--epochs", "2"))
    b = train.main(train_argv(syn_dir, tmp_path / "b", "--epochs", "2"))
    assert without_seconds(a) == without_seconds(b)
    # Other folders, other timings, yet the same file: evaluate.py sees the same checkpoint SHA-256.
    assert (tmp_path / "a" / "best.pt").read_bytes() == (tmp_path / "b" / "best.pt").read_bytes()


def test_training_from_memory_maps_gives_the_same_history_and_weights(syn_dir, tmp_path, train_argv):
    in_memory = train.main(train_argv(syn_dir, tmp_path / "ram", "--epochs", "2", "--memory", "ram"))
    mapped = train.main(train_argv(syn_dir, tmp_path / "map", "--epochs", "2", "--memory", "map"))
    assert without_seconds(mapped) == without_seconds(in_memory)
    assert (tmp_path / "map" / "best.pt").read_bytes() == (tmp_path / "ram" / "best.pt").read_bytes()
    assert any(data.cache_dir().glob("mapped/pathmnist_synthetic-*/train_images.npy"))


def test_amp_on_cpu_trains_in_bfloat16_and_learns(syn_dir, tmp_path, train_argv, monkeypatch):
    dtypes = set()
    real_forward = model_lib.TissueCNN.forward

    def forward(self, x):
        out = real_forward(self, x)
        if self.training:
            dtypes.add(out.dtype)
        return out
    monkeypatch.setattr(model_lib.TissueCNN, "forward", forward)
    history = train.main(train_argv(syn_dir, tmp_path, "--epochs", "4", "--batch-size", "32", "--amp", "on"))
    assert dtypes == {torch.bfloat16}  # the training passes ran under autocast
    assert max(r["val_acc"] for r in history) >= 0.5  # chance is 1/9; 0.70 measured
    assert model_lib.read_checkpoint(tmp_path / "best.pt")["state_dict"]["classifier.weight"].dtype == torch.float32


def test_default_run_folder_names_the_dataset_and_size_and_holds_its_figures(syn_dir, tmp_path, monkeypatch, threads):
    monkeypatch.chdir(tmp_path)
    train.main(["--synthetic", "--data-dir", str(syn_dir), "--epochs", "1", "--threads", threads])
    run = tmp_path / "runs" / "pathmnist-synthetic_28"
    assert (run / "best.pt").is_file() and (run / "images" / "accuracy_epoch.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # no shared images/ folder


def test_piped_output_arrives_epoch_by_epoch(syn_dir, tmp_path, train_argv):
    proc = subprocess.Popen([sys.executable, "train.py", *train_argv(syn_dir, tmp_path, "--epochs", "40",
                                                                     "--patience", "40")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"})
    try:
        lines = [proc.stdout.readline() for _ in range(3)]  # training on, model, epoch 1
        history = tmp_path / "history.csv"  # written after each epoch's line
        epochs_done = history.read_text().count("\n") - 1 if history.exists() else 0
    finally:
        proc.kill()
        proc.wait()
    assert lines[2].startswith("epoch   1")
    assert epochs_done < 20  # the line came while training went on, not held back until the end


def test_resume_continues_exactly_where_the_run_stopped(syn_dir, tmp_path, trained_run, train_argv):
    train.main(train_argv(syn_dir, tmp_path, "--epochs", "2", "--batch-size", "32"))  # trained_run's batch
    resumed = train.main(train_argv(syn_dir, tmp_path, "--epochs", "4", "--batch-size", "32", "--resume"))
    _, straight = model_lib.load_checkpoint(trained_run / "last.pt")
    assert [r["epoch"] for r in resumed] == [1, 2, 3, 4]
    assert without_seconds(resumed) == without_seconds(straight["history"])[:4]


def test_early_stopping_fires_on_a_plateau(syn_dir, tmp_path, train_argv):
    # With lr 0 the weights never change, so the validation loss cannot improve after epoch 1.
    history = train.main(train_argv(syn_dir, tmp_path, "--epochs", "10", "--lr", "0", "--patience", "2"))
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert model_lib.read_checkpoint(tmp_path / "last.pt")["train_state"]["bad_epochs"] == 2


def test_ctrl_c_keeps_last_finished_epoch_and_resume_completes(syn_dir, tmp_path, monkeypatch, train_argv):
    real_epoch, calls = engine.train_epoch, []

    def interrupted_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)
    monkeypatch.setattr(engine, "train_epoch", interrupted_in_epoch_2)
    with pytest.raises(SystemExit) as stopped:
        train.main(train_argv(syn_dir, tmp_path, "--epochs", "3"))
    assert stopped.value.code == 130
    state = model_lib.read_checkpoint(tmp_path / "last.pt")
    assert state["train_state"]["epoch"] == 1
    monkeypatch.setattr(engine, "train_epoch", real_epoch)
    history = train.main(train_argv(syn_dir, tmp_path, "--epochs", "3", "--resume"))
    assert [r["epoch"] for r in history] == [1, 2, 3]


def test_nan_loss_stops_with_a_clear_error(syn_dir, tmp_path, monkeypatch, train_argv):
    monkeypatch.setattr(engine.F, "cross_entropy", lambda logits, y: logits.sum() * float("nan"))
    with pytest.raises(engine.TrainingError, match="Lower --lr"):
        train.main(train_argv(syn_dir, tmp_path, "--epochs", "1"))


def test_resume_onto_other_data_is_refused(syn_dir, tmp_path, trained_run, train_argv):
    (tmp_path / "last.pt").write_bytes((trained_run / "last.pt").read_bytes())
    other = tmp_path / "other"
    other.mkdir()
    synthetic.write_synthetic(other / "pathmnist_synthetic.npz", 28, seed=1,
                                   counts={"train": 50, "val": 20, "test": 20})
    with pytest.raises(engine.TrainingError, match="trained on"):
        train.main(train_argv(other, tmp_path, "--epochs", "5", "--resume"))


def run_cli(*args):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_help_explains_every_flag():
    out = run_cli("--help").stdout
    for flag in ("--epochs", "--batch-size", "--lr", "--patience", "--seed", "--device",
                 "--data-dir", "--size", "--out", "--synthetic", "--resume", "--threads", "--flag",
                 "--trust-file", "--flips", "--stain-jitter", "--colour-jitter", "--shift", "--arch"):
        assert flag in out


@pytest.mark.parametrize("epochs", ["0", "-3", "two"])
def test_epochs_below_one_are_refused_before_any_work(epochs, tmp_path):
    result = run_cli("--epochs", epochs, "--synthetic", "--data-dir", str(tmp_path))
    assert result.returncode == 2 and "at least 1" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("device", ["gpu", "cuda:7"])
def test_a_device_this_machine_lacks_is_a_paragraph_not_a_traceback(device, tmp_path, syn_dir):
    result = run_cli("--device", device, "--synthetic", "--data-dir", str(syn_dir), "--out", str(tmp_path))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "this machine has: cpu" in result.stderr.lower() or "which has: cpu" in result.stderr


def test_ctrl_c_while_medmnist_loads_is_not_swallowed():
    # medmnist/__init__.py wraps its dataset imports in a bare `except:`; a Ctrl-C then (simulated by
    # an import of medmnist.dataset that raises KeyboardInterrupt) used to be swallowed.
    code = ("import builtins, sys\n"
            "real = builtins.__import__\n"
            "def hook(name, *args, **kwargs):\n"
            "    if name.startswith('medmnist.dataset'):\n"
            "        raise KeyboardInterrupt\n"
            "    return real(name, *args, **kwargs)\n"
            "builtins.__import__ = hook\n"
            "import train, evaluate\n"
            "print('imported', 'medmnist.dataset' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "Please install the required packages" not in result.stdout + result.stderr
    assert result.stdout.strip() == "imported False"  # the dataset classes are never imported


@pytest.mark.parametrize("script", ["train.py", "evaluate.py", "explain.py", "model.py"])
def test_help_loads_neither_torchvision_nor_medmnists_datasets(script):
    result = subprocess.run([sys.executable, "-X", "importtime", script, "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert result.returncode == 0 and "(default: None)" not in result.stdout
    if script != "model.py":
        assert re.search(r"--device DEVICE\s.*?\(default: auto\)", result.stdout, re.S)  # the same everywhere
    assert "torchvision" not in imported and "medmnist.dataset" not in imported and "pandas" not in imported


def test_corrupt_data_exits_1_with_a_paragraph_not_a_traceback(tmp_path):
    (tmp_path / "pathmnist_synthetic.npz").write_bytes(b"garbage")
    result = run_cli("--synthetic", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run"))
    assert result.returncode == 1
    assert result.stderr.startswith("error:") and "Traceback" not in result.stderr
    assert "Delete it and rerun" in result.stderr and "pickle" not in result.stderr


def test_resume_without_a_run_exits_1_and_names_the_flags_train_py_has(tmp_path, syn_dir, train_argv):
    result = run_cli(*train_argv(syn_dir, tmp_path / "none", "--resume"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "nothing to resume" in result.stderr and "--out" in result.stderr
    assert "--checkpoint" not in result.stderr  # train.py has no such flag


def test_resume_with_nothing_to_resume_downloads_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "download_url", lambda *a, **k: pytest.fail("tried to download"))
    with pytest.raises(engine.TrainingError, match="nothing to resume"):
        train.main(["--resume", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "run")])
    assert not (tmp_path / "data").exists()


# ----------------------------------------------------------------------------- --flag

@pytest.mark.parametrize("flag, message", [("organmnist3d", "3D MedMNIST dataset"),
                                           ("pathmnistt", "not a MedMNIST 2D dataset")])
def test_a_3d_or_unknown_flag_exits_2_listing_the_2d_flags(flag, message, tmp_path):
    result = run_cli("--flag", flag, "--synthetic", "--data-dir", str(tmp_path))
    assert result.returncode == 2 and message in result.stderr and "organsmnist" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_stain_jitter_on_a_one_channel_flag_exits_2_before_any_work(tmp_path):
    result = run_cli("--flag", "chestmnist", "--stain-jitter", "1", "--synthetic", "--data-dir", str(tmp_path))
    assert result.returncode == 2 and "1 channel" in result.stderr and list(tmp_path.iterdir()) == []


def test_trust_file_trains_on_a_resaved_copy_and_records_it_unverified(tmp_path, train_argv, threads):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 64), ("val", 16), ("test", 16)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 1))
    np.savez(tmp_path / "pneumoniamnist.npz", **arrays)  # a real-format file, not the published bytes
    argv = ["--flag", "pneumoniamnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run"),
            "--epochs", "1", "--threads", threads]
    with pytest.raises(data.DataError, match="--trust-file"):
        train.main(argv)
    train.main(argv + ["--trust-file"])
    _, meta = model_lib.load_checkpoint(tmp_path / "run" / "best.pt")
    assert meta["provenance"]["verified"] is False and meta["settings"]["trust_file"] is True
    assert "unverified file" in datasets.describe(meta["provenance"])


def test_every_figure_of_a_trusted_file_says_unverified_file(tmp_path, monkeypatch, threads):
    import matplotlib.text

    import evaluate
    import plots
    texts = {}
    real_write = plots.write_figure

    def recording(fig, path, dpi=130, tight=True):
        texts[Path(path).name] = " ".join(t.get_text() for t in fig.findobj(matplotlib.text.Text))
        real_write(fig, path, dpi, tight)
    monkeypatch.setattr(plots, "write_figure", recording)
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 64), ("val", 16), ("test", 16)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 8, (n, 1))
    np.savez(tmp_path / "bloodmnist.npz", **arrays)
    run = tmp_path / "run"
    train.main(["--flag", "bloodmnist", "--trust-file", "--data-dir", str(tmp_path), "--out", str(run),
                "--epochs", "1", "--threads", threads])
    evaluate.main(["--checkpoint", str(run / "best.pt"), "--data-dir", str(tmp_path), "--explain", "8",
                   "--quality", "4"])
    assert set(texts) == {"accuracy_epoch.png", "confusion_matrix.png", "ig_examples.png", "reliability.png",
                          "faithfulness.png", "sanity_randomization.png", "methods.png"}
    assert all("unverified file" in t.replace("\n", " ") for t in texts.values()), texts
    # a real-format file: medmnist's own Evaluator also wrote its CSVs, with the same scores
    import pandas as pd
    written = sorted((run / "medmnist").iterdir())
    assert [p.name.split("_")[1] for p in written] == ["test", "val"]
    ours = pd.read_csv(run / "predictions_test.csv", index_col=0, header=None).values
    theirs = pd.read_csv(written[0], index_col=0, header=None).values
    assert np.allclose(ours, theirs, atol=1e-6)


def test_compile_trains_and_saves_the_plain_module(syn_dir, tmp_path, train_argv, monkeypatch):
    compiled = []
    real_compile = torch.compile

    def counting_compile(module, *args, **kwargs):
        compiled.append(module)
        wrapped = real_compile(module, *args, **kwargs)
        calls = []
        original_forward = wrapped.forward

        def forward(*a, **k):
            calls.append(1)
            return original_forward(*a, **k)
        wrapped.forward = forward
        compiled.append(calls)
        return wrapped
    monkeypatch.setattr(torch, "compile", counting_compile)
    train.main(train_argv(syn_dir, tmp_path, "--epochs", "2", "--batch-size", "32", "--compile"))
    assert len(compiled) == 2 and len(compiled[1]) == 2 * 47  # every training step of 1,500 images went through it
    net, meta = model_lib.load_checkpoint(tmp_path / "best.pt")  # no torch.compile prefixes in it
    assert meta["settings"]["compile"] is True and meta["history"][-1]["val_acc"] > 0.2  # chance 0.11; eager 0.32


def test_last_pt_holds_exactly_the_training_state_a_resume_needs(trained_run):
    state = model_lib.load_checkpoint(trained_run / "last.pt", with_train_state=True)[2]
    assert set(state) == set(train.TRAIN_STATE_KEYS)


def test_resuming_from_a_checkpoint_without_a_training_state_is_refused(trained_run, syn_dir, tmp_path, train_argv):
    shutil.copy(trained_run / "best.pt", tmp_path / "last.pt")  # best.pt has no training state
    with pytest.raises(model_lib.CheckpointError, match="no complete training state"):
        train.main(train_argv(syn_dir, tmp_path, "--resume"))
