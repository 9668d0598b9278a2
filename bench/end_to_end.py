"""End-to-end training throughput: does the data path keep up with the training step?

    python bench/end_to_end.py --workers 16          # on a GPU machine (bench/gpu.sh runs it)

Builds a synthetic two-stream LMDB folder with UCF101's frame size (320x240 JPEG, RGB and flow),
then measures, in one run, samples/s of the real training loop pieces (engine.make_loader,
engine.batch_inputs, engine.train_step) for the CPU decode path (workers decode and crop) and
the GPU decode path (workers read bytes; nvJPEG decodes on the GPU), against the step alone on a
fixed batch. The target is end-to-end >= 85% of step-only.
"""
import argparse
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import local_coclr
import local_nce
from dataset import LMDBWriter, build_dataset, encode_frames
from dataset import splits
from utils import engine
from utils.distributed import DistInfo

FRAME_H, FRAME_W = 240, 320


def textured(num, seed, flow=False):
    """Smooth random texture frames (realistic JPEG sizes), uint8 [N, 3, 240, 320]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(num, 3, 15, 20, generator=g)
    x = torch.nn.functional.interpolate(low, size=(FRAME_H, FRAME_W), mode='bicubic')
    x = x + 0.08 * torch.randn(num, 3, FRAME_H, FRAME_W, generator=g)
    if flow:
        x[:, 2] = 0.5
    return (x.clamp(0, 1) * 255).to(torch.uint8)


def build_folder(root, videos, frames):
    """``root/synth``: every video reuses one pool of encoded frames, rotated per video (the
    decode cost is what matters, not distinct pixels)."""
    folder = Path(root) / 'synth'
    folder.mkdir(parents=True)
    names = [f'C{v % 10}/v_C{v % 10}_g{v // 10:02d}_c01' for v in range(videos)]
    for suffix, flow in (('frame', False), ('tvl1_frame', True)):
        pool = encode_frames(textured(frames, seed=int(flow), flow=flow), quality=90)
        with LMDBWriter(folder / f'synth_{suffix}.lmdb') as w:
            for i, n in enumerate(names):
                k = i % frames
                w.put(n, (pool[k:] + pool[:k])[:frames - int(flow)])
    splits.write_split(folder / 'train_split01.csv', names, {n: frames for n in names})
    splits.write_class_index(folder / 'ClassInd.txt', sorted({n.split('/')[0] for n in names}))
    return names


def run(kind, args, decode, fixed=False):
    device = torch.device(args.device)
    script = local_nce if kind == 'infonce' else local_coclr
    dataset_name = 'synth-2clip' if kind == 'infonce' else 'synth-2stream-2clip'
    ns = SimpleNamespace(net='s3d', moco_dim=128, moco_k=args.batch_size * 64, moco_m=0.999,
                         moco_t=0.07, num_segments=4, bn_splits=2, topk=5, self_mask_prob=0.9,
                         batch_size=args.batch_size, workers=args.workers, seed=0,
                         decode=decode, img_dim=128, legacy_flow_flip=False, reverse=False)
    ds = build_dataset(dataset_name, 'train', data_root=args.root, seq_len=32, img_dim=128,
                       decode='device' if decode == 'gpu' else 'cpu')
    loader, _ = engine.make_loader(ds, ns, DistInfo(device=device))
    torch.manual_seed(0)
    model = script.build_model(ns)
    fmt = torch.channels_last_3d if device.type == 'cuda' else torch.contiguous_format
    model.to(device, memory_format=fmt).train()
    if kind == 'coclr':
        model.queue_vname.copy_(torch.arange(ns.moco_k, device=device) + 10 ** 6)
    weights = ({'global': 1.0, 'inter': 1 / 3, 'intra': 1.0} if kind == 'infonce'
               else {'coclr': 1 / 3, 'inter': 1 / 3, 'intra': 1 / 3})
    task = SimpleNamespace(inputs=script.inputs, weights=weights)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                           fused=device.type == 'cuda')
    amp = torch.bfloat16 if device.type == 'cuda' else None
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    augment = engine.DeviceAugment(True, fmt)
    torch.backends.cudnn.benchmark = True
    def batches():  # several epochs when the synthetic set is small
        while True:
            yield from loader
    it = batches()
    first = next(it) if fixed else None
    fixed_inputs = None
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            if device.type == 'cuda':
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        if fixed:   # the step alone: one prepared batch, reused
            inputs = fixed_inputs = (fixed_inputs if i else
                                     engine.batch_inputs(first, task, augment, device, ns))
        else:
            inputs = engine.batch_inputs(next(it), task, augment, device, ns)
        engine.train_step(model, weights, inputs, opt, scaler, amp, device)
    if device.type == 'cuda':
        torch.cuda.synchronize()
    rate = args.steps * args.batch_size / (time.perf_counter() - t0)
    del it
    return rate


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--workers', type=int, default=16)
    p.add_argument('--batch_size', type=int, default=32)
    p.add_argument('--videos', type=int, default=400)
    p.add_argument('--frames', type=int, default=96)
    p.add_argument('--steps', type=int, default=20)
    p.add_argument('--warmup', type=int, default=5)
    p.add_argument('--models', nargs='+', default=['infonce', 'coclr'])
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        args.root = tmp
        t = time.time()
        build_folder(tmp, args.videos, args.frames)
        print(f'synthetic LMDB: {args.videos} videos x {args.frames} frames, 320x240, RGB+flow '
              f'({time.time() - t:.0f} s to build); batch {args.batch_size}, {args.workers} workers')
        print(f'{"model":8} {"step-only":>10} {"cpu decode":>11} {"gpu decode":>11} '
              f'{"cpu/step":>9} {"gpu/step":>9}   (samples/s)')
        for kind in args.models:
            step = run(kind, args, 'cpu' if args.device == 'cpu' else 'gpu', fixed=True)
            cpu = run(kind, args, 'cpu')
            gpu = run(kind, args, 'gpu') if args.device != 'cpu' else float('nan')
            print(f'{kind:8} {step:10.1f} {cpu:11.1f} {gpu:11.1f} {cpu / step:9.0%} '
                  f'{gpu / step:9.0%}', flush=True)


if __name__ == '__main__':
    main()
