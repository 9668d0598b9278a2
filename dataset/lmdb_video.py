"""Video LMDB in the format of the published CoCLR/CVTCL tars (docs/METHOD.md, Data): video i of
``__order__`` under key ``b'%09d' % i``; ``__vlen__`` follows ``__keys__``, *not* ``__order__``."""
import io
import os
import shutil

import lmdb
import numpy as np
import msgpack
import torch
from PIL import Image

from utils.misc import UserError

try:  # TorchCodec's JPEG codec; torchvision's (deprecated there since 0.29) without it
    from torchcodec.decoders import decode_jpeg as _decode_jpeg
    from torchcodec.encoders import JpegEncoder

    def _encode_jpeg(frame, quality):
        return JpegEncoder(frame).to_tensor(quality=quality)
except (ImportError, RuntimeError, OSError):   # not installed, or built for another PyTorch
    from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg as _encode_jpeg

    def _decode_jpeg(data, device='cpu'):
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def _to_str(x):  # msgpack 0.6 wrote names as raw bytes, newer versions as str
    return x.decode('utf-8') if isinstance(x, bytes) else str(x)


# (pid, path, inode) -> environment: LMDB allows one open environment per file and process;
# the inode tells a file replaced at the same path (a rebuilt LMDB) from the one first opened.
_ENVS = {}


def _open_env(path):
    real = os.path.realpath(path)
    key = (os.getpid(), real, os.stat(real).st_ino)
    for stale in [k for k in _ENVS if k[0] != key[0] or (k[1] == real and k != key)]:
        # inherited by a forked child (py-lmdb refuses to reopen it), or replaced
        _ENVS.pop(stale).close()
    if key not in _ENVS:
        env = lmdb.open(path, subdir=os.path.isdir(path), readonly=True, lock=False,
                        readahead=False, meminit=False, max_readers=1024)
        # A file shorter than its pages (a broken copy or untar) is memory-mapped all the same,
        # and reading past its end kills the process with SIGBUS: compare with the meta page.
        data = os.path.join(path, 'data.mdb') if os.path.isdir(path) else path
        size, need = os.path.getsize(data), (env.info()['last_pgno'] + 1) * env.stat()['psize']
        if size < need:
            env.close()
            raise UserError(f'{data} is {size} bytes but its LMDB metadata needs {need} '
                            f'(truncated? re-extract it)')
        _ENVS[key] = env
    return _ENVS[key]


