"""colour.py: the normalisation statistics of a split."""
import numpy as np
import torch

import budget
import colour


def test_channel_stats_match_the_direct_computation():
    images = torch.randint(0, 256, (50, 3, 6, 6), dtype=torch.uint8)
    mean, std = colour.channel_stats(images, chunk=7)
    x = images.double() / 255
    assert np.allclose(mean, x.mean(dim=(0, 2, 3)).tolist())
    assert np.allclose(std, x.std(dim=(0, 2, 3), unbiased=False).tolist())


def largest_chunk(monkeypatch, work_bytes, compute):
    """Run `compute` with WORK_BYTES set to `work_bytes`; the most images colour.to_unit was handed at once."""
    seen, real = [], colour.to_unit
    monkeypatch.setattr(budget, "WORK_BYTES", work_bytes)
    monkeypatch.setattr(colour, "to_unit", lambda x: seen.append(len(x)) or real(x))
    result = compute()
    return max(seen), result


def test_split_statistics_never_hold_more_than_the_byte_budget_in_float(monkeypatch):
    images = torch.randint(0, 256, (40, 3, 64, 64), dtype=torch.uint8)  # 12,288 values an image
    limit = 1 << 20
    rows, _ = largest_chunk(monkeypatch, limit, lambda: colour.channel_stats(images))
    assert rows * 12_288 * 20 <= limit and rows >= 1  # float32, float64 and its square
    rows, _ = largest_chunk(monkeypatch, limit, lambda: colour.colour_features(images))
    assert rows * 12_288 * 12 <= limit


def test_byte_chunks_move_the_statistics_by_float64_rounding_only(monkeypatch):
    images = torch.randint(0, 256, (40, 3, 64, 64), dtype=torch.uint8)
    whole_mean, whole_std = colour.channel_stats(images, chunk=len(images))
    _, (mean, std) = largest_chunk(monkeypatch, 1 << 20, lambda: colour.channel_stats(images))
    assert np.allclose(mean, whole_mean, rtol=1e-14, atol=0) and np.allclose(std, whole_std, rtol=1e-12, atol=0)
    assert np.float32(mean).tolist() == np.float32(whole_mean).tolist()  # what the model's buffers hold
    _, feats = largest_chunk(monkeypatch, 1 << 20, lambda: colour.colour_features(images))
    assert torch.equal(feats, colour.colour_features(images, chunk=len(images)))  # per image: exactly equal
