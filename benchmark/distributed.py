"""Several processes, one run: process-group setup from the environment and the few collectives a run needs.

A run with ``WORLD_SIZE`` > 1 in its environment (``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``, as ``torchrun`` or ``submitit.helpers.TorchDistributedEnvironment().export()`` set
them) joins a process group: NCCL on CUDA (device ``cuda:LOCAL_RANK``), gloo on CPU. Semantics are
those of one process: a meta-update still averages ``tasks_per_step`` tasks — rank r computes the
gradients of tasks r, r + W, r + 2W, ... and the gradients are summed across ranks, so no
learning-rate rescaling is needed (``tasks_per_step`` must be a multiple of the world size W).
Rank 0 writes checkpoints, metrics and result rows; evaluation episodes are split across ranks.
"""

import os
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["setup", "rank", "world_size", "is_main", "sum_gradients", "gather_objects", "barrier", "shutdown"]


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def is_main():
    return rank() == 0


def setup(device):
    """Join the process group the environment describes (if any); return the device this rank uses."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=30))
    return device


def sum_gradients(parameters):
    """All-reduce (sum) the gradients of ``parameters`` over the ranks; missing gradients count as zero."""
    if world_size() == 1:
        return
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)


def gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank (``[obj]`` in one process)."""
    if world_size() == 1:
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier():
    if world_size() > 1:
        dist.barrier()


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()
