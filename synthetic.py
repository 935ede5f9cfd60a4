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

# The class evidence is structure alone. Every pixel carries a texture of the same two levels (+-1
# times AMPLITUDE along one colour direction) in cells on a 28 x 28 grid: inside an image's evidence
# rectangle the cells repeat its class's 4 x 4 motif (turned and flipped at random, at a random
# offset), everywhere else they are independent coin flips. Each motif has half its cells on, and
# half of its neighbouring cells differ across and down, as in coin flips: so the mean colour, the
# contrast and the edge energy are the same inside and outside the rectangle. A map that looks only
# at the image (|x - baseline|, a Sobel edge map) puts there no more than its share of the area;
# only a model that learnt the motifs can find the evidence.
MOTIF = 4  # cells per motif side
N_MOTIFS = 16  # >= chestmnist's 14 labels
GRID = 28  # texture cells per image side, at every image size
AMPLITUDE, PIXEL_NOISE = 45.0, 4.0  # grey levels: the texture's half-range and independent pixel noise
TEXTURE_COLOUR = {3: np.array([0.6, 0.8, 0.55]), 1: np.array([1.0])}  # the texture's direction in colour
BACKGROUND = {3: np.array([200, 140, 180], np.float32), 1: np.array([160], np.float32)}
TEST_STAIN = {3: np.array([0.93, 1.0, 1.06], np.float32),  # the "other centre" shift
              1: np.array([0.95], np.float32)}
LABEL_RATES = (0.6, 0.3)  # multi-label: chance of a first and of a second finding


def symmetries(m):
    """The 8 flips/rotations of a square array."""
    return [np.rot90(m, r)[:, ::-1] if flip else np.rot90(m, r) for r in range(4) for flip in (False, True)]


def balanced_motifs(n=N_MOTIFS, seed=0):
    """n binary MOTIF x MOTIF patterns, each with half its cells on and half of its (wrapped)
    neighbours differing across and down, none equal to another (or its inverse) under any flip,
    rotation or shift: what the classes are told apart by."""
    rng, found, seen = np.random.default_rng(seed), [], set()
    while len(found) < n:
        m = np.zeros(MOTIF * MOTIF, np.int8)
        m[rng.choice(MOTIF * MOTIF, MOTIF * MOTIF // 2, replace=False)] = 1
        m = m.reshape(MOTIF, MOTIF)
        if (m != np.roll(m, 1, 1)).mean() != 0.5 or (m != np.roll(m, 1, 0)).mean() != 0.5:
            continue
        variants = {np.roll(v, (dy, dx), (0, 1)).tobytes() for v in symmetries(m) + symmetries(1 - m)
                    for dy in range(MOTIF) for dx in range(MOTIF)}
        if not variants & seen:
            found.append(m)
            seen |= variants
    return np.stack(found)


MOTIFS = balanced_motifs()


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

    Single-label tasks: one evidence rectangle of the image's class covering 16-36% of it.
    Multi-label: up to two findings, each its own rectangle (the first in the left half, the second
    in the right), and images with none, as in chest X-rays."""
    info = flag_info(flag)
    k, c, multi = len(info["label"]), info["n_channels"], info["task"] == MULTI_LABEL
    labels = rng.integers(0, k, size=n)
    cells = (np.arange(size) * GRID) // size  # the texture cell of each pixel row (and column)
    texture = (rng.integers(0, 2, (n, GRID, GRID)) * 2 - 1.0)[:, cells][:, :, cells]  # coin flips
    if multi:
        second = rng.integers(0, k, size=n)
        present = rng.random((n, 2)) < np.array(LABEL_RATES)
        present[:, 1] &= second != labels
        half = size // 2
        texture, first_mask = paint_evidence(rng, texture, labels, present[:, 0], cells, (0.25, 0.45), (0, half))
        texture, second_mask = paint_evidence(rng, texture, second, present[:, 1], cells, (0.25, 0.45), (half, size))
        masks = first_mask | second_mask
        out_labels = np.zeros((n, k), np.int64)
        out_labels[np.flatnonzero(present[:, 0]), labels[present[:, 0]]] = 1
        out_labels[np.flatnonzero(present[:, 1]), second[present[:, 1]]] = 1
    else:
        texture, masks = paint_evidence(rng, texture, labels, np.ones(n, bool), cells, (0.4, 0.6), (0, size))
        out_labels = labels.reshape(-1, 1)
    # Class-independent colour: a base per image, smooth blotches, the texture, pixel noise.
    blotches = rng.normal(0, 18, size=(n, c, 4, 4)).astype(np.float32)
    blotches = torch.nn.functional.interpolate(torch.from_numpy(blotches), size=(size, size),
                                               mode="bicubic", align_corners=False).numpy()
    base = BACKGROUND[c] + rng.normal(0, 10, (n, c))
    colour = TEXTURE_COLOUR[c] / np.linalg.norm(TEXTURE_COLOUR[c]) * np.sqrt(c)  # AMPLITUDE per channel on average
    images = (base[:, :, None, None] + blotches + AMPLITUDE * texture[:, None] * colour[None, :, None, None]
              + rng.normal(0, PIXEL_NOISE, (n, c, size, size)))
    if shifted:
        images = images * TEST_STAIN[c][None, :, None, None]
    images = np.clip(images, 0, 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
    return (images[..., 0] if c == 1 else images), out_labels, masks.astype(np.uint8)


def class_texture(rng, labels, cells):
    """Each image's class motif, turned or flipped by one of the 8 symmetries and tiled from a random
    offset, as +-1 per pixel."""
    n, tiles = len(labels), -(-(GRID + MOTIF) // MOTIF)  # enough repeats for any offset
    turned = np.stack([symmetries(m) for m in MOTIFS])[labels, rng.integers(0, 8, n)]  # (n, MOTIF, MOTIF)
    tiled = np.tile(turned, (1, tiles, tiles))
    dy, dx = rng.integers(0, MOTIF, (2, n))
    rows = (dy[:, None] + np.arange(GRID))[:, :, None]
    cols = (dx[:, None] + np.arange(GRID))[:, None, :]
    on = tiled[np.arange(n)[:, None, None], rows, cols]  # (n, GRID, GRID)
    return (on * 2 - 1.0)[:, cells][:, :, cells]


def paint_evidence(rng, texture, labels, present, cells, width, columns):
    """Put each image's class motif into a random rectangle: height 40-60% of the image, width a
    `width` share of it, inside the `columns` (start, end) band; only where `present`. Returns
    (texture, masks)."""
    n, size, _ = texture.shape
    py, px = np.mgrid[0:size, 0:size]
    h = rng.integers(int(0.4 * size), int(0.6 * size) + 1, n)[:, None, None]
    w = rng.integers(int(width[0] * size), int(width[1] * size) + 1, n)[:, None, None]
    top = rng.integers(0, size - h + 1)
    left = columns[0] + rng.integers(0, columns[1] - columns[0] - w + 1)
    masks = (py >= top) & (py < top + h) & (px >= left) & (px < left + w) & present[:, None, None]
    return np.where(masks, class_texture(rng, labels, cells), texture), masks
