"""explain.py: classify and explain image files, or re-render an explanation stored by evaluate.py.

    python explain.py tile.png [more.jpg ...]               # classify + explain image files
    python explain.py tile.tif --target "debris"            # explain a named class instead
    python explain.py tile.png --methods all                # every attribution method side by side
    python explain.py --db runs/pathmnist_28/explanations.db --index 17   # re-render a stored one

Image files are read by tiles.py (any size and mode, centre-cropped and resized to the model's input),
which also warns about inputs unlike the training data; every prediction goes to predictions.csv.
The maps come from attribution.py (refined IG, and --methods beside it); figures from plots.py.
"""
import argparse
import sys
from pathlib import Path

import attribution as attr
import cli
import data
import datasets
import db
import model as model_lib
import plots
import tiles
from colour import to_unit
from files import write_csv


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Classify and explain image files (H&E tiles for a "
                                "PathMNIST model) with Integrated Gradients, or re-render an "
                                "explanation stored by evaluate.py.",
                                formatter_class=cli.HelpFormatter)
    p.add_argument("images", nargs="*", help="PNG/JPEG/TIFF files, or folders of them, to classify "
                   "and explain")
    p.add_argument("--checkpoint", default="runs/pathmnist_28/best.pt", help="trained model (train.py)")
    p.add_argument("--methods", type=attr.methods_arg, default=["ig"], help="also draw these attribution "
                   "methods beside IG (<name>_methods.png), comma-separated or 'all': "
                   + ", ".join(attr.ATTRIBUTION_METHODS) + " (default: ig)")
    p.add_argument("--out", help="folder for the attribution figures and predictions.csv (default: <run>/explain, "
                   "beside the checkpoint, or beside --db's store)")
    cli.add_ig_arguments(p)
    cli.add_device(p)
    p.add_argument("--db", help="with --index: re-render an explanation stored in this SQLite file")
    p.add_argument("--index", type=int, help="with --db: the image index to re-render")
    p.add_argument("--run", type=int, help="with --db: the run id (default: the latest run)")
    p.add_argument("--split", default="test", help="with --db: the split the image came from")
    cli.add_data_dir(p, " (with --db, and for --methods expected_gradients, which draws its baselines from the "
                     "training images)")
    args = p.parse_args(argv)
    if bool(args.db) != (args.index is not None):
        p.error("--db and --index go together")
    if not args.db and not args.images:
        p.error("give image files to explain, or --db DB --index I")
    args.out = args.out or str(Path(args.db or args.checkpoint).parent / "explain")  # one folder per model's run
    return args


PREDICTION_COLUMNS = ["file", "class", "confidence", "top3", "completeness_error", "figure", "warnings"]


def explain_files(args):
    """Explain every image file (and every image in each folder) given; a file that cannot be read is
    reported and skipped, and the run then ends with an error. Writes one figure per image and
    <out>/predictions.csv."""
    device = cli.resolve_device(args.device)
    net, meta = model_lib.load_checkpoint(args.checkpoint, device)
    net = model_lib.fused_for_inference(net)
    settings = attr.ig_settings(args, meta["class_names"], labels_known=False)
    references = None
    if "expected_gradients" in args.methods:  # its baselines are training images
        train_images = data.load_matching(meta["provenance"], args.data_dir).train.images
        references = attr.reference_sample(train_images).to(device)
    methods = {m: attr.method_fn(m, settings, references) for m in args.methods[1:]}
    paths = tiles.image_paths(args.images)
    rows, failed = [], []
    for path, stem in zip(paths, tiles.output_stems(paths), strict=True):
        try:
            image, original = tiles.read_image(path, meta["provenance"]["size"], net.config["in_channels"])
        except tiles.ImageError as e:
            print(f"error: {e}", file=sys.stderr)
            failed.append(str(path))
            continue
        rows.append(explain_file(net, meta, settings, methods, path, stem, image, original, args, device))
    if rows:
        write_csv(Path(args.out) / "predictions.csv", PREDICTION_COLUMNS, rows)
        print(f"predictions -> {Path(args.out) / 'predictions.csv'}")
    if not paths:
        raise attr.ExplainError(f"No image files ({', '.join(tiles.IMAGE_SUFFIXES)}) in {', '.join(args.images)}.")
    if failed:
        raise attr.ExplainError(f"{len(failed)} of {len(paths)} inputs could not be explained: {', '.join(failed)}.")


