"""colour.py: pixels as the model takes them, and the colour statistics of image splits.

    x = colour.to_unit(images_u8)                       # uint8 (N, C, H, W) -> float32 in [0, 1]
    mean, std = colour.channel_stats(train_images)       # what the model normalises with
    colour.colour_distance(reference, images)            # how unlike the training split an input is

channel_stats gives the training split's per-channel mean and std, which the model holds as
buffers (model.py). colour_reference summarises each training image's per-channel mean and s.d. and
sets, on the validation split, how far an input may lie from them before explain.py warns (tiles.py).
"""
import torch

from budget import chunk_images


def to_unit(images):
    """uint8 images -> float32 in [0, 1] (what the model takes)."""
    return images.float().div_(255)


def channel_stats(images, chunk=None):
    """Per-channel mean and std of uint8 (N, C, H, W) images on the [0, 1] scale, in chunks of at most
    budget.WORK_BYTES (float32, float64 and its square: 20 bytes a value). The sums are float64, so the chunk
    size moves the result by float64 rounding only."""
    chunk = chunk or chunk_images(images, 20)
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    total_sq = torch.zeros(images.shape[1], dtype=torch.float64)
    for i in range(0, len(images), chunk):
        x = to_unit(images[i:i + chunk]).double()
        total += x.sum(dim=(0, 2, 3))
        total_sq += x.pow(2).sum(dim=(0, 2, 3))
    n = len(images) * images.shape[2] * images.shape[3]
    mean = total / n
    std = (total_sq / n - mean ** 2).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()


def colour_features(images, chunk=None):
    """Per image, the mean and standard deviation of each channel on the [0, 1] scale: (N, 2C), in
    chunks of at most budget.WORK_BYTES (float32 and std's temporaries: 12 bytes a value). Each image's
    numbers depend on that image alone, so the chunk size changes nothing."""
    chunk = chunk or chunk_images(images, 12)
    out = []
    for i in range(0, len(images), chunk):
        x = to_unit(images[i:i + chunk]).flatten(2)
        out.append(torch.cat([x.mean(2), x.std(2)], 1).double())
    return torch.cat(out)


COLOUR_PERCENTILE = 99  # share of validation images the colour check lets through


def colour_reference(train_images, val_images):
    """How far an image's colour statistics may lie from the training split's: the training
    features' mean and inverse covariance, and the 99th percentile of the validation images'
    Mahalanobis distances as the threshold. Stored in each checkpoint for explain.py's check."""
    feats = colour_features(train_images)
    mean = feats.mean(0)
    cov = torch.cov(feats.T) + 1e-8 * torch.eye(feats.shape[1], dtype=feats.dtype)  # never singular
    reference = {"mean": mean.tolist(), "cov_inv": torch.linalg.inv(cov).tolist(), "threshold": 0.0,
                 "percentile": COLOUR_PERCENTILE}
    reference["threshold"] = float(torch.quantile(colour_distance(reference, val_images),
                                                  COLOUR_PERCENTILE / 100))
    return reference


def colour_distance(reference, images):
    """Mahalanobis distance of each uint8 image's colour statistics from the training split's."""
    diff = colour_features(images) - torch.tensor(reference["mean"], dtype=torch.float64)
    return torch.einsum("ni,ij,nj->n", diff, torch.tensor(reference["cov_inv"], dtype=torch.float64), diff).sqrt()
