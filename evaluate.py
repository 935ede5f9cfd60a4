"""evaluate.py: test metrics as MedMNIST reports them, then Integrated Gradients into SQLite.

    python evaluate.py                                      # runs/pathmnist/best.pt on the test split
    python evaluate.py --tta                                # average over the 8 flips/rotations
    python evaluate.py --explain all --n-steps 32           # explain every test image, more IG steps
    python evaluate.py --checkpoint runs/synthetic/best.pt  # the offline demo's model

The dataset (name, size, synthetic or not) comes from the checkpoint, and the data file must have the
MD5 the model was trained on. ACC and AUC are medmnist.evaluator's getACC/getAUC. The run folder (the
checkpoint's) gets metrics.json and explanations.db; images/ gets confusion_matrix.png and
ig_examples.png. Explanations are stored a batch per transaction: Ctrl-C or a kill loses at most the
batch in flight, and a rerun with the same checkpoint and IG settings only computes what is missing.
"""
import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from medmnist.evaluator import getACC, getAUC  # noqa: E402
from tqdm import tqdm  # noqa: E402

import data  # noqa: E402
import db  # noqa: E402
import explain  # noqa: E402
import model as model_lib  # noqa: E402

ECE_BINS = 15
EXPLAIN_SEED = 0  # which test images get explained: a fixed shuffle, so reruns pick the same ones


def image_count(text):
    """argparse type for --explain/--quality: a number of images, or 'all'."""
    if text == "all" or text.isdigit():
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not a number of images or 'all'")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default="runs/pathmnist/best.pt", help="model written by train.py")
    p.add_argument("--data-dir", default="data", help="folder holding the dataset npz")
    p.add_argument("--tta", action="store_true", help="average predictions over the 8 flips/rotations")
    p.add_argument("--explain", default="500", type=image_count, help="how many test images to explain with IG: a "
                   "number, 'all', or 0 to skip")
    p.add_argument("--db", help="SQLite store for the explanations (default: <run dir>/explanations.db)")
    explain.add_ig_arguments(p)
    p.add_argument("--target", default=explain.DEFAULT_IG["target"], help="class to explain: 'pred', "
                   "'true', or a class index or name")
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
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--images", default="images", help="folder for the plots")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- metrics

def classification_metrics(labels, probs, class_names):
    """MedMNIST's ACC/AUC plus per-class precision/recall/F1, confusion matrix and ECE."""
    n = len(class_names)
    pred = probs.argmax(1)
    cm = np.bincount(labels * n + pred, minlength=n * n).reshape(n, n)  # rows: true, cols: predicted
    tp = np.diag(cm).astype(float)
    precision = np.divide(tp, cm.sum(0), out=np.zeros(n), where=cm.sum(0) > 0)
    recall = np.divide(tp, cm.sum(1), out=np.zeros(n), where=cm.sum(1) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(n),
                   where=(precision + recall) > 0)
    return {"acc": float(getACC(labels, probs, "multi-class")),
            "auc": float(getAUC(labels, probs, "multi-class")),
            "ece": expected_calibration_error(probs, labels),
            "n": int(len(labels)),
            "per_class": [{"class": name, "precision": float(p), "recall": float(r), "f1": float(f),
                           "support": int(s)}
                          for name, p, r, f, s in zip(class_names, precision, recall, f1, cm.sum(1))],
            "confusion_matrix": cm.tolist()}


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
    print(f"  {'class':40s} {'precision':>9s} {'recall':>7s} {'F1':>7s} {'support':>8s}")
    for c in m["per_class"]:
        print(f"  {c['class']:40s} {c['precision']:9.3f} {c['recall']:7.3f} {c['f1']:7.3f} {c['support']:8d}")
    print("  confusion matrix (rows true, columns predicted):")
    for row in m["confusion_matrix"]:
        print("   " + " ".join(f"{v:5d}" for v in row))


def plot_confusion(cm, class_names, path, title):
    cm = np.asarray(cm)
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(8, 7))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(cm)):
        for j in range(len(cm)):
            ax.text(j, i, f"{cm[i, j]}", ha="center", va="center", fontsize=7,
                    color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(cm)), class_names, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(cm)), class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    data.write_figure(fig, path, dpi=130)


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


