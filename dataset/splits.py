"""Split CSVs, ClassInd.txt and video_source.json (docs/METHOD.md, Data): reading and deriving.

The derivations return ``{'classes': [...], 'splits': {'train_split01': [names], ...}}``, with
``'video_source': {...}`` where there is one, which write_split_files writes into a folder.
"""
import csv
import json
import re
from pathlib import Path

from utils.misc import UserError

_CLIP_SUFFIX = re.compile(r'_c\d+$')
_INDEXED = re.compile(r'^\d+\s*[,\s]\s*(\S.*)$')
_GROUP_CLIP = re.compile(r'_g(\d+)_c(\d+)$')
_HMDB_SPLIT_FILE = re.compile(r'^(.+)_test_split(\d+)\.txt$')


def source_key(name):
    """Key of a video in video_source.json: the video's own name without a ``_cNN`` suffix."""
    return _CLIP_SUFFIX.sub('', name.split('/')[-1])


def read_split(path):
    """Video names (``class/video``) of a split CSV, in file order; rows of 0 frames skipped."""
    line_of = {}
    with open(path, newline='') as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            if not row or not row[0].strip() or (len(row) > 1 and row[1].strip() == '0'):
                continue
            parts = [p for p in row[0].strip().replace('\\', '/').split('/') if p]
            if len(parts) < 2:
                raise UserError(f'{path}:{lineno}: {row[0]!r} does not end in class/video')
            name = '/'.join(parts[-2:])
            if name in line_of:
                raise UserError(f'{path}:{lineno}: video {name!r} is listed twice (also on line '
                                f'{line_of[name]}); remove one of the rows')
            line_of[name] = lineno
    return list(line_of)


def read_class_index(path):
    """``{class name: index}`` from 0 in file order; lines are ``index name``/``index,name`` if
    every one starts with a number and a blank or comma, else whole names."""
    lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if lines and all(_INDEXED.match(line) for line in lines):
        lines = [_INDEXED.match(line).group(1).strip() for line in lines]
    classes = {}
    for name in lines:
        if name in classes:
            raise UserError(f'{path}: class {name!r} listed twice')
        classes[name] = len(classes)
    return classes


def read_video_source(path):
    """``{source_key(video): id}``; keys given as ``class/video`` are reduced the same way."""
    try:
        given = json.loads(Path(path).read_text())
    except ValueError as e:
        raise UserError(f'{path} is not valid JSON ({e})') from None
    if not isinstance(given, dict):
        raise UserError(f'{path}: expected a JSON object {{video: source id}}')
    source = {}
    for key, value in given.items():
        if source.setdefault(source_key(key), value) != value:
            raise UserError(f'{path}: two entries for video {source_key(key)!r} give different '
                            f'source ids; keep one')
    return source


def write_split(path, names, num_frames, slash=True):
    """A split CSV of ``class/video/,num_frames`` rows as CoCLR's UCF101 and HMDB51 readers take
    them (a trailing slash: they take the path's last two components before it); ``slash=False``:
    ``class/video,num_frames``, its Kinetics reader's form. ``num_frames``: name -> count."""
    end = '/' if slash else ''
    with open(path, 'w', newline='') as f:
        csv.writer(f).writerows([n + end, num_frames[n]] for n in names)


def write_class_index(path, classes):   # one name a line, CoCLR's form
    Path(path).write_text(''.join(f'{c}\n' for c in classes))


def group_number(name):
    """Sibling group of a UCF101-style name: ``'A/v_A_g08_c01'`` -> 8."""
    m = _GROUP_CLIP.search(name.split('/')[-1])
    if m is None:
        raise UserError(f'video {name!r} is not named like UCF101 (..._gNN_cNN)')
    return int(m.group(1))


def group_block(k, groups_per_split=7):  # the groups of test split k
    return range(groups_per_split * (k - 1) + 1, groups_per_split * k + 1)


