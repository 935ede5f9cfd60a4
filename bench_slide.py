"""bench_slide.py: slide.py's speed and memory on written slides, beside the floor of only reading and
resizing the same tiles (bench.py --slide runs it and prints its table).

    python bench.py --slide                                    # 10,000 and 40,000 tissue tiles, minutes
    python bench.py --slide --checkpoint runs/pathmnist_28/best.pt --data-dir data

Each slide is a tiled pyramidal TIFF (tifffile, zlib; levels 1, 4 and 16) written at 2 um/px: what a
20x scan's second level holds, and the level slide.py reads for a 28 px model (56 px a tile, resized
to 28). Writing the 20x level above it (16 times the pixels) would time this benchmark's writer, not
slide.py. The tissue is a square of the synthetic dataset's images, upsampled, with glass around it.

Each measurement runs in a process of its own, whose RssAnon (rss.py) the parent samples:
    floor        read and resize only the tiles slide.py keeps, in its order (wsi.read_tile), timed
                 from the first tile to the last
    PyTorch      python slide.py SLIDE --checkpoint CKPT --explain 0, the whole command
    ONNX int8    python slide.py SLIDE --onnx model_int8.onnx, the whole command
    explain all  python slide.py SLIDE --explain all over the stored map of the smaller slide: maps/s
                 and bytes a stored map, as slide.py reports them
    TIAToolbox   (--tiatoolbox PYTHON) the same slide and model through TIAToolbox's PatchPredictor in WSI
                 mode (its own tissue mask, patches at the same um/px), run by PYTHON: an environment with
                 tiatoolbox and medmnist installed (pip install tiatoolbox medmnist). TIAToolbox is not
                 one of this project's dependencies: it pins its own torch and brings dozens of packages.
The goals (issue 32): the whole command within GOAL_RATIO of the floor, peak RssAnon under GOAL_BYTES
at both sizes, and 40,000 tiles in under GOAL_SECONDS on 2 CPU cores.
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import rss

FULL = {"tissue_tiles": (100, 200), "margin": 5}  # squares of 100 x 100 and 200 x 200 tissue tiles
QUICK = {"tissue_tiles": (12,), "margin": 2}
MPP, TILE_PX = 2.0, 56  # level 0 of the written slides: 112 um a tile
GOAL_RATIO, GOAL_BYTES, GOAL_SECONDS = 1.5, 1e9, 120
ROOT = Path(__file__).resolve().parent


def write_slide(path, tissue_tiles, margin, seed=0):
    """A slide of tissue_tiles x tissue_tiles tissue tiles (synthetic images, 28 px upsampled to
    TILE_PX) with `margin` tiles of glass around them; returns the path."""
    import tifffile

    import synthetic
    images, _, _ = synthetic.synthetic_split(np.random.default_rng(seed), 512, 28)
    tiles = np.repeat(np.repeat(images, TILE_PX // 28, 1), TILE_PX // 28, 2)  # (512, 56, 56, 3)
    side = (tissue_tiles + 2 * margin) * TILE_PX
    canvas = np.full((side, side, 3), 245, np.uint8)
    pick = np.random.default_rng(seed).integers(0, len(tiles), (tissue_tiles, tissue_tiles))
    for r in range(tissue_tiles):
        row = np.concatenate(tiles[pick[r]], axis=1)
        top, left = (margin + r) * TILE_PX, margin * TILE_PX
        canvas[top:top + TILE_PX, left:left + row.shape[1]] = row
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for ds in (1, 4, 16):
            level = canvas if ds == 1 else np.asarray(Image.fromarray(canvas).reduce(ds))
            tw.write(level, tile=(256, 256), photometric="rgb", compression="zlib", compressionargs={"level": 1},
                     resolution=(1e4 / (MPP * ds),) * 2, resolutionunit="CENTIMETER",
                     subfiletype=0 if ds == 1 else 1)
    return path


FLOOR = """
import json, sys, time
import tissue, wsi
slide = wsi.open_slide(sys.argv[1])
grid = wsi.tile_grid(slide, int(sys.argv[2]))
_, _, shares = tissue.masked(slide, grid)
corners = tissue.kept(grid.corners(), shares, 0.5, False)
start = time.perf_counter()
for x, y in corners:
    wsi.read_tile(slide, grid, x, y)
