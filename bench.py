"""bench.py: speed and storage of this project against the original PathMNIST-XAI approach.

    python bench.py                      # full mode (a few minutes on 2 CPU cores)
    python bench.py --quick              # seconds; what the tests run so the benchmark cannot rot
    python bench.py --json bench.json    # also write the numbers as JSON

Both sides run in this one process, on synthetic images with PathMNIST's shapes (28x28x3, 9
classes), so every number comes with a baseline measured beside it and only the ratios count. Each
measurement is repeated and each side keeps its best repeat, which damps the noise of a shared
machine (one side's disk writeback or a neighbour's load) without favouring either side. The
original approach is rebuilt here as it was: its 871K-parameter CNN trained with Adam at batch 64
from a Dataset that makes a PIL image per item (flip, rotate 10 degrees, ToTensor, Normalize 0.5);
Captum IG one image at a time with its defaults (50 steps, zero baseline in normalised space) and
parameters still requiring grad; attributions saved with np.save, base64-encoded into a TEXT column,
with a SELECT, an INSERT and a commit per row.

A second table compares this repo with the peer most users would pick instead: MedMNIST's own
ResNet-18 for 28 px (medmnist_resnet18), trained and explained through this repo's own data and IG
paths, so only the model differs.
"""
import argparse
import base64
import io
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from captum.attr import IntegratedGradients
from PIL import Image
import torchvision
from torchvision import transforms

import data
import db
import explain
import model as model_lib

OUR_BATCH = 128
ORIGINAL_BATCH = 64
FULL = {"train_images": 20000, "train_steps": 60, "ig_images_original": 40, "ig_images_ours": 480,
        "db_rows": 2000, "repeats": 3, "peer_train_steps": 10, "ig_images_peer": 64, "warmup": 3,
        "peer_batch": OUR_BATCH}
QUICK = {"train_images": 600, "train_steps": 4, "ig_images_original": 2, "ig_images_ours": 16,
         "db_rows": 40, "repeats": 1, "peer_train_steps": 1, "ig_images_peer": 2, "warmup": 1,
         "peer_batch": 16}


# ----------------------------------------------------------------------------- the original approach

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
    for x, t in zip(images_norm, targets):
        x = x[None]
        attr, delta = ig.attribute(x, target=int(t), return_convergence_delta=True)
        with torch.no_grad():
            gap = net(x)[0, t] - net(torch.zeros_like(x))[0, t]
        rel.append(float(db.relative_completeness_error(delta, gap)))
    return rel


def original_store(path, attributions, labels, preds):
    """np.save -> base64 TEXT; per row a SELECT to check for it, an INSERT, then a commit."""
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE IF NOT EXISTS attributions (image_index INTEGER, label INTEGER, "
                 "pred INTEGER, attribution TEXT)")
    conn.commit()
    for i, (a, label, pred) in enumerate(zip(attributions, labels, preds)):
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


# ----------------------------------------------------------------------------- measurements

def best_rate(measure, repeats):
    """The highest of `repeats` calls of measure() -> items/s."""
    return max(measure() for _ in range(repeats))


def timed_steps(step, n_steps, repeats, warmup):
    """Best images/s over `repeats` runs of n_steps calls of step() (each returns its batch size),
    after `warmup` untimed calls."""
    for _ in range(warmup):
        step()

    def measure():
        t0 = time.perf_counter()
        images = sum(step() for _ in range(n_steps))
        return images / (time.perf_counter() - t0)
    return best_rate(measure, repeats)


def cycle(make_iter):
    while True:
        yield from make_iter()


def train_original(images_hwc, labels, n_steps, repeats, warmup):
    torch.manual_seed(0)
    net = original_model()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(OriginalDataset(images_hwc, labels, ORIGINAL_TRAIN_TRANSFORM),
                                         batch_size=ORIGINAL_BATCH, shuffle=True)
    batches = cycle(lambda: iter(loader))

    def step():
        x, y = next(batches)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return len(y)
    net.train()
    return net.eval(), timed_steps(step, n_steps, repeats, warmup)


