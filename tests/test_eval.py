"""Evaluation: test-time crops, the window/crop averaging, retrieval recall and its feature cache,
two-stream fusion, the --test and --retrieval modes end to end on a tiny real dataset, and the
seed README's evaluation commands (run verbatim from eval/ and from the project root, with
--data_root pointing at the test data and small-run overrides appended).
"""
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dataset.augment import IMAGENET_MEAN, IMAGENET_STD
from eval import main_classifier, merge_2stream_prob, retrieval
from eval import video_eval as ve
from eval import feature_linear_probe
from model.classifier import LinearClassifier
from tests.test_classifier import TINY, make_tiny_dataset
from utils.checkpoint import save_checkpoint
from utils.config import parse_args

PROJECT = Path(__file__).resolve().parents[1]


def position_frames(n, h, w):
    """uint8 [n, 3, h, w]: channel 0 = x, channel 1 = y, channel 2 = frame index."""
    out = torch.empty(n, 3, h, w, dtype=torch.uint8)
    out[:, 0] = torch.arange(w, dtype=torch.uint8)[None, None, :]
    out[:, 1] = torch.arange(h, dtype=torch.uint8)[None, :, None]
    out[:, 2] = torch.arange(n, dtype=torch.uint8)[:, None, None]
    return out


# ----------------------------------------------------------------------------------------------
# Crops

def test_crop_offsets_and_shapes():
    assert ve.crop_offsets(10, 14, 6) == [(2, 4), (0, 0), (0, 8), (4, 0), (4, 8)]
    frames = position_frames(4, 10, 14)[None].repeat(3, 1, 1, 1, 1)    # W=3 x T=4 x 3 x 10 x 14
    for crops, n in (('center', 1), ('five', 5), ('ten', 10)):
        out = ve.take_crops(frames, 6, crops)
        assert out.shape == (n, 3, 4, 3, 6, 6) and out.dtype == torch.uint8
    ten = ve.take_crops(frames, 6, 'ten')
    for i, (top, left) in enumerate(ve.crop_offsets(10, 14, 6)):
        assert int(ten[i, 0, 0, 0, 0, 0]) == left and int(ten[i, 0, 0, 1, 0, 0]) == top
        # The flipped copy: the same crop mirrored (x runs right to left).
        assert torch.equal(ten[5 + i], ten[i].flip(-1))
        assert int(ten[5 + i, 0, 0, 0, 0, 0]) == left + 5
    assert torch.equal(ten[:, :, :, 2], frames[:, :, 2, :6, :6].expand(10, -1, -1, -1, -1))
    with pytest.raises(ValueError, match='crop of 12 pixels'):
        ve.take_crops(frames, 12, 'center')


def test_flow_crops_negate_horizontal_flow_when_flipped():
    frames = position_frames(2, 8, 8)[None]
    flow = ve.take_crops(frames, 8, 'ten', is_flow=True)
    assert torch.equal(flow[5, :, :, 0], 255 - frames.flip(-1)[:, :, 0])
    assert torch.equal(flow[5, :, :, 1:], frames.flip(-1)[:, :, 1:])
    legacy = ve.take_crops(frames, 8, 'ten', is_flow=True, negate_flow=False)
    assert torch.equal(legacy[5], frames.flip(-1))


class _Windows(torch.utils.data.Dataset):
    """Videos whose windows are constant images of given grey values."""

    def __init__(self, values):
        self.values = values

    def __len__(self):
        return len(self.values)

    def __getitem__(self, i):
        v = torch.tensor(self.values[i], dtype=torch.uint8)
        return {'rgb': v.view(-1, 1, 1, 1, 1).expand(-1, 8, 3, 10, 12).clone(), 'label': 0}


def test_video_outputs_average_windows_per_crop():
    values = [[10, 20, 60], [200]]                        # video 0: 3 windows, video 1: one
    videos = ve.Videos(_Windows(values), [1, 0])          # positions: video 1 first
    out = ve.video_outputs(lambda x: x[:, :, 0, 0, 0], videos, modality='rgb', img_dim=8,
                           crops='five', device=torch.device('cpu'), batch_size=4, workers=0,
                           show_progress=False)
    assert out.shape == (2, 5, 3)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    for row, vals in zip(out, ([200], [10, 20, 60])):
        expected = (sum(vals) / len(vals) / 255 - mean) / std
        assert torch.allclose(row, expected.expand(5, 3), atol=1e-5)


def test_clip_batcher_fills_batches_across_videos():
    sizes = []

    def fn(x):
        sizes.append(len(x))
        return x * 10

    batcher = ve.ClipBatcher(fn, 4)
    done = []
    for key, n in (('a', 3), ('b', 1), ('c', 6), ('d', 2)):
        done += batcher.add(key, torch.full((n, 1), float(ord(key))))
    done += batcher.finish()
    assert sizes == [4, 4, 4]
    assert [(k, v.flatten().tolist()) for k, v in done] == [
        ('a', [970.0] * 3), ('b', [980.0]), ('c', [990.0] * 6), ('d', [1000.0] * 2)]

