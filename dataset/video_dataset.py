"""One dataset class for every dataset, modality (RGB, flow, both) and number of views.

Names follow the seed: ``<name>[-f][-2stream][-2clip]`` (``ucf101-2clip``, ``ucf101-f-2clip``,
``ucf101-2stream-2clip``, ``hmdb51``, ...): ``-f`` flow only, ``-2stream`` RGB and flow together,
``-2clip`` two views per video. Any ``<name>`` whose folder follows the layout of SPEC §3 works.
"""
import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, default_collate

from utils.config import NON_NEGATIVE, POSITIVE
from . import augment, sampler, splits
from .lmdb_video import (VideoLMDB, check_same_size, decode_frames, decode_list, jpeg_size,
                         merge_packed, pack_jpegs, unpack_jpegs)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT_ENV = 'CVTCL_DATA_ROOT'
BUILTIN = ('demo',)


def default_data_root():
    """``$CVTCL_DATA_ROOT`` if set, else ``data/`` in the project folder (not the working dir)."""
    return Path(os.environ.get(DATA_ROOT_ENV) or PROJECT_ROOT / 'data')


@dataclass(frozen=True)
class DatasetName:
    base: str
    rgb: bool
    flow: bool
    views: int

    SUFFIXES = ('-f', '-2stream', '-2clip')  # the order they must come in

    @classmethod
    def parse(cls, name):
        # Strip every trailing suffix, in any order, then rebuild the name in the grammar's
        # order: a name that differs (misordered or repeated suffixes) gets the right spelling.
        base, found = name, set()
        while suffix := next((s for s in cls.SUFFIXES if base.endswith(s)), None):
            base = base[: -len(suffix)]
            found.add(suffix)
        if not base:
            raise ValueError(f'dataset {name!r}: no name before the suffixes')
        if '-f' in found and '-2stream' in found:
            raise ValueError(f'dataset {name!r}: -f (flow only) and -2stream exclude each other')
        canonical = base + ''.join(s for s in cls.SUFFIXES if s in found)
        if canonical != name:
            raise ValueError(f'dataset {name!r}: the suffixes go in the order '
                             f'<name>[-f][-2stream][-2clip], each once; use {canonical!r}')
        return cls(base, rgb='-f' not in found, flow=bool(found & {'-f', '-2stream'}),
                   views=2 if '-2clip' in found else 1)


def known_datasets(data_root):
    root = Path(data_root)
    found = set(BUILTIN)
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and any(d.glob(f'{d.name}_*frame*.lmdb')):
                found.add(d.name)
    return sorted(found)


def layout(data_root, base, mode, split_dir=None):
    """Paths of a dataset folder (SPEC §3) for ``mode`` ('train' or 'test'); ``folder`` holds
    the split files (``split_dir`` when given)."""
    data = Path(data_root) / base
    folder = Path(split_dir) if split_dir is not None else data
    # Kinetics-style folders have one LMDB per part (a flow-only folder counts too), and the
    # split files train_split.csv/val_split.csv.
    kinetics = (any((data / f'{base}{kind}_frame_train.lmdb').exists() for kind in ('', '_tvl1'))
                or (folder / 'train_split.csv').exists())
    part = ('train' if mode == 'train' else 'val') if kinetics else None
    suffix = f'_{part}' if part else ''
    return {
        'folder': folder,
        'rgb': data / f'{base}_frame{suffix}.lmdb',
        'flow': data / f'{base}_tvl1_frame{suffix}.lmdb',
        'kinetics': kinetics,
    }


def split_csv(info, mode, split):
    """The split CSV of ``mode`` in ``info['folder']``: ``{train,test}_split0k.csv``, or for
    Kinetics ``{train,val}_split.csv``."""
    if info['kinetics']:
        return info['folder'] / f'{"train" if mode == "train" else "val"}_split.csv'
    return info['folder'] / f'{"train" if mode == "train" else "test"}_split{split:02d}.csv'


