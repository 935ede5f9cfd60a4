"""gpu_check.py: every GPU code path run once, with its numbers and checks, into one JSON.

    python gpu_check.py                          # on a machine with an NVIDIA GPU: about 8 minutes
    python gpu_check.py --device cpu --dry-run   # the same steps at tiny sizes on CPU (seconds; CI runs it)
    make gpu-check                               # the first, with the machine's own torch

It drives the scripts a user runs, on SYNTHETIC data written into --out (never a result on a real
dataset), and uses whatever torch the machine has (a GPU node's preinstalled one may be older than
requirements.txt's). The steps, each timed and each with its checks:
1. train.py at 28 and 64 px, --amp on and off, --compile off and on, 2 epochs each (img/s), plus a
   second float32 seed at 28 px: bfloat16's validation loss must lie within the seed-to-seed noise;
2. one epoch on a PathMNIST-sized file (89,996 / 10,004 / 7,180 images) at 28 px: img/s and peak GPU
   memory; one epoch at 224 px with --memory map on a 10% subset;
3. evaluate.py with IG on every one of the 7,180 test images and quality on 200; attributions/s per
   default method from timed runs that differ by one method;
4. torchrun --nproc_per_node 1 (NCCL on a GPU) train.py and evaluate.py: the store must equal the
   single process's;
5. bench.py --quick --no-memory on the device, against MedMNIST's ResNet-18 there.
It writes <out>/gpu_check.json: the machine (GPU, driver, torch, CUDA), every figure, every check's
pass or fail, and the GPU speed goals beside what was measured. It exits 1 if a check failed.
"""
import argparse
import csv
import json
import os
import platform
import resource
import shutil
import sqlite3
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

import attribution as attr
import cli
import datasets
import evaluate
import synthetic
import train
from files import write_json

ROOT = Path(__file__).resolve().parent
PATHMNIST_COUNTS = {"train": 89996, "val": 10004, "test": 7180}
FULL = {"small": synthetic.COUNTS, "sizes": (28, 64), "compile": (False, True), "epochs": 2,
        "big": PATHMNIST_COUNTS, "share_224": 0.10, "size_224": 224, "quality": 200, "torchrun": (64, 16)}
DRY = {"small": {"train": 128, "val": 32, "test": 32}, "sizes": (28, 64), "compile": (False,), "epochs": 1,
       "big": {"train": 512, "val": 64, "test": 48}, "share_224": 0.5, "size_224": 64, "quality": 8,
       "torchrun": (16, 4)}  # torchrun: images explained, and scored, by both stores
TARGETS = {"train_img_s_28": 100_000, "ig_attr_s": 20_000}  # the GPU speed goals, reported beside the numbers
METHODS = attr.DEFAULT_METHODS  # evaluate.py's default methods, each timed


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                formatter_class=cli.HelpFormatter)
    p.add_argument("--device", default="cuda", help=f"where everything runs: {cli.DEVICE_HELP}")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes and no --compile, so the whole check runs "
                   "on a CPU in seconds (what CI runs so the script cannot rot between GPU runs)")
    p.add_argument("--out", default="runs/gpu_check", help="folder for the work files and gpu_check.json")
    p.add_argument("--keep", action="store_true", help="keep the data and run folders (several GB at full size)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = cli.resolve_device(args.device)
    cfg = DRY if args.dry_run else FULL
    out = Path(args.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine(device), "dry_run": args.dry_run, "settings": cfg, "steps": {}, "checks": {}}
    steps = [("training", training), ("full_epoch", full_epoch), ("evaluate", evaluation),
             ("torchrun", torchrun), ("bench", bench)]
    try:
        for name, step in steps:
            print(f"[gpu-check] {name} ...", flush=True)
            start = time.perf_counter()
            try:
                report["steps"][name] = step(cfg, work, str(device), report["checks"])
                report["checks"][f"{name} ran"] = True
            except Exception as e:  # one broken path must not hide the others' numbers
                report["steps"][name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
                print(traceback.format_exc(), file=sys.stderr)
                report["checks"][f"{name} ran"] = False
            report["steps"][name]["seconds"] = round(time.perf_counter() - start, 1)
            write_json(out / "gpu_check.json", report)  # after each step: a crash keeps what was measured
        report["targets"] = targets(report["steps"])
    finally:
        write_json(out / "gpu_check.json", report)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    failed = [c for c, ok in report["checks"].items() if ok is False]
    print(json.dumps({"checks": report["checks"], "targets": report.get("targets")}, indent=1))
    ran = [c for c, ok in report["checks"].items() if ok is not None]
    skipped = " (checks of a trained model skipped in the dry run)" if args.dry_run else ""
    print(f"[gpu-check] {len(ran) - len(failed)}/{len(ran)} checks passed{skipped} -> {out / 'gpu_check.json'}")
    if failed:
        raise cli.UserError(f"gpu_check: {len(failed)} check(s) failed: {', '.join(failed)}. Each step's "
                            f"numbers and errors are in {out / 'gpu_check.json'}.")
    return report


def machine(device):
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    bf16=torch.cuda.is_bf16_supported(), driver=nvidia_smi("driver_version"),
                    memory_gb=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1))
    return info


