"""data.py: the MedMNIST 2D datasets (PathMNIST first) as uint8 tensors, batch augmentation per
modality, and a synthetic stand-in per dataset.

    python data.py                      # download data/pathmnist.npz if missing, verify MD5, summarise
    python data.py --flag bloodmnist    # any MedMNIST 2D dataset (python data.py --help lists them)
    python data.py --size 64            # the MedMNIST+ 64x64 file instead
    python data.py --synthetic          # write/summarise the offline SYNTHETIC dataset (not PathMNIST)

Everything per dataset (file name per size, URL, MD5, class names, channels, task) comes from
medmnist.INFO. A real file is verified against INFO's MD5 before use (remembered per file, see
verified_md5), downloaded only when missing, and never replaced silently; --trust-file accepts a
re-saved copy and marks everything made from it "unverified file". Each split is loaded once into
uint8 tensors of shape (N, C, H, W); images become float [0, 1] only per batch. Normalisation is not
done here: the model holds the training-split mean/std (see model.py), so every tool feeds it plain
[0, 1] pixels. Labels are int64 (N,) for single-label tasks and (N, L) 0/1 for multi-label ones.

How each dataset is augmented, and why, is the AUGMENTATION table below.

The synthetic dataset exists for offline runs and tests. It has the real file's keys, dtypes, layout,
channels, class count and task, its class evidence sits inside known rectangles per image (saved as
`<split>_masks`), and it is named synthetic wherever it appears. It is only used when asked for
(--synthetic).
"""
import argparse
import contextlib
import csv
import errno
import importlib
import importlib.util
import io
import json
import os
import shutil
import socket
import sys
import tempfile
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


FLAG = "pathmnist"  # the flagship, and every script's default
ALL_INFO = medmnist_module("info").INFO
FLAGS = tuple(f for f in ALL_INFO if not f.endswith("3d"))  # the 2D classification datasets
INFO = ALL_INFO[FLAG]
CLASS_NAMES = [INFO["label"][str(i)] for i in range(len(INFO["label"]))]
MULTI_LABEL = "multi-label, binary-class"  # medmnist's task string for chestmnist
SIZES = (28, 64, 128, 224)
SPLITS = ("train", "val", "test")
SYNTHETIC_COUNTS = {"train": 6000, "val": 1000, "test": 1000}
DOWNLOAD_TIMEOUT_S = 60  # Zenodo sometimes stalls (MedMNIST #21/#22); fail instead of hanging


class DataError(Exception):
    """Bad or missing data; the message is a paragraph meant for the user."""


def flag_info(flag):
    """medmnist.INFO's entry for a 2D dataset flag, or a DataError that lists the valid flags."""
    if flag in FLAGS:
        return ALL_INFO[flag]
    valid = ", ".join(FLAGS)
    if flag in ALL_INFO:
        raise DataError(f"{flag} is a 3D MedMNIST dataset (28x28x28 volumes); this project classifies "
                        f"2D images. The 2D flags are: {valid}.")
    raise DataError(f"{flag!r} is not a MedMNIST 2D dataset. The flags are: {valid}.")


def flag_arg(text):
    """argparse type for --flag: a MedMNIST 2D dataset name (see flag_info)."""
    try:
        flag_info(text)
    except DataError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def class_names_of(flag):
    labels = flag_info(flag)["label"]
    return [labels[str(i)] for i in range(len(labels))]


def title_of(flag):
    """The dataset's own spelling, e.g. PathMNIST, OrganAMNIST."""
    return flag_info(flag)["python_class"]


FLAG_HELP = ("MedMNIST 2D dataset: " + ", ".join(FLAGS) + "; channels, classes, task and files come "
             "from medmnist.INFO")
TRUST_FILE_HELP = ("use a real data file whose MD5 differs from medmnist.INFO's (a re-saved copy of "
                   "the same arrays); recorded in the checkpoint, and every plot title says "
                   "'unverified file'")


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


# ----------------------------------------------------------------------------- files

