"""explain.py: the attribution methods (Integrated Gradients via Captum), image files, and a CLI.

    python explain.py tile.png [more.jpg ...]               # classify + explain image files
    python explain.py tile.tif --target "debris"            # explain a named class instead
    python explain.py --db runs/pathmnist_28/explanations.db --index 17   # re-render a stored one

Image files are read by tiles.py (any size and mode, centre-cropped and resized to the model's input),
which also warns about inputs unlike the training data; every prediction goes to predictions.csv.

IG integrates the gradient of the explained class's logit along the straight path from a baseline
to the image. The default baseline is the training split's mean colour, a flat image: for H&E, a
black baseline gives dark haematoxylin-stained nuclei almost no attribution (they are close to it)
and a white one does the same to glass and fat, while the mean stain colour penalises neither and
carries no structure. The delta (Captum's convergence delta) is the completeness error:
sum(attributions) - (f(image) - f(baseline)); images whose delta is too large get more steps.

How far to trust the maps (deletion/insertion, randomisation, localisation, ...) is quality.py's
job; the figures are plots.py's; what the model guarantees to explainers is in model.py.
"""
import argparse
import contextlib
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, NoiseTunnel, Occlusion, Saliency

import data
import db
import model as model_lib
import plots
import tiles

BASELINES = ("mean", "black", "white", "blur")
METHODS = ("gausslegendre", "riemann_trapezoid", "riemann_middle", "riemann_left", "riemann_right")
OUTPUTS = ("logit", "prob")
# Steps are chosen per image by the measured completeness error: every image starts with 8
# Gauss-Legendre steps, and those whose |delta| exceeds `tolerance` of |f(x) - f(baseline)| are
# recomputed with twice the steps, up to `max_steps` (see README for the measurements).
DEFAULT_IG = {"n_steps": 8, "max_steps": 64, "tolerance": 0.05, "method": "gausslegendre",
              "baseline": "mean", "target": "pred", "output": "logit"}
# On CPU, IG's scaled images go through the model ~256 at a time: small enough to stay in cache,
# large enough to batch well (measured: 520 vs 424 attributions/s for 32 images x 16 steps at once).
CPU_CHUNK = 256


def chunk_size(x, copies=1):
    """Captum's internal_batch_size for x: CPU_CHUNK on CPU (never below the number of examples,
    which Captum refuses), everything at once on a GPU."""
    return max(CPU_CHUNK, len(x) * copies) if x.device.type == "cpu" else None


class ExplainError(Exception):
    """An input we cannot explain (unreadable image, unknown class); meant for the user."""


@dataclass
class IGResult:
    attributions: torch.Tensor   # (B, 3, H, W) float32
    delta: torch.Tensor          # (B,) sum(attr) - (f(x) - f(baseline))
    score: torch.Tensor          # (B,) f(x) for the explained class
    baseline_score: torch.Tensor  # (B,) f(baseline)
    n_steps: torch.Tensor        # (B,) integration steps used for each image

    def tensors(self):
        return [getattr(self, f.name) for f in fields(self)]

    def take(self, rows):
        """The results for a subset of the batch (an index tensor or a slice)."""
        return IGResult(*(t[rows] for t in self.tensors()))

    def cpu(self):
        return IGResult(*(t.cpu() for t in self.tensors()))

    def relative_error(self):
        return db.relative_completeness_error(self.delta, self.score - self.baseline_score)

    def stored(self, attr_dtype):
        """The per-image arrays db.explanation_rows takes, attributions in the storage dtype.

        The float16 conversion happens in torch: numpy converts the tiny values IG produces (float16
        subnormals) in slow software, 35x slower, to the same bits."""
        return {"attributions": self.attributions.to(getattr(torch, attr_dtype)).numpy(),
                "delta": self.delta.numpy(), "score": self.score.numpy(),
                "baseline_score": self.baseline_score.numpy(), "n_steps": self.n_steps.numpy()}


