"""export.py: the model as ONNX, its parity with PyTorch, int8, and the metadata that says what the file
is (predict.py, which reads it, is tested in test_predict.py)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import colour
import export
import model as model_lib

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(trained_run, syn_dir, tmp_path_factory):
    """export.py on the trained run, into a folder of its own: (folder, report)."""
    out = tmp_path_factory.mktemp("export")
    report = export.main(["--checkpoint", str(trained_run / "best.pt"), "--data-dir", str(syn_dir),
                          "--out", str(out / "model.onnx")])
    return out, report


def test_the_float_model_matches_pytorch_on_every_test_image(exported, trained_run, syn_dir):
    out, report = exported
    f = report["float32"]
    assert report["test_images"] == 300 and f["max_abs_logit"] <= 1e-4 and f["argmax_agreement"] == 1.0
    # recomputed here, independently of export.py's own check: raw uint8 NHWC pixels in, logits out
    import onnxruntime
    net, meta = model_lib.load_checkpoint(trained_run / "best.pt")
    images = torch.from_numpy(np.load(syn_dir / "pathmnist_synthetic.npz")["test_images"][:64])  # (N, H, W, C)
    logits = onnxruntime.InferenceSession(str(out / "model.onnx")).run(None, {"images": images.numpy()})[0]
    with torch.no_grad():
        expected = net(colour.to_unit(images.permute(0, 3, 1, 2))).numpy()
    assert np.abs(logits - expected).max() <= 1e-4


def test_the_batch_size_is_free(exported):
    import onnxruntime
    out, _ = exported
    run = onnxruntime.InferenceSession(str(out / "model.onnx"))
    for n in (1, 7, 300):
        assert run.run(None, {"images": np.zeros((n, 28, 28, 3), np.uint8)})[0].shape == (n, 9)


def test_the_int8_model_agrees_with_float32_and_is_smaller(exported):
    out, report = exported
    assert report["int8"]["argmax_agreement"] >= 0.99
    assert report["sizes"]["int8"] < report["sizes"]["float32"] / 2
    assert abs(report["int8"]["acc"] - report["float32"]["acc"]) <= 0.02
    assert json.loads((out / "export.json").read_text()) == report


def test_the_file_says_what_it_is(exported, trained_run):
    out, _ = exported
    meta = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    _, ckpt = model_lib.load_checkpoint(trained_run / "best.pt")
    assert json.loads(meta["class_names"]) == ckpt["class_names"] and meta["task"] == "multi-class"
    assert meta["size"] == "28" and meta["input"] == "uint8-nhwc" and meta["synthetic"] == "True"
    assert meta["data_md5"] == ckpt["provenance"]["md5"] and len(meta["checkpoint_sha256"]) == 64
    assert json.loads(meta["colour_reference"]) == ckpt["colour_reference"]  # predict.py's colour warning needs it


def test_a_float_nchw_graph_takes_unit_pixels(trained_run, syn_dir, tmp_path):
    import onnxruntime
    export.main(["--checkpoint", str(trained_run / "best.pt"), "--data-dir", str(syn_dir), "--input", "float-nchw",
                 "--no-int8", "--out", str(tmp_path / "f.onnx")])
    x = np.random.default_rng(0).random((3, 3, 28, 28), dtype=np.float32)
    net, _ = model_lib.load_checkpoint(trained_run / "best.pt")
    logits = onnxruntime.InferenceSession(str(tmp_path / "f.onnx")).run(None, {"images": x})[0]
    with torch.no_grad():
        assert np.abs(logits - net(torch.from_numpy(x)).numpy()).max() <= 1e-4


def test_a_checkpoint_that_is_not_one_is_refused_with_a_paragraph(tmp_path):
    (tmp_path / "bad.pt").write_text("not a checkpoint")
    result = subprocess.run([sys.executable, "export.py", "--checkpoint", str(tmp_path / "bad.pt")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr and result.stderr.startswith("error: ")
