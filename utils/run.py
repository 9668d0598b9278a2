"""What every training and evaluation run shares: runtime flags, the experiment folder, exact
resume, each epoch's seeds, learning rate, meter, log and checkpoint, the optimiser step."""
import argparse
import json
import os
import signal
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from . import distributed as du
from .checkpoint import load_exact, save_checkpoint
from .misc import UserError, epoch_seed, format_args, git_revision, log_epoch, plain_args


def add_runtime_args(g):
    g.add_argument('--device', choices=['auto', 'cpu', 'cuda'], default='auto',
                   help='auto = cuda when available')
    g.add_argument('--amp', choices=['auto', 'off', 'bf16', 'fp16'], default='auto',
                   help='mixed precision; auto = bf16 on CUDA GPUs that support it, else off')
    g.add_argument('--channels_last', action=argparse.BooleanOptionalAction, default=True,
                   help='channels-last 3D memory format (faster on GPUs, ~1.7x on the CPU)')
    g.add_argument('--save_signal', nargs='+', choices=['TERM', 'USR1', 'USR2'],
                   default=['TERM', 'USR1'], help='training: signals that save a mid-epoch '
                   'checkpoint and exit with status 143 (README, Clusters)')
    g.add_argument('--local_rank', '--local-rank', dest='local_rank', type=int, default=None,
                   help=argparse.SUPPRESS)  # set by torch.distributed.launch


def amp_dtype_of(args, device):
    amp = args.amp
    if amp == 'auto':
        amp = 'bf16' if device.type == 'cuda' and torch.cuda.is_bf16_supported() else 'off'
    return {'off': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}[amp]


@contextmanager
def open_run(exp_dir, args, info, say, amp_dtype, summary):
    """Around a run's epochs. Rank 0 makes the folder, prints and stores the run's provenance (and
    ``summary``) and yields a TensorBoard writer (None elsewhere), closed at the end; Ctrl-C names
    the last good checkpoint."""
    writer = None
    if info.is_main:
        exp_dir.mkdir(parents=True, exist_ok=True)
        print(f'=> git {git_revision()}\n=> experiment {exp_dir}\n=> {info.world_size} process(es) '
              f'on {info.device}, global batch {args.batch_size * info.world_size}, amp '
              f'{amp_dtype}{summary}\n=> args:\n{format_args(args)}')
        (exp_dir / 'args.json').write_text(json.dumps(plain_args(args), indent=1, sort_keys=True))
        from torch.utils.tensorboard import SummaryWriter  # slow import: rank 0 only
        writer = SummaryWriter(str(exp_dir / 'tb'))
    try:
        yield writer
    except KeyboardInterrupt:
        last = Path(exp_dir) / 'last.pth.tar'
        say(f'\n=> interrupted; the last good checkpoint is {last}' if last.exists() else
            f'\n=> interrupted before the first checkpoint; nothing to resume in {exp_dir}')
        raise
    finally:
        if writer is not None:
            writer.close()
    say(f'=> finished; checkpoints in {exp_dir}')


def begin_epoch(seed, epoch, rank, augment, optimizer, lr):
    """Seed the process's and the augmenter's generators from (seed, epoch, rank), so a resumed
    run continues as the uninterrupted one (each sample's seed: ``dataset.loader``); set the
    optimiser's learning rate to ``lr`` (times a group's ``lr_mult``)."""
    root = epoch_seed(seed, epoch, rank)
    torch.manual_seed(2 * root)
    augment.reseed(2 * root + 1)
    for group in optimizer.param_groups:
        group['lr'] = lr * group.get('lr_mult', 1)


def optimizer_step(model, optimizer, scaler):
    """The gradients averaged over the processes, then the (loss-scaled) optimiser step."""
    du.all_reduce_mean([p.grad for p in model.parameters() if p.grad is not None])
    scaler.step(optimizer)
    scaler.update()


def broadcast_state(model):   # rank 0's weights and buffers (detached, sharing their storage)
    for t in model.state_dict().values():
        du.broadcast(t, 0)


