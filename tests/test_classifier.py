"""The classifier (model/classifier.py) and the training job of eval/main_classifier.py, on a
tiny real dataset built here: LMDBs of JPEG frames, split CSVs, ClassInd.txt (docs/METHOD.md,
Data).

Small settings throughout (S3D, 8-frame clips at stride 2, 32-pixel crops, one or two
iterations) so the file runs in well under a minute on two CPU cores.
"""
import json
from pathlib import Path

import pytest
import torch

from dataset.lmdb_video import LMDBWriter, encode_frames
from helpers import coclr_reference, write_toy_dataset
from dataset.splits import ucf101_splits, write_split_files
from eval import finetune, main_classifier
from model.classifier import LinearClassifier, checkpoint_kind, head_layout, load_pretrained
from model.moco import LocalInfoNCE
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.misc import UserError

# Errors raised by utils/ (checkpoints, resume checks): bad input, of the project's type once
# utils uses it.
UTILS_ERRORS = (FileNotFoundError, SystemExit, UserError)

CLASSES = ('Jump', 'Run', 'Swim')
GROUPS, CLIPS, FRAMES, HEIGHT, WIDTH = 3, 2, 24, 36, 44
TINY = ['--seq_len', '8', '--ds', '2', '--img_dim', '32', '--net', 's3d', '-j', '0',
        '--device', 'cpu']


def _video(label, group, clip, flow=False):
    """uint8 [N, 3, H, W]: a square moving in a class-specific direction on a plain background."""
    g = torch.Generator().manual_seed(1000 * label + 10 * group + clip + (5 if flow else 0))
    n = FRAMES - 1 if flow else FRAMES
    colour = torch.randint(0, 256, (3,), generator=g, dtype=torch.uint8)
    frames = torch.full((n, 3, HEIGHT, WIDTH), 128 if flow else 40, dtype=torch.uint8)
    for t in range(n):
        y = 4 + (t if label == 0 else 0) % 20
        x = 4 + (t if label == 1 else 0) % 28
        frames[t, :, y:y + 10, x:x + 10] = colour[:, None, None]
    return frames


def make_tiny_dataset(root, name='tiny'):
    """``<root>/<name>/``: RGB and flow LMDBs (18 videos, 3 classes), splits with groups_per_split
    1 (test split 1 = group g01: 6 videos; train: 12), ClassInd.txt, video_source.json."""
    folder = Path(root) / name
    names = [f'{c}/v_{c}_g{g:02d}_c{k:02d}' for c in CLASSES for g in range(1, GROUPS + 1)
             for k in range(1, CLIPS + 1)]
    for flow, path in ((False, folder / f'{name}_frame.lmdb'),
                       (True, folder / f'{name}_tvl1_frame.lmdb')):
        with LMDBWriter(path) as out:
            for n in names:
                c, rest = n.split('/')
                g, k = int(rest.split('_g')[1][:2]), int(rest.split('_c')[-1])
                out.put(n, encode_frames(_video(CLASSES.index(c), g, k, flow), quality=90))
    write_split_files(folder, ucf101_splits(names, groups_per_split=1, num_splits=3),
                      {n: FRAMES for n in names})
    return Path(root)


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp('data'))


@pytest.fixture(scope='module')
def pretrain_ckpt(tmp_path_factory):
    """A pretraining checkpoint of this project (random weights), as local_nce.py writes it."""
    torch.manual_seed(0)
    model = LocalInfoNCE('s3d', K=16)
    path = tmp_path_factory.mktemp('pretrain') / 'infonce.pth.tar'
    save_checkpoint({'state_dict': model.state_dict(), 'epoch': 3, 'iteration': 7,
                     'optimizer': {}, 'best_acc': 0.0}, path)
    return path


def _reference():
    return coclr_reference()


# ----------------------------------------------------------------------------------------------
# The model

@pytest.mark.parametrize('train_what,ref_key', [('ft', 'lincls_s3d_ft_keys'),
                                                ('last', 'lincls_s3d_last_keys')])
def test_state_dict_equals_coclr(train_what, ref_key):
    ref = _reference()[ref_key]
    num_classes = ref['final_fc.1.weight' if train_what == 'ft' else 'final_fc.0.weight'][0]
    model = LinearClassifier('s3d', num_classes, train_what)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == ref
    # A released CoCLR classifier (same names and shapes) loads with strict=True.
    model.load_state_dict({k: torch.zeros(s) for k, s in ref.items()}, strict=True)


def test_heads_forward_and_frozen_backbone():
    x = torch.randn(2, 3, 8, 32, 32)
    ft = LinearClassifier('s3d', 5, 'ft', dropout=0.5)
    assert ft(x).shape == (2, 5)
    assert isinstance(ft.final_fc[0], torch.nn.Dropout) and ft.final_fc[0].p == 0.5
    assert all(p.requires_grad for p in ft.parameters())
    probe = LinearClassifier('s3d', 5, 'last').train()
    assert not any(p.requires_grad for p in probe.backbone.parameters())
    assert not probe.backbone.training and probe.final_bn.training  # frozen BN statistics
    # The head sees the L2-normalised pooled feature through BatchNorm1d.
    feat = probe.features(x)
    expected = probe.final_fc(probe.final_bn(torch.nn.functional.normalize(feat, dim=1)))
    probe.final_bn.reset_running_stats()
    assert torch.allclose(probe(x), expected, atol=1e-6)
    assert sorted(probe.head_keys()) == sorted(
        ['final_bn.weight', 'final_bn.bias', 'final_bn.running_mean', 'final_bn.running_var',
         'final_bn.num_batches_tracked', 'final_fc.0.weight', 'final_fc.0.bias'])


