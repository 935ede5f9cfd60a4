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
from pathlib import Path

import numpy as np
import torch
from captum.metrics import infidelity, sensitivity_max

import data
import db
import explain
import model as model_lib
import plots
from progress import progress

CURVE_POINTS = 29  # deletion/insertion curves: 0, 1/28, ..., all of the pixels
# The randomisation check fails when the fully randomised maps keep a rank correlation above 0.5
# with the originals, unless that is within 0.1 of what |x - baseline| alone shares with them.
RANDOMIZATION_FAIL, INPUT_MARGIN = 0.5, 0.1
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


def randomization_verdict(spearman, input_spearman):
    """'failed' when fully randomised maps keep more of their ranking than the input alone explains."""
    return "failed" if spearman > max(RANDOMIZATION_FAIL, input_spearman + INPUT_MARGIN) else "passed"


def randomized_models(model, seed=0):
    """[(stage, model)]: weights re-initialised cumulatively from the top layer down, each copy
    BN-folded for IG. Seeded, and without touching the global RNG."""
    out, rand = [], copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for stage in model_lib.randomization_layers(model):
            for m in rand.get_submodule(stage).modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.reset_running_stats()
            out.append((stage, model_lib.fused_for_inference(rand)))
    return out


def quality_measures(model, x, target, attributions, settings, attribute, stages, masks=None, seed=0):
    """Faithfulness and sanity measures of `attributions` (B, C, H, W) for images x, per image.

    `model` is the (BN-folded) model explained; `attribute` recomputes maps (explain.attribution_fn)
    for the randomised models in `stages` ([(layer, model)], see randomized_models) and for Captum's
    sensitivity_max. "randomization_stages" is (B, len(stages)), in the order of `stages`.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # random orders and metric noise: the same on every rerun
        gen = torch.Generator().manual_seed(seed)
        base = explain.make_baseline(x, settings["baseline"], model_lib.input_mean(model))
        order, random_order = pixel_order(attributions), pixel_order(attributions, gen)
        curves = {f"{kind}_curve{suffix}": perturbation_curves(model, x, base, o, target, kind == "insertion")
                  for kind in ("deletion", "insertion")
                  for suffix, o in (("", order), ("_random", random_order))}

        def gaussian(inputs):
            noise = torch.randn_like(inputs) * INFIDELITY_NOISE
            return noise, inputs - noise
        forward = explain.forward_for(model, settings["output"])
        infid = infidelity(forward, gaussian, x, attributions.to(x.device), target=target,
                           n_perturb_samples=16, normalize=True)
        def explanation(inputs, target):  # Captum passes and expects 1-tuples
            return (attribute(model, inputs[0] if isinstance(inputs, tuple) else inputs, target),)
        sens = sensitivity_max(explanation, x, target=target, perturb_radius=SENSITIVITY_RADIUS,
                               n_perturb_samples=4)
        randomized = [attribute(m, x, target).cpu() for _, m in stages]
    by_stage = torch.stack([rank_correlation(attributions, a) for a in randomized], 1)
    out = {**curves, "infidelity": infid.cpu(), "sensitivity_max": sens.cpu(),
           "randomization_stages": by_stage, "randomization_spearman": by_stage[:, -1],
           "randomization_spearman_signed": rank_correlation(attributions, randomized[-1], absolute=False),
           # IG multiplies by (x - baseline), so maps from any weights share this much ranking with it
           "randomization_input_spearman": rank_correlation(attributions, (x - base).cpu())}
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


def methods(settings, smooth=0, smooth_sd=0.1):
    """{method name: attribution function}: IG, plus SmoothGrad over IG with `smooth` samples."""
    out = {"ig": explain.attribution_fn(settings)}
    if smooth:
        out[f"smoothgrad_ig:n={smooth},sd={smooth_sd}"] = explain.attribution_fn(settings, smooth, smooth_sd)
    return out


def quality_into_db(fused, stages, split, indices, settings, attribute_by_method, conn, run_id, device):
    """Quality measures for the stored explanations of `indices` that have none yet, per method,
    a batch per transaction. `fused` is the BN-folded model, `stages` from randomized_models."""
    stage_names = [name for name, _ in stages]
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
            x = data.to_unit(split.images[idx].to(device))
            target = torch.tensor([r["target"] for r in rows], device=device)
            # IG's own maps are the stored ones; other methods are computed here.
            attributions = (explain.stored_attributions(rows) if method == "ig"
                            else attribute(fused, x, target).cpu())
            q = quality_measures(fused, x, target, attributions, settings, attribute, stages,
                                 masks=None if split.masks is None else split.masks[idx])
            gap = torch.tensor([r["score"] - r["baseline_score"] for r in rows])
            q["relative_error"] = db.relative_completeness_error(attributions.sum((1, 2, 3)) - gap, gap)
            by_stage = q.pop("randomization_stages")
            db.insert_quality(conn, [{"run_id": run_id, "split": "test", "image_index": int(i),
                                      "method": method, **{k: v[j].tolist() for k, v in q.items()},
                                      "randomization_stages": dict(zip(stage_names, by_stage[j].tolist()))}
                                     for j, i in enumerate(idx.tolist())])
            bar.update(len(rows))
        bar.close()


def quality_summary(conn, run_id, method, settings):
    """Means over every stored quality row of the run for `method`, with the check verdicts."""
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
    summary["randomization_check"] = randomization_verdict(
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


def report_quality(conn, run_id, settings):
    """Print the summaries and warnings of every method stored for the run; return them for
    metrics.json, with IG's keys at the top level and other methods' summaries under their names."""
    summaries = {m: quality_summary(conn, run_id, m, settings) for m in db.quality_methods(conn, run_id)}
    print_quality(summaries)
    for method, q in summaries.items():
        for line in quality_warnings(q, method, settings):
            print(line)
    ig = summaries.pop("ig")
    return {**ig, "quality_images": ig.pop("images"), **summaries}


def quality_figures(conn, run_id, attribute_by_method, indices, stages, split, images_dir, tag):
    """images/faithfulness.png (mean curves per method over `indices`) and
    images/sanity_randomization.png (the first of them: its IG map through every randomisation stage)."""
    curves = {}
    for method in attribute_by_method:
        rows = db.quality_rows(conn, run_id, "test", method, indices)
        curves[method] = {c: np.stack([r[c] for r in rows]) for c in db.QUALITY_CURVES}
        for c in db.QUALITY_CURVES:
            auc = c.replace("_curve", "_auc")
            curves[method][auc] = float(np.mean([r[auc] for r in rows]))
    plots.plot_faithfulness(curves, Path(images_dir) / "faithfulness.png",
                            f"Deletion and insertion, test split of {tag}")
    row = db.find(conn, run_id, "test", image_indices=indices[:1], with_arrays=True)[0]
    x = data.to_unit(split.images[row["image_index"]][None])
    target = torch.tensor([row["target"]])
    attribute = attribute_by_method["ig"]
    maps = [("IG", explain.stored_attributions([row])[0])] + [
        (f"random {name}", attribute(m, x, target)[0]) for name, m in stages]
    rho = [float(rank_correlation(maps[0][1][None], m[None])) for _, m in maps[1:]]
    plots.plot_randomization(x[0], maps, rho, Path(images_dir) / "sanity_randomization.png",
                             f"Cascading randomisation (top layer first), test image {row['image_index']} "
                             f"of {tag}")
