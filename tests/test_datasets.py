"""datasets.py: every MedMNIST 2D flag, its files, URLs and MD5s, from medmnist.INFO."""
import pytest

import data
import datasets


def test_urls_and_md5s_come_from_medmnist_info():
    name, url, md5 = datasets.real_source(64)
    assert name == "pathmnist_64.npz"
    assert url == datasets.INFO["url_64"] and md5 == datasets.INFO["MD5_64"]
    assert datasets.real_source(28)[0] == "pathmnist.npz"


def test_unknown_size_is_a_data_error():
    with pytest.raises(data.DataError, match="28, 64, 128, 224"):
        datasets.real_source(32)


def test_the_twelve_2d_flags_are_the_ones_medmnist_lists():
    assert set(datasets.FLAGS) == {"pathmnist", "chestmnist", "dermamnist", "octmnist", "pneumoniamnist",
                               "retinamnist", "breastmnist", "bloodmnist", "tissuemnist", "organamnist",
                               "organcmnist", "organsmnist"}


def test_an_unknown_flag_is_refused_with_the_valid_ones_listed():
    with pytest.raises(data.DataError, match="not a MedMNIST 2D dataset") as err:
        datasets.flag_info("pathmnistt")
    assert all(flag in str(err.value) for flag in datasets.FLAGS)


def test_a_3d_flag_is_refused_as_3d():
    with pytest.raises(data.DataError, match="3D MedMNIST dataset") as err:
        datasets.flag_info("organmnist3d")
    assert "bloodmnist" in str(err.value)


def test_files_urls_and_md5s_of_any_flag_come_from_medmnist_info():
    info = datasets.medmnist_module("info").INFO["organcmnist"]
    assert datasets.real_source(128, "organcmnist") == ("organcmnist_128.npz", info["url_128"], info["MD5_128"])
    assert datasets.class_names_of("bloodmnist")[0] == datasets.medmnist_module("info").INFO["bloodmnist"]["label"]["0"]