@contextlib.contextmanager
def input_gradients_only(model):
    """During IG only the input needs a gradient; parameter gradients would be wasted work."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


def make_baseline(x, kind, mean):
    """The IG reference image for each image in x; `mean` is the training mean colour, (C,)."""
    if kind == "mean":
        mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device)
        return mean.view(1, -1, 1, 1).expand_as(x).contiguous()
    if kind == "black":
        return torch.zeros_like(x)
    if kind == "white":
        return torch.ones_like(x)
    if kind == "blur":
        from torchvision.transforms.functional import gaussian_blur  # torchvision loads slowly (data.py)
        sigma = x.shape[-1] / 7  # removes structure at 28 px, keeps the overall stain colour
        return gaussian_blur(x, kernel_size=2 * int(3 * sigma) + 1, sigma=sigma)
    raise ValueError(f"unknown baseline {kind!r}; choose from {BASELINES}")


def forward_for(model, output):
    """The function IG explains: the model's logits, or its probabilities (model.probabilities:
    softmax, or a sigmoid per label for a multi-label model)."""
    if output == "prob":
        return lambda x: model_lib.probabilities(model, model(x))
    return model


def integrated_gradients(model, x, target, baseline="mean", n_steps=8, method="gausslegendre",
                         output="logit", internal_batch_size=None, logits=None):
    """IG for a batch of [0, 1] images `x` and class indices `target`, with completeness terms.

    The delta is the quantity Captum's compute_convergence_delta returns, sum(attr) - (f(x) -
    f(baseline)), computed here so that f(x) comes from `logits` when the caller already has them
    instead of from two more forward passes.
    """
    model.eval()
    forward = forward_for(model, output)
    base = make_baseline(x, baseline, model_lib.input_mean(model))
    with input_gradients_only(model):
        attr = IntegratedGradients(forward).attribute(
            x, baselines=base, target=target, n_steps=n_steps, method=method,
            internal_batch_size=internal_batch_size)
    with torch.no_grad():
        rows = torch.arange(len(x), device=x.device)
        at_x = forward(x) if logits is None else (
            model_lib.probabilities(model, logits) if output == "prob" else logits)
        score, baseline_score = at_x[rows, target], forward(base)[rows, target]
        delta = attr.sum(dim=(1, 2, 3), dtype=torch.float64) - (score - baseline_score).double()
    steps = torch.full((len(x),), n_steps, dtype=torch.long)
    return IGResult(attr.detach(), delta.float(), score, baseline_score, steps)


def refined_integrated_gradients(model, x, target, settings, logits=None, internal_batch_size=None):
    """IG at settings["n_steps"]; images whose relative completeness error exceeds
    settings["tolerance"] are recomputed with twice the steps, until settings["max_steps"].

    Gauss-Legendre nodes are not nested, so a refined image is integrated afresh; few need it.
    """
    def run(rows, n):
        return integrated_gradients(model, x[rows], target[rows], baseline=settings["baseline"],
                                    n_steps=n, method=settings["method"], output=settings["output"],
                                    logits=None if logits is None else logits[rows],
                                    internal_batch_size=internal_batch_size)
    n = settings["n_steps"]
    result = run(torch.arange(len(x), device=x.device), n)
    while n < settings["max_steps"]:
        rows = (result.relative_error() > settings["tolerance"]).nonzero().flatten()
        if len(rows) == 0:
            break
        n = min(2 * n, settings["max_steps"])
        redo = run(rows, n)
        result.attributions[rows], result.delta[rows] = redo.attributions, redo.delta
        result.n_steps[rows.cpu()] = n
    return result


def attribution_fn(settings, smooth=0, smooth_stdev=0.1):
    """(model, x, target) -> attributions: IG at a fixed settings["n_steps"], or, with `smooth`
    samples, SmoothGrad over it (Captum's NoiseTunnel, Gaussian noise of `smooth_stdev`)."""
    def ig(model, x, target):
        return integrated_gradients(model, x, target, baseline=settings["baseline"],
                                    n_steps=settings["n_steps"], method=settings["method"],
                                    output=settings["output"], internal_batch_size=chunk_size(x)).attributions

    def smoothgrad_ig(model, x, target):
        with input_gradients_only(model):
            return NoiseTunnel(IntegratedGradients(forward_for(model, settings["output"]))).attribute(
                x, nt_type="smoothgrad", nt_samples=smooth, stdevs=smooth_stdev,
                baselines=make_baseline(x, settings["baseline"], model_lib.input_mean(model)),
                target=target, n_steps=settings["n_steps"], method=settings["method"],
                internal_batch_size=chunk_size(x, smooth)).detach()
    return smoothgrad_ig if smooth else ig


# ----------------------------------------------------------------------------- other methods

# Every attribution method evaluate.py and explain.py offer (--methods), all from Captum. "ig" is
# the stored, completeness-checked IG above; the others give maps of the input's shape too.
ATTRIBUTION_METHODS = ("ig", "ig_local", "saliency", "smoothgrad_sq", "gradcam", "occlusion")
SMOOTHGRAD_SAMPLES, SMOOTHGRAD_SD = 16, 0.1  # smoothgrad_sq: noisy copies, noise s.d. in [0, 1] pixel units


def methods_arg(text):
    """argparse type for --methods: 'all' or a comma-separated list of ATTRIBUTION_METHODS; 'ig'
    always comes first (the other methods reuse its predictions)."""
    names = list(ATTRIBUTION_METHODS) if text == "all" else [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in ATTRIBUTION_METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{', '.join(unknown) or repr(text)} is not an attribution "
                                         f"method; choose from {', '.join(ATTRIBUTION_METHODS)}, or all")
    return ["ig"] + [m for m in ATTRIBUTION_METHODS[1:] if m in names]


def occlusion_window(size):
    """(window, stride) in pixels for occlusion: 4 and 2 at 28 px, growing with the image."""
    return max(2, round(size / 7)), max(1, round(size / 14))


def method_fn(name, settings):
    """(model, x, target) -> float32 attributions of x's shape, for one of ATTRIBUTION_METHODS.

    ig: IG at settings' fixed step count (evaluate.py stores the refined IG instead);
    ig_local: IG without the (x - baseline) factor (Captum's multiply_by_inputs=False), the path
    average of the gradient; saliency: |input gradient| (Simonyan et al.; Captum's default); smoothgrad_sq: SmoothGrad-Squared
    of the gradient (NoiseTunnel); gradcam: LayerGradCam on model_lib.gradcam_layer, upsampled
    bilinearly and spread evenly over the channels; occlusion: the drop in the output when a window
    (occlusion_window) is set to the IG baseline."""
    if name == "ig":
        return attribution_fn(settings)

    def run(model, x, target):
        forward = forward_for(model, settings["output"])
        base = make_baseline(x, settings["baseline"], model_lib.input_mean(model))
        with input_gradients_only(model):
            if name == "ig_local":
                attr = IntegratedGradients(forward, multiply_by_inputs=False).attribute(
                    x, baselines=base, target=target, n_steps=settings["n_steps"], method=settings["method"],
                    internal_batch_size=chunk_size(x))
            elif name == "saliency":  # an input that requires grad spares Captum's warning
                attr = Saliency(forward).attribute(x.detach().requires_grad_(), target=target)
            elif name == "smoothgrad_sq":
                attr = NoiseTunnel(Saliency(forward)).attribute(
                    x, nt_type="smoothgrad_sq", nt_samples=SMOOTHGRAD_SAMPLES, stdevs=SMOOTHGRAD_SD,
                    nt_samples_batch_size=SMOOTHGRAD_SAMPLES, target=target, abs=False)
            elif name == "gradcam":
                cam = LayerGradCam(forward, model_lib.gradcam_layer(model)).attribute(x, target=target)
                cam = LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), "bilinear")
                attr = cam.expand_as(x) / x.shape[1]
            elif name == "occlusion":
                window, stride = occlusion_window(x.shape[-1])
                attr = Occlusion(forward).attribute(
                    x, sliding_window_shapes=(x.shape[1], window, window), strides=(x.shape[1], stride, stride),
                    baselines=base, target=target, perturbations_per_eval=16)
            else:
                raise ValueError(f"unknown attribution method {name!r}; choose from {ATTRIBUTION_METHODS}")
        return attr.detach().float().contiguous()
    return run


