"""data.py: a MedMNIST 2D dataset (PathMNIST first) as uint8 tensors, fetched, verified and batched.

    python data.py                      # download data/pathmnist.npz if missing, verify MD5, summarise
    python data.py --flag bloodmnist    # any MedMNIST 2D dataset (python data.py --help lists them)
    python data.py --size 64            # the MedMNIST+ 64x64 file instead
    python data.py --synthetic          # write/summarise the offline SYNTHETIC dataset (not PathMNIST)

What each dataset is (files, URLs, MD5s, classes, task) comes from medmnist.INFO (datasets.py). A real
file is verified against INFO's MD5 before use (remembered per file, see verified_md5), downloaded
only when missing, and never replaced silently; --trust-file accepts a re-saved copy and marks
everything made from it "unverified file". Each split is loaded once into uint8 tensors of shape
(N, C, H, W), in memory or memory-mapped (--memory); images become float [0, 1] only per batch.
Normalisation is not done here: the model holds the training-split mean/std (model.py), so every
tool feeds it plain [0, 1] pixels. Labels are int64 (N,) for single-label tasks and (N, L) 0/1 for
multi-label ones. Derived files (MD5s, memory maps) go to the cache folder (cache_dir), never beside
the data. Augmentation is augment.py's; the synthetic stand-in is synthetic.py's, used only when asked
for (--synthetic).
"""
import argparse
import json
import os
import shutil
import socket
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import augment
import cli
import formats
from colour import channel_stats, to_unit
from datasets import (
    FLAG,
    FLAG_HELP,
    MULTI_LABEL,
    SIZES,
    SPLITS,
    TRUST_FILE_HELP,
    DataError,
    check_size,
    class_names_of,
    dataset_name,
    describe,
    flag_arg,
    flag_info,
    real_source,
    synthetic_file_name,
    title_of,
)
from files import atomic_path
from progress import progress
from synthetic import write_synthetic

DOWNLOAD_TIMEOUT_S = 60  # Zenodo sometimes stalls (MedMNIST #21/#22); fail instead of hanging


@dataclass
class Split:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,), or (N, L) of 0/1 for a multi-label task
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
    flag: str = FLAG
    task: str = "multi-class"
    channels: int = 3
    verified: bool = True  # False: a real file used with --trust-file despite another MD5

    def provenance(self):
        """What a checkpoint, DB row or plot records to say which data it came from."""
        return {"dataset": self.name, "flag": self.flag, "size": self.size, "synthetic": self.synthetic,
                "file": os.path.basename(self.path), "md5": self.md5, "verified": self.verified}


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


def fetch(data_dir, size=28, flag=FLAG, trust_file=False):
    """Path of a verified MedMNIST file, downloading it only if it is missing. With `trust_file` a
    file whose MD5 differs is used anyway, with a warning (load() records it as unverified)."""
    name, url, md5 = real_source(size, flag)
    path = Path(data_dir) / name
    if not path.exists():
        download(url, path, md5)
    actual = verified_md5(path)
    if actual != md5 and trust_file:
        print(f"warning: {path} has MD5 {actual}, not {title_of(flag)}'s {md5}; used anyway "
              f"(--trust-file). Everything made from it is marked 'unverified file'.", file=sys.stderr)
    elif actual != md5:
        raise DataError(
            f"{path} has MD5 {actual}, but {title_of(flag)} ({name}) has MD5 {md5}. The file is corrupt, "
            f"truncated or another version, so it is not used. Delete it and rerun to download it "
            f"again; or, if it is a re-saved copy of the same arrays, pass --trust-file. "
            + manual_download_help(path, url, md5))
    return path


def download(url, path, md5):
    """Download to a partial file, check its MD5, then rename: a failed download leaves no file."""
    part = path.with_name(path.name + ".part")
    print(f"Downloading {path.name} to {path} from {url}", file=sys.stderr)
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


