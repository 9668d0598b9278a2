"""Data-loader worker throughput: the project's pipeline against the reference's (CoCLR) style.

    python bench/data_pipeline.py [--videos 8] [--iters 24] [--warmup 3] [--device cuda]

One sample of ``<name>-2stream-2clip`` as ``local_coclr.py`` reads it (``--local_aug
independent``): 2 views x 32 frames x (RGB + flow) and 4 local pairs of 8-frame clips, each
pair augmented on its own, from 320x240 JPEG frames (quality 90, textured content), cropped to
128 px. Everything runs in this process with
``torch.set_num_threads(1)``, as in one data-loader worker. Measured side by side:

(a) the project: ``build_dataset(..., local_segments=4)[i]`` (LMDB read, one batched decode of
    each needed frame, per-clip crop + resize + flip on uint8 tensors; of the local clips only
    the 1 + 4 the model uses: view 1's query clip and view 2's 4 key clips). Its photometric step and
    normalisation normally run batched on the GPU; on a CPU-only machine they are CPU work too,
    so ``DeviceAugment`` on the CPU is timed as a separate line.
(b) the reference style, written here as the original CoCLR/CVTCL code did it: PIL decode of
    every frame of each view separately, then per frame CoCLR's training random sized crop (one
    box per clip, aspect uniform in [3/4, 4/3]; one try, else the whole frame; PIL bicubic
    resize), ColorJitter (brightness/contrast/saturation/hue
    in random order, p=0.8), RandomGray (0.2: one random channel per frame), GaussianBlur (0.5)
    for strong views, horizontal flip, ToTensor and Normalize; then, as the authors'
    augmentation_local.py, every local pair j (clip j of both views, 2 x 4 clips) through its
    own one-clip/two-clip draw on the views' decoded frames (one clip: one view's clip j
    transformed twice). RGB
    and flow frames of a clip travel together through the same transform (as in the
    reference). The strong/weak mix is that of docs/METHOD.md, Data.

Also shown: (c) the worker with ``decode='device'`` (it only reads bytes; decoding moves to the
device), a breakdown of the project's worker CPU time by stage, and with ``--device cuda`` the
device-side step on the GPU.

The last line is ``ratio reference/project CPU time per sample``: the reference's CPU time per
sample over the project's worker CPU time per sample (the issue's target is >= 5x).
"""
import argparse
import io
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageFilter
import torchvision.transforms.functional as TF

from dataset import augment
from dataset.augment import DeviceAugment
from dataset.lmdb_video import LMDBWriter, encode_frames
from dataset.catalog import build_dataset

SEGMENTS = 4

H, W = 240, 320


# ---------------------------------------------------------------------------------- data

