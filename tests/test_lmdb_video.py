"""The video LMDB reader and writer (docs/METHOD.md, Data) on real LMDBs of real JPEGs.

The LMDBs read here are written by a minimal, independent writer (``tests/helpers.py``), so the
reader is checked against the format, not against the project's own writer.
"""
import os
import pickle
import subprocess
import sys
from pathlib import Path

import lmdb
import msgpack
import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.io import decode_jpeg, ImageReadMode

from dataset.lmdb_video import LMDBWriter, VideoLMDB, decode_frames, encode_frames
from utils.misc import UserError
from helpers import (ReadFrames, decode_with_pil, jpeg_bytes, position_frames,
                     textured_frames, write_raw_lmdb)

REPO = Path(__file__).resolve().parents[1]
# Three videos of different lengths (so a mix-up of __vlen__ shows), not in name order.
LENGTHS = {'Run/v_Run_g02_c01': 7, 'Jump/v_Jump_g01_c01': 4, 'Run/v_Run_g01_c03': 11}
# Records inserted in another order than __order__: __keys__/__vlen__ follow insertion.
INSERTION = [2, 0, 1]


def _videos():
    return [(name, jpeg_bytes(textured_frames(n, 24, 32, seed=i), quality=90))
            for i, (name, n) in enumerate(LENGTHS.items())]


def _torchvision_decode(jpeg):
    return decode_jpeg(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8),
                       mode=ImageReadMode.RGB)


@pytest.fixture(scope='module')
def videos():
    return _videos()


@pytest.mark.parametrize('names_as_bytes', [False, True], ids=['str-names', 'bytes-names'])
@pytest.mark.parametrize('subdir', [False, True], ids=['file', 'directory'])
def test_read_pixel_exact(tmp_path, videos, names_as_bytes, subdir):
    path = write_raw_lmdb(tmp_path / 'v.lmdb', videos, names_as_bytes=names_as_bytes,
                          subdir=subdir, insertion_order=INSERTION)
    assert os.path.isdir(path) == subdir
    db = VideoLMDB(path)
    assert db.names == list(LENGTHS)
    assert len(db) == 3
    for name, jpegs in videos:
        assert name in db
        # __vlen__ is aligned with __keys__ (insertion order), not with __order__.
        assert db.num_frames(name) == LENGTHS[name]
        assert db.read_bytes(name, range(len(jpegs))) == jpegs
        idx = [len(jpegs) - 1, 0, 2, 2]    # any order, repeats allowed
        frames = db.read(name, idx)
        assert frames.dtype == torch.uint8 and frames.shape == (4, 3, 24, 32)
        for f, i in zip(frames, idx):
            assert torch.equal(f, _torchvision_decode(jpegs[i]))
            pil = decode_with_pil(jpegs[i])
            assert (f.int() - pil.int()).abs().max() <= 2
    assert 'Run/v_Run_g09_c01' not in db
    with pytest.raises(KeyError, match='v_Run_g09_c01'):
        db.num_frames('Run/v_Run_g09_c01')


def test_decode_frames_batched_equals_single(videos):
    jpegs = videos[2][1]
    batch = decode_frames(jpegs)
    assert batch.shape == (len(jpegs), 3, 24, 32)
    for f, j in zip(batch, jpegs):
        assert torch.equal(f, _torchvision_decode(j))


def test_pickle_reader(tmp_path, videos):
    db = VideoLMDB(write_raw_lmdb(tmp_path / 'v.lmdb', videos, insertion_order=INSERTION))
    clone = pickle.loads(pickle.dumps(db))
    assert clone.names == db.names
    assert [clone.num_frames(n) for n in clone.names] == list(LENGTHS.values())
    name = videos[0][0]
    assert torch.equal(clone.read(name, [0, 1]), torch.stack(
        [_torchvision_decode(j) for j in videos[0][1][:2]]))
    state = pickle.loads(pickle.dumps(clone)).__dict__   # an open handle is not pickled
    assert state['_env'] is None


def test_two_readers_of_one_file_in_one_process(tmp_path, videos):
    # E.g. the train and the test split of UCF101 read from the same LMDB with num_workers=0.
    # (py-lmdb refuses to open one environment twice in a process.)
    path = write_raw_lmdb(tmp_path / 'v.lmdb', videos)
    first = VideoLMDB(path)
    first.read(videos[0][0], [0])
    second = VideoLMDB(path)
    assert torch.equal(second.read(videos[0][0], [0]), first.read(videos[0][0], [0]))


