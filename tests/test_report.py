"""report.py: the self-contained run report (checked in headless Chromium), the model card, the
MedMNIST-format predictions and the summary of several runs."""
import html
import json
import re
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cli
import evaluate
import report
from files import sha256_of

ROOT = Path(__file__).resolve().parents[1]

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def test_the_report_is_one_file_with_every_section_and_no_outside_reference(evaluated_run):
    run_dir, _ = evaluated_run
    page = (run_dir / "report.html").read_text()
    for heading in report.SECTIONS:
        assert f"<h2>{heading}</h2>" in page
    sources = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "SYNTHETIC data, not PathMNIST" in page


def test_the_reports_numbers_are_metrics_json(evaluated_run):
    run_dir, metrics = evaluated_run
    page = (run_dir / "report.html").read_text()
    lo, hi = metrics["acc_ci95"]
    assert f"{metrics['acc']:.4f} (95% CI {lo:.4f}–{hi:.4f})" in page
    assert f"{metrics['val']['acc']:.4f}" in page and f"{metrics['ece']:.4f}" in page
    assert lo <= metrics["acc"] <= hi


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, train_argv):
    """A two-epoch run on a small synthetic set with non-default settings (a zero among them),
    evaluated without explanations: (run dir, metrics)."""
    import datasets
    import synthetic
    import train
    folder = tmp_path_factory.mktemp("small")
    synthetic.write_synthetic(folder / "data" / datasets.synthetic_file_name(28), 28,
                              counts={"train": 200, "val": 50, "test": 50}, seed=1)
    train.main(train_argv(folder / "data", folder / "run", "--epochs", "2", "--batch-size", "32",
                          "--stain-jitter", "0", "--lr", "0.002"))
    metrics = evaluate.main(["--checkpoint", str(folder / "run" / "best.pt"), "--data-dir", str(folder / "data"),
                             "--explain", "0", "--quality", "0"])
    return folder / "run", metrics


def test_the_printed_train_command_trains_the_same_best_pt_again(small_run, tmp_path, threads):
    run_dir, metrics = small_run
    command = metrics["commands"]["train"]
    assert html.escape(command) in (run_dir / "report.html").read_text()
    words = shlex.split(command)
    words[words.index("--out") + 1] = str(tmp_path / "again")  # a fresh folder
    assert words[:2] == ["python", "train.py"]
    # the machine's threads, as the run had them: a checkpoint records settings, not the machine,
    # and the number of threads changes float sums
    subprocess.run([sys.executable, *words[1:], "--threads", threads], cwd=ROOT, check=True, capture_output=True,
                   timeout=600)
    assert sha256_of(tmp_path / "again" / "best.pt") == metrics["checkpoint_sha256"]


def test_the_printed_train_command_parses_back_to_every_setting_zeros_included():
    import train
    args = train.parse_args(["--synthetic", "--stain-jitter", "0", "--seed", "0", "--flips", "off", "--amp", "off"])
    settings = {**{k: getattr(args, k) for k in train.RESULT_SETTINGS if k != "world_size"}, "world_size": 1}
    line = cli.train_command(settings, "data", "runs/x y")
    again = train.parse_args(shlex.split(line)[2:])
    assert {k: getattr(again, k) for k in settings if k != "world_size"} == {
        k: v for k, v in settings.items() if k != "world_size"}
    assert "--stain-jitter 0.0" in line and "--seed 0" in line and "--out 'runs/x y'" in line


def test_the_printed_evaluate_command_parses_back_to_the_same_settings():
    argv = ["--checkpoint", "runs/x y/best.pt", "--data-dir", "data", "--n-steps", "16", "--methods", "ig,saliency",
            "--tta", "--baseline", "black", "--quality", "all", "--attr-dtype", "float32"]
    args = evaluate.parse_args(argv)
    line = cli.command_line("evaluate.py", evaluate.parse_args, args, ("checkpoint", "data_dir"))
    assert line.startswith("python evaluate.py --checkpoint 'runs/x y/best.pt' --data-dir data ")
    assert vars(evaluate.parse_args(shlex.split(line)[2:])) == vars(args)
    assert "--ig-batch" not in line and "--device" not in line  # defaults are left out


