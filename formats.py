"""formats.py: how each kind of number reads, one rule per kind, wherever it is shown.

    formats.metric(0.99804)          # '0.9980'         ACC, AUC, ECE, F1, precision, recall, losses
    formats.interval([0.99, 1.0])    # '0.9900–1.0000'  a 95% interval of a metric
    formats.share(0.998)             # '99.8%'          a share of images, pixels or mass
    formats.probability(0.9996)      # '>99.9%'         a class probability (a confidence)
    formats.measure(2.3e-05)         # '2.30e-05'       a quality measure or a trust-test value
    formats.rounded(metrics)         # metrics.json's numbers to 6 significant digits

The console, report.html, MODEL_CARD.md, the figures and db.py's summary all format through these,
so one number reads the same everywhere. A share or probability never reads 100.0% unless it is 1,
nor 0.0% unless it is 0: rounding 0.998 up to "100%" would say that every image passed. Standard
library only: db.py's readers need no torch, and neither does this.
"""
import math

SIGNIFICANT = 6  # digits kept in metrics.json: float noise (0.32029240000000003) is not a result


def metric(value):
    """A classification metric or a loss: four decimals."""
    return "—" if value is None else f"{value:.4f}"


def interval(bounds):
    """A 95% interval [low, high] of a metric, in the metric's format."""
    return "—" if not bounds else f"{metric(bounds[0])}–{metric(bounds[1])}"


def share(value):
    """A share (of images, pixels, attribution mass) as a percentage with one decimal; never 100.0%
    below 1 or 0.0% above 0."""
    if value is None:
        return "—"
    text = f"{value:.1%}"
    if text == "100.0%" and value < 1:
        return ">99.9%"
    if text == "0.0%" and value > 0:
        return "<0.1%"
    return text


def probability(value):
    """A class probability or confidence: read as a share is (one decimal, never a false 100%)."""
    return share(value)


def measure(value):
    """A quality measure or a trust test's value and threshold: three decimals, or three
    significant digits where three decimals would read 0.000 (infidelity, sensitivity)."""
    if value is None:
        return "—"
    if value != 0 and abs(value) < 0.0005:
        return f"{value:.2e}"
    return f"{value:.3f}"


def count(n):
    """A count of images, rows or parameters, with thousands separators."""
    return f"{n:,}"


def rounded(obj, digits=SIGNIFICANT):
    """`obj` (dicts, lists, numbers, as json writes them) with every float to `digits` significant
    digits: what metrics.json stores."""
    if isinstance(obj, float):
        return obj if not math.isfinite(obj) or obj == 0 else float(f"{obj:.{digits}g}")
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    return obj
