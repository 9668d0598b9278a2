"""One entry point for every launch: ``python script.py`` (one process: the first visible GPU,
else the CPU), ``torch.distributed.launch`` (``--local_rank`` or ``LOCAL_RANK``), ``torchrun``
and SLURM's ``srun`` all become (rank, world size, device). NCCL on GPUs, gloo on the CPU."""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .misc import UserError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device('cpu')

    @property
    def is_main(self):
        return self.rank == 0


def _env_int(*names):
    return next((int(os.environ[n]) for n in names if n in os.environ), None)


def init_distributed(device='auto', local_rank_flag=None):
    """Join the process group the launcher asked for, if any. ``device``: 'auto' (CUDA when
    available), 'cuda' or 'cpu'; ``local_rank_flag``: ``--local_rank`` of the old launcher."""
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device == 'cuda' and not torch.cuda.is_available():
        raise UserError('--device cuda was asked but no CUDA device is visible')
    rank, world = _env_int('RANK', 'SLURM_PROCID'), _env_int('WORLD_SIZE', 'SLURM_NTASKS')
    launched = rank is not None and world is not None and world > 1
    if launched and 'MASTER_ADDR' not in os.environ:   # SLURM without torchrun
        raise UserError('distributed launch without MASTER_ADDR/MASTER_PORT; use torchrun, '
                        'torch.distributed.launch, or export them in the SLURM script')
    if launched and device == 'cuda':
        local = _env_int('LOCAL_RANK', 'SLURM_LOCALID')
        local = local if local is not None else local_rank_flag or 0
        torch.cuda.set_device(local % torch.cuda.device_count())
    dev = torch.device(device, torch.cuda.current_device() if device == 'cuda' else None)
    if launched and not dist.is_initialized():
        dist.init_process_group('nccl' if device == 'cuda' else 'gloo', rank=rank, world_size=world,
                                device_id=dev if device == 'cuda' else None)
    return DistInfo(rank, world, dev) if launched else DistInfo(device=dev)


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def get_rank():
    return dist.get_rank() if dist.is_initialized() else 0


@torch.no_grad()
def all_gather(x):
    """``x`` of every process concatenated along dim 0 (no gradient); ``x`` itself if alone."""
    if world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def broadcast(x, src=0):
    if world_size() > 1:
        dist.broadcast(x, src)
    return x


def all_reduce_mean(tensors):
    """Average tensors (e.g. gradients) over processes, in one flat buffer."""
    if world_size() == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world_size()
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()
