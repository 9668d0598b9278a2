"""The one dataset class on a tiny dataset folder in the layout of docs/METHOD.md, Data.

Frames encode position and time (``position_frames`` of ``tests/helpers.py``): channel 0 is an x ramp,
channel 1 a y ramp, channel 2 the frame index times 8, in RGB and flow alike, so the tests can
read back which frames and which region each view holds.
"""
import os

import pytest
import torch
from torch.utils.data import DataLoader

from dataset import splits
from dataset.catalog import DatasetName, build_dataset
from dataset.video_dataset import QUERY_SEGMENT
from utils.misc import UserError
from helpers import (jpeg_bytes, png_size, position_frames, write_raw_lmdb,
                     write_toy_dataset)

SEQ, IMG = 8, 32
H, W = 40, 48
# Two classes, two sibling groups each; RGB lengths 18 and 20 (flow 17 and 19).
VIDEOS = {f'{c}/v_{c}_g0{g}_c01': 16 + 2 * g for c in ('Alpha', 'Beta') for g in (1, 2)}


@pytest.fixture(scope='module')
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    write_toy_dataset(root, 'toy', VIDEOS, height=H, width=W)
    # The same videos as a test split (a test split may share no video with its train split).
    write_toy_dataset(root, 'toytest', VIDEOS, height=H, width=W, train=[])
    return root


def build(root, name='toy-2clip', mode='train', **kw):
    kw = {'seq_len': SEQ, 'ds': 1, 'img_dim': IMG, **kw}
    return build_dataset(name, mode, data_root=root, **kw)


def frame_ids(view):
    """Frame indices shown by a view ``[T, 3, h, w]`` (channel 2 = 8 t, JPEG error < 4)."""
    return (view[:, 2].float().mean(dim=(1, 2)) / 8).round().long()


def is_flipped(view):
    """Whether a view's x ramp runs right to left."""
    x = view[0, 0].float().mean(0)
    return bool(x[-1] < x[0])


# ---------------------------------------------------------------------------------- items

@pytest.mark.parametrize('name,modalities,views', [
    ('toy-2clip', ('rgb',), 2),
    ('toy-f-2clip', ('flow',), 2),
    ('toy-2stream-2clip', ('rgb', 'flow'), 2),
    ('toy', ('rgb',), 1),
    ('toy-f', ('flow',), 1),
])
def test_train_item_shapes(root, name, modalities, views):
    data = build(root, name)
    assert len(data) == 4 and data.num_classes == 2 and data.classes == ['Alpha', 'Beta']
    for i in range(len(data)):
        item = data[i]
        assert {'label', 'source', 'index', 'strong'} <= set(item)
        assert {'rgb', 'flow', 'jpeg'} & set(item) == set(modalities)
        for m in modalities:
            assert item[m].shape == (views, SEQ, 3, IMG, IMG) and item[m].dtype == torch.uint8
        assert item['strong'].shape == (views,) and item['strong'].dtype == torch.bool
        assert item['index'] == i
        assert item['label'] == ('Beta' in data.names[i])
        # video_source.json (written by the helper) numbers the videos in order.
        assert item['source'] == list(VIDEOS).index(data.names[i])


def test_train_views_are_clips_of_the_video(root):
    data = build(root, 'toy-2clip')
    for _ in range(5):
        for i in range(len(data)):
            item = data[i]
            n = VIDEOS[data.names[i]]
            for v in range(2):
                ids = frame_ids(item['rgb'][v])
                start = int(ids[0])
                assert ids.tolist() == list(range(start, start + SEQ))
                assert 0 <= start < n - SEQ


def test_strong_weak_mix(tmp_path):
    # A 40-frame video: clip starts in [0, 32), so two independent clips rarely coincide (and
    # frame_ids, which saturate at frame 32, still tell different clips apart).
    write_toy_dataset(tmp_path, 'long', {'A/v_A_g01_c01': 40}, flow=False)
    data = build(tmp_path, 'long-2clip', img_dim=16)
    torch.manual_seed(0)
    same_clip_flags, other_flags = [], []
    for _ in range(100):
        item = data[0]
        same = torch.equal(frame_ids(item['rgb'][0]), frame_ids(item['rgb'][1]))
        (same_clip_flags if same else other_flags).append(item['strong'])
    # One clip seen twice: exactly one strong view (a different clip coincides rarely).
    one_strong = [int(f.sum()) == 1 for f in same_clip_flags]
    assert sum(one_strong) >= len(one_strong) - 3 and len(same_clip_flags) > 25
    # Two clips: each strong with probability 0.3.
    rate = torch.stack(other_flags).float().mean()
    assert 0.12 < rate < 0.5 and len(other_flags) > 25


