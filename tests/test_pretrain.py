"""Pretraining end to end: real launches (torch.distributed with gloo), resume, bad inputs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import local_coclr
import local_nce
from tests.helpers import write_toy_dataset
from utils.checkpoint import save_checkpoint
from utils.misc import UserError

ROOT = Path(__file__).resolve().parents[1]
# Small enough for 2 CPU cores: 32 frames (4 segments of 8, the least S3D takes), 32 px.
TINY_SIZE = ['--seq_len', '32', '--img_dim', '32', '--batch_size', '2', '--moco-k', '8', '-j',
             '0', '--epochs', '1', '--iters_per_epoch', '2', '--device', 'cpu', '--print_freq',
             '1', '--local_aug', 'shared', '--monitor_freq', '0']   # the monitor: test_monitor.py
# S3D ends an 8-frame local clip of 32 px in one value per channel, and BatchNorm needs two per
# group: batch 2 in one process encodes its local keys (a batch of 2 per segment) in one group.
TINY = [*TINY_SIZE, '--bn_splits', '1']


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    """A UCF101-named folder with RGB and flow LMDBs and no split files (they are derived)."""
    root = tmp_path_factory.mktemp('data')
    videos = {f'{c}/v_{c}_g{g:02d}_c01': 36 for c in ('Alpha', 'Beta') for g in (8, 9, 10, 11, 1)}
    folder = Path(write_toy_dataset(root, 'ucf101', videos, height=40, width=40))
    for f in folder.glob('*.csv'):
        f.unlink()
    (folder / 'video_source.json').unlink()
    (folder / 'ClassInd.txt').unlink()
    return root


def run(cmd, **kw):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    return subprocess.run(cmd, cwd=kw.pop('cwd', ROOT), env=env, capture_output=True, text=True,
                          timeout=kw.pop('timeout', 300), **kw)


def last_log(exp_dir):
    return [json.loads(line) for line in (Path(exp_dir) / 'log.jsonl').read_text().splitlines()]


def only_experiment(out):
    dirs = [d for d in Path(out).iterdir() if d.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


@pytest.fixture(scope='module')
def infonce_ckpts(data_root, tmp_path_factory):
    """RGB and flow local-InfoNCE checkpoints from real 2-process runs of the seed's launcher."""
    ckpts = {}
    for name, dataset in (('rgb', 'ucf101-2clip'), ('flow', 'ucf101-f-2clip')):
        out = tmp_path_factory.mktemp(f'nce_{name}')
        r = run([sys.executable, '-m', 'torch.distributed.launch', '--nproc_per_node=2',
                 '--master_port', str(29500 + (os.getpid() % 500) + len(ckpts)), 'local_nce.py',
                 '--net', 's3d', '--model', 'infonce', '--dataset', dataset,
                 '--data_root', str(data_root), '--output_dir', str(out), *TINY])
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        exp = only_experiment(out)
        ckpts[name] = exp / 'last.pth.tar'
        ckpts[name + '_log'] = last_log(exp)
    return ckpts


def test_launch_two_processes_local_nce(infonce_ckpts):
    log = infonce_ckpts['rgb_log']
    assert log[-1]['iteration'] == 2
    ckpt = torch.load(infonce_ckpts['rgb'], weights_only=True)
    assert ckpt['state_dict']['queue_ptr'].item() == 0   # 2 iterations x 2 x 2 keys = K = 8
    assert {'state_dict', 'epoch', 'optimizer', 'iteration', 'best_acc', 'args'} <= set(ckpt)


def test_torchrun_two_processes_local_coclr(data_root, infonce_ckpts, tmp_path):
    r = run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
             'local_coclr.py', '--net', 's3d', '--topk', '2', '--dataset', 'ucf101-2stream-2clip',
             '--data_root', str(data_root), '--output_dir', str(tmp_path),
             '--pretrain', str(infonce_ckpts['rgb']), str(infonce_ckpts['flow']), *TINY,
             '--epochs', '2'])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    exp = only_experiment(tmp_path)
    ckpt = torch.load(exp / 'last.pth.tar', weights_only=True)
    sd = ckpt['state_dict']
    rgb = torch.load(infonce_ckpts['rgb'], weights_only=True)['state_dict']
    flow = torch.load(infonce_ckpts['flow'], weights_only=True)['state_dict']
    # The sampler is the flow network, frozen; the trained network started from RGB.
    for k, v in sd.items():
        if k.startswith('sampler.'):
            assert torch.equal(v, flow['encoder_q.' + k[len('sampler.'):]]), k
    # Epoch 0 (2 iterations) fills the queue without a step, epoch 1 takes gradient steps.
    assert not torch.equal(sd['encoder_q.4.weight'], rgb['encoder_q.4.weight'])
    assert (sd['queue_vname'] >= 0).all()