def test_crop_summaries():
    probs = torch.rand(4, 10, 6)
    s = ve.crop_summaries(probs, 'ten')
    assert torch.equal(s['center'], probs[:, 0])
    assert torch.allclose(s['five'], probs[:, :5].mean(1))
    assert torch.allclose(s['ten'], probs.mean(1))
    assert set(ve.crop_summaries(probs[:, :5], 'five')) == {'center', 'five'}
    acc = ve.video_accuracy(torch.tensor([[.1, .9, 0], [.8, .1, .1]]), torch.tensor([1, 2]),
                            ks=(1, 2))
    assert acc == {'top1': 50.0, 'top2': 50.0}


def test_holdout_split_keeps_groups_together():
    sources = [0, 0, 1, 1, 1, 2, 3, 3, 4, 5]
    kept, held = ve.holdout_split(sources, 0.3, seed=1)
    assert sorted(kept + held) == list(range(10)) and held
    assert not {sources[i] for i in kept} & {sources[i] for i in held}
    assert ve.holdout_split(sources, 0.3, seed=1) == (kept, held)
    assert ve.spread_indices(10, 4) == [0, 3, 6, 9] and ve.spread_indices(3, 0) == [0, 1, 2]


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
    base = retrieval.retrieval_recall(test, test_labels, train, train_labels)
    shifted = retrieval.retrieval_recall(test - 3.0, test_labels, train + 7.0, train_labels)
    assert base == shifted and list(base) == [1, 5, 10, 20, 50]
    assert retrieval.recall_line('ucf101', 1, {1: 12.345, 5: 50.0}) == \
        'retrieval ucf101 split1: R@1=12.3 R@5=50.0'


def test_neighbour_grid_borders():
    q = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    n = torch.full((2, 5, 3, 4, 4), 100, dtype=torch.uint8)
    correct = torch.tensor([[True, False, True, True, True], [False] * 5])
    img = retrieval.neighbour_grid(q, n, correct, border=1, gap=2)
    tile = 6
    assert img.shape == (3, 2 * tile + 3 * 2, 6 * tile + 8 * 2)
    first = 2 + tile + 2 * 2               # left of the first neighbour (after a double gap)
    assert img[:, 2, first].tolist() == list(retrieval.GREEN)
    assert img[:, 2, first + tile + 2].tolist() == list(retrieval.RED)
    assert img[:, 2, 2].tolist() == list(retrieval.WHITE)
    assert img[:, 3, first + 1].tolist() == [100, 100, 100]


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
    rgb = ve.load_probabilities(tmp_path / 'cls_best_tiny_split1_ten_prob.pth')
    assert rgb['probs'].shape == (3, 3) and torch.allclose(rgb['probs'].sum(1), torch.ones(3))
    assert rgb['names'][0].startswith('Jump/') and rgb['labels'].tolist() == [0, 1, 2]
    # The flow stream of the same classifier shape, center crop; then late fusion.
    _eval(data_root, '--dataset', 'tiny-f', '--train_what', 'ft', '--test',
          str(checkpoints['cls']), '--center_crop', '--output_dir', str(tmp_path),
          '--max_videos', '3')
    flow = tmp_path / 'cls_best_tiny-f_split1_center_prob.pth'
    result = merge_2stream_prob.main(['--prob1', str(tmp_path / 'cls_best_tiny_split1_ten_prob.pth'),
                                      '--prob2', str(flow), '--output', str(tmp_path / 'f.json')])
    assert result['videos'] == 3 and set(result) == {'first', 'second', 'fusion', 'videos'}
    assert json.loads((tmp_path / 'f.json').read_text())['fusion'] == result['fusion']


def test_fusion_aligns_and_refuses_mismatches(tmp_path):
    names = ['A/a1', 'A/a2', 'B/b1']
    p1 = torch.tensor([[.6, .4], [.45, .55], [.3, .7]])        # a2 wrong
    p2 = torch.tensor([[.6, .4], [.9, .1], [.7, .3]])           # order b1, a1, a2; b1 wrong
    ve.save_probabilities(tmp_path / 'rgb.pth', names=names, labels=[0, 0, 1], probs=p1,
                          classes=['A', 'B'], meta={})
    ve.save_probabilities(tmp_path / 'flow.pth', names=['B/b1', 'A/a1', 'A/a2'],
                          labels=[1, 0, 0], probs=p2, classes=['A', 'B'], meta={})
    result = merge_2stream_prob.merge(tmp_path / 'rgb.pth', tmp_path / 'flow.pth')
    # Fused: a1 [.75, .25], a2 [.575, .425], b1 [.45, .55]: all right.
    assert result['first']['top1'] == pytest.approx(200 / 3)
    assert result['second']['top1'] == pytest.approx(200 / 3)
    assert result['fusion']['top1'] == pytest.approx(100.0)
    assert torch.allclose(merge_2stream_prob.fuse(p1, p1), p1)
    ve.save_probabilities(tmp_path / 'other.pth', names=['A/a1', 'A/a2', 'B/b9'],
                          labels=[0, 0, 1], probs=p1, classes=['A', 'B'], meta={})
    with pytest.raises(ValueError, match=r"1 only in the first \(B/b1\); 1 only in the second "
                                         r"\(B/b9\)"):
        merge_2stream_prob.merge(tmp_path / 'rgb.pth', tmp_path / 'other.pth')
    ve.save_probabilities(tmp_path / 'relabel.pth', names=names, labels=[0, 1, 1], probs=p1,
                          classes=['A', 'B'], meta={})
    with pytest.raises(ValueError, match='different labels.*A/a2'):
        merge_2stream_prob.merge(tmp_path / 'rgb.pth', tmp_path / 'relabel.pth')
    with pytest.raises(ValueError, match='the same file'):
        merge_2stream_prob.merge(tmp_path / 'rgb.pth', tmp_path / 'rgb.pth')
    for name, dataset in (('rgb2.pth', 'tiny'), ('rgb3.pth', 'tiny-2clip')):
        ve.save_probabilities(tmp_path / name, names=names, labels=[0, 0, 1], probs=p1,
                              classes=['A', 'B'], meta={'dataset': dataset})
    with pytest.raises(ValueError, match='both RGB streams'):
        merge_2stream_prob.merge(tmp_path / 'rgb2.pth', tmp_path / 'rgb3.pth')
    with pytest.raises(SystemExit, match='no probability file .*missing.pth'):
        merge_2stream_prob.main(['--prob1', str(tmp_path / 'rgb.pth'),
                                 '--prob2', str(tmp_path / 'missing.pth')])


