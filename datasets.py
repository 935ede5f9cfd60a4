"""datasets.py: which MedMNIST 2D datasets exist and what each one is, from medmnist.INFO.

    import datasets; datasets.flag_info("bloodmnist")["task"]     # 'multi-class'
    datasets.describe(provenance)                                 # how plots and logs name a dataset

A dataset is named by its MedMNIST flag (pathmnist, chestmnist, ...), as medmnist names it. Its file
per size, URL, MD5, class names, channel count and task come from medmnist.INFO alone; this module
adds how a dataset is named in provenance and titles (synthetic data and unverified files always
say so). It loads no data (data.py does).
"""
import argparse
import importlib
import importlib.util
import sys
import types

from cli import UserError


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




class DataError(UserError):
    """Bad or missing data."""


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


def dataset_name(synthetic, flag=FLAG):
    """'pathmnist', or 'pathmnist-synthetic' for the stand-in: the name provenance records."""
    return f"{flag}-synthetic" if synthetic else flag


def describe(provenance):
    """How plots and logs name a dataset; synthetic data and unverified files always say so."""
    tag = f"{provenance['dataset']} {provenance['size']}x{provenance['size']}"
    if provenance["synthetic"]:
        tag += f" (SYNTHETIC data, not {title_of(provenance['flag'])})"
    if not provenance["verified"]:
        tag += " (unverified file)"
    return tag
