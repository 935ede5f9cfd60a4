"""report.py: one self-contained HTML page per run, a model card, and a summary of several runs.

    python report.py runs/pathmnist_28                  # rewrite runs/pathmnist_28/{report.html,MODEL_CARD.md}
    python report.py runs/demo_seed0 runs/demo_seed1 runs/demo_seed2 --out runs/seeds.html   # mean +- sd

evaluate.py calls write_report at its end, so every evaluated run has its report. The page embeds
every figure as a data URI and its styles inline: no external URL, no JavaScript, nothing to fetch,
so it reads the same opened from disk, mailed, archived or printed to PDF. It is built from the run's
metrics.json and its checkpoint's metadata, the same numbers as MODEL_CARD.md.
"""
import argparse
import base64
import html
import json
import statistics
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path

import cli
import datasets
import model as model_lib
import shift
import trust
from files import write_text

SECTIONS = ("Provenance", "Training", "Results", "Explanations", "How to reproduce")
FIGURES = {  # section -> [(file under <run>/images, caption)]
    "Training": [("accuracy_epoch.png", "Accuracy and loss per epoch, training and validation.")],
    "Results": [("confusion_matrix.png", "Confusion matrix of the test split (rows: true class)."),
                ("reliability.png", "Reliability: accuracy against confidence, 15 bins (ECE).")],
    "Explanations": [("ig_examples.png", "Integrated Gradients: per class, the most confident correct "
                      "and wrong test images."),
                     ("methods.png", "Every stored attribution method on the same examples."),
                     ("faithfulness.png", "Deletion and insertion curves against a random pixel order."),
                     ("sanity_randomization.png", "Each method's map as the weights are re-initialised, "
                      "first layer first (MPRT's order).")],
}
CSS = """body{font-family:system-ui,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#111;line-height:1.45}h1{font-size:1.6em}h2{border-bottom:2px solid #ccc;padding-top:.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}td,th{border:1px solid #bbb;padding:.25em .6em;
text-align:right}th{background:#eee}table.text td,table.text th{text-align:left}
td:first-child,th:first-child{text-align:left}
.banner{padding:.6em 1em;margin:.8em 0;font-weight:bold;border-radius:4px}
.synthetic{background:#fff3b0;border:2px solid #c9a400}.unverified{background:#ffd6d6;border:2px solid #b00}
figure{margin:1em 0;page-break-inside:avoid}figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:.9em;color:#444}code,pre{background:#f4f4f4;padding:.1em .3em}pre{padding:.6em;overflow-x:auto}
@media print{body{max-width:none}h2{page-break-after:avoid}}"""


def version(package):
    try:
        return package_version(package)
    except PackageNotFoundError:
        return "?"


def esc(value):
    return html.escape(str(value))


def table(headers, rows, kind="numbers"):
    """An HTML table; kind "text" aligns every cell left (settings, names), "numbers" right."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{kind}"><tr>{head}</tr>{body}</table>'


def figure(path, caption):
    """An <img> with the PNG embedded as a data URI, or nothing if the run has no such figure."""
    if not path.is_file():
        return ""
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{encoded}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


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
        meta = {**meta, "history": model_lib.read_checkpoint(last)["meta"]["history"], "full_history": True}
    return metrics, meta


def interval(m, key):
    ci = m.get(f"{key}_ci95")
    return f"{m[key]:.4f}" + (f" (95% CI {ci[0]:.4f}–{ci[1]:.4f})" if ci else "")


def stop_reason(meta):
    settings, history = meta.get("settings", {}), meta.get("history", [])
    if not history:
        return "no epoch finished"
    if not meta.get("full_history"):
        return "unknown: the run folder has no last.pt, and best.pt's history ends at the best epoch"
    last = history[-1]["epoch"]
    if last >= settings.get("epochs", last + 1):
        return f"reached --epochs {settings['epochs']}"
    return (f"stopped after epoch {last}: {settings.get('patience', '?')} epochs without a lower validation "
            f"loss (early stopping), or interrupted")


def banners(provenance):
    out = []
    if provenance.get("synthetic"):
        title = datasets.title_of(provenance.get("flag", datasets.FLAG))
        out.append(f'<div class="banner synthetic">SYNTHETIC data, not {esc(title)}: '
                   f"these numbers show that the code works and say nothing about the real dataset.</div>")
    if not provenance.get("verified", True):
        out.append('<div class="banner unverified">Unverified file: its MD5 differs from medmnist.INFO\'s '
                   "(--trust-file).</div>")
    return out


def trust_rows(metrics):
    """(header, rows, tests) of the trust table (trust.table_cells), the thresholds' row last."""
    tests, rows, limits = trust.table_cells(metrics.get("trust") or {}, metrics.get("recommended"))
    return ["method", *[t.title for t in tests]], rows + [["threshold", *limits]], tests