HARD_CODED = ("move by a point or more", "IG fails the model-randomisation check on the demo model",
              "this gap is the stain shift's cost")


def rendered(metrics, meta):
    """(report.html text, MODEL_CARD.md text) for these metrics, without the figures."""
    return report.render("/nonexistent", metrics, meta), report.model_card(metrics, meta)


def test_no_sentence_of_the_card_or_report_is_written_whatever_the_run_measured(evaluated_run):
    run_dir, metrics = evaluated_run
    _, meta = report.load_run(run_dir)
    for flag, synthetic in (("retinamnist", False), ("pathmnist", True), ("pathmnist", False)):
        m = json.loads(json.dumps(metrics))
        m_meta = {**meta, "provenance": {**meta["provenance"], "flag": flag, "synthetic": synthetic}}
        m["trust"]["ig"]["mprt"]["pass"] = not metrics["trust"]["ig"]["mprt"]["pass"]  # the opposite verdict
        page, card = rendered(m, m_meta)
        for sentence in HARD_CODED:
            assert sentence not in page and sentence not in card
        other_centre = flag == "pathmnist" and not synthetic  # centre_shift.OTHER_CENTRE, with its source
        assert ("CRC-VAL-HE-7K" in page) == other_centre and ("Kather et al." in card) == other_centre
        ig_passes = all(t["pass"] for t in m["trust"]["ig"].values())
        assert ("Integrated Gradients (ig) passes every test" in card) == ig_passes
        assert ("ig fails MPRT" in card) == (not m["trust"]["ig"]["mprt"]["pass"])


def test_igs_completeness_is_in_the_report_once(evaluated_run):
    run_dir, metrics = evaluated_run
    _, meta = report.load_run(run_dir)
    q = metrics["explanations"]["ig"]["quality"]
    line = f"Integrated Gradients for {q['completeness_images']} test images: mean relative completeness error"
    assert rendered(metrics, meta)[0].count(line) == 1


# ----------------------------------------------------------------------------- one truth in every output

def three_outputs(metrics, meta):
    """(console, report.html, MODEL_CARD.md) rendered from one metrics.json, as evaluate.py and
    report.py render them."""
    console = report.console_results(metrics, "Test split") + "\n" + report.console_explanations(metrics)
    return (console, *rendered(metrics, meta))


def headline(metrics):
    """Each headline number as it must read, worked out here (not through formats.py): metrics to
    four decimals, shares to one decimal of a percent."""
    ig, tol = metrics["explanations"]["ig"]["quality"], metrics["store"]["ig_settings"]["tolerance"]
    return {"ACC": f"{metrics['acc']:.4f}", "AUC": f"{metrics['auc']:.4f}", "ECE": f"{metrics['ece']:.4f}",
            "ACC interval": "{:.4f}–{:.4f}".format(*metrics["acc_ci95"]),
            "AUC interval": "{:.4f}–{:.4f}".format(*metrics["auc_ci95"]),
            "validation ACC": f"{metrics['val']['acc']:.4f}",
            "IG completeness": f"{ig['completeness_share'] * 100:.1f}% within {tol * 100:.1f}%",
            "IG mean error": f"mean relative completeness error {ig['mean_relative_error'] * 100:.1f}%",
            "IG completeness cell": f"{metrics['trust']['ig']['completeness']['value'] * 100:.1f}% ✓",
            "flagged": f"flags {metrics['centre_shift']['flagged']['share'] * 100:.1f}% of test images",
            "recommended": f"{metrics['recommended']} (recommended)"}


@pytest.fixture
def tricky_metrics(evaluated_run):
    """The evaluated run's metrics.json with IG's completeness at 0.998 (which ':.0%' reads as 100%)."""
    run_dir, metrics = evaluated_run
    m = json.loads((run_dir / "metrics.json").read_text())
    m["explanations"]["ig"]["quality"]["completeness_share"] = 0.998
    m["trust"]["ig"]["completeness"]["value"] = 0.998
    return m, report.load_run(run_dir)[1]


