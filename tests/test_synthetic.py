"""synthetic.py: the SYNTHETIC stand-in has the real files' format, evidence inside its masks, and says what it is."""
import numpy as np
import pytest
import torch

import data
import datasets
import synthetic


def test_synthetic_npz_has_medmnist_keys_dtypes_and_layout(tmp_path):
    path = tmp_path / "syn.npz"
    synthetic.write_synthetic(path, 28, counts={"train": 20, "val": 5, "test": 5})
    with np.load(path) as npz:
        for split, n in (("train", 20), ("val", 5), ("test", 5)):
            assert npz[f"{split}_images"].dtype == np.uint8
            assert npz[f"{split}_images"].shape == (n, 28, 28, 3)
            assert np.issubdtype(npz[f"{split}_labels"].dtype, np.integer)
            assert npz[f"{split}_labels"].shape == (n, 1)
            assert npz[f"{split}_masks"].shape == (n, 28, 28)


def test_synthetic_masks_cover_a_minority_of_each_image(tmp_path):
    path = tmp_path / "syn.npz"
    synthetic.write_synthetic(path, 28, counts={"train": 200, "val": 5, "test": 5})
    masks = data.read_npz(path, 28, 9)["train"].masks.float().mean(dim=(1, 2))
    assert masks.min() >= 0.1 and masks.max() <= 0.4


def test_synthetic_evidence_lies_inside_the_mask(tmp_path):
    # Outside the mask, class means are alike; inside, they differ: the class lives in the mask.
    path = tmp_path / "syn.npz"
    synthetic.write_synthetic(path, 28, counts={"train": 900, "val": 5, "test": 5})
    s = data.read_npz(path, 28, 9)["train"]
    x, m = s.images.float(), s.masks[:, None].float()
    inside = (x * m).sum((2, 3)) / m.sum((2, 3))
    outside = (x * (1 - m)).sum((2, 3)) / (1 - m).sum((2, 3))
    def spread(v):
        return torch.stack([v[s.labels == c].mean(0) for c in range(9)]).std(0).mean()
    assert spread(inside) > 5 * spread(outside)


def test_synthetic_size_64_is_written_at_that_size(tmp_path):
    path = tmp_path / "syn64.npz"
    synthetic.write_synthetic(path, 64, counts={"train": 4, "val": 2, "test": 2})
    assert data.read_npz(path, 64, 9)["val"].images.shape == (2, 3, 64, 64)


def test_synthetic_dataset_is_named_synthetic_everywhere(syn_dir):
    ds = data.load(syn_dir, 28, synthetic=True)
    assert ds.synthetic and "synthetic" in ds.name and "synthetic" in ds.provenance()["file"]
    assert all(name.startswith("synthetic") for name in ds.class_names)


@pytest.mark.parametrize("flag", datasets.FLAGS)
def test_synthetic_data_of_a_flag_has_its_channels_classes_and_task(flag, tmp_path):
    info = datasets.medmnist_module("info").INFO[flag]
    synthetic.write_synthetic(tmp_path / datasets.synthetic_file_name(28, flag), 28,
                         counts={"train": 300, "val": 5, "test": 5}, flag=flag)
    ds = data.load(tmp_path, 28, synthetic=True, flag=flag)
    k = len(info["label"])
    assert ds.train.images.shape[1] == info["n_channels"] and ds.task == info["task"]
    assert len(ds.class_names) == k and ds.name == f"{flag}-synthetic"
    if info["task"] == datasets.MULTI_LABEL:
        per_image = ds.train.labels.sum(1)
        assert ds.train.labels.shape == (300, k) and set(per_image.tolist()) == {0, 1, 2}
    else:
        assert set(ds.train.labels.tolist()) == set(range(k))
    named = datasets.describe(ds.provenance())
    assert "SYNTHETIC" in named and info["python_class"] in named


def test_multi_label_synthetic_evidence_sits_where_the_labels_say(tmp_path):
    images, labels, masks = synthetic.synthetic_split(np.random.default_rng(0), 200, 28, flag="chestmnist")
    # No finding, no evidence; a second finding is painted in the right half.
    assert masks[labels.sum(1) == 0].sum() == 0 and masks[labels.sum(1) > 0].sum(axis=(1, 2)).min() > 0
    assert masks[labels.sum(1) == 2][:, :, 14:].sum(axis=(1, 2)).min() > 0