class VideoLMDB:
    """One video LMDB (a directory or a file), read-only; picklable into data-loader workers."""

    def __init__(self, path):
        self.path = str(path)
        if not os.path.exists(self.path):
            raise UserError(f'video LMDB not found: {self.path}')
        try:
            env = _open_env(self.path)
        except lmdb.Error as e:
            raise UserError(f'{self.path} is not a readable LMDB ({e})') from None
        with env.begin() as txn:
            meta = {k: txn.get(k) for k in (b'__keys__', b'__order__', b'__vlen__')}
            method = txn.get(b'__flow_method__')   # written by `prepare flow`; None: not recorded
        self.flow_method = method and _to_str(msgpack.loads(method))
        missing = [k.decode() for k, v in meta.items() if v is None]
        if missing:
            raise UserError(f'{self.path}: LMDB has no {", ".join(missing)} record; it is not a '
                            f'video LMDB of the CoCLR format (docs/METHOD.md, Data), or was '
                            f'written by an interrupted run')
        frames_of_key = dict(zip((_to_str(k) for k in msgpack.loads(meta[b'__keys__'])),
                                 (int(v) for v in msgpack.loads(meta[b'__vlen__']))))
        self.names = [_to_str(n) for n in msgpack.loads(meta[b'__order__'])]
        self._index = {n: i for i, n in enumerate(self.names)}
        lost = next((i for i in range(len(self.names)) if '%09d' % i not in frames_of_key), None)
        if lost is not None:   # also where __vlen__ is shorter than __keys__
            raise UserError(f'{self.path}: video {self.names[lost]!r} (position {lost} of '
                            f'__order__) has no key {lost:09d} in __keys__ with a frame count '
                            f'in __vlen__')
        self._num_frames = [frames_of_key['%09d' % i] for i in range(len(self.names))]
        self._env = self._pid = None

    def __len__(self):
        return len(self.names)

    def __contains__(self, name):
        return name in self._index

    def __getstate__(self):
        return {**self.__dict__, '_env': None, '_pid': None}  # no LMDB handle crosses processes

    def num_frames(self, name):
        return self._num_frames[self._index[name]]

    def read_bytes(self, name, indices):
        """JPEG bytes of frames ``indices`` (any order, repeats allowed) of video ``name``."""
        key = b'%09d' % self._index[name]
        if self._env is None or self._pid != os.getpid():
            self._env, self._pid = _open_env(self.path), os.getpid()
        with self._env.begin(buffers=False) as txn:
            raw = txn.get(key)
        if raw is None:
            raise UserError(f'{self.path}: record {key.decode()} of video {name!r} is missing')
        frames = msgpack.loads(raw, raw=True)  # msgpack 0.6 stored JPEGs as raw, not bin
        bad = [int(i) for i in indices if not 0 <= int(i) < len(frames)]
        if bad:
            raise IndexError(f'{self.path}: video {name!r} has {len(frames)} frames, frame '
                             f'{bad[0]} asked')
        return [frames[int(i)] for i in indices]

    def read(self, name, indices):
        """Decoded RGB frames: uint8 tensor ``[len(indices), 3, H, W]``."""
        return decode_frames(self.read_bytes(name, indices), name, indices, self.path)


def decode_frames(jpegs, name='?', indices=None, source='?', stack=True):
    """JPEGs of one video -> ``[N, 3, H, W]`` (channels last in memory), or if not ``stack`` the
    list of ``[3, H, W]`` as decoded; a frame of another size than the first is an error."""
    imgs = decode_list(jpegs, name, indices, source)
    shapes = [tuple(im.shape[1:]) for im in imgs]
    j = next((j for j, shape in enumerate(shapes) if shape != shapes[0]), None)
    if j is not None:
        frame = indices[j] if indices is not None else j
        raise UserError(f'{source}: frame {int(frame)} of video {name!r} is {shapes[j]}, '
                        f'earlier frames {shapes[0]}')
    if not stack:
        return imgs
    # The decoder hands out channels-last images: stacked as such, with no copy.
    return torch.stack([im.permute(1, 2, 0) for im in imgs]).permute(0, 3, 1, 2)


def decode_list(jpegs, name='?', indices=None, source='?', device='cpu'):
    """JPEGs (bytes or uint8 tensors) -> list of ``[3, H, W]``, decoded in one batched call."""
    data = [b if isinstance(b, torch.Tensor) else torch.frombuffer(bytearray(b), dtype=torch.uint8)
            for b in jpegs]
    try:
        return _decode_jpeg(data, device=device)
    except RuntimeError:
        for j, d in enumerate(data):  # find which frame is broken and say so
            try:
                _decode_jpeg(d)
            except RuntimeError as e:
                frame = indices[j] if indices is not None else j
                raise UserError(f'{source}: frame {int(frame)} of video {name!r} is not a valid '
                                f'JPEG ({str(e).splitlines()[0]})') from None
        raise   # every frame decodes alone: not the data's fault


def jpeg_size(jpeg, name, source):
    """``(height, width)`` from a JPEG's header, without decoding it."""
    try:
        w, h = Image.open(io.BytesIO(jpeg), formats=('JPEG',)).size
    except OSError as e:
        raise UserError(f'{source}: a frame of video {name!r} is not a valid JPEG ({e})') from None
    return h, w


def pack_jpegs(jpegs):
    """JPEG byte strings -> (one uint8 tensor, offsets ``[N+1]``): one shared-memory block."""
    sizes = torch.tensor([0] + [len(b) for b in jpegs], dtype=torch.long)
    return torch.frombuffer(bytearray(b''.join(jpegs)), dtype=torch.uint8), sizes.cumsum(0)


