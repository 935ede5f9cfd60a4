"""explanations.py: attribution maps of a split's images computed into the store, only where missing.

    explanations.explain_methods(fused, ds.test, indices, settings, conn, run_id, args, device)

IG (refined to its tolerance, with completeness terms) comes first and fixes each image's prediction
and explained class; every other --methods map is computed for the same images and classes. Each
batch (--ig-batch images, fewer where ig_block's byte budget says so) is one transaction, so Ctrl-C
or a kill loses at most the batch in flight, and a rerun computes only what the store lacks. Which
images: explanation_indices, the first of a fixed shuffle of the split (every class shows up early,
and reruns pick the same ones), and beside them error_indices, the model's misclassified images, so
the gallery can show its errors.
"""
import time

import numpy as np
import torch

import attribution as attr
import budget
import db
import quality
from colour import to_unit
from progress import progress

EXPLAIN_SEED = 0  # which test images get explained: a fixed shuffle, so reruns pick the same ones


def explanation_indices(n_images, how_many):
    """The first `how_many` of a fixed shuffle of the split, so every class shows up early."""
    count = n_images if how_many == "all" else min(int(how_many), n_images)
    order = torch.randperm(n_images, generator=torch.Generator().manual_seed(EXPLAIN_SEED))
    return order[:count].tolist()


def error_indices(split, probs, exclude, cap):
    """Up to `cap` images of the split misclassified by `probs` (its predictions without TTA, as the
    stored rows record them; db.correct_predictions' rule) that `exclude` lacks, in the explanation order."""
    if cap <= 0:
        return []
    wrong = ~db.correct_predictions(split.labels.numpy(), probs)
    taken = set(exclude)
    return [i for i in explanation_indices(len(split), "all") if wrong[i] and i not in taken][:cap]


def ig_block(net, split, args, device):
    """Images per IG batch (and transaction): --ig-batch, fewer where budget.WORK_BYTES holds fewer
    rows with gradients (128 px and up on a CPU): Captum takes a batch's steps in chunks of
    attribution.chunk_size rows, never fewer than the batch's images. A function of the model and
    the image shape alone, so shards make the batches one process makes."""
    return budget.grad_images(net, split.images.shape[1:], args.ig_batch, device=device)


def explain_into_db(net, split, indices, settings, conn, run_id, args, device):
    """Explain the images not yet stored for this run, one transaction per batch. Returns the count."""
    done = db.done_indices(conn, run_id, "test")
    todo = [i for i in indices if i not in done]
    if not todo:
        print(f"All {len(indices)} explanations are already stored in run {run_id}; nothing to compute.")
        return 0
    print(f"Explaining {len(todo)} test images with IG ({len(indices) - len(todo)} already stored)")
    bar = progress(total=len(todo), unit="img", desc="IG")
    t0, stored, block = time.perf_counter(), 0, ig_block(net, split, args, device)
    for start in range(0, len(todo), block):
        idx = torch.tensor(todo[start:start + block])
        labels = split.labels[idx]
        probs, targets, result = attr.explain_batch(net, split.images[idx], labels, settings, device)
        stored += db.insert_explanations(conn, db.explanation_rows(
            run_id, "test", idx.numpy(), labels.numpy(), probs.numpy(), targets.numpy(),
            **result.stored(args.attr_dtype)))
        bar.update(len(idx))
    bar.close()
    seconds = time.perf_counter() - t0
    print(f"Stored {stored} explanations in {seconds:.1f}s ({len(todo) / seconds:.1f} attributions/s)"
          + (f"; {len(todo) - stored} were stored meanwhile by another process" if stored < len(todo) else ""))
    return stored


def methods_into_db(net, split, indices, conn, run_id, args, device, method, attribute):
    """Maps of another attribution method (`attribute`, from attribution.method_fn) for the images IG
    explained, stored under its name, one transaction per batch; the prediction and the explained
    class are IG's rows'. Returns the count."""
    done = db.done_indices(conn, run_id, "test", method)
    todo = [i for i in indices if i not in done]  # in the given order: the batches a single process makes
    if not todo:
        return 0
    bar = progress(total=len(todo), unit="img", desc=method)
    t0, stored, block = time.perf_counter(), 0, ig_block(net, split, args, device)
    for start in range(0, len(todo), block):
        rows = db.find(conn, run_id, "test", image_indices=todo[start:start + block], with_arrays=True)
        idx = torch.tensor([r["image_index"] for r in rows])
        x = to_unit(split.images[idx].to(device))
        targets = torch.tensor([r["target"] for r in rows], device=device)
        with attr.seeded(int(idx[0])):  # noisy methods' draws: the same on every rerun and shard
            maps = attribute(net, x, targets).cpu().numpy().astype(args.attr_dtype)
        labels = split.labels[idx].numpy()
        n = len(rows)
        stored += db.insert_explanations(conn, db.explanation_rows(
            run_id, "test", idx.numpy(), labels, np.stack([r["probs"] for r in rows]), targets.cpu().numpy(),
            maps, [None] * n, [r["score"] for r in rows], [None] * n, [None] * n, method=method))
        bar.update(n)
    bar.close()
    print(f"Stored {stored} {method} maps ({len(todo) / (time.perf_counter() - t0):.1f} attributions/s)")
    return stored


def explain_all(fused, stages, split, indices, quality_idx, settings, scored, conn, run_id, args, device,
                references=None):
    """Steps 3 and 4 into one store: explain_methods, then quality for `quality_idx`; each only where
    the store lacks it. `scored` is quality.scored_maps'; `references` are expected_gradients'."""
    explain_methods(fused, split, indices, settings, conn, run_id, args, device, scored)
    if quality_idx:
        quality.quality_into_db(fused, stages, split, quality_idx, settings, scored, conn, run_id, device,
                                references)


def explain_methods(fused, split, indices, settings, conn, run_id, args, device, scored):
    """IG, then every other --methods (their functions in `scored`), for `indices`, where the store
    lacks them."""
    if indices:
        explain_into_db(fused, split, indices, settings, conn, run_id, args, device)
        for method in args.methods[1:]:
            methods_into_db(fused, split, indices, conn, run_id, args, device, method, scored[method])


def lacking(indices, done_sets):
    """The images of `indices`, in order, missing from at least one of the done sets."""
    return [i for i in indices if not all(i in done for done in done_sets)]
