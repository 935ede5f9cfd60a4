"""evaluate.py: test metrics as MedMNIST reports them, Integrated Gradients into SQLite, their quality.

    python evaluate.py                                      # runs/pathmnist_28/best.pt on the test split
    python evaluate.py --tta                                # average over the 8 flips/rotations
    python evaluate.py --explain all --n-steps 32           # explain every test image, more IG steps
    python evaluate.py --checkpoint runs/pathmnist-synthetic_28/best.pt  # the offline demo's model
    torchrun --nproc_per_node 4 evaluate.py --explain all --methods all   # explanation sharded over 4 ranks

It reads top to bottom in main():
1. the checkpoint and the dataset it names (name, size, synthetic or not), refusing a data file whose
   MD5 differs from the one the model was trained on;
2. metrics: ACC and AUC from medmnist.evaluator (getACC/getAUC, with the dataset's task),
   per-class precision/recall/F1, the confusion matrix (not for multi-label data) and ECE, printed;
3. explanations: IG (explain.py) for --explain test images into <run dir>/explanations.db (db.py),
   a batch per transaction: Ctrl-C or a kill loses at most the batch in flight, and a rerun with the
   same checkpoint and IG settings computes only what is missing;
4. quality (quality.py) of the first --quality of those images: completeness, deletion/insertion,
   infidelity, sensitivity, cascading randomisation, localisation on synthetic data; stored in the
   same database, also only what is missing;
5. files: <run dir>/metrics.json (the metrics, and the IG and quality summaries over everything
   stored for this run, not only this call's images; also kept in the database's runs row), and in
   <run dir>/images (or --images): confusion_matrix.png, ig_examples.png, faithfulness.png and
   sanity_randomization.png (plots.py).

Under torchrun, steps 3 and 4 come first and are shared out: the images still missing a map are
dealt to the ranks in blocks of --ig-batch, then those missing quality rows in blocks of
quality.QUALITY_BATCH (the batches one process makes); each rank writes its own shard store on local disk
(--shard-dir), then rank 0 merges every shard into the one store (rows keyed as always, so a merge
is idempotent) and alone does steps 2 and 5, exactly as a single process would.
"""
import argparse
import csv
import hashlib
import json
import math
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import data
import db
import distributed
import explain
import model as model_lib
import plots
from progress import progress
import quality
import report

ECE_BINS = 15
BOOTSTRAP = 200  # resamples of the test split for the 95% intervals of ACC and AUC


class EvaluateError(Exception):
    """A request this checkpoint cannot honour; meant for the user."""
EXPLAIN_SEED = 0  # which test images get explained: a fixed shuffle, so reruns pick the same ones


