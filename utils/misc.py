"""Small helpers: run provenance, JSON-lines logs, seeding, learning-rate schedule."""
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
    """Bad input: a wrong flag, file, key or value, named in the message. Scripts print it as
    ``error: <message>`` and exit with status 2; every other exception is a bug and keeps its
    traceback."""


def git_revision():
    """``<sha>`` or ``<sha>-dirty``; 'unknown' outside a git checkout."""
    try:
        sha = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=PROJECT_ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'],
                               cwd=PROJECT_ROOT, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return (sha + ('-dirty' if dirty else '')) if sha else 'unknown'
    except (OSError, subprocess.SubprocessError):
        return 'unknown'


def format_args(args):
    return '\n'.join(f'  {k}: {v}' for k, v in sorted(vars(args).items()))


def plain_args(args):
    """The arguments as plain types, storable in a ``weights_only`` checkpoint."""
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else
                list(v) if isinstance(v, (list, tuple)) else str(v))
            for k, v in vars(args).items()}


def log_epoch(path, record):
    """Append an epoch's record to a ``log.jsonl``, dropping any record of that epoch or a later
    one first: those come from a run that was resumed from an earlier checkpoint, and this run
    trains them again. The log then reads as one uninterrupted run; nothing is dropped before
    the new record exists. Written to a new file, then renamed."""
    path = Path(path)
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [line for line in lines
            if line.strip() and json.loads(line).get('epoch', -1) < record['epoch']]
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(''.join(line + '\n' for line in kept + [json.dumps(record)]))
    os.replace(tmp, path)


def interrupted_message(exp_dir):
    last = Path(exp_dir) / 'last.pth.tar'
    if last.exists():
        return f'\n=> interrupted; the last good checkpoint is {last}'
    return f'\n=> interrupted before the first checkpoint; nothing to resume in {exp_dir}'


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed, epoch, rank):
    """The one root of an epoch's randomness in process ``rank``: distinct for every (epoch,
    rank) of a run. The training process's generators and every sample's seed derive from it."""
    return (seed * 1_000_003 + epoch) * 1009 + rank


def seed_worker(worker_id):
    # torch seeds each worker differently (base seed + id); derive numpy/random from it so no
    # library repeats the same numbers in every worker.
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def learning_rate(base_lr, epoch, schedule=(), warmup=()):
    """Step schedule as a function of the epoch: warm-up factors for the first epochs, then x0.1
    at each epoch of ``schedule``, so a resumed run recomputes exactly the same rate."""
    if epoch < len(warmup):
        return base_lr * warmup[epoch]
    return base_lr * 0.1 ** sum(epoch >= s for s in schedule)


def topk_accuracy(logits, target, ks=(1, 5)):
    """Share of rows whose target is among the top k logits, for each k (device tensors)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == target[:, None]
    return [hit[:, :k].any(1).float().mean() for k in ks]


def run_main(main):
    """A script's entry point. Bad input (the ValueError or OSError that names the file, key or
    flag) ends as ``error: ...`` with exit status 2 instead of a traceback, and Ctrl-C with
    status 130 after the script's own message. ``CVTCL_TRACEBACK=1`` shows the traceback."""
    try:
        main()
    except SystemExit as e:   # the scripts' own ``SystemExit('error: ...')``: status 2 as well
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            sys.exit(2)
        raise
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if os.environ.get('CVTCL_TRACEBACK'):
            raise
        sys.exit(130)
    except (ValueError, OSError) as e:
        if os.environ.get('CVTCL_TRACEBACK'):
            raise
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
