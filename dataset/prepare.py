"""Prepare datasets in the layout of SPEC §3: video LMDBs, TV-L1 flow, split files, the demo.

    python -m dataset.prepare videos --src UCF101/ --out data/ucf101/ucf101_frame.lmdb
    python -m dataset.prepare flow --src data/ucf101/ucf101_frame.lmdb \\
        --out data/ucf101/ucf101_tvl1_frame.lmdb
    python -m dataset.prepare splits ucf101 --lmdb data/ucf101/ucf101_frame.lmdb --out data/ucf101
    python -m dataset.prepare demo --data_root data

Every output appears complete or not at all (written under a temporary name, then renamed);
an existing output is replaced only with ``--overwrite``. Videos that cannot be read are
reported and skipped. ``videos`` and ``flow`` need PyAV and OpenCV (requirements-prepare.txt),
imported only there.
"""
import argparse
import functools
import io
import multiprocessing
import os
import re
import sys
import time

import torch
from PIL import Image
from tqdm import tqdm

from dataset import splits as split_files
from dataset.lmdb_video import (LMDBWriter, VideoLMDB, decode_frames, encode_frames,
                                quantize_flow)
from utils.config import NON_NEGATIVE, POSITIVE, Ranged
from utils.misc import UserError

VIDEO_EXTS = ('.avi', '.mp4', '.mkv', '.webm', '.mov')
FRAME_EXTS = ('.jpg', '.jpeg')


# ------------------------------------------------------------------------ finding the input

