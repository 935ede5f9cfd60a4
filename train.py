"""train.py: train the lightweight CNN on PathMNIST (or any MedMNIST 2D dataset).

    python train.py                          # PathMNIST 28x28 into runs/pathmnist_28/ (downloads the data)
    python train.py --flag bloodmnist        # another MedMNIST 2D dataset, into runs/bloodmnist_28/
    python train.py --size 64 --device cuda  # a MedMNIST+ size on a GPU, into runs/pathmnist_64/
    python train.py --synthetic --epochs 10  # offline demo on the SYNTHETIC dataset (not PathMNIST),
                                             # into runs/pathmnist-synthetic_28/
    python train.py --resume                 # continue <out>/last.pt after Ctrl-C or a crash
    torchrun --nproc_per_node 4 train.py     # DistributedDataParallel over 4 processes (docs/SCALING.md)

The recipe: the dataset's task decides the loss and its modality the augmentation (engine.py,
augment.py); Adam, with ReduceLROnPlateau and early stopping both watching the *validation* loss (the
original script watched training accuracy). Every epoch writes <out>/last.pt and <out>/history.csv;
the best epoch on validation loss is kept as <out>/best.pt; the end draws
<out>/images/accuracy_epoch.png. The same seed and settings on the same device give the same best.pt,
byte for byte: a checkpoint holds no timings and no paths. Ctrl-C stops after saving what is
finished, with exit code 130. Under torchrun rank 0 alone writes the run files, in the same format.
"""
import argparse
import math
import sys
import time
from pathlib import Path

import torch

import augment
import cli
import colour
import data
import datasets
import distributed
import engine
import formats
import model as model_lib
import plots
from files import check_writable, write_csv

HISTORY_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]
MIN_IMPROVEMENT = 1e-4  # a val-loss drop smaller than this does not count as progress
# The flags that decide the weights: recorded in every checkpoint (paths and threads are not).
RESULT_SETTINGS = ("flag", "arch", "epochs", "batch_size", "lr", "patience", "seed", "device", "size",
                   "synthetic", "trust_file", "flips", "stain_jitter", "colour_jitter", "shift", "amp", "compile",
                   "world_size", "sync_bn")
# What last.pt holds to continue a run: optimizer, scheduler, early stopping and both RNGs.
TRAIN_STATE_KEYS = ("optimizer", "scheduler", "epoch", "best_val_loss", "bad_epochs", "rng_torch",
                    "rng_generator", "seconds", "scaler")
