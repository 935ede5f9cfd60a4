"""bench.py: speed and storage of this project against the original PathMNIST-XAI approach.

    python bench.py                      # full mode (a few minutes on 2 CPU cores)
    python bench.py --quick              # seconds; what the tests run so the benchmark cannot rot
    python bench.py --json bench.json    # also write the numbers as JSON
    python bench.py --device cuda        # the same tables on a GPU
    python bench.py --no-memory          # skip the memory section (it writes ~7 GB of temporary files)
    python bench.py --slide              # only the whole-slide section (bench_slide.py): slide.py on
                                         # 10,000 and 40,000 tissue tiles against reading them alone

Both sides run in this one process, on synthetic images with PathMNIST's shapes (28x28x3, 9
classes), so every number comes with a baseline measured beside it and only the ratios count. Each
measurement is repeated and each side keeps its best repeat, which damps the noise of a shared
machine (one side's disk writeback or a neighbour's load) without favouring either side. The
original approach is rebuilt as it was in original.py; this repo's side trains through train.py's
own data path and training step (engine.py) and explains through evaluate.py's IG path.

A second table compares this repo with the peer most users would pick instead: MedMNIST's own
ResNet-18 for 28 px (model.MedMNISTResNet18), trained and explained through this repo's own data and IG
paths, so only the model differs.

An inference table (bench_inference.py) gives batch-1 latency, batch-256 throughput and bytes shipped
for both models run four ways: PyTorch eager, PyTorch with BatchNorm folded, ONNX float32 and int8.

A last table compares the two loaders: PathMNIST-sized npz files of random pixels (89,996 / 10,004 /
7,180 images) at 28, 64 and 128 px, each loaded by the in-memory loader (--memory ram, the only
loader before memory maps) and by the memory-mapped one (--memory map), then trained for some steps
with batches drawn across the whole split. Each measurement runs in its own process, which samples
its anonymous resident memory (RssAnon in /proc/self/status: the process's own memory, not the page
cache) every few milliseconds and reports the peak. This is a probe of loading and training steps,
not of a whole program: bench_memory.py measures whole train.py and evaluate.py runs, phase by phase.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

import attribution as attr
import augment
import bench_inference
import bench_slide
import cli
import colour
import data
import db
import engine
import model as model_lib
import original
import synthetic
from files import atomic_path, write_json
from rss import AnonPeak

OUR_BATCH = 128
FULL = {"train_images": 20000, "train_steps": 60, "ig_images_original": 40, "ig_images_ours": 480,
        "db_rows": 2000, "repeats": 3, "peer_train_steps": 10, "ig_images_peer": 64, "warmup": 3,
        "peer_batch": OUR_BATCH, "quality_images": 200}
QUICK = {"train_images": 600, "train_steps": 4, "ig_images_original": 2, "ig_images_ours": 16,
         "db_rows": 40, "repeats": 1, "peer_train_steps": 1, "ig_images_peer": 2, "warmup": 1,
         "peer_batch": 16, "quality_images": 8}
PATHMNIST_COUNTS = {"train": 89996, "val": 10004, "test": 7180}
FULL_MEMORY = {"counts": PATHMNIST_COUNTS, "sizes": (28, 64, 128), "steps": 60}
QUICK_MEMORY = {"counts": {"train": 2000, "val": 200, "test": 200}, "sizes": (28, 64), "steps": 3}


# ----------------------------------------------------------------------------- the original approach

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


def train_original(images_hwc, labels, n_steps, repeats, warmup, device="cpu"):
    net, step = original.training(images_hwc, labels, device)
    return net.eval(), timed_steps(step, n_steps, repeats, warmup)


def train_ours(split, n_steps, repeats, warmup, device="cpu"):
    torch.manual_seed(0)
    mean, std = colour.channel_stats(split.images)
    return train_on_our_path(model_lib.build(mean=mean, std=std), split, n_steps, repeats, warmup,
                             device=device)


def train_on_our_path(net, split, n_steps, repeats, warmup, batch=None, device="cpu"):
    """Training steps through train.py's data path (batches of 128, flips and colour jitter) and its
    training step (engine.py, with train.py's default --amp auto: bfloat16 on CUDA)."""
    batch = batch or OUR_BATCH
    net = net.to(device)
    step = our_step(net, device)
    gen = torch.Generator().manual_seed(0)
    batches = cycle(lambda: data.batches(split, batch, device, gen, augment.AUGMENTATION["pathmnist"]))
    net.train()
    return net.eval(), timed_steps(lambda: step(*next(batches)), n_steps, repeats, warmup)


def our_step(net, device):
    """train.py's training step for `net` (Adam at 1e-3, --amp auto): a function of one batch
    (x, y) that returns its size."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    dtype = engine.amp_dtype(torch.device(device), "auto")
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=dtype == torch.float16)

    def step(x, y):
        _, loss = engine.forward_loss(net, x, y, "multi-class", dtype)
        engine.backward_step(loss, opt, scaler)
        return len(y)
    return step


def ig_ours(net, images_u8, labels, repeats, batch=32, device="cpu"):
    """evaluate.py's path: batches of 32, default settings, on `device`.

    Returns (best attributions/s, mean relative completeness error, [(probs, targets, IGResult)]).
    """
    def measure():
        batches.clear()
        t0 = time.perf_counter()
        for i in range(0, len(images_u8), batch):
            batches.append(attr.explain_batch(net, images_u8[i:i + batch], labels[i:i + batch],
                                              attr.DEFAULT_IG, device))
        return len(images_u8) / (time.perf_counter() - t0)
    batches = []
    rate = best_rate(measure, repeats)
    rel = torch.cat([result.relative_error() for _, _, result in batches])
    return rate, float(rel.mean()), batches


def methods_rates(net, images_u8, labels, repeats, references, batch=32, device="cpu"):
    """{method: best attributions/s} of every attribution.METHODS on the same images, batches of 32
    (IG at its fixed 8 steps here, without refinement; its variants refined as evaluate.py stores
    them; expected gradients drawing from `references`)."""
    x_all, y_all = colour.to_unit(images_u8).to(device), labels.to(device)
    rates = {}

    def measure(explainer):
        t0 = time.perf_counter()
        for i in range(0, len(x_all), batch):
            explainer(net, x_all[i:i + batch], y_all[i:i + batch])
        return len(x_all) / (time.perf_counter() - t0)
    for method in attr.METHODS:
        explainer = attr.explainer(method, attr.DEFAULT_IG, references.to(device))
        rates[method] = best_rate(lambda e=explainer: measure(e), repeats)
    return rates


def quality_cost(net, images_u8, references, device="cpu", batch=50):
    """{method: (seconds of the other quality measures, seconds of the published tests)} for
    evaluate.py's default methods and the controls, on the same images, batch by batch side by side."""
    import quality
    fused = model_lib.fused_for_inference(net.eval()).to(device)
    stages = quality.all_randomized_models(net)
    explainers = {m.name: attr.explainer(m, attr.DEFAULT_IG, references.to(device))
                  for m in quality.scored_methods(attr.DEFAULT_METHODS)}
    published, out = quality.published_tests, {}
    for name, explainer in explainers.items():
        other = tests = 0.0
        for start in range(0, len(images_u8), batch):
            x = colour.to_unit(images_u8[start:start + batch]).to(device)
            with torch.no_grad():
                target = fused(x).argmax(1)
            with attr.seeded(start):
                maps = explainer(fused, x, target).cpu()
            try:
                quality.published_tests = lambda *a, **k: {}  # the measures without the published tests
                t0 = time.perf_counter()
                quality.quality_measures(fused, x, target, maps, explainer, attr.DEFAULT_IG, stages)
                other += time.perf_counter() - t0
            finally:
                quality.published_tests = published
            t0 = time.perf_counter()
            with attr.seeded(start):
                published(fused, x, target, maps, explainer, stages["bottom_up"][-1][1], net.config["n_classes"],
                          torch.Generator().manual_seed(0))
            tests += time.perf_counter() - t0
        out[name] = (other, tests)
    return out


# ----------------------------------------------------------------------------- the peer

def ig_original(net, images_u8, repeats, device="cpu"):
    x = ((colour.to_unit(images_u8) - 0.5) / 0.5).to(device)
    with torch.no_grad():
        targets = net(x).argmax(1)
    rel = []

    def measure():
        t0 = time.perf_counter()
        rel[:] = original.original_ig(net, x, targets)
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
        original.original_store(original_path, arrays, labels, labels)
        results["original_rows_s"] = max(results["original_rows_s"], n_rows / (time.perf_counter() - t0))
        rate, conn, run, empty = write_ours(ours_path, jobs)
        results["ours_rows_s"] = max(results["ours_rows_s"], rate)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    results["ours_bytes_row"] = (db_size(ours_path) - empty) / n_rows
    results["original_bytes_row"] = db_size(original_path) / n_rows

    label = int(np.bincount(labels).argmax())
    t0 = time.perf_counter()
    original_class = original.original_read_class(original_path, label)
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
    run = db.run_id_for(conn, "bench", "bench.pt", {"task": "multi-class"}, [str(i) for i in range(9)],
                        {"dataset": "bench", "size": 28, "file": "-", "md5": "-", "synthetic": True,
                         "flag": "pathmnist", "verified": True}, {})
    empty = db_size(path)
    t0 = time.perf_counter()
    for indices, probs, targets, result in jobs:
        # True labels = the explained targets here: the benchmark has no use for accuracy.
        db.insert_explanations(conn, db.explanation_rows(run, "test", "ig", {
            "image_index": indices, "true_label": targets.numpy(), "probs": probs.numpy(), "target": targets.numpy(),
            **result.stored("float16")}))
    return sum(len(j[0]) for j in jobs) / (time.perf_counter() - t0), conn, run, empty


def db_size(path):
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())


