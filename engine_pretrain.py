"""The pretraining loop of both scripts, beside them as MAE keeps its engine: flags, set-up, the
epoch loop, one eager step on every device. The GPU fast path (``model.fast``) is imported only
when its flags ask."""
import argparse
import time
from collections import namedtuple
from functools import partial
from pathlib import Path

import torch

from backbone import BACKBONES, MIN_SEGMENT_FRAMES
from dataset.augment import DeviceAugment
from dataset.loader import make_loader
from dataset.catalog import DatasetName, add_data_args, build_dataset, data_location, modality_of
from eval import clips, retrieval
from model.classifier import check_modality
from utils import distributed as du
from utils.checkpoint import load_checkpoint, load_exact, sub_state_dict
from utils.config import (AREA, NON_NEGATIVE, NON_NEGATIVE_REAL, POSITIVE, POSITIVE_REAL,
                          PROBABILITY)
from utils.misc import PROJECT_ROOT, UserError, learning_rate, seed_everything
from utils.run import (EpochMeter, Preemption, add_runtime_args, auto_resume, begin_epoch,
                       broadcast_state, check_resume, disk_use, end_epoch, open_run,
                       optimizer_step, resume_mid_epoch, resume_or_start)


def pretrain_parser(description, *, dataset, weights, tau, lr, warmup, batch_size, epochs,
                    schedule, local_aug):
    """Both scripts' flags, with each script's defaults; ``weights``: loss term -> default weight
    of its flag ``--w_<term>`` (docs/METHOD.md, Losses)."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--config', help='TOML file of flag values (configs/); flags given here win')
    g = add_data_args(p, dataset, '<name>[-f][-2stream]-2clip, e.g. ucf101-2clip (RGB), '
                      'ucf101-f-2clip (flow), ucf101-2stream-2clip (both), demo-2clip (built-in)')
    g.add_argument('--local_aug', choices=['independent', 'shared'], default=local_aug,
                   help='independent: each local pair augmented on its own; shared: cut out of '
                        "the augmented views; each script's default: docs/METHOD.md, Local clips")
    g.add_argument('--decode', choices=['cpu', 'gpu'], default='cpu',
                   help='JPEG decoding by the data-loader workers or nvJPEG on the training GPU')
    g.add_argument('--photometric_on_flow', action=argparse.BooleanOptionalAction, default=True,
                   help='colour jitter, grayscale and blur on flow frames too, as the reference')
    g.add_argument('--two_clip_prob', type=PROBABILITY, default=0.5, help='share of pairs of two '
                   'clips (the rest: one clip seen twice, one view strong and one weak)')
    g.add_argument('--two_clip_strong_prob', type=PROBABILITY, default=0.3,
                   help='probability that each view of a two-clip pair is strongly augmented')
    g.add_argument('--crop_area', type=AREA, nargs=2, default=[0.2, 1.0],
                   help="the random resized crop's range of shares of the frame's area")
    g.add_argument('--crop_retry', action=argparse.BooleanOptionalAction, default=False,
                   help="retry a crop box that does not fit the frame (10 tries, then the centre "
                        "square); default: CoCLR's training crop, one try, else the whole frame")
    g = p.add_argument_group('model')
    g.add_argument('--net', default='s3d', help='backbone: ' + ', '.join(BACKBONES))
    for name, kind, default, text in (
            ('dim', POSITIVE, 128, 'embedding size D'),
            ('k', POSITIVE, 2048, 'queue length K; a multiple of the global batch'),
            ('m', PROBABILITY, None, 'key-encoder momentum; default: fit to the run (docs/METHOD.md)'),
            ('t', POSITIVE_REAL, tau, 'temperature tau')):
        g.add_argument(f'--moco-{name}', f'--moco_{name}', dest=f'moco_{name}', type=kind,
                       default=default, help=text)
    g.add_argument('--num_segments', type=POSITIVE, default=4, help='local clips L per view')
    g.add_argument('--bn_splits', type=POSITIVE, default=None,
                   help='groups of the shuffled key batch with their own BatchNorm statistics; '
                        'default 2 in a single process, 1 with several processes')
    g.add_argument('--local_keys', choices=['per_segment', 'one_batch'], default='per_segment',
                   help="per_segment: a shuffled batch of B local keys per clip index, BatchNorm "
                        "statistics of one temporal position, as the authors'; one_batch: all "
                        'B*L local keys in one shuffled batch (docs/METHOD.md, Model)')
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
                   help='iterations per epoch at most (0: the whole epoch)')
    g = p.add_argument_group('run')
    g.add_argument('--output_dir', default=str(PROJECT_ROOT / 'experiments'),
                   help='experiments are written to <output_dir>/<name_prefix><run name>/')
    g.add_argument('--name_prefix', default='', help='prefix of the experiment folder name')
    g.add_argument('--resume', default='', help='checkpoint to continue from (exactly); auto: '
                   "the run folder's last.pth.tar if any, else start (README, Clusters)")
    g.add_argument('--save_freq', type=POSITIVE, default=1, help='save every N epochs and the last')
    g.add_argument('--keep_every', type=NON_NEGATIVE, default=50, help='keep the epoch file of '
                   'every N-th epoch (0: none) besides last.pth.tar and the latest')
    g.add_argument('--print_freq', type=POSITIVE, default=10, help='log every N iterations')
    g.add_argument('--monitor_freq', type=NON_NEGATIVE, default=20, help='retrieval monitor at '
                   'the start, every N epochs and at the end (0: off): R@1/R@5 of test videos '
                   'querying train videos (main_classifier.py --retrieval --protocol clean); '
                   'labels only measure it, they never train (docs/METHOD.md, Retrieval monitor)')
    g.add_argument('--monitor_windows', choices=['all', 'middle'], default='middle',
                   help="windows per video the monitor reads (main_classifier.py's --test_windows)")
    add_runtime_args(g)
    g.add_argument('--compile', action=argparse.BooleanOptionalAction, default=False,
                   help='torch.compile the encoders (slow first steps, faster afterwards)')
    g.add_argument('--cuda_graph', action=argparse.BooleanOptionalAction, default=False,
                   help="replay each step from a CUDA graph, S3D's layers as 2D kernels")
    return p


def fit_momentum(steps):
    """Key-encoder momentum for a run of ``steps`` steps: MoCo's 0.999 needs 100k+, a shorter
    run's key encoder would keep 0.999 ** steps of its random start (docs/METHOD.md, Model)."""
    return min(max(1 - 10 / steps, 0.9), 0.999)