# py-lmdb (>= 2) refuses to open an environment twice in one process, and a forked child
# inherits that registry: the reader must share one environment per file and process, and a
# forked child must drop (close) the environments it inherited before opening its own.
@pytest.mark.parametrize('context', ['fork', 'spawn'])
@pytest.mark.parametrize('parent_read', [False, True], ids=['fresh', 'parent-read'])
def test_read_in_dataloader_workers(tmp_path, videos, context, parent_read):
    if parent_read and context == 'spawn':
        pytest.skip('a spawned worker starts from a pickled reader')
    db = VideoLMDB(write_raw_lmdb(tmp_path / 'v.lmdb', videos, insertion_order=INSERTION,
                                  names_as_bytes=True))
    if parent_read:
        db.read(videos[0][0], [0])
    data = ReadFrames(db, [n for n, _ in videos] * 2)
    loader = DataLoader(data, batch_size=None, num_workers=2, multiprocessing_context=context)
    pids = set()
    for i, item in enumerate(loader):
        name, jpegs = videos[i % 3]
        expected = torch.stack([_torchvision_decode(j) for j in jpegs])
        assert torch.equal(item['frames'], expected), name
        pids.add(item['pid'])
    assert len(pids) == 2 and os.getpid() not in pids


def test_writer_round_trip(tmp_path):
    path = tmp_path / 'out' / 'w.lmdb'
    clips = {'B/v_B_g01_c01': position_frames(5, 16, 24),
             'A/v_A_g01_c01': textured_frames(3, 16, 24, seed=3)}
    encoded = {n: encode_frames(f, quality=95) for n, f in clips.items()}
    with LMDBWriter(path) as w:
        for n, jpegs in encoded.items():
            w.put(n, jpegs)
    assert path.is_file()       # a single file, as the published tars
    assert not os.path.exists(str(path) + '.tmp')
    # The metadata is that of the format: keys in insertion order, names as str.
    env = lmdb.open(str(path), subdir=False, readonly=True, lock=False)
    with env.begin() as txn:
        assert msgpack.loads(txn.get(b'__keys__'), raw=True) == [b'000000000', b'000000001']
        assert msgpack.loads(txn.get(b'__len__')) == 2
        assert msgpack.loads(txn.get(b'__order__')) == list(clips)
        assert msgpack.loads(txn.get(b'__vlen__')) == [5, 3]
    env.close()
    db = VideoLMDB(path)
    assert db.names == list(clips)
    for n, f in clips.items():
        assert db.num_frames(n) == len(f)
        assert db.read_bytes(n, range(len(f))) == encoded[n]
        decoded = db.read(n, range(len(f)))
        err = (decoded.float() - f.float()).abs()         # JPEG at quality 95
        assert err.mean() < 4 and err.max() <= 24


def test_writer_is_atomic(tmp_path):
    path = tmp_path / 'w.lmdb'
    jpegs = jpeg_bytes(position_frames(2, 8, 8))
    with pytest.raises(RuntimeError, match='boom'):
        with LMDBWriter(path) as w:
            w.put('A/a', jpegs)
            assert not path.exists()
            raise RuntimeError('boom')
    assert sorted(os.listdir(tmp_path)) == []     # neither the target nor a temp file

    w = LMDBWriter(path)
    w.put('A/a', jpegs)
    assert not path.exists()                      # the target only appears on close
    w.close()
    assert path.exists() and VideoLMDB(path).num_frames('A/a') == 2
    assert sorted(os.listdir(tmp_path)) == ['w.lmdb']
    with pytest.raises(UserError, match='w.lmdb'):
        LMDBWriter(path)


def test_rewritten_file_is_read_anew(tmp_path):
    # Rewriting an LMDB (prepare --overwrite, the demo rebuilt) and reading it again in the same
    # process must show the new content, not that of an environment cached for the old file.
    path = tmp_path / 'w.lmdb'
    jpegs = jpeg_bytes(position_frames(2, 8, 8))
    with LMDBWriter(path) as w:
        w.put('A/a', jpegs)
    old = VideoLMDB(path)
    assert old.read('A/a', [0, 1]).shape == (2, 3, 8, 8)
    with LMDBWriter(path, overwrite=True) as w:
        w.put('B/b', jpegs * 2)
    new = VideoLMDB(path)
    assert new.names == ['B/b'] and new.num_frames('B/b') == 4
    assert new.read_bytes('B/b', [3]) == [jpegs[1]]


