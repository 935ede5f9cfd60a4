"""attribution.py: the attribution methods (Integrated Gradients and five others, all Captum's).

    probs, targets, result = attribution.explain_batch(model, images_u8, labels, settings)  # refined IG
    maps = attribution.method_fn("gradcam", settings)(model, x, targets)                    # any method

IG integrates the gradient of the explained class's output along the straight path from a baseline
to the image. The default baseline is the training split's mean colour, a flat image: for H&E, a
black baseline gives dark haematoxylin-stained nuclei almost no attribution (they are close to it)
and a white one does the same to glass and fat, while the mean stain colour penalises neither and
carries no structure. The delta (Captum's convergence delta) is the completeness error:
sum(attributions) - (f(image) - f(baseline)); images whose delta is too large get more steps
(refined_integrated_gradients). METHODS is the table of every method by name.

The settings dict (ig_settings) holds n_steps, max_steps, tolerance, rule (IG's integration rule),
baseline, attribute (the logit or the probability) and target; it also identifies a run in the store.
How far to trust the maps is quality.py's job; what the model guarantees to explainers is model.py's.
"""
import argparse
import contextlib
import functools
from dataclasses import dataclass, fields

import numpy as np
import torch
from captum.attr import (
    GradientShap,
    IntegratedGradients,
    LayerAttribution,
    LayerGradCam,
    NoiseTunnel,
    Occlusion,
    Saliency,
)

import budget
import cli
import model as model_lib
from colour import to_unit

BASELINES = ("mean", "black", "white", "blur", "noise")
IG_RULES = ("gausslegendre", "riemann_trapezoid", "riemann_middle", "riemann_left", "riemann_right")
OUTPUTS = ("logit", "prob")
# Steps are chosen per image by the measured completeness error: every image starts with 8
# Gauss-Legendre steps, and those whose |delta| exceeds `tolerance` of |f(x) - f(baseline)| are
# recomputed with twice the steps, up to `max_steps` (see docs/DESIGN.md for the measurements).
DEFAULT_IG = {"n_steps": 8, "max_steps": 64, "tolerance": 0.05, "rule": "gausslegendre",
              "baseline": "mean", "target": "pred", "attribute": "logit"}
# On CPU, IG's scaled images go through the model ~256 at a time: small enough to stay in cache,
# large enough to batch well (measured: 520 vs 424 attributions/s for 32 images x 16 steps at once).
CPU_CHUNK = 256
SMOOTHGRAD_SAMPLES, SMOOTHGRAD_SD = 16, 0.1  # smoothgrad_sq: noisy copies, noise s.d. in [0, 1] pixel units
TINY = 1e-12  # floor for |f(x) - f(baseline)| in the relative completeness error
NOISE_SEED = 0  # the uniform-noise baseline
EG_SAMPLES, EG_REFERENCES = 32, 64  # expected gradients: samples per image, training images to draw from


class ExplainError(cli.UserError):
    """An input we cannot explain (unreadable image, unknown class)."""


def relative_completeness_error(delta, gap):
    """|delta| / |f(x) - f(baseline)|: IG's completeness error as a share of what it must explain.

    delta and gap may be numpy arrays, torch tensors or floats (all have abs and clip); this is the
    one definition, used by IG's refinement, quality.py, bench.py and the store's summary."""
    return abs(delta) / abs(gap).clip(min=TINY)


def chunk_size(model, x, copies=1):
    """Captum's internal_batch_size for x: CPU_CHUNK rows on CPU where they fit budget.WORK_BYTES,
    else as many as fit (never below the number of examples, which Captum refuses); everything at
    once on a GPU."""
    if budget.on_gpu(x.device):
        return None
    rows = max(CPU_CHUNK, len(x) * copies)
    if rows * budget.grad_row_bytes(model, x.shape[1:]) <= budget.WORK_BYTES:
        return rows
    return budget.grad_rows(model, x, at_least=len(x) * copies)


@dataclass
class IGResult:
    attributions: torch.Tensor   # (B, C, H, W) float32
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
        return relative_completeness_error(self.delta, self.score - self.baseline_score)

    def stored(self, attr_dtype):
        """The per-image arrays db.explanation_rows takes, attributions in the storage dtype.

        The float16 conversion happens in torch: numpy converts the tiny values IG produces (float16
        subnormals) in slow software, 35x slower, to the same bits."""
        return {"attributions": self.attributions.to(getattr(torch, attr_dtype)).numpy(),
                "delta": self.delta.numpy(), "score": self.score.numpy(),
                "baseline_score": self.baseline_score.numpy(), "n_steps": self.n_steps.numpy()}


