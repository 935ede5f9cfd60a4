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
class map, its overlay on the slide, the tissue mask, slide.json and slide.html. With a checkpoint,
the k most and k least confident tiles of each class (--explain) are then explained into the run's
explanations.db, keyed by the slide's MD5 and the tiles' coordinates (slide_explanations.py), and
drawn in explanations.png. Coordinates everywhere are level-0 pixels, origin top left.
"""
import argparse
import contextlib
import functools
import hashlib
import json
import math
import os
import sqlite3
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
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
    p.add_argument("--explain", type=explain_count, default=4, help="explain the K most and the K least confident "
                   "tiles of each class into the run's explanations.db (the method its evaluation recommends, else "
                   "IG), drawn in explanations.png; 'all': every classified tile; 0: none. Needs --checkpoint")
    p.add_argument("--db", help="the explanation store (default: explanations.db beside --checkpoint, the one "
                   "evaluate.py writes)")
    cli.add_data_dir(p, " (only where the method explained draws its baselines from the training images, as "
                     "expected_gradients does)")
    p.add_argument("--batch-size", type=cli.positive_int, default=256, help="tiles per batch at most (fewer where "
                   "the tiles as read would not fit budget.py's working memory)")
    cli.add_device(p)
    cli.add_threads(p)
    p.add_argument("--shard-dir", default=str(Path(tempfile.gettempdir()) / "pathmnist-xai-shards"),
                   help="under torchrun: a folder on each machine's local disk for the ranks' shard stores, merged "
                   "into each slide's store and deleted")
    args = p.parse_args(argv)
    if not 0 <= args.min_tissue <= 1:
        p.error("--min-tissue is a share of a tile's area, from 0 to 1")
    model_path = Path(args.onnx or args.checkpoint)
    args.out = Path(args.out) if args.out else model_path.parent / "slides"
    args.db = Path(args.db) if args.db else model_path.parent / "explanations.db"
    return args


def explain_count(text):
    """argparse type for --explain: a count of tiles per class and end, or 'all'."""
    if text == "all":
        return text
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of tiles (0, 1, 2 ...) or 'all'")
    return int(text)


# ----------------------------------------------------------------------------- the model

class CheckpointModel:
    """A train.py checkpoint with predict.Model's interface (classes, size, channels, task,
    colour_reference, probabilities of uint8 (N, H, W, C) images), so one loop serves both."""

    def __init__(self, path, device):
        import torch

        import model as model_lib
        net, meta = model_lib.load_checkpoint(path, device)
        self.net, self.device, self.torch = model_lib.fused_for_inference(net), device, torch
        self.path, self.sha256, self.config = Path(path), files.sha256_of(path), net.config
        self.classes, self.task = meta["class_names"], meta["task"]
        self.size, self.channels = meta["provenance"]["size"], net.config["in_channels"]
        self.colour_reference = meta["colour_reference"]
        self.provenance = meta["provenance"]

    @contextlib.contextmanager
    def beside_a_reader(self):
        """torch on one core fewer while classify's thread reads the next batch: on 2 cores, 40,000
        tiles took 18.6 s instead of 21.0 s in one side-by-side measurement; the explanations after get
        every core back."""
        threads = self.torch.get_num_threads()
        self.torch.set_num_threads(max(1, threads - 1))
        try:
            yield
        finally:
            self.torch.set_num_threads(threads)

    def probabilities(self, images_u8):
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(images_u8)).permute(0, 3, 1, 2).to(self.device).float() / 255
        with torch.no_grad():
            logits = self.net(x).double()
        p = torch.sigmoid(logits) if self.task.startswith("multi-label") else torch.softmax(logits, 1)
        return p.cpu().numpy()


def load_model(args, device):
    """(the model, its description for the outputs' provenance); a checkpoint's on `device`."""
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
        model = CheckpointModel(path, device)
        dataset, synthetic = model.provenance["dataset"], bool(model.provenance["synthetic"])
    if model.channels != 3:
        raise cli.UserError(f"{path} is a model of {model.channels}-channel images ({dataset}), and slides are "
                            f"colour (H&E). Map slides with a model trained on an RGB dataset, e.g. pathmnist.")
    return model, {"file": str(path), "kind": "onnx" if args.onnx else "checkpoint", "sha256": files.sha256_of(path),
                   "dataset": dataset, "synthetic": synthetic, "size": model.size, "classes": list(model.classes),
                   "colour_threshold": model.colour_reference["threshold"] if model.colour_reference else None}


def load_explainer(args, model):
    """The slide_explanations.TileExplainer for --explain, or None (saying why) where no tile is explained."""
    if args.explain == 0:
        return None
    if args.onnx:
        print("Tiles are not explained: --onnx maps without PyTorch, which the maps need. Map with --checkpoint "
              "to explain them.")
        return None
    import attribution as attr
    import data
    import slide_explanations
    method, why = slide_explanations.drawn_method(model.path.parent)
    references = None
    if attr.METHODS[method].needs_references:  # its baselines are training images
        try:
            train_images = data.load_matching(model.provenance, args.data_dir).train.images
            references = attr.reference_sample(train_images).to(model.device)
        except cli.UserError as e:
            method, why = "ig", f"Integrated Gradients: {method}, recommended, needs the training images ({e})"
    print(f"Explaining tiles with {method}: {why}")
    return slide_explanations.tile_explainer(model, method, references)


# ----------------------------------------------------------------------------- one slide

def slide_provenance(slide, grid):
    return {"file": slide.path.name, "path": str(slide.path), "md5": files.md5_of(slide.path),
            "bytes": slide.path.stat().st_size, "format": slide.format, "width": slide.size[0],
            "height": slide.size[1], "mpp": slide.mpp, "mpp_source": slide.mpp_source, "level": grid.level,
            "level_mpp": slide.mpp * slide.downsamples[grid.level], "level_why": grid.why,
            "tile_um": grid.side * slide.mpp, "tile_px": grid.side, "read_px": grid.read_side}


def open_store(path, key):
    """A tile store (a slide's, or a rank's shard); its rows are kept only if `key` (slide, model,
    grid) is what made them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    try:
        conn.executescript(STORE_SQL)
        row = conn.execute("SELECT value FROM settings WHERE key = 'key'").fetchone()
    except sqlite3.DatabaseError as e:
        conn.close()
        raise files.FileError(f"{path} is not a tile store this code can read ({e}). It holds only tiles a run "
                              f"can classify again: delete it (or pick another --out) and run the same command; "
                              f"it maps the slide afresh.") from e
    if row and json.loads(row[0]) != key:
        print(f"  {path} holds tiles of another slide, model or scale: starting over")
        conn.execute("DELETE FROM tiles")
    conn.execute("INSERT OR REPLACE INTO settings VALUES ('key', ?)", (json.dumps(key, sort_keys=True),))
    conn.commit()
    return conn


def lacking(conn, corners):
    """The corners, in order, whose tiles the store lacks."""
    done = {(x, y) for x, y in conn.execute("SELECT x, y FROM tiles")}
    return [c for c in corners if c not in done]


def tile_batch(grid, batch_size):
    """Tiles per batch: batch_size, or fewer where the tiles as read would not fit budget.py's memory."""
    return budget.tile_batch(4 * grid.read_side ** 2 + 4 * grid.size ** 2, batch_size)


def classify(conn, slide, grid, model, corners, batch_size):
    """Classify the tiles at `corners` not yet in the store, a batch per transaction; tiles/s."""
    todo = lacking(conn, corners)
    if not todo:
        return None
    batch = tile_batch(grid, batch_size)
    parts = [todo[i:i + batch] for i in range(0, len(todo), batch)]
    reference = model.colour_reference
    start = time.perf_counter()
    # the next batch is read while the model classifies this one: reading (OpenSlide, the resize) and
    # the model take about as long, and each leaves a core idle alone
    with progress(total=len(todo), desc=f"  {slide.path.name}", unit="tile") as bar, ThreadPoolExecutor(1) as reader:
        ahead = reader.submit(wsi.read_tiles, slide, grid, parts[0])
        for i, part in enumerate(parts):
            images = ahead.result()
            if i + 1 < len(parts):
                ahead = reader.submit(wsi.read_tiles, slide, grid, parts[i + 1])
            probs = model.probabilities(images).astype(np.float32)
            distance = predict.colour_distance(reference, images) if reference else [None] * len(part)
            store_batch(conn, [(x, y, int(p.argmax()), float(p.max()), p.astype("<f4").tobytes(),
                                None if d is None else float(d))
                               for (x, y), p, d in zip(part, probs, distance, strict=True)])
            bar.update(len(part))
    return len(todo) / (time.perf_counter() - start)


MERGE_ROWS = 4096  # tile rows a rank sends to rank 0 per merge round


def classify_shards(ctx, conn, tiling, corners, batch_size, shard):
    """classify under torchrun: the tiles rank 0's store (`conn`) lacks are dealt out in batches;
    each rank classifies its own into its shard store at `shard`, then every shard's rows (a killed
    run's leftovers too) go to rank 0's store, and the shards are deleted. `tiling`: (slide, grid,
    model, store key). Returns this rank's tiles/s."""
    import distributed
    slide, grid, model, key = tiling
    todo = distributed.broadcast(lacking(conn, corners) if ctx.main else None, ctx)
    mine = distributed.blocks(todo, tile_batch(grid, batch_size), ctx.rank, ctx.world_size)
    own = open_store(shard, key)
    rate = classify(own, slide, grid, model, mine, batch_size)
    count = own.execute("SELECT COUNT(*) FROM tiles").fetchone()[0]
    for k in range(math.ceil(distributed.max_all(count, ctx) / MERGE_ROWS)):  # a round at a time: bounded memory
        part = own.execute("SELECT * FROM tiles ORDER BY y, x LIMIT ? OFFSET ?", (MERGE_ROWS, k * MERGE_ROWS))
        for rows in distributed.gather(part.fetchall(), ctx) or []:
            store_batch(conn, rows)
    distributed.barrier(ctx)  # every shard is in the store: the shards can go
    own.close()
    for suffix in ("", "-journal"):
        Path(f"{shard}{suffix}").unlink(missing_ok=True)
    return rate


def shard_store(shard_dir, folder, rank):
    """A rank's shard store for the slide mapped into `folder`."""
    return Path(shard_dir) / f"{hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]}-rank{rank}-{STORE}"


def on_main(ctx, make):
    """make() on rank 0 (or alone), its value on every rank."""
    if ctx is None or not ctx.launched:
        return make()
    import distributed
    return distributed.broadcast(make() if ctx.main else None, ctx)


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


def explain(explainer, slide, grid, rows, about, names, args, folder):
    """Explain the tiles --explain picks among rows() into args.db and draw explanations.png (`names`:
    the classes as the outputs show them); returns what slide.json records of them."""
    import db
    import slide_explanations as se
    picked = se.chosen(rows(), args.explain)
    store = db.connect(args.db)
    try:
        start = time.perf_counter()
        run_id, split, computed = se.explain_tiles(explainer, slide, grid, picked, store, about["md5"])
        seconds = time.perf_counter() - start
        k = se.FIGURE_K if args.explain == "all" else min(args.explain, se.FIGURE_K)
        shown = se.figure_rows(store, (run_id, split, explainer.method), slide, grid, se.chosen(rows(), k))
        payload = se.payload_bytes(store, run_id, split)
    finally:
        db.close(store)
    if computed:
        print(f"  {computed:,} maps of {len(picked):,} tiles computed in {seconds:.1f} s ({computed / seconds:.1f} "
              f"maps/s), {payload:,.0f} bytes a stored map -> {args.db}")
    label = "IG" if explainer.method == "ig" else "map"  # the title names the method: a panel is too narrow
    synthetic = ", SYNTHETIC model" if explainer.synthetic else ""
    title = (f"{about['file']}: {explainer.method} maps of the {k} most and {k} least confident tiles of each class, "
             f"as the model sees them ({grid.size} px){synthetic}")
    se.draw(shown, names, folder / "explanations.png", title, label)
    return {"method": explainer.method, "tiles": len(picked), "per_class": args.explain, "store": str(args.db),
            "run_id": run_id, "split": split, "bytes_per_map": round(payload), "figure": "explanations.png"}


def map_slide(path, model, model_info, explainer, args, ctx):
    """Map one slide into args.out/<slide stem>/; returns its summary (slide.json's content), on rank
    0 (ctx: distributed's Context, None for the ONNX path)."""
    slide = wsi.open_slide(path, args.mpp)
    grid = wsi.tile_grid(slide, model.size)
    folder = args.out / Path(path).name.split(".")[0]
    about = on_main(ctx, lambda: slide_provenance(slide, grid))  # one MD5 of a large file, not one a rank
    print(f"{path}: {slide.size[0]:,} x {slide.size[1]:,} px at {slide.mpp:g} um/px ({slide.mpp_source}), "
          f"{grid.columns} x {grid.rows} tiles of {grid.side} px; {grid.why}")
    thumb, mask, shares = tissue.masked(slide, grid)
    corners = grid.corners()
    keep = tissue.kept(corners, shares, args.min_tissue, args.all_tiles)
    key = {"slide_md5": about["md5"], "model_sha256": model_info["sha256"], "mpp": slide.mpp,
           "level": grid.level, "tile_px": grid.side, "read_px": grid.read_side, "size": grid.size}
    main = ctx is None or ctx.main
    conn = open_store(folder / STORE, key) if main else None
    try:
        # an explicit --threads is the user's; onnxruntime's model has no say in it
        sharing = getattr(model, "beside_a_reader", None) if not args.threads else None
        with sharing() if sharing else contextlib.nullcontext():
            if ctx is not None and ctx.launched:
                rate = classify_shards(ctx, conn, (slide, grid, model, key), keep, args.batch_size,
                                       shard_store(args.shard_dir, folder, ctx.rank))
            else:
                rate = classify(conn, slide, grid, model, keep, args.batch_size)
        if not main:
            return None
        rows = functools.partial(tissue_map.stored_rows, conn, keep)  # read afresh for each pass: bounded memory
        classified = sum(1 for _ in rows())
        mask_info = {"method": "Li's threshold on median-blurred HSV saturation (tissue.py)",
                     "min_tissue": args.min_tissue, "all_tiles": args.all_tiles, "thumbnail": list(thumb.size),
                     "tiles": len(corners), "tissue_tiles": int((shares >= args.min_tissue).sum()),
                     "classified": classified}
        # the map first: an explanation that fails (a store of newer code, a full disk) leaves it whole
        (folder / "explanations.png").unlink(missing_ok=True)  # a figure of an earlier run is not this one's
        summary = tissue_map.write_outputs(folder, rows, {"slide": about, "model": model_info, "mask": mask_info},
                                           grid, thumb, mask)
        if explainer and classified:
            names = tissue_map.display_names(model_info)
            summary["explanations"] = explain(explainer, slide, grid, rows, about, names, args, folder)
            tissue_map.write_summary(folder, summary, names)
    finally:
        if conn is not None:
            conn.close()
    speed = f", {rate:.1f} tiles/s" if rate else ", every tile already stored"
    print(f"  {classified:,} tiles classified ({mask_info['tissue_tiles']:,} of {len(corners):,} tissue){speed} "
          f"-> {folder}")
    return summary


def map_slides(args, ctx):
    """Every slide of args.slides; ctx: distributed's Context (None for the ONNX path, torch-free)."""
    main = ctx is None or ctx.main
    if main:
        files.check_writable(args.out, "--out")
        if args.explain != 0 and not args.onnx:
            files.check_writable(args.db.parent, "--db")
    if ctx is not None and ctx.launched:
        files.check_writable(args.shard_dir, "--shard-dir")
    model, model_info = load_model(args, ctx and ctx.device)
    explainer = load_explainer(args, model) if main else None
    failed = []
    for path in args.slides:
        try:
            map_slide(path, model, model_info, explainer, args, ctx)
        except wsi.SlideError as e:
            if ctx is not None and ctx.launched:
                raise  # one rank alone going on to the next slide would pair the ranks' collectives wrongly
            print(f"error: {e}", file=sys.stderr)
            failed.append(path)
    if failed:
        raise wsi.SlideError(f"{len(failed)} of {len(args.slides)} slides could not be mapped: {', '.join(failed)} "
                             f"(each one's reason is above).")


def main(argv=None):
    args = parse_args(argv)
    if args.onnx:  # onnxruntime, without PyTorch: one process
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise cli.UserError("--onnx maps in one process, without PyTorch; under torchrun map with --checkpoint, "
                                "whose tiles the ranks share.")
        return map_slides(args, None)
    import distributed
    return distributed.run(map_slides, args)


if __name__ == "__main__":
    cli.run(main)
