"""predict.py: classify image files with an exported model, without PyTorch (onnxruntime, numpy, Pillow).

    python predict.py runs/pathmnist-synthetic_28/model.onnx tile.png more.tif   # class, top-3, warnings per file
    python predict.py model_int8.onnx folder/ --out predictions.csv              # every image in a folder, and a CSV
    python predict.py model.onnx folder/ --provider cuda                         # on an NVIDIA GPU (onnxruntime-gpu)

Made by export.py, the model file says what it takes (its metadata: size, channels, input layout,
class names, the training split's colour statistics), so this script needs nothing else: copy it and
the .onnx file to a laptop or a microscope's PC with `pip install onnxruntime numpy pillow`. Each
image is read the way explain.py reads it (first frame, alpha on white, centre-cropped to a square,
antialiased bicubic to the model's size); files go to onnxruntime BATCH at a time, on CUDA where the
installed onnxruntime has it (`--provider`), else on the CPU; the first line printed says which.

Each file gets explain.py's warnings (the sentences are defined here, and tiles.input_warnings uses
them): an image far smaller than the model's input, far larger than a 224 px tile, or with colour
statistics (per-channel mean and s.d.) unlike the training split's. A model exported before
export.py wrote the colour statistics into its metadata gets no colour check. Probabilities are
shown as percentages with one decimal, never rounded to 100.0% or 0.0% when they are not (`percent`).
`--out FILE.csv` also writes one row per file: file, class, confidence, top3, warnings, error. In Python:

    import predict
    model = predict.Model("model.onnx")              # provider="auto": CUDA if onnxruntime has it, else CPU
    image, original = predict.read_with_size("tile.png", model.size, model.channels)
    names, probs = model.classes, model.probabilities(image[None])
    warnings = predict.input_warnings(image, original, model.size, model.colour_reference)
"""
import argparse
import contextlib
import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
TILE_PX = 224  # PathMNIST's source tiles: 224 x 224 px at 0.5 um/px
BATCH = 64  # files per onnxruntime call: one call per file leaves a GPU idle; 64 at 224 px is 10 MB of pixels
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
COLUMNS = ["file", "class", "confidence", "top3", "warnings", "error"]


class PredictError(Exception):
    """An input this model cannot take; the message says what to do."""


class Model:
    """An exported model and what its metadata says about it."""

    def __init__(self, path, provider="auto"):
        self.session = inference_session(path, provider)
        self.provider = self.session.get_providers()[0]  # the one that runs the model
        meta = self.session.get_modelmeta().custom_metadata_map
        if "class_names" not in meta or "input" not in meta:
            raise PredictError(f"{path} is an ONNX model, but not one export.py wrote: its metadata lacks the class "
                               f"names and input layout this script needs.")
        self.classes = json.loads(meta["class_names"])
        self.size, self.layout, self.task = int(meta["size"]), meta["input"], meta["task"]
        shape = self.session.get_inputs()[0].shape
        self.channels = shape[3] if self.layout == "uint8-nhwc" else shape[1]
        self.describe = meta.get("describe", meta.get("dataset", ""))
        # models exported before export.py wrote the colour statistics have none: they get no colour check
        self.colour_reference = json.loads(meta["colour_reference"]) if "colour_reference" in meta else None

    def probabilities(self, images_u8):
        """uint8 (N, H, W, C) images -> class probabilities (N, K): softmax, or a sigmoid per label
        for a multi-label model."""
        images_u8 = np.asarray(images_u8)
        expected = (self.size, self.size, self.channels)
        if images_u8.dtype != np.uint8 or images_u8.ndim != 4 or images_u8.shape[1:] != expected:
            raise PredictError(f"This model takes uint8 images of shape (N, {self.size}, {self.size}, "
                               f"{self.channels}); it was given {images_u8.dtype} {images_u8.shape}. Read files with "
                               f"predict.read(path, {self.size}, {self.channels}).")
        x = images_u8 if self.layout == "uint8-nhwc" else images_u8.transpose(0, 3, 1, 2).astype(np.float32) / 255
        logits = self.session.run(None, {"images": x})[0].astype(np.float64)
        if self.task.startswith("multi-label"):
            return 1 / (1 + np.exp(-logits))
        e = np.exp(logits - logits.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)


