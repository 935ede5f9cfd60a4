"""bench_inference.py: bench.py's inference section: what a deployed model costs on this CPU.

For a model it measures four ways of running it side by side in one process: PyTorch eager (the
trained module in eval mode), PyTorch with BatchNorm folded (model.fused_for_inference, what
evaluate.py explains with), and the ONNX files export.py writes (float32 and static int8, through
onnxruntime's CPU provider, uint8 NHWC pixels in). Single-image latency is the median of many
batch-1 calls (what a viewer classifying one tile waits); throughput is images/s at batch 256 (what a
slide-sized job sees). Sizes are the bytes a deployment ships: the state_dict as torch.save writes
it, or the .onnx file.
"""
import io
import statistics
import tempfile
import time
from pathlib import Path

import torch

import export
import model as model_lib

WAYS = ("PyTorch eager", "PyTorch, BatchNorm folded", "ONNX float32", "ONNX int8")
FULL = {"latency_calls": 300, "throughput_batches": 10, "batch": 256, "calibration": 256}
QUICK = {"latency_calls": 5, "throughput_batches": 1, "batch": 16, "calibration": 16}


def state_dict_bytes(net):
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    return buf.getbuffer().nbytes


def latency_ms(call, x, calls):
    """Median milliseconds of one call on a batch of one, after a few warm-up calls."""
    for _ in range(5):
        call(x)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call(x)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def throughput(call, x, batches):
    """Images per second at x's batch size: the best of `batches` timed calls after one warm-up."""
    call(x)
    best = min(_timed(call, x) for _ in range(batches))
    return len(x) / best


def _timed(call, x):
    start = time.perf_counter()
    call(x)
    return time.perf_counter() - start


def runners(net, images_u8, folder, cfg):
    """(way, call on uint8 NCHW tensors, bytes shipped) for each of WAYS."""
    net = net.eval()
    folded = model_lib.fused_for_inference(net)
    channels_size = (images_u8.shape[1], images_u8.shape[2])
    onnx_path, int8_path = Path(folder) / "model.onnx", Path(folder) / "model_int8.onnx"
    export.to_onnx(export.RawPixels(folded, "uint8-nhwc").eval(), channels_size, "uint8-nhwc", onnx_path, {})
    export.quantise(onnx_path, int8_path, images_u8[:cfg["calibration"]], "uint8-nhwc")

    def torch_call(module):
        @torch.no_grad()
        def call(x):
            return module(x.float() / 255)
        return call

    def onnx_call(path):
        run = export.session(path)
        return lambda x: run.run(None, {"images": x.permute(0, 2, 3, 1).contiguous().numpy()})

    return [(WAYS[0], torch_call(net), state_dict_bytes(net)),
            (WAYS[1], torch_call(folded), state_dict_bytes(folded)),
            (WAYS[2], onnx_call(onnx_path), onnx_path.stat().st_size),
            (WAYS[3], onnx_call(int8_path), int8_path.stat().st_size)]


def inference_rows(net, images_u8, cfg):
    """[{way, latency_ms, img_s, bytes}] for one model; images_u8 are uint8 (N, C, H, W)."""
    x1, xb = images_u8[:1], images_u8[:cfg["batch"]]
    with tempfile.TemporaryDirectory() as folder:
        return [{"way": way, "latency_ms": latency_ms(call, x1, cfg["latency_calls"]),
                 "img_s": throughput(call, xb, cfg["throughput_batches"]), "bytes": size}
                for way, call, size in runners(net, images_u8, folder, cfg)]


def format_rows(name, rows, batch):
    lines = [f"{name}: {'way':28s} {'batch-1 ms':>11s} {f'batch-{batch} img/s':>16s} {'bytes':>12s}"]
    lines += [f"{'':{len(name) + 2}s}{r['way']:28s} {r['latency_ms']:11.3f} {r['img_s']:16,.0f} {r['bytes']:12,d}"
              for r in rows]
    return "\n".join(lines)