def load(data_dir="data", size=28, synthetic=False, memory="auto", flag=FLAG, trust_file=False):
    """The dataset `flag` as uint8 tensors: the real file unless `synthetic` is asked for explicitly.
    `memory` (auto, ram or map) says whether the images are read into memory or memory-mapped;
    `trust_file` accepts a real file whose MD5 is not medmnist.INFO's (see fetch)."""
    info = flag_info(flag)
    check_size(size)
    name = dataset_name(synthetic, flag)
    if synthetic:
        path = Path(data_dir) / synthetic_file_name(size, flag)
        if not path.exists():
            print(f"Writing the SYNTHETIC dataset (not {title_of(flag)}) to {path}", file=sys.stderr)
            write_synthetic(path, size, flag=flag)
        class_names = [f"synthetic-{i}" for i in range(len(info["label"]))]
    else:
        path = fetch(data_dir, size, flag, trust_file)
        class_names = class_names_of(flag)
    md5 = verified_md5(path)
    splits = read_npz(path, size, len(class_names), md5 if use_map(path, memory) else None,
                      channels=info["n_channels"], multi_label=info["task"] == MULTI_LABEL)
    return Dataset(name=name, size=size, synthetic=synthetic, path=str(path), md5=md5,
                   class_names=class_names, flag=flag, task=info["task"], channels=info["n_channels"],
                   verified=synthetic or md5 == real_source(size, flag)[2], **splits)


def load_matching(provenance, data_dir="data", memory="auto"):
    """The dataset a checkpoint or DB run was made from, refusing a file with another MD5. A model
    trained with --trust-file is matched to the same unverified file, by its MD5."""
    ds = load(data_dir, provenance["size"], provenance["synthetic"], memory,
              flag=provenance["flag"], trust_file=not provenance["verified"])
    if ds.md5 != provenance["md5"]:
        raise DataError(
            f"{ds.path} has MD5 {ds.md5}, but the model was trained and explained on a file with MD5 "
            f"{provenance['md5']} ({provenance['file']}). Its metrics would not describe that model's "
            f"data. Point --data-dir at the original file, or retrain on this one.")
    return ds


def read_npz(path, size, n_classes, mapped_md5=None, channels=3, multi_label=False):
    """Validate a MedMNIST-format npz and return {split: Split}; any defect raises DataError.

    `channels` is 3 (images (N, H, W, 3)) or 1 (images (N, H, W), as MedMNIST stores grayscale);
    `multi_label` labels are (N, n_classes) of 0/1. With `mapped_md5` (the file's verified MD5) the
    images are memory-mapped copies (mapped_images) instead of arrays in memory; labels and masks are
    small and always read into memory."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist.")
    shape = ImageShape(size, channels)
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {s: read_split(npz, s, shape, n_classes, path, mapped_md5, multi_label) for s in SPLITS}
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as e:
        # numpy's reason for a non-npz file advises loading pickles, which we never pass on
        why = "not an npz archive" if "pickle" in str(e) else f"{type(e).__name__}: {e}"
        raise DataError(
            f"{path} could not be read as an npz archive ({why}). It is probably truncated by an "
            f"interrupted download or corrupt. Delete it and rerun.") from e


@dataclass(frozen=True)
class ImageShape:
    """What a split's images must be: size x size pixels with this many channels."""
    size: int
    channels: int


def read_split(npz, split, shape, n_classes, path, mapped_md5=None, multi_label=False):
    """One split as a Split, its images memory-mapped when `mapped_md5` is given (see read_npz)."""
    keys = [f"{split}_images", f"{split}_labels"]
    missing = [k for k in keys if k not in npz.files]
    if missing:
        raise DataError(f"{path} lacks {missing}; a MedMNIST npz has train/val/test _images and "
                        f"_labels (it has {sorted(npz.files)}). Is it the right file?")
    if mapped_md5 is not None:
        images = mapped_images(path, mapped_md5, split, shape)
    else:
        pixels = npz[keys[0]]
        check_images(pixels.shape, pixels.dtype, keys[0], shape, path)
        images = torch.from_numpy(pixels.reshape(*pixels.shape[:3], -1)).permute(0, 3, 1, 2).contiguous()
    labels = read_labels(npz[keys[1]], keys[1], len(images), n_classes, multi_label, path)
    masks = None
    if f"{split}_masks" in npz.files:
        masks = npz[f"{split}_masks"]
        expected = (len(images), *images.shape[2:])
        if masks.shape != expected:
            raise DataError(f"{path}: {split}_masks is {masks.shape}; expected {expected}.")
        masks = torch.from_numpy(masks.astype(bool))
    return Split(images, torch.from_numpy(labels), masks)