# What differs between the scripts: run-name stem, args -> model, (model, args) -> None,
# (augmented views, batch, device, args) -> forward keywords, whether it takes RGB and flow.
Task = namedtuple('Task', 'name build_model load_pretrained inputs two_stream')


def view_inputs(views, modality, args):
    """The two views of ``modality`` and, with ``--local_aug independent``, the dataset's local
    clips: the query, then the L keys (docs/METHOD.md, Local clips)."""
    x = views[modality]                              # B x 2 x 3 x T x S x S
    if args.local_aug == 'shared':
        return {'view1': x[:, 0], 'view2': x[:, 1]}
    local = views[modality + '_local']               # B x 1+L x 3 x T/L x S x S
    return {'view1': x[:, 0], 'view2': x[:, 1], 'local1': local[:, 0], 'local2': local[:, 1:]}


def train(args, task):
    info = du.init_distributed(args.device, args.local_rank)
    device = info.device
    say = print if info.is_main else (lambda *a, **k: None)
    global_batch = args.batch_size * info.world_size
    if args.bn_splits is None:   # two groups in one process, if the batch splits evenly
        args.bn_splits = 2 if info.world_size == 1 and args.batch_size % 2 == 0 else 1
    check_args(args, global_batch, task, device)
    exp_dir = Path(args.output_dir) / (
        f'{args.name_prefix}{task.name}_{args.dataset}_{args.net}_k{args.moco_k}'
        f'_bs{args.batch_size}_lr{args.lr:g}_len{args.seq_len}_ds{args.ds}_dim{args.img_dim}')
    ckpt = None
    if auto_resume(args, exp_dir):   # checked first: a changed flag is the likelier error
        ckpt = pretraining_checkpoint(args.resume, '--resume')
        if args.moco_m is None:   # a resumed run keeps its key-encoder momentum
            args.moco_m = (ckpt.get('args') or {}).get('moco_m')
        check_resume(ckpt, args, info.world_size)
    rt = clips.runtime(info, args)
    history = ckpt.get('monitor', []) if ckpt else []   # the retrieval monitor's results
    monitor = Monitor(args, rt, history) if args.monitor_freq else None
    seed_everything(args.seed + info.rank)
    local_segments = args.num_segments if args.local_aug == 'independent' else 0   # else sliced
    dataset = build_dataset(
        args.dataset, 'train', **data_location(args), seq_len=args.seq_len, ds=args.ds,
        img_dim=args.img_dim, negate_flow_flip=not args.legacy_flow_flip,
        decode='device' if args.decode == 'gpu' else 'cpu', two_clip_prob=args.two_clip_prob,
        two_clip_strong_prob=args.two_clip_strong_prob, crop_scale=tuple(args.crop_area),
        crop_retry=args.crop_retry,
        local_segments=local_segments)
    loader = make_loader(dataset, args, info)
    if args.moco_m is None:
        args.moco_m = fit_momentum(args.epochs * loader.steps)
        say(f'=> key-encoder momentum {args.moco_m:.4g}, fit to {args.epochs * loader.steps} '
            f'steps (1 - 10 / steps within [0.9, 0.999]; --moco-m sets it)')
    torch.manual_seed(args.seed)  # the same initial weights and queue on every process
    model = task.build_model(args)
    model.to(device, memory_format=rt.memory_format)
    torch.backends.cudnn.benchmark = device.type == 'cuda'
    if args.compile:   # each encoder (the model's children) in place: the keys stay CoCLR's
        for encoder in model.children():
            encoder.compile(dynamic=True)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                 weight_decay=args.wd, fused=device.type == 'cuda')
    amp_dtype = rt.amp_dtype
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    augment = DeviceAugment(args.photometric_on_flow, rt.memory_format)
    exp_dir, start_epoch, iteration, best_acc, previous = resume_or_start(
        ckpt, exp_dir, model, optimizer, scaler, args, say)
    if ckpt is None:
        task.load_pretrained(model, args)   # the query encoder (and CoCLR's sampler)
        model.encoder_k.load_state_dict(model.encoder_q.state_dict())
    broadcast_state(model)
    step = partial(train_step, model, optimizer=optimizer, scaler=scaler, amp_dtype=amp_dtype)
    to_inputs = partial(batch_inputs, task=task, augment=augment, device=device, args=args)
    fast = None
    if args.cuda_graph or args.decode == 'gpu':
        from model import fast   # the GPU fast path, only when asked for
    if args.cuda_graph:
        step = fast.GraphedStep(step, forward_backward, optimizer_step, model, optimizer,
                                scaler, amp_dtype, device)
    flow = dataset.lmdbs.get('flow')   # which optical flow the LMDB holds (prepare flow --method)
    flow = (f', flow by {flow.flow_method or "an unrecorded method (published: TV-L1)"}'
            if flow else '')
    with open_run(exp_dir, args, info, say, amp_dtype, f', {len(dataset)} videos '
                  f'({len(dataset.dropped)} too short, dropped){flow}\n=> '
                  + disk_use(model, args.epochs, args.keep_every, args.save_freq)) as writer, \
            Preemption(args.save_signal) as stop:
        if monitor and not history:   # the starting point, logged as epoch -1
            end_epoch(exp_dir, {'iteration': 0, **monitor(model, -1, writer)}, model, optimizer,
                      scaler, args, info, previous, save=False)
        for epoch in range(start_epoch, args.epochs):
            lr = learning_rate(args.lr, epoch, args.schedule, args.warmup)
            begin_epoch(args.seed, epoch, info.rank, augment, optimizer, lr)
            meter = EpochMeter(epoch, loader.steps, device, info.is_main, writer, args.print_freq)
            first_step, ckpt = resume_mid_epoch(ckpt, info.rank, device, meter, augment), None
            stopped = augment.generator.get_state() if stop.agreed() else None
            if stopped is None:   # a signal during the last epoch's end is honoured here
                batches = ((to_inputs(b) for b in loader.epoch(epoch, first_step)) if fast is None
                           else fast.Prefetcher(loader.epoch(epoch, first_step), to_inputs, device))
                iteration, stopped = train_one_epoch(model, step, batches, meter, iteration, lr,
                                                     global_batch, stop)
            if stopped is not None:
                stop.save_and_exit(exp_dir, model, optimizer, scaler, args, info, epoch,
                                   iteration, meter, stopped, best_acc=best_acc, monitor=history)
            stats = meter.close()
            best_acc = max(best_acc, stats['top1'])
            say(f'=> epoch {epoch}: ' + ' '.join(f'{k}={v:.4g}' for k, v in stats.items()))
            record = {'epoch': epoch, 'iteration': iteration, 'lr': lr, **stats}
            if monitor and ((epoch + 1) % args.monitor_freq == 0 or epoch + 1 == args.epochs):
                record.update(monitor(model, epoch, writer))
            save = (epoch + 1) % args.save_freq == 0 or epoch + 1 == args.epochs
            previous = end_epoch(exp_dir, record, model, optimizer, scaler, args, info, previous,
                                 save, best_acc=best_acc, monitor=history)
        if monitor:
            monitor.summary()
    du.cleanup()
    return exp_dir


