"""The built-in demo dataset: small synthetic videos whose classes differ only by motion.

``ensure_demo(data_root)`` writes ``<data_root>/demo/`` in the layout of docs/METHOD.md (Data), so
every script runs end to end without a download: 6 classes x 10 groups x 5 clips of 40-64 frames,
64 x 64 pixels. Each shows one bright object repeated on a 32-pixel lattice (any crop sees it)
on a dark background, with a look drawn per group and shared by every class: only the motion
(MoveUp/Down, OscillateHorizontal/Vertical, ZoomIn/Out) tells the class, and a horizontal flip
keeps it (mirror-symmetric shapes, uniform phases). The flow is exact, computed from the motion.
A nuisance that changes over time within every video (the frame's colour gain drifts, the
background is new blobs every frame) gives neither a class nor a video a look of its own (how far
it hides the motion from random features: docs/RESULTS.md); it does not move, so the flow is the
object's alone.
"""
import errno
import json
import math
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dataset.lmdb_video import LMDBWriter, encode_frames, quantize_flow
from dataset.splits import ucf101_splits, write_split_files
from utils.misc import UserError

NAME = 'demo'
# Alphabetical, so ClassInd.txt has the same order as a derived UCF101-style class list.
CLASSES = ('MoveDown', 'MoveUp', 'OscillateHorizontal', 'OscillateVertical', 'ZoomIn', 'ZoomOut')
GROUPS = 10          # sibling groups per class (appearance shared within a group)
CLIPS = 5            # clips per group
GROUPS_PER_SPLIT = 3  # test split k holds groups 3(k-1)+1 .. 3k, as UCF101's blocks of 7
SIZE = 64            # frames are SIZE x SIZE
TILE = 32            # the object repeats every TILE pixels in x and y (TILE divides SIZE)
FRAMES = (40, 64)    # RGB frames per video, inclusive range
SCALE = (5.0, 14.0)  # object radius in pixels (< TILE / 2); zooms sweep it, others draw it once
RGB_QUALITY, FLOW_QUALITY = 90, 95  # flow JPEGs carry numbers: keep the JPEG error small
VERSION = 7          # bump when the generator changes, so an old demo/ is not taken for new
INFO_FILE = 'demo_info.json'

# Signed distance to each shape's outline in object radii (negative inside); all mirror symmetric.
_SHAPES = {'disc': lambda u, v: np.hypot(u, v) - 1,
           'square': lambda u, v: np.maximum(np.abs(u), np.abs(v)) - 0.8,
           'diamond': lambda u, v: (np.abs(u) + np.abs(v)) / math.sqrt(2) - 0.85,
           'ring': lambda u, v: np.abs(np.hypot(u, v) - 0.7) - 0.3,
           'plus': lambda u, v: np.minimum(np.maximum(np.abs(u) - 1, np.abs(v) - 0.35),
                                           np.maximum(np.abs(u) - 0.35, np.abs(v) - 1))}
_TEXTURES = ('flat', 'stripes', 'checker', 'rings')
# Channel values: every background (blobs included) darker than every part of every object.
BACKGROUND, OBJECT, OBJECT_TEXTURE = (0, 25), (170, 255), (40, 80)
BLOBS, BLOB_LEVEL = 4, 64    # background blobs: a BLOBS x BLOBS grid of levels 0..BLOB_LEVEL
GAIN, GAIN_STEP = (0.3, 1.0), 0.1  # frame colour gain range and random-walk step (log)


@dataclass(frozen=True)
class Appearance:
    bg: np.ndarray          # 3: the flat background colour (float RGB)
    shape: str
    fg: np.ndarray          # 2 x 3 colours of the object
    fg_texture: tuple       # (kind, period in object radii, angle, phase)


@dataclass(frozen=True)
class Clip:
    name: str               # class/v_Class_gXX_cYY
    look: Appearance
    cx: np.ndarray          # [T] object centre, continuous (not wrapped)
    cy: np.ndarray
    log_scale_rate: float   # log of the per-frame scale ratio (0 unless zooming)
    log_scale: np.ndarray   # [T] log radius in pixels
    gain: np.ndarray        # [T, 3] colour gain of the whole frame, drifting (nuisance)
    blobs: np.ndarray       # [T, 3, BLOBS, BLOBS] background blobs, new every frame (nuisance)


