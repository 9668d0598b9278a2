"""Evaluation: the views of both protocols (CoCLR's 224-pixel crops and jitter, the clean
crops), the window/crop averaging, one random train clip per gallery video, CoCLR's validation
subset, retrieval recall and its feature cache, two-stream fusion, the --test and --retrieval
jobs end to end on a tiny real dataset, and the seed README's evaluation commands (run verbatim
from eval/ and from the project root, with --data_root and small-run overrides appended).
"""
import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dataset.augment import IMAGENET_MEAN, IMAGENET_STD
from dataset.lmdb_video import LMDBWriter, encode_frames
from dataset.video_dataset import VideoDataset
from eval import clips, feature_linear_probe, finetune, main_classifier, merge_2stream_prob
from eval import retrieval
from model.classifier import LinearClassifier
from tests.test_classifier import TINY, make_tiny_dataset
from utils.checkpoint import save_checkpoint
from utils.config import parse_args
from utils.misc import UserError

PROJECT = Path(__file__).resolve().parents[1]
MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1, 1)
# Errors raised by utils/ (checkpoint loading): bad input, of the project's type once utils uses it.
LOAD_ERRORS = (FileNotFoundError, ValueError, UserError)


def position_windows(windows, frames, h, w):
    """uint8 [W, T, 3, h, w]: channel 0 = x, channel 1 = y, channel 2 = 10 * window + frame."""
    out = torch.empty(windows, frames, 3, h, w, dtype=torch.uint8)
    out[:, :, 0] = torch.arange(w, dtype=torch.uint8)
    out[:, :, 1] = torch.arange(h, dtype=torch.uint8)[:, None]
    out[:, :, 2] = (10 * torch.arange(windows)[:, None] + torch.arange(frames)).to(
        torch.uint8)[:, :, None, None]
    return out


def pixels(x):
    """Network input [W, 3, T, s, s] -> the uint8-scale pixels [W, T, 3, s, s] it came from."""
    return (x * STD + MEAN).mul(255).transpose(1, 2)


def views_of(protocol, img_dim=224, modality='rgb', legacy_flow_flip=False, seed=0):
    return clips.TestViews(SimpleNamespace(protocol=protocol, img_dim=img_dim, seed=seed,
                                           legacy_flow_flip=legacy_flow_flip,
                                           photometric_on_flow=True), modality)


def no_jitter(params):
    return {**params, 'jitter': torch.zeros_like(params['jitter'])}


# ----------------------------------------------------------------------------------------------
# Views

def test_coclr_crops_are_224_pixels_of_the_stored_frame():
    windows = position_windows(2, 3, 230, 250)          # stored frames of 230 x 250
    views = views_of('coclr')
    params = no_jitter(views.draw(10))
    # centre (3, 13), then corners: top-left, top-right, bottom-left, bottom-right
    expected = [(3, 13), (0, 0), (0, 26), (6, 0), (6, 26)]
    for i in range(10):
        top, left = expected[i % 5]
        out = pixels(views(windows, i, params))
        assert out.shape == (2, 3, 3, 224, 224)
        x = torch.arange(left, left + 224, dtype=torch.float)
        assert torch.allclose(out[:, :, 0], (x.flip(0) if i >= 5 else x).expand_as(out[:, :, 0]),
                              atol=1e-3), i
        assert torch.allclose(out[0, 0, 1, :, 0], torch.arange(top, top + 224.), atol=1e-3)
        assert torch.allclose(out[:, :, 2, 5, 5], torch.tensor([[0., 1, 2], [10, 11, 12]]),
                              atol=1e-3)
    # Then scaled to --img_dim: the same 224-pixel square, half the pixels each way.
    half = pixels(views_of('coclr', img_dim=112)(windows, 0, params))
    assert half.shape == (2, 3, 3, 112, 112)
    assert (half[0, 0, 0, 0] - (13.5 + 2 * torch.arange(112.))).abs().max() < 0.6
    # Frames under 224 pixels: crops of their short side.
    small = pixels(views_of('coclr', img_dim=32)(position_windows(1, 1, 36, 44), 2, params))
    assert small.shape == (1, 1, 3, 32, 32) and small[0, 0, 0, 0, 0] > 7   # right corner