@contextlib.contextmanager
def atomic_path(path, needed=None):
    """Yield a temporary path beside `path`; on success rename it over `path`, on error delete it.

    A crash, Ctrl-C or a full disk therefore never leaves half a file under the final name, and the
    previous file stays as it was. The temporary name keeps the suffix so that savers which infer a
    format from it (matplotlib, np.savez) still work. A full disk (or quota) becomes a DataError
    naming the file, the free space and, if given, the `needed` bytes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise DataError(disk_full_message(path, needed)) from e
    finally:
        tmp.unlink(missing_ok=True)


def disk_full_message(path, needed=None):
    """What to tell the user when writing `path` ran out of space (needed: bytes, if known)."""
    free = shutil.disk_usage(next(p for p in Path(path).absolute().parents if p.exists())).free
    need = f"; this file needs about {human_bytes(needed)}" if needed else ""
    return (f"Writing {path} failed: the disk is full ({human_bytes(free)} free on its file system"
            f"{need}). Nothing half-written was left behind: the previous {Path(path).name}, if any, and "
            f"everything finished before are kept. Free some space and run the same command again "
            f"(train.py with --resume continues from last.pt; evaluate.py computes only what is missing).")


def human_bytes(n):
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


def check_writable(folder, flag):
    """Refuse, before any work is done, an output folder that cannot be created or written to."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        raise DataError(f"Cannot write to {folder} ({e.strerror or e}), so nothing was started. Pass "
                        f"{flag} a folder you can write to, or change its permissions.") from e


def write_csv(path, columns, rows):
    """Write dict rows as a CSV file with a header, atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def real_source(size, flag=FLAG):
    """(file name, URL, MD5) of the official MedMNIST file of this dataset at this size."""
    check_size(size)
    info, suffix = flag_info(flag), "" if size == 28 else f"_{size}"
    return f"{flag}{suffix}.npz", info[f"url{suffix}"], info[f"MD5{suffix}"]


def synthetic_file_name(size, flag=FLAG):
    return f"{flag}_synthetic" + ("" if size == 28 else f"_{size}") + ".npz"


def check_size(size):
    if size not in SIZES:
        raise DataError(f"--size {size} is not available: MedMNIST 2D datasets come in sizes {SIZES}.")


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


def dataset_name(synthetic, flag=FLAG):
    """'pathmnist', or 'pathmnist-synthetic' for the stand-in: the name provenance records."""
    return f"{flag}-synthetic" if synthetic else flag


def with_defaults(provenance):
    """A provenance dict with the keys added by --flag filled in: checkpoints and stores from before
    it were all PathMNIST, from files verified against medmnist.INFO."""
    return {"flag": FLAG, "verified": True, **provenance}


def describe(provenance):
    """How plots and logs name a dataset; synthetic data and unverified files always say so."""
    tag = f"{provenance['dataset']} {provenance['size']}x{provenance['size']}"
    if provenance["synthetic"]:
        tag += f" (SYNTHETIC data, not {title_of(provenance.get('flag', FLAG))})"
    if not provenance.get("verified", True):
        tag += " (unverified file)"
    return tag


def load_matching(provenance, data_dir="data", memory="auto"):
    """The dataset a checkpoint or DB run was made from, refusing a file with another MD5. A model
    trained with --trust-file is matched to the same unverified file, by its MD5."""
    ds = load(data_dir, provenance["size"], provenance["synthetic"], memory,
              flag=provenance.get("flag", FLAG), trust_file=not provenance.get("verified", True))
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

def to_unit(images):
    """uint8 images -> float32 in [0, 1] (what the model takes)."""
    return images.float().div_(255)


def channel_stats(images, chunk=8192):
    """Per-channel mean and std of uint8 (N, C, H, W) images on the [0, 1] scale, in chunks."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    total_sq = torch.zeros(images.shape[1], dtype=torch.float64)
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


@dataclass(frozen=True)
class Augmentation:
    """How training batches of one dataset are augmented: the 8 flips/rotations or none, and the
    strengths (0 = off, 1 = default ranges) of HED stain jitter and per-channel colour jitter."""
    flips: bool
    stain: float
    colour: float
    why: str

    def summary(self):
        return (f"flips/rotations {'on' if self.flips else 'off'}, stain jitter {self.stain:g}, "
                f"colour jitter {self.colour:g}")


