"""report.py: the self-contained run report (checked in headless Chromium), the model card, the
MedMNIST-format predictions and the summary of several runs."""
import html
import json
import re
import shutil
import statistics
import subprocess

import numpy as np
import pytest

import report

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
    shot = tmp_path / "report_top.png"
    subprocess.run([chromium, *flags, "--window-size=1200,1600", f"--screenshot={shot}",
                    (run_dir / "report.html").as_uri()], capture_output=True, timeout=120)
    from PIL import Image
    with Image.open(shot) as img:
        assert img.size == (1200, 1600) and len(set(np.asarray(img.convert("L")).ravel().tolist())) > 20
    print(f"screenshot of the report's top: {shot}")
