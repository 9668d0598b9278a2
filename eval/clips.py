"""How evaluation reads videos: shared flags, which videos, the test views of each --protocol, one
pass of a network over every window and crop, result files (docs/METHOD.md, Evaluation)."""
import argparse
import json
from contextlib import contextmanager, suppress
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from backbone import MIN_SEGMENT_FRAMES
from dataset.augment import Photometric, flip_frames, normalize, resize
from dataset.catalog import DatasetName, add_data_args, build_dataset, data_location
from utils import distributed as du
from utils.config import NON_NEGATIVE, POSITIVE
from utils.misc import PROJECT_ROOT, UserError, git_revision, plain_args, topk_accuracy
from utils.run import add_runtime_args, amp_dtype_of

NUM_CROPS = {'center': 1, 'five': 5, 'ten': 10}


def eval_parser(doc):
    """A parser described by the first paragraph of ``doc``, with the data, model, run, output and
    feature flags of every evaluation script (the names of pretraining)."""
    parser = argparse.ArgumentParser(description=doc.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--config', help='TOML file of flag defaults (configs/); flags win')
    g = add_data_args(parser, 'ucf101', '<name> (RGB) or <name>-f (flow): ucf101, hmdb51, demo '
                      'or any folder under --data_root laid out as docs/METHOD.md, Data says')
    g.add_argument('--max_videos', type=NON_NEGATIVE, default=0,
                   help='use only this many videos of each split, spread evenly (0: all)')
    g.add_argument('--protocol', choices=['coclr', 'clean'], default='coclr',
                   help="test views: coclr = CoCLR's (jittered 224-pixel crops scaled to "
                        '--img_dim, a random clip per gallery video, validation on 30%% of the '
                        'test split); clean = deterministic (docs/METHOD.md, Evaluation)')
    g.add_argument('--test_windows', choices=['all', 'middle'], default='all',
                   help="test videos' windows read: all, or the middle one (pretraining's "
                        '--monitor_windows)')
    g.add_argument('--photometric_on_flow', action=argparse.BooleanOptionalAction, default=True,
                   help='colour-jitter flow frames too (the reference treats them as images)')
    g = parser.add_argument_group('model and run')
    g.add_argument('--net', default='s3d', help='backbone: s3d, s3dg, r50 or small3d (demo)')
    g.add_argument('--batch_size', type=POSITIVE, default=32,
                   help='clips per forward pass and process (training: the batch per process)')
    g.add_argument('--seed', type=int, default=0, help='each process seeds with seed + rank')
    add_runtime_args(g)
    g.add_argument('--output_dir', default=None, help="results (default: the checkpoint's folder; "
                   '--test random: experiments/random_<net>/); training: runs go to '
                   '<output_dir>/<run>/ (default experiments/)')
    g = parser.add_argument_group('features (retrieval, feature linear probe)')
    g.add_argument('--dirname', default='features', help='feature cache folder (relative: in the '
                   "checkpoint's folder, or in <output_dir>/random_<net>/ for --test random)")
    g.add_argument('--feature_l2norm', action=argparse.BooleanOptionalAction, default=True,
                   help="L2-normalise each clip's feature before the mean over windows")
    return parser


@contextmanager
def started(args):
    """The run's device, ``autocast()`` and main-process ``say``; closes the process group after."""
    if args.seq_len < (need := MIN_SEGMENT_FRAMES.get(args.net, 1)):
        raise UserError(f'--seq_len {args.seq_len}: --net {args.net} needs {need}+ frames')
    spec = DatasetName.parse(args.dataset)
    if spec.views != 1 or (spec.rgb and spec.flow):
        raise UserError(f'--dataset {args.dataset}: evaluation reads one modality and one clip '
                        f'per sample; use {spec.base} (RGB) or {spec.base}-f (flow)')
    try:
        yield runtime(du.init_distributed(args.device, args.local_rank), args)
    finally:
        du.cleanup()


def runtime(info, args):
    """A process's device, ``autocast()``, memory format and main-process ``say``."""
    amp_dtype = amp_dtype_of(args, info.device)
    return SimpleNamespace(
        info=info, device=info.device, is_main=info.is_main, amp_dtype=amp_dtype,
        autocast=partial(torch.autocast, info.device.type, dtype=amp_dtype or torch.float32,
                         enabled=amp_dtype is not None),
        memory_format=torch.channels_last_3d if args.channels_last else torch.contiguous_format,
        say=lambda *a: print(*a, flush=True) if info.is_main else None)


def spread_indices(n, max_videos=0):   # splits are sorted by class: spread evenly over them
    return (torch.linspace(0, n - 1, max_videos).round().long().unique().tolist()
            if 0 < max_videos < n else list(range(n)))


def holdout_split(sources, fraction, seed=0):
    """(kept, held out) positions: about ``fraction`` held out, by whole source groups."""
    groups = sorted(set(sources))
    if not 0 < fraction < 1 or len(groups) < 2:
        raise UserError(f'cannot hold out {fraction} of {len(groups)} source group(s)')
    order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed)).tolist()
    held, size = set(), 0
    for i in order:
        if size >= fraction * len(sources) or len(held) == len(groups) - 1:
            break
        held.add(groups[i])
        size += sources.count(groups[i])
    return ([i for i, s in enumerate(sources) if s not in held],
            [i for i, s in enumerate(sources) if s in held])


