"""Video features of a checkpoint (cached by checkpoint content), nearest-neighbour retrieval
and its picture. Used by ``main_classifier.py --retrieval`` and ``feature_linear_probe.py``.

Feature of a video (SPEC §4): the backbone's globally pooled output for the center crop of each
test window, averaged over the video's windows. By default each clip's feature is L2-normalised
before the average (``--feature_l2norm``): the reference computed retrieval features with its
linear-probe classifier (its default ``--train_what last``), whose features are normalised.
Retrieval: each set (train, test) centred by its own mean and L2-normalised; every test video
queries the train videos by cosine similarity; R@k = percent of queries with a video of the same
class among their k nearest train videos.
"""
import argparse
import hashlib
import json
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.io import write_png

from backbone import build_backbone
from dataset import build_dataset
from dataset.augment import resize_short_side
from model.classifier import backbone_weights
from utils.checkpoint import load_checkpoint, load_exact, save_checkpoint
from dataset.video_dataset import data_location, modality_of
from model.classifier import check_modality
from utils.misc import PROJECT_ROOT
from . import video_eval as ve

KS = (1, 5, 10, 20, 50)
CACHE_VERSION = 1   # bump when the extraction changes, so old caches are not taken for new


def add_feature_flags(parser):
    g = parser.add_argument_group('features (retrieval, feature linear probe)')
    g.add_argument('--dirname', default='features',
                   help='folder of the feature cache; a relative path is taken inside the '
                        "checkpoint's folder (as the reference), or inside "
                        '<output_dir>/random_<net>/ for --test random')
    g.add_argument('--feature_l2norm', action=argparse.BooleanOptionalAction, default=True,
                   help="L2-normalise each clip's feature before the mean over windows (the "
                        "reference's retrieval features are)")
    return parser


# ----------------------------------------------------------------------------------------------
# Retrieval (pure)

def center_normalize(x):
    """Centre a set of features ``[N, F]`` by its own mean, then L2-normalise each row."""
    return F.normalize(x - x.mean(0, keepdim=True), dim=1)


def nearest(query, gallery, k):
    """Indices ``[Q, k]`` of the ``k`` most cosine-similar gallery rows of each (normalised)
    query row, most similar first."""
    return (query @ gallery.T).topk(min(k, gallery.shape[0]), dim=1).indices


def recall_at_k(query, query_labels, gallery, gallery_labels, ks=KS):
    """Percent of queries with a gallery item of their class among the k nearest, for each k
    (features already normalised; a k beyond the gallery size counts the whole gallery)."""
    idx = nearest(query, gallery, max(ks))
    hit = gallery_labels[idx] == query_labels[:, None]                 # Q x k_max
    return {k: 100.0 * hit[:, :k].any(1).float().mean().item() for k in ks}


def retrieval_recall(test_features, test_labels, train_features, train_labels, ks=KS):
    """SPEC §4: each set centred by its own mean and normalised; the test set queries train."""
    return recall_at_k(center_normalize(test_features.float()), test_labels,
                       center_normalize(train_features.float()), train_labels, ks)


def recall_line(dataset, split, recall):
    return f'retrieval {dataset} split{split}: ' + ' '.join(
        f'R@{k}={v:.1f}' for k, v in recall.items())


# ----------------------------------------------------------------------------------------------
# The feature cache: keyed by the checkpoint's content and everything the features depend on

def file_sha256(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 22), b''):
            h.update(block)
    return h.hexdigest()


def weights_id(test, seed):
    """What the weights are: the sha256 of the checkpoint file, or the seed of a random init."""
    return f'random-seed{seed}' if test == 'random' else 'sha256:' + file_sha256(test)


def lmdb_identity(path):
    """Where an LMDB is and which version of it: real path, size and modification time of its
    data file (a rewritten LMDB under the same path is another one)."""
    path = Path(path).resolve()
    st = (path / 'data.mdb' if path.is_dir() else path).stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def cache_key(args, part, weights, videos):
    """Everything the features of one set depend on: the weights, the settings, and the frames
    of ``videos`` (a :class:`video_eval.Videos`: which videos in which order, from which LMDBs)."""
    return {'version': CACHE_VERSION, 'weights': weights, 'net': args.net, 'dataset': args.dataset,
            'split': args.which_split, 'part': part, 'seq_len': args.seq_len, 'ds': args.ds,
            'img_dim': args.img_dim, 'feature_l2norm': args.feature_l2norm,
            'videos': hashlib.sha256('\n'.join(videos.names).encode()).hexdigest(),
            'lmdbs': {m: lmdb_identity(db.path) for m, db in sorted(videos.dataset.lmdbs.items())}}


def cache_file(folder, key):
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(folder) / f'{key["dataset"]}_split{key["split"]}_{key["part"]}_{digest}.pth'


def experiment_dir(args):
    """The folder a checkpoint's evaluation belongs to: the checkpoint's own, or for
    ``--test random`` <output_dir (default experiments/)>/random_<net>."""
    if args.test == 'random':
        root = Path(args.output_dir) if args.output_dir else PROJECT_ROOT / 'experiments'
        return root / f'random_{args.net}'
    return Path(args.test).resolve().parent


def cache_dir(args):
    return experiment_dir(args) / args.dirname       # an absolute --dirname stays as it is


def read_cache(path, key):
    """Cached features for ``key``, or None (no file, or a file made for another key)."""
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location='cpu', weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):
        return None   # unreadable (e.g. a run killed while writing it): computed again
    return data if isinstance(data, dict) and data.get('key') == key else None