class EpochMeter:
    """An epoch's metrics, summed on the device and read every ``print_freq`` steps: means over
    the steps that reported each, the first non-finite loss, progress bar, TensorBoard."""

    def __init__(self, epoch, steps, device, show, writer, print_freq):
        self.sums = defaultdict(lambda: torch.zeros((), device=device))
        self.counts = defaultdict(int)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.bar = tqdm(total=steps, desc=f'epoch {epoch}', disable=not show, dynamic_ncols=True)
        self.steps, self.writer, self.print_freq = steps, writer, print_freq
        self.tic, self.seen, self.n = time.time(), 0, 0

    def update(self, iteration, loss, samples, lr, metrics, **postfix):
        """``loss`` and ``metrics``: device scalars; ``samples``: over all processes."""
        self.first_bad = torch.where(~torch.isfinite(loss) & (self.first_bad < 0), iteration,
                                     self.first_bad)
        for k, v in {'loss': loss.detach(), **metrics}.items():
            self.sums[k] += v
            self.counts[k] += 1
        self.n += 1
        self.seen += samples
        self.bar.update(1)
        if self.n % self.print_freq == 0 or self.n == self.steps:
            self.check_finite()
            means = self.means(torch.stack(list(self.sums.values())))
            self.bar.set_postfix(loss=f'{means["loss"]:.3f}', top1=f'{means["top1"]:.3g}',
                                 **postfix)
            if self.writer is not None:
                for k, v in {**means, 'lr': lr}.items():
                    self.writer.add_scalar(f'train/{k}', v, iteration + 1)

    def means(self, totals):
        out = {k: v / self.counts[k] for k, v in zip(self.sums, totals.tolist())}
        out['samples_per_s'] = self.seen / max(time.time() - self.tic, 1e-9)
        return out

    def state(self):   # this process's sums, for a mid-epoch checkpoint
        return {'sums': {k: v.cpu() for k, v in self.sums.items()}, 'counts': dict(self.counts),
                'first_bad': int(self.first_bad), 'n': self.n}

    def load(self, state):
        self.sums.update({k: v.to(self.first_bad.device) for k, v in state['sums'].items()})
        self.counts.update(state['counts'])
        self.first_bad.fill_(state['first_bad'])
        self.n = state['n']
        self.bar.update(self.n)

    def close(self):
        """The epoch's means over every process."""
        self.bar.close()
        self.check_finite()
        totals = torch.stack(list(self.sums.values()))
        du.all_reduce_mean([totals])
        return self.means(totals)

    def check_finite(self):
        bad = self.first_bad.clone()
        if du.world_size() > 1:  # stop every process together
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        if int(bad) >= 0:
            raise FloatingPointError(f'non-finite loss at iteration {int(bad)}; the last good '
                                     f'checkpoint is left as it was')


class Preemption:
    """SIGTERM or SIGUSR1 (a cluster's warning; README, Clusters) stops the run at a step boundary
    all processes agree on (``agreed``); a second signal ends the process at once."""

    def __init__(self, names=('TERM', 'USR1')):   # --save_signal
        self.signals = [signal.Signals['SIG' + name] for name in names]
        self.received, self.pid = None, os.getpid()
        self.previous = [signal.signal(s, self.handle) for s in self.signals]
        # the flag on the CPU: a GPU collective would wait for the GPU at every step
        self.group = dist.new_group(backend='gloo') if du.world_size() > 1 else None

    def __enter__(self):
        return self

    def __exit__(self, *exc):   # the handlers from before
        for s, handler in zip(self.signals, self.previous):
            signal.signal(s, handler)

    def handle(self, signum, frame):
        if os.getpid() != self.pid:   # a forked data-loader worker: the training process decides
            return
        for s in self.signals:
            signal.signal(s, signal.SIG_DFL)
        self.received = signal.Signals(signum).name
        print(f'=> {self.received}: saving at the next step boundary (send it again to stop now)',
              file=sys.stderr, flush=True)

    def agreed(self):   # whether any process was signalled
        flag = torch.tensor(self.received is not None, dtype=torch.int)
        if self.group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag)

    def save_and_exit(self, exp_dir, model, optimizer, scaler, args, info, epoch, iteration,
                      meter, augment_state, **progress):
        """Rank 0 writes last.pth.tar with ``epoch - 1`` as the last done and each process's
        ``mid_epoch`` state (docs/METHOD.md, Checkpoints); all exit with status 143."""
        own = {'meter': meter.state(), 'torch': torch.get_rng_state(), 'augment': augment_state,
               'cuda': torch.cuda.get_rng_state(info.device) if info.device.type == 'cuda'
               else None}
        ranks = [own]
        if self.group is not None:   # every process's, in rank order
            ranks = list(range(info.world_size))
            dist.all_gather_object(ranks, own, group=self.group)
        if info.is_main:
            last = exp_dir / 'last.pth.tar'
            save_checkpoint(run_state(model, optimizer, scaler, args, info, epoch - 1, iteration,
                                      mid_epoch=ranks, **progress), last)
            print(f'=> {self.received or "signal on another process"}: saved {last} at epoch '
                  f'{epoch}, step {meter.n}; the same command with --resume auto goes on',
                  flush=True)
        if self.group is not None:   # no process ends before the checkpoint is whole
            dist.barrier(group=self.group)
        sys.exit(143)


