"""plots.py: every figure the project draws, from plain arrays and tensors.

    training curves        plot_history        (train.py    -> <run>/images/accuracy_epoch.png)
    confusion matrix       plot_confusion      (evaluate.py -> <run>/images/confusion_matrix.png)
    IG gallery / one image explanation_figure  (evaluate.py -> <run>/images/ig_examples.png,
                                                explain.py  -> images/explain/<name>_ig.png)
    deletion / insertion   plot_faithfulness   (evaluate.py -> <run>/images/faithfulness.png)
    randomisation example  plot_randomization_rows (evaluate.py -> <run>/images/sanity_randomization.png)
    methods side by side   plot_methods        (evaluate.py -> <run>/images/methods.png)

Images come in as float (C, H, W) tensors in [0, 1], i.e. already un-normalised: every panel shows
the tissue in its true colours, and 1-channel images (X-ray, CT, OCT, ultrasound) in greyscale. This is the only module that imports matplotlib; it draws with the
file-only Agg backend and writes every figure atomically (write_figure), so a crash never leaves
half a PNG.
"""
import textwrap
import warnings

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from captum.attr import visualization as viz

from data import atomic_path

matplotlib.use("Agg")  # files only, never a window; set before any figure exists, so it always holds


def write_figure(fig, path, dpi=130):
    """Save a figure atomically (the format follows the suffix) and close it."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)


def hwc(t):
    """A (C, H, W) tensor as an (H, W, C) float numpy array, as matplotlib wants it."""
    return t.detach().float().permute(1, 2, 0).cpu().numpy()


def show_image(ax, image):
    """Draw a (C, H, W) [0, 1] image as it is: RGB in true colours, one channel in greyscale."""
    img = np.clip(hwc(image), 0, 1)
    if img.shape[2] == 1:
        ax.imshow(img[:, :, 0], cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(img)


def no_ticks(axes):
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])


def plot_history(history, path, title):
    """Accuracy and loss per epoch, train and validation (history: train.py's rows)."""
    epochs = [h["epoch"] for h in history]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for key, style in (("train", "-o"), ("val", "-s")):
        ax_acc.plot(epochs, [h[f"{key}_acc"] for h in history], style, label=key, ms=3)
        ax_loss.plot(epochs, [h[f"{key}_loss"] for h in history], style, label=key, ms=3)
    for ax, name in ((ax_acc, "accuracy"), (ax_loss, "cross-entropy loss")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    write_figure(fig, path, dpi=120)


def plot_confusion(cm, class_names, path, title):
    """Counts in each cell, shaded by the share of the true class (rows true, columns predicted)."""
    cm = np.asarray(cm)
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(8, 7))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(cm)):
        for j in range(len(cm)):
            ax.text(j, i, f"{cm[i, j]}", ha="center", va="center", fontsize=7,
                    color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(cm)), class_names, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(cm)), class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    write_figure(fig, path, dpi=130)


TITLE_WIDTH = 24  # characters per line of a panel title: a 28 px panel is about this wide at fontsize 7


def label_text(class_names, true):
    """How a true label reads: '?' when unknown, the class name, or for multi-label data (a list of
    label indices) the names joined by commas, 'none' when the image has no finding."""
    if true is None:
        return "?"
    if isinstance(true, (list, tuple)):
        return ", ".join(class_names[t] for t in true) or "none"
    return class_names[true]


def panel_title(class_names, true, pred, confidence, notes=()):
    """'true X / pred Y (87%)' and any notes, each wrapped to the panel's width: PathMNIST names run
    to 'colorectal adenocarcinoma epithelium', which would spill over the neighbouring panels.
    `true` is a class index, a list of them (multi-label) or None (see label_text)."""
    parts = [f"true {label_text(class_names, true)}",
             f"pred {class_names[pred]} ({confidence:.0%})", *notes]
    return "\n".join(line for part in parts for line in textwrap.wrap(part, TITLE_WIDTH))


def draw_explanation(fig, axes, image, attribution, title):
    """Three panels: the image in true colours, the signed attribution map, and the overlay."""
    img = hwc(image)
    attr = hwc(attribution).astype(np.float64)
    show_image(axes[0], image)
    axes[0].set_title(title, fontsize=7)
    if np.abs(attr).sum() > 0:
        viz.visualize_image_attr(attr, img, method="heat_map", sign="all", plt_fig_axis=(fig, axes[1]),
                                 use_pyplot=False)
        viz.visualize_image_attr(attr, img, method="blended_heat_map", sign="absolute_value",
                                 plt_fig_axis=(fig, axes[2]), alpha_overlay=0.6, use_pyplot=False)
    axes[1].set_title("IG (green +, red -)", fontsize=7)
    axes[2].set_title("|IG| overlay", fontsize=7)
    no_ticks(axes)