def test_two_stream_alignment(root):
    data = build(root, 'toy-2stream-2clip')
    flips = set()
    for _ in range(6):
        for i in range(len(data)):
            item = data[i]
            n_flow = VIDEOS[data.names[i]] - 1
            for v in range(2):
                rgb, flow = item['rgb'][v].float(), item['flow'][v].float()
                # Same frames, and frames of the shorter (flow) video only.
                assert torch.equal(frame_ids(item['rgb'][v]), frame_ids(item['flow'][v]))
                assert int(frame_ids(item['flow'][v]).max()) < n_flow
                # Same region (y ramp), same flip; flipped flow has channel 0 negated.
                assert (rgb[:, 1] - flow[:, 1]).abs().mean() < 3
                flipped = is_flipped(item['rgb'][v])
                flips.add(flipped)
                if 'flips' in item:                     # the item's plan says what was done
                    assert bool(item['flips'][v]) == flipped
                expected_x = 255 - rgb[:, 0] if flipped else rgb[:, 0]
                assert (flow[:, 0] - expected_x).abs().mean() < 3
    assert flips == {False, True}


def geometry_steps(frames):
    """Mean change of the position ramps (channels 0 and 1) between consecutive frames of
    ``[T, 3, h, w]``: about 0 where two frames share a crop and flip, large where not."""
    ramps = frames[:, :2].float()
    return (ramps[1:] - ramps[:-1]).abs().mean(dim=(1, 2, 3))


@pytest.mark.parametrize('segments', [2, 4])
def test_local_clips_have_their_own_geometry(root, segments):
    data = build(root, 'toy-2clip', local_segments=segments)
    shared = build(root, 'toy-2clip')
    t = SEQ // segments
    torch.manual_seed(segments)
    inside, across, shared_steps = [], [], []
    for _ in range(5):
        for i in range(len(data)):
            item = data[i]
            assert item['rgb_local'].shape == (1 + segments, t, 3, IMG, IMG)
            assert item['rgb_local'].dtype == torch.uint8
            assert item['rgb_local'].movedim(-3, -1).is_contiguous()   # as the global views
            assert item['local_strong'].shape == (1 + segments,)
            steps = geometry_steps(item['rgb_local'].flatten(0, 1))     # the clips in a row
            boundary = torch.arange(1, (1 + segments) * t) % t == 0
            inside.append(steps[~boundary])
            across.append(steps[boundary])
            for v in range(2):
                shared_steps.append(geometry_steps(shared[i]['rgb'][v]))
    inside, across, shared_steps = (torch.cat(x) for x in (inside, across, shared_steps))
    # Inside a local clip, and anywhere in a view (the shared segments): JPEG noise only.
    assert inside.max() < 3 and shared_steps.max() < 3
    # Across a boundary between local clips: another crop (and often another flip); two
    # unflipped whole frames (a box that does not fit, ~20% of each here) look alike.
    assert across.mean() > 10 * max(inside.mean(), shared_steps.mean(), 0.1)
    assert (across > 3).float().mean() > 0.85


def test_local_clips_are_the_query_and_the_keys(root):
    """The 1 + L local clips the model uses: view 1's clip QUERY_SEGMENT (the query), then view
    2's L clips (the keys). Pair j (view 1's and view 2's clip j) drawn as one clip seen twice
    shows one view's clip j (either, p 0.5) in both, each with a crop of its own."""
    segments, q = 2, QUERY_SEGMENT
    data = build(root, 'toy-2clip', local_segments=segments)
    torch.manual_seed(0)
    keys_of_view1, keys, one_clip, pairs, own_geometry = 0, 0, 0, 0, 0
    for _ in range(20):
        for i in range(len(data)):
            item = data[i]
            views = [frame_ids(item['rgb'][v]).view(segments, -1) for v in range(2)]
            if torch.equal(views[0], views[1]):
                continue                   # one global clip: any local clip shows both views
            query, *key = (frame_ids(c) for c in item['rgb_local'])
            for j in range(segments):
                shown = [torch.equal(key[j], views[v][j]) for v in range(2)]
                assert any(shown)
                keys_of_view1 += shown[0]
                keys += 1
            pairs += 1
            if torch.equal(query, key[q]):   # the query's pair is one clip seen twice
                assert torch.equal(query, views[0][q]) or torch.equal(query, views[1][q])
                one_clip += 1
                plan = item['local']
                geometry = [(plan['boxes'][c], plan['flips'][c]) for c in (0, 1 + q)]
                own_geometry += not (torch.equal(*geometry[0]) and torch.equal(*geometry[1]))
            else:
                assert torch.equal(query, views[0][q]) and torch.equal(key[q], views[1][q])
    # A local pair is one clip seen twice with p 0.5, and then view 1's clip with p 0.5.
    assert pairs > 30 and 0.3 < one_clip / pairs < 0.7 and 0.1 < keys_of_view1 / keys < 0.4
    assert own_geometry / one_clip > 0.8


