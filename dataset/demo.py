"""The built-in demo dataset: small synthetic videos whose classes differ only by motion.

``ensure_demo(data_root)`` writes ``<data_root>/demo/`` in the layout of SPEC §3 (RGB and flow
LMDBs, ClassInd.txt, three UCF101-style splits, video_source.json), so every script can run
end to end on a laptop without downloading anything.

Each video shows one bright object, repeated on a 32-pixel lattice (2 x 2 copies in view, all
moving together, so that any crop the augmentation takes shows the motion), on a flat dark
background. The appearance (shape, colours, the object's mild texture) is drawn per group number
and shared by that group of every class (group 3 of MoveUp looks like group 3 of ZoomIn):
appearance says nothing about the class, even among the training videos, so a classifier cannot
score by memorising looks and has to see the motion. The class is the object's motion alone:

=====================  ==================================================================
MoveUp / MoveDown      constant vertical velocity, 2-3 px/frame, wrapping around the cell
OscillateHorizontal    x = x0 + A sin(2 pi t / P + phi), A 4-7 px, P 16-24 frames
OscillateVertical      the same along y
ZoomIn / ZoomOut       the object's scale grows (shrinks) by a constant factor per frame;
                       after a factor of 2.8 (every 12-20 frames) it restarts at the other end
=====================  ==================================================================

6 classes x 10 groups x 5 clips = 300 videos of 40-64 frames, 64 x 64 pixels; test split k holds
groups 3(k-1)+1 .. 3k (UCF101's rule with blocks of 3), group 10 is always in train. Generation
takes a few seconds on 2 CPU cores and is deterministic for a seed (the same bytes).

**Why the motion is large and the look simple.** S3D trained from scratch learns slowly, and
what it learns first does not carry over to looks it has not seen. With textured, multicoloured
objects and backgrounds and moves of 1-2 px/frame (generator version 5), a supervised S3D stayed
at chance on held-out groups for 35 epochs on the CPU. With every object brighter than its
background (the same contrast polarity in every video) and moves of 2-3 px/frame it rises far
above chance within a few hundred steps (docs/RESULTS.md, "Supervised sanity runs").

**Horizontal flips keep every class.** A flip maps x to W-1-x: vertical motion is untouched,
a zoom about (cx, cy) stays a zoom about (W-1-cx, cy) with the same rate, and a horizontal
oscillation x0 + A sin(wt + phi) becomes (W-1-x0) + A sin(wt + phi + pi), which the generator
draws just as likely (phi is uniform). There are no left/right or clockwise classes, every shape
is mirror symmetric and texture orientations are uniform, so a flipped video is a plausible
video of the same class. This matters because flip is one of the training augmentations.

**Flow is exact.** The object's points follow x_{t+1} = c_{t+1} + r (x_t - c_t) with the object
centre c and per-frame scale ratio r (1 for moves and oscillations), so flow t (frame t to t+1)
is computed from the motion, not estimated; the static background has zero flow. At a zoom's
restart the flow is the continuous zoom (the object "jumps back" there; it is one frame in
12-20). Translations wrap around the lattice cell (the scene is a torus of period ``TILE``,
which divides the frame size), and the flow is that of the torus.
"""
import errno
import json
import math
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

from dataset.lmdb_video import LMDBWriter, encode_frames, quantize_flow
from dataset.splits import group_splits, write_split_files

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
VERSION = 6          # bump when the generator changes, so an old demo/ is not taken for new
INFO_FILE = 'demo_info.json'

_SHAPES = ('disc', 'square', 'diamond', 'ring', 'plus')  # all mirror symmetric
_TEXTURES = ('flat', 'stripes', 'checker', 'rings')
# Channel values: every background darker than every part of every object.
BACKGROUND, OBJECT, OBJECT_TEXTURE = (10, 80), (170, 255), (40, 80)


@dataclass(frozen=True)
class Appearance:
    bg: np.ndarray          # 3: the flat background colour (float RGB)
    shape: str
    fg: np.ndarray          # 2 x 3 colours of the object
    fg_texture: tuple       # (kind, period in object radii, angle, phase)


@dataclass(frozen=True)
class Clip:
    name: str               # class/v_Class_gXX_cYY
    label: int
    look: Appearance
    cx: np.ndarray          # [T] object centre, continuous (not wrapped)
    cy: np.ndarray
    log_scale_rate: float   # log of the per-frame scale ratio (0 unless zooming)
    log_scale: np.ndarray   # [T] log radius in pixels

    @property
    def num_frames(self):
        return len(self.cx)


# ----------------------------------------------------------------------------- what to draw

def _texture(rng):
    """(kind, period, angle, phase) of the object's pattern, centred on the object; periods
    in object radii (>= 4 px on the smallest object)."""
    kind = _TEXTURES[rng.integers(len(_TEXTURES))]
    period, angle, phase = rng.uniform(0.6, 1.2), rng.uniform(0, math.pi), \
        rng.uniform(0, 2 * math.pi)
    return kind, float(period), float(angle), float(phase)


