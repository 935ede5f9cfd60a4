"""augment.py: how training batches are augmented, per dataset: flips/rotations, stain and colour jitter.

    import augment; augment.AUGMENTATION["pathmnist"].summary()
    x = augment.apply(x, augment.augmentation("pathmnist"), generator)   # a float [0, 1] batch

The AUGMENTATION table says, per MedMNIST 2D dataset, whether its images have an orientation (no
flips where anatomy has a side or a top) and which intensity jitter its modality calls for, each with
its reason; train.py's --flips/--stain-jitter/--colour-jitter override any of it. Everything works on
whole batches on the batch's device, drawing from a seeded torch.Generator, so a run is reproducible.
"""
from dataclasses import dataclass

import torch

from datasets import FLAGS, DataError, flag_info


@dataclass(frozen=True)
class Augmentation:
    """How training batches of one dataset are augmented: the 8 flips/rotations or none, and the
    strengths (0 = off, 1 = default ranges) of HED stain jitter, per-channel colour jitter and
    random translation (`shift`: 1 = up to SHIFT_SHARE of the image side in each direction)."""
    flips: bool
    stain: float
    colour: float
    why: str
    shift: float = 0.0

    def summary(self):
        return (f"flips/rotations {'on' if self.flips else 'off'}, stain jitter {self.stain:g}, "
                f"colour jitter {self.colour:g}, shift {self.shift:g}")


# Every dataset is shifted a little (shift 1: up to 1/14 of the side, 2 px at 28): no MedMNIST
# modality's label changes when the image moves by a few pixels, and it is the regulariser that
# helped most on the one real file this project can train on (RetinaMNIST; docs/RESULTS.md).
SHIFT = 1.0
SHIFT_SHARE = 1 / 14
# The default per dataset; train.py's --flips/--stain-jitter/--colour-jitter/--shift override any of it.
AUGMENTATION = {
    "pathmnist": Augmentation(True, 1.0, 1.0, "H&E tissue has no orientation; the test split is "
                              "another centre's stain, so HED stain jitter plus scanner colour balance"),
    "bloodmnist": Augmentation(True, 0.0, 1.0, "cells in a smear have no orientation; May-Grunwald-Giemsa, "
                               "not H&E, so colour jitter for stain and microscope, no HED"),
    "dermamnist": Augmentation(True, 0.0, 1.0, "a dermoscopy photo has no up or side; colour varies "
                               "with camera and lighting"),
    "tissuemnist": Augmentation(True, 0.0, 1.0, "kidney cortex cells have no orientation; brightness "
                                "varies with the microscope"),
    "retinamnist": Augmentation(False, 0.0, 1.0, "a fundus has a side (optic disc, macula, left or "
                                "right eye), so no flips; fundus cameras differ in colour"),
    "octmnist": Augmentation(False, 0.0, 1.0, "an OCT B-scan has a top (vitreous above the retinal "
                             "layers), so no flips; brightness varies by device"),
    "pneumoniamnist": Augmentation(False, 0.0, 1.0, "a chest X-ray has a side (the heart on the "
                                   "left) and a top; exposure varies, so brightness/contrast jitter"),
    "chestmnist": Augmentation(False, 0.0, 1.0, "a chest X-ray has a side (the heart on the left) and "
                               "a top; exposure varies, so brightness/contrast jitter"),
    "breastmnist": Augmentation(False, 0.0, 1.0, "an ultrasound image has a top (the transducer) and "
                                "depth runs down; gain varies by device"),
    "organamnist": Augmentation(False, 0.0, 0.0, "CT anatomy has a side (liver right, spleen left); "
                                "intensities are Hounsfield units windowed alike for every scan"),
    "organcmnist": Augmentation(False, 0.0, 0.0, "CT anatomy has a side (liver right, spleen left); "
                                "intensities are Hounsfield units windowed alike for every scan"),
    "organsmnist": Augmentation(False, 0.0, 0.0, "CT anatomy has a front and a top; intensities are "
                                "Hounsfield units windowed alike for every scan"),
}
AUGMENTATION = {flag: Augmentation(a.flips, a.stain, a.colour, a.why, SHIFT) for flag, a in AUGMENTATION.items()}
assert set(AUGMENTATION) == set(FLAGS), "every 2D flag needs a row in AUGMENTATION"