def test_resume_equals_uninterrupted(data_root, tmp_path):
    common = ['--dataset', 'ucf101-2clip', '--data_root', str(data_root), *TINY,
              '--epochs', '2', '--warmup', '0.5', '--keep_every', '1']
    local_nce.main(common + ['--output_dir', str(tmp_path / 'straight')])
    straight = only_experiment(tmp_path / 'straight')
    local_nce.main(common + ['--output_dir', str(tmp_path / 'cut'), '--epochs', '1'])
    cut = only_experiment(tmp_path / 'cut')
    local_nce.main(common + ['--output_dir', str(tmp_path / 'cut'), '--resume',
                             str(cut / 'last.pth.tar')])
    a = torch.load(straight / 'last.pth.tar', weights_only=True)
    b = torch.load(cut / 'last.pth.tar', weights_only=True)
    assert a['epoch'] == b['epoch'] == 1 and a['iteration'] == b['iteration'] == 4
    for k in a['state_dict']:
        assert torch.equal(a['state_dict'][k], b['state_dict'][k]), k
    assert (straight / 'epoch0.pth.tar').exists()
    assert [r['epoch'] for r in last_log(cut)] == [0, 1]
    # The log of a resumed run reads as one run: epochs trained again replace their records.
    local_nce.main(common + ['--output_dir', str(tmp_path / 'cut'), '--resume',
                             str(cut / 'epoch0.pth.tar')])
    assert [r['epoch'] for r in last_log(cut)] == [0, 1]
    # Resuming with other settings than the checkpoint's is refused, naming each change.
    with pytest.raises(UserError, match=r"--lr 0\.0005 -> 0\.1; --seed 0 -> 7"):
        local_nce.main(common + ['--output_dir', str(tmp_path / 'cut'), '--resume',
                                 str(cut / 'epoch0.pth.tar'), '--lr', '0.1', '--seed', '7'])
    with pytest.raises(UserError, match="--dataset 'ucf101-2clip' -> 'ucf101-f-2clip'"):
        local_nce.main([*common, '--dataset', 'ucf101-f-2clip', '--output_dir',
                        str(tmp_path / 'cut'), '--resume', str(cut / 'epoch0.pth.tar')])
    two = torch.load(cut / 'epoch0.pth.tar', weights_only=True)
    two['world_size'] = 2
    save_checkpoint(two, tmp_path / 'two.pth.tar')
    with pytest.raises(UserError, match='processes 2 -> 1'):
        local_nce.main(common + ['--resume', str(tmp_path / 'two.pth.tar')])
    # A new run never writes over an earlier one.
    with pytest.raises(UserError, match=r'already holds a run; continue it with --resume'):
        local_nce.main(common + ['--output_dir', str(tmp_path / 'straight')])
    # A finished run resumed with no epochs left to train says so instead of doing nothing.
    with pytest.raises(UserError, match='ends at epoch 1: --epochs 2 leaves nothing to train'):
        local_nce.main(common + ['--output_dir', str(tmp_path / 'cut'), '--resume',
                                 str(cut / 'last.pth.tar')])


def test_non_finite_loss_stops_with_iteration(data_root, tmp_path):
    base = ['--dataset', 'ucf101-2clip', '--data_root', str(data_root), *TINY,
            '--output_dir', str(tmp_path)]
    # A temperature of 1e-45 (a valid flag) overflows the float32 logits to inf.
    with pytest.raises(FloatingPointError, match='iteration 0'):
        local_nce.main(base + ['--moco-t', '1e-45'])
    assert not list(tmp_path.rglob('*.pth.tar'))
    # After a good epoch, a run that goes non-finite (resumed from a copy of the checkpoint
    # with a NaN weight) leaves the last good checkpoint as it was.
    exp = local_nce.main(base)
    good = (exp / 'last.pth.tar').read_bytes()
    poisoned = torch.load(exp / 'last.pth.tar', weights_only=True)
    poisoned['state_dict']['encoder_q.4.weight'][0, 0] = float('nan')
    save_checkpoint(poisoned, exp / 'poisoned.pth.tar')
    with pytest.raises(FloatingPointError, match='iteration 2'):
        local_nce.main(base + ['--epochs', '2', '--resume', str(exp / 'poisoned.pth.tar')])
    assert (exp / 'last.pth.tar').read_bytes() == good
    assert sorted(p.name for p in exp.glob('*.pth.tar')) == ['epoch0.pth.tar', 'last.pth.tar',
                                                             'poisoned.pth.tar']


