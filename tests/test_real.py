"""real.py on the real RetinaMNIST file of the shared real-data folder: the whole path on real data."""
import csv

import numpy as np
import pytest

import real

pytestmark = pytest.mark.trains


def snapshot(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def real_run(realdata, tmp_path_factory, threads):
    """real.py for this repo's model, one seed, 12 epochs, on the real file where it lies."""
    out = tmp_path_factory.mktemp("real")
    before = snapshot(realdata)
    real.main(["--archs", "tissuecnn", "--seeds", "0", "--epochs", "12", "--explain", "40", "--quality", "0",
               "--out", str(out), "--threads", threads])
    return out, before, snapshot(realdata)


def test_a_few_epochs_on_real_retinamnist_beat_always_predicting_the_commonest_grade(realdata, real_run):
    out, _, _ = real_run
    labels = np.load(realdata / "medmnist" / "retinamnist.npz")["test_labels"].reshape(-1)
    majority = np.bincount(labels).max() / len(labels)  # 174 of 400 test images are grade 0
    with open(out / "retinamnist_tissuecnn" / "seed0" / "predictions_test.csv") as f:
        scores = np.array([[float(v) for v in row[1:]] for row in csv.reader(f)])
    acc = float((scores.argmax(1) == labels).mean())
    assert acc > majority + 0.02, (acc, majority)
    assert real.load(out / "retinamnist_tissuecnn" / "seed0")["acc"] == pytest.approx(acc)


def test_the_comparison_names_the_published_numbers_beside_the_measured_ones(real_run):
    out, _, _ = real_run
    text = (out / "retinamnist_summary.md").read_text()
    assert "| tissuecnn (this repo's train.py, real) |" in text
    assert "ResNet-18 (28), published (MedMNIST v2, Table 3) | 0.524 | 0.717" in text


def test_nothing_is_written_into_the_real_data_folder(real_run):
    _, before, after = real_run
    assert after == before
