"""model.py: the lightweight CNN and its checkpoint format.

    python model.py                     # layer summary with params and multiply-adds at 28x28
    python model.py --size 64           # the same at 64x64

The network takes float images in [0, 1] and normalises them itself with the training split's
per-channel mean/std (stored as buffers, so they travel in every checkpoint). A space-to-depth stem
(PixelUnshuffle 2: 3x28x28 -> 12x14x14, lossless; 1x28x28 -> 4x14x14 for 1-channel datasets) avoids
full-resolution feature maps, which cost the most time on CPU for the least arithmetic; five
Conv-BN-ReLU blocks follow, downsampling by stride; global average pooling makes it work at any
(even) input size; then dropout and one linear layer. At 28x28 it costs 255K parameters and 8.75M
multiply-adds, under half of the original PathMNIST-XAI CNN (871K, 19.5M).

A checkpoint is one file: {"format", "version", "config", "state_dict", "meta", "train_state"}. Only
tensors, numbers, strings, lists and dicts go in, so it loads with torch.load(weights_only=True) and
an arbitrary pickle is refused. `train_state` (last.pt only) is train.py's (train.TRAIN_STATE_KEYS).

The config also records the input channels (3 or 1) and medmnist's task string: `probabilities`
turns logits into one sigmoid per label for a multi-label model and a softmax otherwise.

What the explainers (explain.py, quality.py) may assume of the network, all defined here so that a
new architecture means editing this file alone: it takes [0, 1] images and `input_mean` is the
colour it normalises around; `randomization_layers` lists the layers to re-initialise, top first;
`gradcam_layer` is the block Grad-CAM reads; `fused_for_inference` folds BatchNorm into the
Conv-BN-ReLU blocks.
"""
import argparse
import copy
import io
import os
import re
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

import budget
import cli
from augment import dihedral
from colour import to_unit
from datasets import MULTI_LABEL
from files import atomic_path