def image_count(text):
    """argparse type for --explain/--quality: a number of images, or 'all'."""
    if text == "all" or text.isdigit():
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not a number of images or 'all'")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                formatter_class=model_lib.HelpFormatter)
    p.add_argument("--checkpoint", default="runs/pathmnist_28/best.pt", help="model written by train.py")
    p.add_argument("--data-dir", default="data", help="folder holding the dataset npz")
    p.add_argument("--memory", default="auto", choices=data.MEMORY_MODES, help=data.MEMORY_HELP)
    p.add_argument("--tta", action="store_true", help="average predictions over the 8 flips/rotations")
    p.add_argument("--explain", default="500", type=image_count, help="how many test images to explain with IG: a "
                   "number, 'all', or 0 to skip")
    p.add_argument("--db", help="SQLite store for the explanations (default: <run dir>/explanations.db)")
    p.add_argument("--methods", type=explain.methods_arg, default=["ig"], help="attribution methods to "
                   "store, score and draw side by side (images/methods.png), comma-separated or 'all': "
                   + ", ".join(explain.ATTRIBUTION_METHODS) + " (default: ig)")
    explain.add_ig_arguments(p)
    p.add_argument("--quality", default="200", type=image_count, help="how many of the explained images get the "
                   "quality checks (completeness, deletion/insertion, infidelity, sensitivity, "
                   "randomisation; localisation on synthetic data): a number, 'all', or 0 to skip")
    p.add_argument("--smooth", type=int, default=0, help="also compute SmoothGrad over IG (Captum's "
                   "NoiseTunnel) with this many noisy samples for the quality images, and compare")
    p.add_argument("--smooth-sd", type=float, default=0.1, help="SmoothGrad noise s.d. in [0, 1] pixel units")
    p.add_argument("--attr-dtype", default="float16", choices=("float16", "float32"),
                   help="precision of the stored attributions")
    p.add_argument("--ig-batch", type=int, default=32, help="images per IG batch (and per DB transaction)")
    p.add_argument("--batch-size", type=int, default=512, help="images per batch for predictions")
    p.add_argument("--device", default="auto", help=model_lib.DEVICE_HELP)
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--images", help="folder for the plots (default: <run dir>/images)")
    p.add_argument("--shard-dir", default=str(Path(tempfile.gettempdir()) / "pathmnist-xai-shards"),
                   help="under torchrun: the folder, on each node's local disk, for each rank's shard "
                   "store until rank 0 has merged it into --db (default: the system's temp folder)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- metrics

def classification_metrics(labels, probs, class_names, task="multi-class"):
    """MedMNIST's ACC/AUC for `task` (medmnist.evaluator.getACC/getAUC), per-class precision/recall/F1,
    the confusion matrix and ECE. Multi-label data (labels (N, L) of 0/1, a probability per label)
    is scored per label at probability 0.5, has no confusion matrix, and its ECE pools every
    (image, label) decision."""
    evaluator = data.medmnist_module("evaluator")  # pandas and sklearn: loaded only when needed
    n = len(class_names)
    if task == data.MULTI_LABEL:
        predicted, actual = probs > 0.5, labels.astype(bool)
        tp = (predicted & actual).sum(0).astype(float)
        predicted_n, actual_n, cm = predicted.sum(0), actual.sum(0), None
        p_flat = probs.reshape(-1)
        ece = expected_calibration_error(np.stack([1 - p_flat, p_flat], 1), actual.reshape(-1).astype(int))
    else:
        pred = probs.argmax(1)
        cm = np.bincount(labels * n + pred, minlength=n * n).reshape(n, n)  # rows: true, cols: predicted
        tp, predicted_n, actual_n = np.diag(cm).astype(float), cm.sum(0), cm.sum(1)
        ece = expected_calibration_error(probs, labels)
    precision = np.divide(tp, predicted_n, out=np.zeros(n), where=predicted_n > 0)
    recall = np.divide(tp, actual_n, out=np.zeros(n), where=actual_n > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(n),
                   where=(precision + recall) > 0)
    return {"acc": float(evaluator.getACC(labels, probs, task)),
            "auc": float(evaluator.getAUC(labels, probs, task)),
            "task": task, "ece": ece, "n": int(len(labels)),
            "per_class": [{"class": name, "precision": float(p), "recall": float(r), "f1": float(f),
                           "support": int(s)}
                          for name, p, r, f, s in zip(class_names, precision, recall, f1, actual_n)],
            "confusion_matrix": None if cm is None else cm.tolist()}


def bootstrap_intervals(labels, probs, task, n=BOOTSTRAP, seed=0):
    """95% percentile intervals of MedMNIST's ACC and AUC over `n` resamples of the images (seeded)."""
    evaluator = data.medmnist_module("evaluator")
    rng = np.random.default_rng(seed)
    accs, aucs = [], []
    for _ in range(n):
        i = rng.integers(0, len(labels), len(labels))
        accs.append(evaluator.getACC(labels[i], probs[i], task))
        with warnings.catch_warnings():  # a resample without some class: its AUC is undefined
            warnings.simplefilter("ignore")
            try:
                auc = evaluator.getAUC(labels[i], probs[i], task)
            except ValueError:
                continue
        if np.isfinite(auc):
            aucs.append(auc)
    ci = lambda v: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if v else None  # noqa: E731
    return {"acc_ci95": ci(accs), "auc_ci95": ci(aucs), "bootstrap": n}


def write_predictions(path, probs):
    """The CSV medmnist.Evaluator.evaluate(y_score, save_folder) writes: per image its index, then one
    score per class; no header. MedMNIST's tools read it back with pandas (index_col=0, header=None)."""
    rows = [[i, *(repr(float(v)) for v in row)] for i, row in enumerate(probs)]
    with data.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)


