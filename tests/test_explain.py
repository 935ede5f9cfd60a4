"""explain.py: IG completeness and localisation, image files of every kind, the CLI."""
import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data
import datasets
import explain
import synthetic
import tiles

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args):
    return subprocess.run([sys.executable, "explain.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=180)


def test_cli_explains_png_gray_jpeg_rgba_and_16_bit_tiff(tmp_path, trained_run, syn_dir):
    test = data.load(syn_dir, 28, synthetic=True).test
    rgb = test.images[0].permute(1, 2, 0).numpy()
    Image.fromarray(rgb).resize((224, 224), Image.BICUBIC).save(tmp_path / "rgb.png")
    Image.fromarray(rgb).convert("L").save(tmp_path / "gray.jpg")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(np.asarray(Image.fromarray(rgb).convert("L")).astype(np.uint16) * 257).save(tmp_path / "d16.tif")
    files = [str(tmp_path / n) for n in ("rgb.png", "gray.jpg", "rgba.png", "d16.tif")]
    result = run_cli(*files, "--checkpoint", str(trained_run / "best.pt"), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("top-3:") == 4
    for stem, name in (("rgb", "rgb.png"), ("gray", "gray.jpg"), ("rgba", "rgba.png"), ("d16", "d16.tif")):
        image = tiles.read_tile(tmp_path / name, 28).image
        assert pixels_in_the_colours_of(tmp_path / "out" / f"{stem}_ig.png", image) > 1000, stem


def pixels_in_the_colours_of(figure, image):
    """How many pixels of a figure have exactly one of the colours of a (3, H, W) uint8 image: the
    image drawn in its true colours gives thousands; a re-normalised or missing one gives next to none."""
    with Image.open(figure) as img:
        drawn = np.asarray(img.convert("RGB")).reshape(-1, 3)
    code = lambda rgb: (rgb[:, 0].astype(np.int64) << 16) | (rgb[:, 1].astype(np.int64) << 8) | rgb[:, 2]  # noqa: E731
    return int(np.isin(code(drawn), code(image.reshape(3, -1).T.numpy())).sum())


def test_cli_rerenders_a_stored_explanation(tmp_path, evaluated_run, syn_dir):
    run_dir, metrics = evaluated_run
    import db
    conn = db.connect(run_dir / "explanations.db", create=False)
    index = db.find(conn, metrics["store"]["run_id"], limit=1)[0]["image_index"]
    result = run_cli("--db", str(run_dir / "explanations.db"), "--index", str(index),
                     "--data-dir", str(syn_dir), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    (figure,) = tmp_path.glob("*_ig.png")
    assert pixels_in_the_colours_of(figure, data.load(syn_dir, 28, synthetic=True).test.images[index]) > 1000


def test_cli_non_image_file_exits_1_with_a_paragraph(tmp_path, trained_run):
    (tmp_path / "notes.png").write_text("hello")
    result = run_cli(str(tmp_path / "notes.png"), "--checkpoint", str(trained_run / "best.pt"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "could not be read as an image" in result.stderr


def test_cli_missing_checkpoint_tells_the_user_to_train(tmp_path):
    Image.new("RGB", (28, 28)).save(tmp_path / "a.png")
    result = run_cli(str(tmp_path / "a.png"), "--checkpoint", str(tmp_path / "none.pt"))
    assert result.returncode == 1 and "python train.py" in result.stderr


def test_cli_goes_on_past_a_bad_file_keeps_same_named_files_apart_and_writes_a_csv(tmp_path, trained_run, syn_dir):
    test = data.load(syn_dir, 28, synthetic=True).test
    for folder, i in (("a", 0), ("b", 1)):
        (tmp_path / folder).mkdir()
        Image.fromarray(test.images[i].permute(1, 2, 0).numpy()).save(tmp_path / folder / "x.png")
    (tmp_path / "a" / "broken.png").write_text("not an image")
    result = run_cli(str(tmp_path / "a"), str(tmp_path / "b" / "x.png"), "--checkpoint",
                     str(trained_run / "best.pt"), "--out", str(tmp_path / "out"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "broken.png could not be read" in result.stderr and "1 of 3 inputs" in result.stderr
    figures = sorted(p.name for p in (tmp_path / "out").glob("*_ig.png"))
    assert figures == ["a_x_ig.png", "b_x_ig.png"]
    with open(tmp_path / "out" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["file"]).parent.name for r in rows] == ["a", "b"]
    assert all(r["class"] in synthetic_class_names(syn_dir) and 0 < float(r["confidence"]) <= 1 for r in rows)
    assert all(float(r["completeness_error"]) < 0.05 for r in rows)


def test_cli_warns_about_an_image_unlike_the_training_data(tmp_path, trained_run):
    Image.new("RGB", (224, 224), (0, 0, 0)).save(tmp_path / "black.png")
    result = run_cli(str(tmp_path / "black.png"), "--checkpoint", str(trained_run / "best.pt"),
                     "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "warning: its colour statistics lie far from the training images'" in result.stdout
    with open(tmp_path / "out" / "predictions.csv") as f:
        assert "colour statistics" in next(csv.DictReader(f))["warnings"]


def test_cli_rerender_reads_an_empty_file_without_changing_it(tmp_path):
    (tmp_path / "new.db").touch()
    result = run_cli("--db", str(tmp_path / "new.db"), "--index", "3")
    assert result.returncode == 1 and "is empty" in result.stderr
    assert (tmp_path / "new.db").stat().st_size == 0


def synthetic_class_names(syn_dir):
    return data.load(syn_dir, 28, synthetic=True).class_names


def test_each_models_figures_go_to_its_own_run_folder_by_default():
    for argv, folder in ((["tile.png", "--checkpoint", "runs/a_28/best.pt"], "runs/a_28/explain"),
                         (["tile.png", "--checkpoint", "runs/b_28/best.pt"], "runs/b_28/explain"),
                         (["--db", "runs/c_28/explanations.db", "--index", "3"], "runs/c_28/explain"),
                         (["tile.png", "--out", "figs"], "figs")):
        assert explain.parse_args(argv).out == folder


def test_cli_explains_real_nct_tiff_and_crc_png_tiles_read_down_to_the_models_size(tmp_path, trained_run, realdata):
    tiff, png = realdata / "nct-crc-he-100k" / "TUM-AACHEHDV.tif", realdata / "crc-val-he-7k" / "STR-TCGA-HGDYLEWM.png"
    result = run_cli(str(tiff), str(png), "--checkpoint", str(trained_run / "best.pt"), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["file"]).name for r in rows] == [tiff.name, png.name]
    for row, path in zip(rows, (tiff, png), strict=True):
        assert float(row["completeness_error"]) <= 0.05
        tile = tiles.read_tile(path, 28)
        image, original = tile.image, tile.original
        assert original == (224, 224)  # a 224 px tile, read down to 28 px as PathMNIST was made
        assert pixels_in_the_colours_of(tmp_path / f"{path.stem}_ig.png", image) > 1000


@pytest.mark.trains
def test_a_one_channel_model_explains_a_real_rgb_tile_in_greyscale(tmp_path, syn_dir, realdata, threads):
    import train
    grey_dir = tmp_path / "data"
    synthetic.write_synthetic(grey_dir / datasets.synthetic_file_name(28, "pneumoniamnist"), 28,
                         counts={"train": 64, "val": 16, "test": 16}, flag="pneumoniamnist")
    train.main(["--flag", "pneumoniamnist", "--synthetic", "--data-dir", str(grey_dir),
                "--out", str(tmp_path / "run"), "--epochs", "1", "--threads", threads])
    tile = realdata / "nct-crc-he-100k" / "LYM-AATTSRNN.tif"
    result = run_cli(str(tile), "--checkpoint", str(tmp_path / "run" / "best.pt"), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    grey = tiles.read_tile(tile, 28, channels=1).image
    rgb = tiles.read_tile(tile, 28).image
    # ITU-R 601 luma of the RGB read, worked out here; resizing before or after converting differs
    # only by rounding.
    luma = (0.299 * rgb[0].double() + 0.587 * rgb[1].double() + 0.114 * rgb[2].double())
    assert grey.shape == (1, 28, 28) and (grey[0].double() - luma).abs().max() <= 3
    figure = np.asarray(Image.open(tmp_path / "out" / "LYM-AATTSRNN_ig.png").convert("RGB")).astype(int)
    h, w, _ = figure.shape
    image_panel = figure[int(0.15 * h):int(0.85 * h), int(0.02 * w):int(0.31 * w)]
    assert ((image_panel.max(2) - image_panel.min(2)) > 20).mean() < 0.01  # drawn grey, not in colour




def test_a_map_left_above_the_tolerance_is_warned_of_on_the_console_and_in_the_csv(tmp_path, trained_run, syn_dir):
    test = data.load(syn_dir, 28, synthetic=True).test
    Image.fromarray(test.images[0].permute(1, 2, 0).numpy()).save(tmp_path / "t.png")
    # one step, never refined, against a tolerance no one step meets
    result = run_cli(str(tmp_path / "t.png"), "--checkpoint", str(trained_run / "best.pt"), "--out",
                     str(tmp_path / "out"), "--n-steps", "1", "--max-steps", "1", "--tolerance", "0.000001")
    assert result.returncode == 0, result.stderr
    assert "warning: IG's completeness error" in result.stdout and "stays above --tolerance" in result.stdout
    with open(tmp_path / "out" / "predictions.csv") as f:
        row = next(csv.DictReader(f))
    assert float(row["completeness_error"]) > 0.000001 and "completeness error" in row["warnings"]


def test_no_figures_writes_the_csv_alone(tmp_path, trained_run, syn_dir):
    test = data.load(syn_dir, 28, synthetic=True).test
    for i in range(3):
        Image.fromarray(test.images[i].permute(1, 2, 0).numpy()).save(tmp_path / f"t{i}.png")
    result = run_cli(*[str(tmp_path / f"t{i}.png") for i in range(3)], "--checkpoint", str(trained_run / "best.pt"),
                     "--out", str(tmp_path / "out"), "--no-figures")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["predictions.csv"]
    with open(tmp_path / "out" / "predictions.csv") as f:
        assert [r["figure"] for r in csv.DictReader(f)] == ["", "", ""]


def test_the_figure_shows_the_tile_as_read_and_names_its_file(tmp_path, trained_run, monkeypatch):
    import plots
    tile = np.random.default_rng(0).integers(0, 256, (300, 224, 3), dtype=np.uint8)  # detail the input loses
    Image.fromarray(tile).save(tmp_path / "scan_0042.png")
    drawn = []
    real = plots.tile_figure
    monkeypatch.setattr(plots, "tile_figure", lambda *a: drawn.append(a) or real(*a))
    explain.main([str(tmp_path / "scan_0042.png"), "--checkpoint", str(trained_run / "best.pt"),
                  "--out", str(tmp_path / "out")])
    (shown, image, _, title, path, _), = drawn
    assert title[0] == "scan_0042.png\nas read, 224×300 px" and path.endswith("scan_0042_ig.png")
    square = tile[38:262] / 255  # the centre square, as read
    assert image.shape == (3, 28, 28) and np.allclose(shown.permute(1, 2, 0).numpy(), square, atol=1e-6)
