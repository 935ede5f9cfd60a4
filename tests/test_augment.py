"""augment.py: flips/rotations, stain and colour jitter, the table per dataset, and the jitter measured on real H&E."""
import numpy as np
import pytest
import torch

import augment
import colour
import data
import datasets


def test_random_dihedral_gives_exactly_one_of_the_eight_symmetries():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 8, 8)
    y = augment.random_dihedral(x, g)
    seen = set()
    for xi, yi in zip(x, y, strict=True):
        matches = [k for k in range(8) if torch.equal(augment.dihedral(xi, k), yi)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == set(range(8))


def test_the_eight_dihedral_transforms_are_distinct_and_invertible():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    outs = [augment.dihedral(x, k) for k in range(8)]
    assert len({o.numpy().tobytes() for o in outs}) == 8
    for o in outs:  # each is a permutation of the pixels within every channel
        assert torch.equal(o.flatten(2).sort(-1).values, x.flatten(2).sort(-1).values)


def test_colour_jitter_changes_colours_and_keeps_shape():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 28, 28)
    y = augment.colour_jitter(x.clone(), g, colour=3.0, stain=3.0)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert (y - x).abs().mean() > 0.01  # it does change colours


def test_colour_jitter_of_strength_zero_is_the_identity():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 8, 8) * 0.98 + 0.01
    assert torch.allclose(augment.colour_jitter(x.clone(), g, colour=0.0, stain=0.0), x, atol=1e-5)


def test_every_flag_has_an_augmentation_row_with_a_reason():
    assert set(augment.AUGMENTATION) == set(datasets.FLAGS)
    assert all(len(a.why) > 30 for a in augment.AUGMENTATION.values())
    # HED stain jitter is for H&E alone; anatomy with a side is never flipped.
    assert [f for f, a in augment.AUGMENTATION.items() if a.stain > 0] == ["pathmnist"]
    assert not any(augment.AUGMENTATION[f].flips for f in ("chestmnist", "pneumoniamnist", "organamnist",
                                                        "organcmnist", "organsmnist"))


def test_augmentation_defaults_can_be_overridden_one_field_at_a_time():
    aug = augment.augmentation("chestmnist", flips=True)
    assert (aug.flips, aug.stain, aug.colour) == (True, 0.0, augment.AUGMENTATION["chestmnist"].colour)


def test_stain_jitter_is_refused_for_a_one_channel_flag():
    with pytest.raises(data.DataError, match="1 channel"):
        augment.augmentation("pneumoniamnist", stain=1.0)


def test_colour_jitter_on_one_channel_changes_brightness_and_keeps_the_shape():
    x = torch.full((64, 1, 4, 4), 0.5)
    y = augment.colour_jitter(x.clone(), torch.Generator().manual_seed(0), colour=1.0)
    assert y.shape == x.shape and y.std() > 0.01 and (y.max() - y.min()) < 0.2


def od_chromaticity(x):
    """Per image, the mean share of each RGB channel in the optical density (OD = -ln I) of its
    tissue pixels (total OD > 0.3; glass and fat left out): the stain's hue in OD space, free of how
    much tissue there is. Returns (chromaticity (N, 3), tissue share (N,))."""
    od = -torch.log(x.clamp_min(1 / 255))
    total = od.sum(1, keepdim=True)
    tissue = (total > 0.3).float()
    return (od / total.clamp_min(1e-6) * tissue).sum((2, 3)) / tissue.sum((2, 3)).clamp_min(1), tissue.mean((1, 2, 3))


@pytest.fixture(scope="module")
def real_he(realdata):
    """The OD hue of real H&E: its range over the tissue-rich images of both centres and PathMNIST,
    the shift between the two centres' mean hues (L1), and the tissue-rich real PathMNIST images."""
    import tiles
    folders = ("nct-crc-he-100k", "crc-val-he-7k", "pathmnist-28")
    files = [f for folder in folders for f in sorted((realdata / folder).iterdir())]
    images = colour.to_unit(torch.stack([tiles.read_tile(f, 28).image for f in files]))
    chroma, tissue = od_chromaticity(images)
    rich = tissue >= 0.5
    source = np.array([f.parent.name for f in files])
    centre = {folder: chroma[rich & torch.from_numpy(source == folder)].mean(0) for folder in folders[:2]}
    return {"lo": chroma[rich].min(0).values, "hi": chroma[rich].max(0).values,
            "centre_shift": float((centre[folders[0]] - centre[folders[1]]).abs().sum()),
            "images": images[rich & torch.from_numpy(source == folders[2])]}


