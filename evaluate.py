"""evaluate.py: test metrics as MedMNIST reports them, explanations into SQLite, their quality, a report.

    python evaluate.py                                      # runs/pathmnist_28/best.pt on the test split
    python evaluate.py --tta                                # average over the 8 flips/rotations
    python evaluate.py --explain all --n-steps 32           # explain every test image, more IG steps
    python evaluate.py --checkpoint runs/pathmnist-synthetic_28/best.pt  # the offline demo's model
    torchrun --nproc_per_node 4 evaluate.py --explain all --methods all   # explanation sharded over 4 ranks

The recipe, in evaluate():
1. the checkpoint and the dataset it names, refusing a data file whose MD5 differs from the one the
   model was trained on;
2. metrics (metrics.py): ACC and AUC as medmnist.evaluator computes them, with bootstrap intervals,
   per-class precision/recall/F1, the confusion matrix, ECE; validation beside test; predictions CSVs;
3. explanations (explanations.py): IG and every --methods map for --explain test images into
   <run dir>/explanations.db, a batch per transaction, computing only what the store lacks;
4. quality (quality.py) of the first --quality of those images, stored the same way;
5. files: <run dir>/metrics.json (summaries over everything stored for the run, not only this
   call's images), the figures in <run dir>/images (plots.py, gallery.py) and report.html with
   MODEL_CARD.md (report.py).
Under torchrun, steps 3 and 4 come first, shared out over the ranks (shards.py); rank 0 alone does
the rest, exactly as a single process would.
"""
import argparse
import sys
import tempfile
from pathlib import Path

import torch

import attribution as attr
import augment
import centre_shift
import cli
import data
import datasets
import db
import distributed
import explanations
import formats
import gallery
import metrics as metrics_lib
import model as model_lib
import plots
import quality
import report
import shards
import trust
from files import check_writable, sha256_of, write_json