class VideoDataset(Dataset):
    """Videos of one split as clips of ``seq_len`` frames at stride ``ds``.

    Train mode: an item is a dict with ``'rgb'`` and/or ``'flow'`` uint8 ``[V, T, 3, img_dim,
    img_dim]`` (V views, geometry applied), ``'strong'`` bool ``[V]`` (which views get the
    photometric augmentation on the device), ``'label'``, ``'source'`` (sibling group),
    ``'index'``. Test mode: every window of the video, resized so the short side is
    ``test_size`` (crops are taken on the device): ``[W, T, 3, h, w]``.

    Views (``views=2``): a share ``two_clip_prob`` (0.5) of the pairs are two independent clips,
    each strong with probability ``two_clip_strong_prob`` (0.3); the others one clip seen twice,
    one view strong and one weak (which one at random). With one view, the view is strong with ``strong_prob``.
    """

    def __init__(self, *, names, labels, sources, rgb_lmdb=None, flow_lmdb=None, mode='train',
                 views=1, seq_len=32, ds=1, img_dim=128, test_size=None, strict_min_frames=False,
                 strong_prob=0.0, two_clip_prob=0.5, two_clip_strong_prob=0.3, negate_flow_flip=True,
                 crop_scale=(0.2, 1.0), decode='cpu', description='dataset'):
        if mode not in ('train', 'test'):
            raise ValueError(f'mode must be train or test, not {mode!r}')
        if rgb_lmdb is None and flow_lmdb is None:
            raise ValueError('at least one of rgb_lmdb and flow_lmdb is needed')
        self.mode, self.views, self.seq_len, self.ds = mode, views, seq_len, ds
        self.img_dim = img_dim
        self.test_size = test_size or round(img_dim * 8 / 7)
        self.strong_prob, self.two_clip_prob = strong_prob, two_clip_prob
        self.two_clip_strong_prob = two_clip_strong_prob
        self.negate_flow_flip, self.crop_scale = negate_flow_flip, crop_scale
        if decode not in ('cpu', 'device'):
            raise ValueError(f"decode must be 'cpu' or 'device', not {decode!r}")
        self.decode = decode
        self.lmdbs = {}
        if rgb_lmdb is not None:
            self.lmdbs['rgb'] = rgb_lmdb if isinstance(rgb_lmdb, VideoLMDB) else VideoLMDB(rgb_lmdb)
        if flow_lmdb is not None:
            self.lmdbs['flow'] = flow_lmdb if isinstance(flow_lmdb, VideoLMDB) else VideoLMDB(flow_lmdb)
        if not names:
            raise ValueError(f'{description}: the split lists no videos')
        for modality, db in self.lmdbs.items():
            missing = [n for n in names if n not in db]
            if missing:
                raise ValueError(f'{description}: {len(missing)} video(s) of the split are not in '
                                 f'{db.path}, e.g. {missing[0]!r}{holds_none(db)}')
        need = sampler.min_frames(seq_len, ds, strict_min_frames)
        keep = [i for i, n in enumerate(names) if self._length(n) >= need]
        self.dropped = sorted(set(names) - {names[i] for i in keep})
        if not keep:
            raise ValueError(f'{description}: no video has the {need} frames a clip of --seq_len '
                             f'{seq_len} at --ds {ds} needs (longest: '
                             f'{max(self._length(n) for n in names) if names else 0})')
        self.names = [names[i] for i in keep]
        self.labels = [int(labels[i]) for i in keep]
        self.sources = [int(sources[i]) for i in keep]

    def _length(self, name):
        # Two-stream: the flow video is usually one frame shorter; use the shorter length.
        return min(db.num_frames(name) for db in self.lmdbs.values())

    def __len__(self):
        return len(self.names)

    def _plan_views(self, n):
        """Frame indices ``[V, T]`` and the strong flags ``[V]`` of one item's views."""
        T, ds = self.seq_len, self.ds
        if self.views == 1:
            return sampler.train_indices(n, T, ds)[None], torch.rand(1) < self.strong_prob
        if torch.rand(()) < self.two_clip_prob:   # two clips, each strong with probability 0.3
            idx = torch.stack([sampler.train_indices(n, T, ds) for _ in range(2)])
            return idx, torch.rand(2) < self.two_clip_strong_prob
        clip = sampler.train_indices(n, T, ds)  # one clip twice: one strong, one weak
        strong_first = bool(torch.rand(()) < 0.5)
        return torch.stack([clip, clip]), torch.tensor([strong_first, not strong_first])

    def __getitem__(self, index):
        name = self.names[index]
        item = {'label': self.labels[index], 'source': self.sources[index], 'index': index}
        n = self._length(name)
        if self.mode == 'test':
            windows = sampler.test_windows(n, self.seq_len, self.ds)           # W x T
            unique, inverse = torch.unique(windows, return_inverse=True)
            for m, db in self.lmdbs.items():
                frames = decode_frames(db.read_bytes(name, unique.tolist()), name=name,
                                       indices=unique.tolist(), source=db.path)
                self._check_size(*frames.shape[-2:], name, db.path)
                item[m] = augment.resize_short_side(frames, self.test_size)[inverse]  # W x T x 3 x h x w
            return item
        indices, strong = self._plan_views(n)
        unique, inverse = torch.unique(indices, return_inverse=True)   # decode each frame once
        jpegs = {m: db.read_bytes(name, unique.tolist()) for m, db in self.lmdbs.items()}
        first = next(iter(self.lmdbs))
        h, w = jpeg_size(jpegs[first][0])
        self._check_size(h, w, name, self.lmdbs[first].path)
        item.update(strong=strong, frame_index=inverse, flips=torch.rand(self.views) < 0.5,
                    boxes=torch.tensor([augment.sample_crop(h, w, scale=self.crop_scale)
                                        for _ in range(self.views)]))
        if self.decode == 'device':
            # Workers only read bytes; decoding and geometry happen batched on the GPU.
            item['jpeg'] = {m: pack_jpegs(b) for m, b in jpegs.items()}
            return item
        for m, b in jpegs.items():
            frames = decode_list(b, name=name, indices=unique.tolist(), source=self.lmdbs[m].path)
            check_same_size(frames, name, unique.tolist(), self.lmdbs[m].path)
            item[m] = apply_views(frames, item, m, self.img_dim, self.negate_flow_flip)
        return item

    def _check_size(self, h, w, name, source):
        if min(h, w) < self.img_dim:
            raise ValueError(f'{source}: frames of {name!r} are {h}x{w}, smaller than --img_dim '
                             f'{self.img_dim}; cropping would have to upsample. Use --img_dim '
                             f'{min(h, w)} or rebuild the LMDB with larger frames')