def test_local_clips_of_two_stream_stay_aligned(root):
    data = build(root, 'toy-2stream-2clip', local_segments=2)
    torch.manual_seed(0)
    flips, strong = set(), []
    for _ in range(6):
        for i in range(len(data)):
            item = data[i]
            strong.append(item['local_strong'])
            flips_planned = item['local']['flips']
            for rgb, flow, flip in zip(item['rgb_local'], item['flow_local'], flips_planned):
                assert torch.equal(frame_ids(rgb), frame_ids(flow))
                assert (rgb[:, 1].float() - flow[:, 1].float()).abs().mean() < 3
                flipped = is_flipped(rgb)
                assert bool(flip) == flipped
                flips.add(flipped)
                # A flipped flow clip has its horizontal channel negated.
                x = rgb[:, 0].float()
                expected = 255 - x if flipped else x
                assert (flow[:, 0].float() - expected).abs().mean() < 3
    assert flips == {False, True}
    # Per local clip: one clip twice (one view strong) or two clips (each strong with 0.3):
    # 0.5 * 0.5 + 0.5 * 0.3 = 0.4 of the local views are strong.
    rate = torch.stack(strong).float().mean()
    assert 0.25 < rate < 0.55


def test_local_clips_collate_and_shared_default(root):
    from dataset.video_dataset import collate
    assert not {'rgb_local', 'local_strong'} & set(build(root, 'toy-2clip')[0])
    data = build(root, 'toy-2stream-2clip', local_segments=4)
    items = [data[i] for i in range(3)]
    batch = collate(items)
    for m in ('rgb_local', 'flow_local'):
        assert batch[m].shape == (3, 1 + 4, SEQ // 4, 3, IMG, IMG)
        assert batch[m].movedim(-3, -1).is_contiguous()
        assert torch.equal(batch[m], torch.stack([it[m] for it in items]))
    assert batch['local_strong'].shape == (3, 1 + 4)
    with pytest.raises(UserError, match='divisible'):
        build(root, 'toy-2clip', local_segments=3)


def test_device_decode_gives_the_same_views(root):
    # decode='device': workers only read bytes; decoding and geometry run batched where the
    # batch goes (here the CPU). The views must be those of the default path.
    from dataset.video_dataset import collate
    from model.fast import decode_on_device
    cpu_path = build(root, 'toy-2stream-2clip')
    dev_path = build(root, 'toy-2stream-2clip', decode='device')
    expected, items = [], []
    for i in range(4):
        torch.manual_seed(i)
        expected.append(cpu_path[i])
        torch.manual_seed(i)
        items.append(dev_path[i])
        assert 'rgb' not in items[-1] and 'flow' not in items[-1]
    batch = decode_on_device(collate(items), torch.device('cpu'), IMG)
    for m in ('rgb', 'flow'):
        assert torch.equal(batch[m], torch.stack([e[m] for e in expected])), m
    assert torch.equal(batch['strong'], torch.stack([e['strong'] for e in expected]))


def test_legacy_flow_flip(root):
    data = build(root, 'toy-2stream-2clip', negate_flow_flip=False)
    for _ in range(4):
        item = data[1]
        for v in range(2):
            rgb, flow = item['rgb'][v].float(), item['flow'][v].float()
            assert (flow[:, 0] - rgb[:, 0]).abs().mean() < 3


def test_test_mode_windows(root):
    data = build(root, 'toytest', mode='test')
    assert len(data) == 4
    size = round(IMG * 8 / 7)                           # 37: the short side for test crops
    w_expected = round(W * size / H)                    # 44
    for i in range(len(data)):
        item = data[i]
        assert 'strong' not in item
        n = VIDEOS[data.names[i]]
        # Windows of 8 frames at a step of 8/2 - 1 = 3.
        starts = list(range(0, n - SEQ + 1, 3))
        assert item['rgb'].shape == (len(starts), SEQ, 3, size, w_expected)
        assert item['rgb'].dtype == torch.uint8
        ids = torch.stack([frame_ids(w) for w in item['rgb']])
        assert ids[:, 0].tolist() == starts
        assert torch.equal(ids, ids[:, :1] + torch.arange(SEQ))
    data = build(root, 'toytest-2stream-2clip', mode='test')
    item = data[3]                                      # 20 RGB, 19 flow frames: n = 19
    assert item['rgb'].shape == item['flow'].shape == (4, SEQ, 3, size, w_expected)
    assert torch.equal(torch.stack([frame_ids(w) for w in item['flow']])[:, 0],
                       torch.tensor([0, 3, 6, 9]))


def test_a_training_dataset_read_in_test_mode(root):
    """``read_test`` reads a video of any dataset as test mode does, and the dataset stays
    what it was; eval/clips.py's Videos reads so, with the dataset's own options unless given."""
    from eval.clips import Videos
    train, test = build(root, 'toy-2clip', stored_size=True), build(root, 'toytest', mode='test')
    assert train.names == test.names
    for i in range(len(train)):
        assert torch.equal(train.read_test(i)['rgb'], test[i]['rgb'])
    assert train.mode == 'train' and train[0]['rgb'].shape == (2, SEQ, 3, IMG, IMG)
    one = Videos(train, [2, 0], test_windows='random')[1]          # stored size: the dataset's
    assert one['position'] == 1 and one['rgb'].shape == (1, SEQ, 3, H, W)
    ids = frame_ids(one['rgb'][0])
    assert torch.equal(ids, ids[0] + torch.arange(SEQ))
    every = Videos(train, [2, 0], stored_size=False)[0]['rgb']
    assert torch.equal(every, test[2]['rgb'])


def test_short_videos_are_padded_or_dropped(tmp_path):
    videos = {'A/v_A_g01_c01': 5, 'A/v_A_g02_c01': 6, 'B/v_B_g01_c01': 12}
    write_toy_dataset(tmp_path, 'short', videos, flow=False)
    data = build(tmp_path, 'short')
    # min_frames(8, 1) = 6: the 5-frame video is dropped, the 6-frame one padded on the left.
    assert data.names == ['A/v_A_g02_c01', 'B/v_B_g01_c01']
    assert data.dropped == ['A/v_A_g01_c01']
    assert frame_ids(data[0]['rgb'][0]).tolist() == [0, 0, 0, 1, 2, 3, 4, 5]


# ---------------------------------------------------------------------------------- workers

def _batches(data, seed, workers=2):
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=2, shuffle=True, num_workers=workers, generator=g)
    return [b for b in loader]


