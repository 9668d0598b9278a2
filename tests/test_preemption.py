"""Runs that survive clusters (README, Clusters): a real signal in the middle of an epoch saves and
exits 143, the same command with --resume auto ends bit-identical to a run never stopped (one
process; two gloo processes with the signal on one, resumed as two "nodes"); an undecodable frame
is one error line; prepare verify lists broken videos."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dataset import prepare
from eval import main_classifier
from tests.helpers import jpeg_bytes, position_frames, textured_frames, write_raw_lmdb
from tests.test_pretrain import ROOT, TINY, Tiny, last_log, only_experiment
from tests.test_pretrain import data_root  # noqa: F401 (a fixture)


class Signalled(Tiny):
    """The tests' backbone: SIGTERM to its own process (of rank ``rank``) at its ``at``-th
    forward with gradients (pretraining: two a step, the query's view and local clip)."""
    at, rank, calls = 0, 0, 0

    def forward(self, x):
        if torch.is_grad_enabled():
            Signalled.calls += 1
            if Signalled.calls == Signalled.at and int(os.environ.get('RANK', 0)) == self.rank:
                os.kill(os.getpid(), signal.SIGTERM)
        return super().forward(x)


# local_nce.py with the Signalled backbone, its signal set by SIGNAL_AT and SIGNAL_RANK
RUNNER = f'''import os, runpy, sys
sys.path.insert(0, {str(ROOT)!r})
os.chdir({str(ROOT)!r})
from backbone import BACKBONES
from tests.test_preemption import Signalled
Signalled.at, Signalled.rank = int(os.environ['SIGNAL_AT']), int(os.environ['SIGNAL_RANK'])
BACKBONES['tiny'] = Signalled
sys.argv = ['local_nce.py'] + sys.argv[1:]
runpy.run_path('local_nce.py', run_name='__main__')
'''


def run(cmd, background=False, **env):
    """``cmd`` in the project folder with ``env`` added; finished, or started (``background``)."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', **env)
    if background:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def pretrain_flags(data_root, out, iters):
    return ['--dataset', 'ucf101-2clip', '--data_root', str(data_root), *TINY, '--net', 'tiny',
            '--seq_len', '8', '--iters_per_epoch', str(iters), '--epochs', '2', '--warmup',
            '0.5', '--resume', 'auto', '--output_dir', str(out)]


def assert_same_run(a_dir, b_dir):
    """Weights, queue, optimiser and log of two finished runs are the same."""
    a, b = (torch.load(d / 'last.pth.tar', weights_only=True) for d in (a_dir, b_dir))
    assert (a['epoch'], a['iteration']) == (b['epoch'], b['iteration'])
    assert 'mid_epoch' not in b
    for k, v in a['state_dict'].items():
        assert torch.equal(v, b['state_dict'][k]), k
    for i, state in a['optimizer']['state'].items():
        for k, v in state.items():
            assert torch.equal(v, b['optimizer']['state'][i][k]), (i, k)
    speed = 'samples_per_s', 'train_samples_per_s'
    assert ([{k: v for k, v in r.items() if k not in speed} for r in last_log(a_dir)] ==
            [{k: v for k, v in r.items() if k not in speed} for r in last_log(b_dir)])


def stopped_at(exp_dir):
    ckpt = torch.load(exp_dir / 'last.pth.tar', weights_only=True)
    return ckpt['epoch'] + 1, ckpt['mid_epoch'][0]['meter']['n']


def test_sigterm_mid_epoch_saves_exits_143_and_resume_auto_is_exact(data_root, tmp_path):
    (tmp_path / 'run.py').write_text(RUNNER)
    r = run([sys.executable, str(tmp_path / 'run.py'),
             *pretrain_flags(data_root, tmp_path / 'straight', 3)], SIGNAL_AT='0', SIGNAL_RANK='0')
    assert r.returncode == 0, r.stderr[-3000:]
    straight = only_experiment(tmp_path / 'straight')
    cut = pretrain_flags(data_root, tmp_path / 'cut', 3)
    # Steps of 3 an epoch: the signal comes in step 4, the second step of epoch 1.
    r = run([sys.executable, str(tmp_path / 'run.py'), *cut], SIGNAL_AT='9', SIGNAL_RANK='0')
    assert r.returncode == 143, r.stderr[-3000:]
    assert 'SIGTERM: saving at the next step boundary' in r.stderr
    exp = only_experiment(tmp_path / 'cut')
    assert f'saved {exp / "last.pth.tar"} at epoch 1, step 2' in r.stdout
    assert stopped_at(exp) == (1, 2) and 'Traceback' not in r.stderr
    r = run([sys.executable, str(tmp_path / 'run.py'), *cut], SIGNAL_AT='0', SIGNAL_RANK='0')
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(straight, exp)


def test_two_processes_signal_on_one_resumed_as_two_nodes(data_root, tmp_path):
    """Rank 1 alone is signalled; both save together and exit 143 (launched as srun does: one
    process per task). The requeued run, two torchrun "nodes" of one process, ends as one node
    of two processes never stopped."""
    (tmp_path / 'run.py').write_text(RUNNER)
    port = 20000 + os.getpid() % 5000
    flags = pretrain_flags(data_root, tmp_path / 'straight', 2)
    env = {'SIGNAL_AT': '0', 'SIGNAL_RANK': '0'}
    r = run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
             str(tmp_path / 'run.py'), *flags], **env)
    assert r.returncode == 0, r.stderr[-3000:]
    cut = pretrain_flags(data_root, tmp_path / 'cut', 2)
    # Two steps an epoch: the signal comes in step 2 of rank 1, the first of epoch 1.
    ranks = [run([sys.executable, str(tmp_path / 'run.py'), *cut], True, SIGNAL_AT='5',
                 SIGNAL_RANK='1', RANK=str(rank), WORLD_SIZE='2', MASTER_ADDR='127.0.0.1',
                 MASTER_PORT=str(port)) for rank in (0, 1)]
    for p in ranks:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 143, err[-3000:]
    exp = only_experiment(tmp_path / 'cut')
    assert stopped_at(exp) == (1, 1)
    nodes = [run([sys.executable, '-m', 'torch.distributed.run', '--nnodes=2',
                  '--nproc_per_node=1', '--rdzv_backend=c10d',
                  f'--rdzv_endpoint=127.0.0.1:{port + 1}', f'--node_rank={node}',
                  str(tmp_path / 'run.py'), *cut], True, **env)
             for node in (0, 1)]
    for p in nodes:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    assert_same_run(only_experiment(tmp_path / 'straight'), exp)


def test_finetuning_stopped_by_a_signal_resumes_exactly(tmp_path, monkeypatch):
    from backbone import BACKBONES
    from tests.test_classifier import make_tiny_dataset
    monkeypatch.setitem(BACKBONES, 'tiny', Signalled)
    root = make_tiny_dataset(tmp_path / 'data')
    flags = ['--dataset', 'tiny', '--data_root', str(root), '--seq_len', '8', '--ds', '2',
             '--img_dim', '32', '--net', 'tiny', '-j', '0', '--device', 'cpu',
             '--batch_size', '2', '--train_what', 'ft', '--pretrain', 'random',
             '--iters_per_epoch', '3', '--epochs', '2', '--max_videos', '8', '--resume', 'auto']
    straight = main_classifier.main(flags + ['--output_dir', str(tmp_path / 'straight')])
    monkeypatch.setattr(Signalled, 'calls', 0)
    monkeypatch.setattr(Signalled, 'at', 2)     # one forward a step: in step 2 of epoch 0
    cut = flags + ['--output_dir', str(tmp_path / 'cut')]
    with pytest.raises(SystemExit) as stop:
        main_classifier.main(cut)
    assert stop.value.code == 143
    exp = only_experiment(tmp_path / 'cut')
    assert stopped_at(exp) == (0, 2)
    monkeypatch.setattr(Signalled, 'at', 0)
    assert main_classifier.main(cut) == exp
    assert_same_run(straight, exp)


@pytest.fixture
def broken_lmdb(tmp_path):
    """A UCF101-named dataset folder whose RGB LMDB has one truncated frame."""
    folder = tmp_path / 'data' / 'ucf101'
    good = jpeg_bytes(textured_frames(8, 40, 40))
    bad = list(good)
    bad[5] = bad[5][:len(bad[5]) // 2]
    videos = [(f'{c}/v_{c}_g{g:02d}_c01', good) for c in ('Alpha', 'Beta') for g in (1, 8, 9)]
    videos[4] = (videos[4][0], bad)
    folder.mkdir(parents=True)
    write_raw_lmdb(folder / 'ucf101_frame.lmdb', videos)
    return folder / 'ucf101_frame.lmdb', videos[4][0]


def test_a_truncated_frame_is_one_error_line_naming_lmdb_video_and_frame(broken_lmdb,
                                                                         tmp_path):
    path, name = broken_lmdb
    # 8-frame clips of 8-frame videos: every frame is read; a worker decodes them
    (tmp_path / 'run.py').write_text(RUNNER)
    r = run([sys.executable, str(tmp_path / 'run.py'), '--dataset', 'ucf101-2clip',
             '--data_root', str(tmp_path / 'data'), *TINY, '--net', 'tiny', '--seq_len', '8',
             '--iters_per_epoch', '0', '-j', '1', '--output_dir', str(tmp_path / 'out')],
            SIGNAL_AT='0', SIGNAL_RANK='0')
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-3000:]
    error = r.stderr[r.stderr.index('error: '):].splitlines()[0]   # after the progress bar
    assert error.startswith(f"error: {path}: frame 5 of video '{name}' is not a valid JPEG")
    assert r.stderr.count('error') == 1


def test_prepare_verify_lists_broken_videos_and_fails(broken_lmdb, tmp_path, capsys):
    path, name = broken_lmdb
    flow = write_raw_lmdb(tmp_path / 'ucf101_tvl1_frame.lmdb', [
        ('A/v_A_g01_c01', jpeg_bytes(position_frames(7, 40, 40, flow=True)))])
    assert prepare.main(['verify', '--src', flow, '-j', '1']) == 0
    assert f'{flow} (flow): 1 videos, 7 frames, 0 broken' in capsys.readouterr().out
    assert prepare.main(['verify', '--src', str(path), flow, '-j', '1']) == 2
    out, err = capsys.readouterr()
    assert f'{path} (RGB): 6 videos, 48 frames, 1 broken\n  {name}: ' in out
    assert f"frame 5 of video '{name}' is not a valid JPEG" in out
    assert err.strip().endswith('error: 1 broken video(s) in --src, listed above')
    # An RGB LMDB where flow is expected (by its name) is not two-channel flow.
    rgb_as_flow = write_raw_lmdb(tmp_path / 'x_tvl1_frame.lmdb', [
        ('A/v_A_g01_c01', jpeg_bytes(textured_frames(3, 40, 40)))])
    assert prepare.main(['verify', '--src', rgb_as_flow, '-j', '1']) == 2
    assert 'frame 0 is not two-channel flow' in capsys.readouterr().out


def test_loader_resumed_mid_epoch_reads_only_the_rest(data_root):
    """The batches after the first k of an epoch are those of the whole epoch; the first k's
    videos are never read."""
    from dataset.loader import TrainLoader
    from dataset.catalog import build_dataset
    from tests.test_dataset import same_batches
    data = build_dataset('ucf101-2clip', 'train', data_root=data_root, seq_len=8, img_dim=32)

    class Reads(torch.utils.data.Dataset):   # the dataset, noting the videos asked for
        asked = []

        def __len__(self):
            return len(data)

        def __getitem__(self, index):
            self.asked.append(index)
            return data[index]

    whole = list(TrainLoader(data, 2, 0, seed=5, epochs=2).epoch(1))
    assert len(whole) == 4
    rest = list(TrainLoader(Reads(), 2, 0, seed=5, epochs=2).epoch(1, 3))
    same_batches(rest, whole[3:])
    assert sorted(Reads.asked) == sorted(whole[3]['index'].tolist())


def test_save_signal_names_the_signals_and_the_old_handlers_come_back():
    """--save_signal USR2: USR2 asks for the save (in one process, without a collective), TERM is
    left alone, and leaving the run restores the handlers from before."""
    from utils.run import Preemption
    before = signal.getsignal(signal.SIGUSR2)
    with Preemption(['USR2']) as stop:
        assert signal.getsignal(signal.SIGTERM) != stop.handle
        assert not stop.agreed()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.agreed() and stop.received == 'SIGUSR2'
    assert signal.getsignal(signal.SIGUSR2) == before
