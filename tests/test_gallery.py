"""gallery.py: a row per class with random correct images and the most confident error, from a store built here."""
from types import SimpleNamespace

import numpy as np
import torch

import db
import gallery


class Split:
    task, class_names = "multi-class", ["a", "b", "c"]


def store(tmp_path):
    """Class a: 6 correct (confidence 0.5-0.75) and 2 wrong (0.6, 0.9); class b: 1 correct; class c: none."""
    conn = db.connect(tmp_path / "e.db")
    run = db.run_id_for(conn, "sha", "c.pt", {"n_classes": 3, "task": "multi-class"}, Split.class_names,
                        {"dataset": "d", "size": 28, "file": "f", "md5": "m", "synthetic": True,
                         "flag": "pathmnist", "verified": True}, {})
    true = [0] * 8 + [1]
    pred, conf = [0] * 6 + [1, 2] + [1], [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.6, 0.9, 0.8]
    probs = np.full((9, 3), 0.0, "<f4")
    for i, (p, c) in enumerate(zip(pred, conf, strict=True)):
        probs[i] = (1 - c) / 2
        probs[i, p] = c
    n = len(true)
    db.insert_explanations(conn, db.explanation_rows(run, "test", "ig", {
        "image_index": range(n), "true_label": true, "probs": probs, "target": pred,
        "attributions": np.zeros((n, 3, 2, 2), "float16"), "delta": [0.0] * n, "score": [1.0] * n,
        "baseline_score": [0.0] * n, "n_steps": [8] * n}))
    return conn, run


def test_each_class_gets_its_own_row_of_random_correct_images_and_its_most_confident_error(tmp_path):
    conn, run = store(tmp_path)
    rows = gallery.gallery_examples(conn, run, Split)
    assert len(rows) == 2 and all(len(r) == gallery.GALLERY_CORRECT + 1 for r in rows)  # c has nothing stored
    a, b = rows
    assert {e[0]["image_index"] for e in a[:2]} <= set(range(6)) and a[2][0]["image_index"] == 7  # 0.9 beats 0.6
    assert "WRONG" in a[2][1] and not any("WRONG" in e[1] for e in a[:2])
    assert b[0][0]["image_index"] == 8 and b[1] is None and b[2] is None  # no error, no second correct image
    assert gallery.gallery_examples(conn, run, Split) == rows  # seeded: the same picks every time


def test_the_correct_images_are_not_just_the_most_confident(tmp_path):
    conn, run = store(tmp_path)
    picks = {tuple(e[0]["image_index"] for e in gallery.gallery_examples(conn, run, Split, correct=2)[0][:2])}
    assert picks != {(4, 5)}  # the two most confident correct images of class a


class SplitWithImages(Split):
    test = SimpleNamespace(images=torch.zeros((9, 3, 2, 2), dtype=torch.uint8))


def test_the_caption_says_how_many_classes_show_an_error_and_when_none_does(tmp_path, monkeypatch):
    conn, run = store(tmp_path)
    drawn = []
    monkeypatch.setattr(gallery.plots, "explanation_figure", lambda panels, path, title, per_row: drawn.append(
        (len(panels), per_row, title)))
    shown = gallery.plot_ig_examples(conn, run, SplitWithImages, tmp_path / "g.png", "IG")
    assert shown == {"panels": 4, "classes": 2, "classes_with_error": 1}  # a: 2 + its error; b: 1
    assert drawn[-1][:2] == (6, 3) and "1 of the 2 classes have a misclassified explained image" in drawn[-1][2]
    conn.execute("DELETE FROM explanations WHERE correct = 0")  # no error left
    shown = gallery.plot_ig_examples(conn, run, SplitWithImages, tmp_path / "g.png", "IG")
    assert shown["classes_with_error"] == 0 and drawn[-1][:2] == (4, 2)  # no empty WRONG column
    assert "No explained test image is misclassified" in drawn[-1][2]