def nvidia_smi(field):
    try:
        return subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def data_dir(work, name, size, counts):
    """A folder with the synthetic PathMNIST stand-in at `size` and `counts`, written once."""
    folder = work / name
    path = folder / datasets.synthetic_file_name(size)
    if not path.exists():
        synthetic.write_synthetic(path, size, counts=counts)
    return folder


def train_run(folder, out, size, device, epochs, *extra):
    """train.py in this process; (history, peak memory in bytes: the GPU's allocator, else the process's RSS)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    history = train.main(["--synthetic", "--data-dir", str(folder), "--size", str(size), "--epochs", str(epochs),
                          "--device", device, "--out", str(out), *extra])
    peak = (torch.cuda.max_memory_allocated() if device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return history, peak


def epoch_seconds(out):
    """The last epoch's seconds, validation pass included, from the run's history.csv."""
    with open(Path(out) / "history.csv") as f:
        return float(list(csv.DictReader(f))[-1]["seconds"])


def training(cfg, work, device, checks):
    rows, n = [], cfg["small"]["train"]
    for size in cfg["sizes"]:
        folder = data_dir(work, f"small{size}", size, cfg["small"])
        for amp in ("off", "on"):
            for compiled in cfg["compile"]:
                tag = f"{size}px_amp-{amp}{'_compile' if compiled else ''}"
                history, peak = train_run(folder, work / "runs" / tag, size, device, cfg["epochs"], "--amp", amp,
                                          *(["--compile"] if compiled else []))
                rows.append({"size": size, "amp": amp, "compile": compiled,
                             "img_s": n / epoch_seconds(work / "runs" / tag),
                             "val_loss": history[-1]["val_loss"], "peak_bytes": peak})
    noise_history, _ = train_run(data_dir(work, "small28", 28, cfg["small"]), work / "runs" / "28px_seed1", 28, device,
                                 cfg["epochs"], "--amp", "off", "--seed", "1")
    fp32 = next(r for r in rows if r["size"] == 28 and r["amp"] == "off" and not r["compile"])
    bf16 = next(r for r in rows if r["size"] == 28 and r["amp"] == "on" and not r["compile"])
    noise = abs(noise_history[-1]["val_loss"] - fp32["val_loss"])
    checks["bf16 validation loss within float32's seed-to-seed noise (28 px)"] = quality_check(
        cfg, abs(bf16["val_loss"] - fp32["val_loss"]) <= max(2 * noise, 0.02))
    return {"runs": rows, "fp32_seed_noise": noise, "bf16_minus_fp32": bf16["val_loss"] - fp32["val_loss"]}


def full_epoch(cfg, work, device, checks):
    big = data_dir(work, "big28", 28, cfg["big"])
    history, peak = train_run(big, work / "runs" / "big28", 28, device, 1)
    share = {s: max(8, int(c * cfg["share_224"])) for s, c in cfg["big"].items()}
    size = cfg["size_224"]
    history_224, peak_224 = train_run(data_dir(work, f"share{size}", size, share), work / "runs" / f"share{size}",
                                      size, device, 1, "--memory", "map")
    checks["PathMNIST-sized epoch at 28 px learns (val acc above chance)"] = quality_check(
        cfg, history[-1]["val_acc"] > 1.5 / 9)
    seconds, seconds_224 = epoch_seconds(work / "runs" / "big28"), epoch_seconds(work / "runs" / f"share{size}")
    return {"28": {"images": cfg["big"], "img_s": cfg["big"]["train"] / seconds, "peak_bytes": peak,
                   "epoch_seconds": seconds, "val_acc": history[-1]["val_acc"]},
            str(size): {"images": share, "memory": "map", "img_s": share["train"] / seconds_224,
                        "peak_bytes": peak_224, "epoch_seconds": seconds_224}}


def quality_check(cfg, passed):
    """A check of what a trained model does, which the dry run's tiny runs cannot pass: None there."""
    return None if cfg is DRY else bool(passed)


def evaluate_run(checkpoint, folder, device, db, methods, explain, quality):
    start = time.perf_counter()
    metrics = evaluate.main(["--checkpoint", str(checkpoint), "--data-dir", str(folder), "--device", device,
                             "--db", str(db), "--methods", ",".join(methods), "--explain", explain,
                             "--quality", str(quality), "--figures", str(Path(db).parent / "images")])
    return metrics, time.perf_counter() - start


