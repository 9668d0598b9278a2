"""One distributed entry point for every way a job is launched (SPEC §2).

``python script.py`` (one process: first visible GPU, else CPU), ``python -m
torch.distributed.launch`` (``--local-rank=K``/``--local_rank=K`` or ``LOCAL_RANK``),
``torchrun`` single- or multi-node, and SLURM (``srun``) all become (rank, world size, device).
NCCL on GPUs, gloo on the CPU.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device('cpu')

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def _env_int(*names):
    for n in names:
        if n in os.environ:
            return int(os.environ[n])
    return None


def init_distributed(device='auto', local_rank_flag=None):
    """Initialise the process group if the launcher asked for one; return :class:`DistInfo`.

    ``device``: 'auto' (CUDA when available), 'cuda' or 'cpu'. ``local_rank_flag`` is the value
    of ``--local_rank``/``--local-rank`` given by ``torch.distributed.launch``, if any.
    """
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device == 'cuda' and not torch.cuda.is_available():
        raise ValueError('--device cuda was asked but no CUDA device is visible')
    rank = _env_int('RANK', 'SLURM_PROCID')
    world = _env_int('WORLD_SIZE', 'SLURM_NTASKS')
    local = _env_int('LOCAL_RANK', 'SLURM_LOCALID')
    if local is None:
        local = local_rank_flag if local_rank_flag is not None else 0
    if rank is None or world is None or world <= 1:
        dev = torch.device('cuda', torch.cuda.current_device()) if device == 'cuda' else torch.device('cpu')
        return DistInfo(0, 1, 0, dev)
    if 'MASTER_ADDR' not in os.environ:  # SLURM without torchrun: first node of the allocation
        raise ValueError('distributed launch without MASTER_ADDR/MASTER_PORT; use torchrun, '
                           'torch.distributed.launch, or export them in the SLURM script')
    if device == 'cuda':
        torch.cuda.set_device(local % torch.cuda.device_count())
        dev = torch.device('cuda', torch.cuda.current_device())
        backend = 'nccl'
    else:
        dev, backend = torch.device('cpu'), 'gloo'
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                **({'device_id': dev} if backend == 'nccl' else {}))
    return DistInfo(rank, world, local, dev)


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@torch.no_grad()
def all_gather(x):
    """Concatenate ``x`` of every process along dim 0 (no gradient); ``x`` itself if alone."""
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
    """Average tensors (e.g. gradients) over processes in one flat buffer."""
    if world_size() == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