def test_workers_augment_differently(tmp_path):
    # Four videos of the same frames: workers 0 and 1 get items 0 and 1 (and 2 and 3). The
    # reference seeded no per-worker randomness, so both made the same augmentation.
    write_toy_dataset(tmp_path, 'same', {f'A/v_A_g0{g}_c01': 20 for g in range(1, 5)},
                      flow=False)
    data = build(tmp_path, 'same-2clip')
    items = list(DataLoader(data, batch_size=None, num_workers=2))
    assert [it['index'] for it in items] == [0, 1, 2, 3]
    assert not torch.equal(items[0]['rgb'], items[1]['rgb'])
    assert not torch.equal(items[2]['rgb'], items[3]['rgb'])


def test_same_generator_seed_same_batches(root):
    data = build(root, 'toy-2stream-2clip')
    a, b, c = _batches(data, 5), _batches(data, 5), _batches(data, 6)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k
    assert any(not torch.equal(x['rgb'], y['rgb']) for x, y in zip(a, c))


def same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_training_loader_independent_of_workers_and_epoch_seeded(root):
    # The training loader seeds every sample: 0 or 2 (persistent) workers give the same
    # batches, epoch after epoch, and epochs differ from each other.
    from dataset.loader import TrainLoader
    data = build(root, 'toy-2stream-2clip')

    def epochs(workers):
        loader = TrainLoader(data, 2, workers, seed=3, epochs=2)
        assert loader.loader.persistent_workers == (workers > 0)
        return [list(loader.epoch(e)) for e in range(2)]

    a, b = epochs(0), epochs(2)
    for ea, eb in zip(a, b):
        assert len(ea) == 2
        same_batches(ea, eb)
    assert not all(torch.equal(x['rgb'], y['rgb']) for x, y in zip(a[0], a[1]))


