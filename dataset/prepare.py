"""Prepare datasets in the layout of docs/METHOD.md (Data): video LMDBs, optical flow, split files.

    python -m dataset.prepare videos --src UCF101/ --out data/ucf101/ucf101_frame.lmdb
    python -m dataset.prepare flow --src data/ucf101/ucf101_frame.lmdb \\
        --out data/ucf101/ucf101_tvl1_frame.lmdb [--method dis]
    python -m dataset.prepare splits ucf101 --lmdb data/ucf101/ucf101_frame.lmdb --out data/ucf101
    python -m dataset.prepare verify --src data/ucf101/*.lmdb

frames, videos and flow keep each finished video in OUT.partial/ and write OUT from there, in the
order of the input: a stopped run started again with the same flags goes on where it stopped and
ends with the same LMDB. Unreadable videos are listed and left out. An existing output is
replaced only with --overwrite. videos and flow need requirements-prepare.txt.
"""
import argparse
import functools
import importlib.util
import io
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
from pathlib import Path

import msgpack
import torch
from PIL import Image
from tqdm import tqdm

from dataset import splits as split_files
from dataset.augment import resize_short_side
from dataset.lmdb_video import LMDBWriter, VideoLMDB, decode_frames, encode_frames, quantize_flow
from utils.checkpoint import atomic_write
from utils.config import NON_NEGATIVE, POSITIVE, Ranged
from utils.misc import UserError

VIDEO_EXTS = ('.avi', '.mp4', '.mkv', '.webm', '.mov')
FRAME_EXTS = ('.jpg', '.jpeg')


def natural_key(text):
    """Sort key that puts ``img_9`` before ``img_10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', text)]


def list_class_entries(src, kind):
    """``[names, paths]`` of ``src/<class>/<video>`` in natural order (``class/video``): frame
    folders (``kind='frames'``) or video files (``'videos'``)."""
    if not os.path.isdir(src):
        raise UserError(f'--src {src}: no such directory')
    found, frames = {}, kind == 'frames'
    for path in sorted(Path(src).glob('[!.]*/[!.]*'),
                       key=lambda p: (natural_key(p.parent.name), natural_key(p.name))):
        if path.is_dir() if frames else path.is_file() and path.suffix.lower() in VIDEO_EXTS:
            name = f'{path.parent.name}/{path.name if frames else path.stem}'
            if found.setdefault(name, str(path)) != str(path):
                raise UserError(f'{path} and {found[name]} would both be video {name!r}')
    if not found:
        raise UserError(f'--src {src} holds no ' + ('class/video/*.jpg frame folders' if frames
                        else f'class/video files ({", ".join(VIDEO_EXTS)})'))
    return [list(t) for t in zip(*found.items())]


def frame_files(folder):
    return sorted((f for f in os.listdir(folder) if f.lower().endswith(FRAME_EXTS)),
                  key=natural_key)


def open_lmdb(path, flag):
    try:
        return VideoLMDB(path)
    except UserError as e:   # VideoLMDB's own errors; anything else is a bug
        raise UserError(f'{flag}: {e}') from None


def require(command, name):
    """Import what a command needs once, before any work: one clear error, not one per video."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise UserError(f'prepare {command} needs {name} ({e}); install it with '
                        f'`python -m pip install -r requirements-prepare.txt`') from None


def read_frame_folder(folder):
    """The JPEG files of one video folder, as stored bytes, in natural order."""
    jpegs, kinds = [], set()
    for f in frame_files(folder):
        jpegs.append(Path(folder, f).read_bytes())
        try:
            with Image.open(io.BytesIO(jpegs[-1])) as im:  # reads the header only
                kinds.add((im.format, im.size))
        except (OSError, SyntaxError) as e:  # PIL's messages name the buffer, not the file
            raise UserError(f'{f} is not a readable image ({type(e).__name__})') from None
        if len(kinds) > 1 or im.format != 'JPEG':
            raise UserError(f'{f} is a {im.format} of {im.size[0]}x{im.size[1]}, not a JPEG of '
                            f'the earlier frames\' size')
    if not jpegs:
        raise UserError(f'{folder} holds no {"/".join(FRAME_EXTS)} frames')
    return jpegs


