"""data.py: npz validation, MD5/download handling, augmentation symmetries, synthetic data."""
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

import data

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- npz validation

def test_valid_npz_loads_as_uint8_nchw_tensors(tmp_path, make_npz):
    splits = data.read_npz(make_npz(tmp_path / "ok.npz", n=5), 28, 9)
    assert splits["train"].images.shape == (5, 3, 28, 28)
    assert splits["train"].images.dtype == torch.uint8
    assert splits["test"].labels.dtype == torch.int64 and splits["test"].labels.shape == (5,)


def test_pixels_keep_their_channel_after_the_layout_change(tmp_path, make_npz):
    img = np.zeros((1, 28, 28, 3), np.uint8)
    img[0, 2, 5] = (10, 20, 30)
    splits = data.read_npz(make_npz(tmp_path / "px.npz", n=1, train_images=img), 28, 9)
    assert splits["train"].images[0, :, 2, 5].tolist() == [10, 20, 30]


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        data.read_npz(tmp_path / "nope.npz", 28, 9)


def test_truncated_npz_is_a_data_error(tmp_path, make_npz):
    path = make_npz(tmp_path / "t.npz")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(data.DataError, match="truncated"):
        data.read_npz(path, 28, 9)


def test_file_that_is_not_a_zip_is_a_data_error(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(b"this is not an npz" * 100)
    with pytest.raises(data.DataError, match="could not be read"):
        data.read_npz(path, 28, 9)


def test_missing_key_is_named(tmp_path, make_npz):
    path = make_npz(tmp_path / "k.npz", val_labels=None)
    with pytest.raises(data.DataError, match="val_labels"):
        data.read_npz(path, 28, 9)


def test_float_images_are_refused(tmp_path, make_npz):
    path = make_npz(tmp_path / "f.npz", train_images=np.zeros((6, 28, 28, 3), np.float32))
    with pytest.raises(data.DataError, match="expected uint8"):
        data.read_npz(path, 28, 9)


def test_image_size_must_match_the_size_flag(tmp_path, make_npz):
    path = make_npz(tmp_path / "s.npz", size=28)
    with pytest.raises(data.DataError, match="--size"):
        data.read_npz(path, 64, 9)


def test_channel_first_images_are_refused(tmp_path, make_npz):
    path = make_npz(tmp_path / "c.npz", test_images=np.zeros((6, 3, 28, 28), np.uint8))
    with pytest.raises(data.DataError, match=r"\(N, 28, 28, 3\)"):
        data.read_npz(path, 28, 9)


def test_label_count_must_match_image_count(tmp_path, make_npz):
    path = make_npz(tmp_path / "n.npz", train_labels=np.zeros((5, 1), np.int64))
    with pytest.raises(data.DataError, match="one per image"):
        data.read_npz(path, 28, 9)


def test_float_labels_are_refused(tmp_path, make_npz):
    path = make_npz(tmp_path / "fl.npz", train_labels=np.zeros((6, 1), np.float64))
    with pytest.raises(data.DataError, match="integers"):
        data.read_npz(path, 28, 9)


@pytest.mark.parametrize("bad", [9, -1])
def test_labels_out_of_range_are_refused(tmp_path, bad, make_npz):
    labels = np.zeros((6, 1), np.int64)
    labels[3] = bad
    path = make_npz(tmp_path / "r.npz", val_labels=labels)
    with pytest.raises(data.DataError, match="0 to 8"):
        data.read_npz(path, 28, 9)


def test_mask_of_the_wrong_shape_is_refused(tmp_path, make_npz):
    path = make_npz(tmp_path / "m.npz", train_masks=np.zeros((6, 14, 14), np.uint8))
    with pytest.raises(data.DataError, match="train_masks"):
        data.read_npz(path, 28, 9)


# ----------------------------------------------------------------------------- real file handling

def test_urls_and_md5s_come_from_medmnist_info():
    name, url, md5 = data.real_source(64)
    assert name == "pathmnist_64.npz"
    assert url == data.INFO["url_64"] and md5 == data.INFO["MD5_64"]
    assert data.real_source(28)[0] == "pathmnist.npz"


def test_unknown_size_is_a_data_error():
    with pytest.raises(data.DataError, match="28, 64, 128, 224"):
        data.real_source(32)


def test_md5_mismatch_is_refused_with_the_expected_md5(tmp_path, make_npz):
    make_npz(tmp_path / "pathmnist.npz")
    with pytest.raises(data.DataError, match=data.INFO["MD5"]):
        data.fetch(tmp_path, 28)


def test_failed_download_explains_the_manual_route_and_the_demo(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(data, "download_url", offline)
    with pytest.raises(data.DataError) as err:
        data.fetch(tmp_path, 28)
    msg = str(err.value)
    assert data.INFO["url"] in msg and data.INFO["MD5"] in msg and "make demo" in msg
    assert list(tmp_path.iterdir()) == []  # no partial file left behind


def test_failed_download_never_falls_back_to_synthetic_data(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "download_url", lambda *a, **k: (_ for _ in ()).throw(OSError("down")))
    with pytest.raises(data.DataError):
        data.load(tmp_path, 28, synthetic=False)
    assert not (tmp_path / data.synthetic_file_name(28)).exists()


def test_a_download_with_the_wrong_md5_leaves_no_file_behind(tmp_path, monkeypatch):
    def corrupt_download(url, root, filename, md5):
        (tmp_path / filename).write_bytes(b"half a zip file")
    monkeypatch.setattr(data, "download_url", corrupt_download)
    with pytest.raises(data.DataError, match="MD5 does not match"):
        data.fetch(tmp_path, 28)
    assert list(tmp_path.iterdir()) == []


def test_a_valid_file_is_not_downloaded_again(tmp_path, monkeypatch, make_npz):
    path = make_npz(tmp_path / "pathmnist.npz")
    monkeypatch.setitem(data.INFO, "MD5", data.calculate_md5(path))
    monkeypatch.setattr(data, "download_url", lambda *a, **k: pytest.fail("downloaded again"))
    ds = data.load(tmp_path, 28)
    assert ds.provenance() == {"dataset": "pathmnist", "size": 28, "synthetic": False,
                               "file": "pathmnist.npz", "md5": data.calculate_md5(path)}


def test_download_is_verified_then_renamed_into_place(tmp_path, monkeypatch, make_npz):
    source = make_npz(tmp_path / "source.npz")
    monkeypatch.setitem(data.INFO, "MD5", data.calculate_md5(source))

    def fake_download(url, root, filename, md5):
        (tmp_path / "d" / filename).write_bytes(source.read_bytes())
    monkeypatch.setattr(data, "download_url", fake_download)
    (tmp_path / "d").mkdir()
    assert data.fetch(tmp_path / "d", 28) == tmp_path / "d" / "pathmnist.npz"
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [data.MD5_CACHE, "pathmnist.npz"]


# ----------------------------------------------------------------------------- augmentation

def test_random_dihedral_gives_exactly_one_of_the_eight_symmetries():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 8, 8)
    y = data.random_dihedral(x, g)
    seen = set()
    for xi, yi in zip(x, y):
        matches = [k for k in range(8) if torch.equal(data.dihedral(xi, k), yi)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == set(range(8))


def test_the_eight_dihedral_transforms_are_distinct_and_invertible():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    outs = [data.dihedral(x, k) for k in range(8)]
    assert len({o.numpy().tobytes() for o in outs}) == 8
    for o in outs:  # each is a permutation of the pixels within every channel
        assert torch.equal(o.flatten(2).sort(-1).values, x.flatten(2).sort(-1).values)


def test_colour_jitter_changes_colours_and_keeps_shape():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 28, 28)
    y = data.colour_jitter(x.clone(), g, strength=3.0)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert (y - x).abs().mean() > 0.01  # it does change colours


def test_colour_jitter_of_strength_zero_is_the_identity():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 8, 8) * 0.98 + 0.01
    assert torch.allclose(data.colour_jitter(x.clone(), g, strength=0.0), x, atol=1e-5)


