"""End-to-end training throughput: does the data path keep up with the training step?

    python bench/end_to_end.py --workers 16          # on a GPU machine (bench/gpu.sh runs it)

Builds a synthetic two-stream LMDB folder with UCF101's frame size (320x240 JPEG, RGB and flow;
``--videos`` of them: the training loader streams across epochs, so short epochs cost no waits at
their boundaries and no gigabytes need writing), then measures, in one run, samples/s of the real training loop pieces
(make_loader, engine.batch_inputs, the engine's step) for the CPU decode path (workers
decode and crop) and the GPU decode path (workers read bytes; nvJPEG decodes on the GPU),
against the step alone on a fixed batch. The target is end-to-end >= 85% of step-only.

``gpu-1t`` is the GPU decode path without the fast path's prefetch thread (decoding in the
training thread, between steps). Two diagnostics per path say which side limits: ``loader`` (the data-loader alone, no device
work) and ``device data`` (batch_inputs alone on batches already loaded: the GPU decode, the
geometry and the photometric step, as the training process runs them).
"""
import argparse
import gc
import tempfile
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch

from dataset import splits
from dataset.augment import DeviceAugment
from dataset.lmdb_video import LMDBWriter, encode_frames
from dataset.loader import make_loader
from dataset.catalog import build_dataset
import engine_pretrain as engine
from utils.distributed import DistInfo

from train_step import SCRIPTS, make_model, path_step, script_args, sync   # bench/train_step.py

FRAME_H, FRAME_W = 240, 320


def textured(num, seed, flow=False, size=(FRAME_H, FRAME_W)):
    """Smooth random texture frames (realistic JPEG sizes), uint8 [N, 3, H, W]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(num, 3, max(size[0] // 16, 2), max(size[1] // 16, 2), generator=g)
    x = torch.nn.functional.interpolate(low, size=size, mode='bicubic')
    x = x + 0.08 * torch.randn(num, 3, *size, generator=g)
    if flow:
        x[:, 2] = 0.5
    return (x.clamp(0, 1) * 255).to(torch.uint8)


def build_folder(root, videos, frames, size=(FRAME_H, FRAME_W)):
    """``root/synth``: every video reuses one pool of encoded frames, rotated per video (the
    decode cost is what matters, not distinct pixels)."""
    folder = Path(root) / 'synth'
    folder.mkdir(parents=True)
    names = [f'C{v % 10}/v_C{v % 10}_g{v // 10:02d}_c01' for v in range(videos)]
    for suffix, flow in (('frame', False), ('tvl1_frame', True)):
        pool = encode_frames(textured(frames, seed=int(flow), flow=flow, size=size), quality=90)
        with LMDBWriter(folder / f'synth_{suffix}.lmdb') as w:
            for i, n in enumerate(names):
                k = i % frames
                w.put(n, (pool[k:] + pool[:k])[:frames - int(flow)])
    splits.write_split(folder / 'train_split01.csv', names, {n: frames for n in names})
    splits.write_class_index(folder / 'ClassInd.txt', sorted({n.split('/')[0] for n in names}))
    return names


def setup(kind, args, decode):
    """The engine's loader, batch preparation and arguments for ``kind`` with ``decode``."""
    device = torch.device(args.device)
    dataset_name = 'synth-2clip' if kind == 'infonce' else 'synth-2stream-2clip'
    # --epochs: more than any measurement reads (the loader makes each epoch only when reached).
    ns = script_args(kind, '--epochs', 10 ** 6, '--moco-k', args.batch_size * 64, '--bn_splits', 2,
                     '--batch_size', args.batch_size, '--workers', args.workers, '--decode', decode,
                     '--img_dim', args.img_dim, '--local_aug', args.local_aug,
                     '--cuda_graph' if args.cuda_graph else '--no-cuda_graph')
    ds = build_dataset(dataset_name, 'train', data_root=args.root, seq_len=32, img_dim=args.img_dim,
                       decode='device' if decode == 'gpu' else 'cpu',
                       local_segments=ns.num_segments * (args.local_aug == 'independent'))
    loader = make_loader(ds, ns, DistInfo(device=device))
    task = SimpleNamespace(inputs=SCRIPTS[kind].inputs)
    return device, ns, loader, task, DeviceAugment(True, torch.channels_last_3d)


def batches(loader):
    for epoch in range(loader.epochs):   # one stream across epochs, as in training
        yield from loader.epoch(epoch)


def run(kind, args, decode, fixed=False, threaded=True):
    """samples/s of loader + batch_inputs + train_step as the engine runs them (batch_inputs in
    the fast path's prefetch thread on a GPU; ``threaded=False`` or on the CPU: in the training
    thread, as the plain path); ``fixed``: the step alone, on one prepared batch."""
    gc.collect()   # the previous measurement's loader workers end first
    device, ns, loader, task, augment = setup(kind, args, decode)
    torch.manual_seed(0)
    model = make_model(kind, ns, device, channels_last=True)
    step = path_step(model, 'fast-graph' if ns.cuda_graph else 'fast', device)
    torch.backends.cudnn.benchmark = True
    to_inputs = partial(engine.batch_inputs, task=task, augment=augment, device=device, args=ns)
    if threaded and device.type == 'cuda':
        from model.fast import Prefetcher
        it = Prefetcher(batches(loader), to_inputs, device)
    else:
        it = (to_inputs(b) for b in batches(loader))
    fixed_inputs = next(it) if fixed else None
    if fixed:
        fixed_inputs.pop('augment_state')
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            sync(device)
            t0 = time.perf_counter()
        inputs = fixed_inputs or next(it)
        inputs.pop('augment_state', None)   # what a mid-epoch save stores
        step(inputs)
    sync(device)
    rate = args.steps * args.batch_size / (time.perf_counter() - t0)
    it.close()
    return rate


