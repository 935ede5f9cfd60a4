"""bench_memory.py: peak memory of the whole programs, train.py and evaluate.py, phase by phase.

    python bench_memory.py                       # PathMNIST-sized files at 28, 64, 128 px; 224 px at 10%
    python bench_memory.py --quality 50          # quality on 50 images at every size (default 200; 20 at 224)
    python bench_memory.py --sizes 28 64         # some sizes only
    python bench_memory.py --scale 0.05          # every file at 5% of PathMNIST's image counts
    python bench_memory.py --quick               # seconds; what the tests run

For each size, an npz of random pixels in MedMNIST's format (89,996 / 10,004 / 7,180 images, or
`--scale` of them) is written to a temporary folder, then two real commands run, each in its own
process exactly as a user types them:

    train.py --flag pathmnist --size S --trust-file --epochs 1 --memory map
    evaluate.py --checkpoint <its best.pt> --memory map --methods ig --explain all --quality 200 (20 at 224 px)

Inside that process a thread samples RssAnon (/proc/self/status: the process's own memory, not the
page cache of the memory-mapped file) every 10 ms, and the phase it is in: train.py's start-up
(loading, statistics), its epoch (engine.train_epoch), validation (engine.evaluate_split) and the
rest ("end": checkpoint, curves); evaluate.py's start-up, predictions (model.predict_probabilities:
test, validation, TTA), explanations (IG into the store), quality and the rest ("end": everything
between and after them: metrics and their bootstrap, the centre-shift section, figures, report).
The phases are marked by wrapping those functions, nothing else is changed. The goal (issue 26):
every whole-program peak at most 1.5x train.py's epoch peak, and at most 4 GB at 224 px.
"""
import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cli
import data
from files import write_json

PATHMNIST_COUNTS = {"train": 89996, "val": 10004, "test": 7180}
# 224 px: a tenth of the images and 20 scored ones (a CPU's quality batch there is one image, so 20
# batches show its peak as 200 would, in a tenth of the hours)
FULL = {"sizes": (28, 64, 128, 224), "scale": {28: 1, 64: 1, 128: 1, 224: 0.1}, "quality": {224: 20}}
QUICK = {"sizes": (28,), "scale": {28: 0.005}, "quality": {28: 2}}
GOAL_RATIO, GOAL_224 = 1.5, 4e9


class PhasePeaks(threading.Thread):
    """Samples this process's RssAnon every `interval` seconds; keeps the peak of each phase."""

    def __init__(self, interval=0.01):
        super().__init__(daemon=True)
        self.interval, self.phase, self.peaks, self.running = interval, "start-up", {}, True
        self.lock = threading.Lock()  # a reading is stored under the phase it was taken in

    @staticmethod
    def current():
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("RssAnon:")).split()[1]) * 1024

    def sample(self):
        with self.lock:
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), self.current())

    def run(self):
        while self.running:
            self.sample()
            time.sleep(self.interval)

    def enter(self, phase):
        with self.lock:
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), self.current())  # the phase before's end
            self.phase = phase

    def stop(self):
        self.running = False
        self.join()
        self.sample()
        return self.peaks


def mark(sampler, module, name, phase, after):
    """Wrap module.name so that the sampler is in `phase` while it runs and in `after` once it returns."""
    real = getattr(module, name)

    @functools.wraps(real)
    def wrapped(*args, **kwargs):
        sampler.enter(phase)
        try:
            return real(*args, **kwargs)
        finally:
            sampler.enter(after)
    setattr(module, name, wrapped)


def run_program(program, argv):
    """In this process: `program` (train or evaluate) with `argv`, its phases marked; prints the
    peaks per phase as JSON on the last line."""
    sampler = PhasePeaks()
    sampler.start()
    if program == "train":  # each program imports only what it imports itself
        import engine
        import train as main_module
        mark(sampler, engine, "train_epoch", "epoch", "end")
        mark(sampler, engine, "evaluate_split", "validation", "end")
    else:
        import evaluate as main_module
        import explanations
        import model as model_lib
        import quality
        mark(sampler, model_lib, "predict_probabilities", "predictions", "end")
        mark(sampler, explanations, "explain_methods", "explanations", "end")
        mark(sampler, quality, "quality_into_db", "quality", "end")
    t0 = time.perf_counter()
    main_module.main(argv)
    seconds = time.perf_counter() - t0
    print(json.dumps({"peaks": sampler.stop(), "seconds": seconds}))


