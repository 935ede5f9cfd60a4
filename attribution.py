"""attribution.py: the attribution methods (Integrated Gradients, its variants and five others, all
Captum's), each one record that carries its traits.

    probs, targets, result = attribution.explain_batch(model, images_u8, labels, ig_settings)  # refined IG
    maps = attribution.explainer("gradcam", ig_settings)(model, x, targets)                   # any method
    attribution.METHODS["expected_gradients"].needs_references                                # its traits

IG integrates the gradient of the explained class's output along the straight path from a baseline
to the image. The default baseline is the training split's mean colour, a flat image: for H&E, a
black baseline gives dark haematoxylin-stained nuclei almost no attribution (they are close to it)
and a white one does the same to glass and fat, while the mean stain colour penalises neither and
carries no structure. The delta (Captum's convergence delta) is the completeness error:
sum(attributions) - (f(image) - f(baseline)); images whose delta is too large get more steps
(refined_integrated_gradients).

METHODS holds one Method record per method: its function and the traits the other modules read
(whether its maps add up to f(x) - f(reference), whether it needs training images, which baseline
and output it explains). Adding a method is one entry there. The IG settings dict (ig_settings)
holds n_steps, max_steps, tolerance, rule (IG's integration rule), baseline, attribute (what the
maps explain: the logit or the probability) and target; it also identifies a run in the store.
How far to trust the maps is quality.py's job; what the model guarantees to explainers is model.py's.
"""
import argparse
import contextlib
from collections.abc import Callable
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

def integrated_gradients(model, x, target, ig_settings, n_steps=None, logits=None, internal_batch_size=None):
    """IG for a batch of [0, 1] images `x` and class indices `target`, with completeness terms, with
    the settings' baseline, rule and output, at `n_steps` (default: the settings' n_steps).

    The delta is the quantity Captum's compute_convergence_delta returns, sum(attr) - (f(x) -
    f(baseline)), computed here so that f(x) comes from `logits` when the caller already has them
    instead of from two more forward passes.
    """
    model.eval()
    n_steps = n_steps or ig_settings["n_steps"]
    forward = forward_for(model, ig_settings["attribute"])
    base = make_baseline(x, ig_settings["baseline"], model_lib.input_mean(model))
    with input_gradients_only(model):
        attr = IntegratedGradients(forward).attribute(
            x, baselines=base, target=target, n_steps=n_steps, method=ig_settings["rule"],
            internal_batch_size=internal_batch_size)
    with torch.no_grad():
        rows = torch.arange(len(x), device=x.device)
        at_x = forward(x) if logits is None else (
            model_lib.probabilities(model, logits) if ig_settings["attribute"] == "prob" else logits)
        score, baseline_score = at_x[rows, target], forward(base)[rows, target]
        delta = attr.sum(dim=(1, 2, 3), dtype=torch.float64) - (score - baseline_score).double()
    steps = torch.full((len(x),), n_steps, dtype=torch.long)
    return IGResult(attr.detach(), delta.float(), score, baseline_score, steps)


def refined_integrated_gradients(model, x, target, ig_settings, logits=None, internal_batch_size=None):
    """IG at ig_settings["n_steps"]; images whose relative completeness error exceeds
    ig_settings["tolerance"] are recomputed with twice the steps, until ig_settings["max_steps"].

    Gauss-Legendre nodes are not nested, so a refined image is integrated afresh; few need it.
    """
    def run(rows, n):
        return integrated_gradients(model, x[rows], target[rows], ig_settings, n,
                                    None if logits is None else logits[rows], internal_batch_size)
    n = ig_settings["n_steps"]
    result = run(torch.arange(len(x), device=x.device), n)
    while n < ig_settings["max_steps"]:
        rows = (result.relative_error() > ig_settings["tolerance"]).nonzero().flatten()
        if len(rows) == 0:
            break
        n = min(2 * n, ig_settings["max_steps"])
        redo = run(rows, n)
        result.attributions[rows], result.delta[rows] = redo.attributions, redo.delta
        result.n_steps[rows.cpu()] = n
    return result


