"""quality.py: how far to trust an explanation, measured per image and summarised per run.

    evaluate.py --quality 200      # runs this module's pass over 200 of the explained test images

Measures, for each image and every scored map (the attribution methods, SmoothGrad over IG with
--smooth, and the CONTROLS that must fail the tests):
- completeness: |sum(map) - (f(x) - f(reference))| as a share of f(x) - f(reference), for methods
  whose record says they are complete;
- deletion / insertion (Petsiuk et al., 2018): the explained class's probability as pixels are
  removed (set to the baseline) or inserted in attribution order, against a random order;
- ROAD (Rong et al., 2022), sMPRT and eMPRT (Hedstrom et al., 2023), RandomLogit (Sixt et al., 2020);
- Captum's infidelity and sensitivity_max;
- model randomisation (Adebayo et al., 2018): layers re-initialised top-down, bottom-up and one at a
  time (model.randomization_layers), and the rank correlation and SSIM of |map| with the trained map;
- localisation (synthetic data only): the share of |map| inside the known evidence mask.

Captum has none of deletion/insertion, ROAD's batched imputation, sMPRT, the randomisation cascade
or mask mass, so they are written here; eMPRT and RandomLogit are Quantus's own. Rows go to the
`quality` table (db.py), one transaction per batch, so an interrupted pass resumes where it stopped.
trust.py turns the summaries into verdicts.
"""
import copy
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from captum.metrics import infidelity, sensitivity_max

import attribution as attr
import budget
import cli
import db
import formats
import model as model_lib
import plots
from colour import to_unit
from progress import progress

CURVE_POINTS = 29  # deletion/insertion curves: 0, 1/28, ..., all of the pixels
RANDOMIZATION_MODES = ("top_down", "bottom_up", "single")
SSIM_WINDOW = 7  # pixels; the Gaussian-free (uniform) window of Wang et al.'s SSIM
INFIDELITY_NOISE, SENSITIVITY_RADIUS = 0.05, 0.02  # in [0, 1] pixel units
INFIDELITY_SAMPLES = 16  # noisy copies of each image in Captum's infidelity
# The published tests beside deletion/insertion and MPRT (Hedstrom et al. 2023; Sixt et al. 2020;
# Rong et al. 2022). sMPRT averages each map over noisy copies of the image (noise s.d. a share of
# the image's range, as Quantus does; the last copy noise-free); fewer copies than Quantus's default
# of 50, which would cost 50 maps per image and model. ROAD removes pixels by noisy linear imputation.
SMOOTH_MPRT_SAMPLES, SMOOTH_MPRT_NOISE = 8, 0.1
ENTROPY_BINS = 100  # eMPRT: bins of the histogram of map values whose entropy is compared
ROAD_PERCENTAGES = tuple(range(10, 100, 10))  # % of pixels imputed, most (MoRF) or least (LeRF) relevant first
ROAD_NOISE = 0.01  # s.d. of the noise added to imputed pixels (Rong et al.; Quantus's default)
QUANTUS_SEED = 42  # Quantus's own default seed for its randomisation and random classes
MEASURES_SEED = 0  # random pixel orders and metric noise: the same on every rerun


def pixel_order(attributions, generator=None):
    """(B, H*W) pixel indices, most positive channel-summed attribution first; random with a generator."""
    b, _, h, w = attributions.shape
    if generator is not None:
        return torch.stack([torch.randperm(h * w, generator=generator) for _ in range(b)])
    return attributions.sum(1).flatten(1).argsort(dim=1, descending=True, stable=True)


@torch.no_grad()
def perturbation_curves(model, x, baseline, order, target, insertion, points=CURVE_POINTS):
    """Probability of `target` as pixels, in `order`, are deleted (set to the baseline) or inserted
    (copied from x into the baseline): Petsiuk et al., 2018. Returns (B, points)."""
    b, _, h, w = x.shape
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(h * w).expand(b, -1).contiguous())
    rank = rank.view(b, 1, h, w).to(x.device)
    start, end = (baseline, x) if insertion else (x, baseline)
    rows = torch.arange(b, device=x.device)
    curve = [model_lib.probabilities(model, model(torch.where(rank < k, end, start)))[rows, target]
             for k in torch.linspace(0, h * w, points).round().long().tolist()]
    return torch.stack(curve, 1).cpu()


def curve_auc(curves):
    """Area under each curve, with the fraction of pixels (0 to 1) on the x axis."""
    return torch.trapezoid(curves, dx=1 / (curves.shape[1] - 1), dim=1)