def augmentation(flag, flips=None, stain=None, colour=None, shift=None):
    """The dataset's default Augmentation with any of its fields overridden (None keeps the default).
    HED stain jitter needs RGB images: it is refused for a 1-channel dataset."""
    default = AUGMENTATION[flag]
    aug = Augmentation(default.flips if flips is None else flips,
                       default.stain if stain is None else stain,
                       default.colour if colour is None else colour, default.why,
                       default.shift if shift is None else shift)
    if aug.stain > 0 and flag_info(flag)["n_channels"] != 3:
        raise DataError(f"HED stain jitter (--stain-jitter {aug.stain}) works on RGB H&E images; "
                        f"{flag} has 1 channel. Use --colour-jitter for brightness/contrast instead.")
    return aug


NONE = Augmentation(False, 0.0, 0.0, "evaluation")


def apply(x, augment, generator):
    """A float [0, 1] batch augmented as `augment` says: a random one of the 8 flips/rotations, a
    random shift, then stain and/or colour jitter, drawn from `generator`."""
    if augment.flips:
        x = random_dihedral(x, generator)
    if augment.shift > 0:
        x = random_shift(x, generator, max(1, round(augment.shift * SHIFT_SHARE * x.shape[-1])))
    if augment.stain > 0 or augment.colour > 0:
        x = colour_jitter(x, generator, augment.colour, augment.stain)
    return x


def dihedral(x, k):
    """The k-th (0..7) of the 8 flips/rotations of square images: rot90 k%4 times, then flip if k>=4."""
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return x.flip(-1) if k >= 4 else x


def random_dihedral(x, generator):
    """A random element of the dihedral group per image, from three random reflections.

    Transpose, vertical and horizontal flips generate all 8 symmetries of a square, so three masked
    selects cover the group exactly, without per-image Python loops.
    """
    def pick():
        return (torch.rand(len(x), generator=generator) < 0.5).view(-1, 1, 1, 1).to(x.device)
    x = torch.where(pick(), x.transpose(-2, -1), x)
    x = torch.where(pick(), x.flip(-2), x)
    return torch.where(pick(), x.flip(-1), x)


def random_shift(x, generator, pixels):
    """Each image moved by its own random offset of up to `pixels` in each direction, the border
    filled by reflection (no black edges, which no real image has)."""
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pixels,) * 4, mode="reflect")
    offsets = torch.randint(0, 2 * pixels + 1, (2, b), generator=generator).to(x.device)
    rows = (offsets[0][:, None] + torch.arange(h, device=x.device)).view(b, 1, h, 1)
    cols = (offsets[1][:, None] + torch.arange(w, device=x.device)).view(b, 1, 1, w)
    x = padded.gather(2, rows.expand(b, c, h, padded.shape[3]))
    return x.gather(3, cols.expand(b, c, h, w))


# Ruifrok & Johnston's H&E-DAB stain vectors (the ones skimage.color.rgb2hed uses).
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)


def colour_jitter(x, generator, colour=1.0, stain=0.0):
    """HED stain jitter of strength `stain` (RGB H&E only), then per-channel scale and shift of
    strength `colour` (on 1 channel: brightness and contrast); 1.0 = the default ranges, 0 = off.

    PathMNIST's test split comes from another clinical centre with a different stain; published
    results name colour shift as the main source of test errors (stroma read as smooth muscle). HED
    jitter (Tellez et al., 2019) varies haematoxylin and eosin amounts as a real stain does; the
    per-channel scale/shift covers scanner colour balance and, elsewhere, exposure and gain.
    """
    b, c = len(x), x.shape[1]

    def uniform(half_width, strength):
        u = torch.rand((b, c, 1, 1), generator=generator) * 2 - 1
        return (u * half_width * strength).to(x.device)

    if stain > 0:
        od = -torch.log(x.clamp_min(1e-6))                      # optical density per RGB channel
        hed = torch.einsum("bchw,cd->bdhw", od, HED_FROM_RGB.to(x.device))
        hed = hed * (1 + uniform(0.05, stain)) + uniform(0.05, stain)
        x = torch.exp(-torch.einsum("bchw,cd->bdhw", hed, RGB_FROM_HED.to(x.device)))
    if colour > 0:
        x = x * (1 + uniform(0.1, colour)) + uniform(0.05, colour)
    return x.clamp_(0, 1)