FORMAT = "pathmnist-xai-checkpoint"
VERSION = 1
DEFAULT_CONFIG = {"arch": "tissuecnn", "n_classes": 9, "in_channels": 3, "task": "multi-class", "unshuffle": 2,
                  "channels": [32, 32, 64, 96, 192], "strides": [1, 1, 2, 1, 2], "dropout": 0.2,
                  "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


class CheckpointError(cli.UserError):
    """A checkpoint that is missing, unsafe, or not ours."""


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def conv_bn_relu(c_in, c_out, stride):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class TissueCNN(nn.Module):
    """Built from a config with DEFAULT_CONFIG's keys (build fills them in): `in_channels` is 3 (RGB)
    or 1 (grayscale); `task` is medmnist's task string, which decides how logits become
    probabilities (see probabilities)."""

    def __init__(self, config):
        super().__init__()
        c = config
        if len(c["mean"]) != c["in_channels"] or len(c["std"]) != c["in_channels"]:
            raise ValueError(f"mean/std have {len(c['mean'])}/{len(c['std'])} entries for {c['in_channels']} "
                             f"input channels")
        # DEFAULT_CONFIG's key order: checkpoints pickle this dict, so the order is part of their bytes
        self.config = {"arch": c["arch"], "n_classes": c["n_classes"], "in_channels": c["in_channels"],
                       "task": c["task"], "unshuffle": c["unshuffle"], "channels": list(c["channels"]),
                       "strides": list(c["strides"]), "dropout": c["dropout"], "mean": list(c["mean"]),
                       "std": list(c["std"])}
        self.normalize = Normalize(c["mean"], c["std"])
        self.stem = nn.PixelUnshuffle(c["unshuffle"])
        widths = [c["in_channels"] * c["unshuffle"] ** 2] + list(c["channels"])
        self.features = nn.Sequential(*[conv_bn_relu(widths[i], widths[i + 1], s)
                                        for i, s in enumerate(c["strides"])])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(c["dropout"])
        self.classifier = nn.Linear(widths[-1], c["n_classes"])
        # channels_last lets oneDNN pick its fastest CPU convolutions (measured 1.1-1.4x in training).
        self.to(memory_format=torch.channels_last)

    def forward(self, x):
        x = self.stem(self.normalize(x.contiguous(memory_format=torch.channels_last)))
        x = self.pool(self.features(x)).flatten(1)
        return self.classifier(self.dropout(x))

    def gradcam_layer(self):
        """The last convolutional block (coarsest, most semantic maps; 4x4 at 28 px)."""
        return self.features[-1]

    def randomization_layers(self):
        """The classifier (top) first, then each feature block down to the first."""
        return ["classifier"] + [f"features.{i}" for i in reversed(range(len(self.features)))]

    def fold_batchnorm(self):
        """Fold each block's BatchNorm into its convolution, in place (eval mode only)."""
        for i, block in enumerate(self.features):
            kinds = [type(m) for m in block] if isinstance(block, nn.Sequential) else [type(block)]
            if kinds != [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]:
                raise TypeError(f"features.{i} is {' -> '.join(k.__name__ for k in kinds)}; "
                                f"fused_for_inference folds only Conv2d -> BatchNorm2d -> ReLU blocks. "
                                f"Teach it the new block (model.py) or explain the unfused model.")
            conv, bn, relu = block
            self.features[i] = nn.Sequential(fuse_conv_bn_eval(conv, bn), relu)


RESNET_DEFAULTS = {"arch": "resnet18", "n_classes": 9, "in_channels": 3, "task": "multi-class",
                   "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


class MedMNISTResNet18(nn.Module):
    """MedMNIST's ResNet-18 for 28x28 inputs (MedMNIST/experiments, MedMNIST2D/models.py, adapted
    from kuangliu/pytorch-cifar): torchvision's resnet18 with a 3x3 stride-1 first convolution and no
    max-pool, which gives the same layers, behind a Normalize (the training split's mean/std, as
    TissueCNN; MedMNIST's 0.5/0.5 by default), so that it takes [0, 1] pixels. The peer this repo is
    measured against (bench.py, `train.py --arch resnet18`)."""

    def __init__(self, config=None):
        super().__init__()
        import torchvision  # loads every torchvision model (a second): only when a ResNet is built
        c = {**RESNET_DEFAULTS, **(config or {})}
        n_classes, in_channels, task, arch = c["n_classes"], c["in_channels"], c["task"], c["arch"]
        mean, std = list(c["mean"])[:in_channels], list(c["std"])[:in_channels]
        self.config = {"arch": arch, "n_classes": n_classes, "in_channels": in_channels, "task": task,
                       "mean": mean, "std": std}
        self.normalize = Normalize(mean, std)
        self.net = torchvision.models.resnet18(num_classes=n_classes)
        self.net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.net.maxpool = nn.Identity()

    def forward(self, x):
        return self.net(self.normalize(x))

    def gradcam_layer(self):
        """The last residual stage (4x4 at 28 px)."""
        return self.net.layer4

    def randomization_layers(self):
        """The classifier first, then each residual stage down to the stem."""
        return ["net.fc", "net.layer4", "net.layer3", "net.layer2", "net.layer1", "net.conv1"]

    def fold_batchnorm(self):
        """Fold every BatchNorm into the convolution before it, in place (eval mode only)."""
        def fold(owner, conv, bn):
            setattr(owner, conv, fuse_conv_bn_eval(getattr(owner, conv), getattr(owner, bn)))
            setattr(owner, bn, nn.Identity())
        fold(self.net, "conv1", "bn1")
        for stage in (self.net.layer1, self.net.layer2, self.net.layer3, self.net.layer4):
            for block in stage:
                fold(block, "conv1", "bn1")
                fold(block, "conv2", "bn2")
                if block.downsample is not None:
                    block.downsample = nn.Sequential(fuse_conv_bn_eval(*block.downsample))


ARCHITECTURES = {"tissuecnn": TissueCNN, "resnet18": MedMNISTResNet18}


def build(config=None, **overrides):
    """A model from a config dict (defaults filled in), e.g. build(n_classes=9, mean=..., std=...);
    config["arch"] picks the architecture (ARCHITECTURES; a config without one is a TissueCNN, as
    every checkpoint before there was a choice). A 1-channel model without its own mean/std gets
    DEFAULT_CONFIG's first entries."""
    given = {**(config or {}), **overrides}
    arch = given.get("arch", "tissuecnn")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"Unknown architecture {arch!r}; this code builds {', '.join(ARCHITECTURES)}.")
    config = {**DEFAULT_CONFIG, **given} if arch == "tissuecnn" else given
    for key in ("mean", "std"):
        if key in config and len(config[key]) != config["in_channels"] and config[key] == DEFAULT_CONFIG[key]:
            config[key] = DEFAULT_CONFIG[key][:config["in_channels"]]
    return ARCHITECTURES[arch](config)


def input_channels(model):
    """Channels the model takes: its config's, or 3 for models without one (bench.py's peers)."""
    return getattr(model, "config", {}).get("in_channels", 3)


def probabilities(model, logits):
    """Class probabilities from a model's logits (task_probabilities with the model's task). Models
    without a config (the original approach's) are single-label."""
    return task_probabilities(getattr(model, "config", {}).get("task"), logits)


def task_probabilities(task, logits):
    """One sigmoid per label for a multi-label task (chestmnist: findings are not exclusive),
    softmax over the classes otherwise."""
    return torch.sigmoid(logits) if task == MULTI_LABEL else torch.softmax(logits, dim=1)


def input_mean(model):
    """The training split's mean colour, (C,), on the model's device: what the model centres on."""
    return model.normalize.mean.flatten()


def layer_label(name):
    """A randomisation stage in words for figures: 'classifier', 'conv block 3' for features.2, or
    a ResNet stage's own name ('layer4', 'conv1')."""
    if name.startswith("features."):
        return f"conv block {int(name.split('.')[1]) + 1}"
    return "classifier" if name == "net.fc" else name.removeprefix("net.")


def gradcam_layer(model):
    """The layer Grad-CAM reads (the architecture says which)."""
    return model.gradcam_layer()


def randomization_layers(model):
    """Names of the layers a cascading randomisation test re-initialises, in order, top first."""
    return model.randomization_layers()


def fused_for_inference(model):
    """An eval-mode copy with each BatchNorm folded into its convolution.

    In eval mode BatchNorm is a fixed affine map, so the copy computes the same function (up to
    float rounding) with less work per pass; IG, which runs many passes per image, uses it.
    """
    fused = copy.deepcopy(model).eval()
    fused.fold_batchnorm()
    return fused.to(memory_format=torch.channels_last)


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def multiply_adds(module, output):
    """Multiply-adds of one call of a Conv2d or Linear module for one image (the ops that carry the
    cost, counted as torch's FlopCounterMode counts them, FLOPs / 2, biases aside); 0 for any other."""
    per_image = output[0].numel()
    if isinstance(module, nn.Conv2d):
        return per_image * module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
    if isinstance(module, nn.Linear):
        return per_image * module.in_features
    return 0


def layer_costs(model, size=28):
    """[(layer name, output shape, params, MACs)] for one size x size image, plus the totals row.

    MACs are counted by forward hooks on what actually runs (multiply_adds). Not by FlopCounterMode:
    entering it imports torch._dynamo and sympy, 70 MB that evaluate.py would then hold to its end;
    tests/test_model.py checks that the two counts agree.
    """
    rows, shapes, macs = [], {}, {}

    def record(name):
        def hook(module, inputs, output):
            shapes[name] = tuple(output.shape[1:])
            macs[name] = macs.get(name, 0) + multiply_adds(module, output)  # a module may run twice
        return hook
    hooks = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if n and not list(m.children())]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, input_channels(model), size, size))
    model.train(was_training)
    for h in hooks:
        h.remove()
    for name, module in model.named_modules():
        if name in shapes:
            rows.append((name, shapes[name], sum(p.numel() for p in module.parameters()), macs[name]))
    rows.append(("total", rows[-1][1], count_params(model), sum(r[3] for r in rows)))
    return rows


