"""What the evaluation scripts share: flags, test-time crops, the pass of a network over every
window and crop of every video, held-out groups, and the per-video probability files.

Test protocol (SPEC §4): a test video is cut into every window of ``seq_len * ds`` frames (the
dataset's test mode, frames resized so the short side is ``round(img_dim * 8 / 7)``); each window
is cropped to ``img_dim`` on the device: the center crop, five crops (center + 4 corners) or ten
(the five and their horizontal flips). A network's outputs are averaged over the windows of a
video for each crop; callers average over crops (softmax probabilities for classification,
features for retrieval).
"""
import json
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from dataset.augment import flip_frames, normalize
from dataset.video_dataset import VideoDataset
from utils import distributed as du
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.config import NON_NEGATIVE, POSITIVE
from dataset.video_dataset import add_data_args
from utils.run import add_runtime_args, amp_dtype_of

# Crop sets: the first crop of every set is the center crop and the first five of 'ten' are
# 'five', so one ten-crop pass also gives the center- and five-crop results.
NUM_CROPS = {'center': 1, 'five': 5, 'ten': 10}


# ----------------------------------------------------------------------------------------------
# Flags

def add_common_flags(parser, batch_size=32):
    """Data, model and run flags of every evaluation script (the same names as pretraining)."""
    parser.add_argument('--config',
                        help='TOML file of flag defaults (configs/); flags given here win')
    g = add_data_args(parser, 'ucf101',
                      '<name> (RGB) or <name>-f (flow): ucf101, ucf101-f, hmdb51, hmdb51-f, demo, '
                      'demo-f, or any folder under --data_root laid out as SPEC §3')
    g.add_argument('--max_videos', type=NON_NEGATIVE, default=0,
                   help='use only this many videos of each split, spread evenly over it (0: all); '
                        'for smoke tests')
    g = parser.add_argument_group('model')
    g.add_argument('--net', default='s3d', help='backbone: s3d, s3dg or r50')
    g = parser.add_argument_group('run')
    g.add_argument('--batch_size', type=POSITIVE, default=batch_size,
                   help='clips per forward pass and process (training: the batch per process)')
    g.add_argument('--seed', type=int, default=0, help='each process seeds with seed + rank')
    add_runtime_args(g)
    return parser


def check_single_view(spec, dataset_flag):
    """The classifier reads one modality, one view: refuse -2clip / -2stream names at start-up."""
    if spec.views != 1 or (spec.rgb and spec.flow):
        base = spec.base
        raise SystemExit(f'error: --dataset {dataset_flag}: evaluation reads one modality and one '
                         f'clip per sample; use {base} (RGB) or {base}-f (flow)')


@dataclass
class Runtime:
    """Where this process runs (one entry point for every launch, utils.distributed)."""
    info: du.DistInfo
    amp_dtype: torch.dtype = None
    memory_format: torch.memory_format = torch.contiguous_format

    @property
    def device(self):
        return self.info.device

    @property
    def is_main(self):
        return self.info.is_main

    def say(self, *args, **kwargs):
        if self.is_main:
            print(*args, **kwargs, flush=True)


def start(args):
    """Initialise the process (group) for ``args`` (--device, --amp, --channels_last)."""
    info = du.init_distributed(args.device, args.local_rank)
    return Runtime(info, amp_dtype_of(args, info.device),
                   torch.channels_last_3d if args.channels_last else torch.contiguous_format)


# ----------------------------------------------------------------------------------------------
# Crops (pure)