def test_missing_path(tmp_path):
    missing = tmp_path / 'nowhere' / 'x_frame.lmdb'
    with pytest.raises(UserError, match='x_frame.lmdb'):
        VideoLMDB(missing)


@pytest.mark.parametrize('key', ['__order__', '__vlen__', '__keys__'])
def test_missing_metadata(tmp_path, videos, key):
    path = write_raw_lmdb(tmp_path / 'v.lmdb', videos, omit=(key,))
    with pytest.raises(UserError, match=key):
        VideoLMDB(path)


@pytest.mark.parametrize('vlen', [[7, 4], [7, 4, 11, 5]], ids=['short', 'long'])
def test_inconsistent_frame_counts(tmp_path, videos, vlen):
    # __vlen__ shorter than __keys__: a video without a frame count is refused by name. Longer:
    # the counts of the keys are read, the extra one is ignored.
    path = write_raw_lmdb(tmp_path / 'v.lmdb', videos, omit=('__vlen__',))
    env = lmdb.open(path, subdir=False)
    with env.begin(write=True) as txn:
        txn.put(b'__vlen__', msgpack.packb(vlen))
    env.close()
    if len(vlen) < 3:
        with pytest.raises(UserError, match=r"'Run/v_Run_g01_c03' \(position 2 of __order__\) "
                                            r"has no key 000000002"):
            VideoLMDB(path)
    else:
        assert [VideoLMDB(path).num_frames(n) for n in LENGTHS] == list(LENGTHS.values())


def test_not_an_lmdb(tmp_path):
    path = tmp_path / 'junk.lmdb'
    path.write_bytes(b'this is not an LMDB' * 100)
    with pytest.raises(UserError, match='junk.lmdb'):
        VideoLMDB(path)


# Opens each LMDB and reads every frame, printing the error of a broken one. In a child
# process: reading a truncated file past its end is a SIGBUS that would end the test run.
READ_ALL = """import sys
from dataset.lmdb_video import VideoLMDB
from utils.misc import UserError
for path in sys.argv[1:]:
    try:
        db = VideoLMDB(path)
        for name in db.names:
            db.read_bytes(name, range(db.num_frames(name)))
    except UserError as e:
        print(e, flush=True)
"""