def test_clean_crops_are_img_dim_of_the_resized_frame_and_flow_flips_negate():
    windows = position_windows(1, 2, 10, 14)
    views = views_of('clean', img_dim=6)
    assert clips.crop_offsets(10, 14, 6) == [(2, 4), (0, 0), (0, 8), (4, 0), (4, 8)]
    for i, (top, left) in enumerate(clips.crop_offsets(10, 14, 6) * 2):
        out = pixels(views(windows, i, views.draw(10)))          # clean: never jittered
        assert out.shape == (1, 2, 3, 6, 6)
        assert round(float(out[0, 0, 0, 0, 5 if i >= 5 else 0])) == left
        assert round(float(out[0, 0, 1, 0, 0])) == top
    flow = pixels(views_of('clean', 6, 'flow')(windows, 5, None))
    assert torch.allclose(flow[0, 0, 0, 0], 255 - torch.arange(9., 3, -1), atol=1e-3)
    legacy = pixels(views_of('clean', 6, 'flow', legacy_flow_flip=True)(windows, 5, None))
    assert torch.allclose(legacy[0, 0, 0, 0], torch.arange(9., 3, -1), atol=1e-3)


def test_coclr_jitter_one_draw_per_video_and_crop_with_probability_0_3():
    views = views_of('coclr', seed=3)
    draws = torch.stack([views.draw(10)['jitter'] for _ in range(400)])   # 4000 video crops
    assert abs(draws.float().mean().item() - 0.3) < 0.03
    params = views.draw(10)
    params['jitter'][:] = torch.arange(10) % 2 == 0                       # even crops jittered
    colour = torch.tensor([200, 100, 50], dtype=torch.uint8).view(1, 1, 3, 1, 1)
    flat = colour.expand(2, 2, 3, 224, 224).contiguous()
    for i in range(10):
        out = pixels(views(flat, i, params))
        changed = (out - colour).abs().amax() > 0.5
        assert bool(changed) == (i % 2 == 0), i
        # One draw for all windows and frames of the video's crop.
        assert torch.allclose(out, out[:1, :1].expand_as(out), atol=1e-4)
    f = params['factors']
    assert (f[:, :3] >= 0.8).all() and (f[:, :3] <= 1.2).all() and f[:, 3].abs().max() <= 0.1
    assert not params['gray'].any() and not params['blur'].any()
    # Seeded: the same seed draws the same jitter.
    assert torch.equal(views_of('coclr', seed=3).draw(10)['factors'],
                       views_of('coclr', seed=3).draw(10)['factors'])


class _Windows(torch.utils.data.Dataset):
    """Videos whose windows are constant images of given grey values."""
    lmdbs = {'rgb': None}
    test_windows, stored_size = 'all', False

    def __init__(self, values):
        self.values = values
        self.names = [f'v{i}' for i in range(len(values))]
        self.labels = self.sources = [0] * len(values)

    def __len__(self):
        return len(self.values)

    def read_test(self, i, test_windows, stored_size):
        v = torch.tensor(self.values[i], dtype=torch.uint8)
        return {'rgb': v.view(-1, 1, 1, 1, 1).expand(-1, 8, 3, 10, 12).clone(), 'label': 0}


def test_video_outputs_average_windows_per_crop():
    """Each video's rows are the mean over its windows, per crop, whichever videos share a batch
    (a batch may end inside a video or hold several)."""
    values = [[10, 20, 60], [200], [30, 90], [120]]       # windows per video: 3, 1, 2, 1
    videos = clips.Videos(_Windows(values), [1, 0, 3, 2])  # positions: video 1 first
    rt = SimpleNamespace(device=torch.device('cpu'), memory_format=torch.contiguous_format,
                         autocast=contextlib.nullcontext, is_main=False)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    for batch_size in (1, 2, 7, 100):
        out = clips.video_outputs(lambda x: x[:, :, 0, 0, 0], videos, views_of('clean', 8),
                                  'five', rt, SimpleNamespace(workers=0, batch_size=batch_size))
        assert out.shape == (4, 5, 3)
        for row, vals in zip(out, ([200], [10, 20, 60], [120], [30, 90])):
            expected = (sum(vals) / len(vals) / 255 - mean) / std
            assert torch.allclose(row, expected.expand(5, 3), atol=1e-5), batch_size
    acc = clips.video_accuracy(torch.tensor([[.1, .9, 0], [.8, .1, .1]]), torch.tensor([1, 2]),
                               ks=(1, 2))
    assert acc == {'top1': 50.0, 'top2': 50.0}