def medmnist_results(ds, split, probs, folder):
    """For a real file, also the CSV medmnist's own Evaluator writes, under its standard name
    (<flag>[_size]_<split>_[AUC]…_[ACC]…@<run>.csv) in `folder`. None for synthetic data, which
    medmnist's Evaluator cannot read."""
    if ds.synthetic:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    evaluator = data.medmnist_module("evaluator").Evaluator(ds.flag, split, size=ds.size, root=str(Path(ds.path).parent))
    evaluator.evaluate(probs, save_folder=str(folder), run="evaluate")
    return folder


def expected_calibration_error(probs, labels, n_bins=ECE_BINS):
    """Top-label ECE over equal-width confidence bins: sum_b |B|/N * |acc(B) - conf(B)|."""
    conf, correct = probs.max(1), probs.argmax(1) == labels
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(ece)


def print_metrics(m, title):
    print(f"\n{title}")
    print(f"  ACC {m['acc']:.4f}   AUC {m['auc']:.4f}   ECE {m['ece']:.4f}   ({m['n']} images, "
          f"TTA {'on' if m['tta'] else 'off'})")
    multi = m["confusion_matrix"] is None
    print(f"  {'label (at probability 0.5)' if multi else 'class':40s} {'precision':>9s} {'recall':>7s} "
          f"{'F1':>7s} {'support':>8s}")
    for c in m["per_class"]:
        print(f"  {c['class']:40s} {c['precision']:9.3f} {c['recall']:7.3f} {c['f1']:7.3f} {c['support']:8d}")
    if multi:
        return
    print("  confusion matrix (rows true, columns predicted):")
    for row in m["confusion_matrix"]:
        print("   " + " ".join(f"{v:5d}" for v in row))


def write_json(path, obj):
    with data.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- explanations

def explanation_indices(n_images, how_many):
    """The first `how_many` of a fixed shuffle of the split, so every class shows up early."""
    count = n_images if how_many == "all" else min(int(how_many), n_images)
    order = torch.randperm(n_images, generator=torch.Generator().manual_seed(EXPLAIN_SEED))
    return order[:count].tolist()


def explain_into_db(net, split, indices, settings, conn, run_id, args, device):
    """Explain the images not yet stored for this run, one transaction per batch. Returns the count."""
    done = db.done_indices(conn, run_id, "test")
    todo = [i for i in indices if i not in done]
    if not todo:
        print(f"All {len(indices)} explanations are already stored in run {run_id}; nothing to compute.")
        return 0
    print(f"Explaining {len(todo)} test images with IG ({len(indices) - len(todo)} already stored)")
    bar = progress(total=len(todo), unit="img", desc="IG")
    t0, stored = time.perf_counter(), 0
    for start in range(0, len(todo), args.ig_batch):
        idx = torch.tensor(todo[start:start + args.ig_batch])
        labels = split.labels[idx]
        probs, targets, result = explain.explain_batch(net, split.images[idx], labels, settings, device)
        stored += db.insert_explanations(conn, db.explanation_rows(
            run_id, "test", idx.numpy(), labels.numpy(), probs.numpy(), targets.numpy(),
            **result.stored(args.attr_dtype)))
        bar.update(len(idx))
    bar.close()
    seconds = time.perf_counter() - t0
    print(f"Stored {stored} explanations in {seconds:.1f}s ({len(todo) / seconds:.1f} attributions/s)"
          + (f"; {len(todo) - stored} were stored meanwhile by another process" if stored < len(todo) else ""))
    return stored