def _appearance(rng):
    fg1 = rng.uniform(*OBJECT, 3)
    fg2 = fg1 - rng.uniform(*OBJECT_TEXTURE, 3)  # the texture's darker colour, still > BACKGROUND
    bg, shape = rng.uniform(*BACKGROUND, 3), list(_SHAPES)[rng.integers(len(_SHAPES))]
    texture = (_TEXTURES[rng.integers(len(_TEXTURES))], float(rng.uniform(0.6, 1.2)),
               float(rng.uniform(0, math.pi)), float(rng.uniform(0, 2 * math.pi)))
    return Appearance(bg=bg, shape=shape, fg=np.stack([fg1, fg2]), fg_texture=texture)


def _motion(rng, cls):
    """``cx, cy, log_scale_rate, log_scale`` of one clip of ``cls`` (Clip's fields)."""
    n = int(rng.integers(FRAMES[0], FRAMES[1] + 1))
    t = np.arange(n, dtype=np.float64)
    x0, y0 = rng.uniform(0, SIZE, 2)
    cx, cy = np.full(n, x0), np.full(n, y0)
    lo, hi = math.log(SCALE[0]), math.log(SCALE[1])
    rate, log_scale = 0.0, np.full(n, rng.uniform(lo, hi))
    if cls in ('MoveUp', 'MoveDown'):
        cy = y0 + t * rng.uniform(2, 3) * (1 if cls == 'MoveDown' else -1)  # 2-3 px a frame
    elif cls.startswith('Oscillate'):
        amp, period, phase = rng.uniform(4, 7), rng.uniform(16, 24), rng.uniform(0, 2 * math.pi)
        wave = amp * np.sin(2 * math.pi * t / period + phase)
        if cls == 'OscillateHorizontal':
            cx = x0 + wave
        else:
            cy = y0 + wave
    else:  # zooms: the log radius is a sawtooth, so each frame's size is log-uniform
        rate = (hi - lo) / rng.uniform(12, 20) * (1 if cls == 'ZoomIn' else -1)
        log_scale = lo + np.mod(rng.uniform(0, hi - lo) + rate * t, hi - lo)
    return cx, cy, rate, log_scale


def _clip(name, look, cls, rng):
    cx, cy, log_scale_rate, log_scale = _motion(rng, cls)
    n = len(cx)   # the nuisance changes within a video: no class or video has a look of its own
    walk = np.cumsum(rng.normal(0, GAIN_STEP, (n, 3)), 0) + rng.uniform(*np.log(GAIN), 3)
    gain = np.exp(np.clip(walk, *np.log(GAIN)))
    period, phase = rng.uniform(20, 60), rng.uniform(0, 2 * math.pi)
    strength = 0.5 + 0.5 * np.sin(2 * math.pi * np.arange(n) / period + phase)
    blobs = rng.uniform(0, BLOB_LEVEL, (n, 3, BLOBS, BLOBS)) * strength[:, None, None, None]
    return Clip(name, look, cx, cy, log_scale_rate, log_scale, gain, blobs)


def plan(seed=0):
    """Every clip of the demo, in LMDB order; each look (seed, group) and clip (seed, class,
    group, clip) has its own random stream."""
    looks = {g: _appearance(np.random.default_rng([seed, g])) for g in range(1, GROUPS + 1)}
    return [_clip(f'{cls}/v_{cls}_g{g:02d}_c{c:02d}', looks[g], cls,
                  np.random.default_rng([seed, label, g, c]))
            for label, cls in enumerate(CLASSES)
            for g in range(1, GROUPS + 1) for c in range(1, CLIPS + 1)]


def _pattern(texture, a, b):
    """Mixing weight in [0, 1] of a smooth pattern at coordinates (a, b)."""
    kind, period, angle, phase = texture
    if kind == 'flat':
        return np.zeros_like(a)
    u = a * math.cos(angle) + b * math.sin(angle)
    v = -a * math.sin(angle) + b * math.cos(angle)
    w = 2 * math.pi / period
    if kind == 'stripes':
        return 0.5 + 0.5 * np.sin(w * u + phase)
    if kind == 'checker':
        return 0.5 + 0.5 * np.sin(w * u + phase) * np.sin(w * v + phase)
    return 0.5 + 0.5 * np.cos(w * np.hypot(a, b) + phase)  # rings


