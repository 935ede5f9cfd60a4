"""plots.py: every figure the project draws, from plain arrays and tensors.

    training curves        plot_history        (train.py    -> <run>/images/accuracy_epoch.png)
    confusion matrix       plot_confusion      (evaluate.py -> <run>/images/confusion_matrix.png)
    reliability diagram    plot_reliability    (evaluate.py -> <run>/images/reliability.png)
    IG gallery             explanation_figure  (evaluate.py -> <run>/images/ig_examples.png,
                                                explain.py --db -> <run>/explain/run<R>_test_<I>_ig.png,
                                                slide.py -> <run>/slides/<slide>/explanations.png)
    one image file         tile_figure         (explain.py  -> <run>/explain/<name>_ig.png)
    deletion / insertion   plot_faithfulness   (evaluate.py -> <run>/images/faithfulness.png)
    randomisation example  plot_randomization_rows (evaluate.py -> <run>/images/sanity_randomization.png)
    methods side by side   plot_methods        (evaluate.py -> <run>/images/methods.png)

Images come in as float (C, H, W) tensors in [0, 1], i.e. already un-normalised: every panel shows
the tissue in its true colours, and 1-channel images (X-ray, CT, OCT, ultrasound) in greyscale. This
is the only module that imports matplotlib; it draws with the file-only Agg backend and writes every
figure atomically (write_figure), so a crash never leaves half a PNG.
"""
import itertools
import textwrap
import warnings

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

import formats
from files import atomic_path

matplotlib.use("Agg")  # files only, never a window; set before any figure exists, so it always holds


def write_figure(fig, path, dpi=130, tight=True):
    """Save a figure atomically (the format follows the suffix) and close it; `tight` lays it out
    with tight_layout first (figures with shared colour bars place themselves)."""
    if tight:
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


def plot_history(history, path, title, best_epoch=None):
    """Accuracy and loss per epoch, train and validation (history: train.py's rows), with the best
    epoch (lowest validation loss) and every learning-rate drop marked."""
    epochs = [h["epoch"] for h in history]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for key, style in (("train", "-o"), ("val", "-s")):
        ax_acc.plot(epochs, [h[f"{key}_acc"] for h in history], style, label=key, ms=3)
        ax_loss.plot(epochs, [h[f"{key}_loss"] for h in history], style, label=key, ms=3)
    drops = [h["epoch"] for prev, h in itertools.pairwise(history) if h["lr"] < prev["lr"]]
    for ax, name in ((ax_acc, "accuracy"), (ax_loss, "loss")):
        if best_epoch is not None:
            ax.axvline(best_epoch, color="black", linestyle="--", linewidth=1, label=f"best epoch ({best_epoch})")
        for i, epoch in enumerate(drops):
            ax.axvline(epoch, color="grey", linestyle=":", linewidth=1,
                       label="learning rate halved" if i == 0 else None)
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(textwrap.fill(title, 110))
    write_figure(fig, path, dpi=120)


