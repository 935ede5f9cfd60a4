"""explain.py: classify and explain image files, or re-render an explanation stored by evaluate.py.

    python explain.py tile.png [more.jpg ...]               # classify + explain image files
    python explain.py tile.tif --target "debris"            # explain a named class instead
    python explain.py tile.png --methods all                # every attribution method side by side
    python explain.py tiles/ --no-figures                   # thousands of tiles: predictions.csv only
    python explain.py --db runs/pathmnist_28/explanations.db --index 17   # re-render a stored one

Image files are read by tiles.py (any size and mode, centre-cropped and resized to the model's input),
which also warns about inputs unlike the training data; every prediction goes to predictions.csv,
with IG's completeness error and a warning where refinement left it above --tolerance. The maps
come from attribution.py (refined IG, and --methods beside it); figures from plots.py, showing the
tile as read beside the model's input.
"""
import argparse
import sys
from pathlib import Path

import attribution as attr
import cli
import data
import datasets
import db
import formats
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
                   + ", ".join(attr.METHODS) + " (default: ig)")
    p.add_argument("--out", help="folder for the attribution figures and predictions.csv (default: <run>/explain, "
                   "beside the checkpoint, or beside --db's store)")
    p.add_argument("--no-figures", action="store_true", help="write predictions.csv only, no figure per image "
                   "(for thousands of tiles: the maps are still computed, for their completeness)")
    attr.add_ig_arguments(p)
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
    reported and skipped, and the run then ends with an error. Writes one figure per image (unless
    --no-figures) and <out>/predictions.csv."""
    device = cli.resolve_device(args.device)
    net, meta = model_lib.load_checkpoint(args.checkpoint, device)
    net = model_lib.fused_for_inference(net)
    ig_settings = attr.ig_settings({k: getattr(args, k) for k in attr.DEFAULT_IG}, meta["class_names"],
                                   labels_known=False)
    references = None
    if any(attr.METHODS[m].needs_references for m in args.methods):  # baselines drawn from training images
        train_images = data.load_matching(meta["provenance"], args.data_dir).train.images
        references = attr.reference_sample(train_images).to(device)
    explainers = {m: attr.explainer(m, ig_settings, references) for m in args.methods[1:]}
    figures = None if args.no_figures else Path(args.out)
    paths = tiles.image_paths(args.images)
    rows, failed = [], []
    for path, stem in zip(paths, tiles.output_stems(paths), strict=True):
        try:
            tile = tiles.read_tile(path, meta["provenance"]["size"], net.config["in_channels"])
        except tiles.ImageError as e:
            print(f"error: {e}", file=sys.stderr)
            failed.append(str(path))
            continue
        rows.append(explain_file(net, meta, ig_settings, explainers, tile, figures and figures / stem, device))
    if rows:
        write_csv(Path(args.out) / "predictions.csv", PREDICTION_COLUMNS, rows)
        print(f"predictions -> {Path(args.out) / 'predictions.csv'}")
    if not paths:
        raise attr.ExplainError(f"No image files ({', '.join(tiles.IMAGE_SUFFIXES)}) in {', '.join(args.images)}.")
    if failed:
        raise attr.ExplainError(f"{len(failed)} of {len(paths)} inputs could not be explained: {', '.join(failed)}.")


def completeness_warning(error, steps, ig_settings):
    """The warning for a map whose completeness error refinement left above the tolerance, or None."""
    if error <= ig_settings["tolerance"]:
        return None
    return (f"IG's completeness error {formats.share(error)} stays above --tolerance "
            f"{formats.share(ig_settings['tolerance'])} after refinement to {steps} steps: the map does not add up "
            f"to f(x) - f(baseline); rerun with --max-steps {2 * ig_settings['max_steps']}")


def explain_file(net, meta, ig_settings, explainers, tile, figure_stem, device):
    """Classify and explain one Tile: prints the prediction and any warnings, draws
    <figure_stem>_ig.png (and <figure_stem>_methods.png with the other `explainers`, name ->
    function) unless figure_stem is None; returns its CSV row."""
    names, size = meta["class_names"], meta["provenance"]["size"]
    probs, targets, result = attr.explain_batch(net, tile.image[None], None, ig_settings, device)
    top = probs[0].topk(min(3, len(names)))
    pred = int(top.indices[0])
    top3 = ", ".join(f"{names[i]} {formats.probability(v)}"
                     for v, i in zip(top.values.tolist(), top.indices.tolist(), strict=True))
    print(f"{tile.path}: {names[pred]} ({formats.probability(float(top.values[0]))})   top-3: {top3}")
    error = float(result.relative_error()[0])
    warnings = tiles.input_warnings(tile.image, tile.original, size, meta["colour_reference"])
    warnings += [w for w in [completeness_warning(error, int(result.n_steps[0]), ig_settings)] if w]
    for warning in warnings:
        print(f"  warning: {warning}")
    figure = ""
    if figure_stem is not None:
        figure = str(figure_stem) + "_ig.png"
        notes = ([f"explaining {names[int(targets[0])]}"] if int(targets[0]) != pred else []) + (
            ["WARNING: see predictions.csv"] if warnings else [])
        title = [f"{tile.path.name}\nas read, {tile.original[0]}×{tile.original[1]} px",
                 plots.panel_title(names, None, pred, float(top.values[0]), notes)]
        trained_on = datasets.describe(meta["provenance"])
        plots.tile_figure(to_unit(tile.shown), to_unit(tile.image), result.attributions[0], title, figure,
                          f"{tile.path.name}: IG, model trained on {trained_on}; the model's {size} px input "
                          f"is the tile's centre square, resized")
        print(f"  attribution figure -> {figure}  (completeness error {formats.share(error)} of f(x) - f(baseline))")
        if explainers:
            draw_methods(net, tile, (title[1], targets, result), explainers, figure_stem, trained_on)
    # the CSV is data: numbers as numbers, to metrics.json's precision
    return {"file": str(tile.path), "class": names[pred], "confidence": formats.rounded(float(top.values[0])),
            "top3": top3, "completeness_error": formats.rounded(error), "figure": figure,
            "warnings": "; ".join(warnings)}


def draw_methods(net, tile, explained, explainers, figure_stem, trained_on):
    """<figure_stem>_methods.png: IG's map (`explained`: title, targets, IGResult) beside every other
    method's for one tile."""
    title, targets, result = explained
    device = next(net.parameters()).device
    x = to_unit(tile.image[None].to(device))
    maps = {"ig": [result.attributions[0]]}
    with attr.seeded(0):  # noisy methods draw the same for every file
        maps.update({m: [explain(net, x, targets.to(device))[0].cpu()] for m, explain in explainers.items()})
    side_by_side = f"{figure_stem}_methods.png"
    plots.plot_methods([(to_unit(tile.image), title)], maps, side_by_side,
                       f"{tile.path.name}: attribution methods, model trained on {trained_on}")
    print(f"  methods side by side -> {side_by_side}")


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
          f"({formats.probability(row['confidence'])}), delta {formats.measure(row['delta'])} -> {out}")


def main(argv=None):
    args = parse_args(argv)
    if args.db:
        render_stored(args)
    else:
        explain_files(args)


if __name__ == "__main__":
    cli.run(main)