def test_training_loader_streams_across_epochs_and_restarts_exactly(root):
    # One stream runs through the epochs; a resumed run (a new loader starting at epoch 2), an
    # epoch left unfinished and asked for again, or an epoch out of order all get the very
    # batches the uninterrupted stream gives. max_steps keeps the first batches of each epoch.
    from dataset.loader import TrainLoader
    data = build(root, 'toy-2clip')
    stream = TrainLoader(data, 1, 2, seed=5, epochs=4)
    assert stream.steps == 4
    whole = [list(stream.epoch(e)) for e in range(4)]
    assert len({tuple(int(b['index']) for b in epoch) for epoch in whole}) > 1   # reshuffled

    resumed = TrainLoader(data, 1, 2, seed=5, epochs=4)
    part = resumed.epoch(2)
    same_batches([next(part)], whole[2][:1])                     # left unfinished ...
    same_batches(list(resumed.epoch(2)), whole[2])               # ... and asked for again
    same_batches(list(resumed.epoch(3)), whole[3])
    same_batches(list(resumed.epoch(0)), whole[0])               # out of order

    short = TrainLoader(data, 1, 0, seed=5, epochs=4, max_steps=3)
    assert short.steps == 3
    for e in (0, 1):
        same_batches(list(short.epoch(e)), whole[e][:3])
    with pytest.raises(ValueError, match='epoch 4 is outside 0..3'):
        next(short.epoch(4))
    with pytest.raises(UserError, match='no batch of 8'):
        TrainLoader(data, 8, 0, seed=5, epochs=1)


def test_worker_views_are_channels_last_in_memory(root):
    # Views are laid out [..., H, W, 3] from the worker to the model: no transposing copy.
    from dataset.video_dataset import collate
    data = build(root, 'toy-2stream-2clip')
    items = [data[i] for i in range(2)]
    for m in ('rgb', 'flow'):
        assert items[0][m].movedim(-3, -1).is_contiguous()
    batch = collate(items)
    for m in ('rgb', 'flow'):
        assert batch[m].shape == (2, 2, SEQ, 3, IMG, IMG)
        assert batch[m].movedim(-3, -1).is_contiguous()
        assert torch.equal(batch[m], torch.stack([it[m] for it in items]))


# ---------------------------------------------------------------------------------- UCF101

def test_ucf101_splits_derived_from_names(tmp_path):
    if not hasattr(splits, 'ucf101_splits'):
        pytest.skip('dataset.splits.ucf101_splits does not exist yet')
    names = [f'{c}/v_{c}_g{g:02d}_c{k:02d}' for c in ('ApplyEyeMakeup', 'Archery')
             for g in (1, 7, 8, 15) for k in (1, 2)]
    folder = tmp_path / 'ucf101'
    folder.mkdir()
    write_raw_lmdb(folder / 'ucf101_frame.lmdb',
                   [(n, jpeg_bytes(position_frames(10, H, W))) for n in names])
    train = build(tmp_path, 'ucf101-2clip')
    test = build(tmp_path, 'ucf101', mode='test')
    test2 = build(tmp_path, 'ucf101', mode='test', split=2)
    # Split 1 tests groups 1-7, split 2 groups 8-14.
    assert test.names == [n for n in names if '_g01_' in n or '_g07_' in n]
    assert train.names == [n for n in names if '_g08_' in n or '_g15_' in n]
    assert test2.names == [n for n in names if '_g08_' in n]
    with pytest.raises(UserError, match='UCF101 has splits 1, 2 and 3, not --which_split 4'):
        build(tmp_path, 'ucf101', mode='test', split=4)
    assert train.classes == ['ApplyEyeMakeup', 'Archery']
    assert [train[i]['label'] for i in range(len(train))] == [0] * 4 + [1] * 4
    # Siblings (same class and group) share a source id, other videos do not.
    src = {n: train.sources[i] for i, n in enumerate(train.names)}
    assert src['Archery/v_Archery_g08_c01'] == src['Archery/v_Archery_g08_c02']
    assert src['Archery/v_Archery_g08_c01'] != src['Archery/v_Archery_g15_c01']
    assert src['Archery/v_Archery_g08_c01'] != src['ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01']