def stored_attributions(rows):
    """The attributions of stored explanation rows (read with arrays) as one float32 (N, C, H, W) tensor."""
    return torch.from_numpy(np.stack([r["attribution"] for r in rows]).astype(np.float32))


def resolve_target(target, class_names, labels_known=True, multi_label=False):
    """'pred', 'true', or a class given by index or name -> 'pred' | 'true' | int. 'true' needs
    one true label per image: image files have none (labels_known=False), and multi-label images
    have several or none, so there 'pred' (the highest-scoring label) or a named label is explained."""
    choices = "'pred', 'true'," if labels_known and not multi_label else "'pred',"
    if target == "true" and not labels_known:
        raise ExplainError("--target true needs true labels, which image files do not have. Use "
                           "'pred', or name the class to explain by index or name.")
    if target == "true" and multi_label:
        raise ExplainError("--target true needs one true class per image, but this dataset is "
                           "multi-label: an image has several true labels or none. Use 'pred' (the "
                           "highest-scoring label), or name the label to explain by index or name.")
    if target in ("pred", "true"):
        return target
    if str(target).isdigit() and int(target) < len(class_names):
        return int(target)
    lowered = [c.lower() for c in class_names]
    if str(target).lower() in lowered:
        return lowered.index(str(target).lower())
    raise ExplainError(f"--target {target!r} is not {choices} a class index 0-{len(class_names) - 1} "
                       f"or a class name ({', '.join(class_names)}).")


