"""data.py: PathMNIST (MedMNIST v2) as uint8 tensors, batch augmentation, and a synthetic stand-in.

    python data.py                      # download data/pathmnist.npz if missing, verify MD5, summarise
    python data.py --size 64            # the MedMNIST+ 64x64 file instead
    python data.py --synthetic          # write/summarise the offline SYNTHETIC dataset (not PathMNIST)

The real file comes from medmnist.INFO (URL and MD5). It is verified before every use, downloaded
only when missing, and never replaced silently. Each split is loaded once into uint8 tensors of shape
(N, 3, H, W); images become float [0, 1] only per batch. Normalisation is not done here: the model
holds the training-split mean/std (see model.py), so every tool feeds it plain [0, 1] pixels.

The synthetic dataset exists for offline runs and tests. It has PathMNIST's keys, dtypes and layout,
its class evidence sits inside a known rectangle per image (saved as `<split>_masks`), and it is named
synthetic wherever it appears. It is only used when asked for (--synthetic).
"""
import argparse
import contextlib
import csv
import importlib
import importlib.util
import io
import json
import os
import shutil
import socket
import sys
import types
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from progress import progress


def medmnist_module(name):
    """medmnist.<name> (info, evaluator), imported without running medmnist/__init__.py.

    That file imports every dataset class inside a bare `except:`, which swallows a Ctrl-C pressed
    while it runs (training then went on to the end), and it costs seconds. An empty package
    object lets Python import the submodules we use straight from their files.
    """
    if "medmnist" not in sys.modules:
        spec = importlib.util.find_spec("medmnist")
        package = types.ModuleType("medmnist")
        package.__path__, package.__spec__ = list(spec.submodule_search_locations), spec
        sys.modules["medmnist"] = package
    return importlib.import_module(f"medmnist.{name}")


FLAG = "pathmnist"
INFO = medmnist_module("info").INFO[FLAG]
CLASS_NAMES = [INFO["label"][str(i)] for i in range(len(INFO["label"]))]
SIZES = (28, 64, 128, 224)
SPLITS = ("train", "val", "test")
SYNTHETIC_COUNTS = {"train": 6000, "val": 1000, "test": 1000}
DOWNLOAD_TIMEOUT_S = 60  # Zenodo sometimes stalls (MedMNIST #21/#22); fail instead of hanging


class DataError(Exception):
    """Bad or missing data; the message is a paragraph meant for the user."""


@dataclass
class Split:
    images: torch.Tensor  # uint8 (N, 3, H, W)
    labels: torch.Tensor  # int64 (N,)
    masks: torch.Tensor | None = None  # bool (N, H, W): where the class evidence is (synthetic only)

    def __len__(self):
        return len(self.labels)


@dataclass
class Dataset:
    name: str
    size: int
    synthetic: bool
    path: str
    md5: str
    class_names: list
    train: Split
    val: Split
    test: Split

    def provenance(self):
        """What a checkpoint, DB row or plot records to say which data it came from."""
        return {"dataset": self.name, "size": self.size, "synthetic": self.synthetic,
                "file": os.path.basename(self.path), "md5": self.md5}


# ----------------------------------------------------------------------------- files

