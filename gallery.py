"""gallery.py: which stored explanations the run's figures show, and drawing them.

    gallery.plot_ig_examples(conn, run_id, ds, "images/ig_examples.png", title)

One row per class, never wrapped into the next: GALLERY_CORRECT correct images picked at random
(seeded, so not only the most confident) and the most confident misclassified one, WRONG (evaluate.py
explains every misclassified image, up to --explain-errors, so every class with errors has one). For
multi-label data the class is the predicted (highest-scoring) label. Drawn in IG (ig_examples.png,
its title and the report's caption saying what was picked: caption) and, with one correct image a
class, in every method (methods.png).
"""
import random

import attribution as attr
import db
import plots
from colour import to_unit
from datasets import MULTI_LABEL

GALLERY_CORRECT, GALLERY_SEED = 2, 0


def gallery_examples(conn, run_id, ds, with_arrays=False, correct=GALLERY_CORRECT):
    """[[(stored IG row, title) or None] * (correct + 1)] a class, for the classes with any stored
    explanation: `correct` random correct rows, then the most confident misclassified one (None
    where a class has fewer)."""
    by = "pred_label" if ds.task == MULTI_LABEL else "true_label"
    rows = []
    for label in range(len(ds.class_names)):
        right = db.find(conn, run_id, misclassified=False, **{by: label})
        picked = sorted(random.Random(GALLERY_SEED * 1009 + label).sample(right, min(correct, len(right))),
                        key=lambda r: r["image_index"])
        wrong = db.find(conn, run_id, misclassified=True, order="-confidence", limit=1, **{by: label})
        if not picked + wrong:
            continue
        if with_arrays:  # the maps of the chosen rows only
            full = {r["image_index"]: r for r in db.find(conn, run_id, with_arrays=True,
                                                           image_indices=[r["image_index"] for r in picked + wrong])}
            picked, wrong = ([full[r["image_index"]] for r in chosen] for chosen in (picked, wrong))

        def slot(r, note):
            return r, plots.panel_title(ds.class_names, db.true_classes(r), r["pred_label"], r["confidence"], note)
        rows.append([slot(r, []) for r in picked] + [None] * (correct - len(picked))
                    + [slot(wrong[0], ["WRONG"]) if wrong else None])
    return rows


def plot_method_examples(conn, run_id, ds, methods, path, title):
    """One correct and the misclassified image of each class (those with a map stored in every
    method), in every method."""
    examples, maps = [], {m: [] for m in methods}
    for r, panel_title in [e for row in gallery_examples(conn, run_id, ds, correct=1) for e in row if e]:
        i = r["image_index"]
        per_method = {m: db.find(conn, run_id, image_indices=[i], with_arrays=True, method=m)
                      for m in methods}
        if not all(per_method.values()):
            continue
        examples.append((to_unit(ds.test.images[i]), panel_title))
        for m in methods:
            maps[m].append(attr.stored_attributions(per_method[m])[0])
    if examples:
        plots.plot_methods(examples, maps, path, title)
    return len(examples)


def plot_ig_examples(conn, run_id, ds, path, title):
    """IG on gallery_examples, a row per class, the title saying what was picked (caption). Returns
    {"panels", "classes", "classes_with_error"}: what the figure shows, for metrics.json."""
    rows = gallery_examples(conn, run_id, ds, with_arrays=True)
    with_error = sum(row[-1] is not None for row in rows)
    if not with_error:  # no WRONG slot to keep a column for: the figure stays as wide as what it shows
        rows = [row[:-1] for row in rows]
    panels = [None if e is None else (to_unit(ds.test.images[e[0]["image_index"]]),
                                      attr.stored_attributions([e[0]])[0], e[1]) for row in rows for e in row]
    shown = {"panels": sum(p is not None for p in panels), "classes": len(rows), "classes_with_error": with_error}
    if rows:
        plots.explanation_figure(panels, path, f"{title}. {caption(shown)}", per_row=len(rows[0]))
    return shown


def caption(shown):
    """What ig_examples.png shows, as a sentence computed from what plot_ig_examples picked."""
    picked = (f"Per class, {GALLERY_CORRECT} correctly classified test images picked at random (seeded) and the "
              f"most confidently misclassified one.")
    if shown["classes_with_error"] == 0:
        return (f"Per class, {GALLERY_CORRECT} correctly classified test images picked at random (seeded). No "
                f"explained test image is misclassified, so there is no error to show.")
    if shown["classes_with_error"] == shown["classes"]:
        return f"{picked} Every class has a misclassified explained image."
    return (f"{picked} {shown['classes_with_error']} of the {shown['classes']} classes have a misclassified "
            f"explained image; the others show an empty slot.")