def train_ours(split, n_steps, repeats, warmup):
    torch.manual_seed(0)
    mean, std = data.channel_stats(split.images)
    return train_on_our_path(model_lib.build(mean=mean, std=std), split, n_steps, repeats, warmup)


def train_on_our_path(net, split, n_steps, repeats, warmup, batch=None):
    """Training steps through train.py's data path (batches of 128, flips and colour jitter)."""
    batch = batch or OUR_BATCH
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    batches = cycle(lambda: data.batches(split, batch, generator=gen, augment=data.AUGMENTATION["pathmnist"]))

    def step():
        x, y = next(batches)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return len(y)
    net.train()
    return net.eval(), timed_steps(step, n_steps, repeats, warmup)


def ig_ours(net, images_u8, labels, repeats, batch=32):
    """evaluate.py's path: batches of 32, default settings.

    Returns (best attributions/s, mean relative completeness error, [(probs, targets, IGResult)]).
    """
    def measure():
        batches.clear()
        t0 = time.perf_counter()
        for i in range(0, len(images_u8), batch):
            batches.append(explain.explain_batch(net, images_u8[i:i + batch], labels[i:i + batch],
                                                 explain.DEFAULT_IG))
        return len(images_u8) / (time.perf_counter() - t0)
    batches = []
    rate = best_rate(measure, repeats)
    rel = torch.cat([result.relative_error() for _, _, result in batches])
    return rate, float(rel.mean()), batches


# ----------------------------------------------------------------------------- the peer

def medmnist_resnet18(n_classes=9):
    """MedMNIST's ResNet-18 for 28x28 inputs (MedMNIST/experiments, MedMNIST2D/models.py, adapted
    from kuangliu/pytorch-cifar): torchvision's resnet18 with a 3x3 stride-1 first convolution and
    no max-pool, which gives the same layers, behind MedMNIST's Normalize(0.5, 0.5)."""
    net = torchvision.models.resnet18(num_classes=n_classes)
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return PixelInput(net)


def ig_original(net, images_u8, repeats):
    x = (data.to_unit(images_u8) - 0.5) / 0.5
    with torch.no_grad():
        targets = net(x).argmax(1)
    rel = []

    def measure():
        t0 = time.perf_counter()
        rel[:] = original_ig(net, x, targets)
        return len(x) / (time.perf_counter() - t0)
    rate = best_rate(measure, repeats)
    return rate, float(np.mean(rel))


