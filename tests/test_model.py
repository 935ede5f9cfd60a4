"""model.py: shapes at several sizes, cost budget, and the checkpoint format."""
import argparse
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import model as model_lib

ORIGINAL_PARAMS, ORIGINAL_MACS = 871_145, 19_500_000


@pytest.mark.parametrize("size", [28, 64])
def test_model_gives_one_logit_per_class_at_any_size(size):
    net = model_lib.build(n_classes=9).eval()
    assert net(torch.rand(2, 3, size, size)).shape == (2, 9)


def test_class_count_comes_from_the_config():
    assert model_lib.build(n_classes=4).eval()(torch.rand(1, 3, 28, 28)).shape == (1, 4)


def test_model_costs_at_most_half_the_original():
    rows = model_lib.layer_costs(model_lib.build(), 28)
    _, _, params, macs = rows[-1]
    assert params <= ORIGINAL_PARAMS / 2
    assert macs <= ORIGINAL_MACS / 2
    assert params == sum(r[2] for r in rows[:-1])
    assert macs == sum(r[3] for r in rows[:-1])


@pytest.mark.parametrize("name", ["tissuecnn", "resnet18", "original"])
def test_multiply_adds_per_layer_are_what_torchs_flop_counter_counts(name):
    from torch.utils.flop_counter import FlopCounterMode

    import original
    net = {"tissuecnn": model_lib.build, "resnet18": model_lib.MedMNISTResNet18,
           "original": original.original_model}[name]().eval()
    size = 28 if name == "original" else 64  # the original's classifier takes 28x28 only
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, 3, size, size))
    flops = counter.get_flop_counts()
    rows = model_lib.layer_costs(net, size)
    for layer, _, _, macs in rows[:-1]:
        assert macs == sum(flops.get(f"{type(net).__name__}.{layer}", {}).values()) // 2, layer
    assert rows[-1][3] == counter.get_total_flops() // 2


