"""Multi-GPU and multi-node training: torchrun + DistributedDataParallel (NCCL on GPUs, gloo on CPUs).

    torchrun --standalone --nproc_per_node=8 main.py ...                       # one machine, 8 GPUs
    torchrun --nnodes=2 --node_rank=R --master_addr=HOST --master_port=29500 \\
             --nproc_per_node=8 main.py ...                                    # two machines

--batch-size is the global batch: each of the W ranks takes its slice of every global batch (RankBatches),
so a step sees exactly the sequences one process would, and --lr needs no rescaling. In-batch negatives and
false-negative sets are gathered from every rank, and each rank's loss is weighted by its share of the global
target rows, so the averaged gradient is the single-process gradient (up to floating-point summation order).
Rank 0 alone validates, logs and writes checkpoints; the others wait for it.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn

Tensor = torch.Tensor


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device_opt: str, timeout_min: float = 120.0) -> tuple[Dist, torch.device]:
    """-> (this process's place, its device). Under torchrun (WORLD_SIZE > 1) joins the process group, whose
    collectives wait `timeout_min` minutes: long enough for rank 0 to validate and write a checkpoint alone
    (the default 10 minutes of NCCL is not, at the real catalogue size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        return Dist(), torch.device(auto if device_opt == "auto" else device_opt)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device_opt != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_min))
    return Dist(rank, world, local), torch.device("cuda", local) if cuda else torch.device("cpu")


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def all_true(flag: Tensor, d: Dist) -> bool:
    """One bool for every rank (so all of them take the same branch); a sync."""
    if d.enabled:
        flag = flag.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def mean_over_ranks(x: Tensor, d: Dist) -> Tensor:
    if d.enabled:
        x = x.detach().clone()
        dist.all_reduce(x)
        x /= d.world
    return x


def row_counts(n: int, device: torch.device, d: Dist) -> list[int]:
    """Every rank's number of rows (target positions differ from rank to rank)."""
    if not d.enabled:
        return [n]
    mine = torch.tensor([n], device=device)
    sizes = [torch.zeros_like(mine) for _ in range(d.world)]
    dist.all_gather(sizes, mine)
    return [int(s) for s in sizes]


def gather_rows(x: Tensor, sizes: list[int], d: Dist) -> Tensor:
    """Concatenate every rank's rows (sizes[r] rows on rank r) in rank order. Float tensors keep their
    gradient: backward sends each rank the gradient of its own rows from every rank's loss."""
    if not d.enabled:
        return x
    m = max(sizes)
    padded = torch.cat([x, x.new_zeros(m - x.shape[0], *x.shape[1:])])  # all_gather needs equal shapes
    if x.is_floating_point() and x.requires_grad:
        parts = dist_nn.all_gather(padded)
    else:
        parts = [torch.empty_like(padded) for _ in range(d.world)]
        dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def cleanup(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