GPU_DATA_SHARE = 0.25  # on a GPU, keep train/val images there when they take at most this share of its free memory


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                formatter_class=cli.HelpFormatter)
    p.add_argument("--flag", type=datasets.flag_arg, default=datasets.FLAG, help=datasets.FLAG_HELP)
    p.add_argument("--arch", default="tissuecnn", choices=model_lib.ARCHITECTURES, help="the model: this "
                   "repo's lightweight CNN, or MedMNIST's ResNet-18 (the peer it is measured against)")
    p.add_argument("--epochs", type=cli.positive_int, default=100, help="maximum number of epochs (early "
                   "stopping usually ends a run long before)")
    p.add_argument("--batch-size", type=int, default=128, help="images per training batch")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's initial learning rate")
    p.add_argument("--patience", type=int, default=10, help="stop after this many epochs without a "
                   "lower validation loss; the learning rate halves after half as many")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, shuffling, augmentation "
                   "and dropout; the same seed on the same device gives the same history")
    cli.add_device(p)
    cli.add_data_dir(p)
    p.add_argument("--size", type=int, default=28, choices=datasets.SIZES, help="image size: 28 "
                   "(MedMNIST v2) or 64/128/224 (MedMNIST+ files)")
    p.add_argument("--out", help="run folder for best.pt, last.pt and history.csv (default: "
                   "runs/<dataset>_<size>, e.g. runs/pathmnist_28 or runs/pathmnist-synthetic_28; "
                   "runs/<dataset>_<size>-resnet18 for --arch resnet18)")
    p.add_argument("--figures", help="folder for the training-curve plot (default: <out>/images)")
    p.add_argument("--synthetic", action="store_true", help="train on the offline SYNTHETIC "
                   "stand-in for --flag (same channels, classes and task; for demos and tests, never a "
                   "result on the real dataset)")
    p.add_argument("--trust-file", action="store_true", help=datasets.TRUST_FILE_HELP)
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.pt with its "
                   "optimizer, scheduler, early-stopping and RNG state")
    cli.add_threads(p)
    data.add_memory_flag(p)
    p.add_argument("--amp", default="auto", choices=("auto", "on", "off"), help="mixed precision for "
                   "training steps: bfloat16 autocast (float16 with a gradient scaler on GPUs without "
                   "bfloat16); auto turns it on for CUDA only. Validation, metrics and IG stay float32")
    p.add_argument("--compile", action="store_true", help="compile the training step with "
                   "torch.compile (worth it on a GPU for long runs; the first epoch pays the compile time)")
    p.add_argument("--sync-bn", action="store_true", help="under torchrun on GPUs: BatchNorm statistics "
                   "over the global batch (torch's SyncBatchNorm) instead of each rank's share")
    p.add_argument("--flips", type=cli.on_off, metavar="{on,off}", help="random flips/rotations (the 8 "
                   "symmetries of a square): on or off (default: the dataset's, off where anatomy has a "
                   "side; see augment.AUGMENTATION)")
    p.add_argument("--stain-jitter", type=float, help="strength of HED stain jitter, 0 for none "
                   "(RGB only; default: 1 for pathmnist's H&E, 0 elsewhere)")
    p.add_argument("--colour-jitter", type=float, help="strength of per-channel colour (or, on one "
                   "channel, brightness/contrast) jitter, 0 for none (default: the dataset's)")
    p.add_argument("--shift", type=float, help="strength of random translation: 1 moves each image by up "
                   "to 1/14 of its side (2 px at 28), 0 for none (default: 1 for every dataset)")
    args = p.parse_args(argv)
    # pickle writes a string object once and refers back to it after, so a checkpoint's bytes would
    # depend on whether two equal settings (--device auto, --amp auto) are one object (argparse's
    # defaults) or two (typed out, as the report's train command is): interned, they are one.
    for key, value in vars(args).items():
        if isinstance(value, str):
            setattr(args, key, sys.intern(value))
    arch = "" if args.arch == "tissuecnn" else f"-{args.arch}"
    args.out = args.out or str(Path("runs") / f"{datasets.dataset_name(args.synthetic, args.flag)}_{args.size}{arch}")
    args.figures = args.figures or str(Path(args.out) / "images")
    try:
        aug = augment.augmentation(args.flag, args.flips, args.stain_jitter, args.colour_jitter, args.shift)
    except datasets.DataError as e:
        p.error(str(e))
    args.flips, args.stain_jitter, args.colour_jitter, args.shift = aug.flips, aug.stain, aug.colour, aug.shift
    args.augment = aug
    return args


def main(argv=None):
    return distributed.run(train, parse_args(argv))


