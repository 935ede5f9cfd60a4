"""files.py: writing files so that a crash, Ctrl-C or a full disk never leaves half of one.

    with atomic_path("runs/x/metrics.json") as tmp: tmp.write_text(...)   # renamed into place at the end

Every file the project writes goes through atomic_path: a temporary name beside the target, renamed
over it only when complete. A full disk (or quota) becomes a FileError that names the file, the free
space and what to do; check_writable refuses an output folder before any work is done.
"""
import contextlib
import csv
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from cli import UserError


class FileError(UserError):
    """An output that cannot be written (a full disk, a folder without write access)."""


@contextlib.contextmanager
def atomic_path(path, needed=None):
    """Yield a temporary path beside `path`; on success rename it over `path`, on error delete it.

    The previous file stays as it was until the rename. The temporary name keeps the suffix so that
    savers which infer a format from it (matplotlib, np.savez) still work. `needed` (bytes), if
    known, goes into the disk-full message.
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
        raise FileError(disk_full_message(path, needed)) from e
    finally:
        tmp.unlink(missing_ok=True)


def disk_full_message(path, needed=None):
    """What to tell the user when writing `path` ran out of space (needed: bytes, if known)."""
    free = shutil.disk_usage(next(p for p in Path(path).absolute().parents if p.exists())).free
    need = f"; this file needs about {human_bytes(needed)}" if needed else ""
    return (f"Writing {path} failed: the disk is full ({human_bytes(free)} free on its file system"
            f"{need}). Nothing half-written was left behind: the previous {Path(path).name}, if any, and "
            f"everything finished before are kept. Free some space and run the same command again "
            f"(train.py with --resume continues from last.pt; evaluate.py computes only what is missing; slide.py "
            f"skips the tiles already stored).")


def human_bytes(n):
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


def check_writable(folder, option):
    """Refuse, before any work is done, an output folder that cannot be created or written to;
    `option` is the command-line option that named it (e.g. "--out")."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        raise FileError(f"Cannot write to {folder} ({e.strerror or e}), so nothing was started. Pass "
                        f"{option} a folder you can write to, or change its permissions.") from e


def write_text(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_csv(path, columns, rows):
    """Write dict rows (any iterable: they are written as they come) as a CSV file with a header, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def digest_of(path, algorithm):
    """The file's hex digest (hashlib's `algorithm`), read a chunk at a time: a slide may be 10 GB."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def sha256_of(path):
    return digest_of(path, "sha256")


def md5_of(path):
    return digest_of(path, "md5")