def split_videos(args, part):
    """The test views' videos of split ``part``, read as --protocol says: coclr: frames as stored,
    one random clip per train video (the retrieval gallery); clean: every window, resized."""
    coclr = args.protocol == 'coclr'
    data = build_dataset(args.dataset, part, **data_location(args), seq_len=args.seq_len,
                         ds=args.ds, img_dim=args.img_dim, stored_size=coclr)
    return Videos(data, spread_indices(len(data), args.max_videos),
                  test_windows='random' if coclr and part == 'train' else args.test_windows)


class Videos(Dataset):
    """The videos at ``indices`` of a single-modality dataset read in test mode (``test_options``
    of VideoDataset.read_test, else the dataset's own); items carry their ``position``."""

    def __init__(self, dataset, indices, **test_options):
        self.dataset, self.indices = dataset, list(indices)
        self.test_options = {'test_windows': dataset.test_windows,
                             'stored_size': dataset.stored_size, **test_options}
        (self.modality,) = dataset.lmdbs
        self.names = [dataset.names[i] for i in self.indices]
        self.labels = [dataset.labels[i] for i in self.indices]
        self.sources = [dataset.sources[i] for i in self.indices]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, position):
        item = self.dataset.read_test(self.indices[position], **self.test_options)
        return {**item, 'position': position}


def video_loader(videos, workers, batch_size=None, collate_fn=None):
    """In order (default: one video at a time), sharded over processes, shards padded equally."""
    sampler = DistributedSampler(videos, du.world_size(), du.get_rank(), shuffle=False)
    return DataLoader(videos, batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate_fn)


def gather_rows(positions, values, total):   # every process's rows, placed by position
    out = values.new_zeros((total, *values.shape[1:]))
    out[du.all_gather(positions)] = du.all_gather(values)
    return out


