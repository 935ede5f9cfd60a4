"""predict.py: the exported model on image files without PyTorch: its classes and probabilities, its
CSV, explain.py's input warnings, the execution provider, and its errors."""
import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import colour
import export
import model as model_lib
import predict as predictor
import tiles

ROOT = Path(__file__).resolve().parents[1]
WITHOUT_TORCH = ("import sys, runpy\n"
                 "sys.modules['torch'] = None  # any import of torch now fails\n"
                 "sys.argv = ['predict.py', *sys.argv[1:]]\n"
                 "runpy.run_path('predict.py', run_name='__main__')\n")


def predict(*args):
    """predict.py run in a subprocess where importing torch fails."""
    return subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def exported(trained_run, syn_dir, tmp_path_factory):
    """export.py on the trained run, float32 only (int8 is export.py's to test): the model file."""
    out = tmp_path_factory.mktemp("export") / "model.onnx"
    export.main(["--checkpoint", str(trained_run / "best.pt"), "--data-dir", str(syn_dir), "--no-int8",
                 "--out", str(out)])
    return out


# what explain.py warns about each input of `batch` (None: nothing), and a file that is no image
WARNED = {"tiny.png": "far smaller", "huge.png": "far larger", "green.png": "colour statistics lie far",
          "typical.png": None}


