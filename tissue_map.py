"""tissue_map.py: a mapped slide's outputs, all rendered from its tile store (slide.py's tiles.db).

    tiles.csv         one row per classified tile: x, y, size (level-0 px), pred, class, confidence,
                      one probability per class, colour_distance and flagged
    tiles.geojson     the tiles for QuPath (File > Import objects, or drag and drop): one "tile" object
                      each, its class (name and colour) and probabilities as measurements
    class_map.png     one square per tile in its class's colour, a legend naming every class
    overlay.png       the same over the slide's thumbnail in true colours
    tissue_mask.png   the thumbnail's tissue mask (tissue.py), with the tiles kept outlined
    explanations.png  (slide.py draws it, with a checkpoint) the maps of each class's most and least
                      confident tiles, stored in the run's explanations.db (slide_explanations.py)
    slide.json        provenance (the slide's MD5, size, um/px, level; the model), counts, tissue area per
                      class in mm2 and as a share of tissue, the tumour-stroma ratio where the classes have one
    slide.html        all of it on one self-contained page

Coordinates are level-0 pixels, origin top left, in every file. A tile is `flagged` when its colour
statistics lie farther from the training split's than the checkpoint's calibrated threshold (as
tiles.py and predict.py judge a file): another stain or scanner, or no tissue the model knows.
Nothing here reads the clock, so a rerun over the same store writes the same bytes.
"""
import json
import uuid

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.collections import PolyCollection
from matplotlib.patches import Patch

import datasets
import formats
import page
import tissue
from files import atomic_path, write_csv, write_json, write_text

matplotlib.use("Agg")

# PathMNIST's classes (medmnist.INFO) in colours a pathologist reads at a glance; other classes take tab10's
PATHMNIST_COLOURS = {"adipose": (255, 236, 139), "background": (200, 200, 200), "debris": (139, 90, 43),
                     "lymphocytes": (75, 0, 130), "mucus": (135, 206, 235), "smooth muscle": (220, 20, 60),
                     "normal colon mucosa": (34, 139, 34), "cancer-associated stroma": (255, 140, 0),
                     "colorectal adenocarcinoma epithelium": (255, 0, 255)}
STROMA, TUMOUR = "cancer-associated stroma", "colorectal adenocarcinoma epithelium"
UUID_SPACE = uuid.UUID("1b0e4a52-7a3c-4b8e-9a53-5d2f3c1e0a11")  # feature ids derived from (slide MD5, x, y)


def stored_rows(conn, corners):
    """The store's rows for `corners`, row by row (y, then x), one at a time (a slide may have
    200,000): dicts of x, y, pred, confidence, probs (float32 array), colour_distance."""
    wanted = set(corners)
    for x, y, pred, conf, probs, dist in conn.execute("SELECT x, y, pred, confidence, probs, colour_distance "
                                                      "FROM tiles ORDER BY y, x"):
        if (x, y) in wanted:
            yield {"x": x, "y": y, "pred": pred, "confidence": conf, "probs": np.frombuffer(probs, "<f4"),
                   "colour_distance": dist}


def display_names(model_info):
    """The class names the outputs show: the model's; a synthetic pathmnist model's "synthetic-i"
    names PathMNIST's class i, which it stands for (its pictures say it is synthetic)."""
    names = model_info["classes"]
    if model_info["synthetic"] and all(n == f"synthetic-{i}" for i, n in enumerate(names)):
        real = datasets.class_names_of("pathmnist")
        if len(real) == len(names):
            return [f"{r} ({n})" for r, n in zip(real, names, strict=True)]
    return list(names)


def class_colours(names):
    """An (r, g, b) per class: PathMNIST's own where the name starts with one, else tab10's."""
    cmap = plt.get_cmap("tab10")
    out = []
    for i, name in enumerate(names):
        known = next((c for k, c in PATHMNIST_COLOURS.items() if name.startswith(k)), None)
        out.append(known or tuple(int(255 * v) for v in cmap(i % 10)[:3]))
    return out


