"""quality.py: how far to trust an explanation, measured per image and summarised per run.

    evaluate.py --quality 200      # runs this module's pass over 200 of the explained test images

Measures, for each image and attribution method (IG, optionally SmoothGrad over IG):
- completeness: IG's |delta| as a share of f(x) - f(baseline) (db.relative_completeness_error);
- deletion / insertion (Petsiuk et al., 2018): the explained class's probability as pixels are
  removed (set to the baseline) or inserted in attribution order, against a random order;
- Captum's infidelity and sensitivity_max;
- cascading model randomisation (Adebayo et al., 2018): layers re-initialised from the top down
  (model.randomization_layers), and the Spearman rank correlation of |map| with the trained map
  after each stage; IG multiplies by (x - baseline), so |x - baseline| alone is the reference;
- localisation (synthetic data only): the share of |map| inside the known evidence mask.

Written here because Captum has none of them: deletion/insertion, the randomisation cascade with
its Spearman correlations and verdict, and mask mass. Rows go to the `quality` table (db.py), one
transaction per batch, so an interrupted pass resumes where it stopped.
"""
import copy
import functools
from pathlib import Path

import numpy as np
import torch
from captum.metrics import infidelity, sensitivity_max

import attribution as attr
import db
import model as model_lib
import plots
from colour import to_unit
from progress import progress