def target_indices(target, logits, labels=None):
    if target == "pred":
        return logits.argmax(1)
    if target == "true":
        if labels is None:
            raise ExplainError("--target true needs true labels, which image files do not have.")
        return labels
    return torch.full((len(logits),), int(target), dtype=torch.long, device=logits.device)


def explain_batch(model, images_u8, labels, settings, device="cpu"):
    """Predictions and IG for uint8 images: (probs, targets, IGResult), all on the CPU."""
    x = data.to_unit(images_u8.to(device))
    with torch.no_grad():
        logits = model(x)
    targets = target_indices(settings["target"], logits,
                             None if labels is None else labels.to(device))
    result = refined_integrated_gradients(model, x, targets, settings, logits=logits,
                                          internal_batch_size=chunk_size(x))
    return model_lib.probabilities(model, logits).cpu(), targets.cpu(), result.cpu()


# ----------------------------------------------------------------------------- CLI

def add_ig_arguments(p):
    """The IG flags, shared by explain.py and evaluate.py."""
    p.add_argument("--n-steps", type=int, default=DEFAULT_IG["n_steps"], help="IG integration steps "
                   "to start with, for every image")
    p.add_argument("--max-steps", type=int, default=DEFAULT_IG["max_steps"], help="double the steps of "
                   "images whose completeness error exceeds --tolerance, up to this many (set it to "
                   "--n-steps for a fixed count)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_IG["tolerance"], help="allowed "
                   "|delta| / |f(x) - f(baseline)| before an image is recomputed with more steps")
    p.add_argument("--method", default=DEFAULT_IG["method"], choices=METHODS, help="IG integration rule")
    p.add_argument("--baseline", default=DEFAULT_IG["baseline"], choices=BASELINES,
                   help="IG reference image: training mean colour, black, white or blurred input")
    p.add_argument("--output", default=DEFAULT_IG["output"], choices=OUTPUTS,
                   help="explain the class logit or its softmax probability")
    p.add_argument("--target", default=DEFAULT_IG["target"], help="class to explain: 'pred' "
                   "(predicted; for multi-label data the highest-scoring label), 'true' (dataset "
                   "images of single-label data only), or a class index or name")


