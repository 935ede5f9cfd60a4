"""slide_explanations.py: attribution maps of a mapped slide's tiles, in the run's explanation store.

    picked = slide_explanations.chosen(rows, k)     # per class, the k most and k least confident
    run_id, split, computed = slide_explanations.explain_tiles(explainer, slide, grid, picked, store, slide_md5)

The tiles are explained as evaluate.py explains test images (explanations.py: IG first, with its
completeness terms, then the drawn method for the same tiles and classes), no attribution code of
their own. They go into the run's explanations.db under the split "slide:<slide MD5>:<tile px>",
each tile's image index its place on the slide's grid, and slide_tiles (schema v9) records the
slide and the tile's level-0 corner: so a map is found again by slide and coordinates, and a rerun
computes only the tiles the store lacks. Tiles are read from the slide when explained, a batch at
a time, as the map reads them: nothing holds the slide whole.
"""
import heapq
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import attribution as attr
import budget
import db
import explanations
import formats
import plots
import wsi
from colour import to_unit

FIGURE_K = 4  # tiles per class and end in explanations.png, whatever --explain stores
IG_BATCH = 32  # tiles per IG batch and per store transaction (evaluate.py's --ig-batch default)
ATTR_DTYPE = "float16"  # evaluate.py's default: the same run in the store as its test images


@dataclass(frozen=True)
class TileExplainer:
    """How a checkpoint's slide tiles are explained: the BN-folded model, the IG settings (with the
    checkpoint, the run's key in the store), the method drawn ("ig", or the run's recommended one)
    and the explainers of the methods other than IG, the device, and what identifies the run."""
    model: torch.nn.Module
    ig_settings: dict
    method: str
    explainers: dict
    device: torch.device
    run_key: tuple  # db.run_id_for's arguments after the connection
    synthetic: bool  # the model was trained on the synthetic dataset: its figures say so


def drawn_method(run_dir):
    """The method a run's evaluation recommends (its metrics.json), else "ig"; with the reason."""
    path = Path(run_dir) / "metrics.json"
    recommended = json.loads(path.read_text()).get("recommended") if path.is_file() else None
    if recommended in attr.METHODS:
        return recommended, f"recommended by the run's evaluation ({path.name})"
    return "ig", "Integrated Gradients: " + ("no evaluation of this run recommends a method" if recommended is None
                                             else f"the recommended {recommended} is not a map method")


def tile_explainer(checkpoint, method, references=None):
    """The TileExplainer of a slide.CheckpointModel; `references` (training images) for a method
    that draws its baselines from them."""
    ig_settings = {**attr.ig_settings(dict(attr.DEFAULT_IG), checkpoint.classes, labels_known=False),
                   "attr_dtype": ATTR_DTYPE}
    explainers = {} if method == "ig" else {method: attr.explainer(method, ig_settings, references)}  # IG: always
    run_key = (checkpoint.sha256, str(checkpoint.path), checkpoint.config, list(checkpoint.classes),
               checkpoint.provenance, ig_settings)
    return TileExplainer(checkpoint.net, ig_settings, method, explainers, checkpoint.device, run_key,
                         bool(checkpoint.provenance["synthetic"]))


def chosen(rows, k):
    """The classified tiles to explain, as (row, pick) pairs, class by class: the k most confident of
    the tiles predicted as it ("most"), then the k least confident of the rest ("least"); ties by
    position. One pass over `rows` (any iterable) holding 3k rows a class. k="all": every row, pick "all"."""
    if k == "all":
        return [(r, "all") for r in rows]
    if k == 0:
        return []
    most, high = {}, {}  # per class: the k smallest keys (negated, a max-heap), the 2k largest (a min-heap)
    for r in rows:
        key = (-r["confidence"], r["y"], r["x"])  # unique per tile: rows themselves are never compared
        for heap, item, size in ((most.setdefault(r["pred"], []), (tuple(-v for v in key), r), k),
                                 (high.setdefault(r["pred"], []), (key, r), 2 * k)):
            heapq.heappush(heap, item)
            if len(heap) > size:
                heapq.heappop(heap)
    picked = []
    for label in sorted(most):
        top = [r for _, r in sorted(most[label], reverse=True)]  # most confident first
        taken = {(r["x"], r["y"]) for r in top}
        least = [r for _, r in sorted(high[label], reverse=True) if (r["x"], r["y"]) not in taken][:k]
        picked += [(r, "most") for r in top] + [(r, "least") for r in least]
    return picked