@pytest.mark.parametrize('flags,message', [
    (['--moco-k', '6'], '--moco-k 6 is not a multiple of the global batch 4 (--batch_size'),
    (['--net', 'vgg'], "known: s3d, s3dg, r50"),
    (['--dataset', 'nosuch-2clip'], 'Known under'),
    (['--dataset', 'ucf101'], 'needs two views'),
    (['--dataset', 'ucf101-2stream-2clip'], 'local_nce.py trains one modality; use ucf101-2clip'),
    (['--seq_len', '16'], 'needs at least 8'),
    (['--seq_len', '34'], '--seq_len 34 is not divisible into --num_segments 4'),
    (['--bn_splits', '3'], '--batch_size 4 does not split into --bn_splits 3 groups'),
])
def test_bad_arguments(data_root, tmp_path, flags, message):
    args = ['--dataset', 'ucf101-2clip', '--data_root', str(data_root), *TINY,
            '--batch_size', '4', '--output_dir', str(tmp_path)] + flags
    with pytest.raises(UserError) as e:
        local_nce.main(args)
    assert message in str(e.value)


def test_bad_pretrain_checkpoints(data_root, tmp_path):
    base = ['--dataset', 'ucf101-2clip', '--data_root', str(data_root), *TINY,
            '--output_dir', str(tmp_path)]
    missing = tmp_path / 'nope.pth.tar'
    with pytest.raises(UserError, match=str(missing)):
        local_nce.main(base + ['--pretrain', str(missing)])
    corrupt = tmp_path / 'corrupt.pth.tar'
    corrupt.write_bytes(b'not a checkpoint')
    for garbage in (b'not a checkpoint', bytes(range(256)) * 4):
        corrupt.write_bytes(garbage)
        with pytest.raises(UserError, match=f'{corrupt} is not a readable checkpoint') as e:
            local_nce.main(base + ['--pretrain', str(corrupt)])
        assert 'weights_only' not in str(e.value)   # torch's advice to load it unsafely is dropped
    # Another architecture: a 64-d head where 128 is expected.
    other = tmp_path / 'other.pth.tar'
    m = local_nce.LocalInfoNCE('s3d', dim=64, K=8)
    save_checkpoint({'state_dict': m.state_dict(), 'epoch': 3}, other)
    with pytest.raises(UserError, match=r'shape mismatch: 4\.weight: \(64, 1024, 1, 1, 1\) vs \(128'):
        local_nce.main(base + ['--pretrain', str(other)])
    with pytest.raises(UserError, match=str(missing)):
        local_coclr.main(['--dataset', 'ucf101-2stream-2clip', '--data_root', str(data_root),
                          *TINY, '--output_dir', str(tmp_path), '--pretrain', 'random',
                          str(missing)])


@pytest.mark.parametrize('argv,message', [
    (['--batch_size', '0'], 'argument --batch_size: 0 is not an integer >= 1'),
    (['--iters_per_epoch', '-1'], 'argument --iters_per_epoch: -1 is not an integer >= 0'),
    (['--moco-t', '0'], 'argument --moco-t/--moco_t: 0 is not a number > 0'),
    (['--crop_area', '0', '1'], 'argument --crop_area: 0 is not a number in (0, 1]'),
    (['--two_clip_prob', '1.5'], 'argument --two_clip_prob: 1.5 is not a number in [0, 1]'),
    (['--lr', 'nan'], 'argument --lr: nan is not a number >= 0')])
def test_out_of_range_flags_are_refused_by_name(argv, message, capsys):
    from utils.config import parse_args
    with pytest.raises(SystemExit):
        parse_args(local_nce.get_parser(), argv)
    assert message in capsys.readouterr().err