@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success rename it over `path`, on error delete it.

    A crash or Ctrl-C therefore never leaves half a file under the final name. The temporary name
    keeps the suffix so that savers which infer a format from it (matplotlib, np.savez) still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_csv(path, columns, rows):
    """Write dict rows as a CSV file with a header, atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def real_source(size):
    """(file name, URL, MD5) of the official PathMNIST file at this size."""
    check_size(size)
    suffix = "" if size == 28 else f"_{size}"
    return f"{FLAG}{suffix}.npz", INFO[f"url{suffix}"], INFO[f"MD5{suffix}"]


def synthetic_file_name(size):
    return f"{FLAG}_synthetic" + ("" if size == 28 else f"_{size}") + ".npz"


def check_size(size):
    if size not in SIZES:
        raise DataError(f"--size {size} is not available: PathMNIST comes in sizes {SIZES}.")


def manual_download_help(path, url, md5):
    return (f"Download it by hand and put it at {path}:\n"
            f"    URL: {url}\n    MD5: {md5}\n"
            f"(for example: curl -L -o {path} '{url}' && md5sum {path}). "
            f"To try the project offline instead, run the synthetic demo: make demo "
            f"(or python train.py --synthetic).")


# torchvision's download helpers, imported when first used: importing torchvision loads every model
# it has (a second), which `--help` and the synthetic data do not need.
def calculate_md5(path):
    from torchvision.datasets.utils import calculate_md5
    return calculate_md5(path)


def download_url(url, root, filename, md5):
    from torchvision.datasets.utils import download_url
    download_url(url, root, filename=filename, md5=md5)


def fetch(data_dir, size=28):
    """Path of a verified PathMNIST file, downloading it only if it is missing."""
    name, url, md5 = real_source(size)
    path = Path(data_dir) / name
    if not path.exists():
        download(url, path, md5)
    actual = verified_md5(path)
    if actual != md5:
        raise DataError(
            f"{path} has MD5 {actual}, but PathMNIST ({name}) has MD5 {md5}. The file is corrupt, "
            f"truncated or another version, so it is not used. Delete it and rerun to download it "
            f"again. " + manual_download_help(path, url, md5))
    return path


def download(url, path, md5):
    """Download to a partial file, check its MD5, then rename: a failed download leaves no file."""
    part = path.with_name(path.name + ".part")
    print(f"Downloading PathMNIST to {path} from {url}", file=sys.stderr)
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        download_url(url, str(path.parent), filename=part.name, md5=md5)
        if calculate_md5(part) != md5:
            raise OSError("the downloaded file's MD5 does not match")
        os.replace(part, path)
    except (OSError, RuntimeError, ValueError) as e:  # URLError and timeouts are OSErrors
        raise DataError(f"{path} is missing and downloading it failed ({e}). "
                        + manual_download_help(path, url, md5)) from e
    finally:
        socket.setdefaulttimeout(old_timeout)
        part.unlink(missing_ok=True)


def load(data_dir="data", size=28, synthetic=False, memory="auto"):
    """The dataset as uint8 tensors. Real PathMNIST unless `synthetic` is asked for explicitly.
    `memory` (auto, ram or map) says whether the images are read into memory or memory-mapped."""
    check_size(size)
    name = dataset_name(synthetic)
    if synthetic:
        path = Path(data_dir) / synthetic_file_name(size)
        if not path.exists():
            print(f"Writing the SYNTHETIC dataset (not PathMNIST) to {path}", file=sys.stderr)
            write_synthetic(path, size)
        class_names = [f"synthetic-{i}" for i in range(len(CLASS_NAMES))]
    else:
        path = fetch(data_dir, size)
        class_names = list(CLASS_NAMES)
    md5 = verified_md5(path)
    splits = read_npz(path, size, len(class_names), md5 if use_map(path, memory) else None)
    return Dataset(name=name, size=size, synthetic=synthetic, path=str(path), md5=md5,
                   class_names=class_names, **splits)


def dataset_name(synthetic):
    """'pathmnist', or 'pathmnist-synthetic' for the stand-in: the name provenance records."""
    return f"{FLAG}-synthetic" if synthetic else FLAG


def describe(provenance):
    """How plots and logs name a dataset; synthetic data always says so."""
    tag = f"{provenance['dataset']} {provenance['size']}x{provenance['size']}"
    return tag + " (SYNTHETIC data, not PathMNIST)" if provenance["synthetic"] else tag


def load_matching(provenance, data_dir="data", memory="auto"):
    """The dataset a checkpoint or DB run was made from, refusing a file with another MD5."""
    ds = load(data_dir, provenance["size"], provenance["synthetic"], memory)
    if ds.md5 != provenance["md5"]:
        raise DataError(
            f"{ds.path} has MD5 {ds.md5}, but the model was trained and explained on a file with MD5 "
            f"{provenance['md5']} ({provenance['file']}). Its metrics would not describe that model's "
            f"data. Point --data-dir at the original file, or retrain on this one.")
    return ds


def read_npz(path, size, n_classes, mapped_md5=None):
    """Validate a MedMNIST-format npz and return {split: Split}; any defect raises DataError.

    With `mapped_md5` (the file's verified MD5) the images are memory-mapped copies (mapped_images)
    instead of arrays in memory; labels and masks are small and always read into memory."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist.")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {s: read_split(npz, s, size, n_classes, path, mapped_md5) for s in SPLITS}
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as e:
        # numpy's reason for a non-npz file advises loading pickles, which we never pass on
        why = "not an npz archive" if "pickle" in str(e) else f"{type(e).__name__}: {e}"
        raise DataError(
            f"{path} could not be read as an npz archive ({why}). It is probably truncated by an "
            f"interrupted download or corrupt. Delete it and rerun.") from e


