"""One dataset class for every dataset, modality and number of views. Names follow the seed:
``<name>[-f][-2stream][-2clip]`` (``-f`` flow only, ``-2stream`` RGB and flow, ``-2clip`` two views
per video); any ``<name>`` whose folder has the layout of docs/METHOD.md, Data, works."""
import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, default_collate

from utils.config import NON_NEGATIVE, POSITIVE
from utils.misc import PROJECT_ROOT, UserError
from . import augment, sampler, splits
from .lmdb_video import VideoLMDB, decode_frames, jpeg_size, merge_packed, pack_jpegs


def default_data_root():
    """``$CVTCL_DATA_ROOT`` if set, else ``data/`` in the project folder (not the working dir)."""
    return Path(os.environ.get('CVTCL_DATA_ROOT') or PROJECT_ROOT / 'data')


@dataclass(frozen=True)
class DatasetName:
    base: str
    rgb: bool
    flow: bool
    views: int

    SUFFIXES = ('-f', '-2stream', '-2clip')  # the order they must come in

    @classmethod
    def parse(cls, name):
        # Strip the suffixes in any order; a name that misorders or repeats them gets the right one.
        base, found = name, set()
        while suffix := next((s for s in cls.SUFFIXES if base.endswith(s)), None):
            base, found = base.removesuffix(suffix), found | {suffix}
        if not base:
            raise UserError(f'dataset {name!r}: no name before the suffixes')
        if '-f' in found and '-2stream' in found:
            raise UserError(f'dataset {name!r}: -f (flow only) and -2stream exclude each other')
        canonical = base + ''.join(s for s in cls.SUFFIXES if s in found)
        if canonical != name:
            raise UserError(f'dataset {name!r}: the suffixes go in the order '
                            f'<name>[-f][-2stream][-2clip], each once; use {canonical!r}')
        return cls(base, rgb='-f' not in found, flow=bool(found & {'-f', '-2stream'}),
                   views=2 if '-2clip' in found else 1)


def layout(data_root, base, split, split_dir=None):
    """Paths of a dataset folder (docs/METHOD.md, Data): ``csv``, ``rgb`` and ``flow`` by mode
    ('train', 'test', Kinetics' val); ``folder`` (``split_dir`` if given) holds the split files."""
    data = Path(data_root) / base
    folder = Path(split_dir) if split_dir is not None else data
    kinetics = (any((data / f'{base}{kind}_frame_train.lmdb').exists() for kind in ('', '_tvl1'))
                or (folder / 'train_split.csv').exists())
    part = {'train': 'train', 'test': 'val' if kinetics else 'test'}
    number = '' if kinetics else f'{split:02d}'
    lmdb = {m: f'_frame_{p}.lmdb' if kinetics else '_frame.lmdb' for m, p in part.items()}
    return {'folder': folder, 'kinetics': kinetics,
            'csv': {m: folder / f'{p}_split{number}.csv' for m, p in part.items()},
            'rgb': {m: data / f'{base}{end}' for m, end in lmdb.items()},
            'flow': {m: data / f'{base}_tvl1{end}' for m, end in lmdb.items()}}