class Monitor:
    """The retrieval monitor (docs/METHOD.md, Retrieval monitor): the trained modality's query
    encoder measured as main_classifier.py --retrieval --protocol clean measures a checkpoint."""

    def __init__(self, args, rt, history):
        flow = modality_of(args.dataset, vars(args).get('reverse')) == 'flow'   # CVTCL's
        self.args = argparse.Namespace(**{
            **vars(args), 'protocol': 'clean', 'max_videos': 0, 'feature_l2norm': True,
            'dataset': DatasetName.parse(args.dataset).base + ('-f' if flow else ''),
            'test_windows': args.monitor_windows})
        self.videos = {part: clips.split_videos(self.args, part) for part in ('train', 'test')}
        self.rt, self.history = rt, history

    def __call__(self, model, epoch, writer):
        """R@1, R@5 after ``epoch`` (-1: the start), printed and to TensorBoard. No cache; draws
        nothing from the random streams; BatchNorm statistics and the mode stay as they were."""
        tic, backbone, training = time.time(), model.encoder_q[0], model.encoder_q.training
        with torch.random.fork_rng([self.rt.device] if self.rt.device.type == 'cuda' else []):
            backbone.eval()
            feats = {part: {'features': retrieval.video_features(backbone, v, self.args, self.rt,
                                                                 f'monitor {part}'),
                            'labels': torch.tensor(v.labels)} for part, v in self.videos.items()}
        backbone.train(training)
        recall = retrieval.split_recall(feats['test'], feats['train'], ks=(1, 5))
        self.history.append({'epoch': epoch, 'R@1': recall[1], 'R@5': recall[5],
                             'monitor_s': time.time() - tic})
        self.rt.say(f'=> monitor {when(epoch)}: R@1={recall[1]:.1f} R@5={recall[5]:.1f} ('
                    f'{len(self.videos["test"])} test videos query {len(self.videos["train"])} '
                    f'train, {self.history[-1]["monitor_s"]:.1f} s)')
        for k in ('R@1', 'R@5'):
            if writer is not None:   # x: epochs trained
                writer.add_scalar(f'monitor/{k}', self.history[-1][k], epoch + 1)
        return self.history[-1]

    def summary(self):
        first, last = self.history[0], self.history[-1]
        best = max(self.history, key=lambda h: h['R@1'])
        self.rt.say(f'=> monitor R@1 {first["R@1"]:.1f} ({when(first["epoch"])}) -> '
                    f'{last["R@1"]:.1f} ({when(last["epoch"])}), best {best["R@1"]:.1f} '
                    f'({when(best["epoch"])})')


