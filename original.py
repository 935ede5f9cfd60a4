"""original.py: the original PathMNIST-XAI approach, rebuilt as it was, for bench.py to measure beside ours.

Its 871K-parameter CNN trained with Adam at batch 64 from a Dataset that makes a PIL image per item
(flip, rotate 10 degrees, ToTensor, Normalize 0.5); Captum IG one image at a time with its defaults
(50 steps, zero baseline in normalised space) and parameters still requiring grad; attributions saved
with np.save, base64-encoded into a TEXT column, with a SELECT, an INSERT and a commit per row.
"""
import base64
import io
import sqlite3

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from captum.attr import IntegratedGradients
from PIL import Image
from torchvision import transforms

import attribution as attr
import model as model_lib

BATCH = 64


def original_model():
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.3), nn.Linear(3136, 256), nn.ReLU(), nn.Dropout(0.3),
        nn.Linear(256, 9))


class OriginalDataset(torch.utils.data.Dataset):
    """A PIL image per item, then torchvision transforms: the original data path."""

    def __init__(self, images_hwc, labels, transform):
        self.images, self.labels, self.transform = images_hwc, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


ORIGINAL_TRAIN_TRANSFORM = transforms.Compose([
    transforms.RandomHorizontalFlip(), transforms.RandomRotation(10), transforms.ToTensor(),
    transforms.Normalize([0.5] * 3, [0.5] * 3)])


class PixelInput(nn.Module):
    """The original model behind its Normalize(0.5, 0.5), so it takes [0, 1] pixels like ours.

    With config mean 0.5, our 'mean' baseline is the original's zero baseline in normalised space,
    so running our IG on this isolates the method from the model.
    """

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.normalize = model_lib.Normalize([0.5] * 3, [0.5] * 3)  # what model.input_mean reads

    def forward(self, x):
        return self.net(self.normalize(x))


def original_ig(net, images_norm, targets):
    """Captum defaults, one image at a time, parameters still requiring grad."""
    ig = IntegratedGradients(net)
    rel = []
    for x, t in zip(images_norm, targets, strict=True):
        x = x[None]
        _, delta = ig.attribute(x, target=int(t), return_convergence_delta=True)
        with torch.no_grad():
            gap = net(x)[0, t] - net(torch.zeros_like(x))[0, t]
        rel.append(float(attr.relative_completeness_error(delta, gap)))
    return rel


def original_store(path, attributions, labels, preds):
    """np.save -> base64 TEXT; per row a SELECT to check for it, an INSERT, then a commit."""
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE IF NOT EXISTS attributions (image_index INTEGER, label INTEGER, "
                 "pred INTEGER, attribution TEXT)")
    conn.commit()
    for i, (a, label, pred) in enumerate(zip(attributions, labels, preds, strict=True)):
        if conn.execute("SELECT 1 FROM attributions WHERE image_index = ?", (i,)).fetchone():
            continue
        buf = io.BytesIO()
        np.save(buf, a)
        conn.execute("INSERT INTO attributions VALUES (?, ?, ?, ?)",
                     (i, int(label), int(pred), base64.b64encode(buf.getvalue()).decode("ascii")))
        conn.commit()
    conn.close()


def original_read_class(path, label):
    conn = sqlite3.connect(path)
    rows = conn.execute("SELECT attribution FROM attributions WHERE label = ?", (label,)).fetchall()
    conn.close()
    return [np.load(io.BytesIO(base64.b64decode(r[0]))) for r in rows]


def training(images_hwc, labels, device="cpu"):
    """(model, step): the original model and one of its training steps (returns the batch size),
    drawing batches from its PIL data path, cycling over the images."""
    torch.manual_seed(0)
    net = original_model().to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(OriginalDataset(images_hwc, labels, ORIGINAL_TRAIN_TRANSFORM),
                                         batch_size=BATCH, shuffle=True)

    def batches():
        while True:
            yield from loader
    stream = batches()

    def step():
        x, y = next(stream)
        loss = F.cross_entropy(net(x.to(device)), y.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        return len(y)
    net.train()
    return net, step