def read_split(npz, split, size, n_classes, path, mapped_md5=None):
    """One split as a Split, its images memory-mapped when `mapped_md5` is given (see read_npz)."""
    keys = [f"{split}_images", f"{split}_labels"]
    missing = [k for k in keys if k not in npz.files]
    if missing:
        raise DataError(f"{path} lacks {missing}; a MedMNIST npz has train/val/test _images and "
                        f"_labels (it has {sorted(npz.files)}). Is it the right file?")
    if mapped_md5 is not None:
        images = mapped_images(path, mapped_md5, split, size)
    else:
        pixels = npz[keys[0]]
        check_images(pixels.shape, pixels.dtype, keys[0], size, path)
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    labels = npz[keys[1]]
    if not np.issubdtype(labels.dtype, np.integer) or labels.shape not in ((len(images), 1), (len(images),)):
        raise DataError(f"{path}: {keys[1]} is {labels.dtype} {labels.shape}; expected integers of "
                        f"shape ({len(images)}, 1), one per image.")
    labels = labels.reshape(-1).astype(np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise DataError(f"{path}: {keys[1]} holds values from {labels.min()} to {labels.max()}; "
                        f"PathMNIST labels run from 0 to {n_classes - 1}.")
    masks = None
    if f"{split}_masks" in npz.files:
        masks = npz[f"{split}_masks"]
        expected = (len(images), *images.shape[2:])
        if masks.shape != expected:
            raise DataError(f"{path}: {split}_masks is {masks.shape}; expected {expected}.")
        masks = torch.from_numpy(masks.astype(bool))
    return Split(images, torch.from_numpy(labels), masks)


def check_images(shape, dtype, key, size, path):
    if dtype != np.uint8 or len(shape) != 4 or tuple(shape[1:]) != (size, size, 3):
        raise DataError(f"{path}: {key} is {dtype} {tuple(shape)}; expected uint8 "
                        f"(N, {size}, {size}, 3). Check --size matches the file.")


# ----------------------------------------------------------------------------- memory maps

MEMORY_MODES = ("auto", "ram", "map")
MAP_ABOVE_BYTES = 1 << 30  # auto: splits whose pixels add up to more than this are memory-mapped
CONVERT_CHUNK_BYTES = 32 << 20  # what converting an npz member holds in memory at a time
MEMORY_HELP = ("where the images live: ram (read into memory; fastest while it fits), map "
               "(memory-mapped copies under <data-dir>/.mapped, converted once; memory does not grow "
               "with the dataset) or auto (map above 1 GiB of pixels: PathMNIST at 64 px and up)")


def use_map(path, memory):
    """Whether to memory-map this npz's images: `memory` is auto, ram or map (see MEMORY_MODES).
    auto maps when the pixels exceed MAP_ABOVE_BYTES: in memory is faster while it fits (28 px
    PathMNIST is 0.25 GB), and a map keeps 64-224 px within a laptop's memory (224 px is 16 GB)."""
    if memory != "auto":
        return memory == "map"
    try:
        with zipfile.ZipFile(path) as zf:
            sizes = []
            for member in (f"{s}_images" for s in SPLITS if f"{s}_images.npy" in zf.namelist()):
                shape, _, f = member_header(zf, member)
                f.close()
                sizes.append(int(np.prod(shape)))
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError):
        return False  # read_npz then says what is wrong with the file
    return sum(sizes) > MAP_ABOVE_BYTES


def member_header(zf, member):
    """(shape, dtype, open file positioned at the data) of an array inside an open npz."""
    f = zf.open(f"{member}.npy")
    version = np.lib.format.read_magic(f)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, fortran_order, dtype = read_header(f)
    if fortran_order:
        raise DataError(f"{member} is stored in Fortran order, which MedMNIST files never are.")
    return shape, dtype, f