def when(epoch):   # a monitor measurement's name
    return 'start' if epoch < 0 else f'epoch {epoch}'


def train_one_epoch(model, step, batches, meter, iteration, lr, global_batch, stop):
    """One pass over ``batches`` (``batch_inputs``), or until the processes agree to ``stop`` at
    a step boundary. Returns the iteration count and, if stopped, the augmenter's state there."""
    model.train()
    try:
        for inputs in batches:
            augment_state = inputs.pop('augment_state')
            loss, stats, ready = step(inputs)
            meter.update(iteration, loss, global_batch, lr, stats, ready=ready)
            iteration += 1
            if stop.agreed():
                return iteration, augment_state
    finally:
        batches.close()   # a prefetch thread stops here
    return iteration, None


def batch_inputs(batch, task, augment, device, args):
    """A loader batch -> the model's forward keywords, on the device, and ``augment_state``, the
    augmenter's after them (a mid-epoch save's: with --cuda_graph a thread works ahead)."""
    if args.decode == 'gpu':
        from model.fast import decode_on_device
        batch = decode_on_device(batch, device, args.img_dim, not args.legacy_flow_flip)
    return {**task.inputs(augment(batch, device), batch, device, args),
            'augment_state': augment.generator.get_state()}


def forward_backward(model, inputs, scaler, amp_dtype, cache_casts=True):
    """Forward under autocast and backward; before ``model.ready`` (CoCLR's queue filling) the
    forward alone, without gradients. Returns ``(loss, stats, ready)``, left on the device."""
    ready = model.ready
    with torch.autocast(next(model.parameters()).device.type, dtype=amp_dtype or torch.float32,
                        enabled=amp_dtype is not None, cache_enabled=cache_casts), \
            torch.set_grad_enabled(ready):
        loss, stats = model(**inputs)
    if ready:
        scaler.scale(loss).backward()
    return loss.detach(), stats, ready


