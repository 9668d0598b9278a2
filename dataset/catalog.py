"""Dataset names ``<name>[-f][-2stream][-2clip]`` (flow only, RGB and flow, two views per video),
their folders (docs/METHOD.md, Data) and splits, made a ``VideoDataset`` by ``build_dataset``."""
import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from utils.config import NON_NEGATIVE, POSITIVE
from utils.misc import PROJECT_ROOT, UserError
from . import splits
from .lmdb_video import VideoLMDB
from .video_dataset import VideoDataset


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
