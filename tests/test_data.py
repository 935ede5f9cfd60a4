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
    assert ds.provenance() == {"dataset": "pathmnist", "flag": "pathmnist", "size": 28, "synthetic": False,
                               "file": "pathmnist.npz", "md5": data.calculate_md5(path), "verified": True}


def test_download_is_verified_then_renamed_into_place(tmp_path, monkeypatch, make_npz):
    source = make_npz(tmp_path / "source.npz")
    monkeypatch.setitem(data.INFO, "MD5", data.calculate_md5(source))

    def fake_download(url, root, filename, md5):
        (tmp_path / "d" / filename).write_bytes(source.read_bytes())
    monkeypatch.setattr(data, "download_url", fake_download)
    (tmp_path / "d").mkdir()
    assert data.fetch(tmp_path / "d", 28) == tmp_path / "d" / "pathmnist.npz"
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["pathmnist.npz"]  # no cache beside it


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
    y = data.colour_jitter(x.clone(), g, colour=3.0, stain=3.0)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert (y - x).abs().mean() > 0.01  # it does change colours


def test_colour_jitter_of_strength_zero_is_the_identity():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 8, 8) * 0.98 + 0.01
    assert torch.allclose(data.colour_jitter(x.clone(), g, colour=0.0, stain=0.0), x, atol=1e-5)


def test_augmented_batches_keep_shape_and_labels():
    # Each image is one flat colour that encodes its label; flips/rotations must not move labels.
    labels = torch.arange(40) % 9
    images = (labels * 20 + 30).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 12, 12).contiguous()
    split = data.Split(images, labels)
    g = torch.Generator().manual_seed(1)
    seen = []
    for x, y in data.batches(split, 16, generator=g, augment=data.Augmentation(True, 0.0, 0.0, "flips only")):
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
    mapped = data.read_npz(path, 28, 9, mapped_md5=data.calculate_md5(path))
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
        data.mapped_images(path, data.calculate_md5(path), "train", data.ImageShape(28, 3))
    folder = data.mapped_folder(path, data.calculate_md5(path))
    assert list(folder.iterdir()) == []  # neither the .npy nor a temporary file
    monkeypatch.undo()
    images = data.mapped_images(path, data.calculate_md5(path), "train", data.ImageShape(28, 3))
    assert np.array_equal(images.numpy(), np.load(path)["train_images"].transpose(0, 3, 1, 2))


def test_a_changed_npz_gets_a_new_conversion_and_the_old_one_goes(tmp_path, make_npz):
    path = make_npz(tmp_path / "m.npz", n=5)
    old = data.mapped_images(path, data.verified_md5(path), "val", data.ImageShape(28, 3)).clone()
    make_npz(path, n=5, val_images=np.full((5, 28, 28, 3), 7, np.uint8))
    new = data.mapped_images(path, data.verified_md5(path), "val", data.ImageShape(28, 3))
    assert new.unique().tolist() == [7] and not torch.equal(old, new)
    of_this_file = [p.name for p in data.mapped_folder(path, "x").parent.glob("m-*")
                    if (p / "source").is_file() and (p / "source").read_text() == str(path.resolve())]
    assert of_this_file == [f"m-{data.verified_md5(path)}"]


def test_loading_with_memory_maps_writes_nothing_beside_the_data(tmp_path, make_npz, monkeypatch):
    # The real-data folder is read-only in CI, and a cluster's dataset folder often is: MD5s and
    # conversions go to the cache folder instead.
    folder = tmp_path / "readonly"
    folder.mkdir()
    path = make_npz(folder / "pathmnist.npz")
    monkeypatch.setitem(data.INFO, "MD5", data.calculate_md5(path))
    before = sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir())
    ds = data.load(folder, 28, memory="map")
    assert ds.train.images.shape == (6, 3, 28, 28)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir()) == before
    assert (data.cache_dir() / data.MD5_CACHE).is_file() and any(data.cache_dir().glob("mapped/pathmnist-*/*.npy"))


def test_converting_holds_a_chunk_in_memory_not_the_file(tmp_path):
    # Peak resident memory of converting a 17 MB and a 170 MB member, each in a fresh process with
    # 4 MB chunks: the larger file may not cost more than a few chunks more.
    def peak_kb(n):
        npz = tmp_path / f"big{n}.npz"
        np.savez(npz, train_images=np.zeros((n, 28, 28, 3), np.uint8))
        code = ("import resource, data\n"
                "data.CONVERT_CHUNK_BYTES = 4 << 20\n"
                f"data.convert_images({str(npz)!r}, 'train_images', {str(tmp_path / f'out{n}.npy')!r}, data.ImageShape(28, 3))\n"
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
        data.read_npz(path, 28, 9, mapped_md5=data.calculate_md5(path))


# ----------------------------------------------------------------------------- every MedMNIST 2D flag

def grey_npz(path, n=4, size=28, **override):
    """A tiny 1-channel MedMNIST-format npz: images (N, H, W), as MedMNIST stores grayscale."""
    rng = np.random.default_rng(1)
    arrays = {}
    for split in data.SPLITS:
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 1))
    arrays.update(override)
    np.savez(path, **arrays)
    return path


