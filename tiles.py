"""tiles.py: image files as model input, and what makes an input one the model was not made for.

    tile = tiles.read_tile("tile.png", 28)        # tile.image: (3, 28, 28) uint8; tile.shown: as read, for figures
    tile = tiles.read_tile("xray.png", 28, 1)     # (1, 28, 28) greyscale

Image files may be PNG, JPEG or TIFF of any size and mode (grayscale, RGBA, 16-bit). Like PathMNIST
(built from square 224x224 tiles) they are centre-cropped to a square and resized to the model's
input size; MedMNIST does not document its interpolation, so we use antialiased bicubic.

input_warnings says when an answer may mean little: an image far smaller than the model's input,
far larger than a tile, or with colour statistics unlike the training split's (colour.colour_distance,
with the threshold the checkpoint calibrated on its validation split); its sentences live in
predict.py, which must run without torch and says the same. A warning is no verdict on
the prediction, and no warning is no guarantee: the check sees colour, not tissue.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

import cli
import colour
import predict


class ImageError(cli.UserError):
    """A file that cannot be read as an image."""


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
TILE_PX = predict.TILE_PX  # PathMNIST's source tiles: 224 x 224 px at 0.5 um/px
MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # PIL's decompression-bomb warning limit (89 Mpx): a slide, not a tile


SHOWN_PX = TILE_PX  # figures show the tile as read at up to this many pixels a side


@dataclass(frozen=True)
class Tile:
    """An image file as read: the model's input, the size it had, and the square the input was cut
    from (at most SHOWN_PX a side), which figures show beside the input."""
    path: Path
    image: torch.Tensor  # uint8 (channels, size, size)
    original: tuple  # (width, height) as read
    shown: torch.Tensor  # uint8 (channels, s, s), s <= SHOWN_PX


def read_tile(path, size, channels=3):
    """Any PNG/JPEG/TIFF as a Tile: first frame, 8-bit RGB on white (converted to greyscale, ITU-R
    601 luma, for a 1-channel model), centre-cropped square, resized to `size` for the model, and
    that square as read (at most SHOWN_PX a side) for figures."""
    square, original = read_square(path, channels)
    shown = square.resize((SHOWN_PX, SHOWN_PX), Image.Resampling.BICUBIC) if square.width > SHOWN_PX else square
    return Tile(Path(path), to_tensor(square.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=None)),
                original, to_tensor(shown))


def read_square(path, channels):
    """(the centre square of an image file as a PIL image, in RGB or greyscale; (width, height) as read)."""
    try:
        with Image.open(path) as img:  # reads the header only: the size is known before any decoding
            if img.width * img.height > MAX_PIXELS:
                raise ImageError(too_large(path, img.size))
            img.seek(0)
            rgb = to_rgb8(img)
    except Image.DecompressionBombError as e:  # PIL refuses these at open, before the size can be read
        raise ImageError(too_large(path, None, e)) from e
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageError(f"{path} could not be read as an image ({e}). Give a PNG, JPEG or TIFF "
                           f"file of an image like the model's training data.") from e
    if channels == 1:
        rgb = rgb.convert("L")
    original, side = rgb.size, min(rgb.size)
    return ImageOps.fit(rgb, (side, side), centering=(0.5, 0.5)), original  # centre crop, as MedMNIST did


def to_tensor(img):
    """A PIL image as a uint8 (C, H, W) tensor."""
    pixels = np.asarray(img).copy().reshape(img.height, img.width, -1)
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def too_large(path, size, error=None):
    """The paragraph for an image too large to be a tile (a whole slide or its export)."""
    what = f"is {size[0]:,} x {size[1]:,} px" if size else f"is too large for PIL to open ({error})"
    return (f"{path} {what}: a whole slide or its export, not a tile. explain.py classifies tiles like "
            f"the training data's ({TILE_PX} x {TILE_PX} px at 0.5 um/px for PathMNIST) and reads images of "
            f"at most {MAX_PIXELS / 1e6:.0f} megapixels; cut the slide into tiles first and pass those.")


def input_warnings(image, original, size, colour_reference):
    """Why the model's answer for this input may mean little: a tiny or huge source image, or colour
    statistics unlike the training split's (colour_reference from the checkpoint, if it has one). The
    distance is computed here in torch; the sentences are predict.py's, so predict.py (which cannot
    import torch) and explain.py warn in the same words."""
    distance = float(colour.colour_distance(colour_reference, image[None])[0]) if colour_reference else None
    return predict.warning_sentences(original, size, distance, colour_reference)


def image_paths(inputs):
    """The files to explain: each file given, and the image files inside each folder given."""
    paths = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            paths.append(item)
    return paths


def output_stems(paths):
    """A distinct figure name per input: the file's stem, prefixed by its folder's name (and then
    numbered) where two inputs share a stem."""
    stems = [p.stem for p in paths]
    named = [f"{p.parent.name}_{p.stem}" if stems.count(p.stem) > 1 else p.stem for p in paths]
    return [n if named.count(n) == 1 else f"{n}_{named[:i].count(n) + 1}" for i, n in enumerate(named)]


def to_rgb8(img):
    """8-bit RGB from any PIL mode: 16/32-bit and float greyscale are rescaled, alpha goes on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 1.0 if img.mode == "F" and arr.max() <= 1 else (65535.0 if arr.max() > 255 else 255.0)
        img = Image.fromarray(np.clip(arr / top * 255, 0, 255).round().astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # glass, not black, behind H&E
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")