def in_subprocess(folder, program, argv):
    """run_program in a fresh Python (its log goes to folder/<program>.log); the peaks per phase."""
    env = {**os.environ, data.CACHE_ENV: str(Path(folder) / "cache")}  # the maps of this run alone
    log = Path(folder) / f"{program}.log"
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, __file__, "--program", program, "--", *argv], stdout=subprocess.PIPE,
                              stderr=f, text=True, env=env)
    if done.returncode:
        raise cli.UserError(f"bench_memory: {program}.py {' '.join(argv)} failed (exit {done.returncode}); its "
                            f"messages are in {log}:\n{log.read_text()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_size(size, scale, quality, folder, threads):
    """Write the random file for `size`, run train.py then evaluate.py on it; one row of the table."""
    import bench
    import datasets
    counts = {split: max(10, round(n * scale)) for split, n in PATHMNIST_COUNTS.items()}
    data_dir, run = Path(folder) / "data", Path(folder) / f"run{size}"
    print(f"[bench_memory] {size} px: writing {sum(counts.values()):,} random images", file=sys.stderr, flush=True)
    bench.write_random_npz(data_dir / datasets.real_source(size)[0], size, counts)
    common = ["--data-dir", str(data_dir), "--memory", "map", "--threads", str(threads)]
    print(f"[bench_memory] {size} px: train.py --epochs 1", file=sys.stderr, flush=True)
    train = in_subprocess(folder, "train", ["--flag", "pathmnist", "--size", str(size), "--trust-file",
                                            "--epochs", "1", "--out", str(run), *common])
    print(f"[bench_memory] {size} px: evaluate.py, IG on the test split, quality on {quality}", file=sys.stderr,
          flush=True)
    evaluate = in_subprocess(folder, "evaluate", ["--checkpoint", str(run / "best.pt"), "--methods", "ig",
                                                  "--explain", "all", "--quality", str(quality), *common])
    for path in data_dir.glob("*"):
        path.unlink()
    return {"size": size, "counts": counts, "quality": quality, "train": train, "evaluate": evaluate}


def verdict(row):
    """Each program's peak over train.py's epoch peak, and whether the row meets the goal."""
    epoch = row["train"]["peaks"]["epoch"]
    ratios = {p: max(row[p]["peaks"].values()) / epoch for p in ("train", "evaluate")}
    limit = all(r <= GOAL_RATIO for r in ratios.values()) and (
        row["size"] < 224 or max(max(row[p]["peaks"].values()) for p in ratios) <= GOAL_224)
    return ratios, limit


def format_rows(rows):
    gb = 1e9
    train_phases, eval_phases = ("start-up", "epoch", "validation", "end"), ("start-up", "predictions",
                                                                             "explanations", "quality", "end")
    lines = ["peak RssAnon, GB, per phase (whole programs, each in its own process)",
             f"{'px':>4s} {'images':>8s} | train.py: " + " ".join(f"{p:>10s}" for p in train_phases)
             + f" {'s':>6s} | evaluate.py: " + " ".join(f"{p:>12s}" for p in eval_phases)
             + f" {'s':>6s} | {'train/ep':>8s} {'eval/ep':>7s} goal"]
    for r in rows:
        (t, e), (ratios, ok) = (r["train"], r["evaluate"]), verdict(r)
        lines.append(f"{r['size']:4d} {sum(r['counts'].values()):8,d} |           "
                     + " ".join(f"{t['peaks'].get(p, 0) / gb:10.2f}" for p in train_phases)
                     + f" {t['seconds']:6.0f} |              "
                     + " ".join(f"{e['peaks'].get(p, 0) / gb:12.2f}" for p in eval_phases)
                     + f" {e['seconds']:6.0f} | {ratios['train']:7.2f}x {ratios['evaluate']:6.2f}x "
                     + ("met" if ok else "MISSED"))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="Peak memory of whole train.py and evaluate.py runs, phase by "
                                "phase, on PathMNIST-sized files of random pixels.")
    p.add_argument("--quick", action="store_true", help="a tiny file at 28 px (under a minute; for tests)")
    p.add_argument("--sizes", type=int, nargs="+", help="image sizes to measure (default: 28 64 128 224)")
    p.add_argument("--scale", type=float, help="share of PathMNIST's image counts for every size (default: 1, "
                   "and 0.1 at 224 px)")
    p.add_argument("--quality", type=int, help="images evaluate.py scores (default: 200, 20 at 224 px)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch in each program (default: 2)")
    p.add_argument("--json", help="also write the rows as JSON to this file")
    p.add_argument("--dir", help="folder for the temporary files (default: a new one in the system's "
                   "temporary directory, deleted afterwards; full mode needs about 25 GB)")
    p.add_argument("--program", choices=("train", "evaluate"), help=argparse.SUPPRESS)  # internal
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.program:
        return run_program(args.program, args.rest)
    if args.rest:
        p.error(f"unexpected arguments {' '.join(args.rest)} (sizes go after --sizes)")
    cfg = QUICK if args.quick else FULL
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        for size in args.sizes or cfg["sizes"]:
            scale = args.scale if args.scale is not None else cfg["scale"].get(size, 1)
            scored = args.quality if args.quality is not None else cfg["quality"].get(size, 200)
            rows.append(measure_size(size, scale, scored, folder, args.threads))
            print(format_rows(rows[-1:]), flush=True)
    print(format_rows(rows))
    if args.json:
        write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    cli.run(main)