def test_augmented_batches_keep_shape_and_labels():
    # Each image is one flat colour that encodes its label; flips/rotations must not move labels.
    labels = torch.arange(40) % 9
    images = (labels * 20 + 30).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 12, 12).contiguous()
    split = data.Split(images, labels)
    g = torch.Generator().manual_seed(1)
    seen = []
    for x, y in data.batches(split, 16, generator=g, colour=0.0):
        assert x.shape[1:] == (3, 12, 12) and x.dtype == torch.float32
        assert torch.equal(((x[:, 0, 0, 0] * 255).round() - 30) / 20, y.float())
        seen.append(y)
    assert sorted(torch.cat(seen).tolist()) == sorted(labels.tolist())


def test_unshuffled_batches_keep_the_order_and_skip_augmentation():
    images = torch.randint(0, 256, (10, 3, 5, 5), dtype=torch.uint8)
    split = data.Split(images, torch.arange(10))
    x = torch.cat([b for b, _ in data.batches(split, 3)])
    assert torch.equal(x, images.float() / 255)


def test_channel_stats_match_the_direct_computation():
    images = torch.randint(0, 256, (50, 3, 6, 6), dtype=torch.uint8)
    mean, std = data.channel_stats(images, chunk=7)
    x = images.double() / 255
    assert np.allclose(mean, x.mean(dim=(0, 2, 3)).tolist())
    assert np.allclose(std, x.std(dim=(0, 2, 3), unbiased=False).tolist())