# ----------------------------------------------------------------------------------------------
# Extraction

def load_backbone(args, flag='--test'):
    """The backbone of ``args.test`` (a pretraining or classifier checkpoint), or a random one
    (seeded) for ``--test random``. Returns (backbone, description)."""
    torch.manual_seed(args.seed)
    backbone = build_backbone(args.net)
    if args.test == 'random':
        return backbone, f'random initialisation (seed {args.seed})'
    ckpt = load_checkpoint(args.test, flag)
    source = f'{flag} {args.test}'
    check_modality(ckpt, modality_of(args.dataset), source)
    load_exact(backbone, backbone_weights(ckpt['state_dict'], source), source)
    return backbone, f'{args.test} (epoch {ckpt.get("epoch")})'


def feature_fn(backbone, l2norm):
    def fn(x):                                                     # N x 3 x T x s x s
        f = F.adaptive_avg_pool3d(backbone(x), 1).flatten(1)       # N x F
        return F.normalize(f, dim=1) if l2norm else f
    return fn


def split_videos(args, part):
    """The videos of ``part`` ('train' or 'test') of ``--which_split``, each item holding every
    test window (limited by ``--max_videos``), as :class:`video_eval.Videos`."""
    ds = build_dataset(args.dataset, part, **data_location(args), seq_len=args.seq_len,
                       ds=args.ds, img_dim=args.img_dim)
    if part == 'train':
        ds = ve.with_test_windows(ds, f'dataset {args.dataset!r} (train split)')
    return ve.Videos(ds, ve.spread_indices(len(ds), args.max_videos))


def extract_features(args, part, videos, backbone, weights, rt, folder):
    """Features of every video of ``videos`` (from the cache when it holds this exact key):
    ``{'features': [N, F], 'labels', 'sources', 'names', 'classes', 'key'}``."""
    key = cache_key(args, part, weights, videos)
    path = cache_file(folder, key)
    cached = read_cache(path, key)
    if cached is not None:
        rt.say(f'=> {part} features: cached {path}')
        return cached
    rt.say(f'=> {part} features: computing {len(videos)} videos into {path}')
    backbone.to(rt.device, memory_format=rt.memory_format).eval()
    modality = ve.modality_of(videos)
    out = ve.video_outputs(feature_fn(backbone, args.feature_l2norm), videos, modality=modality,
                           img_dim=args.img_dim, crops='center', device=rt.device,
                           batch_size=args.batch_size, workers=args.workers,
                           amp_dtype=rt.amp_dtype, memory_format=rt.memory_format,
                           desc=f'{part} features', show_progress=rt.is_main)
    data = {'key': key, 'features': out[:, 0].cpu(), 'names': videos.names,
            'labels': torch.tensor(videos.labels), 'sources': torch.tensor(videos.sources),
            'classes': list(videos.dataset.classes)}
    if rt.is_main:
        save_checkpoint(data, path)
    return data


# ----------------------------------------------------------------------------------------------
# Picture of queries and their nearest neighbours (no matplotlib)

GREEN, RED, WHITE, GREY = (0, 200, 0), (220, 0, 0), (255, 255, 255), (40, 40, 40)


def neighbour_grid(queries, neighbours, correct, border=3, gap=4):
    """One row per query: the query (white border), then its neighbours, each with a green
    (same class) or red border. ``queries`` uint8 ``[Q, 3, s, s]``, ``neighbours`` ``[Q, k, 3, s,
    s]``, ``correct`` bool ``[Q, k]`` -> uint8 image ``[3, H, W]``."""
    q, k, _, s, _ = neighbours.shape
    tile = s + 2 * border
    height = q * tile + (q + 1) * gap
    width = (k + 1) * tile + (k + 3) * gap            # a double gap after the query
    img = torch.tensor(GREY, dtype=torch.uint8).view(3, 1, 1).repeat(1, height, width)

    def put(image, colour, row, col):
        top = gap + row * (tile + gap)
        left = gap + col * (tile + gap) + (gap if col > 0 else 0)
        img[:, top:top + tile, left:left + tile] = torch.tensor(colour).view(3, 1, 1)
        img[:, top + border:top + border + s, left + border:left + border + s] = image

    for i in range(q):
        put(queries[i], WHITE, i, 0)
        for j in range(k):
            put(neighbours[i, j], GREEN if correct[i, j] else RED, i, j + 1)
    return img


def middle_frame(videos, position, size):
    """A video's middle frame, resized as a test window and center-cropped: uint8 [3, s, s]."""
    ds = videos.dataset
    name = videos.names[position]
    db = ds.lmdbs[ve.modality_of(videos)]
    frame = db.read(name, [db.num_frames(name) // 2])                    # 1 x 3 x H x W
    frame = resize_short_side(frame, ds.test_size)
    return ve.take_crops(frame, size, 'center')[0, 0]


def save_neighbour_picture(path, test_videos, train_videos, test, train, num_queries, size, k=5):
    """PNG of ``num_queries`` test videos (spread over the test set) and their k nearest train
    videos."""
    queries = ve.spread_indices(len(test_videos), num_queries)
    idx = nearest(center_normalize(test['features'].float()),
                  center_normalize(train['features'].float()), k)[queries]
    correct = train['labels'][idx] == test['labels'][queries][:, None]
    grid = neighbour_grid(
        torch.stack([middle_frame(test_videos, q, size) for q in queries]),
        torch.stack([torch.stack([middle_frame(train_videos, int(j), size) for j in row])
                     for row in idx]), correct)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(grid, str(path))
    return path
