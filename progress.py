"""progress.py: progress of long work, as a live bar on a terminal and as plain lines in a log.

    for x in progress(items, desc="IG", unit="img"): ...

On a terminal this is tqdm's bar. Elsewhere (output piped to a file, CI, a cluster job's log) tqdm
would either stay silent or redraw one line with carriage returns; instead a plain line goes out
every LOG_EVERY_S seconds (and at the start and end), so a log shows that long work is moving.
"""
import os
import sys

from tqdm import tqdm

LOG_EVERY_S = 10
LOG_LINE = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:3.0f}%) after {elapsed}, {rate_fmt}, {remaining} left\n"


def progress(iterable=None, **kwargs):
    """tqdm(iterable, **kwargs) on a terminal, a line every LOG_EVERY_S seconds anywhere else; under
    torchrun, rank 0 alone shows progress (its share is as far along as any)."""
    kwargs.setdefault("disable", os.environ.get("RANK", "0") != "0")
    if sys.stderr.isatty():
        return tqdm(iterable, **kwargs)
    return tqdm(iterable, file=sys.stderr, mininterval=LOG_EVERY_S, maxinterval=LOG_EVERY_S,
                bar_format=LOG_LINE, ascii=True, **kwargs)
