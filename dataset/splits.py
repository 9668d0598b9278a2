"""Split CSVs, ClassInd.txt and video_source.json (SPEC §3): reading, and deriving them.

Split CSV: no header, ``path,num_frames``; only the last two path components (``class/video``)
matter. ClassInd.txt: one class per line, ``name`` or ``index name``; classes are numbered from 0
in file order. video_source.json: ``{"<video name without clip suffix>": group_id}``.
"""
import csv
import json
import re
from pathlib import Path

_CLIP_SUFFIX = re.compile(r'_c\d+$')


def video_name(path):
    """``'/x/y/ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01/'`` -> ``'ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01'``."""
    parts = [p for p in str(path).replace('\\', '/').split('/') if p]
    if len(parts) < 2:
        raise ValueError(f'{path!r} does not end in class/video')
    return '/'.join(parts[-2:])


def source_key(name):
    """Key of a video in video_source.json: the video's own name without its ``_cNN`` suffix."""
    return _CLIP_SUFFIX.sub('', name.split('/')[-1])


def read_split(path):
    """Video names (``class/video``) of a split CSV, in file order.

    A row whose frame count is 0 is skipped: such a video can make no clip, and the
    reference's HMDB51 CSVs list a few that are not in the LMDBs. A video listed twice is an
    error: it would count twice in training and in the test accuracy."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'split file not found: {path}')
    line_of = {}  # name -> line it is first listed on
    with open(path, newline='') as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            if not row or not row[0].strip():
                continue
            if len(row) > 1 and row[1].strip() == '0':
                continue
            try:
                name = video_name(row[0].strip())
            except ValueError as e:
                raise ValueError(f'{path}:{lineno}: {e}') from None
            if name in line_of:
                raise ValueError(f'{path}:{lineno}: video {name!r} is listed twice (also on '
                                 f'line {line_of[name]}); remove one of the rows')
            line_of[name] = lineno
    return list(line_of)


def read_class_index(path):
    """``{class name: index}`` with indices from 0 in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'class list not found: {path}')
    classes = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if not parts:
            continue
        name = parts[-1]
        if name in classes:
            raise ValueError(f'{path}: class {name!r} listed twice')
        classes[name] = len(classes)
    return classes


def read_video_source(path):
    path = Path(path)
    with open(path) as f:
        source = json.load(f)
    if not isinstance(source, dict):
        raise ValueError(f'{path}: expected a JSON object {{video: group}}')
    return source


def write_split(path, names, num_frames):
    """Write a split CSV (``class/video,num_frames`` rows); ``num_frames`` maps name -> count."""
    with open(path, 'w', newline='') as f:
        w = csv.writer(f)
        for n in names:
            w.writerow([n, num_frames[n]])


def write_class_index(path, classes):
    Path(path).write_text(''.join(f'{i + 1} {c}\n' for i, c in enumerate(classes)))


# ------------------------------------------------------------------ deriving split files
# Each derivation returns ``{'classes': [...], 'splits': {'train_split01': [names], ...},
# 'video_source': {...} or None}``; :func:`write_split_files` writes that into a folder.

_GROUP_CLIP = re.compile(r'_g(\d+)_c(\d+)$')


def group_number(name):
    """Sibling group of a UCF101-style name: ``'A/v_A_g08_c01'`` -> 8."""
    m = _GROUP_CLIP.search(name.split('/')[-1])
    if m is None:
        raise ValueError(f'video {name!r} is not named like UCF101 (..._gNN_cNN)')
    return int(m.group(1))


def group_block(k, groups_per_split=7):
    """Groups of test split k: ``groups_per_split*(k-1)+1 .. groups_per_split*k``."""
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


def group_splits(names, groups_per_split=7, num_splits=3):
    """Splits by blocks of groups: test split k holds groups ``groups_per_split*(k-1)+1 ..
    groups_per_split*k``, its train split every other video. Classes are sorted by name;
    video_source numbers the groups (class, group) from 0. Names keep their given order."""
    groups = {n: group_number(n) for n in names}
    splits = {}
    for k in range(1, num_splits + 1):
        block = group_block(k, groups_per_split)
        splits[f'train_split{k:02d}'] = [n for n in names if groups[n] not in block]
        splits[f'test_split{k:02d}'] = [n for n in names if groups[n] in block]
    sources = sorted({(n.split('/')[0], groups[n], source_key(n)) for n in names})
    return {'classes': sorted({n.split('/')[0] for n in names}), 'splits': splits,
            'video_source': {key: i for i, (_, _, key) in enumerate(sources)}}