# ----------------------------------------------------------------------------- inference

@torch.no_grad()
def predict_logits(model, images, batch_size=512, device="cpu", tta=False):
    """Logits for uint8 (N, C, H, W) images, in batches of at most `batch_size` that fit
    budget.WORK_BYTES; `tta` averages over the 8 flips/rotations."""
    model.eval()
    out = []
    if len(images):
        batch_size = budget.forward_batch(model, images.shape[1:], batch_size, device, copies=2 if tta else 1)
    for i in range(0, len(images), batch_size):
        x = to_unit(images[i:i + batch_size].to(device))
        if tta:
            out.append(torch.stack([model(dihedral(x, k)) for k in range(8)]).mean(0).cpu())
        else:
            out.append(model(x).cpu())
    return torch.cat(out) if out else torch.empty(0, model.config["n_classes"])


def predict_probabilities(model, images, batch_size=512, device="cpu", tta=False):
    """Class probabilities (numpy, (N, K)) for uint8 images: predict_logits, then probabilities."""
    return probabilities(model, predict_logits(model, images, batch_size, device, tta)).numpy()


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path, model, meta, train_state=None):
    """Write the model, its metadata and (optionally) the training state atomically."""
    payload = {"format": FORMAT, "version": VERSION, "config": model.config,
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               "meta": meta, "train_state": train_state}
    buf = io.BytesIO()  # serialised first, so a full disk can be told the size it must hold
    torch.save(payload, buf)
    with atomic_path(path, needed=buf.getbuffer().nbytes) as tmp:
        with open(tmp, "wb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())


def read_checkpoint(path):
    """The raw checkpoint dict, loaded safely (weights_only=True), or CheckpointError."""
    if not os.path.isfile(path):
        others = sorted(str(p) for p in Path(path).parent.parent.glob("*/best.pt"))  # e.g. the demo's run
        hint = (f" Did you mean --checkpoint {others[0]}?" + (f" (also there: {', '.join(others[1:4])})"
                                                              if others[1:] else "")) if others else ""
        raise CheckpointError(f"No checkpoint at {path}.{hint} Train one first with `python train.py` "
                              f"(or `python train.py --synthetic` offline), or pass --checkpoint.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for unsafe pickles, RuntimeError/EOFError for junk
        raise CheckpointError(
            f"{path} is not a checkpoint this project can load safely ({short_reason(e)}). Only "
            f"files written by train.py are accepted; arbitrary pickles are refused on purpose.") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} loads, but it is not a {FORMAT} file written by train.py.")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path} is checkpoint version {payload.get('version')}; this code "
                              f"reads version {VERSION}. Use the matching version of the code.")
    return payload