def write_kinetics(folder, base, lengths, modalities=('', '_tvl1')):
    """A Kinetics-style folder: one LMDB per part and modality, {train,val}_split.csv."""
    folder.mkdir(parents=True)
    for part, videos in lengths.items():
        for kind in modalities:
            write_raw_lmdb(folder / f'{base}{kind}_frame_{part}.lmdb',
                           [(n, jpeg_bytes(position_frames(k, H, W))) for n, k in videos.items()])
        (folder / f'{part}_split.csv').write_text(
            ''.join(f'{n},{k}\n' for n, k in videos.items()))


@pytest.mark.parametrize('name,modalities', [('k4-2clip', ('', '_tvl1')),
                                             ('k4-f-2clip', ('_tvl1',))])
def test_kinetics_layout(tmp_path, name, modalities):
    # Kinetics layout: <name>_frame_{train,val}.lmdb, {train,val}_split.csv, val as the test set, and
    # the stricter drop rule n <= seq_len * ds + 1 (9 frames dropped, 10 kept at seq_len 8).
    train = {'bowling/a': 9, 'bowling/b': 10, 'skiing/c': 12}
    write_kinetics(tmp_path / 'k4', 'k4', {'train': train, 'val': {'skiing/d': 14}}, modalities)
    data = build(tmp_path, name)
    assert data.names == ['bowling/b', 'skiing/c'] and data.dropped == ['bowling/a']
    assert data.classes == ['bowling', 'skiing']
    test = build(tmp_path, name.replace('-2clip', ''), mode='test')
    assert test.names == ['skiing/d'] and test.labels == [1]
    # The split files elsewhere (--split_dir), and the train LMDB named explicitly (--rgb_lmdb).
    splits_dir = tmp_path / 'k4_splits'
    splits_dir.mkdir()
    for f in ('train_split.csv', 'val_split.csv'):
        (tmp_path / 'k4' / f).rename(splits_dir / f)
    assert build(tmp_path, name, split_dir=splits_dir).names == ['bowling/b', 'skiing/c']
    if '-f' not in name:
        moved = build(tmp_path / 'nowhere', name, split_dir=splits_dir,
                      rgb_lmdb=tmp_path / 'k4' / 'k4_frame_train.lmdb')
        assert moved.names == ['bowling/b', 'skiing/c'] and moved.dropped == ['bowling/a']


def test_kinetics_split_csvs_from_split_dir(tmp_path):
    # --split_dir names the folder of every split file, Kinetics' {train,val}_split.csv too.
    train = {'bowling/a': 12, 'skiing/c': 12}
    write_kinetics(tmp_path / 'k4', 'k4', {'train': train, 'val': {'skiing/d': 14}}, ('',))
    other = tmp_path / 'other'
    other.mkdir()
    (other / 'train_split.csv').write_text('skiing/c,12\n')
    (other / 'val_split.csv').write_text('skiing/d,14\n')
    assert build(tmp_path, 'k4-2clip', split_dir=other).names == ['skiing/c']


def test_split_rows_without_frames_are_skipped(tmp_path):
    # The reference's HMDB51 CSVs list a few videos with 0 frames that are not in the LMDBs.
    folder = write_toy_dataset(tmp_path, 'toy', VIDEOS)
    csv = os.path.join(folder, 'train_split01.csv')
    with open(csv, 'a') as f:
        f.write('/data/frames/Beta/v_Beta_g09_c01/,0\n')
    assert build(tmp_path, 'toy-2clip').names == list(VIDEOS)


def test_data_root_from_environment(tmp_path, monkeypatch):
    from dataset.catalog import default_data_root
    write_toy_dataset(tmp_path, 'toy', VIDEOS)
    monkeypatch.setenv('CVTCL_DATA_ROOT', str(tmp_path))
    assert default_data_root() == tmp_path
    assert build_dataset('toy-2clip', 'train', seq_len=SEQ, img_dim=IMG).names == list(VIDEOS)


# ---------------------------------------------------------------------------------- bad input

def test_unknown_dataset_lists_known_ones(root):
    with pytest.raises(UserError, match=r'nosuch.*toy'):
        build(root, 'nosuch-2clip')