print(json.dumps({"seconds": time.perf_counter() - start, "tiles": len(corners)}))
"""


TIATOOLBOX = """
import json, sys, time
import torch
from tiatoolbox.models import IOPatchPredictorConfig
from tiatoolbox.models.engine.patch_predictor import PatchPredictor
from tiatoolbox.models.models_abc import ModelABC
import zarr
import model as model_lib
slide, checkpoint, out = sys.argv[1:4]
net, meta = model_lib.load_checkpoint(checkpoint)
size = meta["provenance"]["size"]
mpp = 112.0 / size  # um/px the model's input takes: 112 um a tile


class Wrapped(ModelABC):  # this repo's model as TIAToolbox runs one: uint8 (N, H, W, C) in, probabilities out
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return torch.softmax(self.net(x.permute(0, 3, 1, 2).float() / 255), 1)

    @staticmethod
    def infer_batch(model, batch, *, device):
        with torch.no_grad():
            return model(torch.as_tensor(batch).to(device)).cpu().numpy()


io = IOPatchPredictorConfig(input_resolutions=[{"units": "mpp", "resolution": mpp}],
                            output_resolutions=[{"units": "mpp", "resolution": mpp}],
                            patch_input_shape=(size, size), stride_shape=(size, size))
start = time.perf_counter()
done = PatchPredictor(model=Wrapped(net), batch_size=256, num_workers=0, verbose=False).run(
    [slide], patch_mode=False, ioconfig=io, save_dir=out, device="cpu", output_type="zarr", overwrite=True)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "tiles": zarr.open(str(done[next(iter(done))]))["predictions"].shape[0]}))
"""


def measured(cmd, env=None):
    """Run `cmd` in ROOT: (its wall seconds, its peak RssAnon in bytes, its stdout); a failure raises."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    sampler = rss.AnonPeak(proc.pid, interval=0.01)
    sampler.start()
    out, err = proc.communicate()
    seconds, peak = time.perf_counter() - start, sampler.stop()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{err[-2000:]}")
    return seconds, peak, out


# slide.py's own report of an explanation pass
MAPS = re.compile(r"([\d,]+) maps of ([\d,]+) tiles computed in [\d.]+ s \(([\d.]+) maps/s\), ([\d,]+) bytes a "
                  r"stored map")


def tiatoolbox(python, slide, checkpoint, folder):
    """The slide through TIAToolbox's PatchPredictor, run by `python`: (whole command s, its own
    timing of the prediction s, patches predicted, peak RssAnon)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # model.py, to load the checkpoint
    seconds, peak, out = measured([python, "-c", TIATOOLBOX, str(slide), str(checkpoint), str(folder)], env)
    inner = json.loads(out.strip().splitlines()[-1])
    return {"tia_s": seconds, "tia_predict_s": inner["seconds"], "tia_tiles": inner["tiles"], "tia_peak": peak}


def bench_slide(slide, model, folder, explain, tia_python=None):
    """One written slide through the floor and slide.py (PyTorch, ONNX int8, and with `explain`
    --explain all), and through TIAToolbox with `tia_python`; `model` = (checkpoint, int8 ONNX file,
    model input px). A dict of its numbers."""
    checkpoint, int8, size = model
    _, floor_peak, out = measured([sys.executable, "-c", FLOOR, str(slide), str(size)])
    floor = json.loads(out)
    run = [sys.executable, "slide.py", str(slide), "--out", str(folder)]
    torch_s, torch_peak, _ = measured([*run, "--checkpoint", str(checkpoint), "--explain", "0"])
    onnx_s, onnx_peak, _ = measured([*run, "--onnx", str(int8), "--out", str(folder / "onnx")])
    row = {"tiles": floor["tiles"], "floor_s": floor["seconds"], "floor_peak": floor_peak, "pytorch_s": torch_s,
           "pytorch_peak": torch_peak, "onnx_int8_s": onnx_s, "onnx_int8_peak": onnx_peak}
    if explain:
        _, explain_peak, out = measured([*run, "--checkpoint", str(checkpoint), "--explain", "all", "--db",
                                         str(folder / "explanations.db")])
        maps, tiles, rate, payload = MAPS.search(out).groups()
        row.update(explained=int(maps.replace(",", "")), explained_tiles=int(tiles.replace(",", "")),
                   maps_s=float(rate), bytes_per_map=int(payload.replace(",", "")), explain_peak=explain_peak)
    if tia_python:
        row.update(tiatoolbox(tia_python, slide, checkpoint, folder / "tiatoolbox"))
    return row


def trained_model(folder, checkpoint=None, data_dir=None):
    """(checkpoint, int8 ONNX file, input px): `checkpoint` exported, or a 1-epoch synthetic model
    trained here (speed does not depend on the weights)."""
    if checkpoint is None:
        import datasets
        import synthetic
        data_dir = folder / "data"
        synthetic.write_synthetic(data_dir / datasets.synthetic_file_name(28), 28,
                                  counts={"train": 512, "val": 128, "test": 128}, seed=0)
        subprocess.run([sys.executable, "train.py", "--synthetic", "--epochs", "1", "--data-dir", str(data_dir),
                        "--out", str(folder / "run"), "--figures", str(folder / "run" / "images")], cwd=ROOT,
                       check=True, capture_output=True)
        checkpoint = folder / "run" / "best.pt"
    onnx = folder / "model.onnx"
    subprocess.run([sys.executable, "export.py", "--checkpoint", str(checkpoint), "--out", str(onnx),
                    *(["--data-dir", str(data_dir)] if data_dir else [])], cwd=ROOT, check=True, capture_output=True)
    import model as model_lib
    size = model_lib.load_checkpoint(checkpoint)[1]["provenance"]["size"]
    return checkpoint, onnx.with_name("model_int8.onnx"), size


def run(cfg, checkpoint=None, data_dir=None, tia_python=None):
    """Every slide size of `cfg` (FULL or QUICK): a list of bench_slide rows, smallest first."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = trained_model(folder, checkpoint and Path(checkpoint), data_dir)
        rows = []
        for i, n in enumerate(cfg["tissue_tiles"]):
            print(f"[bench] slide of {n * n:,} tissue tiles: writing, then the floor and slide.py ...",
                  file=sys.stderr, flush=True)
            path = write_slide(folder / f"slide{n}.tif", n, cfg["margin"])
            rows.append(bench_slide(path, model, folder / f"out{n}", i == 0, tia_python))
            path.unlink()
        return rows


