"""Many processes on plain torch.distributed: set-up from torchrun's environment, rank-0 helpers,
and data parallelism applied to a finished model from the outside (the model file has no
distributed code; torchtitan's parallelize.py keeps the same separation).

- DDP (Li et al. 2020, "PyTorch Distributed"): every rank holds the whole model, and gradients
  are all-reduced (averaged) after backward, so W ranks with B rows each step like one process
  with W*B rows.
- FSDP2 (`torch.distributed.fsdp.fully_shard`, after ZeRO-3, Rajbhandari et al. 2020): each rank
  keeps 1/W of every parameter, gradient and optimizer state; a block's parameters are
  all-gathered just before it runs and the gradients reduce-scattered after. We shard each
  transformer block as one unit, then the root (embedding, final norm, output head).
The backend is gloo on CPU and NCCL on CUDA; nothing else changes between the two.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel as DDP


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_rank0() -> bool:
    return rank() == 0


def init_from_env(device: str = "cpu") -> tuple[int, int, str]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...);
    a plain `python` launch stays single-process. Returns (rank, world_size, device)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
        backend = "nccl"
    else:
        backend = "gloo"
    if not is_distributed():
        dist.init_process_group(backend, timeout=timedelta(minutes=10))
    return dist.get_rank(), dist.get_world_size(), device


def teardown():
    if is_distributed():
        # a barrier first: destroying the group while a peer still runs a collective aborts
        # (seen with gloo on CPU processes, tests/train/test_train_distributed.py)
        dist.barrier()
        dist.destroy_process_group()


def barrier():
    if is_distributed():
        dist.barrier()


def mean_over_ranks(value: torch.Tensor) -> float:
    """A scalar averaged over ranks (every rank gets the same number)."""
    if not is_distributed():
        return float(value)
    t = value.detach().float().reshape(1).to("cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t) / dist.get_world_size()


def wrap(model: nn.Module, parallel: str, device: str = "cpu") -> nn.Module:
    """Apply data parallelism to a finished model: 'none', 'ddp' or 'fsdp'."""
    if parallel == "none" or not is_distributed():
        if parallel != "none" and not is_distributed():
            raise ValueError(f"--parallel {parallel} needs several processes: launch with "
                             "`torchrun --nproc_per_node N -m annotated_llama pretrain ...`")
        return model
    if parallel == "ddp":
        ids = [torch.device(device).index] if device.startswith("cuda") else None
        return DDP(model, device_ids=ids)
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard  # here: ~1 s to import, and only FSDP runs need it
        mesh = init_device_mesh(torch.device(device).type, (world_size(),))
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)  # the root: embedding, final norm, output head
        return model
    raise ValueError(f"--parallel must be none, ddp or fsdp, got {parallel!r}")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DDP wrapper (FSDP2 keeps the module itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def no_sync(model: nn.Module, sync: bool):
    """Skip DDP's gradient all-reduce on micro-batches before the last one of a step (the
    gradients are summed locally and reduced once)."""
    if not sync and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()