# ----------------------------------------------------------------------------- memory

def write_random_npz(path, size, counts, seed=0, chunk=2048):
    """A MedMNIST-format npz of random pixels and labels, streamed member by member and `chunk`
    images at a time (stored, not compressed), so writing a 16 GB file needs one chunk of memory."""
    rng = np.random.default_rng(seed)
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for split, n in counts.items():
            with zf.open(f"{split}_images.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                                         "shape": (n, size, size, 3)})
                for start in range(0, n, chunk):
                    f.write(rng.integers(0, 256, (min(chunk, n - start), size, size, 3), dtype=np.uint8).tobytes())
            with zf.open(f"{split}_labels.npy", "w") as f:
                np.lib.format.write_array(f, rng.integers(0, 9, (n, 1), dtype=np.int64))


def probe_memory(path, size, memory, steps, device="cpu"):
    """In this process: load `path` with the in-memory (ram) or mapped (map) loader, then train
    `steps` batches of 128 drawn across the whole train split; with memory "none", train on one
    random batch in memory instead (what the model and a batch cost alone). Times and peak RssAnon."""
    torch.manual_seed(0)
    net = model_lib.build().to(device)
    step = our_step(net, device)
    sampler = AnonPeak()
    baseline = sampler.current()
    sampler.start()
    t0 = time.perf_counter()
    if memory == "none":
        train_split = data.Split(torch.randint(0, 256, (OUR_BATCH, 3, size, size), dtype=torch.uint8),
                                 torch.randint(0, 9, (OUR_BATCH,)))
    else:
        train_split = data.read_npz(path, size, 9, "bench" if memory == "map" else None)["train"]
    load_s = time.perf_counter() - t0
    load_peak = sampler.peak
    gen, net = torch.Generator().manual_seed(0), net.train()
    aug = augment.AUGMENTATION["pathmnist"]
    stream = cycle(lambda: data.batches(train_split, OUR_BATCH, device, gen, aug))
    t1, images = time.perf_counter(), 0
    for _, (x, y) in zip(range(steps), stream, strict=False):  # the stream never ends
        images += step(x, y)
    train_s = time.perf_counter() - t1
    peak = sampler.stop()
    return {"size": size, "memory": memory, "load_s": load_s, "baseline_anon": baseline,
            "load_peak_anon": load_peak, "peak_anon": peak, "train_img_s": images / train_s,
            "epoch_s": len(train_split) / (images / train_s)}


def probe_in_subprocess(path, size, memory, steps, device):
    """probe_memory in a fresh Python, so each peak is that loader's alone; its memory maps go to a
    cache folder beside the file (deleted with it)."""
    env = {**os.environ, data.CACHE_ENV: str(Path(path).parent / "cache")}
    out = subprocess.run([sys.executable, __file__, "--probe", str(path), "--probe-size", str(size),
                          "--probe-memory", memory, "--probe-steps", str(steps), "--device", str(device),
                          "--threads", str(torch.get_num_threads())],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_bench(cfg, folder, device="cpu"):
    """Per size: the in-memory loader, then the mapped one on first use (converting) and again."""
    rows = []
    for size in cfg["sizes"]:
        path = Path(folder) / f"pathmnist_random_{size}.npz"
        stage(f"memory at {size} px: writing a {sum(cfg['counts'].values()):,}-image file of random pixels")
        write_random_npz(path, size, cfg["counts"])
        stage(f"memory at {size} px: in-memory loader, then memory maps (first use converts)")
        ram = probe_in_subprocess(path, size, "ram", cfg["steps"], device)
        first = probe_in_subprocess(path, size, "map", cfg["steps"], device)
        mapped = probe_in_subprocess(path, size, "map", cfg["steps"], device)
        alone = probe_in_subprocess(path, size, "none", cfg["steps"], device)
        rows.append({"size": size, "pixel_bytes": sum(cfg["counts"].values()) * size * size * 3,
                     "ram": ram, "map_first": first, "map": mapped, "model_and_batch": alone})
        path.unlink()
        shutil.rmtree(Path(folder) / "cache", ignore_errors=True)
    return rows


def format_memory(rows):
    gb = 1e9
    lines = [f"{'size':>5s} {'pixels':>7s} | {'in memory (ram)':^30s} | {'memory-mapped (map)':^42s} | "
             f"{'model+batch':>11s} | {'map/ram':>7s} {'map minus':>9s}",
             f"{'px':>5s} {'GB':>7s} | {'load s':>7s} {'peak GB':>7s} {'img/s':>5s} {'epoch s':>7s} | "
             f"{'1st load s':>10s} {'load s':>6s} {'peak GB':>7s} {'img/s':>5s} {'epoch s':>7s} | "
             f"{'peak GB':>11s} | {'peak':>7s} {'mod+bat GB':>9s}"]
    for r in rows:
        ram, m, first, alone = r["ram"], r["map"], r["map_first"], r["model_and_batch"]
        lines.append(f"{r['size']:5d} {r['pixel_bytes'] / gb:7.2f} | {ram['load_s']:7.1f} {ram['peak_anon'] / gb:7.2f} "
                     f"{ram['train_img_s']:5.0f} {ram['epoch_s']:7.0f} | {first['load_s']:10.1f} {m['load_s']:6.2f} "
                     f"{m['peak_anon'] / gb:7.2f} {m['train_img_s']:5.0f} {m['epoch_s']:7.0f} | "
                     f"{alone['peak_anon'] / gb:11.2f} | {m['peak_anon'] / ram['peak_anon']:6.2f}x "
                     f"{(m['peak_anon'] - alone['peak_anon']) / gb:9.2f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- report

def run(cfg, device="cpu"):
    rng = np.random.default_rng(0)
    images_hwc, labels, _ = synthetic.synthetic_split(rng, cfg["train_images"], 28)
    labels = labels.reshape(-1)
    split = data.Split(torch.from_numpy(images_hwc).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels))

    reps = cfg["repeats"]
    stage("training, original approach")
    original_net, original_train = train_original(images_hwc, labels, cfg["train_steps"], reps,
                                                  cfg["warmup"], device)
    stage("training, this repo")
    our_net, our_train = train_ours(split, cfg["train_steps"], reps, cfg["warmup"], device)
    stage("training, MedMNIST's ResNet-18 on this repo's data path")
    torch.manual_seed(0)
    peer_net, peer_train = train_on_our_path(model_lib.MedMNISTResNet18(), split, cfg["peer_train_steps"], reps,
                                             cfg["warmup"], cfg["peer_batch"], device)

    test_u8, test_labels = split.images[:cfg["ig_images_ours"]], split.labels[:cfg["ig_images_ours"]]
    stage("IG, both sides")
    original_ig_rate, original_rel = ig_original(original_net, test_u8[:cfg["ig_images_original"]], reps,
                                                 device)
    our_ig_rate, our_rel, ig_batches = ig_ours(model_lib.fused_for_inference(our_net), test_u8, test_labels,
                                               reps, device=device)
    original_behind_normalize = original.PixelInput(original_net).to(device)
    method_on_original_rate, method_on_original_rel, _ = ig_ours(original_behind_normalize, test_u8,
                                                                 test_labels, reps, device=device)
    stage("IG, MedMNIST's ResNet-18 on this repo's IG path")
    peer_ig_rate, peer_rel, _ = ig_ours(peer_net, test_u8[:cfg["ig_images_peer"]],
                                        test_labels[:cfg["ig_images_peer"]], reps, device=device)

    stage("every attribution method, this repo's model")
    method_rates = methods_rates(model_lib.fused_for_inference(our_net), test_u8, test_labels, reps,
                                 attr.reference_sample(split.images), device=device)
    stage("the published tests' cost beside the other quality measures")
    cost = quality_cost(our_net, split.images[:cfg["quality_images"]], attr.reference_sample(split.images), device)

    stage("inference: PyTorch eager and folded, ONNX float32 and int8, both models")
    icfg = bench_inference.QUICK if cfg is QUICK else bench_inference.FULL
    inference = {name: bench_inference.inference_rows(net.cpu(), split.images, icfg)
                 for name, net in (("this repo", our_net), ("ResNet-18", peer_net))}

    with tempfile.TemporaryDirectory() as tmp:
        stage("SQLite storage, both sides")
        store = db_bench(ig_batches, cfg["db_rows"], Path(tmp), reps)

    original_cost = model_lib.layer_costs(original.original_model())[-1]
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
    peer_cost = model_lib.layer_costs(model_lib.MedMNISTResNet18())[-1]
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
               "method_rates": method_rates, "quality_cost": cost, "inference": inference,
               "table": [{"measure": m, "original": o, "ours": u} for m, o, u in rows],
               "peer_table": [{"measure": m, "resnet18": o, "ours": u} for m, o, u in peer_rows],
               "settings": {**cfg, "threads": torch.get_num_threads(), "torch": str(torch.__version__),
                            "device": str(device)}}
    return rows, peer_rows, results


def stage(what):
    """A line per measurement, so a piped log shows where a minutes-long benchmark is."""
    print(f"[bench] measuring {what} ...", file=sys.stderr, flush=True)


def format_table(rows, baseline="original"):
    """The comparison as text: errors in percent (no ratio: a share of a share says little), counts
    as whole numbers, rates and times with one decimal."""
    lines = [f"{'measure':52s} {baseline:>12s} {'this repo':>12s} {'ratio':>8s}"]
    for measure, theirs, ours in rows:
        if "error" in measure:
            lines.append(f"{measure:52s} {theirs:12.2%} {ours:12.2%} {'—':>8s}")
            continue
        counts = isinstance(theirs, int) and isinstance(ours, int)
        fmt = (lambda v: f"{v:12,d}") if counts else (lambda v: f"{v:12,.1f}")
        lines.append(f"{measure:52s} {fmt(theirs)} {fmt(ours)} {ours / theirs:7.2f}x")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="Benchmark this project against the original "
                                "PathMNIST-XAI approach, side by side in one process.")
    p.add_argument("--quick", action="store_true", help="a seconds-long run with tiny sizes (for tests)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--device", default="cpu", help=f"where both sides train and explain: "
                   f"{cli.DEVICE_HELP} (default: cpu, the machine the original ran on)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory section (full mode writes "
                   "and converts PathMNIST-sized files up to 128 px: about 7 GB of temporary files and "
                   "a few minutes)")
    p.add_argument("--memory-dir", help="folder for the memory section's temporary files (default: a "
                   "new folder in the system's temporary directory, deleted afterwards)")
    p.add_argument("--slide", action="store_true", help="run only the whole-slide section (bench_slide.py): "
                   "slide.py on written slides of 10,000 and 40,000 tissue tiles (with --quick, 144)")
    p.add_argument("--checkpoint", help="with --slide: map with this model (default: a 1-epoch synthetic one "
                   "trained for the benchmark; speed does not depend on the weights)")
    p.add_argument("--data-dir", help="with --slide --checkpoint: the model's data folder (the int8 export "
                   "calibrates on its training images)")
    p.add_argument("--tiatoolbox", metavar="PYTHON", help="with --slide: also map each slide through TIAToolbox's "
                   "PatchPredictor, run by this interpreter (an environment with tiatoolbox and medmnist)")
    p.add_argument("--probe", help=argparse.SUPPRESS)  # internal: one memory measurement in this process
    p.add_argument("--probe-size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--probe-memory", help=argparse.SUPPRESS)
    p.add_argument("--probe-steps", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = cli.resolve_device(args.device)
    if args.probe:
        print(json.dumps(probe_memory(args.probe, args.probe_size, args.probe_memory, args.probe_steps, device)))
        return None
    if args.slide:
        rows = bench_slide.run(bench_slide.QUICK if args.quick else bench_slide.FULL, args.checkpoint, args.data_dir,
                               args.tiatoolbox)
        print(f"Whole slides ({'QUICK mode: too small for conclusions' if args.quick else 'full mode'}): "
              f"slide.py end to end against only reading and resizing the same tiles; written tiled TIFFs at "
              f"{bench_slide.MPP:g} um/px, {torch.get_num_threads()} threads")
        print(bench_slide.format_rows(rows))
        if args.json:
            write_json(args.json, {"slide": rows})
        return {"slide": rows}
    cfg = QUICK if args.quick else FULL
    rows, peer_rows, results = run(cfg, device)
    memory_rows = []
    if not args.no_memory:
        with tempfile.TemporaryDirectory(dir=args.memory_dir) as folder:
            memory_rows = memory_bench(QUICK_MEMORY if args.quick else FULL_MEMORY, folder, device)
        results["memory"] = memory_rows
    print(f"{'QUICK mode: sizes too small for conclusions' if args.quick else 'full mode'}; "
          f"{torch.get_num_threads()} threads, device {device}, synthetic 28x28x3 images, 9 classes")
    print(format_table(rows))
    print("\nPeer: MedMNIST's ResNet-18 (28 px), trained and explained through this repo's own paths")
    print(format_table(peer_rows, baseline="ResNet-18"))
    print(f"\nAttribution methods on this repo's model, attributions/s ({cfg['ig_images_ours']} images, "
          f"batches of 32):")
    print("  " + "  ".join(f"{m} {r:,.1f}" for m, r in results["method_rates"].items()))
    print(f"\nQuality on {cfg['quality_images']} images, evaluate.py's default methods and the controls, seconds: "
          "the other measures | the published tests (sMPRT, eMPRT, RandomLogit, ROAD) | ratio")
    for name, (other, published) in results["quality_cost"].items():
        print(f"  {name:20s} {other:8.1f} {published:8.1f} {published / other:6.2f}")
    total = [sum(t) for t in zip(*results["quality_cost"].values(), strict=True)]
    print(f"  {'all':20s} {total[0]:8.1f} {total[1]:8.1f} {total[1] / total[0]:6.2f}")
    batch = (bench_inference.QUICK if args.quick else bench_inference.FULL)["batch"]
    print("\nInference on CPU (uint8 images in, logits out; the ONNX files as export.py writes them):")
    for name, inference_rows in results["inference"].items():
        print(bench_inference.format_rows(name, inference_rows, batch))
    if memory_rows:
        counts = (QUICK_MEMORY if args.quick else FULL_MEMORY)["counts"]
        print(f"\nLoaders: npz files of random pixels with {sum(counts.values()):,} images "
              f"({'PathMNIST-sized' if counts == PATHMNIST_COUNTS else 'QUICK: not PathMNIST-sized'}); peak "
              f"RssAnon over loading and {(QUICK_MEMORY if args.quick else FULL_MEMORY)['steps']} training "
              f"steps (a probe, not a whole program: python bench_memory.py); epoch s = train split / img/s")
        print(format_memory(memory_rows))
    if args.json:
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    cli.run(main)
