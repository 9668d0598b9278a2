"""Small helpers: the error type, run provenance, JSON-lines logs, seeding, learning rate."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class UserError(Exception):
    """Bad input (a wrong flag, file, key or value, named in the message): ``run_main`` prints
    it as one line. Every other exception is a bug and keeps its traceback."""

    def __init__(self, message):
        # from a data-loader worker: 'Caught UserError in DataLoader worker...', its traceback
        if message.startswith('Caught UserError in DataLoader worker'):
            message = message.rstrip().rsplit('UserError: ', 1)[-1]
        super().__init__(message)


def git_revision():
    """``<sha>`` or ``<sha>-dirty``; 'unknown' outside a git checkout."""
    try:   # --exclude=*: the commit itself, never a tag's name
        return subprocess.run(['git', 'describe', '--always', '--dirty', '--abbrev=40',
                               '--exclude=*'], cwd=PROJECT_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or 'unknown'
    except (OSError, subprocess.SubprocessError):
        return 'unknown'


def format_args(args):
    return '\n'.join(f'  {k}: {v}' for k, v in sorted(vars(args).items()))


def plain_args(args):   # storable in a weights_only checkpoint
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else
                list(v) if isinstance(v, (list, tuple)) else str(v))
            for k, v in vars(args).items()}


def log_epoch(path, record):
    """Append an epoch's record, dropping those of that epoch and later (a resumed run trains
    them again): the log reads as one run."""
    path = Path(path)
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [line for line in lines
            if line.strip() and json.loads(line).get('epoch', -1) < record['epoch']]
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(''.join(line + '\n' for line in kept + [json.dumps(record)]))
    os.replace(tmp, path)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed, epoch, rank):   # distinct for every (epoch, rank)
    return (seed * 1_000_003 + epoch) * 1009 + rank


def seed_worker(worker_id):   # numpy's and random's seeds from torch's, distinct per worker
    np.random.seed(torch.initial_seed() % 2**32)
    random.seed(torch.initial_seed() % 2**32)


def learning_rate(base_lr, epoch, schedule=(), warmup=()):   # warm-up factors, then x0.1 steps
    if epoch < len(warmup):
        return base_lr * warmup[epoch]
    return base_lr * 0.1 ** sum(epoch >= s for s in schedule)


def topk_accuracy(logits, target, ks=(1, 5)):   # device tensors
    hit = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices == target[:, None]
    return [hit[:, :k].any(1).float().mean() for k in ks]


def run_main(main):
    """Bad input ends as ``error: ...`` with status 2, Ctrl-C with status 130 after the script's
    own message (``CVTCL_TRACEBACK=1`` shows the traceback)."""
    try:
        main()
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if os.environ.get('CVTCL_TRACEBACK'):
            raise
        sys.exit(130)
