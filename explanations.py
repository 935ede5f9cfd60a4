"""explanations.py: attribution maps of a split's images computed into the store, only where missing.

    explanations.explain_methods(explaining, indices, conn, run_id)

IG (refined to its tolerance, with completeness terms) comes first and fixes each image's prediction
and explained class; every other method's map is computed for the same images and classes. Each
batch (Explaining.batch images) is one transaction, so Ctrl-C or a kill loses at most the batch in
flight, and a rerun computes only what the store lacks. Which images: explanation_indices, the
first of a fixed shuffle of the split (every class shows up early, and reruns pick the same ones),
and beside them error_indices, the model's misclassified images, so the gallery can show its errors.
"""
import time
from dataclasses import dataclass

import numpy as np
import torch

import attribution as attr
import budget
import db
from colour import to_unit
from progress import progress

EXPLAIN_SEED = 0  # which test images get explained: a fixed shuffle, so reruns pick the same ones


@dataclass(frozen=True)
class Explaining:
    """What an explanation pass computes and how: the BN-folded model, the images (a data.Split, or
    anything whose images and labels index alike, as slide tiles do) and the split name they are stored
    under, the IG settings, the methods to store ("ig" first) with their explainers, images per batch
    (ig_block), the storage dtype of the maps, and the device."""
    model: torch.nn.Module
    split: object
    ig_settings: dict
    methods: tuple
    explainers: dict  # {method: (model, x, target) -> map}, attribution.explainer's
    batch: int
    attr_dtype: str
    device: torch.device
    split_name: str = "test"


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


def ig_block(model, split, requested, device):
    """Images per IG batch (and transaction): `requested` (--ig-batch), fewer where
    budget.WORK_BYTES holds fewer rows with gradients (128 px and up on a CPU): Captum takes a
    batch's steps in chunks of attribution.chunk_size rows, never fewer than the batch's images. A
    function of the model and the image shape alone, so shards make the batches one process makes."""
    return budget.grad_images(model, split.images.shape[1:], requested, device=device)


def explain_into_db(explaining, indices, conn, run_id):
    """Explain with IG the images not yet stored for this run, one transaction per batch. Returns the count."""
    name = explaining.split_name
    done = db.done_indices(conn, run_id, name)
    todo = [i for i in indices if i not in done]
    if not todo:
        print(f"All {len(indices)} explanations are already stored in run {run_id}; nothing to compute.")
        return 0
    what = "test images" if name == "test" else "tiles"
    print(f"Explaining {len(todo)} {what} with IG ({len(indices) - len(todo)} already stored)")
    t0, stored, split = time.perf_counter(), 0, explaining.split
    # closed on an error too: an open bar is redrawn by tqdm's monitor thread long after the failure
    with progress(total=len(todo), unit="img", desc="IG") as bar:
        for start in range(0, len(todo), explaining.batch):
            idx = torch.tensor(todo[start:start + explaining.batch])
            labels = split.labels[idx]
            probs, targets, result = attr.explain_batch(explaining.model, split.images[idx], labels,
                                                        explaining.ig_settings, explaining.device)
            stored += db.insert_explanations(conn, db.explanation_rows(run_id, name, "ig", {
                "image_index": idx.numpy(), "true_label": labels.numpy(), "probs": probs.numpy(),
                "target": targets.numpy(), **result.stored(explaining.attr_dtype)}))
            bar.update(len(idx))
    seconds = time.perf_counter() - t0
    print(f"Stored {stored} explanations in {seconds:.1f}s ({len(todo) / seconds:.1f} attributions/s)"
          + (f"; {len(todo) - stored} were stored meanwhile by another process" if stored < len(todo) else ""))
    return stored


def method_into_db(explaining, method, indices, conn, run_id):
    """Maps of another method for the images IG explained, stored under its name, one transaction
    per batch; the prediction and the explained class are IG's rows'. Returns the count."""
    name = explaining.split_name
    done = db.done_indices(conn, run_id, name, method)
    todo = [i for i in indices if i not in done]  # in the given order: the batches a single process makes
    if not todo:
        return 0
    t0, stored, split = time.perf_counter(), 0, explaining.split
    with progress(total=len(todo), unit="img", desc=method) as bar:
        for start in range(0, len(todo), explaining.batch):
            rows = db.find(conn, run_id, image_indices=todo[start:start + explaining.batch], with_arrays=True,
                           split=name)
            idx = torch.tensor([r["image_index"] for r in rows])
            x = to_unit(split.images[idx].to(explaining.device))
            targets = torch.tensor([r["target"] for r in rows], device=explaining.device)
            with attr.seeded(int(idx[0])):  # noisy methods' draws: the same on every rerun and shard
                maps = explaining.explainers[method](explaining.model, x, targets).cpu().numpy()
            stored += db.insert_explanations(conn, db.explanation_rows(run_id, name, method, {
                "image_index": idx.numpy(), "true_label": split.labels[idx].numpy(),
                "probs": np.stack([r["probs"] for r in rows]), "target": targets.cpu().numpy(),
                "attributions": maps.astype(explaining.attr_dtype), "score": [r["score"] for r in rows]}))
            bar.update(len(rows))
    print(f"Stored {stored} {method} maps ({len(todo) / (time.perf_counter() - t0):.1f} attributions/s)")
    return stored


def explain_methods(explaining, indices, conn, run_id):
    """IG, then every other method, for `indices`, where the store lacks them."""
    if indices:
        explain_into_db(explaining, indices, conn, run_id)
        for method in explaining.methods[1:]:
            method_into_db(explaining, method, indices, conn, run_id)


def lacking(indices, done_sets):
    """The images of `indices`, in order, missing from at least one of the done sets."""
    return [i for i in indices if not all(i in done for done in done_sets)]
