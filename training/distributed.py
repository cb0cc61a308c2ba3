"""Data-parallel training with torchrun: the process group, the sharding and the gathering.

    torchrun --nproc_per_node N -m training.train ...       # one run
    make train NPROC=N                                       # the default set, each run on N processes

Without torchrun's environment (WORLD_SIZE unset or 1) nothing here does anything and training
is the single-process loop, unchanged. With it: one process per device, gloo on CPU, NCCL on
CUDA (device = LOCAL_RANK), gradients averaged by DistributedDataParallel.

The batch/learning-rate rule: `--batch-size` is the GLOBAL batch. Each of the N ranks takes
batch_size / N images per step (N must divide it), DDP averages the N gradients, so one optimizer
step sees the same images in number as single-process training and `--lr` is used as given. A
larger global batch is a choice of --batch-size; scale --lr with it (linearly, with warm-up, as
Goyal et al. 2017) on purpose, not by accident of N.

Data: every rank holds the (in-memory) splits; DistributedSampler deals the training images out
(seeded, re-shuffled per epoch by set_epoch), evaluation splits are cut into N contiguous shards
whose outputs are gathered in order, so every rank computes the same metrics and takes the same
early-stopping and best-epoch decisions. BatchNorm: SyncBatchNorm on CUDA; on CPU (gloo has no
SyncBatchNorm) each rank normalises its own B/N images and DDP broadcasts rank 0's running
statistics. Rank 0 alone writes checkpoints, histories, plots and reports. Reproducible per seed
for a given N: the sampler, the model initialisation (same seed on every rank, and DDP
broadcasts rank 0's weights) and the per-rank augmentation generator (seed, rank) are seeded.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.utils.data.distributed import DistributedSampler


@dataclass(frozen=True)
class Dist:
    """Where this process stands: rank among world_size, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(timeout_s: float = 600) -> Dist:
    """Join torchrun's process group (gloo on CPU, NCCL on CUDA); a plain Dist() without torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device)


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def per_rank_batch(global_batch: int, d: Dist) -> int:
    if global_batch % d.world_size:
        raise ValueError(f"--batch-size {global_batch} is the global batch: it must be a multiple of the "
                         f"{d.world_size} processes")
    return global_batch // d.world_size


def wrap(model: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """The model on its device; under torchrun, in DDP (SyncBatchNorm on CUDA)."""
    model = model.to(d.device)
    if not d.enabled:
        return model
    if d.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[d.local_rank])
    return torch.nn.parallel.DistributedDataParallel(model)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module (what a checkpoint stores: no 'module.' prefixes, no SyncBatchNorm)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def train_order(n: int, epoch: int, seed: int, d: Dist) -> torch.Tensor:
    """This rank's training indices for one epoch (all ranks together cover every index)."""
    sampler = DistributedSampler(range(n), num_replicas=d.world_size, rank=d.rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler), dtype=torch.int64)


def shard(n: int, d: Dist) -> slice:
    """This rank's contiguous part of an evaluation split of n items."""
    bounds = [len(part) for part in torch.arange(n).tensor_split(d.world_size)]
    start = sum(bounds[: d.rank])
    return slice(start, start + bounds[d.rank])


def gather(t: torch.Tensor, n: int, d: Dist) -> torch.Tensor:
    """The shards (first dimension) of every rank, concatenated in rank order: all n rows, on every rank."""
    if not d.enabled:
        return t
    sizes = [len(part) for part in torch.arange(n).tensor_split(d.world_size)]
    # all_gather needs equal shapes: pad every shard to the largest, trim after.
    padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=d.device)
    padded[: len(t)] = t.to(d.device)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)]).cpu()


def sum_all(values: list[float], d: Dist) -> list[float]:
    """Element-wise sums over all ranks (training loss, correct and seen counts)."""
    if not d.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def augment_generator(seed: int, d: Dist) -> torch.Generator:
    """Rank 0 draws what single-process training draws; other ranks their own, seeded, stream."""
    return torch.Generator().manual_seed(seed if d.rank == 0 else seed * 1_000_003 + d.rank)


def sync_buffers(model: torch.nn.Module, d: Dist) -> None:
    """Rank 0's BatchNorm running statistics on every rank, so that evaluation shards agree."""
    if d.enabled:
        for buf in unwrap(model).buffers():
            dist.broadcast(buf.data, src=0)


def barrier(d: Dist) -> None:
    """Wait until rank 0 has written what the others will read."""
    if d.enabled:
        dist.barrier()


@contextmanager
def main_first(d: Dist) -> Iterator[None]:
    """Rank 0 runs the block first (filling the decode cache), the others after it, from the cache."""
    if d.enabled and not d.is_main:
        dist.barrier()
    yield
    if d.enabled and d.is_main:
        dist.barrier()
