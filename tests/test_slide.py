"""slide.py: whole slides mapped tile by tile, on slides the tests write (tiled pyramidal TIFFs that
OpenSlide reads) with known truth, and on the real slide files of the shared folder."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import colour
import data
import model as model_lib
import slide
import slide_explanations
import tissue
import wsi

ROOT = Path(__file__).resolve().parents[1]
REGION = 3  # tiles a side of each class's square region
GAP = 1  # background tiles between regions and around them


def write_pyramid(path, image, mpp, downsamples):
    """A tiled pyramidal TIFF of the (H, W, 3) uint8 `image` at `mpp` um/px with the given levels,
    as OpenSlide's generic TIFF reader takes it (the scale in the TIFF resolution tags)."""
    import tifffile
    h, w, _ = image.shape
    with tifffile.TiffWriter(path) as tw:
        for ds in downsamples:
            level = np.asarray(Image.fromarray(image).resize((w // ds, h // ds), Image.Resampling.BOX))
            tw.write(level, tile=(256, 256), photometric="rgb", compression="zlib",
                     resolution=(1e4 / (mpp * ds), 1e4 / (mpp * ds)), resolutionunit="CENTIMETER",
                     subfiletype=0 if ds == 1 else 1)
    return path


def correctly_classified(checkpoint, syn_dir):
    """{class: [28 px test images the model gets right with probability >= 0.9, (28, 28, 3) uint8]}:
    a wrong tile of the slide is then the slide path's fault, not the model's. The margin keeps an
    image the model only just gets right from flipping in the round trip through the slide's pixels
    (seen on a new machine, same code and same best.pt: one tile at 0.51 against 0.45 flipped)."""
    net, meta = model_lib.load_checkpoint(checkpoint)
    test = data.load_matching(meta["provenance"], syn_dir).test
    with torch.no_grad():
        confidence, pred = net(colour.to_unit(test.images)).softmax(1).max(1)
    right = (pred == test.labels) & (confidence >= 0.9)
    return {c: test.images[right & (test.labels == c)].permute(0, 2, 3, 1).numpy() for c in range(9)}


def as_read(tile, downsample):
    """What slide.py makes of a level-0 tile of a slide written by write_pyramid: the level's BOX
    average (`downsample`), then antialiased bicubic to 28 px (wsi.read_tile); float (28, 28, 3)."""
    if downsample > 1:
        tile = np.asarray(Image.fromarray(tile).resize((tile.shape[1] // downsample,) * 2, Image.Resampling.BOX))
    return np.asarray(Image.fromarray(tile).resize((28, 28), Image.Resampling.BICUBIC, reducing_gap=None), float)


def upsampled(image, tile_px, downsample, rounds=12):
    """The (tile_px, tile_px, 3) uint8 tile that reads back as the 28 px `image`: back-projection
    (Irani and Peleg, 1991) through as_read. A plain bicubic upsample loses the synthetic classes'
    pixel-scale evidence in the round trip (the trained test model: 40% ACC instead of 96%)."""
    k = tile_px // 28
    target = image.astype(float)
    up = np.repeat(np.repeat(target, k, 0), k, 1)
    for _ in range(rounds):
        error = target - as_read(np.clip(up.round(), 0, 255).astype(np.uint8), downsample)
        up += np.repeat(np.repeat(error, k, 0), k, 1)
    return np.clip(up.round(), 0, 255).astype(np.uint8)


def truth_image(images, tile_px, downsample):
    """A slide of 3 x 3 class regions (REGION x REGION tiles of one class each, a different test
    image per tile, upsampled to `tile_px`) on white glass; (image, {(column, row): class})."""
    side = 3 * REGION + 4 * GAP
    canvas = np.full((side * tile_px, side * tile_px, 3), 255, np.uint8)
    truth = {}
    for c in range(9):
        top, left = GAP + (c // 3) * (REGION + GAP), GAP + (c % 3) * (REGION + GAP)
        for k in range(REGION * REGION):
            col, row = left + k % REGION, top + k // REGION
            tile = upsampled(images[c][k % len(images[c])], tile_px, downsample)
            canvas[row * tile_px:(row + 1) * tile_px, col * tile_px:(col + 1) * tile_px] = tile
            truth[(col, row)] = c
    return canvas, truth


@pytest.fixture(scope="module")
def truth_slides(trained_run, syn_dir, tmp_path_factory):
    """Two known-truth slides: 0.5 um/px with one level (read at level 0, resized 224 -> 28), and
    0.25 um/px with levels 1, 2, 4 (read at level 2, 1 um/px, resized 112 -> 28); (paths, truth)."""
    folder = tmp_path_factory.mktemp("slides")
    images = correctly_classified(trained_run / "best.pt", syn_dir)
    half, truth = truth_image(images, 224, 1)
    quarter, _ = truth_image(images, 448, 4)  # read at level 2: 448 level-0 px are 112 there
    return {"half": write_pyramid(folder / "half.tif", half, 0.5, (1,)),
            "quarter": write_pyramid(folder / "quarter.tif", quarter, 0.25, (1, 2, 4))}, truth


@pytest.fixture(scope="module")
def mapped(truth_slides, trained_run, tmp_path_factory, threads):
    """slide.py over both known-truth slides: {name: (output folder, tiles.csv rows, slide.json)}."""
    paths, _ = truth_slides
    out = tmp_path_factory.mktemp("mapped")
    slide.main([str(paths["half"]), str(paths["quarter"]), "--checkpoint", str(trained_run / "best.pt"),
                "--out", str(out), "--threads", threads, "--explain", "0"])
    result = {}
    for name in paths:
        folder = out / name
        with open(folder / "tiles.csv") as f:
            rows = list(csv.DictReader(f))
        result[name] = (folder, rows, json.loads((folder / "slide.json").read_text()))
    return result


@pytest.mark.parametrize("name", ["half", "quarter"])
def test_a_slide_of_known_regions_maps_each_to_its_class_and_skips_the_glass(mapped, truth_slides, name):
    _, truth = truth_slides
    folder, rows, summary = mapped[name]
    side = summary["slide"]["tile_px"]
    found = {(int(r["x"]) // side, int(r["y"]) // side): int(r["pred"]) for r in rows}
    for c in range(9):
        region = [t for t, k in truth.items() if k == c]
        right = sum(found.get(t) == c for t in region)
        assert right >= 0.95 * len(region), (name, c, right, len(region))
    columns = rows_ = 3 * REGION + 4 * GAP
    background = [(i, j) for i in range(columns) for j in range(rows_) if (i, j) not in truth]
    skipped = sum(t not in found for t in background)
    assert skipped >= 0.95 * len(background), (name, skipped, len(background))


def test_the_level_read_is_the_coarsest_at_least_as_fine_as_the_model_needs(mapped):
    # 28 px per 112 um needs 4 um/px: the 0.25 um/px slide's levels are 0.25, 0.5 and 1 um/px
    assert (mapped["quarter"][2]["slide"]["level"], mapped["quarter"][2]["slide"]["read_px"]) == (2, 112)
    assert (mapped["half"][2]["slide"]["level"], mapped["half"][2]["slide"]["read_px"]) == (0, 224)
    assert mapped["quarter"][2]["slide"]["tile_px"] == 448 and mapped["half"][2]["slide"]["tile_px"] == 224


def test_a_tiles_csv_coordinates_read_back_its_pixels(mapped, truth_slides):
    paths, _ = truth_slides
    _, rows, summary = mapped["half"]
    s = wsi.open_slide(paths["half"])
    grid = wsi.tile_grid(s, 28)
    whole = np.asarray(Image.open(paths["half"]).convert("RGB"))
    for r in rows[::7]:
        x, y = int(r["x"]), int(r["y"])
        expected = np.asarray(Image.fromarray(whole[y:y + 224, x:x + 224]).resize(
            (28, 28), Image.Resampling.BICUBIC, reducing_gap=None))
        assert np.array_equal(wsi.read_tile(s, grid, x, y), expected), (x, y)


def test_the_geojson_is_qupaths_and_every_polygon_lies_within_the_slide(mapped):
    folder, rows, summary = mapped["quarter"]
    g = json.loads((folder / "tiles.geojson").read_text())
    w, h = summary["slide"]["width"], summary["slide"]["height"]
    assert g["type"] == "FeatureCollection" and len(g["features"]) == len(rows)
    for f in g["features"]:
        ring = f["geometry"]["coordinates"][0]
        assert f["geometry"]["type"] == "Polygon" and ring[0] == ring[-1]
        assert all(0 <= x <= w and 0 <= y <= h for x, y in ring)
        props = f["properties"]
        assert props["objectType"] == "tile" and len(props["classification"]["color"]) == 3
        assert set(props["measurements"]) == {f"p {n}" for n in slide_names(summary)}
    assert len({f["id"] for f in g["features"]}) == len(rows)


def slide_names(summary):
    return list(summary["areas"]["per_class"])


def test_areas_add_up_to_the_tiles_classified_at_the_tiles_size(mapped):
    _, rows, summary = mapped["half"]
    a = summary["areas"]
    assert sum(v["tiles"] for v in a["per_class"].values()) == len(rows) == 81
    assert a["tissue_mm2"] == pytest.approx(81 * 0.112 ** 2, rel=1e-5)
    assert sum(v["share"] for v in a["per_class"].values()) == pytest.approx(1, abs=1e-5)


def test_every_output_is_written_and_says_the_slides_md5_and_scale(mapped, truth_slides):
    paths, _ = truth_slides
    folder, _, summary = mapped["quarter"]
    for name in ("tiles.csv", "tiles.geojson", "class_map.png", "overlay.png", "tissue_mask.png", "slide.json",
                 "slide.html"):
        assert (folder / name).is_file(), name
    assert summary["slide"]["md5"] == data.calculate_md5(paths["quarter"])
    assert summary["slide"]["mpp"] == 0.25 and summary["slide"]["mpp_source"] == "header"
    page = (folder / "slide.html").read_text()
    assert summary["slide"]["md5"] in page and "SYNTHETIC" in page and "src=\"data:image/png;base64," in page
    for picture in ("class_map.png", "overlay.png", "tissue_mask.png"):  # PNG text: the slide, its scale, the level
        about = Image.open(folder / picture).text["Description"]
        assert summary["slide"]["md5"] in about and "0.25 um/px" in about and "level 2" in about, picture
    assert summary["slide"]["md5"] in json.loads((folder / "tiles.geojson").read_text())["provenance"]


def test_the_onnx_model_maps_the_same_classes_as_the_checkpoint(mapped, truth_slides, trained_run, syn_dir, tmp_path):
    import export
    paths, _ = truth_slides
    export.main(["--checkpoint", str(trained_run / "best.pt"), "--out", str(tmp_path / "model.onnx"), "--no-int8",
                 "--data-dir", str(syn_dir)])
    slide.main([str(paths["half"]), "--onnx", str(tmp_path / "model.onnx"), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o" / "half" / "explanations.png").exists()  # the maps need PyTorch
    with open(tmp_path / "o" / "half" / "tiles.csv") as f:
        onnx_rows = {(r["x"], r["y"]): r["pred"] for r in csv.DictReader(f)}
    torch_rows = {(r["x"], r["y"]): r["pred"] for r in mapped["half"][1]}
    assert onnx_rows.keys() == torch_rows.keys()
    assert sum(onnx_rows[k] == torch_rows[k] for k in torch_rows) >= 0.99 * len(torch_rows)


def test_a_run_killed_mid_slide_and_rerun_writes_the_same_outputs_without_duplicates(truth_slides, trained_run,
                                                                                     mapped, tmp_path, threads):
    paths, _ = truth_slides
    cmd = [sys.executable, "slide.py", str(paths["quarter"]), "--checkpoint", str(trained_run / "best.pt"),
           "--out", str(tmp_path), "--batch-size", "4", "--threads", threads, "--explain", "0"]
    store = tmp_path / "quarter" / slide.STORE
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, stored = time.time() + 120, 0
        while time.time() < deadline and stored < 8:
            time.sleep(0.05)
            stored = count_tiles(store)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert 8 <= count_tiles(store) < 81 and not (tmp_path / "quarter" / "tiles.csv").exists()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
    assert count_tiles(store) == 81
    for name in ("tiles.csv", "tiles.geojson", "slide.json"):
        assert (tmp_path / "quarter" / name).read_bytes() == (mapped["quarter"][0] / name).read_bytes(), name


SLOW_BATCHES = """
import signal, sys, time
import cli, slide
# Ctrl-C as a terminal delivers it: a job started in the background (nohup, a CI runner) hands its
# children SIGINT ignored, and Python then never raises KeyboardInterrupt
signal.signal(signal.SIGINT, signal.default_int_handler)
stored = slide.store_batch
def slowly(conn, rows):  # each batch committed, then a pause: Ctrl-C lands mid-slide on any machine
    stored(conn, rows)
    time.sleep(0.2)
slide.store_batch = slowly
sys.argv[0] = "slide.py"
cli.run(slide.main)
"""


def test_ctrl_c_mid_slide_exits_130_keeping_whole_batches_and_the_rerun_completes(truth_slides, trained_run, mapped,
                                                                                tmp_path, threads):
    paths, _ = truth_slides
    args = [str(paths["half"]), "--checkpoint", str(trained_run / "best.pt"), "--out", str(tmp_path),
            "--batch-size", "4", "--threads", threads, "--explain", "0"]
    store = tmp_path / "half" / slide.STORE
    proc = subprocess.Popen([sys.executable, "-c", SLOW_BATCHES, *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and count_tiles(store) < 8:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert 8 <= count_tiles(store) < 81 and count_tiles(store) % 4 == 0
    assert not (tmp_path / "half" / "tiles.csv").exists()
    subprocess.run([sys.executable, "slide.py", *args], cwd=ROOT, check=True, capture_output=True, timeout=300)
    assert (tmp_path / "half" / "tiles.csv").read_bytes() == (mapped["half"][0] / "tiles.csv").read_bytes()


def test_two_torchrun_ranks_share_a_slides_tiles_and_write_what_one_process_writes(truth_slides, trained_run,
                                                                                   mapped, tmp_path):
    paths, _ = truth_slides
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "slide.py",
           str(paths["half"]), "--checkpoint", str(trained_run / "best.pt"), "--out", str(tmp_path), "--explain", "0",
           "--batch-size", "8", "--shard-dir", str(tmp_path / "shards"), "--threads", "1"]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "41/41 tile" in done.stderr  # rank 0's share: 6 of the 11 batches of 8 (the last holds 1)
    for name in ("tiles.csv", "tiles.geojson", "slide.json"):
        assert (tmp_path / "half" / name).read_bytes() == (mapped["half"][0] / name).read_bytes(), name
    assert not list((tmp_path / "shards").iterdir())  # merged, then deleted


def count_tiles(store):
    import sqlite3
    try:
        with sqlite3.connect(store) as conn:
            return conn.execute("SELECT COUNT(*) FROM tiles").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def test_a_blank_slide_has_no_tissue_and_a_stained_one_all(tmp_path):
    grid = wsi.Grid(side=10, level=0, read_side=10, size=28, columns=4, rows=3, why="")
    rng = np.random.default_rng(0)
    glass = Image.fromarray((245 + rng.integers(0, 6, (300, 400, 3))).astype(np.uint8))
    stained = Image.fromarray(np.dstack([np.full((300, 400), v, np.uint8) for v in (200, 80, 170)]))
    assert not tissue.tissue_mask(glass, grid).any()
    half = np.asarray(glass).copy()
    half[:, :200] = np.asarray(stained)[:, :200]
    shares = tissue.tile_shares(tissue.tissue_mask(Image.fromarray(half), grid), grid, (40, 30))
    assert (shares[:, :2] > 0.9).all() and (shares[:, 2:] < 0.1).all()


# ----------------------------------------------------------------------------- explanations

@pytest.fixture(scope="module")
def explained(truth_slides, trained_run, tmp_path_factory, threads):
    """slide.py --explain 2 over the 0.5 um/px known-truth slide, the store in its own folder:
    (argv, output folder, slide.json, store path)."""
    paths, _ = truth_slides
    out = tmp_path_factory.mktemp("explained")
    (out / "run").mkdir()  # a folder of its own: no evaluation's metrics.json beside it recommends a method
    shutil.copy(trained_run / "best.pt", out / "run" / "best.pt")
    argv = [str(paths["half"]), "--checkpoint", str(out / "run" / "best.pt"), "--out", str(out), "--threads",
            threads, "--explain", "2", "--db", str(out / "explanations.db")]
    slide.main(argv)
    return argv, out / "half", json.loads((out / "half" / "slide.json").read_text()), out / "explanations.db"


def stored(path, sql, *params):
    import sqlite3
    with sqlite3.connect(path) as conn:
        return conn.execute(sql, params).fetchall()


def test_the_two_most_and_two_least_confident_tiles_of_each_class_are_explained(explained):
    _, folder, _, store = explained
    tiles = stored(folder / slide.STORE, "SELECT x, y, pred, confidence FROM tiles")
    expected = set()
    for c in {t[2] for t in tiles}:
        ranked = sorted((t for t in tiles if t[2] == c), key=lambda t: (-t[3], t[1], t[0]))
        expected |= {(x, y) for x, y, _, _ in ranked[:2] + ranked[-2:]}
    placed = stored(store, "SELECT x, y FROM slide_tiles")
    assert set(placed) == expected and len(placed) == 36  # 9 classes, 9 tiles each: 4 of each explained
    counts = stored(store, "SELECT COUNT(*), COUNT(DISTINCT image_index) FROM explanations WHERE method = 'ig'")
    assert counts == [(36, 36)]


def test_a_stored_tile_map_is_found_by_the_slides_md5_and_the_tiles_corner(explained, truth_slides, trained_run):
    paths, _ = truth_slides
    _, _, _, store = explained
    md5 = data.calculate_md5(paths["half"])
    net, _ = model_lib.load_checkpoint(trained_run / "best.pt")
    whole = np.asarray(Image.open(paths["half"]).convert("RGB"))
    rows = stored(store, "SELECT t.x, t.y, t.size, e.probs FROM slide_tiles t JOIN explanations e ON e.run_id = "
                  "t.run_id AND e.split = t.split AND e.image_index = t.image_index WHERE t.slide_md5 = ? AND "
                  "e.method = 'ig'", md5)
    assert len(rows) == 36
    for x, y, size, probs in rows[::5]:  # the stored prediction is the model's on the pixels at (x, y)
        tile = np.asarray(Image.fromarray(whole[y:y + size, x:x + size]).resize((28, 28), Image.Resampling.BICUBIC,
                                                                                 reducing_gap=None))
        with torch.no_grad():
            expected = torch.softmax(net(colour.to_unit(torch.tensor(tile).permute(2, 0, 1)[None])), 1)[0]
        assert np.allclose(np.frombuffer(probs, "<f4"), expected.numpy(), atol=1e-4), (x, y)


def test_the_explanations_are_drawn_and_recorded_in_slide_json_and_the_page(explained, truth_slides):
    paths, _ = truth_slides
    _, folder, summary, store = explained
    e = summary["explanations"]
    assert (e["method"], e["tiles"], e["split"]) == ("ig", 36, f"slide:{data.calculate_md5(paths['half'])}:224")
    assert e["bytes_per_map"] == 3 * 28 * 28 * 2 + 9 * 4  # float16 map, float32 probabilities
    assert Image.open(folder / "explanations.png").size[1] > 9 * 2 * 150  # a row per class and end
    assert "<h2>Explanations</h2>" in (folder / "slide.html").read_text()


def test_the_stores_summary_lists_a_slides_explained_tiles_apart_without_an_accuracy(explained):
    import attribution
    import datasets
    import db
    conn = db.connect(explained[3], create=False)
    text = db.summary(conn, datasets.describe, attribution.relative_completeness_error)
    assert "slide tiles explained (slide.py): half.tif 36" in text
    assert "slide:" not in text  # no accuracy line for a split of tiles without truth


def test_a_rerun_explains_nothing_again_and_draws_the_same_figure(explained, capsys):
    argv, folder, _, store = explained
    before = (folder / "explanations.png").read_bytes(), stored(store, "SELECT COUNT(*) FROM explanations")
    slide.main(argv)
    assert "already stored" in capsys.readouterr().out
    assert ((folder / "explanations.png").read_bytes(), stored(store, "SELECT COUNT(*) FROM explanations")) == before


def test_the_runs_recommended_method_is_drawn_with_the_training_images_as_its_baselines(truth_slides, trained_run,
                                                                                        syn_dir, tmp_path, threads):
    paths, _ = truth_slides
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes((trained_run / "best.pt").read_bytes())
    (run / "metrics.json").write_text(json.dumps({"recommended": "expected_gradients"}))
    slide.main([str(paths["half"]), "--checkpoint", str(run / "best.pt"), "--threads", threads, "--explain", "1",
                "--data-dir", str(syn_dir)])
    summary = json.loads((run / "slides" / "half" / "slide.json").read_text())
    assert summary["explanations"]["method"] == "expected_gradients"
    methods = stored(run / "explanations.db", "SELECT method, COUNT(*) FROM explanations GROUP BY method")
    assert dict(methods) == {"expected_gradients": 18, "ig": 18}  # IG always: it fixes each tile's class


def test_tiles_are_picked_per_class_most_confident_first_without_repeats():
    rows = [{"x": i, "y": 0, "pred": p, "confidence": c} for i, (p, c) in enumerate(
        [(0, 0.9), (0, 0.5), (0, 0.7), (1, 0.6), (1, 0.6), (1, 0.99), (1, 0.2), (1, 0.4)])]
    picked = [(r["x"], pick) for r, pick in slide_explanations.chosen(rows, 2)]
    assert picked == [(0, "most"), (2, "most"), (1, "least"), (5, "most"), (3, "most"), (6, "least"), (7, "least")]
    assert len(slide_explanations.chosen(rows, "all")) == len(rows)


def test_the_method_drawn_is_the_runs_recommended_one_else_ig(tmp_path):
    assert slide_explanations.drawn_method(tmp_path)[0] == "ig"  # no evaluation
    (tmp_path / "metrics.json").write_text(json.dumps({"recommended": "gradcam"}))
    assert slide_explanations.drawn_method(tmp_path)[0] == "gradcam"
    (tmp_path / "metrics.json").write_text(json.dumps({"recommended": "smoothgrad_ig:n=16,sd=0.1"}))
    assert slide_explanations.drawn_method(tmp_path)[0] == "ig"  # a quality variant, not a stored map method


# ----------------------------------------------------------------------------- errors

def run_slide(*args):
    """slide.py in a process of its own; tiles are explained only where the arguments ask (--explain)."""
    explain = [] if "--explain" in args else ["--explain", "0"]
    return subprocess.run([sys.executable, "slide.py", *map(str, args), *explain], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_a_slide_without_its_scale_is_refused_and_maps_with_mpp(trained_run, tmp_path):
    path = tmp_path / "noscale.png"
    Image.fromarray(np.full((500, 500, 3), 200, np.uint8)).save(path)
    done = run_slide(path, "--checkpoint", trained_run / "best.pt", "--out", tmp_path)
    assert done.returncode == 1 and "--mpp" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "noscale").exists()
    done = run_slide(path, "--checkpoint", trained_run / "best.pt", "--out", tmp_path, "--mpp", "0.5")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "noscale" / "tiles.csv").is_file()


def test_a_slide_smaller_than_one_tile_is_refused(trained_run, tmp_path):
    path = tmp_path / "small.png"
    Image.fromarray(np.full((100, 100, 3), 200, np.uint8)).save(path)
    done = run_slide(path, "--checkpoint", trained_run / "best.pt", "--out", tmp_path, "--mpp", "0.5")
    assert done.returncode == 1 and "smaller than one 112 um tile" in done.stderr and "Traceback" not in done.stderr


def test_a_truncated_slide_is_refused_in_one_paragraph(truth_slides, trained_run, tmp_path):
    paths, _ = truth_slides
    cut = tmp_path / "cut.tif"
    cut.write_bytes(paths["quarter"].read_bytes()[:200_000])
    done = run_slide(cut, "--checkpoint", trained_run / "best.pt", "--out", tmp_path)
    assert done.returncode == 1 and "truncated or damaged" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "cut" / "tiles.csv").exists()


def test_a_damaged_tile_store_is_refused_in_one_paragraph_naming_it(truth_slides, trained_run, tmp_path):
    paths, _ = truth_slides
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / slide.STORE).write_bytes(b"not an SQLite file, " * 100)
    done = run_slide(paths["half"], "--checkpoint", trained_run / "best.pt", "--out", tmp_path)
    assert done.returncode == 1 and "tiles.db is not a tile store" in done.stderr and "Traceback" not in done.stderr


def test_an_unsupported_file_is_refused_in_one_paragraph(trained_run, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a slide")
    done = run_slide(path, "--checkpoint", trained_run / "best.pt", "--out", tmp_path, "--mpp", "0.5")
    assert done.returncode == 1 and "not a slide format" in done.stderr and "Traceback" not in done.stderr


def test_a_one_channel_checkpoint_is_refused(syn_dir, tmp_path, train_argv):
    import datasets
    import synthetic
    import train
    data_dir = tmp_path / "data"
    synthetic.write_synthetic(data_dir / datasets.synthetic_file_name(28, "pneumoniamnist"), 28,
                              counts={"train": 32, "val": 8, "test": 8}, flag="pneumoniamnist")
    train.main(train_argv(data_dir, tmp_path / "run", "--flag", "pneumoniamnist", "--epochs", "1"))
    png = tmp_path / "s.png"
    Image.fromarray(np.full((500, 500, 3), 200, np.uint8)).save(png)
    done = run_slide(png, "--checkpoint", tmp_path / "run" / "best.pt", "--mpp", "0.5", "--out", tmp_path)
    assert done.returncode == 1 and "1-channel" in done.stderr and "Traceback" not in done.stderr


# ----------------------------------------------------------------------------- the real slide files

def test_every_real_slide_file_maps_or_says_why(realdata, trained_run, tmp_path, threads):
    slides = Path(realdata) / "slides"
    ckpt = str(trained_run / "best.pt")
    cmu = run_slide(slides / "CMU-1-Small-Region.svs", "--checkpoint", ckpt, "--out", tmp_path, "--threads", threads,
                    "--explain", "1", "--db", tmp_path / "explanations.db")
    assert cmu.returncode == 0, cmu.stderr
    summary = json.loads((tmp_path / "CMU-1-Small-Region" / "slide.json").read_text())
    assert summary["slide"]["mpp"] == pytest.approx(0.499) and summary["mask"]["classified"] > 20
    assert summary["explanations"]["tiles"] >= 2 and (tmp_path / "CMU-1-Small-Region" / "explanations.png").is_file()
    ome = run_slide(slides / "HE_example_tma.ome.tif", "--checkpoint", ckpt, "--out", tmp_path, "--threads", threads)
    assert ome.returncode == 0, ome.stderr
    assert json.loads((tmp_path / "HE_example_tma" / "slide.json").read_text())["slide"]["format"] == "ome-tiff"
    tcga = slides / "TCGA-CR-7395-01A-01-TS1_histolab-crop.svs"
    refused = run_slide(tcga, "--checkpoint", ckpt, "--out", tmp_path, "--threads", threads)
    assert refused.returncode == 1 and "--mpp" in refused.stderr and "Traceback" not in refused.stderr
    given = run_slide(tcga, "--checkpoint", ckpt, "--out", tmp_path, "--mpp", "0.5", "--threads", threads)
    assert given.returncode == 0, given.stderr
    assert (tmp_path / "TCGA-CR-7395-01A-01-TS1_histolab-crop" / "tiles.geojson").is_file()


def test_a_full_disk_mid_slide_keeps_the_stored_batches_and_the_rerun_completes(truth_slides, trained_run, mapped,
                                                                              monkeypatch, tmp_path, threads):
    import files
    paths, _ = truth_slides
    argv = [str(paths["half"]), "--checkpoint", str(trained_run / "best.pt"), "--out", str(tmp_path),
            "--batch-size", "16", "--threads", threads, "--explain", "0"]
    opened = slide.open_store

    def small(path, key):  # a store that may grow by a few pages only: SQLite's "database or disk is full"
        conn = opened(path, key)
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages + 1}")
        return conn
    monkeypatch.setattr(slide, "open_store", small)
    with pytest.raises(files.FileError, match="disk is full"):
        slide.main(argv)
    kept = count_tiles(tmp_path / "half" / slide.STORE)
    assert 0 < kept < 81 and kept % 16 == 0 and not (tmp_path / "half" / "tiles.csv").exists()
    monkeypatch.setattr(slide, "open_store", opened)
    slide.main(argv)
    assert (tmp_path / "half" / "tiles.csv").read_bytes() == (mapped["half"][0] / "tiles.csv").read_bytes()


BLOCK_TORCH = """
import sys
sys.modules["torch"] = None  # any import of torch now fails (as tests/test_predict.py blocks it)
import slide
slide.main(sys.argv[1:])
print("torch imported:", sys.modules.get("torch") is not None)
"""


def test_the_onnx_path_maps_a_slide_where_torch_cannot_be_imported(truth_slides, trained_run, syn_dir, tmp_path):
    import export
    paths, _ = truth_slides
    export.main(["--checkpoint", str(trained_run / "best.pt"), "--out", str(tmp_path / "model.onnx"), "--no-int8",
                 "--data-dir", str(syn_dir)])
    argv = [str(paths["half"]), "--onnx", str(tmp_path / "model.onnx"), "--out", str(tmp_path / "o")]
    done = subprocess.run([sys.executable, "-c", BLOCK_TORCH, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "torch imported: False" in done.stdout and (tmp_path / "o" / "half" / "tiles.geojson").is_file()