def resume_mid_epoch(ckpt, rank, device, meter, augment):
    """Process ``rank``'s meter and generators from a mid-epoch ``ckpt``; its steps taken, or 0."""
    if ckpt is None or 'mid_epoch' not in ckpt:
        return 0
    own = ckpt['mid_epoch'][rank]
    meter.load(own['meter'])
    torch.set_rng_state(own['torch'])
    augment.generator.set_state(own['augment'])
    if own['cuda'] is not None:
        torch.cuda.set_rng_state(own['cuda'], device)
    return meter.n


def auto_resume(args, exp_dir):   # --resume auto: exp_dir's last.pth.tar, or a fresh start
    if args.resume == 'auto':
        last = Path(exp_dir) / 'last.pth.tar'
        args.resume = str(last) if last.exists() else ''
    return args.resume


def resume_or_start(ckpt, exp_dir, model, optimizer, scaler, args, say):
    """Load ``ckpt``'s state to continue its run, in its folder; None: a fresh run in ``exp_dir``.
    Returns the folder, the first epoch to train, the iteration, the best accuracy and the epoch
    file the next save replaces (``save_epoch``'s ``previous``)."""
    if ckpt is None:   # a new run never writes over another's checkpoints (a log alone: reused)
        if any(exp_dir.glob('*.pth.tar')):
            raise UserError(f'{exp_dir} already holds a run; continue it with --resume '
                            f'{exp_dir / "last.pth.tar"}, or start another with --name_prefix or '
                            f'--output_dir (or delete the folder)')
        return exp_dir, 0, 0, 0.0, None
    if ckpt['epoch'] + 1 >= args.epochs:
        raise UserError(f'--resume {args.resume} ends at epoch {ckpt["epoch"]}: --epochs '
                        f'{args.epochs} leaves nothing to train; give more epochs')
    load_exact(model, ckpt['state_dict'], f'--resume {args.resume}')
    optimizer.load_state_dict(ckpt['optimizer'])
    if 'scaler' in ckpt:
        scaler.load_state_dict(ckpt['scaler'])
    say(f'=> resumed {args.resume} (epoch {ckpt["epoch"]}, iteration {ckpt["iteration"]})'
        + ('; --pretrain is not loaded when resuming' if args.pretrain else ''))
    exp_dir = Path(args.resume).resolve().parent
    return (exp_dir, ckpt['epoch'] + 1, ckpt['iteration'], ckpt.get('best_acc', 0.0),
            exp_dir / f'epoch{ckpt["epoch"]}.pth.tar')


