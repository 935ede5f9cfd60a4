"""distributed.py: what train.py and evaluate.py need to run as several processes under torchrun.

    torchrun --nproc_per_node 2 train.py --synthetic           # 2 processes on this machine
    torchrun --nproc_per_node 4 evaluate.py --explain all      # 4 GPUs of one node, sharded IG
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --master_port 29500 --nproc_per_node 4 train.py

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address in each process's
environment; start() reads them and joins the process group: NCCL when the process has a CUDA
device, gloo on CPU. Without torchrun (plain `python train.py`) start() returns a one-process
context and every function here does nothing, so the scripts run exactly as they do alone.

Ranks other than 0 keep quiet on stdout (their errors still reach stderr), so a log reads like a
single run's.
"""
import datetime
import gc
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

import cli

TIMEOUT = datetime.timedelta(minutes=30)  # how long a rank waits for the others at a collective


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    launched: bool = False  # started by torchrun (even with one process)

    @property
    def main(self):
        """Rank 0: the one process that writes run files, prints and merges."""
        return self.rank == 0


ALONE = Context()  # a single process on the CPU, not launched by torchrun


def launched():
    """True inside a process started by torchrun."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def start(device_arg="auto"):
    """Join torchrun's process group, if launched by it, and pick this rank's device: with CUDA (and
    --device auto or cuda) the GPU numbered LOCAL_RANK, else the CPU. Returns the Context."""
    if not launched():
        return Context(device=cli.resolve_device(device_arg))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_arg in ("auto", "cuda") and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise cli.DeviceError(
                f"Rank {rank} is local process {local_rank} on its node, which has only "
                f"{torch.cuda.device_count()} GPU(s). Start at most that many processes per node "
                f"(torchrun --nproc_per_node {torch.cuda.device_count()}), or pass --device cpu.")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = cli.resolve_device("cpu" if device_arg == "auto" else device_arg)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=TIMEOUT,
                            **({"device_id": device} if device.type == "cuda" else {}))
    if rank != 0:
        sys.stdout = open(os.devnull, "w")
    return Context(rank, world, local_rank, device, launched=True)


def stop(ctx, finished=True):
    """Leave the process group; after `finished` work, first wait for every rank, so that no rank
    tears its connections down while another still uses them (gloo aborts on that). Garbage is
    collected first: a DistributedDataParallel wrapper left in a reference cycle could keep the
    group's gloo threads alive past destroy_process_group, into the interpreter's exit."""
    if ctx.launched and dist.is_initialized():
        gc.collect()
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def run(work, args):
    """work(args, ctx) in this process's Context (start(args.device)), leaving the process group
    after it; a rank that fails leaves at once, and torchrun then stops the others."""
    ctx = start(args.device)
    try:
        result = work(args, ctx)
    except BaseException:
        stop(ctx, finished=False)
        raise
    stop(ctx)
    return result


def sum_all(values, ctx):
    """The element-wise sum of a list of numbers over all ranks (the list itself with one rank)."""
    if ctx.world_size == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()


def max_all(value, ctx):
    """The largest of the ranks' numbers."""
    if ctx.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def broadcast(obj, ctx):
    """Rank 0's `obj` on every rank (any picklable object)."""
    if not ctx.launched:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=ctx.device)
    return box[0]


def scatter(per_rank, ctx):
    """Rank 0 passes one object per rank; each rank gets its own."""
    if not ctx.launched:
        return per_rank[0]
    box = [None]
    dist.scatter_object_list(box, per_rank if ctx.main else None, src=0)
    return box[0]


def gather(obj, ctx):
    """Every rank's `obj` as a list on rank 0 (None elsewhere)."""
    if not ctx.launched:
        return [obj]
    out = [None] * ctx.world_size if ctx.main else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier(ctx):
    if ctx.launched:
        dist.barrier()


def blocks(items, block, rank, world_size):
    """Rank `rank`'s items when `items` is cut into blocks of `block` dealt out in turn (rank r gets
    blocks r, r + world_size, ...): each block is one batch, the batch a single process makes."""
    cut = [items[i:i + block] for i in range(0, len(items), block)]
    return [x for b in cut[rank::world_size] for x in b]


def sync_buffers(net, ctx):
    """Rank 0's buffers (BatchNorm running statistics) on every rank, so that evaluation in eval
    mode is the same everywhere; each rank's own forward passes updated them from its own batches."""
    if ctx.world_size == 1:
        return
    for b in net.buffers():
        dist.broadcast(b.data, src=0)
