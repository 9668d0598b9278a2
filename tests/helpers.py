"""Shared test utilities: synthetic JPEG videos and a minimal, independent video-LMDB writer.

Import it as ``from helpers import ...``: pytest puts the tests folder on ``sys.path`` (the
folder has no ``__init__.py``), so this works with ``pytest`` and ``python -m pytest`` from any
directory; ``from tests.helpers import ...`` only where the project root is on ``sys.path``.

The writer here uses lmdb + msgpack directly (not the project's ``LMDBWriter``) so that the
reader is tested against the file format of docs/METHOD.md (Data), including the quirks of the
published tars: names stored as raw bytes (msgpack 0.6) and records inserted in an order
different from ``__order__`` (``__vlen__`` is aligned with ``__keys__``, i.e. with insertion
order).
"""
import gzip
import io
import json
import os
from pathlib import Path

import lmdb
import msgpack
import torch
from torch.utils.data import Dataset
from torchcodec.encoders import JpegEncoder


def position_frames(num_frames, height, width, flow=False):
    """uint8 ``[N, 3, H, W]`` whose content encodes position and time.

    Channel 0 is a left-to-right ramp (255 x / W at pixel centres), channel 1 a top-to-bottom ramp,
    channel 2 the frame index times 8 (constant over the frame). Smooth, so JPEG keeps it within a
    few levels. ``flow`` frames use the same content: after the same geometry an RGB and a flow
    view must match, except that a flipped flow frame has channel 0 negated (255 - x).
    """
    # Pixel i covers [i/W, (i+1)/W) of the frame: its value is 255 * its centre's position, so
    # frames of different resolutions sample the same function of relative position.
    x = ((torch.arange(width) + 0.5) * 255 / width).round().to(torch.uint8)
    y = ((torch.arange(height) + 0.5) * 255 / height).round().to(torch.uint8)
    out = torch.empty(num_frames, 3, height, width, dtype=torch.uint8)
    out[:, 0] = x[None, None, :]
    out[:, 1] = y[None, :, None]
    out[:, 2] = (torch.arange(num_frames) * 8).clamp(max=255).to(torch.uint8)[:, None, None]
    return out