def test_the_twelve_2d_flags_are_the_ones_medmnist_lists():
    assert set(data.FLAGS) == {"pathmnist", "chestmnist", "dermamnist", "octmnist", "pneumoniamnist",
                               "retinamnist", "breastmnist", "bloodmnist", "tissuemnist", "organamnist",
                               "organcmnist", "organsmnist"}


def test_an_unknown_flag_is_refused_with_the_valid_ones_listed():
    with pytest.raises(data.DataError, match="not a MedMNIST 2D dataset") as err:
        data.flag_info("pathmnistt")
    assert all(flag in str(err.value) for flag in data.FLAGS)


def test_a_3d_flag_is_refused_as_3d():
    with pytest.raises(data.DataError, match="3D MedMNIST dataset") as err:
        data.flag_info("organmnist3d")
    assert "bloodmnist" in str(err.value)


def test_files_urls_and_md5s_of_any_flag_come_from_medmnist_info():
    info = data.medmnist_module("info").INFO["organcmnist"]
    assert data.real_source(128, "organcmnist") == ("organcmnist_128.npz", info["url_128"], info["MD5_128"])
    assert data.class_names_of("bloodmnist")[0] == data.medmnist_module("info").INFO["bloodmnist"]["label"]["0"]


def test_a_grayscale_file_loads_as_one_channel_with_its_pixels_in_place(tmp_path):
    img = np.zeros((4, 28, 28), np.uint8)
    img[1, 3, 7] = 200
    splits = data.read_npz(grey_npz(tmp_path / "g.npz", train_images=img), 28, 2, channels=1)
    assert splits["train"].images.shape == (4, 1, 28, 28)
    assert splits["train"].images[1, 0, 3, 7] == 200 and splits["train"].images.sum() == 200


def test_a_mapped_grayscale_file_equals_the_npz(tmp_path):
    path = grey_npz(tmp_path / "g.npz", n=5)
    mapped = data.read_npz(path, 28, 2, mapped_md5=data.calculate_md5(path), channels=1)
    for s in data.SPLITS:
        assert np.array_equal(mapped[s].images.numpy()[:, 0], np.load(path)[f"{s}_images"])


def test_an_rgb_file_is_refused_for_a_grayscale_flag_and_the_message_names_flag_and_size(tmp_path, make_npz):
    with pytest.raises(data.DataError, match="--flag and --size"):
        data.read_npz(make_npz(tmp_path / "rgb.npz"), 28, 2, channels=1)


def test_a_grayscale_file_is_refused_for_an_rgb_flag(tmp_path):
    with pytest.raises(data.DataError, match=r"expected uint8 \(N, 28, 28, 3\)"):
        data.read_npz(grey_npz(tmp_path / "g.npz"), 28, 9, channels=3)


def test_labels_beyond_the_flags_classes_are_refused_as_another_flags_file(tmp_path):
    labels = np.full((4, 1), 7)  # an organ*mnist label in a breastmnist-shaped file
    with pytest.raises(data.DataError, match="another --flag"):
        data.read_npz(grey_npz(tmp_path / "g.npz", train_labels=labels), 28, 2, channels=1)


def test_multi_label_labels_load_as_rows_of_zeros_and_ones(tmp_path):
    labels = np.array([[0, 1, 1], [0, 0, 0], [1, 0, 0], [1, 1, 1]])
    path = grey_npz(tmp_path / "m.npz", **{f"{s}_labels": labels for s in data.SPLITS})
    split = data.read_npz(path, 28, 3, channels=1, multi_label=True)["val"]
    assert split.labels.shape == (4, 3) and split.labels.tolist() == labels.tolist()


@pytest.mark.parametrize("labels", [np.zeros((4, 1), int), np.full((4, 3), 2)])
def test_multi_label_labels_of_another_shape_or_beyond_one_are_refused(tmp_path, labels):
    path = grey_npz(tmp_path / "m.npz", train_labels=labels)
    with pytest.raises(data.DataError, match="another --flag"):
        data.read_npz(path, 28, 3, channels=1, multi_label=True)


def test_a_file_with_another_md5_is_refused_unless_trusted_and_then_marked_unverified(tmp_path, monkeypatch):
    grey_npz(tmp_path / "breastmnist.npz")
    with pytest.raises(data.DataError, match="--trust-file"):
        data.load(tmp_path, 28, flag="breastmnist")
    ds = data.load(tmp_path, 28, flag="breastmnist", trust_file=True)
    assert ds.provenance()["verified"] is False and ds.channels == 1 and ds.task == "binary-class"
    assert data.describe(ds.provenance()).endswith("(unverified file)")


def test_a_matching_md5_is_verified_even_with_trust_file(tmp_path, monkeypatch):
    path = grey_npz(tmp_path / "breastmnist.npz")
    monkeypatch.setitem(data.ALL_INFO["breastmnist"], "MD5", data.calculate_md5(path))
    ds = data.load(tmp_path, 28, flag="breastmnist", trust_file=True)
    assert ds.provenance()["verified"] is True and "unverified" not in data.describe(ds.provenance())


