"""gallery.py: which stored explanations the run's figures show, and drawing them.

    gallery.plot_ig_examples(conn, run_id, ds, "images/ig_examples.png", title)

Per class, the most confident correct and misclassified stored explanation (for multi-label data,
per predicted label), drawn in IG (ig_examples.png) and, with --methods, in every method
(methods.png).
"""
import attribution as attr
import db
import plots
from colour import to_unit
from datasets import MULTI_LABEL


def gallery_examples(conn, run_id, ds, with_arrays=False):
    """[(stored IG row, title)] per class: the most confident correct and misclassified stored
    explanation, if any. Classes are the true class, or for multi-label data the predicted
    (highest-scoring) label, right or not."""
    by = "pred_label" if ds.task == MULTI_LABEL else "true_label"
    out = []
    for label in range(len(ds.class_names)):
        for wrong in (False, True):
            for r in db.find(conn, run_id, "test", misclassified=wrong, order="-confidence", limit=1,
                             with_arrays=with_arrays, **{by: label}):
                out.append((r, plots.panel_title(ds.class_names, db.true_classes(r), r["pred_label"],
                                                 r["confidence"], ["WRONG"] if wrong else [])))
    return out


def plot_method_examples(conn, run_id, ds, methods, path, title):
    """The ig_examples images in every method (those with a map stored in each)."""
    examples, maps = [], {m: [] for m in methods}
    for r, panel_title in gallery_examples(conn, run_id, ds):
        i = r["image_index"]
        per_method = {m: db.find(conn, run_id, "test", image_indices=[i], with_arrays=True, method=m)
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
    """IG on gallery_examples: per class, the most confident correct and misclassified image."""
    panels = [(to_unit(ds.test.images[r["image_index"]]), attr.stored_attributions([r])[0], panel_title)
              for r, panel_title in gallery_examples(conn, run_id, ds, with_arrays=True)]
    if panels:
        plots.explanation_figure(panels, path, title)
    return len(panels)