def db_bench(batches, n_rows, folder, repeats):
    """Both stores fed the same IG results, `n_rows` rows (cycling through `batches`): rows/s writing
    (best of `repeats`, each into a new file), bytes per row, ms to read back one class."""
    jobs, labels = [], []
    for _ in range(-(-n_rows // sum(len(t) for _, t, _ in batches))):
        for probs, targets, result in batches:
            start = len(labels)
            labels += targets.tolist()
            jobs.append((list(range(start, len(labels))), probs, targets, result))
    jobs, labels = trim(jobs, n_rows), np.array(labels[:n_rows])
    arrays = np.concatenate([result.attributions.numpy() for _, _, _, result in jobs])
    results = {"original_rows_s": 0.0, "ours_rows_s": 0.0}
    for rep in range(repeats):
        original_path, ours_path = folder / f"original{rep}.db", folder / f"ours{rep}.db"
        t0 = time.perf_counter()
        original_store(original_path, arrays, labels, labels)
        results["original_rows_s"] = max(results["original_rows_s"], n_rows / (time.perf_counter() - t0))
        rate, conn, run, empty = write_ours(ours_path, jobs)
        results["ours_rows_s"] = max(results["ours_rows_s"], rate)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    results["ours_bytes_row"] = (db_size(ours_path) - empty) / n_rows
    results["original_bytes_row"] = db_size(original_path) / n_rows

    label = int(np.bincount(labels).argmax())
    t0 = time.perf_counter()
    original_class = original_read_class(original_path, label)
    results["original_read_ms"] = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    ours_class = db.class_attributions(conn, run, label)
    results["ours_read_ms"] = (time.perf_counter() - t0) * 1e3
    assert len(original_class) == len(ours_class)
    results["class_rows"] = len(ours_class)
    conn.close()
    return results


def trim(jobs, n_rows):
    """Cut the list of batches so that exactly n_rows rows remain."""
    out, left = [], n_rows
    for indices, probs, targets, result in jobs:
        if left <= 0:
            break
        k = min(left, len(indices))
        out.append((indices[:k], probs[:k], targets[:k], result.take(slice(0, k))))
        left -= k
    return out


def write_ours(path, jobs):
    """evaluate.py's storage path, one transaction per IG batch. (rows/s, conn, run id, empty size)"""
    conn = db.connect(path)
    run = db.run_id_for(conn, "bench", "bench.pt", {}, [str(i) for i in range(9)],
                        {"dataset": "bench", "size": 28, "file": "-", "md5": "-", "synthetic": True}, {})
    empty = db_size(path)
    t0 = time.perf_counter()
    for indices, probs, targets, result in jobs:
        # True labels = the explained targets here: the benchmark has no use for accuracy.
        db.insert_explanations(conn, db.explanation_rows(run, "test", indices, targets.numpy(), probs.numpy(),
                                                         targets.numpy(), **result.stored("float16")))
    return sum(len(j[0]) for j in jobs) / (time.perf_counter() - t0), conn, run, empty


def db_size(path):
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())


# ----------------------------------------------------------------------------- report

def run(cfg):
    rng = np.random.default_rng(0)
    images_hwc, labels, _ = data.synthetic_split(rng, cfg["train_images"], 28)
    labels = labels.reshape(-1)
    split = data.Split(torch.from_numpy(images_hwc).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels))

    reps = cfg["repeats"]
    stage("training, original approach")
    original_net, original_train = train_original(images_hwc, labels, cfg["train_steps"], reps, cfg["warmup"])
    stage("training, this repo")
    our_net, our_train = train_ours(split, cfg["train_steps"], reps, cfg["warmup"])
    stage("training, MedMNIST's ResNet-18 on this repo's data path")
    torch.manual_seed(0)
    peer_net, peer_train = train_on_our_path(medmnist_resnet18(), split, cfg["peer_train_steps"], reps,
                                             cfg["warmup"], cfg["peer_batch"])

    test_u8, test_labels = split.images[:cfg["ig_images_ours"]], split.labels[:cfg["ig_images_ours"]]
    stage("IG, both sides")
    original_ig_rate, original_rel = ig_original(original_net, test_u8[:cfg["ig_images_original"]], reps)
    our_ig_rate, our_rel, ig_batches = ig_ours(model_lib.fused_for_inference(our_net), test_u8, test_labels, reps)
    method_on_original_rate, method_on_original_rel, _ = ig_ours(PixelInput(original_net), test_u8,
                                                                 test_labels, reps)
    stage("IG, MedMNIST's ResNet-18 on this repo's IG path")
    peer_ig_rate, peer_rel, _ = ig_ours(peer_net, test_u8[:cfg["ig_images_peer"]],
                                        test_labels[:cfg["ig_images_peer"]], reps)

    with tempfile.TemporaryDirectory() as tmp:
        stage("SQLite storage, both sides")
        store = db_bench(ig_batches, cfg["db_rows"], Path(tmp), reps)

    original_cost = model_lib.layer_costs(original_model())[-1]
    our_cost = model_lib.layer_costs(model_lib.build())[-1]
    rows = [
        ("training, img/s (data pipeline included)", original_train, our_train),
        ("IG, attributions/s", original_ig_rate, our_ig_rate),
        ("IG, mean relative completeness error", original_rel, our_rel),
        ("IG of this project on the original model, attr/s", original_ig_rate, method_on_original_rate),
        ("  ... its mean relative completeness error", original_rel, method_on_original_rel),
        ("SQLite write, rows/s", store["original_rows_s"], store["ours_rows_s"]),
        ("SQLite bytes per row", store["original_bytes_row"], store["ours_bytes_row"]),
        (f"SQLite read one class ({store['class_rows']} rows), ms", store["original_read_ms"],
         store["ours_read_ms"]),
        ("parameters", original_cost[2], our_cost[2]),
        ("multiply-adds per image", original_cost[3], our_cost[3]),
    ]
    peer_cost = model_lib.layer_costs(medmnist_resnet18())[-1]
    peer_rows = [
        ("training, img/s (data pipeline included)", peer_train, our_train),
        ("IG, attributions/s", peer_ig_rate, our_ig_rate),
        ("IG, mean relative completeness error", peer_rel, our_rel),
        ("parameters", peer_cost[2], our_cost[2]),
        ("multiply-adds per image", peer_cost[3], our_cost[3]),
    ]
    results = {"train_speedup": our_train / original_train, "ig_speedup": our_ig_rate / original_ig_rate,
               "ig_rel_delta": our_rel, "db_write_speedup": store["ours_rows_s"] / store["original_rows_s"],
               "db_bytes_ratio": store["ours_bytes_row"] / store["original_bytes_row"],
               "read_class_ms": store["ours_read_ms"], "macs_ratio": our_cost[3] / original_cost[3],
               "ig_method_speedup_on_original_model": method_on_original_rate / original_ig_rate,
               "train_speedup_vs_resnet18": our_train / peer_train,
               "ig_speedup_vs_resnet18": our_ig_rate / peer_ig_rate,
               "table": [{"measure": m, "original": o, "ours": u} for m, o, u in rows],
               "peer_table": [{"measure": m, "resnet18": o, "ours": u} for m, o, u in peer_rows],
               "settings": {**cfg, "threads": torch.get_num_threads(), "torch": str(torch.__version__)}}
    return rows, peer_rows, results