# ----------------------------------------------------------------------------- synthetic data

def test_synthetic_npz_has_medmnist_keys_dtypes_and_layout(tmp_path):
    path = tmp_path / "syn.npz"
    data.write_synthetic(path, 28, counts={"train": 20, "val": 5, "test": 5})
    with np.load(path) as npz:
        for split, n in (("train", 20), ("val", 5), ("test", 5)):
            assert npz[f"{split}_images"].dtype == np.uint8
            assert npz[f"{split}_images"].shape == (n, 28, 28, 3)
            assert np.issubdtype(npz[f"{split}_labels"].dtype, np.integer)
            assert npz[f"{split}_labels"].shape == (n, 1)
            assert npz[f"{split}_masks"].shape == (n, 28, 28)


def test_synthetic_masks_cover_a_minority_of_each_image(tmp_path):
    path = tmp_path / "syn.npz"
    data.write_synthetic(path, 28, counts={"train": 200, "val": 5, "test": 5})
    masks = data.read_npz(path, 28, 9)["train"].masks.float().mean(dim=(1, 2))
    assert masks.min() >= 0.1 and masks.max() <= 0.4


def test_synthetic_evidence_lies_inside_the_mask(tmp_path):
    # Outside the mask, class means are alike; inside, they differ: the class lives in the mask.
    path = tmp_path / "syn.npz"
    data.write_synthetic(path, 28, counts={"train": 900, "val": 5, "test": 5})
    s = data.read_npz(path, 28, 9)["train"]
    x, m = s.images.float(), s.masks[:, None].float()
    inside = (x * m).sum((2, 3)) / m.sum((2, 3))
    outside = (x * (1 - m)).sum((2, 3)) / (1 - m).sum((2, 3))
    spread = lambda v: torch.stack([v[s.labels == c].mean(0) for c in range(9)]).std(0).mean()
    assert spread(inside) > 5 * spread(outside)


def test_synthetic_size_64_is_written_at_that_size(tmp_path):
    path = tmp_path / "syn64.npz"
    data.write_synthetic(path, 64, counts={"train": 4, "val": 2, "test": 2})
    assert data.read_npz(path, 64, 9)["val"].images.shape == (2, 3, 64, 64)


def test_synthetic_dataset_is_named_synthetic_everywhere(syn_dir):
    ds = data.load(syn_dir, 28, synthetic=True)
    assert ds.synthetic and "synthetic" in ds.name and "synthetic" in ds.provenance()["file"]
    assert all(name.startswith("synthetic") for name in ds.class_names)


# ----------------------------------------------------------------------------- memory maps and the MD5 cache

def test_mapped_images_equal_the_npz_arrays(tmp_path, make_npz):
    path = make_npz(tmp_path / "m.npz", n=7)
    in_memory = data.read_npz(path, 28, 9)
    mapped = data.read_npz(path, 28, 9, mapped_md5="abc")
    arrays = np.load(path)
    for s in data.SPLITS:
        assert torch.equal(mapped[s].images, in_memory[s].images) and torch.equal(mapped[s].labels, in_memory[s].labels)
        assert np.array_equal(mapped[s].images.numpy(), arrays[f"{s}_images"].transpose(0, 3, 1, 2))
    assert isinstance(mapped["train"].images.numpy().base, np.memmap) or mapped["train"].images.numpy().base is not None