@contextlib.contextmanager
def input_gradients_only(model):
    """During attribution only the input needs a gradient; parameter gradients would be wasted work."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
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
        from torchvision.transforms.functional import gaussian_blur  # torchvision loads slowly
        sigma = x.shape[-1] / 7  # removes structure at 28 px, keeps the overall stain colour
        return gaussian_blur(x, kernel_size=2 * int(3 * sigma) + 1, sigma=sigma)
    if kind == "noise":  # uniform noise, the same for every call of this shape (completeness is checkable)
        return torch.rand(x.shape, generator=torch.Generator().manual_seed(NOISE_SEED)).to(x.device, x.dtype)
    raise ValueError(f"unknown baseline {kind!r}; choose from {BASELINES}")


@contextlib.contextmanager
def seeded(seed):
    """torch's and numpy's global random state set to `seed` inside, and restored after: Captum's
    noisy methods draw from both (SmoothGrad, GradientShap), and a rerun or another shard must draw
    the same."""
    state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            np.random.set_state(state)


def forward_for(model, attribute):
    """The function the maps explain: the model's logits, or its probabilities (model.probabilities:
    softmax, or a sigmoid per label for a multi-label model)."""
    if attribute == "prob":
        return lambda x: model_lib.probabilities(model, model(x))
    return model


# ----------------------------------------------------------------------------- Integrated Gradients

def integrated_gradients(model, x, target, baseline="mean", n_steps=8, rule="gausslegendre",
                         attribute="logit", internal_batch_size=None, logits=None):
    """IG for a batch of [0, 1] images `x` and class indices `target`, with completeness terms.

    The delta is the quantity Captum's compute_convergence_delta returns, sum(attr) - (f(x) -
    f(baseline)), computed here so that f(x) comes from `logits` when the caller already has them
    instead of from two more forward passes.
    """
    model.eval()
    forward = forward_for(model, attribute)
    base = make_baseline(x, baseline, model_lib.input_mean(model))
    with input_gradients_only(model):
        attr = IntegratedGradients(forward).attribute(
            x, baselines=base, target=target, n_steps=n_steps, method=rule,
            internal_batch_size=internal_batch_size)
    with torch.no_grad():
        rows = torch.arange(len(x), device=x.device)
        at_x = forward(x) if logits is None else (
            model_lib.probabilities(model, logits) if attribute == "prob" else logits)
        score, baseline_score = at_x[rows, target], forward(base)[rows, target]
        delta = attr.sum(dim=(1, 2, 3), dtype=torch.float64) - (score - baseline_score).double()
    steps = torch.full((len(x),), n_steps, dtype=torch.long)
    return IGResult(attr.detach(), delta.float(), score, baseline_score, steps)


def fixed_ig(model, x, target, settings, n_steps=None, logits=None, internal_batch_size=None):
    """integrated_gradients with the settings' baseline, rule and output, at settings["n_steps"]."""
    return integrated_gradients(model, x, target, baseline=settings["baseline"],
                                n_steps=n_steps or settings["n_steps"], rule=settings["rule"],
                                attribute=settings["attribute"], logits=logits,
                                internal_batch_size=internal_batch_size)


def refined_integrated_gradients(model, x, target, settings, logits=None, internal_batch_size=None):
    """IG at settings["n_steps"]; images whose relative completeness error exceeds
    settings["tolerance"] are recomputed with twice the steps, until settings["max_steps"].

    Gauss-Legendre nodes are not nested, so a refined image is integrated afresh; few need it.
    """
    def run(rows, n):
        return fixed_ig(model, x[rows], target[rows], settings, n, None if logits is None else logits[rows],
                        internal_batch_size)
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


def smoothgrad_ig(model, x, target, settings, samples, stdev):
    """SmoothGrad over IG (Captum's NoiseTunnel): the mean IG map of `samples` noisy copies of x."""
    with input_gradients_only(model):
        return NoiseTunnel(IntegratedGradients(forward_for(model, settings["attribute"]))).attribute(
            x, nt_type="smoothgrad", nt_samples=samples, stdevs=stdev,
            baselines=make_baseline(x, settings["baseline"], model_lib.input_mean(model)),
            target=target, n_steps=settings["n_steps"], method=settings["rule"],
            internal_batch_size=chunk_size(model, x, samples)).detach()


# ----------------------------------------------------------------------------- every method

