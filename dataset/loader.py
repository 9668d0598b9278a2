"""The training loader: seeded batches (docs/METHOD.md, Sampling: a seed per sample, so a resumed
run repeats the uninterrupted one) in one stream over all epochs: the workers make the next
epoch's first batches while this epoch ends (bench/loader_epochs.py: a fifth of each demo epoch
was spent waiting otherwise)."""
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from utils.misc import UserError, epoch_seed, seed_worker
from .video_dataset import collate


class SeededDataset(torch.utils.data.Dataset):
    """``dataset[index]`` drawn from a generator seeded for it alone; keys: ``(index, seed)``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, key):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


class EpochBatches(Sampler):
    """``steps`` batches of ``(index, seed)`` keys for epochs ``start`` to ``end - 1`` (but the
    first ``skip`` of ``start``), from ``shard`` (a DistributedSampler: the rank's part of each
    epoch's shuffle, the run's seed)."""

    def __init__(self, shard, batch_size, steps):
        self.shard, self.batch_size, self.steps = shard, batch_size, steps
        self.start = self.end = self.skip = 0

    def __iter__(self):
        for epoch in range(self.start, self.end):
            self.shard.set_epoch(epoch)
            indices = list(self.shard)[:self.steps * self.batch_size]
            root = epoch_seed(self.shard.seed, epoch, self.shard.rank) * 10_000_019
            keys = [(index, (root + position) % 2 ** 63) for position, index in enumerate(indices)]
            first = self.skip * self.batch_size if epoch == self.start else 0   # never read
            for b in range(first, len(keys), self.batch_size):
                yield keys[b:b + self.batch_size]


class TrainLoader:
    """``loader.epoch(e, k=0)`` yields epoch ``e``'s ``loader.steps`` batches of this process's
    shard but the first k. Epochs read in order, each to its end, come from one stream; any
    other request (the first epoch, a resumed one, one after an unfinished epoch or with k > 0)
    starts the stream anew there."""

    def __init__(self, dataset, batch_size, workers, seed, epochs, *, rank=0, world_size=1,
                 max_steps=0, pin_memory=False):
        shard = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                   seed=seed, drop_last=True)
        whole = len(shard) // batch_size
        if whole == 0:
            raise UserError(f'{len(dataset)} videos over {world_size} process(es) give no batch '
                            f'of {batch_size} (--batch_size)')
        self.steps = min(whole, max_steps) if max_steps else whole
        self.epochs = epochs
        self.batches = EpochBatches(shard, batch_size, self.steps)
        self.loader = DataLoader(SeededDataset(dataset), batch_sampler=self.batches,
                                 num_workers=workers, pin_memory=pin_memory,
                                 worker_init_fn=seed_worker, collate_fn=collate,
                                 persistent_workers=workers > 0,
                                 prefetch_factor=4 if workers else None,
                                 # the workers' seed from a generator of its own: a restarted
                                 # stream leaves the process's random numbers alone
                                 generator=torch.Generator().manual_seed(seed))
        self._stream, self._next = None, None

    def epoch(self, epoch, first_step=0):
        if not 0 <= epoch < self.epochs:
            raise ValueError(f'epoch {epoch} is outside 0..{self.epochs - 1}')
        if self._stream is None or epoch != self._next or first_step:
            self.batches.start, self.batches.end = epoch, self.epochs
            self.batches.skip = first_step
            self._stream = iter(self.loader)
        self._next = None   # until this epoch's last batch is taken
        for i in range(first_step, self.steps):
            batch = next(self._stream)
            if i + 1 == self.steps:
                self._next = epoch + 1
            yield batch


def make_loader(dataset, args, info):
    return TrainLoader(dataset, args.batch_size, args.workers, args.seed, args.epochs,
                       rank=info.rank, world_size=info.world_size,
                       max_steps=args.iters_per_epoch, pin_memory=info.device.type == 'cuda')