def short_reason(e):
    """One line of an exception. torch.load's refusals span a page whose "WeightsUnpickler error:"
    part says why; the rest advises weights_only=False, which we never pass on (it runs any code)."""
    text = " ".join(str(e).split())
    found = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", text)
    why = found.group(1) if found else text
    if "weights_only" in why:
        why = "torch.load refused it"
    return f"{type(e).__name__}: {why[:200]}"


def load_checkpoint(path, device="cpu", with_train_state=False):
    """(model in eval mode on `device`, metadata dict) from a checkpoint written by train.py, and
    the stored training state (None if it has none) as a third item with `with_train_state`."""
    payload = read_checkpoint(path)
    try:
        model = build(payload["config"])
        model.load_state_dict(payload["state_dict"])
    except (TypeError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path} holds weights that do not fit its model config "
                              f"({short_reason(e)}). Was it written by another version?") from e
    model = model.to(device).eval()
    if not with_train_state:
        return model, payload["meta"]
    return model, payload["meta"], payload.get("train_state")


def main(argv=None):
    p = argparse.ArgumentParser(description="Print the CNN's layers with parameters and "
                                "multiply-adds (MACs) for one image.", formatter_class=cli.HelpFormatter)
    p.add_argument("--size", type=cli.even_size, default=28, help="input height and width, an even "
                   "number of pixels")
    p.add_argument("--checkpoint", help="summarise this checkpoint's model instead of the default")
    args = p.parse_args(argv)
    model = load_checkpoint(args.checkpoint)[0] if args.checkpoint else build()
    print(f"{'layer':28s} {'output':>14s} {'params':>10s} {'MACs':>12s}")
    for name, shape, params, macs in layer_costs(model, args.size):
        print(f"{name:28s} {str(shape):>14s} {params:10,d} {macs:12,d}")


if __name__ == "__main__":
    cli.run(main)