def _appearance(rng):
    fg1 = rng.uniform(*OBJECT, 3)
    fg2 = fg1 - rng.uniform(*OBJECT_TEXTURE, 3)  # the texture's darker colour, still > BACKGROUND
    return Appearance(bg=rng.uniform(*BACKGROUND, 3), shape=_SHAPES[rng.integers(len(_SHAPES))],
                      fg=np.stack([fg1, fg2]), fg_texture=_texture(rng))


def _motion(rng, cls, n):
    """Centre track (cx, cy), log-scale rate and log radius per frame for one clip of ``cls``."""
    t = np.arange(n, dtype=np.float64)
    x0, y0 = rng.uniform(0, SIZE, 2)
    cx, cy = np.full(n, x0), np.full(n, y0)
    lo, hi = math.log(SCALE[0]), math.log(SCALE[1])
    rate = 0.0
    log_scale = np.full(n, rng.uniform(lo, hi))
    if cls in ('MoveUp', 'MoveDown'):
        speed = rng.uniform(2, 3)
        cy = y0 + t * (speed if cls == 'MoveDown' else -speed)
    elif cls.startswith('Oscillate'):
        amp, period, phase = rng.uniform(4, 7), rng.uniform(16, 24), rng.uniform(0, 2 * math.pi)
        wave = amp * np.sin(2 * math.pi * t / period + phase)
        if cls == 'OscillateHorizontal':
            cx = x0 + wave
        else:
            cy = y0 + wave
    else:  # zooms: log radius is a sawtooth, so each frame's size is log-uniform like the others
        rate = (hi - lo) / rng.uniform(12, 20) * (1 if cls == 'ZoomIn' else -1)
        log_scale = lo + np.mod(rng.uniform(0, hi - lo) + rate * t, hi - lo)
    return cx, cy, rate, log_scale


def plan(seed=0):
    """Every clip of the demo, in LMDB order. Each appearance (seeded by seed, group) and clip
    (seed, class, group, clip) has its own random stream, so a clip does not depend on the
    others."""
    looks = {g: _appearance(np.random.default_rng([seed, g])) for g in range(1, GROUPS + 1)}
    clips = []
    for label, cls in enumerate(CLASSES):
        for g in range(1, GROUPS + 1):
            look = looks[g]
            for c in range(1, CLIPS + 1):
                rng = np.random.default_rng([seed, label, g, c])
                n = int(rng.integers(FRAMES[0], FRAMES[1] + 1))
                cx, cy, rate, log_scale = _motion(rng, cls, n)
                clips.append(Clip(name=f'{cls}/v_{cls}_g{g:02d}_c{c:02d}', label=label, look=look,
                                  cx=cx, cy=cy, log_scale_rate=rate, log_scale=log_scale))
    return clips


# ---------------------------------------------------------------------------------- drawing

def _wrap(d):
    # Offset to the nearest copy of the object on the lattice, in [-TILE/2, TILE/2).
    return np.mod(d + TILE / 2, TILE) - TILE / 2


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


def _shape_distance(shape, u, v):
    """Signed distance to the shape's outline in object radii (negative inside)."""
    if shape == 'disc':
        return np.hypot(u, v) - 1
    if shape == 'square':
        return np.maximum(np.abs(u), np.abs(v)) - 0.8
    if shape == 'diamond':
        return (np.abs(u) + np.abs(v)) / math.sqrt(2) - 0.85
    if shape == 'ring':
        return np.abs(np.hypot(u, v) - 0.7) - 0.3
    arm = np.minimum(np.maximum(np.abs(u) - 1, np.abs(v) - 0.35),
                     np.maximum(np.abs(u) - 0.35, np.abs(v) - 1))
    return arm  # plus


def render(clip):
    """RGB frames (uint8 array ``[T, 3, H, W]``) and exact flow (float32 ``[T-1, 2, H, W]``,
    pixels) of one clip."""
    look = clip.look
    f32 = np.float32
    pixels = np.arange(SIZE, dtype=f32)
    # Offsets from the object centre; x depends on (t, x) only and y on (t, y) only, so they
    # stay T x 1 x W and T x H x 1 and broadcast.
    dx = _wrap(pixels[None, None, :] - clip.cx[:, None, None].astype(f32))
    dy = _wrap(pixels[None, :, None] - clip.cy[:, None, None].astype(f32))
    radius = np.exp(clip.log_scale).astype(f32)[:, None, None]
    u, v = dx / radius, dy / radius                       # object coordinates (radii)
    inside = np.clip(0.5 - _shape_distance(look.shape, u, v) * radius, 0, 1)  # anti-aliased
    def mix(colours, weight):  # two RGB colours mixed by weight [..., H, W] -> [..., 3, H, W]
        c0, c1 = (c.astype(f32)[:, None, None] for c in colours)
        return c0 + (c1 - c0) * weight[..., None, :, :]

    fg = mix(look.fg, _pattern(look.fg_texture, u, v))                                # T 3 H W
    bg = look.bg.astype(f32)[:, None, None]                                             # 3 1 1
    rgb = np.rint(bg + inside[:, None] * (fg - bg)).astype(np.uint8)

    # A point of the object moves by the centre's step plus the zoom about the centre.
    ratio = f32(math.exp(clip.log_scale_rate))
    on_object = inside[:-1] >= 0.5
    flow_x = (np.diff(clip.cx).astype(f32)[:, None, None] + (ratio - 1) * dx[:-1]) * on_object
    flow_y = (np.diff(clip.cy).astype(f32)[:, None, None] + (ratio - 1) * dy[:-1]) * on_object
    return rgb, np.stack([flow_x, flow_y], 1)