def test_each_headline_number_reads_the_same_on_the_console_in_the_report_and_in_the_card(tricky_metrics):
    metrics, meta = tricky_metrics
    outputs = dict(zip(("console", "report", "card"), three_outputs(metrics, meta), strict=True))
    for what, text in headline(metrics).items():
        for where, output in outputs.items():
            assert html.escape(text) in output or text in output, f"{what} ({text}) is not in the {where}"
    for where, output in outputs.items():
        assert "100% within" not in output and "100.0%" not in output, where  # 0.998 is not every image


def test_no_output_prints_a_float_unrounded(tricky_metrics):
    metrics, meta = tricky_metrics
    for output in three_outputs(metrics, meta):
        assert not re.findall(r"\d\.\d{7,}", output)  # e.g. 0.32029240000000003 or 0.5976250000000001


def test_metrics_json_keeps_six_significant_digits(evaluated_run):
    run_dir, _ = evaluated_run
    floats = re.findall(r"-?\d+\.\d+(?:e-?\d+)?", (run_dir / "metrics.json").read_text())
    assert floats and all(len(f.lstrip("-").split("e")[0].replace(".", "").lstrip("0")) <= 6 for f in floats)


def test_every_provenance_row_of_the_report_is_filled(evaluated_run):
    run_dir, metrics = evaluated_run
    page = (run_dir / "report.html").read_text()
    provenance = page.split("<h2>Provenance</h2>")[1].split("<h2>")[0]
    rows = re.findall(r"<tr><td>(.*?)</td><td>(.*?)</td></tr>", provenance)
    assert {"IG settings", "evaluated on", "checkpoint SHA-256", "model cost"} <= {k for k, _ in rows}
    assert all(v.strip() not in ("", "—", "{}", "?") for _, v in rows), rows
    assert html.escape(json.dumps(metrics["store"]["ig_settings"], sort_keys=True)) in provenance
    assert f"{metrics['evaluated_on']['threads']} CPU thread" in provenance


def test_the_cards_failure_modes_name_only_classes_recalled_imperfectly(tricky_metrics):
    metrics, meta = tricky_metrics
    perfect = json.loads(json.dumps(metrics))
    for c in perfect["per_class"]:
        c["recall"] = 1.0
    assert "low recall" not in report.model_card(perfect, meta).lower()
    assert "Every class of the test split was recalled perfectly" in report.model_card(perfect, meta)
    one = json.loads(json.dumps(perfect))
    one["per_class"][3]["recall"] = 0.75
    lines = [line for line in report.model_card(one, meta).splitlines() if line.startswith("- Low recall")]
    assert lines == [f"- Low recall: {one['per_class'][3]['class']} (0.7500)"]


def test_the_centre_shift_numbers_are_in_the_report_and_card(evaluated_run):
    run_dir, metrics = evaluated_run
    s = metrics["centre_shift"]
    page, card = (run_dir / "report.html").read_text(), (run_dir / "MODEL_CARD.md").read_text()
    assert [r["class"] for r in s["recall"]] == [c["class"] for c in metrics["per_class"]]
    assert all(r["test"] == pytest.approx(c["recall"]) for r, c in zip(s["recall"], metrics["per_class"], strict=True))
    colour = f"{s['colour_only']['test']:.4f} on test"
    assert colour in card and colour in page
    assert f"{s['flagged']['share']:.1%} of test images" in page
    assert f"balanced ACC {metrics['balanced_acc']:.4f}" in card


def test_predictions_csv_reads_back_in_medmnists_way_to_the_same_acc(evaluated_run, syn_dir):
    import pandas as pd
    from medmnist.evaluator import getACC

    import data
    run_dir, metrics = evaluated_run
    scores = pd.read_csv(run_dir / "predictions_test.csv", index_col=0, header=None).sort_index().values
    labels = data.load(syn_dir, 28, synthetic=True).test.labels.numpy()
    assert scores.shape == (len(labels), 9)
    assert getACC(labels, scores, "multi-class") == pytest.approx(metrics["acc"])
    assert (run_dir / "predictions_val.csv").is_file()


