"""metrics.py: ACC, AUC, per-class scores and ECE against values worked out by hand or independently."""
import numpy as np
import pytest

import datasets
import metrics


def random_scores(n=200, k=9, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 2 * np.eye(k)[labels] * rng.random((n, 1))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return labels, probs


def one_vs_rest_auc(labels, scores, c):
    """The probability that a random image of class c scores higher for c than a random other image
    (ties count half): the Mann-Whitney form of the ROC AUC, counted pair by pair."""
    pos, neg = scores[labels == c, c], scores[labels != c, c]
    return ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))


def test_acc_is_the_share_of_correct_argmax_predictions():
    labels = np.array([0, 1, 2, 2, 1])
    probs = np.array([[.6, .3, .1], [.2, .5, .3], [.1, .1, .8], [.5, .4, .1], [.3, .3, .4]])
    assert metrics.classification_metrics(labels, probs, ["a", "b", "c"])["acc"] == pytest.approx(3 / 5)


def test_auc_is_the_mean_one_vs_rest_auc_over_classes():
    labels, probs = random_scores(n=120)
    expected = np.mean([one_vs_rest_auc(labels, probs, c) for c in range(9)])
    assert metrics.classification_metrics(labels, probs, [str(i) for i in range(9)])["auc"] == pytest.approx(expected)


def test_per_class_precision_recall_f1_match_numbers_worked_by_hand():
    labels = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 1, 2, 2])
    m = metrics.classification_metrics(labels, np.eye(3)[pred] * 0.7 + 0.1, ["a", "b", "c"])
    # a: 2 of 2 predicted right, 2 of 3 found; b: 1 of 2 and 1 of 2; c: 1 of 2 and 1 of 1.
    got = [[c["precision"], c["recall"], c["f1"], c["support"]] for c in m["per_class"]]
    assert np.allclose(got, [[1.0, 2 / 3, 0.8, 3], [0.5, 0.5, 0.5, 2], [0.5, 1.0, 2 / 3, 1]])
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]


def test_balanced_accuracy_and_macro_f1_weight_every_class_alike():
    labels = np.array([0, 0, 0, 1, 1, 2])  # the same predictions as above: recall 2/3, 1/2, 1; F1 0.8, 0.5, 2/3
    pred = np.array([0, 0, 1, 1, 2, 2])
    m = metrics.classification_metrics(labels, np.eye(3)[pred] * 0.7 + 0.1, ["a", "b", "c"])
    assert m["balanced_acc"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3) and m["acc"] == pytest.approx(4 / 6)
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


def test_the_ece_interval_holds_the_ece_and_comes_from_resampling():
    labels, probs = random_scores(n=300)
    m = metrics.classification_metrics(labels, probs, [str(i) for i in range(9)])
    low, high = metrics.bootstrap_intervals(labels, probs, "multi-class", n=200)["ece_ci95"]
    assert low < m["ece"] < high and high - low > 0.01  # 300 images: an interval of a few points


def test_multi_label_metrics_are_per_label_at_probability_one_half():
    labels = np.array([[1, 0], [1, 1], [0, 0], [0, 1]])
    probs = np.array([[.9, .2], [.6, .4], [.7, .1], [.3, .8]])
    m = metrics.classification_metrics(labels, probs, ["a", "b"], datasets.MULTI_LABEL)
    # predicted: a on images 0, 1, 2 (right on 0, 1); b on image 3 only (right; image 1's b missed).
    # ACC: label a right on 3 of 4 images, b on 3 of 4. AUC: a ranks its two positives (.9, .6)
    # above .3 and below/above .7: (1 + 1 + 1 + 0) / 4; b: positives .4, .8 vs .2, .1: 4 / 4.
    assert m["acc"] == pytest.approx(0.75) and m["auc"] == pytest.approx((0.75 + 1.0) / 2)
    got = [[c["precision"], c["recall"], c["support"]] for c in m["per_class"]]
    assert np.allclose(got, [[2 / 3, 1.0, 2], [1.0, 0.5, 2]]) and m["confusion_matrix"] is None


def test_multi_label_ece_pools_every_image_and_label_decision():
    # Eight decisions, each 90% confident; 4 of them right: ECE = |0.5 - 0.9|.
    labels = np.array([[1, 1], [0, 0], [1, 0], [0, 1]])
    probs = np.array([[.9, .1], [.1, .9], [.9, .9], [.1, .1]])
    assert metrics.classification_metrics(labels, probs, ["a", "b"], datasets.MULTI_LABEL)["ece"] == pytest.approx(0.4)