class EvaluateError(cli.UserError):
    """A request this checkpoint cannot honour."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                formatter_class=cli.HelpFormatter)
    p.add_argument("--checkpoint", default="runs/pathmnist_28/best.pt", help="model written by train.py")
    cli.add_data_dir(p)
    data.add_memory_flag(p)
    p.add_argument("--tta", action="store_true", help="average predictions over the 8 flips/rotations")
    p.add_argument("--explain", default="500", type=cli.image_count, help="how many test images to explain "
                   "with IG: a number, 'all', or 0 to skip")
    p.add_argument("--explain-errors", default=1000, type=int, help="also explain up to this many misclassified "
                   "test images beyond --explain, so the gallery shows the model's errors (0: none)")
    p.add_argument("--db", help="SQLite store for the explanations (default: <run dir>/explanations.db)")
    p.add_argument("--methods", type=attr.methods_arg, default=list(attr.DEFAULT_METHODS),
                   help="attribution methods to store, score against the published tests and draw side by side "
                   "(images/methods.png), comma-separated or 'all': " + ", ".join(attr.METHODS)
                   + f" (default: {','.join(attr.DEFAULT_METHODS)})")
    attr.add_ig_arguments(p)
    p.add_argument("--quality", default="200", type=cli.image_count, help="how many of the explained images "
                   "get the quality checks (completeness, deletion/insertion, infidelity, sensitivity, "
                   "randomisation; localisation on synthetic data): a number, 'all', or 0 to skip")
    p.add_argument("--smooth", type=int, default=0, help="also compute SmoothGrad over IG (Captum's "
                   "NoiseTunnel) with this many noisy samples for the quality images, and compare")
    p.add_argument("--smooth-sd", type=float, default=0.1, help="SmoothGrad noise s.d. in [0, 1] pixel units")
    p.add_argument("--attr-dtype", default="float16", choices=("float16", "float32"),
                   help="precision of the stored attributions")
    p.add_argument("--ig-batch", type=int, default=32, help="images per IG batch (and per DB transaction); "
                   "fewer on a CPU where they would not fit the byte budget (budget.py: 128 px and up)")
    p.add_argument("--batch-size", type=int, default=512, help="images per batch for predictions")
    cli.add_device(p)
    cli.add_threads(p)
    p.add_argument("--figures", help="folder for the figures (default: <run dir>/images)")
    p.add_argument("--shard-dir", default=str(Path(tempfile.gettempdir()) / "pathmnist-xai-shards"),
                   help="under torchrun: the folder, on each node's local disk, for each rank's shard "
                   "store until rank 0 has merged it into --db (default: the system's temp folder)")
    return p.parse_args(argv)


def main(argv=None):
    return distributed.run(evaluate, parse_args(argv))


def evaluate(args, ctx):
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ctx.device
    run_dir = Path(args.checkpoint).parent  # the run's folder: metrics.json, the store, the figures
    figures = Path(args.figures) if args.figures else run_dir / "images"
    db_path = Path(args.db) if args.db else run_dir / "explanations.db"
    if ctx.main:  # before any data is read or any work done
        for folder, option in ((run_dir, "--checkpoint (its folder gets metrics.json)"), (figures, "--figures"),
                               (db_path.parent, "--db")):
            check_writable(folder, option)
    if ctx.launched:
        check_writable(args.shard_dir, "--shard-dir")
    net, meta = model_lib.load_checkpoint(args.checkpoint, device)
    ds = data.load_matching(meta["provenance"], args.data_dir, args.memory)
    tag = datasets.describe(meta["provenance"])
    ig_settings = {**attr.ig_settings({k: getattr(args, k) for k in attr.DEFAULT_IG}, ds.class_names,
                                      multi_label=ds.task == datasets.MULTI_LABEL), "attr_dtype": args.attr_dtype}
    if args.tta and not meta["settings"]["flips"]:
        raise EvaluateError(f"--tta averages over the 8 flips/rotations, but this model was trained "
                            f"without them ({ds.flag}: {augment.AUGMENTATION[ds.flag].why}). Its answers on "
                            f"flipped images mean little; evaluate without --tta.")
    checkpoint_sha256 = sha256_of(args.checkpoint)
    indices = explanations.explanation_indices(len(ds.test), args.explain)
    quality_idx = indices[:len(indices) if args.quality == "all" else int(args.quality)]
    fused = model_lib.fused_for_inference(net)
    test_probs = model_lib.predict_probabilities(net, ds.test.images, args.batch_size, device)  # without TTA
    if indices:  # the model's errors too, so the gallery shows them (not scored: quality_idx is as asked)
        indices += explanations.error_indices(ds.test, test_probs, indices, args.explain_errors)
    records = quality.scored_methods(args.methods, args.smooth, args.smooth_sd)
    references = (attr.reference_sample(ds.train.images).to(device) if any(m.needs_references for m in records)
                  else None)
    scoring = quality.scoring(fused, quality.all_randomized_models(net) if quality_idx else {}, ds.test, ig_settings,
                              records, references)
    explaining = explanations.Explaining(fused, ds.test, ig_settings, tuple(args.methods), scoring.explainers,
                                         explanations.ig_block(fused, ds.test, args.ig_batch, device),
                                         args.attr_dtype, device)
    run_key = (checkpoint_sha256, args.checkpoint, net.config, ds.class_names, meta["provenance"], ig_settings)
    if ctx.launched:
        shards.sharded_explanations(ctx, explaining, scoring, indices, quality_idx, db_path, run_key, args.shard_dir)
        if not ctx.main:
            return None

    metrics, probs = test_metrics(net, ds, meta, args, run_dir, test_probs)
    metrics.update(checkpoint_sha256=checkpoint_sha256,
                   evaluated_on={"device": str(device), "threads": torch.get_num_threads(),
                                 "world_size": ctx.world_size})
    print(report.console_results(formats.rounded(metrics), f"Test split of {tag}"))
    plots.plot_reliability(probs, ds.test.labels.numpy(), ds.task == datasets.MULTI_LABEL,
                           figures / "reliability.png",
                           f"Reliability, test split of {tag} (ECE {formats.metric(metrics['ece'])})")
    if metrics["confusion_matrix"] is not None:  # multi-label data has none
        plots.plot_confusion(metrics["confusion_matrix"], ds.class_names, figures / "confusion_matrix.png",
                             f"Confusion matrix, test split of {tag} (ACC {formats.metric(metrics['acc'])}, TTA "
                             f"{'on' if args.tta else 'off'})")

    conn = db.connect(db_path)
    run_id = db.run_id_for(conn, *run_key)
    if not ctx.launched:  # under torchrun, shards.sharded_explanations did this part
        try:
            explanations.explain_methods(explaining, indices, conn, run_id)
            if quality_idx:
                quality.quality_into_db(scoring, quality_idx, conn, run_id)
        except KeyboardInterrupt:
            db.close(conn)
            print(f"\nInterrupted. Every finished batch is stored in run {run_id}; rerun the same command "
                  f"to compute the rest.", file=sys.stderr)
            raise SystemExit(130) from None

    metrics.update(explanation_metrics(conn, run_id, ig_settings, db_path, args, indices, quality_idx))
    if quality_idx:
        quality.quality_figures(conn, run_id, scoring, quality_idx, figures, tag, metrics["trust"],
                                metrics["recommended"])
    if indices:
        metrics["gallery"] = draw_galleries(conn, run_id, ds, args.methods, figures, tag, metrics["recommended"])
    metrics = formats.rounded(metrics)
    print(report.console_explanations(metrics))
    db.set_metrics(conn, run_id, metrics)
    write_json(run_dir / "metrics.json", metrics)
    db.close(conn)
    print(f"metrics -> {run_dir / 'metrics.json'}; explanations -> {db_path}; predictions -> "
          f"{run_dir / 'predictions_test.csv'}")
    if figures == run_dir / "images":  # the report embeds the run's own figures
        print(f"report -> {report.write_report(run_dir)} (and {run_dir / 'MODEL_CARD.md'})")
    return metrics


def explanation_metrics(conn, run_id, ig_settings, db_path, args, indices, quality_idx):
    """metrics.json's explanation part, over everything stored for the run (a smaller rerun cannot
    shrink it): the store's run, requested and effective counts, per method its stored maps and
    quality (completeness: for IG over all its stored maps), the controls' quality, the trust table
    and the recommended method."""
    if args.quality != "all" and int(args.quality) > len(quality_idx):
        print(f"Quality for {len(quality_idx)} images: --quality {args.quality} asks for more than the "
              f"{len(quality_idx)} explained (--explain {args.explain}), and only explained images are scored.")
    summaries, table, rec = (trust.assess(conn, run_id, ig_settings["tolerance"]) if db.quality_methods(conn, run_id)
                             else ({}, {}, None))
    unstored = [m for m in summaries if m not in quality.CONTROLS]  # SmoothGrad over IG has no stored maps
    methods = db.explanation_methods(conn, run_id) + unstored
    out = {m: {"maps": len(db.done_indices(conn, run_id, "test", m)),
               "quality": summaries.get(m) or quality.quality_summary(conn, run_id, m, ig_settings["tolerance"])}
           for m in dict.fromkeys(["ig", *methods])}
    return {"store": {"run_id": run_id, "db": str(db_path), "ig_settings": ig_settings},
            "requested": {"explain": args.explain, "explain_errors": args.explain_errors, "quality": args.quality},
            "effective": {"explain": len(indices), "quality": len(quality_idx)},
            "explanations": out, "controls": {c: summaries[c] for c in quality.CONTROLS if c in summaries},
            "trust": table, "recommended": rec}


def test_metrics(net, ds, meta, args, run_dir, test_probs):
    """(metrics.json's classification part, the probabilities it was computed from): test metrics
    with bootstrap intervals, validation's, TTA on and off (for a model trained with flips), the
    centre shift, the model's cost and provenance; writes the predictions CSVs (and medmnist's own
    result files for real data). `test_probs` are the test split's probabilities without TTA."""
    def probabilities(split, tta):
        if split is ds.test and not tta:
            return test_probs
        return model_lib.predict_probabilities(net, split.images, args.batch_size, next(net.parameters()).device,
                                               tta=tta)
    labels = ds.test.labels.numpy()
    probs, val_probs = probabilities(ds.test, args.tta), probabilities(ds.val, args.tta)
    val = metrics_lib.classification_metrics(ds.val.labels.numpy(), val_probs, ds.class_names, ds.task)
    m = {**metrics_lib.classification_metrics(labels, probs, ds.class_names, ds.task),
         **metrics_lib.bootstrap_intervals(labels, probs, ds.task),
         "val": {k: val[k] for k in ("acc", "auc", "ece", "n")},
         "seed": meta["settings"]["seed"], "params": model_lib.count_params(net),
         "macs": model_lib.layer_costs(model_lib.build(net.config), ds.size)[-1][3],
         "tta": args.tta, "checkpoint": str(args.checkpoint),
         "provenance": meta["provenance"], "best_epoch": meta["best_epoch"],
         "commands": {"train": cli.train_command(meta["settings"], args.data_dir, str(run_dir)),
                      "evaluate": cli.command_line("evaluate.py", parse_args, args, ("checkpoint", "data_dir"))}}
    if meta["settings"]["flips"]:  # both ways, for the report: TTA on and off
        other = metrics_lib.classification_metrics(labels, probabilities(ds.test, not args.tta), ds.class_names,
                                                   ds.task)
        m["tta_comparison"] = {"on" if args.tta else "off": {"acc": m["acc"], "auc": m["auc"]},
                               "off" if args.tta else "on": {"acc": other["acc"], "auc": other["auc"]}}
    m["centre_shift"] = centre_shift.centre_shift(ds, val_probs, probs, meta["colour_reference"])
    metrics_lib.write_predictions(run_dir / "predictions_test.csv", probs)
    metrics_lib.write_predictions(run_dir / "predictions_val.csv", val_probs)
    for split, split_probs in (("test", probs), ("val", val_probs)):
        metrics_lib.medmnist_results(ds, split, split_probs, run_dir / "medmnist")
    return m, probs


def draw_galleries(conn, run_id, ds, methods, figures, tag, recommended):
    """ig_examples.png, and methods.png with several methods (the recommended one first); returns
    what the gallery shows (gallery.plot_ig_examples'), for metrics.json and the figure's caption."""
    methods = sorted(methods, key=lambda m: m != recommended)
    shown = gallery.plot_ig_examples(conn, run_id, ds, figures / "ig_examples.png",
                                     f"Integrated Gradients on the test split of {tag}")
    print(f"{shown['panels']} IG examples -> {figures / 'ig_examples.png'}")
    if len(methods) > 1:
        n = gallery.plot_method_examples(conn, run_id, ds, methods, figures / "methods.png",
                                         f"Attribution methods side by side, test split of {tag}")
        print(f"{n} examples in {len(methods)} methods -> {figures / 'methods.png'}")
    return shown


if __name__ == "__main__":
    cli.run(main)