def decode_video(path, short_side=0, quality=90):
    """Every frame of a video file, decoded with PyAV, as JPEG bytes."""
    import av
    jpegs = []
    with av.open(path) as container:
        if not container.streams.video:
            raise UserError('no video stream')
        stream = container.streams.video[0]
        stream.thread_type = 'AUTO'
        for frame in container.decode(stream):
            rgb = torch.from_numpy(frame.to_ndarray(format='rgb24')).permute(2, 0, 1)[None]
            jpegs += encode_frames(resize_short_side(rgb, short_side) if short_side else rgb,
                                   quality)
    if not jpegs:
        raise UserError('no frame could be decoded')
    return jpegs


_lmdb = functools.lru_cache(maxsize=2)(VideoLMDB)  # opened once per worker: it reads all names


def video_flow(source, method='tvl1', short_side=0, quality=95):
    """Flow between consecutive grayscale frames of ``('lmdb', path, name)`` or ``('dir',
    folder, name)``, quantised as the published LMDBs' flow, as JPEG bytes."""
    import cv2
    kind, where, name = source
    if kind == 'lmdb':
        frames = _lmdb(where).read(name, range(_lmdb(where).num_frames(name)))
    else:
        frames = decode_frames(read_frame_folder(where), name=name, source=where)
    if len(frames) < 2:
        raise UserError(f'{len(frames)} frame(s); flow needs at least 2')
    # DIS preset medium: ~90x faster than TV-L1 per core at 320x240, close to its error on
    # textured motion (fast: 3x faster again, 5x the error there; README, Data).
    flow = (cv2.optflow.DualTVL1OpticalFlow_create() if method == 'tvl1'
            else cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM))
    if short_side:
        frames = resize_short_side(frames, short_side)
    gray = [cv2.cvtColor(f.permute(1, 2, 0).numpy(), cv2.COLOR_RGB2GRAY) for f in frames]
    return [jpeg for a, b in zip(gray, gray[1:]) for jpeg in encode_frames(
        torch.from_numpy(quantize_flow(flow.calc(a, b, None).transpose(2, 0, 1)))[None], quality)]


def _init_worker():
    torch.set_num_threads(1)  # the parallelism is across videos
    if importlib.util.find_spec('cv2'):
        importlib.import_module('cv2').setNumThreads(1)


def _guarded(fn, kwargs, item):
    """``(i, fn(task))``, or ``(i, reason)``: a broken video is listed, not the end of a run."""
    i, task = item
    try:
        return i, fn(task, **kwargs)
    except Exception as e:  # noqa: BLE001 -- each failure is listed at the end
        text = (str(e).strip().splitlines() or [''])[0]
        return i, text if isinstance(e, UserError) else f'{type(e).__name__}: {text}'


def parallel(fn, items, workers, **kwargs):
    """``(i, result)`` of every ``(i, task)`` as it finishes, in ``workers`` spawned processes."""
    job = functools.partial(_guarded, fn, kwargs)
    if workers <= 1 or len(items) <= 1:
        yield from map(job, items)
        return
    # spawn, not fork: a forked copy of a process that already ran torch/OpenMP can hang.
    with multiprocessing.get_context('spawn').Pool(min(workers, len(items)),
                                                   initializer=_init_worker) as pool:
        yield from pool.imap_unordered(job, items)