def methods_into_db(net, split, indices, settings, conn, run_id, args, device, method):
    """Maps of another attribution method for the images IG explained, stored under its name, one
    transaction per batch; the prediction and the explained class are IG's rows'. Returns the count."""
    done = db.done_indices(conn, run_id, "test", method)
    todo = [i for i in indices if i not in done]  # in the given order: the batches a single process makes
    if not todo:
        return 0
    attribute = explain.method_fn(method, settings)
    bar = progress(total=len(todo), unit="img", desc=method)
    t0, stored = time.perf_counter(), 0
    for start in range(0, len(todo), args.ig_batch):
        rows = db.find(conn, run_id, "test", image_indices=todo[start:start + args.ig_batch], with_arrays=True)
        idx = torch.tensor([r["image_index"] for r in rows])
        x = data.to_unit(split.images[idx].to(device))
        targets = torch.tensor([r["target"] for r in rows], device=device)
        with torch.random.fork_rng(devices=[]):  # SmoothGrad's noise: the same on every rerun and shard
            torch.manual_seed(int(idx[0]))
            maps = attribute(net, x, targets).cpu().numpy().astype(args.attr_dtype)
        labels = split.labels[idx].numpy()
        n = len(rows)
        stored += db.insert_explanations(conn, db.explanation_rows(
            run_id, "test", idx.numpy(), labels, np.stack([r["probs"] for r in rows]), targets.cpu().numpy(),
            maps, [None] * n, [r["score"] for r in rows], [None] * n, [None] * n, method=method))
        bar.update(n)
    bar.close()
    print(f"Stored {stored} {method} maps ({len(todo) / (time.perf_counter() - t0):.1f} attributions/s)")
    return stored


def gallery_examples(conn, run_id, ds, with_arrays=False):
    """[(stored IG row, title)] per class: the most confident correct and misclassified stored
    explanation, if any. Classes are the true class, or for multi-label data the predicted
    (highest-scoring) label, right or not."""
    by = "pred_label" if ds.task == data.MULTI_LABEL else "true_label"
    out = []
    for label in range(len(ds.class_names)):
        for wrong in (False, True):
            for r in db.find(conn, run_id, "test", misclassified=wrong, order="-confidence", limit=1,
                             with_arrays=with_arrays, **{by: label}):
                out.append((r, plots.panel_title(ds.class_names, db.true_classes(r), r["pred_label"],
                                                 r["confidence"], ["WRONG"] if wrong else [])))
    return out


def plot_method_examples(conn, run_id, ds, methods, path, title):
    """The ig_examples images in every method (those with a map stored in each)."""
    examples, maps = [], {m: [] for m in methods}
    for r, panel_title in gallery_examples(conn, run_id, ds):
        i = r["image_index"]
        per_method = {m: db.find(conn, run_id, "test", image_indices=[i], with_arrays=True, method=m)
                      for m in methods}
        if not all(per_method.values()):
            continue
        examples.append((data.to_unit(ds.test.images[i]), panel_title))
        for m in methods:
            maps[m].append(explain.stored_attributions(per_method[m])[0])
    if examples:
        plots.plot_methods(examples, maps, path, title)
    return len(examples)


def plot_ig_examples(conn, run_id, ds, path, title):
    """IG on gallery_examples: per class, the most confident correct and misclassified image."""
    panels = [(data.to_unit(ds.test.images[r["image_index"]]), explain.stored_attributions([r])[0], panel_title)
              for r, panel_title in gallery_examples(conn, run_id, ds, with_arrays=True)]
    if panels:
        plots.explanation_figure(panels, path, title)
    return len(panels)


def explain_all(fused, stages, split, indices, quality_idx, settings, methods, conn, run_id, args, device):
    """Steps 3 and 4 into one store: explain_methods, then quality for `quality_idx`; each only where
    the store lacks it."""
    explain_methods(fused, split, indices, settings, conn, run_id, args, device)
    if quality_idx:
        quality.quality_into_db(fused, stages, split, quality_idx, settings, methods, conn, run_id, device)