def inference_session(path, provider="auto"):
    """onnxruntime's session for the model file at `path` on `provider` (auto, cpu or cuda)."""
    import onnxruntime
    providers = execution_providers(provider, onnxruntime.get_available_providers())
    try:
        session = onnxruntime.InferenceSession(str(path), providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types for unreadable files
        raise PredictError(f"{path} could not be loaded as an ONNX model ({type(e).__name__}: {e}). Pass a "
                           f"model.onnx written by export.py.") from e
    if provider == "cuda" and session.get_providers()[0] != PROVIDERS["cuda"]:  # onnxruntime falls back quietly
        raise PredictError(f"onnxruntime {onnxruntime.__version__} has the CUDA provider but could not start it "
                           f"(onnxruntime's log above says why: usually CUDA or cuDNN libraries missing, or of "
                           f"another version than this onnxruntime-gpu needs). Install the versions its "
                           f"documentation names, or pass --provider cpu.")
    return session


def execution_providers(choice, available):
    """onnxruntime's provider list for `choice` (auto, cpu or cuda), given the providers this
    onnxruntime has (`available`): auto takes CUDA where it is there; cuda where it is not is an error."""
    cuda, cpu = PROVIDERS["cuda"], PROVIDERS["cpu"]
    if choice not in ("auto", *PROVIDERS):
        raise PredictError(f"provider {choice!r} is not one this script knows; pass auto, cpu or cuda.")
    if choice == "cuda" and cuda not in available:
        raise PredictError(f"--provider cuda needs onnxruntime's {cuda}, but the onnxruntime installed here has only "
                           f"{', '.join(available)}: it is the CPU build. To run on an NVIDIA GPU, replace it with "
                           f"the GPU build (pip uninstall onnxruntime, then pip install onnxruntime-gpu, with the "
                           f"CUDA and cuDNN versions its documentation names); or pass --provider cpu, or auto to "
                           f"take CUDA only where it is there.")
    return [cuda, cpu] if choice == "cuda" or (choice == "auto" and cuda in available) else [cpu]


def read(path, size, channels=3):
    """An image file as uint8 (size, size, channels), as explain.py reads files for the model."""
    return read_with_size(path, size, channels)[0]


def read_with_size(path, size, channels=3):
    """An image file as uint8 (size, size, channels), as explain.py reads files for the model, and its
    (width, height) as read (which the size warnings need)."""
    try:
        with Image.open(path) as img:
            img.seek(0)
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
            img = img.convert("RGB" if channels == 3 else "L")
            original, side = img.size, min(img.size)
            img = ImageOps.fit(img, (side, side), centering=(0.5, 0.5))
            img = img.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=None)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise PredictError(f"{path} could not be read as an image ({e}); give a PNG, JPEG or TIFF tile.") from e
    return np.asarray(img, dtype=np.uint8).reshape(size, size, channels), original


def colour_features(images_u8):
    """Per uint8 (N, H, W, C) image, the mean and standard deviation of each channel on the [0, 1]
    scale: (N, 2C) float64, means first, as colour.colour_features computes them in torch. Its s.d. is
    torch's unbiased one (n - 1), hence ddof=1; float64 here, float32 there: they differ by ~1e-7."""
    images_u8 = np.asarray(images_u8)
    x = images_u8.reshape(len(images_u8), -1, images_u8.shape[-1]).astype(np.float64) / 255
    return np.concatenate([x.mean(1), x.std(1, ddof=1)], 1)


def colour_distance(reference, images_u8):
    """Mahalanobis distance of each uint8 (N, H, W, C) image's colour features from the training
    split's (`reference`: the checkpoint's colour_reference), as colour.colour_distance computes it."""
    diff = colour_features(images_u8) - np.asarray(reference["mean"], dtype=np.float64)
    return np.sqrt(np.einsum("ni,ij,nj->n", diff, np.asarray(reference["cov_inv"], dtype=np.float64), diff))


def input_warnings(image_u8, original, size, colour_reference):
    """Why the model's answer for a uint8 (H, W, C) image, read from a file of (width, height)
    `original`, may mean little: the sentences of warning_sentences (colour_reference None: no colour
    check)."""
    distance = float(colour_distance(colour_reference, image_u8[None])[0]) if colour_reference else None
    return warning_sentences(original, size, distance, colour_reference)


def warning_sentences(original, size, distance=None, colour_reference=None):
    """The warnings for an input read from a file of (width, height) `original` for a model taking
    `size` px, whose colour features lie `distance` from the training split's: a tiny or huge source
    image, or a distance above the threshold colour_reference holds. tiles.input_warnings (explain.py)
    computes the distance in torch and takes its sentences from here, so both scripts say the same."""
    warnings = []
    if min(original) < size / 2:
        warnings.append(f"the image is {original[0]}x{original[1]} px, far smaller than the model's "
                        f"{size} px input: upsampling invents the detail the model looks at")
    if max(original) > 4 * TILE_PX:
        warnings.append(f"the image is {original[0]}x{original[1]} px, far larger than a {TILE_PX} px "
                        f"tile: its centre square is squeezed to {size} px, so crop or tile it first")
    if colour_reference and distance > colour_reference["threshold"]:
        warnings.append(f"its colour statistics lie far from the training images' (distance "
                        f"{distance:.1f}, above the {colour_reference['threshold']:.1f} that "
                        f"{colour_reference['percentile']}% of validation images stay under): "
                        f"another stain, scanner or kind of image")
    return warnings


def percent(p):
    """A probability as a percentage with one decimal (97.3%), never rounded to a certainty it is not:
    >99.9% for a value below 1 that would show as 100.0%, <0.1% for one above 0 that would show 0.0%."""
    text = f"{p:.1%}"
    if text == "100.0%" and p < 1:
        return ">99.9%"
    if text == "0.0%" and p > 0:
        return "<0.1%"
    return text