CURVE_POINTS = 29  # deletion/insertion curves: 0, 1/28, ..., all of the pixels
# The randomisation check: a method passes when its fully randomised |maps| keep a Spearman rank
# correlation with its trained maps at least RANDOMIZATION_MARGIN below the input-only control's, a
# map that ignores the model and so keeps 1.0 (measured each run, through the identical test).
RANDOMIZATION_MARGIN = 0.5
RANDOMIZATION_MODES = ("top_down", "bottom_up", "single")
SSIM_WINDOW = 7  # pixels; the Gaussian-free (uniform) window of Wang et al.'s SSIM
INFIDELITY_NOISE, SENSITIVITY_RADIUS = 0.05, 0.02  # in [0, 1] pixel units


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
    default (Adebayo et al., 2018, report both)."""
    def centred_ranks(t):
        t = t.abs().sum(1) if absolute else t.sum(1)
        r = t.flatten(1).argsort(1).argsort(1).double()
        return r - r.mean(1, keepdim=True)
    ra, rb = centred_ranks(a), centred_ranks(b)
    return ((ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1)).clamp_min(1e-12)).float()


def randomization_verdict(spearman, control_spearman=1.0):
    """'passed' when fully randomised maps keep at least RANDOMIZATION_MARGIN less rank correlation
    with the trained maps than the input-only control keeps (1.0: it ignores the model)."""
    return "passed" if spearman <= control_spearman - RANDOMIZATION_MARGIN else "failed"


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


# ----------------------------------------------------------------------------- controls

def control_maps():
    """{name: (model, x, target) -> map}: three maps that ignore the model, run through every
    quality measure beside the methods. A random map (fresh noise each call), the input-only map
    |x - baseline| (what IG's (x - baseline) factor stamps into every IG map), and a Sobel edge map
    of the image. A sound randomisation test fails the last two and cannot tell the first from a
    good method: passing it is necessary, not sufficient (Binder et al., 2023)."""
    def random_map(model, x, target):
        return torch.randn(x.shape, device=x.device)

    def input_only(model, x, target, baseline="mean"):
        return (x - attr.make_baseline(x, baseline, model_lib.input_mean(model))).abs()

    def edges(model, x, target):
        grey = x.mean(1, keepdim=True)
        kx = torch.tensor([[-1., 0., 1.], [-2., 0., 2.], [-1., 0., 1.]], device=x.device).view(1, 1, 3, 3)
        gx = torch.nn.functional.conv2d(grey, kx, padding=1)
        gy = torch.nn.functional.conv2d(grey, kx.transpose(2, 3), padding=1)
        return ((gx ** 2 + gy ** 2).sqrt() / x.shape[1]).expand_as(x).contiguous()
    return {"control:random": random_map, "control:input": input_only, "control:edge": edges}


def quality_measures(model, x, target, attributions, settings, attribute, stages, masks=None, seed=0):
    """Faithfulness and sanity measures of `attributions` (B, C, H, W) for images x, per image.

    `model` is the (BN-folded) model explained; `attribute` recomputes maps (attribution.method_fn or
    a control) for the randomised models in `stages` ({mode: [(layer, model)]}, see
    all_randomized_models; a plain list is the top-down cascade) and for Captum's sensitivity_max.
    "randomization_stages" is (B, stages) of the top-down |map| Spearman; "randomization" holds, per
    image, every mode's {layer: {"spearman", "signed", "ssim"}}.
    """
    stages = stages if isinstance(stages, dict) else {"top_down": stages}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # random orders and metric noise: the same on every rerun
        gen = torch.Generator().manual_seed(seed)
        base = attr.make_baseline(x, settings["baseline"], model_lib.input_mean(model))
        order, random_order = pixel_order(attributions), pixel_order(attributions, gen)
        curves = {f"{kind}_curve{suffix}": perturbation_curves(model, x, base, o, target, kind == "insertion")
                  for kind in ("deletion", "insertion")
                  for suffix, o in (("", order), ("_random", random_order))}

        def gaussian(inputs):
            noise = torch.randn_like(inputs) * INFIDELITY_NOISE
            return noise, inputs - noise
        forward = attr.forward_for(model, settings["attribute"])
        infid = infidelity(forward, gaussian, x, attributions.to(x.device), target=target,
                           n_perturb_samples=16, normalize=True)
        def explanation(inputs, target):  # Captum passes and expects 1-tuples
            return (attribute(model, inputs[0] if isinstance(inputs, tuple) else inputs, target),)
        sens = sensitivity_max(explanation, x, target=target, perturb_radius=SENSITIVITY_RADIUS,
                               n_perturb_samples=4)
        randomized = {mode: [(name, attribute(m, x, target).cpu()) for name, m in models]
                      for mode, models in stages.items()}
    per_mode = {mode: {name: {"spearman": rank_correlation(attributions, a),
                              "signed": rank_correlation(attributions, a, absolute=False),
                              "ssim": ssim(attributions, a)} for name, a in maps}
                for mode, maps in randomized.items()}
    top_down = randomized["top_down"]
    by_stage = torch.stack([per_mode["top_down"][name]["spearman"] for name, _ in top_down], 1)
    out = {**curves, "infidelity": infid.cpu(), "sensitivity_max": sens.cpu(),
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
SUMMARY_KEYS = ("deletion_auc", "deletion_auc_random", "insertion_auc", "insertion_auc_random",
                "infidelity", "sensitivity_max", "randomization_spearman",
                "randomization_spearman_signed", "randomization_input_spearman", "mask_mass", "mask_area")


def scored_maps(settings, smooth=0, smooth_sd=0.1, names=("ig",), controls=True):
    """{name: attribution function} of everything the quality pass scores: each attribution method
    of `names` (attribution.METHODS), SmoothGrad over IG with `smooth` samples, and the three
    controls (control_maps)."""
    out = {name: attr.method_fn(name, settings) for name in names}
    if smooth:
        out[f"smoothgrad_ig:n={smooth},sd={smooth_sd}"] = attr.smoothgrad_ig_fn(settings, smooth, smooth_sd)
    if controls:
        baseline = settings["baseline"]
        out.update({name: (functools.partial(fn, baseline=baseline) if name == "control:input" else fn)
                    for name, fn in control_maps().items()})
    return out


def quality_into_db(fused, stages, split, indices, settings, attribute_by_method, conn, run_id, device):
    """Quality measures for the stored explanations of `indices` that have none yet, per method,
    a batch per transaction. `fused` is the BN-folded model, `stages` from all_randomized_models.
    A method with maps stored for the run (evaluate.py --methods) is scored on those maps; others
    (SmoothGrad over IG, the controls) are computed here."""
    stored_methods = set(db.explanation_methods(conn, run_id))
    for method, attribute in attribute_by_method.items():
        done = db.done_quality(conn, run_id, "test", method)
        todo = [i for i in indices if i not in done]
        if not todo:
            continue
        bar = progress(total=len(todo), unit="img", desc=f"quality {method}")
        for start in range(0, len(todo), QUALITY_BATCH):
            rows = db.find(conn, run_id, "test", image_indices=todo[start:start + QUALITY_BATCH],
                           with_arrays=True)
            idx = torch.tensor([r["image_index"] for r in rows])
            x = to_unit(split.images[idx].to(device))
            target = torch.tensor([r["target"] for r in rows], device=device)
            if method in stored_methods:
                maps = db.find(conn, run_id, "test", image_indices=idx.tolist(), with_arrays=True, method=method)
                attributions = attr.stored_attributions(maps)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(todo[start])  # the random-map control: the same on every rerun and shard
                    attributions = attribute(fused, x, target).cpu()
            q = quality_measures(fused, x, target, attributions, settings, attribute, stages,
                                 masks=None if split.masks is None else split.masks[idx])
            gap = torch.tensor([r["score"] - r["baseline_score"] for r in rows])
            q["relative_error"] = attr.relative_completeness_error(attributions.sum((1, 2, 3)) - gap, gap)
            by_stage, detail = q.pop("randomization_stages"), q.pop("randomization")
            stage_names = [name for name, _ in stages["top_down"]]
            db.insert_quality(conn, [{"run_id": run_id, "split": "test", "image_index": int(i),
                                      "method": method, **{k: v[j].tolist() for k, v in q.items()},
                                      "randomization_stages": dict(zip(stage_names, by_stage[j].tolist(),
                                                                       strict=True)),
                                      "randomization": detail[j]}
                                     for j, i in enumerate(idx.tolist())])
            bar.update(len(rows))
        bar.close()


def completeness_summary(conn, run_id, split, tolerance):
    """Completeness of every stored IG explanation of the run: count, mean |delta|, mean relative
    completeness error, and the share within `tolerance` (the IG settings' own)."""
    rows = db.find(conn, run_id, split)
    if not rows:
        return {"explained": 0}
    delta = np.array([r["delta"] for r in rows])
    rel = attr.relative_completeness_error(delta, np.array([r["score"] - r["baseline_score"] for r in rows]))
    return {"explained": len(rows), "mean_abs_delta": float(np.abs(delta).mean()),
            "mean_relative_completeness_error": float(rel.mean()), "tolerance": tolerance,
            "share_within_tolerance": float((rel <= tolerance).mean())}


def quality_summary(conn, run_id, method, settings, control_spearman=1.0):
    """Means over every stored quality row of the run for `method`, with the check verdicts;
    `control_spearman` is the input-only control's fully randomised |map| Spearman (see
    randomization_verdict)."""
    rows = db.quality_rows(conn, run_id, "test", method)
    if not rows:
        return {"images": 0}

    def mean(key):
        return float(np.mean([r[key] for r in rows])) if rows[0][key] is not None else None
    stages = rows[0]["randomization_stages"]
    summary = {"images": len(rows), **{k: mean(k) for k in SUMMARY_KEYS},
               "completeness_share": float(np.mean([r["relative_error"] <= settings["tolerance"] for r in rows])),
               "mean_relative_error": mean("relative_error"),
               "randomization_by_stage": {name: float(np.mean([r["randomization_stages"][name] for r in rows]))
                                          for name in stages}}
    detailed = [r["randomization"] for r in rows if r["randomization"]]
    if len(detailed) == len(rows):  # every mode, every measure: means per stage
        modes = {mode: {stage: {k: float(np.mean([d[mode][stage][k] for d in detailed])) for k in measures}
                        for stage, measures in by_stage.items()}
                 for mode, by_stage in detailed[0].items()}
        summary["randomization_modes"] = modes
        last = lambda mode: list(modes[mode].values())[-1]  # noqa: E731
        summary["randomization_ssim"] = last("top_down")["ssim"]
        if "bottom_up" in modes:
            summary["randomization_bottom_up_spearman"] = last("bottom_up")["spearman"]
        if "single" in modes:
            summary["randomization_single_min_spearman"] = min(v["spearman"] for v in modes["single"].values())
    summary["randomization_check"] = randomization_verdict(summary["randomization_spearman"], control_spearman)
    summary["randomization_control_spearman"] = control_spearman
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
                     f"correlation of {summary['randomization_spearman']:.2f} with the trained maps; a "
                     f"map that ignores the model keeps {summary['randomization_control_spearman']:.2f}, "
                     f"and a method must stay {RANDOMIZATION_MARGIN} below that. Its maps depend too "
                     f"little on what the model learned"
                     + ("; for IG that is its (x - baseline) factor: read it beside ig_local or saliency."
                        if method == "ig" else "."))
    return lines


QUALITY_TABLE = (("images", "images", "{:d}"), ("complete", "completeness_share", "{:.0%}"),
                 ("deletion", "deletion_auc", "{:.3f}"), ("(random)", "deletion_auc_random", "{:.3f}"),
                 ("insertion", "insertion_auc", "{:.3f}"), ("(random)", "insertion_auc_random", "{:.3f}"),
                 ("infid.", "infidelity", "{:.3g}"), ("sens.", "sensitivity_max", "{:.3g}"),
                 ("in mask", "mask_mass", "{:.0%}"),
                 ("rand. top-down", "randomization_spearman", "{:.2f}"),
                 ("bottom-up", "randomization_bottom_up_spearman", "{:.2f}"),
                 ("1 layer min", "randomization_single_min_spearman", "{:.2f}"),
                 ("SSIM", "randomization_ssim", "{:.2f}"), ("check", "randomization_check", "{}"))


def quality_table(summaries):
    """One line per method (controls last) and one column per measure, as text."""
    widths = [max(len(head), 8) for head, _, _ in QUALITY_TABLE]
    columns = list(zip(QUALITY_TABLE, widths, strict=True))
    lines = [f"  {'method':16s} " + " ".join(f"{head:>{w}s}" for (head, _, _), w in columns)]
    for method, q in summaries.items():
        cells = []
        for (_, key, fmt), w in columns:
            value = q.get(key)
            if key == "completeness_share" and not method.startswith(("ig", "smoothgrad_ig")) or value is None:
                cells.append(f"{'—':>{w}s}")  # completeness holds for IG only
            else:
                cells.append(f"{fmt.format(value):>{w}s}")
        lines.append(f"  {method:16s} " + " ".join(cells))
    return "\n".join(lines)


def print_quality(summaries):
    print("\nExplanation quality: means over the quality images (deletion: lower is better, insertion: "
          "higher; random = a random pixel order).\nRandomisation: Spearman of |map| between the trained "
          f"and the fully randomised model (top-down and bottom-up), the lowest after one layer alone, and SSIM; "
          f"a method passes at least {RANDOMIZATION_MARGIN} below the input-only control.")
    print(quality_table(summaries))
    ig = summaries.get("ig")
    if ig and ig["images"]:
        stages = "  ".join(f"{k} {v:.2f}" for k, v in ig["randomization_by_stage"].items())
        print(f"  ig, top-down stage by stage: {stages} (signed {ig['randomization_spearman_signed']:.2f}; "
              f"|x - baseline| shares {ig['randomization_input_spearman']:.2f} with the trained maps)")
        if ig["mask_mass"] is not None:
            print(f"  localisation (ig): {ig['mask_mass']:.1%} of |map| inside the evidence masks, which "
                  f"cover {ig['mask_area']:.1%} of the image")


def report_quality(conn, run_id, settings):
    """Print the summaries and warnings of every method stored for the run (controls included);
    return them for metrics.json: IG's keys at the top level, every method under "methods"."""
    names = db.quality_methods(conn, run_id)
    control = quality_summary(conn, run_id, "control:input", settings) if "control:input" in names else {}
    control_spearman = control.get("randomization_spearman", 1.0) if control.get("images") else 1.0
    order = sorted(names, key=lambda m: (m.startswith("control:"), m != "ig", m))
    summaries = {m: quality_summary(conn, run_id, m, settings, control_spearman) for m in order}
    print_quality(summaries)
    for method, q in summaries.items():
        if not method.startswith("control:"):
            for line in quality_warnings(q, method, settings):
                print(line)
    ig = dict(summaries.get("ig", {"images": 0}))
    return {**ig, "quality_images": ig.pop("images"), "methods": summaries}


def quality_figures(conn, run_id, attribute_by_method, indices, stages, split, images_dir, tag, fused, settings,
                    summaries=None):
    """images/faithfulness.png (mean curves per method over `indices`; controls left out) and
    images/sanity_randomization.png (the first of them: every method's map, and the input-only
    control's, through each top-down randomisation stage; with `summaries` (report_quality's
    "methods"), each row names its method's verdict over all the quality images)."""
    curves = {}
    for method in (m for m in attribute_by_method if not m.startswith("control:")):
        rows = db.quality_rows(conn, run_id, "test", method, indices)
        curves[method] = {c: np.stack([r[c] for r in rows]) for c in db.QUALITY_CURVES}
        for c in db.QUALITY_CURVES:
            auc = c.replace("_curve", "_auc")
            curves[method][auc] = float(np.mean([r[auc] for r in rows]))
    plots.plot_faithfulness(curves, Path(images_dir) / "faithfulness.png",
                            f"Deletion and insertion, {len(indices)} test images of {tag}; pixels set to the "
                            f"IG baseline ({settings['baseline']})")
    row = db.find(conn, run_id, "test", image_indices=indices[:1], with_arrays=True)[0]
    x = to_unit(split.images[row["image_index"]][None]).to(next(fused.parameters()).device)
    target = torch.tensor([row["target"]], device=x.device)
    stored = set(db.explanation_methods(conn, run_id))
    figure_rows = []
    for method, attribute in attribute_by_method.items():
        if method.startswith("control:") and method != "control:input":
            continue
        trained = (attr.stored_attributions(db.find(conn, run_id, "test", image_indices=[row["image_index"]],
                                                       with_arrays=True, method=method))[0]
                   if method in stored else attribute(fused, x, target)[0].cpu())
        maps = [("trained |map|", trained)] + [(f"randomised down to\n{model_lib.layer_label(name)}",
                                                 attribute(m, x, target)[0].cpu()) for name, m in stages["top_down"]]
        rho = [float(rank_correlation(trained[None], m[None])) for _, m in maps[1:]]
        q = (summaries or {}).get(method, {})
        verdict = (f": {q['randomization_check']} (mean {q['randomization_spearman']:.2f} over "
                   f"{q['images']} images)" if q.get("images") else "")
        figure_rows.append((method + verdict, maps, rho))
    plots.plot_randomization_rows(x[0].cpu(), figure_rows, Path(images_dir) / "sanity_randomization.png",
                                  f"Cascading randomisation (top layer first), test image {row['image_index']} "
                                  f"of {tag}. Spearman: rank correlation of |map| with the trained map; a method "
                                  f"passes {RANDOMIZATION_MARGIN} below the input-only control (last row)")
