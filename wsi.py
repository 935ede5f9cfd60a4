"""wsi.py: whole-slide images as the model sees its training tiles: 112 um squares at the right scale.

    s = wsi.open_slide("slide.svs")                   # OpenSlide formats (.svs, .ndpi, .mrxs, tiled TIFF ...)
    s = wsi.open_slide("core.ome.tif", mpp=0.5)       # OME-TIFF, PNG, JPEG, plain TIFF: read whole, um/px given
    grid = wsi.tile_grid(s, size=28)                  # the level read, its reason, every tile's level-0 corner
    image = wsi.read_tile(s, grid, x, y)              # uint8 (size, size, 3), resized as tiles.py resizes

PathMNIST's images are 224 x 224 px tiles at 0.5 um/px (TILE_UM = 112 um of tissue a side), shrunk to
the dataset's size. A slide's tile therefore covers 112 um whatever its scanner's um/px, and the model
is given it at its own size: read at the coarsest pyramid level whose um/px is still at least as fine
as the model needs (112 / size um/px: 4 um/px at 28 px), then resized with antialiased bicubic, as
tiles.py and MedMNIST's own resizing do. Reading a level finer than needed and shrinking costs time,
never detail; reading a coarser one would invent it, so it is never chosen while a finer one exists.

Formats: OpenSlide (openslide-python with the openslide-bin wheel: no system install) reads every
format it knows tile by tile, so memory does not grow with the slide. Files it does not open (an
OME-TIFF, PNG, JPEG, a strip TIFF) are read whole with tifffile or Pillow, PIL's decompression-bomb
limit lifted for this reader only; they must fit in memory. The scale comes from the slide's header
(OpenSlide's openslide.mpp-x, or OME's PhysicalSizeX); `mpp` overrides it, and a slide with neither is
refused, since a guessed scale would make every tile the wrong size of tissue.
"""
import math
import xml.etree.ElementTree as ET
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

import cli

TILE_UM = 112.0  # PathMNIST: 224 px at 0.5 um/px
OME_UNITS_UM = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4}


class SlideError(cli.UserError):
    """A slide that cannot be read, or mapped at a known scale; the message says what to do."""


@dataclass(frozen=True)
class Slide:
    """An opened slide: its level-0 size, um/px and where that came from, its pyramid (downsample
    and size per level) and the reader behind it (openslide.OpenSlide, or the whole image in memory)."""
    path: Path
    size: tuple  # (width, height) at level 0, px
    mpp: float  # um per level-0 pixel
    mpp_source: str  # "header" or "--mpp"
    downsamples: tuple  # per level, level 0 first
    level_sizes: tuple  # (width, height) per level
    reader: object  # openslide.OpenSlide, or a PIL RGB image (the whole slide)
    format: str  # OpenSlide's vendor name ("aperio", "generic-tiff" ...), or "ome-tiff", "image"