def plot_confusion(cm, class_names, path, title):
    """Counts in each cell, shaded by the share of the true class (rows true, columns predicted)."""
    cm = np.asarray(cm)
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    labels = ["\n".join(textwrap.wrap(name, 22)) for name in class_names]  # long names wrap, never clip
    side = max(7.0, 0.6 * len(cm) + 3)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    shown = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="share of the true class (row)")
    for i in range(len(cm)):
        for j in range(len(cm)):
            # the row share below the count: errors of 1-3 images stay visible against the shading
            ax.text(j, i, f"{cm[i, j]}\n{formats.share(share[i, j])}" if cm[i, j] else "0", ha="center", va="center",
                    fontsize=6, color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(cm)), labels, rotation=45, ha="right", rotation_mode="anchor", fontsize=7)
    ax.set_yticks(range(len(cm)), labels, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.suptitle(textwrap.fill(title, int(side * 11)), fontsize=9)
    write_figure(fig, path, dpi=130)


def plot_reliability(probs, labels, multi_label, path, title, n_bins=15):
    """Accuracy against confidence in equal-width bins (the ECE's bins), with the count per bin.
    Multi-label data pools every (image, label) decision: confidence max(p, 1 - p)."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    if multi_label:
        p = probs.reshape(-1)
        conf, correct = np.maximum(p, 1 - p), (p > 0.5) == labels.reshape(-1).astype(bool)
    else:
        conf, correct = probs.max(1), probs.argmax(1) == labels
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    centres = (np.arange(n_bins) + 0.5) / n_bins
    counts = np.bincount(bins, minlength=n_bins)
    acc = np.divide(np.bincount(bins, weights=correct, minlength=n_bins), counts, out=np.zeros(n_bins),
                    where=counts > 0)
    ax.bar(centres[counts > 0], acc[counts > 0], width=1 / n_bins, edgecolor="black", color="#4c78a8",
           label="accuracy in bin")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    for c, a, n in zip(centres, acc, counts, strict=True):
        if n:
            ax.text(c, min(a + 0.02, 0.97), f"{n}", ha="center", fontsize=5, rotation=90)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(textwrap.fill(title, 60), fontsize=8)
    write_figure(fig, path, dpi=130)


TITLE_WIDTH = 24  # characters per line of a panel title: a 28 px panel is about this wide at fontsize 7
# a map whose |values| vary by less than this share of their largest is drawn as near-constant: Captum
# scales |map| from 0 to its top, so such a map would show as one solid colour (seen: a Grad-CAM map
# of a randomised model varying by 4%)
FLAT_SPREAD = 0.05


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
             f"pred {class_names[pred]} ({formats.probability(confidence)})", *notes]
    return "\n".join(line for part in parts for line in textwrap.wrap(part, TITLE_WIDTH))


def flat(attribution):
    """Whether a map is (nearly) constant over the image: its channel-summed |values| vary by under
    FLAT_SPREAD of their largest."""
    mass = np.abs(hwc(attribution).astype(np.float64).sum(2))
    top = mass.max()
    return top == 0 or (top - mass.min()) <= FLAT_SPREAD * top


def mark_flat(ax):
    """A flat map's panel: blank, saying so, rather than one colour."""
    ax.imshow(np.ones((2, 2, 3)))
    ax.text(0.5, 0.5, f"near-constant map:\n|values| vary by\nunder {formats.share(FLAT_SPREAD)}", ha="center",
            va="center", fontsize=6, transform=ax.transAxes)


def draw_explanation(fig, axes, image, attribution, title, scale=None, label="IG"):
    """Three panels: the image in true colours, the signed attribution map summed over channels (red
    +, blue -, on the symmetric colour scale `scale`, shared by every panel of a figure so that
    magnitudes compare; its own 99th percentile if None), and |attribution| over the image; `label`
    names the method. Returns the map's image artist (for a colour bar)."""
    from captum.attr import visualization as viz  # captum imports torch: slide.py's maps need neither
    img = hwc(image)
    attr = hwc(attribution).astype(np.float64)
    show_image(axes[0], image)
    axes[0].set_title(title, fontsize=7)
    signed = attr.sum(2)
    scale = scale or float(np.percentile(np.abs(signed), 99)) or 1.0
    shown = axes[1].imshow(signed, cmap="RdBu_r", vmin=-scale, vmax=scale)
    if flat(attribution):
        mark_flat(axes[2])
    else:
        viz.visualize_image_attr(attr, img, method="blended_heat_map", sign="absolute_value",
                                 plt_fig_axis=(fig, axes[2]), alpha_overlay=0.6, use_pyplot=False)
    axes[1].set_title(f"{label} (red +, blue -)", fontsize=7)  # colour-blind safe, unlike red/green
    axes[2].set_title(f"|{label}| over the image", fontsize=7)
    no_ticks(axes)
    return shown


PANEL_IN, GAP_IN, TITLE_LINE_IN = 1.5, 0.12, 0.125  # a map panel's side, the gap between panels, a title line


def explanation_figure(panels, path, suptitle, per_row=None, label="IG"):
    """panels: [(image (C, H, W) in [0, 1], attribution (C, H, W), title) or None for an empty slot],
    drawn `per_row` to a row (default two, or one for a single panel), the maps those of the method
    `label` names. Laid out in inches, panel by
    panel, so the panels fill the figure's width whatever the number of rows and title lines."""
    per_row = per_row or (2 if len(panels) > 1 else 1)
    rows, columns = (len(panels) + per_row - 1) // per_row, 3 * per_row
    title_lines = max(title.count("\n") + 1 for _, _, title in filter(None, panels))
    width = 0.3 + columns * PANEL_IN + (columns - 1) * GAP_IN
    text = textwrap.fill(suptitle, int(width * 13))  # ~13 characters per inch at fontsize 9
    head = 0.17 * (text.count("\n") + 1) + 0.15  # the suptitle's lines
    row_gap = TITLE_LINE_IN * title_lines + 0.2  # room for a row's panel titles
    bottom = 0.8  # the shared colour bar and its label
    height = head + rows * (PANEL_IN + row_gap) + bottom
    fig, axes = plt.subplots(rows, columns, figsize=(width, height), squeeze=False)
    fig.subplots_adjust(left=0.15 / width, right=1 - 0.15 / width, top=1 - (head + row_gap) / height,
                        bottom=bottom / height, wspace=GAP_IN / PANEL_IN, hspace=row_gap / PANEL_IN)
    for ax in axes.flat:
        ax.axis("off")
    # one colour scale for every map of the figure: the 99th percentile of all |channel sums|
    sums = np.concatenate([np.abs(a.detach().float().sum(0).cpu().numpy()).ravel() for _, a, _ in filter(None, panels)])
    scale = float(np.percentile(sums, 99)) or 1.0
    for i, panel in enumerate(panels):
        if panel is None:  # an empty slot keeps the rows aligned (one class a row)
            continue
        image, attribution, title = panel
        r, c = divmod(i, per_row)
        row_axes = axes[r, 3 * c:3 * c + 3]
        for ax in row_axes:
            ax.axis("on")
        shown = draw_explanation(fig, row_axes, image, attribution, title, scale, label)
    fig.suptitle(text, fontsize=9, y=1 - 0.1 / height, va="top")
    cax = fig.add_axes((0.3, 0.3 / height, 0.4, 0.08 / height))  # ticks below, label above, in 0.8 in
    colorbar = fig.colorbar(shown, cax=cax, orientation="horizontal")
    colorbar.ax.tick_params(labelsize=6)
    colorbar.ax.xaxis.set_label_position("top")
    colorbar.set_label(f"{label} per pixel (sum over channels), one scale for every panel", fontsize=6)
    write_figure(fig, path, dpi=130, tight=False)


def tile_figure(tile, image, attribution, title, path, suptitle):
    """One image file explained: the tile as read (`tile`, (C, s, s) in [0, 1], titled `title[0]`:
    its file name and size), the model's input (`image`, titled `title[1]`), the signed map and
    |map| over the input; laid out in inches as explanation_figure is."""
    name = "\n".join(line for part in title[0].split("\n")
                     for line in textwrap.wrap(part, TITLE_WIDTH, break_long_words=True))
    lines = max(name.count("\n"), title[1].count("\n")) + 1
    width = 0.3 + 4 * PANEL_IN + 3 * GAP_IN
    text = textwrap.fill(suptitle, int(width * 13))
    head, row_gap, bottom = 0.17 * (text.count("\n") + 1) + 0.15, TITLE_LINE_IN * lines + 0.2, 0.8
    height = head + PANEL_IN + row_gap + bottom
    fig, axes = plt.subplots(1, 4, figsize=(width, height))
    fig.subplots_adjust(left=0.15 / width, right=1 - 0.15 / width, top=1 - (head + row_gap) / height,
                        bottom=bottom / height, wspace=GAP_IN / PANEL_IN)
    show_image(axes[0], tile)
    axes[0].set_title(name, fontsize=7)
    shown = draw_explanation(fig, axes[1:], image, attribution, title[1])
    no_ticks(axes)
    fig.suptitle(text, fontsize=9, y=1 - 0.1 / height, va="top")
    colorbar = fig.colorbar(shown, cax=fig.add_axes((0.3, 0.3 / height, 0.4, 0.08 / height)), orientation="horizontal")
    colorbar.ax.tick_params(labelsize=6)
    colorbar.ax.xaxis.set_label_position("top")
    colorbar.set_label("IG per pixel (sum over channels)", fontsize=6)
    write_figure(fig, path, dpi=130, tight=False)


def plot_faithfulness(curves, path, title):
    """Mean deletion and insertion curves per method, with the random-order reference.

    curves: {method: {"deletion_curve": (N, P), "deletion_curve_random": ..., "insertion_curve": ...,
    "insertion_curve_random": ..., and the mean "<curve>_auc" of each}}; every method is scored on
    the same images with the same random order, so one reference is drawn.
    """
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, kind in zip(axes, ("deletion", "insertion"), strict=True):
        for method, c in curves.items():
            frac = np.linspace(0, 1, np.shape(c[f"{kind}_curve"])[1])
            ax.plot(frac, np.mean(c[f"{kind}_curve"], 0), "-",
                    label=f"{method} order (AUC {formats.measure(c[f'{kind}_auc'])})")
        reference = next(iter(curves.values()))
        ax.plot(frac, np.mean(reference[f"{kind}_curve_random"], 0), "--", color="grey",
                label=f"random order (AUC {formats.measure(reference[f'{kind}_auc_random'])})")
        action = "deleted (set to baseline)" if kind == "deletion" else "inserted into baseline"
        ax.set_xlabel(f"fraction of pixels {action}")
        ax.set_ylabel("probability of the explained class")
        ax.set_title(f"{kind} ({'lower' if kind == 'deletion' else 'higher'} AUC is better)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(textwrap.fill(title, 120), fontsize=9)
    write_figure(fig, path, dpi=120)


def plot_randomization_rows(image, rows, path, title):
    """One image and, per row (a method), its trained map and its maps after each randomisation
    stage. rows: [(method, [(stage name, (C, H, W) map)], [Spearman per later map])]."""
    from captum.attr import visualization as viz
    columns = 1 + max(len(maps) for _, maps, _ in rows)
    lines = max(len(textwrap.wrap(method, 22)) for method, _, _ in rows) + 1  # the image column's title
    height = len(rows) * (1.75 + 0.13 * max(lines, 3)) + 0.6
    fig, axes = plt.subplots(len(rows), columns, figsize=(1.7 * columns, height), squeeze=False)
    for r, (method, maps, correlations) in enumerate(rows):
        show_image(axes[r, 0], image)
        axes[r, 0].set_title("image" if not method else "\n".join(textwrap.wrap(method, 22)) + "\nimage", fontsize=7)
        # a row with fewer maps than the widest leaves its last panels empty (turned off below)
        for ax, (name, attribution), rho in zip(axes[r, 1:], maps, [None] + list(correlations), strict=False):
            if flat(attribution):  # Captum would scale it to one solid colour
                mark_flat(ax)
            else:
                with warnings.catch_warnings():  # a randomised model's tiny maps are still drawn to scale
                    warnings.filterwarnings("ignore", message="Attempting to normalize by value approximately 0")
                    viz.visualize_image_attr(hwc(attribution).astype(np.float64), hwc(image), method="heat_map",
                                             sign="absolute_value", plt_fig_axis=(fig, ax), use_pyplot=False)
            ax.set_title(name if rho is None else f"{name}\nSpearman {formats.measure(rho)}", fontsize=7)
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
    wrapped = textwrap.fill(title, int(1.45 * columns * 13))
    header = 0.4 + 0.17 * (wrapped.count("\n") + 1)  # inches above the column titles: the figure title's lines
    height = rows * (1.45 + 0.12 * title_lines) + 0.45 + header
    width = 1.45 * columns + 1.4  # room on the left for the row titles
    fig, axes = plt.subplots(rows, columns, figsize=(width, height), squeeze=False)
    fig.subplots_adjust(left=1.5 / width, right=0.98, top=1 - header / height, bottom=0.45 / height, hspace=0.25)
    for c, method in enumerate(methods, start=1):
        sums = [m.detach().float().sum(0).cpu().numpy() for m in method_maps[method]]
        scale = float(np.percentile(np.abs(np.stack(sums)), 99)) or 1.0
        for r, (m, full) in enumerate(zip(sums, method_maps[method], strict=True)):
            shown = axes[r, c].imshow(m, cmap="RdBu_r", vmin=-scale, vmax=scale)
            if flat(full):
                mark_flat(axes[r, c])
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
    fig.suptitle(wrapped, fontsize=9, y=1 - 0.1 / height, va="top")
    write_figure(fig, path, dpi=130, tight=False)  # tight_layout cannot place the per-column colour bars
