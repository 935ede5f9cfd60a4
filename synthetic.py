"""synthetic.py: a SYNTHETIC stand-in for any MedMNIST 2D dataset, for offline runs and tests.

    python train.py --synthetic                 # writes data/pathmnist_synthetic.npz on first use

It has the real file's keys, dtypes, layout, channels, class count and task, and its class evidence
sits inside known rectangles per image, saved as `<split>_masks`, so explanations can be scored
against where the evidence really is. The test split gets another "stain" (a colour shift), as
PathMNIST's test centre does. It is only used when asked for (--synthetic), and named synthetic
wherever it appears: no number made from it says anything about a real dataset.
"""
import numpy as np
import torch

from datasets import FLAG, MULTI_LABEL, SPLITS, flag_info
from files import atomic_path
from progress import progress

COUNTS = {"train": 6000, "val": 1000, "test": 1000}

# Classes as (colour, texture) pairs: colours repeat across classes and so do textures, so a model
# must use both, and both live only inside the evidence mask. The first nine are PathMNIST's stand-ins;
# 20 pairs cover the largest label count (chestmnist's 14). One channel uses grey levels instead.
SYNTHETIC_COLOURS = np.array([[150, 60, 140], [205, 95, 125], [105, 45, 115], [235, 195, 215],
                              [175, 115, 180]], dtype=np.float32)
SYNTHETIC_GREYS = np.array([[35], [85], [135], [250], [160]], dtype=np.float32)
SYNTHETIC_CLASSES = [(0, 0), (1, 1), (2, 2), (3, 3), (4, 0), (0, 2), (1, 3), (2, 0), (4, 1),
                     (0, 1), (0, 3), (1, 0), (1, 2), (2, 1), (2, 3), (3, 0), (3, 1), (3, 2), (4, 2), (4, 3)]
SYNTHETIC_BACKGROUND = {3: np.array([225, 165, 195], np.float32), 1: np.array([190], np.float32)}
SYNTHETIC_TEST_STAIN = {3: np.array([0.93, 1.0, 1.06], np.float32),  # the "other centre" shift
                        1: np.array([0.95], np.float32)}
SYNTHETIC_LABEL_RATES = (0.6, 0.3)  # multi-label: chance of a first and of a second finding


def write_synthetic(path, size=28, counts=None, seed=0, flag=FLAG):
    """Write a learnable SYNTHETIC npz in `flag`'s MedMNIST format (channels, classes, task), with
    evidence masks, atomically."""
    counts = counts or COUNTS
    rng = np.random.default_rng(seed)
    arrays = {}
    for split in progress(SPLITS, desc=f"writing SYNTHETIC data {path}", unit="split"):
        images, labels, masks = synthetic_split(rng, counts[split], size, shifted=(split == "test"), flag=flag)
        arrays.update({f"{split}_images": images, f"{split}_labels": labels, f"{split}_masks": masks})
    with atomic_path(path) as tmp:
        np.savez_compressed(tmp, **arrays)


def synthetic_split(rng, n, size, shifted=False, flag=FLAG):
    """(images as MedMNIST stores them, labels, masks) for n synthetic images of `flag`'s kind.

    Single-label tasks: one evidence rectangle of the image's class covering 15-35% of it.
    Multi-label: up to two findings, each its own rectangle (the first in the left half, the second
    in the right), and images with none, as in chest X-rays."""
    info = flag_info(flag)
    k, c, multi = len(info["label"]), info["n_channels"], info["task"] == MULTI_LABEL
    labels = rng.integers(0, k, size=n)
    py, px = np.mgrid[0:size, 0:size]
    yy, xx = py * (28 / size), px * (28 / size)  # texture coordinates: patterns scale with size
    # Textures have no fixed orientation (neither has tissue, and training rotates images), so
    # stripes run across or down at random; the class is told by their spacing.
    across = rng.random(n)[:, None, None] < 0.5
    coord = np.where(across, yy[None], xx[None])
    textures = np.stack([np.sin(2 * np.pi * coord / 3.5),                             # fine stripes
                         np.sin(2 * np.pi * coord / 7.0),                             # coarse stripes
                         np.broadcast_to(np.sin(np.pi * xx / 2) * np.sin(np.pi * yy / 2), coord.shape),  # dots
                         np.zeros_like(coord)], axis=1)                               # flat
    # Class-independent background: smooth blotches and pixel noise (pinkish tissue in colour).
    blotches = rng.normal(0, 18, size=(n, c, 4, 4)).astype(np.float32)
    blotches = torch.nn.functional.interpolate(torch.from_numpy(blotches), size=(size, size),
                                               mode="bicubic", align_corners=False).numpy()
    base = SYNTHETIC_BACKGROUND[c] + rng.normal(0, 10, (n, c))
    images = base[:, :, None, None] + blotches
    palette = SYNTHETIC_COLOURS if c == 3 else SYNTHETIC_GREYS
    if multi:
        second = rng.integers(0, k, size=n)
        present = rng.random((n, 2)) < np.array(SYNTHETIC_LABEL_RATES)
        present[:, 1] &= second != labels
        half = size // 2
        images, first_mask = paint_evidence(rng, images, labels, present[:, 0], textures, palette,
                                            (0.25, 0.45), (0, half))
        images, second_mask = paint_evidence(rng, images, second, present[:, 1], textures, palette,
                                             (0.25, 0.45), (half, size))
        masks = first_mask | second_mask
        out_labels = np.zeros((n, k), np.int64)
        out_labels[np.flatnonzero(present[:, 0]), labels[present[:, 0]]] = 1
        out_labels[np.flatnonzero(present[:, 1]), second[present[:, 1]]] = 1
    else:
        images, masks = paint_evidence(rng, images, labels, np.ones(n, bool), textures, palette,
                                       (0.4, 0.6), (0, size))
        out_labels = labels.reshape(-1, 1)
    images = images + rng.normal(0, 12, (n, c, size, size))
    if shifted:
        images = images * SYNTHETIC_TEST_STAIN[c][None, :, None, None]
    images = np.clip(images, 0, 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
    return (images[..., 0] if c == 1 else images), out_labels, masks.astype(np.uint8)


def paint_evidence(rng, images, labels, present, textures, palette, width, columns):
    """Paint each image's class evidence (its colour and texture) into a random rectangle: height
    40-60% of the image, width a `width` share of it, inside the `columns` (start, end) band; only
    where `present`. Returns (images, masks)."""
    n, _, size, _ = images.shape
    py, px = np.mgrid[0:size, 0:size]
    h = rng.integers(int(0.4 * size), int(0.6 * size) + 1, n)[:, None, None]
    w = rng.integers(int(width[0] * size), int(width[1] * size) + 1, n)[:, None, None]
    top = rng.integers(0, size - h + 1)
    left = columns[0] + rng.integers(0, columns[1] - columns[0] - w + 1)
    masks = (py >= top) & (py < top + h) & (px >= left) & (px < left + w) & present[:, None, None]
    colour_idx, texture_idx = np.array(SYNTHETIC_CLASSES)[labels].T
    colour = palette[colour_idx] + rng.normal(0, 10, (n, palette.shape[1]))
    evidence = colour[:, :, None, None] + 35 * textures[np.arange(n), texture_idx][:, None]
    return np.where(masks[:, None], evidence, images), masks