def convert(args, names, tasks, sizes, fn, unit, meta=None, **kwargs):
    """Write the LMDB ``args.out`` of ``fn(task, **kwargs)`` (JPEG bytes) for every video,
    resuming from ``args.out + '.partial'`` (a folder of another run is an error, or is started
    over with --overwrite). ``sizes``: work per task in ``unit``, for the progress bar."""
    if os.path.exists(args.out) and not args.overwrite:
        raise UserError(f'--out {args.out} exists; pass --overwrite to replace it')
    settings = {'command': args.command, 'src': os.path.abspath(args.src), 'names': names,
                **kwargs}
    work = Path(args.out + '.partial')
    record = work / 'settings.json'
    if record.exists() and json.loads(record.read_text()) != settings:
        if not args.overwrite:
            raise UserError(f'{work} holds part of a run with other input or flags; run that '
                            f'command again to finish it, or pass --overwrite to start over')
        shutil.rmtree(work)
    if not record.exists():
        atomic_write(record, json.dumps(settings).encode())
    done = {int(p.stem) for p in work.glob('*.msgpack')}
    todo = [i for i in range(len(names)) if i not in done]
    if done:
        print(f'resuming: {len(done)} of {len(names)} videos are done in {work}')
    failed, start = {}, time.perf_counter()
    with tqdm(total=sum(sizes[i] for i in todo), unit=unit, unit_scale=True, desc=args.command,
              mininterval=0.5 if sys.stderr.isatty() else 60) as bar:
        for i, result in parallel(fn, [(i, tasks[i]) for i in todo], args.workers, **kwargs):
            bar.update(sizes[i])
            if isinstance(result, str):
                failed[i] = result
            else:
                atomic_write(work / f'{i:09d}.msgpack', msgpack.dumps(result))
    skipped = [f'{names[i]}: {reason}' for i, reason in sorted(failed.items())]
    if len(skipped) == len(names):
        shutil.rmtree(work)
        raise UserError(f'none of the {len(names)} videos could be converted (first: '
                        f'{skipped[0]}); {args.out} not written')
    with LMDBWriter(args.out, overwrite=True) as writer:  # replaces args.out when complete
        for i, name in enumerate(names):
            if i not in failed:
                writer.put(name, msgpack.loads((work / f'{i:09d}.msgpack').read_bytes()))
        for key, value in (meta or {}).items():  # records such as __flow_method__
            writer.put_meta(key, value)
    shutil.rmtree(work)
    print(f'wrote {len(writer.names)} videos ({sum(writer.vlen)} frames) to {args.out}; '
          f'{len(todo) - len(failed)} computed in {time.perf_counter() - start:.1f} s, '
          f'{len(done)} done before')
    if skipped:
        print(f'skipped {len(skipped)} unreadable video(s):', *skipped, sep='\n  ')


def verify_video(task):
    """Decode every frame of ``(lmdb, name, is_flow)`` (as many as ``__vlen__`` says, of one
    size); a flow frame's channel 2 is flat (docs/METHOD.md, Data). Returns the frame count."""
    path, name, flow = task
    frames = _lmdb(path).read(name, range(_lmdb(path).num_frames(name)))
    third = frames[:, 2].float()
    spread = (third - third.mean((1, 2), keepdim=True)).abs().mean((1, 2))   # ~2 on flow
    if flow and (spread > 8).any():
        j = int((spread > 8).nonzero()[0])
        raise UserError(f'frame {j} is not two-channel flow: channel 2 varies by {spread[j]:.0f} '
                        f'grey levels on average (an RGB LMDB?)')
    return len(frames)


def run_verify(args):
    """List every broken video of each LMDB (``verify_video``); any makes an error."""
    broken = 0
    for path in args.src:
        db = open_lmdb(path, '--src')   # its metadata (__keys__, __order__, __vlen__) checked
        flow = db.flow_method is not None or '_tvl1' in os.path.basename(path)
        sizes, failed = [db.num_frames(n) for n in db.names], []
        tasks = [(i, (os.path.abspath(path), n, flow)) for i, n in enumerate(db.names)]
        with tqdm(total=sum(sizes), unit='frame', unit_scale=True, desc=f'verify {path}',
                  mininterval=0.5 if sys.stderr.isatty() else 60) as bar:
            for i, result in parallel(verify_video, tasks, args.workers):
                bar.update(sizes[i])
                if isinstance(result, str):
                    failed.append(f'{db.names[i]}: {result}')
        print(f'{path} ({"flow" if flow else "RGB"}): {len(db)} videos, {sum(sizes)} frames, '
              f'{len(failed)} broken', *sorted(failed), sep='\n  ')
        broken += len(failed)
    if broken:
        raise UserError(f'{broken} broken video(s) in --src, listed above')


def run_frames(args):
    names, folders = list_class_entries(args.src, 'frames')
    convert(args, names, folders, [len(frame_files(f)) for f in folders], read_frame_folder,
            'frame')


def run_videos(args):
    names, paths = list_class_entries(args.src, 'videos')
    require('videos', 'av')
    convert(args, names, paths, [1] * len(names), decode_video, 'video',
            short_side=args.short_side, quality=args.quality)


def run_flow(args):
    if os.path.exists(args.src) and os.path.realpath(args.src) == os.path.realpath(args.out):
        raise UserError('--src and --out are the same path')
    cv2 = require('flow', 'cv2')
    if args.method == 'tvl1' and not hasattr(cv2, 'optflow'):
        raise UserError('--method tvl1 needs cv2.optflow from opencv-contrib-python-headless '
                        '(requirements-prepare.txt; uninstall other opencv-python packages, '
                        'which hide it), or use --method dis')
    if os.path.isfile(args.src) or os.path.isfile(os.path.join(args.src, 'data.mdb')):
        db = open_lmdb(args.src, '--src')
        names, tasks = db.names, [('lmdb', os.path.abspath(args.src), n) for n in db.names]
        sizes = [db.num_frames(n) - 1 for n in names]
    else:
        names, folders = list_class_entries(args.src, 'frames')
        tasks = [('dir', f, n) for n, f in zip(names, folders)]
        sizes = [len(frame_files(f)) - 1 for f in folders]
    convert(args, names, tasks, sizes, video_flow, 'pair', meta={'flow_method': args.method},
            method=args.method, short_side=args.short_side, quality=args.quality)