def explanation_figure(panels, path, suptitle):
    """panels: [(image (C, H, W) in [0, 1], attribution (C, H, W), title)], drawn two per row."""
    per_row = 2 if len(panels) > 1 else 1
    rows = (len(panels) + per_row - 1) // per_row
    title_lines = max(title.count("\n") + 1 for _, _, title in panels)
    width = 3 * per_row * 1.6
    # each row: the panels plus room for the longest title (about 0.13 in per line at fontsize 7)
    fig, axes = plt.subplots(rows, 3 * per_row, figsize=(width, rows * (1.65 + 0.13 * title_lines) + 0.6),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (image, attribution, title) in enumerate(panels):
        r, c = divmod(i, per_row)
        row_axes = axes[r, 3 * c:3 * c + 3]
        for ax in row_axes:
            ax.axis("on")
        draw_explanation(fig, row_axes, image, attribution, title)
    fig.suptitle(textwrap.fill(suptitle, int(width * 13)), fontsize=9)  # ~13 characters per inch
    write_figure(fig, path, dpi=130)


def plot_faithfulness(curves, path, title):
    """Mean deletion and insertion curves per method, with the random-order reference.

    curves: {method: {"deletion_curve": (N, P), "deletion_curve_random": ..., "insertion_curve": ...,
    "insertion_curve_random": ..., and the mean "<curve>_auc" of each}}; every method is scored on
    the same images with the same random order, so one reference is drawn.
    """
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, kind in zip(axes, ("deletion", "insertion")):
        for method, c in curves.items():
            frac = np.linspace(0, 1, np.shape(c[f"{kind}_curve"])[1])
            ax.plot(frac, np.mean(c[f"{kind}_curve"], 0), "-",
                    label=f"{method} order (AUC {c[f'{kind}_auc']:.3f})")
        reference = next(iter(curves.values()))
        ax.plot(frac, np.mean(reference[f"{kind}_curve_random"], 0), "--", color="grey",
                label=f"random order (AUC {reference[f'{kind}_auc_random']:.3f})")
        action = "deleted (set to baseline)" if kind == "deletion" else "inserted into baseline"
        ax.set_xlabel(f"fraction of pixels {action}")
        ax.set_ylabel("probability of the explained class")
        ax.set_title(f"{kind} ({'lower' if kind == 'deletion' else 'higher'} AUC is better)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    write_figure(fig, path, dpi=120)


def plot_randomization(image, maps, correlations, path, title):
    """One image, its map, and the maps after each randomisation stage: a one-row
    plot_randomization_rows. maps: [(name, (C, H, W) map)], the trained model's first;
    correlations: one per later map."""
    plot_randomization_rows(image, [("", maps, correlations)], path, title)


def plot_randomization_rows(image, rows, path, title):
    """One image and, per row (a method), its trained map and its maps after each randomisation
    stage. rows: [(method, [(stage name, (C, H, W) map)], [Spearman per later map])]."""
    columns = 1 + max(len(maps) for _, maps, _ in rows)
    fig, axes = plt.subplots(len(rows), columns, figsize=(1.7 * columns, 2.1 * len(rows) + 0.4), squeeze=False)
    for r, (method, maps, correlations) in enumerate(rows):
        show_image(axes[r, 0], image)
        axes[r, 0].set_title("image" if not method else f"{method}\nimage", fontsize=7)
        for ax, (name, attribution), rho in zip(axes[r, 1:], maps, [None] + list(correlations)):
            if attribution.abs().sum() > 0:  # Captum cannot scale an all-zero map
                with warnings.catch_warnings():  # a randomised model's tiny maps are still drawn to scale
                    warnings.filterwarnings("ignore", message="Attempting to normalize by value approximately 0")
                    viz.visualize_image_attr(hwc(attribution).astype(np.float64), hwc(image), method="heat_map",
                                             sign="absolute_value", plt_fig_axis=(fig, ax), use_pyplot=False)
            ax.set_title(name if rho is None else f"{name}\nSpearman {rho:.2f}", fontsize=7)
        for ax in axes[r, 1 + len(maps):]:
            ax.axis("off")
    no_ticks(axes.flat)
    fig.suptitle(textwrap.fill(title, int(1.7 * columns * 13)), fontsize=8)
    write_figure(fig, path, dpi=130)


def plot_methods(examples, method_maps, path, title):
    """The same examples in every attribution method, side by side: per row the image (true
    colours, or grey for one channel) and one signed map per method, summed over channels, red
    positive and blue negative. Each method (column) has one colour scale for all rows, symmetric
    around 0 at the 99th percentile of its |values|, so maps of one method compare across images.

    examples: [(image (C, H, W) in [0, 1], row title)]; method_maps: {method: [(C, H, W) map per example]}.
    """
    methods = list(method_maps)
    rows, columns = len(examples), 1 + len(methods)
    title_lines = max(t.count("\n") + 1 for _, t in examples)
    height = rows * (1.45 + 0.12 * title_lines) + 0.9
    fig, axes = plt.subplots(rows, columns, figsize=(1.45 * columns, height), squeeze=False)
    fig.subplots_adjust(top=1 - 0.55 / height, bottom=0.45 / height, hspace=0.25)
    for c, method in enumerate(methods, start=1):
        sums = [m.detach().float().sum(0).cpu().numpy() for m in method_maps[method]]
        scale = float(np.percentile(np.abs(np.stack(sums)), 99)) or 1.0
        for r, m in enumerate(sums):
            shown = axes[r, c].imshow(m, cmap="RdBu_r", vmin=-scale, vmax=scale)
        axes[0, c].set_title(method, fontsize=8)
        colorbar = fig.colorbar(shown, ax=axes[:, c].tolist(), orientation="horizontal", fraction=0.02,
                                pad=0.01, aspect=12)
        colorbar.ax.tick_params(labelsize=5)
        colorbar.set_ticks([-scale, 0, scale])
        colorbar.ax.set_xticklabels([f"{-scale:.2g}", "0", f"{scale:.2g}"])
    for r, (image, row_title) in enumerate(examples):
        show_image(axes[r, 0], image)
        axes[r, 0].set_ylabel(row_title, fontsize=6, rotation=0, ha="right", va="center")
    no_ticks(axes.flat)
    fig.suptitle(textwrap.fill(title, int(1.45 * columns * 13)), fontsize=9)
    with atomic_path(path) as tmp:  # no tight_layout: it cannot place the per-column colour bars
        fig.savefig(tmp, dpi=130, bbox_inches="tight")
    plt.close(fig)
