"""train.py: train the lightweight CNN on PathMNIST (or any MedMNIST 2D dataset).

    python train.py                          # PathMNIST 28x28 into runs/pathmnist_28/ (downloads the data)
    python train.py --flag bloodmnist        # another MedMNIST 2D dataset, into runs/bloodmnist_28/
    python train.py --size 64 --device cuda  # a MedMNIST+ size on a GPU, into runs/pathmnist_64/
    python train.py --synthetic --epochs 10  # offline demo on the SYNTHETIC dataset (not PathMNIST),
                                             # into runs/pathmnist-synthetic_28/
    python train.py --resume                 # continue <out>/last.pt after Ctrl-C or a crash
    torchrun --nproc_per_node 4 train.py     # DistributedDataParallel over 4 processes (GPUs, or
                                             # CPU processes with gloo); README "Scaling"

The dataset's task decides the loss: cross-entropy over softmax for multi-class, binary and ordinal
tasks (as MedMNIST trains them), binary cross-entropy per label for multi-label chestmnist; its
modality decides the augmentation (data.AUGMENTATION, overridable by flags). Adam, with ReduceLROnPlateau and early stopping both watching the *validation* loss (the original
script watched training accuracy). Every epoch writes <out>/last.pt and <out>/history.csv; the best
epoch on validation loss is kept as <out>/best.pt; the end writes <out>/images/accuracy_epoch.png.
The same seed and settings on the same device give the same best.pt, byte for byte: a checkpoint
holds no timings and no paths. Ctrl-C stops after saving what is finished, with exit code 130.

Under torchrun each rank trains on its share of every global batch of --batch-size (the same
shuffled order on every rank; the loss is scaled so the averaged gradient is the global batch's),
validation is split across ranks and summed, so every rank takes the same LR and early-stopping
decisions, and rank 0 alone writes the run files, in the same format as a single process.
"""
import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import data
import distributed
import model as model_lib
import plots
from progress import progress

HISTORY_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]
MIN_IMPROVEMENT = 1e-4  # a val-loss drop smaller than this does not count as progress
# The flags that decide the weights: recorded in every checkpoint (paths and threads are not).
RESULT_SETTINGS = ("flag", "epochs", "batch_size", "lr", "patience", "seed", "device", "size",
                   "synthetic", "trust_file", "flips", "stain_jitter", "colour_jitter", "amp", "compile",
                   "world_size", "sync_bn")
GPU_DATA_SHARE = 0.25  # on a GPU, keep train/val images there when they take at most this share of its free memory


class TrainingError(Exception):
    """Training cannot go on (a NaN loss, a resume that does not fit); meant for the user."""