def run_splits(args):
    """Write the split files of ``args.dataset``; a split that would list no video (a test of 0/0
    later on) is an error."""
    if args.dataset == 'kinetics':
        dbs = [open_lmdb(args.train_lmdb, '--train_lmdb'), open_lmdb(args.val_lmdb, '--val_lmdb')]
        ids = {}   # CoCLR's Kinetics reader needs a video_source.json: one id per video name
        derived = {'classes': sorted({n.split('/')[0] for db in dbs for n in db.names}),
                   'splits': {'train_split': dbs[0].names, 'val_split': dbs[1].names},
                   'video_source': {n: ids.setdefault(split_files.source_key(n), len(ids))
                                    for db in dbs for n in db.names}}
        context = (f'--train_lmdb {args.train_lmdb} holds {len(dbs[0])} videos, --val_lmdb '
                   f'{args.val_lmdb} {len(dbs[1])}')
    elif args.dataset == 'hmdb51':
        dbs = [open_lmdb(args.lmdb, '--lmdb')]
        derived = split_files.hmdb51_splits(dbs[0].names, args.official)
        missing = derived['missing']
        if missing:
            print(f'warning: {len(missing)} videos listed in --official are not in {args.lmdb} '
                  f'(left out): {", ".join(missing[:5])}{" ..." * (len(missing) > 5)}',
                  file=sys.stderr)
        context = (f'--lmdb {args.lmdb} holds none of the videos --official {args.official} '
                   f'lists for them')
    else:
        dbs = [open_lmdb(args.lmdb, '--lmdb')]
        derived = split_files.ucf101_splits(dbs[0].names)
        groups = split_files.groups_text({split_files.group_number(n) for n in dbs[0].names})
        context = (f'--lmdb {args.lmdb} has videos of groups {groups}; test split k holds '
                   f'groups 7(k-1)+1..7k' if groups else f'--lmdb {args.lmdb} holds no videos')
    empty = [s for s, names in derived['splits'].items() if not names]
    if empty:
        raise UserError(f'{", ".join(empty)} would list no videos ({context}); no split file '
                        f'written')
    frames = {n: db.num_frames(n) for db in dbs for n in db.names}
    paths = split_files.write_split_files(args.out, derived, frames, args.overwrite)
    print(f'{len(derived["classes"])} classes; wrote ' + ', '.join(paths))


def run_demo(args):
    from dataset import demo
    from dataset.catalog import default_data_root
    root = args.data_root or default_data_root()
    folder = os.path.join(root, demo.NAME)
    if os.path.exists(folder):
        if not args.overwrite:
            raise UserError(f'{folder} exists; pass --overwrite to rebuild it')
        shutil.rmtree(folder)
    start = time.perf_counter()
    demo.ensure_demo(root, args.seed)
    print(f'wrote {folder}: {len(demo.plan(args.seed))} videos of {len(demo.CLASSES)} classes '
          f'in {time.perf_counter() - start:.1f} s')


def _command(sub, name, run, help, description, src=None, out='video'):
    """A subcommand; with ``src`` (the help of --src), one writing an ``out`` LMDB."""
    p = sub.add_parser(name, help=help, description=f'{help[0].upper()}{help[1:]}. {description}')
    if src:
        p.add_argument('--src', required=True, help=src)
        p.add_argument('--out', required=True, metavar='LMDB', help=f'{out} LMDB to write')
        p.add_argument('-j', '--workers', type=POSITIVE, default=min(8, os.cpu_count() or 1),
                       help='worker processes, one video each at a time; 1 works in this '
                            'process (default: %(default)s, the CPU count up to 8)')
    p.add_argument('--overwrite', action='store_true',
                   help='replace existing outputs (default: refuse to touch them)')
    p.set_defaults(run=run)
    return p