# The default per dataset; train.py's --flips/--stain-jitter/--colour-jitter override any of it.
AUGMENTATION = {
    "pathmnist": Augmentation(True, 1.0, 1.0, "H&E tissue has no orientation; the test split is "
                              "another centre's stain, so HED stain jitter plus scanner colour balance"),
    "bloodmnist": Augmentation(True, 0.0, 1.0, "cells in a smear have no orientation; May-Grunwald-Giemsa, "
                               "not H&E, so colour jitter for stain and microscope, no HED"),
    "dermamnist": Augmentation(True, 0.0, 1.0, "a dermoscopy photo has no up or side; colour varies "
                               "with camera and lighting"),
    "tissuemnist": Augmentation(True, 0.0, 1.0, "kidney cortex cells have no orientation; brightness "
                                "varies with the microscope"),
    "retinamnist": Augmentation(False, 0.0, 1.0, "a fundus has a side (optic disc, macula, left or "
                                "right eye), so no flips; fundus cameras differ in colour"),
    "octmnist": Augmentation(False, 0.0, 1.0, "an OCT B-scan has a top (vitreous above the retinal "
                             "layers), so no flips; brightness varies by device"),
    "pneumoniamnist": Augmentation(False, 0.0, 1.0, "a chest X-ray has a side (the heart on the "
                                   "left) and a top; exposure varies, so brightness/contrast jitter"),
    "chestmnist": Augmentation(False, 0.0, 1.0, "a chest X-ray has a side (the heart on the left) and "
                               "a top; exposure varies, so brightness/contrast jitter"),
    "breastmnist": Augmentation(False, 0.0, 1.0, "an ultrasound image has a top (the transducer) and "
                                "depth runs down; gain varies by device"),
    "organamnist": Augmentation(False, 0.0, 0.0, "CT anatomy has a side (liver right, spleen left); "
                                "intensities are Hounsfield units windowed alike for every scan"),
    "organcmnist": Augmentation(False, 0.0, 0.0, "CT anatomy has a side (liver right, spleen left); "
                                "intensities are Hounsfield units windowed alike for every scan"),
    "organsmnist": Augmentation(False, 0.0, 0.0, "CT anatomy has a front and a top; intensities are "
                                "Hounsfield units windowed alike for every scan"),
}
assert set(AUGMENTATION) == set(FLAGS), "every 2D flag needs a row in AUGMENTATION"


def augmentation(flag, flips=None, stain=None, colour=None):
    """The dataset's default Augmentation with any of its fields overridden (None keeps the default).
    HED stain jitter needs RGB images: it is refused for a 1-channel dataset."""
    default = AUGMENTATION[flag]
    aug = Augmentation(default.flips if flips is None else flips,
                       default.stain if stain is None else stain,
                       default.colour if colour is None else colour, default.why)
    if aug.stain > 0 and flag_info(flag)["n_channels"] != 3:
        raise DataError(f"HED stain jitter (--stain-jitter {aug.stain}) works on RGB H&E images; "
                        f"{flag} has 1 channel. Use --colour-jitter for brightness/contrast instead.")
    return aug


NO_AUGMENTATION = Augmentation(False, 0.0, 0.0, "evaluation")