def _texture(h, w, g):
    """Smooth multi-scale noise plus gradients: JPEG sizes like those of real frames."""
    img = torch.zeros(1, 3, h, w)
    for cells, amp in ((4, 0.5), (16, 0.25), (48, 0.15), (120, 0.1), (200, 0.06)):
        n = torch.rand(1, 3, cells * h // w + 2, cells + 2, generator=g)
        img += amp * F.interpolate(n, size=(h, w), mode='bicubic', align_corners=False)
    yy, xx = torch.linspace(0, 1, h)[:, None], torch.linspace(0, 1, w)[None]
    img += 0.3 * (xx * torch.rand(3, 1, 1, generator=g) + yy * torch.rand(3, 1, 1, generator=g))
    img = (img - img.amin()) / (img.amax() - img.amin())
    return (img[0] * 255).round().to(torch.uint8)


def _video(frames, g):
    """A camera pan over a textured scene: RGB ``[N, 3, H, W]`` and flow ``[N-1, 3, H, W]``."""
    scene = _texture(H + 2 * frames, W + 2 * frames, g)
    rgb = torch.stack([scene[:, t:t + H, 2 * t:2 * t + W] for t in range(frames)])
    # Flow as stored: channels 0/1 around 128 (+-20 px mapped to 0..255), channel 2 = 128.
    field = F.interpolate(torch.rand(frames - 1, 2, 6, 8, generator=g) - 0.5, size=(H, W),
                          mode='bicubic', align_corners=False)
    flow = torch.full((frames - 1, 3, H, W), 128.0)
    flow[:, :2] += 60 * field + torch.tensor([-12.0, -6.0]).view(1, 2, 1, 1)
    return rgb, flow.round().clamp(0, 255).to(torch.uint8)


def make_dataset(root, name, videos, frames, quality, seed=0):
    folder = Path(root) / name
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    names = [f'Class{i % 2}/v_Class{i % 2}_g{i + 1:02d}_c01' for i in range(videos)]
    sizes = {'rgb': [], 'flow': []}
    with LMDBWriter(folder / f'{name}_frame.lmdb') as w_rgb, \
            LMDBWriter(folder / f'{name}_tvl1_frame.lmdb') as w_flow:
        for n in names:
            rgb, flow = _video(frames, g)
            jr, jf = encode_frames(rgb, quality), encode_frames(flow, quality)
            sizes['rgb'] += [len(b) for b in jr]
            sizes['flow'] += [len(b) for b in jf]
            w_rgb.put(n, jr)
            w_flow.put(n, jf)
    (folder / 'ClassInd.txt').write_text('1 Class0\n2 Class1\n')
    (folder / 'train_split01.csv').write_text(''.join(f'{n},{frames}\n' for n in names))
    return {k: sum(v) / len(v) / 1024 for k, v in sizes.items()}


# ---------------------------------------------------------------------------------- reference

MEAN, STD = augment.IMAGENET_MEAN, augment.IMAGENET_STD


class ReferencePipeline:
    """The CoCLR-style worker: PIL per frame, transforms per frame with shared parameters."""

    def __init__(self, data, img_dim, rng):
        self.data, self.img_dim, self.rng = data, img_dim, rng

    def _crop_params(self, width, height):
        # CoCLR's RandomSizedCrop(consistent=False), as it trains: area 20-100 %, aspect uniform
        # in [3/4, 4/3], width and height swapped with probability 0.5; one try, and a box that
        # does not fit leaves the whole frame (resized to the square).
        area = width * height
        target = area * self.rng.uniform(0.2, 1.0)
        aspect = self.rng.uniform(3 / 4, 4 / 3)
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if self.rng.random() < 0.5:
            w, h = h, w
        if w <= width and h <= height:
            left, top = self.rng.randint(0, width - w), self.rng.randint(0, height - h)
            return left, top, left + w, top + h
        return None

    def _transform(self, frames, strong):
        rng, size = self.rng, self.img_dim
        box = self._crop_params(*frames[0].size)      # None: the whole frame, as the reference
        frames = [(f if box is None else f.crop(box)).resize((size, size), Image.BICUBIC)
                  for f in frames]
        if strong:
            if rng.random() < 0.8:          # ColorJitter(0.4, 0.4, 0.4, 0.1), random order
                ops = [('b', rng.uniform(0.6, 1.4)), ('c', rng.uniform(0.6, 1.4)),
                       ('s', rng.uniform(0.6, 1.4)), ('h', rng.uniform(-0.1, 0.1))]
                rng.shuffle(ops)
                for op, f in ops:
                    if op == 'b':
                        frames = [ImageEnhance.Brightness(im).enhance(f) for im in frames]
                    elif op == 'c':
                        frames = [ImageEnhance.Contrast(im).enhance(f) for im in frames]
                    elif op == 's':
                        frames = [ImageEnhance.Color(im).enhance(f) for im in frames]
                    else:
                        frames = [TF.adjust_hue(im, f) for im in frames]
            if rng.random() < 0.2:          # one random channel per frame, as the reference
                frames = [Image.fromarray(np.repeat(np.asarray(im)[:, :, rng.randrange(3), None],
                                                    3, axis=2)) for im in frames]
            if rng.random() < 0.5:
                sigma = rng.uniform(0.1, 2.0)
                frames = [im.filter(ImageFilter.GaussianBlur(radius=sigma)) for im in frames]
        if rng.random() < 0.5:
            frames = [im.transpose(Image.FLIP_LEFT_RIGHT) for im in frames]
        return [TF.normalize(TF.to_tensor(im), MEAN, STD) for im in frames]

    def __getitem__(self, index):
        data, rng = self.data, self.rng
        name = data.names[index]
        n = data._length(name)
        T, ds = data.seq_len, data.ds

        def clip():
            start = rng.randrange(0, n - T * ds)
            return [start + k * ds for k in range(T)]

        def strong_pair():      # two-clip: each strong with p 0.3; one-clip: one strong
            if rng.random() < 0.5:
                return True, [rng.random() < 0.3, rng.random() < 0.3]
            s = rng.random() < 0.5
            return False, [s, not s]

        two, strong = strong_pair()
        c = clip()
        clips = [c, clip() if two else c]
        rgb_db, flow_db = data.lmdbs['rgb'], data.lmdbs['flow']
        views, decoded = [], []
        for idx, st in zip(clips, strong):
            # Every frame of each view decoded on its own, RGB and flow transformed together.
            frames = [Image.open(io.BytesIO(b)).convert('RGB')
                      for b in rgb_db.read_bytes(name, idx) + flow_db.read_bytes(name, idx)]
            decoded.append(frames)
            out = self._transform(frames, st)
            views.append((torch.stack(out[:T]), torch.stack(out[T:])))
        # Local pair j: clip j of each view, through its own draw; one clip: one view's twice.
        t = T // SEGMENTS
        local = [[None] * SEGMENTS for _ in range(2)]
        for j in range(SEGMENTS):
            two, st = strong_pair()
            shown = [0, 1] if two else [rng.randrange(2)] * 2
            for v in range(2):
                seg, frames = slice(j * t, (j + 1) * t), decoded[shown[v]]
                out = self._transform(frames[:T][seg] + frames[T:][seg], st[v])
                local[v][j] = (torch.stack(out[:t]), torch.stack(out[t:]))
        return {'rgb': torch.stack([v[0] for v in views]),
                'flow': torch.stack([v[1] for v in views]), 'label': data.labels[index],
                'rgb_local': torch.stack([torch.stack([c[0] for c in v]) for v in local]),
                'flow_local': torch.stack([torch.stack([c[1] for c in v]) for v in local])}


# ---------------------------------------------------------------------------------- timing

def timed(fn, iters, warmup):
    for i in range(warmup):
        fn(i)
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(iters):
        fn(i)
    return (time.perf_counter() - wall) / iters, (time.process_time() - cpu) / iters


def profile_project(data_bytes, iters):
    """CPU time per sample of the stages of the project's worker path (``decode='cpu'``),
    replayed with the project's own functions on the plan of ``decode='device'`` items."""
    from dataset.lmdb_video import decode_list, unpack_jpegs
    stages = dict.fromkeys(['LMDB read + plan', 'JPEG decode', 'crop', 'resize', 'flip'], 0.0)
    torch.manual_seed(0)
    size = data_bytes.img_dim
    for i in range(iters):
        t = time.process_time()
        item = data_bytes[i % len(data_bytes)]
        stages['LMDB read + plan'] += time.process_time() - t
        for modality, packed in item['jpeg'].items():
            t = time.process_time()
            frames = decode_list(unpack_jpegs(*packed))
            stages['JPEG decode'] += time.process_time() - t
            for plan in (item, item['local']):            # the views, then the local clips
                out = augment.channels_last_empty(*plan['frame_index'].shape, size=size)
                for v, idx in enumerate(plan['frame_index'].tolist()):   # as apply_views does
                    t = time.process_time()
                    top, left, h, w = augment.box_pixels(plan['boxes'][v].tolist(),
                                                         *frames[0].shape[-2:])
                    crops = torch.stack([frames[j].permute(1, 2, 0)[top:top + h, left:left + w]
                                         for j in idx]).permute(0, 3, 1, 2)
                    stages['crop'] += time.process_time() - t
                    t = time.process_time()
                    views = augment.resize(crops, (size, size))
                    stages['resize'] += time.process_time() - t
                    t = time.process_time()
                    if plan['flips'][v]:
                        views = augment.flip_frames(views, modality == 'flow')
                    out[v] = views
                    stages['flip'] += time.process_time() - t
    return {k: v / iters for k, v in stages.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--videos', type=int, default=8, help='videos in the synthetic LMDB')
    p.add_argument('--frames', type=int, default=64, help='frames per video')
    p.add_argument('--iters', type=int, default=24, help='timed samples per pipeline')
    p.add_argument('--warmup', type=int, default=3, help='untimed samples first')
    p.add_argument('--seq_len', type=int, default=32, help='frames per view')
    p.add_argument('--img_dim', type=int, default=128, help='crop size of the views')
    p.add_argument('--quality', type=int, default=90, help='JPEG quality of the frames')
    p.add_argument('--batch', type=int, default=2,
                   help='samples per batch for the device-side (photometric) step on the CPU')
    p.add_argument('--device', default=None,
                   help='also time the device-side step on this device (e.g. cuda), as it '
                        'runs in training')
    args = p.parse_args(argv)
    torch.set_num_threads(1)                    # as in one data-loader worker

    with tempfile.TemporaryDirectory() as root:
        t = time.perf_counter()
        kb = make_dataset(root, 'bench', args.videos, args.frames, args.quality)
        print(f'data: {args.videos} videos x {args.frames} frames of {W}x{H}, mean JPEG '
              f'{kb["rgb"]:.1f} KB (RGB), {kb["flow"]:.1f} KB (flow); built in '
              f'{time.perf_counter() - t:.1f} s')
        data = build_dataset('bench-2stream-2clip', 'train', data_root=root,
                             seq_len=args.seq_len, ds=1, img_dim=args.img_dim,
                             local_segments=SEGMENTS)
        print(f'sample: 2 views x {args.seq_len} frames x (RGB + flow), and {SEGMENTS} local '
              f'pairs (project: the 1 + {SEGMENTS} clips the model uses; reference: '
              f'2 x {SEGMENTS}) -> {args.img_dim} px; torch threads: {torch.get_num_threads()}')
        n = len(data)

        torch.manual_seed(0)
        items = []
        proj_wall, proj_cpu = timed(lambda i: items.append(data[i % n]), args.iters,
                                    args.warmup)

        # The device-side step (photometric for the strong views, normalisation) on the CPU,
        # on a batch of the samples just made, with their own strong flags.
        chunk = items[:args.batch]
        batch = {m: torch.stack([it[m] for it in chunk])
                 for m in ('rgb', 'flow', 'strong', 'rgb_local', 'flow_local', 'local_strong')}
        device_step = DeviceAugment(photometric_on_flow=True)
        cpu = torch.device('cpu')
        dev_wall, dev_cpu = timed(lambda i: device_step(batch, cpu), 2, 1)
        dev_wall, dev_cpu = dev_wall / len(chunk), dev_cpu / len(chunk)
        accel = None
        if args.device:
            target = torch.device(args.device)

            def on_device(i):
                device_step(batch, target)
                if target.type == 'cuda':
                    torch.cuda.synchronize(target)
            accel = timed(on_device, 5, 2)[0] / len(chunk)

        data_bytes = build_dataset('bench-2stream-2clip', 'train', data_root=root,
                                   seq_len=args.seq_len, ds=1, img_dim=args.img_dim,
                                   decode='device', local_segments=SEGMENTS)
        for i in range(3):      # the byte-only items carry the same plan as the decoded ones
            torch.manual_seed(i)
            a = data[i % n]
            torch.manual_seed(i)
            b = data_bytes[i % n]
            assert all(torch.equal(a[k], b[k]) for k in ('strong', 'frame_index', 'boxes', 'flips',
                                                          'local_strong'))
            assert all(torch.equal(a['local'][k], b['local'][k]) for k in a['local'])
        torch.manual_seed(0)
        bytes_wall, bytes_cpu = timed(lambda i: data_bytes[i % n], args.iters, args.warmup)

        ref = ReferencePipeline(data, args.img_dim, random.Random(0))
        ref_wall, ref_cpu = timed(lambda i: ref[i % n], args.iters, args.warmup)

        stages = profile_project(data_bytes, max(4, args.iters // 2))

    print()
    print(f'{"pipeline":60s} {"samples/s":>10s} {"CPU ms/sample":>14s}')
    rows = [
        ('(a) project worker: build_dataset(...)[i]', proj_wall, proj_cpu),
        ('    + photometric + normalize on the CPU (DeviceAugment)', dev_wall, dev_cpu),
        ('    = project, everything on the CPU', proj_wall + dev_wall, proj_cpu + dev_cpu),
        ('(b) reference style (PIL per frame)', ref_wall, ref_cpu),
        ("(c) project worker with decode='device' (bytes only)", bytes_wall, bytes_cpu),
    ]
    for label, wall, c in rows:
        print(f'{label:60s} {1 / wall:10.2f} {1000 * c:14.1f}')
    if accel is not None:
        print(f'device-side step on {args.device} (wall, incl. the copy): '
              f'{1000 * accel:.2f} ms/sample')
    print()
    print('project worker path, CPU ms/sample by stage:')
    total = sum(stages.values())
    for k, v in stages.items():
        print(f'  {k:20s} {1000 * v:8.1f}  ({100 * v / total:4.1f}%)')
    print()
    print(f'ratio reference/project CPU time per sample, photometric on the CPU too: '
          f'{ref_cpu / (proj_cpu + dev_cpu):.2f}x')
    print(f'ratio reference/project CPU time per sample: {ref_cpu / proj_cpu:.2f}x')


if __name__ == '__main__':
    sys.exit(main())