def test_the_model_card_says_what_the_model_is_for_and_repeats_the_metrics(evaluated_run):
    run_dir, metrics = evaluated_run
    card = (run_dir / "MODEL_CARD.md").read_text()
    assert "Not a diagnostic device" in card and "SYNTHETIC" in card
    assert f"ACC {metrics['acc']:.4f}" in card and "## Known failure modes" in card


def test_several_runs_are_summarised_as_mean_and_sd(evaluated_run, tmp_path):
    run_dir, metrics = evaluated_run
    accs = [0.90, 0.92, 0.97]
    runs = []
    for i, acc in enumerate(accs):  # three copies of the run, told apart by their ACC
        copy = tmp_path / f"seed{i}"
        shutil.copytree(run_dir, copy)
        (copy / "metrics.json").write_text(json.dumps({**metrics, "acc": acc, "checkpoint": str(copy / "best.pt")}))
        runs.append(str(copy))
    report.main([*runs, "--out", str(tmp_path / "summary.html")])
    page = (tmp_path / "summary.html").read_text()
    assert f"{statistics.fmean(accs):.4f}" in page and f"{statistics.stdev(accs):.4f}" in page
    assert all(f"seed{i}" in page for i in range(3))


def browser():
    found = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if not found:
        pytest.skip("SKIPPED: no Chromium found, so the report was not checked in a browser. Install "
                    "Debian's chromium package (apt-get install chromium); .ci/run does.")
    return found


PROBE = """<script>
window.addEventListener('load', () => {
  const out = {headings: [...document.querySelectorAll('h2')].map(h => h.textContent), images: []};
  for (const img of document.images) {
    const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
    const g = c.getContext('2d'); g.drawImage(img, 0, 0);
    const d = c.width ? g.getImageData(0, 0, c.width, c.height).data : [];
    const colours = new Set();
    for (let i = 0; i < d.length; i += 4 * 31) colours.add(d[i] + ',' + d[i + 1] + ',' + d[i + 2]);
    out.images.push({width: img.naturalWidth, colours: colours.size});
  }
  out.resources = performance.getEntriesByType('resource').map(e => e.name);
  out.trust = [...document.querySelectorAll('.trust table tr')].map(r => [...r.cells].map(c => c.textContent));
  out.text = document.body.innerText;
  const pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def test_chromium_renders_every_section_and_decodes_every_figure(evaluated_run, tmp_path):
    chromium = browser()
    run_dir, metrics = evaluated_run
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--allow-file-access-from-files",
             "--host-resolver-rules=MAP * ~NOTFOUND"]  # any request leaving the page would fail
    probed = tmp_path / "probed.html"  # the report itself has no script; the probe is added to a copy
    probed.write_text((run_dir / "report.html").read_text().replace("</body>", PROBE + "</body>"))
    dom = subprocess.run([chromium, *flags, "--virtual-time-budget=10000", "--dump-dom", probed.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    result = json.loads(html.unescape(found.group(1)))
    assert result["headings"] == list(report.SECTIONS)
    assert len(result["images"]) >= 5 and all(i["width"] > 100 and i["colours"] > 20 for i in result["images"])
    assert all(r.startswith("data:") for r in result["resources"])
    assert f"{metrics['acc']:.4f}" in result["text"] and f"{metrics['auc']:.4f}" in result["text"]
    # The trust table leads the explanations: a row per method and control, ✓ or ✗ per test.
    header, *rows = result["trust"]
    assert header[0] == "method" and "MPRT (bottom-up)" in header and "ROAD LeRF − MoRF" in header
    assert {r[0].split(" ")[0] for r in rows} >= {*metrics["trust"]} and rows[-1][0] == "threshold"
    ig = next(r for r in rows if r[0].startswith("ig"))
    assert all(cell.endswith(("✓", "✗")) or cell == "—" for cell in ig[1:])
    shot = tmp_path / "report_top.png"
    subprocess.run([chromium, *flags, "--window-size=1200,1600", f"--screenshot={shot}",
                    (run_dir / "report.html").as_uri()], capture_output=True, timeout=120)
    from PIL import Image
    with Image.open(shot) as img:
        assert img.size == (1200, 1600) and len(set(np.asarray(img.convert("L")).ravel().tolist())) > 20
    print(f"screenshot of the report's top: {shot}")