def unpack_jpegs(data, offsets):
    return [data[int(a):int(b)] for a, b in zip(offsets[:-1], offsets[1:])]


def merge_packed(packed):
    """Several ``pack_jpegs`` results -> one ``(data, offsets, counts)``: a batch leaves a worker
    as three tensors, not two per sample (each costs a ~0.5 ms file-descriptor handshake)."""
    sizes = torch.cat([torch.zeros(1, dtype=torch.long)] + [o.diff() for _, o in packed])
    return (torch.cat([d for d, _ in packed]), sizes.cumsum(0),
            torch.tensor([len(o) - 1 for _, o in packed]))


def encode_frames(frames, quality=90):
    """uint8 ``[N, 3, H, W]`` -> list of JPEG byte strings."""
    return [_encode_jpeg(f, quality).numpy().tobytes() for f in frames.contiguous()]


class LMDBWriter:
    """Writes a video LMDB (one file, as the published tars) to ``<path>.tmp``; only ``close``
    writes the metadata and renames it: an interrupted run leaves no finished-looking LMDB."""

    def __init__(self, path, overwrite=False):
        self.path, self.tmp = str(path), str(path) + '.tmp'
        if os.path.exists(self.path) and not overwrite:
            raise UserError(f'{self.path} exists; remove it or pass overwrite')
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        if os.path.exists(self.tmp):   # left by an interrupted run
            os.remove(self.tmp)
        # One writer, so no lock file; no fsync per video: close() syncs once before the rename
        # that publishes the file.
        self._env = lmdb.open(self.tmp, subdir=False, map_size=1 << 30, meminit=False,
                              map_async=True, sync=False, lock=False)
        self.names, self.vlen = [], []

    def put(self, name, frames):
        """Append one video: ``frames`` is a list of JPEG byte strings in temporal order."""
        if not frames:
            raise UserError(f'video {name!r} has no frames')
        self._put(b'%09d' % len(self.names), msgpack.dumps([bytes(f) for f in frames]))
        self.names.append(name)
        self.vlen.append(len(frames))

    def put_meta(self, key, value):
        """A metadata record ``__<key>__``, e.g. ``flow_method`` (``VideoLMDB.flow_method``)."""
        self._put(f'__{key}__'.encode(), msgpack.dumps(value))

    def _put(self, key, value):
        try:
            with self._env.begin(write=True) as txn:
                txn.put(key, value)
        except lmdb.MapFullError:   # a larger map, and again
            self._env.set_mapsize(self._env.info()['map_size'] * 2)
            self._put(key, value)

    def close(self):
        self.put_meta('keys', [b'%09d' % i for i in range(len(self.names))])
        self.put_meta('len', len(self.names))
        self.put_meta('order', self.names)
        self.put_meta('vlen', self.vlen)
        self._env.sync(True)
        self._env.close()
        if os.path.isdir(self.path):
            shutil.rmtree(self.path)
        os.replace(self.tmp, self.path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:   # interrupted: nothing is published
            self._env.close()
            os.remove(self.tmp)


FLOW_BOUND = 20.0  # docs/METHOD.md, Data: flow clipped to [-20, 20] px before it becomes a byte


def quantize_flow(flow):
    """Flow in pixels, float array ``[..., 2, H, W]`` -> uint8 array ``[..., 3, H, W]``: channel 0
    horizontal, 1 vertical flow, clipped to [-20, 20] and mapped linearly to [0, 255] (0 px ->
    128); channel 2 a constant 128. NumPy: torch's thread pool costs more on frames this small."""
    scale = 255 / (2 * FLOW_BOUND)
    q = np.rint((np.clip(flow, -FLOW_BOUND, FLOW_BOUND) + FLOW_BOUND) * scale).astype(np.uint8)
    return np.concatenate([q, np.full_like(q[..., :1, :, :], 128)], axis=-3)