def crop_offsets(height, width, size):
    """``(top, left)`` of the five crops of ``size`` pixels in a ``height x width`` frame, in the
    order center, top-left, top-right, bottom-left, bottom-right."""
    if size > min(height, width):
        raise ValueError(f'crop of {size} pixels from frames of {height}x{width}')
    bottom, right = height - size, width - size
    return [(bottom // 2, right // 2), (0, 0), (0, right), (bottom, 0), (bottom, right)]


def take_crops(frames, size, crops='center', is_flow=False, negate_flow=True):
    """uint8 ``[..., 3, H, W]`` -> ``[n, ..., 3, size, size]`` for the ``crops`` set (n = 1, 5, 10).

    The ten crops are the five of :func:`crop_offsets` followed by the same five flipped
    horizontally (a flipped flow frame has its horizontal component negated, ``negate_flow``).
    """
    if crops not in NUM_CROPS:
        raise ValueError(f'crops must be one of {list(NUM_CROPS)}, not {crops!r}')
    h, w = frames.shape[-2:]
    offsets = crop_offsets(h, w, size)[:1 if crops == 'center' else 5]
    out = [frames[..., t:t + size, l:l + size] for t, l in offsets]
    if crops == 'ten':
        out += [flip_frames(c, is_flow=is_flow, negate_flow=negate_flow) for c in out]
    return torch.stack(out)


def to_input(clips, memory_format=torch.contiguous_format):
    """uint8 clips ``[N, T, 3, H, W]`` -> normalised float ``[N, 3, T, H, W]`` (network input)."""
    x = normalize(clips.float().div_(255)).transpose(1, 2)
    return x.contiguous(memory_format=memory_format)


# ----------------------------------------------------------------------------------------------
# Which videos

def spread_indices(n, max_videos=0):
    """All of ``range(n)``, or ``max_videos`` indices spread evenly over it (for smoke tests:
    splits are sorted by class, so an even spread keeps every class)."""
    if not max_videos or max_videos >= n:
        return list(range(n))
    return torch.linspace(0, n - 1, max_videos).round().long().unique().tolist()


def holdout_split(sources, fraction, seed=0):
    """Split video positions into (kept, held out) by whole source groups (siblings stay
    together, so no held-out video has a near copy in the kept part). About ``fraction`` of the
    videos are held out; groups are drawn in a seeded random order."""
    groups = sorted(set(sources))
    if not 0 < fraction < 1 or len(groups) < 2:
        raise ValueError(f'cannot hold out {fraction} of {len(groups)} source group(s)')
    order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed)).tolist()
    target, held, size = fraction * len(sources), set(), 0
    count = {g: 0 for g in groups}
    for s in sources:
        count[s] += 1
    for i in order:
        if size >= target or len(held) == len(groups) - 1:
            break
        held.add(groups[i])
        size += count[groups[i]]
    kept = [i for i, s in enumerate(sources) if s not in held]
    out = [i for i, s in enumerate(sources) if s in held]
    return kept, out


def with_test_windows(dataset, description):
    """The videos of a (train-mode) dataset read in test mode: every window, test resize.

    The dataset module's test mode reads the test split; this gives the same windows of the
    *train* split (retrieval's gallery, a held-out validation part)."""
    test = VideoDataset(names=dataset.names, labels=dataset.labels, sources=dataset.sources,
                        rgb_lmdb=dataset.lmdbs.get('rgb'), flow_lmdb=dataset.lmdbs.get('flow'),
                        mode='test', seq_len=dataset.seq_len, ds=dataset.ds,
                        img_dim=dataset.img_dim, negate_flow_flip=dataset.negate_flow_flip,
                        description=description)
    test.num_classes, test.classes = dataset.num_classes, dataset.classes
    return test


def modality_of(videos):
    """'rgb' or 'flow': the one modality of a single-stream dataset (or of its Videos)."""
    ds = getattr(videos, 'dataset', videos)
    (modality,) = ds.lmdbs
    return modality


