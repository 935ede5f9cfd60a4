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
                     ("sanity_randomization.png", "Each method's map as the weights are re-initialised "
                      "from the top layer down.")],
}
MEASURES = {  # quality table column -> what it means, one line each
    "deletion AUC": "probability of the explained class as the top-ranked pixels are set to the "
                    "baseline; lower than the random order is faithful",
    "insertion AUC": "the same as pixels are restored into the baseline; higher than random is faithful",
    "in mask": "synthetic data: share of |map| inside the known evidence rectangle",
    "randomised Spearman": "rank correlation of |map| between the trained and the fully randomised "
                           "model; a method passes 0.5 below a map that ignores the model",
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


def quality_rows(metrics):
    methods = metrics.get("methods") or {}
    rows = []
    for name, q in methods.items():
        if not q.get("images"):
            continue
        mask = f"{q['mask_mass']:.0%}" if q.get("mask_mass") is not None else "—"
        rows.append([name, q["images"], f"{q['deletion_auc']:.3f} ({q['deletion_auc_random']:.3f})",
                     f"{q['insertion_auc']:.3f} ({q['insertion_auc_random']:.3f})", mask,
                     f"{q['randomization_spearman']:.2f}", q["randomization_check"]])
    return rows


def reproduce_commands(metrics, meta):
    p, s = datasets.with_defaults(meta["provenance"]), meta.get("settings", {})
    flags = [f"--flag {p['flag']}", f"--size {p['size']}", f"--seed {s.get('seed', 0)}",
             f"--epochs {s.get('epochs', 25)}"] + (["--synthetic"] if p["synthetic"] else []) + (
        ["--trust-file"] if not p["verified"] else [])
    ig = metrics.get("ig", {}).get("settings", {})
    requested = metrics.get("requested", {})
    return [f"python train.py {' '.join(flags)} --out RUN",
            f"python evaluate.py --checkpoint RUN/best.pt --explain {requested.get('explain', 500)} "
            f"--quality {requested.get('quality', 200)} --n-steps {ig.get('n_steps', 8)} "
            f"--baseline {ig.get('baseline', 'mean')}" + (" --tta" if metrics.get("tta") else ""),
            "python report.py RUN"]


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
    parts.append("<h2>Results</h2>" + table(["split", "ACC (MedMNIST)", "AUC (MedMNIST)", "ECE", "images"], [
        ["test", interval(metrics, "acc"), interval(metrics, "auc"), f"{metrics['ece']:.4f}", metrics["n"]],
        *([["validation", f"{val['acc']:.4f}", f"{val['auc']:.4f}", f"{val['ece']:.4f}", val["n"]]] if val else [])]))
    if val:
        parts.append(f"<p>Validation minus test ACC: {val['acc'] - metrics['acc']:+.4f}. For PathMNIST the test "
                     f"split comes from another clinical centre, so this gap is the stain shift's cost.</p>")
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
    ig = metrics.get("ig", {})
    if ig.get("explained"):
        parts.append(f"<p>Integrated Gradients for {ig['explained']} test images; mean relative completeness "
                     f"error {ig['mean_relative_completeness_error']:.2%}, {ig['share_within_tolerance']:.0%} within "
                     f"{ig['tolerance']:.0%}.</p>")
    rows = quality_rows(metrics)
    if rows:
        parts.append(table(["method", "images", "deletion AUC (random)", "insertion AUC (random)", "in mask",
                            "randomised Spearman", "randomisation check"], rows))
        parts.append("<ul>" + "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in MEASURES.items()) + "</ul>")
    parts += [figure(images / f, c) for f, c in FIGURES["Explanations"]]
    parts.append("<h2>How to reproduce</h2><pre>" + esc("\n".join(reproduce_commands(metrics, meta))) + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def model_card(metrics, meta):
    """MODEL_CARD.md text, from the same numbers as the report."""
    p = datasets.with_defaults(meta["provenance"])
    per_class = sorted(metrics["per_class"], key=lambda c: c["recall"])
    cm, names = metrics.get("confusion_matrix"), [c["class"] for c in metrics["per_class"]]
    confusions = []
    if cm:
        pairs = [(cm[i][j], names[i], names[j]) for i in range(len(cm)) for j in range(len(cm)) if i != j]
        confusions = [f"- {t} read as {q}: {n} test images" for n, t, q in sorted(pairs, reverse=True)[:3] if n]
    rows = quality_rows(metrics)
    lines = [f"# Model card: {datasets.describe(p)}", "",
             "**Intended use**: research on small medical images and their explanations. Not a diagnostic "
             "device; not validated for clinical use.", "",
             "## Data", f"- {p['dataset']} ({p['flag']}), {p['size']}×{p['size']} px, file {p['file']}, MD5 {p['md5']}"
             + ("" if p["verified"] else " (unverified: --trust-file)") + ".",
             "- " + ("SYNTHETIC stand-in: these numbers say nothing about the real dataset." if p["synthetic"] else
                     "PathMNIST's test split (CRC-VAL-HE-7K) comes from another clinical centre than its training "
                     "data (NCT-CRC-HE-100K): expect a stain/colour shift." if p["flag"] == "pathmnist" else
                     "MedMNIST's official splits."), "",
             "## Metrics (test split)",
             f"- ACC {interval(metrics, 'acc')}, AUC {interval(metrics, 'auc')} (MedMNIST's getACC/getAUC), "
             f"ECE {metrics['ece']:.4f}, {metrics['n']} images.",
             *([f"- Validation ACC {metrics['val']['acc']:.4f}, AUC {metrics['val']['auc']:.4f}."]
               if metrics.get("val") else []),
             "", "## Known failure modes",
             *[f"- lowest recall: {c['class']} ({c['recall']:.3f})" for c in per_class[:3]], *confusions, "",
             "## Explanation quality",
             *(["| method | deletion (random) | insertion (random) | in mask | randomised Spearman | check |",
                "|---|---|---|---|---|---|"]
               + [f"| {r[0]} | {r[2]} | {r[3]} | {r[4]} | {r[5]} | {r[6]} |" for r in rows]
               if rows else ["Not measured for this run."]), "",
             "## Limitations",
             "- One seed unless stated; single-seed PathMNIST numbers move by a point or more.",
             "- Explanations: IG fails the model-randomisation check on the demo model (its (x - baseline) "
             "factor); read it beside gradient-only methods.", ""]
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