def mapped_images(npz_path, md5, split, size):
    """A split's images as a memory-mapped (N, 3, H, W) uint8 tensor.

    On first use the npz member is converted into an uncompressed .npy under
    <data dir>/.mapped/<file>-<md5>/, streamed a chunk at a time (so converting a 16 GB split
    needs CONVERT_CHUNK_BYTES, not 16 GB) and written atomically. The folder is keyed to the npz's
    verified MD5: a changed npz gets a new conversion, and the old one is deleted."""
    npz_path = Path(npz_path)
    folder = npz_path.parent / ".mapped" / f"{npz_path.stem}-{md5}"
    out = folder / f"{split}_images.npy"
    if not out.exists():
        for stale in folder.parent.glob(f"{npz_path.stem}-*"):
            if stale != folder:
                shutil.rmtree(stale, ignore_errors=True)
        convert_images(npz_path, f"{split}_images", out, size)
    # copy-on-write mode: a tensor torch can wrap without warnings, and the file is never written
    return torch.from_numpy(np.load(out, mmap_mode="c"))


def convert_images(npz_path, member, out, size):
    """Stream an (N, H, W, 3) member of an npz into an (N, 3, H, W) .npy file, chunk by chunk."""
    npz_path = Path(npz_path)
    with zipfile.ZipFile(npz_path) as zf:
        shape, dtype, f = member_header(zf, member)
        check_images(shape, dtype, member, size, npz_path)
        n, h, w, c = shape
        rows = max(1, CONVERT_CHUNK_BYTES // (h * w * c))
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                  "shape": (n, c, h, w)}
        with f, atomic_path(out) as tmp, open(tmp, "wb") as dest:
            np.lib.format.write_array_header_1_0(dest, header)
            for start in progress(range(0, n, rows), desc=f"mapping {npz_path.name} {member}", unit="chunk"):
                k = min(rows, n - start)
                chunk = np.frombuffer(f.read(k * h * w * c), np.uint8)
                if chunk.size != k * h * w * c:
                    raise DataError(f"{npz_path}: {member} ends early; the file is truncated. Delete it "
                                    f"and rerun.")
                dest.write(chunk.reshape(k, h, w, c).transpose(0, 3, 1, 2).tobytes())


# ----------------------------------------------------------------------------- file checks

def verified_md5(path):
    """The MD5 of a file, computed once: remembered in <folder>/.md5-cache.json with the file's size
    and modification time, and computed afresh whenever either changes (a 12 GB file takes a minute
    to hash)."""
    path = Path(path)
    stat = path.stat()
    seen = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    cache_path = path.parent / MD5_CACHE
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    entry = cache.get(path.name, {})
    if {k: entry.get(k) for k in seen} == seen and "md5" in entry:
        return entry["md5"]
    md5 = calculate_md5(path)
    cache[path.name] = {**seen, "md5": md5}
    try:
        with atomic_path(cache_path) as tmp:
            tmp.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")
    except OSError:
        pass  # a read-only data folder: the MD5 is computed again next time, nothing else changes
    return md5


MD5_CACHE = ".md5-cache.json"


# ----------------------------------------------------------------------------- batches

def to_unit(images):
    """uint8 images -> float32 in [0, 1] (what the model takes)."""
    return images.float().div_(255)


def channel_stats(images, chunk=8192):
    """Per-channel mean and std of uint8 (N, 3, H, W) images on the [0, 1] scale, in chunks."""
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    for i in range(0, len(images), chunk):
        x = to_unit(images[i:i + chunk]).double()
        total += x.sum(dim=(0, 2, 3))
        total_sq += x.pow(2).sum(dim=(0, 2, 3))
    n = len(images) * images.shape[2] * images.shape[3]
    mean = total / n
    std = (total_sq / n - mean ** 2).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()


def colour_features(images, chunk=8192):
    """Per image, the mean and standard deviation of each channel on the [0, 1] scale: (N, 2C)."""
    out = []
    for i in range(0, len(images), chunk):
        x = to_unit(images[i:i + chunk]).flatten(2)
        out.append(torch.cat([x.mean(2), x.std(2)], 1).double())
    return torch.cat(out)


COLOUR_PERCENTILE = 99  # share of validation images the colour check lets through


def colour_reference(train_images, val_images):
    """How far an image's colour statistics may lie from the training split's: the training
    features' mean and inverse covariance, and the 99th percentile of the validation images'
    Mahalanobis distances as the threshold. Stored in each checkpoint for explain.py's check."""
    feats = colour_features(train_images)
    mean = feats.mean(0)
    cov = torch.cov(feats.T) + 1e-8 * torch.eye(feats.shape[1], dtype=feats.dtype)  # never singular
    reference = {"mean": mean.tolist(), "cov_inv": torch.linalg.inv(cov).tolist(), "threshold": 0.0,
                 "percentile": COLOUR_PERCENTILE}
    reference["threshold"] = float(torch.quantile(colour_distance(reference, val_images),
                                                  COLOUR_PERCENTILE / 100))
    return reference