@dataclass(frozen=True)
class Grid:
    """The tiles of a slide: `side` level-0 px each (TILE_UM of tissue), read at `level` as `read_side`
    px and resized to the model's `size`; corners (x, y) at level 0, row by row."""
    side: int  # level-0 px per tile side
    level: int
    read_side: int  # px per tile side at `level`
    size: int  # the model's input side
    columns: int
    rows: int
    why: str  # the level choice, in words, for the outputs

    def corners(self):
        return [(c * self.side, r * self.side) for r in range(self.rows) for c in range(self.columns)]

    def index(self, x, y):
        """The tile's place in corners()."""
        return (y // self.side) * self.columns + x // self.side

    def corner(self, index):
        row, column = divmod(index, self.columns)
        return column * self.side, row * self.side


def open_slide(path, mpp=None):
    """The Slide at `path`: OpenSlide where it knows the format, else tifffile (OME-TIFF) or Pillow."""
    path = Path(path)
    if not path.is_file():
        raise SlideError(f"{path} does not exist. Give the path of a slide file (.svs, .ndpi, .mrxs, .tif ...).")
    import openslide
    try:
        vendor = openslide.OpenSlide.detect_format(str(path))
    except openslide.OpenSlideError:
        vendor = None
    if vendor and not path.name.lower().endswith((".ome.tif", ".ome.tiff")):
        return open_with_openslide(path, vendor, mpp)
    return open_whole(path, mpp)


def open_with_openslide(path, vendor, mpp):
    import openslide
    try:
        reader = openslide.OpenSlide(str(path))
        header = reader.properties.get(openslide.PROPERTY_NAME_MPP_X)
        reader.read_region((0, 0), reader.level_count - 1, (1, 1))  # a truncated file fails here, not mid-map
    except (openslide.OpenSlideError, OSError) as e:
        raise SlideError(corrupt(path, e)) from e
    return Slide(path, reader.dimensions, *scale(path, header and float(header), mpp),
                 tuple(float(d) for d in reader.level_downsamples), tuple(reader.level_dimensions), reader, vendor)


def open_whole(path, mpp):
    """A file OpenSlide does not open, read whole: OME-TIFF and plain TIFF through tifffile (its
    OME-XML gives the scale), PNG/JPEG through Pillow (and TIFFs whose codec tifffile lacks:
    Pillow's libtiff decodes JPEG, LZW and deflate tiles itself)."""
    header, fmt = None, "image"
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile
            with tifffile.TiffFile(path) as tif:
                if tif.is_ome:
                    header, fmt = ome_mpp(tif.ome_metadata), "ome-tiff"
                image = tiff_pixels(path, tif)
        else:
            image = pillow_pixels(path)
    except (OSError, ValueError, KeyError, IndexError, SyntaxError, ET.ParseError) as e:
        raise SlideError(unsupported(path, e)) from e
    return Slide(path, image.size, *scale(path, header, mpp), (1.0,), (image.size,), image, fmt)


def tiff_pixels(path, tif):
    """The first image of a TIFF as PIL RGB; a file whose header reads but whose pixels do not is
    damaged, not of another format."""
    try:
        return Image.fromarray(as_rgb(tif.series[0].levels[0].asarray()))
    except ValueError as e:
        if "imagecodecs" not in str(e):
            raise SlideError(corrupt(path, e)) from e
        return pillow_pixels(path)
    except (OSError, zlib.error, IndexError) as e:
        raise SlideError(corrupt(path, e)) from e


def pillow_pixels(path):
    """An image file as PIL RGB, PIL's decompression-bomb limit lifted: a slide's export is meant to be big."""
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(path) as img:
            img.seek(0)
            return img.convert("RGB")
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def as_rgb(pixels):
    """tifffile's array as uint8 (H, W, 3): channels last (an OME file may store them first), 16-bit
    scaled down, greyscale repeated."""
    a = np.asarray(pixels)
    if a.ndim == 3 and a.shape[0] in (3, 4) and a.shape[2] not in (3, 4):
        a = np.moveaxis(a, 0, 2)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, 2)
    if a.dtype != np.uint8:
        a = (a.astype(np.float64) / max(1.0, float(np.iinfo(a.dtype).max if a.dtype.kind in "ui" else a.max())) * 255)
        a = np.clip(a.round(), 0, 255).astype(np.uint8)
    if a.ndim != 3 or a.shape[2] < 3:
        raise ValueError(f"pixels of shape {a.shape}, not an RGB image")
    return np.ascontiguousarray(a[..., :3])


def ome_mpp(xml):
    """um/px from OME-XML's first Pixels element (PhysicalSizeX in PhysicalSizeXUnit, um by default)."""
    for element in ET.fromstring(xml).iter():
        if element.tag.endswith("Pixels") and element.get("PhysicalSizeX"):
            unit = OME_UNITS_UM.get(element.get("PhysicalSizeXUnit", "µm"), math.nan)
            return float(element.get("PhysicalSizeX")) * unit
    return None


def scale(path, header, mpp):
    """(um/px, where it came from): --mpp over the header; neither is an error."""
    if mpp is not None:
        if not mpp > 0:
            raise SlideError(f"--mpp {mpp} is not a scale: give the slide's microns per pixel at full "
                             f"resolution, e.g. 0.25 (40x) or 0.5 (20x).")
        return float(mpp), "--mpp"
    if header and math.isfinite(header) and header > 0:
        return header, "header"
    raise SlideError(f"{path} does not say its scale (no microns per pixel in its header), so its tiles cannot be "
                     f"cut to the {TILE_UM:g} um the model was trained on. Pass --mpp with the scanner's value "
                     f"at full resolution (often 0.25 at 40x, 0.5 at 20x); the scanner's software or the slide's "
                     f"provider says which.")


