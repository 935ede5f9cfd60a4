"""data.py: npz validation, MD5/download handling, augmentation symmetries, synthetic data."""
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

import augment
import data
import datasets

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


def test_md5_mismatch_is_refused_with_the_expected_md5(tmp_path, make_npz):
    make_npz(tmp_path / "pathmnist.npz")
    with pytest.raises(data.DataError, match=datasets.INFO["MD5"]):
        data.fetch(tmp_path, 28)


def test_failed_download_explains_the_manual_route_and_the_demo(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(data, "download_url", offline)
    with pytest.raises(data.DataError) as err:
        data.fetch(tmp_path, 28)
    msg = str(err.value)
    assert datasets.INFO["url"] in msg and datasets.INFO["MD5"] in msg and "make demo" in msg
    assert list(tmp_path.iterdir()) == []  # no partial file left behind


def test_failed_download_never_falls_back_to_synthetic_data(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "download_url", lambda *a, **k: (_ for _ in ()).throw(OSError("down")))
    with pytest.raises(data.DataError):
        data.load(tmp_path, 28, synthetic=False)
    assert not (tmp_path / datasets.synthetic_file_name(28)).exists()


def test_a_download_with_the_wrong_md5_leaves_no_file_behind(tmp_path, monkeypatch):
    def corrupt_download(url, root, filename, md5):
        (tmp_path / filename).write_bytes(b"half a zip file")
    monkeypatch.setattr(data, "download_url", corrupt_download)
    with pytest.raises(data.DataError, match="MD5 does not match"):
        data.fetch(tmp_path, 28)
    assert list(tmp_path.iterdir()) == []


def test_a_valid_file_is_not_downloaded_again(tmp_path, monkeypatch, make_npz):
    path = make_npz(tmp_path / "pathmnist.npz")
    monkeypatch.setitem(datasets.INFO, "MD5", data.calculate_md5(path))
    monkeypatch.setattr(data, "download_url", lambda *a, **k: pytest.fail("downloaded again"))
    ds = data.load(tmp_path, 28)
    assert ds.provenance() == {"dataset": "pathmnist", "flag": "pathmnist", "size": 28, "synthetic": False,
                               "file": "pathmnist.npz", "md5": data.calculate_md5(path), "verified": True}


def test_download_is_verified_then_renamed_into_place(tmp_path, monkeypatch, make_npz):
    source = make_npz(tmp_path / "source.npz")
    monkeypatch.setitem(datasets.INFO, "MD5", data.calculate_md5(source))

    def fake_download(url, root, filename, md5):
        (tmp_path / "d" / filename).write_bytes(source.read_bytes())
    monkeypatch.setattr(data, "download_url", fake_download)
    (tmp_path / "d").mkdir()
    assert data.fetch(tmp_path / "d", 28) == tmp_path / "d" / "pathmnist.npz"
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["pathmnist.npz"]  # no cache beside it


# ----------------------------------------------------------------------------- batches

def test_augmented_batches_keep_shape_and_labels():
    # Each image is one flat colour that encodes its label; flips/rotations must not move labels.
    labels = torch.arange(40) % 9
    images = (labels * 20 + 30).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 12, 12).contiguous()
    split = data.Split(images, labels)
    g = torch.Generator().manual_seed(1)
    seen = []
    for x, y in data.batches(split, 16, generator=g, augmentation=augment.Augmentation(True, 0.0, 0.0, "flips only")):
        assert x.shape[1:] == (3, 12, 12) and x.dtype == torch.float32
        assert torch.equal(((x[:, 0, 0, 0] * 255).round() - 30) / 20, y.float())
        seen.append(y)
    assert sorted(torch.cat(seen).tolist()) == sorted(labels.tolist())


def test_unshuffled_batches_keep_the_order_and_skip_augmentation():
    images = torch.randint(0, 256, (10, 3, 5, 5), dtype=torch.uint8)
    split = data.Split(images, torch.arange(10))
    x = torch.cat([b for b, _ in data.batches(split, 3)])
    assert torch.equal(x, images.float() / 255)


# ----------------------------------------------------------------------------- memory maps and the MD5 cache

def test_mapped_images_equal_the_npz_arrays(tmp_path, make_npz):
    path = make_npz(tmp_path / "m.npz", n=7)
    in_memory = data.read_npz(path, 28, 9)
    mapped = data.read_npz(path, 28, 9, mapped_md5=data.calculate_md5(path))
    arrays = np.load(path)
    for s in datasets.SPLITS:
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
    monkeypatch.setitem(datasets.INFO, "MD5", data.calculate_md5(path))
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
                f"data.convert_images({str(npz)!r}, 'train_images', {str(tmp_path / f'out{n}.npy')!r}, "
                "data.ImageShape(28, 3))\n"
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
    for split in datasets.SPLITS:
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 1))
    arrays.update(override)
    np.savez(path, **arrays)
    return path


def test_a_grayscale_file_loads_as_one_channel_with_its_pixels_in_place(tmp_path):
    img = np.zeros((4, 28, 28), np.uint8)
    img[1, 3, 7] = 200
    splits = data.read_npz(grey_npz(tmp_path / "g.npz", train_images=img), 28, 2, channels=1)
    assert splits["train"].images.shape == (4, 1, 28, 28)
    assert splits["train"].images[1, 0, 3, 7] == 200 and splits["train"].images.sum() == 200


def test_a_mapped_grayscale_file_equals_the_npz(tmp_path):
    path = grey_npz(tmp_path / "g.npz", n=5)
    mapped = data.read_npz(path, 28, 2, mapped_md5=data.calculate_md5(path), channels=1)
    for s in datasets.SPLITS:
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
    path = grey_npz(tmp_path / "m.npz", **{f"{s}_labels": labels for s in datasets.SPLITS})
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
    assert datasets.describe(ds.provenance()).endswith("(unverified file)")


def test_a_matching_md5_is_verified_even_with_trust_file(tmp_path, monkeypatch):
    path = grey_npz(tmp_path / "breastmnist.npz")
    monkeypatch.setitem(datasets.ALL_INFO["breastmnist"], "MD5", data.calculate_md5(path))
    ds = data.load(tmp_path, 28, flag="breastmnist", trust_file=True)
    assert ds.provenance()["verified"] is True and "unverified" not in datasets.describe(ds.provenance())


def test_without_flips_a_batch_keeps_its_orientation():
    images = torch.arange(2 * 36, dtype=torch.uint8).view(2, 1, 6, 6)
    split = data.Split(images, torch.tensor([0, 1]))
    g = torch.Generator().manual_seed(0)
    x, _ = next(data.batches(split, 2, generator=g, augmentation=augment.Augmentation(False, 0.0, 0.0, "none")))
    order = x.flatten(1).argsort(1)  # the pixel order survives any brightness change
    assert torch.equal(order, images.float().flatten(1).argsort(1))


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