def ig(model, x, target, settings):
    """IG at the settings' fixed step count (evaluate.py stores the refined IG instead)."""
    return fixed_ig(model, x, target, settings, internal_batch_size=chunk_size(model, x)).attributions


def ig_local(model, x, target, settings):
    """IG without the (x - baseline) factor (Captum's multiply_by_inputs=False): the path average of
    the gradient."""
    base = make_baseline(x, settings["baseline"], model_lib.input_mean(model))
    return IntegratedGradients(forward_for(model, settings["attribute"]), multiply_by_inputs=False).attribute(
        x, baselines=base, target=target, n_steps=settings["n_steps"], method=settings["rule"],
        internal_batch_size=chunk_size(model, x))


def saliency(model, x, target, settings):
    """|input gradient| (Simonyan et al., 2014; Captum's default). An input that requires grad
    spares Captum's warning."""
    return Saliency(forward_for(model, settings["attribute"])).attribute(x.detach().requires_grad_(), target=target)


def smoothgrad_sq(model, x, target, settings):
    """SmoothGrad-Squared of the gradient (Captum's NoiseTunnel)."""
    return NoiseTunnel(Saliency(forward_for(model, settings["attribute"]))).attribute(
        x, nt_type="smoothgrad_sq", nt_samples=SMOOTHGRAD_SAMPLES, stdevs=SMOOTHGRAD_SD,
        nt_samples_batch_size=SMOOTHGRAD_SAMPLES, target=target, abs=False)


def gradcam(model, x, target, settings):
    """LayerGradCam on model.gradcam_layer, upsampled bilinearly and spread evenly over the channels."""
    cam = LayerGradCam(forward_for(model, settings["attribute"]), model_lib.gradcam_layer(model)).attribute(
        x, target=target)
    cam = LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), "bilinear")
    return cam.expand_as(x) / x.shape[1]


def occlusion_window(size):
    """(window, stride) in pixels for occlusion: 4 and 2 at 28 px, growing with the image."""
    return max(2, round(size / 7)), max(1, round(size / 14))


def occlusion(model, x, target, settings):
    """The drop in the output when a window (occlusion_window) is set to the IG baseline."""
    base = make_baseline(x, settings["baseline"], model_lib.input_mean(model))
    window, stride = occlusion_window(x.shape[-1])
    return Occlusion(forward_for(model, settings["attribute"])).attribute(
        x, sliding_window_shapes=(x.shape[1], window, window), strides=(x.shape[1], stride, stride),
        baselines=base, target=target, perturbations_per_eval=16)


def expected_gradients(model, x, target, settings, references):
    """Expected Gradients (Erion et al., 2021): Captum's GradientShap with `references`, a sample of
    training images, as the distribution of baselines: for each of EG_SAMPLES draws, a random
    reference and a random point on the path to x; complete in expectation, f(x) - E f(reference)."""
    return GradientShap(forward_for(model, settings["attribute"])).attribute(
        x, baselines=references.to(x.device, x.dtype), n_samples=EG_SAMPLES, stdevs=0.0, target=target)


# IG with another reference or output, measured against the same tests as every method (the stored
# "ig" keeps the training mean colour and the logit): each is IG refined like the stored one (to the
# settings' tolerance, up to their max_steps), with these settings replaced.
IG_VARIANTS = {"ig_black": {"baseline": "black"}, "ig_blur": {"baseline": "blur"},
               "ig_noise": {"baseline": "noise"}, "ig_prob": {"attribute": "prob"}}


def ig_variant(changes):
    def variant(model, x, target, settings):
        return refined_integrated_gradients(model, x, target, {**settings, **changes},
                                            internal_batch_size=chunk_size(model, x)).attributions
    return variant


# Every method evaluate.py and explain.py offer (--methods), by name; "ig" first (the stored,
# completeness-checked IG; the others reuse its predictions). Each is (model, x, target, settings)
# -> a map of x's shape; expected_gradients also takes references (training images).
METHODS = {"ig": ig, **{name: ig_variant(changes) for name, changes in IG_VARIANTS.items()},
           "expected_gradients": expected_gradients, "ig_local": ig_local, "saliency": saliency,
           "smoothgrad_sq": smoothgrad_sq, "gradcam": gradcam, "occlusion": occlusion}