def textured_frames(num_frames, height, width, seed=0):
    """uint8 ``[N, 3, H, W]`` of smooth random texture that drifts over time (realistic JPEGs)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, height // 8 + 4, width // 8 + 4, generator=g)
    fine = torch.rand(1, 3, height // 2 + 4, width // 2 + 4, generator=g)
    big = torch.nn.functional.interpolate(base, size=(height + 32, width + 32), mode='bicubic',
                                          align_corners=False)
    small = torch.nn.functional.interpolate(fine, size=(height + 32, width + 32),
                                            mode='bilinear', align_corners=False)
    img = (0.8 * big + 0.2 * small).clamp(0, 1)
    frames = []
    for t in range(num_frames):
        dy, dx = (t // 2) % 32, t % 32
        frames.append(img[0, :, dy:dy + height, dx:dx + width])
    return (torch.stack(frames) * 255).round().to(torch.uint8)


def jpeg_bytes(frames, quality=95):
    """uint8 ``[N, 3, H, W]`` -> list of JPEG byte strings (TorchCodec's libjpeg-turbo encoder)."""
    return [JpegEncoder(f.contiguous()).to_tensor(quality=quality).numpy().tobytes()
            for f in frames]


def write_raw_lmdb(path, videos, *, names_as_bytes=False, subdir=False, insertion_order=None,
                   omit=()):
    """Write a video LMDB the way the published CoCLR tars are laid out.

    ``videos``: list of ``(name, [jpeg bytes])`` in ``__order__`` order; video i is stored under
    key ``%09d % i``. ``names_as_bytes``: write as msgpack 0.6 did (``use_bin_type=False``: names
    given as bytes and the JPEG frames all stored with msgpack's raw type). ``insertion_order``:
    the order (a permutation of positions) in which the records are put, which is the order of
    ``__keys__`` and ``__vlen__``. ``omit``: metadata keys
    (e.g. ``'__order__'``) to leave out. ``subdir``: a directory environment instead of one file.
    """
    path = str(path)
    order = list(range(len(videos))) if insertion_order is None else list(insertion_order)
    assert sorted(order) == list(range(len(videos)))
    if subdir:
        os.makedirs(path, exist_ok=True)
    env = lmdb.open(path, subdir=subdir, map_size=1 << 28)
    keys, vlen = [], []
    with env.begin(write=True) as txn:
        for i in order:
            key = b'%09d' % i
            # msgpack 0.6 packed byte strings with the raw (str) type, newer with bin.
            txn.put(key, msgpack.packb(list(videos[i][1]), use_bin_type=not names_as_bytes))
            keys.append(key)
            vlen.append(len(videos[i][1]))
        names = [n.encode() if names_as_bytes else n for n, _ in videos]
        meta = {
            '__keys__': msgpack.packb(keys, use_bin_type=False),
            '__len__': msgpack.packb(len(keys)),
            '__order__': msgpack.packb(names, use_bin_type=not names_as_bytes),
            '__vlen__': msgpack.packb(vlen),
        }
        for k, v in meta.items():
            if k not in omit:
                txn.put(k.encode(), v)
    env.close()
    return path


def write_toy_dataset(root, name='toy', videos=None, *, height=40, width=48, flow=True,
                      train=None, test=None, classes=None, sources=None, quality=95):
    """A dataset folder in the layout of docs/METHOD.md (Data) under ``root/name``.

    ``videos``: ``{class/video: num_rgb_frames}``; frames are :func:`position_frames`. The flow
    LMDB (if ``flow``) holds the same content with one frame fewer per video. ``train``/``test``:
    the split lists (default: every video in both; test mode refuses a test split that shares
    videos with the train split, so give one of them there); ``classes``: ClassInd.txt lines
    (default: the sorted classes); ``sources``: video_source.json content (default: one group
    per video).
    """
    if videos is None:
        videos = {f'{c}/v_{c}_g0{g}_c01': 16 + 2 * g for c in ('Alpha', 'Beta') for g in (1, 2)}
    folder = os.path.join(str(root), name)
    os.makedirs(folder, exist_ok=True)
    rgb = [(n, jpeg_bytes(position_frames(k, height, width), quality)) for n, k in videos.items()]
    write_raw_lmdb(os.path.join(folder, f'{name}_frame.lmdb'), rgb)
    if flow:
        fl = [(n, jpeg_bytes(position_frames(k - 1, height, width, flow=True), quality))
              for n, k in videos.items()]
        write_raw_lmdb(os.path.join(folder, f'{name}_tvl1_frame.lmdb'), fl)
    if classes is None:
        classes = sorted({n.split('/')[0] for n in videos})
    with open(os.path.join(folder, 'ClassInd.txt'), 'w') as f:
        f.writelines(f'{i + 1} {c}\n' for i, c in enumerate(classes))
    for split, names in (('train', train), ('test', test)):
        names = list(videos) if names is None else names
        with open(os.path.join(folder, f'{split}_split01.csv'), 'w') as f:
            # Paths as the published CSVs have them: a prefix and a trailing slash. A video
            # missing from the LMDB gets a non-zero count (rows of count 0 are skipped).
            f.writelines(f'/data/frames/{n}/,{videos.get(n, 30)}\n' for n in names)
    if sources is None:
        sources = {n.split('/')[1].rsplit('_c', 1)[0]: i for i, n in enumerate(videos)}
    with open(os.path.join(folder, 'video_source.json'), 'w') as f:
        json.dump(sources, f)
    return folder


class ReadFrames(Dataset):
    """Reads whole videos from a :class:`dataset.VideoLMDB`; picklable for spawned workers."""

    def __init__(self, db, names):
        self.db, self.names = db, list(names)

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        name = self.names[i]
        frames = self.db.read(name, range(self.db.num_frames(name)))
        return {'frames': frames, 'pid': os.getpid()}


def dequantize_flow(frames):
    """uint8 flow frames ``[..., 3, H, W]`` (tensor) -> flow in pixels, float ``[..., 2, H, W]``:
    channels 0 and 1 map [0, 255] linearly to [-20, 20] px (docs/METHOD.md, Data)."""
    return frames[..., :2, :, :].float() * (40 / 255) - 20


def png_size(path):
    """``(width, height)`` of a PNG file, read from its IHDR chunk."""
    with open(path, 'rb') as f:
        head = f.read(24)
    assert head[:8] == b'\x89PNG\r\n\x1a\n', f'{path} is not a PNG'
    return int.from_bytes(head[16:20], 'big'), int.from_bytes(head[20:24], 'big')


def decode_with_pil(jpeg):
    """Independent decode of one JPEG with PIL -> uint8 ``[3, H, W]``."""
    from PIL import Image
    import numpy as np
    img = Image.open(io.BytesIO(jpeg)).convert('RGB')
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def coclr_reference():
    """CoCLR's checkpoint key names and shapes and the S3D/S3D-G/R50 numerical fingerprints
    (docs/METHOD.md, checkpoints), stored with the tests."""
    with gzip.open(Path(__file__).parent / 'data' / 'coclr_reference.json.gz', 'rt') as f:
        return json.load(f)