def batches(split, batch_size, device="cpu", generator=None, augment=NO_AUGMENTATION, part=(0, 1),
            aug_generator=None):
    """Yield (float [0,1] images, labels) on `device`.

    With a `generator` the order is shuffled and each batch is augmented as `augment` says (an
    Augmentation): a random one of the 8 flips/rotations, then stain and/or colour jitter, drawn
    from `aug_generator` if given, else from `generator`. A split already on the device (see place)
    is cut there; from host memory a batch bound for a GPU is copied through pinned memory, without
    blocking.

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
            if augment.flips:
                x = random_dihedral(x, aug_generator)
            if augment.stain > 0 or augment.colour > 0:
                x = colour_jitter(x, aug_generator, augment.colour, augment.stain)
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


def colour_jitter(x, generator, colour=1.0, stain=0.0):
    """HED stain jitter of strength `stain` (RGB H&E only), then per-channel scale and shift of
    strength `colour` (on 1 channel: brightness and contrast); 1.0 = the default ranges, 0 = off.

    PathMNIST's test split comes from another clinical centre with a different stain; published
    results name colour shift as the main source of test errors (stroma read as smooth muscle). HED
    jitter (Tellez et al., 2019) varies haematoxylin and eosin amounts as a real stain does; the
    per-channel scale/shift covers scanner colour balance and, elsewhere, exposure and gain.
    """
    b, c = len(x), x.shape[1]

    def uniform(half_width, strength):
        u = torch.rand((b, c, 1, 1), generator=generator) * 2 - 1
        return (u * half_width * strength).to(x.device)

    if stain > 0:
        od = -torch.log(x.clamp_min(1e-6))                      # optical density per RGB channel
        hed = torch.einsum("bchw,cd->bdhw", od, HED_FROM_RGB.to(x.device))
        hed = hed * (1 + uniform(0.05, stain)) + uniform(0.05, stain)
        x = torch.exp(-torch.einsum("bchw,cd->bdhw", hed, RGB_FROM_HED.to(x.device)))
    if colour > 0:
        x = x * (1 + uniform(0.1, colour)) + uniform(0.05, colour)
    return x.clamp_(0, 1)


# ----------------------------------------------------------------------------- synthetic data

# Classes as (colour, texture) pairs: colours repeat across classes and so do textures, so a model
# must use both, and both live only inside the evidence mask. The first nine are PathMNIST's stand-ins;
# 20 pairs cover the largest label count (chestmnist's 14). One channel uses grey levels instead.
SYNTHETIC_COLOURS = np.array([[150, 60, 140], [205, 95, 125], [105, 45, 115], [235, 195, 215],
                              [175, 115, 180]], dtype=np.float32)
SYNTHETIC_GREYS = np.array([[35], [85], [135], [250], [160]], dtype=np.float32)
SYNTHETIC_CLASSES = [(0, 0), (1, 1), (2, 2), (3, 3), (4, 0), (0, 2), (1, 3), (2, 0), (4, 1),
                     (0, 1), (0, 3), (1, 0), (1, 2), (2, 1), (2, 3), (3, 0), (3, 1), (3, 2), (4, 2), (4, 3)]
SYNTHETIC_BACKGROUND = {3: np.array([225, 165, 195], np.float32), 1: np.array([190], np.float32)}
SYNTHETIC_TEST_STAIN = {3: np.array([0.93, 1.0, 1.06], np.float32),  # the "other centre" shift
                        1: np.array([0.95], np.float32)}
SYNTHETIC_LABEL_RATES = (0.6, 0.3)  # multi-label: chance of a first and of a second finding


def write_synthetic(path, size=28, counts=None, seed=0, flag=FLAG):
    """Write a learnable SYNTHETIC npz in `flag`'s MedMNIST format (channels, classes, task), with
    evidence masks, atomically."""
    counts = counts or SYNTHETIC_COUNTS
    rng = np.random.default_rng(seed)
    arrays = {}
    for split in progress(SPLITS, desc=f"writing SYNTHETIC data {path}", unit="split"):
        images, labels, masks = synthetic_split(rng, counts[split], size, shifted=(split == "test"), flag=flag)
        arrays.update({f"{split}_images": images, f"{split}_labels": labels, f"{split}_masks": masks})
    with atomic_path(path) as tmp:
        np.savez_compressed(tmp, **arrays)


def synthetic_split(rng, n, size, shifted=False, flag=FLAG):
    """(images as MedMNIST stores them, labels, masks) for n synthetic images of `flag`'s kind.

    Single-label tasks: one evidence rectangle of the image's class covering 15-35% of it.
    Multi-label: up to two findings, each its own rectangle (the first in the left half, the second
    in the right), and images with none, as in chest X-rays."""
    info = flag_info(flag)
    k, c, multi = len(info["label"]), info["n_channels"], info["task"] == MULTI_LABEL
    labels = rng.integers(0, k, size=n)
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
    # Class-independent background: smooth blotches and pixel noise (pinkish tissue in colour).
    blotches = rng.normal(0, 18, size=(n, c, 4, 4)).astype(np.float32)
    blotches = torch.nn.functional.interpolate(torch.from_numpy(blotches), size=(size, size),
                                               mode="bicubic", align_corners=False).numpy()
    base = SYNTHETIC_BACKGROUND[c] + rng.normal(0, 10, (n, c))
    images = base[:, :, None, None] + blotches
    palette = SYNTHETIC_COLOURS if c == 3 else SYNTHETIC_GREYS
    if multi:
        second = rng.integers(0, k, size=n)
        present = rng.random((n, 2)) < np.array(SYNTHETIC_LABEL_RATES)
        present[:, 1] &= second != labels
        half = size // 2
        images, first_mask = paint_evidence(rng, images, labels, present[:, 0], textures, palette,
                                            (0.25, 0.45), (0, half))
        images, second_mask = paint_evidence(rng, images, second, present[:, 1], textures, palette,
                                             (0.25, 0.45), (half, size))
        masks = first_mask | second_mask
        out_labels = np.zeros((n, k), np.int64)
        out_labels[np.flatnonzero(present[:, 0]), labels[present[:, 0]]] = 1
        out_labels[np.flatnonzero(present[:, 1]), second[present[:, 1]]] = 1
    else:
        images, masks = paint_evidence(rng, images, labels, np.ones(n, bool), textures, palette,
                                       (0.4, 0.6), (0, size))
        out_labels = labels.reshape(-1, 1)
    images = images + rng.normal(0, 12, (n, c, size, size))
    if shifted:
        images = images * SYNTHETIC_TEST_STAIN[c][None, :, None, None]
    images = np.clip(images, 0, 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
    return (images[..., 0] if c == 1 else images), out_labels, masks.astype(np.uint8)


def paint_evidence(rng, images, labels, present, textures, palette, width, columns):
    """Paint each image's class evidence (its colour and texture) into a random rectangle: height
    40-60% of the image, width a `width` share of it, inside the `columns` (start, end) band; only
    where `present`. Returns (images, masks)."""
    n, _, size, _ = images.shape
    py, px = np.mgrid[0:size, 0:size]
    h = rng.integers(int(0.4 * size), int(0.6 * size) + 1, n)[:, None, None]
    w = rng.integers(int(width[0] * size), int(width[1] * size) + 1, n)[:, None, None]
    top = rng.integers(0, size - h + 1)
    left = columns[0] + rng.integers(0, columns[1] - columns[0] - w + 1)
    masks = (py >= top) & (py < top + h) & (px >= left) & (px < left + w) & present[:, None, None]
    colour_idx, texture_idx = np.array(SYNTHETIC_CLASSES)[labels].T
    colour = palette[colour_idx] + rng.normal(0, 10, (n, palette.shape[1]))
    evidence = colour[:, :, None, None] + 35 * textures[np.arange(n), texture_idx][:, None]
    return np.where(masks[:, None], evidence, images), masks


# ----------------------------------------------------------------------------- CLI

def main(argv=None):
    p = argparse.ArgumentParser(description="Fetch, verify and summarise a MedMNIST 2D dataset (or "
                                "write its synthetic stand-in).")
    p.add_argument("--flag", type=flag_arg, default=FLAG, help=FLAG_HELP + " (default: pathmnist)")
    p.add_argument("--data-dir", default="data", help="folder holding the npz files (default: data)")
    p.add_argument("--size", type=int, default=28, choices=SIZES, help="image size: 28 (MedMNIST v2) "
                   "or 64/128/224 (MedMNIST+) (default: 28)")
    p.add_argument("--synthetic", action="store_true", help="use the offline SYNTHETIC dataset, not "
                   "the real one (written on first use)")
    p.add_argument("--trust-file", action="store_true", help=TRUST_FILE_HELP)
    p.add_argument("--memory", default="auto", choices=MEMORY_MODES, help=MEMORY_HELP + " (default: "
                   "auto; `--memory map` converts the file now)")
    args = p.parse_args(argv)
    try:
        ds = load(args.data_dir, args.size, args.synthetic, args.memory, args.flag, args.trust_file)
    except DataError as e:
        sys.exit(f"error: {e}")
    print(f"{describe(ds.provenance())}  file {ds.path}  MD5 {ds.md5}")
    print(f"  task {ds.task}, {ds.channels} channel(s), {len(ds.class_names)} classes; default augmentation: "
          f"{AUGMENTATION[ds.flag].summary()} ({AUGMENTATION[ds.flag].why})")
    for s in SPLITS:
        split = getattr(ds, s)
        counts = (split.labels.sum(0) if split.labels.ndim == 2
                  else torch.bincount(split.labels, minlength=len(ds.class_names))).tolist()
        print(f"  {s:5s} {len(split):6d} images  per class {counts}")
    mean, std = channel_stats(ds.train.images)
    print(f"  train mean {[round(m, 4) for m in mean]}  std {[round(s, 4) for s in std]}")


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # each line reaches a piped log when printed
    main()