def read_labels(labels, key, n, n_classes, multi_label, path):
    """Checked int64 labels: (n,) class indices, or (n, n_classes) of 0/1 for a multi-label task."""
    expected = [(n, n_classes)] if multi_label else [(n, 1), (n,)]
    if not np.issubdtype(labels.dtype, np.integer) or labels.shape not in expected:
        what = f"0/1 of shape ({n}, {n_classes}), one row of labels" if multi_label else \
            f"integers of shape ({n}, 1), one"
        raise DataError(f"{path}: {key} is {labels.dtype} {labels.shape}; expected {what} per image. "
                        f"Is it a file for another --flag?")
    labels = labels.astype(np.int64) if multi_label else labels.reshape(-1).astype(np.int64)
    top = 1 if multi_label else n_classes - 1
    if len(labels) and (labels.min() < 0 or labels.max() > top):
        raise DataError(f"{path}: {key} holds values from {labels.min()} to {labels.max()}; this "
                        f"dataset's labels run from 0 to {top}. Is it a file for another --flag?")
    return labels


def check_images(shape, dtype, key, expected, path):
    """Refuse images that are not uint8 (N, size, size[, channels]) as MedMNIST stores them."""
    size, c = expected.size, expected.channels
    ok_shapes = [(size, size, c)] + ([(size, size)] if c == 1 else [])
    if dtype != np.uint8 or tuple(shape[1:]) not in ok_shapes:
        want = f"(N, {size}, {size})" if c == 1 else f"(N, {size}, {size}, {c})"
        raise DataError(f"{path}: {key} is {dtype} {tuple(shape)}; expected uint8 {want} ({c} "
                        f"channel{'s' if c > 1 else ''}). Check that --flag and --size match the file.")


# ----------------------------------------------------------------------------- memory maps

MEMORY_MODES = ("auto", "ram", "map")
MAP_ABOVE_BYTES = 1 << 30  # auto: splits whose pixels add up to more than this are memory-mapped
CONVERT_CHUNK_BYTES = 32 << 20  # what converting an npz member holds in memory at a time
MEMORY_HELP = ("where the images live: ram (read into memory; fastest while it fits), map "
               "(memory-mapped copies in the cache folder, $PATHMNIST_XAI_CACHE or ~/.cache/pathmnist-xai, "
               "converted once; memory does not grow "
               "with the dataset) or auto (map above 1 GiB of pixels: PathMNIST at 64 px and up)")


def add_memory_flag(p):
    """--memory, for the scripts that read a dataset."""
    p.add_argument("--memory", default="auto", choices=MEMORY_MODES, help=MEMORY_HELP)


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


def mapped_images(npz_path, md5, split, shape):
    """A split's images as a memory-mapped (N, C, H, W) uint8 tensor.

    On first use the npz member is converted into an uncompressed .npy under
    <cache_dir>/mapped/<file>-<md5>/, streamed a chunk at a time (so converting a 16 GB split
    needs CONVERT_CHUNK_BYTES, not 16 GB) and written atomically; nothing is written beside the npz.
    The folder is keyed to the npz's verified MD5: a changed npz gets a new conversion, and the old
    conversion of the same file (named in its `source` file) is deleted."""
    npz_path = Path(npz_path).resolve()
    folder = mapped_folder(npz_path, md5)
    out = folder / f"{split}_images.npy"
    if not out.exists():
        for stale in folder.parent.glob(f"{npz_path.stem}-*"):
            if stale != folder and (stale / "source").is_file() and (stale / "source").read_text() == str(npz_path):
                shutil.rmtree(stale, ignore_errors=True)
        convert_images(npz_path, f"{split}_images", out, shape)
        (folder / "source").write_text(str(npz_path))
    # copy-on-write mode: a tensor torch can wrap without warnings, and the file is never written
    return torch.from_numpy(np.load(out, mmap_mode="c"))


def mapped_folder(npz_path, md5):
    """The cache folder of an npz's memory-mapped conversions."""
    return cache_dir() / "mapped" / f"{Path(npz_path).stem}-{md5}"


def convert_images(npz_path, member, out, expected):
    """Stream an (N, H, W[, C]) member of an npz into an (N, C, H, W) .npy file, chunk by chunk."""
    npz_path = Path(npz_path)
    with zipfile.ZipFile(npz_path) as zf:
        shape, dtype, f = member_header(zf, member)
        check_images(shape, dtype, member, expected, npz_path)
        n, h, w = shape[:3]
        c = shape[3] if len(shape) == 4 else 1
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

CACHE_ENV = "PATHMNIST_XAI_CACHE"