def test_out_of_range_config_values_are_refused_with_the_file(tmp_path, capsys):
    from utils.config import parse_args
    cfg = tmp_path / 'c.toml'
    for text, message in (
            ('save_freq = 0', 'argument --save_freq: 0 is not an integer >= 1 (from --config {})'),
            ('epochs = 2.5', "argument --epochs: invalid int value: '2.5' (from --config {})"),
            ('warmup = [0.1, -1.0]', 'argument --warmup: -1.0 is not a number >= 0'),
            ('keep_every = -1', 'argument --keep_every: -1 is not an integer >= 0'),
            ('lr = "fast"', "argument --lr: invalid float value: 'fast' (from --config {})")):
        cfg.write_text(text + '\n')
        with pytest.raises(SystemExit):
            parse_args(local_nce.get_parser(), ['--config', str(cfg)])
        assert message.format(cfg) in capsys.readouterr().err, text
    cfg.write_text('epochs = 3\nlr = 1\n')     # a whole number is a number
    a = parse_args(local_nce.get_parser(), ['--config', str(cfg)])
    assert (a.epochs, a.lr) == (3, 1)


def test_crop_area_in_the_wrong_order_is_refused(tmp_path):
    with pytest.raises(UserError, match='--crop_area 0.9 0.2: give the smaller area first'):
        local_nce.main(['--dataset', 'demo-2clip', '--data_root', str(tmp_path), '--crop_area',
                        '0.9', '0.2', '--output_dir', str(tmp_path)])


def test_config_file_defaults_and_overrides(tmp_path):
    cfg = tmp_path / 'c.toml'
    cfg.write_text('dataset = "demo-2clip"\nmoco_k = 256\nbatch_size = 8\n')
    from utils.config import parse_args
    a = parse_args(local_nce.get_parser(), ['--config', str(cfg), '--batch_size', '4'])
    assert (a.dataset, a.moco_k, a.batch_size) == ('demo-2clip', 256, 4)
    cfg.write_text('no_such_flag = 1\n')
    with pytest.raises(SystemExit):
        parse_args(local_nce.get_parser(), ['--config', str(cfg)])


def test_loss_weights_temperature_and_defaults_of_each_script(capsys):
    # docs/METHOD.md, Losses: local_nce.py total = global + inter/3 + intra, tau 0.1 (the
    # authors' local_nce.py); local_coclr.py (coclr + inter + intra)/3, tau 0.07; the weights
    # are flags and reach the model, which weighs its loss itself.
    from utils.config import parse_args
    a = parse_args(local_nce.get_parser(), ['--moco-k', '8'])
    assert (a.dataset, a.moco_t, a.local_aug, a.keep_every) == ('ucf101-2clip', 0.1, 'shared',
                                                                 50)
    assert local_nce.build_model(a).weights == {'global': 1.0, 'inter': 1 / 3, 'intra': 1.0}
    a = parse_args(local_nce.get_parser(), ['--w_global', '0.5', '--w_intra', '0', '--moco-k', '8'])
    model = local_nce.build_model(a)
    assert model.weights == {'global': 0.5, 'inter': 1 / 3, 'intra': 0.0} and model.tau == 0.1
    c = parse_args(local_coclr.get_parser(), ['--moco-k', '8'])
    assert (c.dataset, c.moco_t, c.local_aug) == ('ucf101-2stream-2clip', 0.07, 'independent')
    assert not a.crop_retry and not c.crop_retry   # CoCLR's training crop
    assert local_coclr.build_model(c).weights == {'coclr': 1 / 3, 'inter': 1 / 3, 'intra': 1 / 3}
    assert parse_args(local_coclr.get_parser(), ['--topk', '0']).topk == 0   # siblings only
    for script, tau in ((local_nce, 0.1), (local_coclr, 0.07)):
        with pytest.raises(SystemExit):
            parse_args(script.get_parser(), ['--help'])
        assert f'temperature tau (default: {tau})' in ' '.join(capsys.readouterr().out.split())
    for path in ('ucf101_infonce_rgb', 'ucf101_infonce_flow', 'ucf101_coclr_rgb',
                 'ucf101_coclr_flow'):
        script = local_coclr if 'coclr' in path else local_nce
        args = parse_args(script.get_parser(), ['--config', str(ROOT / 'configs' / f'{path}.toml')])
        assert args.moco_t == (0.07 if script is local_coclr else 0.1), path