# Flags a resumed run may change (where things are, hardware, speed, length, output); any other
# change would make it another experiment.
RESUME_MAY_CHANGE = {
    'resume', 'config', 'epochs', 'schedule', 'data_root', 'rgb_lmdb', 'flow_lmdb', 'split_dir',
    'output_dir', 'name_prefix', 'workers', 'device', 'decode', 'channels_last', 'compile',
    'cuda_graph', 'amp', 'local_rank', 'print_freq', 'save_freq', 'keep_every', 'eval_freq',
    'pretrain', 'dirname', 'monitor_freq', 'monitor_windows', 'save_signal'}


def check_resume(ckpt, args, world_size):
    """A resumed run's flags (but ``RESUME_MAY_CHANGE``) and process count must be the
    checkpoint's. A saved None (an old default) is no difference."""
    saved, now = ckpt.get('args') or {}, plain_args(args)
    changed = [f'--{k} {saved[k]!r} -> {now[k]!r}' for k in sorted(now)
               if saved.get(k) is not None and k not in RESUME_MAY_CHANGE and saved[k] != now[k]]
    if ckpt.get('world_size', world_size) != world_size:
        changed.append(f'processes {ckpt["world_size"]} -> {world_size} (the global batch and '
                       f'the data order depend on it)')
    if changed:
        raise UserError(f'--resume {args.resume} continues a run with other settings: '
                        + '; '.join(changed) + '. Resume with the same flags, or start a new run')


def end_epoch(exp_dir, record, model, optimizer, scaler, args, info, previous, save=True,
              best=False, **progress):
    """Rank 0: the epoch's ``record`` (epoch, iteration, ...) to log.jsonl, then if ``save`` its
    checkpoint (docs/METHOD.md, Checkpoints); returns the latest epoch file (``previous``)."""
    if not info.is_main:
        return previous
    log_epoch(exp_dir / 'log.jsonl', record)
    if save:
        state = run_state(model, optimizer, scaler, args, info, record['epoch'],
                          record['iteration'], **progress)
        previous = save_epoch(state, exp_dir, record['epoch'], args.keep_every, previous, best)
    return previous


def run_state(model, optimizer, scaler, args, info, epoch, iteration, **progress):
    return {'state_dict': model.state_dict(), 'optimizer': optimizer.state_dict(),
            'scaler': scaler.state_dict(), 'args': plain_args(args),
            'world_size': info.world_size, 'epoch': epoch, 'iteration': iteration, **progress}


def keeps(epoch, keep_every):   # epoch<epoch>.pth.tar, 0-based as CoCLR's names
    return keep_every > 0 and (epoch + 1) % keep_every == 0


def save_epoch(state, exp_dir, epoch, keep_every, previous=None, best=False):
    """Write ``epoch<epoch>.pth.tar``, ``last.pth.tar`` (and ``best.pth.tar``), each whole before
    it replaces anything; then remove ``previous``, the epoch file before, unless it is kept."""
    path = Path(exp_dir) / f'epoch{epoch}.pth.tar'
    paths = [path, path.with_name('last.pth.tar')]
    if best:
        paths.append(path.with_name('best.pth.tar'))
    save_checkpoint(state, *paths)
    if previous is not None and Path(previous) != path:
        if not keeps(int(Path(previous).name[len('epoch'):-len('.pth.tar')]), keep_every):
            Path(previous).unlink(missing_ok=True)
    return path


def disk_use(model, epochs, keep_every, save_freq=1, slots=2, best=False):
    """A run's expected checkpoint size, as a line to print: the model's state (each storage once,
    as ``torch.save`` writes it) and ``slots`` optimiser tensors per parameter (Adam: 2)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in model.state_dict().values()}
    size = sum(storages.values())
    size += slots * sum(p.numel() * p.element_size() for p in model.parameters()
                        if p.requires_grad)
    kept = sum(keeps(e, keep_every) for e in range(save_freq - 1, epochs - 1, save_freq))
    files = 2 + kept + best     # last.pth.tar, the latest epoch file, the kept ones, best
    return (f'checkpoints ~{size / 2**20:.0f} MB each, at most {files} files (last, latest '
            f'epoch{", best" * best}, {kept} kept by --keep_every {keep_every}): '
            f'~{files * size / 2**30:.2f} GB')
