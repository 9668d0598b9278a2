"""`python -m dataset.prepare` on real JPEGs, real encoded videos and real LMDBs made here."""
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import msgpack
import numpy as np
import pytest
import torch
from PIL import Image

from dataset import demo
from dataset.lmdb_video import LMDBWriter, VideoLMDB, encode_frames
from dataset.lmdb_video import quantize_flow
from dataset.prepare import main
from dataset.splits import read_class_index, read_split, read_video_source, ucf101_splits
from helpers import dequantize_flow

av = pytest.importorskip('av')
cv2 = pytest.importorskip('cv2')

REPO = Path(__file__).resolve().parents[1]
W, H = 64, 48


def moving_pattern(n, w=W, h=H):
    """n RGB frames (uint8 ``[n, h, w, 3]``): a gradient and a bright square moving right."""
    ys, xs = np.mgrid[0:h, 0:w]
    frames = []
    for t in range(n):
        img = np.stack([xs * 255 // w, ys * 255 // h, np.full_like(xs, 90)], -1).astype(np.uint8)
        x0 = 4 + 5 * t
        img[12:30, x0:x0 + 16] = (250, 240, 60)
        frames.append(img)
    return np.stack(frames)


def write_video(path, frames, codec):
    with av.open(str(path), 'w') as out:
        stream = out.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], 'yuv420p'
        stream.options = {'crf': '10'} if codec == 'libx264' else {}
        if codec == 'mpeg4':
            stream.bit_rate = 4_000_000
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format='rgb24')))
        out.mux(stream.encode())


def opencv_frames(path):
    """Decode with OpenCV's own FFmpeg build: an independent reference for PyAV's frames."""
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    cap.release()
    return np.stack(frames)


def lmdb_frames(path, name):
    db = VideoLMDB(path)
    return db.read(name, range(db.num_frames(name))).permute(0, 2, 3, 1).numpy()