def train(args, ctx):
    out, device = Path(args.out), ctx.device
    args.world_size = ctx.world_size
    check_before_reading(args, ctx)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True

    ds = data.load(args.data_dir, args.size, args.synthetic, args.memory, args.flag, args.trust_file)
    label = datasets.describe(ds.provenance())
    print(f"Training on {label}: {len(ds.train)} train / {len(ds.val)} val images, device {device}; "
          f"{ds.task}, {ds.channels} channel(s); augmentation: {args.augment.summary()}")
    if ctx.world_size > 1:
        print(f"DistributedDataParallel over {ctx.world_size} processes "
              f"({'NCCL' if device.type == 'cuda' else 'gloo'}): a global batch of {args.batch_size} is "
              f"{args.batch_size / ctx.world_size:.0f} images per rank")
    gen = torch.Generator().manual_seed(args.seed)  # shuffling and augmentation
    net, meta, state = new_or_resumed(args, ds)
    net.to(device)
    train_split, val_split = on_device(ds, device)
    step_net = step_module(net, args, ctx)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=engine.amp_dtype(device, args.amp) == torch.float16)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5,
                                                       patience=max(1, args.patience // 2))
    steps = engine.Steps(step_net, ds.task, opt, scaler, args.amp)
    best_loss, bad_epochs, start, seconds_per_epoch = math.inf, 0, 1, []
    if state is not None:
        best_loss, bad_epochs, start, seconds_per_epoch = restore(state, opt, sched, scaler, gen)
        print(f"Resuming {out / 'last.pt'} after epoch {state['epoch']}")
    history = meta["history"]  # without timings, which live in last.pt's train_state alone
    mean, std = (" ".join(map(formats.metric, net.config[k])) for k in ("mean", "std"))
    print(f"Model: {formats.count(model_lib.count_params(net))} parameters; normalisation mean {mean}, std {std}")

    epoch, interrupted = start - 1, None
    try:
        for epoch in range(start, args.epochs + 1):
            if bad_epochs >= args.patience:
                break
            t0 = time.perf_counter()
            aug_gen = None
            if ctx.world_size > 1:  # each rank its own dropout and augmentation draws
                torch.manual_seed(engine.rank_seed(args.seed, ctx.rank, epoch))
                aug_gen = torch.Generator().manual_seed(engine.rank_seed(args.seed, ctx.rank, epoch))
            train_loss, train_acc = engine.train_epoch(steps, train_split, args.batch_size, args.augment, epoch, gen,
                                                       ctx, aug_gen)
            distributed.sync_buffers(net, ctx)
            val_loss, val_acc = engine.evaluate_split(net, val_split, args.batch_size, device, ctx)
            seconds = time.perf_counter() - t0
            row = {"epoch": epoch, "train_loss": round(train_loss, 6), "train_acc": round(train_acc, 6),
                   "val_loss": round(val_loss, 6), "val_acc": round(val_acc, 6), "lr": opt.param_groups[0]["lr"]}
            history.append(row)
            seconds_per_epoch.append(round(seconds, 3))
            sched.step(val_loss)
            improved = val_loss < best_loss - MIN_IMPROVEMENT
            if improved:
                best_loss, bad_epochs, meta["best_epoch"] = val_loss, 0, epoch
            else:
                bad_epochs += 1
            print(f"epoch {epoch:3d}  train loss {formats.metric(train_loss)} acc {formats.metric(train_acc)}  "
                  f"val loss {formats.metric(val_loss)} acc {formats.metric(val_acc)}  lr {row['lr']:.2e}  "
                  f"{seconds:.1f}s ({len(ds.train) / seconds:.0f} img/s){'  *best' if improved else ''}")
            if ctx.main:  # rank 0 writes the run files
                state = train_state(opt, sched, scaler, gen, epoch, best_loss, bad_epochs, seconds_per_epoch)
                save_epoch(out, net, meta, state, improved, history, seconds_per_epoch)
    except KeyboardInterrupt:
        interrupted = epoch
    if bad_epochs >= args.patience:
        print(f"Early stop: no lower validation loss for {args.patience} epochs.")
    if history and ctx.main:
        plot_path = Path(args.figures) / "accuracy_epoch.png"
        plots.plot_history(history, plot_path, f"Training on {label}", meta["best_epoch"])
        print(f"Best epoch {meta['best_epoch']} (val loss {formats.metric(best_loss)}) -> {out / 'best.pt'}; "
              f"curves -> {plot_path}")
    if interrupted is not None:
        if ctx.main:
            print(f"\nInterrupted during epoch {interrupted}. {out / 'last.pt'} holds the last finished "
                  f"epoch; continue with: python train.py --resume (and the same flags).", file=sys.stderr)
        raise SystemExit(130)
    return history


def check_before_reading(args, ctx):
    """Refuse, before any data is downloaded or read, what cannot work: --sync-bn off CUDA, output
    folders that cannot be written, a resume with nothing to resume."""
    if args.sync_bn and ctx.device.type != "cuda":
        raise engine.TrainingError(f"--sync-bn needs CUDA: torch's SyncBatchNorm runs on GPUs only, and this "
                                   f"process trains on {ctx.device}. Drop --sync-bn: each rank then normalises "
                                   f"its own share of the batch (a larger --batch-size makes the shares larger).")
    if ctx.main:
        check_writable(args.out, "--out")
        check_writable(args.figures, "--figures")
    if args.resume and not (Path(args.out) / "last.pt").is_file():
        raise engine.TrainingError(f"There is nothing to resume in {args.out}: it has no last.pt. Start the run "
                                   f"without --resume, or pass the --out of the run to continue.")


def new_or_resumed(args, ds):
    """(model, checkpoint metadata, training state or None): a new model normalising with the
    training split's statistics, or --resume's last.pt after checking it fits this data."""
    if args.resume:
        last = Path(args.out) / "last.pt"
        net, meta, state = model_lib.load_checkpoint(last, with_train_state=True)
        if not isinstance(state, dict) or set(state) != set(TRAIN_STATE_KEYS):
            raise model_lib.CheckpointError(f"{last} holds no complete training state to resume from (only "
                                            f"last.pt has one). Start a new run, or pass the run's --out.")
        if meta["provenance"] != ds.provenance():
            raise engine.TrainingError(f"{args.out}/last.pt was trained on {meta['provenance']}, not on "
                                       f"{ds.provenance()}. Resume with the same --flag/--size/--synthetic/"
                                       f"--data-dir, or start a new run with another --out.")
        return net, meta, state
    mean, std = colour.channel_stats(ds.train.images)
    net = model_lib.build(arch=args.arch, n_classes=len(ds.class_names), in_channels=ds.channels, task=ds.task,
                          mean=mean, std=std)
    meta = {"class_names": ds.class_names, "task": ds.task, "provenance": ds.provenance(),
            "settings": {k: getattr(args, k) for k in RESULT_SETTINGS},
            "colour_reference": colour.colour_reference(ds.train.images, ds.val.images),
            "history": [], "best_epoch": None, "torch": str(torch.__version__)}
    return net, meta, None


def step_module(net, args, ctx):
    """What the training steps call: `net` itself, DDP around it under torchrun (after SyncBatchNorm
    with --sync-bn), compiled with --compile; every wrapper shares net's parameters, and net is saved."""
    step_net = net
    if ctx.world_size > 1:  # DDP starts from rank 0's weights and keeps the ranks' copies equal
        if args.sync_bn:
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)  # same parameters and state_dict keys
        step_net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
    return torch.compile(step_net) if args.compile else step_net