def test_holdout_split_keeps_groups_together():
    sources = [0, 0, 1, 1, 1, 2, 3, 3, 4, 5]
    kept, held = clips.holdout_split(sources, 0.3, seed=1)
    assert sorted(kept + held) == list(range(10)) and held
    assert not {sources[i] for i in kept} & {sources[i] for i in held}
    assert clips.holdout_split(sources, 0.3, seed=1) == (kept, held)
    assert clips.spread_indices(10, 4) == [0, 3, 6, 9] and clips.spread_indices(3, 0) == [0, 1, 2]


def test_one_random_clip_per_video_at_stored_size(tmp_path):
    """The test-mode read of CoCLR's gallery and validation: one window at a random start, as
    training draws a clip, frames as stored; every window otherwise."""
    lmdb = tmp_path / 'frames.lmdb'
    with LMDBWriter(lmdb) as out:
        for v in range(4):                                    # 30 frames, grey level 8 * t
            frames = (8 * torch.arange(30)).to(torch.uint8).view(-1, 1, 1, 1).expand(30, 3, 36, 44)
            out.put(f'A/v{v}', encode_frames(frames.contiguous(), quality=95))
    common = dict(names=[f'A/v{v}' for v in range(4)], labels=[0] * 4, sources=list(range(4)),
                  rgb_lmdb=lmdb, mode='test', seq_len=4, ds=2, img_dim=16)
    one = VideoDataset(**common, test_windows='random', stored_size=True)
    starts = []
    for _ in range(10):
        for v in range(4):
            clip = one[v]['rgb']
            assert clip.shape == (1, 4, 3, 36, 44)           # one window, stored size
            t = (clip[0, :, 0, 18, 22].float() / 8).round().long()
            assert torch.equal(t - t[0], torch.arange(4) * 2)
            starts.append(int(t[0]))
    assert min(starts) >= 0 and max(starts) < 30 - 8 and len(set(starts)) > 5
    every = VideoDataset(**common)[0]['rgb']
    assert every.shape == (8, 4, 3, 18, 22)                  # windows at step 3, short side 18
    # Frames as small as --img_dim still give whole clean crops of it (read 8/7 larger).
    big = VideoDataset(**{**common, 'img_dim': 36})[0]['rgb']
    for i in range(10):
        assert views_of('clean', 36)(big, i, None).shape == (len(big), 3, 4, 36, 36)


def test_coclr_gallery_and_validation_subset(data_root):
    args = parse_args(main_classifier.build_parser(),
                      ['--test', 'x', '--retrieval', '--dataset', 'tiny', '--data_root',
                       str(data_root), *TINY])
    gallery = clips.split_videos(args, 'train')
    assert len(gallery) == 12 and all(gallery[i]['rgb'].shape == (1, 8, 3, 36, 44)
                                      for i in range(12))
    queries = clips.split_videos(args, 'test')
    assert len(queries) == 6 and queries[0]['rgb'].shape[0] > 1     # every window
    args.protocol = 'clean'
    clean = clips.split_videos(args, 'train')[0]['rgb']      # every window, resized
    assert clean.shape[0] > 1 and clean.shape[-2:] == (37, 45)
    # Validation during finetuning: a fixed random 30% of the test split, one clip each.
    args = parse_args(main_classifier.build_parser(),
                      ['--pretrain', 'random', '--dataset', 'tiny', '--data_root',
                       str(data_root), *TINY])
    _, videos, desc = finetune.validation_videos(args, None, [0, 1])
    assert 'TEST split 1' in desc
    # CoCLR's rows of the 6 test videos (pandas' sample(frac=0.3, random_state=666)): 3 and 0.
    assert videos.names == [queries.names[3], queries.names[0]]
    batch = finetune.validation_clips([videos[0], videos[1]], args, 'rgb')   # --img_dim 32
    assert batch['clips'].shape == (2, 8, 3, 32, 32) and batch['position'].tolist() == [0, 1]


