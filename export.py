"""export.py: a trained model as ONNX, float32 and int8, checked against PyTorch on the whole test split.

    python export.py --checkpoint runs/pathmnist-synthetic_28/best.pt   # writes <run>/model.onnx, model_int8.onnx
    python export.py --checkpoint RUN/best.pt --input float-nchw        # take [0, 1] float images instead
    python predict.py runs/pathmnist-synthetic_28/model.onnx tile.png   # then classify without PyTorch

The exported graph is the BatchNorm-folded inference model (model.fused_for_inference, checked equal
to the trained one) with the training normalisation inside, so a caller feeds raw pixels: by
default uint8 (N, H, W, C) as MedMNIST stores them (`--input uint8-nhwc`), or float (N, C, H, W) in
[0, 1] (`--input float-nchw`); the batch size is free. It outputs logits; the file's metadata says
what it is: class names, dataset, size, task, input layout, data MD5 and checkpoint SHA-256, and the
training split's colour statistics (the checkpoint's colour_reference, as JSON) for predict.py's warnings.

Parity is measured through onnxruntime's CPU provider on every test image of the run's dataset:
float32 against PyTorch (max |logit difference|, argmax agreement), and int8 (onnxruntime's static
quantisation, calibrated on training images, never test) against float32, with ACC/AUC as MedMNIST
computes them. The numbers are printed and written to <run>/export.json.
"""
import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import torch

import cli
import data
import datasets
import formats
import metrics
import model as model_lib
from files import atomic_path, sha256_of, write_json

INPUTS = ("uint8-nhwc", "float-nchw")
CALIBRATION_IMAGES = 512  # training images the int8 ranges are calibrated on
FLOAT_TOLERANCE, INT8_AGREEMENT = 1e-4, 0.99  # what parity must reach, or export.py fails
OPSET = 17


class ExportError(cli.UserError):
    """A checkpoint that cannot be exported, or an export that does not match PyTorch."""