def explain_file(net, meta, settings, methods, path, stem, image, original, args, device):
    """Classify and explain one image read from `path`: prints the prediction and any warnings,
    draws <out>/<stem>_ig.png (and <stem>_methods.png with the other `methods`, name -> function);
    returns its CSV row."""
    names, size = meta["class_names"], meta["provenance"]["size"]
    probs, targets, result = attr.explain_batch(net, image[None], None, settings, device)
    top = probs[0].topk(min(3, len(names)))
    pred = int(top.indices[0])
    top3 = ", ".join(f"{names[i]} {v:.1%}" for v, i in zip(top.values.tolist(), top.indices.tolist(), strict=True))
    print(f"{path}: {names[pred]} ({top.values[0]:.1%})   top-3: {top3}")
    warnings = tiles.input_warnings(image, original, size, meta.get("colour_reference"))
    for warning in warnings:
        print(f"  warning: {warning}")
    out = Path(args.out) / f"{stem}_ig.png"
    notes = ([f"explaining {names[int(targets[0])]}"] if int(targets[0]) != pred else []) + (
        ["WARNING: unlike the training data"] if warnings else [])
    title = plots.panel_title(names, None, pred, float(top.values[0]), notes)
    trained_on = datasets.describe(meta["provenance"])
    plots.explanation_figure([(to_unit(image), result.attributions[0], title)], out,
                             f"IG, model trained on {trained_on}")
    error = float(result.relative_error()[0])
    print(f"  attribution figure -> {out}  (completeness error {error:.1%} of f(x) - f(baseline))")
    if methods:
        x = to_unit(image[None].to(device))
        maps = {"ig": [result.attributions[0]]}
        with attr.seeded(0):  # noisy methods draw the same for every file
            maps.update({m: [attribute(net, x, targets.to(device))[0].cpu()] for m, attribute in methods.items()})
        side_by_side = Path(args.out) / f"{stem}_methods.png"
        plots.plot_methods([(to_unit(image), title)], maps, side_by_side,
                           f"Attribution methods, model trained on {trained_on}")
        print(f"  methods side by side -> {side_by_side}")
    return {"file": str(path), "class": names[pred], "confidence": f"{float(top.values[0]):.4f}", "top3": top3,
            "completeness_error": f"{error:.4f}", "figure": str(out), "warnings": "; ".join(warnings)}


def render_stored(args):
    conn = db.connect(args.db, create=False)
    run = db.get_run(conn, args.run)
    row = db.get_explanation(conn, run["run_id"], args.split, args.index)
    ds = data.load_matching(run["provenance"], args.data_dir)
    image = to_unit(getattr(ds, args.split).images[args.index])
    names = ds.class_names
    true = db.true_classes(row)
    title = plots.panel_title(names, true, row["pred_label"], row["confidence"])
    out = Path(args.out) / f"run{run['run_id']}_{args.split}_{args.index}_ig.png"
    plots.explanation_figure([(image, attr.stored_attributions([row])[0], title)], out,
                             f"stored IG, run {run['run_id']}, {datasets.describe(run['provenance'])}")
    print(f"{args.split}[{args.index}]: true {plots.label_text(names, true)}, pred {names[row['pred_label']]} "
          f"({row['confidence']:.1%}), delta {row['delta']:.2e} -> {out}")


def main(argv=None):
    args = parse_args(argv)
    if args.db:
        render_stored(args)
    else:
        explain_files(args)


if __name__ == "__main__":
    cli.run(main)