def test_truncated_lmdb_is_an_error_not_a_crash(tmp_path):
    # A broken copy or untar: the file ends before the pages its metadata says are in use.
    # Checked on a single-file and a directory LMDB of the format and on the project's writer.
    videos = [(f'A/v_A_g0{i}_c01', jpeg_bytes(textured_frames(12, 64, 64, seed=i), quality=95))
              for i in range(1, 5)]
    write_raw_lmdb(tmp_path / 'file.lmdb', videos)
    write_raw_lmdb(tmp_path / 'dir.lmdb', videos, subdir=True)
    with LMDBWriter(tmp_path / 'writer.lmdb') as w:
        for name, jpegs in videos:
            w.put(name, jpegs)
    expected = []
    for path, data in [(tmp_path / 'file.lmdb', tmp_path / 'file.lmdb'),
                       (tmp_path / 'dir.lmdb', tmp_path / 'dir.lmdb' / 'data.mdb'),
                       (tmp_path / 'writer.lmdb', tmp_path / 'writer.lmdb')]:
        env = lmdb.open(str(path), subdir=path != data, readonly=True, lock=False)
        need = (env.info()['last_pgno'] + 1) * env.stat()['psize']
        env.close()
        full = data.stat().st_size
        assert full >= need > 16 * 4096       # whole: at least the pages in use; many of them
        assert len(VideoLMDB(path)) == 4      # and a whole file passes the check
        with open(data, 'r+b') as f:
            f.truncate(full // 2)
        expected.append(f'{data} is {full // 2} bytes but its LMDB metadata needs {need} '
                        f'(truncated? re-extract it)')
    res = subprocess.run([sys.executable, '-c', READ_ALL, str(tmp_path / 'file.lmdb'),
                          str(tmp_path / 'dir.lmdb'), str(tmp_path / 'writer.lmdb')],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, (res.returncode, res.stdout, res.stderr)  # -7: SIGBUS
    assert res.stdout.splitlines() == expected


@pytest.mark.parametrize('bad', [b'not a jpeg at all', b'\xff\xd8\xff\xe0' + b'\x00' * 40],
                         ids=['garbage', 'broken-header'])
def test_corrupt_frame_names_video_and_frame(tmp_path, bad):
    jpegs = jpeg_bytes(position_frames(4, 16, 16))
    jpegs[2] = bad
    db = VideoLMDB(write_raw_lmdb(tmp_path / 'v.lmdb', [('Cls/v_bad', jpegs)]))
    assert db.read('Cls/v_bad', [0, 1, 3]).shape == (3, 3, 16, 16)
    with pytest.raises(UserError, match=r"frame 2 of video 'Cls/v_bad'"):
        db.read('Cls/v_bad', [0, 1, 2, 3])


def test_frames_of_different_sizes(tmp_path):
    jpegs = jpeg_bytes(position_frames(2, 16, 16)) + jpeg_bytes(position_frames(1, 16, 24))
    db = VideoLMDB(write_raw_lmdb(tmp_path / 'v.lmdb', [('Cls/v_mixed', jpegs)]))
    with pytest.raises(UserError, match=r"frame 2 of video 'Cls/v_mixed'"):
        db.read('Cls/v_mixed', [0, 1, 2])


def test_frame_index_out_of_range(tmp_path, videos):
    db = VideoLMDB(write_raw_lmdb(tmp_path / 'v.lmdb', videos))
    name = 'Jump/v_Jump_g01_c01'     # 4 frames
    for bad in (4, -1):
        with pytest.raises(IndexError, match=rf"'{name}' has 4 frames, frame {bad}"):
            db.read(name, [0, bad])
    with pytest.raises(KeyError, match='Nope/v'):
        db.read('Nope/v', [0])


def test_merged_packs_unpack_to_every_jpeg_in_order():
    """A batch's per-sample byte packs merge into one (data, offsets, counts) that gives back
    every sample's JPEGs, in order (the device-decode path's transfer format)."""
    from dataset.lmdb_video import merge_packed, pack_jpegs, unpack_jpegs
    samples = [[b'\xff\xd8a', b'bc'], [b'defg'], [b'h', b'ij', b'klm']]
    data, offsets, counts = merge_packed([pack_jpegs(s) for s in samples])
    assert counts.tolist() == [2, 1, 3]
    flat = [bytes(t.tolist()) for t in unpack_jpegs(data, offsets)]
    assert flat == [j for s in samples for j in s]


# The project's codec where TorchCodec is not importable (as where it is not installed): decodes
# the JPEGs of a file, re-encodes the pixels and saves both.
WITHOUT_TORCHCODEC = """import sys
import torch
sys.modules['torchcodec'] = None            # import torchcodec now raises ImportError
from dataset.lmdb_video import decode_list, encode_frames
jpegs = torch.load(sys.argv[1])
frames = torch.stack(decode_list(jpegs))
assert 'torchcodec' not in str(decode_list.__globals__['_decode_jpeg'].__module__)
torch.save({'frames': frames, 'jpegs': encode_frames(frames, 90)}, sys.argv[2])
"""


def test_torchcodec_and_torchvision_decode_identical_pixels(tmp_path):
    # TorchCodec is what the project decodes with when it is installed (the requirements install
    # it), torchvision's codec otherwise: both give the same pixels on our JPEGs, RGB and flow,
    # and encode to the same bytes.
    from torchcodec.decoders import decode_jpeg as torchcodec_decode
    from dataset.lmdb_video import decode_list, quantize_flow
    g = torch.Generator().manual_seed(0)
    flow = quantize_flow((torch.randn(6, 2, 48, 64, generator=g) * 8).numpy())
    frames = [textured_frames(6, 48, 64, seed=1), torch.from_numpy(flow)]
    jpegs = [j for f in frames for q in (75, 95) for j in encode_frames(f, q)]
    ours = decode_list(jpegs)
    assert 'torchcodec' in decode_list.__globals__['_decode_jpeg'].__module__
    for mine, theirs, jpeg in zip(ours, torchcodec_decode(jpegs), jpegs):
        assert torch.equal(mine, theirs)
        assert torch.equal(mine, _torchvision_decode(jpeg))
    torch.save(jpegs, tmp_path / 'in.pt')
    res = subprocess.run([sys.executable, '-c', WITHOUT_TORCHCODEC, str(tmp_path / 'in.pt'),
                          str(tmp_path / 'out.pt')], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env={**os.environ, 'PYTHONPATH': str(REPO)})
    assert res.returncode == 0, res.stderr
    fallback = torch.load(tmp_path / 'out.pt')
    assert torch.equal(fallback['frames'], torch.stack(ours))
    assert fallback['jpegs'] == encode_frames(torch.stack(ours), 90)