def trust_lines(metrics):
    """The sentences that go with the trust table: which method leads and why, IG's verdict and its
    reasons, all from the run's own numbers."""
    table, rec = metrics.get("trust") or {}, metrics.get("recommended")
    lines = [f"Recommended: {rec}, the method that passes every test that applies to it with the largest "
             f"ROAD gap; the figures lead with it." if rec else
             "No method passes every test that applies to it on this run: read the maps beside the table."]
    if "ig" in table:
        failures = trust.explain_failures("ig", table["ig"])
        lines += failures or ["Integrated Gradients (ig) passes every test that applies to it."]
    return lines


def reproduce_commands(metrics):
    """The exact train.py and evaluate.py command lines evaluate.py recorded for this run."""
    commands = metrics.get("commands")
    if not commands:
        return ["(not recorded: this run was evaluated before evaluate.py recorded its commands; evaluate it "
                "again to get them)"]
    return [commands["train"], commands["evaluate"], f"python report.py {Path(metrics['checkpoint']).parent}"]


def igs_completeness(metrics):
    """IG's completeness from metrics.json: explanations.ig.quality, or the separate block that files
    written before it held (explanations.ig.completeness, other key names)."""
    ig = (metrics.get("explanations") or {}).get("ig", {})
    old = ig.get("completeness") or {}
    if old.get("explained") and "completeness_images" not in ig.get("quality", {}):
        return {"completeness_images": old["explained"], "completeness_share": old["share_within_tolerance"],
                "mean_relative_error": old["mean_relative_completeness_error"]}
    return ig.get("quality", {})