def _encoding(p, what, quality):
    p.add_argument('--short_side', type=NON_NEGATIVE, default=0, metavar='N',
                   help=f'resize frames so their shorter side is N pixels before {what} '
                        f'(default 0: keep the size)')
    p.add_argument('--quality', type=Ranged(int, 1, 100), default=quality, metavar='Q',
                   help='JPEG quality of the stored frames (default: %(default)s)')


def build_parser():
    parser = argparse.ArgumentParser(prog='python -m dataset.prepare', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
    _command(sub, 'frames', run_frames, 'frame folders (class/video/*.jpg) -> RGB LMDB',
             'Frames in natural name order (img_9 before img_10), JPEG bytes as they are.',
             'folder of class folders of video frame folders')
    p = _command(sub, 'videos', run_videos, 'video files (class/video.avi ...) -> RGB LMDB',
                 'Every frame of class/video.{avi,mp4,mkv,webm,mov}, decoded with PyAV, stored '
                 'as JPEG.', 'folder of class folders of videos')
    _encoding(p, 'storing them', 90)
    p = _command(sub, 'flow', run_flow, 'RGB LMDB or frame folders -> flow LMDB',
                 'Flow between consecutive grayscale frames (n frames give n-1), encoded as in '
                 'docs/METHOD.md (Data), the method recorded in __flow_method__; training reads '
                 '<name>_tvl1_frame.lmdb whatever the method, or --flow_lmdb.',
                 'an RGB video LMDB, or a folder of class/video/*.jpg frame folders', 'flow')
    p.add_argument('--method', choices=('tvl1', 'dis'), default='tvl1',
                   help="tvl1 (default): OpenCV contrib's TV-L1, as the published LMDBs; dis: "
                        "OpenCV's DIS (preset medium), ~90x faster, a little less accurate")
    _encoding(p, 'computing the flow', 95)
    p = sub.add_parser('splits', help='split CSVs, ClassInd.txt, video_source.json', description=
                       'Write the split files of a dataset folder (docs/METHOD.md, Data).')
    datasets = p.add_subparsers(dest='dataset', required=True, metavar='DATASET')
    for name, help, description in [
            ('ucf101', 'derived from the video names alone',
             'Test split k holds groups 7(k-1)+1..7k; video_source.json maps v_<class>_gNN to '
             'a group id.'),
            ('hmdb51', 'from the official split files',
             'Lines "video.avi label" of <class>_test_split<k>.txt: 1 train, 2 test, 0 unused; '
             'listed videos missing from the LMDB are reported and left out.'),
            ('kinetics', 'train/val split from the two LMDBs',
             'train_split.csv and val_split.csv list the videos of the two LMDBs; '
             'video_source.json gives each video name its own id.')]:
        d = _command(datasets, name, run_splits, help,
                     description + ' Classes: the class folders, sorted. The files are in '
                     "CoCLR's forms (its code reads them; docs/METHOD.md, Data).")
        d.add_argument('--out', required=True, metavar='DIR', help='dataset folder to write into')
        for flag in (['--train_lmdb', '--val_lmdb'] if name == 'kinetics' else ['--lmdb']):
            d.add_argument(flag, required=True, help='the RGB (or flow) LMDB')
        if name == 'hmdb51':
            d.add_argument('--official', required=True, metavar='DIR',
                           help='folder of the official testTrainMulti_7030_splits files')
    p = _command(sub, 'demo', run_demo, 'build the synthetic demo dataset',
                 'DATA_ROOT/demo/: 300 small videos in 6 classes that differ only by motion, '
                 'with exact flow and three splits (dataset/demo.py).')
    p.add_argument('--data_root', default=None, metavar='DIR',
                   help='folder to create demo/ in (default: $CVTCL_DATA_ROOT or data/ in the '
                        'project folder, where the training scripts look)')
    p.add_argument('--seed', type=int, default=0, help='random seed (default: %(default)s)')
    p = sub.add_parser('verify', help='check LMDBs (e.g. unpacked from the published tars)',
                       description='Decode every frame of every video (checking the metadata, '
                       'and for a flow LMDB its two-channel format); list each broken video with '
                       'its first bad frame, and exit with status 2 if any.')
    p.add_argument('--src', nargs='+', required=True, metavar='LMDB', help='video LMDB(s)')
    p.add_argument('-j', '--workers', type=POSITIVE, default=min(8, os.cpu_count() or 1),
                   help='worker processes (default: %(default)s)')
    p.set_defaults(run=run_verify)
    from dataset.preview import add_parser  # preview imports the dataset; only the CLI needs it
    add_parser(sub)
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
