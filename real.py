"""real.py: this repo's model against MedMNIST's ResNet-18 on a real MedMNIST file, side by side.

    make real                                          # RetinaMNIST from the shared real-data folder
    python real.py --flag retinamnist --data-dir DIR   # any real MedMNIST 2D file, read where it lies
    python real.py --seeds 0 1 2 3 4 --out runs/real5  # more seeds

For each architecture (tissuecnn, resnet18) and seed: `train.py` with the repository's defaults (only
--flag, --arch, --seed and the paths given), then `evaluate.py` (its default attribution methods, or
--methods), each in its own process, exactly as a user would run them. Then one summary, printed and written to
<out>/summary.md: per architecture the mean ± sd over the seeds of ACC and AUC as MedMNIST computes
them, each run's 95% bootstrap intervals, and every method's explanation quality, beside MedMNIST
v2's published numbers for the dataset. A run whose metrics.json exists is kept (--force redoes it),
so an interrupted comparison continues where it stopped. Nothing is written beside the data.
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import cli
import datasets
import formats
import realdata
import trust
from files import write_text

ARCHS = ("tissuecnn", "resnet18")
# MedMNIST v2 (Yang et al., Scientific Data 2023), Table 3: test ACC / AUC at 28 px, where read.
PUBLISHED = {
    "pathmnist": {"ResNet-18 (28)": (0.907, 0.983), "ResNet-50 (28)": (0.911, 0.990)},
    "pneumoniamnist": {"ResNet-18 (28)": (0.854, 0.944), "ResNet-50 (28)": (0.854, 0.948)},
    "retinamnist": {"ResNet-18 (28)": (0.524, 0.717), "ResNet-50 (28)": (0.528, 0.726),
                    "Google AutoML Vision": (0.531, 0.750)},
    "breastmnist": {"ResNet-18 (28)": (0.863, 0.901), "ResNet-50 (28)": (0.812, 0.857)},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                formatter_class=cli.HelpFormatter)
    p.add_argument("--flag", type=datasets.flag_arg, default="retinamnist", help=datasets.FLAG_HELP)
    p.add_argument("--data-dir", help="folder holding the real npz (default: <real-data folder>/medmnist, "
                   "see realdata.py)")
    p.add_argument("--out", default="runs/real", help="folder for one run folder per architecture and seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS, help="architectures to compare")
    p.add_argument("--explain", default="all", type=cli.image_count, help="test images to explain (evaluate.py)")
    p.add_argument("--methods", help="evaluate.py --methods (default: evaluate.py's own)")
    p.add_argument("--quality", default="200", type=cli.image_count, help="of them, images to score (evaluate.py)")
    p.add_argument("--epochs", type=cli.positive_int, help="train.py --epochs (default: train.py's own)")
    p.add_argument("--force", action="store_true", help="train and evaluate again runs that are done")
    cli.add_threads(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    data_dir = Path(args.data_dir) if args.data_dir else realdata.folder() / "medmnist"
    if not (data_dir / datasets.real_source(28, args.flag)[0]).is_file():
        why = realdata.missing("medmnist") if not args.data_dir else None
        raise cli.UserError(why or f"{data_dir} holds no {datasets.real_source(28, args.flag)[0]}: pass the "
                            f"--data-dir where the real file lies.")
    runs = {arch: [Path(args.out) / f"{args.flag}_{arch}" / f"seed{s}" for s in args.seeds] for arch in args.archs}
    for arch, folders in runs.items():
        for seed, folder in zip(args.seeds, folders, strict=True):
            if (folder / "metrics.json").is_file() and not args.force:
                print(f"[real] {arch} seed {seed}: kept {folder} (evaluated before; --force redoes it)")
                continue
            train(args, data_dir, arch, seed, folder)
    text = summary(args.flag, {arch: [load(f) for f in folders] for arch, folders in runs.items()})
    write_text(Path(args.out) / f"{args.flag}_summary.md", text)
    print(text)
    print(f"summary -> {Path(args.out) / f'{args.flag}_summary.md'}")


def train(args, data_dir, arch, seed, folder):
    """train.py, then evaluate.py, for one architecture and seed, each in its own process."""
    threads = ["--threads", str(args.threads)] if args.threads else []
    epochs = ["--epochs", str(args.epochs)] if args.epochs else []
    commands = [["train.py", "--flag", args.flag, "--arch", arch, "--seed", str(seed), "--data-dir", str(data_dir),
                 "--out", str(folder), *epochs, *threads],
                ["evaluate.py", "--checkpoint", str(folder / "best.pt"), "--data-dir", str(data_dir), "--explain",
                 args.explain, "--quality", args.quality, *(["--methods", args.methods] if args.methods else []),
                 *threads]]
    for command in commands:
        print(f"[real] {arch} seed {seed}: python {' '.join(command)}", flush=True)
        log = folder / f"{Path(command[0]).stem}.log"
        folder.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as out:
            done = subprocess.run([sys.executable, str(Path(__file__).parent / command[0]), *command[1:]],
                                  stdout=out, stderr=subprocess.STDOUT)
        if done.returncode:
            raise cli.UserError(f"{command[0]} failed for {arch} seed {seed} (exit code {done.returncode}); its "
                                f"output is in {log}. Fix what it says and run the same command again: finished "
                                f"runs are kept.")


def load(folder):
    return json.loads((folder / "metrics.json").read_text())


def mean_sd(values):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summary(flag, results):
    """The comparison as Markdown: ACC/AUC per architecture (mean ± sd, each run with its interval),
    the published numbers, and each method's explanation quality averaged over the seeds."""
    title = datasets.title_of(flag)
    lines = [f"# {title} (real), {', '.join(results)}: {len(next(iter(results.values())))} seeds each", "",
             "| model | ACC mean ± sd | AUC mean ± sd | runs: ACC (95% CI) / AUC (95% CI) |", "|---|---|---|---|"]
    for arch, runs in results.items():
        acc, auc = mean_sd([m["acc"] for m in runs]), mean_sd([m["auc"] for m in runs])
        each = "; ".join(f"{formats.metric(m['acc'])} ({formats.interval(m['acc_ci95'])}) / "
                         f"{formats.metric(m['auc'])} ({formats.interval(m['auc_ci95'])})" for m in runs)
        lines.append(f"| {arch} (this repo's train.py, real) | {formats.metric(acc[0])} ± {formats.metric(acc[1])} | "
                     f"{formats.metric(auc[0])} ± {formats.metric(auc[1])} | {each} |")
    for name, (acc, auc) in PUBLISHED.get(flag, {}).items():  # as published: three decimals
        lines.append(f"| {name}, published (MedMNIST v2, Table 3) | {acc:.3f} | {auc:.3f} | — |")
    lines += ["", "Explanation quality: each published test's value, the mean over the seeds, and in how many "
              "seeds it passed (trust.py; thresholds set per run by its controls):", ""]
    for arch, runs in results.items():
        tables = [m["trust"] for m in runs]
        tests = [t for t in trust.TESTS if any(t.name in row for table in tables for row in table.values())]
        if not tests:
            continue
        lines += [f"| {arch}: method | " + " | ".join(t.title for t in tests) + " |", "|---" * (len(tests) + 1) + "|"]
        for method in tables[0]:
            cells = []
            for t in tests:
                found = [table[method][t.name] for table in tables if t.name in table.get(method, {})]
                cells.append(f"{trust.shown(t.name, statistics.fmean(f['value'] for f in found))} "
                             f"({sum(f['pass'] for f in found)}/{len(found)})" if found else "—")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines += ["", f"Recommended, seed by seed: {', '.join(str(m['recommended']) for m in runs)}", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    cli.run(main)
