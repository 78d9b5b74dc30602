"""One process or many: `torchrun --nproc_per_node N -m finetune ...` sets the environment.

With WORLD_SIZE > 1 the process group starts with gloo on CPU and nccl on CUDA. The model is
wrapped in DistributedDataParallel, which registers only parameters that require grad: the
adapters and the head are the only tensors all-reduced; the frozen base never travels. Rank 0
writes every file; the others compute the same checks and read the same checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from finetune.errors import RecipeError


@dataclass
class Dist:
    """This process's place in the run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # "gloo" / "nccl" when distributed
    owns_group: bool = False  # we started the process group, so we end it

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def _device(requested: str, local_rank: int) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RecipeError(f"device {requested!r} asked for, but CUDA is not available here: use --device cpu")
        device = torch.device(requested if ":" in requested else f"cuda:{local_rank}")
        if device.index >= torch.cuda.device_count():
            raise RecipeError(f"device {device} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)")
        return device
    return torch.device("cpu")


def setup(device: str = "auto") -> Dist:
    """The process group from torchrun's environment (or one already started), and this rank's device."""
    if dist.is_available() and dist.is_initialized():
        rank, world, owns = dist.get_rank(), dist.get_world_size(), False
    else:
        world, rank, owns = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")), False
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    dev = _device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend)
        owns = True
    backend = dist.get_backend() if world > 1 else None
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return Dist(rank, world, local_rank, dev, backend, owns)


def teardown(d: Dist) -> None:
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def all_sum(values: list[float], d: Dist) -> list[float]:
    """Sums over processes (float64, on the backend's device)."""
    if not d.enabled:
        return list(values)
    device = d.device if d.backend == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def gather(obj, d: Dist) -> list:
    """Every process's `obj`, in rank order, on every process."""
    if not d.enabled:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def wrap(model: nn.Module, d: Dist) -> nn.Module:
    """DistributedDataParallel around the adapted model; the model itself when not distributed.

    Buffers are not broadcast: the frozen base's (BatchNorm statistics) stay as loaded, and BatchNorm
    runs in eval mode (see loop.freeze_frozen_norms), so every process holds the same values.
    """
    if not d.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    import inspect

    ids = [d.device.index] if d.device.type == "cuda" else None
    # reason: torch 2.14 deprecates broadcast_buffers for forward_sync_buffers (which still syncs once at
    # init: harmless, every process built the same base); older torch only has broadcast_buffers.
    newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    no_sync = {"forward_sync_buffers": False} if newer else {"broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=ids, **no_sync)


def reduced_tensors(model: nn.Module) -> tuple[int, int]:
    """(tensors, values) that DDP all-reduces: the parameters that require grad."""
    params = [p for p in model.parameters() if p.requires_grad]
    return len(params), sum(p.numel() for p in params)
