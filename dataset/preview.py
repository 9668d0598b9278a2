"""A picture of what the network is fed: both augmented views of a few samples, as one PNG.

    python -m dataset.prepare preview --dataset ucf101-2stream-2clip --out preview.png

One row per view: evenly spaced frames after the worker's geometry and the device's photometric
step (un-normalised), flow (as stored, 128 = still) after RGB; a red strip marks strong views.
"""
import argparse

import torch
from torchvision.utils import make_grid, save_image

from utils.config import POSITIVE
from .augment import IMAGENET_MEAN, IMAGENET_STD, DeviceAugment
from .catalog import build_dataset
from .video_dataset import collate

PAD, MARK = 2, 6   # pixels between tiles; width of the strip left of a row (with its margin)
STRONG, WEAK = (0.85, 0.1, 0.1), (0.6, 0.6, 0.6)


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
    """Write a PNG of both augmented views of ``--num`` samples (train mode), ``--frames`` frames
    per view; the samples and their augmentation follow ``--seed``."""
    data = build_dataset(args.dataset, 'train', data_root=args.data_root, seq_len=args.seq_len,
                         ds=args.ds, img_dim=args.img_dim,
                         negate_flow_flip=not args.legacy_flow_flip)
    with torch.random.fork_rng(devices=[]):  # an in-process caller keeps its random state
        torch.manual_seed(args.seed)
        picks = torch.randperm(len(data))[:args.num].sort().values.tolist()
        batch = collate([data[i] for i in picks])
        augmented = DeviceAugment(args.photometric_on_flow)(batch, torch.device('cpu'))
    modalities = [m for m in ('rgb', 'flow') if m in augmented]
    mean, std = (torch.tensor(x).view(3, 1, 1, 1) for x in (IMAGENET_MEAN, IMAGENET_STD))
    which = torch.linspace(0, args.seq_len - 1, min(args.frames, args.seq_len)).round().long()
    # [num, V, 3, T, S, S] normalised -> [num * V, M * F, 3, S, S] in [0, 1]: one row per view
    rows = torch.cat([(augmented[m] * std + mean)[:, :, :, which].transpose(2, 3)
                      for m in modalities], 2).clamp(0, 1).flatten(0, 1)
    grid = make_grid(rows.flatten(0, 1), nrow=rows.shape[1], padding=PAD, pad_value=1.0)
    canvas = torch.nn.functional.pad(grid, (MARK, 0), value=1.0)
    for r, strong in enumerate(batch['strong'].flatten().tolist()):
        top = PAD + r * (args.img_dim + PAD)
        colour = torch.tensor(STRONG if strong else WEAK)
        canvas[:, top:top + args.img_dim, :MARK - 1] = colour[:, None, None]
    save_image(canvas, args.out, format='PNG')
    print(f'wrote {args.out} ({canvas.shape[2]}x{canvas.shape[1]})')
