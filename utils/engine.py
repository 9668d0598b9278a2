"""The one pretraining engine that ``local_nce.py`` and ``local_coclr.py`` call.

Flags shared by both scripts, launch (utils.distributed), data loading, the epoch loop with
mixed precision, logging (tqdm on rank 0, TensorBoard, one JSON line per epoch) and exact resume
from atomic checkpoints.
"""
import argparse
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from backbone import BACKBONES
from backbone.layout import use_2d_kernels
from backbone import MIN_SEGMENT_FRAMES
from dataset import DatasetName, build_dataset
from dataset.video_dataset import add_data_args, data_location, modality_of
from dataset.loader import make_loader
from model.classifier import check_modality
from .run import (add_runtime_args, amp_dtype_of, begin_epoch, broadcast_state, check_fresh_run,
                  check_resume, EpochMeter, open_run, restore)
from dataset.augment import DeviceAugment
from dataset.video_dataset import decode_on_device
from . import distributed as du
from .config import (AREA, NON_NEGATIVE, NON_NEGATIVE_REAL, POSITIVE, POSITIVE_REAL,
                     PROBABILITY)
from .checkpoint import load_checkpoint, load_exact, save_checkpoint, sub_state_dict
from .misc import (PROJECT_ROOT, interrupted_message, learning_rate, log_epoch, plain_args,
                   seed_everything, topk_accuracy)