def test_binary_metrics_score_the_positive_column_as_medmnist_does():
    labels = np.array([0, 1, 1, 0])
    probs = np.array([[.8, .2], [.3, .7], [.6, .4], [.45, .55]])
    m = metrics.classification_metrics(labels, probs, ["benign", "malignant"], "binary-class")
    # positive scores .7, .4 against .2, .55: pairs won 2 + 1 of 4; ACC at 0.5: images 0 and 1 right.
    assert m["auc"] == pytest.approx(0.75) and m["acc"] == pytest.approx(0.5)


def test_ece_uses_fifteen_equal_width_bins():
    # Two images in each of the 15 bins, at the bin's centre c_b = (b + 0.5) / 15 minus and plus
    # 0.025: in even bins the first is right and the second wrong (accuracy 0.5), in odd bins both
    # are right (accuracy 1). So ECE = (1/15) * (sum over even b of |0.5 - c_b| + sum over odd b of
    # 1 - c_b) = (1/15) * (32/15 + 52.5/15) = 84.5/225. Coarser bins mix accuracies and finer ones
    # split the pairs: 10 bins give 0.344, 20 give 0.432.
    centres = (np.arange(15) + 0.5) / 15
    conf = np.stack([centres - 0.025, centres + 0.025], 1).reshape(-1)
    probs = np.tile(((1 - conf) / 199)[:, None], (1, 200))  # 200 classes: class 0 is always the top
    probs[:, 0] = conf
    right = np.stack([np.ones(15, bool), np.arange(15) % 2 == 1], 1).reshape(-1)
    assert metrics.expected_calibration_error(probs, np.where(right, 0, 1)) == pytest.approx(84.5 / 225)


def test_ece_is_zero_when_confidence_equals_accuracy():
    # 10 predictions at 80% confidence, 8 of them right.
    probs = np.full((10, 2), 0.2)
    probs[:, 0] = 0.8
    labels = np.array([0] * 8 + [1] * 2)
    assert metrics.expected_calibration_error(probs, labels) == pytest.approx(0.0)


def test_ece_measures_overconfidence():
    probs = np.full((10, 2), 0.05)
    probs[:, 0] = 0.95
    labels = np.array([0] * 5 + [1] * 5)  # 95% confident, 50% right
    assert metrics.expected_calibration_error(probs, labels) == pytest.approx(0.45)


@pytest.mark.parametrize("task, shape", [("multi-class", 9), ("ordinal-regression", 5), ("binary-class", 2),
                                         ("multi-label, binary-class", 14)])
def test_rank_auc_equals_medmnists_get_auc_ties_included(task, shape):
    from medmnist.evaluator import getAUC
    rng = np.random.default_rng(1)
    n = 300
    scores = np.round(rng.random((n, shape)), 2)  # two decimals: many tied scores
    labels = (rng.random((n, shape)) < 0.3).astype(int) if task.startswith("multi-label") else rng.integers(0, shape, n)
    assert metrics.rank_auc(labels, scores, task) == pytest.approx(getAUC(labels, scores, task), abs=1e-12)


@pytest.mark.parametrize("task, shape", [("multi-class", 9), ("ordinal-regression", 5), ("binary-class", 2),
                                         ("binary-class", 1), ("multi-label, binary-class", 14)])
def test_plain_acc_equals_medmnists_get_acc(task, shape):
    from medmnist.evaluator import getACC
    rng = np.random.default_rng(2)
    n = 300
    scores = rng.random((n, shape))
    scores[:7, -1] = 0.5  # at the threshold: not above it, in both
    labels = (rng.random((n, shape)) < 0.3).astype(int) if task.startswith("multi-label") else \
        rng.integers(0, max(shape, 2), (n, 1))
    assert metrics.plain_acc(labels, scores, task) == pytest.approx(getACC(labels, scores, task), abs=1e-12)


def test_rank_auc_has_no_value_where_a_class_is_missing():
    labels, scores = np.array([0, 0, 1, 1]), np.random.default_rng(0).random((4, 3))  # class 2 absent
    assert metrics.rank_auc(labels, scores, "multi-class") is None