def colour_distance(reference, images):
    """Mahalanobis distance of each uint8 image's colour statistics from the training split's."""
    diff = colour_features(images) - torch.tensor(reference["mean"], dtype=torch.float64)
    return torch.einsum("ni,ij,nj->n", diff, torch.tensor(reference["cov_inv"], dtype=torch.float64), diff).sqrt()


def batches(split, batch_size, device="cpu", generator=None, colour=0.0):
    """Yield (float [0,1] images, labels) on `device`.

    With a `generator` the order is shuffled and each batch is augmented: a random one of the 8
    flips/rotations (tissue has no orientation) and, if `colour` > 0, stain/colour jitter.
    """
    n = len(split)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for i in range(0, n, batch_size):
        idx = order[i:i + batch_size]
        x = to_unit(split.images[idx].to(device, non_blocking=True))
        if generator is not None:
            x = random_dihedral(x, generator)
            if colour > 0:
                x = colour_jitter(x, generator, colour)
        yield x, split.labels[idx].to(device, non_blocking=True)


def dihedral(x, k):
    """The k-th (0..7) of the 8 flips/rotations of square images: rot90 k%4 times, then flip if k>=4."""
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return x.flip(-1) if k >= 4 else x


def random_dihedral(x, generator):
    """A random element of the dihedral group per image, from three random reflections.

    Transpose, vertical and horizontal flips generate all 8 symmetries of a square, so three masked
    selects cover the group exactly, without per-image Python loops.
    """
    def pick():
        return (torch.rand(len(x), generator=generator) < 0.5).view(-1, 1, 1, 1).to(x.device)
    x = torch.where(pick(), x.transpose(-2, -1), x)
    x = torch.where(pick(), x.flip(-2), x)
    return torch.where(pick(), x.flip(-1), x)


# Ruifrok & Johnston's H&E-DAB stain vectors (the ones skimage.color.rgb2hed uses).
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)


def colour_jitter(x, generator, strength=1.0):
    """Stain jitter in HED space, then per-channel RGB scale and shift.

    The test split comes from another clinical centre with a different stain; published results
    name colour shift as the main source of test errors (stroma read as smooth muscle). HED jitter
    (Tellez et al., 2019) varies haematoxylin and eosin amounts as a real stain does; the RGB
    scale/shift covers scanner colour balance. `strength` scales both ranges (1.0 = defaults).
    """
    b = len(x)

    def uniform(half_width, shape):
        u = torch.rand(shape, generator=generator) * 2 - 1
        return (u * half_width * strength).to(x.device)

    od = -torch.log(x.clamp_min(1e-6))                      # optical density per RGB channel
    hed = torch.einsum("bchw,cd->bdhw", od, HED_FROM_RGB.to(x.device))
    hed = hed * (1 + uniform(0.05, (b, 3, 1, 1))) + uniform(0.05, (b, 3, 1, 1))
    x = torch.exp(-torch.einsum("bchw,cd->bdhw", hed, RGB_FROM_HED.to(x.device)))
    x = x * (1 + uniform(0.1, (b, 3, 1, 1))) + uniform(0.05, (b, 3, 1, 1))
    return x.clamp_(0, 1)


# ----------------------------------------------------------------------------- synthetic data

# Nine classes as (colour, texture) pairs: colours repeat across classes and so do textures, so a
# model must use both, and both live only inside the evidence mask.
SYNTHETIC_COLOURS = np.array([[150, 60, 140], [205, 95, 125], [105, 45, 115], [235, 195, 215],
                              [175, 115, 180]], dtype=np.float32)
SYNTHETIC_CLASSES = [(0, 0), (1, 1), (2, 2), (3, 3), (4, 0), (0, 2), (1, 3), (2, 0), (4, 1)]
SYNTHETIC_TEST_STAIN = np.array([0.93, 1.0, 1.06], dtype=np.float32)  # the "other centre" shift