def test_coclr_validation_rows_are_pandas_sample():
    """Pinned from pandas on CoCLR's own split files: `test_split.sample(frac=0.3,
    random_state=666)` of UCF101 test split 1 (3,783 rows, none too short for 32 frames) and of
    HMDB51 test split 1 (1,523 rows after CoCLR drops 7 too short); rounding as Python's round."""
    ucf = finetune.coclr_validation_rows(3783)
    assert len(ucf) == 1135 and ucf[:6] == [2394, 387, 890, 1679, 333, 691]
    hmdb = finetune.coclr_validation_rows(1523)
    assert len(hmdb) == 457 and hmdb[:6] == [96, 267, 1494, 768, 482, 1347]
    assert finetune.coclr_validation_rows(25) == [17, 11, 22, 21, 20, 15, 0, 3]   # 7.5 -> 8
    assert finetune.coclr_validation_rows(15) == [11, 10, 8, 5]                   # 4.5 -> 4
    assert finetune.coclr_validation_rows(1) == [0]     # pandas: none; at least one here


# ----------------------------------------------------------------------------------------------
# Retrieval

def test_recall_at_k_hand_built():
    e = torch.eye(3)
    gallery = torch.stack([e[0], e[1], (e[0] + e[1]) / 2 ** 0.5, e[2]])
    gallery_labels = torch.tensor([0, 1, 2, 0])
    q2 = torch.nn.functional.normalize(e[1] + 0.1 * e[2], dim=0)
    queries, query_labels = torch.stack([e[0], q2]), torch.tensor([0, 0])
    # query 1: e0 itself first (a hit at 1); query 2: e1, the mix, then e2 (its class, third).
    assert retrieval.nearest(queries, gallery, 2).tolist() == [[0, 2], [1, 2]]
    recall = retrieval.recall_at_k(queries, query_labels, gallery, gallery_labels, ks=(1, 2, 3, 10))
    assert recall == {1: 50.0, 2: 50.0, 3: 100.0, 10: 100.0}


def test_each_set_is_centred_by_its_own_mean():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(20, 8, generator=g), torch.randn(7, 8, generator=g)
    train_labels, test_labels = torch.arange(20) % 3, torch.arange(7) % 3
    c = retrieval.center_normalize(train)
    assert torch.allclose(c.norm(dim=1), torch.ones(20)) and torch.allclose(
        retrieval.center_normalize(train + 5.0), c, atol=1e-5)
    def recall(test, train):
        return retrieval.recall_at_k(retrieval.center_normalize(test), test_labels,
                                     retrieval.center_normalize(train), train_labels)
    base, shifted = recall(test, train), recall(test - 3.0, train + 7.0)
    assert base == shifted and list(base) == [1, 5, 10, 20, 50]


# ----------------------------------------------------------------------------------------------
# End to end on the tiny dataset

@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    root = make_tiny_dataset(tmp_path_factory.mktemp('data'))
    make_tiny_dataset(root, 'ucf101')            # the seed commands name ucf101
    return root


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
    """Two pretraining checkpoints of different content, and a 3-class ft classifier."""
    from model.moco import LocalInfoNCE
    folder = tmp_path_factory.mktemp('ckpt')
    out = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        sd = LocalInfoNCE('s3d', K=16).state_dict()
        out[f'pre{seed}'] = folder / f'pre{seed}' / 'infonce.pth.tar'
        save_checkpoint({'state_dict': sd, 'epoch': seed, 'iteration': 0, 'optimizer': {},
                         'best_acc': 0.0}, out[f'pre{seed}'])
    torch.manual_seed(2)
    out['cls'] = folder / 'cls' / 'best.pth.tar'
    save_checkpoint({'state_dict': LinearClassifier('s3d', 3, 'ft').state_dict(), 'epoch': 4,
                     'iteration': 0, 'optimizer': {}, 'best_acc': 0.0}, out['cls'])
    return out


def _eval(data_root, *args):
    return main_classifier.main(['--dataset', 'tiny', '--data_root', str(data_root), *TINY,
                                 '--batch_size', '16', *args])