def pretrain_parser(description, *, dataset, weights, lr, warmup, batch_size, epochs,
                    schedule):
    """Flags of both pretraining scripts; the defaults given are each script's (seed's) own.
    ``weights``: loss term -> default weight, one flag ``--w_<term>`` each (SPEC §4)."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--config', help='TOML file of flag defaults (configs/); flags given here win')
    g = add_data_args(p, dataset,
                      '<name>[-f][-2stream]-2clip, e.g. ucf101-2clip (RGB), ucf101-f-2clip (flow), '
                      'ucf101-2stream-2clip (both), demo-2clip (built-in)')
    g.add_argument('--decode', choices=['cpu', 'gpu'], default='cpu',
                   help='where JPEG frames are decoded and cropped: data-loader workers (cpu) or '
                        'batched with nvJPEG on the training GPU (gpu: frees the CPU cores, but '
                        'on an H100 with 16 workers it fed the step at 43-57%% of its speed, '
                        'against 89-94%% for cpu; bench/RESULTS.md)')
    g.add_argument('--photometric_on_flow', action=argparse.BooleanOptionalAction, default=True,
                   help='apply colour jitter/grayscale/blur to flow frames too (the reference '
                        'does); --no-photometric_on_flow limits them to RGB')
    g.add_argument('--two_clip_prob', type=PROBABILITY, default=0.5,
                   help='share of pairs made of two different clips (the rest: one clip seen '
                        'twice, one view strong and one weak)')
    g.add_argument('--two_clip_strong_prob', type=PROBABILITY, default=0.3,
                   help='probability that each view of a two-clip pair is strongly augmented')
    g.add_argument('--crop_area', type=AREA, nargs=2, default=[0.2, 1.0],
                   help='area range of the random resized crop, as shares of the frame')
    g = p.add_argument_group('model')
    g.add_argument('--net', default='s3d', help='backbone: s3d, s3dg or r50')
    g.add_argument('--moco-dim', dest='moco_dim', type=POSITIVE, default=128,
                   help='embedding size D')
    g.add_argument('--moco-k', dest='moco_k', type=POSITIVE, default=2048,
                   help='queue length K; a multiple of the global batch')
    g.add_argument('--moco-m', dest='moco_m', type=PROBABILITY, default=0.999,
                   help='momentum of the key encoder')
    g.add_argument('--moco-t', dest='moco_t', type=POSITIVE_REAL, default=0.07,
                   help='temperature tau')
    g.add_argument('--num_segments', type=POSITIVE, default=4,
                   help='local segments L per clip (seq_len/L frames each)')
    g.add_argument('--bn_splits', type=POSITIVE, default=None,
                   help='groups of the shuffled key batch with their own BatchNorm statistics; '
                        'default 2 in a single process, 1 with several processes')
    for term, weight in weights.items():
        g.add_argument(f'--w_{term}', type=NON_NEGATIVE_REAL, default=weight,
                       help=f'weight of the {term} loss')
    g = p.add_argument_group('optimisation')
    g.add_argument('--batch_size', type=POSITIVE, default=batch_size, help='batch size per process')
    g.add_argument('--epochs', type=POSITIVE, default=epochs, help='training epochs')
    g.add_argument('--schedule', type=NON_NEGATIVE, nargs='*', default=schedule,
                   help='epochs at which the learning rate drops x0.1')
    g.add_argument('--lr', type=NON_NEGATIVE_REAL, default=lr, help='Adam learning rate')
    g.add_argument('--wd', type=NON_NEGATIVE_REAL, default=1e-5, help='Adam weight decay')
    g.add_argument('--warmup', type=NON_NEGATIVE_REAL, nargs='*', default=warmup,
                   help='learning-rate factors of the first epochs')
    g.add_argument('--seed', type=int, default=0, help='each process seeds with seed + rank')
    g.add_argument('--iters_per_epoch', type=NON_NEGATIVE, default=0,
                   help='stop each epoch after this many iterations (0: whole epoch); for '
                        'smoke tests')
    g = p.add_argument_group('run')
    g.add_argument('--output_dir', default=str(PROJECT_ROOT / 'experiments'),
                   help='experiments are written to <output_dir>/<name_prefix><run name>/')
    g.add_argument('--name_prefix', default='', help='prefix of the experiment folder name')
    g.add_argument('--resume', default='', help='checkpoint to continue from (exactly)')
    g.add_argument('--save_freq', type=POSITIVE, default=1,
                   help='save every N epochs (and the last)')
    g.add_argument('--print_freq', type=POSITIVE, default=10, help='log every N iterations')
    add_runtime_args(g)
    g.add_argument('--compile', action=argparse.BooleanOptionalAction, default=False,
                   help='torch.compile the encoders (slow first steps, faster afterwards)')
    g.add_argument('--cuda_graph', action=argparse.BooleanOptionalAction, default=True,
                   help='replay each training step from a CUDA graph, with S3D\'s layers as 2D '
                        'kernels (one CUDA device, without --compile): 113 against 156 ms per '
                        'step on an H100')
    return p


@dataclass
class Task:
    """What differs between the two scripts."""
    name: str                                    # run-name stem, e.g. 'infonce'
    build_model: Callable                        # args -> nn.Module (a model.moco.MoCo)
    load_pretrained: Callable                    # (model, args) -> None
    inputs: Callable                             # (views dict, batch, device, args) -> forward kwargs
    weights: dict                                # loss term -> weight
    check_dataset: Callable = lambda spec, args: None


def loss_weights(args, terms):
    """The ``--w_<term>`` weight of each loss term in ``terms``."""
    return {term: getattr(args, f'w_{term}') for term in terms}


def run_name(args, task):
    return (f'{args.name_prefix}{task.name}_{args.dataset}_{args.net}_k{args.moco_k}'
            f'_bs{args.batch_size}_lr{args.lr:g}_len{args.seq_len}_ds{args.ds}_dim{args.img_dim}')


def train(args, task):
    info = du.init_distributed(args.device, args.local_rank)
    device = info.device
    say = print if info.is_main else (lambda *a, **k: None)
    spec = DatasetName.parse(args.dataset)
    global_batch = args.batch_size * info.world_size
    if args.bn_splits is None:   # two groups in one process, if the batch splits evenly
        args.bn_splits = 2 if info.world_size == 1 and args.batch_size % 2 == 0 else 1
    _check_args(args, spec, global_batch, task)
    ckpt = None
    if args.resume:   # checked before anything is built: a changed flag is the likelier error
        ckpt = load_checkpoint(args.resume, '--resume')
        if not any(k.startswith('encoder_q.') for k in ckpt['state_dict']):
            raise SystemExit(f'error: --resume {args.resume} is not a pretraining checkpoint (no '
                             f'encoder_q.* weights)')
        check_resume(ckpt, args, info.world_size)

    seed_everything(args.seed + info.rank)
    if args.decode == 'gpu' and device.type != 'cuda':
        raise SystemExit('error: --decode gpu needs a CUDA device (--device cuda)')
    dataset = build_dataset(args.dataset, 'train', **data_location(args), seq_len=args.seq_len,
                            ds=args.ds, img_dim=args.img_dim,
                            negate_flow_flip=not args.legacy_flow_flip,
                            decode='device' if args.decode == 'gpu' else 'cpu',
                            two_clip_prob=args.two_clip_prob,
                            two_clip_strong_prob=args.two_clip_strong_prob,
                            crop_scale=tuple(args.crop_area))
    if len(dataset) < global_batch:
        raise SystemExit(f'error: {args.dataset} has {len(dataset)} training videos, fewer than '
                         f'the global batch {global_batch} (--batch_size x processes)')
    loader = make_loader(dataset, args, info)

    torch.manual_seed(args.seed)  # the same initial weights and queue on every process
    model = task.build_model(args)
    memory_format = torch.channels_last_3d if args.channels_last else torch.contiguous_format
    model.to(device, memory_format=memory_format)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    if args.compile:
        if device.type == 'cpu':
            say('=> warning: --compile on the CPU: compiling S3D took longer than 25 minutes '
                'on a 2-core machine (bench/RESULTS.md); the eager step is the CPU default')
        compile_encoders(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=args.lr, weight_decay=args.wd,
                                 fused=device.type == 'cuda')
    amp_dtype = amp_dtype_of(args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    augment = DeviceAugment(args.photometric_on_flow, memory_format)

    exp_dir = Path(args.output_dir) / run_name(args, task)
    start_epoch, iteration, best_acc = 0, 0, 0.0
    if ckpt is not None:
        exp_dir, start_epoch, iteration = restore(ckpt, model, optimizer, scaler, args, info, say)
        best_acc = ckpt.get('best_acc', 0.0)
    else:
        check_fresh_run(exp_dir)
        task.load_pretrained(model, args)
    broadcast_state(model)
    step = make_step(model, task.weights, optimizer, scaler, amp_dtype, device,
                     args.cuda_graph and not args.compile)

    writer = open_run(exp_dir, args, info,
                      f'{info.world_size} process(es) on {device}, global batch {global_batch}, '
                      f'amp {amp_dtype}, {"CUDA graph" if isinstance(step, GraphedStep) else "eager"}'
                      f' step, {len(dataset)} videos ({len(dataset.dropped)} too short, '
                      f'dropped)')

    try:
        for epoch in range(start_epoch, args.epochs):
            begin_epoch(args.seed, epoch, info.rank, augment)
            lr = learning_rate(args.lr, epoch, args.schedule, args.warmup)
            for group in optimizer.param_groups:
                group['lr'] = lr
            stats, iteration = _train_one_epoch(model, step, task, loader, augment, lr, device,
                                                args, epoch, iteration, writer, info)
            best_acc = max(best_acc, stats.get('top1', 0.0))
            stats['replica_checksum'] = _check_replicas(model)
            if info.is_main:
                record = {'epoch': epoch, 'iteration': iteration, 'lr': lr, **stats}
                log_epoch(exp_dir / 'log.jsonl', record)
                say('=> epoch %d: ' % epoch + ' '.join(f'{k}={v:.4g}' for k, v in stats.items()))
                if (epoch + 1) % args.save_freq == 0 or epoch + 1 == args.epochs:
                    state = {'state_dict': model.state_dict(), 'epoch': epoch,
                             'optimizer': optimizer.state_dict(), 'iteration': iteration,
                             'best_acc': best_acc, 'scaler': scaler.state_dict(),
                             'args': plain_args(args), 'world_size': info.world_size}
                    save_checkpoint(state, exp_dir / f'epoch{epoch}.pth.tar',
                                    exp_dir / 'last.pth.tar')
    except KeyboardInterrupt:
        say(interrupted_message(exp_dir))
        raise
    finally:
        if writer is not None:
            writer.close()
    say(f'=> finished; checkpoints in {exp_dir}')
    du.cleanup()
    return exp_dir


def compile_encoders(model):
    """``torch.compile`` the encoders in place (state-dict keys stay CoCLR's), with dynamic
    shapes: one compilation serves both the clip batch and the local-segment batch."""
    for name in ('encoder_q', 'encoder_k', 'sampler'):
        if hasattr(model, name):
            getattr(model, name).compile(dynamic=True)


class Prefetcher:
    """``fn(batch)`` for each batch of ``batches``, computed ahead in a background thread (on a
    CUDA stream of its own on a GPU): decoding and augmenting the next batches overlap the
    training step of this one. ``depth`` batches are kept ready. Errors in the thread are raised
    here; ``close()`` stops it (always call it: the loader must be free for the next epoch).
    With ``threaded=False`` (the CPU default, where both would compete for the same cores) it
    simply maps ``fn`` over ``batches``."""

    _END = object()

    def __init__(self, batches, fn, device, depth=2, threaded=None):
        self.device, self.fn = device, fn
        self.threaded = device.type == 'cuda' if threaded is None else threaded
        self.batches = iter(batches)
        if not self.threaded:
            return
        self.queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.stream = torch.cuda.Stream(device) if device.type == 'cuda' else None
        self.thread = threading.Thread(target=self._work, daemon=True)
        self.thread.start()

    def _put(self, item):
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.05)
                return
            except queue.Full:
                pass

    def _work(self):
        try:
            if self.stream is not None and self.device.index is not None:
                torch.cuda.set_device(self.device)   # the current device is per thread
            for batch in self.batches:
                if self.stop.is_set():
                    return
                if self.stream is None:
                    self._put((self.fn(batch), None))
                    continue
                with torch.cuda.stream(self.stream):
                    out = self.fn(batch)
                    ready = torch.cuda.Event()
                    ready.record(self.stream)
                self._put((out, ready))
            self._put(self._END)
        except BaseException as e:  # handed to the training thread, raised there
            self._put(e)

    def __iter__(self):
        return self

    def __next__(self):
        if not self.threaded:
            return self.fn(next(self.batches))
        item = self.queue.get()
        if item is self._END:
            self._put(self._END)   # stays at the end
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        out, ready = item
        if ready is not None:  # the step's stream waits for the batch; its memory is kept
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(ready)
            for t in _tensors(out):
                if t.is_cuda:
                    t.record_stream(stream)
        return out

    def close(self):
        if not self.threaded:
            return
        self.stop.set()
        while self.thread.is_alive():
            try:
                self.queue.get_nowait()
            except queue.Empty:
                self.thread.join(timeout=0.05)


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)


def _check_args(args, spec, global_batch, task):
    def bad(msg):
        raise SystemExit(f'error: {msg}')
    if args.net not in BACKBONES:
        bad(f'--net {args.net!r} is unknown; known: {", ".join(BACKBONES)}')
    if args.moco_k % global_batch:
        lo = args.moco_k - args.moco_k % global_batch
        bad(f'--moco-k {args.moco_k} is not a multiple of the global batch {global_batch} '
            f'(--batch_size {args.batch_size} x {global_batch // args.batch_size} processes); '
            f'use --moco-k {lo or global_batch} or change --batch_size')
    if args.batch_size % args.bn_splits:
        bad(f'--batch_size {args.batch_size} does not split into --bn_splits {args.bn_splits} '
            f'groups of the same size')
    if args.crop_area[0] > args.crop_area[1]:
        bad(f'--crop_area {args.crop_area[0]:g} {args.crop_area[1]:g}: give the smaller area first')
    if spec.views != 2:
        bad(f'--dataset {args.dataset}: pretraining needs two views per video; use '
            f'{args.dataset}-2clip')
    if args.seq_len % args.num_segments:
        bad(f'--seq_len {args.seq_len} is not divisible into --num_segments {args.num_segments}')
    need = MIN_SEGMENT_FRAMES.get(args.net, 1)
    if args.seq_len // args.num_segments < need:
        bad(f'--seq_len {args.seq_len} / --num_segments {args.num_segments} gives local segments '
            f'of {args.seq_len // args.num_segments} frames; --net {args.net} needs at least {need}')
    task.check_dataset(spec, args)


def batch_inputs(batch, task, augment, device, args):
    """A loader batch -> the model's forward arguments, on the device."""
    if args.decode == 'gpu':
        batch = decode_on_device(batch, device, args.img_dim, not args.legacy_flow_flip)
    return task.inputs(augment(batch, device), batch, device, args)


def forward_backward(model, weights, inputs, scaler, amp_dtype, device, cache_casts=True):
    """Forward under autocast, weighted loss, backward (before ``model.ready``, CoCLR's queue
    filling, forward only). Returns ``(loss, terms, stats, ready)``, all left on the device."""
    ready = model.ready
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                        enabled=amp_dtype is not None, cache_enabled=cache_casts), \
            torch.set_grad_enabled(ready):
        terms, stats = model(**inputs)
        loss = sum(weights[k] * v for k, v in terms.items())
    if ready:
        scaler.scale(loss).backward()
    return loss.detach(), terms, stats, ready