def smoothgrad_ig(samples, stdev):
    """An explainer (model, x, target, ig_settings, references): SmoothGrad over IG (Captum's
    NoiseTunnel), the mean IG map of `samples` copies of x with Gaussian noise of s.d. `stdev`."""
    def explain(model, x, target, ig_settings, references=None):
        return NoiseTunnel(IntegratedGradients(forward_for(model, ig_settings["attribute"]))).attribute(
            x, nt_type="smoothgrad", nt_samples=samples, stdevs=stdev,
            baselines=make_baseline(x, ig_settings["baseline"], model_lib.input_mean(model)),
            target=target, n_steps=ig_settings["n_steps"], method=ig_settings["rule"],
            internal_batch_size=chunk_size(model, x, samples))
    return explain


# ----------------------------------------------------------------------------- every method
# Each is (model, x, target, ig_settings, references) -> a map of x's shape; ig_settings are the
# method's own (method_settings: an IG variant's baseline or output applied), and references
# (training images) are used by the methods whose record says needs_references.

def fixed_ig(model, x, target, ig_settings, references=None):
    """IG at the settings' n_steps, unrefined: the "ig" method's maps of other models and inputs
    (randomised models, noisy copies). The stored IG maps are refined (explain_batch)."""
    return integrated_gradients(model, x, target, ig_settings, internal_batch_size=chunk_size(model, x)).attributions


def refined_ig(model, x, target, ig_settings, references=None):
    """IG refined to the settings' tolerance, up to their max_steps: the IG variants' maps."""
    return refined_integrated_gradients(model, x, target, ig_settings,
                                        internal_batch_size=chunk_size(model, x)).attributions


def ig_local(model, x, target, ig_settings, references=None):
    """IG without the (x - baseline) factor (Captum's multiply_by_inputs=False): the path average of
    the gradient."""
    base = make_baseline(x, ig_settings["baseline"], model_lib.input_mean(model))
    return IntegratedGradients(forward_for(model, ig_settings["attribute"]), multiply_by_inputs=False).attribute(
        x, baselines=base, target=target, n_steps=ig_settings["n_steps"], method=ig_settings["rule"],
        internal_batch_size=chunk_size(model, x))


def saliency(model, x, target, ig_settings, references=None):
    """|input gradient| (Simonyan et al., 2014; Captum's default). An input that requires grad
    spares Captum's warning."""
    return Saliency(forward_for(model, ig_settings["attribute"])).attribute(x.detach().requires_grad_(),
                                                                           target=target)


def smoothgrad_sq(model, x, target, ig_settings, references=None):
    """SmoothGrad-Squared of the gradient (Captum's NoiseTunnel)."""
    return NoiseTunnel(Saliency(forward_for(model, ig_settings["attribute"]))).attribute(
        x, nt_type="smoothgrad_sq", nt_samples=SMOOTHGRAD_SAMPLES, stdevs=SMOOTHGRAD_SD,
        nt_samples_batch_size=SMOOTHGRAD_SAMPLES, target=target, abs=False)


def gradcam(model, x, target, ig_settings, references=None):
    """LayerGradCam on model.gradcam_layer, upsampled bilinearly and spread evenly over the channels."""
    cam = LayerGradCam(forward_for(model, ig_settings["attribute"]), model_lib.gradcam_layer(model)).attribute(
        x, target=target)
    cam = LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), "bilinear")
    return cam.expand_as(x) / x.shape[1]


def occlusion_window(size):
    """(window, stride) in pixels for occlusion: 4 and 2 at 28 px, growing with the image."""
    return max(2, round(size / 7)), max(1, round(size / 14))


def occlusion(model, x, target, ig_settings, references=None):
    """The drop in the output when a window (occlusion_window) is set to the IG baseline."""
    base = make_baseline(x, ig_settings["baseline"], model_lib.input_mean(model))
    window, stride = occlusion_window(x.shape[-1])
    return Occlusion(forward_for(model, ig_settings["attribute"])).attribute(
        x, sliding_window_shapes=(x.shape[1], window, window), strides=(x.shape[1], stride, stride),
        baselines=base, target=target, perturbations_per_eval=16)


