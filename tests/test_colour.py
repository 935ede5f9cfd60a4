"""colour.py: the normalisation statistics of a split."""
import numpy as np
import torch

import colour


def test_channel_stats_match_the_direct_computation():
    images = torch.randint(0, 256, (50, 3, 6, 6), dtype=torch.uint8)
    mean, std = colour.channel_stats(images, chunk=7)
    x = images.double() / 255
    assert np.allclose(mean, x.mean(dim=(0, 2, 3)).tolist())
    assert np.allclose(std, x.std(dim=(0, 2, 3), unbiased=False).tolist())