def data_only(kind, args, decode):
    """samples/s of the loader alone, and of batch_inputs alone on batches already loaded."""
    gc.collect()
    device, ns, loader, task, augment = setup(kind, args, decode)
    it = batches(loader)
    for _ in range(args.warmup):
        next(it)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        next(it)   # dropped at once, as training does: held batches would each need new pinned memory
    loader_rate = args.steps * args.batch_size / (time.perf_counter() - t0)
    held = [next(it) for _ in range(args.device_batches)]
    engine.batch_inputs(held[0], task, augment, device, ns)
    sync(device)
    t0 = time.perf_counter()
    for b in held:
        engine.batch_inputs(b, task, augment, device, ns)
    sync(device)
    device_rate = len(held) * args.batch_size / (time.perf_counter() - t0)
    return loader_rate, device_rate


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                   help='default: cuda when available')
    p.add_argument('--workers', type=int, default=16, help='data-loader workers')
    p.add_argument('--batch_size', type=int, default=32, help='samples per step')
    p.add_argument('--videos', type=int, default=96, help='distinct videos written')
    p.add_argument('--frames', type=int, default=64, help='frames per video')
    p.add_argument('--steps', type=int, default=30, help='timed steps per row')
    p.add_argument('--warmup', type=int, default=8, help='untimed steps first')
    p.add_argument('--device_batches', type=int, default=6,
                   help='loaded batches timed through batch_inputs alone')
    p.add_argument('--models', nargs='+', default=['infonce', 'coclr'],
                   choices=['infonce', 'coclr'], help='training steps measured')
    p.add_argument('--decodes', nargs='+', default=['cpu', 'gpu', 'gpu-1t'],
                   choices=['cpu', 'gpu', 'gpu-1t'], help='data paths measured (GPU only)')
    p.add_argument('--cuda_graph', action=argparse.BooleanOptionalAction, default=False,
                   help='the step replayed from a CUDA graph (the engine\'s --cuda_graph)')
    p.add_argument('--local_aug', choices=['independent', 'shared'], default='independent',
                   help='local clips augmented on their own or cut out of the views (the '
                        'engine\'s --local_aug)')
    p.add_argument('--img_dim', type=int, default=128, help='crop size of the training clips')
    p.add_argument('--frame_size', type=int, nargs=2, default=[FRAME_H, FRAME_W],
                   metavar=('H', 'W'), help='size of the synthetic frames')
    args = p.parse_args()
    decodes = ['cpu'] if args.device == 'cpu' else args.decodes
    with tempfile.TemporaryDirectory() as tmp:
        args.root = tmp
        t = time.time()
        build_folder(tmp, args.videos, args.frames, tuple(args.frame_size))
        h, w = args.frame_size
        print(f'synthetic LMDB: {args.videos} videos x {args.frames} frames, {w}x{h}, RGB+flow '
              f'({time.time() - t:.0f} s to build); crops {args.img_dim} px, '
              f'batch {args.batch_size}, {args.workers} workers, {args.steps} timed steps after '
              f'{args.warmup}, {"CUDA graph" if args.cuda_graph else "eager"} step', flush=True)
        rows = []
        for kind in args.models:
            step = run(kind, args, 'gpu' if 'gpu' in ' '.join(decodes) else 'cpu', fixed=True)
            print(f'{kind} step-only {step:.1f} samples/s', flush=True)
            for label in decodes:
                decode = label.split('-')[0]
                try:
                    loader_rate, device_rate = data_only(kind, args, decode)
                    e2e = run(kind, args, decode, threaded=not label.endswith('-1t'))
                except Exception as e:  # keep the other rows
                    print(f'{kind} {label} failed: {type(e).__name__}: {e}', flush=True)
                    continue
                rows.append((kind, label, step, e2e, loader_rate, device_rate))
                print(f'{kind} {label}: step-only {step:.1f}, end-to-end {e2e:.1f}, loader '
                      f'{loader_rate:.1f}, device data {device_rate:.1f} samples/s', flush=True)
        print(f'\n{"model":8} {"decode":6} {"step-only":>10} {"end-to-end":>11} {"e2e/step":>9} '
              f'{"loader":>8} {"device data":>12}   (samples/s)')
        for kind, decode, step, e2e, loader_rate, device_rate in rows:
            print(f'{kind:8} {decode:6} {step:10.1f} {e2e:11.1f} {e2e / step:9.0%} '
                  f'{loader_rate:8.1f} {device_rate:12.1f}')


if __name__ == '__main__':
    main()