def jittered_chromaticity(real_he, **strengths):
    """(original, jittered) OD hue of 20 jittered copies of each real PathMNIST image."""
    images = real_he["images"].repeat(20, 1, 1, 1)
    jittered = augment.colour_jitter(images.clone(), torch.Generator().manual_seed(0), **strengths)
    return od_chromaticity(images)[0], od_chromaticity(jittered)[0]


def share_inside(real_he, margin, **strengths):
    _, chroma = jittered_chromaticity(real_he, **strengths)
    inside = (chroma >= real_he["lo"] - margin) & (chroma <= real_he["hi"] + margin)
    return inside.all(1).float().mean().item()


def test_hed_stain_jitter_keeps_real_tissue_within_the_stain_range_of_two_centres(real_he):
    # Measured: 99% of jittered tissue-rich PathMNIST images stay inside the OD-hue range that the
    # 74 tissue-rich real images of NCT-CRC-HE-100K, CRC-VAL-HE-7K and PathMNIST span (91% at strength 3).
    assert share_inside(real_he, 0.0, colour=0.0, stain=1.0) >= 0.9


def test_hed_stain_jitter_moves_the_hue_a_quarter_to_half_the_way_from_one_centre_to_the_other(real_he):
    # Measured: a mean L1 hue change of 0.026 against 0.092 between the two centres' mean hues (0.28
    # of it): the default jitter covers part of the centre shift, not all of it.
    before, after = jittered_chromaticity(real_he, colour=0.0, stain=1.0)
    change = float((after - before).abs().sum(1).mean())
    assert 0.2 * real_he["centre_shift"] < change <= 0.5 * real_he["centre_shift"]


def test_pathmnists_default_augmentation_stays_near_real_h_and_e_colours(real_he):
    # The per-channel scale/shift moves the OD hue more than the stain jitter (82% stay inside the
    # exact range); within 0.1 of it: 99% at the defaults, 92% at strength 2, 82% at strength 3.
    default = augment.AUGMENTATION["pathmnist"]
    assert share_inside(real_he, 0.1, colour=default.colour, stain=default.stain) >= 0.97


def test_a_shift_moves_each_image_by_its_own_offset_and_reflects_the_border():
    x = torch.rand(64, 3, 10, 10)
    y = augment.random_shift(x, torch.Generator().manual_seed(0), 2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")  # worked out here, not by the code
    offsets = []
    for i in range(len(x)):
        found = [(dy, dx) for dy in range(5) for dx in range(5)
                 if torch.equal(padded[i, :, dy:dy + 10, dx:dx + 10], y[i])]
        assert len(found) == 1
        offsets.append(found[0])
    assert len(set(offsets)) > 10  # per image, not one offset for the batch
    assert {dy for dy, _ in offsets} == set(range(5)) and {dx for _, dx in offsets} == set(range(5))


def test_every_dataset_is_shifted_by_default_by_a_fourteenth_of_the_side():
    assert all(a.shift == 1.0 for a in augment.AUGMENTATION.values())
    x = torch.zeros(200, 1, 28, 28)
    x[:, :, 14, 14] = 1  # one bright pixel in the middle
    shift_only = augment.Augmentation(False, 0.0, 0.0, "shift only", shift=1.0)
    y = augment.apply(x, shift_only, torch.Generator().manual_seed(0))
    rows, cols = (y[:, 0] == 1).nonzero()[:, 1:].T
    assert rows.min() == 12 and rows.max() == 16 and cols.min() == 12 and cols.max() == 16  # 28 / 14 = 2 px
    assert augment.augmentation("pathmnist", shift=0.0).shift == 0.0