# ---------------------------------------------------------------------------------- writing

def _required(folder):
    files = [f'{NAME}_frame.lmdb', f'{NAME}_tvl1_frame.lmdb', 'ClassInd.txt', 'video_source.json',
             INFO_FILE]
    files += [f'{s}_split{k:02d}.csv' for s in ('train', 'test') for k in (1, 2, 3)]
    return [os.path.join(folder, f) for f in files]


def _write(folder, seed):
    """Write the complete demo dataset into the (empty, private) ``folder``."""
    clips = plan(seed)
    rgb_path = os.path.join(folder, f'{NAME}_frame.lmdb')
    flow_path = os.path.join(folder, f'{NAME}_tvl1_frame.lmdb')
    with LMDBWriter(rgb_path) as rgb_out, LMDBWriter(flow_path) as flow_out:
        for clip in clips:
            rgb, flow = render(clip)
            rgb_out.put(clip.name, encode_frames(torch.from_numpy(rgb), quality=RGB_QUALITY))
            flow_out.put(clip.name, encode_frames(torch.from_numpy(quantize_flow(flow)),
                                                  quality=FLOW_QUALITY))
    names = [c.name for c in clips]
    derived = group_splits(names, groups_per_split=GROUPS_PER_SPLIT, num_splits=3)
    write_split_files(folder, derived, {c.name: c.num_frames for c in clips})
    info = {'version': VERSION, 'seed': seed, 'classes': list(CLASSES), 'videos': len(clips),
            'size': SIZE}
    with open(os.path.join(folder, INFO_FILE), 'w') as f:
        json.dump(info, f, indent=1)


def _build_aside(data_root, seed):
    """Build into a private sibling of ``demo/`` (same file system, so it can be renamed)."""
    os.makedirs(data_root, exist_ok=True)
    # Not tempfile.mkdtemp: its folders are private (0700), this one becomes the dataset.
    tmp = os.path.join(data_root, f'.{NAME}.tmp-{os.getpid()}-{secrets.token_hex(4)}')
    os.mkdir(tmp)
    try:
        _write(tmp, seed)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _check_existing(folder, seed):
    missing = [p for p in _required(folder) if not os.path.exists(p)]
    if missing:
        raise RuntimeError(f'{folder} exists but is not a complete demo dataset (no '
                           f'{os.path.basename(missing[0])}); remove it to rebuild it')
    with open(os.path.join(folder, INFO_FILE)) as f:
        info = json.load(f)
    if info.get('version') != VERSION or info.get('seed') != seed:
        raise RuntimeError(f'{folder} was built with seed {info.get("seed")} by demo generator '
                           f'version {info.get("version")}, asked: seed {seed}, version '
                           f'{VERSION}; remove it to rebuild it')


def make_demo(data_root, seed=0, overwrite=False):
    """Write ``<data_root>/demo/`` from scratch and return its path.

    The folder appears in one rename, complete. An existing one is an error unless
    ``overwrite``: then it is moved aside just before the new one is renamed in (for that
    moment there is no ``demo/``, never a partial one) and deleted."""
    folder = os.path.join(str(data_root), NAME)
    if os.path.exists(folder) and not overwrite:
        raise FileExistsError(f'{folder} exists; pass overwrite to rebuild it')
    tmp = _build_aside(str(data_root), seed)
    if os.path.exists(folder):
        old = tempfile.mkdtemp(prefix=f'.{NAME}.old-', dir=str(data_root))
        os.rename(folder, os.path.join(old, NAME))
        shutil.rmtree(old)
    try:
        os.rename(tmp, folder)
    except OSError:  # another process put a demo/ there meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def ensure_demo(data_root, seed=0):
    """Path of ``<data_root>/demo/``, built first if it does not exist.

    Safe when several processes (distributed ranks) call it at once: each builds a private
    copy and renames it into place; the rename fails for all but the first, whose copy is
    kept, and the others delete theirs. A ``demo/`` folder therefore is always complete."""
    folder = os.path.join(str(data_root), NAME)
    if not os.path.exists(folder):
        # Said aloud so that a mistyped --data_root shows, instead of a quiet new demo there.
        if os.environ.get('LOCAL_RANK', '0') == '0':  # once per machine, not once per process
            print(f'building the demo dataset in {os.path.abspath(folder)} (first use there)',
                  flush=True)
        tmp = _build_aside(str(data_root), seed)
        try:
            os.rename(tmp, folder)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    _check_existing(folder, seed)
    return folder