def explanation_rows(run_id, split_name, indices, labels, probs, targets, result, dtype):
    """DB rows for one explained batch."""
    # Whole-batch conversions: indexing torch tensors element by element costs microseconds each,
    # and numpy's float16 conversion of the tiny values IG produces (float16 subnormals) runs in slow
    # software, 35x slower than torch's (same bits either way).
    attributions = result.attributions.to(getattr(torch, dtype)).numpy()
    probs32 = probs.numpy().astype("<f4")
    columns = zip(indices, labels.tolist(), probs.argmax(1).tolist(), targets.tolist(),
                  probs.max(1).values.tolist(), result.delta.tolist(), result.score.tolist(),
                  result.baseline_score.tolist(), result.n_steps.tolist())
    rows = []
    for i, (index, true, pred, target, confidence, delta, score, base, steps) in enumerate(columns):
        blob, dt, shape = db.encode_array(attributions[i], dtype)
        rows.append({"run_id": run_id, "split": split_name, "image_index": int(index),
                     "true_label": true, "pred_label": pred, "target": target, "confidence": confidence,
                     "probs": probs32[i].tobytes(), "attribution": blob, "attr_dtype": dt,
                     "attr_shape": shape, "delta": delta, "score": score, "baseline_score": base,
                     "n_steps": steps})
    return rows


def explain_into_db(net, split, indices, settings, conn, run_id, args):
    """Explain the images not yet stored for this run, one transaction per batch. Returns the count."""
    done = db.done_indices(conn, run_id, "test")
    todo = [i for i in indices if i not in done]
    if not todo:
        print(f"All {len(indices)} explanations are already stored in run {run_id}; nothing to compute.")
        return 0
    print(f"Explaining {len(todo)} test images with IG ({len(indices) - len(todo)} already stored)")
    bar = tqdm(total=len(todo), unit="img", desc="IG", disable=None)
    t0 = time.perf_counter()
    for start in range(0, len(todo), args.ig_batch):
        idx = torch.tensor(todo[start:start + args.ig_batch])
        probs, targets, result = explain.explain_batch(net, split.images[idx], split.labels[idx],
                                                       settings, args.device)
        db.insert_explanations(conn, explanation_rows(run_id, "test", idx.tolist(), split.labels[idx],
                                                      probs, targets, result, args.attr_dtype))
        bar.update(len(idx))
    bar.close()
    seconds = time.perf_counter() - t0
    print(f"Stored {len(todo)} explanations in {seconds:.1f}s ({len(todo) / seconds:.1f} attributions/s)")
    return len(todo)


def ig_summary(conn, run_id, indices):
    rows = db.find(conn, run_id, "test", image_indices=indices)
    rel = np.array([abs(r["delta"]) / max(abs(r["score"] - r["baseline_score"]), 1e-12) for r in rows])
    return {"explained": len(rows), "mean_abs_delta": float(np.mean([abs(r["delta"]) for r in rows])),
            "mean_relative_completeness_error": float(rel.mean()),
            "share_within_5pct": float((rel <= 0.05).mean())} if rows else {"explained": 0}


QUALITY_BATCH = 50  # images per quality transaction (sensitivity_max expands each 4x)
SUMMARY_KEYS = ("deletion_auc", "deletion_auc_random", "insertion_auc", "insertion_auc_random",
                "infidelity", "sensitivity_max", "randomization_spearman",
                "randomization_spearman_signed", "randomization_input_spearman", "mask_mass", "mask_area")


def quality_methods(args, settings):
    """{method name: attribution function}: IG, plus SmoothGrad over IG with --smooth."""
    methods = {"ig": explain.attribution_fn(settings)}
    if args.smooth:
        methods[f"smoothgrad_ig:n={args.smooth},sd={args.smooth_sd}"] = explain.attribution_fn(
            settings, args.smooth, args.smooth_sd)
    return methods


def quality_into_db(fused, stages, split, indices, settings, methods, conn, run_id, device):
    """Quality measures for `indices` that are not stored yet, a batch per transaction."""
    for method, attribute in methods.items():
        done = db.done_quality(conn, run_id, "test", method)
        todo = [i for i in indices if i not in done]
        if not todo:
            continue
        bar = tqdm(total=len(todo), unit="img", desc=f"quality {method}", disable=None)
        for start in range(0, len(todo), QUALITY_BATCH):
            rows = db.find(conn, run_id, "test", image_indices=todo[start:start + QUALITY_BATCH],
                           with_arrays=True)
            idx = torch.tensor([r["image_index"] for r in rows])
            x = data.to_unit(split.images[idx].to(device))
            target = torch.tensor([r["target"] for r in rows], device=device)
            if method == "ig":
                attributions = torch.from_numpy(np.stack([r["attribution"] for r in rows]).astype(np.float32))
            else:
                attributions = attribute(fused, x, target).cpu()
            q = explain.quality_measures(fused, x, target, attributions, settings, attribute, stages,
                                         masks=None if split.masks is None else split.masks[idx])
            gap = torch.tensor([r["score"] - r["baseline_score"] for r in rows])
            q["relative_error"] = (attributions.sum((1, 2, 3)) - gap).abs() / gap.abs().clamp_min(1e-12)
            db.insert_quality(conn, [{"run_id": run_id, "split": "test", "image_index": int(i),
                                      "method": method, **{k: v[j].tolist() for k, v in q.items()}}
                                     for j, i in enumerate(idx.tolist())])
            bar.update(len(rows))
        bar.close()


