"""The dataset class and the cutting of its views and local clips (names: ``dataset.catalog``)."""
import torch
from torch.utils.data import Dataset, default_collate

from utils.misc import UserError
from . import augment, sampler
from .lmdb_video import VideoLMDB, decode_frames, jpeg_size, merge_packed, pack_jpegs

QUERY_SEGMENT = 0   # the local query: view 1's clip 0 (docs/METHOD.md, Local clips)


class VideoDataset(Dataset):
    """Videos of one split as clips of ``seq_len`` frames at stride ``ds``. Train items: ``'rgb'``
    and/or ``'flow'`` uint8 ``[V, T, 3, S, S]``, ``'strong'`` ``[V]``, ``'label'``, ``'source'``,
    ``'index'``, the plan, and with ``local_segments`` L the local clips the model uses,
    ``'rgb_local'``/``'flow_local'`` ``[1 + L, T/L, 3, S, S]`` (the query, then the L keys), their
    plan ``'local'`` and ``'local_strong'`` ``[1 + L]``. Test items: ``read_test``'s."""

    def __init__(self, *, names, labels, sources, rgb_lmdb=None, flow_lmdb=None, mode='train',
                 views=1, seq_len=32, ds=1, img_dim=128, strict_min_frames=False, strong_prob=0.0,
                 two_clip_prob=0.5, two_clip_strong_prob=0.3, negate_flow_flip=True,
                 crop_scale=(0.2, 1.0), crop_retry=False, decode='cpu', local_segments=0,
                 description='dataset', test_windows='all', stored_size=False, flip_prob=0.5):
        if local_segments and (mode != 'train' or views != 2 or seq_len % local_segments):
            raise UserError(f'{description}: local clips need 2 views in train mode and '
                            f'--seq_len {seq_len} divisible by --num_segments {local_segments}')
        self.mode, self.views, self.seq_len, self.ds, self.decode = mode, views, seq_len, ds, decode
        self.img_dim, self.crop_scale, self.test_windows = img_dim, crop_scale, test_windows
        self.strong_prob, self.two_clip_prob = strong_prob, two_clip_prob
        self.two_clip_strong_prob, self.negate_flow_flip = two_clip_strong_prob, negate_flow_flip
        self.local_segments, self.stored_size = local_segments, stored_size
        self.crop_retry = crop_retry
        self.flip_prob = flip_prob   # 0: the caller flips whole batches (finetuning's default)
        self.lmdbs = {m: db if isinstance(db, VideoLMDB) else VideoLMDB(db)
                      for m, db in (('rgb', rgb_lmdb), ('flow', flow_lmdb)) if db is not None}
        need = sampler.min_frames(seq_len, ds, strict_min_frames)
        lengths = [self._length(n) for n in names]
        if max(lengths) < need:
            raise UserError(f'{description}: no video has the {need} frames a clip of --seq_len '
                            f'{seq_len} at --ds {ds} needs (longest: {max(lengths)})')
        keep = [i for i, k in enumerate(lengths) if k >= need]
        self.dropped = sorted(names[i] for i, k in enumerate(lengths) if k < need)
        self.names, self.labels, self.sources = (
            [column[i] for i in keep] for column in (names, labels, sources))

    def _length(self, name):
        # Two-stream: the flow video is usually one frame shorter; use the shorter length.
        return min(db.num_frames(name) for db in self.lmdbs.values())

    def __len__(self):
        return len(self.names)

    def _pair_strong(self):
        """(two clips?, strong flags ``[2]``) of a 2-view sample (docs/METHOD.md, Augmentation)."""
        if bool(torch.rand(()) < self.two_clip_prob):
            return True, torch.rand(2) < self.two_clip_strong_prob
        strong_first = bool(torch.rand(()) < 0.5)
        return False, torch.tensor([strong_first, not strong_first])

    def _plan_geometry(self, plan, h, w, clips):
        """Crop boxes and flips of ``clips`` clips (the views, or the local clips)."""
        plan['boxes'] = torch.tensor([augment.sample_crop(
            h, w, scale=self.crop_scale, retry=self.crop_retry) for _ in range(clips)])
        plan['flips'] = torch.rand(clips) < self.flip_prob

    def _plan_local(self, item, h, w):
        """Local pair j (view 1's and 2's clip j) drawn as a 2-view sample, one clip seen twice
        being either view's clip j (augmentation_local.py); only the clips the model uses."""
        segments = item['frame_index'].unflatten(1, (self.local_segments, -1))   # 2 x L x T/L
        pairs = [self._pair_strong() for _ in range(self.local_segments)]   # (two clips?, strong)
        shown = [torch.arange(2) if two else torch.randint(2, ()).repeat(2) for two, _ in pairs]
        frames = torch.stack([segments[views, j] for j, views in enumerate(shown)])  # L x 2 x T/L
        strong = torch.stack([pair_strong for _, pair_strong in pairs])               # L x 2
        # The query (view 1's clip of its pair), then view 2's clip of every pair (the keys).
        item['local'] = {'frame_index': torch.cat([frames[QUERY_SEGMENT, :1], frames[:, 1]])}
        item['local_strong'] = torch.cat([strong[QUERY_SEGMENT, :1], strong[:, 1]])
        self._plan_geometry(item['local'], h, w, 1 + self.local_segments)

    def __getitem__(self, index):
        if self.mode == 'test':
            return self.read_test(index, self.test_windows, self.stored_size)
        name = self.names[index]
        item = {'label': self.labels[index], 'source': self.sources[index], 'index': index}
        n = self._length(name)
        if self.views == 1:
            indices = sampler.train_indices(n, self.seq_len, self.ds)[None]          # V x T
            strong = torch.rand(1) < self.strong_prob
        else:   # two clips, or one clip seen twice
            two, strong = self._pair_strong()
            clips = [sampler.train_indices(n, self.seq_len, self.ds) for _ in range(1 + two)]
            indices = torch.stack([clips[0], clips[-1]])
        unique, inverse = torch.unique(indices, return_inverse=True)   # decode each frame once
        jpegs = {m: db.read_bytes(name, unique.tolist()) for m, db in self.lmdbs.items()}
        first = next(iter(self.lmdbs))
        h, w = jpeg_size(jpegs[first][0], name, self.lmdbs[first].path)
        self._check_size(h, w, name, self.lmdbs[first].path)
        item.update(strong=strong, frame_index=inverse)
        self._plan_geometry(item, h, w, self.views)
        if self.local_segments:
            self._plan_local(item, h, w)
        if self.decode == 'device':
            # Workers only read bytes; decoding and geometry happen batched on the GPU.
            item['jpeg'] = {m: pack_jpegs(b) for m, b in jpegs.items()}
            return item
        for m, b in jpegs.items():
            frames = decode_frames(b, name, unique.tolist(), self.lmdbs[m].path, stack=False)
            item[m] = apply_views(frames, item, m, self.img_dim, self.negate_flow_flip)
            if self.local_segments:
                item[m + '_local'] = apply_views(frames, item['local'], m, self.img_dim,
                                                 self.negate_flow_flip)
        return item

    def read_test(self, index, test_windows='all', stored_size=False):
        """Video ``index`` read in test mode, whatever this dataset's mode: ``test_windows`` 'all',
        'middle' (the middle one of all) or 'random' (one, as training draws a clip); frames
        resized to a short side of ``round(img_dim * 8 / 7)`` unless ``stored_size``."""
        name = self.names[index]
        item = {'label': self.labels[index], 'source': self.sources[index], 'index': index}
        n = self._length(name)
        windows = (sampler.train_indices(n, self.seq_len, self.ds)[None] if test_windows == 'random'
                   else sampler.test_windows(n, self.seq_len, self.ds))       # W x T
        if test_windows == 'middle':
            windows = windows[len(windows) // 2][None]
        unique, inverse = torch.unique(windows, return_inverse=True)
        for m, db in self.lmdbs.items():
            frames = db.read(name, unique.tolist())
            self._check_size(*frames.shape[-2:], name, db.path)
            if not stored_size:
                frames = augment.resize_short_side(frames, round(self.img_dim * 8 / 7))
            item[m] = frames[inverse]                         # W x T x 3 x h x w
        return item

    def _check_size(self, h, w, name, source):
        if min(h, w) < self.img_dim:
            raise UserError(f'{source}: frames of {name!r} are {h}x{w}, smaller than --img_dim '
                            f'{self.img_dim}; cropping would have to upsample. Use --img_dim '
                            f'{min(h, w)} or rebuild the LMDB with larger frames')


def apply_views(frames, plan, modality, img_dim, negate_flow_flip=True, out=None):
    """Decoded unique frames (a sequence of ``[3, H, W]`` as the decoder returns them, or one
    ``[N, H, W, 3]`` tensor) -> views ``[V, T, 3, img_dim, img_dim]`` (channels last in memory,
    into ``out`` if given) by a plan (``frame_index [V, T]``, ``boxes [V, 4]``, ``flips [V]``)."""
    index = plan['frame_index']
    stacked = isinstance(frames, torch.Tensor)   # [N, H, W, 3]: frames stacked on the device
    height, width = frames.shape[1:3] if stacked else frames[0].shape[-2:]
    if out is None:
        out = augment.channels_last_empty(*index.shape, size=img_dim, device=frames[0].device)
    index_on_device = index.to(frames[0].device, non_blocking=True)
    for v, idx in enumerate(index.tolist()):
        # Only each frame's crop is copied, into one channels-last batch the resize reads as it
        # is; on the device (launches cost more than bytes) in one indexing call per view.
        t, l, h, w = augment.box_pixels(plan['boxes'][v].tolist(), height, width)
        if stacked:
            crops = frames[:, t:t + h, l:l + w][index_on_device[v]]
        else:
            crops = torch.stack([frames[i].permute(1, 2, 0)[t:t + h, l:l + w] for i in idx])
        crops = augment.resize(crops.permute(0, 3, 1, 2), (img_dim, img_dim))
        out[v] = (augment.flip_frames(crops, modality == 'flow', negate_flow_flip)
                  if plan['flips'][v] else crops)
    return out


def collate(items):
    """Default collation, except that the uint8 views keep their channels-last memory and the
    packed JPEG bytes of ``decode='device'`` are merged per modality (``merge_packed``)."""
    special = ('jpeg', 'rgb', 'flow', 'rgb_local', 'flow_local')
    batch = default_collate([{k: v for k, v in item.items() if k not in special} for item in items])
    for m in special[1:]:
        if m in items[0]:
            batch[m] = default_collate([item[m].movedim(-3, -1) for item in items]).movedim(-1, -3)
    if 'jpeg' in items[0]:
        batch['jpeg'] = {m: merge_packed([item['jpeg'][m] for item in items])
                         for m in items[0]['jpeg']}
    return batch