def update(model, optimizer, scaler):
    """Gradient average over processes, then the optimiser step."""
    du.all_reduce_mean([p.grad for p in model.parameters() if p.grad is not None])
    scaler.step(optimizer)
    scaler.update()


def train_step(model, weights, inputs, optimizer, scaler, amp_dtype, device):
    """One eager step: forward, backward, gradient average, update. No host synchronisation."""
    optimizer.zero_grad(set_to_none=True)
    out = forward_backward(model, weights, inputs, scaler, amp_dtype, device)
    if out[-1]:
        update(model, optimizer, scaler)
    return out


class GraphedStep:
    """``train_step`` with its forward and backward replayed from a CUDA graph.

    S3D's step is thousands of small kernels (a convolution, a BatchNorm and a ReLU per layer, for
    three encoders). Captured once as a graph, the whole forward and backward (both encoders,
    shuffle-BN, momentum update, losses, enqueue) is replayed with one launch, so the host's work
    per step no longer bounds it. That is what lets the model run S3D's layers through the 2D
    kernels of ``backbone.layout``: a quarter less GPU time on an H100, but more host work than
    an eager step can afford (113 against 156 ms per step, bench/RESULTS.md). The optimiser
    step stays eager: fused Adam is a few kernels, and the learning rate stays a plain number.

    The first ``warmup`` trainable steps run eagerly on a side stream (cuDNN picks its
    algorithms, lazy state is made), the next one is captured and replayed, and every later step
    copies its inputs into the graph's static buffers and replays it. Steps before
    ``model.ready`` (CoCLR's queue filling) are not captured. If capture fails, the step stays
    eager, with PyTorch's 3D layers, and says why once."""

    def __init__(self, model, weights, optimizer, scaler, amp_dtype, device, warmup=3):
        self.model, self.weights, self.optimizer = model, weights, optimizer
        self.scaler, self.amp_dtype, self.device = scaler, amp_dtype, device
        self.warmup, self.warm = warmup, 0
        self.graph = self.static = self.out = None
        self.failed = None
        self.side = torch.cuda.Stream(device)
        use_2d_kernels(model)   # faster kernels, whose extra host work the graph hides

    def _copy_in(self, inputs):
        if self.static is None:
            self.static = {k: torch.empty_like(v) for k, v in inputs.items()}
        for k, v in inputs.items():
            self.static[k].copy_(v)

    def __call__(self, inputs):
        if self.graph is not None:
            self._copy_in(inputs)
            self.graph.replay()
            update(self.model, self.optimizer, self.scaler)
            return self.out
        if self.failed or not self.model.ready:
            return train_step(self.model, self.weights, inputs, self.optimizer, self.scaler,
                              self.amp_dtype, self.device)
        self._copy_in(inputs)
        if self.warm < self.warmup:
            self.warm += 1
            current = torch.cuda.current_stream(self.device)
            self.side.wait_stream(current)
            with torch.cuda.stream(self.side):
                out = train_step(self.model, self.weights, self.static, self.optimizer,
                                 self.scaler, self.amp_dtype, self.device)
            current.wait_stream(self.side)
            return out
        self.optimizer.zero_grad(set_to_none=True)  # the graph allocates the gradients it writes
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the prefetch thread keeps working on its own stream meanwhile.
            with torch.cuda.graph(graph, capture_error_mode='thread_local'):
                out = forward_backward(self.model, self.weights, self.static, self.scaler,
                                       self.amp_dtype, self.device, cache_casts=False)
        except Exception as e:  # the step stays eager: slower, never wrong
            self.failed = f'{type(e).__name__}: {e}'.splitlines()[0]
            print(f'=> CUDA graph capture failed ({self.failed}); training continues without '
                  f'it (--no-cuda_graph silences this)', flush=True)
            self.optimizer.zero_grad(set_to_none=True)
            use_2d_kernels(self.model, False)   # eagerly the 3D layers are faster
            torch.cuda.synchronize(self.device)
            return train_step(self.model, self.weights, inputs, self.optimizer, self.scaler,
                              self.amp_dtype, self.device)
        self.graph, self.out = graph, out
        graph.replay()  # capturing ran nothing: this is the captured step's real run
        update(self.model, self.optimizer, self.scaler)
        return out