def groups_text(groups):
    """``{1, 2, 3, 8}`` -> ``'g01-g03, g08'`` (for messages)."""
    runs = []
    for g in sorted(set(groups)):
        if runs and g == runs[-1][1] + 1:
            runs[-1][1] = g
        else:
            runs.append([g, g])
    return ', '.join(f'g{a:02d}' if a == b else f'g{a:02d}-g{b:02d}' for a, b in runs)


def ucf101_splits(names, groups_per_split=7, num_splits=3):
    """UCF101's splits from the names alone: test split k holds the groups ``group_block(k)``,
    train split k the rest; video_source numbers the (class, group) pairs from 0."""
    groups = {n: group_number(n) for n in names}
    splits = {}
    for k in range(1, num_splits + 1):
        block = group_block(k, groups_per_split)
        splits[f'train_split{k:02d}'] = [n for n in names if groups[n] not in block]
        splits[f'test_split{k:02d}'] = [n for n in names if groups[n] in block]
    sources = sorted({(n.split('/')[0], groups[n], source_key(n)) for n in names})
    return {'classes': sorted({n.split('/')[0] for n in names}), 'splits': splits,
            'video_source': {key: i for i, (_, _, key) in enumerate(sources)}}


def hmdb51_splits(names, official_dir):
    """HMDB51's splits from its official ``<class>_test_split<k>.txt`` files (lines ``video.avi
    label``; 1 train, 2 test, 0 unused); listed videos not in ``names`` are ``'missing'``."""
    files = sorted(p for p in Path(official_dir).glob('*_test_split*.txt')
                   if _HMDB_SPLIT_FILE.match(p.name))
    if not files:  # a missing folder included
        raise UserError(f'--official {official_dir} holds no <class>_test_split<k>.txt files')
    have, splits, missing, classes = set(names), {}, [], set()
    for path in files:
        cls, k = _HMDB_SPLIT_FILE.match(path.name).groups()
        classes.add(cls)
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            parts = line.split()
            if parts and (len(parts) != 2 or parts[1] not in ('0', '1', '2')):
                raise UserError(f'{path}:{lineno}: expected "video.avi 0|1|2", got {line!r}')
            if not parts or parts[1] == '0':
                continue
            name = f'{cls}/{Path(parts[0]).stem}'
            if name not in have:
                missing.append(name)
                continue
            # Both parts of split k are named, even one whose videos are all missing.
            train, test = (splits.setdefault(f'{part}_split{int(k):02d}', [])
                           for part in ('train', 'test'))
            (test if parts[1] == '2' else train).append(name)
    return {'classes': sorted(classes), 'splits': dict(sorted(splits.items())),
            'missing': sorted(set(missing))}


def write_split_files(out_dir, derived, num_frames, overwrite=False):
    """Write ClassInd.txt, the split CSVs and video_source.json of ``derived`` into ``out_dir``,
    each under a temporary name first, renamed when all are written. Returns the paths."""
    out_dir, source = Path(out_dir), derived.get('video_source')
    files = ['ClassInd.txt'] + [f'{s}.csv' for s in derived['splits']]
    files += ['video_source.json'] if source is not None else []
    existing = [out_dir / f for f in files if (out_dir / f).exists()]
    if existing and not overwrite:
        raise UserError(f'{existing[0]} exists; pass --overwrite to replace it')
    out_dir.mkdir(parents=True, exist_ok=True)
    write_class_index(out_dir / 'ClassInd.txt.tmp', derived['classes'])
    for split, names in derived['splits'].items():   # numbered: UCF101's form; else Kinetics'
        write_split(out_dir / f'{split}.csv.tmp', names, num_frames, slash=split[-1].isdigit())
    if source is not None:
        (out_dir / 'video_source.json.tmp').write_text(json.dumps(source, indent=0) + '\n')
    for f in files:
        (out_dir / f'{f}.tmp').replace(out_dir / f)
    return [str(out_dir / f) for f in files]