def quality_summary(conn, run_id, method, indices, settings):
    """Means over the stored quality rows of `indices`, with the check verdicts."""
    rows = db.quality_rows(conn, run_id, "test", method, indices)
    if not rows:
        return {"images": 0}
    mean = lambda key: float(np.mean([r[key] for r in rows])) if rows[0][key] is not None else None  # noqa: E731
    stages = np.mean([r["randomization_stages"] for r in rows], axis=0)
    summary = {"images": len(rows), **{k: mean(k) for k in SUMMARY_KEYS},
               "completeness_share": float(np.mean([r["relative_error"] <= settings["tolerance"] for r in rows])),
               "mean_relative_error": mean("relative_error"),
               "randomization_by_stage": dict(zip(explain.randomization_stages(len(stages) - 1),
                                                  stages.tolist()))}
    summary["randomization_check"] = explain.randomization_verdict(
        summary["randomization_spearman"], summary["randomization_input_spearman"])
    return summary


def quality_warnings(summary, method, settings):
    """Lines that tell the user which check went wrong and what to do."""
    lines = []
    if method == "ig" and summary["completeness_share"] < 0.95:
        better = 2 * settings["max_steps"]
        lines.append(f"warning: only {summary['completeness_share']:.0%} of images have a completeness "
                     f"error within {settings['tolerance']:.0%}; rerun with --max-steps {better} "
                     f"(and --n-steps {min(better, 2 * settings['n_steps'])} to start higher).")
    if summary["deletion_auc"] >= summary["deletion_auc_random"]:
        lines.append(f"warning: {method}: deleting pixels in attribution order lowers the class "
                     f"probability no faster than a random order; the maps are not faithful here.")
    if summary["insertion_auc"] <= summary["insertion_auc_random"]:
        lines.append(f"warning: {method}: inserting pixels in attribution order raises the class "
                     f"probability no faster than a random order; the maps are not faithful here.")
    if summary["randomization_check"] == "failed":
        lines.append(f"FAILED sanity check ({method}): with every weight randomised the maps keep a rank "
                     f"correlation of {summary['randomization_spearman']:.2f} with the originals, above "
                     f"what the input alone explains ({summary['randomization_input_spearman']:.2f}); "
                     f"they depend too little on what the model learned.")
    return lines


def print_quality(summaries):
    print("\nExplanation quality (means over the quality images; random order = reference):")
    for method, q in summaries.items():
        print(f"  {method} ({q['images']} images)")
        print(f"    completeness: {q['completeness_share']:.1%} within tolerance, mean relative error "
              f"{q['mean_relative_error']:.2%}")
        print(f"    deletion AUC  {q['deletion_auc']:.3f}  (random {q['deletion_auc_random']:.3f}, "
              f"lower is better)")
        print(f"    insertion AUC {q['insertion_auc']:.3f}  (random {q['insertion_auc_random']:.3f}, "
              f"higher is better)")
        print(f"    infidelity {q['infidelity']:.4f}   sensitivity_max {q['sensitivity_max']:.4f}")
        stages = "  ".join(f"{k} {v:.2f}" for k, v in q["randomization_by_stage"].items())
        print(f"    randomisation Spearman |map|: {stages}")
        print(f"      fully randomised {q['randomization_spearman']:.2f} (signed "
              f"{q['randomization_spearman_signed']:.2f}; input-only reference "
              f"{q['randomization_input_spearman']:.2f}) -> {q['randomization_check']}")
        if q["mask_mass"] is not None:
            print(f"    localisation: {q['mask_mass']:.1%} of |map| inside the evidence masks, which "
                  f"cover {q['mask_area']:.1%} of the image")


def report_quality(conn, run_id, methods, indices, settings):
    """Print the quality summaries and warnings; return them for metrics.json, with IG's keys at
    the top level and other methods' summaries under their names."""
    summaries = {m: quality_summary(conn, run_id, m, indices, settings) for m in methods}
    print_quality(summaries)
    for method, q in summaries.items():
        for line in quality_warnings(q, method, settings):
            print(line)
    ig = summaries.pop("ig")
    return {**ig, "quality_images": ig.pop("images"), **summaries}