def files(inputs):
    """The files to classify: each file given, and the image files inside each folder given."""
    out = []
    for item in map(Path, inputs):
        out += sorted(p for p in item.iterdir() if p.suffix.lower() in SUFFIXES) if item.is_dir() else [item]
    return out


def classified_rows(model, paths):
    """One row per path (write_csv's), in order: each readable file classified (one onnxruntime call for all of
    them) with its warnings, each unreadable one with its error (and no class)."""
    rows, read_ok = [], {}
    for i, path in enumerate(paths):
        try:
            read_ok[i] = read_with_size(path, model.size, model.channels)
            rows.append(None)
        except PredictError as e:
            rows.append({"file": str(path), "error": str(e)})
    if read_ok:
        probs = model.probabilities(np.stack([image for image, _ in read_ok.values()]))
        for (i, (image, original)), p in zip(read_ok.items(), probs, strict=True):
            warnings = input_warnings(image, original, model.size, model.colour_reference)
            rows[i] = prediction_row(paths[i], model.classes, p, warnings)
    return rows


def prediction_row(path, classes, probs, warnings):
    """A classified file's row: its top class, that class's probability (a float, 0 to 1, written in
    full so that it reads back to the printed percentage), the top-3 as printed, and the warnings (a
    list, joined by write_csv)."""
    top = np.argsort(-probs, kind="stable")[:3]
    return {"file": str(path), "class": classes[top[0]], "confidence": float(probs[top[0]]),
            "top3": ", ".join(f"{classes[i]} {percent(probs[i])}" for i in top), "warnings": warnings,
            "error": ""}


def print_row(row):
    """A row on the console as explain.py prints a file: its line and its warnings, or its error."""
    if row.get("error"):
        print(f"error: {row['error']}", file=sys.stderr)
        return
    print(f"{row['file']}: {row['class']} ({percent(row['confidence'])})   top-3: {row['top3']}")
    for warning in row["warnings"]:
        print(f"  warning: {warning}")


def write_csv(path, rows):
    """`rows` as a CSV at `path`, atomically: written beside it under a temporary name, then renamed
    over it, so a reader never sees half a file (files.atomic_path does this for the repository's
    scripts; this one must run alone)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, COLUMNS)
            writer.writeheader()
            # joined as explain.py's CSV joins them (one sentence holds a "; " too: split on it, it breaks)
            writer.writerows({**row, "warnings": "; ".join(row.get("warnings", ()))} for row in rows)
        os.replace(tmp, path)
    except OSError as e:
        raise PredictError(f"{path} could not be written ({e}); pass --out a file in a folder you can write "
                           f"to.") from e
    finally:
        with contextlib.suppress(OSError):  # gone after the rename, or never made
            tmp.unlink()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Classify image files with a model exported by export.py "
                                "(onnxruntime, numpy and Pillow only): class, confidence, top-3 and "
                                "explain.py's input warnings per file.")
    p.add_argument("model", help="model.onnx or model_int8.onnx written by export.py")
    p.add_argument("images", nargs="+", help="PNG/JPEG/TIFF files, or folders of them")
    p.add_argument("--out", metavar="FILE.csv", help="also write a CSV with one row per input file: file, class, "
                   "confidence (the top class's probability, 0 to 1), top3, warnings (joined by '; ') and "
                   "error; a file that cannot be read gets a row with only its file and error. Written "
                   "atomically once every file is done (default: no CSV, the console only)")
    p.add_argument("--provider", default="auto", choices=("auto", *PROVIDERS), help="onnxruntime's execution "
                   "provider: auto takes CUDA where the installed onnxruntime has it (the onnxruntime-gpu "
                   "package), else the CPU; cuda stops with an error where it does not (default: auto)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    model = Model(args.model, args.provider)
    paths = files(args.images)
    print(f"{args.model}: {model.describe}; {len(model.classes)} classes, input {model.size} px, {model.channels} "
          f"channel(s); onnxruntime on {model.provider}")
    if not paths:
        raise PredictError(f"No image files ({', '.join(SUFFIXES)}) in {', '.join(args.images)}.")
    rows = []
    for start in range(0, len(paths), BATCH):
        rows += classified_rows(model, paths[start:start + BATCH])
        for row in rows[start:]:
            print_row(row)
    if args.out:
        write_csv(args.out, rows)
        print(f"predictions -> {args.out}")
    failed = sum(bool(row["error"]) for row in rows)
    if failed:
        raise PredictError(f"{failed} of {len(rows)} input(s) could not be classified.")


def run(argv=None):
    """main() as a command, returning its exit status: 0; 1 after a PredictError's one `error:`
    paragraph; 130 on Ctrl-C, without a traceback (a traceback would only bury the advice)."""
    try:
        main(argv)
    except PredictError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # each line reaches a piped log as it is printed
    sys.exit(run())
