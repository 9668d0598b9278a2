"""What an epoch boundary costs the training loop: one iterator per epoch against one stream.

    python bench/loader_epochs.py [--dataset demo-2clip] [--batch_size 32] [--workers 12]
                                  [--epochs 12] [--step_ms 30]

The training loader (``dataset.loader.TrainLoader``) is read the two ways, side by side, with the
same workers, batches and seeds:

- ``per-epoch``: a new iterator for every epoch (persistent workers), as the engine read epochs
  before. Each epoch starts with every worker idle, and the first step waits while one worker
  makes a whole batch;
- ``stream``: ``loader.epoch(e)``, one iterator from the first epoch to the last, as the engine
  reads them now.

The consumer stands in for a GPU step: it sleeps ``--step_ms`` per batch, which, like a GPU
step, leaves the CPU cores to the workers. Printed per way: seconds per epoch, the share of it
the consumer spent waiting for data, and the first batch's wait. The first epoch (worker start)
is left out. The figures say how long an epoch of the demo takes when the GPU is fast: at the
demo's size (32 frames at 64 px) an epoch is a few batches and the step takes milliseconds.
"""
import argparse
import time

from dataset.catalog import build_dataset, default_data_root
from dataset.loader import TrainLoader


def per_epoch(loader, epoch):
    """The old way: an iterator over this epoch alone."""
    loader.batches.start, loader.batches.end = epoch, epoch + 1
    return iter(loader.loader)


def measure(loader, batches_of, epochs, step_s):
    """(seconds per epoch, data-wait share, first-batch wait) over epochs 1..epochs-1."""
    total = wait = first = 0.0
    for epoch in range(epochs):
        t0 = time.perf_counter()
        waited = 0.0
        it = batches_of(loader, epoch)
        for i in range(loader.steps):
            t = time.perf_counter()
            next(it)
            waited += time.perf_counter() - t
            if i == 0 and epoch:
                first += time.perf_counter() - t
            time.sleep(step_s)
        if epoch:
            total += time.perf_counter() - t0
            wait += waited
    n = epochs - 1
    return total / n, wait / total, first / n


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--dataset', default='demo-2clip', help='a two-view dataset name')
    p.add_argument('--data_root', default=None, help='default: the project data root')
    p.add_argument('--batch_size', type=int, default=32, help="default: the demo's GPU profile")
    p.add_argument('--workers', type=int, default=12, help="default: the demo's GPU profile")
    p.add_argument('--epochs', type=int, default=12, help='epochs per way (the first not counted)')
    p.add_argument('--step_ms', type=float, default=30.0, help='stand-in step time per batch')
    p.add_argument('--seq_len', type=int, default=32, help='frames per view')
    p.add_argument('--img_dim', type=int, default=64, help='crop size of the views')
    args = p.parse_args()
    if args.epochs < 2:
        p.error('--epochs must be at least 2 (the first is not counted)')
    data = build_dataset(args.dataset, 'train', data_root=args.data_root or default_data_root(),
                         seq_len=args.seq_len, ds=1, img_dim=args.img_dim)
    print(f'{args.dataset}: {len(data)} videos, batch {args.batch_size}, {args.workers} workers, '
          f'stand-in step {args.step_ms:g} ms')
    rows = {}
    for way, batches_of in (('per-epoch', per_epoch), ('stream', TrainLoader.epoch)):
        loader = TrainLoader(data, args.batch_size, args.workers, seed=0, epochs=args.epochs)
        rows[way] = measure(loader, batches_of, args.epochs, args.step_ms / 1000)
        del loader
    print('\n| way | s/epoch | waiting for data | first batch wait (s) |\n|---|---|---|---|')
    for way, (epoch_s, wait_share, first) in rows.items():
        print(f'| {way} | {epoch_s:.3f} | {100 * wait_share:.0f} % | {first:.3f} |')
    steps = TrainLoader(data, args.batch_size, 0, seed=0, epochs=1).steps
    ratio = rows['per-epoch'][0] / rows['stream'][0]
    print(f'\n{steps} steps an epoch; the stand-in steps alone take '
          f'{steps * args.step_ms / 1000:.3f} s. ratio per-epoch/stream s/epoch: {ratio:.2f}')


if __name__ == '__main__':
    main()