def stage(what):
    """A line per measurement, so a piped log shows where a minutes-long benchmark is."""
    print(f"[bench] measuring {what} ...", file=sys.stderr, flush=True)


def format_table(rows, baseline="original"):
    """The comparison as text: errors in percent (no ratio: a share of a share says little), counts
    as whole numbers, rates and times with one decimal."""
    lines = [f"{'measure':52s} {baseline:>12s} {'this repo':>12s} {'ratio':>8s}"]
    for measure, original, ours in rows:
        if "error" in measure:
            lines.append(f"{measure:52s} {original:12.2%} {ours:12.2%} {'—':>8s}")
            continue
        counts = isinstance(original, int) and isinstance(ours, int)
        fmt = (lambda v: f"{v:12,d}") if counts else (lambda v: f"{v:12,.1f}")
        lines.append(f"{measure:52s} {fmt(original)} {fmt(ours)} {ours / original:7.2f}x")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="Benchmark this project against the original "
                                "PathMNIST-XAI approach, side by side in one process.")
    p.add_argument("--quick", action="store_true", help="a seconds-long run with tiny sizes (for tests)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else FULL
    rows, peer_rows, results = run(cfg)
    print(f"{'QUICK mode: sizes too small for conclusions' if args.quick else 'full mode'}; "
          f"{torch.get_num_threads()} threads, synthetic 28x28x3 images, 9 classes")
    print(format_table(rows))
    print("\nPeer: MedMNIST's ResNet-18 (28 px), trained and explained through this repo's own paths")
    print(format_table(peer_rows, baseline="ResNet-18"))
    if args.json:
        with data.atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # each line reaches a piped log when printed
    main()