def test_split_names_absent_video(tmp_path):
    sources = {n.split('/')[1][:-4]: i for i, n in enumerate(list(VIDEOS) + ['B/v_Beta_g09_c01'])}
    write_toy_dataset(tmp_path, 'toy', VIDEOS, train=list(VIDEOS) + ['Beta/v_Beta_g09_c01'],
                      sources=sources)
    with pytest.raises(UserError, match='Beta/v_Beta_g09_c01'):
        build(tmp_path, 'toy-2clip')


def test_class_missing_from_class_index(tmp_path):
    write_toy_dataset(tmp_path, 'toy', VIDEOS, classes=['Alpha'])
    with pytest.raises(UserError, match=r"'Beta'.*ClassInd.txt"):
        build(tmp_path, 'toy-2clip')


def test_missing_video_source_entry(tmp_path):
    write_toy_dataset(tmp_path, 'toy', VIDEOS, sources={'v_Alpha_g01': 0})
    with pytest.raises(UserError, match=r'video_source.json.*v_Alpha_g02'):
        build(tmp_path, 'toy-2clip')


def test_every_video_too_short(root):
    with pytest.raises(UserError, match=r'--seq_len 32.*--ds 2'):
        build(root, 'toy-2clip', seq_len=32, ds=2)


def test_img_dim_larger_than_frames(root):
    data = build(root, 'toy-2clip', img_dim=64)
    with pytest.raises(UserError, match=r'--img_dim 64'):
        data[0]


def test_missing_lmdb(tmp_path):
    write_toy_dataset(tmp_path, 'toy', VIDEOS, flow=False)
    build(tmp_path, 'toy-2clip')
    with pytest.raises(UserError, match='toy_tvl1_frame.lmdb'):
        build(tmp_path, 'toy-2stream-2clip')
    with pytest.raises(UserError, match='elsewhere.lmdb'):
        build(tmp_path, 'toy', rgb_lmdb=tmp_path / 'elsewhere.lmdb')


def test_missing_split_file(tmp_path):
    write_toy_dataset(tmp_path, 'toy', VIDEOS)
    os.remove(tmp_path / 'toy' / 'test_split01.csv')
    with pytest.raises(UserError, match='test_split01.csv'):
        build(tmp_path, 'toy', mode='test')


def test_video_listed_twice_in_a_split(tmp_path):
    # Counted twice, a video would bias the training sampling and the test accuracy.
    names = list(VIDEOS)
    write_toy_dataset(tmp_path, 'toy', VIDEOS, train=names + [names[1]])
    with pytest.raises(UserError, match=rf"train_split01.csv:5: video '{names[1]}' is listed "
                                         rf"twice \(also on line 2\)"):
        build(tmp_path, 'toy-2clip')


def test_test_split_sharing_videos_with_train(tmp_path):
    names = list(VIDEOS)
    write_toy_dataset(tmp_path, 'toy', VIDEOS, train=names[:3], test=names[2:])
    assert build(tmp_path, 'toy-2clip').names == names[:3]   # training does not look at test
    with pytest.raises(UserError, match=rf"1 video\(s\) are in both \S*train_split01.csv and "
                                         rf"\S*test_split01.csv, e.g. '{names[2]}'"):
        build(tmp_path, 'toy', mode='test')
    # Kinetics-style: train_split.csv and val_split.csv.
    write_kinetics(tmp_path / 'k4', 'k4', {'train': {'bowling/a': 12, 'skiing/c': 12},
                                           'val': {'skiing/c': 12, 'skiing/d': 14}}, ('',))
    with pytest.raises(UserError, match=r"in both \S*train_split.csv and \S*val_split.csv, "
                                         r"e.g. 'skiing/c'"):
        build(tmp_path, 'k4', mode='test')


def test_empty_split_file(tmp_path):
    write_toy_dataset(tmp_path, 'toy', VIDEOS, train=[])
    with pytest.raises(UserError, match=r'split file \S*train_split01.csv lists no videos'):
        build(tmp_path, 'toy-2clip')


def test_empty_lmdb(tmp_path):
    write_toy_dataset(tmp_path, 'toy', {}, train=list(VIDEOS), flow=False)
    with pytest.raises(UserError, match=r'4 video\(s\) of the train split are not in '
                                         r'(\S*toy_frame.lmdb).*; \1 holds no videos'):
        build(tmp_path, 'toy-2clip')
    (tmp_path / 'ucf101').mkdir()
    write_raw_lmdb(tmp_path / 'ucf101' / 'ucf101_frame.lmdb', [])
    with pytest.raises(UserError, match=r'ucf101_frame.lmdb holds no videos'):
        build(tmp_path, 'ucf101-2clip')