def write_synthetic(path, size=28, counts=None, seed=0):
    """Write a learnable, MedMNIST-format SYNTHETIC npz, with evidence masks, atomically."""
    counts = counts or SYNTHETIC_COUNTS
    rng = np.random.default_rng(seed)
    arrays = {}
    for split in progress(SPLITS, desc=f"writing SYNTHETIC data {path}", unit="split"):
        images, labels, masks = synthetic_split(rng, counts[split], size, shifted=(split == "test"))
        arrays.update({f"{split}_images": images, f"{split}_labels": labels, f"{split}_masks": masks})
    with atomic_path(path) as tmp:
        np.savez_compressed(tmp, **arrays)


def synthetic_split(rng, n, size, shifted=False):
    labels = rng.integers(0, len(SYNTHETIC_CLASSES), size=n)
    py, px = np.mgrid[0:size, 0:size]
    yy, xx = py * (28 / size), px * (28 / size)  # texture coordinates: patterns scale with size
    # Textures have no fixed orientation (neither has tissue, and training rotates images), so
    # stripes run across or down at random; the class is told by their spacing.
    across = rng.random(n)[:, None, None] < 0.5
    coord = np.where(across, yy[None], xx[None])
    textures = np.stack([np.sin(2 * np.pi * coord / 3.5),                             # fine stripes
                         np.sin(2 * np.pi * coord / 7.0),                             # coarse stripes
                         np.broadcast_to(np.sin(np.pi * xx / 2) * np.sin(np.pi * yy / 2), coord.shape),  # dots
                         np.zeros_like(coord)], axis=1)                               # flat
    # Class-independent background: pinkish tissue with smooth blotches and pixel noise.
    blotches = rng.normal(0, 18, size=(n, 3, 4, 4)).astype(np.float32)
    blotches = torch.nn.functional.interpolate(torch.from_numpy(blotches), size=(size, size),
                                               mode="bicubic", align_corners=False).numpy()
    base = np.array([225, 165, 195], np.float32) + rng.normal(0, 10, (n, 3))
    images = base[:, :, None, None] + blotches
    # The evidence: a rectangle covering roughly 15-35% of the image.
    h = rng.integers(int(0.4 * size), int(0.6 * size) + 1, n)[:, None, None]
    w = rng.integers(int(0.4 * size), int(0.6 * size) + 1, n)[:, None, None]
    top, left = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
    masks = (py >= top) & (py < top + h) & (px >= left) & (px < left + w)
    colour_idx, texture_idx = np.array(SYNTHETIC_CLASSES)[labels].T
    colour = SYNTHETIC_COLOURS[colour_idx] + rng.normal(0, 10, (n, 3))
    evidence = colour[:, :, None, None] + 35 * textures[np.arange(n), texture_idx][:, None]
    images = np.where(masks[:, None], evidence, images) + rng.normal(0, 12, (n, 3, size, size))
    if shifted:
        images = images * SYNTHETIC_TEST_STAIN[None, :, None, None]
    images = np.clip(images, 0, 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
    return images, labels.reshape(-1, 1), masks.astype(np.uint8)


# ----------------------------------------------------------------------------- CLI

def main(argv=None):
    p = argparse.ArgumentParser(description="Fetch, verify and summarise PathMNIST (or write the "
                                "synthetic stand-in).")
    p.add_argument("--data-dir", default="data", help="folder holding the npz files (default: data)")
    p.add_argument("--size", type=int, default=28, choices=SIZES, help="image size: 28 (MedMNIST v2) "
                   "or 64/128/224 (MedMNIST+) (default: 28)")
    p.add_argument("--synthetic", action="store_true", help="use the offline SYNTHETIC dataset, not "
                   "PathMNIST (written on first use)")
    p.add_argument("--memory", default="auto", choices=MEMORY_MODES, help=MEMORY_HELP + " (default: "
                   "auto; `--memory map` converts the file now)")
    args = p.parse_args(argv)
    try:
        ds = load(args.data_dir, args.size, args.synthetic, args.memory)
    except DataError as e:
        sys.exit(f"error: {e}")
    print(f"{ds.name} {ds.size}x{ds.size}  file {ds.path}  MD5 {ds.md5}")
    for s in SPLITS:
        split = getattr(ds, s)
        counts = torch.bincount(split.labels, minlength=len(ds.class_names)).tolist()
        print(f"  {s:5s} {len(split):6d} images  per class {counts}")
    mean, std = channel_stats(ds.train.images)
    print(f"  train mean {[round(m, 4) for m in mean]}  std {[round(s, 4) for s in std]}")


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # each line reaches a piped log when printed
    main()