class VideoDataset(Dataset):
    """Videos of one split as clips of ``seq_len`` frames at stride ``ds``. Train items: ``'rgb'``
    and/or ``'flow'`` uint8 ``[V, T, 3, S, S]``, ``'strong'`` ``[V]``, ``'label'``, ``'source'``,
    ``'index'``, the plan, and with ``local_segments`` L ``'rgb_local'``/``'flow_local'``
    ``[2, L, T/L, 3, S, S]`` and ``'local_strong'`` ``[2, L]``. Test items: every window, short
    side resized to ``round(img_dim * 8 / 7)``, ``[W, T, 3, h, w]``."""

    def __init__(self, *, names, labels, sources, rgb_lmdb=None, flow_lmdb=None, mode='train',
                 views=1, seq_len=32, ds=1, img_dim=128, strict_min_frames=False, strong_prob=0.0,
                 two_clip_prob=0.5, two_clip_strong_prob=0.3, negate_flow_flip=True,
                 crop_scale=(0.2, 1.0), decode='cpu', local_segments=0, description='dataset',
                 test_windows='all', stored_size=False):
        if local_segments and (mode != 'train' or views != 2 or seq_len % local_segments):
            raise UserError(f'{description}: local clips need 2 views in train mode and '
                            f'--seq_len {seq_len} divisible by --num_segments {local_segments}')
        self.mode, self.views, self.seq_len, self.ds, self.decode = mode, views, seq_len, ds, decode
        self.img_dim, self.crop_scale, self.test_windows = img_dim, crop_scale, test_windows
        self.strong_prob, self.two_clip_prob = strong_prob, two_clip_prob
        self.two_clip_strong_prob, self.negate_flow_flip = two_clip_strong_prob, negate_flow_flip
        self.local_segments, self.stored_size = local_segments, stored_size
        self.lmdbs = {m: db if isinstance(db, VideoLMDB) else VideoLMDB(db)
                      for m, db in (('rgb', rgb_lmdb), ('flow', flow_lmdb)) if db is not None}
        need = sampler.min_frames(seq_len, ds, strict_min_frames)
        lengths = [self._length(n) for n in names]
        if max(lengths) < need:
            raise UserError(f'{description}: no video has the {need} frames a clip of --seq_len '
                            f'{seq_len} at --ds {ds} needs (longest: {max(lengths)})')
        keep = [i for i, k in enumerate(lengths) if k >= need]
        self.dropped = sorted(names[i] for i, k in enumerate(lengths) if k < need)
        self.names, self.labels, self.sources = (
            [column[i] for i in keep] for column in (names, labels, sources))

    def _length(self, name):
        # Two-stream: the flow video is usually one frame shorter; use the shorter length.
        return min(db.num_frames(name) for db in self.lmdbs.values())

    def __len__(self):
        return len(self.names)

    def _pair_strong(self):
        """(two clips?, strong flags ``[2]``) of a 2-view sample (docs/METHOD.md, Augmentation)."""
        if bool(torch.rand(()) < self.two_clip_prob):
            return True, torch.rand(2) < self.two_clip_strong_prob
        strong_first = bool(torch.rand(()) < 0.5)
        return False, torch.tensor([strong_first, not strong_first])

    def _plan_geometry(self, item, h, w, lead, prefix=''):
        """Crop boxes and flips of ``lead`` clips, e.g. ``[V]`` views or ``[2, L]`` local clips."""
        n = torch.Size(lead).numel()
        boxes = [augment.sample_crop(h, w, scale=self.crop_scale) for _ in range(n)]
        item[prefix + 'boxes'] = torch.tensor(boxes).view(*lead, 4)
        item[prefix + 'flips'] = (torch.rand(n) < 0.5).view(lead)

    def __getitem__(self, index):
        name = self.names[index]
        item = {'label': self.labels[index], 'source': self.sources[index], 'index': index}
        n = self._length(name)
        if self.mode == 'test':
            # test_windows 'all': every window, 'middle': the middle one, 'random': one drawn as
            # training draws. stored_size: frames as stored, else short side round(img_dim * 8/7).
            windows = (sampler.train_indices(n, self.seq_len, self.ds)[None]
                       if self.test_windows == 'random'
                       else sampler.test_windows(n, self.seq_len, self.ds))       # W x T
            if self.test_windows == 'middle':
                windows = windows[len(windows) // 2][None]
            unique, inverse = torch.unique(windows, return_inverse=True)
            for m, db in self.lmdbs.items():
                frames = db.read(name, unique.tolist())
                self._check_size(*frames.shape[-2:], name, db.path)
                if not self.stored_size:
                    frames = augment.resize_short_side(frames, round(self.img_dim * 8 / 7))
                item[m] = frames[inverse]                         # W x T x 3 x h x w
            return item
        if self.views == 1:
            indices = sampler.train_indices(n, self.seq_len, self.ds)[None]          # V x T
            strong = torch.rand(1) < self.strong_prob
        else:   # two clips, or one clip seen twice
            two, strong = self._pair_strong()
            clips = [sampler.train_indices(n, self.seq_len, self.ds) for _ in range(1 + two)]
            indices = torch.stack([clips[0], clips[-1]])
        unique, inverse = torch.unique(indices, return_inverse=True)   # decode each frame once
        jpegs = {m: db.read_bytes(name, unique.tolist()) for m, db in self.lmdbs.items()}
        first = next(iter(self.lmdbs))
        h, w = jpeg_size(jpegs[first][0], name, self.lmdbs[first].path)
        self._check_size(h, w, name, self.lmdbs[first].path)
        item.update(strong=strong, frame_index=inverse)
        self._plan_geometry(item, h, w, (self.views,))
        if self.local_segments:
            # Local clip j of a view: its j-th T/L frames (docs/METHOD.md, Local clips).
            item['local_strong'] = torch.stack(
                [self._pair_strong()[1] for _ in range(self.local_segments)], 1)
            self._plan_geometry(item, h, w, (2, self.local_segments), 'local_')
        if self.decode == 'device':
            # Workers only read bytes; decoding and geometry happen batched on the GPU.
            item['jpeg'] = {m: pack_jpegs(b) for m, b in jpegs.items()}
            return item
        for m, b in jpegs.items():
            frames = decode_frames(b, name, unique.tolist(), self.lmdbs[m].path, stack=False)
            item[m] = apply_views(frames, item, m, self.img_dim, self.negate_flow_flip)
            if self.local_segments:
                item[m + '_local'] = apply_views(frames, local_plan(item), m, self.img_dim,
                                                 self.negate_flow_flip).unflatten(0, (2, -1))
        return item

    def _check_size(self, h, w, name, source):
        if min(h, w) < self.img_dim:
            raise UserError(f'{source}: frames of {name!r} are {h}x{w}, smaller than --img_dim '
                            f'{self.img_dim}; cropping would have to upsample. Use --img_dim '
                            f'{min(h, w)} or rebuild the LMDB with larger frames')


def apply_views(frames, plan, modality, img_dim, negate_flow_flip=True, out=None):
    """Decoded unique frames (a sequence of ``[3, H, W]`` as the decoder returns them, or one
    ``[N, H, W, 3]`` tensor) -> views ``[V, T, 3, img_dim, img_dim]`` (channels last in memory,
    into ``out`` if given) by a plan (``frame_index [V, T]``, ``boxes [V, 4]``, ``flips [V]``)."""
    index = plan['frame_index']
    stacked = isinstance(frames, torch.Tensor)   # [N, H, W, 3]: frames stacked on the device
    height, width = frames.shape[1:3] if stacked else frames[0].shape[-2:]
    if out is None:
        out = augment.channels_last_empty(*index.shape, size=img_dim, device=frames[0].device)
    index_on_device = index.to(frames[0].device, non_blocking=True)
    for v, idx in enumerate(index.tolist()):
        # Only each frame's crop is copied, into one channels-last batch the resize reads as it
        # is; on the device (launches cost more than bytes) in one indexing call per view.
        t, l, h, w = augment.box_pixels(plan['boxes'][v].tolist(), height, width)
        if stacked:
            crops = frames[:, t:t + h, l:l + w][index_on_device[v]]
        else:
            crops = torch.stack([frames[i].permute(1, 2, 0)[t:t + h, l:l + w] for i in idx])
        crops = augment.resize(crops.permute(0, 3, 1, 2), (img_dim, img_dim))
        out[v] = (augment.flip_frames(crops, modality == 'flow', negate_flow_flip)
                  if plan['flips'][v] else crops)
    return out


def local_plan(plan):
    """The plan of the ``[2, L]`` local clips as one of ``2L`` views of ``T/L`` frames each."""
    return {'frame_index': plan['frame_index'].reshape(plan['local_flips'].numel(), -1),
            'boxes': plan['local_boxes'].flatten(0, 1), 'flips': plan['local_flips'].flatten()}


def collate(items):
    """Default collation, except that the uint8 views keep their channels-last memory and the
    packed JPEG bytes of ``decode='device'`` are merged per modality (``merge_packed``)."""
    special = ('jpeg', 'rgb', 'flow', 'rgb_local', 'flow_local')
    batch = default_collate([{k: v for k, v in item.items() if k not in special} for item in items])
    for m in special[1:]:
        if m in items[0]:
            batch[m] = default_collate([item[m].movedim(-3, -1) for item in items]).movedim(-1, -3)
    if 'jpeg' in items[0]:
        batch['jpeg'] = {m: merge_packed([item['jpeg'][m] for item in items])
                         for m in items[0]['jpeg']}
    return batch


def _split_names(info, spec, mode, split, first, dataset):
    """(names, derived sources or None): from the split CSV; without one, UCF101's derived from
    the names in ``first``, Kinetics' every video of ``first`` (its LMDB is one part)."""
    csv = info['csv'][mode]
    if csv.exists():
        names = splits.read_split(csv)
        if not names:
            raise UserError(f'dataset {dataset!r}: split file {csv} lists no videos (rows of 0 '
                            f'frames do not count)')
        train_csv = info['csv']['train']   # a test video trained on would be scored as unseen
        trained = set(splits.read_split(train_csv)) if mode == 'test' and train_csv.exists() else ()
        both = [n for n in names if n in trained]
        if both:
            raise UserError(f'dataset {dataset!r}: {len(both)} video(s) are in both {train_csv} '
                            f'and {csv}, e.g. {both[0]!r}; a test video must not be a training '
                            f'video')
        return names, None
    if spec.base.startswith('ucf101'):
        # The published UCF101 tars hold no split files; they follow from the names.
        derived = splits.ucf101_splits(first.names)
        names = derived['splits'].get(f'{mode}_split{split:02d}')
        if names is None:
            raise UserError(f'dataset {dataset!r}: UCF101 has splits 1, 2 and 3, not '
                            f'--which_split {split}')
        if not names:
            block = splits.groups_text(splits.group_block(split))
            why = (f'{first.path} holds no videos' if not len(first)
                   else f'{first.path} has no video of groups {block}' if mode == 'test'
                   else f'every video of {first.path} is of groups {block}, its test split')
            raise UserError(f'dataset {dataset!r}: the {mode} split {split} derived from the '
                            f'video names is empty: {why}')
        return names, derived['video_source']
    if info['kinetics']:
        if not len(first):
            raise UserError(f'dataset {dataset!r}: {first.path} holds no videos')
        return first.names, None
    raise UserError(f'split file {csv} not found; build it with '
                    f'`python -m dataset.prepare splits ...` (see README, Data)')


def build_dataset(name, mode, *, data_root=None, split=1, rgb_lmdb=None, flow_lmdb=None,
                  split_dir=None, **options):
    """The dataset named ``name`` in ``mode`` ('train' or 'test'). ``rgb_lmdb``/``flow_lmdb``/
    ``split_dir`` override the layout under ``data_root``; other options go to VideoDataset."""
    data_root = Path(data_root) if data_root is not None else default_data_root()
    spec = DatasetName.parse(name)
    if spec.base == 'demo':
        from .demo import ensure_demo
        ensure_demo(data_root)
    info = layout(data_root, spec.base, split, split_dir)
    if rgb_lmdb is None and flow_lmdb is None and not info['folder'].is_dir():
        known = {p.parent.name for p in data_root.glob('*/*frame*.lmdb')
                 if p.name.startswith(p.parent.name + '_')}
        raise UserError(f'unknown dataset {spec.base!r} (from {name!r}): no folder '
                        f'{info["folder"]}. Known under {data_root}: '
                        f'{", ".join(sorted(known | {"demo"}))}')
    lmdbs = {m: VideoLMDB(path or info[m][mode])
             for m, path in (('rgb', rgb_lmdb), ('flow', flow_lmdb)) if getattr(spec, m)}
    first = next(iter(lmdbs.values()))   # RGB where there is RGB: its LMDB lists the videos
    names, derived_sources = _split_names(info, spec, mode, split, first, name)
    for db in lmdbs.values():
        missing = [n for n in names if n not in db]
        if missing:
            empty = f'; {db.path} holds no videos' if not len(db) else ''   # the likelier cause
            raise UserError(f'dataset {name!r}: {len(missing)} video(s) of the {mode} split are '
                            f'not in {db.path}, e.g. {missing[0]!r}{empty}')
    class_file = info['folder'] / 'ClassInd.txt'
    if class_file.exists():
        classes = splits.read_class_index(class_file)
    else:
        # Without ClassInd.txt: the sorted class names of every video, so that train and test
        # number them alike (a Kinetics-style folder keeps the other part in another LMDB).
        every = set(first.names)
        other = info['rgb' if spec.rgb else 'flow']['test' if mode == 'train' else 'train']
        if info['kinetics'] and other.exists():
            every.update(VideoLMDB(other).names)
        classes = {c: i for i, c in enumerate(sorted({n.split('/')[0] for n in every}))}
    unknown = next((n for n in names if n.split('/')[0] not in classes), None)
    if unknown:
        raise UserError(f'class {unknown.split("/")[0]!r} of video {unknown!r} is not in '
                        f'{class_file}')
    labels = [classes[n.split('/')[0]] for n in names]
    source_file = info['folder'] / 'video_source.json'
    source_of = (splits.read_video_source(source_file) if source_file.exists()
                 else derived_sources)
    if source_of is not None:
        try:
            sources = [int(source_of[splits.source_key(n)]) for n in names]
        except KeyError as e:
            raise UserError(f'{source_file} has no entry {e.args[0]!r}') from None
    else:
        index_of = {n: i for i, n in enumerate(first.names)}
        sources = [index_of[n] for n in names]
    data = VideoDataset(
        names=names, labels=labels, sources=sources, rgb_lmdb=lmdbs.get('rgb'),
        flow_lmdb=lmdbs.get('flow'), mode=mode, views=spec.views if mode == 'train' else 1,
        strict_min_frames=info['kinetics'], description=f'dataset {name!r}', **options)
    data.num_classes, data.classes = len(classes), list(classes)
    return data


def add_data_args(parser, dataset_default, dataset_help):
    """The data flags every script shares (same names in pretraining and evaluation)."""
    g = parser.add_argument_group('data')
    g.add_argument('--dataset', default=dataset_default, help=dataset_help)
    g.add_argument('--data_root', help='folder holding <name>/<name>_frame.lmdb ...; default '
                   '$CVTCL_DATA_ROOT or data/ in the project folder')
    g.add_argument('--which_split', type=POSITIVE, default=1,
                   help='split k: train_split0k.csv / test_split0k.csv')
    g.add_argument('--seq_len', type=POSITIVE, default=32, help='frames per clip')
    g.add_argument('--ds', type=POSITIVE, default=1, help='frame stride of a clip')
    g.add_argument('--img_dim', type=POSITIVE, default=128, help='crop size in pixels; test '
                   'frames are resized to a short side of round(img_dim * 8 / 7) before cropping')
    g.add_argument('-j', '--workers', type=NON_NEGATIVE, default=8,
                   help='data-loader workers per process')
    g.add_argument('--legacy_flow_flip', action=argparse.BooleanOptionalAction, default=False,
                   help="flip flow frames without negating the horizontal component (the "
                        "reference's bug)")
    g.add_argument('--rgb_lmdb', metavar='PATH', help='RGB frame LMDB to read instead of '
                   '<data_root>/<name>/<name>_frame.lmdb (for train and test alike)')
    g.add_argument('--flow_lmdb', metavar='PATH', help='flow frame LMDB to read instead of '
                   '<data_root>/<name>/<name>_tvl1_frame.lmdb (for train and test alike)')
    g.add_argument('--split_dir', metavar='DIR', help='folder of the split CSVs, ClassInd.txt '
                   'and video_source.json, instead of <data_root>/<name>/')
    return g


def data_location(args):
    """``build_dataset`` keywords for where the data of ``args`` is (the data flags)."""
    return {'data_root': args.data_root, 'split': args.which_split, 'rgb_lmdb': args.rgb_lmdb,
            'flow_lmdb': args.flow_lmdb, 'split_dir': args.split_dir}


def modality_of(dataset, reverse=False):
    """'rgb' or 'flow': the modality a network trained with ``--dataset dataset`` sees (for
    two-stream CVTCL: the trained one, RGB unless ``reverse``)."""
    spec = DatasetName.parse(dataset)
    return 'flow' if not spec.rgb or (spec.flow and reverse) else 'rgb'


def recorded_modality(record):
    """The modality of saved arguments (a checkpoint's ``args``, a result's ``meta``) or None."""
    try:
        return modality_of(record['dataset'], record.get('reverse'))
    except (TypeError, KeyError, AttributeError, UserError):
        return None
