"""slide.py: a tissue map of whole-slide images, tile by tile, from a trained model, in bounded memory.

    python slide.py slide.svs --checkpoint runs/pathmnist_28/best.pt    # -> runs/pathmnist_28/slides/slide/
    python slide.py a.svs b.ndpi --onnx runs/pathmnist_28/model.onnx     # the exported model, without PyTorch
    python slide.py core.ome.tif --mpp 0.5 --checkpoint best.pt          # a file whose header has no um/px

Each slide is cut into the tissue PathMNIST's images show, 112 um squares (wsi.py: the scale rule and
the pyramid level read), and the tiles that a thumbnail's tissue mask keeps (tissue.py; --all-tiles
keeps every one) are classified in batches (budget.tile_batch), so memory does not grow with the
slide. Each batch is committed to <out>/<slide>/tiles.db before the next is read: Ctrl-C or a crash
loses nothing, and a rerun skips the tiles already stored and writes the same outputs. The outputs
(tissue_map.py) are rendered from that store at the end: tiles.csv, tiles.geojson (QuPath), the
class map, its overlay on the slide, the tissue mask, slide.json and slide.html. Coordinates
everywhere are level-0 pixels, origin top left.
"""
import argparse
import json
import sqlite3
import sys
import time
from pathlib import Path

import numpy as np

import budget
import cli
import files
import predict
import tissue
import tissue_map
import wsi
from progress import progress

