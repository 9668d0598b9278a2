"""The retrieval monitor of the pretraining scripts (docs/METHOD.md, Retrieval monitor): it equals
main_classifier.py's retrieval on the same checkpoint, it leaves training bit-identical, two gloo
processes get the single-process result, and through it the real pipeline is seen to learn.

The data: a small synthetic LMDB of textured videos whose classes differ only by motion (drift
up, down, sideways or none); every look is shared by all classes, so that neither the class nor
the video is given away by appearance alone."""
import json
import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import engine_pretrain as engine
import local_coclr
import local_nce
from eval import clips, main_classifier, retrieval
from tests.helpers import jpeg_bytes, write_raw_lmdb
from tests.test_learning import Tiny
from utils import distributed as du
from utils.config import parse_args

SIZE, FRAMES, LOOKS = 40, 16, 3
MOTIONS = {'Down': (1, 0), 'Side': (0, 1), 'Still': (0, 0), 'Up': (-1, 0)}   # (dy, dx) a frame


@pytest.fixture(autouse=True)
def tiny_backbone(monkeypatch):
    """``--net tiny`` in this process's registry; one thread (layers this small gain nothing from
    more, and a busy machine's second core costs more than it brings)."""
    from backbone import BACKBONES
    monkeypatch.setitem(BACKBONES, 'tiny', Tiny)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def moving_texture(look, motion, speed, offset):
    """uint8 ``[FRAMES, 3, SIZE, SIZE]``: a window drifting over texture ``look`` at ``speed``
    pixels a frame in direction ``motion`` (sideways: either way), from ``offset``."""
    g = torch.Generator().manual_seed(look)
    pad = SIZE + 2 * FRAMES * 3
    coarse = torch.rand(1, 3, pad // 6, pad // 6, generator=g)
    texture = nn.functional.interpolate(coarse, size=(pad, pad), mode='bicubic',
                                        align_corners=False).clamp(0, 1)[0]
    frames = []
    for t in range(FRAMES):
        y = pad // 2 - SIZE // 2 + round(motion[0] * speed * (t - FRAMES / 2)) + offset[0]
        x = pad // 2 - SIZE // 2 + round(motion[1] * speed * (t - FRAMES / 2)) + offset[1]
        frames.append(texture[:, y:y + SIZE, x:x + SIZE])
    return (torch.stack(frames) * 255).round().to(torch.uint8)


def write_motion_dataset(root, train_per_class, test_per_class, name='motion'):
    """A dataset folder in the layout of docs/METHOD.md (Data): RGB and flow LMDBs (the flow one
    holds the same frames: only its reading matters here), the split lists and the classes."""
    g = torch.Generator().manual_seed(0)
    folder = Path(root) / name
    folder.mkdir(parents=True)
    videos, splits = [], {'train': [], 'test': []}
    for c, (cls, motion) in enumerate(MOTIONS.items()):
        for i in range(train_per_class + test_per_class):
            sign = 1 if torch.rand((), generator=g) < 0.5 else -1
            speed = sign * (1 + torch.rand((), generator=g).item())
            offset = torch.randint(-6, 7, (2,), generator=g).tolist()
            video = f'{cls}/v_{cls}_g{i:02d}_c01'
            look = int(torch.randint(0, LOOKS, (), generator=g))
            videos.append((video, jpeg_bytes(moving_texture(look, motion, speed, offset))))
            splits['train' if i < train_per_class else 'test'].append(video)
    write_raw_lmdb(folder / f'{name}_frame.lmdb', videos)
    write_raw_lmdb(folder / f'{name}_tvl1_frame.lmdb', videos)
    (folder / 'ClassInd.txt').write_text(''.join(f'{i + 1} {c}\n' for i, c in enumerate(MOTIONS)))
    for split, names in splits.items():
        (folder / f'{split}_split01.csv').write_text(''.join(f'{n},{FRAMES}\n' for n in names))
    groups = {name.split('/')[1].rsplit('_c', 1)[0]: i for i, (name, _) in enumerate(videos)}
    (folder / 'video_source.json').write_text(json.dumps(groups))
    return root


@pytest.fixture(scope='module')
def small_data(tmp_path_factory):
    """5 train and 3 test videos per class: the monitor's tests."""
    return write_motion_dataset(tmp_path_factory.mktemp('small'), 5, 3)


def test_middle_window_is_the_middle_one_of_all(small_data):
    from dataset.catalog import build_dataset
    every, middle = (clips.Videos(build_dataset('motion', 'test', data_root=small_data, seq_len=8,
                                                img_dim=32), [0], test_windows=windows)
                     for windows in ('all', 'middle'))
    frames = every[0]['rgb']                                   # W x T x 3 x h x w
    assert len(frames) == 3   # 16 frames: windows of 8 at 0, 3 and 6 (a step of 8/2 - 1)
    assert torch.equal(middle[0]['rgb'], frames[len(frames) // 2][None])


# A short run of the tiny backbone on 32-pixel, 8-frame clips (2-frame local clips).
SHORT = ['--dataset', 'motion-2clip', '--net', 'tiny', '--seq_len', '8', '--img_dim', '32',
         '--batch_size', '4', '--moco-k', '16', '-j', '0', '--device', 'cpu', '--print_freq', '1',
         '--epochs', '2', '--iters_per_epoch', '2']


def last_log(exp_dir):
    return [json.loads(line) for line in (Path(exp_dir) / 'log.jsonl').read_text().splitlines()]


@pytest.mark.parametrize('windows', ['middle', 'all'])
def test_monitor_equals_evaluation_on_the_same_checkpoint(small_data, tmp_path, windows, capsys):
    """The monitor's last R@1/R@5 are main_classifier.py's --retrieval --protocol clean on the
    run's last checkpoint, with the same choice of windows; printed, logged, in the checkpoint."""
    exp = local_nce.main([*SHORT, '--data_root', str(small_data), '--output_dir', str(tmp_path),
                          '--monitor_freq', '1', '--monitor_windows', windows])
    out = capsys.readouterr().out
    log = last_log(exp)
    assert [r['epoch'] for r in log] == [-1, 0, 1]
    assert out.count('=> monitor start: R@1=') == 1 and out.count('=> monitor epoch ') == 2
    assert f'=> monitor R@1 {log[0]["R@1"]:.1f} (start) -> {log[-1]["R@1"]:.1f} (epoch 1)' in out
    ckpt = torch.load(exp / 'last.pth.tar', weights_only=True)
    assert ckpt['monitor'] == [{k: r[k] for k in ('epoch', 'R@1', 'R@5', 'monitor_s')}
                               for r in log]
    report = main_classifier.main(
        ['--dataset', 'motion', '--data_root', str(small_data), '--net', 'tiny', '--seq_len', '8',
         '--img_dim', '32', '--device', 'cpu', '-j', '0', '--test', str(exp / 'last.pth.tar'),
         '--retrieval', '--protocol', 'clean', '--test_windows', windows,
         '--dirname', str(tmp_path / 'features')])
    assert report['queries'] == 12 and report['gallery'] == 20
    assert (report['recall']['R@1'], report['recall']['R@5']) == (log[-1]['R@1'], log[-1]['R@5'])
    events = list((exp / 'tb').glob('events.*'))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tags = EventAccumulator(str(events[0])).Reload().Tags()['scalars']
    assert {'monitor/R@1', 'monitor/R@5'} <= set(tags)


def test_monitor_leaves_training_bit_identical(small_data, tmp_path):
    """--monitor_freq 1 and 0 end with the same weights, BatchNorm statistics, queue and
    optimiser state; a measurement itself changes no state, random stream or module mode."""
    finals = {}
    for freq in ('1', '0'):
        exp = local_nce.main([*SHORT, '--data_root', str(small_data), '--monitor_freq', freq,
                              '--output_dir', str(tmp_path / freq)])
        finals[freq] = torch.load(exp / 'last.pth.tar', weights_only=True)
    a, b = finals['1'], finals['0']
    assert len(a['monitor']) == 3 and b['monitor'] == []
    assert a['state_dict'].keys() == b['state_dict'].keys()
    for k in a['state_dict']:
        assert torch.equal(a['state_dict'][k], b['state_dict'][k]), k
    for p, state in a['optimizer']['state'].items():
        for k, v in state.items():
            assert torch.equal(v, b['optimizer']['state'][p][k]), (p, k)

    args = parse_args(local_nce.get_parser(), [*SHORT, '--data_root', str(small_data)])
    rt = clips.runtime(du.init_distributed('cpu'), args)
    monitor = engine.Monitor(args, rt, [])
    torch.manual_seed(0)
    model = local_nce.build_model(args)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    monitor(model, 0, None)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == modes
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_cvtcl_monitors_the_modality_it_trains(small_data):
    base = [*SHORT, '--dataset', 'motion-2stream-2clip', '--data_root', str(small_data)]
    rt = clips.runtime(du.init_distributed('cpu'), parse_args(local_nce.get_parser(), SHORT))
    for flags, dataset, modality in (([], 'motion', 'rgb'), (['--reverse'], 'motion-f', 'flow')):
        args = parse_args(local_coclr.get_parser(), [*base, *flags, '--pretrain', 'random',
                                                     'random'])
        monitor = engine.Monitor(args, rt, [])
        assert monitor.args.dataset == dataset
        assert [v.modality for v in monitor.videos.values()] == [modality, modality]


def _monitor_process(rank, data_root, out, port):
    """One of two gloo processes: the monitor and the test videos' features of a seeded model."""
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE='2')
    torch.set_num_threads(1)
    from backbone import BACKBONES
    BACKBONES['tiny'] = Tiny   # this process's own registry
    torch.save(_monitor_and_features(data_root), Path(out) / f'rank{rank}.pt')
    du.cleanup()


def _monitor_and_features(data_root):
    args = parse_args(local_nce.get_parser(), [*SHORT, '--data_root', data_root,
                                               '--monitor_windows', 'all'])
    rt = clips.runtime(du.init_distributed('cpu'), args)
    monitor = engine.Monitor(args, rt, [])
    train = monitor.videos['train']   # 19 of 20: the two shares differ (one is padded)
    monitor.videos['train'] = clips.Videos(train.dataset, train.indices[:19])
    torch.manual_seed(0)
    model = local_nce.build_model(args)
    result = monitor(model, -1, None)
    model.eval()
    features = retrieval.video_features(model.encoder_q[0], monitor.videos['train'], monitor.args,
                                        rt, 'train')
    return {'R@1': result['R@1'], 'R@5': result['R@5'], 'features': features}


def test_two_processes_get_the_single_process_result(small_data, tmp_path):
    """Each process computes its share of the videos (19 train, 12 test; every window) and the
    shares are gathered: the same features, bit for bit, and the same R@1/R@5."""
    torch.multiprocessing.spawn(_monitor_process, args=(str(small_data), str(tmp_path),
                                                        28000 + os.getpid() % 1000), nprocs=2)
    single = _monitor_and_features(str(small_data))
    for rank in (0, 1):
        shared = torch.load(tmp_path / f'rank{rank}.pt', weights_only=True)
        assert (shared['R@1'], shared['R@5']) == (single['R@1'], single['R@5'])
        assert torch.equal(shared['features'], single['features'])


# ----------------------------------------------------------------------------------------------
# The real pipeline learns

def mismatched_views(views, batch, device, args):
    """local_nce.py's inputs with view 2 (and its local clips) of the next video in the batch."""
    inputs = local_nce.inputs(views, batch, device, args)
    return {k: v.roll(1, 0) if k in ('view2', 'local2') else v for k, v in inputs.items()}


# Broken variants, run only with CVTCL_TEST_BROKEN=1 (they cost as much as the working run each);
# they must fail, so a strict xfail.
BROKEN = [pytest.mark.skipif(not os.environ.get('CVTCL_TEST_BROKEN'),
                             reason='the broken variants run with CVTCL_TEST_BROKEN=1'),
          pytest.mark.xfail(strict=True, raises=AssertionError)]


@pytest.mark.parametrize('variant', ['working', pytest.param('mismatched_views', marks=BROKEN),
                                     pytest.param('frozen_encoder', marks=BROKEN)])
def test_the_pipeline_learns_motion(tmp_path, variant):
    """local_nce.py's dataset, augmentation, engine, losses and monitor with the tiny backbone, 10
    epochs of 6 steps (96 train videos, 40 test, 4 classes; --moco-m 0.9 for a run this short):
    the monitor's R@1 rises by 10+ points, the instance top-1 (chance 1/65) rises well above its
    level once the queue holds real keys (epoch 1), and the global InfoNCE loss leaves chance
    (ln 65 = 4.17). Means over the last 5 epochs.

    Measured on 2 busy CPU cores (about 60 s): R@1 55.0 -> 72.5 (80.0 after 20 epochs); top-1
    0.115 -> 0.375; global loss 4.05 -> 3.34. The broken variants, each run once
    (CVTCL_TEST_BROKEN=1), fail: with view 2 taken from another video (``mismatched_views``) R@1
    falls, 55.0 -> 47.5, the loss stays near chance, 4.17 -> 3.95, while the top-1 still climbs,
    0.104 -> 0.348 (the embeddings collapse, and a batch's fresh keys are nearer its queries than
    the queue's older ones: top-1 alone does not show learning); with the encoder never updated
    (``--lr 0``) R@1 55.0 -> 60.0 (only BatchNorm's running statistics move), top-1 0.031 ->
    0.035, loss 4.16 -> 4.16.
    """
    data = write_motion_dataset(tmp_path, 24, 10)
    args = parse_args(local_nce.get_parser(), [
        '--dataset', 'motion-2clip', '--data_root', str(data), '--net', 'tiny', '--seq_len', '8',
        '--img_dim', '32', '--batch_size', '16', '--moco-k', '64', '--moco-m', '0.9', '-j', '0',
        '--device', 'cpu', '--print_freq', '100', '--epochs', '10', '--monitor_freq', '10',
        '--warmup', '--schedule', '--lr', '0' if variant == 'frozen_encoder' else '1e-3',
        '--output_dir', str(tmp_path / 'run')])
    inputs = mismatched_views if variant == 'mismatched_views' else local_nce.inputs
    exp = engine.train(args, engine.Task('infonce', local_nce.build_model,
                                         local_nce.load_pretrained, inputs, two_stream=False))
    log = last_log(exp)
    start, end = log[0]['R@1'], log[-1]['R@1']
    queue_full, last = log[2]['top1'], sum(r['top1'] for r in log[-5:]) / 5
    loss = sum(r['loss_global'] for r in log[-5:]) / 5
    print(f'{variant}: R@1 {start:.1f} -> {end:.1f}, top-1 {queue_full:.3f} -> {last:.3f}, '
          f'global loss {log[2]["loss_global"]:.2f} -> {loss:.2f}')
    assert end >= start + 10, f'monitor R@1 {start:.1f} -> {end:.1f}'
    assert last >= max(0.2, 2 * queue_full), f'top-1 {queue_full:.3f} -> {last:.3f}'
    assert loss < math.log(65) - 0.5, f'global InfoNCE loss {loss:.2f}, chance {math.log(65):.2f}'
