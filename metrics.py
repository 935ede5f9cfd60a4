"""metrics.py: classification metrics as MedMNIST computes them, calibration, and predictions files.

    m = metrics.classification_metrics(labels, probs, class_names, task)   # ACC, AUC, per class, ECE
    metrics.bootstrap_intervals(labels, probs, task)                       # 95% intervals of ACC, AUC

ACC and AUC are medmnist.evaluator's getACC/getAUC with the dataset's task string; everything else
(per-class precision/recall/F1, the confusion matrix, ECE) is computed here from the same arrays.
"""
import csv
from pathlib import Path

import numpy as np

from datasets import MULTI_LABEL, medmnist_module
from files import atomic_path

ECE_BINS = 15
BOOTSTRAP = 200  # resamples of the test split for the 95% intervals of ACC and AUC


def classification_metrics(labels, probs, class_names, task="multi-class"):
    """MedMNIST's ACC/AUC for `task` (medmnist.evaluator.getACC/getAUC), per-class precision/recall/F1,
    the confusion matrix and ECE. Multi-label data (labels (N, L) of 0/1, a probability per label)
    is scored per label at probability 0.5, has no confusion matrix, and its ECE pools every
    (image, label) decision."""
    evaluator = medmnist_module("evaluator")  # pandas and sklearn: loaded only when needed
    n = len(class_names)
    if task == MULTI_LABEL:
        predicted, actual = probs > 0.5, labels.astype(bool)
        tp = (predicted & actual).sum(0).astype(float)
        predicted_n, actual_n, cm = predicted.sum(0), actual.sum(0), None
    else:
        pred = probs.argmax(1)
        cm = np.bincount(labels * n + pred, minlength=n * n).reshape(n, n)  # rows: true, cols: predicted
        tp, predicted_n, actual_n = np.diag(cm).astype(float), cm.sum(0), cm.sum(1)
    precision = np.divide(tp, predicted_n, out=np.zeros(n), where=predicted_n > 0)
    recall = np.divide(tp, actual_n, out=np.zeros(n), where=actual_n > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(n),
                   where=(precision + recall) > 0)
    present = actual_n > 0
    return {"acc": float(evaluator.getACC(labels, probs, task)),
            "auc": float(evaluator.getAUC(labels, probs, task)),
            # beside ACC, for unbalanced splits: the mean recall over the classes present (single-label
            # data only) and the unweighted mean F1 over them
            "balanced_acc": None if task == MULTI_LABEL else float(recall[present].mean()),
            "macro_f1": float(f1[present].mean()),
            "task": task, "ece": calibration_error(labels, probs, task), "n": int(len(labels)),
            "per_class": [{"class": name, "precision": float(p), "recall": float(r), "f1": float(f),
                           "support": int(s)}
                          for name, p, r, f, s in zip(class_names, precision, recall, f1, actual_n, strict=True)],
            "confusion_matrix": None if cm is None else cm.tolist()}


def calibration_error(labels, probs, task):
    """The top-label ECE; multi-label data pools every (image, label) decision as a two-class one."""
    if task != MULTI_LABEL:
        return expected_calibration_error(probs, labels)
    p = probs.reshape(-1)
    return expected_calibration_error(np.stack([1 - p, p], 1), labels.astype(bool).reshape(-1).astype(int))


def bootstrap_intervals(labels, probs, task, n=BOOTSTRAP, seed=0):
    """95% percentile intervals of MedMNIST's ACC and AUC (as plain_acc and rank_auc compute them),
    and of the ECE, over `n` resamples of the images (seeded)."""
    rng = np.random.default_rng(seed)
    accs, aucs, eces = [], [], []
    for _ in range(n):
        i = rng.integers(0, len(labels), len(labels))
        accs.append(plain_acc(labels[i], probs[i], task))
        eces.append(calibration_error(labels[i], probs[i], task))
        auc = rank_auc(labels[i], probs[i], task)
        if auc is not None:  # a resample without some class has no AUC
            aucs.append(auc)
    ci = lambda v: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if v else None  # noqa: E731
    return {"acc_ci95": ci(accs), "auc_ci95": ci(aucs), "ece_ci95": ci(eces), "bootstrap": n}


def positive_score(y_score):
    """A binary task's score of the positive class, as getACC and getAUC take it: the last column."""
    return y_score[:, -1] if y_score.ndim == 2 else y_score


def plain_acc(y_true, y_score, task, threshold=0.5):
    """MedMNIST's getACC for `task` in numpy: the share of right decisions (argmax for one label per
    image; score above `threshold` for binary and multi-label data, averaged over the labels as getACC
    averages them). The same number (tests/test_metrics.py) without sklearn's per-call checks, which
    made 200 bootstrap resamples of a 14-label split take seconds."""
    y_true, y_score = np.asarray(y_true).squeeze(), np.asarray(y_score).squeeze()
    if task == MULTI_LABEL:
        return float(((y_score > threshold) == y_true.astype(bool)).mean(0).mean())
    if task == "binary-class":
        return float(np.mean((y_true == 1) == (positive_score(y_score) > threshold)))
    return float(np.mean(y_true == y_score.argmax(-1)))


def rank_auc(y_true, y_score, task):
    """MedMNIST's getAUC for `task` computed from ranks: per class (or label) the Mann-Whitney
    statistic with ties counted as half, which is sklearn's roc_auc_score, averaged as getAUC averages
    them. The same number (tests/test_metrics.py) without sklearn's per-call checks, so that 200
    bootstrap resamples take milliseconds, not seconds. None where some class (or label) has no
    positive or no negative image, where roc_auc_score is undefined."""
    from scipy.stats import rankdata  # a dependency of sklearn, which medmnist needs
    y_true, y_score = np.asarray(y_true).squeeze(), np.asarray(y_score).squeeze()
    if task == MULTI_LABEL:
        positives, scores = y_true.astype(bool), y_score
    elif task == "binary-class":
        positives, scores = (y_true == 1)[:, None], positive_score(y_score)[:, None]
    else:
        positives, scores = y_true[:, None] == np.arange(y_score.shape[1]), y_score
    n_pos = positives.sum(0)
    n_neg = len(positives) - n_pos
    if (n_pos == 0).any() or (n_neg == 0).any():
        return None
    u = (rankdata(scores, axis=0) * positives).sum(0) - n_pos * (n_pos + 1) / 2
    return float(np.mean(u / (n_pos * n_neg)))


def write_predictions(path, probs):
    """The CSV medmnist.Evaluator.evaluate(y_score, save_folder) writes: per image its index, then one
    score per class; no header. MedMNIST's tools read it back with pandas (index_col=0, header=None)."""
    rows = [[i, *(repr(float(v)) for v in row)] for i, row in enumerate(probs)]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)


def medmnist_results(ds, split, probs, folder):
    """For a real file, also the CSV medmnist's own Evaluator writes, under its standard name
    (<flag>[_size]_<split>_[AUC]…_[ACC]…@<run>.csv) in `folder`. None for synthetic data, which
    medmnist's Evaluator cannot read."""
    if ds.synthetic:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    evaluator = medmnist_module("evaluator").Evaluator(ds.flag, split, size=ds.size, root=str(Path(ds.path).parent))
    evaluator.evaluate(probs, save_folder=str(folder), run="evaluate")
    return folder


def expected_calibration_error(probs, labels, n_bins=ECE_BINS):
    """Top-label ECE over equal-width confidence bins: sum_b |B|/N * |acc(B) - conf(B)|."""
    conf, correct = probs.max(1), probs.argmax(1) == labels
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(ece)