def train_state(opt, sched, scaler, gen, epoch, best_loss, bad_epochs, seconds):
    """last.pt's training state, exactly TRAIN_STATE_KEYS."""
    return {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": epoch,
            "best_val_loss": best_loss, "bad_epochs": bad_epochs, "rng_torch": torch.get_rng_state(),
            "rng_generator": gen.get_state(), "seconds": seconds, "scaler": scaler.state_dict()}


def restore(state, opt, sched, scaler, gen):
    """Load a training state into the optimiser, scheduler, scaler and RNGs; returns (best val loss,
    bad epochs, first epoch to run, seconds per epoch so far)."""
    opt.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_torch"])
    gen.set_state(state["rng_generator"])
    return state["best_val_loss"], state["bad_epochs"], state["epoch"] + 1, state["seconds"]


def save_epoch(out, net, meta, state, improved, history, seconds):
    """After an epoch: best.pt if it improved, last.pt with the training state, history.csv."""
    if improved:
        model_lib.save_checkpoint(out / "best.pt", net, meta)
    model_lib.save_checkpoint(out / "last.pt", net, meta, state)
    write_csv(out / "history.csv", HISTORY_COLUMNS,
              [{**row, "seconds": s} for row, s in zip(history, seconds, strict=True)])


def on_device(ds, device):
    """(train, val) splits, kept on a GPU when they fit in GPU_DATA_SHARE of its free memory."""
    if device.type != "cuda":
        return ds.train, ds.val
    budget = int(torch.cuda.mem_get_info(device)[0] * GPU_DATA_SHARE)
    train_split = data.place(ds.train, device, budget)
    val_split = data.place(ds.val, device, budget - (train_split.images.nbytes if train_split.images.is_cuda else 0))
    kept = [name for name, s in (("train", train_split), ("val", val_split)) if s.images.is_cuda]
    print(f"Images kept on {device}: "
          f"{', '.join(kept) or 'none (they do not fit; batches are copied from pinned memory)'}")
    return train_split, val_split


if __name__ == "__main__":
    cli.run(main)
