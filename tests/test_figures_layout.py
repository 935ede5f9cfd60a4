"""Every figure drawn with each MedMNIST flag's real class names: no two texts overlap and none
leaves the canvas, judged from matplotlib's own text extents (rotated texts as rotated rectangles)."""
import math

import matplotlib.text
import numpy as np
import pytest
import torch

import datasets
import plots


def text_boxes(fig):
    """[(text, corners (4, 2) in pixels)] of every visible, non-empty text of a drawn figure."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    # Axes keep tick labels for ticks outside their limits, which are never drawn: leave those out.
    every_tick_label, drawn_tick_labels = set(), set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                every_tick_label |= {id(tick.label1), id(tick.label2)}
            for tick in axis._update_ticks():
                drawn_tick_labels |= {id(t) for t in (tick.label1, tick.label2) if t.get_visible()}
    boxes = []
    for t in fig.findobj(matplotlib.text.Text):
        if not t.get_visible() or not t.get_text().strip() or (t.axes is not None and not t.axes.get_visible()):
            continue
        if id(t) in every_tick_label and id(t) not in drawn_tick_labels:
            continue
        rotation = math.radians(t.get_rotation())
        t.set_rotation(0)  # the unrotated extent, then turned about the anchor as drawn
        flat = t.get_window_extent(renderer)
        t.set_rotation(math.degrees(rotation))
        drawn = t.get_window_extent(renderer)
        w, h = flat.width, flat.height
        corners = np.array([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]])
        turn = np.array([[math.cos(rotation), -math.sin(rotation)], [math.sin(rotation), math.cos(rotation)]])
        centre = np.array([(drawn.x0 + drawn.x1) / 2, (drawn.y0 + drawn.y1) / 2])
        boxes.append((t.get_text(), corners @ turn.T + centre))
    return boxes


def overlap(a, b, margin=0.5):
    """Whether two convex quadrilaterals overlap by more than `margin` pixels (separating axes)."""
    for poly in (a, b):
        for i in range(4):
            edge = poly[(i + 1) % 4] - poly[i]
            axis = np.array([-edge[1], edge[0]]) / (np.hypot(*edge) or 1)
            pa, pb = a @ axis, b @ axis
            if pa.max() - margin <= pb.min() or pb.max() - margin <= pa.min():
                return False
    return True


def check_layout(fig):
    width, height = fig.canvas.get_width_height()
    boxes = text_boxes(fig)
    outside = [t for t, c in boxes if c[:, 0].min() < -1 or c[:, 1].min() < -1
               or c[:, 0].max() > width + 1 or c[:, 1].max() > height + 1]
    clashes = [(a[0], b[0]) for i, a in enumerate(boxes) for b in boxes[i + 1:] if overlap(a[1], b[1])]
    return outside, clashes


@pytest.fixture
def figures(monkeypatch):
    """Every figure the module writes, kept open instead of written."""
    kept = []
    def keep(fig, path, dpi=130, tight=True):
        if tight:
            fig.tight_layout()
        kept.append(fig)
    monkeypatch.setattr(plots, "write_figure", keep)
    yield kept
    for fig in kept:
        plots.plt.close(fig)


def draw_all(names, channels):
    k = len(names)
    rng = np.random.default_rng(0)
    image = torch.rand(channels, 28, 28)
    longest = sorted(range(k), key=lambda i: -len(names[i]))
    history = [{"epoch": e, "train_acc": 0.5, "val_acc": 0.5, "train_loss": 1.0, "val_loss": 1.0,
                "lr": 1e-3 / (1 + (e > 3))} for e in range(1, 7)]
    plots.plot_history(history, "h.png", "Training on a dataset with a long name 28x28 (SYNTHETIC data, not "
                       "OrganAMNIST) (unverified file)", best_epoch=4)
    plots.plot_confusion(rng.integers(0, 50, (k, k)).tolist(), names, "c.png",
                         "Confusion matrix, test split of organamnist 28x28 (ACC 0.912, TTA off)")
    titles = [plots.panel_title(names, [longest[0], longest[1]] if i % 2 else longest[0], longest[1], 0.87,
                                ["WRONG"] if i % 2 else []) for i in range(4)]
    plots.explanation_figure([(image, torch.randn(channels, 28, 28), t) for t in titles], "e.png",
                             "Integrated Gradients on the test split of pathmnist 28x28 (SYNTHETIC data, not "
                             "PathMNIST)")
    plots.explanation_figure([(image, torch.randn(channels, 28, 28), titles[1])], "one.png",
                             "IG, model trained on organcmnist-synthetic 28x28 (SYNTHETIC data, not OrganCMNIST) "
                             "(unverified file)")
    plots.tile_figure(torch.rand(channels, 224, 224), image, torch.randn(channels, 28, 28),
                      ["a_long_tile_file_name_from_a_scanner_export.tif\nas read, 224×224 px", titles[1]], "t.png",
                      "a_long_tile_file_name_from_a_scanner_export.tif: IG, model trained on organcmnist-synthetic "
                      "28x28 (SYNTHETIC data, not OrganCMNIST); the model's 28 px input is the tile's centre square")
    kinds = [(kind, s) for kind in ("deletion", "insertion") for s in ("", "_random")]
    curves = {m: {**{f"{kind}_curve{s}": rng.random((4, 29)) for kind, s in kinds},
                  **{f"{kind}_auc{s}": 0.5 for kind, s in kinds}}
              for m in ("ig", "saliency", "smoothgrad_ig:n=16,sd=0.1")}
    plots.plot_faithfulness(curves, "f.png", "Deletion and insertion, 200 test images of chestmnist 28x28; pixels "
                            "set to the IG baseline (mean)")
    maps = [("trained |map|", torch.randn(channels, 28, 28))] + [
        (f"randomised down to\n{s}", torch.randn(channels, 28, 28))
        for s in ("classifier", "conv block 5", "conv block 1")]
    plots.plot_randomization_rows(image, [(m, maps, [0.5, 0.4, 0.3]) for m in (
        "ig: failed (mean 0.58 over 200 images)", "control:input: failed (mean 1.00 over 200 images)")], "r.png",
                                  "Cascading randomisation (top layer first), test image 17 of pathmnist 28x28")
    plots.plot_methods([(image, titles[i]) for i in range(3)],
                       {m: [torch.randn(channels, 28, 28) for _ in range(3)] for m in ("ig", "ig_local", "gradcam")},
                       "m.png", "Attribution methods side by side, test split of tissuemnist 28x28")
    demo_row = "true synthetic-8\npred synthetic-3 (78%)\nWRONG"  # the demo's figure: 10 such rows, a title that wraps
    plots.plot_methods([(image, demo_row) for i in range(10)],
                       {m: [torch.randn(channels, 28, 28) for _ in range(10)] for m in
                        ("expected_gradients", "ig", "saliency", "gradcam")}, "m2.png",
                       "Attribution methods side by side, test split of pathmnist-synthetic 28x28 (SYNTHETIC data, "
                       "not PathMNIST)")
    probs = rng.dirichlet(np.ones(k), 300)
    plots.plot_reliability(probs, rng.integers(0, k, 300), False, "rel.png",
                           "Reliability, test split of dermamnist 28x28 (SYNTHETIC data, not DermaMNIST) (ECE 0.031)")
    confident = np.eye(k)[rng.integers(0, k, 7180)] * 0.9 + 0.1 / k  # PathMNIST-sized: thousands in one bin
    plots.plot_reliability(confident, confident.argmax(1), False, "rel2.png",
                           "Reliability, test split of pathmnist 28x28 (ECE 0.004)")


@pytest.mark.parametrize("flag", datasets.FLAGS)
def test_no_text_overlaps_or_leaves_the_canvas_with_real_class_names(flag, figures):
    draw_all(datasets.class_names_of(flag), datasets.flag_info(flag)["n_channels"])
    problems = []
    for fig in figures:
        outside, clashes = check_layout(fig)
        problems += [f"{fig.texts[0].get_text()[:40] if fig.texts else fig.axes[0].get_title()[:40]!r}: "
                     f"outside {outside[:3]}, overlapping {clashes[:3]}" for _ in [0] if outside or clashes]
    assert not problems, "\n".join(problems)