def cache_dir():
    """Where derived files go (data files' MD5s, memory-mapped conversions): $PATHMNIST_XAI_CACHE,
    else $XDG_CACHE_HOME/pathmnist-xai, else ~/.cache/pathmnist-xai. Never beside the data, which may
    be read-only or shared (the real-data folder is both)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pathmnist-xai"


def verified_md5(path):
    """The MD5 of a file, computed once: remembered in <cache_dir>/md5.json under the file's absolute
    path with its size and modification time, and computed afresh whenever either changes (a 12 GB
    file takes a minute to hash)."""
    path = Path(path).resolve()
    stat = path.stat()
    seen = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    cache_path = cache_dir() / MD5_CACHE
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    entry = cache.get(str(path), {})
    if {k: entry.get(k) for k in seen} == seen and "md5" in entry:
        return entry["md5"]
    md5 = calculate_md5(path)
    cache[str(path)] = {**seen, "md5": md5}
    try:
        with atomic_path(cache_path) as tmp:
            tmp.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")
    except (OSError, DataError):
        pass  # an unwritable cache folder: the MD5 is computed again next time, nothing else changes
    return md5


MD5_CACHE = "md5.json"


# ----------------------------------------------------------------------------- batches

def batches(split, batch_size, device="cpu", generator=None, augmentation=augment.NONE,
            part=(0, 1), aug_generator=None):
    """Yield (float [0,1] images, labels) on `device`.

    With a `generator` the order is shuffled and each batch is augmented as `augmentation` says (see
    augment.apply), drawn from `aug_generator` if given, else from `generator`. A split already on
    the device (see place) is cut there; from host memory a batch bound for a GPU is copied through
    pinned memory, without blocking.

    part=(rank, world_size) yields only that rank's contiguous share of each global batch of
    `batch_size` (shares differ by at most one image; in rank order they make the global batch).
    Every rank shuffles with the same generator state, so the ranks' shares never overlap. A last
    global batch smaller than world_size is dropped, so every rank takes the same number of steps.
    """
    n = len(split)
    rank, world = part
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    aug_generator = aug_generator or generator
    for i in range(0, n, batch_size):
        idx = order[i:i + batch_size]
        if world > 1:
            if len(idx) < world:
                break
            idx = idx.tensor_split(world)[rank]
        idx = idx.to(split.images.device)
        x = to_unit(to_device(split.images[idx], device))
        if generator is not None:
            x = augment.apply(x, augmentation, aug_generator)
        yield x, to_device(split.labels[idx.to(split.labels.device)], device)


def to_device(t, device):
    """t on `device`; a host tensor bound for a GPU goes through pinned memory, asynchronously."""
    device = torch.device(device)
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def place(split, device, budget_bytes):
    """The split with images and labels on `device` when its images fit in `budget_bytes`, else
    unchanged. On a GPU this saves a host-to-device copy per batch; 28 px PathMNIST's training
    images are 0.21 GB. Masks stay where they are (only the quality pass reads them)."""
    if split.images.element_size() * split.images.nelement() > budget_bytes:
        return split
    return Split(split.images.to(device), split.labels.to(device), split.masks)


# ----------------------------------------------------------------------------- CLI

def main(argv=None):
    p = argparse.ArgumentParser(description="Fetch, verify and summarise a MedMNIST 2D dataset (or "
                                "write its synthetic stand-in).", formatter_class=cli.HelpFormatter)
    p.add_argument("--flag", type=flag_arg, default=FLAG, help=FLAG_HELP)
    cli.add_data_dir(p)
    p.add_argument("--size", type=int, default=28, choices=SIZES, help="image size: 28 (MedMNIST v2) "
                   "or 64/128/224 (MedMNIST+)")
    p.add_argument("--synthetic", action="store_true", help="use the offline SYNTHETIC dataset, not "
                   "the real one (written on first use)")
    p.add_argument("--trust-file", action="store_true", help=TRUST_FILE_HELP)
    add_memory_flag(p)
    args = p.parse_args(argv)
    ds = load(args.data_dir, args.size, args.synthetic, args.memory, args.flag, args.trust_file)
    print(f"{describe(ds.provenance())}  file {ds.path}  MD5 {ds.md5}")
    aug = augment.AUGMENTATION[ds.flag]
    print(f"  task {ds.task}, {ds.channels} channel(s), {len(ds.class_names)} classes; default augmentation: "
          f"{aug.summary()} ({aug.why})")
    for s in SPLITS:
        split = getattr(ds, s)
        counts = (split.labels.sum(0) if split.labels.ndim == 2
                  else torch.bincount(split.labels, minlength=len(ds.class_names))).tolist()
        print(f"  {s:5s} {len(split):6d} images  per class {counts}")
    mean, std = channel_stats(ds.train.images)
    print(f"  train mean {' '.join(map(formats.metric, mean))}  std {' '.join(map(formats.metric, std))}")


if __name__ == "__main__":
    cli.run(main)