def test_ten_crop_test_writes_results_and_fusion(data_root, checkpoints, tmp_path, capsys):
    # Three videos (one per class), two windows each: 60 clips.
    report = _eval(data_root, '--train_what', 'ft', '--test', str(checkpoints['cls']),
                   '--ten_crop', '--output_dir', str(tmp_path), '--max_videos', '3')
    out = capsys.readouterr().out
    assert 'crops' in out and 'ten' in out
    assert 'does not record what it was trained on' in out     # saved without its args
    assert set(report['results']) == {'center', 'five', 'ten'} and report['videos'] == 3
    saved = json.loads((tmp_path / 'cls_best_tiny_split1_ten.json').read_text())
    assert saved['results'] == report['results']
    rgb = merge_2stream_prob.load_probabilities(tmp_path / 'cls_best_tiny_split1_ten_prob.pth', 'x')
    assert rgb['probs'].shape == (3, 3) and torch.allclose(rgb['probs'].sum(1), torch.ones(3))
    assert rgb['names'][0].startswith('Jump/') and rgb['labels'].tolist() == [0, 1, 2]
    # The flow stream of the same classifier shape, center crop; then late fusion.
    _eval(data_root, '--dataset', 'tiny-f', '--train_what', 'ft', '--test',
          str(checkpoints['cls']), '--center_crop', '--output_dir', str(tmp_path),
          '--max_videos', '3')
    flow = tmp_path / 'cls_best_tiny-f_split1_center_prob.pth'
    rgb_file = tmp_path / 'cls_best_tiny_split1_ten_prob.pth'
    result = merge_2stream_prob.main(['--prob1', str(rgb_file),
                                      '--prob2', str(flow), '--output', str(tmp_path / 'f.json')])
    assert result['videos'] == 3 and set(result) == {'first', 'second', 'fusion', 'videos'}
    assert json.loads((tmp_path / 'f.json').read_text())['fusion'] == result['fusion']


def save_probabilities(path, *, names, labels, probs, classes, meta):
    save_checkpoint({'names': names, 'labels': torch.tensor(labels), 'probs': probs,
                     'classes': classes, 'meta': meta}, path)


def test_fusion_aligns_and_refuses_mismatches(tmp_path):
    names = ['A/a1', 'A/a2', 'B/b1']
    p1 = torch.tensor([[.6, .4], [.45, .55], [.3, .7]])        # a2 wrong
    p2 = torch.tensor([[.6, .4], [.9, .1], [.7, .3]])           # order b1, a1, a2; b1 wrong
    save_probabilities(tmp_path / 'rgb.pth', names=names, labels=[0, 0, 1], probs=p1,
                          classes=['A', 'B'], meta={})
    save_probabilities(tmp_path / 'flow.pth', names=['B/b1', 'A/a1', 'A/a2'],
                          labels=[1, 0, 0], probs=p2, classes=['A', 'B'], meta={})
    result = merge_2stream_prob.merge(tmp_path / 'rgb.pth', tmp_path / 'flow.pth')
    # Fused: a1 [.75, .25], a2 [.575, .425], b1 [.45, .55]: all right.
    assert result['first']['top1'] == pytest.approx(200 / 3)
    assert result['second']['top1'] == pytest.approx(200 / 3)
    assert result['fusion']['top1'] == pytest.approx(100.0)
    save_probabilities(tmp_path / 'other.pth', names=['A/a1', 'A/a2', 'B/b9'],
                          labels=[0, 0, 1], probs=p1, classes=['A', 'B'], meta={})
    with pytest.raises(UserError, match=r"1 only in the first \(B/b1\); 1 only in the second "
                                         r"\(B/b9\)"):
        merge_2stream_prob.merge(tmp_path / 'rgb.pth', tmp_path / 'other.pth')
    save_probabilities(tmp_path / 'relabel.pth', names=names, labels=[0, 1, 1], probs=p1,
                          classes=['A', 'B'], meta={})
    with pytest.raises(UserError, match='different labels.*A/a2'):
        merge_2stream_prob.merge(tmp_path / 'rgb.pth', tmp_path / 'relabel.pth')
    with pytest.raises(UserError, match='the same file'):
        merge_2stream_prob.merge(tmp_path / 'rgb.pth', tmp_path / 'rgb.pth')
    for name, dataset in (('rgb2.pth', 'tiny'), ('rgb3.pth', 'tiny-2clip')):
        save_probabilities(tmp_path / name, names=names, labels=[0, 0, 1], probs=p1,
                              classes=['A', 'B'], meta={'dataset': dataset})
    with pytest.raises(UserError, match='both RGB streams'):
        merge_2stream_prob.merge(tmp_path / 'rgb2.pth', tmp_path / 'rgb3.pth')
    with pytest.raises(LOAD_ERRORS, match='no probability file .*missing.pth'):
        merge_2stream_prob.main(['--prob1', str(tmp_path / 'rgb.pth'),
                                 '--prob2', str(tmp_path / 'missing.pth')])