def positive_int(text):
    """argparse type: an integer of at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def on_off(text):
    """argparse type for --flips: on or off."""
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"{text!r} is not 'on' or 'off'")
    return text == "on"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                formatter_class=model_lib.HelpFormatter)
    p.add_argument("--flag", type=data.flag_arg, default=data.FLAG, help=data.FLAG_HELP)
    p.add_argument("--epochs", type=positive_int, default=25, help="maximum number of epochs")
    p.add_argument("--batch-size", type=int, default=128, help="images per training batch")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's initial learning rate")
    p.add_argument("--patience", type=int, default=5, help="stop after this many epochs without a "
                   "lower validation loss; the learning rate halves after half as many")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, shuffling, augmentation "
                   "and dropout; the same seed on the same device gives the same history")
    p.add_argument("--device", default="auto", help=model_lib.DEVICE_HELP)
    p.add_argument("--data-dir", default="data", help="folder holding the MedMNIST npz files")
    p.add_argument("--size", type=int, default=28, choices=data.SIZES, help="image size: 28 "
                   "(MedMNIST v2) or 64/128/224 (MedMNIST+ files)")
    p.add_argument("--out", help="run folder for best.pt, last.pt and history.csv (default: "
                   "runs/<dataset>_<size>, e.g. runs/pathmnist_28 or runs/pathmnist-synthetic_28)")
    p.add_argument("--images", help="folder for the training-curve plot (default: <out>/images)")
    p.add_argument("--synthetic", action="store_true", help="train on the offline SYNTHETIC "
                   "stand-in for --flag (same channels, classes and task; for demos and tests, never a "
                   "result on the real dataset)")
    p.add_argument("--trust-file", action="store_true", help=data.TRUST_FILE_HELP)
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.pt with its "
                   "optimizer, scheduler, early-stopping and RNG state")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--memory", default="auto", choices=data.MEMORY_MODES, help=data.MEMORY_HELP)
    p.add_argument("--amp", default="auto", choices=("auto", "on", "off"), help="mixed precision for "
                   "training steps: bfloat16 autocast (float16 with a gradient scaler on GPUs without "
                   "bfloat16); auto turns it on for CUDA only. Validation, metrics and IG stay float32")
    p.add_argument("--compile", action="store_true", help="compile the training step with "
                   "torch.compile (worth it on a GPU for long runs; the first epoch pays the compile time)")
    p.add_argument("--sync-bn", action="store_true", help="under torchrun on GPUs: BatchNorm statistics "
                   "over the global batch (torch's SyncBatchNorm) instead of each rank's share")
    p.add_argument("--flips", type=on_off, metavar="{on,off}", help="random flips/rotations (the 8 symmetries of a "
                   "square): on or off (default: the dataset's, off where anatomy has a side; see "
                   "data.AUGMENTATION and the README)")
    p.add_argument("--stain-jitter", type=float, help="strength of HED stain jitter, 0 for none "
                   "(RGB only; default: 1 for pathmnist's H&E, 0 elsewhere)")
    p.add_argument("--colour-jitter", type=float, help="strength of per-channel colour (or, on one "
                   "channel, brightness/contrast) jitter, 0 for none (default: the dataset's)")
    args = p.parse_args(argv)
    args.out = args.out or str(Path("runs") / f"{data.dataset_name(args.synthetic, args.flag)}_{args.size}")
    args.images = args.images or str(Path(args.out) / "images")
    try:
        aug = data.augmentation(args.flag, args.flips, args.stain_jitter, args.colour_jitter)
    except data.DataError as e:
        p.error(str(e))
    args.flips, args.stain_jitter, args.colour_jitter = aug.flips, aug.stain, aug.colour  # as recorded
    args.augment = aug
    return args


def task_loss(logits, labels, task):
    """Cross-entropy for single-label tasks; binary cross-entropy per label for multi-label ones."""
    if task == data.MULTI_LABEL:
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
    return F.cross_entropy(logits.float(), labels)


def correct_count(logits, labels, task):
    """How many predictions are right, as medmnist's ACC counts them: argmax = label, or, for a
    multi-label task, the share of labels right at probability 0.5 (logit 0), summed over images."""
    if task == data.MULTI_LABEL:
        return ((logits > 0) == labels.bool()).float().mean(1).sum().item()
    return (logits.argmax(1) == labels).sum().item()


def amp_dtype(device, amp):
    """The autocast dtype for training on `device` (--amp), or None for float32."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def train_epoch(model, task, split, opt, gen, args, device, epoch, scaler, ctx=distributed.Context(),
                aug_gen=None):
    """One epoch of training steps; `model` may be a torch.compile or DDP wrapper (hence `task`
    apart). Under torchrun, each step sums loss and counts over the ranks (one small all-reduce),
    so every rank sees the global batch's loss and stops together on a non-finite one."""
    model.train()
    dtype = amp_dtype(device, args.amp)
    loss_sum, correct, count = 0.0, 0, 0
    bar = progress(data.batches(split, args.batch_size, device, gen, args.augment, (ctx.rank, ctx.world_size),
                                aug_gen),
                   total=math.ceil(len(split) / args.batch_size), desc=f"epoch {epoch}", unit="batch", leave=False)
    for x, y in bar:
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            logits = model(x)
            loss = task_loss(logits, y, task)
        batch_loss, batch_correct, n = distributed.sum_all(
            [loss.item() * len(y), correct_count(logits, y, task), len(y)], ctx)
        if not math.isfinite(batch_loss):
            raise TrainingError(f"The training loss became {batch_loss / n} in epoch {epoch}. The run "
                                f"stopped; last.pt still holds the previous epoch. Lower --lr "
                                f"(now {args.lr}) and check the data for corrupt images.")
        # DDP averages the ranks' gradients; weighting each rank's mean by its share of the global
        # batch makes that average the gradient of the global batch's mean loss (exactly 1.0 alone,
        # and multiplying by 1.0 changes no bit).
        share = len(y) * ctx.world_size / n
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss * share).backward()  # the scaler passes through unless float16 needs it
        scaler.step(opt)
        scaler.update()
        loss_sum += batch_loss
        correct += batch_correct
        count += n
        bar.set_postfix(loss=f"{batch_loss / n:.3f}", refresh=False)
    return loss_sum / count, correct / count