def expected_gradients(model, x, target, ig_settings, references):
    """Expected Gradients (Erion et al., 2021): Captum's GradientShap with `references`, a sample of
    training images, as the distribution of baselines: for each of EG_SAMPLES draws, a random
    reference and a random point on the path to x; complete in expectation, f(x) - E f(reference)."""
    return GradientShap(forward_for(model, ig_settings["attribute"])).attribute(
        x, baselines=references.to(x.device, x.dtype), n_samples=EG_SAMPLES, stdevs=0.0, target=target)


FAMILIES = ("ig", "sampling", "gradient", "cam", "perturbation", "control")
COMPLETENESS = ("exact", "expected", "none")


@dataclass(frozen=True)
class Method:
    """An attribution method and its traits, which quality.py, trust.py and the scripts read from
    here (pytorch-grad-cam's way: a method carries its own). Every field is required, so an entry
    cannot leave a trait out."""
    name: str
    explain: Callable  # (model, x, target, ig_settings, references) -> map of x's shape
    family: str  # FAMILIES: "ig" (IG and its variants: manage their own gradients), "control" (quality.CONTROLS) ...
    complete: str  # COMPLETENESS: maps add up to f(x) - f(reference) for every image, in expectation, or not
    needs_references: bool  # draws its baselines from training images (references)
    baseline: str | None  # the reference it explains against: "run" (the IG settings'), a BASELINES kind, None
    output: str | None  # what it explains, when not the run's attribute setting: an OUTPUTS value; None: the run's

    def own_ig_settings(self, ig_settings):
        """The IG settings this method explains with: its own baseline and output applied."""
        own = {"baseline": self.baseline} if self.baseline not in (None, "run") else {}
        return {**ig_settings, **own, **({"attribute": self.output} if self.output else {})}


# Every method evaluate.py and explain.py offer (--methods), by name; "ig" first (the stored,
# completeness-checked IG; the others reuse its predictions). The IG variants are IG with another
# reference or output, refined like the stored one and measured against the same tests.
METHODS = {m.name: m for m in (
    Method("ig", fixed_ig, "ig", "exact", False, "run", None),
    Method("ig_black", refined_ig, "ig", "exact", False, "black", None),
    Method("ig_blur", refined_ig, "ig", "exact", False, "blur", None),
    Method("ig_noise", refined_ig, "ig", "exact", False, "noise", None),
    Method("ig_prob", refined_ig, "ig", "exact", False, "run", "prob"),
    Method("expected_gradients", expected_gradients, "sampling", "expected", True, None, None),
    Method("ig_local", ig_local, "gradient", "none", False, "run", None),
    Method("saliency", saliency, "gradient", "none", False, None, None),
    Method("smoothgrad_sq", smoothgrad_sq, "gradient", "none", False, None, None),
    Method("gradcam", gradcam, "cam", "none", False, None, None),
    Method("occlusion", occlusion, "perturbation", "none", False, "run", None))}
# evaluate.py's default: the flagship IG, and a method of each other kind that the tests may find
# better (docs/DESIGN.md); --methods all adds the IG variants and the rest.
DEFAULT_METHODS = ("ig", "expected_gradients", "saliency", "gradcam")


def explainer(method, ig_settings, references=None):
    """(model, x, target) -> float32 attributions of x's shape, for a Method (or a METHODS name);
    `references` (training images) for a method that needs them."""
    method = METHODS[method] if isinstance(method, str) else method
    if method.needs_references and references is None:
        raise ExplainError(f"{method.name} draws its baselines from the training images, and none were "
                           f"given: run it through evaluate.py, or give explain.py the --data-dir of the "
                           f"model's dataset.")
    own = method.own_ig_settings(ig_settings)

    def explain(model, x, target):
        if method.family == "ig":  # IG manages its own gradients
            return method.explain(model, x, target, own, references)
        with input_gradients_only(model):
            return method.explain(model, x, target, own, references).detach().float().contiguous()
    return explain