def areas(counts, names, tile_um):
    """Tissue area per class (`counts` tiles each) in mm2 and as a share of the classified tissue, and
    the tumour-stroma ratio (stroma area over stroma + tumour) where PathMNIST's two are among `names`."""
    counts = np.asarray(counts)
    tile_mm2 = (tile_um / 1000) ** 2
    total = counts.sum()
    per_class = {n: {"tiles": int(c), "mm2": formats.rounded(c * tile_mm2),
                     "share": formats.rounded(c / total) if total else 0.0} for n, c in zip(names, counts, strict=True)}
    index = {n.split(" (")[0]: i for i, n in enumerate(names)}
    ratio = None
    if STROMA in index and TUMOUR in index:
        s, t = counts[index[STROMA]], counts[index[TUMOUR]]
        ratio = formats.rounded(s / (s + t)) if s + t else None
    return {"tile_mm2": formats.rounded(tile_mm2), "tissue_mm2": formats.rounded(total * tile_mm2),
            "per_class": per_class, "tumour_stroma_ratio": ratio}


def flagged(row, threshold):
    """Whether a tile's colour lies farther from the training split's than the calibrated threshold."""
    d = row["colour_distance"]
    return threshold is not None and d is not None and d > threshold


def csv_rows(rows, names, classes, side, threshold):
    """tiles.csv's rows as dicts, one at a time; probabilities to 6 decimals, one column per class (p_<class>)."""
    for r in rows:
        d = r["colour_distance"]
        yield {"x": r["x"], "y": r["y"], "size": side, "pred": r["pred"], "class": names[r["pred"]],
               "confidence": f"{r['confidence']:.6f}",
               **{f"p_{c}": f"{p:.6f}" for c, p in zip(classes, r["probs"], strict=True)},
               "colour_distance": "" if d is None else f"{d:.4f}", "flagged": int(flagged(r, threshold))}