class Videos(Dataset):
    """The videos at ``indices`` of a dataset; each item also gets its ``position`` in that list
    (the row its result is gathered into)."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, position):
        item = self.dataset[self.indices[position]]
        item['position'] = position
        return item

    @property
    def names(self):
        return [self.dataset.names[i] for i in self.indices]

    @property
    def labels(self):
        return [self.dataset.labels[i] for i in self.indices]

    @property
    def sources(self):
        return [self.dataset.sources[i] for i in self.indices]


def first_item(batch):
    """Collate of one test video per batch (windows differ in number between videos)."""
    return batch[0]


class MiddleWindowCenterCrop:
    """Collate for validation: the middle window of each test video, center crop (in the worker,
    so only one clip per video travels). -> ``{'clips': uint8 [B, T, 3, s, s], 'label',
    'position'}``."""

    def __init__(self, size, modality):
        self.size, self.modality = size, modality

    def __call__(self, batch):
        clips = []
        for item in batch:
            windows = item[self.modality]                    # W x T x 3 x h x w
            clips.append(take_crops(windows[len(windows) // 2], self.size, 'center')[0])
        return {'clips': torch.stack(clips),
                'label': torch.tensor([item['label'] for item in batch]),
                'position': torch.tensor([item['position'] for item in batch])}


def video_loader(videos, workers, batch_size=1, collate_fn=first_item, seed=0):
    """Sequential loader over ``videos`` (sharded across processes; padded to equal shards)."""
    sampler = None
    if du.world_size() > 1:
        sampler = DistributedSampler(videos, num_replicas=du.world_size(), rank=du.get_rank(),
                                     shuffle=False, seed=seed, drop_last=False)
    return DataLoader(videos, batch_size=batch_size, sampler=sampler, shuffle=False,
                      num_workers=workers, collate_fn=collate_fn,
                      persistent_workers=False)


def gather_rows(positions, values, total):
    """Rows computed by every process, placed by position into ``[total, ...]`` (rows padded in
    by the distributed sampler repeat a position and carry the same values)."""
    positions, values = du.all_gather(positions), du.all_gather(values)
    out = values.new_zeros((total, *values.shape[1:]))
    out[positions] = values
    seen = torch.zeros(total, dtype=torch.bool, device=positions.device)
    seen[positions] = True
    if not bool(seen.all()):
        raise RuntimeError(f'{int((~seen).sum())} of {total} videos got no result')
    return out


# ----------------------------------------------------------------------------------------------
# The pass over every window and crop

class ClipBatcher:
    """Runs ``fn`` over the clips of consecutive videos in full batches of ``batch_size`` (a
    video's clips may share a batch with the next video's), and hands back each video's
    outputs once all of them are computed. Full batches keep an accelerator busy even when a
    video has only a few clips."""

    def __init__(self, fn, batch_size):
        self.fn, self.batch_size = fn, batch_size
        self.clips, self.pending = [], 0          # clips not yet run, and how many
        self.outputs, self.ready = [], 0          # outputs not yet handed out, and how many
        self.videos = deque()                     # (key, clip count) waiting for outputs

    def add(self, key, clips):
        """Queue one video's clips; returns [(key, outputs)] of the videos now complete."""
        self.clips.append(clips)
        self.pending += len(clips)
        self.videos.append((key, len(clips)))
        while self.pending >= self.batch_size:
            self._run(self.batch_size)
        return self._complete()

    def finish(self):
        if self.pending:
            self._run(self.pending)
        return self._complete()

    def _run(self, n):
        clips = torch.cat(self.clips) if len(self.clips) > 1 else self.clips[0]
        rest = clips[n:]
        self.clips, self.pending = ([rest] if len(rest) else []), len(rest)
        out = self.fn(clips[:n])
        self.outputs.append(out)
        self.ready += len(out)

    def _complete(self):
        done = []
        while self.videos and self.videos[0][1] <= self.ready:
            flat = torch.cat(self.outputs) if len(self.outputs) > 1 else self.outputs[0]
            key, n = self.videos.popleft()
            done.append((key, flat[:n]))
            self.outputs, self.ready = ([flat[n:]] if n < len(flat) else []), self.ready - n
        return done


@torch.no_grad()
def video_outputs(fn, videos, *, modality, img_dim, crops, device, batch_size, workers,
                  amp_dtype=None, negate_flow=True, memory_format=torch.contiguous_format,
                  desc='test', show_progress=True):
    """``fn`` (input ``[N, 3, T, s, s]`` -> ``[N, D]``) over every window and crop of every video
    of ``videos`` (a :class:`Videos`); the mean over each video's windows, per crop.

    Returns float32 ``[len(videos), n_crops, D]`` (on ``device``, the same in every process).
    """
    def run(clips):                                                      # N x T x 3 x s x s
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            return fn(to_input(clips, memory_format)).float()            # N x D

    n_crops = NUM_CROPS[crops]
    batcher = ClipBatcher(run, batch_size)
    done = []
    for item in tqdm(video_loader(videos, workers), desc=desc, disable=not show_progress,
                     dynamic_ncols=True):
        windows = item[modality].to(device, non_blocking=True)           # W x T x 3 x h x w
        clips = take_crops(windows, img_dim, crops, is_flow=modality == 'flow',
                           negate_flow=negate_flow)                      # n x W x T x 3 x s x s
        done += batcher.add(item['position'], clips.flatten(0, 1))
    done += batcher.finish()
    positions = torch.tensor([p for p, _ in done], dtype=torch.long, device=device)
    rows = torch.stack([out.view(n_crops, -1, out.shape[-1]).mean(1) for _, out in done])
    # The distributed sampler pads every shard to the same, non-zero length.
    return gather_rows(positions, rows, len(videos))