def render(clip):
    """RGB frames (uint8 ``[T, 3, H, W]``) and exact flow (float32 ``[T-1, 2, H, W]``, pixels)
    of one clip. The scene is a torus of period TILE: offsets wrap to the nearest copy."""
    look, f32 = clip.look, np.float32
    pixels = np.arange(SIZE, dtype=f32)
    wrap = lambda d: np.mod(d + TILE / 2, TILE) - TILE / 2  # noqa: E731
    dx = wrap(pixels[None, None, :] - clip.cx[:, None, None].astype(f32))   # T x 1 x W
    dy = wrap(pixels[None, :, None] - clip.cy[:, None, None].astype(f32))   # T x H x 1
    radius = np.exp(clip.log_scale).astype(f32)[:, None, None]
    u, v = dx / radius, dy / radius
    inside = np.clip(0.5 - _SHAPES[look.shape](u, v) * radius, 0, 1)  # anti-aliased
    c0, c1 = (c.astype(f32)[:, None, None] for c in look.fg)
    fg = c0 + (c1 - c0) * _pattern(look.fg_texture, u, v)[..., None, :, :]     # T 3 H W
    bg = look.bg.astype(f32)[:, None, None] + F.interpolate(torch.from_numpy(
        clip.blobs.astype(f32)), size=(SIZE, SIZE), mode='bilinear').numpy()    # T 3 H W
    gain = clip.gain.astype(f32)[:, :, None, None]
    rgb = np.rint(gain * (bg + inside[:, None] * (fg - bg))).astype(np.uint8)
    # A point of the object moves by the centre's step plus the zoom about the centre.
    ratio = f32(math.exp(clip.log_scale_rate))
    on_object = inside[:-1] >= 0.5
    flow_x = (np.diff(clip.cx).astype(f32)[:, None, None] + (ratio - 1) * dx[:-1]) * on_object
    flow_y = (np.diff(clip.cy).astype(f32)[:, None, None] + (ratio - 1) * dy[:-1]) * on_object
    return rgb, np.stack([flow_x, flow_y], 1)


def ensure_demo(data_root, seed=0):
    """Path of ``<data_root>/demo/``, built first if missing. Safe when several processes
    (distributed ranks) call it at once: each builds a private copy and renames it into place;
    the rename fails for all but the first, and the others delete theirs."""
    folder = os.path.join(data_root, NAME)
    if not os.path.exists(folder):
        if os.environ.get('LOCAL_RANK', '0') == '0':  # said once, so a mistyped path shows
            print(f'building the demo dataset in {os.path.abspath(folder)} (first use there)',
                  flush=True)
        # A sibling of demo/, so it can be renamed into place; not tempfile.mkdtemp, whose
        # folders are private (0700): this one becomes the dataset.
        tmp = os.path.join(data_root, f'.{NAME}.tmp-{os.getpid()}-{secrets.token_hex(4)}')
        os.makedirs(tmp)
        try:
            clips = plan(seed)
            with LMDBWriter(os.path.join(tmp, f'{NAME}_frame.lmdb')) as rgb_out, \
                    LMDBWriter(os.path.join(tmp, f'{NAME}_tvl1_frame.lmdb')) as flow_out:
                for clip in clips:
                    rgb, flow = render(clip)
                    rgb_out.put(clip.name, encode_frames(torch.from_numpy(rgb), RGB_QUALITY))
                    flow_out.put(clip.name, encode_frames(torch.from_numpy(quantize_flow(flow)),
                                                          FLOW_QUALITY))
            write_split_files(tmp, ucf101_splits([c.name for c in clips], GROUPS_PER_SPLIT),
                              {c.name: len(c.cx) for c in clips})
            Path(tmp, INFO_FILE).write_text(json.dumps({
                'version': VERSION, 'seed': seed, 'classes': list(CLASSES), 'videos': len(clips),
                'size': SIZE}, indent=1))
            os.rename(tmp, folder)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (isinstance(e, OSError) and e.errno in (errno.ENOTEMPTY, errno.EEXIST)
                    and os.path.exists(folder)):  # another process renamed its copy first
                raise
    info_file = Path(folder, INFO_FILE)
    info = json.loads(info_file.read_text()) if info_file.exists() else {}  # not a demo folder
    if info.get('version') != VERSION or info.get('seed') != seed:
        raise UserError(f'{folder} is not the demo of seed {seed} by generator version {VERSION} '
                        f'({INFO_FILE}: seed {info.get("seed")}, version {info.get("version")}); '
                        f'remove it to rebuild it')
    return folder