THUMBNAIL_PX = 2048  # longest side of the thumbnail the tissue mask and the overlay are drawn from
STORE = "tiles.db"
STORE_SQL = """
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tiles (
    x INTEGER NOT NULL, y INTEGER NOT NULL,       -- level-0 px of the tile's top-left corner
    pred INTEGER NOT NULL, confidence REAL NOT NULL,
    probs BLOB NOT NULL,                           -- float32 little-endian, one per class
    colour_distance REAL,                          -- from the training split's colour statistics (NULL: none known)
    PRIMARY KEY (y, x)
) WITHOUT ROWID;
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Map whole-slide images tile by tile with a trained model: a class "
                                "per 112 um tile of tissue, as CSV, QuPath GeoJSON, pictures and a page.",
                                formatter_class=cli.HelpFormatter)
    p.add_argument("slides", nargs="+", help="slide files: what OpenSlide reads (.svs, .ndpi, .mrxs, .scn, tiled "
                   "TIFF ...), OME-TIFF, or a PNG/JPEG/TIFF image of a slide (read whole)")
    p.add_argument("--checkpoint", default="runs/pathmnist_28/best.pt", help="trained model (train.py)")
    p.add_argument("--onnx", help="use this exported model (export.py) through onnxruntime instead of --checkpoint: "
                   "no PyTorch needed")
    p.add_argument("--out", help="folder for one sub-folder of outputs per slide (default: <run>/slides, beside "
                   "the model)")
    p.add_argument("--mpp", type=float, help="microns per pixel at full resolution, over what the slide's header "
                   "says; needed where it says nothing")
    p.add_argument("--min-tissue", type=float, default=0.5, help="share of a tile's area the tissue mask must "
                   "cover for the tile to be classified")
    p.add_argument("--all-tiles", action="store_true", help="classify every tile, background too (the mask is "
                   "still drawn and counted)")
    p.add_argument("--batch-size", type=cli.positive_int, default=256, help="tiles per batch at most (fewer where "
                   "the tiles as read would not fit budget.py's working memory)")
    cli.add_device(p)
    cli.add_threads(p)
    args = p.parse_args(argv)
    if not 0 <= args.min_tissue <= 1:
        p.error("--min-tissue is a share of a tile's area, from 0 to 1")
    model_path = Path(args.onnx or args.checkpoint)
    args.out = Path(args.out) if args.out else model_path.parent / "slides"
    return args


# ----------------------------------------------------------------------------- the model

class CheckpointModel:
    """A train.py checkpoint with predict.Model's interface (classes, size, channels, task,
    colour_reference, probabilities of uint8 (N, H, W, C) images), so one loop serves both."""

    def __init__(self, path, device):
        import torch

        import model as model_lib
        net, meta = model_lib.load_checkpoint(path, device)
        self.net, self.device, self.torch = model_lib.fused_for_inference(net), device, torch
        self.classes, self.task = meta["class_names"], meta["task"]
        self.size, self.channels = meta["provenance"]["size"], net.config["in_channels"]
        self.colour_reference = meta["colour_reference"]
        self.provenance = meta["provenance"]

    def probabilities(self, images_u8):
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(images_u8)).permute(0, 3, 1, 2).to(self.device).float() / 255
        with torch.no_grad():
            logits = self.net(x).double()
        p = torch.sigmoid(logits) if self.task.startswith("multi-label") else torch.softmax(logits, 1)
        return p.cpu().numpy()


def load_model(args):
    """(the model, its description for the outputs' provenance)."""
    path = Path(args.onnx or args.checkpoint)
    if args.onnx:
        model = predict.Model(path, "cpu" if args.device == "cpu" else "auto")
        dataset, synthetic = model.describe, "synthetic" in model.describe.lower()
    else:
        if not path.is_file():
            raise cli.UserError(f"{path} does not exist. Train a model first (python train.py), or pass "
                                f"--checkpoint with a best.pt, or --onnx with an exported model.")
        import torch
        if args.threads:
            torch.set_num_threads(args.threads)
        model = CheckpointModel(path, cli.resolve_device(args.device))
        dataset, synthetic = model.provenance["dataset"], bool(model.provenance["synthetic"])
    if model.channels != 3:
        raise cli.UserError(f"{path} is a model of {model.channels}-channel images ({dataset}), and slides are "
                            f"colour (H&E). Map slides with a model trained on an RGB dataset, e.g. pathmnist.")
    return model, {"file": str(path), "kind": "onnx" if args.onnx else "checkpoint", "sha256": files.sha256_of(path),
                   "dataset": dataset, "synthetic": synthetic, "size": model.size, "classes": list(model.classes),
                   "colour_threshold": model.colour_reference["threshold"] if model.colour_reference else None}


# ----------------------------------------------------------------------------- one slide

def slide_provenance(slide, grid):
    return {"file": slide.path.name, "path": str(slide.path), "md5": files.md5_of(slide.path),
            "bytes": slide.path.stat().st_size, "format": slide.format, "width": slide.size[0],
            "height": slide.size[1], "mpp": slide.mpp, "mpp_source": slide.mpp_source, "level": grid.level,
            "level_mpp": slide.mpp * slide.downsamples[grid.level], "level_why": grid.why,
            "tile_um": grid.side * slide.mpp, "tile_px": grid.side, "read_px": grid.read_side}


def open_store(folder, key):
    """The slide's tile store; its rows are kept only if `key` (slide, model, grid) is what made them."""
    folder.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(folder / STORE)
    conn.executescript(STORE_SQL)
    row = conn.execute("SELECT value FROM settings WHERE key = 'key'").fetchone()
    if row and json.loads(row[0]) != key:
        print(f"  {folder / STORE} holds tiles of another slide, model or scale: starting over")
        conn.execute("DELETE FROM tiles")
    conn.execute("INSERT OR REPLACE INTO settings VALUES ('key', ?)", (json.dumps(key, sort_keys=True),))
    conn.commit()
    return conn


def classify(conn, slide, grid, model, corners, batch_size):
    """Classify the tiles at `corners` not yet in the store, a batch per transaction; tiles/s."""
    done = {(x, y) for x, y in conn.execute("SELECT x, y FROM tiles")}
    todo = [c for c in corners if c not in done]
    if not todo:
        return None
    batch = budget.tile_batch(4 * grid.read_side ** 2 + 4 * grid.size ** 2, batch_size)
    reference = model.colour_reference
    start = time.perf_counter()
    with progress(total=len(todo), desc=f"  {slide.path.name}", unit="tile") as bar:
        for i in range(0, len(todo), batch):
            part = todo[i:i + batch]
            images = np.stack([wsi.read_tile(slide, grid, x, y) for x, y in part])
            probs = model.probabilities(images).astype(np.float32)
            distance = predict.colour_distance(reference, images) if reference else [None] * len(part)
            store_batch(conn, [(x, y, int(p.argmax()), float(p.max()), p.astype("<f4").tobytes(),
                                None if d is None else float(d))
                               for (x, y), p, d in zip(part, probs, distance, strict=True)])
            bar.update(len(part))
    return len(todo) / (time.perf_counter() - start)


def store_batch(conn, rows):
    """One batch of tile rows in one transaction; a full disk is a FileError (the batches before stay)."""
    try:
        with conn:
            conn.executemany("INSERT OR REPLACE INTO tiles VALUES (?, ?, ?, ?, ?, ?)", rows)
    except sqlite3.OperationalError as e:
        if "full" not in str(e):
            raise
        path = conn.execute("PRAGMA database_list").fetchone()[2]
        raise files.FileError(files.disk_full_message(path)) from e


def map_slide(path, model, model_info, args):
    """Map one slide into args.out/<slide stem>/; returns its summary (slide.json's content)."""
    slide = wsi.open_slide(path, args.mpp)
    grid = wsi.tile_grid(slide, model.size)
    folder = args.out / Path(path).name.split(".")[0]
    about = slide_provenance(slide, grid)
    print(f"{path}: {slide.size[0]:,} x {slide.size[1]:,} px at {slide.mpp:g} um/px ({slide.mpp_source}), "
          f"{grid.columns} x {grid.rows} tiles of {grid.side} px; {grid.why}")
    thumb = wsi.thumbnail(slide, THUMBNAIL_PX)
    mask = tissue.tissue_mask(thumb, grid)
    shares = tissue.tile_shares(mask, grid, slide.size)
    corners = grid.corners()
    keep = [c for c, s in zip(corners, shares.ravel(), strict=True) if args.all_tiles or s >= args.min_tissue]
    key = {"slide_md5": about["md5"], "model_sha256": model_info["sha256"], "mpp": slide.mpp,
           "level": grid.level, "tile_px": grid.side, "read_px": grid.read_side, "size": grid.size}
    conn = open_store(folder, key)
    try:
        rate = classify(conn, slide, grid, model, keep, args.batch_size)
        rows = tissue_map.stored_rows(conn, keep)
    finally:
        conn.close()
    mask_info = {"method": "Li's threshold on median-blurred HSV saturation (tissue.py)", "min_tissue": args.min_tissue,
                 "all_tiles": args.all_tiles, "thumbnail": list(thumb.size), "tiles": len(corners),
                 "tissue_tiles": int((shares >= args.min_tissue).sum()), "classified": len(rows)}
    summary = tissue_map.write_outputs(folder, rows, {"slide": about, "model": model_info, "mask": mask_info},
                                       grid, thumb, mask)
    speed = f", {rate:.1f} tiles/s" if rate else ", every tile already stored"
    print(f"  {len(rows):,} tiles classified ({mask_info['tissue_tiles']:,} of {len(corners):,} tissue){speed} "
          f"-> {folder}")
    return summary


def main(argv=None):
    args = parse_args(argv)
    files.check_writable(args.out, "--out")
    model, model_info = load_model(args)
    failed = []
    for path in args.slides:
        try:
            map_slide(path, model, model_info, args)
        except wsi.SlideError as e:
            print(f"error: {e}", file=sys.stderr)
            failed.append(path)
    if failed:
        raise wsi.SlideError(f"{len(failed)} of {len(args.slides)} slides could not be mapped: {', '.join(failed)} "
                             f"(each one's reason is above).")


if __name__ == "__main__":
    cli.run(main)