def explain_methods(fused, split, indices, settings, conn, run_id, args, device):
    """IG, then every other --methods, for `indices`, where the store lacks them."""
    if indices:
        explain_into_db(fused, split, indices, settings, conn, run_id, args, device)
        for method in args.methods[1:]:
            methods_into_db(fused, split, indices, settings, conn, run_id, args, device, method)


def lacking(indices, done_sets):
    """The images of `indices`, in order, missing from at least one of the done sets."""
    return [i for i in indices if not all(i in done for done in done_sets)]


MERGE_IMAGES = 32  # images' rows a rank sends to rank 0 per merge round


def sharded_explanations(ctx, fused, stages, ds, indices, quality_idx, settings, methods, db_path, run, args):
    """explain_all under torchrun, in two sharded passes: the maps (in blocks of --ig-batch), then
    the quality rows (in blocks of quality.QUALITY_BATCH), so every batch holds the images it would
    in a single process and seeded measures come out the same. `run` is run_id_for's arguments
    after the connection, less the settings."""
    conn = run_id = pending = None  # rank 0's: the one store and what it lacks
    if ctx.main:
        conn = db.connect(db_path)
        run_id = db.run_id_for(conn, *run, settings)
        pending = lacking(indices, [db.done_indices(conn, run_id, "test", m) for m in args.methods])
        print(f"Sharding over {ctx.world_size} ranks, shard stores in {args.shard_dir}: maps for {len(pending)} "
              f"of {len(indices)} images")
    tag = distributed.broadcast(hashlib.sha256(str(db_path.resolve()).encode()).hexdigest()[:16], ctx)
    shard_path = Path(args.shard_dir) / f"{tag}-rank{ctx.rank}.db"

    def maps(shard, shard_run, mine):
        explain_methods(fused, ds.test, mine, settings, shard, shard_run, args, ctx.device)
    sharded(ctx, conn, run_id, pending, args.ig_batch, shard_path, run, settings, maps)

    if ctx.main:
        pending = lacking(quality_idx, [db.done_quality(conn, run_id, "test", m) for m in methods])
        print(f"Quality for {len(pending)} of {len(quality_idx)} images")

    def scores(shard, shard_run, mine):
        quality.quality_into_db(fused, stages, ds.test, mine, settings, methods, shard, shard_run, ctx.device)
    sharded(ctx, conn, run_id, pending, quality.QUALITY_BATCH, shard_path, run, settings, scores)
    if ctx.main:
        db.close(conn)


def sharded(ctx, conn, run_id, pending, block, shard_path, run, settings, work):
    """One sharded pass. Rank 0 deals the `pending` images out in blocks of `block` and copies each
    rank the store's rows of its images; each rank runs work(shard, shard_run, its images) into its
    own shard store at `shard_path`, sends every row it holds (rows a killed run left included) to
    rank 0 in rounds of MERGE_IMAGES images, and rank 0 stores them (keys already stored are kept,
    so merging twice changes nothing); then the shards are deleted."""
    pending = distributed.broadcast(pending, ctx)
    if not pending and not distributed.max_all(shard_path.exists(), ctx):  # nothing to do, nothing left over
        return
    share = [distributed.blocks(pending, block, r, ctx.world_size) for r in range(ctx.world_size)]
    seed_rows = distributed.scatter([db.export_rows(conn, run_id, s) for s in share] if ctx.main else None, ctx)
    shard = db.connect(shard_path)
    shard_run = db.run_id_for(shard, *run, settings)
    db.import_rows(shard, shard_run, seed_rows)
    work(shard, shard_run, share[ctx.rank])
    stored = db.stored_images(shard, shard_run)
    added = 0
    for k in range(math.ceil(distributed.max_all(len(stored), ctx) / MERGE_IMAGES)):
        part = db.export_rows(shard, shard_run, stored[k * MERGE_IMAGES:(k + 1) * MERGE_IMAGES])
        for rows in distributed.gather(part, ctx) or []:
            added += db.import_rows(conn, run_id, rows)
    distributed.barrier(ctx)  # every shard is in the store: the shards can go
    db.close(shard)
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{shard_path}{suffix}").unlink(missing_ok=True)
    print(f"Merged {added} new rows from {ctx.world_size} shard stores")