def run_cli(*args):
    return subprocess.run([sys.executable, '-m', 'dataset.prepare', *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


# ------------------------------------------------------------------------------- frames

def test_frames_stores_jpeg_bytes_in_natural_order(tmp_path):
    src = tmp_path / 'frames'
    expected = {}
    for cls, video, n in [('Bowling', 'v_Bowling_g01_c01', 12),
                          ('Archery', 'v_Archery_g02_c01', 3)]:
        folder = src / cls / video
        folder.mkdir(parents=True)
        frames = moving_pattern(n)
        for i, f in enumerate(frames, 1):  # image_1 .. image_12: name order is not frame order
            buf = io.BytesIO()
            Image.fromarray(f).save(buf, 'JPEG', quality=80)
            (folder / f'image_{i}.jpg').write_bytes(buf.getvalue())
        (folder / 'notes.txt').write_text('not a frame')
        expected[f'{cls}/{video}'] = [(folder / f'image_{i}.jpg').read_bytes()
                                      for i in range(1, n + 1)]
    out = tmp_path / 'rgb.lmdb'
    assert main(['frames', '--src', str(src), '--out', str(out), '-j', '1']) == 0
    db = VideoLMDB(out)
    assert db.names == ['Archery/v_Archery_g02_c01', 'Bowling/v_Bowling_g01_c01']
    for name, jpegs in expected.items():
        assert db.num_frames(name) == len(jpegs)
        assert db.read_bytes(name, range(len(jpegs))) == jpegs  # stored as they are

    flow = tmp_path / 'flow.lmdb'  # flow straight from the frame folders
    assert main(['flow', '--src', str(src), '--out', str(flow), '-j', '1']) == 0
    assert VideoLMDB(flow).names == db.names
    assert [VideoLMDB(flow).num_frames(n) for n in db.names] == [2, 11]


# ------------------------------------------------------------------------------- videos

@pytest.fixture(scope='module')
def video_src(tmp_path_factory):
    """Two real encoded videos (mpeg4 .avi, H.264 .mp4) and one garbage '.avi'."""
    src = tmp_path_factory.mktemp('videos')
    (src / 'Run').mkdir()
    (src / 'Jump').mkdir()
    write_video(src / 'Run' / 'run1.avi', moving_pattern(9), 'mpeg4')
    write_video(src / 'Jump' / 'jump1.mp4', moving_pattern(7), 'libx264')
    (src / 'Jump' / 'broken.avi').write_bytes(np.random.default_rng(0).bytes(3000))
    (src / 'Jump' / 'readme.txt').write_text('not a video')
    return src


def test_videos_match_an_independent_decode_and_skip_broken(video_src, tmp_path):
    out = tmp_path / 'rgb.lmdb'
    res = run_cli('videos', '--src', video_src, '--out', out, '-j', '1')
    assert res.returncode == 0, res.stderr
    assert 'Jump/broken' in res.stdout and 'skipped 1' in res.stdout  # listed in the summary
    db = VideoLMDB(out)
    assert db.names == ['Jump/jump1', 'Run/run1']  # natural order, broken one left out
    for name, path in [('Jump/jump1', video_src / 'Jump' / 'jump1.mp4'),
                       ('Run/run1', video_src / 'Run' / 'run1.avi')]:
        ours, ref = lmdb_frames(out, name), opencv_frames(path)
        assert ours.shape == ref.shape  # every frame, original size
        diff = np.abs(ours.astype(np.float32) - ref.astype(np.float32))
        assert diff.mean() < 3, (name, diff.mean())  # JPEG q90 and colour conversion only


def test_videos_short_side_in_two_worker_processes(video_src, tmp_path):
    out = tmp_path / 'rgb24.lmdb'
    assert main(['videos', '--src', str(video_src), '--out', str(out), '--short_side', '24',
                 '-j', '2']) == 0
    assert VideoLMDB(out).names == ['Jump/jump1', 'Run/run1']  # the order of the input
    ours = lmdb_frames(out, 'Run/run1')
    assert ours.shape == (9, 24, 32, 3)  # 48 -> 24, 64 -> 32
    ref = cv2.resize(opencv_frames(video_src / 'Run' / 'run1.avi')[4], (32, 24),
                     interpolation=cv2.INTER_AREA)
    assert np.abs(ours[4].astype(np.float32) - ref).mean() < 4


def test_videos_none_readable_writes_nothing(tmp_path, capsys):
    src = tmp_path / 'src' / 'Run'
    src.mkdir(parents=True)
    (src / 'a.avi').write_bytes(b'not a video at all' * 100)
    out = tmp_path / 'rgb.lmdb'
    assert main(['videos', '--src', str(tmp_path / 'src'), '--out', str(out), '-j', '1']) == 2
    assert 'error:' in capsys.readouterr().err
    assert not out.exists() and not Path(str(out) + '.tmp').exists()


# --------------------------------------------------------------------------------- flow

def test_flow_of_a_translating_texture(tmp_path):
    rng = np.random.default_rng(0)
    big = cv2.GaussianBlur(rng.uniform(0, 255, (96, 128)).astype(np.float32), (0, 0), 2.5)
    big = cv2.normalize(big, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    shift = 2  # pixels per frame to the right: content at x moves to x + 2
    frames = np.stack([np.repeat(big[16:80, 32 - shift * t:96 - shift * t, None], 3, -1)
                       for t in range(6)])
    src = tmp_path / 'rgb.lmdb'
    with LMDBWriter(str(src)) as w:
        w.put('Pan/v_Pan_g01_c01', encode_frames(torch.from_numpy(frames).permute(0, 3, 1, 2), 95))
    out = tmp_path / 'flow.lmdb'
    assert main(['flow', '--src', str(src), '--out', str(out), '-j', '1']) == 0
    db = VideoLMDB(out)
    assert db.names == ['Pan/v_Pan_g01_c01'] and db.num_frames('Pan/v_Pan_g01_c01') == 5
    raw = db.read('Pan/v_Pan_g01_c01', range(5))
    assert (raw[:, 2].int() - 128).abs().max() <= 2  # a constant, up to JPEG's colour rounding
    flow = dequantize_flow(raw)[:, :, 8:-8, 8:-8]  # away from the borders
    assert abs(flow[:, 0].mean().item() - shift) < 0.3
    assert abs(flow[:, 1].mean().item()) < 0.3


def test_flow_encoding_round_trip():
    flow = np.array([-30.0, -20.0, -5.0, 0.0, 7.5, 20.0, 25.0], np.float32).reshape(7, 1)
    q = quantize_flow(np.stack([flow, -flow], 0))  # 2 x H x W -> 3 x H x W
    assert q.shape == (3, 7, 1) and q.dtype == np.uint8
    assert q[0, :, 0].tolist() == [0, 0, 96, 128, 175, 255, 255]
    assert q[1, :, 0].tolist() == [255, 255, 159, 128, 80, 0, 0]
    assert (q[2] == 128).all()
    back = dequantize_flow(torch.from_numpy(q))
    assert torch.allclose(back[0], torch.from_numpy(flow).clamp(-20, 20), atol=40 / 255)


def demo_rgb_lmdb(path, clips, frames):
    """An RGB LMDB of the first ``frames`` frames of demo clips; returns their exact flow."""
    exact = {}
    with LMDBWriter(str(path)) as w:
        for clip in clips:
            rgb, flow = demo.render(clip)
            w.put(clip.name, encode_frames(torch.from_numpy(rgb[:frames]), 90))
            exact[clip.name] = flow[:frames - 1]
    return exact


def lmdb_meta(path, key):
    """A metadata record of an LMDB file, read with lmdb itself (None when absent)."""
    env = lmdb.open(str(path), subdir=False, readonly=True, lock=False)
    with env.begin() as txn:
        raw = txn.get(f'__{key}__'.encode())
    env.close()
    return None if raw is None else msgpack.loads(raw)


@pytest.mark.parametrize('method, bound', [('tvl1', 0.35), ('dis', 0.4)])
def test_flow_end_point_error_on_demo_videos(tmp_path, method, bound):
    """End-point error of the stored flow (estimated, quantised, JPEG) against the demo's exact
    flow, on the moving object: the flat background carries no motion an estimator could see.
    Measured: TV-L1 0.23 px, DIS 0.26 px; zero flow would be 1.3 px."""
    clips = [next(c for c in demo.plan(0) if c.name.startswith(cls + '/')) for cls in demo.CLASSES]
    exact = demo_rgb_lmdb(tmp_path / 'rgb.lmdb', clips, frames=6)
    out = tmp_path / 'flow.lmdb'
    assert main(['flow', '--src', str(tmp_path / 'rgb.lmdb'), '--out', str(out), '--method',
                 method, '-j', '1']) == 0
    assert lmdb_meta(out, 'flow_method') == method
    db, errors, zero = VideoLMDB(out), [], []
    assert db.flow_method == method and VideoLMDB(tmp_path / 'rgb.lmdb').flow_method is None
    for name, flow in exact.items():
        stored = dequantize_flow(db.read(name, range(db.num_frames(name)))).numpy()
        moving = np.hypot(flow[:, 0], flow[:, 1]) > 0
        errors.append(np.hypot(*(stored - flow).transpose(1, 0, 2, 3))[moving].mean())
        zero.append(np.hypot(flow[:, 0], flow[:, 1])[moving].mean())
    print(f'\n[flow] {method}: EPE {np.mean(errors):.3f} px on the moving object '
          f'(zero flow: {np.mean(zero):.3f})')
    assert np.mean(errors) < bound and max(errors) < 2 * bound, errors


def records(path):
    meta, db = lmdb_meta(path, 'flow_method'), VideoLMDB(path)
    videos = [(n, db.read_bytes(n, range(db.num_frames(n)))) for n in db.names]
    return videos, meta


def test_flow_killed_half_way_resumes_to_the_same_lmdb(tmp_path, capsys):
    rng = np.random.default_rng(0)
    texture = cv2.GaussianBlur(rng.uniform(0, 255, (240, 400)).astype(np.float32), (0, 0), 3)
    texture = cv2.normalize(texture, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    names = [f'Pan/v_Pan_g{i:02d}_c01' for i in range(1, 13)]
    with LMDBWriter(str(tmp_path / 'rgb.lmdb')) as w:  # 320 x 240 frames: DIS takes a while
        for i, name in enumerate(names):
            step = i % 3 + 1
            frames = np.stack([texture[:, s:s + 320] for s in range(0, 10 * step, step)])
            w.put(name, encode_frames(torch.from_numpy(frames)[:, None].expand(-1, 3, -1, -1)))
    flow = ['flow', '--src', str(tmp_path / 'rgb.lmdb'), '--method', 'dis', '-j', '1']
    assert main(flow + ['--out', str(tmp_path / 'clean.lmdb')]) == 0

    out = tmp_path / 'flow.lmdb'
    work = Path(str(out) + '.partial')
    proc = subprocess.Popen([sys.executable, '-m', 'dataset.prepare', *flow, '--out', str(out)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # stopped for good (SIGKILL) once two videos are done
        deadline = time.monotonic() + 240
        while len(list(work.glob('*.msgpack'))) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, 'the run ended before it could be stopped'
    finally:
        proc.kill()
        proc.wait()
    done = len(list(work.glob('*.msgpack')))
    assert 2 <= done < len(names) and not out.exists()

    # Other flags would mix two kinds of flow in one LMDB: refused, nothing lost.
    capsys.readouterr()
    assert main(flow[:3] + ['--method', 'tvl1', '-j', '1', '--out', str(out)]) == 2
    assert str(work) in capsys.readouterr().err
    assert len(list(work.glob('*.msgpack'))) == done

    assert main(flow + ['--out', str(out)]) == 0
    stdout = capsys.readouterr().out
    assert f'resuming: {done} of {len(names)} videos' in stdout
    assert f'{len(names) - done} computed' in stdout
    resumed = records(out)   # (each LMDB opened once: lmdb refuses a second open in a process)
    assert resumed == records(tmp_path / 'clean.lmdb')
    assert resumed[1] == 'dis' and not work.exists()


def test_missing_dependency_is_one_error(tmp_path):
    """Without PyAV (a module that fails to import shadows it), videos stops before any work."""
    (tmp_path / 'lib' / 'av').mkdir(parents=True)
    (tmp_path / 'lib' / 'av' / '__init__.py').write_text('raise ImportError("no PyAV here")\n')
    for i in range(3):
        (tmp_path / 'src' / 'A').mkdir(parents=True, exist_ok=True)
        (tmp_path / 'src' / 'A' / f'v{i}.avi').write_bytes(b'x')
    res = subprocess.run([sys.executable, '-m', 'dataset.prepare', 'videos', '--src',
                          str(tmp_path / 'src'), '--out', str(tmp_path / 'o.lmdb')], cwd=REPO,
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, 'PYTHONPATH': f'{tmp_path / "lib"}{os.pathsep}{REPO}'})
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        'error: prepare videos needs av (no PyAV here); install it with '
        '`python -m pip install -r requirements-prepare.txt`']
    assert not list(tmp_path.glob('o.lmdb*'))


# ------------------------------------------------------------------------------- splits

def names_lmdb(path, names):
    """A real LMDB whose videos have i % 3 + 1 tiny frames each."""
    jpeg = encode_frames(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))[0]
    with LMDBWriter(str(path)) as w:
        for i, n in enumerate(names):
            w.put(n, [jpeg] * (i % 3 + 1))
    return {n: i % 3 + 1 for i, n in enumerate(names)}


def coclr_rows(path, kinetics):
    """(class/video, frames) of a split CSV as CoCLR's readers name them: the path's components
    -3 and -2 split on '/' (UCF101, HMDB51: a trailing slash expected), -2 and -1 (Kinetics)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        path_part, frames = line.rsplit(',', 1)
        parts = path_part.split('/')
        rows.append(('/'.join(parts[-2:] if kinetics else parts[-3:-1]), int(frames)))
    return rows


def test_splits_ucf101(tmp_path):
    names = [f'{c}/v_{c}_g{g:02d}_c{k:02d}' for c in ('YoYo', 'ApplyLipstick', 'Biking')
             for g in range(1, 26) for k in (1, 2)]
    frames = names_lmdb(tmp_path / 'u.lmdb', names)
    out = tmp_path / 'ucf'
    assert main(['splits', 'ucf101', '--lmdb', str(tmp_path / 'u.lmdb'), '--out', str(out)]) == 0

    def groups(split):
        return {int(n.split('_g')[1][:2]) for n in read_split(out / f'{split}.csv')}
    for k in (1, 2, 3):
        test = set(range(7 * k - 6, 7 * k + 1))
        assert groups(f'test_split0{k}') == test
        assert groups(f'train_split0{k}') == set(range(1, 26)) - test
        assert len(read_split(out / f'test_split0{k}.csv')) == 3 * 7 * 2
    assert (out / 'ClassInd.txt').read_text() == 'ApplyLipstick\nBiking\nYoYo\n'   # CoCLR's
    assert read_class_index(out / 'ClassInd.txt') == {'ApplyLipstick': 0, 'Biking': 1, 'YoYo': 2}
    rows = (out / 'train_split01.csv').read_text().splitlines()
    assert rows[0].startswith('YoYo/v_YoYo_g08_c01/,')           # the LMDB's order
    for video, n in coclr_rows(out / 'train_split01.csv', kinetics=False):
        assert n == frames[video]
    assert [v for v, _ in coclr_rows(out / 'test_split02.csv', False)] == read_split(
        out / 'test_split02.csv')
    source = read_video_source(out / 'video_source.json')
    assert len(source) == 3 * 25 and len(set(source.values())) == 3 * 25  # one id per group
    assert source['v_YoYo_g08'] != source['v_Biking_g08']
    assert ucf101_splits(names)['video_source'] == source


def test_splits_hmdb51(tmp_path):
    names = ['brush_hair/a1', 'brush_hair/a2', 'brush_hair/a3', 'cartwheel/b1', 'cartwheel/b2']
    names_lmdb(tmp_path / 'h.lmdb', names)
    official = tmp_path / 'official'
    official.mkdir()
    for k in (1, 2, 3):
        (official / f'brush_hair_test_split{k}.txt').write_text(
            f'a1.avi {1 if k == 1 else 2} \na2.avi {2 if k == 1 else 1} \na3.avi 0 \n')
        (official / f'cartwheel_test_split{k}.txt').write_text(
            'b1.avi 1 \nb2.avi 2 \nmissing.avi 1 \n')
    out = tmp_path / 'hmdb'
    assert main(['splits', 'hmdb51', '--lmdb', str(tmp_path / 'h.lmdb'),
                 '--official', str(official), '--out', str(out)]) == 0
    assert read_split(out / 'train_split01.csv') == ['brush_hair/a1', 'cartwheel/b1']
    assert read_split(out / 'test_split01.csv') == ['brush_hair/a2', 'cartwheel/b2']
    assert read_split(out / 'train_split02.csv') == ['brush_hair/a2', 'cartwheel/b1']
    assert (out / 'ClassInd.txt').read_text() == 'brush_hair\ncartwheel\n'
    assert coclr_rows(out / 'test_split01.csv', False) == [('brush_hair/a2', 2),
                                                           ('cartwheel/b2', 2)]
    assert not (out / 'video_source.json').exists()


def test_splits_kinetics(tmp_path):
    train = names_lmdb(tmp_path / 'tr.lmdb', ['abseiling/x1', 'zumba/x2'])
    names_lmdb(tmp_path / 'va.lmdb', ['bowling/y1'])
    out = tmp_path / 'k'
    assert main(['splits', 'kinetics', '--train_lmdb', str(tmp_path / 'tr.lmdb'),
                 '--val_lmdb', str(tmp_path / 'va.lmdb'), '--out', str(out)]) == 0
    assert read_split(out / 'train_split.csv') == list(train)
    assert read_split(out / 'val_split.csv') == ['bowling/y1']
    assert read_class_index(out / 'ClassInd.txt') == {'abseiling': 0, 'bowling': 1, 'zumba': 2}
    assert coclr_rows(out / 'train_split.csv', True) == [('abseiling/x1', 1), ('zumba/x2', 2)]
    assert coclr_rows(out / 'val_split.csv', True) == [('bowling/y1', 1)]
    # CoCLR's Kinetics reader opens video_source.json; ours reads it back as one id per video.
    assert read_video_source(out / 'video_source.json') == {'x1': 0, 'x2': 1, 'y1': 2}


CLASS_ORDER = ['zumba dance', 'air drumming', 'abseiling']  # file order, not sorted
CLASS_FILES = {'name': '{name}', 'index name': '{i} {name}', 'index,name': '{i},{name}'}


def multi_word_videos(folder, lmdb_name, videos):
    """A real LMDB of 32 x 32 frames for ``videos`` (``class/video``); the split rows."""
    folder.mkdir(parents=True, exist_ok=True)
    jpeg = encode_frames(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))[0]
    with LMDBWriter(str(folder / lmdb_name)) as w:
        for n in videos:
            w.put(n, [jpeg] * 12)
    return [f'/frames/{n}/,12' for n in videos]


@pytest.mark.parametrize('form', list(CLASS_FILES))
def test_multi_word_classes_in_both_layouts(tmp_path, form):
    """ClassInd.txt in each of CoCLR's forms, class folders named like its lines (with
    blanks): classes numbered from 0 in file order, train and test alike; a Kinetics
    video_source.json keyed by class/video gives the source ids."""
    from dataset.catalog import build_dataset
    lines = ''.join(CLASS_FILES[form].format(i=i + 1, name=c) + '\n'
                    for i, c in enumerate(CLASS_ORDER))
    train = [f'{c}/{c[:3]}_{k}' for c in CLASS_ORDER for k in (1, 2)]
    test = [f'{c}/{c[:3]}_{k}' for c in CLASS_ORDER for k in (3,)]
    ucf = tmp_path / 'mine'
    rows = multi_word_videos(ucf, 'mine_frame.lmdb', train + test)
    (ucf / 'train_split01.csv').write_text('\n'.join(rows[:len(train)]) + '\n')
    (ucf / 'test_split01.csv').write_text('\n'.join(rows[len(train):]) + '\n')
    kin = tmp_path / 'kin'
    (kin / 'train_split.csv').write_text('\n'.join(
        r.replace('/frames/', '').replace('/,', ',') for r in
        multi_word_videos(kin, 'kin_frame_train.lmdb', train)) + '\n')
    (kin / 'val_split.csv').write_text('\n'.join(multi_word_videos(kin, 'kin_frame_val.lmdb',
                                                                  test)) + '\n')
    (kin / 'video_source.json').write_text(json.dumps(
        {n: 100 + i for i, n in enumerate(train + test)}))
    for folder in (ucf, kin):
        (folder / 'ClassInd.txt').write_text(lines)
    assert read_class_index(ucf / 'ClassInd.txt') == {c: i for i, c in enumerate(CLASS_ORDER)}
    for name in ('mine', 'kin'):
        for mode, videos in (('train', train), ('test', test)):
            ds = build_dataset(name, mode, data_root=tmp_path, seq_len=4, img_dim=16)
            assert sorted(ds.names) == sorted(videos)
            items = [ds[i] for i in range(len(ds))]
            assert [it['label'] for it in items] == [CLASS_ORDER.index(n.split('/')[0])
                                                     for n in ds.names]
            if name == 'kin':
                assert [it['source'] for it in items] == [100 + (train + test).index(n)
                                                          for n in ds.names]


def test_splits_kinetics_with_multi_word_classes_read_back(tmp_path):
    from dataset.catalog import build_dataset
    kin = tmp_path / 'kin'
    multi_word_videos(kin, 'kin_frame_train.lmdb', ['air drumming/a', 'zumba/b', 'air drumming/c'])
    multi_word_videos(kin, 'kin_frame_val.lmdb', ['zumba/d', 'air drumming/e'])
    assert main(['splits', 'kinetics', '--train_lmdb', str(kin / 'kin_frame_train.lmdb'),
                 '--val_lmdb', str(kin / 'kin_frame_val.lmdb'), '--out', str(kin)]) == 0
    assert read_class_index(kin / 'ClassInd.txt') == {'air drumming': 0, 'zumba': 1}
    ds = build_dataset('kin', 'test', data_root=tmp_path, seq_len=4, img_dim=16)
    assert ds.names == ['zumba/d', 'air drumming/e']
    assert [ds[i]['label'] for i in range(2)] == [1, 0]


# ----------------------------------------------------------------------------- bad input

def test_bad_inputs_are_clear_errors(tmp_path, capsys):
    missing = tmp_path / 'nope'
    assert main(['frames', '--src', str(missing), '--out', str(tmp_path / 'o.lmdb')]) == 2
    err = capsys.readouterr().err
    assert err.startswith('error:') and '--src' in err and str(missing) in err

    empty = tmp_path / 'empty'
    (empty / 'SomeClass').mkdir(parents=True)
    assert main(['videos', '--src', str(empty), '--out', str(tmp_path / 'o.lmdb')]) == 2
    assert 'holds no' in capsys.readouterr().err

    assert main(['splits', 'ucf101', '--lmdb', str(missing), '--out', str(tmp_path)]) == 2
    assert '--lmdb' in capsys.readouterr().err
    assert not list(tmp_path.glob('*.csv'))


def test_splits_refuse_a_split_without_videos(tmp_path, capsys):
    out = tmp_path / 'out'
    # Groups g01-g10 (as the demo's): test split 3 (g15-g21) would be empty.
    names_lmdb(tmp_path / 'g10.lmdb', [f'A/v_A_g{g:02d}_c01' for g in range(1, 11)])
    res = run_cli('splits', 'ucf101', '--lmdb', tmp_path / 'g10.lmdb', '--out', out)
    assert res.returncode == 2 and 'Traceback' not in res.stderr
    assert res.stderr == (f'error: test_split03 would list no videos (--lmdb '
                          f'{tmp_path / "g10.lmdb"} has videos of groups g01-g10; test split k '
                          f'holds groups 7(k-1)+1..7k); no split file written\n')
    assert not out.exists()
    # Groups g01-g07 only: train split 1 and test splits 2 and 3 would be empty.
    names_lmdb(tmp_path / 'g7.lmdb', [f'A/v_A_g{g:02d}_c01' for g in range(1, 8)])
    assert main(['splits', 'ucf101', '--lmdb', str(tmp_path / 'g7.lmdb'), '--out', str(out)]) == 2
    assert ('error: train_split01, test_split02, test_split03 would list no videos' in
            capsys.readouterr().err)
    # Groups with a gap: named as they are.
    names_lmdb(tmp_path / 'gap.lmdb', [f'A/v_A_g{g:02d}_c01' for g in (1, 2, 3, 15, 16)])
    assert main(['splits', 'ucf101', '--lmdb', str(tmp_path / 'gap.lmdb'), '--out', str(out)]) == 2
    assert ('test_split02 would list no videos (--lmdb '
            f'{tmp_path / "gap.lmdb"} has videos of groups g01-g03, g15-g16;'
            in capsys.readouterr().err)
    names_lmdb(tmp_path / 'none.lmdb', [])
    assert main(['splits', 'ucf101', '--lmdb', str(tmp_path / 'none.lmdb'), '--out', str(out)]) == 2
    assert f'--lmdb {tmp_path / "none.lmdb"} holds no videos' in capsys.readouterr().err

    names_lmdb(tmp_path / 'tr.lmdb', ['abseiling/x1'])
    assert main(['splits', 'kinetics', '--train_lmdb', str(tmp_path / 'tr.lmdb'), '--val_lmdb',
                 str(tmp_path / 'none.lmdb'), '--out', str(out)]) == 2
    assert (f'val_split would list no videos (--train_lmdb {tmp_path / "tr.lmdb"} holds 1 '
            f'videos, --val_lmdb {tmp_path / "none.lmdb"} 0)') in capsys.readouterr().err

    # HMDB51: every test (2) video of split 1 is missing from the LMDB.
    official = tmp_path / 'official'
    official.mkdir()
    (official / 'cartwheel_test_split1.txt').write_text('b1.avi 1 \nmissing.avi 2 \n')
    names_lmdb(tmp_path / 'h.lmdb', ['cartwheel/b1'])
    assert main(['splits', 'hmdb51', '--lmdb', str(tmp_path / 'h.lmdb'), '--official',
                 str(official), '--out', str(out)]) == 2
    assert (f'test_split01 would list no videos (--lmdb {tmp_path / "h.lmdb"} holds none of the '
            f'videos --official {official} lists for them)') in capsys.readouterr().err
    assert not out.exists()


def test_frames_names_an_unreadable_frame_file(tmp_path, capsys):
    src = tmp_path / 'frames'
    for video in ('v_A_g01_c01', 'v_A_g02_c01'):
        (src / 'A' / video).mkdir(parents=True)
        for i in (1, 2):
            Image.fromarray(moving_pattern(1)[0]).save(src / 'A' / video / f'img_{i}.jpg')
    (src / 'A' / 'v_A_g02_c01' / 'img_2.jpg').write_bytes(b'\x00garbage, not an image' * 8)
    assert main(['frames', '--src', str(src), '--out', str(tmp_path / 'o.lmdb'), '-j', '1']) == 0
    out = capsys.readouterr().out
    assert 'A/v_A_g02_c01: img_2.jpg is not a readable image' in out
    assert 'BytesIO' not in out
    assert VideoLMDB(tmp_path / 'o.lmdb').names == ['A/v_A_g01_c01']


def test_existing_output_needs_overwrite(tmp_path, capsys):
    src = tmp_path / 'src' / 'A' / 'v_A_g01_c01'
    src.mkdir(parents=True)
    Image.fromarray(moving_pattern(1)[0]).save(src / '1.jpg')
    out = tmp_path / 'rgb.lmdb'
    out.write_bytes(b'precious')
    res = run_cli('frames', '--src', tmp_path / 'src', '--out', out)
    assert res.returncode == 2 and 'Traceback' not in res.stderr
    assert 'error:' in res.stderr and '--overwrite' in res.stderr and str(out) in res.stderr
    assert out.read_bytes() == b'precious'
    assert main(['frames', '--src', str(tmp_path / 'src'), '--out', str(out), '--overwrite',
                 '-j', '1']) == 0
    assert VideoLMDB(out).names == ['A/v_A_g01_c01']

    split_out = tmp_path / 'splits'
    split_out.mkdir()
    (split_out / 'ClassInd.txt').write_text('mine\n')
    names_lmdb(tmp_path / 'u.lmdb', [f'A/v_A_g{g:02d}_c01' for g in (1, 8, 15)])
    assert main(['splits', 'ucf101', '--lmdb', str(tmp_path / 'u.lmdb'),
                 '--out', str(split_out)]) == 2
    assert '--overwrite' in capsys.readouterr().err
    assert (split_out / 'ClassInd.txt').read_text() == 'mine\n'

    demo_root = tmp_path / 'data'
    (demo_root / 'demo').mkdir(parents=True)
    assert main(['demo', '--data_root', str(demo_root)]) == 2
    assert '--overwrite' in capsys.readouterr().err
    assert os.listdir(demo_root) == ['demo']


def test_help_of_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(['--help'])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ('frames', 'videos', 'flow', 'splits', 'demo'):
        assert cmd in out
    for argv in (['frames'], ['videos'], ['flow'], ['splits', 'ucf101'], ['splits', 'hmdb51'],
                 ['splits', 'kinetics'], ['demo']):
        with pytest.raises(SystemExit) as e:
            main(argv + ['--help'])
        assert e.value.code == 0


def test_split_files_are_json_and_csv(tmp_path):
    names_lmdb(tmp_path / 'u.lmdb', ['A/v_A_g01_c01', 'A/v_A_g01_c02', 'A/v_A_g08_c01',
                                     'A/v_A_g15_c01'])
    assert main(['splits', 'ucf101', '--lmdb', str(tmp_path / 'u.lmdb'),
                 '--out', str(tmp_path)]) == 0
    assert json.loads((tmp_path / 'video_source.json').read_text()) == {
        'v_A_g01': 0, 'v_A_g08': 1, 'v_A_g15': 2}
    assert not list(tmp_path.glob('*.tmp'))


def test_kinetics_with_multi_word_classes_trains_and_evaluates(tmp_path, monkeypatch):
    """A Kinetics layout with CoCLR's ClassInd.txt form (`index name`, names with blanks):
    local InfoNCE pretrains on it, then a classifier finetunes from that checkpoint and is
    tested and used for retrieval on the val split (a one-convolution backbone keeps it fast)."""
    import local_nce
    from backbone import BACKBONES
    from eval import main_classifier
    from test_pretrain import Tiny
    monkeypatch.setitem(BACKBONES, 'tiny', Tiny)
    kin = tmp_path / 'kin'
    train = [f'{c}/{c[:3]}_{k}' for c in CLASS_ORDER for k in (1, 2)]
    val = [f'{c}/{c[:3]}_{k}' for c in CLASS_ORDER for k in (3,)]
    (kin / 'train_split.csv').write_text('\n'.join(
        multi_word_videos(kin, 'kin_frame_train.lmdb', train)) + '\n')
    (kin / 'val_split.csv').write_text('\n'.join(
        multi_word_videos(kin, 'kin_frame_val.lmdb', val)) + '\n')
    (kin / 'ClassInd.txt').write_text(''.join(f'{i + 1} {c}\n' for i, c in enumerate(CLASS_ORDER)))
    common = ['--data_root', str(tmp_path), '--net', 'tiny', '--seq_len', '8', '--img_dim', '16',
              '--batch_size', '2', '-j', '0', '--device', 'cpu', '--epochs', '1']
    exp = local_nce.main(['--dataset', 'kin-2clip', *common, '--moco-k', '8',
                          '--iters_per_epoch', '2', '--output_dir', str(tmp_path / 'pre')])
    cls = main_classifier.main(['--dataset', 'kin', *common, '--train_what', 'ft',
                                '--pretrain', str(exp / 'last.pth.tar'),
                                '--output_dir', str(tmp_path / 'cls')])
    report = main_classifier.main(['--dataset', 'kin', *common, '--train_what', 'ft', '--test',
                                   str(cls / 'best.pth.tar'), '--center_crop',
                                   '--output_dir', str(tmp_path / 'test')])
    assert report['videos'] == len(val)
    recall = main_classifier.main(['--dataset', 'kin', *common, '--test',
                                   str(exp / 'last.pth.tar'), '--retrieval',
                                   '--output_dir', str(tmp_path / 'ret')])
    assert (recall['queries'], recall['gallery']) == (len(val), len(train))
    assert recall['protocol'] == 'coclr' and set(recall['recall']) >= {'R@1', 'R@5'}
