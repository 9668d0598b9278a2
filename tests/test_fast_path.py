"""The GPU fast path computes what the plain path computes (checked on the CPU)."""
import copy

import pytest
import torch

from dataset.catalog import build_dataset
from dataset.video_dataset import collate
from model.fast import Prefetcher, decode_on_device
from model.moco import LocalInfoNCE
from tests.helpers import write_toy_dataset


@pytest.fixture(scope='module')
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    videos = {f'{c}/v_{c}_g{g:02d}_c01': 30 + g for c in ('Alpha', 'Beta') for g in (1, 2, 3)}
    write_toy_dataset(root, 'toy', videos, height=40, width=48)
    return root


def test_device_decode_geometry_equals_worker_path(root):
    """Same seed -> the same plan; decoding + crop on 'the device' (here the CPU) must give the
    very frames the worker path gives."""
    kw = dict(data_root=root, seq_len=8, img_dim=32)
    cpu = build_dataset('toy-2stream-2clip', 'train', **kw)
    dev = build_dataset('toy-2stream-2clip', 'train', decode='device', **kw)
    torch.manual_seed(7)
    a = collate([cpu[i] for i in range(len(cpu))])
    torch.manual_seed(7)
    raw = collate([dev[i] for i in range(len(dev))])
    assert 'rgb' not in raw and 'jpeg' in raw          # workers only read bytes
    b = decode_on_device(raw, torch.device('cpu'), 32)
    for m in ('rgb', 'flow'):
        assert a[m].shape == (len(cpu), 2, 8, 3, 32, 32)
        assert torch.equal(a[m], b[m]), m
    # the plans really vary: flips, crops and both view kinds occur
    assert raw['flips'].any() and not raw['flips'].all()


def test_bf16_losses_match_fp32():
    """bf16 autocast + channels-last gives the fp32 losses within bf16 tolerance.

    Compared on a well-conditioned network: He-initialised convolutions and BatchNorm with
    running statistics. (An untrained net in train mode on batch 2 is chaotic: its last
    BatchNorms see one value per sample, so any rounding flips their output.)"""
    torch.manual_seed(0)
    m = LocalInfoNCE('s3d', K=16, bn_splits=1)
    for mod in m.modules():
        if isinstance(mod, torch.nn.Conv3d):
            torch.nn.init.kaiming_normal_(mod.weight, nonlinearity='relu')
    m.encoder_k.load_state_dict(m.encoder_q.state_dict())
    m.eval()
    fast = copy.deepcopy(m)
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(2, 3, 32, 32, 32, generator=g), torch.randn(2, 3, 32, 32, 32, generator=g)
    loss, ref = m(x1, x2)
    cl = torch.channels_last_3d
    with torch.autocast('cpu', dtype=torch.bfloat16):
        fast_loss, out = fast(x1.contiguous(memory_format=cl), x2.contiguous(memory_format=cl))
    assert fast_loss.dtype == torch.float32   # losses in fp32 whatever the encoders ran in
    assert fast_loss.item() == pytest.approx(loss.item(), rel=0.02, abs=0.01)
    for k in ('loss_global', 'loss_inter', 'loss_intra'):
        assert out[k].item() == pytest.approx(ref[k].item(), rel=0.02, abs=0.01), k


# ---------------------------------------------------------------------------------- prefetcher

def test_prefetcher_thread_keeps_order_and_ends():
    cpu = torch.device('cpu')
    batches = [torch.full((2,), i) for i in range(7)]
    threaded = Prefetcher(batches, lambda b: {'x': b * 2}, cpu, depth=2)
    assert [int(o['x'][0]) for o in threaded] == [2 * i for i in range(7)]
    with pytest.raises(StopIteration):
        next(threaded)
    threaded.close()
    assert not threaded.thread.is_alive()


def test_prefetcher_raises_the_threads_error_and_stops_early():
    cpu = torch.device('cpu')

    def fn(b):
        if b == 3:
            raise ValueError('frame 5 of video A/a is not a valid JPEG')
        return b
    p = Prefetcher(range(10), fn, cpu)
    assert [next(p) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match='frame 5 of video A/a'):
        next(p)
    p.close()
    assert not p.thread.is_alive()

    endless = Prefetcher(iter(int, 1), lambda b: b, cpu, depth=2)  # never ends
    next(endless)
    endless.close()                       # the thread is blocked on a full queue: it must stop
    assert not endless.thread.is_alive()


def test_epoch_meter_means_over_reporting_steps_and_first_non_finite_iteration():
    from utils.run import EpochMeter
    cpu = torch.device('cpu')
    meter = EpochMeter(0, 2, cpu, show=False, writer=None, print_freq=10)
    meter.update(5, torch.tensor(1.0), 4, 0.1, {'top1': torch.tensor(0.5)})
    meter.update(6, torch.tensor(3.0), 4, 0.1, {'top1': torch.tensor(1.0),
                                                'mining_acc': torch.tensor(0.25)})
    means = meter.close()
    assert (means['loss'], means['top1'], means['mining_acc']) == (2.0, 0.75, 0.25)
    assert means['samples_per_s'] > 0
    meter = EpochMeter(0, 3, cpu, show=False, writer=None, print_freq=10)
    meter.update(7, torch.tensor(1.0), 4, 0.1, {'top1': torch.tensor(0.5)})
    meter.update(8, torch.tensor(float('nan')), 4, 0.1, {'top1': torch.tensor(0.5)})
    with pytest.raises(FloatingPointError, match='iteration 8'):   # read at the epoch's end
        meter.update(9, torch.tensor(float('inf')), 4, 0.1, {'top1': torch.tensor(0.5)})