def test_load_from_pretraining_checkpoint(pretrain_ckpt):
    sd = load_checkpoint(pretrain_ckpt)['state_dict']
    assert checkpoint_kind(sd, 'x') == 'pretrain'
    model = LinearClassifier('s3d', 3, 'ft')
    head = {k: v.clone() for k, v in model.final_fc.state_dict().items()}
    assert load_pretrained(model, sd, 'test') == 'pretrain'
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, sd['encoder_q.0.' + k]), k
    for k, v in model.final_fc.state_dict().items():   # the new head is left as initialised
        assert torch.equal(v, head[k])


def test_load_errors(pretrain_ckpt):
    sd = load_checkpoint(pretrain_ckpt)['state_dict']
    # A pretraining checkpoint missing a backbone key: only the head may be missing.
    broken = {k: v for k, v in sd.items() if k != 'encoder_q.0.Conv_1a.conv1.weight'}
    with pytest.raises((ValueError, UserError), match=r'missing: backbone\.Conv_1a\.conv1\.weight'):
        load_pretrained(LinearClassifier('s3d', 3, 'ft'), broken, 'broken')
    # A classifier of another class count: the error names the shapes.
    five = LinearClassifier('s3d', 5, 'ft').state_dict()
    with pytest.raises((ValueError, UserError),
                       match=r'final_fc\.1\.weight: \(5, 1024\) vs \(3, 1024\)'):
        load_pretrained(LinearClassifier('s3d', 3, 'ft'), five, 'five classes')
    # A classifier with the other head.
    last = LinearClassifier('s3d', 3, 'last').state_dict()
    assert head_layout(last) == 'last'
    with pytest.raises(UserError, match='--train_what last'):
        load_pretrained(LinearClassifier('s3d', 3, 'ft'), last, 'probe')
    with pytest.raises(UserError, match='neither a pretraining checkpoint'):
        checkpoint_kind({'fc.weight': torch.zeros(1)}, 'other')


def test_missing_pretrain_path_is_an_error(data_root, tmp_path):
    missing = tmp_path / 'nowhere.pth.tar'
    with pytest.raises(UTILS_ERRORS, match=str(missing)):
        main_classifier.main(['--dataset', 'tiny', '--data_root', str(data_root), *TINY,
                              '--batch_size', '2', '--pretrain', str(missing),
                              '--output_dir', str(tmp_path)])
    with pytest.raises(SystemExit):   # no initial weights named at all
        main_classifier.main(['--dataset', 'tiny', '--data_root', str(data_root), *TINY])


# ----------------------------------------------------------------------------------------------
# Training runs

def _train(data_root, out, *extra):
    return main_classifier.main(['--dataset', 'tiny', '--data_root', str(data_root), *TINY,
                                 '--batch_size', '2', '--output_dir', str(out), *extra])


def test_linear_probe_keeps_backbone_bit_identical(data_root, pretrain_ckpt, tmp_path, capsys):
    exp = _train(data_root, tmp_path, '--train_what', 'last', '--epochs', '1',
                 '--iters_per_epoch', '2', '--pretrain', str(pretrain_ckpt), '--max_videos', '6')
    out = capsys.readouterr().out
    assert 'validation: TEST split 1' in out      # the test split is never called validation
    sd = load_checkpoint(pretrain_ckpt)['state_dict']
    ckpt = load_checkpoint(exp / 'last.pth.tar')
    for k, v in ckpt['state_dict'].items():
        if k.startswith('backbone.'):
            assert torch.equal(v, sd['encoder_q.0.' + k[len('backbone.'):]]), k
    assert ckpt['state_dict']['final_bn.num_batches_tracked'] == 2   # the head did train
    assert (exp / 'best.pth.tar').is_file()
    record = json.loads((exp / 'log.jsonl').read_text().splitlines()[-1])
    assert record['val_set'] == 'test' and 'val_top1' in record and 'train_loss' in record


def test_frozen_check_catches_a_change():
    model = LinearClassifier('s3d', 3, 'last')
    reference = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    finetune.check_frozen(model.backbone, reference)
    with torch.no_grad():
        model.backbone.Conv_1a.bn1.running_mean += 1
    with pytest.raises(RuntimeError, match='the frozen backbone changed'):
        finetune.check_frozen(model.backbone, reference)


