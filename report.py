"""report.py: how a run's numbers read: the console's summary, one self-contained HTML page, a
model card, and a summary of several runs.

    python report.py runs/pathmnist_28                  # rewrite runs/pathmnist_28/{report.html,MODEL_CARD.md}
    python report.py runs/demo_seed0 runs/demo_seed1 runs/demo_seed2 --out runs/seeds.html   # mean +- sd

evaluate.py prints console_results and console_explanations and calls write_report at its end, so
every evaluated run has its report. All of them are rendered from the run's metrics.json (and its
checkpoint's metadata), each number through formats.py's rule for its kind, so a number reads the
same on the console, in report.html and in MODEL_CARD.md (tests/test_report.py renders all three).
The page embeds every figure as a data URI and its styles inline: no external URL, no JavaScript,
nothing to fetch, so it reads the same opened from disk, mailed, archived or printed to PDF.
"""
import argparse
import json
import statistics
from datetime import datetime, timezone
from pathlib import Path

import centre_shift
import cli
import datasets
import formats
import gallery
import model as model_lib
import trust
from files import write_text
from page import CSS, esc, figure, table, version

SECTIONS = ("Provenance", "Training", "Results", "Explanations", "How to reproduce")
FIGURES = {  # section -> [(file under <run>/images, caption)]
    "Training": [("accuracy_epoch.png", "Accuracy and loss per epoch, training and validation.")],
    "Results": [("confusion_matrix.png", "Confusion matrix of the test split (rows: true class)."),
                ("reliability.png", "Reliability: accuracy against confidence, 15 bins (ECE).")],
    "Explanations": [("ig_examples.png", None),  # its caption says what was picked (gallery.caption)
                     ("methods.png", "Every stored attribution method on the same examples."),
                     ("faithfulness.png", "Deletion and insertion curves against a random pixel order."),
                     ("sanity_randomization.png", "Each method's map as the weights are re-initialised, "
                      "first layer first (MPRT's order).")],
}


def load_run(run_dir):
    """(metrics.json, checkpoint meta) of an evaluated run folder. The meta comes from last.pt where
    the run has one (its history runs to the last epoch; best.pt's stops at the best one)."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        raise model_lib.CheckpointError(f"{run_dir} has no metrics.json: run evaluate.py on its best.pt first.")
    metrics = json.loads(metrics_path.read_text())
    checkpoint = Path(metrics["checkpoint"]) if Path(metrics["checkpoint"]).is_file() else run_dir / "best.pt"
    meta = model_lib.read_checkpoint(checkpoint)["meta"]
    last = checkpoint.parent / "last.pt"
    if last.is_file():
        return metrics, {**meta, "history": model_lib.read_checkpoint(last)["meta"]["history"], "full_history": True}
    return metrics, {**meta, "full_history": False}


def with_interval(m, key):
    """A metric with its 95% interval where metrics.json has one: '0.9980 (95% CI 0.9950–1.0000)'."""
    ci = m.get(f"{key}_ci95")
    return formats.metric(m[key]) + (f" (95% CI {formats.interval(ci)})" if ci else "")


def stop_reason(meta):
    settings, history = meta["settings"], meta["history"]
    if not history:
        return "no epoch finished"
    if not meta["full_history"]:
        return "unknown: the run folder has no last.pt, and best.pt's history ends at the best epoch"
    last = history[-1]["epoch"]
    if last >= settings["epochs"]:
        return f"reached --epochs {settings['epochs']}"
    return (f"stopped after epoch {last}: {settings['patience']} epochs without a lower validation "
            f"loss (early stopping), or interrupted")


def banners(provenance):
    out = []
    if provenance["synthetic"]:
        title = datasets.title_of(provenance["flag"])
        out.append(f'<div class="banner synthetic">SYNTHETIC data, not {esc(title)}: '
                   f"these numbers show that the code works and say nothing about the real dataset.</div>")
    if not provenance["verified"]:
        out.append('<div class="banner unverified">Unverified file: its MD5 differs from medmnist.INFO\'s '
                   "(--trust-file).</div>")
    return out


def trust_rows(metrics):
    """(header, rows, tests) of the trust table (trust.table_cells), the thresholds' row last."""
    tests, rows, limits = trust.table_cells(metrics["trust"], metrics["recommended"])
    return ["method", *[t.title for t in tests]], rows + [["threshold", *limits]], tests