def reference_sample(train_images, n=EG_REFERENCES, seed=0):
    """The training images a method with needs_references draws its baselines from: a fixed random
    sample, as [0, 1] floats."""
    order = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(seed))[:n]
    return to_unit(train_images[order.sort().values])


def reference_score(method, model, x, target, ig_settings, references=None):
    """f(reference) for each image, what a complete method's map must add up to with f(x): its
    baseline's output, or for a method with needs_references the mean over the references."""
    own = method.own_ig_settings(ig_settings)
    forward = forward_for(model, own["attribute"])
    with torch.no_grad():
        if method.needs_references:
            return forward(references.to(x.device, x.dtype))[:, target].mean(0)
        base = make_baseline(x, own["baseline"], model_lib.input_mean(model))
        return forward(base)[torch.arange(len(x), device=x.device), target]


def methods_arg(text):
    """argparse type for --methods: 'all' or a comma-separated list of METHODS; 'ig' always comes
    first (the other methods reuse its predictions)."""
    names = list(METHODS) if text == "all" else [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{', '.join(unknown) or repr(text)} is not an attribution "
                                         f"method; choose from {', '.join(METHODS)}, or all")
    return ["ig"] + [m for m in list(METHODS)[1:] if m in names]


def stored_attributions(rows):
    """The attributions of stored explanation rows (read with arrays) as one float32 (N, C, H, W) tensor."""
    return torch.from_numpy(np.stack([r["attribution"] for r in rows]).astype(np.float32))


# ----------------------------------------------------------------------------- targets and settings

def add_ig_arguments(p):
    """The Integrated Gradients flags, shared by explain.py and evaluate.py; their names are
    DEFAULT_IG's keys, so a script passes ig_settings {key: its value}."""
    p.add_argument("--n-steps", type=int, default=DEFAULT_IG["n_steps"], help="IG integration steps to "
                   "start with, for every image")
    p.add_argument("--max-steps", type=int, default=DEFAULT_IG["max_steps"], help="double the steps of images "
                   "whose completeness error exceeds --tolerance, up to this many (set it to --n-steps "
                   "for a fixed count)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_IG["tolerance"], help="allowed |delta| / |f(x) "
                   "- f(baseline)| before an image is recomputed with more steps")
    p.add_argument("--ig-rule", dest="rule", default=DEFAULT_IG["rule"], choices=IG_RULES, help="IG's "
                   "integration rule along the path (the quadrature)")
    p.add_argument("--baseline", default=DEFAULT_IG["baseline"], choices=BASELINES,
                   help="IG reference image: training mean colour, black, white, blurred input or noise")
    p.add_argument("--attribute", default=DEFAULT_IG["attribute"], choices=OUTPUTS,
                   help="what the maps explain: the class logit or its probability")
    p.add_argument("--target", default=DEFAULT_IG["target"], help="class to explain: 'pred' (predicted; for "
                   "multi-label data the highest-scoring label), 'true' (dataset images of single-label "
                   "data only), or a class index or name")


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


def ig_settings(values, class_names, labels_known=True, multi_label=False):
    """The IG settings dict from the IG flags' values ({DEFAULT_IG key: value}, add_ig_arguments'),
    the target resolved against the class names; they also identify a run in the store."""
    if values["max_steps"] < values["n_steps"]:
        raise ExplainError(f"--max-steps {values['max_steps']} is below --n-steps {values['n_steps']}.")
    return {**{k: values[k] for k in DEFAULT_IG},
            "target": resolve_target(values["target"], class_names, labels_known, multi_label)}


def explain_batch(model, images_u8, labels, ig_settings, device="cpu"):
    """Predictions and refined IG for uint8 images: (probs, targets, IGResult), all on the CPU."""
    x = to_unit(images_u8.to(device))
    with torch.no_grad():
        logits = model(x)
    targets = target_indices(ig_settings["target"], logits,
                             None if labels is None else labels.to(device))
    result = refined_integrated_gradients(model, x, targets, ig_settings, logits=logits,
                                          internal_batch_size=chunk_size(model, x))
    return model_lib.probabilities(model, logits).cpu(), targets.cpu(), result.cpu()