def apply_views(frames, plan, modality, img_dim, negate_flow_flip=True, out=None):
    """Decoded unique frames (a sequence of ``[3, H, W]``, as the decoder returns them, or one
    ``[N, H, W, 3]`` tensor) -> the item's views ``[V, T, 3, img_dim, img_dim]`` (channels last
    in memory) by its plan (``frame_index [V, T]``, ``boxes [V, 4]``, ``flips [V]``); on any
    device. Written into ``out`` when given (e.g. the sample's slot of a batch)."""
    index = plan['frame_index']
    stacked = isinstance(frames, torch.Tensor)   # [N, H, W, 3]: frames stacked on the device
    height, width = frames.shape[1:3] if stacked else frames[0].shape[-2:]
    device = frames.device if stacked else frames[0].device
    if out is None:
        out = augment.channels_last_empty(*index.shape, size=img_dim, device=device)
    if stacked:
        index_on_device = index.to(device, non_blocking=True)
    for v, idx in enumerate(index.tolist()):
        # Only the crop of each frame is copied, straight into one channels-last batch that the
        # resize kernel reads as it is. On the device, where launches cost more than bytes, the
        # sample's frames come stacked and a view's crops are gathered in one indexing call.
        t, l, h, w = augment.box_pixels(plan['boxes'][v].tolist(), height, width)
        if stacked:
            crops = frames[:, t:t + h, l:l + w][index_on_device[v]]
        else:
            crops = torch.stack([frames[i].permute(1, 2, 0)[t:t + h, l:l + w] for i in idx])
        out[v] = augment.resize_flip(crops.permute(0, 3, 1, 2), img_dim, bool(plan['flips'][v]),
                                     is_flow=modality == 'flow', negate_flow=negate_flow_flip)
    return out


def collate(items):
    """Default collation, except that the uint8 views keep their channels-last memory (no
    transposing copy of the batch) and the packed JPEG bytes of ``decode='device'`` are merged
    per modality (``merge_packed``)."""
    special = ('jpeg', 'rgb', 'flow')
    jpegs = [item['jpeg'] for item in items] if 'jpeg' in items[0] else None
    frames = {m: [item[m].movedim(-3, -1) for item in items]
              for m in ('rgb', 'flow') if m in items[0]}
    batch = default_collate([{k: v for k, v in item.items() if k not in special}
                             for item in items])
    for m, hwc in frames.items():
        batch[m] = default_collate(hwc).movedim(-1, -3)
    if jpegs is not None:
        batch['jpeg'] = {m: merge_packed([j[m] for j in jpegs]) for m in jpegs[0]}
    return batch


def holds_none(db):
    """``'; <path> holds no videos'`` for an empty LMDB (the likelier cause of a missing video)."""
    return '' if len(db) else f'; {db.path} holds no videos'