def test_derived_ucf101_split_without_videos(tmp_path):
    (tmp_path / 'ucf101').mkdir()
    write_raw_lmdb(tmp_path / 'ucf101' / 'ucf101_frame.lmdb',
                   [(f'A/v_A_g{g:02d}_c01', jpeg_bytes(position_frames(10, H, W)))
                    for g in (1, 7)])
    with pytest.raises(UserError, match=r'test split 2 .* is empty: \S*ucf101_frame.lmdb has no '
                                         r'video of groups g08-g14'):
        build(tmp_path, 'ucf101', mode='test', split=2)
    with pytest.raises(UserError, match=r'train split 1 .* is empty: every video of .* is of '
                                         r'groups g01-g07'):
        build(tmp_path, 'ucf101-2clip')


@pytest.mark.parametrize('name,hint', [('okset-2clip-f', 'okset-f-2clip'),
                                       ('okset-2clip-2stream', 'okset-2stream-2clip'),
                                       ('okset-2clip-2clip', 'okset-2clip'),
                                       ('okset-f-f', 'okset-f')])
def test_misordered_suffixes_get_the_right_spelling(name, hint):
    with pytest.raises(UserError, match=rf"'{name}'.*<name>\[-f\]\[-2stream\]\[-2clip\].*"
                                         rf"use '{hint}'$"):
        DatasetName.parse(name)
    assert DatasetName.parse(hint).base == 'okset'


def test_dataset_name_grammar():
    assert DatasetName.parse('ucf101-f-2clip') == DatasetName('ucf101', False, True, 2)
    assert DatasetName.parse('ucf101-2stream-2clip') == DatasetName('ucf101', True, True, 2)
    assert DatasetName.parse('my-set-f') == DatasetName('my-set', False, True, 1)
    assert DatasetName.parse('hmdb51') == DatasetName('hmdb51', True, False, 1)
    with pytest.raises(UserError, match='exclude each other'):
        DatasetName.parse('ucf101-f-2stream')


def test_building_the_demo_says_where(tmp_path, monkeypatch, capsys):
    # A mistyped --data_root would otherwise quietly get a new demo/ of its own.
    monkeypatch.delenv('LOCAL_RANK', raising=False)
    root = tmp_path / 'typo'
    assert len(build(root, 'demo', mode='test')) == 90
    out = capsys.readouterr().out
    assert out == f'building the demo dataset in {root / "demo"} (first use there)\n'
    build(root, 'demo', mode='test')
    assert capsys.readouterr().out == ''


# ---------------------------------------------------------------------------------- preview

def test_preview_png(root, tmp_path, capsys):
    from PIL import Image
    from dataset.prepare import main
    from dataset.preview import MARK, PAD, STRONG, WEAK
    out = tmp_path / 'preview.png'
    common = ['--data_root', str(root), '--seq_len', str(SEQ), '--img_dim', str(IMG),
              '--frames', '4']
    assert main(['preview', '--dataset', 'toy-2stream-2clip', '--num', '3', '--out', str(out),
                 *common]) == 0
    # 3 samples x 2 views as rows, 4 RGB + 4 flow frames per row, with a few pixels of margin.
    size = (MARK + PAD + 8 * (IMG + PAD), PAD + 6 * (IMG + PAD))
    assert png_size(out) == size
    assert capsys.readouterr().out == f'wrote {out} ({size[0]}x{size[1]})\n'
    # Each row is marked at its left: red for a strong view, grey for a weak one.
    pixels = Image.open(out).convert('RGB')
    marks = {pixels.getpixel((0, PAD + r * (IMG + PAD) + IMG // 2)) for r in range(6)}
    assert marks and marks <= {tuple(int(c * 255 + 0.5) for c in m) for m in (STRONG, WEAK)}
    assert pixels.getpixel((0, 0)) == (255, 255, 255)
    out1 = tmp_path / 'rgb.png'
    assert main(['preview', '--dataset', 'toy', '--num', '2', '--out', str(out1), *common]) == 0
    assert png_size(out1) == (MARK + PAD + 4 * (IMG + PAD), PAD + 2 * (IMG + PAD))