def train_step(model, inputs, optimizer, scaler, amp_dtype):
    optimizer.zero_grad(set_to_none=True)
    loss, stats, ready = forward_backward(model, inputs, scaler, amp_dtype)
    if ready:
        optimizer_step(model, optimizer, scaler)
    return loss, stats, ready


def check_args(args, global_batch, task, device):
    spec, frames = DatasetName.parse(args.dataset), args.seq_len // args.num_segments
    need = MIN_SEGMENT_FRAMES.get(args.net, 1)
    for bad, message in (
        (args.moco_k % global_batch, f'--moco-k {args.moco_k} is not a multiple of the global '
         f'batch {global_batch} (--batch_size {args.batch_size} x '
         f'{global_batch // args.batch_size} processes); use --moco-k '
         f'{args.moco_k - args.moco_k % global_batch or global_batch} or change --batch_size'),
        (args.batch_size % args.bn_splits, f'--batch_size {args.batch_size} does not split into '
         f'--bn_splits {args.bn_splits} groups of the same size'),
        (args.crop_area[0] > args.crop_area[1], f'--crop_area {args.crop_area[0]:g} '
         f'{args.crop_area[1]:g}: give the smaller area first'),
        (spec.views != 2, f'--dataset {args.dataset}: pretraining needs two views per video; use '
         f'{args.dataset}-2clip'),
        (args.seq_len % args.num_segments, f'--seq_len {args.seq_len} is not divisible into '
         f'--num_segments {args.num_segments}'),
        (frames < need, f'--seq_len {args.seq_len} / --num_segments {args.num_segments} gives '
         f'local clips of {frames} frames; --net {args.net} needs at least {need}'),
        (args.decode == 'gpu' and (device.type != 'cuda' or args.local_aug == 'independent'),
         '--decode gpu needs a CUDA device (--device cuda) and decodes the views only: add '
         '--local_aug shared'),
        (spec.rgb and spec.flow and not task.two_stream, f'--dataset {args.dataset}: local_nce.py '
         f'trains one modality; use {spec.base}-2clip (RGB) or {spec.base}-f-2clip (flow)'),
        (task.two_stream and not (spec.rgb and spec.flow), f'--dataset {args.dataset}: CVTCL needs '
         f'RGB and flow together; use {spec.base}-2stream-2clip')):
        if bad:
            raise UserError(message)


def pretraining_checkpoint(path, flag):
    ckpt = load_checkpoint(path, flag)
    if not sub_state_dict(ckpt['state_dict'], 'encoder_q.'):
        raise UserError(f'{flag} {path}: no encoder_q.* weights; is it a pretraining checkpoint?')
    return ckpt


def load_encoder(encoder, path, flag, modality):
    """Initialise an encoder from the query encoder of the pretraining checkpoint at ``path``,
    which must have been trained on ``modality`` (when its arguments say). Returns its epoch."""
    ckpt = pretraining_checkpoint(path, flag)
    check_modality(ckpt, modality, f'{flag} {path}')
    load_exact(encoder, sub_state_dict(ckpt['state_dict'], 'encoder_q.'), f'{flag} {path}')
    return ckpt.get('epoch')