def tile_grid(slide, size):
    """The Grid that cuts `slide` into TILE_UM squares for a model taking `size` px."""
    side = round(TILE_UM / slide.mpp)
    columns, rows = slide.size[0] // side, slide.size[1] // side
    if columns == 0 or rows == 0:
        raise SlideError(f"{slide.path} is {slide.size[0]} x {slide.size[1]} px at {slide.mpp:g} um/px, smaller than "
                         f"one {TILE_UM:g} um tile ({side} px a side): there is nothing to map. Check --mpp, or "
                         f"pass a larger image.")
    level, why = choose_level(slide, size)
    read_side = max(1, round(side / slide.downsamples[level]))
    return Grid(side, level, read_side, size, columns, rows, why)


def choose_level(slide, size):
    """(level, why): the coarsest level whose um/px is at most what `size` px per TILE_UM needs."""
    needed = TILE_UM / size
    fine = [i for i, d in enumerate(slide.downsamples) if slide.mpp * d <= needed * (1 + 1e-3)]
    level = max(fine, key=lambda i: slide.downsamples[i]) if fine else 0
    at = slide.mpp * slide.downsamples[level]
    why = (f"level {level} of {len(slide.downsamples)} ({at:.3g} um/px, {slide.mpp_source}): the coarsest at "
           f"least as fine as the {needed:.3g} um/px a {size} px model needs")
    if not fine:
        why = (f"level 0 ({at:.3g} um/px, {slide.mpp_source}), coarser than the {needed:.3g} um/px a {size} px "
               f"model needs: tiles are upsampled, so the model sees less detail than it was trained on")
    return level, why


def read_tile(slide, grid, x, y):
    """The tile with level-0 corner (x, y) as uint8 (size, size, 3): read at grid.level, transparent
    pixels on white (glass), resized with antialiased bicubic as tiles.py resizes files."""
    region = read_region(slide, (x, y), grid.level, grid.read_side, grid.side)
    if region.size != (grid.size, grid.size):
        region = region.resize((grid.size, grid.size), Image.Resampling.BICUBIC, reducing_gap=None)
    return np.asarray(region, dtype=np.uint8)


def read_tiles(slide, grid, corners):
    """uint8 (N, size, size, 3): the tiles at level-0 `corners`, as the model takes them (read_tile)."""
    return np.stack([read_tile(slide, grid, x, y) for x, y in corners])


def read_region(slide, corner, level, read_side, side):
    """A square of `read_side` px at `level` with level-0 corner `corner` (covering `side` level-0 px), as RGB."""
    if isinstance(slide.reader, Image.Image):
        x, y = corner
        return slide.reader.crop((x, y, x + side, y + side))
    import openslide
    try:
        rgba = slide.reader.read_region(corner, level, (read_side, read_side))
    except openslide.OpenSlideError as e:
        raise SlideError(corrupt(slide.path, e)) from e
    # transparent where nothing was scanned: white, as glass looks
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def thumbnail(slide, longest):
    """The whole slide as an RGB image at most `longest` px on its longer side (glass white)."""
    scale_ = longest / max(slide.size)
    target = (max(1, round(slide.size[0] * scale_)), max(1, round(slide.size[1] * scale_)))
    if isinstance(slide.reader, Image.Image):
        return slide.reader.resize(target, Image.Resampling.BILINEAR, reducing_gap=2.0)
    import openslide
    try:
        return slide.reader.get_thumbnail(target).convert("RGB")  # OpenSlide composites it on the background
    except openslide.OpenSlideError as e:
        raise SlideError(corrupt(slide.path, e)) from e


def corrupt(path, error):
    return (f"{path} could not be read as a slide ({error}): the file is truncated or damaged. Copy it again "
            f"from its source (compare its size or checksum with the original) and rerun.")


def unsupported(path, error):
    return (f"{path} is not a slide format this script reads ({type(error).__name__}: {error}). It reads what "
            f"OpenSlide reads (Aperio .svs, Hamamatsu .ndpi, MIRAX .mrxs, Leica .scn, tiled pyramidal TIFF ...), "
            f"OME-TIFF, and PNG/JPEG/TIFF images; convert other formats to pyramidal TIFF or OME-TIFF first "
            f"(e.g. with QuPath or bfconvert).")