def _split_names(info, spec, mode, split, first, dataset):
    """Names of the split's videos and the derived UCF101 splits (None unless derived): from the
    split CSV; for UCF101 without one, derived from the names in ``first`` (SPEC §3); for
    Kinetics without one, every video of ``first`` (its LMDB is one part)."""
    csv = split_csv(info, mode, split)
    if csv.exists():
        names = splits.read_split(csv)
        if not names:
            raise ValueError(f'dataset {dataset!r}: split file {csv} lists no videos (rows of 0 '
                             f'frames do not count)')
        train_csv = split_csv(info, 'train', split)
        if mode == 'test' and train_csv.exists():
            # A video in both would be trained on and then scored as unseen.
            both = set(names).intersection(splits.read_split(train_csv))
            if both:
                example = next(n for n in names if n in both)
                raise ValueError(f'dataset {dataset!r}: {len(both)} video(s) are in both '
                                 f'{train_csv} and {csv}, e.g. {example!r}; a test video must '
                                 f'not be a training video')
        return names, None
    if spec.base.startswith('ucf101'):
        # The published UCF101 tars hold no split files; they follow from the names (SPEC §3).
        derived = splits.ucf101_splits(first.names)
        if f'{mode}_split{split:02d}' not in derived['splits']:
            raise ValueError(f'dataset {dataset!r}: UCF101 has splits 1, 2 and 3, not '
                             f'--which_split {split}')
        names = derived['splits'][f'{mode}_split{split:02d}']
        if not names:
            block = splits.groups_text(splits.group_block(split))
            why = (f'{first.path} holds no videos' if not len(first)
                   else f'{first.path} has no video of groups {block}' if mode == 'test'
                   else f'every video of {first.path} is of groups {block}, its test split')
            raise ValueError(f'dataset {dataset!r}: the {mode} split {split} derived from the '
                             f'video names is empty: {why}')
        return names, derived
    if info['kinetics']:
        if not len(first):
            raise ValueError(f'dataset {dataset!r}: {first.path} holds no videos')
        return first.names, None
    raise FileNotFoundError(f'split file {csv} not found; build it with '
                            f'`python -m dataset.prepare splits ...` (see README, Data)')


def build_dataset(name, mode, *, data_root=None, seq_len=32, ds=1, img_dim=128, split=1,
                  rgb_lmdb=None, flow_lmdb=None, split_dir=None, **options):
    """The dataset named ``name`` (SPEC §3 grammar) in ``mode`` ('train' or 'test').

    ``rgb_lmdb``/``flow_lmdb``/``split_dir`` override the layout under ``data_root``. Further
    keyword options go to :class:`VideoDataset`.
    """
    data_root = Path(data_root) if data_root is not None else default_data_root()
    spec = DatasetName.parse(name)
    if spec.base == 'demo':
        from .demo import ensure_demo
        ensure_demo(data_root)
    info = layout(data_root, spec.base, mode, split_dir)
    if rgb_lmdb is None and flow_lmdb is None and not info['folder'].is_dir():
        raise ValueError(f'unknown dataset {spec.base!r} (from {name!r}): no folder '
                         f'{info["folder"]}. Known under {data_root}: '
                         f'{", ".join(known_datasets(data_root))}')
    paths = {'rgb': rgb_lmdb or info['rgb'], 'flow': flow_lmdb or info['flow']}
    for modality in ('rgb', 'flow'):
        if getattr(spec, modality) and not Path(paths[modality]).exists():
            raise FileNotFoundError(f'dataset {name!r} needs the {modality} LMDB '
                                    f'{paths[modality]}, which does not exist')
    first = VideoLMDB(paths['rgb'] if spec.rgb else paths['flow'])
    names, derived = _split_names(info, spec, mode, split, first, name)
    missing = [n for n in names if n not in first]
    if missing:
        raise ValueError(f'dataset {name!r}: {len(missing)} video(s) of the {mode} split are not '
                         f'in {first.path}, e.g. {missing[0]!r}{holds_none(first)}')

    class_file = info['folder'] / 'ClassInd.txt'
    if class_file.exists():
        classes = splits.read_class_index(class_file)
    elif derived:
        classes = {c: i for i, c in enumerate(derived['classes'])}
    else:
        # Sorted class names of every video, so that train and test number them alike: a
        # Kinetics-style folder keeps the other part's videos in another LMDB.
        names_of_all = set(first.names)
        if info['kinetics']:
            other = layout(data_root, spec.base, 'test' if mode == 'train' else 'train', split_dir)
            other_db = other['rgb'] if spec.rgb else other['flow']
            if other_db.exists():
                names_of_all.update(VideoLMDB(other_db).names)
        classes = {c: i for i, c in enumerate(sorted({n.split('/')[0] for n in names_of_all}))}
    labels = []
    for n in names:
        c = n.split('/')[0]
        if c not in classes:
            raise ValueError(f'class {c!r} of video {n!r} is not in {class_file}')
        labels.append(classes[c])

    source_file = info['folder'] / 'video_source.json'
    source_of = (splits.read_video_source(source_file) if source_file.exists()
                 else derived['video_source'] if derived else None)
    if source_of is not None:
        try:
            sources = [int(source_of[splits.source_key(n)]) for n in names]
        except KeyError as e:
            raise ValueError(f'{source_file} has no entry {e.args[0]!r}') from None
    else:
        index_of = {n: i for i, n in enumerate(first.names)}
        sources = [index_of[n] for n in names]

    ds_ = VideoDataset(
        names=names, labels=labels, sources=sources,
        rgb_lmdb=first if spec.rgb else None,
        flow_lmdb=(first if not spec.rgb else paths['flow']) if spec.flow else None,
        mode=mode, views=spec.views if mode == 'train' else 1, seq_len=seq_len, ds=ds,
        img_dim=img_dim, strict_min_frames=info['kinetics'], description=f'dataset {name!r}',
        **options)
    ds_.num_classes = len(classes)
    ds_.classes = list(classes)
    return ds_