def format_rows(rows):
    """The slide table as text, with each goal met or not."""
    lines = [f"{'tissue tiles':>12s} {'floor s':>8s} {'PyTorch s':>10s} {'x floor':>8s} {'ONNX int8 s':>12s} "
             f"{'x floor':>8s} {'peak GB PyTorch / ONNX / floor':>31s}"]
    for r in rows:
        lines.append(f"{r['tiles']:12,d} {r['floor_s']:8.1f} {r['pytorch_s']:10.1f} "
                     f"{r['pytorch_s'] / r['floor_s']:7.2f}x "
                     f"{r['onnx_int8_s']:12.1f} {r['onnx_int8_s'] / r['floor_s']:7.2f}x "
                     f"{r['pytorch_peak'] / 1e9:17.2f} / {r['onnx_int8_peak'] / 1e9:.2f} / {r['floor_peak'] / 1e9:.2f}")
    big = rows[-1]
    ratio = max(max(r["pytorch_s"], r["onnx_int8_s"]) / r["floor_s"] for r in rows)
    peak = max(max(r["pytorch_peak"], r["onnx_int8_peak"]) for r in rows)
    lines += [f"goals: whole command <= {GOAL_RATIO}x the floor: {'met' if ratio <= GOAL_RATIO else 'NOT met'} "
              f"({ratio:.2f}x); peak RssAnon <= {GOAL_BYTES / 1e9:.0f} GB: "
              f"{'met' if peak <= GOAL_BYTES else 'NOT met'} "
              f"({peak / 1e9:.2f} GB); {big['tiles']:,} tiles in under {GOAL_SECONDS} s: "
              f"{'met' if big['pytorch_s'] < GOAL_SECONDS else 'NOT met'} ({big['pytorch_s']:.0f} s, PyTorch)"]
    explained = [r for r in rows if "maps_s" in r]
    lines += [f"--explain all on {r['tiles']:,} tissue tiles: {r['explained']:,} maps at {r['maps_s']:.1f} maps/s, "
              f"{r['bytes_per_map']:,} bytes a stored map, peak RssAnon {r['explain_peak'] / 1e9:.2f} GB"
              for r in explained]
    lines += [f"TIAToolbox PatchPredictor, {r['tiles']:,} tissue tiles here: {r['tia_tiles']:,} patches (its own "
              f"mask) in {r['tia_s']:.1f} s whole command ({r['tia_predict_s']:.1f} s in run()), "
              f"{r['tia_tiles'] / r['tia_s']:,.0f} patches/s against slide.py's {r['tiles'] / r['pytorch_s']:,.0f} "
              f"tiles/s; peak RssAnon {r['tia_peak'] / 1e9:.2f} GB" for r in rows if "tia_s" in r]
    return "\n".join(lines)