def ig_settings(args, class_names, labels_known=True, multi_label=False):
    """The IG settings dict from parsed flags (they also identify a run in the DB)."""
    if args.max_steps < args.n_steps:
        raise ExplainError(f"--max-steps {args.max_steps} is below --n-steps {args.n_steps}.")
    return {"n_steps": args.n_steps, "max_steps": args.max_steps, "tolerance": args.tolerance,
            "method": args.method, "baseline": args.baseline, "output": args.output,
            "target": resolve_target(args.target, class_names, labels_known, multi_label)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Classify and explain image files (H&E tiles for a "
                                "PathMNIST model) with Integrated Gradients, or re-render an "
                                "explanation stored by evaluate.py.",
                                formatter_class=model_lib.HelpFormatter)
    p.add_argument("images", nargs="*", help="PNG/JPEG/TIFF files, or folders of them, to classify "
                   "and explain")
    p.add_argument("--checkpoint", default="runs/pathmnist_28/best.pt", help="trained model (train.py)")
    p.add_argument("--methods", type=methods_arg, default=["ig"], help="also draw these attribution "
                   "methods beside IG (<name>_methods.png), comma-separated or 'all': "
                   + ", ".join(ATTRIBUTION_METHODS) + " (default: ig)")
    p.add_argument("--out", default="images/explain", help="folder for the attribution figures and "
                   "predictions.csv")
    add_ig_arguments(p)
    p.add_argument("--device", default="auto", help=model_lib.DEVICE_HELP)
    p.add_argument("--db", help="with --index: re-render an explanation stored in this SQLite file")
    p.add_argument("--index", type=int, help="with --db: the image index to re-render")
    p.add_argument("--run", type=int, help="with --db: the run id (default: the latest run)")
    p.add_argument("--split", default="test", help="with --db: the split the image came from")
    p.add_argument("--data-dir", default="data", help="with --db: folder holding the dataset npz")
    args = p.parse_args(argv)
    if bool(args.db) != (args.index is not None):
        p.error("--db and --index go together")
    if not args.db and not args.images:
        p.error("give image files to explain, or --db DB --index I")
    return args


PREDICTION_COLUMNS = ["file", "class", "confidence", "top3", "completeness_error", "figure", "warnings"]


def explain_files(args):
    """Explain every image file (and every image in each folder) given; a file that cannot be read is
    reported and skipped, and the run then ends with an error. Writes one figure per image and
    <out>/predictions.csv."""
    device = model_lib.resolve_device(args.device)
    net, meta = model_lib.load_checkpoint(args.checkpoint, device)
    net = model_lib.fused_for_inference(net)
    names, size, channels = meta["class_names"], meta["provenance"]["size"], net.config["in_channels"]
    settings = ig_settings(args, names, labels_known=False)
    paths = tiles.image_paths(args.images)
    rows, failed = [], []
    for path, stem in zip(paths, tiles.output_stems(paths)):
        try:
            image, original = tiles.read_image(path, size, channels)
        except tiles.ImageError as e:
            print(f"error: {e}", file=sys.stderr)
            failed.append(str(path))
            continue
        probs, targets, result = explain_batch(net, image[None], None, settings, device)
        top = probs[0].topk(min(3, len(names)))
        pred = int(top.indices[0])
        top3 = ", ".join(f"{names[i]} {v:.1%}" for v, i in zip(top.values.tolist(), top.indices.tolist()))
        print(f"{path}: {names[pred]} ({top.values[0]:.1%})   top-3: {top3}")
        warnings = tiles.input_warnings(image, original, size, meta.get("colour_reference"))
        for warning in warnings:
            print(f"  warning: {warning}")
        out = Path(args.out) / f"{stem}_ig.png"
        notes = ([f"explaining {names[int(targets[0])]}"] if int(targets[0]) != pred else []) + (
            ["WARNING: unlike the training data"] if warnings else [])
        title = plots.panel_title(names, None, pred, float(top.values[0]), notes)
        plots.explanation_figure([(data.to_unit(image), result.attributions[0], title)], out,
                                 f"IG, model trained on {data.describe(meta['provenance'])}")
        error = float(result.relative_error()[0])
        print(f"  attribution figure -> {out}  (completeness error {error:.1%} of f(x) - f(baseline))")
        if len(args.methods) > 1:
            x = data.to_unit(image[None].to(device))
            maps = {"ig": [result.attributions[0]]}
            maps.update({m: [method_fn(m, settings)(net, x, targets.to(device))[0].cpu()] for m in args.methods[1:]})
            side_by_side = Path(args.out) / f"{stem}_methods.png"
            plots.plot_methods([(data.to_unit(image), title)], maps, side_by_side,
                               f"Attribution methods, model trained on {data.describe(meta['provenance'])}")
            print(f"  methods side by side -> {side_by_side}")
        rows.append({"file": str(path), "class": names[pred], "confidence": f"{float(top.values[0]):.4f}",
                     "top3": top3, "completeness_error": f"{error:.4f}", "figure": str(out),
                     "warnings": "; ".join(warnings)})
    if rows:
        data.write_csv(Path(args.out) / "predictions.csv", PREDICTION_COLUMNS, rows)
        print(f"predictions -> {Path(args.out) / 'predictions.csv'}")
    if failed or not paths:
        raise ExplainError(f"{len(failed)} of {len(paths)} inputs could not be explained: {', '.join(failed)}."
                           if paths else f"No image files ({', '.join(tiles.IMAGE_SUFFIXES)}) in {', '.join(args.images)}.")


def render_stored(args):
    conn = db.connect(args.db, create=False)
    run = db.get_run(conn, args.run)
    row = db.get_explanation(conn, run["run_id"], args.split, args.index)
    ds = data.load_matching(run["provenance"], args.data_dir)
    image = data.to_unit(getattr(ds, args.split).images[args.index])
    names = ds.class_names
    true = db.true_classes(row)
    title = plots.panel_title(names, true, row["pred_label"], row["confidence"])
    out = Path(args.out) / f"run{run['run_id']}_{args.split}_{args.index}_ig.png"
    plots.explanation_figure([(image, stored_attributions([row])[0], title)], out,
                f"stored IG, run {run['run_id']}, {data.describe(run['provenance'])}")
    print(f"{args.split}[{args.index}]: true {plots.label_text(names, true)}, pred {names[row['pred_label']]} "
          f"({row['confidence']:.1%}), delta {row['delta']:.2e} -> {out}")


def main(argv=None):
    args = parse_args(argv)
    if args.db:
        render_stored(args)
    else:
        explain_files(args)


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # each line reaches a piped log when printed
    try:
        main()
    except (ExplainError, data.DataError, model_lib.CheckpointError, model_lib.DeviceError,
            db.DBError) as e:
        sys.exit(f"error: {e}")