def typical_image(trained_run, syn_dir):
    """The validation image whose colour lies at the median distance from the training split's:
    uint8 (H, W, C)."""
    _, meta = model_lib.load_checkpoint(trained_run / "best.pt")
    val = np.load(syn_dir / "pathmnist_synthetic.npz")["val_images"]
    distances = colour.colour_distance(meta["colour_reference"], torch.from_numpy(val).permute(0, 3, 1, 2))
    return val[int(distances.argsort()[len(distances) // 2])]


@pytest.fixture(scope="module")
def batch(exported, trained_run, syn_dir, tmp_path_factory):
    """predict.py --out once on a folder of the WARNED inputs and a file that is no image:
    (folder, completed process, CSV rows)."""
    folder = tmp_path_factory.mktemp("batch")
    typical = Image.fromarray(typical_image(trained_run, syn_dir))
    typical.save(folder / "typical.png")
    typical.resize((10, 10), Image.Resampling.BICUBIC).save(folder / "tiny.png")
    typical.resize((1000, 1000), Image.Resampling.BICUBIC).save(folder / "huge.png")
    Image.new("RGB", (64, 64), (0, 255, 0)).save(folder / "green.png")
    (folder / "notes.png").write_text("not an image")
    result = predict(exported, folder, "--out", folder / "out" / "predictions.csv")
    with open(folder / "out" / "predictions.csv", newline="") as f:
        return folder, result, list(csv.DictReader(f))


def printed_block(stdout, path):
    """The console's lines for one file: its line and the `  warning:` lines under it."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{path}: "))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith("  warning: ")), len(lines))
    return lines[start:end]


def test_out_writes_one_row_per_file_with_the_class_and_confidence_printed(batch):
    folder, result, rows = batch
    assert result.returncode == 1 and "Traceback" not in result.stderr  # notes.png could not be read
    assert list(rows[0]) == predictor.COLUMNS
    assert [row["file"] for row in rows] == [str(folder / name) for name in sorted([*WARNED, "notes.png"])]
    for row in rows:
        if row["file"].endswith("notes.png"):
            assert row["class"] == row["confidence"] == "" and "could not be read as an image" in row["error"]
            continue
        printed = printed_block(result.stdout, row["file"])[0]
        assert printed == (f"{row['file']}: {row['class']} ({predictor.percent(float(row['confidence']))})   "
                           f"top-3: {row['top3']}") and row["error"] == ""


def test_predict_warns_about_an_input_as_explain_does(batch, trained_run):
    folder, result, rows = batch
    _, meta = model_lib.load_checkpoint(trained_run / "best.pt")
    by_file = {row["file"]: row for row in rows}
    for name, expected_kind in WARNED.items():
        tile = tiles.read_tile(folder / name, 28)  # explain.py's reading and check, in torch
        image, original = tile.image, tile.original
        expected = tiles.input_warnings(image, original, 28, meta["colour_reference"])
        # joined as explain.py's CSV joins them (not split back: one sentence holds a "; " itself)
        assert by_file[str(folder / name)]["warnings"] == "; ".join(expected), name
        assert printed_block(result.stdout, folder / name)[1:] == [f"  warning: {w}" for w in expected], name
        assert any(expected_kind in w for w in expected) if expected_kind else expected == [], name


def test_the_first_line_names_the_provider_that_ran(batch):
    _, result, _ = batch
    assert result.stdout.splitlines()[0].endswith("; onnxruntime on CPUExecutionProvider")


def test_numpy_colour_features_equal_torchs():
    rng = np.random.default_rng(0)
    for shape in ((5, 28, 28, 3), (2, 64, 64, 3), (3, 28, 28, 1)):
        images = rng.integers(0, 256, shape, dtype=np.uint8)
        expected = colour.colour_features(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
        np.testing.assert_allclose(predictor.colour_features(images), expected, rtol=0, atol=1e-6)


def test_a_model_exported_without_colour_statistics_gets_no_colour_warning(exported, tmp_path):
    graph = onnx.load(str(exported))  # as export.py wrote models before it stored the colour statistics
    kept = [p for p in graph.metadata_props if p.key != "colour_reference"]
    del graph.metadata_props[:]
    graph.metadata_props.extend(kept)
    onnx.save(graph, str(tmp_path / "old.onnx"))
    Image.new("RGB", (64, 64), (0, 255, 0)).save(tmp_path / "green.png")
    result = predict(tmp_path / "old.onnx", tmp_path / "green.png")
    assert result.returncode == 0, result.stderr
    assert "green.png: " in result.stdout and "warning" not in result.stdout


def test_provider_cuda_without_cuda_fails_with_one_paragraph(exported, tmp_path):
    import onnxruntime
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the error cannot happen here")
    Image.new("RGB", (28, 28), (200, 120, 180)).save(tmp_path / "tile.png")
    result = predict(exported, tmp_path / "tile.png", "--provider", "cuda")
    assert result.returncode == 1 and "Traceback" not in result.stderr and result.stdout == ""
    assert result.stderr.startswith("error: --provider cuda needs") and result.stderr.strip().count("\n") == 0
    assert "CPUExecutionProvider" in result.stderr and "pip install onnxruntime-gpu" in result.stderr


def test_auto_takes_cuda_where_onnxruntime_has_it_and_the_cpu_otherwise():
    cuda, cpu = "CUDAExecutionProvider", "CPUExecutionProvider"
    assert predictor.execution_providers("auto", [cuda, cpu]) == [cuda, cpu]
    assert predictor.execution_providers("auto", ["AzureExecutionProvider", cpu]) == [cpu]
    assert predictor.execution_providers("cpu", [cuda, cpu]) == [cpu]


@pytest.mark.parametrize("p, shown", [(0.9996, ">99.9%"), (0.0004, "<0.1%"), (0.973, "97.3%"), (1.0, "100.0%"),
                                      (0.0, "0.0%"), (0.9994, "99.9%")])
def test_percentages_never_round_to_a_certainty_they_are_not(p, shown):
    assert predictor.percent(p) == shown


def test_ctrl_c_exits_130_without_a_traceback():
    interrupted = ("import sys\n"
                   "sys.modules['torch'] = None\n"
                   "import predict\n"
                   "def interrupt(*args, **kwargs):\n"
                   "    raise KeyboardInterrupt\n"
                   "predict.Model = interrupt  # as if Ctrl-C came while the model loads\n"
                   "sys.exit(predict.run(['model.onnx', 'tile.png']))\n")
    result = subprocess.run([sys.executable, "-c", interrupted], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 130 and "Traceback" not in result.stderr and "Interrupted" in result.stderr


def test_predict_classifies_image_files_without_torch_as_pytorch_does(exported, trained_run, tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(tmp_path / f"tile{i}.png")
    result = predict(exported, tmp_path)
    assert result.returncode == 0, result.stderr
    net, meta = model_lib.load_checkpoint(trained_run / "best.pt")
    lines = [line for line in result.stdout.splitlines() if line.startswith(str(tmp_path))]
    assert len(lines) == 3
    for i, line in enumerate(lines):
        image = tiles.read_tile(tmp_path / f"tile{i}.png", 28).image  # explain.py's reading, in PyTorch
        with torch.no_grad():
            probs = torch.softmax(net(colour.to_unit(image[None])), 1)[0]
        top = int(probs.argmax())
        assert f": {meta['class_names'][top]} ({predictor.percent(float(probs[top]))})" in line


def test_predict_says_what_is_wrong_with_an_input_and_goes_on(exported, tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    Image.new("RGB", (28, 28), (200, 120, 180)).save(tmp_path / "good.png")
    result = predict(exported, tmp_path / "notes.png", tmp_path / "good.png")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "notes.png could not be read as an image" in result.stderr and "good.png: " in result.stdout


def test_the_predictor_refuses_an_array_of_the_wrong_shape_or_channels(exported):
    model = predictor.Model(exported)
    for bad in (np.zeros((1, 28, 28, 1), np.uint8), np.zeros((1, 32, 32, 3), np.uint8), np.zeros((1, 28, 28, 3))):
        with pytest.raises(predictor.PredictError, match=r"takes uint8 images of shape \(N, 28, 28, 3\)"):
            model.probabilities(bad)