def test_topk_larger_than_the_queue_is_refused(capsys):
    with pytest.raises(SystemExit):
        local_coclr.main(['--pretrain', 'random', 'random', '--topk', '9', '--moco-k', '8'])
    assert '--topk 9 mines more positives than the queue holds (--moco-k 8)' in \
        capsys.readouterr().err


@pytest.mark.parametrize('reverse', [False, True])
@pytest.mark.parametrize('local_aug', ['independent', 'shared'])
def test_inputs_of_each_script(reverse, local_aug):
    """The model's inputs from augmented views of the shapes the data path gives: --reverse
    swaps the trained and the mining modality; --local_aug independent feeds the dataset's
    local clips: the first as the local query, the L others (view 2's) as keys."""
    from utils.config import parse_args
    b, t, segments, size = 2, 32, 4, 32
    views = {m: torch.randn(b, 2, 3, t, size, size) for m in ('rgb', 'flow')}
    views.update({f'{m}_local': torch.randn(b, 1 + segments, 3, t // segments, size, size)
                  for m in ('rgb', 'flow')})
    batch = {'source': torch.tensor([3, 4]), 'label': torch.tensor([0, 1])}
    flags = ['--local_aug', local_aug, '--moco-k', '8', '--bn_splits', '1']
    args = parse_args(local_coclr.get_parser(),
                      flags + ['--pretrain', 'random', 'random'] + ['--reverse'] * reverse)
    x = local_coclr.inputs(views, batch, torch.device('cpu'), args)
    trained, other = ('flow', 'rgb') if reverse else ('rgb', 'flow')
    assert torch.equal(x['view1'], views[trained][:, 0])
    assert torch.equal(x['view2'], views[trained][:, 1])
    assert torch.equal(x['other_view2'], views[other][:, 1])
    assert torch.equal(x['source'], batch['source'])
    assert ('local1' in x) == ('local2' in x) == (local_aug == 'independent')
    if local_aug == 'independent':
        assert torch.equal(x['local1'], views[trained + '_local'][:, 0])
        assert torch.equal(x['local2'], views[trained + '_local'][:, 1:])
    if reverse:
        return
    # The model takes them: a real forward of each script's model, loss and stats as promised.
    nce_args = parse_args(local_nce.get_parser(), flags + ['--moco-m', '0.999'])
    x = local_nce.inputs(views, batch, torch.device('cpu'), nce_args)
    assert set(x) == {'view1', 'view2'} | ({'local1', 'local2'} if local_aug == 'independent'
                                           else set())
    model = local_nce.build_model(nce_args)
    loss, stats = model(**x)
    assert loss.requires_grad and loss.dim() == 0
    assert {'loss_global', 'loss_inter', 'loss_intra', 'top1', 'top5', 'inter_top1'} <= set(stats)


def test_learning_rate_warmup_then_steps():
    # docs/METHOD.md, Optimisation: local InfoNCE warms up over 5 epochs (1/100, 1/20, 1/10, 1/2, 1 of lr), then
    # x0.1 at each --schedule epoch.
    from utils.config import parse_args
    from utils.misc import learning_rate
    a = parse_args(local_nce.get_parser(), [])
    rates = [learning_rate(a.lr, e, a.schedule, a.warmup) for e in (0, 1, 2, 3, 4, 249, 250, 280)]
    expected = [5e-6, 2.5e-5, 5e-5, 2.5e-4, 5e-4, 5e-4, 5e-5, 5e-6]
    assert rates == pytest.approx(expected, rel=1e-12)
    c = parse_args(local_coclr.get_parser(), ['--pretrain', 'random', 'random'])
    assert [learning_rate(c.lr, e, c.schedule, c.warmup) for e in (0, 79, 80)] == \
        pytest.approx([1e-3, 1e-3, 1e-4], rel=1e-12)


def test_pretrained_networks_of_the_other_modality_are_refused(data_root, infonce_ckpts,
                                                               tmp_path):
    base = ['--data_root', str(data_root), *TINY, '--output_dir', str(tmp_path)]
    with pytest.raises(UserError, match=r'trained on FLOW \(--dataset ucf101-f-2clip\), but RGB'):
        local_nce.main(base + ['--dataset', 'ucf101-2clip', '--pretrain',
                               str(infonce_ckpts['flow'])])
    # --pretrain TRAINED SAMPLER given the wrong way round.
    with pytest.raises(UserError, match=r'--pretrain \(trained network, RGB\) .* trained on FLOW'):
        local_coclr.main(base + ['--dataset', 'ucf101-2stream-2clip', '--pretrain',
                                 str(infonce_ckpts['flow']), str(infonce_ckpts['rgb'])])
    with pytest.raises(UserError, match=r'--pretrain \(sampler, RGB\) .* trained on FLOW'):
        local_coclr.main(base + ['--dataset', 'ucf101-2stream-2clip', '--reverse', '--pretrain',
                                 str(infonce_ckpts['flow']), str(infonce_ckpts['flow'])])


def test_script_errors_and_interrupts_end_without_a_traceback(data_root, tmp_path):
    from types import SimpleNamespace
    from utils.run import open_run
    r = run([sys.executable, 'local_nce.py', '--dataset', 'ucf101-2clip', '--data_root',
             str(data_root), *TINY, '--output_dir', str(tmp_path), '--pretrain',
             str(tmp_path / 'nope.pth.tar')])
    assert r.returncode == 2 and 'Traceback' not in r.stderr
    assert r.stderr.strip() == f'error: --pretrain: no checkpoint at {tmp_path / "nope.pth.tar"}'
    r = run([sys.executable, 'local_nce.py', '--dataset', 'ucf101', '--data_root',
             str(data_root), *TINY, '--output_dir', str(tmp_path)])
    assert r.returncode == 2 and r.stderr.startswith('error: --dataset ucf101: pretraining needs')
    said, other_rank = [], SimpleNamespace(is_main=False)   # makes no folder, no TensorBoard
    for _ in range(2):   # Ctrl-C in a run's epochs names the last good checkpoint, if any
        with pytest.raises(KeyboardInterrupt), open_run(tmp_path, None, other_rank, said.append,
                                                        None, '') as writer:
            assert writer is None
            raise KeyboardInterrupt
        (tmp_path / 'last.pth.tar').write_bytes(b'')
    assert 'before the first checkpoint' in said[0]
    assert f'the last good checkpoint is {tmp_path / "last.pth.tar"}' in said[1]


def test_resume_rules():
    from types import SimpleNamespace
    from utils.run import check_resume
    now = SimpleNamespace(resume='r.pth.tar', lr=0.1, w_inter=1 / 3, epochs=9, workers=4)
    # Checkpoints of earlier versions stored defaulted loss weights as None: not a change.
    check_resume({'args': {'lr': 0.1, 'w_inter': None, 'epochs': 3, 'workers': 0}}, now, 1)
    with pytest.raises(UserError, match=r"--lr 0\.2 -> 0\.1"):
        check_resume({'args': {'lr': 0.2}, 'world_size': 1}, now, 1)
    with pytest.raises(UserError, match='processes 2 -> 1'):
        check_resume({'args': {'lr': 0.1}, 'world_size': 2}, now, 1)


def test_log_keeps_one_record_per_epoch(tmp_path):
    from utils.misc import log_epoch
    log = tmp_path / 'log.jsonl'
    for epoch in (0, 1, 2, 3):
        log_epoch(log, {'epoch': epoch, 'loss': 1.0})
    log_epoch(log, {'epoch': 2, 'loss': 0.5})       # a run resumed from epoch 1's checkpoint
    assert [(r['epoch'], r['loss']) for r in last_log(tmp_path)] == [(0, 1.0), (1, 1.0), (2, 0.5)]


def test_fresh_run_refuses_only_a_folder_with_checkpoints(tmp_path):
    from utils.run import resume_or_start
    fresh = (None, tmp_path, None, None, None, None, None)   # no checkpoint: nothing is loaded
    (tmp_path / 'log.jsonl').write_text('{"epoch": 0}\n')   # stopped before its first save
    assert resume_or_start(*fresh) == (tmp_path, 0, 0, 0.0, None)
    (tmp_path / 'epoch9.pth.tar').write_bytes(b'')
    with pytest.raises(UserError, match='already holds a run'):
        resume_or_start(*fresh)


def test_odd_batch_in_one_process_trains_with_one_bn_group(data_root, tmp_path, capsys):
    exp = local_nce.main(['--dataset', 'ucf101-2clip', '--data_root', str(data_root), *TINY_SIZE,
                          '--batch_size', '3', '--moco-k', '9', '--output_dir', str(tmp_path)])
    assert torch.load(exp / 'last.pth.tar', weights_only=True)['args']['bn_splits'] == 1


def test_coclr_resume_needs_no_pretrain(tmp_path):
    with pytest.raises(UserError, match='--resume: no checkpoint'):
        local_coclr.main(['--resume', str(tmp_path / 'gone.pth.tar'), '--device', 'cpu',
                          '--dataset', 'demo-2stream-2clip', '--data_root', str(tmp_path)])


class Tiny(torch.nn.Module):
    """A backbone of one 3D convolution, registered for the tests that need no S3D."""
    feature_dim = 8

    def __init__(self, in_channels=3):
        super().__init__()
        self.conv = torch.nn.Conv3d(in_channels, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm3d(8)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


@pytest.fixture
def tiny_net(monkeypatch):
    from backbone import BACKBONES
    monkeypatch.setitem(BACKBONES, 'tiny', Tiny)
    return ['--net', 'tiny', '--seq_len', '8']


def test_checkpoint_retention(data_root, tmp_path, capsys, tiny_net):
    """--keep_every (default 50): a run holds last.pth.tar, its latest epoch file and the kept
    ones (CoCLR's 0-based names: --keep_every 2 keeps the 2nd and 4th epochs, epoch1 and
    epoch3); a resumed run goes on the same way; the expected disk use is printed at start."""
    base = ['--dataset', 'ucf101-2clip', '--data_root', str(data_root), *TINY, *tiny_net,
            '--iters_per_epoch', '1', '--epochs', '4']
    exp = local_nce.main(base + ['--output_dir', str(tmp_path / 'default')])
    assert sorted(p.name for p in exp.glob('*.pth*')) == ['epoch3.pth.tar', 'last.pth.tar']
    assert 'at most 2 files (last, latest epoch, 0 kept by --keep_every 50)' in \
        capsys.readouterr().out
    exp = local_nce.main(base + ['--output_dir', str(tmp_path / 'two'), '--keep_every', '2'])
    assert sorted(p.name for p in exp.glob('*.pth*')) == ['epoch1.pth.tar', 'epoch3.pth.tar',
                                                          'last.pth.tar']
    assert 'at most 3 files (last, latest epoch, 1 kept by --keep_every 2)' in \
        capsys.readouterr().out
    cut = local_nce.main(base + ['--output_dir', str(tmp_path / 'cut'), '--epochs', '2'])
    assert sorted(p.name for p in cut.glob('*.pth*')) == ['epoch1.pth.tar', 'last.pth.tar']
    local_nce.main(base + ['--resume', str(cut / 'last.pth.tar')])
    assert sorted(p.name for p in cut.glob('*.pth*')) == ['epoch3.pth.tar', 'last.pth.tar']
    assert torch.load(cut / 'last.pth.tar', weights_only=True)['epoch'] == 3


def test_disk_estimate_is_the_size_of_a_saved_checkpoint(tmp_path):
    from utils.run import disk_use
    model = local_nce.LocalInfoNCE('s3d', K=8)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()   # Adam's state: two tensors per parameter
    save_checkpoint({'state_dict': model.state_dict(), 'optimizer': optimizer.state_dict(),
                     'epoch': 0}, tmp_path / 'c.pth.tar')
    line = disk_use(model, 300, 50)   # a 300-epoch stage keeps epochs 50, 100, ... 300
    assert 'at most 7 files (last, latest epoch, 5 kept by --keep_every 50)' in line
    mb = float(line.split('~')[1].split(' MB')[0])
    assert mb == pytest.approx((tmp_path / 'c.pth.tar').stat().st_size / 2**20, rel=0.01)


def test_an_epoch_file_is_removed_only_after_its_successor_is_written(tmp_path, monkeypatch):
    from utils.run import save_epoch
    first = save_epoch({'epoch': 0}, tmp_path, 0, keep_every=0)

    def disk_full(*args, **kwargs):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(torch, 'save', disk_full)
    with pytest.raises(OSError):
        save_epoch({'epoch': 1}, tmp_path, 1, 0, previous=first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['epoch0.pth.tar', 'last.pth.tar']
    assert torch.load(tmp_path / 'last.pth.tar', weights_only=True) == {'epoch': 0}
    monkeypatch.undo()
    save_epoch({'epoch': 1}, tmp_path, 1, 0, previous=first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['epoch1.pth.tar', 'last.pth.tar']


def _replica(rank, data_root, out, port):
    """One of two gloo processes of a local-InfoNCE run; saves its final state."""
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE='2')
    torch.set_num_threads(1)
    from backbone import BACKBONES
    import engine_pretrain as engine
    BACKBONES['tiny'] = Tiny   # this process's own registry
    from utils.config import parse_args
    built = []

    def build(args):
        built.append(local_nce.build_model(args))
        return built[0]
    args = parse_args(local_nce.get_parser(),
                      ['--dataset', 'ucf101-2clip', '--data_root', data_root, *TINY,
                       '--net', 'tiny', '--seq_len', '8', '--output_dir', out, '--epochs', '2'])
    engine.train(args, engine.Task('infonce', build, local_nce.load_pretrained,
                                   local_nce.inputs, two_stream=False))
    torch.save(built[0].state_dict(), Path(out) / f'rank{rank}.pt')


def test_two_processes_end_with_identical_weights_and_queue(data_root, tmp_path, tiny_net):
    """Gradients averaged over processes, one key shuffle and one queue for all: after training,
    every process holds the same weights of both encoders, queue and pointer."""
    torch.multiprocessing.spawn(_replica, args=(str(data_root), str(tmp_path),
                                                29000 + os.getpid() % 1000), nprocs=2)
    a, b = (torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in (0, 1))
    torch.manual_seed(0)   # the engine's initial weights
    initial = local_nce.LocalInfoNCE('tiny', K=8).state_dict()
    # 2 epochs x 2 steps x 2 processes x 2 keys: the queue of 8 filled twice
    assert a['queue_ptr'].item() == 0 and not torch.equal(a['queue'], initial['queue'])
    assert not torch.equal(a['encoder_q.4.weight'], initial['encoder_q.4.weight'])
    # BatchNorm's running statistics are each process's own (of its own batches), as in MoCo
    for k in a:
        if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked')):
            assert torch.equal(a[k], b[k]), k


def test_a_bug_keeps_its_traceback_and_bad_input_is_one_error_line(data_root, tmp_path):
    """A ValueError from PyTorch inside the loss (here a shape mismatch, injected by replacing
    torch's cross_entropy) is a bug: its traceback is printed. A bad flag is one line."""
    inject = ('import runpy, sys, torch.nn.functional as F\n'
              'def broken(*a, **k):\n'
              '    raise ValueError("Expected input batch_size (2) to match target batch_size (3)")\n'
              'F.cross_entropy = broken\n'
              'sys.argv = ["local_nce.py"] + sys.argv[1:]\n'
              'runpy.run_path("local_nce.py", run_name="__main__")\n')
    flags = ['--dataset', 'ucf101-2clip', '--data_root', str(data_root), *TINY,
             '--output_dir', str(tmp_path)]
    r = run([sys.executable, '-c', inject, *flags])
    assert r.returncode == 1 and 'Traceback' in r.stderr, r.stderr[-2000:]
    assert ('\nValueError: Expected input batch_size (2) to match target batch_size (3)\n'
            in r.stderr) and 'error:' not in r.stderr
    r = run([sys.executable, 'local_nce.py', *flags, '--net', 'vgg'])
    assert r.returncode == 2 and r.stderr.count('\n') == 1
    assert r.stderr.startswith("error: --net 'vgg' is unknown; known: s3d")


def test_independent_local_clips_train_both_scripts(data_root, tmp_path, tiny_net):
    """--local_aug independent (local_coclr.py's default) end to end: the dataset's own local
    clips reach both models (docs/METHOD.md, Local clips)."""
    base = ['--data_root', str(data_root), *TINY, *tiny_net, '--local_aug', 'independent']
    exp = local_nce.main(base + ['--dataset', 'ucf101-2clip', '--output_dir', str(tmp_path / 'a')])
    assert torch.load(exp / 'last.pth.tar', weights_only=True)['args']['local_aug'] == \
        'independent'
    exp = local_coclr.main(base + ['--dataset', 'ucf101-2stream-2clip', '--pretrain', 'random',
                                   'random', '--output_dir', str(tmp_path / 'b')])
    assert last_log(exp)[-1]['iteration'] == 2