class RawPixels(torch.nn.Module):
    """The model behind the input conversion a caller would otherwise have to write: uint8 NHWC to
    float NCHW in [0, 1] (or float NCHW passed through)."""

    def __init__(self, net, layout):
        super().__init__()
        self.net, self.layout = net, layout

    def forward(self, x):
        if self.layout == "uint8-nhwc":
            x = x.permute(0, 3, 1, 2).float() / 255
        return self.net(x)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                formatter_class=cli.HelpFormatter)
    p.add_argument("--checkpoint", default="runs/pathmnist_28/best.pt", help="model written by train.py")
    p.add_argument("--out", help="the float32 ONNX file (default: <run>/model.onnx; int8 beside it, *_int8.onnx)")
    p.add_argument("--input", default="uint8-nhwc", choices=INPUTS, help="what the graph takes: uint8 (N, H, W, C) "
                   "as MedMNIST stores images, or float (N, C, H, W) in [0, 1]")
    p.add_argument("--no-int8", action="store_true", help="skip the int8 model")
    cli.add_data_dir(p, " (parity is measured on its test split; int8 is calibrated on its training split)")
    cli.add_threads(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    net, meta = model_lib.load_checkpoint(args.checkpoint)
    folded = model_lib.fused_for_inference(net)
    ds = data.load_matching(meta["provenance"], args.data_dir)
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / "model.onnx"
    int8 = out.with_name(out.stem + "_int8.onnx")
    reference = model_lib.predict_logits(net, ds.test.images).numpy()
    folding = float(np.abs(model_lib.predict_logits(folded, ds.test.images).numpy() - reference).max())
    if folding > FLOAT_TOLERANCE:
        raise ExportError(f"The BatchNorm-folded model differs from the trained one by {folding:.2e} in a logit on "
                          f"the test split (more than {FLOAT_TOLERANCE}); it is not exported.")
    export(RawPixels(folded, args.input).eval(), meta, sha256_of(args.checkpoint), args.input, ds, out)
    report = {"checkpoint": str(args.checkpoint), "input": args.input, "test_images": len(ds.test),
              "folding_max_abs_logit": folding, "float32": parity(out, ds, args.input, reference),
              "sizes": {"pytorch_checkpoint": Path(args.checkpoint).stat().st_size, "float32": out.stat().st_size}}
    if not args.no_int8:
        quantise(out, int8, ds.train.images[:CALIBRATION_IMAGES], args.input)
        report["int8"] = parity(int8, ds, args.input, onnx_logits(out, ds.test.images, args.input))
        report["sizes"]["int8"] = int8.stat().st_size
    write_json(out.with_name("export.json"), report)
    print_report(report, out, int8)
    if report["float32"]["max_abs_logit"] > FLOAT_TOLERANCE or report["float32"]["argmax_agreement"] < 1:
        raise ExportError(f"{out} does not match PyTorch: {report['float32']}. The file is kept for inspection.")
    return report


def export(module, meta, checkpoint_sha256, layout, ds, path):
    """The run's model as ONNX, with the metadata that says what the file is."""
    p = meta["provenance"]
    metadata = {
        "class_names": json.dumps(meta["class_names"]), "dataset": p["dataset"], "flag": p["flag"],
        "size": str(p["size"]), "task": meta["task"], "synthetic": str(p["synthetic"]), "data_md5": p["md5"],
        "checkpoint_sha256": checkpoint_sha256, "input": layout, "output": "logits", "describe": datasets.describe(p),
        "colour_reference": json.dumps(meta["colour_reference"])}  # for predict.py's colour warning
    to_onnx(module, (module.net.config["in_channels"], ds.size), layout, path, metadata)


def to_onnx(module, channels_size, layout, path, metadata):
    """torch.onnx.export with a free batch size, checked by onnx's checker, written atomically."""
    import onnx
    c, s = channels_size
    example = (torch.zeros(2, s, s, c, dtype=torch.uint8) if layout == "uint8-nhwc" else torch.zeros(2, c, s, s))
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note that the TorchScript exporter is the older of two
        torch.onnx.export(module, (example,), str(tmp), dynamo=False, input_names=["images"],
                          output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=OPSET)
        graph = onnx.load(str(tmp))
        for key, value in metadata.items():
            graph.metadata_props.add(key=key, value=value)
        onnx.checker.check_model(graph)
        onnx.save(graph, str(tmp))


def as_input(images_u8, layout):
    """uint8 (N, C, H, W) tensors as the graph takes them."""
    if layout == "uint8-nhwc":
        return images_u8.permute(0, 2, 3, 1).contiguous().numpy()
    return (images_u8.float() / 255).numpy()


def session(path):
    import onnxruntime
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def onnx_logits(path, images_u8, layout, batch=512):
    run = session(path)
    return np.concatenate([run.run(None, {"images": as_input(images_u8[i:i + batch], layout)})[0]
                           for i in range(0, len(images_u8), batch)])


def parity(path, ds, layout, reference):
    """An ONNX file's logits on the test split against `reference` logits: the largest difference,
    argmax agreement, and ACC/AUC (medmnist's) of both."""
    logits = onnx_logits(path, ds.test.images, layout)
    ours, theirs = (metrics.classification_metrics(ds.test.labels.numpy(), model_lib.task_probabilities(
        ds.task, torch.from_numpy(z)).numpy(), ds.class_names, ds.task) for z in (logits, reference))
    return {"max_abs_logit": float(np.abs(logits - reference).max()),
            "argmax_agreement": float((logits.argmax(1) == reference.argmax(1)).mean()),
            "acc": ours["acc"], "auc": ours["auc"], "reference_acc": theirs["acc"], "reference_auc": theirs["auc"]}


def quantise(float_path, int8_path, calibration_u8, layout):
    """onnxruntime's static int8 quantisation (QDQ, per channel), calibrated on training images."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Training(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"images": as_input(calibration_u8[i:i + 64], layout)}
                                 for i in range(0, len(calibration_u8), 64)])

        def get_next(self):
            return next(self.batches, None)
    with atomic_path(int8_path) as tmp:
        prepared = tmp.with_name(tmp.stem + "_prepared.onnx")  # shapes inferred and graph optimised first
        try:
            quant_pre_process(str(float_path), str(prepared))
            quantize_static(str(prepared), str(tmp), Training(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
        finally:
            prepared.unlink(missing_ok=True)


def print_report(report, out, int8):
    f = report["float32"]
    m = formats.metric
    print(f"{out}: float32, max |logit - PyTorch's| {formats.measure(f['max_abs_logit'])} over "
          f"{formats.count(report['test_images'])} test images, argmax agreement "
          f"{formats.share(f['argmax_agreement'])}, "
          f"ACC {m(f['acc'])} AUC {m(f['auc'])} (PyTorch {m(f['reference_acc'])} / {m(f['reference_auc'])}); "
          f"{formats.count(report['sizes']['float32'])} bytes (checkpoint "
          f"{formats.count(report['sizes']['pytorch_checkpoint'])})")
    if "int8" in report:
        q = report["int8"]
        print(f"{int8}: int8, argmax agreement with float32 {formats.share(q['argmax_agreement'])} (needs "
              f"{formats.share(INT8_AGREEMENT)}), ACC {m(q['acc'])} AUC {m(q['auc'])} (float32 "
              f"{m(q['reference_acc'])} / {m(q['reference_auc'])}); {formats.count(report['sizes']['int8'])} bytes")
    print(f"numbers -> {out.with_name('export.json')}")


if __name__ == "__main__":
    cli.run(main)