def mask_share(attributions, masks):
    """(share of |attribution| inside the mask, the mask's share of the image) per image."""
    mass = attributions.abs().sum(1)
    masks = masks.to(mass.device, mass.dtype)
    return (mass * masks).sum((1, 2)) / mass.sum((1, 2)).clamp_min(1e-12), masks.mean((1, 2))


def rank_correlation(a, b, absolute=True):
    """Per-image Spearman correlation of a and b summed over channels, of their absolute values by
    default (Adebayo et al., 2018, report both). Tied values share their mean rank, as in scipy:
    ranking ties by position would correlate two maps that are flat in the same places."""
    def centred_ranks(t):
        t = (t.abs().sum(1) if absolute else t.sum(1)).flatten(1).contiguous()
        ordered = t.sort(1).values
        first = torch.searchsorted(ordered, t, right=False)
        last = torch.searchsorted(ordered, t, right=True) - 1
        r = (first + last).double() / 2
        return r - r.mean(1, keepdim=True)
    ra, rb = centred_ranks(a), centred_ranks(b)
    return ((ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1)).clamp_min(1e-12)).float()


def reinitialise(model, stage):
    for m in model.get_submodule(stage).modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()


def randomized_models(model, seed=0, mode="top_down"):
    """[(stage, model)], each copy BN-folded for the explainers. top_down: weights re-initialised
    cumulatively from the top layer down (Adebayo et al., 2018); bottom_up: cumulatively from the
    first layer up (what Binder et al., 2023, and Quantus recommend); single: each layer alone.
    Seeded, and without touching the global RNG."""
    layers = model_lib.randomization_layers(model)
    if mode == "bottom_up":
        layers = layers[::-1]
    out, rand = [], copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for stage in layers:
            if mode == "single":
                rand = copy.deepcopy(model)
            reinitialise(rand, stage)
            out.append((stage, model_lib.fused_for_inference(rand)))
    return out


def all_randomized_models(model, seed=0):
    """{mode: randomized_models(model, seed, mode)} for every RANDOMIZATION_MODES."""
    return {mode: randomized_models(model, seed, mode) for mode in RANDOMIZATION_MODES}