def add_data_args(parser, dataset_default, dataset_help):
    """The data flags every script shares (same names in pretraining and evaluation)."""
    g = parser.add_argument_group('data')
    g.add_argument('--dataset', default=dataset_default, help=dataset_help)
    g.add_argument('--data_root', default=None,
                   help='folder holding <name>/<name>_frame.lmdb ...; default $CVTCL_DATA_ROOT or '
                        'data/ in the project folder')
    g.add_argument('--which_split', type=POSITIVE, default=1,
                   help='split k: train_split0k.csv / test_split0k.csv')
    g.add_argument('--seq_len', type=POSITIVE, default=32, help='frames per clip')
    g.add_argument('--ds', type=POSITIVE, default=1, help='frame stride of a clip')
    g.add_argument('--img_dim', type=POSITIVE, default=128,
                   help='crop size in pixels; test frames are resized to a short side of '
                        'round(img_dim * 8 / 7) before cropping')
    g.add_argument('-j', '--workers', type=NON_NEGATIVE, default=8,
                   help='data-loader workers per process')
    g.add_argument('--legacy_flow_flip', action=argparse.BooleanOptionalAction, default=False,
                   help="flip flow frames without negating the horizontal component (the "
                        "reference's bug)")
    g.add_argument('--rgb_lmdb', default=None, metavar='PATH',
                   help='RGB frame LMDB to read instead of the layout\'s '
                        '<data_root>/<name>/<name>_frame.lmdb (for train and test alike)')
    g.add_argument('--flow_lmdb', default=None, metavar='PATH',
                   help='flow frame LMDB to read instead of <data_root>/<name>/'
                        '<name>_tvl1_frame.lmdb (for train and test alike)')
    g.add_argument('--split_dir', default=None, metavar='DIR',
                   help='folder of the split CSVs, ClassInd.txt and video_source.json, instead '
                        'of <data_root>/<name>/')
    return g


def data_location(args):
    """``build_dataset`` keywords for where the data of ``args`` is (the data flags)."""
    return {'data_root': args.data_root, 'split': args.which_split, 'rgb_lmdb': args.rgb_lmdb,
            'flow_lmdb': args.flow_lmdb, 'split_dir': args.split_dir}


def modality_of(dataset, reverse=False):
    """'rgb' or 'flow': the modality a network trained with ``--dataset dataset`` sees (for
    two-stream CVTCL: the trained one, RGB unless ``reverse``)."""
    spec = DatasetName.parse(dataset)
    if spec.rgb and spec.flow:
        return 'flow' if reverse else 'rgb'
    return 'rgb' if spec.rgb else 'flow'


def recorded_modality(record):
    """The modality that saved arguments (a checkpoint's ``args``, a result file's ``meta``)
    record through their ``dataset`` and ``reverse``; None when they record none (e.g. a
    checkpoint of another code base)."""
    try:
        return modality_of(record['dataset'], record.get('reverse'))
    except (TypeError, KeyError, AttributeError, ValueError):
        return None