def test_checkpoint_retention(data_root, tmp_path, capsys):
    """last, best, the latest epoch file and every --keep_every-th (0-based names)."""
    common = ('--train_what', 'ft', '--iters_per_epoch', '1', '--pretrain', 'random',
              '--max_videos', '8', '--epochs', '4')
    exp = _train(data_root, tmp_path / 'a', *common, '--keep_every', '2')
    assert 'checkpoints ~' in capsys.readouterr().out            # the expected disk use
    assert sorted(p.name for p in exp.glob('*.pth.tar')) == [
        'best.pth.tar', 'epoch1.pth.tar', 'epoch3.pth.tar', 'last.pth.tar']
    exp = _train(data_root, tmp_path / 'b', *common)              # default: every 50th
    assert sorted(p.name for p in exp.glob('*.pth.tar')) == [
        'best.pth.tar', 'epoch3.pth.tar', 'last.pth.tar']
    assert load_checkpoint(exp / 'last.pth.tar')['epoch'] == 3


def test_finetune_resumes_exactly(data_root, pretrain_ckpt, tmp_path):
    common = ('--train_what', 'ft', '--iters_per_epoch', '1', '--val_set', 'none',
              '--pretrain', str(pretrain_ckpt), '--schedule', '1', '--backbone_lr_mult', '0.1')
    straight = _train(data_root, tmp_path / 'a', '--epochs', '2', *common)
    first = _train(data_root, tmp_path / 'b', '--epochs', '1', *common)
    resumed = _train(data_root, tmp_path / 'c', '--epochs', '2', *common,
                     '--resume', str(first / 'last.pth.tar'))
    assert resumed == first                       # a resumed run continues in its folder
    a = load_checkpoint(straight / 'last.pth.tar')
    b = load_checkpoint(resumed / 'last.pth.tar')
    assert a['epoch'] == b['epoch'] == 1 and a['iteration'] == b['iteration'] == 2
    for k, v in a['state_dict'].items():
        assert torch.equal(v, b['state_dict'][k]), k
    # lr per group from the epoch: head 1e-3 -> 1e-4 at epoch 1, backbone a tenth of it.
    groups = {g['name']: g['lr'] for g in b['optimizer']['param_groups']}
    assert groups == pytest.approx({'backbone': 1e-5, 'head': 1e-4})
    assert len(Path(straight / 'log.jsonl').read_text().splitlines()) == 2
    with pytest.raises(UTILS_ERRORS, match='leaves nothing to train'):   # resumed once too often
        _train(data_root, tmp_path / 'c', '--epochs', '2', *common,
               '--resume', str(resumed / 'last.pth.tar'))
    # Starting again in a folder that holds a run is refused (no silent overwrite).
    with pytest.raises(UTILS_ERRORS, match='already holds a run'):
        _train(data_root, tmp_path / 'a', '--epochs', '2', *common)


def test_holdout_validation_and_sgd(data_root, tmp_path, capsys):
    exp = _train(data_root, tmp_path, '--train_what', 'ft', '--epochs', '1',
                 '--iters_per_epoch', '1', '--pretrain', 'random', '--val_set', 'holdout',
                 '--val_fraction', '0.3', '--optim', 'sgd')
    out = capsys.readouterr().out
    assert 'validation: held-out part of train split 1' in out
    ckpt = load_checkpoint(exp / 'best.pth.tar')
    assert 'momentum_buffer' in next(iter(ckpt['optimizer']['state'].values()))


@pytest.mark.parametrize('flip', ['batch', 'clip'])
def test_training_flips_whole_batches_or_single_clips(tmp_path, monkeypatch, flip):
    """--flip batch (the default, CoCLR's): all clips of a batch are flipped or none; clip: a draw
    per clip. The frames are left-to-right ramps in channel 0 (helpers.position_frames): a clip
    the network sees is flipped where the left half of channel 0 is the brighter."""
    videos = {f'{c}/v_{c}_g{g:02d}_c01': 20 for c in ('Alpha', 'Beta') for g in range(1, 9)}
    write_toy_dataset(tmp_path, 'toy', videos, flow=False)
    from backbone import BACKBONES
    from tests.test_pretrain import Tiny                  # one convolution: no S3D needed here
    monkeypatch.setitem(BACKBONES, 'tiny', Tiny)
    inputs = []

    def record(module, args):
        if isinstance(module, LinearClassifier):
            inputs.append(args[0].detach())
    hook = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        main_classifier.main(['--dataset', 'toy', '--data_root', str(tmp_path), *TINY,
                              '--batch_size', '4', '--output_dir', str(tmp_path / 'out'),
                              '--train_what', 'last', '--pretrain', 'random', '--epochs', '1',
                              '--val_set', 'none',
                              '--color_jitter_prob', '0', '--flip', flip, '--net', 'tiny'])
    finally:
        hook.remove()
    assert len(inputs) == 4                       # an epoch: 16 videos in batches of 4
    flipped = [(x[:, 0, ..., :16].mean((1, 2, 3)) > x[:, 0, ..., 16:].mean((1, 2, 3))).tolist()
               for x in inputs]                                      # 4 batches x 4 clips
    mixed = [len(set(batch)) == 2 for batch in flipped]
    assert not any(mixed) if flip == 'batch' else any(mixed)
    assert {f for batch in flipped for f in batch} == {True, False}
