"""Distributed training: the same `train(cfg)` entry point under torchrun.

    torchrun --nproc_per_node 8 -m omnitalk.train.cli train configs/mini-omni2-stage3.yaml
    (or `omnitalk train ...` once wired into the main CLI; torchrun's --no-python runs console scripts)

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. With WORLD_SIZE > 1 the loop
initialises the process group (nccl on CUDA, gloo on CPU), wraps the model in DDP (`strategy: ddp`) or
shards it with FSDP (`strategy: fsdp`, torch's fully_shard: one unit per transformer block plus the root,
which holds the tied embedding/head, the adapters and ln_f), and gives each rank its shard of every global
micro-batch (items rank::world). Losses are normalised by the *global* token counts (losses.py) and each
rank's loss is scaled by the world size before DDP/FSDP average the gradients, so a global batch gives the
same update — and the same loss trajectory — as one process running it whole.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # we called init_process_group (and must destroy it)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world() -> tuple[int, int, int]:
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def resolve_device(pref: str, local_rank: int = 0) -> torch.device:
    if pref == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(pref)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def setup(device_pref: str = "auto") -> DistInfo:
    """Read torchrun's environment; initialise the process group when WORLD_SIZE > 1."""
    rank, world, local_rank = env_world()
    device = resolve_device(device_pref, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = False
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world, **kwargs)
        owns = True
    return DistInfo(rank, world, local_rank, device, owns)


def teardown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap(module: torch.nn.Module, info: DistInfo, strategy: str) -> torch.nn.Module:
    """DDP or FSDP around the TrainModule (a no-op for one process)."""
    if not info.enabled:
        return module
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in module.lm.transformer.h:
            fully_shard(block)
        fully_shard(module)
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(module, device_ids=ids)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_flag(flag: bool, info: DistInfo) -> bool:
    """True on every rank when any rank raised it (e.g. SIGTERM reached one of them)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shard(indices: list[int], info: DistInfo) -> tuple[list[int], float]:
    """This rank's items of a global batch, and the loss scale: when a batch has fewer items than ranks,
    an idle rank repeats item 0 with scale 0 (it must still run forward/backward for the collectives)."""
    mine = indices[info.rank::info.world]
    if not mine:
        return indices[:1], 0.0
    return mine, 1.0


# ---- local multi-process launch (tests, CPU boxes without torchrun) ---------------------------------
def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_entry(rank: int, world: int, port: int, cfg_dicts: list, run_kwargs: dict, threads: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(threads)
    from omnitalk.train.config import TrainConfig
    from omnitalk.train.loop import run

    cuda = torch.cuda.is_available() and TrainConfig.from_dict(cfg_dicts[0]).device != "cpu"
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)  # one group for all runs
    try:
        for d in cfg_dicts:
            run(TrainConfig.from_dict(d), **run_kwargs)
    finally:
        dist.destroy_process_group()


def spawn_train(cfgs, nprocs: int, threads: int = 1, start_method: str = "spawn", **run_kwargs) -> None:
    """Run `loop.run(cfg, **run_kwargs)` for each config (one or a list, in order) in `nprocs` local
    processes sharing one process group (gloo/nccl on 127.0.0.1), as torchrun would; rank 0 writes the
    outputs. Raises if any rank fails. start_method "fork" (CPU only) skips re-importing torch in the
    children; it is safe here because each child runs with `threads` intra-op threads (default 1)."""
    import torch.multiprocessing as mp

    cfgs = cfgs if isinstance(cfgs, (list, tuple)) else [cfgs]
    mp.start_processes(_spawn_entry, args=(nprocs, free_port(), [c.to_dict() for c in cfgs], run_kwargs, threads),
                       nprocs=nprocs, join=True, start_method=start_method)
