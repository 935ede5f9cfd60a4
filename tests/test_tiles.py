"""tiles.py: image files of every kind as model input, and warnings for inputs unlike the training data."""
import numpy as np
import pytest
import torch
from PIL import Image

import colour
import data
import tiles


def test_png_is_read_in_true_colours_at_the_model_size(tmp_path):
    Image.new("RGB", (224, 224), (200, 100, 50)).save(tmp_path / "a.png")
    img = tiles.read_tile(tmp_path / "a.png", 28).image
    assert img.shape == (3, 28, 28) and img.dtype == torch.uint8
    assert img[:, 14, 14].tolist() == [200, 100, 50]


def test_grayscale_jpeg_becomes_three_equal_channels(tmp_path):
    Image.new("L", (100, 60), 90).save(tmp_path / "g.jpg")
    img = tiles.read_tile(tmp_path / "g.jpg", 28).image
    assert img.shape == (3, 28, 28)
    assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])


def test_transparent_pixels_of_rgba_become_white_glass(tmp_path):
    arr = np.zeros((50, 50, 4), np.uint8)
    arr[..., :3] = (150, 50, 150)
    arr[:, 25:, 3] = 255  # left half transparent
    Image.fromarray(arr, "RGBA").save(tmp_path / "t.png")
    img = tiles.read_tile(tmp_path / "t.png", 28).image
    assert img[:, 14, 2].tolist() == [255, 255, 255]
    assert img[:, 14, 25].tolist() == [150, 50, 150]


def test_16_bit_tiff_is_rescaled_not_clipped(tmp_path):
    arr = np.full((64, 64), 32896, np.uint16)  # half of 65535, i.e. 128 in 8 bits
    Image.fromarray(arr).save(tmp_path / "d.tif")
    img = tiles.read_tile(tmp_path / "d.tif", 28).image
    assert img.unique().tolist() == [128]


def test_non_square_images_are_centre_cropped(tmp_path):
    arr = np.zeros((40, 120, 3), np.uint8)
    arr[:, 40:80] = 255  # only the centre square is white
    Image.fromarray(arr).save(tmp_path / "w.png")
    assert tiles.read_tile(tmp_path / "w.png", 28).image.float().mean() > 250


def test_non_image_file_is_an_explain_error(tmp_path):
    (tmp_path / "x.png").write_text("not an image")
    with pytest.raises(tiles.ImageError, match="could not be read as an image"):
        tiles.read_tile(tmp_path / "x.png", 28)


@pytest.mark.parametrize("side", [12, 20])  # 144 px: past PIL's warning limit (100); 400 px: past its error limit (200)
def test_an_image_too_large_to_be_a_tile_is_refused_with_a_paragraph_before_decoding(tmp_path, monkeypatch, side):
    Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(tmp_path / "slide.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    monkeypatch.setattr(tiles, "MAX_PIXELS", 100)
    with pytest.raises(tiles.ImageError, match="a whole slide or its export, not a tile.*cut the slide into tiles"):
        tiles.read_tile(tmp_path / "slide.png", 28)


# ----------------------------------------------------------------------------- inputs the model was not made for

@pytest.fixture(scope="module")
def reference(syn_dir):
    ds = data.load(syn_dir, 28, synthetic=True)
    return ds, colour.colour_reference(ds.train.images, ds.val.images)


def test_colour_threshold_lets_through_99_percent_of_validation_images(reference):
    ds, ref = reference
    inside = (colour.colour_distance(ref, ds.val.images) <= ref["threshold"]).float().mean()
    assert 0.985 <= float(inside) <= 0.995 and ref["percentile"] == 99


def test_a_training_like_image_gets_no_warning(reference):
    ds, ref = reference
    distances = colour.colour_distance(ref, ds.val.images)
    typical = ds.val.images[int(distances.argsort()[len(distances) // 2])]
    assert tiles.input_warnings(typical, (224, 224), 28, ref) == []


@pytest.mark.parametrize("kind", ["black", "noise", "white"])
def test_images_unlike_the_training_data_get_a_colour_warning(reference, kind):
    _, ref = reference
    g = torch.Generator().manual_seed(0)
    image = {"black": torch.zeros(3, 28, 28, dtype=torch.uint8),
             "white": torch.full((3, 28, 28), 255, dtype=torch.uint8),
             "noise": torch.randint(0, 256, (3, 28, 28), generator=g, dtype=torch.uint8)}[kind]
    warnings = tiles.input_warnings(image, (224, 224), 28, ref)
    assert len(warnings) == 1 and "colour statistics lie far" in warnings[0]


def test_tiny_and_huge_images_are_named(reference):
    ds, ref = reference
    typical = ds.val.images[0]
    assert "far smaller" in " ".join(tiles.input_warnings(typical, (1, 1), 28, None))
    assert "crop or tile" in " ".join(tiles.input_warnings(typical, (4000, 6000), 28, None))
    assert tiles.input_warnings(typical, (224, 224), 28, None) == []


def test_folders_are_expanded_to_their_image_files(tmp_path):
    (tmp_path / "d").mkdir()
    for name in ("b.png", "a.JPG", "notes.txt"):
        (tmp_path / "d" / name).write_bytes(b"x")
    assert tiles.image_paths([tmp_path / "d", tmp_path / "x.tif"]) == [
        tmp_path / "d" / "a.JPG", tmp_path / "d" / "b.png", tmp_path / "x.tif"]


def test_inputs_with_the_same_name_get_distinct_figures():
    from pathlib import Path
    stems = tiles.output_stems([Path("a/x.png"), Path("b/x.png"), Path("c/y.png"), Path("a/x.jpg")])
    assert len(set(stems)) == 4 and stems[2] == "y" and stems[0].startswith("a_x")