def render(run_dir, metrics, meta):
    """The report page of one run, as HTML text."""
    run_dir = Path(run_dir)
    images = run_dir / "images"
    p = datasets.with_defaults(meta["provenance"])
    tag = datasets.describe(p)
    model_rows = ([["model cost", f"{metrics['params']:,} parameters, {metrics['macs']:,} multiply-adds per image"]]
                  if metrics.get("macs") else [])
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{esc(tag)}: run report</title>"
             f"<style>{CSS}</style></head><body>", f"<h1>Run report: {esc(tag)}</h1>", *banners(p)]
    parts.append("<h2>Provenance</h2>" + table(["what", "value"], [
        ["dataset", f"{p['dataset']} ({p['flag']}), {p['size']}×{p['size']} px"],
        ["data file and MD5", f"{p['file']}  {p['md5']}" + ("" if p["verified"] else "  (unverified)")],
        ["checkpoint SHA-256", metrics.get("checkpoint_sha256", "—")],
        ["task", meta.get("task", "multi-class")], *model_rows,
        ["training settings", json.dumps(meta.get("settings", {}), sort_keys=True)],
        ["IG settings", json.dumps(metrics.get("ig", {}).get("settings", {}), sort_keys=True)],
        ["software", f"trained with torch {meta.get('torch', '?')}; reported with " + ", ".join(
            f"{name} {version(name)}" for name in ("torch", "captum", "medmnist", "numpy", "matplotlib"))],
        ["report written", datetime.now(timezone.utc).isoformat(timespec="seconds")]], kind="text"))
    history = meta.get("history", [])
    best = meta.get("best_epoch")
    best_row = next((h for h in history if h["epoch"] == best), None)
    parts.append("<h2>Training</h2>" + table(["what", "value"], [
        ["epochs run", len(history)], ["best epoch (lowest validation loss)", best],
        ["its validation loss / accuracy",
         f"{best_row['val_loss']:.4f} / {best_row['val_acc']:.4f}" if best_row else "—"],
        ["why it stopped", stop_reason(meta)]], kind="text"))
    parts += [figure(images / f, c) for f, c in FIGURES["Training"]]
    val = metrics.get("val") or {}
    parts.append("<h2>Results</h2>" + table(
        ["split", "ACC (MedMNIST)", "balanced ACC", "macro-F1", "AUC (MedMNIST)", "ECE", "images"], [
            ["test", interval(metrics, "acc"), number(metrics.get("balanced_acc")), number(metrics.get("macro_f1")),
             interval(metrics, "auc"), interval(metrics, "ece"), metrics["n"]],
            *([["validation", f"{val['acc']:.4f}", "", "", f"{val['auc']:.4f}", f"{val['ece']:.4f}", val["n"]]]
              if val else [])]))
    parts += shift_parts(metrics, p)
    parts.append(f"<p>TTA (mean over the 8 flips/rotations): {'on' if metrics.get('tta') else 'off'} for "
                 f"the numbers above.</p>")
    if metrics.get("tta_comparison"):
        parts.append(table(["TTA", "test ACC", "test AUC"], [[k, f"{v['acc']:.4f}", f"{v['auc']:.4f}"]
                                                            for k, v in sorted(metrics["tta_comparison"].items())]))
    parts.append(table(["class", "precision", "recall", "F1", "support"],
                       [[c["class"], f"{c['precision']:.3f}", f"{c['recall']:.3f}", f"{c['f1']:.3f}", c["support"]]
                        for c in metrics["per_class"]]))
    parts += [figure(images / f, c) for f, c in FIGURES["Results"]]
    parts.append("<h2>Explanations</h2>")
    if metrics.get("trust"):
        header, rows, tests = trust_rows(metrics)
        parts.append("".join(f"<p>{esc(line)}</p>" for line in trust_lines(metrics)))
        parts.append('<div class="trust">' + table(header, rows) + "</div>")
        parts.append("<ul>" + "".join(f"<li><b>{esc(t.title)}</b> ({esc(t.criterion)}): {esc(t.catches)}</li>"
                                      for t in tests) + "</ul>")
    ig = igs_completeness(metrics)
    if ig.get("completeness_images"):
        parts.append(f"<p>Integrated Gradients for {ig['completeness_images']} test images; mean relative "
                     f"completeness error {ig['mean_relative_error']:.2%}, {ig['completeness_share']:.0%} within "
                     f"{metrics['store']['settings']['tolerance']:.0%}.</p>")
    parts += [figure(images / f, c) for f, c in FIGURES["Explanations"]]
    parts.append("<h2>How to reproduce</h2><pre>" + esc("\n".join(reproduce_commands(metrics))) + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def number(v):
    return "—" if v is None else f"{v:.4f}"


def split_origin(p):
    """One computed sentence on where the test split comes from: shift.OTHER_CENTRE's, with its source,
    for the datasets it names; none for the others (nothing is known) or for synthetic data."""
    other = None if p["synthetic"] else shift.OTHER_CENTRE.get(p["flag"])
    return f"{other[0]} ({other[1]})." if other else None


def shift_parts(metrics, p):
    """The Results section's account of the validation-test gap: the gap, where the splits come from,
    per-class recall on both, the input check's flagged share, and how far colour alone goes."""
    val, s = metrics.get("val"), metrics.get("shift")
    if not val:
        return []
    origin = split_origin(p)
    parts = [f"<p>Validation minus test ACC: {val['acc'] - metrics['acc']:+.4f}." + (
        f" {esc(origin)} So the gap mixes the stain shift with other patients and class balances, and "
        f"validation is optimistic." if origin else "") + "</p>"]
    if not s:
        return parts
    parts.append(table(["class", "recall, validation", "recall, test"],
                       [[r["class"], number(r["val"]), number(r["test"])] for r in s["recall"]]))
    f = s.get("flagged")
    if f:
        parts.append(f"<p>The input check (colour statistics against the training split) flags {f['share']:.1%} of "
                     f"test images ({f['n']}) as unlike the training data; ACC on them {number(f['acc_flagged'])}, "
                     f"on the rest {number(f['acc_unflagged'])}.</p>")
    c = s["colour_only"]
    parts.append(f"<p>Colour alone (a logistic regression on each image's per-channel mean and s.d., fitted on "
                 f"the training split): ACC {c['val']:.4f} on validation, {c['test']:.4f} on test.</p>")
    return parts


def shift_lines(metrics):
    """The card's centre-shift lines, from the same numbers as the report's."""
    s = metrics.get("shift")
    if not s:
        return []
    c, f = s["colour_only"], s.get("flagged")
    return ([f"- Flagged by the input check as unlike the training data: {f['share']:.1%} of test images (ACC "
             f"{number(f['acc_flagged'])} on them, {number(f['acc_unflagged'])} on the rest)."] if f else []) + [
        f"- Colour alone (per-channel mean and s.d., logistic regression): ACC {c['val']:.4f} validation, "
        f"{c['test']:.4f} test."]


def model_card(metrics, meta):
    """MODEL_CARD.md text, from the same numbers as the report."""
    p = datasets.with_defaults(meta["provenance"])
    per_class = sorted(metrics["per_class"], key=lambda c: c["recall"])
    cm, names = metrics.get("confusion_matrix"), [c["class"] for c in metrics["per_class"]]
    confusions = []
    if cm:
        pairs = [(cm[i][j], names[i], names[j]) for i in range(len(cm)) for j in range(len(cm)) if i != j]
        confusions = [f"- {t} read as {q}: {n} test images" for n, t, q in sorted(pairs, reverse=True)[:3] if n]
    trust_md = []
    if metrics.get("trust"):
        header, rows, _ = trust_rows(metrics)
        trust_md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                    *["| " + " | ".join(r) + " |" for r in rows], "", *trust_lines(metrics)]
    lines = [f"# Model card: {datasets.describe(p)}", "",
             "**Intended use**: research on small medical images and their explanations. Not a diagnostic "
             "device; not validated for clinical use.", "",
             "## Data", f"- {p['dataset']} ({p['flag']}), {p['size']}×{p['size']} px, file {p['file']}, MD5 {p['md5']}"
             + ("" if p["verified"] else " (unverified: --trust-file)") + ".",
             "- " + ("SYNTHETIC stand-in: these numbers say nothing about the real dataset." if p["synthetic"] else
                     split_origin(p) or "MedMNIST's official splits."), "",
             "## Metrics (test split)",
             f"- ACC {interval(metrics, 'acc')}, AUC {interval(metrics, 'auc')} (MedMNIST's getACC/getAUC), "
             f"balanced ACC {number(metrics.get('balanced_acc'))}, macro-F1 {number(metrics.get('macro_f1'))}, "
             f"ECE {interval(metrics, 'ece')}, {metrics['n']} images.",
             *shift_lines(metrics),
             *([f"- Validation ACC {metrics['val']['acc']:.4f}, AUC {metrics['val']['auc']:.4f}."]
               if metrics.get("val") else []),
             "", "## Known failure modes",
             *[f"- lowest recall: {c['class']} ({c['recall']:.3f})" for c in per_class[:3]], *confusions, "",
             "## Explanation quality", *(trust_md or ["Not measured for this run."]), "",
             "## Limitations",
             "- One seed: its spread over seeds is not measured here (`make seeds` measures it).", ""]
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
    tag = datasets.describe(datasets.with_defaults(first["provenance"]))
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{len(s['runs'])} runs: {esc(tag)}</title>"
             f"<style>{CSS}</style></head><body><h1>{len(s['runs'])} runs of {esc(tag)}</h1>",
             *banners(datasets.with_defaults(first["provenance"])),
             "<h2>Mean ± sd over runs</h2>" + table(["metric", "mean", "sd"],
                                                   [[k.upper(), f"{m:.4f}", f"{sd:.4f}"]
                                                    for k, (m, sd) in s["summary"].items()]),
             "<h2>Per class F1</h2>" + table(["class", "mean F1", "sd"],
                                            [[c, f"{m:.3f}", f"{sd:.3f}"] for c, (m, sd) in s["per_class"].items()]),
             "<h2>Each run</h2>" + table(["run", "ACC", "AUC", "ECE", "seed", "checkpoint SHA-256"],
                                        [[name, f"{m['acc']:.4f}", f"{m['auc']:.4f}", f"{m['ece']:.4f}",
                                          m.get("seed", "—"), m.get("checkpoint_sha256", "")[:16]]
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
            print(f"{key.upper()} {m:.4f} ± {sd:.4f} over {len(s['runs'])} runs")
        print(f"summary -> {out}")
    except (OSError, KeyError, ValueError) as e:  # a run folder whose files are not evaluate.py's
        raise ReportError(f"{e} ({type(e).__name__}). Pass run folders that evaluate.py wrote.") from e


class ReportError(cli.UserError):
    """Run folders that cannot be reported on."""


if __name__ == "__main__":
    cli.run(main)