def test_retrieval_cache_is_keyed_by_checkpoint_content(data_root, checkpoints, tmp_path, capsys):
    cache = tmp_path / 'cache'
    common = ('--retrieval', '--dirname', str(cache), '--output_dir', str(tmp_path),
              '--max_videos', '4')
    first = _eval(data_root, '--test', str(checkpoints['pre0']), *common)
    out = capsys.readouterr().out
    # The last line: every R@k of the result file, one decimal.
    assert out.strip().splitlines()[-1] == 'retrieval tiny split1 (protocol coclr): ' + ' '.join(
        f'{k}={v:.1f}' for k, v in first['recall'].items())
    assert list(first['recall']) == ['R@1', 'R@5', 'R@10', 'R@20', 'R@50']
    assert first['protocol'] == 'coclr'
    assert first['queries'] == 4 and first['gallery'] == 4
    files = sorted(cache.iterdir())
    assert len(files) == 2                     # train and test features of checkpoint 0
    # The same checkpoint again: features come from the cache.
    again = _eval(data_root, '--test', str(checkpoints['pre0']), *common)
    assert capsys.readouterr().out.count('features: cached') == 2
    assert again['recall'] == first['recall']
    # Another checkpoint's features never come from checkpoint 0's cache.
    _eval(data_root, '--test', str(checkpoints['pre1']), *common)
    assert capsys.readouterr().out.count('features: computing') == 2
    assert len(list(cache.iterdir())) == 4
    # A byte-identical copy elsewhere is the same content: same key, cache reused.
    copy = tmp_path / 'copy' / 'infonce.pth.tar'
    copy.parent.mkdir()
    shutil.copy(checkpoints['pre0'], copy)
    _eval(data_root, '--test', str(copy), *common)
    assert capsys.readouterr().out.count('features: cached') == 2
    # The same frames read from another LMDB (--rgb_lmdb): not taken from the cache, but the
    # same features.
    lmdb = data_root / 'tiny' / 'tiny_frame.lmdb'
    moved = tmp_path / 'moved' / 'frames.lmdb'
    moved.parent.mkdir()
    (shutil.copytree if lmdb.is_dir() else shutil.copy)(lmdb, moved)
    elsewhere = _eval(data_root, '--test', str(checkpoints['pre0']), *common,
                      '--rgb_lmdb', str(moved))
    assert capsys.readouterr().out.count('features: computing') == 2
    assert elsewhere['recall'] == first['recall']
    args = parse_args(main_classifier.build_parser(),
                      ['--test', 'x', '--dataset', 'tiny', '--data_root', str(data_root), *TINY])
    queries = clips.split_videos(args, 'test')
    key, path = retrieval.cache_entry(args, 'test', 'sha256:0', queries)
    st = (lmdb / 'data.mdb' if lmdb.is_dir() else lmdb).stat()
    assert key['lmdbs'] == {'rgb': [str(lmdb.resolve()), st.st_size, st.st_mtime_ns]}
    assert path != retrieval.cache_entry(args, 'test', 'sha256:1', queries)[1]


def test_retrieval_features_are_seeded(data_root, checkpoints, tmp_path):
    """coclr: the gallery's random clips and the jitter come from --seed: a run repeats."""
    args = parse_args(main_classifier.build_parser(),
                      ['--test', str(checkpoints['pre0']), '--retrieval', '--dataset', 'tiny',
                       '--data_root', str(data_root), *TINY, '--max_videos', '4'])
    runs = []
    with clips.started(args) as rt:
        for seed, folder in ((0, 'a'), (0, 'b'), (1, 'c')):
            args.seed, args.dirname = seed, str(tmp_path / folder)
            runs.append(retrieval.features(args, rt)[3])
    for part in ('train', 'test'):
        assert torch.equal(runs[0][part]['features'], runs[1][part]['features'])
        assert not torch.allclose(runs[0][part]['features'], runs[2][part]['features'])