@torch.no_grad()
def evaluate_split(model, split, batch_size, device, ctx=distributed.Context()):
    """(loss, accuracy) on a whole split in eval mode; under torchrun each rank predicts a
    contiguous share and the sums are added up over the ranks."""
    task = model.config["task"]
    if ctx.world_size == 1:
        logits = model_lib.predict_logits(model, split.images, batch_size=4 * batch_size, device=device)
        labels = split.labels.cpu()  # predict_logits answers on the CPU; the labels may be on a GPU
        return task_loss(logits, labels, task).item(), correct_count(logits, labels, task) / len(split)
    share = torch.arange(len(split)).tensor_split(ctx.world_size)[ctx.rank]
    lo, hi = (int(share[0]), int(share[-1]) + 1) if len(share) else (0, 0)
    logits = model_lib.predict_logits(model, split.images[lo:hi], batch_size=4 * batch_size, device=device)
    labels = split.labels[lo:hi].cpu()
    loss_sum, right, n = distributed.sum_all(
        [task_loss(logits, labels, task).item() * (hi - lo) if hi > lo else 0.0,
         correct_count(logits, labels, task), hi - lo], ctx)
    return loss_sum / n, right / n


def rank_seed(seed, rank, epoch):
    """Under torchrun: the seed of one rank's dropout and augmentation in one epoch. A function of
    (seed, rank, epoch) alone, so a resumed run draws what the uninterrupted one would have."""
    return (seed * 1_000_003 + rank) * 10_007 + epoch


def main(argv=None):
    return distributed.run(train, parse_args(argv))


def train(args, ctx):
    out, device = Path(args.out), ctx.device
    args.world_size = ctx.world_size
    if args.sync_bn and device.type != "cuda":
        raise TrainingError(f"--sync-bn needs CUDA: torch's SyncBatchNorm runs on GPUs only, and this "
                            f"process trains on {device}. Drop --sync-bn: each rank then normalises its "
                            f"own share of the batch (a larger --batch-size makes the shares larger).")
    if ctx.main:  # before any data is downloaded or read
        data.check_writable(out, "--out")
        data.check_writable(Path(args.images), "--images")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    if args.resume and not (out / "last.pt").is_file():  # before any data is downloaded or read
        raise TrainingError(f"There is nothing to resume in {out}: it has no last.pt. Start the run "
                            f"without --resume, or pass the --out of the run to continue.")

    ds = data.load(args.data_dir, args.size, args.synthetic, args.memory, args.flag, args.trust_file)
    label = data.describe(ds.provenance())
    print(f"Training on {label}: {len(ds.train)} train / {len(ds.val)} val images, device {device}; "
          f"{ds.task}, {ds.channels} channel(s); augmentation: {args.augment.summary()}")
    if ctx.world_size > 1:
        print(f"DistributedDataParallel over {ctx.world_size} processes ({'NCCL' if device.type == 'cuda' else 'gloo'}): a global "
              f"batch of {args.batch_size} is {args.batch_size / ctx.world_size:.0f} images per rank")

    gen = torch.Generator().manual_seed(args.seed)  # shuffling and augmentation
    if args.resume:
        net, meta, ts = model_lib.load_checkpoint(out / "last.pt", with_train_state=True)
        check_resumable(meta, ds, args)
    else:
        mean, std = data.channel_stats(ds.train.images)
        net = model_lib.build(n_classes=len(ds.class_names), in_channels=ds.channels, task=ds.task,
                              mean=mean, std=std)
        meta = {"class_names": ds.class_names, "task": ds.task, "provenance": ds.provenance(),
                "settings": {k: getattr(args, k) for k in RESULT_SETTINGS},
                "colour_reference": data.colour_reference(ds.train.images, ds.val.images),
                "history": [], "best_epoch": None, "torch": str(torch.__version__)}
        ts = None
    net.to(device)
    train_split, val_split = on_device(ds, device)
    step_net = net
    if ctx.world_size > 1:  # DDP starts from rank 0's weights and keeps the ranks' copies equal
        if args.sync_bn:
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)  # same parameters and state_dict keys
        step_net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device] if device.type == "cuda" else None)
    step_net = torch.compile(step_net) if args.compile else step_net  # shares net's parameters; net is saved
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype(device, args.amp) == torch.float16)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5,
                                                       patience=max(1, args.patience // 2))
    best_loss, bad_epochs, start = math.inf, 0, 1
    if ts is not None:
        opt.load_state_dict(ts["optimizer"])
        scaler.load_state_dict(ts["scaler"])
        sched.load_state_dict(ts["scheduler"])
        best_loss, bad_epochs, start = ts["best_val_loss"], ts["bad_epochs"], ts["epoch"] + 1
        torch.set_rng_state(ts["rng_torch"])
        gen.set_state(ts["rng_generator"])
        print(f"Resuming {out / 'last.pt'} after epoch {ts['epoch']}")
    history = meta["history"]  # without timings, which live in last.pt's train_state alone
    seconds_per_epoch = [] if ts is None else ts["seconds"]
    params = model_lib.count_params(net)
    print(f"Model: {params:,} parameters; normalisation mean {[round(m, 4) for m in net.config['mean']]} "
          f"std {[round(s, 4) for s in net.config['std']]}")

    epoch = start - 1
    try:
        for epoch in range(start, args.epochs + 1):
            if bad_epochs >= args.patience:
                break
            t0 = time.perf_counter()
            aug_gen = None
            if ctx.world_size > 1:  # each rank its own dropout and augmentation draws
                torch.manual_seed(rank_seed(args.seed, ctx.rank, epoch))
                aug_gen = torch.Generator().manual_seed(rank_seed(args.seed, ctx.rank, epoch))
            train_loss, train_acc = train_epoch(step_net, ds.task, train_split, opt, gen, args, device,
                                                epoch, scaler, ctx, aug_gen)
            distributed.sync_buffers(net, ctx)
            val_loss, val_acc = evaluate_split(net, val_split, args.batch_size, device, ctx)
            seconds = time.perf_counter() - t0
            row = {"epoch": epoch, "train_loss": round(train_loss, 6), "train_acc": round(train_acc, 6),
                   "val_loss": round(val_loss, 6), "val_acc": round(val_acc, 6),
                   "lr": opt.param_groups[0]["lr"]}
            history.append(row)
            seconds_per_epoch.append(round(seconds, 3))
            sched.step(val_loss)
            improved = val_loss < best_loss - MIN_IMPROVEMENT
            if improved:
                best_loss, bad_epochs, meta["best_epoch"] = val_loss, 0, epoch
            else:
                bad_epochs += 1
            print(f"epoch {epoch:3d}  train loss {train_loss:.4f} acc {train_acc:.4f}  val loss "
                  f"{val_loss:.4f} acc {val_acc:.4f}  lr {row['lr']:.2e}  {seconds:.1f}s "
                  f"({len(ds.train) / seconds:.0f} img/s){'  *best' if improved else ''}")
            train_state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),  # TRAIN_STATE_KEYS
                           "epoch": epoch, "best_val_loss": best_loss, "bad_epochs": bad_epochs,
                           "rng_torch": torch.get_rng_state(), "rng_generator": gen.get_state(),
                           "seconds": seconds_per_epoch, "scaler": scaler.state_dict()}
            if not ctx.main:  # rank 0 writes the run files
                continue
            if improved:
                model_lib.save_checkpoint(out / "best.pt", net, meta)
            model_lib.save_checkpoint(out / "last.pt", net, meta, train_state)
            data.write_csv(out / "history.csv", HISTORY_COLUMNS,
                           [{**row, "seconds": s} for row, s in zip(history, seconds_per_epoch)])
    except KeyboardInterrupt:
        interrupted = epoch
    else:
        interrupted = None
    if bad_epochs >= args.patience:
        print(f"Early stop: no lower validation loss for {args.patience} epochs.")
    if history and ctx.main:
        plot_path = Path(args.images) / "accuracy_epoch.png"
        plots.plot_history(history, plot_path, f"Training on {label}", meta["best_epoch"])
        print(f"Best epoch {meta['best_epoch']} (val loss {best_loss:.4f}) -> {out / 'best.pt'}; "
              f"curves -> {plot_path}")
    if interrupted is not None:
        if ctx.main:
            print(f"\nInterrupted during epoch {interrupted}. {out / 'last.pt'} holds the last finished "
                  f"epoch; continue with: python train.py --resume (and the same flags).", file=sys.stderr)
        raise SystemExit(130)
    return history