def ucf101_splits(names):
    """UCF101's three official splits, class list and video groups, from the names alone
    (SPEC §3): test split k holds groups 7(k-1)+1 .. 7k."""
    return group_splits(names, groups_per_split=7, num_splits=3)


_HMDB_SPLIT_FILE = re.compile(r'^(.+)_test_split(\d+)\.txt$')


def hmdb51_splits(names, official_dir):
    """HMDB51's splits from its official files ``<class>_test_split<k>.txt`` (lines
    ``video.avi label``; 1 train, 2 test, 0 unused). ``names`` are the videos at hand
    (``class/video``); listed videos not among them come back in ``'missing'``."""
    official_dir = Path(official_dir)
    files = sorted(p for p in official_dir.iterdir() if _HMDB_SPLIT_FILE.match(p.name))
    if not files:
        raise ValueError(f'{official_dir} holds no <class>_test_split<k>.txt files')
    have = set(names)
    splits, missing, classes = {}, [], set()
    for path in files:
        cls, k = _HMDB_SPLIT_FILE.match(path.name).groups()
        classes.add(cls)
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or parts[1] not in ('0', '1', '2'):
                raise ValueError(f'{path}:{lineno}: expected "video.avi 0|1|2", got {line!r}')
            name = f'{cls}/{Path(parts[0]).stem}'
            if parts[1] == '0':
                continue
            if name not in have:
                missing.append(name)
                continue
            which = 'train' if parts[1] == '1' else 'test'
            splits.setdefault(f'{which}_split{int(k):02d}', []).append(name)
    return {'classes': sorted(classes), 'splits': dict(sorted(splits.items())),
            'video_source': None, 'missing': sorted(set(missing))}


def kinetics_splits(train_names, val_names):
    """Kinetics: ``train_split.csv`` and ``val_split.csv`` from the two LMDBs' videos; the
    classes are the class folders of both, sorted."""
    classes = sorted({n.split('/')[0] for n in list(train_names) + list(val_names)})
    return {'classes': classes, 'splits': {'train_split': list(train_names),
                                          'val_split': list(val_names)}, 'video_source': None}


def split_file_names(derived):
    """Files :func:`write_split_files` writes for ``derived``."""
    files = ['ClassInd.txt'] + [f'{s}.csv' for s in derived['splits']]
    return files + (['video_source.json'] if derived.get('video_source') is not None else [])


def write_split_files(out_dir, derived, num_frames, overwrite=False):
    """Write ClassInd.txt, the split CSVs and video_source.json of ``derived`` into
    ``out_dir``. Every file is written under a temporary name first and renamed only when
    all are written, so a failure leaves no half-written file. Returns the paths."""
    bad = [c for c in derived['classes'] if not c or any(ch.isspace() for ch in c)]
    if bad:  # ClassInd.txt lines are "index name": a name with blanks would be misread
        raise ValueError(f'class name {bad[0]!r} contains whitespace; rename its folder')
    out_dir = Path(out_dir)
    targets = [out_dir / f for f in split_file_names(derived)]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f'{existing[0]} exists; pass overwrite to replace it')
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = {p: p.with_name(p.name + '.tmp') for p in targets}
    try:
        write_class_index(tmp[out_dir / 'ClassInd.txt'], derived['classes'])
        for split, names in derived['splits'].items():
            write_split(tmp[out_dir / f'{split}.csv'], names, num_frames)
        if derived.get('video_source') is not None:
            tmp[out_dir / 'video_source.json'].write_text(
                json.dumps(derived['video_source'], indent=0) + '\n')
    except BaseException:
        for t in tmp.values():
            t.unlink(missing_ok=True)
        raise
    for final, t in tmp.items():
        t.replace(final)
    return [str(p) for p in targets]