def test_feature_linear_probe_reuses_features(data_root, checkpoints, tmp_path, capsys):
    result = feature_linear_probe.main(
        ['--dataset', 'tiny', '--data_root', str(data_root), *TINY, '--test', 'random',
         '--dirname', str(tmp_path / 'feat'), '--output_dir', str(tmp_path), '--Cs', '0.1', '10',
         '--holdout_fraction', '0.3'])
    out = capsys.readouterr().out
    assert 'feature linear probe tiny split1: top1=' in out and result['C'] in (0.1, 10)
    assert (tmp_path / 'random_feature_probe_tiny_split1.json').is_file()
    # Retrieval of the same random network reads the probe's features.
    _eval(data_root, '--test', 'random', '--retrieval', '--dirname', str(tmp_path / 'feat'),
          '--output_dir', str(tmp_path))
    assert capsys.readouterr().out.count('features: cached') == 2


def test_bad_test_inputs(data_root, checkpoints, tmp_path):
    missing = tmp_path / 'gone.pth.tar'
    with pytest.raises(LOAD_ERRORS, match=str(missing)):
        _eval(data_root, '--test', str(missing), '--center_crop')
    with pytest.raises(LOAD_ERRORS, match=str(missing)):
        _eval(data_root, '--test', str(missing), '--retrieval')
    with pytest.raises(UserError, match='pretraining checkpoint'):
        _eval(data_root, '--train_what', 'ft', '--test', str(checkpoints['pre0']),
              '--center_crop')
    five = tmp_path / 'five.pth.tar'
    save_checkpoint({'state_dict': LinearClassifier('s3d', 5, 'ft').state_dict(), 'epoch': 0},
                    five)
    with pytest.raises(LOAD_ERRORS, match=r'final_fc\.1\.weight: \(5, 1024\) vs \(3, 1024\)'):
        _eval(data_root, '--train_what', 'ft', '--test', str(five), '--center_crop')
    # Checkpoints of flow runs judged or started on RGB (their saved --dataset says flow).
    flow_cls = tmp_path / 'flow_cls.pth.tar'
    save_checkpoint({'state_dict': LinearClassifier('s3d', 3, 'ft').state_dict(), 'epoch': 0,
                     'args': {'dataset': 'tiny-f'}}, flow_cls)
    flow_pre = tmp_path / 'flow_pre.pth.tar'
    save_checkpoint({**torch.load(checkpoints['pre0'], weights_only=True),
                     'args': {'dataset': 'tiny-f-2clip'}}, flow_pre)
    for argv in (['--train_what', 'ft', '--test', str(flow_cls), '--center_crop'],
                 ['--test', str(flow_pre), '--retrieval'],
                 ['--train_what', 'ft', '--pretrain', str(flow_pre)]):
        with pytest.raises(UserError, match=r'trained on FLOW \(--dataset tiny-f'):
            _eval(data_root, *argv, '--output_dir', str(tmp_path))
    # Another run's result of the same name in a shared --output_dir: refused before any work.
    other = tmp_path / 'shared' / 'cls_best_tiny_split1_center.json'
    other.parent.mkdir()
    other.write_text(json.dumps({'checkpoint': '/elsewhere/cls/best.pth.tar'}))
    with pytest.raises(UserError, match=r'holds the result of another checkpoint'):
        _eval(data_root, '--train_what', 'ft', '--test', str(checkpoints['cls']),
              '--center_crop', '--output_dir', str(other.parent))
    with pytest.raises(UserError, match='is a pretraining checkpoint; start a classifier from it'):
        _eval(data_root, '--resume', str(checkpoints['pre0']), '--output_dir', str(tmp_path))
    for argv in (['--test', 'random', '--center_crop'],              # random: retrieval only
                 ['--test', str(five)],                              # no crop flag
                 ['--test', str(five), '--center_crop', '--ten_crop'],
                 ['--retrieval', '--pretrain', 'random']):           # --retrieval needs --test
        with pytest.raises(SystemExit):
            _eval(data_root, *argv)
    with pytest.raises(UserError, match='one modality and one clip'):
        _eval(data_root, '--dataset', 'tiny-2clip', '--pretrain', 'random')


# ----------------------------------------------------------------------------------------------
# The seed README's evaluation commands, verbatim (placeholders filled), from eval/ and the root