def test_counting_multiply_adds_keeps_torch_dynamo_out_of_memory():
    # FlopCounterMode imports torch._dynamo and sympy (70 MB held to the end of evaluate.py)
    code = ("import sys, model; model.layer_costs(model.build(), 28); "
            "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.stdout.strip() == "[]"


def test_model_normalises_with_its_stored_mean_and_std():
    net = model_lib.build(mean=[0.2, 0.4, 0.6], std=[0.5, 0.25, 0.1]).eval()
    x = torch.rand(1, 3, 28, 28)
    expected = (x - torch.tensor([0.2, 0.4, 0.6]).view(1, 3, 1, 1)) / torch.tensor([0.5, 0.25, 0.1]).view(1, 3, 1, 1)
    assert torch.allclose(net.normalize(x), expected)


# The 8 symmetries of a square, written out independently of augment.dihedral.
SYMMETRIES = {
    "identity": lambda x: x, "flip left-right": lambda x: x.flip(-1), "flip up-down": lambda x: x.flip(-2),
    "rotate 180": lambda x: x.flip(-1).flip(-2), "transpose": lambda x: x.transpose(-2, -1),
    "rotate 90": lambda x: x.transpose(-2, -1).flip(-1), "rotate 270": lambda x: x.transpose(-2, -1).flip(-2),
    "anti-transpose": lambda x: x.transpose(-2, -1).flip(-1).flip(-2)}


@pytest.fixture(scope="module")
def tta_case():
    torch.manual_seed(0)
    net = model_lib.build().eval()
    images = torch.randint(0, 256, (5, 3, 28, 28), dtype=torch.uint8)
    return net, images, model_lib.predict_logits(net, images, batch_size=2, tta=True)


def test_tta_is_the_mean_of_the_eight_symmetries_logits(tta_case):
    net, images, tta = tta_case
    with torch.no_grad():
        expected = torch.stack([net(t(images).float() / 255) for t in SYMMETRIES.values()]).mean(0)
    assert torch.allclose(tta, expected, atol=1e-5)
    assert not torch.allclose(tta, model_lib.predict_logits(net, images))


@pytest.mark.parametrize("name", list(SYMMETRIES))
def test_tta_gives_the_same_logits_for_every_flip_and_rotation(tta_case, name):
    net, images, tta = tta_case
    transformed = SYMMETRIES[name](images).contiguous()
    assert torch.allclose(model_lib.predict_logits(net, transformed, tta=True), tta, atol=1e-5)


def test_folding_batchnorm_keeps_the_function():
    torch.manual_seed(0)
    net = model_lib.build()
    net.train()
    for _ in range(3):  # give BatchNorm non-trivial running statistics
        net(torch.rand(16, 3, 28, 28))
    net.eval()
    fused = model_lib.fused_for_inference(net)
    x = torch.rand(8, 3, 28, 28)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert torch.allclose(fused(x), net(x), atol=1e-4)


def test_checkpoint_round_trip_restores_weights_and_metadata(tmp_path):
    torch.manual_seed(0)
    net = model_lib.build(mean=[0.1, 0.2, 0.3], std=[0.3, 0.2, 0.1]).eval()
    meta = {"class_names": ["a"] * 9, "history": [{"epoch": 1, "val_acc": 0.5}],
            "provenance": {"md5": "abc", "synthetic": True}}
    model_lib.save_checkpoint(tmp_path / "c.pt", net, meta)
    loaded, loaded_meta = model_lib.load_checkpoint(tmp_path / "c.pt")
    x = torch.rand(3, 3, 28, 28)
    assert torch.equal(loaded(x), net(x))
    assert loaded_meta == meta
    assert not loaded.training
    assert loaded.config["mean"] == pytest.approx([0.1, 0.2, 0.3])


def test_checkpoint_save_leaves_no_temporary_files(tmp_path):
    model_lib.save_checkpoint(tmp_path / "c.pt", model_lib.build(), {})
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model_lib.save_checkpoint(tmp_path / "c.pt", model_lib.build(), {"run": 1})
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        model_lib.save_checkpoint(tmp_path / "c.pt", model_lib.build(), {"run": 2})
    assert model_lib.load_checkpoint(tmp_path / "c.pt")[1] == {"run": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_arbitrary_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": model_lib.FORMAT, "meta": argparse.Namespace(x=1)}, path)
    with pytest.raises(model_lib.CheckpointError, match="refused on purpose"):
        model_lib.load_checkpoint(path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_plain_pickle_file_is_refused(tmp_path):
    path = tmp_path / "p.pt"
    path.write_bytes(pickle.dumps(argparse.Namespace(a=1)))
    with pytest.raises(model_lib.CheckpointError):
        model_lib.load_checkpoint(path)


def test_bare_state_dict_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(model_lib.build().state_dict(), path)
    with pytest.raises(model_lib.CheckpointError, match="not a pathmnist-xai-checkpoint"):
        model_lib.load_checkpoint(path)


@pytest.mark.parametrize("text", ["hello", "notes about the run", "(lp0\n."])
def test_text_file_is_not_a_checkpoint_and_the_error_never_advises_weights_only_false(tmp_path, text):
    path = tmp_path / "notes.txt"
    path.write_text(text)
    with pytest.raises(model_lib.CheckpointError) as err:
        model_lib.load_checkpoint(path)
    assert "weights_only" not in str(err.value) and "refused on purpose" in str(err.value)


def test_missing_checkpoint_tells_the_user_to_train(tmp_path):
    with pytest.raises(model_lib.CheckpointError, match="python train.py"):
        model_lib.load_checkpoint(tmp_path / "none.pt")


def test_weights_for_another_config_are_refused(tmp_path):
    path = tmp_path / "c.pt"
    model_lib.save_checkpoint(path, model_lib.build(channels=[8, 8, 8, 8, 8]), {})
    payload = torch.load(path, weights_only=True)
    payload["config"]["channels"] = [16, 16, 16, 16, 16]
    torch.save(payload, path)
    with pytest.raises(model_lib.CheckpointError, match="do not fit"):
        model_lib.load_checkpoint(path)


def test_newer_checkpoint_version_is_refused(tmp_path):
    path = tmp_path / "c.pt"
    model_lib.save_checkpoint(path, model_lib.build(), {})
    payload = torch.load(path, weights_only=True)
    payload["version"] = model_lib.VERSION + 1
    torch.save(payload, path)
    with pytest.raises(model_lib.CheckpointError, match="version"):
        model_lib.load_checkpoint(path)


# ----------------------------------------------------------------------------- the explainers' contract

def test_randomization_layers_run_from_the_classifier_down_to_the_first_block():
    net = model_lib.build(channels=[8, 8, 8], strides=[1, 2, 1])
    assert model_lib.randomization_layers(net) == ["classifier", "features.2", "features.1", "features.0"]
    for name in model_lib.randomization_layers(net):
        assert sum(p.numel() for p in net.get_submodule(name).parameters()) > 0


def test_input_mean_is_the_normalisation_mean():
    net = model_lib.build(mean=[0.2, 0.4, 0.6])
    assert model_lib.input_mean(net).tolist() == pytest.approx([0.2, 0.4, 0.6])


def test_folding_refuses_a_block_that_is_not_conv_bn_relu():
    net = model_lib.build()
    net.features[2] = torch.nn.Sequential(torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU())
    with pytest.raises(TypeError, match="features.2 is Conv2d -> ReLU"):
        model_lib.fused_for_inference(net)


def test_a_checkpoint_round_trips_its_training_state_and_has_none_without_it(tmp_path):
    state = {"epoch": 3, "seconds": [1.0]}
    model_lib.save_checkpoint(tmp_path / "last.pt", model_lib.build(), {"m": 1}, train_state=state)
    _, meta, loaded = model_lib.load_checkpoint(tmp_path / "last.pt", with_train_state=True)
    assert meta == {"m": 1} and loaded == state
    model_lib.save_checkpoint(tmp_path / "best.pt", model_lib.build(), {})
    assert model_lib.load_checkpoint(tmp_path / "best.pt", with_train_state=True)[2] is None




# ----------------------------------------------------------------------------- MedMNIST's ResNet-18, the peer

@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    net = model_lib.build(arch="resnet18", n_classes=5, in_channels=3, task="multi-class",
                          mean=[0.4, 0.5, 0.6], std=[0.2, 0.3, 0.25]).train()
    with torch.no_grad():
        for _ in range(3):  # running statistics that are not the identity
            net(torch.rand(16, 3, 28, 28))
    return net.eval()


def test_the_resnet_rebuilds_from_its_checkpoint_config_as_a_resnet(resnet, tmp_path):
    model_lib.save_checkpoint(tmp_path / "r.pt", resnet, {})
    back, _ = model_lib.load_checkpoint(tmp_path / "r.pt")
    assert isinstance(back, model_lib.MedMNISTResNet18) and back.config["arch"] == "resnet18"
    x = torch.rand(2, 3, 28, 28)
    assert torch.equal(back(x), resnet(x))


def test_folding_the_resnets_batchnorm_keeps_the_function(resnet):
    fused = model_lib.fused_for_inference(resnet)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    x = torch.rand(4, 3, 28, 28)
    assert torch.allclose(fused(x), resnet(x), atol=1e-5)


def test_the_resnets_randomisation_stages_and_gradcam_layer_are_its_own_modules(resnet):
    names = model_lib.randomization_layers(resnet)
    assert names[0] == "net.fc" and names[-1] == "net.conv1"
    assert all(resnet.get_submodule(n) is not None for n in names)
    assert model_lib.gradcam_layer(resnet) is resnet.net.layer4
    assert [model_lib.layer_label(n) for n in names[:2]] == ["classifier", "layer4"]


def test_a_checkpoint_without_an_architecture_is_this_repos_cnn():
    config = {k: v for k, v in model_lib.build().config.items() if k != "arch"}  # as written before --arch
    assert isinstance(model_lib.build(config), model_lib.TissueCNN)


def test_a_missing_checkpoint_points_to_the_runs_that_exist_beside_it(tmp_path):
    (tmp_path / "runs" / "pathmnist-synthetic_28").mkdir(parents=True)
    (tmp_path / "runs" / "pathmnist-synthetic_28" / "best.pt").write_bytes(b"")
    guess = r"Did you mean --checkpoint .*pathmnist-synthetic_28/best\.pt\?"
    with pytest.raises(model_lib.CheckpointError, match=guess):
        model_lib.read_checkpoint(tmp_path / "runs" / "pathmnist_28" / "best.pt")
    with pytest.raises(model_lib.CheckpointError, match=r"No checkpoint at .*none\.pt\. Train one first"):
        model_lib.read_checkpoint(tmp_path / "empty" / "none.pt")  # no run folder beside it: no guess