def crop_summaries(probs, crops):
    """Per-crop video probabilities ``[V, n, C]`` -> ``{'center': [V, C], ...}`` for each crop set
    that the ``crops`` pass contains (ten contains five and center, five contains center)."""
    out = {'center': probs[:, 0]}
    if crops in ('five', 'ten'):
        out['five'] = probs[:, :5].mean(1)
    if crops == 'ten':
        out['ten'] = probs.mean(1)
    return out


def video_accuracy(probs, labels, ks=(1, 5)):
    """Percent of videos whose label is among the top k of ``probs [V, C]``, for each k."""
    k_max = min(max(ks), probs.shape[1])
    top = probs.topk(k_max, dim=1).indices
    hit = top == labels[:, None]
    return {f'top{k}': 100.0 * hit[:, :k].any(1).float().mean().item() for k in ks}


# ----------------------------------------------------------------------------------------------
# Per-video probability files (written by main_classifier --test, read by merge_2stream_prob)

def checkpoint_stem(path):
    """``exp/best.pth.tar`` -> ``best`` (prefix of the result files written for a checkpoint)."""
    name = Path(path).name
    for suffix in ('.pth.tar', '.pth', '.tar', '.pt'):
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return name


def result_stem(test, output_dir):
    """Prefix of the result files for ``--test test``: the checkpoint's stem (``best``) in its
    own folder; with the run folder's name (``<run>_best``) in an ``--output_dir``, which the
    checkpoints of several runs may share."""
    if test == 'random':
        return 'random'
    stem = checkpoint_stem(test)
    return f'{Path(test).resolve().parent.name}_{stem}' if output_dir else stem


def checkpoint_id(test):
    """How result files name the checkpoint of ``--test``: its real path, or 'random'."""
    return 'random' if test == 'random' else str(Path(test).resolve())


def result_path(args, default_dir, suffix):
    """``<--output_dir or default_dir>/<result_stem>_<suffix>.json`` (the folder made). A file
    there holding another checkpoint's result (two runs of one name sharing an --output_dir) is
    an error before any work, not overwritten after it."""
    out = Path(args.output_dir) if args.output_dir else Path(default_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f'{result_stem(args.test, args.output_dir)}_{suffix}.json'
    if path.exists():
        try:
            old = json.loads(path.read_text()).get('checkpoint')
        except (ValueError, AttributeError):
            old = None
        if old not in (None, checkpoint_id(args.test)):
            raise ValueError(f'{path} holds the result of another checkpoint ({old}); give '
                             f'--test {args.test} another --output_dir')
    return path


def save_probabilities(path, *, names, labels, probs, classes, meta):
    save_checkpoint({'names': list(names), 'labels': torch.as_tensor(labels, dtype=torch.long),
                     'probs': probs.detach().float().cpu(), 'classes': list(classes),
                     'meta': dict(meta)}, path)


def load_probabilities(path, flag='probabilities'):
    """A file of :func:`save_probabilities`; errors name the path."""
    data = load_checkpoint(path, flag, required=('names', 'labels', 'probs', 'classes'),
                           what='probability file of main_classifier.py --test')
    n = len(data['names'])
    if data['probs'].shape[0] != n or data['labels'].shape[0] != n:
        raise ValueError(f'{flag}: {path} is inconsistent: {n} names, probabilities '
                         f'{tuple(data["probs"].shape)}, {data["labels"].shape[0]} labels')
    return data