SEED_FINETUNE = """CUDA_VISIBLE_DEVICES=0,1 python main_classifier.py --net s3d --dataset ucf101 \
--seq_len 32 --ds 1 --batch_size 32 --train_what ft --epochs 500 --schedule 400 450 \
--pretrain {selected_rgb_pretrained_checkpoint.pth.tar}"""
SEED_TEN_CROP = """CUDA_VISIBLE_DEVICES=0,1 python main_classifier.py --net s3d --dataset ucf101 \
--seq_len 32 --ds 1 --batch_size 32 --train_what ft --epochs 500 --schedule 400 450 \
--test {selected_rgb_finetuned_checkpoint.pth.tar} --ten_crop"""
SEED_RETRIEVAL = """CUDA_VISIBLE_DEVICES=0 python main_classifier.py --net s3d --dataset ucf101 \
--seq_len 32 --ds 1 --test {selected_rgb_pretrained_checkpoint.pth.tar} --retrieval"""


def _seed_argv(command, **paths):
    """(environment, argv after the script name) of a seed command with its placeholders set."""
    for placeholder, path in paths.items():
        command = command.replace('{%s}' % placeholder, str(path))
    words = shlex.split(command)
    env = dict(w.split('=', 1) for w in words[:words.index('python')])
    assert words[words.index('python') + 1] == 'main_classifier.py'
    return env, words[words.index('python') + 2:]


def _run_seed(command, cwd, script, extra, **paths):
    env, argv = _seed_argv(command, **paths)
    proc = subprocess.run([sys.executable, script, *argv, *extra], cwd=cwd,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_seed_commands_parse(checkpoints):
    parser = main_classifier.build_parser()
    for command, job in ((SEED_FINETUNE, 'train'), (SEED_TEN_CROP, 'test'),
                         (SEED_RETRIEVAL, 'retrieval')):
        _, argv = _seed_argv(command, **{
            'selected_rgb_pretrained_checkpoint.pth.tar': checkpoints['pre0'],
            'selected_rgb_finetuned_checkpoint.pth.tar': checkpoints['cls']})
        args = parser.parse_args(argv)
        assert main_classifier.check_args(args, parser) == job
        assert args.protocol == 'coclr' and args.net == 's3d' and args.dataset == 'ucf101'
        assert args.seq_len == 32
    # torch.distributed.launch passes --local-rank=K (older: --local_rank=K).
    for flag in ('--local-rank=1', '--local_rank=1'):
        assert parser.parse_args(argv + [flag]).local_rank == 1
    # The demo config sets only flags that exist; the command line wins over it.
    args = parse_args(parser, ['--config', str(PROJECT / 'configs' / 'demo_finetune.toml'),
                               '--pretrain', 'random', '--epochs', '1'])
    assert args.dataset == 'demo' and args.train_what == 'ft' and args.epochs == 1


def test_seed_commands_run(data_root, checkpoints, tmp_path, monkeypatch, capsys):
    """Finetune (a process started in eval/), ten-crop test of its result (a process started in
    the project root), retrieval (in this process, working directory eval/): verbatim, plus
    --data_root and small-run overrides (one iteration, 32-pixel crops, 1-3 videos per split,
    no worker processes)."""
    small = ['--data_root', str(data_root), '--img_dim', '32', '-j', '0', '--device', 'cpu']
    out = _run_seed(SEED_FINETUNE, PROJECT / 'eval', 'main_classifier.py',
                    small + ['--epochs', '1', '--iters_per_epoch', '1', '--batch_size', '2',
                             '--max_videos', '3', '--output_dir', str(tmp_path)],
                    **{'selected_rgb_pretrained_checkpoint.pth.tar': checkpoints['pre0']})
    assert 'validation: TEST split 1' in out
    (exp,) = tmp_path.glob('lincls-ft_ucf101_split1_s3d_bs2_*')
    out = _run_seed(SEED_TEN_CROP, PROJECT, 'eval/main_classifier.py',
                    small + ['--max_videos', '1', '--batch_size', '10'],
                    **{'selected_rgb_finetuned_checkpoint.pth.tar': exp / 'best.pth.tar'})
    assert 'ten' in out and (exp / 'best_ucf101_split1_ten.json').is_file()
    _, argv = _seed_argv(SEED_RETRIEVAL, **{
        'selected_rgb_pretrained_checkpoint.pth.tar': checkpoints['pre1']})
    monkeypatch.chdir(PROJECT / 'eval')
    main_classifier.main(argv + small + ['--max_videos', '3', '--output_dir', str(tmp_path)])
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith('retrieval ucf101 split1 (protocol coclr): R@1=')