# ----------------------------------------------------------------------------- main

def main(argv=None):
    return distributed.run(evaluate, parse_args(argv))


def evaluate(args, ctx):
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ctx.device
    net, meta = model_lib.load_checkpoint(args.checkpoint, device)
    run_dir = Path(args.checkpoint).parent
    images = Path(args.images) if args.images else run_dir / "images"
    db_path = Path(args.db) if args.db else run_dir / "explanations.db"
    if ctx.main:  # before any data is read or any work done
        for folder, flag in ((run_dir, "--checkpoint (its folder gets metrics.json)"), (images, "--images"),
                             (db_path.parent, "--db")):
            data.check_writable(folder, flag)
    if ctx.launched:
        data.check_writable(args.shard_dir, "--shard-dir")
    ds = data.load_matching(meta["provenance"], args.data_dir, args.memory)
    tag = data.describe(meta["provenance"])
    multi_label = ds.task == data.MULTI_LABEL
    settings = {**explain.ig_settings(args, ds.class_names, multi_label=multi_label), "attr_dtype": args.attr_dtype}
    if args.tta and not meta.get("settings", {}).get("flips", True):
        raise EvaluateError(f"--tta averages over the 8 flips/rotations, but this model was trained "
                            f"without them ({ds.flag}: {data.AUGMENTATION[ds.flag].why}). Its answers on "
                            f"flipped images mean little; evaluate without --tta.")
    checkpoint_sha256 = sha256_of(args.checkpoint)
    indices = explanation_indices(len(ds.test), args.explain)
    quality_idx = indices[:len(indices) if args.quality == "all" else int(args.quality)]
    fused = model_lib.fused_for_inference(net)
    methods = quality.methods(settings, args.smooth, args.smooth_sd, names=args.methods)
    stages = quality.all_randomized_models(net) if quality_idx else {}
    if ctx.launched:
        sharded_explanations(ctx, fused, stages, ds, indices, quality_idx, settings, methods, db_path,
                             (checkpoint_sha256, args.checkpoint, net.config, ds.class_names, meta["provenance"]),
                             args)
        if not ctx.main:
            return None

    logits = model_lib.predict_logits(net, ds.test.images, args.batch_size, device, tta=args.tta)
    probs = model_lib.probabilities(net, logits).numpy()
    val_probs = model_lib.probabilities(net, model_lib.predict_logits(net, ds.val.images, args.batch_size, device,
                                                                      tta=args.tta)).numpy()
    val = classification_metrics(ds.val.labels.numpy(), val_probs, ds.class_names, ds.task)
    metrics = {**classification_metrics(ds.test.labels.numpy(), probs, ds.class_names, ds.task),
               **bootstrap_intervals(ds.test.labels.numpy(), probs, ds.task),
               "val": {k: val[k] for k in ("acc", "auc", "ece", "n")},
               "seed": meta.get("settings", {}).get("seed"), "params": model_lib.count_params(net),
               "macs": model_lib.layer_costs(model_lib.build(net.config), ds.size)[-1][3],
               "tta": args.tta, "checkpoint": str(args.checkpoint),
               "checkpoint_sha256": checkpoint_sha256, "provenance": meta["provenance"],
               "best_epoch": meta.get("best_epoch")}
    if meta.get("settings", {}).get("flips", True):  # both ways, for the report: TTA on and off
        other = model_lib.probabilities(net, model_lib.predict_logits(net, ds.test.images, args.batch_size, device,
                                                                      tta=not args.tta)).numpy()
        other_m = classification_metrics(ds.test.labels.numpy(), other, ds.class_names, ds.task)
        metrics["tta_comparison"] = {"on" if args.tta else "off": {"acc": metrics["acc"], "auc": metrics["auc"]},
                                     "off" if args.tta else "on": {"acc": other_m["acc"], "auc": other_m["auc"]}}
    print_metrics(metrics, f"Test split of {tag}")
    print(f"  95% bootstrap intervals ({BOOTSTRAP} resamples): ACC {metrics['acc_ci95']}, AUC {metrics['auc_ci95']}; "
          f"validation ACC {val['acc']:.4f} AUC {val['auc']:.4f}")
    write_predictions(run_dir / "predictions_test.csv", probs)
    write_predictions(run_dir / "predictions_val.csv", val_probs)
    for split, split_probs in (("test", probs), ("val", val_probs)):
        medmnist_results(ds, split, split_probs, run_dir / "medmnist")
    plots.plot_reliability(probs, ds.test.labels.numpy(), ds.task == data.MULTI_LABEL, images / "reliability.png",
                           f"Reliability, test split of {tag} (ECE {metrics['ece']:.3f})")
    if metrics["confusion_matrix"] is not None:  # multi-label data has none
        plots.plot_confusion(metrics["confusion_matrix"], ds.class_names, images / "confusion_matrix.png",
                             f"Confusion matrix, test split of {tag} (ACC {metrics['acc']:.3f}, TTA "
                             f"{'on' if args.tta else 'off'})")

    conn = db.connect(db_path)
    run_id = db.run_id_for(conn, checkpoint_sha256, args.checkpoint, net.config, ds.class_names,
                           meta["provenance"], settings)
    if not ctx.launched:  # under torchrun, sharded_explanations did this part
        try:
            explain_all(fused, stages, ds.test, indices, quality_idx, settings, methods, conn, run_id, args, device)
        except KeyboardInterrupt:
            db.close(conn)
            print(f"\nInterrupted. Every finished batch is stored in run {run_id}; rerun the same command "
                  f"to compute the rest.", file=sys.stderr)
            raise SystemExit(130) from None

    # Summaries describe everything stored for the run, so a smaller rerun cannot shrink them.
    metrics["requested"] = {"explain": args.explain, "quality": args.quality}
    metrics["ig"] = {"run_id": run_id, "settings": settings, **db.ig_summary(conn, run_id, "test")}
    if db.quality_methods(conn, run_id):
        metrics.update(quality.report_quality(conn, run_id, settings))
    if quality_idx:
        quality.quality_figures(conn, run_id, methods, quality_idx, stages, ds.test, images, tag, fused, settings,
                                metrics.get("methods"))
    db.set_metrics(conn, run_id, metrics)
    write_json(run_dir / "metrics.json", metrics)
    if indices:
        n = plot_ig_examples(conn, run_id, ds, images / "ig_examples.png",
                             f"Integrated Gradients on the test split of {tag}")
        if len(args.methods) > 1:
            shown = plot_method_examples(conn, run_id, ds, args.methods, images / "methods.png",
                                         f"Attribution methods side by side, test split of {tag}")
            print(f"{shown} examples in {len(args.methods)} methods -> {images / 'methods.png'}")
        ig = metrics["ig"]
        print(f"IG: {ig['explained']} stored, mean relative completeness error "
              f"{ig['mean_relative_completeness_error']:.2%}, {ig['share_within_5pct']:.0%} within 5%; "
              f"{n} examples -> {images / 'ig_examples.png'}")
    db.close(conn)
    print(f"metrics -> {run_dir / 'metrics.json'}; explanations -> {db_path}; predictions -> "
          f"{run_dir / 'predictions_test.csv'}")
    if images == run_dir / "images":  # the report embeds the run's own figures
        print(f"report -> {report.write_report(run_dir)} (and {run_dir / 'MODEL_CARD.md'})")
        if run_dir.resolve().is_relative_to(Path("runs").resolve()):  # the latest run's figures for the README
            for figure in images.glob("*.png"):
                with data.atomic_path(Path("images") / figure.name) as tmp:
                    shutil.copyfile(figure, tmp)
    return metrics


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # each line reaches a piped log when printed
    try:
        main()
    except (data.DataError, model_lib.CheckpointError, model_lib.DeviceError, explain.ExplainError,
            db.DBError, EvaluateError) as e:
        sys.exit(f"error: {e}")