def on_device(ds, device):
    """(train, val) splits, kept on a GPU when they fit in GPU_DATA_SHARE of its free memory."""
    if device.type != "cuda":
        return ds.train, ds.val
    budget = int(torch.cuda.mem_get_info(device)[0] * GPU_DATA_SHARE)
    train_split = data.place(ds.train, device, budget)
    val_split = data.place(ds.val, device, budget - (train_split.images.nbytes if train_split.images.is_cuda else 0))
    kept = [name for name, s in (("train", train_split), ("val", val_split)) if s.images.is_cuda]
    print(f"Images kept on {device}: {', '.join(kept) or 'none (they do not fit; batches are copied from pinned memory)'}")
    return train_split, val_split


def check_resumable(meta, ds, args):
    """Refuse a resume onto different data: the history would stop meaning anything."""
    if data.with_defaults(meta["provenance"]) != ds.provenance():
        raise TrainingError(f"{args.out}/last.pt was trained on {meta['provenance']}, not on "
                            f"{ds.provenance()}. Resume with the same --flag/--size/--synthetic/--data-dir, "
                            f"or start a new run with another --out.")


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # each line reaches a piped log when printed
    try:
        main()
    except (data.DataError, model_lib.CheckpointError, model_lib.DeviceError, TrainingError) as e:
        sys.exit(f"error: {e}")
