"""engine.py: one training step, one epoch and one validation pass: what train.py and bench.py run.

    steps = engine.Steps(step_net, task, opt, scaler, amp="auto")
    loss, acc = engine.train_epoch(steps, split, batch_size, augmentation, epoch, gen, ctx)
    val_loss, val_acc = engine.evaluate_split(model, split, batch_size, device)

The dataset's task decides the loss: cross-entropy over softmax for multi-class, binary and ordinal
tasks (as MedMNIST trains them), binary cross-entropy per label for multi-label chestmnist. With
--amp the forward pass runs under autocast (bfloat16, or float16 with a gradient scaler); the loss,
validation and metrics stay float32. Under torchrun each step sums loss and counts over the ranks.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import cli
import data
import distributed
import model as model_lib
from datasets import MULTI_LABEL
from progress import progress


class TrainingError(cli.UserError):
    """Training cannot go on (a NaN loss, a resume that does not fit)."""


def task_loss(logits, labels, task):
    """Cross-entropy for single-label tasks; binary cross-entropy per label for multi-label ones."""
    if task == MULTI_LABEL:
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
    return F.cross_entropy(logits.float(), labels)


def correct_count(logits, labels, task):
    """How many predictions are right, as medmnist's ACC counts them: argmax = label, or, for a
    multi-label task, the share of labels right at probability 0.5 (logit 0), summed over images."""
    if task == MULTI_LABEL:
        return ((logits > 0) == labels.bool()).float().mean(1).sum().item()
    return (logits.argmax(1) == labels).sum().item()


def amp_dtype(device, amp):
    """The autocast dtype for training on `device` (--amp auto|on|off), or None for float32."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def forward_loss(model, x, y, task, dtype):
    """(logits, loss) of one batch, under autocast in `dtype` (None: float32)."""
    with torch.autocast(x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        logits = model(x)
        return logits, task_loss(logits, y, task)


def backward_step(loss, opt, scaler, share=1.0):
    """One optimiser step on `loss` scaled by `share` (a rank's share of the global batch; exactly
    1.0 in one process, and multiplying by 1.0 changes no bit). The scaler passes through unless
    float16 needs it."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss * share).backward()
    scaler.step(opt)
    scaler.update()


@dataclass(frozen=True)
class Steps:
    """What each training step runs: the model (maybe a torch.compile or DDP wrapper, hence `task`
    apart), the task (which loss), the optimiser and its gradient scaler, and --amp (auto, on, off)."""
    model: torch.nn.Module
    task: str
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp: str


def train_epoch(steps, split, batch_size, augmentation, epoch, gen, ctx=distributed.ALONE, aug_gen=None):
    """One epoch of training steps over `split` in batches of `batch_size`, augmented by
    `augmentation` (shuffling and augmentation drawn from `gen`, or under torchrun this rank's
    augmentation from `aug_gen`), on ctx.device. Under torchrun, each step sums loss and counts over
    the ranks (one small all-reduce), so every rank sees the global batch's loss and stops together
    on a non-finite one."""
    steps.model.train()
    device = ctx.device
    dtype = amp_dtype(device, steps.amp)
    batches = data.batches(split, batch_size, device, gen, augmentation, (ctx.rank, ctx.world_size), aug_gen)
    with progress(batches, total=math.ceil(len(split) / batch_size), desc=f"epoch {epoch}", unit="batch",
                  leave=False) as bar:  # closed on errors too: tqdm's monitor thread redraws an open bar
        return epoch_loop(steps, bar, ctx, dtype, epoch)


def epoch_loop(steps, bar, ctx, dtype, epoch):
    """The steps of train_epoch over the batches `bar` yields: (mean loss, accuracy) over every rank."""
    loss_sum, correct, count = 0.0, 0, 0
    for x, y in bar:
        logits, loss = forward_loss(steps.model, x, y, steps.task, dtype)
        batch_loss, batch_correct, n = distributed.sum_all(
            [loss.item() * len(y), correct_count(logits, y, steps.task), len(y)], ctx)
        if not math.isfinite(batch_loss):
            raise TrainingError(f"The training loss became {batch_loss / n} in epoch {epoch}. The run "
                                f"stopped; last.pt still holds the previous epoch. Lower --lr (the learning rate "
                                f"was {steps.opt.param_groups[0]['lr']} in this epoch) and check the data for "
                                f"corrupt images.")
        # DDP averages the ranks' gradients; weighting each rank's mean by its share of the global
        # batch makes that average the gradient of the global batch's mean loss.
        backward_step(loss, steps.opt, steps.scaler, share=len(y) * ctx.world_size / n)
        loss_sum += batch_loss
        correct += batch_correct
        count += n
        bar.set_postfix(loss=f"{batch_loss / n:.3f}", refresh=False)
    return loss_sum / count, correct / count


@torch.no_grad()
def evaluate_split(model, split, batch_size, device, ctx=distributed.ALONE):
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
