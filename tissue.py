"""tissue.py: which tiles of a slide hold tissue, from its thumbnail, as CLAM and histolab find it.

    thumb, mask, shares = tissue.masked(slide, grid)       # the thumbnail, its mask, tissue share per tile
    corners = tissue.kept(grid.corners(), shares, 0.5, all_tiles=False)   # the tiles to classify

H&E stains tissue; glass and the slide's white background are unsaturated. As CLAM does, the mask
thresholds each pixel's saturation (HSV), median-blurred, on the thumbnail shrunk to MASK_PX pixels a
tile (at full detail the pale gaps inside loose stroma would count as glass, and a tile of tissue
with them). The threshold is scikit-image's threshold_li (Li's minimum cross-entropy), not Otsu's
(CLAM's option): glass is one narrow peak and tissue a broad spread, and Otsu's threshold falls
inside the spread. On the tests' known-truth slide (47.9% tissue) Otsu kept 44.5% of the pixels and
dropped pale tissue tiles, Li 47.6%. A floor keeps a blank slide, whose saturation is all noise,
from being split in two. A tile is tissue when at least slide.py's --min-tissue of its area is.
"""
import numpy as np
from PIL import Image, ImageFilter

import wsi

THUMBNAIL_PX = 2048  # longest side of the thumbnail the mask (and slide.py's overlay) is drawn from
MASK_PX = 16  # mask pixels per tile side
BLUR = 5  # px of the median filter on the mask's saturation (CLAM: 7, at a coarser level)
FLOOR = 8  # lowest saturation (0..255) the threshold may take (CLAM's fixed sthresh)


def masked(slide, grid):
    """(the slide's thumbnail, its tissue mask, each tile's tissue share as (rows, columns))."""
    thumb = wsi.thumbnail(slide, THUMBNAIL_PX)
    mask = tissue_mask(thumb, grid)
    return thumb, mask, tile_shares(mask, grid, slide.size)


def kept(corners, shares, min_tissue, all_tiles):
    """The corners of the tiles to classify: those at least `min_tissue` tissue, or with all_tiles all."""
    return [c for c, s in zip(corners, shares.ravel(), strict=True) if all_tiles or s >= min_tissue]


def tissue_mask(thumb, grid):
    """bool (H, W): the PIL RGB thumbnail, shrunk to MASK_PX pixels per tile of `grid` (never
    enlarged), and its pixels whose blurred saturation is above Li's threshold."""
    from skimage.filters import threshold_li
    scale = min(1.0, MASK_PX * max(grid.columns, grid.rows) / max(thumb.size))
    small = thumb.resize((max(1, round(thumb.width * scale)), max(1, round(thumb.height * scale))),
                         Image.Resampling.BOX)
    saturation = np.asarray(small.convert("HSV").getchannel("S").filter(ImageFilter.MedianFilter(BLUR)))
    threshold = threshold_li(saturation) if saturation.min() < saturation.max() else 255
    return saturation > max(FLOOR, threshold)


def tile_shares(mask, grid, slide_size):
    """(rows, columns) float: the share of each tile's square that the mask covers, the mask being a
    thumbnail of the slide of level-0 size `slide_size`."""
    h, w = mask.shape
    sx, sy = w / slide_size[0], h / slide_size[1]
    # a summed-area table: any tile's mask count in four lookups, whatever the tile's size in the thumbnail
    table = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    shares = np.zeros((grid.rows, grid.columns))
    for r in range(grid.rows):
        y0, y1 = edges(r, grid.side, sy, h)
        for c in range(grid.columns):
            x0, x1 = edges(c, grid.side, sx, w)
            area = (y1 - y0) * (x1 - x0)
            shares[r, c] = (table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]) / area
    return shares


def edges(i, side, scale, limit):
    """Thumbnail pixel range [a, b) of tile i (level-0 px `side` a tile), at least one pixel wide."""
    a = min(int(i * side * scale), limit - 1)
    return a, max(a + 1, min(int(round((i + 1) * side * scale)), limit))


def mask_picture(mask):
    """The mask as a black-on-white PIL image (tissue black), for the outputs."""
    return Image.fromarray(np.where(mask, 0, 255).astype(np.uint8), "L")