ATTRIBUTION_METHODS = tuple(METHODS)
# evaluate.py's default: the flagship IG, and a method of each other kind that the tests may find
# better (docs/DESIGN.md); --methods all adds the IG variants and the rest.
DEFAULT_METHODS = "ig,expected_gradients,saliency,gradcam"
# Methods whose maps add up to f(x) - f(reference): their completeness is measured (quality.py). IG
# and its variants are complete for every image, so completeness is one of their tests (trust.py);
# expected gradients only in expectation over its sampled references, so its error is reported.
COMPLETE_METHODS = ("ig", *IG_VARIANTS, "expected_gradients")
EXACTLY_COMPLETE = ("ig", *IG_VARIANTS)


def method_settings(name, settings):
    """The settings a method explains with: an IG variant's changes applied."""
    return {**settings, **IG_VARIANTS.get(name, {})}


def method_fn(name, settings, references=None):
    """(model, x, target) -> float32 attributions of x's shape, for one of METHODS; `references`
    (training images) for expected_gradients."""
    if name not in METHODS:
        raise ValueError(f"unknown attribution method {name!r}; choose from {ATTRIBUTION_METHODS}")
    if name == "expected_gradients" and references is None:
        raise ExplainError("expected_gradients draws its baselines from the training images, and none were "
                           "given: run it through evaluate.py, or give explain.py the --data-dir of the "
                           "model's dataset.")
    method = METHODS[name]
    if name == "expected_gradients":
        method = functools.partial(method, references=references)

    def attribute(model, x, target):
        if name == "ig" or name in IG_VARIANTS:  # IG manages its own gradients
            return method(model, x, target, settings)
        with input_gradients_only(model):
            return method(model, x, target, settings).detach().float().contiguous()
    return attribute


def reference_sample(train_images, n=EG_REFERENCES, seed=0):
    """The training images expected_gradients draws its baselines from: a fixed random sample, as
    [0, 1] floats."""
    order = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(seed))[:n]
    return to_unit(train_images[order.sort().values])


def reference_score(name, model, x, target, settings, references=None):
    """f(reference) for each image, what a complete method's map must add up to with f(x): the IG
    variant's baseline, or for expected_gradients the mean over the references."""
    settings = method_settings(name, settings)
    forward = forward_for(model, settings["attribute"])
    with torch.no_grad():
        if name == "expected_gradients":
            return forward(references.to(x.device, x.dtype))[:, target].mean(0)
        base = make_baseline(x, settings["baseline"], model_lib.input_mean(model))
        return forward(base)[torch.arange(len(x), device=x.device), target]


def smoothgrad_ig_fn(settings, samples, stdev):
    """(model, x, target) -> SmoothGrad over IG with `samples` copies of noise s.d. `stdev`."""
    return functools.partial(smoothgrad_ig, settings=settings, samples=samples, stdev=stdev)


def methods_arg(text):
    """argparse type for --methods: 'all' or a comma-separated list of METHODS; 'ig' always comes
    first (the other methods reuse its predictions)."""
    names = list(ATTRIBUTION_METHODS) if text == "all" else [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in ATTRIBUTION_METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{', '.join(unknown) or repr(text)} is not an attribution "
                                         f"method; choose from {', '.join(ATTRIBUTION_METHODS)}, or all")
    return ["ig"] + [m for m in ATTRIBUTION_METHODS[1:] if m in names]


def stored_attributions(rows):
    """The attributions of stored explanation rows (read with arrays) as one float32 (N, C, H, W) tensor."""
    return torch.from_numpy(np.stack([r["attribution"] for r in rows]).astype(np.float32))


# ----------------------------------------------------------------------------- targets and settings

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


def ig_settings(args, class_names, labels_known=True, multi_label=False):
    """The IG settings dict from parsed flags (cli.add_ig_arguments); they also identify a run in the DB."""
    if args.max_steps < args.n_steps:
        raise ExplainError(f"--max-steps {args.max_steps} is below --n-steps {args.n_steps}.")
    return {"n_steps": args.n_steps, "max_steps": args.max_steps, "tolerance": args.tolerance,
            "rule": args.ig_rule, "baseline": args.baseline, "attribute": args.attribute,
            "target": resolve_target(args.target, class_names, labels_known, multi_label)}


def explain_batch(model, images_u8, labels, settings, device="cpu"):
    """Predictions and refined IG for uint8 images: (probs, targets, IGResult), all on the CPU."""
    x = to_unit(images_u8.to(device))
    with torch.no_grad():
        logits = model(x)
    targets = target_indices(settings["target"], logits,
                             None if labels is None else labels.to(device))
    result = refined_integrated_gradients(model, x, targets, settings, logits=logits,
                                          internal_batch_size=chunk_size(model, x))
    return model_lib.probabilities(model, logits).cpu(), targets.cpu(), result.cpu()