def feature(row, names, colours, side, slide_md5):
    """One tile as a QuPath GeoJSON Feature: a closed level-0 square, a "tile" object with its
    classification {name, color} and its probabilities as measurements (QuPath 0.4/0.5)."""
    x, y = row["x"], row["y"]
    return {"type": "Feature", "id": str(uuid.uuid5(UUID_SPACE, f"{slide_md5}:{x}:{y}")),
            "geometry": {"type": "Polygon",
                         "coordinates": [[[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]]},
            "properties": {"objectType": "tile",
                           "classification": {"name": names[row["pred"]], "color": list(colours[row["pred"]])},
                           "measurements": {f"p {n}": round(float(p), 6)
                                            for n, p in zip(names, row["probs"], strict=True)}}}


def stamp(provenance):
    """The slide and model a picture or file was made from, in one line (PNG metadata, GeoJSON)."""
    s, m = provenance["slide"], provenance["model"]
    return (f"slide {s['file']} MD5 {s['md5']}, {s['bytes']:,} bytes, {s['width']} x {s['height']} px at {s['mpp']:g} "
            f"um/px ({s['mpp_source']}), level {s['level']} read as {s['read_px']} px a {s['tile_px']} px tile; "
            f"model {m['file']} SHA-256 {m['sha256']}")


def write_geojson(path, rows, names, colours, side, provenance):
    """tiles.geojson, a FeatureCollection written a feature at a time, atomically; its provenance
    (stamp) rides as a foreign member, which QuPath's import passes over."""
    md5 = provenance["slide"]["md5"]
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write('{"type": "FeatureCollection", "provenance": ' + json.dumps(stamp(provenance)) + ', "features": [')
        for i, r in enumerate(rows):
            f.write((", " if i else "") + json.dumps(feature(r, names, colours, side, md5)))
        f.write("]}")


def class_grid(rows, grid, colours):
    """(rows, columns, 3) uint8: each classified tile in its class's colour, the rest white; and the
    tiles per class."""
    image = np.full((grid.rows, grid.columns, 3), 255, np.uint8)
    counts = [0] * len(colours)
    for r in rows:
        image[r["y"] // grid.side, r["x"] // grid.side] = colours[r["pred"]]
        counts[r["pred"]] += 1
    return image, counts


def legend(ax, names, colours, present):
    handles = [Patch(facecolor=np.array(c) / 255, edgecolor="black", label=f"{n} ({present[i]:,} tiles)")
               for i, (n, c) in enumerate(zip(names, colours, strict=True))]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False,
              title="class (tiles)", title_fontsize=8)


def save(fig, path, about):
    """The figure as a PNG, `about` (stamp's line) in its Description: no clock, so reruns agree."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130, bbox_inches="tight", metadata={"Software": None, "Description": about})
    plt.close(fig)


def draw_map(path, layers, classes, title, size, about):
    """A class picture: `layers` [(RGB or RGBA image, (width, height) in level-0 px from the top left)]
    drawn in turn over a slide of level-0 `size`, a legend of classes (names, colours, counts) beside it."""
    width = 7.0
    fig, ax = plt.subplots(figsize=(width, width * size[1] / size[0] + 0.6))
    for image, (w, h) in layers:
        ax.imshow(np.asarray(image), extent=(0, w, h, 0), interpolation="nearest")
    ax.set_xlim(0, size[0])
    ax.set_ylim(size[1], 0)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("level-0 px")
    legend(ax, *classes)
    save(fig, path, about)


def mask_figure(path, thumb, mask, rows, grid, slide_size, title, about):
    fig, axes = plt.subplots(1, 2, figsize=(10, 5 * slide_size[1] / slide_size[0] + 0.6))
    extent = (0, slide_size[0], slide_size[1], 0)
    axes[0].imshow(thumb, extent=extent)
    axes[0].set_title("slide (thumbnail, true colours)", fontsize=9)
    axes[1].imshow(tissue.mask_picture(mask), cmap="gray", vmin=0, vmax=255, extent=extent)
    squares = [[(r["x"], r["y"]), (r["x"] + grid.side, r["y"]), (r["x"] + grid.side, r["y"] + grid.side),
                (r["x"], r["y"] + grid.side)] for r in rows]
    # one artist for all of them: a patch per tile took 45 s at 40,000 tiles
    axes[1].add_collection(PolyCollection(squares, facecolors="none", edgecolors="tab:red", linewidths=0.4))
    axes[1].set_title(title, fontsize=9)
    save(fig, path, about)


def write_outputs(folder, rows, provenance, grid, thumb, mask):
    """Every output of a mapped slide into `folder`; returns slide.json's content. `rows()` gives
    the classified tiles afresh for each pass (stored_rows): no output holds them all at once."""
    model, slide = provenance["model"], provenance["slide"]
    names = display_names(model)
    colours = class_colours(names)
    side, threshold = grid.side, model["colour_threshold"]
    columns = ["x", "y", "size", "pred", "class", "confidence", *(f"p_{n}" for n in model["classes"]),
               "colour_distance", "flagged"]
    write_csv(folder / "tiles.csv", columns, csv_rows(rows(), names, model["classes"], side, threshold))
    write_geojson(folder / "tiles.geojson", rows(), names, colours, side, provenance)
    about = stamp(provenance)
    tiles_img, counts = class_grid(rows(), grid, colours)
    n = sum(counts)
    synthetic = " - SYNTHETIC model" if model["synthetic"] else ""
    title = f"{slide['file']}: {n:,} tiles of {slide['tile_um']:.0f} um{synthetic}"
    tiled = (grid.columns * side, grid.rows * side)  # whole tiles from the top left; the slide may be larger
    draw_map(folder / "class_map.png", [(tiles_img, tiled)], (names, colours, counts), title, tiled, about)
    translucent = np.dstack([tiles_img, np.where((tiles_img == 255).all(2), 0, 110).astype(np.uint8)])
    whole = (slide["width"], slide["height"])
    draw_map(folder / "overlay.png", [(thumb, whole), (translucent, tiled)], (names, colours, counts),
             title + " (over the slide)", whole, about)
    mask_figure(folder / "tissue_mask.png", thumb, mask, rows(), grid, (slide["width"], slide["height"]),
                f"tissue mask; outlined: the {n:,} tiles classified", about)
    summary = {**provenance, "counts": {"classified": n, "flagged": sum(flagged(r, threshold) for r in rows())},
               "areas": areas(counts, names, slide["tile_um"])}
    write_summary(folder, summary, names)
    return summary


def write_summary(folder, summary, names):
    """slide.json and slide.html of a summary (write_outputs', then with slide.py's explanations)."""
    write_json(folder / "slide.json", summary)
    write_text(folder / "slide.html", render_page(summary, names, folder))


def explanations_section(explained, folder):
    """The page's account of the tiles slide.py explained, or nothing where none were."""
    if not explained:
        return ""
    which = ("every classified tile" if explained["per_class"] == "all" else
             f"the {explained['per_class']} most and {explained['per_class']} least confident tiles of each class")
    return (f"<h2>Explanations</h2><p>{explained['method']} maps of {which} ({explained['tiles']:,} tiles), stored "
            f"in {page.esc(explained['store'])}, run {explained['run_id']}, split {page.esc(explained['split'])} "
            f"(slide MD5 and tile side; each tile's corner in the table slide_tiles), {explained['bytes_per_map']:,} "
            f"bytes a map with its probabilities.</p>"
            + page.figure(folder / explained["figure"], "Each row: one class's most or least confident tiles as the "
                          "model sees them, the signed map, and |map| over the tile, one colour scale."))


def render_page(summary, names, folder):
    s, m, a = summary["slide"], summary["model"], summary["areas"]
    banner = ('<div class="banner synthetic">SYNTHETIC model: trained on the synthetic dataset, not PathMNIST. Its '
              'map shows the pipeline working, not tissue classes.</div>' if m["synthetic"] else "")
    provenance = [("slide", s["file"]), ("MD5", s["md5"]), ("bytes", f"{s['bytes']:,}"), ("format", s["format"]),
                  ("size (level 0)", f"{s['width']:,} x {s['height']:,} px"),
                  ("scale", f"{s['mpp']:g} um/px ({s['mpp_source']})"), ("level read", s["level_why"]),
                  ("tile", f"{s['tile_px']} level-0 px = {s['tile_um']:.1f} um, read as {s['read_px']} px, "
                           f"given to the model at {m['size']} px"),
                  ("model", f"{m['file']} ({m['kind']}, {m['dataset']}, SHA-256 {m['sha256'][:16]}...)"),
                  ("tissue mask", f"{summary['mask']['method']}; a tile is tissue at >= "
                                  f"{formats.share(summary['mask']['min_tissue'])} of its area"
                                  + ("; every tile classified (--all-tiles)" if summary["mask"]["all_tiles"] else ""))]
    counts = summary["mask"]
    count_rows = [("tiles in the grid", f"{counts['tiles']:,}"), ("tissue tiles", f"{counts['tissue_tiles']:,}"),
                  ("classified", f"{counts['classified']:,}"),
                  ("flagged (colour unlike the training data)", f"{summary['counts']['flagged']:,}")]
    area_rows = [(n, f"{v['tiles']:,}", f"{v['mm2']:.3f}", formats.share(v["share"]))
                 for n, v in a["per_class"].items()]
    ratio = a["tumour_stroma_ratio"]
    tsr = (f"<p>Tumour-stroma ratio (stroma / (stroma + tumour) area): {formats.share(ratio)}</p>"
           if ratio is not None else "")
    figures = "".join(page.figure(folder / f, c) for f, c in (
        ("overlay.png", "Each tile's class over the slide (true colours)."),
        ("class_map.png", "The class map: one square per 112 um tile."),
        ("tissue_mask.png", "The tissue mask and the tiles it kept.")))
    figures += explanations_section(summary.get("explanations"), folder)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{page.esc(s['file'])}: tissue map</title>"
            f"<style>{page.CSS}</style></head><body><h1>{page.esc(s['file'])}: tissue map</h1>{banner}"
            f"<h2>Provenance</h2>{page.table(['', ''], provenance, 'text')}"
            f"<h2>Tiles</h2>{page.table(['', ''], count_rows)}"
            f"<h2>Tissue per class</h2>{page.table(['class', 'tiles', 'mm²', 'share of tissue'], area_rows)}{tsr}"
            f"<h2>Maps</h2>{figures}<p>Coordinates in tiles.csv and tiles.geojson are level-0 pixels, origin "
            f"top left; tiles.geojson imports into QuPath.</p></body></html>\n")