class TileImages:
    """A slide's tiles as explanations.py indexes a split's images: [grid indices] -> uint8 (N, C, H, W),
    read from the slide on demand."""

    def __init__(self, slide, grid):
        self.slide, self.grid = slide, grid

    def __getitem__(self, indices):
        corners = [self.grid.corner(int(i)) for i in torch.as_tensor(indices)]
        return torch.from_numpy(wsi.read_tiles(self.slide, self.grid, corners)).permute(0, 3, 1, 2).contiguous()


@dataclass(frozen=True)
class SlideTiles:
    """A slide's tiles as explanations.py reads a split: images by grid index, labels -1 (no truth)."""
    images: TileImages
    labels: torch.Tensor


def placements(run_id, split, slide, grid, slide_md5, picked):
    """slide_tiles rows (db.SLIDE_TILE_COLUMNS) of the picked tiles."""
    return [{"run_id": run_id, "split": split, "image_index": grid.index(r["x"], r["y"]), "slide_md5": slide_md5,
             "slide_file": slide.path.name, "x": r["x"], "y": r["y"], "size": grid.side, "mpp": slide.mpp,
             "level": grid.level, "read_px": grid.read_side} for r, _ in picked]


def explain_tiles(explainer, slide, grid, picked, store, slide_md5):
    """Explain the picked tiles of the slide with MD5 `slide_md5` into `store` (an open
    explanations.db connection), IG and the drawn method, where it lacks them. Returns the run id,
    the split name and the number of maps computed now."""
    run_id = db.run_id_for(store, *explainer.run_key)
    split = db.slide_split(slide_md5, grid.side)
    db.insert_slide_tiles(store, placements(run_id, split, slide, grid, slide_md5, picked))
    n_tiles = grid.rows * grid.columns
    batch = budget.grad_images(explainer.model, (3, grid.size, grid.size), IG_BATCH, device=explainer.device)
    tiles = SlideTiles(TileImages(slide, grid), torch.full((n_tiles,), -1))
    methods = ("ig", *explainer.explainers)
    explaining = explanations.Explaining(explainer.model, tiles, explainer.ig_settings, methods, explainer.explainers,
                                         batch, ATTR_DTYPE, explainer.device, split)
    before = stored_maps(store, run_id, split)
    explanations.explain_methods(explaining, [grid.index(r["x"], r["y"]) for r, _ in picked], store, run_id)
    return run_id, split, stored_maps(store, run_id, split) - before


def stored_maps(store, run_id, split):
    return store.execute("SELECT COUNT(*) FROM explanations WHERE run_id = ? AND split = ?",
                         (run_id, split)).fetchone()[0]


def payload_bytes(store, run_id, split):
    """Mean bytes of a stored tile's map and probabilities, per method (the blobs; SQLite adds a few per row)."""
    return store.execute("SELECT AVG(LENGTH(attribution) + LENGTH(probs)) FROM explanations WHERE run_id = ? AND "
                         "split = ?", (run_id, split)).fetchone()[0]


def figure_rows(store, explained, slide, grid, picked):
    """The stored maps of explained.method for the (row, pick) pairs `picked`, as dicts with the
    pick and the tile as the model saw it ("image", uint8 (C, H, W))."""
    run_id, split, method = explained
    indices = [grid.index(r["x"], r["y"]) for r, _ in picked]
    found = {r["image_index"]: r for r in db.find(store, run_id, method, image_indices=indices, with_arrays=True,
                                                   split=split)}
    images = TileImages(slide, grid)[indices].numpy() if indices else []
    return [{**found[i], "pick": pick, "x": r["x"], "y": r["y"], "image": image}
            for i, (r, pick), image in zip(indices, picked, images, strict=True)]


def draw(rows, names, path, title, label):
    """explanations.png from figure_rows' rows: per class a row of its most confident tiles and a row
    of its least confident, each tile as the model sees it, its signed map and |map| over it, on one
    colour scale."""
    classes = sorted({r["pred_label"] for r in rows})
    per_row = max(sum(r["pick"] == "most" and r["pred_label"] == c for r in rows) for c in classes)
    panels = []
    for c in classes:
        for pick in ("most", "least"):
            ends = [panel(r, names) for r in rows if r["pred_label"] == c and r["pick"] == pick]
            if ends:  # a class of at most k tiles has no least confident row
                panels += ends + [None] * (per_row - len(ends))  # an empty slot keeps one class-end a row
    plots.explanation_figure(panels, path, title, per_row, label)


def panel(row, names):
    image = to_unit(torch.from_numpy(np.ascontiguousarray(row["image"])))
    title = "\n".join(textwrap.wrap(names[row["pred_label"]], plots.TITLE_WIDTH)
                      + [f"{row['pick']} confident: {formats.probability(row['confidence'])}",
                         f"x {row['x']:,}, y {row['y']:,}"])
    return image, torch.from_numpy(row["attribution"].astype(np.float32)), title
