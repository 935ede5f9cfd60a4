"""bench.py: the quick mode runs end to end and reports every key (no timing assertions)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import bench
import original

ROOT = Path(__file__).resolve().parents[1]

KEYS = ("train_speedup", "ig_speedup", "ig_rel_delta", "db_write_speedup", "db_bytes_ratio",
        "train_speedup_vs_resnet18", "ig_speedup_vs_resnet18",
        "read_class_ms", "macs_ratio")


@pytest.mark.trains
def test_quick_benchmark_reports_every_key(tmp_path, capsys):
    bench.main(["--quick", "--json", str(tmp_path / "b.json"), "--memory-dir", str(tmp_path)])
    results = json.loads((tmp_path / "b.json").read_text())
    for key in KEYS:
        assert math.isfinite(results[key]) and results[key] > 0, key
    assert set(results["method_rates"]) == set(bench.attr.METHODS)
    assert all(rate > 0 for rate in results["method_rates"].values())
    out = capsys.readouterr().out
    assert "ratio" in out and "a probe, not a whole program" in out and "ONNX int8" in out
    for name in ("this repo", "ResNet-18"):
        rows = {r["way"]: r for r in results["inference"][name]}
        assert list(rows) == list(bench.bench_inference.WAYS)
        assert all(r["latency_ms"] > 0 and r["img_s"] > 0 for r in rows.values())
        assert rows["ONNX int8"]["bytes"] < rows["ONNX float32"]["bytes"] / 3  # int8 weights: a quarter, plus scales
    assert [r["size"] for r in results["memory"]] == [28, 64]
    for row in results["memory"]:
        for side in ("ram", "map_first", "map", "model_and_batch"):
            assert row[side]["peak_anon"] >= row[side]["baseline_anon"] > 0 and row[side]["train_img_s"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json"]  # its temporary files are gone


def test_random_npz_is_written_in_medmnist_format_chunk_by_chunk(tmp_path):
    bench.write_random_npz(tmp_path / "r.npz", 8, {"train": 5, "val": 3, "test": 2}, chunk=2)
    splits = bench.data.read_npz(tmp_path / "r.npz", 8, 9)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [5, 3, 2]
    assert splits["train"].images.shape == (5, 3, 8, 8) and splits["train"].images.float().std() > 50


def test_the_memory_sampler_sees_an_allocation_and_its_peak_stays_after_it_is_freed():
    # in a fresh process, as bench.py's probes run: a long-lived one may reuse resident freed pages
    code = """
import numpy as np, time, bench
sampler = bench.AnonPeak()
before = sampler.current()
sampler.start()
block = np.ones(200 << 20, np.uint8)  # 200 MiB, touched
time.sleep(0.05)
del block
peak = sampler.stop()
print(before, peak, sampler.current())
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    before, peak, after = map(int, done.stdout.split())
    assert peak - before >= 150 << 20 and after < peak - (150 << 20)


def test_original_model_is_the_one_the_issue_describes():
    name, shape, params, macs = bench.model_lib.layer_costs(original.original_model())[-1]
    assert params == 871_145 and shape == (9,)
    assert round(macs / 1e6, 1) == 19.5


def test_original_storage_round_trips_its_base64_text(tmp_path):
    import numpy as np
    arrays = np.random.default_rng(0).normal(size=(5, 3, 28, 28)).astype(np.float32)
    labels = np.array([1, 2, 1, 0, 1])
    original.original_store(tmp_path / "o.db", arrays, labels, labels)
    back = original.original_read_class(tmp_path / "o.db", 1)
    assert len(back) == 3 and np.array_equal(back[0], arrays[0])


def test_table_prints_counts_as_integers_and_no_ratio_for_errors():
    table = bench.format_table([("parameters", 871_145, 254_857),
                                ("IG, mean relative completeness error", 0.0039, 0.0116),
                                ("IG, attributions/s", 36.2, 847.7)]).splitlines()
    assert table[1].split()[-3:] == ["871,145", "254,857", "0.29x"]
    assert table[2].split()[-3:] == ["0.39%", "1.16%", "—"]
    assert table[3].split()[-3:] == ["36.2", "847.7", "23.42x"]


def test_peer_is_medmnists_resnet18_for_28_px():
    # MedMNIST/experiments' ResNet18(in_channels=3, num_classes=9): torchvision's 11,689,512
    # parameters, less its 7x7 first convolution (9,408) and 1000-class head (513,000), plus a 3x3
    # first convolution (1,728) and a 9-class head (4,617).
    net = bench.model_lib.MedMNISTResNet18()
    params = sum(p.numel() for p in net.parameters())
    assert params == 11_689_512 - 9_408 - 513_000 + 1_728 + 4_617
    assert net.eval()(bench.torch.rand(2, 3, 28, 28)).shape == (2, 9)
    assert isinstance(net.net.maxpool, bench.torch.nn.Identity) and net.net.conv1.stride == (1, 1)


def test_quick_slide_benchmark_maps_its_written_slide_and_reports_the_floor_beside_it(trained_run, syn_dir, tmp_path):
    result = bench.main(["--slide", "--quick", "--checkpoint", str(trained_run / "best.pt"), "--data-dir", str(syn_dir),
                         "--json", str(tmp_path / "b.json")])
    (row,) = result["slide"]
    # the square of tissue, every tile explained: with IG, and beside it the method an evaluation of the
    # checkpoint may have recommended (tests share trained_run)
    assert row["tiles"] == 12 * 12 == row["explained_tiles"] and row["explained"] in (144, 288)
    assert row["bytes_per_map"] == 3 * 28 * 28 * 2 + 9 * 4  # a float16 map and float32 probabilities
    assert all(row[k] > 0 for k in ("floor_s", "pytorch_s", "onnx_int8_s", "pytorch_peak", "onnx_int8_peak"))
    assert json.loads((tmp_path / "b.json").read_text())["slide"] == result["slide"]