def test_retrieval_cache_is_keyed_by_checkpoint_content(data_root, checkpoints, tmp_path, capsys):
    cache = tmp_path / 'cache'
    common = ('--retrieval', '--dirname', str(cache), '--output_dir', str(tmp_path),
              '--max_videos', '4')
    first = _eval(data_root, '--test', str(checkpoints['pre0']), *common, '--visualize', '2')
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith('retrieval tiny split1: R@1=')
    assert first['queries'] == 4 and first['gallery'] == 4
    assert (tmp_path / 'pre0_infonce_retrieval_tiny_split1_top5.png').is_file()
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
    key = retrieval.cache_key(args, 'test', 'sha256:0', retrieval.split_videos(args, 'test'))
    assert key['lmdbs'] == {'rgb': retrieval.lmdb_identity(lmdb)}
    assert retrieval.cache_file(cache, key) != retrieval.cache_file(
        cache, {**key, 'weights': 'sha256:1'})


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
    with pytest.raises(FileNotFoundError, match=str(missing)):
        _eval(data_root, '--test', str(missing), '--center_crop')
    with pytest.raises(FileNotFoundError, match=str(missing)):
        _eval(data_root, '--test', str(missing), '--retrieval')
    with pytest.raises(SystemExit, match='pretraining checkpoint'):
        _eval(data_root, '--train_what', 'ft', '--test', str(checkpoints['pre0']),
              '--center_crop')
    five = tmp_path / 'five.pth.tar'
    save_checkpoint({'state_dict': LinearClassifier('s3d', 5, 'ft').state_dict(), 'epoch': 0},
                    five)
    with pytest.raises(ValueError, match=r'final_fc\.1\.weight: \(5, 1024\) vs \(3, 1024\)'):
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
        with pytest.raises(ValueError, match=r'trained on FLOW \(--dataset tiny-f'):
            _eval(data_root, *argv, '--output_dir', str(tmp_path))
    # Another run's result of the same name in a shared --output_dir: refused before any work.
    other = tmp_path / 'shared' / 'cls_best_tiny_split1_center.json'
    other.parent.mkdir()
    other.write_text(json.dumps({'checkpoint': '/elsewhere/cls/best.pth.tar'}))
    with pytest.raises(ValueError, match=r'holds the result of another checkpoint'):
        _eval(data_root, '--train_what', 'ft', '--test', str(checkpoints['cls']),
              '--center_crop', '--output_dir', str(other.parent))
    with pytest.raises(SystemExit, match='is a pretraining checkpoint; start a classifier from it'):
        _eval(data_root, '--resume', str(checkpoints['pre0']), '--output_dir', str(tmp_path))
    for argv in (['--test', 'random', '--center_crop'],              # random: retrieval only
                 ['--test', str(five)],                              # no crop flag
                 ['--test', str(five), '--center_crop', '--ten_crop'],
                 ['--retrieval', '--pretrain', 'random'],            # --retrieval needs --test
                 ['--dataset', 'tiny-2clip', '--pretrain', 'random']):
        with pytest.raises(SystemExit):
            _eval(data_root, *argv)


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
    for command in (SEED_FINETUNE, SEED_TEN_CROP, SEED_RETRIEVAL):
        _, argv = _seed_argv(command, **{
            'selected_rgb_pretrained_checkpoint.pth.tar': checkpoints['pre0'],
            'selected_rgb_finetuned_checkpoint.pth.tar': checkpoints['cls']})
        args = parser.parse_args(argv)
        main_classifier.check_args(args, parser)
        assert args.net == 's3d' and args.dataset == 'ucf101' and args.seq_len == 32
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
    assert out.strip().splitlines()[-1].startswith('retrieval ucf101 split1: R@1=')