def evaluation(cfg, work, device, checks):
    """IG on every test image and quality on cfg['quality']; per-method rates from runs one method apart."""
    checkpoint, folder, n = work / "runs" / "big28" / "best.pt", work / "big28", cfg["big"]["test"]
    seconds = {}
    for i, methods in enumerate([("ig",), *[("ig", m) for m in METHODS[1:]]]):
        _, seconds[methods[-1]] = evaluate_run(checkpoint, folder, device, work / f"rate{i}" / "e.db", methods,
                                               "all", 0)
    _, fixed = evaluate_run(checkpoint, folder, device, work / "rate_fixed" / "e.db", ("ig",), "0", 0)
    rates = {"ig": n / max(seconds["ig"] - fixed, 1e-9),
             **{m: n / max(seconds[m] - seconds["ig"], 1e-9) for m in METHODS[1:]}}
    metrics, total = evaluate_run(checkpoint, folder, device, work / "full" / "e.db", METHODS, "all", cfg["quality"])
    ig = metrics["explanations"]["ig"]
    checks["evaluate stores IG for every test image"] = ig["maps"] == n
    checks["IG completeness: at least 95% of images within tolerance"] = quality_check(
        cfg, ig["quality"]["completeness_share"] >= 0.95)
    checks["evaluate names a recommended method"] = quality_check(cfg, metrics.get("recommended") is not None)
    return {"test_images": n, "attr_s": rates, "fixed_seconds": fixed, "full_seconds": total,
            "recommended": metrics.get("recommended"), "acc": metrics["acc"], "auc": metrics["auc"]}


def torchrun(cfg, work, device, checks):
    """torchrun with one process (NCCL on a GPU, gloo on CPU): train, then evaluate into a store that must
    equal a single process's evaluation of the same checkpoint."""
    folder, out = data_dir(work, "small28", 28, cfg["small"]), work / "runs" / "ddp28"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    subprocess.run([*launch, str(ROOT / "train.py"), "--synthetic", "--data-dir", str(folder), "--epochs",
                    str(cfg["epochs"]), "--device", device, "--out", str(out)], check=True, cwd=ROOT)
    explain, scored = cfg["torchrun"]
    args = ["--checkpoint", str(out / "best.pt"), "--data-dir", str(folder), "--device", device, "--explain",
            str(explain), "--quality", str(scored), "--methods", ",".join(METHODS)]
    subprocess.run([*launch, str(ROOT / "evaluate.py"), *args, "--db", str(work / "ddp.db"), "--figures",
                    str(work / "ddp_images")], check=True, cwd=ROOT)
    evaluate.main([*args, "--db", str(work / "one.db"), "--figures", str(work / "one_images")])
    difference = store_difference(work / "one.db", work / "ddp.db")
    checks["torchrun store equals the single process's"] = difference["same_rows"] and difference["max_abs"] <= 1e-3
    return difference


def store_difference(a, b):
    """Whether two stores hold the same (table, image, method) rows, and the largest difference in a value."""
    def rows(path):
        with sqlite3.connect(path) as con:
            con.row_factory = sqlite3.Row
            return {(t, r["image_index"], r["method"]): dict(r) for t in ("explanations", "quality")
                    for r in con.execute(f"SELECT * FROM {t}")}  # table names are constants, not input
    one, two = rows(a), rows(b)
    worst = 0.0
    for key in one.keys() & two.keys():
        for column, value in one[key].items():
            other = two[key][column]
            if column == "attribution":
                worst = max(worst, float(np.abs(np.frombuffer(value, "<f2").astype(np.float32)
                                                - np.frombuffer(other, "<f2").astype(np.float32)).max()))
            elif isinstance(value, float) and isinstance(other, float):
                worst = max(worst, abs(value - other))
    return {"same_rows": one.keys() == two.keys(), "rows": len(one), "max_abs": worst}


def bench(cfg, work, device, checks):
    subprocess.run([sys.executable, str(ROOT / "bench.py"), "--quick", "--no-memory", "--device", device, "--json",
                    str(work / "bench.json")], check=True, cwd=ROOT)
    results = json.loads((work / "bench.json").read_text())
    checks["bench runs on the device"] = results["settings"]["device"] == device
    keep = ("train_speedup", "ig_speedup", "train_speedup_vs_resnet18", "ig_speedup_vs_resnet18", "method_rates")
    return {k: results[k] for k in keep} | {"peer_table": results["peer_table"], "inference": results["inference"]}


def targets(steps):
    """The GPU speed goals beside what was measured (for the report; not checks: CPU cannot meet them)."""
    measured = {"train_img_s_28": steps.get("full_epoch", {}).get("28", {}).get("img_s"),
                "ig_attr_s": steps.get("evaluate", {}).get("attr_s", {}).get("ig")}
    return {k: {"target": t, "measured": measured[k], "met": measured[k] is not None and measured[k] >= t}
            for k, t in TARGETS.items()}


if __name__ == "__main__":
    cli.run(main)