def test_auto_maps_only_above_the_size_limit(tmp_path, make_npz, monkeypatch):
    path = make_npz(tmp_path / "m.npz", n=10)  # 3 x 10 x 2,352 bytes of pixels
    assert not data.use_map(path, "auto") and data.use_map(path, "map") and not data.use_map(path, "ram")
    monkeypatch.setattr(data, "MAP_ABOVE_BYTES", 3 * 10 * 2352 - 1)
    assert data.use_map(path, "auto")


def test_an_interrupted_conversion_leaves_no_file_and_is_redone(tmp_path, make_npz, monkeypatch):
    path = make_npz(tmp_path / "m.npz", n=40)
    monkeypatch.setattr(data, "CONVERT_CHUNK_BYTES", 28 * 28 * 3 * 8)  # 5 chunks

    def interrupted(chunks, **kwargs):
        yield next(iter(chunks))
        raise KeyboardInterrupt
    monkeypatch.setattr(data, "progress", interrupted)
    with pytest.raises(KeyboardInterrupt):
        data.mapped_images(path, "abc", "train", 28)
    folder = tmp_path / ".mapped" / "m-abc"
    assert list(folder.iterdir()) == []  # neither the .npy nor a temporary file
    monkeypatch.undo()
    images = data.mapped_images(path, "abc", "train", 28)
    assert np.array_equal(images.numpy(), np.load(path)["train_images"].transpose(0, 3, 1, 2))


def test_a_changed_npz_gets_a_new_conversion_and_the_old_one_goes(tmp_path, make_npz):
    path = make_npz(tmp_path / "m.npz", n=5)
    old = data.mapped_images(path, data.verified_md5(path), "val", 28).clone()
    make_npz(path, n=5, val_images=np.full((5, 28, 28, 3), 7, np.uint8))
    new = data.mapped_images(path, data.verified_md5(path), "val", 28)
    assert new.unique().tolist() == [7] and not torch.equal(old, new)
    assert [p.name for p in (tmp_path / ".mapped").iterdir()] == [f"m-{data.verified_md5(path)}"]


def test_converting_holds_a_chunk_in_memory_not_the_file(tmp_path):
    # Peak resident memory of converting a 17 MB and a 170 MB member, each in a fresh process with
    # 4 MB chunks: the larger file may not cost more than a few chunks more.
    def peak_kb(n):
        npz = tmp_path / f"big{n}.npz"
        np.savez(npz, train_images=np.zeros((n, 28, 28, 3), np.uint8))
        code = ("import resource, data\n"
                "data.CONVERT_CHUNK_BYTES = 4 << 20\n"
                f"data.convert_images({str(npz)!r}, 'train_images', {str(tmp_path / f'out{n}.npy')!r}, 28)\n"
                "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        npz.unlink()
        return int(result.stdout.split()[-1])
    small, large = peak_kb(7_000), peak_kb(70_000)
    assert (tmp_path / "out70000.npy").stat().st_size > 160e6
    assert large - small < 30_000  # KB: 150 MB more data, under 30 MB more memory


def test_the_md5_is_computed_once_until_the_file_changes(tmp_path, make_npz, monkeypatch):
    path = make_npz(tmp_path / "m.npz")
    calls = []
    real = data.calculate_md5
    monkeypatch.setattr(data, "calculate_md5", lambda p: calls.append(p) or real(p))
    first = data.verified_md5(path)
    assert data.verified_md5(path) == first and len(calls) == 1
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # touched
    assert data.verified_md5(path) == first and len(calls) == 2
    make_npz(path, n=3)  # rewritten
    assert data.verified_md5(path) != first and len(calls) == 3


def test_a_missing_member_is_named_when_mapping_too(tmp_path, make_npz):
    path = make_npz(tmp_path / "k.npz", val_images=None)
    with pytest.raises(data.DataError, match="lacks \\['val_images'\\]"):
        data.read_npz(path, 28, 9, mapped_md5="abc")
