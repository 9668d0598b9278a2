"""The GPU fast path computes what the plain path computes (checked on the CPU)."""
import copy
from types import SimpleNamespace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import functional_call

from backbone import BACKBONES
from bench.train_step import check_same_steps, make_inputs, make_model, path_step, record_steps
from dataset.catalog import build_dataset
from dataset.video_dataset import collate
from model.fast import Prefetcher, decode_on_device
from model.moco import LocalCoCLR, LocalInfoNCE
from tests.helpers import write_toy_dataset
from tests.test_learning import Tiny


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


@pytest.mark.parametrize('cls', [LocalInfoNCE, LocalCoCLR])
def test_step_reads_no_tensor_value_on_the_host(cls):
    """What a CUDA graph needs: the forward and backward of a step (a full CoCLR queue: mining,
    the self-mask draw, shuffle-BN of every key batch) decide nothing on the host from a tensor's
    value. Run on fake tensors, which hold no values: reading one (``bool``, ``.item()``) raises."""
    torch.manual_seed(0)
    model = cls('s3d', K=8, bn_splits=2).train()
    if cls is LocalCoCLR:
        model.queue_vname.copy_(torch.arange(8))
        assert model.ready   # read once, before the step: the queue stays full
    with FakeTensorMode() as mode:
        state = {k: mode.from_tensor(v) for k, v in model.state_dict(keep_vars=True).items()}
        x, ids = torch.randn(4, 3, 32, 64, 64), torch.arange(4)
        inputs = {'view1': x, 'view2': x}
        if cls is LocalCoCLR:
            inputs.update(other_view2=x, source=ids, label=ids)
        loss, stats = functional_call(model, state, args=(), kwargs=inputs)
        loss.backward()
        assert state['encoder_q.4.weight'].grad is not None


def test_graph_check_needs_the_same_draws_and_losses(monkeypatch):
    """bench/gpu.sh asserts that graphed steps equal eager steps from the same seeds
    (bench/train_step.py graph_check). On the CPU: two eager runs pass; a run whose random draws
    are frozen after the first step, as a graph replaying a host draw, fails; so do other losses."""
    monkeypatch.setitem(BACKBONES, 'tiny', Tiny)
    cpu = torch.device('cpu')
    args = SimpleNamespace(net='tiny', moco_k=8, bn_splits=1, batch_size=2, seq_len=8, img_dim=24)

    def run(frozen=False):
        torch.manual_seed(0)
        model = make_model('coclr', args, cpu, False)
        inputs = make_inputs('coclr', args, cpu, False)
        step = path_step(model, 'fast', cpu)
        torch.manual_seed(1)
        first = torch.get_rng_state()

        def replay(batch):   # every step draws what the first step drew
            torch.set_rng_state(first)
            return step(batch)
        return record_steps(replay if frozen else step, inputs, 3, cpu)

    eager = run()
    check_same_steps(eager, run(), rtol=0)
    with pytest.raises(AssertionError, match='generators end in other states'):
        check_same_steps(eager, run(frozen=True), rtol=1e-3)
    other_losses = ([x * 1.01 for x in eager[0]], eager[1])
    with pytest.raises(AssertionError, match=r'losses of steps \[0, 1, 2\]'):
        check_same_steps(eager, other_losses, rtol=1e-3)


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