def crop_offsets(height, width, size):
    """(top, left) of the centre, top-left, top-right, bottom-left, bottom-right crops; test-mode
    frames are never smaller than the crop (stored: >= --img_dim, else resized 8/7 larger)."""
    bottom, right = height - size, width - size
    return [(bottom // 2, right // 2), (0, 0), (0, right), (bottom, 0), (bottom, right)]


def to_input(clips, memory_format=torch.contiguous_format):
    """float [N, T, 3, s, s] in [0, 1] -> network input [N, 3, T, s, s]."""
    return normalize(clips).transpose(1, 2).contiguous(memory_format=memory_format)


class TestViews:
    """Crop i (0: centre, 1-4: the corners, 5-9: the same flipped) of a video's windows as
    network input, as --protocol says (docs/METHOD.md, Evaluation)."""

    def __init__(self, args, modality):
        self.coclr, self.img_dim = args.protocol == 'coclr', args.img_dim
        self.is_flow, self.negate_flow = modality == 'flow', not args.legacy_flow_flip
        self.jitter = self.coclr and (modality == 'rgb' or args.photometric_on_flow)
        self.photometric = Photometric(jitter=0.2, hue=0.1, jitter_prob=0.3, gray_prob=0.0,
                                       blur_prob=0.0)
        self.generator = torch.Generator().manual_seed(args.seed + du.get_rank())

    def __call__(self, windows, i, params, memory_format=torch.contiguous_format):
        """uint8 windows ``[W, T, 3, H, W]`` -> float ``[W, 3, T, s, s]``."""
        h, w = windows.shape[-2:]
        size = min(224, h, w) if self.coclr else self.img_dim   # CoCLR's crops: 224 pixels
        top, left = crop_offsets(h, w, size)[i % 5]
        x = windows[..., top:top + size, left:left + size]
        if i >= 5:
            x = flip_frames(x, self.is_flow, self.negate_flow)
        if self.coclr:
            x = resize(x.flatten(0, 1), (self.img_dim,) * 2).unflatten(0, x.shape[:2])
        x = x.float().div_(255)
        if self.jitter:   # crop i's parameters, the same for each of the video's windows
            same = {k: v[i:i + 1].expand(len(x), *v.shape[1:]) for k, v in params.items()}
            x = self.photometric.apply(x, same, True)
        return to_input(x, memory_format)

    def draw(self, n_crops):   # the jitter of one video: a parameter set per crop
        return self.photometric.sample(torch.ones(n_crops, dtype=torch.bool), self.generator)


@torch.no_grad()
def video_outputs(fn, videos, views, crops, rt, args, desc='test'):
    """``fn`` (input ``[N, 3, T, s, s]`` -> ``[N, D]``) over every window and crop of every video;
    the mean over each video's windows per crop: float32 ``[len(videos), n_crops, D]``.
    Consecutive videos share batches of about --batch_size inputs (one video a call left a small
    network's batches tiny: bench/RESULTS.md, Retrieval monitor)."""
    n = NUM_CROPS[crops]
    positions, rows, pending = [], [], []   # pending: inputs [n * W, 3, T, s, s] not yet run

    def run_pending():
        x = torch.cat(pending)
        with rt.autocast():
            out = torch.cat([fn(batch).float() for batch in x.split(args.batch_size)])
        for video_out in out.split([len(p) for p in pending]):
            rows.append(video_out.view(n, len(video_out) // n, -1).mean(1))   # n x D
        pending.clear()

    for item in tqdm(video_loader(videos, args.workers), desc=desc, disable=not rt.is_main,
                     dynamic_ncols=True):
        windows = item[videos.modality].to(rt.device, non_blocking=True)   # W x T x 3 x H x W
        params = views.draw(n)
        pending.append(torch.cat([views(windows, i, params, rt.memory_format) for i in range(n)]))
        positions.append(item['position'])
        if sum(len(p) for p in pending) >= args.batch_size:
            run_pending()
    if pending:
        run_pending()
    return gather_rows(torch.tensor(positions, device=rt.device), torch.stack(rows), len(videos))


def video_accuracy(probs, labels, ks=(1, 5)):   # top-k percent of probs [V, C]
    return {f'top{k}': 100.0 * a.item() for k, a in zip(ks, topk_accuracy(probs, labels, ks))}


def checkpoint_id(test):
    return 'random' if test == 'random' else str(Path(test).resolve())


def experiment_dir(args):   # the checkpoint's folder; <output_dir>/random_<net> for random
    if args.test == 'random':
        return Path(args.output_dir or PROJECT_ROOT / 'experiments') / f'random_{args.net}'
    return Path(args.test).resolve().parent


def result_path(args, suffix):
    """``<--output_dir or experiment_dir>/<checkpoint stem>_<suffix>.json`` (the stem names the
    run folder too in a shared --output_dir); one holding another checkpoint's result: an error."""
    out = Path(args.output_dir or experiment_dir(args))
    stem = 'random' if args.test == 'random' else Path(args.test).name.split('.')[0]
    if args.output_dir and args.test != 'random':
        stem = f'{Path(args.test).resolve().parent.name}_{stem}'
    path = out / f'{stem}_{suffix}{"_clean" if args.protocol == "clean" else ""}.json'
    old = None
    with suppress(FileNotFoundError, ValueError, AttributeError):   # none, or not our JSON
        old = json.loads(path.read_text()).get('checkpoint')
    if old not in (None, checkpoint_id(args.test)):
        raise UserError(f'{path} holds the result of another checkpoint ({old}); give '
                        f'--test {args.test} another --output_dir')
    out.mkdir(parents=True, exist_ok=True)
    return path


def write_result(path, args, report):
    """``report`` with the checkpoint, git revision and arguments, as JSON at ``path``."""
    report = {'checkpoint': checkpoint_id(args.test), **report, 'git': git_revision(),
              'args': plain_args(args)}
    path.write_text(json.dumps(report, indent=1))
    return report
