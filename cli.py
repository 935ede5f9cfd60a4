"""cli.py: what every script's command line shares: flags, help, device choice, errors and exit codes.

    import cli
    p = argparse.ArgumentParser(formatter_class=cli.HelpFormatter); cli.add_device(p)
    if __name__ == "__main__": cli.run(main)

A problem the user can fix (bad data, a missing checkpoint, a device this machine lacks) is a
UserError, whatever module raises it: cli.run prints it as one `error:` paragraph and exits 1, where
a traceback would only bury the advice. Ctrl-C exits 130; argparse's own errors exit 2.

This module imports only the standard library (every script's --help stays fast) and no module
of this repository: the flags whose choices live elsewhere are declared there (data.add_memory_flag,
attribution.add_ig_arguments).
"""
import argparse
import shlex
import sys

DEVICE_HELP = "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps"


class UserError(Exception):
    """A problem the user can fix; the message is a paragraph saying what went wrong and what to do."""


class DeviceError(UserError):
    """A --device this machine does not have."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every script's --help: a flag's default is shown unless it is None or already in its help."""

    def _get_help_string(self, action):
        if action.default is None or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def run(main):
    """Run a script's main(): stdout line-buffered (each line reaches a piped log when printed), a
    UserError as one `error:` paragraph with exit code 1, Ctrl-C with exit code 130."""
    sys.stdout.reconfigure(line_buffering=True)
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr)
        sys.exit(130)


# ----------------------------------------------------------------------------- devices

def available_devices():
    """What this machine can run on, best first: each GPU, then mps, then cpu."""
    import torch
    gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return gpus + (["mps"] if torch.backends.mps.is_available() else []) + ["cpu"]


def resolve_device(name="auto"):
    """torch.device for a --device value; `auto` takes the best this machine has."""
    import torch
    here = available_devices()
    if name == "auto":
        return torch.device(here[0])
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DeviceError(f"--device {name!r} is not a device name; use {DEVICE_HELP}. This machine "
                          f"has: {', '.join(here)}.") from None
    key = f"cuda:{device.index or 0}" if device.type == "cuda" else device.type
    if key not in here:
        raise DeviceError(f"--device {name} is not available on this machine, which has: "
                          f"{', '.join(here)}. Pass one of those, or --device auto for the best.")
    return device


# ----------------------------------------------------------------------------- argument types

def positive_int(text):
    """argparse type: an integer of at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


ON_OFF_FLAGS = ("flips",)  # settings stored as booleans whose flag takes on/off (on_off), not a switch


def on_off(text):
    """argparse type for on/off switches such as --flips."""
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"{text!r} is not 'on' or 'off'")
    return text == "on"


def image_count(text):
    """argparse type for --explain/--quality: a number of images, or 'all'."""
    if text == "all" or text.isdigit():
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not a number of images or 'all'")


def even_size(text):
    """argparse type for model.py's --size: the stem's space-to-depth step halves the image, so it
    must be even."""
    if not text.isdigit() or int(text) < 2 or int(text) % 2:
        raise argparse.ArgumentTypeError(f"{text!r} is not an even number of pixels of at least 2 (the "
                                         f"model's first step folds 2x2 pixels into one); MedMNIST sizes "
                                         f"are 28, 64, 128 and 224")
    return int(text)


# ----------------------------------------------------------------------------- reproducing a run

def flag_words(key, value):
    """One setting as command-line words: a switch alone when true, a list comma-joined."""
    flag = "--" + key.replace("_", "-")
    if value is True:
        return [flag]
    if isinstance(value, (list, tuple)):
        value = ",".join(map(str, value))
    return [flag, shlex.quote(str(value))]


def changed_flags(values, defaults, always=()):
    """Command-line words for the settings in `values` (name -> value) that `defaults` has and that
    differ from it, or are in `always` (the real paths); switches that are off and unset values are
    left out."""
    words = []
    for key, value in values.items():
        if key in defaults and (key in always or value != defaults[key]) and value is not None and value is not False:
            words += flag_words(key, value)
    return words


def train_command(settings, data_dir, out):
    """The train.py command line that trains a run again from its checkpoint's settings (train.py's
    RESULT_SETTINGS): every one spelled out (a command that still holds when defaults change), the
    data and run folders; under torchrun when it was."""
    launcher = (["python"] if settings["world_size"] == 1 else
                ["torchrun", "--nproc_per_node", str(settings["world_size"])])
    values = {k: ("on" if v else "off") if k in ON_OFF_FLAGS else v for k, v in settings.items() if k != "world_size"}
    words = [w for k, v in {**values, "data_dir": data_dir, "out": out}.items() if v is not None and v is not False
             for w in flag_words(k, v)]  # `is`: 0 and 0.0 (--seed 0, --stain-jitter 0) are values, not off
    return " ".join([*launcher, "train.py", *words])


def command_line(script, parse, args, always=()):
    """`python script` with the settings in `always` and every other flag whose value differs from
    its default (parse([])'s): the command that does this run again."""
    return " ".join(["python", script, *changed_flags(vars(args), vars(parse([])), always)])


# ----------------------------------------------------------------------------- shared flags

def add_device(p):
    p.add_argument("--device", default="auto", help=DEVICE_HELP)


def add_threads(p):
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default, one per "
                   "core); where other work keeps cores busy, fewer are faster (docs/RESULTS.md, threads)")


def add_data_dir(p, extra=""):
    p.add_argument("--data-dir", default="data", help="folder holding the MedMNIST npz files" + extra)
