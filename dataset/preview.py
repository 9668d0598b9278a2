"""A picture of what the network is fed: both augmented views of a few samples, as one PNG.

    python -m dataset.prepare preview --dataset ucf101-2stream-2clip --out preview.png

One row per view: evenly spaced frames after the worker's geometry and the device's photometric
step (un-normalised), flow (as stored, 128 = still) after RGB; a red strip marks strong views.
"""
import argparse

import torch
from PIL import Image

from utils.config import POSITIVE
from .augment import IMAGENET_MEAN, IMAGENET_STD, DeviceAugment
from .video_dataset import DatasetName, build_dataset

PAD = 2          # pixels between tiles
GAP = 8          # between the RGB and the flow frames of a row
SEP = 6          # between samples
MARK = 6         # the strong/weak strip
BACKGROUND = 1.0
STRONG, WEAK = (0.85, 0.1, 0.1), (0.6, 0.6, 0.6)


def preview_size(num, views, frames, modalities, img_dim):
    """``(width, height)`` in pixels of a preview of ``num`` samples."""
    group = PAD + frames * (img_dim + PAD)
    width = MARK + modalities * group + (modalities - 1) * GAP
    height = PAD + num * views * (img_dim + PAD) + (num - 1) * SEP
    return width, height


def write_preview(dataset_name, out, data_root=None, num=4, seq_len=32, img_dim=128, seed=0,
                  frames=4, ds=1, photometric_on_flow=True, legacy_flow_flip=False):
    """Write a PNG of both augmented views of ``num`` samples of ``dataset_name`` (train mode),
    ``frames`` frames per view; returns ``(width, height)``. The samples and their augmentation
    follow ``seed``; the caller's random state is left as it was."""
    spec = DatasetName.parse(dataset_name)
    data = build_dataset(dataset_name, 'train', data_root=data_root, seq_len=seq_len, ds=ds,
                         img_dim=img_dim, negate_flow_flip=not legacy_flow_flip)
    modalities = [m for m in ('rgb', 'flow') if getattr(spec, m)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        picks = torch.randperm(len(data))[:num].sort().values.tolist()
        items = [data[i] for i in picks]
        batch = {m: torch.stack([it[m] for it in items]) for m in modalities}
        batch['strong'] = torch.stack([it['strong'] for it in items])
        augmented = DeviceAugment(photometric_on_flow)(batch, torch.device('cpu'))
    mean, std = (torch.tensor(x).view(3, 1, 1, 1) for x in (IMAGENET_MEAN, IMAGENET_STD))
    which = torch.linspace(0, seq_len - 1, min(frames, seq_len)).round().long()
    # [num, V, 3, T, S, S] normalised -> [num, V, M, F, 3, S, S] in [0, 1]
    views = torch.stack([(augmented[m] * std + mean)[:, :, :, which].transpose(2, 3)
                         for m in modalities], 2).clamp(0, 1)
    num, V, M, F = views.shape[:4]
    width, height = preview_size(num, V, F, M, img_dim)
    canvas = torch.full((3, height, width), BACKGROUND)
    group = PAD + F * (img_dim + PAD)
    for s in range(num):
        for v in range(V):
            top = PAD + (s * V + v) * (img_dim + PAD) + s * SEP
            colour = STRONG if batch['strong'][s, v] else WEAK
            canvas[:, top:top + img_dim, :MARK - 1] = torch.tensor(colour).view(3, 1, 1)
            for m in range(M):
                for f in range(F):
                    left = MARK + m * (group + GAP) + PAD + f * (img_dim + PAD)
                    canvas[:, top:top + img_dim, left:left + img_dim] = views[s, v, m, f]
    pixels = (canvas * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    Image.fromarray(pixels).save(str(out), format='PNG')
    return pixels.shape[1], pixels.shape[0]


def add_parser(sub):
    p = sub.add_parser('preview', help='PNG of augmented training views of a dataset',
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--dataset', required=True, metavar='NAME',
                   help='dataset name as for training, e.g. ucf101-2stream-2clip or demo-2clip')
    p.add_argument('--data_root', default=None, metavar='DIR',
                   help='folder holding <name>/ (default: $CVTCL_DATA_ROOT or data/ in the '
                        'project folder)')
    p.add_argument('--out', required=True, metavar='PNG', help='image to write')
    for flag, default, what in [('num', 4, 'samples shown'), ('frames', 4, 'frames shown per '
                                'view, evenly spaced'), ('seq_len', 32, 'frames per clip'),
                                ('ds', 1, 'frame stride'), ('img_dim', 128, 'crop size, pixels')]:
        p.add_argument(f'--{flag}', type=POSITIVE, default=default,
                       help=f'{what} (default: %(default)s)')
    p.add_argument('--seed', type=int, default=0,
                   help='picks the samples and their augmentation (default: %(default)s)')
    p.add_argument('--photometric_on_flow', action=argparse.BooleanOptionalAction, default=True,
                   help='colour jitter/grayscale/blur on the flow frames too, as in training '
                        '(default: on)')
    p.add_argument('--legacy_flow_flip', action='store_true',
                   help="flip flow frames without negating the horizontal component (the "
                        "reference's bug)")
    p.set_defaults(run=run)


def run(args):
    size = write_preview(args.dataset, args.out, data_root=args.data_root, num=args.num,
                         seq_len=args.seq_len, img_dim=args.img_dim, seed=args.seed,
                         frames=args.frames, ds=args.ds, legacy_flow_flip=args.legacy_flow_flip,
                         photometric_on_flow=args.photometric_on_flow)
    print(f'wrote {args.out} ({size[0]}x{size[1]})')
