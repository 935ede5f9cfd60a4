"""gpu_check.py: its CPU dry run goes through every step, so the GPU check cannot rot between GPU runs."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import gpu_check

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """`python gpu_check.py --device cpu --dry-run` in a subprocess: (exit code, its JSON, output)."""
    out = tmp_path_factory.mktemp("gpu_check")
    done = subprocess.run([sys.executable, "gpu_check.py", "--device", "cpu", "--dry-run", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    return done.returncode, json.loads((out / "gpu_check.json").read_text()), done.stdout + done.stderr, out


@pytest.mark.trains
def test_the_dry_run_passes_every_step_and_leaves_only_its_json(dry_run):
    code, report, output, out = dry_run
    assert code == 0, output[-3000:]
    assert [s for s, step in report["steps"].items() if "error" not in step] == \
        ["training", "full_epoch", "evaluate", "torchrun", "bench"]
    assert all(report["checks"][f"{s} ran"] for s in report["steps"])
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json"]  # the work folder is gone


@pytest.mark.trains
def test_the_dry_run_measures_every_training_variant_and_each_default_methods_rate(dry_run):
    _, report, _, _ = dry_run
    runs = report["steps"]["training"]["runs"]
    assert {(r["size"], r["amp"]) for r in runs} == {(28, "off"), (28, "on"), (64, "off"), (64, "on")}
    assert all(r["img_s"] > 0 and r["peak_bytes"] > 0 for r in runs)
    assert set(report["steps"]["evaluate"]["attr_s"]) == set(gpu_check.METHODS)
    assert report["steps"]["torchrun"]["same_rows"] and report["steps"]["torchrun"]["rows"] > 0


@pytest.mark.trains
def test_checks_of_a_trained_model_are_skipped_not_passed_in_the_dry_run(dry_run):
    _, report, _, _ = dry_run
    assert report["checks"]["evaluate names a recommended method"] is None
    assert report["targets"]["train_img_s_28"]["measured"] > 0 and report["targets"]["ig_attr_s"]["target"] == 20_000


def test_a_failed_check_makes_the_script_fail(monkeypatch, tmp_path):
    def broken(cfg, work, device, checks):
        raise RuntimeError("planted")
    monkeypatch.setattr(gpu_check, "training", broken)
    for name in ("full_epoch", "evaluation", "torchrun", "bench"):
        monkeypatch.setattr(gpu_check, name, lambda cfg, work, device, checks: {})
    with pytest.raises(gpu_check.cli.UserError, match="training ran"):
        gpu_check.main(["--device", "cpu", "--dry-run", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert "planted" in report["steps"]["training"]["error"]
