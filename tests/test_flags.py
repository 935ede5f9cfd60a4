"""Every MedMNIST 2D dataset through the same scripts (--flag), end to end on SYNTHETIC data of each
flag's kind: its channels, class count and task (multi-class, binary, ordinal, multi-label)."""
import sqlite3

import numpy as np
import pytest
import torch

import augment
import data
import datasets
import evaluate
import model as model_lib
import synthetic
import train

pytestmark = pytest.mark.trains  # every test here trains a model

COUNTS = {"train": 1500, "val": 200, "test": 200}


def run_flag(flag, root, threads):
    """Train 8 epochs (batch 32) on a small synthetic set of `flag`, then evaluate.py; (run dir, data dir, metrics)."""
    data_dir, run_dir = root / "data", root / "run"
    synthetic.write_synthetic(data_dir / datasets.synthetic_file_name(28, flag), 28, counts=COUNTS, seed=0, flag=flag)
    train.main(["--flag", flag, "--synthetic", "--data-dir", str(data_dir), "--out", str(run_dir),
                "--epochs", "8", "--batch-size", "32", "--threads", threads])
    metrics = evaluate.main(["--checkpoint", str(run_dir / "best.pt"), "--data-dir", str(data_dir),
                             "--explain", "24", "--quality", "2", "--methods", "ig",
                             "--explain-errors", "0", "--threads", threads])
    return run_dir, data_dir, metrics


@pytest.fixture(scope="module", params=datasets.FLAGS)
def flag_run(request, tmp_path_factory, threads):
    flag = request.param
    return (flag, *run_flag(flag, tmp_path_factory.mktemp(flag), threads))


def independent_probabilities(run_dir, data_dir, flag):
    """The test split's probabilities worked out here: the model's logits through a sigmoid for a
    multi-label flag and a softmax otherwise, per medmnist.INFO's task string."""
    net, meta = model_lib.load_checkpoint(run_dir / "best.pt")
    test = data.load_matching(meta["provenance"], data_dir).test
    with torch.no_grad():
        logits = net(test.images.float() / 255)
    multi = "multi-label" in datasets.medmnist_module("info").INFO[flag]["task"]
    return (torch.sigmoid(logits) if multi else torch.softmax(logits, 1)).numpy(), test.labels.numpy()


def test_every_flag_learns_well_above_chance(flag_run):
    flag, _, _, metrics = flag_run
    # AUC: 0.5 is chance for every task; multi-label ACC is high even for a model that predicts
    # no finding at all, so AUC is the number that shows learning there.
    assert metrics["auc"] > 0.85, (flag, metrics["auc"])
    if metrics["task"] != datasets.MULTI_LABEL:
        chance = 1 / len(metrics["per_class"])
        assert metrics["acc"] > min(0.7, 2.5 * chance), (flag, metrics["acc"])


def test_acc_and_auc_are_medmnists_evaluator_for_the_flags_task(flag_run):
    flag, run_dir, data_dir, metrics = flag_run
    probs, labels = independent_probabilities(run_dir, data_dir, flag)
    from medmnist.evaluator import getACC, getAUC
    task = datasets.medmnist_module("info").INFO[flag]["task"]
    assert metrics["task"] == task
    assert metrics["acc"] == pytest.approx(getACC(labels, probs, task), abs=1e-6)
    assert metrics["auc"] == pytest.approx(getAUC(labels, probs, task), abs=1e-6)


def test_ig_completeness_holds_for_every_flag(flag_run):
    flag, _, _, metrics = flag_run
    assert metrics["explanations"]["ig"]["quality"]["completeness_images"] == 24
    assert metrics["explanations"]["ig"]["quality"]["completeness_share"] >= 0.95, flag


def test_the_store_holds_the_flags_channels_classes_and_labels(flag_run):
    flag, run_dir, _, _ = flag_run
    info = datasets.medmnist_module("info").INFO[flag]
    c, k = info["n_channels"], len(info["label"])
    con = sqlite3.connect(run_dir / "explanations.db")
    run_flag_, task = con.execute("SELECT flag, task FROM runs").fetchone()
    assert (run_flag_, task) == (flag, info["task"])
    rows = con.execute("SELECT attr_shape, length(probs), true_label, true_labels FROM explanations").fetchall()
    assert {r[0] for r in rows} == {f"{c},28,28"}
    assert {r[1] for r in rows} == {4 * k}  # float32 per class
    if info["task"] == datasets.MULTI_LABEL:
        assert {r[2] for r in rows} == {-1} and {len(r[3]) for r in rows} == {k}
    else:
        assert all(0 <= r[2] < k and r[3] is None for r in rows)


def test_every_flag_draws_its_figures(flag_run):
    flag, run_dir, _, metrics = flag_run
    images = run_dir / "images"
    expected = {"accuracy_epoch.png", "ig_examples.png", "faithfulness.png", "sanity_randomization.png"}
    if metrics["task"] != datasets.MULTI_LABEL:
        expected.add("confusion_matrix.png")
    assert expected <= {p.name for p in images.iterdir()}, flag


def test_one_channel_flags_are_drawn_in_grey_and_rgb_flags_in_colour(flag_run):
    flag, run_dir, _, _ = flag_run
    from PIL import Image
    figure = np.asarray(Image.open(run_dir / "images" / "ig_examples.png").convert("RGB")).astype(int)
    # The first panel (the image) lies in the first of the 9 columns (3 slots of image, map, overlay), below the title.
    h, w, _ = figure.shape
    panel = figure[int(0.08 * h):int(0.25 * h), :w // 10]
    spread = (panel.max(2) - panel.min(2))  # 0 for a grey pixel
    coloured_share = (spread > 20).mean()
    if datasets.medmnist_module("info").INFO[flag]["n_channels"] == 1:
        assert coloured_share < 0.01, flag
    else:
        assert coloured_share > 0.2, flag


def test_a_flags_default_augmentation_is_recorded_in_the_checkpoint(flag_run):
    flag, run_dir, _, _ = flag_run
    _, meta = model_lib.load_checkpoint(run_dir / "best.pt")
    default = augment.AUGMENTATION[flag]
    s = meta["settings"]
    assert (s["flag"], s["flips"], s["stain_jitter"], s["colour_jitter"]) == (
        flag, default.flips, default.stain, default.colour)
    assert meta["provenance"]["flag"] == flag and meta["task"] == datasets.flag_info(flag)["task"]