@pytest.mark.parametrize("flag", data.FLAGS)
def test_synthetic_data_of_a_flag_has_its_channels_classes_and_task(flag, tmp_path):
    info = data.medmnist_module("info").INFO[flag]
    data.write_synthetic(tmp_path / data.synthetic_file_name(28, flag), 28,
                         counts={"train": 300, "val": 5, "test": 5}, flag=flag)
    ds = data.load(tmp_path, 28, synthetic=True, flag=flag)
    k = len(info["label"])
    assert ds.train.images.shape[1] == info["n_channels"] and ds.task == info["task"]
    assert len(ds.class_names) == k and ds.name == f"{flag}-synthetic"
    if info["task"] == data.MULTI_LABEL:
        per_image = ds.train.labels.sum(1)
        assert ds.train.labels.shape == (300, k) and set(per_image.tolist()) == {0, 1, 2}
    else:
        assert set(ds.train.labels.tolist()) == set(range(k))
    assert "SYNTHETIC" in data.describe(ds.provenance()) and info["python_class"] in data.describe(ds.provenance())


def test_multi_label_synthetic_evidence_sits_where_the_labels_say(tmp_path):
    images, labels, masks = data.synthetic_split(np.random.default_rng(0), 200, 28, flag="chestmnist")
    # No finding, no evidence; a second finding is painted in the right half.
    assert masks[labels.sum(1) == 0].sum() == 0 and masks[labels.sum(1) > 0].sum(axis=(1, 2)).min() > 0
    assert masks[labels.sum(1) == 2][:, :, 14:].sum(axis=(1, 2)).min() > 0


def test_every_flag_has_an_augmentation_row_with_a_reason():
    assert set(data.AUGMENTATION) == set(data.FLAGS)
    assert all(len(a.why) > 30 for a in data.AUGMENTATION.values())
    # HED stain jitter is for H&E alone; anatomy with a side is never flipped.
    assert [f for f, a in data.AUGMENTATION.items() if a.stain > 0] == ["pathmnist"]
    assert not any(data.AUGMENTATION[f].flips for f in ("chestmnist", "pneumoniamnist", "organamnist",
                                                        "organcmnist", "organsmnist"))


def test_augmentation_defaults_can_be_overridden_one_field_at_a_time():
    aug = data.augmentation("chestmnist", flips=True)
    assert (aug.flips, aug.stain, aug.colour) == (True, 0.0, data.AUGMENTATION["chestmnist"].colour)


def test_stain_jitter_is_refused_for_a_one_channel_flag():
    with pytest.raises(data.DataError, match="1 channel"):
        data.augmentation("pneumoniamnist", stain=1.0)


def test_without_flips_a_batch_keeps_its_orientation():
    images = torch.arange(2 * 36, dtype=torch.uint8).view(2, 1, 6, 6)
    split = data.Split(images, torch.tensor([0, 1]))
    g = torch.Generator().manual_seed(0)
    x, _ = next(data.batches(split, 2, generator=g, augment=data.Augmentation(False, 0.0, 0.0, "none")))
    order = x.flatten(1).argsort(1)  # the pixel order survives any brightness change
    assert torch.equal(order, images.float().flatten(1).argsort(1))


def test_colour_jitter_on_one_channel_changes_brightness_and_keeps_the_shape():
    x = torch.full((64, 1, 4, 4), 0.5)
    y = data.colour_jitter(x.clone(), torch.Generator().manual_seed(0), colour=1.0)
    assert y.shape == x.shape and y.std() > 0.01 and (y.max() - y.min()) < 0.2


# ----------------------------------------------------------------------------- augmentation on real H&E

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
    images = data.to_unit(torch.stack([tiles.read_image(f, 28)[0] for f in files]))
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
    jittered = data.colour_jitter(images.clone(), torch.Generator().manual_seed(0), **strengths)
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
    default = data.AUGMENTATION["pathmnist"]
    assert share_inside(real_he, 0.1, colour=default.colour, stain=default.stain) >= 0.97


# ----------------------------------------------------------------------------- device placement

def test_a_split_that_fits_the_budget_moves_to_the_device_and_one_that_does_not_stays():
    split = data.Split(torch.zeros(10, 3, 4, 4, dtype=torch.uint8), torch.zeros(10, dtype=torch.long))
    assert data.place(split, "meta", budget_bytes=480).images.device.type == "meta"  # 10*3*4*4 bytes
    kept = data.place(split, "meta", budget_bytes=479)
    assert kept is split and kept.images.device.type == "cpu"


def test_batches_of_a_split_on_another_device_are_cut_there():
    split = data.Split(torch.zeros(10, 3, 4, 4, dtype=torch.uint8), torch.zeros(10, dtype=torch.long))
    x, y = next(data.batches(data.place(split, "meta", 1 << 20), 4, device="meta"))
    assert x.device.type == "meta" and x.shape == (4, 3, 4, 4) and y.device.type == "meta"