def trust_lines(metrics):
    """The sentences that go with the trust table: which method leads and why, IG's verdict and its
    reasons, and any test that a control which must fail it passed, all from the run's own numbers."""
    table, rec = metrics["trust"], metrics["recommended"]
    lines = [f"Recommended: {rec}, the method that passes every test that applies to it with the largest "
             f"ROAD gap; the figures lead with it." if rec else
             "No method passes every test that applies to it on this run: read the maps beside the table."]
    if "ig" in table:
        failures = trust.explain_failures("ig", table["ig"])
        lines += failures or ["Integrated Gradients (ig) passes every test that applies to it."]
    return lines + trust.uninformative_lines(table)


def completeness_line(metrics):
    """IG's completeness over every stored map, in one sentence (console, report and card)."""
    ig, tolerance = metrics["explanations"]["ig"]["quality"], metrics["store"]["ig_settings"]["tolerance"]
    return (f"Integrated Gradients for {formats.count(ig['completeness_images'])} test images: mean relative "
            f"completeness error {formats.share(ig['mean_relative_error'])}, "
            f"{formats.share(ig['completeness_share'])} within {formats.share(tolerance)}.")


def evaluated_on(metrics):
    e = metrics["evaluated_on"]
    return (f"{e['device']}, {e['threads']} CPU thread{'s' if e['threads'] != 1 else ''} for torch"
            + (f", {e['world_size']} processes (torchrun)" if e["world_size"] > 1 else ""))


