"""predict.py: classify image files with an exported model, without PyTorch (onnxruntime, numpy, Pillow).

    python predict.py runs/pathmnist-synthetic_28/model.onnx tile.png more.tif   # class and top-3 per file
    python predict.py model_int8.onnx folder/                                     # every image in a folder

Made by export.py, the model file says what it takes (its metadata: size, channels, input layout,
class names), so this script needs nothing else: copy it and the .onnx file to a laptop or a
microscope's PC with `pip install onnxruntime numpy pillow`. Each image is read the way explain.py
reads it (first frame, alpha on white, centre-cropped to a square, antialiased bicubic to the
model's size). In Python:

    import predict
    model = predict.Model("model.onnx")
    names, probs = model.classes, model.probabilities(predict.read("tile.png", model.size, model.channels)[None])
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


class PredictError(Exception):
    """An input this model cannot take; the message says what to do."""


class Model:
    """An exported model and what its metadata says about it."""

    def __init__(self, path):
        import onnxruntime
        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for unreadable files
            raise PredictError(f"{path} could not be loaded as an ONNX model ({type(e).__name__}: {e}). Pass a "
                               f"model.onnx written by export.py.") from e
        meta = self.session.get_modelmeta().custom_metadata_map
        if "class_names" not in meta or "input" not in meta:
            raise PredictError(f"{path} is an ONNX model, but not one export.py wrote: its metadata lacks the class "
                               f"names and input layout this script needs.")
        self.classes = json.loads(meta["class_names"])
        self.size, self.layout, self.task = int(meta["size"]), meta["input"], meta["task"]
        shape = self.session.get_inputs()[0].shape
        self.channels = shape[3] if self.layout == "uint8-nhwc" else shape[1]
        self.describe = meta.get("describe", meta.get("dataset", ""))

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


def read(path, size, channels=3):
    """An image file as uint8 (size, size, channels), as explain.py reads files for the model."""
    try:
        with Image.open(path) as img:
            img.seek(0)
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
            img = img.convert("RGB" if channels == 3 else "L")
            side = min(img.size)
            img = ImageOps.fit(img, (side, side), centering=(0.5, 0.5))
            img = img.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=None)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise PredictError(f"{path} could not be read as an image ({e}); give a PNG, JPEG or TIFF tile.") from e
    return np.asarray(img, dtype=np.uint8).reshape(size, size, channels)


def files(inputs):
    out = []
    for item in map(Path, inputs):
        out += sorted(p for p in item.iterdir() if p.suffix.lower() in SUFFIXES) if item.is_dir() else [item]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="Classify image files with a model exported by export.py "
                                "(onnxruntime, numpy and Pillow only).")
    p.add_argument("model", help="model.onnx or model_int8.onnx written by export.py")
    p.add_argument("images", nargs="+", help="PNG/JPEG/TIFF files, or folders of them")
    args = p.parse_args(argv)
    model, failed = Model(args.model), 0
    print(f"{args.model}: {model.describe}; {len(model.classes)} classes, input {model.size} px, {model.channels} "
          f"channel(s)")
    for path in files(args.images):
        try:
            probs = model.probabilities(read(path, model.size, model.channels)[None])[0]
        except PredictError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        top = np.argsort(-probs)[:3]
        print(f"{path}: {model.classes[top[0]]} ({probs[top[0]]:.1%})   top-3: "
              + ", ".join(f"{model.classes[i]} {probs[i]:.1%}" for i in top))
    if failed:
        raise PredictError(f"{failed} input(s) could not be classified.")


if __name__ == "__main__":
    try:
        main()
    except PredictError as e:
        sys.exit(f"error: {e}")