def ssim(a, b, window=SSIM_WINDOW):
    """Per-image structural similarity (Wang et al., 2004) of |a| and |b| summed over channels, each
    scaled to [0, 1], with a uniform window: 1 for the same map, about 0 for unrelated ones."""
    def unit(t):
        t = t.abs().sum(1, keepdim=True).double()
        low, high = t.amin((2, 3), keepdim=True), t.amax((2, 3), keepdim=True)
        return (t - low) / (high - low).clamp_min(1e-12)
    x, y = unit(a), unit(b)
    pool = lambda t: torch.nn.functional.avg_pool2d(t, window, 1, window // 2, count_include_pad=False)  # noqa: E731
    mx, my = pool(x), pool(y)
    vx, vy, cov = pool(x * x) - mx ** 2, pool(y * y) - my ** 2, pool(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.mean((1, 2, 3)).float()


# ----------------------------------------------------------------------------- published tests

def smoothed_maps(explainer, model, x, target, generator, samples=SMOOTH_MPRT_SAMPLES, noise=SMOOTH_MPRT_NOISE):
    """sMPRT's maps: the mean over `samples` copies of x with Gaussian noise of `noise` times each
    image's value range, the last copy without noise (as Quantus's SmoothMPRT draws them)."""
    spread = x.amax((1, 2, 3), keepdim=True) - x.amin((1, 2, 3), keepdim=True)
    total = 0
    for i in range(samples):
        eps = torch.randn(x.shape, generator=generator).to(x.device) * noise * spread if i < samples - 1 else 0
        total = total + explainer(model, x + eps, target).cpu()
    return total / samples


def linear_imputation(x, missing, iterations=None):
    """Rong et al.'s linear imputation of the `missing` pixels (B, H, W) of images x (B, C, H, W):
    each missing pixel becomes the weighted mean of its 8 neighbours (1/6 across and down, 1/12
    diagonally, neighbours outside the image left out), solved for all missing pixels at once by
    conjugate gradients on the whole batch. quantus.functions.perturb_func.noisy_linear_imputation
    solves the same system one image at a time with a sparse solver."""
    w = torch.tensor([[1 / 12, 1 / 6, 1 / 12], [1 / 6, 0.0, 1 / 6], [1 / 12, 1 / 6, 1 / 12]], dtype=torch.float64)
    b, c, h, wd = x.shape
    flat = x.double().reshape(b * c, 1, h, wd)
    m = missing.double().to(x.device).repeat_interleave(c, 0)[:, None]
    kernel = w.to(x.device).view(1, 1, 3, 3)

    def neighbours(t):
        return torch.nn.functional.conv2d(t, kernel, padding=1)  # zero padding: outside neighbours drop out
    total = neighbours(torch.ones_like(flat))

    def apply(u):  # the system's matrix on the missing pixels
        return m * (total * u - neighbours(m * u))
    rhs = m * neighbours(flat * (1 - m))
    u = m * rhs / total  # start: the mean of the known neighbours
    r = rhs - apply(u)
    p, rr = r.clone(), (r * r).sum((1, 2, 3), keepdim=True)
    for _ in range(iterations or 4 * max(h, wd)):
        ap = apply(p)
        alpha = rr / (p * ap).sum((1, 2, 3), keepdim=True).clamp_min(1e-300)
        u, r = u + alpha * p, r - alpha * ap
        rr_new = (r * r).sum((1, 2, 3), keepdim=True)
        if float(rr_new.max()) < 1e-20:
            break
        p, rr = r + rr_new / rr.clamp_min(1e-300) * p, rr_new
    return (flat * (1 - m) + m * u).reshape(b, c, h, wd).to(x.dtype)


@torch.no_grad()
def road_curves(model, x, target, attributions, generator, percentages=ROAD_PERCENTAGES, noise=ROAD_NOISE):
    """ROAD (Rong et al., 2022): per image and share of pixels imputed (most relevant first, MoRF,
    and least relevant first, LeRF), whether the model still predicts the explained class.
    Returns {"road_morf": (B, P), "road_lerf": (B, P)} of 0/1, as Quantus's ROAD scores them."""
    b, _, h, w = x.shape
    ranking = attributions.sum(1).flatten(1).argsort(dim=1, descending=True, stable=True)  # channel-summed
    out = {}
    for name, order in (("road_morf", ranking), ("road_lerf", ranking.flip(1))):
        curve = []
        for p in percentages:
            missing = torch.zeros(b, h * w, dtype=torch.bool)
            missing.scatter_(1, order[:, :int(h * w * p / 100)], True)
            missing = missing.view(b, h, w)
            filled = linear_imputation(x, missing)
            jitter = torch.randn(x.shape, generator=generator).to(x.device) * noise
            filled = filled + missing[:, None].to(x.device) * jitter
            curve.append((model(filled).argmax(1) == target).float().cpu())
        out[name] = torch.stack(curve, 1)
    return out


class Refused(Exception):
    """Quantus refused a batch's maps for eMPRT or RandomLogit (its assert_attributions): the maps it
    was given or those it made itself, of another class or of its randomised model."""


def quantus_scores(metric, model, x, target, attributions, explainer):
    """Per-image scores of a Quantus metric (EfficientMPRT, RandomLogit) on channel-summed maps, with
    `explainer` as its explanation function: the tests as their authors' library computes them."""
    def explain(model, inputs, targets, **kwargs):
        inputs = torch.as_tensor(inputs, device=x.device, dtype=x.dtype)
        maps = explainer(model, inputs, torch.as_tensor(targets, device=x.device).long())
        return maps.sum(1, keepdim=True).cpu().numpy()
    try:
        scores = metric(model=model, x_batch=x.cpu().numpy(), y_batch=target.cpu().numpy(),
                        a_batch=attributions.sum(1, keepdim=True).cpu().numpy(), explain_func=explain,
                        device=str(x.device))
    except AssertionError as e:  # how Quantus checks the maps it is given and those it makes
        if "quantus" not in Path(traceback.extract_tb(e.__traceback__)[-1].filename).parts:
            raise  # an assert of another library, not Quantus's check of the maps
        raise Refused(str(e)) from e
    return torch.tensor(np.asarray(scores, dtype=np.float64)).float()


def published_tests(model, x, target, attributions, explainer, fully_randomized, n_classes, generator):
    """sMPRT, eMPRT, RandomLogit and ROAD of `attributions` (B, C, H, W): per image, as tensors.
    `fully_randomized` is the model with every layer re-initialised (bottom-up's last stage)."""
    import quantus  # seconds to import: only where quality is measured
    smooth = rank_correlation(smoothed_maps(explainer, model, x, target, generator),
                              smoothed_maps(explainer, fully_randomized, x, target, generator))
    empirical = quantus_scores(quantus.EfficientMPRT(layer_order="bottom_up", seed=QUANTUS_SEED,
                                                     complexity_func_kwargs={"n_bins": ENTROPY_BINS},
                                                     disable_warnings=True),
                               model, x, target, attributions, explainer)
    other = quantus_scores(quantus.RandomLogit(num_classes=n_classes, seed=QUANTUS_SEED, disable_warnings=True),
                           model, x, target, attributions, explainer)
    road = road_curves(model, x, target, attributions, generator)
    return {"smooth_mprt": smooth, "efficient_mprt": empirical, "random_logit": other,
            **{k: v.mean(1) for k, v in road.items()}}


# ----------------------------------------------------------------------------- controls

def random_map(model, x, target, ig_settings, references=None):
    """Fresh Gaussian noise of x's shape on every call."""
    return torch.randn(x.shape, device=x.device)


def input_only(model, x, target, ig_settings, references=None):
    """|x - baseline|: what IG's (x - baseline) factor stamps into every IG map, whatever the weights."""
    return (x - attr.make_baseline(x, ig_settings["baseline"], model_lib.input_mean(model))).abs()


def edges(model, x, target, ig_settings=None, references=None):
    """A Sobel edge map of the image, spread over the channels. The border is replicated, not
    zero-padded: a frame of edges around every image is not in it."""
    grey = torch.nn.functional.pad(x.mean(1, keepdim=True), (1, 1, 1, 1), mode="replicate")
    kx = torch.tensor([[-1., 0., 1.], [-2., 0., 2.], [-1., 0., 1.]], device=x.device).view(1, 1, 3, 3)
    gx = torch.nn.functional.conv2d(grey, kx)
    gy = torch.nn.functional.conv2d(grey, kx.transpose(2, 3))
    return ((gx ** 2 + gy ** 2).sqrt() / x.shape[1]).expand_as(x).contiguous()


def one_step_ig(model, x, target, ig_settings, references=None):
    """IG with a single integration step, unrefined: complete in principle, but one step cannot add
    up to f(x) - f(baseline) through a ReLU network, so it must fail completeness."""
    return attr.integrated_gradients(model, x, target, ig_settings, n_steps=1,
                                     internal_batch_size=attr.chunk_size(model, x)).attributions


# Maps run through every quality measure beside the methods, each to fail some test (trust.TESTS
# says which): a random map (model-free, new noise each call), the input-only map |x - baseline| and
# a Sobel edge map (both ignore the model), and a one-step IG (claims completeness it cannot reach).
# A sound randomisation test fails the input and edge maps and cannot tell the random map from a
# good method: passing it is necessary, not sufficient (Binder et al., 2023).
CONTROLS = {m.name: m for m in (
    attr.Method("control:random", random_map, "control", "none", False, None, None),
    attr.Method("control:input", input_only, "control", "none", False, "run", None),
    attr.Method("control:edge", edges, "control", "none", False, None, None),
    attr.Method("control:ig_1step", one_step_ig, "control", "exact", False, "run", None))}
SMOOTHGRAD_IG = "smoothgrad_ig"


def is_smoothgrad(name):
    """Whether a scored name is SmoothGrad over IG (smoothgrad_method's names)."""
    return name.startswith(f"{SMOOTHGRAD_IG}:")


def smoothgrad_method(samples, sd):
    """SmoothGrad over IG with `samples` noisy copies of noise s.d. `sd` (evaluate.py --smooth), as a
    Method named with its settings."""
    return attr.Method(f"{SMOOTHGRAD_IG}:n={samples},sd={sd}", attr.smoothgrad_ig(samples, sd), "sampling", "none",
                       False, "run", None)


def record(name):
    """The Method record behind a scored name: an attribution method, a control, or SmoothGrad over
    IG (its settings read back from its name)."""
    if name in attr.METHODS:
        return attr.METHODS[name]
    if name in CONTROLS:
        return CONTROLS[name]
    if is_smoothgrad(name):
        n, sd = (part.split("=")[1] for part in name.split(":", 1)[1].split(","))
        return smoothgrad_method(int(n), float(sd))
    raise KeyError(f"{name!r} is not an attribution method, a control or SmoothGrad over IG")


def scored_methods(names, smooth=0, smooth_sd=0.1):
    """The records the quality pass scores: each attribution method of `names`, SmoothGrad over IG
    with `smooth` samples (none for 0), and every control."""
    return ([attr.METHODS[n] for n in names] + ([smoothgrad_method(smooth, smooth_sd)] if smooth else [])
            + list(CONTROLS.values()))


def gaussian_perturbation(inputs):
    """Captum's perturb_func for infidelity: the noise I and the perturbed inputs x - I."""
    noise = torch.randn_like(inputs) * INFIDELITY_NOISE
    return noise, inputs - noise


def infidelity_images(model, x):
    """Images per infidelity call: each forwards INFIDELITY_SAMPLES copies of every image at once (with
    their noise and the noisy inputs alive), so on the CPU as many as make attribution.CPU_CHUNK rows
    within budget.WORK_BYTES, never below one image; on a GPU all of them."""
    if budget.on_gpu(x.device):
        return len(x)
    return max(1, budget.forward_batch(model, x.shape[1:], attr.CPU_CHUNK, copies=2) // INFIDELITY_SAMPLES)


def infidelity_in_runs(forward, x, attributions, target, per_call):
    """Captum's normalised infidelity of x, called on consecutive runs of `per_call` images.

    On the CPU the same values as one call over x: Captum repeats each image's copies next to each
    other and draws their noise in that order, and torch's CPU randn pairs values only within blocks
    of 16 (every run holds a multiple of 16 copies), so consecutive runs draw the same noise. On a GPU
    each call would start its own random offset, so infidelity_images makes it one call there.
    Captum's own max_examples_per_batch would split the copies instead, drawing another noise order."""
    return torch.cat([infidelity(forward, gaussian_perturbation, x[i:i + per_call], attributions[i:i + per_call],
                                 target=target[i:i + per_call], n_perturb_samples=INFIDELITY_SAMPLES,
                                 normalize=True)
                      for i in range(0, len(x), per_call)])


def quality_measures(model, x, target, attributions, explainer, ig_settings, stages, masks=None):
    """Faithfulness and sanity measures of `attributions` (B, C, H, W) for images x, per image.

    `model` is the (BN-folded) model explained; `explainer` (attribution.explainer's) recomputes maps
    for the randomised models in `stages` ({mode: [(layer, model)]}, all_randomized_models) and for
    Captum's sensitivity_max. "randomization_stages" is (B, stages) of the top-down |map| Spearman;
    "randomization" holds, per image, every mode's {layer: {"spearman", "signed", "ssim"}}, layers
    named by model.layer_label.
    """
    with attr.seeded(MEASURES_SEED):  # random orders and metric noise: the same on every rerun
        gen = torch.Generator().manual_seed(MEASURES_SEED)
        base = attr.make_baseline(x, ig_settings["baseline"], model_lib.input_mean(model))
        order, random_order = pixel_order(attributions), pixel_order(attributions, gen)
        curves = {f"{kind}_curve{suffix}": perturbation_curves(model, x, base, o, target, kind == "insertion")
                  for kind in ("deletion", "insertion")
                  for suffix, o in (("", order), ("_random", random_order))}

        infid = infidelity_in_runs(attr.forward_for(model, ig_settings["attribute"]), x, attributions.to(x.device),
                                   target, infidelity_images(model, x))
        def explanation(inputs, target):  # Captum passes and expects 1-tuples
            return (explainer(model, inputs[0] if isinstance(inputs, tuple) else inputs, target),)
        sens = sensitivity_max(explanation, x, target=target, perturb_radius=SENSITIVITY_RADIUS,
                               n_perturb_samples=SENSITIVITY_COPIES)
        # stages named as figures, metrics.json and the store all name them (model.layer_label)
        randomized = {mode: [(model_lib.layer_label(name), explainer(m, x, target).cpu()) for name, m in models]
                      for mode, models in stages.items()}
        published = (published_tests(model, x, target, attributions, explainer, stages["bottom_up"][-1][1],
                                     model.config["n_classes"], gen) if "bottom_up" in stages else {})
    per_mode = {mode: {name: {"spearman": rank_correlation(attributions, a),
                              "signed": rank_correlation(attributions, a, absolute=False),
                              "ssim": ssim(attributions, a)} for name, a in maps}
                for mode, maps in randomized.items()}
    top_down = randomized["top_down"]
    by_stage = torch.stack([per_mode["top_down"][name]["spearman"] for name, _ in top_down], 1)
    out = {**curves, **published, "infidelity": infid.cpu(), "sensitivity_max": sens.cpu(),
           "randomization_stages": by_stage, "randomization_spearman": by_stage[:, -1],
           "randomization_spearman_signed": per_mode["top_down"][top_down[-1][0]]["signed"],
           # IG multiplies by (x - baseline), so maps from any weights share this much ranking with it
           "randomization_input_spearman": rank_correlation(attributions, (x - base).cpu()),
           "randomization": [{mode: {name: {k: round(float(v[i]), 6) for k, v in m.items()}
                                     for name, m in stages_.items()}
                              for mode, stages_ in per_mode.items()} for i in range(len(x))]}
    for name, curve in curves.items():
        out[name.replace("_curve", "_auc")] = curve_auc(curve)
    if masks is not None:
        out["mask_mass"], out["mask_area"] = (t.cpu() for t in mask_share(attributions, masks))
    return out


# ----------------------------------------------------------------------------- the pass over a run

QUALITY_BATCH = 50  # images per quality transaction (sensitivity_max expands each 4x)
SENSITIVITY_COPIES = 4  # sensitivity_max's perturbed copies of each image, explained at once
# Means of stored columns; the randomisation stages' numbers come from randomization_summary instead
SUMMARY_KEYS = ("deletion_auc", "deletion_auc_random", "insertion_auc", "insertion_auc_random",
                "infidelity", "sensitivity_max", "randomization_input_spearman", "mask_mass", "mask_area",
                "smooth_mprt", "efficient_mprt", "random_logit", "road_morf", "road_lerf")


@dataclass(frozen=True)
class Scoring:
    """What the quality pass scores with: the BN-folded model explained and its randomised copies
    (all_randomized_models), the split the images come from, the IG settings, the record of every
    scored name (scored_methods) and their explainers, the training references of the methods that
    need them, and the device."""
    model: torch.nn.Module
    stages: dict
    split: object
    ig_settings: dict
    records: dict  # {name: attribution.Method}
    explainers: dict  # {name: (model, x, target) -> map}, attribution.explainer's
    references: torch.Tensor | None
    device: torch.device


def scoring(model, stages, split, ig_settings, records, references=None):
    """A Scoring of `records` (scored_methods') on the model's device, their explainers made once."""
    return Scoring(model, stages, split, ig_settings, {m.name: m for m in records},
                   {m.name: attr.explainer(m, ig_settings, references) for m in records}, references,
                   next(model.parameters()).device)


def quality_block(model, split, device):
    """Images per quality batch: QUALITY_BATCH, fewer where sensitivity_max's copies of that many
    images, each explained with gradients, would not fit budget.WORK_BYTES (128 px and up on a CPU)."""
    return budget.grad_images(model, split.images.shape[1:], QUALITY_BATCH, rows=SENSITIVITY_COPIES, device=device)


def quality_into_db(scoring, indices, conn, run_id):
    """Quality measures for the stored explanations of `indices` that have none yet, per scored
    method, a batch per transaction. A method with maps stored for the run (evaluate.py --methods)
    is scored on those maps; the others (SmoothGrad over IG, the controls) are computed here."""
    stored_methods = set(db.explanation_methods(conn, run_id))
    block = quality_block(scoring.model, scoring.split, scoring.device)
    for method in scoring.explainers:
        done = db.done_quality(conn, run_id, "test", method)
        todo = [i for i in indices if i not in done]
        if not todo:
            continue
        with progress(total=len(todo), unit="img", desc=f"quality {method}") as bar:  # closed on errors too
            for start in range(0, len(todo), block):
                rows = db.find(conn, run_id, image_indices=todo[start:start + block], with_arrays=True)
                maps = None
                if method in stored_methods:
                    maps = attr.stored_attributions(db.find(conn, run_id, image_indices=[r["image_index"] for r
                                                                                                  in rows],
                                                            with_arrays=True, method=method))
                db.insert_quality(conn, quality_rows(scoring, method, rows, maps, run_id, todo[start]))
                bar.update(len(rows))


def quality_rows(scoring, method, rows, maps, run_id, seed):
    """The quality rows of one batch: `rows` are the stored IG rows of its images (their targets),
    `maps` the method's stored maps, or None to compute them (seeded by `seed`, the batch's first
    image, so the random-map control draws the same on every rerun and shard)."""
    idx = torch.tensor([r["image_index"] for r in rows])
    x = to_unit(scoring.split.images[idx].to(scoring.device))
    target = torch.tensor([r["target"] for r in rows], device=scoring.device)
    explainer = scoring.explainers[method]
    if maps is None:
        with attr.seeded(seed):
            maps = explainer(scoring.model, x, target).cpu()
    masks = None if scoring.split.masks is None else scoring.split.masks[idx]
    try:
        q = quality_measures(scoring.model, x, target, maps, explainer, scoring.ig_settings, scoring.stages, masks)
    except Refused as e:
        raise cli.UserError(refusal_message(method, idx.tolist(), e)) from e
    gap = completeness_gap(scoring, scoring.records[method], x, target, rows)
    q["relative_error"] = attr.relative_completeness_error(maps.sum((1, 2, 3)) - gap, gap)
    by_stage, detail = q.pop("randomization_stages"), q.pop("randomization")
    stage_names = [model_lib.layer_label(name) for name, _ in scoring.stages["top_down"]]
    return [{"run_id": run_id, "split": "test", "image_index": int(i), "method": method,
             **{k: v[j].tolist() for k, v in q.items()},
             "randomization_stages": dict(zip(stage_names, by_stage[j].tolist(), strict=True)),
             "randomization": detail[j]}
            for j, i in enumerate(idx.tolist())]


def refusal_message(method, indices, reason):
    """The paragraph for a batch whose maps Quantus refused: which method and images, why, what to do."""
    shown = ", ".join(map(str, indices[:5])) + (f" and {len(indices) - 5} more" if len(indices) > 5 else "")
    if is_smoothgrad(method):
        drop = ", evaluate without --smooth"
    elif method in attr.METHODS and method != "ig":  # ig is always explained; a control always scored
        drop = f", leave {method} out of --methods"
    else:
        drop = ""
    return (f"The quality pass cannot score {method} on test images {shown}: Quantus refused the maps of this "
            f"batch for eMPRT or RandomLogit ({str(reason).rstrip('.')}). It refuses a batch of maps that are "
            f"all negative or one value throughout, its own maps of another class or of its randomised model "
            f"included; a small batch (a --quality of 1 or 2, or a pass's last batch) and a model that has "
            f"barely learned meet that most. "
            f"Score more images a batch (--quality; up to {QUALITY_BATCH} a batch, the last with what is left)"
            f"{drop}, or evaluate with --quality 0. The quality rows stored before this batch are kept.")


def completeness_gap(scoring, method, x, target, rows):
    """f(x) - f(reference), what a complete method's map adds up to: the method's own output and
    reference (attribution.reference_score); for a method that is not complete, stored IG's (its
    relative_error is stored, never reported)."""
    if method.complete == "none":
        return torch.tensor([r["score"] - r["baseline_score"] for r in rows])
    forward = attr.forward_for(scoring.model, method.own_ig_settings(scoring.ig_settings)["attribute"])
    with torch.no_grad():
        score = forward(x)[torch.arange(len(x), device=x.device), target]
    return (score - attr.reference_score(method, scoring.model, x, target, scoring.ig_settings,
                                         scoring.references)).cpu()


def completeness_summary(conn, run_id, split, tolerance):
    """Completeness of every stored IG map of the run (not only the scored ones): how many, their mean
    |delta|, mean relative completeness error, and the share within `tolerance` (the IG settings')."""
    rows = db.find(conn, run_id, split=split)
    if not rows:
        return {}
    delta = np.array([r["delta"] for r in rows])
    rel = attr.relative_completeness_error(delta, np.array([r["score"] - r["baseline_score"] for r in rows]))
    return {"completeness_images": len(rows), "mean_abs_delta": float(np.abs(delta).mean()),
            "mean_relative_error": float(rel.mean()), "completeness_share": float((rel <= tolerance).mean())}


def quality_summary(conn, run_id, method, tolerance):
    """Means over every stored quality row of the run for `method` (randomisation stages by their
    stored names, model.layer_label's), with the spread over images of the eMPRT rise (trust.py's
    margin). Completeness only for complete methods (their record's `complete`), within
    `tolerance` (the IG settings')."""
    rows = db.quality_rows(conn, run_id, "test", method)
    # The stored IG's completeness is over all its stored maps (each carries its delta), once
    complete = completeness_summary(conn, run_id, "test", tolerance) if method == "ig" else {}
    if not rows:
        return {"images": 0, **complete}

    def mean(key):
        values = [r[key] for r in rows if r[key] is not None]
        return float(np.mean(values)) if values else None
    summary = {"images": len(rows), **{k: mean(k) for k in SUMMARY_KEYS}}
    emprt = [r["efficient_mprt"] for r in rows if r["efficient_mprt"] is not None]
    summary["efficient_mprt_sd"] = float(np.std(emprt)) if emprt else None
    if method == "ig":
        summary.update(complete)
    elif record(method).complete != "none":  # over the scored images: these maps carry no delta
        summary.update(completeness_images=len(rows), mean_relative_error=mean("relative_error"),
                       completeness_share=float(np.mean([r["relative_error"] <= tolerance for r in rows])))
    return {**summary, **randomization_summary(rows)}


def randomization_summary(rows):
    """The randomisation part of a quality summary: per mode and stage the mean of each measure
    ("randomization_modes"; rows stored before schema v5 have the top-down Spearman only), and the
    trust table's headline numbers, each the value of one stage there, not a second mean."""
    detailed = [r["randomization"] for r in rows if r["randomization"]]
    if len(detailed) == len(rows):  # every mode, every measure
        modes = {mode: {stage: {k: float(np.mean([d[mode][stage][k] for d in detailed])) for k in measures}
                        for stage, measures in by_stage.items()}
                 for mode, by_stage in detailed[0].items()}
    else:
        modes = {"top_down": {stage: {"spearman": float(np.mean([r["randomization_stages"][stage] for r in rows]))}
                              for stage in rows[0]["randomization_stages"]}}
    fully = list(modes["top_down"].values())[-1]
    out = {"randomization_modes": modes, "randomization_spearman": fully["spearman"]}
    if "ssim" in fully:
        out["randomization_ssim"] = fully["ssim"]
    if "bottom_up" in modes:
        out["randomization_bottom_up_spearman"] = list(modes["bottom_up"].values())[-1]["spearman"]
    if "single" in modes:
        out["randomization_single_min_spearman"] = min(v["spearman"] for v in modes["single"].values())
    return out


def quality_figures(conn, run_id, scoring, indices, figures, tag, table=None, first=None):
    """<figures>/faithfulness.png (mean curves per method over `indices`; controls left out) and
    <figures>/sanity_randomization.png (the first of them: every method's map, and the input-only
    control's, as the layers are re-initialised first layer first, MPRT's order; with `table`, the
    trust table, each row says its method's MPRT verdict). `first` (the recommended method) leads."""
    names = sorted(scoring.explainers, key=lambda m: m != first)
    curves = {}
    for method in (m for m in names if scoring.records[m].family != "control"):
        rows = db.quality_rows(conn, run_id, "test", method, indices)
        curves[method] = {c: np.stack([r[c] for r in rows]) for c in db.QUALITY_CURVES}
        for c in db.QUALITY_CURVES:
            auc = c.replace("_curve", "_auc")
            curves[method][auc] = float(np.mean([r[auc] for r in rows]))
    plots.plot_faithfulness(curves, Path(figures) / "faithfulness.png",
                            f"Deletion and insertion, {len(indices)} test images of {tag}; pixels set to the "
                            f"IG baseline ({scoring.ig_settings['baseline']})")
    row = db.find(conn, run_id, image_indices=indices[:1], with_arrays=True)[0]
    x = to_unit(scoring.split.images[row["image_index"]][None]).to(scoring.device)
    target = torch.tensor([row["target"]], device=x.device)
    stored = set(db.explanation_methods(conn, run_id))
    figure_rows = []
    for method in names:
        if scoring.records[method].family == "control" and method != "control:input":
            continue
        explainer = scoring.explainers[method]
        trained = (attr.stored_attributions(db.find(conn, run_id, image_indices=[row["image_index"]],
                                                    with_arrays=True, method=method))[0]
                   if method in stored else explainer(scoring.model, x, target)[0].cpu())
        maps = [("trained |map|", trained)] + [(f"randomised up to\n{model_lib.layer_label(name)}",
                                                 explainer(m, x, target)[0].cpu())
                                                for name, m in scoring.stages["bottom_up"]]
        rho = [float(rank_correlation(trained[None], m[None])) for _, m in maps[1:]]
        test = (table or {}).get(method, {}).get("mprt")
        verdict = (f": MPRT {'passed' if test['pass'] else 'failed'} ({formats.measure(test['value'])}, "
                   f"threshold {formats.measure(test['threshold'])})" if test else "")
        figure_rows.append((method + verdict, maps, rho))
    plots.plot_randomization_rows(x[0].cpu(), figure_rows, Path(figures) / "sanity_randomization.png",
                                  f"Model randomisation, first layer first (MPRT), test image {row['image_index']} "
                                  f"of {tag}. Spearman: rank correlation of |map| with the trained map; the "
                                  f"verdict is over every quality image (docs/DESIGN.md, explanation quality)")