def natural_key(text):
    """Sort key that puts ``img_9`` before ``img_10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', text)]


def _is_lmdb(path):
    return os.path.isfile(path) or os.path.isfile(os.path.join(path, 'data.mdb'))


def list_class_entries(src, flag, kind):
    """``[(class/video, path)]`` of ``src/<class>/<video>`` in natural order; ``kind`` is
    ``'frames'`` (a folder of JPEGs per video) or ``'videos'`` (one video file each)."""
    if not os.path.isdir(src):
        raise UserError(f'{flag} {src}: no such directory')
    found = {}
    for cls in sorted(os.listdir(src), key=natural_key):
        cls_dir = os.path.join(src, cls)
        if cls.startswith('.') or not os.path.isdir(cls_dir):
            continue
        for entry in sorted(os.listdir(cls_dir), key=natural_key):
            path = os.path.join(cls_dir, entry)
            stem, ext = os.path.splitext(entry)
            if kind == 'frames' and os.path.isdir(path) and not entry.startswith('.'):
                name = f'{cls}/{entry}'
            elif kind == 'videos' and os.path.isfile(path) and ext.lower() in VIDEO_EXTS:
                name = f'{cls}/{stem}'
            else:
                continue
            if name in found:
                raise UserError(f'{path} and {found[name]} would both be video {name!r}')
            found[name] = path
    if not found:
        layout = 'class/video/*.jpg frame folders' if kind == 'frames' else \
            f'class/video files ({", ".join(VIDEO_EXTS)})'
        raise UserError(f'{flag} {src} holds no {layout}')
    return list(found.items())


def _check_output(path, overwrite, flag='--out'):
    if os.path.exists(path) and not overwrite:
        raise UserError(f'{flag} {path} exists; pass --overwrite to replace it')


def _open_lmdb_names(path, flag):
    try:
        db = VideoLMDB(path)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f'{flag}: {e}') from None
    return db.names, {n: db.num_frames(n) for n in db.names}


# --------------------------------------------------------------------------- parallel work

def _init_worker():
    # One thread per process: the parallelism is across videos.
    torch.set_num_threads(1)
    try:
        import cv2
        cv2.setNumThreads(1)
    except ImportError:
        pass


def _guarded(fn, kwargs, task):
    """``(fn(task, **kwargs), None)``, or ``(None, reason)`` if this input is unusable, so one
    broken video is reported by name instead of ending a long run."""
    try:
        return fn(task, **kwargs), None
    except Exception as e:  # noqa: BLE001 -- every failure is reported and listed at the end
        message = str(e).strip()
        return None, f'{type(e).__name__}: {message.splitlines()[0] if message else ""}'


def ordered_map(fn, tasks, workers, desc, **kwargs):
    """Yield ``_guarded(fn)`` results of ``tasks`` in task order (so outputs are deterministic),
    computed by ``workers`` spawned processes (in this process when ``workers <= 1``)."""
    job = functools.partial(_guarded, fn, kwargs)
    with tqdm(total=len(tasks), desc=desc, unit='video', disable=None) as bar:
        if workers <= 1:
            for r in map(job, tasks):
                bar.update()
                yield r
            return
        # spawn, not fork: a forked copy of a process that already ran torch/OpenMP can hang.
        ctx = multiprocessing.get_context('spawn')
        with ctx.Pool(min(workers, len(tasks)), initializer=_init_worker) as pool:
            for r in pool.imap(job, tasks):
                bar.update()
                yield r


def write_lmdb(out, overwrite, names, results):
    """Store the converted videos of ``results`` (aligned with ``names``) in the LMDB ``out``.
    Returns ``(written, skipped)``; ``skipped`` lists ``(name, reason)``. If nothing could be
    converted, nothing is written and a :class:`UserError` says so."""
    skipped, frames = [], 0
    start = time.perf_counter()
    with LMDBWriter(out, overwrite=overwrite) as writer:
        for name, (jpegs, error) in zip(names, results):
            if error is not None:
                skipped.append((name, error))
                tqdm.write(f'skipped {name}: {error}', file=sys.stderr)
                continue
            writer.put(name, jpegs)
            frames += len(jpegs)
        written = len(writer.names)
        if not written:  # raising here makes the writer discard its temporary file
            raise UserError(f'none of the {len(skipped)} videos could be converted '
                            f'(first: {skipped[0][0]}: {skipped[0][1]}); {out} not written')
    print(f'wrote {written} videos ({frames} frames) to {out} in '
          f'{time.perf_counter() - start:.1f} s')
    if skipped:
        print(f'skipped {len(skipped)} unreadable video(s):')
        for name, error in skipped:
            print(f'  {name}: {error}')
    return written, skipped


# ---------------------------------------------------------------------------- per video

def read_frame_folder(folder):
    """The JPEG files of one video folder, as stored bytes, in natural order."""
    files = sorted((f for f in os.listdir(folder) if f.lower().endswith(FRAME_EXTS)),
                   key=natural_key)
    if not files:
        raise ValueError(f'{folder} holds no {"/".join(FRAME_EXTS)} frames')
    jpegs, size = [], None
    for f in files:
        with open(os.path.join(folder, f), 'rb') as fh:
            data = fh.read()
        try:
            im = Image.open(io.BytesIO(data))  # reads the header only
        except (OSError, SyntaxError) as e:  # PIL's messages name the buffer, not the file
            raise ValueError(f'{f} is not a readable image ({type(e).__name__})') from None
        with im:
            if im.format != 'JPEG':
                raise ValueError(f'{f} is {im.format}, not JPEG')
            if size is not None and im.size != size:
                raise ValueError(f'{f} is {im.size[0]}x{im.size[1]}, earlier frames '
                                 f'{size[0]}x{size[1]}')
            size = im.size
        jpegs.append(data)
    return jpegs


def resize_short_side(img, short_side):
    """Resize an ``H x W x C`` uint8 array so its shorter side is ``short_side`` (0: as is)."""
    h, w = img.shape[:2]
    if not short_side or min(h, w) == short_side:
        return img
    import cv2
    if h <= w:
        size = (max(1, round(w * short_side / h)), short_side)
    else:
        size = (short_side, max(1, round(h * short_side / w)))
    shrink = short_side < min(h, w)
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def decode_video(path, short_side=0, quality=90):
    """Every frame of a video file, decoded with PyAV, as JPEG bytes."""
    import av
    jpegs = []
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError('no video stream')
        stream = container.streams.video[0]
        stream.thread_type = 'AUTO'
        for frame in container.decode(stream):
            rgb = resize_short_side(frame.to_ndarray(format='rgb24'), short_side)
            jpegs += encode_frames(torch.from_numpy(rgb).permute(2, 0, 1)[None], quality)
    if not jpegs:
        raise ValueError('no frame could be decoded')
    return jpegs


@functools.lru_cache(maxsize=2)
def _lmdb(path):
    # Once per worker process, not once per video: opening reads all the metadata.
    return VideoLMDB(path)


def load_rgb(source):
    """uint8 ``[N, 3, H, W]`` frames of ``('lmdb', path, name)`` or ``('dir', folder, name)``."""
    kind, where, name = source
    if kind == 'lmdb':
        db = _lmdb(where)
        return db.read(name, range(db.num_frames(name)))
    return decode_frames(read_frame_folder(where), name=name, source=where)


def tvl1_flow(source, short_side=0, quality=95):
    """TV-L1 flow of consecutive grayscale frames of one video, as SPEC §3 JPEG bytes."""
    import cv2
    frames = load_rgb(source)
    if len(frames) < 2:
        raise ValueError(f'{len(frames)} frame(s); flow needs at least 2')
    tvl1 = cv2.optflow.DualTVL1OpticalFlow_create()
    gray = [cv2.cvtColor(resize_short_side(f.permute(1, 2, 0).numpy(), short_side),
                         cv2.COLOR_RGB2GRAY) for f in frames]
    jpegs = []
    for prev, nxt in zip(gray, gray[1:]):
        flow = tvl1.calc(prev, nxt, None).transpose(2, 0, 1)  # 2 x H x W
        jpegs += encode_frames(torch.from_numpy(quantize_flow(flow))[None], quality)
    return jpegs


# ------------------------------------------------------------------------------ commands

def run_frames(args):
    _check_output(args.out, args.overwrite)
    entries = list_class_entries(args.src, '--src', 'frames')
    names, folders = zip(*entries)
    results = ordered_map(read_frame_folder, folders, args.workers, 'frames')
    write_lmdb(args.out, args.overwrite, names, results)


def run_videos(args):
    _check_output(args.out, args.overwrite)
    entries = list_class_entries(args.src, '--src', 'videos')
    names, paths = zip(*entries)
    results = ordered_map(decode_video, paths, args.workers, 'videos',
                          short_side=args.short_side, quality=args.quality)
    write_lmdb(args.out, args.overwrite, names, results)


def run_flow(args):
    _check_output(args.out, args.overwrite)
    if os.path.exists(args.src) and os.path.realpath(args.src) == os.path.realpath(args.out):
        raise UserError('--src and --out are the same path')
    if os.path.exists(args.src) and _is_lmdb(args.src):
        names, _ = _open_lmdb_names(args.src, '--src')
        sources = [('lmdb', os.path.abspath(args.src), n) for n in names]
    else:
        entries = list_class_entries(args.src, '--src', 'frames')
        names = [n for n, _ in entries]
        sources = [('dir', path, n) for n, path in entries]
    results = ordered_map(tvl1_flow, sources, args.workers, 'tv-l1 flow',
                          short_side=args.short_side, quality=args.quality)
    write_lmdb(args.out, args.overwrite, names, results)


def _check_no_empty_split(derived, reason, prefix=''):
    """A split of no video would train or test on nothing (an accuracy of 0/0 later on): refuse
    to write any file and say which split is empty and why (``reason(split)``)."""
    empty = [s for s, names in derived['splits'].items() if not names]
    if empty:
        raise UserError(prefix + '; '.join(f'{s} would list no videos ({reason(s)})'
                                           for s in empty) + '; no split file written')


def _write_splits(args, derived, num_frames):
    try:
        paths = split_files.write_split_files(args.out, derived, num_frames, args.overwrite)
    except (FileExistsError, ValueError) as e:
        raise UserError(str(e).replace('pass overwrite', 'pass --overwrite')) from None
    print(f'{len(derived["classes"])} classes; wrote to {args.out}:')
    for path in paths:
        split = os.path.basename(path)[:-len('.csv')]
        count = f' ({len(derived["splits"][split])} videos)' if split in derived['splits'] else ''
        print(f'  {os.path.basename(path)}{count}')


def run_splits_ucf101(args):
    names, num_frames = _open_lmdb_names(args.lmdb, '--lmdb')
    try:
        derived = split_files.ucf101_splits(names)
    except ValueError as e:
        raise UserError(f'--lmdb {args.lmdb}: {e}') from None
    if not names:
        raise UserError(f'--lmdb {args.lmdb} holds no videos; no split file written')

    def reason(split):
        block = split_files.groups_text(split_files.group_block(int(split[-2:])))
        if split.startswith('test'):
            return f'no video of groups {block}'
        return f'every video is of groups {block}, its test split'
    present = split_files.groups_text({split_files.group_number(n) for n in names})
    _check_no_empty_split(derived, reason, f'--lmdb {args.lmdb} (videos of groups {present}): ')
    _write_splits(args, derived, num_frames)


def run_splits_hmdb51(args):
    if not os.path.isdir(args.official):
        raise UserError(f'--official {args.official}: no such directory')
    names, num_frames = _open_lmdb_names(args.lmdb, '--lmdb')
    try:
        derived = split_files.hmdb51_splits(names, args.official)
    except ValueError as e:
        raise UserError(f'--official: {e}') from None
    if not any(derived['splits'].values()):
        raise UserError(f'none of the videos listed in --official {args.official} is in '
                        f'--lmdb {args.lmdb}')
    if derived['missing']:
        shown = ', '.join(derived['missing'][:5])
        print(f'warning: {len(derived["missing"])} listed videos are not in {args.lmdb} '
              f'(left out): {shown}{" ..." if len(derived["missing"]) > 5 else ""}',
              file=sys.stderr)
    # A split none of whose train (or test) videos are at hand is absent from the derivation.
    for k in {split[-2:] for split in derived['splits']}:
        for part in ('train', 'test'):
            derived['splits'].setdefault(f'{part}_split{k}', [])
    derived['splits'] = dict(sorted(derived['splits'].items()))

    def reason(split):
        label = '1 (train)' if split.startswith('train') else '2 (test)'
        return (f'none of the videos the --official files mark {label} for split '
                f'{int(split[-2:])} is in --lmdb {args.lmdb}')
    _check_no_empty_split(derived, reason)
    _write_splits(args, derived, num_frames)


def run_splits_kinetics(args):
    train, train_frames = _open_lmdb_names(args.train_lmdb, '--train_lmdb')
    val, val_frames = _open_lmdb_names(args.val_lmdb, '--val_lmdb')
    derived = split_files.kinetics_splits(train, val)
    _check_no_empty_split(derived, lambda split: (
        f'--train_lmdb {args.train_lmdb} holds no videos' if split == 'train_split'
        else f'--val_lmdb {args.val_lmdb} holds no videos'))
    _write_splits(args, derived, {**train_frames, **val_frames})


def run_demo(args):
    from dataset import demo  # demo imports this module (flow format)
    from dataset.video_dataset import default_data_root
    data_root = args.data_root if args.data_root is not None else default_data_root()
    start = time.perf_counter()
    try:
        folder = demo.make_demo(data_root, seed=args.seed, overwrite=args.overwrite)
    except FileExistsError as e:
        raise UserError(str(e).replace('pass overwrite', 'pass --overwrite')) from None
    print(f'wrote {folder}: {len(demo.CLASSES) * demo.GROUPS * demo.CLIPS} videos of '
          f'{len(demo.CLASSES)} classes in {time.perf_counter() - start:.1f} s')


# ------------------------------------------------------------------------------- parsers

JPEG_QUALITY = Ranged(int, 1, 100)


def _add_common(p, workers=True):
    p.add_argument('--overwrite', action='store_true',
                   help='replace existing outputs (default: refuse to touch them)')
    if workers:
        p.add_argument('-j', '--workers', type=POSITIVE, default=min(8, os.cpu_count() or 1),
                       help='worker processes, one video each at a time; 1 works in this '
                            'process (default: %(default)s, the CPU count up to 8)')


def _short_side(p, what):
    p.add_argument('--short_side', type=NON_NEGATIVE, default=0, metavar='N',
                   help=f'resize frames so their shorter side is N pixels before {what} '
                        f'(default 0: keep the size)')


def add_frames(sub):
    p = sub.add_parser('frames', help='frame folders (class/video/*.jpg) -> RGB LMDB',
                       description='Pack src/<class>/<video>/*.jpg into a video LMDB. Frames '
                                   'are taken in natural name order (img_9 before img_10) and '
                                   'their JPEG bytes are stored as they are.')
    p.add_argument('--src', required=True, metavar='DIR',
                   help='folder of class folders of video frame folders')
    p.add_argument('--out', required=True, metavar='LMDB', help='video LMDB to write')
    _add_common(p)
    p.set_defaults(run=run_frames)


def add_videos(sub):
    p = sub.add_parser('videos', help='video files (class/video.avi ...) -> RGB LMDB',
                       description='Decode every frame of src/<class>/<video>.{avi,mp4,mkv,'
                                   'webm,mov} with PyAV and store them as JPEGs in a video '
                                   'LMDB. Unreadable videos are skipped and listed at the end.')
    p.add_argument('--src', required=True, metavar='DIR', help='folder of class folders of videos')
    p.add_argument('--out', required=True, metavar='LMDB', help='video LMDB to write')
    _short_side(p, 'storing them')
    p.add_argument('--quality', type=JPEG_QUALITY, default=90, metavar='Q',
                   help='JPEG quality of the stored frames (default: %(default)s)')
    _add_common(p)
    p.set_defaults(run=run_videos)


def add_flow(sub):
    p = sub.add_parser('flow', help='RGB LMDB or frame folders -> TV-L1 flow LMDB',
                       description='TV-L1 optical flow (OpenCV) between consecutive grayscale '
                                   'frames: a video of n frames gets n-1 flow frames, stored as '
                                   'JPEGs (channel 0 horizontal, 1 vertical flow, clipped to '
                                   '[-20, 20] px and mapped to [0, 255]; channel 2 is 128). '
                                   'Video names are those of the source.')
    p.add_argument('--src', required=True, metavar='DIR_or_LMDB',
                   help='an RGB video LMDB, or a folder of class/video/*.jpg frame folders')
    p.add_argument('--out', required=True, metavar='LMDB', help='flow LMDB to write')
    _short_side(p, 'computing the flow')
    p.add_argument('--quality', type=JPEG_QUALITY, default=95, metavar='Q',
                   help='JPEG quality of the flow frames; they carry numbers, keep it high '
                        '(default: %(default)s)')
    _add_common(p)
    p.set_defaults(run=run_flow)


def add_splits(sub):
    p = sub.add_parser('splits', help='split CSVs, ClassInd.txt, video_source.json',
                       description='Write the split files of a dataset folder (SPEC §3). CSV '
                                   'rows are "class/video,num_frames" with the frame counts of '
                                   'the LMDB.')
    datasets = p.add_subparsers(dest='dataset', required=True, metavar='DATASET')

    d = datasets.add_parser('ucf101', help='derived from the video names alone',
                            description='UCF101: test split k holds groups 7(k-1)+1..7k '
                                        '(g01-g07, g08-g14, g15-g21), the rest is train; '
                                        'classes sorted by name; video_source.json maps '
                                        'v_<class>_gNN to a group id.')
    d.add_argument('--lmdb', required=True, help='the UCF101 RGB (or flow) LMDB')
    d.add_argument('--out', required=True, metavar='DIR', help='dataset folder to write into')
    _add_common(d, workers=False)
    d.set_defaults(run=run_splits_ucf101)

    d = datasets.add_parser('hmdb51', help='from the official split files',
                            description='HMDB51 from its official <class>_test_split<k>.txt '
                                        'files (lines "video.avi label"; 1 train, 2 test, '
                                        '0 unused). Listed videos missing from the LMDB are '
                                        'reported and left out.')
    d.add_argument('--lmdb', required=True, help='the HMDB51 RGB (or flow) LMDB')
    d.add_argument('--official', required=True, metavar='DIR',
                   help='folder of the official testTrainMulti_7030_splits files')
    d.add_argument('--out', required=True, metavar='DIR', help='dataset folder to write into')
    _add_common(d, workers=False)
    d.set_defaults(run=run_splits_hmdb51)

    d = datasets.add_parser('kinetics', help='train/val split from the two LMDBs',
                            description='Kinetics: train_split.csv and val_split.csv list the '
                                        'videos of the two LMDBs; ClassInd.txt their class '
                                        'folders, sorted.')
    d.add_argument('--train_lmdb', required=True, help='the training-set RGB LMDB')
    d.add_argument('--val_lmdb', required=True, help='the validation-set RGB LMDB')
    d.add_argument('--out', required=True, metavar='DIR', help='dataset folder to write into')
    _add_common(d, workers=False)
    d.set_defaults(run=run_splits_kinetics)


def add_demo(sub):
    p = sub.add_parser('demo', help='build the synthetic demo dataset',
                       description='Write DATA_ROOT/demo/: 300 small synthetic videos in 6 '
                                   'classes that differ only by motion, with exact flow and '
                                   'three splits (see dataset/demo.py).')
    p.add_argument('--data_root', default=None, metavar='DIR',
                   help='folder to create demo/ in (default: $CVTCL_DATA_ROOT or data/ in the '
                        'project folder, where the training scripts look)')
    p.add_argument('--seed', type=int, default=0, help='random seed (default: %(default)s)')
    _add_common(p, workers=False)
    p.set_defaults(run=run_demo)


# One ``add_<name>(subparsers)`` per subcommand: it adds the parser and sets ``run``.
COMMANDS = [add_frames, add_videos, add_flow, add_splits, add_demo]


# --- preview: the subcommand's code lives in dataset/preview.py ----------------------------------
def add_preview(sub):
    from dataset.preview import add_parser
    add_parser(sub, UserError)


COMMANDS.append(add_preview)
# --- end preview ---------------------------------------------------------------------------------


def build_parser():
    parser = argparse.ArgumentParser(prog='python -m dataset.prepare', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv=None):
    """Run one subcommand; returns the exit status (2 for a wrong flag or input)."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
