"""Small torch.distributed helpers for DDP training (torchrun, NCCL on GPUs, gloo on the CPU).

    # torchrun --nproc_per_node 2 -m layoutgen train --config X
    from layoutgen.training import distributed as dist_utils
    dist_utils.init_from_env()          # no-op (returns False) without torchrun's env vars
    ...
    Trainer(...).fit()                  # shards the data, averages gradients, rank 0 writes
    dist_utils.cleanup()

Every helper works without a process group too: then world_size() is 1, rank() 0, is_main() True, barrier() does
nothing and all_reduce_mean returns its input, so single-process code needs no special case.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

__all__ = ["all_reduce_gradients", "all_reduce_mean", "barrier", "cleanup", "init_from_env", "is_distributed",
           "is_main", "local_rank", "rank", "world_size"]


def is_distributed() -> bool:
    """True when a torch.distributed process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that logs and writes files."""
    return rank() == 0


def init_from_env(backend: str | None = None, timeout_s: float | None = None) -> bool:
    """Initialises the default process group from torchrun's env vars (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT); returns True when a group is (now) initialised, False without those vars (a plain single process).

    The backend defaults to "nccl" when CUDA is available (and then the CUDA device is set to LOCAL_RANK) and "gloo"
    on the CPU. Calling it again after a successful init does nothing.
    """
    if is_distributed():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        raise RuntimeError("distributed: RANK/WORLD_SIZE are set but MASTER_PORT is not (launch with torchrun)")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    kwargs = {}
    if timeout_s is not None:
        import datetime
        kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend=backend, rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]), init_method="env://", **kwargs)
    return True


def barrier() -> None:
    """Waits for every rank; nothing without a process group."""
    if is_distributed() and world_size() > 1:
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of `tensor` over the ranks (a new tensor; the input itself without a group)."""
    if not is_distributed() or world_size() == 1:
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / world_size()


def all_reduce_gradients(params: list[torch.nn.Parameter], bucket_mb: float = 25.0) -> None:
    """Replaces every `p.grad` with its mean over the ranks, in flattened buckets (one all_reduce per bucket).

    Ranks must agree on which parameters have a gradient: a parameter with a gradient on some rank but None on this
    one gets zeros here first (decided by one small all_reduce), parameters without a gradient anywhere stay None.
    """
    if not is_distributed() or world_size() == 1:
        return
    world = world_size()
    device = next((p.grad.device for p in params if p.grad is not None), params[0].device if params else "cpu")
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    grads = []
    for p, any_rank in zip(params, has.tolist()):
        if not any_rank:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    limit = int(bucket_mb * 2 ** 20)
    buckets: dict[tuple, list[list[torch.Tensor]]] = {}
    sizes: dict[tuple, int] = {}
    for g in grads:
        key, nbytes = (g.dtype, g.device), g.numel() * g.element_size()
        group = buckets.setdefault(key, [[]])
        if group[-1] and sizes[key] + nbytes > limit:
            group.append([])
            sizes[key] = 0
        group[-1].append(g)
        sizes[key] = sizes.get(key, 0) + nbytes
    for groups in buckets.values():
        for bucket in groups:
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= world
            for g, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                g.copy_(synced)


def cleanup() -> None:
    """Destroys the process group when there is one."""
    if is_distributed():
        dist.destroy_process_group()