def quality_figures(conn, run_id, methods, indices, stages, split, images_dir, tag):
    curves = {}
    for method in methods:
        rows = db.quality_rows(conn, run_id, "test", method, indices)
        curves[method] = {c: torch.from_numpy(np.stack([r[c] for r in rows])) for c in db.QUALITY_CURVES}
    explain.plot_faithfulness(curves, Path(images_dir) / "faithfulness.png",
                              f"Deletion and insertion, test split of {tag}")
    row = db.find(conn, run_id, "test", image_indices=indices[:1], with_arrays=True)[0]
    x = data.to_unit(split.images[row["image_index"]][None])
    target = torch.tensor([row["target"]])
    attribute = methods["ig"]
    maps = [("IG", torch.from_numpy(row["attribution"].astype(np.float32)))] + [
        (f"random {name}", attribute(m, x, target)[0]) for name, m in stages]
    rho = [float(explain.rank_correlation(maps[0][1][None], m[None])) for _, m in maps[1:]]
    explain.plot_randomization(x[0], maps, rho, Path(images_dir) / "sanity_randomization.png",
                               f"Cascading randomisation (top layer first), test image {row['image_index']} "
                               f"of {tag}")


def plot_ig_examples(conn, run_id, ds, path, title):
    """Per class: the most confident correct and misclassified stored explanation, if any."""
    panels = []
    for label in range(len(ds.class_names)):
        for wrong in (False, True):
            hits = db.find(conn, run_id, "test", misclassified=wrong, true_label=label,
                           order="-confidence", limit=1, with_arrays=True)
            for r in hits:
                image = data.to_unit(ds.test.images[r["image_index"]])
                panels.append((image, torch.from_numpy(r["attribution"].astype(np.float32)),
                               explain.panel_title(ds.class_names, label, r["pred_label"], r["confidence"])
                               + ("  WRONG" if wrong else "")))
    if panels:
        explain.save_figure(panels, path, title)
    return len(panels)


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    net, meta = model_lib.load_checkpoint(args.checkpoint, args.device)
    ds = data.load_matching(meta["provenance"], args.data_dir)
    tag = data.describe(meta["provenance"])
    run_dir = Path(args.checkpoint).parent
    settings = {**explain.ig_settings(args, ds.class_names), "attr_dtype": args.attr_dtype}

    logits = model_lib.predict_logits(net, ds.test.images, args.batch_size, args.device, tta=args.tta)
    probs = torch.softmax(logits, 1).numpy()
    metrics = {**classification_metrics(ds.test.labels.numpy(), probs, ds.class_names),
               "tta": args.tta, "checkpoint": str(args.checkpoint),
               "checkpoint_sha256": sha256_of(args.checkpoint), "provenance": meta["provenance"],
               "best_epoch": meta.get("best_epoch")}
    print_metrics(metrics, f"Test split of {tag}")
    plot_confusion(metrics["confusion_matrix"], ds.class_names, Path(args.images) / "confusion_matrix.png",
                   f"Confusion matrix, test split of {tag} (ACC {metrics['acc']:.3f}, TTA "
                   f"{'on' if args.tta else 'off'})")

    conn = db.connect(args.db or run_dir / "explanations.db")
    run_id = db.run_id_for(conn, metrics["checkpoint_sha256"], args.checkpoint, net.config,
                           ds.class_names, meta["provenance"], settings)
    indices = explanation_indices(len(ds.test), args.explain)
    quality_idx = indices[:len(indices) if args.quality == "all" else int(args.quality)]
    fused = model_lib.fused_for_inference(net)
    methods = quality_methods(args, settings)
    stages = explain.randomized_models(net) if quality_idx else []
    try:
        if indices:
            explain_into_db(fused, ds.test, indices, settings, conn, run_id, args)
        if quality_idx:
            quality_into_db(fused, stages, ds.test, quality_idx, settings, methods, conn, run_id,
                            args.device)
    except KeyboardInterrupt:
        print(f"\nInterrupted. Every finished batch is stored in run {run_id}; rerun the same command "
              f"to compute the rest.", file=sys.stderr)
        raise SystemExit(130) from None
    metrics["ig"] = {"run_id": run_id, "settings": settings, **ig_summary(conn, run_id, indices)}
    if quality_idx:
        metrics.update(report_quality(conn, run_id, methods, quality_idx, settings))
        quality_figures(conn, run_id, methods, quality_idx, stages, ds.test, args.images, tag)
    db.set_metrics(conn, run_id, metrics)
    write_json(run_dir / "metrics.json", metrics)
    if indices:
        n = plot_ig_examples(conn, run_id, ds, Path(args.images) / "ig_examples.png",
                             f"Integrated Gradients on the test split of {tag}")
        ig = metrics["ig"]
        print(f"IG: {ig['explained']} stored, mean relative completeness error "
              f"{ig['mean_relative_completeness_error']:.2%}, {ig['share_within_5pct']:.0%} within 5%; "
              f"{n} examples -> {Path(args.images) / 'ig_examples.png'}")
    print(f"metrics -> {run_dir / 'metrics.json'}; explanations -> {args.db or run_dir / 'explanations.db'}")
    return metrics


if __name__ == "__main__":
    try:
        main()
    except (data.DataError, model_lib.CheckpointError, explain.ExplainError, db.DBError) as e:
        sys.exit(f"error: {e}")
