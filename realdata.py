"""realdata.py: where the shared folder of real images is, the one place that says so.

    python realdata.py        # the folder in use and what it holds, or why it is not there

The folder holds third-party data (real H&E tiles, real PathMNIST images, the official RetinaMNIST
file; its README names sources and licences), so it never becomes part of this repository: it lives
beside the checkout, read-only, and is used where it lies. Tests and `make real` find it here:
$PATHMNIST_XAI_REALDATA if set, else ../shared/realdata next to the repository folder. Nothing is
ever written into it (MD5s and memory maps go to the cache folder, see data.cache_dir).
"""
import os
import sys
from pathlib import Path

ENV = "PATHMNIST_XAI_REALDATA"
DEFAULT = Path(__file__).resolve().parent.parent / "shared" / "realdata"


def folder():
    """The real-data folder: $PATHMNIST_XAI_REALDATA, else ../shared/realdata beside the repository."""
    return Path(os.environ.get(ENV) or DEFAULT)


def missing(relative="."):
    """Why `relative` (a path inside the folder) cannot be used, as a sentence that says how to point
    at it; None when it is there."""
    path = folder() / relative
    if path.exists():
        return None
    where = f"${ENV} ({folder()})" if os.environ.get(ENV) else f"{folder()} (the default, beside the checkout)"
    return (f"real data not found: {path} does not exist. The real-data folder is {where}; set "
            f"{ENV}=/path/to/realdata to point at a copy of the shared folder.")


def main():
    why = missing()
    if why:
        sys.exit(why)
    print(f"real data: {folder()}")
    for item in sorted(folder().iterdir()):
        count = len(list(item.iterdir())) if item.is_dir() else 1
        print(f"  {item.name:20s} {count} file(s)")


if __name__ == "__main__":
    main()