def make_step(model, weights, optimizer, scaler, amp_dtype, device, cuda_graph):
    """The step function the epoch loop calls: graphed on one CUDA device (``cuda_graph``),
    else eager."""
    if cuda_graph and device.type == 'cuda' and du.world_size() == 1:
        return GraphedStep(model, weights, optimizer, scaler, amp_dtype, device)
    return lambda inputs: train_step(model, weights, inputs, optimizer, scaler, amp_dtype, device)


def _train_one_epoch(model, step, task, loader, augment, lr, device, args, epoch, iteration,
                     writer, info):
    model.train()
    meter = EpochMeter(epoch, loader.steps, device, info.is_main, writer, args.print_freq)
    batches = Prefetcher(loader.epoch(epoch),
                         lambda b: batch_inputs(b, task, augment, device, args), device)
    try:
        for inputs in batches:
            loss, terms, stats, ready = step(inputs)
            positives = torch.zeros(len(stats['logits']), dtype=torch.long, device=device)
            top1, top5 = topk_accuracy(stats['logits'], positives)
            metrics = {f'loss_{k}': v.detach() for k, v in terms.items()}
            metrics.update(top1=top1, top5=top5, inter_top1=stats['inter_top1'])
            if 'mining_acc' in stats:
                metrics['mining_acc'] = stats['mining_acc']
            meter.update(iteration, loss, args.batch_size * info.world_size, lr, metrics,
                         ready=ready)
            iteration += 1
    finally:
        batches.close()
    return meter.close(), iteration


@torch.no_grad()
def _check_replicas(model):
    """Every process must hold the same trained weights and queue; a checksum proves it."""
    parts = [p.double().sum() for p in model.parameters() if p.requires_grad] + [model.queue.double().sum()]
    mine = torch.stack(parts).sum().view(1)
    every = du.all_gather(mine)
    if not torch.all(every == every[0]):
        raise RuntimeError(f'processes diverged: checksums {every.tolist()}')
    return float(mine)


def load_encoder(encoder, path, flag, modality):
    """Initialise an ``Encoder`` from the query encoder of a pretraining checkpoint at ``path``,
    which must have been trained on ``modality`` (when its arguments say)."""
    ckpt = load_checkpoint(path, flag)
    weights = sub_state_dict(ckpt['state_dict'], 'encoder_q.')
    if not weights:
        raise ValueError(f'{flag} {path}: no encoder_q.* weights; is it a pretraining checkpoint?')
    check_modality(ckpt, modality, f'{flag} {path}')
    load_exact(encoder, weights, f'{flag} {path}')
    return ckpt.get('epoch')