def render(run_dir, metrics, meta):
    """The report page of one run, as HTML text."""
    run_dir = Path(run_dir)
    figures = run_dir / "images"
    p = meta["provenance"]
    tag = datasets.describe(p)
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{esc(tag)}: run report</title>"
             f"<style>{CSS}</style></head><body>", f"<h1>Run report: {esc(tag)}</h1>", *banners(p)]
    parts.append("<h2>Provenance</h2>" + table(["what", "value"], [
        ["dataset", f"{p['dataset']} ({p['flag']}), {p['size']}×{p['size']} px"],
        ["data file and MD5", f"{p['file']}  {p['md5']}" + ("" if p["verified"] else "  (unverified)")],
        ["checkpoint SHA-256", metrics["checkpoint_sha256"]],
        ["task", meta["task"]],
        ["model cost", f"{formats.count(metrics['params'])} parameters, {formats.count(metrics['macs'])} "
                       f"multiply-adds per image"],
        ["training settings", json.dumps(meta["settings"], sort_keys=True)],
        ["IG settings", json.dumps(metrics["store"]["ig_settings"], sort_keys=True)],
        ["evaluated on", evaluated_on(metrics)],
        ["software", f"trained with torch {meta['torch']}; reported with " + ", ".join(
            f"{name} {version(name)}" for name in ("torch", "captum", "medmnist", "numpy", "matplotlib"))],
        ["report written", datetime.now(timezone.utc).isoformat(timespec="seconds")]], kind="text"))
    history, best = meta["history"], meta["best_epoch"]
    best_row = next((h for h in history if h["epoch"] == best), None)
    parts.append("<h2>Training</h2>" + table(["what", "value"], [
        ["epochs run", len(history)], ["best epoch (lowest validation loss)", best],
        ["its validation loss / accuracy",
         f"{formats.metric(best_row['val_loss'])} / {formats.metric(best_row['val_acc'])}" if best_row else "—"],
        ["why it stopped", stop_reason(meta)]], kind="text"))
    parts += [figure(figures / f, c) for f, c in FIGURES["Training"]]
    val = metrics["val"]
    parts.append("<h2>Results</h2>" + table(
        ["split", "ACC (MedMNIST)", "balanced ACC", "macro-F1", "AUC (MedMNIST)", "ECE", "images"], [
            ["test", with_interval(metrics, "acc"), formats.metric(metrics["balanced_acc"]),
             formats.metric(metrics["macro_f1"]), with_interval(metrics, "auc"), with_interval(metrics, "ece"),
             formats.count(metrics["n"])],
            ["validation", formats.metric(val["acc"]), "", "", formats.metric(val["auc"]), formats.metric(val["ece"]),
             formats.count(val["n"])]]))
    parts += centre_shift_parts(metrics, p)
    parts.append(f"<p>TTA (mean over the 8 flips/rotations): {'on' if metrics['tta'] else 'off'} for "
                 f"the numbers above.</p>")
    if metrics.get("tta_comparison"):  # only for a model trained with flips
        parts.append(table(["TTA", "test ACC", "test AUC"], [[k, formats.metric(v["acc"]), formats.metric(v["auc"])]
                                                            for k, v in sorted(metrics["tta_comparison"].items())]))
    parts.append(table(["class", "precision", "recall", "F1", "support"],
                       [[c["class"], formats.metric(c["precision"]), formats.metric(c["recall"]),
                         formats.metric(c["f1"]), formats.count(c["support"])] for c in metrics["per_class"]]))
    parts += [figure(figures / f, c) for f, c in FIGURES["Results"]]
    parts.append("<h2>Explanations</h2>")
    if metrics["trust"]:  # quality measured (--quality above 0)
        header, rows, tests = trust_rows(metrics)
        parts.append("".join(f"<p>{esc(line)}</p>" for line in trust_lines(metrics)))
        parts.append('<div class="trust">' + table(header, rows) + "</div>")
        parts.append("<ul>" + "".join(f"<li><b>{esc(t.title)}</b> ({esc(t.criterion)}; controls that must fail "
                                      f"it: {esc(', '.join(t.must_fail))}): {esc(t.catches)}</li>"
                                      for t in tests) + "</ul>")
    if metrics["explanations"]["ig"]["quality"].get("completeness_images"):
        parts.append(f"<p>{esc(completeness_line(metrics))}</p>")
    parts += [figure(figures / f, c or gallery.caption(metrics["gallery"])) for f, c in FIGURES["Explanations"]
              if c or "gallery" in metrics]
    parts.append("<h2>How to reproduce</h2><pre>" + esc("\n".join(reproduce_commands(metrics))) + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def reproduce_commands(metrics):
    """The exact train.py and evaluate.py command lines evaluate.py recorded for this run."""
    commands = metrics["commands"]
    return [commands["train"], commands["evaluate"], f"python report.py {Path(metrics['checkpoint']).parent}"]


def split_origin(p):
    """One computed sentence on where the test split comes from: centre_shift.OTHER_CENTRE's, with its
    source, for the datasets it names; none for the others (nothing is known) or for synthetic data."""
    other = None if p["synthetic"] else centre_shift.OTHER_CENTRE.get(p["flag"])
    return f"{other[0]} ({other[1]})." if other else None


def flagged_line(metrics):
    """The input check's flagged share of the test split, one sentence (console, report and card)."""
    f = metrics["centre_shift"]["flagged"]
    return (f"The input check (colour statistics against the training split) flags {formats.share(f['share'])} of "
            f"test images ({formats.count(f['n'])}) as unlike the training data; ACC on them "
            f"{formats.metric(f['acc_flagged'])}, on the rest {formats.metric(f['acc_unflagged'])}.")


def colour_only_line(metrics):
    c = metrics["centre_shift"]["colour_only"]
    return (f"Colour alone (a logistic regression on each image's per-channel mean and s.d., fitted on the "
            f"training split): ACC {formats.metric(c['val'])} on validation, {formats.metric(c['test'])} on test.")


def centre_shift_parts(metrics, p):
    """The Results section's account of the validation-test gap: the gap, where the splits come from,
    per-class recall on both, the input check's flagged share, and how far colour alone goes."""
    origin = split_origin(p)
    gap = metrics["val"]["acc"] - metrics["acc"]
    parts = [f"<p>Validation minus test ACC: {'+' if gap >= 0 else '−'}{formats.metric(abs(gap))}." + (
        f" {esc(origin)} So the gap mixes the stain shift with other patients and class balances, and "
        f"validation is optimistic." if origin else "") + "</p>"]
    s = metrics["centre_shift"]
    if not s:  # multi-label data: no per-class recall or colour-only classifier
        return parts
    parts.append(table(["class", "recall, validation", "recall, test"],
                       [[r["class"], formats.metric(r["val"]), formats.metric(r["test"])] for r in s["recall"]]))
    return parts + [f"<p>{esc(line)}</p>" for line in centre_shift_lines(metrics)]


def centre_shift_lines(metrics):
    """The centre-shift sentences, from the same numbers in the console, report and card."""
    s = metrics["centre_shift"]
    if not s:
        return []
    return ([flagged_line(metrics)] if "flagged" in s else []) + [colour_only_line(metrics)]


def lowest_recall_lines(metrics, n=3):
    """The card's failure modes by recall: the n classes of lowest recall among those below 1, or
    one line saying that every class was recalled perfectly."""
    imperfect = sorted((c for c in metrics["per_class"] if c["recall"] < 1 and c["support"]), key=lambda c: c["recall"])
    if not imperfect:
        return [f"- Every class of the test split was recalled perfectly (recall {formats.metric(1.0)})."]
    return [f"- Low recall: {c['class']} ({formats.metric(c['recall'])})" for c in imperfect[:n]]


def model_card(metrics, meta):
    """MODEL_CARD.md text, from the same numbers as the report."""
    p = meta["provenance"]
    cm, names = metrics["confusion_matrix"], [c["class"] for c in metrics["per_class"]]
    confusions = []
    if cm:
        pairs = [(cm[i][j], names[i], names[j]) for i in range(len(cm)) for j in range(len(cm)) if i != j]
        confusions = [f"- {t} read as {q}: {formats.count(n)} test images"
                      for n, t, q in sorted(pairs, reverse=True)[:3] if n]
    trust_md = []
    if metrics["trust"]:
        header, rows, _ = trust_rows(metrics)
        trust_md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                    *["| " + " | ".join(r) + " |" for r in rows], "", *trust_lines(metrics)]
    if metrics["explanations"]["ig"]["quality"].get("completeness_images"):
        trust_md += ["", completeness_line(metrics)]
    lines = [f"# Model card: {datasets.describe(p)}", "",
             "**Intended use**: research on small medical images and their explanations. Not a diagnostic "
             "device; not validated for clinical use.", "",
             "## Data", f"- {p['dataset']} ({p['flag']}), {p['size']}×{p['size']} px, file {p['file']}, MD5 {p['md5']}"
             + ("" if p["verified"] else " (unverified: --trust-file)") + ".",
             "- " + ("SYNTHETIC stand-in: these numbers say nothing about the real dataset." if p["synthetic"] else
                     split_origin(p) or "MedMNIST's official splits."), "",
             "## Metrics (test split)",
             f"- ACC {with_interval(metrics, 'acc')}, AUC {with_interval(metrics, 'auc')} (MedMNIST's getACC/getAUC), "
             f"balanced ACC {formats.metric(metrics['balanced_acc'])}, macro-F1 {formats.metric(metrics['macro_f1'])}, "
             f"ECE {with_interval(metrics, 'ece')}, {formats.count(metrics['n'])} images.",
             *[f"- {line}" for line in centre_shift_lines(metrics)],
             f"- Validation ACC {formats.metric(metrics['val']['acc'])}, AUC {formats.metric(metrics['val']['auc'])}.",
             "", "## Known failure modes", *lowest_recall_lines(metrics), *confusions, "",
             "## Explanation quality", *(trust_md or ["Not measured for this run."]), "",
             "## Limitations",
             "- One seed: its spread over seeds is not measured here (`make seeds` measures it).", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the console

def console_results(metrics, title):
    """What evaluate.py prints of the classification results: the same numbers, in the same format,
    as the report and the card."""
    m, multi = metrics, metrics["confusion_matrix"] is None
    lines = ["", title,
             f"  ACC {with_interval(m, 'acc')}   AUC {with_interval(m, 'auc')}   ECE {with_interval(m, 'ece')}",
             f"  {formats.count(m['n'])} images, TTA {'on' if m['tta'] else 'off'}; balanced ACC "
             f"{formats.metric(m['balanced_acc'])}, macro-F1 {formats.metric(m['macro_f1'])}; validation ACC "
             f"{formats.metric(m['val']['acc'])} AUC {formats.metric(m['val']['auc'])}"]
    header = ["label (at probability 0.5)" if multi else "class", "precision", "recall", "F1", "support"]
    lines += trust.columns(header, [[c["class"], formats.metric(c["precision"]), formats.metric(c["recall"]),
                                     formats.metric(c["f1"]), formats.count(c["support"])] for c in m["per_class"]])
    if not multi:
        lines += ["  confusion matrix (rows true, columns predicted):"]
        lines += trust.columns(["", *range(len(m["confusion_matrix"]))],
                               [[i, *row] for i, row in enumerate(m["confusion_matrix"])])
    return "\n".join(lines + [f"  {line}" for line in centre_shift_lines(m)])


def console_explanations(metrics):
    """What evaluate.py prints of the explanations: IG's completeness, the quality measures and the
    trust table (trust.quality_lines), from metrics.json's numbers."""
    lines = []
    if metrics["explanations"]["ig"]["quality"].get("completeness_images"):
        lines.append(completeness_line(metrics))
    summaries = {**{m: e["quality"] for m, e in metrics["explanations"].items() if e["quality"].get("images")},
                 **metrics["controls"]}
    if summaries:
        lines += trust.quality_lines(summaries, metrics["trust"], metrics["recommended"],
                                     metrics["store"]["ig_settings"])
    return "\n".join(lines)


def write_report(run_dir):
    """Write <run>/report.html and <run>/MODEL_CARD.md atomically; returns the report's path."""
    run_dir = Path(run_dir)
    metrics, meta = load_run(run_dir)
    write_text(run_dir / "report.html", render(run_dir, metrics, meta))
    write_text(run_dir / "MODEL_CARD.md", model_card(metrics, meta))
    return run_dir / "report.html"


# ----------------------------------------------------------------------------- several runs

SUMMARY_KEYS = ("acc", "auc", "ece")


def mean_sd(values):
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(run_dirs):
    """{"runs": [(name, metrics)], "summary": {key: (mean, sd)}, "per_class": {class: (mean F1, sd)}}."""
    runs = [(Path(d).name, load_run(d)[0]) for d in run_dirs]
    summary = {k: mean_sd([m[k] for _, m in runs]) for k in SUMMARY_KEYS}
    classes = [c["class"] for c in runs[0][1]["per_class"]]
    per_class = {c: mean_sd([m["per_class"][i]["f1"] for _, m in runs]) for i, c in enumerate(classes)}
    return {"runs": runs, "summary": summary, "per_class": per_class}


def render_summary(s):
    first = s["runs"][0][1]
    tag = datasets.describe(first["provenance"])
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{len(s['runs'])} runs: {esc(tag)}</title>"
             f"<style>{CSS}</style></head><body><h1>{len(s['runs'])} runs of {esc(tag)}</h1>",
             *banners(first["provenance"]),
             "<h2>Mean ± sd over runs</h2>" + table(["metric", "mean", "sd"],
                                                   [[k.upper(), formats.metric(m), formats.metric(sd)]
                                                    for k, (m, sd) in s["summary"].items()]),
             "<h2>Per class F1</h2>" + table(["class", "mean F1", "sd"],
                                            [[c, formats.metric(m), formats.metric(sd)]
                                             for c, (m, sd) in s["per_class"].items()]),
             "<h2>Each run</h2>" + table(["run", "ACC", "AUC", "ECE", "seed", "checkpoint SHA-256"],
                                        [[name, formats.metric(m["acc"]), formats.metric(m["auc"]),
                                          formats.metric(m["ece"]), m["seed"], m["checkpoint_sha256"][:16]]
                                         for name, m in s["runs"]]),
             "</body></html>"]
    return "\n".join(parts)


def main(argv=None):
    p = argparse.ArgumentParser(description="Write a run's report.html and MODEL_CARD.md, or summarise "
                                "several runs (e.g. seeds) on one page.", formatter_class=cli.HelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders evaluated by evaluate.py (holding metrics.json)")
    p.add_argument("--out", help="with several runs: the summary page (default: runs_summary.html)")
    args = p.parse_args(argv)
    try:
        if len(args.runs) == 1:
            print(f"report -> {write_report(args.runs[0])}")
            return
        out = Path(args.out or "runs_summary.html")
        s = summarise(args.runs)
        write_text(out, render_summary(s))
        for key, (m, sd) in s["summary"].items():
            print(f"{key.upper()} {formats.metric(m)} ± {formats.metric(sd)} over {len(s['runs'])} runs")
        print(f"summary -> {out}")
    except (OSError, KeyError, ValueError) as e:  # a run folder whose files are not evaluate.py's
        raise ReportError(f"{e} ({type(e).__name__}). Pass run folders that evaluate.py wrote.") from e


class ReportError(cli.UserError):
    """Run folders that cannot be reported on."""


if __name__ == "__main__":
    cli.run(main)
